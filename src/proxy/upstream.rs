//! Origin connections for plain HTTP forwarding.
//!
//! Each client connection keeps at most one origin connection. A request
//! is written to it and the response read from it by the client
//! connection's own task: the response head is parsed here and the body is
//! read from the origin socket as the client side asks for it, with no
//! task, channel or connection state machine in between. An idle origin
//! connection is a bare socket: read buffers exist only while a response is
//! arriving, so hundreds of kept-alive clients cost little memory.
//!
//! The origin connection is reused while the client's next request goes to
//! the same checked address (IP and port) and dialled again when it goes
//! elsewhere. When the client leaves, an idle origin connection is parked,
//! keyed by that exact address, for the next client connection that goes
//! there. A connection is reused only after a response whose end its
//! framing marked exactly (RFC 9112 §6.3), with nothing after it, that did
//! not ask to close; one that sent anything while idle, or closed, is
//! dropped when it is next taken.

use super::body::ClientBody;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode, Version};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Bytes asked of the socket per read; a response head and a small body
/// usually arrive in one.
const READ_SIZE: usize = 8 * 1024;
/// The first read of a response head: most heads, and a small body
/// after one, fit. Kept small because a buffer exists for every response
/// in flight (hundreds of them at once on a busy proxy).
const HEAD_READ_SIZE: usize = 2 * 1024;
/// Reads of a long body use larger buffers, up to this.
const READ_SIZE_MAX: usize = 64 * 1024;
/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Interim (1xx) responses skipped before the final one.
const MAX_INTERIM: usize = 8;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// The largest trailer section of a chunked body (discarded).
const MAX_TRAILERS: usize = 16 * 1024;

/// An origin connection and the address it goes to.
struct Origin {
    addr: SocketAddr,
    stream: TcpStream,
}

impl Origin {
    /// True if the origin neither closed nor sent anything since the last
    /// response ended: bytes from an idle origin answer no request, and the
    /// connection cannot be trusted with the next one.
    ///
    /// The socket itself is asked (a peek that does not block), not only
    /// the runtime's record of readiness, which lags until the runtime
    /// next polls for events: bytes that arrived just before would
    /// otherwise be taken for the start of the next response. The peek
    /// goes through the runtime when it holds a readiness flag, so a flag
    /// left over from the last response is cleared when nothing is there:
    /// the wait for the next response then neither returns at once nor
    /// allocates its read buffer before the origin has answered.
    fn still_idle(&self) -> bool {
        use rustix::net::{recv, RecvFlags};
        let peek = || {
            let mut probe = [0u8; 1];
            match recv(
                &self.stream,
                &mut probe,
                RecvFlags::PEEK | RecvFlags::DONTWAIT,
            ) {
                Err(rustix::io::Errno::AGAIN) => Err(io::ErrorKind::WouldBlock.into()),
                // Closed, failed, or it spoke: not idle.
                _ => Ok(()),
            }
        };
        let peeked = std::cell::Cell::new(false);
        match self.stream.try_io(tokio::io::Interest::READABLE, || {
            peeked.set(true);
            peek()
        }) {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => peeked.get() || peek().is_err(),
            Err(_) => false,
        }
    }
}

/// Why a request got no response from the origin.
pub enum Failure {
    Connect(io::Error),
    ConnectTimeout,
    /// The origin sent something that is not a valid response, or failed
    /// while the request was written or the response head read.
    Upstream(String),
    /// The origin closed a new connection before it answered.
    Closed,
    Timeout,
}

/// The origin connection of one client connection, and the pool of idle
/// origin connections of the serving thread the client is on (an origin
/// connection belongs to that thread's event loop, so it is reused only
/// there).
pub struct Slot {
    held: Mutex<Option<Origin>>,
    pool: Arc<IdlePool>,
}

/// How a request body is framed toward the origin.
#[derive(Clone, Copy, PartialEq, Debug)]
enum RequestBody {
    None,
    /// The client's Content-Length is forwarded; bytes go as they are.
    Length,
    Chunked,
}

/// One try of a request on one connection failed.
enum TryFailure {
    /// Nothing of the request can have been acted on (a reused connection
    /// that was closed under it): another connection may take it.
    Retry,
    Failed(Failure),
}

