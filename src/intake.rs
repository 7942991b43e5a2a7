//! Intake: turns one request message into an upstream task and a ticket.
//!
//! For each request the intake loop hands over: refuse poison and invalid
//! requests (failed event plus a dead-lettered copy with `x-vidu-error`),
//! respect the upstream gate, create the task with retries (each retry
//! waits for the pacer and, with a quota, a slot in the deployment's
//! window), then record the tracking ticket and the `submitted` event, both
//! publisher-confirmed, before the request is acknowledged. The create call
//! is the one step that must not repeat: it is only sent while the
//! request's delivery still belongs to this worker's session (checked
//! immediately before the send), an unreadable success is never retried,
//! and a redelivered copy of a request this worker already created is
//! recognised by its id and not created again.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use chrono::Utc;
use lapin::message::Delivery;
use tokio::{sync::watch, time::Instant};

use crate::{
    broker::{self, DELIVERY_COUNT_HEADER, TRACEPARENT_HEADER},
    events::{self, EventKind, FailureCode, RequestContext},
    gate::{GateState, ProbeClaim, Refusal, Turn},
    quota::SlotError,
    request::{self, GenerationRequest, MessageProps, RequestId},
    retry::{self, RetryError},
    tracking::{self, Ticket, TICKET_VERSION},
    upstream::UpstreamError,
    worker::{Disposition, Lease, Shared},
};

/// How long the worker keeps trying to record a ticket for a task the
/// upstream already accepted (across broker reconnects) before giving up.
const TICKET_PATIENCE: Duration = Duration::from_secs(120);
/// How long a created request is remembered, so that a redelivered copy
/// (its delivery was lost while the create or its ack was on the wire) is
/// not created again.
const RECENT_TTL: Duration = Duration::from_secs(30);
/// Most created requests remembered at once.
const RECENT_CAPACITY: usize = 2_048;
/// Longest a redelivered copy waits for this worker's own create of the
/// same request to finish.
const RECENT_WAIT: Duration = Duration::from_secs(180);

