//! Intake: turns one request message into an upstream task and a ticket.
//!
//! For each request the intake loop hands over: refuse poison and invalid
//! requests (failed event plus a dead-lettered copy with `x-vidu-error`),
//! respect the upstream gate, create the task with retries (every attempt
//! takes a slot of the create budget first: the one the request was taken
//! with, then a new one per retry), then record the tracking ticket and the `submitted` event, both
//! publisher-confirmed, before the request is acknowledged. The create call
//! is the one step that must not repeat: it is only sent while the
//! request's delivery still belongs to this worker's session (checked
//! immediately before the send), an unreadable success is never retried,
//! and a request whose id any worker of the fleet created (the journal's
//! created records, read up to the moment of a claim on the id) is
//! acknowledged as a duplicate instead of created again.

use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;
use tokio::time::Instant;

use super::{
    claim::{self, Claim, Claimed},
    context::Context,
    decisions::{self, CreateError, CreateStep, GateStep},
    disposition::Disposition,
    lease::Lease,
    poison,
    recent::Begin,
    ticket::{Origin, Ticket},
};
use crate::journal::{created::Remembered, Created};
use crate::{
    broker::{self, TRACEPARENT_HEADER},
    events::{self, EventKind, FailureCode, RequestContext},
    gate::{ProbeClaim, Refusal, Turn},
    metrics::{CreateOutcome, RequestOutcome},
    model::Model,
    quota::{Prepaid, SlotError},
    request::{self, GenerationRequest, MessageProps, RequestId},
    retry,
    trace::TraceParent,
    upstream::TaskId,
    upstream::UpstreamError,
};

/// How long the worker keeps trying to record a ticket for a task the
/// upstream already accepted (across broker reconnects) before giving up.
const TICKET_PATIENCE: Duration = Duration::from_secs(120);