impl Slot {
    pub fn new(pool: Arc<IdlePool>) -> Slot {
        Slot {
            held: Mutex::new(None),
            pool,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Option<Origin>) -> R) -> R {
        let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Sends `req` to `addr`: on the held connection if it goes there and
    /// is still idle, else on a parked one, else on a new one. The response
    /// body reads from the origin connection and hands it back here once
    /// the response has ended cleanly. Also returns how many bytes of the
    /// request body went to the origin, on failure too.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<ClientBody>,
        connect_timeout: Duration,
        upstream_timeout: Duration,
    ) -> Result<(Response<OriginBody>, u64), (Failure, u64)> {
        // The request's head is rendered and its headers dropped here, not
        // kept in this future while the origin answers.
        let Outgoing {
            head,
            framing,
            mut body,
            head_only,
            repeatable,
        } = Outgoing::new(req);
        let sent = Sent::new();
        // The origin has `upstream_timeout` to take each part of the
        // request body and, once it has all of it, to answer: an upload
        // may take as long as it keeps moving.
        let attempt = std::pin::pin!(async {
            // At most two tries on connections that already carried a
            // request (the origin may close one at any moment), then one
            // on a new connection.
            let mut reused_tries = 2;
            while reused_tries > 0 {
                let taken = self.with(|h| match h.take() {
                    Some(o) if o.addr == addr => Some(o),
                    other => {
                        if let Some(old) = other {
                            self.pool.put(old);
                        }
                        self.pool.take(addr)
                    }
                });
                let Some(origin) = taken else { break };
                reused_tries -= 1;
                if !origin.still_idle() {
                    continue;
                }
                match self
                    .exchange(
                        origin,
                        &head,
                        framing,
                        &mut body,
                        &sent,
                        head_only,
                        upstream_timeout,
                    )
                    .await
                {
                    Ok(r) => return Ok(r),
                    Err(TryFailure::Retry) if repeatable => continue,
                    Err(TryFailure::Retry) => return Err(Failure::Closed),
                    Err(TryFailure::Failed(f)) => return Err(f),
                }
            }
            // Boxed, as is the request body's copy below: their state is
            // needed by few requests and would enlarge every one's future.
            let stream = match Box::pin(tokio::time::timeout(
                connect_timeout,
                TcpStream::connect(addr),
            ))
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(Failure::Connect(e)),
                Err(_) => return Err(Failure::ConnectTimeout),
            };
            let _ = stream.set_nodelay(true);
            let origin = Origin { addr, stream };
            match self
                .exchange(
                    origin,
                    &head,
                    framing,
                    &mut body,
                    &sent,
                    head_only,
                    upstream_timeout,
                )
                .await
            {
                Ok(r) => Ok(r),
                Err(TryFailure::Retry) => Err(Failure::Closed),
                Err(TryFailure::Failed(f)) => Err(f),
            }
        });
        // Pinned here, not moved into the wait: an async fn that takes the
        // future by value keeps room for it twice, and this one is large
        // (measured: 1 MiB more peak memory at 500 connections).
        let attempt = within_progress(upstream_timeout, &sent, attempt).await;
        // A connection a request was in flight on is never put back.
        let sent = sent.bytes();
        match attempt {
            Ok(Ok(resp)) => Ok((resp, sent)),
            Ok(Err(f)) => Err((f, sent)),
            Err(_) => Err((Failure::Timeout, sent)),
        }
    }

    /// Writes the request on `origin` and reads the response head.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        self: &Arc<Self>,
        mut origin: Origin,
        head: &[u8],
        framing: RequestBody,
        body: &mut ClientBody,
        sent: &Sent,
        head_only: bool,
        upstream_timeout: Duration,
    ) -> Result<Response<OriginBody>, TryFailure> {
        if origin.stream.write_all(head).await.is_err() {
            // The origin never got a whole request head.
            return Err(TryFailure::Retry);
        }
        let mut answered_early = false;
        if framing != RequestBody::None {
            // The origin may answer before the whole body is sent (a 413, a
            // redirect, an auth challenge) and stop reading: its answer is
            // forwarded then, not a timeout, and the rest of the body is
            // not sent.
            // An interim answer (a 100 Continue the origin sends of its own
            // accord) asks for the body: it is sent on, and the interim
            // answer is skipped with the final head.
            let (mut rd, mut wr) = origin.stream.split();
            let mut probe = [0u8; 16];
            let mut send = Box::pin(send_body(&mut wr, body, framing, sent));
            let mut watch = true;
            loop {
                tokio::select! {
                    biased;
                    r = rd.peek(&mut probe), if watch => {
                        let n = r.unwrap_or(0);
                        if n > 0 && is_interim_status(&probe[..n]) {
                            watch = false;
                        } else {
                            answered_early = true;
                            break;
                        }
                    }
                    r = &mut send => {
                        r.map_err(|e| TryFailure::Failed(Failure::Upstream(e)))?;
                        break;
                    }
                }
            }
        }
        // After an early answer the request body stopped midway: the
        // connection's framing is lost, so it is not used again; and the
        // response says so, for the client's connection to close after it.
        let mut r = self
            .receive(origin, head_only, !answered_early, upstream_timeout)
            .await;
        if let (true, Ok(resp)) = (answered_early, &mut r) {
            resp.extensions_mut().insert(BodyCutShort);
        }
        r
    }

    /// Reads the response head from `origin`; the body reads the rest. The
    /// connection goes back for reuse after it only if `reusable`.
    async fn receive(
        self: &Arc<Self>,
        mut origin: Origin,
        head_only: bool,
        reusable: bool,
        upstream_timeout: Duration,
    ) -> Result<Response<OriginBody>, TryFailure> {
        let (head, rest) = match read_head(&mut origin.stream, head_only).await {
            Ok(x) => x,
            Err(HeadError::Nothing) => return Err(TryFailure::Retry),
            Err(HeadError::Invalid(e)) => return Err(TryFailure::Failed(Failure::Upstream(e))),
        };
        let mut parts = Response::new(()).into_parts().0;
        parts.status = head.status;
        parts.version = head.version;
        parts.headers = head.headers;
        let mut body = OriginBody {
            origin: Some(origin),
            slot: self.clone(),
            buf: rest,
            framing: head.framing,
            keep_alive: head.keep_alive && reusable,
            eof: false,
            done: false,
            read_size: READ_SIZE,
            timeout: upstream_timeout,
            timer: None,
        };
        body.settle();
        Ok(Response::from_parts(parts, body))
    }

    /// Takes an origin connection back after a response that ended cleanly.
    fn give_back(&self, origin: Origin) {
        self.with(|h| *h = Some(origin));
    }

    /// Hands an idle origin connection to the pool when the client leaves.
    pub fn park(&self) {
        if let Some(o) = self.with(|h| h.take()) {
            self.pool.put(o);
        }
    }
}

