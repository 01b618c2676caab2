//! Routes as the agents apply them: HTTPRoutes and GRPCRoutes of the Gateway API's mesh
//! profile (GAMMA), reduced to one model. A GRPCRoute's service and method matches are
//! the HTTP/2 paths they name (`/<service>/<method>`), so one matcher serves both kinds.
//!
//! The controller compiles routes into [`ServiceRoutes`] (one per service port, rules in
//! precedence order, [`Precedence`]); the agent decides each request with the pure
//! functions here: [`ServiceRoutes::select`] (which rule and match), [`Rule::backend_at`]
//! (the weighted split), [`PathModifier::apply`] and [`Redirect::location`] (what the
//! filters write).

#[cfg(feature = "config")]
mod wire;

#[cfg(test)]
mod tests;

use std::{fmt, time::Duration};

use serde::{Serialize, Serializer};

pub use crate::authz::Headers;

/// The routes of one service port, rules in precedence order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceRoutes {
    pub namespace: String,
    pub service: String,
    pub port: u16,
    pub rules: Vec<Rule>,
}

/// One rule of a route, with the matches that select it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// The route, `<Kind>/<namespace>/<name>`.
    pub route: String,
    /// The rule's `name` (its `sectionName`), or its index in the route.
    pub name: String,
    /// A consumer route's namespace (only that namespace's clients use it); `None` for a
    /// producer route, in the service's own namespace, which every client uses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_namespace: Option<String>,
    /// Any of them selects the rule.
    pub matches: Vec<Match>,
    pub filters: Filters,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
}

/// What a request must carry to match: every part that is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    pub path: PathMatch,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
}

impl Default for Match {
    /// Every request (the match of a rule that lists none).
    fn default() -> Self {
        Self {
            path: PathMatch::Prefix("/".to_owned()),
            method: None,
            headers: Vec::new(),
            query_params: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    Exact(String),
    /// By whole path segments: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    RegularExpression(Pattern),
}

/// A header or query parameter: present with this value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValueMatch {
    /// Header names in lower case; query parameter names as written (case-sensitive).
    pub name: String,
    pub value: ValueMatchKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ValueMatchKind {
    Exact(String),
    RegularExpression(Pattern),
}

/// A regular expression that must match the whole value.
#[derive(Clone, Debug)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// `expression` as a full match; the error says what is wrong with it.
    pub fn new(expression: &str) -> Result<Self, String> {
        regex::Regex::new(&format!("^(?:{expression})$"))
            .map(Self)
            .map_err(|err| {
                // The parser's message spans lines (the expression, a caret, the
                // problem): the problem is enough in a status message.
                let text = err.to_string();
                let problem = text.lines().last().unwrap_or_default();
                let problem = problem.trim_start_matches("error: ");
                format!("{expression:?} is not a regular expression ({problem})")
            })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        let anchored = self.0.as_str();
        &anchored[4..anchored.len() - 2]
    }

    pub fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Pattern {}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The filters of a rule or a backend. The Gateway API allows each kind once, mirrors
/// excepted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Filters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    /// The agent answers the request itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// A `FaultInjection` the rule references (an `ExtensionRef` filter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Faults injected into a share of a rule's requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// Hold the request this long first, in `percent` of requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<(Duration, u32)>,
    /// Answer it at once instead, in `percent` of requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<(Abort, u32)>,
}

/// How an aborted request is answered: an HTTP status, a gRPC status, or either as the
/// request is HTTP or gRPC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Abort {
    pub http_status: Option<u16>,
    pub grpc_status: Option<u8>,
}

/// What a fault does to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

impl Fault {
    /// What the fault does to one request, given `percent_roll`, which draws a number
    /// from 0 to 99 (called once for the delay and once for the abort, each set).
    pub fn decide(&self, mut percent_roll: impl FnMut() -> u32) -> Injected {
        let mut hits = |percent: u32| percent_roll() < percent;
        Injected {
            delay: self
                .delay
                .filter(|&(_, percent)| hits(percent))
                .map(|(delay, _)| delay),
            abort: self
                .abort
                .filter(|&(_, percent)| hits(percent))
                .map(|(abort, _)| abort),
        }
    }
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        *self == Filters::default()
    }
}

/// Header changes, applied in this order: set (replacing), add (appending), remove.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Whether every name is an HTTP header name (a token) and every value a header
    /// value (visible ASCII, spaces and tabs); the error names the first that is not.
    pub fn check(&self) -> Result<(), String> {
        let names = self
            .set
            .iter()
            .chain(&self.add)
            .map(|(name, _)| name)
            .chain(&self.remove);
        for name in names {
            let token =
                |byte: u8| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte);
            if name.is_empty() || !name.bytes().all(token) {
                return Err(format!("{name:?} is not a header name"));
            }
        }
        for (name, value) in self.set.iter().chain(&self.add) {
            let visible = |byte: u8| byte == b'\t' || (b' '..=b'~').contains(&byte);
            if !value.bytes().all(visible) {
                return Err(format!("the value of {name} is not a header value"));
            }
        }
        Ok(())
    }
}

