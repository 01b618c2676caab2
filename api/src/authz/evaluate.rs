//! The decision: what the policies selecting a destination say about one connection
//! or request, in Istio's order (DENY, then ALLOW, then the default), with AUDIT
//! matches and the dry-run policies' own decision alongside.
//!
//! A rule is evaluated three-valued: before the agent knows whether a connection
//! carries HTTP, or before a request on it arrives ([`Traffic::Unknown`]), a rule
//! whose HTTP conditions would decide it "may" match, and the verdict is
//! [`Verdict::Pending`]: the connection is let in and each request decides.

use std::net::IpAddr;

use serde::Serialize;

use super::{Action, Condition, Key, Operation, Pattern, Policy, Rule, Source, Values};

/// Who is calling. Without a principal (plaintext), only address rules can match.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller<'a> {
    /// The verified SPIFFE ID without `spiffe://`: `<trust-domain>/ns/<ns>/sa/<account>`.
    pub principal: Option<&'a str>,
    pub ip: Option<IpAddr>,
}

impl<'a> Caller<'a> {
    /// The principal's namespace and service account.
    fn account(&self) -> Option<(&'a str, &'a str)> {
        let mut parts = self.principal?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(_), Some("ns"), Some(namespace), Some("sa"), Some(account)) => {
                Some((namespace, account))
            }
            _ => None,
        }
    }
}

/// A caller with its principal's namespace and account parsed once per decision.
#[derive(Clone, Copy)]
struct Subject<'a> {
    principal: Option<&'a str>,
    account: Option<(&'a str, &'a str)>,
    ip: Option<IpAddr>,
}

impl<'a> From<&Caller<'a>> for Subject<'a> {
    fn from(caller: &Caller<'a>) -> Self {
        Subject {
            principal: caller.principal,
            account: caller.account(),
            ip: caller.ip,
        }
    }
}

/// The pod being reached: its address and (container) port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
}

/// Header lookup by lower-case name.
pub trait Headers {
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for Vec<(String, String)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// An HTTP request, as the rules see it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// `:authority` or `Host`; may carry a port.
    pub host: &'a str,
    pub headers: &'a dyn Headers,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}{}", self.method, self.host, self.path)
    }
}

/// What the connection is known to carry.
#[derive(Clone, Copy, Debug)]
pub enum Traffic<'a> {
    /// Not known yet (before detection), or HTTP before its requests.
    Unknown,
    /// TCP: HTTP conditions cannot be checked (a DENY rule takes them as met, an ALLOW
    /// or AUDIT rule as not).
    Tcp,
    Http(Request<'a>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Allow,
    Deny,
    /// HTTP conditions decide: each request will.
    DependsOnRequest,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
            Verdict::DependsOnRequest => "DEPENDS_ON_REQUEST",
        }
    }
}

/// A rule that matched: `policy.rules[rule]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matched<'p> {
    pub policy: &'p Policy,
    pub rule: usize,
}

/// Why the verdict is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason<'p> {
    /// A rule of a DENY policy, or of an ALLOW policy, matched.
    Matched(Matched<'p>),
    /// No policy selects the destination.
    NoPolicy,
    /// No DENY rule matched, and no ALLOW policy selects the destination.
    NoAllowPolicy,
    /// ALLOW policies select the destination and none of their rules matched.
    NoAllowMatched,
    /// A rule's HTTP conditions decide.
    HttpConditions,
}

/// The decision of the enforced policies, with the AUDIT rules that matched and what
/// the dry-run policies would have decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<'p> {
    pub verdict: Verdict,
    pub reason: Reason<'p>,
    pub audited: Vec<Matched<'p>>,
    /// The dry-run policies' decision, when any selects the destination.
    pub dry_run: Option<(Verdict, Reason<'p>)>,
}

impl Decision<'_> {
    pub fn denied(&self) -> bool {
        self.verdict == Verdict::Deny
    }

    /// The policy that decided (`<namespace>/<name>`), or how the default decided.
    pub fn decided_by(&self) -> String {
        self.reason.decided_by()
    }
}

impl Reason<'_> {
    /// The policy (`<namespace>/<name>`), or `default allow`, `default deny`, `pending`.
    pub fn decided_by(&self) -> String {
        match self {
            Reason::Matched(matched) => matched.policy.key(),
            Reason::NoPolicy | Reason::NoAllowPolicy => "default allow".to_owned(),
            Reason::NoAllowMatched => "default deny".to_owned(),
            Reason::HttpConditions => "pending".to_owned(),
        }
    }
}

