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
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
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

pub struct Recorded {
    inner: OriginBody,
    bytes: u64,
    /// Request body bytes the origin was sent.
    uploaded: u64,
    record: Option<(AuditEvent, AuditLog, Instant)>,
    /// Whether the `response_open` record was written.
    announced: bool,
    /// When it is due if no data comes first: armed the first time the
    /// origin has nothing ready (a response already whole never arms it).
    due: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Recorded {
    pub fn new(
        inner: OriginBody,
        event: AuditEvent,
        log: AuditLog,
        start: Instant,
        uploaded: u64,
    ) -> Recorded {
        Recorded {
            inner,
            bytes: 0,
            uploaded,
            record: Some((event, log, start)),
            announced: false,
            due: None,
        }
    }

    /// A response still streaming [`RESPONSE_OPEN_AFTER`] after its request
    /// came gets its `response_open` record now (checked as its data
    /// arrives, and by a timer while none does): a long download, or a
    /// response that stalls, is then in the trail while it lasts, and if
    /// the proxy dies before it ends. Its `proxy_request` record follows at
    /// its end.
    fn announce_if_long(&mut self) {
        let Some((ev, log, start)) = &self.record else {
            return;
        };
        let elapsed = start.elapsed();
        if elapsed < RESPONSE_OPEN_AFTER {
            return;
        }
        self.announced = true;
        let mut opening = ev
            .clone()
            .with_bytes(self.uploaded, self.bytes, elapsed)
            .with_reason("allowed by rule; the response is still streaming");
        opening.event.code = RecordKind::ResponseOpen;
        // As the end record: never blocks; a refusal is counted by the
        // writer and recorded in a gap record.
        let _ = log.try_submit(&opening);
    }

    fn finish(&mut self, complete: bool) {
        if let Some((ev, log, start)) = self.record.take() {
            let mut ev = ev.with_bytes(self.uploaded, self.bytes, start.elapsed());
            if !complete {
                ev = ev.with_reason("allowed by rule; the response did not complete");
            }
            // Never blocks a runtime thread: a full queue is refused and
            // counted by the writer, which records the loss in a gap record.
            let _ = log.try_submit(&ev);
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
                // Not for the last frame: its request's record follows now.
                if !this.announced && !this.inner.is_end_stream() {
                    this.announce_if_long();
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
                if !this.announced {
                    if let Some((_, _, start)) = &this.record {
                        let at = tokio::time::Instant::from_std(*start + RESPONSE_OPEN_AFTER);
                        let due = this
                            .due
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                        if due.as_mut().poll(cx).is_ready() {
                            this.announce_if_long();
                        }
                    }
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
