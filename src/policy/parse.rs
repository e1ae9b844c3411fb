//! The parser: policy text to a syntax tree, with nom.
//!
//! A statement takes one line; a list may continue on the next line after a
//! comma (or right after `=`). `#` starts a comment that runs to the end of
//! the line. On a syntax error the parser records a diagnostic that says what
//! it expected, skips to the next line that starts a statement, and goes on,
//! so one run reports every broken statement. No input makes it panic, and
//! its work is linear in the input (no backtracking across lines).

use super::ast::*;
use super::diag::{Diagnostic, Diagnostics};
use super::source::{FileId, Span};
use nom::{
    bytes::complete::{tag, take_while1},
    character::complete::{char, digit1},
    error::{ErrorKind, ParseError},
    IResult,
};
use std::borrow::Cow;
use std::net::IpAddr;

/// A parse failure: where, and what was expected there.
#[derive(Debug, Clone)]
pub struct PErr<'a> {
    at: &'a str,
    expected: Cow<'static, str>,
    /// Length in bytes of the offending token, when known.
    len: usize,
}

impl<'a> ParseError<&'a str> for PErr<'a> {
    fn from_error_kind(input: &'a str, kind: ErrorKind) -> Self {
        PErr {
            at: input,
            expected: Cow::Owned(format!("{kind:?}").to_lowercase()),
            len: 0,
        }
    }

    fn append(_: &'a str, _: ErrorKind, other: Self) -> Self {
        other
    }

    fn or(self, other: Self) -> Self {
        if other.at.len() < self.at.len() {
            other
        } else {
            self
        }
    }
}

type Res<'a, T> = IResult<&'a str, T, PErr<'a>>;

fn fail<'a, T>(at: &'a str, expected: impl Into<Cow<'static, str>>) -> Res<'a, T> {
    Err(nom::Err::Failure(PErr {
        at,
        expected: expected.into(),
        len: token_len(at),
    }))
}

/// Length of the token starting at `at`, for the carets.
fn token_len(at: &str) -> usize {
    let n: usize = at
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ',' && *c != '#')
        .map(char::len_utf8)
        .sum();
    n.max(at.chars().next().map(char::len_utf8).unwrap_or(0))
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'
}

const STATEMENT_KEYWORDS: &[&str] = &[
    "include", "net", "svc", "zone", "rule", "http", "default", "expect",
];

/// Spaces, tabs and comments, not line breaks.
fn sp(i: &str) -> Res<'_, ()> {
    let mut rest = i;
    loop {
        let trimmed = rest.trim_start_matches([' ', '\t', '\r']);
        if let Some(after) = trimmed.strip_prefix('#') {
            let end = after.find('\n').unwrap_or(after.len());
            rest = &after[end..];
        } else {
            return Ok((trimmed, ()));
        }
    }
}

/// Spaces, tabs, comments and line breaks.
fn sp_nl(i: &str) -> Res<'_, ()> {
    let mut rest = i;
    loop {
        let (r, ()) = sp(rest)?;
        match r.strip_prefix('\n') {
            Some(after) => rest = after,
            None => return Ok((r, ())),
        }
    }
}

/// A name or keyword: `[A-Za-z_][A-Za-z0-9_.-]*`.
fn word(i: &str) -> Res<'_, &str> {
    match i.chars().next() {
        Some(c) if is_name_start(c) => {
            let (r, w) = take_while1(is_name_char)(i)?;
            // `a->b`: the arrow is not part of the name.
            if r.starts_with('>') && w.len() > 1 && w.ends_with('-') {
                let n = w.len() - 1;
                return Ok((&i[n..], &w[..n]));
            }
            Ok((r, w))
        }
        _ => Err(nom::Err::Error(PErr::from_error_kind(i, ErrorKind::Alpha))),
    }
}

/// Finds comments in a file, outside of quoted strings.
pub fn comments(file: FileId, text: &str) -> Vec<Comment> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let mut in_string = false;
        let mut chars = line.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => in_string = !in_string,
                '\\' if in_string && matches!(chars.peek(), Some((_, '"' | '\\'))) => {
                    chars.next();
                }
                '#' if !in_string => {
                    let body = line[i..].trim_end_matches(['\n', '\r']);
                    out.push(Comment {
                        text: body.to_string(),
                        span: Span::new(file, offset + i, offset + i + body.len()),
                    });
                    break;
                }
                _ => {}
            }
        }
        offset += line.len();
    }
    out
}

