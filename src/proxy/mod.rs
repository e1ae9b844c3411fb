//! The forced-tunneling HTTP(S) proxy.
//!
//! Every Internet-bound request from the VNet arrives here: plain HTTP in
//! absolute form, HTTPS as a CONNECT tunnel. For each one the proxy
//! 1. reads the destination (normalising IP literals in any spelling),
//! 2. decides it with the policy's HTTP rules for the client's address,
//! 3. resolves the name once and checks every address it got (internal
//!    ranges are refused unless the deciding rule names the address),
//! 4. connects to exactly the address it checked,
//! 5. for tunnels, reads the client's first bytes: a TLS ClientHello whose
//!    server name must be the CONNECT host (no domain fronting), or plain
//!    bytes only where the rule says `plain-tunnel`,
//!
//! and writes one audit record per request and per tunnel, allowed or not,
//! with the rule, the reason and a request id the client also sees.
//! The policy sits behind an atomic swap; SIGHUP compiles the file again and
//! swaps only a policy that compiled.

mod addr;
mod body;
pub mod sni;
mod tunnel;
mod upstream;

pub use addr::{canonical, internal_range, parse_host, parse_ipv4_loose, Host};

use crate::audit::{Action, AuditEvent, AuditLog, RecordKind, Timestamp};
use crate::config::ProxyConfig;
use crate::policy::{HttpRequest, Policy, Verdict};
use arc_swap::ArcSwap;
use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use body::{ClientBody, ProxyBody};

/// Loads and compiles the policy file (and reads the settings again where
/// they come from a file), for start-up and reloads.
pub type PolicyLoader = Box<dyn Fn() -> Result<Loaded, String> + Send + Sync>;

/// What a load gives: the compiled policy and, when the settings come from
/// a file, the settings read again.
pub struct Loaded {
    pub policy: Policy,
    pub config: Option<ProxyConfig>,
}

impl From<Policy> for Loaded {
    fn from(policy: Policy) -> Loaded {
        Loaded {
            policy,
            config: None,
        }
    }
}

/// The per-client request rate limiter the settings ask for.
fn rate_limiter(config: &ProxyConfig) -> DefaultKeyedRateLimiter<IpAddr> {
    let rate = NonZeroU32::new(config.requests_per_second_per_client).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(config.request_burst_per_client.max(1)).unwrap_or(NonZeroU32::MIN);
    RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
}

/// The settings a reload changes, as `name old -> new`, and those that
/// only a restart can change (listening sockets and serving threads).
fn changed_settings(old: &ProxyConfig, new: &ProxyConfig) -> (Vec<String>, Vec<&'static str>) {
    let mut changed = Vec::new();
    macro_rules! compare {
        ($($field:ident),*) => {$(
            if old.$field != new.$field {
                changed.push(format!(
                    "proxy.{} {:?} -> {:?}",
                    stringify!($field),
                    old.$field,
                    new.$field
                ));
            }
        )*};
    }
    compare!(
        max_header_bytes,
        max_headers,
        header_read_timeout,
        idle_timeout,
        tunnel_idle_timeout,
        tunnel_first_bytes_timeout,
        connect_timeout,
        upstream_timeout,
        max_connections,
        max_connections_per_client,
        requests_per_second_per_client,
        request_burst_per_client,
        resolve_cache_ttl,
        drain_timeout
    );
    if old.hosts != new.hosts {
        changed.push(format!("proxy.hosts ({} names)", new.hosts.len()));
    }
    let mut restart = Vec::new();
    if old.listen != new.listen {
        restart.push("proxy.listen");
    }
    if old.worker_count() != new.worker_count() {
        restart.push("proxy.workers");
    }
    (changed, restart)
}

/// One reload at a time, so a slow compile that finishes late never
/// replaces the newer policy a later SIGHUP loaded.
type ReloadLock = tokio::sync::Mutex<()>;

/// Operational counters (not the audit trail).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub requests: AtomicU64,
    pub denied: AtomicU64,
    pub rate_limited: AtomicU64,
    pub tunnels: AtomicU64,
}

struct State {
    policy: ArcSwap<Policy>,
    loader: PolicyLoader,
    reloading: ReloadLock,
    audit: AuditLog,
    /// The settings in force; a reload swaps them with the policy.
    config: ArcSwap<ProxyConfig>,
    limiter: ArcSwap<DefaultKeyedRateLimiter<IpAddr>>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    open: AtomicU64,
    next_id: AtomicU64,
    id_prefix: String,
    counters: Counters,
    resolved: ResolveCache,
    /// The tunnels open now, checked again when the policy changes.
    tunnels: Arc<tunnel::OpenTunnels>,
    /// [`SERVING`], then [`DRAINING`] from a stop, then [`CUT`]; also
    /// ended when `Proxy::run` is dropped (its sender with it), which
    /// ends the serving threads too.
    phase: tokio::sync::watch::Receiver<u8>,
}

/// The proxy accepts and serves.
const SERVING: u8 = 0;
/// The proxy has stopped accepting; requests and tunnels in progress may
/// finish, and kept-alive connections close once their response is sent.
const DRAINING: u8 = 1;
/// What is still open is cut (its records say so) and the proxy ends.
const CUT: u8 = 2;

/// Most names whose lookups are kept at once.
const RESOLVE_CACHE_MAX: usize = 4096;

/// Recent successful lookups, so a busy name does not cost a blocking-pool
/// `getaddrinfo` per request. Holds only what the resolver answered: the
/// policy's checks run on these addresses for every request, and the
/// address dialled is the one checked.
#[derive(Default)]
struct ResolveCache {
    entries: Mutex<HashMap<String, Resolved>>,
}

/// A lookup's addresses and when it was made.
type Resolved = (Arc<[IpAddr]>, Instant);

impl ResolveCache {
    fn get(&self, name: &str, ttl: Duration) -> Option<Arc<[IpAddr]>> {
        let map = self.entries.lock().ok()?;
        match map.get(name) {
            Some((addrs, at)) if at.elapsed() < ttl => Some(addrs.clone()),
            _ => None,
        }
    }

