//! `palisade proxy`: the forced-tunneling proxy daemon.

use clap::Args;
use palisade::audit::{generate_key_pair, AuditLog};
use palisade::config::Config;
use palisade::proxy::{Loaded, Proxy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct ProxyArgs {
    /// The daemon configuration (TOML).
    #[arg(long, default_value = "config/palisade.toml")]
    pub config: PathBuf,
    /// Listen on this address instead of the configured one.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Use this policy file instead of the configured one.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Write the audit trail here instead of the configured directory.
    #[arg(long)]
    pub audit_dir: Option<PathBuf>,
}

/// Applies the command line's overrides to the configuration file's
/// settings (at start and at every reload).
fn with_overrides(mut config: Config, args: &ProxyArgs) -> (Config, Option<String>) {
    if let Some(l) = args.listen {
        config.proxy.listen = l;
    }
    if let Some(p) = &args.policy {
        config.policy = p.clone();
    }
    if let Some(d) = &args.audit_dir {
        config.audit.dir = d.clone();
    }
    let warning = fit_open_file_limit(&mut config.proxy);
    (config, warning)
}

pub fn run(args: ProxyArgs) -> ExitCode {
    let (config, fit_warning) = match Config::load(&args.config) {
        Ok(c) => with_overrides(c, &args),
        Err(e) => {
            palisade::say!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(w) = &fit_warning {
        palisade::say!("{w}");
    }
    // Said again at a reload only when it says something new.
    let fit_said = std::sync::Mutex::new(fit_warning);
    // The policy is compiled before the trail is opened: a start that
    // fails on its policy leaves no boot in the trail.
    let first = match super::policy::load_for_enforcement(&config.policy) {
        Ok(c) => std::sync::Mutex::new(Some(c.policy)),
        Err(e) => {
            palisade::say!("{}", e.trim_end());
            return ExitCode::from(2);
        }
    };
    // A reload reads the configuration file again and compiles the policy
    // it names; the proxy puts both in force together, or neither.
    let audit_at_start = config.audit.clone();
    let loader = Box::new(move || {
        if let Some(policy) = first.lock().ok().and_then(|mut f| f.take()) {
            return Ok(Loaded::from(policy));
        }
        let (config, fit_warning) = Config::load(&args.config)
            .map(|c| with_overrides(c, &args))
            .map_err(|e| e.to_string())?;
        if let Ok(mut said) = fit_said.lock() {
            if let Some(w) = fit_warning.as_ref().filter(|w| said.as_ref() != Some(*w)) {
                palisade::say!("{w}");
            }
            *said = fit_warning;
        }
        if config.audit != audit_at_start {
            palisade::say!(
                "palisade proxy: warning: [audit] changed in the configuration: that takes a restart; the running proxy keeps its trail and settings"
            );
        }
        let policy = super::policy::load_for_enforcement(&config.policy)?.policy;
        Ok(Loaded {
            policy,
            config: Some(config.proxy),
        })
    });
    let audit = match open_audit(&config) {
        Ok(a) => a,
        Err(code) => return code,
    };
    // This thread's event loop serves one listening socket and handles
    // signals; `Proxy::run` starts the other serving threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            palisade::say!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        let proxy = match Proxy::bind(config.proxy.clone(), loader, audit.clone()).await {
            Ok(p) => p,
            Err(e) => {
                palisade::say!("error: {e}");
                let _ = audit.close_async().await;
                return ExitCode::from(2);
            }
        };
        // SIGTERM and SIGINT are taken before the address is announced:
        // a stop sent as soon as it is must seal the trail, not find the
        // default action (the process ending mid-write). The first starts
        // the drain, a second cuts it short.
        let stops = tokio::sync::watch::Sender::new(0u32);
        let counter = stops.clone();
        // A stop counts as the second only a moment after the first: one
        // Ctrl-C that a wrapper also forwards as SIGTERM is one stop.
        let mut first: Option<std::time::Instant> = None;
        let mut count = move || {
            match first {
                None => first = Some(std::time::Instant::now()),
                Some(t) if t.elapsed() < std::time::Duration::from_millis(250) => return,
                Some(_) => {}
            }
            counter.send_modify(|n| *n += 1);
        };
        // Registered now, not when the task below first runs.
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        tokio::spawn(async move {
            match signals {
                (Ok(mut term), Ok(mut int)) => loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    count();
                },
                _ => {
                    while tokio::signal::ctrl_c().await.is_ok() {
                        count();
                    }
                }
            }
        });
        let stopped = |times: u32| {
            let mut rx = stops.subscribe();
            async move {
                let _ = rx.wait_for(|n| *n >= times).await;
            }
        };
        match proxy.local_addr() {
            Ok(a) => palisade::say!(
                "palisade proxy: listening on {a}; {} serving threads; policy {}; audit trail in {}",
                config.proxy.worker_count().max(1),
                config.policy.display(),
                config.audit.dir.display()
            ),
            Err(e) => palisade::say!("palisade proxy: {e}"),
        }
        let log = proxy.run(stopped(1), stopped(2)).await;
        palisade::say!("palisade proxy: sealing the audit trail");
        match log.close_async().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                palisade::say!("error: closing the audit trail: {e}");
                ExitCode::from(1)
            }
        }
    })
}

