//! The compiled classifier against the linear reference on random,
//! deliberately overlapping rule sets of both families: prefixes nested
//! around a few shared bases, wildcards in random fields, port ranges that
//! share endpoints, and keys taken on and next to rule boundaries so that
//! most of them match something and many match several entries.

use palisade::classify::{
    Address, BuildError, BuildLimits, Classifier, Entry, Fields, Interval, Key, LinearMatcher,
};
use proptest::prelude::*;

/// A family whose addresses the generators can build from `u128` bit
/// patterns (the top `BITS` bits of a 128-bit pattern are used).
trait Family: Address {
    fn from_bits(x: u128) -> Self;
    fn bits(self) -> u128;
}

impl Family for u32 {
    fn from_bits(x: u128) -> Self {
        (x >> 96) as u32
    }
    fn bits(self) -> u128 {
        u128::from(self) << 96
    }
}

impl Family for u128 {
    fn from_bits(x: u128) -> Self {
        x
    }
    fn bits(self) -> u128 {
        self
    }
}

/// Shared bases, so prefixes of different rules nest and overlap.
const BASES: [u128; 6] = [
    0,
    0x0A00_0000 << 96,
    0x0A0A_0000 << 96,
    0x0A0A_0A80 << 96,
    0x2001_0db8_0000_0000_0000_0000_0000_0000,
    u128::MAX,
];
const PREFIX_LENS: [u32; 9] = [0, 1, 8, 16, 24, 25, 31, 32, 64];
const PORTS: [u16; 9] = [0, 1, 53, 80, 443, 1023, 1024, 8080, 65535];
const PROTOS: [u8; 5] = [0, 1, 6, 17, 255];

/// Raw material of one field; turned into intervals per family.
#[derive(Debug, Clone)]
struct RawRule {
    src: (usize, usize, u128),
    dst: (usize, usize, u128),
    sport: (u8, usize, usize),
    dport: (u8, usize, usize),
    proto: (bool, usize),
    /// Repeat the previous rule id (several entries of one rule).
    same_rule: bool,
}

fn raw_rule() -> impl Strategy<Value = RawRule> {
    let addr = (0..BASES.len(), 0..PREFIX_LENS.len(), any::<u128>());
    let port = (0u8..4, 0..PORTS.len(), 0..PORTS.len());
    (
        addr.clone(),
        addr,
        port.clone(),
        port,
        (any::<bool>(), 0..PROTOS.len()),
        any::<bool>(),
    )
        .prop_map(|(src, dst, sport, dport, proto, same_rule)| RawRule {
            src,
            dst,
            sport,
            dport,
            proto,
            same_rule,
        })
}

/// A prefix of the family around a shared base, with some noise in the bits
/// below the first eight so that siblings appear.
fn prefix<A: Family>((base, len, noise): (usize, usize, u128)) -> Interval<A> {
    let len = PREFIX_LENS[len].min(A::BITS);
    let pattern = BASES[base] ^ (noise >> 8 & !(u128::MAX >> 8 >> 24 << 24));
    let net_mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    let lo = pattern & net_mask & (u128::MAX << (128 - A::BITS));
    let hi = lo | (!net_mask & (u128::MAX << (128 - A::BITS)));
    Interval {
        lo: A::from_bits(lo),
        hi: A::from_bits(hi),
    }
}

fn ports((form, a, b): (u8, usize, usize)) -> Interval<u16> {
    let (a, b) = (PORTS[a].min(PORTS[b]), PORTS[a].max(PORTS[b]));
    match form {
        0 => Interval {
            lo: 0,
            hi: u16::MAX,
        },
        1 => Interval::single(a),
        _ => Interval { lo: a, hi: b },
    }
}

fn entries<A: Family>(raw: &[RawRule]) -> Vec<Entry<A>> {
    let mut rule = 0;
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            if i > 0 && !r.same_rule {
                rule += 1;
            }
            Entry {
                fields: Fields {
                    src: prefix(r.src),
                    dst: prefix(r.dst),
                    src_port: ports(r.sport),
                    dst_port: ports(r.dport),
                    proto: if r.proto.0 {
                        Interval { lo: 0, hi: 255 }
                    } else {
                        Interval::single(PROTOS[r.proto.1])
                    },
                },
                rule,
            }
        })
        .collect()
}

/// Picks a value on or next to an interval's boundary, or inside it.
fn near<T: Copy + Ord>(
    iv: Interval<T>,
    how: u8,
    inside: T,
    step: impl Fn(T, bool) -> Option<T>,
) -> T {
    match how % 5 {
        0 => iv.lo,
        1 => iv.hi,
        2 => step(iv.lo, false).unwrap_or(iv.lo),
        3 => step(iv.hi, true).unwrap_or(iv.hi),
        _ => inside.clamp(iv.lo, iv.hi),
    }
}

