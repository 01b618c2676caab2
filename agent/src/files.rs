//! Files the agent keeps in its state directory (pod records, the cached configuration
//! and certificates): each is written whole or not at all, so a crash mid-write leaves
//! the previous version, never half of one.

use std::{fs, io::Write as _, os::unix::fs::OpenOptionsExt, path::Path};

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
