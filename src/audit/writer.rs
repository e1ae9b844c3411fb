//! The writer: producers hand events to a bounded queue; one thread numbers
//! them, chains them, writes them and group-commits with fdatasync, then
//! tells each producer its record is durable. It also rotates files, signs
//! checkpoints, and applies `on_log_failure` when the disk refuses a write.

use super::config::{AuditConfig, OnLogFailure};
use super::keys::{random_bytes, CheckpointSigner, KeyError};
use super::record::{
    checkpoint_message, signature_slot, Action, AuditEvent, AuditRecord, Checkpoint, FileLink, Gap,
    PalisadeFields, PreviousBoot, TornTail,
};
use super::time::Timestamp;
use super::trail::{
    file_name, line_hash, line_hash_into, list_files, split_lines, sync_dir, GENESIS_HASH,
};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Why the log could not be opened or closed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("invalid audit configuration: {0}")]
    Config(#[from] super::config::ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("audit directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write audit file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
    #[error("the audit writer stopped unexpectedly")]
    WriterGone,
    #[error("the audit log was closed but its stop record could not be written (see the daemon's stderr); the trail stays open until the next start")]
    StopNotWritten,
    #[error("another palisade process is writing the audit trail in {dir}")]
    Locked { dir: PathBuf },
}

/// Why a record was not accepted. [`SubmitError::refuses_flow`] tells the
/// enforcement point whether to refuse the flow the record describes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the audit log cannot be written ({mode}); see the log-failed record")]
    LogFailing { mode: &'static str },
    #[error("the audit queue is full")]
    QueueFull { mode: &'static str },
    #[error("the audit log is closed")]
    Closed { mode: &'static str },
}

impl SubmitError {
    /// True under `fail-closed`: the flow must not pass without its record.
    pub fn refuses_flow(&self) -> bool {
        let (SubmitError::LogFailing { mode }
        | SubmitError::QueueFull { mode }
        | SubmitError::Closed { mode }) = self;
        *mode == OnLogFailure::FailClosed.as_str()
    }
}

/// Why an accepted record did not become durable.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WriteError {
    #[error("the audit record could not be written: {0}")]
    Failed(String),
    #[error("the audit writer stopped before the record was written")]
    WriterGone,
}

/// Proof that a record reached the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The record's `seq` within this boot.
    pub seq: u64,
}

/// A submitted record's promise: wait on it from a thread ([`Ticket::wait`])
/// or from async code ([`Ticket::durable`]).
#[must_use = "a ticket says when the record is durable; drop it only if you do not care"]
pub struct Ticket {
    rx: oneshot::Receiver<Result<Receipt, WriteError>>,
}

impl Ticket {
    /// Blocks until the record is durable. Do not call inside an async
    /// runtime (use [`Ticket::durable`] there).
    pub fn wait(self) -> Result<Receipt, WriteError> {
        self.rx
            .blocking_recv()
            .unwrap_or(Err(WriteError::WriterGone))
    }

    pub async fn durable(self) -> Result<Receipt, WriteError> {
        self.rx.await.unwrap_or(Err(WriteError::WriterGone))
    }
}

/// Writer counters since the log was opened; also written in every
/// checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditStats {
    pub records_written: u64,
    pub commits: u64,
    /// Producers that had to wait because the queue was full.
    pub queue_full_waits: u64,
    /// `try_submit` calls refused because the queue was full.
    pub queue_full_rejections: u64,
    /// Admissions refused while the log was failing (fail-closed).
    pub refused_admissions: u64,
    /// Records that never reached the disk (fail-open while failing, or a
    /// failed commit).
    pub lost_records: u64,
    pub write_failures: u64,
}

#[derive(Default)]
struct Counters {
    records_written: AtomicU64,
    commits: AtomicU64,
    queue_full_waits: AtomicU64,
    queue_full_rejections: AtomicU64,
    refused_admissions: AtomicU64,
    lost_records: AtomicU64,
    write_failures: AtomicU64,
    // Not yet reported in a gap record.
    gap_lost: AtomicU64,
    gap_refused: AtomicU64,
}

const HEALTHY: u8 = 0;
const FAILING: u8 = 1;
const CLOSED: u8 = 2;

struct Shared {
    state: AtomicU8,
    mode: OnLogFailure,
    counters: Counters,
    boot_id: String,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Room reserved for a record's JSON body before it is serialised.
const RECORD_BODY_CAPACITY: usize = 640;

/// A record's JSON body. Sized for a typical record (about 600 bytes): a
/// vector that starts small and doubles cost each record three
/// reallocations and sat in the queue in a 1 KiB block.
fn record_body(event: &AuditEvent) -> Vec<u8> {
    let mut body = Vec::with_capacity(RECORD_BODY_CAPACITY);
    super::json::write_event(&mut body, event);
    body
}

enum Msg {
    Record(Pending),
    /// Answered with whether the stop record and checkpoint are durable.
    Close(oneshot::Sender<bool>),
}

struct Pending {
    body: Vec<u8>,
    /// `None` for a record whose producer does not wait for it
    /// ([`AuditLog::try_record`]).
    reply: Option<oneshot::Sender<Result<Receipt, WriteError>>>,
}

/// The handle producers hold; cheap to clone, one per task or thread.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl AuditLog {
    /// Opens the trail in `config.dir`: recovers the chain head from the
    /// last file (recording a torn last line, if any), starts a new file
    /// with a `start` record, and starts the writer thread.
    pub fn open(config: &AuditConfig) -> Result<AuditLog, AuditError> {
        config.validate()?;
        let key_path = config.signing_key.as_deref().unwrap_or(Path::new(""));
        let signer = CheckpointSigner::load(key_path)?;
        Self::open_with_signer(config, signer)
    }

