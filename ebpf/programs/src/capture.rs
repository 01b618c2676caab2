//! Outbound capture: `cgroup/connect4`, `cgroup/connect6` and `sock_ops`.
//!
//! A connect() from a socket in a meshed pod's network namespace to a mesh destination
//! is rewritten to the agent's outbound address; the original destination is stored
//! by socket cookie and, once the connection is established, re-keyed by the client's
//! address and port, which is what the agent sees after accept().

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use weft_common::{Counter, FlowEvent, SockAddr, flow, reason};

use crate::maps::{
    WEFT_CONFIG, WEFT_EXCLUDED_PORTS, WEFT_MESH_DESTINATIONS, WEFT_MESHED_NETNS, WEFT_ORIG_DST,
    WEFT_ORIG_DST_BY_COOKIE, count, report,
};

/// `cgroup/sock_addr` verdict letting the syscall proceed (capture never blocks).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for its whole run.
    let addr: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let destination = SockAddr::v4(addr.user_ip4, u16::from_be(addr.user_port as u16));
    if let Some(agent) = redirect(ctx, &destination) {
        addr.user_ip4 = agent.ip[3];
        addr.user_port = u32::from(agent.port.to_be());
    }
    ALLOW
}

pub fn connect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `connect4`.
    let addr: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return ALLOW;
    }
    // The verifier wants the address read and written one 32-bit word at a time.
    let ip = [
        addr.user_ip6[0],
        addr.user_ip6[1],
        addr.user_ip6[2],
        addr.user_ip6[3],
    ];
    let destination = SockAddr::v6(ip, u16::from_be(addr.user_port as u16));
    if let Some(agent) = redirect(ctx, &destination) {
        addr.user_ip6[0] = agent.ip[0];
        addr.user_ip6[1] = agent.ip[1];
        addr.user_ip6[2] = agent.ip[2];
        addr.user_ip6[3] = agent.ip[3];
        addr.user_port = u32::from(agent.port.to_be());
    }
    ALLOW
}

/// Where the connection to `destination` should go instead, if anywhere.
fn redirect(ctx: &SockAddrContext, destination: &SockAddr) -> Option<SockAddr> {
    // SAFETY: both helpers accept the program's context and have no other preconditions.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: map values are only read here, by copy.
    let pod = unsafe { WEFT_MESHED_NETNS.get(&netns) }?;
    let mut event = FlowEvent {
        netns_cookie: netns,
        destination: *destination,
        ifindex: pod.ifindex,
        verdict: flow::PASS,
        ..FlowEvent::default()
    };
    let Some(config) = WEFT_CONFIG.get(0).filter(|config| config.enabled != 0) else {
        count(Counter::CaptureNotConfigured);
        return None;
    };
    if destination.is_loopback() {
        count(Counter::PassedLoopback);
        return None;
    }
    // SAFETY: as above.
    if unsafe { WEFT_EXCLUDED_PORTS.get(&destination.port) }.is_some() {
        count(Counter::PassedExcludedPort);
        event.reason = reason::EXCLUDED_PORT;
        report(event);
        return None;
    }
    // SAFETY: as above.
    let known = unsafe {
        WEFT_MESH_DESTINATIONS.get(destination).is_some()
            || WEFT_MESH_DESTINATIONS
                .get(&destination.with_port(0))
                .is_some()
    };
    if !known {
        count(Counter::PassedNotMeshDestination);
        event.reason = reason::NOT_MESH_DESTINATION;
        report(event);
        return None;
    }
    let agent = if destination.is_v4() {
        config.agent_v4
    } else {
        config.agent_v6
    };
    if agent == [0; 4] {
        // IPv6 destination on a node without an IPv6 agent address.
        count(Counter::PassedNotMeshDestination);
        return None;
    }
    // SAFETY: as above.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if WEFT_ORIG_DST_BY_COOKIE
        .insert(&socket, destination, 0)
        .is_err()
    {
        // Without a record the agent could not serve the connection: leave it alone.
        return None;
    }
    count(Counter::Redirected);
    event.verdict = flow::REDIRECT;
    event.reason = reason::MESH_DESTINATION;
    report(event);
    debug!(ctx, "redirect port {} to the agent", destination.port);
    Some(SockAddr::v6(agent, config.outbound_port))
}

pub fn sock_ops(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return;
    }
    // SAFETY: the helper accepts the program's context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(destination) = (unsafe { WEFT_ORIG_DST_BY_COOKIE.get(&socket) }).copied() else {
        return;
    };
    // sock_ops gives the local port in host byte order.
    let port = ctx.local_port() as u16;
    let client = if ctx.family() == AF_INET {
        SockAddr::v4(ctx.local_ip4(), port)
    } else {
        // SAFETY: the kernel hands the program a valid `bpf_sock_ops`. The verifier
        // only accepts context reads at constant offsets from the context pointer, one
        // word at a time; volatile reads keep the compiler from copying the array
        // through a moved pointer (as `local_ip6()` does).
        let word =
            |i: usize| unsafe { core::ptr::read_volatile(&raw const (*ctx.ops).local_ip6[i]) };
        SockAddr::v6([word(0), word(1), word(2), word(3)], port)
    };
    if WEFT_ORIG_DST.insert(&client, &destination, 0).is_ok() {
        count(Counter::OriginalDstRecorded);
    }
    let _ = WEFT_ORIG_DST_BY_COOKIE.remove(&socket);
}
