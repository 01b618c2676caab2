//! Files the agent keeps in its state directory (pod records, the cached configuration
//! and certificates): each is written whole or not at all, so a crash mid-write leaves
//! the previous version, never half of one. And the Unix sockets it listens on there.

use std::{
    fs,
    io::Write as _,
    os::unix::{
        fs::{OpenOptionsExt, PermissionsExt as _},
        net::UnixListener,
    },
    path::Path,
};

/// Writes `contents` to a temporary file beside `path` created with `mode`, syncs it,
/// then renames it over `path`. The temporary file is the process's own: during an
/// upgrade two agents write the same files.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
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