    /// As [`AuditLog::open`], with the key already loaded.
    pub fn open_with_signer(
        config: &AuditConfig,
        signer: CheckpointSigner,
    ) -> Result<AuditLog, AuditError> {
        let boot_id = hex::encode(random_bytes::<16>()?);
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let shared = Arc::new(Shared {
            state: AtomicU8::new(HEALTHY),
            mode: config.on_log_failure,
            counters: Counters::default(),
            boot_id: boot_id.clone(),
            thread: Mutex::new(None),
        });
        let writer = Writer::start(config.clone(), signer, boot_id, shared.clone())?;
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(AuditError::Thread)?;
        if let Ok(mut slot) = shared.thread.lock() {
            *slot = Some(handle);
        }
        Ok(AuditLog { tx, shared })
    }

    pub fn boot_id(&self) -> &str {
        &self.shared.boot_id
    }

    pub fn on_log_failure(&self) -> OnLogFailure {
        self.shared.mode
    }

    /// True while writes are failing.
    pub fn is_failing(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == FAILING
    }

    /// May a new flow start? `Err` (counted) only under fail-closed while
    /// the log cannot be written, or after close.
    pub fn admit(&self) -> Result<(), SubmitError> {
        match self.shared.state.load(Ordering::Acquire) {
            HEALTHY => Ok(()),
            FAILING if self.shared.mode == OnLogFailure::FailOpen => Ok(()),
            FAILING => {
                let c = &self.shared.counters;
                c.refused_admissions.fetch_add(1, Ordering::Relaxed);
                c.gap_refused.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::LogFailing {
                    mode: self.mode_str(),
                })
            }
            _ if self.shared.mode == OnLogFailure::FailOpen => Ok(()),
            _ => Err(self.closed()),
        }
    }

    fn mode_str(&self) -> &'static str {
        self.shared.mode.as_str()
    }

    // Counts the refusal or loss the current state implies.
    fn gate(&self) -> Result<(), SubmitError> {
        let c = &self.shared.counters;
        match self.shared.state.load(Ordering::Acquire) {
            HEALTHY => Ok(()),
            FAILING => {
                // The record is not written in either mode; whether its
                // flow passes is the enforcement point's call (refuses_flow).
                c.lost_records.fetch_add(1, Ordering::Relaxed);
                c.gap_lost.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::LogFailing {
                    mode: self.mode_str(),
                })
            }
            _ => Err(SubmitError::Closed {
                mode: self.mode_str(),
            }),
        }
    }

    fn prepare(&self, event: &AuditEvent) -> Result<(Msg, Ticket), SubmitError> {
        let (reply, rx) = oneshot::channel();
        Ok((self.pending(event, Some(reply))?, Ticket { rx }))
    }

    fn pending(
        &self,
        event: &AuditEvent,
        reply: Option<oneshot::Sender<Result<Receipt, WriteError>>>,
    ) -> Result<Msg, SubmitError> {
        self.gate()?;
        // Serialising here spreads the JSON work over the producers; the
        // writer only prefixes the chain fields.
        let body = record_body(event);
        Ok(Msg::Record(Pending { body, reply }))
    }

    fn closed(&self) -> SubmitError {
        SubmitError::Closed {
            mode: self.mode_str(),
        }
    }

    /// Queues a record, waiting while the queue is full (backpressure,
    /// counted). For threads; inside async code use [`AuditLog::submit_async`].
    pub fn submit(&self, event: &AuditEvent) -> Result<Ticket, SubmitError> {
        let (msg, ticket) = self.prepare(event)?;
        match self.tx.try_send(msg) {
            Ok(()) => Ok(ticket),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                self.shared
                    .counters
                    .queue_full_waits
                    .fetch_add(1, Ordering::Relaxed);
                self.tx.blocking_send(msg).map_err(|_| self.closed())?;
                Ok(ticket)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.closed()),
        }
    }

    /// As [`AuditLog::submit`], awaiting queue space instead of blocking.
    pub async fn submit_async(&self, event: &AuditEvent) -> Result<Ticket, SubmitError> {
        let (msg, ticket) = self.prepare(event)?;
        match self.tx.try_send(msg) {
            Ok(()) => Ok(ticket),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                self.shared
                    .counters
                    .queue_full_waits
                    .fetch_add(1, Ordering::Relaxed);
                self.tx.send(msg).await.map_err(|_| self.closed())?;
                Ok(ticket)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.closed()),
        }
    }

    /// Queues a record or refuses at once when the queue is full (counted;
    /// under fail-closed the flow is then refused).
    pub fn try_submit(&self, event: &AuditEvent) -> Result<Ticket, SubmitError> {
        let (msg, ticket) = self.prepare(event)?;
        self.try_queue(msg)?;
        Ok(ticket)
    }

    /// As [`AuditLog::try_submit`], for a producer that will not wait for
    /// the record to be durable: no ticket, so nothing to answer. (The
    /// record is as complete and as counted; a failure to write it still
    /// shows as a gap.)
    pub fn try_record(&self, event: &AuditEvent) -> Result<(), SubmitError> {
        self.try_queue(self.pending(event, None)?)
    }

    fn try_queue(&self, msg: Msg) -> Result<(), SubmitError> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                let c = &self.shared.counters;
                c.queue_full_rejections.fetch_add(1, Ordering::Relaxed);
                c.lost_records.fetch_add(1, Ordering::Relaxed);
                c.gap_lost.fetch_add(1, Ordering::Relaxed);
                if self.shared.mode == OnLogFailure::FailClosed {
                    c.refused_admissions.fetch_add(1, Ordering::Relaxed);
                    c.gap_refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(SubmitError::QueueFull {
                    mode: self.mode_str(),
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.closed()),
        }
    }

    pub fn stats(&self) -> AuditStats {
        self.shared.counters.snapshot()
    }

    /// As [`AuditLog::close`], from async code.
    pub async fn close_async(self) -> Result<(), AuditError> {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).await.is_err() {
            return Err(AuditError::WriterGone);
        }
        let answered = rx.await;
        // The writer has answered; joining only reaps the finished thread.
        let handle = self.shared.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        match answered {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuditError::StopNotWritten),
            Err(_) => Err(AuditError::WriterGone),
        }
    }

    /// Writes the `stop` record and its signed checkpoint, and waits for the
    /// writer thread to finish. Other handles get `Closed` from then on.
    /// Blocks: inside async code use [`AuditLog::close_async`].
    pub fn close(self) -> Result<(), AuditError> {
        let (done, rx) = oneshot::channel();
        if self.tx.blocking_send(Msg::Close(done)).is_err() {
            return Err(AuditError::WriterGone);
        }
        let answered = rx.blocking_recv();
        let handle = self.shared.thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        match answered {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuditError::StopNotWritten),
            Err(_) => Err(AuditError::WriterGone),
        }
    }
}

