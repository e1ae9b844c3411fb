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
//! | L0107 | an HTTP rule is shadowed or redundant behind one earlier HTTP rule |
//! | L0199 | the shadowing analysis gave up on a policy too fragmented to analyse |

use super::analysis::{any_to_any_families, coverage, http_covered_by, Coverage, PIECE_BUDGET};
use super::ast::{HttpDest, NetItem, Stmt, SvcItem};
use super::diag::{Diagnostic, Diagnostics};
use super::{entries, Compiled, Date, Verdict};
use std::collections::HashSet;

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

fn names_used(c: &Compiled) -> HashSet<&str> {
    let mut used = HashSet::new();
    let net = add_nets;
    for f in &c.syntax {
        for s in &f.stmts {
            match s {
                Stmt::Net(d) | Stmt::Zone(d) => net(&d.items, &mut used),
                Stmt::Svc(d) => {
                    for i in &d.items {
                        if let SvcItem::Name(n) = i {
                            used.insert(n.text.as_str());
                        }
                    }
                }
                Stmt::Rule(r) => {
                    net(&r.src, &mut used);
                    net(&r.dst, &mut used);
                    for i in &r.services {
                        if let SvcItem::Name(n) = i {
                            used.insert(n.text.as_str());
                        }
                    }
                }
                Stmt::Http(r) => {
                    net(&r.src, &mut used);
                    for d in &r.dst {
                        if let HttpDest::Net(NetItem::Name(n)) = d {
                            used.insert(n.text.as_str());
                        }
                    }
                }
                _ => {}
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
        match coverage(&v4, &v6, r.id, &mut budget) {
            Ok(Coverage::Effective) => {}
            Ok(Coverage::Covered(by)) => {
                let names: Vec<String> = by
                    .iter()
                    .filter_map(|id| policy.rule(*id))
                    .map(|e| format!("`{}`", e.name))
                    .collect();
                let other_verdict = by
                    .iter()
                    .filter_map(|id| policy.rule(*id))
                    .any(|e| e.verdict != r.verdict);
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
                            r.verdict.as_str()
                        ),
                    )
                };
                if let Some(first) = by.first().and_then(|id| policy.rule(*id)) {
                    d = d.also(first.span, "covered by this rule");
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
    // Expiry.
    let today = opts.today.unix_days();
    let check_expiry =
        |name: &str, expires: Option<Date>, active: bool, span, out: &mut Diagnostics| {
            if let Some(d) = expires {
                let left = d.unix_days() - today;
                if active && left <= i64::from(opts.warn_expiring_days) {
                    out.push(
                        Diagnostic::warning(
                            "L0105",
                            format!(
                                "rule `{name}` expires on {d}, in {left} day{}",
                                if left == 1 { "" } else { "s" }
                            ),
                        )
                        .at(span, "expires soon")
                        .help(
                            "extend `expires` if the access is still needed, or plan its removal",
                        ),
                    );
                }
            }
        };
    for r in policy.rules() {
        check_expiry(&r.name, r.expires, r.active, r.span, &mut out);
    }
    // HTTP rules.
    let http = policy.http_rules();
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
        if let Some(e) = http[..i].iter().find(|e| http_covered_by(r, e)) {
            let (what, code_text) = if e.verdict == r.verdict {
                ("redundant", "already decides")
            } else {
                ("shadowed", "decides first")
            };
            out.push(
                Diagnostic::warning(
                    "L0107",
                    format!("http rule `{}` is {what} by `{}`", r.name, e.name),
                )
                .at(
                    r.span,
                    format!("`{}` {code_text} every request it matches", e.name),
                )
                .also(e.span, "covering rule"),
            );
        }
        let all = super::AddrSet::any();
        if r.verdict == Verdict::Allow
            && (r.src.v4 == all.v4 || r.src.v6 == all.v6)
            && r.hosts.contains(&super::HostPattern::Any)
        {
            out.push(
                Diagnostic::warning(
                    "L0106",
                    format!("http rule `{}` allows any host to any client", r.name),
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
