//! Sets of addresses as sorted, merged intervals per family.

use crate::classify::Interval;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A set of IPv4 and IPv6 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddrSet {
    pub v4: Vec<Interval<u32>>,
    pub v6: Vec<Interval<u128>>,
}

/// Sorts and merges overlapping or adjacent intervals.
pub fn normalize<A: Ord + Copy + Step>(v: &mut Vec<Interval<A>>) {
    v.sort();
    let mut out: Vec<Interval<A>> = Vec::with_capacity(v.len());
    for iv in v.drain(..) {
        match out.last_mut() {
            Some(last) if last.hi == A::LAST || iv.lo <= last.hi.next() => {
                if iv.hi > last.hi {
                    last.hi = iv.hi;
                }
            }
            _ => out.push(iv),
        }
    }
    *v = out;
}

/// The successor and predecessor of a value (saturating).
pub trait Step: Sized {
    const LAST: Self;
    fn next(self) -> Self;
    /// The predecessor (saturating).
    fn prev(self) -> Self;
}

impl Step for u32 {
    const LAST: Self = u32::MAX;
    fn next(self) -> Self {
        self.saturating_add(1)
    }
    fn prev(self) -> Self {
        self.saturating_sub(1)
    }
}

impl Step for u128 {
    const LAST: Self = u128::MAX;
    fn next(self) -> Self {
        self.saturating_add(1)
    }
    fn prev(self) -> Self {
        self.saturating_sub(1)
    }
}

impl Step for u16 {
    const LAST: Self = u16::MAX;
    fn next(self) -> Self {
        self.saturating_add(1)
    }
    fn prev(self) -> Self {
        self.saturating_sub(1)
    }
}

fn contains_sorted<T: Ord + Copy>(v: &[Interval<T>], x: T) -> bool {
    let i = v.partition_point(|iv| iv.hi < x);
    i < v.len() && v[i].lo <= x
}

impl AddrSet {
    pub fn any() -> Self {
        AddrSet {
            v4: vec![Interval {
                lo: 0,
                hi: u32::MAX,
            }],
            v6: vec![Interval {
                lo: 0,
                hi: u128::MAX,
            }],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn is_any(&self) -> bool {
        *self == AddrSet::any()
    }

    pub fn add_v4(&mut self, lo: u32, hi: u32) {
        self.v4.push(Interval { lo, hi });
    }

    pub fn add_v6(&mut self, lo: u128, hi: u128) {
        self.v6.push(Interval { lo, hi });
    }

    pub fn union(&mut self, other: &AddrSet) {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
    }

    pub fn normalize(&mut self) {
        normalize(&mut self.v4);
        normalize(&mut self.v6);
    }

    /// Membership; the set must be normalised.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => contains_sorted(&self.v4, u32::from(a)),
            IpAddr::V6(a) => contains_sorted(&self.v6, u128::from(a)),
        }
    }

    /// True when the two (normalised) sets share an address.
    pub fn intersects(&self, other: &AddrSet) -> bool {
        fn any_overlap<T: Ord + Copy>(a: &[Interval<T>], b: &[Interval<T>]) -> bool {
            let (mut i, mut j) = (0, 0);
            while i < a.len() && j < b.len() {
                if a[i].overlaps(&b[j]) {
                    return true;
                }
                if a[i].hi < b[j].hi {
                    i += 1;
                } else {
                    j += 1;
                }
            }
            false
        }
        any_overlap(&self.v4, &other.v4) || any_overlap(&self.v6, &other.v6)
    }

    /// The addresses of `self` that are not in `other` (both normalised).
    pub fn minus(&self, other: &AddrSet) -> AddrSet {
        fn cut<T: Ord + Copy + Step>(a: &[Interval<T>], b: &[Interval<T>]) -> Vec<Interval<T>> {
            let mut out = Vec::new();
            for iv in a {
                let mut lo = iv.lo;
                let mut done = false;
                for x in b.iter().filter(|x| x.overlaps(iv)) {
                    if x.lo > lo {
                        out.push(Interval {
                            lo,
                            hi: x.lo.prev(),
                        });
                    }
                    if x.hi >= iv.hi {
                        done = true;
                        break;
                    }
                    lo = x.hi.next();
                }
                if !done {
                    out.push(Interval { lo, hi: iv.hi });
                }
            }
            out
        }
        AddrSet {
            v4: cut(&self.v4, &other.v4),
            v6: cut(&self.v6, &other.v6),
        }
    }

