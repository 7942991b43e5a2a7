//! Intake: turns one request message into an upstream task and a ticket.
//!
//! For each delivery from the request queue: refuse poison and invalid
//! requests (failed event plus a dead-lettered copy with `x-vidu-error`),
//! wait at the upstream gate, create the task with retries, then record the
//! tracking ticket and the `submitted` event, both publisher-confirmed,
//! before the request is acknowledged. The create call is the one step that
//! must not repeat; the code between its answer and the request's ack is
//! kept as short as possible (that is the documented double-spend window),
//! and intake cannot be paused inside it (the intake lock).

use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;
use tokio::time::Instant;

use crate::{
    broker::{self, DELIVERY_COUNT_HEADER, TRACEPARENT_HEADER},
    events::{self, EventKind, FailureCode, RequestContext},
    gate::{ProbeClaim, Refusal, Turn},
    request::{self, GenerationRequest, MessageProps, RequestId},
    retry::{self, RetryError, RetryHint, Transient},
    tracking::{self, Ticket, TICKET_VERSION},
    upstream::UpstreamError,
    worker::{settle, Disposition, Shared},
};

/// How long the worker keeps trying to record a ticket for a task the
/// upstream already accepted (across broker reconnects) before giving up.
const TICKET_PATIENCE: Duration = Duration::from_secs(120);

/// Handles one delivery from the request queue.
#[tracing::instrument(name = "request", skip_all, fields(request_id, task_id))]
pub(crate) async fn handle(shared: &Shared, delivery: &Delivery) -> Disposition {
    let props = &delivery.properties;
    let message_props = MessageProps {
        message_id: props.message_id().as_ref().map(|s| s.as_str()),
        content_type: props.content_type().as_ref().map(|s| s.as_str()),
        content_encoding: props.content_encoding().as_ref().map(|s| s.as_str()),
    };
    let traceparent = broker::header_str(props, TRACEPARENT_HEADER).and_then(continue_trace);

    if delivery.redelivered {
        if let Some(count) = broker::header_int(props, DELIVERY_COUNT_HEADER) {
            if count >= i64::from(shared.settings.amqp.max_deliveries) {
                return poison(
                    shared,
                    delivery,
                    message_props,
                    traceparent.as_deref(),
                    count,
                )
                .await;
            }
        }
    }

    match request::parse(&delivery.data, message_props) {
        Ok(req) => {
            tracing::Span::current().record("request_id", req.request_id.as_str());
            submit(shared, delivery, req, traceparent).await
        }
        Err(invalid) => {
            tracing::Span::current().record("request_id", invalid.request_id.as_str());
            tracing::info!(field = %invalid.field, problem = %invalid.message, "rejecting an invalid request");
            shared.metrics.request("invalid");
            let message = invalid.to_string();
            refuse(
                shared,
                delivery,
                Refused {
                    request_id: &invalid.request_id,
                    metadata: invalid.metadata.as_deref(),
                    code: FailureCode::InvalidRequest,
                    message: &message,
                    traceparent: traceparent.as_deref(),
                },
            )
            .await
        }
    }
}

/// What a refused request's failed event and dead-letter copy say.
struct Refused<'a> {
    request_id: &'a RequestId,
    metadata: Option<&'a serde_json::value::RawValue>,
    code: FailureCode,
    message: &'a str,
    traceparent: Option<&'a str>,
}

/// Dead-letters the message with `x-vidu-error` and publishes the failed
/// event; acknowledges only when both are confirmed.
async fn refuse(shared: &Shared, delivery: &Delivery, r: Refused<'_>) -> Disposition {
    let props = &delivery.properties;
    let ctx = RequestContext {
        request_id: r.request_id,
        metadata: r.metadata,
        correlation_id: props.correlation_id().as_ref().map(|s| s.as_str()),
        reply_to: props.reply_to().as_ref().map(|s| s.as_str()),
        traceparent: r.traceparent,
    };
    let event = events::build(
        &shared.settings.events.source,
        &ctx,
        &EventKind::Failed {
            task_id: None,
            code: r.code,
            message: r.message,
        },
    );
    let why = format!("{}: {}", r.code.as_str(), r.message);
    let (dead, published) = tokio::join!(
        shared.dead_letter(delivery, &why),
        shared.publish_event(&event)
    );
    match (dead, published) {
        (Ok(()), Ok(())) => Disposition::Ack,
        (dead, published) => {
            tracing::warn!(
                dead_letter = ?dead.err().map(|e| e.to_string()),
                event = ?published.err().map(|e| e.to_string()),
                "could not record the refusal; handing the request back"
            );
            Disposition::Requeue
        }
    }
}

