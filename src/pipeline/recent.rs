//! The worker's memory of its own recent creates, so that a redelivered
//! copy of a request it already created is not paid for again.
//!
//! The broker redelivers a request whose delivery was lost while its create
//! (or its acknowledgement) was on the wire, often to the same worker once
//! it has reconnected. [`RecentCreates`] remembers, by the producer's
//! request id, for [`RECENT_TTL`] and at most [`RECENT_CAPACITY`] entries,
//! which requests were created and tracked, and which are being created
//! right now (a redelivered copy then waits for that create to end).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::request::RequestId;

/// How long a created request is remembered, so that a redelivered copy
/// (its delivery was lost while the create or its ack was on the wire) is
/// not created again.
pub(crate) const RECENT_TTL: Duration = Duration::from_secs(30);
/// Most created requests remembered at once.
pub(crate) const RECENT_CAPACITY: usize = 2_048;
/// Longest a redelivered copy waits for this worker's own create of the
/// same request to finish.
pub(crate) const RECENT_WAIT: Duration = Duration::from_secs(180);

/// Requests this worker created recently, by the producer's id.
///
/// A delivery lost while its create (or its acknowledgement) was on the
/// wire is redelivered, often to this same worker once it has reconnected.
/// The entry says that the request was created and tracked (skip it), or
/// that its create is still running here (wait for it). Only ids the
/// producer chose count (a generated id differs per delivery), only
/// redelivered messages are matched, and entries live [`RECENT_TTL`].
#[derive(Default)]
pub(crate) struct RecentCreates {
    state: Mutex<RecentState>,
}

#[derive(Default)]
struct RecentState {
    entries: HashMap<RequestId, Entry>,
    recorded: VecDeque<(Instant, RequestId)>,
}

enum Entry {
    InFlight(watch::Receiver<bool>),
    Recorded,
}

/// What a request with a known id may do.
pub(crate) enum Begin<'a> {
    /// Create it (the guard, when there is one, registers the create).
    Go(Option<CreateGuard<'a>>),
    /// This worker created and tracks it already.
    Recorded,
}

/// Registers one create in flight; on drop it is remembered as recorded
/// (if [`CreateGuard::recorded`] was called) or forgotten.
pub(crate) struct CreateGuard<'a> {
    recent: &'a RecentCreates,
    id: RequestId,
    done: watch::Sender<bool>,
    recorded: bool,
}

impl CreateGuard<'_> {
    /// The task exists and its ticket is recorded (or the request must not
    /// be created again for another reason).
    pub(crate) fn recorded(&mut self) {
        self.recorded = true;
    }
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.recent.lock();
        if self.recorded {
            let now = Instant::now();
            state.entries.insert(self.id.clone(), Entry::Recorded);
            state.recorded.push_back((now, self.id.clone()));
            state.trim(now);
        } else {
            state.entries.remove(&self.id);
        }
        drop(state);
        let _ = self.done.send(true);
    }
}

impl RecentState {
    fn trim(&mut self, now: Instant) {
        while let Some((at, id)) = self.recorded.front() {
            let expired = now.saturating_duration_since(*at) >= RECENT_TTL
                || self.recorded.len() > RECENT_CAPACITY;
            if !expired {
                break;
            }
            if matches!(self.entries.get(id), Some(Entry::Recorded)) {
                self.entries.remove(id);
            }
            self.recorded.pop_front();
        }
    }
}