    fn put(&self, name: &str, addrs: Arc<[IpAddr]>, ttl: Duration) {
        if ttl.is_zero() || addrs.is_empty() {
            return;
        }
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        if map.len() >= RESOLVE_CACHE_MAX && !map.contains_key(name) {
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= RESOLVE_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(name.to_string(), (addrs, Instant::now()));
    }
}

/// A running proxy: one listening socket per serving thread, and what
/// every connection shares.
///
/// Each serving thread runs its own single-threaded event loop and accepts
/// on its own socket bound to the same address (`SO_REUSEPORT`: the kernel
/// spreads new connections over the sockets, and only sockets of the same
/// user can join). A connection lives on the thread that accepted it, with
/// everything it touches, so no request hops between threads and no thread
/// wakes another (against one work-stealing runtime on the 2-core
/// development machine: keep-alive req/s +9% in the median of five
/// interleaved pairs, at the same CPU time per request).
pub struct Proxy {
    listeners: Vec<std::net::TcpListener>,
    local: SocketAddr,
    state: Arc<State>,
    phase: tokio::sync::watch::Sender<u8>,
    /// SIGHUP asks for a reload. Taken when the sockets are bound, so a
    /// signal sent once the address is announced never finds the default
    /// action (ending the process) in place.
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
    /// SIGUSR1 prints the counters (as for the filter).
    #[cfg(unix)]
    usr1: Option<tokio::signal::unix::Signal>,
}

/// The next delivery of a signal the proxy listens for (never, if it
/// could not listen).
#[cfg(unix)]
async fn next_signal(s: &mut Option<tokio::signal::unix::Signal>) {
    match s.as_mut() {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Listening sockets waiting for connections, per serving thread.
const LISTEN_BACKLOG: i32 = 1024;

/// A listening socket on `addr`, one of a group on the same address when
/// `shared`.
fn listen_socket(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Headers that describe one hop, never forwarded. Parsed once: removing
/// by `&str` parses and hashes the name on every request.
const HOP_BY_HOP: [HeaderName; 9] = [
    HeaderName::from_static("connection"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authenticate"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("te"),
    HeaderName::from_static("trailer"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names they have
    // is cheaper than a hashed removal per hop-by-hop name. (Connection is
    // one of them, so the headers it names are still found below.)
    if !h.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    if h.contains_key(hyper::header::CONNECTION) {
        // `keep-alive` and the other fixed names are removed below: no
        // entry of their own (and usually no allocation at all).
        let named: Vec<HeaderName> = h
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| n.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// `Via` names the protocol version of the message as palisade received it.
fn add_via(h: &mut HeaderMap, version: hyper::Version) {
    let via = if version == hyper::Version::HTTP_10 {
        "1.0 palisade"
    } else {
        "1.1 palisade"
    };
    h.append(hyper::header::VIA, HeaderValue::from_static(via));
}

/// What the proxy decided about a request before any byte went upstream.
struct Refusal {
    status: StatusCode,
    reason: String,
    rule: Option<String>,
    /// Request body bytes that reached the origin before it failed (an
    /// upload cut short still went out, and the record says how much).
    uploaded: u64,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
            rule: None,
            uploaded: 0,
        }
    }
}

impl Proxy {
    /// Binds the listener; the policy comes from `loader` (called again on
    /// every reload).
    pub async fn bind(
        config: ProxyConfig,
        loader: PolicyLoader,
        audit: AuditLog,
    ) -> std::io::Result<Proxy> {
        let policy = loader().map_err(std::io::Error::other)?.policy;
        let workers = config.worker_count().max(1);
        // Sockets of one user may share a port with SO_REUSEPORT; a port
        // another process holds (a second palisade, say) must still fail
        // here as it would for one socket, not be shared silently. So the
        // address is first taken alone, then the group binds to it.
        let listen_error = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
        };
        let local = listen_socket(config.listen, false)
            .and_then(|l| l.local_addr())
            .map_err(listen_error)?;
        let mut listeners = Vec::with_capacity(workers);
        for _ in 0..workers {
            listeners.push(listen_socket(local, workers > 1).map_err(listen_error)?);
        }
        let limiter = rate_limiter(&config);
        let (phase, phase_rx) = tokio::sync::watch::channel(SERVING);
        let id_prefix = audit.boot_id().chars().take(8).collect();
        let loaded = AuditEvent::policy_loaded(policy.sha256(), "start");
        if let Err(e) = audit.submit_async(&loaded).await {
            crate::say!("palisade proxy: the start's policy-loaded record was not written: {e}");
        }
        Ok(Proxy {
            listeners,
            local,
            #[cfg(unix)]
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
            #[cfg(unix)]
            usr1: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .ok(),
            state: Arc::new(State {
                policy: ArcSwap::from_pointee(policy),
                loader,
                reloading: ReloadLock::default(),
                audit,
                config: ArcSwap::from_pointee(config),
                limiter: ArcSwap::from_pointee(limiter),
                per_client: Mutex::new(HashMap::new()),
                open: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                id_prefix,
                counters: Counters::default(),
                resolved: ResolveCache::default(),
                tunnels: Arc::default(),
                phase: phase_rx,
            }),
            phase,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// Compiles the policy again and swaps it in; a policy that does not
    /// compile is reported and the one in force stays.
    pub async fn reload(&self) -> Result<String, String> {
        reload(self.state.clone()).await
    }

    /// Serves until `shutdown` resolves: one thread per listening socket
    /// serves clients, and this task handles reloads. Then the proxy
    /// drains: it stops accepting, lets requests and tunnels in progress
    /// finish for up to the configured drain timeout (or until `cut`
    /// resolves, a second stop signal), and cuts what is left. Every
    /// serving thread ends its connections (writing their records) before
    /// this returns, so the caller closes a trail nothing writes to any
    /// more.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        cut: impl std::future::Future<Output = ()>,
    ) -> AuditLog {
        tokio::pin!(shutdown);
        tokio::pin!(cut);
        let Proxy {
            listeners,
            state,
            phase,
            #[cfg(unix)]
            mut hup,
            #[cfg(unix)]
            mut usr1,
            ..
        } = self;
        let mut threads = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let st = state.clone();
            let mut phase = state.phase.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("palisade-proxy-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            crate::say!("palisade proxy: serving thread {i}: {e}");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let worker = Worker::new(&st, listener);
                        tokio::select! {
                            _ = phase.wait_for(|p| *p >= DRAINING) => {}
                            _ = worker.serve(&st) => {}
                        }
                        // The listening socket closes: new clients are
                        // refused (and go to another proxy) while the
                        // connections on this thread's loop finish.
                        drop(worker);
                        let _ = phase.wait_for(|p| *p >= CUT).await;
                    });
                    // Shutting the runtime down ends its connections; their
                    // records are written as they end. A name lookup still
                    // running on its blocking pool (a resolver that does
                    // not answer) is not waited for: the stop must not
                    // outlast the drain by the resolver's timeout.
                    runtime.shutdown_timeout(Duration::from_millis(100));
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => crate::say!("palisade proxy: cannot start serving thread {i}: {e}"),
            }
        }
        // The rate limiter keeps a cell per source address it has seen;
        // those whose budget is full again are dropped now and then, so
        // that many sources (or spoofed ones on a wide VNet) do not grow it
        // without bound.
        let mut prune = tokio::time::interval(Duration::from_secs(30));
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Rule expiry is checked at each midnight (UTC) and every 30 s.
        let expiry = tokio::time::sleep(crate::policy::Date::until_expiry_check());
        tokio::pin!(expiry);
        loop {
            #[cfg(unix)]
            let (hup_fut, usr1_fut) = (next_signal(&mut hup), next_signal(&mut usr1));
            tokio::select! {
                _ = &mut shutdown => break,
                _ = usr1_fut => state.say_counters(""),
                _ = hup_fut => {
                    // The compile runs beside the serving threads: clients
                    // keep being served under the policy in force meanwhile.
                    let state = state.clone();
                    tokio::spawn(async move {
                        match reload(state).await {
                            Ok(sha) => crate::say!("palisade proxy: reloaded policy (sha256 {sha})"),
                            Err(e) => crate::say!("palisade proxy: reload failed, the previous policy and settings stay in force:\n{e}"),
                        }
                    });
                }
                _ = prune.tick() => {
                    let limiter = state.limiter.load();
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                _ = &mut expiry => {
                    tokio::spawn(expire(state.clone()));
                    expiry
                        .as_mut()
                        .reset(tokio::time::Instant::now() + crate::policy::Date::until_expiry_check());
                }
            }
        }
        // Counted before the serving threads hear of the stop: idle
        // connections close at once then.
        let open = || state.open.load(Ordering::Relaxed);
        let open_at_stop = open();
        phase.send_replace(DRAINING);
        let drain = state.config.load().drain_timeout;
        if open_at_stop > 0 && !drain.is_zero() {
            crate::say!(
                "palisade proxy: stopping: no new connections; {open_at_stop} open may finish within {drain:?} (stop again to cut them at once)",
            );
            let deadline = tokio::time::sleep(drain);
            tokio::pin!(deadline);
            let mut check = tokio::time::interval(Duration::from_millis(20));
            loop {
                // The counters still answer SIGUSR1 while the rest finish.
                #[cfg(unix)]
                let usr1_fut = next_signal(&mut usr1);
                #[cfg(not(unix))]
                let usr1_fut = std::future::pending::<()>();
                tokio::select! {
                    _ = &mut deadline => break,
                    _ = &mut cut => break,
                    _ = check.tick() => if open() == 0 { break },
                    _ = usr1_fut => state.say_counters("draining: "),
                }
            }
        }
        if open() > 0 {
            crate::say!(
                "palisade proxy: cutting {} connections still open (their records say so)",
                open()
            );
        }
        phase.send_replace(CUT);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        state.say_counters("at stop: ");
        // The audit handle outlives the proxy: the caller closes it.
        Arc::try_unwrap(state)
            .map(|s| s.audit)
            .unwrap_or_else(|s| s.audit.clone())
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }
}

/// One serving thread's share: its listening socket and its idle origin
/// connections (registered with its event loop, so reused only there).
struct Worker {
    listener: Option<TcpListener>,
    idle: Arc<upstream::IdlePool>,
}

impl Worker {
    /// Must run inside the thread's runtime (the socket joins its event
    /// loop).
    fn new(state: &State, listener: std::net::TcpListener) -> Worker {
        let config = state.config.load();
        let workers = config.worker_count().max(1);
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => Some(l),
            Err(e) => {
                crate::say!("palisade proxy: a serving thread cannot listen: {e}");
                None
            }
        };
        Worker {
            listener,
            idle: Arc::new(upstream::IdlePool::new(
                config.max_connections.div_ceil(workers),
                Duration::from_secs(90),
            )),
        }
    }

    /// Accepts and serves clients; never returns.
    async fn serve(&self, state: &Arc<State>) {
        let Some(listener) = &self.listener else {
            return std::future::pending().await;
        };
        // Accept errors (out of files, say) are said once a minute with
        // their count, not 20 times a second.
        let mut accept_errors = (0u64, None::<Instant>);
        // Parked origin connections their origin has closed are closed
        // every few seconds.
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = sweep.tick() => {
                    self.idle.drop_closed();
                    continue;
                }
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    accept_errors.0 += 1;
                    if accept_errors
                        .1
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                    {
                        crate::say!(
                            "palisade proxy: cannot accept connections: {e} ({} time(s) since the last report)",
                            accept_errors.0
                        );
                        accept_errors = (0, Some(Instant::now()));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let guard = match ConnectionGuard::admit(state, peer.ip()) {
                Ok(g) => g,
                Err(why) => {
                    state
                        .counters
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed);
                    refuse_connection(state, stream, peer, why);
                    continue;
                }
            };
            state.counters.connections.fetch_add(1, Ordering::Relaxed);
            let slot = Arc::new(upstream::Slot::new(self.idle.clone()));
            tokio::spawn(serve_connection(state.clone(), slot, stream, peer, guard));
        }
    }
}

/// A connection over the limits gets a 503 it can read and an audit
/// record, without any wait: neither the answer nor the record may let a
/// flood of connections hold the accepting thread or the limits' places.
/// (Under such a flood the records the log cannot take at once are counted
/// as lost, and the trail says so in a gap record.)
fn refuse_connection(state: &State, stream: TcpStream, peer: SocketAddr, why: &'static str) {
    let id = state.request_id();
    let body = format!("palisade: Service Unavailable ({why})\nrequest id: {id}\n");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nx-palisade-request-id: {id}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
    // What already arrived is read away, so that the close is a FIN the
    // client reads the answer before, not a reset that discards it.
    let mut sink = [0u8; 4096];
    let _ = stream.try_read(&mut sink);
    if let Ok(std) = stream.into_std() {
        let _ = std.shutdown(std::net::Shutdown::Write);
    }
    let ev = AuditEvent::proxy_refusal(peer)
        .with_request_id(&id)
        .with_reason(why)
        .with_status(503);
    let _ = state.audit.try_record(&ev);
}

/// Rules that expire while the proxy runs stop matching the day after
/// their date (UTC): the policy in force is replaced by itself without
/// them, recorded like a reload.
async fn expire(state: Arc<State>) {
    let _one_at_a_time = state.reloading.lock().await;
    let in_force = state.policy.load_full();
    let Ok(Some((p, why))) = tokio::task::spawn_blocking(move || in_force.expired_today()).await
    else {
        return;
    };
    let sha = p.sha256().to_string();
    let p = Arc::new(p);
    state.policy.store(p.clone());
    if let Err(e) = state
        .audit
        .submit_async(&AuditEvent::policy_loaded(&sha, &why))
        .await
    {
        crate::say!("palisade proxy: the expiry's audit record was not written: {e}");
    }
    crate::say!("palisade proxy: policy in force {why}");
    cut_revoked_tunnels(&state, &p);
}

/// Checks every open tunnel against `policy`, now in force, and cuts the
/// ones it does not allow (each then writes its record, `denied`).
fn cut_revoked_tunnels(state: &State, policy: &Policy) {
    let cut = state.tunnels.revoke_where(|t| tunnel_refusal(policy, t));
    if cut > 0 {
        crate::say!(
            "palisade proxy: {cut} open tunnel(s) cut: the policy now in force does not allow them"
        );
    }
}

/// Why `policy` does not allow the open tunnel `t` (decided under an
/// earlier policy), if it does not: its target, its source, a plain tunnel
/// where the rule now wants TLS, or an internal address the rule no longer
/// names.
fn tunnel_refusal(policy: &Policy, t: &tunnel::OpenTunnel) -> Option<tunnel::Revocation> {
    let revocation = |why: String, rule: Option<String>| tunnel::Revocation {
        why,
        rule,
        ruleset: policy.sha256().to_string(),
    };
    match decide(policy, t.peer, &t.host, t.port, "CONNECT") {
        Err(r) => Some(revocation(r.reason, r.rule)),
        Ok((name, plain_ok, rule)) => {
            if t.plain.load(Ordering::Acquire) && !plain_ok {
                let why = format!(
                    "rule {name} allows TLS tunnels to {}:{} only, and this one is plain",
                    host_text(&t.host),
                    t.port
                );
                return Some(revocation(why, Some(name)));
            }
            address_refusal(policy, rule, &t.host, t.dest.ip()).map(|why| revocation(why, None))
        }
    }
}

async fn reload(state: Arc<State>) -> Result<String, String> {
    let _one_at_a_time = state.reloading.lock().await;
    let in_force = state.policy.load().sha256().to_string();
    // Parsing and compiling a large policy takes a while: it runs on the
    // blocking pool, not on a worker thread that serves connections.
    let compiling = state.clone();
    let loaded = tokio::task::spawn_blocking(move || (compiling.loader)())
        .await
        .unwrap_or_else(|e| Err(format!("the policy compile did not finish: {e}")));
    let (event, result) = match loaded {
        Ok(Loaded { policy, config }) => {
            let sha = policy.sha256().to_string();
            let mut changed = Vec::new();
            // Both loaded, or neither goes in force. The settings are
            // swapped in just before the policy: a request between the two
            // swaps has the new settings under the old policy, which still
            // checks every address it is given.
            if let Some(mut new) = config {
                let old = state.config.load_full();
                let restart;
                (changed, restart) = changed_settings(&old, &new);
                if !restart.is_empty() {
                    crate::say!(
                        "palisade proxy: warning: {} changed in the configuration: that takes a restart; the running proxy keeps its listening sockets and serving threads",
                        restart.join(" and "),
                    );
                }
                new.listen = old.listen;
                new.workers = old.workers;
                if (
                    new.requests_per_second_per_client,
                    new.request_burst_per_client,
                ) != (
                    old.requests_per_second_per_client,
                    old.request_burst_per_client,
                ) {
                    state.limiter.store(Arc::new(rate_limiter(&new)));
                }
                state.config.store(Arc::new(new));
            }
            let policy = Arc::new(policy);
            state.policy.store(policy.clone());
            cut_revoked_tunnels(&state, &policy);
            let mut event = AuditEvent::policy_loaded(&sha, "reload");
            if !changed.is_empty() {
                let said = format!("settings changed: {}", changed.join(", "));
                crate::say!("palisade proxy: {said}");
                event.event.reason = Some(format!("loaded reload; {said}").into());
            }
            (event, Ok(sha))
        }
        Err(e) => (AuditEvent::reload_failed(&e, Some(&in_force)), Err(e)),
    };
    // A record the log cannot take is counted as lost by the log itself
    // (and shows as a gap); the operator also hears of it here.
    if let Err(e) = state.audit.submit_async(&event).await {
        crate::say!("palisade proxy: the reload's audit record was not written: {e}");
    }
    result
}

/// Counts a client connection against the total and per-client limits for
/// as long as it lives.
struct ConnectionGuard {
    state: Arc<State>,
    ip: IpAddr,
}

impl ConnectionGuard {
    /// The guard, or why the connection is refused.
    fn admit(state: &Arc<State>, ip: IpAddr) -> Result<ConnectionGuard, &'static str> {
        let Ok(mut per) = state.per_client.lock() else {
            return Err("connection limits unavailable");
        };
        let config = state.config.load();
        if state.open.load(Ordering::Relaxed) as usize >= config.max_connections {
            return Err("too many client connections in total (max_connections)");
        }
        let n = per.entry(ip).or_insert(0);
        if *n >= config.max_connections_per_client {
            return Err("too many connections from this client (max_connections_per_client)");
        }
        *n += 1;
        state.open.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionGuard {
            state: state.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.state.open.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut per) = self.state.per_client.lock() {
            if let Some(n) = per.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&self.ip);
                }
            }
        }
    }
}

