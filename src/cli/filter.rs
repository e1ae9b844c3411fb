//! `palisade filter`: the inline filter daemon.

use super::proxy::open_audit;
use clap::Args;
use palisade::audit::AuditEvent;
use palisade::config::{Config, PortIo};
use palisade::conntrack::Timeouts;
use palisade::dataplane::{self, port, Engine, EngineConfig};
use palisade::policy::Policy;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct FilterArgs {
    /// The daemon configuration (TOML).
    #[arg(long, default_value = "config/palisade.toml")]
    pub config: PathBuf,
    /// The interface toward the provider edge and the VNet.
    #[arg(long)]
    pub edge: Option<String>,
    /// The interface toward the on-premises routers.
    #[arg(long)]
    pub onprem: Option<String>,
    /// Use this policy file instead of the configured one.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Write the audit trail here instead of the configured directory.
    #[arg(long)]
    pub audit_dir: Option<PathBuf>,
}

/// Queues `event`; one the trail cannot take (counted as lost there, and
/// shown as a gap) is also told to the operator.
async fn record_or_say(audit: &palisade::audit::AuditLog, event: &AuditEvent, what: &str) {
    if let Err(e) = audit.submit_async(event).await {
        palisade::say!("palisade filter: the {what}'s audit record was not written: {e}");
    }
}

fn load(path: &Path) -> Result<Policy, String> {
    let c = super::policy::load_for_enforcement(path)?;
    let z = c.policy.zones();
    if z.edge.is_none() || z.onprem.is_none() {
        return Err(format!(
            "error: {}: the filter needs both `zone edge = ...` and `zone onprem = ...` (the addresses that may appear on each port)",
            path.display()
        ));
    }
    Ok(c.policy)
}

