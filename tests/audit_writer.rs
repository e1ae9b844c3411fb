//! The writer as the proxy and the filter use it: async and blocking
//! producers on one log, periodic checkpoints and rotation by age, and a
//! restart that continues the same chain.

mod common;
use common::*;
use palisade::audit::{Action, AuditConfig, AuditEvent, AuditLog, FlowTuple, Traffic};
use std::time::Duration;

fn config(dir: &std::path::Path, keys: &Keys) -> AuditConfig {
    AuditConfig {
        dir: dir.to_path_buf(),
        signing_key: Some(keys.signing.clone()),
        ..AuditConfig::default()
    }
}

#[test]
fn async_and_thread_producers_share_one_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let log = AuditLog::open(&config(&dir, &keys)).unwrap();

    // The filter: a plain thread that blocks on its ticket.
    let filter_log = log.clone();
    let filter = std::thread::spawn(move || {
        let flow = FlowTuple {
            proto: 6,
            src_ip: "198.51.100.7".parse().unwrap(),
            src_port: 50000,
            dst_ip: "203.0.113.9".parse().unwrap(),
            dst_port: 443,
        };
        filter_log.admit().unwrap();
        let start = AuditEvent::flow_start(Action::Allowed, &flow).with_rule("vnet-https", "ab");
        filter_log.submit(&start).unwrap().wait().unwrap();
        let sent = Traffic {
            packets: 10,
            bytes: 1200,
        };
        let received = Traffic {
            packets: 12,
            bytes: 9000,
        };
        let end = AuditEvent::flow_end(&flow, sent, received, Duration::from_millis(1500));
        filter_log.submit(&end).unwrap().wait().unwrap().seq
    });

    // The proxy: tokio tasks awaiting durability.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let seqs = rt.block_on(async {
        let mut seqs = Vec::new();
        for i in 0..20u16 {
            let ev = AuditEvent::connect_tunnel(
                Action::Denied,
                "192.0.2.10:40000".parse().unwrap(),
                "blocked.example.com",
                443,
            )
            .with_rule("deny-default", "ab")
            .with_reason(format!("no rule allows blocked.example.com ({i})"));
            let ticket = log.submit_async(&ev).await.unwrap();
            seqs.push(ticket.durable().await.unwrap().seq);
        }
        seqs
    });
    filter.join().unwrap();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let stats = log.stats();
    assert_eq!(stats.lost_records, 0);
    rt.block_on(log.clone().close_async()).unwrap();
    assert!(
        log.submit(&AuditEvent::lifecycle(Action::Stop)).is_err(),
        "closed for every handle"
    );

    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
    let o = run(&[
        "audit",
        "query",
        dir.to_str().unwrap(),
        "--action",
        "denied",
        "--domain",
        "*.example.com",
        "--format",
        "table",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        21,
        "{}",
        text(&o)
    );
    // By destination address: the filter flow's two records, which have
    // no name to match with --domain.
    let o = run(&[
        "audit",
        "query",
        dir.to_str().unwrap(),
        "--destination",
        "203.0.113.0/28",
    ]);
    let found = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(found.lines().count(), 2, "{}", text(&o));
    assert!(
        found.contains("\"code\":\"flow_start\"") && found.contains("\"code\":\"flow_end\""),
        "{found}"
    );
    let o = run(&[
        "audit",
        "query",
        dir.to_str().unwrap(),
        "--destination",
        "203.0.113.16/28",
    ]);
    assert_eq!(o.stdout.len(), 0, "{}", text(&o));
    let o = run(&[
        "audit",
        "query",
        dir.to_str().unwrap(),
        "--destination",
        "203.0.113.999",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("--destination \"203.0.113.999\": not an address or CIDR range"),
        "{}",
        text(&o)
    );
    let o = run(&["audit", "summary", dir.to_str().unwrap()]);
    let summary = text(&o);
    assert!(summary.contains("20  blocked.example.com"), "{summary}");
    assert!(summary.contains("deny-default"), "{summary}");
    assert!(summary.contains("10200  203.0.113.9"), "{summary}");
    let o = run(&[
        "audit",
        "export",
        "--format",
        "squid",
        dir.to_str().unwrap(),
    ]);
    let squid = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(squid.lines().count(), 20);
    assert!(
        squid
            .lines()
            .all(|l| l.contains(" TCP_DENIED/403 0 CONNECT blocked.example.com:443 ")),
        "{squid}"
    );
    assert_eq!(o.status.code(), Some(0));
    // A damaged line: the readers go on, name it, and exit 1 so that a
    // script knows their output left something out.
    let first = dir.join("audit-00000001.jsonl");
    let mut lines = read_lines(&first);
    lines[1] = "{not json".into();
    write_lines(&first, &lines);
    for args in [
        vec![
            "audit",
            "query",
            dir.to_str().unwrap(),
            "--action",
            "denied",
        ],
        vec!["audit", "summary", dir.to_str().unwrap()],
        vec![
            "audit",
            "export",
            "--format",
            "squid",
            dir.to_str().unwrap(),
        ],
    ] {
        let o = run(&args);
        let said = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {said}");
        assert!(
            said.contains("audit-00000001.jsonl:2: skipped")
                && said.contains("1 line(s) of the trail could not be read"),
            "{args:?}: {said}"
        );
    }
}

#[test]
fn one_writer_per_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let first = AuditLog::open(&config(&dir, &keys)).unwrap();
    let second = AuditLog::open(&config(&dir, &keys));
    assert!(
        matches!(second, Err(palisade::audit::AuditError::Locked { .. })),
        "a second writer must be refused"
    );
    first.close().unwrap();
    AuditLog::open(&config(&dir, &keys))
        .unwrap()
        .close()
        .unwrap();
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
}

