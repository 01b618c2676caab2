//! Which protocol a service port speaks, decided as Istio decides it: the port's
//! `appProtocol` when it has one, else its name (`<protocol>` or `<protocol>-<suffix>`,
//! such as `http-web` or `grpc-api`); a port that declares nothing the agent knows is
//! [`Protocol::Detect`].

/// What a service port speaks, for the agent to serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Not declared: told from the first bytes each connection sends.
    Detect,
    /// HTTP/1.1; clients may speak HTTP/2 too (either version accepted).
    Http,
    /// HTTP/2 with prior knowledge (`kubernetes.io/h2c`, `http2`, `h2c`).
    Http2,
    /// gRPC: HTTP/2 with prior knowledge, its status in trailers.
    Grpc,
    /// Opaque bytes, never parsed (`tcp`, `tls`, `https`, `mysql`, `mongo`, `redis`, …).
    Tcp,
}

/// Protocols by the name a port or its `appProtocol` declares (ASCII case ignored).
const NAMES: &[(&str, Protocol)] = &[
    ("http", Protocol::Http),
    ("http2", Protocol::Http2),
    ("h2c", Protocol::Http2),
    ("grpc", Protocol::Grpc),
    ("tcp", Protocol::Tcp),
    ("tls", Protocol::Tcp),
    ("https", Protocol::Tcp),
    ("mysql", Protocol::Tcp),
    ("mongo", Protocol::Tcp),
    ("redis", Protocol::Tcp),
];

/// The `appProtocol` values Kubernetes defines, which no port name can be.
const KUBERNETES: &[(&str, Protocol)] = &[
    ("kubernetes.io/h2c", Protocol::Http2),
    // WebSocket over cleartext: HTTP/1.1 and its upgrade.
    ("kubernetes.io/ws", Protocol::Http),
    // WebSocket over TLS: opaque to the agent.
    ("kubernetes.io/wss", Protocol::Tcp),
];

/// gRPC-Web is HTTP/1.1 or HTTP/2 requests that carry gRPC messages.
const GRPC_WEB: &str = "grpc-web";

impl Protocol {
    /// The protocol of a port with `app_protocol` and `name`: the `appProtocol` wins,
    /// even one the agent does not know (as in Istio).
    pub fn of(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
        match app_protocol {
            Some(app_protocol) => lookup(KUBERNETES, app_protocol)
                .or_else(|| declared(app_protocol))
                .unwrap_or(Protocol::Detect),
            None => name.and_then(declared).unwrap_or(Protocol::Detect),
        }
    }
}

/// The protocol `<protocol>` or `<protocol>-<suffix>` names, if the agent knows it.
fn declared(value: &str) -> Option<Protocol> {
    if value
        .get(..GRPC_WEB.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(GRPC_WEB))
    {
        return Some(Protocol::Http);
    }
    let protocol = value.split('-').next().unwrap_or(value);
    lookup(NAMES, protocol)
}

fn lookup(table: &[(&str, Protocol)], value: &str) -> Option<Protocol> {
    table
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|(_, protocol)| *protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocol_wins_then_the_port_name_decides() {
        use Protocol::*;
        // (appProtocol, port name, protocol)
        let cases = [
            (None, None, Detect),
            (None, Some("web"), Detect),
            (None, Some("http"), Http),
            (None, Some("http-web"), Http),
            (None, Some("HTTP-web"), Http),
            (None, Some("httpx"), Detect),
            (None, Some("http2"), Http2),
            (None, Some("http2-api"), Http2),
            (None, Some("h2c-api"), Http2),
            (None, Some("grpc"), Grpc),
            (None, Some("grpc-api"), Grpc),
            (None, Some("grpc-web"), Http),
            (None, Some("grpc-web-ui"), Http),
            (None, Some("tcp-db"), Tcp),
            (None, Some("tls"), Tcp),
            (None, Some("https"), Tcp),
            (None, Some("mysql"), Tcp),
            (None, Some("mongo-0"), Tcp),
            (None, Some("redis"), Tcp),
            (None, Some("-http"), Detect),
            (None, Some(""), Detect),
            (Some("http"), Some("tcp-db"), Http),
            (Some("HTTP"), None, Http),
            (Some("http2"), None, Http2),
            (Some("kubernetes.io/h2c"), Some("http"), Http2),
            (Some("Kubernetes.io/H2C"), None, Http2),
            (Some("kubernetes.io/ws"), None, Http),
            (Some("kubernetes.io/wss"), Some("http"), Tcp),
            (Some("grpc"), Some("http"), Grpc),
            (Some("grpc-web"), None, Http),
            (Some("tcp"), Some("http"), Tcp),
            (Some("TCP"), None, Tcp),
            (Some("mysql"), None, Tcp),
            (Some("example.com/custom"), Some("http"), Detect),
            (Some("kubernetes.io/h2c-x"), None, Detect),
        ];
        for (app_protocol, name, protocol) in cases {
            assert_eq!(
                Protocol::of(app_protocol, name),
                protocol,
                "appProtocol {app_protocol:?}, name {name:?}"
            );
        }
    }
}
