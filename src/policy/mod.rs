//! The policy language: parse, resolve names, compile, check expectations,
//! explain decisions, format.
//!
//! Data flows one way: files → [`parse`] (syntax tree with spans) →
//! [`compile`] (names resolved, sets merged, classifier built) → [`Policy`].
//! Everything here is sans-IO except [`load::FsLoader`], the one place that
//! reads files, kept at the edge so the rest can be fuzzed and tested from
//! strings.
//!
//! What the module offers:
//! - [`load::load_policy`]: files in, a [`Compiled`] policy (or diagnostics) out.
//! - [`Policy`]: what an enforcement point holds: [`Policy::decide`] for
//!   packets, [`Policy::decide_http`] for proxy requests, the zones, the
//!   sha256 of the source.
//! - [`expect`], [`explain`] and [`fmt`] for the policy writer's commands.

pub mod addrset;
pub mod analysis;
pub mod ast;
mod compile;
pub mod date;
pub mod diag;
pub mod expect;
pub mod explain;
pub mod export;
pub mod fmt;
pub mod host;
pub mod import;
pub mod lint;
pub mod load;
pub mod parse;
pub mod source;
mod suggest;
pub mod target;

pub use addrset::AddrSet;
pub use compile::{compile, entries};
pub(crate) use compile::{icmp_code as compile_icmp_code, icmp_type as compile_icmp_type};
pub use date::Date;
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use host::{normalize_host, HostPattern};
pub use source::{SourceMap, Span};

use crate::classify::{FlowKey, Interval, PacketClassifier, RuleId};
use std::net::IpAddr;

/// What a rule or the default does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }

    /// The other verdict.
    pub fn opposite(self) -> Self {
        match self {
            Verdict::Allow => Verdict::Deny,
            Verdict::Deny => Verdict::Allow,
        }
    }
}

impl From<ast::Action> for Verdict {
    fn from(a: ast::Action) -> Self {
        match a {
            ast::Action::Allow => Verdict::Allow,
            ast::Action::Deny => Verdict::Deny,
        }
    }
}

/// Where a rule was written, for people and audit records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// One resolved service atom: protocol, source ports, destination ports
/// (ICMP type and code travel in the port fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAtom {
    pub proto: Interval<u8>,
    pub src_port: Interval<u16>,
    pub dst_port: Interval<u16>,
}

impl ServiceAtom {
    pub fn any() -> Self {
        ServiceAtom {
            proto: Interval { lo: 0, hi: 255 },
            src_port: Interval { lo: 0, hi: 65535 },
            dst_port: Interval { lo: 0, hi: 65535 },
        }
    }

    pub fn matches(&self, proto: u8, src_port: u16, dst_port: u16) -> bool {
        self.proto.contains(proto)
            && self.src_port.contains(src_port)
            && self.dst_port.contains(dst_port)
    }

    /// True when the atom can apply to this family (ICMP is IPv4 only,
    /// ICMPv6 IPv6 only).
    pub fn fits_v4(&self) -> bool {
        !(self.proto.lo == 58 && self.proto.hi == 58)
    }

    pub fn fits_v6(&self) -> bool {
        !(self.proto.lo == 1 && self.proto.hi == 1)
    }

    pub fn describe(&self) -> String {
        if *self == ServiceAtom::any() {
            return "any".into();
        }
        let proto = match (self.proto.lo, self.proto.hi) {
            (6, 6) => "tcp".to_string(),
            (17, 17) => "udp".to_string(),
            (132, 132) => "sctp".to_string(),
            (1, 1) => "icmp".to_string(),
            (58, 58) => "icmpv6".to_string(),
            (0, 255) => "ip".to_string(),
            (a, b) if a == b => format!("ip/{a}"),
            (a, b) => format!("ip/{a}-{b}"),
        };
        let range = |iv: Interval<u16>| {
            if iv.lo == iv.hi {
                iv.lo.to_string()
            } else {
                format!("{}-{}", iv.lo, iv.hi)
            }
        };
        let full = Interval { lo: 0, hi: 65535 };
        let mut s = proto.clone();
        let icmp = self.proto.lo == self.proto.hi && (self.proto.lo == 1 || self.proto.lo == 58);
        if icmp {
            if self.src_port != full {
                s.push('/');
                s.push_str(&range(self.src_port));
                if self.dst_port != full {
                    s.push(':');
                    s.push_str(&range(self.dst_port));
                }
            }
            return s;
        }
        if self.dst_port != full {
            s.push('/');
            s.push_str(&range(self.dst_port));
        }
        if self.src_port != full {
            s.push_str(" sport ");
            s.push_str(&range(self.src_port));
        }
        s
    }
}

