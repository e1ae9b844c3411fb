//! The compiled classifier against the linear reference on every ClassBench
//! set and trace in `../shared/data/classbench/`: every trace line must get
//! exactly the rule the reference gives (the trace's own last column is not
//! always the first match, so it is not used).

use std::collections::HashSet;
use std::path::PathBuf;

use palisade::classify::classbench::{parse_rules, parse_trace};
use palisade::classify::{Classifier, Entry, Fields, Interval, Key, LinearMatcher};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/classbench")
}

/// Checks one rule set against its trace, or against points drawn at the
/// corners of its rules when it has none.
fn check_set(name: &str) {
    let dir = data_dir();
    let Ok(rules) = std::fs::read_to_string(dir.join(name)) else {
        eprintln!(
            "SKIPPED {name}: this test needs the ClassBench set {}",
            dir.join(name).display()
        );
        return;
    };
    let entries = parse_rules(&rules).unwrap_or_else(|e| panic!("{name}: {e}"));
    let compiled = Classifier::build(entries.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let reference = LinearMatcher::new(entries.clone());
    let keys: Vec<Key<u32>> = match std::fs::read_to_string(dir.join(format!("{name}_trace"))) {
        Ok(trace) => parse_trace(&trace).unwrap_or_else(|e| panic!("{name}_trace: {e}")),
        Err(_) => entries
            .iter()
            .flat_map(|e| {
                let f = e.fields;
                [
                    Key {
                        src: f.src.lo,
                        dst: f.dst.lo,
                        src_port: f.src_port.lo,
                        dst_port: f.dst_port.lo,
                        proto: f.proto.lo,
                    },
                    Key {
                        src: f.src.hi,
                        dst: f.dst.hi,
                        src_port: f.src_port.hi,
                        dst_port: f.dst_port.hi,
                        proto: f.proto.hi,
                    },
                ]
            })
            .collect(),
    };
    assert!(!keys.is_empty(), "{name}: no keys");
    // Traces repeat headers; the reference is slow in debug builds, so each
    // distinct header is checked once.
    let mut batch = vec![None; keys.len()];
    compiled.lookup_batch(&keys, &mut batch);
    let mut seen = HashSet::new();
    let mut matched = 0;
    for (line, key) in keys.iter().enumerate() {
        if !seen.insert(*key) {
            continue;
        }
        let want = reference.lookup(key);
        matched += usize::from(want.is_some());
        assert_eq!(
            compiled.lookup(key),
            want,
            "{name}: trace line {} key {key:?}",
            line + 1
        );
        assert_eq!(
            batch[line],
            want,
            "{name}: batched, trace line {}",
            line + 1
        );
    }
    eprintln!(
        "{name}: {} distinct keys agree ({matched} matched a rule)",
        seen.len()
    );
}

#[test]
fn acl1_1k() {
    check_set("acl1_1k");
}

#[test]
fn fw1_1k() {
    check_set("fw1_1k");
}

#[test]
fn ipc1_1k() {
    check_set("ipc1_1k");
}

#[test]
fn acl1_10k() {
    check_set("acl1_10k");
}

#[test]
fn acl2_10k() {
    check_set("acl2_10k");
}

#[test]
fn fw1_10k() {
    check_set("fw1_10k");
}

#[test]
fn ipc1_10k() {
    check_set("ipc1_10k");
}

/// The 1k sets lifted into IPv6 (each IPv4 value `v` becomes the block
/// `2001:db8:vvvv:vvvv::/64`-like range `base | v << 32 ..= base | v << 32 |
/// 0xffff_ffff`), so the 128-bit structure must give the IPv4 answers.
fn check_set_v6(name: &str) {
    const BASE: u128 = 0x2001_0db8 << 96;
    let dir = data_dir();
    let (Ok(rules), Ok(trace)) = (
        std::fs::read_to_string(dir.join(name)),
        std::fs::read_to_string(dir.join(format!("{name}_trace"))),
    ) else {
        eprintln!(
            "SKIPPED {name} (IPv6): this test needs {} and its trace",
            dir.join(name).display()
        );
        return;
    };
    let v4 = parse_rules(&rules).unwrap_or_else(|e| panic!("{name}: {e}"));
    let lift = |iv: Interval<u32>| Interval {
        lo: BASE | u128::from(iv.lo) << 32,
        hi: BASE | u128::from(iv.hi) << 32 | 0xffff_ffff,
    };
    let v6: Vec<Entry<u128>> = v4
        .iter()
        .map(|e| Entry {
            fields: Fields {
                src: lift(e.fields.src),
                dst: lift(e.fields.dst),
                src_port: e.fields.src_port,
                dst_port: e.fields.dst_port,
                proto: e.fields.proto,
            },
            rule: e.rule,
        })
        .collect();
    let compiled = Classifier::build(v6).unwrap_or_else(|e| panic!("{name} (IPv6): {e}"));
    let reference = LinearMatcher::new(v4);
    let keys = parse_trace(&trace).unwrap_or_else(|e| panic!("{name}_trace: {e}"));
    for (line, k) in keys.iter().enumerate() {
        let k6 = Key {
            src: BASE | u128::from(k.src) << 32 | (line as u128 & 0xffff_ffff),
            dst: BASE | u128::from(k.dst) << 32,
            src_port: k.src_port,
            dst_port: k.dst_port,
            proto: k.proto,
        };
        assert_eq!(
            compiled.lookup(&k6),
            reference.lookup(k),
            "{name} (IPv6): trace line {}",
            line + 1
        );
    }
}

#[test]
fn acl1_1k_ipv6() {
    check_set_v6("acl1_1k");
}

#[test]
fn fw1_1k_ipv6() {
    check_set_v6("fw1_1k");
}

#[test]
fn ipc1_1k_ipv6() {
    check_set_v6("ipc1_1k");
}