/// What `policies` (those selecting the target) decide for `caller` reaching `target`.
pub fn evaluate<'p, I>(
    policies: I,
    caller: &Caller<'_>,
    target: Target,
    traffic: Traffic<'_>,
) -> Decision<'p>
where
    I: IntoIterator<Item = &'p Policy>,
    I::IntoIter: Clone,
{
    let policies = policies.into_iter();
    let caller = Subject::from(caller);
    let enforced = decide(policies.clone(), false, caller, target, traffic);
    let dry_run = policies
        .clone()
        .any(|policy| policy.dry_run)
        .then(|| decide(policies, true, caller, target, traffic))
        .map(|shadow| (shadow.verdict, shadow.reason));
    Decision {
        dry_run,
        ..enforced
    }
}

/// Three-valued: "may" is a match that HTTP conditions not known yet decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Match {
    No,
    May,
    Yes,
}

impl From<bool> for Match {
    fn from(matches: bool) -> Self {
        if matches { Match::Yes } else { Match::No }
    }
}

/// The best of `matches` (`Yes` for none: an empty list matches anything).
fn any<T>(entries: &[T], matches: impl Fn(&T) -> Match) -> Match {
    if entries.is_empty() {
        return Match::Yes;
    }
    let mut best = Match::No;
    for entry in entries {
        match matches(entry) {
            Match::Yes => return Match::Yes,
            Match::May => best = Match::May,
            Match::No => {}
        }
    }
    best
}

/// The worst of two.
fn both(left: Match, right: Match) -> Match {
    match (left, right) {
        (Match::No, _) | (_, Match::No) => Match::No,
        (Match::May, _) | (_, Match::May) => Match::May,
        _ => Match::Yes,
    }
}

/// An entry list that must match if given.
fn listed<T>(entries: &[T], matches: impl Fn(&T) -> bool) -> bool {
    entries.is_empty() || entries.iter().any(matches)
}

/// An entry list none of which may match.
fn unlisted<T>(entries: &[T], matches: impl Fn(&T) -> bool) -> bool {
    !entries.iter().any(matches)
}

/// The decision of the enforced (or, with `dry_run`, of the dry-run) policies.
fn decide<'p>(
    policies: impl Iterator<Item = &'p Policy>,
    dry_run: bool,
    caller: Subject<'_>,
    target: Target,
    traffic: Traffic<'_>,
) -> Decision<'p> {
    let mut any_policy = false;
    let (mut deny, mut deny_may) = (None, false);
    let (mut allow, mut allow_may, mut allow_policies) = (None, false, false);
    let mut audited = Vec::new();
    for policy in policies.filter(|policy| policy.dry_run == dry_run) {
        any_policy = true;
        let first = |policy| first_match(policy, caller, target, traffic);
        match policy.action {
            Action::Deny if deny.is_none() => match first(policy) {
                (Match::Yes, rule) => deny = Some(Matched { policy, rule }),
                (Match::May, _) => deny_may = true,
                (Match::No, _) => {}
            },
            Action::Allow => {
                allow_policies = true;
                if allow.is_none() {
                    match first(policy) {
                        (Match::Yes, rule) => allow = Some(Matched { policy, rule }),
                        (Match::May, _) => allow_may = true,
                        (Match::No, _) => {}
                    }
                }
            }
            Action::Audit => {
                if let (Match::Yes, rule) = first(policy) {
                    audited.push(Matched { policy, rule });
                }
            }
            Action::Deny => {}
        }
    }
    let (verdict, reason) = if let Some(matched) = deny {
        (Verdict::Deny, Reason::Matched(matched))
    } else if allow_policies && allow.is_none() && !allow_may {
        (Verdict::Deny, Reason::NoAllowMatched)
    } else if deny_may || allow.is_none() && allow_may {
        (Verdict::DependsOnRequest, Reason::HttpConditions)
    } else if let Some(matched) = allow {
        (Verdict::Allow, Reason::Matched(matched))
    } else if any_policy {
        (Verdict::Allow, Reason::NoAllowPolicy)
    } else {
        (Verdict::Allow, Reason::NoPolicy)
    };
    Decision {
        verdict,
        reason,
        audited,
        dry_run: None,
    }
}

