//! Argument parsing and dispatch for the `palisade` binary. Each command
//! group lives in its own file here; the library does the work.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "palisade", version, about = "Egress-control appliance: one policy, compiled, enforced at two points, audited")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
}
