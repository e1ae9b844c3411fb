//! Exports of a compiled policy into other enforcement languages.
//!
//! `nft`: an nftables ruleset (one `inet` table, a forward chain) that
//! enforces the same packet policy as palisade's inline filter: given the
//! interfaces of the two ports, a source outside the zone of the port it
//! arrived on is dropped first (anti-spoofing); replies and related ICMP
//! pass through connection tracking, the first packet of a flow is decided
//! by the rules in order, and the chain's policy is the default.

use super::{AddrSet, Policy, ServiceAtom, Verdict, Zone};
use crate::classify::Interval;
use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Name of the exported table.
pub const NFT_TABLE: &str = "palisade";

/// The interfaces of the filter's two ports on the host that loads the
/// ruleset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftPorts {
    /// Toward the provider edge and the VNet (`zone edge`).
    pub edge: String,
    /// Toward the on-premises routers (`zone onprem`).
    pub onprem: String,
}

/// An exported ruleset and what it leaves out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftExport {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Why a policy cannot be exported as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("the anti-spoofing check needs both `zone edge = ...` and `zone onprem = ...` in the policy (the addresses that may appear on each port), as the filter does")]
    MissingZones,
    #[error("`{0}` is not an interface name (1 to 15 bytes, no spaces, `/` or quotes)")]
    BadInterface(String),
    #[error("the edge and onprem ports need two different interfaces, both are `{0}`")]
    SameInterface(String),
}

fn check_interface(name: &str) -> Result<(), ExportError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '"' | '\\'));
    if ok {
        Ok(())
    } else {
        Err(ExportError::BadInterface(name.to_string()))
    }
}

/// A named interval set of one family's addresses (elements may be none).
fn write_set(out: &mut String, name: &str, v6: bool, set: &AddrSet) {
    let elems = if v6 {
        v6_elems(&set.v6)
    } else {
        v4_elems(&set.v4)
    };
    write_elems_set(out, name, v6, &elems);
}

/// A named interval set holding `elems` (addresses, prefixes or ranges).
fn write_elems_set(out: &mut String, name: &str, v6: bool, elems: &[String]) {
    let _ = writeln!(out, "\tset {name} {{");
    let _ = writeln!(
        out,
        "\t\ttype {}",
        if v6 { "ipv6_addr" } else { "ipv4_addr" }
    );
    let _ = writeln!(out, "\t\tflags interval");
    if !elems.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
    }
    let _ = writeln!(out, "\t}}");
}

fn v4_elems(set: &[Interval<u32>]) -> Vec<String> {
    set.iter()
        .map(|iv| {
            let mut s = AddrSet::default();
            s.add_v4(iv.lo, iv.hi);
            let d = s.describe();
            if d.contains('-') || d.contains('/') || iv.lo == iv.hi {
                d
            } else {
                format!("{}-{}", Ipv4Addr::from(iv.lo), Ipv4Addr::from(iv.hi))
            }
        })
        .collect()
}

fn v6_elems(set: &[Interval<u128>]) -> Vec<String> {
    set.iter()
        .map(|iv| {
            let mut s = AddrSet::default();
            s.add_v6(iv.lo, iv.hi);
            let d = s.describe();
            if d.contains('-') || d.contains('/') || iv.lo == iv.hi {
                d
            } else {
                format!("{}-{}", Ipv6Addr::from(iv.lo), Ipv6Addr::from(iv.hi))
            }
        })
        .collect()
}

fn set_expr(elems: &[String]) -> String {
    if elems.len() == 1 {
        elems[0].clone()
    } else {
        format!("{{ {} }}", elems.join(", "))
    }
}

fn range(iv: Interval<u16>) -> String {
    if iv.lo == iv.hi {
        iv.lo.to_string()
    } else {
        format!("{}-{}", iv.lo, iv.hi)
    }
}

fn full16(iv: Interval<u16>) -> bool {
    iv.lo == 0 && iv.hi == 65535
}

/// The nft match for one service atom in one family, or `None` when the
/// atom cannot apply to the family.
fn service_expr(s: &ServiceAtom, v6: bool) -> Option<String> {
    if (v6 && !s.fits_v6()) || (!v6 && !s.fits_v4()) {
        return None;
    }
    let mut e = String::new();
    match (s.proto.lo, s.proto.hi) {
        (0, 255) => {}
        (p, q) if p == q => {
            let name = match p {
                6 => Some("tcp"),
                17 => Some("udp"),
                132 => Some("sctp"),
                _ => None,
            };
            match name {
                Some(n) => {
                    let _ = write!(e, "meta l4proto {n}");
                    if !full16(s.src_port) {
                        let _ = write!(e, " {n} sport {}", range(s.src_port));
                    }
                    if !full16(s.dst_port) {
                        let _ = write!(e, " {n} dport {}", range(s.dst_port));
                    }
                }
                None if p == 1 || p == 58 => {
                    let fam = if p == 1 { "icmp" } else { "icmpv6" };
                    let _ = write!(e, "meta l4proto {fam}");
                    if !full16(s.src_port) {
                        let _ = write!(e, " {fam} type {}", range(s.src_port));
                    }
                    if !full16(s.dst_port) {
                        let _ = write!(e, " {fam} code {}", range(s.dst_port));
                    }
                }
                None => {
                    let _ = write!(e, "meta l4proto {p}");
                }
            }
        }
        (p, q) => {
            let _ = write!(e, "meta l4proto {p}-{q}");
        }
    }
    Some(e)
}

