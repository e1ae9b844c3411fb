//! The inline filter: two ports (`edge` toward the provider edge and the
//! VNet, `onprem` toward the on-premises routers), a forwarding loop per
//! direction, and the decision every frame gets.
//!
//! [`Engine::handle`] decides one frame that arrived on one port:
//! - ARP and IPv6 neighbour discovery pass (valid neighbour discovery
//!   only, from a link-local source or the port's zone); other non-IP
//!   EtherTypes pass only where configured; malformed frames are dropped;
//! - a source address outside the zone of its arrival port is dropped
//!   (anti-spoofing): a frame from the VNet must carry a VNet address;
//! - a packet of a tracked flow passes (both ways), unless a reload's policy
//!   no longer allows the flow: then it is cut here and recorded;
//! - an ICMP error about a tracked flow passes, addressed to the sender
//!   of the packet it quotes;
//! - a non-first fragment follows its first fragment's verdict; one that
//!   comes before its first fragment is held (bounded in time and bytes)
//!   and passes or drops when the first fragment is decided;
//! - anything else starts a flow (TCP only with a SYN): the per-source rate
//!   limit, the policy, the audit trail's admission and the table's room all
//!   must agree, then the flow is tracked and recorded.
//!
//! Drops are counted per reason and summarised per flow key in the audit
//! trail (one record per key and interval, not one per packet).
//!
//! With the kernel fast path ([`offload`]), an established TCP or UDP flow
//! is handed to the kernel after palisade admitted it, and its frames then
//! cross without a copy into palisade; the flow stays in the connection
//! table, and palisade still sees every frame that changes its state.

pub mod offload;
pub mod port;

use crate::audit::{Action, AuditEvent, AuditLog, FlowTuple, Timestamp, Traffic};
use crate::classify::{FlowKey, RuleId};
use crate::conntrack::{
    ConnKey, ConnTable, Direction, EndReason, Ended, Flow, NewFlow, State, TcpState, Timeouts,
};
use crate::packet::{self, Fragment, IcmpKind, Payload};
use crate::policy::{Policy, Verdict, Zone};
use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use port::{RxPort, TxPort};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    Malformed,
    NonIp,
    Spoofed,
    Denied,
    NoState,
    RateLimited,
    TableFull,
    Fragment,
    AuditUnavailable,
    Revoked,
    Oversize,
    SourceRouted,
    IncompleteFirstFragment,
    OverlappingFragment,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::Malformed,
        DropReason::NonIp,
        DropReason::Spoofed,
        DropReason::Denied,
        DropReason::NoState,
        DropReason::RateLimited,
        DropReason::TableFull,
        DropReason::Fragment,
        DropReason::AuditUnavailable,
        DropReason::Revoked,
        DropReason::Oversize,
        DropReason::SourceRouted,
        DropReason::IncompleteFirstFragment,
        DropReason::OverlappingFragment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed frame",
            DropReason::NonIp => "non-IP frame not allowed",
            DropReason::Spoofed => "source address not in the arrival port's zone",
            DropReason::Denied => "denied by the policy",
            DropReason::NoState => "not part of a tracked flow and not a flow start",
            DropReason::RateLimited => "new-flow rate limit for this source exceeded",
            DropReason::TableFull => {
                "connection table full (or, for an IPv6 first fragment, its source's share of fragment verdicts)"
            }
            DropReason::Fragment => "fragment without an admitted first fragment",
            DropReason::AuditUnavailable => "the audit trail cannot be written",
            DropReason::Revoked => "the reloaded policy no longer allows this flow",
            DropReason::Oversize => "frame larger than the port's buffers",
            DropReason::SourceRouted => {
                "source-routed: the sender chose its route (IPv4 source route option, IPv6 routing header with segments left)"
            }
            DropReason::IncompleteFirstFragment => {
                "first fragment without its whole transport header"
            }
            DropReason::OverlappingFragment => {
                "fragment overlapping the transport header or (IPv6) the data its first fragment carried"
            }
        }
    }
}

impl DropReason {
    /// Whether a packet so dropped was judged as what it says it is: its
    /// source was its port's, its headers whole. Drops before that
    /// (malformed, spoofed, a fragment cut short) are of packets that say
    /// nothing trustworthy about the flow or datagram they name.
    pub fn judges_the_datagram(self) -> bool {
        matches!(
            self,
            DropReason::Denied
                | DropReason::NoState
                | DropReason::RateLimited
                | DropReason::TableFull
                | DropReason::AuditUnavailable
                | DropReason::Revoked
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    Drop(DropReason),
    /// A later fragment kept until its first fragment decides it (then
    /// [`Engine::take_released`] hands it out, or it is dropped).
    Held,
}

/// The filter's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub conntrack_size: usize,
    pub timeouts: Timeouts,
    pub new_flows_per_second_per_source: u32,
    pub new_flow_burst_per_source: u32,
    /// EtherTypes other than IP, ARP and 802.1Q that may pass.
    pub allow_ethertypes: Vec<u16>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            conntrack_size: 262_144,
            timeouts: Timeouts::default(),
            new_flows_per_second_per_source: 1000,
            new_flow_burst_per_source: 2000,
            allow_ethertypes: Vec::new(),
        }
    }
}

/// What a drop summary sums over: one destination and service from one
/// source; past the flows one interval itemises, everything from one
/// source; past the sources too (and for frames that name no flow: a
/// malformed frame, another EtherType), everything that arrived on the port
/// for that reason. No drop goes unrecorded, and the map stays bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum DropKey {
    /// A flow key, and for drops the policy decided, the generation of the
    /// policy that decided them (`u64::MAX` for others): drops before and
    /// after a reload are summed apart, each under its own rule.
    Flow(FlowKey, u64),
    Source(IpAddr),
    All,
}

#[derive(Debug, Default)]
struct DropAgg {
    /// For drops the policy decided: the rule and policy that decided the
    /// first, taken when it was dropped (a reload before the summary is
    /// written must not rename it).
    rule: Option<(String, String)>,
    packets: u64,
    bytes: u64,
    first: Option<Timestamp>,
    last: Option<Timestamp>,
}

/// Counters an operator reads.
#[derive(Debug, Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    /// Frames decided `Forward` that the other port did not take.
    pub tx_errors: AtomicU64,
    pub rx_errors: AtomicU64,
    /// Flows handed to the kernel fast path, in all and now.
    pub offloaded: AtomicU64,
    pub offloaded_now: AtomicU64,
    /// Flows the fast path did not take (its map full, say).
    pub offload_errors: AtomicU64,
    /// Later fragments that came before their first one and were held.
    pub held: AtomicU64,
    pub dropped: [AtomicU64; 14],
    /// Flows admitted per rule id (index) and by the default (last).
    pub rule_hits: Mutex<Vec<u64>>,
}

impl Counters {
    pub fn dropped(&self, r: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.dropped[i].load(Ordering::Relaxed)
    }
}

/// A datagram's fragments: (src, dst, proto, id), as the receiver
/// reassembles them: the protocol for IPv4, none for IPv6 (whose fragment
/// headers may name an extension header rather than the transport).
type FragmentKey = (IpAddr, IpAddr, u8, u32);

fn fragment_key(k: &FlowKey, id: u32) -> FragmentKey {
    let proto = if k.src.is_ipv4() { k.proto } else { 0 };
    (k.src, k.dst, proto, id)
}

/// The decision state the two forwarding threads share.
pub struct Engine {
    policy: ArcSwap<Policy>,
    table: Mutex<ConnTable>,
    /// The verdicts on first fragments, per arrival port, and until when
    /// their later fragments follow them.
    fragments: Mutex<Verdicts>,
    /// Later fragments waiting for their first fragment.
    held: Mutex<Held>,
    /// Held fragments now allowed, per arrival port (edge, onprem).
    released: [Mutex<Vec<Vec<u8>>>; 2],
    /// New flows per source (an IPv4 address or an IPv6 /64).
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    drops: Mutex<HashMap<(DropKey, DropReason, Zone), DropAgg>>,
    last_drop_summary: Mutex<Instant>,
    audit: AuditLog,
    config: EngineConfig,
    origin: Instant,
    fast: Option<FastPorts>,
    pub counters: Counters,
}

/// The kernel fast path and the ports it serves.
struct FastPorts {
    path: offload::FastPath,
    edge: u32,
    onprem: u32,
}

impl FastPorts {
    fn ifindex(&self, z: Zone) -> u32 {
        match z {
            Zone::Edge => self.edge,
            Zone::Onprem => self.onprem,
        }
    }
}

fn reversed(k: &FlowKey) -> FlowKey {
    FlowKey {
        src: k.dst,
        dst: k.src,
        src_port: k.dst_port,
        dst_port: k.src_port,
        proto: k.proto,
    }
}

fn tuple(k: &FlowKey) -> FlowTuple {
    FlowTuple {
        proto: k.proto,
        src_ip: k.src,
        src_port: k.src_port,
        dst_ip: k.dst,
        dst_port: k.dst_port,
    }
}

/// How long later fragments follow their first fragment's verdict (a
/// datagram's fragments cross within milliseconds of each other; as long
/// as a later fragment waits for its first, for reordering either way).
const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Verdicts kept at once, in all, per source address, and per IPv6 /64:
/// one host that sends first fragments in a flood fills its own share, not
/// the table every other host's fragments need (8 192 per source lets a
/// host send about 4 000 fragmented datagrams a second), and one that hops
/// between the addresses of its /64 fills the /64's larger share. A /64 is
/// a whole LAN as often as a host, so the per-address share is the one
/// that keeps one host from the others.
const MAX_FRAGMENT_ENTRIES: usize = 65_536;
const MAX_FRAGMENT_ENTRIES_PER_SOURCE: usize = 8_192;
const MAX_FRAGMENT_ENTRIES_PER_NET: usize = 32_768;

/// Takes one from a share count, forgetting it at zero.
fn release_share(shares: &mut HashMap<IpAddr, usize>, key: &IpAddr) {
    if let Some(n) = shares.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            shares.remove(key);
        }
    }
}

/// The verdicts on first fragments, per arrival port, and until when their
/// later fragments follow them; bounded in all and per source.
#[derive(Default)]
struct Verdicts {
    /// Forwarded or not, until when, and the offset below which a later
    /// fragment overlaps the first (IPv6; 0 for IPv4).
    map: HashMap<(Zone, FragmentKey), (bool, Duration, u16)>,
    /// Verdicts held per source address, and per IPv6 /64.
    per_source: HashMap<IpAddr, usize>,
    per_net: HashMap<IpAddr, usize>,
}

impl Verdicts {
    /// The verdict on a datagram still in force at `now`: forwarded or
    /// not, and the offset below which a later fragment overlaps.
    fn get(&self, k: &(Zone, FragmentKey), now: Duration) -> Option<(bool, u16)> {
        self.map
            .get(k)
            .filter(|(_, until, _)| *until > now)
            .map(|(v, _, bound)| (*v, *bound))
    }

    /// Notes a verdict, unless the table or the source's share is full
    /// (then the datagram's later fragments wait, and drop). Later
    /// fragments that start below `bound` overlap the first one.
    fn note(&mut self, k: (Zone, FragmentKey), forwarded: bool, until: Duration, bound: u16) {
        if let Some(v) = self.map.get_mut(&k) {
            // A bound is never lowered: a later fragment allowed past it
            // could land in the header an earlier first fragment carried.
            *v = (forwarded, until, v.2.max(bound));
            return;
        }
        let source = k.1 .0;
        let net = source.is_ipv6().then(|| rate_key(source));
        if self.has_room(source) {
            self.map.insert(k, (forwarded, until, bound));
            *self.per_source.entry(source).or_default() += 1;
            if let Some(n) = net {
                *self.per_net.entry(n).or_default() += 1;
            }
        }
    }

    /// Whether a new verdict from `source` would be noted: the table and
    /// the source's shares have room.
    fn has_room(&self, source: IpAddr) -> bool {
        let held =
            |shares: &HashMap<IpAddr, usize>, key: &IpAddr| shares.get(key).copied().unwrap_or(0);
        self.map.len() < MAX_FRAGMENT_ENTRIES
            && held(&self.per_source, &source) < MAX_FRAGMENT_ENTRIES_PER_SOURCE
            && (!source.is_ipv6()
                || held(&self.per_net, &rate_key(source)) < MAX_FRAGMENT_ENTRIES_PER_NET)
    }

