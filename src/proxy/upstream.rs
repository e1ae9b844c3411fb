//! Origin connections for plain HTTP forwarding.
//!
//! Each client connection keeps at most one origin connection, and drives
//! it in its own task: a request and its response cross no task or thread
//! on the way, and no pool is consulted per request. The origin connection
//! is reused while the client's next request goes to the same checked
//! address (IP and port) and dialled again when it goes elsewhere. When the
//! client leaves, an idle origin connection is parked, keyed by that exact
//! address, for the next client connection that goes there; a parked one is
//! not polled, and one the origin closed meanwhile is noticed on its first
//! poll and dialled again.

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

type Conn = Connection<TokioIo<TcpStream>, Incoming>;

/// An origin connection: the handle requests go through, and the
/// connection state machine that has to be polled for them to move.
struct Held {
    addr: SocketAddr,
    sender: SendRequest<Incoming>,
    conn: Pin<Box<Conn>>,
}

/// Why a request got no response from the origin.
pub enum Failure {
    Connect(std::io::Error),
    ConnectTimeout,
    Upstream(hyper::Error),
    /// The origin closed a new connection before the request was written.
    Closed,
    Timeout,
}

/// The origin connection of one client connection.
#[derive(Default)]
pub struct Slot {
    held: Mutex<Option<Held>>,
}

impl Slot {
    fn with<R>(&self, f: impl FnOnce(&mut Option<Held>) -> R) -> R {
        let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Polls the origin connection, if there is one. Called by the client
    /// connection's task every time it is woken, after the client side.
    pub fn poll_drive(&self, cx: &mut Context<'_>) {
        self.with(|h| {
            if let Some(held) = h.as_mut() {
                if held.conn.as_mut().poll(cx).is_ready() {
                    // Closed by the origin or failed: a request waiting for
                    // it looks again.
                    *h = None;
                    cx.waker().wake_by_ref();
                }
            }
        })
    }

    /// Sends `req` to `addr`: on the held connection if it goes there and
    /// is still open, else on a parked one, else on a new one.
    pub async fn send(
        &self,
        idle: &IdlePool,
        addr: SocketAddr,
        mut req: Request<Incoming>,
        connect_timeout: Duration,
        upstream_timeout: Duration,
    ) -> Result<Response<Incoming>, Failure> {
        let attempt = async {
            // At most two tries on connections that already carried a
            // request (the origin may close one at any moment), then one
            // on a new connection.
            let mut reused_tries = 2;
            loop {
                let reused = self.with(|h| match h {
                    Some(held) if held.addr == addr && !held.sender.is_closed() => true,
                    other => {
                        if let Some(old) = other.take() {
                            idle.put(old);
                        }
                        *other = idle.take(addr);
                        other.is_some()
                    }
                });
                if !reused || reused_tries == 0 {
                    break;
                }
                reused_tries -= 1;
                match self.send_held(req).await {
                    Ok(r) => return Ok(r),
                    Err(Retry::Again(r)) => {
                        self.with(|h| *h = None);
                        req = r;
                    }
                    Err(Retry::Failed(e)) => {
                        self.with(|h| *h = None);
                        return Err(Failure::Upstream(e));
                    }
                    Err(Retry::Closed) => {
                        self.with(|h| *h = None);
                        return Err(Failure::Closed);
                    }
                }
            }
            self.with(|h| *h = None);
            let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(Failure::Connect(e)),
                Err(_) => return Err(Failure::ConnectTimeout),
            };
            let _ = stream.set_nodelay(true);
            let (sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(Failure::Upstream)?;
            self.with(|h| {
                *h = Some(Held {
                    addr,
                    sender,
                    conn: Box::pin(conn),
                })
            });
            match self.send_held(req).await {
                Ok(r) => Ok(r),
                Err(Retry::Failed(e)) => {
                    self.with(|h| *h = None);
                    Err(Failure::Upstream(e))
                }
                Err(Retry::Again(_)) | Err(Retry::Closed) => {
                    self.with(|h| *h = None);
                    Err(Failure::Closed)
                }
            }
        };
        match tokio::time::timeout(upstream_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                // A request may be in flight on it: never reuse.
                self.with(|h| *h = None);
                Err(Failure::Timeout)
            }
        }
    }

