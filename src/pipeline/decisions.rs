//! The pipeline's decisions, as plain functions over plain data.
//!
//! What a poll answer or a poll error does to a ticket ([`after_poll`]),
//! what the gate's state does to a request about to be created
//! ([`at_gate`]), and what a failed create does to its request
//! ([`after_create`]). Each takes values and returns a value that says what
//! happens next (park with this delay, publish this terminal event, hand
//! back, dead-letter with this reason); the handlers in `intake` and
//! `tracking` carry it out. Nothing here waits, publishes or calls the
//! upstream, so every branch is unit-tested without a broker.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ticket::{next_delay, to_chrono, Ticket};
use crate::{
    config::PollingSettings,
    events::FailureCode,
    gate::{GateState, Refusal},
    retry::{self, RetryError},
    upstream::{TaskResult, TaskStatus, UpstreamError, Video},
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
    pub status: &'static str,
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
    /// ([`super::ticket::error_delay`]).
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
    /// `vidu_worker_polls_total{outcome}`.
    pub outcome: &'static str,
    /// What the answer says about the upstream.
    pub gate: GateEffect,
    /// What to do.
    pub step: PollStep,
}

/// The name a running state is reported under, if it is one.
pub fn running_status(status: &TaskStatus) -> Option<&'static str> {
    match status {
        TaskStatus::Queued => Some("queued"),
        TaskStatus::Processing => Some("processing"),
        _ => None,
    }
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
                outcome: "error",
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
) -> (&'static str, PollStep) {
    match result.status {
        TaskStatus::Succeeded if result.bad_video.is_some() => (
            "failed",
            upstream_failed(format!(
                "the upstream reported the task done with {}; the video is not handed to consumers",
                result.bad_video.as_deref().unwrap_or("an unusable video")
            )),
        ),
        TaskStatus::Succeeded if !result.videos.is_empty() => (
            "succeeded",
            PollStep::Finish(Terminal::Succeeded(result.videos)),
        ),
        TaskStatus::Failed => (
            "failed",
            upstream_failed(result.reason.unwrap_or_else(|| {
                "the upstream reported the task as failed without a reason".into()
            })),
        ),
        // Still running (or a success without a video: looked at again).
        status => {
            let name = running_status(&status);
            let outcome = name.unwrap_or("unknown");
            if now >= ticket.deadline {
                return (outcome, PollStep::Finish(timed_out(ticket, now)));
            }
            let progress = name
                .filter(|name| {
                    ticket.last_status.as_deref() != Some(*name)
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
}

impl retry::Transient for CreateError {
    fn retry_hint(&self) -> retry::RetryHint {
        match self {
            Self::Upstream(e) => e.retry_hint(),
            Self::NotSent | Self::Cancelled => retry::RetryHint::Never,
        }
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
    /// Fail the request and dead-letter it; the upstream served the call,
    /// so the gate opens.
    Refuse {
        /// The failure code of the event.
        code: FailureCode,
        /// The event's message and the dead-letter reason.
        message: String,
        /// `vidu_worker_requests_received_total{outcome}`.
        outcome: &'static str,
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
                outcome: "upstream_unconfirmed",
            },
            UpstreamError::Rejected {
                status,
                reason,
                message,
            } => CreateStep::Refuse {
                code: FailureCode::UpstreamRejected,
                message: rejected_message(status, &reason, &message),
                outcome: "upstream_rejected",
            },
            other => CreateStep::Refuse {
                code: FailureCode::UpstreamRejected,
                message: other.to_string(),
                outcome: "upstream_rejected",
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
            task_id: "t-1".into(),
            model: crate::model::Model::DEFAULT.as_str().into(),
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
                    progress: Some(progress("queued", Some(0), None)),
                },
            ),
            (
                eta,
                "processing",
                PollStep::Again {
                    next: NextPoll::At(at(38)),
                    progress: Some(progress("processing", Some(40), Some(18))),
                },
            ),
        ];
        for (answer, outcome, step) in table {
            let mut before = ticket();
            before.errors = 4;
            before.not_found = 2;
            let d = after_poll(before, Ok(answer), now, &polling());
            assert_eq!(d.outcome, outcome);
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
        same.last_status = Some("processing".into());
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
        assert_eq!(again(d).map(|p| p.status), Some("queued"));
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
                    status: "processing",
                    percent: None,
                    eta_seconds: Some(600)
                })
            }
        );
        // At the deadline: timed out, with the age and the polls.
        let d = after_poll(ticket(), Ok(answer), at(3600), &polling());
        assert_eq!(d.outcome, "processing");
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
            assert_eq!(d.outcome, "error", "{label}");
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
                    outcome: "upstream_unconfirmed",
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
                    outcome: "upstream_rejected",
                },
            ),
            (
                Fatal(up(UpstreamError::NotFound {
                    message: "no route".into(),
                })),
                CreateStep::Refuse {
                    code: FailureCode::UpstreamRejected,
                    message: "upstream does not know the task: no route".into(),
                    outcome: "upstream_rejected",
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
            let e = super::super::ticket::error_delay(&polling, policy, attempt, retry_after);
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
