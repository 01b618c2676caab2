//! weft's kernel programs, built for `bpfel-unknown-none` and embedded in the agent.
//!
//! Each program is a thin `#[prog] fn x(ctx)` that delegates to `try_x(ctx)`, so the
//! logic reads as ordinary fallible Rust and the return-code mapping lives in one place.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_sock_addr, map},
    maps::PerCpuArray,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use weft_common::Counter;

/// `cgroup/sock_addr` verdict letting the syscall proceed.
const ALLOW: i32 = 1;

// The static's name is the map name user space looks up (`weft_common::names`).
#[map]
static WEFT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::SLOTS, 0);

fn count(counter: Counter) {
    if let Some(slot) = WEFT_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the slot belongs to this CPU and programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}

/// Sees every IPv4 `connect()` made by a process in the attached cgroup subtree.
#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    match try_weft_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_weft_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    count(Counter::Connect4Seen);
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for its whole run.
    let addr = unsafe { &*ctx.sock_addr };
    // user_ip4 and user_port are in network byte order.
    let ip = u32::from_be(addr.user_ip4);
    let port = u16::from_be(addr.user_port as u16);
    debug!(ctx, "connect4 to {:i}:{}", ip, port);
    Ok(ALLOW)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
