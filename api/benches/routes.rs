//! What routing adds to a request: choosing the rule among a service's routes
//! ([`ServiceRoutes::select`]) and a backend by weight, as the client's agent does for
//! every request to a routed service.
//!
//! The worst cases have 100 rules, each with a path prefix, a header and a query
//! parameter to check, and only the last rule matches (once with plain values, once with
//! regular expressions); the typical case has 5 rules and the first matches. Run with
//! `cargo bench -p weft-api --bench routes`; `cargo xtask bench` runs it and keeps its
//! output. Prints one line per case: `<case> <nanoseconds per request>`.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use weft_api::routes::{
    Backend, BackendRef, Filters, Match, PathMatch, Pattern, Request, Rule, ServiceRoutes,
    ValueMatch, ValueMatchKind,
};

/// `count` rules; rule `i` needs path `/api/v<i>/…`, header `x-tenant: tenant-<i>` and
/// query `region=r<i>`, written as plain values or as regular expressions.
fn routes(count: usize, regex: bool) -> ServiceRoutes {
    let value = |text: String| {
        if regex {
            ValueMatchKind::RegularExpression(Pattern::new(&format!("{text}(-[a-z]+)?")).unwrap())
        } else {
            ValueMatchKind::Exact(text)
        }
    };
    let rules = (0..count)
        .map(|index| Rule {
            route: "HTTPRoute/shop/web".into(),
            name: index.to_string(),
            matches: vec![Match {
                path: if regex {
                    PathMatch::RegularExpression(
                        Pattern::new(&format!("/api/v{index}/[a-z]+")).unwrap(),
                    )
                } else {
                    PathMatch::Prefix(format!("/api/v{index}"))
                },
                method: Some("GET".into()),
                headers: vec![ValueMatch {
                    name: "x-tenant".into(),
                    value: value(format!("tenant-{index}")),
                }],
                query_params: vec![ValueMatch {
                    name: "region".into(),
                    value: value(format!("r{index}")),
                }],
            }],
            backends: ["v1", "v2"]
                .map(|version| Backend {
                    target: Some(BackendRef {
                        namespace: "shop".into(),
                        service: format!("web-{version}"),
                        port: 80,
                    }),
                    weight: 50,
                    filters: Filters::default(),
                })
                .to_vec(),
            ..Rule::default()
        })
        .collect();
    ServiceRoutes {
        namespace: "shop".into(),
        service: "web".into(),
        port: 80,
        rules,
    }
}

/// Nanoseconds per call of `route`, over at least half a second.
fn time(mut route: impl FnMut() -> bool) -> f64 {
    for _ in 0..1000 {
        black_box(route());
    }
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < Duration::from_millis(500) {
        for _ in 0..100 {
            black_box(route());
        }
        calls += 100;
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn main() {
    println!("# rule selection and weighted split per request, nanoseconds");
    let cases = [
        ("select_5_rules_first_matches", 5, false, 0),
        ("select_100_rules_last_matches", 100, false, 99),
        ("select_100_regex_rules_last_matches", 100, true, 99),
    ];
    for (case, count, regex, matching) in cases {
        let routes = routes(count, regex);
        let headers = vec![("x-tenant".to_owned(), format!("tenant-{matching}"))];
        let path = format!("/api/v{matching}/orders");
        let query = format!("page=2&region=r{matching}");
        let request = Request {
            method: "GET",
            path: &path,
            query: Some(&query),
            headers: &headers,
        };
        let selected = routes.select("shop", &request).expect("a rule matches");
        assert_eq!(selected.rule.name, matching.to_string());
        let mut point = 0u64;
        let nanos = time(|| {
            let Some(selected) = routes.select("shop", &request) else {
                return false;
            };
            point = (point + 37) % selected.rule.total_weight();
            selected.rule.backend_at(point).is_some()
        });
        println!("{case} {nanos:.0}");
    }
}
