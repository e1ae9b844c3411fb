//! The hand-written record body against serde_json: on random events, with
//! every optional part present or absent and strings full of what JSON must
//! escape, `audit::json::write_event` prints exactly the bytes
//! `serde_json::to_vec` prints, and they read back as the same event.

use palisade::audit::json::write_event;
use palisade::audit::record::*;
use palisade::audit::time::Timestamp;
use proptest::prelude::*;
use std::net::IpAddr;

/// Strings as records carry them: mostly plain, sometimes with quotes,
/// backslashes, control characters, DEL, non-ASCII and astral characters.
fn text() -> impl Strategy<Value = String> {
    let tricky = prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => Just('"'),
        1 => Just('\\'),
        1 => Just('/'),
        1 => (0u8..0x20).prop_map(char::from),
        1 => Just('\u{7f}'),
        1 => Just('é'),
        1 => Just('\u{2028}'),
        1 => Just('\u{1F600}'),
        1 => any::<char>(),
    ];
    prop_oneof![
        "[a-zA-Z0-9:/._?=&-]{0,40}",
        proptest::collection::vec(tricky, 0..24).prop_map(|v| v.into_iter().collect()),
    ]
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text())
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        // Runs of zero groups, where the display form compresses.
        (any::<u16>(), 0usize..8).prop_map(|(g, at)| {
            let mut groups = [0u16; 8];
            groups[at] = g;
            IpAddr::from(groups)
        }),
        // IPv4-mapped and compatible forms.
        any::<[u8; 4]>().prop_map(|v4| IpAddr::from(std::net::Ipv4Addr::from(v4).to_ipv6_mapped())),
    ]
}

/// From year 1 to year 9999, either side of the epoch.
fn timestamp() -> impl Strategy<Value = Timestamp> {
    (-62_135_596_800_000_000i64..253_402_300_799_999_999).prop_map(Timestamp)
}

fn kind() -> impl Strategy<Value = RecordKind> {
    prop_oneof![
        Just(RecordKind::ProxyRequest),
        Just(RecordKind::ConnectTunnel),
        Just(RecordKind::TunnelOpen),
        Just(RecordKind::ResponseOpen),
        Just(RecordKind::FlowStart),
        Just(RecordKind::FlowEnd),
        Just(RecordKind::DropSummary),
        Just(RecordKind::Lifecycle),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        Just(Action::Allowed),
        Just(Action::Denied),
        Just(Action::Start),
        Just(Action::Stop),
        Just(Action::PolicyLoaded),
        Just(Action::ReloadFailed),
        Just(Action::Rotation),
        Just(Action::Gap),
        Just(Action::Checkpoint),
        Just(Action::LogFailed),
        Just(Action::LogRecovered),
    ]
}

fn event_fields() -> impl Strategy<Value = EventFields> {
    (
        text(),
        kind(),
        action(),
        opt_text(),
        proptest::option::of(any::<u64>()),
        proptest::option::of(timestamp()),
        proptest::option::of(timestamp()),
    )
        .prop_map(
            |(dataset, code, action, reason, duration, start, end)| EventFields {
                dataset: dataset.into(),
                code,
                action,
                reason: reason.map(Into::into),
                duration,
                start,
                end,
            },
        )
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        proptest::option::of(ip()),
        proptest::option::of(any::<u16>()),
        opt_text(),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(ip, port, domain, bytes, packets)| Endpoint {
            ip,
            port,
            domain,
            bytes,
            packets,
        })
}

fn http() -> impl Strategy<Value = HttpFields> {
    (
        proptest::option::of(
            (prop_oneof![Just(String::new()), text()], opt_text())
                .prop_map(|(method, id)| HttpRequest { method, id }),
        ),
        proptest::option::of(any::<u16>().prop_map(|status_code| HttpResponse { status_code })),
    )
        .prop_map(|(request, response)| HttpFields { request, response })
}