async fn poison(
    shared: &Shared,
    delivery: &Delivery,
    props: MessageProps<'_>,
    traceparent: Option<&str>,
    count: i64,
) -> Disposition {
    shared.metrics.request("poison");
    // The body may be what crashes us: read only what the parser reads
    // safely, for the id and metadata of the failed event.
    let (request_id, metadata) = match request::parse(&delivery.data, props) {
        Ok(req) => (req.request_id, req.metadata),
        Err(invalid) => (invalid.request_id, invalid.metadata),
    };
    tracing::Span::current().record("request_id", request_id.as_str());
    tracing::error!(
        deliveries = count,
        "dead-lettering a request that keeps failing its handler"
    );
    let message = format!(
        "the message was delivered {count} times without being handled (the worker crashed or was stopped each time); dead-lettered after amqp.max_deliveries"
    );
    refuse(
        shared,
        delivery,
        Refused {
            request_id: &request_id,
            metadata: metadata.as_deref(),
            code: FailureCode::InvalidRequest,
            message: &message,
            traceparent,
        },
    )
    .await
}

/// Why a create attempt did not produce a task.
enum CreateError {
    Upstream(UpstreamError),
    /// The delivery's channel closed while we waited: the broker has
    /// already handed the request to someone else, so it must not be
    /// created here.
    Abandoned,
}

impl Transient for CreateError {
    fn retry_hint(&self) -> RetryHint {
        match self {
            Self::Upstream(e) => e.retry_hint(),
            Self::Abandoned => RetryHint::Never,
        }
    }
}

async fn submit(
    shared: &Shared,
    delivery: &Delivery,
    req: GenerationRequest,
    traceparent: Option<String>,
) -> Disposition {
    let received_at = Utc::now();
    let hold_until = Instant::now() + shared.settings.amqp.max_hold;
    let (task_id, intake_guard) = loop {
        let mut claim = match shared
            .gate
            .wait_for_turn(hold_until, &shared.shutdown)
            .await
        {
            Turn::Go => None,
            Turn::Probe(claim) => Some(claim),
            Turn::TimedOut => {
                shared.metrics.request("handed_back");
                return Disposition::Requeue;
            }
            Turn::Cancelled => return Disposition::Abandon,
        };
        let created = retry::retry(
            shared.retry_policy(),
            shared.settings.upstream.create_retry_budget,
            &shared.shutdown,
            || async {
                let guard = shared.intake_lock.read().await;
                if delivery.acker.poisoned() {
                    return Err(CreateError::Abandoned);
                }
                match shared
                    .upstream
                    .create(&req.input, traceparent.as_deref())
                    .await
                {
                    Ok(task_id) => Ok((task_id, guard)),
                    Err(e) => Err(CreateError::Upstream(e)),
                }
            },
        )
        .await;
        let err = match created {
            Ok(done) => {
                shared.gate.open();
                break done;
            }
            Err(
                RetryError::Fatal(CreateError::Abandoned)
                | RetryError::Exhausted(CreateError::Abandoned)
                | RetryError::Cancelled(_),
            ) => return Disposition::Abandon,
            Err(RetryError::Exhausted(CreateError::Upstream(err))) => {
                // Keep the request and pause intake rather than cycling it
                // through the queue: every redelivery counts towards
                // amqp.max_deliveries.
                report_refusal(shared, claim.take(), Refusal::Unavailable, &err);
                continue;
            }
            Err(RetryError::Fatal(CreateError::Upstream(err))) => err,
        };
        match err {
            UpstreamError::KeyRejected { .. } => {
                report_refusal(shared, claim.take(), Refusal::Key, &err);
            }
            UpstreamError::Billing { .. } => {
                report_refusal(shared, claim.take(), Refusal::Billing, &err);
            }
            err => {
                shared.gate.open();
                shared.metrics.request("upstream_rejected");
                let message = match &err {
                    UpstreamError::Rejected {
                        status,
                        reason,
                        message,
                    } => rejected_message(*status, reason, message),
                    other => other.to_string(),
                };
                tracing::info!(error = %message, "the upstream rejected the request");
                return refuse(
                    shared,
                    delivery,
                    Refused {
                        request_id: &req.request_id,
                        metadata: req.metadata.as_deref(),
                        code: FailureCode::UpstreamRejected,
                        message: &message,
                        traceparent: traceparent.as_deref(),
                    },
                )
                .await;
            }
        }
        if delivery.acker.poisoned() {
            return Disposition::Abandon;
        }
    };
    tracing::Span::current().record("task_id", task_id.as_str());
    let disposition = record(shared, delivery, req, task_id, received_at, traceparent).await;
    // Acknowledge while still holding the intake lock, so intake cannot be
    // paused (its channel closed) between the create and this ack.
    settle(delivery, disposition).await;
    drop(intake_guard);
    Disposition::Settled
}