/// Open files one client connection may need at worst: its socket, its
/// origin socket and a pipe each way for a tunnel, and a parked origin
/// connection left by an earlier client.
const FILES_PER_CONNECTION: u64 = 7;
/// Open files kept for everything else: listening sockets, event loops,
/// the audit trail, name lookups.
const FILES_RESERVED: u64 = 256;

/// Raises the open-file limit as far as allowed and, where it still cannot
/// hold `max_connections` at their worst, lowers `max_connections` to what
/// it can hold, returning the warning to say: past it clients get a 503
/// and a record, where an exhausted file table would leave them waiting
/// unanswered.
fn fit_open_file_limit(config: &mut palisade::config::ProxyConfig) -> Option<String> {
    let limit = palisade::sys::raise_open_file_limit()?;
    let fit = limit.saturating_sub(FILES_RESERVED) / FILES_PER_CONNECTION;
    if (config.max_connections as u64) <= fit {
        return None;
    }
    let fit = fit.max(1) as usize;
    let warning = format!(
        "palisade proxy: warning: the open-file limit ({limit}) holds {fit} connections at \
         {FILES_PER_CONNECTION} files each at worst: max_connections lowered from {} to {fit} \
         (raise the limit, e.g. LimitNOFILE= in a systemd unit, to allow more)",
        config.max_connections
    );
    config.max_connections = fit;
    config.max_connections_per_client = config.max_connections_per_client.min(fit);
    Some(warning)
}

/// Opens the audit trail, creating the signing key on first start like an
/// SSH host key (its public half belongs with the auditors, off the
/// appliance).
pub fn open_audit(config: &Config) -> Result<AuditLog, ExitCode> {
    if let Some(key) = &config.audit.signing_key {
        if !key.exists() {
            let public = key.with_extension("pub");
            if let Some(dir) = key.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match generate_key_pair(key, &public) {
                Ok(id) => palisade::say!(
                    "palisade: created audit signing key {} (key id {id}); give {} to your auditors",
                    key.display(),
                    public.display()
                ),
                Err(e) => {
                    palisade::say!("error: cannot create the audit signing key: {e}");
                    return Err(ExitCode::from(2));
                }
            }
        }
        // Whoever can read the signing key can forge checkpoints.
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(key) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                palisade::say!(
                    "palisade: warning: the audit signing key {} can be read or written by other users (mode {mode:o}); whoever reads it can sign a forged trail: chmod 600 it",
                    key.display()
                );
            }
        }
    }
    AuditLog::open(&config.audit).map_err(|e| {
        palisade::say!("error: cannot open the audit trail: {e}");
        ExitCode::from(2)
    })
}
