//! The create budget: when this worker may make its next paid create.
//!
//! Creates cost money and Novita limits them per account, per sliding
//! window, so they have a budget of their own, separate from polls, taken
//! before every create, the first attempt and each retry alike
//! ([`Budget::take`]): first the pause after a 429 (its `Retry-After`, or 2 s
//! doubling to 60 s without one), then, when the account's quota is known,
//! a slot in the deployment's window, kept by the broker in a [`ledger`].
//! The quota is the configured `upstream.create_quota`, or, without one,
//! the one the fleet learned from 429s ([`learn`]): any worker that meets
//! a full window writes what it shows into the journal, and every worker
//! takes its slots from the ledger of the latest value, so that three
//! workers behave like one with the quota configured, and a worker that
//! joins later starts from what the others know. Before anything is
//! learned, only pauses apply. Everything here is waited for *before* a
//! request is taken from the broker (or before a retry, bounded by the
//! retry budget), so a request that is only waiting waits in the queue.
//! Slots a request turned out not to need go to the next one ([`slots`]).
//! This module never calls the upstream and never holds a delivery.

pub mod learn;
pub mod ledger;
pub mod slots;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{BrokerError, PublishError, Publisher},
    config::CreateQuota,
    journal::{Journal, LearnedQuota},
    metrics::Metrics,
    retry::MAX_RETRY_AFTER,
};

pub use self::{
    ledger::{Ledger, LEDGER_TAG_LABEL},
    slots::{Prepaid, Slot, SlotBank},
};

/// How long a first 429 without `Retry-After` pauses creates.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(2);
/// The longest pause after 429s without `Retry-After`.
pub const MAX_DEFAULT_PAUSE: Duration = Duration::from_secs(60);
/// How long a full window's count waits for the records of creates
/// accepted just before it (they are written right after their accept).
const VERDICT_SETTLE: Duration = Duration::from_millis(500);
/// Longest wait between two claims while the window is full.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(2);
/// First wait after a refused claim.
const MIN_CLAIM_BACKOFF: Duration = Duration::from_millis(100);

/// The pause after the `refusals`-th 429 in a row without `Retry-After`.
pub fn default_pause(refusals: u32) -> Duration {
    let doublings = refusals.saturating_sub(1).min(16);
    (DEFAULT_PAUSE * 2u32.pow(doublings)).min(MAX_DEFAULT_PAUSE)
}

