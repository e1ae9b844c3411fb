//! Frames read off the wire, parsed into what the inline filter decides on.
//!
//! The contract, as in smoltcp's `wire` module: [`parse`] takes any bytes a
//! port delivered and either returns a [`Frame`] or an error; it never
//! panics, never reads past the buffer, and does a bounded amount of work
//! (IPv6 extension headers are followed at most [`MAX_EXT_HEADERS`] deep).
//! Once `parse` succeeded, nothing on the returned value can panic.
//!
//! Layers understood: Ethernet II with one or two 802.1Q/802.1ad tags, ARP,
//! IPv4 (options, fragments), IPv6 (extension headers, fragments), TCP, UDP,
//! SCTP, ICMP and ICMPv6 (with the original header carried by an error,
//! and neighbour discovery recognised). The flow key uses the classifier's
//! convention: ICMP type and code travel in the port fields.

use crate::classify::FlowKey;
use pnet_packet::ethernet::{EtherTypes, EthernetPacket};
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use std::net::IpAddr;

/// Deepest chain of IPv6 extension headers followed.
pub const MAX_EXT_HEADERS: usize = 8;

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("frame shorter than an Ethernet header")]
    ShortEthernet,
    #[error("truncated 802.1Q tag")]
    ShortVlan,
    #[error("malformed IPv4 header")]
    BadIpv4,
    #[error("malformed IPv6 header")]
    BadIpv6,
    #[error("IPv6 extension headers too deep or truncated")]
    BadExtension,
    #[error("not an Ethernet/IPv4 ARP message, or longer than one")]
    BadArp,
}

/// Where a packet sits in a fragmented datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the transport header. `end` is how
    /// many bytes of the datagram's fragmentable part it carries (for IPv6,
    /// the extension headers after the Fragment header and the transport
    /// header come first among them).
    First { id: u32, end: u16 },
    /// A later fragment: no transport header; it follows the first's
    /// verdict. `offset` is where its data starts in the datagram's
    /// fragmentable part, in bytes.
    Later { id: u32, offset: u16 },
}

impl Fragment {
    /// A datagram's place from its header's fragment offset and
    /// more-fragments flag; `carried` is the length of the data after the
    /// IP header (IPv4) or the Fragment header (IPv6).
    fn of(offset: u16, more: bool, id: u32, carried: usize) -> Fragment {
        match (offset, more) {
            (0, false) => Fragment::Whole,
            (0, true) => Fragment::First {
                id,
                end: carried.min(usize::from(u16::MAX)) as u16,
            },
            _ => Fragment::Later {
                id,
                offset: offset << 3,
            },
        }
    }

    /// Whether this is a later fragment whose data starts inside the
    /// shortest transport header of `proto`: it would overwrite, at the
    /// receiver, header bytes the first fragment carried and the filter
    /// judged (RFC 1858's overlapping fragment attack: a TCP fragment at
    /// offset 8 rewrites the flags). No fragmenting router makes one,
    /// since fragments split on 8-byte units after the whole header.
    pub fn overlaps_transport_header(self, proto: u8) -> bool {
        let header = match proto {
            6 => 20,   // TCP
            132 => 12, // SCTP
            _ => 8,    // UDP, ICMP, ICMPv6, and at least the ports of others
        };
        matches!(self, Fragment::Later { offset, .. } if offset < header)
    }
}

/// What an ICMP or ICMPv6 message means to the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    /// Echo request or reply, with its identifier.
    Echo {
        id: u16,
        request: bool,
    },
    /// An error about another packet, whose flow key is carried.
    Error {
        about: FlowKey,
    },
    /// IPv6 neighbour solicitation and advertisement, and multicast
    /// listener discovery: link control that passes like ARP. Router
    /// solicitations and advertisements and redirects are not: route
    /// advice does not cross the boundary (they are `Other`).
    NeighborDiscovery,
    Other,
}

/// An IP packet's header facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket {
    pub key: FlowKey,
    /// TCP flags (0 when not TCP or no transport header).
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// Set for ICMP and ICMPv6 with a readable header.
    pub icmp: Option<IcmpKind>,
    /// Bytes from the IP header on.
    pub ip_len: usize,
    /// False when the transport header was missing or cut short (ports are
    /// then 0).
    pub transport_complete: bool,
    /// The sender chose the route: an IPv4 loose or strict source route
    /// option, or an IPv6 type 0 routing header with segments left (RFC
    /// 5095 deprecates it). Such a packet is not forwarded.
    pub source_routed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Arp,
    Ip(IpPacket),
    /// Any other EtherType.
    Other,
}

/// A parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// 802.1Q VLAN id of the outermost tag, if tagged.
    pub vlan: Option<u16>,
    /// The EtherType after any tags.
    pub ethertype: u16,
    pub payload: Payload,
}

pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;

    /// A connection's opening segment: SYN, without ACK, FIN or RST.
    pub fn opens(flags: u8) -> bool {
        flags & (SYN | ACK | FIN | RST) == SYN
    }

    /// SYN with FIN or RST: a segment no connection sends, which stacks
    /// read differently (a scanner's and an evader's combination).
    pub fn contradictory(flags: u8) -> bool {
        flags & SYN != 0 && flags & (FIN | RST) != 0
    }
}