/// Answers with a redirect; what is not set comes from the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathModifier {
    /// The whole path.
    ReplaceFullPath(String),
    /// The part a `PathPrefix` match matched.
    ReplacePrefixMatch(String),
}

/// Changes the request before it is forwarded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// Sends a copy of a share of the requests to another service; its answers are dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mirror {
    pub backend: BackendRef,
    /// The share mirrored: `numerator / denominator`.
    pub numerator: u32,
    pub denominator: u32,
}

/// A service port requests go to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BackendRef {
    pub namespace: String,
    pub service: String,
    pub port: u16,
}

impl fmt::Display for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.service, self.port)
    }
}

/// One of a rule's weighted backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    /// `None`: the reference does not resolve (no such service, or not permitted), and
    /// its share of the requests is answered `500`, as the Gateway API requires.
    pub target: Option<BackendRef>,
    pub weight: u32,
    pub filters: Filters,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// The whole request, until the response's head arrives.
    pub request: Option<Duration>,
    /// One attempt at a backend.
    pub backend_request: Option<Duration>,
}

/// A request, as matches see it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    pub headers: &'a dyn Headers,
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        match self.query {
            Some(query) => write!(f, "?{query}"),
            None => Ok(()),
        }
    }
}

/// The rule (and which of its matches) that routes a request.
#[derive(Clone, Copy, Debug)]
pub struct Selected<'r> {
    pub rule: &'r Rule,
    pub matched: &'r Match,
}

impl ServiceRoutes {
    /// Whether any rule applies to clients in `client_namespace`: a producer route, or
    /// a consumer route of that namespace. If none does, the service is not routed for
    /// them (another namespace's consumer routes change nothing for them).
    pub fn applies_to(&self, client_namespace: &str) -> bool {
        self.rules.iter().any(|rule| {
            rule.consumer_namespace
                .as_deref()
                .is_none_or(|namespace| namespace == client_namespace)
        })
    }

    /// The rule that routes `request` from a client in `client_namespace`: the first
    /// that matches, among the consumer routes of the client's namespace if it has any
    /// for this service, else among the producer routes. `None`: no rule matches, and
    /// the request is answered `404`.
    pub fn select<'r>(&'r self, client_namespace: &str, request: &Request) -> Option<Selected<'r>> {
        let consumer = self
            .rules
            .iter()
            .any(|rule| rule.consumer_namespace.as_deref() == Some(client_namespace));
        self.rules
            .iter()
            .filter(|rule| match &rule.consumer_namespace {
                Some(namespace) => consumer && namespace == client_namespace,
                None => !consumer,
            })
            .find_map(|rule| {
                let matched = rule.matches.iter().find(|m| m.matches(request))?;
                Some(Selected { rule, matched })
            })
    }
}

impl ServiceRoutes {
    /// The rules no request ever reaches, each with the earlier rule that takes every
    /// request it matches: `(shadowed, shadowing)` indices into `rules`. Precedence puts
    /// a narrower match first, so an earlier match covers a later one only when both
    /// select the same requests — the tie the routes' order breaks.
    pub fn shadowed(&self) -> Vec<(usize, usize)> {
        let mut shadowed = Vec::new();
        for (later, rule) in self.rules.iter().enumerate() {
            let earlier = self.rules[..later].iter().position(|earlier| {
                earlier.consumer_namespace == rule.consumer_namespace
                    && rule.matches.iter().all(|matched| {
                        earlier
                            .matches
                            .iter()
                            .any(|first| first.selects_the_same_as(matched))
                    })
            });
            if let Some(earlier) = earlier {
                shadowed.push((later, earlier));
            }
        }
        shadowed
    }
}

impl Match {
    /// Whether `self` and `other` select the same requests: the same conditions, in
    /// any order, a path prefix with or without its trailing `/`.
    fn selects_the_same_as(&self, other: &Match) -> bool {
        let same_set = |a: &[ValueMatch], b: &[ValueMatch]| {
            a.len() == b.len() && a.iter().all(|value| b.contains(value))
        };
        let same_path = match (&self.path, &other.path) {
            (PathMatch::Prefix(a), PathMatch::Prefix(b)) => {
                a.trim_end_matches('/') == b.trim_end_matches('/')
            }
            (a, b) => a == b,
        };
        same_path
            && self.method == other.method
            && same_set(&self.headers, &other.headers)
            && same_set(&self.query_params, &other.query_params)
    }

