//! Tracking: durable tickets that follow an upstream task to its end.
//!
//! After a task is created, everything needed to finish the request lives in
//! a small JSON ticket in the broker, never in a worker's memory. A ticket
//! waits in the fixed-delay wait queues (dead-lettering at-least-once into
//! the tracking queue), any worker picks it up when due, polls the task once,
//! and either publishes the terminal event or parks the ticket again with
//! the next delay, taken from the upstream's `eta` when it gives one. A
//! killed worker loses nothing: its unacknowledged tickets are redelivered.
//! This module never creates upstream tasks.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::{message::Delivery, BasicProperties};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::{
    broker::{self, DELIVERY_COUNT_HEADER},
    config::PollingSettings,
    events::{self, EventKind, FailureCode, RequestContext},
    gate::{GateState, Refusal},
    request::{self, RequestId},
    retry::RetryPolicy,
    signing::{SignatureError, SIGNATURE_HEADER},
    upstream::{valid_task_id, TaskResult, TaskStatus, UpstreamError},
    worker::{Disposition, Shared},
};

/// Ticket format version.
pub const TICKET_VERSION: u8 = 1;
/// AMQP `type` of ticket messages.
pub const TICKET_TYPE: &str = "vidu-worker.ticket.v1";
/// Consecutive 404s (over at least [`NOT_FOUND_GRACE`]) after which a task
/// is given up as lost upstream.
pub const MAX_NOT_FOUND: u32 = 5;
/// How long after submission a 404 may still be the upstream catching up.
pub const NOT_FOUND_GRACE: Duration = Duration::from_secs(60);
/// Consecutive non-retryable poll errors after which the task is given up.
pub const MAX_POLL_REJECTIONS: u32 = 10;
/// How long a ticket is held while the broker refuses its next copy or its
/// terminal event, retrying, before the worker gives up on this delivery.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// Everything needed to finish one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ticket {
    /// Format version.
    pub v: u8,
    /// The request id.
    pub request_id: RequestId,
    /// The upstream task id.
    pub task_id: String,
    /// Model name.
    pub model: String,
    /// Producer metadata, byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Box<RawValue>>,
    /// AMQP correlation id of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// AMQP reply-to of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// W3C trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// When a worker first took the request.
    pub received_at: DateTime<Utc>,
    /// When the upstream accepted the task.
    pub submitted_at: DateTime<Utc>,
    /// When the task is given up as `timed_out`.
    pub deadline: DateTime<Utc>,
    /// When the next poll is due.
    pub next_poll_at: DateTime<Utc>,
    /// Polls so far.
    #[serde(default)]
    pub polls: u32,
    /// Consecutive transient poll errors.
    #[serde(default)]
    pub errors: u32,
    /// Consecutive 404 answers.
    #[serde(default)]
    pub not_found: u32,
    /// Last reported status (`queued`/`processing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<String>,
    /// Last reported progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress: Option<u8>,
}

