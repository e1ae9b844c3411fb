//! `palisade audit verify`: proves a trail whole or says where it is not.
//! Checks every chain link (each record's `prev_hash` against the SHA-256
//! of the line before it, across files), every checkpoint signature, `seq`
//! continuity within each boot and the hand-over between boots, and file
//! continuity across rotations. Each break is explained as the smallest
//! change that produces it (an edited, inserted, deleted or reordered
//! record, a truncated tail, a missing file) with its file, line and seq.

use super::keys::CheckpointVerifier;
use super::record::{
    checkpoint_message, unsigned_checkpoint_line, Action, PalisadeFields, RecordKind,
};
use super::time::Timestamp;
use super::trail::{
    file_name, line_hash, list_files, parse_file_name, split_lines, stray_files, GENESIS_HASH,
};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FindingKind {
    Edited,
    Inserted,
    Deleted,
    Reordered,
    Truncated,
    MissingFile,
    BadSignature,
    WrongKey,
    Sequence,
    Malformed,
    Rotation,
}

impl FindingKind {
    fn as_str(self) -> &'static str {
        match self {
            FindingKind::Edited => "edited",
            FindingKind::Inserted => "inserted",
            FindingKind::Deleted => "deleted",
            FindingKind::Reordered => "reordered",
            FindingKind::Truncated => "truncated",
            FindingKind::MissingFile => "missing file",
            FindingKind::BadSignature => "bad signature",
            FindingKind::WrongKey => "wrong key",
            FindingKind::Sequence => "sequence",
            FindingKind::Malformed => "malformed",
            FindingKind::Rotation => "rotation",
        }
    }
}

/// One place where the trail is not whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    pub file: String,
    /// 1-based line in `file`; `None` for a whole-file finding.
    pub line: Option<usize>,
    pub seq: Option<u64>,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(s) = self.seq {
            write!(f, " (seq {s})")?;
        }
        write!(f, ": {}: {}", self.kind.as_str(), self.message)
    }
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub files: usize,
    pub records: usize,
    pub boots: usize,
    pub checkpoints_verified: usize,
    /// The ids of the keys that verified at least one checkpoint, in the
    /// order first used.
    pub keys_used: Vec<String>,
    pub findings: Vec<Finding>,
    /// The trail ends with a valid `stop` checkpoint.
    pub sealed: bool,
    /// Not sealed, but its last readable record is the `stop` record: the
    /// checkpoint that seals it is missing or incomplete.
    pub stopped_unsealed: bool,
    /// Records after the last valid checkpoint (covered only by the chain).
    pub unsigned_tail: usize,
    pub first_timestamp: Option<String>,
    pub last_timestamp: Option<String>,
    /// Boots that ended without their stop record (a crash, a kill, or a
    /// trail that could not be written at stop), as the next start record
    /// says: not tampering, but their last records may never have been
    /// written. Each as text: the boot, its last seq, and where it is said.
    pub unclean_ends: Vec<String>,
    /// The newest file ends in an incomplete record that no start record
    /// accounts for: a write cut short by a crash (the writer has not
    /// started again since), or bytes cut off the end. Like records after
    /// the last checkpoint, it leaves the trail open, not proven damaged.
    pub torn_end: Option<String>,
}

impl VerifyReport {
    pub fn is_whole(&self) -> bool {
        self.findings.is_empty()
    }
}

/// The fields verify needs from a record; the rest of the line counts only
/// through its hash, which keeps memory per record small on long trails.
#[derive(serde::Deserialize)]
struct ChainView {
    #[serde(rename = "@timestamp")]
    timestamp: Timestamp,
    seq: u64,
    boot_id: String,
    prev_hash: String,
    event: EventView,
    #[serde(default)]
    palisade: Option<PalisadeFields>,
}

impl ChainView {
    /// Whether this is the writer's own `action` record (start, stop,
    /// rotation, ...), not traffic.
    fn is_lifecycle(&self, action: Action) -> bool {
        self.event.code == RecordKind::Lifecycle && self.event.action == action
    }

    /// A checkpoint record's reason (`start`, `interval`, `rotation`,
    /// `stop`); `None` for any other record.
    fn checkpoint_reason(&self) -> Option<&str> {
        self.palisade
            .as_ref()
            .and_then(|p| p.checkpoint.as_ref())
            .filter(|_| self.event.action == Action::Checkpoint)
            .map(|c| c.reason.as_str())
    }
}