/// Serves one client connection. `guard` counts it against the connection
/// limits for as long as it or a tunnel opened on it lives.
async fn serve_connection(
    state: Arc<State>,
    slot: Arc<upstream::Slot>,
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
) {
    let _ = stream.set_nodelay(true);
    // The limits in force when the connection opened hold for its life.
    let config = state.config.load_full();
    let guard = Arc::new(guard);
    let activity = Arc::new(Activity::new());
    // `slot`: the origin connection plain HTTP requests go out on, used
    // by this task only: requests are written and responses read as the
    // client side's service and response body are polled.
    let st = state.clone();
    let act = activity.clone();
    let sl = slot.clone();
    let held = guard.clone();
    let io = ClientIo {
        stream,
        activity: activity.clone(),
    };
    // The proxy's stop, not the client, ended the connection.
    let mut stopped = false;
    let (result, cut) = {
        // Built in place (`pin!` of the expression): a future moved from a
        // local into another is stored twice in this task's state.
        let mut conn = std::pin::pin!(client_builder(&config)
            .serve_connection(
                TokioIo::new(io),
                hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    // hyper polls the future as soon as it has it; built
                    // here, not in a block that would hold it and the
                    // request head beside it.
                    act.request_started();
                    let req = req.map(|b| ClientBody::new(b, act.clone()));
                    handle_request(st.clone(), sl.clone(), held.clone(), act.clone(), peer, req)
                }),
            )
            .with_upgrades());
        let idle_ms = config.idle_timeout.as_millis() as u64;
        let head_ms = config.header_read_timeout.as_millis() as u64;
        let tick =
            config.idle_timeout.min(config.header_read_timeout) / 4 + Duration::from_millis(10);
        // Between requests: a head that started arriving must complete
        // within the header read timeout (slowloris), and a connection
        // with nothing arriving is closed after the idle timeout. (hyper's
        // own header timer also runs while a kept-alive connection waits
        // for the next request, which would cut idle clients at the header
        // timeout and record them as denied.)
        // A client that stopped reading what it was sent (a response in
        // flight, or its last bytes still in hyper's buffer) would hold its
        // place and an origin connection for as long as it likes: a write
        // that has made no progress for the idle timeout ends the
        // connection, also while a graceful close waits for that write.
        let stalled = || {
            let since = activity.write_stalled_since.load(Ordering::Acquire);
            since != NOT_STALLED && activity.now().saturating_sub(since) >= idle_ms
        };
        let mut stall_watch = std::pin::pin!(async {
            loop {
                tokio::time::sleep(tick).await;
                if stalled() {
                    return;
                }
            }
        });
        let mut watchdog = std::pin::pin!(async {
            loop {
                tokio::time::sleep(tick).await;
                if stalled() {
                    return Quiet::StalledWrite;
                }
                if activity.in_flight.load(Ordering::Acquire) > 0 {
                    continue;
                }
                let now = activity.now();
                let since = activity.head_since.load(Ordering::Acquire);
                if since != NO_HEAD && now.saturating_sub(since) >= head_ms {
                    return Quiet::SlowHead;
                }
                let last = activity.last.load(Ordering::Acquire);
                if since == NO_HEAD && now.saturating_sub(last) >= idle_ms {
                    return Quiet::Idle;
                }
            }
        });
        // At a stop, a response in progress is finished (and says
        // `connection: close`) and an idle connection closes at once.
        let mut phase = state.phase.clone();
        let mut draining = std::pin::pin!(async move {
            let _ = phase.wait_for(|p| *p >= DRAINING).await;
        });
        let mut closing = false;
        let stopped = &mut stopped;
        std::future::poll_fn(|cx| {
            if !closing {
                if draining.as_mut().poll(cx).is_ready() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    *stopped = true;
                    return conn.as_mut().poll(cx).map(|r| (r, false));
                }
                match watchdog.as_mut().poll(cx) {
                    Poll::Ready(Quiet::Idle) => {
                        // Finishes a response in progress, then closes.
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    Poll::Ready(Quiet::SlowHead) => return Poll::Ready((Ok(()), true)),
                    // Dropping the connection drops the response body,
                    // whose record then says it did not complete.
                    Poll::Ready(Quiet::StalledWrite) => return Poll::Ready((Ok(()), false)),
                    Poll::Pending => {}
                }
            } else if stall_watch.as_mut().poll(cx).is_ready() {
                return Poll::Ready((Ok(()), false));
            }
            conn.as_mut().poll(cx).map(|r| (r, false))
        })
        .await
    };
    slot.park();
    // Requests that never reached the service still get a record: a head
    // cut by the watchdog, or one hyper refused (too large, malformed, or
    // never finished arriving). The status is the one hyper answered with
    // (none for a timeout: the connection is closed).
    const SLOW_HEAD: &str = "request head not received within the header read timeout";
    let refusal = match &result {
        _ if cut => Some((SLOW_HEAD, None)),
        // hyper answers nothing to an HTTP/2 connection preface, 414 to a
        // URI past its own limit and 431 to a head past ours.
        Err(e) if e.is_parse_version_h2() => Some((
            "HTTP/2 connection preface (prior knowledge): palisade serves HTTP/1.1 clients",
            None,
        )),
        Err(e) if e.is_parse_too_large() && e.to_string().contains("URI too long") => {
            Some(("request URI too long", Some(414)))
        }
        Err(e) if e.is_parse_too_large() => Some(("request head too large", Some(431))),
        Err(e) if e.is_timeout() => Some((SLOW_HEAD, None)),
        Err(e) if e.is_parse() => Some(("malformed request", Some(400))),
        _ if activity.head_begun.load(Ordering::Acquire)
            && activity.in_flight.load(Ordering::Acquire) == 0 =>
        {
            Some((
                if stopped {
                    "the proxy stopped while the request head was arriving"
                } else {
                    "the client closed the connection before its request head was complete"
                },
                None,
            ))
        }
        _ => None,
    };
    if let Some((reason, status)) = refusal {
        // A request, refused: counted as both, as its record is.
        state.counters.requests.fetch_add(1, Ordering::Relaxed);
        state.counters.denied.fetch_add(1, Ordering::Relaxed);
        let mut ev = AuditEvent::proxy_refusal(peer)
            .with_request_id(state.request_id())
            .with_reason(reason)
            .with_bytes(0, 0, activity.epoch.elapsed());
        if let Some(status) = status {
            ev = ev.with_status(status);
        }
        submit(&state.audit, ev, false).await;
    }
}

