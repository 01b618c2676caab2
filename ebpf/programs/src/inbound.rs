//! Inbound enforcement on a meshed pod's host-side veth, egress direction (packets
//! heading into the pod).
//!
//! Only the first packet of a connection matters (TCP SYN without ACK). One to the HBONE
//! port, where the agent listens inside the pod for peers that dial pod addresses, gets
//! in and is counted as mesh traffic. Otherwise its mode is the destination port's when
//! the port has one of its own (`WEFT_INBOUND_PORT_MODES`), the pod's otherwise. It gets in when it carries the agent's socket mark, or when the
//! node itself sent it from the pod's gateway address (health probes); otherwise STRICT
//! drops it, DENY (PERMISSIVE where authorization policies deny all plaintext) drops
//! it and counts it apart, and PERMISSIVE lets it in and counts it as plaintext.
//! DISABLE leaves it alone. Every other packet passes.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use weft_common::{
    AGENT_MARK, Counter, FlowEvent, HBONE_PORT, InboundPort, Mode, SockAddr, flow, reason,
};

use crate::maps::{WEFT_INBOUND_PODS, WEFT_INBOUND_PORT_MODES, count, report};

const ETH_HEADER: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS: usize = 13;

pub fn classify(ctx: &TcContext) -> i32 {
    match try_classify(ctx) {
        Ok(action) => action,
        // A packet too short to parse is not a new TCP connection.
        Err(()) => TC_ACT_OK as i32,
    }
}

/// The parts of a TCP packet that decide its fate.
struct Segment {
    source: SockAddr,
    destination: SockAddr,
    flags: u8,
}

fn try_classify(ctx: &TcContext) -> Result<i32, ()> {
    // SAFETY: the kernel hands the program a valid `__sk_buff` for its whole run.
    let skb = unsafe { &*ctx.skb.skb };
    // Map keys must live on the stack, not in the context.
    let ifindex = skb.ifindex;
    // SAFETY: map values are only read here, by copy.
    let Some(pod) = (unsafe { WEFT_INBOUND_PODS.get(&ifindex) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    // A DISABLE pod cannot return early: one of its ports may be STRICT.
    let Some(segment) = parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    if segment.flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(TC_ACT_OK as i32);
    }
    if segment.destination.port == HBONE_PORT && pod.hbone_in_pod != 0 {
        // The agent's own listener in the pod: mutual TLS, whatever the pod's mode.
        count(Counter::InboundHbone);
        return Ok(TC_ACT_OK as i32);
    }
    let port = InboundPort::new(ifindex, segment.destination.port);
    // SAFETY: map values are only read here, by copy.
    let mode = (unsafe { WEFT_INBOUND_PORT_MODES.get(&port) })
        .copied()
        .unwrap_or(pod.mode);
    if mode == Mode::Disable as u8 {
        return Ok(TC_ACT_OK as i32);
    }
    if skb.mark == AGENT_MARK {
        count(Counter::InboundFromAgent);
        return Ok(TC_ACT_OK as i32);
    }
    // Sent by the node itself (not forwarded) from the pod's gateway: a health probe.
    if skb.ingress_ifindex == 0 && segment.source.ip == pod.probe_source {
        count(Counter::InboundFromNode);
        return Ok(TC_ACT_OK as i32);
    }
    let mut event = FlowEvent {
        source: segment.source,
        destination: segment.destination,
        ifindex,
        ..FlowEvent::default()
    };
    if mode == Mode::Strict as u8 {
        count(Counter::InboundDroppedStrict);
        event.verdict = flow::DROP;
        event.reason = reason::STRICT_PLAINTEXT;
        report(event);
        debug!(
            ctx,
            "drop plaintext SYN to STRICT port {}", segment.destination.port
        );
        return Ok(TC_ACT_SHOT as i32);
    }
    if mode == Mode::Deny as u8 {
        count(Counter::InboundDroppedPolicy);
        event.verdict = flow::DROP;
        event.reason = reason::POLICY_PLAINTEXT;
        report(event);
        return Ok(TC_ACT_SHOT as i32);
    }
    count(Counter::InboundPlaintext);
    event.verdict = flow::PASS;
    event.reason = reason::PERMISSIVE_PLAINTEXT;
    report(event);
    Ok(TC_ACT_OK as i32)
}

/// The TCP segment in the packet, or `None` for anything else.
fn parse(ctx: &TcContext) -> Result<Option<Segment>, ()> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).map_err(drop)?);
    let (source_ip, destination_ip, tcp) = match ether_type {
        ETH_P_IPV4 => {
            let version_ihl = ctx.load::<u8>(ETH_HEADER).map_err(drop)?;
            if ctx.load::<u8>(ETH_HEADER + 9).map_err(drop)? != IPPROTO_TCP {
                return Ok(None);
            }
            let source = ctx.load::<u32>(ETH_HEADER + 12).map_err(drop)?;
            let destination = ctx.load::<u32>(ETH_HEADER + 16).map_err(drop)?;
            let header = usize::from(version_ihl & 0x0f) * 4;
            (
                SockAddr::v4(source, 0).ip,
                SockAddr::v4(destination, 0).ip,
                ETH_HEADER + header,
            )
        }
        // IPv6 extension headers before TCP are not followed: such packets pass.
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HEADER + 6).map_err(drop)? != IPPROTO_TCP {
                return Ok(None);
            }
            let source = ctx.load::<[u32; 4]>(ETH_HEADER + 8).map_err(drop)?;
            let destination = ctx.load::<[u32; 4]>(ETH_HEADER + 24).map_err(drop)?;
            (source, destination, ETH_HEADER + 40)
        }
        _ => return Ok(None),
    };
    let source_port = u16::from_be(ctx.load::<u16>(tcp).map_err(drop)?);
    let destination_port = u16::from_be(ctx.load::<u16>(tcp + 2).map_err(drop)?);
    let flags = ctx.load::<u8>(tcp + TCP_FLAGS).map_err(drop)?;
    Ok(Some(Segment {
        source: SockAddr::v6(source_ip, source_port),
        destination: SockAddr::v6(destination_ip, destination_port),
        flags,
    }))
}
