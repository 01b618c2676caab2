//! Table tests of the evaluator: every rule kind, the `not` forms, precedence, dry run,
//! audit, and plaintext callers against principal rules.

use std::net::IpAddr;

use super::*;

const CLIENT: &str = "cluster.local/ns/shop/sa/client";
const OTHER: &str = "cluster.local/ns/ops/sa/admin";
const CLIENT_IP: &str = "10.244.1.5";
const POD: Target = Target {
    ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 0, 2)),
    port: 8080,
};

/// A policy from YAML, as the agent's configuration file writes one.
fn policy(yaml: &str) -> Policy {
    serde_yaml::from_str(yaml).unwrap_or_else(|err| panic!("{yaml}: {err}"))
}

fn caller(principal: Option<&'static str>, ip: &str) -> Caller<'static> {
    Caller {
        principal,
        ip: Some(ip.parse().unwrap()),
    }
}

static NO_HEADERS: Vec<(String, String)> = Vec::new();

fn get(path: &'static str) -> Request<'static> {
    request("GET", path, &NO_HEADERS)
}

fn request(
    method: &'static str,
    path: &'static str,
    headers: &'static Vec<(String, String)>,
) -> Request<'static> {
    Request {
        method,
        path,
        host: "echo.shop.svc.cluster.local:80",
        headers,
    }
}

fn verdict(policies: &[Policy], caller: &Caller<'_>, traffic: Traffic<'_>) -> Verdict {
    evaluate(policies, caller, POD, traffic).verdict
}

#[test]
fn source_fields_and_their_not_forms() {
    let cases = [
        ("principals: [cluster.local/ns/shop/sa/client]", true, false),
        (
            "principals: [spiffe://cluster.local/ns/shop/sa/client]",
            true,
            false,
        ),
        ("principals: [cluster.local/ns/shop/*]", true, false),
        ("principals: ['*']", true, true),
        (
            "notPrincipals: [cluster.local/ns/shop/sa/client]",
            false,
            true,
        ),
        ("namespaces: [shop]", true, false),
        ("namespaces: ['sh*']", true, false),
        ("notNamespaces: [shop]", false, true),
        ("serviceAccounts: [shop/client]", true, false),
        ("notServiceAccounts: [shop/client]", false, true),
        ("ipBlocks: [10.244.1.0/24]", true, false),
        ("ipBlocks: [10.244.1.5]", true, false),
        ("notIpBlocks: [10.244.0.0/16]", false, false),
        ("{principals: ['*'], notNamespaces: [ops]}", true, false),
    ];
    for (source, client_matches, other_matches) in cases {
        let policies = [policy(&format!(
            "{{name: p, namespace: shop, action: ALLOW, rules: [{{from: [{source}]}}]}}"
        ))];
        let expect = |matches| {
            if matches {
                Verdict::Allow
            } else {
                Verdict::Deny
            }
        };
        let client = caller(Some(CLIENT), CLIENT_IP);
        assert_eq!(
            verdict(&policies, &client, Traffic::Tcp),
            expect(client_matches),
            "{source}: the client"
        );
        let other = caller(Some(OTHER), "10.244.2.9");
        assert_eq!(
            verdict(&policies, &other, Traffic::Tcp),
            expect(other_matches),
            "{source}: the other caller"
        );
    }
}

#[test]
fn plaintext_matches_no_identity_rule_and_every_not_form_of_one() {
    let plaintext = caller(None, CLIENT_IP);
    let cases = [
        (
            "action: ALLOW, rules: [{from: [{principals: ['*']}]}]",
            Verdict::Deny,
        ),
        (
            "action: ALLOW, rules: [{from: [{namespaces: [shop]}]}]",
            Verdict::Deny,
        ),
        (
            "action: ALLOW, rules: [{from: [{ipBlocks: [10.244.1.0/24]}]}]",
            Verdict::Allow,
        ),
        (
            "action: DENY, rules: [{from: [{notPrincipals: ['*']}]}]",
            Verdict::Deny,
        ),
        (
            "action: DENY, rules: [{from: [{principals: ['*']}]}]",
            Verdict::Allow,
        ),
        (
            "action: DENY, rules: [{from: [{notNamespaces: [shop]}]}]",
            Verdict::Deny,
        ),
    ];
    for (spec, expected) in cases {
        let policies = [policy(&format!("{{name: p, namespace: shop, {spec}}}"))];
        assert_eq!(
            verdict(&policies, &plaintext, Traffic::Tcp),
            expected,
            "{spec}"
        );
    }
}

#[test]
fn operations_ports_methods_paths_hosts_and_not_forms() {
    let client = caller(Some(CLIENT), CLIENT_IP);
    let cases = [
        ("ports: [8080]", get("/"), true),
        ("ports: [9090]", get("/"), false),
        ("notPorts: [8080]", get("/"), false),
        ("methods: [GET, HEAD]", get("/"), true),
        ("notMethods: [GET]", get("/"), false),
        ("paths: [/public]", get("/public"), true),
        ("paths: [/public]", get("/public/x"), false),
        ("paths: ['/public/*']", get("/public/x"), true),
        ("paths: ['*.png']", get("/a/b.png"), true),
        ("notPaths: ['/admin*']", get("/admin/users"), false),
        ("paths: ['*']", get("/anything"), true),
        ("hosts: [echo.shop.svc.cluster.local]", get("/"), true),
        ("hosts: [ECHO.shop.svc.cluster.local]", get("/"), true),
        ("hosts: ['*.svc.cluster.local:80']", get("/"), true),
        ("hosts: ['other*']", get("/"), false),
        ("notHosts: ['echo.*']", get("/"), false),
        ("{methods: [POST], paths: [/admin]}", get("/admin"), false),
    ];
    for (operation, request, matches) in cases {
        let policies = [policy(&format!(
            "{{name: p, namespace: shop, rules: [{{to: [{operation}]}}]}}"
        ))];
        let expected = if matches {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        assert_eq!(
            verdict(&policies, &client, Traffic::Http(request)),
            expected,
            "{operation} for {request:?}"
        );
    }
}

#[test]
fn conditions_on_headers_addresses_ports_and_identity() {
    static HEADERS: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
        vec![
            ("X-Team".to_owned(), "payments".to_owned()),
            ("user-agent".to_owned(), "curl/8.5".to_owned()),
        ]
    });
    let client = caller(Some(CLIENT), CLIENT_IP);
    let cases = [
        ("{key: 'request.headers[x-team]', values: [payments]}", true),
        ("{key: 'request.headers[X-Team]', values: ['pay*']}", true),
        (
            "{key: 'request.headers[x-team]', notValues: [payments]}",
            false,
        ),
        ("{key: 'request.headers[x-missing]', values: ['*']}", false),
        ("{key: 'request.headers[x-missing]', notValues: [a]}", true),
        ("{key: source.ip, values: [10.244.1.0/24]}", true),
        ("{key: source.ip, notValues: [10.244.1.5]}", false),
        ("{key: source.namespace, values: [shop]}", true),
        (
            "{key: source.principal, values: ['spiffe://cluster.local/ns/shop/*']}",
            true,
        ),
        ("{key: destination.port, values: ['8080']}", true),
        ("{key: destination.port, values: ['80']}", false),
        ("{key: destination.ip, values: [10.244.0.0/24]}", true),
    ];
    for (condition, matches) in cases {
        let policies = [policy(&format!(
            "{{name: p, namespace: shop, rules: [{{when: [{condition}]}}]}}"
        ))];
        let expected = if matches {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        let request = request("GET", "/", &HEADERS);
        assert_eq!(
            verdict(&policies, &client, Traffic::Http(request)),
            expected,
            "{condition}"
        );
    }
}

#[test]
fn istio_order_deny_then_allow_then_the_default() {
    let client = caller(Some(CLIENT), CLIENT_IP);
    let allow_client = "{name: allow, namespace: shop, rules: [{from: [{namespaces: [shop]}]}]}";
    let allow_ops = "{name: ops, namespace: shop, rules: [{from: [{namespaces: [ops]}]}]}";
    let deny_client =
        "{name: deny, namespace: shop, action: DENY, rules: [{from: [{namespaces: [shop]}]}]}";
    let deny_nothing = "{name: deny-nothing, namespace: shop, action: DENY}";
    let allow_nothing = "{name: allow-nothing, namespace: shop}";
    let allow_all = "{name: allow-all, namespace: shop, rules: [{}]}";
    let cases: [(&[&str], Verdict, &str); 8] = [
        (&[], Verdict::Allow, "default allow"),
        (&[deny_nothing], Verdict::Allow, "default allow"),
        (&[allow_client], Verdict::Allow, "shop/allow"),
        (&[allow_ops], Verdict::Deny, "default deny"),
        (&[allow_ops, allow_client], Verdict::Allow, "shop/allow"),
        (&[allow_client, deny_client], Verdict::Deny, "shop/deny"),
        (&[allow_nothing], Verdict::Deny, "default deny"),
        (
            &[allow_nothing, allow_all],
            Verdict::Allow,
            "shop/allow-all",
        ),
    ];
    for (specs, expected, by) in cases {
        let policies: Vec<Policy> = specs.iter().map(|spec| policy(spec)).collect();
        let decision = evaluate(&policies, &client, POD, Traffic::Tcp);
        assert_eq!(
            (decision.verdict, decision.decided_by().as_str()),
            (expected, by),
            "{specs:?}"
        );
    }
}

#[test]
fn http_conditions_on_tcp_deny_whole_connections_and_never_allow() {
    let client = caller(Some(CLIENT), CLIENT_IP);
    let deny_admin = policy(
        "{name: deny-admin, namespace: shop, action: DENY, rules: [{to: [{paths: ['/admin*']}]}]}",
    );
    let allow_get = policy("{name: allow-get, namespace: shop, rules: [{to: [{methods: [GET]}]}]}");
    let cases = [
        (&deny_admin, Traffic::Tcp, Verdict::Deny),
        (&deny_admin, Traffic::Unknown, Verdict::DependsOnRequest),
        (&deny_admin, Traffic::Http(get("/public")), Verdict::Allow),
        (&deny_admin, Traffic::Http(get("/admin/x")), Verdict::Deny),
        (&allow_get, Traffic::Tcp, Verdict::Deny),
        (&allow_get, Traffic::Unknown, Verdict::DependsOnRequest),
        (&allow_get, Traffic::Http(get("/")), Verdict::Allow),
        (
            &allow_get,
            Traffic::Http(request("POST", "/", &NO_HEADERS)),
            Verdict::Deny,
        ),
    ];
    for (policy, traffic, expected) in cases {
        assert_eq!(
            verdict(std::slice::from_ref(policy), &client, traffic),
            expected,
            "{} on {traffic:?}",
            policy.name
        );
    }
}

#[test]
fn before_a_request_only_identity_decides_what_it_can() {
    // An ALLOW whose rule names another namespace cannot match, whatever the request:
    // the connection is refused before a byte is read.
    let policies = [policy(
        "{name: p, namespace: shop, rules: [{from: [{namespaces: [ops]}], to: [{methods: [GET]}]}]}",
    )];
    let client = caller(Some(CLIENT), CLIENT_IP);
    assert_eq!(verdict(&policies, &client, Traffic::Unknown), Verdict::Deny);
    let other = caller(Some(OTHER), CLIENT_IP);
    assert_eq!(
        verdict(&policies, &other, Traffic::Unknown),
        Verdict::DependsOnRequest
    );
}

#[test]
fn audit_decides_nothing_and_is_reported() {
    let client = caller(Some(CLIENT), CLIENT_IP);
    let policies = [
        policy(
            "{name: audit, namespace: shop, action: AUDIT, rules: [{to: [{paths: ['/admin*']}]}]}",
        ),
        policy("{name: audit-all, namespace: shop, action: AUDIT, rules: [{}]}"),
    ];
    let decision = evaluate(&policies, &client, POD, Traffic::Http(get("/admin")));
    assert_eq!(decision.verdict, Verdict::Allow);
    let audited: Vec<String> = decision.audited.iter().map(|m| m.policy.key()).collect();
    assert_eq!(audited, ["shop/audit", "shop/audit-all"]);
    let decision = evaluate(&policies, &client, POD, Traffic::Http(get("/")));
    assert_eq!(decision.audited.len(), 1);
}

#[test]
fn dry_run_is_evaluated_apart_and_never_enforced() {
    let client = caller(Some(CLIENT), CLIENT_IP);
    let policies = [
        policy("{name: shadow-deny, namespace: shop, action: DENY, dryRun: true, rules: [{}]}"),
        policy(
            "{name: shadow-allow-ops, namespace: shop, dryRun: true, rules: [{from: [{namespaces: [ops]}]}]}",
        ),
    ];
    let decision = evaluate(&policies, &client, POD, Traffic::Tcp);
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.reason, Reason::NoPolicy);
    let (verdict, reason) = decision.dry_run.expect("a dry-run decision");
    assert_eq!(verdict, Verdict::Deny);
    assert!(matches!(reason, Reason::Matched(m) if m.policy.name == "shadow-deny"));
    // Alone, the dry-run ALLOW would deny by default.
    let decision = evaluate(&policies[1..], &client, POD, Traffic::Tcp);
    assert_eq!(
        decision.dry_run,
        Some((Verdict::Deny, Reason::NoAllowMatched))
    );
}