/// Parses a frame as a port delivered it.
pub fn parse(bytes: &[u8]) -> Result<Frame, ParseError> {
    let eth = EthernetPacket::new(bytes).ok_or(ParseError::ShortEthernet)?;
    let mut ethertype = eth.get_ethertype().0;
    let mut offset = 14;
    let mut vlan = None;
    // 802.1Q (0x8100) and 802.1ad (0x88a8), at most two tags.
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        let tag = bytes.get(offset..offset + 4).ok_or(ParseError::ShortVlan)?;
        if vlan.is_none() {
            vlan = Some(u16::from_be_bytes([tag[0], tag[1]]) & 0x0fff);
        }
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
    }
    let l3 = &bytes[offset.min(bytes.len())..];
    let payload = match ethertype {
        t if t == EtherTypes::Arp.0 => {
            // Only ARP as Ethernet carries it for IPv4 (RFC 826): request or
            // reply, 28 bytes and at most the padding to a minimum frame,
            // so the EtherType carries no other data across.
            let ok = l3.len() <= 46
                && l3.get(..8).is_some_and(|h| {
                    h[..6] == [0, 1, 8, 0, 6, 4] && matches!(h[6..8], [0, 1] | [0, 2])
                })
                && l3.len() >= 28;
            if !ok {
                return Err(ParseError::BadArp);
            }
            Payload::Arp
        }
        t if t == EtherTypes::Ipv4.0 => Payload::Ip(parse_ipv4(l3)?),
        t if t == EtherTypes::Ipv6.0 => Payload::Ip(parse_ipv6(l3)?),
        _ => Payload::Other,
    };
    Ok(Frame {
        vlan,
        ethertype,
        payload,
    })
}

/// Transport facts: (src port or ICMP type, dst port or ICMP code, TCP
/// flags, ICMP meaning, complete?).
fn transport(
    proto: u8,
    l4: &[u8],
    v6: bool,
    depth: usize,
) -> (u16, u16, u8, Option<IcmpKind>, bool) {
    // A packet's own transport header must be whole to count as complete
    // (a first fragment that splits it is refused: RFC 1858, RFC 8200
    // section 4.5); the header an ICMP error quotes is read as far as its
    // ports, which the first 4 bytes hold.
    let quoted = depth > 0;
    let ports = |h: &[u8]| {
        (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
        )
    };
    let whole = |len: usize| quoted || l4.len() >= len;
    match proto {
        6 => match l4.get(..4) {
            Some(h) => {
                let (sp, dp) = ports(h);
                let flags = l4.get(13).copied().unwrap_or(0);
                (sp, dp, flags, None, whole(20))
            }
            None => (0, 0, 0, None, false),
        },
        17 | 132 | 136 => match l4.get(..4) {
            Some(h) => {
                let (sp, dp) = ports(h);
                (sp, dp, 0, None, whole(if proto == 132 { 12 } else { 8 }))
            }
            None => (0, 0, 0, None, false),
        },
        1 | 58 => match l4.get(..8) {
            Some(h) => {
                let (ty, code) = (h[0], h[1]);
                let id = u16::from_be_bytes([h[4], h[5]]);
                let kind = if !v6 {
                    match ty {
                        8 => IcmpKind::Echo { id, request: true },
                        0 => IcmpKind::Echo { id, request: false },
                        // Not 5 (redirect): a redirect is advice on routes
                        // that no router beyond this boundary may give the
                        // VNet (RFC 1812 5.2.7.2), not a flow's error; the
                        // policy judges it like any other ICMP.
                        3 | 4 | 11 | 12 => inner_key(&l4[8..], false, depth)
                            .map(|about| IcmpKind::Error { about })
                            .unwrap_or(IcmpKind::Other),
                        _ => IcmpKind::Other,
                    }
                } else {
                    match ty {
                        128 => IcmpKind::Echo { id, request: true },
                        129 => IcmpKind::Echo { id, request: false },
                        1..=4 => inner_key(&l4[8..], true, depth)
                            .map(|about| IcmpKind::Error { about })
                            .unwrap_or(IcmpKind::Other),
                        // Multicast listener discovery (MLDv1 query,
                        // report, done; MLDv2 report) and neighbour
                        // solicitation and advertisement: link-scope
                        // control, checked below. Router solicitation and
                        // advertisement (133, 134) and redirect (137) are
                        // route advice, for the policy to judge.
                        130..=132 | 143 | 135 | 136 => IcmpKind::NeighborDiscovery,
                        _ => IcmpKind::Other,
                    }
                };
                (u16::from(ty), u16::from(code), 0, Some(kind), true)
            }
            None => (0, 0, 0, None, false),
        },
        _ => (0, 0, 0, None, true),
    }
}

