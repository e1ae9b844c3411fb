//! Property tests: random policies, written as text, compiled; the compiled
//! classifier must decide every probe exactly like two plain references:
//! first-match over the rules' own resolved sets, and the linear matcher
//! over the classifier entries.

use palisade::classify::{FlowKey, ReferenceClassifier};
use palisade::policy::load::compile_str;
use palisade::policy::{entries, Date, Options, Verdict};
use proptest::prelude::*;
use proptest::sample::Index;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone)]
enum Addr {
    V4 {
        low: u16,
        len: u8,
    },
    V6 {
        low: u16,
        len: u8,
    },
    Any,
    Any4,
    Any6,
    /// An earlier net name, by index.
    Name(Index),
}

#[derive(Debug, Clone)]
enum Svc {
    Tcp(u16, u16),
    Udp(u16),
    UdpSport(u16, u16),
    Icmp,
    Icmpv6,
    Gre,
    AnyTcp,
    Name(Index),
}

#[derive(Debug, Clone)]
struct Rule {
    allow: bool,
    src: Vec<Addr>,
    dst: Vec<Addr>,
    svcs: Vec<Svc>,
}

#[derive(Debug, Clone)]
struct Spec {
    nets: Vec<Vec<Addr>>,
    svcs: Vec<Vec<Svc>>,
    rules: Vec<Rule>,
    default_allow: bool,
}

const PORTS: [u16; 6] = [22, 53, 80, 443, 1024, 8080];

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        4 => (any::<u16>(), 16u8..=32).prop_map(|(low, len)| Addr::V4 { low, len }),
        3 => (any::<u16>(), prop_oneof![Just(32u8), 112u8..=128]).prop_map(|(low, len)| Addr::V6 { low, len }),
        1 => Just(Addr::Any),
        1 => Just(Addr::Any4),
        1 => Just(Addr::Any6),
        3 => any::<Index>().prop_map(Addr::Name),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![prop::sample::select(PORTS.to_vec()), any::<u16>()]
}

fn svc() -> impl Strategy<Value = Svc> {
    prop_oneof![
        3 => (port(), 0u16..2000).prop_map(|(p, w)| Svc::Tcp(p, p.saturating_add(w))),
        2 => port().prop_map(Svc::Udp),
        1 => (port(), port()).prop_map(|(d, s)| Svc::UdpSport(d, s)),
        1 => Just(Svc::Icmp),
        1 => Just(Svc::Icmpv6),
        1 => Just(Svc::Gre),
        1 => Just(Svc::AnyTcp),
        2 => any::<Index>().prop_map(Svc::Name),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    rule_of(1..3, 0..3)
}

/// Rules of `addrs` sources and destinations each and `svcs` services.
fn rule_of(
    addrs: std::ops::Range<usize>,
    svcs: std::ops::Range<usize>,
) -> impl Strategy<Value = Rule> {
    (
        any::<bool>(),
        prop::collection::vec(addr(), addrs.clone()),
        prop::collection::vec(addr(), addrs),
        prop::collection::vec(svc(), svcs),
    )
        .prop_map(|(allow, src, dst, svcs)| Rule {
            allow,
            src,
            dst,
            svcs,
        })
}

fn spec() -> impl Strategy<Value = Spec> {
    spec_of(1..10)
}

/// Random policies of `rules` rules whose addresses have no host bits
/// set (a large policy's host-bit warnings would fill the diagnostics).
fn network_spec_of(rules: std::ops::Range<usize>) -> impl Strategy<Value = Spec> {
    fn network(a: &mut Addr) {
        // Host bits of the address's low 16 bits.
        let host = |bits: u32| (1u32 << bits.min(16)).wrapping_sub(1) as u16;
        match a {
            Addr::V4 { low, len } => *low &= !host(32 - u32::from(*len)),
            Addr::V6 { low, len } => *low &= !host(128 - u32::from(*len)),
            _ => {}
        }
    }
    spec_of(rules).prop_map(|mut s| {
        s.nets.iter_mut().flatten().for_each(network);
        for r in &mut s.rules {
            r.src.iter_mut().chain(r.dst.iter_mut()).for_each(network);
        }
        s
    })
}

/// Random policies of `rules` rules.
fn spec_of(rules: std::ops::Range<usize>) -> impl Strategy<Value = Spec> {
    spec_from(rules, rule())
}

/// Random policies whose rules have many boxes (up to 6 sources by 6
/// destinations by 5 services, names expanded), which the analyses take
/// in runs (see `Runs` in the analysis module) and whose changes `diff`
/// halves before it looks inside one rule's box.
fn many_box_spec() -> impl Strategy<Value = Spec> {
    spec_from(4..24, rule_of(1..5, 1..4))
}

fn spec_from(
    rules: std::ops::Range<usize>,
    rule: impl Strategy<Value = Rule>,
) -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(prop::collection::vec(addr(), 1..4), 0..4),
        prop::collection::vec(prop::collection::vec(svc(), 1..3), 0..3),
        prop::collection::vec(rule, rules),
        any::<bool>(),
    )
        .prop_map(|(nets, svcs, rules, default_allow)| Spec {
            nets,
            svcs,
            rules,
            default_allow,
        })
}

fn v4(low: u16) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 | u32::from(low))
}

fn v6(low: u16) -> Ipv6Addr {
    Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(low))
}

fn addr_text(a: &Addr, names_before: usize) -> String {
    match a {
        Addr::V4 { low, len } => format!("{}/{len}", v4(*low)),
        Addr::V6 { low, len } => format!("{}/{len}", v6(*low)),
        Addr::Any => "any".into(),
        Addr::Any4 => "any4".into(),
        Addr::Any6 => "any6".into(),
        Addr::Name(i) if names_before > 0 => format!("n{}", i.index(names_before)),
        Addr::Name(_) => "any".into(),
    }
}

