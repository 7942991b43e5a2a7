//! Create pacing: when this worker may make its next paid create.
//!
//! Creates cost money and Novita limits them per account and per minute, so
//! they have a budget of their own, separate from polls. With
//! `upstream.create_quota` set, the budget is the deployment's: every create
//! first claims a slot in the quota ledger, a queue on the broker that holds
//! at most `creates` messages, each expiring after `window` (see
//! [`crate::broker::Topology::quota_ledger`]); the broker refuses a slot when
//! the window is full, so all workers together stay within the quota with no
//! other coordination. Without a quota this worker learns one ([`Learner`]):
//! a 429 halves its create rate, calm time adds to it again. Either way a
//! 429's `Retry-After` pauses all of this worker's creates, not just the one
//! call. Everything here is waited for *before* a request is taken from the
//! broker, so a request that is only waiting waits in the queue. This
//! module never calls the upstream and never holds a delivery.

use std::{
    collections::VecDeque,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{PublishError, Publisher},
    config::CreateQuota,
    metrics::Metrics,
    retry::MAX_RETRY_AFTER,
};

/// How far back the learner counts accepted creates.
pub const LEARN_WINDOW: Duration = Duration::from_secs(60);
/// The shortest span the accepted creates are spread over when the rate is
/// estimated (a worker that has run for less than the window has only seen
/// that long).
pub const MIN_SPAN: Duration = Duration::from_secs(1);
/// Factor applied to the create rate at a 429.
pub const DECREASE: f64 = 0.5;
/// Creates per second added to the learned rate per second of calm: one
/// create per minute more every 30 seconds.
pub const INCREASE_PER_SECOND: f64 = 1.0 / 60.0 / 30.0;
/// The learned rate never drops below one create per minute.
pub const MIN_RATE: f64 = 1.0 / 60.0;
/// Above this learned rate (creates per second) the worker stops pacing:
/// the account's limit is evidently not near.
pub const UNLIMITED_ABOVE: f64 = 20.0;
/// How long a first 429 without `Retry-After` pauses creates.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(2);
/// The longest pause after 429s without `Retry-After`.
pub const MAX_DEFAULT_PAUSE: Duration = Duration::from_secs(60);

/// The pause after the `refusals`-th 429 in a row without `Retry-After`.
pub fn default_pause(refusals: u32) -> Duration {
    let doublings = refusals.saturating_sub(1).min(16);
    (DEFAULT_PAUSE * 2u32.pow(doublings)).min(MAX_DEFAULT_PAUSE)
}

/// An estimate of the account's create rate learned from 429s: additive
/// increase, multiplicative decrease, on the rate of creates (not on a
/// window of calls in flight). Plain data: every method takes the time.
#[derive(Debug, Clone)]
pub struct Learner {
    /// When learning started (the worker's start).
    started: Instant,
    /// Creates per second when `since`; `None`: no limit known.
    rate: Option<f64>,
    since: Instant,
    /// Accepted creates in the last [`LEARN_WINDOW`].
    accepted: VecDeque<Instant>,
    /// When the rate was last decreased.
    decreased_at: Option<Instant>,
}

