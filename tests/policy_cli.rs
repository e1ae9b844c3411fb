//! The policy commands as a user runs them: the real `palisade` binary on
//! good and broken policies, comparing the full output.
//!
//! Golden files: each `tests/golden/NAME.policy` has `NAME.expected` beside
//! it with the exit code, stdout and stderr of
//! `palisade check --today 2026-11-25 tests/golden/NAME.policy`.
//! Run with `PALISADE_BLESS=1` to rewrite them after a deliberate change,
//! then review the diff.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TODAY: &str = "2026-11-25";

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run palisade")
}

fn transcript(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status
            .code()
            .map(|c| c.to_string())
            .unwrap_or("signal".into()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn golden_diagnostics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "policy"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 30, "golden cases missing");
    let bless = std::env::var_os("PALISADE_BLESS").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let rel = format!(
            "tests/golden/{}",
            case.file_name().unwrap().to_string_lossy()
        );
        let out = palisade(&["check", "--today", TODAY, &rel]);
        let got = transcript(&out);
        // Nothing a user feeds in may crash the checker.
        assert!(out.status.code().is_some_and(|c| c <= 2), "{rel}: {got}");
        let expected_path = case.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != want {
            failures.push(format!("=== {rel}\n--- want\n{want}\n--- got\n{got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn shipped_policies_check_clean() {
    // On a fixed day: the example's rule with an `expires` date is there
    // to show expiry, and warns once that date has passed.
    let out = palisade(&["check", "--today", TODAY, "--deny-warnings", "policies/"]);
    assert!(out.status.success(), "{}", transcript(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("policies/example.policy: ok"), "{stdout}");
    assert!(
        !stdout.contains(" 0/"),
        "every shipped policy carries expectations: {stdout}"
    );
}

/// The policies a new user reads first are the ones the linter has nothing
/// to say about: no unused names, no shadowed or overly broad rules.
#[test]
fn shipped_policies_lint_clean() {
    let out = palisade(&["lint", "--today", TODAY, "policies/"]);
    assert!(out.status.success(), "{}", transcript(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("policies/example.policy: 0 findings"),
        "{stdout}"
    );
}

#[test]
fn deny_warnings_turns_warnings_into_exit_1() {
    let plain = palisade(&["check", "--today", TODAY, "tests/golden/host-bits.policy"]);
    assert_eq!(plain.status.code(), Some(0), "{}", transcript(&plain));
    let strict = palisade(&[
        "check",
        "--today",
        TODAY,
        "--deny-warnings",
        "tests/golden/host-bits.policy",
    ]);
    assert_eq!(strict.status.code(), Some(1), "{}", transcript(&strict));
}

#[test]
fn test_command_reports_failures_with_the_deciding_rule() {
    let out = palisade(&[
        "test",
        "--today",
        TODAY,
        "tests/golden/expectation-failed.policy",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "FAIL tests/golden/expectation-failed.policy:4:1  expect allow tcp 10.0.1.5:40000 -> 192.168.5.10:1433\n     got deny by rule `default` (tests/golden/expectation-failed.policy:3:1)\n\
         FAIL tests/golden/expectation-failed.policy:5:1  expect deny tcp 10.0.2.5:40000 -> 192.168.5.10:1433\n     got allow by rule `biz-sql` (tests/golden/expectation-failed.policy:2:1)\n\
         2 expectations: 0 passed, 2 failed\n"
    );
    let ok = palisade(&["test", "policies/example.policy"]);
    assert!(ok.status.success(), "{}", transcript(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).ends_with(" passed, 0 failed\n"));
}

#[test]
fn explain_names_the_rule_and_the_near_misses() {
    let out = palisade(&[
        "explain",
        "--policy",
        "policies/example.policy",
        "tcp",
        "10.0.2.5:40000",
        "->",
        "192.168.5.10:1433",
    ]);
    assert!(out.status.success(), "{}", transcript(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with("allow tcp 10.0.2.5:40000 -> 192.168.5.10:1433\n"),
        "{s}"
    );
    assert!(
        s.contains("decided by: rule `biz-sql` (allow) at policies/example.policy:23:1"),
        "{s}"
    );

    let out = palisade(&[
        "explain",
        "--policy",
        "policies/example.policy",
        "tcp 10.0.1.5:40000 -> 192.168.5.10:1433",
    ]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.starts_with("deny "), "{s}");
    assert!(
        s.contains("decided by: the default (deny) at policies/example.policy:"),
        "{s}"
    );
    assert!(s.contains("`biz-sql` (allow)"), "{s}");
    assert!(s.contains("source 10.0.1.5 is not in 10.0.2.0/24"), "{s}");

    let out = palisade(&[
        "explain",
        "--policy",
        "policies/example.policy",
        "http",
        "10.0.1.7",
        "->",
        "https://archive.ubuntu.com/",
    ]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("decided by: rule `updates` (allow)"), "{s}");

    let bad = palisade(&[
        "explain",
        "--policy",
        "policies/example.policy",
        "tcp",
        "10.0.1.5",
        "->",
        "192.168.5.10",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected a destination with a port"));
}

/// A near miss names everything the rule's destination names, its
/// addresses too, never an empty list.
#[test]
fn explain_near_misses_name_the_rules_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("y.policy");
    std::fs::write(
        &path,
        "net lan = 192.0.2.0/24\n\
         http h allow lan -> 198.51.100.0/24 port 443\n\
         http h6 allow lan -> 2001:db8::/32 port 443\n\
         http both allow lan -> \"x.example.com\", 198.51.100.7 port 443\n\
         default deny\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let explain = |url: &str| {
        let out = palisade(&["explain", "--policy", p, "http", "192.0.2.1", "->", url]);
        assert!(out.status.success(), "{}", transcript(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let s = explain("https://203.0.113.1/");
    assert!(
        s.contains("- host 203.0.113.1 does not match 198.51.100.0/24\n"),
        "{s}"
    );
    assert!(
        s.contains("- host 203.0.113.1 does not match 2001:db8::/32\n"),
        "{s}"
    );
    assert!(
        s.contains("- host 203.0.113.1 does not match \"x.example.com\", 198.51.100.7\n"),
        "{s}"
    );
    let s = explain("https://y.example.com/");
    assert!(
        s.contains("- host y.example.com does not match 198.51.100.0/24\n"),
        "{s}"
    );
    assert!(!s.contains("does not match \n"), "{s}");
}

/// `explain` reads a URL's host the way the proxy does: the decimal,
/// trailing-dot and IPv4-mapped spellings of an address are that address.
#[test]
fn explain_reads_ip_literals_as_the_proxy_does() {
    for url in [
        "https://198.51.100.7/",
        "https://[::ffff:198.51.100.7]/",
        "https://3325256711/",
        "https://198.51.100.7./",
    ] {
        let out = palisade(&[
            "explain",
            "--policy",
            "tests/golden/expect-ip-spellings.policy",
            "http",
            "192.0.2.1",
            "->",
            url,
        ]);
        assert!(out.status.success(), "{url}: {}", transcript(&out));
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.starts_with("deny "), "{url}: {s}");
        assert!(
            s.contains("decided by: rule `blocked-ip` (deny)"),
            "{url}: {s}"
        );
    }
}

#[test]
fn fmt_check_and_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("messy.policy");
    std::fs::write(
        &path,
        "net a=192.0.2.0/24 # lan\nrule   r allow a->any service tcp/443\ndefault deny\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let check = palisade(&["fmt", "--check", p]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains("not formatted"));
    let fix = palisade(&["fmt", p]);
    assert!(fix.status.success(), "{}", transcript(&fix));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "net a = 192.0.2.0/24 # lan\nrule r allow a -> any service tcp/443\ndefault deny\n"
    );
    assert!(palisade(&["fmt", "--check", p]).status.success());
    // A broken file is reported and left alone.
    std::fs::write(&path, "net a = \n").unwrap();
    let broken = palisade(&["fmt", p]);
    assert_eq!(broken.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "net a = \n");
    // A comment inside a multi-line list moves above its statement, and
    // what fmt wrote passes `fmt --check`.
    std::fs::write(
        &path,
        "net a-long-name = 192.0.2.1\nnet b = 192.0.2.2, # why\n        192.0.2.3\n",
    )
    .unwrap();
    assert!(palisade(&["fmt", p]).status.success());
    let check = palisade(&["fmt", "--check", p]);
    assert!(check.status.success(), "{}", transcript(&check));
    // The shipped policies are formatted.
    assert!(palisade(&["fmt", "--check", "policies/"]).status.success());
}

#[test]
fn hostile_input_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 MB line.
    let long = dir.path().join("long.policy");
    let mut text = String::from("net a = ");
    while text.len() < 1_000_000 {
        text.push_str("192.0.2.1, ");
    }
    text.push_str("junk junk\n");
    std::fs::write(&long, &text).unwrap();
    let out = palisade(&["check", long.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", transcript(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("long.policy:1:"), "{stderr}");
    assert!(
        stderr.len() < 2_000,
        "the excerpt of a long line is cut: {} bytes",
        stderr.len()
    );

    // Binary junk, deterministic.
    let junk = dir.path().join("junk.policy");
    let mut x: u32 = 0x1234_5678;
    let bytes: Vec<u8> = (0..65_536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(&junk, bytes).unwrap();
    let out = palisade(&["check", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", transcript(&out));

    // The example cut at every 7th byte.
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/example.policy"),
    )
    .unwrap();
    let cut = dir.path().join("cut.policy");
    for n in (1..example.len()).step_by(97) {
        if !example.is_char_boundary(n) {
            continue;
        }
        std::fs::write(&cut, &example[..n]).unwrap();
        let out = palisade(&["check", cut.to_str().unwrap()]);
        assert!(
            out.status.code().is_some_and(|c| c <= 2),
            "cut at {n}: {}",
            transcript(&out)
        );
    }
}