impl Counters {
    fn snapshot(&self) -> AuditStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AuditStats {
            records_written: g(&self.records_written),
            commits: g(&self.commits),
            queue_full_waits: g(&self.queue_full_waits),
            queue_full_rejections: g(&self.queue_full_rejections),
            refused_admissions: g(&self.refused_admissions),
            lost_records: g(&self.lost_records),
            write_failures: g(&self.write_failures),
        }
    }
}

/// Where the trail stood when this boot opened it.
struct Recovered {
    last_index: u64,
    head: String,
    previous_boot: Option<PreviousBoot>,
    /// The key that signed the trail's last record, when that is a
    /// checkpoint (a clean stop's is).
    last_key_id: Option<String>,
}

fn recover(dir: &Path) -> Result<Recovered, AuditError> {
    let derr = |source| AuditError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let files = list_files(dir).map_err(derr)?;
    let last_index = files.last().map_or(0, |(i, _)| *i);
    let mut torn_tail = None;
    // Walk back to the last complete line. A torn write can only be in the
    // file holding that line (files after it are empty: created by a
    // rotation that never wrote to them).
    for (_, path) in files.iter().rev() {
        let content = std::fs::read(path).map_err(derr)?;
        let (lines, torn) = split_lines(&content);
        if torn_tail.is_none() {
            if let Some((offset, bytes)) = torn {
                torn_tail = Some(TornTail {
                    file: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    offset,
                    length: bytes.len() as u64,
                    sha256: line_hash(bytes),
                });
            }
        }
        if let Some(last) = lines.last() {
            let record: Option<AuditRecord> = serde_json::from_slice(last.bytes).ok();
            let (boot_id, last_seq, clean) = match &record {
                Some(r) => (
                    r.boot_id.clone(),
                    r.seq,
                    r.event.event.action == Action::Checkpoint
                        && r.event
                            .palisade
                            .as_ref()
                            .and_then(|p| p.checkpoint.as_ref())
                            .is_some_and(|c| c.reason == "stop"),
                ),
                None => (String::new(), 0, false),
            };
            let last_key_id = record
                .as_ref()
                .and_then(|r| r.event.palisade.as_ref())
                .and_then(|p| p.checkpoint.as_ref())
                .map(|c| c.key_id.clone());
            return Ok(Recovered {
                last_key_id,
                last_index,
                head: line_hash(last.bytes),
                previous_boot: Some(PreviousBoot {
                    boot_id,
                    last_seq,
                    clean,
                    torn_tail,
                }),
            });
        }
    }
    Ok(Recovered {
        last_key_id: None,
        last_index,
        head: GENESIS_HASH.to_string(),
        previous_boot: torn_tail.map(|t| PreviousBoot {
            torn_tail: Some(t),
            ..PreviousBoot::default()
        }),
    })
}

struct Failure {
    since: Timestamp,
    error: String,
}

