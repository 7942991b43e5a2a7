//! The pipeline's decisions, as plain functions over plain data.
//!
//! A ticket's schedule: whether a delivery hops, waits here or polls
//! ([`before_poll`], [`at_poll`]), which wait queue it parks in
//! ([`parking_queue`]), the delays between polls ([`next_delay`],
//! [`error_delay`], [`next_poll_at`]) and what a terminal event the broker
//! refused does to it ([`after_failed_terminal`]); what a poll answer or a
//! poll error does to a ticket ([`after_poll`]) and to one no key verifies
//! ([`after_unverified`]); what the gate's state does to a request about to
//! be created ([`at_gate`]), what a failed create does to its request
//! ([`after_create`]), and what a copy of a succeeded task's videos into
//! the bucket does to its ticket ([`at_copy`], [`after_copy`]). Each takes values and returns a value that says what
//! happens next (park with this delay, publish this terminal event, hand
//! back, dead-letter with this reason); the handlers in `intake` and
//! `tracking` carry it out. Nothing here waits, publishes or calls the
//! upstream, so every branch is unit-tested without a broker.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ticket::{to_chrono, Ticket};
use crate::{
    config::PollingSettings,
    events::FailureCode,
    gate::{GateState, Refusal},
    metrics::{PollResult, RequestOutcome},
    retry::{self, RetryError, RetryPolicy},
    storage::{CopyError, StoredCopy},
    upstream::{RunningStatus, TaskResult, TaskStatus, UpstreamError, Video},
};

/// Consecutive 404s (over at least [`NOT_FOUND_GRACE`]) after which a task
/// is given up as lost upstream.
pub const MAX_NOT_FOUND: u32 = 5;
/// How long after submission a 404 may still be the upstream catching up.
pub const NOT_FOUND_GRACE: Duration = Duration::from_secs(60);
/// Consecutive non-retryable poll errors after which the task is given up.
pub const MAX_POLL_REJECTIONS: u32 = 10;

/// What a poll does to the gate in front of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateEffect {
    /// Nothing.
    Keep,
    /// The upstream answered: it serves, with this key.
    Open,
    /// The key was refused.
    CloseForKey,
}

/// How a request ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminal {
    /// The task produced these videos.
    Succeeded(Vec<Video>),
    /// The request failed.
    Failed {
        /// The failure code of the event.
        code: FailureCode,
        /// The event's message.
        message: String,
    },
}

/// A changed `queued`/`processing` state worth a progress event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// `queued` or `processing`.
    pub status: RunningStatus,
    /// Percent done, when the upstream says.
    pub percent: Option<u8>,
    /// Seconds left, when the upstream says.
    pub eta_seconds: Option<u64>,
}

/// When the next poll is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextPoll {
    /// At this time.
    At(DateTime<Utc>),
    /// After the backoff of this (0-based) error attempt, at least the
    /// upstream's `Retry-After`; jittered when carried out
    /// ([`error_delay`]).
    Backoff {
        /// 0-based attempt.
        attempt: u32,
        /// The upstream's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

/// What happens to a ticket after one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollStep {
    /// Publish the terminal event and acknowledge the ticket.
    Finish(Terminal),
    /// Park the ticket again; publish `progress` first when set (and only
    /// record it in the ticket once published).
    Again {
        /// When to poll next.
        next: NextPoll,
        /// A progress event to publish first.
        progress: Option<Progress>,
    },
}

/// The whole outcome of one poll: the ticket with its counters updated, the
/// poll's metric label, what it does to the gate, and the next step.
#[derive(Debug, Clone)]
pub struct PollDecision {
    /// The ticket, with `polls`, `errors` and `not_found` updated.
    pub ticket: Ticket,
    /// `vidu_worker_polls_total{result}`.
    pub outcome: PollResult,
    /// What the answer says about the upstream.
    pub gate: GateEffect,
    /// What to do.
    pub step: PollStep,
}

/// How far a hop may overshoot the wanted delay, to save a hop.
pub const TIER_TOLERANCE: Duration = Duration::from_millis(250);

/// The wait queue to park a ticket in when `remaining` is left before its
/// next poll, among `tiers` (delay, name; shortest first): the longest tier
/// that does not overshoot by more than [`TIER_TOLERANCE`]. `None` means the
/// wait is at most the shortest tier: the ticket goes straight to the
/// tracking queue and the tracker waits the rest in memory.
pub fn wait_tier<T>(tiers: &[(Duration, T)], remaining: Duration) -> Option<&(Duration, T)> {
    let shortest = tiers.first()?.0;
    if remaining <= shortest {
        return None;
    }
    tiers
        .iter()
        .rev()
        .find(|(d, _)| *d <= remaining + TIER_TOLERANCE)
        .or(tiers.first())
}

/// Where a ticket waits `remaining` before its next poll: the wait queue
/// [`wait_tier`] picks, or the tracking queue itself when the wait is at
/// most the shortest tier.
pub fn parking_queue<'a>(
    tiers: &'a [(Duration, String)],
    tracking: &'a str,
    remaining: Duration,
) -> &'a str {
    wait_tier(tiers, remaining).map_or(tracking, |(_, q)| q.as_str())
}

/// What a ticket's delivery does before its poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforePoll {
    /// Not due for longer than the shortest wait queue: another hop.
    Hop,
    /// Due within the shortest tier: wait this long here, holding the
    /// ticket, then poll.
    WaitHere(Duration),
    /// Due: poll.
    Poll,
}

/// Decides what a ticket's delivery does when `remaining` is left before
/// its poll.
pub fn before_poll<T>(tiers: &[(Duration, T)], remaining: Duration) -> BeforePoll {
    if wait_tier(tiers, remaining).is_some() {
        BeforePoll::Hop
    } else if remaining.is_zero() {
        BeforePoll::Poll
    } else {
        BeforePoll::WaitHere(remaining)
    }
}

/// What the gate does to a ticket due for its poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtPoll {
    /// Poll now.
    Poll,
    /// The key is refused: polling with it only adds noise, so the ticket
    /// parks this long, until about the gate's next probe.
    Defer(Duration),
}

/// Shortest and longest deferral of a poll while the key is refused.
pub const KEY_REFUSED_DEFER: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(60));

/// Decides whether a due ticket is polled, given the gate's state at `now`.
/// Only a refused key defers it: a refused balance or an upstream outage
/// still lets a finished task be collected.
pub fn at_poll(gate: &GateState, now: tokio::time::Instant) -> AtPoll {
    defer_while(gate, Refusal::Key, now)
}

