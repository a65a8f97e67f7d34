//! Lists the repository's Markdown pages (the README and every `.md` under
//! `docs/`) for the `cfg(doctest)` module of `src/lib.rs`, so that the Rust
//! snippets of a new page are compiled as doc tests without anyone adding
//! it to a list.

use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package is in the repository")
        .to_path_buf();
    println!(
        "cargo::rerun-if-changed={}",
        root.join("README.md").display()
    );
    // Cargo scans a directory named here for any change below it.
    println!("cargo::rerun-if-changed={}", root.join("docs").display());
    let mut pages = vec![root.join("README.md")];
    markdown_under(&root.join("docs"), &mut pages);
    pages.sort();
    let mut module = String::new();
    for page in &pages {
        let relative = page.strip_prefix(&root).expect("a page of the repository");
        let name: String = relative
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        module.push_str(&format!(
            "#[doc = include_str!({:?})]\n#[allow(non_camel_case_types)]\npub struct {name};\n",
            page.to_str().expect("a UTF-8 path")
        ));
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("doc_pages.rs"), module).expect("writing doc_pages.rs");
}

fn markdown_under(dir: &Path, pages: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            markdown_under(&path, pages);
        } else if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
}
