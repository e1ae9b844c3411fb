//! The audit record schema: JSON lines whose field names follow the Elastic
//! Common Schema where ECS has a field, plus `seq`, `boot_id`, `prev_hash`
//! and a `palisade.*` object for what ECS has no name for (checkpoints,
//! gaps, rotation). Producers fill an [`AuditEvent`]; the writer wraps it into
//! an [`AuditRecord`] by prefixing the four chain fields.

use super::community_id::community_id_v1;
use super::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// One line of the trail as read back: the chain header and the event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    #[serde(rename = "@timestamp")]
    pub timestamp: Timestamp,
    /// Position within this boot, from 0 (the `start` record).
    pub seq: u64,
    /// Random id of the writer process that wrote the record.
    pub boot_id: String,
    /// Lowercase hex SHA-256 of the previous line's exact bytes (without
    /// its newline); 64 zeros for the first record of a trail.
    pub prev_hash: String,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// What happened, as a producer describes it. Optional parts are left out
/// of the JSON when empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    pub event: EventFields,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<UrlFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub palisade: Option<PalisadeFields>,
}

/// Which kind of record this is (`event.code`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// One plain-HTTP request through the proxy.
    ProxyRequest,
    /// One CONNECT tunnel, written when it ends (or is refused), with what
    /// it carried.
    ConnectTunnel,
    /// A CONNECT tunnel that passed its checks and starts relaying,
    /// written then, so that a tunnel is in the trail while it is open (and
    /// if the proxy dies before it ends). Its `connect_tunnel` record, with
    /// the same `http.request.id`, follows at its end.
    TunnelOpen,
    /// A plain-HTTP response still streaming [`RESPONSE_OPEN_AFTER`] after
    /// its request came, written then, so that a long download is in the
    /// trail while it streams (and if the proxy dies before it ends). Its
    /// `proxy_request` record, with the same `http.request.id`, follows at
    /// its end.
    ResponseOpen,
    FlowStart,
    FlowEnd,
    /// Packets dropped by the filter, summarised per flow key and interval.
    DropSummary,
    /// The trail's own life: start, stop, policy, rotation, gaps, checkpoints.
    #[default]
    Lifecycle,
}

impl RecordKind {
    /// The name the record carries in `event.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::ProxyRequest => "proxy_request",
            RecordKind::ConnectTunnel => "connect_tunnel",
            RecordKind::TunnelOpen => "tunnel_open",
            RecordKind::ResponseOpen => "response_open",
            RecordKind::FlowStart => "flow_start",
            RecordKind::FlowEnd => "flow_end",
            RecordKind::DropSummary => "drop_summary",
            RecordKind::Lifecycle => "lifecycle",
        }
    }
}

/// How long a plain-HTTP response may stream before its request gets a
/// `response_open` record ahead of its `proxy_request` one.
pub const RESPONSE_OPEN_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// `event.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Allowed,
    Denied,
    #[default]
    Start,
    Stop,
    PolicyLoaded,
    ReloadFailed,
    Rotation,
    Gap,
    Checkpoint,
    /// The writer could not write; from here on `on_log_failure` applies.
    LogFailed,
    /// Writing works again.
    LogRecovered,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allowed => "allowed",
            Action::Denied => "denied",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::PolicyLoaded => "policy-loaded",
            Action::ReloadFailed => "reload-failed",
            Action::Rotation => "rotation",
            Action::Gap => "gap",
            Action::Checkpoint => "checkpoint",
            Action::LogFailed => "log-failed",
            Action::LogRecovered => "log-recovered",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// The ECS `event.*` object.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EventFields {
    /// `palisade.proxy`, `palisade.filter` or `palisade.audit`.
    pub dataset: Cow<'static, str>,
    /// The record kind.
    pub code: RecordKind,
    pub action: Action,
    /// Most reasons are fixed text, held without a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Cow<'static, str>>,
    /// Nanoseconds, as ECS defines `event.duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    /// When the flow, tunnel or interval began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Timestamp>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// SHA-256 of the policy in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ruleset: Option<String>,
}