/// What the gate's state does to a succeeded task's copy that is due:
/// while the storage refuses us, trying only adds noise, so the ticket
/// parks until about the gate's next probe (1 to 60 s), keeping its place
/// and counting no error.
pub fn at_copy(gate: &GateState, now: tokio::time::Instant) -> AtPoll {
    defer_while(gate, Refusal::Storage, now)
}

/// Defers a due step while the gate is closed for `refusal`: until about
/// the gate's next probe, within [`KEY_REFUSED_DEFER`].
fn defer_while(gate: &GateState, refusal: Refusal, now: tokio::time::Instant) -> AtPoll {
    match gate {
        GateState::Closed {
            refusal: closed,
            retry_at,
            ..
        } if *closed == refusal => AtPoll::Defer(
            retry_at
                .saturating_duration_since(now)
                .clamp(KEY_REFUSED_DEFER.0, KEY_REFUSED_DEFER.1),
        ),
        _ => AtPoll::Poll,
    }
}

/// What happens to a succeeded task's ticket after copying its videos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyStep {
    /// Publish `succeeded` with these copies.
    Succeed(Vec<StoredCopy>),
    /// End `failed`/`storage_failed` with this message (the event carries
    /// the upstream's videos).
    Fail(String),
    /// Look at the task again then (a poll, which may give a fresh URL,
    /// then the copy again).
    Again(NextPoll),
    /// The storage refuses us: close the gate with this reason; the ticket
    /// keeps its place (no error counted) and is looked at again once the
    /// gate says ([`at_copy`]).
    Pause(String),
}

/// Decides what a copy's result does to a succeeded task's ticket: stored
/// → `succeeded`; a failure for now → again after the copy error's backoff
/// until the task's deadline; a source that stopped serving the video →
/// looked up once more at once (a fresh poll may give a fresh URL), then
/// `storage_failed`; refused credentials or a missing bucket → pause; too
/// large, not a video, or a URL never to be fetched → `storage_failed`.
pub fn after_copy(
    ticket: &mut Ticket,
    result: Result<Vec<StoredCopy>, CopyError>,
    now: DateTime<Utc>,
) -> CopyStep {
    match result {
        Ok(stored) => {
            ticket.copy_errors = 0;
            CopyStep::Succeed(stored)
        }
        Err(CopyError::Transient(why)) => {
            if now >= ticket.deadline {
                return CopyStep::Fail(format!(
                    "the video could not be stored before the task's deadline: {why}"
                ));
            }
            let attempt = ticket.copy_errors;
            ticket.copy_errors = ticket.copy_errors.saturating_add(1);
            CopyStep::Again(NextPoll::Backoff {
                attempt,
                retry_after: None,
            })
        }
        Err(CopyError::SourceGone(_)) if !ticket.source_looked_up => {
            ticket.source_looked_up = true;
            CopyStep::Again(NextPoll::At(now))
        }
        Err(CopyError::SourceGone(why)) => CopyStep::Fail(format!(
            "the video's URL stopped serving it before it could be stored ({why}), also after the task was looked up again"
        )),
        Err(CopyError::StoreRefused(why)) => CopyStep::Pause(why),
        Err(e @ (CopyError::TooLarge { .. } | CopyError::NotAVideo | CopyError::Rejected(_))) => {
            CopyStep::Fail(e.to_string())
        }
    }
}

/// The wait before the next look at a running task: the upstream's `eta`
/// when it gives one, otherwise half the task's age (polls thin out as a
/// task runs long), always within `min_interval..=max_interval`.
pub fn next_delay(polling: &PollingSettings, eta: Option<Duration>, age: Duration) -> Duration {
    let wanted = eta.unwrap_or(age / 2);
    wanted.clamp(polling.min_interval, polling.max_interval)
}

/// The wait after a failed poll.
pub fn error_delay(
    polling: &PollingSettings,
    policy: RetryPolicy,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let backoff = policy.delay_for_attempt(attempt);
    let wanted = retry_after.map_or(backoff, |r| r.max(backoff));
    wanted.clamp(polling.min_interval, polling.max_interval.max(policy.max))
}

/// The time a [`NextPoll`] stands for, at `now`: its own time, or the
/// backoff of its attempt (jittered, at least the upstream's
/// `Retry-After`).
pub fn next_poll_at(
    next: NextPoll,
    now: DateTime<Utc>,
    polling: &PollingSettings,
    policy: RetryPolicy,
) -> DateTime<Utc> {
    match next {
        NextPoll::At(at) => at,
        NextPoll::Backoff {
            attempt,
            retry_after,
        } => now + to_chrono(error_delay(polling, policy, attempt, retry_after)),
    }
}

/// The ticket to park when its terminal event could not be published
/// within the publishing patience: one more error, polled again after that
/// error's backoff (and the event tried again then), rather than handed
/// back, which would poll the task again at once.
pub fn after_failed_terminal(
    ticket: &Ticket,
    now: DateTime<Utc>,
    polling: &PollingSettings,
    policy: RetryPolicy,
) -> Ticket {
    let mut again = ticket.clone();
    let backoff = NextPoll::Backoff {
        attempt: again.errors,
        retry_after: None,
    };
    again.errors = again.errors.saturating_add(1);
    again.next_poll_at = next_poll_at(backoff, now, polling, policy);
    again
}

/// The `timed_out` failure of a ticket at `now`.
pub fn timed_out(ticket: &Ticket, now: DateTime<Utc>) -> Terminal {
    let age = ticket.age(now);
    Terminal::Failed {
        code: FailureCode::TimedOut,
        message: format!(
            "the task did not finish within {} (polled {} times)",
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            ticket.polls
        ),
    }
}

fn upstream_failed(message: String) -> PollStep {
    PollStep::Finish(Terminal::Failed {
        code: FailureCode::UpstreamFailed,
        message,
    })
}

/// Decides what one poll's answer does to its ticket.
pub fn after_poll(
    mut ticket: Ticket,
    answer: Result<TaskResult, UpstreamError>,
    now: DateTime<Utc>,
    polling: &PollingSettings,
) -> PollDecision {
    ticket.polls = ticket.polls.saturating_add(1);
    match answer {
        Ok(result) => {
            ticket.errors = 0;
            ticket.not_found = 0;
            let (outcome, step) = after_answer(&ticket, result, now, polling);
            PollDecision {
                ticket,
                outcome,
                gate: GateEffect::Open,
                step,
            }
        }
        Err(err) => {
            let (gate, step) = after_error(&mut ticket, &err, now);
            PollDecision {
                ticket,
                outcome: PollResult::Error,
                gate,
                step,
            }
        }
    }
}

