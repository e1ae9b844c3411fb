//! The connection table: flows the policy admitted, so their replies pass.
//!
//! A flow is stored under the key of its first packet (the *original*
//! direction); a packet matches it either way round. TCP is tracked through
//! its handshake and teardown (SYN sent, SYN received, established, closing,
//! closed) with a timeout per state; UDP and ICMP echo by timeouts (shorter
//! until a reply was seen). The table is bounded: when it is full, the
//! oldest embryonic flow (a TCP handshake that never completed, or UDP/ICMP
//! that never saw a reply) is evicted first, and only if there is none does
//! a new flow get refused — an established flow is never pushed out by a
//! flood of new ones.
//!
//! Time is passed in (`now`, a monotonic `Duration` since an origin the
//! caller chooses), so the state machine is tested without clocks.

use crate::classify::{FlowKey, RuleId};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Duration;

/// Timeouts per state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub tcp_closed: Duration,
    pub udp_unreplied: Duration,
    pub udp_replied: Duration,
    pub icmp: Duration,
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // Close to Linux conntrack's defaults.
        Timeouts {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(5 * 24 * 3600),
            tcp_closing: Duration::from_secs(120),
            tcp_closed: Duration::from_secs(10),
            udp_unreplied: Duration::from_secs(30),
            udp_replied: Duration::from_secs(120),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    SynSent,
    SynReceived,
    Established,
    /// One side sent FIN.
    Closing,
    /// Both FINs, or a RST.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Tcp(TcpState),
    /// UDP, ICMP echo and other protocols: whether a reply was seen.
    Datagram {
        replied: bool,
    },
}

/// Which way a packet travels relative to the flow's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Original,
    Reply,
}

/// Packets and bytes one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

/// One tracked flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The first packet's key.
    pub key: FlowKey,
    pub state: State,
    /// The rule that admitted it.
    pub rule: Option<RuleId>,
    /// That rule's name in the policy that admitted it, for its records
    /// (a later policy may number its rules otherwise).
    pub rule_name: std::sync::Arc<str>,
    /// The policy (sha256) that admitted it, for its records.
    pub policy: std::sync::Arc<str>,
    /// The generation of that policy ([`crate::policy::Policy::generation`]),
    /// to re-check the flow when decisions change.
    pub generation: u64,
    pub created: Duration,
    pub last_seen: Duration,
    pub original: Counts,
    pub reply: Counts,
    /// Handed to the kernel fast path: the ports (interface indexes) its
    /// original and reply directions arrive on, which key its map entries.
    /// Its counts then cover only what palisade itself forwarded.
    pub offloaded: Option<(u32, u32)>,
    /// The fast path refused it (its map full): not offered again.
    pub offload_refused: bool,
    fin_original: bool,
    fin_reply: bool,
    /// The direction a RST came from, the state it ended and when.
    reset_by: Option<(Direction, TcpState, Duration)>,
}

impl Flow {
    fn embryonic(&self) -> bool {
        matches!(
            self.state,
            State::Tcp(TcpState::SynSent | TcpState::SynReceived)
                | State::Datagram { replied: false }
        )
    }

    fn timeout(&self, t: &Timeouts) -> Duration {
        match self.state {
            State::Tcp(TcpState::SynSent | TcpState::SynReceived) => t.tcp_syn,
            State::Tcp(TcpState::Established) => t.tcp_established,
            State::Tcp(TcpState::Closing) => t.tcp_closing,
            State::Tcp(TcpState::Closed) => t.tcp_closed,
            State::Datagram { replied } => {
                if self.key.proto == 1 || self.key.proto == 58 {
                    t.icmp
                } else if self.key.proto == 17 {
                    if replied {
                        t.udp_replied
                    } else {
                        t.udp_unreplied
                    }
                } else {
                    t.other
                }
            }
        }
    }

    pub fn expires_at(&self, t: &Timeouts) -> Duration {
        self.last_seen + self.timeout(t)
    }
}

/// The table's lookup key: the flow's identity regardless of direction.
/// ICMP echo flows are identified by their identifier, not type/code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub a: IpAddr,
    pub b: IpAddr,
    pub proto: u8,
    pub pa: u16,
    pub pb: u16,
}

/// How long after a reset its claimed sender must still be sending for the
/// reset to count as forged: longer than segments sent before it take to
/// arrive out of order.
const RESET_SETTLE: Duration = Duration::from_secs(1);

