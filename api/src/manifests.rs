//! Which files a set of manifest paths holds: the paths named that are files (whatever
//! their extension) and, below the directories named, every `*.yaml`, `*.yml` and
//! `*.json` file, hidden entries skipped. The controller's file source reads these, and
//! the local cluster waits until the controller has read each of them: one rule for both.

use std::path::{Path, PathBuf};

/// The manifest files under `paths`, sorted, each once.
pub fn files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending: Vec<PathBuf> = paths.to_vec();
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    pending.push(entry.path());
                }
            }
        } else if path.is_file() && (is_manifest(&path) || paths.contains(&path)) {
            found.push(path);
        }
    }
    found.sort();
    found.dedup();
    found
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| matches!(ext, "yaml" | "yml" | "json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_files_and_manifests_below_directories() {
        let dir = std::env::temp_dir().join(format!("weft-manifests-{}", std::process::id()));
        let nested = dir.join("nested");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::create_dir_all(dir.join(".hidden")).unwrap();
        for name in [
            "a.yaml",
            "b.json",
            "notes.txt",
            ".c.yaml",
            "nested/d.yml",
            ".hidden/e.yaml",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        let named = dir.join("notes.txt");
        let found = files(&[dir.clone(), named.clone()]);
        std::fs::remove_dir_all(&dir).unwrap();
        let mut expected = vec![
            dir.join("a.yaml"),
            dir.join("b.json"),
            nested.join("d.yml"),
            named,
        ];
        expected.sort();
        assert_eq!(found, expected);
    }
}