fn svc_text(s: &Svc, names_before: usize) -> String {
    match s {
        Svc::Tcp(lo, hi) if lo == hi => format!("tcp/{lo}"),
        Svc::Tcp(lo, hi) => format!("tcp/{lo}-{hi}"),
        Svc::Udp(p) => format!("udp/{p}"),
        Svc::UdpSport(d, s) => format!("udp/{d} sport {s}"),
        Svc::Icmp => "icmp/echo-request".into(),
        Svc::Icmpv6 => "icmpv6/echo-request".into(),
        Svc::Gre => "gre".into(),
        Svc::AnyTcp => "tcp".into(),
        Svc::Name(i) if names_before > 0 => format!("s{}", i.index(names_before)),
        Svc::Name(_) => "udp/53".into(),
    }
}

fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

fn render(spec: &Spec) -> String {
    let mut t = String::new();
    for (i, items) in spec.nets.iter().enumerate() {
        t += &format!("net n{i} = {}\n", list(items, |a| addr_text(a, i)));
    }
    for (i, items) in spec.svcs.iter().enumerate() {
        t += &format!("svc s{i} = {}\n", list(items, |s| svc_text(s, i)));
    }
    let (n, s) = (spec.nets.len(), spec.svcs.len());
    for (i, r) in spec.rules.iter().enumerate() {
        t += &format!(
            "rule r{i} {} {} -> {}",
            if r.allow { "allow" } else { "deny" },
            list(&r.src, |a| addr_text(a, n)),
            list(&r.dst, |a| addr_text(a, n))
        );
        if !r.svcs.is_empty() {
            t += &format!(" service {}", list(&r.svcs, |x| svc_text(x, s)));
        }
        t.push('\n');
    }
    t += if spec.default_allow {
        "default allow\n"
    } else {
        "default deny\n"
    };
    t
}

/// A probe drawn near the policy's boundaries so that rules really match.
#[derive(Debug, Clone)]
struct Probe {
    v6: bool,
    src: (Index, i8),
    dst: (Index, i8),
    proto: Index,
    sport: (Index, i8),
    dport: (Index, i8),
}

fn probe() -> impl Strategy<Value = Probe> {
    (
        any::<bool>(),
        (any::<Index>(), -1i8..=1),
        (any::<Index>(), -1i8..=1),
        any::<Index>(),
        (any::<Index>(), -1i8..=1),
        (any::<Index>(), -1i8..=1),
    )
        .prop_map(|(v6, src, dst, proto, sport, dport)| Probe {
            v6,
            src,
            dst,
            proto,
            sport,
            dport,
        })
}

fn key_of(spec: &Spec, p: &Probe) -> FlowKey {
    let mut lows: Vec<u16> = vec![0, 1, 0x8000, u16::MAX];
    let mut ports: Vec<u16> = PORTS.to_vec();
    ports.extend([0, 65535, 40000]);
    let all_addrs = spec.nets.iter().flatten().chain(
        spec.rules
            .iter()
            .flat_map(|r| r.src.iter().chain(r.dst.iter())),
    );
    for a in all_addrs {
        if let Addr::V4 { low, .. } | Addr::V6 { low, .. } = a {
            lows.push(*low);
        }
    }
    for s in spec
        .svcs
        .iter()
        .flatten()
        .chain(spec.rules.iter().flat_map(|r| r.svcs.iter()))
    {
        match s {
            Svc::Tcp(lo, hi) => ports.extend([*lo, *hi]),
            Svc::Udp(p) => ports.push(*p),
            Svc::UdpSport(d, s) => ports.extend([*d, *s]),
            _ => {}
        }
    }
    let pick16 = |(i, d): (Index, i8), v: &[u16]| v[i.index(v.len())].wrapping_add_signed(d as i16);
    let protos = [1u8, 6, 17, 47, 58, 132, 0, 255];
    let proto = protos[p.proto.index(protos.len())];
    let (src, dst) = if p.v6 {
        (
            IpAddr::V6(v6(pick16(p.src, &lows))),
            IpAddr::V6(v6(pick16(p.dst, &lows))),
        )
    } else {
        (
            IpAddr::V4(v4(pick16(p.src, &lows))),
            IpAddr::V4(v4(pick16(p.dst, &lows))),
        )
    };
    let (sport, dport) = if proto == 1 || proto == 58 {
        (if p.sport.1 == 0 { 8 } else { 128 }, 0)
    } else {
        (pick16(p.sport, &ports), pick16(p.dport, &ports))
    };
    FlowKey {
        src,
        dst,
        proto,
        src_port: sport,
        dst_port: dport,
    }
}

const OPTS: Options = Options {
    today: Date {
        year: 2026,
        month: 11,
        day: 25,
    },
};

proptest! {
    // 2,500 policies × 4 probes each = 10,000 compared decisions per run.
    #![proptest_config(ProptestConfig { cases: 2_500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn compiled_policy_agrees_with_references(spec in spec(), probes in prop::collection::vec(probe(), 4)) {
        // A random rule may pair IPv4-only sources with IPv6-only
        // destinations (error E0301); such rules are blanked out, keeping
        // line numbers, so rule ids shift like a user's edit.
        let text = render(&spec);
        let compiled = compile_lenient(&text)?;
        let policy = &compiled;
        let (e4, e6) = entries(policy);
        let linear = ReferenceClassifier::new(e4, e6);
        for p in &probes {
            let key = key_of(&spec, p);
            let got = policy.decide(&key);
            // Reference 1: first match over the rules' resolved sets.
            let first = policy.rules().iter().find(|r| r.matches(&key));
            let want_verdict = first.map(|r| r.verdict).unwrap_or(if spec.default_allow { Verdict::Allow } else { Verdict::Deny });
            prop_assert_eq!(got.rule, first.map(|r| r.id), "key {:?}\n{}", key, text);
            prop_assert_eq!(got.verdict, want_verdict);
            // Reference 2: linear scan of the classifier's own entries.
            prop_assert_eq!(got.rule, linear.classify(&key), "key {:?}\n{}", key, text);
        }
    }
}

