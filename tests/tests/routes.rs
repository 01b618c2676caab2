//! Gateway API routing in the mesh (GAMMA), on a 2-node local cluster with curl as the
//! client: the cases of the Gateway API's mesh conformance tests (v1.6.1, see
//! `docs/gamma-conformance.md` for the list and what each checks), written in our own
//! code with the same resources and expectations, plus the checks upstream leaves out
//! (the rewritten path, the redirect `Location`) and extended features it does not
//! cover (response header modifier, hostname rewrite, method matching, timeouts, a
//! backend that does not exist, weight changes under load).
//!
//! One cluster serves every case: the resources of each upstream test are applied in
//! turn, as the upstream suite applies its manifests, and each case is polled until it
//! holds (the configuration takes a moment to reach the agents), then checked again.

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use weft_cluster::{Cluster, PodSpec};
use weft_e2e::{
    TestCluster, agent_metrics, clean_wrk_report, grpc_load_report, plausible_share, samples,
    wait_until, workspace_bin,
};

const NS: &str = "gamma";
const CONSUMER: &str = "gamma-consumer";
const ECHO: &str = "10.96.1.10";
const ECHO_V1: &str = "10.96.1.11";
const ECHO_V2: &str = "10.96.1.12";
const CONVERGE: Duration = Duration::from_secs(30);

/// Request headers a case sends.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// The upstream suite's base resources: `echo` selects both versions, `echo-v1` and
/// `echo-v2` one each; every service has an HTTP port 80, an `http-alt` port 8080 and
/// a gRPC port 7070.
fn base() -> String {
    let service = |name: &str, ip: &str, selector: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: gamma }}\nspec:\n  clusterIP: {ip}\n  selector: {{ {selector} }}\n  ports:\n    - {{ name: http, port: 80, targetPort: 8080, appProtocol: http }}\n    - {{ name: http-alt, port: 8080, appProtocol: http }}\n    - {{ name: grpc, port: 7070, targetPort: 8080, appProtocol: kubernetes.io/h2c }}\n"
        )
    };
    format!(
        "{NAMESPACES}{}{}{}",
        service("echo", ECHO, "app: echo"),
        service("echo-v1", ECHO_V1, "app: echo, version: v1"),
        service("echo-v2", ECHO_V2, "app: echo, version: v2"),
    )
}

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: gamma, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Namespace
metadata: { name: gamma-consumer, labels: { weft.dev/mesh: enabled } }
"#;

/// What one request got.
#[derive(Debug, Default)]
struct Answer {
    status: u16,
    /// Response headers, names in lower case.
    headers: BTreeMap<String, String>,
    /// The echo's JSON (`pod`, `path`, `host`, `headers`), if an echo answered.
    echo: serde_json::Value,
}

impl Answer {
    fn pod(&self) -> &str {
        self.echo["pod"].as_str().unwrap_or_default()
    }

    fn backend_header(&self, name: &str) -> Option<&str> {
        self.echo["headers"][name].as_str()
    }
}

struct Mesh {
    cluster: TestCluster,
}

impl Mesh {
    fn up() -> Self {
        let mut cluster = TestCluster::with_mesh(2, &base());
        let echo = workspace_bin("weft-echo").display().to_string();
        for (name, version, node) in [("echo-v1", "v1", "node1"), ("echo-v2", "v2", "node1")] {
            let mut spec = PodSpec::new(name, node, &[&echo]);
            spec.namespace = NS.into();
            spec.labels.insert("app".into(), "echo".into());
            spec.labels.insert("version".into(), version.into());
            spec.service_account = "echo".into();
            add(&mut cluster, spec);
        }
        for (name, namespace) in [("client", NS), ("consumer", CONSUMER)] {
            let mut spec = PodSpec::new(name, "node0", &[]);
            spec.namespace = namespace.into();
            spec.service_account = "client".into();
            add(&mut cluster, spec);
        }
        cluster.settle();
        let mesh = Self { cluster };
        mesh.eventually("both versions answer", || {
            let pods: Vec<String> = (0..8)
                .map(|_| mesh.get(NS, "client", ECHO, "/", &[]).pod().to_owned())
                .collect();
            pods.iter().any(|p| p == "echo-v1") && pods.iter().any(|p| p == "echo-v2")
        });
        mesh
    }

    /// Applies the base resources and `routes`, replacing earlier routes.
    fn routes(&self, routes: &str) {
        self.cluster
            .set_mesh_yaml(&format!("{}---\n{routes}", base()));
        self.cluster.settle();
    }

    /// One request from pod `pod` of `namespace` to `address` (a host[:port]) with
    /// `path` and `headers`; redirects are not followed.
    fn get(
        &self,
        namespace: &str,
        pod: &str,
        address: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.request(namespace, pod, "GET", address, path, headers)
    }

    fn request(
        &self,
        namespace: &str,
        pod: &str,
        method: &str,
        address: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let url = format!("http://{address}{path}");
        let mut argv = vec![
            "curl".to_owned(),
            "-s".into(),
            "-i".into(),
            "--max-time".into(),
            "10".into(),
            "-X".into(),
            method.into(),
        ];
        for (name, value) in headers {
            argv.push("-H".into());
            argv.push(format!("{name}: {value}"));
        }
        argv.push(url);
        let output = self
            .cluster
            .pod_command(namespace, pod, &argv)
            .unwrap()
            .output()
            .unwrap();
        parse(&String::from_utf8_lossy(&output.stdout))
    }

