//! Helpers shared by the integration tests: run the real `palisade`
//! binary, make a signed trail to work on, read and verify the trail a
//! daemon wrote, and stop a daemon.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// `palisade audit stress` writing `records` records into `dir` from
/// `producers` threads, a new file every `rotate_size`.
pub fn stress(dir: &Path, keys: &Keys, records: u64, producers: u32, rotate_size: &str) -> Command {
    let mut c = palisade();
    c.arg("audit")
        .arg("stress")
        .arg("--dir")
        .arg(dir)
        .arg("--key")
        .arg(&keys.signing)
        .args(["--records", &records.to_string()])
        .args(["--producers", &producers.to_string()])
        .args(["--rotate-size", rotate_size]);
    c
}

/// Writes `records` records through the real writer (rotating every 4 KiB),
/// closed cleanly.
pub fn make_trail(dir: &Path, keys: &Keys, records: u64) {
    let o = stress(dir, keys, records, 2, "4096")
        .output()
        .expect("run palisade");
    assert!(o.status.success(), "stress: {}", text(&o));
}

pub fn verify(dir: &Path, keys: &Keys) -> (i32, String) {
    verify_with(dir, &keys.verifying)
}

/// `palisade audit verify` of the trail in `dir` with public key `key`:
/// its exit code and output.
pub fn verify_with(dir: &Path, key: &Path) -> (i32, String) {
    let o = run(&[
        "audit",
        "verify",
        "--key",
        key.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    (o.status.code().unwrap_or(-1), text(&o))
}

/// Every record of the trail in `dir`, oldest file first; lines that do
/// not parse (one being written) are skipped, and a trail not yet created
/// reads as empty.
pub fn records(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "jsonl"));
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// The string at JSON pointer `p` in a record, or "".
pub fn s<'a>(v: &'a serde_json::Value, p: &str) -> &'a str {
    v.pointer(p).and_then(|x| x.as_str()).unwrap_or("")
}

/// Sends `sig` to a child process.
pub fn signal(child: &Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a live child has a pid");
    rustix::process::kill_process(pid, sig).expect("signal the child");
}

/// Stops daemon `child` (`what`) with SIGTERM, waiting at most 10 s, and
/// checks that the trail it wrote in `audit` verifies with key `key`.
pub fn stop_and_verify(mut child: Child, what: &str, audit: &Path, key: &Path) {
    signal(&child, rustix::process::Signal::TERM);
    wait_exit(
        &mut child,
        Duration::from_secs(10),
        &format!("{what} did not stop on SIGTERM"),
    );
    let (code, out) = verify_with(audit, key);
    assert_eq!(code, 0, "verify: {out}");
}

/// Waits for `child` to exit, failing with `failure` past `within`.
pub fn wait_exit(child: &mut Child, within: Duration, failure: &str) {
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{failure}");
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// A proxy started by [`start_listening`].
pub struct Listening {
    pub child: Child,
    /// The address it announced (`listening on ADDR;`).
    pub addr: SocketAddr,
    /// What it said on stderr before that.
    pub startup: Vec<String>,
    /// What it says after, line by line.
    pub stderr: std::sync::mpsc::Receiver<String>,
}

/// Spawns `command` (a `palisade proxy` command line) and waits up to 20 s
/// for it to announce its address; a proxy that does not is killed.
pub fn start_listening(command: &mut Command) -> Listening {
    let mut child = command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut startup = Vec::new();
    let addr = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the proxy did not start: {startup:#?}");
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split(';').next().unwrap().parse().unwrap();
        }
        startup.push(line);
    };
    Listening {
        child,
        addr,
        startup,
        stderr: rx,
    }
}

/// curl through the proxy at `proxy` with `args` (the URL among them): the
/// status (0 if none) and the body.
pub fn curl_via(proxy: SocketAddr, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-x",
        ])
        .arg(format!("http://{proxy}"))
        .args(args)
        .output()
        .expect("curl (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
