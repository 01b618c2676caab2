//! The kernel side of the agent: loads weft's programs, pins them and their maps under
//! the node's bpffs directory, attaches them, and keeps their maps in step with the
//! mesh.
//!
//! Pins (under `--bpffs`): `maps/WEFT_*` for every map but the log buffer, and
//! `links/` for every attachment — `connect4`, `connect6`, `sock_ops` on the pods'
//! cgroup, `inbound-<ifindex>` on each meshed pod's host-side veth. Because links are
//! pinned, capture and enforcement keep working while no agent runs. A starting agent
//! loads its own programs, attaches them, then drops the old links, so there is no
//! moment without capture; maps are reused from their pins, so state such as original
//! destinations of connections in flight survives the restart.
//!
//! Unsafe code in the agent is confined to this module, [`netns`] and `memory` (one
//! call to the C allocator).

pub mod flows;
pub mod netns;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, SockOps, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use aya_log::EbpfLogger;
use log::Log;
use tokio::io::{Interest, unix::AsyncFd};
use weft_common::{
    Config, Counter, InboundPod, InboundPort, MeshDestination, MeshedPod, Mode, SockAddr, names,
};

/// The kernel object built by `build.rs`, aligned as aya requires.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-ebpf"));

/// Why loading, attaching or updating the kernel programs failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "the kernel refused weft's programs or maps ({0}); check that the agent runs as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), that the kernel has BPF and BTF, and that pins left by an incompatible agent version are removed (`weft-agent uninstall`)"
    )]
    Load(#[source] EbpfError),
    #[error("program {0} is missing from the kernel object; the agent build is inconsistent")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the kernel object; the agent build is inconsistent")]
    MissingMap(&'static str),
    #[error("the verifier rejected program {program}: {source}")]
    Verifier {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot pin or unpin {path}: {source}; is bpffs mounted there?")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: {problem}; is the pinned map from another weft version?")]
    MapLayout { map: &'static str, problem: String },
    #[error("map {map}: {call} failed: {source}")]
    MapCall {
        map: &'static str,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no interface {0} in the agent's network namespace; is the pod's veth gone?")]
    NoInterface(String),
    #[error("cannot start forwarding kernel log records: {0}")]
    Log(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// Where capture sends connections: the agent's address as pods reach it.
#[derive(Clone, Copy, Debug)]
pub struct CaptureTarget {
    pub ipv4: std::net::Ipv4Addr,
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub outbound_port: u16,
}

/// What the inbound program enforces for one pod.
#[derive(Clone, Copy, Debug)]
pub struct Inbound {
    pub mode: Mode,
    /// The node's address towards the pod: its connections (health probes) get in.
    pub probe_source: Option<IpAddr>,
    /// The agent listens for HBONE inside the pod: connections to that port get in.
    pub hbone_in_pod: bool,
}

/// weft's kernel programs, loaded and attached, and their maps.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    meshed_netns: HashMap<MapData, u64, MeshedPod>,
    destinations: HashMap<MapData, SockAddr, MeshDestination>,
    /// What `destinations` holds, as this process last wrote it, so that a change
    /// writes only the difference: with 100,000 workloads, rewriting the whole map took
    /// 200,000 system calls for each version and each pod enrolled. `None` until the
    /// first write, and after a failed one: then the map is read back (a restarted
    /// agent finds it full) and the difference taken from what it holds.
    destinations_written: Option<std::collections::HashMap<SockAddr, MeshDestination>>,
    excluded_ports: HashMap<MapData, u16, u8>,
    inbound: HashMap<MapData, u32, InboundPod>,
    port_modes: HashMap<MapData, InboundPort, u8>,
}

/// The layout of a node's bpffs directory.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }

    fn inbound_link(&self, ifindex: u32) -> PathBuf {
        self.link(&format!("inbound-{ifindex}"))
    }

    /// Removes every pin: with no agent running, that detaches and unloads everything
    /// weft put in the kernel for this node.
    pub fn remove_all(&self) -> Result<(), DatapathError> {
        for dir in [self.links(), self.maps()] {
            match fs::remove_dir_all(&dir) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(DatapathError::Pin {
                        path: dir,
                        source: err,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Datapath {
    /// Loads the programs (reusing pinned maps), attaches capture to the pods' cgroup
    /// and writes the capture target. Links from an earlier agent are replaced only
    /// once the new ones are attached.
    pub fn start(
        pins: Pins,
        pod_cgroup: &Path,
        target: CaptureTarget,
    ) -> Result<Self, DatapathError> {
        for dir in [pins.maps(), pins.links()] {
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .load(OBJECT)
            .map_err(DatapathError::Load)?;

        let cgroup = File::open(pod_cgroup).map_err(io_error(pod_cgroup))?;
        let cgroup_target = pod_cgroup.display().to_string();
        for name in [names::CONNECT4, names::CONNECT6] {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            program.load().map_err(verifier(name))?;
            let id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(attach(name, &cgroup_target))?;
            let link = program
                .take_link(id)
                .map_err(attach(name, &cgroup_target))?;
            replace_pin(
                FdLink::try_from(link).map_err(link_error(name))?,
                &pins.link(name),
            )?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, names::SOCK_OPS)?;
        sock_ops.load().map_err(verifier(names::SOCK_OPS))?;
        let id = sock_ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(attach(names::SOCK_OPS, &cgroup_target))?;
        let link = sock_ops
            .take_link(id)
            .map_err(attach(names::SOCK_OPS, &cgroup_target))?;
        replace_pin(
            FdLink::try_from(link).map_err(link_error(names::SOCK_OPS))?,
            &pins.link(names::SOCK_OPS),
        )?;
        let inbound: &mut SchedClassifier = program(&mut ebpf, names::INBOUND)?;
        inbound.load().map_err(verifier(names::INBOUND))?;

        let mut config: Array<_, Config> = take_map(&mut ebpf, names::CONFIG)?;
        let agent_v6 = target
            .ipv6
            .map_or([0; 4], |ip| sock_addr(IpAddr::V6(ip), 0).ip);
        let entry = Config {
            agent_v4: sock_addr(IpAddr::V4(target.ipv4), 0).ip,
            agent_v6,
            outbound_port: target.outbound_port,
            _pad: 0,
            enabled: 1,
        };
        config.set(0, entry, 0).map_err(map_error(names::CONFIG))?;

        Ok(Self {
            meshed_netns: take_map(&mut ebpf, names::MESHED_NETNS)?,
            destinations: take_map(&mut ebpf, names::MESH_DESTINATIONS)?,
            destinations_written: None,
            excluded_ports: take_map(&mut ebpf, names::EXCLUDED_PORTS)?,
            inbound: take_map(&mut ebpf, names::INBOUND_PODS)?,
            port_modes: take_map(&mut ebpf, names::INBOUND_PORT_MODES)?,
            ebpf,
            pins,
        })
    }

    /// Enrolls a pod: captures connections from its network namespace and enforces
    /// `inbound` on its host-side interface `host_interface`, attaching this agent's
    /// inbound program (replacing an earlier agent's). Returns the interface's index.
    pub fn enroll(
        &mut self,
        netns_cookie: u64,
        host_interface: &str,
        inbound: Inbound,
    ) -> Result<u32, DatapathError> {
        let ifindex = netns::ifindex(host_interface)?;
        self.set_inbound(ifindex, inbound)?;
        let program: &mut SchedClassifier = program(&mut self.ebpf, names::INBOUND)?;
        let id = program
            .attach(host_interface, TcAttachType::Egress)
            .map_err(attach(names::INBOUND, host_interface))?;
        let link = program
            .take_link(id)
            .map_err(attach(names::INBOUND, host_interface))?;
        replace_pin(
            FdLink::try_from(link).map_err(link_error(names::INBOUND))?,
            &self.pins.inbound_link(ifindex),
        )?;
        self.meshed_netns
            .insert(netns_cookie, MeshedPod { ifindex, _pad: 0 }, 0)
            .map_err(map_error(names::MESHED_NETNS))?;
        Ok(ifindex)
    }

    /// Sets the inbound policy of the enrolled pod behind interface `ifindex`.
    pub fn set_inbound(&mut self, ifindex: u32, inbound: Inbound) -> Result<(), DatapathError> {
        let inbound = InboundPod {
            mode: inbound.mode as u8,
            hbone_in_pod: u8::from(inbound.hbone_in_pod),
            _pad: [0; 2],
            probe_source: inbound
                .probe_source
                .map_or([0; 4], |ip| sock_addr(ip, 0).ip),
        };
        self.inbound
            .insert(ifindex, inbound, 0)
            .map_err(map_error(names::INBOUND_PODS))
    }

    /// Makes the ports of the pod behind interface `ifindex` whose inbound mode differs
    /// from the pod's exactly `modes`; other pods' ports are untouched. A port's mode
    /// replaces the pod's either way (a DISABLE pod may have a STRICT port).
    ///
    /// [`Self::enroll`] leaves a pod's port modes alone, so an agent re-enrolling its
    /// pods after a restart keeps enforcing the previous agent's until it sets its own.
    pub fn set_port_modes(
        &mut self,
        ifindex: u32,
        modes: &BTreeMap<u16, Mode>,
    ) -> Result<(), DatapathError> {
        let wanted = modes
            .iter()
            .map(|(&port, &mode)| (InboundPort::new(ifindex, port), mode as u8))
            .collect();
        replace_entries(
            &mut self.port_modes,
            names::INBOUND_PORT_MODES,
            |key| key.ifindex == ifindex,
            &wanted,
        )
    }

    /// Undoes [`Self::enroll`] and [`Self::set_port_modes`]; parts already gone (a
    /// deleted veth) are fine. The port modes go too, so that a later pod whose veth
    /// gets the same ifindex does not inherit them.
    pub fn unenroll(&mut self, netns_cookie: u64, ifindex: u32) -> Result<(), DatapathError> {
        remove(&mut self.meshed_netns, &netns_cookie, names::MESHED_NETNS)?;
        self.set_port_modes(ifindex, &BTreeMap::new())?;
        remove(&mut self.inbound, &ifindex, names::INBOUND_PODS)?;
        let pin = self.pins.inbound_link(ifindex);
        match fs::remove_file(&pin) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(DatapathError::Pin {
                path: pin,
                source: err,
            }),
            _ => Ok(()),
        }
    }

    /// Makes the mesh destinations exactly `wanted`, writing what changed since the
    /// last call.
    pub fn set_destinations(
        &mut self,
        wanted: std::collections::HashMap<SockAddr, MeshDestination>,
    ) -> Result<(), DatapathError> {
        const NAME: &str = names::MESH_DESTINATIONS;
        let before = self
            .destinations_written
            .take()
            .unwrap_or_else(|| self.destinations.iter().filter_map(Result::ok).collect());
        let (stale, changed) = difference(&before, &wanted);
        let written = stale
            .iter()
            .try_for_each(|key| remove(&mut self.destinations, key, NAME))
            .and_then(|()| {
                changed.into_iter().try_for_each(|(key, value)| {
                    (self.destinations.insert(key, value, 0)).map_err(map_error(NAME))
                })
            });
        self.destinations_written = written.is_ok().then_some(wanted);
        written
    }

    /// Makes the excluded destination ports exactly `wanted`.
    pub fn set_excluded_ports(&mut self, wanted: &[u16]) -> Result<(), DatapathError> {
        let wanted = wanted.iter().map(|port| (*port, 1)).collect();
        replace_entries(
            &mut self.excluded_ports,
            names::EXCLUDED_PORTS,
            |_| true,
            &wanted,
        )
    }

    /// Forwards the kernel programs' aya-log records to `logger` from a task on the
    /// current tokio runtime, for as long as the runtime lives.
    pub fn forward_logs<L: Log + Send + 'static>(
        &mut self,
        logger: L,
    ) -> Result<(), DatapathError> {
        let records = EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|err| DatapathError::Log(err.to_string()))?;
        // SAFETY: `records` owns the ring buffer's file descriptor and the AsyncFd owns
        // `records`, so the descriptor stays open and unchanged while it is registered.
        let mut records = unsafe { AsyncFd::register_with_interest(records, Interest::READABLE) }
            .map_err(|err| DatapathError::Log(err.to_string()))?;
        tokio::spawn(async move {
            while let Ok(mut ready) = records.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
        Ok(())
    }
}

/// The converted form of an address for the maps (IPv4 as IPv4-mapped IPv6).
pub fn sock_addr(ip: IpAddr, port: u16) -> SockAddr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let octets = v6.octets();
    let word =
        |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    SockAddr::v6([word(0), word(4), word(8), word(12)], port)
}

/// The address in a map entry, IPv4 when it is IPv4-mapped.
pub fn socket_addr(addr: &SockAddr) -> std::net::SocketAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.ip) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(octets);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    std::net::SocketAddr::new(ip, addr.port)
}

/// Read-only views of a running node's pinned maps, for tools and tests that run
/// beside the agent (the admin side and the proxy use the same records).
pub mod pinned {
    use super::*;

    /// The original destinations the capture programs recorded, by client address.
    /// The proxy opens its own handle so that it never waits for the enrollment side,
    /// and every data-plane thread uses it at once: a record is read and removed in one
    /// system call, with no lock.
    #[derive(Debug)]
    pub struct OriginalDestinations {
        map: MapData,
    }

    impl OriginalDestinations {
        pub fn open(pins: &Pins) -> Result<Self, DatapathError> {
            let map = MapData::from_pin(pins.map(names::ORIGINAL_DST))
                .map_err(map_error(names::ORIGINAL_DST))?;
            let info = map.info().map_err(map_error(names::ORIGINAL_DST))?;
            let size = size_of::<SockAddr>() as u32;
            if (info.key_size(), info.value_size()) != (size, size) {
                return Err(DatapathError::MapLayout {
                    map: names::ORIGINAL_DST,
                    problem: format!(
                        "keys of {} and values of {} bytes, where this agent writes {size} and {size}",
                        info.key_size(),
                        info.value_size()
                    ),
                });
            }
            Ok(Self { map })
        }

        /// The original destination of the connection from `client`; the record is
        /// consumed.
        pub fn take(
            &self,
            client: std::net::SocketAddr,
        ) -> Result<Option<std::net::SocketAddr>, DatapathError> {
            let key = sock_addr(client.ip(), client.port());
            lookup_and_delete(self.map.fd().as_fd(), &key)
                .map(|found| found.as_ref().map(socket_addr))
                .map_err(|source| DatapathError::MapCall {
                    map: names::ORIGINAL_DST,
                    call: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
                    source,
                })
        }
    }

    use std::os::fd::AsFd as _;

    /// `bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM)` on a hash map whose keys and values are
    /// both `SockAddr` (hash maps support it since Linux 5.14): the value, removed,
    /// or `None`. aya offers it for queues and stacks only.
    fn lookup_and_delete(
        map: std::os::fd::BorrowedFd<'_>,
        key: &SockAddr,
    ) -> io::Result<Option<SockAddr>> {
        use std::os::fd::AsRawFd as _;

        /// The part of `union bpf_attr` the `BPF_MAP_*_ELEM` commands read.
        #[repr(C)]
        struct ElemAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
        let mut value = SockAddr::default();
        let attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            flags: 0,
        };
        // SAFETY: `attr` is laid out as the kernel's attribute for map element
        // commands and lives through the call; `key` and `value` point to live
        // `SockAddr`s, the sizes `open` checked the map's keys and values have.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                std::ptr::from_ref(&attr),
                size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        if result == 0 {
            return Ok(Some(value));
        }
        match io::Error::last_os_error() {
            err if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            err => Err(err),
        }
    }

    /// Every counter of the node, summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(pins: &Pins) -> Result<Vec<(Counter, u64)>, DatapathError> {
        let path = pins.map(names::COUNTERS);
        let data = MapData::from_pin(&path).map_err(map_error(names::COUNTERS))?;
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(map_error(names::COUNTERS))?;
        Counter::ALL
            .iter()
            .map(|&counter| {
                let values = map
                    .get(&(counter as u32), 0)
                    .map_err(map_error(names::COUNTERS))?;
                Ok((counter, values.iter().sum()))
            })
            .collect()
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|_| DatapathError::MissingProgram(name))
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DatapathError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    M::try_from(map).map_err(map_error(name))
}

fn remove<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(err) => Err(map_error(name)(err)),
    }
}