fn key<A: Family>(entries: &[Entry<A>], (pick, how, noise): (usize, [u8; 5], u128)) -> Key<A> {
    let f = entries[pick % entries.len()].fields;
    let addr_step = |v: A, up: bool| -> Option<A> {
        let (b, unit) = (v.bits(), 1u128 << (128 - A::BITS));
        let n = if up {
            b.checked_add(unit)?
        } else {
            b.checked_sub(unit)?
        };
        Some(A::from_bits(n))
    };
    let port_step = |v: u16, up: bool| {
        if up {
            v.checked_add(1)
        } else {
            v.checked_sub(1)
        }
    };
    let proto_step = |v: u8, up: bool| {
        if up {
            v.checked_add(1)
        } else {
            v.checked_sub(1)
        }
    };
    Key {
        src: near(f.src, how[0], A::from_bits(noise), addr_step),
        dst: near(
            f.dst,
            how[1],
            A::from_bits(noise.rotate_left(64)),
            addr_step,
        ),
        src_port: near(f.src_port, how[2], noise as u16, port_step),
        dst_port: near(f.dst_port, how[3], (noise >> 16) as u16, port_step),
        proto: near(f.proto, how[4], (noise >> 32) as u8, proto_step),
    }
}

type RawKey = (usize, [u8; 5], u128);

fn raw_keys(n: usize) -> impl Strategy<Value = Vec<RawKey>> {
    prop::collection::vec((any::<usize>(), any::<[u8; 5]>(), any::<u128>()), n)
}

/// Builds both matchers and compares them on every key; a build refused as
/// too complex is acceptable only under tight limits.
fn agree<A: Family>(
    raw: &[RawRule],
    keys: &[RawKey],
    limits: &BuildLimits,
) -> Result<(), TestCaseError> {
    let entries = entries::<A>(raw);
    let compiled = match Classifier::build_with(entries.clone(), limits) {
        Ok(c) => c,
        Err(BuildError::TooComplex { .. }) if *limits != BuildLimits::default() => return Ok(()),
        Err(e) => return Err(TestCaseError::fail(format!("build failed: {e}"))),
    };
    prop_assert!(compiled.memory_bytes() <= limits.max_memory_bytes);
    let reference = LinearMatcher::new(entries.clone());
    let keys: Vec<Key<A>> = keys.iter().map(|k| key(&entries, *k)).collect();
    let mut batch = vec![None; keys.len()];
    compiled.lookup_batch(&keys, &mut batch);
    let bound = compiled.stats().worst_case_steps;
    for (k, b) in keys.iter().zip(batch) {
        let want = reference.lookup(k);
        prop_assert_eq!(compiled.lookup(k), want, "key {:?}", k);
        prop_assert_eq!(b, want, "batched key {:?}", k);
        let (rule, steps) = compiled.lookup_steps(k);
        prop_assert_eq!(rule, want, "counted key {:?}", k);
        prop_assert!(steps <= bound, "{} steps > bound {}", steps, bound);
    }
    Ok(())
}