/// An edit a policy author makes.
#[derive(Debug, Clone)]
enum Edit {
    Remove(Index),
    Swap(Index, Index),
    Flip(Index),
    Insert(Index, Rule),
    Replace(Index, Rule),
    FlipDefault,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => any::<Index>().prop_map(Edit::Remove),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        2 => any::<Index>().prop_map(Edit::Flip),
        3 => (any::<Index>(), rule()).prop_map(|(i, r)| Edit::Insert(i, r)),
        2 => (any::<Index>(), rule()).prop_map(|(i, r)| Edit::Replace(i, r)),
        1 => Just(Edit::FlipDefault),
    ]
}

fn apply(spec: &Spec, edits: &[Edit]) -> Spec {
    let mut s = spec.clone();
    for e in edits {
        let n = s.rules.len();
        match e {
            Edit::Remove(i) if n > 0 => {
                s.rules.remove(i.index(n));
            }
            Edit::Swap(a, b) if n > 0 => s.rules.swap(a.index(n), b.index(n)),
            Edit::Flip(i) if n > 0 => s.rules[i.index(n)].allow ^= true,
            Edit::Insert(i, r) => s.rules.insert(i.index(n + 1), r.clone()),
            Edit::Replace(i, r) if n > 0 => s.rules[i.index(n)] = r.clone(),
            Edit::FlipDefault => s.default_allow ^= true,
            _ => {}
        }
    }
    s
}

/// Compiles a random policy; rules that pair IPv4-only with IPv6-only
/// sets (E0301) are blanked out.
fn compile_lenient(text: &str) -> Result<palisade::policy::Policy, TestCaseError> {
    let mut text = text.to_string();
    // A large policy may hold more such rules than one run reports (the
    // diagnostics stop at 100): blank what is reported and compile again.
    for _ in 0..8 {
        let f = match compile_str("random.policy", &text, OPTS) {
            Ok(c) => return Ok(c.policy),
            Err(f) => f,
        };
        let errors: Vec<_> = f
            .diagnostics
            .items
            .iter()
            .filter(|d| d.is_error() && d.code != "E0000")
            .collect();
        prop_assert!(
            !errors.is_empty() && errors.iter().all(|d| d.code == "E0301"),
            "{}",
            f.diagnostics.render(&f.sources)
        );
        let bad_lines: Vec<usize> = errors
            .iter()
            .filter_map(|d| d.primary.as_ref())
            .map(|l| f.sources.file(l.span.file).line_col(l.span.start).line)
            .collect();
        text = text
            .lines()
            .enumerate()
            .map(|(i, l)| if bad_lines.contains(&(i + 1)) { "" } else { l })
            .collect::<Vec<_>>()
            .join("\n");
    }
    Err(TestCaseError::fail("rules that can never match remain"))
}