/// Handles one delivery from the request queue.
#[tracing::instrument(name = "request", skip_all, fields(request_id, task_id))]
pub(crate) async fn handle(shared: &Shared, delivery: &Delivery, lease: &Lease) -> Disposition {
    let props = &delivery.properties;
    let message_props = MessageProps {
        message_id: props.message_id().as_ref().map(|s| s.as_str()),
        content_type: props.content_type().as_ref().map(|s| s.as_str()),
        content_encoding: props.content_encoding().as_ref().map(|s| s.as_str()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.as_str()),
        reply_to: props.reply_to().as_ref().map(|s| s.as_str()),
        request_queue: &shared.topology.request_queue,
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
            submit(shared, delivery, lease, req, traceparent).await
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
    let ctx = RequestContext {
        request_id: r.request_id,
        metadata: r.metadata,
        correlation_id: correlation_id(delivery),
        reply_to: reply_to(shared, delivery),
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
        shared.dead_letter(delivery, &why, r.traceparent),
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
#[derive(Debug)]
enum CreateError {
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

async fn submit(
    shared: &Shared,
    delivery: &Delivery,
    lease: &Lease,
    req: GenerationRequest,
    traceparent: Option<String>,
) -> Disposition {
    let received_at = Utc::now();
    let mut remembered = match req.stable_id() {
        Some(id) => match shared.recent.begin(id, delivery.redelivered).await {
            Begin::Recorded => {
                // Created by this worker moments ago: its ticket and events
                // exist, the broker only redelivered the request.
                tracing::info!("a redelivered request this worker already created and tracks; acknowledging it");
                shared.metrics.request("duplicate");
                return Disposition::Ack;
            }
            Begin::Go(guard) => guard,
        },
        None => None,
    };
    let hold_until = Instant::now() + shared.settings.amqp.max_hold;
    // The intake loop took this request's first pacing and quota slot.
    let mut prepaid = true;
    let task_id = loop {
        let claim = match shared.gate.state() {
            GateState::Open => None,
            GateState::Closed {
                refusal: Refusal::Key | Refusal::Unavailable,
                ..
            } => {
                // Probed without requests: hand this one back, once.
                shared.metrics.request("handed_back");
                return Disposition::Requeue;
            }
            GateState::Closed {
                refusal: Refusal::Billing,
                ..
            } => {
                // A lost delivery ends the wait; the create attempt then
                // finds it lost and sends nothing.
                let turn = tokio::select! {
                    turn = shared.gate.wait_for_turn(hold_until, &shared.shutdown) => Some(turn),
                    () = lease.lost() => None,
                };
                match turn {
                    None | Some(Turn::Go) => None,
                    Some(Turn::Probe(claim)) => Some(claim),
                    Some(Turn::TimedOut) => {
                        shared.metrics.request("handed_back");
                        return Disposition::Requeue;
                    }
                    Some(Turn::Cancelled) => return Disposition::Abandon,
                }
            }
        };
        let created = retry::retry(
            shared.retry_policy(),
            shared.settings.upstream.create_retry_budget,
            &shared.shutdown,
            || {
                let first = std::mem::replace(&mut prepaid, false);
                create_once(shared, lease, &req, traceparent.as_deref(), first)
            },
        )
        .await;
        match created {
            Ok(task_id) => {
                shared.gate.open();
                break task_id;
            }
            Err(RetryError::Fatal(CreateError::NotSent)) => return abandoned(shared),
            Err(RetryError::Cancelled(_) | RetryError::Fatal(CreateError::Cancelled)) => {
                return Disposition::Abandon
            }
            Err(RetryError::Exhausted(CreateError::Upstream(err))) => {
                // Still failing after the retry budget: back to the queue
                // (one delivery counted). A plain outage also closes the
                // gate, so that nothing more is taken until a probe works.
                if !matches!(err, UpstreamError::RateLimited { .. }) {
                    report_refusal(shared, claim, Refusal::Unavailable, &err);
                }
                shared.metrics.request("handed_back");
                return Disposition::Requeue;
            }
            Err(RetryError::Exhausted(CreateError::NotSent)) => return abandoned(shared),
            Err(RetryError::Exhausted(CreateError::Cancelled)) => return Disposition::Abandon,
            Err(RetryError::Fatal(CreateError::Upstream(err))) => match err {
                UpstreamError::KeyRejected { .. } => {
                    report_refusal(shared, claim, Refusal::Key, &err);
                    shared.metrics.request("handed_back");
                    return Disposition::Requeue;
                }
                UpstreamError::Billing { .. } => {
                    // Wait at the gate (at most amqp.max_hold), probing.
                    report_refusal(shared, claim, Refusal::Billing, &err);
                    prepaid = false;
                    continue;
                }
                UpstreamError::Unconfirmed { .. } => {
                    if let Some(guard) = remembered.as_mut() {
                        guard.recorded();
                    }
                    return unconfirmed(shared, delivery, &req, &err, traceparent.as_deref()).await;
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
            },
        }
    };
    tracing::Span::current().record("task_id", task_id.as_str());
    if !lease.alive() {
        // The create was on the wire when the session was lost: the broker
        // will redeliver the request. Record the task anyway (its ticket is
        // published on the next session), and remember it so that a copy
        // redelivered to this worker is not created again.
        shared.metrics.create("accepted_after_delivery_lost");
        tracing::warn!("the upstream accepted a task after the request's delivery was lost; recording it so the redelivered copy is not created again here");
    }
    let disposition = record(shared, delivery, req, task_id, received_at, traceparent).await;
    if disposition == Disposition::Ack {
        if let Some(guard) = remembered.as_mut() {
            guard.recorded();
        }
    }
    disposition
}

/// One create attempt: pacing and the quota first (unless the intake loop
/// already took them for this request), then the call, which is sent only
/// while the delivery is alive.
async fn create_once(
    shared: &Shared,
    lease: &Lease,
    req: &GenerationRequest,
    traceparent: Option<&str>,
    prepaid: bool,
) -> Result<String, CreateError> {
    if !prepaid {
        take_slot(shared, lease).await?;
    }
    let sent_at = Instant::now();
    let result = shared
        .upstream
        .create(&req.input, traceparent, &|| lease.alive())
        .await;
    let outcome = match &result {
        Ok(_) => {
            shared.pacer.on_accepted();
            "accepted"
        }
        Err(UpstreamError::RateLimited { retry_after, .. }) => {
            shared.pacer.on_rate_limited(sent_at, *retry_after);
            "rate_limited"
        }
        Err(UpstreamError::NotSent) => {
            return Err(CreateError::NotSent);
        }
        Err(UpstreamError::Unconfirmed { .. }) => "unconfirmed",
        Err(UpstreamError::Transient { .. }) => "failed",
        Err(_) => "rejected",
    };
    shared.metrics.create(outcome);
    result.map_err(CreateError::Upstream)
}

/// Waits for the pacer and a quota slot before a retry, while the delivery
/// is held (bounded by the retry budget). A lost delivery ends the waits:
/// the create that follows finds it lost and sends nothing (that check, in
/// [`crate::upstream::UpstreamClient::create`], is the one that decides).
async fn take_slot(shared: &Shared, lease: &Lease) -> Result<(), CreateError> {
    tokio::select! {
        ready = shared.pacer.ready(&shared.shutdown) => {
            if !ready {
                return Err(CreateError::Cancelled);
            }
        }
        () = lease.lost() => return Ok(()),
    }
    let Some(ledger) = &shared.ledger else {
        return Ok(());
    };
    loop {
        let Some(publisher) = shared.publisher() else {
            // Between sessions: this delivery's session is gone.
            return Ok(());
        };
        let claimed = tokio::select! {
            claimed = ledger.claim(&publisher, &shared.metrics, &shared.shutdown) => claimed,
            () = lease.lost() => return Ok(()),
        };
        match claimed {
            Ok(()) => return Ok(()),
            Err(SlotError::Cancelled) => return Err(CreateError::Cancelled),
            Err(SlotError::Broker(e)) => {
                // The session is probably going; the lease will tell.
                tracing::debug!(error = %e, "could not claim a quota slot for a retry");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = lease.lost() => return Ok(()),
                }
            }
        }
    }
}

/// The delivery was lost before its create was sent: nothing to do here,
/// the broker has handed the request to someone else.
fn abandoned(shared: &Shared) -> Disposition {
    shared.metrics.create("not_sent");
    tracing::debug!("the request's delivery was lost while it waited; not creating it");
    Disposition::Abandon
}

/// An unreadable success: a task may exist and be billed, so the request
/// is failed (`upstream_unconfirmed`) and dead-lettered, never created again.
async fn unconfirmed(
    shared: &Shared,
    delivery: &Delivery,
    req: &GenerationRequest,
    err: &UpstreamError,
    traceparent: Option<&str>,
) -> Disposition {
    shared.gate.open();
    shared.metrics.request("upstream_unconfirmed");
    let message = format!(
        "{err}; a task may have been created and billed, so the request is not created again"
    );
    tracing::error!(error = %err, "the upstream's answer to a create has no readable task id; failing the request instead of creating it again");
    refuse(
        shared,
        delivery,
        Refused {
            request_id: &req.request_id,
            metadata: req.metadata.as_deref(),
            code: FailureCode::UpstreamUnconfirmed,
            message: &message,
            traceparent,
        },
    )
    .await
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
    let ticket = Ticket {
        v: TICKET_VERSION,
        request_id: req.request_id,
        task_id,
        model: req.model.to_owned(),
        metadata: req.metadata,
        correlation_id: correlation_id(delivery).map(str::to_owned),
        reply_to: reply_to(shared, delivery).map(str::to_owned),
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

/// The request's `correlation_id`, when it may go into events.
fn correlation_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(|s| s.as_str())
        .filter(|c| request::check_correlation_id(c).is_ok())
}

/// The request's `reply_to`, when the terminal event may go there.
fn reply_to<'a>(shared: &Shared, delivery: &'a Delivery) -> Option<&'a str> {
    delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|s| s.as_str())
        .filter(|r| request::check_reply_to(r, &shared.topology.request_queue).is_ok())
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
    let incoming = incoming.trim();
    if !events::is_traceparent(incoming) {
        return None;
    }
    let parts: Vec<&str> = incoming.split('-').collect();
    let [_, trace_id, _, flags] = parts.as_slice() else {
        return None;
    };
    let span_id = loop {
        let v: u64 = rand::random();
        if v != 0 {
            break v;
        }
    };
    Some(format!("00-{trace_id}-{span_id:016x}-{flags}"))
}

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
}
