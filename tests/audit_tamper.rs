//! An auditor runs `palisade audit verify` on a trail someone has altered:
//! each kind of tampering is caught and located (file, line), and only an
//! untouched trail exits 0.

mod common;
use common::*;

struct Trail {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    keys: Keys,
}

/// The trail's newest file.
fn last_file(dir: &std::path::Path) -> std::path::PathBuf {
    (1..)
        .map(|i| file(dir, i))
        .take_while(|p| p.exists())
        .last()
        .unwrap()
}

/// The prev_hash a record written after `line` carries.
fn hash_of(line: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(line.as_bytes()))
}

fn trail() -> Trail {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let dir = tmp.path().join("trail");
    make_trail(&dir, &keys, 200);
    assert!(
        file(&dir, 4).exists(),
        "the trail should span several files"
    );
    Trail {
        _tmp: tmp,
        dir,
        keys,
    }
}

#[test]
fn untouched_trail_is_whole() {
    let t = trail();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("WHOLE"), "{out}");
    // Each checkpoint counts the records of its boot before it: its seq.
    let mut checkpoints = 0;
    for i in (1..).take_while(|i| file(&t.dir, *i).exists()) {
        for l in read_lines(&file(&t.dir, i)) {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if let Some(cp) = v["palisade"].get("checkpoint") {
                assert_eq!(cp["stats"]["records_written"], v["seq"], "{l}");
                checkpoints += 1;
            }
        }
    }
    assert!(checkpoints > 3);
}

#[test]
fn edited_byte_is_located() {
    let t = trail();
    let path = file(&t.dir, 2);
    let mut lines = read_lines(&path);
    // Change one character of a URL: still valid JSON, different bytes.
    lines[4] = lines[4].replacen("stress://p", "stress://q", 1);
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-00000002.jsonl:5 (seq") && out.contains("edited"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.contains(": edited:")).count(),
        1,
        "{out}"
    );
}

#[test]
fn edit_that_breaks_json_is_located() {
    let t = trail();
    let path = file(&t.dir, 3);
    let mut lines = read_lines(&path);
    lines[2].insert(10, '"');
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit-00000003.jsonl:3: malformed"), "{out}");
}

#[test]
fn deleted_line_is_located() {
    let t = trail();
    let path = file(&t.dir, 2);
    let mut lines = read_lines(&path);
    lines.remove(4);
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-00000002.jsonl:5")
            && out.contains("deleted: 1 record(s) missing between audit-00000002.jsonl:4"),
        "{out}"
    );
}

#[test]
fn swapped_lines_are_located() {
    let t = trail();
    let path = file(&t.dir, 2);
    let mut lines = read_lines(&path);
    lines.swap(4, 5);
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-00000002.jsonl:5") && out.contains("swapped"),
        "{out}"
    );
    assert!(
        out.contains("audit-00000002.jsonl:6"),
        "names the other line too: {out}"
    );
}

#[test]
fn inserted_line_is_located() {
    let t = trail();
    let path = file(&t.dir, 2);
    let mut lines = read_lines(&path);
    let copy = lines[2].clone();
    lines.insert(6, copy);
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-00000002.jsonl:7") && out.contains("inserted"),
        "{out}"
    );
}

#[test]
fn a_tail_cut_mid_record_leaves_the_trail_open_and_says_where() {
    // Cut inside the stop checkpoint: what a crash mid-write leaves, so the
    // trail is open (exit 3), as with whole lines cut off, and the
    // incomplete record is named.
    let t = trail();
    let last = last_file(&t.dir);
    let len = std::fs::metadata(&last).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(len - 20).unwrap();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 3, "{out}");
    let name = last.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        out.contains(&format!("note: {name}:"))
            && out.contains("incomplete record")
            && out.contains("INTACT BUT OPEN"),
        "{out}"
    );
    // The stop record is there; what is missing is its seal.
    assert!(
        out.contains("stop record is not followed by its signed stop checkpoint")
            && !out.contains("no stop record"),
        "{out}"
    );
}

