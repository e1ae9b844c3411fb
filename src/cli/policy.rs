//! The policy writer's commands: `check`, `test`, `explain`, `fmt`.

use clap::Args;
use palisade::policy::expect::{self, Query};
use palisade::policy::load::{load_policy, Failed, FsLoader};
use palisade::policy::{
    explain, fmt as pfmt, parse, Compiled, Date, Diagnostic, Diagnostics, Options, SourceMap,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit codes shared by the policy commands.
pub const EXIT_OK: u8 = 0;
pub const EXIT_WARNINGS: u8 = 1;
pub const EXIT_ERRORS: u8 = 2;

#[derive(Args)]
pub struct CheckArgs {
    /// Policy files, or directories whose *.policy files are each a policy.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Exit 1 when there are warnings (and no errors).
    #[arg(long)]
    pub deny_warnings: bool,
    /// Judge rule expiry as of this date (YYYY-MM-DD) instead of today.
    #[arg(long, value_parser = parse_date)]
    pub today: Option<Date>,
}

#[derive(Args)]
pub struct TestArgs {
    /// Policy files, or directories whose *.policy files are each a policy.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Also list the expectations that passed.
    #[arg(short, long)]
    pub verbose: bool,
    /// Judge rule expiry as of this date (YYYY-MM-DD) instead of today.
    #[arg(long, value_parser = parse_date)]
    pub today: Option<Date>,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The policy's root file.
    #[arg(long)]
    pub policy: PathBuf,
    /// Judge rule expiry as of this date (YYYY-MM-DD) instead of today.
    #[arg(long, value_parser = parse_date)]
    pub today: Option<Date>,
    /// What to explain: `tcp 10.0.2.5:40000 -> 192.168.5.10:1433`,
    /// `icmp/echo-request A -> B`, or `http 10.0.1.7 -> https://example.com/`.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    pub probe: Vec<String>,
}

#[derive(Args)]
pub struct FmtArgs {
    /// Policy files or directories (every *.policy file below them).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Change nothing; list the files that are not formatted and exit 1.
    #[arg(long)]
    pub check: bool,
    /// Print the formatted text instead of rewriting the file.
    #[arg(long, conflicts_with = "check")]
    pub stdout: bool,
}

pub fn parse_date(s: &str) -> Result<Date, String> {
    let parts: Vec<&str> = s.split('-').collect();
    let bad = || format!("`{s}` is not a date as YYYY-MM-DD");
    if parts.len() != 3 {
        return Err(bad());
    }
    let y = parts[0].parse().map_err(|_| bad())?;
    let m = parts[1].parse().map_err(|_| bad())?;
    let d = parts[2].parse().map_err(|_| bad())?;
    Date::new(y, m, d).ok_or_else(bad)
}

/// Expands directories into the policy files directly inside them, sorted.
/// Fragments meant only for `include` belong in subdirectories.
pub fn roots(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p)
                .map_err(|e| format!("cannot read directory `{}`: {e}", p.display()))?;
            let mut files: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "policy"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(format!("no *.policy files in `{}`", p.display()));
            }
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn all_policy_files(paths: &[PathBuf], out: &mut Vec<PathBuf>) -> Result<(), String> {
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p)
                .map_err(|e| format!("cannot read directory `{}`: {e}", p.display()))?;
            let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            entries.sort();
            for e in entries {
                if e.is_dir() {
                    all_policy_files(&[e], out)?;
                } else if e.extension().is_some_and(|x| x == "policy") {
                    out.push(e);
                }
            }
        } else {
            out.push(p.clone());
        }
    }
    Ok(())
}

fn render_failed(f: &Failed) -> String {
    f.diagnostics.render(&f.sources)
}

fn load(path: &Path, today: Option<Date>) -> Result<Compiled, Failed> {
    load_policy(
        path,
        &FsLoader,
        Options {
            today: today.unwrap_or_else(Date::today),
        },
    )
}

/// Loads one policy, printing its diagnostics; `None` when it does not
/// compile.
pub fn load_one(path: &Path, today: Option<Date>) -> Option<Compiled> {
    load_one_except(path, today, &[])
}