/// A compiled packet rule with what it was made from.
#[derive(Clone, Debug)]
pub struct PacketRule {
    pub id: RuleId,
    pub name: String,
    pub verdict: Verdict,
    pub log: bool,
    pub src: AddrSet,
    pub dst: AddrSet,
    pub services: Vec<ServiceAtom>,
    pub owner: Option<String>,
    pub expires: Option<Date>,
    /// False when the rule has expired and no longer matches.
    pub active: bool,
    pub location: Location,
    pub span: Span,
}

impl PacketRule {
    /// Whether the rule's own sets contain the flow (ignores rule order).
    pub fn matches(&self, key: &FlowKey) -> bool {
        self.active
            && self.src.contains(key.src)
            && self.dst.contains(key.dst)
            && self.services.iter().any(|s| {
                s.matches(key.proto, key.src_port, key.dst_port)
                    && if key.src.is_ipv4() {
                        s.fits_v4()
                    } else {
                        s.fits_v6()
                    }
            })
    }
}

/// A compiled HTTP rule.
#[derive(Clone, Debug)]
pub struct HttpRule {
    pub name: String,
    pub verdict: Verdict,
    pub log: bool,
    pub src: AddrSet,
    pub hosts: Vec<HostPattern>,
    /// Destinations given as addresses (for requests to IP literals).
    pub addrs: AddrSet,
    /// Empty: every port.
    pub ports: Vec<Interval<u16>>,
    /// Upper-case; empty: every method.
    pub methods: Vec<String>,
    pub plain_tunnel: bool,
    pub owner: Option<String>,
    pub expires: Option<Date>,
    pub active: bool,
    pub location: Location,
    pub span: Span,
}

/// The destination of a proxy request: a normalised host name or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpHost {
    Name(String),
    Ip(IpAddr),
}

/// What the proxy knows of a request or tunnel when it decides.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub src: IpAddr,
    pub host: HttpHost,
    pub port: u16,
    /// Upper-case method; `CONNECT` for tunnels.
    pub method: String,
}

impl HttpRule {
    pub fn matches(&self, req: &HttpRequest) -> bool {
        self.active
            && self.src.contains(req.src)
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(req.port)))
            && (self.methods.is_empty() || self.methods.contains(&req.method))
            && match &req.host {
                HttpHost::Name(n) => self.hosts.iter().any(|h| h.matches(n)),
                HttpHost::Ip(ip) => {
                    self.addrs.contains(*ip) || self.hosts.contains(&HostPattern::Any)
                }
            }
    }
}

/// The appliance ports whose addresses a zone names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    Edge,
    Onprem,
}

impl Zone {
    pub fn as_str(self) -> &'static str {
        match self {
            Zone::Edge => "edge",
            Zone::Onprem => "onprem",
        }
    }
}

/// The addresses that may appear as sources on each port.
#[derive(Clone, Debug, Default)]
pub struct Zones {
    pub edge: Option<AddrSet>,
    pub onprem: Option<AddrSet>,
}

impl Zones {
    pub fn get(&self, zone: Zone) -> Option<&AddrSet> {
        match zone {
            Zone::Edge => self.edge.as_ref(),
            Zone::Onprem => self.onprem.as_ref(),
        }
    }

    /// The zone an address belongs to, if any.
    pub fn zone_of(&self, ip: IpAddr) -> Option<Zone> {
        if self.edge.as_ref().is_some_and(|s| s.contains(ip)) {
            Some(Zone::Edge)
        } else if self.onprem.as_ref().is_some_and(|s| s.contains(ip)) {
            Some(Zone::Onprem)
        } else {
            None
        }
    }
}

/// A decision on a packet flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The deciding rule; `None` when the default decided.
    pub rule: Option<RuleId>,
    pub log: bool,
}

/// A decision on a proxy request or tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpDecision {
    pub verdict: Verdict,
    /// Index of the deciding HTTP rule; `None` when the default decided.
    pub rule: Option<usize>,
    pub log: bool,
    pub plain_tunnel: bool,
}

/// The compiled policy an enforcement point holds.
#[derive(Clone, Debug)]
pub struct Policy {
    classifier: PacketClassifier,
    rules: Vec<PacketRule>,
    http: Vec<HttpRule>,
    default_verdict: Verdict,
    default_log: bool,
    default_location: Option<Location>,
    zones: Zones,
    sha256: String,
    /// Counts the changes of decisions an enforcement point made while
    /// holding policies (see [`Policy::with_generation`]).
    generation: u64,
    /// The policy's own `expect` statements and where they are: a policy
    /// in force is held to them when its rules expire (see
    /// [`Policy::expired_today`]).
    expectations: std::sync::Arc<Vec<(expect::Expectation, Location)>>,
}

