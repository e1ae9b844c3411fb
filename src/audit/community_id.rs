//! Community ID v1 (corelight/community-id-spec): a flow hash that other
//! tools (Zeek, Suricata, Elastic) compute the same way, so an auditor can
//! pivot from a palisade record to their logs of the same connection.

use base64::Engine as _;
use sha1::{Digest, Sha1};
use std::net::IpAddr;

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMPV6: u8 = 58;
const SCTP: u8 = 132;

/// The Community ID v1 string (`1:<base64 sha1>`) of a flow, with seed 0
/// unless the deployment chose another. For ICMP and ICMPv6, `src_port` is
/// the type and `dst_port` the code, as the spec says. Protocols without
/// ports ignore the port arguments. Returns `None` when the two addresses
/// are of different families, which no real flow has.
pub fn community_id_v1(
    seed: u16,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    proto: u8,
    src_port: u16,
    dst_port: u16,
) -> Option<String> {
    let (mut sport, mut dport) = (src_port, dst_port);
    let mut one_way = false;
    match proto {
        ICMP | ICMPV6 => {
            let counterpart = if proto == ICMP {
                icmp4_counterpart(src_port as u8)
            } else {
                icmp6_counterpart(src_port as u8)
            };
            match counterpart {
                Some(peer) => dport = u16::from(peer),
                None => one_way = true,
            }
        }
        _ => {}
    }
    let (mut a, mut b) = match (src_ip, dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpOctets::V4(s.octets()), IpOctets::V4(d.octets())),
        (IpAddr::V6(s), IpAddr::V6(d)) => (IpOctets::V6(s.octets()), IpOctets::V6(d.octets())),
        _ => return None,
    };
    // Both directions of a flow hash alike: order the endpoints, unless the
    // ICMP message has no reply type (then direction is meaningful).
    if !one_way && (a > b || (a == b && sport > dport)) {
        std::mem::swap(&mut a, &mut b);
        std::mem::swap(&mut sport, &mut dport);
    }
    let mut h = Sha1::new();
    h.update(seed.to_be_bytes());
    h.update(a.as_slice());
    h.update(b.as_slice());
    h.update([proto, 0]);
    if matches!(proto, ICMP | ICMPV6 | TCP | UDP | SCTP) {
        h.update(sport.to_be_bytes());
        h.update(dport.to_be_bytes());
    }
    let digest = h.finalize();
    // "1:" and 28 characters of base64 (a 20-byte digest), built in place:
    // every proxy record carries one.
    let mut id = String::with_capacity(30);
    id.push_str("1:");
    base64::engine::general_purpose::STANDARD.encode_string(digest, &mut id);
    Some(id)
}

/// An address's bytes without an allocation; both of a flow's addresses
/// are of one family, and they order as the byte strings they are.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum IpOctets {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl IpOctets {
    fn as_slice(&self) -> &[u8] {
        match self {
            IpOctets::V4(o) => o,
            IpOctets::V6(o) => o,
        }
    }
}

// Request/reply pairs from the spec; a type not listed is one-way.
fn icmp4_counterpart(t: u8) -> Option<u8> {
    Some(match t {
        8 => 0,
        0 => 8,
        13 => 14,
        14 => 13,
        15 => 16,
        16 => 15,
        10 => 9,
        9 => 10,
        17 => 18,
        18 => 17,
        _ => return None,
    })
}

fn icmp6_counterpart(t: u8) -> Option<u8> {
    Some(match t {
        128 => 129,
        129 => 128,
        133 => 134,
        134 => 133,
        135 => 136,
        136 => 135,
        130 => 131,
        131 => 130,
        139 => 140,
        140 => 139,
        144 => 145,
        145 => 144,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seed: u16, s: &str, d: &str, proto: u8, sp: u16, dp: u16) -> String {
        community_id_v1(seed, s.parse().unwrap(), d.parse().unwrap(), proto, sp, dp).unwrap()
    }

    // The spec's published baseline vectors (seed 0 and seed 1).
    #[test]
    fn published_vectors_seed_0() {
        assert_eq!(
            id(0, "1.2.3.4", "5.6.7.8", TCP, 1122, 3344),
            "1:wCb3OG7yAFWelaUydu0D+125CLM="
        );
        assert_eq!(
            id(0, "5.6.7.8", "1.2.3.4", TCP, 3344, 1122),
            "1:wCb3OG7yAFWelaUydu0D+125CLM="
        );
        assert_eq!(
            id(0, "1.2.3.4", "5.6.7.8", UDP, 1122, 3344),
            "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="
        );
        assert_eq!(
            id(0, "1.2.3.4", "5.6.7.8", ICMP, 8, 0),
            "1:crodRHL2FEsHjbv3UkRrfbs4bZ0="
        );
        assert_eq!(
            id(0, "5.6.7.8", "1.2.3.4", ICMP, 0, 0),
            "1:crodRHL2FEsHjbv3UkRrfbs4bZ0="
        );
        let (a, b) = (
            "fe80:1:203:405:607:809:a0b:c0d",
            "fe80:1011:1213:1415:1617:1819:1a1b:1c1d",
        );
        assert_eq!(
            id(0, a, b, ICMPV6, 128, 0),
            "1:0bf7hyMJUwt3fMED7z8LIfRpBeo="
        );
        assert_eq!(
            id(0, b, a, ICMPV6, 129, 0),
            "1:0bf7hyMJUwt3fMED7z8LIfRpBeo="
        );
        // A protocol without ports (RSVP).
        assert_eq!(
            id(0, "1.2.3.4", "5.6.7.8", 46, 0, 0),
            "1:ikv3kmf89luf73WPz1jOs49S768="
        );
    }

    #[test]
    fn published_vectors_seed_1() {
        assert_eq!(
            id(1, "1.2.3.4", "5.6.7.8", TCP, 1122, 3344),
            "1:HhA1B+6CoLbiKPEs5nhNYN4XWfk="
        );
        assert_eq!(
            id(1, "1.2.3.4", "5.6.7.8", UDP, 1122, 3344),
            "1:OShq+iKDAMVouh/4bMxB9Sz4amw="
        );
        assert_eq!(
            id(1, "1.2.3.4", "5.6.7.8", ICMP, 8, 0),
            "1:9pr4ZGTICiuZoIh90RRYE2RyXpU="
        );
        let (a, b) = (
            "fe80:1:203:405:607:809:a0b:c0d",
            "fe80:1011:1213:1415:1617:1819:1a1b:1c1d",
        );
        assert_eq!(
            id(1, a, b, ICMPV6, 128, 0),
            "1:IO27GQzPuCtNnwFvjWALMHu5tJE="
        );
    }

    #[test]
    fn mixed_families_have_no_id() {
        assert_eq!(
            community_id_v1(
                0,
                "1.2.3.4".parse().unwrap(),
                "::1".parse().unwrap(),
                TCP,
                1,
                2
            ),
            None
        );
    }
}
