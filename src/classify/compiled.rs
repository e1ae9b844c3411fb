//! The compiled classifier used on the data path.
//!
//! Entries are bucketed by IP protocol, so a lookup scans only the entries
//! that can match the key's protocol, in priority order.

use super::{Address, Entry, Key, RuleId};

/// Why a classifier could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("too many classifier entries: {count} (limit {limit})")]
    TooManyEntries { count: usize, limit: usize },
}

/// Most entries one family's classifier accepts.
pub const MAX_ENTRIES: usize = 1 << 22;

/// The compiled first-match classifier of one address family.
#[derive(Debug, Clone)]
pub struct Classifier<A> {
    entries: Vec<Entry<A>>,
    /// For each protocol number, the indices of entries whose protocol
    /// interval contains it, in priority order.
    by_proto: Vec<Vec<u32>>,
}

impl<A: Address> Classifier<A> {
    pub fn build(entries: Vec<Entry<A>>) -> Result<Self, BuildError> {
        if entries.len() > MAX_ENTRIES {
            return Err(BuildError::TooManyEntries {
                count: entries.len(),
                limit: MAX_ENTRIES,
            });
        }
        let mut by_proto = vec![Vec::new(); 256];
        for (i, e) in entries.iter().enumerate() {
            for p in e.fields.proto.lo..=e.fields.proto.hi {
                by_proto[p as usize].push(i as u32);
            }
        }
        Ok(Classifier { entries, by_proto })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[inline]
    pub fn lookup(&self, key: &Key<A>) -> Option<RuleId> {
        self.by_proto[key.proto as usize]
            .iter()
            .map(|&i| &self.entries[i as usize])
            .find(|e| e.fields.matches(key))
            .map(|e| e.rule)
    }
}
