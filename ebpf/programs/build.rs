//! Rebuild the kernel programs when `bpf-linker` changes: cargo cannot see that it is
//! an input of the link step.

fn main() {
    match which::which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
