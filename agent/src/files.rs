//! Files the agent keeps in its state directory (pod records, the cached configuration
//! and certificates): each is written whole or not at all, so a crash mid-write leaves
//! the previous version, never half of one; what such a crash leaves behind is swept
//! at the next start. And the Unix sockets it listens on there.

use std::{
    fs,
    io::Write as _,
    os::unix::{
        fs::{OpenOptionsExt, PermissionsExt as _},
        net::UnixListener,
    },
    path::Path,
};

/// The suffix of a temporary file of [`write_atomically`]: `.tmp.<pid>`.
const TEMPORARY: &str = ".tmp.";

/// Writes `contents` to a temporary file beside `path` created with `mode`, syncs it,
/// then renames it over `path`. The temporary file is the process's own: during an
/// upgrade two agents write the same files.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = path.with_extension("").into_os_string();
    tmp.push(format!("{TEMPORARY}{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// Removes the temporary files in `dir` left by a [`write_atomically`] of a process
/// that no longer runs (it crashed mid-write); a running agent's (during an upgrade
/// two run) are its own to finish. Returns how many were removed.
pub fn remove_leftovers(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(writer_pid) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            match fs::remove_file(entry.path()) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
                _ => removed += 1,
            }
        }
    }
    Ok(removed)
}

/// The process that wrote the temporary file called `name`, if it is one.
fn writer_pid(name: &str) -> Option<u32> {
    let (_, pid) = name.rsplit_once(TEMPORARY)?;
    pid.parse().ok()
}

/// Listens on the Unix socket at `path`, replacing a stale one, for root only: what
/// answers there (enrollment, the listening sockets) is the node's to ask for.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    match fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_dead_writers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            fs::write(dir.path().join(name), b"x").unwrap();
            name.to_owned()
        };
        // No process has a pid above the kernel's limit (2^22).
        let dead = file(&format!("config.tmp.{}", i32::MAX));
        let own = file(&format!("pod.tmp.{}", std::process::id()));
        let others = [
            file("config.pb"),
            file("pod.json"),
            file("notes.tmp.x"),
            own,
        ];

        write_atomically(&dir.path().join("config.pb"), b"new", 0o644).unwrap();
        assert_eq!(remove_leftovers(dir.path()).unwrap(), 1);

        assert!(!dir.path().join(dead).exists());
        for name in others {
            assert!(dir.path().join(&name).exists(), "{name} was removed");
        }
        assert_eq!(fs::read(dir.path().join("config.pb")).unwrap(), b"new");
    }
}
