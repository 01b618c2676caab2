//! `cargo xtask setup`: installs what building and testing weft needs on a fresh
//! Debian machine, idempotently. Every other task calls [`ensure`] first, so it only
//! does work when something is missing.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd::{capture, run};

/// Debian packages the build and the tests need; `{llvm}` is the nightly's LLVM major.
const PACKAGES: &[&str] = &[
    // bpf-linker links against the same LLVM as the nightly that compiles the programs.
    "llvm-{llvm}-dev",
    "libpolly-{llvm}-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // tonic code generation
    "protobuf-compiler",
    // the local cluster and inspecting the kernel programs
    "iproute2",
    "bpftool",
    // real clients in the end-to-end tests
    "curl",
    "iperf3",
    "wrk",
    "nghttp2-client",
    "socat",
    // a client that sets SO_MARK before connecting, as the agent does
    "python3",
    // looking at the wire between nodes; scraping and checking the agents' metrics
    "tcpdump",
    "prometheus",
    // `cargo xtask bench`: the reference mTLS tunnel proxies, their certificates, the chart
    "stunnel4",
    "haproxy",
    "openssl",
    "python3-matplotlib",
    // `cargo xtask bench`: the agents' instruction counts
    "valgrind",
];

/// The kubernetes-validate release (PyPI) whose schemas check `deploy/install.yaml`.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// bpf-linker release the build is verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-fuzz release the fuzz targets are run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One step that brings a missing prerequisite in.
struct Step {
    what: String,
    commands: Vec<String>,
}

/// Installs whatever is missing; prints nothing and does nothing when all is there.
/// When not root it prints the exact commands to run instead.
pub fn ensure() -> anyhow::Result<()> {
    let steps = missing()?;
    if steps.is_empty() {
        return Ok(());
    }
    if !weft_cluster::is_root() {
        eprintln!("weft needs prerequisites that only root can install. Run as root:");
        for step in &steps {
            eprintln!("  # {}", step.what);
            for command in &step.commands {
                eprintln!("  {command}");
            }
        }
        bail!("missing prerequisites (see the commands above)");
    }
    for step in &steps {
        eprintln!("setup: {}", step.what);
        for command in &step.commands {
            run(Command::new("sh").args(["-c", command]))
                .with_context(|| format!("setup step failed: {}", step.what))?;
        }
    }
    let left = missing()?;
    if let Some(step) = left.first() {
        bail!("setup ran but this is still missing: {}", step.what);
    }
    eprintln!("setup: done");
    Ok(())
}

/// `cargo xtask setup`: like [`ensure`], and says so when there was nothing to do.
pub fn setup() -> anyhow::Result<()> {
    if missing()?.is_empty() {
        eprintln!("setup: every prerequisite is in place");
        return Ok(());
    }
    ensure()
}

fn missing() -> anyhow::Result<Vec<Step>> {
    let llvm = nightly_llvm_major()?;
    let mut steps = Vec::new();

    let packages: Vec<String> = PACKAGES
        .iter()
        .map(|name| name.replace("{llvm}", &llvm.to_string()))
        .filter(|name| !package_installed(name))
        .collect();
    if !packages.is_empty() {
        steps.push(Step {
            what: format!("install Debian packages: {}", packages.join(" ")),
            commands: vec![
                "apt-get update -q".to_owned(),
                format!(
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}",
                    packages.join(" ")
                ),
            ],
        });
    }

    let components = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        steps.push(Step {
            what:
                "add rust-src to the nightly toolchain (the kernel programs build core from source)"
                    .to_owned(),
            commands: vec!["rustup component add rust-src --toolchain nightly".to_owned()],
        });
    }

    let install_linker = format!(
        "LLVM_PREFIX=/usr/lib/llvm-{llvm} cargo install --force --locked bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-{llvm}"
    );
    match bpf_linker_llvm_major() {
        None => steps.push(Step {
            what: format!("build bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm}"),
            commands: vec![install_linker],
        }),
        Some(Err(problem)) => steps.push(Step {
            what: format!("rebuild bpf-linker against LLVM {llvm}: {problem}"),
            commands: vec![install_linker],
        }),
        Some(Ok(linker)) if linker != llvm => steps.push(Step {
            what: format!(
                "rebuild bpf-linker: it uses LLVM {linker} but the nightly compiler emits LLVM {llvm} bitcode, which it cannot link"
            ),
            commands: vec![install_linker],
        }),
        Some(Ok(_)) => {}
    }

    let fuzzer = capture(Command::new("cargo").args(["fuzz", "--version"]));
    if fuzzer.map_or(true, |version| {
        version.split_whitespace().last() != Some(CARGO_FUZZ_VERSION)
    }) {
        steps.push(Step {
            what: format!("install cargo-fuzz {CARGO_FUZZ_VERSION} (runs the fuzz targets)"),
            commands: vec![format!(
                "cargo install --force --locked cargo-fuzz --version {CARGO_FUZZ_VERSION}"
            )],
        });
    }

    let validator =
        capture(Command::new("python3").args(["-m", "kubernetes_validate", "--version"]));
    if validator.map_or(true, |version| {
        version.trim() != KUBERNETES_VALIDATE_VERSION
    }) {
        steps.push(Step {
            what: format!(
                "install kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (checks the rendered manifests against Kubernetes' schemas)"
            ),
            commands: vec![format!(
                "python3 -m pip install --quiet --root-user-action=ignore kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )],
        });
    }

    if !weft_cluster::bpffs_mounted()? {
        steps.push(Step {
            what: "mount bpffs at /sys/fs/bpf (where the agent pins its programs and maps)"
                .to_owned(),
            commands: vec!["mount -t bpf bpf /sys/fs/bpf".to_owned()],
        });
    }
    Ok(steps)
}

/// The LLVM major version of the `nightly` toolchain, which aya-build uses.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let version = capture(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("the `nightly` toolchain is needed to build the kernel programs; install it with `rustup toolchain install nightly --component rust-src`")?;
    parse_llvm_major(&version).context("`rustc +nightly -vV` printed no LLVM version")
}

fn parse_llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The LLVM major bpf-linker is linked against: `None` when it is not installed.
fn bpf_linker_llvm_major() -> Option<anyhow::Result<u32>> {
    let linker = which::which("bpf-linker").ok()?;
    let libraries = capture(Command::new("ldd").arg(&linker));
    Some(libraries.and_then(|libraries| {
        parse_libllvm_major(&libraries).with_context(|| {
            format!(
                "{} is not dynamically linked against a libLLVM",
                linker.display()
            )
        })
    }))
}

/// Finds `libLLVM.so.22.1` (or the older `libLLVM-14.so`) in `ldd` output.
fn parse_libllvm_major(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|line| {
        let name = line.split_whitespace().next()?;
        let version = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-")?.strip_suffix(".so"))?;
        version.split('.').next()?.parse().ok()
    })
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_from_rustc() {
        let out = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(out), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.95.0\n"), None);
    }

    #[test]
    fn reads_llvm_major_from_ldd() {
        let new = "\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x7f)\n";
        let old = "\tlibLLVM-14.so => /usr/lib/llvm-14/lib/libLLVM-14.so (0x7f)\n";
        assert_eq!(parse_libllvm_major(new), Some(22));
        assert_eq!(parse_libllvm_major(old), Some(14));
        assert_eq!(parse_libllvm_major("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }
}