struct Writer {
    /// Held for the writer's life: two writers on one directory would fork
    /// the chain.
    lock: File,
    cfg: AuditConfig,
    signer: CheckpointSigner,
    shared: Arc<Shared>,
    boot_id: String,
    file: File,
    /// The current file's (device, inode): a file deleted or replaced
    /// under the writer is noticed before the next write would go where
    /// no one can read it.
    file_id: (u64, u64),
    file_index: u64,
    /// Bytes of the current file known to be durable.
    durable_len: u64,
    file_opened: Instant,
    records_in_file: u64,
    /// Chain state after the last durable record.
    next_seq: u64,
    head: String,
    /// Staged, not yet written: the bytes and the chain state after them.
    buf: Vec<u8>,
    staged_seq: u64,
    staged_head: String,
    staged_records: u64,
    last_timestamp: Timestamp,
    last_checkpoint: Instant,
    last_checkpoint_at: Timestamp,
    records_since_checkpoint: u64,
    failure: Option<Failure>,
    /// The current file was rotated to and still lacks its first record
    /// (`rotation`, naming this previous file).
    rotation_record_pending: Option<String>,
    rotation_record_staged: Option<String>,
    /// (lost, refused) counted in a staged gap record.
    gap_staged: (u64, u64),
    /// The last timestamp formatted, reused by the records of one batch.
    ts_text: (Timestamp, String),
}

