//! Links between the pages: every relative link reaches its file and
//! heading, and the README links every page.

use super::pages;
use baton_tests::tools::repository;

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_`
/// dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The text of `page` outside its code blocks, with each line's number.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            lines.push((n + 1, line));
        }
    }
    lines
}

/// The anchors of `page`'s headings.
fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .into_iter()
        .filter_map(|(_, line)| line.strip_prefix('#'))
        .map(|heading| anchor(heading.trim_start_matches('#')))
        .collect()
}

/// The targets of the Markdown links (and images) in `line`, outside code
/// spans.
fn links(line: &str) -> Vec<&str> {
    let mut found = Vec::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 1 {
            continue;
        }
        let mut rest = part;
        while let Some(start) = rest.find("](") {
            let target = &rest[start + 2..];
            let Some(end) = target.find(')') else { break };
            found.push(&target[..end]);
            rest = &target[end..];
        }
    }
    found
}

/// Every relative link of every page reaches an existing file, and a
/// link with `#anchor` to a page one of its headings.
#[test]
fn every_relative_link_in_the_docs_reaches_its_file_and_heading() {
    let root = repository();
    let mut checked = 0;
    let mut bad = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(root.join(&page)).unwrap();
        for (n, line) in prose(&text) {
            for target in links(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let at = format!("{}:{n}: ({target})", page.display());
                let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
                let path = if file.is_empty() {
                    root.join(&page)
                } else {
                    root.join(page.parent().unwrap()).join(file)
                };
                if !path.exists() {
                    bad.push(format!("{at}: no such file"));
                    continue;
                }
                if !fragment.is_empty() {
                    let target_text = std::fs::read_to_string(&path).unwrap_or_default();
                    if !anchors(&target_text).iter().any(|a| a == fragment) {
                        bad.push(format!("{at}: no heading with that anchor"));
                    }
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} relative links: is the extraction broken?"
    );
    assert!(bad.is_empty(), "broken links:\n{}", bad.join("\n"));
}

/// The README's table of pages names every page under `docs/`.
#[test]
fn the_readme_links_every_docs_page() {
    let readme = std::fs::read_to_string(repository().join("README.md")).unwrap();
    let linked: Vec<&str> = readme.lines().flat_map(links).collect();
    let missing: Vec<String> = pages()
        .into_iter()
        .filter(|p| p.starts_with("docs"))
        .map(|p| p.display().to_string())
        .filter(|p| !linked.contains(&p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "pages the README does not link: {missing:?}"
    );
}