fn after_answer(
    ticket: &Ticket,
    result: TaskResult,
    now: DateTime<Utc>,
    polling: &PollingSettings,
) -> (PollResult, PollStep) {
    match result.status {
        TaskStatus::Succeeded if result.bad_video.is_some() => (
            PollResult::Failed,
            upstream_failed(format!(
                "the upstream reported the task done with {}; the video is not handed to consumers",
                result.bad_video.as_deref().unwrap_or("an unusable video")
            )),
        ),
        TaskStatus::Succeeded if !result.videos.is_empty() => (
            PollResult::Succeeded,
            PollStep::Finish(Terminal::Succeeded(result.videos)),
        ),
        TaskStatus::Failed => (
            PollResult::Failed,
            upstream_failed(result.reason.unwrap_or_else(|| {
                "the upstream reported the task as failed without a reason".into()
            })),
        ),
        // Still running (or a success without a video: looked at again).
        status => {
            let name = status.running();
            let outcome = match name {
                Some(RunningStatus::Queued) => PollResult::Queued,
                Some(RunningStatus::Processing) => PollResult::Processing,
                None => PollResult::Unknown,
            };
            if now >= ticket.deadline {
                return (outcome, PollStep::Finish(timed_out(ticket, now)));
            }
            let progress = name
                .filter(|name| {
                    ticket.last_status != Some(*name)
                        || ticket.last_progress != result.progress_percent
                })
                .map(|status| Progress {
                    status,
                    percent: result.progress_percent,
                    eta_seconds: result.eta.map(|e| e.as_secs_f64().ceil() as u64),
                });
            let delay = next_delay(polling, result.eta, ticket.age(now));
            let at = (now + to_chrono(delay)).min(ticket.deadline);
            (
                outcome,
                PollStep::Again {
                    next: NextPoll::At(at),
                    progress,
                },
            )
        }
    }
}

fn after_error(
    ticket: &mut Ticket,
    err: &UpstreamError,
    now: DateTime<Utc>,
) -> (GateEffect, PollStep) {
    let gate = GateEffect::Keep;
    let retry_after = match err {
        UpstreamError::TaskFailed { message } => {
            return (gate, upstream_failed(message.clone()));
        }
        UpstreamError::KeyRejected { .. } => {
            // Not the task's fault: no error counted, no timeout while the
            // operator fixes the key.
            return (
                GateEffect::CloseForKey,
                PollStep::Again {
                    next: NextPoll::Backoff {
                        attempt: ticket.errors.saturating_sub(1),
                        retry_after: None,
                    },
                    progress: None,
                },
            );
        }
        UpstreamError::NotFound { message } => {
            ticket.not_found = ticket.not_found.saturating_add(1);
            if ticket.not_found >= MAX_NOT_FOUND && ticket.age(now) >= NOT_FOUND_GRACE {
                return (
                    gate,
                    upstream_failed(format!("the upstream no longer knows the task ({message})")),
                );
            }
            None
        }
        UpstreamError::Rejected { .. } | UpstreamError::Unusable { .. } => {
            ticket.errors = ticket.errors.saturating_add(1);
            if ticket.errors >= MAX_POLL_REJECTIONS {
                return (
                    gate,
                    upstream_failed(format!(
                        "the upstream keeps refusing to report the task: {err}"
                    )),
                );
            }
            None
        }
        UpstreamError::Transient { retry_after, .. }
        | UpstreamError::RateLimited { retry_after, .. } => {
            ticket.errors = ticket.errors.saturating_add(1);
            *retry_after
        }
        // Reading a result needs no balance: a hiccup. Create-only answers
        // that a poll somehow meets are retried later too.
        UpstreamError::Billing { .. }
        | UpstreamError::Unconfirmed { .. }
        | UpstreamError::NotSent => {
            ticket.errors = ticket.errors.saturating_add(1);
            None
        }
    };
    if now >= ticket.deadline {
        return (gate, PollStep::Finish(timed_out(ticket, now)));
    }
    (
        gate,
        PollStep::Again {
            next: NextPoll::Backoff {
                attempt: ticket.errors.saturating_sub(1),
                retry_after,
            },
            progress: None,
        },
    )
}

/// What the gate's state means for a request about to be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateStep {
    /// Create it.
    Go,
    /// The key is refused or the upstream is down (a prober works on it
    /// without requests): hand the request back.
    HandBack,
    /// The balance is exhausted: wait at the gate (at most `amqp.max_hold`)
    /// for the probe's verdict, or be the probe.
    Wait,
}

/// Decides what the gate's state does to a request about to be created.
pub fn at_gate(state: &GateState) -> GateStep {
    match state {
        GateState::Open => GateStep::Go,
        GateState::Closed { refusal, .. } if refusal.probed_by_a_create() => GateStep::Wait,
        GateState::Closed { .. } => GateStep::HandBack,
    }
}

/// Why a create attempt did not produce a task.
#[derive(Debug)]
pub enum CreateError {
    /// The upstream's answer, or why it could not be had.
    Upstream(UpstreamError),
    /// The delivery was lost before the call: the broker has already handed
    /// the request to someone else, so it must not be created here.
    NotSent,
    /// Shutdown while waiting for a slot.
    Cancelled,
    /// Before the call, the request was canceled or its deadline passed:
    /// never created.
    Unwanted(FailureCode),
}

impl retry::Transient for CreateError {
    fn retry_hint(&self) -> retry::RetryHint {
        match self {
            Self::Upstream(e) => e.retry_hint(),
            Self::NotSent | Self::Cancelled | Self::Unwanted(_) => retry::RetryHint::Never,
        }
    }
}

/// Whether a request still wants its create at `now`: `None`, or the code
/// it ends with instead (a cancel first, then its deadline). Asked when the
/// request is taken, after the fleet's journal was read up to now, and
/// right before each create call.
pub fn unwanted(
    canceled: bool,
    deadline: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<FailureCode> {
    if canceled {
        Some(FailureCode::Canceled)
    } else if deadline.is_some_and(|d| d <= now) {
        Some(FailureCode::Expired)
    } else {
        None
    }
}

/// The message of a request that ends without a create.
pub fn unwanted_message(code: FailureCode, deadline: Option<DateTime<Utc>>) -> String {
    match (code, deadline) {
        (FailureCode::Expired, Some(d)) => format!(
            "its deadline {} passed before it was created; nothing was created",
            d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        (FailureCode::Canceled, _) => {
            "canceled by its producer before it was created; nothing was created".to_owned()
        }
        _ => "ended before it was created; nothing was created".to_owned(),
    }
}

/// What happens to a request whose create (with its retries) did not
/// produce a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateStep {
    /// Its delivery was lost before the send: nothing was created, the
    /// broker has given the request to someone else; leave it.
    NotSent,
    /// Shutting down: leave the delivery for the broker to return.
    Abandon,
    /// Hand the request back to the queue (one delivery counted), closing
    /// the gate for `close` first when set.
    HandBack {
        /// The refusal to close the gate for.
        close: Option<Refusal>,
        /// The upstream's words, for the gate and the log.
        detail: String,
    },
    /// The balance is exhausted: close the gate for billing, then wait at
    /// it and try again.
    WaitForBalance {
        /// The upstream's words.
        detail: String,
    },
    /// Canceled or past its deadline before the call: end it with this
    /// code, nothing created.
    Unwanted(FailureCode),
    /// Fail the request and dead-letter it; the upstream served the call,
    /// so the gate opens.
    Refuse {
        /// The failure code of the event.
        code: FailureCode,
        /// The event's message and the dead-letter reason.
        message: String,
        /// `vidu_worker_requests_received_total{outcome}`.
        outcome: RequestOutcome,
    },
}

/// What to do with a message on the tracking queues that is signed, but by
/// no key this worker holds: another worker of the deployment may hold its
/// key (a rotation not finished everywhere), so it is kept, not thrown
/// away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnverifiedStep {
    /// Park an unchanged copy (same body, same signatures) for this long,
    /// for whichever worker reads it next.
    Keep(Duration),
    /// Kept past the longest task age: dead-letter it, signatures kept, so
    /// that it can be sent again once the configuration is right.
    GiveUp,
}