pub fn run(args: FilterArgs) -> ExitCode {
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            palisade::say!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(e) = args.edge {
        config.filter.edge = e;
    }
    if let Some(o) = args.onprem {
        config.filter.onprem = o;
    }
    if let Some(p) = args.policy {
        config.policy = p;
    }
    if let Some(d) = args.audit_dir {
        config.audit.dir = d;
    }
    let f = config.filter.clone();
    if f.edge.is_empty() || f.onprem.is_empty() || f.edge == f.onprem {
        palisade::say!("error: the filter needs two different ports: --edge IFACE and --onprem IFACE (or filter.edge and filter.onprem)");
        return ExitCode::from(2);
    }
    let policy = match load(&config.policy) {
        Ok(p) => p,
        Err(e) => {
            // Whole messages, as the proxy prints them: compile
            // diagnostics begin `error[E....]`.
            palisade::say!("{}", e.trim_end());
            return ExitCode::from(2);
        }
    };
    type Port = (Box<dyn port::TxPort>, Box<dyn port::RxPort>);
    // With batched ports, each port's socket is kept aside for the fast
    // path's socket filter.
    let mut sockets = Vec::new();
    let mut open = |name: &str| -> std::io::Result<Port> {
        Ok(match f.io {
            PortIo::Batched => {
                let (tx, rx) = port::open_batched(name)?;
                sockets.push(rx.socket().try_clone_to_owned()?);
                (Box::new(tx), Box::new(rx))
            }
            PortIo::Pnet => {
                let (tx, rx) = port::open_pnet(name)?;
                (Box::new(tx), Box::new(rx))
            }
        })
    };
    // What an operator needs to know to fix a port that does not open.
    let port_error = |name: &str, e: &std::io::Error| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                ": the filter needs CAP_NET_RAW and CAP_NET_ADMIN (and CAP_BPF for the kernel fast path), or root"
            }
            _ => "",
        };
        palisade::say!("error: port {name}: {e}{hint}");
    };
    let (edge, onprem) = match (open(&f.edge), open(&f.onprem)) {
        (Ok(e), Ok(o)) => (e, o),
        (Err(e), _) => {
            port_error(&f.edge, &e);
            return ExitCode::from(2);
        }
        (_, Err(e)) => {
            port_error(&f.onprem, &e);
            return ExitCode::from(2);
        }
    };
    // Both ports are claimed (once opened: a filter without its
    // capabilities hears about those first), and held until the filter
    // exits; a second filter stops here, before it forwards a frame.
    let _claims = match (port::claim(&f.edge), port::claim(&f.onprem)) {
        (Ok(e), Ok(o)) => (e, o),
        (Err(e), _) => {
            palisade::say!("error: port {}: {e}", f.edge);
            return ExitCode::from(2);
        }
        (_, Err(e)) => {
            palisade::say!("error: port {}: {e}", f.onprem);
            return ExitCode::from(2);
        }
    };
    for name in [&f.edge, &f.onprem] {
        if port::is_up(name) == Some(false) {
            palisade::say!(
                "palisade filter: warning: port {name} is down: nothing passes on it until it is up (`ip link set {name} up`)"
            );
        }
    }
    let audit = match open_audit(&config) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let sha = policy.sha256().to_string();
    if let Err(e) = audit.submit(&AuditEvent::policy_loaded(&sha, "start")) {
        palisade::say!("palisade filter: the start's policy-loaded record was not written: {e}");
    }
    let timeouts = Timeouts {
        tcp_established: f.tcp_established_timeout,
        udp_replied: f.udp_timeout,
        ..Timeouts::default()
    };
    let mut engine = Engine::new(
        policy,
        audit.clone(),
        EngineConfig {
            conntrack_size: f.conntrack_size,
            timeouts,
            new_flows_per_second_per_source: f.new_flows_per_second_per_source,
            new_flow_burst_per_source: f.new_flow_burst_per_source,
            allow_ethertypes: f.allow_ethertypes.clone(),
        },
    );
    let fast_path = if !f.fast_path {
        "off".to_string()
    } else if f.io != PortIo::Batched {
        "off (it needs batched ports)".to_string()
    } else {
        match open_fast_path(&f.edge, &f.onprem, &sockets, f.conntrack_size) {
            Ok((path, edge, onprem)) => {
                engine.set_fast_path(path, edge, onprem);
                "on".to_string()
            }
            Err(e) => {
                palisade::say!("palisade filter: warning: the kernel fast path is off, every frame crosses through palisade: {e}");
                format!("off ({e})")
            }
        }
    };
    drop(sockets);
    let engine = Arc::new(engine);
    let stop = Arc::new(AtomicBool::new(false));
    // Signals: SIGHUP reloads, SIGUSR1 prints the counters, SIGTERM/SIGINT stop.
    let (e2, s2, a2, policy_path) = (
        engine.clone(),
        stop.clone(),
        audit.clone(),
        config.policy.clone(),
    );
    // The signal handlers are in place before the filter says it runs: a
    // stop sent as soon as it does must seal the trail, not find the
    // default action.
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
    let signals = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let handlers = (
                signal(SignalKind::hangup()),
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::user_defined1()),
            );
            let _ = ready_tx.send(());
            let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut usr1)) = handlers else {
                return;
            };
            // Rules that expire while the filter runs stop matching the day
            // after their date (UTC), as if the policy had been reloaded.
            let expiry = tokio::time::sleep(palisade::policy::Date::until_expiry_check());
            tokio::pin!(expiry);
            loop {
                tokio::select! {
                    _ = &mut expiry => {
                        expiry.as_mut().reset(
                            tokio::time::Instant::now() + palisade::policy::Date::until_expiry_check(),
                        );
                        if let Some((p, why)) = e2.policy().expired_today() {
                            let sha = p.sha256().to_string();
                            e2.set_policy(p);
                            record_or_say(&a2, &AuditEvent::policy_loaded(&sha, &why), "expiry").await;
                            palisade::say!("palisade filter: policy in force {why}");
                        }
                    }
                    _ = hup.recv() => {
                        let in_force = e2.policy().sha256().to_string();
                        match load(&policy_path) {
                            Ok(p) => {
                                let sha = p.sha256().to_string();
                                e2.set_policy(p);
                                record_or_say(&a2, &AuditEvent::policy_loaded(&sha, "reload"), "reload").await;
                                palisade::say!("palisade filter: reloaded policy (sha256 {sha})");
                            }
                            Err(e) => {
                                record_or_say(&a2, &AuditEvent::reload_failed(&e, Some(&in_force)), "failed reload").await;
                                palisade::say!("palisade filter: reload failed, the previous policy stays in force:\n{e}");
                            }
                        }
                    }
                    _ = usr1.recv() => print_counters(&e2, ""),
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
            }
            s2.store(true, Ordering::Relaxed);
        });
    });
    let _ = ready.recv_timeout(std::time::Duration::from_secs(10));
    palisade::say!(
        "palisade filter: forwarding between {} (edge) and {} (onprem) ({} ports, kernel fast path {fast_path}); policy {}; audit trail in {}",
        f.edge,
        f.onprem,
        match f.io {
            PortIo::Batched => "batched",
            PortIo::Pnet => "pnet",
        },
        config.policy.display(),
        config.audit.dir.display()
    );
    let result = dataplane::run(engine.clone(), edge, onprem, stop.clone());
    stop.store(true, Ordering::Relaxed);
    drop(signals);
    print_counters(&engine, "stopping; ");
    let closed = audit.close();
    match (result, closed) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(e), _) => {
            palisade::say!("error: forwarding stopped: {e}");
            ExitCode::from(1)
        }
        (_, Err(e)) => {
            palisade::say!("error: closing the audit trail: {e}");
            ExitCode::from(1)
        }
    }
}