#[derive(serde::Deserialize)]
struct EventView {
    code: RecordKind,
    action: Action,
}

struct Entry {
    file: usize,
    line: usize,
    hash: String,
    rec: Result<ChainView, String>,
    /// For a checkpoint: the hash of its line without its signature's
    /// value, which the signature covers (`None` if that value is not
    /// where the writer puts it).
    signed: Option<String>,
}

impl Entry {
    fn seq(&self) -> Option<u64> {
        self.rec.as_ref().ok().map(|r| r.seq)
    }
}

#[derive(PartialEq)]
enum Link {
    Ok,
    Broken,
}

/// Reads and checks the whole trail in `dir`.
pub fn verify_trail(dir: &Path, key: &CheckpointVerifier) -> std::io::Result<VerifyReport> {
    verify_trail_from(dir, std::slice::from_ref(key), 1)
}

/// Checks the trail in `dir` from file number `from` on: the files before
/// it were archived (and are verified with the archive). The first file's
/// link into the one before it is taken as given, not checked; everything
/// from there on is checked as for the whole trail. Each checkpoint is
/// checked with the key of `keys` it names (a trail signed by a key that
/// was replaced is verified with both).
pub fn verify_trail_from(
    dir: &Path,
    keys: &[CheckpointVerifier],
    from: u64,
) -> std::io::Result<VerifyReport> {
    let from = from.max(1);
    let files: Vec<_> = list_files(dir)?
        .into_iter()
        .filter(|(i, _)| *i >= from)
        .collect();
    let mut report = VerifyReport {
        files: files.len(),
        ..VerifyReport::default()
    };
    let names: Vec<String> = files.iter().map(|(i, _)| file_name(*i)).collect();
    let find = |kind, file: &str, line, seq, message: String| Finding {
        kind,
        file: file.to_string(),
        line,
        seq,
        message,
    };
    let mut findings = Vec::new();
    for name in stray_files(dir)? {
        findings.push(find(
            FindingKind::Inserted,
            &name,
            None,
            None,
            "named like a trail file but not one the writer names (audit-NNNNNNNN.jsonl, numbered from 1): not part of the trail, and not read".into(),
        ));
    }

    // Files: numbered from 1 without holes (the writer never deletes).
    let mut gap_before: HashSet<usize> = HashSet::new();
    let mut missing_ranges: Vec<std::ops::Range<u64>> = Vec::new();
    let mut expected = from;
    for (pos, (index, _)) in files.iter().enumerate() {
        if *index > expected {
            let missing = if *index == expected + 1 {
                file_name(expected)
            } else {
                format!("{} .. {}", file_name(expected), file_name(index - 1))
            };
            findings.push(find(
                FindingKind::MissingFile,
                &missing,
                None,
                None,
                format!(
                    "absent before {}: the writer numbers files from 1 and never deletes one",
                    names[pos]
                ),
            ));
            gap_before.insert(pos);
            missing_ranges.push(expected..*index);
        }
        expected = index + 1;
    }

    // Lines.
    let mut entries: Vec<Entry> = Vec::new();
    let mut torn: HashMap<usize, (u64, u64, String)> = HashMap::new();
    let mut first_entry_of_file: HashMap<usize, usize> = HashMap::new();
    // Read newest first: a live writer appends in chain order, the files
    // before the newest are final once anything follows them, so reading
    // backwards sees a consistent prefix of the chain (read oldest first,
    // a record appended to one file after it was read, ahead of the next
    // file's, would look deleted).
    let mut contents: Vec<Vec<u8>> = Vec::with_capacity(files.len());
    for (_, path) in files.iter().rev() {
        contents.push(std::fs::read(path)?);
    }
    contents.reverse();
    for (pos, content) in contents.iter().enumerate() {
        let (lines, tail) = split_lines(content);
        if let Some((offset, bytes)) = tail {
            torn.insert(pos, (offset, bytes.len() as u64, line_hash(bytes)));
        }
        if !lines.is_empty() {
            first_entry_of_file.insert(pos, entries.len());
        }
        for l in lines {
            let rec = serde_json::from_slice::<ChainView>(l.bytes).map_err(|e| e.to_string());
            let signed = rec
                .as_ref()
                .ok()
                .and_then(|r| r.palisade.as_ref()?.checkpoint.as_ref())
                .and_then(|cp| unsigned_checkpoint_line(l.bytes, &cp.signature))
                .map(|unsigned| line_hash(&unsigned));
            entries.push(Entry {
                file: pos,
                line: l.number,
                hash: line_hash(l.bytes),
                rec,
                signed,
            });
        }
    }
    report.records = entries.len();
    let mut by_hash: HashMap<&str, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_hash.entry(e.hash.as_str()).or_insert(i);
    }
    let at = |i: usize| -> (&str, Option<usize>, Option<u64>) {
        let e = &entries[i];
        (names[e.file].as_str(), Some(e.line), e.seq())
    };
    let line_ref = |i: usize| -> String {
        let e = &entries[i];
        match e.seq() {
            Some(s) => format!("{}:{} (seq {s})", names[e.file], e.line),
            None => format!("{}:{}", names[e.file], e.line),
        }
    };

    // Chain links. links[i] is the link into entry i.
    let prev_hash_of = |i: usize| entries[i].rec.as_ref().ok().map(|r| r.prev_hash.as_str());
    let links: Vec<Link> = (0..entries.len())
        .map(|i| {
            let expected = if i == 0 {
                GENESIS_HASH
            } else {
                entries[i - 1].hash.as_str()
            };
            match prev_hash_of(i) {
                Some(p) if p == expected => Link::Ok,
                // The link into an archived file: taken as given.
                Some(_) if i == 0 && from > 1 => Link::Ok,
                _ => Link::Broken,
            }
        })
        .collect();
    let unknown_contiguous = |i: usize| -> bool {
        // Link i broken, its prev_hash names no line here, seq contiguous.
        if i == 0 || i >= entries.len() || links[i] == Link::Ok {
            return false;
        }
        let (Ok(a), Ok(b)) = (&entries[i - 1].rec, &entries[i].rec) else {
            return false;
        };
        !by_hash.contains_key(b.prev_hash.as_str()) && a.boot_id == b.boot_id && b.seq == a.seq + 1
    };
    let mut explained: HashSet<usize> = HashSet::new();
    let mut boots = HashSet::new();
    let mut last_good_checkpoint: Option<usize> = None;
    for i in 0..entries.len() {
        let e = &entries[i];
        let (file, line, seq) = at(i);
        let rec = match &e.rec {
            Ok(r) => r,
            Err(why) => {
                findings.push(find(
                    FindingKind::Malformed,
                    file,
                    line,
                    None,
                    format!("not a valid audit record (edited or corrupted): {why}"),
                ));
                explained.insert(i);
                explained.insert(i + 1);
                continue;
            }
        };
        boots.insert(rec.boot_id.clone());
        if rec.event.action == Action::Start {
            if let Some(pb) = rec
                .palisade
                .as_ref()
                .and_then(|p| p.previous_boot.as_ref())
                .filter(|pb| !pb.clean && !pb.boot_id.is_empty())
            {
                let short: String = pb.boot_id.chars().take(8).collect();
                report.unclean_ends.push(format!(
                    "boot {short} ended at seq {} without its stop record (said by the start record at {})",
                    pb.last_seq,
                    line_ref(i)
                ));
            }
        }
        // The writer signs a checkpoint in the same write as each start
        // record, so every record of a boot is covered by a signature from
        // its first write on; a boot without one was not written by it.
        if rec.is_lifecycle(Action::Start) {
            let next = entries.get(i + 1).and_then(|n| n.rec.as_ref().ok());
            let boot_goes_on = next.is_some_and(|n| n.boot_id == rec.boot_id);
            let signed_start = next.is_some_and(|n| n.checkpoint_reason() == Some("start"));
            if boot_goes_on && !signed_start {
                findings.push(find(
                    FindingKind::BadSignature,
                    file,
                    line,
                    seq,
                    "this start record is not followed by its signed start checkpoint, which the writer writes with it: the records of this boot were not written by palisade's writer (forged, or the checkpoint removed)".into(),
                ));
            }
        }
        if let Some(&k) = by_hash.get(e.hash.as_str()).filter(|&&k| k != i) {
            findings.push(find(
                FindingKind::Inserted,
                file,
                line,
                seq,
                format!("this record is a copy of {}", line_ref(k)),
            ));
            explained.insert(i);
            explained.insert(i + 1);
            continue;
        }
        // Every boot starts a new file: a start record anywhere else was
        // put there (a boot appended after the trail was sealed, say).
        if rec.is_lifecycle(Action::Start) && first_entry_of_file.get(&e.file) != Some(&i) {
            findings.push(find(
                FindingKind::Inserted,
                file,
                line,
                seq,
                format!(
                    "a start record in the middle of a file, after {}: every boot of the writer starts a new file, so this boot was appended by something else",
                    line_ref(i - 1)
                ),
            ));
        }
        // The writer writes its stop record and the stop checkpoint in one
        // write: nothing else of the boot may follow the stop record.
        if rec.is_lifecycle(Action::Stop) {
            if let Some(n) = entries.get(i + 1).and_then(|n| n.rec.as_ref().ok()) {
                let stop_checkpoint = n.checkpoint_reason() == Some("stop");
                if n.boot_id == rec.boot_id && !stop_checkpoint {
                    findings.push(find(
                        FindingKind::Inserted,
                        names[entries[i + 1].file].as_str(),
                        Some(entries[i + 1].line),
                        Some(n.seq),
                        format!(
                            "this record follows the stop record at {} where the writer writes its signed stop checkpoint: the checkpoint was replaced or records were added",
                            line_ref(i)
                        ),
                    ));
                }
            }
        }
        let signed_fields = rec.palisade.as_ref().and_then(|p| p.checkpoint.as_ref());
        if rec.event.action != Action::Checkpoint && signed_fields.is_some() {
            findings.push(find(
                FindingKind::BadSignature,
                file,
                line,
                seq,
                "a checkpoint's signature on a record that is not a checkpoint: a checkpoint line was rewritten as another record".into(),
            ));
        }
        if rec.event.action == Action::Checkpoint {
            if let Some(cp) = signed_fields {
                let key = keys.iter().find(|k| k.key_id() == cp.key_id);
                if key.is_none() {
                    let given: Vec<&str> = keys.iter().map(|k| k.key_id()).collect();
                    findings.push(find(
                        FindingKind::WrongKey,
                        file,
                        line,
                        seq,
                        format!(
                            "checkpoint signed by key {} but the verifying key(s) given are {}",
                            cp.key_id,
                            given.join(", ")
                        ),
                    ));
                } else if key.is_some_and(|k| {
                    e.signed
                        .as_deref()
                        .is_some_and(|d| k.verify(&checkpoint_message(d), &cp.signature))
                }) {
                    report.checkpoints_verified += 1;
                    if !report.keys_used.contains(&cp.key_id) {
                        report.keys_used.push(cp.key_id.to_string());
                    }
                    if links[i] == Link::Ok {
                        last_good_checkpoint = Some(i);
                    }
                } else {
                    findings.push(find(
                        FindingKind::BadSignature,
                        file,
                        line,
                        seq,
                        "checkpoint signature does not match the chain it follows or the checkpoint's own line (records before it were changed, the line itself was edited, or it was forged)".into(),
                    ));
                }
            } else {
                findings.push(find(
                    FindingKind::BadSignature,
                    file,
                    line,
                    seq,
                    "a checkpoint record without its signature: the writer signs every checkpoint, so this one was stripped or forged".into(),
                ));
            }
        }
        if links[i] == Link::Ok {
            check_sequence(i, &entries, &mut findings, &line_ref, &names, from > 1);
            continue;
        }
        if explained.contains(&i) {
            continue;
        }
        if first_entry_of_file.get(&e.file) == Some(&i) && gap_before.contains(&e.file) {
            continue; // explained by the missing file
        }
        if i == 0 {
            findings.push(find(
                FindingKind::Deleted,
                file,
                line,
                seq,
                "the first record does not begin the trail: the records it follows are missing"
                    .into(),
            ));
            continue;
        }
        if let Some(&j) = by_hash.get(rec.prev_hash.as_str()) {
            if j > i {
                let swapped =
                    j == i + 1 && prev_hash_of(i + 1) == Some(entries[i - 1].hash.as_str());
                let message = if swapped {
                    format!("this record and the next ({}) are swapped", line_ref(i + 1))
                } else {
                    format!(
                        "out of order: it follows {}, which comes later in the trail",
                        line_ref(j)
                    )
                };
                findings.push(find(FindingKind::Reordered, file, line, seq, message));
                explained.insert(i + 1);
                explained.insert(j + 1);
            } else {
                let (from, to) = (j + 1, i - 1);
                let (ffile, fline, fseq) = at(from);
                let what = if from == to {
                    "this record is not part of the chain".to_string()
                } else {
                    format!(
                        "this record and the {} after it, up to {}, are not part of the chain",
                        to - from,
                        line_ref(to)
                    )
                };
                findings.push(find(
                    FindingKind::Inserted,
                    ffile,
                    fline,
                    fseq,
                    format!("{what}: {} continues from {}", line_ref(i), line_ref(j)),
                ));
            }
            continue;
        }
        let prev = match &entries[i - 1].rec {
            Ok(p) => p,
            Err(_) => continue,
        };
        if unknown_contiguous(i) {
            // The record before this one no longer hashes to this record's
            // prev_hash: it was changed. When the next link is broken too,
            // this record was changed as well (or only its prev_hash was,
            // which an edit of the record before leaves as it was).
            let both = unknown_contiguous(i + 1);
            // Someone who chained the records again after an edit moves the
            // break to the last record they rechained: the edit is then
            // anywhere after the last signed checkpoint, which vouches for
            // everything before it.
            let since = last_good_checkpoint.filter(|&c| c + 1 < i - 1).map_or(
                String::new(),
                |c| {
                    format!(
                        "; if the records before it were chained again to hide a change, the change may be in any record from {} on (the signed checkpoint at {} vouches for the records up to it)",
                        line_ref(c + 1),
                        line_ref(c)
                    )
                },
            );
            let edited = |k: usize, next: usize, or_prev: bool| {
                let (kfile, kline, kseq) = at(k);
                find(
                    FindingKind::Edited,
                    kfile,
                    kline,
                    kseq,
                    format!(
                        "this record was changed{}: its hash no longer matches prev_hash in {}{since}",
                        if or_prev {
                            " (or the prev_hash of the next one was)"
                        } else {
                            ""
                        },
                        line_ref(next)
                    ),
                )
            };
            findings.push(edited(i - 1, i, both));
            if both {
                findings.push(edited(i, i + 1, false));
                explained.insert(i + 1);
            }
            continue;
        }
        let deleted = if prev.boot_id == rec.boot_id && rec.seq > prev.seq + 1 {
            Some(rec.seq - prev.seq - 1)
        } else {
            rec.palisade
                .as_ref()
                .and_then(|p| p.previous_boot.as_ref())
                .filter(|pb| pb.boot_id == prev.boot_id && pb.last_seq > prev.seq)
                .map(|pb| pb.last_seq - prev.seq)
        };
        match deleted {
            Some(n) => findings.push(find(
                FindingKind::Deleted,
                file,
                line,
                seq,
                format!(
                    "{n} record(s) missing between {} and this record",
                    line_ref(i - 1)
                ),
            )),
            None => findings.push(find(
                FindingKind::Edited,
                file,
                line,
                seq,
                format!(
                    "the chain is broken: this record does not follow {}",
                    line_ref(i - 1)
                ),
            )),
        }
    }

    // A torn tail a start record declares must still be where it says:
    // otherwise the bytes were removed (or changed) after the restart.
    for (i, e) in entries.iter().enumerate() {
        let Ok(rec) = &e.rec else { continue };
        let Some(t) = rec
            .palisade
            .as_ref()
            .and_then(|p| p.previous_boot.as_ref())
            .and_then(|pb| pb.torn_tail.as_ref())
        else {
            continue;
        };
        let Some(pos) = names.iter().position(|n| *n == t.file) else {
            continue; // a missing file is a finding of its own
        };
        let present = torn
            .get(&pos)
            .is_some_and(|(o, l, h)| *o == t.offset && *l == t.length && *h == t.sha256);
        if !present {
            let (file, line, seq) = at(i);
            findings.push(find(
                FindingKind::Deleted,
                file,
                line,
                seq,
                format!(
                    "this start record declares an incomplete record of {} bytes at byte offset {} of {}, which is no longer there: the file was cut or changed after the restart",
                    t.length, t.offset, t.file
                ),
            ));
        }
    }

    // File boundaries: torn tails and rotation hand-overs.
    for pos in 0..files.len() {
        let last = entries.iter().rposition(|e| e.file == pos);
        // The next file with records (a rotation may leave an empty file).
        let next_first = (pos + 1..files.len()).find_map(|p| first_entry_of_file.get(&p).copied());
        if let Some((offset, length, sha)) = torn.get(&pos) {
            let declared = next_first
                .and_then(|i| entries[i].rec.as_ref().ok())
                .and_then(|r| r.palisade.as_ref())
                .and_then(|p| p.previous_boot.as_ref())
                .and_then(|pb| pb.torn_tail.as_ref())
                .is_some_and(|t| {
                    t.file == names[pos]
                        && t.offset == *offset
                        && t.length == *length
                        && &t.sha256 == sha
                });
            if !declared {
                let line = last.map_or(1, |l| entries[l].line + 1);
                let sealed_before = last.is_some_and(|l| {
                    last_good_checkpoint == Some(l)
                        && entries[l]
                            .rec
                            .as_ref()
                            .is_ok_and(|r| r.checkpoint_reason() == Some("stop"))
                });
                if pos + 1 == files.len() && !sealed_before {
                    report.torn_end = Some(format!(
                        "{}:{line}: the trail ends in an incomplete record ({length} bytes at byte offset {offset}): its writer crashed mid-write and has not started again, or the end of the file was cut off",
                        names[pos]
                    ));
                } else {
                    let why = if pos + 1 == files.len() {
                        "bytes after the stop checkpoint that sealed the trail: added after it was sealed"
                    } else {
                        "the file ends in an incomplete record that the next boot's start record does not account for: truncated or damaged"
                    };
                    findings.push(find(
                        FindingKind::Truncated,
                        &names[pos],
                        Some(line),
                        None,
                        format!("{why} ({length} bytes at byte offset {offset})"),
                    ));
                }
            }
        }
        let Some(last) = last else { continue };
        let Ok(rec) = &entries[last].rec else {
            continue;
        };
        let rotation_next = rec
            .palisade
            .as_ref()
            .filter(|_| rec.event.action == Action::Checkpoint)
            .and_then(|p| p.file.as_ref())
            .and_then(|f| f.next.clone());
        if let Some(next) = &rotation_next {
            let present = names.get(pos + 1) == Some(next);
            let already = parse_file_name(next)
                .is_some_and(|n| missing_ranges.iter().any(|r| r.contains(&n)));
            // A live writer may have created the next file after the
            // directory was listed: then it is there now, and the trail
            // simply goes on past what this run read (it ends open).
            let created_since = pos + 1 == names.len() && dir.join(next).exists();
            if !present && !names.contains(next) && !already && !created_since {
                findings.push(find(
                    FindingKind::MissingFile,
                    next,
                    None,
                    None,
                    format!(
                        "absent, though the rotation checkpoint at {} names it as the next file (removed, or never created)",
                        line_ref(last)
                    ),
                ));
            }
        }
        if let Some(&first) = first_entry_of_file.get(&(pos + 1)) {
            if let Ok(n) = &entries[first].rec {
                let claims_previous = n
                    .palisade
                    .as_ref()
                    .and_then(|p| p.file.as_ref())
                    .and_then(|f| f.previous.clone());
                let is_boundary = n.is_lifecycle(Action::Rotation) || n.is_lifecycle(Action::Start);
                // Within a boot, a file ends with the signed checkpoint that
                // names the next one: without it, the records after the
                // file's last checkpoint were cut, or the file was forged.
                let rotated = n.is_lifecycle(Action::Rotation) && n.boot_id == rec.boot_id;
                if rotated
                    && !gap_before.contains(&(pos + 1))
                    && rotation_next.as_deref() != Some(names[pos + 1].as_str())
                {
                    findings.push(find(
                        FindingKind::Rotation,
                        &names[pos],
                        Some(entries[last].line),
                        Some(rec.seq),
                        format!(
                            "the file ends without the signed rotation checkpoint naming {}, which its writer writes last: records after its last checkpoint were cut off, or the file was forged",
                            names[pos + 1]
                        ),
                    ));
                }
                if (!is_boundary || claims_previous.as_deref() != Some(names[pos].as_str()))
                    && !gap_before.contains(&(pos + 1))
                {
                    findings.push(find(
                        FindingKind::Rotation,
                        &names[pos + 1],
                        Some(entries[first].line),
                        Some(n.seq),
                        format!(
                            "the file does not begin with a rotation or start record naming {} as the previous file",
                            names[pos]
                        ),
                    ));
                }
            }
        }
    }

    report.boots = boots.len();
    if let Some(last) = entries.last() {
        report.sealed = last_good_checkpoint == Some(entries.len() - 1)
            && last
                .rec
                .as_ref()
                .is_ok_and(|r| r.checkpoint_reason() == Some("stop"));
        report.stopped_unsealed = !report.sealed
            && entries
                .iter()
                .rev()
                .find_map(|e| e.rec.as_ref().ok())
                .is_some_and(|r| r.is_lifecycle(Action::Stop));
        report.unsigned_tail = match last_good_checkpoint {
            Some(c) => entries.len() - 1 - c,
            None => entries.len(),
        };
        report.first_timestamp = entries
            .iter()
            .find_map(|e| e.rec.as_ref().ok())
            .map(|r| r.timestamp.to_string());
        report.last_timestamp = entries
            .iter()
            .rev()
            .find_map(|e| e.rec.as_ref().ok())
            .map(|r| r.timestamp.to_string());
    }
    findings.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    findings.dedup();
    report.findings = findings;
    Ok(report)
}

