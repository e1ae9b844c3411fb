//! kill -9 of a writer under load: every record the writer reported durable
//! is in the trail afterwards, and the next start records the torn tail (if
//! any) so the trail verifies whole again.

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn kill_9_under_load_loses_no_durable_record() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    let mut child = stress(&dir, &keys, 5_000_000, 4, "256KiB")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let boot = line
        .trim()
        .strip_prefix("boot ")
        .expect("boot line")
        .to_string();

    // Let it write for a while under load, then kill it mid-stream.
    let mut durable: HashMap<u64, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while durable.len() < 20_000 && Instant::now() < deadline {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line.trim().strip_prefix("durable ") {
            let (seq, marker) = rest.split_once(' ').unwrap();
            durable.insert(seq.parse().unwrap(), marker.to_string());
        }
    }
    child.kill().unwrap(); // SIGKILL
                           // Lines already in the pipe were printed after durability, too.
    for l in out.lines() {
        let l = l.unwrap();
        if let Some(rest) = l.strip_prefix("durable ") {
            let (seq, marker) = rest.split_once(' ').unwrap();
            durable.insert(seq.parse().unwrap(), marker.to_string());
        }
    }
    child.wait().unwrap();
    assert!(
        durable.len() >= 1000,
        "the writer reported only {} durable records",
        durable.len()
    );

    // Every durable record is on disk with its content.
    let mut found: HashMap<u64, String> = HashMap::new();
    for (_, path) in palisade::audit::trail::list_files(&dir).unwrap() {
        let content = std::fs::read(&path).unwrap();
        let (lines, _) = palisade::audit::trail::split_lines(&content);
        for l in lines {
            let r: palisade::audit::AuditRecord = serde_json::from_slice(l.bytes).unwrap();
            if r.boot_id == boot {
                if let Some(u) = r.event.url {
                    found.insert(r.seq, u.full);
                }
            }
        }
    }
    for (seq, marker) in &durable {
        assert_eq!(
            found.get(seq),
            Some(marker),
            "durable record seq {seq} ({marker}) is not in the trail"
        );
    }

    // The killed boot leaves the trail open (or torn); the next start
    // accounts for it and the trail is whole again once closed.
    let (code, report) = verify(&dir, &keys);
    assert!(code == 3 || code == 1, "{report}");
    if code == 1 {
        assert!(
            report.contains("truncated") && !report.contains("edited"),
            "{report}"
        );
    }
    make_trail(&dir, &keys, 10);
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
    // Whole (a crash is not tampering), and the auditor is told where
    // records may be missing.
    let short: String = boot.chars().take(8).collect();
    assert!(
        report.contains(&format!("note: boot {short} ended at seq "))
            && report.contains("without its stop record"),
        "{report}"
    );
    let o = run(&["audit", "query", dir.to_str().unwrap(), "--action", "start"]);
    let starts: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(starts.len(), 2);
    let prev = &starts[1]["palisade"]["previous_boot"];
    assert_eq!(prev["boot_id"], boot.as_str());
    assert_eq!(prev["clean"], false);
}

#[test]
fn torn_last_line_is_recorded_by_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    make_trail(&dir, &keys, 5);
    // A write cut short: part of a record, no newline.
    let last = file(&dir, 1);
    let before = std::fs::metadata(&last).unwrap().len();
    let partial = br#"{"@timestamp":"2026-11-25T11:00:00.000000Z","seq":9,"boot_id":"dead"#;
    let mut content = std::fs::read(&last).unwrap();
    content.extend_from_slice(partial);
    std::fs::write(&last, content).unwrap();

    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("audit-00000001.jsonl") && report.contains("truncated"),
        "{report}"
    );

    make_trail(&dir, &keys, 5);
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "the torn line is accounted for: {report}");
    assert_eq!(
        std::fs::metadata(&last).unwrap().len(),
        before + partial.len() as u64,
        "nothing deleted"
    );
    let o = run(&["audit", "query", dir.to_str().unwrap(), "--action", "start"]);
    // The incomplete line is named, but a crash's residue is not damage.
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("audit-00000001.jsonl:") && text(&o).contains("incomplete last line"),
        "{}",
        text(&o)
    );
    let second: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().nth(1).unwrap()).unwrap();
    let torn = &second["palisade"]["previous_boot"]["torn_tail"];
    assert_eq!(torn["file"], "audit-00000001.jsonl");
    assert_eq!(torn["offset"], before);
    assert_eq!(torn["length"], partial.len() as u64);
    assert_eq!(
        second["palisade"]["previous_boot"]["clean"], true,
        "the boot itself had closed cleanly"
    );

    // Changing the torn bytes afterwards is caught.
    let mut content = std::fs::read(&last).unwrap();
    let n = content.len();
    content[n - 3] = b'X';
    std::fs::write(&last, content).unwrap();
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("audit-00000001.jsonl") && report.contains("truncated"),
        "{report}"
    );

    // Removing the torn bytes (the file cut back to the last whole record)
    // is caught too: the start record still declares them.
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(before).unwrap();
    drop(f);
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains(": deleted:")
            && report.contains(&format!(
                "declares an incomplete record of {} bytes at byte offset {before} of audit-00000001.jsonl, which is no longer there",
                partial.len()
            )),
        "{report}"
    );
}

#[test]
fn crash_during_rotation_leaves_a_trail_that_recovers_whole() {
    // The writer creates the next file before sealing the current one; a
    // crash while writing the seal leaves a torn line in the old file and
    // an empty new file. The next start must account for both.
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    make_trail(&dir, &keys, 5);
    let old = file(&dir, 1);
    let offset = std::fs::metadata(&old).unwrap().len();
    let mut content = std::fs::read(&old).unwrap();
    content.extend_from_slice(br#"{"@timestamp":"2026-11-25T11:00:00.000000Z","seq":12,"#);
    std::fs::write(&old, content).unwrap();
    std::fs::write(file(&dir, 2), b"").unwrap();

    make_trail(&dir, &keys, 5);
    let (code, report) = verify(&dir, &keys);
    assert_eq!(code, 0, "{report}");
    assert!(file(&dir, 3).exists(), "the new boot starts its own file");
    let o = run(&["audit", "query", dir.to_str().unwrap(), "--action", "start"]);
    let second: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().nth(1).unwrap()).unwrap();
    assert_eq!(
        second["palisade"]["previous_boot"]["torn_tail"]["file"],
        "audit-00000001.jsonl"
    );
    assert_eq!(
        second["palisade"]["previous_boot"]["torn_tail"]["offset"],
        offset
    );
}