/// Parses one file. Returns what could be parsed and the diagnostics.
pub fn parse_file(file: FileId, text: &str) -> (File, Diagnostics) {
    let p = Parser { file, src: text };
    let mut diags = Diagnostics::default();
    let mut stmts = Vec::new();
    let mut rest = text;
    loop {
        rest = match sp_nl(rest) {
            Ok((r, ())) => r,
            Err(_) => rest,
        };
        if rest.is_empty() {
            break;
        }
        match p.statement(rest) {
            Ok((r, stmt)) => {
                stmts.push(stmt);
                rest = r;
            }
            Err(nom::Err::Error(e)) | Err(nom::Err::Failure(e)) => {
                diags.push(p.diagnostic(&e));
                rest = skip_to_next_statement(e.at);
            }
            Err(nom::Err::Incomplete(_)) => break,
        }
    }
    (
        File {
            stmts,
            comments: comments(file, text),
        },
        diags,
    )
}

/// After an error: the next line that starts a statement. Indented lines
/// continue a list unless they start with a statement keyword.
fn skip_to_next_statement(from: &str) -> &str {
    let mut rest = from;
    loop {
        match rest.find('\n') {
            None => return "",
            Some(n) => rest = &rest[n + 1..],
        }
        if rest.starts_with(|c: char| !c.is_whitespace() && c != '#') {
            return rest;
        }
        let line = rest.trim_start_matches([' ', '\t']);
        let first: String = line.chars().take_while(|c| is_name_char(*c)).collect();
        if STATEMENT_KEYWORDS.contains(&first.as_str()) {
            return rest;
        }
    }
}

/// Parses the body of an expectation given on the command line, such as
/// `allow tcp 10.0.2.5:40000 -> 192.168.5.10:1433` without the verdict:
/// `tcp 10.0.2.5:40000 -> 192.168.5.10:1433` or `http 10.0.1.7 -> URL`.
pub fn parse_probe(file: FileId, text: &str) -> Result<Probe, Diagnostic> {
    let p = Parser { file, src: text };
    let run = |i| -> Res<'_, Probe> {
        let (i, ()) = sp(i)?;
        let (i, probe) = p.probe(i)?;
        let (i, ()) = sp(i)?;
        if !i.is_empty() {
            return fail(i, "end of input");
        }
        Ok((i, probe))
    };
    match run(text) {
        Ok((_, probe)) => Ok(probe),
        Err(nom::Err::Error(e)) | Err(nom::Err::Failure(e)) => Err(p.diagnostic(&e)),
        Err(nom::Err::Incomplete(_)) => Err(Diagnostic::error("E0001", "incomplete input")),
    }
}

struct Parser<'s> {
    file: FileId,
    src: &'s str,
}

impl<'s> Parser<'s> {
    fn pos(&self, i: &str) -> usize {
        self.src.len() - i.len()
    }

    fn span(&self, from: &str, to: &str) -> Span {
        Span::new(self.file, self.pos(from), self.pos(to))
    }

    fn diagnostic(&self, e: &PErr<'_>) -> Diagnostic {
        let start = self.pos(e.at);
        let found = if e.at.is_empty() {
            "end of file".to_string()
        } else if e.at.starts_with('\n') || e.at.starts_with("\r\n") {
            "end of line".to_string()
        } else {
            let tok: String = e.at[..e.len.min(e.at.len())]
                .chars()
                .take(40)
                .map(|c| if c.is_control() { '\u{fffd}' } else { c })
                .collect();
            format!("`{tok}`")
        };
        let message = if e.expected.starts_with("a closing `\"`") {
            "unterminated string: no closing `\"` on this line".to_string()
        } else {
            format!("expected {}, found {found}", e.expected)
        };
        let mut d =
            Diagnostic::error("E0001", message).at(Span::new(self.file, start, start + e.len), "");
        if let Ok((_, w)) = word(e.at) {
            if e.expected.starts_with("a statement") {
                if let Some(k) = super::suggest::closest(w, STATEMENT_KEYWORDS.iter().copied()) {
                    d = d.help(format!("did you mean `{k}`?"));
                }
            }
        }
        d
    }

