//! The JSON body of a record, written by hand on the producer's thread.
//!
//! Every request through the proxy serialises one [`AuditEvent`] on the
//! thread that serves it. serde_json's derived serializer spends about
//! 450 ns on a typical 560-byte proxy record: a byte-at-a-time escape loop,
//! a copy call per key and per integer, and the serializer's per-field
//! state. This writer takes about 160 ns (`cargo bench --bench audit_writer
//! -- audit_body`), which under the keep-alive load is 3-4% of the proxy's
//! CPU per request.
//!
//! The bytes are the auditors' contract (the hash chain covers them), so
//! this writer must print exactly what `serde_json::to_vec` prints for the
//! same event: the same field order, the same omissions, the same escapes.
//! It holds to that by construction where it can:
//! - each struct is taken apart with an exhaustive pattern, so a new field
//!   does not compile until it is written here;
//! - a string with anything to escape, and the rare `palisade` object, are
//!   handed to serde_json itself;
//!
//! and `tests/audit_json.rs` compares the two on random events.

use super::record::{
    AuditEvent, Endpoint, EventFields, HttpFields, HttpRequest, HttpResponse, NetworkFields,
    RuleFields, TlsClient, TlsFields, UrlFields,
};
use super::time::Timestamp;
use std::io::Write as _;
use std::net::IpAddr;

/// Appends `event` as compact JSON, byte for byte what
/// `serde_json::to_writer` writes.
pub fn write_event(out: &mut Vec<u8>, event: &AuditEvent) {
    let AuditEvent {
        event,
        rule,
        source,
        destination,
        network,
        http,
        url,
        tls,
        palisade,
    } = event;
    out.extend_from_slice(b"{\"event\":");
    write_event_fields(out, event);
    if let Some(r) = rule {
        out.extend_from_slice(b",\"rule\":");
        write_rule(out, r);
    }
    if let Some(s) = source {
        out.extend_from_slice(b",\"source\":");
        write_endpoint(out, s);
    }
    if let Some(d) = destination {
        out.extend_from_slice(b",\"destination\":");
        write_endpoint(out, d);
    }
    if let Some(n) = network {
        out.extend_from_slice(b",\"network\":");
        write_network(out, n);
    }
    if let Some(h) = http {
        out.extend_from_slice(b",\"http\":");
        write_http(out, h);
    }
    if let Some(UrlFields { full }) = url {
        out.extend_from_slice(b",\"url\":{\"full\":");
        write_str(out, full);
        out.push(b'}');
    }
    if let Some(TlsFields {
        client: TlsClient { server_name },
    }) = tls
    {
        out.extend_from_slice(b",\"tls\":{\"client\":{\"server_name\":");
        write_str(out, server_name);
        out.extend_from_slice(b"}}");
    }
    if let Some(p) = palisade {
        // Lifecycle records only (start, checkpoints, gaps, rotation):
        // rare, nested and not worth a second writer.
        out.extend_from_slice(b",\"palisade\":");
        if serde_json::to_writer(&mut *out, p).is_err() {
            out.extend_from_slice(b"{}");
        }
    }
    out.push(b'}');
}

