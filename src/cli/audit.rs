//! `palisade audit ...`: key generation and the auditor's commands over a
//! trail directory. Exit codes: 0 success (for `verify`: the trail is whole
//! and sealed); 1 `verify` found damage, or `query`, `summary` or `export`
//! skipped lines they could not read (named on stderr); 2 the command could not do its job
//! (bad arguments, unreadable directory or key); 3 `verify`: every link and
//! signature holds but the trail does not end with a `stop` checkpoint (a
//! running or crashed writer, or records cut off the end).

use clap::{Args, Subcommand, ValueEnum};
use ipnet::IpNet;
use palisade::audit::keys::{CheckpointVerifier, KeyError};
use palisade::audit::query::{
    for_each_record, squid_line, table_row, DomainPattern, Filter, Summary, TABLE_HEADER,
};
use palisade::audit::verify::verify_trail_from;
use palisade::audit::{
    generate_key_pair, Action, AuditConfig, AuditError, AuditEvent, AuditLog, Ticket, Timestamp,
};
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Write a new checkpoint signing key and its verifying key.
    Keygen {
        /// Directory for the two files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// File name stem: writes NAME.key (secret, mode 0600) and NAME.pub.
        #[arg(long, default_value = "audit")]
        name: String,
    },
    /// Check the whole trail: chain links, signatures, sequence, rotation.
    #[command(
        after_help = "Exit status: 0 whole and sealed by a stop checkpoint; 1 not whole (each problem \
is listed with file:line); 2 could not verify (bad key, unreadable or empty directory); 3 intact but \
open: no stop checkpoint at the end (writer running or crashed, or records cut off the end)."
    )]
    Verify {
        /// The verifying key (NAME.pub from keygen); give it again for each
        /// key the trail was signed with (after a key was replaced).
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        /// Start at this file (audit-NNNNNNNN.jsonl): the files before it
        /// were archived, and are verified with the archive.
        #[arg(long)]
        from: Option<String>,
        /// The trail's directory (audit.dir).
        dir: PathBuf,
    },
    /// Print the records that match every filter given.
    Query {
        /// The trail's directory (audit.dir).
        dir: PathBuf,
        #[command(flatten)]
        window: Window,
        /// allowed, denied, or a lifecycle action (start, gap, ...).
        #[arg(long)]
        action: Option<String>,
        /// Client address range, e.g. 10.0.1.0/24.
        #[arg(long)]
        source: Option<String>,
        /// Destination address range, e.g. 203.0.113.0/24: the filter's
        /// flows and drops, and the address the proxy sent a request or
        /// tunnel to.
        #[arg(long)]
        destination: Option<String>,
        /// Destination host: example.com or *.example.com.
        #[arg(long)]
        domain: Option<String>,
        /// Name of the deciding rule.
        #[arg(long)]
        rule: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Top denied destinations, top clients, rule hits, bytes by destination.
    Summary {
        /// The trail's directory (audit.dir).
        dir: PathBuf,
        #[command(flatten)]
        window: Window,
        /// How many entries each top list shows.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Write proxy records in another tool's log format.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// The trail's directory (audit.dir).
        dir: PathBuf,
        #[command(flatten)]
        window: Window,
    },
    /// Load generator for crash tests: writes records and prints
    /// `durable SEQ MARKER` once each is on disk.
    #[command(hide = true)]
    Stress {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        #[arg(long, default_value_t = 4)]
        producers: u64,
        #[arg(long, default_value = "1MiB")]
        rotate_size: String,
    },
}