    /// Polls `holds` until it is true, then requires it twice more in a row (as the
    /// upstream suite requires three consecutive successes).
    fn eventually(&self, what: &str, mut holds: impl FnMut() -> bool) {
        let mut streak = 0;
        wait_until(what, CONVERGE, || {
            if holds() {
                streak += 1;
            } else {
                streak = 0;
            }
            streak >= 3
        });
    }
}

fn add(cluster: &mut Cluster, spec: PodSpec) {
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
}

/// `curl -i` output: the status line, headers, then the body.
fn parse(output: &str) -> Answer {
    let (head, body) = output.split_once("\r\n\r\n").unwrap_or((output, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        echo: serde_json::from_str(body.trim()).unwrap_or_default(),
    }
}

fn route(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: {name}, namespace: {namespace} }}\nspec:\n{spec}\n---\n"
    )
}

#[test]
fn gamma_mesh_conformance_cases_hold_on_the_local_cluster() {
    let mesh = Mesh::up();

    // MeshBasic: no route, the service answers.
    assert_eq!(mesh.get(NS, "client", ECHO, "/", &[]).status, 200);

    // MeshPorts: a parent port limits the route to that port; no port means every port.
    mesh.routes(&format!(
        "{}{}",
        route(
            "mesh-split-v1",
            NS,
            "  parentRefs: [{ group: \"\", kind: Service, name: echo-v1, port: 80 }]\n  rules:\n    - filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: { set: [{ name: X-Header-Set, value: v1 }] } }]\n      backendRefs: [{ name: echo-v1, port: 80 }]"
        ),
        route(
            "mesh-split-v2",
            NS,
            "  parentRefs: [{ group: \"\", kind: Service, name: echo-v2 }]\n  rules:\n    - filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: { set: [{ name: X-Header-Set, value: v2 }] } }]\n      backendRefs: [{ name: echo-v2, port: 80 }]"
        ),
    ));
    let header = |address: &str| {
        let answer = mesh.get(NS, "client", address, "/", &[]);
        (
            answer.status,
            answer.headers.get("x-header-set").cloned(),
            answer.pod().to_owned(),
        )
    };
    mesh.eventually("MeshPorts: the explicit port", || {
        header(ECHO_V1) == (200, Some("v1".into()), "echo-v1".into())
    });
    assert_eq!(
        header(&format!("{ECHO_V1}:8080")),
        (200, None, "echo-v1".into()),
        "MeshPorts: another port"
    );
    assert_eq!(
        header(ECHO_V2),
        (200, Some("v2".into()), "echo-v2".into()),
        "MeshPorts: no port"
    );
    assert_eq!(
        header(&format!("{ECHO_V2}:8080")),
        (200, Some("v2".into()), "echo-v2".into()),
        "MeshPorts: no port, port 8080"
    );

    // MeshFrontend and MeshFrontendHostname: a route applies to the service's address,
    // not to the pod's, and not by the Host header.
    let v2_pod = mesh
        .cluster
        .topology()
        .pods
        .iter()
        .find(|p| p.name == "echo-v2")
        .unwrap()
        .ip;
    assert_eq!(
        header(&format!("{v2_pod}:8080")),
        (200, None, "echo-v2".into()),
        "MeshFrontend: pod IP"
    );
    let with_host = |address: &str, host: &str| {
        let answer = mesh.get(NS, "client", address, "/", &[("Host", host)]);
        (
            answer.headers.get("x-header-set").cloned(),
            answer.pod().to_owned(),
        )
    };
    assert_eq!(
        with_host(ECHO_V2, "echo-v1"),
        (Some("v2".into()), "echo-v2".into())
    );
    assert_eq!(
        with_host(&format!("{ECHO_V1}:8080"), "echo-v2"),
        (None, "echo-v1".into())
    );

    // MeshConsumerRoute: a route in the client's namespace for a service elsewhere
    // applies to that namespace's clients only.
    mesh.routes(&route(
        "mesh-echo-add-header",
        CONSUMER,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo-v1, namespace: gamma }]\n  rules:\n    - filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: { set: [{ name: X-Header-Set, value: set }] } }]\n      backendRefs: [{ name: echo-v1, namespace: gamma, port: 80 }]",
    ));
    mesh.eventually("MeshConsumerRoute: the consumer's client", || {
        let answer = mesh.get(CONSUMER, "consumer", ECHO_V1, "/", &[]);
        answer.headers.get("x-header-set").map(String::as_str) == Some("set")
    });
    let producer = mesh.get(NS, "client", ECHO_V1, "/", &[]);
    assert_eq!(
        (producer.status, producer.headers.get("x-header-set")),
        (200, None)
    );

    // MeshTrafficSplit: exact paths split the service; anything else is a 404.
    mesh.routes(&route(
        "mesh-split",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo }]\n  rules:\n    - { matches: [{ path: { type: Exact, value: /v1 } }], backendRefs: [{ name: echo-v1, port: 80 }] }\n    - { matches: [{ path: { type: Exact, value: /v2 } }], backendRefs: [{ name: echo-v2, port: 80 }] }",
    ));
    mesh.eventually("MeshTrafficSplit", || {
        mesh.get(NS, "client", ECHO, "/v2", &[]).pod() == "echo-v2"
    });
    for (path, status, pod) in [
        ("/v1", 200, "echo-v1"),
        ("/v2", 200, "echo-v2"),
        ("/v3", 404, ""),
    ] {
        let answer = mesh.get(NS, "client", ECHO, path, &[]);
        assert_eq!((answer.status, answer.pod()), (status, pod), "{path}");
    }

    // MeshHTTPRouteSimpleSameNamespace: every request of echo goes to echo-v1, port 8080.
    mesh.routes(&route(
        "gateway-conformance-mesh-test",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules: [{ backendRefs: [{ name: echo-v1, port: 8080 }] }]",
    ));
    mesh.eventually("MeshHTTPRouteSimpleSameNamespace", || {
        (0..5).all(|_| mesh.get(NS, "client", ECHO, "/", &[]).pod() == "echo-v1")
    });

    // MeshHTTPRouteNamedRule: rules route by path, and the metrics name each rule.
    mesh.routes(&route(
        "mesh-http-named-rules",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules:\n    - { name: named-rule, matches: [{ path: { value: /named } }], backendRefs: [{ name: echo-v1, port: 8080 }] }\n    - { matches: [{ path: { value: /unnamed } }], backendRefs: [{ name: echo-v2, port: 8080 }] }",
    ));
    mesh.eventually("MeshHTTPRouteNamedRule", || {
        mesh.get(NS, "client", ECHO, "/unnamed", &[]).pod() == "echo-v2"
    });
    assert_eq!(mesh.get(NS, "client", ECHO, "/named", &[]).pod(), "echo-v1");
    let rules: Vec<String> = samples(
        &agent_metrics(&mesh.cluster, "node0"),
        "weft_route_requests_total",
    )
    .into_iter()
    .filter(|(labels, _)| labels["route"] == "HTTPRoute/gamma/mesh-http-named-rules")
    .map(|(labels, _)| labels["rule"].clone())
    .collect();
    assert!(
        rules.contains(&"named-rule".to_owned()) && rules.contains(&"1".to_owned()),
        "a named rule by its name, an unnamed one by its index: {rules:?}"
    );

    // MeshHTTPRouteMatching, with a method match: paths, headers and precedence.
    mesh.routes(&route(
        "mesh-matching",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules:\n    - name: named-rule\n      matches: [{ path: { type: PathPrefix, value: / } }, { headers: [{ name: version, value: one }] }]\n      backendRefs: [{ name: echo-v1, port: 8080 }]\n    - matches: [{ path: { type: PathPrefix, value: /v2 } }, { headers: [{ name: version, value: two }] }]\n      backendRefs: [{ name: echo-v2, port: 8080 }]\n    - matches: [{ path: { type: Exact, value: /exact } , method: POST }]\n      backendRefs: [{ name: echo-v2, port: 8080 }]",
    ));
    let cases: [(&str, &str, Headers, &str); 11] = [
        ("GET", "/", &[], "echo-v1"),
        ("GET", "/example", &[], "echo-v1"),
        ("GET", "/", &[("version", "one")], "echo-v1"),
        ("GET", "/v2", &[], "echo-v2"),
        ("GET", "/v2/example", &[], "echo-v2"),
        ("GET", "/", &[("version", "two")], "echo-v2"),
        ("GET", "/v2/", &[], "echo-v2"),
        ("GET", "/v2example", &[], "echo-v1"),
        ("GET", "/foo/v2/example", &[], "echo-v1"),
        ("POST", "/exact", &[], "echo-v2"),
        ("GET", "/exact", &[], "echo-v1"),
    ];
    mesh.eventually("MeshHTTPRouteMatching", || {
        mesh.get(NS, "client", ECHO, "/v2", &[]).pod() == "echo-v2"
    });
    for (method, path, headers, pod) in cases {
        let answer = mesh.request(NS, "client", method, ECHO, path, headers);
        assert_eq!(
            (answer.status, answer.pod()),
            (200, pod),
            "{method} {path} {headers:?}"
        );
    }

    // MeshHTTPRouteQueryParamMatching: query parameters, ANDed within a match; no
    // match is a 404, not the service.
    mesh.routes(&route(
        "mesh-query-param-matching",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules:\n    - { matches: [{ queryParams: [{ name: animal, value: whale }] }], backendRefs: [{ name: echo-v1, port: 8080 }] }\n    - { matches: [{ queryParams: [{ name: animal, value: dolphin }] }], backendRefs: [{ name: echo-v2, port: 8080 }] }\n    - { matches: [{ path: { type: PathPrefix, value: /path1 }, queryParams: [{ name: animal, value: whale }] }], backendRefs: [{ name: echo-v1, port: 8080 }] }\n    - { matches: [{ headers: [{ name: version, value: one }], queryParams: [{ name: animal, value: whale }] }], backendRefs: [{ name: echo-v2, port: 8080 }] }\n    - { matches: [{ path: { type: PathPrefix, value: /path3 }, queryParams: [{ name: animal, value: shark }] }, { path: { type: PathPrefix, value: /path4 }, headers: [{ name: version, value: three }], queryParams: [{ name: animal, value: kraken }] }], backendRefs: [{ name: echo-v1, port: 8080 }] }\n    - { matches: [{ path: { type: PathPrefix, value: /path5 } }], backendRefs: [{ name: echo-v1, port: 8080 }] }\n    - { matches: [{ queryParams: [{ name: animal, value: hydra }] }], backendRefs: [{ name: echo-v2, port: 8080 }] }",
    ));
    mesh.eventually("MeshHTTPRouteQueryParamMatching", || {
        mesh.get(NS, "client", ECHO, "/?animal=dolphin", &[]).pod() == "echo-v2"
    });
    let cases: [(&str, Headers, u16, &str); 15] = [
        ("/?animal=whale", &[], 200, "echo-v1"),
        ("/?animal=dolphin", &[], 200, "echo-v2"),
        ("/?animal=whale&otherparam=irrelevant", &[], 200, "echo-v1"),
        ("/?animal=dolphin&color=yellow", &[], 200, "echo-v2"),
        ("/?color=blue", &[], 404, ""),
        ("/?animal=dog", &[], 404, ""),
        ("/?animal=whaledolphin", &[], 404, ""),
        ("/", &[], 404, ""),
        ("/path1?animal=whale", &[], 200, "echo-v1"),
        ("/?animal=whale", &[("version", "one")], 200, "echo-v2"),
        ("/path3?animal=shark", &[], 200, "echo-v1"),
        (
            "/path4?animal=kraken",
            &[("version", "three")],
            200,
            "echo-v1",
        ),
        ("/?animal=shark", &[], 404, ""),
        ("/path4?animal=kraken", &[], 404, ""),
        ("/path5?animal=hydra", &[], 200, "echo-v1"),
    ];
    for (path, headers, status, pod) in cases {
        let answer = mesh.get(NS, "client", ECHO, path, headers);
        assert_eq!(
            (answer.status, answer.pod()),
            (status, pod),
            "{path} {headers:?}"
        );
    }

    // MeshHTTPRouteRequestHeaderModifier (rule level) and its backend-level variant,
    // MeshHTTPRouteRewritePath with the path checked, and a hostname rewrite.
    let modifier = "requestHeaderModifier: { set: [{ name: X-Header-Set, value: set-overwrites-values }], add: [{ name: X-Header-Add, value: add-appends-values }], remove: [X-Header-Remove] }";
    mesh.routes(&route(
        "mesh-request-header-modifier",
        NS,
        &format!(
            "  parentRefs: [{{ group: \"\", kind: Service, name: echo, port: 80 }}]\n  rules:\n    - matches: [{{ path: {{ value: /rule }} }}]\n      filters: [{{ type: RequestHeaderModifier, {modifier} }}]\n      backendRefs: [{{ name: echo-v1, port: 8080 }}]\n    - matches: [{{ path: {{ value: /backend }} }}]\n      backendRefs: [{{ name: echo-v1, port: 8080, filters: [{{ type: RequestHeaderModifier, {modifier} }}] }}]\n    - matches: [{{ path: {{ value: /prefix/one }} }}]\n      filters: [{{ type: URLRewrite, urlRewrite: {{ path: {{ type: ReplacePrefixMatch, replacePrefixMatch: /one }} }} }}]\n      backendRefs: [{{ name: echo-v1, port: 8080 }}]\n    - matches: [{{ path: {{ value: /strip-prefix }} }}]\n      filters: [{{ type: URLRewrite, urlRewrite: {{ hostname: rewritten.example, path: {{ type: ReplacePrefixMatch, replacePrefixMatch: / }} }} }}]\n      backendRefs: [{{ name: echo-v1, port: 8080 }}]\n    - matches: [{{ path: {{ value: /full/one }} }}]\n      filters: [{{ type: URLRewrite, urlRewrite: {{ path: {{ type: ReplaceFullPath, replaceFullPath: /one }} }} }}]\n      backendRefs: [{{ name: echo-v1, port: 8080 }}]"
        ),
    ));
    mesh.eventually("MeshHTTPRouteRequestHeaderModifier", || {
        mesh.get(NS, "client", ECHO, "/rule", &[])
            .backend_header("x-header-set")
            == Some("set-overwrites-values")
    });
    for path in ["/rule", "/backend"] {
        let answer = mesh.get(
            NS,
            "client",
            ECHO,
            path,
            &[
                ("X-Header-Set", "some-other-value"),
                ("X-Header-Add", "some-other-value"),
                ("X-Header-Remove", "remove-me"),
                ("Some-Other-Header", "val"),
            ],
        );
        assert_eq!(answer.pod(), "echo-v1", "{path}");
        assert_eq!(
            answer.backend_header("x-header-set"),
            Some("set-overwrites-values"),
            "{path}"
        );
        assert_eq!(
            answer.backend_header("x-header-add"),
            Some("some-other-value, add-appends-values"),
            "{path}"
        );
        assert_eq!(answer.backend_header("x-header-remove"), None, "{path}");
        assert_eq!(
            answer.backend_header("some-other-header"),
            Some("val"),
            "{path}"
        );
    }
    for (path, rewritten) in [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
    ] {
        let answer = mesh.get(NS, "client", ECHO, path, &[]);
        assert_eq!(
            (answer.status, answer.echo["path"].as_str()),
            (200, Some(rewritten)),
            "{path}"
        );
    }
    let answer = mesh.get(NS, "client", ECHO, "/strip-prefix/x", &[]);
    assert_eq!(
        answer.echo["host"], "rewritten.example",
        "{:?}",
        answer.echo
    );

    // The redirect family: path, port, scheme, host and status; Location checked.
    mesh.routes(&route(
        "mesh-redirect",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules:\n    - { matches: [{ path: { value: /original-prefix } }], filters: [{ type: RequestRedirect, requestRedirect: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix } } }] }\n    - { matches: [{ path: { value: /full } }], filters: [{ type: RequestRedirect, requestRedirect: { path: { type: ReplaceFullPath, replaceFullPath: /full-path-replacement } } }] }\n    - { matches: [{ path: { value: /path-and-host } }], filters: [{ type: RequestRedirect, requestRedirect: { hostname: example.org, path: { type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix } } }] }\n    - { matches: [{ path: { value: /full-path-and-status } }], filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 301, path: { type: ReplaceFullPath, replaceFullPath: /replacement-full } } }] }\n    - { matches: [{ path: { value: /path-and-status } }], filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 301, path: { type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix } } }] }\n    - { matches: [{ path: { value: /full-path-and-host } }], filters: [{ type: RequestRedirect, requestRedirect: { hostname: example.org, path: { type: ReplaceFullPath, replaceFullPath: /replacement-full } } }] }\n    - { matches: [{ path: { value: /port-and-host } }], filters: [{ type: RequestRedirect, requestRedirect: { hostname: example.org, port: 8083 } }] }\n    - { matches: [{ path: { value: /port } }], filters: [{ type: RequestRedirect, requestRedirect: { port: 8083 } }] }\n    - { matches: [{ path: { value: /scheme-and-host } }], filters: [{ type: RequestRedirect, requestRedirect: { scheme: https, hostname: example.org } }] }\n    - { matches: [{ path: { value: /scheme } }], filters: [{ type: RequestRedirect, requestRedirect: { scheme: https, statusCode: 301 } }] }\n    - { matches: [{ path: { value: /host-and-status } }], filters: [{ type: RequestRedirect, requestRedirect: { hostname: example.org, statusCode: 301 } }] }\n    - { matches: [{ path: { value: /see-other } }], filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 303 } }] }\n    - { matches: [{ path: { value: /temporary } }], filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 307 } }] }\n    - { matches: [{ path: { value: /permanent } }], filters: [{ type: RequestRedirect, requestRedirect: { statusCode: 308 } }] }",
    ));
    mesh.eventually("the redirects", || {
        mesh.get(NS, "client", ECHO, "/port", &[("Host", "echo")])
            .status
            == 302
    });
    let cases = [
        (
            "/original-prefix/lemon",
            302,
            "http://echo/replacement-prefix/lemon",
        ),
        (
            "/full/path/original",
            302,
            "http://echo/full-path-replacement",
        ),
        (
            "/path-and-host",
            302,
            "http://example.org/replacement-prefix",
        ),
        ("/full-path-and-status", 301, "http://echo/replacement-full"),
        ("/path-and-status", 301, "http://echo/replacement-prefix"),
        (
            "/full-path-and-host",
            302,
            "http://example.org/replacement-full",
        ),
        ("/port", 302, "http://echo:8083/port"),
        (
            "/port-and-host",
            302,
            "http://example.org:8083/port-and-host",
        ),
        ("/scheme", 301, "https://echo/scheme"),
        (
            "/scheme-and-host",
            302,
            "https://example.org/scheme-and-host",
        ),
        (
            "/host-and-status",
            301,
            "http://example.org/host-and-status",
        ),
        ("/see-other", 303, "http://echo/see-other"),
        ("/temporary", 307, "http://echo/temporary"),
        ("/permanent", 308, "http://echo/permanent"),
    ];
    for (path, status, location) in cases {
        let answer = mesh.get(NS, "client", ECHO, path, &[("Host", "echo")]);
        assert_eq!(
            (
                answer.status,
                answer.headers.get("location").map(String::as_str)
            ),
            (status, Some(location)),
            "{path}"
        );
    }

    // MeshHTTPRouteWeight: 70/30 over 500 requests of one connection.
    mesh.routes(&route(
        "mesh-weighted-backends",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules:\n    - backendRefs: [{ name: echo-v1, port: 8080, weight: 70 }, { name: echo-v2, port: 8080, weight: 30 }]",
    ));
    mesh.eventually("MeshHTTPRouteWeight", || {
        mesh.get(NS, "client", ECHO, "/", &[]).status == 200
    });
    let counts = batch(&mesh, 500);
    assert_seventy_thirty(&counts, 500);

    // A backend that does not exist answers 500 for its share, and the route's status
    // says so; timeouts answer 504.
    mesh.routes(&route(
        "mesh-missing-and-slow",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules:\n    - matches: [{ path: { value: /missing } }]\n      backendRefs: [{ name: echo-v3, port: 8080 }]\n    - matches: [{ path: { value: /half } }]\n      backendRefs: [{ name: echo-v1, port: 8080 }, { name: echo-v3, port: 8080 }]\n    - matches: [{ path: { value: /slow } }]\n      timeouts: { request: 300ms }\n      backendRefs: [{ name: echo-v1, port: 8080 }]\n    - matches: [{ path: { value: /slow-backend } }]\n      timeouts: { request: 10s, backendRequest: 300ms }\n      backendRefs: [{ name: echo-v1, port: 8080 }]\n    - matches: [{ path: { value: /vanishing } }]\n      backendRefs: [{ name: echo-v2, port: 8080 }]",
    ));
    mesh.eventually("the missing backend", || {
        mesh.get(NS, "client", ECHO, "/missing", &[]).status == 500
    });
    let statuses: Vec<u16> = (0..40)
        .map(|_| mesh.get(NS, "client", ECHO, "/half", &[]).status)
        .collect();
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 500)),
        "{statuses:?}"
    );
    let failed = statuses.iter().filter(|&&s| s == 500).count();
    assert!(
        (5..=35).contains(&failed),
        "about half of 40 answered 500: {statuses:?}"
    );
    let status = mesh.cluster.controller_status().unwrap();
    let verdict = weft_e2e::policy_verdict(&status, "HTTPRoute", "mesh-missing-and-slow");
    assert_eq!(verdict["accepted"], true, "{verdict}");
    assert_eq!(
        verdict["references"]["reason"], "BackendNotFound",
        "{verdict}"
    );
    for path in ["/slow", "/slow-backend"] {
        let slow = mesh.get(NS, "client", ECHO, &format!("{path}?delay=3000"), &[]);
        assert_eq!(slow.status, 504, "{path}: {slow:?}");
        let quick = mesh.get(NS, "client", ECHO, &format!("{path}?delay=10"), &[]);
        assert_eq!(quick.status, 200, "{path}: {quick:?}");
    }

    // Metrics name the route and rule.
    let counted: f64 = samples(
        &agent_metrics(&mesh.cluster, "node0"),
        "weft_route_requests_total",
    )
    .into_iter()
    .filter(|(labels, _)| {
        labels.get("route").map(String::as_str) == Some("HTTPRoute/gamma/mesh-missing-and-slow")
            && labels.get("rule").map(String::as_str) == Some("2")
            && labels.get("response_code").map(String::as_str) == Some("504")
    })
    .map(|(_, value)| value)
    .sum();
    assert!(
        counted >= 1.0,
        "the timed-out request is counted by route and rule"
    );

    // A backend that disappears: its share answers 500, and the status says so.
    assert_eq!(
        mesh.get(NS, "client", ECHO, "/vanishing", &[]).pod(),
        "echo-v2"
    );
    let without_v2 = base().replace(
        "name: echo-v2, namespace: gamma",
        "name: echo-v9, namespace: gamma",
    );
    let routes = mesh.cluster.manifests_file();
    let current = std::fs::read_to_string(&routes).unwrap();
    mesh.cluster
        .set_mesh_yaml(&current.replacen(&base(), &without_v2, 1));
    mesh.cluster.settle();
    mesh.eventually("the vanished backend answers 500", || {
        mesh.get(NS, "client", ECHO, "/vanishing", &[]).status == 500
    });
    let status = mesh.cluster.controller_status().unwrap();
    let verdict = weft_e2e::policy_verdict(&status, "HTTPRoute", "mesh-missing-and-slow");
    assert_eq!(verdict["accepted"], true, "{verdict}");
    assert_eq!(
        verdict["references"]["message"],
        "spec.rules[0].backendRefs[0]: there is no Service gamma/echo-v3; \
         spec.rules[1].backendRefs[1]: there is no Service gamma/echo-v3; \
         spec.rules[4].backendRefs[0]: there is no Service gamma/echo-v2",
        "every unresolved reference is named: {verdict}"
    );
}

