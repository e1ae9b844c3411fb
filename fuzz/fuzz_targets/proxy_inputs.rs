//! Fuzzes what a client controls before the proxy decides: the host of a
//! request target or CONNECT authority, and a tunnel's first bytes.
//!
//! - A host reads the same after normalising (an IP literal in its usual
//!   spelling, a name as written back); a host read as a name is never one
//!   that an `inet_aton`-style reader would take for an IPv4 address, so no
//!   literal reaches the resolver past the address checks.
//! - The address checked is stable (`canonical` is idempotent) and an
//!   IPv6 form that carries an internal IPv4 address is internal itself.
//! - A ClientHello's server name, when one is read, is a DNS host name; an
//!   incomplete record asks for more than it has and at most one record.

#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::proxy::sni::{inspect, FirstBytes, MAX_RECORD};
use palisade::proxy::{canonical, internal_range, parse_host, parse_ipv4_loose, Host};
use std::net::IpAddr;

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = std::str::from_utf8(data) {
        match parse_host(raw) {
            Ok(Host::Ip(ip)) => {
                let written = match ip {
                    IpAddr::V4(a) => a.to_string(),
                    IpAddr::V6(a) => format!("[{a}]"),
                };
                assert_eq!(parse_host(&written), Ok(Host::Ip(ip)), "{raw:?}");
                let c = canonical(ip);
                assert_eq!(canonical(c), c);
                if internal_range(c).is_some() {
                    assert!(
                        internal_range(ip).is_some(),
                        "{raw:?}: {ip} carries internal {c}"
                    );
                }
            }
            Ok(Host::Name(name)) => {
                assert_eq!(parse_host(&name), Ok(Host::Name(name.clone())), "{raw:?}");
                let bare = name.strip_suffix('.').unwrap_or(&name);
                assert!(
                    parse_ipv4_loose(bare).is_none(),
                    "{raw:?} read as name {name:?}"
                );
                assert!(
                    bare.parse::<IpAddr>().is_err(),
                    "{raw:?} read as name {name:?}"
                );
            }
            Err(_) => {}
        }
    }
    match inspect(data) {
        FirstBytes::ClientHello {
            server_name: Some(name),
            ..
        } => {
            assert!(!name.is_empty() && name.len() <= 254, "{name:?}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'),
                "{name:?}"
            );
        }
        FirstBytes::Incomplete { need } => {
            assert!(
                need > data.len() && need <= MAX_RECORD,
                "need {need} of {}",
                data.len()
            );
        }
        _ => {}
    }
});
