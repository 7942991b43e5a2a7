//! Create slots taken before a request is, and given to the next request
//! when the one they were taken for needs no create after all.
//!
//! A request is taken from the queue only once its create can follow (see
//! [`super::Budget::take`]), so a slot, the pause passed and the claim in
//! the deployment's window made, comes first. A request that turns out to
//! need no create (invalid, poison, already created) or a queue found
//! empty would waste it; the [`SlotBank`] keeps it for the next request
//! instead, as long as it is young enough to stay inside the window its
//! claim opened. [`Prepaid`] carries a slot with its request and gives it
//! back on every path that does not send the create.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::{config::CreateQuota, metrics::Metrics};

/// A create slot, taken before a request is: the pause passed and, with a
/// quota, a claim in the deployment's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// When it was taken.
    pub taken_at: Instant,
}

impl Slot {
    /// A slot taken now.
    pub fn now() -> Self {
        Self {
            taken_at: Instant::now(),
        }
    }
}

/// The longest an unused slot is kept for the next request.
pub const MAX_SPARE_LIFETIME: Duration = Duration::from_secs(5);

/// How long an unused slot may serve another request: a quarter of the
/// quota's window (the ledger keeps counting the claim for the whole
/// window, so the create it serves stays inside the window the claim
/// opened), at most [`MAX_SPARE_LIFETIME`].
pub fn spare_lifetime(quota: Option<CreateQuota>) -> Duration {
    quota.map_or(MAX_SPARE_LIFETIME, |q| {
        (q.window / 4).min(MAX_SPARE_LIFETIME)
    })
}

/// Whether a spare slot taken at `taken_at` may still serve a request at
/// `now`.
pub fn spare_usable(taken_at: Instant, now: Instant, lifetime: Duration) -> bool {
    now.saturating_duration_since(taken_at) < lifetime
}

/// Slots taken for requests that needed no create, or for a queue found
/// empty, kept for the next request.
pub struct SlotBank {
    spare: Mutex<VecDeque<Slot>>,
    lifetime: Duration,
    metrics: Metrics,
}

impl SlotBank {
    /// An empty bank for a deployment with `quota` (none: learned).
    pub fn new(quota: Option<CreateQuota>, metrics: Metrics) -> Self {
        Self {
            spare: Mutex::new(VecDeque::new()),
            lifetime: spare_lifetime(quota),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Slot>> {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps an unused slot for the next request.
    pub fn deposit(&self, slot: Slot) {
        let mut spare = self.lock();
        spare.push_back(slot);
        // More spares than a window's worth are never needed at once.
        while spare.len() > 1024 {
            spare.pop_front();
            self.metrics.quota_slot_unused();
        }
    }

    /// The oldest spare slot still usable, if any (expired ones are
    /// dropped and counted).
    pub fn withdraw(&self) -> Option<Slot> {
        let now = Instant::now();
        let mut spare = self.lock();
        while let Some(slot) = spare.pop_front() {
            if spare_usable(slot.taken_at, now, self.lifetime) {
                return Some(slot);
            }
            self.metrics.quota_slot_unused();
        }
        None
    }
}

/// The slot a request was taken with, until its create is sent
/// ([`Prepaid::spend`]). Dropped unspent, on whatever path, it goes back
/// to the bank for the next request.
pub struct Prepaid {
    bank: Arc<SlotBank>,
    slot: Option<Slot>,
}

impl Prepaid {
    /// `slot`, owed back to `bank` unless spent.
    pub fn new(bank: Arc<SlotBank>, slot: Slot) -> Self {
        Self {
            bank,
            slot: Some(slot),
        }
    }

    /// The create is going out with this slot.
    pub fn spend(mut self) {
        self.slot = None;
    }
}

impl Drop for Prepaid {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.bank.deposit(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_spare_slot_serves_another_request_only_early_in_its_window() {
        let q = |t: &str| Some(CreateQuota::parse(t).expect("quota"));
        // Table: quota, how long ago the slot was taken, usable.
        let cases: &[(Option<CreateQuota>, f64, bool)] = &[
            (q("5/10s"), 0.0, true),
            (q("5/10s"), 2.4, true),
            (q("5/10s"), 2.5, false),
            (q("20/min"), 4.9, true),
            (q("20/min"), 5.0, false),
            (q("2/s"), 0.2, true),
            (q("2/s"), 0.3, false),
            (None, 4.9, true),
            (None, 5.0, false),
        ];
        for &(quota, ago, usable) in cases {
            let now = Instant::now() + secs(100.0);
            assert_eq!(
                spare_usable(now - secs(ago), now, spare_lifetime(quota)),
                usable,
                "{quota:?} taken {ago} s ago"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unspent_slot_goes_back_to_the_bank_and_expires_there() {
        let bank = Arc::new(SlotBank::new(
            Some(CreateQuota::parse("5/10s").expect("quota")),
            Metrics::new(),
        ));
        let slot = Slot::now();
        Prepaid::new(bank.clone(), slot).spend();
        assert_eq!(bank.withdraw(), None, "a spent slot is gone");
        drop(Prepaid::new(bank.clone(), slot));
        assert_eq!(bank.withdraw(), Some(slot), "an unspent one comes back");
        assert_eq!(bank.withdraw(), None);
        drop(Prepaid::new(bank.clone(), slot));
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(bank.withdraw(), None, "too late in its window");
    }
}