// On an intact link, seq must count up by one within a boot, and a new
// boot must start at 0 naming the boot it follows.
fn check_sequence(
    i: usize,
    entries: &[Entry],
    findings: &mut Vec<Finding>,
    line_ref: &dyn Fn(usize) -> String,
    names: &[String],
    archived_before: bool,
) {
    let Ok(cur) = &entries[i].rec else { return };
    let here = |message: String| Finding {
        kind: FindingKind::Sequence,
        file: names[entries[i].file].clone(),
        line: Some(entries[i].line),
        seq: Some(cur.seq),
        message,
    };
    let is_start = cur.is_lifecycle(Action::Start);
    if i == 0 {
        let rotation = cur.is_lifecycle(Action::Rotation);
        if archived_before {
            // After archived files: a file's own beginning.
            if !(is_start || rotation) {
                findings.push(here(
                    "the first file kept does not begin with a rotation or start record".into(),
                ));
            }
        } else if !(is_start && cur.seq == 0) {
            findings.push(here(
                "the trail does not begin with a start record at seq 0".into(),
            ));
        }
        return;
    }
    let Ok(prev) = &entries[i - 1].rec else {
        return;
    };
    if prev.boot_id == cur.boot_id {
        let after_stop = prev.checkpoint_reason() == Some("stop");
        if after_stop {
            // The stop checkpoint is the boot's last record (its reason is
            // signed); only a new boot's start may follow it.
            findings.push(Finding {
                kind: FindingKind::Inserted,
                ..here(format!(
                    "a record of boot {} follows that boot's stop checkpoint at {}: it was added after the trail was sealed",
                    cur.boot_id,
                    line_ref(i - 1)
                ))
            });
            return;
        }
        if cur.seq != prev.seq + 1 {
            findings.push(here(format!(
                "seq goes from {} to {} within boot {} although the chain links: records were removed or added and the chain rewritten after {}",
                prev.seq,
                cur.seq,
                cur.boot_id,
                line_ref(i - 1)
            )));
        }
        return;
    }
    let hand_over = cur.palisade.as_ref().and_then(|p| p.previous_boot.as_ref());
    let ok = is_start
        && cur.seq == 0
        && hand_over.is_some_and(|pb| pb.boot_id == prev.boot_id && pb.last_seq == prev.seq);
    if !ok {
        findings.push(here(format!(
            "a new boot ({}) begins without a start record at seq 0 that names the previous boot {} ending at seq {}",
            cur.boot_id, prev.boot_id, prev.seq
        )));
    }
}