/// Records the ticket and the submitted event. This is the double-spend
/// window: the upstream has the task, the broker does not yet know.
async fn record(
    shared: &Shared,
    delivery: &Delivery,
    req: GenerationRequest,
    task_id: String,
    received_at: chrono::DateTime<Utc>,
    traceparent: Option<String>,
) -> Disposition {
    let now = Utc::now();
    let polling = &shared.settings.polling;
    let max_age = if req.off_peak() {
        polling.max_off_peak_task_age
    } else {
        polling.max_task_age
    };
    let props = &delivery.properties;
    let ticket = Ticket {
        v: TICKET_VERSION,
        request_id: req.request_id,
        task_id,
        model: req.model.to_owned(),
        metadata: req.metadata,
        correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
        traceparent,
        received_at,
        submitted_at: now,
        deadline: now + chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX),
        next_poll_at: now
            + chrono::Duration::from_std(polling.min_interval).unwrap_or(chrono::Duration::MAX),
        polls: 0,
        errors: 0,
        not_found: 0,
        last_status: None,
        last_progress: None,
    };
    let submitted = events::build(
        &shared.settings.events.source,
        &ticket.context(),
        &EventKind::Submitted {
            task_id: &ticket.task_id,
            model: &ticket.model,
        },
    );
    let (parked, published) = tokio::join!(
        shared.patiently(TICKET_PATIENCE, || tracking::park(shared, &ticket)),
        shared.patiently(TICKET_PATIENCE, || shared.publish_event(&submitted)),
    );
    if let Err(e) = parked {
        shared.metrics.untracked_task();
        tracing::error!(
            error = %e,
            "the upstream accepted the task but its ticket could not be recorded; the request goes back to the queue and may create a second task"
        );
        return Disposition::Requeue;
    }
    if let Err(e) = published {
        tracing::warn!(error = %e, "the submitted event could not be published; the task is tracked");
    }
    shared.metrics.request("submitted");
    tracing::debug!("task submitted and tracked");
    Disposition::Ack
}

/// Tells the gate why this create could not be served.
fn report_refusal(
    shared: &Shared,
    claim: Option<ProbeClaim>,
    refusal: Refusal,
    err: &UpstreamError,
) {
    match claim {
        Some(claim) => shared.gate.probe_failed(claim, refusal, &err.to_string()),
        None => shared.gate.close(refusal, &err.to_string()),
    }
}

fn rejected_message(status: u16, reason: &str, message: &str) -> String {
    match (reason.is_empty(), message.is_empty()) {
        (false, false) => format!("HTTP {status} {reason}: {message}"),
        (false, true) => format!("HTTP {status} {reason}"),
        (true, false) => format!("HTTP {status}: {message}"),
        (true, true) => format!("HTTP {status}"),
    }
}

/// Continues an incoming W3C trace: same trace id and flags, a new parent id
/// for the worker's own span. Malformed headers are ignored.
pub fn continue_trace(incoming: &str) -> Option<String> {
    let parts: Vec<&str> = incoming.trim().split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2)
        || *version == "ff"
        || !hex(trace_id, 32)
        || trace_id.bytes().all(|b| b == b'0')
        || !hex(parent_id, 16)
        || !hex(flags, 2)
    {
        return None;
    }
    let span_id = loop {
        let v: u64 = rand::random();
        if v != 0 {
            break v;
        }
    };
    Some(format!("00-{trace_id}-{span_id:016x}-{flags}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_continue_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = continue_trace(incoming).expect("valid");
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"), "{out}");
        assert_ne!(out, incoming);
        assert_eq!(out.len(), incoming.len());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(continue_trace(bad), None, "{bad}");
        }
    }
}
