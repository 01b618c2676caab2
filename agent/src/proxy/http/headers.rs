//! Header rules of a proxy: hop-by-hop fields stay on their hop (RFC 9110 §7.6.1), the
//! request target takes the form the upstream version wants, and the forwarding
//! headers Istio's proxies add (`x-forwarded-proto`, `x-request-id` outbound;
//! `x-forwarded-client-cert` inbound, replacing whatever the client sent), and gRPC's
//! deadline header, `grpc-timeout`.

use std::time::Duration;

use http::{
    HeaderMap, HeaderValue, Request, Uri, Version,
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery, Scheme},
};

use super::pool;
use crate::identity::Identity;

/// Fields that describe one connection, never forwarded (besides those the
/// `Connection` field names).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// Whether `request` asks to switch protocols on its connection (WebSocket): only
/// HTTP/1.1 has `Upgrade`.
pub fn wants_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && connection_names(request.headers()).any(|name| name.eq_ignore_ascii_case("upgrade"))
}

fn connection_names(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
}

/// Removes the hop-by-hop fields. `TE: trailers` is end to end in practice (gRPC needs
/// it over HTTP/2) and is kept; with `upgrade`, so are `Connection: upgrade` and
/// `Upgrade`, which the next hop needs to switch protocols.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = connection_names(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .filter(|name| !(upgrade && *name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers = headers
        .get(header::TE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|part| part.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in HOP_BY_HOP {
        if upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The authority the client addressed: the URI's (HTTP/2, absolute form) or `Host`.
pub fn authority<B>(request: &Request<B>) -> Option<Authority> {
    request.uri().authority().cloned().or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .and_then(|host| host.parse().ok())
    })
}

/// Makes `request` ready for an upstream connection of `version`: hop-by-hop fields
/// gone, the target in origin form with `Host` for HTTP/1.1 and in absolute form for
/// HTTP/2 (whose `:authority` replaces `Host`).
pub fn prepare_request<B>(request: &mut Request<B>, version: pool::Version, upgrade: bool) {
    let authority = authority(request);
    strip_hop_by_hop(request.headers_mut(), upgrade);
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(path);
    match version {
        pool::Version::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            if let Some(authority) = authority
                && let Ok(host) = HeaderValue::from_str(authority.as_str())
            {
                request.headers_mut().insert(header::HOST, host);
            }
        }
        pool::Version::Http2 => {
            *request.version_mut() = Version::HTTP_2;
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = authority;
            request.headers_mut().remove(header::HOST);
        }
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// The headers a client's agent adds to what it forwards, when the client did not.
pub fn forwarding_outbound(headers: &mut HeaderMap) {
    headers
        .entry(HeaderName::from_static("x-forwarded-proto"))
        .or_insert(HeaderValue::from_static("http"));
    headers
        .entry(HeaderName::from_static("x-request-id"))
        .or_insert_with(request_id);
}

/// Inbound, the destination agent says who called, as Istio's proxies do: the mutual
/// TLS peer's identity in `x-forwarded-client-cert`, replacing anything the client
/// may have claimed.
pub fn forwarding_inbound(headers: &mut HeaderMap, client: &Identity, server: &Identity) {
    let value = format!("By={server};URI={client}");
    match HeaderValue::from_str(&value) {
        Ok(value) => {
            headers.insert(HeaderName::from_static("x-forwarded-client-cert"), value);
        }
        Err(_) => {
            headers.remove("x-forwarded-client-cert");
        }
    }
}

/// A random request id in UUID version 4 form.
fn request_id() -> HeaderValue {
    let bits = fastrand::u128(..);
    let hex = format!("{bits:032x}");
    let id = format!(
        "{}-{}-4{}-{:x}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        8 | (bits >> 60 & 0x3),
        &hex[17..20],
        &hex[20..32]
    );
    HeaderValue::from_str(&id).expect("hex digits and dashes are a valid header value")
}

/// Whether the request is gRPC.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// The `grpc-status` in `headers` (the trailers, or a trailers-only response).
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The client's gRPC deadline, `grpc-timeout` (`<at most 8 digits><unit>`, the unit
/// one of `H M S m u n`); `None` when absent or malformed.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// Passes a gRPC deadline of `left` on in `grpc-timeout`, in the finest unit that fits
/// its 8 digits.
pub fn set_grpc_timeout(headers: &mut HeaderMap, left: Duration) {
    const MAX: u128 = 99_999_999;
    let value = [
        (left.as_nanos(), 'n'),
        (left.as_micros(), 'u'),
        (left.as_millis(), 'm'),
        (u128::from(left.as_secs()), 'S'),
    ]
    .into_iter()
    .find(|(value, _)| *value <= MAX)
    .map_or_else(
        || format!("{MAX}S"),
        |(value, unit)| format!("{value}{unit}"),
    );
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(GRPC_TIMEOUT, value);
    }
}