/// The first rule of `policy` that matches, else whether one may.
fn first_match(
    policy: &Policy,
    caller: Subject<'_>,
    target: Target,
    traffic: Traffic<'_>,
) -> (Match, usize) {
    let mut best = (Match::No, 0);
    for (index, rule) in policy.rules.iter().enumerate() {
        match rule_matches(rule, policy.action, caller, target, traffic) {
            Match::Yes => return (Match::Yes, index),
            Match::May if best.0 == Match::No => best = (Match::May, index),
            _ => {}
        }
    }
    best
}

fn rule_matches(
    rule: &Rule,
    action: Action,
    caller: Subject<'_>,
    target: Target,
    traffic: Traffic<'_>,
) -> Match {
    let from = any(&rule.from, |source| source_matches(source, caller).into());
    if from == Match::No {
        return Match::No;
    }
    let to = any(&rule.to, |operation| {
        operation_matches(operation, action, target, traffic)
    });
    let when = rule.when.iter().fold(Match::Yes, |all, condition| {
        both(
            all,
            condition_matches(condition, action, caller, target, traffic),
        )
    });
    both(from, both(to, when))
}

fn source_matches(source: &Source, caller: Subject<'_>) -> bool {
    let principal = |pattern: &Pattern| caller.principal.is_some_and(|id| pattern.matches(id));
    let account = caller.account;
    let namespace = |pattern: &Pattern| account.is_some_and(|(ns, _)| pattern.matches(ns));
    let service_account =
        |entry: &String| account.is_some_and(|(ns, sa)| entry.split_once('/') == Some((ns, sa)));
    let ip = |block: &super::IpBlock| caller.ip.is_some_and(|ip| block.contains(ip));
    listed(&source.principals, principal)
        && unlisted(&source.not_principals, principal)
        && listed(&source.namespaces, namespace)
        && unlisted(&source.not_namespaces, namespace)
        && listed(&source.service_accounts, service_account)
        && unlisted(&source.not_service_accounts, service_account)
        && listed(&source.ip_blocks, ip)
        && unlisted(&source.not_ip_blocks, ip)
}

/// HTTP conditions against `traffic`: checked on a request, taken as met by a DENY
/// rule on TCP (and as not met by the others), undecided before a request.
fn http(action: Action, traffic: Traffic<'_>, check: impl FnOnce(&Request<'_>) -> bool) -> Match {
    match traffic {
        Traffic::Http(request) => check(&request).into(),
        Traffic::Tcp => (action == Action::Deny).into(),
        Traffic::Unknown => Match::May,
    }
}

fn operation_matches(
    operation: &Operation,
    action: Action,
    target: Target,
    traffic: Traffic<'_>,
) -> Match {
    let port = |port: &u16| *port == target.port;
    let ports = listed(&operation.ports, port) && unlisted(&operation.not_ports, port);
    if !ports {
        return Match::No;
    }
    if !operation.is_http() {
        return Match::Yes;
    }
    http(action, traffic, |request| {
        let host = |pattern: &Pattern| host_matches(pattern, request.host);
        let method = |pattern: &Pattern| pattern.matches(request.method);
        let path = |pattern: &Pattern| pattern.matches(request.path);
        listed(&operation.hosts, host)
            && unlisted(&operation.not_hosts, host)
            && listed(&operation.methods, method)
            && unlisted(&operation.not_methods, method)
            && listed(&operation.paths, path)
            && unlisted(&operation.not_paths, path)
    })
}

/// Case-insensitive, against the host with and without its port.
fn host_matches(pattern: &Pattern, host: &str) -> bool {
    let without_port = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    [host, without_port].into_iter().any(|host| {
        let host = host.as_bytes();
        match pattern {
            Pattern::Any => !host.is_empty(),
            Pattern::Exact(exact) => host.eq_ignore_ascii_case(exact.as_bytes()),
            Pattern::Prefix(prefix) => host
                .get(..prefix.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(prefix.as_bytes())),
            Pattern::Suffix(suffix) => host
                .len()
                .checked_sub(suffix.len())
                .is_some_and(|at| host[at..].eq_ignore_ascii_case(suffix.as_bytes())),
        }
    })
}