/// `Activity::head_since` when no request head is arriving.
const NO_HEAD: u64 = u64::MAX;

/// `Activity::write_stalled_since` when no write to the client is stalled.
const NOT_STALLED: u64 = u64::MAX;

/// What a client connection is doing, shared by its socket, its service
/// and its watchdog. Times are in ms since the connection was accepted.
struct Activity {
    epoch: Instant,
    /// When the last request started or its response was sent.
    last: AtomicU64,
    /// Requests whose responses have not been sent in full.
    in_flight: AtomicU64,
    /// When the first byte of a request head that is not complete yet
    /// arrived, or [`NO_HEAD`]. A new connection starts in a head.
    head_since: AtomicU64,
    /// Bytes of a request head arrived and the request has not started:
    /// a connection that ends so left a request unfinished.
    head_begun: AtomicBool,
    /// The last request's body has not been read to its end: bytes that
    /// arrive once its response is sent are the rest of it (which hyper
    /// drains, or closes the connection on), not a new head. (If hyper
    /// drains it and a new head follows, that head is not watched until
    /// its request starts.)
    body_left: AtomicBool,
    /// Since when a write to the client has found its socket full with
    /// nothing taken since, or [`NOT_STALLED`].
    write_stalled_since: AtomicU64,
}

/// Why the watchdog ends a connection.
enum Quiet {
    Idle,
    SlowHead,
    /// The client has not taken any of its response for the idle timeout.
    StalledWrite,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            head_begun: AtomicBool::new(false),
            body_left: AtomicBool::new(false),
            write_stalled_since: AtomicU64::new(NOT_STALLED),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// After a write to the client: progress ends a stall, a full socket
    /// starts one (if none is running).
    fn write_polled(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self
                .write_stalled_since
                .store(NOT_STALLED, Ordering::Release),
            Poll::Pending => {
                let _ = self.write_stalled_since.compare_exchange(
                    NOT_STALLED,
                    self.now(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            _ => {}
        }
    }

    fn request_started(&self) {
        self.head_begun.store(false, Ordering::Release);
        // Until its body (if any) says it was read to its end.
        self.body_left.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NO_HEAD, Ordering::Release);
        self.last.store(self.now(), Ordering::Release);
    }

    fn response_sent(&self) {
        self.last.store(self.now(), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// The current request's body was read to its end.
    fn body_read(&self) {
        self.body_left.store(false, Ordering::Release);
    }

    /// Bytes arrived from the client: between requests, a head begins.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && !self.body_left.load(Ordering::Acquire) {
            self.head_begun.store(true, Ordering::Release);
            let _ = self.head_since.compare_exchange(
                NO_HEAD,
                self.now(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

/// The client's socket, noting when bytes arrive.
struct ClientIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        r
    }
}

impl tokio::io::AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.activity.write_polled(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.activity.write_polled(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A response body that marks its request finished when hyper is done
/// with it (sent, or the connection ended).
struct Tracked {
    body: ProxyBody,
    activity: Arc<Activity>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.activity.response_sent();
    }
}

/// The client side's HTTP/1 settings.
fn client_builder(config: &ProxyConfig) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The connection's watchdog times request heads instead (see
        // `serve_connection`).
        .header_read_timeout(None)
        // The head's own limit (431 past it); the buffer limit alone lets
        // one large read through.
        .max_header_size(config.max_header_bytes)
        .max_buf_size(config.max_header_bytes.max(8192))
        .max_headers(config.max_headers)
        // Otherwise hyper reads the client socket while a request is in
        // flight, to notice a close early; the request's URI and headers
        // still share its read buffer then, so every request cost a second
        // 8 KiB buffer for as long as the origin took, and a read syscall.
        // A client that leaves is noticed when its response is written
        // (the wait for the origin is bounded by `upstream_timeout`).
        .half_close(true)
        .keep_alive(true);
    builder
}

impl State {
    /// Prints the counters (on SIGUSR1, and at stop).
    fn say_counters(&self, when: &str) {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let audit = self.audit.stats();
        crate::say!(
            "palisade proxy: {when}{} connections ({} open, {} refused over the limits), {} requests and tunnels ({} tunnels), {} denied, {} rate-limited; audit: {} records written, {} lost",
            n(&c.connections),
            n(&self.open),
            n(&c.refused_connections),
            n(&c.requests),
            n(&c.tunnels),
            n(&c.denied),
            n(&c.rate_limited),
            audit.records_written,
            audit.lost_records,
        );
    }

    fn request_id(&self) -> String {
        // Sized once: the prefix, a dash and up to 20 digits.
        let mut id = String::with_capacity(self.id_prefix.len() + 21);
        let _ = write!(
            id,
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        id
    }
}

/// The response a refused request gets: the status, and a short body naming
/// the rule and the request id (which the audit record carries too).
fn refusal_response(r: &Refusal, id: &str) -> Response<ProxyBody> {
    let mut body = format!(
        "palisade: {} ({})\n",
        r.status.canonical_reason().unwrap_or("refused"),
        r.reason
    );
    if let Some(rule) = &r.rule {
        body.push_str(&format!("rule: {rule}\n"));
    }
    body.push_str(&format!("request id: {id}\n"));
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-palisade-request-id", v);
    }
    add_via(h, hyper::Version::HTTP_11);
    resp
}

/// A Host header, if there is one, must name the request's target: the
/// same host, and the same port (a Host without a port means
/// `default_port`; with `None`, a port-less Host matches any). `target` is
/// the authority `host` and `port` were read from.
fn check_host_header(
    headers: &HeaderMap,
    target: &hyper::http::uri::Authority,
    host: &Host,
    port: u16,
    default_port: Option<u16>,
) -> Result<(), Refusal> {
    let Some(h) = headers.get(HOST) else {
        return Ok(());
    };
    // What clients send: the target's very bytes, which read as the same
    // host and port without parsing them again.
    if h.as_bytes() == target.as_str().as_bytes() && !target.as_str().contains('@') {
        return Ok(());
    }
    // A Host is a host and a port (RFC 9110 section 7.2): userinfo there
    // (`evil.test@allowed.test`) is not read past, since an origin might
    // route on either part.
    let parsed = h
        .to_str()
        .ok()
        .filter(|s| !s.contains('@'))
        .and_then(|s| s.parse::<hyper::http::uri::Authority>().ok())
        .and_then(|a| {
            let p = authority_port(&a).ok()?;
            Some((parse_host(a.host()).ok()?, p))
        });
    let matches = match parsed {
        Some((hh, p)) => hh == *host && p.or(default_port).is_none_or(|p| p == port),
        None => false,
    };
    if matches {
        return Ok(());
    }
    Err(Refusal::new(
        StatusCode::FORBIDDEN,
        format!(
            "Host header {:?} does not match the request target {}:{port}",
            String::from_utf8_lossy(h.as_bytes()),
            host_text(host)
        ),
    ))
}

/// The port an authority names: `None` without one (or with an empty one,
/// which means the scheme's default); an error for anything but 1-65535,
/// which must never fall back to a default port.
fn authority_port(a: &hyper::http::uri::Authority) -> Result<Option<u16>, String> {
    let s = a.as_str();
    let after_host = s.rfind(']').map_or(s, |i| &s[i + 1..]);
    match after_host.rsplit_once(':') {
        None => Ok(None),
        Some((_, p)) => crate::policy::target::parse_port(p),
    }
}

fn host_text(h: &Host) -> String {
    match h {
        Host::Name(n) => n.clone(),
        Host::Ip(a) => {
            // Sized once for the longest form, `[` 45 characters `]`.
            let mut text = String::with_capacity(47);
            let _ = match a {
                IpAddr::V6(a) => write!(text, "[{a}]"),
                IpAddr::V4(a) => write!(text, "{a}"),
            };
            text
        }
    }
}

/// A request's URI as the audit trail records it, written into a string
/// sized once.
fn uri_text(uri: &Uri) -> String {
    let parts = uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let mut text = String::with_capacity(parts + 8);
    let _ = write!(text, "{uri}");
    text
}

/// The policy's decision, as a refusal when it denies.
fn decide(
    policy: &Policy,
    client: IpAddr,
    host: &Host,
    port: u16,
    method: &str,
) -> Result<(String, bool, Option<usize>), Refusal> {
    let req = HttpRequest {
        src: canonical(client),
        host: host.to_http_host(),
        port,
        method: method.to_string(),
    };
    let d = policy.decide_http(&req);
    let name = policy.http_rule_name(d.rule).to_string();
    if d.verdict == Verdict::Deny {
        let reason = if d.rule.is_some() {
            format!("rule {name} denies {method} to {}:{port}", host_text(host))
        } else {
            format!("no rule allows {method} to {}:{port}", host_text(host))
        };
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason,
            rule: Some(name),
            uploaded: 0,
        });
    }
    Ok((name, d.plain_tunnel, d.rule))
}

/// Resolves once and checks every address; returns the one to dial. A
/// refusal names the rule that allowed the request (`default` if none).
async fn resolve_checked(
    state: &State,
    policy: &Policy,
    rule: Option<usize>,
    host: &Host,
    port: u16,
) -> Result<SocketAddr, Refusal> {
    match resolve_known(state, policy, rule, host, port) {
        Ok(known) => known,
        Err(name) => look_up_checked(state, policy, rule, host, name, port).await,
    }
}

/// As [`resolve_checked`], without waiting: `Err(name)` when only a lookup
/// of `name` can tell (a name neither in the config's `hosts` nor in the
/// cache). An IP literal, a fixed name and a cached one are answered here,
/// so the requests that need no lookup carry none of a lookup's state.
fn resolve_known<'h>(
    state: &State,
    policy: &Policy,
    rule: Option<usize>,
    host: &'h Host,
    port: u16,
) -> Result<Result<SocketAddr, Refusal>, &'h str> {
    let checked = match host {
        Host::Ip(ip) => check_addresses(policy, rule, host, port, std::slice::from_ref(ip)),
        Host::Name(name) => {
            let c = state.config.load();
            match c.hosts.get(name) {
                Some(fixed) => check_addresses(policy, rule, host, port, fixed),
                None => match state.resolved.get(name, c.resolve_cache_ttl) {
                    Some(cached) => check_addresses(policy, rule, host, port, &cached),
                    None => return Err(name),
                },
            }
        }
    };
    Ok(checked.map_err(|r| refused_by_rule(policy, rule, r)))
}