    fn keyword<'a>(&self, i: &'a str, kw: &'static str) -> Res<'a, &'a str> {
        match word(i) {
            Ok((r, w)) if w == kw => Ok((r, w)),
            _ => Err(nom::Err::Error(PErr {
                at: i,
                expected: Cow::Owned(format!("`{kw}`")),
                len: token_len(i),
            })),
        }
    }

    fn statement<'a>(&self, i: &'a str) -> Res<'a, Stmt> {
        let start = i;
        let (i, kw) = match word(i) {
            Ok(x) => x,
            Err(_) => return fail(i, "a statement (`net`, `svc`, `zone`, `rule`, `http`, `default`, `expect` or `include`)"),
        };
        let (i, stmt) = match kw {
            "include" => {
                let (i, ()) = sp(i)?;
                let (i, (path, _)) = self.string(i, "a quoted file name")?;
                (
                    i,
                    Stmt::Include {
                        path,
                        span: self.span(start, i),
                    },
                )
            }
            "net" | "zone" => {
                let (i, name) = self.def_head(i)?;
                let (i, items) = self.list(i, |i| self.net_item(i))?;
                let def = Def {
                    name,
                    items,
                    span: self.span(start, i),
                };
                (i, if kw == "net" { Stmt::Net(def) } else { Stmt::Zone(def) })
            }
            "svc" => {
                let (i, name) = self.def_head(i)?;
                let (i, items) = self.list(i, |i| self.svc_item(i))?;
                (
                    i,
                    Stmt::Svc(Def {
                        name,
                        items,
                        span: self.span(start, i),
                    }),
                )
            }
            "rule" => self.packet_rule(start, i)?,
            "http" => self.http_rule(start, i)?,
            "default" => {
                let (i, ()) = sp(i)?;
                let (i, action) = self.action(i)?;
                let (i, ()) = sp(i)?;
                let (i, log) = match self.keyword(i, "log") {
                    Ok((i, _)) => (i, true),
                    Err(_) => (i, false),
                };
                (
                    i,
                    Stmt::Default(DefaultStmt {
                        action,
                        log,
                        span: self.span(start, i),
                    }),
                )
            }
            "expect" => {
                let (i, ()) = sp(i)?;
                let (i, action) = self.action(i)?;
                let (i, ()) = sp(i)?;
                let (i, probe) = self.probe(i)?;
                let (i, ()) = sp(i)?;
                let (i, by) = match self.keyword(i, "by") {
                    Ok((i, _)) => {
                        let (i, ()) = sp(i)?;
                        let (i, n) = self.name(i, "a rule name after `by`")?;
                        (i, Some(n))
                    }
                    Err(_) => (i, None),
                };
                (
                    i,
                    Stmt::Expect(Expect {
                        action,
                        probe,
                        by,
                        span: self.span(start, i),
                    }),
                )
            }
            _ => {
                return fail(
                    start,
                    "a statement (`net`, `svc`, `zone`, `rule`, `http`, `default`, `expect` or `include`)",
                )
            }
        };
        let (i, ()) = self.end_of_statement(i, kw)?;
        Ok((i, stmt))
    }

    fn end_of_statement<'a>(&self, i: &'a str, kw: &str) -> Res<'a, ()> {
        let (i, ()) = sp(i)?;
        if i.is_empty() {
            return Ok((i, ()));
        }
        if let Some(r) = i.strip_prefix('\n') {
            return Ok((r, ()));
        }
        let what = match kw {
            "rule" => "`service`, `log`, `owner`, `expires`, `comment` or end of line",
            "http" => "`port`, `method`, `plain-tunnel`, `log`, `owner`, `expires`, `comment` or end of line",
            "default" => "`log` or end of line",
            "expect" => "`by` or end of line",
            "net" | "zone" | "svc" => "`,` or end of line",
            _ => "end of line",
        };
        fail(i, what)
    }

    /// `NAME =`, after `net`, `svc` or `zone`.
    fn def_head<'a>(&self, i: &'a str) -> Res<'a, Name> {
        let (i, ()) = sp(i)?;
        let (i, name) = self.name(i, "a name")?;
        let (i, ()) = sp(i)?;
        let (i, _) = match char::<_, PErr>('=')(i) {
            Ok(x) => x,
            Err(_) => return fail(i, "`=`"),
        };
        let (i, ()) = sp_nl(i)?;
        Ok((i, name))
    }

    fn name<'a>(&self, i: &'a str, what: &'static str) -> Res<'a, Name> {
        match word(i) {
            Ok((r, w)) => Ok((
                r,
                Name {
                    text: w.to_string(),
                    span: self.span(i, r),
                },
            )),
            Err(_) => fail(i, what),
        }
    }

    /// One or more items separated by commas; a line break may follow a comma.
    fn list<'a, T>(
        &self,
        i: &'a str,
        mut item: impl FnMut(&'a str) -> Res<'a, T>,
    ) -> Res<'a, Vec<T>> {
        let (mut i, first) = item(i)?;
        let mut items = vec![first];
        loop {
            let (r, ()) = sp(i)?;
            match r.strip_prefix(',') {
                Some(after) => {
                    let (after, ()) = sp_nl(after)?;
                    let (after, next) = item(after)?;
                    items.push(next);
                    i = after;
                }
                None => return Ok((i, items)),
            }
        }
    }

    fn action<'a>(&self, i: &'a str) -> Res<'a, Action> {
        match word(i) {
            Ok((r, "allow")) => Ok((r, Action::Allow)),
            Ok((r, "deny")) => Ok((r, Action::Deny)),
            _ => fail(i, "`allow` or `deny`"),
        }
    }

    /// A double-quoted string on one line. `\\"` is a quote and `\\\\` a
    /// backslash; any other backslash stands for itself.
    fn string<'a>(&self, i: &'a str, what: &'static str) -> Res<'a, (String, Span)> {
        let start = i;
        let Some(body) = i.strip_prefix('"') else {
            return fail(i, what);
        };
        let mut text = String::new();
        let mut chars = body.char_indices();
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    let rest = &body[at + 1..];
                    return Ok((rest, (text, self.span(start, rest))));
                }
                '\n' => break,
                '\\' if matches!(body[at + 1..].chars().next(), Some('"' | '\\')) => {
                    if let Some((_, escaped)) = chars.next() {
                        text.push(escaped);
                    }
                }
                c => text.push(c),
            }
        }
        Err(nom::Err::Failure(PErr {
            at: start,
            expected: Cow::Borrowed("a closing `\"` on the same line"),
            len: 1,
        }))
    }

    fn net_item<'a>(&self, i: &'a str) -> Res<'a, NetItem> {
        match self.address_item(i) {
            Ok(x) => return Ok(x),
            Err(nom::Err::Failure(e)) => return Err(nom::Err::Failure(e)),
            Err(_) => {}
        }
        match word(i) {
            Ok((r, w)) => {
                let span = self.span(i, r);
                let item = match w {
                    "any" => NetItem::Any { family: None, span },
                    "any4" => NetItem::Any {
                        family: Some(Family::V4),
                        span,
                    },
                    "any6" => NetItem::Any {
                        family: Some(Family::V6),
                        span,
                    },
                    _ => NetItem::Name(Name {
                        text: w.to_string(),
                        span,
                    }),
                };
                Ok((r, item))
            }
            Err(_) => fail(i, "an address, a prefix, a range, a network name or `any`"),
        }
    }

    /// A bare address token: hex digits, dots and colons.
    fn address<'a>(&self, i: &'a str) -> Res<'a, IpAddr> {
        let (r, tok) = take_while1(|c: char| c.is_ascii_hexdigit() || c == '.' || c == ':')(i)?;
        match tok.parse::<IpAddr>() {
            Ok(a) => Ok((r, a)),
            Err(_) => Err(nom::Err::Error(PErr {
                at: i,
                expected: Cow::Borrowed("an IPv4 or IPv6 address"),
                len: tok.len(),
            })),
        }
    }

    /// `ADDR`, `ADDR/LEN` or `ADDR-ADDR`. Errors are soft unless the token
    /// is clearly meant as an address (starts with a digit or holds a colon).
    fn address_item<'a>(&self, i: &'a str) -> Res<'a, NetItem> {
        let looks_numeric = i.starts_with(|c: char| c.is_ascii_digit())
            || i.chars()
                .take_while(|c| is_name_char(*c) || *c == ':')
                .any(|c| c == ':');
        let (r, addr) = match self.address(i) {
            Ok(x) => x,
            Err(_) if looks_numeric => return fail(i, "a valid IPv4 or IPv6 address"),
            Err(e) => return Err(e),
        };
        if let Some(after) = r.strip_prefix('/') {
            let Ok((r2, digits)) = digit1::<_, PErr>(after) else {
                return fail(after, "a prefix length after `/`");
            };
            let len = digits.parse::<u32>().unwrap_or(u32::MAX);
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if len > max {
                return fail(
                    after,
                    if max == 32 {
                        "a prefix length from 0 to 32"
                    } else {
                        "a prefix length from 0 to 128"
                    },
                );
            }
            return Ok((
                r2,
                NetItem::Prefix {
                    addr,
                    len: len as u8,
                    span: self.span(i, r2),
                },
            ));
        }
        if let Some(after) = r.strip_prefix('-') {
            let Ok((r2, hi)) = self.address(after) else {
                return fail(after, "the last address of the range after `-`");
            };
            return Ok((
                r2,
                NetItem::Range {
                    lo: addr,
                    hi,
                    span: self.span(i, r2),
                },
            ));
        }
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Ok((
            r,
            NetItem::Prefix {
                addr,
                len,
                span: self.span(i, r),
            },
        ))
    }

    fn number<'a>(&self, i: &'a str, what: &'static str) -> Res<'a, u32> {
        match digit1::<_, PErr>(i) {
            Ok((r, d)) => Ok((r, d.parse::<u32>().unwrap_or(u32::MAX))),
            Err(_) => fail(i, what),
        }
    }

    fn port_range<'a>(&self, i: &'a str) -> Res<'a, PortRange> {
        let (r, lo) = self.number(i, "a port number or range such as `443` or `1024-65535`")?;
        let (r, hi) = match r.strip_prefix('-') {
            Some(after) => self.number(after, "the last port of the range after `-`")?,
            None => (r, lo),
        };
        Ok((
            r,
            PortRange {
                lo,
                hi,
                span: self.span(i, r),
            },
        ))
    }

    fn proto<'a>(&self, i: &'a str) -> Res<'a, Option<Proto>> {
        let Ok((r, w)) = word(i) else {
            return Err(nom::Err::Error(PErr::from_error_kind(i, ErrorKind::Alpha)));
        };
        let p = match w {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => Proto::Sctp,
            "icmp" => Proto::Icmp,
            "icmpv6" => Proto::Icmpv6,
            "gre" => Proto::Number(47),
            "esp" => Proto::Number(50),
            "ah" => Proto::Number(51),
            "ospf" => Proto::Number(89),
            "vrrp" => Proto::Number(112),
            "ip" => return Ok((r, None)),
            _ => return Err(nom::Err::Error(PErr::from_error_kind(i, ErrorKind::Alpha))),
        };
        Ok((r, Some(p)))
    }

    /// `tcp/443 [sport 1024-65535]`, `udp`, `icmp/echo-request`, `icmp/3:4`,
    /// `ip/47`, or a service name.
    fn svc_item<'a>(&self, i: &'a str) -> Res<'a, SvcItem> {
        let start = i;
        let (r, proto) = match self.proto(i) {
            Ok(x) => x,
            Err(_) => {
                return match word(i) {
                    Ok((r, w)) => Ok((
                        r,
                        SvcItem::Name(Name {
                            text: w.to_string(),
                            span: self.span(i, r),
                        }),
                    )),
                    Err(_) => fail(
                        i,
                        "a service such as `tcp/443`, `udp/53`, `icmp/echo-request`, `ip/47`, or a service name",
                    ),
                };
            }
        };
        let proto_span = self.span(i, r);
        let mut dst_ports = Vec::new();
        let mut icmp = None;
        let mut i = r;
        let proto = match proto {
            Some(p) => p,
            None => {
                // `ip/N`: a protocol number.
                let Some(after) = i.strip_prefix('/') else {
                    return fail(i, "`/` and a protocol number after `ip`, such as `ip/47`");
                };
                let (r, n) = self.number(after, "a protocol number from 0 to 255")?;
                i = r;
                Proto::Number(n)
            }
        };
        let proto_span = if matches!(proto, Proto::Number(_)) && proto_span.end < self.pos(i) {
            self.span(start, i)
        } else {
            proto_span
        };
        if let Some(after) = i.strip_prefix('/') {
            if proto.has_ports() {
                let (r, pr) = self.port_range(after)?;
                dst_ports.push(pr);
                i = r;
            } else if proto.is_icmp() {
                let (r, spec) = self.icmp_spec(after)?;
                icmp = Some(spec);
                i = r;
            } else {
                return fail(
                    i,
                    "`,` or end of item: only tcp, udp and sctp take ports, icmp and icmpv6 a type",
                );
            }
        }
        let mut src_ports = Vec::new();
        let (r, ()) = sp(i)?;
        if let Ok((r2, _)) = self.keyword(r, "sport") {
            if !proto.has_ports() {
                return fail(r, "`,` or end of item: `sport` needs tcp, udp or sctp");
            }
            let (r2, ()) = sp(r2)?;
            let (r2, pr) = self.port_range(r2)?;
            src_ports.push(pr);
            i = r2;
        }
        Ok((
            i,
            SvcItem::Proto {
                proto,
                proto_span,
                dst_ports,
                src_ports,
                icmp,
                span: self.span(start, i),
            },
        ))
    }

    fn icmp_value<'a>(&self, i: &'a str) -> Res<'a, IcmpValue> {
        if let Ok((r, n)) = self.number(i, "") {
            return Ok((r, IcmpValue::Number(n)));
        }
        match take_while1::<_, _, PErr>(|c: char| c.is_ascii_alphanumeric() || c == '-')(i) {
            Ok((r, w)) => Ok((r, IcmpValue::Name(w.to_string()))),
            Err(_) => fail(i, "an ICMP type such as `echo-request` or `8`"),
        }
    }

    fn icmp_spec<'a>(&self, i: &'a str) -> Res<'a, IcmpSpec> {
        let (r, ty) = self.icmp_value(i)?;
        let (r, code) = match r.strip_prefix(':') {
            Some(after) => {
                let (r, c) = self.icmp_value(after)?;
                (r, Some(c))
            }
            None => (r, None),
        };
        Ok((
            r,
            IcmpSpec {
                ty,
                code,
                span: self.span(i, r),
            },
        ))
    }

    fn arrow<'a>(&self, i: &'a str) -> Res<'a, ()> {
        let (i, ()) = sp(i)?;
        match tag::<_, _, PErr>("->")(i) {
            Ok((r, _)) => {
                let (r, ()) = sp(r)?;
                Ok((r, ()))
            }
            Err(_) => fail(i, "`->` or `,`"),
        }
    }

    /// `NAME allow|deny SRC, ... ->`, shared by packet and HTTP rules.
    fn rule_head<'a>(&self, i: &'a str) -> Res<'a, (Name, Action, Vec<NetItem>)> {
        let (i, ()) = sp(i)?;
        let (i, name) = self.name(i, "a rule name")?;
        let (i, ()) = sp(i)?;
        let (i, action) = self.action(i)?;
        let (i, ()) = sp(i)?;
        let (i, src) = self.list(i, |i| self.net_item(i))?;
        let (i, ()) = self.arrow(i)?;
        Ok((i, (name, action, src)))
    }

    fn packet_rule<'a>(&self, start: &'a str, i: &'a str) -> Res<'a, Stmt> {
        let (i, (name, action, src)) = self.rule_head(i)?;
        let (mut i, dst) = self.list(i, |i| self.net_item(i))?;
        let mut services = Vec::new();
        let mut seen_service = false;
        let mut options = RuleOptions::default();
        loop {
            let (r, ()) = sp(i)?;
            let Ok((after, w)) = word(r) else {
                break;
            };
            match w {
                "service" if !seen_service => {
                    let (after, ()) = sp(after)?;
                    let (after, items) = self.list(after, |i| self.svc_item(i))?;
                    services = items;
                    seen_service = true;
                    i = after;
                }
                _ => match self.option(r, w, after, &mut options)? {
                    Some(after) => i = after,
                    None => {
                        return fail(
                            r,
                            "`service`, `log`, `owner`, `expires`, `comment` or end of line",
                        )
                    }
                },
            }
        }
        Ok((
            i,
            Stmt::Rule(PacketRule {
                name,
                action,
                src,
                dst,
                services,
                options,
                span: self.span(start, i),
            }),
        ))
    }

    /// A rule option (`log`, `owner "…"`, `expires DATE`, `comment "…"`), each
    /// at most once. `None` when `w` is not an option not yet given.
    fn option<'a>(
        &self,
        at: &'a str,
        w: &str,
        after: &'a str,
        o: &mut RuleOptions,
    ) -> Result<Option<&'a str>, nom::Err<PErr<'a>>> {
        match w {
            "log" if !o.log => {
                o.log = true;
                Ok(Some(after))
            }
            "owner" if o.owner.is_none() => {
                let (r, ()) = sp(after)?;
                let (r, s) = self.string(r, "a quoted owner such as \"dba\"")?;
                o.owner = Some(s);
                Ok(Some(r))
            }
            "comment" if o.comment.is_none() => {
                let (r, ()) = sp(after)?;
                let (r, s) = self.string(r, "a quoted comment")?;
                o.comment = Some(s);
                Ok(Some(r))
            }
            "expires" if o.expires.is_none() => {
                let (r, ()) = sp(after)?;
                let (r, d) = self.date(r)?;
                o.expires = Some(d);
                Ok(Some(r))
            }
            _ => {
                let _ = at;
                Ok(None)
            }
        }
    }

    fn date<'a>(&self, i: &'a str) -> Res<'a, Date> {
        let what = "a date as YYYY-MM-DD";
        let parse = |i: &'a str| -> Option<(&'a str, u32, u32, u32)> {
            let (r, y) = take_while1::<_, _, PErr>(|c: char| c.is_ascii_digit())(i).ok()?;
            let r = r.strip_prefix('-')?;
            let (r, m) = take_while1::<_, _, PErr>(|c: char| c.is_ascii_digit())(r).ok()?;
            let r = r.strip_prefix('-')?;
            let (r, d) = take_while1::<_, _, PErr>(|c: char| c.is_ascii_digit())(r).ok()?;
            if y.len() != 4 || m.len() != 2 || d.len() != 2 {
                return None;
            }
            Some((r, y.parse().ok()?, m.parse().ok()?, d.parse().ok()?))
        };
        match parse(i) {
            Some((r, y, m, d)) if is_name_boundary(r) => Ok((
                r,
                Date {
                    year: y as u16,
                    month: m as u8,
                    day: d as u8,
                    span: self.span(i, r),
                },
            )),
            _ => fail(i, what),
        }
    }

    fn http_dest<'a>(&self, i: &'a str) -> Res<'a, HttpDest> {
        if i.starts_with('"') {
            let (r, (pattern, span)) = self.string(i, "a quoted host pattern")?;
            return Ok((r, HttpDest::Host { pattern, span }));
        }
        match self.net_item(i) {
            Ok((r, n)) => Ok((r, HttpDest::Net(n))),
            Err(nom::Err::Error(_)) => fail(
                i,
                "a quoted host pattern such as \"*.example.com\", an address or a network name",
            ),
            Err(e) => Err(e),
        }
    }

    fn http_rule<'a>(&self, start: &'a str, i: &'a str) -> Res<'a, Stmt> {
        let (i, (name, action, src)) = self.rule_head(i)?;
        let (mut i, dst) = self.list(i, |i| self.http_dest(i))?;
        let mut ports = None;
        let mut methods = None;
        let mut plain_tunnel = false;
        let mut options = RuleOptions::default();
        loop {
            let (r, ()) = sp(i)?;
            let Ok((after, w)) = word(r) else {
                break;
            };
            match w {
                "port" if ports.is_none() => {
                    let (after, ()) = sp(after)?;
                    let (after, items) = self.list(after, |i| self.port_range(i))?;
                    ports = Some(items);
                    i = after;
                }
                "method" if methods.is_none() => {
                    let (after, ()) = sp(after)?;
                    let (after, items) = self.list(after, |i| self.name(i, "an HTTP method such as `GET`"))?;
                    methods = Some(items);
                    i = after;
                }
                "plain-tunnel" if !plain_tunnel => {
                    plain_tunnel = true;
                    i = after;
                }
                _ => match self.option(r, w, after, &mut options)? {
                    Some(after) => i = after,
                    None => {
                        return fail(
                            r,
                            "`port`, `method`, `plain-tunnel`, `log`, `owner`, `expires`, `comment` or end of line",
                        )
                    }
                },
            }
        }
        Ok((
            i,
            Stmt::Http(HttpRule {
                name,
                action,
                src,
                dst,
                ports: ports.unwrap_or_default(),
                methods: methods.unwrap_or_default(),
                plain_tunnel,
                options,
                span: self.span(start, i),
            }),
        ))
    }

    /// `ADDR[:PORT]` or `[ADDR6]:PORT`.
    fn endpoint<'a>(&self, i: &'a str) -> Res<'a, (IpAddr, Option<u32>)> {
        if let Some(inner) = i.strip_prefix('[') {
            let (r, a) = match self.address(inner) {
                Ok(x) => x,
                Err(_) => return fail(inner, "an IPv6 address inside `[...]`"),
            };
            let Some(r) = r.strip_prefix(']') else {
                return fail(r, "`]`");
            };
            return match r.strip_prefix(':') {
                Some(after) => {
                    let (r, p) = self.number(after, "a port number")?;
                    port_in_range(after, r, p)?;
                    Ok((r, (a, Some(p))))
                }
                None => Ok((r, (a, None))),
            };
        }
        let tok_end = i
            .find(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
            .unwrap_or(i.len());
        let tok = &i[..tok_end];
        if let Ok(a) = tok.parse::<IpAddr>() {
            return Ok((&i[tok_end..], (a, None)));
        }
        // IPv4 with a port: split at the last colon.
        if let Some(colon) = tok.rfind(':') {
            if let Ok(a) = tok[..colon].parse::<std::net::Ipv4Addr>() {
                let after = &i[colon + 1..];
                let (r, p) = self.number(after, "a port number after `:`")?;
                port_in_range(after, r, p)?;
                return Ok((r, (IpAddr::V4(a), Some(p))));
            }
        }
        fail(
            i,
            "an address such as `192.0.2.1`, `192.0.2.1:443` or `[2001:db8::1]:443`",
        )
    }

    /// What an expectation or `explain` probes: `tcp SRC[:PORT] -> DST:PORT`,
    /// `icmp/echo-request SRC -> DST`, `ip/47 SRC -> DST`,
    /// `http SRC -> URL [method M]`.
    fn probe<'a>(&self, i: &'a str) -> Res<'a, Probe> {
        let start = i;
        if let Ok((r, _)) = self.keyword(i, "http") {
            let (r, ()) = sp(r)?;
            let (r, (src, _)) = self.endpoint(r)?;
            let (url_at, ()) = self.arrow(r)?;
            let (r, url) = match take_while1::<_, _, PErr>(|c: char| {
                !c.is_whitespace() && c != '#' && c != '"'
            })(url_at)
            {
                Ok(x) => x,
                Err(_) => return fail(url_at, "a URL such as `https://example.com/`"),
            };
            let url_span = self.span(url_at, r);
            let (r2, ()) = sp(r)?;
            let (r, method) = match self.keyword(r2, "method") {
                Ok((r3, _)) => {
                    let (r3, ()) = sp(r3)?;
                    let (r3, m) = self.name(r3, "an HTTP method such as `GET`")?;
                    (r3, Some(m))
                }
                Err(_) => (r, None),
            };
            return Ok((
                r,
                Probe::Http {
                    src,
                    url: url.to_string(),
                    url_span,
                    method,
                },
            ));
        }
        let item = match self.svc_item(i) {
            Ok((_, SvcItem::Name(_))) | Err(_) => {
                return fail(
                    start,
                    "`tcp`, `udp`, `sctp`, `icmp/TYPE`, `icmpv6/TYPE`, `ip/N` or `http`",
                )
            }
            Ok((
                r,
                SvcItem::Proto {
                    proto,
                    proto_span,
                    dst_ports,
                    src_ports,
                    icmp,
                    ..
                },
            )) => {
                if !dst_ports.is_empty() || !src_ports.is_empty() {
                    return fail(
                        start,
                        "a protocol without ports (ports go on the addresses: `tcp 192.0.2.1:40000 -> 198.51.100.1:443`)",
                    );
                }
                (r, proto, proto_span, icmp)
            }
        };
        let (r, proto, proto_span, icmp) = item;
        let (r, ()) = sp(r)?;
        let (r, (src, src_port)) = self.endpoint(r)?;
        let (r, ()) = self.arrow(r)?;
        let dst_at = r;
        let (r, (dst, dst_port)) = self.endpoint(r)?;
        if proto.has_ports() && dst_port.is_none() {
            return fail(
                dst_at,
                "a destination with a port, such as `192.0.2.1:443` or `[2001:db8::1]:443`",
            );
        }
        if !proto.has_ports() && (src_port.is_some() || dst_port.is_some()) {
            return fail(start, "a protocol with ports for addresses with ports (only tcp, udp and sctp have ports)");
        }
        Ok((
            r,
            Probe::Packet {
                proto,
                proto_span,
                src,
                src_port,
                dst,
                dst_port,
                icmp,
            },
        ))
    }
}