#[test]
fn bytes_after_the_seal_are_found() {
    let t = trail();
    let last = last_file(&t.dir);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":").unwrap();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("after the stop checkpoint"), "{out}");
}

/// Rewrites every line's `prev_hash` (and `seq`, per boot) so that the
/// chain links again, as someone who edited records and cannot sign would.
fn rechain(dir: &std::path::Path) {
    let mut prev = "0".repeat(64);
    let mut seq: std::collections::HashMap<String, u64> = Default::default();
    for i in (1..).take_while(|i| file(dir, *i).exists()) {
        let path = file(dir, i);
        let lines: Vec<String> = read_lines(&path)
            .iter()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let boot = v["boot_id"].as_str().unwrap().to_string();
                let n = seq.entry(boot).or_insert(0);
                v["seq"] = (*n).into();
                *n += 1;
                v["prev_hash"] = prev.clone().into();
                let line = serde_json::to_string(&v).unwrap();
                prev = hash_of(&line);
                line
            })
            .collect();
        write_lines(&path, &lines);
    }
}

#[test]
fn the_sealing_line_cannot_be_rewritten() {
    // No later line hashes the stop checkpoint: its signature must cover
    // all of it, or it could be turned into any record.
    let t = trail();
    let path = last_file(&t.dir);
    let mut lines = read_lines(&path);
    let stop = lines.last_mut().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(stop).unwrap();
    assert_eq!(v["palisade"]["checkpoint"]["reason"], "stop", "{stop}");
    v["event"]["code"] = "proxy_request".into();
    v["event"]["action"] = "allowed".into();
    v["source"] = serde_json::json!({"ip": "192.0.2.66"});
    v["url"] = serde_json::json!({"full": "http://exfil.example/"});
    *stop = serde_json::to_string(&v).unwrap();
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad signature"), "{out}");
}

#[test]
fn an_edit_hidden_by_rechaining_is_placed_after_the_last_checkpoint() {
    // An edit in the middle of a file, every later line of the file but its
    // closing checkpoint chained again: the break shows at the checkpoint,
    // and the finding says the change may be anywhere since the one before.
    let t = trail();
    let path = file(&t.dir, 2);
    let mut lines = read_lines(&path);
    let n = lines.len();
    assert!(n >= 5 && lines[n - 1].contains("\"reason\":\"rotation\""));
    lines[2] = lines[2].replacen("stress://p", "stress://q", 1);
    for i in 3..n - 1 {
        let mut v: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
        v["prev_hash"] = hash_of(&lines[i - 1]).into();
        lines[i] = serde_json::to_string(&v).unwrap();
    }
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("audit-00000002.jsonl:{} (seq", n - 1))
            && out.contains("the change may be in any record from audit-00000002.jsonl:1 (seq")
            && out.contains("the signed checkpoint at audit-00000001.jsonl:"),
        "{out}"
    );
}

#[test]
fn a_checkpoint_stripped_of_its_signature_is_caught() {
    let t = trail();
    let path = last_file(&t.dir);
    let mut lines = read_lines(&path);
    let stop = lines.last_mut().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(stop).unwrap();
    v["palisade"].as_object_mut().unwrap().remove("checkpoint");
    *stop = serde_json::to_string(&v).unwrap();
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("without its signature"), "{out}");
}

#[test]
fn a_trail_rebuilt_without_its_checkpoints_is_not_intact() {
    // Every record chained again from the start, every signature gone: the
    // chain holds, but no boot has its start checkpoint and no rotated
    // file ends with the checkpoint naming the next.
    let t = trail();
    for i in (1..).take_while(|i| file(&t.dir, *i).exists()) {
        let path = file(&t.dir, i);
        let kept: Vec<String> = read_lines(&path)
            .into_iter()
            .filter(|l| !l.contains("\"checkpoint\""))
            .collect();
        write_lines(&path, &kept);
    }
    rechain(&t.dir);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-00000001.jsonl:1 (seq 0): bad signature: this start record is not followed by its signed start checkpoint"),
        "{out}"
    );
    assert!(
        out.contains("audit-00000001.jsonl:")
            && out.contains(
                "ends without the signed rotation checkpoint naming audit-00000002.jsonl"
            ),
        "{out}"
    );
}

