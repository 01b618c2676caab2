//! Generates the messages and the tonic client and server of the gRPC echo service from
//! `proto/weft/echo/v1/echo.proto`. Needs `protoc` (installed by `cargo xtask setup`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // Metadata maps print in a stable order.
        .btree_map(".")
        // `weft-client` prints the replies as JSON lines.
        .type_attribute(".weft.echo.v1.EchoReply", "#[derive(serde::Serialize)]")
        .type_attribute(
            ".weft.echo.v1.ClientStreamReply",
            "#[derive(serde::Serialize)]",
        )
        .compile_protos(&["proto/weft/echo/v1/echo.proto"], &["proto"])?;
    Ok(())
}
