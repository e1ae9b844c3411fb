//! Helpers shared by the audit tests: run the real `palisade` binary and
//! make a signed trail to work on.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn palisade() -> Command {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
}

pub fn run(args: &[&str]) -> Output {
    palisade().args(args).output().expect("run palisade")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub struct Keys {
    pub signing: PathBuf,
    pub verifying: PathBuf,
}

pub fn keygen(dir: &Path) -> Keys {
    let o = run(&["audit", "keygen", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "keygen: {}", text(&o));
    Keys {
        signing: dir.join("audit.key"),
        verifying: dir.join("audit.pub"),
    }
}

/// Writes `records` records through the real writer (rotating every 4 KiB),
/// closed cleanly.
pub fn make_trail(dir: &Path, keys: &Keys, records: u64) {
    let o = run(&[
        "audit",
        "stress",
        "--dir",
        dir.to_str().unwrap(),
        "--key",
        keys.signing.to_str().unwrap(),
        "--records",
        &records.to_string(),
        "--producers",
        "2",
        "--rotate-size",
        "4096",
    ]);
    assert!(o.status.success(), "stress: {}", text(&o));
}

pub fn verify(dir: &Path, keys: &Keys) -> (i32, String) {
    let o = run(&[
        "audit",
        "verify",
        "--key",
        keys.verifying.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    (o.status.code().unwrap_or(-1), text(&o))
}

pub fn file(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("audit-{index:08}.jsonl"))
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}