#[test]
fn a_key_id_edited_in_every_checkpoint_does_not_hide_an_edit() {
    let t = trail();
    let path = file(&t.dir, 2);
    let mut lines = read_lines(&path);
    lines[4] = lines[4].replacen("stress://p", "stress://q", 1);
    write_lines(&path, &lines);
    for i in (1..).take_while(|i| file(&t.dir, *i).exists()) {
        let path = file(&t.dir, i);
        let masked: Vec<String> = read_lines(&path)
            .into_iter()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(&l).unwrap();
                if let Some(cp) = v["palisade"].get_mut("checkpoint") {
                    cp["key_id"] = "0000000000000000".into();
                    return serde_json::to_string(&v).unwrap();
                }
                l
            })
            .collect();
        write_lines(&path, &masked);
    }
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-00000002.jsonl:5 (seq") && out.contains("edited"),
        "{out}"
    );
}

#[test]
fn a_file_named_almost_like_a_trail_file_is_named() {
    let t = trail();
    let forged = t.dir.join("audit-000000002.jsonl");
    std::fs::copy(file(&t.dir, 2), &forged).unwrap();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-000000002.jsonl: inserted: named like a trail file"),
        "{out}"
    );
}

#[test]
fn whole_lines_cut_off_the_end_leave_the_trail_open() {
    let t = trail();
    let last = last_file(&t.dir);
    let mut lines = read_lines(&last);
    lines.truncate(lines.len() - 2); // the stop record and its checkpoint
    write_lines(&last, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("INTACT BUT OPEN") && out.contains("no stop record"),
        "{out}"
    );
}

#[test]
fn removed_rotated_file_is_named() {
    let t = trail();
    std::fs::remove_file(file(&t.dir, 3)).unwrap();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit-00000003.jsonl: missing file"), "{out}");
}

#[test]
fn removed_last_file_is_named() {
    let t = trail();
    let n = (1..).take_while(|i| file(&t.dir, *i).exists()).count() as u64;
    std::fs::remove_file(file(&t.dir, n)).unwrap();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("audit-{n:08}.jsonl: missing file")),
        "{out}"
    );
}

#[test]
fn removed_first_file_is_named() {
    let t = trail();
    std::fs::remove_file(file(&t.dir, 1)).unwrap();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("audit-00000001.jsonl: missing file"), "{out}");
}

#[test]
fn wrong_key_is_reported() {
    let t = trail();
    let other = tempfile::tempdir().unwrap();
    let wrong = keygen(other.path());
    let keys = Keys {
        signing: wrong.signing,
        verifying: wrong.verifying,
    };
    // The key given did not sign this trail: nothing can be said about the
    // trail, which is not the same as finding it damaged.
    let (code, out) = verify(&t.dir, &keys);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("could not verify")
            && out.contains("no key given is one that signed this trail"),
        "{out}"
    );
    assert!(!out.contains("NOT WHOLE"), "{out}");
}

