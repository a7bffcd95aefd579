//! Repository conventions checked in CI: every Rust source file starts with a `//!` line
//! that states its role.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Top-level folders holding the project's Rust sources.
const SOURCE_DIRS: &[&str] = &["edge", "edge-ebpf", "agent", "bench", "xtask", "tests"];

/// Checks every `.rs` file under the source folders of `root`.
///
/// # Errors
/// Lists each file that breaks a convention, with the fix.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        collect_rust_files(&root.join(dir), &mut files);
    }
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !text.starts_with("//!") {
            problems.push(format!(
                "{}: missing module doc: start the file with a `//!` line that states its role",
                file.strip_prefix(root).unwrap_or(file).display()
            ));
        }
    }
    if !problems.is_empty() {
        bail!("{} problem(s):\n{}", problems.len(), problems.join("\n"));
    }
    eprintln!("xtask: tidy checked {} files", files.len());
    Ok(())
}

fn collect_rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n == "target" || n == "results")
            {
                continue;
            }
            collect_rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_passes_tidy() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        check(root).unwrap();
    }

    #[test]
    fn missing_module_doc_is_reported() {
        let dir = std::env::temp_dir().join(format!("xtask-tidy-{}", std::process::id()));
        let src = dir.join("edge");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("bad.rs"), "fn main() {}\n").unwrap();
        let err = check(&dir).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("bad.rs: missing module doc"), "{err}");
    }
}