/// `ConnKey::pb` of an echo exchange. Other ICMP messages are keyed by
/// type and code (both below 256), so no other message can take an echo
/// flow's key: a timestamp request (type 13) is not a reply to ping id 13.
pub const ECHO: u16 = 0x100;

impl ConnKey {
    /// The key of a packet as seen in its own direction.
    pub fn of(key: &FlowKey, echo_id: Option<u16>) -> ConnKey {
        match echo_id {
            Some(id) => ConnKey {
                a: key.src,
                b: key.dst,
                proto: key.proto,
                pa: id,
                pb: ECHO,
            },
            None => ConnKey {
                a: key.src,
                b: key.dst,
                proto: key.proto,
                pa: key.src_port,
                pb: key.dst_port,
            },
        }
    }

    /// Whether this is the key of an echo exchange (ping).
    pub fn is_echo(&self) -> bool {
        self.pb == ECHO && (self.proto == 1 || self.proto == 58)
    }

    /// The table's key of the flow a packet with this key belongs to, the
    /// packet travelling in `dir`.
    pub fn original(&self, dir: Direction) -> ConnKey {
        match dir {
            Direction::Original => *self,
            Direction::Reply => self.reversed(),
        }
    }

    pub fn reversed(&self) -> ConnKey {
        if self.is_echo() {
            // Echo: the identifier is the same both ways.
            return ConnKey {
                a: self.b,
                b: self.a,
                ..*self
            };
        }
        ConnKey {
            a: self.b,
            b: self.a,
            proto: self.proto,
            pa: self.pb,
            pb: self.pa,
        }
    }
}

/// A flow the policy just admitted.
#[derive(Debug, Clone)]
pub struct NewFlow {
    /// The first packet's key.
    pub key: FlowKey,
    /// The ICMP echo identifier, for echo flows.
    pub echo_id: Option<u16>,
    pub rule: Option<RuleId>,
    /// That rule's name in the policy that admitted it.
    pub rule_name: std::sync::Arc<str>,
    /// The policy (sha256) that admitted it, and its generation.
    pub policy: std::sync::Arc<str>,
    pub generation: u64,
    pub tcp_flags: u8,
    /// Packets the first frame carried (a segment-offload super-frame
    /// carries several) and their bytes.
    pub packets: u64,
    pub bytes: u64,
}

/// Why a flow could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    #[error("connection table full of established flows")]
    Full,
}

/// A flow that left the table, for its `flow_end` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub flow: Flow,
    pub why: EndReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Timeout,
    Closed,
    Evicted,
    /// A reload's policy no longer allows it.
    Revoked,
    /// The filter stopped while it was open.
    Stopped,
}

/// The bounded connection table.
#[derive(Debug)]
pub struct ConnTable {
    flows: HashMap<ConnKey, Flow>,
    /// Embryonic flows by creation time, for eviction.
    embryonic: BTreeSet<(Duration, ConnKey)>,
    capacity: usize,
    pub timeouts: Timeouts,
    pub evicted: u64,
    pub refused: u64,
}