/// A request as it goes to the origin.
struct Outgoing {
    head: Vec<u8>,
    framing: RequestBody,
    body: ClientBody,
    head_only: bool,
    /// It may go again on another connection: the origin cannot have
    /// acted on it if it closed without answering (no body was sent and
    /// the method is safe to repeat).
    repeatable: bool,
}

impl Outgoing {
    fn new(req: Request<ClientBody>) -> Outgoing {
        let (parts, body) = req.into_parts();
        let framing = request_framing(&parts.headers, &body);
        Outgoing {
            head: request_head(&parts, framing),
            framing,
            body,
            head_only: parts.method == Method::HEAD,
            repeatable: framing == RequestBody::None
                && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS),
        }
    }
}

/// How the client's request body goes to the origin: as it came if its
/// length is known, chunked if it is not.
fn request_framing(headers: &HeaderMap, body: &ClientBody) -> RequestBody {
    if body.is_end_stream() && !headers.contains_key(CONTENT_LENGTH) {
        RequestBody::None
    } else if headers.contains_key(CONTENT_LENGTH) {
        RequestBody::Length
    } else {
        RequestBody::Chunked
    }
}

/// The request head as it goes to the origin: origin-form target, HTTP/1.1,
/// the headers as they are (hop-by-hop ones already removed, names in
/// lower case).
fn request_head(parts: &hyper::http::request::Parts, framing: RequestBody) -> Vec<u8> {
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let mut len = parts.method.as_str().len() + target.len() + 32;
    for (n, v) in &parts.headers {
        len += n.as_str().len() + v.len() + 4;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in &parts.headers {
        if framing == RequestBody::Chunked && n == CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if framing == RequestBody::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Request body bytes written to an origin, and when the last of them went
/// (which keeps [`within_progress`] waiting).
struct Sent {
    bytes: AtomicU64,
    start: Instant,
    /// Milliseconds from `start` to the last write.
    last: AtomicU64,
}

impl Sent {
    fn new() -> Sent {
        Sent {
            bytes: AtomicU64::new(0),
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn last_write(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// Runs `f` until it ends, or until `limit` has passed since it began
/// and since the last request body bytes `sent` to the origin (`Err`).
async fn within_progress<F: Future>(
    limit: Duration,
    sent: &Sent,
    mut f: Pin<&mut F>,
) -> Result<F::Output, ()> {
    let sleep = tokio::time::sleep(limit);
    let mut sleep = std::pin::pin!(sleep);
    loop {
        tokio::select! {
            biased;
            r = &mut f => return Ok(r),
            () = &mut sleep => {
                let until = sent.last_write() + limit;
                if until <= Instant::now() {
                    return Err(());
                }
                sleep.as_mut().reset(until.into());
            }
        }
    }
}

/// Copies the client's request body to the origin, counting its bytes in
/// `sent` as they are written (so that a body cut short still counts).
async fn send_body(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    body: &mut ClientBody,
    framing: RequestBody,
    sent: &Sent,
) -> Result<(), String> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the request body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            // Trailers are not forwarded.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let w = if framing == RequestBody::Chunked {
            let size = format!("{:x}\r\n", data.len());
            async {
                stream.write_all(size.as_bytes()).await?;
                stream.write_all(&data).await?;
                stream.write_all(b"\r\n").await
            }
            .await
        } else {
            stream.write_all(&data).await
        };
        w.map_err(|e| format!("writing the request body: {e}"))?;
        sent.add(data.len() as u64);
    }
    if framing == RequestBody::Chunked {
        stream
            .write_all(b"0\r\n\r\n")
            .await
            .map_err(|e| format!("writing the request body: {e}"))?;
    }
    Ok(())
}

/// Where a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// HEAD, 1xx, 204, 304, or Content-Length: 0.
    Empty,
    /// Content-Length: this many bytes remain.
    Length(u64),
    Chunked(Chunked),
    /// No length: the body ends when the origin closes.
    Close,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes remain.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting the trailer section.
    Trailers,
}

/// A parsed final response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    /// The origin may keep the connection for another request.
    keep_alive: bool,
}

enum HeadError {
    /// The origin closed (or reset) the connection before sending a byte.
    Nothing,
    Invalid(String),
}

/// Whether the first bytes of a response are an interim (1xx, other than
/// 101) status line: `HTTP/1.x 1`.
fn is_interim_status(first: &[u8]) -> bool {
    first.len() >= 12
        && first.starts_with(b"HTTP/1.")
        && first[8] == b' '
        && first[9] == b'1'
        && &first[9..12] != b"101"
}

/// Reads interim responses (skipped) and the final response head; returns
/// the head and whatever followed it in the last read.
async fn read_head(stream: &mut TcpStream, head_only: bool) -> Result<(Head, BytesMut), HeadError> {
    let mut buf = BytesMut::new();
    let mut interim = 0;
    let mut got_any = false;
    loop {
        if !buf.is_empty() {
            match parse_head(&mut buf, head_only) {
                Ok(Some(h)) if h.status.is_informational() => {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(HeadError::Invalid(
                            "too many interim (1xx) responses".to_string(),
                        ));
                    }
                    continue;
                }
                Ok(Some(h)) => return Ok((h, buf)),
                Ok(None) => {}
                Err(e) => return Err(HeadError::Invalid(e)),
            }
        }
        // The buffer exists only once the origin has something to say.
        if stream.readable().await.is_err() {
            return Err(if got_any {
                HeadError::Invalid("connection failed while the response head arrived".into())
            } else {
                HeadError::Nothing
            });
        }
        let size = if buf.capacity() == 0 {
            HEAD_READ_SIZE
        } else {
            READ_SIZE
        };
        make_room(&mut buf, size);
        match stream.try_read_buf(&mut buf) {
            Ok(0) if !got_any => return Err(HeadError::Nothing),
            Ok(0) => {
                return Err(HeadError::Invalid(
                    "the origin closed the connection in the middle of the response head".into(),
                ))
            }
            Ok(_) => got_any = true,
            // A readiness that found nothing: the buffer is not kept
            // through the wait.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && buf.is_empty() => {
                buf = BytesMut::new();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) if !got_any => return Err(HeadError::Nothing),
            Err(e) => return Err(HeadError::Invalid(format!("reading the response: {e}"))),
        }
    }
}

