//! Resolution and compilation: syntax trees to a [`Policy`].
//!
//! Names are resolved across all files of the policy (one namespace for
//! networks and services, one for rules), sets are merged into intervals,
//! every value is checked, and each packet rule becomes the cross product of
//! its source intervals, destination intervals and service atoms, per
//! family, handed to the classifier in rule order.

use super::addrset::{normalize, prefix_interval, AddrSet};
use super::ast::{self, Family, NetItem, SvcItem};
use super::diag::{Diagnostic, Diagnostics};
use super::expect::{self, Expectation};
use super::host::{HostPattern, HostPatternError};
use super::source::{SourceMap, Span};
use super::suggest::closest;
use super::{
    Compiled, Date, HttpRule, Location, Options, PacketRule, Policy, ServiceAtom, Stats, Verdict,
    Zones,
};
use crate::classify::{Entry, Fields, Interval, PacketClassifier, RuleId};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;

/// Deepest chain of names using names.
const MAX_NAME_DEPTH: usize = 64;
/// Most classifier entries a policy may expand to, per family.
const MAX_ENTRIES: usize = 2_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Net,
    Svc,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Net => "network",
            Kind::Svc => "service",
        }
    }
}

enum Slot<T> {
    Pending,
    InProgress,
    /// `None` when resolving failed (already reported).
    Done(Option<T>),
}

/// Definitions of one namespace with their resolution state.
type Table<'a, T, R> = HashMap<&'a str, (&'a ast::Def<T>, Slot<R>)>;

struct Resolver<'a> {
    sources: &'a SourceMap,
    diags: Diagnostics,
    names: HashMap<&'a str, (Kind, Span)>,
    nets: Table<'a, NetItem, AddrSet>,
    svcs: Table<'a, SvcItem, Vec<ServiceAtom>>,
    /// Names being resolved, for cycle messages.
    stack: Vec<&'a str>,
}

/// Compiles parsed files into a policy. `diags` holds what parsing found;
/// on any error the result is `Err` with all diagnostics.
pub fn compile(
    sources: SourceMap,
    files: Vec<ast::File>,
    opts: Options,
    diags: Diagnostics,
) -> Result<Compiled, (SourceMap, Diagnostics)> {
    let (result, mut diags) = {
        let mut r = Resolver {
            sources: &sources,
            diags,
            names: HashMap::new(),
            nets: HashMap::new(),
            svcs: HashMap::new(),
            stack: Vec::new(),
        };
        let out = r.run(&files, opts);
        (out, r.diags)
    };
    diags.sort();
    match result {
        Some((policy, expectations, stats)) if !diags.has_errors() => Ok(Compiled {
            policy,
            sources,
            expectations,
            diagnostics: diags,
            stats,
            syntax: files,
        }),
        _ => Err((sources, diags)),
    }
}

