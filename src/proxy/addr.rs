//! Destination addresses: the ranges no request may reach unless the policy
//! names them. How a host is spelled and read lives in
//! [`crate::policy::target`], shared with the policy's own tests.

use crate::policy::target::v4_of;
pub use crate::policy::target::{canonical, parse_host, parse_ipv4_loose, Host};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn in_v4(a: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(a: Ipv6Addr, net: u128, len: u32) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(a) & mask == net & mask
}

/// Why an address is internal, or `None` for a public address. Internal:
/// this-network, loopback, RFC 1918, CGNAT, link-local (with the cloud
/// metadata address 169.254.169.254), IETF protocol assignments, benchmarking,
/// multicast, reserved and broadcast; for IPv6 unspecified, loopback,
/// link-local, unique-local, site-local, multicast, discard-only, local-use
/// NAT64, and 6to4 addresses that carry an internal IPv4 address.
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let table: &[([u8; 4], u32, &str)] = &[
                ([0, 0, 0, 0], 8, "this-network (0.0.0.0/8)"),
                ([10, 0, 0, 0], 8, "private (10.0.0.0/8)"),
                ([100, 64, 0, 0], 10, "carrier-grade NAT (100.64.0.0/10)"),
                ([127, 0, 0, 0], 8, "loopback (127.0.0.0/8)"),
                ([169, 254, 169, 254], 32, "cloud metadata (169.254.169.254)"),
                ([169, 254, 0, 0], 16, "link-local (169.254.0.0/16)"),
                ([172, 16, 0, 0], 12, "private (172.16.0.0/12)"),
                (
                    [192, 0, 0, 0],
                    24,
                    "IETF protocol assignments (192.0.0.0/24)",
                ),
                ([192, 168, 0, 0], 16, "private (192.168.0.0/16)"),
                ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
                ([224, 0, 0, 0], 4, "multicast (224.0.0.0/4)"),
                ([240, 0, 0, 0], 4, "reserved (240.0.0.0/4)"),
            ];
            table
                .iter()
                .find(|(n, l, _)| in_v4(a, *n, *l))
                .map(|(_, _, why)| *why)
        }
        IpAddr::V6(a) => {
            let table: &[(u128, u32, &str)] = &[
                (0, 128, "unspecified (::)"),
                (1, 128, "loopback (::1)"),
                (0xfe80 << 112, 10, "link-local (fe80::/10)"),
                (0xfc00 << 112, 7, "unique-local (fc00::/7)"),
                (0xff00 << 112, 8, "multicast (ff00::/8)"),
                (0x0100 << 112, 64, "discard-only (100::/64)"),
                (0xfec0 << 112, 10, "site-local (fec0::/10, deprecated)"),
                (
                    0x0064_ff9b_0001 << 80,
                    48,
                    "local-use NAT64 (64:ff9b:1::/48)",
                ),
            ];
            if let Some((_, _, why)) = table.iter().find(|(n, l, _)| in_v6(a, *n, *l)) {
                return Some(why);
            }
            // 6to4 (2002::/16) carries an IPv4 address in its next 32 bits;
            // a relay would deliver to that address.
            let s = a.segments();
            if s[0] == 0x2002 && internal_range(IpAddr::V4(v4_of(s[1], s[2]))).is_some() {
                return Some("6to4 (2002::/16) form of an internal IPv4 address");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Host {
        parse_host(s).unwrap()
    }

    #[test]
    fn every_spelling_of_loopback_is_loopback() {
        let lo = Host::Ip("127.0.0.1".parse().unwrap());
        for s in [
            "127.0.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "017700000001",
            "0177.0.0.1",
            "127.1",
            "127.0.1",
            "127.0.0.1.",
        ] {
            assert_eq!(ip(s), lo, "{s}");
        }
        for s in [
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[::127.0.0.1]",
            "[64:ff9b::7f00:1]",
        ] {
            let Host::Ip(a) = ip(s) else { panic!() };
            assert_eq!(canonical(a), "127.0.0.1".parse::<IpAddr>().unwrap(), "{s}");
            assert!(internal_range(a).is_some(), "{s}");
        }
    }

    #[test]
    fn internal_ranges() {
        for s in [
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "fec0::1",
            "64:ff9b:1::7f00:1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(internal_range(s.parse().unwrap()).is_some(), "{s}");
        }
        for s in [
            "203.0.113.7",
            "198.51.100.1",
            "2001:db8::1",
            "8.8.8.8",
            "2002:cb00:7107::1",
        ] {
            assert!(internal_range(s.parse().unwrap()).is_none(), "{s}");
        }
        assert_eq!(
            internal_range("169.254.169.254".parse().unwrap()),
            Some("cloud metadata (169.254.169.254)")
        );
    }
}