#[test]
fn checkpoints_and_rotation_by_age_and_restart_continue_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let mut cfg = config(&dir, &keys);
    cfg.checkpoint_interval = Duration::from_secs(1);
    cfg.rotate_age = Some(Duration::from_secs(1));
    for boot in 0..2 {
        let log = AuditLog::open(&cfg).unwrap();
        log.submit(&AuditEvent::policy_loaded("ab", "/etc/palisade/policy"))
            .unwrap()
            .wait()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1300));
        log.submit(&AuditEvent::reload_failed(
            "policy.policy:3:7: unknown zone",
            Some("ab"),
        ))
        .unwrap()
        .wait()
        .unwrap();
        log.close().unwrap();
        let (code, report) = verify(&dir, &keys);
        assert_eq!(code, 0, "boot {boot}: {report}");
    }
    let q = |action: &str| {
        let o = run(&["audit", "query", dir.to_str().unwrap(), "--action", action]);
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    assert!(
        q("checkpoint") >= 4,
        "interval, rotation and stop checkpoints"
    );
    assert!(q("rotation") >= 2, "rotated by age in each boot");
    assert_eq!(q("start"), 2);
    assert_eq!(q("policy-loaded"), 2);
    assert_eq!(q("reload-failed"), 2);
}

#[test]
fn a_full_queue_is_counted_and_written_down() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let mut cfg = config(&dir, &keys);
    cfg.queue_capacity = 1;
    cfg.on_log_failure = palisade::audit::OnLogFailure::FailOpen;
    let log = AuditLog::open(&cfg).unwrap();
    let mut tickets = Vec::new();
    let mut rejected = 0u64;
    for i in 0..200_000u32 {
        let ev = AuditEvent::lifecycle(Action::PolicyLoaded).with_reason(i.to_string());
        match log.try_submit(&ev) {
            Ok(t) => tickets.push(t),
            Err(e) => {
                assert!(!e.refuses_flow(), "fail-open never refuses");
                rejected += 1;
                if rejected >= 10 {
                    break;
                }
            }
        }
    }
    assert!(rejected >= 10, "a one-slot queue never filled");
    for t in tickets {
        t.wait().unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.queue_full_rejections, rejected);
    assert_eq!(stats.lost_records, rejected);
    log.close().unwrap();
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
    let o = run(&["audit", "query", dir.to_str().unwrap(), "--action", "gap"]);
    let lost: u64 = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["palisade"]["gap"]["lost_records"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(
        lost, rejected,
        "every rejected record is accounted for in a gap record"
    );
}

