//! The policy-analysis commands as a user runs them: `lint`, `diff`,
//! `export nft` (loaded into a real kernel inside a network namespace and
//! compared with palisade's own verdicts on real packets).

use palisade::policy::load::{load_policy, FsLoader};
use palisade::policy::{Date, Options, Verdict, Zone};
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `lint --json` gives tools the findings the text gives people: the same
/// codes at the same places, with the same exit codes; a policy that does
/// not compile gives its compiler errors the same way.
#[test]
fn lint_json_gives_the_same_findings_as_the_text() {
    let args = ["--today", TODAY, "tests/analysis/lint.policy"];
    let human = palisade(&[&["lint"][..], &args].concat());
    let tools = palisade(&[&["lint", "--json"][..], &args].concat());
    assert_eq!(tools.status.code(), human.status.code());
    assert_eq!(tools.status.code(), Some(1));
    // The text: `warning[CODE]: ...` then ` --> file:line:col`.
    let mut from_text: Vec<(String, String)> = Vec::new();
    let mut code = None;
    for l in text(&human.stderr).lines() {
        if let Some(rest) = l
            .split_once('[')
            .filter(|(k, _)| *k == "warning" || *k == "error")
        {
            code = rest.1.get(..5).map(String::from);
        } else if let Some(at) = l.trim_start().strip_prefix("--> ") {
            if let Some(c) = code.take() {
                from_text.push((c, at.to_string()));
            }
        }
    }
    let mut from_json: Vec<(String, String)> = text(&tools.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            assert!(
                ["warning", "error"].contains(&v["severity"].as_str().unwrap()),
                "{v}"
            );
            (
                v["code"].as_str().unwrap().to_string(),
                format!(
                    "{}:{}:{}",
                    v["file"].as_str().unwrap(),
                    v["line"],
                    v["column"]
                ),
            )
        })
        .collect();
    from_text.sort();
    from_json.sort();
    assert!(from_json.len() >= 8, "{from_json:?}");
    assert_eq!(from_json, from_text);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.policy");
    std::fs::write(&bad, "rule x allow 192.0.2.0/24 -> nowhere\n").unwrap();
    let out = palisade(&["lint", "--json", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["code"], "E0101", "{v}");
    assert_eq!(v["severity"], "error", "{v}");
    assert_eq!(
        (v["line"].as_u64(), v["column"].as_u64()),
        (Some(1), Some(30)),
        "{v}"
    );
}

