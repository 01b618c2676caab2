//! Plain-old-data types shared by weft's kernel programs (`weft-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy` and explicitly padded so that the kernel and
//! user space agree on every byte. Addresses are always 16 bytes, IPv4 as IPv4-mapped
//! IPv6 (`::ffff:a.b.c.d`), in network byte order, exactly as the kernel's `user_ip6`
//! and `local_ip6` context fields hold them; ports are in host byte order. The `user`
//! feature implements `aya::Pod` for the map types so the agent can read and write them.
#![no_std]

/// Names of the maps and programs in the kernel object, shared so that a rename on one
/// side is a compile error on the other.
pub mod names {
    pub const COUNTERS: &str = "WEFT_COUNTERS";
    pub const CONFIG: &str = "WEFT_CONFIG";
    pub const MESHED_NETNS: &str = "WEFT_MESHED_NETNS";
    pub const MESH_DESTINATIONS: &str = "WEFT_MESH_DESTINATIONS";
    pub const EXCLUDED_PORTS: &str = "WEFT_EXCLUDED_PORTS";
    pub const ORIGINAL_DST_BY_COOKIE: &str = "WEFT_ORIG_DST_BY_COOKIE";
    pub const ORIGINAL_DST: &str = "WEFT_ORIG_DST";
    pub const INBOUND_PODS: &str = "WEFT_INBOUND_PODS";
    pub const INBOUND_PORT_MODES: &str = "WEFT_INBOUND_PORT_MODES";
    pub const FLOWS: &str = "WEFT_FLOWS";
    pub const CONNECT4: &str = "weft_connect4";
    pub const CONNECT6: &str = "weft_connect6";
    pub const SOCK_OPS: &str = "weft_sock_ops";
    pub const INBOUND: &str = "weft_inbound";
}

/// `SO_MARK` on every socket the agent opens towards a pod. The inbound program lets
/// connections carrying it into STRICT pods. (The value ztunnel uses for the same.)
pub const AGENT_MARK: u32 = 1337;

/// The HBONE port: the agent's on the node's address, and on a meshed pod's own
/// address where Istio's HBONE peers dial it.
pub const HBONE_PORT: u16 = 15008;

/// A socket address: 16 address bytes (IPv4-mapped for IPv4) and a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    /// Network byte order, as four native words of the kernel's `*_ip6` fields.
    pub ip: [u32; 4],
    /// Host byte order; 0 in a [`names::MESH_DESTINATIONS`] key means "any port".
    pub port: u16,
    pub _pad: u16,
}

/// The third word of an IPv4-mapped IPv6 address (`0000:ffff`), in network order.
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl SockAddr {
    /// `ip4` in network byte order (as the kernel's `user_ip4`), `port` in host order.
    pub const fn v4(ip4: u32, port: u16) -> Self {
        Self {
            ip: [0, 0, V4_MAPPED_PREFIX, ip4],
            port,
            _pad: 0,
        }
    }

    pub const fn v6(ip: [u32; 4], port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }

    pub const fn is_v4(&self) -> bool {
        self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == V4_MAPPED_PREFIX
    }

    /// 127.0.0.0/8, ::ffff:127.0.0.0/104 or ::1.
    pub const fn is_loopback(&self) -> bool {
        let first_octet = self.ip[3].to_ne_bytes()[0];
        (self.is_v4() && first_octet == 127)
            || (self.ip[0] == 0
                && self.ip[1] == 0
                && self.ip[2] == 0
                && self.ip[3] == u32::from_ne_bytes([0, 0, 0, 1]))
    }

    pub const fn with_port(self, port: u16) -> Self {
        Self::v6(self.ip, port)
    }
}

/// How a meshed pod accepts connections that did not come through an agent.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only connections from an agent (mTLS between nodes) get in.
    Strict = 1,
    /// Plaintext gets in too, and is counted.
    Permissive = 2,
    /// No inbound enforcement.
    Disable = 3,
    /// PERMISSIVE, but the pod's authorization policies deny every plaintext
    /// connection to the port (they ask for an identity plaintext cannot have): dropped
    /// as STRICT drops, counted apart.
    Deny = 4,
}

