use super::*;

type HeaderList = Vec<(String, String)>;

fn headers(pairs: &[(&str, &str)]) -> HeaderList {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn request<'a>(
    method: &'a str,
    target: &'a str,
    headers: &'a Vec<(String, String)>,
) -> Request<'a> {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    Request {
        method,
        path,
        query,
        headers,
    }
}

fn exact(name: &str, value: &str) -> ValueMatch {
    ValueMatch {
        name: name.to_owned(),
        value: ValueMatchKind::Exact(value.to_owned()),
    }
}

fn regex(name: &str, value: &str) -> ValueMatch {
    ValueMatch {
        name: name.to_owned(),
        value: ValueMatchKind::RegularExpression(Pattern::new(value).unwrap()),
    }
}

fn path(kind: &str, value: &str) -> Match {
    Match {
        path: match kind {
            "exact" => PathMatch::Exact(value.to_owned()),
            "prefix" => PathMatch::Prefix(value.to_owned()),
            _ => PathMatch::RegularExpression(Pattern::new(value).unwrap()),
        },
        ..Match::default()
    }
}

fn rule(name: &str, matches: Vec<Match>) -> Rule {
    Rule {
        route: "HTTPRoute/shop/web".to_owned(),
        name: name.to_owned(),
        matches,
        ..Rule::default()
    }
}

/// Rules sorted as the controller sorts them: by precedence, stable.
fn sorted(mut rules: Vec<Rule>) -> ServiceRoutes {
    rules.sort_by_key(|rule| std::cmp::Reverse(Precedence::of(&rule.matches[0])));
    ServiceRoutes {
        namespace: "shop".to_owned(),
        service: "web".to_owned(),
        port: 80,
        rules,
    }
}

#[test]
fn one_match_decides_by_each_of_its_parts() {
    let none = headers(&[]);
    let version = headers(&[("version", "v2"), ("x-build", "1234")]);
    let cases: Vec<(&str, Match, &str, &str, &HeaderList, bool)> = vec![
        ("exact path", path("exact", "/a"), "GET", "/a", &none, true),
        (
            "exact path is not a prefix",
            path("exact", "/a"),
            "GET",
            "/a/b",
            &none,
            false,
        ),
        (
            "prefix by segment",
            path("prefix", "/a"),
            "GET",
            "/a/b",
            &none,
            true,
        ),
        (
            "prefix itself",
            path("prefix", "/a"),
            "GET",
            "/a",
            &none,
            true,
        ),
        (
            "prefix is not a string prefix",
            path("prefix", "/a"),
            "GET",
            "/ab",
            &none,
            false,
        ),
        (
            "prefix with a trailing slash",
            path("prefix", "/a/"),
            "GET",
            "/a",
            &none,
            true,
        ),
        (
            "root prefix",
            path("prefix", "/"),
            "GET",
            "/anything",
            &none,
            true,
        ),
        (
            "regex whole path",
            path("regex", "/v[0-9]+/.*"),
            "GET",
            "/v2/x",
            &none,
            true,
        ),
        (
            "regex is anchored",
            path("regex", "/v[0-9]+"),
            "GET",
            "/v2/x",
            &none,
            false,
        ),
        (
            "method",
            Match {
                method: Some("POST".into()),
                ..Match::default()
            },
            "GET",
            "/",
            &none,
            false,
        ),
        (
            "header exact",
            Match {
                headers: vec![exact("version", "v2")],
                ..Match::default()
            },
            "GET",
            "/",
            &version,
            true,
        ),
        (
            "header missing",
            Match {
                headers: vec![exact("version", "v2")],
                ..Match::default()
            },
            "GET",
            "/",
            &none,
            false,
        ),
        (
            "every header must match",
            Match {
                headers: vec![exact("version", "v2"), exact("x-build", "9")],
                ..Match::default()
            },
            "GET",
            "/",
            &version,
            false,
        ),
        (
            "header regex",
            Match {
                headers: vec![regex("x-build", "[0-9]{4}")],
                ..Match::default()
            },
            "GET",
            "/",
            &version,
            true,
        ),
        (
            "query exact",
            Match {
                query_params: vec![exact("animal", "whale")],
                ..Match::default()
            },
            "GET",
            "/?color=blue&animal=whale",
            &none,
            true,
        ),
        (
            "query names are case-sensitive",
            Match {
                query_params: vec![exact("animal", "whale")],
                ..Match::default()
            },
            "GET",
            "/?Animal=whale",
            &none,
            false,
        ),
        (
            "query regex",
            Match {
                query_params: vec![regex("id", "[a-f0-9]+")],
                ..Match::default()
            },
            "GET",
            "/?id=beef",
            &none,
            true,
        ),
    ];
    for (what, matched, method, target, headers, expected) in cases {
        assert_eq!(
            matched.matches(&request(method, target, headers)),
            expected,
            "{what}"
        );
    }
}