/// The lookup [`resolve_known`] could not spare: `name` (the name of
/// `host`) resolved, then checked as a known one is.
async fn look_up_checked(
    state: &State,
    policy: &Policy,
    rule: Option<usize>,
    host: &Host,
    name: &str,
    port: u16,
) -> Result<SocketAddr, Refusal> {
    look_up(state, name, port)
        .await
        .and_then(|addrs| check_addresses(policy, rule, host, port, &addrs))
        .map_err(|r| refused_by_rule(policy, rule, r))
}

fn refused_by_rule(policy: &Policy, rule: Option<usize>, r: Refusal) -> Refusal {
    Refusal {
        rule: Some(policy.http_rule_name(rule).to_string()),
        ..r
    }
}

/// Resolves `name` (bounded by the connect timeout) and caches the answer.
async fn look_up(state: &State, name: &str, port: u16) -> Result<Arc<[IpAddr]>, Refusal> {
    // What this lookup needs of the settings, read without holding them (a
    // reference count shared by every serving thread) across the lookup.
    let (ttl, connect_timeout) = {
        let c = state.config.load();
        (c.resolve_cache_ttl, c.connect_timeout)
    };
    match tokio::time::timeout(connect_timeout, tokio::net::lookup_host((name, port))).await {
        Ok(Ok(it)) => {
            let looked_up: Arc<[IpAddr]> = it.map(|a| a.ip()).collect();
            state.resolved.put(name, looked_up.clone(), ttl);
            Ok(looked_up)
        }
        Ok(Err(e)) => Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("cannot resolve {name}: {e}"),
        )),
        Err(_) => Err(Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("resolving {name} timed out"),
        )),
    }
}

/// The address to dial among `addrs`, the first, once every one of them
/// has passed the internal-range check.
fn check_addresses(
    policy: &Policy,
    rule: Option<usize>,
    host: &Host,
    port: u16,
    addrs: &[IpAddr],
) -> Result<SocketAddr, Refusal> {
    if addrs.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("{} has no addresses", host_text(host)),
        ));
    }
    for a in addrs {
        if let Some(why) = address_refusal(policy, rule, host, *a) {
            return Err(Refusal::new(StatusCode::FORBIDDEN, why));
        }
    }
    Ok(SocketAddr::new(canonical(addrs[0]), port))
}

