//! Policy analysis: what rules really do, as regions of the 5-tuple space.
//!
//! A region is a set of disjoint boxes (one interval per field). A rule's
//! *effective* region is the part of its boxes no earlier rule claims: the
//! flows it decides. `lint` looks for rules whose effective region is
//! empty (shadowed or redundant), cutting each rule's boxes as a decision
//! tree is built until every part has a first earlier match or one part
//! has none (see `coverage_family`); for a rule in too many parts to
//! attribute, a part is done once any earlier rule covers it (see
//! [`coverage_in_bulk`]). `diff` cuts the space for both
//! policies at once the same way, and stops wherever the two behave the
//! same (see [`changed_regions`]).
//!
//! Box subtraction can fragment; every analysis runs under a piece budget
//! and says so when it gives up instead of running unbounded.

use super::{AddrSet, Date, HttpHost, HttpRequest, PacketRule, Policy, Verdict};
use crate::classify::{Address, Entry, Fields, Interval, Key, RuleId};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::rc::Rc;

/// Most boxes an analysis keeps waiting at once (besides the boxes it
/// starts from, which it takes one at a time), and most regions `diff`
/// lists.
pub const PIECE_BUDGET: usize = 200_000;

/// Most candidate entries `diff` may examine, summed over the boxes it
/// cuts: bounds its time (a few seconds) on any pair of policies.
const ANALYSIS_WORK: usize = 100_000_000;

/// Candidates a box may scan for one unit of an analysis budget: a box
/// costs one unit, and one more for each this many candidates its search
/// goes through, so that a budget bounds the work (at most this many
/// candidate tests per unit), not only the boxes, whatever the policies.
/// Nearly every box has fewer candidates than this and costs one.
const SCAN_PER_UNIT: usize = 256;

/// What a box whose candidates are `list` costs of a budget.
fn box_cost(list: &[u32]) -> usize {
    1 + list.len() / SCAN_PER_UNIT
}

/// The budget of a change described by rule (see [`diff_by_rule`] and
/// [`diff_by_rules`]): about 1.5 billion candidates scanned (see
/// [`box_cost`]), a few seconds.
const BY_RULE_BUDGET: usize = PIECE_BUDGET * 30;

/// The analysis gave up: the policy fragments into too many boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the policy is too fragmented to analyse within {PIECE_BUDGET} regions and bounded work")]
pub struct TooComplex;

pub trait Scalar: Copy + Ord {
    fn pred(self) -> Self;
    fn succ(self) -> Self;
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            fn pred(self) -> Self { self - 1 }
            fn succ(self) -> Self { self + 1 }
        }
    )*};
}
scalar!(u8, u16, u32, u128);

/// Splits `a` by `b` in one field: the part below `b`, the part above, and
/// the overlap (which must exist).
fn split<T: Scalar>(
    a: Interval<T>,
    b: Interval<T>,
) -> (Option<Interval<T>>, Option<Interval<T>>, Interval<T>) {
    let below = (a.lo < b.lo).then(|| Interval {
        lo: a.lo,
        hi: b.lo.pred(),
    });
    let above = (a.hi > b.hi).then(|| Interval {
        lo: b.hi.succ(),
        hi: a.hi,
    });
    let mid = Interval {
        lo: a.lo.max(b.lo),
        hi: a.hi.min(b.hi),
    };
    (below, above, mid)
}

pub fn overlaps<A: Address>(a: &Fields<A>, b: &Fields<A>) -> bool {
    a.src.overlaps(&b.src)
        && a.dst.overlaps(&b.dst)
        && a.src_port.overlaps(&b.src_port)
        && a.dst_port.overlaps(&b.dst_port)
        && a.proto.overlaps(&b.proto)
}

pub fn intersect<A: Address + Scalar>(a: &Fields<A>, b: &Fields<A>) -> Option<Fields<A>> {
    overlaps(a, b).then(|| Fields {
        src: split(a.src, b.src).2,
        dst: split(a.dst, b.dst).2,
        src_port: split(a.src_port, b.src_port).2,
        dst_port: split(a.dst_port, b.dst_port).2,
        proto: split(a.proto, b.proto).2,
    })
}

/// `a − b` as disjoint boxes, appended to `out`.
pub fn subtract<A: Address + Scalar>(a: &Fields<A>, b: &Fields<A>, out: &mut Vec<Fields<A>>) {
    if !overlaps(a, b) {
        out.push(*a);
        return;
    }
    let mut cur = *a;
    macro_rules! cut {
        ($f:ident) => {{
            let (lo, hi, mid) = split(cur.$f, b.$f);
            for part in [lo, hi].into_iter().flatten() {
                let mut p = cur;
                p.$f = part;
                out.push(p);
            }
            cur.$f = mid;
        }};
    }
    cut!(proto);
    cut!(dst_port);
    cut!(src_port);
    cut!(dst);
    let (lo, hi, _) = split(cur.src, b.src);
    for part in [lo, hi].into_iter().flatten() {
        let mut p = cur;
        p.src = part;
        out.push(p);
    }
}

/// How much of a rule earlier rules cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// Some flows are decided by this rule.
    Effective,
    /// Earlier rules decide every flow of this rule; these are the rules
    /// that took a part of it.
    Covered(Vec<RuleId>),
    /// Earlier rules decide every flow of this rule, in more parts than
    /// the analysis attributes one by one (see [`coverage_in_bulk`]):
    /// `named` take a part each (those that share most flows with it, a
    /// few at most), and `other_verdict` says whether a rule `differs`
    /// accepts takes one (`None`: that too was out of reach).
    CoveredInBulk {
        named: Vec<RuleId>,
        other_verdict: Option<bool>,
    },
}

/// Whether a rule that expires on `earlier` is in force for as long as one
/// that expires on `rule` (`None`: never expires). Only such a rule can
/// cover another: once a shorter-lived one expires, the later rule decides.
pub fn lives_as_long(earlier: Option<Date>, rule: Option<Date>) -> bool {
    match (earlier, rule) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(r)) => e >= r,
    }
}

/// The entries of `list` (indices into `entries`, in order) that overlap
/// `b`, up to the first that covers it: the candidates for `b`'s first
/// match.
fn within<A: Address>(entries: &[Entry<A>], list: &[u32], b: &Fields<A>) -> Vec<u32> {
    let mut out = Vec::new();
    for &i in list {
        let f = &entries[i as usize].fields;
        if overlaps(f, b) {
            out.push(i);
            if f.covers(b) {
                break;
            }
        }
    }
    out
}

/// The smallest box holding all of `boxes`, `None` for none.
fn hull_of<'a, A: Address + 'a>(
    boxes: impl IntoIterator<Item = &'a Fields<A>>,
) -> Option<Fields<A>> {
    boxes.into_iter().copied().reduce(|h, b| h.hull(&b))
}

/// Runs of at most this many of a rule's boxes are searched with one
/// candidate list (see [`Runs`]).
const RUN_MAX: usize = 4;

/// A rule's boxes, last first, each with the candidates to start its
/// search from: the boxes are halved (in their order) into runs of at
/// most [`RUN_MAX`], and each half's candidates are those of its parent
/// that overlap the half's hull, up to the first that covers it. Every
/// box then finds the same candidates in its run's list as in the whole
/// list (an entry that covers a hull covers the boxes inside), and a rule
/// of 160,000 boxes does not scan every candidate for each of them. Each
/// narrowing is paid for as a box is (see [`box_cost`]), and is tried
/// only where it could pay for itself and repeated only where it did, so
/// that it costs a rule whose boxes share their candidates at most one
/// scan more than taking the boxes one by one would.
struct Runs<'a, A> {
    entries: &'a [Entry<A>],
    boxes: &'a [Fields<A>],
    list: &'a [u32],
    /// Runs still to narrow or take, with their candidates.
    pending: Vec<(std::ops::Range<usize>, Near)>,
    /// The run being taken (the boxes left of it), with its candidates.
    taking: (std::ops::Range<usize>, Near),
}

/// A run's candidates: `None` for all of the list (not copied, since
/// most rules are a run of their own).
type Near = Option<Rc<[u32]>>;

/// Candidates (indices into the entries, in order): all of a search's
/// list, or a part of it that the boxes cut from one box share, so that
/// neither is copied for each box.
#[derive(Clone)]
enum Cands<'a> {
    Whole(&'a [u32]),
    Part(Rc<[u32]>),
}

impl std::ops::Deref for Cands<'_> {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        match self {
            Cands::Whole(list) => list,
            Cands::Part(list) => list,
        }
    }
}

/// A box to search, and the candidates to search it with.
type Start<'a, A> = (Fields<A>, Cands<'a>);

impl<'a, A: Address> Runs<'a, A> {
    fn new(entries: &'a [Entry<A>], boxes: &'a [Fields<A>], list: &'a [u32]) -> Self {
        Runs {
            entries,
            boxes,
            list,
            pending: vec![(0..boxes.len(), None)],
            taking: (0..0, None),
        }
    }

    /// The next box and its candidates, or `None` when done.
    fn next(&mut self, budget: &mut usize) -> Result<Option<Start<'a, A>>, TooComplex> {
        loop {
            if let Some(i) = self.taking.0.next_back() {
                let list = match &self.taking.1 {
                    Some(near) => Cands::Part(near.clone()),
                    None => Cands::Whole(self.list),
                };
                return Ok(Some((self.boxes[i], list)));
            }
            let Some((range, kept)) = self.pending.pop() else {
                return Ok(None);
            };
            let run = &self.boxes[range.clone()];
            let list = kept.as_ref().map_or(self.list, |v| &v[..]);
            // Narrowing costs a scan of the list: tried only where the
            // run's scans of it would cost more.
            if run.len() <= RUN_MAX || run.len() * list.len() < SCAN_PER_UNIT + list.len() {
                self.taking = (range, kept);
                continue;
            }
            *budget = budget.checked_sub(box_cost(list)).ok_or(TooComplex)?;
            let hull = hull_of(run).expect("a run of more than RUN_MAX boxes");
            let near: Rc<[u32]> = within(self.entries, list, &hull).into();
            // Halved further only where this narrowing paid for itself
            // (the run's scans saved at least what it cost): where the
            // hull leaves the candidates as they were, the boxes go on
            // with them, and no more is spent on narrowing.
            if (list.len() - near.len()) * run.len() < SCAN_PER_UNIT + list.len() {
                self.taking = (range, Some(near));
                continue;
            }
            let mid = range.start + run.len() / 2;
            // The later half first: boxes go last first.
            self.pending.push((range.start..mid, Some(near.clone())));
            self.pending.push((mid..range.end, Some(near)));
        }
    }
}

/// Rules of more boxes than this are tested against other boxes through
/// their [`Hulls`]; fewer, box by box.
const HULLS_MIN: usize = 64;

/// Most boxes in a run of [`Hulls`] that is not halved further.
const HULL_RUN: usize = 8;

/// A rule's boxes, to test other boxes against all at once: sorted and
/// halved into a tree of runs, each with its hull and the flows its
/// boxes hold, so that a box that misses a run's hull, or covers it, is
/// answered for the whole run by one test. A rule of 160,000 boxes from
/// 400 networks to 400 others (IPv4 /24s spread over the addresses) is
/// then tested against each entry of a ClassBench firewall set in 160
/// hulls and boxes on average, not 160,000 boxes. A rule of at most [`HULLS_MIN`]
/// boxes is kept as it is and tested box by box. Every test (of a hull
/// or a box, against one box) is counted in `tests`, for the caller to
/// pay.
struct Hulls<A> {
    boxes: Vec<Fields<A>>,
    /// The tree, root first; empty when the boxes are tested one by one.
    nodes: Vec<HullNode<A>>,
    tests: usize,
}

struct HullNode<A> {
    hull: Fields<A>,
    /// Its run of boxes.
    run: std::ops::Range<usize>,
    /// The flows of its boxes, summed.
    flows: f64,
    /// Its two halves (indices of nodes), `None` for a run not halved.
    halves: Option<[usize; 2]>,
}

/// What [`Hulls::walk`] does after a run whose hull a box overlaps.
enum Visit {
    /// Goes on to its halves (none for a run not halved).
    Below,
    /// Done with this run.
    Next,
    /// Done with the walk.
    Stop,
}

/// The flows (a count, as a floating-point number) of a box.
fn flows<A: Address + Into<u128>>(f: &Fields<A>) -> f64 {
    let width = |lo: u128, hi: u128| (hi - lo) as f64 + 1.0;
    width(f.src.lo.into(), f.src.hi.into())
        * width(f.dst.lo.into(), f.dst.hi.into())
        * width(f.src_port.lo.into(), f.src_port.hi.into())
        * width(f.dst_port.lo.into(), f.dst_port.hi.into())
        * width(f.proto.lo.into(), f.proto.hi.into())
}

impl<A: Address + Scalar + Into<u128>> Hulls<A> {
    fn new(boxes: &[Fields<A>]) -> Self {
        let mut hulls = Hulls {
            boxes: boxes.to_vec(),
            nodes: Vec::new(),
            tests: 0,
        };
        if boxes.len() > HULLS_MIN {
            // Sorted, so that a run holds boxes near one another.
            hulls.boxes.sort_unstable_by_key(boxes_order);
            hulls.node(0..boxes.len());
        }
        hulls
    }

    /// Adds the node of `run` and those below it; returns its index.
    fn node(&mut self, run: std::ops::Range<usize>) -> usize {
        let at = self.nodes.len();
        let boxes = &self.boxes[run.clone()];
        self.nodes.push(HullNode {
            hull: hull_of(boxes).expect("a run holds boxes"),
            run: run.clone(),
            flows: boxes.iter().map(flows).sum(),
            halves: None,
        });
        if run.len() > HULL_RUN {
            let mid = run.start + run.len() / 2;
            let halves = [self.node(run.start..mid), self.node(mid..run.end)];
            self.nodes[at].halves = Some(halves);
        }
        at
    }

    /// Visits the runs whose hull `f` overlaps, from the root down, with
    /// their boxes (those of a run not halved counted as tested).
    fn walk(&mut self, f: &Fields<A>, mut visit: impl FnMut(&HullNode<A>, &[Fields<A>]) -> Visit) {
        let mut stack = vec![0];
        while let Some(i) = stack.pop() {
            let node = &self.nodes[i];
            self.tests += 1;
            if !overlaps(&node.hull, f) {
                continue;
            }
            if node.halves.is_none() {
                self.tests += node.run.len();
            }
            match (visit(node, &self.boxes[node.run.clone()]), node.halves) {
                (Visit::Stop, _) => return,
                (Visit::Below, Some([a, b])) => stack.extend([b, a]),
                _ => {}
            }
        }
    }

    /// Pays the tests done so far from `budget` (see [`box_cost`]).
    fn pay(&mut self, budget: &mut usize) -> Result<(), TooComplex> {
        let due = self.tests / SCAN_PER_UNIT;
        self.tests %= SCAN_PER_UNIT;
        *budget = budget.checked_sub(due).ok_or(TooComplex)?;
        Ok(())
    }

    /// Whether any of the boxes overlaps `f`.
    fn any_overlaps(&mut self, f: &Fields<A>) -> bool {
        if self.nodes.is_empty() {
            self.tests += self.boxes.len();
            return self.boxes.iter().any(|b| overlaps(b, f));
        }
        let mut found = false;
        self.walk(f, |node, boxes| {
            // `f` overlaps every box of a run whose hull it covers.
            found = f.covers(&node.hull)
                || (node.halves.is_none() && boxes.iter().any(|b| overlaps(b, f)));
            match found {
                true => Visit::Stop,
                false => Visit::Below,
            }
        });
        found
    }

