//! `palisade lint`: findings about a policy that compiles but may not say
//! what its authors mean.
//!
//! | code | finding |
//! |---|---|
//! | L0101 | a rule is shadowed: earlier rules with another verdict decide all its flows |
//! | L0102 | a rule is redundant: earlier rules with the same verdict decide all its flows |
//! | L0103 | a rule can never match (it expired) |
//! | L0104 | a name is defined but never used |
//! | L0105 | a rule expires within the warning window |
//! | L0106 | an allow rule is overly broad (`any -> any`) |
//! | L0107 | an HTTP rule is shadowed or redundant behind earlier HTTP rules |
//! | L0108 | a packet rule's sources are in neither zone, so the filter drops them as spoofed |
//! | L0199 | the shadowing analysis gave up on a policy too fragmented to analyse |

use super::analysis::{
    any_to_any_families, coverage, http_coverage, http_covered_by, lives_as_long, Coverage,
    PIECE_BUDGET,
};
use super::ast::{HttpDest, NetItem, Stmt, SvcItem};
use super::diag::{Diagnostic, Diagnostics};
use super::{entries, Compiled, Date, Verdict};
use std::collections::{HashMap, HashSet};

/// Covering rules shown with their source lines in one finding.
const MAX_SHOWN: usize = 6;

#[derive(Debug, Clone, Copy)]
pub struct LintOptions {
    pub today: Date,
    /// Warn about rules that expire within this many days.
    pub warn_expiring_days: u32,
}

fn add_nets<'a>(items: &'a [NetItem], used: &mut HashSet<&'a str>) {
    for i in items {
        if let NetItem::Name(n) = i {
            used.insert(n.text.as_str());
        }
    }
}

fn add_svcs<'a>(items: &'a [SvcItem], used: &mut HashSet<&'a str>) {
    for i in items {
        if let SvcItem::Name(n) = i {
            used.insert(n.text.as_str());
        }
    }
}