#[test]
fn explain_names_the_policy_and_rule_or_the_default() {
    let client = caller(Some(CLIENT), CLIENT_IP);
    let policies = [
        policy(
            "{name: deny-admin, namespace: shop, action: DENY, rules: [{to: [{paths: [/x]}]}, {to: [{paths: ['/admin*']}]}]}",
        ),
        policy("{name: allow-shop, namespace: shop, rules: [{from: [{namespaces: [shop]}]}]}"),
    ];
    let denied = explain(&policies, &client, POD, Traffic::Http(get("/admin")));
    assert_eq!(denied.decision, Verdict::Deny);
    assert_eq!(denied.policy.as_deref(), Some("shop/deny-admin"));
    assert_eq!(denied.rule, Some(1));
    assert!(denied.reason.contains("spec.rules[1]"), "{}", denied.reason);
    assert_eq!(denied.policies.len(), 2);
    let other = caller(Some(OTHER), CLIENT_IP);
    let by_default = explain(&policies, &other, POD, Traffic::Http(get("/")));
    assert_eq!(by_default.decision, Verdict::Deny);
    assert_eq!(by_default.policy, None);
    assert!(
        by_default.reason.starts_with("denied by default"),
        "{}",
        by_default.reason
    );
}

#[test]
fn patterns_blocks_and_keys_reject_what_they_cannot_mean() {
    for bad in ["", "a*b", "**x"] {
        assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
    }
    for bad in ["10.0.0.0/33", "10.0.0", "::1/129", "x/8"] {
        assert!(bad.parse::<IpBlock>().is_err(), "{bad:?}");
    }
    assert!(
        "fd00::/8"
            .parse::<IpBlock>()
            .unwrap()
            .contains("fd12::1".parse().unwrap())
    );
    assert!(
        "0.0.0.0/0"
            .parse::<IpBlock>()
            .unwrap()
            .contains("1.2.3.4".parse().unwrap())
    );
    assert!(
        !"10.0.0.0/8"
            .parse::<IpBlock>()
            .unwrap()
            .contains("::1".parse().unwrap())
    );
    for bad in [
        "request.headers[]",
        "request.auth.claims[iss]",
        "source.port",
    ] {
        assert!(bad.parse::<Key>().is_err(), "{bad:?}");
    }
    assert!(Condition::parse("source.ip", &[], &[]).is_err());
    assert!(Condition::parse("destination.port", &["http".to_owned()], &[]).is_err());
    assert!(principal("cluster.local/ns/a").is_err());
    assert_eq!(service_account("client", "shop").unwrap(), "shop/client");
    assert!(service_account("Shop/x", "shop").is_err());
}