/// Loads the kernel fast path and attaches it: its socket filter to both
/// port sockets first (so no frame is seen twice), then its ingress program
/// to both ports. Room for every tracked flow, both directions.
fn open_fast_path(
    edge: &str,
    onprem: &str,
    sockets: &[std::os::fd::OwnedFd],
    conntrack_size: usize,
) -> std::io::Result<(dataplane::offload::FastPath, u32, u32)> {
    use std::os::fd::AsFd;
    let entries = (conntrack_size.saturating_mul(2)).min(1 << 22) as u32;
    let mut path = dataplane::offload::FastPath::load(entries)?;
    for s in sockets {
        path.attach_socket(s.as_fd())?;
    }
    let (e, o) = (port::ifindex(edge)?, port::ifindex(onprem)?);
    path.attach_port(e)?;
    path.attach_port(o)?;
    Ok((path, e, o))
}

/// Prints the counters: frames forwarded and dropped per reason, flows
/// tracked, flows admitted per rule. At stop and on SIGUSR1.
fn print_counters(engine: &Engine, when: &str) {
    let c = &engine.counters;
    let dropped: Vec<String> = palisade::dataplane::DropReason::ALL
        .iter()
        .map(|r| (r, c.dropped(*r)))
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{n} {}", r.as_str()))
        .collect();
    palisade::say!(
        "palisade filter: {when}forwarded {} frames ({} not taken by the other port), dropped: {}; {} flows tracked, {} in the kernel fast path ({} offloaded in all, {} refused); {} fragments held for their first fragment",
        c.forwarded.load(Ordering::Relaxed),
        c.tx_errors.load(Ordering::Relaxed),
        if dropped.is_empty() { "none".to_string() } else { dropped.join(", ") },
        engine.conntrack_len(),
        c.offloaded_now.load(Ordering::Relaxed),
        c.offloaded.load(Ordering::Relaxed),
        c.offload_errors.load(Ordering::Relaxed),
        c.held.load(Ordering::Relaxed),
    );
    if let Some((frames, bytes)) = engine.fast_path_totals() {
        palisade::say!(
            "palisade filter: the kernel fast path forwarded {frames} frames ({bytes} bytes)"
        );
    }
    if let Ok(hits) = c.rule_hits.lock() {
        // Under the counts' lock, the policy in force numbers them.
        let policy = engine.policy();
        let per_rule: Vec<String> = hits
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| {
                let name = if i < policy.rules().len() {
                    policy.rule_name(Some(i as u32))
                } else {
                    "default"
                };
                format!("{name} {n}")
            })
            .collect();
        palisade::say!(
            "palisade filter: flows admitted per rule: {}",
            if per_rule.is_empty() {
                "none".to_string()
            } else {
                per_rule.join(", ")
            }
        );
    }
}
