//! Expectations: the policy's own tests (`expect allow tcp A:p -> B:q`).
//!
//! An expectation names a probe (a packet flow or a proxy request) and the
//! verdict, and optionally the rule, that must decide it. HTTPS URLs are
//! probed the way the proxy sees them: as a CONNECT to the host and port.

use super::ast::{self, Action, Probe};
use super::diag::Diagnostic;
use super::source::{SourceMap, Span};
use super::target::{parse_host, parse_port};
use super::{HttpHost, HttpRequest, Policy, Verdict};
use crate::classify::FlowKey;

/// Source port used when an expectation gives none.
pub const DEFAULT_SOURCE_PORT: u16 = 49152;

/// A probe resolved into what an enforcement point sees.
#[derive(Clone, Debug)]
pub enum Query {
    Packet(FlowKey),
    Http(HttpRequest),
}

#[derive(Clone, Debug)]
pub struct Expectation {
    pub verdict: Verdict,
    pub query: Query,
    /// The rule that must decide, if given (`default` for the default).
    pub by: Option<String>,
    pub span: Span,
    /// The statement as written, for reports.
    pub text: String,
}

/// What the policy actually did with an expectation's probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Deciding rule name, or `default`.
    pub rule: String,
    pub passed: bool,
}

/// Parses a URL's scheme and authority: `(host, port, https)`.
pub fn parse_url(url: &str) -> Result<(HttpHost, u16, bool), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "a URL needs a scheme, as in `https://example.com/`".to_string())?;
    let https = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        other => return Err(format!("scheme `{other}` is not http or https")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("user information in a URL (`user@host`) is not allowed".into());
    }
    // The host as the proxy sees it in a request target or CONNECT
    // authority: brackets kept around an IPv6 literal.
    let (h, port) = if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or_else(|| "missing `]` after an IPv6 address".to_string())?;
        let (h, after) = authority.split_at(close + 1);
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected `{after}` after `]`")),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if h.is_empty() {
        return Err("the URL has no host".into());
    }
    // Read exactly as the proxy reads it, so that every spelling of an
    // address (`3325256711`, `198.51.100.7.`, `[::ffff:198.51.100.7]`) is
    // decided as that address.
    let host = parse_host(h).map_err(|e| e.to_string())?.to_http_host();
    // The port as the proxy reads it too.
    let port = match port.map(parse_port).transpose()?.flatten() {
        Some(p) => p,
        None if https => 443,
        None => 80,
    };
    Ok((host, port, https))
}

fn port(v: Option<u32>, default: u16, span: Span) -> Result<u16, Diagnostic> {
    match v {
        None => Ok(default),
        Some(p) if p <= 65535 => Ok(p as u16),
        Some(p) => Err(
            Diagnostic::error("E0203", format!("port {p} is out of range"))
                .at(span, "ports run from 0 to 65535"),
        ),
    }
}

/// Turns a parsed probe into a query. `span` is where to point at.
pub fn query_of(probe: &Probe, span: Span) -> Result<Query, Diagnostic> {
    match probe {
        Probe::Packet {
            proto,
            proto_span,
            src,
            src_port,
            dst,
            dst_port,
            icmp,
        } => {
            if src.is_ipv4() != dst.is_ipv4() {
                return Err(Diagnostic::error(
                    "E0401",
                    "source and destination are of different address families",
                )
                .at(span, "an IPv4 address cannot talk to an IPv6 address"));
            }
            let num = proto.number();
            if num > 255 {
                return Err(Diagnostic::error(
                    "E0207",
                    format!("protocol number {num} is out of range"),
                )
                .at(*proto_span, "protocol numbers run from 0 to 255"));
            }
            let (sp, dp) = if proto.is_icmp() {
                if (*proto == ast::Proto::Icmp) != src.is_ipv4() {
                    return Err(Diagnostic::error(
                        "E0401",
                        "icmp goes with IPv4 addresses and icmpv6 with IPv6 addresses",
                    )
                    .at(*proto_span, "wrong ICMP version for these addresses"));
                }
                let Some(spec) = icmp else {
                    return Err(Diagnostic::error("E0401", "an ICMP probe needs a type").at(
                        *proto_span,
                        "write e.g. `icmp/echo-request` or `icmpv6/echo-request`",
                    ));
                };
                let v6 = *proto == ast::Proto::Icmpv6;
                let value = |v: &ast::IcmpValue, code: bool| -> Result<u16, Diagnostic> {
                    let found = match v {
                        ast::IcmpValue::Number(n) if *n <= 255 => Some(*n as u8),
                        ast::IcmpValue::Number(_) => None,
                        ast::IcmpValue::Name(n) => {
                            if code {
                                super::compile_icmp_code(v6, n)
                            } else {
                                super::compile_icmp_type(v6, n)
                            }
                        }
                    };
                    found.map(u16::from).ok_or_else(|| {
                        Diagnostic::error("E0206", "unknown or out-of-range ICMP type or code").at(
                            spec.span,
                            "use a type name such as `echo-request` or a number 0-255",
                        )
                    })
                };
                let t = value(&spec.ty, false)?;
                let c = match &spec.code {
                    Some(c) => value(c, true)?,
                    None => 0,
                };
                (t, c)
            } else {
                (
                    port(*src_port, DEFAULT_SOURCE_PORT, span)?,
                    port(*dst_port, 0, span)?,
                )
            };
            Ok(Query::Packet(FlowKey {
                src: *src,
                dst: *dst,
                proto: num as u8,
                src_port: sp,
                dst_port: dp,
            }))
        }
        Probe::Http {
            src,
            url,
            url_span,
            method,
        } => {
            let (host, port, https) = parse_url(url).map_err(|e| {
                Diagnostic::error("E0402", format!("invalid URL: {e}")).at(*url_span, "this URL")
            })?;
            let method = match method {
                Some(m) => Some((m, super::compile::http_method(m)?)),
                None => None,
            };
            let method = match (method, https) {
                (Some((m, method)), true) if method != "CONNECT" => {
                    return Err(Diagnostic::error(
                        "E0403",
                        "the proxy sees an https URL only as a CONNECT tunnel, so its method cannot be tested",
                    )
                    .at(m.span, "not visible inside TLS")
                    .help("drop `method`, or probe an http:// URL to test methods"));
                }
                (Some((_, method)), _) => method,
                (None, true) => "CONNECT".to_string(),
                (None, false) => "GET".to_string(),
            };
            Ok(Query::Http(HttpRequest {
                src: super::target::canonical(*src),
                host,
                port,
                method,
            }))
        }
    }
}

