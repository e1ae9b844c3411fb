//! The trail on disk: numbered files `audit-00000001.jsonl`, ... in one
//! directory, each a sequence of newline-terminated JSON records. The writer
//! and the reader share these helpers so they agree on names and on what a
//! line is.

use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};

/// `prev_hash` of the first record of a trail.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub fn file_name(index: u64) -> String {
    format!("audit-{index:08}.jsonl")
}

/// The index of a trail file name, or `None` for any other file. Only the
/// one name [`file_name`] gives an index counts: `audit-000000007.jsonl`
/// is not file 7.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index = digits.parse().ok()?;
    (file_name(index) == name).then_some(index)
}

/// Files in `dir` named like trail files (`audit-*.jsonl`) that are not
/// one ([`parse_file_name`]): nothing reads them, so `audit verify` names
/// them.
pub fn stray_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut stray = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("audit-")
            && name.ends_with(".jsonl")
            && parse_file_name(&name).is_none()
        {
            stray.push(name);
        }
    }
    stray.sort();
    Ok(stray)
}

/// The trail's files, by index.
pub fn list_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(index) = entry.file_name().to_str().and_then(parse_file_name) {
            files.push((index, entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Lowercase hex SHA-256 of a line's bytes (without its newline).
pub fn line_hash(line: &[u8]) -> String {
    let mut out = String::with_capacity(64);
    line_hash_into(line, &mut out);
    out
}

/// As [`line_hash`], reusing `out`'s allocation (the writer's hot path).
pub fn line_hash_into(line: &[u8], out: &mut String) {
    let mut hex_digits = [0u8; 64];
    // Cannot fail: 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(Sha256::digest(line), &mut hex_digits);
    out.clear();
    out.push_str(std::str::from_utf8(&hex_digits).unwrap_or_default());
}

/// One complete line of a file.
#[derive(Clone, Debug)]
pub struct Line<'a> {
    /// 1-based.
    pub number: usize,
    pub offset: u64,
    pub bytes: &'a [u8],
}

/// Splits a file's content into complete lines, and the bytes after the last
/// newline (a torn write), if any.
pub fn split_lines(content: &[u8]) -> (Vec<Line<'_>>, Option<(u64, &[u8])>) {
    let mut lines = Vec::new();
    let mut start = 0usize;
    for (i, &b) in content.iter().enumerate() {
        if b == b'\n' {
            lines.push(Line {
                number: lines.len() + 1,
                offset: start as u64,
                bytes: &content[start..i],
            });
            start = i + 1;
        }
    }
    let torn = (start < content.len()).then(|| (start as u64, &content[start..]));
    (lines, torn)
}

/// fsync a directory so a file created or renamed in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(7), "audit-00000007.jsonl");
        assert_eq!(parse_file_name("audit-00000007.jsonl"), Some(7));
        assert_eq!(parse_file_name("audit-123456789.jsonl"), Some(123_456_789));
        assert_eq!(parse_file_name("audit-7.jsonl"), None);
        assert_eq!(parse_file_name("audit-000000007.jsonl"), None);
        assert_eq!(parse_file_name("audit-0123456789.jsonl"), None);
        assert_eq!(parse_file_name("audit-0000000x.jsonl"), None);
        assert_eq!(parse_file_name("notes.txt"), None);
    }

    #[test]
    fn splits_and_finds_torn_tail() {
        let (lines, torn) = split_lines(b"a\nbc\nde");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].bytes, b"bc");
        assert_eq!(lines[1].offset, 2);
        assert_eq!(torn, Some((5, &b"de"[..])));
        assert_eq!(split_lines(b"a\n").1, None);
    }
}
