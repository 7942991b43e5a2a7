//! The fleet's canceled request ids: which ids a producer canceled, for as
//! long as a copy of the request can still arrive or its task still runs
//! (`polling.max_off_peak_task_age`).
//!
//! A cancel comes in on the public `<request_queue>.cancel` queue; the
//! worker that reads it writes a signed canceled record into the journal,
//! which every worker reads, so a cancel one worker read stops a create by
//! any other (the create path reads the journal up to the present first).
//! Ids are kept as the same 128-bit digests as created ids, with the time
//! of the cancel, bounded by age and by [`MAX_CANCELED`].

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::created::IdDigest;
use crate::request::RequestId;

/// Most canceled ids remembered (about 60 MB when full).
pub const MAX_CANCELED: usize = 1_000_000;
/// Ids one canceled record carries at most (a record stays far below the
/// journal's record limit).
pub const IDS_PER_RECORD: usize = 200;

/// A canceled record's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canceled {
    /// Format version.
    pub v: u8,
    /// The ids canceled.
    pub request_ids: Vec<RequestId>,
    /// When the cancel was read.
    pub at: DateTime<Utc>,
}

/// Canceled ids, bounded by age and count.
#[derive(Debug, Default)]
pub struct CanceledIds {
    at: HashMap<IdDigest, DateTime<Utc>>,
    order: VecDeque<(IdDigest, DateTime<Utc>)>,
}

impl CanceledIds {
    /// Remembers that `id` was canceled at `at`; entries older than
    /// `horizon` (and beyond [`MAX_CANCELED`]) are forgotten.
    pub fn remember(&mut self, id: IdDigest, at: DateTime<Utc>, horizon: DateTime<Utc>) {
        if at < horizon || self.at.contains_key(&id) {
            return;
        }
        self.at.insert(id, at);
        self.order.push_back((id, at));
        while self
            .order
            .front()
            .is_some_and(|(_, t)| *t < horizon || self.order.len() > MAX_CANCELED)
        {
            if let Some((old, _)) = self.order.pop_front() {
                self.at.remove(&old);
            }
        }
    }

    /// Whether `id` was canceled.
    pub fn contains(&self, id: &IdDigest) -> bool {
        self.at.contains_key(id)
    }

    /// How many are remembered.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canceled_ids_are_kept_by_age() {
        let t0 = Utc::now();
        let mut ids = CanceledIds::default();
        let a = [1u8; 16];
        let b = [2u8; 16];
        ids.remember(a, t0, t0 - chrono::Duration::hours(1));
        assert!(ids.contains(&a));
        // Too old to keep.
        ids.remember(
            b,
            t0 - chrono::Duration::hours(2),
            t0 - chrono::Duration::hours(1),
        );
        assert!(!ids.contains(&b));
        // A later horizon forgets the first.
        ids.remember(
            b,
            t0 + chrono::Duration::hours(2),
            t0 + chrono::Duration::hours(1),
        );
        assert!(ids.contains(&b) && !ids.contains(&a));
        assert_eq!(ids.len(), 1);
    }
}
