//! The few host operations the cluster is built from: iproute2 commands, cgroup v2
//! files and bpffs. Commands are run, not linked, so every step is one an operator can
//! replay by hand.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{ClusterError, layout::BPFFS_ROOT};

/// Runs `program args…`, returning its stdout; a non-zero exit is an error carrying
/// the command line and its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, ClusterError> {
    let command = format!("{program} {}", args.join(" "));
    log::debug!("+ {command}");
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| ClusterError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(ClusterError::Command {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip args…`.
pub(crate) fn ip(args: &[&str]) -> Result<(), ClusterError> {
    run("ip", args).map(drop)
}

/// Runs `ip -n netns args…` inside network namespace `netns`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<(), ClusterError> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    ip(&full)
}

/// Creates veth `name` in namespace `netns` with its peer, `eth0`, in `peer_netns`.
pub(crate) fn add_veth(netns: &str, name: &str, peer_netns: &str) -> Result<(), ClusterError> {
    ip_in(
        netns,
        &[
            "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", peer_netns,
        ],
    )
}

/// Sets a sysctl of network namespace `netns`.
pub(crate) fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<(), ClusterError> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ],
    )
    .map(drop)
}

/// Where `ip netns` registers named network namespaces.
const NETNS_DIR: &str = "/run/netns";

pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Whether interface `name` exists in network namespace `netns`.
pub(crate) fn link_exists(netns: &str, name: &str) -> bool {
    run("ip", &["-n", netns, "link", "show", "dev", name]).is_ok()
}

/// Names of all network namespaces registered with `ip netns` that start with `prefix`.
pub(crate) fn netns_with_prefix(prefix: &str) -> Result<Vec<String>, ClusterError> {
    let dir = Path::new(NETNS_DIR);
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(ClusterError::io(dir)(err)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.map_err(ClusterError::io(dir))?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) {
            names.push(name.into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Kills every process inside network namespace `netns` (those that entered it
/// without joining one of the cluster's cgroups) and deletes the namespace.
pub(crate) fn delete_netns(netns: &str) -> Result<(), ClusterError> {
    let pids = run("ip", &["netns", "pids", netns])?;
    let pids: Vec<&str> = pids.split_whitespace().collect();
    if !pids.is_empty() {
        let mut args = vec!["-KILL"];
        args.extend(pids);
        // A process may exit by itself meanwhile; that is what we want anyway.
        let _ = run("kill", &args);
    }
    ip(&["netns", "delete", netns])
}

/// Whether process `pid` exists and has not exited (a zombie waiting for its parent
/// to reap it counts as exited).
pub fn process_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        state.is_some_and(|state| state != 'Z')
    })
}

/// A running process named `name` (its `comm`) in cgroup `cgroup` (not below it).
pub(crate) fn process_named(cgroup: &Path, name: &str) -> Option<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .ok()?
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .find(|&pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
                && process_running(pid)
        })
}

/// Sends SIGTERM to `pid`, then SIGKILL if it still runs after `grace`, and waits
/// until it is gone.
pub(crate) fn stop_process(pid: u32, grace: Duration) -> Result<(), ClusterError> {
    let pid_text = pid.to_string();
    if !process_running(pid) {
        return Ok(());
    }
    let _ = run("kill", &["-TERM", &pid_text]);
    // `None`: a grace too long to end.
    let mut deadline = Instant::now().checked_add(grace);
    while process_running(pid) {
        if deadline.is_some_and(|deadline| Instant::now() > deadline) {
            log::warn!("process {pid} still ran {grace:?} after SIGTERM; killing it");
            let _ = run("kill", &["-KILL", &pid_text]);
            deadline = None;
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, ClusterError> {
    mounts()?
        .into_iter()
        .find_map(|(dir, kind)| (kind == "cgroup2").then(|| PathBuf::from(dir)))
        .ok_or(ClusterError::NoCgroup2)
}

/// Whether a bpffs is mounted at /sys/fs/bpf.
pub fn bpffs_mounted() -> Result<bool, ClusterError> {
    Ok(mounts()?
        .iter()
        .any(|(dir, kind)| dir == BPFFS_ROOT && kind == "bpf"))
}

/// Mounts bpffs at /sys/fs/bpf unless a bpffs is mounted there already.
pub(crate) fn ensure_bpffs() -> Result<(), ClusterError> {
    if !bpffs_mounted()? {
        run("mount", &["-t", "bpf", "bpf", BPFFS_ROOT])?;
    }
    Ok(())
}

/// (mount point, filesystem type) of every mount this process sees.
fn mounts() -> Result<Vec<(String, String)>, ClusterError> {
    const MOUNTS: &str = "/proc/self/mounts";
    let text = fs::read_to_string(MOUNTS).map_err(ClusterError::io(MOUNTS))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect())
}

/// `bytes` random bytes from the kernel, as hex.
pub(crate) fn random_hex(bytes: usize) -> Result<String, ClusterError> {
    use std::io::Read as _;
    const SOURCE: &str = "/dev/urandom";
    let mut buffer = vec![0; bytes];
    fs::File::open(SOURCE)
        .and_then(|mut file| file.read_exact(&mut buffer))
        .map_err(ClusterError::io(SOURCE))?;
    Ok(buffer.iter().map(|byte| format!("{byte:02x}")).collect())
}

pub(crate) fn create_dir(path: &Path) -> Result<(), ClusterError> {
    fs::create_dir_all(path).map_err(ClusterError::io(path))
}

/// Kills every process in the cgroup subtree at `path` and waits until it is empty,
/// repeating the kill in case a process was between fork and exec.
pub(crate) fn kill_cgroup(path: &Path) -> Result<(), ClusterError> {
    const GRACE: Duration = Duration::from_secs(10);
    let kill = path.join("cgroup.kill");
    let events = path.join("cgroup.events");
    let deadline = Instant::now() + GRACE;
    let mut next_kill = Instant::now();
    loop {
        if Instant::now() >= next_kill {
            match fs::write(&kill, "1") {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
                Err(err) => return Err(ClusterError::io(kill)(err)),
            }
            next_kill = Instant::now() + Duration::from_millis(500);
        }
        let populated = fs::read_to_string(&events)
            .map(|text| text.lines().any(|line| line == "populated 1"))
            .unwrap_or(false);
        if !populated {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ClusterError::Stuck {
                cgroup: path.to_owned(),
                processes: describe_processes(path),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `pid (name) state` of every process left in the cgroup subtree at `path`.
fn describe_processes(path: &Path) -> String {
    let mut found = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let pids = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            let summary: String = stat
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ");
            found.push(format!("{summary} wchan={wchan}"));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    found.join("; ")
}

/// Removes the (already empty) cgroup subtree at `path`, leaves first.
pub(crate) fn remove_cgroup_tree(path: &Path) -> Result<(), ClusterError> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(ClusterError::io(path)(err)),
    };
    for entry in entries {
        let entry = entry.map_err(ClusterError::io(path))?;
        if entry
            .file_type()
            .map_err(ClusterError::io(entry.path()))?
            .is_dir()
        {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // A cgroup whose last process was just killed can still count it for a moment
    // (the kernel unlinks exiting tasks after `populated` drops): retry EBUSY briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Err(err) if err.kind() == ErrorKind::ResourceBusy && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            result => return result.map_err(ClusterError::io(path)),
        }
    }
}

/// Removes a directory tree, treating "already gone" as success. Works on bpffs, where
/// pins are files that `unlink` removes.
pub(crate) fn remove_tree(path: &Path) -> Result<(), ClusterError> {
    match fs::remove_dir_all(path) {
        Err(err) if err.kind() != ErrorKind::NotFound => Err(ClusterError::io(path)(err)),
        _ => Ok(()),
    }
}
