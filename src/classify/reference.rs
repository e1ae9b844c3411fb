//! The plain reference matcher: entries scanned in priority order.
//!
//! It is the specification of first-match semantics that every faster
//! structure is tested against; it is deliberately the simplest code that can
//! be right.

use super::{Address, Entry, Key, RuleId};

/// First-match linear scan over entries in priority order.
#[derive(Debug, Clone)]
pub struct LinearMatcher<A> {
    entries: Vec<Entry<A>>,
}

impl<A> Default for LinearMatcher<A> {
    fn default() -> Self {
        LinearMatcher {
            entries: Vec::new(),
        }
    }
}

impl<A: Address> LinearMatcher<A> {
    pub fn new(entries: Vec<Entry<A>>) -> Self {
        LinearMatcher { entries }
    }

    pub fn entries(&self) -> &[Entry<A>] {
        &self.entries
    }

    /// The rule of the first entry that contains `key`.
    pub fn lookup(&self, key: &Key<A>) -> Option<RuleId> {
        self.entries
            .iter()
            .find(|e| e.fields.matches(key))
            .map(|e| e.rule)
    }
}