    /// The rules of `entries` (in rule order) with an entry that overlaps
    /// some of the boxes, the tests paid as they go.
    fn overlapping_rules<'e>(
        &mut self,
        entries: impl Iterator<Item = &'e Entry<A>>,
        budget: &mut usize,
    ) -> Result<Vec<RuleId>, TooComplex>
    where
        A: 'e,
    {
        let mut rules = Vec::new();
        for e in entries {
            if rules.last() != Some(&e.rule) && self.any_overlaps(&e.fields) {
                rules.push(e.rule);
            }
            self.pay(budget)?;
        }
        Ok(rules)
    }

    /// Whether each of the boxes lies inside one of `other`.
    fn each_inside_one_of(&mut self, other: &[Fields<A>]) -> bool {
        if self.nodes.is_empty() {
            self.tests += self.boxes.len() * other.len();
            return self.boxes.iter().all(|b| other.iter().any(|f| f.covers(b)));
        }
        let mut stack = vec![0];
        while let Some(i) = stack.pop() {
            let node = &self.nodes[i];
            self.tests += other.len();
            if other.iter().any(|f| f.covers(&node.hull)) {
                continue;
            }
            // No box of a run lies inside a box that misses its hull.
            if !other.iter().any(|f| overlaps(f, &node.hull)) {
                return false;
            }
            match node.halves {
                Some([a, b]) => stack.extend([b, a]),
                None => {
                    let boxes = &self.boxes[node.run.clone()];
                    self.tests += boxes.len() * other.len();
                    if !boxes.iter().all(|b| other.iter().any(|f| f.covers(b))) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The flows the boxes share with `other`, summed over every pair
    /// (as [`shared_flows`]).
    fn shared_flows(&mut self, other: &[Fields<A>]) -> f64 {
        if self.nodes.is_empty() {
            self.tests += self.boxes.len() * other.len();
            return shared_flows(&self.boxes, other);
        }
        let mut v = 0.0;
        for y in other {
            self.walk(y, |node, boxes| {
                if y.covers(&node.hull) {
                    v += node.flows;
                    Visit::Next
                } else if node.halves.is_some() {
                    Visit::Below
                } else {
                    let shared = boxes.iter().filter_map(|b| intersect(b, y));
                    v += shared.map(|f| flows(&f)).sum::<f64>();
                    Visit::Below
                }
            });
        }
        v
    }

    /// What each box of `other`, in turn, shares with the boxes: `None`
    /// once that is more than `most` boxes (each box copied counted as a
    /// test).
    fn shared_boxes(&mut self, other: &[Fields<A>], most: usize) -> Option<Vec<Fields<A>>> {
        let mut out = Vec::new();
        if self.nodes.is_empty() {
            for y in other {
                self.tests += self.boxes.len();
                out.extend(self.boxes.iter().filter_map(|b| intersect(b, y)));
                if out.len() > most {
                    return None;
                }
            }
            return Some(out);
        }
        for y in other {
            let mut copied = 0;
            self.walk(y, |node, boxes| {
                if out.len() > most {
                    Visit::Stop
                } else if y.covers(&node.hull) {
                    out.extend_from_slice(boxes);
                    copied += boxes.len();
                    Visit::Next
                } else {
                    if node.halves.is_none() {
                        out.extend(boxes.iter().filter_map(|b| intersect(b, y)));
                    }
                    Visit::Below
                }
            });
            self.tests += copied;
            if out.len() > most {
                return None;
            }
        }
        Some(out)
    }
}

/// The boxes of `rule` (entries come in rule order, as
/// [`entries`](super::entries) gives them).
fn boxes_of<A: Address>(entries: &[Entry<A>], rule: RuleId) -> Vec<Fields<A>> {
    let start = entries.partition_point(|e| e.rule < rule);
    entries[start..]
        .iter()
        .take_while(|e| e.rule == rule)
        .map(|e| e.fields)
        .collect()
}

/// A family's entries, in rule order as [`entries`](super::entries) gives
/// them, indexed for `entries_before`: each rule's range and the hull
/// of its boxes, and for a rule of more than `HULLS_MIN` (64) boxes a tree
/// of hulls over its boxes in their order (halved down to runs of at most
/// `HULL_RUN`, 8). An earlier rule that misses a rule's hull is then passed
/// over in one test, and most of a rule of many boxes in a few, instead of
/// every entry being tested (lint asks this of every rule in turn).
pub struct Indexed<'a, A> {
    pub entries: &'a [Entry<A>],
    rules: Vec<RuleRange<A>>,
}

/// One rule's entries in an [`Indexed`] family.
struct RuleRange<A> {
    rule: RuleId,
    range: std::ops::Range<usize>,
    hull: Fields<A>,
    /// For a rule of many boxes, its range halved, root first, each part
    /// with its hull; empty for a rule of few.
    parts: Vec<Span<A>>,
}

struct Span<A> {
    hull: Fields<A>,
    range: std::ops::Range<usize>,
    halves: Option<[usize; 2]>,
}

impl<'a, A: Address> Indexed<'a, A> {
    pub fn new(entries: &'a [Entry<A>]) -> Self {
        let mut rules = Vec::new();
        let mut start = 0;
        while let Some(first) = entries.get(start) {
            let rule = first.rule;
            let end = start
                + entries[start..]
                    .iter()
                    .take_while(|e| e.rule == rule)
                    .count();
            let mut parts = Vec::new();
            let hull = if end - start > HULLS_MIN {
                Self::halve(entries, start..end, &mut parts);
                parts[0].hull
            } else {
                hull_of(entries[start..end].iter().map(|e| &e.fields))
                    .expect("a rule's range holds its entries")
            };
            rules.push(RuleRange {
                rule,
                range: start..end,
                hull,
                parts,
            });
            start = end;
        }
        Indexed { entries, rules }
    }

    /// Adds the part of `range` and, below it, its halves; returns its
    /// index.
    fn halve(
        entries: &[Entry<A>],
        range: std::ops::Range<usize>,
        parts: &mut Vec<Span<A>>,
    ) -> usize {
        let at = parts.len();
        let (start, end) = (range.start, range.end);
        parts.push(Span {
            hull: entries[start].fields,
            range,
            halves: None,
        });
        if end - start > HULL_RUN {
            let mid = start + (end - start) / 2;
            let a = Self::halve(entries, start..mid, parts);
            let b = Self::halve(entries, mid..end, parts);
            parts[at].hull = parts[a].hull.hull(&parts[b].hull);
            parts[at].halves = Some([a, b]);
        } else {
            parts[at].hull = hull_of(entries[start..end].iter().map(|e| &e.fields))
                .expect("a part holds entries");
        }
        at
    }
}

impl<A: Address> RuleRange<A> {
    /// Adds to `out`, in order, the indices of this rule's entries that
    /// overlap `hull`.
    fn overlapping(&self, entries: &[Entry<A>], hull: &Fields<A>, out: &mut Vec<u32>) {
        let scan = |range: std::ops::Range<usize>, out: &mut Vec<u32>| {
            out.extend(
                range
                    .filter(|&i| overlaps(&entries[i].fields, hull))
                    .map(|i| i as u32),
            );
        };
        if self.parts.is_empty() {
            return scan(self.range.clone(), out);
        }
        // Depth first, the first half before the second: indices ascend.
        let mut stack = vec![0];
        while let Some(p) = stack.pop() {
            let part = &self.parts[p];
            if !overlaps(&part.hull, hull) {
                continue;
            }
            match part.halves {
                Some([a, b]) => stack.extend([b, a]),
                None => scan(part.range.clone(), out),
            }
        }
    }
}

/// The entries (indices, in order) of the rules before `rule` that
/// `counts` accepts and that overlap the hull of its boxes: the
/// candidates for the first match of its flows (an entry outside the hull
/// overlaps none of them, nor any part of one). Passing over the entries
/// it leaves out is paid as scanning candidates is (see [`box_cost`]),
/// whatever the index saved; those it keeps are paid for by the search
/// that scans them. A budget that could not pay for passing over them all
/// is refused first.
fn entries_before<A: Address>(
    idx: &Indexed<'_, A>,
    rule: RuleId,
    counts: &dyn Fn(RuleId) -> bool,
    budget: &mut usize,
) -> Result<Vec<u32>, TooComplex> {
    // The index's rules come in rule order, as the entries do.
    let (earlier, own) = idx
        .rules
        .split_at(idx.rules.partition_point(|r| r.rule < rule));
    let end = earlier.last().map_or(0, |r| r.range.end);
    if *budget < end / SCAN_PER_UNIT {
        return Err(TooComplex);
    }
    let Some(hull) = own.first().filter(|r| r.rule == rule).map(|r| r.hull) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for r in earlier {
        if counts(r.rule) && overlaps(&r.hull, &hull) {
            r.overlapping(idx.entries, &hull, &mut out);
        }
    }
    let left_out = end - out.len();
    *budget = budget
        .checked_sub(left_out / SCAN_PER_UNIT)
        .ok_or(TooComplex)?;
    Ok(out)
}

/// Whether a point of `b` that no candidate of `list` holds is found
/// without cutting: a corner, the middle, or the sparse point.
fn uncovered_point<A: Address + Scalar>(entries: &[Entry<A>], list: &[u32], b: &Fields<A>) -> bool {
    witnesses(b)
        .iter()
        .any(|k| list.iter().all(|&i| !entries[i as usize].fields.matches(k)))
        || sparse_point(entries, list, b)
}

/// Whether the earlier entries `covers` accepts cover every box of `rule`,
/// adding to `contributors` each rule that is the first match for a part
/// of it (a rule may be added more than once). The boxes are cut as a
/// decision tree is built (long candidate lists halved, short ones cut
/// along their first entry), depth first, so an uncovered part ends the
/// search as soon as it is found instead of after every earlier rule has
/// been subtracted; `budget` counts boxes (see [`box_cost`]).
fn coverage_family<A: Address + Scalar>(
    idx: &Indexed<'_, A>,
    rule: RuleId,
    covers: &dyn Fn(RuleId) -> bool,
    budget: &mut usize,
    contributors: &mut Vec<RuleId>,
) -> Result<bool, TooComplex> {
    let earlier = entries_before(idx, rule, covers, budget)?;
    let entries = idx.entries;
    // One box at a time, last first (as one stack of them all would go),
    // so that a rule of thousands of boxes does not hold a copy of the
    // candidates for each.
    let boxes = boxes_of(entries, rule);
    let mut starts = Runs::new(entries, &boxes, &earlier);
    while let Some(start) = starts.next(budget)? {
        let mut stack: Vec<Start<A>> = vec![start];
        while let Some((b, list)) = stack.pop() {
            *budget = budget.checked_sub(box_cost(&list)).ok_or(TooComplex)?;
            let list = within(entries, &list, &b);
            let Some(&first) = list.first() else {
                return Ok(false);
            };
            let e = &entries[first as usize];
            // A point of the box that no candidate holds proves the rule
            // decides some flow: the usual answer, found without cutting.
            if list.len() > PEEL_MAX && uncovered_point(entries, &list, &b) {
                return Ok(false);
            }
            if e.fields.covers(&b) {
                // Repeats are dropped by the caller (a rule of many boxes
                // may have thousands of contributors, each found many
                // times: a search of the list for each was quadratic).
                if contributors.last() != Some(&e.rule) {
                    contributors.push(e.rule);
                }
                continue;
            }
            let halves = match list.len() > PEEL_MAX {
                true => balanced_cut(&b, boxes_in(entries, &list)),
                false => None,
            };
            let list = Cands::Part(list.into());
            if let Some(halves) = halves {
                stack.extend(halves.map(|h| (h, list.clone())));
                continue;
            }
            stack.extend(intersect(&b, &e.fields).map(|x| (x, list.clone())));
            let mut outside = Vec::new();
            subtract(&b, &e.fields, &mut outside);
            stack.extend(outside.into_iter().map(|x| (x, list.clone())));
            if stack.len() > PIECE_BUDGET {
                return Err(TooComplex);
            }
        }
    }
    Ok(true)
}

/// Whether a point of `b` that no candidate of `list` holds turns up when
/// its fields are fixed one at a time, each to a value the fewest
/// remaining candidates hold (the protocol and ports first, where gaps
/// between services are, then the addresses): once no candidate is left,
/// any value of the other fields completes such a point. It finds the
/// gaps the corners and middle miss, as a protocol no earlier rule names.
fn sparse_point<A: Address + Scalar>(entries: &[Entry<A>], list: &[u32], b: &Fields<A>) -> bool {
    /// The intervals (by position) that hold the value of `within` the
    /// fewest of them hold.
    fn fewest<T: Copy + Ord + Scalar>(ivs: &[Interval<T>], within: Interval<T>) -> Vec<usize> {
        // Coverage only changes at a start or just past an end.
        let mut starts: Vec<T> = ivs.iter().map(|iv| iv.lo.max(within.lo)).collect();
        let mut ends: Vec<T> = ivs.iter().map(|iv| iv.hi.min(within.hi)).collect();
        starts.sort_unstable();
        ends.sort_unstable();
        // Ascending, since the ends are and each is at least `within.lo`.
        let mut at = vec![within.lo];
        at.extend(ends.iter().filter(|&&e| e < within.hi).map(|&e| e.succ()));
        at.dedup();
        let (mut s, mut e) = (0, 0);
        let mut best = (usize::MAX, within.lo);
        for &p in &at {
            while s < starts.len() && starts[s] <= p {
                s += 1;
            }
            while e < ends.len() && ends[e] < p {
                e += 1;
            }
            if s - e < best.0 {
                best = (s - e, p);
            }
        }
        let v = best.1;
        (0..ivs.len())
            .filter(|&i| ivs[i].lo <= v && v <= ivs[i].hi)
            .collect()
    }
    let mut left: Vec<&Fields<A>> = list.iter().map(|&i| &entries[i as usize].fields).collect();
    macro_rules! fix {
        ($f:ident) => {{
            let ivs: Vec<_> = left.iter().map(|f| f.$f).collect();
            left = fewest(&ivs, b.$f).into_iter().map(|i| left[i]).collect();
            if left.is_empty() {
                return true;
            }
        }};
    }
    fix!(proto);
    fix!(dst_port);
    fix!(src_port);
    fix!(dst);
    fix!(src);
    false
}

/// What [`search`] does with a box, given its candidates.
enum Step {
    /// The search is over, with this answer.
    Answer(bool),
    /// Nothing more to find in this box.
    Settled,
    /// Cut it, past its first candidate's part.
    Cut,
}

/// Goes through `boxes` depth first, each with the entries of `list`
/// (indices into `entries`, in order) that overlap it up to the first that
/// covers it: `step` settles a box, cuts it, or ends the search; `done` is
/// the answer once every box is settled. A long list is halved at a
/// median endpoint; a short one leaves the parts of the box outside its
/// first candidate to the others (`step` has settled that part).
fn search<A: Address + Scalar>(
    entries: &[Entry<A>],
    boxes: Vec<Fields<A>>,
    list: &[u32],
    budget: &mut usize,
    done: bool,
    mut step: impl FnMut(&Fields<A>, &[u32]) -> Step,
) -> Result<bool, TooComplex> {
    // One box at a time, last first (as one stack of them all would go),
    // so that a rule of thousands of boxes does not hold a copy of the
    // candidates for each.
    let mut starts = Runs::new(entries, &boxes, list);
    while let Some(start) = starts.next(budget)? {
        let mut stack: Vec<Start<A>> = vec![start];
        while let Some((b, list)) = stack.pop() {
            *budget = budget.checked_sub(box_cost(&list)).ok_or(TooComplex)?;
            let list = within(entries, &list, &b);
            match step(&b, &list) {
                Step::Answer(a) => return Ok(a),
                Step::Settled => continue,
                Step::Cut => {}
            }
            let halves = if list.len() > PEEL_MAX {
                balanced_cut(&b, boxes_in(entries, &list))
            } else {
                None
            };
            match halves {
                Some(halves) => {
                    let list = Cands::Part(list.into());
                    stack.extend(halves.map(|h| (h, list.clone())));
                }
                None => {
                    let mut outside = Vec::new();
                    subtract(&b, &entries[list[0] as usize].fields, &mut outside);
                    let rest = Cands::Part(list[1..].into());
                    stack.extend(outside.into_iter().map(|x| (x, rest.clone())));
                }
            }
            if stack.len() > PIECE_BUDGET {
                return Err(TooComplex);
            }
        }
    }
    Ok(done)
}

/// Whether the entries of `list` (indices into `entries`, in order) cover
/// every box of `boxes`. Cut as [`coverage_family`] cuts, but a box is done
/// as soon as any candidate covers it, not only the first: this answers
/// whether, not which rules take which part, and is far cheaper where
/// thousands of small earlier rules sit inside a broad one.
fn covered_by<A: Address + Scalar>(
    entries: &[Entry<A>],
    boxes: Vec<Fields<A>>,
    list: &[u32],
    budget: &mut usize,
) -> Result<bool, TooComplex> {
    search(entries, boxes, list, budget, true, |b, list| {
        // The list ends at the first candidate that covers the box.
        let Some(&last) = list.last() else {
            return Step::Answer(false);
        };
        if entries[last as usize].fields.covers(b) {
            return Step::Settled;
        }
        if list.len() > PEEL_MAX && uncovered_point(entries, list, b) {
            Step::Answer(false)
        } else {
            Step::Cut
        }
    })
}

/// Whether an entry of `list` whose rule `differs` accepts is the first
/// match of `list` for some flow in `boxes`. A box is dropped as soon as
/// its candidates hold no such entry, so proving that none does is cheap
/// where the other verdict is rare.
fn decided_by<A: Address + Scalar>(
    entries: &[Entry<A>],
    boxes: Vec<Fields<A>>,
    list: &[u32],
    differs: &dyn Fn(RuleId) -> bool,
    budget: &mut usize,
) -> Result<bool, TooComplex> {
    search(entries, boxes, list, budget, false, |b, list| {
        let first_match = |k: &Key<A>| {
            list.iter()
                .map(|&i| &entries[i as usize])
                .find(|e| e.fields.matches(k))
        };
        if !list.iter().any(|&i| differs(entries[i as usize].rule)) {
            Step::Settled
        } else if differs(entries[list[0] as usize].rule) {
            // The first candidate overlaps the box: it decides that part.
            Step::Answer(true)
        } else if list.len() > PEEL_MAX
            && witnesses(b)
                .iter()
                .any(|k| first_match(k).is_some_and(|e| differs(e.rule)))
        {
            // A point of the box such a rule decides: the usual answer
            // where one does, found without cutting.
            Step::Answer(true)
        } else {
            Step::Cut
        }
    })
}

/// The flows (a count, as a floating-point number) that the boxes of `a`
/// and of `b` share.
fn shared_flows<A: Address + Scalar + Into<u128>>(a: &[Fields<A>], b: &[Fields<A>]) -> f64 {
    let mut v = 0.0;
    for x in a {
        for y in b {
            if let Some(f) = intersect(x, y) {
                v += flows(&f);
            }
        }
    }
    v
}

/// `others` ordered by how much of `rule` each could take: the share of
/// the rule's flows their boxes hold (IPv4 and IPv6 each as a fraction of
/// their family's space), largest first, ties in rule order.
pub fn by_shared_flows(
    v4: &[Entry<u32>],
    v6: &[Entry<u128>],
    rule: RuleId,
    others: &[RuleId],
) -> Vec<RuleId> {
    let (mut h4, mut h6) = (
        Hulls::new(&boxes_of(v4, rule)),
        Hulls::new(&boxes_of(v6, rule)),
    );
    let shares = others
        .iter()
        .map(|&id| (shared_share((&mut h4, v4), (&mut h6, v6), id), id))
        .collect();
    largest_first(shares)
}

/// The share of its flows that a rule (its boxes in `h4` and `h6`)
/// shares with rule `id` (of `v4` and `v6`): IPv4 and IPv6 each as a
/// fraction of its family's space.
fn shared_share(
    (h4, v4): (&mut Hulls<u32>, &[Entry<u32>]),
    (h6, v6): (&mut Hulls<u128>, &[Entry<u128>]),
    id: RuleId,
) -> f64 {
    h4.shared_flows(&boxes_of(v4, id)) / 2f64.powi(2 * 32 + 40)
        + h6.shared_flows(&boxes_of(v6, id)) / 2f64.powi(2 * 128 + 40)
}

/// The rules of `shares`, largest share first, ties in rule order.
fn largest_first(mut shares: Vec<(f64, RuleId)>) -> Vec<RuleId> {
    shares.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    shares.into_iter().map(|(_, id)| id).collect()
}

/// Rules named at most by [`coverage_in_bulk`], and candidates it tries.
const BULK_NAMED: usize = 6;
const BULK_TRIED: usize = 24;

/// Whether earlier rules cover `rule` completely, for a rule [`coverage`]
/// cannot attribute within its budget: whether at all (a box is done once
/// any earlier rule covers it), whether a rule `differs` accepts decides a
/// part, and a few of the rules that take a part, tried in order of the
/// flows they share with the rule. Only earlier rules `covers` accepts
/// count.
pub fn coverage_in_bulk(
    i4: &Indexed<'_, u32>,
    i6: &Indexed<'_, u128>,
    rule: RuleId,
    covers: &dyn Fn(RuleId) -> bool,
    differs: &dyn Fn(RuleId) -> bool,
    budget: &mut usize,
) -> Result<Coverage, TooComplex> {
    let (e4, e6) = (
        entries_before(i4, rule, covers, budget)?,
        entries_before(i6, rule, covers, budget)?,
    );
    let (v4, v6) = (i4.entries, i6.entries);
    let (b4, b6) = (boxes_of(v4, rule), boxes_of(v6, rule));
    if !covered_by(v4, b4.clone(), &e4, budget)? || !covered_by(v6, b6.clone(), &e6, budget)? {
        return Ok(Coverage::Effective);
    }
    // Half of what is left to the verdicts, the rest to naming rules.
    let mut half = *budget / 2;
    *budget -= half;
    let other_verdict = (|| -> Result<bool, TooComplex> {
        Ok(decided_by(v4, b4.clone(), &e4, differs, &mut half)?
            || decided_by(v6, b6.clone(), &e6, differs, &mut half)?)
    })()
    .ok();
    *budget += half;
    // Earlier rules that overlap it; one takes a part where the rules
    // before it leave some of their shared boxes uncovered.
    // Naming is worked out as far as the budget goes: where it runs out
    // before the candidates are ordered, none are named.
    let (mut h4, mut h6) = (Hulls::new(&b4), Hulls::new(&b6));
    let mut ordered = || -> Result<Vec<RuleId>, TooComplex> {
        let mut overlapping = h4.overlapping_rules(e4.iter().map(|&i| &v4[i as usize]), budget)?;
        overlapping.extend(h6.overlapping_rules(e6.iter().map(|&i| &v6[i as usize]), budget)?);
        overlapping.sort_unstable();
        overlapping.dedup();
        let mut shares = Vec::new();
        for id in overlapping {
            let share = shared_share((&mut h4, v4), (&mut h6, v6), id);
            h4.pay(budget)?;
            h6.pay(budget)?;
            shares.push((share, id));
        }
        Ok(largest_first(shares))
    };
    let candidates = ordered().unwrap_or_default();
    let (named, _) = name_some(&candidates, |id| {
        Ok(takes_part(v4, &mut h4, &e4, id, budget)? || takes_part(v6, &mut h6, &e6, id, budget)?)
    });
    Ok(Coverage::CoveredInBulk {
        named,
        other_verdict,
    })
}

/// Up to [`BULK_NAMED`] of `candidates`, tried in order (at most
/// [`BULK_TRIED`] of them), that `takes` a part, in rule order; and
/// whether some candidate was left untried (naming stopped at the limits
/// or when `takes` ran out of budget), so that others may take a part too.
fn name_some(
    candidates: &[RuleId],
    mut takes: impl FnMut(RuleId) -> Result<bool, TooComplex>,
) -> (Vec<RuleId>, bool) {
    let mut named = Vec::new();
    let mut untried = false;
    for (k, &id) in candidates.iter().enumerate() {
        if named.len() == BULK_NAMED || k == BULK_TRIED {
            untried = true;
            break;
        }
        match takes(id) {
            Ok(true) => named.push(id),
            Ok(false) => {}
            Err(_) => {
                untried = true;
                break;
            }
        }
    }
    named.sort_unstable();
    (named, untried)
}

/// Whether `by` is the first match of the entries of `earlier` (indices,
/// in order) for some flow of the boxes `rule`: the entries of rules
/// before `by` leave some of what the two share uncovered.
fn takes_part<A: Address + Scalar + Into<u128>>(
    entries: &[Entry<A>],
    rule: &mut Hulls<A>,
    earlier: &[u32],
    by: RuleId,
    budget: &mut usize,
) -> Result<bool, TooComplex> {
    // Each shared box costs the search below at least a unit: no more
    // are made than the budget could search.
    let shared = rule.shared_boxes(&boxes_of(entries, by), *budget);
    rule.pay(budget)?;
    let shared = shared.ok_or(TooComplex)?;
    let before: Vec<u32> = earlier
        .iter()
        .copied()
        .filter(|&i| entries[i as usize].rule < by)
        .collect();
    Ok(!covered_by(entries, shared, &before, budget)?)
}

/// Three points of a box: its lowest and highest corners and its middle.
fn witnesses<A: Address>(b: &Fields<A>) -> [Key<A>; 3] {
    let corner = |hi: bool| {
        let pick = |iv: Interval<A>| if hi { iv.hi } else { iv.lo };
        Key {
            src: pick(b.src),
            dst: pick(b.dst),
            src_port: if hi { b.src_port.hi } else { b.src_port.lo },
            dst_port: if hi { b.dst_port.hi } else { b.dst_port.lo },
            proto: if hi { b.proto.hi } else { b.proto.lo },
        }
    };
    let mid = |iv: Interval<A>| iv.lo + ((iv.hi - iv.lo) >> 1);
    let mid16 = |iv: Interval<u16>| iv.lo + (iv.hi - iv.lo) / 2;
    [
        corner(false),
        corner(true),
        Key {
            src: mid(b.src),
            dst: mid(b.dst),
            src_port: mid16(b.src_port),
            dst_port: mid16(b.dst_port),
            proto: b.proto.lo + (b.proto.hi - b.proto.lo) / 2,
        },
    ]
}

/// Whether earlier rules cover `rule` completely, in both families. Only
/// the earlier rules `covers` accepts are counted.
pub fn coverage(
    v4: &Indexed<'_, u32>,
    v6: &Indexed<'_, u128>,
    rule: RuleId,
    covers: &dyn Fn(RuleId) -> bool,
    budget: &mut usize,
) -> Result<Coverage, TooComplex> {
    let mut contributors = Vec::new();
    if coverage_family(v4, rule, covers, budget, &mut contributors)?
        && coverage_family(v6, rule, covers, budget, &mut contributors)?
    {
        contributors.sort_unstable();
        contributors.dedup();
        Ok(Coverage::Covered(contributors))
    } else {
        Ok(Coverage::Effective)
    }
}

/// A region of flows, in words: `tcp 10.0.0.0/8 -> 192.0.2.1 dport 443`.
pub fn describe_box<A: Address + Scalar + Into<u128>>(f: &Fields<A>, v6: bool) -> String {
    describe_sets(
        f.proto,
        &[f.src],
        &[f.dst],
        &[f.src_port],
        &[f.dst_port],
        v6,
    )
}

/// The flows of one protocol range whose fields lie in the given sets
/// (the cross product), in words: `tcp 10.0.0.0/8 -> 192.0.2.1 dport 80, 443`.
fn describe_sets<A: Address + Scalar + Into<u128>>(
    proto: Interval<u8>,
    src: &[Interval<A>],
    dst: &[Interval<A>],
    sport: &[Interval<u16>],
    dport: &[Interval<u16>],
    v6: bool,
) -> String {
    let addr = |ivs: &[Interval<A>]| -> String {
        let mut s = AddrSet::default();
        let top: u128 = if v6 { u128::MAX } else { u32::MAX as u128 };
        if let [iv] = ivs {
            if iv.lo.into() == 0 && iv.hi.into() == top {
                return if v6 { "any6" } else { "any4" }.into();
            }
        }
        for iv in ivs {
            if v6 {
                s.add_v6(iv.lo.into(), iv.hi.into());
            } else {
                s.add_v4(iv.lo.into() as u32, iv.hi.into() as u32);
            }
        }
        s.describe()
    };
    let icmp = (proto.lo == 1 && proto.hi == 1) || (proto.lo == 58 && proto.hi == 58);
    // ICMP type and code travel in the port fields but are 0-255.
    let top = if icmp { 255 } else { 65535 };
    let ports = |ivs: &[Interval<u16>]| -> Option<String> {
        let mut ivs: Vec<(u16, u16)> = ivs.iter().map(|iv| (iv.lo, iv.hi.min(top))).collect();
        ivs.sort_unstable();
        if let [(0, hi)] = ivs[..] {
            if hi == top {
                return None;
            }
        }
        let text: Vec<String> = ivs
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        Some(text.join(", "))
    };
    let proto = match (proto.lo, proto.hi) {
        (0, 255) => "ip".to_string(),
        (6, 6) => "tcp".into(),
        (17, 17) => "udp".into(),
        (132, 132) => "sctp".into(),
        (1, 1) if !v6 => "icmp".into(),
        (58, 58) if v6 => "icmpv6".into(),
        (a, b) if a == b => format!("ip/{a}"),
        (a, b) => format!("ip/{a}-{b}"),
    };
    let mut s = format!("{proto} {} -> {}", addr(src), addr(dst));
    if let Some(p) = ports(sport) {
        s.push_str(if icmp { " type " } else { " sport " });
        s.push_str(&p);
    }
    if let Some(p) = ports(dport) {
        s.push_str(if icmp { " code " } else { " dport " });
        s.push_str(&p);
    }
    s
}

/// Changed pieces as lines to read: pieces with the same rules and
/// verdicts that differ in one field only become one line listing that
/// field's values, joined first on the destination port, then on the
/// destination, then on the source. Exact: a join only takes lines whose
/// other fields are the same sets, so each line is still the cross product
/// of its sets.
struct Line<A> {
    proto: Interval<u8>,
    src: Vec<Interval<A>>,
    dst: Vec<Interval<A>>,
    sport: Vec<Interval<u16>>,
    dport: Vec<Interval<u16>>,
    how: (Option<RuleId>, Option<RuleId>, Verdict, Verdict),
}

fn join_lines<A: Address + Scalar + std::hash::Hash>(pieces: Vec<Piece<A>>) -> Vec<Line<A>> {
    let mut lines: Vec<Line<A>> = pieces
        .into_iter()
        .map(|(x, ro, rn, vo, vn)| Line {
            proto: x.proto,
            src: vec![x.src],
            dst: vec![x.dst],
            sport: vec![x.src_port],
            dport: vec![x.dst_port],
            how: (ro, rn, vo, vn),
        })
        .collect();
    // Each pass joins on one field: 0 destination port, 1 destination, 2
    // source. A line joins the first earlier one equal to it in
    // everything else, found by hashing that (a search of every earlier
    // line took a minute for 160,000 pieces).
    for field in 0..3 {
        let mut joined: Vec<Line<A>> = Vec::with_capacity(lines.len());
        let mut index = std::collections::HashMap::new();
        for l in lines {
            let rest = (
                l.proto,
                l.how,
                l.sport.clone(),
                (field != 0).then(|| l.dport.clone()),
                (field != 1).then(|| l.dst.clone()),
                (field != 2).then(|| l.src.clone()),
            );
            match index.get(&rest) {
                Some(&at) => {
                    let m: &mut Line<A> = &mut joined[at];
                    match field {
                        0 => m.dport.extend(l.dport),
                        1 => m.dst.extend(l.dst),
                        _ => m.src.extend(l.src),
                    }
                }
                None => {
                    index.insert(rest, joined.len());
                    joined.push(l);
                }
            }
        }
        for l in &mut joined {
            l.dport.sort_unstable();
            l.dst.sort_unstable();
            l.src.sort_unstable();
        }
        lines = joined;
    }
    lines
}

/// One region whose verdict differs between two policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub region: String,
    pub old_verdict: Verdict,
    pub old_rules: Deciders,
    pub new_verdict: Verdict,
    pub new_rules: Deciders,
}

impl Change {
    /// A region described by rule: `rule` (its verdict and name) decides
    /// it on one side (the old one when `old`), the rules `names` (and
    /// others when `more`) decide it otherwise on the other.
    fn by_rule(
        region: String,
        old: bool,
        (verdict, rule): (Verdict, &str),
        names: Vec<String>,
        more: bool,
    ) -> Self {
        let by_rule = (verdict, Deciders::one(rule));
        let by_rest = (verdict.opposite(), Deciders { names, more });
        let ((old_verdict, old_rules), (new_verdict, new_rules)) = match old {
            true => (by_rule, by_rest),
            false => (by_rest, by_rule),
        };
        Change {
            region: format!("{region} (too many regions to list one by one)"),
            old_verdict,
            old_rules,
            new_verdict,
            new_rules,
        }
    }
}

/// `` region   now deny by `a`, was allow by `b` ``: a line of `diff`.
impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}   now {} by {}, was {} by {}",
            self.region,
            self.new_verdict.as_str(),
            self.new_rules,
            self.old_verdict.as_str(),
            self.old_rules
        )
    }
}