impl Writer {
    fn start(
        cfg: AuditConfig,
        signer: CheckpointSigner,
        boot_id: String,
        shared: Arc<Shared>,
    ) -> Result<Writer, AuditError> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| AuditError::Dir {
            dir: dir.clone(),
            source,
        })?;
        let lock = lock_dir(&dir)?;
        let rec = recover(&dir)?;
        if let Some(old) = rec.last_key_id.as_deref().filter(|k| *k != signer.key_id()) {
            crate::say!(
                "palisade: audit trail: warning: the trail so far was signed with key {old}; this run signs with key {}: its auditors need both public keys (audit verify --key OLD.pub --key NEW.pub)",
                signer.key_id()
            );
        }
        let index = rec.last_index + 1;
        let path = dir.join(file_name(index));
        let file = create_file(&dir, &path).map_err(|source| AuditError::Write {
            path: path.clone(),
            source,
        })?;
        let file_id = file_identity(&file).map_err(|source| AuditError::Write {
            path: path.clone(),
            source,
        })?;
        let mut w = Writer {
            lock,
            cfg,
            signer,
            shared,
            boot_id,
            file,
            file_id,
            file_index: index,
            durable_len: 0,
            file_opened: Instant::now(),
            records_in_file: 0,
            next_seq: 0,
            head: rec.head.clone(),
            buf: Vec::with_capacity(1 << 20),
            staged_seq: 0,
            staged_head: rec.head,
            staged_records: 0,
            last_timestamp: Timestamp(i64::MIN),
            last_checkpoint: Instant::now(),
            last_checkpoint_at: Timestamp::now(),
            records_since_checkpoint: 0,
            failure: None,
            rotation_record_pending: None,
            rotation_record_staged: None,
            gap_staged: (0, 0),
            ts_text: (Timestamp(0), String::new()),
        };
        if let Some(pb) = rec.previous_boot.as_ref().filter(|pb| !pb.clean) {
            crate::say!(
                "palisade: audit trail: the previous run{} ended without its stop record (a crash, a kill, or a trail it could not write at stop); the start record says so",
                if pb.boot_id.is_empty() {
                    String::new()
                } else {
                    format!(" (boot {}, last seq {})", &pb.boot_id[..pb.boot_id.len().min(8)], pb.last_seq)
                }
            );
        }
        let mut start = AuditEvent::lifecycle(Action::Start);
        start.palisade = Some(PalisadeFields {
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            on_log_failure: Some(w.cfg.on_log_failure.as_str().to_string()),
            previous_boot: rec.previous_boot,
            file: (rec.last_index > 0).then(|| FileLink {
                previous: Some(file_name(rec.last_index)),
                next: None,
            }),
            ..PalisadeFields::default()
        });
        w.stage_event(&start);
        // Signed in the same write as the start record, so that every
        // record of a boot is covered by a signature from its first write
        // on (`audit verify` rejects a boot without one).
        w.stage_signed_checkpoint("start", None);
        w.commit()
            .map_err(|source| AuditError::Write { path, source })?;
        w.checkpoint_done();
        Ok(w)
    }

    fn path(&self) -> PathBuf {
        self.cfg.dir.join(file_name(self.file_index))
    }

    // A commit-order timestamp: never earlier than the previous record's,
    // so the trail reads in time order even if the clock steps back.
    fn timestamp(&mut self) -> Timestamp {
        let now = Timestamp::now().max(self.last_timestamp);
        self.last_timestamp = now;
        now
    }

    fn stage_body(&mut self, timestamp: Timestamp, body: &[u8]) {
        let start = self.buf.len();
        if self.ts_text.0 != timestamp || self.ts_text.1.is_empty() {
            self.ts_text = (timestamp, timestamp.to_string());
        }
        self.buf.extend_from_slice(b"{\"@timestamp\":\"");
        self.buf.extend_from_slice(self.ts_text.1.as_bytes());
        let _ = write!(self.buf, "\",\"seq\":{},\"boot_id\":\"", self.staged_seq);
        self.buf.extend_from_slice(self.boot_id.as_bytes());
        self.buf.extend_from_slice(b"\",\"prev_hash\":\"");
        self.buf.extend_from_slice(self.staged_head.as_bytes());
        self.buf.push(b'"');
        match body.get(1..) {
            Some(rest) if rest.len() > 1 => {
                self.buf.push(b',');
                self.buf.extend_from_slice(rest);
            }
            _ => self.buf.push(b'}'),
        }
        line_hash_into(&self.buf[start..], &mut self.staged_head);
        self.buf.push(b'\n');
        self.staged_seq += 1;
        self.staged_records += 1;
    }

    fn stage_event(&mut self, event: &AuditEvent) {
        let ts = self.timestamp();
        let body = record_body(event);
        self.stage_body(ts, &body);
    }

    fn stage_checkpoint(&mut self, reason: &str, next: Option<String>) {
        self.stage_pending_gap();
        self.stage_signed_checkpoint(reason, next);
    }

    /// A checkpoint with no gap record before it: the start and stop
    /// checkpoints directly follow their start and stop records (`audit
    /// verify` requires it).
    fn stage_signed_checkpoint(&mut self, reason: &str, next: Option<String>) {
        let ts = self.timestamp();
        let mut stats = self.shared.counters.snapshot();
        // The records before it in this write count too: a checkpoint's
        // `records_written` is the number of records of its boot before
        // it, which is its own `seq`.
        stats.records_written += self.staged_records;
        let mut ev = AuditEvent::lifecycle(Action::Checkpoint);
        ev.palisade = Some(PalisadeFields {
            checkpoint: Some(Checkpoint {
                reason: reason.to_string(),
                key_id: self.signer.key_id().to_string(),
                // Filled in below, once the rest of the line is known.
                signature: String::new(),
                stats,
            }),
            file: next.map(|n| FileLink {
                previous: None,
                next: Some(n),
            }),
            ..PalisadeFields::default()
        });
        let body = record_body(&ev);
        // The line is staged with an empty signature, signed whole, and
        // the signature put in its place; the chain then hashes the line
        // as written.
        let start = self.buf.len();
        self.stage_body(ts, &body);
        let end = self.buf.len() - 1; // before the newline
        let Some(slot) = signature_slot(&self.buf[start..end]) else {
            // The event above always holds the one signature field.
            return;
        };
        // `stage_body` has just hashed the line as signed, for the chain.
        let signature = self.signer.sign(&checkpoint_message(&self.staged_head));
        let slot = start + slot;
        self.buf
            .splice(slot..slot, signature.bytes())
            .for_each(drop);
        line_hash_into(
            &self.buf[start..end + signature.len()],
            &mut self.staged_head,
        );
    }

    // Losses and refusals not yet written down (e.g. counted just as the
    // log recovered) go into a gap record before the next checkpoint.
    fn stage_pending_gap(&mut self) {
        let c = &self.shared.counters;
        let lost = c.gap_lost.load(Ordering::Relaxed);
        let refused = c.gap_refused.load(Ordering::Relaxed);
        // One gap record per write: what is counted after it is staged goes
        // in the next one (the counters drop by what it reports only once
        // it is durable).
        if lost == 0 && refused == 0 || self.gap_staged != (0, 0) {
            return;
        }
        let now = Timestamp::now();
        // Outside a failure (a full queue under try_submit), the losses
        // happened since the last checkpoint, which reported none.
        let since = self
            .failure
            .as_ref()
            .map_or(self.last_checkpoint_at, |f| f.since);
        let mut ev = AuditEvent::lifecycle(Action::Gap);
        ev.event.reason = Some(format!(
            "{lost} records not written and {refused} flows refused while the audit log could not be written"
        ).into());
        ev.palisade = Some(PalisadeFields {
            gap: Some(Gap {
                lost_records: lost,
                refused_admissions: refused,
                from: since,
                to: now,
            }),
            on_log_failure: Some(self.cfg.on_log_failure.as_str().to_string()),
            ..PalisadeFields::default()
        });
        self.stage_event(&ev);
        // Subtract what this record reports once it is durable; see commit.
        self.gap_staged = (lost, refused);
    }

    /// Writes the staged bytes at the durable end of the file and fdatasyncs.
    /// On failure nothing staged counts, and the file is cut back to its
    /// durable length so a retry rewrites from a clean end.
    fn commit(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self
            .file_in_place()
            .and_then(|()| self.file.write_all_at(&self.buf, self.durable_len))
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.durable_len += self.buf.len() as u64;
                self.buf.clear();
                self.next_seq = self.staged_seq;
                self.head.clone_from(&self.staged_head);
                self.records_in_file += self.staged_records;
                self.records_since_checkpoint += self.staged_records;
                let c = &self.shared.counters;
                c.records_written
                    .fetch_add(self.staged_records, Ordering::Relaxed);
                c.commits.fetch_add(1, Ordering::Relaxed);
                self.staged_records = 0;
                self.rotation_record_staged = None;
                let (lost, refused) = std::mem::take(&mut self.gap_staged);
                c.gap_lost.fetch_sub(lost, Ordering::Relaxed);
                c.gap_refused.fetch_sub(refused, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.discard_staged();
                self.shared
                    .counters
                    .write_failures
                    .fetch_add(1, Ordering::Relaxed);
                let _ = self.file.set_len(self.durable_len);
                Err(e)
            }
        }
    }

    fn discard_staged(&mut self) {
        self.buf.clear();
        self.staged_seq = self.next_seq;
        self.staged_head.clone_from(&self.head);
        self.staged_records = 0;
        self.gap_staged = (0, 0);
        if let Some(previous) = self.rotation_record_staged.take() {
            self.rotation_record_pending = Some(previous);
        }
    }
}

