//! `cargo xtask image`: OCI images of the agent (with `weft-cni`, which the agent
//! places on its node) and the controller, built from the release binaries without
//! pulling anything from a registry. Each image's root filesystem holds the binaries
//! under `/usr/local/bin`, the shared libraries `ldd` says they load (glibc and
//! libgcc, at the same paths as here) and `/etc/passwd` with a `nonroot` user; one
//! layer, files owned by root, every timestamp zero, so the same binaries give the
//! same image digest.
//!
//! Written as OCI image layouts (`target/images/<name>/`) and as archives of them
//! (`target/images/<name>.tar`), which `podman load`, `skopeo copy oci-archive:` and
//! `docker load` take. Before it says done, every binary shows it runs inside its
//! image's root filesystem (chroot), and inside a container with podman when podman is
//! installed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::cmd;

/// An image: its name and the binaries it carries.
struct Image {
    name: &'static str,
    binaries: &'static [&'static str],
    /// The user it runs as (the agent needs root's identity for its capabilities).
    user: &'static str,
}

const IMAGES: [Image; 2] = [
    Image {
        name: "weft-agent",
        binaries: &["weft-agent", "weft-cni"],
        user: "0:0",
    },
    Image {
        name: "weft-controller",
        binaries: &["weft-controller"],
        user: "65532:65532",
    },
];

pub fn run() -> anyhow::Result<()> {
    eprintln!("==> building release binaries (agent, CNI plugin, controller)");
    cmd::build_release(&["weft-cni", "weft-controller"])?;
    let target = cmd::target_dir()?;
    let bin = target.join("release");
    let out = target.join("images");
    let version = env!("CARGO_PKG_VERSION");
    let revision = cmd::capture(Command::new("git").args(["rev-parse", "HEAD"]))
        .map(|text| text.trim().to_owned())
        .unwrap_or_default();
    for image in &IMAGES {
        eprintln!("==> image {}", image.name);
        let layout = out.join(image.name);
        let rootfs = out.join(format!("{}.rootfs", image.name));
        for dir in [&layout, &rootfs] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
        fill_rootfs(&rootfs, &bin, image)?;
        let archive = write_layout(&layout, &rootfs, image, version, &revision)?;
        check(&rootfs, &archive, image)?;
        let size = std::fs::metadata(&archive)?.len();
        eprintln!(
            "    {} ({:.1} MiB compressed): {}",
            archive.display(),
            size as f64 / (1024.0 * 1024.0),
            image.binaries.join(", ")
        );
    }
    Ok(())
}

/// The image's files: binaries, the libraries they load, the users.
fn fill_rootfs(rootfs: &Path, bin: &Path, image: &Image) -> anyhow::Result<()> {
    let local_bin = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&local_bin)?;
    std::fs::create_dir_all(rootfs.join("etc"))?;
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    let mut libraries = Vec::new();
    for binary in image.binaries {
        let source = bin.join(binary);
        std::fs::copy(&source, local_bin.join(binary))
            .with_context(|| format!("cannot copy {}", source.display()))?;
        let listed = cmd::capture(Command::new("ldd").arg(&source))?;
        libraries.extend(shared_libraries(&listed));
    }
    libraries.sort();
    libraries.dedup();
    for library in libraries {
        let inside = rootfs.join(library.strip_prefix("/").unwrap_or(&library));
        std::fs::create_dir_all(inside.parent().expect("a library lives in a directory"))?;
        // Resolved: the image holds the file, not a link to one it lacks.
        std::fs::copy(&library, &inside)
            .with_context(|| format!("cannot copy {}", library.display()))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n")?;
    Ok(())
}

/// The absolute paths of the libraries in `ldd`'s output (the vDSO has none).
fn shared_libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Writes the OCI image layout of `rootfs` and its archive; returns the archive.
fn write_layout(
    layout: &Path,
    rootfs: &Path,
    image: &Image,
    version: &str,
    revision: &str,
) -> anyhow::Result<PathBuf> {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    // One layer: a reproducible tar of the root filesystem, gzipped without a name or
    // time in its header.
    let tar = layout.join("layer.tar");
    reproducible_tar(&tar, rootfs, &["."])?;
    let diff_id = sha256(&tar)?;
    cmd::run(Command::new("gzip").args(["-n", "-9"]).arg(&tar))?;
    let gzipped = layout.join("layer.tar.gz");
    let layer = blob(&blobs, &gzipped)?;

    let annotations = json!({
        "org.opencontainers.image.title": image.name,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": "https://github.com/weft-mesh/weft",
        "org.opencontainers.image.licenses": "Apache-2.0",
    });
    let entrypoint = format!("/usr/local/bin/{}", image.binaries[0]);
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [entrypoint],
            "User": image.user,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Labels": annotations,
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created_by": "cargo xtask image" }],
    });
    let config = blob_of(&blobs, serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
        "annotations": annotations,
    });
    let manifest = blob_of(&blobs, serde_json::to_vec(&manifest)?)?;
    let mut reference = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    reference["annotations"] = json!({
        "org.opencontainers.image.ref.name": version,
        // What `podman load` and `docker load` name the image.
        "io.containerd.image.name": format!("{}:{version}", image.name),
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [reference] }))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = layout.with_extension("tar");
    reproducible_tar(&archive, layout, &["oci-layout", "index.json", "blobs"])?;
    Ok(archive)
}