fn sha256_of(sources: &SourceMap) -> String {
    let mut h = Sha256::new();
    for (_, f) in sources.files() {
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    hex::encode(h.finalize())
}

pub(crate) fn icmp_type(v6: bool, name: &str) -> Option<u8> {
    let table: &[(&str, u8)] = if v6 {
        &[
            ("destination-unreachable", 1),
            ("packet-too-big", 2),
            ("time-exceeded", 3),
            ("parameter-problem", 4),
            ("echo-request", 128),
            ("echo-reply", 129),
            ("mld-listener-query", 130),
            ("mld-listener-report", 131),
            ("mld-listener-done", 132),
            ("router-solicitation", 133),
            ("router-advertisement", 134),
            ("neighbor-solicitation", 135),
            ("neighbor-advertisement", 136),
            ("redirect", 137),
        ]
    } else {
        &[
            ("echo-reply", 0),
            ("destination-unreachable", 3),
            ("source-quench", 4),
            ("redirect", 5),
            ("echo-request", 8),
            ("router-advertisement", 9),
            ("router-solicitation", 10),
            ("time-exceeded", 11),
            ("parameter-problem", 12),
            ("timestamp-request", 13),
            ("timestamp-reply", 14),
        ]
    };
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

pub(crate) fn icmp_code(v6: bool, name: &str) -> Option<u8> {
    let table: &[(&str, u8)] = if v6 {
        &[
            ("no-route", 0),
            ("admin-prohibited", 1),
            ("addr-unreachable", 3),
            ("port-unreachable", 4),
        ]
    } else {
        &[
            ("net-unreachable", 0),
            ("host-unreachable", 1),
            ("protocol-unreachable", 2),
            ("port-unreachable", 3),
            ("fragmentation-needed", 4),
            ("admin-prohibited", 13),
        ]
    };
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

impl<'a> Resolver<'a> {
    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn location(&self, span: Span) -> Location {
        let f = self.sources.file(span.file);
        let lc = f.line_col(span.start);
        Location {
            file: f.path.display().to_string(),
            line: lc.line,
            col: lc.col,
        }
    }

    fn run(
        &mut self,
        files: &'a [ast::File],
        opts: Options,
    ) -> Option<(Policy, Vec<Expectation>, Stats)> {
        // Pass 1: declare every name.
        let mut zones_ast: Vec<&ast::Def<NetItem>> = Vec::new();
        let mut rule_names: HashMap<&str, Span> = HashMap::new();
        let mut default: Option<&ast::DefaultStmt> = None;
        for f in files {
            for s in &f.stmts {
                match s {
                    ast::Stmt::Net(d) => {
                        if self.declare(&d.name, Kind::Net) {
                            self.nets.insert(&d.name.text, (d, Slot::Pending));
                        }
                    }
                    ast::Stmt::Svc(d) => {
                        if self.declare(&d.name, Kind::Svc) {
                            self.svcs.insert(&d.name.text, (d, Slot::Pending));
                        }
                    }
                    ast::Stmt::Zone(d) => zones_ast.push(d),
                    ast::Stmt::Rule(ast::PacketRule { name, .. })
                    | ast::Stmt::Http(ast::HttpRule { name, .. }) => {
                        // `default` names the policy's default in explain,
                        // diff, expectations and audit records; `any` and
                        // the keywords would read as something else.
                        if matches!(name.text.as_str(), "default" | "any" | "any4" | "any6") {
                            self.err(
                                Diagnostic::error(
                                    "E0105",
                                    format!("`{}` is reserved and cannot name a rule", name.text),
                                )
                                .at(name.span, "reserved word")
                                .help(format!(
                                    "`{}` already means something in the policy language; choose another name",
                                    name.text
                                )),
                            );
                        } else if let Some(first) = rule_names.get(name.text.as_str()) {
                            let d = Diagnostic::error(
                                "E0102",
                                format!("rule `{}` is defined twice", name.text),
                            )
                            .at(name.span, "defined again here")
                            .also(*first, "first defined here")
                            .help(
                                "rule names appear in audit records; give each rule its own name",
                            );
                            self.err(d);
                        } else {
                            rule_names.insert(&name.text, name.span);
                        }
                    }
                    ast::Stmt::Default(d) => {
                        if let Some(first) = default {
                            let diag =
                                Diagnostic::error("E0304", "more than one `default` statement")
                                    .at(d.span, "second default")
                                    .also(first.span, "first default");
                            self.err(diag);
                        } else {
                            default = Some(d);
                        }
                    }
                    ast::Stmt::Include { .. } | ast::Stmt::Expect(_) => {}
                }
            }
        }

        // Pass 2: resolve every definition, used or not, so errors surface.
        let mut net_names: Vec<&str> = self.nets.keys().copied().collect();
        net_names.sort_unstable();
        for n in &net_names {
            self.resolve_net(n, None);
        }
        let mut svc_names: Vec<&str> = self.svcs.keys().copied().collect();
        svc_names.sort_unstable();
        for n in &svc_names {
            self.resolve_svc(n, None);
        }

        let zones = self.zones(&zones_ast);

        // Pass 3: rules in order.
        let mut rules = Vec::new();
        let mut http = Vec::new();
        let mut entries_v4: Vec<Entry<u32>> = Vec::new();
        let mut entries_v6: Vec<Entry<u128>> = Vec::new();
        let mut too_big = false;
        for f in files {
            for s in &f.stmts {
                match s {
                    ast::Stmt::Rule(r) => {
                        let id = rules.len() as RuleId;
                        if let Some(rule) = self.packet_rule(r, id, opts.today) {
                            if rule.active && !too_big {
                                expand(&rule, &mut entries_v4, &mut entries_v6);
                                if entries_v4.len() > MAX_ENTRIES || entries_v6.len() > MAX_ENTRIES
                                {
                                    too_big = true;
                                    self.err(
                                        Diagnostic::error(
                                            "E0306",
                                            format!("the policy expands to more than {MAX_ENTRIES} classifier entries"),
                                        )
                                        .at(r.name.span, "the limit was passed at this rule")
                                        .help("a rule is the product of its sources, destinations and services; split very large rules or merge address lists into prefixes"),
                                    );
                                }
                            }
                            rules.push(rule);
                        } else {
                            // Keep rule ids stable even when a rule is broken.
                            rules.push(placeholder_rule(id, r, self.location(r.span)));
                        }
                    }
                    ast::Stmt::Http(r) => {
                        if let Some(rule) = self.http_rule(r, opts.today) {
                            http.push(rule);
                        }
                    }
                    _ => {}
                }
            }
        }

        let (default_verdict, default_log) = match default {
            Some(d) => (Verdict::from(d.action), d.log),
            None if self.diags.has_errors() => (Verdict::Deny, false),
            None => {
                let first = files
                    .iter()
                    .flat_map(|f| f.stmts.first())
                    .next()
                    .map(|s| s.span());
                let mut d = Diagnostic::warning(
                    "W0303",
                    "the policy has no `default` statement; traffic no rule matches is denied",
                )
                .help("add `default deny log` to say so explicitly");
                if let Some(span) = first {
                    d = d.at(Span::new(span.file, 0, 0), "");
                }
                self.err(d);
                (Verdict::Deny, false)
            }
        };

        let entry_count = entries_v4.len() + entries_v6.len();
        let classifier = match PacketClassifier::build(entries_v4, entries_v6) {
            Ok(c) => c,
            Err(e) => {
                self.err(Diagnostic::error(
                    "E0306",
                    format!("cannot build the classifier: {e}"),
                ));
                return None;
            }
        };
        let stats = Stats {
            files: self.sources.files().count(),
            rules: rules.len(),
            http_rules: http.len(),
            names: self.names.len(),
            entries: entry_count,
        };
        let policy = Policy {
            classifier,
            rules,
            http,
            default_verdict,
            default_log,
            default_location: default.map(|d| self.location(d.span)),
            zones,
            sha256: sha256_of(self.sources),
            generation: 0,
            expectations: Default::default(),
        };

        // Expectations, resolved against the compiled policy.
        let mut expectations = Vec::new();
        for f in files {
            for s in &f.stmts {
                if let ast::Stmt::Expect(e) = s {
                    match expect::resolve(e, &policy, self.sources) {
                        Ok(x) => expectations.push(x),
                        Err(d) => self.err(d),
                    }
                }
            }
        }
        if self.diags.has_errors() {
            return None;
        }
        let mut policy = policy;
        policy.expectations = std::sync::Arc::new(
            expectations
                .iter()
                .map(|e: &expect::Expectation| (e.clone(), self.location(e.span)))
                .collect(),
        );
        Some((policy, expectations, stats))
    }

    /// Records a definition; false (and an error) when the name is taken.
    fn declare(&mut self, name: &'a ast::Name, kind: Kind) -> bool {
        if matches!(name.text.as_str(), "any" | "any4" | "any6") {
            self.err(
                Diagnostic::error(
                    "E0105",
                    format!("`{}` is reserved and cannot be defined", name.text),
                )
                .at(name.span, "reserved word"),
            );
            return false;
        }
        if let Some((k, first)) = self.names.get(name.text.as_str()) {
            let d = Diagnostic::error("E0102", format!("`{}` is defined twice", name.text))
                .at(name.span, "defined again here")
                .also(*first, format!("first defined here as a {}", k.noun()));
            self.err(d);
            return false;
        }
        self.names.insert(&name.text, (kind, name.span));
        true
    }

    fn unknown(&mut self, name: &ast::Name, want: Kind) {
        if let Some((k, span)) = self.names.get(name.text.as_str()).copied() {
            let d = Diagnostic::error(
                "E0104",
                format!("`{}` is a {}, not a {}", name.text, k.noun(), want.noun()),
            )
            .at(name.span, format!("expected a {}", want.noun()))
            .also(span, format!("`{}` is defined here", name.text));
            self.err(d);
            return;
        }
        let candidates: Vec<&str> = self
            .names
            .iter()
            .filter(|(_, (k, _))| *k == want)
            .map(|(n, _)| *n)
            .collect();
        let mut d = Diagnostic::error("E0101", format!("unknown {} `{}`", want.noun(), name.text))
            .at(name.span, "not defined");
        if let Some(c) = closest(&name.text, candidates) {
            d = d.help(format!("did you mean `{c}`?"));
        } else if want == Kind::Net {
            d = d.help(format!("define it with `net {} = ...`", name.text));
        } else {
            d = d.help(format!("define it with `svc {} = ...`", name.text));
        }
        self.err(d);
    }

    fn cycle(&mut self, name: &ast::Name) {
        let pos = self.stack.iter().position(|n| *n == name.text).unwrap_or(0);
        let mut path: Vec<&str> = self.stack[pos..].to_vec();
        path.push(&name.text);
        let d = Diagnostic::error(
            "E0103",
            format!("names form a cycle: {}", path.join(" -> ")),
        )
        .at(name.span, "refers back to a name being defined");
        self.err(d);
    }

    /// Resolves a defined name once (memoised), reporting cycles and
    /// chains deeper than [`MAX_NAME_DEPTH`]. `table` picks the namespace's
    /// definitions and `items` resolves a definition's items.
    fn resolve_named<T: 'a, R: Clone>(
        &mut self,
        name: &'a str,
        at: Option<&ast::Name>,
        table: fn(&mut Self) -> &mut Table<'a, T, R>,
        items: fn(&mut Self, &'a [T]) -> Option<R>,
    ) -> Option<R> {
        let (def, slot) = table(self).get(name)?;
        match slot {
            Slot::Done(v) => return v.clone(),
            Slot::InProgress => {
                if let Some(n) = at {
                    self.cycle(n);
                }
                return None;
            }
            Slot::Pending => {}
        }
        let def: &'a ast::Def<T> = def;
        if self.stack.len() >= MAX_NAME_DEPTH {
            if let Some(n) = at {
                self.err(
                    Diagnostic::error(
                        "E0103",
                        format!("names nest more than {MAX_NAME_DEPTH} deep"),
                    )
                    .at(n.span, "too deep here"),
                );
            }
            return None;
        }
        table(self).get_mut(name)?.1 = Slot::InProgress;
        self.stack.push(name);
        let value = items(self, &def.items);
        self.stack.pop();
        table(self).get_mut(name)?.1 = Slot::Done(value.clone());
        value
    }

    fn resolve_net(&mut self, name: &'a str, at: Option<&ast::Name>) -> Option<AddrSet> {
        self.resolve_named(name, at, |r| &mut r.nets, |r, items| r.net_items(items))
    }

    /// The set of a list of net items; `None` when an item was broken.
    fn net_items(&mut self, items: &[NetItem]) -> Option<AddrSet> {
        let mut set = AddrSet::default();
        let mut ok = true;
        for item in items {
            match item {
                NetItem::Any { family, .. } => {
                    let any = AddrSet::any();
                    if *family != Some(Family::V6) {
                        set.v4.extend_from_slice(&any.v4);
                    }
                    if *family != Some(Family::V4) {
                        set.v6.extend_from_slice(&any.v6);
                    }
                }
                NetItem::Prefix { addr, len, span } => {
                    let (net, lo, hi, host_bits) = prefix_interval(*addr, *len);
                    if host_bits {
                        let d = Diagnostic::warning(
                            "W0202",
                            format!("`{addr}/{len}` has host bits set; it means `{net}/{len}`"),
                        )
                        .at(*span, "host bits set")
                        .help(format!("write `{net}/{len}` for the network, or `{addr}` for the single address"));
                        self.err(d);
                    }
                    match addr {
                        IpAddr::V4(_) => set.add_v4(lo as u32, hi as u32),
                        IpAddr::V6(_) => set.add_v6(lo, hi),
                    }
                }
                NetItem::Range { lo, hi, span } => match (lo, hi) {
                    (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => {
                        set.add_v4((*a).into(), (*b).into())
                    }
                    (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => {
                        set.add_v6((*a).into(), (*b).into())
                    }
                    (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                        self.err(
                            Diagnostic::error(
                                "E0204",
                                format!("address range `{lo}-{hi}` is reversed"),
                            )
                            .at(*span, "first address is above the last")
                            .help(format!("write `{hi}-{lo}`")),
                        );
                        ok = false;
                    }
                    _ => {
                        self.err(
                            Diagnostic::error("E0201", "an address range cannot mix IPv4 and IPv6")
                                .at(*span, "mixed families"),
                        );
                        ok = false;
                    }
                },
                NetItem::Name(n) => {
                    if let Some(key) = self.nets.get_key_value(n.text.as_str()).map(|(k, _)| *k) {
                        match self.resolve_net(key, Some(n)) {
                            Some(s) => set.union(&s),
                            None => ok = false,
                        }
                    } else {
                        self.unknown(n, Kind::Net);
                        ok = false;
                    }
                }
            }
        }
        set.normalize();
        ok.then_some(set)
    }

    fn resolve_svc(&mut self, name: &'a str, at: Option<&ast::Name>) -> Option<Vec<ServiceAtom>> {
        self.resolve_named(name, at, |r| &mut r.svcs, |r, items| r.svc_items(items))
    }

    fn port_interval(&mut self, p: &ast::PortRange) -> Option<Interval<u16>> {
        for v in [p.lo, p.hi] {
            if v > 65535 {
                let shown = if v == u32::MAX {
                    "this port".to_string()
                } else {
                    format!("port {v}")
                };
                self.err(
                    Diagnostic::error("E0203", format!("{shown} is out of range"))
                        .at(p.span, "ports run from 0 to 65535"),
                );
                return None;
            }
        }
        if p.lo > p.hi {
            self.err(
                Diagnostic::error(
                    "E0204",
                    format!("port range `{}-{}` is reversed", p.lo, p.hi),
                )
                .at(p.span, "first port is above the last")
                .help(format!("write `{}-{}`", p.hi, p.lo)),
            );
            return None;
        }
        Some(Interval {
            lo: p.lo as u16,
            hi: p.hi as u16,
        })
    }

    fn icmp_value(
        &mut self,
        v: &ast::IcmpValue,
        v6: bool,
        is_code: bool,
        span: Span,
    ) -> Option<u8> {
        let what = if is_code { "code" } else { "type" };
        let fam = if v6 { "ICMPv6" } else { "ICMP" };
        match v {
            ast::IcmpValue::Number(n) if *n <= 255 => Some(*n as u8),
            ast::IcmpValue::Number(n) => {
                self.err(
                    Diagnostic::error("E0206", format!("{fam} {what} {n} is out of range"))
                        .at(span, "types and codes run from 0 to 255"),
                );
                None
            }
            ast::IcmpValue::Name(name) => {
                let found = if is_code {
                    icmp_code(v6, name)
                } else {
                    icmp_type(v6, name)
                };
                if found.is_none() {
                    let mut d =
                        Diagnostic::error("E0206", format!("unknown {fam} {what} `{name}`"))
                            .at(span, format!("not an {fam} {what} name"));
                    if !is_code && icmp_type(!v6, name).is_some() {
                        d = d.help(format!(
                            "`{name}` is an {} type; use `{}/{name}`",
                            if v6 { "ICMP" } else { "ICMPv6" },
                            if v6 { "icmp" } else { "icmpv6" }
                        ));
                    } else {
                        d = d.help(format!("use the {what} number"));
                    }
                    self.err(d);
                }
                found
            }
        }
    }

    fn svc_items(&mut self, items: &[SvcItem]) -> Option<Vec<ServiceAtom>> {
        let mut atoms = Vec::new();
        let mut ok = true;
        for item in items {
            match item {
                SvcItem::Name(n) => {
                    if let Some(key) = self.svcs.get_key_value(n.text.as_str()).map(|(k, _)| *k) {
                        match self.resolve_svc(key, Some(n)) {
                            Some(a) => atoms.extend(a),
                            None => ok = false,
                        }
                    } else {
                        self.unknown(n, Kind::Svc);
                        ok = false;
                    }
                }
                SvcItem::Proto {
                    proto,
                    proto_span,
                    dst_ports,
                    src_ports,
                    icmp,
                    ..
                } => {
                    let num = proto.number();
                    if num > 255 {
                        self.err(
                            Diagnostic::error(
                                "E0207",
                                format!("protocol number {num} is out of range"),
                            )
                            .at(*proto_span, "protocol numbers run from 0 to 255"),
                        );
                        ok = false;
                        continue;
                    }
                    let mut atom = ServiceAtom::any();
                    atom.proto = Interval::single(num as u8);
                    if let Some(p) = dst_ports.first() {
                        match self.port_interval(p) {
                            Some(iv) => atom.dst_port = iv,
                            None => ok = false,
                        }
                    }
                    if let Some(p) = src_ports.first() {
                        match self.port_interval(p) {
                            Some(iv) => atom.src_port = iv,
                            None => ok = false,
                        }
                    }
                    if let Some(spec) = icmp {
                        let v6 = *proto == ast::Proto::Icmpv6;
                        match self.icmp_value(&spec.ty, v6, false, spec.span) {
                            Some(t) => atom.src_port = Interval::single(t as u16),
                            None => ok = false,
                        }
                        if let Some(c) = &spec.code {
                            match self.icmp_value(c, v6, true, spec.span) {
                                Some(c) => atom.dst_port = Interval::single(c as u16),
                                None => ok = false,
                            }
                        }
                    }
                    atoms.push(atom);
                }
            }
        }
        atoms.sort();
        atoms.dedup();
        ok.then_some(atoms)
    }

    fn rule_sets(&mut self, src: &[NetItem], dst: &[NetItem]) -> Option<(AddrSet, AddrSet)> {
        let s = self.net_items(src);
        let d = self.net_items(dst);
        Some((s?, d?))
    }

    fn expiry(&mut self, e: &ast::Date, today: Date, name: &ast::Name) -> Option<(Date, bool)> {
        match Date::new(e.year, e.month, e.day) {
            Some(d) => {
                let active = d >= today;
                if !active {
                    self.err(
                        Diagnostic::warning(
                            "W0311",
                            format!("rule `{}` expired on {d} and no longer matches", name.text),
                        )
                        .at(e.span, "expired")
                        .help("remove the rule, or extend `expires` if the access is still needed"),
                    );
                }
                Some((d, active))
            }
            None => {
                self.err(
                    Diagnostic::error(
                        "E0209",
                        format!(
                            "`{:04}-{:02}-{:02}` is not a valid date",
                            e.year, e.month, e.day
                        ),
                    )
                    .at(e.span, "expected a real calendar date as YYYY-MM-DD"),
                );
                None
            }
        }
    }

    fn packet_rule(
        &mut self,
        r: &'a ast::PacketRule,
        id: RuleId,
        today: Date,
    ) -> Option<PacketRule> {
        let sets = self.rule_sets(&r.src, &r.dst);
        let services = if r.services.is_empty() {
            Some(vec![ServiceAtom::any()])
        } else {
            self.svc_items(&r.services)
        };
        let expires = match &r.options.expires {
            Some(e) => Some(self.expiry(e, today, &r.name)?),
            None => None,
        };
        let (src, dst) = sets?;
        let services = services?;
        // Can any family carry this rule?
        let v4 = !src.v4.is_empty() && !dst.v4.is_empty() && services.iter().any(|s| s.fits_v4());
        let v6 = !src.v6.is_empty() && !dst.v6.is_empty() && services.iter().any(|s| s.fits_v6());
        if !v4 && !v6 {
            let span = r.src[0].span().to(r.dst[r.dst.len() - 1].span());
            let why = if src.v4.is_empty() && dst.v6.is_empty() {
                "its source is IPv6 only and its destination IPv4 only".to_string()
            } else if src.v6.is_empty() && dst.v4.is_empty() {
                "its source is IPv4 only and its destination IPv6 only".to_string()
            } else {
                "its services belong to the other address family (icmp is IPv4, icmpv6 is IPv6)"
                    .to_string()
            };
            self.err(
                Diagnostic::error("E0301", format!("rule `{}` can never match: {why}", r.name.text))
                    .at(span, "no packet has these addresses and services")
                    .help("use addresses of one family on both sides, and icmp for IPv4 or icmpv6 for IPv6"),
            );
            return None;
        }
        let (expires, active) = match expires {
            Some((d, a)) => (Some(d), a),
            None => (None, true),
        };
        Some(PacketRule {
            id,
            name: r.name.text.clone(),
            verdict: r.action.into(),
            log: r.options.log,
            src,
            dst,
            services,
            owner: r.options.owner.as_ref().map(|(s, _)| s.clone()),
            expires,
            active,
            location: self.location(r.span),
            span: r.span,
        })
    }

    fn http_rule(&mut self, r: &'a ast::HttpRule, today: Date) -> Option<HttpRule> {
        let src = self.net_items(&r.src);
        let mut hosts = Vec::new();
        let mut addr_items: Vec<NetItem> = Vec::new();
        let mut ok = true;
        for d in &r.dst {
            match d {
                ast::HttpDest::Host { pattern, span } => match HostPattern::parse(pattern) {
                    Ok(p) => hosts.push(p),
                    Err(HostPatternError::IpLiteral(ip)) => {
                        self.err(
                            Diagnostic::error(
                                "E0208",
                                format!("\"{pattern}\" is an IP address in quotes, which makes it a host name"),
                            )
                            .at(*span, "never matches: requests to an address are matched against addresses only")
                            .help(format!("write the address unquoted: `-> {ip}`")),
                        );
                        ok = false;
                    }
                    Err(e) => {
                        self.err(
                            Diagnostic::error("E0208", format!("invalid host pattern \"{pattern}\": {e}"))
                                .at(*span, "not a host pattern")
                                .help("write an exact name (\"api.example.com\"), a wildcard (\"*.example.com\") or \"*\""),
                        );
                        ok = false;
                    }
                },
                ast::HttpDest::Net(n) => addr_items.push(n.clone()),
            }
        }
        let addrs = if addr_items.is_empty() {
            Some(AddrSet::default())
        } else {
            self.net_items(&addr_items)
        };
        let mut ports = Vec::new();
        for p in &r.ports {
            match self.port_interval(p) {
                Some(iv) => ports.push(iv),
                None => ok = false,
            }
        }
        normalize(&mut ports);
        let mut methods = Vec::new();
        for m in &r.methods {
            match http_method(m) {
                Ok(method) => methods.push(method),
                Err(d) => {
                    self.err(d);
                    ok = false;
                }
            }
        }
        if !methods.is_empty()
            && !methods.iter().any(|m| m == "CONNECT")
            && (ports.is_empty() || ports.iter().any(|p| p.contains(443)))
        {
            let span = r.methods[0].span.to(r.methods[r.methods.len() - 1].span);
            self.err(
                Diagnostic::warning(
                    "W0307",
                    format!("rule `{}` limits methods, which the proxy sees only in plain HTTP", r.name.text),
                )
                .at(span, "HTTPS requests arrive as CONNECT tunnels and will not match this rule")
                .help("add CONNECT to allow HTTPS tunnels to these hosts, or limit the rule to `port 80`"),
            );
        }
        let expires = match &r.options.expires {
            Some(e) => Some(self.expiry(e, today, &r.name)?),
            None => None,
        };
        let (src, addrs) = (src?, addrs?);
        if !ok {
            return None;
        }
        let (expires, active) = match expires {
            Some((d, a)) => (Some(d), a),
            None => (None, true),
        };
        Some(HttpRule {
            name: r.name.text.clone(),
            verdict: r.action.into(),
            log: r.options.log,
            src,
            hosts,
            addrs,
            ports,
            methods,
            plain_tunnel: r.plain_tunnel,
            owner: r.options.owner.as_ref().map(|(s, _)| s.clone()),
            expires,
            active,
            location: self.location(r.span),
            span: r.span,
        })
    }

    fn zones(&mut self, defs: &[&'a ast::Def<NetItem>]) -> Zones {
        let mut zones = Zones::default();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for def in defs {
            let name = def.name.text.as_str();
            if !matches!(name, "edge" | "onprem") {
                let mut d = Diagnostic::error("E0210", format!("unknown zone `{name}`")).at(
                    def.name.span,
                    "the appliance has two ports: `edge` and `onprem`",
                );
                if let Some(c) = closest(name, ["edge", "onprem"]) {
                    d = d.help(format!("did you mean `{c}`?"));
                }
                self.err(d);
                continue;
            }
            if let Some(first) = seen.get(name) {
                let d = Diagnostic::error("E0102", format!("zone `{name}` is defined twice"))
                    .at(def.name.span, "defined again here")
                    .also(*first, "first defined here")
                    .help("list every address of the zone in one `zone` statement");
                self.err(d);
                continue;
            }
            seen.insert(name, def.name.span);
            if let Some(set) = self.net_items(&def.items) {
                if name == "edge" {
                    zones.edge = Some(set);
                } else {
                    zones.onprem = Some(set);
                }
            }
        }
        if let (Some(e), Some(o)) = (&zones.edge, &zones.onprem) {
            if e.intersects(o) {
                let span = seen["onprem"];
                self.err(
                    Diagnostic::error("E0305", "zones `edge` and `onprem` overlap")
                        .at(span, "shares addresses with `edge`")
                        .also(seen["edge"], "`edge` defined here")
                        .help("an address may belong to one port only, or anti-spoofing cannot tell where it may appear"),
                );
            }
        }
        zones
    }
}

fn placeholder_rule(id: RuleId, r: &ast::PacketRule, location: Location) -> PacketRule {
    PacketRule {
        id,
        name: r.name.text.clone(),
        verdict: r.action.into(),
        log: r.options.log,
        src: AddrSet::default(),
        dst: AddrSet::default(),
        services: Vec::new(),
        owner: None,
        expires: None,
        active: false,
        location,
        span: r.span,
    }
}

/// The classifier entries of one rule: sources × destinations × services.
fn expand(rule: &PacketRule, v4: &mut Vec<Entry<u32>>, v6: &mut Vec<Entry<u128>>) {
    for svc in &rule.services {
        if svc.fits_v4() {
            for s in &rule.src.v4 {
                for d in &rule.dst.v4 {
                    v4.push(Entry {
                        fields: Fields {
                            src: *s,
                            dst: *d,
                            src_port: svc.src_port,
                            dst_port: svc.dst_port,
                            proto: svc.proto,
                        },
                        rule: rule.id,
                    });
                }
            }
        }
        if svc.fits_v6() {
            for s in &rule.src.v6 {
                for d in &rule.dst.v6 {
                    v6.push(Entry {
                        fields: Fields {
                            src: *s,
                            dst: *d,
                            src_port: svc.src_port,
                            dst_port: svc.dst_port,
                            proto: svc.proto,
                        },
                        rule: rule.id,
                    });
                }
            }
        }
    }
}

/// Entries of a compiled policy, for the reference matcher in tests and
/// tools: the same expansion the classifier was built from.
pub fn entries(policy: &Policy) -> (Vec<Entry<u32>>, Vec<Entry<u128>>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for r in policy.rules().iter().filter(|r| r.active) {
        expand(r, &mut v4, &mut v6);
    }
    (v4, v6)
}

/// An HTTP method as a rule or expectation names it. Methods are
/// case-sensitive (RFC 9110 section 9.1): `get` is a method of its own, which
/// no client sends for GET, so a lowercase spelling is refused rather than
/// read as GET or as a method that never comes.
pub(crate) fn http_method(m: &ast::Name) -> Result<String, Diagnostic> {
    let text = &m.text;
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_uppercase()) {
        return Ok(text.clone());
    }
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphabetic()) {
        let up = text.to_ascii_uppercase();
        return Err(Diagnostic::error(
            "E0212",
            format!("`{text}` is not an HTTP method: methods are case-sensitive"),
        )
        .at(m.span, format!("write `{up}`")));
    }
    Err(
        Diagnostic::error("E0212", format!("`{text}` is not an HTTP method"))
            .at(m.span, "expected a method such as GET, POST or CONNECT"),
    )
}

#[cfg(test)]
mod tests {
    use crate::policy::load::compile_str;
    use crate::policy::{Date, Options};

    fn compile(text: &str) -> Result<(), String> {
        let opts = Options {
            today: Date::new(2026, 1, 1).unwrap(),
        };
        compile_str("m.policy", text, opts)
            .map(|_| ())
            .map_err(|f| f.diagnostics.render(&f.sources))
    }

    #[test]
    fn a_probe_port_out_of_range_is_pointed_at() {
        let e = compile("expect allow tcp 192.0.2.1:99999 -> 192.0.2.2:80\ndefault deny\n")
            .unwrap_err();
        assert!(
            e.contains("m.policy:1:28")
                && e.contains("a port number from 0 to 65535, found `99999`"),
            "{e}"
        );
        let e = compile("expect allow tcp [2001:db8::1]:1 -> [2001:db8::2]:70000\n").unwrap_err();
        assert!(e.contains("m.policy:1:51"), "{e}");
    }

    #[test]
    fn http_rules_expire_in_a_running_policy() {
        use crate::policy::{HttpHost, HttpRequest, Verdict};
        let opts = Options {
            today: Date::new(2026, 1, 1).unwrap(),
        };
        let text = "net vnet = 192.0.2.0/24\n\
                    http temp allow vnet -> \"a.example\" expires 2026-03-31\n\
                    http keep allow vnet -> \"b.example\"\n";
        let p = compile_str("e.policy", text, opts).unwrap().policy;
        let req = |h: &str| HttpRequest {
            src: "192.0.2.5".parse().unwrap(),
            host: HttpHost::Name(h.into()),
            port: 443,
            method: "CONNECT".into(),
        };
        assert_eq!(p.decide_http(&req("a.example")).verdict, Verdict::Allow);
        assert_eq!(p.valid_until(), Date::new(2026, 3, 31));
        let (q, names) = p.expired_as_of(Date::new(2026, 4, 1).unwrap()).unwrap();
        assert_eq!(names, vec!["temp".to_string()]);
        assert_eq!(q.decide_http(&req("a.example")).verdict, Verdict::Deny);
        assert_eq!(q.decide_http(&req("b.example")).verdict, Verdict::Allow);
        assert_eq!(q.valid_until(), None);
        assert!(q.expired_as_of(Date::new(2030, 1, 1).unwrap()).is_none());
    }

    /// A deny rule that expires above a broader allow would let through
    /// what an `expect ... deny` holds the policy to deny: in a running
    /// daemon it stays in force past its date (and is said once), while
    /// the allow rules of the same day expire.
    #[test]
    fn a_deny_rule_an_expectation_needs_stays_in_force_past_its_date() {
        use crate::classify::FlowKey;
        use crate::policy::Verdict;
        let opts = Options {
            today: Date::new(2026, 1, 1).unwrap(),
        };
        let text = "net vnet = 192.0.2.0/24\n\
                    rule block-db deny vnet -> 198.51.100.10 service tcp/5432 expires 2026-03-31\n\
                    rule temp-web allow vnet -> 198.51.100.20 service tcp/443 expires 2026-03-31\n\
                    rule db allow vnet -> 198.51.100.0/24 service tcp/5432\n\
                    default deny\n\
                    expect deny tcp 192.0.2.5:40000 -> 198.51.100.10:5432\n";
        let p = compile_str("e.policy", text, opts).unwrap().policy;
        let flow = |dst: &str, port: u16| FlowKey {
            src: "192.0.2.5".parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 6,
            src_port: 40000,
            dst_port: port,
        };
        let (q, why) = p.expired_in_force(Date::new(2026, 4, 1).unwrap()).unwrap();
        let d = q.decide(&flow("198.51.100.10", 5432));
        assert_eq!(
            (d.verdict, q.rule_name(d.rule)),
            (Verdict::Deny, "block-db")
        );
        let d = q.decide(&flow("198.51.100.20", 443));
        assert_eq!((d.verdict, q.rule_name(d.rule)), (Verdict::Deny, "default"));
        assert_eq!(
            why,
            "again on 2026-04-01: rule(s) `temp-web` expired and no longer match; deny rule(s) \
             `block-db` expired but stay in force: without them the policy fails its \
             expectation(s) `expect deny tcp 192.0.2.5:40000 -> 198.51.100.10:5432` \
             (e.policy:6:1) (access widened); fix the policy and reload"
        );
        // Said once: the held rule has no date left in the policy in force.
        assert!(q.expired_in_force(Date::new(2026, 4, 2).unwrap()).is_none());
        // Without the expectation, the deny rule expires with the allow.
        let p = compile_str("e.policy", text.rsplit_once("expect").unwrap().0, opts)
            .unwrap()
            .policy;
        let (q, why) = p.expired_in_force(Date::new(2026, 4, 1).unwrap()).unwrap();
        let d = q.decide(&flow("198.51.100.10", 5432));
        assert_eq!((d.verdict, q.rule_name(d.rule)), (Verdict::Allow, "db"));
        assert_eq!(
            why,
            "again on 2026-04-01: rule(s) `block-db`, `temp-web` expired and no longer match"
        );
        // An expectation that names the rule (`by`) and already failed
        // for it (another deny rule decides since it expired, W0404) still
        // holds the last deny rule when that one expires.
        let text = "net vnet = 192.0.2.0/24\n\
                    rule a deny vnet -> 198.51.100.10 service tcp/5432 expires 2026-03-31\n\
                    rule b deny vnet -> 198.51.100.10 service tcp/5432 expires 2026-04-30\n\
                    rule db allow vnet -> 198.51.100.0/24 service tcp/5432\n\
                    default deny\n\
                    expect deny tcp 192.0.2.5:40000 -> 198.51.100.10:5432 by a\n";
        let p = compile_str("e.policy", text, opts).unwrap().policy;
        let (q, why) = p.expired_in_force(Date::new(2026, 4, 1).unwrap()).unwrap();
        assert_eq!(
            why,
            "again on 2026-04-01: rule(s) `a` expired and no longer match"
        );
        let (r, why) = q.expired_in_force(Date::new(2026, 5, 1).unwrap()).unwrap();
        let d = r.decide(&flow("198.51.100.10", 5432));
        assert_eq!((d.verdict, r.rule_name(d.rule)), (Verdict::Deny, "b"));
        assert!(
            why.contains("deny rule(s) `b` expired but stay in force"),
            "{why}"
        );
    }

    #[test]
    fn methods_are_case_sensitive_in_rules_and_expectations() {
        let base = "net vnet = 192.0.2.0/24\n\
                    http r allow vnet -> \"a.example\" port 80 method GET, POST\n";
        compile(base).unwrap();
        let e = compile(&base.replace("method GET", "method get")).unwrap_err();
        assert!(
            e.contains("E0212")
                && e.contains("`get` is not an HTTP method: methods are case-sensitive")
                && e.contains("write `GET`")
                && e.contains("m.policy:2:"),
            "{e}"
        );
        let e = compile(&format!(
            "{base}expect allow http 192.0.2.1 -> http://a.example/ method post\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("write `POST`") && e.contains("m.policy:3:"),
            "{e}"
        );
        compile(&format!(
            "{base}expect allow http 192.0.2.1 -> http://a.example/ method POST\n"
        ))
        .unwrap();
        let e = compile(&base.replace("method GET", "method G3T")).unwrap_err();
        assert!(e.contains("`G3T` is not an HTTP method"), "{e}");
    }
}