impl Ticket {
    /// The shared part of this request's events.
    pub fn context(&self) -> RequestContext<'_> {
        RequestContext {
            request_id: &self.request_id,
            metadata: self.metadata.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            reply_to: self.reply_to.as_deref(),
            traceparent: self.traceparent.as_deref(),
        }
    }

    /// AMQP properties of a ticket message whose body signs as `signature`.
    pub fn properties(signature: String) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            SIGNATURE_HEADER.into(),
            AMQPValue::LongString(LongString::from(signature)),
        );
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(TICKET_TYPE.into())
            .with_headers(headers)
    }

    /// Checks every field with the rules a request's meet, so that what a
    /// ticket says can go into a poll and into events as it is.
    pub fn validate(&self, request_queue: &str) -> Result<(), String> {
        if self.v != TICKET_VERSION {
            return Err(format!("version {} is not {TICKET_VERSION}", self.v));
        }
        if !valid_task_id(&self.task_id) {
            return Err("task_id is not 1 to 128 printable characters".into());
        }
        if self.model != request::MODEL {
            return Err("model is not one this worker serves".into());
        }
        if let Some(m) = &self.metadata {
            if !m.get().starts_with('{') || m.get().len() > request::MAX_METADATA_BYTES {
                return Err("metadata is not an object of at most 16 KiB".into());
            }
        }
        if let Some(c) = &self.correlation_id {
            request::check_correlation_id(c).map_err(|e| format!("correlation_id {e}"))?;
        }
        if let Some(r) = &self.reply_to {
            request::check_reply_to(r, request_queue).map_err(|e| format!("reply_to: {e}"))?;
        }
        if self
            .traceparent
            .as_deref()
            .is_some_and(|t| !events::is_traceparent(t))
        {
            return Err("traceparent is malformed".into());
        }
        let longest = chrono::Duration::days(31);
        if self.received_at > self.submitted_at
            || self.deadline < self.submitted_at
            || self.deadline - self.submitted_at > longest
            || self.next_poll_at - self.submitted_at > longest
        {
            return Err("its times are out of order or span more than 31 days".into());
        }
        if self
            .last_status
            .as_deref()
            .is_some_and(|s| !matches!(s, "queued" | "processing"))
            || self.last_progress.is_some_and(|p| p > 100)
        {
            return Err("last_status or last_progress is out of range".into());
        }
        Ok(())
    }
}

/// Largest ticket read; a larger message on a tracking queue is not ours.
pub const MAX_TICKET_BYTES: usize = 64 * 1024;

/// Why a message on a tracking queue is not acted on.
fn refusal(shared: &Shared, delivery: &Delivery) -> Result<Ticket, (&'static str, String)> {
    if delivery.data.len() > MAX_TICKET_BYTES {
        return Err((
            "oversized",
            format!(
                "{} bytes, more than a ticket's {MAX_TICKET_BYTES}",
                delivery.data.len()
            ),
        ));
    }
    let signature = broker::header_str(&delivery.properties, SIGNATURE_HEADER);
    if let Err(e) = shared.signer.verify(&delivery.data, signature) {
        if !(shared.settings.tickets.accept_unsigned && signature.is_none()) {
            let reason = match e {
                SignatureError::Missing => "unsigned",
                SignatureError::Malformed | SignatureError::Invalid => "forged",
            };
            return Err((reason, e.to_string()));
        }
    }
    let ticket: Ticket = serde_json::from_slice(&delivery.data).map_err(|e| {
        // serde's words may quote the message: shortened, control
        // characters dropped.
        (
            "invalid",
            format!(
                "not a tracking ticket: {}",
                crate::upstream::clean_text(&e.to_string(), 200)
            ),
        )
    })?;
    ticket
        .validate(&shared.topology.request_queue)
        .map_err(|e| ("invalid", e))?;
    Ok(ticket)
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

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn status_name(status: &TaskStatus) -> Option<&'static str> {
    match status {
        TaskStatus::Queued => Some("queued"),
        TaskStatus::Processing => Some("processing"),
        _ => None,
    }
}