#[test]
fn precedence_is_exact_then_longest_prefix_then_method_headers_and_query() {
    let routes = sorted(vec![
        rule("root", vec![path("prefix", "/")]),
        rule("regex", vec![path("regex", "/v2/.*")]),
        rule("v2", vec![path("prefix", "/v2")]),
        rule("v2-exact", vec![path("exact", "/v2")]),
        rule("v2-longer", vec![path("prefix", "/v2/admin")]),
        rule(
            "post",
            vec![Match {
                method: Some("POST".into()),
                ..path("prefix", "/v2")
            }],
        ),
        rule(
            "header",
            vec![Match {
                headers: vec![exact("version", "two")],
                ..path("prefix", "/v2")
            }],
        ),
        rule(
            "header-and-query",
            vec![Match {
                headers: vec![exact("version", "two")],
                query_params: vec![exact("q", "1")],
                ..path("prefix", "/v2")
            }],
        ),
    ]);
    let none = headers(&[]);
    let version = headers(&[("version", "two")]);
    let cases = [
        ("GET", "/v2", &none, "v2-exact"),
        ("GET", "/v2/x", &none, "v2"),
        ("GET", "/v2/admin/x", &none, "v2-longer"),
        ("POST", "/v2/x", &version, "post"),
        ("GET", "/v2/x", &version, "header"),
        ("GET", "/v2/x?q=1", &version, "header-and-query"),
        ("GET", "/other", &none, "root"),
    ];
    for (method, target, headers, expected) in cases {
        let selected = routes
            .select("shop", &request(method, target, headers))
            .unwrap();
        assert_eq!(selected.rule.name, expected, "{method} {target}");
    }
    // A regular expression ranks after every prefix, the root's included.
    let names: Vec<&str> = routes.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names.last(), Some(&"regex"), "{names:?}");
}

#[test]
fn equal_precedence_keeps_the_given_order_and_no_match_selects_nothing() {
    let first = Rule {
        route: "HTTPRoute/shop/older".into(),
        ..rule("0", vec![path("prefix", "/a")])
    };
    let second = Rule {
        route: "HTTPRoute/shop/newer".into(),
        ..rule("0", vec![path("prefix", "/a")])
    };
    let routes = sorted(vec![first, second]);
    let none = headers(&[]);
    let selected = routes.select("shop", &request("GET", "/a", &none)).unwrap();
    assert_eq!(selected.rule.route, "HTTPRoute/shop/older");
    assert!(
        routes
            .select("shop", &request("GET", "/b", &none))
            .is_none()
    );
}

#[test]
fn a_rule_matching_what_an_earlier_one_takes_is_shadowed() {
    let with = |mut matched: Match, method: Option<&str>, headers: Vec<ValueMatch>| {
        matched.method = method.map(str::to_owned);
        matched.headers = headers;
        matched
    };
    let canary = || vec![exact("x-canary", "yes"), regex("x-user", "a.*")];
    let routes = sorted(vec![
        rule("all", vec![Match::default()]),
        rule(
            "api",
            vec![with(path("prefix", "/api"), Some("GET"), canary())],
        ),
        // The same conditions in another order, the prefix with its slash: shadowed.
        rule(
            "api-again",
            vec![with(
                path("prefix", "/api/"),
                Some("GET"),
                canary().into_iter().rev().collect(),
            )],
        ),
        // Another method, or one header fewer: reached.
        rule(
            "api-post",
            vec![with(path("prefix", "/api"), Some("POST"), canary())],
        ),
        rule(
            "api-fewer",
            vec![with(
                path("prefix", "/api"),
                Some("GET"),
                vec![exact("x-canary", "yes")],
            )],
        ),
        // Only one of its matches is taken by an earlier rule: reached.
        rule("partly", vec![Match::default(), path("exact", "/health")]),
        rule("everything-again", vec![path("prefix", "/")]),
    ]);
    let name = |index: usize| routes.rules[index].name.as_str();
    let found: Vec<(&str, &str)> = routes
        .shadowed()
        .into_iter()
        .map(|(shadowed, by)| (name(shadowed), name(by)))
        .collect();
    assert_eq!(found, [("api-again", "api"), ("everything-again", "all")]);

    // A consumer route and a producer route do not shadow each other.
    let mut consumer = rule("mine", vec![Match::default()]);
    consumer.consumer_namespace = Some("front".to_owned());
    let routes = sorted(vec![rule("all", vec![Match::default()]), consumer]);
    assert!(routes.shadowed().is_empty());
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let producer = rule("producer", vec![path("prefix", "/")]);
    let consumer = Rule {
        route: "HTTPRoute/client-a/web".into(),
        consumer_namespace: Some("client-a".into()),
        ..rule("consumer", vec![path("prefix", "/only")])
    };
    let routes = sorted(vec![producer, consumer]);
    let none = headers(&[]);
    let pick = |namespace: &str, target: &str| {
        routes
            .select(namespace, &request("GET", target, &none))
            .map(|selected| selected.rule.name.clone())
    };
    assert_eq!(pick("client-a", "/only/x").as_deref(), Some("consumer"));
    // The consumer's namespace does not fall back to the producer's routes.
    assert_eq!(pick("client-a", "/other"), None);
    assert_eq!(pick("client-b", "/only/x").as_deref(), Some("producer"));
    assert_eq!(pick("shop", "/other").as_deref(), Some("producer"));

    // Consumer routes alone route nothing for other namespaces.
    let consumer_only = ServiceRoutes {
        rules: routes
            .rules
            .iter()
            .filter(|r| r.consumer_namespace.is_some())
            .cloned()
            .collect(),
        ..routes.clone()
    };
    assert!(consumer_only.applies_to("client-a"));
    assert!(!consumer_only.applies_to("client-b"));
    assert!(routes.applies_to("client-b"));
}