/// Before a read: unless `buf` has room for at least a KiB more, it grows
/// by `size` (a new buffer, if its bytes are shared with data handed on).
fn make_room(buf: &mut BytesMut, size: usize) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(size);
    }
}

/// Parses a response head at the start of `buf`. On success the head is
/// taken out of `buf` (header values share its memory) and what follows
/// stays. `Ok(None)`: the head is not complete yet.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Head>, String> {
    // Left uninitialised: the parser writes the fields it finds, and
    // clearing 4 KiB of slots each response cost more than the parse.
    let mut fields = [MaybeUninit::<httparse::Header>::uninit(); MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        &buf[..],
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(format!("response head larger than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!(
                "more than {MAX_RESPONSE_HEADERS} header fields in the response"
            ))
        }
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| format!("invalid response status {code}"))?;
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Header values are slices of the head's own bytes; the fields are
    // found again by their offsets once the head is taken out of `buf`.
    let count = resp.headers.len();
    let mut fields_at = [[0u32; 4]; MAX_RESPONSE_HEADERS];
    let base = buf.as_ptr() as usize;
    let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
    for (at, f) in fields_at.iter_mut().zip(resp.headers.iter()) {
        let (name, value) = (offset(f.name.as_bytes()), offset(f.value));
        *at = [
            name,
            name + f.name.len() as u32,
            value,
            value + f.value.len() as u32,
        ];
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for at in &fields_at[..count] {
        let [name_start, name_end, value_start, value_end] = at.map(|o| o as usize);
        let raw_name = &head[name_start..name_end];
        let name = HeaderName::from_bytes(raw_name).map_err(|_| {
            format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(raw_name)
            )
        })?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
            .map_err(|_| format!("invalid value for header {name}"))?;
        headers.append(name, value);
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("the origin switched protocols, which a forwarded request cannot".into());
    }
    let framing = if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else {
        body_framing(&headers, version)?
    };
    let close = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
    let keep_alive = version == Version::HTTP_11 && !close && framing != Framing::Close;
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// The body framing of a response that may have a body (RFC 9112 §6.3):
/// chunked if Transfer-Encoding says so, else Content-Length, else until
/// the origin closes. Anything that could make two parties disagree on
/// where the body ends is refused.
fn body_framing(headers: &HeaderMap, version: Version) -> Result<Framing, String> {
    if headers.contains_key(TRANSFER_ENCODING) {
        if version != Version::HTTP_11 {
            return Err("Transfer-Encoding in an HTTP/1.0 response".into());
        }
        if headers.contains_key(CONTENT_LENGTH) {
            return Err("both Transfer-Encoding and Content-Length in the response".into());
        }
        let mut codings = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|t| t.trim_ascii());
        return match (codings.next(), codings.next()) {
            (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => {
                Ok(Framing::Chunked(Chunked::Size))
            }
            _ => Err("unsupported Transfer-Encoding in the response (only chunked)".into()),
        };
    }
    let mut length: Option<u64> = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for item in v.as_bytes().split(|b| *b == b',') {
            let n = parse_decimal(item.trim_ascii())
                .ok_or_else(|| "invalid Content-Length in the response".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values in the response".into());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// 1*DIGIT, at most 18 digits (fits u64 with room).
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// What the chunked decoder found at the front of the buffer.
#[derive(Debug, PartialEq)]
enum ChunkStep {
    /// This many bytes at the front are body data.
    Data(usize),
    /// Framing consumed; look again.
    Again,
    /// More bytes are needed.
    Need,
    /// The body has ended (trailers consumed).
    End,
}

/// Decodes the next step of a chunked body, consuming framing bytes from
/// `buf`; data bytes are left at the front for the caller to take.
fn chunked_step(state: &mut Chunked, buf: &mut BytesMut) -> Result<ChunkStep, String> {
    match *state {
        Chunked::Size => {
            let Some(lf) = buf.iter().position(|b| *b == b'\n') else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err("chunk-size line too long".into());
                }
                return Ok(ChunkStep::Need);
            };
            if lf > MAX_CHUNK_LINE {
                return Err("chunk-size line too long".into());
            }
            let size = parse_chunk_size(&buf[..lf])?;
            buf.advance(lf + 1);
            *state = if size == 0 {
                Chunked::Trailers
            } else {
                Chunked::Data(size)
            };
            Ok(ChunkStep::Again)
        }
        Chunked::Data(left) => {
            if buf.is_empty() {
                return Ok(ChunkStep::Need);
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let left = left - n as u64;
            *state = if left == 0 {
                Chunked::DataEnd
            } else {
                Chunked::Data(left)
            };
            Ok(ChunkStep::Data(n))
        }
        Chunked::DataEnd => {
            if buf.len() < 2 {
                if buf.first().is_some_and(|b| *b != b'\r') {
                    return Err("chunk data not followed by CRLF".into());
                }
                return Ok(ChunkStep::Need);
            }
            if &buf[..2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            buf.advance(2);
            *state = Chunked::Size;
            Ok(ChunkStep::Again)
        }
        Chunked::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(ChunkStep::End);
            }
            // Nothing yet, or a lone CR that may start the final CRLF. (One
            // other byte starts a trailer field: parsed below.)
            if buf.len() < 2 && buf.first().is_none_or(|b| *b == b'\r') {
                return Ok(ChunkStep::Need);
            }
            let mut fields = [httparse::EMPTY_HEADER; 32];
            match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((n, _))) => {
                    buf.advance(n);
                    Ok(ChunkStep::End)
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                    Err("trailer section too large".into())
                }
                Ok(httparse::Status::Partial) => Ok(ChunkStep::Need),
                Err(e) => Err(format!("invalid trailer section: {e}")),
            }
        }
    }
}