    pub fn matches(&self, request: &Request) -> bool {
        self.path.matches(request.path)
            && self
                .method
                .as_deref()
                .is_none_or(|method| method == request.method)
            && self.headers.iter().all(|header| {
                request
                    .headers
                    .header(&header.name)
                    .is_some_and(|value| header.value.matches(value))
            })
            && self.query_params.iter().all(|param| {
                query_value(request.query, &param.name)
                    .is_some_and(|value| param.value.matches(value))
            })
    }

    /// The prefix a `ReplacePrefixMatch` replaces: the `PathPrefix` this match has.
    pub fn prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatch::Prefix(prefix) => Some(prefix),
            _ => None,
        }
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => {
                let prefix = prefix.trim_end_matches('/');
                path.strip_prefix(prefix)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::RegularExpression(pattern) => pattern.is_match(path),
        }
    }
}

impl ValueMatchKind {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatchKind::Exact(exact) => value == exact,
            ValueMatchKind::RegularExpression(pattern) => pattern.is_match(value),
        }
    }
}

/// The first value of query parameter `name` (percent-encoding left as sent).
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// The Gateway API's precedence among the matches of a service's rules, greatest
/// first: an exact path, then the longest path prefix (a regular expression after
/// both: the specification leaves it to implementations), a method, the most header
/// matches, the most query parameter matches. Equal matches keep the order their routes
/// are given in: oldest route first, then by namespace and name, then rule order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    /// 2 exact, 1 prefix, 0 regular expression.
    path_kind: u8,
    path_length: usize,
    method: bool,
    headers: usize,
    query_params: usize,
}

impl Precedence {
    pub fn of(matched: &Match) -> Self {
        let (path_kind, path_length) = match &matched.path {
            PathMatch::Exact(path) => (2, path.len()),
            PathMatch::Prefix(path) => (1, path.trim_end_matches('/').len()),
            PathMatch::RegularExpression(_) => (0, 0),
        };
        Self {
            path_kind,
            path_length,
            method: matched.method.is_some(),
            headers: matched.headers.len(),
            query_params: matched.query_params.len(),
        }
    }
}

impl Rule {
    /// The sum of the backends' weights: 0 means every request is answered `500`.
    pub fn total_weight(&self) -> u64 {
        self.backends.iter().map(|b| u64::from(b.weight)).sum()
    }

    /// The backend whose share of the weight holds `point` (in `0..total_weight()`).
    pub fn backend_at(&self, mut point: u64) -> Option<&Backend> {
        self.backends.iter().find(|backend| {
            let weight = u64::from(backend.weight);
            if point < weight {
                true
            } else {
                point -= weight;
                false
            }
        })
    }
}

impl PathModifier {
    /// The path `path` becomes; `prefix` is the `PathPrefix` the request matched.
    pub fn apply(&self, path: &str, prefix: Option<&str>) -> String {
        match self {
            PathModifier::ReplaceFullPath(full) => full.clone(),
            PathModifier::ReplacePrefixMatch(replacement) => {
                let prefix = prefix.unwrap_or("/").trim_end_matches('/');
                let rest = path.strip_prefix(prefix).unwrap_or(path);
                let replacement = replacement.trim_end_matches('/');
                match (replacement.is_empty(), rest.is_empty()) {
                    (true, true) => "/".to_owned(),
                    (true, false) => rest.to_owned(),
                    (false, _) => format!("{replacement}{rest}"),
                }
            }
        }
    }
}

/// Where a request was sent, as a redirect needs it.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    pub scheme: &'a str,
    /// Without the port.
    pub host: &'a str,
    /// The service port the client addressed.
    pub port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

impl Redirect {
    /// The `Location` of the redirect for a request to `origin` that matched `prefix`.
    /// The port is left out where the scheme implies it (80 for http, 443 for https);
    /// with a scheme and no port, the scheme's port is meant.
    pub fn location(&self, origin: &Origin, prefix: Option<&str>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(origin.scheme);
        let host = self.hostname.as_deref().unwrap_or(origin.host);
        let port = match (self.port, &self.scheme) {
            (Some(port), _) => port,
            (None, Some(_)) => well_known_port(scheme).unwrap_or(origin.port),
            (None, None) => origin.port,
        };
        let path = match &self.path {
            Some(modifier) => modifier.apply(origin.path, prefix),
            None => origin.path.to_owned(),
        };
        let mut location = format!("{scheme}://{}", bracketed(host));
        if well_known_port(scheme) != Some(port) {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(query) = origin.query {
            location.push('?');
            location.push_str(query);
        }
        location
    }
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// An IPv6 address in brackets, as a URL writes it.
fn bracketed(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}
