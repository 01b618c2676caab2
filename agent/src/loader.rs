//! Loads weft's kernel programs into the kernel and attaches them.
//!
//! The object is built by `build.rs` and embedded in the agent binary, so an agent
//! never runs against kernel programs of another version. Unsafe code in the agent is
//! confined to this module.

use std::{fs::File, io, path::Path};

use aya::{
    Ebpf, EbpfError,
    maps::{MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError},
};
use aya_log::EbpfLogger;
use log::Log;
use tokio::io::{Interest, unix::AsyncFd};
use weft_common::{Counter, names};

/// The kernel object built by `build.rs`, aligned as aya requires.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-ebpf"));

/// Why loading or attaching the kernel programs failed.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "the kernel refused weft's programs ({0}); check that the agent runs as root (or with CAP_BPF and CAP_NET_ADMIN) and that the kernel has BPF and BTF enabled"
    )]
    Load(#[source] EbpfError),
    #[error("program {0} is missing from the kernel object; the agent build is inconsistent")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the kernel object; the agent build is inconsistent")]
    MissingMap(&'static str),
    #[error(
        "the verifier rejected program {program}: {source}; run with RUST_LOG=debug for the verifier log"
    )]
    Verifier {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "cannot open cgroup {path}: {source}; it must be a directory of the cgroup v2 hierarchy"
    )]
    OpenCgroup {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach program {program} to cgroup {path}: {source}")]
    Attach {
        program: &'static str,
        path: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot read map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot start forwarding kernel log records: {0}")]
    Log(String),
}

/// weft's kernel programs, loaded and owned by this process.
///
/// Dropping it detaches whatever it attached (pinning arrives with the datapath issue).
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the embedded kernel object and verifies its programs.
    pub fn load() -> Result<Self, LoaderError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(LoaderError::Load)?;
        let connect4 = connect4(&mut ebpf)?;
        connect4.load().map_err(|source| LoaderError::Verifier {
            program: names::CONNECT4,
            source,
        })?;
        Ok(Self { ebpf })
    }

    /// Attaches the `cgroup/connect4` hook to the cgroup v2 directory `cgroup`; it then
    /// sees every IPv4 `connect()` made by a process anywhere in that subtree.
    pub fn attach_connect4(&mut self, cgroup: &Path) -> Result<(), LoaderError> {
        let path = cgroup.display().to_string();
        let file = File::open(cgroup).map_err(|source| LoaderError::OpenCgroup {
            path: path.clone(),
            source,
        })?;
        // Attached as a bpf_link, which coexists with other programs on the cgroup
        // whatever the mode; the kernel rejects the legacy multi-attach flags on links.
        connect4(&mut self.ebpf)?
            .attach(file, CgroupAttachMode::Single)
            .map_err(|source| LoaderError::Attach {
                program: names::CONNECT4,
                path,
                source,
            })?;
        Ok(())
    }

    /// The current value of `counter`, summed over all CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64, LoaderError> {
        let map_error = |source| LoaderError::Map {
            map: names::COUNTERS,
            source,
        };
        let map = self
            .ebpf
            .map(names::COUNTERS)
            .ok_or(LoaderError::MissingMap(names::COUNTERS))?;
        let counters = PerCpuArray::<_, u64>::try_from(map).map_err(map_error)?;
        let per_cpu = counters.get(&(counter as u32), 0).map_err(map_error)?;
        Ok(per_cpu.iter().sum())
    }

    /// Forwards the kernel programs' aya-log records to `logger` from a task on the
    /// current tokio runtime, for as long as the runtime lives.
    pub fn forward_logs<L: Log + Send + 'static>(&mut self, logger: L) -> Result<(), LoaderError> {
        let records = EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|err| LoaderError::Log(err.to_string()))?;
        // SAFETY: `records` owns the ring buffer's file descriptor and the AsyncFd owns
        // `records`, so the descriptor stays open and unchanged while it is registered.
        let mut records = unsafe { AsyncFd::register_with_interest(records, Interest::READABLE) }
            .map_err(|err| LoaderError::Log(err.to_string()))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut ready) = records.readable_mut().await else {
                    return;
                };
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
        Ok(())
    }
}

fn connect4(ebpf: &mut Ebpf) -> Result<&mut CgroupSockAddr, LoaderError> {
    ebpf.program_mut(names::CONNECT4)
        .ok_or(LoaderError::MissingProgram(names::CONNECT4))?
        .try_into()
        .map_err(|_| LoaderError::MissingProgram(names::CONNECT4))
}
