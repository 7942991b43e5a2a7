//! The upstream gate: stops taking requests while the upstream cannot serve
//! them, and reopens by itself when it can again.
//!
//! A 401/403, a billing refusal, or an upstream that keeps failing after
//! every retry is not the request's fault, so no request may fail because of
//! it, and requests must not cycle through the queue (each redelivery counts
//! towards the poison limit). The gate records the cause (logging it once)
//! and stops creates. For a refused key or an outage the worker stops
//! consuming requests and its prober tests the upstream with a free `GET`;
//! for a refused balance the requests already held wait, and one of them at
//! a time probes with a real create. Probes follow a growing delay; the
//! first success reopens the gate. It never decides anything about a
//! particular request.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, retry::RetryPolicy};

/// Why the gate is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The API key (401/403, missing key): the operator must act.
    Key,
    /// The balance (400 BILLING_BALANCE_NOT_ENOUGH): the operator must act.
    Billing,
    /// Transient errors outlasted the retry budget: the upstream is down.
    Unavailable,
    /// Creates in a row were answered with something that is not a task id
    /// (a changed schema, a mangling proxy): each may be a billed task, so
    /// no more are sent until one is confirmed.
    Unconfirmed,
    /// The video storage refuses the credentials or has no such bucket:
    /// paid videos could not be kept, so no more are paid for until it
    /// accepts again (probed by writing a small object).
    Storage,
}

impl Refusal {
    fn describe(self) -> &'static str {
        match self {
            Self::Key => "the upstream refuses our API key",
            Self::Billing => "the upstream refuses requests for billing (balance)",
            Self::Unavailable => "the upstream keeps failing after every retry",
            Self::Unconfirmed => {
                "unconfirmed creates: the upstream answers creates without a readable task id (each may be a billed task)"
            }
            Self::Storage => "the video storage refuses us",
        }
    }

    /// Whether only a real create can tell that the refusal is over (a
    /// balance, unreadable create answers): then one waiting request at a
    /// time probes with its create; otherwise a free `GET` probes.
    pub fn probed_by_a_create(self) -> bool {
        matches!(self, Self::Billing | Self::Unconfirmed)
    }

    /// Whether an operator must act (key or balance).
    pub fn is_operator_problem(self) -> bool {
        matches!(self, Self::Key | Self::Billing | Self::Storage)
    }
}

/// The gate's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateState {
    /// The upstream accepts our key.
    Open,
    /// The upstream refused; probe again at `retry_at`.
    Closed {
        /// Key or billing.
        refusal: Refusal,
        /// What the upstream said.
        reason: String,
        /// When the next probe may run.
        retry_at: Instant,
    },
}

/// Unconfirmed creates in a row that close the gate.
pub const UNCONFIRMED_LIMIT: u32 = 3;

/// Whether `in_a_row` creates answered without a readable task id close
/// the gate.
pub fn closes_after_unconfirmed(in_a_row: u32) -> bool {
    in_a_row >= UNCONFIRMED_LIMIT
}

/// What a caller waiting at the gate may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// The gate is open: go ahead.
    Go,
    /// The gate is closed but this caller holds the probe: try once and
    /// report with [`Gate::open`] or [`Gate::probe_failed`].
    Probe(ProbeClaim),
    /// The wait reached its deadline.
    TimedOut,
    /// Shutdown.
    Cancelled,
}

/// Held by the one caller allowed to probe; released on drop.
#[derive(Debug)]
pub struct ProbeClaim(Arc<AtomicBool>);

impl PartialEq for ProbeClaim {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for ProbeClaim {}

impl Drop for ProbeClaim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What the intake loop may do about taking the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeTurn {
    /// Take one: the gate is open, or it is closed for the balance, a probe
    /// is due and no request is held to make it (the one taken will).
    Take,
    /// Take none; look again at this moment, or when the gate changes.
    Wait(Option<Instant>),
}

/// Shared gate; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    state: Arc<watch::Sender<GateState>>,
    probing: Arc<AtomicBool>,
    /// Requests waiting in [`Gate::wait_for_turn`].
    waiting: Arc<AtomicU32>,
    strikes: Arc<AtomicU32>,
    /// Creates answered without a readable task id since the last
    /// accepted one.
    unconfirmed: Arc<AtomicU32>,
    policy: RetryPolicy,
    metrics: Metrics,
}

