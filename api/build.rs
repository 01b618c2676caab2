//! Generates the Rust types and tonic client/server for the protobuf protocol in
//! `proto/`. Needs `protoc` (installed by `cargo xtask setup`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .compile_protos(&["proto/weft/config/v1/config.proto"], &["proto"])?;
    Ok(())
}