impl Policy {
    /// The decision for a new flow: the first packet rule that matches, or
    /// the default.
    #[inline]
    pub fn decide(&self, key: &FlowKey) -> Decision {
        match self.classifier.classify(key) {
            Some(id) => {
                let r = &self.rules[id as usize];
                Decision {
                    verdict: r.verdict,
                    rule: Some(id),
                    log: r.log,
                }
            }
            None => self.default_decision(),
        }
    }

    pub fn default_decision(&self) -> Decision {
        Decision {
            verdict: self.default_verdict,
            rule: None,
            log: self.default_log,
        }
    }

    /// The decision for a proxy request: the first HTTP rule that matches,
    /// or the default.
    pub fn decide_http(&self, req: &HttpRequest) -> HttpDecision {
        match self.http.iter().position(|r| r.matches(req)) {
            Some(i) => HttpDecision {
                verdict: self.http[i].verdict,
                rule: Some(i),
                log: self.http[i].log,
                plain_tunnel: self.http[i].plain_tunnel,
            },
            None => HttpDecision {
                verdict: self.default_verdict,
                rule: None,
                log: self.default_log,
                plain_tunnel: false,
            },
        }
    }

    pub fn rules(&self) -> &[PacketRule] {
        &self.rules
    }

    pub fn rule(&self, id: RuleId) -> Option<&PacketRule> {
        self.rules.get(id as usize)
    }

    pub fn http_rules(&self) -> &[HttpRule] {
        &self.http
    }

    /// The name of a deciding packet rule, or `default`.
    pub fn rule_name(&self, rule: Option<RuleId>) -> &str {
        rule.and_then(|id| self.rules.get(id as usize))
            .map(|r| r.name.as_str())
            .unwrap_or("default")
    }

    pub fn http_rule_name(&self, rule: Option<usize>) -> &str {
        rule.and_then(|i| self.http.get(i))
            .map(|r| r.name.as_str())
            .unwrap_or("default")
    }

    /// Where the `default` statement was written, if there is one.
    pub fn default_location(&self) -> Option<&Location> {
        self.default_location.as_ref()
    }

    pub fn default_verdict(&self) -> Verdict {
        self.default_verdict
    }

    pub fn zones(&self) -> &Zones {
        &self.zones
    }