const GRPC_TIMEOUT: &str = "grpc-timeout";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_deadlines_are_read_in_every_unit_and_passed_on_in_the_finest_that_fits() {
        let read = |text: &str| grpc_timeout(&headers(&[("grpc-timeout", text)]));
        assert_eq!(read("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(read("3M"), Some(Duration::from_secs(180)));
        assert_eq!(read("1S"), Some(Duration::from_secs(1)));
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("7u"), Some(Duration::from_micros(7)));
        assert_eq!(read("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        let written = |left: Duration| {
            let mut headers = HeaderMap::new();
            set_grpc_timeout(&mut headers, left);
            headers["grpc-timeout"].to_str().unwrap().to_owned()
        };
        assert_eq!(written(Duration::from_millis(50)), "50000000n");
        assert_eq!(written(Duration::from_millis(250)), "250000u");
        assert_eq!(written(Duration::from_secs(3600)), "3600000m");
        assert_eq!(written(Duration::from_secs(200_000)), "200000S");
        assert_eq!(
            read(&written(Duration::from_millis(1234))),
            Some(Duration::from_millis(1234))
        );
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    fn names(headers: &HeaderMap) -> Vec<String> {
        let mut names: Vec<String> = headers.keys().map(ToString::to_string).collect();
        names.sort();
        names
    }

    /// Headers given, whether the request upgrades, the names left.
    type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str]);

    #[test]
    fn hop_by_hop_fields_stay_on_their_hop() {
        let table: [Case; 4] = [
            (
                &[
                    ("connection", "keep-alive, x-secret"),
                    ("keep-alive", "timeout=5"),
                    ("x-secret", "1"),
                    ("transfer-encoding", "chunked"),
                    ("accept", "*/*"),
                ],
                false,
                &["accept"],
            ),
            (
                &[("te", "trailers"), ("content-type", "application/grpc")],
                false,
                &["content-type", "te"],
            ),
            (&[("te", "gzip"), ("proxy-connection", "close")], false, &[]),
            (
                &[
                    ("connection", "Upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", "x"),
                ],
                true,
                &["connection", "sec-websocket-key", "upgrade"],
            ),
        ];
        for (given, upgrade, kept) in table {
            let mut map = headers(given);
            strip_hop_by_hop(&mut map, upgrade);
            assert_eq!(names(&map), kept, "{given:?}");
        }
    }

    #[test]
    fn upgrades_are_http1_requests_that_say_so_twice() {
        let request = |version, pairs: &[(&str, &str)]| {
            let mut request = Request::builder().version(version).body(()).unwrap();
            *request.headers_mut() = headers(pairs);
            request
        };
        let both = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert!(wants_upgrade(&request(Version::HTTP_11, &both)));
        assert!(!wants_upgrade(&request(Version::HTTP_2, &both)));
        assert!(!wants_upgrade(&request(
            Version::HTTP_11,
            &[("upgrade", "websocket")]
        )));
    }

    #[test]
    fn the_target_takes_the_upstream_versions_form() {
        let mut from_h2 = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://web.shop:80/a?b=c")
            .body(())
            .unwrap();
        prepare_request(&mut from_h2, pool::Version::Http1, false);
        assert_eq!(from_h2.uri().to_string(), "/a?b=c");
        assert_eq!(from_h2.headers()["host"], "web.shop:80");
        assert_eq!(from_h2.version(), Version::HTTP_11);

        let mut from_h1 = Request::builder()
            .uri("/a")
            .header("host", "web.shop")
            .body(())
            .unwrap();
        prepare_request(&mut from_h1, pool::Version::Http2, false);
        assert_eq!(from_h1.uri().to_string(), "http://web.shop/a");
        assert!(!from_h1.headers().contains_key("host"));
    }

    #[test]
    fn forwarding_headers() {
        let mut outbound = headers(&[("x-request-id", "mine")]);
        forwarding_outbound(&mut outbound);
        assert_eq!(outbound["x-request-id"], "mine", "a client's id is kept");
        assert_eq!(outbound["x-forwarded-proto"], "http");
        let mut fresh = HeaderMap::new();
        forwarding_outbound(&mut fresh);
        let id = fresh["x-request-id"].to_str().unwrap();
        assert_eq!((id.len(), &id[14..15]), (36, "4"), "{id}");

        let client: Identity = "spiffe://cluster.local/ns/a/sa/client".parse().unwrap();
        let server: Identity = "spiffe://cluster.local/ns/b/sa/web".parse().unwrap();
        let mut inbound = headers(&[("x-forwarded-client-cert", "URI=spiffe://forged")]);
        forwarding_inbound(&mut inbound, &client, &server);
        assert_eq!(
            inbound["x-forwarded-client-cert"],
            "By=spiffe://cluster.local/ns/b/sa/web;URI=spiffe://cluster.local/ns/a/sa/client"
        );
    }

    #[test]
    fn grpc_is_told_by_its_content_type_and_status() {
        assert!(is_grpc(&headers(&[(
            "content-type",
            "application/grpc+proto"
        )])));
        assert!(!is_grpc(&headers(&[("content-type", "application/json")])));
        assert_eq!(grpc_status(&headers(&[("grpc-status", "14")])), Some(14));
        assert_eq!(grpc_status(&headers(&[("grpc-status", "x")])), None);
    }
}
