//! `kubectl weft …`: weftctl as a kubectl plugin.

fn main() -> std::process::ExitCode {
    weftctl::main()
}
