//! Reading the trail for people: filters (`query`), a summary for a time
//! window (`summary`) and Squid native access.log lines (`export`).

use super::record::{Action, AuditRecord, RecordKind};
use super::time::Timestamp;
use super::trail::{list_files, split_lines};
use ipnet::IpNet;
use std::collections::HashMap;
use std::path::Path;

/// A host pattern: `example.com` matches that name only, `*.example.com`
/// any name below it (not `example.com` itself). Case-insensitive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainPattern(String);

impl DomainPattern {
    pub fn parse(s: &str) -> Result<DomainPattern, String> {
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let body = lower.strip_prefix("*.").unwrap_or(&lower);
        if body.is_empty() || body.contains('*') {
            return Err(format!(
                "{s:?} is not a domain pattern; write `example.com` or `*.example.com`"
            ));
        }
        Ok(DomainPattern(lower))
    }

    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match self.0.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host[..host.len() - suffix.len()].ends_with('.')
            }
            None => host == self.0,
        }
    }
}

/// Whether an endpoint's address is in `net` (true when there is no `net`
/// to match).
fn in_net(net: Option<IpNet>, end: &Option<super::record::Endpoint>) -> bool {
    net.is_none_or(|net| {
        end.as_ref()
            .and_then(|e| e.ip)
            .is_some_and(|ip| net.contains(&ip))
    })
}

#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub action: Option<Action>,
    pub source: Option<IpNet>,
    /// The destination address a record names (the filter's flows, the
    /// address a proxy request or tunnel was sent to).
    pub destination: Option<IpNet>,
    pub domain: Option<DomainPattern>,
    pub rule: Option<String>,
}

impl Filter {
    pub fn in_window(&self, r: &AuditRecord) -> bool {
        self.since.is_none_or(|s| r.timestamp >= s) && self.until.is_none_or(|u| r.timestamp < u)
    }

    pub fn matches(&self, r: &AuditRecord) -> bool {
        let e = &r.event;
        self.in_window(r)
            && self.action.is_none_or(|a| e.event.action == a)
            && in_net(self.source, &e.source)
            && in_net(self.destination, &e.destination)
            && self.domain.as_ref().is_none_or(|p| {
                let mut names = Vec::new();
                if let Some(d) = e.destination.as_ref().and_then(|d| d.domain.as_deref()) {
                    names.push(d.to_string());
                }
                if let Some(t) = &e.tls {
                    names.push(t.client.server_name.clone());
                }
                if let Some(n) = e.destination_name() {
                    names.push(n);
                }
                names.iter().any(|n| p.matches(n))
            })
            && self.rule.as_ref().is_none_or(|name| {
                e.rule.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
            })
    }
}

/// A line that is not a record (reported, never silently skipped).
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub file: String,
    pub line: usize,
    pub why: String,
    /// The bytes after a file's last newline: a write a crash cut short
    /// (which the writer leaves in place and the next start record
    /// declares), not a damaged record.
    pub incomplete: bool,
}

