//! The policy-analysis commands: `lint`, `diff`, `export`.

use super::policy::{load_one, parse_date, plural, EXIT_ERRORS, EXIT_OK, EXIT_WARNINGS};
use clap::{Args, Subcommand};
use palisade::policy::analysis::{diff_http, diff_packets, diff_zones, EDITED_MAX};
use palisade::policy::lint::{lint as run_lint, LintOptions};
use palisade::policy::{export, Date};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct LintArgs {
    /// Policy files, or directories whose *.policy files are each a policy.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Warn about rules that expire within this window (`30d`, `2w`, or days).
    #[arg(long, default_value = "30d", value_parser = parse_days)]
    pub warn_expiring: u32,
    /// Judge rule expiry as of this date (YYYY-MM-DD) instead of today.
    #[arg(long, value_parser = parse_date)]
    pub today: Option<Date>,
    /// One JSON object per finding on stdout, a line each, for tools (CI
    /// annotations, review bots) instead of the text for people.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DiffArgs {
    /// The policy before the change (root file).
    pub old: PathBuf,
    /// The policy after the change (root file).
    pub new: PathBuf,
    /// Judge rule expiry as of this date (YYYY-MM-DD) instead of today.
    #[arg(long, value_parser = parse_date)]
    pub today: Option<Date>,
    /// One JSON object per change, a line each, for tools (review bots,
    /// CI checks) instead of the text for people.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ExportCommand {
    /// An nftables ruleset (`table inet palisade`) enforcing the packet policy.
    Nft {
        /// The policy's root file.
        path: PathBuf,
        /// The interface toward the provider edge and the VNet: packets
        /// arriving on it must have a source in `zone edge`.
        #[arg(long, value_name = "IFACE", requires = "onprem")]
        edge: Option<String>,
        /// The interface toward the on-premises routers: packets arriving
        /// on it must have a source in `zone onprem`.
        #[arg(long, value_name = "IFACE", requires = "edge")]
        onprem: Option<String>,
        /// Judge rule expiry as of this date (YYYY-MM-DD) instead of today.
        #[arg(long, value_parser = parse_date)]
        today: Option<Date>,
    },
}