impl Learner {
    /// No limit known yet.
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            rate: None,
            since: now,
            accepted: VecDeque::new(),
            decreased_at: None,
        }
    }

    /// The permitted rate at `now`, in creates per second; `None` when no
    /// limit is known (or the learned one has grown past
    /// [`UNLIMITED_ABOVE`]).
    pub fn rate(&self, now: Instant) -> Option<f64> {
        let r = self.rate?;
        let grown =
            r + INCREASE_PER_SECOND * now.saturating_duration_since(self.since).as_secs_f64();
        (grown <= UNLIMITED_ABOVE).then_some(grown)
    }

    /// The upstream accepted a create.
    pub fn on_accepted(&mut self, now: Instant) {
        self.trim(now);
        self.accepted.push_back(now);
    }

    /// The upstream answered 429 to a create sent at `sent_at`. The rate is
    /// decreased at most once per [`LEARN_WINDOW`]: 429s soon after a
    /// decrease mean the window the upstream counts is still full of the
    /// creates made before it, not that the new rate is too high (the
    /// pause deals with them).
    pub fn on_rate_limited(&mut self, sent_at: Instant, now: Instant) {
        if self
            .decreased_at
            .is_some_and(|at| sent_at <= at || now.saturating_duration_since(at) < LEARN_WINDOW)
        {
            return;
        }
        self.trim(now);
        let span = now
            .saturating_duration_since(self.started)
            .clamp(MIN_SPAN, LEARN_WINDOW);
        let observed = self.accepted.len().max(1) as f64 / span.as_secs_f64();
        let current = self.rate(now).unwrap_or(f64::INFINITY);
        let next = (current.min(observed) * DECREASE).max(MIN_RATE);
        self.rate = Some(next);
        self.since = now;
        self.decreased_at = Some(now);
    }

    fn trim(&mut self, now: Instant) {
        while let Some(&front) = self.accepted.front() {
            if now.saturating_duration_since(front) >= LEARN_WINDOW {
                self.accepted.pop_front();
            } else {
                break;
            }
        }
    }
}

/// One create's place in the learned pacing, returned by [`Pacer::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    prev: Instant,
    end: Instant,
}

/// What a create has to wait for before it may be sent.
#[derive(Debug)]
struct PacerState {
    /// `None` with a configured quota (the ledger paces).
    learner: Option<Learner>,
    /// Until when every create waits (a 429's `Retry-After`).
    paused_until: Option<Instant>,
    /// The earliest moment of the next create under the learned rate.
    next_slot: Instant,
    /// 429s since the last accepted create (a burst counts once).
    refusals: u32,
    /// When the last counted 429 arrived.
    refused_at: Option<Instant>,
}

/// The waits of this worker's creates: the pause after a 429 and the
/// learned rate. Shared by the intake loop and the request handlers.
pub struct Pacer {
    state: Mutex<PacerState>,
    /// Wakes waiters when a reservation is given back.
    released: tokio::sync::Notify,
    quota: Option<CreateQuota>,
    metrics: Metrics,
}

impl Pacer {
    /// A pacer that learns the rate (no quota), or only pauses (the quota
    /// ledger paces).
    pub fn new(quota: Option<CreateQuota>, metrics: Metrics) -> Self {
        let now = Instant::now();
        let pacer = Self {
            released: tokio::sync::Notify::new(),
            state: Mutex::new(PacerState {
                learner: quota.is_none().then(|| Learner::new(now)),
                paused_until: None,
                next_slot: now,
                refusals: 0,
                refused_at: None,
            }),
            quota,
            metrics,
        };
        pacer.publish_rate(now);
        pacer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PacerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates per second this worker may make now: the configured quota
    /// (the whole deployment's), the learned rate, or infinity.
    pub fn permitted_rate(&self) -> f64 {
        let now = Instant::now();
        let state = self.lock();
        self.rate_locked(&state, now)
    }

    fn rate_locked(&self, state: &PacerState, now: Instant) -> f64 {
        match (&self.quota, &state.learner) {
            (Some(q), _) => q.per_second(),
            (None, Some(l)) => l.rate(now).unwrap_or(f64::INFINITY),
            (None, None) => f64::INFINITY,
        }
    }

    fn publish_rate(&self, now: Instant) {
        let rate = {
            let state = self.lock();
            self.rate_locked(&state, now)
        };
        self.metrics.set_create_rate_permitted(rate);
    }

    /// Waits until this worker may make one more create, and reserves it.
    /// Returns `false` when `cancel` fired first.
    pub async fn ready(&self, cancel: &CancellationToken) -> bool {
        self.reserve(cancel).await.is_some()
    }

    /// Like [`Pacer::ready`], returning the reservation so that it can be
    /// given back ([`Pacer::release`]) when no create follows (the queue
    /// was empty after all).
    pub async fn reserve(&self, cancel: &CancellationToken) -> Option<Reservation> {
        loop {
            let released = self.released.notified();
            let now = Instant::now();
            let wait = {
                let mut state = self.lock();
                let paused = state.paused_until.filter(|until| *until > now);
                let rate = state.learner.as_ref().and_then(|l| l.rate(now));
                let at = match (paused, rate) {
                    (Some(until), _) => Some(until.max(state.next_slot)),
                    (None, Some(_)) if state.next_slot > now => Some(state.next_slot),
                    _ => None,
                };
                match at {
                    Some(at) => at,
                    None => {
                        let prev = state.next_slot;
                        if let Some(rate) = rate {
                            state.next_slot =
                                now.max(state.next_slot) + Duration::from_secs_f64(1.0 / rate);
                        }
                        return Some(Reservation {
                            prev,
                            end: state.next_slot,
                        });
                    }
                }
            };
            let reason = if self.lock().paused_until.is_some_and(|u| u > now) {
                "pause"
            } else {
                "pace"
            };
            self.metrics.create_wait(reason);
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep_until(wait) => {}
                () = released => {}
            }
        }
    }

