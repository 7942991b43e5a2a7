//! The fleet's created request ids: which request ids some worker of the
//! deployment has created, and as which task, for as long as a copy of a
//! request can still arrive (`polling.max_off_peak_task_age`).
//!
//! Every worker keeps this index in memory, filled from the journal's
//! created records, so that a request whose id any worker created is not
//! created again. Ids are kept as a 128-bit digest (a request id can be
//! 128 characters; the digest makes each entry a fixed, small size), with the
//! task id and model needed to track the task again, and the time of the
//! create (about 220 bytes of memory each, measured: 22 MB per 100,000).
//! The index is bounded by age and by [`MAX_REMEMBERED`]; the
//! oldest entries go first, and [`CreatedIndex::evicted_young`] says when
//! the count bound (not the age bound) pushed one out.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::request::RequestId;

/// Most request ids remembered (about 220 MB of memory when full).
pub const MAX_REMEMBERED: usize = 1_000_000;

/// A request id's digest.
pub type IdDigest = [u8; 16];

/// The digest of a request id.
pub fn digest(id: &RequestId) -> IdDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// A remembered create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    /// The upstream task.
    pub task_id: Box<str>,
    /// The model's name.
    pub model: Box<str>,
    /// When the upstream accepted it.
    pub at: DateTime<Utc>,
}

/// Request ids created by the fleet, bounded by age and count.
#[derive(Debug, Default)]
pub struct CreatedIndex {
    by_id: HashMap<IdDigest, Remembered>,
    /// Ids in the order they were remembered (about time order), for
    /// eviction.
    order: VecDeque<(IdDigest, DateTime<Utc>)>,
    evicted_young: u64,
}

impl CreatedIndex {
    /// Remembers that `id` was created as `entry`; entries older than
    /// `horizon` (and beyond [`MAX_REMEMBERED`]) are forgotten. The first
    /// record of an id wins: a second create of one id (the window the
    /// README names) keeps the first task.
    pub fn remember(&mut self, id: IdDigest, entry: Remembered, horizon: DateTime<Utc>) {
        if entry.at < horizon {
            return;
        }
        let at = entry.at;
        if self.by_id.contains_key(&id) {
            return;
        }
        self.by_id.insert(id, entry);
        self.order.push_back((id, at));
        self.forget_before(horizon);
        while self.order.len() > MAX_REMEMBERED {
            if let Some((old, _)) = self.order.pop_front() {
                self.by_id.remove(&old);
                self.evicted_young += 1;
            }
        }
    }

    /// Forgets the entries remembered before `horizon`.
    pub fn forget_before(&mut self, horizon: DateTime<Utc>) {
        while self.order.front().is_some_and(|(_, at)| *at < horizon) {
            if let Some((old, at)) = self.order.pop_front() {
                // A later record of the same id is not this one.
                if self.by_id.get(&old).is_some_and(|e| e.at == at) {
                    self.by_id.remove(&old);
                }
            }
        }
    }

    /// The create of `id`, if remembered.
    pub fn get(&self, id: &IdDigest) -> Option<&Remembered> {
        self.by_id.get(id)
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// How many ids younger than the horizon were forgotten because the
    /// index was full.
    pub fn evicted_young(&self) -> u64 {
        self.evicted_young
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    fn id(s: &str) -> IdDigest {
        digest(&RequestId::parse(s).unwrap_or_else(|_| panic!("{s} is an id")))
    }

    fn entry(task: &str, t: i64) -> Remembered {
        Remembered {
            task_id: task.into(),
            model: "vidu-q3-pro-i2v".into(),
            at: at(t),
        }
    }

    #[test]
    fn the_first_create_of_an_id_is_remembered_until_the_horizon() {
        let mut index = CreatedIndex::default();
        index.remember(id("a"), entry("t1", 10), at(0));
        index.remember(id("a"), entry("t2", 11), at(0));
        index.remember(id("b"), entry("t3", 20), at(0));
        assert_eq!(index.get(&id("a")).map(|e| &*e.task_id), Some("t1"));
        assert_eq!(index.len(), 2);
        // Older than the horizon: never remembered.
        index.remember(id("c"), entry("t4", 5), at(6));
        assert!(index.get(&id("c")).is_none());
        index.forget_before(at(15));
        assert!(index.get(&id("a")).is_none());
        assert_eq!(index.get(&id("b")).map(|e| &*e.task_id), Some("t3"));
        index.forget_before(at(100));
        assert!(index.is_empty());
        assert_eq!(index.evicted_young(), 0);
    }

    #[test]
    fn ids_differ_by_digest_and_equal_ids_collide() {
        assert_eq!(id("req-1"), id("req-1"));
        assert_ne!(id("req-1"), id("req-2"));
    }
}
