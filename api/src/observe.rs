//! The agent's stream of what it sees (`weft.observe.v1`, served on its admin port and
//! read by `weftctl observe`), and the one decision both ends share: which events a
//! watcher's filter lets through.

use std::net::{IpAddr, SocketAddr};

/// Version 1 of the stream.
pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("weft.observe.v1");
}

pub use v1::{Event, Filter, Peer};

/// The kinds of [`Event`].
pub mod kind {
    pub const KERNEL: &str = "kernel";
    pub const CONNECTION: &str = "connection";
    pub const REQUEST: &str = "request";
    pub const LOST: &str = "lost";
}

/// The verdicts of [`Event`].
pub mod verdict {
    pub const REDIRECT: &str = "redirect";
    pub const PASS: &str = "pass";
    pub const DROP: &str = "drop";
    pub const OK: &str = "ok";
    pub const DENY: &str = "deny";
    pub const ERROR: &str = "error";

    /// Every verdict, for checking what a user asks for.
    pub const ALL: [&str; 6] = [REDIRECT, PASS, DROP, OK, DENY, ERROR];

    /// Whether an event of `verdict` is worth keeping when nobody watches: what an
    /// operator asks about after the fact.
    pub fn notable(verdict: &str) -> bool {
        matches!(verdict, DROP | DENY | ERROR)
    }
}

/// Whether `filter` asks only for verdicts that exist; if not, what to ask instead.
pub fn check(filter: &Filter) -> Result<(), String> {
    match filter
        .verdicts
        .iter()
        .find(|asked| !verdict::ALL.contains(&asked.as_str()))
    {
        Some(unknown) => Err(format!(
            "unknown verdict {unknown:?}: use {}",
            verdict::ALL.join(", ")
        )),
        None => Ok(()),
    }
}

/// Whether `filter` lets `event` through. A watcher always learns what it lost.
pub fn admits(filter: &Filter, event: &Event) -> bool {
    if event.kind == kind::LOST {
        return true;
    }
    let (source, destination) = (event.source.as_ref(), event.destination.as_ref());
    let in_namespace =
        |peer: Option<&Peer>| peer.is_some_and(|peer| peer.namespace == filter.namespace);
    (filter.verdicts.is_empty() || filter.verdicts.contains(&event.verdict))
        && (filter.namespace.is_empty() || in_namespace(source) || in_namespace(destination))
        && (filter.from.is_empty() || source.is_some_and(|peer| selects(&filter.from, peer)))
        && (filter.to.is_empty()
            || destination.is_some_and(|peer| selects(&filter.to, peer))
            || (filter.to.contains('/') && filter.to == event.service))
}

/// Whether `selector` — an IP address, `namespace/name` of a workload, `namespace/`, or
/// a workload's name — names `peer`.
fn selects(selector: &str, peer: &Peer) -> bool {
    if let Ok(ip) = selector.parse::<IpAddr>() {
        return address_ip(&peer.address) == Some(ip);
    }
    match selector.split_once('/') {
        Some((namespace, "")) => peer.namespace == namespace,
        Some((namespace, name)) => peer.namespace == namespace && peer.workload == name,
        None => peer.workload == selector,
    }
}

/// The IP of an [`Peer::address`]: `ip:port` or `ip`.
pub fn address_ip(address: &str) -> Option<IpAddr> {
    address
        .parse::<SocketAddr>()
        .map(|address| address.ip())
        .or_else(|_| address.parse())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(address: &str, namespace: &str, workload: &str) -> Option<Peer> {
        Some(Peer {
            address: address.to_owned(),
            namespace: namespace.to_owned(),
            workload: workload.to_owned(),
            identity: String::new(),
        })
    }

    fn event(kind: &str, verdict: &str) -> Event {
        Event {
            kind: kind.to_owned(),
            verdict: verdict.to_owned(),
            source: peer("10.0.0.5:41000", "shop", "client"),
            destination: peer("10.0.1.7:8080", "db", "store-0"),
            service: "db/store".to_owned(),
            ..Event::default()
        }
    }

    fn filter(from: &str, to: &str, namespace: &str, verdicts: &[&str]) -> Filter {
        Filter {
            from: from.to_owned(),
            to: to.to_owned(),
            namespace: namespace.to_owned(),
            verdicts: verdicts.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn filters() {
        let denied = event(kind::REQUEST, verdict::DENY);
        let cases = [
            (filter("", "", "", &[]), true, "empty"),
            (filter("10.0.0.5", "", "", &[]), true, "source IP"),
            (filter("10.0.0.6", "", "", &[]), false, "another source IP"),
            (filter("shop/client", "", "", &[]), true, "source workload"),
            (filter("shop/", "", "", &[]), true, "source namespace"),
            (
                filter("db/", "", "", &[]),
                false,
                "the destination's namespace as source",
            ),
            (
                filter("client", "", "", &[]),
                true,
                "source workload by name",
            ),
            (
                filter("", "db/store-0", "", &[]),
                true,
                "destination workload",
            ),
            (filter("", "db/store", "", &[]), true, "destination service"),
            (
                filter("", "store", "", &[]),
                false,
                "a service needs its namespace",
            ),
            (filter("", "10.0.1.7", "", &[]), true, "destination IP"),
            (
                filter("", "", "db", &[]),
                true,
                "namespace of the destination",
            ),
            (filter("", "", "shop", &[]), true, "namespace of the source"),
            (
                filter("", "", "web", &[]),
                false,
                "neither side's namespace",
            ),
            (
                filter("", "", "", &["drop", "deny"]),
                true,
                "one of the verdicts",
            ),
            (filter("", "", "", &["error"]), false, "another verdict"),
            (
                filter("shop/", "db/store", "db", &["deny"]),
                true,
                "all at once",
            ),
            (
                filter("shop/", "db/store", "web", &["deny"]),
                false,
                "all but one",
            ),
        ];
        for (filter, admitted, case) in cases {
            assert_eq!(admits(&filter, &denied), admitted, "{case}");
        }
    }

    #[test]
    fn a_kernel_event_without_a_source_workload_is_selected_by_address_only() {
        let mut drop = event(kind::KERNEL, verdict::DROP);
        drop.source = peer("10.0.0.9:5000", "", "");
        assert!(admits(&filter("10.0.0.9", "", "", &[]), &drop));
        assert!(!admits(&filter("shop/", "", "", &[]), &drop));
        drop.source = None;
        assert!(!admits(&filter("10.0.0.9", "", "", &[]), &drop));
    }

    #[test]
    fn only_known_verdicts_are_asked_for() {
        assert!(check(&filter("", "", "", &["drop", "ok"])).is_ok());
        let refused = check(&filter("", "", "", &["drop", "dropped"])).unwrap_err();
        assert!(
            refused.starts_with("unknown verdict \"dropped\": use redirect"),
            "{refused}"
        );
    }

    #[test]
    fn a_watcher_always_learns_what_it_lost() {
        let lost = Event {
            kind: kind::LOST.to_owned(),
            lost: 3,
            ..Event::default()
        };
        assert!(admits(&filter("shop/", "db/", "web", &["drop"]), &lost));
    }

    #[test]
    fn addresses_with_and_without_a_port() {
        assert_eq!(address_ip("10.0.0.1:80"), Some([10, 0, 0, 1].into()));
        assert_eq!(address_ip("[fd00::1]:80"), "fd00::1".parse().ok());
        assert_eq!(address_ip("fd00::1"), "fd00::1".parse().ok());
        assert_eq!(address_ip(""), None);
    }
}