    /// Sends on the held connection once it can take a request. The request
    /// comes back (`Again`) if the connection closed before any of it was
    /// written.
    async fn send_held(&self, req: Request<Incoming>) -> Result<Response<Incoming>, Retry> {
        let ready = poll_fn(|cx| {
            self.with(|h| match h.as_mut() {
                None => Poll::Ready(false),
                Some(held) => held.sender.poll_ready(cx).map(|r| r.is_ok()),
            })
        })
        .await;
        if !ready {
            return Err(Retry::Again(req));
        }
        let sent = self.with(|h| h.as_mut().map(|held| held.sender.try_send_request(req)));
        let Some(sent) = sent else {
            // Unreachable: the slot is only emptied by this task, and
            // nothing ran between the two locks.
            return Err(Retry::Closed);
        };
        sent.await.map_err(|mut e| match e.take_message() {
            Some(req) => Retry::Again(req),
            None => Retry::Failed(e.into_error()),
        })
    }

    /// Hands an idle origin connection to the pool when the client leaves.
    pub fn park(&self, idle: &IdlePool) {
        if let Some(held) = self.with(|h| h.take()) {
            idle.put(held);
        }
    }
}

// The request comes back whole to be sent again; the `Ok` side (a response)
// is as large, so boxing it would save nothing.
#[allow(clippy::large_enum_variant)]
enum Retry {
    Again(Request<Incoming>),
    Failed(hyper::Error),
    Closed,
}

/// Idle origin connections of clients that left, by the address they go
/// to; the newest is handed out first.
pub struct IdlePool {
    inner: Mutex<Idle>,
    max: usize,
    max_age: Duration,
}

#[derive(Default)]
struct Idle {
    by_addr: HashMap<SocketAddr, Vec<(Held, Instant)>>,
    count: usize,
    swept: Option<Instant>,
}

impl IdlePool {
    /// Keeps at most `max` connections, none longer than `max_age`.
    pub fn new(max: usize, max_age: Duration) -> IdlePool {
        IdlePool {
            inner: Mutex::new(Idle::default()),
            max,
            max_age,
        }
    }

    fn take(&self, addr: SocketAddr) -> Option<Held> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let idle = &mut *g;
        let list = idle.by_addr.get_mut(&addr)?;
        let got = list.pop();
        idle.count -= got.is_some() as usize;
        if list.is_empty() {
            idle.by_addr.remove(&addr);
        }
        match got {
            Some((held, at)) if at.elapsed() < self.max_age => Some(held),
            // The newest is too old: so are the others.
            Some(_) => {
                if let Some(list) = idle.by_addr.remove(&addr) {
                    idle.count -= list.len();
                }
                None
            }
            None => None,
        }
    }

    /// Parks `held` if it is idle (its last response complete) and open.
    fn put(&self, held: Held) {
        if !held.sender.is_ready() || self.max == 0 {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let idle = &mut *g;
        let now = Instant::now();
        if idle
            .swept
            .is_none_or(|t| now.duration_since(t) >= self.max_age / 4)
        {
            idle.swept = Some(now);
            let max_age = self.max_age;
            let mut dropped = 0;
            idle.by_addr.retain(|_, list| {
                let before = list.len();
                list.retain(|(_, at)| now.duration_since(*at) < max_age);
                dropped += before - list.len();
                !list.is_empty()
            });
            idle.count -= dropped;
        }
        if idle.count >= self.max {
            return;
        }
        idle.count += 1;
        idle.by_addr.entry(held.addr).or_default().push((held, now));
    }
}
