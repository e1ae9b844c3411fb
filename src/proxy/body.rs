//! Response bodies the proxy sends: its own short answers, and origin
//! responses that count what they carry and, when they end (or the client
//! goes away), hand the request's audit record to the writer. And the
//! client's request body, which tells its connection when it was read to
//! its end.

use super::upstream::OriginBody;
use super::Activity;
use crate::audit::record::{RecordKind, RESPONSE_OPEN_AFTER};
use crate::audit::{AuditEvent, AuditLog};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// Every response body the proxy sends, without a box per response.
pub enum ProxyBody {
    /// A body the proxy wrote itself, sent in one frame.
    Full(Option<Bytes>),
    Origin(Box<Recorded>),
}

impl ProxyBody {
    pub fn full(body: impl Into<Bytes>) -> ProxyBody {
        let b = body.into();
        ProxyBody::Full((!b.is_empty()).then_some(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Origin(r) => Pin::new(&mut **r).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Origin(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Origin(r) => r.size_hint(),
        }
    }
}

/// The request's record, kept until the response ends.
type HeldRecord = (AuditEvent, AuditLog, Instant);

pub struct Recorded {
    inner: OriginBody,
    bytes: u64,
    /// Request body bytes the origin was sent.
    uploaded: u64,
    /// The request's record, here until the `response_open` timer is armed,
    /// then in the timer's shared state.
    record: Option<HeldRecord>,
    opening: Option<Opening>,
}

/// The `response_open` timer of a response not whole at its first poll: a
/// task, so that the record is due at [`RESPONSE_OPEN_AFTER`] whether or
/// not the body is polled then (the origin may stall, or the client stop
/// reading, and hyper then polls nothing).
struct Opening {
    shared: Arc<OpenShared>,
    task: tokio::task::JoinHandle<()>,
}

struct OpenShared {
    /// Response bytes so far.
    bytes: AtomicU64,
    /// The request's record until the response ends. The timer writes the
    /// opening record holding this lock, and the end takes the record under
    /// it, so the opening, if any, is always queued first.
    record: Mutex<Option<HeldRecord>>,
}

impl Recorded {
    pub fn new(
        inner: OriginBody,
        event: AuditEvent,
        log: AuditLog,
        start: Instant,
        uploaded: u64,
    ) -> Box<Recorded> {
        // Built in its box: the record is most of it (900-odd bytes), and a
        // value built first and boxed after is copied once more.
        Box::new(Recorded {
            inner,
            bytes: 0,
            uploaded,
            record: Some((event, log, start)),
            opening: None,
        })
    }

    /// Arms the `response_open` timer: a response not yet ended
    /// [`RESPONSE_OPEN_AFTER`] after its request came gets that record
    /// then, so that a long download, or a response that stalls, is in the
    /// trail while it lasts, and if the proxy dies before it ends. Its
    /// `proxy_request` record follows at its end. Armed only for a response
    /// that is not whole at its first poll.
    fn arm(&mut self) {
        let Some(record) = self.record.take() else {
            return;
        };
        let due = tokio::time::Instant::from_std(record.2 + RESPONSE_OPEN_AFTER);
        let shared = Arc::new(OpenShared {
            bytes: AtomicU64::new(self.bytes),
            record: Mutex::new(Some(record)),
        });
        let (state, uploaded) = (shared.clone(), self.uploaded);
        let task = tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            let Ok(record) = state.record.lock() else {
                return;
            };
            if let Some((ev, log, start)) = record.as_ref() {
                let bytes = state.bytes.load(Ordering::Relaxed);
                let mut opening = ev
                    .clone()
                    .with_bytes(uploaded, bytes, start.elapsed())
                    .with_reason("allowed by rule; the response is still streaming");
                opening.event.code = RecordKind::ResponseOpen;
                // As the end record: never blocks; a refusal is counted by
                // the writer and recorded in a gap record.
                let _ = log.try_record(&opening);
            }
        });
        self.opening = Some(Opening { shared, task });
    }

    fn finish(&mut self, complete: bool) {
        let record = match self.opening.take() {
            Some(o) => {
                o.task.abort();
                o.shared.record.lock().ok().and_then(|mut r| r.take())
            }
            None => self.record.take(),
        };
        if let Some((ev, log, start)) = record {
            let mut ev = ev.with_bytes(self.uploaded, self.bytes, start.elapsed());
            if !complete {
                ev = ev.with_reason("allowed by rule; the response did not complete");
            }
            // Never blocks a runtime thread: a full queue is refused and
            // counted by the writer, which records the loss in a gap record.
            let _ = log.try_record(&ev);
        }
    }
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                match &this.opening {
                    Some(o) => o.shared.bytes.store(this.bytes, Ordering::Relaxed),
                    None if !this.inner.is_end_stream() => this.arm(),
                    None => {}
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                if this.opening.is_none() {
                    this.arm();
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// A client's request body. Once it has been read to its end the
/// connection is told so: bytes that arrive after a response while the
/// request's body was left unread (a refusal, an origin's early answer) are
/// the rest of that body, which hyper drains or closes on, not the start of
/// another request.
pub struct ClientBody {
    inner: Incoming,
    activity: Option<Arc<Activity>>,
}

impl ClientBody {
    pub(super) fn new(inner: Incoming, activity: Arc<Activity>) -> ClientBody {
        let mut b = ClientBody {
            inner,
            activity: Some(activity),
        };
        b.note_end();
        b
    }

    fn note_end(&mut self) {
        if self.inner.is_end_stream() {
            if let Some(a) = self.activity.take() {
                a.body_read();
            }
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => {
                if let Some(a) = self.activity.take() {
                    a.body_read();
                }
            }
            Poll::Ready(Some(Ok(_))) => self.note_end(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