/// Decides about a ticket no key of this worker verifies, first seen
/// (kept) at `since` and kept `hops` times before: kept with a delay that
/// doubles from 2 s to 1024 s per hop, until `max_age`
/// (`polling.max_off_peak_task_age`, the longest a ticket can live) after
/// it was first seen. `since` comes from a header anyone could write, so
/// the caller takes it no later than `now`.
pub fn after_unverified(
    since: DateTime<Utc>,
    hops: u32,
    now: DateTime<Utc>,
    max_age: Duration,
) -> UnverifiedStep {
    let kept = (now - since).to_std().unwrap_or(Duration::ZERO);
    if kept >= max_age {
        return UnverifiedStep::GiveUp;
    }
    let delay = Duration::from_secs(2u64 << hops.min(9));
    UnverifiedStep::Keep(delay)
}

/// Decides what a failed create does to its request.
pub fn after_create(failure: RetryError<CreateError>) -> CreateStep {
    match failure {
        RetryError::Fatal(CreateError::NotSent) | RetryError::Exhausted(CreateError::NotSent) => {
            CreateStep::NotSent
        }
        RetryError::Cancelled(_)
        | RetryError::Fatal(CreateError::Cancelled)
        | RetryError::Exhausted(CreateError::Cancelled) => CreateStep::Abandon,
        RetryError::Fatal(CreateError::Unwanted(code))
        | RetryError::Exhausted(CreateError::Unwanted(code)) => CreateStep::Unwanted(code),
        // Still failing after the retry budget: back to the queue. A plain
        // outage also closes the gate, so that nothing more is taken until
        // a probe works; a rate limit only slows the pacer.
        RetryError::Exhausted(CreateError::Upstream(err)) => CreateStep::HandBack {
            close: (!matches!(err, UpstreamError::RateLimited { .. }))
                .then_some(Refusal::Unavailable),
            detail: err.to_string(),
        },
        RetryError::Fatal(CreateError::Upstream(err)) => match err {
            UpstreamError::KeyRejected { .. } => CreateStep::HandBack {
                close: Some(Refusal::Key),
                detail: err.to_string(),
            },
            UpstreamError::Billing { .. } => CreateStep::WaitForBalance {
                detail: err.to_string(),
            },
            UpstreamError::Unconfirmed { .. } => CreateStep::Refuse {
                code: FailureCode::UpstreamUnconfirmed,
                message: format!(
                    "{err}; a task may have been created and billed, so the request is not created again"
                ),
                outcome: RequestOutcome::UpstreamUnconfirmed,
            },
            UpstreamError::Rejected {
                status,
                reason,
                message,
            } => CreateStep::Refuse {
                code: FailureCode::UpstreamRejected,
                message: rejected_message(status, &reason, &message),
                outcome: RequestOutcome::UpstreamRejected,
            },
            other => CreateStep::Refuse {
                code: FailureCode::UpstreamRejected,
                message: other.to_string(),
                outcome: RequestOutcome::UpstreamRejected,
            },
        },
    }
}

