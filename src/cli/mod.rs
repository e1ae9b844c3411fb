//! Argument parsing and dispatch for the `palisade` binary. Each command
//! group lives in its own file here; the library does the work.

mod analysis;
mod audit;
mod filter;
mod policy;
mod proxy;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Egress-control appliance: one policy, compiled, enforced at two points, audited"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse, resolve and compile policies, run their expectations, and
    /// print diagnostics and a summary. Exit 0 clean, 1 warnings with
    /// --deny-warnings, 2 errors.
    Check(policy::CheckArgs),
    /// Run only the expectations; report each failure with the rule that
    /// actually decided. Exit 0 all passed, 1 some failed, 2 a policy does
    /// not compile.
    Test(policy::TestArgs),
    /// Show the verdict for a flow or request, the rule that decided it, and
    /// the earlier rules that came close.
    Explain(policy::ExplainArgs),
    /// Rewrite policy files in canonical format (--check for CI).
    Fmt(policy::FmtArgs),
    /// Find shadowed, redundant, never-matching and overly broad rules,
    /// unused names, and rules that expire soon. Exit 1 on findings.
    Lint(analysis::LintArgs),
    /// What a change does to allowed traffic: the flows and requests newly
    /// allowed and newly denied, with the rules responsible. Exit 1 when the
    /// policies differ.
    Diff(analysis::DiffArgs),
    /// Translate the compiled policy into another enforcement language.
    #[command(subcommand)]
    Export(analysis::ExportCommand),
    /// Translate another rule format into the policy language (printed).
    #[command(subcommand)]
    Import(analysis::ImportCommand),
    /// Classify ClassBench trace lines against a policy or a ClassBench rule
    /// set; prints `<index> <allow|deny> <rule>` per packet and the lookup
    /// rate on stderr.
    Classify(analysis::ClassifyArgs),
    /// Run the forced-tunneling HTTP(S) proxy (default config:
    /// config/palisade.toml, listening on 127.0.0.1:3128).
    Proxy(proxy::ProxyArgs),
    /// Run the inline filter between two interfaces (edge and onprem).
    Filter(filter::FilterArgs),
    /// The audit trail: keys, verification, queries, reports.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Proxy(_) | Command::Filter(_)) {
        // One-shot commands die quietly on a closed pipe (`palisade ... |
        // head`), as command-line tools do; the daemons keep ignoring
        // SIGPIPE so a client that hangs up never kills them.
        palisade::sys::default_sigpipe();
    }
    match cli.command {
        Command::Check(a) => policy::check(a),
        Command::Test(a) => policy::test(a),
        Command::Explain(a) => policy::explain(a),
        Command::Fmt(a) => policy::fmt(a),
        Command::Lint(a) => analysis::lint(a),
        Command::Diff(a) => analysis::diff(a),
        Command::Export(c) => analysis::export(c),
        Command::Import(c) => analysis::import(c),
        Command::Classify(a) => analysis::classify(a),
        Command::Audit { command } => audit::run(command),
        Command::Proxy(a) => proxy::run(a),
        Command::Filter(a) => filter::run(a),
    }
}
