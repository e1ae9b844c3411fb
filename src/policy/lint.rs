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
//! | L0199 | the shadowing analysis gave up on a rule, or on the rest of a policy, too fragmented to analyse |

use super::analysis::{
    any_to_any_families, by_shared_flows, coverage, coverage_in_bulk, http_coverage,
    http_covered_by, lives_as_long, Coverage, Indexed, PIECE_BUDGET,
};
use super::ast::{HttpDest, NetItem, Stmt, SvcItem};
use super::diag::{Diagnostic, Diagnostics};
use super::{entries, Compiled, Date, PacketRule, Verdict};
use crate::classify::RuleId;
use std::collections::{HashMap, HashSet};

/// Covering rules shown with their source lines in one finding.
const MAX_SHOWN: usize = 6;

/// Boxes the shadowing analysis may cut: to attribute a rule's parts one
/// by one ([`coverage`]), then, past that, for the cheaper check of a rule
/// in too many parts ([`coverage_in_bulk`]), and for the whole policy. A
/// rule over its share is reported (`L0199`) and the next rule is checked;
/// once the policy's share is spent the rest are not. (On the ClassBench
/// 10k sets the broad rules near the end take 0.5M-2M boxes each to
/// attribute, and the cheaper check settles them in a small part of that:
/// with these shares every rule of the four sets is checked, in at most
/// 3.5 s.)
const EXACT_BOXES: usize = PIECE_BUDGET * 2;
const RULE_BOXES: usize = PIECE_BUDGET * 15;
const POLICY_BOXES: usize = PIECE_BUDGET * 150;

/// Runs `f` with at most `cap` of `budget`, taking what it spent.
fn with_share<R>(budget: &mut usize, cap: usize, f: impl FnOnce(&mut usize) -> R) -> R {
    let given = cap.min(*budget);
    let mut share = given;
    let r = f(&mut share);
    *budget -= given - share;
    r
}

#[derive(Debug, Clone, Copy)]
pub struct LintOptions {
    pub today: Date,
    /// Warn about rules that expire within this many days.
    pub warn_expiring_days: u32,
}

/// The finding for a rule earlier rules cover: `shown` take a part each,
/// `more` others do too (`None`: an unknown number), and `other_verdict`
/// says whether a rule with the other verdict decides some of its flows
/// (`None`: not worked out).
fn covered_finding(
    r: &PacketRule,
    shown: &[&PacketRule],
    more: Option<usize>,
    other_verdict: Option<bool>,
) -> Diagnostic {
    let names: Vec<String> = shown.iter().map(|e| format!("`{}`", e.name)).collect();
    let one = names.len() == 1 && more == Some(0);
    let mut names = names.join(", ");
    let others = match more {
        Some(0) => None,
        Some(n) => Some(format!("{n} other earlier rules")),
        None => Some("other earlier rules".to_string()),
    };
    if let Some(others) = others {
        names = if names.is_empty() {
            others
        } else {
            format!("{names} and {others}")
        };
    }
    let mut d = match other_verdict {
        Some(false) => Diagnostic::warning(
            "L0102",
            format!("rule `{}` is redundant: removing it changes nothing", r.name),
        )
        .at(
            r.span,
            format!(
                "{names} already {} every flow it matches",
                match (one, r.verdict) {
                    (true, Verdict::Allow) => "allows",
                    (true, Verdict::Deny) => "denies",
                    (false, v) => v.as_str(),
                }
            ),
        ),
        Some(true) => Diagnostic::warning(
            "L0101",
            format!("rule `{}` is shadowed: it never decides a flow", r.name),
        )
        .at(
            r.span,
            format!("every flow it matches is decided first by {names}"),
        )
        .help("move it above the rules that cover it, or remove it"),
        None => Diagnostic::warning(
            "L0101",
            format!("rule `{}` never decides a flow: earlier rules cover it", r.name),
        )
        .at(
            r.span,
            format!(
                "every flow it matches is decided first by {names}; whether any of them has the other verdict was not worked out"
            ),
        )
        .help("move it above the rules that cover it, or remove it"),
    };
    if more.is_none() {
        d = d.help("its earlier rules split it into too many parts to name each one; the rules named each decide a part, and share the most flows with it");
    }
    // The rules named, where they are.
    for e in shown {
        d = d.also(
            e.span,
            if one {
                "covered by this rule".to_string()
            } else {
                format!("`{}` covers a part of it", e.name)
            },
        );
    }
    d
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
    let (i4, i6) = (Indexed::new(&v4), Indexed::new(&v6));
    let mut budget = POLICY_BOXES;
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
        let mut checked = with_share(&mut budget, EXACT_BOXES, |share| {
            coverage(&i4, &i6, r.id, &outlives, share)
        });
        if checked.is_err() {
            // Too many parts to attribute each: whether it is covered at
            // all is far cheaper to find out.
            let differs = |id| policy.rule(id).is_some_and(|e| e.verdict != r.verdict);
            checked = with_share(&mut budget, RULE_BOXES, |share| {
                coverage_in_bulk(&i4, &i6, r.id, &outlives, &differs, share)
            });
        }
        let rules = |ids: &[RuleId]| -> Vec<&PacketRule> {
            ids.iter().filter_map(|id| policy.rule(*id)).collect()
        };
        let finding = match checked {
            Ok(Coverage::Effective) => None,
            Ok(Coverage::Covered(by)) => {
                let other_verdict = rules(&by).iter().any(|e| e.verdict != r.verdict);
                // Too many to name: those that could take the most.
                let mut shown = by.clone();
                if by.len() > MAX_SHOWN {
                    shown = by_shared_flows(&v4, &v6, r.id, &by);
                    shown.truncate(MAX_SHOWN);
                    shown.sort_unstable();
                }
                Some((
                    rules(&shown),
                    Some(by.len() - shown.len()),
                    Some(other_verdict),
                ))
            }
            Ok(Coverage::CoveredInBulk {
                named,
                other_verdict,
            }) => Some((rules(&named), None, other_verdict)),
            Err(_) => {
                out.push(if budget > 0 {
                    Diagnostic::warning(
                        "L0199",
                        format!(
                            "shadowing analysis gave up on rule `{}`: its earlier rules split it into too many parts",
                            r.name
                        ),
                    )
                    .at(r.span, "not checked for shadowing")
                    .help("the rules after it were still checked")
                } else {
                    gave_up = true;
                    Diagnostic::warning(
                        "L0199",
                        format!(
                            "shadowing analysis stopped at rule `{}`: the policy is too fragmented to analyse in bounded time",
                            r.name
                        ),
                    )
                    .at(r.span, "not analysed from here on")
                    .help("rules from here on are not checked for shadowing; the other checks still ran")
                });
                None
            }
        };
        if let Some((shown, more, other_verdict)) = finding {
            out.push(covered_finding(r, &shown, more, other_verdict));
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