/// ECS `source.*` / `destination.*`. `bytes` and `packets` count what this
/// endpoint sent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iana_number: Option<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_id: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HttpRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HttpResponse>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpRequest {
    /// Empty (and left out) for a request refused before its head was read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The proxy's id for the request, also shown to the client in a
    /// refusal (ECS `http.request.id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpResponse {
    pub status_code: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UrlFields {
    pub full: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TlsFields {
    pub client: TlsClient,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TlsClient {
    pub server_name: String,
}

/// What ECS has no field for. Each part appears only on the records it
/// belongs to.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PalisadeFields {
    /// `start`: the palisade version that wrote this boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `start` and the log-failure records: `fail-closed` or `fail-open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_log_failure: Option<String>,
    /// `start`: how the previous boot's part of the trail ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_boot: Option<PreviousBoot>,
    /// `rotation` (first record of a file) and rotation checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileLink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<Gap>,
    /// `log-failed`: the error the writer saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `drop_summary`: the filter port the packets arrived on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PreviousBoot {
    pub boot_id: String,
    pub last_seq: u64,
    /// True when the previous boot ended with its `stop` checkpoint.
    pub clean: bool,
    /// Bytes after the last complete line of the previous file (a write cut
    /// short by a crash). They stay in that file; this says where and what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torn_tail: Option<TornTail>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TornTail {
    pub file: String,
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileLink {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// `interval`, `rotation` or `stop`.
    pub reason: String,
    /// First 16 hex digits of SHA-256 of the verifying key.
    pub key_id: String,
    /// Ed25519 over [`checkpoint_message`] of this line, hex.
    pub signature: String,
    /// Writer counters since this boot began.
    pub stats: super::writer::AuditStats,
}

/// Records that could not be written while the log was failing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Gap {
    /// Records accepted from producers that never reached the disk.
    pub lost_records: u64,
    /// Admissions refused because the log was failing (fail-closed).
    pub refused_admissions: u64,
    pub from: Timestamp,
    pub to: Timestamp,
}

/// The bytes a checkpoint signs: the SHA-256 of its own line as written,
/// with the signature's value left empty ([`unsigned_checkpoint_line`]).
/// The line holds the chain head it follows (`prev_hash`), so one
/// signature covers every earlier line, and everything else the line
/// holds: its reason (a `stop` seals the trail), the next file it names,
/// the writer's counters, and any field added to it. No byte of a
/// checkpoint line can change without the key, the last line of a sealed
/// trail (which no later line hashes) included.
pub fn checkpoint_message(unsigned_line_hash: &str) -> Vec<u8> {
    format!("palisade-audit-checkpoint-v3\n{unsigned_line_hash}\n").into_bytes()
}

/// Where a checkpoint's signature value goes in its line: right after this.
const SIGNATURE_KEY: &[u8] = b"\"signature\":\"";

/// The offset of the signature's value in a checkpoint line, if the field
/// appears exactly once (anything else was not written by palisade).
fn signature_value_at(line: &[u8]) -> Option<usize> {
    let mut found = line
        .windows(SIGNATURE_KEY.len())
        .enumerate()
        .filter(|(_, w)| *w == SIGNATURE_KEY)
        .map(|(i, _)| i + SIGNATURE_KEY.len());
    let at = found.next()?;
    found.next().is_none().then_some(at)
}

/// A checkpoint line as it was signed: `line` with the value of its
/// signature field (`signature_hex`) removed. `None` unless that field
/// appears exactly once with exactly that value (anything else was not
/// written by palisade, and fails verification).
pub fn unsigned_checkpoint_line(line: &[u8], signature_hex: &str) -> Option<Vec<u8>> {
    let at = signature_value_at(line)?;
    let rest = line[at..].strip_prefix(signature_hex.as_bytes())?;
    if rest.first() != Some(&b'"') {
        return None;
    }
    let mut out = Vec::with_capacity(line.len() - signature_hex.len());
    out.extend_from_slice(&line[..at]);
    out.extend_from_slice(rest);
    Some(out)
}

/// Where the signature goes in a checkpoint line written with an empty
/// one: the offset to insert it at.
pub fn signature_slot(line: &[u8]) -> Option<usize> {
    signature_value_at(line).filter(|&at| line.get(at) == Some(&b'"'))
}

/// A flow as the filter sees it; the audit module keeps its own copy so it
/// depends on no other part of the project.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    /// IP protocol number.
    pub proto: u8,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

fn transport_name(proto: u8) -> Cow<'static, str> {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        n => n.to_string().into(),
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl AuditEvent {
    fn new(dataset: &'static str, code: RecordKind, action: Action) -> AuditEvent {
        AuditEvent {
            event: EventFields {
                dataset: Cow::Borrowed(dataset),
                code,
                action,
                ..EventFields::default()
            },
            ..AuditEvent::default()
        }
    }

    /// An empty lifecycle event (the writer's own records, and policy ones).
    pub fn lifecycle(action: Action) -> AuditEvent {
        AuditEvent::new("palisade.audit", RecordKind::Lifecycle, action)
    }

    /// A new policy is in force.
    pub fn policy_loaded(policy_sha256: &str, source: &str) -> AuditEvent {
        let mut e = AuditEvent::lifecycle(Action::PolicyLoaded);
        e.event.reason = Some(format!("loaded {source}").into());
        e.rule = Some(RuleFields {
            ruleset: Some(policy_sha256.to_string()),
            ..RuleFields::default()
        });
        e
    }

    /// A reload was refused; `in_force_sha256` is the policy that stays.
    pub fn reload_failed(error: &str, in_force_sha256: Option<&str>) -> AuditEvent {
        let mut e = AuditEvent::lifecycle(Action::ReloadFailed);
        e.event.reason = Some(error.to_string().into());
        e.rule = in_force_sha256.map(|s| RuleFields {
            ruleset: Some(s.to_string()),
            ..RuleFields::default()
        });
        e
    }

    /// One plain-HTTP request: `url` is the absolute-form target.
    pub fn proxy_request(
        action: Action,
        client: SocketAddr,
        method: impl Into<String>,
        url: impl Into<String>,
    ) -> AuditEvent {
        let mut e = AuditEvent::new("palisade.proxy", RecordKind::ProxyRequest, action);
        e.source = Some(Endpoint {
            ip: Some(client.ip()),
            port: Some(client.port()),
            ..Endpoint::default()
        });
        e.http = Some(HttpFields {
            request: Some(HttpRequest {
                method: method.into(),
                id: None,
            }),
            response: None,
        });
        e.url = Some(UrlFields { full: url.into() });
        e.network = Some(NetworkFields {
            transport: Some("tcp".into()),
            iana_number: Some("6".into()),
            community_id: None,
        });
        e
    }

    /// A request refused before it could be read (a head too large,
    /// malformed, or not finished in time): the client, and no method or
    /// URL, since there was none to record.
    pub fn proxy_refusal(client: SocketAddr) -> AuditEvent {
        let mut e = AuditEvent::new("palisade.proxy", RecordKind::ProxyRequest, Action::Denied);
        e.source = Some(Endpoint {
            ip: Some(client.ip()),
            port: Some(client.port()),
            ..Endpoint::default()
        });
        e.network = Some(NetworkFields {
            transport: Some("tcp".into()),
            iana_number: Some("6".into()),
            community_id: None,
        });
        e
    }

    /// One CONNECT tunnel, at its end (or at its refusal).
    pub fn connect_tunnel(action: Action, client: SocketAddr, host: &str, port: u16) -> AuditEvent {
        let mut e = AuditEvent::new("palisade.proxy", RecordKind::ConnectTunnel, action);
        e.source = Some(Endpoint {
            ip: Some(client.ip()),
            port: Some(client.port()),
            ..Endpoint::default()
        });
        e.destination = Some(Endpoint {
            domain: Some(host.to_string()),
            port: Some(port),
            ..Endpoint::default()
        });
        e.http = Some(HttpFields {
            request: Some(HttpRequest {
                method: "CONNECT".into(),
                id: None,
            }),
            response: None,
        });
        e.network = Some(NetworkFields {
            transport: Some("tcp".into()),
            iana_number: Some("6".into()),
            community_id: None,
        });
        e
    }

    fn flow(code: RecordKind, action: Action, flow: &FlowTuple) -> AuditEvent {
        let mut e = AuditEvent::new("palisade.filter", code, action);
        e.source = Some(Endpoint {
            ip: Some(flow.src_ip),
            port: Some(flow.src_port),
            ..Endpoint::default()
        });
        e.destination = Some(Endpoint {
            ip: Some(flow.dst_ip),
            port: Some(flow.dst_port),
            ..Endpoint::default()
        });
        e.network = Some(NetworkFields {
            transport: Some(transport_name(flow.proto)),
            iana_number: Some(flow.proto.to_string().into()),
            community_id: community_id_v1(
                0,
                flow.src_ip,
                flow.dst_ip,
                flow.proto,
                flow.src_port,
                flow.dst_port,
            ),
        });
        e
    }

    pub fn flow_start(action: Action, flow: &FlowTuple) -> AuditEvent {
        AuditEvent::flow(RecordKind::FlowStart, action, flow)
    }

    /// The end of a tracked flow: what each side sent, and for how long.
    pub fn flow_end(
        flow: &FlowTuple,
        sent: Traffic,
        received: Traffic,
        duration: Duration,
    ) -> AuditEvent {
        let mut e = AuditEvent::flow(RecordKind::FlowEnd, Action::Allowed, flow);
        e.set_traffic(sent, received);
        e.event.duration = Some(duration_ns(duration));
        e
    }

    /// `packets` dropped for this flow key between `first` and `last`.
    pub fn drop_summary(
        flow: &FlowTuple,
        packets: u64,
        bytes: u64,
        first: Timestamp,
        last: Timestamp,
    ) -> AuditEvent {
        let mut e = AuditEvent::flow(RecordKind::DropSummary, Action::Denied, flow);
        if let Some(s) = e.source.as_mut() {
            s.packets = Some(packets);
            s.bytes = Some(bytes);
        }
        e.event.start = Some(first);
        e.event.end = Some(last);
        e
    }

    /// `drop_summary`: the filter port the packets arrived on.
    pub fn with_ingress(mut self, port: &str) -> AuditEvent {
        self.palisade
            .get_or_insert_with(PalisadeFields::default)
            .ingress = Some(port.to_string());
        self
    }

    /// The deciding rule and the policy it came from.
    pub fn with_rule(mut self, name: impl Into<String>, policy_sha256: &str) -> AuditEvent {
        let rule = self.rule.get_or_insert_with(RuleFields::default);
        rule.name = Some(name.into());
        rule.ruleset = Some(policy_sha256.to_string());
        self
    }

    /// A flow or tunnel this event's rule admitted, cut by a new policy
    /// (`why`): recorded `denied` under the rule and policy that denied it
    /// (`rule` none when no rule did), with the admitting rule and the
    /// first 16 hex digits of its ruleset in the reason.
    pub fn cut(mut self, why: &str, rule: Option<&str>, policy_sha256: &str) -> AuditEvent {
        let admitted = self.rule.take().unwrap_or_default();
        let ruleset = admitted.ruleset.unwrap_or_default();
        self.event.reason = Some(
            format!(
                "cut: {why}; admitted by rule {} of ruleset {}",
                admitted.name.as_deref().unwrap_or("-"),
                &ruleset[..ruleset.len().min(16)]
            )
            .into(),
        );
        self.event.action = Action::Denied;
        self.rule = Some(RuleFields {
            name: rule.map(str::to_string),
            ruleset: Some(policy_sha256.to_string()),
            ..RuleFields::default()
        });
        self
    }

    /// The proxy's request id (`http.request.id`).
    pub fn with_request_id(mut self, id: impl Into<String>) -> AuditEvent {
        self.http
            .get_or_insert_with(HttpFields::default)
            .request
            .get_or_insert_with(HttpRequest::default)
            .id = Some(id.into());
        self
    }

    pub fn with_reason(mut self, reason: impl Into<Cow<'static, str>>) -> AuditEvent {
        self.event.reason = Some(reason.into());
        self
    }

    /// The address the proxy dialled (or refused to dial).
    pub fn with_destination(mut self, addr: SocketAddr) -> AuditEvent {
        let d = self.destination.get_or_insert_with(Endpoint::default);
        d.ip = Some(addr.ip());
        d.port = Some(addr.port());
        if let (Some(src), Some(net)) = (self.source.as_ref(), self.network.as_mut()) {
            if let (Some(sip), Some(sport)) = (src.ip, src.port) {
                net.community_id = community_id_v1(0, sip, addr.ip(), 6, sport, addr.port());
            }
        }
        self
    }

    pub fn with_domain(mut self, domain: impl Into<String>) -> AuditEvent {
        self.destination
            .get_or_insert_with(Endpoint::default)
            .domain = Some(domain.into());
        self
    }

    pub fn with_status(mut self, status: u16) -> AuditEvent {
        self.http.get_or_insert_with(HttpFields::default).response = Some(HttpResponse {
            status_code: status,
        });
        self
    }

    pub fn with_server_name(mut self, sni: &str) -> AuditEvent {
        self.tls = Some(TlsFields {
            client: TlsClient {
                server_name: sni.to_string(),
            },
        });
        self
    }

    /// Bytes the client sent (`source.bytes`) and received
    /// (`destination.bytes`), and how long the exchange took.
    pub fn with_bytes(
        mut self,
        from_client: u64,
        to_client: u64,
        duration: Duration,
    ) -> AuditEvent {
        self.source.get_or_insert_with(Endpoint::default).bytes = Some(from_client);
        self.destination.get_or_insert_with(Endpoint::default).bytes = Some(to_client);
        self.event.duration = Some(duration_ns(duration));
        self
    }

    pub fn with_start(mut self, start: Timestamp) -> AuditEvent {
        self.event.start = Some(start);
        self
    }

    pub fn with_end(mut self, end: Timestamp) -> AuditEvent {
        self.event.end = Some(end);
        self
    }

    /// The port the request was for (`destination.port`).
    pub fn with_destination_port(mut self, port: u16) -> AuditEvent {
        self.destination.get_or_insert_with(Endpoint::default).port = Some(port);
        self
    }

    fn set_traffic(&mut self, sent: Traffic, received: Traffic) {
        let s = self.source.get_or_insert_with(Endpoint::default);
        s.bytes = Some(sent.bytes);
        s.packets = Some(sent.packets);
        let d = self.destination.get_or_insert_with(Endpoint::default);
        d.bytes = Some(received.bytes);
        d.packets = Some(received.packets);
    }

    /// The domain an auditor would name this destination by: the requested
    /// host, else the TLS server name, else the URL's host.
    pub fn destination_name(&self) -> Option<String> {
        if let Some(d) = self.destination.as_ref().and_then(|d| d.domain.clone()) {
            return Some(d);
        }
        if let Some(t) = &self.tls {
            return Some(t.client.server_name.clone());
        }
        self.url
            .as_ref()
            .and_then(|u| url_host(&u.full))
            .map(str::to_string)
    }
}

/// Packets and bytes one side of a flow sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// The host of an absolute URL (`http://host:port/path` -> `host`).
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(stripped) = host_port.strip_prefix('[') {
        stripped.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_request_serialises_to_ecs_names() {
        let e = AuditEvent::proxy_request(
            Action::Denied,
            "192.0.2.10:40000".parse().unwrap(),
            "GET",
            "http://example.com/x",
        )
        .with_rule("deny-all", "ab12")
        .with_reason("no rule allows example.com")
        .with_status(403);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"]["action"], "denied");
        assert_eq!(v["event"]["code"], "proxy_request");
        assert_eq!(v["rule"]["name"], "deny-all");
        assert_eq!(v["rule"]["ruleset"], "ab12");
        assert_eq!(v["source"]["ip"], "192.0.2.10");
        assert_eq!(v["http"]["request"]["method"], "GET");
        assert_eq!(v["http"]["response"]["status_code"], 403);
        assert_eq!(v["url"]["full"], "http://example.com/x");
        assert!(v.get("tls").is_none(), "empty parts are left out");
        assert_eq!(e.destination_name().as_deref(), Some("example.com"));
    }

    #[test]
    fn flow_records_carry_community_id() {
        let f = FlowTuple {
            proto: 6,
            src_ip: "1.2.3.4".parse().unwrap(),
            src_port: 1122,
            dst_ip: "5.6.7.8".parse().unwrap(),
            dst_port: 3344,
        };
        let e = AuditEvent::flow_start(Action::Allowed, &f);
        let net = e.network.unwrap();
        assert_eq!(net.transport.as_deref(), Some("tcp"));
        assert_eq!(
            net.community_id.as_deref(),
            Some("1:wCb3OG7yAFWelaUydu0D+125CLM=")
        );
    }

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("http://u:p@example.com:8080/a?b"),
            Some("example.com")
        );
        assert_eq!(url_host("http://[2001:db8::1]:80/"), Some("2001:db8::1"));
        assert_eq!(url_host("example.org"), Some("example.org"));
        assert_eq!(url_host("http:///x"), None);
    }
}