#[test]
fn weights_split_by_their_share_and_zero_weights_never_pick() {
    let backend = |name: &str, weight| Backend {
        target: Some(BackendRef {
            namespace: "shop".into(),
            service: name.into(),
            port: 80,
        }),
        weight,
        filters: Filters::default(),
    };
    let rule = Rule {
        backends: vec![backend("v1", 90), backend("none", 0), backend("v2", 10)],
        ..Rule::default()
    };
    assert_eq!(rule.total_weight(), 100);
    let picked = |point| {
        rule.backend_at(point)
            .and_then(|b| b.target.clone())
            .unwrap()
            .service
    };
    assert_eq!(picked(0), "v1");
    assert_eq!(picked(89), "v1");
    assert_eq!(picked(90), "v2");
    assert_eq!(picked(99), "v2");
    assert!(rule.backend_at(100).is_none());
    assert_eq!(Rule::default().total_weight(), 0);
}

#[test]
fn path_modifiers_replace_the_whole_path_or_the_matched_prefix() {
    let full = PathModifier::ReplaceFullPath("/one".into());
    let prefix = |to: &str| PathModifier::ReplacePrefixMatch(to.into());
    let cases = [
        (&full, "/prefix/x", Some("/prefix"), "/one"),
        (&prefix("/two"), "/prefix/x", Some("/prefix"), "/two/x"),
        (&prefix("/two"), "/prefix", Some("/prefix"), "/two"),
        (&prefix("/"), "/prefix/x", Some("/prefix"), "/x"),
        (&prefix("/"), "/prefix", Some("/prefix"), "/"),
        (&prefix("/two/"), "/prefix/x", Some("/prefix/"), "/two/x"),
    ];
    for (modifier, path, matched, expected) in cases {
        assert_eq!(
            modifier.apply(path, matched),
            expected,
            "{modifier:?} {path}"
        );
    }
}

#[test]
fn redirects_fill_in_from_the_request_and_omit_well_known_ports() {
    let origin = Origin {
        scheme: "http",
        host: "echo",
        port: 80,
        path: "/redirect/x",
        query: Some("a=1"),
    };
    let redirect = |scheme: Option<&str>, hostname: Option<&str>, port: Option<u16>| Redirect {
        scheme: scheme.map(str::to_owned),
        hostname: hostname.map(str::to_owned),
        port,
        path: None,
        status: 302,
    };
    let cases = [
        (redirect(None, None, None), "http://echo/redirect/x?a=1"),
        (
            redirect(Some("https"), None, None),
            "https://echo/redirect/x?a=1",
        ),
        (
            redirect(None, None, Some(8083)),
            "http://echo:8083/redirect/x?a=1",
        ),
        (
            redirect(Some("https"), None, Some(8443)),
            "https://echo:8443/redirect/x?a=1",
        ),
        (
            redirect(None, Some("example.org"), None),
            "http://example.org/redirect/x?a=1",
        ),
        (
            Redirect {
                path: Some(PathModifier::ReplacePrefixMatch("/moved".into())),
                ..redirect(None, None, None)
            },
            "http://echo/moved/x?a=1",
        ),
    ];
    for (redirect, expected) in cases {
        assert_eq!(
            redirect.location(&origin, Some("/redirect")),
            expected,
            "{redirect:?}"
        );
    }
    let on_8080 = Origin {
        port: 8080,
        ..origin
    };
    assert_eq!(
        redirect(None, None, None).location(&on_8080, None),
        "http://echo:8080/redirect/x?a=1"
    );
    // A scheme without a port means the scheme's port.
    assert_eq!(
        redirect(Some("https"), None, None).location(&on_8080, None),
        "https://echo/redirect/x?a=1"
    );
}