/// Makes the part of `map` whose keys are `in_scope` hold exactly the `wanted` entries
/// (all of which must be in scope): stale keys go, the rest are written. Keys out of
/// scope are left alone.
fn replace_entries<K, V>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    in_scope: impl Fn(&K) -> bool,
    wanted: &std::collections::HashMap<K, V>,
) -> Result<(), DatapathError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| in_scope(key) && !wanted.contains_key(key))
        .collect();
    for key in stale {
        remove(map, &key, name)?;
    }
    for (key, value) in wanted {
        map.insert(key, value, 0).map_err(map_error(name))?;
    }
    Ok(())
}

/// What turns a map holding `written` into one holding `wanted`: the keys to remove
/// and the entries to write (new or changed).
fn difference<K, V>(
    written: &std::collections::HashMap<K, V>,
    wanted: &std::collections::HashMap<K, V>,
) -> (Vec<K>, Vec<(K, V)>)
where
    K: Copy + Eq + std::hash::Hash,
    V: Copy + PartialEq,
{
    let stale = (written.keys())
        .filter(|key| !wanted.contains_key(key))
        .copied()
        .collect();
    let changed = (wanted.iter())
        .filter(|(key, value)| written.get(key) != Some(value))
        .map(|(key, value)| (*key, *value))
        .collect();
    (stale, changed)
}