#[derive(Args)]
pub struct Window {
    /// Only records at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    since: Option<String>,
    /// Only records before this time.
    #[arg(long)]
    until: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Json,
    Table,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Squid,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot read the trail in {dir}: {source}")]
    Trail {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Argument(String),
    #[error("{dir} holds no audit files (audit-NNNNNNNN.jsonl); is this the audit directory?")]
    Empty { dir: PathBuf },
}

pub fn run(cmd: AuditCommand) -> ExitCode {
    match dispatch(cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cmd: AuditCommand) -> Result<ExitCode, CliError> {
    match cmd {
        AuditCommand::Keygen { out, name } => {
            std::fs::create_dir_all(&out)
                .map_err(|e| CliError::Argument(format!("--out {}: {e}", out.display())))?;
            let (s, v) = (
                out.join(format!("{name}.key")),
                out.join(format!("{name}.pub")),
            );
            let id = generate_key_pair(&s, &v)?;
            println!(
                "signing key:   {} (keep on the appliance; set audit.signing_key to it)",
                s.display()
            );
            println!(
                "verifying key: {} (give to auditors; keep it off the appliance)",
                v.display()
            );
            println!("key id:        {id}");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { key, from, dir } => {
            let from = match from {
                None => 1,
                Some(f) => {
                    let name = Path::new(&f)
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or(&f)
                        .to_string();
                    palisade::audit::trail::parse_file_name(&name).ok_or_else(|| {
                        CliError::Argument(format!(
                            "--from {f:?}: name a trail file, e.g. audit-00000042.jsonl"
                        ))
                    })?
                }
            };
            verify(&key, &dir, from)
        }
        AuditCommand::Query {
            dir,
            window,
            action,
            source,
            destination,
            domain,
            rule,
            format,
        } => {
            let mut filter = window.filter()?;
            filter.action = action
                .map(|a| {
                    Action::parse(&a).ok_or_else(|| {
                        CliError::Argument(format!(
                            "--action {a:?}: use allowed, denied, start, stop, policy-loaded, reload-failed, rotation, gap, checkpoint, log-failed or log-recovered"
                        ))
                    })
                })
                .transpose()?;
            let net = |flag: &str, s: Option<String>| {
                s.map(|s| {
                    parse_net(&s).ok_or_else(|| {
                        CliError::Argument(format!(
                            "--{flag} {s:?}: not an address or CIDR range (e.g. 10.0.1.0/24)"
                        ))
                    })
                })
                .transpose()
            };
            filter.source = net("source", source)?;
            filter.destination = net("destination", destination)?;
            filter.domain = domain
                .map(|d| {
                    DomainPattern::parse(&d)
                        .map_err(|e| CliError::Argument(format!("--domain: {e}")))
                })
                .transpose()?;
            filter.rule = rule;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            if matches!(format, Format::Table) {
                let _ = writeln!(out, "{TABLE_HEADER}");
            }
            let bad = read(&dir, |line, r| {
                if filter.matches(r) {
                    let _ = match format {
                        Format::Json => out.write_all(line).and_then(|()| out.write_all(b"\n")),
                        Format::Table => writeln!(out, "{}", table_row(r)),
                    };
                }
            })?;
            let _ = out.flush();
            Ok(warn_unreadable(&bad))
        }
        AuditCommand::Summary { dir, window, top } => {
            let filter = window.filter()?;
            let mut summary = Summary::default();
            let bad = read(&dir, |_, r| {
                if filter.in_window(r) {
                    summary.add(r);
                }
            })?;
            print!("{}", summary.render(top));
            Ok(warn_unreadable(&bad))
        }
        AuditCommand::Export {
            format: ExportFormat::Squid,
            dir,
            window,
        } => {
            let filter = window.filter()?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let bad = read(&dir, |_, r| {
                if filter.in_window(r) {
                    if let Some(l) = squid_line(r) {
                        let _ = writeln!(out, "{l}");
                    }
                }
            })?;
            let _ = out.flush();
            Ok(warn_unreadable(&bad))
        }
        AuditCommand::Stress {
            dir,
            key,
            records,
            producers,
            rotate_size,
        } => stress(dir, key, records, producers, &rotate_size),
    }
}

impl Window {
    fn filter(&self) -> Result<Filter, CliError> {
        let parse = |flag: &str, v: &Option<String>| {
            v.as_ref()
                .map(|s| {
                    Timestamp::parse(s).ok_or_else(|| {
                        CliError::Argument(format!("--{flag} {s:?}: write a time as 2026-11-25T11:00:00Z or a date as 2026-11-25"))
                    })
                })
                .transpose()
        };
        // `--until 2026-11-25` takes that whole day in, as it reads: a
        // date alone ends at the next midnight (`until` is exclusive).
        let mut until = parse("until", &self.until)?;
        if let (Some(t), Some(s)) = (until.as_mut(), &self.until) {
            if s.trim().len() == 10 {
                t.0 += 86_400_000_000;
            }
        }
        Ok(Filter {
            since: parse("since", &self.since)?,
            until,
            ..Filter::default()
        })
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn read(
    dir: &Path,
    each: impl FnMut(&[u8], &palisade::audit::AuditRecord),
) -> Result<Vec<palisade::audit::query::Unreadable>, CliError> {
    let trail_err = |source| CliError::Trail {
        dir: dir.to_path_buf(),
        source,
    };
    if palisade::audit::trail::list_files(dir)
        .map_err(trail_err)?
        .is_empty()
    {
        return Err(CliError::Empty {
            dir: dir.to_path_buf(),
        });
    }
    for_each_record(dir, each).map_err(trail_err)
}

/// Names the lines a reading command skipped. A damaged record leaves the
/// output incomplete, which a script must be able to tell: exit 1. The
/// incomplete last line a crash leaves (kept, and declared by the next
/// start) is named but is not damage.
fn warn_unreadable(bad: &[palisade::audit::query::Unreadable]) -> ExitCode {
    for b in bad {
        eprintln!(
            "warning: {}:{}: skipped, not a record ({}); run `palisade audit verify`",
            b.file, b.line, b.why
        );
    }
    let damaged = bad.iter().filter(|b| !b.incomplete).count();
    if damaged == 0 {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "warning: {damaged} line(s) of the trail could not be read; the output covers the rest"
    );
    ExitCode::from(1)
}

fn verify(keys: &[PathBuf], dir: &Path, from: u64) -> Result<ExitCode, CliError> {
    let verifiers = keys
        .iter()
        .map(|k| CheckpointVerifier::load(k))
        .collect::<Result<Vec<_>, _>>()?;
    let report = verify_trail_from(dir, &verifiers, from).map_err(|source| CliError::Trail {
        dir: dir.to_path_buf(),
        source,
    })?;
    if report.files == 0 {
        let last = palisade::audit::trail::list_files(dir)
            .ok()
            .and_then(|f| f.last().map(|(i, _)| *i));
        return Err(match last {
            Some(last) if from > 1 => CliError::Argument(format!(
                "{} holds no audit files from {} on: its newest is {}",
                dir.display(),
                palisade::audit::trail::file_name(from),
                palisade::audit::trail::file_name(last)
            )),
            _ => CliError::Empty {
                dir: dir.to_path_buf(),
            },
        });
    }
    // No checkpoint verifies, every signed one names another key, and the
    // chain itself is unbroken: the key given is not this trail's, which
    // says nothing about the trail. Anything else found is reported (the
    // chain needs no key), so that a key id edited in every checkpoint
    // does not hide an edit behind "wrong key".
    let wrong_key: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.kind == palisade::audit::verify::FindingKind::WrongKey)
        .map(|f| f.message.as_str())
        .collect();
    if report.checkpoints_verified == 0
        && !wrong_key.is_empty()
        && report
            .findings
            .iter()
            .all(|f| f.kind == palisade::audit::verify::FindingKind::WrongKey)
    {
        eprintln!(
            "error: could not verify {}: no key given is one that signed this trail ({} checkpoint(s); the first: {})",
            dir.display(),
            wrong_key.len(),
            wrong_key[0]
        );
        return Ok(ExitCode::from(2));
    }
    for f in &report.findings {
        println!("{f}");
    }
    let span = match (&report.first_timestamp, &report.last_timestamp) {
        (Some(a), Some(b)) => format!(", {a} .. {b}"),
        _ => String::new(),
    };
    let kept = if from > 1 {
        format!(
            " from {} on (earlier files archived: verify them with the archive)",
            palisade::audit::trail::file_name(from)
        )
    } else {
        String::new()
    };
    // Only the keys that verified a checkpoint are named as having done
    // so: an auditor compares them with the ones on record.
    let unused: Vec<&str> = verifiers
        .iter()
        .map(|v| v.key_id())
        .filter(|id| !report.keys_used.iter().any(|u| u == id))
        .collect();
    let used = match report.keys_used.as_slice() {
        [] => "no key".to_string(),
        ids => format!("key {}", ids.join(", ")),
    };
    let unused = match unused.as_slice() {
        [] => String::new(),
        ids => format!(" (key {} given, but signed none of them)", ids.join(", ")),
    };
    let scope = format!(
        "{} files{kept}, {} records, {} boots, {} checkpoints verified with {used}{unused}{span}",
        report.files, report.records, report.boots, report.checkpoints_verified
    );
    // Not tampering, but an auditor must know records may be missing
    // there: a crash loses what was not yet written.
    for u in &report.unclean_ends {
        println!("note: {u}: records it had not yet written are not in the trail");
    }
    if let Some(t) = &report.torn_end {
        println!("note: {t}");
    }
    if !report.is_whole() {
        println!(
            "NOT WHOLE: {} problem(s) found in {scope}",
            report.findings.len()
        );
        return Ok(ExitCode::from(1));
    }
    if !report.sealed {
        let unsigned = if report.unsigned_tail == 0 {
            "every record is covered by a signed checkpoint".to_string()
        } else {
            format!(
                "the last {} record(s) follow the last signed checkpoint, and only the chain vouches for them",
                report.unsigned_tail
            )
        };
        let ending = if report.stopped_unsealed {
            "the trail's stop record is not followed by its signed stop checkpoint \
             (the writer was cut off while sealing it, or the checkpoint was cut off the end)"
        } else {
            "the trail has no stop record \
             (the writer is running or crashed, or records were cut off the end)"
        };
        println!("INTACT BUT OPEN: {scope}; {unsigned}; {ending}");
        return Ok(ExitCode::from(3));
    }
    println!("WHOLE: {scope}");
    Ok(ExitCode::SUCCESS)
}

fn stress(
    dir: PathBuf,
    key: PathBuf,
    records: u64,
    producers: u64,
    rotate_size: &str,
) -> Result<ExitCode, CliError> {
    let config = AuditConfig {
        dir,
        signing_key: Some(key),
        rotate_size: palisade::audit::config::parse_size(rotate_size)
            .map_err(CliError::Argument)?,
        ..AuditConfig::default()
    };
    let log = AuditLog::open(&config)?;
    println!("boot {}", log.boot_id());
    let producers = producers.max(1);
    let threads: Vec<_> = (0..producers)
        .map(|p| {
            let log = log.clone();
            std::thread::spawn(move || {
                let client = std::net::SocketAddr::from(([192, 0, 2, (p % 250) as u8 + 1], 40000));
                let mut in_flight: VecDeque<(String, Ticket)> = VecDeque::new();
                let done = |marker: String, t: Ticket| match t.wait() {
                    Ok(r) => println!("durable {} {marker}", r.seq),
                    Err(e) => eprintln!("not durable {marker}: {e}"),
                };
                for i in (p..records).step_by(producers as usize) {
                    let marker = format!("stress://p{p}/{i}");
                    let ev = AuditEvent::proxy_request(Action::Allowed, client, "GET", &marker)
                        .with_status(200);
                    match log.submit(&ev) {
                        Ok(t) => in_flight.push_back((marker, t)),
                        Err(e) => eprintln!("refused {marker}: {e}"),
                    }
                    if in_flight.len() >= 256 {
                        if let Some((m, t)) = in_flight.pop_front() {
                            done(m, t);
                        }
                    }
                }
                for (m, t) in in_flight {
                    done(m, t);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    log.close()?;
    Ok(ExitCode::SUCCESS)
}