/// `diff` looks only inside the boxes of the rules an edit changed; a
/// probe's verdict must differ between the two policies exactly when it
/// lies in a region the diff reports, in one region only, which names the
/// rules that decide it before and after.
fn check_diff(spec: &Spec, edits: &[Edit], probes: &[Probe]) -> Result<(), TestCaseError> {
    use palisade::classify::FamilyKey;
    let edited = apply(spec, edits);
    let (old_text, new_text) = (render(spec), render(&edited));
    let old = compile_lenient(&old_text)?;
    let new = compile_lenient(&new_text)?;
    let (p4, p6) = palisade::policy::analysis::changed_regions(&old, &new)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (k, p) in probes.iter().enumerate() {
        // Half the probes near the old policy's boundaries, half near
        // the new one's.
        let key = key_of(if k % 2 == 0 { spec } else { &edited }, p);
        let (was, now) = (old.decide(&key), new.decide(&key));
        let changed = was.verdict != now.verdict;
        // The regions holding the key, as (old rule, new rule, old
        // verdict, new verdict): at most one, naming the deciders.
        let hits: Vec<_> = match key.family_key() {
            Some(FamilyKey::V4(k4)) => p4
                .iter()
                .filter(|x| x.0.matches(&k4))
                .map(|x| (x.1, x.2, x.3, x.4))
                .collect(),
            Some(FamilyKey::V6(k6)) => p6
                .iter()
                .filter(|x| x.0.matches(&k6))
                .map(|x| (x.1, x.2, x.3, x.4))
                .collect(),
            None => Vec::new(),
        };
        let expected: Vec<_> = if changed {
            vec![(was.rule, now.rule, was.verdict, now.verdict)]
        } else {
            Vec::new()
        };
        prop_assert_eq!(
            hits,
            expected,
            "key {:?}\nold:\n{}\nnew:\n{}",
            key,
            old_text,
            new_text
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn diff_regions_are_exactly_the_flows_whose_verdict_changed(
        spec in spec(),
        edits in prop::collection::vec(edit(), 1..3),
        probes in prop::collection::vec(probe(), 8),
    ) {
        check_diff(&spec, &edits, &probes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, failure_persistence: None, ..ProptestConfig::default() })]

    /// The same on larger policies, whose boxes `diff` halves before it
    /// cuts along single rules.
    #[test]
    fn diff_regions_are_exact_on_larger_policies(
        spec in network_spec_of(30..80),
        edits in prop::collection::vec(edit(), 1..4),
        probes in prop::collection::vec(probe(), 16),
    ) {
        check_diff(&spec, &edits, &probes)?;
    }

    #[test]
    fn diff_regions_are_exact_on_rules_of_many_boxes(
        spec in many_box_spec(),
        edits in prop::collection::vec(edit(), 1..3),
        probes in prop::collection::vec(probe(), 16),
    ) {
        check_diff(&spec, &edits, &probes)?;
    }
}

/// Whether the earlier entries `covers` accepts cover `rule`, and the rules
/// that are the first match for a part of it: the plain way, subtracting
/// each earlier entry in order from what is left of the rule's boxes.
fn coverage_by_subtraction<A: palisade::classify::Address + palisade::policy::analysis::Scalar>(
    entries: &[palisade::classify::Entry<A>],
    rule: u32,
    covers: &dyn Fn(u32) -> bool,
    contributors: &mut Vec<u32>,
) -> bool {
    use palisade::policy::analysis::{overlaps, subtract};
    let mut pieces: Vec<_> = entries
        .iter()
        .filter(|e| e.rule == rule)
        .map(|e| e.fields)
        .collect();
    for e in entries.iter().filter(|e| e.rule < rule && covers(e.rule)) {
        if !pieces.iter().any(|p| overlaps(p, &e.fields)) {
            continue;
        }
        let mut next = Vec::new();
        for p in &pieces {
            subtract(p, &e.fields, &mut next);
        }
        if !contributors.contains(&e.rule) {
            contributors.push(e.rule);
        }
        pieces = next;
    }
    pieces.is_empty()
}

/// `lint`'s shadowing analysis (the rules that cover a rule, found by
/// cutting boxes depth first) agrees with plain subtraction on every rule.
fn check_coverage(spec: &Spec) -> Result<(), TestCaseError> {
    use palisade::policy::analysis::{coverage, coverage_in_bulk, Coverage, Indexed};
    let policy = compile_lenient(&render(spec))?;
    let (v4, v6) = entries(&policy);
    let (i4, i6) = (Indexed::new(&v4), Indexed::new(&v6));
    for r in policy.rules() {
        let all = |_: u32| true;
        let mut by = Vec::new();
        let covered = coverage_by_subtraction(&v4, r.id, &all, &mut by)
            && coverage_by_subtraction(&v6, r.id, &all, &mut by);
        by.sort_unstable();
        let expected = if covered {
            Coverage::Covered(by.clone())
        } else {
            Coverage::Effective
        };
        let mut budget = usize::MAX;
        let got = coverage(&i4, &i6, r.id, &all, &mut budget)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, expected, "rule {}\n{}", r.name, render(spec));
        // The analysis for rules in too many parts to attribute one by
        // one: covered or not, whether a rule of the other verdict decides
        // a part, and only rules that take a part named.
        let differs = |id: u32| policy.rule(id).is_some_and(|e| e.verdict != r.verdict);
        let mut budget = usize::MAX;
        let bulk = coverage_in_bulk(&i4, &i6, r.id, &all, &differs, &mut budget)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        match bulk {
            Coverage::Effective => prop_assert!(!covered, "rule {}\n{}", r.name, render(spec)),
            Coverage::CoveredInBulk {
                named,
                other_verdict,
            } => {
                prop_assert!(covered, "rule {}\n{}", r.name, render(spec));
                prop_assert_eq!(
                    other_verdict,
                    Some(by.iter().any(|&id| differs(id))),
                    "rule {}\n{}",
                    r.name,
                    render(spec)
                );
                // Up to 24 rules are tried, in order of the flows shared.
                prop_assert!(
                    (policy.rules().len() > 24 || !named.is_empty()) && named.len() <= 6,
                    "rule {}: {:?}\n{}",
                    r.name,
                    named,
                    render(spec)
                );
                for id in &named {
                    prop_assert!(
                        by.contains(id),
                        "rule {}: {:?} of {:?}\n{}",
                        r.name,
                        named,
                        by,
                        render(spec)
                    );
                }
            }
            Coverage::Covered(_) => prop_assert!(false, "exact answer from the bulk analysis"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn shadowing_analysis_agrees_with_subtraction(spec in spec()) {
        check_coverage(&spec)?;
    }

    #[test]
    fn shadowing_analysis_agrees_with_subtraction_on_larger_policies(spec in network_spec_of(30..80)) {
        check_coverage(&spec)?;
    }

    #[test]
    fn shadowing_analysis_agrees_with_subtraction_on_rules_of_many_boxes(spec in many_box_spec()) {
        check_coverage(&spec)?;
    }
}

/// A policy of `rule broad allow BROAD -> any4`, 1,999 rules from BROAD
/// to 203.0.113.0/24 on tcp ports 1000 to 2998, then `rule narrow allow
/// NARROW` and `default deny`.
fn behind_2000_rules(broad: &str, narrow: &str) -> palisade::policy::Policy {
    let mut text = format!("rule broad allow {broad} -> any4\n");
    for k in 0..1999 {
        text += &format!(
            "rule r{k} allow {broad} -> 203.0.113.0/24 service tcp/{}\n",
            1000 + k
        );
    }
    text += &format!("rule narrow allow {narrow}\ndefault deny\n");
    compile_lenient(&text).unwrap()
}

/// The analyses' budgets bound the candidates they go through, not only
/// the boxes they cut: one box that 2,000 earlier rules overlap costs 8
/// units (one, and one per 256 candidates), so that no pair of policies
/// can make a bounded analysis scan without end.
#[test]
fn an_analysis_budget_pays_for_the_candidates_it_scans() {
    use palisade::policy::analysis::{coverage, coverage_in_bulk, Coverage, Indexed};
    let policy = behind_2000_rules("10.0.0.0/8", "10.1.0.0/16 -> any4 service tcp");
    let (v4, v6) = entries(&policy);
    let (i4, i6) = (Indexed::new(&v4), Indexed::new(&v6));
    let narrow = policy.rules().last().unwrap().id;
    let all = |_: u32| true;
    for cost in [7, 8] {
        let mut budget = cost;
        let got = coverage(&i4, &i6, narrow, &all, &mut budget);
        match cost {
            7 => assert!(got.is_err(), "{got:?}"),
            _ => assert_eq!(got, Ok(Coverage::Covered(vec![0])), "{budget}"),
        }
        let mut budget = cost;
        let got = coverage_in_bulk(&i4, &i6, narrow, &all, &|_| false, &mut budget);
        match cost {
            7 => assert!(got.is_err(), "{got:?}"),
            _ => assert!(matches!(got, Ok(Coverage::CoveredInBulk { .. })), "{got:?}"),
        }
    }
}

/// A rule of many boxes scans the candidates they share once for them
/// all, not once per box: 64 boxes inside one earlier broad rule, behind
/// 2,000 others that overlap their hull (but not one of them), cost about
/// what one box against them does plus a unit per box (8 units each, 512
/// in all, when every box scanned them).
#[test]
fn a_rule_of_many_boxes_scans_its_candidates_once() {
    use palisade::policy::analysis::{coverage, Coverage, Indexed};
    // Eight networks apart from one another, by eight services.
    let nets: Vec<String> = (0..8)
        .map(|k| format!("198.51.100.{}/28", 32 * k))
        .collect();
    let policy = behind_2000_rules(
        "198.51.100.0/24",
        &format!(
            "{} -> any4 service tcp/22, tcp/23, tcp/25, tcp/80, \
             tcp/443, tcp/3389, tcp/8080, tcp/8443",
            nets.join(", ")
        ),
    );
    let (v4, v6) = entries(&policy);
    let (i4, i6) = (Indexed::new(&v4), Indexed::new(&v6));
    let narrow = policy.rules().last().unwrap().id;
    assert_eq!(v4.iter().filter(|e| e.rule == narrow).count(), 64);
    let all = |_: u32| true;
    let mut budget = 1000;
    let got = coverage(&i4, &i6, narrow, &all, &mut budget);
    assert_eq!(got, Ok(Coverage::Covered(vec![0])));
    let used = 1000 - budget;
    assert!((64..=128).contains(&used), "{used} units");
}

/// An edit of one rule (inserted, removed, its verdict flipped, or
/// replaced in place) or of the default.
fn one_rule_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<Index>().prop_map(Edit::Remove),
        (any::<Index>(), rule()).prop_map(|(i, r)| Edit::Insert(i, r)),
        any::<Index>().prop_map(Edit::Flip),
        (any::<Index>(), rule()).prop_map(|(i, r)| Edit::Replace(i, r)),
        Just(Edit::FlipDefault),
    ]
}

/// One change as the exact regions give it: old and new verdicts, the
/// rules deciding it before and after.
type Expected = (Verdict, Verdict, Vec<String>, Vec<String>);

/// What `diff` says by rule when a change is too fragmented to list (one
/// rule inserted, removed or replaced, or the default changed), against
/// the exact regions. Every changed flow involves the edited rules (or
/// only the default); per family, in order: where
/// both rules match, a change naming both; where only the old one does,
/// a change from it to the later rules named; where only the new one
/// does, the reverse. Of the later rules named, every one decides some
/// changed flow, and all of them are named when the list is not cut
/// short.
fn check_diff_by_rule(spec: &Spec, edit: &Edit) -> Result<(), TestCaseError> {
    use palisade::policy::analysis::{changed_regions, diff_by_rule, Piece};
    let edited = apply(spec, std::slice::from_ref(edit));
    let (old_text, new_text) = (render(spec), render(&edited));
    let old = compile_lenient(&old_text)?;
    let new = compile_lenient(&new_text)?;
    let (p4, p6) = changed_regions(&old, &new).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let Some(by_rule) = diff_by_rule(&old, &new) else {
        // Not one rule's change (the edited rule matches nothing, or is
        // another rule's twin).
        return Ok(());
    };
    let by_rule = by_rule.map_err(|e| TestCaseError::fail(e.to_string()))?;
    let why = || format!("{edit:?}\nold:\n{old_text}\nnew:\n{new_text}\n{by_rule:#?}");
    let (gone, came) = (
        by_rule.removed.first().copied(),
        by_rule.added.first().copied(),
    );
    prop_assert!(by_rule.removed.len() <= 1 && by_rule.added.len() <= 1);
    prop_assert!(
        gone.is_some() || came.is_some() || matches!(edit, Edit::FlipDefault),
        "{}",
        why()
    );
    let name = |p: &palisade::policy::Policy, r: Option<u32>| p.rule_name(r).to_string();
    // Expected, per family: (old verdict, new verdict, old rules, new
    // rules), the edited rule's side a single name.
    fn expected<A>(
        pieces: &[Piece<A>],
        gone: Option<u32>,
        came: Option<u32>,
        name_old: &dyn Fn(Option<u32>) -> String,
        name_new: &dyn Fn(Option<u32>) -> String,
    ) -> Result<Vec<Expected>, String> {
        let mut kinds: [Vec<&Piece<A>>; 4] = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let default_only = gone.is_none() && came.is_none();
        for p in pieces {
            let (o, n) = (gone.is_some() && p.1 == gone, came.is_some() && p.2 == came);
            let kind = match (o, n) {
                (true, true) => 0,
                (true, false) => 1,
                (false, true) => 2,
                // Only the default changed: flows no rule matches.
                (false, false) if default_only && p.1.is_none() && p.2.is_none() => 3,
                (false, false) => {
                    return Err(format!("a change by neither rule: {:?} {:?}", p.1, p.2))
                }
            };
            kinds[kind].push(p);
        }
        Ok(kinds
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| {
                let set = |f: &dyn Fn(&Piece<A>) -> String| {
                    let mut v: Vec<String> = k.iter().map(|p| f(p)).collect();
                    v.sort();
                    v.dedup();
                    v
                };
                (
                    k[0].3,
                    k[0].4,
                    set(&|p| name_old(p.1)),
                    set(&|p| name_new(p.2)),
                )
            })
            .collect())
    }
    let (name_old, name_new) = (|r| name(&old, r), |r| name(&new, r));
    let mut want = Vec::new();
    for family in [
        expected(&p4, gone, came, &name_old, &name_new),
        expected(&p6, gone, came, &name_old, &name_new),
    ] {
        want.extend(family.map_err(|e| TestCaseError::fail(format!("{e}\n{}", why())))?);
    }
    same_changes(&by_rule.changes, &want, &why)
}