/// A trail whose signing key was replaced between two boots verifies with
/// both keys given; with one of them, the other boot's checkpoints are
/// named as signed by a key not given.
#[test]
fn a_replaced_signing_key_verifies_with_both_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let (old, new) = (
        keygen(&tmp.path().join("old")),
        keygen(&tmp.path().join("new")),
    );
    let dir = tmp.path().join("trail");
    make_trail(&dir, &old, 5);
    // A run with the new key says, at its start, that the trail changes key.
    let o = run(&[
        "audit",
        "stress",
        "--dir",
        dir.to_str().unwrap(),
        "--key",
        new.signing.to_str().unwrap(),
        "--records",
        "5",
    ]);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("the trail so far was signed with key") && said.contains("--key NEW.pub"),
        "{said}"
    );
    make_trail(&dir, &new, 5);
    let both = run(&[
        "audit",
        "verify",
        "--key",
        old.verifying.to_str().unwrap(),
        "--key",
        new.verifying.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    let out = text(&both);
    assert_eq!(both.status.code(), Some(0), "{out}");
    assert!(out.contains("WHOLE: 3 files"), "{out}");
    let (code, out) = verify(&dir, &old);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("but the verifying key(s) given are"), "{out}");
    // A key given that signed nothing here is not named as verifying.
    let other = keygen(&tmp.path().join("other"));
    let extra = run(&[
        "audit",
        "verify",
        "--key",
        new.verifying.to_str().unwrap(),
        "--key",
        other.verifying.to_str().unwrap(),
        "--from",
        "audit-00000003.jsonl",
        dir.to_str().unwrap(),
    ]);
    let out = text(&extra);
    assert_eq!(extra.status.code(), Some(0), "{out}");
    // `verified with key NEW (key OTHER given, but signed none of them)`.
    let used = out
        .split("verified with key ")
        .nth(1)
        .map(|s| s.chars().take(16).collect::<String>())
        .unwrap_or_default();
    let unused = out
        .split(" (key ")
        .nth(1)
        .map(|s| s.chars().take(16).collect::<String>())
        .unwrap_or_default();
    assert!(
        used.len() == 16
            && unused.len() == 16
            && used != unused
            && out.contains(&format!(
                "verified with key {used} (key {unused} given, but signed none of them)"
            )),
        "{out}"
    );
}

#[test]
fn adjacent_edits_are_each_named() {
    // Lines 4 and 5 changed: the chain breaks after 4 and after 5, and both
    // are named, not only the second.
    let t = trail();
    let path = file(&t.dir, 3);
    let mut lines = read_lines(&path);
    for l in &mut lines[3..5] {
        *l = l.replacen("stress://p", "stress://q", 1);
    }
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    for line in [4, 5] {
        assert!(
            out.contains(&format!("audit-00000003.jsonl:{line} (seq")),
            "line {line} not named: {out}"
        );
    }
    assert_eq!(
        out.lines().filter(|l| l.contains(": edited:")).count(),
        2,
        "{out}"
    );

    // Every record of a file rewritten (line ends turned to CRLF): every
    // one of them is named.
    let t = trail();
    let path = file(&t.dir, 2);
    let n = read_lines(&path).len();
    let crlf: String = read_lines(&path)
        .iter()
        .map(|l| format!("{l}\r\n"))
        .collect();
    std::fs::write(&path, crlf).unwrap();
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    for line in 1..=n {
        assert!(
            out.contains(&format!("audit-00000002.jsonl:{line} "))
                || out.contains(&format!("audit-00000002.jsonl:{line}:")),
            "line {line} of {n} not named: {out}"
        );
    }
}

#[test]
fn a_boot_appended_after_the_seal_is_not_taken_for_a_crash() {
    // A start record chained after the signed stop, naming the real boot,
    // and a forged record after it, in the same file: a real writer starts
    // every boot in a new file.
    let t = trail();
    let last_file = last_file(&t.dir);
    let mut lines = read_lines(&last_file);
    let stop: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let start = serde_json::json!({
        "@timestamp": stop["@timestamp"],
        "seq": 0,
        "boot_id": "forged-boot",
        "prev_hash": hash_of(lines.last().unwrap()),
        "event": {"dataset": "palisade.audit", "code": "lifecycle", "action": "start"},
        "palisade": {"previous_boot": {"boot_id": stop["boot_id"], "last_seq": stop["seq"], "clean": true}},
    });
    let start = serde_json::to_string(&start).unwrap();
    let forged = serde_json::json!({
        "@timestamp": stop["@timestamp"],
        "seq": 1,
        "boot_id": "forged-boot",
        "prev_hash": hash_of(&start),
        "event": {"dataset": "palisade.proxy", "code": "proxy_request", "action": "allowed"},
    });
    lines.push(start);
    lines.push(serde_json::to_string(&forged).unwrap());
    write_lines(&last_file, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("inserted") && out.contains("a start record in the middle of a file"),
        "{out}"
    );
}