/// A chunk-size line without its LF: 1*16HEXDIG, optional whitespace and
/// extensions (ignored, but only visible characters and spaces), then CR.
fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
    let bad = || "invalid chunk-size line".to_string();
    let line = line.strip_suffix(b"\r").ok_or_else(bad)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(bad());
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty()
        && (rest[0] != b';' || rest.iter().any(|b| b.is_ascii_control() && *b != b'\t'))
    {
        return Err(bad());
    }
    let mut size = 0u64;
    for d in &line[..digits] {
        let v = (*d as char).to_digit(16).ok_or_else(bad)?;
        size = (size << 4) | u64::from(v);
    }
    Ok(size)
}

/// A response body read from the origin connection as the client side
/// polls for it. When the body has ended exactly where its framing said,
/// with nothing after it, the connection goes back to the client
/// connection's slot; otherwise it is closed.
pub struct OriginBody {
    origin: Option<Origin>,
    slot: Arc<Slot>,
    /// Bytes read and not yet handed on.
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    eof: bool,
    done: bool,
    read_size: usize,
    timeout: Duration,
    /// Bounds each wait for the origin while the body arrives.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl OriginBody {
    /// Ends the body early if its framing already says it has ended.
    fn settle(&mut self) {
        if self.framing == Framing::Empty {
            self.finish();
        }
    }

    /// The body has ended where its framing said: the origin connection is
    /// reused if it may be and nothing followed the response.
    fn finish(&mut self) {
        self.done = true;
        if let Some(origin) = self.origin.take() {
            if self.keep_alive && self.buf.is_empty() && !self.eof {
                self.slot.give_back(origin);
            }
        }
        self.buf = BytesMut::new();
        self.timer = None;
    }

    /// The next data bytes already in the buffer, per the framing.
    fn take_data(&mut self) -> Result<Option<Bytes>, io::Error> {
        loop {
            match &mut self.framing {
                Framing::Empty => {
                    self.finish();
                    return Ok(None);
                }
                Framing::Length(left) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = self
                        .buf
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    let data = self.buf.split_to(n).freeze();
                    if *left == 0 {
                        self.framing = Framing::Empty;
                        self.finish();
                    }
                    return Ok(Some(data));
                }
                Framing::Close => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                Framing::Chunked(state) => match chunked_step(state, &mut self.buf) {
                    Ok(ChunkStep::Data(n)) => return Ok(Some(self.buf.split_to(n).freeze())),
                    Ok(ChunkStep::Again) => {}
                    Ok(ChunkStep::Need) => return Ok(None),
                    Ok(ChunkStep::End) => {
                        self.framing = Framing::Empty;
                        self.finish();
                        return Ok(None);
                    }
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                },
            }
        }
    }

    /// Reads more from the origin into the buffer. `Ok(false)`: the origin
    /// closed its side.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, io::Error>> {
        let Some(origin) = self.origin.as_ref() else {
            return Poll::Ready(Ok(false));
        };
        loop {
            match origin.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let timeout = self.timeout;
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(timer.as_mut().poll(cx));
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the origin stopped sending the response body",
                    )));
                }
            }
            make_room(&mut self.buf, self.read_size);
            match origin.stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(n) => {
                    if n >= self.read_size && self.read_size < READ_SIZE_MAX {
                        self.read_size *= 2;
                    }
                    if let Some(t) = self.timer.as_mut() {
                        t.as_mut().reset(tokio::time::Instant::now() + self.timeout);
                    }
                    return Poll::Ready(Ok(true));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The body failed: the connection is not reused.
    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.keep_alive = false;
        self.finish();
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for OriginBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            match this.take_data() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) if this.done => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            if this.eof {
                if this.framing == Framing::Close {
                    this.finish();
                    return Poll::Ready(None);
                }
                return this.fail(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the origin closed the connection before the response body ended",
                ));
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => this.eof = true,
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Marks a response the origin sent before it had the whole request body
/// (which was then not sent on).
#[derive(Clone, Copy)]
pub struct BodyCutShort;