/// Value of [`names::MESHED_NETNS`] (key: the pod's network-namespace cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshedPod {
    /// The pod's host-side interface, for flow events.
    pub ifindex: u32,
    pub _pad: u32,
}

/// Value of [`names::MESH_DESTINATIONS`] (key: a [`SockAddr`], port 0 for a pod IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshDestination {
    /// What the destination is, from [`destination`].
    pub kind: u32,
}

/// Kinds of [`MeshDestination`].
pub mod destination {
    /// A meshed pod's address, any port.
    pub const POD: u32 = 1;
    /// A service's virtual IP and port.
    pub const SERVICE: u32 = 2;
}

/// Value of [`names::INBOUND_PODS`] (key: the ifindex of the pod's host-side veth).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundPod {
    /// The [`Mode`] as a byte.
    pub mode: u8,
    /// 1 when the agent listens for HBONE on port [`HBONE_PORT`] inside the pod's
    /// network namespace: connections to that port are mesh traffic and get in.
    pub hbone_in_pod: u8,
    pub _pad: [u8; 2],
    /// The node's address towards the pod (the pod's gateway): connections the node
    /// itself opens from it, such as health probes, always get in.
    pub probe_source: [u32; 4],
}

/// Key of [`names::INBOUND_PORT_MODES`]: one port of one meshed pod. The value is the
/// port's [`Mode`] as a byte, which replaces the pod's own mode (from
/// [`names::INBOUND_PODS`]) for new connections to that port, in either direction:
/// a STRICT pod can let plaintext into one port, a DISABLE pod can enforce on one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundPort {
    /// The pod's host-side interface, as in [`names::INBOUND_PODS`].
    pub ifindex: u32,
    /// The pod's destination port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl InboundPort {
    pub const fn new(ifindex: u32, port: u16) -> Self {
        Self {
            ifindex,
            port,
            _pad: 0,
        }
    }
}

/// The single entry of [`names::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Where captured IPv4 connections go: the agent as pods reach it (IPv4-mapped).
    pub agent_v4: [u32; 4],
    /// Where captured IPv6 connections go; all zero when the node has no IPv6.
    pub agent_v6: [u32; 4],
    /// The agent's outbound port (15001).
    pub outbound_port: u16,
    pub _pad: u16,
    /// Non-zero once the agent has written this entry; capture is off until then.
    pub enabled: u32,
}

/// What each slot of the per-CPU counter map [`names::COUNTERS`] counts.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A meshed pod's connect() was sent to the agent.
    Redirected = 0,
    /// A meshed pod connected to something outside the mesh; left alone.
    PassedNotMeshDestination = 1,
    /// A meshed pod connected to an excluded port; left alone.
    PassedExcludedPort = 2,
    /// A meshed pod connected to a loopback address; left alone.
    PassedLoopback = 3,
    /// The original destination of a redirected connection was re-keyed by its client
    /// address once established.
    OriginalDstRecorded = 4,
    /// A new plaintext connection into a STRICT pod was dropped.
    InboundDroppedStrict = 5,
    /// A new plaintext connection into a PERMISSIVE pod was let in.
    InboundPlaintext = 6,
    /// A new connection from the agent into a meshed pod.
    InboundFromAgent = 7,
    /// A new connection from the node itself (health probes) into a meshed pod.
    InboundFromNode = 8,
    /// A flow event was lost because the ring buffer was full.
    FlowEventsLost = 9,
    /// The capture program saw a meshed pod before the agent configured capture.
    CaptureNotConfigured = 10,
    /// A new plaintext connection that authorization policies deny was dropped.
    InboundDroppedPolicy = 11,
    /// A new connection to the HBONE port on a meshed pod's own address, which the
    /// agent serves inside the pod's network namespace.
    InboundHbone = 12,
}