/// As [`load_one`], without printing the compile warnings whose codes are
/// in `skip` (a command that reports the same thing its own way).
pub fn load_one_except(path: &Path, today: Option<Date>, skip: &[&str]) -> Option<Compiled> {
    match load_except(path, today, skip) {
        Ok(c) => {
            eprint!("{}", c.diagnostics.render(&c.sources));
            Some(c)
        }
        Err(f) => {
            eprint!("{}", render_failed(&f));
            None
        }
    }
}

/// The policy at `path` with the compiler's diagnostics but those whose
/// code `skip` names, or why it failed; nothing printed.
pub fn load_except(path: &Path, today: Option<Date>, skip: &[&str]) -> Result<Compiled, Failed> {
    let mut c = load(path, today)?;
    c.diagnostics.items.retain(|d| !skip.contains(&d.code));
    Ok(c)
}

pub fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn check(args: CheckArgs) -> ExitCode {
    let roots = match roots(&args.paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    let mut worst = EXIT_OK;
    let stderr = std::io::stderr();
    for root in &roots {
        match load(root, args.today) {
            Err(f) => {
                let _ = write!(stderr.lock(), "{}", render_failed(&f));
                println!(
                    "{}: failed: {}, {}",
                    root.display(),
                    plural(f.diagnostics.error_count(), "error", "errors"),
                    plural(f.diagnostics.warning_count(), "warning", "warnings")
                );
                worst = worst.max(EXIT_ERRORS);
            }
            Ok(c) => {
                let mut diags = c.diagnostics.clone();
                let failures = failed_expectations(&c);
                let passed = c.expectations.len() - failures.len();
                for d in failures {
                    diags.push(d);
                }
                diags.sort();
                let _ = write!(stderr.lock(), "{}", diags.render(&c.sources));
                let errors = diags.error_count();
                let warnings = diags.warning_count();
                let status = if errors > 0 { "failed" } else { "ok" };
                println!(
                    "{}: {status}: {}, {}, {}, {}/{} passed, {}, {} (sha256 {})",
                    root.display(),
                    plural(c.stats.rules, "rule", "rules"),
                    plural(c.stats.http_rules, "http rule", "http rules"),
                    plural(c.stats.names, "name", "names"),
                    passed,
                    plural(c.expectations.len(), "expectation", "expectations"),
                    plural(errors, "error", "errors"),
                    plural(warnings, "warning", "warnings"),
                    &c.policy.sha256()[..16]
                );
                if errors > 0 {
                    worst = worst.max(EXIT_ERRORS);
                } else if warnings > 0 && args.deny_warnings {
                    worst = worst.max(EXIT_WARNINGS);
                }
            }
        }
    }
    ExitCode::from(worst)
}

/// Compiles a policy to put in force (a daemon's start or reload): it must
/// compile, and its own expectations must hold, or it is refused with the
/// diagnostics, and a running daemon keeps the policy it has.
pub fn load_for_enforcement(path: &Path) -> Result<Compiled, String> {
    let mut c = load(path, None).map_err(|f| render_failed(&f))?;
    let (failed, stale): (Vec<_>, Vec<_>) = failed_expectations(&c)
        .into_iter()
        .partition(|d| d.severity == palisade::policy::Severity::Error);
    let failed = Diagnostics { items: failed };
    if failed.items.is_empty() {
        // Put in force, with what `check` would warn of said to the
        // operator (an empty file, a rule past its date, an expectation
        // that relied on it, ...).
        for d in stale {
            c.diagnostics.push(d);
        }
        c.diagnostics.sort();
        if !c.diagnostics.items.is_empty() {
            palisade::say!("{}", c.diagnostics.render(&c.sources).trim_end());
        }
        if c.stats.rules == 0 && c.stats.http_rules == 0 {
            palisade::say!(
                "warning: {} has no rules: everything is {}",
                path.display(),
                match c.policy.default_verdict() {
                    palisade::policy::Verdict::Allow => "allowed",
                    palisade::policy::Verdict::Deny => "denied",
                }
            );
        }
        return Ok(c);
    }
    Err(format!(
        "{}{}: {} of its expectations fail; the policy is not put in force",
        failed.render(&c.sources),
        path.display(),
        failed.items.len()
    ))
}

/// A diagnostic for each of the policy's expectations that fails: E0400,
/// or the warning W0404 when it fails only because a rule it relies on
/// expired. Such a policy is still put in force: a daemon already running
/// stops matching the rule at its date without being asked, and one
/// started (or reloaded) later must not refuse what it was running.
fn failed_expectations(c: &Compiled) -> Vec<Diagnostic> {
    let before = c.policy.before_expiry();
    c.expectations
        .iter()
        .filter_map(|e| {
            let o = expect::run(&c.policy, e);
            (!o.passed).then(|| expectation_failure(c, e, &o, expired_reliance(c, e, &o, &before)))
        })
        .collect()
}

/// The expired rule an expectation relies on, and its date, if the
/// expectation held with every rule in force and that rule decided it.
/// Not when the expiry widened access (a deny expected, and a broader
/// allow decides now that a deny rule expired): that is the policy failing
/// its own test, and stays an error. An expiry that narrows access, or
/// leaves a flow denied by another rule, is what the rule's author asked
/// for.
fn expired_reliance(
    c: &Compiled,
    e: &expect::Expectation,
    now: &expect::Outcome,
    before: &Option<palisade::policy::Policy>,
) -> Option<(String, palisade::policy::Date, palisade::policy::Span)> {
    // Access widened (a deny expected, an allow now): not this warning.
    if e.verdict == palisade::policy::Verdict::Deny
        && now.verdict == palisade::policy::Verdict::Allow
    {
        return None;
    }
    let o = expect::run(before.as_ref()?, e);
    if !o.passed {
        return None;
    }
    match rule_of(c, &e.query, &o.rule)? {
        (span, false, Some(expired)) => Some((o.rule, expired, span)),
        _ => None,
    }
}

fn expectation_failure(
    c: &Compiled,
    e: &expect::Expectation,
    o: &expect::Outcome,
    expired: Option<(String, palisade::policy::Date, palisade::policy::Span)>,
) -> Diagnostic {
    let wanted = match &e.by {
        Some(b) => format!("{} by `{b}`", e.verdict.as_str()),
        None => e.verdict.as_str().to_string(),
    };
    let got = format!("{} by `{}`", o.verdict.as_str(), o.rule);
    if let Some((rule, date, span)) = expired {
        return Diagnostic::warning(
            "W0404",
            format!(
                "expectation no longer holds: rule `{rule}`, which it relies on, expired on {date} (wanted {wanted}, got {got})"
            ),
        )
        .at(e.span, format!("held until rule `{rule}` expired"))
        .also(span, "expired")
        .help("remove the expectation with the rule, or extend the rule's `expires` if the access is still needed");
    }
    let mut d = Diagnostic::error(
        "E0400",
        format!("expectation failed: wanted {wanted}, got {got}"),
    )
    .at(e.span, format!("decided by `{}`", o.rule));
    if let Some(span) = rule_span(c, &e.query, &o.rule) {
        d = d.also(span, "this rule decided");
    }
    d
}

fn rule_span(c: &Compiled, q: &Query, name: &str) -> Option<palisade::policy::Span> {
    rule_of(c, q, name).map(|(span, _, _)| span)
}

/// The rule named `name` of the kind `q` asks about: its place, whether it
/// is in force, and its `expires` date.
fn rule_of(
    c: &Compiled,
    q: &Query,
    name: &str,
) -> Option<(palisade::policy::Span, bool, Option<palisade::policy::Date>)> {
    match q {
        Query::Packet(_) => c
            .policy
            .rules()
            .iter()
            .find(|r| r.name == name)
            .map(|r| (r.span, r.active, r.expires)),
        Query::Http(_) => c
            .policy
            .http_rules()
            .iter()
            .find(|r| r.name == name)
            .map(|r| (r.span, r.active, r.expires)),
    }
}

pub fn test(args: TestArgs) -> ExitCode {
    let roots = match roots(&args.paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    let (mut total, mut failed) = (0, 0);
    let mut broken = false;
    for root in &roots {
        let c = match load(root, args.today) {
            Ok(c) => c,
            Err(f) => {
                eprint!("{}", render_failed(&f));
                println!("{}: does not compile; no expectations run", root.display());
                broken = true;
                continue;
            }
        };
        let before = c.policy.before_expiry();
        for e in &c.expectations {
            total += 1;
            let o = expect::run(&c.policy, e);
            let at = c.sources.location(e.span);
            if o.passed {
                if args.verbose {
                    println!("PASS {at}  {}", e.text);
                }
                continue;
            }
            failed += 1;
            println!("FAIL {at}  {}", e.text);
            let rule_at = match rule_span(&c, &e.query, &o.rule) {
                Some(span) => format!(" ({})", c.sources.location(span)),
                None => c
                    .policy
                    .default_location()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default(),
            };
            println!(
                "     got {} by rule `{}`{rule_at}",
                o.verdict.as_str(),
                o.rule
            );
            if let Some((rule, date, _)) = expired_reliance(&c, e, &o, &before) {
                println!("     it held until rule `{rule}` expired on {date}");
            }
        }
    }
    println!(
        "{}: {} passed, {} failed",
        plural(total, "expectation", "expectations"),
        total - failed,
        failed
    );
    if broken {
        ExitCode::from(EXIT_ERRORS)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

pub fn explain(args: ExplainArgs) -> ExitCode {
    let c = match load(&args.policy, args.today) {
        Ok(c) => c,
        Err(f) => {
            eprint!("{}", render_failed(&f));
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    let text = args.probe.join(" ");
    let mut sources = SourceMap::new();
    let id = sources.add(PathBuf::from("<command line>"), text.clone());
    let query = parse::parse_probe(id, &text)
        .and_then(|p| expect::query_of(&p, palisade::policy::Span::new(id, 0, text.len())));
    let query = match query {
        Ok(q) => q,
        Err(d) => {
            eprint!("{}", d.render(&sources));
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    let x = explain::explain(&c.policy, &query);
    println!("{} {}", x.verdict.as_str(), text);
    let loc = x
        .location
        .clone()
        .or_else(|| c.policy.default_location().map(|l| l.to_string()))
        .map(|l| format!(" at {l}"))
        .unwrap_or_default();
    if x.rule == "default" {
        println!("  decided by: the default ({}){loc}", x.verdict.as_str());
    } else {
        println!(
            "  decided by: rule `{}` ({}){loc}",
            x.rule,
            x.verdict.as_str()
        );
    }
    if x.near_misses.is_empty() {
        println!("  no earlier rule came close");
    } else {
        println!("  earlier rules that came close:");
        for m in &x.near_misses {
            println!(
                "    `{}` ({}) at {}",
                m.rule,
                m.verdict.as_str(),
                m.location
            );
            for why in &m.mismatches {
                println!("      - {why}");
            }
        }
    }
    ExitCode::SUCCESS
}

pub fn fmt(args: FmtArgs) -> ExitCode {
    let mut files = Vec::new();
    if let Err(e) = all_policy_files(&args.paths, &mut files) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_ERRORS);
    }
    let mut worst = EXIT_OK;
    for path in files {
        let text = match std::fs::read(&path).map(String::from_utf8) {
            Ok(Ok(t)) => t,
            Ok(Err(_)) => {
                eprintln!("error: `{}` is not UTF-8 text", path.display());
                worst = EXIT_ERRORS;
                continue;
            }
            Err(e) => {
                eprintln!("error: cannot read `{}`: {e}", path.display());
                worst = EXIT_ERRORS;
                continue;
            }
        };
        let formatted = match pfmt::format_text(&text) {
            Ok(f) => f,
            Err(diags) => {
                let mut sources = SourceMap::new();
                sources.add(path.clone(), text);
                eprint!("{}", diags.render(&sources));
                eprintln!(
                    "error: `{}` does not parse; it was not formatted",
                    path.display()
                );
                worst = EXIT_ERRORS;
                continue;
            }
        };
        if args.stdout {
            print!("{formatted}");
        } else if formatted != text {
            if args.check {
                println!("{}: not formatted", path.display());
                worst = worst.max(EXIT_WARNINGS);
            } else if let Err(e) = write_atomically(&path, formatted.as_bytes()) {
                eprintln!("error: cannot write `{}`: {e}", path.display());
                worst = EXIT_ERRORS;
            } else {
                println!("{}: formatted", path.display());
            }
        }
    }
    ExitCode::from(worst)
}

/// Writes through a temporary file and a rename, so an interrupted run
/// never leaves half a policy behind.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.palisade-fmt.tmp"));
    let perms = std::fs::metadata(path)?.permissions();
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, perms)?;
    std::fs::rename(&tmp, path)
}