/// The flow key of the packet an ICMP error quotes (one level only).
fn inner_key(quoted: &[u8], v6: bool, depth: usize) -> Option<FlowKey> {
    if depth > 0 {
        return None;
    }
    let p = if v6 {
        ipv6_inner(quoted, depth + 1)
    } else {
        ipv4_inner(quoted, depth + 1)
    }?;
    Some(p.key)
}

/// The longest neighbour solicitation or advertisement that passes as link
/// control: 24 bytes and three 8-byte options.
const NEIGHBOR_MESSAGE_MAX: usize = 48;

/// Whether a neighbour solicitation or advertisement (`m`, from its ICMPv6
/// type on) holds only what neighbour discovery puts there: reserved bits
/// clear (an advertisement's router, solicited and override flags aside),
/// and options that are each a source or target link-layer address or a
/// nonce, 8 bytes long, at most [`NEIGHBOR_MESSAGE_MAX`] in all.
fn plain_neighbor_message(m: &[u8]) -> bool {
    if m.len() < 24 || m.len() > NEIGHBOR_MESSAGE_MAX || (m.len() - 24) % 8 != 0 {
        return false;
    }
    let flags_mask = if m[0] == 136 { 0x1f } else { 0xff };
    // The target is a unicast address (RFC 4861 sections 7.1.1, 7.1.2).
    if m[4] & flags_mask != 0 || m[5..8] != [0, 0, 0] || m[8] == 0xff {
        return false;
    }
    // Each option at most once: a source address in a solicitation, a
    // target address in an advertisement, a nonce.
    let mut seen = 0u8;
    m[24..].chunks(8).all(|o| {
        let bit = match (o[0], m[0]) {
            (1, 135) => 1,
            (2, 136) => 2,
            (14, _) => 4,
            _ => return false,
        };
        let first = seen & bit == 0;
        seen |= bit;
        first && o[1] == 1
    })
}

/// Most records an MLDv2 report may hold to pass as link control (a
/// router or host on the circuit listens to a handful of groups).
const MLD_RECORDS_MAX: usize = 32;

/// Whether a multicast listener discovery message (RFC 2710, RFC 3810) is
/// only what the protocol carries: its fixed part, reserved fields zero,
/// multicast groups, and for MLDv2 exactly the records its count
/// announces (at most [`MLD_RECORDS_MAX`]), with no sources and no
/// auxiliary data (none is defined). Anything else in it would carry data
/// past the policy; source-specific listening is left to the policy.
fn plain_listener_message(m: &[u8]) -> bool {
    let multicast = |a: &[u8]| a[0] == 0xff;
    if m.len() < 8 || m[1] != 0 {
        return false;
    }
    match (m[0], m.get(8..24)) {
        // Query: a group, or none for a general query; MLDv2 adds the
        // querier's flags and interval, and no sources (a source-specific
        // query is ordinary ICMPv6).
        (130, Some(group)) => {
            let v2_ok = match &m[24..] {
                [] => true,
                [flags, _, 0, 0] => flags & 0xf0 == 0,
                _ => false,
            };
            v2_ok && m[6..8] == [0, 0] && (multicast(group) || group.iter().all(|&b| b == 0))
        }
        // MLDv1 report and done: the group only.
        (131 | 132, Some(group)) => m.len() == 24 && m[4..8] == [0; 4] && multicast(group),
        // MLDv2 report: records of a group each, 20 bytes with no sources
        // (source-specific listening is ordinary ICMPv6).
        (143, _) => {
            let records = usize::from(u16::from_be_bytes([m[6], m[7]]));
            m[4..6] == [0, 0]
                && records <= MLD_RECORDS_MAX
                && m.len() == 8 + 20 * records
                && m[8..].chunks(20).all(|r| {
                    (1..=6).contains(&r[0]) && r[1..4] == [0, 0, 0] && multicast(&r[4..20])
                })
        }
        _ => false,
    }
}

/// Whether hop-by-hop options are one Router Alert for MLD (RFC 2711 value
/// 0) and padding of zero bytes, as MLD messages are sent (RFC 3810
/// section 5).
fn plain_router_alert(mut options: &[u8]) -> bool {
    let mut alert = false;
    while let Some(&kind) = options.first() {
        match kind {
            0 => options = &options[1..],
            1 | 5 => {
                let Some(len) = options.get(1).map(|&l| usize::from(l)) else {
                    return false;
                };
                let Some(value) = options.get(2..2 + len) else {
                    return false;
                };
                if kind == 5 {
                    if alert || value != [0, 0] {
                        return false;
                    }
                    alert = true;
                } else if value.iter().any(|&b| b != 0) {
                    return false;
                }
                options = &options[2 + len..];
            }
            _ => return false,
        }
    }
    alert
}

/// Whether IPv4 options hold a loose (131) or strict (137) source route;
/// `None` when the list is malformed (an option's length under 2 or past
/// the header), which receivers read differently.
fn ipv4_source_routed(mut options: &[u8]) -> Option<bool> {
    while let Some(&kind) = options.first() {
        match kind {
            0 => return Some(false),
            1 => options = &options[1..],
            _ => {
                let len = options.get(1).copied().unwrap_or(0) as usize;
                if len < 2 || len > options.len() {
                    return None;
                }
                if matches!(kind, 131 | 137) {
                    return Some(true);
                }
                options = &options[len..];
            }
        }
    }
    Some(false)
}