/// The address match of a rule line; `None` is any address of the family.
fn family_rule(src: Option<&str>, dst: Option<&str>, addr_kw: &str) -> String {
    let mut e = String::new();
    if let Some(src) = src {
        let _ = write!(e, "{addr_kw} saddr {src} ");
    }
    if let Some(dst) = dst {
        let _ = write!(e, "{addr_kw} daddr {dst} ");
    }
    if src.is_none() && dst.is_none() {
        let _ = write!(
            e,
            "meta nfproto {} ",
            if addr_kw == "ip" { "ipv4" } else { "ipv6" }
        );
    }
    e
}

fn escape_comment(s: &str) -> String {
    s.chars().filter(|c| *c != '"' && !c.is_control()).collect()
}

/// nftables refuses a rule comment longer than this many bytes.
const NFT_COMMENT_MAX: usize = 128;
/// nftables refuses a log prefix longer than this many bytes.
const NFT_LOG_PREFIX_MAX: usize = 127;

/// `s` escaped for a quoted nftables string and cut to at most `max` bytes
/// on a character boundary (the full name stays in the `# rule` line).
fn nft_string(s: &str, max: usize) -> String {
    let mut e = escape_comment(s);
    if e.len() > max {
        let mut end = max;
        while !e.is_char_boundary(end) {
            end -= 1;
        }
        e.truncate(end);
    }
    e
}