#[test]
fn rewritten_chain_is_caught_by_signatures() {
    // A forger who recomputes every prev_hash after an edit still cannot
    // sign the checkpoints that follow.
    let t = trail();
    let path = file(&t.dir, 2);
    let mut lines = read_lines(&path);
    lines[4] = lines[4].replacen("stress://p", "stress://q", 1);
    let mut prev = None::<String>;
    for l in lines.iter_mut() {
        if let Some(h) = &prev {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let old = v["prev_hash"].as_str().unwrap().to_string();
            *l = l.replacen(&old, h, 1);
            v["prev_hash"] = serde_json::Value::String(h.clone());
        }
        prev = Some(hash_of(l));
    }
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad signature"), "{out}");
}

#[test]
fn bad_arguments_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path());
    let (code, out) = verify(tmp.path(), &keys);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("holds no audit files"), "{out}");
    let o = run(&[
        "audit",
        "verify",
        "--key",
        "/nonexistent.pub",
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("cannot read key file /nonexistent.pub"),
        "{}",
        text(&o)
    );
    let o = run(&["audit", "keygen", "--out", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("already exists"), "{}", text(&o));
}

#[test]
fn earlier_checkpoint_relabelled_as_stop_is_caught() {
    // Cutting the trail after a rotation checkpoint and calling that
    // checkpoint a `stop` would make the shortened trail look sealed: the
    // signature covers the reason and the next file it names.
    let t = trail();
    let path = file(&t.dir, 2);
    for i in 3.. {
        let later = file(&t.dir, i);
        if !later.exists() {
            break;
        }
        std::fs::remove_file(later).unwrap();
    }
    let mut lines = read_lines(&path);
    let last = lines.last_mut().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["palisade"]["checkpoint"]["reason"], "rotation", "{last}");
    v["palisade"]["checkpoint"]["reason"] = "stop".into();
    v["palisade"].as_object_mut().unwrap().remove("file");
    *last = serde_json::to_string(&v).unwrap();
    write_lines(&path, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("audit-00000002.jsonl") && out.contains("bad signature"),
        "{out}"
    );
}

#[test]
fn edited_checkpoint_counters_are_caught() {
    // The stop checkpoint's counters say whether records were lost; an
    // edit that hides (or invents) losses breaks its signature.
    let t = trail();
    let last_file = last_file(&t.dir);
    let mut lines = read_lines(&last_file);
    let stop = lines.last_mut().unwrap();
    assert!(stop.contains("\"lost_records\":0"), "{stop}");
    *stop = stop.replacen("\"lost_records\":0", "\"lost_records\":42", 1);
    write_lines(&last_file, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("bad signature"), "{out}");
}

#[test]
fn record_appended_after_the_stop_checkpoint_is_inserted() {
    // A record chained correctly after the signed stop, in the same boot:
    // nothing of that boot may follow its stop.
    let t = trail();
    let last_file = last_file(&t.dir);
    let mut lines = read_lines(&last_file);
    let stop: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let forged = serde_json::json!({
        "@timestamp": stop["@timestamp"],
        "seq": stop["seq"].as_u64().unwrap() + 1,
        "boot_id": stop["boot_id"],
        "prev_hash": hash_of(lines.last().unwrap()),
        "event": {"dataset": "palisade.proxy", "code": "proxy_request", "action": "allowed"},
    });
    lines.push(serde_json::to_string(&forged).unwrap());
    write_lines(&last_file, &lines);
    let (code, out) = verify(&t.dir, &t.keys);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("inserted") && out.contains("stop checkpoint"),
        "{out}"
    );
}
