//! The compiled 5-tuple decision structure.
//!
//! This module owns the packet classifier: given a flow key (source and
//! destination address, source and destination port, IP protocol) it returns
//! the first rule, in policy order, whose fields all contain the key. It knows
//! nothing of the policy language; the policy compiler hands it a list of
//! [`Entry`] boxes (one per cross-product of a rule's address and service
//! intervals) in priority order.
//!
//! Two matchers offer the same answer:
//! - [`LinearMatcher`], the plain reference: a scan in order. Obviously
//!   correct, and the oracle every test compares against.
//! - [`Classifier`], the compiled structure used on the data path.
//!
//! Families never mix: IPv4 keys are looked up among IPv4 entries only and
//! IPv6 keys among IPv6 entries only, so an IPv4-mapped IPv6 address cannot
//! borrow an IPv4 rule. [`PacketClassifier`] holds one structure per family.
//!
//! ICMP and ICMPv6 carry no ports: their type travels in the source-port
//! field and their code in the destination-port field of the key.

pub mod classbench;
mod compiled;
mod reference;

pub use compiled::{BuildError, BuildLimits, Classifier, ClassifierStats, MAX_ENTRIES};
pub use reference::LinearMatcher;

use std::fmt;
use std::net::IpAddr;

/// The index of a rule in policy order (0 = first rule). It names the rule
/// that decided a flow; the policy maps it back to a name and a verdict.
pub type RuleId = u32;

/// An address of one family as an unsigned integer: `u32` for IPv4, `u128`
/// for IPv6.
///
/// The arithmetic and the widening from `u16` let the compiled classifier
/// treat ports and protocol as coordinates of the same type as addresses.
pub trait Address:
    Copy
    + Ord
    + Eq
    + std::hash::Hash
    + fmt::Debug
    + Send
    + Sync
    + 'static
    + From<u16>
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Shr<u32, Output = Self>
    + std::ops::Shl<u32, Output = Self>
{
    /// The largest address of the family.
    const MAX: Self;
    /// The smallest address of the family.
    const MIN: Self;
    /// Width of the address in bits.
    const BITS: u32;

    /// The low 32 bits (used to index tables by a few bits of a field).
    fn low_u32(self) -> u32;

    /// `self - other`, wrapping around at the family's bounds.
    fn wrapping_sub(self, other: Self) -> Self;
}

impl Address for u32 {
    const MAX: Self = u32::MAX;
    const MIN: Self = 0;
    const BITS: u32 = 32;

    fn low_u32(self) -> u32 {
        self
    }

    fn wrapping_sub(self, other: Self) -> Self {
        u32::wrapping_sub(self, other)
    }
}

impl Address for u128 {
    const MAX: Self = u128::MAX;
    const MIN: Self = 0;
    const BITS: u32 = 128;

    fn low_u32(self) -> u32 {
        self as u32
    }

    fn wrapping_sub(self, other: Self) -> Self {
        u128::wrapping_sub(self, other)
    }
}

/// An inclusive interval `lo..=hi` of one field. Always `lo <= hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Interval<T> {
    pub lo: T,
    pub hi: T,
}

impl<T: Copy + Ord> Interval<T> {
    /// The interval `lo..=hi`; `None` when `lo > hi`.
    pub fn new(lo: T, hi: T) -> Option<Self> {
        (lo <= hi).then_some(Interval { lo, hi })
    }

    /// The interval holding exactly `v`.
    pub fn single(v: T) -> Self {
        Interval { lo: v, hi: v }
    }

    pub fn contains(&self, v: T) -> bool {
        self.lo <= v && v <= self.hi
    }

    /// True when every value of `other` is also in `self`.
    pub fn covers(&self, other: &Self) -> bool {
        self.lo <= other.lo && other.hi <= self.hi
    }

    pub fn overlaps(&self, other: &Self) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }

    /// The smallest interval holding both.
    pub fn hull(&self, other: &Self) -> Self {
        Interval {
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }
}

/// The five fields of one classifier entry, each an inclusive interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fields<A> {
    pub src: Interval<A>,
    pub dst: Interval<A>,
    pub src_port: Interval<u16>,
    pub dst_port: Interval<u16>,
    pub proto: Interval<u8>,
}