fn condition_matches(
    condition: &Condition,
    action: Action,
    caller: Subject<'_>,
    target: Target,
    traffic: Traffic<'_>,
) -> Match {
    let holds = |value: Option<Attribute<'_>>| match value {
        Some(value) => {
            (condition.values.is_empty() || condition.values.contains(value))
                && !condition.not_values.contains(value)
        }
        // An absent attribute matches no value, so it meets only `notValues`.
        None => condition.values.is_empty(),
    };
    let value = match &condition.key {
        Key::Header(name) => {
            return http(action, traffic, |request| {
                holds(request.headers.header(name).map(Attribute::Text))
            });
        }
        Key::SourceIp => caller.ip.map(Attribute::Ip),
        Key::SourceNamespace => caller.account.map(|(ns, _)| Attribute::Text(ns)),
        Key::SourcePrincipal => caller.principal.map(Attribute::Text),
        Key::DestinationIp => Some(Attribute::Ip(target.ip)),
        Key::DestinationPort => Some(Attribute::Port(target.port)),
    };
    holds(value).into()
}

/// A value a condition looks at.
#[derive(Clone, Copy)]
enum Attribute<'a> {
    Text(&'a str),
    Ip(IpAddr),
    Port(u16),
}

impl Values {
    fn is_empty(&self) -> bool {
        match self {
            Values::Text(values) => values.is_empty(),
            Values::Addresses(values) => values.is_empty(),
            Values::Ports(values) => values.is_empty(),
        }
    }

    fn contains(&self, value: Attribute<'_>) -> bool {
        match (self, value) {
            (Values::Text(patterns), Attribute::Text(text)) => {
                patterns.iter().any(|pattern| pattern.matches(text))
            }
            (Values::Addresses(blocks), Attribute::Ip(ip)) => {
                blocks.iter().any(|block| block.contains(ip))
            }
            (Values::Ports(ports), Attribute::Port(port)) => ports.contains(&port),
            _ => false,
        }
    }
}

/// A decision in words, for the admin endpoints and the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub decision: Verdict,
    /// The policy that decided, `<namespace>/<name>`; none when a default did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The index of the rule that matched in the policy's `spec.rules`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    pub reason: String,
    /// The policies that select the destination.
    pub policies: Vec<String>,
    /// The AUDIT rules that matched, `<namespace>/<name> rules[<index>]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<String>,
    /// What the dry-run policies would decide.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRun>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    pub decision: Verdict,
    pub reason: String,
}

/// [`evaluate`], in words.
pub fn explain<'p, I>(
    policies: I,
    caller: &Caller<'_>,
    target: Target,
    traffic: Traffic<'_>,
) -> Explanation
where
    I: IntoIterator<Item = &'p Policy>,
    I::IntoIter: Clone,
{
    let policies = policies.into_iter();
    let decision = evaluate(policies.clone(), caller, target, traffic);
    let matched = match decision.reason {
        Reason::Matched(matched) => Some(matched),
        _ => None,
    };
    Explanation {
        decision: decision.verdict,
        policy: matched.map(|matched| matched.policy.key()),
        action: matched.map(|matched| matched.policy.action),
        rule: matched.map(|matched| matched.rule),
        reason: describe(decision.verdict, &decision.reason),
        policies: policies
            .map(|policy| {
                let dry_run = if policy.dry_run { ", dry run" } else { "" };
                format!("{} ({}{dry_run})", policy.key(), policy.action.as_str())
            })
            .collect(),
        audited: decision
            .audited
            .iter()
            .map(|matched| format!("{} rules[{}]", matched.policy.key(), matched.rule))
            .collect(),
        dry_run: decision.dry_run.map(|(verdict, reason)| DryRun {
            decision: verdict,
            reason: describe(verdict, &reason),
        }),
    }
}

fn describe(verdict: Verdict, reason: &Reason<'_>) -> String {
    match reason {
        Reason::Matched(matched) => format!(
            "{} by {} policy {}: rule {} (spec.rules[{}]) matches",
            if verdict == Verdict::Deny {
                "denied"
            } else {
                "allowed"
            },
            matched.policy.action.as_str(),
            matched.policy.key(),
            matched.rule,
            matched.rule
        ),
        Reason::NoPolicy => "allowed by default: no policy selects the destination".to_owned(),
        Reason::NoAllowPolicy => {
            "allowed by default: no DENY rule matches and no ALLOW policy selects the destination"
                .to_owned()
        }
        Reason::NoAllowMatched => "denied by default: ALLOW policies select the destination \
                                   and none of their rules matches"
            .to_owned(),
        Reason::HttpConditions => "depends on the request: rules with HTTP conditions decide; \
                                   give the method, path, host and headers"
            .to_owned(),
    }
}