/// Why `host`'s address `a` may not be dialled under `rule`, if it may
/// not: an internal range the rule does not name.
fn address_refusal(policy: &Policy, rule: Option<usize>, host: &Host, a: IpAddr) -> Option<String> {
    let c = canonical(a);
    let why = internal_range(c)?;
    let named = rule
        .and_then(|i| policy.http_rules().get(i))
        .is_some_and(|r| r.addrs.contains(c));
    (!named).then(|| {
        format!(
            "{} resolves to {c}, which is {why} and not allowed by the policy",
            host_text(host)
        )
    })
}

/// The record of an allowed request or tunnel whose future is dropped
/// before it finishes, written then with what was known: when the proxy
/// stops, every serving thread ends its connections at once, and a request
/// still waiting for its origin, or a tunnel still open, must not vanish
/// from the trail.
struct IfCut<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> IfCut<F> {
    fn new(record: F) -> IfCut<F> {
        IfCut(Some(record))
    }

    /// It finished; its own record is written by the normal path.
    fn done(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for IfCut<F> {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record();
        }
    }
}

/// The reason a cut-short record gives.
const CUT_SHORT: &str = "allowed by rule; cut short when its connection ended (the proxy stopping)";

/// One request or tunnel, from the client's head to the response handed to
/// hyper.
///
/// Its future (2.9 KiB: the upstream exchange, the audit record, timers)
/// lives in the allocation hyper keeps for each connection's request in
/// flight, not in a box of its own per request. mimalloc returns freed
/// pages at once (see `sys::lean_allocator`), and with a 3.6 KiB box per
/// request it emptied, returned and faulted back in a page of those boxes
/// every 20 or so requests: 9% of the proxy's CPU under the keep-alive
/// bench went to `madvise`, TLB shootdowns and page faults. Without the
/// box (measured on an Intel Xeon VM): 6-9% more kept-alive requests a
/// second at 50 connections in `benches/proxy.sh` (8-13% with the proxy
/// alone under wrk), a peak at 500 connections of 15.6 MiB against 15.9,
/// and 2,000 idle kept-alive clients hold 38.8 MB against 38.0 MB.
// Not `async fn`: see the first comment inside.
#[allow(clippy::manual_async_fn)]
fn handle_request(
    state: Arc<State>,
    slot: Arc<upstream::Slot>,
    guard: Arc<ConnectionGuard>,
    activity: Arc<Activity>,
    peer: SocketAddr,
    req: Request<ClientBody>,
) -> impl Future<Output = Result<Response<Tracked>, Infallible>> {
    // An async block, not an async fn, and one block: its captures are
    // used where they are, where an async fn's state holds each argument
    // and then its moved copy, and a future awaited inside another is held
    // twice (the request head is 256 bytes; this future 2.9 KiB).
    async move {
        let resp = 'handled: {
            state.counters.requests.fetch_add(1, Ordering::Relaxed);
            let id = state.request_id();
            let start = Instant::now();
            // Kept for the refusal record; rendered as text only if one is written
            // (an allowed request's record is built in `forward` / `connect`).
            let method = req.method().clone();
            let uri = req.uri().clone();
            let is_connect = req.method() == Method::CONNECT;
            let record = |action: Action| {
                let target = uri.to_string();
                let ev = if is_connect {
                    // The authority, also of an absolute-form CONNECT target.
                    let authority = uri.authority().map_or(target.clone(), |a| a.to_string());
                    let (h, p) = split_authority(&authority);
                    AuditEvent::connect_tunnel(action, peer, &h, p)
                } else {
                    // Where the request was for, as far as its target says.
                    let mut ev = AuditEvent::proxy_request(action, peer, method.as_str(), &target);
                    if let Some(a) = uri.authority() {
                        if let Ok(h) = parse_host(a.host()) {
                            ev = ev.with_domain(host_text(&h));
                        }
                        if let Ok(p) = authority_port(a) {
                            ev = ev.with_destination_port(p.unwrap_or(80));
                        }
                    }
                    ev
                };
                ev.with_request_id(&id)
            };
            if state.limiter.load().check_key(&peer.ip()).is_err() {
                state.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                let r = Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "request rate limit for this client exceeded",
                );
                let ev = record(Action::Denied)
                    .with_reason(r.reason.clone())
                    .with_status(429);
                submit(&state.audit, ev, false).await;
                break 'handled refusal_response(&r, &id);
            }
            let policy = state.policy.load_full();
            let outcome = if is_connect {
                // Boxed: a tunnel's setup is rare next to plain requests, and its
                // state would otherwise enlarge every request's future.
                Box::pin(connect(&state, &policy, guard, peer, req, &id, start)).await
            } else {
                forward(&state, &slot, &policy, peer, req, &id, start).await
            };
            match outcome {
                Ok(resp) => resp,
                Err((r, dest)) => {
                    // 502 and 504 come after the policy allowed the request: the
                    // origin failed, palisade did not refuse. Auditors count
                    // `denied` as policy refusals only.
                    let upstream_failure = matches!(
                        r.status,
                        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
                    );
                    let action = if upstream_failure {
                        Action::Allowed
                    } else {
                        state.counters.denied.fetch_add(1, Ordering::Relaxed);
                        Action::Denied
                    };
                    let mut ev = record(action)
                        .with_reason(r.reason.clone())
                        .with_status(r.status.as_u16());
                    if let Some(rule) = &r.rule {
                        ev = ev.with_rule(rule, policy.sha256());
                    }
                    if let Some(d) = dest {
                        ev = ev.with_destination(d);
                    }
                    ev = ev.with_bytes(r.uploaded, 0, start.elapsed());
                    // A refusal is recorded before the client hears of it.
                    submit(&state.audit, ev, true).await;
                    refusal_response(&r, &id)
                }
            }
        };
        // In flight until hyper has sent the body and drops it.
        Ok(resp.map(|body| Tracked { body, activity }))
    }
}

/// Queues an audit record from a request's future, waiting for it to be
/// durable if `durable`. The record and the queueing state are boxed: an
/// `AuditEvent` is most of a KiB, and every request's future would carry
/// room for it otherwise, refused or not. (A plain function: as an async
/// one its own state, which holds the record until the box is made, would
/// sit in the caller's future.)
fn submit(audit: &AuditLog, ev: AuditEvent, durable: bool) -> impl Future<Output = ()> + '_ {
    Box::pin(async move {
        if let Ok(t) = audit.submit_async(&ev).await {
            if durable {
                let _ = t.durable().await;
            }
        }
    })
}

fn split_authority(a: &str) -> (String, u16) {
    match a.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.ends_with(':') => {
            (h.to_string(), p.parse().unwrap_or(0))
        }
        _ => (a.to_string(), 0),
    }
}

type Outcome = Result<Response<ProxyBody>, (Refusal, Option<SocketAddr>)>;

async fn admit(state: &State) -> Result<(), (Refusal, Option<SocketAddr>)> {
    state.audit.admit().map_err(|e| {
        (
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the audit trail cannot be written ({e}); new requests are refused"),
            ),
            None,
        )
    })
}