fn ipv4_inner(l3: &[u8], depth: usize) -> Option<IpPacket> {
    parse_ipv4_at(l3, depth, true).ok()
}

fn ipv6_inner(l3: &[u8], depth: usize) -> Option<IpPacket> {
    parse_ipv6_at(l3, depth, true).ok()
}

fn parse_ipv4(l3: &[u8]) -> Result<IpPacket, ParseError> {
    parse_ipv4_at(l3, 0, false)
}

fn parse_ipv6(l3: &[u8]) -> Result<IpPacket, ParseError> {
    parse_ipv6_at(l3, 0, false)
}

/// `quoted`: the header comes from inside an ICMP error, where the datagram
/// is cut short and its length field cannot be trusted.
fn parse_ipv4_at(l3: &[u8], depth: usize, quoted: bool) -> Result<IpPacket, ParseError> {
    let ip = Ipv4Packet::new(l3).ok_or(ParseError::BadIpv4)?;
    let ihl = ip.get_header_length() as usize * 4;
    if ip.get_version() != 4 || ihl < 20 || ihl > l3.len() {
        return Err(ParseError::BadIpv4);
    }
    let total = ip.get_total_length() as usize;
    let end = if quoted {
        l3.len()
    } else {
        total.min(l3.len())
    };
    if !quoted && total < ihl {
        return Err(ParseError::BadIpv4);
    }
    let proto = ip.get_next_level_protocol().0;
    let frag_offset = ip.get_fragment_offset();
    let more = ip.get_flags() & 0b001 != 0;
    let id = u32::from(ip.get_identification());
    let fragment = Fragment::of(frag_offset, more, id, end.saturating_sub(ihl));
    let l4 = &l3[ihl..end.max(ihl)];
    let (src, dst) = (ip.get_source().into(), ip.get_destination().into());
    let mut p = ip_packet((src, dst, proto), fragment, l4, end, depth);
    p.source_routed = match ipv4_source_routed(&l3[20..ihl]) {
        Some(routed) => routed,
        // A quoted header is only read for its flow.
        None if quoted => false,
        None => return Err(ParseError::BadIpv4),
    };
    Ok(p)
}

/// The packet from its addresses and protocol, its place among fragments,
/// its transport bytes and its length; a later fragment has no transport
/// header to read.
fn ip_packet(
    (src, dst, proto): (IpAddr, IpAddr, u8),
    fragment: Fragment,
    l4: &[u8],
    ip_len: usize,
    depth: usize,
) -> IpPacket {
    let (sp, dp, flags, icmp, complete) = if matches!(fragment, Fragment::Later { .. }) {
        (0, 0, 0, None, false)
    } else {
        transport(proto, l4, src.is_ipv6(), depth)
    };
    IpPacket {
        key: FlowKey {
            src,
            dst,
            proto,
            src_port: sp,
            dst_port: dp,
        },
        tcp_flags: flags,
        fragment,
        icmp,
        ip_len,
        transport_complete: complete,
        source_routed: false,
    }
}

