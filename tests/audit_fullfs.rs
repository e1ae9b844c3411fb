//! A full filesystem under the trail: with fail-closed, new flows are
//! refused while records cannot be written and admitted again once space
//! returns; with fail-open they pass and the loss is counted. Either way
//! the trail records the failure, the gap and the recovery, and verifies
//! whole. Needs root (it mounts a small tmpfs); skipped otherwise.

mod common;
use common::*;
use palisade::audit::{Action, AuditConfig, AuditEvent, AuditLog, OnLogFailure};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A tmpfs mounted for one test, unmounted when dropped (also on panic).
struct Tmpfs {
    mount: PathBuf,
}

impl Tmpfs {
    fn new(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        Tmpfs {
            mount: at.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

/// Writes zeros to `path` until the filesystem refuses.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

fn event(i: u64) -> AuditEvent {
    AuditEvent::proxy_request(
        Action::Allowed,
        "192.0.2.10:40000".parse().unwrap(),
        "GET",
        format!("http://example.com/{i}"),
    )
}

fn scenario(mode: OnLogFailure) {
    if !is_root() {
        eprintln!("SKIPPED: the full-filesystem test mounts a tmpfs and needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let mnt = tmp.path().join("mnt");
    let _guard = Tmpfs::new(&mnt, "256k");
    let dir = mnt.join("trail");
    let config = AuditConfig {
        dir: dir.clone(),
        signing_key: Some(keys.signing.clone()),
        on_log_failure: mode,
        failure_retry: Duration::from_millis(50),
        ..AuditConfig::default()
    };
    let log = AuditLog::open(&config).unwrap();
    for i in 0..10 {
        log.submit(&event(i)).unwrap().wait().unwrap();
    }

    // Disk full: writes start failing.
    fill(&mnt.join("filler"));
    let mut failed = false;
    for i in 10..100_000 {
        match log.submit(&event(i)) {
            Ok(t) => {
                if t.wait().is_err() {
                    failed = true;
                    break;
                }
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "writes never failed on a full filesystem");
    assert!(log.is_failing());
    let mut refused_or_lost = 0;
    for i in 0..5 {
        let admitted = log.admit();
        let submitted = log.submit(&event(1000 + i));
        match mode {
            OnLogFailure::FailClosed => {
                let e =
                    admitted.expect_err("fail-closed must refuse new flows while the log fails");
                assert!(e.refuses_flow());
                assert!(submitted.as_ref().err().is_some_and(|e| e.refuses_flow()));
            }
            OnLogFailure::FailOpen => {
                admitted.expect("fail-open admits flows while the log fails");
                assert!(submitted.as_ref().err().is_some_and(|e| !e.refuses_flow()));
            }
        }
        refused_or_lost += 1;
    }

    // Space returns: the writer recovers by itself and admits again.
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.is_failing() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !log.is_failing(),
        "the writer did not recover after space was freed"
    );
    log.admit().unwrap();
    log.submit(&event(5000)).unwrap().wait().unwrap();
    let stats = log.stats();
    log.close().unwrap();

    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
    let query = |action: &str| -> Vec<serde_json::Value> {
        let o = run(&["audit", "query", dir.to_str().unwrap(), "--action", action]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let failed = query("log-failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["palisade"]["error"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{failed:?}"
    );
    assert_eq!(failed[0]["palisade"]["on_log_failure"], mode.as_str());
    assert_eq!(query("log-recovered").len(), 1);
    let gaps = query("gap");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let gap = &gaps[0]["palisade"]["gap"];
    let (lost, refused) = (
        gap["lost_records"].as_u64().unwrap(),
        gap["refused_admissions"].as_u64().unwrap(),
    );
    // The failed commit's record and every record submitted while failing
    // are lost; under fail-closed each admit() while failing was a refusal.
    assert!(lost > refused_or_lost, "{gap}");
    match mode {
        OnLogFailure::FailClosed => assert_eq!(refused, refused_or_lost, "{gap}"),
        OnLogFailure::FailOpen => assert_eq!(refused, 0, "{gap}"),
    }
    assert_eq!(stats.lost_records, lost);
    assert_eq!(stats.refused_admissions, refused);
}

#[test]
fn full_filesystem_fail_closed_refuses_then_recovers() {
    scenario(OnLogFailure::FailClosed);
}

#[test]
fn full_filesystem_fail_open_counts_the_gap() {
    scenario(OnLogFailure::FailOpen);
}
