//! The streamed policies and routes as `/config_dump` shows them: decoded from their
//! protobuf, each under the name the controller streamed it by, enums by name. The
//! subscription takes them once per applied version; the dump only serialises them.

use std::collections::BTreeMap;

use serde::Serialize;
use weft_api::config::v1::{self as proto, Kind};

use super::Resources;

/// The AuthorizationPolicies, TrafficPolicies and ServiceRoutes of a version.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Policies {
    pub authorization: BTreeMap<String, proto::AuthorizationPolicy>,
    pub traffic: BTreeMap<String, proto::TrafficPolicy>,
    pub routes: BTreeMap<String, proto::ServiceRoutes>,
    /// Why a kind's resources could not be decoded (that kind is left out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub undecodable: Vec<String>,
}

impl Policies {
    pub fn of(resources: &Resources) -> Self {
        let mut undecodable = Vec::new();
        Self {
            authorization: decoded(resources, &mut undecodable),
            traffic: decoded(resources, &mut undecodable),
            routes: decoded(resources, &mut undecodable),
            undecodable,
        }
    }
}

fn decoded<M: Kind>(resources: &Resources, undecodable: &mut Vec<String>) -> BTreeMap<String, M> {
    match resources.decode::<M>() {
        Ok(all) => all.into_iter().collect(),
        Err(problem) => {
            undecodable.push(problem);
            BTreeMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use bytes::Bytes;
    use serde_json::json;
    use weft_api::config::v1::{ConfigUpdate, Resource};

    use super::{super::tests::resource, *};

    fn resources(upserts: Vec<Resource>) -> Resources {
        let mut resources = Resources::default();
        resources
            .apply(&ConfigUpdate {
                version: "v1".into(),
                snapshot: true,
                upserts,
                removals: vec![],
            })
            .unwrap();
        resources
    }

    #[test]
    fn policies_and_routes_show_their_fields_by_name() {
        let resources = resources(vec![
            resource(
                "shop/deny-legacy",
                &proto::AuthorizationPolicy {
                    name: "deny-legacy".into(),
                    namespace: "shop".into(),
                    action: proto::authorization_policy::Action::Deny as i32,
                    workloads: vec!["shop/web-0".into()],
                    rules: vec![proto::AuthorizationRule {
                        from: vec![proto::AuthorizationSource {
                            not_namespaces: vec!["shop".into()],
                            ..Default::default()
                        }],
                        to: vec![proto::AuthorizationOperation {
                            ports: vec![8080],
                            ..Default::default()
                        }],
                        when: Vec::new(),
                    }],
                    dry_run: false,
                },
            ),
            resource(
                "shop/web",
                &proto::TrafficPolicy {
                    service: "web".into(),
                    namespace: "shop".into(),
                    source: "shop/web".into(),
                    load_balancing: proto::LoadBalancing::PeakEwma as i32,
                    idle_timeout_ms: 3000,
                    retries: Some(proto::Retries {
                        attempts: 2,
                        retry_on: vec!["5xx".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
            resource(
                "shop/web:80",
                &proto::ServiceRoutes {
                    service: "web".into(),
                    namespace: "shop".into(),
                    port: 80,
                    rules: vec![proto::RouteRule {
                        route: "HTTPRoute/shop/split".into(),
                        matches: vec![proto::RouteMatch {
                            path_kind: proto::route_match::PathKind::Exact as i32,
                            path: "/admin".into(),
                            ..Default::default()
                        }],
                        backends: vec![proto::WeightedBackend {
                            service: "shop/web-canary".into(),
                            port: 80,
                            weight: 10,
                            filters: Vec::new(),
                        }],
                        timeout_ms: 2000,
                        filters: vec![proto::RouteFilter {
                            filter: Some(proto::route_filter::Filter::RequestHeaders(
                                proto::HeaderModifier {
                                    set: [("x-canary".to_owned(), "yes".to_owned())].into(),
                                    ..Default::default()
                                },
                            )),
                        }],
                        ..Default::default()
                    }],
                },
            ),
            // Not a policy: left out.
            resource(
                "shop",
                &proto::Namespace {
                    name: "shop".into(),
                    mode: proto::PeerMode::Strict as i32,
                },
            ),
        ]);
        let dump = serde_json::to_value(Policies::of(&resources)).unwrap();

        let authorization = &dump["authorization"]["shop/deny-legacy"];
        assert_eq!(authorization["action"], "DENY", "{dump:#}");
        assert_eq!(authorization["workloads"], json!(["shop/web-0"]));
        assert_eq!(
            authorization["rules"][0]["from"][0]["notNamespaces"],
            json!(["shop"])
        );
        assert_eq!(authorization["rules"][0]["to"][0]["ports"], json!([8080]));

        let traffic = &dump["traffic"]["shop/web"];
        assert_eq!(traffic["loadBalancing"], "PEAK_EWMA", "{dump:#}");
        assert_eq!(traffic["idleTimeoutMs"], 3000);
        assert_eq!(traffic["retries"]["attempts"], 2);
        assert_eq!(traffic["retries"]["retryOn"], json!(["5xx"]));
        assert_eq!(traffic["limits"], json!(null));

        let rule = &dump["routes"]["shop/web:80"]["rules"][0];
        assert_eq!(rule["route"], "HTTPRoute/shop/split", "{dump:#}");
        assert_eq!(rule["matches"][0]["pathKind"], "EXACT");
        assert_eq!(rule["matches"][0]["path"], "/admin");
        assert_eq!(rule["backends"][0]["weight"], 10);
        assert_eq!(rule["timeoutMs"], 2000);
        assert_eq!(
            rule["filters"][0]["filter"]["requestHeaders"]["set"],
            json!({ "x-canary": "yes" })
        );

        let kinds: BTreeSet<&str> = dump
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            kinds,
            BTreeSet::from(["authorization", "routes", "traffic"])
        );
    }

    #[test]
    fn what_does_not_decode_is_named_and_the_rest_shown() {
        let mut broken = resource("shop/web", &proto::TrafficPolicy::default());
        broken.body = Bytes::from_static(&[0xff, 0xff, 0xff]);
        let mut unknown_enum = proto::AuthorizationPolicy {
            name: "odd".into(),
            ..Default::default()
        };
        unknown_enum.action = 7;
        let resources = resources(vec![broken, resource("shop/odd", &unknown_enum)]);
        let policies = Policies::of(&resources);
        assert!(policies.traffic.is_empty());
        assert_eq!(policies.undecodable.len(), 1, "{policies:?}");
        assert!(
            policies.undecodable[0].starts_with("weft.config.v1.TrafficPolicy shop/web: "),
            "{policies:?}"
        );
        let dump = serde_json::to_value(&policies).unwrap();
        assert_eq!(dump["authorization"]["shop/odd"]["action"], 7);
    }
}
