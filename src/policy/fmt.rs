//! Canonical formatting of policy files (`palisade fmt`).
//!
//! One statement a line, single spaces, `, ` between items, options in a
//! fixed order, and names (and verdicts) aligned in columns within a run of
//! consecutive statements of the same kind. Comments and single blank lines
//! are kept. Long `net`/`svc`/`zone` lists wrap one item a line. Formatting
//! is idempotent and never changes what the policy means.

use super::ast::*;
use super::diag::Diagnostics;
use super::parse::parse_file;
use super::source::{FileId, SourceFile};
use std::fmt::Write;
use std::net::IpAddr;
use std::path::PathBuf;

/// Lines longer than this wrap their lists, one item a line.
const WRAP_WIDTH: usize = 100;

/// Formats one file's text. Fails with the parse diagnostics when the file
/// does not parse: a broken file is never rewritten.
pub fn format_text(text: &str) -> Result<String, Diagnostics> {
    let (file, diags) = parse_file(FileId(0), text);
    if diags.has_errors() {
        return Err(diags);
    }
    Ok(render(
        &file,
        &SourceFile::new(PathBuf::new(), text.to_string()),
    ))
}

enum Piece<'a> {
    Stmt(&'a Stmt, Vec<&'a Comment>),
    Comment(&'a Comment),
}

fn kind(s: &Stmt) -> &'static str {
    match s {
        Stmt::Include { .. } => "include",
        Stmt::Net(_) => "net",
        Stmt::Svc(_) => "svc",
        Stmt::Zone(_) => "zone",
        Stmt::Rule(_) => "rule",
        Stmt::Http(_) => "http",
        Stmt::Default(_) => "default",
        Stmt::Expect(_) => "expect",
    }
}