fn verifier(program: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Verifier { program, source }
}

fn attach<'a>(
    program: &'static str,
    target: &'a str,
) -> impl FnOnce(ProgramError) -> DatapathError + 'a {
    move |source| DatapathError::Attach {
        program,
        target: target.to_owned(),
        source,
    }
}

fn link_error(program: &'static str) -> impl FnOnce(LinkError) -> DatapathError {
    move |err| DatapathError::Attach {
        program,
        target: "a pinnable link".to_owned(),
        source: ProgramError::IOError(io::Error::other(err.to_string())),
    }
}

/// Pins `link` at `path`, replacing (and so detaching) whatever link was pinned there.
fn replace_pin(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    let pin_error = |source| DatapathError::Pin {
        path: path.to_owned(),
        source,
    };
    match PinnedLink::from_pin(path) {
        Ok(old) => {
            old.unpin().map_err(pin_error)?;
        }
        Err(LinkError::SyscallError(err)) if err.io_error.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(pin_error(io::Error::other(err.to_string()))),
    }
    link.pin(path)
        .map_err(|err| pin_error(io::Error::other(err.to_string())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_difference_is_written() {
        let map = |entries: &[(u16, u8)]| -> std::collections::HashMap<u16, u8> {
            entries.iter().copied().collect()
        };
        type Entries = &'static [(u16, u8)];
        let cases: [(Entries, Entries, &[u16], Entries); 5] = [
            (&[], &[(1, 1)], &[], &[(1, 1)]),
            (&[(1, 1), (2, 1)], &[(1, 1), (2, 1)], &[], &[]),
            (&[(1, 1), (2, 1)], &[(1, 1)], &[2], &[]),
            (
                &[(1, 1), (2, 1)],
                &[(1, 2), (3, 1)],
                &[2],
                &[(1, 2), (3, 1)],
            ),
            (&[(1, 1)], &[], &[1], &[]),
        ];
        for (written, wanted, stale, changed) in cases {
            let (mut removed, mut written_now) = difference(&map(written), &map(wanted));
            removed.sort();
            written_now.sort();
            assert_eq!(
                (removed.as_slice(), written_now.as_slice()),
                (stale, changed)
            );
        }
    }

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        for text in ["10.244.1.2:8080", "[fd00::1]:443", "[::1]:1"] {
            let addr: std::net::SocketAddr = text.parse().unwrap();
            let entry = sock_addr(addr.ip(), addr.port());
            assert_eq!(socket_addr(&entry), addr);
        }
        let v4 = sock_addr("10.244.1.2".parse().unwrap(), 80);
        assert!(v4.is_v4());
        assert_eq!(v4, SockAddr::v4(u32::from_ne_bytes([10, 244, 1, 2]), 80));
        assert!(sock_addr("127.0.0.1".parse().unwrap(), 0).is_loopback());
        assert!(sock_addr("::1".parse().unwrap(), 0).is_loopback());
        assert!(!sock_addr("10.0.0.1".parse().unwrap(), 0).is_loopback());
    }
}