impl Gate {
    /// An open gate whose probe delays follow `policy`.
    pub fn new(policy: RetryPolicy, metrics: Metrics) -> Self {
        Self {
            state: Arc::new(watch::Sender::new(GateState::Open)),
            probing: Arc::new(AtomicBool::new(false)),
            waiting: Arc::new(AtomicU32::new(0)),
            strikes: Arc::new(AtomicU32::new(0)),
            unconfirmed: Arc::new(AtomicU32::new(0)),
            policy,
            metrics,
        }
    }

    /// The current state.
    pub fn state(&self) -> GateState {
        self.state.borrow().clone()
    }

    /// Whether the worker should consume requests: while open, and while
    /// closed for the balance, when the requests it holds wait at the gate
    /// and one of them probes with a real create (nothing else can tell that
    /// the balance is back). A refused key or an outage is probed without a
    /// request, so then nothing is consumed: a request taken and handed back
    /// would count one more delivery towards `amqp.max_deliveries` for every
    /// probe.
    pub fn accepting(&self) -> bool {
        match &*self.state.borrow() {
            GateState::Open => true,
            GateState::Closed { refusal, .. } => refusal.probed_by_a_create(),
        }
    }

    /// Whether the intake loop may take a request now. While the gate is
    /// closed nothing is taken (requests wait in the queue), except, for a
    /// refused balance, the one request that probes with a real create
    /// when no held request is waiting to do it.
    pub fn intake_turn(&self) -> IntakeTurn {
        match &*self.state.borrow() {
            GateState::Open => IntakeTurn::Take,
            GateState::Closed {
                refusal, retry_at, ..
            } if refusal.probed_by_a_create()
                && self.waiting.load(Ordering::Acquire) == 0
                && !self.probing.load(Ordering::Acquire) =>
            {
                if Instant::now() >= *retry_at {
                    IntakeTurn::Take
                } else {
                    IntakeTurn::Wait(Some(*retry_at))
                }
            }
            GateState::Closed { .. } => {
                IntakeTurn::Wait(Some(Instant::now() + Duration::from_millis(500)))
            }
        }
    }

    /// Watches state changes.
    pub fn subscribe(&self) -> watch::Receiver<GateState> {
        self.state.subscribe()
    }

    /// Why the gate is closed, for `/readyz`.
    pub fn refusal(&self) -> Option<String> {
        match &*self.state.borrow() {
            GateState::Open => None,
            GateState::Closed {
                refusal, reason, ..
            } => Some(format!("{}: {reason}", refusal.describe())),
        }
    }

    /// Records a failure seen by a regular call. Closes an open gate (and
    /// logs it, once); on a closed gate it only refreshes the reason, so many
    /// calls failing together do not stretch the probe delay.
    pub fn close(&self, refusal: Refusal, reason: &str) {
        let mut opened_now = false;
        self.state.send_modify(|state| match state {
            GateState::Open => {
                self.strikes.store(0, Ordering::Release);
                *state = GateState::Closed {
                    refusal,
                    reason: reason.to_owned(),
                    retry_at: Instant::now() + self.policy.delay_for_attempt(0),
                };
                opened_now = true;
            }
            GateState::Closed {
                refusal: r,
                reason: why,
                ..
            } => {
                *r = refusal;
                reason.clone_into(why);
            }
        });
        self.report(refusal);
        if opened_now {
            tracing::error!(
                refusal = ?refusal,
                reason,
                "{}; pausing intake until it answers again (requests stay queued)",
                refusal.describe()
            );
        }
    }

    /// Records a failed probe: the gate stays closed and the next probe
    /// waits longer.
    pub fn probe_failed(&self, claim: ProbeClaim, refusal: Refusal, reason: &str) {
        let strikes = self.strikes.fetch_add(1, Ordering::AcqRel) + 1;
        let delay = self.policy.delay_for_attempt(strikes);
        self.state.send_replace(GateState::Closed {
            refusal,
            reason: reason.to_owned(),
            retry_at: Instant::now() + delay,
        });
        self.report(refusal);
        tracing::debug!(reason, next_probe_in = ?delay, "still refused");
        drop(claim);
    }