/// Small leaves and shallow trees force deep recursion, partitioning and the
/// depth cap on small sets.
fn tight() -> BuildLimits {
    BuildLimits {
        max_memory_bytes: 256 << 10,
        max_leaf: 8,
        max_depth: 4,
        ..BuildLimits::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn ipv4_small_sets_agree(raw in prop::collection::vec(raw_rule(), 1..48), keys in raw_keys(48)) {
        agree::<u32>(&raw, &keys, &BuildLimits::default())?;
    }

    #[test]
    fn ipv6_small_sets_agree(raw in prop::collection::vec(raw_rule(), 1..48), keys in raw_keys(48)) {
        agree::<u128>(&raw, &keys, &BuildLimits::default())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn tight_limits_agree_or_refuse(raw in prop::collection::vec(raw_rule(), 1..64), keys in raw_keys(32), v6: bool) {
        if v6 {
            agree::<u128>(&raw, &keys, &tight())?;
        } else {
            agree::<u32>(&raw, &keys, &tight())?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn larger_sets_agree(raw in prop::collection::vec(raw_rule(), 100..400), keys in raw_keys(200), v6: bool) {
        if v6 {
            agree::<u128>(&raw, &keys, &BuildLimits::default())?;
        } else {
            agree::<u32>(&raw, &keys, &BuildLimits::default())?;
        }
    }
}

#[test]
fn empty_set_matches_nothing_in_both_families() {
    let v4 = Classifier::<u32>::build(Vec::new()).unwrap();
    let v6 = Classifier::<u128>::build(Vec::new()).unwrap();
    assert_eq!(
        v4.lookup(&Key {
            src: 1,
            dst: 2,
            src_port: 3,
            dst_port: 4,
            proto: 6
        }),
        None
    );
    assert_eq!(
        v6.lookup(&Key {
            src: 1,
            dst: 2,
            src_port: 3,
            dst_port: 4,
            proto: 6
        }),
        None
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Malformed ClassBench input is an error value, never a panic: random
    /// text, and valid lines with one character replaced or cut short.
    #[test]
    fn classbench_parsers_never_panic(
        noise in "\\PC{0,80}",
        at in any::<prop::sample::Index>(),
        ch in any::<char>(),
        cut in any::<prop::sample::Index>(),
    ) {
        use palisade::classify::classbench::{parse_rules, parse_trace};
        let _ = parse_rules(&noise);
        let _ = parse_trace(&noise);
        let rule = "@237.73.3.4/32\t67.236.63.0/24\t0 : 65535\t1711 : 1711\t0x06/0xFF\t0x0000/0x0200\t";
        let trace = "1923697128\t2273746465\t0\t1221\t6\t4294967295\t261";
        for line in [rule, trace] {
            let mut chars: Vec<char> = line.chars().collect();
            let i = at.index(chars.len());
            chars[i] = ch;
            let edited: String = chars.iter().collect();
            let short: String = line.chars().take(cut.index(line.len())).collect();
            for text in [edited, short] {
                if let Err(e) = parse_rules(&text) {
                    // The replacement may be a line break, making two lines.
                    let line = text.lines().nth(e.line.wrapping_sub(1));
                    prop_assert!(line.is_some(), "{}", e);
                    let width = line.map_or(0, |l| l.chars().count());
                    prop_assert!(e.column >= 1 && e.column <= width + 1, "{}", e);
                }
                let _ = parse_trace(&text);
            }
        }
    }
}

/// Entries of three kinds in a random order: exact source (wide elsewhere),
/// exact destination port (wide addresses), and a destination /24 with a
/// source-port range. Sources pinned against ports pinned is the cross
/// product that one tree cannot hold within a small budget, so the build
/// must partition; keys combine fields of different entries so that they
/// match entries in several trees, often with the first match in a tree
/// searched late (pruning by priority must never skip it).
fn partitioned_set(kinds: &[(u8, u16)]) -> Vec<Entry<u32>> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, &(kind, v))| {
            let mut fields = Fields::any();
            match kind % 3 {
                0 => fields.src = Interval::single(u32::from(v) * 2),
                1 => fields.dst_port = Interval::single(v % 2048),
                _ => {
                    let lo = u32::from(v % 64) << 8;
                    fields.dst = Interval { lo, hi: lo | 0xff };
                    fields.src_port = Interval {
                        lo: v % 1000,
                        hi: v % 1000 + 100,
                    };
                }
            }
            Entry {
                fields,
                rule: i as u32,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn first_match_in_a_late_partition_is_found(
        kinds in prop::collection::vec((any::<u8>(), 0u16..4096), 600..1500),
        picks in prop::collection::vec((any::<usize>(), any::<usize>(), any::<usize>(), any::<u16>()), 300),
    ) {
        let entries = partitioned_set(&kinds);
        let limits = BuildLimits { max_memory_bytes: 4 << 20, ..BuildLimits::default() };
        let compiled = match Classifier::build_with(entries.clone(), &limits) {
            Ok(c) => c,
            Err(BuildError::TooComplex { .. }) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("build failed: {e}"))),
        };
        let st = compiled.stats();
        prop_assert!(st.memory_bytes <= limits.max_memory_bytes);
        let reference = LinearMatcher::new(entries.clone());
        let n = entries.len();
        let keys: Vec<Key<u32>> = picks
            .iter()
            .map(|&(a, b, c, noise)| {
                let (fa, fb, fc) = (entries[a % n].fields, entries[b % n].fields, entries[c % n].fields);
                Key {
                    src: fa.src.lo.saturating_add(u32::from(noise) % 3).min(fa.src.hi),
                    dst: fb.dst.lo.saturating_add(u32::from(noise)).min(fb.dst.hi),
                    src_port: fb.src_port.lo.saturating_add(noise % 150).min(fb.src_port.hi),
                    dst_port: fc.dst_port.lo,
                    proto: 6,
                }
            })
            .collect();
        let mut batch = vec![None; keys.len()];
        compiled.lookup_batch(&keys, &mut batch);
        for (k, b) in keys.iter().zip(batch) {
            let want = reference.lookup(k);
            prop_assert_eq!(compiled.lookup(k), want, "key {:?} ({} trees)", k, st.trees);
            prop_assert_eq!(b, want, "batched key {:?}", k);
            let (rule, steps) = compiled.lookup_steps(k);
            prop_assert_eq!(rule, want);
            prop_assert!(steps <= st.worst_case_steps, "{} steps > bound {}", steps, st.worst_case_steps);
        }
    }
}

#[test]
fn the_partitioned_set_really_partitions() {
    let kinds: Vec<(u8, u16)> = (0..1200u16)
        .map(|i| ((i % 3) as u8, i * 7 % 4096))
        .collect();
    let entries = partitioned_set(&kinds);
    let limits = BuildLimits {
        max_memory_bytes: 4 << 20,
        ..BuildLimits::default()
    };
    let c = Classifier::build_with(entries, &limits).expect("builds partitioned");
    assert!(c.stats().trees > 1, "{:?}", c.stats());
}
