//! The `[audit]` table of the daemon's configuration: where the trail lives,
//! how it is signed, rotated and committed, and what happens to traffic when
//! it cannot be written.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What the enforcement points do with a new flow whose audit record cannot
/// be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnLogFailure {
    /// Refuse it: no flow passes unaudited.
    #[default]
    FailClosed,
    /// Let it pass, count it, and write a `gap` record once writing works.
    FailOpen,
}

impl OnLogFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnLogFailure::FailClosed => "fail-closed",
            OnLogFailure::FailOpen => "fail-open",
        }
    }
}

/// `[audit]`. Every field has a default except `signing_key`.
///
/// ```toml
/// [audit]
/// dir = "/var/log/palisade/audit"
/// signing_key = "/etc/palisade/audit.key"
/// rotate_size = "64MiB"
/// rotate_age = "1h"
/// checkpoint_interval = "60s"
/// on_log_failure = "fail-closed"
/// queue_capacity = 65536
/// group_commit_records = 4096
/// group_commit_window = "1ms"
/// failure_retry = "1s"
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// The Ed25519 signing key written by `palisade audit keygen`.
    pub signing_key: Option<PathBuf>,
    /// Start a new file once the current one reaches this size.
    #[serde(deserialize_with = "de_size")]
    pub rotate_size: u64,
    /// Start a new file once the current one is this old (`"off"`: never).
    #[serde(deserialize_with = "de_opt_duration")]
    pub rotate_age: Option<Duration>,
    /// Write a signed checkpoint at least this often while records arrive.
    #[serde(deserialize_with = "de_duration")]
    pub checkpoint_interval: Duration,
    pub on_log_failure: OnLogFailure,
    /// Records waiting for the writer; a full queue makes producers wait.
    pub queue_capacity: usize,
    /// At most this many records share one fdatasync.
    pub group_commit_records: usize,
    /// How long the writer waits for more records before it commits.
    #[serde(deserialize_with = "de_duration")]
    pub group_commit_window: Duration,
    /// While writing fails, how often the writer tries again.
    #[serde(deserialize_with = "de_duration")]
    pub failure_retry: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: PathBuf::from("/var/log/palisade/audit"),
            signing_key: None,
            rotate_size: 64 << 20,
            rotate_age: Some(Duration::from_secs(3600)),
            checkpoint_interval: Duration::from_secs(60),
            on_log_failure: OnLogFailure::FailClosed,
            queue_capacity: 65_536,
            group_commit_records: 4096,
            group_commit_window: Duration::from_millis(1),
            failure_retry: Duration::from_secs(1),
        }
    }
}

/// A configuration value that cannot work, with the field it is in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("audit.{field}: {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

impl AuditConfig {
    /// Checks what serde cannot: ranges and the required key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, problem: String| Err(ConfigError { field, problem });
        if self.dir.as_os_str().is_empty() {
            return err(
                "dir",
                "is empty; name the directory that holds the trail".into(),
            );
        }
        if self.signing_key.is_none() {
            return err(
                "signing_key",
                "is required: create one with `palisade audit keygen --out DIR` and point this at DIR/audit.key".into(),
            );
        }
        if self.rotate_size < 4096 {
            return err(
                "rotate_size",
                format!(
                    "is {} bytes; it must be at least 4096 (e.g. \"64MiB\")",
                    self.rotate_size
                ),
            );
        }
        if let Some(age) = self.rotate_age {
            if age < Duration::from_secs(1) {
                return err(
                    "rotate_age",
                    format!("is {age:?}; it must be at least 1s, or \"off\""),
                );
            }
        }
        if self.checkpoint_interval < Duration::from_secs(1) {
            return err(
                "checkpoint_interval",
                format!("is {:?}; it must be at least 1s", self.checkpoint_interval),
            );
        }
        if self.queue_capacity == 0 || self.queue_capacity > 16 << 20 {
            return err(
                "queue_capacity",
                format!(
                    "is {}; it must be between 1 and 16777216",
                    self.queue_capacity
                ),
            );
        }
        if self.group_commit_records == 0 || self.group_commit_records > 1 << 20 {
            return err(
                "group_commit_records",
                format!(
                    "is {}; it must be between 1 and 1048576",
                    self.group_commit_records
                ),
            );
        }
        if self.group_commit_window > Duration::from_secs(1) {
            return err(
                "group_commit_window",
                format!(
                    "is {:?}; at most 1s, since every producer waits that long for durability",
                    self.group_commit_window
                ),
            );
        }
        if self.failure_retry < Duration::from_millis(10)
            || self.failure_retry > Duration::from_secs(60)
        {
            return err(
                "failure_retry",
                format!(
                    "is {:?}; it must be between 10ms and 60s",
                    self.failure_retry
                ),
            );
        }
        Ok(())
    }
}

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"`, `"1d"` (or a bare number of
/// seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a duration; write e.g. \"500ms\", \"30s\", \"5m\", \"1h\"")
    })?;
    if unit.starts_with('.') {
        return Err(format!(
            "{s:?}: a duration is a whole number with a unit; write a smaller unit instead of a fraction (\"1500ms\" for 1.5s)"
        ));
    }
    let ms = match unit.trim() {
        "" => {
            return Err(format!(
                "{s:?} has no unit; write e.g. \"{n}s\" or \"{n}ms\""
            ))
        }
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}; use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses `"64MiB"`, `"1GiB"`, `"500KB"` or a number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. \"64MiB\" or \"1GiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}; use B, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