fn parse_days(s: &str) -> Result<u32, String> {
    let bad = || format!("`{s}` is not a duration such as `30d` or `2w`");
    let (num, mult) = if let Some(n) = s.strip_suffix('d') {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('w') {
        (n, 7)
    } else {
        (s, 1)
    };
    num.parse::<u32>()
        .map_err(|_| bad())?
        .checked_mul(mult)
        .ok_or_else(bad)
}

pub fn lint(args: LintArgs) -> ExitCode {
    let roots = match super::policy::roots(&args.paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    let mut worst = EXIT_OK;
    for root in &roots {
        // An expired rule is lint's L0103; the compiler's W0311 would say
        // it twice.
        const SKIP: &[&str] = &["W0311"];
        let loaded = if args.json {
            // The compiler's own diagnostics as JSON too.
            let loaded = super::policy::load_except(root, args.today, SKIP);
            let (said, sources) = match &loaded {
                Ok(c) => (&c.diagnostics, &c.sources),
                Err(f) => (&f.diagnostics, &f.sources),
            };
            for d in &said.items {
                println!("{}", d.to_json(sources));
            }
            loaded.ok()
        } else {
            super::policy::load_one_except(root, args.today, SKIP)
        };
        let Some(c) = loaded else {
            if !args.json {
                println!("{}: failed to compile", root.display());
            }
            worst = EXIT_ERRORS;
            continue;
        };
        let findings = run_lint(
            &c,
            LintOptions {
                today: args.today.unwrap_or_else(Date::today),
                warn_expiring_days: args.warn_expiring,
            },
        );
        if args.json {
            for d in &findings.items {
                println!("{}", d.to_json(&c.sources));
            }
        } else {
            eprint!("{}", findings.render(&c.sources));
            println!(
                "{}: {}",
                root.display(),
                plural(findings.items.len(), "finding", "findings")
            );
        }
        if !findings.is_empty() {
            worst = worst.max(EXIT_WARNINGS);
        }
    }
    ExitCode::from(worst)
}

pub fn diff(args: DiffArgs) -> ExitCode {
    let (Some(old), Some(new)) = (
        load_one(&args.old, args.today),
        load_one(&args.new, args.today),
    ) else {
        return ExitCode::from(EXIT_ERRORS);
    };
    let (old, new) = (&old.policy, &new.policy);
    let packets = match diff_packets(old, new) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: packet rules: {e}");
            eprintln!(
                "help: split the change into smaller steps and diff each: a change too \
                 fragmented to list is described rule by rule only when it touches at most \
                 {EDITED_MAX} rules and that description stays within the same bounds"
            );
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    let http = match diff_http(old, new) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: http rules: {e}");
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    let zones = diff_zones(old, new);
    let differ = !(packets.is_empty() && http.is_empty() && zones.is_empty());
    if args.json {
        return match diff_json(&packets, &http, &zones) {
            Ok(()) if differ => ExitCode::from(1),
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(EXIT_ERRORS),
        };
    }
    use palisade::policy::Verdict::{Allow, Deny};
    for (title, want) in [("newly allowed", Allow), ("newly denied", Deny)] {
        let p: Vec<_> = packets.iter().filter(|c| c.new_verdict == want).collect();
        let h: Vec<_> = http.iter().filter(|c| c.new_verdict == want).collect();
        println!(
            "{title}: {}, {}",
            plural(p.len(), "packet region", "packet regions"),
            plural(h.len(), "http class", "http classes")
        );
        let sign = if want == Allow { '+' } else { '-' };
        for c in p {
            println!("  {sign} {c}");
        }
        for c in h {
            let ports = if c.ports == "any" {
                "any port".to_string()
            } else {
                format!("port {}", c.ports)
            };
            println!(
                "  {sign} http {} -> {} {ports} {}   now {} by `{}`, was {} by `{}`",
                c.sources,
                c.host,
                c.method,
                c.new_verdict.as_str(),
                c.new_rule,
                c.old_verdict.as_str(),
                c.old_rule
            );
        }
    }
    if !zones.is_empty() {
        println!(
            "zones (sources each appliance port accepts; others are dropped as spoofed): {}",
            plural(zones.len(), "change", "changes")
        );
        for z in &zones {
            if let Some(a) = &z.accepted {
                println!("  + zone {}: now accepts {a}", z.zone);
            }
            if let Some(r) = &z.refused {
                println!("  - zone {}: now drops {r}", z.zone);
            }
        }
    }
    if differ {
        ExitCode::from(1)
    } else {
        println!("the two policies decide every flow and request the same way");
        ExitCode::SUCCESS
    }
}

/// `diff --json`: a line per change, packet regions first, then proxy
/// request classes, then zones. Each traffic change says whether it is
/// newly allowed or denied, the region or class, and both sides' verdict
/// and deciding rules (`more`: other rules may decide a part too).
fn diff_json(
    packets: &[palisade::policy::analysis::Change],
    http: &[palisade::policy::analysis::HttpChange],
    zones: &[palisade::policy::analysis::ZoneChange],
) -> std::io::Result<()> {
    use palisade::policy::Verdict;
    use serde_json::json;
    use std::io::Write;
    let change = |v: Verdict| match v {
        Verdict::Allow => "newly_allowed",
        Verdict::Deny => "newly_denied",
    };
    let side = |v: Verdict, rules: &[String], more: bool| json!({ "verdict": v, "rules": rules, "more": more });
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for c in packets {
        let line = json!({
            "kind": "packet",
            "change": change(c.new_verdict),
            "region": c.region,
            "old": side(c.old_verdict, &c.old_rules.names, c.old_rules.more),
            "new": side(c.new_verdict, &c.new_rules.names, c.new_rules.more),
        });
        writeln!(out, "{line}")?;
    }
    for c in http {
        let line = json!({
            "kind": "http",
            "change": change(c.new_verdict),
            "sources": c.sources,
            "host": c.host,
            "ports": c.ports,
            "method": c.method,
            "old": side(c.old_verdict, std::slice::from_ref(&c.old_rule), false),
            "new": side(c.new_verdict, std::slice::from_ref(&c.new_rule), false),
        });
        writeln!(out, "{line}")?;
    }
    for z in zones {
        let line = json!({
            "kind": "zone",
            "zone": z.zone,
            "accepts": z.accepted,
            "drops": z.refused,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()
}

pub fn export(cmd: ExportCommand) -> ExitCode {
    match cmd {
        ExportCommand::Nft {
            path,
            edge,
            onprem,
            today,
        } => {
            let Some(c) = load_one(&path, today) else {
                return ExitCode::from(EXIT_ERRORS);
            };
            let ports = edge
                .zip(onprem)
                .map(|(edge, onprem)| export::NftPorts { edge, onprem });
            match export::nft(&c.policy, ports.as_ref()) {
                Ok(e) => {
                    for w in &e.warnings {
                        eprintln!("warning: {}: {w}", path.display());
                    }
                    print!("{}", e.text);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", path.display());
                    ExitCode::from(EXIT_ERRORS)
                }
            }
        }
    }
}

#[derive(Subcommand)]
pub enum ImportCommand {
    /// A ClassBench rule file as a policy, one rule per line in order.
    Classbench {
        /// The ClassBench rule file.
        file: PathBuf,
    },
    /// Azure NSG security rules (an ARM template or `az network nsg rule
    /// list` output) as a policy.
    Nsg {
        /// The JSON file.
        file: PathBuf,
        /// A JSON object mapping service tags to prefixes, e.g.
        /// {"VirtualNetwork": ["10.0.0.0/16"]}.
        #[arg(long)]
        service_tags: Option<PathBuf>,
        /// Which rules to translate (an NSG judges each direction on its
        /// own); needed when the file holds both.
        #[arg(long, value_parser = ["inbound", "outbound"])]
        direction: Option<String>,
    },
}

fn read_text(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
}

pub fn import(cmd: ImportCommand) -> ExitCode {
    let result = match cmd {
        ImportCommand::Classbench { file } => read_text(&file).and_then(|t| {
            palisade::policy::import::classbench(&t)
                .map_err(|e| e.in_file(&file.display().to_string()))
        }),
        ImportCommand::Nsg {
            file,
            service_tags,
            direction,
        } => (|| {
            use palisade::policy::import::{nsg, parse_tag_mapping, Direction};
            let tags = match service_tags {
                Some(p) => parse_tag_mapping(&read_text(&p)?)
                    .map_err(|e| format!("{}: {e}", p.display()))?,
                None => Default::default(),
            };
            let direction = direction.map(|d| match d.as_str() {
                "inbound" => Direction::Inbound,
                _ => Direction::Outbound,
            });
            let imported = nsg(&read_text(&file)?, &tags, direction)
                .map_err(|e| e.in_file(&file.display().to_string()))?;
            for w in &imported.warnings {
                eprintln!("warning: {}: {w}", file.display());
            }
            Ok(imported.text)
        })(),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_ERRORS)
        }
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("rules").required(true).args(["policy", "classbench"])))]
pub struct ClassifyArgs {
    /// The policy's root file.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// A ClassBench rule file, used directly as the rule set.
    #[arg(long)]
    pub classbench: Option<PathBuf>,
    /// ClassBench trace: `src dst sport dport proto ...` per line.
    #[arg(long)]
    pub trace: PathBuf,
    /// Judge rule expiry as of this date (YYYY-MM-DD) instead of today.
    #[arg(long, value_parser = parse_date)]
    pub today: Option<Date>,
}

/// Classifies every trace line; prints `<index> <allow|deny> <rule>` per
/// packet and, on stderr, the lookup rate measured around the lookups alone.
pub fn classify(args: ClassifyArgs) -> ExitCode {
    use palisade::classify::classbench::{parse_rules, parse_trace};
    use palisade::classify::Classifier;
    use std::io::Write;
    let trace = match read_text(&args.trace)
        .and_then(|t| parse_trace(&t).map_err(|e| format!("{}:{e}", args.trace.display())))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERRORS);
        }
    };
    // The rule set: names and verdicts by rule id, and the classifier.
    let (names, verdicts, default, classifier): (Vec<String>, Vec<&str>, &str, Classifier<u32>) =
        if let Some(path) = &args.classbench {
            let entries = match read_text(path)
                .and_then(|t| parse_rules(&t).map_err(|e| format!("{}:{e}", path.display())))
            {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_ERRORS);
                }
            };
            // Indexed by rule id, which is the rule's line index (blank
            // and comment lines keep their numbers), as `import classbench`
            // names the rules.
            let ids = entries.last().map_or(0, |e| e.rule as usize + 1);
            let mut names = vec![String::new(); ids];
            for e in &entries {
                names[e.rule as usize] = format!("cb{}", e.rule);
            }
            let verdicts = vec!["allow"; ids];
            match Classifier::build(entries) {
                Ok(c) => (names, verdicts, "deny", c),
                Err(e) => {
                    eprintln!("error: cannot build the classifier: {e}");
                    return ExitCode::from(EXIT_ERRORS);
                }
            }
        } else {
            let path = args
                .policy
                .as_ref()
                .expect("clap requires --policy or --classbench");
            let Some(c) = load_one(path, args.today) else {
                return ExitCode::from(EXIT_ERRORS);
            };
            let policy = c.policy;
            let names = policy.rules().iter().map(|r| r.name.clone()).collect();
            let verdicts = policy.rules().iter().map(|r| r.verdict.as_str()).collect();
            let default = policy.default_verdict().as_str();
            (names, verdicts, default, policy.classifier().v4().clone())
        };
    let mut results = vec![None; trace.len()];
    // Batched, as a burst of packets is classified: the same answers as
    // one lookup at a time.
    let start = std::time::Instant::now();
    classifier.lookup_batch(&trace, &mut results);
    let elapsed = start.elapsed();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, r) in results.iter().enumerate() {
        let line = match r {
            Some(id) => writeln!(
                out,
                "{i} {} {}",
                verdicts[*id as usize], names[*id as usize]
            ),
            None => writeln!(out, "{i} {default} default"),
        };
        if line.is_err() {
            return ExitCode::from(EXIT_ERRORS);
        }
    }
    let _ = out.flush();
    let secs = elapsed.as_secs_f64();
    eprintln!(
        "{} lookups in {secs:.6} s ({:.2} Mlookups/s)",
        trace.len(),
        if secs > 0.0 {
            trace.len() as f64 / secs / 1e6
        } else {
            f64::INFINITY
        }
    );
    ExitCode::SUCCESS
}