/// Idle origin connections of clients that left, by the address they go
/// to; the newest is handed out first.
pub struct IdlePool {
    inner: Mutex<Idle>,
    max: usize,
    max_age: Duration,
}

#[derive(Default)]
struct Idle {
    by_addr: HashMap<SocketAddr, Vec<(Origin, Instant)>>,
    count: usize,
    swept: Option<Instant>,
}

impl Idle {
    /// Keeps the parked connections `keep` accepts (given each one and
    /// when it was parked) and returns how many it dropped.
    fn retain(&mut self, mut keep: impl FnMut(&Origin, Instant) -> bool) -> usize {
        let mut dropped = 0;
        self.by_addr.retain(|_, list| {
            let before = list.len();
            list.retain(|(origin, at)| keep(origin, *at));
            dropped += before - list.len();
            !list.is_empty()
        });
        self.count -= dropped;
        dropped
    }
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

    fn take(&self, addr: SocketAddr) -> Option<Origin> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let idle = &mut *g;
        let list = idle.by_addr.get_mut(&addr)?;
        let got = list.pop();
        idle.count -= got.is_some() as usize;
        if list.is_empty() {
            idle.by_addr.remove(&addr);
        }
        match got {
            Some((origin, at)) if at.elapsed() < self.max_age => Some(origin),
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

    /// Closes the parked connections their origin closed (or wrote to, or
    /// that are past their age) and returns how many: an origin's idle
    /// timeout would otherwise leave them in CLOSE-WAIT, holding a file
    /// each, until a request for that origin or the next sweep by age.
    /// Runs on the event loop the connections belong to.
    pub fn drop_closed(&self) -> usize {
        let max_age = self.max_age;
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|origin, at| at.elapsed() < max_age && origin.still_idle())
    }

    /// How many connections are parked.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).count
    }

    /// Parks an idle origin connection (its last response ended cleanly).
    fn put(&self, origin: Origin) {
        if self.max == 0 {
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
            idle.retain(|_, at| now.duration_since(at) < max_age);
        }
        if idle.count >= self.max {
            return;
        }
        idle.count += 1;
        idle.by_addr
            .entry(origin.addr)
            .or_default()
            .push((origin, now));
    }
}

#[cfg(test)]
mod tests {
    //! Response framing against a real origin socket on loopback that
    //! answers with exactly the bytes each case needs.

    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// What became of one response.
    struct Outcome {
        /// The head, or why it was refused (the proxy answers 502).
        head: Result<(StatusCode, HeaderMap), String>,
        /// The body, or why it failed part way.
        body: Result<Vec<u8>, String>,
        /// The origin connection went back for the next request.
        reused: bool,
    }