/// The rules that decide a changed region on one side of a change: one
/// rule (or the default) for a region listed box by box; for a region
/// described by rule (see `one_rule_change`), the rules found to decide a
/// part of it, with `more` when others may too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deciders {
    pub names: Vec<String>,
    pub more: bool,
}

impl Deciders {
    pub fn one(name: impl Into<String>) -> Self {
        Deciders {
            names: vec![name.into()],
            more: false,
        }
    }
}

/// `` `a` ``, `` `a` and `b` ``, `` `a`, `b` and `c` ``, or
/// `` `a`, `b` and other rules ``.
impl std::fmt::Display for Deciders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quoted: Vec<String> = self.names.iter().map(|n| format!("`{n}`")).collect();
        match (quoted.split_last(), self.more) {
            (None, _) => f.write_str("other rules"),
            (Some(_), true) => write!(f, "{} and other rules", quoted.join(", ")),
            (Some((last, [])), false) => f.write_str(last),
            (Some((last, rest)), false) => write!(f, "{} and {last}", rest.join(", ")),
        }
    }
}

/// The boxes of `domain` (a union of boxes, possibly overlapping) where
/// the two policies' verdicts differ, each with the rules that decide it
/// before and after.
///
/// The space is cut jointly for both policies, as a decision tree is
/// built: a box keeps the entries of each policy that overlap it, in
/// order, up to the first that covers it. A box where both policies do
/// the same (the same candidates clipped to it with the same verdicts,
/// see `conduct`) is dropped whatever rules decide inside it; a box where
/// both first candidates cover it is decided; any other box is cut, first
/// to lie inside a domain box (halved by [`balanced_cut`] while it
/// overlaps many, then along one), then in two by [`balanced_cut`] while
/// the candidate lists are long, else along the edges of the
/// first candidate that does not cover it (inside, that entry decides;
/// outside, it drops out). The work thus follows the boundary between
/// changed and unchanged verdicts, not the fragments that subtracting
/// every earlier rule would make (a broad rule removed from a ClassBench
/// 10k policy is decided at once).
fn changed_pieces<A: Address + Scalar + Into<u128>>(
    old: &Policy,
    old_entries: &[Entry<A>],
    new: &Policy,
    new_entries: &[Entry<A>],
    domain: &[Fields<A>],
) -> Result<Vec<Piece<A>>, TooComplex> {
    let verdict = |p: &Policy, r: Option<RuleId>| {
        r.and_then(|id| p.rule(id))
            .map(|r| r.verdict)
            .unwrap_or(p.default_verdict())
    };
    // What a policy does within `b`, comparable across policies: its
    // candidates' boxes clipped to `b` with their verdicts, in order, and
    // the verdict of the rest (the covering candidate's, or the default's).
    // Candidates at the end with the rest's verdict decide nothing the
    // rest would not, so they are left out: a policy that differs only by
    // such rules (a final `deny any -> any` above `default deny`) is the
    // same here.
    let conduct = |p: &Policy, entries: &[Entry<A>], list: &[u32], b: &Fields<A>| {
        let mut seq: Vec<(Fields<A>, Verdict)> = list
            .iter()
            .map(|&i| {
                let e = &entries[i as usize];
                (
                    intersect(&e.fields, b).unwrap_or(e.fields),
                    verdict(p, Some(e.rule)),
                )
            })
            .collect();
        let rest = match seq.last() {
            Some((f, v)) if f == b => {
                let v = *v;
                seq.pop();
                v
            }
            _ => p.default_verdict(),
        };
        while seq.last().is_some_and(|(_, v)| *v == rest) {
            seq.pop();
        }
        (seq, rest)
    };
    // The rule deciding all of `b` (`None` inside: the default), if one does.
    let decided = |entries: &[Entry<A>], list: &[u32], b: &Fields<A>| match list.first() {
        None => Some(None),
        Some(&i) => {
            let e = &entries[i as usize];
            e.fields.covers(b).then_some(Some(e.rule))
        }
    };
    if domain.is_empty() {
        return Ok(Vec::new());
    }
    let all = |entries: &[Entry<A>]| (0..entries.len() as u32).collect::<Vec<u32>>();
    let mut work = ANALYSIS_WORK;
    let mut raw: Vec<Piece<A>> = Vec::new();
    let mut stack = vec![Part {
        b: Fields::any(),
        old: Rc::new(all(old_entries)),
        new: Rc::new(all(new_entries)),
        domain: Rc::new(domain.to_vec()),
    }];
    while let Some(Part {
        b,
        old: o,
        new: n,
        domain: d,
    }) = stack.pop()
    {
        let (o, n) = (
            Rc::new(within(old_entries, &o, &b)),
            Rc::new(within(new_entries, &n, &b)),
        );
        // No domain boxes left: the box lies inside the domain. A part's
        // children share its lists (a domain of many boxes would
        // otherwise be copied into every one).
        let d = if d.is_empty() || d.iter().any(|x| x.covers(&b)) {
            Rc::new(Vec::new())
        } else {
            let kept: Vec<Fields<A>> = d.iter().filter(|x| overlaps(x, &b)).copied().collect();
            if kept.is_empty() {
                continue;
            }
            if kept.len() == d.len() {
                d
            } else {
                Rc::new(kept)
            }
        };
        work = work
            .checked_sub(o.len() + n.len() + d.len() + 1)
            .ok_or(TooComplex)?;
        if conduct(old, old_entries, &o, &b) == conduct(new, new_entries, &n, &b) {
            continue;
        }
        // The box to cut along: a domain box first, so that what is kept
        // lies inside the domain; then the first undecided candidate.
        let edge = if let Some(x) = d.first() {
            // A long domain list is halved first: peeling one domain box
            // at a time costs work, and a filtered copy of the list, for
            // every box peeled (a rule of 160,000 boxes: 0.67 GB).
            if d.len() > PEEL_MAX {
                if let Some(halves) = balanced_cut(&b, d.iter()) {
                    stack.extend(halves.map(|b| Part::of(b, &o, &n, &d)));
                    continue;
                }
            }
            *x
        } else {
            let deciders = (decided(old_entries, &o, &b), decided(new_entries, &n, &b));
            let undecided = deciders.0.is_none() || deciders.1.is_none();
            // Long lists are halved first, as a decision tree's cuts do;
            // cutting along one entry at a time would copy them once per
            // entry.
            if undecided && o.len() + n.len() > PEEL_MAX {
                if let Some(halves) = balanced_cut(
                    &b,
                    boxes_in(old_entries, &o).chain(boxes_in(new_entries, &n)),
                ) {
                    stack.extend(halves.map(|b| Part::of(b, &o, &n, &d)));
                    continue;
                }
            }
            match deciders {
                (Some(ro), Some(rn)) => {
                    let (vo, vn) = (verdict(old, ro), verdict(new, rn));
                    if vo != vn {
                        raw.push((b, ro, rn, vo, vn));
                        if raw.len() > PIECE_BUDGET {
                            return Err(TooComplex);
                        }
                    }
                    continue;
                }
                (None, _) => old_entries[o[0] as usize].fields,
                (_, None) => new_entries[n[0] as usize].fields,
            }
        };
        let mut parts = Vec::new();
        parts.extend(intersect(&b, &edge));
        subtract(&b, &edge, &mut parts);
        stack.extend(parts.into_iter().map(|b| Part::of(b, &o, &n, &d)));
    }
    merge_adjacent(&mut raw);
    Ok(raw)
}