/// Handles one delivery from the request queue.
#[tracing::instrument(name = "request", skip_all, fields(request_id, model, task_id))]
pub(crate) async fn handle(
    ctx: &Context,
    delivery: &Delivery,
    lease: &Lease,
    prepaid: Prepaid,
) -> Disposition {
    let props = &delivery.properties;
    let message_props = MessageProps {
        message_id: props.message_id().as_ref().map(|s| s.as_str()),
        content_type: props.content_type().as_ref().map(|s| s.as_str()),
        content_encoding: props.content_encoding().as_ref().map(|s| s.as_str()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.as_str()),
        reply_to: props.reply_to().as_ref().map(|s| s.as_str()),
        request_queue: &ctx.topology.request_queue,
        reply_to_allowed: &ctx.settings.amqp.reply_to_allowed,
    };
    let traceparent =
        broker::header_str(props, TRACEPARENT_HEADER).and_then(TraceParent::continued);

    if let Some(count) = poison::check(delivery, ctx.settings.amqp.max_deliveries) {
        return poisoned(ctx, delivery, message_props, traceparent.as_ref(), count).await;
    }

    let parsed = request::parse(&delivery.data, message_props)
        .and_then(|req| request::allowed(req, &ctx.settings.upstream.models));
    match parsed {
        Ok(req) => {
            let span = tracing::Span::current();
            span.record("request_id", req.request_id.as_str());
            span.record("model", req.model.as_str());
            submit(ctx, delivery, lease, req, traceparent, prepaid).await
        }
        Err(invalid) => {
            tracing::Span::current().record("request_id", invalid.request_id.as_str());
            tracing::info!(field = %invalid.field, problem = %invalid.message, "rejecting an invalid request");
            ctx.metrics.request(RequestOutcome::Invalid);
            let message = invalid.to_string();
            refuse(
                ctx,
                delivery,
                Refused {
                    request_id: &invalid.request_id,
                    metadata: invalid.metadata.as_deref(),
                    code: FailureCode::InvalidRequest,
                    message: &message,
                    traceparent: traceparent.as_ref(),
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
    traceparent: Option<&'a TraceParent>,
}

/// Dead-letters the message with `x-vidu-error` and publishes the failed
/// event; acknowledges only when both are confirmed.
async fn refuse(ctx: &Context, delivery: &Delivery, r: Refused<'_>) -> Disposition {
    let request = RequestContext {
        request_id: r.request_id,
        metadata: r.metadata,
        correlation_id: correlation_id(delivery),
        reply_to: reply_to(ctx, delivery),
        traceparent: r.traceparent,
    };
    let event = events::build(
        &ctx.settings.events.source,
        &request,
        &EventKind::Failed {
            task_id: None,
            code: r.code,
            message: r.message,
            videos: &[],
        },
    );
    let why = format!("{}: {}", r.code.as_str(), r.message);
    let (dead, published) = tokio::join!(
        ctx.dead_letter(delivery, &why, r.traceparent),
        ctx.publish_event(&event)
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

/// Ends a request that was canceled or whose deadline passed before its
/// create: its one terminal event (`failed`, `canceled` or `expired`, no
/// task), then the acknowledgement; nothing is created and no quota slot
/// spent. Not dead-lettered: nothing is wrong with the message.
async fn end_unwanted(
    ctx: &Context,
    delivery: &Delivery,
    req: &GenerationRequest,
    code: FailureCode,
    traceparent: Option<&TraceParent>,
) -> Disposition {
    let message = decisions::unwanted_message(code, req.deadline);
    let request = RequestContext {
        request_id: &req.request_id,
        metadata: req.metadata.as_deref(),
        correlation_id: correlation_id(delivery),
        reply_to: reply_to(ctx, delivery),
        traceparent,
    };
    let event = events::build(
        &ctx.settings.events.source,
        &request,
        &EventKind::Failed {
            task_id: None,
            code,
            message: &message,
            videos: &[],
        },
    );
    match ctx.publish_event(&event).await {
        Ok(()) => {
            tracing::info!(code = code.as_str(), "{message}");
            ctx.metrics.request(if code == FailureCode::Canceled {
                RequestOutcome::Canceled
            } else {
                RequestOutcome::Expired
            });
            Disposition::Ack
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not publish the end of a request not created; handing it back");
            Disposition::Requeue
        }
    }
}

async fn poisoned(
    ctx: &Context,
    delivery: &Delivery,
    props: MessageProps<'_>,
    traceparent: Option<&TraceParent>,
    count: i64,
) -> Disposition {
    ctx.metrics.request(RequestOutcome::Poison);
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
        ctx,
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

async fn submit(
    ctx: &Context,
    delivery: &Delivery,
    lease: &Lease,
    req: GenerationRequest,
    traceparent: Option<TraceParent>,
    prepaid: Prepaid,
) -> Disposition {
    let received_at = Utc::now();
    // Canceled (as far as this worker has read the journal) or past its
    // deadline: ended without a create, its slot left for the next one.
    let canceled =
        |req: &GenerationRequest| req.stable_id().is_some_and(|id| ctx.journal.canceled(id));
    if let Some(code) = decisions::unwanted(canceled(&req), req.deadline, received_at) {
        return end_unwanted(ctx, delivery, &req, code, traceparent.as_ref()).await;
    }
    let mut remembered = match req.stable_id() {
        Some(id) => match ctx.recent.begin(id, delivery.redelivered).await {
            Begin::Recorded => {
                // Created by this worker moments ago: its ticket and events
                // exist, the broker only redelivered the request.
                tracing::info!("a redelivered request this worker already created and tracks; acknowledging it");
                ctx.metrics.request(RequestOutcome::Duplicate);
                return Disposition::Ack;
            }
            Begin::Go(guard) => guard,
        },
        None => None,
    };
    let hold_until = Instant::now() + ctx.settings.amqp.max_hold;
    // Whether any worker of the fleet created this id already; if not,
    // this worker's claim on it until the create is in the journal.
    let claim = match req.stable_id() {
        Some(id) => match once_in_the_fleet(ctx, delivery, lease, &req, id, hold_until).await {
            Fleet::Create(claim) => claim,
            Fleet::Created(remembered) => {
                return duplicate(ctx, delivery, req, remembered, received_at, traceparent).await
            }
            Fleet::Settled(disposition) => return disposition,
        },
        None => None,
    };
    // The journal was read up to now: a cancel any worker read is known.
    if let Some(code) = decisions::unwanted(canceled(&req), req.deadline, Utc::now()) {
        return end_unwanted(ctx, delivery, &req, code, traceparent.as_ref()).await;
    }
    // The intake loop took this request's first slot; each retry takes
    // another from the same budget. Unspent (no create sent), a slot goes
    // to the next request.
    let slots = CreateSlots::new(prepaid);
    let task_id = loop {
        let claim = match pass_gate(ctx, lease, hold_until).await {
            Ok(claim) => claim,
            Err(disposition) => return disposition,
        };
        let created = retry::retry(
            ctx.retry_policy(),
            ctx.settings.upstream.create_retry_budget,
            &ctx.shutdown,
            || create_once(ctx, lease, &req, traceparent.as_ref(), &slots),
        )
        .await;
        let failure = match created {
            Ok(task_id) => {
                ctx.gate.open();
                break task_id;
            }
            Err(failure) => failure,
        };
        match decisions::after_create(failure) {
            CreateStep::NotSent => return abandoned(ctx, req.model),
            CreateStep::Unwanted(code) => {
                return end_unwanted(ctx, delivery, &req, code, traceparent.as_ref()).await
            }
            CreateStep::Abandon => return Disposition::Abandon,
            CreateStep::HandBack { close, detail } => {
                if let Some(refusal) = close {
                    report_refusal(ctx, claim, refusal, &detail);
                }
                ctx.metrics.request(RequestOutcome::HandedBack);
                return Disposition::Requeue;
            }
            CreateStep::WaitForBalance { detail } => {
                // Wait at the gate (at most amqp.max_hold), probing.
                report_refusal(ctx, claim, Refusal::Billing, &detail);
            }
            CreateStep::Refuse {
                code,
                message,
                outcome,
            } => {
                if code == FailureCode::UpstreamUnconfirmed {
                    // A task may exist and be billed: never again, and
                    // counted as a task without a ticket. Several in a row
                    // close the gate.
                    if let Some(guard) = remembered.as_mut() {
                        guard.recorded();
                    }
                    ctx.metrics.untracked_task();
                    ctx.gate.create_unconfirmed(claim, &message);
                }
                return refuse_created(
                    ctx,
                    delivery,
                    &req,
                    code,
                    &message,
                    outcome,
                    traceparent.as_ref(),
                )
                .await;
            }
        }
    };
    tracing::Span::current().record("task_id", task_id.as_str());
    if !lease.alive() {
        // The create was on the wire when the session was lost: the broker
        // will redeliver the request. Record the task anyway (its ticket is
        // published on the next session), and remember it so that a copy
        // redelivered to this worker is not created again.
        ctx.metrics
            .create(CreateOutcome::AcceptedAfterDeliveryLost, req.model);
        tracing::warn!("the upstream accepted a task after the request's delivery was lost; recording it so the redelivered copy is not created again here");
    }
    let disposition = record(ctx, delivery, req, task_id, received_at, traceparent).await;
    // The create is in the journal (or could not be written in the ticket's
    // patience): another copy may look now. Every other way out of this
    // function drops the claim, which releases it too.
    if let Some(claim) = claim {
        claim.release().await;
    }
    if disposition == Disposition::Ack {
        if let Some(guard) = remembered.as_mut() {
            guard.recorded();
        }
    }
    disposition
}

/// What the fleet knows of a request id.
enum Fleet {
    /// Nobody created it: create it, holding the claim (if the broker
    /// gave one) until the create is in the journal.
    Create(Option<Claim>),
    /// Some worker created it already.
    Created(Remembered),
    /// The request goes back, or its delivery was lost, while another
    /// worker held its claim.
    Settled(Disposition),
}

/// Longest wait between two tries of a claim another worker holds.
const CLAIM_RETRY_MAX: Duration = Duration::from_secs(1);

/// Whether request `id` was created by any worker of the deployment: the
/// journal's created records say so, and a claim on the id (see
/// [`super::claim`]) makes sure no other worker is creating it right now.
/// After the claim, the journal is read up to the present, so a create
/// whose claim was released a moment ago is seen.
async fn once_in_the_fleet(
    ctx: &Context,
    delivery: &Delivery,
    lease: &Lease,
    req: &GenerationRequest,
    id: &RequestId,
    hold_until: Instant,
) -> Fleet {
    if let Some(remembered) = ctx.journal.created(id) {
        return Fleet::Created(remembered);
    }
    let mut delay = Duration::from_millis(50);
    loop {
        let Some(publisher) = ctx.publisher() else {
            return Fleet::Settled(abandoned(ctx, req.model));
        };
        let before = Instant::now();
        let claim = match claim::claim(
            &publisher,
            &ctx.claims,
            &ctx.topology.request_queue,
            &ctx.signer,
            id,
        )
        .await
        {
            Claimed::Mine(claim) => Some(claim),
            Claimed::Unavailable(why) => {
                if ctx.claim_log.due() {
                    tracing::warn!(reason = %why, "could not claim a request id before its create (does the workers' broker user have configure rights on <request_queue>.claim.*?); relying on the journal alone");
                }
                None
            }
            Claimed::Held => {
                tracing::debug!(
                    message_id = ?delivery.properties.message_id().as_ref().map(|m| m.as_str()),
                    "another copy of this request is being created; waiting for its claim"
                );
                if let Some(settled) = wait_to_retry(ctx, lease, req, hold_until, &mut delay).await
                {
                    return settled;
                }
                if let Some(remembered) = ctx.journal.created(id) {
                    return Fleet::Created(remembered);
                }
                continue;
            }
        };
        if let Err(e) = ctx.journal.sync_since(&publisher, before).await {
            // The journal cannot be read up to now (a stream electing a new
            // leader, a session going): wait with the claim given back,
            // as at a closed gate, rather than cycle the request through
            // the queue (each return counts towards its delivery limit).
            drop(claim);
            tracing::warn!(error = %e, "could not read the journal up to now; the request waits");
            if let Some(settled) = wait_to_retry(ctx, lease, req, hold_until, &mut delay).await {
                return settled;
            }
            continue;
        }
        return match ctx.journal.created(id) {
            Some(remembered) => Fleet::Created(remembered),
            None => Fleet::Create(claim),
        };
    }
}

/// Waits `delay` (then doubles it, up to [`CLAIM_RETRY_MAX`]) before the
/// fleet is asked again; `Some` when the request goes back instead (the
/// wait would outlast `amqp.max_hold`) or its delivery was lost.
async fn wait_to_retry(
    ctx: &Context,
    lease: &Lease,
    req: &GenerationRequest,
    hold_until: Instant,
    delay: &mut Duration,
) -> Option<Fleet> {
    if Instant::now() + *delay > hold_until {
        ctx.metrics.request(RequestOutcome::HandedBack);
        return Some(Fleet::Settled(Disposition::Requeue));
    }
    tokio::select! {
        () = lease.lost() => return Some(Fleet::Settled(abandoned(ctx, req.model))),
        () = tokio::time::sleep(*delay) => {}
    }
    *delay = (*delay * 2).min(CLAIM_RETRY_MAX);
    None
}

/// A copy of a request the fleet already created: acknowledged without
/// events of its own. A redelivered copy may be the first copy itself,
/// whose worker died after the create but before its ticket was recorded:
/// its ticket is published again from the journal's record, so the paid
/// task is tracked (a ticket that did exist makes the same terminal event,
/// with the same id, once more at most).
async fn duplicate(
    ctx: &Context,
    delivery: &Delivery,
    req: GenerationRequest,
    remembered: Remembered,
    received_at: chrono::DateTime<Utc>,
    traceparent: Option<TraceParent>,
) -> Disposition {
    tracing::Span::current().record("task_id", &*remembered.task_id);
    tracing::debug!(
        message_id = ?delivery.properties.message_id().as_ref().map(|m| m.as_str()),
        delivery_tag = delivery.delivery_tag,
        redelivered = delivery.redelivered,
        created_at = %remembered.at,
        "a copy of a request the fleet already created; acknowledging it"
    );
    let task_id = TaskId::parse(&remembered.task_id);
    if task_id.is_none() {
        // The journal reads only valid task ids; never acted on otherwise.
        tracing::warn!(
            "the journal's record of this request names no valid task; acknowledging the copy"
        );
    }
    if let (true, Some(task_id)) = (delivery.redelivered, task_id) {
        // The first copy was received before its create.
        let origin = origin(ctx, delivery, received_at.min(remembered.at), traceparent);
        let ticket =
            Ticket::for_created_task(req, task_id, origin, remembered.at, &ctx.settings.polling);
        if let Err(e) = ctx.patiently(TICKET_PATIENCE, || ctx.park(&ticket)).await {
            tracing::warn!(error = %e, "could not record the ticket of a created request again; handing the copy back");
            return Disposition::Requeue;
        }
        tracing::info!("a redelivered request the fleet had created: its ticket is recorded again from the journal");
    }
    ctx.metrics.request(RequestOutcome::Duplicate);
    Disposition::Ack
}

/// Passes the gate in front of a create: `Ok` with the probe claim when
/// this request is the one to probe a refused balance, or the disposition
/// when the request goes back (the key is refused, the upstream is down, or
/// the wait at the gate outlasted `amqp.max_hold`) or the worker stops.
async fn pass_gate(
    ctx: &Context,
    lease: &Lease,
    hold_until: Instant,
) -> Result<Option<ProbeClaim>, Disposition> {
    match decisions::at_gate(&ctx.gate.state()) {
        GateStep::Go => Ok(None),
        GateStep::HandBack => {
            // Probed without requests: hand this one back, once.
            ctx.metrics.request(RequestOutcome::HandedBack);
            Err(Disposition::Requeue)
        }
        GateStep::Wait => {
            // A lost delivery ends the wait; the create attempt then finds
            // it lost and sends nothing.
            let turn = tokio::select! {
                turn = ctx.gate.wait_for_turn(hold_until, &ctx.shutdown) => Some(turn),
                () = lease.lost() => None,
            };
            match turn {
                None | Some(Turn::Go) => Ok(None),
                Some(Turn::Probe(claim)) => Ok(Some(claim)),
                Some(Turn::TimedOut) => {
                    ctx.metrics.request(RequestOutcome::HandedBack);
                    Err(Disposition::Requeue)
                }
                Some(Turn::Cancelled) => Err(Disposition::Abandon),
            }
        }
    }
}

/// Fails a request the upstream served without a task (refused it, or
/// answered unreadably): the gate opens, the request is dead-lettered with
/// a failed event.
async fn refuse_created(
    ctx: &Context,
    delivery: &Delivery,
    req: &GenerationRequest,
    code: FailureCode,
    message: &str,
    outcome: RequestOutcome,
    traceparent: Option<&TraceParent>,
) -> Disposition {
    if code != FailureCode::UpstreamUnconfirmed {
        // The upstream served the call: it is up and takes the key.
        ctx.gate.open();
    }
    ctx.metrics.request(outcome);
    if code == FailureCode::UpstreamUnconfirmed {
        tracing::error!(error = %message, "the upstream's answer to a create has no readable task id; failing the request instead of creating it again");
    } else {
        tracing::info!(error = %message, "the upstream rejected the request");
    }
    refuse(
        ctx,
        delivery,
        Refused {
            request_id: &req.request_id,
            metadata: req.metadata.as_deref(),
            code,
            message,
            traceparent,
        },
    )
    .await
}

/// One create attempt: a slot of the create budget first, then the call,
/// which is sent only while the delivery is alive.
async fn create_once(
    ctx: &Context,
    lease: &Lease,
    req: &GenerationRequest,
    traceparent: Option<&TraceParent>,
    slots: &CreateSlots,
) -> Result<TaskId, CreateError> {
    let slot = slots.take(ctx, lease).await?;
    // The wait for the slot may have outlasted the deadline, or a cancel
    // may have come: the slot is not spent then (it serves the next one).
    let canceled = req.stable_id().is_some_and(|id| ctx.journal.canceled(id));
    if let Some(code) = decisions::unwanted(canceled, req.deadline, Utc::now()) {
        return Err(CreateError::Unwanted(code));
    }
    let sent_at = Instant::now();
    let sent_at_wall = Utc::now();
    let result = ctx
        .upstream
        .create(&req.input, traceparent, &|| lease.alive())
        .await;
    if let Some(slot) = slot {
        if !matches!(result, Err(UpstreamError::NotSent)) {
            slot.spend();
        }
    }
    let outcome = match &result {
        Ok(_) => {
            ctx.budget.accepted();
            CreateOutcome::Accepted
        }
        Err(UpstreamError::RateLimited { retry_after, .. }) => {
            let publisher = ctx.publisher();
            ctx.budget
                .refused(publisher.as_ref(), sent_at, sent_at_wall, *retry_after)
                .await;
            CreateOutcome::RateLimited
        }
        Err(UpstreamError::NotSent) => {
            return Err(CreateError::NotSent);
        }
        Err(UpstreamError::Unconfirmed { .. }) => CreateOutcome::Unconfirmed,
        Err(UpstreamError::Transient { .. }) => CreateOutcome::Failed,
        Err(_) => CreateOutcome::Rejected,
    };
    ctx.metrics.create(outcome, req.model);
    result.map_err(CreateError::Upstream)
}

/// A request's create slots: every attempt, the first and the retries
/// alike, takes one before its call. The first is the slot the intake loop
/// took the request with (a request waits in the broker, not here, until a
/// create could follow); each retry takes a new one from the create budget
/// (the pause after a 429, a slot in the deployment's window) while the
/// delivery is held, bounded by the retry budget.
struct CreateSlots {
    first: std::sync::Mutex<Option<Prepaid>>,
}

impl CreateSlots {
    fn new(first: Prepaid) -> Self {
        Self {
            first: std::sync::Mutex::new(Some(first)),
        }
    }

    /// The slot for the next attempt, owed back to the spare slots unless
    /// spent. `None`: the delivery was lost (or the session is gone) while
    /// waiting for one; the create that follows finds it lost and sends
    /// nothing (that check, in [`crate::upstream::UpstreamClient::create`],
    /// is the one that decides).
    async fn take(&self, ctx: &Context, lease: &Lease) -> Result<Option<Prepaid>, CreateError> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(first) = first {
            return Ok(Some(first));
        }
        loop {
            let Some(publisher) = ctx.publisher() else {
                return Ok(None);
            };
            let taken = tokio::select! {
                taken = ctx.budget.take(&publisher, &ctx.shutdown) => taken,
                () = lease.lost() => return Ok(None),
            };
            match taken {
                Ok(slot) => return Ok(Some(Prepaid::new(ctx.slots.clone(), slot))),
                Err(SlotError::Cancelled) => return Err(CreateError::Cancelled),
                Err(e) => {
                    // The session is probably going; the lease will tell.
                    tracing::debug!(error = %e, "could not take a create slot for a retry");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = lease.lost() => return Ok(None),
                    }
                }
            }
        }
    }
}

/// The delivery was lost before its create was sent: nothing to do here,
/// the broker has handed the request to someone else.
fn abandoned(ctx: &Context, model: Model) -> Disposition {
    ctx.metrics.create(CreateOutcome::NotSent, model);
    tracing::debug!("the request's delivery was lost while it waited; not creating it");
    Disposition::Abandon
}

/// Records the ticket and the submitted event. This is the double-spend
/// window: the upstream has the task, the broker does not yet know.
async fn record(
    ctx: &Context,
    delivery: &Delivery,
    req: GenerationRequest,
    task_id: TaskId,
    received_at: chrono::DateTime<Utc>,
    traceparent: Option<TraceParent>,
) -> Disposition {
    let stable_id = req.stable_id().cloned();
    let origin = origin(ctx, delivery, received_at, traceparent);
    let ticket = Ticket::for_created_task(req, task_id, origin, Utc::now(), &ctx.settings.polling);
    let submitted = events::build(
        &ctx.settings.events.source,
        &ticket.context(),
        &EventKind::Submitted {
            task_id: ticket.task_id.as_str(),
            model: ticket.model.as_str(),
        },
    );
    let created = Created {
        v: 1,
        request_id: stable_id,
        task_id: ticket.task_id.to_string(),
        model: ticket.model.as_str().to_owned(),
        at: ticket.submitted_at,
    };
    let (parked, published, journaled) = tokio::join!(
        ctx.patiently(TICKET_PATIENCE, || ctx.park(&ticket)),
        ctx.patiently(TICKET_PATIENCE, || ctx.publish_event(&submitted)),
        ctx.patiently(TICKET_PATIENCE, || ctx.record_created(&created)),
    );
    match (journaled, ctx.publisher()) {
        (Ok(()), Some(publisher)) => ctx.budget.recorded(&publisher).await,
        (Ok(()), None) => {}
        (Err(e), _) => {
            tracing::warn!(error = %e, "the create could not be recorded in the journal");
        }
    }
    if let Err(e) = parked {
        ctx.metrics.untracked_task();
        tracing::error!(
            error = %e,
            "the upstream accepted the task but its ticket could not be recorded; the request goes back to the queue and may create a second task"
        );
        return Disposition::Requeue;
    }
    if let Err(e) = published {
        tracing::warn!(error = %e, "the submitted event could not be published; the task is tracked");
    }
    ctx.metrics.request(RequestOutcome::Submitted);
    tracing::debug!("task submitted and tracked");
    Disposition::Ack
}

/// Where a ticket's request came from: its receipt, and what of its
/// properties goes into its events.
fn origin(
    ctx: &Context,
    delivery: &Delivery,
    received_at: chrono::DateTime<Utc>,
    traceparent: Option<TraceParent>,
) -> Origin {
    Origin {
        received_at,
        correlation_id: correlation_id(delivery).map(str::to_owned),
        reply_to: reply_to(ctx, delivery).map(str::to_owned),
        traceparent,
    }
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
fn reply_to<'a>(ctx: &Context, delivery: &'a Delivery) -> Option<&'a str> {
    delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|s| s.as_str())
        .filter(|r| {
            request::check_reply_to(r, &ctx.topology.request_queue).is_ok()
                && request::check_reply_to_allowed(r, &ctx.settings.amqp.reply_to_allowed).is_ok()
        })
}

/// Tells the gate why this create could not be served.
fn report_refusal(ctx: &Context, claim: Option<ProbeClaim>, refusal: Refusal, detail: &str) {
    match claim {
        Some(claim) => ctx.gate.probe_failed(claim, refusal, detail),
        None => ctx.gate.close(refusal, detail),
    }
}
