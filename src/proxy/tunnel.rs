//! The byte relay of an admitted CONNECT tunnel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Relays both ways until both sides are done or nothing moves for `idle`.
/// Bytes go socket → pipe → socket with `splice(2)`, never through user
/// space. Returns (bytes client→server, bytes server→client).
pub(super) async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
) -> (u64, u64) {
    let last = AtomicU64::new(0);
    let (sent_up, sent_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let epoch = Instant::now();
    let touch = || last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (c, u) = (&*client, &*upstream);
    let up = splice_pump(c, u, &sent_up, &touch);
    let down = splice_pump(u, c, &sent_down, &touch);
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
    (
        sent_up.load(Ordering::Relaxed),
        sent_down.load(Ordering::Relaxed),
    )
}

/// Largest chunk moved per splice, and the pipe size asked for.
const SPLICE_CHUNK: usize = 1 << 18;

/// One direction of a tunnel: `from` → pipe → `to`, until `from` ends or
/// either side fails; then the end is passed on (`to` is shut for writing).
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
    // The default 64 KiB pipe caps each round (wait readable, splice in,
    // wait writable, splice out) at 64 KiB; a larger one moves what the
    // socket holds in one round. Pages are only used while bytes sit in the
    // pipe. Refused (over the per-user pipe limit): the default stays.
    let _ = rustix::pipe::fcntl_setpipe_size(&pipe_w, SPLICE_CHUNK);
    'outer: loop {
        let n = loop {
            if from.readable().await.is_err() {
                break 'outer;
            }
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe_w, None, SPLICE_CHUNK, flags).map_err(std::io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break 'outer,
            }
        };
        if n == 0 {
            break;
        }
        touch();
        let mut left = n;
        while left > 0 {
            if to.writable().await.is_err() {
                return;
            }
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe_r, None, to, None, left, flags).map_err(std::io::Error::from)
            }) {
                Ok(k) => {
                    left -= k;
                    sent.fetch_add(k as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    }
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
}