#[test]
fn lint_reports_each_finding_where_it_is() {
    let out = palisade(&[
        "lint",
        "--today",
        TODAY,
        "--warn-expiring",
        "30d",
        "tests/analysis/lint.policy",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let has = |code: &str, needle: &str| {
        err.split("\n\n")
            .any(|d| d.contains(&format!("[{code}]")) && d.contains(needle))
    };
    assert!(has("L0102", "rule `https-out` is redundant"), "{err}");
    assert!(
        has("L0101", "rule `block-web` is shadowed") && err.contains("decided first by `web-out`"),
        "{err}"
    );
    assert!(has("L0101", "rule `ssh-b` is shadowed"), "{err}");
    assert!(
        has("L0105", "rule `temp` expires on 2026-12-10, in 15 days")
            && has("L0105", "lint.policy:25:1")
            && has(
                "L0105",
                "fails from the day after, without the rules that expire on that day"
            ),
        "{err}"
    );
    assert!(has("L0103", "rule `gone` can never match"), "{err}");
    assert!(has("L0106", "rule `anything` allows every flow"), "{err}");
    assert!(
        has(
            "L0106",
            "rule `dns-any` allows these services between any two IPv4 addresses"
        ),
        "{err}"
    );
    assert!(
        has("L0107", "http rule `deb` is redundant by `pkgs`"),
        "{err}"
    );
    assert!(has("L0104", "`spare` is defined but never used"), "{err}");
    assert!(
        err.contains("tests/analysis/lint.policy:11:1"),
        "block-web's location: {err}"
    );
    // Rules that do decide something are not reported.
    for quiet in ["`web-out`", "`ssh-a` is", "`temp` is"] {
        assert!(!err.contains(&format!("rule {quiet}")), "{quiet}: {err}");
    }
    assert_eq!(
        text(&out.stdout),
        "tests/analysis/lint.policy: 9 findings\n"
    );

    let clean = palisade(&["lint", "policies/palisade.policy"]);
    assert!(clean.status.success(), "{}", text(&clean.stderr));
    // An expired rule is said once, as L0103.
    assert!(!err.contains("W0311"), "{err}");
}

#[test]
fn lint_shows_every_covering_rule_zones_and_names_used_only_by_unused_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.policy");
    std::fs::write(
        &path,
        "net inner  = 192.0.2.1\n\
         net outer  = inner, 192.0.2.2\n\
         zone edge   = 192.0.2.0/24\n\
         zone onprem = 198.51.100.0/24\n\
         rule lo-web  allow 192.0.2.0/25 -> 198.51.100.0/24 service tcp/443\n\
         rule hi-web  allow 192.0.2.128/25 -> 198.51.100.0/24 service tcp/443\n\
         rule all-web allow 192.0.2.0/24 -> 198.51.100.0/24 service tcp/443\n\
         rule ghost   allow 203.0.113.0/24 -> 198.51.100.0/24 service tcp/22\n\
         rule soon    allow 192.0.2.0/24 -> 198.51.100.9 service tcp/8443 expires 2026-11-25\n\
         default deny\n",
    )
    .unwrap();
    let out = palisade(&["lint", "--today", TODAY, path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let finding = |code: &str, needle: &str| {
        err.split("\n\n")
            .find(|d| d.contains(&format!("[{code}]")) && d.contains(needle))
            .unwrap_or_else(|| panic!("{code} {needle}: {err}"))
            .to_string()
    };
    // Covered by two rules together: both are shown where they are.
    let d = finding("L0102", "rule `all-web` is redundant");
    assert!(
        d.contains("`lo-web`, `hi-web` already allow every flow"),
        "{d}"
    );
    assert!(
        d.contains("p.policy:5:1") && d.contains("p.policy:6:1"),
        "{d}"
    );
    // Sources in neither zone never pass the filter.
    finding("L0108", "rule `ghost` can never match at the filter");
    // `inner` is used only by the unused `outer`.
    finding("L0104", "`outer` is defined but never used");
    finding("L0104", "`inner` is defined but never used");
    finding("L0105", "rule `soon` expires on 2026-11-25, today");
}

#[test]
fn lint_finds_http_rules_covered_by_several_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.policy");
    std::fs::write(
        &path,
        "http m1 allow 192.0.2.0/25 -> \"example.com\" port 443\n\
         http m2 allow 192.0.2.128/25 -> \"example.com\" port 443\n\
         http m3 allow 192.0.2.0/24 -> \"example.com\" port 443\n\
         http w1 deny 192.0.2.0/24 -> \"*.example.org\"\n\
         http w2 allow 192.0.2.0/24 -> \"a.example.org\" port 443\n\
         http w3 allow 192.0.2.0/24 -> \"b.example.org\", \"example.net\" port 443\n\
         default deny\n",
    )
    .unwrap();
    let out = palisade(&["lint", path.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(
        err.contains("http rule `m3` is redundant by `m1`, `m2`")
            && err.contains("h.policy:1:1")
            && err.contains("h.policy:2:1"),
        "{err}"
    );
    assert!(err.contains("http rule `w2` is shadowed by `w1`"), "{err}");
    // w3 still decides example.net.
    assert!(!err.contains("`w3`"), "{err}");
    assert_eq!(
        text(&out.stdout),
        format!("{}: 2 findings\n", path.display())
    );
}

/// A rule is covered only by earlier rules in force for at least as long:
/// when a shorter-lived rule expires, the later rule decides again.
#[test]
fn lint_counts_only_rules_that_live_as_long_as_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exp.policy");
    std::fs::write(
        &path,
        "net lan = 192.0.2.0/24\n\
         net srv = 198.51.100.0/24\n\
         rule temp allow lan -> srv service tcp/22 expires 2027-01-10\n\
         rule perm allow lan -> srv service tcp/22\n\
         rule tempdeny deny lan -> srv service tcp/23 expires 2027-01-20\n\
         rule telnet allow lan -> srv service tcp/23\n\
         rule long allow lan -> srv service tcp/24 expires 2027-06-01\n\
         rule short allow lan -> srv service tcp/24 expires 2027-03-01\n\
         rule always deny lan -> srv service tcp/25\n\
         rule brief allow lan -> srv service tcp/25 expires 2027-03-01\n\
         http tmp allow lan -> \"y.example.com\" expires 2030-01-01\n\
         http hperm allow lan -> \"y.example.com\"\n\
         http t1 allow 192.0.2.0/25 -> \"z.example.com\" expires 2027-01-10\n\
         http p2 allow 192.0.2.128/25 -> \"z.example.com\"\n\
         http zall allow lan -> \"z.example.com\"\n\
         http hlong deny lan -> \"w.example.com\" expires 2030-01-01\n\
         http hshort allow lan -> \"w.example.com\" expires 2029-01-01\n\
         default deny\n",
    )
    .unwrap();
    let out = palisade(&[
        "lint",
        "--today",
        TODAY,
        "--warn-expiring",
        "0",
        path.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    // Covered by shorter-lived rules only: not findings.
    for rule in ["perm", "telnet", "hperm", "zall"] {
        assert!(!err.contains(&format!("`{rule}` is")), "{rule}: {err}");
    }
    // Covered by rules that outlive them: still findings.
    assert!(
        err.contains("rule `short` is redundant") && err.contains("`long` already allows"),
        "{err}"
    );
    assert!(
        err.contains("rule `brief` is shadowed") && err.contains("decided first by `always`"),
        "{err}"
    );
    assert!(
        err.contains("http rule `hshort` is shadowed by `hlong`"),
        "{err}"
    );
    assert_eq!(
        text(&out.stdout),
        format!("{}: 3 findings\n", path.display())
    );
}

#[test]
fn diff_shows_what_traffic_changes() {
    let out = palisade(&[
        "diff",
        "tests/analysis/old.policy",
        "tests/analysis/new.policy",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 1 packet region, 1 http class\n\
         \x20 + tcp 192.0.2.0/24 -> 198.51.100.0/24 dport 80   now allow by `web`, was deny by `default`\n\
         \x20 + http 192.0.2.0/24 -> *.debian.org except deb.debian.org port 443 any method   now allow by `pkgs`, was deny by `default`\n\
         newly denied: 1 packet region, 0 http classes\n\
         \x20 - udp 192.0.2.128/25 -> 198.51.100.53 dport 53   now deny by `default`, was allow by `dns`\n"
    );
    let same = palisade(&[
        "diff",
        "tests/analysis/old.policy",
        "tests/analysis/old.policy",
    ]);
    assert!(same.status.success());
    assert!(text(&same.stdout).contains("decide every flow and request the same way"));
}

/// `diff --json` says the same as the text, a JSON object per line for
/// tools, with the same exit codes.
#[test]
fn diff_json_says_the_same_for_tools() {
    let out = palisade(&[
        "diff",
        "--json",
        "tests/analysis/old.policy",
        "tests/analysis/new.policy",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let side = |verdict: &str, rule: &str| serde_json::json!({ "verdict": verdict, "rules": [rule], "more": false });
    assert_eq!(
        lines,
        [
            serde_json::json!({
                "kind": "packet",
                "change": "newly_allowed",
                "region": "tcp 192.0.2.0/24 -> 198.51.100.0/24 dport 80",
                "old": side("deny", "default"),
                "new": side("allow", "web"),
            }),
            serde_json::json!({
                "kind": "packet",
                "change": "newly_denied",
                "region": "udp 192.0.2.128/25 -> 198.51.100.53 dport 53",
                "old": side("allow", "dns"),
                "new": side("deny", "default"),
            }),
            serde_json::json!({
                "kind": "http",
                "change": "newly_allowed",
                "sources": "192.0.2.0/24",
                "host": "*.debian.org except deb.debian.org",
                "ports": "443",
                "method": "any method",
                "old": side("deny", "default"),
                "new": side("allow", "pkgs"),
            }),
        ]
    );
    let same = palisade(&[
        "diff",
        "--json",
        "tests/analysis/old.policy",
        "tests/analysis/old.policy",
    ]);
    assert!(same.status.success());
    assert_eq!(text(&same.stdout), "");
    // A zone narrowed.
    let dir = tempfile::tempdir().unwrap();
    let (o, n) = (dir.path().join("old.policy"), dir.path().join("new.policy"));
    let rules = "rule web allow 192.0.2.0/24 -> 198.51.100.0/24 service tcp/443\ndefault deny\n";
    std::fs::write(&o, format!("zone edge = 192.0.2.0/24\n{rules}")).unwrap();
    std::fs::write(&n, format!("zone edge = 192.0.2.0/25\n{rules}")).unwrap();
    let out = palisade(&["diff", "--json", o.to_str().unwrap(), n.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(
        line,
        serde_json::json!({
            "kind": "zone",
            "zone": "edge",
            "accepts": null,
            "drops": "192.0.2.128/25",
        })
    );
}

/// `palisade diff` on two policies given as text.
fn diff_texts(old: &str, new: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (o, n) = (dir.path().join("old.policy"), dir.path().join("new.policy"));
    std::fs::write(&o, old).unwrap();
    std::fs::write(&n, new).unwrap();
    palisade(&["diff", o.to_str().unwrap(), n.to_str().unwrap()])
}

/// Regions that differ in one field only are one line listing that
/// field's values; a line is still exactly the flows it names.
#[test]
fn diff_lists_regions_compactly() {
    let out = diff_texts(
        "rule web allow 198.51.100.0/24 -> 192.0.2.0/26 service tcp/80, tcp/443\ndefault deny\n",
        "rule web allow 198.51.100.0/24 -> 192.0.2.0/24 service tcp/80, tcp/443, tcp/8000-8999\n\
         rule dns allow 198.51.100.0/24 -> 192.0.2.53, 192.0.2.153 service udp/53\n\
         default deny\n",
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 3 packet regions, 0 http classes\n\
         \x20 + tcp 198.51.100.0/24 -> 192.0.2.0/24 dport 8000-8999   now allow by `web`, was deny by `default`\n\
         \x20 + tcp 198.51.100.0/24 -> 192.0.2.64-192.0.2.255 dport 80, 443   now allow by `web`, was deny by `default`\n\
         \x20 + udp 198.51.100.0/24 -> 192.0.2.53, 192.0.2.153 dport 53   now allow by `dns`, was deny by `default`\n\
         newly denied: 0 packet regions, 0 http classes\n"
    );
}

/// The classes of requests `diff` and `lint` decide are represented by
/// stand-in names and methods that no pattern of the policies matches: a
/// rule on `"*.invalid"`, on a name like the stand-in's, or on a method
/// `OTHER` decides only what it names.
#[test]
fn diff_and_lint_stand_ins_match_no_real_pattern() {
    let web = "net lan = 192.0.2.0/24\nhttp web allow lan -> \"*\" port 443\ndefault deny\n";
    let invalid = "net lan = 192.0.2.0/24\nhttp no-invalid deny lan -> \"*.invalid\"\n\
                   http web allow lan -> \"*\" port 443\ndefault deny\n";
    let out = diff_texts(web, invalid);
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 0 packet regions, 0 http classes\n\
         newly denied: 0 packet regions, 1 http class\n\
         \x20 - http 192.0.2.0/24 -> *.invalid port 443 any method   now deny by `no-invalid`, was allow by `web`\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inv.policy");
    std::fs::write(&path, invalid).unwrap();
    let lint = palisade(&["lint", path.to_str().unwrap()]);
    assert!(lint.status.success(), "{}", text(&lint.stderr));

    let out = diff_texts(
        "net lan = 192.0.2.0/24\nhttp a allow lan -> \"*.example.com\"\ndefault deny\n",
        "net lan = 192.0.2.0/24\n\
         http x deny lan -> \"any-name.example.com\", \"other-host\", \"other-host.example.com\"\n\
         http a allow lan -> \"*.example.com\"\ndefault deny\n",
    );
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 0 packet regions, 0 http classes\n\
         newly denied: 0 packet regions, 2 http classes\n\
         \x20 - http 192.0.2.0/24 -> any-name.example.com any port any method   now deny by `x`, was allow by `a`\n\
         \x20 - http 192.0.2.0/24 -> other-host.example.com any port any method   now deny by `x`, was allow by `a`\n"
    );

    let out = diff_texts(
        "net lan = 192.0.2.0/24\nhttp m allow lan -> \"*\"\ndefault deny\n",
        "net lan = 192.0.2.0/24\nhttp d deny lan -> \"*\" port 80 method OTHER\n\
         http m allow lan -> \"*\"\ndefault deny\n",
    );
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 0 packet regions, 0 http classes\n\
         newly denied: 0 packet regions, 1 http class\n\
         \x20 - http 192.0.2.0/24 -> any other host port 80 OTHER   now deny by `d`, was allow by `m`\n"
    );
}

#[test]
fn diff_sees_changes_to_ip_literal_destinations() {
    // A narrower IPv4 destination: the upper half is no longer allowed.
    let out = diff_texts(
        "http h allow 10.0.0.0/8 -> 203.0.113.0/24 port 443\ndefault deny\n",
        "http h allow 10.0.0.0/8 -> 203.0.113.0/25 port 443\ndefault deny\n",
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 0 packet regions, 0 http classes\n\
         newly denied: 0 packet regions, 1 http class\n\
         \x20 - http 10.0.0.0/8 -> 203.0.113.128/25 port 443 any method   now deny by `default`, was allow by `h`\n"
    );
    // An IPv6 destination removed.
    let out = diff_texts(
        "http h allow 10.0.0.0/8 -> 2001:db8::1 port 443\ndefault deny\n",
        "default deny\n",
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains(
            "  - http 10.0.0.0/8 -> 2001:db8::1 port 443 any method   now deny by `default`, was allow by `h`\n"
        ),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn diff_sees_zones_plain_tunnels_and_reports_compact_classes() {
    // A narrower zone: the filter now drops the rest as spoofed.
    let rules = "rule web allow 192.0.2.0/24 -> 198.51.100.0/24 service tcp/443\ndefault deny\n";
    let out = diff_texts(
        &format!("zone edge = 192.0.2.0/24\n{rules}"),
        &format!("zone edge = 192.0.2.0/25\n{rules}"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("  - zone edge: now drops 192.0.2.128/25\n"),
        "{}",
        text(&out.stdout)
    );
    // plain-tunnel added: non-TLS tunnels are newly allowed, nothing else.
    let out = diff_texts(
        "http h allow 192.0.2.0/24 -> \"git.example.com\" port 443\ndefault deny\n",
        "http h allow 192.0.2.0/24 -> \"git.example.com\" port 443 plain-tunnel\ndefault deny\n",
    );
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 0 packet regions, 1 http class\n\
         \x20 + http 192.0.2.0/24 -> git.example.com port 443 CONNECT non-TLS tunnels   now allow by `h`, was deny by `h`\n\
         newly denied: 0 packet regions, 0 http classes\n"
    );
    // A wider source and a second port: one class per change, with
    // sources and ports joined, and any port said as such.
    let out = diff_texts(
        "http gh allow 192.0.2.0/25 -> \"api.github.com\" port 443\ndefault deny\n",
        "http gh allow 192.0.2.0/24 -> \"api.github.com\" port 443, 8443\n\
         http all allow 192.0.2.0/24 -> \"pastebin.com\"\ndefault deny\n",
    );
    let got = text(&out.stdout);
    for line in [
        "  + http 192.0.2.0/24 -> api.github.com port 8443 any method   now allow by `gh`, was deny by `default`\n",
        "  + http 192.0.2.128/25 -> api.github.com port 443 any method   now allow by `gh`, was deny by `default`\n",
        "  + http 192.0.2.0/24 -> pastebin.com any port any method   now allow by `all`, was deny by `default`\n",
    ] {
        assert!(got.contains(line), "{line}in\n{got}");
    }
    assert!(
        got.starts_with("newly allowed: 0 packet regions, 3 http classes\n"),
        "{got}"
    );
    // ICMP types and codes are 0-255.
    let out = diff_texts(
        "rule p allow 192.0.2.0/24 -> 198.51.100.0/24 service icmp/3:4\ndefault deny\n",
        "rule p allow 192.0.2.0/24 -> 198.51.100.0/24 service icmp/3\ndefault deny\n",
    );
    let got = text(&out.stdout);
    assert!(got.contains("type 3 code 0-3, 5-255 "), "{got}");
    assert!(!got.contains("65535"), "{got}");
}

fn root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| text(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn export_nft_is_accepted_by_nft() {
    let out = palisade(&["export", "nft", "tests/analysis/nft.policy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ruleset = text(&out.stdout);
    assert!(ruleset.contains("ct state established accept"));
    // Related packets pass but for ICMP redirects, which the policy judges.
    assert!(ruleset.contains("ct state related icmp type != redirect accept"));
    assert!(ruleset.contains("policy drop;"));
    // A list of addresses is a named set the rule refers to (`mail` has
    // two that are not one prefix); a single prefix stays inline.
    assert!(
        ruleset.contains("\tset r7_dst_v4 {")
            && ruleset.contains("elements = { 198.51.100.40, 198.51.100.42 }")
            && ruleset.contains("ip saddr 192.0.2.0/24 ip daddr @r7_dst_v4 ")
            && ruleset.contains("ip daddr 198.51.100.10/31 "),
        "{ruleset}"
    );
    // An expiring rule stops matching new connections at the end of its
    // date, 2099-12-31, as in palisade (2100-01-01T00:00:00Z).
    assert!(
        ruleset.contains(
            "ip saddr 192.0.2.0/24 ip daddr 198.51.100.77 meta l4proto tcp tcp dport 8080 meta time < 4102444800 counter accept comment \"temp\""
        ),
        "{ruleset}"
    );
    if !(root() && have("nft")) {
        eprintln!("SKIP nft -c: needs root and nft (.ci/run installs nftables)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("palisade.nft");
    std::fs::write(&f, &ruleset).unwrap();
    let check = Command::new("nft")
        .args(["-c", "-f"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nft -c rejected the export:\n{}\n{ruleset}",
        text(&check.stderr)
    );
}

/// Three namespaces: client (192.0.2.0/24) -- fw (forwards, runs the
/// exported ruleset) -- server (198.51.100.0/24). Removed on drop.
struct Topology {
    names: [String; 3],
}

impl Topology {
    fn new() -> Topology {
        // Unique per test: the tests of this file run in parallel.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let names = [format!("pcl{id}"), format!("pfw{id}"), format!("psv{id}")];
        let t = Topology { names };
        let [c, f, s] = &t.names;
        let sh = |cmd: String| {
            let o = Command::new("sh").args(["-c", &cmd]).output().unwrap();
            assert!(o.status.success(), "{cmd}: {}", text(&o.stderr));
        };
        for n in &t.names {
            sh(format!("ip netns add {n}"));
        }
        sh(format!(
            "ip link add c0 netns {c} type veth peer name f0 netns {f}"
        ));
        sh(format!(
            "ip link add s0 netns {s} type veth peer name f1 netns {f}"
        ));
        sh(format!("ip -n {c} addr add 192.0.2.1/24 dev c0"));
        for host in [5, 17, 200] {
            sh(format!("ip -n {c} addr add 192.0.2.{host}/32 dev c0"));
        }
        sh(format!("ip -n {f} addr add 192.0.2.254/24 dev f0"));
        sh(format!("ip -n {f} addr add 198.51.100.254/24 dev f1"));
        sh(format!("ip -n {s} addr add 198.51.100.1/24 dev s0"));
        for n in [c, f, s] {
            sh(format!("ip -n {n} link set lo up"));
        }
        sh(format!("ip -n {c} link set c0 up"));
        sh(format!("ip -n {s} link set s0 up"));
        sh(format!("ip -n {f} link set f0 up"));
        sh(format!("ip -n {f} link set f1 up"));
        sh(format!("ip -n {c} route add default via 192.0.2.254"));
        sh(format!("ip -n {s} route add default via 198.51.100.254"));
        sh(format!(
            "ip netns exec {f} sysctl -qw net.ipv4.ip_forward=1"
        ));
        t
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// How a test flow's one packet is sent from the client namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Udp,
    /// A connection attempt: a SYN.
    Syn,
    /// A bare ACK, as if from the middle of a connection nobody saw open.
    Ack,
}

/// One flow to compare: a packet, source, source port, destination,
/// destination port.
type Flow<'a> = (Probe, &'a str, u16, &'a str, u16);

/// Sends one packet of the flow from the client namespace (source address
/// and port bound), without waiting for an answer.
fn send(ns: &str, (probe, src, sport, dst, dport): Flow<'_>) {
    let script = match probe {
        Probe::Udp => format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{src}',{sport}))\ns.sendto(b'x',('{dst}',{dport}))"
        ),
        Probe::Syn => format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_STREAM)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{src}',{sport}))\ns.setblocking(False)\ntry:\n  s.connect(('{dst}',{dport}))\nexcept BlockingIOError:\n  pass\nimport time\ntime.sleep(0.05)"
        ),
        // A raw TCP segment (the kernel adds the IP header): ACK set, no SYN.
        Probe::Ack => format!(
            "import socket,struct\n\
             def csum(b):\n  s=sum(struct.unpack('!%dH'%(len(b)//2),b))\n  while s>>16: s=(s&0xffff)+(s>>16)\n  return (~s)&0xffff\n\
             h=struct.pack('!HHIIBBHHH',{sport},{dport},1000,1000,5<<4,0x10,65535,0,0)\n\
             ph=socket.inet_aton('{src}')+socket.inet_aton('{dst}')+struct.pack('!BBH',0,6,len(h))\n\
             h=h[:16]+struct.pack('!H',csum(ph+h))+h[18:]\n\
             s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_TCP)\n\
             s.bind(('{src}',0))\ns.sendto(h,('{dst}',0))"
        ),
    };
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "send {probe:?} {src}:{sport} -> {dst}:{dport}: {}",
        text(&o.stderr)
    );
}

fn can_build_namespaces() -> bool {
    let ok = root() && have("nft") && have("ip") && have("python3");
    if !ok {
        eprintln!(
            "SKIP kernel comparison: needs root, nft, iproute2 and python3 (.ci/run installs them)"
        );
    }
    ok
}

/// Loads `ruleset` into the forwarding namespace of a fresh topology (the
/// client's port is `f0`, the server's `f1`), sends one packet of each
/// flow from the client and tells, per flow, whether the kernel forwarded
/// it. Each flow needs a distinct (source, source port), so that a counter
/// after the exported chain tells which ones passed.
fn kernel_forwards(ruleset: &str, flows: &[Flow<'_>]) -> (Vec<bool>, String) {
    let topo = Topology::new();
    let [c, f, _] = &topo.names;
    let mut count = String::from("table inet count {\n\tchain counted {\n\t\ttype filter hook forward priority 10; policy accept;\n");
    for (i, (probe, src, sport, dst, dport)) in flows.iter().enumerate() {
        let proto = if *probe == Probe::Udp { "udp" } else { "tcp" };
        count += &format!(
            "\t\tip saddr {src} ip daddr {dst} {proto} sport {sport} {proto} dport {dport} counter comment \"flow{i}\"\n"
        );
    }
    count += "\t}\n}\n";
    let tmp = tempfile::tempdir().unwrap();
    for (name, body) in [("palisade.nft", ruleset), ("count.nft", &count)] {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        let o = Command::new("ip")
            .args(["netns", "exec", f, "nft", "-f"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "load {name}: {}\n{body}",
            text(&o.stderr)
        );
    }
    for flow in flows {
        send(c, *flow);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let listing = Command::new("ip")
        .args(["netns", "exec", f, "nft", "list", "table", "inet", "count"])
        .output()
        .unwrap();
    let listing = text(&listing.stdout);
    let passed = (0..flows.len())
        .map(|i| {
            let line = listing
                .lines()
                .find(|l| l.contains(&format!("comment \"flow{i}\"")))
                .unwrap_or_else(|| panic!("flow{i} counter missing:\n{listing}"));
            !line.contains("packets 0 ")
        })
        .collect();
    (passed, listing)
}

fn flow_key((probe, src, sport, dst, dport): Flow<'_>) -> palisade::classify::FlowKey {
    palisade::classify::FlowKey {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        proto: if probe == Probe::Udp { 17 } else { 6 },
        src_port: sport,
        dst_port: dport,
    }
}

fn load_fixture(path: &str) -> palisade::policy::Compiled {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    load_policy(
        &dir.join(path),
        &FsLoader,
        Options {
            today: Date::new(2026, 11, 25).unwrap(),
        },
    )
    .unwrap()
}

#[test]
fn export_nft_decides_like_palisade_in_the_kernel() {
    if !can_build_namespaces() {
        return;
    }
    let compiled = load_fixture("tests/analysis/nft.policy");
    let ruleset = palisade::policy::export::nft(&compiled.policy, None)
        .unwrap()
        .text;
    let flows: Vec<Flow> = vec![
        (Probe::Syn, "192.0.2.5", 40001, "198.51.100.10", 443),
        (Probe::Syn, "192.0.2.5", 40002, "198.51.100.10", 22),
        (Probe::Syn, "192.0.2.5", 40003, "198.51.100.11", 23),
        (Probe::Syn, "192.0.2.17", 40004, "198.51.100.25", 5432),
        (Probe::Syn, "192.0.2.5", 40005, "198.51.100.25", 5432),
        (Probe::Syn, "192.0.2.200", 40006, "198.51.100.25", 80),
        (Probe::Udp, "192.0.2.5", 40007, "198.51.100.53", 53),
        (Probe::Udp, "192.0.2.5", 40008, "198.51.100.54", 53),
        (Probe::Syn, "192.0.2.200", 40009, "198.51.100.53", 53),
        (Probe::Udp, "192.0.2.5", 123, "198.51.100.123", 123),
        (Probe::Udp, "192.0.2.5", 40010, "198.51.100.123", 123),
        (Probe::Syn, "192.0.2.17", 40011, "198.51.100.20", 80),
        // The rules allow the flow, but the filter only lets a SYN open it.
        (Probe::Ack, "192.0.2.5", 40012, "198.51.100.10", 443),
        (Probe::Syn, "192.0.2.5", 40013, "198.51.100.99", 9),
        // Through the named set: in it, and between its two elements.
        (Probe::Syn, "192.0.2.5", 40014, "198.51.100.42", 25),
        (Probe::Syn, "192.0.2.5", 40015, "198.51.100.41", 25),
    ];
    let (passed, listing) = kernel_forwards(&ruleset, &flows);
    for (flow, kernel_passed) in flows.iter().zip(passed) {
        let ours = compiled.policy.decide(&flow_key(*flow));
        let opens = flow.0 != Probe::Ack;
        assert_eq!(
            kernel_passed,
            opens && ours.verdict == Verdict::Allow,
            "{flow:?}: kernel {} but palisade says {} (rule {})\n{listing}",
            if kernel_passed {
                "passed it"
            } else {
                "dropped it"
            },
            ours.verdict.as_str(),
            compiled.policy.rule_name(ours.rule)
        );
    }
}

#[test]
fn export_nft_with_ports_drops_spoofed_sources_in_the_kernel() {
    // The client's port f0 is the edge, the server's f1 on-premises.
    let path = "tests/analysis/nft-zones.policy";
    let out = palisade(&["export", "nft", "--edge", "f0", "--onprem", "f1", path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "no warning with the ports given");
    let ruleset = text(&out.stdout);
    assert!(
        ruleset.contains("iifname \"f0\" ip saddr != @zone_edge_v4 counter drop")
            && ruleset.contains("iifname \"f1\" ip6 saddr != @zone_onprem_v6 counter drop"),
        "{ruleset}"
    );

    // Without the ports, the export says what it leaves out.
    let out = palisade(&["export", "nft", path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("warning: tests/analysis/nft-zones.policy: the policy has zones, but without --edge IFACE and --onprem IFACE the ruleset does not drop spoofed sources"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("# WARNING: the policy has zones"));
    assert!(!text(&out.stdout).contains("saddr != @zone_"));

    // The filter refuses a policy without both zones; so does the check.
    let out = palisade(&[
        "export",
        "nft",
        "--edge",
        "f0",
        "--onprem",
        "f1",
        "tests/analysis/nft.policy",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("needs both `zone edge = ...` and `zone onprem = ...`"),
        "{}",
        text(&out.stderr)
    );

    if !can_build_namespaces() {
        return;
    }
    let compiled = load_fixture(path);
    let flows: Vec<Flow> = vec![
        (Probe::Syn, "192.0.2.5", 41001, "198.51.100.10", 443),
        (Probe::Syn, "192.0.2.200", 41002, "198.51.100.10", 443),
        (Probe::Udp, "192.0.2.17", 41003, "198.51.100.53", 53),
        (Probe::Udp, "192.0.2.200", 41004, "198.51.100.53", 53),
        (Probe::Syn, "192.0.2.5", 41005, "198.51.100.10", 22),
    ];
    let (passed, listing) = kernel_forwards(&ruleset, &flows);
    for (flow, kernel_passed) in flows.iter().zip(passed) {
        // What the filter does with the packet arriving on its edge port.
        let key = flow_key(*flow);
        let spoofed = compiled.policy.zones().zone_of(key.src) != Some(Zone::Edge);
        let allowed = !spoofed && compiled.policy.decide(&key).verdict == Verdict::Allow;
        assert_eq!(
            kernel_passed,
            allowed,
            "{flow:?}: kernel {} but palisade {}\n{listing}",
            if kernel_passed {
                "passed it"
            } else {
                "dropped it"
            },
            if spoofed {
                "drops it as spoofed"
            } else if allowed {
                "allows it"
            } else {
                "denies it"
            }
        );
    }
}

#[test]
fn import_nsg_translates_rules_in_priority_order() {
    let import = |direction: &str| {
        palisade(&[
            "import",
            "nsg",
            "tests/analysis/nsg.json",
            "--service-tags",
            "tests/analysis/service-tags.json",
            "--direction",
            direction,
        ])
    };
    let out = import("inbound");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let policy = text(&out.stdout);
    let rules: Vec<&str> = policy.lines().filter(|l| l.starts_with("rule ")).collect();
    assert_eq!(
        rules,
        vec![
            "rule denytelnet deny any -> any service tcp/23, udp/23 comment \"Inbound priority 100: no telnet, ever\"",
            "rule allowhttpsfromonprem allow 192.0.2.0/24 -> 10.0.0.0/16, fd00:10::/48 service tcp/443 comment \"Inbound priority 200\"",
            "rule allowping allow 192.0.2.0/24 -> 10.0.0.0/16, fd00:10::/48 service icmp, icmpv6 comment \"Inbound priority 300\"",
            "rule allowvnetinbound allow 10.0.0.0/16, fd00:10::/48 -> 10.0.0.0/16, fd00:10::/48 comment \"Inbound priority 65000: Azure default\"",
        ]
    );
    // The default rule whose tag has no mapping is named, not dropped.
    assert!(
        text(&out.stderr).contains("AllowAzureLoadBalancerInBound"),
        "{}",
        text(&out.stderr)
    );
    // What it prints is a policy that compiles.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nsg.policy");
    std::fs::write(&p, &policy).unwrap();
    let check = palisade(&["check", p.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );

    // The outbound rules on their own: the inbound deny-all-telnet is not
    // among them.
    let out = import("outbound");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let policy = text(&out.stdout);
    let rules: Vec<&str> = policy.lines().filter(|l| l.starts_with("rule ")).collect();
    assert_eq!(
        rules,
        vec![
            "rule allowdnsout allow 10.0.0.0/16, fd00:10::/48 -> 198.51.100.53, 198.51.100.54 service udp/53 comment \"Outbound priority 100\"",
            "rule allowvnetoutbound allow 10.0.0.0/16, fd00:10::/48 -> 10.0.0.0/16, fd00:10::/48 comment \"Outbound priority 65000: Azure default\"",
        ]
    );
    assert!(text(&out.stderr).contains("AllowInternetOutBound"));

    // Both directions in one file and none chosen: an error, not a mix.
    let out = palisade(&[
        "import",
        "nsg",
        "tests/analysis/nsg.json",
        "--service-tags",
        "tests/analysis/service-tags.json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("3 Inbound and 1 Outbound rules")
            && text(&out.stderr).contains("--direction"),
        "{}",
        text(&out.stderr)
    );

    // Without the mapping, the service tag is an error naming rule and field.
    let out = palisade(&[
        "import",
        "nsg",
        "tests/analysis/nsg.json",
        "--direction",
        "inbound",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // ... at the file, line and column of the field's value.
    let doc = std::fs::read_to_string("tests/analysis/nsg.json").unwrap();
    let (line, col) = doc
        .lines()
        .enumerate()
        .find_map(|(n, l)| l.find("\"VirtualNetwork\"").map(|c| (n + 1, c + 1)))
        .unwrap();
    assert!(
        text(&out.stderr).contains(&format!("error: tests/analysis/nsg.json:{line}:{col}: rule `AllowHttpsFromOnprem`: field `destinationAddressPrefix`: `VirtualNetwork` is a service tag")),
        "{}",
        text(&out.stderr)
    );
}

fn classbench_dir() -> Option<std::path::PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/classbench");
    if d.join("fw1_1k").exists() {
        Some(d)
    } else {
        eprintln!("SKIP: this test needs the ClassBench sets in ../shared/data/classbench");
        None
    }
}

#[test]
fn import_classbench_is_equivalent_and_classify_agrees() {
    let Some(dir) = classbench_dir() else { return };
    for set in ["acl1_1k", "fw1_1k", "ipc1_1k", "fw1_10k"] {
        let rules = dir.join(set);
        let out = palisade(&["import", "classbench", rules.to_str().unwrap()]);
        assert!(out.status.success(), "{set}: {}", text(&out.stderr));
        let tmp = tempfile::tempdir().unwrap();
        let policy_path = tmp.path().join(format!("{set}.policy"));
        std::fs::write(&policy_path, &out.stdout).unwrap();
        // The compiled policy's entries are exactly the ClassBench rules.
        let compiled = load_policy(
            &policy_path,
            &FsLoader,
            Options {
                today: Date::new(2026, 11, 25).unwrap(),
            },
        )
        .unwrap();
        let (v4, v6) = palisade::policy::entries(&compiled.policy);
        let original =
            palisade::classify::classbench::parse_rules(&std::fs::read_to_string(&rules).unwrap())
                .unwrap();
        assert!(v6.is_empty());
        assert_eq!(
            v4, original,
            "{set}: the imported policy differs from the rule file"
        );

        // classify through the policy and through the rule file agree.
        let trace = dir.join(format!("{set}_trace"));
        if !trace.exists() {
            continue;
        }
        let a = palisade(&[
            "classify",
            "--policy",
            policy_path.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
        ]);
        let b = palisade(&[
            "classify",
            "--classbench",
            rules.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
        ]);
        assert!(a.status.success() && b.status.success());
        assert_eq!(a.stdout, b.stdout, "{set}");
        let lines = text(&a.stdout);
        let n = std::fs::read_to_string(&trace)
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        assert_eq!(lines.lines().count(), n);
        assert!(lines.lines().all(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.len() == 3 && f[0].parse::<usize>().is_ok() && (f[1] == "allow" || f[1] == "deny")
        }));
        let summary = text(&a.stderr);
        assert!(
            summary.starts_with(&format!("{n} lookups in "))
                && summary.trim_end().ends_with(" Mlookups/s)"),
            "{summary}"
        );
    }
}

#[test]
fn classify_names_rules_by_line_across_blank_lines() {
    // Rule ids are line indices, so a blank line leaves a gap; the names
    // printed must be the ones `import classbench` gives the same rules.
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    std::fs::write(
        &rules,
        "@192.0.2.0/24\t198.51.100.0/24\t0 : 65535\t80 : 80\t0x06/0xFF\t0x0000/0x0000\n\n\
         @192.0.2.0/24\t198.51.100.0/24\t0 : 65535\t81 : 81\t0x06/0xFF\t0x0000/0x0000\n\
         @192.0.2.0/24\t198.51.100.0/24\t0 : 65535\t82 : 82\t0x06/0xFF\t0x0000/0x0000\n",
    )
    .unwrap();
    let trace = tmp.path().join("trace");
    // 192.0.2.1 -> 198.51.100.0, dport 80, 81, 82, 83.
    std::fs::write(
        &trace,
        "3221225985\t3325256704\t1234\t80\t6\t0\n\
         3221225985\t3325256704\t1234\t81\t6\t0\n\
         3221225985\t3325256704\t1234\t82\t6\t0\n\
         3221225985\t3325256704\t1234\t83\t6\t0\n",
    )
    .unwrap();
    let direct = palisade(&[
        "classify",
        "--classbench",
        rules.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(direct.status.success(), "{}", text(&direct.stderr));
    assert_eq!(
        text(&direct.stdout),
        "0 allow cb0\n1 allow cb2\n2 allow cb3\n3 deny default\n"
    );
    let imported = palisade(&["import", "classbench", rules.to_str().unwrap()]);
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    let policy = tmp.path().join("rules.policy");
    std::fs::write(&policy, &imported.stdout).unwrap();
    let via_policy = palisade(&[
        "classify",
        "--policy",
        policy.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(via_policy.status.success(), "{}", text(&via_policy.stderr));
    assert_eq!(via_policy.stdout, direct.stdout);
}

/// A ClassBench set imported, with every third rule made a deny: a policy
/// of mixed verdicts.
fn mixed_classbench(dir: &Path, set: &str) -> Vec<String> {
    let out = palisade(&["import", "classbench", dir.join(set).to_str().unwrap()]);
    assert!(out.status.success(), "{set}: {}", text(&out.stderr));
    let mut n = 0;
    text(&out.stdout)
        .lines()
        .map(|l| {
            if l.starts_with("rule ") {
                n += 1;
                if n % 3 == 0 {
                    return l.replacen(" allow ", " deny ", 1);
                }
            }
            l.to_string()
        })
        .collect()
}

/// The policy at `path`, loaded as on 2026-12-01.
fn load_dated(path: &Path) -> palisade::policy::Policy {
    load_policy(
        path,
        &FsLoader,
        Options {
            today: Date::new(2026, 12, 1).unwrap(),
        },
    )
    .unwrap()
    .policy
}

/// An IPv4 flow anywhere in the space: a protocol and a destination port
/// each one of three given (three draws in four) or any.
fn random_flow(
    next: &mut impl FnMut() -> u64,
    protos: [u8; 3],
    dports: [u16; 3],
) -> palisade::classify::FlowKey {
    let r = next();
    let pick = |r: u64| (r % 4) as usize;
    palisade::classify::FlowKey {
        src: std::net::IpAddr::from(std::net::Ipv4Addr::from(r as u32)),
        dst: std::net::IpAddr::from(std::net::Ipv4Addr::from((r >> 32) as u32)),
        proto: [protos[0], protos[1], protos[2], next() as u8][pick(next())],
        src_port: next() as u16,
        dst_port: [dports[0], dports[1], dports[2], next() as u16][pick(next())],
    }
}

/// A xorshift generator: flows drawn the same way on every run.
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// `diff` on ClassBench 10k policies with mixed verdicts (every third rule
/// a deny): a broad rule removed is analysed (the subtraction `diff` used
/// to do gave up on both as "too fragmented"), and what it reports is
/// exactly the flows whose verdict changed, with the rules that decide
/// them, on flows drawn across the space and inside the removed rule.
#[test]
fn diff_analyses_broad_changes_to_classbench_10k_policies() {
    use palisade::classify::{FamilyKey, FlowKey};
    let Some(dir) = classbench_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // (set, the rule to remove, counted from the end, whether the change
    // alters any verdict)
    for (set, from_end, changes) in [("acl1_10k", 1, true), ("ipc1_10k", 234, true)] {
        let mixed = mixed_classbench(&dir, set);
        let n = mixed.iter().filter(|l| l.starts_with("rule ")).count();
        let gone = n + 1 - from_end;
        let mut k = 0;
        let edited: Vec<&str> = mixed
            .iter()
            .filter(|l| {
                if l.starts_with("rule ") {
                    k += 1;
                    return k != gone;
                }
                true
            })
            .map(String::as_str)
            .collect();
        let removed = mixed
            .iter()
            .filter(|l| l.starts_with("rule "))
            .nth(gone - 1)
            .unwrap();
        let (old_path, new_path) = (tmp.path().join("old.policy"), tmp.path().join("new.policy"));
        std::fs::write(&old_path, mixed.join("\n") + "\n").unwrap();
        std::fs::write(&new_path, edited.join("\n") + "\n").unwrap();

        let out = palisade(&[
            "diff",
            old_path.to_str().unwrap(),
            new_path.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(if changes { 1 } else { 0 }),
            "{set} without `{removed}`: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );

        let (old, new) = (load_dated(&old_path), load_dated(&new_path));
        let (p4, _) = palisade::policy::analysis::changed_regions(&old, &new).unwrap();
        assert_eq!(!p4.is_empty(), changes, "{set}");
        // The removed rule's box, to draw flows inside it.
        let (entries, _) = palisade::policy::entries(&old);
        let boxed = entries
            .iter()
            .find(|e| old.rule_name(Some(e.rule)) == removed.split(' ').nth(1).unwrap())
            .unwrap()
            .fields;
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let within = |r: u64, lo: u32, hi: u32| lo + (r % (u64::from(hi - lo) + 1)) as u32;
        for i in 0..4000 {
            let r = next();
            let key = if i % 2 == 0 {
                FlowKey {
                    src: std::net::IpAddr::from(std::net::Ipv4Addr::from(r as u32)),
                    dst: std::net::IpAddr::from(std::net::Ipv4Addr::from((r >> 32) as u32)),
                    proto: [6, 17, 1, next() as u8][(next() % 4) as usize],
                    src_port: next() as u16,
                    dst_port: [53, 80, 443, next() as u16][(next() % 4) as usize],
                }
            } else {
                let f = &boxed;
                FlowKey {
                    src: std::net::Ipv4Addr::from(within(r, f.src.lo, f.src.hi)).into(),
                    dst: std::net::Ipv4Addr::from(within(next(), f.dst.lo, f.dst.hi)).into(),
                    proto: within(next(), f.proto.lo.into(), f.proto.hi.into()) as u8,
                    src_port: within(next(), f.src_port.lo.into(), f.src_port.hi.into()) as u16,
                    dst_port: within(next(), f.dst_port.lo.into(), f.dst_port.hi.into()) as u16,
                }
            };
            let Some(FamilyKey::V4(k4)) = key.family_key() else {
                unreachable!()
            };
            let (was, now) = (old.decide(&key), new.decide(&key));
            let hits: Vec<_> = p4
                .iter()
                .filter(|x| x.0.matches(&k4))
                .map(|x| (x.1, x.2, x.3, x.4))
                .collect();
            let expected: Vec<_> = if was.verdict != now.verdict {
                vec![(was.rule, now.rule, was.verdict, now.verdict)]
            } else {
                Vec::new()
            };
            assert_eq!(hits, expected, "{set} without `{removed}`: {key:?}");
        }
    }
}

/// A catch-all appended to, or removed from, the end of a large policy
/// whose earlier rules leave thousands of gaps: the flows that change are
/// the complement of those rules, too many regions to list, so `diff`
/// names them by rule (every flow of the catch-all no earlier rule
/// matches) instead of refusing. Flows drawn across the space check the
/// claim: exactly those the catch-all decides change verdict. The same
/// for the default flipped instead.
#[test]
fn diff_names_a_catch_all_at_the_end_by_rule() {
    let Some(dir) = classbench_dir() else { return };
    // fw1_10k with mixed verdicts, without its rules on any address.
    let narrow: Vec<String> = mixed_classbench(&dir, "fw1_10k")
        .into_iter()
        .filter(|l| !l.contains("any4") && !l.starts_with("default"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let (without, with) = (
        tmp.path().join("without.policy"),
        tmp.path().join("with.policy"),
    );
    std::fs::write(&without, narrow.join("\n") + "\ndefault deny\n").unwrap();
    std::fs::write(
        &with,
        narrow.join("\n") + "\nrule catchall allow any4 -> any4\ndefault deny\n",
    )
    .unwrap();
    let region =
        "ip any4 -> any4 where no earlier rule matches (too many regions to list one by one)";
    for (old, new, expected) in [
        (
            &with,
            &without,
            format!("newly allowed: 0 packet regions, 0 http classes\nnewly denied: 1 packet region, 0 http classes\n  - {region}   now deny by `default`, was allow by `catchall`\n"),
        ),
        (
            &without,
            &with,
            format!("newly allowed: 1 packet region, 0 http classes\n  + {region}   now allow by `catchall`, was deny by `default`\nnewly denied: 0 packet regions, 0 http classes\n"),
        ),
    ] {
        let out = palisade(&["diff", old.to_str().unwrap(), new.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), expected);
    }
    let (old, new) = (load_dated(&with), load_dated(&without));
    let catchall = old
        .rules()
        .iter()
        .find(|r| r.name == "catchall")
        .unwrap()
        .id;
    let mut next = xorshift(0x1234_5678_9abc_def1);
    let (mut decided, mut others) = (0, 0);
    for _ in 0..4000 {
        let key = random_flow(&mut next, [6, 17, 1], [53, 80, 443]);
        let (was, now) = (old.decide(&key), new.decide(&key));
        let by_catchall = was.rule == Some(catchall);
        assert_eq!(was.verdict != now.verdict, by_catchall, "{key:?}");
        if by_catchall {
            decided += 1;
        } else {
            others += 1;
        }
    }
    assert!(decided > 0 && others > 0, "{decided} {others}");

    // Only the default flipped: exactly the flows no rule matches change,
    // the same complement.
    let allowing = tmp.path().join("allowing.policy");
    std::fs::write(&allowing, narrow.join("\n") + "\ndefault allow\n").unwrap();
    let out = palisade(&[
        "diff",
        without.to_str().unwrap(),
        allowing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 2 packet regions, 1 http class\n  \
         + ip any4 -> any4 where no rule matches (too many regions to list one by one)   now allow by `default`, was deny by `default`\n  \
         + ip any6 -> any6   now allow by `default`, was deny by `default`\n  \
         + http any -> any other host any port any method   now allow by `default`, was deny by `default`\n\
         newly denied: 0 packet regions, 0 http classes\n"
    );
    let (old, new) = (load_dated(&without), load_dated(&allowing));
    for _ in 0..2000 {
        let key = random_flow(&mut next, [6, 17, 1], [53, 80, 443]);
        let (was, now) = (old.decide(&key), new.decide(&key));
        assert_eq!(was.verdict != now.verdict, was.rule.is_none(), "{key:?}");
    }
}

/// A broad deny inserted in the middle of a large policy with mixed
/// verdicts, and removed again: the flows it decides that the rules after
/// it allowed fall into every gap between thousands of earlier rules, too
/// many regions to list, so `diff` names them by rule, with the later
/// rules that allowed them. Flows drawn across the space check the claim:
/// exactly those the inserted rule decides and the old policy allowed
/// change verdict, and every later rule named decides some of them.
#[test]
fn diff_names_a_rule_inserted_in_the_middle_by_rule() {
    let Some(dir) = classbench_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (without, with) = fw1_with_inserted(
        &dir,
        tmp.path(),
        &[("cb4000", "rule no_ssh deny any4 -> any4 service tcp/22")],
    );
    let region = "tcp any4 -> any4 dport 22 where no earlier rule matches and the later rules allow them (too many regions to list one by one)";
    let mut named: Vec<String> = Vec::new();
    for (old, new, inserted) in [(&without, &with, true), (&with, &without, false)] {
        let out = palisade(&["diff", old.to_str().unwrap(), new.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let report = text(&out.stdout);
        let lines: Vec<&str> = report.lines().collect();
        let (summary, sign, ours, theirs) = if inserted {
            (
                "newly allowed: 0 packet regions, 0 http classes",
                "  - ",
                "now deny by `no_ssh`, was allow by ",
                1,
            )
        } else {
            (
                "newly allowed: 1 packet region, 0 http classes",
                "  + ",
                "was deny by `no_ssh`",
                0,
            )
        };
        assert_eq!(lines.len(), 3, "{report}");
        let change = lines.iter().find(|l| l.starts_with(sign)).unwrap();
        assert!(lines.contains(&summary), "{report}");
        assert!(
            change.starts_with(&format!("{sign}{region}   ")),
            "{report}"
        );
        assert!(change.contains(ours), "{report}");
        // The later rules named on the other side, the same both ways.
        let names = named_on_side(change, theirs);
        assert!(!names.is_empty() && names.len() <= 6, "{report}");
        assert!(!names.contains(&"no_ssh".to_string()), "{report}");
        if inserted {
            named = names;
        } else {
            assert_eq!(names, named, "{report}");
        }
    }
    // The same for tools: the rules named, and that there may be more.
    let out = palisade(&[
        "diff",
        "--json",
        without.to_str().unwrap(),
        with.to_str().unwrap(),
    ]);
    let line: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(line["change"], "newly_denied", "{line}");
    assert_eq!(line["region"], region, "{line}");
    assert_eq!(
        line["new"]["rules"],
        serde_json::json!(["no_ssh"]),
        "{line}"
    );
    assert_eq!(line["old"]["rules"], serde_json::json!(named), "{line}");
    assert_eq!(line["old"]["more"], true, "{line}");
    let (old, new) = (load_dated(&without), load_dated(&with));
    let no_ssh = new.rules().iter().find(|r| r.name == "no_ssh").unwrap().id;
    let mut next = xorshift(0x0bad_cafe_dead_beef);
    let mut decided_by_named: Vec<String> = Vec::new();
    let (mut changed, mut unchanged) = (0, 0);
    for _ in 0..4000 {
        let key = random_flow(&mut next, [6, 6, 17], [22, 22, 22]);
        let (was, now) = (old.decide(&key), new.decide(&key));
        let expected = now.rule == Some(no_ssh) && was.verdict == Verdict::Allow;
        assert_eq!(was.verdict != now.verdict, expected, "{key:?}");
        if expected {
            changed += 1;
            let by = old.rule_name(was.rule).to_string();
            if named.contains(&by) && !decided_by_named.contains(&by) {
                decided_by_named.push(by);
            }
        } else {
            unchanged += 1;
        }
    }
    assert!(changed > 0 && unchanged > 0, "{changed} {unchanged}");
    // Each named rule is a later allow rule sharing flows with `no_ssh`,
    // and the sample hits at least one of them deciding a changed flow.
    for name in &named {
        let r = old.rules().iter().find(|r| &r.name == name).unwrap();
        assert_eq!(r.verdict, Verdict::Allow, "{name}");
        assert!(
            new.rules().iter().position(|x| &x.name == name) > Some(no_ssh as usize),
            "{name}"
        );
    }
    assert!(!decided_by_named.is_empty(), "{named:?}");
}

/// The verdict of a broad rule near the end of a large policy flipped in
/// place (ipc1_10k's `deny any4 -> any4 service tcp`): exactly the flows it
/// decides change, the complement of thousands of earlier rules, so
/// `diff` names them by rule.
#[test]
fn diff_names_a_rule_flipped_in_place_by_rule() {
    let Some(dir) = classbench_dir() else { return };
    let lines = mixed_classbench(&dir, "ipc1_10k");
    let tmp = tempfile::tempdir().unwrap();
    let (before, after) = (
        tmp.path().join("before.policy"),
        tmp.path().join("after.policy"),
    );
    let text_of = |lines: &[String]| lines.join("\n") + "\n";
    std::fs::write(&before, text_of(&lines)).unwrap();
    let rule = "rule cb8729 deny any4 -> any4 service tcp";
    assert!(lines.iter().any(|l| l == rule));
    let flipped: Vec<String> = lines
        .iter()
        .map(|l| {
            if l == rule {
                l.replace(" deny ", " allow ")
            } else {
                l.clone()
            }
        })
        .collect();
    std::fs::write(&after, text_of(&flipped)).unwrap();
    let out = palisade(&["diff", before.to_str().unwrap(), after.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "newly allowed: 1 packet region, 0 http classes\n  + tcp any4 -> any4 where no earlier rule matches (too many regions to list one by one)   now allow by `cb8729`, was deny by `cb8729`\nnewly denied: 0 packet regions, 0 http classes\n"
    );
    let (old, new) = (load_dated(&before), load_dated(&after));
    let id = old.rules().iter().find(|r| r.name == "cb8729").unwrap().id;
    let mut next = xorshift(0x5eed_0ff1_0000_0001);
    let (mut by_it, mut others) = (0, 0);
    for _ in 0..4000 {
        let key = random_flow(&mut next, [6, 6, 17], [22, 80, 443]);
        let (was, now) = (old.decide(&key), new.decide(&key));
        assert_eq!(was.verdict != now.verdict, was.rule == Some(id), "{key:?}");
        if was.rule == Some(id) {
            by_it += 1;
        } else {
            others += 1;
        }
    }
    assert!(by_it > 0 && others > 0, "{by_it} {others}");
}

/// `lint` checks every rule of the ClassBench ipc1 10k set with mixed
/// verdicts, the broad rules at its end too (thousands of earlier rules
/// cover them, in more parts than the analysis attributes one by one),
/// and what each finding claims holds for flows drawn inside the rule: an
/// earlier rule decides every one, with the rule's own verdict where the
/// finding says removing it changes nothing.
#[test]
fn lint_findings_on_the_broad_rules_of_a_classbench_10k_policy_hold() {
    use palisade::classify::FlowKey;
    let Some(dir) = classbench_dir() else { return };
    let mixed = mixed_classbench(&dir, "ipc1_10k");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ipc1_10k.policy");
    std::fs::write(&path, mixed.join("\n") + "\n").unwrap();
    let out = palisade(&["lint", path.to_str().unwrap()]);
    let report = text(&out.stderr);
    assert!(!report.contains("L0199"), "{report}");
    assert!(
        report.contains("too many parts to name each one"),
        "{report}"
    );
    // Each finding: its code and rule.
    let findings: Vec<(&str, &str)> = report
        .lines()
        .filter_map(|l| {
            let code = l.strip_prefix("warning[")?.get(..5)?;
            let name = l.split('`').nth(1)?;
            (code == "L0101" || code == "L0102").then_some((code, name))
        })
        .collect();
    let names: Vec<&str> = findings.iter().map(|f| f.1).collect();
    // The set's last rule, `any4 -> any4`, and the broad ones before it.
    for name in ["cb8738", "cb8737", "cb8734"] {
        assert!(names.contains(&name), "{name}: {report}");
    }
    assert!(findings.len() >= 30, "{report}");

    let policy = load_dated(&path);
    let (entries, _) = palisade::policy::entries(&policy);
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let within = |r: u64, lo: u32, hi: u32| lo + (r % (u64::from(hi - lo) + 1)) as u32;
    for (code, name) in findings {
        let rule = policy.rules().iter().find(|r| r.name == name).unwrap();
        let boxes: Vec<_> = entries.iter().filter(|e| e.rule == rule.id).collect();
        for _ in 0..200 {
            let f = &boxes[(next() % boxes.len() as u64) as usize].fields;
            let key = FlowKey {
                src: std::net::Ipv4Addr::from(within(next(), f.src.lo, f.src.hi)).into(),
                dst: std::net::Ipv4Addr::from(within(next(), f.dst.lo, f.dst.hi)).into(),
                proto: within(next(), f.proto.lo.into(), f.proto.hi.into()) as u8,
                src_port: within(next(), f.src_port.lo.into(), f.src_port.hi.into()) as u16,
                dst_port: within(next(), f.dst_port.lo.into(), f.dst_port.hi.into()) as u16,
            };
            let d = policy.decide(&key);
            assert!(
                d.rule.is_some_and(|id| id < rule.id),
                "{code} {name}: {key:?} {d:?}"
            );
            if code == "L0102" {
                assert_eq!(d.verdict, rule.verdict, "{code} {name}: {key:?}");
            }
        }
    }
}

/// `lint` checks every rule of the ClassBench acl1 10k set for shadowing
/// (the subtraction it used to do stopped at rule 9,735 of 9,761), and
/// finds the set's redundant rules.
#[test]
fn lint_analyses_every_rule_of_a_classbench_10k_policy() {
    let Some(dir) = classbench_dir() else { return };
    let out = palisade(&[
        "import",
        "classbench",
        dir.join("acl1_10k").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("acl1_10k.policy");
    std::fs::write(&path, &out.stdout).unwrap();
    let out = palisade(&["lint", path.to_str().unwrap()]);
    let report = text(&out.stderr);
    assert!(!report.contains("L0199"), "{report}");
    assert!(report.contains("warning[L0102]"), "{report}");
}

/// fw1_10k with mixed verdicts, written as it is and with `rules` each
/// inserted before the rule named with it: the two files.
fn fw1_with_inserted(dir: &Path, tmp: &Path, rules: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let mut lines = mixed_classbench(dir, "fw1_10k");
    let (without, with) = (tmp.join("without.policy"), tmp.join("with.policy"));
    std::fs::write(&without, lines.join("\n") + "\n").unwrap();
    for (before, rule) in rules {
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("rule {before} ")))
            .unwrap();
        lines.insert(at, rule.to_string());
    }
    std::fs::write(&with, lines.join("\n") + "\n").unwrap();
    (without, with)
}

/// The rules a line of `diff` names on one side (0: now, 1: was).
fn named_on_side(line: &str, side: usize) -> Vec<String> {
    let deciders = line.split("   ").nth(1).unwrap();
    let others = deciders.split(", was ").nth(side).unwrap();
    others
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// Two broad denies inserted in the middle of fw1_10k with mixed verdicts,
/// too fragmented to list region by region: `diff` describes the change
/// rule by rule, each inserted rule with the old rules that allowed what
/// it now denies, and the same rules named the other way round; on
/// sampled flows, a verdict changes exactly where an inserted rule decides
/// a flow the old policy allowed.
#[test]
fn diff_names_several_inserted_rules_by_rule() {
    let Some(dir) = classbench_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (without, with) = fw1_with_inserted(
        &dir,
        tmp.path(),
        &[
            ("cb4000", "rule no_ssh deny any4 -> any4 service tcp/22"),
            ("cb6000", "rule no_telnet deny any4 -> any4 service tcp/23"),
        ],
    );
    let mut names: Vec<Vec<String>> = Vec::new();
    for (old, new, inserted) in [(&without, &with, true), (&with, &without, false)] {
        let out = palisade(&["diff", old.to_str().unwrap(), new.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let report = text(&out.stdout);
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), 4, "{report}");
        for (k, (port, rule)) in [(22, "no_ssh"), (23, "no_telnet")].into_iter().enumerate() {
            let (region, ours, theirs) = if inserted {
                (
                    format!("  - tcp any4 -> any4 dport {port} where no earlier rule matches and the old policy allows them (too many regions to list one by one)   "),
                    format!("now deny by `{rule}`, was allow by "),
                    1,
                )
            } else {
                (
                    format!("  + tcp any4 -> any4 dport {port} where no earlier rule matches and the new policy allows them by a rule it kept (too many regions to list one by one)   "),
                    format!(", was deny by `{rule}`"),
                    0,
                )
            };
            let line = lines
                .iter()
                .find(|l| l.starts_with(&region))
                .unwrap_or_else(|| panic!("{region}\n{report}"));
            assert!(line.contains(&ours), "{report}");
            let them = named_on_side(line, theirs);
            assert!(!them.is_empty() && them.len() <= 6, "{report}");
            if inserted {
                names.push(them);
            } else {
                assert_eq!(them, names[k], "{report}");
            }
        }
    }
    let (old, new) = (load_dated(&without), load_dated(&with));
    let id = |name: &str| new.rules().iter().find(|r| r.name == name).unwrap().id;
    let inserted = [id("no_ssh"), id("no_telnet")];
    let mut next = xorshift(0x5eed_f00d_0123_4567);
    let (mut changed, mut unchanged) = ([0; 2], 0);
    for _ in 0..4000 {
        let key = random_flow(&mut next, [6, 6, 17], [22, 23, 22]);
        let (was, now) = (old.decide(&key), new.decide(&key));
        let by = inserted.iter().position(|&r| now.rule == Some(r));
        let expected = by.is_some() && was.verdict == Verdict::Allow;
        assert_eq!(was.verdict != now.verdict, expected, "{key:?}");
        match by.filter(|_| expected) {
            Some(k) => {
                changed[k] += 1;
                // Who allowed it before is an allow rule of the old policy.
                assert!(was.rule.is_some(), "{key:?}");
            }
            None => unchanged += 1,
        }
    }
    assert!(
        changed.iter().all(|&c| c > 0) && unchanged > 0,
        "{changed:?} {unchanged}"
    );
    for name in names.concat() {
        let r = old.rules().iter().find(|r| r.name == name).unwrap();
        assert_eq!(r.verdict, Verdict::Allow, "{name}");
    }
    // 65 such rules are more than a review by rule takes: refused, with
    // what to do instead.
    let mut lines: Vec<String> = std::fs::read_to_string(&without)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("rule cb4000 "))
        .unwrap();
    for port in (1000..1065).rev() {
        lines.insert(
            at,
            format!("rule no_{port} deny any4 -> any4 service tcp/{port}"),
        );
    }
    std::fs::write(&with, lines.join("\n") + "\n").unwrap();
    let out = palisade(&["diff", without.to_str().unwrap(), with.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("error: packet rules: the policy is too fragmented"),
        "{err}"
    );
    assert!(
        err.contains("help: split the change into smaller steps")
            && err.contains("at most 64 rules"),
        "{err}"
    );
}