#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    state: &'a Arc<State>,
    slot: &'a Arc<upstream::Slot>,
    policy: &'a Arc<Policy>,
    peer: SocketAddr,
    mut req: Request<ClientBody>,
    id: &'a str,
    start: Instant,
) -> impl Future<Output = Outcome> + 'a {
    // An async block for the reason `handle_request` is one.
    async move {
        let uri = req.uri().clone();
        let Some(authority) = uri.authority().cloned() else {
            return Err((
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "a forward proxy needs an absolute URL (http://host/path)",
                ),
                None,
            ));
        };
        if uri.scheme_str() != Some("http") {
            return Err((
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "only http:// URLs are forwarded; HTTPS goes through CONNECT",
                ),
                None,
            ));
        }
        if !authority
            .as_str()
            .rsplit('@')
            .nth(1)
            .unwrap_or("")
            .is_empty()
        {
            return Err((
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "user information in the URL is not allowed",
                ),
                None,
            ));
        }
        let host = parse_host(authority.host())
            .map_err(|e| (Refusal::new(StatusCode::BAD_REQUEST, e.to_string()), None))?;
        let port = match authority_port(&authority) {
            Ok(p) => p.unwrap_or(80),
            Err(why) => return Err((Refusal::new(StatusCode::BAD_REQUEST, why), None)),
        };
        if req.headers().get_all(HOST).iter().nth(1).is_some() {
            // RFC 9112 section 3.2: a request with several Host fields is
            // refused; an origin could route by any one of them.
            return Err((
                Refusal::new(StatusCode::BAD_REQUEST, "several Host headers"),
                None,
            ));
        }
        // hyper takes the chunked framing off a request body; any other
        // transfer coding (`gzip, chunked`) would be lost on the way to the
        // origin, which would then read gzip as plain bytes. RFC 9112 section
        // 6.1: a server that does not understand a coding answers 501.
        let codings: Vec<&[u8]> = req
            .headers()
            .get_all(hyper::header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(|c| c.trim_ascii())
            .filter(|c| !c.is_empty())
            .collect();
        let chunked_only = matches!(codings.as_slice(), [c] if c.eq_ignore_ascii_case(b"chunked"));
        if !codings.is_empty() && !chunked_only {
            return Err((
                Refusal::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "a request transfer coding other than chunked",
                ),
                None,
            ));
        }
        check_host_header(req.headers(), &authority, &host, port, Some(80))
            .map_err(|r| (r, None))?;
        let (rule_name, _, rule) =
            decide(policy, peer.ip(), &host, port, req.method().as_str()).map_err(|r| (r, None))?;
        admit(state).await?;
        let method = req.method().as_str().to_string();
        // The record of a request a stop cuts while it waits: for its name's
        // lookup, then (with the address checked) for its origin.
        let cut_short = |dest: Option<SocketAddr>| {
            let mut ev = AuditEvent::proxy_request(Action::Allowed, peer, &method, uri_text(&uri))
                .with_request_id(id)
                .with_rule(&rule_name, policy.sha256())
                .with_reason(CUT_SHORT);
            if let Some(dest) = dest {
                ev = ev.with_destination(dest);
            }
            let ev = ev
                .with_domain(host_text(&host))
                .with_bytes(0, 0, start.elapsed());
            let _ = state.audit.try_record(&ev);
        };
        let dest = match resolve_known(state, policy, rule, &host, port) {
            Ok(known) => known,
            Err(name) => {
                let resolving = IfCut::new(|| cut_short(None));
                // Boxed: a lookup's state is large and most requests need
                // none.
                let dest = Box::pin(look_up_checked(state, policy, rule, &host, name, port)).await;
                resolving.done();
                dest
            }
        };
        let dest = dest.map_err(|r| (r, None))?;
        // The request goes out in origin form (path and query) on a connection
        // to exactly the checked address; the Host header keeps the name.
        // An absolute URI may have an empty path (`http://host?q`); origin
        // form needs one, so it becomes `/`.
        *req.uri_mut() = match uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => Uri::from(pq.clone()),
            Some(pq) => format!("/{}", pq.as_str())
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/")),
            None => Uri::from_static("/"),
        };
        let version = req.version();
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        // The client's `Expect: 100-continue` is answered on this hop: hyper
        // sends the 100 as soon as the body is read, which is when the origin
        // has its request head. Forwarded, it would only make the origin send
        // a second 100 that the client has no use for.
        headers.remove(hyper::header::EXPECT);
        if !headers.contains_key(HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(HOST, v);
            }
        }
        add_via(headers, version);
        let (connect_timeout, upstream_timeout) = {
            let c = state.config.load();
            (c.connect_timeout, c.upstream_timeout)
        };
        let cut = IfCut::new(|| cut_short(Some(dest)));
        let sent = slot
            .send(dest, req, connect_timeout, upstream_timeout)
            .await;
        cut.done();
        let (resp, uploaded) = match sent {
            Ok(r) => r,
            Err((f, uploaded)) => {
                let (status, reason) = match f {
                    upstream::Failure::Timeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("{dest} did not answer within {upstream_timeout:?}"),
                    ),
                    upstream::Failure::ConnectTimeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("connecting to {dest} timed out"),
                    ),
                    upstream::Failure::Connect(e) => (
                        StatusCode::BAD_GATEWAY,
                        format!("cannot connect to {dest}: {e}"),
                    ),
                    upstream::Failure::Upstream(e) => {
                        (StatusCode::BAD_GATEWAY, format!("upstream {dest}: {e}"))
                    }
                    upstream::Failure::Closed => (
                        StatusCode::BAD_GATEWAY,
                        format!("upstream {dest} closed the connection without answering"),
                    ),
                };
                return Err((
                    Refusal {
                        status,
                        reason,
                        rule: Some(rule_name),
                        uploaded,
                    },
                    Some(dest),
                ));
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        add_via(&mut parts.headers, parts.version);
        // The rest of the client's body was not read: the connection ends
        // after this answer (hyper would otherwise drain what it holds and
        // read on from the middle of an upload, or a next request would start
        // unwatched; see `Activity::body_left`).
        if parts.extensions.get::<upstream::BodyCutShort>().is_some() {
            parts
                .headers
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        // The client is answered in palisade's own HTTP version, whatever the
        // origin spoke (the body's framing was already read from its head).
        parts.version = hyper::Version::HTTP_11;
        let ev = AuditEvent::proxy_request(Action::Allowed, peer, method, uri_text(&uri))
            .with_request_id(id)
            .with_rule(rule_name, policy.sha256())
            .with_reason("allowed by rule")
            .with_destination(dest)
            .with_domain(host_text(&host))
            .with_status(parts.status.as_u16());
        let body = body::Recorded::new(body, ev, state.audit.clone(), start, uploaded);
        Ok(Response::from_parts(parts, ProxyBody::Origin(body)))
    }
}

async fn connect(
    state: &Arc<State>,
    policy: &Arc<Policy>,
    guard: Arc<ConnectionGuard>,
    peer: SocketAddr,
    mut req: Request<ClientBody>,
    id: &str,
    start: Instant,
) -> Outcome {
    let Some(authority) = req.uri().authority().cloned() else {
        return Err((
            Refusal::new(StatusCode::BAD_REQUEST, "CONNECT needs host:port"),
            None,
        ));
    };
    let port = match authority_port(&authority) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err((
                Refusal::new(StatusCode::BAD_REQUEST, "CONNECT needs host:port"),
                None,
            ))
        }
        Err(why) => return Err((Refusal::new(StatusCode::BAD_REQUEST, why), None)),
    };
    if authority.as_str().contains('@') {
        return Err((
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "user information in the CONNECT target is not allowed",
            ),
            None,
        ));
    }
    let host = parse_host(authority.host())
        .map_err(|e| (Refusal::new(StatusCode::BAD_REQUEST, e.to_string()), None))?;
    // A CONNECT's Host names the target too; one that names another host
    // (or port) is refused as for plain requests.
    check_host_header(req.headers(), &authority, &host, port, None).map_err(|r| (r, None))?;
    let (rule_name, plain_tunnel, rule) =
        decide(policy, peer.ip(), &host, port, "CONNECT").map_err(|r| (r, None))?;
    admit(state).await?;
    let cut = IfCut::new(|| {
        let ev = AuditEvent::connect_tunnel(Action::Allowed, peer, &host_text(&host), port)
            .with_request_id(id)
            .with_rule(&rule_name, policy.sha256())
            .with_reason(CUT_SHORT)
            .with_bytes(0, 0, start.elapsed());
        let _ = state.audit.try_record(&ev);
    });
    // Resolving and connecting, the two waits the cut-short record covers.
    let opened: Result<(SocketAddr, TcpStream), _> = async {
        let dest = resolve_checked(state, policy, rule, &host, port)
            .await
            .map_err(|r| (r, None))?;
        let connect_timeout = state.config.load().connect_timeout;
        match tokio::time::timeout(connect_timeout, TcpStream::connect(dest)).await {
            Ok(Ok(s)) => Ok((dest, s)),
            Ok(Err(e)) => Err((
                Refusal {
                    status: StatusCode::BAD_GATEWAY,
                    reason: format!("cannot connect to {dest}: {e}"),
                    rule: Some(rule_name.clone()),
                    uploaded: 0,
                },
                Some(dest),
            )),
            Err(_) => Err((
                Refusal {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    reason: format!("connecting to {dest} timed out"),
                    rule: Some(rule_name.clone()),
                    uploaded: 0,
                },
                Some(dest),
            )),
        }
    }
    .await;
    cut.done();
    let (dest, upstream) = opened?;
    let _ = upstream.set_nodelay(true);
    state.counters.tunnels.fetch_add(1, Ordering::Relaxed);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let st = state.clone();
    let sha = policy.sha256().to_string();
    let id = id.to_string();
    let host_t = host_text(&host);
    let decided = policy.clone();
    tokio::spawn(async move {
        // The tunnel is the client's connection from here on: it counts
        // against the limits until it closes.
        let _guard = guard;
        // Open tunnels are checked again when the policy changes.
        let open = st.tunnels.add(peer.ip(), host.clone(), port, dest);
        recheck_if_stale(&st, &decided, &open.tunnel);
        // The client is answered 200 as this task starts: the tunnel opens.
        let ev = AuditEvent::connect_tunnel(Action::Allowed, peer, &host_t, port)
            .with_request_id(&id)
            .with_rule(&rule_name, &sha)
            .with_destination(dest)
            .with_status(200)
            .with_start(Timestamp::now());
        // What the tunnel carried and the server name it saw, for its
        // record if it is ended from outside while open (the proxy
        // stopping, a policy that no longer allows it).
        let carried = tunnel::Carried::default();
        let server_name = std::sync::OnceLock::<String>::new();
        let base = ev.clone();
        let ended_from_outside = || {
            let (up, down) = carried.get();
            let ev = base.clone().with_bytes(up, down, start.elapsed());
            match server_name.get() {
                Some(name) => ev.with_server_name(name),
                None => ev,
            }
        };
        let cut = IfCut::new(|| {
            let ev = ended_from_outside()
                .with_reason(CUT_SHORT)
                .with_end(Timestamp::now());
            let _ = st.audit.try_record(&ev);
        });
        let opened = async {
            match on_upgrade.await.map(|u| u.downcast::<TokioIo<ClientIo>>()) {
                Ok(Ok(parts)) => {
                    // The client's socket itself, and what hyper had already read.
                    let client = parts.io.into_inner().stream;
                    let seen = Seen {
                        carried: &carried,
                        server_name: &server_name,
                        open: &open.tunnel,
                        decided: &decided,
                    };
                    tunnel(
                        &st,
                        client,
                        parts.read_buf,
                        upstream,
                        &host,
                        plain_tunnel,
                        ev,
                        start,
                        seen,
                    )
                    .await
                }
                Ok(Err(_)) => ev
                    .with_reason("internal error: the upgraded connection is not a TCP socket")
                    .with_bytes(0, 0, start.elapsed()),
                Err(e) => ev
                    .with_reason(format!("the client left before the tunnel opened: {e}"))
                    .with_bytes(0, 0, start.elapsed()),
            }
        };
        // A policy that no longer allows the tunnel ends it: its sockets
        // close with the relay, and its record says why.
        let ev = tokio::select! {
            ev = opened => ev,
            revocation = open.tunnel.revoked() => ended_from_outside().cut(
                &format!("the policy now in force no longer allows it: {}", revocation.why),
                revocation.rule.as_deref(),
                &revocation.ruleset,
            ),
        };
        cut.done();
        // A tunnel refused after its CONNECT (what it sent first, or a
        // policy that no longer allows it) is a denial like any other.
        if ev.event.action == Action::Denied {
            st.counters.denied.fetch_add(1, Ordering::Relaxed);
        }
        let _ = st.audit.submit_async(&ev.with_end(Timestamp::now())).await;
    });
    let mut resp = Response::new(ProxyBody::full(Bytes::new()));
    add_via(resp.headers_mut(), hyper::Version::HTTP_11);
    Ok(resp)
}

