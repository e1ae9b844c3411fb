//! A response body that counts what it carries and, when it ends (or the
//! client goes away), hands the request's audit record to the writer.

use crate::audit::{AuditEvent, AuditLog};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

pub struct Recorded {
    inner: Incoming,
    bytes: u64,
    record: Option<(AuditEvent, AuditLog, Instant)>,
}

impl Recorded {
    pub fn new(inner: Incoming, event: AuditEvent, log: AuditLog, start: Instant) -> Recorded {
        Recorded {
            inner,
            bytes: 0,
            record: Some((event, log, start)),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some((ev, log, start)) = self.record.take() {
            let mut ev = ev.with_bytes(0, self.bytes, start.elapsed());
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
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
            Poll::Pending => Poll::Pending,
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