#[cfg(feature = "config")]
#[test]
fn routes_survive_the_wire_and_bad_entries_are_refused_by_name() {
    use crate::config::v1 as proto;

    let routes = ServiceRoutes {
        namespace: "shop".into(),
        service: "web".into(),
        port: 80,
        rules: vec![Rule {
            consumer_namespace: Some("client".into()),
            matches: vec![Match {
                headers: vec![regex("x-build", "[0-9]+")],
                query_params: vec![exact("q", "1")],
                method: Some("GET".into()),
                ..path("regex", "/v[0-9]/.*")
            }],
            filters: Filters {
                request_headers: Some(HeaderModifier {
                    set: vec![("a".into(), "1".into())],
                    add: vec![("b".into(), "2".into())],
                    remove: vec!["c".into()],
                }),
                redirect: Some(Redirect {
                    scheme: Some("https".into()),
                    hostname: None,
                    port: Some(8443),
                    path: Some(PathModifier::ReplaceFullPath("/x".into())),
                    status: 301,
                }),
                mirrors: vec![Mirror {
                    backend: BackendRef {
                        namespace: "shop".into(),
                        service: "shadow".into(),
                        port: 80,
                    },
                    numerator: 1,
                    denominator: 2,
                }],
                fault: Some(Fault {
                    delay: Some((Duration::from_millis(250), 10)),
                    abort: Some((
                        Abort {
                            http_status: Some(503),
                            grpc_status: Some(14),
                        },
                        5,
                    )),
                }),
                ..Filters::default()
            },
            backends: vec![
                Backend {
                    target: None,
                    weight: 1,
                    filters: Filters::default(),
                },
                Backend {
                    target: Some(BackendRef {
                        namespace: "shop".into(),
                        service: "v2".into(),
                        port: 8080,
                    }),
                    weight: 3,
                    filters: Filters {
                        rewrite: Some(Rewrite {
                            hostname: Some("v2".into()),
                            path: Some(PathModifier::ReplacePrefixMatch("/".into())),
                        }),
                        ..Filters::default()
                    },
                },
            ],
            timeouts: Timeouts {
                request: Some(Duration::from_millis(1500)),
                backend_request: Some(Duration::from_millis(500)),
            },
            ..rule("named", Vec::new())
        }],
    };
    let wire = proto::ServiceRoutes::from(&routes);
    assert_eq!(ServiceRoutes::try_from(&wire).unwrap(), routes);

    let mut bad = wire.clone();
    bad.rules[0].matches[0].headers[0].value = "(".into();
    let error = ServiceRoutes::try_from(&bad).unwrap_err();
    assert!(
        error.starts_with("rules[0]: matches[0]: \"(\" is not a regular expression"),
        "{error}"
    );
    let mut bad = wire;
    bad.rules[0]
        .filters
        .push(proto::RouteFilter { filter: None });
    let error = ServiceRoutes::try_from(&bad).unwrap_err();
    assert!(
        error.contains("filters: [4]: a filter this agent does not know"),
        "{error}"
    );
}

#[test]
fn a_fault_hits_the_share_of_requests_its_percentages_say() {
    let abort = Abort {
        http_status: Some(503),
        grpc_status: None,
    };
    let fault = Fault {
        delay: Some((Duration::from_secs(1), 30)),
        abort: Some((abort, 100)),
    };
    // Each roll answers one percentage in turn: the delay's, then the abort's.
    let decide = |rolls: [u32; 2]| {
        let mut rolls = rolls.into_iter();
        fault.decide(|| rolls.next().unwrap())
    };
    assert_eq!(
        decide([29, 99]),
        Injected {
            delay: Some(Duration::from_secs(1)),
            abort: Some(abort),
        }
    );
    assert_eq!(decide([30, 0]).delay, None, "30 % is rolls 0 to 29");
    let never = Fault {
        abort: Some((abort, 0)),
        ..Fault::default()
    };
    assert_eq!(never.decide(|| 0), Injected::default());
}