/// Two pods and a service, the second pod selected by one policy.
struct Mesh {
    policies: Vec<Policy>,
}

impl query::Directory for Mesh {
    fn pod(&self, namespace: &str, name: &str) -> Option<query::Pod> {
        [
            ("shop", "client", CLIENT_IP, CLIENT),
            (
                "shop",
                "echo-0",
                "10.244.0.2",
                "cluster.local/ns/shop/sa/echo",
            ),
        ]
        .into_iter()
        .find(|(ns, n, _, _)| (*ns, *n) == (namespace, name))
        .map(|(ns, n, ip, principal)| query::Pod {
            name: format!("{ns}/{n}"),
            ip: ip.parse().unwrap(),
            principal: principal.to_owned(),
        })
    }

    fn pod_at(&self, ip: IpAddr) -> Option<query::Pod> {
        ["client", "echo-0"]
            .into_iter()
            .filter_map(|name| self.pod("shop", name))
            .find(|pod| pod.ip == ip)
    }

    fn service_endpoints(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Option<Vec<std::net::SocketAddr>> {
        ((namespace, name, port) == ("shop", "echo", 80)).then(|| {
            vec![
                "10.244.0.2:8080".parse().unwrap(),
                "10.244.9.9:8080".parse().unwrap(),
            ]
        })
    }

    fn policies(&self, ip: IpAddr) -> Result<Vec<&Policy>, String> {
        if ip == POD.ip {
            Ok(self.policies.iter().collect())
        } else {
            Err("another node's agent decides".to_owned())
        }
    }
}

#[test]
fn explain_queries_resolve_pods_services_and_requests() {
    let mesh = Mesh {
        policies: vec![policy(
            "{name: get-only, namespace: shop, rules: [{to: [{methods: [GET], paths: ['/public*']}]}]}",
        )],
    };
    let ask = |query: &str| {
        query::answer(&mesh, &query::Query::parse(query).unwrap())
            .unwrap_or_else(|err| panic!("{query}: {err}"))
    };
    let answer = ask(
        "source_pod=shop/client&destination_service=shop/echo&port=80&method=POST&path=%2Fadmin",
    );
    assert_eq!(
        answer.source,
        "pod shop/client (spiffe://cluster.local/ns/shop/sa/client)"
    );
    assert_eq!(answer.destinations.len(), 2);
    let first = &answer.destinations[0];
    assert_eq!(first.pod, "shop/echo-0");
    assert_eq!(first.explanation.as_ref().unwrap().decision, Verdict::Deny);
    assert_eq!(
        answer.destinations[1].unknown.as_deref(),
        Some("another node's agent decides")
    );
    let allowed = ask(
        "source_ip=10.244.1.5&destination_pod=shop/echo-0&port=8080&method=GET&path=/public/x?y=1",
    );
    let explanation = allowed.destinations[0].explanation.as_ref().unwrap();
    assert_eq!(
        (explanation.decision, explanation.policy.as_deref()),
        (Verdict::Allow, Some("shop/get-only"))
    );
    let tcp = ask(
        "source_principal=spiffe://cluster.local/ns/ops/sa/admin&destination_ip=10.244.0.2&port=8080",
    );
    assert_eq!(
        tcp.destinations[0].explanation.as_ref().unwrap().decision,
        Verdict::Deny
    );
    let plaintext = ask("source_ip=192.168.1.1&destination_pod=shop/echo-0&port=8080");
    assert_eq!(plaintext.source, "plaintext from 192.168.1.1");
    for (bad, says) in [
        (
            "destination_pod=shop/echo-0&port=80",
            "give exactly one of source_pod",
        ),
        (
            "source_pod=shop/client&destination_pod=shop/echo-0",
            "port:",
        ),
        (
            "source_pod=shop/nobody&destination_pod=shop/echo-0&port=1",
            "source_pod: no meshed pod",
        ),
        (
            "source_pod=shop/client&destination_pod=shop/echo-0&port=1&method=GET",
            "method and path",
        ),
    ] {
        let error = query::answer(&mesh, &query::Query::parse(bad).unwrap()).unwrap_err();
        assert!(error.contains(says), "{bad}: {error}");
    }
    assert!(
        query::Query::parse("colour=blue")
            .unwrap_err()
            .starts_with("colour: not a parameter")
    );
    assert!(
        query::Query::parse("source_ip=nope")
            .unwrap_err()
            .contains("not an IP")
    );
}