/// The event message of an upstream refusal.
pub fn rejected_message(status: u16, reason: &str, message: &str) -> String {
    match (reason.is_empty(), message.is_empty()) {
        (false, false) => format!("HTTP {status} {reason}: {message}"),
        (false, true) => format!("HTTP {status} {reason}"),
        (true, false) => format!("HTTP {status}: {message}"),
        (true, true) => format!("HTTP {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestId;
    use crate::upstream::TaskId;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn polling() -> PollingSettings {
        PollingSettings {
            min_interval: S(1),
            max_interval: S(60),
            ..PollingSettings::default()
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    /// A ticket submitted at `t0`, deadline one hour later.
    fn ticket() -> Ticket {
        let submitted = t0();
        Ticket {
            v: super::super::ticket::TICKET_VERSION,
            request_id: RequestId::parse("r-1").unwrap_or_else(|_| unreachable!()),
            task_id: TaskId::parse("t-1").unwrap_or_else(|| unreachable!()),
            model: crate::model::Model::DEFAULT,
            metadata: None,
            correlation_id: None,
            reply_to: None,
            traceparent: None,
            received_at: submitted,
            submitted_at: submitted,
            deadline: submitted + chrono::Duration::hours(1),
            next_poll_at: submitted,
            polls: 3,
            errors: 0,
            not_found: 0,
            last_status: None,
            last_progress: None,
            copy_errors: 0,
            source_looked_up: false,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        t0() + chrono::Duration::seconds(secs)
    }

    fn result(status: TaskStatus) -> TaskResult {
        TaskResult {
            status,
            reason: None,
            eta: None,
            progress_percent: None,
            videos: Vec::new(),
            bad_video: None,
        }
    }

    fn video() -> Video {
        Video {
            url: "https://cdn.example/v.mp4".into(),
            ttl_seconds: Some(3600),
            kind: Some("mp4".into()),
        }
    }

    fn failed(code: FailureCode, message: &str) -> PollStep {
        PollStep::Finish(Terminal::Failed {
            code,
            message: message.into(),
        })
    }

    fn transient(retry_after: Option<Duration>) -> UpstreamError {
        UpstreamError::Transient {
            detail: "HTTP 503".into(),
            retry_after,
        }
    }

    #[test]
    fn eta_decides_the_next_poll_within_bounds() {
        let p = polling();
        let s = Duration::from_secs;
        assert_eq!(next_delay(&p, Some(s(18)), s(2)), s(18));
        assert_eq!(next_delay(&p, Some(s(0)), s(20)), s(1));
        assert_eq!(next_delay(&p, Some(s(4000)), s(20)), s(60));
    }

    #[test]
    fn without_eta_polls_thin_out_with_age() {
        let p = polling();
        let s = Duration::from_secs;
        assert_eq!(next_delay(&p, None, s(0)), s(1));
        assert_eq!(next_delay(&p, None, s(10)), s(5));
        assert_eq!(next_delay(&p, None, s(3600)), s(60));
    }

    #[test]
    fn error_delays_grow_and_honour_retry_after() {
        let p = polling();
        let policy = RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        };
        let first = error_delay(&p, policy, 0, None);
        assert!(
            first >= Duration::from_secs(1) && first <= Duration::from_secs(2),
            "{first:?}"
        );
        let later = error_delay(&p, policy, 8, None);
        assert!(later >= Duration::from_secs(30), "{later:?}");
        let told = error_delay(&p, policy, 0, Some(Duration::from_secs(20)));
        assert_eq!(told, Duration::from_secs(20));
    }

    fn tiers() -> Vec<(Duration, String)> {
        crate::broker::WAIT_TIERS_SECS
            .iter()
            .map(|s| (Duration::from_secs(*s), format!("q.wait.{s}s")))
            .collect()
    }

    #[test]
    fn tickets_park_in_the_longest_tier_that_fits() {
        let tiers = tiers();
        let pick =
            |ms: u64| wait_tier(&tiers, Duration::from_millis(ms)).map(|(d, _)| d.as_millis());
        assert_eq!(pick(0), None);
        assert_eq!(pick(1_000), None);
        assert_eq!(
            pick(2_000),
            None,
            "the shortest tier's wait is kept in memory"
        );
        assert_eq!(pick(2_100), Some(2_000));
        assert_eq!(pick(3_999), Some(4_000), "a small overshoot saves a hop");
        assert_eq!(pick(3_700), Some(2_000));
        assert_eq!(pick(18_000), Some(16_000));
        assert_eq!(pick(10_000_000), Some(1_024_000));
        let none: Vec<(Duration, String)> = Vec::new();
        assert_eq!(wait_tier(&none, Duration::from_secs(60)), None);
    }

    #[test]
    fn a_ticket_hops_waits_here_or_is_polled_and_parks_where_its_wait_fits() {
        let tiers = tiers();
        let ms = Duration::from_millis;
        // (remaining, before the poll, queue it would park in)
        let cases = [
            (0, BeforePoll::Poll, "q.tracking"),
            (1, BeforePoll::WaitHere(ms(1)), "q.tracking"),
            (1_999, BeforePoll::WaitHere(ms(1_999)), "q.tracking"),
            (2_000, BeforePoll::WaitHere(ms(2_000)), "q.tracking"),
            (2_001, BeforePoll::Hop, "q.wait.2s"),
            (3_999, BeforePoll::Hop, "q.wait.4s"),
            (70_000, BeforePoll::Hop, "q.wait.64s"),
        ];
        for (remaining, before, queue) in cases {
            assert_eq!(before_poll(&tiers, ms(remaining)), before, "{remaining} ms");
            assert_eq!(
                parking_queue(&tiers, "q.tracking", ms(remaining)),
                queue,
                "{remaining} ms"
            );
        }
        let none: Vec<(Duration, String)> = Vec::new();
        assert_eq!(
            before_poll(&none, ms(70_000)),
            BeforePoll::WaitHere(ms(70_000))
        );
        assert_eq!(parking_queue(&none, "q.tracking", ms(70_000)), "q.tracking");
    }

    #[test]
    fn only_a_refused_key_defers_a_due_poll_until_about_the_next_probe() {
        let now = tokio::time::Instant::now();
        let s = Duration::from_secs;
        let closed = |refusal: Refusal, retry_in: Duration| GateState::Closed {
            refusal,
            reason: "refused".into(),
            retry_at: now + retry_in,
        };
        // (gate, step)
        let cases = [
            (GateState::Open, AtPoll::Poll),
            (closed(Refusal::Key, s(30)), AtPoll::Defer(s(30))),
            (closed(Refusal::Key, Duration::ZERO), AtPoll::Defer(s(1))),
            (closed(Refusal::Key, s(3600)), AtPoll::Defer(s(60))),
            (closed(Refusal::Billing, s(30)), AtPoll::Poll),
            (closed(Refusal::Unavailable, s(30)), AtPoll::Poll),
            (closed(Refusal::Unconfirmed, s(30)), AtPoll::Poll),
            (closed(Refusal::Storage, s(30)), AtPoll::Poll),
        ];
        for (gate, want) in cases {
            assert_eq!(at_poll(&gate, now), want, "{gate:?}");
        }
        // A copy waits only for the storage.
        let cases = [
            (GateState::Open, AtPoll::Poll),
            (closed(Refusal::Storage, s(30)), AtPoll::Defer(s(30))),
            (
                closed(Refusal::Storage, Duration::ZERO),
                AtPoll::Defer(s(1)),
            ),
            (closed(Refusal::Storage, s(3600)), AtPoll::Defer(s(60))),
            (closed(Refusal::Key, s(30)), AtPoll::Poll),
            (closed(Refusal::Billing, s(30)), AtPoll::Poll),
        ];
        for (gate, want) in cases {
            assert_eq!(at_copy(&gate, now), want, "{gate:?}");
        }
    }

    #[test]
    fn a_canceled_or_expired_request_is_not_created() {
        let now = at(100);
        for (canceled, deadline, want) in [
            (false, None, None),
            (false, Some(at(101)), None),
            (false, Some(at(100)), Some(FailureCode::Expired)),
            (false, Some(at(50)), Some(FailureCode::Expired)),
            (true, None, Some(FailureCode::Canceled)),
            (true, Some(at(50)), Some(FailureCode::Canceled)),
        ] {
            assert_eq!(
                unwanted(canceled, deadline, now),
                want,
                "{canceled} {deadline:?}"
            );
        }
        assert_eq!(
            after_create(RetryError::Fatal(CreateError::Unwanted(
                FailureCode::Expired
            ))),
            CreateStep::Unwanted(FailureCode::Expired)
        );
        assert!(
            unwanted_message(FailureCode::Expired, Some(at(50))).contains("2026-01-01T00:00:50Z")
        );
    }

    #[test]
    fn a_copy_s_result_decides_the_ticket_s_next_step() {
        let stored = vec![StoredCopy {
            bucket: "b".into(),
            key: "r-1/t-1-0.mp4".into(),
            size: 3,
            sha256: "00".repeat(32),
            etag: "e".into(),
            url: None,
            url_expires_at: None,
        }];
        let transient = || Err(CopyError::Transient("503".into()));
        let gone = || Err(CopyError::SourceGone("403".into()));
        // Stored: succeeded, and the error count starts over.
        let mut t = ticket();
        t.copy_errors = 2;
        assert_eq!(
            after_copy(&mut t, Ok(stored.clone()), at(10)),
            CopyStep::Succeed(stored)
        );
        assert_eq!(t.copy_errors, 0);
        // Failures for now: backoff by the copy errors so far, until the
        // deadline.
        let mut t = ticket();
        for attempt in 0..3 {
            assert_eq!(
                after_copy(&mut t, transient(), at(10)),
                CopyStep::Again(NextPoll::Backoff {
                    attempt,
                    retry_after: None
                })
            );
        }
        assert_eq!(t.copy_errors, 3);
        assert!(matches!(
            after_copy(&mut t, transient(), at(3600)),
            CopyStep::Fail(m) if m.contains("deadline")
        ));
        // An expired source: looked up once more at once, then the end.
        let mut t = ticket();
        assert_eq!(
            after_copy(&mut t, gone(), at(10)),
            CopyStep::Again(NextPoll::At(at(10)))
        );
        assert!(t.source_looked_up);
        assert!(
            matches!(after_copy(&mut t, gone(), at(11)), CopyStep::Fail(m) if m.contains("looked up again"))
        );
        // Refused storage: a pause, nothing counted.
        let mut t = ticket();
        assert_eq!(
            after_copy(&mut t, Err(CopyError::StoreRefused("403".into())), at(10)),
            CopyStep::Pause("403".into())
        );
        assert_eq!((t.copy_errors, t.source_looked_up), (0, false));
        // The end at once: too large, not a video, never to be fetched.
        for e in [
            CopyError::TooLarge { max_bytes: 10 },
            CopyError::NotAVideo,
            CopyError::Rejected("the video URL's host is not a public address".into()),
        ] {
            let mut t = ticket();
            assert_eq!(
                after_copy(&mut t, Err(e.clone()), at(10)),
                CopyStep::Fail(e.to_string())
            );
        }
    }

    #[test]
    fn a_refused_terminal_event_parks_the_ticket_with_one_more_error() {
        let p = polling();
        let policy = RetryPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        };
        let now = at(100);
        // (errors so far, earliest and latest next poll, in seconds after now)
        let cases = [(0, 1, 2), (3, 2, 8), (20, 30, 60)];
        for (errors, earliest, latest) in cases {
            let mut t = ticket();
            t.errors = errors;
            let again = after_failed_terminal(&t, now, &p, policy);
            assert_eq!(again.errors, errors + 1);
            assert_eq!((again.polls, &again.task_id), (t.polls, &t.task_id));
            let after = (again.next_poll_at - now).num_milliseconds();
            assert!(
                after >= earliest * 1000 && after <= latest * 1000,
                "{errors} errors: next poll {after} ms after now"
            );
        }
        // A NextPoll::At is its own time.
        assert_eq!(next_poll_at(NextPoll::At(at(7)), now, &p, policy), at(7));
    }

    #[test]
    fn answers_decide_the_ticket() {
        let now = at(20);
        let mut succeeded = result(TaskStatus::Succeeded);
        succeeded.videos = vec![video()];
        let mut bad = result(TaskStatus::Succeeded);
        bad.videos = vec![video()];
        bad.bad_video = Some("a file: URL".into());
        let mut failed_with = result(TaskStatus::Failed);
        failed_with.reason = Some("NSFW".into());
        let mut queued = result(TaskStatus::Queued);
        queued.progress_percent = Some(0);
        let mut eta = result(TaskStatus::Processing);
        eta.eta = Some(S(18));
        eta.progress_percent = Some(40);

        let progress = |status, percent, eta_seconds| Progress {
            status,
            percent,
            eta_seconds,
        };
        // (answer, outcome, step); the default polling without eta waits
        // half the task's age (20 s old: 10 s).
        let table: Vec<(TaskResult, &str, PollStep)> = vec![
            (
                succeeded,
                "succeeded",
                PollStep::Finish(Terminal::Succeeded(vec![video()])),
            ),
            (
                bad,
                "failed",
                failed(
                    FailureCode::UpstreamFailed,
                    "the upstream reported the task done with a file: URL; the video is not handed to consumers",
                ),
            ),
            (
                failed_with,
                "failed",
                failed(FailureCode::UpstreamFailed, "NSFW"),
            ),
            (
                result(TaskStatus::Failed),
                "failed",
                failed(
                    FailureCode::UpstreamFailed,
                    "the upstream reported the task as failed without a reason",
                ),
            ),
            (
                result(TaskStatus::Succeeded),
                "unknown",
                PollStep::Again {
                    next: NextPoll::At(at(30)),
                    progress: None,
                },
            ),
            (
                result(TaskStatus::Unknown),
                "unknown",
                PollStep::Again {
                    next: NextPoll::At(at(30)),
                    progress: None,
                },
            ),
            (
                queued,
                "queued",
                PollStep::Again {
                    next: NextPoll::At(at(30)),
                    progress: Some(progress(RunningStatus::Queued, Some(0), None)),
                },
            ),
            (
                eta,
                "processing",
                PollStep::Again {
                    next: NextPoll::At(at(38)),
                    progress: Some(progress(RunningStatus::Processing, Some(40), Some(18))),
                },
            ),
        ];
        for (answer, outcome, step) in table {
            let mut before = ticket();
            before.errors = 4;
            before.not_found = 2;
            let d = after_poll(before, Ok(answer), now, &polling());
            assert_eq!(d.outcome.as_str(), outcome);
            assert_eq!(d.step, step, "{outcome}");
            assert_eq!(d.gate, GateEffect::Open);
            assert_eq!(
                (d.ticket.polls, d.ticket.errors, d.ticket.not_found),
                (4, 0, 0)
            );
        }
    }

    #[test]
    fn progress_is_reported_only_when_it_changed() {
        let mut same = ticket();
        same.last_status = Some(RunningStatus::Processing);
        same.last_progress = Some(50);
        let mut answer = result(TaskStatus::Processing);
        answer.progress_percent = Some(50);
        let again = |d: PollDecision| match d.step {
            PollStep::Again { progress, .. } => progress,
            PollStep::Finish(t) => panic!("finished: {t:?}"),
        };
        let d = after_poll(same.clone(), Ok(answer.clone()), at(20), &polling());
        assert_eq!(again(d), None);
        answer.progress_percent = Some(60);
        let d = after_poll(same.clone(), Ok(answer.clone()), at(20), &polling());
        assert_eq!(again(d).map(|p| p.percent), Some(Some(60)));
        // The state changed, the percent did not.
        let d = after_poll(
            same,
            Ok(TaskResult {
                progress_percent: Some(50),
                ..result(TaskStatus::Queued)
            }),
            at(20),
            &polling(),
        );
        assert_eq!(again(d).map(|p| p.status), Some(RunningStatus::Queued));
    }

    #[test]
    fn a_running_task_ends_at_its_deadline_and_never_polls_past_it() {
        let mut answer = result(TaskStatus::Processing);
        answer.eta = Some(S(600));
        // 30 s before the deadline: the next poll is the deadline itself.
        let d = after_poll(ticket(), Ok(answer.clone()), at(3570), &polling());
        assert_eq!(
            d.step,
            PollStep::Again {
                next: NextPoll::At(at(3600)),
                progress: Some(Progress {
                    status: RunningStatus::Processing,
                    percent: None,
                    eta_seconds: Some(600)
                })
            }
        );
        // At the deadline: timed out, with the age and the polls.
        let d = after_poll(ticket(), Ok(answer), at(3600), &polling());
        assert_eq!(d.outcome, PollResult::Processing);
        assert_eq!(
            d.step,
            failed(
                FailureCode::TimedOut,
                "the task did not finish within 1h (polled 4 times)"
            )
        );
    }

    #[test]
    fn errors_decide_the_ticket() {
        let now = at(20);
        let backoff = |attempt, retry_after| PollStep::Again {
            next: NextPoll::Backoff {
                attempt,
                retry_after,
            },
            progress: None,
        };
        // (error, errors before, errors after, gate, step)
        let table: Vec<(UpstreamError, u32, u32, GateEffect, PollStep)> = vec![
            (transient(None), 0, 1, GateEffect::Keep, backoff(0, None)),
            (
                transient(Some(S(20))),
                2,
                3,
                GateEffect::Keep,
                backoff(2, Some(S(20))),
            ),
            (
                UpstreamError::RateLimited {
                    detail: "429".into(),
                    retry_after: Some(S(7)),
                },
                0,
                1,
                GateEffect::Keep,
                backoff(0, Some(S(7))),
            ),
            (
                UpstreamError::Billing {
                    reason: "balance".into(),
                },
                1,
                2,
                GateEffect::Keep,
                backoff(1, None),
            ),
            (
                UpstreamError::Unconfirmed {
                    status: 200,
                    excerpt: "{}".into(),
                },
                0,
                1,
                GateEffect::Keep,
                backoff(0, None),
            ),
            (UpstreamError::NotSent, 0, 1, GateEffect::Keep, backoff(0, None)),
            (
                UpstreamError::KeyRejected {
                    status: 401,
                    reason: "INVALID_API_KEY".into(),
                },
                3,
                3,
                GateEffect::CloseForKey,
                backoff(2, None),
            ),
            (
                UpstreamError::TaskFailed {
                    message: "the task failed".into(),
                },
                0,
                0,
                GateEffect::Keep,
                failed(FailureCode::UpstreamFailed, "the task failed"),
            ),
            (
                UpstreamError::Rejected {
                    status: 400,
                    reason: "BAD".into(),
                    message: "no".into(),
                },
                8,
                9,
                GateEffect::Keep,
                backoff(8, None),
            ),
            (
                UpstreamError::Unusable {
                    detail: "too big".into(),
                },
                9,
                10,
                GateEffect::Keep,
                failed(
                    FailureCode::UpstreamFailed,
                    "the upstream keeps refusing to report the task: the upstream's answer cannot be used: too big",
                ),
            ),
        ];
        for (err, before, after, gate, step) in table {
            let label = err.to_string();
            let mut t = ticket();
            t.errors = before;
            let d = after_poll(t, Err(err), now, &polling());
            assert_eq!(d.outcome, PollResult::Error, "{label}");
            assert_eq!(d.gate, gate, "{label}");
            assert_eq!(d.step, step, "{label}");
            assert_eq!(d.ticket.errors, after, "{label}");
            assert_eq!(d.ticket.polls, 4, "{label}");
        }
    }

    #[test]
    fn a_task_is_given_up_as_lost_after_five_404s_and_a_minute() {
        let not_found = || {
            Err(UpstreamError::NotFound {
                message: "no such task".into(),
            })
        };
        let lost = failed(
            FailureCode::UpstreamFailed,
            "the upstream no longer knows the task (no such task)",
        );
        // (404s before, seconds since submission, finished)
        for (before, age, gives_up) in [
            (0, 120, false),
            (3, 120, false),
            (4, 120, true),
            (4, 59, false),
            (4, 60, true),
            (9, 30, false),
        ] {
            let mut t = ticket();
            t.not_found = before;
            let d = after_poll(t, not_found(), at(age), &polling());
            assert_eq!(d.ticket.not_found, before + 1);
            assert_eq!(d.ticket.errors, 0);
            assert_eq!(d.step == lost, gives_up, "{before} {age}");
        }
    }

    #[test]
    fn errors_past_the_deadline_time_out_except_a_refused_key() {
        let past = at(3601);
        let d = after_poll(ticket(), Err(transient(None)), past, &polling());
        assert!(
            matches!(
                &d.step,
                PollStep::Finish(Terminal::Failed {
                    code: FailureCode::TimedOut,
                    ..
                })
            ),
            "{:?}",
            d.step
        );
        let d = after_poll(
            ticket(),
            Err(UpstreamError::KeyRejected {
                status: 403,
                reason: "FORBIDDEN".into(),
            }),
            past,
            &polling(),
        );
        assert!(matches!(d.step, PollStep::Again { .. }), "{:?}", d.step);
    }

    #[test]
    fn the_gate_decides_whether_a_request_is_created() {
        let closed = |refusal| GateState::Closed {
            refusal,
            reason: String::new(),
            retry_at: tokio::time::Instant::now(),
        };
        assert_eq!(at_gate(&GateState::Open), GateStep::Go);
        assert_eq!(at_gate(&closed(Refusal::Key)), GateStep::HandBack);
        assert_eq!(at_gate(&closed(Refusal::Unavailable)), GateStep::HandBack);
        assert_eq!(at_gate(&closed(Refusal::Billing)), GateStep::Wait);
        assert_eq!(at_gate(&closed(Refusal::Unconfirmed)), GateStep::Wait);
    }

    #[test]
    fn failed_creates_decide_the_request() {
        use RetryError::{Cancelled, Exhausted, Fatal};
        let up = CreateError::Upstream;
        let key = || {
            up(UpstreamError::KeyRejected {
                status: 401,
                reason: "INVALID_API_KEY".into(),
            })
        };
        let limited = || {
            up(UpstreamError::RateLimited {
                detail: "HTTP 429".into(),
                retry_after: None,
            })
        };
        let table: Vec<(RetryError<CreateError>, CreateStep)> = vec![
            (Fatal(CreateError::NotSent), CreateStep::NotSent),
            (Exhausted(CreateError::NotSent), CreateStep::NotSent),
            (Fatal(CreateError::Cancelled), CreateStep::Abandon),
            (Exhausted(CreateError::Cancelled), CreateStep::Abandon),
            (Cancelled(up(transient(None))), CreateStep::Abandon),
            (Cancelled(CreateError::NotSent), CreateStep::Abandon),
            (
                Exhausted(up(transient(None))),
                CreateStep::HandBack {
                    close: Some(Refusal::Unavailable),
                    detail: "transient upstream error: HTTP 503".into(),
                },
            ),
            (
                Exhausted(limited()),
                CreateStep::HandBack {
                    close: None,
                    detail: "the upstream's rate limit: HTTP 429".into(),
                },
            ),
            (
                Fatal(key()),
                CreateStep::HandBack {
                    close: Some(Refusal::Key),
                    detail: "upstream refused the API key: HTTP 401 INVALID_API_KEY".into(),
                },
            ),
            (
                Fatal(up(UpstreamError::Billing {
                    reason: "NOT_ENOUGH_BALANCE".into(),
                })),
                CreateStep::WaitForBalance {
                    detail: "upstream refused for billing: NOT_ENOUGH_BALANCE".into(),
                },
            ),
            (
                Fatal(up(UpstreamError::Unconfirmed {
                    status: 200,
                    excerpt: "{\"ok\":true}".into(),
                })),
                CreateStep::Refuse {
                    code: FailureCode::UpstreamUnconfirmed,
                    message: "the upstream answered the create with HTTP 200 but no readable task id: {\"ok\":true}; a task may have been created and billed, so the request is not created again".into(),
                    outcome: RequestOutcome::UpstreamUnconfirmed,
                },
            ),
            (
                Fatal(up(UpstreamError::Rejected {
                    status: 400,
                    reason: "ILLEGAL_PROMPT".into(),
                    message: "no".into(),
                })),
                CreateStep::Refuse {
                    code: FailureCode::UpstreamRejected,
                    message: "HTTP 400 ILLEGAL_PROMPT: no".into(),
                    outcome: RequestOutcome::UpstreamRejected,
                },
            ),
            (
                Fatal(up(UpstreamError::NotFound {
                    message: "no route".into(),
                })),
                CreateStep::Refuse {
                    code: FailureCode::UpstreamRejected,
                    message: "upstream does not know the task: no route".into(),
                    outcome: RequestOutcome::UpstreamRejected,
                },
            ),
        ];
        for (failure, step) in table {
            let label = format!("{failure:?}");
            assert_eq!(after_create(failure), step, "{label}");
        }
    }

    #[test]
    fn refusal_messages_leave_out_what_is_empty() {
        assert_eq!(rejected_message(400, "R", "m"), "HTTP 400 R: m");
        assert_eq!(rejected_message(400, "R", ""), "HTTP 400 R");
        assert_eq!(rejected_message(400, "", "m"), "HTTP 400: m");
        assert_eq!(rejected_message(400, "", ""), "HTTP 400");
    }

    proptest! {
        /// The poll schedule stays within its bounds, follows the eta when
        /// there is one, never schedules past the deadline, and the backoff
        /// honours Retry-After within the longest interval.
        #[test]
        fn the_poll_schedule_stays_within_its_bounds(
            min_ms in 100u64..5_000,
            extra_ms in 0u64..120_000,
            eta_ms in proptest::option::of(0u64..10_000_000),
            age_s in 0i64..7_200,
            attempt in 0u32..80,
            retry_after_ms in proptest::option::of(0u64..1_000_000),
        ) {
            let polling = PollingSettings {
                min_interval: Duration::from_millis(min_ms),
                max_interval: Duration::from_millis(min_ms + extra_ms),
                ..PollingSettings::default()
            };
            let eta = eta_ms.map(Duration::from_millis);
            let age = S(u64::try_from(age_s).unwrap_or(0));
            let d = next_delay(&polling, eta, age);
            prop_assert!(d >= polling.min_interval && d <= polling.max_interval);
            if let Some(eta) = eta {
                prop_assert_eq!(d, eta.clamp(polling.min_interval, polling.max_interval));
            }
            let policy = crate::retry::RetryPolicy { initial: Duration::from_millis(500), max: S(30) };
            let retry_after = retry_after_ms.map(Duration::from_millis);
            let e = error_delay(&polling, policy, attempt, retry_after);
            let longest = polling.max_interval.max(policy.max);
            prop_assert!(e >= polling.min_interval && e <= longest);
            if let Some(r) = retry_after {
                prop_assert!(e >= r.min(longest));
            }
            // Whatever the answer says, the next poll is never past the deadline.
            let mut answer = result(TaskStatus::Processing);
            answer.eta = eta;
            let now = at(age_s);
            let decision = after_poll(ticket(), Ok(answer), now, &polling);
            match decision.step {
                PollStep::Again { next: NextPoll::At(next), .. } => {
                    prop_assert!(next <= ticket().deadline && next > now);
                }
                PollStep::Finish(_) => prop_assert!(now >= ticket().deadline),
                PollStep::Again { .. } => prop_assert!(false, "a running task backs off"),
            }
        }
    }

    #[test]
    fn a_ticket_no_key_verifies_is_kept_with_growing_delays_then_given_up() {
        let now = at(1_000_000);
        let max_age = Duration::from_secs(72 * 3600);
        let s = Duration::from_secs;
        // (kept for, hops so far, step)
        let cases = [
            (0, 0, UnverifiedStep::Keep(s(2))),
            (0, 1, UnverifiedStep::Keep(s(4))),
            (60, 5, UnverifiedStep::Keep(s(64))),
            (3600, 9, UnverifiedStep::Keep(s(1024))),
            (3600, 40, UnverifiedStep::Keep(s(1024))),
            (72 * 3600 - 1, 200, UnverifiedStep::Keep(s(1024))),
            (72 * 3600, 0, UnverifiedStep::GiveUp),
            (100 * 3600, 3, UnverifiedStep::GiveUp),
        ];
        for (kept, hops, want) in cases {
            let since = now - chrono::Duration::seconds(kept);
            assert_eq!(
                after_unverified(since, hops, now, max_age),
                want,
                "kept {kept} s, {hops} hops"
            );
        }
        // A `since` in the future (written by someone) counts as now.
        assert_eq!(
            after_unverified(now + chrono::Duration::days(9), 0, now, max_age),
            UnverifiedStep::Keep(s(2))
        );
    }
}
