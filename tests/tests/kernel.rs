//! The kernel programs load, pass the verifier and count what they should: the
//! `cgroup/connect4` hook sees connects from processes inside its cgroup and only those,
//! and its aya-log records reach user space.

use std::{
    fs,
    net::TcpListener,
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use weft_agent::loader::Datapath;
use weft_common::Counter;
use weft_e2e::{require_root, unique_name};

/// A fresh cgroup v2 directory, removed (after killing what is left in it) on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> Self {
        let root = weft_cluster::cgroup2_mount().unwrap_or_else(|err| panic!("{err}"));
        let path = root.join(format!("weft-test-{}", unique_name('k')));
        fs::create_dir(&path).unwrap();
        Self(path)
    }

    /// Runs a bash snippet as a process that first moves itself into this cgroup.
    fn run_inside(&self, snippet: &str) -> std::process::ExitStatus {
        let script = format!("echo $$ > {}/cgroup.procs && {snippet}", self.0.display());
        Command::new("bash").args(["-c", &script]).status().unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<String>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

fn connect_from_bash(cgroup: &TestCgroup, port: u16) {
    let status = cgroup.run_inside(&format!("exec 3<>/dev/tcp/127.0.0.1/{port}"));
    assert!(
        status.success(),
        "bash could not connect to 127.0.0.1:{port}"
    );
}

#[test]
fn connect4_counts_connects_inside_its_cgroup_only() {
    require_root();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let cgroup = TestCgroup::new();
    let mut datapath = Datapath::load().unwrap_or_else(|err| panic!("{err}"));
    let records = Collect::default();
    datapath.forward_logs(records.clone()).unwrap();
    datapath.attach_connect4(&cgroup.0).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = || datapath.counter(Counter::Connect4Seen).unwrap();
    assert_eq!(seen(), 0);

    // A process outside the cgroup: not seen.
    let outside = Command::new("bash")
        .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")])
        .status()
        .unwrap();
    assert!(outside.success());
    assert_eq!(seen(), 0, "a connect from outside the cgroup was counted");

    // Inside: every connect is seen, once.
    connect_from_bash(&cgroup, port);
    assert_eq!(seen(), 1);
    connect_from_bash(&cgroup, port);
    assert_eq!(seen(), 2);

    // The kernel's log record arrives through aya-log.
    let expected = format!("connect4 to 127.0.0.1:{port}");
    let arrived = runtime.block_on(async {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if records
                .0
                .lock()
                .unwrap()
                .iter()
                .any(|line| line.contains(&expected))
            {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(
        arrived,
        "no aya-log record {expected:?}; got {:?}",
        records.0.lock().unwrap()
    );
}
