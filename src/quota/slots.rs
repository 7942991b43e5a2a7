//! Create slots taken before a request is, and given to the next request
//! when the one they were taken for needs no create after all.
//!
//! A request is taken from the queue only once its create can follow (see
//! [`super::Budget::take`]), so a slot, the pause passed and the claim in
//! the deployment's window made, comes first. A request that turns out to
//! need no create (invalid, poison, already created) or a queue found
//! empty would waste it; the [`SlotBank`] keeps it for the next request
//! instead, as long as it is young enough that its create still arrives
//! while the ledger counts its claim. [`Prepaid`] carries a slot with its request and gives it
//! back on every path that does not send the create.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::ledger::{claim_margin, slot_lifetime};
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

/// How long an unused slot may serve another request: half of how much
/// longer than the window the ledger keeps its claim (a configured quota's
/// [`claim_margin`], a learned one's [`slot_lifetime`] past its window).
/// The upstream counts the create the slot serves from when that create
/// arrives, so it must arrive while the claim still counts, with room for
/// its way there.
pub fn spare_lifetime(configured: Option<CreateQuota>, learned_window: Duration) -> Duration {
    match configured {
        Some(q) => claim_margin(q.window) / 2,
        None => slot_lifetime(learned_window).saturating_sub(learned_window) / 2,
    }
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
    /// An empty bank whose slots serve another request for `lifetime`
    /// ([`spare_lifetime`]).
    pub fn new(lifetime: Duration, metrics: Metrics) -> Self {
        Self {
            spare: Mutex::new(VecDeque::new()),
            lifetime,
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
    fn a_spare_slot_serves_another_request_only_while_its_claim_counts() {
        let q = |t: &str| Some(CreateQuota::parse(t).expect("quota"));
        let minute = Duration::from_secs(60);
        // Table: configured quota, learned window, how long ago the slot
        // was taken, usable.
        let cases: &[(Option<CreateQuota>, Duration, f64, bool)] = &[
            (q("5/10s"), minute, 0.0, true),
            (q("5/10s"), minute, 0.49, true),
            (q("5/10s"), minute, 0.5, false),
            (q("20/min"), minute, 0.49, true),
            (q("20/min"), minute, 0.5, false),
            (q("2/s"), minute, 0.12, true),
            (q("2/s"), minute, 0.125, false),
            (None, minute, 0.29, true),
            (None, minute, 0.3, false),
            (None, Duration::from_secs(10), 0.049, true),
            (None, Duration::from_secs(10), 0.05, false),
        ];
        for &(quota, window, ago, usable) in cases {
            let now = Instant::now() + secs(100.0);
            assert_eq!(
                spare_usable(now - secs(ago), now, spare_lifetime(quota, window)),
                usable,
                "{quota:?} ({window:?}) taken {ago} s ago"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unspent_slot_goes_back_to_the_bank_and_expires_there() {
        let bank = Arc::new(SlotBank::new(
            spare_lifetime(
                Some(CreateQuota::parse("5/10s").expect("quota")),
                Duration::from_secs(60),
            ),
            Metrics::new(),
        ));
        let slot = Slot::now();
        Prepaid::new(bank.clone(), slot).spend();
        assert_eq!(bank.withdraw(), None, "a spent slot is gone");
        drop(Prepaid::new(bank.clone(), slot));
        assert_eq!(bank.withdraw(), Some(slot), "an unspent one comes back");
        assert_eq!(bank.withdraw(), None);
        drop(Prepaid::new(bank.clone(), slot));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(bank.withdraw(), None, "too late in its window");
    }
}