/// A tunnel decided under `decided`: if another policy is in force by now
/// (a reload between its decision and this), it is checked against that
/// one, since the reload's own check of open tunnels may have missed it.
fn recheck_if_stale(state: &State, decided: &Arc<Policy>, t: &tunnel::OpenTunnel) {
    let now = state.policy.load();
    if !Arc::ptr_eq(&now, decided) {
        if let Some(why) = tunnel_refusal(&now, t) {
            t.revoke(why);
        }
    }
}

/// What an open tunnel's task sees of it while it runs: bytes carried and
/// the server name (for its record if it is cut), its place among the open
/// tunnels, and the policy it was decided under.
struct Seen<'a> {
    carried: &'a tunnel::Carried,
    server_name: &'a std::sync::OnceLock<String>,
    open: &'a tunnel::OpenTunnel,
    decided: &'a Arc<Policy>,
}

/// Checks the tunnel's first bytes, then relays until either side closes or
/// the tunnel idles out. Returns the finished audit event.
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    state: &State,
    mut client: TcpStream,
    pre: Bytes,
    mut upstream: TcpStream,
    host: &Host,
    plain_tunnel: bool,
    ev: AuditEvent,
    start: Instant,
    seen: Seen<'_>,
) -> AuditEvent {
    let Seen {
        carried,
        server_name,
        open,
        decided,
    } = seen;
    let mut buf = Vec::with_capacity(2048);
    buf.extend_from_slice(&pre);
    let (first_bytes_timeout, idle_timeout) = {
        let c = state.config.load();
        (c.tunnel_first_bytes_timeout, c.tunnel_idle_timeout)
    };
    let deadline = tokio::time::Instant::now() + first_bytes_timeout;
    let first = loop {
        match sni::inspect(&buf) {
            sni::FirstBytes::Incomplete { need } if need <= sni::MAX_RECORD => {
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        return ev
                            .with_reason("the client closed the tunnel before sending anything")
                            .with_bytes(buf.len() as u64, 0, start.elapsed())
                    }
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    Err(_) => {
                        let mut ev = ev
                            .with_reason("no bytes from the client within the first-bytes timeout");
                        ev.event.action = Action::Denied;
                        return ev.with_bytes(buf.len() as u64, 0, start.elapsed());
                    }
                }
            }
            other => break other,
        }
    };
    let deny = |ev: AuditEvent, reason: String| {
        let mut ev = ev.with_reason(reason.clone());
        ev.event.action = Action::Denied;
        ev
    };
    let ev = match (&first, host) {
        (
            sni::FirstBytes::ClientHello {
                server_name: Some(name),
                offers_ech,
            },
            Host::Name(h),
        ) => {
            let _ = server_name.set(name.clone());
            let ev = ev.with_server_name(name);
            match crate::policy::normalize_host(name) {
                Some(n) if n == *h && *offers_ech => ev.with_reason(
                    "allowed by rule; TLS server name matches; the ClientHello offers ECH (an inner name, if any, is not readable)",
                ),
                Some(n) if n == *h => ev.with_reason("allowed by rule; TLS server name matches"),
                _ => {
                    let _ = client.shutdown().await;
                    return deny(ev, format!("TLS server name {name} does not match the CONNECT host {h} (domain fronting)"))
                        .with_bytes(buf.len() as u64, 0, start.elapsed());
                }
            }
        }
        (
            sni::FirstBytes::ClientHello {
                server_name: Some(name),
                ..
            },
            Host::Ip(ip),
        ) => {
            let ev = ev.with_server_name(name);
            let _ = client.shutdown().await;
            return deny(
                ev,
                format!("TLS server name {name} was sent to an IP literal CONNECT {ip}"),
            )
            .with_bytes(buf.len() as u64, 0, start.elapsed());
        }
        (
            sni::FirstBytes::ClientHello {
                server_name: None, ..
            },
            Host::Ip(_),
        ) => ev.with_reason("allowed by rule for this address; no TLS server name"),
        (
            sni::FirstBytes::ClientHello {
                server_name: None, ..
            },
            Host::Name(h),
        ) => {
            let _ = client.shutdown().await;
            return deny(
                ev,
                format!("TLS ClientHello without a server name for CONNECT {h}"),
            )
            .with_bytes(buf.len() as u64, 0, start.elapsed());
        }
        (sni::FirstBytes::Ambiguous { reason }, _) => {
            let _ = client.shutdown().await;
            return deny(
                ev,
                format!("TLS ClientHello with an unclear server name: {reason}"),
            )
            .with_bytes(buf.len() as u64, 0, start.elapsed());
        }
        (_, _) if plain_tunnel => {
            open.plain.store(true, Ordering::Release);
            recheck_if_stale(state, decided, open);
            ev.with_reason("allowed by rule; plain tunnel")
        }
        (_, _) => {
            let _ = client.shutdown().await;
            return deny(ev, "the tunnel does not start with a TLS ClientHello and the rule does not allow plain tunnels".to_string())
                .with_bytes(buf.len() as u64, 0, start.elapsed());
        }
    };
    // The tunnel opens: a record of it goes into the trail now, so that
    // it is there while the tunnel is open, however long that is, and if
    // the proxy dies before it ends. One the trail cannot take (it is
    // failing, fail-closed) means the tunnel does not open.
    let mut opening = ev.clone();
    opening.event.code = RecordKind::TunnelOpen;
    if let Err(e) = state.audit.submit_async(&opening).await {
        let _ = client.shutdown().await;
        return deny(
            ev,
            format!("the audit trail cannot take the tunnel's opening record ({e})"),
        )
        .with_bytes(buf.len() as u64, 0, start.elapsed());
    }
    if upstream.write_all(&buf).await.is_err() {
        return ev.with_bytes(buf.len() as u64, 0, start.elapsed());
    }
    carried
        .up
        .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
    tunnel::relay(&mut client, &mut upstream, idle_timeout, carried).await;
    let (up, down) = carried.get();
    ev.with_bytes(up, down, start.elapsed())
}
