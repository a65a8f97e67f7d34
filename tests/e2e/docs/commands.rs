//! Every `baton` command line the docs and examples show parses with the
//! CLI.

use baton_tests::tools::repository;

/// Every `baton` command line shown in the docs: in ```sh/```console
/// blocks (a console block's `$ ` lines), in inline code of the prose,
/// and in the example files (the systemd units' `Exec*=` lines, comments
/// of the configs).
fn documented_commands() -> Vec<(String, Vec<String>)> {
    let root = repository();
    let mut sources = vec![root.join("README.md")];
    for dir in ["docs", "examples"] {
        let mut stack = vec![root.join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| {
                    ["md", "toml", "service", "socket", "conf", "rs", "py"]
                        .contains(&e.to_str().unwrap_or_default())
                }) {
                    sources.push(path);
                }
            }
        }
    }
    let mut commands = Vec::new();
    for source in sources {
        let text = std::fs::read_to_string(&source).unwrap();
        let name = source.strip_prefix(&root).unwrap().display().to_string();
        let markdown = name.ends_with(".md");
        let mut fence: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let at = format!("{name}:{}", n + 1);
            if markdown {
                if let Some(info) = line.trim_start().strip_prefix("```") {
                    // The info string's first word: `rust` of `rust,no_run`.
                    let lang = info.split(',').next().unwrap_or_default().trim();
                    fence = match fence {
                        Some(_) => None,
                        None => Some(lang.to_string()),
                    };
                    continue;
                }
                match fence.as_deref() {
                    Some("sh" | "bash" | "shell") => commands.push((at, line.to_string())),
                    Some("console") => {
                        if let Some(command) = line.strip_prefix("$ ") {
                            commands.push((at, command.to_string()));
                        }
                    }
                    Some("dockerfile") => {
                        commands.extend(dockerfile_command(line).map(|c| (at, c)))
                    }
                    Some(_) => {}
                    // Prose: each inline code span.
                    None => {
                        for (i, span) in line.split('`').enumerate() {
                            if i % 2 == 1 {
                                commands.push((at.clone(), span.to_string()));
                            }
                        }
                    }
                }
            } else {
                // Other files: `Exec*=` lines and code spans in comments.
                if let Some((key, value)) = line.split_once('=') {
                    if key.starts_with("Exec") {
                        commands.push((at.clone(), value.to_string()));
                    }
                }
                for (i, span) in line.split('`').enumerate() {
                    if i % 2 == 1 {
                        commands.push((at.clone(), span.to_string()));
                    }
                }
            }
        }
    }
    // From each, the `baton ...` invocations at the start of a shell
    // command (also after `sudo`, `kubectl exec ... --`, `Exec*=`; not
    // `cargo bench -p baton`), up to the end of that command.
    let mut found = Vec::new();
    for (at, text) in commands {
        let Some(words) = shlex::split(&text) else {
            continue;
        };
        let mut previous: Option<String> = None;
        let mut words = words.into_iter().peekable();
        while let Some(word) = words.next() {
            let starts = previous
                .as_deref()
                .is_none_or(|p| SEPARATORS.contains(&p) || ["sudo", "--", "exec"].contains(&p));
            let baton = word == "baton" || word.ends_with("/baton");
            previous = Some(word.clone());
            if !(baton && (starts || word.starts_with("Exec"))) {
                continue;
            }
            let mut args = vec!["baton".to_string()];
            while let Some(arg) = words.next_if(|w| !SEPARATORS.contains(&&w[..])) {
                args.push(arg);
            }
            if args.len() > 1 {
                found.extend(synopses(&args).into_iter().map(|a| (at.clone(), a)));
            }
        }
    }
    found
}

/// The command of a Dockerfile's `ENTRYPOINT`, `CMD` or `RUN` line, in
/// its exec form (a JSON array) or its shell form, as one shell line.
fn dockerfile_command(line: &str) -> Option<String> {
    let (instruction, rest) = line.trim().split_once(char::is_whitespace)?;
    if !["ENTRYPOINT", "CMD", "RUN"].contains(&instruction) {
        return None;
    }
    let rest = rest.trim();
    if !rest.starts_with('[') {
        return Some(rest.to_string());
    }
    let words: Vec<String> = serde_json::from_str(rest).ok()?;
    shlex::try_join(words.iter().map(String::as_str)).ok()
}

const SEPARATORS: [&str; 5] = ["&&", "||", "|", ";", "&"];

/// A synopsis as the docs write one (`baton reload [--timeout DUR]`,
/// `baton scale +N`, `baton -s reload|stop`) as the command lines it
/// stands for: brackets dropped, placeholders given a value, each
/// alternative on its own.
fn synopses(args: &[String]) -> Vec<Vec<String>> {
    let mut lines = vec![Vec::new()];
    for arg in args {
        let arg = arg.trim_start_matches('[').trim_end_matches(']');
        let arg = match arg {
            "DUR" => "10s",
            "N" => "2",
            "+N" => "+2",
            "-N" => "-2",
            other => other,
        };
        let alternatives: Vec<&str> = if arg.contains('|') && !arg.starts_with('-') {
            arg.split('|').collect()
        } else {
            vec![arg]
        };
        lines = lines
            .into_iter()
            .flat_map(|line| {
                alternatives.iter().map(move |alt| {
                    let mut line = line.clone();
                    line.push(alt.to_string());
                    line
                })
            })
            .collect();
    }
    lines
}

/// Each `baton` command the docs show is one the CLI accepts: its
/// subcommand, flags and values parse (`--help` and `--version` too).
#[test]
fn every_baton_command_in_the_docs_parses() {
    use clap::Parser;
    let commands = documented_commands();
    let mut bad = Vec::new();
    for (at, args) in &commands {
        // The keeper's hidden first argument, which `main` takes before
        // the parser (docs/architecture.md names it).
        if args[1] == baton::keeper::ARG {
            continue;
        }
        match baton::cli::Cli::try_parse_from(args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) => {}
            // Prose naming a subcommand (`baton scale`) without its value.
            Err(e)
                if args.len() == 2
                    && e.kind() == clap::error::ErrorKind::MissingRequiredArgument => {}
            Err(e) => bad.push(format!("{at}: `{}`: {}", args.join(" "), e.kind())),
        }
    }
    eprintln!("{} baton commands in the docs parsed", commands.len());
    assert!(
        commands.len() > 40,
        "only {} baton commands found in the docs: is the extraction broken?",
        commands.len()
    );
    assert!(
        bad.is_empty(),
        "commands the CLI rejects:\n{}",
        bad.join("\n")
    );
}
