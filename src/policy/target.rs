//! How a proxy request names its destination: a host name, or an IP
//! literal in any spelling. The proxy reads CONNECT authorities and request
//! targets with [`parse_host`], and `expect` and `explain` read their URLs
//! with it too, so a policy's tests decide exactly what the proxy decides.
//!
//! A host that looks like an IPv4 literal is read the way `inet_aton` reads
//! it (`2130706433`, `0x7f.1`, `017700000001` and `127.1` are all
//! 127.0.0.1), so no spelling slips past the checks and reaches the
//! resolver; IPv6 literals are bracketed, and IPv4-mapped, IPv4-compatible
//! and NAT64 forms are checked as the IPv4 address they carry.

use super::HttpHost;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How a request names its destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A normalised host name (lower case, no trailing dot).
    Name(String),
    Ip(IpAddr),
}

fn parse_part(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        return if radix == 16 { None } else { Some(0) };
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .filter(|v| *v <= u32::MAX as u64)
}

/// Reads an IPv4 literal in any spelling `inet_aton` accepts.
pub fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    // At most four parts, read without allocating: this runs for every
    // request whose target is an address.
    let mut nums = [0u64; 4];
    let mut n = 0;
    for p in s.split('.') {
        *nums.get_mut(n)? = parse_part(p)?;
        n += 1;
    }
    let (last, head) = nums[..n].split_last()?;
    if head.iter().any(|&n| n > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - head.len() as u32);
    if rest_bits < 32 && *last >= (1u64 << rest_bits) {
        return None;
    }
    let mut v: u64 = 0;
    for (i, &n) in head.iter().enumerate() {
        v |= n << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from((v | last) as u32))
}

/// Whether `s` is shaped like an IPv4 literal (digits, dots, 0x-hex parts):
/// such a host is never sent to DNS.
pub(crate) fn looks_numeric(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|p| {
            let b = p.as_bytes();
            match b {
                [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
                [] => false,
                digits => digits.iter().all(u8::is_ascii_digit),
            }
        })
}

/// Why a host cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("`{0}` is neither a host name nor an IP address")]
    Invalid(String),
}

/// The port after a host's `:` in a request target or CONNECT authority:
/// `None` for an empty one (the scheme's default), else 1-65535 written in
/// decimal digits only (`+80`, `0` and `0x50` are refused, never read as
/// some other port).
pub fn parse_port(p: &str) -> Result<Option<u16>, String> {
    if p.is_empty() {
        return Ok(None);
    }
    match p.parse::<u16>() {
        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(format!("port {p} is not a port number (1-65535)")),
    }
}

/// Reads the host of a request target or CONNECT authority.
pub fn parse_host(raw: &str) -> Result<Host, HostError> {
    let bad = || HostError::Invalid(raw.chars().take(100).collect());
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(bad)?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| bad())?;
        return Ok(Host::Ip(IpAddr::V6(ip)));
    }
    // The usual spelling first: a plain dotted quad reads the same
    // strictly as it does the way `inet_aton` reads it.
    if let Ok(ip) = raw.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if raw.contains(':') {
        if let Ok(ip) = raw.parse::<Ipv6Addr>() {
            return Ok(Host::Ip(IpAddr::V6(ip)));
        }
    }
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if looks_numeric(trimmed) {
        return parse_ipv4_loose(trimmed)
            .map(|a| Host::Ip(IpAddr::V4(a)))
            .ok_or_else(bad);
    }
    super::normalize_host(raw).map(Host::Name).ok_or_else(bad)
}

/// The IPv4 address an IPv6 address carries, if it is a mapped,
/// compatible or NAT64 (64:ff9b::/96) form.
pub fn embedded_ipv4(a: &Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = a.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = a.segments();
    let tail = v4_of(s[6], s[7]);
    if s[..6] == [0, 0, 0, 0, 0, 0] && u32::from(tail) > 1 {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    None
}

/// The IPv4 address two IPv6 segments hold.
pub(crate) fn v4_of(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(hi) << 16 | u32::from(lo))
}

/// The address to check: IPv4 for the IPv6 forms that carry one.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => embedded_ipv4(&a).map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl Host {
    /// What the policy decides on: the canonical address for a literal
    /// (IPv4 for the IPv6 forms that carry one), the name otherwise.
    pub fn to_http_host(&self) -> HttpHost {
        match self {
            Host::Name(n) => HttpHost::Name(n.clone()),
            Host::Ip(ip) => HttpHost::Ip(canonical(*ip)),
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
    fn names_and_junk() {
        assert_eq!(ip("Example.COM."), Host::Name("example.com".into()));
        assert_eq!(ip("deadbeef"), Host::Name("deadbeef".into()));
        for bad in [
            "256.0.0.1",
            "1.2.3.4.5",
            "0x",
            "[::1",
            "a b",
            "4294967296",
            "1.16777216",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
    }

    /// The plain reading the fast path must agree with: every step as
    /// the spelling rules say, allocating freely.
    fn parse_host_reference(raw: &str) -> Result<Host, HostError> {
        let bad = || HostError::Invalid(raw.chars().take(100).collect());
        if let Some(inner) = raw.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(bad)?;
            let ip: Ipv6Addr = inner.parse().map_err(|_| bad())?;
            return Ok(Host::Ip(IpAddr::V6(ip)));
        }
        if let Ok(ip) = raw.parse::<Ipv6Addr>() {
            return Ok(Host::Ip(IpAddr::V6(ip)));
        }
        let trimmed = raw.strip_suffix('.').unwrap_or(raw);
        let numeric = !trimmed.is_empty()
            && trimmed.split('.').all(|p| {
                !p.is_empty()
                    && (p.chars().all(|c| c.is_ascii_digit())
                        || ((p.starts_with("0x") || p.starts_with("0X"))
                            && p[2..].chars().all(|c| c.is_ascii_hexdigit())))
            });
        if numeric {
            let parts: Vec<&str> = trimmed.split('.').collect();
            let nums: Option<Vec<u64>> = if parts.len() > 4 {
                None
            } else {
                parts.iter().map(|p| parse_part(p)).collect()
            };
            let ip = nums.and_then(|nums| {
                let (last, head) = nums.split_last()?;
                if head.iter().any(|&n| n > 255) {
                    return None;
                }
                let rest_bits = 8 * (4 - head.len() as u32);
                if rest_bits < 32 && *last >= (1u64 << rest_bits) {
                    return None;
                }
                let mut v = 0u64;
                for (i, &n) in head.iter().enumerate() {
                    v |= n << (24 - 8 * i as u32);
                }
                Some(Ipv4Addr::from((v | last) as u32))
            });
            return ip.map(|a| Host::Ip(IpAddr::V4(a))).ok_or_else(bad);
        }
        crate::policy::normalize_host(raw)
            .map(Host::Name)
            .ok_or_else(bad)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]
        #[test]
        fn parse_host_agrees_with_the_plain_reading(
            raw in "(\\[?[0-9a-fA-FxX:.]{0,24}\\]?|[0-9]{1,12}|[a-z0-9.-]{0,20}|[0-9xX.]{0,20}|(0?[0-9]{1,3}\\.){1,4}(0?[0-9]{1,3}|0x[0-9a-f]{1,3})\\.?)"
        ) {
            proptest::prop_assert_eq!(parse_host(&raw), parse_host_reference(&raw), "{}", raw);
        }
    }
}