    /// Forgets the verdicts whose time is up by `now`.
    fn expire(&mut self, now: Duration) {
        let (per_source, per_net) = (&mut self.per_source, &mut self.per_net);
        self.map.retain(|(_, fk), (_, until, _)| {
            let keep = *until > now;
            if !keep {
                release_share(per_source, &fk.0);
                if fk.0.is_ipv6() {
                    release_share(per_net, &rate_key(fk.0));
                }
            }
            keep
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}
/// How long a later fragment waits for its first one.
const FRAGMENT_HOLD: Duration = Duration::from_secs(2);
/// Bytes held in all, per source, and frames per datagram: a source that
/// sends fragments whose first never comes fills its own share, and past
/// the bounds early fragments are dropped as they were before holding.
const MAX_HELD_BYTES: usize = 4 << 20;
const MAX_HELD_BYTES_PER_SOURCE: usize = 256 << 10;
const MAX_HELD_PER_DATAGRAM: usize = 64;
/// What a held frame costs beyond its bytes (its vector), and what a
/// datagram waiting costs (its map entry and list).
const HELD_OVERHEAD: usize = 64;
const WAITING_OVERHEAD: usize = 192;

/// One datagram's later fragments that came before its first fragment.
struct Waiting {
    /// The first held fragment's key (ports zero: a later fragment has
    /// none), for drop summaries.
    key: FlowKey,
    since: Duration,
    /// Each frame with its offset in the datagram's fragmentable part.
    frames: Vec<(Vec<u8>, u16)>,
    bytes: usize,
}

/// Later fragments waiting for their first fragment, bounded in bytes in
/// all and per source, and in frames per datagram.
#[derive(Default)]
struct Held {
    waiting: HashMap<(Zone, FragmentKey), Waiting>,
    bytes: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl Held {
    /// Keeps a copy of `frame` (a later fragment starting at `offset`), if
    /// the bounds allow.
    fn keep(
        &mut self,
        ingress: Zone,
        fk: FragmentKey,
        key: &FlowKey,
        (frame, offset): (&[u8], u16),
        now: Duration,
    ) -> bool {
        let new = !self.waiting.contains_key(&(ingress, fk));
        let cost = frame.len() + HELD_OVERHEAD + if new { WAITING_OVERHEAD } else { 0 };
        // A source's share is its address's for IPv4 and its /64's for
        // IPv6, as the new-flow limit counts it.
        let src = rate_key(fk.0);
        let source = self.per_source.get(&src).copied().unwrap_or(0);
        if self.bytes + cost > MAX_HELD_BYTES || source + cost > MAX_HELD_BYTES_PER_SOURCE {
            return false;
        }
        let w = self
            .waiting
            .entry((ingress, fk))
            .or_insert_with(|| Waiting {
                key: *key,
                since: now,
                frames: Vec::new(),
                bytes: 0,
            });
        if w.frames.len() >= MAX_HELD_PER_DATAGRAM {
            return false;
        }
        w.frames.push((frame.to_vec(), offset));
        w.bytes += cost;
        self.bytes += cost;
        *self.per_source.entry(src).or_default() += cost;
        true
    }

    fn take(&mut self, ingress: Zone, fk: &FragmentKey) -> Option<Waiting> {
        let w = self.waiting.remove(&(ingress, *fk))?;
        self.unaccount(fk.0, w.bytes);
        Some(w)
    }

    /// Removes the datagrams that waited [`FRAGMENT_HOLD`] by `now`.
    fn expire(&mut self, now: Duration) -> Vec<(Zone, Waiting)> {
        let late: Vec<(Zone, FragmentKey)> = self
            .waiting
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.since) >= FRAGMENT_HOLD || now == Duration::MAX)
            .map(|(k, _)| *k)
            .collect();
        late.into_iter()
            .filter_map(|(z, fk)| Some((z, self.take(z, &fk)?)))
            .collect()
    }

    fn unaccount(&mut self, src: IpAddr, bytes: usize) {
        let src = rate_key(src);
        self.bytes -= bytes;
        if let Some(n) = self.per_source.get_mut(&src) {
            *n -= bytes;
            if *n == 0 {
                self.per_source.remove(&src);
            }
        }
    }
}
/// Flow keys itemised in one drop summary interval, and sources
/// summarised past them.
const MAX_DROP_KEYS: usize = 4096;
const MAX_DROP_SOURCES: usize = 4096;
/// How often drop summaries are written.
const DROP_SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// The key under which drops past the itemised ones are summarised for
/// their source: no destination, protocol or ports.
fn per_source_key(src: IpAddr) -> FlowKey {
    FlowKey {
        src,
        dst: match src {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        },
        proto: 0,
        src_port: 0,
        dst_port: 0,
    }
}
/// Most sources the new-flow rate limiter remembers at once.
const MAX_LIMITER_SOURCES: usize = 262_144;

/// The rate limiter's key for a source: the address for IPv4, the /64 for
/// IPv6 (one host can use a whole /64, and would otherwise get one budget
/// per address).
fn rate_key(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => a,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

impl Engine {
    pub fn new(policy: Policy, audit: AuditLog, config: EngineConfig) -> Engine {
        let rate =
            NonZeroU32::new(config.new_flows_per_second_per_source).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.new_flow_burst_per_source).unwrap_or(NonZeroU32::MIN);
        let rules = policy.rules().len();
        Engine {
            policy: ArcSwap::from_pointee(policy),
            table: Mutex::new(ConnTable::new(config.conntrack_size, config.timeouts)),
            fragments: Mutex::new(Verdicts::default()),
            held: Mutex::new(Held::default()),
            released: Default::default(),
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            drops: Mutex::new(HashMap::new()),
            last_drop_summary: Mutex::new(Instant::now()),
            audit,
            config,
            origin: Instant::now(),
            fast: None,
            counters: Counters {
                rule_hits: Mutex::new(vec![0; rules + 1]),
                ..Counters::default()
            },
        }
    }

    /// Hands established flows to `path`, whose ingress programs sit on the
    /// ports with interface indexes `edge` and `onprem`.
    pub fn set_fast_path(&mut self, path: offload::FastPath, edge: u32, onprem: u32) {
        self.fast = Some(FastPorts { path, edge, onprem });
    }

    /// Frames and bytes the kernel fast path forwarded, when it is on.
    pub fn fast_path_totals(&self) -> Option<(u64, u64)> {
        self.fast.as_ref()?.path.totals().ok()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Swaps in a compiled policy. Tracked flows are re-checked at their
    /// next packet: offloaded flows are withdrawn from the kernel (after the
    /// swap, so none is offloaded again under the old policy) for their
    /// next packet to reach palisade.
    pub fn set_policy(&self, p: Policy) {
        // The count vector and the policy in force change together, under
        // the counts' lock: a count taken under that lock is numbered as
        // the policy then in force numbers its rules.
        let mut hits = self.counters.rule_hits.lock();
        let old = self.policy.load_full();
        // Counts follow their rule by name (a reload may reorder rules);
        // the default's count stays the default's.
        if let Ok(h) = hits.as_mut() {
            let by_name: HashMap<&str, u64> = old
                .rules()
                .iter()
                .zip(h.iter())
                .map(|(r, n)| (r.name.as_str(), *n))
                .collect();
            let default = h.last().copied().unwrap_or(0);
            let mut counts: Vec<u64> = p
                .rules()
                .iter()
                .map(|r| by_name.get(r.name.as_str()).copied().unwrap_or(0))
                .collect();
            counts.push(default);
            **h = counts;
        }
        // Flows decided under a policy that decides otherwise are decided
        // again at their next packet (a new text, or a rule that expired).
        let unchanged = old.decides_as(&p);
        let generation = if unchanged {
            old.generation()
        } else {
            old.generation() + 1
        };
        self.policy.store(Arc::new(p.with_generation(generation)));
        drop(hits);
        if self.fast.is_none() || unchanged {
            return;
        }
        // A few hundred flows per hold of the table, so that forwarding
        // goes on between them.
        let keys: Vec<ConnKey> = match self.table.lock() {
            Ok(t) => t.offloaded(),
            Err(_) => return,
        };
        for chunk in keys.chunks(256) {
            if let Ok(mut t) = self.table.lock() {
                for k in chunk {
                    if let Some(f) = t.get_mut(k) {
                        self.withdraw(f);
                    }
                }
            }
        }
    }

    /// The engine's time of a kernel timestamp (monotonic clock).
    fn kernel_time(&self, t: Duration) -> Option<Duration> {
        if t.is_zero() {
            return None;
        }
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        Some(self.now().saturating_sub(mono.saturating_sub(t)))
    }

    /// Hands a flow that needs no more decisions to the kernel: TCP once
    /// established, UDP once palisade saw a reply. Only where palisade's own
    /// checks would pass every frame the kernel entries match: the policy
    /// in force admitted the flow (called under the table lock, so a reload
    /// either sees this flow offloaded and withdraws it, or was already in
    /// force here), and the flow's source and destination lie in the zones
    /// of the ports their frames arrive on.
    fn offload(&self, flow: &mut Flow) {
        let Some(fp) = &self.fast else { return };
        let ready = matches!(
            (flow.key.proto, flow.state),
            (6, State::Tcp(TcpState::Established)) | (17, State::Datagram { replied: true })
        );
        if flow.offloaded.is_some() || flow.offload_refused || !ready {
            return;
        }
        let policy = self.policy.load();
        if flow.generation != policy.generation() {
            return;
        }
        let zones = policy.zones();
        let (Some(from), Some(to)) = (zones.zone_of(flow.key.src), zones.zone_of(flow.key.dst))
        else {
            return;
        };
        if from == to {
            return;
        }
        let (a, b) = (fp.ifindex(from), fp.ifindex(to));
        let rev = reversed(&flow.key);
        match fp
            .path
            .insert(a, &flow.key, b)
            .and_then(|_| fp.path.insert(b, &rev, a))
        {
            Ok(()) => {
                flow.offloaded = Some((a, b));
                self.counters.offloaded.fetch_add(1, Ordering::Relaxed);
                self.counters.offloaded_now.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // Its map full, say: the flow stays with palisade.
                if let Ok(Some(f)) = fp.path.remove(a, &flow.key) {
                    flow.original.packets += f.packets;
                    flow.original.bytes += f.bytes;
                }
                flow.offload_refused = true;
                self.counters.offload_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes a flow back from the kernel, adding what the kernel forwarded
    /// to its counts.
    fn withdraw(&self, flow: &mut Flow) {
        let (Some(fp), Some((a, b))) = (&self.fast, flow.offloaded.take()) else {
            return;
        };
        self.counters.offloaded_now.fetch_sub(1, Ordering::Relaxed);
        let rev = reversed(&flow.key);
        for (port, key, counts) in [
            (a, &flow.key, &mut flow.original),
            (b, &rev, &mut flow.reply),
        ] {
            match fp.path.remove(port, key) {
                Ok(Some(f)) => {
                    counts.packets += f.packets;
                    counts.bytes += f.bytes;
                    if let Some(t) = self.kernel_time(f.last) {
                        flow.last_seen = flow.last_seen.max(t);
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    self.counters.offload_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// When the kernel last forwarded a frame of an offloaded flow.
    fn kernel_last_seen(&self, flow: &Flow) -> Option<Duration> {
        let (fp, (a, b)) = (self.fast.as_ref()?, flow.offloaded?);
        let rev = reversed(&flow.key);
        [(a, &flow.key), (b, &rev)]
            .into_iter()
            .filter_map(|(port, key)| fp.path.read(port, key).ok().flatten())
            .filter_map(|f| self.kernel_time(f.last))
            .max()
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub fn conntrack_len(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Counts a drop, and summarises it in the trail per flow key, reason
    /// and arrival port.
    fn drop(&self, r: DropReason, port: Zone, key: Option<&FlowKey>, bytes: usize) -> Disposition {
        self.drop_decided(r, port, key, None, bytes)
    }

    /// [`Engine::drop`], for a drop the policy decided: `denied_by` is the
    /// deciding rule's name, its policy's sha256 and generation, as decided
    /// (a reload after the decision must not rename it).
    fn drop_decided(
        &self,
        r: DropReason,
        port: Zone,
        key: Option<&FlowKey>,
        denied_by: Option<(&str, &str, u64)>,
        bytes: usize,
    ) -> Disposition {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.counters.dropped[i].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut drops) = self.drops.lock() {
            let k = match key {
                Some(k) => {
                    // Per destination and service: a client's new source
                    // port for every attempt is not a new key (ICMP keeps
                    // its type).
                    let mut flow = *k;
                    if !matches!(flow.proto, 1 | 58) {
                        flow.src_port = 0;
                    }
                    let decided_in = denied_by.map_or(u64::MAX, |(_, _, g)| g);
                    let itemised = (DropKey::Flow(flow, decided_in), r, port);
                    // Past the keys one interval itemises (a scan of ports
                    // or addresses), drops are summarised per source; past
                    // the sources (a flood from ever new ones), for all.
                    let per_source = (DropKey::Source(rate_key(k.src)), r, port);
                    if drops.len() < MAX_DROP_KEYS || drops.contains_key(&itemised) {
                        itemised
                    } else if drops.len() < MAX_DROP_KEYS + MAX_DROP_SOURCES
                        || drops.contains_key(&per_source)
                    {
                        per_source
                    } else {
                        (DropKey::All, r, port)
                    }
                }
                None => (DropKey::All, r, port),
            };
            let itemised = matches!(k.0, DropKey::Flow(..));
            let a = drops.entry(k).or_default();
            // A rule decided only the drops the policy made; the others
            // (spoofed, no state, limits) name none.
            if a.packets == 0 && itemised {
                a.rule = denied_by.map(|(rule, sha, _)| (rule.to_string(), sha.to_string()));
            }
            a.packets += 1;
            a.bytes += bytes as u64;
            let now = Timestamp::now();
            a.first.get_or_insert(now);
            a.last = Some(now);
        }
        Disposition::Drop(r)
    }

    /// Decides one frame that arrived on `ingress`.
    pub fn handle(&self, ingress: Zone, frame: &[u8]) -> Disposition {
        self.handle_frame(ingress, frame, (1, 0))
    }

    /// Decides one frame that arrived on `ingress` and that carries
    /// `segments.0` packets, each with `segments.1` bytes of headers from
    /// the frame's start (a segment-offload super-frame; `(1, 0)` for an
    /// ordinary frame), so that flows count the packets the wire carries.
    pub fn handle_frame(&self, ingress: Zone, frame: &[u8], segments: (u64, usize)) -> Disposition {
        let parsed = match packet::parse(frame) {
            Ok(f) => f,
            Err(_) => return self.drop(DropReason::Malformed, ingress, None, frame.len()),
        };
        let ip = match parsed.payload {
            Payload::Arp => return self.forward(),
            Payload::Other => {
                return if self.config.allow_ethertypes.contains(&parsed.ethertype) {
                    self.forward()
                } else {
                    self.drop(DropReason::NonIp, ingress, None, frame.len())
                }
            }
            Payload::Ip(ip) => ip,
        };
        let tagged = parsed.vlan.is_some();
        // An IPv6 datagram's fragments must not overlap (RFC 5722): its
        // later fragments start where the first one's data ends, or after.
        // (IPv4 ones may overlap past the transport header; see below.)
        let first = match ip.fragment {
            Fragment::First { id, end } => Some((
                fragment_key(&ip.key, id),
                if ip.key.src.is_ipv6() { end } else { 0 },
            )),
            _ => None,
        };
        // An ICMP error passes for the header it quotes, which its first
        // fragment holds: the rest of it, never seen, does not follow.
        let icmp_error = matches!(ip.icmp, Some(IcmpKind::Error { .. }));
        let d = self.judge(ingress, frame, ip, tagged, segments);
        // The verdict on a first fragment is noted for its later fragments,
        // and those that came before it follow it now; but only once the
        // datagram was judged: a first fragment dropped before (spoofed,
        // malformed, cut short) says nothing about the datagram it names,
        // whose own first fragment may still come.
        if let Some((fk, bound)) = first {
            match d {
                Disposition::Forward => self.settle_held(ingress, fk, !icmp_error, bound),
                Disposition::Drop(r) if r.judges_the_datagram() => {
                    self.settle_held(ingress, fk, false, bound)
                }
                _ => {}
            }
        }
        d
    }

    /// Decides one IP packet (the frame `frame`, 802.1Q-tagged or not).
    fn judge(
        &self,
        ingress: Zone,
        frame: &[u8],
        ip: packet::IpPacket,
        tagged: bool,
        segments: (u64, usize),
    ) -> Disposition {
        let key = ip.key;
        // A drop of this packet, summarised under its key and port.
        let refuse = |r: DropReason| self.drop(r, ingress, Some(&key), frame.len());
        let refuse_by = |r: DropReason, policy: &Policy, rule: Option<RuleId>| {
            let denied_by = (policy.rule_name(rule), policy.sha256(), policy.generation());
            self.drop_decided(r, ingress, Some(&key), Some(denied_by), frame.len())
        };
        // A route the sender chose is not forwarded (RFC 5095; RFC 7126).
        if ip.source_routed {
            return refuse(DropReason::SourceRouted);
        }
        let policy = self.policy.load();
        // Neighbour discovery and multicast listener discovery (valid per
        // RFC 4861 and 3810: see the parser) pass like ARP when they stay
        // on the link: to a link-local or link-scope multicast address or
        // to an address of either zone, from a link-local or unspecified
        // source or one of the port's zone. Sent anywhere else they are
        // ordinary ICMPv6, which the policy judges.
        let link_control = ip.icmp == Some(IcmpKind::NeighborDiscovery)
            && match key.dst {
                IpAddr::V6(a) => {
                    a.is_unicast_link_local()
                        || a.segments()[0] == 0xff02
                        || policy.zones().zone_of(key.dst).is_some()
                }
                IpAddr::V4(_) => false,
            };
        let link_local =
            matches!(key.src, IpAddr::V6(a) if a.is_unspecified() || a.is_unicast_link_local());
        if link_control && link_local {
            return self.forward();
        }
        if policy.zones().zone_of(key.src) != Some(ingress) {
            return refuse(DropReason::Spoofed);
        }
        if link_control {
            return self.forward();
        }
        // A first fragment must hold the whole transport header (RFC 8200
        // section 4.5; RFC 1858 for IPv4): the ports are what the policy
        // judges, and a later fragment must not supply them.
        if matches!(ip.fragment, Fragment::First { .. }) && !ip.transport_complete {
            return refuse(DropReason::IncompleteFirstFragment);
        }
        let now = self.now();
        // A second first fragment of an IPv6 datagram overlaps the first
        // (RFC 5722), and one that carried less would lower the bound the
        // later fragments are held to; so an IPv6 first fragment passes
        // only if its verdict can be noted (else a second one would find
        // none: a source that filled its share sends no more first
        // fragments until its verdicts expire).
        if let Fragment::First { id, .. } = ip.fragment {
            if key.src.is_ipv6() {
                let fk = fragment_key(&key, id);
                let (seen, room) = match self.fragments.lock() {
                    Ok(f) => (f.get(&(ingress, fk), now).is_some(), f.has_room(key.src)),
                    Err(_) => (false, false),
                };
                if seen {
                    return refuse(DropReason::OverlappingFragment);
                }
                if !room {
                    return refuse(DropReason::TableFull);
                }
            }
        }
        let (packets, hdrs) = segments;
        let bytes = if packets > 1 {
            // Each further segment repeats the IP and transport headers.
            let link = frame.len().saturating_sub(ip.ip_len);
            (ip.ip_len + (packets as usize - 1) * hdrs.saturating_sub(link)) as u64
        } else {
            ip.ip_len as u64
        };

        // Later fragments follow their first fragment; one that comes
        // before it waits for it a moment (paths reorder, and some senders
        // send a datagram's fragments last first).
        if let Fragment::Later { id, offset } = ip.fragment {
            // One that would rewrite the transport header the first
            // fragment's verdict was on never passes (RFC 1858).
            // An IPv6 datagram's fragments may each name another next
            // header (RFC 8200 section 4.5) and the receiver takes the
            // first's, so every IPv6 one is held to TCP's bound; and an
            // IPv6 one that starts inside the first fragment's data (where
            // extension headers after the Fragment header put the
            // transport header further in) overlaps it (RFC 5722), checked
            // once the first fragment's length is known.
            let proto = if key.src.is_ipv6() { 6 } else { key.proto };
            if ip.fragment.overlaps_transport_header(proto) {
                return refuse(DropReason::OverlappingFragment);
            }
            let fk = fragment_key(&key, id);
            let known = self
                .fragments
                .lock()
                .ok()
                .and_then(|f| f.get(&(ingress, fk), now));
            return match known {
                Some((_, bound)) if offset < bound => refuse(DropReason::OverlappingFragment),
                Some((true, _)) => self.forward(),
                Some((false, _)) => refuse(DropReason::Fragment),
                None => self.hold(ingress, fk, &key, (frame, offset), now),
            };
        }

        let echo_id = match ip.icmp {
            Some(IcmpKind::Echo { id, .. }) => Some(id),
            _ => None,
        };
        let ck = ConnKey::of(&key, echo_id);
        let mut table = match self.table.lock() {
            Ok(t) => t,
            Err(_) => return refuse(DropReason::NoState),
        };
        // A SYN on the addresses and ports of a connection that closed
        // (RST or FIN both ways) and still lingers in the table opens a new
        // connection: the old one ends here with its record, and the new
        // one is decided and recorded like any other.
        let syn_only = packet::tcp_flags::opens(ip.tcp_flags);
        if key.proto == 6 && syn_only {
            let closed = match table.find(&ck, now) {
                Some((f, dir)) if f.state == State::Tcp(TcpState::Closed) => Some(ck.original(dir)),
                _ => None,
            };
            if let Some(ended) = closed.and_then(|k| table.remove(&k, EndReason::Closed)) {
                drop(table);
                self.record_end(ended);
                table = match self.table.lock() {
                    Ok(t) => t,
                    Err(_) => return refuse(DropReason::NoState),
                };
            }
        }
        if let Some((flow, dir)) = table.find(&ck, now) {
            // SYN with FIN or RST belongs to no connection, and some stacks
            // read it as a SYN: it must not ride a lingering flow.
            if key.proto == 6 && packet::tcp_flags::contradictory(ip.tcp_flags) {
                return refuse(DropReason::NoState);
            }
            // An echo flow carries requests one way and replies the other:
            // a request from the far side (or a reply from the near one)
            // is not part of it. (Two pings that pick one identifier
            // between the same two hosts in opposite directions cannot be
            // told apart: the later one waits for the first to expire.)
            if let Some(IcmpKind::Echo { request, .. }) = ip.icmp {
                if request != (dir == Direction::Original) {
                    return refuse(DropReason::NoState);
                }
            }
            // A flow admitted under another policy is re-checked once.
            if flow.generation != policy.generation() {
                let original = flow.key;
                let d = policy.decide(&original);
                let original_ck = ck.original(dir);
                if d.verdict == Verdict::Deny {
                    if let Some(ended) = table.remove(&original_ck, EndReason::Revoked) {
                        drop(table);
                        self.record_cut(ended, &policy, d.rule);
                    }
                    return refuse_by(DropReason::Revoked, &policy, d.rule);
                }
                table.readmit(
                    &original_ck,
                    policy.sha256().into(),
                    policy.generation(),
                    d.rule,
                    policy.rule_name(d.rule).into(),
                );
            }
            let state = table.update(&ck, dir, ip.tcp_flags, (packets, bytes), now);
            if self.fast.is_some() && !tagged {
                let original_ck = ck.original(dir);
                if let Some(flow) = table.get_mut(&original_ck) {
                    if state == Some(State::Tcp(TcpState::Closed)) {
                        // What follows a close is palisade's to see.
                        self.withdraw(flow);
                    } else {
                        self.offload(flow);
                    }
                }
            }
            drop(table);
            return self.forward();
        }
        // An ICMP error about a tracked flow is related traffic.
        // It must go back to the sender of the packet it quotes: an error
        // addressed anywhere else carries bytes past the policy.
        if let Some(IcmpKind::Error { about }) = ip.icmp {
            let related = ConnKey::of(&about, None);
            if about.src == key.dst && table.find(&related, now).is_some() {
                return self.forward();
            }
            return refuse(DropReason::NoState);
        }
        // A new flow. TCP flows start with their opening segment only
        // (SYN, not with FIN or RST).
        if key.proto == 6 && (!ip.transport_complete || !syn_only) {
            return refuse(DropReason::NoState);
        }
        if matches!(ip.icmp, Some(IcmpKind::Echo { request: false, .. })) {
            return refuse(DropReason::NoState);
        }
        // Past the limiter's bound (a flood from ever new sources), new
        // flows wait for housekeeping to forget the idle sources.
        if self.limiter.len() >= MAX_LIMITER_SOURCES
            || self.limiter.check_key(&rate_key(key.src)).is_err()
        {
            return refuse(DropReason::RateLimited);
        }
        let d = policy.decide(&key);
        if d.verdict == Verdict::Deny {
            drop(table);
            return refuse_by(DropReason::Denied, &policy, d.rule);
        }
        if self.audit.admit().is_err() {
            return refuse(DropReason::AuditUnavailable);
        }
        // An expired flow in the new one's place ends first, with its record.
        let expired = table.take_expired(&ck, now);
        let inserted = table.insert(
            NewFlow {
                key,
                echo_id,
                rule: d.rule,
                rule_name: policy.rule_name(d.rule).into(),
                policy: policy.sha256().into(),
                generation: policy.generation(),
                tcp_flags: ip.tcp_flags,
                packets,
                bytes,
            },
            now,
        );
        // Under the table lock until the flow's start record is queued: the
        // ends of the flows it replaced first, then its start. Where the
        // trail is fail-closed, a flow it cannot record (its queue full) is
        // taken out again before any of its packets passes, and the
        // writer's gap record counts it as refused.
        for e in expired {
            self.record_end(e);
        }
        let table_key = match inserted {
            Ok((k, evicted)) => {
                if let Some(e) = evicted {
                    self.record_end(e);
                }
                k
            }
            Err(_) => {
                drop(table);
                return refuse(DropReason::TableFull);
            }
        };
        let ev = AuditEvent::flow_start(Action::Allowed, &tuple(&key))
            .with_rule(policy.rule_name(d.rule), policy.sha256())
            .with_reason(format!("arrived on {}", ingress.as_str()));
        if let Err(e) = self.audit.try_record(&ev) {
            if e.refuses_flow() {
                table.remove(&table_key, EndReason::Revoked);
                drop(table);
                return refuse(DropReason::AuditUnavailable);
            }
        }
        drop(table);
        self.count_hit(&policy, d.rule);
        self.forward()
    }

    /// Counts a flow admitted by `rule` (the default when `None`) of
    /// `decided_by`. A reload between the decision and this count renumbers
    /// the counts: then the count goes to the rule of the same name in the
    /// policy now in force, or nowhere if it has none.
    fn count_hit(&self, decided_by: &Policy, rule: Option<u32>) {
        let Ok(mut hits) = self.counters.rule_hits.lock() else {
            return;
        };
        let now = self.policy.load();
        let i = match rule {
            None => hits.len().checked_sub(1),
            Some(r) if std::ptr::eq(&**now, decided_by) => Some(r as usize),
            Some(r) => {
                let name = decided_by.rule_name(Some(r));
                now.rules().iter().position(|x| x.name == name)
            }
        };
        if let Some(h) = i.and_then(|i| hits.get_mut(i)) {
            *h += 1;
        }
    }

    fn forward(&self) -> Disposition {
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        Disposition::Forward
    }

    /// Keeps a later fragment whose first fragment has not come yet, for
    /// at most [`FRAGMENT_HOLD`], within the bounds of [`Held`].
    fn hold(
        &self,
        ingress: Zone,
        fk: FragmentKey,
        key: &FlowKey,
        (frame, offset): (&[u8], u16),
        now: Duration,
    ) -> Disposition {
        let kept = self
            .held
            .lock()
            .is_ok_and(|mut h| h.keep(ingress, fk, key, (frame, offset), now));
        if kept {
            self.counters.held.fetch_add(1, Ordering::Relaxed);
            Disposition::Held
        } else {
            self.drop(DropReason::Fragment, ingress, Some(key), frame.len())
        }
    }

    /// Notes the verdict on a datagram's first fragment for its later
    /// fragments, and passes or drops those that came before it. Later
    /// fragments that start below `bound` overlap the first and never pass.
    fn settle_held(&self, ingress: Zone, fk: FragmentKey, forwarded: bool, bound: u16) {
        let now = self.now();
        // Full (housekeeping removes the expired ones every 200 ms): the
        // datagram's later fragments wait, then drop.
        if let Ok(mut frags) = self.fragments.lock() {
            frags.note((ingress, fk), forwarded, now + FRAGMENT_TIMEOUT, bound);
        }
        let Some(waiting) = self.held.lock().ok().and_then(|mut h| h.take(ingress, &fk)) else {
            return;
        };
        let mut pass = Vec::new();
        for (f, offset) in waiting.frames {
            let reason = if offset < bound {
                DropReason::OverlappingFragment
            } else if forwarded {
                pass.push(f);
                continue;
            } else {
                DropReason::Fragment
            };
            self.drop(reason, ingress, Some(&waiting.key), f.len());
        }
        if !pass.is_empty() {
            // Counted as forwarded when the forwarding loop sends them.
            if let Ok(mut out) = self.released[ingress as usize].lock() {
                out.extend(pass);
            }
        }
    }

    /// Held fragments that arrived on `ingress` and may now pass, in
    /// arrival order after their first fragment: the forwarding loop sends
    /// them after the batch that carried it.
    pub fn take_released(&self, ingress: Zone) -> Vec<Vec<u8>> {
        self.released[ingress as usize]
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// Drops held fragments whose first fragment did not come in time (all
    /// of them at `Duration::MAX`).
    fn expire_held(&self, now: Duration) {
        let gone = self
            .held
            .lock()
            .map(|mut h| h.expire(now))
            .unwrap_or_default();
        for (ingress, d) in gone {
            for (f, _) in d.frames {
                self.drop(DropReason::Fragment, ingress, Some(&d.key), f.len());
            }
        }
    }

    fn record_end(&self, e: Ended) {
        self.record_end_by(e, None);
    }

    /// The record of a flow that `policy`'s `rule` cut (it no longer
    /// allows the flow), named by that decision.
    fn record_cut(&self, e: Ended, policy: &Policy, rule: Option<RuleId>) {
        self.record_end_by(e, Some((policy.rule_name(rule), policy.sha256())));
    }

    /// A flow's `flow_end` record; a cut one is `denied` under the rule
    /// and policy in `cut_by`.
    fn record_end_by(&self, mut e: Ended, cut_by: Option<(&str, &str)>) {
        self.withdraw(&mut e.flow);
        let f = &e.flow;
        // The engine's clock to wall-clock time, from one reading of each,
        // so that a flow's start is never after its end.
        let (wall, engine) = (std::time::SystemTime::now(), self.now());
        let wall_clock = |at: Duration| Timestamp::from_system(wall - engine.saturating_sub(at));
        let mut ev = AuditEvent::flow_end(
            &tuple(&f.key),
            Traffic {
                packets: f.original.packets,
                bytes: f.original.bytes,
            },
            Traffic {
                packets: f.reply.packets,
                bytes: f.reply.bytes,
            },
            f.last_seen.saturating_sub(f.created),
        )
        .with_rule(&*f.rule_name, &f.policy)
        .with_start(wall_clock(f.created))
        .with_end(wall_clock(f.last_seen))
        .with_reason(match e.why {
            EndReason::Timeout => "timed out",
            EndReason::Closed => "closed",
            EndReason::Evicted => "evicted from a full connection table",
            EndReason::Revoked => "cut: the reloaded policy no longer allows it",
            EndReason::Stopped => "the filter stopped",
        });
        if let (EndReason::Revoked, Some((rule, sha))) = (e.why, cut_by) {
            ev = ev.cut("the reloaded policy no longer allows it", Some(rule), sha);
        }
        let _ = self.audit.try_record(&ev);
    }

    /// Periodic work: expire flows and fragments, forget sources whose
    /// rate budget is full again, write drop summaries.
    pub fn housekeeping(&self) {
        let now = self.now();
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let ended = self
            .table
            .lock()
            .map(|mut t| t.expire_with(now, 10_000, |f| self.kernel_last_seen(f)))
            .unwrap_or_default();
        for e in ended {
            self.record_end(e);
        }
        if let Ok(mut frags) = self.fragments.lock() {
            frags.expire(now);
        }
        self.expire_held(now);
        self.summarise_drops(false);
    }

    /// Writes the drop summaries of the interval that ended (all of them
    /// when `now`).
    fn summarise_drops(&self, now: bool) {
        if let Ok(mut last) = self.last_drop_summary.lock() {
            if !now && last.elapsed() < DROP_SUMMARY_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        let drops: HashMap<(DropKey, DropReason, Zone), DropAgg> = self
            .drops
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        for ((k, why, port), a) in drops {
            let (Some(first), Some(last)) = (a.first, a.last) else {
                continue;
            };
            let (k, reason) = match k {
                DropKey::Flow(f, _) => (f, why.as_str().to_string()),
                DropKey::Source(src) => (
                    per_source_key(src),
                    format!(
                        "{}; to more destinations and ports than one summary itemises, summed for the source (its /64 for IPv6)",
                        why.as_str()
                    ),
                ),
                DropKey::All => (
                    per_source_key(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                    format!(
                        "{}; from more sources than one summary itemises, or in frames that name no flow: summed for all",
                        why.as_str()
                    ),
                ),
            };
            let mut ev = AuditEvent::drop_summary(&tuple(&k), a.packets, a.bytes, first, last)
                .with_reason(reason.clone())
                .with_ingress(port.as_str());
            if let Some((rule, sha)) = &a.rule {
                ev = ev.with_rule(rule, sha);
            }
            let _ = self.audit.try_record(&ev);
        }
    }

    /// Ends every tracked flow (at shutdown) with its record.
    pub fn flush(&self) {
        let ended = self.table.lock().map(|mut t| t.drain()).unwrap_or_default();
        for e in ended {
            self.record_end(e);
        }
        self.housekeeping();
        self.expire_held(Duration::MAX);
        // Released but not sent: the forwarding loops have stopped.
        for z in [Zone::Edge, Zone::Onprem] {
            for f in self.take_released(z) {
                self.drop(DropReason::Fragment, z, None, f.len());
            }
        }
        self.summarise_drops(true);
    }
}

/// Consecutive receive errors after which a port counts as gone.
const MAX_RX_ERRORS: u32 = 100;

/// Moves frames from `rx` (arriving on `ingress`) to `tx` until `stop`,
/// a batch at a time.
/// A frame the other port cannot take (a full queue, a link that is down,
/// a frame over its MTU) is lost as on a wire and counted; a port that keeps
/// failing to receive ends the loop with its error.
pub fn forward_loop(
    engine: &Engine,
    ingress: Zone,
    rx: &mut dyn RxPort,
    tx: &mut dyn TxPort,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut rx_errors = 0;
    while !stop.load(Ordering::Relaxed) {
        let n = match rx.recv(Duration::from_millis(100)) {
            Ok(n) => {
                rx_errors = 0;
                n
            }
            Err(e) => {
                engine.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                rx_errors += 1;
                if rx_errors >= MAX_RX_ERRORS {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Decide the whole batch, then send what passed in one go.
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            match rx.frame(i) {
                None => {
                    engine.drop(DropReason::Oversize, ingress, None, 0);
                }
                Some(f) => {
                    if engine.handle_frame(ingress, f.data, f.segments()) == Disposition::Forward {
                        out.push(f);
                    }
                }
            }
        }
        // Fragments held for a first fragment this batch carried.
        let released = engine.take_released(ingress);
        engine
            .counters
            .forwarded
            .fetch_add(released.len() as u64, Ordering::Relaxed);
        out.extend(released.iter().map(|data| port::Frame {
            data,
            offload: port::Offload::NONE,
        }));
        if !out.is_empty() {
            let lost = tx.send(&out);
            engine
                .counters
                .tx_errors
                .fetch_add(lost as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Runs both directions and the housekeeping until `stop` is set.
pub fn run(
    engine: Arc<Engine>,
    edge: (Box<dyn TxPort>, Box<dyn RxPort>),
    onprem: (Box<dyn TxPort>, Box<dyn RxPort>),
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let (mut edge_tx, mut edge_rx) = edge;
    let (mut onprem_tx, mut onprem_rx) = onprem;
    std::thread::scope(|s| {
        let e1 = engine.clone();
        let st1 = stop.clone();
        let a = s.spawn(move || {
            let r = forward_loop(&e1, Zone::Edge, edge_rx.as_mut(), onprem_tx.as_mut(), &st1);
            st1.store(true, Ordering::Relaxed);
            r
        });
        let e2 = engine.clone();
        let st2 = stop.clone();
        let b = s.spawn(move || {
            let r = forward_loop(
                &e2,
                Zone::Onprem,
                onprem_rx.as_mut(),
                edge_tx.as_mut(),
                &st2,
            );
            st2.store(true, Ordering::Relaxed);
            r
        });
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            engine.housekeeping();
        }
        let ra = a.join().unwrap_or(Ok(()));
        let rb = b.join().unwrap_or(Ok(()));
        engine.flush();
        ra.and(rb)
    })
}

#[cfg(test)]
mod tests {
    use super::port::{mem_wire, Frame, Offload, RxPort, TxPort};
    use super::*;
    use crate::audit::AuditConfig;
    use crate::packet::build;
    use crate::packet::tcp_flags::{ACK, SYN};
    use crate::policy::date::Date;
    use crate::policy::load::compile_str;
    use crate::policy::Options;
    use std::net::Ipv4Addr;

    const POLICY: &str = "\
zone edge   = 192.0.2.0/25
zone onprem = 192.0.2.128/25
rule web allow 192.0.2.0/25 -> 192.0.2.200 service tcp/80
default deny
";

    fn engine(dir: &std::path::Path) -> Engine {
        engine_with(dir, EngineConfig::default())
    }

    fn engine_with(dir: &std::path::Path, config: EngineConfig) -> Engine {
        engine_for(dir, POLICY, config)
    }

    fn compile(text: &str) -> Policy {
        compile_str(
            "t.policy",
            text,
            Options {
                today: Date::new(2026, 1, 1).unwrap(),
            },
        )
        .unwrap_or_else(|_| panic!("policy compiles"))
        .policy
    }

    /// A signed trail in `dir/audit` whose queue holds `queue` records.
    fn open_trail(dir: &std::path::Path, queue: usize) -> AuditLog {
        let key = dir.join("audit.key");
        crate::audit::keys::generate_key_pair(&key, &dir.join("audit.pub")).unwrap();
        AuditLog::open(&AuditConfig {
            dir: dir.join("audit"),
            signing_key: Some(key),
            queue_capacity: queue,
            ..AuditConfig::default()
        })
        .unwrap()
    }

    fn engine_for(dir: &std::path::Path, policy: &str, config: EngineConfig) -> Engine {
        let queue = AuditConfig::default().queue_capacity;
        Engine::new(compile(policy), open_trail(dir, queue), config)
    }

    /// An engine without new-flow limits, writing to a trail whose queue
    /// holds `queue` records, and the trail's handle (to close it).
    fn engine_recording(dir: &std::path::Path, policy: &str, queue: usize) -> (Engine, AuditLog) {
        let audit = open_trail(dir, queue);
        let config = EngineConfig {
            new_flow_burst_per_source: 100_000,
            new_flows_per_second_per_source: 100_000,
            ..EngineConfig::default()
        };
        (Engine::new(compile(policy), audit.clone(), config), audit)
    }

    /// The trail's records of one `event.code`, after it was closed.
    fn trail_records(dir: &std::path::Path, code: &str) -> Vec<serde_json::Value> {
        let needle = format!("\"code\":\"{code}\"");
        std::fs::read_dir(dir.join("audit"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|f| f.file_name().to_string_lossy().ends_with(".jsonl"))
            .flat_map(|f| {
                std::fs::read_to_string(f.path())
                    .unwrap()
                    .lines()
                    .filter(|l| l.contains(&needle))
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
        let mut l4 = build::tcp(sport, dport, flags);
        l4.resize(l4.len() + payload, 0xab);
        build::ipv4(v4(src), v4(dst), 6, &l4, (1, false, 0))
    }

    #[test]
    fn a_batch_is_decided_frame_by_frame_and_sent_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let (mut in_tx, mut in_rx) = mem_wire();
        let (mut out_tx, mut out_rx) = mem_wire();
        let frames = [
            tcp("192.0.2.10", "192.0.2.200", 40000, 80, SYN, 0), // allowed
            tcp("192.0.2.10", "192.0.2.200", 40000, 81, SYN, 0), // denied
            tcp("192.0.2.130", "192.0.2.200", 40001, 80, SYN, 0), // spoofed
            build::arp(),                                        // passes
            tcp("192.0.2.10", "192.0.2.200", 40000, 80, ACK, 10), // tracked
        ];
        let batch: Vec<Frame> = frames
            .iter()
            .map(|f| Frame {
                data: f,
                offload: Offload::NONE,
            })
            .collect();
        assert_eq!(in_tx.send(&batch), 0);
        let stop = AtomicBool::new(false);
        let mut got: Vec<Vec<u8>> = Vec::new();
        std::thread::scope(|s| {
            let looping = s.spawn(|| forward_loop(&e, Zone::Edge, &mut in_rx, &mut out_tx, &stop));
            // Bounded: 20 waits of 100 ms for the three frames that pass.
            for _ in 0..20 {
                let n = out_rx.recv(Duration::from_millis(100)).unwrap();
                got.extend((0..n).map(|i| out_rx.frame(i).unwrap().data.to_vec()));
                if got.len() >= 3 {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
            looping.join().unwrap().unwrap();
        });
        assert_eq!(
            got,
            vec![frames[0].clone(), frames[3].clone(), frames[4].clone()]
        );
        assert_eq!(e.counters.dropped(DropReason::Denied), 1);
        assert_eq!(e.counters.dropped(DropReason::Spoofed), 1);
        assert_eq!(e.counters.forwarded.load(Ordering::Relaxed), 3);
    }

    /// A super-frame: a SYN-opened flow, then one 64-segment TSO frame.
    #[test]
    fn a_super_frame_counts_as_the_packets_the_wire_carries() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let syn = tcp("192.0.2.10", "192.0.2.200", 40000, 80, SYN, 0);
        assert_eq!(e.handle(Zone::Edge, &syn), Disposition::Forward);
        let big = tcp("192.0.2.10", "192.0.2.200", 40000, 80, ACK, 64 * 1000);
        // virtio_net_hdr: NEEDS_CSUM, GSO TCPV4, hdr_len 54, gso_size 1000,
        // csum_start 34 (Ethernet 14 + IPv4 20), csum_offset 16.
        let mut o = Offload::NONE;
        o.0 = [1, 1, 54, 0, 0xe8, 0x03, 34, 0, 16, 0];
        let f = Frame {
            data: &big,
            offload: o,
        };
        assert_eq!(f.segments(), (64, 54));
        assert_eq!(
            e.handle_frame(Zone::Edge, f.data, f.segments()),
            Disposition::Forward
        );
        let t = e.table.lock().unwrap();
        let key = packet::parse(&syn).unwrap();
        let Payload::Ip(ip) = key.payload else {
            panic!()
        };
        let (flow, _) = t.find(&ConnKey::of(&ip.key, None), e.now()).unwrap();
        assert_eq!(flow.original.packets, 1 + 64);
        // The SYN's 40 bytes, then 64 segments of 40 header bytes and 1000
        // payload bytes each.
        assert_eq!(flow.original.bytes, 40 + 64 * 1040);
    }

    /// Later fragments that come before their first fragment wait for
    /// it: they pass right after it when it passes, and are dropped (and
    /// counted) when it is denied or does not come.
    #[test]
    fn early_fragments_wait_for_their_first_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine_for(
            dir.path(),
            "\
zone edge   = 192.0.2.0/25
zone onprem = 192.0.2.128/25
rule dns allow 192.0.2.0/25 -> 192.0.2.200 service udp/53
default deny
",
            EngineConfig::default(),
        );
        let (vnet, peer) = (v4("192.0.2.10"), v4("192.0.2.200"));
        // A 3,000-byte datagram in three fragments, sent last first.
        let fragments = |id: u16, dport: u16| {
            let udp = build::udp(40000, dport, &[0x41; 2992]);
            let part = |from: usize, to: usize| {
                let more = to < udp.len();
                build::ipv4(
                    vnet,
                    peer,
                    17,
                    &udp[from..to],
                    (id, more, (from / 8) as u16),
                )
            };
            [part(0, 1480), part(1480, 2960), part(2960, udp.len())]
        };
        let [first, second, third] = fragments(1, 53);
        assert_eq!(e.handle(Zone::Edge, &third), Disposition::Held);
        assert_eq!(e.handle(Zone::Edge, &second), Disposition::Held);
        assert!(e.take_released(Zone::Edge).is_empty());
        assert_eq!(e.handle(Zone::Edge, &first), Disposition::Forward);
        assert_eq!(
            e.take_released(Zone::Edge),
            vec![third.clone(), second.clone()],
            "the held fragments pass after the first, in their order"
        );
        assert!(e.take_released(Zone::Onprem).is_empty());
        // A duplicate later fragment now follows the known verdict.
        assert_eq!(e.handle(Zone::Edge, &third), Disposition::Forward);

        // A denied datagram's early fragments are dropped with it.
        let [first, second, _] = fragments(2, 54);
        assert_eq!(e.handle(Zone::Edge, &second), Disposition::Held);
        assert_eq!(
            e.handle(Zone::Edge, &first),
            Disposition::Drop(DropReason::Denied)
        );
        assert!(e.take_released(Zone::Edge).is_empty());
        assert_eq!(e.counters.dropped(DropReason::Fragment), 1);

        // Fragments whose first never comes are dropped when their time
        // is up; one arriving after its first fragment's verdict is not
        // held.
        let [_, second, third] = fragments(3, 53);
        assert_eq!(e.handle(Zone::Edge, &second), Disposition::Held);
        assert_eq!(e.handle(Zone::Edge, &third), Disposition::Held);
        e.expire_held(e.now());
        assert_eq!(e.counters.dropped(DropReason::Fragment), 1, "not yet");
        e.expire_held(e.now() + FRAGMENT_HOLD);
        assert_eq!(e.counters.dropped(DropReason::Fragment), 3);
        assert_eq!(e.counters.held.load(Ordering::Relaxed), 5);

        // Bounded: one datagram holds at most MAX_HELD_PER_DATAGRAM
        // frames, one source at most its share of bytes.
        let later = |id: u16, i: usize| {
            build::ipv4(
                vnet,
                peer,
                17,
                &[0u8; 1480],
                (id, true, (185 * (i + 1)) as u16),
            )
        };
        let held = (0..MAX_HELD_PER_DATAGRAM + 1)
            .filter(|i| e.handle(Zone::Edge, &later(4, *i)) == Disposition::Held)
            .count();
        assert_eq!(held, MAX_HELD_PER_DATAGRAM);
        let per_frame = later(5, 0).len() + HELD_OVERHEAD;
        let held = (5..400)
            .filter(|id| e.handle(Zone::Edge, &later(*id, 0)) == Disposition::Held)
            .count();
        let first = MAX_HELD_PER_DATAGRAM * per_frame + WAITING_OVERHEAD;
        assert_eq!(
            held,
            (MAX_HELD_BYTES_PER_SOURCE - first) / (per_frame + WAITING_OVERHEAD),
            "a source holds no more than its share"
        );
        // Another source still has room.
        let other = build::ipv4(v4("192.0.2.11"), peer, 17, &[0u8; 1480], (9, true, 185));
        assert_eq!(e.handle(Zone::Edge, &other), Disposition::Held);
        // A stop drops everything still held, counted.
        let before = e.counters.dropped(DropReason::Fragment);
        e.expire_held(Duration::MAX);
        assert_eq!(
            e.counters.dropped(DropReason::Fragment),
            before + (MAX_HELD_PER_DATAGRAM + held + 1) as u64
        );
    }

    /// One host flooding first fragments (denied ones: no allowed service
    /// needed) fills only its own share of the verdicts; another host's
    /// fragmented datagram still crosses whole.
    #[test]
    fn a_fragment_flood_from_one_host_does_not_block_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _audit) = engine_recording(
            dir.path(),
            "\
zone edge   = 192.0.2.0/25, 2001:db8:1::/64
zone onprem = 192.0.2.128/25, 2001:db8:2::/64
rule dns allow 192.0.2.0/25 -> 192.0.2.200 service udp/53
rule dns6 allow 2001:db8:1::/64 -> 2001:db8:2::53 service udp/53
default deny
",
            65_536,
        );
        let peer = v4("192.0.2.200");
        let part = |src: &str, id: u16, dport: u16, later: bool| {
            let udp = build::udp(40000, dport, &[0x41; 1600]);
            let (from, to) = if later { (1480, udp.len()) } else { (0, 1480) };
            build::ipv4(
                v4(src),
                peer,
                17,
                &udp[from..to],
                (id, !later, (from / 8) as u16),
            )
        };
        for i in 0..(MAX_FRAGMENT_ENTRIES_PER_SOURCE as u16 + 2_000) {
            assert_eq!(
                e.handle(Zone::Edge, &part("192.0.2.10", i, 9999, false)),
                Disposition::Drop(DropReason::Denied)
            );
        }
        assert_eq!(
            e.fragments.lock().unwrap().len(),
            MAX_FRAGMENT_ENTRIES_PER_SOURCE
        );
        assert_eq!(
            e.handle(Zone::Edge, &part("192.0.2.11", 1, 53, false)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Edge, &part("192.0.2.11", 1, 53, true)),
            Disposition::Forward,
            "the other host's later fragment follows its first"
        );
        // The flooding host's own datagrams past its share wait, then drop.
        assert_eq!(
            e.handle(Zone::Edge, &part("192.0.2.10", 60_000, 53, false)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Edge, &part("192.0.2.10", 60_000, 53, true)),
            Disposition::Held
        );
        // Its verdicts expire, and its share with them.
        e.fragments
            .lock()
            .unwrap()
            .expire(e.now() + FRAGMENT_TIMEOUT);
        assert_eq!(e.fragments.lock().unwrap().len(), 0);
        assert!(e.fragments.lock().unwrap().per_source.is_empty());

        // IPv6: a /64 is often a whole LAN, so the share that keeps one
        // host from the others is its address's.
        let part6 = |src: &str, id: u32, dport: u16, later: bool| {
            let udp = build::udp(40000, dport, &[0x41; 1600]);
            let (from, to) = if later { (1232, udp.len()) } else { (0, 1232) };
            let mut l4 = vec![17, 0];
            l4.extend_from_slice(&(((from / 8) as u16) << 3 | u16::from(!later)).to_be_bytes());
            l4.extend_from_slice(&id.to_be_bytes());
            l4.extend_from_slice(&udp[from..to]);
            build::ipv6(
                src.parse().unwrap(),
                "2001:db8:2::53".parse().unwrap(),
                44,
                &l4,
            )
        };
        // Past its share, an IPv6 host's first fragments are not judged at
        // all: one whose verdict is not kept could be followed by a second
        // first fragment that lowers the overlap bound.
        for i in 0..(MAX_FRAGMENT_ENTRIES_PER_SOURCE as u32 + 100) {
            let want = if i < MAX_FRAGMENT_ENTRIES_PER_SOURCE as u32 {
                DropReason::Denied
            } else {
                DropReason::TableFull
            };
            assert_eq!(
                e.handle(Zone::Edge, &part6("2001:db8:1::10", i, 9999, false)),
                Disposition::Drop(want)
            );
        }
        assert_eq!(
            e.handle(Zone::Edge, &part6("2001:db8:1::11", 1, 53, false)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Edge, &part6("2001:db8:1::11", 1, 53, true)),
            Disposition::Forward,
            "a neighbour in the same /64 is not held to the flooder's share"
        );
        let v = e.fragments.lock().unwrap();
        assert_eq!(
            v.per_net.values().copied().max(),
            Some(MAX_FRAGMENT_ENTRIES_PER_SOURCE + 1)
        );
    }

    /// A first fragment dropped before it was judged (spoofed, say) says
    /// nothing about the datagram it names: it neither decides that
    /// datagram's later fragments nor takes room in the table of verdicts.
    /// An IPv6 source's share of held fragments is its /64's.
    #[test]
    fn unjudged_first_fragments_decide_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine_for(
            dir.path(),
            "\
zone edge   = 192.0.2.0/25, 2001:db8:1::/48
zone onprem = 192.0.2.128/25, 2001:db8:2::/48
rule dns allow 192.0.2.0/25 -> 192.0.2.200 service udp/53
default deny
",
            EngineConfig::default(),
        );
        let frags = |src: &str, id: u16| {
            let udp = build::udp(40000, 53, &[0x41; 2000]);
            let (s, d) = (v4(src), v4("192.0.2.200"));
            (
                build::ipv4(s, d, 17, &udp[..1480], (id, true, 0)),
                build::ipv4(s, d, 17, &udp[1480..], (id, false, 185)),
            )
        };
        // The datagram's own first fragment passes; the same bytes sent
        // into the other port are spoofed there, and change nothing.
        let (first, later) = frags("192.0.2.10", 7);
        assert_eq!(e.handle(Zone::Edge, &first), Disposition::Forward);
        assert_eq!(
            e.handle(Zone::Onprem, &first),
            Disposition::Drop(DropReason::Spoofed)
        );
        assert_eq!(e.handle(Zone::Edge, &later), Disposition::Forward);
        // A spoofed first fragment before the real one: the later fragment
        // still waits for the real one.
        let (first, later) = frags("192.0.2.10", 8);
        assert_eq!(
            e.handle(Zone::Onprem, &first),
            Disposition::Drop(DropReason::Spoofed)
        );
        assert_eq!(e.handle(Zone::Edge, &later), Disposition::Held);
        assert_eq!(e.handle(Zone::Edge, &first), Disposition::Forward);
        assert_eq!(e.take_released(Zone::Edge), vec![later]);
        // Spoofed first fragments in any number take no room.
        for i in 0..5000u16 {
            let (first, _) = frags(&format!("198.51.100.{}", i % 250), i);
            assert_eq!(
                e.handle(Zone::Onprem, &first),
                Disposition::Drop(DropReason::Spoofed)
            );
        }
        assert_eq!(e.fragments.lock().unwrap().len(), 2);

        // IPv6: every address of one /64 draws on one share.
        let later6 = |src: u16, id: u32| {
            // Fragment header: next header, reserved, offset 185 (in 8-byte
            // units) without More, identification; then data.
            let mut l4 = vec![17, 0];
            l4.extend_from_slice(&(185u16 << 3).to_be_bytes());
            l4.extend_from_slice(&id.to_be_bytes());
            l4.extend_from_slice(&[0u8; 1400]);
            let src = std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, src);
            build::ipv6(src, "2001:db8:2::53".parse().unwrap(), 44, &l4)
        };
        let held = (0..400u16)
            .filter(|i| e.handle(Zone::Edge, &later6(*i + 1, u32::from(*i))) == Disposition::Held)
            .count();
        let per = later6(1, 0).len() + HELD_OVERHEAD + WAITING_OVERHEAD;
        assert_eq!(held, MAX_HELD_BYTES_PER_SOURCE / per, "one /64, one share");
        // Another /64 has its own.
        let other = {
            let mut f = later6(1, 9999);
            f[14 + 8 + 7] = 1; // source 2001:db8:1:1::1
            f
        };
        assert_eq!(e.handle(Zone::Edge, &other), Disposition::Held);
    }

    /// ICMP that the connection table must not take for related traffic:
    /// an error addressed to someone other than the quoted packet's
    /// sender, a request from the far side of a ping, a timestamp whose
    /// type equals a ping's identifier, and neighbour discovery that was
    /// routed here (hop limit not 255) from outside the port's zone.
    #[test]
    fn icmp_is_related_only_to_the_exchange_it_belongs_to() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "\
zone edge   = 192.0.2.0/25, 2001:db8:1::/64
zone onprem = 192.0.2.128/25, 2001:db8:2::/64
rule web  allow 192.0.2.0/25 -> 192.0.2.200 service udp/53
rule ping allow 192.0.2.0/25 -> 192.0.2.200 service icmp
default deny
";
        let e = engine_for(dir.path(), policy, EngineConfig::default());
        let (vnet, peer) = (v4("192.0.2.10"), v4("192.0.2.200"));
        let query = build::ipv4(vnet, peer, 17, &build::udp(40000, 53, b"q"), (1, false, 0));
        assert_eq!(e.handle(Zone::Edge, &query), Disposition::Forward);
        // Port unreachable quoting the query, from the peer.
        let error_to = |dst: Ipv4Addr| {
            let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
            l4.extend_from_slice(&query[14..14 + 28]);
            l4.resize(l4.len() + 1000, 0x41);
            build::ipv4(peer, dst, 1, &l4, (2, false, 0))
        };
        assert_eq!(
            e.handle(Zone::Onprem, &error_to(vnet)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Onprem, &error_to(v4("192.0.2.11"))),
            Disposition::Drop(DropReason::NoState),
            "an error must go to the sender of the packet it quotes"
        );
        // A redirect quoting the same query is route advice, not the
        // flow's error: the policy judges it, and no rule allows it.
        let mut redirect = vec![5, 1, 0, 0, 192, 0, 2, 99];
        redirect.extend_from_slice(&query[14..14 + 28]);
        let redirect = build::ipv4(peer, vnet, 1, &redirect, (5, false, 0));
        assert_eq!(
            e.handle(Zone::Onprem, &redirect),
            Disposition::Drop(DropReason::Denied)
        );
        // A ping with identifier 13, then its reply.
        let echo =
            |src, dst, ty, id| build::ipv4(src, dst, 1, &build::icmp_echo(ty, id), (3, false, 0));
        assert_eq!(
            e.handle(Zone::Edge, &echo(vnet, peer, 8, 13)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Onprem, &echo(peer, vnet, 0, 13)),
            Disposition::Forward
        );
        // A request from the far side with the same identifier is not a reply.
        assert_eq!(
            e.handle(Zone::Onprem, &echo(peer, vnet, 8, 13)),
            Disposition::Drop(DropReason::NoState)
        );
        // A timestamp request (type 13, code 0) is not ping 13's reply.
        let timestamp = build::ipv4(peer, vnet, 1, &[13, 0, 0, 0, 0, 1, 0, 1], (4, false, 0));
        assert_eq!(
            e.handle(Zone::Onprem, &timestamp),
            Disposition::Drop(DropReason::Denied)
        );
        // Neighbour solicitation: on-link (hop limit 255) from a link-local
        // source passes; routed (hop limit 64) from outside the zone is
        // ordinary ICMPv6, whose source is spoofed on this port.
        let ns = |src: &str, hops: u8| {
            let mut f = build::ipv6(
                src.parse().unwrap(),
                "ff02::1:ff00:20".parse().unwrap(),
                58,
                &[[135, 0, 0, 0].as_slice(), &[0; 20]].concat(),
            );
            f[14 + 7] = hops;
            f
        };
        assert_eq!(
            e.handle(Zone::Edge, &ns("fe80::1", 255)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Edge, &ns("2001:db8:1::5", 255)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Edge, &ns("2001:db8:dead::1", 64)),
            Disposition::Drop(DropReason::Spoofed)
        );
        assert_eq!(
            e.handle(Zone::Edge, &ns("2001:db8:dead::1", 255)),
            Disposition::Drop(DropReason::Spoofed)
        );
        // Routed from inside the zone: judged by the policy, which has no
        // ICMPv6 rule.
        assert_eq!(
            e.handle(Zone::Edge, &ns("2001:db8:1::5", 64)),
            Disposition::Drop(DropReason::Denied)
        );
        // Valid neighbour discovery addressed off the link (a router would
        // forward it): ordinary ICMPv6, denied.
        let mut off_link = build::ipv6(
            "2001:db8:1::5".parse().unwrap(),
            "2001:db8:ffff::1".parse().unwrap(),
            58,
            &[[136, 0, 0, 0].as_slice(), &[0; 20]].concat(),
        );
        off_link[14 + 7] = 255;
        off_link.extend_from_slice(&[0x45; 1200]);
        assert_eq!(
            e.handle(Zone::Edge, &off_link),
            Disposition::Drop(DropReason::Denied)
        );
        // An MLDv2 report (hop limit 1, link-local source, to ff02::16)
        // passes; with hop limit 255 it is not MLD.
        let mld = |hops: u8| {
            let mut f = build::ipv6(
                "fe80::1".parse().unwrap(),
                "ff02::16".parse().unwrap(),
                58,
                &[143, 0, 0, 0, 0, 0, 0, 0],
            );
            f[14 + 7] = hops;
            f
        };
        assert_eq!(e.handle(Zone::Edge, &mld(1)), Disposition::Forward);
        assert_eq!(
            e.handle(Zone::Edge, &mld(255)),
            Disposition::Drop(DropReason::Spoofed)
        );
        // ARP carries ARP only: not 1400 bytes of something else.
        let mut fat = build::arp();
        fat.extend_from_slice(&[0x41; 1400]);
        assert_eq!(
            e.handle(Zone::Edge, &fat),
            Disposition::Drop(DropReason::Malformed)
        );
        assert_eq!(e.handle(Zone::Edge, &build::arp()), Disposition::Forward);
    }

    /// Fragments cannot supply or replace the headers the policy judges.
    #[test]
    fn fragments_carry_no_headers_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "\
zone edge   = 192.0.2.0/25, 2001:db8:1::/64
zone onprem = 192.0.2.128/25, 2001:db8:2::/64
rule dns allow 2001:db8:1::/64 -> 2001:db8:2::53 service udp/53
rule low allow 192.0.2.0/25 -> 192.0.2.200 service udp/0-1023
default deny
";
        let e = engine_for(dir.path(), policy, EngineConfig::default());
        let (a, b) = ("2001:db8:1::10", "2001:db8:2::53");
        let frag = |offset: u16, more: bool, data: &[u8]| {
            let mut l4 = vec![17, 0];
            l4.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 7]);
            l4.extend_from_slice(data);
            build::ipv6(a.parse().unwrap(), b.parse().unwrap(), 44, &l4)
        };
        // A later fragment whose data looks like an atomic fragment header
        // and a UDP header to port 53: still a later fragment of a datagram
        // never admitted.
        let mut fake = vec![17, 0, 0, 0, 0, 0, 0, 9];
        fake.extend_from_slice(&build::udp(7000, 53, b"x"));
        let later = frag(8, false, &fake);
        assert_eq!(e.handle(Zone::Edge, &later), Disposition::Held);
        e.expire_held(Duration::MAX);
        assert_eq!(e.counters.dropped(DropReason::Fragment), 1);
        assert!(e.take_released(Zone::Edge).is_empty());
        // A later fragment at offset 8 lands in the header its first
        // fragment carried, whatever next header it names itself.
        assert_eq!(
            e.handle(Zone::Edge, &frag(1, true, &[0; 16])),
            Disposition::Drop(DropReason::OverlappingFragment)
        );
        // A first fragment cut before its UDP header is complete.
        let short = frag(0, true, &[0x1b, 0x58, 0, 53]);
        assert_eq!(
            e.handle(Zone::Edge, &short),
            Disposition::Drop(DropReason::IncompleteFirstFragment)
        );
        // IPv4: a first fragment of 4 bytes (ports but no UDP length).
        let v4 = build::ipv4(
            v4("192.0.2.10"),
            v4("192.0.2.200"),
            17,
            &[0x1b, 0x58, 0, 53],
            (9, true, 0),
        );
        assert_eq!(
            e.handle(Zone::Edge, &v4),
            Disposition::Drop(DropReason::IncompleteFirstFragment)
        );
        // A whole datagram with its UDP header passes.
        let whole = build::ipv6(
            a.parse().unwrap(),
            b.parse().unwrap(),
            17,
            &build::udp(7000, 53, b"q"),
        );
        assert_eq!(e.handle(Zone::Edge, &whole), Disposition::Forward);
    }

    /// A later fragment that would rewrite the TCP header its admitted
    /// first fragment carried (its flags, at offset 8) is dropped; the
    /// datagram's fragments after the header still follow the verdict.
    #[test]
    fn fragments_cannot_rewrite_the_judged_header() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "\
zone edge   = 192.0.2.0/25
zone onprem = 192.0.2.128/25
rule web allow 192.0.2.0/25 -> 192.0.2.200 service tcp/443
default deny
";
        let e = engine_for(dir.path(), policy, EngineConfig::default());
        let (a, b) = (v4("192.0.2.10"), v4("192.0.2.200"));
        let mut first = build::tcp(40000, 443, packet::tcp_flags::SYN);
        first.extend_from_slice(&[0; 16]);
        let first = build::ipv4(a, b, 6, &first, (21, true, 0));
        assert_eq!(e.handle(Zone::Edge, &first), Disposition::Forward);
        // Offset 8: acknowledgement, data offset, flags and window anew.
        let rewrite = build::ipv4(a, b, 6, &[0; 16], (21, true, 1));
        assert_eq!(
            e.handle(Zone::Edge, &rewrite),
            Disposition::Drop(DropReason::OverlappingFragment)
        );
        // Offset 16 still lands in the 20-byte header.
        let rewrite = build::ipv4(a, b, 6, &[0; 16], (21, true, 2));
        assert_eq!(
            e.handle(Zone::Edge, &rewrite),
            Disposition::Drop(DropReason::OverlappingFragment)
        );
        // Offset 24 and on is data: it follows the first fragment.
        let rest = build::ipv4(a, b, 6, &[0; 16], (21, false, 3));
        assert_eq!(e.handle(Zone::Edge, &rest), Disposition::Forward);
        assert_eq!(e.counters.dropped(DropReason::OverlappingFragment), 2);
    }

    /// IPv6 fragments must not overlap (RFC 5722): with a Destination
    /// Options header after the Fragment header, the TCP header sits past
    /// byte 20 of the fragmentable part, and a later fragment at 24 would
    /// rewrite its flags. Dropped whether it comes after its first
    /// fragment or before it (held, then settled).
    #[test]
    fn ipv6_fragments_cannot_overlap_their_first() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "\
zone edge   = 2001:db8:1::/64
zone onprem = 2001:db8:2::/64
rule web allow 2001:db8:1::/64 -> 2001:db8:2::443 service tcp/443
default deny
";
        let e = engine_for(dir.path(), policy, EngineConfig::default());
        let (a, b) = ("2001:db8:1::10", "2001:db8:2::443");
        // Fragment header (next: Destination Options), then what follows.
        let frag = |id: u8, offset: u16, more: bool, data: &[u8]| {
            let mut l4 = vec![60, 0];
            l4.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, id]);
            l4.extend_from_slice(data);
            build::ipv6(a.parse().unwrap(), b.parse().unwrap(), 44, &l4)
        };
        // Destination Options (next: TCP; PadN), a SYN and 20 bytes: the
        // first fragment carries 48 bytes of the datagram.
        let mut first = vec![6, 0, 1, 4, 0, 0, 0, 0];
        first.extend_from_slice(&build::tcp(40000, 443, packet::tcp_flags::SYN));
        first.extend_from_slice(&[0; 20]);
        let rewrite = frag(1, 3, true, &[0; 16]);
        let rest = frag(1, 6, false, &[0; 16]);
        assert_eq!(
            e.handle(Zone::Edge, &frag(1, 0, true, &first)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Edge, &rewrite),
            Disposition::Drop(DropReason::OverlappingFragment)
        );
        assert_eq!(e.handle(Zone::Edge, &rest), Disposition::Forward);
        // The same datagram sent last first: both later fragments wait;
        // the first passes, the one after it too, the overlapping one not.
        let (rewrite, rest) = (frag(2, 3, true, &[0; 16]), frag(2, 6, false, &[0; 16]));
        assert_eq!(e.handle(Zone::Edge, &rest), Disposition::Held);
        assert_eq!(e.handle(Zone::Edge, &rewrite), Disposition::Held);
        assert_eq!(
            e.handle(Zone::Edge, &frag(2, 0, true, &first)),
            Disposition::Forward
        );
        assert_eq!(e.take_released(Zone::Edge), vec![rest]);
        // A second first fragment that carries less (no Destination
        // Options: 24 bytes) would let a fragment at 24 rewrite the flags
        // the first one carried at 29: it is dropped, and the bound stays.
        let mut short = build::tcp(40000, 443, packet::tcp_flags::SYN);
        short.extend_from_slice(&[0; 4]);
        let mut short = frag(3, 0, true, &short);
        short[14 + 40] = 6;
        assert_eq!(
            e.handle(Zone::Edge, &frag(3, 0, true, &first)),
            Disposition::Forward
        );
        assert_eq!(
            e.handle(Zone::Edge, &short),
            Disposition::Drop(DropReason::OverlappingFragment)
        );
        assert_eq!(
            e.handle(Zone::Edge, &frag(3, 3, false, &[0; 16])),
            Disposition::Drop(DropReason::OverlappingFragment)
        );
        assert_eq!(e.counters.dropped(DropReason::OverlappingFragment), 4);
    }

    /// A verdict noted again keeps the larger overlap bound.
    #[test]
    fn a_fragment_verdicts_bound_is_never_lowered() {
        let mut v = Verdicts::default();
        let key = FlowKey {
            src: "2001:db8:1::10".parse().unwrap(),
            dst: "2001:db8:2::443".parse().unwrap(),
            proto: 6,
            src_port: 0,
            dst_port: 0,
        };
        let k = (Zone::Edge, fragment_key(&key, 9));
        let until = Duration::from_secs(2);
        v.note(k, true, until, 48);
        v.note(k, true, until, 24);
        assert_eq!(v.get(&k, Duration::ZERO), Some((true, 48)));
    }

    /// A rule that expires while the filter runs: the policy without it
    /// (as the filter's expiry timer puts in force) cuts the flows it
    /// admitted at their next packet and denies new ones, though the text
    /// and its sha256 are the same. Rule counts follow rule names.
    #[test]
    fn an_expired_rule_stops_matching_and_its_flows_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "\
zone edge   = 192.0.2.0/25
zone onprem = 192.0.2.128/25
rule temp allow 192.0.2.0/25 -> 192.0.2.200 service tcp/80 expires 2026-06-30
rule web  allow 192.0.2.0/25 -> 192.0.2.201 service tcp/80
default deny
";
        let e = engine_for(dir.path(), policy, EngineConfig::default());
        let syn = tcp("192.0.2.10", "192.0.2.200", 40000, 80, SYN, 0);
        assert_eq!(e.handle(Zone::Edge, &syn), Disposition::Forward);
        let syn_web = tcp("192.0.2.10", "192.0.2.201", 40001, 80, SYN, 0);
        assert_eq!(e.handle(Zone::Edge, &syn_web), Disposition::Forward);
        let p = e.policy();
        assert_eq!(p.valid_until(), Date::new(2026, 6, 30));
        assert!(p.expired_as_of(Date::new(2026, 6, 30).unwrap()).is_none());
        let (next, expired) = p.expired_as_of(Date::new(2026, 7, 1).unwrap()).unwrap();
        assert_eq!(expired, vec!["temp".to_string()]);
        assert_eq!(next.sha256(), p.sha256());
        assert!(!next.decides_as(&p));
        e.set_policy(next);
        let ack = tcp("192.0.2.10", "192.0.2.200", 40000, 80, ACK, 10);
        assert_eq!(
            e.handle(Zone::Edge, &ack),
            Disposition::Drop(DropReason::Revoked)
        );
        let ack_web = tcp("192.0.2.10", "192.0.2.201", 40001, 80, ACK, 10);
        assert_eq!(e.handle(Zone::Edge, &ack_web), Disposition::Forward);
        let again = tcp("192.0.2.10", "192.0.2.200", 40002, 80, SYN, 0);
        assert_eq!(
            e.handle(Zone::Edge, &again),
            Disposition::Drop(DropReason::Denied)
        );
        // The same policy again (a SIGHUP with nothing changed) changes
        // nothing: the generation stays, flows are not re-checked.
        let g = e.policy().generation();
        e.set_policy(e.policy().as_ref().clone());
        assert_eq!(e.policy().generation(), g);
        // A reload that reorders the rules: counts stay with their names.
        let hits = |e: &Engine| e.counters.rule_hits.lock().unwrap().clone();
        assert_eq!(hits(&e), vec![1, 1, 0], "admitted flows, per rule");
        e.set_policy(compile(&policy.replace(
            "rule temp allow 192.0.2.0/25 -> 192.0.2.200 service tcp/80 expires 2026-06-30\n",
            "",
        ).replace("default deny", "rule new allow 192.0.2.0/25 -> 192.0.2.202\ndefault deny")));
        assert_eq!(hits(&e), vec![1, 0, 0], "web, new, default");
        // A flow decided just before a reload that puts a rule in front of
        // `web` is counted for `web`, not for the rule now at its place.
        let before = e.policy();
        let web = before.rules().iter().position(|r| r.name == "web").unwrap() as u32;
        e.set_policy(compile(&policy.replace(
            "rule temp allow 192.0.2.0/25 -> 192.0.2.200 service tcp/80 expires 2026-06-30\n",
            "rule first allow 192.0.2.0/25 -> 192.0.2.203\n",
        )));
        e.count_hit(&before, Some(web));
        e.count_hit(&before, None);
        assert_eq!(hits(&e), vec![0, 2, 1], "first, web, default");
    }

    /// A client that reuses its port right after a reset opens a new
    /// connection, which lives by its own timeouts and gets its own records.
    #[test]
    fn a_new_syn_on_a_closed_connection_starts_a_new_flow() {
        use crate::packet::tcp_flags::RST;
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let c = |flags, payload| tcp("192.0.2.10", "192.0.2.200", 42000, 80, flags, payload);
        let s = |flags| tcp("192.0.2.200", "192.0.2.10", 80, 42000, flags, 0);
        // SYN with FIN or RST starts nothing, and rides no flow.
        for odd in [SYN | crate::packet::tcp_flags::FIN, SYN | RST] {
            assert_eq!(
                e.handle(Zone::Edge, &c(odd, 0)),
                Disposition::Drop(DropReason::NoState),
                "flags {odd:#x}"
            );
        }
        assert_eq!(e.handle(Zone::Edge, &c(SYN, 0)), Disposition::Forward);
        assert_eq!(e.handle(Zone::Onprem, &s(SYN | ACK)), Disposition::Forward);
        assert_eq!(e.handle(Zone::Edge, &c(ACK, 0)), Disposition::Forward);
        assert_eq!(e.handle(Zone::Edge, &c(RST, 0)), Disposition::Forward);
        // Nor on the closed connection lingering in the table.
        for odd in [SYN | crate::packet::tcp_flags::FIN, SYN | RST] {
            assert_eq!(
                e.handle(Zone::Edge, &c(odd, 0)),
                Disposition::Drop(DropReason::NoState),
                "flags {odd:#x} on a closed flow"
            );
        }
        // The same four-tuple again at once.
        assert_eq!(e.handle(Zone::Edge, &c(SYN, 0)), Disposition::Forward);
        assert_eq!(e.handle(Zone::Onprem, &s(SYN | ACK)), Disposition::Forward);
        assert_eq!(e.handle(Zone::Edge, &c(ACK, 0)), Disposition::Forward);
        let t = e.table.lock().unwrap();
        let Payload::Ip(ip) = packet::parse(&c(SYN, 0)).unwrap().payload else {
            panic!()
        };
        let (flow, _) = t.find(&ConnKey::of(&ip.key, None), e.now()).unwrap();
        assert_eq!(
            flow.state,
            State::Tcp(TcpState::Established),
            "a new, established flow"
        );
        assert_eq!(flow.original.packets, 2, "the new connection's own packets");
        drop(t);
        assert_eq!(e.conntrack_len(), 1);
    }

    /// Fail-closed: a flow whose start record the trail cannot take (its
    /// queue full) does not pass; every flow that passed has its record.
    #[test]
    fn a_flow_the_trail_cannot_record_does_not_pass() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "\
zone edge   = 192.0.2.0/25
zone onprem = 192.0.2.128/25
rule dns allow 192.0.2.0/25 -> 192.0.2.200 service udp
default deny
";
        let (e, audit) = engine_recording(dir.path(), policy, 16);
        let mut passed = 0;
        for port in 0..3000u16 {
            let f = build::ipv4(
                v4("192.0.2.10"),
                v4("192.0.2.200"),
                17,
                &build::udp(10_000 + port, 53, b"q"),
                (1, false, 0),
            );
            if e.handle(Zone::Edge, &f) == Disposition::Forward {
                passed += 1;
            }
        }
        let refused = e.counters.dropped(DropReason::AuditUnavailable);
        assert_eq!(passed + refused, 3000);
        drop(e);
        audit.close().unwrap();
        let starts = trail_records(dir.path(), "flow_start").len();
        assert_eq!(starts as u64, passed, "{refused} refused");
    }

    /// A packet whose sender chose its route is dropped for that, and
    /// summarised in the trail like other drops (not as a malformed frame).
    #[test]
    fn source_routed_packets_are_dropped_and_recorded_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let (e, audit) = engine_recording(dir.path(), POLICY, 1024);
        let mut f = build::ipv4(
            v4("192.0.2.10"),
            v4("192.0.2.200"),
            6,
            &build::tcp(40000, 80, 0x02),
            (1, false, 0),
        );
        // A loose source route option (after a no-op).
        f[14] = 0x45 + 2;
        for (i, b) in [1, 131, 7, 4, 192, 0, 2, 9].iter().enumerate() {
            f.insert(14 + 20 + i, *b);
        }
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        assert_eq!(
            e.handle(Zone::Edge, &f),
            Disposition::Drop(DropReason::SourceRouted)
        );
        e.flush();
        drop(e);
        audit.close().unwrap();
        let drops = trail_records(dir.path(), "drop_summary");
        assert!(
            drops
                .iter()
                .any(|r| r.to_string().contains("source-routed")),
            "{drops:#?}"
        );
    }

    /// A flow's end names the rule that admitted it, also when a reload
    /// renumbered the rules; flows still open at the stop end as stopped,
    /// not as timed out.
    #[test]
    fn flow_ends_name_their_own_rule_and_the_stop() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "\
zone edge   = 192.0.2.0/25
zone onprem = 192.0.2.128/25
rule web  allow 192.0.2.0/25 -> 192.0.2.200 service tcp/80
rule dns  allow 192.0.2.0/25 -> 192.0.2.200 service udp/53
rule ping allow 192.0.2.0/25 -> 192.0.2.128/25 service tcp/22
default deny
";
        let (e, audit) = engine_recording(dir.path(), policy, 1024);
        let syn = |sport| {
            build::ipv4(
                v4("192.0.2.10"),
                v4("192.0.2.200"),
                6,
                &build::tcp(sport, 80, 0x02),
                (1, false, 0),
            )
        };
        let dns = build::ipv4(
            v4("192.0.2.10"),
            v4("192.0.2.200"),
            17,
            &build::udp(5000, 53, b"q"),
            (1, false, 0),
        );
        assert_eq!(e.handle(Zone::Edge, &syn(40000)), Disposition::Forward);
        assert_eq!(e.handle(Zone::Edge, &dns), Disposition::Forward);
        // Without `web`, rule 0 is `dns` and rule 1 `ping`.
        e.set_policy(compile(&policy.replace(
            "rule web  allow 192.0.2.0/25 -> 192.0.2.200 service tcp/80\n",
            "",
        )));
        assert_ne!(e.handle(Zone::Edge, &syn(40000)), Disposition::Forward);
        e.flush();
        drop(e);
        audit.close().unwrap();
        let ends = trail_records(dir.path(), "flow_end");
        let end = |port: u64| {
            ends.iter()
                .find(|r| r.pointer("/destination/port").and_then(|p| p.as_u64()) == Some(port))
                .unwrap_or_else(|| panic!("{ends:#?}"))
        };
        let web = end(80);
        // Cut: named by the rule of the new policy that denies it, with
        // the rule that admitted it in the reason.
        assert_eq!(web["rule"]["name"], "default", "{web:#}");
        assert!(
            web["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with(
                    "cut: the reloaded policy no longer allows it; admitted by rule web of ruleset"
                )),
            "{web:#}"
        );
        assert!(web["event"]["start"].as_str() <= web["event"]["end"].as_str());
        assert!(web["event"]["start"].is_string(), "{web:#}");
        let dns = end(53);
        assert_eq!(dns["rule"]["name"], "dns", "{dns:#}");
        assert_eq!(dns["event"]["reason"], "the filter stopped", "{dns:#}");
    }

    /// Denied traffic to ever new ports cannot write a record per packet:
    /// new source ports are one key, and past the keys one interval
    /// itemises, drops are summed per source. No packet goes uncounted.
    #[test]
    fn drop_summaries_are_bounded_and_count_every_packet() {
        let dir = tempfile::tempdir().unwrap();
        let (e, audit) = engine_recording(dir.path(), POLICY, 65_536);
        let n = 3 * MAX_DROP_KEYS as u16;
        for i in 0..n {
            // A new source port and a new destination port each time.
            let f = build::ipv4(
                v4("192.0.2.10"),
                v4("192.0.2.200"),
                17,
                &build::udp(20_000 + i, 1000 + i, b"x"),
                (1, false, 0),
            );
            assert_eq!(
                e.handle(Zone::Edge, &f),
                Disposition::Drop(DropReason::Denied)
            );
        }
        // Then a flood from ever new sources (spoofed, each its own /64),
        // and frames that name no flow: summed for all, never left out.
        let sources = 2 * MAX_DROP_SOURCES as u16;
        for i in 0..sources {
            let src = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xff, i, 0, 0, 0, 1);
            let f = build::ipv6(
                src,
                "2001:db8:2::53".parse().unwrap(),
                17,
                &build::udp(1, 53, b"x"),
            );
            assert_eq!(
                e.handle(Zone::Edge, &f),
                Disposition::Drop(DropReason::Spoofed)
            );
        }
        assert_eq!(
            e.handle(Zone::Onprem, &[0u8; 10]),
            Disposition::Drop(DropReason::Malformed)
        );
        e.flush();
        drop(e);
        audit.close().unwrap();
        let summaries = trail_records(dir.path(), "drop_summary");
        let reason = |r: &serde_json::Value| {
            r.pointer("/event/reason")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let packets = |rs: &[&serde_json::Value]| -> u64 {
            rs.iter()
                .map(|r| {
                    r.pointer("/source/packets")
                        .and_then(|p| p.as_u64())
                        .unwrap()
                })
                .sum()
        };
        let denied: Vec<_> = summaries
            .iter()
            .filter(|r| reason(r).starts_with("denied by the policy"))
            .collect();
        assert_eq!(
            denied.len(),
            MAX_DROP_KEYS + 1,
            "itemised keys and one per source"
        );
        assert_eq!(packets(&denied), u64::from(n));
        assert!(denied
            .iter()
            .any(|r| reason(r).ends_with("summed for the source (its /64 for IPv6)")));
        // The spoofed flood: per source while there is room, then for all.
        let spoofed: Vec<_> = summaries
            .iter()
            .filter(|r| reason(r).starts_with("source address not in"))
            .collect();
        assert_eq!(packets(&spoofed), u64::from(sources));
        let all: Vec<_> = spoofed
            .iter()
            .copied()
            .filter(|r| reason(r).ends_with("summed for all"))
            .collect();
        assert_eq!(all.len(), 1, "one record for the rest");
        assert!(packets(&all) >= u64::from(sources) - MAX_DROP_SOURCES as u64);
        let malformed: Vec<_> = summaries
            .iter()
            .filter(|r| reason(r).starts_with("malformed frame"))
            .collect();
        assert_eq!(packets(&malformed), 1, "{malformed:?}");
        assert_eq!(
            malformed[0]
                .pointer("/palisade/ingress")
                .and_then(|v| v.as_str()),
            Some("onprem")
        );
        assert!(summaries.len() <= MAX_DROP_KEYS + MAX_DROP_SOURCES + 2 * DropReason::ALL.len());
    }

    /// A drop summary names the rule that denied its packets when they were
    /// dropped, not the one a reload put in force before it was written;
    /// drops of one key before and after a reload are summed apart.
    #[test]
    fn a_drop_summary_names_the_rule_that_denied_it() {
        let dir = tempfile::tempdir().unwrap();
        let (e, audit) = engine_recording(dir.path(), POLICY, 65_536);
        let f = build::ipv4(
            v4("192.0.2.10"),
            v4("192.0.2.200"),
            17,
            &build::udp(20_000, 7777, b"x"),
            (1, false, 0),
        );
        let denied = Disposition::Drop(DropReason::Denied);
        assert_eq!(e.handle(Zone::Edge, &f), denied);
        let before = e.policy.load().sha256().to_string();
        // A reload whose own rule denies it, then one that allows it.
        let denying = format!(
            "rule newly-denied deny 192.0.2.0/25 -> 192.0.2.200 service udp/7777\n{POLICY}"
        );
        e.set_policy(compile(&denying));
        let after = e.policy.load().sha256().to_string();
        assert_eq!(e.handle(Zone::Edge, &f), denied);
        let allowing = format!(
            "{POLICY}\nrule newly-allowed allow 192.0.2.0/25 -> 192.0.2.200 service udp/7777\n"
        );
        e.set_policy(compile(&allowing));
        assert_eq!(e.handle(Zone::Edge, &f), Disposition::Forward);
        e.flush();
        drop(e);
        audit.close().unwrap();
        let mut named: Vec<(String, String)> = trail_records(dir.path(), "drop_summary")
            .into_iter()
            .filter(|r| r.pointer("/destination/port").and_then(|p| p.as_u64()) == Some(7777))
            .map(|r| {
                let s = |p: &str| {
                    r.pointer(p)
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string()
                };
                (s("/rule/name"), s("/rule/ruleset"))
            })
            .collect();
        named.sort();
        assert_eq!(
            named,
            vec![
                ("default".to_string(), before),
                ("newly-denied".to_string(), after)
            ]
        );
    }

    #[test]
    fn a_syn_flood_is_rate_limited_per_source_with_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine_with(
            dir.path(),
            EngineConfig {
                new_flows_per_second_per_source: 100,
                new_flow_burst_per_source: 20,
                ..EngineConfig::default()
            },
        );
        // One source: its burst passes, the rest of a fast burst waits.
        let mut limited = 0;
        for port in 0..200u16 {
            let syn = tcp("192.0.2.10", "192.0.2.200", 10000 + port, 80, SYN, 0);
            if e.handle(Zone::Edge, &syn) == Disposition::Drop(DropReason::RateLimited) {
                limited += 1;
            }
        }
        assert!((100..=180).contains(&limited), "{limited} rate-limited");
        assert_eq!(e.counters.dropped(DropReason::RateLimited), limited);
        // Every source of the zone gets its own budget and is remembered
        // while the budget is spent...
        for host in 0..128u8 {
            let syn = tcp(&format!("192.0.2.{host}"), "192.0.2.200", 10000, 80, SYN, 0);
            e.handle(Zone::Edge, &syn);
        }
        assert_eq!(e.limiter.len(), 128);
        // ...and forgotten once it is full again (20 flows at 100/s: 0.2 s).
        std::thread::sleep(Duration::from_millis(400));
        e.housekeeping();
        assert_eq!(e.limiter.len(), 0, "idle sources are forgotten");
        // IPv6 sources of one /64 share a budget.
        let k = |a: &str| rate_key(a.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::5"), k("2001:db8:1:2:ffff::1"));
        assert_ne!(k("2001:db8:1:2::5"), k("2001:db8:1:3::5"));
    }

    #[test]
    fn ordinary_frames_and_incomplete_offload_metadata_count_once() {
        let o = Offload::NONE;
        let short = Frame {
            data: &[0u8; 60],
            offload: o,
        };
        assert_eq!(short.segments(), (1, 0));
        // Offload metadata without a checksum to finish is no super-frame.
        let mut not_gso = Offload::NONE;
        not_gso.0 = [0, 1, 0, 0, 0xe8, 0x03, 0, 0, 0, 0];
        let f = Frame {
            data: &[0u8; 60],
            offload: not_gso,
        };
        assert_eq!(f.segments(), (1, 0));
    }

    /// The fast path's decisions, against the kernel's real map (loaded but
    /// attached to no port: the ports' indexes are only map keys here).
    #[test]
    fn the_fast_path_takes_only_flows_palisade_would_pass_and_gives_them_back() {
        use crate::packet::tcp_flags::FIN;
        const EDGE: u32 = 1_000_001;
        const ONPREM: u32 = 1_000_002;
        let path = match offload::FastPath::load(64) {
            Ok(p) => p,
            Err(e) => {
                crate::say!("skipping: no BPF here ({e})");
                return;
            }
        };
        let policy = "\
zone edge   = 192.0.2.0/25
zone onprem = 192.0.2.128/25
rule web allow 192.0.2.0/25 -> 192.0.2.200 service tcp/80, udp/53
rule peer allow 192.0.2.0/25 -> 192.0.2.20 service tcp/80
default deny
";
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine_for(dir.path(), policy, EngineConfig::default());
        e.set_fast_path(path, EDGE, ONPREM);
        let fwd = Disposition::Forward;
        let k = |src: &str, dst: &str, proto: u8, sp: u16, dp: u16| FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            src_port: sp,
            dst_port: dp,
        };
        let in_kernel = |e: &Engine, port: u32, key: &FlowKey| {
            e.fast
                .as_ref()
                .unwrap()
                .path
                .read(port, key)
                .unwrap()
                .is_some()
        };

        // A frame of `key`'s flow (TCP with `flags`, or UDP) into `z`.
        let send = |e: &Engine, z: Zone, key: &FlowKey, flags: u8, payload: usize| {
            let (IpAddr::V4(src), IpAddr::V4(dst)) = (key.src, key.dst) else {
                unreachable!("IPv4 flows here")
            };
            let l4 = if key.proto == 6 {
                let mut t = build::tcp(key.src_port, key.dst_port, flags);
                t.resize(t.len() + payload, 0xab);
                t
            } else {
                build::udp(key.src_port, key.dst_port, &vec![0xab; payload])
            };
            e.handle(z, &build::ipv4(src, dst, key.proto, &l4, (1, false, 0)))
        };

        // TCP edge -> onprem: offloaded once established, both directions,
        // each keyed on the port its frames arrive on.
        let web = k("192.0.2.10", "192.0.2.200", 6, 40000, 80);
        let back = reversed(&web);
        assert_eq!(send(&e, Zone::Edge, &web, SYN, 0), fwd);
        assert_eq!(send(&e, Zone::Onprem, &back, SYN | ACK, 0), fwd);
        assert!(
            !in_kernel(&e, EDGE, &web),
            "not before the handshake completes"
        );
        assert_eq!(send(&e, Zone::Edge, &web, ACK, 0), fwd);
        assert!(in_kernel(&e, EDGE, &web) && in_kernel(&e, ONPREM, &back));
        assert!(!in_kernel(&e, ONPREM, &web) && !in_kernel(&e, EDGE, &back));
        assert_eq!(e.fast_path_totals(), Some((0, 0)));

        // Both ends in the edge zone: both directions arrive on edge, so no
        // entry could be right for both; it stays with palisade.
        let peer = k("192.0.2.10", "192.0.2.20", 6, 40001, 80);
        assert_eq!(send(&e, Zone::Edge, &peer, SYN, 0), fwd);
        assert_eq!(send(&e, Zone::Edge, &reversed(&peer), SYN | ACK, 0), fwd);
        assert_eq!(send(&e, Zone::Edge, &peer, ACK, 0), fwd);
        for port in [EDGE, ONPREM] {
            assert!(!in_kernel(&e, port, &peer) && !in_kernel(&e, port, &reversed(&peer)));
        }

        // UDP: not before palisade saw a reply.
        let dns = k("192.0.2.11", "192.0.2.200", 17, 5000, 53);
        assert_eq!(send(&e, Zone::Edge, &dns, 0, 1), fwd);
        assert_eq!(send(&e, Zone::Edge, &dns, 0, 1), fwd);
        assert!(!in_kernel(&e, EDGE, &dns), "one-way so far");
        assert_eq!(send(&e, Zone::Onprem, &reversed(&dns), 0, 1), fwd);
        assert!(in_kernel(&e, EDGE, &dns) && in_kernel(&e, ONPREM, &reversed(&dns)));
        assert_eq!(e.counters.offloaded_now.load(Ordering::Relaxed), 2);

        // A reload takes every flow back; the next packet is checked
        // against the new policy, which no longer allows TCP to the server.
        e.set_policy(compile(&policy.replace("tcp/80, udp/53", "udp/53")));
        assert!(!in_kernel(&e, EDGE, &web) && !in_kernel(&e, ONPREM, &back));
        assert!(!in_kernel(&e, EDGE, &dns));
        assert_eq!(e.counters.offloaded_now.load(Ordering::Relaxed), 0);
        assert_eq!(
            send(&e, Zone::Edge, &web, ACK, 10),
            Disposition::Drop(DropReason::Revoked)
        );
        // The UDP flow, still allowed, is offloaded again at its next packet.
        assert_eq!(send(&e, Zone::Edge, &dns, 0, 1), fwd);
        assert!(in_kernel(&e, EDGE, &dns));

        // A TCP flow's close is palisade's to see: the fast path lets go.
        e.set_policy(compile(policy));
        let w2 = k("192.0.2.12", "192.0.2.200", 6, 40002, 80);
        assert_eq!(send(&e, Zone::Edge, &w2, SYN, 0), fwd);
        assert_eq!(send(&e, Zone::Onprem, &reversed(&w2), SYN | ACK, 0), fwd);
        assert_eq!(send(&e, Zone::Edge, &w2, ACK, 0), fwd);
        assert!(in_kernel(&e, EDGE, &w2));
        assert_eq!(send(&e, Zone::Edge, &w2, FIN | ACK, 0), fwd);
        assert!(in_kernel(&e, EDGE, &w2), "half-closed: still the kernel's");
        assert_eq!(send(&e, Zone::Onprem, &reversed(&w2), FIN | ACK, 0), fwd);
        assert!(!in_kernel(&e, EDGE, &w2) && !in_kernel(&e, ONPREM, &reversed(&w2)));

        // Shutdown ends every flow and empties the map.
        e.flush();
        assert!(!in_kernel(&e, EDGE, &dns));
        assert_eq!(e.counters.offloaded_now.load(Ordering::Relaxed), 0);
    }
}
