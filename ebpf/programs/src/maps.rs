//! The maps the programs share with each other and with the agent. All but the log
//! buffer are pinned by name under the node's bpffs directory, so they outlive agent
//! restarts. Their static names are the map names (`weft_common::names`).

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use weft_common::{
    Config, Counter, FlowEvent, InboundPod, InboundPort, MeshDestination, MeshedPod, SockAddr,
};

#[map]
static WEFT_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::SLOTS, 0);

#[map]
pub static WEFT_CONFIG: Array<Config> = Array::pinned(1, 0);

/// Network-namespace cookie of each meshed pod on this node.
#[map]
pub static WEFT_MESHED_NETNS: HashMap<u64, MeshedPod> = HashMap::pinned(4096, 0);

/// Service VIP:port and meshed pod IP (port 0) of the whole mesh.
#[map]
pub static WEFT_MESH_DESTINATIONS: HashMap<SockAddr, MeshDestination> = HashMap::pinned(262_144, 0);

/// Destination ports never captured.
#[map]
pub static WEFT_EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(64, 0);

/// Original destination by socket cookie, from connect() until established.
#[map]
pub static WEFT_ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65_536, 0);

/// Original destination by the client's address, for the agent to read after accept().
#[map]
pub static WEFT_ORIG_DST: LruHashMap<SockAddr, SockAddr> = LruHashMap::pinned(65_536, 0);

/// Inbound policy of each meshed pod, by the ifindex of its host-side veth.
#[map]
pub static WEFT_INBOUND_PODS: HashMap<u32, InboundPod> = HashMap::pinned(4096, 0);

/// Ports whose inbound mode differs from their pod's: the mode byte by (ifindex, port).
#[map]
pub static WEFT_INBOUND_PORT_MODES: HashMap<InboundPort, u8> = HashMap::pinned(16_384, 0);

#[map]
static WEFT_FLOWS: RingBuf = RingBuf::pinned(256 * 1024, 0);

pub fn count(counter: Counter) {
    if let Some(slot) = WEFT_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the slot belongs to this CPU and programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}

/// Reports a flow event; counts it as lost when the ring buffer is full.
pub fn report(mut event: FlowEvent) {
    // SAFETY: a helper without preconditions.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    if WEFT_FLOWS.output::<FlowEvent>(&event, 0).is_err() {
        count(Counter::FlowEventsLost);
    }
}