/// Records queued without a ticket (what the proxy and the filter do for
/// the records they do not wait for) are written, chained and verified like
/// any other: none is missing, none is out of order.
#[test]
fn records_queued_without_a_ticket_are_all_written() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let log = AuditLog::open(&config(&dir, &keys)).unwrap();
    let n = 5_000u32;
    let mut sent = 0u32;
    for i in 0..n {
        let ev = AuditEvent::lifecycle(Action::PolicyLoaded).with_reason(format!("untracked {i}"));
        // The queue holds thousands; a full one is retried, bounded.
        for _ in 0..1_000 {
            if log.try_record(&ev).is_ok() {
                sent += 1;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    assert_eq!(sent, n);
    log.close().unwrap();
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
    let written = records(&dir);
    let reasons: Vec<&str> = written
        .iter()
        .map(|r| s(r, "/event/reason"))
        .filter(|r| r.starts_with("untracked "))
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("untracked {i}")).collect();
    assert_eq!(reasons, expected, "every record, in the order queued");
}

/// `audit verify` run while the writer rotates (a monitoring job on a
/// live appliance) never reports a file the writer just created as
/// missing: it reads the trail as far as it goes, open.
#[test]
fn verify_during_rotation_is_not_a_tamper_alarm() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let mut cfg = config(&dir, &keys);
    cfg.rotate_size = 4096;
    let log = AuditLog::open(&cfg).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            // A record a millisecond (a new file every few dozen), for at
            // most 10,000 records or until told to stop: a trail of a few
            // hundred files, so each verify stays short on a loaded machine.
            for i in 0..10_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let ev = AuditEvent::lifecycle(Action::PolicyLoaded).with_reason(i.to_string());
                let _ = log.submit(&ev).map(|t| t.wait());
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut alarms = Vec::new();
    for _ in 0..30 {
        let (code, report) = verify(&dir, &keys);
        if code == 1 || report.contains("missing file") {
            alarms.push(report);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    log.close().unwrap();
    assert!(alarms.is_empty(), "{}", alarms.join("\n---\n"));
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
}

/// `--until` with a date alone takes that whole day in; `keygen --out`
/// creates the folder it is given.
#[test]
fn query_until_a_date_includes_that_day_and_keygen_makes_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new/keys");
    let o = run(&["audit", "keygen", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("audit.key").exists() && out.join("audit.pub").exists());

    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    make_trail(&dir, &keys, 5);
    let all = records(&dir);
    let day = all[0]["@timestamp"].as_str().unwrap()[..10].to_string();
    let count = |until: &str| {
        let o = run(&["audit", "query", dir.to_str().unwrap(), "--until", until]);
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    assert_eq!(count(&day), all.len(), "the whole of {day}");
    assert_eq!(count(&format!("{day}T00:00:00Z")), 0, "a time is exact");
}

/// Old files may be archived off the appliance: `verify --from FILE`
/// checks the files kept, from the first of them on, and still finds any
/// change to them; without `--from` the archived files are missing.
#[test]
fn verify_from_the_first_file_kept_after_archiving() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let o = run(&[
        "audit",
        "stress",
        "--dir",
        dir.to_str().unwrap(),
        "--key",
        keys.signing.to_str().unwrap(),
        "--records",
        "2000",
        "--rotate-size",
        "64KiB",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let archive = tmp.path().join("archive");
    std::fs::create_dir(&archive).unwrap();
    for f in ["audit-00000001.jsonl", "audit-00000002.jsonl"] {
        std::fs::rename(dir.join(f), archive.join(f)).unwrap();
    }
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("missing file"), "{report}");
    let from = |name: &str| {
        let o = run(&[
            "audit",
            "verify",
            "--key",
            keys.verifying.to_str().unwrap(),
            "--from",
            name,
            dir.to_str().unwrap(),
        ]);
        (o.status.code().unwrap_or(-1), text(&o))
    };
    let (code, report) = from("audit-00000003.jsonl");
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("from audit-00000003.jsonl on (earlier files archived"),
        "{report}"
    );
    // A record taken out of a kept file is still found.
    let f = dir.join("audit-00000004.jsonl");
    let body = std::fs::read_to_string(&f).unwrap();
    let lines: Vec<&str> = body.lines().collect();
    let without: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    std::fs::write(&f, without).unwrap();
    let (code, report) = from("audit-00000003.jsonl");
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("deleted"), "{report}");
    let (code, report) = from("nonsense");
    assert_eq!(code, 2, "{report}");
    // Past the newest file: says which is the newest.
    let (code, report) = from("audit-00000099.jsonl");
    assert_eq!(code, 2, "{report}");
    assert!(
        report.contains("no audit files from audit-00000099.jsonl on: its newest is audit-000000"),
        "{report}"
    );
}

/// A trail folder removed while nothing is being written (an idle
/// appliance) is noticed at the stop at the latest: the stop record goes
/// into a new file whose first record names the lost one, the failure is
/// recorded, and verify reports the lost file rather than a trail that
/// begins again as if nothing came before.
#[test]
fn a_trail_deleted_while_idle_is_noticed_at_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let log = AuditLog::open(&config(&dir, &keys)).unwrap();
    let ev = AuditEvent::proxy_request(
        Action::Allowed,
        "192.0.2.10:40000".parse().unwrap(),
        "GET",
        "http://www.example.com/",
    );
    log.submit(&ev).unwrap().wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    log.close().expect("the stop is written in a new file");
    let records = records(&dir);
    let actions: Vec<&str> = records.iter().map(|r| s(r, "/event/action")).collect();
    assert_eq!(actions.first(), Some(&"rotation"), "{actions:?}");
    assert!(actions.contains(&"log-failed"), "{actions:?}");
    assert!(actions.contains(&"stop"), "{actions:?}");
    assert!(
        records[0].to_string().contains("audit-00000001.jsonl"),
        "{:#}",
        records[0]
    );
    let (code, report) = verify(&dir, &keys);
    assert_ne!(code, 0, "{report}");
    assert!(
        report.contains("audit-00000001.jsonl: missing file"),
        "{report}"
    );
}

/// An idle writer notices within seconds that its folder was removed, and
/// goes on in a new file at once (without waiting for a record or the
/// stop), so the operator hears of it while it can still be looked into.
#[test]
fn an_idle_writer_notices_its_deleted_folder_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let log = AuditLog::open(&config(&dir, &keys)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !file(&dir, 2).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted folder was not noticed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    log.close().unwrap();
    let actions: Vec<String> = records(&dir)
        .iter()
        .map(|r| s(r, "/event/action").to_string())
        .collect();
    // Nothing was lost: no gap record.
    assert_eq!(
        actions[..3],
        ["rotation", "log-failed", "log-recovered"],
        "{actions:?}"
    );
}