    /// Records a create answered without a readable task id. The request
    /// fails (it may have been created), and after [`UNCONFIRMED_LIMIT`] in
    /// a row the gate closes: the next creates could be billed tasks too,
    /// so until one is confirmed only one waiting request at a time probes
    /// with its create. A failed probe keeps it closed, longer.
    pub fn create_unconfirmed(&self, claim: Option<ProbeClaim>, reason: &str) {
        let in_a_row = self.unconfirmed.fetch_add(1, Ordering::AcqRel) + 1;
        match claim {
            Some(claim) => self.probe_failed(claim, Refusal::Unconfirmed, reason),
            None if closes_after_unconfirmed(in_a_row) => {
                self.close(Refusal::Unconfirmed, reason);
            }
            None => {}
        }
    }

    fn report(&self, refusal: Refusal) {
        let storage = refusal == Refusal::Storage;
        self.metrics
            .set_upstream_refusing_key(refusal.is_operator_problem() && !storage);
        self.metrics.set_storage_refused(storage);
        self.metrics.set_upstream_paused(true);
    }

    /// Records an accepted upstream call. Logs only when the gate was
    /// closed. A gate closed for the storage stays closed: only the
    /// storage reopens it ([`Gate::storage_accepts`]).
    pub fn open(&self) {
        self.unconfirmed.store(0, Ordering::Release);
        self.reopen(
            |refusal| refusal != Refusal::Storage,
            "the upstream accepts requests again; resuming intake",
        );
    }

    /// Records that the storage accepted a write: reopens a gate closed
    /// for the storage.
    pub fn storage_accepts(&self) {
        self.reopen(
            |refusal| refusal == Refusal::Storage,
            "the storage accepts writes again; resuming intake",
        );
    }

    fn reopen(&self, this_side: impl Fn(Refusal) -> bool, message: &str) {
        let was = match &*self.state.borrow() {
            GateState::Open => return,
            GateState::Closed { refusal, .. } => *refusal,
        };
        if !this_side(was) {
            return;
        }
        self.strikes.store(0, Ordering::Release);
        self.state.send_replace(GateState::Open);
        self.metrics.set_upstream_refusing_key(false);
        self.metrics.set_storage_refused(false);
        self.metrics.set_upstream_paused(false);
        tracing::info!(was = was.describe(), "{message}");
    }