    /// Hex sha256 of the policy's source files, in load order.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn classifier(&self) -> &PacketClassifier {
        &self.classifier
    }

    /// The last day on which every active rule is still in force: the
    /// earliest `expires` date among them. From the day after, the policy
    /// decides differently (see [`Policy::expired_as_of`]).
    pub fn valid_until(&self) -> Option<Date> {
        let packet = self
            .rules
            .iter()
            .filter(|r| r.active)
            .filter_map(|r| r.expires);
        let http = self
            .http
            .iter()
            .filter(|r| r.active)
            .filter_map(|r| r.expires);
        packet.chain(http).min()
    }

    /// The policy as it stands on `today`: the rules whose `expires` date
    /// has passed no longer match, as if it had been compiled today. `None`
    /// when no active rule has expired; otherwise the policy and the names
    /// of the rules that expired. The source (and so `sha256`) is the same.
    pub fn expired_as_of(&self, today: Date) -> Option<(Policy, Vec<String>)> {
        // Asked every 30 s by the daemons: nothing is copied until a rule
        // has expired.
        if self.valid_until().is_none_or(|d| d >= today) {
            return None;
        }
        let mut p = self.clone();
        let mut expired = Vec::new();
        for r in &mut p.rules {
            if r.active && r.expires.is_some_and(|d| d < today) {
                r.active = false;
                expired.push(r.name.clone());
            }
        }
        for r in &mut p.http {
            if r.active && r.expires.is_some_and(|d| d < today) {
                r.active = false;
                expired.push(r.name.clone());
            }
        }
        let (v4, v6) = compile::entries(&p);
        // The entries are a subset of ones that built before.
        p.classifier = PacketClassifier::build(v4, v6).ok()?;
        Some((p, expired))
    }

    /// The policy as it stood before any of its rules expired: every rule
    /// in force again. `None` when none has expired (or, past the
    /// classifier's limits, it cannot be built). Used to tell an
    /// expectation that fails because a rule it relies on expired from one
    /// the policy's rules contradict.
    pub fn before_expiry(&self) -> Option<Policy> {
        let expired = |active: bool, expires: Option<Date>| !active && expires.is_some();
        if !self.rules.iter().any(|r| expired(r.active, r.expires))
            && !self.http.iter().any(|r| expired(r.active, r.expires))
        {
            return None;
        }
        let mut p = self.clone();
        for r in &mut p.rules {
            r.active |= r.expires.is_some();
        }
        for r in &mut p.http {
            r.active |= r.expires.is_some();
        }
        let (v4, v6) = compile::entries(&p);
        p.classifier = PacketClassifier::build(v4, v6).ok()?;
        Some(p)
    }

    /// [`Policy::expired_as_of`] for an enforcement point: the policy as it
    /// stands today, and a line for the trail and the operator saying which
    /// rules expired, or `None` when none did.
    ///
    /// One exception keeps the policy in force from failing its own tests:
    /// when the expiry would let through a flow or request that one of the
    /// policy's `expect ... deny` statements holds it to deny (a deny rule
    /// expired above a broader allow), the deny rules that expired stay in
    /// force, and the line says so and names the expectations. (The allow
    /// rules still expire: taking allow rules away never lets anything
    /// through that was denied.) Started or reloaded with the file as it
    /// stands, a daemon would refuse it (E0400); until the file is fixed,
    /// the running one denies as the expectations say. A rule so held has
    /// its date cleared in the policy returned, so it is not reported again.
    pub fn expired_today(&self) -> Option<(Policy, String)> {
        self.expired_in_force(Date::today())
    }

    /// [`Policy::expired_today`] on `today`.
    pub fn expired_in_force(&self, today: Date) -> Option<(Policy, String)> {
        let (mut p, mut expired) = self.expired_as_of(today)?;
        let widened: Vec<&(expect::Expectation, Location)> = self
            .expectations
            .iter()
            // Widening is about the verdict alone: an `expect deny ... by
            // a` that another deny rule already decides (W0404 once `a`
            // expired) still guards against the flow being allowed.
            .filter(|(e, _)| {
                e.verdict == Verdict::Deny
                    && expect::run(self, e).verdict == Verdict::Deny
                    && expect::run(&p, e).verdict == Verdict::Allow
            })
            .collect();
        let mut held = Vec::new();
        if !widened.is_empty() {
            for (r, was) in p.rules.iter_mut().zip(&self.rules) {
                if was.active && !r.active && r.verdict == Verdict::Deny {
                    (r.active, r.expires) = (true, None);
                    held.push(r.name.clone());
                }
            }
            for (r, was) in p.http.iter_mut().zip(&self.http) {
                if was.active && !r.active && r.verdict == Verdict::Deny {
                    (r.active, r.expires) = (true, None);
                    held.push(r.name.clone());
                }
            }
            let (v4, v6) = compile::entries(&p);
            // The entries are a subset of the ones `self` was built with.
            p.classifier = PacketClassifier::build(v4, v6).ok()?;
        }
        let quoted = |names: &[String]| {
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // Rule names are one namespace for packet and HTTP rules.
        expired.retain(|n| !held.contains(n));
        let mut why = format!("again on {today}: ");
        if !expired.is_empty() {
            why += &format!("rule(s) {} expired and no longer match", quoted(&expired));
        }
        if !held.is_empty() {
            let tests: Vec<String> = widened
                .iter()
                .map(|(e, at)| format!("`{}` ({at})", e.text))
                .collect();
            why += &format!(
                "{}deny rule(s) {} expired but stay in force: without them the policy fails its \
                 expectation(s) {} (access widened); fix the policy and reload",
                if expired.is_empty() { "" } else { "; " },
                quoted(&held),
                tests.join(", ")
            );
        }
        Some((p, why))
    }

    /// Whether two policies decide every flow and request alike: the same
    /// source, and the same rules in force.
    pub fn decides_as(&self, other: &Policy) -> bool {
        self.sha256 == other.sha256
            && self
                .rules
                .iter()
                .map(|r| r.active)
                .eq(other.rules.iter().map(|r| r.active))
            && self
                .http
                .iter()
                .map(|r| r.active)
                .eq(other.http.iter().map(|r| r.active))
    }

    /// A number an enforcement point gives each policy it puts in force,
    /// changed whenever decisions change, so that what was decided under
    /// an earlier one is decided again.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn with_generation(mut self, generation: u64) -> Policy {
        self.generation = generation;
        self
    }
}

/// A policy with what it was compiled from: the sources, the expectations
/// and the non-fatal diagnostics.
#[derive(Debug)]
pub struct Compiled {
    pub policy: Policy,
    pub sources: SourceMap,
    pub expectations: Vec<expect::Expectation>,
    pub diagnostics: Diagnostics,
    pub stats: Stats,
    /// The syntax trees, one per file in load order (for lint and fmt).
    pub syntax: Vec<ast::File>,
}

/// Counts for the one-line summary of `palisade check`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: usize,
    pub rules: usize,
    pub http_rules: usize,
    pub names: usize,
    pub entries: usize,
}

/// Compile-time settings that come from outside the text.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Today's date: rules that expired before it no longer match.
    pub today: Date,
}
