//! The shipped service files (`config/systemd/`) as an operator installs
//! them: systemd accepts the units, their stop timeout leaves room for the
//! configured drain, and the proxy unit's own command line, run on the
//! shipped appliance configuration and seed policy (with `/etc` and
//! `/var/lib` moved into a temporary folder), serves, stops and leaves a
//! whole trail.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/systemd")
        .join(name)
}

/// The value of `key=` in a unit file.
fn unit_value(unit: &str, key: &str) -> String {
    let text = std::fs::read_to_string(shipped(unit)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{unit} has no {key}="))
        .to_string()
}

#[test]
fn systemd_accepts_the_units() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: systemd-analyze is not installed (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for unit in ["palisade-proxy.service", "palisade-filter.service"] {
        // The binary where the unit expects it is the one just built.
        let text = std::fs::read_to_string(shipped(unit))
            .unwrap()
            .replace("/usr/local/bin/palisade", env!("CARGO_BIN_EXE_palisade"));
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    // Warnings (an unknown key, a bad value) exit 0 but are said.
    let warnings: Vec<&str> = said.lines().filter(|l| l.contains(".service")).collect();
    assert!(warnings.is_empty(), "{said}");
}

#[test]
fn the_stop_timeout_leaves_room_for_the_drain() {
    let config = palisade::config::Config::load(&shipped("palisade.toml")).unwrap();
    assert_eq!(
        config.policy,
        Path::new("/etc/palisade/palisade.policy"),
        "the units' configuration names the installed policy"
    );
    for unit in ["palisade-proxy.service", "palisade-filter.service"] {
        let stop: u64 = unit_value(unit, "TimeoutStopSec").parse().unwrap();
        assert!(
            Duration::from_secs(stop) >= config.proxy.drain_timeout + Duration::from_secs(10),
            "{unit}: TimeoutStopSec={stop} leaves no room to seal the trail after a {:?} drain",
            config.proxy.drain_timeout
        );
        assert_eq!(unit_value(unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    }
    // Enough files for max_connections at 7 each, plus 256 kept.
    let files: u64 = unit_value("palisade-proxy.service", "LimitNOFILE")
        .parse()
        .unwrap();
    assert!(files >= config.proxy.max_connections as u64 * 7 + 256);
}

#[test]
fn the_proxy_unit_command_serves_the_shipped_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let moved = |text: &str| {
        text.replace("/etc/palisade/", &format!("{}/etc/", root.display()))
            .replace("/var/lib/palisade/", &format!("{}/var/", root.display()))
    };
    std::fs::create_dir_all(root.join("etc")).unwrap();
    // The seed policy installed as the units expect, with its includes.
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::copy(
        policies.join("palisade.policy"),
        root.join("etc/palisade.policy"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("etc/hybrid")).unwrap();
    for f in std::fs::read_dir(policies.join("hybrid")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, root.join("etc/hybrid").join(f.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(shipped("palisade.toml"))
        .unwrap()
        .replace("0.0.0.0:3128", "127.0.0.1:0");
    std::fs::write(root.join("etc/palisade.toml"), moved(&config)).unwrap();
    // The unit's command line, word for word, but for the moved paths.
    let exec = moved(&unit_value("palisade-proxy.service", "ExecStart"));
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/palisade"));
    let started = common::start_listening(Command::new(env!("CARGO_BIN_EXE_palisade")).args(words));
    let (child, addr) = (started.child, started.addr);
    // The seed policy sends Internet-bound HTTP through its own rules; a
    // destination it does not name is refused with its request id.
    let (status, body) = common::curl_via(addr, &["http://not-in-the-policy.example/"]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("request id"), "{body}");
    common::stop_and_verify(
        child,
        "the proxy",
        &root.join("var/proxy-audit"),
        &root.join("var/audit.pub"),
    );
}