    /// An origin that sends `bytes` on a fresh connection, then closes if
    /// `close`, else holds the connection open.
    async fn exchange(bytes: &'static [u8], head_only: bool, close: bool) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(bytes).await.unwrap();
            if close {
                return;
            }
            let mut sink = [0u8; 64];
            while let Ok(n) = s.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let slot = Arc::new(Slot::new(Arc::new(IdlePool::new(
            4,
            Duration::from_secs(90),
        ))));
        let origin = Origin { addr, stream };
        let resp = slot
            .receive(origin, head_only, true, Duration::from_secs(5))
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(TryFailure::Retry) => {
                return Outcome {
                    head: Err("closed without answering".into()),
                    body: Err("no body".into()),
                    reused: false,
                }
            }
            Err(TryFailure::Failed(Failure::Upstream(e))) => {
                return Outcome {
                    head: Err(e),
                    body: Err("no body".into()),
                    reused: false,
                }
            }
            Err(TryFailure::Failed(_)) => unreachable!("no connect or timeout here"),
        };
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .map_err(|e| e.to_string());
        // Anything the origin sent after the response has arrived by now.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reused = slot.with(|h| h.as_ref().is_some_and(Origin::still_idle));
        Outcome {
            head: Ok((parts.status, parts.headers)),
            body,
            reused,
        }
    }

    /// Parked connections their origin closes are closed by the next
    /// sweep; those it holds open stay.
    #[tokio::test]
    async fn parked_connections_closed_by_their_origin_are_swept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = IdlePool::new(4, Duration::from_secs(90));
        let a = TcpStream::connect(addr).await.unwrap();
        let (a_far, _) = listener.accept().await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let (_b_far, _) = listener.accept().await.unwrap();
        pool.put(Origin { addr, stream: a });
        pool.put(Origin { addr, stream: b });
        assert_eq!(pool.drop_closed(), 0);
        assert_eq!(pool.parked(), 2);
        // The origin's idle timeout closes one.
        drop(a_far);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut swept = 0;
        while swept == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            swept = pool.drop_closed();
        }
        assert_eq!(swept, 1);
        assert_eq!(pool.parked(), 1);
        assert!(pool.take(addr).is_some_and(|o| o.still_idle()));
    }

    fn refused(o: &Outcome, why: &str) {
        match &o.head {
            Err(e) => assert!(e.contains(why), "{e}"),
            Ok((s, _)) => panic!("accepted with status {s}, expected a refusal ({why})"),
        }
        assert!(!o.reused);
    }

    #[tokio::test]
    async fn content_length_body_and_reuse() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            false,
            false,
        )
        .await;
        let (status, headers) = o.head.as_ref().unwrap();
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(headers["x-a"], "b");
        assert_eq!(o.body.as_deref().unwrap(), b"hello");
        assert!(o.reused);
    }

    #[tokio::test]
    async fn identical_content_lengths_are_one_length() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc",
            false,
            false,
        )
        .await;
        assert_eq!(o.body.as_deref().unwrap(), b"abc");
        assert!(o.reused);
    }

    #[tokio::test]
    async fn conflicting_content_lengths_are_refused() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            false,
            false,
        )
        .await;
        refused(&o, "conflicting Content-Length");
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd",
            false,
            false,
        )
        .await;
        refused(&o, "conflicting Content-Length");
    }

    #[tokio::test]
    async fn invalid_content_lengths_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3a\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3,\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nabc",
        ] {
            let bytes: &'static [u8] = Box::leak(bad.to_vec().into_boxed_slice());
            let o = exchange(bytes, false, false).await;
            refused(&o, "invalid Content-Length");
        }
    }

    #[tokio::test]
    async fn transfer_encoding_with_content_length_is_refused() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
            false,
        )
        .await;
        refused(&o, "both Transfer-Encoding and Content-Length");
    }

    #[tokio::test]
    async fn transfer_codings_other_than_chunked_are_refused() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            false,
            false,
        )
        .await;
        refused(&o, "unsupported Transfer-Encoding");
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            false,
            false,
        )
        .await;
        refused(&o, "unsupported Transfer-Encoding");
        let o = exchange(
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            false,
            false,
        )
        .await;
        refused(&o, "HTTP/1.0");
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n\
              5;name=value\r\nhello\r\nA \r\n, world!!!\r\n0\r\nX-Sum: 1\r\n\r\n",
            false,
            false,
        )
        .await;
        assert_eq!(o.body.as_deref().unwrap(), b"hello, world!!!");
        assert!(o.reused);
    }

    #[tokio::test]
    async fn chunked_body_arriving_in_pieces() {
        // One byte per write: every state of the decoder waits for more.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            let all = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\nT: v\r\n\r\n";
            for b in all {
                s.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut sink = [0u8; 8];
            let _ = s.read(&mut sink).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let slot = Arc::new(Slot::new(Arc::new(IdlePool::new(
            4,
            Duration::from_secs(90),
        ))));
        let Ok(resp) = slot
            .receive(Origin { addr, stream }, false, true, Duration::from_secs(5))
            .await
        else {
            panic!("no response");
        };
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abcd");
        assert!(slot.with(|h| h.is_some()));
    }

    #[tokio::test]
    async fn invalid_chunk_framing_fails_the_body() {
        for bad in [
            // Not hex, a 0x prefix, a sign, too many digits.
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ng\r\nabc\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000003\r\nabc\r\n0\r\n\r\n",
            // A bare LF, data not followed by CRLF, an empty size.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nabc\r\n0\r\n\r\n",
            // A control character in an extension.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a\x01b\r\nabc\r\n0\r\n\r\n",
        ] {
            let bytes: &'static [u8] = Box::leak(bad.to_vec().into_boxed_slice());
            let o = exchange(bytes, false, false).await;
            assert!(o.head.is_ok());
            let e = o.body.expect_err("invalid chunked framing must fail the body");
            assert!(e.contains("chunk"), "{e}");
            assert!(!o.reused);
        }
    }

    #[tokio::test]
    async fn a_chunk_size_line_without_end_is_bounded() {
        let mut long = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE + 10));
        let bytes: &'static [u8] = Box::leak(long.into_boxed_slice());
        let o = exchange(bytes, false, false).await;
        let e = o.body.expect_err("an endless chunk-size line must fail");
        assert!(e.contains("too long"), "{e}");
    }

    #[tokio::test]
    async fn close_delimited_body_reads_to_the_end_and_is_not_reused() {
        let o = exchange(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", false, true).await;
        assert_eq!(o.body.as_deref().unwrap(), b"until the end");
        assert!(!o.reused);
    }

    #[tokio::test]
    async fn head_204_and_304_have_no_body() {
        let o = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, false).await;
        let (_, headers) = o.head.as_ref().unwrap();
        assert_eq!(headers[CONTENT_LENGTH], "5");
        assert_eq!(o.body.as_deref().unwrap(), b"");
        assert!(o.reused);
        let o = exchange(b"HTTP/1.1 204 No Content\r\n\r\n", false, false).await;
        assert_eq!(o.body.as_deref().unwrap(), b"");
        assert!(o.reused);
        let o = exchange(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            false,
            false,
        )
        .await;
        assert_eq!(o.body.as_deref().unwrap(), b"");
        assert!(o.reused);
        // A body after a 204 is not a response to anything: no reuse.
        let o = exchange(b"HTTP/1.1 204 No Content\r\n\r\nhello", false, false).await;
        assert_eq!(o.body.as_deref().unwrap(), b"");
        assert!(!o.reused);
    }

    #[tokio::test]
    async fn bytes_after_the_response_prevent_reuse() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
            false,
            false,
        )
        .await;
        assert_eq!(o.body.as_deref().unwrap(), b"ok");
        assert!(!o.reused);
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nextra",
            false,
            false,
        )
        .await;
        assert_eq!(o.body.as_deref().unwrap(), b"ok");
        assert!(!o.reused);
    }

    #[tokio::test]
    async fn a_truncated_body_fails_and_is_not_reused() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            false,
            true,
        )
        .await;
        let e = o.body.expect_err("a short body must fail");
        assert!(e.contains("before the response body ended"), "{e}");
        assert!(!o.reused);
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            false,
            true,
        )
        .await;
        assert!(o.body.is_err());
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_are_not_reused() {
        let o = exchange(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 2\r\n\r\nok",
            false,
            false,
        )
        .await;
        assert_eq!(o.body.as_deref().unwrap(), b"ok");
        assert!(!o.reused);
        let o = exchange(
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
            false,
        )
        .await;
        assert_eq!(o.body.as_deref().unwrap(), b"ok");
        assert!(!o.reused);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_101_refused() {
        let o = exchange(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
              HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            false,
            false,
        )
        .await;
        assert_eq!(o.head.as_ref().unwrap().0, StatusCode::CREATED);
        assert_eq!(o.body.as_deref().unwrap(), b"ok");
        let o = exchange(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            false,
            false,
        )
        .await;
        refused(&o, "switched protocols");
    }

    #[tokio::test]
    async fn malformed_and_oversized_heads_are_refused() {
        let o = exchange(b"HTTP/1.1 2000 OK\r\n\r\n", false, false).await;
        refused(&o, "invalid response");
        let o = exchange(b"SSH-2.0-OpenSSH\r\n\r\n", false, false).await;
        refused(&o, "invalid response");
        let o = exchange(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", false, false).await;
        refused(&o, "invalid response");
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() <= MAX_HEAD {
            big.extend_from_slice(b"X-Filler: ");
            big.extend(std::iter::repeat_n(b'v', 1000));
            big.extend_from_slice(b"\r\n");
        }
        let bytes: &'static [u8] = Box::leak(big.into_boxed_slice());
        let o = exchange(bytes, false, false).await;
        refused(&o, "larger than");
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..=MAX_RESPONSE_HEADERS {
            many.extend_from_slice(b"X-Many: 1\r\n");
        }
        many.extend_from_slice(b"\r\n");
        let bytes: &'static [u8] = Box::leak(many.into_boxed_slice());
        let o = exchange(bytes, false, false).await;
        refused(&o, "header fields");
        let o = exchange(b"HTTP/1.1 200 OK\r\nContent-", false, true).await;
        refused(&o, "in the middle of the response head");
    }

    #[tokio::test]
    async fn a_head_larger_than_the_first_read_is_read_whole() {
        // A head of about 20 KiB (several times the first read) and a body
        // that starts in the same segment as its end.
        let mut head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n".to_vec();
        for i in 0..20 {
            head.extend_from_slice(format!("X-Filler-{i}: ").as_bytes());
            head.extend(std::iter::repeat_n(b'a' + i as u8, 1000));
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n0123456789");
        assert!(head.len() > 8 * HEAD_READ_SIZE);
        let bytes: &'static [u8] = Box::leak(head.into_boxed_slice());
        let o = exchange(bytes, false, false).await;
        let (status, headers) = o.head.as_ref().unwrap();
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(headers.len(), 21);
        assert_eq!(headers["x-filler-19"].len(), 1000);
        assert!(headers["x-filler-19"].as_bytes().iter().all(|&b| b == b't'));
        assert_eq!(o.body.as_deref().unwrap(), b"0123456789");
        assert!(o.reused);
    }

    #[tokio::test]
    async fn a_closed_origin_gives_nothing_to_retry() {
        let o = exchange(b"", false, true).await;
        refused(&o, "closed without answering");
    }

    #[tokio::test]
    async fn an_origin_that_spoke_while_idle_is_not_reused() {
        // A response that arrives before any request was sent.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            let mut sink = [0u8; 8];
            let _ = s.read(&mut sink).await;
        });
        let origin = Origin {
            addr,
            stream: TcpStream::connect(addr).await.unwrap(),
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!origin.still_idle());
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(parse_chunk_size(b"0\r"), Ok(0));
        assert_eq!(parse_chunk_size(b"fF\r"), Ok(255));
        assert_eq!(parse_chunk_size(b"ffffffffffffffff\r"), Ok(u64::MAX));
        assert_eq!(parse_chunk_size(b"a ; x=\"y\"\r"), Ok(10));
        assert_eq!(parse_chunk_size(b"a\t;x\r"), Ok(10));
        for bad in [
            &b"\r"[..],
            b"a",
            b" a\r",
            b"a b\r",
            b"1ffffffffffffffff\r",
            b"a;\x00\r",
            b"-1\r",
        ] {
            assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
        }
    }
}
