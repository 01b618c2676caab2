//! weft's kernel programs, built for `bpfel-unknown-none` and embedded in the agent.
//!
//! Each program is a thin `#[prog] fn x(ctx)` that delegates to a function in
//! [`capture`] or [`inbound`], so the logic reads as ordinary Rust; the maps they share
//! live in [`maps`]. Layouts are in `weft-common` and ARCHITECTURE.md.
#![no_std]
#![no_main]

mod capture;
mod inbound;
mod maps;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, sock_ops},
    programs::{SockAddrContext, SockOpsContext, TcContext},
};

/// Sends a meshed pod's IPv4 TCP connect() to a mesh destination to the agent.
#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    capture::connect4(&ctx)
}

/// Same for IPv6 sockets, including IPv4-mapped destinations.
#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    capture::connect6(&ctx)
}

/// Re-keys a redirected connection's original destination by its client address once
/// it is established, which is what the agent sees after accept().
#[sock_ops]
pub fn weft_sock_ops(ctx: SockOpsContext) -> u32 {
    capture::sock_ops(&ctx);
    // The return value of sock_ops only matters for the ops that ask for a reply.
    1
}

/// On a meshed pod's host-side veth (egress, towards the pod): keeps plaintext out of
/// STRICT pods.
#[classifier]
pub fn weft_inbound(ctx: TcContext) -> i32 {
    inbound::classify(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