/// GRPCRoute: a weighted split (with a weight-0 backend that does not exist), header
/// modifiers on metadata, method matches, and mirrors of gRPC and HTTP requests.
#[test]
fn grpc_routes_split_modify_and_mirror() {
    let mesh = Mesh::up();
    let grpc_route = |name: &str, spec: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{ name: {name}, namespace: gamma }}\nspec:\n{spec}\n---\n"
        )
    };
    let calls = |count: usize, metadata: &[&str]| -> Vec<serde_json::Value> {
        let mut argv = vec![
            workspace_bin("weft-client").display().to_string(),
            "grpc".into(),
            "unary".into(),
            "--count".into(),
            count.to_string(),
            "--target".into(),
            format!("http://{ECHO}:7070"),
        ];
        for pair in metadata {
            argv.push("--metadata".into());
            argv.push((*pair).into());
        }
        let output = mesh
            .cluster
            .pod_command(NS, "client", &argv)
            .unwrap()
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_default())
            .collect()
    };

    // MeshGRPCRouteWeight: 70/30, and echo-v3 (weight 0) does not exist.
    mesh.routes(&grpc_route(
        "mesh-grpc-weighted-backends",
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 7070 }]\n  rules:\n    - backendRefs: [{ name: echo-v1, port: 7070, weight: 70 }, { name: echo-v2, port: 7070, weight: 30 }, { name: echo-v3, port: 7070, weight: 0 }]",
    ));
    mesh.eventually("MeshGRPCRouteWeight", || {
        calls(1, &[])
            .first()
            .is_some_and(|reply| reply["pod"].is_string())
    });
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for reply in calls(500, &[]) {
        let pod = reply["pod"].as_str().unwrap_or("error").to_owned();
        *counts.entry(pod).or_default() += 1;
    }
    assert_seventy_thirty(&counts, 500);

    // MeshGRPCRouteRequestHeaderModifier, method matches, and a mirror of each call.
    mesh.routes(&grpc_route(
        "grpc-request-header-modifier",
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 7070 }]\n  rules:\n    - matches: [{ headers: [{ name: x-test-case, value: set }] }]\n      filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: x-header-set, value: set-overwrites-values }] } }]\n      backendRefs: [{ name: echo-v1, port: 7070 }]\n    - matches: [{ headers: [{ name: x-test-case, value: add }] }]\n      filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { add: [{ name: x-header-add, value: add-appends-values }] } }]\n      backendRefs: [{ name: echo-v1, port: 7070 }]\n    - matches: [{ headers: [{ name: x-test-case, value: remove }] }]\n      filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { remove: [x-header-remove] } }]\n      backendRefs: [{ name: echo-v1, port: 7070 }]\n    - matches: [{ method: { service: weft.echo.v1.Echo, method: Echo }, headers: [{ name: x-test-case, value: mirror }] }]\n      filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: echo-v2, port: 7070 } } }]\n      backendRefs: [{ name: echo-v1, port: 7070 }]\n    - matches: [{ method: { type: RegularExpression, service: \"weft\\\\.echo\\\\..*\" } }]\n      backendRefs: [{ name: echo-v2, port: 7070 }]",
    ));
    mesh.eventually("MeshGRPCRouteRequestHeaderModifier", || {
        calls(1, &["x-test-case=set"])
            .first()
            .is_some_and(|reply| reply["metadata"]["x-header-set"] == "set-overwrites-values")
    });
    let reply = calls(
        1,
        &[
            "x-test-case=set",
            "x-header-set=overwritten",
            "some-other-header=kept",
        ],
    );
    assert_eq!(
        reply[0]["metadata"]["x-header-set"], "set-overwrites-values",
        "{reply:?}"
    );
    assert_eq!(
        reply[0]["metadata"]["some-other-header"], "kept",
        "{reply:?}"
    );
    let reply = calls(1, &["x-test-case=add", "x-header-add=first"]);
    assert_eq!(
        reply[0]["metadata"]["x-header-add"], "first, add-appends-values",
        "{reply:?}"
    );
    let reply = calls(1, &["x-test-case=remove", "x-header-remove=gone"]);
    assert!(
        reply[0]["metadata"].get("x-header-remove").is_none(),
        "{reply:?}"
    );
    assert_eq!(reply[0]["pod"], "echo-v1");
    // The regular-expression method match routes what the header matches leave.
    assert_eq!(calls(1, &[])[0]["pod"], "echo-v2");

    // The mirror: every call answered by echo-v1, and a copy of each reaches echo-v2.
    let mirrored = |node: &str| {
        samples(
            &agent_metrics(&mesh.cluster, node),
            "weft_route_mirrors_total",
        )
        .into_iter()
        .filter(|(labels, _)| labels.get("result").map(String::as_str) == Some("sent"))
        .map(|(_, value)| value)
        .sum::<f64>()
    };
    let received = |workload: &str| {
        samples(
            &agent_metrics(&mesh.cluster, "node1"),
            "istio_requests_total",
        )
        .into_iter()
        .filter(|(labels, _)| {
            labels.get("reporter").map(String::as_str) == Some("destination")
                && labels.get("destination_workload").map(String::as_str) == Some(workload)
        })
        .map(|(_, value)| value)
        .sum::<f64>()
    };
    let before = received("echo-v2");
    let replies = calls(20, &["x-test-case=mirror"]);
    assert!(
        replies.iter().all(|reply| reply["pod"] == "echo-v1"),
        "{replies:?}"
    );
    wait_until("20 mirrored calls", CONVERGE, || mirrored("node0") >= 20.0);
    wait_until("echo-v2 received the copies", CONVERGE, || {
        received("echo-v2") - before >= 20.0
    });

    // An HTTP mirror with a body: the copy carries it whole.
    mesh.routes(&route(
        "mesh-mirror",
        NS,
        "  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 80 }]\n  rules:\n    - filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: echo-v2, port: 8080 } } }]\n      backendRefs: [{ name: echo-v1, port: 8080 }]",
    ));
    mesh.eventually("the HTTP mirror", || {
        mesh.get(NS, "client", ECHO, "/", &[]).pod() == "echo-v1"
    });
    let sent_before = mirrored("node0");
    let argv = [
        "curl",
        "-s",
        "--max-time",
        "10",
        "-X",
        "POST",
        "--data-binary",
        "mirrored body",
        &format!("http://{ECHO}/posted"),
    ];
    let output = mesh
        .cluster
        .pod_command(NS, "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert_eq!(answer["pod"], "echo-v1", "{answer}");
    wait_until("the POST mirrored", CONVERGE, || {
        mirrored("node0") > sent_before
    });
    // The destination agent of echo-v2 logged the copy, with its whole body.
    wait_until("the copy's access-log line", CONVERGE, || {
        weft_e2e::agent_log(&mesh.cluster, "node1")
            .lines()
            .any(|line| {
                let Some(json) = line.find('{').map(|at| &line[at..]) else {
                    return false;
                };
                let entry: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
                entry["reporter"] == "destination"
                    && entry["path"] == "/posted"
                    && entry["destination"]["workload"] == "echo-v2"
                    && entry["bytes_received"] == "mirrored body".len()
            })
    });
}

/// Asserts that `total` answers split 70/30 between echo-v1 and echo-v2, and that no
/// other pod (and no error) answered.
fn assert_seventy_thirty(counts: &BTreeMap<String, usize>, total: usize) {
    let to_v1 = *counts.get("echo-v1").unwrap_or(&0);
    assert!(
        counts.len() == 2
            && counts.values().sum::<usize>() == total
            && plausible_share(to_v1, total, 0.7),
        "not a 70/30 split: {counts:?}"
    );
}

/// `count` requests on one keep-alive connection from the client: answers by pod.
fn batch(mesh: &Mesh, count: usize) -> BTreeMap<String, usize> {
    let url = format!("http://{ECHO}/");
    let mut argv = vec!["curl", "-s", "--max-time", "60", "-w", "\n"];
    argv.extend(std::iter::repeat_n(url.as_str(), count));
    let output = mesh
        .cluster
        .pod_command(NS, "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    let mut counts = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let answer: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let pod = answer["pod"].as_str().unwrap_or("error").to_owned();
        *counts.entry(pod).or_default() += 1;
    }
    counts
}

/// Shifting a canary's weights while load runs loses no request, and each step's
/// observed split converges to its weights: curl on one keep-alive connection, wrk on
/// four, and a gRPC client on two HTTP/2 connections, while an HTTPRoute and a
/// GRPCRoute move from v1 to v2 in steps.
#[test]
fn canary_weight_steps_under_load_lose_no_request() {
    let mesh = Mesh::up();
    let step = |v1: u32, v2: u32| {
        let backends = |port: u16| {
            format!(
                "[{{ name: echo-v1, port: {port}, weight: {v1} }}, {{ name: echo-v2, port: {port}, weight: {v2} }}]"
            )
        };
        format!(
            "{}apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{ name: canary-grpc, namespace: gamma }}\nspec:\n  parentRefs: [{{ group: \"\", kind: Service, name: echo, port: 7070 }}]\n  rules: [{{ backendRefs: {} }}]\n---\n",
            route(
                "canary",
                NS,
                &format!(
                    "  parentRefs: [{{ group: \"\", kind: Service, name: echo, port: 80 }}]\n  rules:\n    - backendRefs: {}",
                    backends(8080)
                ),
            ),
            backends(7070),
        )
    };
    mesh.routes(&step(100, 0));
    mesh.eventually("all on v1", || {
        mesh.get(NS, "client", ECHO, "/", &[]).pod() == "echo-v1"
    });
    let spawn = |argv: Vec<String>| {
        mesh.cluster
            .pod_command(NS, "client", &argv)
            .unwrap()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let url = format!("http://{ECHO}/");
    let mut curl: Vec<String> = ["curl", "-s", "--max-time", "120", "-w", "\n"]
        .map(String::from)
        .to_vec();
    curl.extend(std::iter::repeat_n(url.clone(), 3000));
    let curl = spawn(curl);
    let wrk = spawn(
        ["wrk", "-t", "1", "-c", "4", "-d", "8s", &url]
            .map(String::from)
            .to_vec(),
    );
    let grpc = spawn(
        [
            &workspace_bin("weft-client").display().to_string(),
            "grpc",
            "load",
            "--target",
            &format!("http://{ECHO}:7070"),
            "--connections",
            "2",
            "--rate",
            "200",
            "--duration",
            "8",
        ]
        .map(String::from)
        .to_vec(),
    );
    for (v1, v2) in [(90, 10), (50, 50), (0, 100)] {
        mesh.routes(&step(v1, v2));
        let counts = batch(&mesh, 400);
        let to_v2 = *counts.get("echo-v2").unwrap_or(&0);
        let expected = f64::from(v2) / 100.0;
        eprintln!(
            "step {v1}/{v2}: v2 share {:.3}, error {:+.3}",
            to_v2 as f64 / 400.0,
            to_v2 as f64 / 400.0 - expected
        );
        assert!(
            counts.values().sum::<usize>() == 400 && plausible_share(to_v2, 400, expected),
            "step {v1}/{v2}: {counts:?}"
        );
    }
    let output = curl.wait_with_output().unwrap();
    let answered = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("\"pod\""))
        .count();
    assert_eq!(
        answered, 3000,
        "curl: every request was answered by an echo"
    );
    clean_wrk_report(&wrk.wait_with_output().unwrap());
    let report = grpc_load_report(&grpc.wait_with_output().unwrap());
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["requests"].as_u64().unwrap_or(0) > 100, "{report}");
}