impl ConnTable {
    pub fn new(capacity: usize, timeouts: Timeouts) -> ConnTable {
        ConnTable {
            flows: HashMap::with_capacity(capacity.min(1 << 16)),
            embryonic: BTreeSet::new(),
            capacity: capacity.max(1),
            timeouts,
            evicted: 0,
            refused: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The flow a packet belongs to, and which way it travels. An expired
    /// flow is not found (the caller's next `expire` collects it), except
    /// an offloaded one: only the kernel knows when it was last seen, so
    /// only `expire_with` ends it.
    pub fn find(&self, k: &ConnKey, now: Duration) -> Option<(&Flow, Direction)> {
        let (f, d) = match self.flows.get(k) {
            Some(f) => (f, Direction::Original),
            None => (self.flows.get(&k.reversed())?, Direction::Reply),
        };
        (f.offloaded.is_some() || f.expires_at(&self.timeouts) > now).then_some((f, d))
    }

    /// Ends the expired flows, either way round, that stand where a new
    /// flow with key `k` is about to be added, so that each gets its record.
    pub fn take_expired(&mut self, k: &ConnKey, now: Duration) -> Vec<Ended> {
        let t = self.timeouts;
        [*k, k.reversed()]
            .iter()
            .filter(|key| {
                self.flows
                    .get(key)
                    .is_some_and(|f| f.offloaded.is_none() && f.expires_at(&t) <= now)
            })
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|key| self.remove(&key, EndReason::Timeout))
            .collect()
    }

    /// Adds a flow for a packet the policy allowed; its first packet's TCP
    /// flags set the initial TCP state. Returns the flow's table key and
    /// the flow evicted to make room, if any.
    pub fn insert(
        &mut self,
        new: NewFlow,
        now: Duration,
    ) -> Result<(ConnKey, Option<Ended>), InsertError> {
        let NewFlow {
            key,
            echo_id,
            rule,
            rule_name,
            policy,
            generation,
            tcp_flags,
            packets,
            bytes,
        } = new;
        let k = ConnKey::of(&key, echo_id);
        let mut evicted = None;
        if self.flows.len() >= self.capacity && !self.flows.contains_key(&k) {
            match self.embryonic.pop_first() {
                Some((_, victim)) => {
                    if let Some(flow) = self.flows.remove(&victim) {
                        self.evicted += 1;
                        evicted = Some(Ended {
                            flow,
                            why: EndReason::Evicted,
                        });
                    }
                }
                None => {
                    self.refused += 1;
                    return Err(InsertError::Full);
                }
            }
        }
        let state = if key.proto == 6 {
            if tcp_flags & crate::packet::tcp_flags::SYN != 0
                && tcp_flags & crate::packet::tcp_flags::ACK == 0
            {
                State::Tcp(TcpState::SynSent)
            } else {
                // Picked up mid-stream (e.g. after a restart): treat as
                // established once the policy allowed it.
                State::Tcp(TcpState::Established)
            }
        } else {
            State::Datagram { replied: false }
        };
        let flow = Flow {
            key,
            state,
            rule,
            rule_name,
            policy,
            generation,
            created: now,
            last_seen: now,
            original: Counts { packets, bytes },
            reply: Counts::default(),
            offloaded: None,
            offload_refused: false,
            fin_original: false,
            reset_by: None,
            fin_reply: false,
        };
        if flow.embryonic() {
            self.embryonic.insert((now, k));
        }
        if let Some(old) = self.flows.insert(k, flow) {
            self.embryonic.remove(&(old.created, k));
        }
        Ok((k, evicted))
    }

    /// Accounts a packet of an existing flow and advances its state.
    /// Returns the flow's state after the packet.
    pub fn update(
        &mut self,
        k: &ConnKey,
        dir: Direction,
        tcp_flags: u8,
        (packets, bytes): (u64, u64),
        now: Duration,
    ) -> Option<State> {
        let key = k.original(dir);
        let flow = self.flows.get_mut(&key)?;
        let was_embryonic = flow.embryonic();
        flow.last_seen = now;
        let c = match dir {
            Direction::Original => &mut flow.original,
            Direction::Reply => &mut flow.reply,
        };
        c.packets += packets;
        c.bytes += bytes;
        use crate::packet::tcp_flags::{ACK, FIN, RST, SYN};
        flow.state = match flow.state {
            State::Tcp(s) if tcp_flags & RST != 0 => {
                // Who reset an open connection, and when, in case the reset
                // was not theirs (see below).
                if matches!(s, TcpState::Established | TcpState::Closing) {
                    flow.reset_by = Some((dir, s, now));
                }
                State::Tcp(TcpState::Closed)
            }
            // The side a reset came from goes on sending, a second or more
            // later (not a segment it sent before the reset, arriving
            // late): that endpoint did not send the reset (a host that
            // resets a connection sends nothing more on it), so someone
            // else forged it, and the connection is what it was.
            State::Tcp(TcpState::Closed)
                if tcp_flags & (RST | SYN) == 0
                    && flow.reset_by.is_some_and(|(by, _, at)| {
                        by == dir && now.saturating_sub(at) >= RESET_SETTLE
                    }) =>
            {
                let before = flow.reset_by.take().map_or(TcpState::Established, |r| r.1);
                State::Tcp(before)
            }
            State::Tcp(s) => State::Tcp({
                match (s, dir) {
                    (TcpState::SynSent, Direction::Reply)
                        if tcp_flags & SYN != 0 && tcp_flags & ACK != 0 =>
                    {
                        TcpState::SynReceived
                    }
                    (TcpState::SynReceived, Direction::Original)
                        if tcp_flags & ACK != 0 && tcp_flags & SYN == 0 =>
                    {
                        TcpState::Established
                    }
                    (TcpState::Established | TcpState::Closing, _) if tcp_flags & FIN != 0 => {
                        match dir {
                            Direction::Original => flow.fin_original = true,
                            Direction::Reply => flow.fin_reply = true,
                        }
                        if flow.fin_original && flow.fin_reply {
                            TcpState::Closed
                        } else {
                            TcpState::Closing
                        }
                    }
                    (s, _) => s,
                }
            }),
            State::Datagram { replied } => State::Datagram {
                replied: replied || dir == Direction::Reply,
            },
        };
        if was_embryonic && !flow.embryonic() {
            let created = flow.created;
            self.embryonic.remove(&(created, key));
        }
        Some(flow.state)
    }

    /// Marks a flow as admitted by another policy (after a reload that still
    /// allows it).
    pub fn readmit(
        &mut self,
        k: &ConnKey,
        policy: std::sync::Arc<str>,
        generation: u64,
        rule: Option<RuleId>,
        rule_name: std::sync::Arc<str>,
    ) {
        if let Some(f) = self.flows.get_mut(k) {
            f.policy = policy;
            f.generation = generation;
            f.rule = rule;
            f.rule_name = rule_name;
        }
    }

    /// Removes a flow (a reload revoked it, say).
    pub fn remove(&mut self, k: &ConnKey, why: EndReason) -> Option<Ended> {
        let key = if self.flows.contains_key(k) {
            *k
        } else {
            k.reversed()
        };
        let flow = self.flows.remove(&key)?;
        self.embryonic.remove(&(flow.created, key));
        Some(Ended { flow, why })
    }

    /// Removes every flow whose time is up; returns them for their records.
    /// Work is bounded by `max` flows per call.
    /// Removes every flow, as ended by the filter's stop.
    pub fn drain(&mut self) -> Vec<Ended> {
        let all: Vec<ConnKey> = self.flows.keys().copied().collect();
        all.iter()
            .filter_map(|k| self.remove(k, EndReason::Stopped))
            .collect()
    }

    pub fn expire(&mut self, now: Duration, max: usize) -> Vec<Ended> {
        self.expire_with(now, max, |_| None)
    }

    /// As [`ConnTable::expire`], but first asks `last_seen` when an
    /// offloaded flow that looks idle was last seen by the kernel fast path,
    /// and keeps it if that is recent enough.
    pub fn expire_with(
        &mut self,
        now: Duration,
        max: usize,
        mut last_seen: impl FnMut(&Flow) -> Option<Duration>,
    ) -> Vec<Ended> {
        let t = self.timeouts;
        let dead: Vec<ConnKey> = self
            .flows
            .iter()
            .filter(|(_, f)| f.expires_at(&t) <= now)
            .map(|(k, _)| *k)
            .take(max)
            .collect();
        dead.into_iter()
            .filter_map(|k| {
                let f = self.flows.get_mut(&k)?;
                if f.offloaded.is_some() && now != Duration::MAX {
                    if let Some(seen) = last_seen(f) {
                        f.last_seen = f.last_seen.max(seen);
                    }
                    if f.expires_at(&t) > now {
                        return None;
                    }
                }
                let why = match f.state {
                    State::Tcp(TcpState::Closed) => EndReason::Closed,
                    _ => EndReason::Timeout,
                };
                self.remove(&k, why)
            })
            .collect()
    }

    /// A flow by its table key (the original direction's).
    pub fn get_mut(&mut self, k: &ConnKey) -> Option<&mut Flow> {
        self.flows.get_mut(k)
    }

    /// The table keys of the flows handed to the kernel fast path.
    pub fn offloaded(&self) -> Vec<ConnKey> {
        self.flows
            .iter()
            .filter(|(_, f)| f.offloaded.is_some())
            .map(|(k, _)| *k)
            .collect()
    }

    /// Every flow, for a reload to re-check against the new policy.
    pub fn keys(&self) -> Vec<(ConnKey, FlowKey)> {
        self.flows.iter().map(|(k, f)| (*k, f.key)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tcp_flags::{ACK, FIN, RST, SYN};

    fn key(sport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: "192.0.2.10".parse().unwrap(),
            dst: "198.51.100.20".parse().unwrap(),
            proto,
            src_port: sport,
            dst_port: 443,
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn nf(key: FlowKey, rule: Option<RuleId>, tcp_flags: u8, bytes: u64) -> NewFlow {
        let echo_id = (key.proto == 1).then_some(77);
        NewFlow {
            key,
            echo_id,
            rule,
            rule_name: "r".into(),
            policy: "sha".into(),
            generation: 0,
            tcp_flags,
            packets: 1,
            bytes,
        }
    }

    #[test]
    fn tcp_handshake_and_teardown() {
        let mut t = ConnTable::new(10, Timeouts::default());
        let k = key(40000, 6);
        let ck = ConnKey::of(&k, None);
        t.insert(nf(k, Some(0), SYN, 60), s(0)).unwrap();
        let reply = ck.reversed();
        let (_, d) = t.find(&reply, s(1)).unwrap();
        assert_eq!(d, Direction::Reply);
        assert_eq!(
            t.update(&reply, d, SYN | ACK, (1, 60), s(1)),
            Some(State::Tcp(TcpState::SynReceived))
        );
        assert_eq!(
            t.update(&ck, Direction::Original, ACK, (1, 52), s(1)),
            Some(State::Tcp(TcpState::Established))
        );
        // Established flows are long-lived.
        assert!(t.find(&ck, s(3600)).is_some());
        assert_eq!(
            t.update(&ck, Direction::Original, FIN | ACK, (1, 52), s(10)),
            Some(State::Tcp(TcpState::Closing))
        );
        assert_eq!(
            t.update(&reply, Direction::Reply, FIN | ACK, (1, 52), s(10)),
            Some(State::Tcp(TcpState::Closed))
        );
        let ended = t.expire(s(21), 100);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].why, EndReason::Closed);
        assert_eq!(ended[0].flow.original.packets, 3);
        assert_eq!(ended[0].flow.reply.packets, 2);
        assert!(t.is_empty());
    }

    #[test]
    fn rst_closes_and_syn_times_out() {
        let mut t = ConnTable::new(10, Timeouts::default());
        let k = key(1, 6);
        let ck = ConnKey::of(&k, None);
        t.insert(nf(k, None, SYN, 60), s(0)).unwrap();
        assert_eq!(
            t.update(&ck.reversed(), Direction::Reply, RST, (1, 40), s(1)),
            Some(State::Tcp(TcpState::Closed))
        );
        let k2 = key(2, 6);
        let ck2 = ConnKey::of(&k2, None);
        t.insert(nf(k2, None, SYN, 60), s(0)).unwrap();
        assert!(t.find(&ck2, s(59)).is_some());
        assert!(t.find(&ck2, s(61)).is_none());
    }

    /// A RST the claimed sender then contradicts (it goes on sending) was
    /// forged: the connection stays as it was. One it does not contradict
    /// closes the connection.
    #[test]
    fn a_reset_contradicted_by_its_sender_is_undone() {
        let mut t = ConnTable::new(10, Timeouts::default());
        let k = key(1, 6);
        let ck = ConnKey::of(&k, None);
        t.insert(nf(k, None, SYN, 60), s(0)).unwrap();
        t.update(&ck.reversed(), Direction::Reply, SYN | ACK, (1, 60), s(0));
        t.update(&ck, Direction::Original, ACK, (1, 40), s(0));
        let established = Some(State::Tcp(TcpState::Established));
        // A RST claiming to be from the server, then the server's data.
        assert_eq!(
            t.update(&ck.reversed(), Direction::Reply, RST, (1, 40), s(1)),
            Some(State::Tcp(TcpState::Closed))
        );
        assert_eq!(
            t.update(&ck, Direction::Original, ACK, (1, 40), s(1)),
            Some(State::Tcp(TcpState::Closed)),
            "the other side's data says nothing about the reset"
        );
        assert_eq!(
            t.update(&ck.reversed(), Direction::Reply, ACK, (1, 1000), s(1)),
            Some(State::Tcp(TcpState::Closed)),
            "at once: a segment sent before the reset, arriving late"
        );
        assert_eq!(
            t.update(&ck.reversed(), Direction::Reply, ACK, (1, 1000), s(2)),
            established
        );
        // A real reset from the client: nothing more from the client.
        assert_eq!(
            t.update(&ck, Direction::Original, RST | ACK, (1, 40), s(3)),
            Some(State::Tcp(TcpState::Closed))
        );
        assert_eq!(
            t.update(&ck.reversed(), Direction::Reply, ACK, (1, 1000), s(3)),
            Some(State::Tcp(TcpState::Closed))
        );
        assert!(
            t.find(&ck, s(14)).is_none(),
            "closed, it ends after the linger"
        );
    }

    #[test]
    fn udp_and_icmp_echo_by_timeout() {
        let mut t = ConnTable::new(10, Timeouts::default());
        let k = key(5353, 17);
        let ck = ConnKey::of(&k, None);
        t.insert(nf(k, None, 0, 80), s(0)).unwrap();
        assert!(t.find(&ck, s(29)).is_some());
        assert!(
            t.find(&ck, s(31)).is_none(),
            "unreplied UDP times out after 30 s"
        );
        t.update(&ck.reversed(), Direction::Reply, 0, (1, 80), s(10));
        assert!(t.find(&ck, s(100)).is_some(), "replied UDP lives longer");

        let echo = FlowKey {
            src_port: 8,
            dst_port: 0,
            ..key(0, 1)
        };
        t.insert(nf(echo, None, 0, 84), s(0)).unwrap();
        let reply = FlowKey {
            src: echo.dst,
            dst: echo.src,
            src_port: 0,
            ..echo
        };
        let (_, d) = t.find(&ConnKey::of(&reply, Some(77)), s(1)).unwrap();
        assert_eq!(d, Direction::Reply);
        assert!(
            t.find(&ConnKey::of(&reply, Some(78)), s(1)).is_none(),
            "another identifier is another flow"
        );
    }

    #[test]
    fn full_table_evicts_embryonic_first_and_never_established() {
        let mut t = ConnTable::new(3, Timeouts::default());
        // One established flow.
        let est = key(1, 6);
        let ek = ConnKey::of(&est, None);
        t.insert(nf(est, None, SYN, 60), s(0)).unwrap();
        t.update(&ek.reversed(), Direction::Reply, SYN | ACK, (1, 60), s(0));
        t.update(&ek, Direction::Original, ACK, (1, 60), s(0));
        // A SYN flood.
        for p in 2..1000u16 {
            let k = key(p, 6);
            let r = t.insert(nf(k, None, SYN, 60), s(u64::from(p)));
            assert!(r.is_ok());
            assert!(t.len() <= 3);
        }
        assert!(
            t.find(&ek, s(1000)).is_some(),
            "the established flow survived the flood"
        );
        assert!(t.evicted >= 990);
        // A table of established flows refuses new ones.
        let mut t = ConnTable::new(1, Timeouts::default());
        t.insert(nf(est, None, ACK, 60), s(0)).unwrap();
        let k = key(9, 6);
        assert_eq!(
            t.insert(nf(k, None, SYN, 60), s(1)).map(|_| ()),
            Err(InsertError::Full)
        );
    }

    #[test]
    fn an_offloaded_flow_lives_while_the_kernel_sees_it() {
        let t0 = Timeouts::default();
        let mut t = ConnTable::new(10, t0);
        let k = key(5000, 17);
        let ck = ConnKey::of(&k, None);
        t.insert(nf(k, None, 0, 60), s(0)).unwrap();
        t.update(&ck.reversed(), Direction::Reply, 0, (1, 60), s(1));
        t.get_mut(&ck).unwrap().offloaded = Some((2, 3));
        let idle = t0.udp_replied;
        // palisade saw nothing since second 1, but the kernel forwarded a
        // frame at `idle`: the flow stays, with its last-seen time moved.
        let ended = t.expire_with(s(1) + idle, 100, |f| {
            assert_eq!(f.offloaded, Some((2, 3)));
            Some(idle)
        });
        assert!(ended.is_empty());
        assert_eq!(t.find(&ck, s(1) + idle).unwrap().0.last_seen, idle);
        // Idle in the kernel too: it times out.
        let ended = t.expire_with(idle + idle, 100, |_| Some(idle));
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].why, EndReason::Timeout);
        // A flow palisade forwards itself is not asked about.
        let k2 = key(5001, 17);
        t.insert(nf(k2, None, 0, 60), s(0)).unwrap();
        let ended = t.expire_with(s(1000), 100, |_| panic!("not offloaded"));
        assert_eq!(ended.len(), 1);
    }
}