    /// Claims the probe if the gate is closed and a probe is due.
    pub fn try_claim_probe(&self) -> Option<ProbeClaim> {
        let due = match &*self.state.borrow() {
            GateState::Open => false,
            GateState::Closed { retry_at, .. } => Instant::now() >= *retry_at,
        };
        if due
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            Some(ProbeClaim(self.probing.clone()))
        } else {
            None
        }
    }

    /// Waits until the caller may call the upstream (or, for a billing
    /// refusal, holds the probe), or until `deadline` or `cancel`.
    pub async fn wait_for_turn(&self, deadline: Instant, cancel: &CancellationToken) -> Turn {
        // Counted while waiting, also when the caller drops this future.
        struct Waiting<'a>(&'a AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        self.wait_for_turn_inner(deadline, cancel).await
    }

    async fn wait_for_turn_inner(&self, deadline: Instant, cancel: &CancellationToken) -> Turn {
        let mut rx = self.state.subscribe();
        loop {
            let (refusal, retry_at) = match &*rx.borrow_and_update() {
                GateState::Open => return Turn::Go,
                GateState::Closed {
                    refusal, retry_at, ..
                } => (*refusal, *retry_at),
            };
            // A refused key or an outage is probed with a free GET by the
            // worker's prober; only a billing refusal needs a real create to
            // find out, so only then does a waiting request probe.
            if refusal.probed_by_a_create() {
                if let Some(claim) = self.try_claim_probe() {
                    return Turn::Probe(claim);
                }
            }
            if Instant::now() >= deadline {
                return Turn::TimedOut;
            }
            // Someone else may hold the probe: look again shortly after it is due.
            let wake = retry_at
                .max(Instant::now() + Duration::from_millis(200))
                .min(deadline);
            tokio::select! {
                () = cancel.cancelled() => return Turn::Cancelled,
                _ = rx.changed() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// Sleeps until a time the gate named (at least 50 ms from now, so that a
/// time already past does not spin), or for ever when it named none.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => {
            tokio::time::sleep_until(at.max(Instant::now() + Duration::from_millis(50))).await
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(
            RetryPolicy {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(400),
            },
            Metrics::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_gate_lets_everyone_go() {
        let g = gate();
        assert!(g.accepting());
        let t = g
            .wait_for_turn(
                Instant::now() + Duration::from_secs(1),
                &CancellationToken::new(),
            )
            .await;
        assert_eq!(t, Turn::Go);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_while_the_prober_tests_the_key() {
        let g = gate();
        g.close(Refusal::Key, "403 INVALID_API_KEY");
        assert!(!g.accepting());
        let cancel = CancellationToken::new();
        let waited = g
            .wait_for_turn(Instant::now() + Duration::from_secs(5), &cancel)
            .await;
        assert_eq!(waited, Turn::TimedOut);
        let claim = g.try_claim_probe();
        assert!(claim.is_some(), "the prober may probe once due");
        drop(claim);
        g.open();
        assert_eq!(g.wait_for_turn(Instant::now(), &cancel).await, Turn::Go);
    }

    #[tokio::test(start_paused = true)]
    async fn a_billing_refusal_hands_out_one_probe_at_a_time() {
        let g = gate();
        g.close(Refusal::Billing, "BILLING_BALANCE_NOT_ENOUGH");
        assert!(g.accepting(), "requests keep coming, to wait and probe");
        assert_eq!(
            g.refusal().as_deref(),
            Some("the upstream refuses requests for billing (balance): BILLING_BALANCE_NOT_ENOUGH")
        );
        let cancel = CancellationToken::new();
        let first = g
            .wait_for_turn(Instant::now() + Duration::from_secs(5), &cancel)
            .await;
        assert!(matches!(first, Turn::Probe(_)));
        // While the probe is held, others wait until their deadline.
        let second = g
            .wait_for_turn(Instant::now() + Duration::from_millis(300), &cancel)
            .await;
        assert_eq!(second, Turn::TimedOut);
        drop(first);
        g.open();
        assert_eq!(g.wait_for_turn(Instant::now(), &cancel).await, Turn::Go);
    }

    #[tokio::test(start_paused = true)]
    async fn unconfirmed_creates_in_a_row_close_the_gate_until_a_create_is_confirmed() {
        for (in_a_row, closes) in [(0, false), (1, false), (2, false), (3, true), (9, true)] {
            assert_eq!(closes_after_unconfirmed(in_a_row), closes, "{in_a_row}");
        }
        let g = gate();
        g.create_unconfirmed(None, "garbage");
        g.create_unconfirmed(None, "garbage");
        // An accepted create in between starts the count again.
        g.open();
        g.create_unconfirmed(None, "garbage");
        g.create_unconfirmed(None, "garbage");
        assert_eq!(g.state(), GateState::Open);
        g.create_unconfirmed(None, "garbage");
        assert!(matches!(
            g.state(),
            GateState::Closed {
                refusal: Refusal::Unconfirmed,
                ..
            }
        ));
        let reason = g.refusal().expect("closed");
        assert!(reason.contains("without a readable task id"), "{reason}");
        // Like a refused balance, it is probed by one create at a time.
        assert!(g.accepting());
        let cancel = CancellationToken::new();
        let Turn::Probe(claim) = g
            .wait_for_turn(Instant::now() + Duration::from_secs(5), &cancel)
            .await
        else {
            panic!("the first waiting request probes");
        };
        g.create_unconfirmed(Some(claim), "still garbage");
        assert!(matches!(g.state(), GateState::Closed { .. }));
        g.open();
        assert_eq!(g.state(), GateState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_on_cancel() {
        let g = gate();
        g.close(Refusal::Billing, "no balance");
        let _claim = g
            .wait_for_turn(
                Instant::now() + Duration::from_secs(5),
                &CancellationToken::new(),
            )
            .await;
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert_eq!(
            g.wait_for_turn(Instant::now() + Duration::from_secs(5), &cancel)
                .await,
            Turn::Cancelled
        );
    }
}
