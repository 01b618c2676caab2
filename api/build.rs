//! Generates the Rust types and tonic client/server for the protobuf protocol in
//! `proto/` (feature `config`). Needs `protoc` (installed by `cargo xtask setup`).

/// The messages the agent's `/config_dump` shows (the policies and routes and what
/// they hold), as JSON with proto3's lowerCamelCase field names. (prost gives the
/// enums and oneofs nested in them the derive too.)
const DUMPED: &[&str] = &[
    ".weft.config.v1.AuthorizationPolicy",
    ".weft.config.v1.AuthorizationRule",
    ".weft.config.v1.AuthorizationSource",
    ".weft.config.v1.AuthorizationOperation",
    ".weft.config.v1.AuthorizationCondition",
    ".weft.config.v1.TrafficPolicy",
    ".weft.config.v1.Retries",
    ".weft.config.v1.ConnectionLimits",
    ".weft.config.v1.OutlierDetection",
    ".weft.config.v1.ServiceRoutes",
    ".weft.config.v1.RouteRule",
    ".weft.config.v1.RouteMatch",
    ".weft.config.v1.HeaderMatch",
    ".weft.config.v1.WeightedBackend",
    ".weft.config.v1.RouteFilter",
    ".weft.config.v1.HeaderModifier",
    ".weft.config.v1.Redirect",
    ".weft.config.v1.Rewrite",
    ".weft.config.v1.PathModifier",
    ".weft.config.v1.Mirror",
    ".weft.config.v1.Fault",
    ".weft.config.v1.FaultDelay",
    ".weft.config.v1.FaultAbort",
];

/// Their enum fields (an `i32` in Rust), shown by name: (field, the function in
/// `config::v1::names` that names it).
const NAMED: &[(&str, &str)] = &[
    (".weft.config.v1.AuthorizationPolicy.action", "action"),
    (
        ".weft.config.v1.TrafficPolicy.load_balancing",
        "load_balancing",
    ),
    (".weft.config.v1.RouteMatch.path_kind", "path_kind"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("CARGO_FEATURE_CONFIG").is_some() {
        // Ordered maps encode deterministically, so equal views get equal versions.
        let mut builder = tonic_prost_build::configure()
            .btree_map(".")
            // Resource bodies are shared by every node's view: reference-counted.
            .bytes(".weft.config.v1.Resource.body");
        for message in DUMPED {
            builder = builder.type_attribute(
                message,
                "#[derive(serde::Serialize)] #[serde(rename_all = \"camelCase\")]",
            );
        }
        for (field, function) in NAMED {
            builder = builder.field_attribute(
                field,
                format!("#[serde(serialize_with = \"crate::config::v1::names::{function}\")]"),
            );
        }
        // weftctl prints events as JSON too.
        for message in [".weft.observe.v1.Event", ".weft.observe.v1.Peer"] {
            builder = builder.type_attribute(
                message,
                "#[derive(serde::Serialize)] #[serde(rename_all = \"camelCase\")]",
            );
        }
        builder.compile_protos(
            &[
                "proto/weft/config/v1/config.proto",
                "proto/weft/ca/v1/ca.proto",
                "proto/weft/observe/v1/observe.proto",
            ],
            &["proto"],
        )?;
    }
    Ok(())
}