/// Why a slot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// `cancel` fired while waiting.
    #[error("cancelled while waiting for a create slot")]
    Cancelled,
    /// The broker could not be asked.
    #[error("cannot claim a quota slot: {0}")]
    Broker(#[from] PublishError),
    /// The ledger could not be declared (or, with an operator-managed
    /// topology, is missing).
    #[error("cannot declare the quota ledger: {0}")]
    Ledger(#[from] BrokerError),
}

/// What a claim in one ledger came to.
enum Claim {
    /// A slot is taken.
    Taken,
    /// The window is full.
    Full,
    /// The ledger is gone (declared again at the next claim).
    Gone,
}

/// The pause after 429s.
#[derive(Debug, Default)]
struct Pause {
    /// Until when every create waits.
    until: Option<Instant>,
    /// 429s since the last accepted create (a burst counts once).
    refusals: u32,
    /// When the last counted 429 arrived.
    refused_at: Option<Instant>,
}

/// What the budget is built from.
pub struct BudgetSettings {
    /// The deployment's request queue (ledger names derive from it).
    pub request_queue: String,
    /// `upstream.create_quota`.
    pub configured: Option<CreateQuota>,
    /// `upstream.quota_window`: the window a learned quota counts in.
    pub window: Duration,
    /// Whether the worker declares ledgers (`amqp.declare_topology`).
    pub declares: bool,
    /// Whether creates are also spaced evenly over the window (with lanes,
    /// so that each slot is chosen when it comes).
    pub paced: bool,
    /// The vhost, for messages.
    pub vhost: String,
}

/// One worker's create budget. Shared by the intake loop and the request
/// handlers.
pub struct Budget {
    settings: BudgetSettings,
    journal: Arc<Journal>,
    metrics: Metrics,
    /// The ledger names' tag, known once the journal has been read.
    tag: OnceLock<String>,
    pause: Mutex<Pause>,
    learner: Mutex<learn::Learner>,
    /// Ledgers this worker declared, and when (learned ones are declared
    /// again every window, so that they do not expire while in use).
    declared: Mutex<HashMap<String, Instant>>,
    /// Whether the earlier releases' ledger existed when last looked for.
    legacy: Mutex<Option<(Instant, bool)>>,
    /// The learned quota last reported (metrics, the log).
    reported: Mutex<Option<LearnedQuota>>,
    /// Wakes waiters when a pause is shortened or ends early.
    changed: tokio::sync::Notify,
}

impl Budget {
    /// A budget with nothing learned yet.
    pub fn new(settings: BudgetSettings, journal: Arc<Journal>, metrics: Metrics) -> Self {
        let budget = Self {
            settings,
            journal,
            metrics,
            tag: OnceLock::new(),
            pause: Mutex::new(Pause::default()),
            learner: Mutex::new(learn::Learner::default()),
            declared: Mutex::new(HashMap::new()),
            legacy: Mutex::new(None),
            reported: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
        };
        budget.report(None);
        budget
    }

    fn pause(&self) -> std::sync::MutexGuard<'_, Pause> {
        self.pause.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn learner(&self) -> std::sync::MutexGuard<'_, learn::Learner> {
        self.learner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Names the ledgers with the deployment's tag (the first call wins).
    pub fn name_with(&self, tag: &str) {
        let _ = self.tag.set(tag.to_owned());
    }

    /// The ledger creates take their slots from now: the configured
    /// quota's, the learned quota's, or none (nothing known yet).
    pub fn current_ledger(&self) -> Option<Ledger> {
        let tag = self.tag.get()?;
        let rq = &self.settings.request_queue;
        if let Some(quota) = self.settings.configured {
            return Some(Ledger::configured(rq, tag, quota));
        }
        let learned = self.journal.learned_quota();
        self.report(learned);
        learned.map(|q| Ledger::learned(rq, tag, &q))
    }

    /// Updates the metrics and logs when the learned quota changed.
    fn report(&self, learned: Option<LearnedQuota>) {
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        if *reported == learned && learned.is_some() {
            return;
        }
        let (creates, window, rate) = match (self.settings.configured, learned) {
            (Some(q), _) => (0, q.window, q.per_second()),
            (None, Some(l)) => (
                l.creates,
                l.window(),
                f64::from(l.creates) / l.window().as_secs_f64().max(0.001),
            ),
            (None, None) => (0, self.settings.window, f64::INFINITY),
        };
        self.metrics.set_create_quota(creates, window.as_secs_f64());
        self.metrics.set_create_rate_permitted(rate);
        if let (Some(new), old) = (learned, *reported) {
            if old.is_none_or(|o| o.creates != new.creates || o.window_ms != new.window_ms) {
                tracing::info!(
                    creates = new.creates,
                    window = %humantime::format_duration(new.window()),
                    probing = new.step > 0,
                    "the account's create quota, as the fleet learned it: {} creates per {}",
                    new.creates,
                    humantime::format_duration(new.window())
                );
            }
        }
        *reported = learned;
    }

    /// Until when creates are paused, if they are.
    pub fn paused_until(&self) -> Option<Instant> {
        let now = Instant::now();
        self.pause().until.filter(|u| *u > now)
    }

    /// Waits out a pause.
    async fn wait_pause(&self, cancel: &CancellationToken) -> Result<(), SlotError> {
        while let Some(until) = self.paused_until() {
            self.metrics.create_wait(crate::metrics::WaitReason::Pause);
            let changed = self.changed.notified();
            tokio::select! {
                () = cancel.cancelled() => return Err(SlotError::Cancelled),
                () = tokio::time::sleep_until(until) => {}
                () = changed => {}
            }
        }
        Ok(())
    }

    /// Waits until one more create may be sent and takes its slot: the
    /// pause after a 429 first, then, when the quota is known, a claim in
    /// the deployment's window, waiting (with a growing, jittered delay up
    /// to 2 s, never longer than the quota's average spacing) while it is
    /// full.
    pub async fn take(
        &self,
        publisher: &Publisher,
        cancel: &CancellationToken,
    ) -> Result<Slot, SlotError> {
        self.wait_pause(cancel).await?;
        let mut delay = MIN_CLAIM_BACKOFF;
        loop {
            let Some(ledger) = self.current_ledger() else {
                tracing::debug!("no quota known: a slot without a ledger");
                return Ok(Slot::now());
            };
            // Paced: first the fleet's one slot of the spacing.
            if self.settings.paced {
                if let Some(tag) = self.tag.get() {
                    let pace = Ledger::pace(&self.settings.request_queue, tag, ledger.quota);
                    match self.claim(publisher, &pace).await? {
                        Claim::Taken => {}
                        Claim::Gone => continue,
                        Claim::Full => {
                            self.metrics.create_wait(crate::metrics::WaitReason::Quota);
                            let spacing = ledger::pace_spacing(ledger.quota);
                            let wait =
                                (spacing / 4).clamp(MIN_CLAIM_BACKOFF / 2, MAX_CLAIM_BACKOFF);
                            tokio::select! {
                                () = cancel.cancelled() => return Err(SlotError::Cancelled),
                                () = tokio::time::sleep(wait.mul_f64(0.5 + rand::random::<f64>() * 0.5)) => {}
                            }
                            self.wait_pause(cancel).await?;
                            continue;
                        }
                    }
                }
            }
            let taken = match self.claim(publisher, &ledger).await? {
                Claim::Taken => true,
                Claim::Full => {
                    self.metrics.create_wait(crate::metrics::WaitReason::Quota);
                    self.cap_bound(publisher).await;
                    false
                }
                Claim::Gone => continue,
            };
            if taken {
                let Some(legacy) = self.legacy_ledger(publisher).await? else {
                    return Ok(Slot::now());
                };
                // An earlier release beside this one counts its creates
                // there only: a window it filled waits like any other (the
                // claim just taken stays, erring on the safe side).
                match self.claim(publisher, &legacy).await? {
                    Claim::Taken | Claim::Gone => return Ok(Slot::now()),
                    Claim::Full => self.metrics.create_wait(crate::metrics::WaitReason::Quota),
                }
            }
            let spacing =
                ledger.quota.window.as_secs_f64() / f64::from(ledger.quota.creates.max(1));
            let ceiling = MAX_CLAIM_BACKOFF
                .min(Duration::from_secs_f64(spacing))
                .max(MIN_CLAIM_BACKOFF);
            let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            tokio::select! {
                () = cancel.cancelled() => return Err(SlotError::Cancelled),
                () = tokio::time::sleep(jittered) => {}
            }
            delay = (delay * 2).min(ceiling);
            self.wait_pause(cancel).await?;
        }
    }

    /// Claims one slot in `ledger`, declaring it first if need be.
    async fn claim(&self, publisher: &Publisher, ledger: &Ledger) -> Result<Claim, SlotError> {
        // The earlier releases' ledger is only ever looked for, never
        // declared ([`Budget::legacy_ledger`]).
        if !ledger.legacy {
            self.keep_declared(publisher, ledger).await?;
        }
        match publisher.claim_slot(&ledger.name).await {
            Ok(()) => {
                tracing::debug!(ledger = %ledger.name, "claimed a slot");
                Ok(Claim::Taken)
            }
            Err(PublishError::Nacked) => Ok(Claim::Full),
            Err(PublishError::Unroutable(_)) => {
                tracing::warn!(
                    ledger = %ledger.name,
                    "the quota ledger is gone (expired, or its broker node?); declaring it again"
                );
                self.forget_declared(&ledger.name);
                if ledger.legacy {
                    *self.legacy.lock().unwrap_or_else(PoisonError::into_inner) = None;
                }
                Ok(Claim::Gone)
            }
            Err(e) => Err(SlotError::Broker(e)),
        }
    }

    /// The configured quota's ledger of earlier releases, if it exists
    /// (looked for once a window): a release before this one beside it
    /// counts its creates there.
    async fn legacy_ledger(&self, publisher: &Publisher) -> Result<Option<Ledger>, SlotError> {
        let (Some(quota), Some(tag)) = (self.settings.configured, self.tag.get()) else {
            return Ok(None);
        };
        let legacy = Ledger::legacy(&self.settings.request_queue, tag, quota);
        let known = *self.legacy.lock().unwrap_or_else(PoisonError::into_inner);
        let exists = match known {
            Some((at, exists)) if at.elapsed() < quota.window => exists,
            _ => {
                let exists = match legacy.declare(publisher, true, &self.settings.vhost).await {
                    Ok(()) => true,
                    Err(BrokerError::Missing { .. }) => false,
                    Err(e) => return Err(SlotError::Ledger(e)),
                };
                if exists && known.is_none_or(|(_, was)| !was) {
                    tracing::info!(
                        ledger = %legacy.name,
                        "an earlier release's quota ledger exists: claiming in it too"
                    );
                }
                *self.legacy.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((Instant::now(), exists));
                exists
            }
        };
        Ok(exists.then_some(legacy))
    }

    /// Declares a ledger this worker has not declared yet (and one that
    /// expires unused again each window, so that it does not while used).
    async fn keep_declared(&self, publisher: &Publisher, ledger: &Ledger) -> Result<(), SlotError> {
        let due = {
            let declared = self.declared.lock().unwrap_or_else(PoisonError::into_inner);
            match declared.get(&ledger.name) {
                None => true,
                Some(at) => ledger.expires_unused() && at.elapsed() >= ledger.quota.window,
            }
        };
        if !due {
            return Ok(());
        }
        // Operators may own a configured quota's ledger; a learned one is
        // named by the value learned, so nobody can create it ahead: the
        // workers always declare it (configure permission on
        // `<request_queue>.quota.*`).
        let passive = !self.settings.declares && !ledger.expires_unused();
        ledger
            .declare(publisher, passive, &self.settings.vhost)
            .await?;
        let mut declared = self.declared.lock().unwrap_or_else(PoisonError::into_inner);
        if declared
            .insert(ledger.name.clone(), Instant::now())
            .is_none()
        {
            tracing::info!(ledger = %ledger.name, quota = %ledger.quota, "declared the quota ledger");
        }
        if declared.len() > 64 {
            declared.retain(|_, at| at.elapsed() < Duration::from_secs(3600));
        }
        Ok(())
    }

    fn forget_declared(&self, name: &str) {
        self.declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// The ledger refused a slot: the cap binds. With a learned quota that
    /// has stood a while, that is when to probe for a higher one.
    async fn cap_bound(&self, publisher: &Publisher) {
        if self.settings.configured.is_some() {
            return;
        }
        let now = Utc::now();
        let bound_at = {
            let mut learner = self.learner();
            learner.cap_bound(now);
            learner.cap_bound_at()
        };
        let Some(known) = self.journal.learned_quota() else {
            return;
        };
        if learn::probe_start(&known, bound_at, now).is_none() {
            return;
        }
        // Due, unless another worker has started one (or changed the
        // quota) meanwhile; two that start the same probe at once make the
        // same ledger, and the second finds it filled.
        if let Err(e) = self.journal.sync(publisher).await {
            tracing::debug!(error = %e, "could not read the journal up to now");
            return;
        }
        if self.journal.learned_quota() != Some(known) {
            return;
        }
        if let Some(next) = learn::probe_start(&known, bound_at, Utc::now()) {
            self.adopt(publisher, next, "probing for a higher quota")
                .await;
        }
    }

    /// The upstream accepted a create: pauses start over, and refusals
    /// before it say nothing of a full window.
    pub fn accepted(&self) {
        let mut pause = self.pause();
        pause.refusals = 0;
        pause.refused_at = None;
        drop(pause);
        self.learner().accepted(Utc::now());
    }

    /// A create was recorded in the journal: while probing, a raise the
    /// fleet has filled with accepted creates is raised again.
    pub async fn recorded(&self, publisher: &Publisher) {
        if self.settings.configured.is_some() {
            return;
        }
        let Some(known) = self.journal.learned_quota() else {
            return;
        };
        let now = Utc::now();
        let in_window = self
            .journal
            .accepted_between(now - to_chrono(known.window()), now);
        if let Some(next) = learn::probe_next(&known, in_window, now) {
            let why = if next.step > 0 {
                "the raised quota filled; raising it again"
            } else {
                "the probe neither filled nor failed; it ends here"
            };
            self.adopt(publisher, next, why).await;
        }
    }

    /// The upstream answered 429 to a create sent at `sent_at` (this
    /// worker's clock, and the wall clock the journal's records use):
    /// every create of this worker pauses for `retry_after` (without one:
    /// [`DEFAULT_PAUSE`], doubling with each 429 in a row up to
    /// [`MAX_DEFAULT_PAUSE`]), and, without a configured quota, a row of
    /// refusals that shows a full window sets the learned quota.
    pub async fn refused(
        &self,
        publisher: Option<&Publisher>,
        sent_at: Instant,
        sent_at_wall: DateTime<Utc>,
        retry_after: Option<Duration>,
    ) {
        let now = Instant::now();
        {
            let mut pause = self.pause();
            // Calls sent before the last 429 arrived were one burst: they
            // count as one refusal.
            if pause.refused_at.is_none_or(|at| sent_at > at) {
                pause.refusals = pause.refusals.saturating_add(1);
                pause.refused_at = Some(now);
            }
            let wait = retry_after
                .unwrap_or_else(|| default_pause(pause.refusals))
                .min(MAX_RETRY_AFTER);
            let until = now + wait;
            pause.until = Some(pause.until.map_or(until, |u| u.max(until)));
        }
        if self.settings.configured.is_some() {
            return;
        }
        let answered = Utc::now();
        let known = self.journal.learned_quota();
        let refusal = learn::Refusal {
            sent_at: sent_at_wall,
            answered_at: answered,
        };
        if let Some(publisher) = publisher {
            // The fleet's refusals make the row, not this worker's alone.
            if let Err(e) = self.journal.record(publisher, &refusal).await {
                tracing::debug!(error = %e, "could not record a refused create in the journal");
            }
        }
        let last_accept = self.learner().last_accept(self.journal.last_accept_at());
        let fleet = self.journal.refusals_answered_after(last_accept);
        let row = learn::row(&fleet, refusal, last_accept);
        let first = learn::window_full(&row).then(|| row[0]);
        let Some(first) = first else { return };
        if let Some(publisher) = publisher {
            // Creates accepted just before the first refusal may still be
            // on their way into the journal: give them a moment, then read
            // up to now, so that the window is counted whole.
            tokio::time::sleep(VERDICT_SETTLE).await;
            if let Err(e) = self.journal.sync(publisher).await {
                tracing::debug!(error = %e, "could not read the journal up to now");
            }
            // Another worker that met the same full window has set the
            // quota from it meanwhile: nothing left to change.
            if self
                .journal
                .learned_quota()
                .is_some_and(|q| Some(q) != known && q.at >= first.answered_at)
            {
                return;
            }
        }
        let window = known.map_or(self.settings.window, |q| q.window());
        let in_window = self
            .journal
            .accepted_between(first.answered_at - to_chrono(window), first.answered_at);
        let estimate = learn::estimate(in_window);
        if let (Some(next), Some(publisher)) = (
            learn::after_full_window(known, estimate, window, answered),
            publisher,
        ) {
            self.adopt(publisher, next, "the window was full").await;
        }
    }

    /// Makes `next` the fleet's quota: creates its ledger, fills it with
    /// the creates already in the window, and writes it into the journal.
    async fn adopt(&self, publisher: &Publisher, next: LearnedQuota, why: &str) {
        let Some(tag) = self.tag.get() else { return };
        let ledger = Ledger::learned(&self.settings.request_queue, tag, &next);
        let now = Utc::now();
        let window = to_chrono(next.window());
        // The creates the fleet made in the window, each expiring when it
        // leaves the window; and slots the current ledger holds beyond
        // them (claims of creates still on their way, or refused ones),
        // for a whole window.
        let mut remaining: Vec<Duration> = self
            .journal
            .accepted_times(now - window, now)
            .into_iter()
            .map(|t| (t + window - now).to_std().unwrap_or(Duration::ZERO))
            .collect();
        if let Some(current) = self.current_ledger() {
            if current.name != ledger.name {
                let claimed = current.depth(publisher).await.unwrap_or(0) as usize;
                while remaining.len() < claimed {
                    remaining.push(next.window());
                }
            }
        }
        let skip = remaining.len().saturating_sub(next.creates as usize);
        let remaining: Vec<Duration> = remaining.split_off(skip);
        let result = async {
            self.keep_declared(publisher, &ledger).await?;
            // Another worker may have made and filled this ledger a moment
            // ago: filling it again would take the slots a probe adds.
            let held = ledger.depth(publisher).await? as usize;
            if held < remaining.len() {
                ledger.prefill(publisher, &remaining).await?;
            }
            self.journal
                .record(publisher, &next)
                .await
                .map_err(|e| SlotError::Broker(PublishError::Unroutable(e.to_string())))
        }
        .await;
        match result {
            Ok(()) => tracing::info!(
                creates = next.creates,
                in_window = remaining.len(),
                "{why}: the fleet's create quota is now {} per {}",
                next.creates,
                humantime::format_duration(next.window())
            ),
            Err(e) => tracing::warn!(error = %e, "could not record the learned create quota"),
        }
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn budget(configured: Option<CreateQuota>) -> Budget {
        let signer = Arc::new(crate::signing::Signer::new(
            &secrecy::SecretString::from("sk-test"),
            &[],
            "q",
            false,
        ));
        let journal = Arc::new(Journal::new(
            "q.journal".into(),
            signer,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        ));
        Budget::new(
            BudgetSettings {
                request_queue: "q".into(),
                configured,
                window: Duration::from_secs(60),
                declares: true,
                paced: false,
                vhost: "/".into(),
            },
            journal,
            Metrics::new(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_create_of_the_worker() {
        let b = budget(None);
        let cancel = CancellationToken::new();
        assert_eq!(b.paused_until(), None);
        // Nothing known: no ledger, so a slot needs no broker.
        assert_eq!(b.current_ledger(), None);
        let sent = Instant::now();
        b.refused(None, sent, Utc::now(), Some(Duration::from_secs(5)))
            .await;
        let t = Instant::now();
        b.wait_pause(&cancel).await.expect("waits");
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        // Without Retry-After: 2 s, then 4 s for the next in a row; an
        // accepted create starts over.
        b.accepted();
        b.refused(None, Instant::now(), Utc::now(), None).await;
        let t = Instant::now();
        b.wait_pause(&cancel).await.expect("waits");
        assert_eq!(t.elapsed(), DEFAULT_PAUSE);
        b.refused(None, Instant::now(), Utc::now(), None).await;
        let t = Instant::now();
        b.wait_pause(&cancel).await.expect("waits");
        assert_eq!(t.elapsed(), DEFAULT_PAUSE * 2);
        b.accepted();
        b.refused(None, Instant::now(), Utc::now(), None).await;
        let t = Instant::now();
        b.wait_pause(&cancel).await.expect("waits");
        assert_eq!(t.elapsed(), DEFAULT_PAUSE);
        cancel.cancel();
        b.refused(None, Instant::now(), Utc::now(), None).await;
        assert!(matches!(
            b.wait_pause(&cancel).await,
            Err(SlotError::Cancelled)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_configured_quota_is_the_ledger_and_nothing_is_learned() {
        let quota = CreateQuota::parse("2/min").expect("quota");
        let b = budget(Some(quota));
        assert_eq!(b.current_ledger(), None, "named once the journal is read");
        b.name_with("abcdef0123456789");
        let ledger = b.current_ledger().expect("the configured ledger");
        assert_eq!(ledger.quota, quota);
        assert_eq!(ledger.name, "q.quota.abcdef0123456789.set.2-per-60000ms");
        b.refused(None, Instant::now(), Utc::now(), None).await;
        b.refused(None, Instant::now(), Utc::now(), None).await;
        assert_eq!(b.journal.learned_quota(), None);
    }
}