/// The policy as an nftables ruleset, loadable with `nft -f`. With `ports`,
/// the ruleset drops what the filter drops as spoofed; without them a
/// policy's zones are left out, and a warning says so.
pub fn nft(policy: &Policy, ports: Option<&NftPorts>) -> Result<NftExport, ExportError> {
    let zones = policy.zones();
    let mut warnings = Vec::new();
    let spoofing: Option<[(Zone, &str, AddrSet); 2]> = match ports {
        Some(p) => {
            check_interface(&p.edge)?;
            check_interface(&p.onprem)?;
            if p.edge == p.onprem {
                return Err(ExportError::SameInterface(p.edge.clone()));
            }
            let (Some(edge), Some(onprem)) = (&zones.edge, &zones.onprem) else {
                return Err(ExportError::MissingZones);
            };
            Some([
                (Zone::Edge, p.edge.as_str(), edge.clone()),
                (Zone::Onprem, p.onprem.as_str(), onprem.clone()),
            ])
        }
        None => {
            if zones.edge.is_some() || zones.onprem.is_some() {
                warnings.push(
                    "the policy has zones, but without --edge IFACE and --onprem IFACE the ruleset does not drop spoofed sources as the filter does".to_string(),
                );
            }
            None
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "#!/usr/sbin/nft -f");
    let _ = writeln!(
        out,
        "# Generated by palisade from the policy with sha256 {}.",
        policy.sha256()
    );
    let _ = writeln!(
        out,
        "# Load with: nft -f FILE (replaces the table `inet {NFT_TABLE}`)."
    );
    let _ = writeln!(out, "table inet {NFT_TABLE}");
    let _ = writeln!(out, "delete table inet {NFT_TABLE}");
    for w in &warnings {
        let _ = writeln!(out, "# WARNING: {w}.");
    }
    let _ = writeln!(out, "table inet {NFT_TABLE} {{");
    if let Some(sets) = &spoofing {
        for (zone, _, set) in sets {
            for v6 in [false, true] {
                write_set(&mut out, &zone_set(*zone, v6), v6, set);
            }
        }
    }
    // A rule's address lists of more than one element become named sets
    // (`r3_src_v4`), which `nft list set` shows and a reviewer can read;
    // a single address or prefix stays inline.
    let mut addrs: Vec<[FamilyAddrs; 2]> = Vec::new();
    for (i, r) in policy.rules().iter().enumerate().filter(|(_, r)| r.active) {
        let mut fam = |v6: bool, src: Vec<String>, dst: Vec<String>| {
            let tag = if v6 { "v6" } else { "v4" };
            let mut expr = |side: &str, elems: &[String]| {
                if elems.len() > 1 {
                    let name = format!("r{i}_{side}_{tag}");
                    write_elems_set(&mut out, &name, v6, elems);
                    format!("@{name}")
                } else {
                    set_expr(elems)
                }
            };
            let any = AddrSet::any();
            let (any_src, any_dst) = if v6 {
                (r.src.v6 == any.v6, r.dst.v6 == any.v6)
            } else {
                (r.src.v4 == any.v4, r.dst.v4 == any.v4)
            };
            let present = !src.is_empty() && !dst.is_empty();
            FamilyAddrs {
                v6,
                present,
                src: (present && !any_src).then(|| expr("src", &src)),
                dst: (present && !any_dst).then(|| expr("dst", &dst)),
            }
        };
        let v4 = fam(false, v4_elems(&r.src.v4), v4_elems(&r.dst.v4));
        let v6 = fam(true, v6_elems(&r.src.v6), v6_elems(&r.dst.v6));
        addrs.push([v4, v6]);
    }
    let _ = writeln!(out, "\tchain forward {{");
    let default = match policy.default_verdict() {
        Verdict::Allow => "accept",
        Verdict::Deny => "drop",
    };
    let _ = writeln!(
        out,
        "\t\ttype filter hook forward priority filter; policy {default};"
    );
    if let Some(sets) = &spoofing {
        let _ = writeln!(
            out,
            "\t\t# Anti-spoofing: a source outside the zone of the port it arrived on."
        );
        for (zone, iface, _) in sets {
            for (v6, kw) in [(false, "ip"), (true, "ip6")] {
                let _ = writeln!(
                    out,
                    "\t\tiifname \"{iface}\" {kw} saddr != @{} counter drop comment \"spoofed: not in zone {}\"",
                    zone_set(*zone, v6),
                    zone.as_str()
                );
            }
        }
    }
    // As the filter: an ICMP redirect is route advice, not a flow's
    // error, though the kernel counts it related; it falls through to the
    // policy's rules below, like other ICMP.
    let _ = writeln!(out, "\t\tct state established accept");
    let _ = writeln!(out, "\t\tct state related meta l4proto != icmp accept");
    let _ = writeln!(out, "\t\tct state related icmp type != redirect accept");
    let _ = writeln!(out, "\t\tct state invalid drop");
    // As the filter: a TCP flow starts with a SYN without ACK, never with a
    // packet picked up mid-stream.
    let _ = writeln!(
        out,
        "\t\tct state new tcp flags & (syn | ack) != syn counter drop comment \"tcp: not a connection opening\""
    );
    for (r, fams) in policy.rules().iter().filter(|r| r.active).zip(&addrs) {
        let verdict = match r.verdict {
            Verdict::Allow => "accept",
            Verdict::Deny => "drop",
        };
        let log = if r.log {
            // "palisade " and the closing space take 10 bytes.
            format!(
                "log prefix \"palisade {} \" ",
                nft_string(&r.name, NFT_LOG_PREFIX_MAX - 10)
            )
        } else {
            String::new()
        };
        // A rule with an expiry date stops matching new connections when
        // its date ends (midnight UTC), as in palisade: the kernel compares
        // its clock with the instant in seconds since the epoch.
        let until = r.expires.map_or(String::new(), |d| {
            format!("meta time < {} ", (d.unix_days() + 1) * 86_400)
        });
        let _ = writeln!(
            out,
            "\t\t# rule {} ({})",
            escape_comment(&r.name),
            escape_comment(&r.location.to_string())
        );
        for f in fams.iter().filter(|f| f.present) {
            let addr = family_rule(
                f.src.as_deref(),
                f.dst.as_deref(),
                if f.v6 { "ip6" } else { "ip" },
            );
            for s in &r.services {
                if let Some(svc) = service_expr(s, f.v6) {
                    let sep = if svc.is_empty() { "" } else { " " };
                    let _ = writeln!(
                        out,
                        "\t\t{addr}{svc}{sep}{until}{log}counter {verdict} comment \"{}\"",
                        nft_string(&r.name, NFT_COMMENT_MAX)
                    );
                }
            }
        }
    }
    if policy.default_decision().log {
        let _ = writeln!(
            out,
            "\t\tlog prefix \"palisade default \" counter {default} comment \"default\""
        );
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
    Ok(NftExport {
        text: out,
        warnings,
    })
}

/// One family of a rule's addresses, as the chain's rule writes them.
struct FamilyAddrs {
    v6: bool,
    /// The rule has sources and destinations in this family.
    present: bool,
    /// `@set` or an inline element or set; `None` for any address.
    src: Option<String>,
    dst: Option<String>,
}

fn zone_set(zone: Zone, v6: bool) -> String {
    format!("zone_{}_{}", zone.as_str(), if v6 { "v6" } else { "v4" })
}