    /// Gives a reservation back, if no later one was made since.
    pub fn release(&self, reservation: Reservation) {
        let mut state = self.lock();
        if state.next_slot == reservation.end {
            state.next_slot = reservation.prev;
            drop(state);
            self.released.notify_waiters();
        }
    }

    /// The upstream accepted a create.
    pub fn on_accepted(&self) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            state.refusals = 0;
            state.refused_at = None;
            if let Some(l) = state.learner.as_mut() {
                l.on_accepted(now);
            }
        }
        self.publish_rate(now);
    }

    /// The upstream answered 429 to a create sent at `sent_at`: pause every
    /// create for `retry_after` (without one: [`DEFAULT_PAUSE`], doubling
    /// with each 429 in a row up to [`MAX_DEFAULT_PAUSE`]), and lower the
    /// learned rate.
    pub fn on_rate_limited(&self, sent_at: Instant, retry_after: Option<Duration>) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            // Calls sent before the last 429 arrived were one burst: they
            // count as one refusal.
            if state.refused_at.is_none_or(|at| sent_at > at) {
                state.refusals = state.refusals.saturating_add(1);
                state.refused_at = Some(now);
            }
            let pause = retry_after
                .unwrap_or_else(|| default_pause(state.refusals))
                .min(MAX_RETRY_AFTER);
            let until = now + pause;
            state.paused_until = Some(state.paused_until.map_or(until, |u| u.max(until)));
            if let Some(l) = state.learner.as_mut() {
                l.on_rate_limited(sent_at, now);
            }
        }
        self.publish_rate(now);
    }

    /// Until when creates are paused, if they are.
    pub fn paused_until(&self) -> Option<Instant> {
        let now = Instant::now();
        self.lock().paused_until.filter(|u| *u > now)
    }
}

/// A create slot, taken before a request is: the pacer's place and, with a
/// quota, a claim in the deployment's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// When it was taken.
    pub taken_at: Instant,
}

/// How long an unused slot may serve another request: a quarter of the
/// quota's window (the ledger keeps counting the claim for the whole
/// window, so the create it serves stays inside the window the claim
/// opened), at most [`MAX_SPARE_LIFETIME`].
pub fn spare_lifetime(quota: Option<CreateQuota>) -> Duration {
    quota.map_or(MAX_SPARE_LIFETIME, |q| {
        (q.window / 4).min(MAX_SPARE_LIFETIME)
    })
}

/// The longest an unused slot is kept for the next request.
pub const MAX_SPARE_LIFETIME: Duration = Duration::from_secs(5);

/// Whether a spare slot taken at `taken_at` may still serve a request at
/// `now`.
pub fn spare_usable(taken_at: Instant, now: Instant, lifetime: Duration) -> bool {
    now.saturating_duration_since(taken_at) < lifetime
}