/// Resolves an `expect` statement against the compiled policy.
pub fn resolve(
    e: &ast::Expect,
    policy: &Policy,
    sources: &SourceMap,
) -> Result<Expectation, Diagnostic> {
    let query = query_of(&e.probe, e.span)?;
    if let Some(by) = &e.by {
        let known = match &query {
            Query::Packet(_) => policy.rules().iter().any(|r| r.name == by.text),
            Query::Http(_) => policy.http_rules().iter().any(|r| r.name == by.text),
        };
        if !known && by.text != "default" {
            let names: Vec<&str> = match &query {
                Query::Packet(_) => policy.rules().iter().map(|r| r.name.as_str()).collect(),
                Query::Http(_) => policy
                    .http_rules()
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect(),
            };
            let mut d = Diagnostic::error("E0101", format!("unknown rule `{}`", by.text))
                .at(by.span, "no such rule");
            if let Some(c) = super::suggest::closest(&by.text, names) {
                d = d.help(format!("did you mean `{c}`?"));
            }
            return Err(d);
        }
    }
    Ok(Expectation {
        verdict: match e.action {
            Action::Allow => Verdict::Allow,
            Action::Deny => Verdict::Deny,
        },
        query,
        by: e.by.as_ref().map(|n| n.text.clone()),
        span: e.span,
        text: sources.snippet(e.span).to_string(),
    })
}

/// The verdict and deciding rule name for a query.
pub fn evaluate(policy: &Policy, query: &Query) -> (Verdict, String) {
    match query {
        Query::Packet(k) => {
            let d = policy.decide(k);
            (d.verdict, policy.rule_name(d.rule).to_string())
        }
        Query::Http(r) => {
            let d = policy.decide_http(r);
            (d.verdict, policy.http_rule_name(d.rule).to_string())
        }
    }
}

pub fn run(policy: &Policy, e: &Expectation) -> Outcome {
    let (verdict, rule) = evaluate(policy, &e.query);
    let passed = verdict == e.verdict && e.by.as_ref().is_none_or(|b| *b == rule);
    Outcome {
        verdict,
        rule,
        passed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (h, p, s) = parse_url("https://Packages.Microsoft.com./x").unwrap();
        assert_eq!(h, HttpHost::Name("packages.microsoft.com".into()));
        assert_eq!((p, s), (443, true));
        let (h, p, _) = parse_url("http://[2001:db8::1]:8080/").unwrap();
        assert_eq!(h, HttpHost::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(p, 8080);
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http://a@b/").is_err());
        assert!(parse_url("http://x:99999/").is_err());
        // Ports the proxy refuses are refused here too, not read as 80.
        for bad in [
            "http://x:0/",
            "http://x:+80/",
            "http://x:0x50/",
            "http://x:8o/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_url("http://x:/").unwrap().1, 80);
        assert_eq!(parse_url("http://x:8080/").unwrap().1, 8080);
    }

    /// Every spelling the proxy reads as 198.51.100.7 is that address here.
    #[test]
    fn ip_literals_read_as_the_proxy_reads_them() {
        let want = HttpHost::Ip("198.51.100.7".parse().unwrap());
        for url in [
            "https://198.51.100.7/",
            "https://[::ffff:198.51.100.7]/",
            "https://[::ffff:c633:6407]:443/",
            "https://[64:ff9b::198.51.100.7]/",
            "https://3325256711/",
            "https://198.51.100.7./",
            "https://0xc6.0x33.0x64.0x07/",
            "https://0306.063.0144.07/",
            "https://198.51.25607/",
            "http://198.3367943:8080/x",
        ] {
            let (h, _, _) = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(h, want, "{url}");
        }
        let (h, _, _) = parse_url("https://[2001:db8::1]/").unwrap();
        assert_eq!(h, HttpHost::Ip("2001:db8::1".parse().unwrap()));
        for bad in [
            "https://256.1.2.3/",
            "https://[::1/",
            "https://[::1]x/",
            "https://1.2.3.4.5/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
