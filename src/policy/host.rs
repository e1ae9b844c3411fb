//! Host patterns of HTTP rules and the host names they are matched against.
//!
//! A pattern is an exact name (`api.github.com`), a wildcard (`*.ubuntu.com`:
//! any name below `ubuntu.com`, at any depth, but not `ubuntu.com` itself),
//! or `*` (every name). Names compare case-insensitively with a trailing dot
//! ignored. Internationalised names are compared in their punycode (`xn--`)
//! form: a pattern must be written in ASCII, and names are never converted.

use super::target::{canonical, looks_numeric, parse_host, Host};
use std::fmt;
use std::net::IpAddr;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Every host name.
    Any,
    /// Exactly this name (normalised).
    Exact(String),
    /// Any name ending in `.suffix` (normalised suffix, without the dot).
    Subdomains(String),
}

/// Why a pattern is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternError {
    #[error("empty host pattern")]
    Empty,
    #[error("host names must be ASCII; write `{0}` in its punycode (xn--) form")]
    NotAscii(String),
    #[error("`*` may only stand alone or as the whole first label, as in \"*.example.com\"")]
    BadWildcard,
    #[error("invalid character {0:?} in a host name")]
    BadChar(char),
    #[error("empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("label longer than 63 characters")]
    LongLabel,
    #[error("host name longer than 253 characters")]
    LongName,
    /// The proxy reads this host as an address, and matches requests to
    /// an address against a rule's addresses only, never its names.
    #[error("{0} is an IP address, and a quoted destination is a host name that requests to an address never match")]
    IpLiteral(IpAddr),
    /// Shaped like an IPv4 literal but not one: the proxy refuses such a
    /// host outright.
    #[error("`{0}` is shaped like an IP address but is not one, and the proxy refuses such hosts")]
    NotAnAddress(String),
}

/// Lowercases and removes one trailing dot. Returns `None` when the name is
/// not a syntactically valid host name.
pub fn normalize_host(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name);
    check_name(n).ok()?;
    Some(n.to_ascii_lowercase())
}

fn check_name(n: &str) -> Result<(), HostPatternError> {
    if n.is_empty() {
        return Err(HostPatternError::Empty);
    }
    if !n.is_ascii() {
        return Err(HostPatternError::NotAscii(n.to_string()));
    }
    if n.len() > 253 {
        return Err(HostPatternError::LongName);
    }
    for label in n.split('.') {
        if label.is_empty() {
            return Err(HostPatternError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(HostPatternError::LongLabel);
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(if c == '*' {
                HostPatternError::BadWildcard
            } else {
                HostPatternError::BadChar(c)
            });
        }
    }
    Ok(())
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, HostPatternError> {
        // Read as the proxy reads a request's host: what it takes for an
        // address (in any spelling) is never compared with host names.
        match parse_host(text) {
            Ok(Host::Ip(ip)) => return Err(HostPatternError::IpLiteral(canonical(ip))),
            Ok(Host::Name(_)) => {}
            Err(_) => {
                let t = text.strip_suffix('.').unwrap_or(text);
                if looks_numeric(t) {
                    return Err(HostPatternError::NotAnAddress(t.to_string()));
                }
            }
        }
        let t = text.strip_suffix('.').unwrap_or(text);
        if t == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(rest) = t.strip_prefix("*.") {
            check_name(rest)?;
            return Ok(HostPattern::Subdomains(rest.to_ascii_lowercase()));
        }
        check_name(t)?;
        Ok(HostPattern::Exact(t.to_ascii_lowercase()))
    }

    /// Matches a name already normalised by [`normalize_host`].
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(n) => host == n,
            HostPattern::Subdomains(s) => {
                host.len() > s.len() + 1
                    && host.ends_with(s.as_str())
                    && host.as_bytes()[host.len() - s.len() - 1] == b'.'
            }
        }
    }

    /// True when every name this pattern matches, `other` matches too.
    pub fn is_covered_by(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (_, HostPattern::Any) => true,
            (HostPattern::Any, _) => false,
            (HostPattern::Exact(n), o) => o.matches(n),
            (HostPattern::Subdomains(s), HostPattern::Subdomains(o)) => {
                s == o || HostPattern::Subdomains(o.clone()).matches(s)
            }
            (HostPattern::Subdomains(_), HostPattern::Exact(_)) => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Subdomains(s) => write!(f, "*.{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, h: &str) -> bool {
        HostPattern::parse(p)
            .unwrap()
            .matches(&normalize_host(h).unwrap())
    }

    #[test]
    fn semantics() {
        assert!(m("*.ubuntu.com", "archive.ubuntu.com"));
        assert!(m("*.ubuntu.com", "a.b.ubuntu.com"));
        assert!(!m("*.ubuntu.com", "ubuntu.com"));
        assert!(!m("*.ubuntu.com", "evilubuntu.com"));
        assert!(m("packages.microsoft.com", "PACKAGES.Microsoft.COM."));
        assert!(m("packages.microsoft.com.", "packages.microsoft.com"));
        assert!(!m("packages.microsoft.com", "xpackages.microsoft.com"));
        assert!(m("xn--bcher-kva.example", "XN--BCHER-KVA.example"));
        assert!(!m(
            "xn--bcher-kva.example",
            "bücher.example"
                .to_string()
                .as_str()
                .replace('ü', "u")
                .as_str()
        ));
        assert!(m("*", "anything.example"));
    }

    #[test]
    fn rejects_bad_patterns() {
        assert!(matches!(
            HostPattern::parse("bücher.example"),
            Err(HostPatternError::NotAscii(_))
        ));
        assert_eq!(
            HostPattern::parse("a.*.com"),
            Err(HostPatternError::BadWildcard)
        );
        assert_eq!(
            HostPattern::parse("*foo.com"),
            Err(HostPatternError::BadWildcard)
        );
        assert_eq!(
            HostPattern::parse("a..com"),
            Err(HostPatternError::EmptyLabel)
        );
        assert_eq!(
            HostPattern::parse("a/b"),
            Err(HostPatternError::BadChar('/'))
        );
        assert!(normalize_host("bücher.example").is_none());
    }

    #[test]
    fn addresses_are_not_host_patterns() {
        let v4: IpAddr = "203.0.113.5".parse().unwrap();
        for p in [
            "203.0.113.5",
            "203.0.113.5.",
            "3405803781",
            "0xcb.0.0x71.5",
            "203.0.28933",
            "[::ffff:203.0.113.5]",
            "::ffff:203.0.113.5",
        ] {
            assert_eq!(
                HostPattern::parse(p),
                Err(HostPatternError::IpLiteral(v4)),
                "{p}"
            );
        }
        assert_eq!(
            HostPattern::parse("2001:db8::1"),
            Err(HostPatternError::IpLiteral("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            HostPattern::parse("256.1.2.3"),
            Err(HostPatternError::NotAnAddress("256.1.2.3".into()))
        );
        // Names with digits, and wildcards over numeric labels, stay names.
        for p in ["1.2.3.example", "x1.2.3.4", "*.0.113.5", "deadbeef", "*"] {
            assert!(HostPattern::parse(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn coverage() {
        let p = |s| HostPattern::parse(s).unwrap();
        assert!(p("a.example.com").is_covered_by(&p("*.example.com")));
        assert!(p("*.a.example.com").is_covered_by(&p("*.example.com")));
        assert!(!p("example.com").is_covered_by(&p("*.example.com")));
        assert!(!p("*.example.com").is_covered_by(&p("a.example.com")));
    }
}
