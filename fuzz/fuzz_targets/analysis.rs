//! Fuzzes the policy analyses on arbitrary pairs of policy files (split at
//! the first 0xff byte): `lint` on each, and `diff` from the first to the
//! second: the changed regions (checked at their corners: each corner is a
//! flow whose verdict changed, from the region's old verdict to its new
//! one, by its rules), what `diff` prints (regions, or the change by rule
//! when they are too many), the HTTP classes and the zones. Nothing may
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::classify::{Fields, FlowKey};
use palisade::policy::analysis::{
    changed_regions, diff_by_rule, diff_by_rules, diff_http, diff_packets, diff_zones, Piece,
};
use palisade::policy::lint::{lint, LintOptions};
use palisade::policy::load::{load_policy, MemLoader};
use palisade::policy::{Compiled, Date, Options, Policy};
use std::net::IpAddr;
use std::path::Path;

fn load(text: &[u8], today: Date) -> Option<Compiled> {
    let mut loader = MemLoader::new();
    loader.add("p.policy", text.to_vec());
    load_policy(Path::new("p.policy"), &loader, Options { today }).ok()
}

/// The lowest and highest corners of a region as flows.
fn corners<A: Copy>(f: &Fields<A>, ip: impl Fn(A) -> IpAddr) -> [FlowKey; 2] {
    [
        FlowKey {
            src: ip(f.src.lo),
            dst: ip(f.dst.lo),
            proto: f.proto.lo,
            src_port: f.src_port.lo,
            dst_port: f.dst_port.lo,
        },
        FlowKey {
            src: ip(f.src.hi),
            dst: ip(f.dst.hi),
            proto: f.proto.hi,
            src_port: f.src_port.hi,
            dst_port: f.dst_port.hi,
        },
    ]
}

fn check<A: Copy>(old: &Policy, new: &Policy, pieces: &[Piece<A>], ip: impl Fn(A) -> IpAddr) {
    for (f, was_by, now_by, was, now) in pieces {
        assert_ne!(was, now, "a region whose verdict did not change");
        for key in corners(f, &ip) {
            let (o, n) = (old.decide(&key), new.decide(&key));
            assert_eq!((o.verdict, n.verdict), (*was, *now), "{key:?}");
            assert_eq!((o.rule, n.rule), (*was_by, *now_by), "{key:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (a, b) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let today = Date::new(2026, 11, 25).unwrap();
    let (old, new) = (load(a, today), load(b, today));
    for c in old.iter().chain(new.iter()) {
        let opts = LintOptions {
            today,
            warn_expiring_days: 30,
        };
        let _ = lint(c, opts).render(&c.sources);
    }
    let (Some(old), Some(new)) = (old, new) else {
        return;
    };
    let (old, new) = (&old.policy, &new.policy);
    if let Ok((p4, p6)) = changed_regions(old, new) {
        check(old, new, &p4, |a| IpAddr::from(a.to_be_bytes()));
        check(old, new, &p6, |a| IpAddr::from(a.to_be_bytes()));
    }
    if let Ok(changes) = diff_packets(old, new) {
        for c in &changes {
            let _ = c.to_string();
        }
    }
    for by_rule in [diff_by_rule(old, new), diff_by_rules(old, new)] {
        if let Some(Ok(by_rule)) = by_rule {
            for c in &by_rule.changes {
                let _ = c.to_string();
            }
        }
    }
    let _ = diff_http(old, new);
    let _ = diff_zones(old, new);
});
