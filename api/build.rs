//! Generates the Rust types and tonic client/server for the protobuf protocol in
//! `proto/` (feature `config`). Needs `protoc` (installed by `cargo xtask setup`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("CARGO_FEATURE_CONFIG").is_some() {
        // Ordered maps encode deterministically, so equal views get equal versions.
        tonic_prost_build::configure()
            .btree_map(".")
            // Resource bodies are shared by every node's view: reference-counted.
            .bytes(".weft.config.v1.Resource.body")
            .compile_protos(
                &[
                    "proto/weft/config/v1/config.proto",
                    "proto/weft/ca/v1/ca.proto",
                ],
                &["proto"],
            )?;
    }
    Ok(())
}