/// An open file's (device, inode).
fn file_identity(file: &File) -> std::io::Result<(u64, u64)> {
    file.metadata().map(|m| identity(&m))
}

fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// How often an idle writer checks that its file is still in place.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The message of a write refused because the current file is not where
/// the trail says it is.
const FILE_GONE: &str = "was deleted or replaced while the trail was writing to it";

fn lock_dir(dir: &Path) -> Result<File, AuditError> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| AuditError::Dir {
            dir: dir.to_path_buf(),
            source,
        })?;
    // The kernel drops the lock when the process dies, so a crash never
    // leaves the directory locked.
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| AuditError::Locked {
            dir: dir.to_path_buf(),
        },
    )?;
    Ok(file)
}

fn create_file(dir: &Path, path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // A file left by a rotation that failed half-way is reused only if empty;
    // anything else is never overwritten.
    if file.metadata()?.len() != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already holds data", path.display()),
        ));
    }
    sync_dir(dir)?;
    Ok(file)
}

enum Next {
    Msg(Msg),
    Timeout,
    Disconnected,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => {
                self.shared.state.store(CLOSED, Ordering::Release);
                return;
            }
        };
        let max_batch = self.cfg.group_commit_records;
        let mut batch: Vec<Pending> = Vec::with_capacity(max_batch);
        loop {
            let wait = self.next_deadline();
            let next = rt.block_on(async {
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(m)) => Next::Msg(m),
                    Ok(None) => Next::Disconnected,
                    Err(_) => Next::Timeout,
                }
            });
            let mut close = None;
            match next {
                Next::Timeout => {
                    self.on_timer();
                    continue;
                }
                Next::Disconnected => {
                    let _ = self.stop();
                    return;
                }
                Next::Msg(Msg::Close(done)) => close = Some(done),
                Next::Msg(Msg::Record(p)) => batch.push(p),
            }
            // Group commit: take what is already queued, then wait up to the
            // window for more, bounded by the batch size.
            let window_end = Instant::now() + self.cfg.group_commit_window;
            while close.is_none() && batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(Msg::Record(p)) => batch.push(p),
                    Ok(Msg::Close(done)) => close = Some(done),
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let left = window_end.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        // Sleep out the window rather than park on the
                        // channel: a parked receiver is woken by every
                        // record (a futex call in the producer, a context
                        // switch here), which under load cost more CPU than
                        // the records themselves. Whatever arrived is
                        // drained when the window ends.
                        std::thread::sleep(left);
                    }
                }
            }
            if !batch.is_empty() {
                self.write_batch(&mut batch);
            }
            if let Some(done) = close {
                self.shared.state.store(CLOSED, Ordering::Release);
                rx.close();
                // Records queued before the close still get written.
                while let Ok(m) = rx.try_recv() {
                    if let Msg::Record(p) = m {
                        batch.push(p);
                    }
                }
                if !batch.is_empty() {
                    self.write_batch(&mut batch);
                }
                let stopped = self.stop();
                let _ = done.send(stopped);
                return;
            }
        }
    }

    fn next_deadline(&self) -> Duration {
        if self.failure.is_some() {
            return self.cfg.failure_retry;
        }
        let mut wait = FILE_CHECK_INTERVAL;
        if self.records_since_checkpoint > 0 {
            wait = wait.min(
                self.cfg
                    .checkpoint_interval
                    .saturating_sub(self.last_checkpoint.elapsed()),
            );
        }
        if let Some(age) = self.cfg.rotate_age {
            if self.records_in_file > 1 {
                wait = wait.min(age.saturating_sub(self.file_opened.elapsed()));
            }
        }
        wait.max(Duration::from_millis(1))
    }

    fn on_timer(&mut self) {
        if self.failure.is_some() {
            self.try_recover();
            return;
        }
        // An idle trail's file is looked for too, so that its deletion is
        // said (and the trail goes on in a new file) within seconds, not
        // at the next record.
        if self.fail_if_file_gone() {
            self.try_recover();
            return;
        }
        if self.rotation_due() {
            if let Err(e) = self.rotate() {
                self.fail(e);
            }
            return;
        }
        if self.records_since_checkpoint > 0
            && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval
        {
            self.stage_checkpoint("interval", None);
            match self.commit() {
                Ok(()) => self.checkpoint_done(),
                Err(e) => self.fail(e),
            }
        }
    }

    /// The current file is still the one at its path. Writes to a file
    /// someone deleted (or moved away, or replaced) would reach no reader:
    /// they are refused instead, the log fails, and recovery goes on in a
    /// new file (see [`Writer::reopen`]).
    /// A path that cannot be looked up for another reason (its folder
    /// made unreadable, say) does not stop writes to the file, which the
    /// writer still holds open.
    fn file_in_place(&self) -> std::io::Result<()> {
        match self.file_gone() {
            Ok(true) => Err(std::io::Error::other(FILE_GONE)),
            Ok(false) | Err(_) => Ok(()),
        }
    }

    /// No file is at the current file's path, or another one is.
    fn file_gone(&self) -> std::io::Result<bool> {
        // The link itself: a symbolic link put in its place is another file.
        match std::fs::symlink_metadata(self.path()) {
            Ok(m) => Ok(identity(&m) != self.file_id),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Fails the log if the current file is gone (see
    /// [`Writer::file_gone`]); true if it did. Recovery reopens.
    fn fail_if_file_gone(&mut self) -> bool {
        let gone = self.failure.is_none() && self.file_gone().unwrap_or(false);
        if gone {
            self.fail(std::io::Error::other(FILE_GONE));
        }
        gone
    }

    /// Goes on in a new file after the current one was deleted or
    /// replaced: the directory is created again if it went too (and locked
    /// again if its lock went with it), and the new file begins with a
    /// `rotation` record naming the lost file, so `audit verify` reports
    /// what is missing instead of the trail quietly starting over.
    fn reopen(&mut self) -> std::io::Result<()> {
        let dir = self.cfg.dir.clone();
        std::fs::create_dir_all(&dir)?;
        let held = file_identity(&self.lock).ok();
        let at_path = std::fs::metadata(dir.join(".lock")).map(|m| identity(&m));
        if held.is_none() || held != at_path.ok() {
            self.lock = lock_dir(&dir).map_err(std::io::Error::other)?;
        }
        let previous = file_name(self.file_index);
        let index = self.file_index + 1;
        let file = create_file(&dir, &dir.join(file_name(index)))?;
        self.file_id = file_identity(&file)?;
        self.file = file;
        self.file_index = index;
        self.durable_len = 0;
        self.records_in_file = 0;
        self.file_opened = Instant::now();
        crate::say!(
            "palisade: audit trail: {previous} {FILE_GONE}; the trail goes on in {} (audit verify reports what is missing)",
            file_name(index)
        );
        self.rotation_record_pending = Some(previous);
        Ok(())
    }

    fn checkpoint_done(&mut self) {
        self.last_checkpoint = Instant::now();
        self.last_checkpoint_at = self.last_timestamp;
        self.records_since_checkpoint = 0;
    }

    fn rotation_due(&self) -> bool {
        // A file holding only its first record is not rotated again.
        self.records_in_file > 1
            && (self.durable_len >= self.cfg.rotate_size
                || self
                    .cfg
                    .rotate_age
                    .is_some_and(|age| self.file_opened.elapsed() >= age))
    }

    /// Creates the next file, seals the current one with a signed
    /// checkpoint naming it, then begins the next with a `rotation` record.
    /// The next file exists before any record names it, so a crash at any
    /// point leaves no checkpoint pointing at a missing file.
    fn rotate(&mut self) -> std::io::Result<()> {
        let previous = file_name(self.file_index);
        let next = file_name(self.file_index + 1);
        let next_file = create_file(&self.cfg.dir, &self.cfg.dir.join(&next))?;
        let next_id = file_identity(&next_file)?;
        self.stage_checkpoint("rotation", Some(next));
        self.commit()?;
        self.checkpoint_done();
        self.file = next_file;
        self.file_id = next_id;
        self.file_index += 1;
        self.durable_len = 0;
        self.records_in_file = 0;
        self.file_opened = Instant::now();
        self.rotation_record_pending = Some(previous);
        self.stage_rotation_record();
        self.commit()
    }

    /// The first record of a rotated file; staged again by recovery if its
    /// first commit failed.
    fn stage_rotation_record(&mut self) {
        if let Some(previous) = self.rotation_record_pending.take() {
            let mut ev = AuditEvent::lifecycle(Action::Rotation);
            ev.palisade = Some(PalisadeFields {
                file: Some(FileLink {
                    previous: Some(previous.clone()),
                    next: None,
                }),
                ..PalisadeFields::default()
            });
            self.stage_event(&ev);
            // Cleared for good only once durable (see commit).
            self.rotation_record_staged = Some(previous);
        }
    }

    fn write_batch(&mut self, batch: &mut Vec<Pending>) {
        if self.failure.is_some() && !self.try_recover() {
            self.reject(batch, "the audit log is failing");
            return;
        }
        let mut seqs = Vec::with_capacity(batch.len());
        // How many records of the batch are durable so far.
        let mut durable = 0usize;
        let mut result = if self.rotation_due() {
            self.rotate()
        } else {
            Ok(())
        };
        let mut batch_time = self.timestamp();
        if result.is_ok() {
            for (i, p) in batch.iter().enumerate() {
                // A large batch may fill a file: commit what fits, rotate,
                // and go on in the next file.
                if i > durable && self.durable_len + self.buf.len() as u64 >= self.cfg.rotate_size {
                    if let Err(e) = self.commit() {
                        result = Err(e);
                        break;
                    }
                    durable = i;
                    if let Err(e) = self.rotate() {
                        result = Err(e);
                        break;
                    }
                    batch_time = self.timestamp();
                }
                seqs.push(self.staged_seq);
                // One commit, one time: the records of a batch become
                // durable together.
                self.stage_body(batch_time, &p.body);
            }
        }
        if result.is_ok() {
            let checkpoint = self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval;
            if checkpoint {
                self.stage_checkpoint("interval", None);
            }
            result = self.commit();
            if result.is_ok() {
                durable = batch.len();
                if checkpoint {
                    self.checkpoint_done();
                }
            }
        }
        let why = match result {
            Ok(()) => String::new(),
            Err(e) => {
                let why = e.to_string();
                // Producers learn of the failure only after admission is
                // already being refused.
                self.fail(e);
                why
            }
        };
        let mut rest: Vec<Pending> = batch.drain(durable..).collect();
        for (p, seq) in batch.drain(..).zip(seqs) {
            if let Some(reply) = p.reply {
                let _ = reply.send(Ok(Receipt { seq }));
            }
        }
        self.reject(&mut rest, &why);
    }

    fn reject(&mut self, batch: &mut Vec<Pending>, why: &str) {
        let c = &self.shared.counters;
        let n = batch.len() as u64;
        c.lost_records.fetch_add(n, Ordering::Relaxed);
        c.gap_lost.fetch_add(n, Ordering::Relaxed);
        for p in batch.drain(..) {
            if let Some(reply) = p.reply {
                let _ = reply.send(Err(WriteError::Failed(why.to_string())));
            }
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        if self.failure.is_none() {
            let error = format!("{}: {e}", self.path().display());
            // The operator hears of it at once, on the daemon's stderr:
            // the trail cannot say so until it is written again.
            crate::say!(
                "palisade: audit trail: writes are failing ({error}); {} until they succeed again",
                match self.cfg.on_log_failure {
                    OnLogFailure::FailClosed =>
                        "fail-closed: requests and new flows are refused",
                    OnLogFailure::FailOpen =>
                        "fail-open: traffic goes on and the records it would have written are counted as lost",
                }
            );
            self.failure = Some(Failure {
                since: Timestamp::now(),
                error,
            });
        }
        self.shared.state.store(FAILING, Ordering::Release);
    }

    /// Writes `log-failed`, `gap` and `log-recovered` in one commit; only
    /// when that is durable do producers see a healthy log again.
    fn try_recover(&mut self) -> bool {
        let Some(failure) = self.failure.as_ref() else {
            return true;
        };
        let (since, error) = (failure.since, failure.error.clone());
        if self.file_gone().unwrap_or(false) {
            if let Err(e) = self.reopen() {
                if let Some(f) = self.failure.as_mut() {
                    f.error = format!("{error}; a new file cannot be opened: {e}");
                }
                return false;
            }
        }
        self.stage_rotation_record();
        let mode = self.cfg.on_log_failure.as_str().to_string();
        let mut failed = AuditEvent::lifecycle(Action::LogFailed);
        failed.event.start = Some(since);
        failed.event.reason =
            Some(format!("audit writes failed; {mode} applied until recovery").into());
        failed.palisade = Some(PalisadeFields {
            error: Some(error),
            on_log_failure: Some(mode.clone()),
            ..PalisadeFields::default()
        });
        self.stage_event(&failed);
        self.stage_pending_gap();
        let mut recovered = AuditEvent::lifecycle(Action::LogRecovered);
        recovered.event.start = Some(since);
        recovered.event.end = Some(Timestamp::now());
        recovered.palisade = Some(PalisadeFields {
            on_log_failure: Some(mode),
            ..PalisadeFields::default()
        });
        self.stage_event(&recovered);
        let lost = self.shared.counters.gap_lost.load(Ordering::Relaxed);
        match self.commit() {
            Ok(()) => {
                crate::say!(
                    "palisade: audit trail: writes succeed again; log-failed, gap ({lost} record(s) not written) and log-recovered records are in the trail"
                );
                self.failure = None;
                self.shared.state.store(HEALTHY, Ordering::Release);
                true
            }
            Err(e) => {
                let error = format!("{}: {e}", self.path().display());
                if let Some(f) = self.failure.as_mut() {
                    f.error = error;
                }
                false
            }
        }
    }

    fn stop(&mut self) -> bool {
        self.shared.state.store(CLOSED, Ordering::Release);
        // A file deleted while nothing was written is noticed here at the
        // latest: the stop goes in the next file, after the records that
        // say what happened, not nowhere.
        self.fail_if_file_gone();
        if self.failure.is_some() && !self.try_recover() {
            let lost = self.shared.counters.gap_lost.load(Ordering::Relaxed);
            crate::say!(
                "palisade: audit trail: still failing at stop ({}); {lost} record(s) since the failure were not written, and the next start records this boot as ended uncleanly",
                self.failure.as_ref().map_or("", |f| f.error.as_str())
            );
            return false;
        }
        self.stage_pending_gap();
        self.stage_event(&AuditEvent::lifecycle(Action::Stop));
        self.stage_signed_checkpoint("stop", None);
        self.commit().is_ok()
    }
}
