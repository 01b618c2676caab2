//! Plain-old-data types shared by weft's kernel programs (`weft-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy` and explicitly sized so that the kernel and
//! user space agree on every byte. When the first struct-valued map arrives, a `user`
//! feature will implement `aya::Pod` for it (as aya-template does).
#![no_std]

/// Names of the maps and programs in the kernel object, shared so that a rename on one
/// side is a compile error on the other.
pub mod names {
    /// Per-CPU array of `u64` event counters, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "WEFT_COUNTERS";
    /// The `cgroup/connect4` program.
    pub const CONNECT4: &str = "weft_connect4";
}

/// What each slot of the per-CPU counter map counts.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IPv4 `connect()` calls seen by the `cgroup/connect4` hook.
    Connect4Seen = 0,
}

impl Counter {
    /// Every counter, in map-index order.
    pub const ALL: [Counter; 1] = [Counter::Connect4Seen];
    /// Number of slots the counter map must have.
    pub const SLOTS: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name, used for metric labels and test output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4Seen => "connect4_seen",
        }
    }
}