    /// True when every address of `other` is in `self` (both normalised).
    pub fn covers(&self, other: &AddrSet) -> bool {
        fn cov<T: Ord + Copy>(a: &[Interval<T>], b: &[Interval<T>]) -> bool {
            b.iter().all(|iv| {
                let i = a.partition_point(|x| x.hi < iv.lo);
                i < a.len() && a[i].covers(iv)
            })
        }
        cov(&self.v4, &other.v4) && cov(&self.v6, &other.v6)
    }

    /// The set as CIDR-like text: prefixes where exact, ranges otherwise.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if self.is_any() {
            return "any".into();
        }
        for iv in &self.v4 {
            parts.push(interval_text(
                IpAddr::V4(Ipv4Addr::from(iv.lo)),
                IpAddr::V4(Ipv4Addr::from(iv.hi)),
                (iv.hi - iv.lo) as u128,
                32,
            ));
        }
        for iv in &self.v6 {
            parts.push(interval_text(
                IpAddr::V6(Ipv6Addr::from(iv.lo)),
                IpAddr::V6(Ipv6Addr::from(iv.hi)),
                iv.hi - iv.lo,
                128,
            ));
        }
        parts.join(", ")
    }
}

fn interval_text(lo: IpAddr, hi: IpAddr, span: u128, bits: u32) -> String {
    if span == 0 {
        return lo.to_string();
    }
    let size = span.checked_add(1);
    let lo_bits = match lo {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    };
    match size {
        Some(n) if n.is_power_of_two() && lo_bits % n == 0 => {
            format!("{lo}/{}", bits - n.trailing_zeros())
        }
        None => format!("{lo}/0"),
        _ => format!("{lo}-{hi}"),
    }
}

/// The interval of a prefix and whether host bits were set.
pub fn prefix_interval(addr: IpAddr, len: u8) -> (IpAddr, u128, u128, bool) {
    match addr {
        IpAddr::V4(a) => {
            let v = u32::from(a);
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            let lo = v & mask;
            (
                IpAddr::V4(Ipv4Addr::from(lo)),
                lo as u128,
                (lo | !mask) as u128,
                lo != v,
            )
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len as u32)
            };
            let lo = v & mask;
            (IpAddr::V6(Ipv6Addr::from(lo)), lo, lo | !mask, lo != v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minus_cuts_out_the_other_set() {
        let mut a = AddrSet::default();
        a.add_v4(0, 100);
        a.add_v4(200, 300);
        let mut b = AddrSet::default();
        b.add_v4(0, 9);
        b.add_v4(50, 60);
        b.add_v4(250, 400);
        let d = a.minus(&b);
        assert_eq!(
            d.v4,
            vec![
                Interval { lo: 10, hi: 49 },
                Interval { lo: 61, hi: 100 },
                Interval { lo: 200, hi: 249 }
            ]
        );
        assert!(AddrSet::any().minus(&AddrSet::any()).is_empty());
        assert_eq!(a.minus(&AddrSet::default()), a);
    }

    #[test]
    fn merges_and_describes() {
        let mut s = AddrSet::default();
        s.add_v4(0x0a000000, 0x0a0000ff);
        s.add_v4(0x0a000100, 0x0a0001ff);
        s.add_v4(0x0a000005, 0x0a000006);
        s.normalize();
        assert_eq!(s.v4.len(), 1);
        assert_eq!(s.describe(), "10.0.0.0/23");
        assert!(s.contains("10.0.1.9".parse().unwrap()));
        assert!(!s.contains("10.0.2.0".parse().unwrap()));
        assert_eq!(AddrSet::any().describe(), "any");
    }

    #[test]
    fn prefix_host_bits() {
        let (net, lo, hi, bits) = prefix_interval("10.0.1.5".parse().unwrap(), 24);
        assert_eq!(net.to_string(), "10.0.1.0");
        assert_eq!((lo, hi, bits), (0x0a000100, 0x0a0001ff, true));
    }
}