/// Names some rule or zone uses, directly or through other names: a name
/// only an unused name refers to is unused too.
fn names_used(c: &Compiled) -> HashSet<&str> {
    let mut roots = HashSet::new();
    let mut refers: HashMap<&str, HashSet<&str>> = HashMap::new();
    let net = add_nets;
    for f in &c.syntax {
        for s in &f.stmts {
            match s {
                Stmt::Net(d) => net(&d.items, refers.entry(d.name.text.as_str()).or_default()),
                Stmt::Svc(d) => add_svcs(&d.items, refers.entry(d.name.text.as_str()).or_default()),
                Stmt::Zone(d) => net(&d.items, &mut roots),
                Stmt::Rule(r) => {
                    net(&r.src, &mut roots);
                    net(&r.dst, &mut roots);
                    add_svcs(&r.services, &mut roots);
                }
                Stmt::Http(r) => {
                    net(&r.src, &mut roots);
                    for d in &r.dst {
                        if let HttpDest::Net(NetItem::Name(n)) = d {
                            roots.insert(n.text.as_str());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut used = HashSet::new();
    let mut todo: Vec<&str> = roots.into_iter().collect();
    while let Some(n) = todo.pop() {
        if used.insert(n) {
            if let Some(to) = refers.get(n) {
                todo.extend(to.iter().copied());
            }
        }
    }
    used
}

pub fn lint(c: &Compiled, opts: LintOptions) -> Diagnostics {
    let mut out = Diagnostics::default();
    let policy = &c.policy;
    let (v4, v6) = entries(policy);
    let mut budget = PIECE_BUDGET * 50;
    let mut gave_up = false;
    for r in policy.rules() {
        if !r.active {
            out.push(
                Diagnostic::warning(
                    "L0103",
                    format!("rule `{}` can never match: it expired", r.name),
                )
                .at(r.span, "expired rule"),
            );
            continue;
        }
        if gave_up {
            continue;
        }
        // Only rules in force for at least as long as this one cover it:
        // once a shorter-lived rule expires, this one decides its flows.
        let outlives = |id| {
            policy
                .rule(id)
                .is_some_and(|e| lives_as_long(e.expires, r.expires))
        };
        match coverage(&v4, &v6, r.id, &outlives, &mut budget) {
            Ok(Coverage::Effective) => {}
            Ok(Coverage::Covered(by)) => {
                let covering: Vec<_> = by.iter().filter_map(|id| policy.rule(*id)).collect();
                let names: Vec<String> = covering.iter().map(|e| format!("`{}`", e.name)).collect();
                let other_verdict = covering.iter().any(|e| e.verdict != r.verdict);
                let mut d = if other_verdict {
                    Diagnostic::warning(
                        "L0101",
                        format!("rule `{}` is shadowed: it never decides a flow", r.name),
                    )
                    .at(
                        r.span,
                        format!(
                            "every flow it matches is decided first by {}",
                            names.join(", ")
                        ),
                    )
                    .help("move it above the rules that cover it, or remove it")
                } else {
                    Diagnostic::warning(
                        "L0102",
                        format!(
                            "rule `{}` is redundant: removing it changes nothing",
                            r.name
                        ),
                    )
                    .at(
                        r.span,
                        format!(
                            "{} already {} every flow it matches",
                            names.join(", "),
                            match (names.len(), r.verdict) {
                                (1, Verdict::Allow) => "allows",
                                (1, Verdict::Deny) => "denies",
                                (_, v) => v.as_str(),
                            }
                        ),
                    )
                };
                // Every rule that takes a part of it, where it is (a
                // handful; the message names them all).
                for e in covering.iter().take(MAX_SHOWN) {
                    d = d.also(
                        e.span,
                        if covering.len() == 1 {
                            "covered by this rule".to_string()
                        } else {
                            format!("`{}` covers a part of it", e.name)
                        },
                    );
                }
                out.push(d);
            }
            Err(_) => {
                gave_up = true;
                out.push(Diagnostic::warning(
                    "L0199",
                    format!(
                        "shadowing analysis stopped at rule `{}`: the policy is too fragmented to analyse in bounded time",
                        r.name
                    ),
                )
                .at(r.span, "not analysed from here on")
                .help("rules from here on are not checked for shadowing; the other checks still ran"));
            }
        }
    }
    for r in policy.rules().iter().filter(|r| r.active) {
        let broad = any_to_any_families(r).filter(|_| r.verdict == Verdict::Allow);
        if let Some(family) = broad {
            let what = if r.services.iter().any(|s| *s == super::ServiceAtom::any()) {
                "allows every flow"
            } else {
                "allows these services"
            };
            out.push(
                Diagnostic::warning(
                    "L0106",
                    format!("rule `{}` {what} between any two {family}addresses", r.name),
                )
                .at(r.span, "overly broad allow")
                .help("name the sources and destinations that need this access"),
            );
        }
    }
    // Sources no port accepts: with both zones set, the filter drops a
    // packet whose source is outside its arrival port's zone.
    if let (Some(edge), Some(onprem)) = (&policy.zones().edge, &policy.zones().onprem) {
        let mut zoned = edge.clone();
        zoned.union(onprem);
        zoned.normalize();
        for r in policy.rules().iter().filter(|r| r.active) {
            if !r.src.is_empty() && !r.src.intersects(&zoned) {
                out.push(
                    Diagnostic::warning(
                        "L0108",
                        format!(
                            "rule `{}` can never match at the filter: its sources are in neither zone",
                            r.name
                        ),
                    )
                    .at(r.span, "no port accepts these sources")
                    .help("packets from these sources are dropped as spoofed on both ports; add them to a zone, or remove the rule"),
                );
            }
        }
    }
    // Expiry. The expectations that stop holding when a rule expires (the
    // daemons then warn, W0404) are named with it.
    let today = opts.today.unix_days();
    // On day `d` against the day after: rules that expire earlier are
    // gone from both, so each expectation is named with the rule whose
    // expiry breaks it.
    let as_of = |day: Date| policy.expired_as_of(day).map(|(p, _)| p);
    let failing_after = |d: Date| -> Vec<super::Span> {
        let Some(after) = as_of(Date::from_unix_days(d.unix_days() + 1)) else {
            return Vec::new();
        };
        let on_the_day = as_of(d);
        let on_the_day = on_the_day.as_ref().unwrap_or(policy);
        c.expectations
            .iter()
            .filter(|e| {
                super::expect::run(on_the_day, e).passed && !super::expect::run(&after, e).passed
            })
            .map(|e| e.span)
            .collect()
    };
    let check_expiry = |name: &str,
                        expires: Option<Date>,
                        active: bool,
                        span,
                        out: &mut Diagnostics| {
        if let Some(d) = expires {
            let left = d.unix_days() - today;
            if active && left <= i64::from(opts.warn_expiring_days) {
                let mut finding = Diagnostic::warning(
                    "L0105",
                    format!(
                        "rule `{name}` expires on {d}, {}",
                        match left {
                            0 => "today".to_string(),
                            1 => "tomorrow".to_string(),
                            n => format!("in {n} days"),
                        }
                    ),
                )
                .at(span, "expires soon")
                .help("extend `expires` if the access is still needed, or plan its removal");
                let relying = failing_after(d);
                for e in &relying {
                    finding = finding.also(
                        *e,
                        "fails from the day after, without the rules that expire on that day",
                    );
                }
                if !relying.is_empty() {
                    finding = finding.help(
                        "extend `expires` if the access is still needed, or plan its removal with the expectations that rely on it",
                    );
                }
                out.push(finding);
            }
        }
    };
    for r in policy.rules() {
        check_expiry(&r.name, r.expires, r.active, r.span, &mut out);
    }
    // HTTP rules.
    let http = policy.http_rules();
    // Too many request classes to check exactly: only the one-rule check.
    let exact = http_coverage(policy).ok();
    for (i, r) in http.iter().enumerate() {
        check_expiry(&r.name, r.expires, r.active, r.span, &mut out);
        if !r.active {
            out.push(
                Diagnostic::warning(
                    "L0103",
                    format!("http rule `{}` can never match: it expired", r.name),
                )
                .at(r.span, "expired rule"),
            );
            continue;
        }
        // One earlier rule that covers it (named alone); else the exact
        // check, which also finds a rule covered by several earlier ones.
        let by = match http[..i].iter().position(|e| http_covered_by(r, e)) {
            Some(j) => Some(vec![j]),
            None => exact.as_ref().and_then(|v| v[i].clone()),
        };
        if let Some(by) = by.filter(|b| !b.is_empty()) {
            let covering: Vec<&super::HttpRule> = by.iter().map(|&j| &http[j]).collect();
            let names: Vec<String> = covering.iter().map(|e| format!("`{}`", e.name)).collect();
            let one = names.len() == 1;
            let (what, code_text) = match (covering.iter().all(|e| e.verdict == r.verdict), one) {
                (true, true) => ("redundant", "already decides"),
                (true, false) => ("redundant", "already decide"),
                (false, true) => ("shadowed", "decides first"),
                (false, false) => ("shadowed", "decide first"),
            };
            let mut d = Diagnostic::warning(
                "L0107",
                format!("http rule `{}` is {what} by {}", r.name, names.join(", ")),
            )
            .at(
                r.span,
                format!("{} {code_text} every request it matches", names.join(", ")),
            );
            for e in covering.iter().take(MAX_SHOWN) {
                d = d.also(e.span, "covering rule");
            }
            out.push(d);
        }
        let all = super::AddrSet::any();
        if r.verdict == Verdict::Allow
            && (r.src.v4 == all.v4 || r.src.v6 == all.v6)
            && r.hosts.contains(&super::HostPattern::Any)
        {
            out.push(
                Diagnostic::warning(
                    "L0106",
                    format!("http rule `{}` lets any client reach any host", r.name),
                )
                .at(r.span, "overly broad allow"),
            );
        }
    }
    // Unused names.
    let used = names_used(c);
    for f in &c.syntax {
        for s in &f.stmts {
            let name = match s {
                Stmt::Net(d) => &d.name,
                Stmt::Svc(d) => &d.name,
                _ => continue,
            };
            if !used.contains(name.text.as_str()) {
                out.push(
                    Diagnostic::warning(
                        "L0104",
                        format!("`{}` is defined but never used", name.text),
                    )
                    .at(name.span, "unused")
                    .help("remove it, or use it in a rule"),
                );
            }
        }
    }
    out.sort();
    out
}