/// A probe's port, read from `at` up to `rest`, must be a port: the error
/// points at the number itself.
fn port_in_range<'a>(at: &'a str, rest: &'a str, p: u32) -> Result<(), nom::Err<PErr<'a>>> {
    if p <= 65535 {
        return Ok(());
    }
    Err(nom::Err::Failure(PErr {
        at,
        expected: Cow::Borrowed("a port number from 0 to 65535"),
        len: at.len() - rest.len(),
    }))
}

fn is_name_boundary(r: &str) -> bool {
    !r.starts_with(is_name_char)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (File, Diagnostics) {
        parse_file(FileId(0), text)
    }

    #[test]
    fn parses_the_readme_example() {
        let text = include_str!("../../policies/example.policy");
        let (file, diags) = parse(text);
        assert!(diags.is_empty(), "{diags:?}");
        assert!(file.stmts.len() > 20);
    }

    #[test]
    fn net_with_names_and_both_families() {
        let (file, diags) = parse("net vnet = 10.0.0.0/16, fd00:10::/48, other\n");
        assert!(diags.is_empty());
        let Stmt::Net(def) = &file.stmts[0] else {
            panic!()
        };
        assert_eq!(def.items.len(), 3);
        assert!(matches!(def.items[2], NetItem::Name(ref n) if n.text == "other"));
    }

    #[test]
    fn list_continues_after_comma_on_next_line() {
        let (file, diags) = parse("net x = 192.0.2.0/24,\n   198.51.100.0/24 # c\nnet y = x\n");
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(file.stmts.len(), 2);
        assert_eq!(file.comments.len(), 1);
    }

    #[test]
    fn error_recovers_at_next_statement() {
        let (file, diags) = parse("net x = 192.0.2.0/24 junk\nnet y = 198.51.100.0/24\nrul z\n");
        assert_eq!(file.stmts.len(), 1);
        assert_eq!(diags.items.len(), 2);
        assert!(diags.items[0].message.contains("`,` or end of line"));
        assert_eq!(diags.items[1].help.as_deref(), Some("did you mean `rule`?"));
    }

    #[test]
    fn probes() {
        let p = parse_probe(FileId(0), "tcp 10.0.2.5:40000 -> 192.168.5.10:1433").unwrap();
        assert!(matches!(
            p,
            Probe::Packet {
                src_port: Some(40000),
                dst_port: Some(1433),
                ..
            }
        ));
        let p = parse_probe(FileId(0), "tcp [2001:db8::1]:5 -> [2001:db8::2]:443").unwrap();
        assert!(matches!(
            p,
            Probe::Packet {
                src_port: Some(5),
                ..
            }
        ));
        let p = parse_probe(
            FileId(0),
            "http 10.0.1.7 -> https://example.com/ method POST",
        )
        .unwrap();
        assert!(matches!(
            p,
            Probe::Http {
                method: Some(_),
                ..
            }
        ));
        assert!(parse_probe(FileId(0), "tcp 10.0.2.5 -> 192.168.5.10").is_err());
    }

    #[test]
    fn never_panics_on_junk() {
        for s in [
            "\u{0}\u{1}ÿ",
            "rule",
            "rule x allow",
            "net = ",
            "http a allow b -> \"x",
            "expect allow tcp [",
            "svc s = tcp/",
            "net a = 1.2.3.4/99",
            "net a = ::ffff:1.2.3.4-",
        ] {
            let _ = parse(s);
        }
    }
}