/// Writes the members of one object: the first without a comma.
struct Members<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Members<'a> {
    fn open(out: &'a mut Vec<u8>) -> Members<'a> {
        out.push(b'{');
        Members { out, first: true }
    }

    /// Writes `"name":` after a comma where one is due; `name` is a plain
    /// ASCII key. Inlined, so each key is a copy of known length.
    #[inline(always)]
    fn key(&mut self, name: &'static str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// A name palisade chose (`event.code`, `event.action`): nothing to
    /// escape.
    #[inline(always)]
    fn name(&mut self, key: &'static str, value: &'static str) {
        let out = self.key(key);
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    }

    #[inline(always)]
    fn str(&mut self, name: &'static str, value: &str) {
        write_str(self.key(name), value);
    }

    #[inline(always)]
    fn opt_str<S: std::ops::Deref<Target = str>>(&mut self, name: &'static str, value: &Option<S>) {
        if let Some(v) = value {
            self.str(name, v);
        }
    }

    #[inline(always)]
    fn opt_u64(&mut self, name: &'static str, value: Option<u64>) {
        if let Some(v) = value {
            write_u64(self.key(name), v);
        }
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

fn write_event_fields(out: &mut Vec<u8>, e: &EventFields) {
    let EventFields {
        dataset,
        code,
        action,
        reason,
        duration,
        start,
        end,
    } = e;
    let mut m = Members::open(out);
    m.str("dataset", dataset);
    m.name("code", code.as_str());
    m.name("action", action.as_str());
    m.opt_str("reason", reason);
    m.opt_u64("duration", *duration);
    if let Some(t) = start {
        write_timestamp(m.key("start"), *t);
    }
    if let Some(t) = end {
        write_timestamp(m.key("end"), *t);
    }
    m.close();
}

fn write_rule(out: &mut Vec<u8>, r: &RuleFields) {
    let RuleFields { id, name, ruleset } = r;
    let mut m = Members::open(out);
    m.opt_str("id", id);
    m.opt_str("name", name);
    m.opt_str("ruleset", ruleset);
    m.close();
}

fn write_endpoint(out: &mut Vec<u8>, e: &Endpoint) {
    let Endpoint {
        ip,
        port,
        domain,
        bytes,
        packets,
    } = e;
    let mut m = Members::open(out);
    if let Some(ip) = ip {
        write_ip(m.key("ip"), ip);
    }
    m.opt_u64("port", port.map(u64::from));
    m.opt_str("domain", domain);
    m.opt_u64("bytes", *bytes);
    m.opt_u64("packets", *packets);
    m.close();
}

fn write_network(out: &mut Vec<u8>, n: &NetworkFields) {
    let NetworkFields {
        transport,
        iana_number,
        community_id,
    } = n;
    let mut m = Members::open(out);
    m.opt_str("transport", transport);
    m.opt_str("iana_number", iana_number);
    m.opt_str("community_id", community_id);
    m.close();
}

fn write_http(out: &mut Vec<u8>, h: &HttpFields) {
    let HttpFields { request, response } = h;
    let mut m = Members::open(out);
    if let Some(HttpRequest { method, id }) = request {
        let mut r = Members::open(m.key("request"));
        if !method.is_empty() {
            r.str("method", method);
        }
        r.opt_str("id", id);
        r.close();
    }
    if let Some(HttpResponse { status_code }) = response {
        let mut r = Members::open(m.key("response"));
        write_u64(r.key("status_code"), u64::from(*status_code));
        r.close();
    }
    m.close();
}

/// A JSON string. Nearly every string the proxy records (rule names, URLs,
/// host names, ids) has nothing to escape and is copied whole; the rest go
/// through serde_json's own escaping.
fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        if serde_json::to_writer(&mut *out, s).is_err() {
            out.extend_from_slice(b"\"\"");
        }
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Whether JSON must escape any byte of `s`: a control character, a quote
/// or a backslash. Tested eight bytes at a time (the word tests of "Bit
/// Twiddling Hacks", each exact as to whether any byte qualifies), so a
/// typical 30-byte string costs four tests, not thirty branches.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    fn special(w: u64) -> bool {
        let below_space = w.wrapping_sub(ONES * 0x20) & !w;
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v;
        (below_space | zero_byte(quote) | zero_byte(backslash)) & HIGH != 0
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&s[at..at + 8]);
        u64::from_ne_bytes(bytes)
    };
    if s.len() < 8 {
        return s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
    }
    // Whole words, then the last eight bytes (overlapping the words
    // before them: only whether any byte qualifies matters).
    (0..s.len() / 8).any(|i| special(word(i * 8))) || special(word(s.len() - 8))
}

fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// An address as serde writes it for a human-readable format: its display
/// form, quoted (no address form has anything to escape).
fn write_ip(out: &mut Vec<u8>, ip: &IpAddr) {
    out.push(b'"');
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
    out.push(b'"');
}

/// A timestamp as its `Serialize` writes it: the RFC 3339 display form,
/// quoted.
fn write_timestamp(out: &mut Vec<u8>, t: Timestamp) {
    let _ = write!(out, "\"{t}\"");
}
