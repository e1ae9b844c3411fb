//! The policy-analysis commands: `lint`, `diff`, `export`.

use super::policy::{load_one, parse_date, plural, today, EXIT_ERRORS, EXIT_OK, EXIT_WARNINGS};
use clap::{Args, Subcommand};
use palisade::policy::analysis::{diff_http, diff_packets};
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
}

#[derive(Subcommand)]
pub enum ExportCommand {
    /// An nftables ruleset (`table inet palisade`) enforcing the packet policy.
    Nft {
        /// The policy's root file.
        path: PathBuf,
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
        let Some(c) = load_one(root, args.today) else {
            worst = EXIT_ERRORS;
            continue;
        };
        let findings = run_lint(
            &c,
            LintOptions {
                today: args.today.unwrap_or_else(today),
                warn_expiring_days: args.warn_expiring,
            },
        );
        eprint!("{}", findings.render(&c.sources));
        println!(
            "{}: {}",
            root.display(),
            plural(findings.items.len(), "finding", "findings")
        );
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
            println!(
                "  {sign} {}   now {} by `{}`, was {} by `{}`",
                c.region,
                c.new_verdict.as_str(),
                c.new_rule,
                c.old_verdict.as_str(),
                c.old_rule
            );
        }
        for c in h {
            println!(
                "  {sign} http {} -> {} port {} {}   now {} by `{}`, was {} by `{}`",
                c.sources,
                c.host,
                c.ports,
                c.method,
                c.new_verdict.as_str(),
                c.new_rule,
                c.old_verdict.as_str(),
                c.old_rule
            );
        }
    }
    if packets.is_empty() && http.is_empty() {
        println!("the two policies decide every flow and request the same way");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub fn export(cmd: ExportCommand) -> ExitCode {
    match cmd {
        ExportCommand::Nft { path, today } => {
            let Some(c) = load_one(&path, today) else {
                return ExitCode::from(EXIT_ERRORS);
            };
            print!("{}", export::nft(&c.policy));
            ExitCode::SUCCESS
        }
    }
}
