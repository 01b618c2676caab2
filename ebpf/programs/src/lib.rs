//! Host-side stub of the kernel-program crate: the agent lists `weft-ebpf` as a build
//! dependency so that cargo reruns its build script when the programs' dependencies
//! change. The programs themselves are the `weft-ebpf` binary (`main.rs`).
#![no_std]