/// Slots taken for requests that turned out to need no create (invalid,
/// poison, already created) or for a queue found empty: the next request
/// uses them instead of claiming new ones, so that invalid requests do not
/// spend the quota.
pub struct SlotBank {
    spare: Mutex<VecDeque<Slot>>,
    lifetime: Duration,
    metrics: Metrics,
}

impl SlotBank {
    /// An empty bank for a deployment with `quota` (none: the learned pace).
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
    /// dropped).
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
    bank: std::sync::Arc<SlotBank>,
    slot: Option<Slot>,
}

impl Prepaid {
    /// `slot`, owed back to `bank` unless spent.
    pub fn new(bank: std::sync::Arc<SlotBank>, slot: Slot) -> Self {
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

/// Why a slot could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// `cancel` fired while waiting for a free slot.
    #[error("cancelled while waiting for a quota slot")]
    Cancelled,
    /// The broker could not be asked.
    #[error("cannot claim a quota slot: {0}")]
    Broker(#[from] PublishError),
}

/// The deployment's create quota, kept by the broker: a slot is a message
/// in the ledger queue, which holds at most `creates` of them and drops each
/// after `window`. A slot is claimed by publishing one; the broker confirms
/// it (a slot was free) or refuses it (`reject-publish`: the window is
/// full). The ledger holds no data worth keeping: losing it (a broker
/// restart) only forgets the current window. Its name carries a tag derived
/// from the deployment's secret, known once the session has read the
/// journal ([`QuotaLedger::name_with`]), so that producers cannot find it.
pub struct QuotaLedger {
    request_queue: String,
    quota: CreateQuota,
    queue: std::sync::OnceLock<String>,
}

/// Longest wait between two claims while the window is full.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(2);
/// First wait after a refused claim.
const MIN_CLAIM_BACKOFF: Duration = Duration::from_millis(100);

impl QuotaLedger {
    /// The ledger of `quota` for the deployment of `request_queue`.
    pub fn new(request_queue: &str, quota: CreateQuota) -> Self {
        Self {
            request_queue: request_queue.to_owned(),
            quota,
            queue: std::sync::OnceLock::new(),
        }
    }

    /// Names the ledger with the deployment's `tag` (the first call wins).
    pub fn name_with(&self, tag: &str) -> &str {
        self.queue
            .get_or_init(|| crate::broker::ledger_name(&self.request_queue, tag, self.quota))
    }

    /// The ledger queue's name, once known.
    pub fn queue(&self) -> Option<&str> {
        self.queue.get().map(String::as_str)
    }

    /// The quota it keeps.
    pub fn quota(&self) -> CreateQuota {
        self.quota
    }

    /// Claims one slot, waiting while the window is full (retrying with a
    /// growing, jittered delay up to two seconds, never longer than the
    /// average spacing of the quota). Broker failures are returned: the
    /// caller decides whether to try again on the next session.
    pub async fn claim(
        &self,
        publisher: &Publisher,
        metrics: &Metrics,
        cancel: &CancellationToken,
    ) -> Result<(), SlotError> {
        let spacing = Duration::from_secs_f64(1.0 / self.quota.per_second());
        let ceiling = MAX_CLAIM_BACKOFF.min(spacing).max(MIN_CLAIM_BACKOFF);
        let mut delay = MIN_CLAIM_BACKOFF;
        let Some(queue) = self.queue() else {
            return Err(SlotError::Broker(PublishError::NotConnected));
        };
        loop {
            match publisher.claim_slot(queue).await {
                Ok(()) => return Ok(()),
                Err(PublishError::Nacked) => {
                    metrics.create_wait("quota");
                }
                Err(e) => return Err(SlotError::Broker(e)),
            }
            let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            tokio::select! {
                () = cancel.cancelled() => return Err(SlotError::Cancelled),
                () = tokio::time::sleep(jittered) => {}
            }
            delay = (delay * 2).min(ceiling);
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
    fn no_limit_is_known_until_the_first_429() {
        let t0 = Instant::now();
        let mut l = Learner::new(t0);
        for i in 0..100 {
            l.on_accepted(t0 + secs(f64::from(i) * 0.01));
        }
        assert_eq!(l.rate(t0 + secs(1.0)), None);
    }

    #[test]
    fn a_429_halves_the_rate_the_upstream_accepted() {
        // Table: accepted creates, how long the worker has been learning when
        // the 429 comes, and the rate after it (creates per minute).
        let cases: &[(u32, f64, f64)] = &[
            // A full minute of history: the accepted count is the rate.
            (40, 90.0, 20.0),
            (13, 90.0, 6.5),
            (1, 90.0, 1.0),
            (0, 90.0, 1.0),
            // A young worker spreads what it saw over its age, at least 1 s.
            (13, 5.0, 78.0),
            (13, 0.5, 390.0),
            (2, 30.0, 2.0),
        ];
        for &(accepted, age, want) in cases {
            let t0 = Instant::now();
            let mut l = Learner::new(t0);
            let at = t0 + secs(age);
            for i in 0..accepted {
                l.on_accepted(at - secs(f64::from(i) * 0.01));
            }
            l.on_rate_limited(at, at);
            let got = l.rate(at).expect("a limit is known") * 60.0;
            assert!(
                (got - want).abs() < 1e-6,
                "{accepted} in {age} s: {got} != {want}"
            );
        }
    }

    #[test]
    fn one_burst_of_429s_decreases_once() {
        let t0 = Instant::now();
        let mut l = Learner::new(t0);
        for i in 0..20 {
            l.on_accepted(t0 + secs(f64::from(i) * 0.1));
        }
        let first = t0 + secs(3.0);
        l.on_rate_limited(first - secs(0.5), first);
        let after_one = l.rate(first).expect("rate");
        // Calls sent before the decrease answer 429 a little later.
        for k in 1..10 {
            l.on_rate_limited(first - secs(0.1), first + secs(f64::from(k) * 0.01));
        }
        assert_eq!(l.rate(first), Some(after_one));
        // Within the window after a decrease, later calls that still meet
        // the limit meet the creates made before it: no second decrease.
        let soon = first + secs(10.0);
        l.on_rate_limited(soon, soon);
        assert!(l.rate(soon).expect("rate") >= after_one);
        // A window later, a 429 is news: the rate goes down again.
        let later = first + LEARN_WINDOW + secs(1.0);
        l.on_rate_limited(later, later);
        assert!(l.rate(later).expect("rate") < after_one);
    }

    #[test]
    fn calm_time_adds_one_create_per_minute_every_thirty_seconds() {
        let t0 = Instant::now();
        let mut l = Learner::new(t0);
        for i in 0..20 {
            l.on_accepted(t0 + secs(60.0 + f64::from(i)));
        }
        let at = t0 + secs(80.0);
        l.on_rate_limited(at, at);
        let base = l.rate(at).expect("rate") * 60.0;
        assert!((base - 10.0).abs() < 1e-9, "{base}");
        let per_min = |after: f64| l.rate(at + secs(after)).expect("rate") * 60.0;
        assert!((per_min(30.0) - 11.0).abs() < 1e-6);
        assert!((per_min(300.0) - 20.0).abs() < 1e-6);
        // Long calm: the learned limit is forgotten.
        assert_eq!(l.rate(at + secs(40_000.0)), None);
    }

    #[test]
    fn decreases_never_go_below_the_floor() {
        let t0 = Instant::now();
        let mut l = Learner::new(t0);
        for k in 0..50 {
            let at = t0 + secs(f64::from(k) * 61.0);
            l.on_rate_limited(at, at);
            assert!(l.rate(at).expect("rate") >= MIN_RATE);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_creates_at_the_learned_rate_and_pauses_on_429() {
        let pacer = Pacer::new(None, Metrics::new());
        let cancel = CancellationToken::new();
        tokio::time::sleep(LEARN_WINDOW).await;
        // Unlimited: no waiting.
        let t0 = Instant::now();
        for _ in 0..50 {
            assert!(pacer.ready(&cancel).await);
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        for _ in 0..30 {
            pacer.on_accepted();
        }
        pacer.on_rate_limited(Instant::now(), Some(Duration::from_secs(5)));
        // 30 accepted in the last minute: 15 per minute, one every 4 s (a
        // little less, as calm time adds to the rate), after the 5 s pause.
        let rate = pacer.permitted_rate();
        assert!((rate * 60.0 - 15.0).abs() < 0.01, "{rate}");
        let t1 = Instant::now();
        assert!(pacer.ready(&cancel).await);
        assert_eq!(t1.elapsed(), Duration::from_secs(5));
        assert!(pacer.ready(&cancel).await);
        let second = t1.elapsed();
        assert!(
            second >= Duration::from_millis(8_900) && second <= Duration::from_millis(9_000),
            "{second:?}"
        );
        // A reservation given back frees its place.
        let third = pacer.reserve(&cancel).await.expect("reserved");
        let at = Instant::now();
        pacer.release(third);
        assert!(pacer.ready(&cancel).await);
        assert_eq!(Instant::now(), at, "the freed place is taken at once");
        cancel.cancel();
        assert!(!pacer.ready(&cancel).await);
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
        let bank = std::sync::Arc::new(SlotBank::new(
            Some(CreateQuota::parse("5/10s").expect("quota")),
            Metrics::new(),
        ));
        let slot = Slot {
            taken_at: Instant::now(),
        };
        Prepaid::new(bank.clone(), slot).spend();
        assert_eq!(bank.withdraw(), None, "a spent slot is gone");
        drop(Prepaid::new(bank.clone(), slot));
        assert_eq!(bank.withdraw(), Some(slot), "an unspent one comes back");
        assert_eq!(bank.withdraw(), None);
        drop(Prepaid::new(bank.clone(), slot));
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(bank.withdraw(), None, "too late in its window");
    }

    #[test]
    fn pauses_without_retry_after_double_up_to_a_minute() {
        let want = [2, 4, 8, 16, 32, 60, 60];
        for (k, secs) in want.iter().enumerate() {
            let refusals = u32::try_from(k + 1).expect("small");
            assert_eq!(
                default_pause(refusals),
                Duration::from_secs(*secs),
                "{refusals}"
            );
        }
        assert_eq!(default_pause(u32::MAX), MAX_DEFAULT_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_quota_the_pacer_only_pauses() {
        let quota = CreateQuota::parse("2/min").expect("quota");
        let pacer = Pacer::new(Some(quota), Metrics::new());
        let cancel = CancellationToken::new();
        assert!((pacer.permitted_rate() - 2.0 / 60.0).abs() < 1e-9);
        for _ in 0..10 {
            assert!(pacer.ready(&cancel).await);
        }
        let sent = Instant::now();
        pacer.on_rate_limited(sent, None);
        // Calls sent together with the first answer 429 too: one refusal.
        pacer.on_rate_limited(sent, None);
        let t = Instant::now();
        assert!(pacer.ready(&cancel).await);
        assert_eq!(t.elapsed(), DEFAULT_PAUSE);
        // A second 429 in a row pauses twice as long; an accepted create
        // starts again from the first pause.
        pacer.on_rate_limited(Instant::now(), None);
        let t = Instant::now();
        assert!(pacer.ready(&cancel).await);
        assert_eq!(t.elapsed(), DEFAULT_PAUSE * 2);
        pacer.on_accepted();
        pacer.on_rate_limited(Instant::now(), None);
        let t = Instant::now();
        assert!(pacer.ready(&cancel).await);
        assert_eq!(t.elapsed(), DEFAULT_PAUSE);
        assert!((pacer.permitted_rate() - 2.0 / 60.0).abs() < 1e-9);
    }
}
