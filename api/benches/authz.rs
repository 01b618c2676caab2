//! What authorization adds to a connection and to a request: the evaluator over a
//! workload selected by 100 policies of 10 rules each (the agent's index hands it only
//! the policies selecting the destination, so this is the whole per-decision cost).
//!
//! Each case is the worst a caller gets: no rule matches until the last rule of the
//! last policy, so every rule of every policy is checked. Run with
//! `cargo bench -p weft-api --bench authz`; `cargo xtask bench` runs it and keeps its
//! output. Prints one line per case: `<case> <nanoseconds per decision>`.

use std::{
    hint::black_box,
    net::IpAddr,
    time::{Duration, Instant},
};

use weft_api::authz::{Caller, Policy, Request, Target, Traffic, evaluate};

/// 100 ALLOW policies of 10 rules each; only the very last rule admits `shop/client`.
fn policies() -> Vec<Policy> {
    (0..100)
        .map(|policy| {
            let rules: Vec<String> = (0..10)
                .map(|rule| {
                    let last = policy == 99 && rule == 9;
                    let namespace = if last { "shop".to_owned() } else { format!("team-{policy}-{rule}") };
                    format!(
                        "{{from: [{{namespaces: [{namespace}], principals: ['cluster.local/ns/{namespace}/*']}}], \
                         to: [{{ports: [8080, 9090], methods: [GET, POST], paths: ['/api/v{rule}/*', '/health']}}], \
                         when: [{{key: 'request.headers[x-tenant]', values: ['tenant-{policy}*']}}]}}"
                    )
                })
                .collect();
            let yaml = format!(
                "{{name: p{policy}, namespace: shop, workloads: [shop/web-0], rules: [{}]}}",
                rules.join(", ")
            );
            serde_yaml::from_str(&yaml).expect("the generated policy parses")
        })
        .collect()
}

/// Nanoseconds per call of `decide`, over at least half a second.
fn time(mut decide: impl FnMut() -> bool) -> f64 {
    for _ in 0..1000 {
        black_box(decide());
    }
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < Duration::from_millis(500) {
        for _ in 0..100 {
            black_box(decide());
        }
        calls += 100;
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn main() {
    let policies = policies();
    let target = Target {
        ip: IpAddr::from([10, 244, 0, 2]),
        port: 8080,
    };
    let caller = Caller {
        principal: Some("cluster.local/ns/shop/sa/client"),
        ip: Some(IpAddr::from([10, 244, 1, 5])),
    };
    let headers = vec![("x-tenant".to_owned(), "tenant-99-gold".to_owned())];
    let request = Request {
        method: "GET",
        path: "/api/v9/orders",
        host: "web.shop.svc.cluster.local",
        headers: &headers,
    };
    let allowed = evaluate(&policies, &caller, target, Traffic::Http(request));
    assert!(!allowed.denied(), "the last rule admits the caller");
    let cases: [(&str, Traffic<'_>); 3] = [
        ("connection_before_protocol", Traffic::Unknown),
        ("connection_tcp", Traffic::Tcp),
        ("request_http", Traffic::Http(request)),
    ];
    println!("# 100 policies x 10 rules selecting one workload, worst case (last rule matches)");
    for (case, traffic) in cases {
        let nanos = time(|| evaluate(&policies, &caller, target, traffic).denied());
        println!("{case} {nanos:.0}");
    }
    let none: Vec<Policy> = Vec::new();
    let nanos = time(|| evaluate(&none, &caller, target, Traffic::Http(request)).denied());
    println!("request_http_no_policy {nanos:.0}");
}