/// Calls `each` with every record of the trail in order, and its exact
/// line. Returns the lines that could not be read as records.
pub fn for_each_record(
    dir: &Path,
    mut each: impl FnMut(&[u8], &AuditRecord),
) -> std::io::Result<Vec<Unreadable>> {
    let mut bad = Vec::new();
    for (_, path) in list_files(dir)? {
        let content = std::fs::read(&path)?;
        let (lines, torn) = split_lines(&content);
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for l in &lines {
            match serde_json::from_slice::<AuditRecord>(l.bytes) {
                Ok(r) => each(l.bytes, &r),
                Err(e) => bad.push(Unreadable {
                    file: file.clone(),
                    line: l.number,
                    why: e.to_string(),
                    incomplete: false,
                }),
            }
        }
        if torn.is_some() {
            bad.push(Unreadable {
                file,
                line: lines.len() + 1,
                why: "incomplete last line".into(),
                incomplete: true,
            });
        }
    }
    Ok(bad)
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Column headings for [`table_row`].
pub const TABLE_HEADER: &str = "TIMESTAMP                    SEQ      ACTION         STATUS KIND            SOURCE                                   DESTINATION                              RULE                 REASON";

/// One record as a table line. STATUS is the HTTP status the client got
/// (an allowed request whose origin failed shows its 502 or 504 here,
/// beside the policy's verdict in ACTION); `-` for records without one.
pub fn table_row(r: &AuditRecord) -> String {
    let e = &r.event;
    let src = e.source.as_ref().map(|s| match (s.ip, s.port) {
        (Some(ip), Some(p)) => std::net::SocketAddr::new(ip, p).to_string(),
        (Some(ip), None) => ip.to_string(),
        _ => "-".into(),
    });
    let dst = e.destination_name().or_else(|| {
        e.destination
            .as_ref()
            .and_then(|d| d.ip)
            .map(|ip| ip.to_string())
    });
    let dst = match (dst, e.destination.as_ref().and_then(|d| d.port)) {
        (Some(d), Some(p)) => Some(format!("{d}:{p}")),
        (d, _) => d,
    };
    let row = format!(
        "{:<28} {:<8} {:<14} {:<6} {:<15} {:<40} {:<40} {:<20} {}",
        r.timestamp.to_string(),
        r.seq,
        e.event.action.as_str(),
        dash(
            e.http
                .as_ref()
                .and_then(|h| h.response.as_ref())
                .map(|r| r.status_code)
        ),
        e.event.code.as_str(),
        dash(src),
        dash(dst.or_else(|| e.url.as_ref().map(|u| u.full.clone()))),
        dash(e.rule.as_ref().and_then(|r| r.name.clone())),
        dash(e.event.reason.clone())
    );
    printable(&row)
}

/// `s` with every control character (a newline, an escape sequence, a
/// NUL) and every character outside ASCII written as an escape, so text a
/// client chose (a server name, a Host header, a URL) cannot forge table
/// rows, drive the auditor's terminal, reorder what it shows (bidirectional
/// controls), or pass off one name as another (look-alike letters: a
/// Cyrillic `а` shows as `\u{430}`). Names on the wire are ASCII (IDNs
/// travel as punycode), so nothing a well-behaved client sends changes.
pub fn printable(s: &str) -> String {
    let plain = |c: char| c.is_ascii() && !c.is_ascii_control();
    if s.chars().all(plain) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if plain(c) {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// Counts for `palisade audit summary`.
#[derive(Debug, Default)]
pub struct Summary {
    pub records: u64,
    pub allowed: u64,
    pub denied: u64,
    pub denied_destinations: HashMap<String, u64>,
    pub clients: HashMap<String, u64>,
    pub rule_hits: HashMap<String, (u64, u64)>,
    pub bytes_by_destination: HashMap<String, u64>,
    pub gaps: u64,
    pub lost_records: u64,
    /// Tunnels opened in the window with no end record in it, by request
    /// id: still open at the window's end, or cut by a crash.
    pub open_tunnels: std::collections::BTreeMap<String, String>,
    /// Responses still streaming after their `response_open` record, with
    /// no `proxy_request` record in the window, by request id.
    pub open_responses: std::collections::BTreeMap<String, String>,
}

fn destination_key(r: &AuditRecord) -> String {
    let e = &r.event;
    e.destination_name()
        .or_else(|| {
            e.destination
                .as_ref()
                .and_then(|d| d.ip)
                .map(|ip| ip.to_string())
        })
        .unwrap_or_else(|| "-".into())
}

impl Summary {
    pub fn add(&mut self, r: &AuditRecord) {
        let e = &r.event;
        if e.event.action == Action::Gap {
            self.gaps += 1;
            if let Some(g) = e.palisade.as_ref().and_then(|p| p.gap.as_ref()) {
                self.lost_records += g.lost_records;
            }
        }
        if e.event.code == RecordKind::Lifecycle {
            return;
        }
        let request_id = e
            .http
            .as_ref()
            .and_then(|h| h.request.as_ref())
            .and_then(|r| r.id.clone());
        // A tunnel is one decision, counted at its end record (which says
        // whether it passed its checks, and what it carried); its opening
        // record marks it open until then. Likewise a long response: its
        // opening record marks it streaming until its request's record.
        match e.event.code {
            RecordKind::TunnelOpen | RecordKind::ResponseOpen => {
                if let Some(id) = request_id {
                    let client = dash(e.source.as_ref().and_then(|s| s.ip));
                    if e.event.code == RecordKind::TunnelOpen {
                        let port = e.destination.as_ref().and_then(|d| d.port).unwrap_or(0);
                        let to = format!("{client} -> {}:{port}", destination_key(r));
                        self.open_tunnels.insert(id, to);
                    } else {
                        let url = e
                            .url
                            .as_ref()
                            .map_or_else(|| destination_key(r), |u| u.full.clone());
                        self.open_responses.insert(id, format!("{client} -> {url}"));
                    }
                }
                return;
            }
            RecordKind::ConnectTunnel => {
                if let Some(id) = &request_id {
                    self.open_tunnels.remove(id);
                }
            }
            RecordKind::ProxyRequest => {
                if let Some(id) = &request_id {
                    self.open_responses.remove(id);
                }
            }
            _ => {}
        }
        let bytes = e.source.as_ref().and_then(|s| s.bytes).unwrap_or(0)
            + e.destination.as_ref().and_then(|d| d.bytes).unwrap_or(0);
        if bytes > 0 && e.event.code != RecordKind::DropSummary {
            *self
                .bytes_by_destination
                .entry(destination_key(r))
                .or_default() += bytes;
        }
        // A filter flow is one decision, counted at its start; its end
        // record adds only its bytes. Requests and drops count as they are.
        if e.event.code == RecordKind::FlowEnd {
            return;
        }
        self.records += 1;
        match e.event.action {
            Action::Allowed => self.allowed += 1,
            Action::Denied => {
                self.denied += 1;
                *self
                    .denied_destinations
                    .entry(destination_key(r))
                    .or_default() += 1;
            }
            _ => {}
        }
        if let Some(ip) = e.source.as_ref().and_then(|s| s.ip) {
            *self.clients.entry(ip.to_string()).or_default() += 1;
        }
        if let Some(name) = e.rule.as_ref().and_then(|r| r.name.clone()) {
            let hits = self.rule_hits.entry(name).or_default();
            if e.event.action == Action::Denied {
                hits.1 += 1;
            } else {
                hits.0 += 1;
            }
        }
    }

    pub fn render(&self, top: usize) -> String {
        fn top_n(map: &HashMap<String, u64>, n: usize) -> Vec<(&String, &u64)> {
            let mut v: Vec<_> = map.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            v.truncate(n);
            v
        }
        let mut out = format!(
            "records: {} (allowed {}, denied {})\n",
            self.records, self.allowed, self.denied
        );
        if self.gaps > 0 {
            out += &format!(
                "gaps: {} ({} records lost while the log could not be written)\n",
                self.gaps, self.lost_records
            );
        }
        let open = [
            (
                "responses still streaming with no end record (at the window's end, or cut by a crash)",
                &self.open_responses,
            ),
            (
                "tunnels opened with no end record (still open at the window's end, or cut by a crash)",
                &self.open_tunnels,
            ),
        ];
        for (heading, items) in open.into_iter().filter(|(_, m)| !m.is_empty()) {
            out += &format!("{heading}: {}\n", items.len());
            for (id, what) in items.iter().take(top) {
                out += &format!("  {id}  {what}\n");
            }
        }
        out += "\ntop denied destinations:\n";
        for (k, v) in top_n(&self.denied_destinations, top) {
            out += &format!("  {v:>10}  {k}\n");
        }
        out += "\ntop clients:\n";
        for (k, v) in top_n(&self.clients, top) {
            out += &format!("  {v:>10}  {k}\n");
        }
        out += "\nrule hits (allowed / denied):\n";
        let mut rules: Vec<_> = self.rule_hits.iter().collect();
        rules.sort_by(|a, b| (b.1 .0 + b.1 .1).cmp(&(a.1 .0 + a.1 .1)).then(a.0.cmp(b.0)));
        for (k, (a, d)) in rules {
            out += &format!("  {a:>10} / {d:<10}  {k}\n");
        }
        out += "\nbytes by destination:\n";
        for (k, v) in top_n(&self.bytes_by_destination, top) {
            out += &format!("  {v:>14}  {k}\n");
        }
        out
    }
}

/// A Squid native access.log line for a proxy record (others: `None`):
/// `time elapsed client code/status bytes method URL user hierarchy type`.
pub fn squid_line(r: &AuditRecord) -> Option<String> {
    let e = &r.event;
    if !matches!(
        e.event.code,
        RecordKind::ProxyRequest | RecordKind::ConnectTunnel
    ) {
        return None;
    }
    let micros = r.timestamp.micros();
    let time = format!(
        "{}.{:03}",
        micros.div_euclid(1_000_000),
        micros.rem_euclid(1_000_000) / 1000
    );
    let elapsed_ms = e.event.duration.unwrap_or(0) / 1_000_000;
    let client = dash(e.source.as_ref().and_then(|s| s.ip));
    let tunnel = e.event.code == RecordKind::ConnectTunnel;
    let status = e
        .http
        .as_ref()
        .and_then(|h| h.response.as_ref())
        .map(|s| s.status_code);
    let code = match (e.event.action, tunnel) {
        // Refused before any answer (a head that never finished): Squid's
        // own code for a transaction that ended without one.
        (Action::Denied, false) if status.is_none() => "NONE_NONE/000".to_string(),
        (Action::Denied, _) => format!("TCP_DENIED/{}", status.unwrap_or(403)),
        (_, true) => format!("TCP_TUNNEL/{}", status.unwrap_or(200)),
        (_, false) => format!("TCP_MISS/{}", status.unwrap_or(0)),
    };
    let bytes = e.destination.as_ref().and_then(|d| d.bytes).unwrap_or(0);
    let method = e
        .http
        .as_ref()
        .and_then(|h| h.request.as_ref())
        .filter(|r| !r.method.is_empty())
        .map_or("-", |r| r.method.as_str());
    let url = if tunnel {
        let host = e.destination_name().unwrap_or_else(|| "-".into());
        match e.destination.as_ref().and_then(|d| d.port) {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    } else {
        e.url
            .as_ref()
            .map_or_else(|| "-".into(), |u| u.full.clone())
    };
    let hierarchy = match (e.event.action, e.destination.as_ref().and_then(|d| d.ip)) {
        (Action::Denied, _) | (_, None) => "HIER_NONE/-".to_string(),
        (_, Some(ip)) => format!("HIER_DIRECT/{ip}"),
    };
    // Squid fields are space separated; a URL never holds a raw space, but
    // a hostile one is escaped rather than allowed to shift the columns.
    let url = printable(&url.replace(' ', "%20"));
    Some(format!(
        "{time} {elapsed_ms:>6} {client} {code} {bytes} {method} {url} - {hierarchy} -"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::AuditEvent;

    fn record(e: AuditEvent) -> AuditRecord {
        AuditRecord {
            timestamp: Timestamp::parse("2026-11-25T11:00:00.250000Z").unwrap(),
            seq: 3,
            boot_id: "b".into(),
            prev_hash: "00".into(),
            event: e,
        }
    }

    #[test]
    fn a_filter_flow_counts_once_with_its_bytes() {
        use crate::audit::record::{FlowTuple, Traffic};
        let flow = FlowTuple {
            proto: 6,
            src_ip: "192.0.2.5".parse().unwrap(),
            src_port: 40000,
            dst_ip: "203.0.113.9".parse().unwrap(),
            dst_port: 443,
        };
        let mut s = Summary::default();
        s.add(&record(
            AuditEvent::flow_start(Action::Allowed, &flow).with_rule("web-out", "ab"),
        ));
        let t = |bytes| Traffic { packets: 1, bytes };
        s.add(&record(
            AuditEvent::flow_end(&flow, t(100), t(900), std::time::Duration::from_secs(1))
                .with_rule("web-out", "ab"),
        ));
        assert_eq!((s.records, s.allowed, s.denied), (1, 1, 0));
        assert_eq!(s.clients.get("192.0.2.5"), Some(&1));
        assert_eq!(s.rule_hits.get("web-out"), Some(&(1, 0)));
        assert_eq!(s.bytes_by_destination.get("203.0.113.9"), Some(&1000));
    }

    #[test]
    fn a_long_response_counts_once_and_streams_until_its_end_record() {
        let client = "192.0.2.10:40000".parse().unwrap();
        let request = || {
            AuditEvent::proxy_request(Action::Allowed, client, "GET", "http://example.com/iso")
                .with_request_id("r2")
                .with_rule("web", "ab")
        };
        let mut opening = request();
        opening.event.code = RecordKind::ResponseOpen;
        let mut s = Summary::default();
        s.add(&record(opening.clone()));
        assert_eq!(s.records, 0);
        assert_eq!(
            s.open_responses.get("r2").map(String::as_str),
            Some("192.0.2.10 -> http://example.com/iso")
        );
        assert!(s
            .render(10)
            .contains("responses still streaming with no end record"));
        assert_eq!(squid_line(&record(opening)), None);
        s.add(&record(request()));
        assert!(s.open_responses.is_empty());
        assert_eq!((s.records, s.allowed), (1, 1));
        assert!(!s.render(10).contains("still streaming"));
    }

    #[test]
    fn a_tunnel_counts_once_and_is_open_until_its_end_record() {
        let client = "192.0.2.10:40000".parse().unwrap();
        let tunnel = || {
            AuditEvent::connect_tunnel(Action::Allowed, client, "example.com", 443)
                .with_request_id("r1")
                .with_rule("web", "ab")
        };
        let mut opening = tunnel();
        opening.event.code = RecordKind::TunnelOpen;
        let mut s = Summary::default();
        s.add(&record(opening.clone()));
        assert_eq!(s.records, 0);
        assert_eq!(
            s.open_tunnels.get("r1").map(String::as_str),
            Some("192.0.2.10 -> example.com:443")
        );
        assert!(s.render(10).contains("no end record"));
        // Its squid line is written at its end only.
        assert_eq!(squid_line(&record(opening)), None);
        s.add(&record(tunnel().with_bytes(
            10,
            20,
            std::time::Duration::from_secs(1),
        )));
        assert!(s.open_tunnels.is_empty());
        assert_eq!((s.records, s.allowed), (1, 1));
        assert_eq!(s.rule_hits.get("web"), Some(&(1, 0)));
        assert!(!s.render(10).contains("no end record"));
    }

    #[test]
    fn domain_patterns() {
        let p = DomainPattern::parse("*.Example.com").unwrap();
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com."));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
        assert!(DomainPattern::parse("example.com")
            .unwrap()
            .matches("EXAMPLE.com"));
        assert!(DomainPattern::parse("*.*.com").is_err());
    }

    #[test]
    fn squid_lines_for_requests_and_tunnels() {
        let client = "192.0.2.10:40000".parse().unwrap();
        let r = record(
            AuditEvent::proxy_request(Action::Allowed, client, "GET", "http://example.com/a b")
                .with_destination("203.0.113.5:80".parse().unwrap())
                .with_status(200)
                .with_bytes(100, 1234, std::time::Duration::from_millis(42)),
        );
        assert_eq!(
            squid_line(&r).unwrap(),
            "1795604400.250     42 192.0.2.10 TCP_MISS/200 1234 GET http://example.com/a%20b - HIER_DIRECT/203.0.113.5 -"
        );
        let t = record(AuditEvent::connect_tunnel(
            Action::Denied,
            client,
            "evil.example",
            443,
        ));
        assert_eq!(
            squid_line(&t).unwrap(),
            "1795604400.250      0 192.0.2.10 TCP_DENIED/403 0 CONNECT evil.example:443 - HIER_NONE/- -"
        );
        assert_eq!(
            squid_line(&record(AuditEvent::lifecycle(Action::Start))),
            None
        );
        // A head cut by the header timeout got no answer at all: not a 403.
        let cut = record(
            AuditEvent::proxy_refusal(client)
                .with_request_id("r-1")
                .with_reason("request head not received within the header read timeout"),
        );
        assert_eq!(
            squid_line(&cut).unwrap(),
            "1795604400.250      0 192.0.2.10 NONE_NONE/000 0 - - - HIER_NONE/- -"
        );
    }

    #[test]
    fn table_rows_escape_control_characters() {
        let mut ev = AuditEvent::proxy_request(
            Action::Denied,
            "192.0.2.7:4000".parse().unwrap(),
            "CONNECT",
            "a.example:443",
        );
        ev = ev.with_reason(
            "server name \"x\\n2026-12-03T23:59:59Z 999 allowed\u{1b}[2K\" does not match",
        );
        let row = table_row(&record(ev));
        assert!(!row.contains('\n') && !row.contains('\u{1b}'), "{row}");
        assert!(
            row.contains("x\\n2026") && row.contains("\\u{1b}[2K"),
            "{row}"
        );
        // Look-alike letters and a bidirectional override show as escapes.
        let spoof = AuditEvent::proxy_request(
            Action::Denied,
            "192.0.2.7:4000".parse().unwrap(),
            "GET",
            "http://a.example/",
        )
        .with_reason("Host header \"ex\u{430}mple.com\u{202e}moc\" does not match");
        let row = table_row(&record(spoof));
        assert!(row.is_ascii(), "{row}");
        assert!(row.contains("ex\\u{430}mple.com\\u{202e}moc"), "{row}");
    }

    #[test]
    fn table_rows_show_the_status_the_client_got() {
        let client = "192.0.2.10:40000".parse().unwrap();
        let failed = record(
            AuditEvent::connect_tunnel(Action::Allowed, client, "example.com", 443)
                .with_rule("web", "ab")
                .with_status(502),
        );
        let row = table_row(&failed);
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cols[..7],
            [
                "2026-11-25T11:00:00.250000Z",
                "3",
                "allowed",
                "502",
                "connect_tunnel",
                "192.0.2.10:40000",
                "example.com:443"
            ],
            "{row}"
        );
        let heads: Vec<&str> = TABLE_HEADER.split_whitespace().collect();
        assert_eq!(heads[3], "STATUS");
        assert_eq!(heads.len(), 9);
        let lifecycle = table_row(&record(AuditEvent::lifecycle(Action::Start)));
        assert_eq!(
            lifecycle.split_whitespace().nth(3),
            Some("-"),
            "{lifecycle}"
        );
        // Columns line up with the header.
        assert_eq!(row.find("502"), TABLE_HEADER.find("STATUS"));
    }

    #[test]
    fn filters_combine() {
        let client = "10.0.1.7:5555".parse().unwrap();
        let r = record(
            AuditEvent::connect_tunnel(Action::Denied, client, "x.example.com", 443)
                .with_rule("no-x", "ab"),
        );
        let mut f = Filter {
            action: Some(Action::Denied),
            source: Some("10.0.1.0/24".parse().unwrap()),
            domain: Some(DomainPattern::parse("*.example.com").unwrap()),
            rule: Some("no-x".into()),
            ..Filter::default()
        };
        assert!(f.matches(&r));
        f.source = Some("10.0.2.0/24".parse().unwrap());
        assert!(!f.matches(&r));
        f.source = None;
        f.since = Timestamp::parse("2026-11-25T11:00:01Z");
        assert!(!f.matches(&r));
    }
}