/// A box still to compare in [`changed_pieces`]: the candidate entries of
/// each policy (those of its parent box), and the domain boxes it overlaps
/// but does not lie inside (none: it lies inside one).
struct Part<A> {
    b: Fields<A>,
    old: Rc<Vec<u32>>,
    new: Rc<Vec<u32>>,
    domain: Rc<Vec<Fields<A>>>,
}

impl<A: Copy> Part<A> {
    fn of(
        b: Fields<A>,
        old: &Rc<Vec<u32>>,
        new: &Rc<Vec<u32>>,
        domain: &Rc<Vec<Fields<A>>>,
    ) -> Self {
        Part {
            b,
            old: old.clone(),
            new: new.clone(),
            domain: domain.clone(),
        }
    }
}

/// Candidate lists longer than this (both policies together, for `diff`),
/// and `diff`'s lists of domain boxes, are halved by [`balanced_cut`]
/// before a box is cut along one entry or domain box.
const PEEL_MAX: usize = 32;

/// The boxes of the entries of `list` (indices into `entries`).
fn boxes_in<'a, A: Address>(
    entries: &'a [Entry<A>],
    list: &'a [u32],
) -> impl Iterator<Item = &'a Fields<A>> + Clone {
    list.iter().map(move |&i| &entries[i as usize].fields)
}

/// `b` cut in two at an endpoint of `boxes` (candidates' or domain
/// boxes), in the field and at the median endpoint that leave the fewest
/// of them in the fuller half; `None` when none has an edge inside `b`.
fn balanced_cut<'a, A: Address + Scalar + 'a>(
    b: &Fields<A>,
    boxes: impl Iterator<Item = &'a Fields<A>> + Clone,
) -> Option<[Fields<A>; 2]> {
    let mut best: Option<(usize, [Fields<A>; 2])> = None;
    macro_rules! try_field {
        ($f:ident) => {{
            // Where a candidate starts or ends inside the box: the first
            // value of an upper half.
            let mut cuts = Vec::new();
            for x in boxes.clone() {
                let iv = x.$f;
                if iv.lo > b.$f.lo {
                    cuts.push(iv.lo);
                }
                if iv.hi < b.$f.hi {
                    cuts.push(iv.hi.succ());
                }
            }
            if !cuts.is_empty() {
                let mid = cuts.len() / 2;
                let t = *cuts.select_nth_unstable(mid).1;
                let (mut lo, mut hi) = (*b, *b);
                lo.$f.hi = t.pred();
                hi.$f.lo = t;
                let fuller = [lo, hi]
                    .iter()
                    .map(|half| boxes.clone().filter(|x| x.$f.overlaps(&half.$f)).count())
                    .max()
                    .unwrap_or(0);
                if best.as_ref().is_none_or(|(score, _)| fuller < *score) {
                    best = Some((fuller, [lo, hi]));
                }
            }
        }};
    }
    try_field!(src);
    try_field!(dst);
    try_field!(dst_port);
    try_field!(src_port);
    try_field!(proto);
    best.map(|(_, halves)| halves)
}

fn describe_changes<A: Address + Scalar + Into<u128> + std::hash::Hash>(
    old: &Policy,
    new: &Policy,
    pieces: Vec<Piece<A>>,
    v6: bool,
    out: &mut Vec<Change>,
) {
    for l in join_lines(pieces) {
        let (ro, rn, vo, vn) = l.how;
        out.push(Change {
            region: describe_sets(l.proto, &l.src, &l.dst, &l.sport, &l.dport, v6),
            old_verdict: vo,
            old_rules: Deciders::one(old.rule_name(ro)),
            new_verdict: vn,
            new_rules: Deciders::one(new.rule_name(rn)),
        });
    }
}

pub type Piece<A> = (Fields<A>, Option<RuleId>, Option<RuleId>, Verdict, Verdict);

/// Joins boxes with the same rules that differ in one field only and touch
/// there, until nothing more joins: fewer, larger regions to read. Each
/// pass takes one field: boxes equal in every other field (and in their
/// rules) are sorted along it and runs that touch become one, so a pass
/// costs a sort, not a comparison of every pair.
fn merge_adjacent<A: Address + Scalar + Into<u128>>(v: &mut Vec<Piece<A>>) {
    // A field's interval as a pair of u128 (for sorting and touching),
    // and the piece with that field blanked (the grouping key).
    fn field<A: Address + Scalar + Into<u128>>(p: &Piece<A>, f: usize) -> (u128, u128) {
        let x = &p.0;
        match f {
            0 => (x.src.lo.into(), x.src.hi.into()),
            1 => (x.dst.lo.into(), x.dst.hi.into()),
            2 => (x.src_port.lo.into(), x.src_port.hi.into()),
            3 => (x.dst_port.lo.into(), x.dst_port.hi.into()),
            _ => (x.proto.lo.into(), x.proto.hi.into()),
        }
    }
    fn blank<A: Address + Scalar>(p: &Piece<A>, f: usize) -> Piece<A> {
        let mut q = *p;
        match f {
            0 => {
                q.0.src = Interval {
                    lo: A::MIN,
                    hi: A::MIN,
                }
            }
            1 => {
                q.0.dst = Interval {
                    lo: A::MIN,
                    hi: A::MIN,
                }
            }
            2 => q.0.src_port = Interval { lo: 0, hi: 0 },
            3 => q.0.dst_port = Interval { lo: 0, hi: 0 },
            _ => q.0.proto = Interval { lo: 0, hi: 0 },
        }
        q
    }
    fn extend<A: Address + Scalar>(p: &mut Piece<A>, other: &Piece<A>, f: usize) {
        match f {
            0 => p.0.src.hi = other.0.src.hi,
            1 => p.0.dst.hi = other.0.dst.hi,
            2 => p.0.src_port.hi = other.0.src_port.hi,
            3 => p.0.dst_port.hi = other.0.dst_port.hi,
            _ => p.0.proto.hi = other.0.proto.hi,
        }
    }
    // The rules decide the verdicts.
    let key = |p: &Piece<A>| (p.1, p.2);
    let mut quiet = 0;
    let mut f = 0;
    // Five passes in a row without a join: nothing more joins.
    while quiet < 5 && v.len() > 1 {
        let before = v.len();
        let mut keyed: Vec<(Piece<A>, Piece<A>)> = v.drain(..).map(|p| (blank(&p, f), p)).collect();
        keyed.sort_by(|(a, pa), (b, pb)| {
            (key(a), boxes_order(&a.0), field(pa, f)).cmp(&(
                key(b),
                boxes_order(&b.0),
                field(pb, f),
            ))
        });
        // The key of `v`'s last piece (a join leaves it unchanged).
        let mut last_key: Option<Piece<A>> = None;
        for (k, p) in keyed {
            if let Some(last) = v.last_mut() {
                if last_key == Some(k) && field(last, f).1.checked_add(1) == Some(field(&p, f).0) {
                    extend(last, &p, f);
                    continue;
                }
            }
            v.push(p);
            last_key = Some(k);
        }
        quiet = if v.len() < before { 0 } else { quiet + 1 };
        f = (f + 1) % 5;
    }
}

/// A total order on boxes, field by field, for sorting.
fn boxes_order<A: Address>(x: &Fields<A>) -> (A, A, A, A, u16, u16, u16, u16, u8, u8) {
    (
        x.src.lo,
        x.src.hi,
        x.dst.lo,
        x.dst.hi,
        x.src_port.lo,
        x.src_port.hi,
        x.dst_port.lo,
        x.dst_port.hi,
        x.proto.lo,
        x.proto.hi,
    )
}

/// What a rule decides, as far as verdicts go: its verdict and its boxes
/// in both families (its name, owner or expiry do not change a flow's
/// verdict).
type RuleEffect = (Verdict, Vec<Fields<u32>>, Vec<Fields<u128>>);

fn rule_effects(p: &Policy, v4: &[Entry<u32>], v6: &[Entry<u128>]) -> Vec<RuleEffect> {
    let mut out: Vec<RuleEffect> = p
        .rules()
        .iter()
        .map(|r| (r.verdict, Vec::new(), Vec::new()))
        .collect();
    for e in v4 {
        out[e.rule as usize].1.push(e.fields);
    }
    for e in v6 {
        out[e.rule as usize].2.push(e.fields);
    }
    out
}

/// Whether a rule matches any flow, in either family.
fn has_flows(fx: &RuleEffect) -> bool {
    !fx.1.is_empty() || !fx.2.is_empty()
}

