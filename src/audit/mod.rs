//! The audit trail: the record schema both enforcement points write, the
//! writer that makes records durable and tamper-evident, and the reader
//! behind `palisade audit verify | query | summary | export`.
//!
//! Producers (the proxy's tasks, the filter's thread) hold an [`AuditLog`]:
//!
//! ```no_run
//! # use palisade::audit::*;
//! # fn demo(log: &AuditLog) -> Result<(), Box<dyn std::error::Error>> {
//! // Before admitting a new flow (refused only under fail-closed while the
//! // log cannot be written):
//! log.admit()?;
//! let event = AuditEvent::proxy_request(Action::Allowed, "192.0.2.10:40000".parse()?, "GET", "http://example.com/")
//!     .with_rule("web-out", "3f1c...")
//!     .with_status(200);
//! match log.submit(&event) {          // or `submit_async(&event).await`
//!     Ok(ticket) => { ticket.wait()?; } // or `ticket.durable().await`
//!     Err(e) if e.refuses_flow() => { /* refuse the flow */ }
//!     Err(_) => { /* fail-open: counted, a gap record follows */ }
//! }
//! # Ok(()) }
//! ```
//!
//! The writer assigns `@timestamp`, `seq`, `boot_id` and `prev_hash`; see
//! `docs-audit.md` for the schema and the integrity rules `verify` checks.

pub mod community_id;
pub mod config;
pub mod json;
pub mod keys;
pub mod query;
pub mod record;
pub mod time;
pub mod trail;
pub mod verify;
pub mod writer;

pub use community_id::community_id_v1;
pub use config::{AuditConfig, ConfigError, OnLogFailure};
pub use keys::{generate_key_pair, CheckpointSigner, CheckpointVerifier, KeyError};
pub use record::{Action, AuditEvent, AuditRecord, FlowTuple, RecordKind, Traffic};
pub use time::Timestamp;
pub use writer::{AuditError, AuditLog, AuditStats, Receipt, SubmitError, Ticket, WriteError};