/// A tar of `paths` in `dir` that depends on their contents only: sorted, owned by
/// root, every timestamp zero.
fn reproducible_tar(archive: &Path, dir: &Path, paths: &[&str]) -> anyhow::Result<()> {
    cmd::run(
        Command::new("tar")
            .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0"])
            .args(["--numeric-owner", "-cf"])
            .arg(archive)
            .arg("-C")
            .arg(dir)
            .args(paths),
    )
}

/// A blob's digest (hex) and size.
struct Blob {
    digest: String,
    size: u64,
}

fn descriptor(media_type: &str, blob: &Blob) -> serde_json::Value {
    json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", blob.digest),
        "size": blob.size,
    })
}

/// Moves `file` into the blob store under its digest.
fn blob(blobs: &Path, file: &Path) -> anyhow::Result<Blob> {
    let digest = sha256(file)?;
    let size = std::fs::metadata(file)?.len();
    std::fs::rename(file, blobs.join(&digest))?;
    Ok(Blob { digest, size })
}

fn blob_of(blobs: &Path, bytes: Vec<u8>) -> anyhow::Result<Blob> {
    let file = blobs.join("incoming");
    std::fs::write(&file, bytes)?;
    blob(blobs, &file)
}

fn sha256(file: &Path) -> anyhow::Result<String> {
    let output = cmd::capture(Command::new("sha256sum").arg(file))?;
    output
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

/// How a binary shows it runs: the environment and arguments to give it, and what
/// its output must hold. The CNI plugin answers the runtime's VERSION command.
fn probe(
    binary: &str,
) -> (
    Option<(&'static str, &'static str)>,
    &'static str,
    &'static str,
) {
    match binary {
        "weft-cni" => (Some(("CNI_COMMAND", "VERSION")), "", "supportedVersions"),
        _ => (None, "--version", env!("CARGO_PKG_VERSION")),
    }
}

/// Every binary runs inside the image: in its root filesystem, and in a container
/// when podman is there.
fn check(rootfs: &Path, archive: &Path, image: &Image) -> anyhow::Result<()> {
    for binary in image.binaries {
        let (env, arg, expected) = probe(binary);
        let mut command = Command::new("chroot");
        command.arg(rootfs).arg(format!("/usr/local/bin/{binary}"));
        command.args(Some(arg).filter(|arg| !arg.is_empty()));
        command.envs(env);
        let printed = cmd::capture(&mut command)
            .with_context(|| format!("{binary} does not run in the image's root filesystem"))?;
        if !printed.contains(expected) {
            bail!("{binary} printed {printed:?}, without {expected:?}");
        }
    }
    if which::which("podman").is_err() {
        eprintln!("    podman is not installed: checked in the root filesystem only");
        return Ok(());
    }
    let loaded = cmd::capture(
        Command::new("podman")
            .arg("load")
            .arg("--input")
            .arg(archive),
    )?;
    let name = format!("{}:{}", image.name, env!("CARGO_PKG_VERSION"));
    let user = cmd::capture(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        &name,
    ]))?;
    if user.trim() != image.user {
        bail!(
            "podman reads the user of {name} as {user:?}, not {:?}",
            image.user
        );
    }
    for binary in image.binaries {
        let (env, arg, expected) = probe(binary);
        let mut command = Command::new("podman");
        command.args(["run", "--rm", "--network=none"]);
        if let Some((key, value)) = env {
            command.args(["--env", &format!("{key}={value}")]);
        }
        command.args(["--entrypoint", &format!("/usr/local/bin/{binary}"), &name]);
        command.args(Some(arg).filter(|arg| !arg.is_empty()));
        let output = command.output().context("cannot run podman")?;
        let printed = String::from_utf8_lossy(&output.stdout);
        let error = String::from_utf8_lossy(&output.stderr);
        if error.contains("setrlimit") && error.contains("Operation not permitted") {
            // crun sets every rlimit of the container, which needs CAP_SYS_RESOURCE.
            eprintln!(
                "    podman loaded {name} ({}), but cannot start containers on this host: {}",
                loaded.trim(),
                error.trim()
            );
            return Ok(());
        }
        if !output.status.success() || !printed.contains(expected) {
            bail!("in a container, {binary} printed {printed:?} ({error}), without {expected:?}");
        }
    }
    eprintln!(
        "    ran in a container (podman): {}",
        image.binaries.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_libraries_are_what_ldd_resolves() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            shared_libraries(ldd),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }
}