/// The rules with flows of two policies (their indices, in order), and
/// how many of them the two share from the start and, after those, from
/// the end: old = P R S and new = P Q S with P (`prefix` rules) and S
/// (`suffix` rules) as long as they go. Rules that match nothing are left
/// out, so that one (an expired rule) on one side only does not end P or
/// S.
struct SharedEnds {
    old: Vec<usize>,
    new: Vec<usize>,
    prefix: usize,
    suffix: usize,
}

impl SharedEnds {
    fn of(old: &[RuleEffect], new: &[RuleEffect]) -> Self {
        let with_flows = |fx: &[RuleEffect]| -> Vec<usize> {
            (0..fx.len()).filter(|&i| has_flows(&fx[i])).collect()
        };
        let (o, n) = (with_flows(old), with_flows(new));
        let same = |(&i, &j): &(&usize, &usize)| old[i] == new[j];
        let prefix = o.iter().zip(&n).take_while(same).count();
        let suffix = o[prefix..]
            .iter()
            .rev()
            .zip(n[prefix..].iter().rev())
            .take_while(same)
            .count();
        SharedEnds {
            old: o,
            new: n,
            prefix,
            suffix,
        }
    }

    /// The rules with flows between P and S (R and Q), in each policy.
    fn changed(&self) -> (&[usize], &[usize]) {
        let (o, n) = (&self.old, &self.new);
        (
            &o[self.prefix..o.len() - self.suffix],
            &n[self.prefix..n.len() - self.suffix],
        )
    }
}

/// Which rules of each policy are unchanged: present in both with the same
/// effect, and in the same order relative to each other. Rules that match
/// nothing count as unchanged wherever they are. The rules the two share
/// from the start and from the end pair up first, as an edit reads (a rule
/// edited right before an identical twin is the one changed, not the
/// twin); between them, a longest such sequence.
fn unchanged_rules(
    old: &[RuleEffect],
    new: &[RuleEffect],
    ends: &SharedEnds,
) -> (Vec<bool>, Vec<bool>) {
    // The rules between the last shared one at the start and the first
    // at the end, on each side.
    let middle = |fx: &[RuleEffect], at: &[usize]| {
        let lo = ends.prefix.checked_sub(1).map_or(0, |k| at[k] + 1);
        let hi = at.get(at.len() - ends.suffix).map_or(fx.len(), |&i| i);
        lo..hi
    };
    let (om, nm) = (middle(old, &ends.old), middle(new, &ends.new));
    let (o_same, n_same) = in_order(&old[om.clone()], &new[nm.clone()]);
    let whole = |len: usize, at: std::ops::Range<usize>, inside: Vec<bool>| {
        let mut v = vec![true; len];
        v[at].copy_from_slice(&inside);
        v
    };
    (whole(old.len(), om, o_same), whole(new.len(), nm, n_same))
}

/// [`unchanged_rules`] between the shared start and end: a longest
/// common subsequence of effects.
fn in_order(old: &[RuleEffect], new: &[RuleEffect]) -> (Vec<bool>, Vec<bool>) {
    use std::collections::HashMap;
    let empty = |e: &RuleEffect| !has_flows(e);
    // Where each effect is in the new policy, in order.
    let mut at: HashMap<&RuleEffect, Vec<usize>> = HashMap::new();
    for (j, e) in new.iter().enumerate().filter(|(_, e)| !empty(e)) {
        at.entry(e).or_default().push(j);
    }
    let candidates = |e: &RuleEffect| at.get(e).map_or(0, Vec::len);
    // Every old rule with each new rule of the same effect, the new ones
    // in descending order per old rule (Hunt and Szymanski): a strictly
    // increasing run of new positions then takes at most one pair per old
    // rule, and the longest is a longest common subsequence. A rule
    // inserted before an identical later one (a broad deny that the
    // policy already has at its end) pairs with the right one. Where
    // identical rules repeat so much that the pairs would be too many,
    // the k-th of an effect in one policy pairs with the k-th in the
    // other instead.
    let pairs: Vec<(usize, usize)> = if old.iter().map(candidates).sum::<usize>() <= PAIRS_MAX {
        old.iter()
            .enumerate()
            .flat_map(|(i, e)| {
                at.get(e)
                    .into_iter()
                    .flat_map(move |js| js.iter().rev().map(move |&j| (i, j)))
            })
            .collect()
    } else {
        let mut seen: HashMap<&RuleEffect, usize> = HashMap::new();
        old.iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let k = seen.entry(e).or_insert(0);
                *k += 1;
                Some((i, *at.get(e)?.get(*k - 1)?))
            })
            .collect()
    };
    // Longest strictly increasing subsequence of the new positions
    // (patience).
    let mut tails: Vec<usize> = Vec::new(); // index into pairs
    let mut prev: Vec<Option<usize>> = vec![None; pairs.len()];
    for k in 0..pairs.len() {
        let j = pairs[k].1;
        let at = tails.partition_point(|&t| pairs[t].1 < j);
        prev[k] = at.checked_sub(1).map(|a| tails[a]);
        if at == tails.len() {
            tails.push(k);
        } else {
            tails[at] = k;
        }
    }
    let mut old_same: Vec<bool> = old.iter().map(empty).collect();
    let mut new_same: Vec<bool> = new.iter().map(empty).collect();
    let mut k = tails.last().copied();
    while let Some(x) = k {
        let (i, j) = pairs[x];
        old_same[i] = true;
        new_same[j] = true;
        k = prev[x];
    }
    (old_same, new_same)
}

/// Most (old rule, new rule) pairs of equal effect [`in_order`] matches
/// exactly (about 32 bytes each, with the subsequence's links).
const PAIRS_MAX: usize = 4 << 20;

/// Flows whose verdict differs between two policies, as regions.
///
/// Only flows inside the boxes of changed rules can change verdict: a
/// flow outside them is first matched, in both policies, by the same
/// unchanged rule (unchanged rules keep their relative order), or by
/// neither. So the comparison runs within those boxes only (identical
/// policies cost one pass over their rules), and within them it follows
/// where verdicts change (see `changed_pieces`). A changed default makes
/// every flow a candidate. Where the regions are too many to list, the
/// change is described by rule instead (see [`diff_by_rule`] for one
/// rule or the default alone, [`diff_by_rules`] for more).
pub fn diff_packets(old: &Policy, new: &Policy) -> Result<Vec<Change>, TooComplex> {
    let sides = Sides::of(old, new);
    let (p4, p6) = match regions_of(old, new, &sides) {
        Ok(p) => p,
        Err(e) => {
            return by_rule(old, new, &sides)
                .map(|by_rule| by_rule.map(|b| b.changes))
                .unwrap_or(Err(e))
        }
    };
    let mut out = Vec::new();
    describe_changes(old, new, p4, false, &mut out);
    describe_changes(old, new, p6, true, &mut out);
    Ok(out)
}

/// What [`diff_packets`] answers when [`changed_regions`] gives up on a
/// change of one rule, or of the default alone: the change described by
/// rule (see `one_rule_change`), `None` for a change of any other shape
/// (see [`diff_by_rules`]).
pub fn diff_by_rule(old: &Policy, new: &Policy) -> Option<Result<ByRule, TooComplex>> {
    one_rule_change(old, new, &Sides::of(old, new))
}

/// A change of any shape described rule by rule, as [`diff_packets`]
/// describes one that touches several rules and is too fragmented to list
/// (see `several_rules_change`): `None` when it touches no rule or more
/// than [`EDITED_MAX`].
pub fn diff_by_rules(old: &Policy, new: &Policy) -> Option<Result<ByRule, TooComplex>> {
    several_rules_change(old, new, &Sides::of(old, new))
}

/// A change described by rule: one rule's (or the default's) as
/// `one_rule_change` gives it, else several rules' as
/// `several_rules_change` does.
fn by_rule(old: &Policy, new: &Policy, sides: &Sides) -> Option<Result<ByRule, TooComplex>> {
    one_rule_change(old, new, sides).or_else(|| several_rules_change(old, new, sides))
}

/// A change described by rule: the rules it removed from the old policy
/// and those it added to the new (an edited rule is both), none when only
/// the default changed, and the changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByRule {
    pub removed: Vec<RuleId>,
    pub added: Vec<RuleId>,
    pub changes: Vec<Change>,
}

/// A change [`changed_regions`] cannot list region by region, described
/// by rule where its shape allows: the default alone changed (then the
/// flows no rule matches change), or one rule removed from the old policy,
/// inserted into the new one, or replaced in place (its verdict or its
/// flows edited), every other rule unchanged and in order, and the same
/// default. Then the flows that change are, per family:
///
/// - those the removed (or old) rule decides, outside the new one, where
///   the rest of the policy (the later rules, then the default) decides
///   otherwise;
/// - those the inserted (or new) rule decides, outside the old one, where
///   the rest decides otherwise;
/// - where both match and no earlier rule does, all of them if the
///   verdict changed.
///
/// Each is one region, the rule's boxes with that condition, however many
/// boxes it would take to list (the complement of thousands of rules, when
/// a catch-all at the end of a large policy is removed, or every gap a
/// broad deny inserted in the middle falls into), with the later rules
/// that decide a part of it on the other side. `None` for a change of any
/// other shape.
fn one_rule_change(
    old: &Policy,
    new: &Policy,
    sides: &Sides,
) -> Option<Result<ByRule, TooComplex>> {
    // R and Q of the shared ends are what changed (taken this way, not
    // from the longest common subsequence of effects alone, which may
    // pair an edited rule's identical neighbour with it and the edit then
    // looks like two).
    let ends = &sides.ends;
    let (o, n, prefix, suffix) = (&ends.old, &ends.new, ends.prefix, ends.suffix);
    let (r, q) = ends.changed();
    if old.default_verdict() != new.default_verdict() {
        return (r.is_empty() && q.is_empty()).then(|| default_change(old, new, sides));
    }
    if r.len() > 1 || q.len() > 1 || (r.is_empty() && q.is_empty()) {
        return None;
    }
    // Each old rule of P and S as the new policy numbers it, and back.
    let mut in_new = vec![None; sides.old_fx.len()];
    let pairs = o[..prefix].iter().zip(&n[..prefix]);
    for (&i, &j) in pairs.chain(o[o.len() - suffix..].iter().zip(&n[n.len() - suffix..])) {
        in_new[i] = Some(j);
    }
    let gone = match r.first() {
        Some(&i) => Some((old.rule(i as RuleId)?, &sides.old_fx[i])),
        None => None,
    };
    let came = match q.first() {
        Some(&j) => Some((new.rule(j as RuleId)?, &sides.new_fx[j])),
        None => None,
    };
    let mut budget = BY_RULE_BUDGET;
    let mut out = Vec::new();
    let done = changes_by_rule(
        (old, &sides.o4, gone.map(|(r, fx)| (r, &fx.1[..]))),
        (new, &sides.n4, came.map(|(r, fx)| (r, &fx.1[..]))),
        &in_new,
        false,
        &mut budget,
        &mut out,
    )
    .and_then(|()| {
        changes_by_rule(
            (old, &sides.o6, gone.map(|(r, fx)| (r, &fx.2[..]))),
            (new, &sides.n6, came.map(|(r, fx)| (r, &fx.2[..]))),
            &in_new,
            true,
            &mut budget,
            &mut out,
        )
    });
    Some(done.map(|()| ByRule {
        removed: gone.map(|(r, _)| r.id).into_iter().collect(),
        added: came.map(|(r, _)| r.id).into_iter().collect(),
        changes: out,
    }))
}

/// Only the default changed: exactly the flows no rule matches change, in
/// each family where there are any.
fn default_change(old: &Policy, new: &Policy, sides: &Sides) -> Result<ByRule, TooComplex> {
    let mut budget = BY_RULE_BUDGET;
    fn unmatched<A: Address + Scalar>(
        entries: &[Entry<A>],
        budget: &mut usize,
    ) -> Result<bool, TooComplex> {
        let all: Vec<u32> = (0..entries.len() as u32).collect();
        Ok(!covered_by(entries, vec![Fields::any()], &all, budget)?)
    }
    // Each family's region: all of it where it has no rules.
    let region = |any: String, rules: bool| match rules {
        true => format!("{any} where no rule matches (too many regions to list one by one)"),
        false => any,
    };
    let mut families = Vec::new();
    if unmatched(&sides.o4, &mut budget)? {
        let any = describe_box(&Fields::<u32>::any(), false);
        families.push(region(any, !sides.o4.is_empty()));
    }
    if unmatched(&sides.o6, &mut budget)? {
        let any = describe_box(&Fields::<u128>::any(), true);
        families.push(region(any, !sides.o6.is_empty()));
    }
    Ok(ByRule {
        removed: Vec::new(),
        added: Vec::new(),
        changes: families
            .into_iter()
            .map(|region| Change {
                region,
                old_verdict: old.default_verdict(),
                old_rules: Deciders::one("default"),
                new_verdict: new.default_verdict(),
                new_rules: Deciders::one("default"),
            })
            .collect(),
    })
}

/// One side of a change described by rule: the policy, its entries of one
/// family, and the rule the change removed from it or added to it, with
/// that rule's boxes.
type RuleSide<'a, A> = (
    &'a Policy,
    &'a [Entry<A>],
    Option<(&'a PacketRule, &'a [Fields<A>])>,
);

/// The changes of one family [`one_rule_change`] describes.
fn changes_by_rule<A: Address + Scalar + Into<u128>>(
    (old, o, gone): RuleSide<'_, A>,
    (new, n, came): RuleSide<'_, A>,
    in_new: &[Option<usize>],
    v6: bool,
    budget: &mut usize,
    out: &mut Vec<Change>,
) -> Result<(), TooComplex> {
    // The boxes of `a` outside every box of `b`.
    let outside = |a: &[Fields<A>], b: &[Fields<A>]| -> Result<Vec<Fields<A>>, TooComplex> {
        let mut left = a.to_vec();
        for x in b {
            let mut next = Vec::new();
            for p in &left {
                subtract(p, x, &mut next);
            }
            if next.len() > PIECE_BUDGET {
                return Err(TooComplex);
            }
            left = next;
        }
        Ok(left)
    };
    // A region cut from a rule's boxes by the other version's is named
    // by the two rules once it takes more than a few boxes to list.
    // (`rule`: the rule whose boxes `own` are, as "the old `x`".)
    let cut = |(own, rule): (&[Fields<A>], &str), pieces: &[Fields<A>], how: &str| -> String {
        if pieces.len() <= SHOWN_BOXES {
            rule_boxes(pieces, "", v6)
        } else if pieces == own {
            rule_boxes(own, rule, v6)
        } else {
            format!("{} {how}", rule_boxes(own, rule, v6))
        }
    };
    // Where the two rules both match and no earlier rule does, the
    // verdict is theirs on each side.
    if let (Some((r, rb)), Some((q, qb))) = (gone, came) {
        let both: Vec<Fields<A>> = rb
            .iter()
            .flat_map(|x| qb.iter().filter_map(|y| intersect(x, y)))
            .collect();
        let earlier = entries_before(&Indexed::new(o), r.id, &|_| true, budget)?;
        if r.verdict != q.verdict
            && !both.is_empty()
            && !covered_by(o, both.clone(), &earlier, budget)?
        {
            out.push(Change {
                region: format!(
                    "{} where no earlier rule matches (too many regions to list one by one)",
                    cut(
                        (rb, &format!("the old `{}`", r.name)),
                        &both,
                        &format!("that the new `{}` matches too", q.name)
                    )
                ),
                old_verdict: r.verdict,
                old_rules: Deciders::one(r.name.clone()),
                new_verdict: q.verdict,
                new_rules: Deciders::one(q.name.clone()),
            });
        }
    }
    // The rules on the other side are named as that policy names them:
    // the later rules are all in S (see `one_rule_change`).
    let in_old = |id: usize| in_new.iter().position(|&j| j == Some(id));
    for (policy, entries, side, others, removed) in
        [(old, o, gone, came, true), (new, n, came, gone, false)]
    {
        let Some((rule, own)) = side else { continue };
        let pieces = outside(own, others.map_or(&[][..], |s| s.1))?;
        let Some(rest) = decided_otherwise(policy, entries, rule, &pieces, budget)? else {
            continue;
        };
        let (other_side, version) = if removed { (new, "new") } else { (old, "old") };
        let names = rest
            .named
            .iter()
            .map(|&id| {
                let there = id.and_then(|id| match removed {
                    true => in_new.get(id as usize).copied().flatten(),
                    false => in_old(id as usize),
                });
                match there {
                    Some(i) => other_side.rule_name(Some(i as RuleId)),
                    // The default, or (never for a later rule) a rule
                    // without a pair: as its own policy names it.
                    None => policy.rule_name(id),
                }
                .to_string()
            })
            .collect();
        let how = match others {
            Some((q, _)) => format!("that the {version} `{}` does not match", q.name),
            None => String::new(),
        };
        let which = if removed { "old" } else { "new" };
        let shown = cut(
            (own, &format!("the {which} `{}`", rule.name)),
            &pieces,
            &how,
        );
        let other = rule.verdict.opposite().as_str();
        let condition = match (rest.overlapped, rest.reaches_default) {
            // The default decides all of them, otherwise.
            (false, _) => String::new(),
            (true, true) => format!(" and the later rules or the default {other} them"),
            (true, false) => format!(" and the later rules {other} them"),
        };
        out.push(Change::by_rule(
            format!("{shown} where no earlier rule matches{condition}"),
            removed,
            (rule.verdict, &rule.name),
            names,
            rest.more,
        ));
    }
    Ok(())
}