impl Counter {
    /// Every counter, in map-index order.
    pub const ALL: [Counter; 13] = [
        Counter::Redirected,
        Counter::PassedNotMeshDestination,
        Counter::PassedExcludedPort,
        Counter::PassedLoopback,
        Counter::OriginalDstRecorded,
        Counter::InboundDroppedStrict,
        Counter::InboundPlaintext,
        Counter::InboundFromAgent,
        Counter::InboundFromNode,
        Counter::FlowEventsLost,
        Counter::CaptureNotConfigured,
        Counter::InboundDroppedPolicy,
        Counter::InboundHbone,
    ];
    /// Number of slots the counter map must have.
    pub const SLOTS: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name, used for metric labels and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::PassedNotMeshDestination => "passed_not_mesh_destination",
            Counter::PassedExcludedPort => "passed_excluded_port",
            Counter::PassedLoopback => "passed_loopback",
            Counter::OriginalDstRecorded => "original_dst_recorded",
            Counter::InboundDroppedStrict => "inbound_dropped_strict",
            Counter::InboundPlaintext => "inbound_plaintext",
            Counter::InboundFromAgent => "inbound_from_agent",
            Counter::InboundFromNode => "inbound_from_node",
            Counter::FlowEventsLost => "flow_events_lost",
            Counter::CaptureNotConfigured => "capture_not_configured",
            Counter::InboundDroppedPolicy => "inbound_dropped_policy",
            Counter::InboundHbone => "inbound_hbone",
        }
    }
}

/// A record in the [`names::FLOWS`] ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns`: CLOCK_MONOTONIC nanoseconds (since boot, without the time
    /// the machine was suspended).
    pub timestamp_ns: u64,
    /// For outbound events, the client pod's network-namespace cookie.
    pub netns_cookie: u64,
    pub source: SockAddr,
    pub destination: SockAddr,
    /// For inbound events, the pod's host-side interface.
    pub ifindex: u32,
    /// From [`flow`].
    pub verdict: u8,
    /// From [`reason`].
    pub reason: u8,
    pub _pad: u16,
}

/// Verdicts of [`FlowEvent`].
pub mod flow {
    pub const REDIRECT: u8 = 1;
    pub const DROP: u8 = 2;
    pub const PASS: u8 = 3;
}

/// Reasons of [`FlowEvent`].
pub mod reason {
    /// Outbound: a meshed pod connected to a mesh destination (REDIRECT).
    pub const MESH_DESTINATION: u8 = 1;
    /// Outbound: a meshed pod connected outside the mesh (PASS).
    pub const NOT_MESH_DESTINATION: u8 = 2;
    /// Outbound: an excluded port (PASS).
    pub const EXCLUDED_PORT: u8 = 3;
    /// Inbound: plaintext into a STRICT pod (DROP).
    pub const STRICT_PLAINTEXT: u8 = 4;
    /// Inbound: plaintext into a PERMISSIVE pod (PASS).
    pub const PERMISSIVE_PLAINTEXT: u8 = 5;
    /// Inbound: plaintext the pod's authorization policies deny (DROP).
    pub const POLICY_PLAINTEXT: u8 = 6;
}

// The kernel and user space must agree on these sizes; a change here is a change of
// the map layouts documented in ARCHITECTURE.md.
const _: () = assert!(size_of::<SockAddr>() == 20);
const _: () = assert!(size_of::<InboundPod>() == 20);
const _: () = assert!(size_of::<InboundPort>() == 8);
const _: () = assert!(size_of::<Config>() == 40);
const _: () = assert!(size_of::<FlowEvent>() == 64);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and has no
    // implicit padding (every gap is an explicit `_pad` field), so any bit pattern the
    // kernel writes is a valid value.
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for MeshedPod {}
    unsafe impl aya::Pod for MeshDestination {}
    unsafe impl aya::Pod for InboundPod {}
    unsafe impl aya::Pod for InboundPort {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FlowEvent {}
}
