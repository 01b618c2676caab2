//! `weftctl`: see the crate's library.

fn main() -> std::process::ExitCode {
    weftctl::main()
}