impl<A: Address> Fields<A> {
    /// Fields that match every key of the family.
    pub fn any() -> Self {
        Fields {
            src: Interval {
                lo: A::MIN,
                hi: A::MAX,
            },
            dst: Interval {
                lo: A::MIN,
                hi: A::MAX,
            },
            src_port: Interval {
                lo: 0,
                hi: u16::MAX,
            },
            dst_port: Interval {
                lo: 0,
                hi: u16::MAX,
            },
            proto: Interval { lo: 0, hi: u8::MAX },
        }
    }

    pub fn matches(&self, key: &Key<A>) -> bool {
        self.src.contains(key.src)
            && self.dst.contains(key.dst)
            && self.src_port.contains(key.src_port)
            && self.dst_port.contains(key.dst_port)
            && self.proto.contains(key.proto)
    }

    /// True when every key matched by `other` is matched by `self`.
    pub fn covers(&self, other: &Self) -> bool {
        self.src.covers(&other.src)
            && self.dst.covers(&other.dst)
            && self.src_port.covers(&other.src_port)
            && self.dst_port.covers(&other.dst_port)
            && self.proto.covers(&other.proto)
    }

    /// The smallest box holding both.
    pub fn hull(&self, other: &Self) -> Self {
        Fields {
            src: self.src.hull(&other.src),
            dst: self.dst.hull(&other.dst),
            src_port: self.src_port.hull(&other.src_port),
            dst_port: self.dst_port.hull(&other.dst_port),
            proto: self.proto.hull(&other.proto),
        }
    }
}

/// One box of the classifier: its fields and the rule it belongs to. Entries
/// are handed over in priority order; several consecutive entries may belong
/// to one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry<A> {
    pub fields: Fields<A>,
    pub rule: RuleId,
}

/// A flow key of one family, as the classifier sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key<A> {
    pub src: A,
    pub dst: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

/// The 5-tuple of a packet or flow, in either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Source port; the ICMP type for ICMP and ICMPv6.
    pub src_port: u16,
    /// Destination port; the ICMP code for ICMP and ICMPv6.
    pub dst_port: u16,
}

/// A [`FlowKey`] split by family, ready for a per-family structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FamilyKey {
    V4(Key<u32>),
    V6(Key<u128>),
}

impl FlowKey {
    /// Splits the key by family. `None` when source and destination are of
    /// different families, which no packet can be.
    pub fn family_key(&self) -> Option<FamilyKey> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Some(FamilyKey::V4(Key {
                src: u32::from(s),
                dst: u32::from(d),
                src_port: self.src_port,
                dst_port: self.dst_port,
                proto: self.proto,
            })),
            (IpAddr::V6(s), IpAddr::V6(d)) => Some(FamilyKey::V6(Key {
                src: u128::from(s),
                dst: u128::from(d),
                src_port: self.src_port,
                dst_port: self.dst_port,
                proto: self.proto,
            })),
            _ => None,
        }
    }
}

/// The compiled packet classifier for both families.
#[derive(Debug, Clone)]
pub struct PacketClassifier {
    v4: Classifier<u32>,
    v6: Classifier<u128>,
}

impl PacketClassifier {
    /// Builds both structures. Entries of each family are in priority order.
    pub fn build(v4: Vec<Entry<u32>>, v6: Vec<Entry<u128>>) -> Result<Self, BuildError> {
        Ok(PacketClassifier {
            v4: Classifier::build(v4)?,
            v6: Classifier::build(v6)?,
        })
    }

    /// The first rule whose entry contains the key, if any.
    #[inline]
    pub fn classify(&self, key: &FlowKey) -> Option<RuleId> {
        match key.family_key()? {
            FamilyKey::V4(k) => self.v4.lookup(&k),
            FamilyKey::V6(k) => self.v6.lookup(&k),
        }
    }

    pub fn v4(&self) -> &Classifier<u32> {
        &self.v4
    }

    pub fn v6(&self) -> &Classifier<u128> {
        &self.v6
    }
}

/// The reference for both families: a linear scan.
#[derive(Debug, Clone, Default)]
pub struct ReferenceClassifier {
    pub v4: LinearMatcher<u32>,
    pub v6: LinearMatcher<u128>,
}

impl ReferenceClassifier {
    pub fn new(v4: Vec<Entry<u32>>, v6: Vec<Entry<u128>>) -> Self {
        ReferenceClassifier {
            v4: LinearMatcher::new(v4),
            v6: LinearMatcher::new(v6),
        }
    }

    pub fn classify(&self, key: &FlowKey) -> Option<RuleId> {
        match key.family_key()? {
            FamilyKey::V4(k) => self.v4.lookup(&k),
            FamilyKey::V6(k) => self.v6.lookup(&k),
        }
    }
}