fn parse_ipv6_at(l3: &[u8], depth: usize, quoted: bool) -> Result<IpPacket, ParseError> {
    let ip = Ipv6Packet::new(l3).ok_or(ParseError::BadIpv6)?;
    if ip.get_version() != 6 {
        return Err(ParseError::BadIpv6);
    }
    let end = if quoted {
        l3.len()
    } else {
        (40 + ip.get_payload_length() as usize).min(l3.len())
    };
    let mut next = ip.get_next_header().0;
    let mut off = 40;
    let mut fragment = Fragment::Whole;
    let mut fragment_header = false;
    let mut source_routed = false;
    // Extension headers seen, and whether the only one is a hop-by-hop
    // header that holds a Router Alert and padding (as MLD is sent).
    let mut extensions = 0;
    let mut router_alert_only = false;
    for _ in 0..=MAX_EXT_HEADERS {
        if matches!(next, 0 | 43 | 60 | 44) {
            extensions += 1;
        }
        match next {
            // Hop-by-hop, routing, destination options.
            0 | 43 | 60 => {
                let h = l3.get(off..off + 2).ok_or(ParseError::BadExtension)?;
                if next == 0 && extensions == 1 {
                    let len = (h[1] as usize + 1) * 8;
                    router_alert_only = l3.get(off + 2..off + len).is_some_and(plain_router_alert);
                }
                if next == 43 {
                    let r = l3.get(off + 2..off + 4).ok_or(ParseError::BadExtension)?;
                    // A routing header of any type (0, Mobile IPv6's 2,
                    // RPL's 3, segment routing's 4) with segments left:
                    // the sender chose where the packet goes after its
                    // destination.
                    source_routed |= r[1] > 0;
                }
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Fragment header.
            44 => {
                // One fragment header per packet.
                if fragment_header {
                    return Err(ParseError::BadExtension);
                }
                fragment_header = true;
                let h = l3.get(off..off + 8).ok_or(ParseError::BadExtension)?;
                next = h[0];
                let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                let more = h[3] & 1 != 0;
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                off += 8;
                fragment = Fragment::of(offset, more, id, end.saturating_sub(off));
                // What follows the fragment header of a later fragment is
                // the datagram's data, not headers (RFC 8200 section 4.5):
                // it is never read as a header, nor as a second fragment
                // header standing in for this one.
                if offset != 0 {
                    break;
                }
            }
            _ => break,
        }
        if off > end {
            return Err(ParseError::BadExtension);
        }
    }
    if matches!(next, 0 | 43 | 60 | 44) && !matches!(fragment, Fragment::Later { .. }) {
        return Err(ParseError::BadExtension);
    }
    let l4 = l3.get(off..end).unwrap_or(&[]);
    let (src, dst) = (ip.get_source().into(), ip.get_destination().into());
    let mut p = ip_packet((src, dst, next), fragment, l4, end, depth);
    p.source_routed = source_routed;
    // Neighbour discovery is valid only as RFC 4861 section 6.1/7.1 says:
    // hop limit 255 (so it was sent on this link, not routed here), code 0,
    // not fragmented. Anything else of those types is ordinary ICMPv6,
    // which the policy judges.
    // MLD is valid only with hop limit 1 (RFC 2710 section 3, RFC 3810
    // section 5).
    let hops = match p.key.src_port {
        130..=132 | 143 => 1,
        _ => 255,
    };
    // A solicitation or advertisement is its 24 bytes and a few 8-byte
    // options (link-layer address, nonce), and MLD what its counts say:
    // anything else in them (a longer one, reserved bits set, other
    // options) would carry data past the policy.
    // Nothing rides along either: no extension header (but MLD's
    // hop-by-hop Router Alert), no bytes past the IPv6 payload length.
    let odd = if hops == 255 {
        !plain_neighbor_message(l4) || extensions != 0
    } else {
        !plain_listener_message(l4) || !(extensions == 0 || extensions == 1 && router_alert_only)
    } || end != l3.len();
    if p.icmp == Some(IcmpKind::NeighborDiscovery)
        && (ip.get_hop_limit() != hops
            || (hops == 255 && p.key.dst_port != 0)
            || p.fragment != Fragment::Whole
            || odd)
    {
        p.icmp = Some(IcmpKind::Other);
    }
    Ok(p)
}

/// Builders of test frames (used by this crate's tests and the dataplane's
/// in-memory port tests).
pub mod build {
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            sum += u32::from(w);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4 packet in an Ethernet frame; `l4` is the transport header and
    /// payload.
    pub fn ipv4(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        l4: &[u8],
        frag: (u16, bool, u16),
    ) -> Vec<u8> {
        let total = 20 + l4.len();
        let (id, more, offset) = frag;
        let flags_off = (u16::from(more) << 13) | (offset & 0x1fff);
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&flags_off.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(l4);
        ethernet(0x0800, &h)
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        h.extend_from_slice(&[next, 64]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(l4);
        ethernet(0x86dd, &h)
    }

    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }

    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    pub fn icmp_echo(ty: u8, id: u16) -> Vec<u8> {
        let mut i = vec![ty, 0, 0, 0];
        i.extend_from_slice(&id.to_be_bytes());
        i.extend_from_slice(&[0, 1]);
        i
    }

    /// An ARP request (Ethernet, IPv4), padded to a minimum frame.
    pub fn arp() -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.resize(46, 0);
        ethernet(0x0806, &a)
    }

    /// Adds an 802.1Q tag to an Ethernet frame.
    pub fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
        let mut f = frame[..12].to_vec();
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
        f.extend_from_slice(&frame[12..]);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// MLD passes as link control only as the protocol's own messages:
    /// nothing past what their counts announce, no sources, no auxiliary
    /// data, groups that are multicast, a bounded number of records.
    #[test]
    fn listener_discovery_carries_only_what_its_counts_say() {
        let group = |last: u8| {
            let mut g = [0u8; 16];
            (g[0], g[1], g[15]) = (0xff, 2, last);
            g
        };
        let host: [u8; 16] = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let plain = plain_listener_message;
        // MLDv1 report and done; more after them, or a unicast "group", no.
        let v1 = |t: u8| [[t, 0, 0, 0, 0, 0, 0, 0].as_slice(), &group(0x16)].concat();
        assert!(plain(&v1(131)) && plain(&v1(132)));
        assert!(!plain(&[v1(131).as_slice(), &[0; 8]].concat()));
        let mut unicast_group = v1(132);
        unicast_group[8] = 0x20;
        assert!(!plain(&unicast_group));
        // A general query (MLDv1), and an MLDv2 one; with a source, or a
        // reserved bit set, it is not link control.
        let q1 = [[130, 0, 0, 0, 0, 10, 0, 0].as_slice(), &[0; 16]].concat();
        assert!(plain(&q1));
        let q2 = [q1.as_slice(), &[0x02, 125, 0, 0]].concat();
        assert!(plain(&q2));
        assert!(!plain(&[q1.as_slice(), &[0x02, 125, 0, 1], &host].concat()));
        assert!(!plain(&[q1.as_slice(), &[0x12, 125, 0, 0]].concat()));
        // An MLDv2 report of two records.
        let record = |sources: &[[u8; 16]]| {
            let mut r = vec![1, 0];
            r.extend((sources.len() as u16).to_be_bytes());
            r.extend(group(0xfb));
            sources.iter().for_each(|s| r.extend(s));
            r
        };
        let report = |records: &[Vec<u8>]| {
            let mut r = vec![143, 0, 0, 0, 0, 0];
            r.extend((records.len() as u16).to_be_bytes());
            records.iter().for_each(|x| r.extend(x));
            r
        };
        let two = report(&[record(&[]), record(&[])]);
        assert!(plain(&two));
        assert!(plain(&report(&[])));
        // A byte too many, auxiliary data, a record count past the end, a
        // unicast group, a code, a source, too many records.
        assert!(!plain(&[two.as_slice(), &[0]].concat()));
        let changed = |at: usize, v: u8| {
            let mut r = two.clone();
            r[at] = v;
            r
        };
        assert!(!plain(&changed(9, 1)));
        assert!(!plain(&changed(7, 3)));
        assert!(!plain(&changed(32, 0x20)));
        assert!(!plain(&changed(1, 1)));
        assert!(!plain(&report(&[record(&[]), record(&[host])])));
        let many = vec![record(&[]); MLD_RECORDS_MAX];
        assert!(plain(&report(&many)));
        let more = vec![record(&[]); MLD_RECORDS_MAX + 1];
        assert!(!plain(&report(&more)));
        // A neighbour solicitation for a multicast target is not one.
        let ns = |target: [u8; 16]| [[135, 0, 0, 0, 0, 0, 0, 0].as_slice(), &target].concat();
        assert!(plain_neighbor_message(&ns(host)));
        assert!(!plain_neighbor_message(&ns(group(1))));
    }

    /// Link control carries nothing beside its message: no extension
    /// header but MLD's hop-by-hop Router Alert, no bytes past the IPv6
    /// payload length.
    #[test]
    fn link_control_carries_no_extension_headers_or_trailing_bytes() {
        let (ll, nodes) = ("fe80::1".parse().unwrap(), "ff02::1".parse().unwrap());
        let frame = |next: u8, l4: &[u8], hops: u8| {
            let mut f = ipv6(ll, nodes, next, l4);
            f[14 + 7] = hops;
            f
        };
        let kind = |f: &[u8]| ip(f).icmp;
        let nd = Some(IcmpKind::NeighborDiscovery);
        let na = [
            [136, 0, 0, 0, 0, 0, 0, 0].as_slice(),
            &[0x20, 1, 0xd, 0xb8],
            &[0; 12],
        ]
        .concat();
        assert_eq!(kind(&frame(58, &na, 255)), nd);
        // Behind a Destination Options header with 1 KB in a PadN-like
        // unknown option, or with 1 KB after the payload: ordinary ICMPv6.
        let mut opts = vec![58, 127, 0x3e, 254];
        opts.resize(1024, 0x41);
        assert_eq!(
            kind(&frame(60, &[opts.as_slice(), &na].concat(), 255)),
            Some(IcmpKind::Other)
        );
        let mut trailing = frame(58, &na, 255);
        trailing.extend_from_slice(&[0x41; 1024]);
        assert_eq!(kind(&trailing), Some(IcmpKind::Other));
        // MLD with its Router Alert passes; with any other option, no.
        let report = [143, 0, 0, 0, 0, 0, 0, 0];
        let hop_by_hop = |opt: &[u8]| [&[58, 0], opt, &report].concat();
        assert_eq!(kind(&frame(58, &report, 1)), nd);
        assert_eq!(kind(&frame(0, &hop_by_hop(&[5, 2, 0, 0, 1, 0]), 1)), nd);
        assert_eq!(
            kind(&frame(0, &hop_by_hop(&[5, 2, 0, 0, 1, 0]), 1)),
            nd,
            "a zero-length PadN"
        );
        assert_eq!(
            kind(&frame(0, &hop_by_hop(&[0x3e, 4, 1, 2, 3, 4]), 1)),
            Some(IcmpKind::Other)
        );
        // Padding only, padding that carries a byte, two alerts, an
        // alert for another protocol.
        assert!(!plain_router_alert(&[1, 0, 1, 0, 0, 0]));
        assert!(plain_router_alert(&[5, 2, 0, 0, 0, 0]));
        assert!(plain_router_alert(&[5, 2, 0, 0, 1, 0]));
        assert!(!plain_router_alert(&[5, 2, 0, 0, 1, 1, 0x41]));
        assert!(!plain_router_alert(&[5, 2, 0, 0, 5, 2, 0, 0]));
        assert!(!plain_router_alert(&[5, 2, 0, 1, 1, 0]));
    }

    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

    fn ip(f: &[u8]) -> IpPacket {
        match parse(f).unwrap().payload {
            Payload::Ip(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tcp_udp_icmp_keys() {
        let p = ip(&ipv4(
            A,
            B,
            6,
            &tcp(40000, 443, tcp_flags::SYN),
            (1, false, 0),
        ));
        assert_eq!(
            (p.key.proto, p.key.src_port, p.key.dst_port, p.tcp_flags),
            (6, 40000, 443, tcp_flags::SYN)
        );
        assert_eq!(p.fragment, Fragment::Whole);
        let p = ip(&ipv4(A, B, 17, &udp(5353, 53, b"q"), (1, false, 0)));
        assert_eq!((p.key.src_port, p.key.dst_port), (5353, 53));
        let p = ip(&ipv4(A, B, 1, &icmp_echo(8, 77), (1, false, 0)));
        assert_eq!((p.key.src_port, p.key.dst_port), (8, 0));
        assert_eq!(
            p.icmp,
            Some(IcmpKind::Echo {
                id: 77,
                request: true
            })
        );
    }

    #[test]
    fn icmp_error_carries_the_original_flow() {
        let original = ipv4(A, B, 17, &udp(5353, 53, b"query"), (9, false, 0));
        let mut err = vec![3, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&original[14..14 + 28]);
        let p = ip(&ipv4(B, A, 1, &err, (2, false, 0)));
        let Some(IcmpKind::Error { about }) = p.icmp else {
            panic!("{:?}", p.icmp)
        };
        assert_eq!(
            (about.src, about.dst, about.src_port, about.dst_port),
            (IpAddr::V4(A), IpAddr::V4(B), 5353, 53)
        );
    }

    #[test]
    fn fragments() {
        let first = ip(&ipv4(A, B, 17, &udp(1, 2, &[0; 32]), (7, true, 0)));
        // It carries the 8-byte UDP header and 32 bytes of data.
        assert_eq!(first.fragment, Fragment::First { id: 7, end: 40 });
        assert_eq!(first.key.dst_port, 2);
        let later = ip(&ipv4(A, B, 17, &[0; 16], (7, false, 5)));
        assert_eq!(later.fragment, Fragment::Later { id: 7, offset: 40 });
        assert_eq!((later.key.src_port, later.key.dst_port), (0, 0));
        // A TCP fragment at offset 8 or 16 lands inside the TCP header;
        // one at 24, and any UDP one, does not.
        let at = |units| ip(&ipv4(A, B, 6, &[0; 16], (7, false, units))).fragment;
        assert!(at(1).overlaps_transport_header(6));
        assert!(at(2).overlaps_transport_header(6));
        assert!(!at(3).overlaps_transport_header(6));
        assert!(!at(1).overlaps_transport_header(17));
        assert!(!first.fragment.overlaps_transport_header(6));
    }

    #[test]
    fn source_routes_are_marked() {
        // IPv4 with a loose source route option (after a no-op).
        let mut f = ipv4(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            17,
            &udp(1, 2, b""),
            (1, false, 0),
        );
        let opts = [1, 131, 7, 4, 192, 0, 2, 9];
        f[14] = 0x45 + 2;
        for (i, b) in opts.iter().enumerate() {
            f.insert(14 + 20 + i, *b);
        }
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        assert!(ip(&f).source_routed);
        assert!(
            !ip(&ipv4(
                "192.0.2.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap(),
                17,
                &udp(1, 2, b""),
                (1, false, 0)
            ))
            .source_routed
        );
        // IPv6 routing header type 0 with one segment left.
        let mut l4 = vec![17, 2, 0, 1, 0, 0, 0, 0];
        l4.extend_from_slice(&[0; 16]);
        l4.extend_from_slice(&udp(1, 2, b""));
        let a: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert!(ip(&ipv6(a, a, 43, &l4)).source_routed);
        l4[3] = 0;
        assert!(!ip(&ipv6(a, a, 43, &l4)).source_routed, "no segments left");
        // Any other routing type with segments left routes too (segment
        // routing's type 4, Mobile IPv6's 2, RPL's 3).
        for routing_type in [2, 3, 4] {
            l4[2] = routing_type;
            l4[3] = 1;
            assert!(
                ip(&ipv6(a, a, 43, &l4)).source_routed,
                "type {routing_type}"
            );
        }
        // An option list receivers would read differently (a length of 1
        // before a source route; a length past the header) is malformed.
        for opts in [[130, 1, 131, 7, 4, 192, 0, 2], [1, 1, 1, 1, 7, 12, 0, 0]] {
            let mut g = f.clone();
            g[14 + 20..14 + 28].copy_from_slice(&opts);
            assert_eq!(parse(&g).unwrap_err(), ParseError::BadIpv4, "{opts:?}");
        }
    }

    /// Router advertisements, router solicitations and redirects are route
    /// advice, not link control; nor is a solicitation long enough to carry
    /// data.
    #[test]
    fn only_neighbour_and_listener_messages_are_link_control() {
        let a: Ipv6Addr = "fe80::1".parse().unwrap();
        let all: Ipv6Addr = "ff02::1".parse().unwrap();
        let message = |ty: u8, len: usize| {
            let mut m = vec![ty, 0, 0, 0];
            m.resize(len, 0);
            let mut f = ipv6(a, all, 58, &m);
            f[14 + 7] = 255;
            ip(&f).icmp
        };
        // With a source link-layer address option: neighbour discovery.
        let with_option = |ty: u8, option: u8, len: u8| {
            let mut m = vec![ty, 0, 0, 0];
            m.resize(24, 0);
            m.extend_from_slice(&[option, len, 2, 0, 0, 0, 0, 1]);
            let mut f = ipv6(a, all, 58, &m);
            f[14 + 7] = 255;
            ip(&f).icmp
        };
        assert_eq!(with_option(135, 1, 1), Some(IcmpKind::NeighborDiscovery));
        assert_eq!(with_option(136, 2, 1), Some(IcmpKind::NeighborDiscovery));
        assert_eq!(message(135, 24), Some(IcmpKind::NeighborDiscovery));
        // An unknown option, a long one, or reserved bits set: not.
        assert_eq!(with_option(135, 200, 1), Some(IcmpKind::Other));
        assert_eq!(
            with_option(135, 14, 1),
            Some(IcmpKind::NeighborDiscovery),
            "nonce"
        );
        assert_eq!(with_option(135, 2, 1), Some(IcmpKind::Other), "TLLA in NS");
        assert_eq!(with_option(136, 1, 1), Some(IcmpKind::Other), "SLLA in NA");
        // The same option twice: room for data.
        let mut twice = vec![135, 0, 0, 0];
        twice.resize(24, 0);
        twice.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6, 14, 1, 7, 8, 9, 10, 11, 12]);
        let mut f = ipv6(a, all, 58, &twice);
        f[14 + 7] = 255;
        assert_eq!(ip(&f).icmp, Some(IcmpKind::Other));
        // An advertisement with the router, solicited and override flags.
        let mut na = vec![136, 0, 0, 0, 0xe0, 0, 0, 0];
        na.resize(24, 0);
        let mut f = ipv6(a, all, 58, &na);
        f[14 + 7] = 255;
        assert_eq!(ip(&f).icmp, Some(IcmpKind::NeighborDiscovery));
        assert_eq!(with_option(135, 1, 0), Some(IcmpKind::Other));
        let mut reserved = vec![135, 0, 0, 0, 0, 0, 0, 9];
        reserved.resize(24, 0);
        let mut f = ipv6(a, all, 58, &reserved);
        f[14 + 7] = 255;
        assert_eq!(ip(&f).icmp, Some(IcmpKind::Other));
        for ty in [133, 134, 137] {
            assert_eq!(message(ty, 64), Some(IcmpKind::Other), "type {ty}");
        }
        assert_eq!(message(135, 24 + 128), Some(IcmpKind::Other));
    }

    #[test]
    fn ipv6_and_vlan_and_arp() {
        let a6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let b6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let f = ipv6(a6, b6, 6, &tcp(1000, 22, tcp_flags::SYN));
        let p = ip(&f);
        assert_eq!((p.key.dst_port, p.key.proto), (22, 6));
        let tagged_frame = tagged(&f, 42);
        let fr = parse(&tagged_frame).unwrap();
        assert_eq!(fr.vlan, Some(42));
        assert!(matches!(fr.payload, Payload::Ip(_)));
        // Neighbour solicitation is neighbour discovery only as sent on
        // the link: hop limit 255 and code 0.
        let mut ns = ipv6(a6, b6, 58, &[[135, 0, 0, 0].as_slice(), &[0; 20]].concat());
        assert_eq!(ip(&ns).icmp, Some(IcmpKind::Other), "hop limit 64");
        ns[14 + 7] = 255;
        assert_eq!(ip(&ns).icmp, Some(IcmpKind::NeighborDiscovery));
        ns[14 + 40 + 1] = 1;
        assert_eq!(ip(&ns).icmp, Some(IcmpKind::Other), "code 1");
        assert_eq!(parse(&arp()).unwrap().payload, Payload::Arp);
    }

    #[test]
    fn never_panics_on_any_prefix_or_corruption() {
        let frames = [
            ipv4(A, B, 6, &tcp(1, 2, 2), (1, false, 0)),
            ipv6(
                "2001:db8::1".parse().unwrap(),
                "2001:db8::2".parse().unwrap(),
                44,
                &[17, 0, 0, 1, 0, 0, 0, 9, 0, 1, 0, 2, 0, 8, 0, 0],
            ),
            tagged(&ipv4(A, B, 1, &icmp_echo(8, 1), (1, false, 0)), 5),
        ];
        let mut x: u32 = 1;
        for f in &frames {
            for n in 0..=f.len() {
                let _ = parse(&f[..n]);
            }
            for _ in 0..2000 {
                let mut g = f.clone();
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % g.len();
                g[i] = (x >> 8) as u8;
                let _ = parse(&g);
            }
        }
    }
}