/// The changes described by rule against those expected, in order: the
/// same verdicts; on each side, the edited rule's name, or rules each of
/// which decides some of it, all of them unless cut short.
fn same_changes(
    got: &[palisade::policy::analysis::Change],
    want: &[Expected],
    why: &dyn Fn() -> String,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{:#?}\n{}", want, why());
    for (c, (vo, vn, was, now)) in got.iter().zip(want) {
        prop_assert_eq!((c.old_verdict, c.new_verdict), (*vo, *vn), "{}", why());
        for (d, exact) in [(&c.old_rules, was), (&c.new_rules, now)] {
            for n in &d.names {
                prop_assert!(exact.contains(n), "{} not among {:?}\n{}", n, exact, why());
            }
            if d.more {
                prop_assert!(!d.names.is_empty(), "{}", why());
            } else {
                let mut named = d.names.clone();
                named.sort();
                prop_assert_eq!(&named, exact, "{}", why());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn diff_by_rule_agrees_with_the_exact_regions(spec in spec(), edit in one_rule_edit()) {
        check_diff_by_rule(&spec, &edit)?;
    }

    #[test]
    fn diff_by_rule_agrees_with_the_exact_regions_on_larger_policies(
        spec in network_spec_of(30..80),
        edit in one_rule_edit(),
    ) {
        check_diff_by_rule(&spec, &edit)?;
    }
}

/// `count` distinct /64s of 2001:db8:`n`::/48 (their fourth groups), in
/// a scrambled order.
fn scrambled_nets(n: u16, count: usize) -> Vec<u16> {
    let mut x = 0x2545u16;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    while out.len() < count {
        x = x.wrapping_mul(25173).wrapping_add(13849 + n);
        if seen.insert(x) {
            out.push(x);
        }
    }
    out
}

/// The /64s of [`scrambled_nets`] as a policy lists them.
fn nets_text(nets: &[u16], n: u16) -> String {
    nets.iter()
        .map(|w| format!("2001:db8:{n:x}:{w:x}::/64"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A rule of 62,500 boxes (250 networks to 250 others) inserted into a
/// small policy, described by rule: the flows it takes from the later
/// allow it overlaps are named with that rule alone, not with the later
/// deny (its own verdict), the later allow it misses, or the default.
/// (Finding the later rules was paid as every box tested against every
/// entry, 62,500 x 62,500 tests: refused as too complex.)
#[test]
fn diff_by_rule_names_the_later_rules_of_a_rule_of_many_boxes() {
    use palisade::policy::analysis::diff_by_rule;
    let (srcs, dsts) = (scrambled_nets(1, 250), scrambled_nets(2, 250));
    let rules = |big: &str| {
        format!(
            "net many_src = {}\nnet many_dst = {}\n\
             rule ssh allow 2001:db8::/32 -> 2001:db8:2::/48 service tcp/22\n{big}\
             rule upper allow 2001:db8:1:8000::/49 -> any6 service tcp/80\n\
             rule close deny 2001:db8:1::/48 -> 2001:db8:2::/48 service tcp/80\n\
             rule elsewhere allow 2001:db8:3::/48 -> any6 service tcp/80\n\
             default deny\n",
            nets_text(&srcs, 1),
            nets_text(&dsts, 2)
        )
    };
    let old = compile_lenient(&rules("")).unwrap();
    let new = compile_lenient(&rules(
        "rule big deny many_src -> many_dst service tcp/80\n",
    ))
    .unwrap();
    let by_rule = diff_by_rule(&old, &new)
        .expect("one rule inserted")
        .unwrap();
    assert_eq!(
        (&by_rule.removed[..], &by_rule.added[..]),
        (&[][..], &[1][..])
    );
    let [change] = &by_rule.changes[..] else {
        panic!("{by_rule:#?}")
    };
    assert!(
        change.region.starts_with("the flows of the new `big` ("),
        "{change}"
    );
    assert_eq!(
        (change.old_verdict, change.new_verdict),
        (Verdict::Allow, Verdict::Deny)
    );
    assert_eq!(change.old_rules.names, ["upper"], "{change}");
    assert!(!change.old_rules.more, "{change}");
    assert_eq!(change.new_rules.names, ["big"], "{change}");
    // And so the policies decide: flows of `big` from the upper half
    // changed, from `upper`; the others did not.
    let addr = |n: u16, w: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n, w, 0, 0, 0, 1));
    let mut changed = 0;
    for &s in srcs.iter().step_by(13) {
        for &d in dsts.iter().step_by(17) {
            let key = FlowKey {
                src: addr(1, s),
                dst: addr(2, d),
                proto: 6,
                src_port: 40000,
                dst_port: 80,
            };
            let (was, now) = (old.decide(&key), new.decide(&key));
            assert_eq!(now.verdict, Verdict::Deny, "{key:?}");
            if was.verdict == Verdict::Allow {
                assert_eq!(old.rule_name(was.rule), "upper", "{key:?}");
                changed += 1;
            }
        }
    }
    assert!(changed > 10, "{changed}");
}

/// A rule edited in place right before an identical twin: the edit is
/// taken as one rule replaced (not the twin paired with the edited rule
/// and two rules changed), and described by rule.
#[test]
fn diff_by_rule_takes_an_edit_beside_an_identical_rule_as_one() {
    use palisade::policy::analysis::diff_by_rule;
    let text = "rule web allow 10.0.0.0/16 -> 10.1.0.0/16 service tcp/80\n\
                rule web-again allow 10.0.0.0/16 -> 10.1.0.0/16 service tcp/80\n\
                rule rest deny 10.0.0.0/8 -> any4\n\
                default allow\n";
    let old = compile_lenient(text).unwrap();
    let new = compile_lenient(&text.replacen("web allow", "web deny", 1)).unwrap();
    let by_rule = diff_by_rule(&old, &new).expect("one rule edited").unwrap();
    assert_eq!(
        (&by_rule.removed[..], &by_rule.added[..]),
        (&[0][..], &[0][..])
    );
    let lines: Vec<String> = by_rule.changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        lines,
        ["tcp 10.0.0.0/16 -> 10.1.0.0/16 dport 80 where no earlier rule matches (too many regions to list one by one)   now deny by `web`, was allow by `web`"]
    );
}

/// What `diff` says by rule for a change of several rules (any edits,
/// the default too) too fragmented to list, against the exact regions.
/// Every changed flow is decided by a changed rule on one side: by an
/// added or edited rule (or the changed default) of the new policy, else
/// by a removed or edited rule (or the changed default) of the old one.
/// Per family, in order: a line per old rule that so decides some changed
/// flows (old rules first, then new ones), each with its verdicts; the
/// other side's rules named each decide some of them, all of them named
/// unless the list is cut short.
fn check_diff_by_rules(spec: &Spec, edits: &[Edit]) -> Result<(), TestCaseError> {
    use palisade::policy::analysis::{changed_regions, diff_by_rules};
    let edited = apply(spec, edits);
    let (old_text, new_text) = (render(spec), render(&edited));
    let old = compile_lenient(&old_text)?;
    let new = compile_lenient(&new_text)?;
    let (p4, p6) = changed_regions(&old, &new).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let Some(by_rule) = diff_by_rules(&old, &new) else {
        // Nothing changed that decides a flow.
        prop_assert!(p4.is_empty() && p6.is_empty());
        return Ok(());
    };
    let by_rule = by_rule.map_err(|e| TestCaseError::fail(e.to_string()))?;
    let why = || format!("{edits:?}\nold:\n{old_text}\nnew:\n{new_text}\n{by_rule:#?}");
    let default = old.default_verdict() != new.default_verdict();
    // A rule (`None`: the default) changed on a side.
    let changed = |ids: &[u32], r: Option<u32>| r.map_or(default, |r| ids.contains(&r));
    let mut lines: Vec<Expected> = Vec::new();
    for pieces in [
        p4.iter().map(|p| (p.1, p.2, p.3, p.4)).collect::<Vec<_>>(),
        p6.iter().map(|p| (p.1, p.2, p.3, p.4)).collect::<Vec<_>>(),
    ] {
        // Which side's rule each piece goes to.
        let mut by_old: Vec<(Option<u32>, Verdict, Verdict, String)> = Vec::new();
        let mut by_new: Vec<(Option<u32>, Verdict, Verdict, String)> = Vec::new();
        for &(o, n, vo, vn) in &pieces {
            if changed(&by_rule.added, n) {
                by_new.push((n, vo, vn, old.rule_name(o).to_string()));
            } else {
                prop_assert!(
                    changed(&by_rule.removed, o),
                    "a change by kept rules: {:?} {:?}\n{}",
                    o,
                    n,
                    why()
                );
                by_old.push((o, vo, vn, new.rule_name(n).to_string()));
            }
        }
        // Old rules in order, the default last; then the new ones.
        let order = |r: Option<u32>| r.unwrap_or(u32::MAX);
        for (side, is_old) in [(by_old, true), (by_new, false)] {
            let mut rules: Vec<Option<u32>> = side.iter().map(|x| x.0).collect();
            rules.sort_by_key(|&r| order(r));
            rules.dedup();
            for r in rules {
                let mine: Vec<_> = side.iter().filter(|x| x.0 == r).collect();
                let mut others: Vec<String> = mine.iter().map(|x| x.3.clone()).collect();
                others.sort();
                others.dedup();
                let (vo, vn) = (mine[0].1, mine[0].2);
                prop_assert!(mine.iter().all(|x| (x.1, x.2) == (vo, vn)), "{}", why());
                let own = vec![if is_old { &old } else { &new }.rule_name(r).to_string()];
                lines.push(match is_old {
                    true => (vo, vn, own, others),
                    false => (vo, vn, others, own),
                });
            }
        }
    }
    same_changes(&by_rule.changes, &lines, &why)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn diff_by_rules_agrees_with_the_exact_regions(
        spec in spec(),
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        check_diff_by_rules(&spec, &edits)?;
    }

    #[test]
    fn diff_by_rules_agrees_with_the_exact_regions_on_larger_policies(
        spec in network_spec_of(30..80),
        edits in prop::collection::vec(edit(), 1..5),
    ) {
        check_diff_by_rules(&spec, &edits)?;
    }

    #[test]
    fn diff_by_rules_agrees_with_the_exact_regions_on_rules_of_many_boxes(
        spec in many_box_spec(),
        edits in prop::collection::vec(edit(), 1..4),
    ) {
        check_diff_by_rules(&spec, &edits)?;
    }
}

/// How a change of several rules reads, by rule: a rule edited right
/// before an identical twin is the one named (not the twin), whatever
/// rules that match nothing either side holds; a rule
/// edited in place counts once toward the limit of rules described; a
/// rule of many boxes is named rather than listed box by box.
#[test]
fn diff_by_rules_reads_as_the_edit() {
    use palisade::policy::analysis::{diff_by_rules, EDITED_MAX};
    let lines = |old: &str, new: &str| -> Vec<String> {
        let (old, new) = (compile_lenient(old).unwrap(), compile_lenient(new).unwrap());
        let by_rule = diff_by_rules(&old, &new).expect("a change").unwrap();
        by_rule.changes.iter().map(|c| c.to_string()).collect()
    };
    let text = "rule ssh allow 10.0.0.0/8 -> any4 service tcp/22\n\
                rule web deny 10.0.0.0/8 -> any4 service tcp/80\n\
                rule web2 allow 10.0.0.0/8 -> any4 service tcp/80\n\
                default deny\n";
    let edited = text
        .replacen("ssh allow", "ssh deny", 1)
        .replacen("web deny", "web allow", 1);
    let (old, new) = (
        compile_lenient(text).unwrap(),
        compile_lenient(&edited).unwrap(),
    );
    let by_rule = diff_by_rules(&old, &new).unwrap().unwrap();
    assert_eq!(
        (&by_rule.removed[..], &by_rule.added[..]),
        (&[0, 1][..], &[0, 1][..])
    );
    assert_eq!(
        lines(text, &edited),
        [
            "tcp 10.0.0.0/8 -> any4 dport 22 where no earlier rule matches and the old policy allows them (too many regions to list one by one)   now deny by `ssh`, was allow by `ssh`",
            "tcp 10.0.0.0/8 -> any4 dport 80 where no earlier rule matches and the old policy denies them (too many regions to list one by one)   now allow by `web`, was deny by `web`",
        ]
    );
    // The same with a rule that matches nothing (expired) on one side.
    let expired = text.replace(
        "default deny",
        "rule tmp allow 192.0.2.1 -> any4 expires 2020-01-01\ndefault deny",
    );
    assert_eq!(lines(&expired, &edited), lines(text, &edited));
    // Every rule flipped in place: one rule each toward the limit.
    let policy = |n: usize, flipped: usize| -> String {
        let mut t: String = (0..n)
            .map(|k| {
                let verdict = if k < flipped { "deny" } else { "allow" };
                format!(
                    "rule r{k} {verdict} 10.0.0.0/8 -> any4 service tcp/{}\n",
                    1000 + k
                )
            })
            .collect();
        t += "default deny\n";
        t
    };
    let (old, new) = (
        compile_lenient(&policy(EDITED_MAX + 1, 0)).unwrap(),
        compile_lenient(&policy(EDITED_MAX + 1, EDITED_MAX)).unwrap(),
    );
    let by_rule = diff_by_rules(&old, &new).expect("at the limit").unwrap();
    assert_eq!(by_rule.changes.len(), EDITED_MAX);
    let new = compile_lenient(&policy(EDITED_MAX + 1, EDITED_MAX + 1)).unwrap();
    assert!(diff_by_rules(&old, &new).is_none(), "past the limit");
    // A rule of 3 x 4 = 12 boxes, inserted.
    let sets = "net a = 192.0.2.0/28, 192.0.2.32/28, 192.0.2.64/28\n\
                net b = 198.51.100.0/28, 198.51.100.32/28, 198.51.100.64/28, 198.51.100.96/28\n";
    let old = format!("{sets}rule ssh allow any4 -> any4 service tcp/22\ndefault allow\n");
    let new = format!(
        "{sets}rule ssh deny any4 -> any4 service tcp/22\nrule big deny a -> b\ndefault allow\n"
    );
    assert_eq!(
        lines(&old, &new),
        [
            "tcp any4 -> any4 dport 22 where no earlier rule matches and the old policy allows them (too many regions to list one by one)   now deny by `ssh`, was allow by `ssh`",
            "the flows of the new `big` (12 boxes) where no earlier rule matches and the old policy allows them (too many regions to list one by one)   now deny by `big`, was allow by `default`",
        ]
    );
}

/// A rule of many boxes (400 source by 400 destination networks:
/// 160,000) inserted into a small policy is listed region by region,
/// exactly. (The cut used to peel the rule's boxes one at a time, which
/// charged its work budget for the boxes left at every step: this change
/// was refused as too fragmented.)
#[test]
fn diff_lists_the_regions_of_a_rule_of_many_boxes() {
    use palisade::classify::{FamilyKey, FlowKey};
    let (srcs, dsts) = (scrambled_nets(1, 400), scrambled_nets(2, 400));
    let base = format!(
        "net many_src = {}\nnet many_dst = {}\n\
         rule web allow 2001:db8:1::/49 -> any6 service tcp/80\n",
        nets_text(&srcs, 1),
        nets_text(&dsts, 2)
    );
    let old = compile_lenient(&format!("{base}default allow\n")).unwrap();
    let new = compile_lenient(&format!(
        "{base}rule big deny many_src -> many_dst service tcp/80\ndefault allow\n"
    ))
    .unwrap();
    let (p4, p6) = palisade::policy::analysis::changed_regions(&old, &new).unwrap();
    assert!(p4.is_empty());
    let addr =
        |n: u16, w: u16, low: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n, w, 0, 0, 0, low));
    // Members and neighbours of both sets, on port 80 and beside it.
    let mut checked = 0;
    for (k, &s) in srcs.iter().enumerate().step_by(7) {
        for (m, &d) in dsts.iter().enumerate().step_by(11) {
            let (s, d) = if (k + m) % 5 == 0 {
                (s.wrapping_add(1), d)
            } else {
                (s, d)
            };
            for port in [79, 80] {
                let key = FlowKey {
                    src: addr(1, s, 9),
                    dst: addr(2, d, 7),
                    proto: 6,
                    src_port: 40000,
                    dst_port: port,
                };
                let changed = old.decide(&key).verdict != new.decide(&key).verdict;
                let expected = port == 80 && s >= 0x8000 && srcs.contains(&s) && dsts.contains(&d);
                assert_eq!(changed, expected, "{key:?}");
                let Some(FamilyKey::V6(k6)) = key.family_key() else {
                    unreachable!("an IPv6 key")
                };
                let hits = p6.iter().filter(|x| x.0.matches(&k6)).count();
                assert_eq!(hits, usize::from(changed), "{key:?}");
                checked += usize::from(changed);
            }
        }
    }
    assert!(checked > 200, "{checked}");
}
