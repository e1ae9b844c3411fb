//! The byte relay of an admitted CONNECT tunnel, and the register of open
//! tunnels that a policy change checks again.

use super::Host;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The tunnels open now. A tunnel is decided when it opens, and may then
/// carry bytes for as long as it keeps moving; when the policy in force
/// changes (a reload, a rule's expiry), each is checked again and the ones
/// it no longer allows are cut, as the filter cuts its tracked flows.
#[derive(Default)]
pub(super) struct OpenTunnels {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<OpenTunnel>>>,
}

/// Why the policy now in force no longer allows an open tunnel: the
/// reason, and the rule of that policy that decided so (none when no rule
/// did: an internal address no rule names) with the policy's sha256.
pub(super) struct Revocation {
    pub why: String,
    pub rule: Option<String>,
    pub ruleset: String,
}

/// What a tunnel was decided on, and its cut signal.
pub(super) struct OpenTunnel {
    pub peer: IpAddr,
    pub host: Host,
    pub port: u16,
    /// The address it connected to (checked when it opened).
    pub dest: SocketAddr,
    /// Its first bytes were not a TLS ClientHello: a plain tunnel.
    pub plain: AtomicBool,
    /// Why the policy in force no longer allows it, once it does not.
    revoked: OnceLock<Revocation>,
    cut: tokio::sync::Notify,
}

/// A tunnel's place in [`OpenTunnels`], given up when dropped.
pub(super) struct Registered {
    tunnels: Arc<OpenTunnels>,
    id: u64,
    pub tunnel: Arc<OpenTunnel>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.tunnels.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl OpenTunnels {
    pub fn add(
        self: &Arc<Self>,
        peer: IpAddr,
        host: Host,
        port: u16,
        dest: SocketAddr,
    ) -> Registered {
        let tunnel = Arc::new(OpenTunnel {
            peer,
            host,
            port,
            dest,
            plain: AtomicBool::new(false),
            revoked: OnceLock::new(),
            cut: tokio::sync::Notify::new(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, tunnel.clone());
        }
        Registered {
            tunnels: self.clone(),
            id,
            tunnel,
        }
    }

    /// Cuts every open tunnel for which `denied` gives a reason; returns
    /// how many.
    pub fn revoke_where(&self, denied: impl Fn(&OpenTunnel) -> Option<Revocation>) -> usize {
        let open: Vec<Arc<OpenTunnel>> = match self.open.lock() {
            Ok(open) => open.values().cloned().collect(),
            Err(_) => return 0,
        };
        open.iter()
            .filter_map(|t| denied(t).map(|why| t.revoke(why)))
            .filter(|&cut| cut)
            .count()
    }
}

impl OpenTunnel {
    /// Cuts the tunnel for `why`; false if it was already cut.
    pub fn revoke(&self, why: Revocation) -> bool {
        let first = self.revoked.set(why).is_ok();
        if first {
            // A permit is kept if the tunnel is not waiting yet.
            self.cut.notify_one();
        }
        first
    }

    /// Waits until the tunnel is cut; returns why.
    pub async fn revoked(&self) -> &Revocation {
        loop {
            if let Some(why) = self.revoked.get() {
                return why;
            }
            self.cut.notified().await;
        }
    }
}

/// Bytes a tunnel has carried so far, each way; readable while it runs
/// (for the record of a tunnel the proxy's stop cuts short).
#[derive(Default)]
pub(super) struct Carried {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Carried {
    pub fn get(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// Relays both ways until both sides are done or nothing moves for `idle`.
/// Bytes go socket → pipe → socket with `splice(2)`, never through user
/// space, and are counted into `carried` as they go.
pub(super) async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    carried: &Carried,
) {
    let last = AtomicU64::new(0);
    let (sent_up, sent_down) = (&carried.up, &carried.down);
    let epoch = Instant::now();
    let touch = || last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (c, u) = (&*client, &*upstream);
    let up = splice_pump(c, u, sent_up, &touch);
    let down = splice_pump(u, c, sent_down, &touch);
    let watchdog = async {
        loop {
            tokio::time::sleep(idle / 4 + Duration::from_millis(10)).await;
            let quiet =
                (epoch.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
            if quiet >= idle.as_millis() as u64 {
                break;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = watchdog => {}
    }
}

/// Largest chunk moved per splice, and the pipe size asked for.
const SPLICE_CHUNK: usize = 1 << 18;

/// One direction of a tunnel: `from` → pipe → `to`, until `from` ends or
/// either side fails; then the end is passed on (`to` is shut for writing).
///
/// The pump is pipelined: it reads from `from` whenever the pipe has room
/// and writes to `to` whenever the pipe holds bytes, so the sender is not
/// stalled while the receiver drains, and the receiver is fed while more
/// arrives. Bytes in flight are bounded by the pipe.
async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    sent: &AtomicU64,
    touch: &(dyn Fn() + Sync),
) {
    use rustix::pipe::{pipe, splice, SpliceFlags};
    use tokio::io::Interest;
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let Ok((pipe_r, pipe_w)) = pipe() else {
        return;
    };
    // The default 64 KiB pipe caps the bytes in flight at 64 KiB; a larger
    // one lets a round move what the socket holds. Pages are only used
    // while bytes sit in the pipe. Refused (over the per-user pipe limit):
    // the default stays.
    let _ = rustix::pipe::fcntl_setpipe_size(&pipe_w, SPLICE_CHUNK);
    // Bytes in the pipe; whether `from` has ended (or failed: what was read
    // is still delivered); whether the pipe had no room at the last try.
    let (mut held, mut eof, mut full) = (0usize, false, false);
    loop {
        if eof && held == 0 {
            break;
        }
        let (want_read, want_write) = (!eof && !full, held > 0);
        // Awaiting readiness (rather than looping on the syscalls) also
        // spends the task's cooperative budget, so a busy tunnel yields.
        tokio::select! {
            biased;
            r = to.writable(), if want_write => if r.is_err() { return },
            r = from.readable(), if want_read => if r.is_err() { eof = true },
        }
        if !eof && !full {
            // EAGAIN from a splice into a pipe with bytes in it may mean the
            // pipe is full rather than the socket empty (the pipe counts
            // pages, not bytes): then the socket's readiness must stay, or
            // its next wake-up would never come. Only this task touches the
            // pipe, so a zero-timeout poll of its write end tells which.
            let r = from.try_io(Interest::READABLE, || {
                match splice(from, None, &pipe_w, None, SPLICE_CHUNK, flags) {
                    Ok(n) => Ok(Some(n)),
                    Err(rustix::io::Errno::AGAIN) if held > 0 && !pipe_has_room(&pipe_w) => {
                        Ok(None)
                    }
                    Err(e) => Err(std::io::Error::from(e)),
                }
            });
            match r {
                Ok(Some(0)) => eof = true,
                Ok(Some(n)) => {
                    held += n;
                    touch();
                }
                Ok(None) => full = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => eof = true,
            }
        }
        if held > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe_r, None, to, None, held, flags).map_err(std::io::Error::from)
            }) {
                Ok(k) => {
                    held -= k;
                    full = false;
                    sent.fetch_add(k as u64, Ordering::Relaxed);
                    touch();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
}

/// Whether a pipe can take at least one more buffer.
fn pipe_has_room(pipe_w: &std::os::fd::OwnedFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(pipe_w, PollFlags::OUT)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}