fn render(file: &File, src: &SourceFile) -> String {
    // Interleave statements and comments by position; a comment that sits
    // on a statement's lines travels with it.
    let mut pieces: Vec<(usize, usize, Piece)> = Vec::new();
    let mut comments = file.comments.iter().peekable();
    for s in &file.stmts {
        let span = s.span();
        let first_line = src.line_col(span.start).line;
        let last_line = src
            .line_col(span.end.saturating_sub(1).max(span.start))
            .line;
        while let Some(c) = comments.peek() {
            if c.span.start >= span.start {
                break;
            }
            let l = src.line_col(c.span.start).line;
            pieces.push((l, l, Piece::Comment(c)));
            comments.next();
        }
        let mut attached = Vec::new();
        while let Some(c) = comments.peek() {
            let l = src.line_col(c.span.start).line;
            if l > last_line {
                break;
            }
            attached.push(*c);
            comments.next();
        }
        pieces.push((first_line, last_line, Piece::Stmt(s, attached)));
    }
    for c in comments {
        let l = src.line_col(c.span.start).line;
        pieces.push((l, l, Piece::Comment(c)));
    }

    // Groups for alignment: consecutive statements of one kind that are on
    // consecutive lines of the output, so that formatting the output again
    // finds the same groups. A statement starts a group of its own when a
    // blank line is kept above it, or when comments from inside it are
    // written above it.
    let joins_previous = |j: usize| match &pieces[j].2 {
        Piece::Stmt(_, attached) => {
            pieces[j].0 <= pieces[j - 1].1 + 1
                && moved_above(attached, pieces[j].1, src).next().is_none()
        }
        Piece::Comment(_) => false,
    };
    let mut widths: Vec<(usize, usize)> = vec![(0, 0); pieces.len()];
    let mut i = 0;
    while i < pieces.len() {
        let Piece::Stmt(s, _) = &pieces[i].2 else {
            i += 1;
            continue;
        };
        let k = kind(s);
        let mut j = i + 1;
        while j < pieces.len() {
            match &pieces[j].2 {
                Piece::Stmt(t, _) if kind(t) == k && joins_previous(j) => j += 1,
                _ => break,
            }
        }
        let name_w = pieces[i..j]
            .iter()
            .filter_map(|p| match &p.2 {
                Piece::Stmt(s, _) => name_of(s).map(|n| n.chars().count()),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let action_w = pieces[i..j]
            .iter()
            .filter_map(|p| match &p.2 {
                Piece::Stmt(s, _) => action_of(s).map(|a| a.as_str().len()),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        for w in &mut widths[i..j] {
            *w = (name_w, action_w);
        }
        i = j;
    }

    let mut out = String::new();
    let mut prev_last: Option<usize> = None;
    for (idx, (first, last, piece)) in pieces.iter().enumerate() {
        if let Some(p) = prev_last {
            if *first > p + 1 {
                out.push('\n');
            }
        }
        match piece {
            Piece::Comment(c) => {
                out.push_str(c.text.trim_end());
                out.push('\n');
            }
            Piece::Stmt(s, attached) => {
                for c in moved_above(attached, *last, src) {
                    out.push_str(c.text.trim_end());
                    out.push('\n');
                }
                let trailing = trailing_comment(attached, *last, src);
                let (nw, aw) = widths[idx];
                out.push_str(&stmt_text(s, nw, aw));
                if let Some(c) = trailing {
                    out.push(' ');
                    out.push_str(c.text.trim_end());
                }
                out.push('\n');
            }
        }
        prev_last = Some(*last);
    }
    out
}

/// The comment that stays at the end of a statement: the first one on its
/// last line.
fn trailing_comment<'a>(
    attached: &[&'a Comment],
    last: usize,
    src: &SourceFile,
) -> Option<&'a Comment> {
    attached
        .iter()
        .copied()
        .find(|c| src.line_col(c.span.start).line == last)
}

/// Comments inside a multi-line statement other than its trailing one: fmt
/// writes them above the statement.
fn moved_above<'a, 'b>(
    attached: &'b [&'a Comment],
    last: usize,
    src: &'b SourceFile,
) -> impl Iterator<Item = &'a Comment> + 'b {
    let trailing = trailing_comment(attached, last, src);
    attached
        .iter()
        .copied()
        .filter(move |c| !trailing.is_some_and(|t| std::ptr::eq(t, *c)))
}

fn name_of(s: &Stmt) -> Option<&str> {
    match s {
        Stmt::Net(d) | Stmt::Zone(d) => Some(&d.name.text),
        Stmt::Svc(d) => Some(&d.name.text),
        Stmt::Rule(r) => Some(&r.name.text),
        Stmt::Http(r) => Some(&r.name.text),
        _ => None,
    }
}

fn action_of(s: &Stmt) -> Option<Action> {
    match s {
        Stmt::Rule(r) => Some(r.action),
        Stmt::Http(r) => Some(r.action),
        Stmt::Expect(e) => Some(e.action),
        _ => None,
    }
}

fn pad(s: &str, w: usize) -> String {
    format!("{s:<w$}")
}

pub fn net_item_text(n: &NetItem) -> String {
    match n {
        NetItem::Prefix { addr, len, .. } => {
            let full = if addr.is_ipv4() { 32 } else { 128 };
            if *len == full {
                addr.to_string()
            } else {
                format!("{addr}/{len}")
            }
        }
        NetItem::Range { lo, hi, .. } => format!("{lo}-{hi}"),
        NetItem::Any { family, .. } => match family {
            None => "any".into(),
            Some(Family::V4) => "any4".into(),
            Some(Family::V6) => "any6".into(),
        },
        NetItem::Name(n) => n.text.clone(),
    }
}

fn port_text(p: &PortRange) -> String {
    if p.lo == p.hi {
        p.lo.to_string()
    } else {
        format!("{}-{}", p.lo, p.hi)
    }
}

fn icmp_value_text(v: &IcmpValue) -> String {
    match v {
        IcmpValue::Number(n) => n.to_string(),
        IcmpValue::Name(s) => s.clone(),
    }
}

fn proto_text(p: Proto) -> String {
    match p {
        Proto::Tcp => "tcp".into(),
        Proto::Udp => "udp".into(),
        Proto::Sctp => "sctp".into(),
        Proto::Icmp => "icmp".into(),
        Proto::Icmpv6 => "icmpv6".into(),
        Proto::Number(47) => "gre".into(),
        Proto::Number(50) => "esp".into(),
        Proto::Number(51) => "ah".into(),
        Proto::Number(89) => "ospf".into(),
        Proto::Number(112) => "vrrp".into(),
        Proto::Number(n) => format!("ip/{n}"),
    }
}

fn icmp_spec_text(spec: &IcmpSpec) -> String {
    let mut s = icmp_value_text(&spec.ty);
    if let Some(c) = &spec.code {
        s.push(':');
        s.push_str(&icmp_value_text(c));
    }
    s
}

pub fn svc_item_text(item: &SvcItem) -> String {
    match item {
        SvcItem::Name(n) => n.text.clone(),
        SvcItem::Proto {
            proto,
            dst_ports,
            src_ports,
            icmp,
            ..
        } => {
            let mut s = proto_text(*proto);
            if let Some(p) = dst_ports.first() {
                s.push('/');
                s.push_str(&port_text(p));
            }
            if let Some(spec) = icmp {
                s.push('/');
                s.push_str(&icmp_spec_text(spec));
            }
            if let Some(p) = src_ports.first() {
                s.push_str(" sport ");
                s.push_str(&port_text(p));
            }
            s
        }
    }
}

/// A string as the language writes it: in double quotes, with `"` and `\\`
/// escaped by a backslash.
pub(crate) fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn join<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

fn endpoint(addr: &IpAddr, port: Option<u32>) -> String {
    match (addr, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

fn options_text(o: &RuleOptions) -> String {
    let mut s = String::new();
    if let Some((owner, _)) = &o.owner {
        let _ = write!(s, " owner {}", quoted(owner));
    }
    if let Some(d) = &o.expires {
        let _ = write!(s, " expires {:04}-{:02}-{:02}", d.year, d.month, d.day);
    }
    if let Some((c, _)) = &o.comment {
        let _ = write!(s, " comment {}", quoted(c));
    }
    if o.log {
        s.push_str(" log");
    }
    s
}

/// A definition, wrapped one item a line when it is long.
fn def_text(kw: &str, name: &str, nw: usize, items: Vec<String>) -> String {
    let head = format!("{kw} {} = ", pad(name, nw));
    let one = format!("{head}{}", items.join(", "));
    if one.chars().count() <= WRAP_WIDTH || items.len() < 2 {
        return one;
    }
    let indent = " ".repeat(head.chars().count());
    let mut s = head;
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
            s.push_str(&indent);
        }
        s.push_str(it);
    }
    s
}

fn stmt_text(s: &Stmt, nw: usize, aw: usize) -> String {
    match s {
        Stmt::Include { path, .. } => format!("include {}", quoted(path)),
        Stmt::Net(d) => def_text(
            "net",
            &d.name.text,
            nw,
            d.items.iter().map(net_item_text).collect(),
        ),
        Stmt::Zone(d) => def_text(
            "zone",
            &d.name.text,
            nw,
            d.items.iter().map(net_item_text).collect(),
        ),
        Stmt::Svc(d) => def_text(
            "svc",
            &d.name.text,
            nw,
            d.items.iter().map(svc_item_text).collect(),
        ),
        Stmt::Rule(r) => {
            let mut s = format!(
                "rule {} {} {} -> {}",
                pad(&r.name.text, nw),
                pad(r.action.as_str(), aw),
                join(&r.src, net_item_text),
                join(&r.dst, net_item_text)
            );
            if !r.services.is_empty() {
                let _ = write!(s, " service {}", join(&r.services, svc_item_text));
            }
            s.push_str(&options_text(&r.options));
            s
        }
        Stmt::Http(r) => {
            let dst = join(&r.dst, |d| match d {
                HttpDest::Host { pattern, .. } => quoted(pattern),
                HttpDest::Net(n) => net_item_text(n),
            });
            let mut s = format!(
                "http {} {} {} -> {dst}",
                pad(&r.name.text, nw),
                pad(r.action.as_str(), aw),
                join(&r.src, net_item_text)
            );
            if !r.ports.is_empty() {
                let _ = write!(s, " port {}", join(&r.ports, port_text));
            }
            if !r.methods.is_empty() {
                let _ = write!(s, " method {}", join(&r.methods, |m| m.text.clone()));
            }
            if r.plain_tunnel {
                s.push_str(" plain-tunnel");
            }
            s.push_str(&options_text(&r.options));
            s
        }
        Stmt::Default(d) => {
            let mut s = format!("default {}", d.action.as_str());
            if d.log {
                s.push_str(" log");
            }
            s
        }
        Stmt::Expect(e) => {
            let mut s = format!(
                "expect {} {}",
                pad(e.action.as_str(), aw),
                probe_text(&e.probe)
            );
            if let Some(by) = &e.by {
                let _ = write!(s, " by {}", by.text);
            }
            s
        }
    }
}

pub fn probe_text(p: &Probe) -> String {
    match p {
        Probe::Packet {
            proto,
            src,
            src_port,
            dst,
            dst_port,
            icmp,
            ..
        } => {
            let mut head = proto_text(*proto);
            if let Some(spec) = icmp {
                head.push('/');
                head.push_str(&icmp_spec_text(spec));
            }
            format!(
                "{head} {} -> {}",
                endpoint(src, *src_port),
                endpoint(dst, *dst_port)
            )
        }
        Probe::Http {
            src, url, method, ..
        } => {
            let mut s = format!("http {src} -> {url}");
            if let Some(m) = method {
                let _ = write!(s, " method {}", m.text);
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_and_is_idempotent() {
        let text = "# names\nnet a = 192.0.2.0/24,198.51.100.0/24\nnet longer-name =   a # trailing\n\n\n\nrule r1 allow a->longer-name service tcp/443 log owner \"x\"\nrule r2   deny any -> any\ndefault deny log\n";
        let out = format_text(text).unwrap();
        assert_eq!(
            out,
            "# names\nnet a           = 192.0.2.0/24, 198.51.100.0/24\nnet longer-name = a # trailing\n\nrule r1 allow a -> longer-name service tcp/443 owner \"x\" log\nrule r2 deny  any -> any\ndefault deny log\n"
        );
        assert_eq!(format_text(&out).unwrap(), out);
    }

    #[test]
    fn the_shipped_example_is_formatted() {
        let text = include_str!("../../policies/example.policy");
        assert_eq!(format_text(text).unwrap(), text);
    }

    #[test]
    fn a_hash_in_a_url_starts_a_comment() {
        // Found by fuzzing: the URL token and the comment both took `#...`.
        let text = "expect deny http 10.0.1.7 -> https://a.example/#frag by paste\n";
        let out = format_text(text).unwrap();
        assert_eq!(
            out,
            "expect deny http 10.0.1.7 -> https://a.example/ #frag by paste\n"
        );
        assert_eq!(format_text(&out).unwrap(), out);
    }

    #[test]
    fn methods_are_written_as_they_were() {
        // `get` is not `GET` (check refuses it): fmt must not turn a policy
        // that fails into one that passes.
        let text = "http h allow any -> \"x.example.com\" port 80 method get\n\
                    expect allow http 192.0.2.1 -> http://x.example.com/ method get\n";
        let out = format_text(text).unwrap();
        assert_eq!(out.matches("method get").count(), 2, "{out}");
    }

    #[test]
    fn strings_escape_quotes_and_backslashes() {
        // `\"` and `\\` are escapes; a `#` after an escaped quote is still
        // inside the string; any other backslash is itself.
        let text = "rule r allow any -> 192.0.2.1 owner \"net\\\\ops\" comment \"say \\\"hi\\\" # not a comment \\d\" # a comment\n";
        // fmt writes the lone backslash escaped, its canonical form.
        let out = format_text(text).unwrap();
        assert_eq!(out, text.replace("\\d", "\\\\d"));
        assert_eq!(format_text(&out).unwrap(), out);
        let (file, diags) =
            crate::policy::parse::parse_file(crate::policy::source::FileId(0), text);
        assert!(diags.is_empty(), "{diags:?}");
        let crate::policy::ast::Stmt::Rule(r) = &file.stmts[0] else {
            panic!("{:?}", file.stmts)
        };
        assert_eq!(r.options.owner.as_ref().unwrap().0, "net\\ops");
        assert_eq!(
            r.options.comment.as_ref().unwrap().0,
            "say \"hi\" # not a comment \\d"
        );
        assert_eq!(file.comments.len(), 1);
        assert_eq!(file.comments[0].text, "# a comment");
        // An escaped quote does not close the string.
        assert!(format_text("rule r allow any -> any comment \"open \\\"\n").is_err());
    }

    #[test]
    fn refuses_broken_files() {
        assert!(format_text("net = \n").is_err());
    }

    /// Formatting formatted text changes nothing, also when comments inside
    /// a multi-line list move above their statement: the statement is no
    /// longer next to the one before it, so it is aligned on its own.
    #[test]
    fn comments_moved_out_of_a_list_keep_fmt_idempotent() {
        let text = "net a-long-name = 192.0.2.1\nnet b = 192.0.2.2, # why\n        192.0.2.3\n";
        let out = format_text(text).unwrap();
        assert_eq!(
            out,
            "net a-long-name = 192.0.2.1\n# why\nnet b = 192.0.2.2, 192.0.2.3\n"
        );
        assert_eq!(format_text(&out).unwrap(), out);
        let text = "rule long-rule-name allow any -> 192.0.2.1\n\
                    rule multi allow 192.0.2.8, # first src\n   192.0.2.9 -> 192.0.2.1 service tcp/22, # ssh\n   tcp/23 # telnet\n\
                    rule r3 deny any -> any\n";
        let out = format_text(text).unwrap();
        assert_eq!(
            out,
            "rule long-rule-name allow any -> 192.0.2.1\n# first src\n# ssh\n\
             rule multi allow 192.0.2.8, 192.0.2.9 -> 192.0.2.1 service tcp/22, tcp/23 # telnet\n\
             rule r3    deny  any -> any\n"
        );
        assert_eq!(format_text(&out).unwrap(), out);
        // The smallest case the property below found.
        let text = "rule a deny 192.0.2.1 -> any service tcp/22\n\
                    rule a allow 192.0.2.1, # why\n   192.0.2.1 -> any service tcp/22\n";
        let out = format_text(text).unwrap();
        assert_eq!(format_text(&out).unwrap(), out);
    }

    /// fmt(fmt(x)) == fmt(x) for every policy shipped or used as a golden
    /// case that parses.
    #[test]
    fn formatting_twice_is_formatting_once_for_the_shipped_policies() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for dir in [
            "policies",
            "tests/golden",
            "tests/golden/include",
            "tests/analysis",
        ] {
            for e in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = e.unwrap().path();
                if path.extension().is_none_or(|x| x != "policy") {
                    continue;
                }
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let Ok(once) = format_text(&text) else {
                    continue;
                };
                let twice = format_text(&once).unwrap();
                assert_eq!(twice, once, "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 20, "only {seen} policies formatted");
    }

    /// One statement as a user might write it: lists broken over lines
    /// after commas, comments inside and after, names of several lengths.
    fn stmt() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let name = prop::sample::select(vec!["a", "bb", "a-long-name", "srv"]);
        let sep = prop::sample::select(vec![", ", ",", ",\n   ", ", # why\n   ", ", #\n"]);
        let items = prop::collection::vec((1u8..250, sep), 1..4).prop_map(|v| {
            let mut s = String::new();
            for (i, (n, sep)) in v.iter().enumerate() {
                if i > 0 {
                    s.push_str(sep);
                }
                s.push_str(&format!("192.0.2.{n}"));
            }
            s
        });
        let end = prop::sample::select(vec!["", " # trailing"]);
        (0u8..3, name, items, any::<bool>(), end).prop_map(|(kind, name, items, allow, end)| {
            let verdict = if allow { "allow" } else { "deny" };
            let body = match kind {
                0 => format!("net {name} = {items}"),
                1 => format!("rule {name} {verdict} {items} -> any service tcp/22"),
                _ => format!("http {name} {verdict} {items} -> \"x.example.com\""),
            };
            format!("{body}{end}\n")
        })
    }

    proptest::proptest! {
        // Cases it finds are kept as unit tests (above), not in a file.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 500,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]
        #[test]
        fn fmt_is_idempotent(
            lines in proptest::collection::vec(
                (stmt(), proptest::sample::select(vec!["", "\n", "# note\n"])),
                1..8,
            )
        ) {
            let text: String = lines.iter().map(|(s, after)| format!("{s}{after}")).collect();
            let once = format_text(&text).map_err(|d| {
                proptest::test_runner::TestCaseError::fail(format!("{text}: {d:?}"))
            })?;
            let twice = format_text(&once).unwrap();
            proptest::prop_assert_eq!(twice, once, "from:\n{}", text);
        }
    }
}