/// Most rules a change of several rules may touch and still be described
/// by rule (a rule edited in place, under the same name, counting once,
/// and a changed default as one more): each takes a line or two of its
/// own, and a review of more is better served by smaller changes.
pub const EDITED_MAX: usize = 64;

/// A change [`changed_regions`] cannot list region by region and
/// `one_rule_change` does not take, described by rule where it touches
/// at most [`EDITED_MAX`] rules: rules removed from the old policy,
/// inserted into the new one, or edited, in any number of places, with
/// or without the default. The rules each policy kept are those of
/// `unchanged_rules`. A flow whose first match is a kept rule on both
/// sides is decided by the same rule on both (see [`diff_packets`]), so
/// every changed flow is, exactly once, either
///
/// - decided in the new policy by an added (or edited) rule, or by the
///   new default when it changed, where the old policy decides it
///   otherwise: a line per such rule, naming the old rules that decided
///   them; or
/// - decided in the old policy by a removed (or edited) rule, or by the
///   old default when it changed, where the new policy decides it
///   otherwise by a rule it kept or its (unchanged) default: a line per
///   such rule, naming those.
///
/// Each line is found exactly (`decided_by`) on one list that holds the
/// rule's side before the rule, then the whole other policy: its first
/// match for a flow of the rule's boxes is an earlier rule of the same
/// side (the rule does not decide it) or the other side's decision.
fn several_rules_change(
    old: &Policy,
    new: &Policy,
    sides: &Sides,
) -> Option<Result<ByRule, TooComplex>> {
    let edited = |same: &[bool]| -> Vec<RuleId> {
        (0..same.len())
            .filter(|&i| !same[i])
            .map(|i| i as RuleId)
            .collect()
    };
    let (gone, came) = (edited(&sides.old_same), edited(&sides.new_same));
    let default = old.default_verdict() != new.default_verdict();
    // A rule edited in place (the same name on both sides) counts once.
    let names: std::collections::HashSet<&str> =
        gone.iter().map(|&id| old.rule_name(Some(id))).collect();
    let both = came
        .iter()
        .filter(|&&id| names.contains(new.rule_name(Some(id))))
        .count();
    let count = gone.len() + came.len() - both + usize::from(default);
    if count == 0 || count > EDITED_MAX {
        return None;
    }
    let (was, now) = (
        Edited {
            policy: old,
            same: &sides.old_same,
            fx: &sides.old_fx,
            default,
        },
        Edited {
            policy: new,
            same: &sides.new_same,
            fx: &sides.new_fx,
            default,
        },
    );
    let mut budget = BY_RULE_BUDGET;
    let mut out = Vec::new();
    // Per family, the old side's lines, then the new side's.
    fn family<A: Address + Scalar + Into<u128>>(
        (was, o): (Edited<'_>, &[Entry<A>]),
        (now, n): (Edited<'_>, &[Entry<A>]),
        v6: bool,
        budget: &mut usize,
        out: &mut Vec<Change>,
    ) -> Result<(), TooComplex> {
        edited_changes((was, o), (now, n), true, v6, budget, out)?;
        edited_changes((now, n), (was, o), false, v6, budget, out)
    }
    let done = family(
        (was, &sides.o4),
        (now, &sides.n4),
        false,
        &mut budget,
        &mut out,
    )
    .and_then(|()| {
        family(
            (was, &sides.o6),
            (now, &sides.n6),
            true,
            &mut budget,
            &mut out,
        )
    });
    Some(done.map(|()| ByRule {
        removed: gone,
        added: came,
        changes: out,
    }))
}

/// One side of a change of several rules: the policy, which of its rules
/// it kept, their effects, and whether its default changed.
#[derive(Clone, Copy)]
struct Edited<'a> {
    policy: &'a Policy,
    same: &'a [bool],
    fx: &'a [RuleEffect],
    default: bool,
}

impl Edited<'_> {
    /// For each rule, how many kept rules with flows come before it: the
    /// kept rules with flows pair up in order between the two sides.
    fn kept_before(&self) -> Vec<usize> {
        let mut before = Vec::with_capacity(self.same.len() + 1);
        let mut n = 0;
        for (same, fx) in self.same.iter().zip(self.fx) {
            before.push(n);
            if *same && has_flows(fx) {
                n += 1;
            }
        }
        before.push(n);
        before
    }
}