impl fmt::Display for NumOrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumOrText::Num(n) => write!(f, "{n}"),
            NumOrText::Text(t) => f.write_str(t),
        }
    }
}

/// A duration must say its unit: a bare number could mean seconds or
/// milliseconds, and a wrong guess is a timeout 1000 times off.
fn no_unit<E: serde::de::Error>(n: u64) -> E {
    E::custom(format!(
        "{n} has no unit; write a duration as text with one, e.g. \"{n}s\" or \"{n}ms\""
    ))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => Err(no_unit(n)),
        NumOrText::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Text(t) if t == "off" => Ok(None),
        NumOrText::Num(n) => Err(no_unit(n)),
        NumOrText::Text(t) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => Ok(n),
        NumOrText::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(s: &str) -> Result<AuditConfig, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    /// A duration says its unit, in whole numbers.
    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        let e = parse_duration("60").unwrap_err();
        assert!(e.contains("has no unit") && e.contains("\"60s\""), "{e}");
        let e = parse_duration("1.5s").unwrap_err();
        assert!(e.contains("1500ms"), "{e}");
        let e = from_json(r#"{"signing_key": "/k", "checkpoint_interval": 60}"#).unwrap_err();
        assert!(e.contains("60 has no unit"), "{e}");
    }

    #[test]
    fn defaults_need_only_a_key() {
        let c = from_json(r#"{"signing_key": "/k"}"#).unwrap();
        assert_eq!(c.on_log_failure, OnLogFailure::FailClosed);
        assert_eq!(c.rotate_size, 64 << 20);
        c.validate().unwrap();
        let missing = AuditConfig::default().validate().unwrap_err();
        assert_eq!(missing.field, "signing_key");
        assert!(
            missing.to_string().contains("palisade audit keygen"),
            "{missing}"
        );
    }

    #[test]
    fn units_parse_and_mistakes_are_named() {
        let c = from_json(
            r#"{"signing_key":"/k","rotate_size":"1GiB","rotate_age":"off","checkpoint_interval":"5m",
                "group_commit_window":"250ms","on_log_failure":"fail-open"}"#,
        )
        .unwrap();
        assert_eq!(c.rotate_size, 1 << 30);
        assert_eq!(c.rotate_age, None);
        assert_eq!(c.checkpoint_interval, Duration::from_secs(300));
        assert_eq!(c.group_commit_window, Duration::from_millis(250));
        assert_eq!(c.on_log_failure, OnLogFailure::FailOpen);

        let e = from_json(r#"{"rotate_size":"64 parsecs"}"#).unwrap_err();
        assert!(e.contains("unknown unit"), "{e}");
        let e = from_json(r#"{"on_log_failure":"shrug"}"#).unwrap_err();
        assert!(e.contains("fail-closed"), "{e}");
        let e = from_json(r#"{"rotate_sise":"1MiB"}"#).unwrap_err();
        assert!(e.contains("rotate_sise"), "{e}");
        let mut c = from_json(r#"{"signing_key":"/k"}"#).unwrap();
        c.rotate_size = 10;
        assert_eq!(c.validate().unwrap_err().field, "rotate_size");
    }
}