/// Parks a ticket until `next_poll_at`, in the longest wait queue that fits
/// (or straight in the tracking queue when it is due now).
pub(crate) async fn park(shared: &Shared, ticket: &Ticket) -> Result<(), broker::PublishError> {
    let remaining = (ticket.next_poll_at - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    let queue = shared
        .topology
        .wait_queue_for(remaining)
        .map_or(shared.topology.tracking_queue.as_str(), |(_, q)| q.as_str());
    let body = serde_json::to_vec(ticket).unwrap_or_default();
    let signature = shared.signer.sign(&body);
    shared
        .publish("", queue, &body, Ticket::properties(signature), true)
        .await?;
    shared.metrics.ticket_hop();
    Ok(())
}

/// Handles one delivery from the tracking queue.
#[tracing::instrument(name = "ticket", skip_all, fields(request_id, task_id))]
pub(crate) async fn handle(shared: &Shared, delivery: &Delivery) -> Disposition {
    let mut ticket = match refusal(shared, delivery) {
        Ok(t) => t,
        Err((reason, why)) => {
            // Not written by this deployment, or not valid: no poll, no
            // event, only the dead-letter copy saying why.
            shared.metrics.ticket_rejected(reason);
            tracing::warn!(reason, problem = %why, "dead-lettering a message on a tracking queue that is not one of this deployment's tickets");
            let why = format!("not a ticket of this deployment ({reason}): {why}");
            return match shared.dead_letter(delivery, &why, None).await {
                Ok(()) => Disposition::Ack,
                Err(_) => Disposition::Requeue,
            };
        }
    };
    let span = tracing::Span::current();
    span.record("request_id", ticket.request_id.as_str());
    span.record("task_id", ticket.task_id.as_str());

    if delivery.redelivered {
        if let Some(count) = broker::header_int(&delivery.properties, DELIVERY_COUNT_HEADER) {
            if count >= i64::from(shared.settings.amqp.max_deliveries) {
                return poison(shared, delivery, &ticket, count).await;
            }
        }
    }

    let remaining = (ticket.next_poll_at - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    if shared.topology.wait_queue_for(remaining).is_some() {
        // Not due for a while: another hop.
        return park_patiently(shared, &ticket).await;
    }
    if !remaining.is_zero() {
        // Due within the shortest tier: wait here, holding the ticket.
        tokio::select! {
            () = shared.shutdown.cancelled() => return Disposition::Abandon,
            () = tokio::time::sleep(remaining) => {}
        }
    }
    let now = Utc::now();

    if let GateState::Closed {
        refusal: Refusal::Key,
        retry_at,
        ..
    } = shared.gate.state()
    {
        // Polling with a refused key only adds noise; wait for the gate.
        let wait = retry_at
            .saturating_duration_since(tokio::time::Instant::now())
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        ticket.next_poll_at = now + to_chrono(wait);
        return park_patiently(shared, &ticket).await;
    }

    let result = shared
        .upstream
        .task_result(&ticket.task_id, ticket.traceparent.as_deref())
        .await;
    ticket.polls += 1;
    match result {
        Ok(result) => {
            ticket.errors = 0;
            ticket.not_found = 0;
            shared.gate.open();
            on_result(shared, ticket, result).await
        }
        Err(err) => on_error(shared, ticket, err).await,
    }
}

/// Parks the ticket's next copy, retrying while the broker refuses it (the
/// ticket stays held meanwhile, so the task is not polled again); hands it
/// back only when that lasts longer than [`PUBLISH_PATIENCE`].
async fn park_patiently(shared: &Shared, ticket: &Ticket) -> Disposition {
    match shared
        .patiently(PUBLISH_PATIENCE, || park(shared, ticket))
        .await
    {
        Ok(()) => Disposition::Ack,
        Err(e) => {
            tracing::warn!(error = %e, "could not park the ticket; handing it back");
            Disposition::Requeue
        }
    }
}

async fn on_result(shared: &Shared, mut ticket: Ticket, result: TaskResult) -> Disposition {
    let now = Utc::now();
    match result.status {
        TaskStatus::Succeeded if result.bad_video.is_some() => {
            shared.metrics.poll("failed");
            let message = format!(
                "the upstream reported the task done with {}; the video is not handed to consumers",
                result.bad_video.as_deref().unwrap_or("an unusable video")
            );
            fail(shared, &ticket, FailureCode::UpstreamFailed, &message).await
        }
        TaskStatus::Succeeded if !result.videos.is_empty() => {
            shared.metrics.poll("succeeded");
            let kind = EventKind::Succeeded {
                task_id: &ticket.task_id,
                videos: &result.videos,
                submitted_at: ticket.submitted_at,
                completed_at: now,
            };
            finish(shared, &ticket, &kind).await
        }
        TaskStatus::Failed => {
            shared.metrics.poll("failed");
            let message = result.reason.unwrap_or_else(|| {
                "the upstream reported the task as failed without a reason".into()
            });
            fail(shared, &ticket, FailureCode::UpstreamFailed, &message).await
        }
        status => {
            if status == TaskStatus::Succeeded {
                tracing::warn!(
                    "the upstream reports success without a video URL; looking again later"
                );
            }
            shared
                .metrics
                .poll(status_name(&status).unwrap_or("unknown"));
            if now >= ticket.deadline {
                return time_out(shared, &ticket).await;
            }
            if let Some(name) = status_name(&status) {
                let changed = ticket.last_status.as_deref() != Some(name)
                    || ticket.last_progress != result.progress_percent;
                if changed {
                    let kind = EventKind::Progress {
                        task_id: &ticket.task_id,
                        status: name,
                        progress_percent: result.progress_percent,
                        eta_seconds: result.eta.map(|e| e.as_secs_f64().ceil() as u64),
                    };
                    let event =
                        events::build(&shared.settings.events.source, &ticket.context(), &kind);
                    match shared.publish_event(&event).await {
                        Ok(()) => {
                            ticket.last_status = Some(name.to_owned());
                            ticket.last_progress = result.progress_percent;
                        }
                        // Not worth holding the ticket for: the next poll
                        // tries again (the ticket still has the old state).
                        Err(e) => {
                            tracing::warn!(error = %e, "could not publish a progress event; trying again at the next poll");
                        }
                    }
                }
            }
            let age = (now - ticket.submitted_at)
                .to_std()
                .unwrap_or(Duration::ZERO);
            let delay = next_delay(&shared.settings.polling, result.eta, age);
            ticket.next_poll_at = (now + to_chrono(delay)).min(ticket.deadline);
            park_patiently(shared, &ticket).await
        }
    }
}

async fn on_error(shared: &Shared, mut ticket: Ticket, err: UpstreamError) -> Disposition {
    shared.metrics.poll("error");
    let now = Utc::now();
    let retry_after = match &err {
        UpstreamError::TaskFailed { message } => {
            return fail(shared, &ticket, FailureCode::UpstreamFailed, message).await;
        }
        UpstreamError::KeyRejected { .. } => {
            shared.gate.close(Refusal::Key, &err.to_string());
            None
        }
        UpstreamError::Billing { .. } => {
            // Reading a result needs no balance; treat it like a hiccup.
            ticket.errors += 1;
            None
        }
        UpstreamError::NotFound { message } => {
            ticket.not_found += 1;
            let age = (now - ticket.submitted_at)
                .to_std()
                .unwrap_or(Duration::ZERO);
            if ticket.not_found >= MAX_NOT_FOUND && age >= NOT_FOUND_GRACE {
                let message = format!("the upstream no longer knows the task ({message})");
                return fail(shared, &ticket, FailureCode::UpstreamFailed, &message).await;
            }
            None
        }
        UpstreamError::Rejected { .. } | UpstreamError::Unusable { .. } => {
            ticket.errors += 1;
            if ticket.errors >= MAX_POLL_REJECTIONS {
                let message = format!("the upstream keeps refusing to report the task: {err}");
                return fail(shared, &ticket, FailureCode::UpstreamFailed, &message).await;
            }
            None
        }
        UpstreamError::Transient { retry_after, .. }
        | UpstreamError::RateLimited { retry_after, .. } => {
            ticket.errors += 1;
            *retry_after
        }
        // Create-only answers; a poll that somehow meets one retries later.
        UpstreamError::Unconfirmed { .. } | UpstreamError::NotSent => {
            ticket.errors += 1;
            None
        }
    };
    tracing::debug!(error = %err, errors = ticket.errors, "poll failed; trying again later");
    if now >= ticket.deadline && !matches!(err, UpstreamError::KeyRejected { .. }) {
        return time_out(shared, &ticket).await;
    }
    let delay = error_delay(
        &shared.settings.polling,
        shared.retry_policy(),
        ticket.errors.saturating_sub(1),
        retry_after,
    );
    ticket.next_poll_at = now + to_chrono(delay);
    park_patiently(shared, &ticket).await
}

async fn time_out(shared: &Shared, ticket: &Ticket) -> Disposition {
    let age = (Utc::now() - ticket.submitted_at)
        .to_std()
        .unwrap_or(Duration::ZERO);
    let message = format!(
        "the task did not finish within {} (polled {} times)",
        humantime::format_duration(Duration::from_secs(age.as_secs())),
        ticket.polls
    );
    fail(shared, ticket, FailureCode::TimedOut, &message).await
}

async fn fail(shared: &Shared, ticket: &Ticket, code: FailureCode, message: &str) -> Disposition {
    let kind = EventKind::Failed {
        task_id: Some(&ticket.task_id),
        code,
        message,
    };
    finish(shared, ticket, &kind).await
}

/// Publishes the terminal event, retrying while the broker refuses it (the
/// ticket stays held and unacknowledged meanwhile). When that lasts longer
/// than [`PUBLISH_PATIENCE`], the ticket is parked again to be polled later
/// (and the event tried again then) rather than handed back at once, which
/// would poll the task again immediately.
async fn finish(shared: &Shared, ticket: &Ticket, kind: &EventKind<'_>) -> Disposition {
    let event = events::build(&shared.settings.events.source, &ticket.context(), kind);
    match shared
        .patiently(PUBLISH_PATIENCE, || shared.publish_event(&event))
        .await
    {
        Ok(()) => {
            let latency = (Utc::now() - ticket.received_at)
                .to_std()
                .unwrap_or(Duration::ZERO);
            shared.metrics.observe_latency(latency.as_secs_f64());
            tracing::info!(
                outcome = event.event_type,
                polls = ticket.polls,
                latency_ms = latency.as_millis() as u64,
                "request finished"
            );
            Disposition::Ack
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not publish the terminal event; parking the ticket to try again later");
            let mut again = ticket.clone();
            again.errors += 1;
            let delay = error_delay(
                &shared.settings.polling,
                shared.retry_policy(),
                again.errors.saturating_sub(1),
                None,
            );
            again.next_poll_at = Utc::now() + to_chrono(delay);
            park_patiently(shared, &again).await
        }
    }
}

async fn poison(shared: &Shared, delivery: &Delivery, ticket: &Ticket, count: i64) -> Disposition {
    let message = format!(
        "tracking stopped: handling this ticket failed {count} times in a row (amqp.max_deliveries)"
    );
    tracing::error!(
        deliveries = count,
        "dead-lettering a ticket that keeps failing"
    );
    let why = format!("poison: {message}");
    if shared.dead_letter(delivery, &why, None).await.is_err() {
        return Disposition::Requeue;
    }
    fail(shared, ticket, FailureCode::UpstreamFailed, &message).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polling() -> PollingSettings {
        PollingSettings {
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            ..PollingSettings::default()
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

    #[test]
    fn tickets_round_trip_and_tolerate_missing_counters() {
        let json = r#"{"v":1,"request_id":"r-1","task_id":"t-1","model":"vidu-q3-pro-i2v",
            "metadata":{"a":1},"received_at":"2026-01-01T00:00:00Z","submitted_at":"2026-01-01T00:00:01Z",
            "deadline":"2026-01-01T02:00:01Z","next_poll_at":"2026-01-01T00:00:02Z"}"#;
        let t: Ticket = serde_json::from_str(json).expect("ticket");
        assert_eq!(t.polls, 0);
        assert_eq!(t.metadata.as_ref().map(|m| m.get()), Some(r#"{"a":1}"#));
        let back: Ticket =
            serde_json::from_slice(&serde_json::to_vec(&t).expect("ser")).expect("de");
        assert_eq!(back.task_id, "t-1");
    }
}