/// The lines of one family and one side (`this`, the old policy when
/// `this_is_old`) that [`several_rules_change`] describes.
fn edited_changes<A: Address + Scalar + Into<u128>>(
    (this, mine): (Edited<'_>, &[Entry<A>]),
    (other, theirs): (Edited<'_>, &[Entry<A>]),
    this_is_old: bool,
    v6: bool,
    budget: &mut usize,
    out: &mut Vec<Change>,
) -> Result<(), TooComplex> {
    // One list: this side's entries, then the other side's with their
    // rules numbered from `base`, then the other side's default.
    let base = this.policy.rules().len() as RuleId + 1;
    let other_default = base + other.policy.rules().len() as RuleId;
    let mut all = mine.to_vec();
    all.extend(theirs.iter().map(|e| Entry {
        fields: e.fields,
        rule: e.rule + base,
    }));
    all.push(Entry {
        fields: Fields::any(),
        rule: other_default,
    });
    let theirs_from = mine.len() as u32;
    let this_default = this.policy.rules().len() as RuleId;
    let (this_kept, other_kept) = (this.kept_before(), other.kept_before());
    // The other side's verdict for a rule, whether it is changed, and
    // whether it is a kept rule that comes before the `k`-th kept rule
    // (its pair, before the rule here, takes all its flows first).
    let other_rule = |id: RuleId, k: usize| {
        let j = (id - base) as usize;
        match other.policy.rule(id - base) {
            Some(r) => (
                r.verdict,
                !other.same[j],
                other.same[j] && other_kept[j] < k,
            ),
            None => (other.policy.default_verdict(), other.default, false),
        }
    };
    let edited = (0..this.same.len() as RuleId)
        .filter(|&i| !this.same[i as usize])
        .chain(this.default.then_some(this_default));
    for rule in edited {
        let (verdict, own, name) = match this.policy.rule(rule) {
            Some(r) => (r.verdict, boxes_of(mine, rule), r.name.as_str()),
            None => (
                this.policy.default_verdict(),
                vec![Fields::any()],
                "default",
            ),
        };
        if own.is_empty() {
            continue;
        }
        // This side's entries before the rule, then the other policy.
        let before = mine.partition_point(|e| e.rule < rule) as u32;
        let list: Vec<u32> = (0..before).chain(theirs_from..all.len() as u32).collect();
        // The other side decides otherwise; from the old rule's side,
        // by a rule the new policy kept (or its unchanged default): the
        // new policy's own changes take the rest.
        let k = this_kept[rule as usize];
        let side = if this_is_old { "old" } else { "new" };
        let differs = |id: RuleId| {
            id >= base && {
                let (v, changed, blocked) = other_rule(id, k);
                v != verdict && !blocked && !(this_is_old && changed)
            }
        };
        let Some(rest) =
            decided_later(&all, &list, &own, base - 1, other_default, &differs, budget)?
        else {
            continue;
        };
        let names = rest
            .named
            .iter()
            .map(|&id| other.policy.rule_name(id.map(|id| id - base)).to_string())
            .collect();
        let (where_, and) = match this.policy.rule(rule) {
            Some(_) => (
                format!(
                    "{} where no earlier rule matches",
                    rule_boxes(&own, &format!("the {side} `{name}`"), v6)
                ),
                "and",
            ),
            // The whole family where it has no rules.
            None if mine.is_empty() => (describe_box(&own[0], v6), "where"),
            None => (
                format!("{} where no rule matches", describe_box(&own[0], v6)),
                "and",
            ),
        };
        let verbs = match verdict.opposite() {
            Verdict::Allow => "allows",
            Verdict::Deny => "denies",
        };
        let condition = match (this_is_old, rest.rules_differ, rest.default_differs) {
            (false, _, _) => format!("the old policy {verbs} them"),
            (true, true, true) => {
                format!("the new policy {verbs} them by a rule it kept or its default")
            }
            (true, true, false) => format!("the new policy {verbs} them by a rule it kept"),
            (true, false, _) => format!("the new policy's default {verbs} them"),
        };
        out.push(Change::by_rule(
            format!("{where_} {and} {condition}"),
            this_is_old,
            (verdict, name),
            names,
            rest.more,
        ));
    }
    Ok(())
}

/// Most boxes a region described by rule lists one by one.
const SHOWN_BOXES: usize = 8;

/// A rule's boxes in words, one by one when there are at most
/// [`SHOWN_BOXES`], else as the flows of the rule `label` names.
fn rule_boxes<A: Address + Scalar + Into<u128>>(
    boxes: &[Fields<A>],
    label: &str,
    v6: bool,
) -> String {
    if boxes.len() <= SHOWN_BOXES {
        let each: Vec<String> = boxes.iter().map(|b| describe_box(b, v6)).collect();
        each.join("; ")
    } else {
        format!("the flows of {label} ({} boxes)", boxes.len())
    }
}

/// What [`decided_otherwise`] finds for one family.
struct Otherwise {
    /// Rules of the policy that decide a part of them without the rule
    /// (`None` for the default).
    named: Vec<Option<RuleId>>,
    /// Whether others may too.
    more: bool,
    /// Whether any later rule overlaps the rule's boxes (else the default
    /// decides all of its flows without it).
    overlapped: bool,
    /// Whether the default decides any of them without it (no later rule
    /// covers all of its boxes).
    reaches_default: bool,
    /// Whether a later rule that `differs` accepts overlaps them (before
    /// one that covers all of them).
    rules_differ: bool,
    /// Whether the default is reached and `differs` accepts it.
    default_differs: bool,
}

/// The flows of one family that `rule` (with boxes `own`) decides in
/// `policy` and that the policy without it decides otherwise, with the
/// rules after it that decide a part of them: `None` when there are
/// none. Exact: a part is dropped once its
/// first-match candidates hold no later rule (nor default) of the other
/// verdict, and answered once the first does; naming is tried on the
/// later rules that share the most flows with it.
fn decided_otherwise<A: Address + Scalar + Into<u128>>(
    policy: &Policy,
    entries: &[Entry<A>],
    rule: &PacketRule,
    own: &[Fields<A>],
    budget: &mut usize,
) -> Result<Option<Otherwise>, TooComplex> {
    if own.is_empty() {
        return Ok(None);
    }
    // The default, as one more rule after every other, matching all.
    let default = policy.rules().len() as RuleId;
    let mut all = entries.to_vec();
    all.push(Entry {
        fields: Fields::any(),
        rule: default,
    });
    let verdict = |id: RuleId| {
        policy
            .rule(id)
            .map_or(policy.default_verdict(), |r| r.verdict)
    };
    let otherwise = |id: RuleId| id > rule.id && verdict(id) != rule.verdict;
    let rest: Vec<u32> = (0..all.len() as u32)
        .filter(|&i| all[i as usize].rule != rule.id)
        .collect();
    decided_later(&all, &rest, own, rule.id, default, &otherwise, budget)
}

/// The core of [`decided_otherwise`]: whether an entry of `rest`
/// (indices into `all`, in order) whose rule `differs` accepts is the
/// first match for a flow of `own`, and if so which of the rules after
/// `after` (`default` stands for a default, matching all) decide a part.
fn decided_later<A: Address + Scalar + Into<u128>>(
    all: &[Entry<A>],
    rest: &[u32],
    own: &[Fields<A>],
    after: RuleId,
    default: RuleId,
    differs: &dyn Fn(RuleId) -> bool,
    budget: &mut usize,
) -> Result<Option<Otherwise>, TooComplex> {
    if !decided_by(all, own.to_vec(), rest, differs, budget)? {
        return Ok(None);
    }
    // Finding and ordering the later rules tests the boxes against every
    // later entry, and those of some later rules: paid as they go.
    let mut hulls = Hulls::new(own);
    // The later rules that could decide a part otherwise, the most
    // shared flows first (the default, sharing all, last), up to the
    // first later rule that covers all of it: none after that can.
    let mut later = hulls.overlapping_rules(all.iter().filter(|e| e.rule > after), budget)?;
    let mut last = None;
    for (k, &id) in later.iter().enumerate() {
        let covers_all = hulls.each_inside_one_of(&boxes_of(all, id));
        hulls.pay(budget)?;
        if covers_all {
            last = Some(k);
            break;
        }
    }
    if let Some(last) = last {
        later.truncate(last + 1);
    }
    let overlapped = later.iter().any(|&id| id != default);
    let reaches_default = later.last() == Some(&default);
    let mut shares: Vec<(f64, RuleId)> = Vec::new();
    for id in later.into_iter().filter(|&id| differs(id) && id != default) {
        shares.push((hulls.shared_flows(&boxes_of(all, id)), id));
        hulls.pay(budget)?;
    }
    let mut candidates = largest_first(shares);
    let rules_differ = !candidates.is_empty();
    let default_differs = differs(default) && reaches_default;
    if default_differs {
        candidates.push(default);
    }
    // Naming gets half of what is left; the other family needs the rest.
    let mut naming = *budget / 2;
    *budget -= naming;
    let (named, more) = name_some(&candidates, |id| {
        takes_part(all, &mut hulls, rest, id, &mut naming)
    });
    *budget += naming;
    let named = named
        .into_iter()
        .map(|id| (id != default).then_some(id))
        .collect();
    Ok(Some(Otherwise {
        named,
        more,
        overlapped,
        reaches_default,
        rules_differ,
        default_differs,
    }))
}

/// The boxes of flows whose verdict differs, with the rules and verdicts
/// before and after, per family (see [`diff_packets`]).
pub fn changed_regions(old: &Policy, new: &Policy) -> Result<ChangedRegions, TooComplex> {
    regions_of(old, new, &Sides::of(old, new))
}

/// Both policies' entries and rule effects, and which of their rules are
/// unchanged: what [`changed_regions`] and `one_rule_change` start from.
struct Sides {
    o4: Vec<Entry<u32>>,
    o6: Vec<Entry<u128>>,
    n4: Vec<Entry<u32>>,
    n6: Vec<Entry<u128>>,
    old_fx: Vec<RuleEffect>,
    new_fx: Vec<RuleEffect>,
    ends: SharedEnds,
    old_same: Vec<bool>,
    new_same: Vec<bool>,
}

impl Sides {
    fn of(old: &Policy, new: &Policy) -> Self {
        let (o4, o6) = super::entries(old);
        let (n4, n6) = super::entries(new);
        let (old_fx, new_fx) = (rule_effects(old, &o4, &o6), rule_effects(new, &n4, &n6));
        let ends = SharedEnds::of(&old_fx, &new_fx);
        let (old_same, new_same) = unchanged_rules(&old_fx, &new_fx, &ends);
        Sides {
            o4,
            o6,
            n4,
            n6,
            old_fx,
            new_fx,
            ends,
            old_same,
            new_same,
        }
    }
}

fn regions_of(old: &Policy, new: &Policy, sides: &Sides) -> Result<ChangedRegions, TooComplex> {
    let (domain4, domain6) = if old.default_verdict() != new.default_verdict() {
        (vec![Fields::<u32>::any()], vec![Fields::<u128>::any()])
    } else {
        let (mut d4, mut d6) = (Vec::new(), Vec::new());
        for (fx, same) in [
            (&sides.old_fx, &sides.old_same),
            (&sides.new_fx, &sides.new_same),
        ] {
            for (e, _) in fx.iter().zip(same.iter()).filter(|(_, s)| !**s) {
                d4.extend_from_slice(&e.1);
                d6.extend_from_slice(&e.2);
            }
        }
        (d4, d6)
    };
    Ok((
        changed_pieces(old, &sides.o4, new, &sides.n4, &domain4)?,
        changed_pieces(old, &sides.o6, new, &sides.n6, &domain6)?,
    ))
}

/// Changed boxes of both families: (box, old rule, new rule, old verdict,
/// new verdict); a rule of `None` is the default.
pub type ChangedRegions = (Vec<Piece<u32>>, Vec<Piece<u128>>);

/// Elementary intervals of a family: every boundary of every set splits
/// the address line.
fn elementary<T: Copy + Ord + Scalar>(sets: &[&[Interval<T>]], min: T, max: T) -> Vec<Interval<T>> {
    let mut cuts: Vec<T> = vec![min];
    for s in sets {
        for iv in *s {
            cuts.push(iv.lo);
            if iv.hi < max {
                cuts.push(iv.hi.succ());
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.iter()
        .enumerate()
        .map(|(i, &lo)| Interval {
            lo,
            hi: cuts.get(i + 1).map(|n| n.pred()).unwrap_or(max),
        })
        .collect()
}

/// One class of proxy requests whose verdict differs between two policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpChange {
    pub sources: String,
    pub host: String,
    pub ports: String,
    pub method: String,
    pub old_verdict: Verdict,
    pub old_rule: String,
    pub new_verdict: Verdict,
    pub new_rule: String,
}

/// Proxy requests whose verdict differs. The request space is cut into
/// classes by every source set, host pattern, port set and method named in
/// either policy; one representative of each class is decided by both.
/// The request space cut into classes by every source set, host pattern,
/// port set and method the rules name: within a class every rule matches
/// every request or none, so one representative decides for the class.
struct HttpClasses {
    /// A representative source and the class's addresses.
    sources: Vec<(IpAddr, AddrSet)>,
    /// A representative host and the class in words.
    hosts: Vec<(HttpHost, String)>,
    ports: Vec<Interval<u16>>,
    /// `CONNECT`, `GET`, every method a rule names, and `other_method`.
    methods: Vec<String>,
    /// The stand-in for every method no rule names: one no rule names.
    other_method: String,
}

impl HttpClasses {
    fn count(&self) -> usize {
        self.sources.len() * self.hosts.len() * self.ports.len() * self.methods.len()
    }
}

/// A label for the stand-in host names of [`http_classes`]: the label
/// alone stands for "any other host", and `LABEL.suffix` for the names of
/// `*.suffix` that no more specific pattern names. The label is in no
/// pattern's text, and each stand-in is checked against every pattern: it
/// must be matched by exactly the patterns that cover its class (for
/// "any other host", by `*` only), or a real pattern such as `"*.invalid"`
/// would decide the stand-in and so, wrongly, the whole class.
fn stand_in_label(rules: &[&super::HttpRule]) -> String {
    use super::HostPattern;
    let patterns: Vec<&HostPattern> = rules.iter().flat_map(|r| &r.hosts).collect();
    let text = |p: &HostPattern| match p {
        HostPattern::Any => String::new(),
        HostPattern::Exact(n) => n.clone(),
        HostPattern::Subdomains(s) => s.clone(),
    };
    let fits = |label: &str| {
        patterns.iter().all(|p| !text(p).contains(label))
            && patterns
                .iter()
                .all(|p| (**p == HostPattern::Any) == p.matches(label))
            && patterns.iter().all(|w| {
                let HostPattern::Subdomains(s) = w else {
                    return true;
                };
                let rep = format!("{label}.{s}");
                patterns
                    .iter()
                    .all(|p| p.matches(&rep) == w.is_covered_by(p))
            })
    };
    std::iter::once("other-host".to_string())
        .chain((1u64..).map(|n| format!("other-host-{n}")))
        .find(|l| fits(l))
        .expect("a label in no pattern exists")
}

/// A method for "every method no rule names": `OTHER`, or longer while a
/// rule names it (a method is any upper-case word).
fn stand_in_method(rules: &[&super::HttpRule]) -> String {
    let mut m = String::from("OTHER");
    while rules.iter().any(|r| r.methods.contains(&m)) {
        m.push('X');
    }
    m
}

fn http_classes(rules: &[&super::HttpRule]) -> HttpClasses {
    let other = stand_in_label(rules);
    let v4sets: Vec<&[Interval<u32>]> = rules.iter().map(|r| r.src.v4.as_slice()).collect();
    let v6sets: Vec<&[Interval<u128>]> = rules.iter().map(|r| r.src.v6.as_slice()).collect();
    let mut sources: Vec<(IpAddr, AddrSet)> = Vec::new();
    for iv in elementary(&v4sets, 0u32, u32::MAX) {
        let mut s = AddrSet::default();
        s.add_v4(iv.lo, iv.hi);
        sources.push((IpAddr::V4(Ipv4Addr::from(iv.lo)), s));
    }
    for iv in elementary(&v6sets, 0u128, u128::MAX) {
        let mut s = AddrSet::default();
        s.add_v6(iv.lo, iv.hi);
        sources.push((IpAddr::V6(Ipv6Addr::from(iv.lo)), s));
    }
    let mut hosts: Vec<(HttpHost, String)> = Vec::new();
    for r in rules {
        for h in &r.hosts {
            let (rep, label) = match h {
                super::HostPattern::Any => continue,
                super::HostPattern::Exact(n) => (n.clone(), n.clone()),
                super::HostPattern::Subdomains(s) => (format!("{other}.{s}"), format!("*.{s}")),
            };
            if !hosts.iter().any(|(_, l)| *l == label) {
                hosts.push((HttpHost::Name(rep), label));
            }
        }
    }
    // IP-literal destinations: one class per elementary interval of every
    // address set named, in both families. Addresses outside every set
    // decide like "any other host" below.
    let in_some_set = |ip: IpAddr| rules.iter().any(|r| r.addrs.contains(ip));
    let v4addrs: Vec<&[Interval<u32>]> = rules.iter().map(|r| r.addrs.v4.as_slice()).collect();
    let v6addrs: Vec<&[Interval<u128>]> = rules.iter().map(|r| r.addrs.v6.as_slice()).collect();
    for iv in elementary(&v4addrs, 0u32, u32::MAX) {
        let ip = IpAddr::V4(Ipv4Addr::from(iv.lo));
        if in_some_set(ip) {
            let mut s = AddrSet::default();
            s.add_v4(iv.lo, iv.hi);
            hosts.push((HttpHost::Ip(ip), s.describe()));
        }
    }
    for iv in elementary(&v6addrs, 0u128, u128::MAX) {
        let ip = IpAddr::V6(Ipv6Addr::from(iv.lo));
        if in_some_set(ip) {
            let mut s = AddrSet::default();
            s.add_v6(iv.lo, iv.hi);
            hosts.push((HttpHost::Ip(ip), s.describe()));
        }
    }
    hosts.push((HttpHost::Name(other), "any other host".into()));
    // A wildcard class holds the names no more specific host names:
    // `*.debian.org except deb.debian.org`.
    let names: Vec<String> = hosts
        .iter()
        .filter(|(h, _)| matches!(h, HttpHost::Name(_)))
        .map(|(_, l)| l.clone())
        .collect();
    for (h, label) in hosts.iter_mut() {
        let HttpHost::Name(_) = h else { continue };
        let Some(suffix) = label.strip_prefix("*.").map(str::to_string) else {
            continue;
        };
        let inner: Vec<&str> = names
            .iter()
            .filter(|n| *n != label && n.ends_with(&format!(".{suffix}")))
            .map(String::as_str)
            .collect();
        if !inner.is_empty() {
            *label = format!("{label} except {}", inner.join(", "));
        }
    }
    let port_sets: Vec<&[Interval<u16>]> = rules.iter().map(|r| r.ports.as_slice()).collect();
    let ports = elementary(&port_sets, 0u16, u16::MAX);
    let mut methods: Vec<String> = vec!["CONNECT".into(), "GET".into()];
    for r in rules {
        for m in &r.methods {
            if !methods.contains(m) {
                methods.push(m.clone());
            }
        }
    }
    let other_method = stand_in_method(rules);
    methods.push(other_method.clone());
    HttpClasses {
        sources,
        hosts,
        ports,
        methods,
        other_method,
    }
}

/// For each HTTP rule, which earlier HTTP rules decide every request it
/// matches for as long as it is in force: `None` when the rule decides some
/// request itself, now or once an earlier rule expires (or matches none).
/// Exact, over the classes of all the policy's HTTP rules (built once), so
/// a rule covered only by several earlier rules together is found too.
pub fn http_coverage(policy: &Policy) -> Result<Vec<Option<Vec<usize>>>, TooComplex> {
    let rules: Vec<&super::HttpRule> = policy.http_rules().iter().collect();
    let c = http_classes(&rules);
    if c.count() > PIECE_BUDGET * 10 {
        return Err(TooComplex);
    }
    Ok(rules
        .iter()
        .enumerate()
        .map(|(i, rule)| http_covered_in(policy, rule, i, &c))
        .collect())
}

fn http_covered_in(
    policy: &Policy,
    rule: &super::HttpRule,
    i: usize,
    c: &HttpClasses,
) -> Option<Vec<usize>> {
    let mut by: Vec<usize> = Vec::new();
    let mut matched = false;
    for (src, _) in &c.sources {
        if !rule.src.contains(*src) {
            continue;
        }
        for (host, _) in &c.hosts {
            for p in &c.ports {
                for m in &c.methods {
                    let req = HttpRequest {
                        src: *src,
                        host: host.clone(),
                        port: p.lo,
                        method: m.clone(),
                    };
                    if !rule.matches(&req) {
                        continue;
                    }
                    matched = true;
                    // The first earlier rule that matches and outlives it.
                    let earlier = policy.http_rules()[..i]
                        .iter()
                        .position(|e| lives_as_long(e.expires, rule.expires) && e.matches(&req));
                    match earlier {
                        Some(j) => {
                            if !by.contains(&j) {
                                by.push(j);
                            }
                        }
                        None => return None,
                    }
                }
            }
        }
    }
    by.sort_unstable();
    matched.then_some(by)
}

pub fn diff_http(old: &Policy, new: &Policy) -> Result<Vec<HttpChange>, TooComplex> {
    let rules: Vec<&super::HttpRule> = old.http_rules().iter().chain(new.http_rules()).collect();
    let HttpClasses {
        sources,
        hosts,
        ports,
        mut methods,
        other_method,
    } = http_classes(&rules);
    // A CONNECT is two classes here: TLS tunnels, and the non-TLS ones a
    // rule must allow (`plain-tunnel`).
    methods.insert(1, PLAIN_CONNECT.into());
    if sources.len() * hosts.len() * ports.len() * methods.len() > PIECE_BUDGET * 10 {
        return Err(TooComplex);
    }
    let decide = |p: &Policy, req: &HttpRequest, plain: bool| {
        let d = p.decide_http(req);
        let verdict = if plain && !d.plain_tunnel {
            Verdict::Deny
        } else {
            d.verdict
        };
        (verdict, p.http_rule_name(d.rule).to_string())
    };
    // Changes as (sources, host, ports, method, old, new), merged below.
    type Side = (Verdict, String);
    let mut found: Vec<(AddrSet, usize, Interval<u16>, String, Side, Side)> = Vec::new();
    for (src, src_set) in &sources {
        for (hi, (host, _)) in hosts.iter().enumerate() {
            let mut here: Vec<(Interval<u16>, String, Side, Side)> = Vec::new();
            for p in &ports {
                let mut at_port: Vec<(String, Side, Side)> = Vec::new();
                for m in &methods {
                    let plain = m == PLAIN_CONNECT;
                    let req = HttpRequest {
                        src: *src,
                        host: host.clone(),
                        port: p.lo,
                        method: if plain { "CONNECT".into() } else { m.clone() },
                    };
                    let (a, b) = (decide(old, &req, plain), decide(new, &req, plain));
                    if a.0 != b.0 {
                        at_port.push((m.clone(), a, b));
                    }
                }
                // One entry when every method changed the same way; non-TLS
                // tunnels are listed apart only where they changed otherwise
                // (a `plain-tunnel` added or removed).
                let others: Vec<&(String, Side, Side)> =
                    at_port.iter().filter(|c| c.0 != PLAIN_CONNECT).collect();
                if others.len() == methods.len() - 1
                    && others
                        .iter()
                        .all(|c| c.1 == others[0].1 && c.2 == others[0].2)
                {
                    let (a, b) = (others[0].1.clone(), others[0].2.clone());
                    let plain = at_port.iter().find(|c| c.0 == PLAIN_CONNECT);
                    at_port = match plain {
                        Some(p) if !(p.1 == a && p.2 == b) => vec![
                            (ANY_METHOD.into(), a, b),
                            (p.0.clone(), p.1.clone(), p.2.clone()),
                        ],
                        _ => vec![(ANY_METHOD.into(), a, b)],
                    };
                }
                for (m, a, b) in at_port {
                    // Adjacent port classes that changed alike join.
                    match here.iter_mut().find(|c| {
                        c.1 == m && c.2 == a && c.3 == b && c.0.hi.checked_add(1) == Some(p.lo)
                    }) {
                        Some(c) => c.0.hi = p.hi,
                        None => here.push((*p, m, a, b)),
                    }
                }
            }
            for (ports, m, a, b) in here {
                found.push((src_set.clone(), hi, ports, m, a, b));
            }
        }
    }
    // Sources that changed the same way are listed together.
    let mut merged: Vec<(AddrSet, usize, Interval<u16>, String, Side, Side)> = Vec::new();
    for c in found {
        match merged
            .iter_mut()
            .find(|m| m.1 == c.1 && m.2 == c.2 && m.3 == c.3 && m.4 == c.4 && m.5 == c.5)
        {
            Some(m) => m.0.union(&c.0),
            None => merged.push(c),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(mut src, host, p, method, (ov, or), (nv, nr))| {
            src.normalize();
            HttpChange {
                sources: src.describe(),
                host: hosts[host].1.clone(),
                ports: if p.lo == 0 && p.hi == 65535 {
                    "any".into()
                } else if p.lo == p.hi {
                    p.lo.to_string()
                } else {
                    format!("{}-{}", p.lo, p.hi)
                },
                method: if method == other_method {
                    "other methods".into()
                } else {
                    method
                },
                old_verdict: ov,
                old_rule: or,
                new_verdict: nv,
                new_rule: nr,
            }
        })
        .collect())
}

/// The class of non-TLS CONNECT tunnels in [`diff_http`].
const PLAIN_CONNECT: &str = "CONNECT non-TLS tunnels";
const ANY_METHOD: &str = "any method";

/// A zone whose accepted sources differ: the filter drops a packet whose
/// source is outside its arrival port's zone (no zone: every source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneChange {
    pub zone: &'static str,
    /// Sources the port now accepts and did not.
    pub accepted: Option<String>,
    /// Sources the port accepted and now drops as spoofed.
    pub refused: Option<String>,
}

pub fn diff_zones(old: &Policy, new: &Policy) -> Vec<ZoneChange> {
    let mut out = Vec::new();
    for (zone, name) in [(super::Zone::Edge, "edge"), (super::Zone::Onprem, "onprem")] {
        let set = |p: &Policy| p.zones().get(zone).cloned().unwrap_or_else(AddrSet::any);
        let (a, b) = (set(old), set(new));
        let describe = |s: AddrSet| (!s.is_empty()).then(|| s.describe());
        let change = ZoneChange {
            zone: name,
            accepted: describe(b.minus(&a)),
            refused: describe(a.minus(&b)),
        };
        if change.accepted.is_some() || change.refused.is_some() {
            out.push(change);
        }
    }
    out
}

/// Whether an HTTP rule is wholly covered by a single earlier rule, one in
/// force for at least as long.
pub fn http_covered_by(rule: &super::HttpRule, earlier: &super::HttpRule) -> bool {
    let ports_covered = earlier.ports.is_empty()
        || (!rule.ports.is_empty()
            && rule
                .ports
                .iter()
                .all(|p| earlier.ports.iter().any(|e| e.covers(p))));
    let methods_covered = earlier.methods.is_empty()
        || (!rule.methods.is_empty() && rule.methods.iter().all(|m| earlier.methods.contains(m)));
    let hosts_covered = rule
        .hosts
        .iter()
        .all(|h| earlier.hosts.iter().any(|e| h.is_covered_by(e)));
    earlier.active
        && lives_as_long(earlier.expires, rule.expires)
        && earlier.src.covers(&rule.src)
        && earlier.addrs.covers(&rule.addrs)
        && hosts_covered
        && ports_covered
        && methods_covered
}

/// The families in which a rule matches every source and every destination
/// (`any`, `any4`, `0.0.0.0/0`, `::/0`): "IPv4", "IPv6" or both.
pub fn any_to_any_families(r: &PacketRule) -> Option<&'static str> {
    let all = AddrSet::any();
    let v4 = r.src.v4 == all.v4 && r.dst.v4 == all.v4;
    let v6 = r.src.v6 == all.v6 && r.dst.v6 == all.v6;
    match (v4, v6) {
        (true, true) => Some(""),
        (true, false) => Some("IPv4 "),
        (false, true) => Some("IPv6 "),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(src: (u32, u32), dport: (u16, u16)) -> Fields<u32> {
        let mut x = Fields::<u32>::any();
        x.src = Interval {
            lo: src.0,
            hi: src.1,
        };
        x.dst_port = Interval {
            lo: dport.0,
            hi: dport.1,
        };
        x
    }

    fn iv<T>(lo: T, hi: T) -> Interval<T> {
        Interval { lo, hi }
    }

    proptest::proptest! {
        /// Joined lines name exactly the flows of the pieces they join,
        /// each with its pieces' rules and verdicts, and join where one
        /// field alone differs.
        #[test]
        fn joined_lines_are_exactly_their_pieces(
            cells in proptest::collection::btree_map((0u32..4, 0u32..4, 0u16..4), 0u8..2, 0..24)
        ) {
            let cells: Vec<(u32, u32, u16, u8)> =
                cells.into_iter().map(|((s, d, p), r)| (s, d, p, r)).collect();
            // Disjoint unit boxes on a 4 x 4 x 4 grid, with one of two
            // rule pairs each (as changed pieces are).
            let pieces: Vec<Piece<u32>> = cells
                .iter()
                .map(|&(s, d, p, r)| {
                    let mut x = Fields::<u32>::any();
                    x.src = iv(s, s);
                    x.dst = iv(d, d);
                    x.dst_port = iv(p, p);
                    x.proto = iv(6, 6);
                    (x, Some(u32::from(r)), None, Verdict::Allow, Verdict::Deny)
                })
                .collect();
            let n = pieces.len();
            let lines = join_lines(pieces);
            proptest::prop_assert!(lines.len() <= n);
            let inside = |l: &Line<u32>, s: u32, d: u32, p: u16| {
                l.src.iter().any(|i| i.lo <= s && s <= i.hi)
                    && l.dst.iter().any(|i| i.lo <= d && d <= i.hi)
                    && l.dport.iter().any(|i| i.lo <= p && p <= i.hi)
            };
            for s in 0..4 {
                for d in 0..4 {
                    for p in 0..4 {
                        let want: Vec<u32> = cells
                            .iter()
                            .filter(|c| (c.0, c.1, c.2) == (s, d, p))
                            .map(|c| u32::from(c.3))
                            .collect();
                        let got: Vec<u32> = lines
                            .iter()
                            .filter(|l| inside(l, s, d, p))
                            .map(|l| l.how.0.unwrap())
                            .collect();
                        proptest::prop_assert_eq!(want, got, "at {} {} {}", s, d, p);
                    }
                }
            }
            // Two cells of one rule that differ in the port only share a
            // line.
            for a in &cells {
                for b in &cells {
                    if (a.0, a.1, a.3) == (b.0, b.1, b.3) {
                        let shared = lines
                            .iter()
                            .any(|l| inside(l, a.0, a.1, a.2) && inside(l, b.0, b.1, b.2));
                        proptest::prop_assert!(shared, "{:?} {:?}", a, b);
                    }
                }
            }
        }
    }

    #[test]
    fn deciders_read_as_a_list() {
        let d = |names: &[&str], more| Deciders {
            names: names.iter().map(|n| n.to_string()).collect(),
            more,
        };
        assert_eq!(d(&["a"], false).to_string(), "`a`");
        assert_eq!(d(&["a", "b"], false).to_string(), "`a` and `b`");
        assert_eq!(d(&["a", "b", "c"], false).to_string(), "`a`, `b` and `c`");
        assert_eq!(d(&["a", "b"], true).to_string(), "`a`, `b` and other rules");
        assert_eq!(d(&[], true).to_string(), "other rules");
    }

    #[test]
    fn subtraction_is_exact() {
        let a = f((0, 100), (0, 1000));
        let b = f((50, 60), (80, 80));
        let mut out = Vec::new();
        subtract(&a, &b, &mut out);
        // Every point of a is in exactly one of (out, b∩a).
        for s in (0..=100).step_by(5) {
            for p in [0u16, 79, 80, 81, 1000] {
                let k = crate::classify::Key {
                    src: s,
                    dst: 7,
                    src_port: 1,
                    dst_port: p,
                    proto: 6,
                };
                let in_out = out.iter().filter(|x| x.matches(&k)).count();
                let in_b = usize::from(b.matches(&k));
                assert_eq!(in_out + in_b, 1, "src {s} port {p}");
            }
        }
    }

    #[test]
    fn elementary_intervals_cover_the_line() {
        let sets: Vec<&[Interval<u16>]> = vec![
            &[Interval { lo: 10, hi: 20 }],
            &[Interval { lo: 15, hi: 65535 }],
        ];
        let e = elementary(&sets, 0, u16::MAX);
        assert_eq!(
            e,
            vec![
                Interval { lo: 0, hi: 9 },
                Interval { lo: 10, hi: 14 },
                Interval { lo: 15, hi: 20 },
                Interval { lo: 21, hi: 65535 }
            ]
        );
    }

    proptest::proptest! {
        /// A rule's boxes come out of [`Runs`] in the order they would
        /// go one by one (last first), and each box finds in the
        /// candidates it comes with exactly what it finds in the whole list; where the
        /// boxes lie near one another (sorted, as a rule's cross product
        /// is) and the candidates are many, runs narrow them.
        #[test]
        fn runs_keep_every_box_s_candidates(
            entries in proptest::collection::vec(
                (0u32..4096, 0u32..600, 0u16..64, 0u16..40, proptest::bool::ANY),
                1..400,
            ),
            boxes in proptest::collection::vec((0u32..4096, 0u32..200, 0u16..64, 0u16..8), 1..300),
        ) {
            let entries: Vec<Entry<u32>> = entries
                .iter()
                .enumerate()
                .map(|(k, &(src, w, port, pw, tcp))| {
                    let mut x = f((src, src + w), (port, port + pw));
                    if tcp {
                        x.proto = iv(6, 6);
                    }
                    Entry { fields: x, rule: k as RuleId }
                })
                .collect();
            let mut boxes: Vec<Fields<u32>> = boxes
                .iter()
                .map(|&(src, w, port, pw)| f((src, src + w), (port, port + pw)))
                .collect();
            boxes.sort_by_key(boxes_order);
            let list: Vec<u32> = (0..entries.len() as u32).collect();
            let mut budget = usize::MAX;
            let mut starts = Runs::new(&entries, &boxes, &list);
            let mut order = Vec::new();
            while let Some((b, near)) = starts.next(&mut budget).unwrap() {
                proptest::prop_assert_eq!(within(&entries, &near, &b), within(&entries, &list, &b));
                order.push(b);
            }
            boxes.reverse();
            proptest::prop_assert_eq!(order, boxes);
        }
    }

    proptest::proptest! {
        /// [`entries_before`] through the index finds, in order, the
        /// earlier entries a scan of every one finds (those of counted
        /// rules that overlap the rule's hull), and pays the same. Rules
        /// of up to 200 boxes, so that both a rule's tree of hulls and its
        /// plain list are passed through.
        #[test]
        fn entries_before_finds_what_a_scan_finds(
            rules in proptest::collection::vec(
                (proptest::collection::vec((0u32..4096, 0u32..300, 0u16..64, 0u16..16), 1..200),
                 proptest::bool::ANY),
                1..12,
            ),
            own in proptest::collection::vec((0u32..4096, 0u32..600, 0u16..64, 0u16..64), 1..4),
        ) {
            let mut entries = Vec::new();
            for (id, (boxes, _)) in rules.iter().enumerate() {
                for &(src, w, port, pw) in boxes {
                    entries.push(Entry { fields: f((src, src + w), (port, port + pw)), rule: id as RuleId });
                }
            }
            let last = rules.len() as RuleId;
            for &(src, w, port, pw) in &own {
                entries.push(Entry { fields: f((src, src + w), (port, port + pw)), rule: last });
            }
            let counts = |id: RuleId| rules.get(id as usize).is_none_or(|r| r.1);
            let hull = hull_of(own.iter().map(|&(src, w, port, pw)| f((src, src + w), (port, port + pw))).collect::<Vec<_>>().iter()).unwrap();
            let want: Vec<u32> = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.rule < last && counts(e.rule) && overlaps(&e.fields, &hull))
                .map(|(i, _)| i as u32)
                .collect();
            let end = entries.iter().filter(|e| e.rule < last).count();
            let mut budget = usize::MAX;
            let got = entries_before(&Indexed::new(&entries), last, &counts, &mut budget).unwrap();
            proptest::prop_assert_eq!(&got, &want);
            proptest::prop_assert_eq!(usize::MAX - budget, (end - want.len()) / SCAN_PER_UNIT);
        }
    }

    proptest::proptest! {
        /// A rule's [`Hulls`] answer as its boxes tested one by one do:
        /// which boxes overlap, whether each lies inside one of a rule's,
        /// the flows they share (up to rounding: sums taken in another
        /// order), and the boxes they share (in another order). Up to 300
        /// boxes, so that both the tree and the plain list are tested.
        #[test]
        fn hulls_answer_as_the_boxes_one_by_one(
            boxes in proptest::collection::vec((0u32..4096, 0u32..200, 0u16..64, 0u16..8), 1..300),
            others in proptest::collection::vec(
                proptest::collection::vec((0u32..4096, 0u32..3000, 0u16..64, 0u16..64), 1..4),
                1..12,
            ),
        ) {
            let boxes: Vec<Fields<u32>> = boxes
                .iter()
                .map(|&(src, w, port, pw)| f((src, src + w), (port, port + pw)))
                .collect();
            let mut hulls = Hulls::new(&boxes);
            proptest::prop_assert_eq!(hulls.nodes.is_empty(), boxes.len() <= HULLS_MIN);
            for other in &others {
                let other: Vec<Fields<u32>> = other
                    .iter()
                    .map(|&(src, w, port, pw)| f((src, src + w), (port, port + pw)))
                    .collect();
                for y in &other {
                    let any = boxes.iter().any(|b| overlaps(b, y));
                    proptest::prop_assert_eq!(hulls.any_overlaps(y), any);
                }
                let inside = boxes.iter().all(|b| other.iter().any(|y| y.covers(b)));
                proptest::prop_assert_eq!(hulls.each_inside_one_of(&other), inside);
                let (got, want) = (hulls.shared_flows(&other), shared_flows(&boxes, &other));
                proptest::prop_assert!((got - want).abs() <= want * 1e-12, "{got} {want}");
                let mut got = hulls.shared_boxes(&other, usize::MAX).unwrap();
                let mut want: Vec<Fields<u32>> = other
                    .iter()
                    .flat_map(|y| boxes.iter().filter_map(|b| intersect(b, y)))
                    .collect();
                got.sort_by_key(boxes_order);
                want.sort_by_key(boxes_order);
                proptest::prop_assert_eq!(got, want);
            }
        }
    }

    /// An entry is tested against a rule of 20,000 boxes side by side in
    /// a few dozen hulls, not box by box.
    #[test]
    fn hulls_test_an_entry_against_many_boxes_in_a_few_hulls() {
        let boxes: Vec<Fields<u32>> = (0..20_000u32)
            .map(|k| f((k * 16, k * 16 + 15), (80, 80)))
            .collect();
        let mut hulls = Hulls::new(&boxes);
        // Near the end, missing every box; then inside the last.
        for (src, found) in [(319_990, false), (319_999, true)] {
            let mut probe = f((src, src), (443, 443));
            if found {
                probe.dst_port = iv(80, 80);
            }
            hulls.tests = 0;
            assert_eq!(hulls.any_overlaps(&probe), found);
            assert!(hulls.tests <= 64, "{} tests", hulls.tests);
        }
        // A rule over the middle half covers whole runs at once.
        let half = [f((80_000, 239_999), (0, 65535))];
        hulls.tests = 0;
        assert!(!hulls.each_inside_one_of(&half));
        let shared = hulls.shared_flows(&half);
        assert_eq!(
            shared,
            10_000.0 * 16.0 * flows(&Fields::<u32>::any()) / 65536.0 / 2f64.powi(32)
        );
        assert!(hulls.tests <= 200, "{} tests", hulls.tests);
        // Copying what they share is paid box by box, and bounded.
        hulls.tests = 0;
        let shared = hulls.shared_boxes(&half, 10_000);
        assert_eq!(shared.map(|v| v.len()), Some(10_000));
        assert!(
            (10_000..=10_200).contains(&hulls.tests),
            "{} tests",
            hulls.tests
        );
        assert_eq!(hulls.shared_boxes(&half, 9_999), None);
    }

    /// The candidates leave out the earlier entries that miss the rule's
    /// hull, and scanning those is paid: 2,000 of them cost 7 units, and
    /// a budget that could not pay for scanning them all is refused first.
    #[test]
    fn candidates_pay_for_the_entries_they_leave_out() {
        let mut entries: Vec<Entry<u32>> = (0..2000u32)
            .map(|k| Entry {
                fields: f((k * 16, k * 16 + 15), (443, 443)),
                rule: k,
            })
            .collect();
        // Earlier rule 1999 overlaps the last rule; no other does.
        entries.push(Entry {
            fields: f((31_984, 31_999), (0, 65535)),
            rule: 2000,
        });
        let all = |_: RuleId| true;
        let mut budget = 7;
        let got = entries_before(&Indexed::new(&entries), 2000, &all, &mut budget);
        assert_eq!(got, Ok(vec![1999]));
        assert_eq!(budget, 0);
        let mut budget = 6;
        assert_eq!(
            entries_before(&Indexed::new(&entries), 2000, &all, &mut budget),
            Err(TooComplex)
        );
    }

    /// Runs narrow where it pays: 256 boxes side by side behind 1,000
    /// entries spread over the addresses scan a few of them each.
    #[test]
    fn runs_narrow_the_candidates_of_boxes_side_by_side() {
        let entries: Vec<Entry<u32>> = (0..1000u32)
            .map(|k| Entry {
                fields: f((k * 64, k * 64 + 63), (0, 65535)),
                rule: k,
            })
            .collect();
        let boxes: Vec<Fields<u32>> = (0..256u32)
            .map(|k| f((k * 16, k * 16 + 15), (80, 80)))
            .collect();
        let list: Vec<u32> = (0..1000).collect();
        let mut budget = 10_000;
        let mut starts = Runs::new(&entries, &boxes, &list);
        let mut longest = 0;
        while let Some((_, near)) = starts.next(&mut budget).unwrap() {
            longest = longest.max(near.len());
        }
        // Narrowed until a run's scans cost less than narrowing again.
        assert!(longest <= 8, "{longest}");
        // Not 256 boxes scanning 1,000 entries each (256 x 4 units).
        assert!(10_000 - budget < 100, "{}", 10_000 - budget);
    }
}