fn palisade_fields() -> impl Strategy<Value = PalisadeFields> {
    (
        opt_text(),
        opt_text(),
        opt_text(),
        opt_text(),
        proptest::option::of((any::<u64>(), any::<u64>(), timestamp(), timestamp())),
        proptest::option::of((opt_text(), opt_text())),
    )
        .prop_map(
            |(version, on_log_failure, error, ingress, gap, file)| PalisadeFields {
                version,
                on_log_failure,
                error,
                ingress,
                gap: gap.map(|(lost_records, refused_admissions, from, to)| Gap {
                    lost_records,
                    refused_admissions,
                    from,
                    to,
                }),
                file: file.map(|(previous, next)| FileLink { previous, next }),
                ..PalisadeFields::default()
            },
        )
}

fn audit_event() -> impl Strategy<Value = AuditEvent> {
    (
        event_fields(),
        proptest::option::of(
            (opt_text(), opt_text(), opt_text()).prop_map(|(id, name, ruleset)| RuleFields {
                id,
                name,
                ruleset,
            }),
        ),
        proptest::option::of(endpoint()),
        proptest::option::of(endpoint()),
        proptest::option::of((opt_text(), opt_text(), opt_text()).prop_map(
            |(transport, iana_number, community_id)| NetworkFields {
                transport: transport.map(Into::into),
                iana_number: iana_number.map(Into::into),
                community_id,
            },
        )),
        proptest::option::of(http()),
        proptest::option::of(text().prop_map(|full| UrlFields { full })),
        proptest::option::of(text().prop_map(|server_name| TlsFields {
            client: TlsClient { server_name },
        })),
        proptest::option::of(palisade_fields()),
    )
        .prop_map(
            |(event, rule, source, destination, network, http, url, tls, palisade)| AuditEvent {
                event,
                rule,
                source,
                destination,
                network,
                http,
                url,
                tls,
                palisade,
            },
        )
}

fn hand(e: &AuditEvent) -> Vec<u8> {
    let mut out = Vec::new();
    write_event(&mut out, e);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn hand_written_body_is_serdes_bytes(e in audit_event()) {
        let ours = hand(&e);
        let serde = serde_json::to_vec(&e).unwrap();
        prop_assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&serde)
        );
        prop_assert_eq!(&ours, &serde);
        let back: AuditEvent = serde_json::from_slice(&ours).unwrap();
        prop_assert_eq!(back, e);
    }
}

/// The records the proxy writes most, built as it builds them.
#[test]
fn proxy_records_match_serde() {
    let request = AuditEvent::proxy_request(
        Action::Allowed,
        "192.0.2.10:40000".parse().unwrap(),
        "GET",
        "http://www.example.com/path?q=\"1\"",
    )
    .with_destination("[2001:db8::5]:443".parse().unwrap())
    .with_domain("www.example.com")
    .with_rule("web-out", "3f1c")
    .with_reason("allowed by rule")
    .with_status(200);
    let mut checkpoint = AuditEvent::default();
    checkpoint.palisade = Some(PalisadeFields {
        checkpoint: Some(Checkpoint {
            reason: "interval".into(),
            key_id: "00ff".into(),
            signature: String::new(),
            stats: Default::default(),
        }),
        ..PalisadeFields::default()
    });
    for e in [request, checkpoint, AuditEvent::default()] {
        assert_eq!(
            String::from_utf8(hand(&e)).unwrap(),
            serde_json::to_string(&e).unwrap()
        );
    }
}

#[test]
fn every_kind_and_action_name_is_serdes() {
    let kinds = [
        RecordKind::ProxyRequest,
        RecordKind::ConnectTunnel,
        RecordKind::TunnelOpen,
        RecordKind::ResponseOpen,
        RecordKind::FlowStart,
        RecordKind::FlowEnd,
        RecordKind::DropSummary,
        RecordKind::Lifecycle,
    ];
    for k in kinds {
        assert_eq!(
            serde_json::to_value(k).unwrap(),
            serde_json::Value::from(k.as_str())
        );
    }
    let actions = [
        Action::Allowed,
        Action::Denied,
        Action::Start,
        Action::Stop,
        Action::PolicyLoaded,
        Action::ReloadFailed,
        Action::Rotation,
        Action::Gap,
        Action::Checkpoint,
        Action::LogFailed,
        Action::LogRecovered,
    ];
    for a in actions {
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::Value::from(a.as_str())
        );
    }
}