impl RecentCreates {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecentState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks `id` up before creating it. A redelivered request that this
    /// worker is creating right now waits for that create to end.
    pub(crate) async fn begin(&self, id: &RequestId, redelivered: bool) -> Begin<'_> {
        let deadline = Instant::now() + RECENT_WAIT;
        loop {
            let mut waiting = {
                let mut state = self.lock();
                state.trim(Instant::now());
                match state.entries.get(id) {
                    Some(Entry::Recorded) if redelivered => return Begin::Recorded,
                    Some(Entry::InFlight(rx)) if redelivered => rx.clone(),
                    // Not a redelivery: a second message with the same id
                    // is created as before, without taking over the entry.
                    Some(_) => return Begin::Go(None),
                    None => {
                        let (done, rx) = watch::channel(false);
                        state.entries.insert(id.clone(), Entry::InFlight(rx));
                        return Begin::Go(Some(CreateGuard {
                            recent: self,
                            id: id.clone(),
                            done,
                            recorded: false,
                        }));
                    }
                }
            };
            let finished = tokio::time::timeout_at(deadline, waiting.wait_for(|done| *done)).await;
            if finished.is_err() {
                return Begin::Go(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> RequestId {
        RequestId::parse(s).expect("id")
    }

    #[tokio::test]
    async fn a_redelivered_copy_of_a_recorded_create_is_recognised() {
        let recent = RecentCreates::default();
        let Begin::Go(Some(mut guard)) = recent.begin(&id("r-1"), false).await else {
            panic!("the first delivery creates");
        };
        guard.recorded();
        drop(guard);
        assert!(matches!(
            recent.begin(&id("r-1"), true).await,
            Begin::Recorded
        ));
        // A message that is not a redelivery is created as before.
        assert!(matches!(
            recent.begin(&id("r-1"), false).await,
            Begin::Go(None)
        ));
        // Other ids are unaffected.
        assert!(matches!(
            recent.begin(&id("r-2"), true).await,
            Begin::Go(Some(_))
        ));
    }

    #[tokio::test]
    async fn a_failed_create_is_forgotten() {
        let recent = RecentCreates::default();
        let Begin::Go(Some(guard)) = recent.begin(&id("r-1"), false).await else {
            panic!("creates");
        };
        drop(guard);
        assert!(matches!(
            recent.begin(&id("r-1"), true).await,
            Begin::Go(Some(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivered_copy_waits_for_the_create_in_flight() {
        let recent = std::sync::Arc::new(RecentCreates::default());
        let Begin::Go(Some(mut guard)) = recent.begin(&id("r-1"), false).await else {
            panic!("creates");
        };
        let waiter = {
            let recent = recent.clone();
            tokio::spawn(
                async move { matches!(recent.begin(&id("r-1"), true).await, Begin::Recorded) },
            )
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "waits while the create runs");
        guard.recorded();
        drop(guard);
        assert!(waiter.await.expect("join"), "then sees it recorded");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire() {
        let recent = RecentCreates::default();
        let Begin::Go(Some(mut guard)) = recent.begin(&id("r-1"), false).await else {
            panic!("creates");
        };
        guard.recorded();
        drop(guard);
        tokio::time::sleep(RECENT_TTL + Duration::from_secs(1)).await;
        assert!(matches!(
            recent.begin(&id("r-1"), true).await,
            Begin::Go(Some(_))
        ));
    }

    #[tokio::test]
    async fn at_most_the_capacity_is_remembered_oldest_first() {
        let recent = RecentCreates::default();
        for i in 0..RECENT_CAPACITY {
            let Begin::Go(Some(mut guard)) = recent.begin(&id(&format!("r-{i}")), false).await
            else {
                panic!("creates");
            };
            guard.recorded();
        }
        // Exactly the capacity: all remembered.
        assert!(matches!(
            recent.begin(&id("r-0"), true).await,
            Begin::Recorded
        ));
        let Begin::Go(Some(mut guard)) = recent.begin(&id("r-new"), false).await else {
            panic!("creates");
        };
        guard.recorded();
        drop(guard);
        // One more: the oldest is forgotten, the rest stay.
        assert!(matches!(
            recent.begin(&id("r-0"), true).await,
            Begin::Go(Some(_))
        ));
        assert!(matches!(
            recent.begin(&id("r-1"), true).await,
            Begin::Recorded
        ));
        assert!(matches!(
            recent.begin(&id("r-new"), true).await,
            Begin::Recorded
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_message_that_is_not_a_redelivery_does_not_wait() {
        let recent = RecentCreates::default();
        let Begin::Go(Some(_guard)) = recent.begin(&id("r-1"), false).await else {
            panic!("creates");
        };
        let started = Instant::now();
        assert!(matches!(
            recent.begin(&id("r-1"), false).await,
            Begin::Go(None)
        ));
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait for the create in flight"
        );
    }
}
