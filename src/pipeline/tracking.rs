//! Tracking: one delivery from the tracking queue, one poll.
//!
//! After a task is created, everything needed to finish the request lives in
//! a small signed ticket in the broker, never in a worker's memory. A ticket
//! waits in the fixed-delay wait queues (dead-lettering at-least-once into
//! the tracking queue); any worker picks it up when due, reads it (a message
//! that is not this deployment's ticket is dead-lettered and never acted
//! on), polls the task once, and carries out what
//! [`decisions::after_poll`] says: publish the terminal event, or park the
//! ticket again (after a progress event when the state changed). With a
//! bucket, a succeeded task's videos are copied into it first
//! ([`decisions::after_copy`] says what a failed copy does). A killed
//! worker loses nothing: its unacknowledged tickets are redelivered. This
//! module never creates upstream tasks.

use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;

use chrono::DateTime;
use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};

use super::{
    context::Context,
    decisions::{
        self, AtPoll, BeforePoll, CopyStep, GateEffect, NextPoll, PollStep, Progress, Terminal,
        UnverifiedStep,
    },
    disposition::Disposition,
    poison,
    ticket::{
        to_chrono, Ticket, TicketKeys, Unreadable, TICKET_TYPE, UNVERIFIED_HOPS_HEADER,
        UNVERIFIED_SINCE_HEADER,
    },
};
use crate::{
    broker,
    events::{self, EventKind, FailureCode},
    gate::Refusal,
    signing::{Presented, DEPLOYMENT_SIGNATURE_HEADER, SIGNATURE_HEADER},
    storage::{self, StoredCopy},
    upstream::{TaskStatus, Video},
};

/// How long a ticket is held while the broker refuses its next copy or its
/// terminal event, retrying, before the worker gives up on this delivery.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// Handles one delivery from the tracking queue.
#[tracing::instrument(name = "ticket", skip_all, fields(request_id, model, task_id))]
pub(crate) async fn handle(ctx: &Context, delivery: &Delivery) -> Disposition {
    let keys = TicketKeys {
        signer: &ctx.signer,
        accept_unsigned_until: ctx.settings.tickets.accept_unsigned.until(),
        now: Utc::now(),
        request_queue: &ctx.topology.request_queue,
    };
    let presented = Presented {
        legacy: broker::header_str(&delivery.properties, SIGNATURE_HEADER),
        deployment: broker::header_str(&delivery.properties, DEPLOYMENT_SIGNATURE_HEADER),
    };
    let mut ticket = match Ticket::read(&delivery.data, presented, &keys) {
        Ok(t) => t,
        Err(unreadable) if unreadable.is_unverified() => {
            return keep_unverified(ctx, delivery, presented).await
        }
        Err(unreadable) => return reject(ctx, delivery, &unreadable).await,
    };
    let span = tracing::Span::current();
    span.record("request_id", ticket.request_id.as_str());
    span.record("model", ticket.model.as_str());
    span.record("task_id", ticket.task_id.as_str());

    if let Some(count) = poison::check(delivery, ctx.settings.amqp.max_deliveries) {
        return poisoned(ctx, delivery, &ticket, count).await;
    }

    if ctx.journal.canceled(&ticket.request_id) {
        // Novita has no cancel: the task runs on and is paid for; the
        // request ends here, with the task's id, and is polled no more.
        tracing::info!("canceled by its producer after its create; no longer tracking the task");
        let terminal = Terminal::Failed {
            code: FailureCode::Canceled,
            message: "canceled by its producer after it was created: the task (paid for) is no longer tracked".to_owned(),
        };
        return finish(ctx, &ticket, terminal, &[], &[]).await;
    }

    if let Some(disposition) = wait_until_due(ctx, &mut ticket).await {
        return disposition;
    }

    let answer = ctx
        .upstream
        .task_result(ticket.task_id.as_str(), ticket.traceparent.as_ref())
        .await;
    match &answer {
        Ok(r)
            if r.status == TaskStatus::Succeeded
                && r.videos.is_empty()
                && r.bad_video.is_none() =>
        {
            tracing::warn!("the upstream reports success without a video URL; looking again later");
        }
        Err(err) => tracing::debug!(error = %err, errors = ticket.errors, "poll failed"),
        Ok(_) => {}
    }
    let error_detail = answer.as_ref().err().map(ToString::to_string);
    let now = Utc::now();
    let decision = decisions::after_poll(ticket, answer, now, &ctx.settings.polling);
    ctx.metrics.poll(decision.outcome);
    match decision.gate {
        GateEffect::Keep => {}
        GateEffect::Open => ctx.gate.open(),
        GateEffect::CloseForKey => ctx.gate.close(
            Refusal::Key,
            error_detail
                .as_deref()
                .unwrap_or("the upstream refused the API key"),
        ),
    }
    let mut ticket = decision.ticket;
    match decision.step {
        PollStep::Finish(Terminal::Succeeded(videos)) if ctx.storage.is_some() => {
            keep_videos(ctx, ticket, videos).await
        }
        PollStep::Finish(terminal) => finish(ctx, &ticket, terminal, &[], &[]).await,
        PollStep::Again { next, progress } => {
            if let Some(progress) = progress {
                report_progress(ctx, &mut ticket, progress).await;
            }
            ticket.next_poll_at = next_poll_at(ctx, next, now);
            park_patiently(ctx, &ticket).await
        }
    }
}

/// Dead-letters a message that is not one of this deployment's tickets,
/// saying why: no poll, no event.
async fn reject(ctx: &Context, delivery: &Delivery, unreadable: &Unreadable) -> Disposition {
    let reason = unreadable.reason;
    ctx.metrics.ticket_rejected(reason);
    tracing::warn!(reason = reason.as_str(), problem = %unreadable.detail, "dead-lettering a message on a tracking queue that is not one of this deployment's tickets");
    let why = format!(
        "not a ticket of this deployment ({}): {}",
        reason.as_str(),
        unreadable.detail
    );
    match ctx.dead_letter(delivery, &why, None).await {
        Ok(()) => Disposition::Ack,
        Err(_) => Disposition::Requeue,
    }
}

/// Keeps a message signed by a key this worker does not hold: an unchanged
/// copy (same body, same signatures) goes back through the wait queues for
/// whichever worker reads it next, with a doubling delay, until
/// `polling.max_off_peak_task_age` after it was first kept; then it is
/// dead-lettered with its signatures, so that it can be sent again once
/// the configuration is right. Never polled, never an event.
async fn keep_unverified(
    ctx: &Context,
    delivery: &Delivery,
    presented: Presented<'_>,
) -> Disposition {
    ctx.metrics.ticket_unverified();
    if ctx.unverified_log.due() {
        tracing::warn!("a ticket on the tracking queues is signed with a key this worker does not hold; keeping it for a worker that holds it (a rotation of tickets.secret not finished on every worker, or a forgery: compare tickets.secret and tickets.previous_secrets across the workers)");
    } else {
        tracing::debug!("kept another ticket signed with a key this worker does not hold");
    }
    let now = Utc::now();
    let since = broker::header_str(&delivery.properties, UNVERIFIED_SINCE_HEADER)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map_or(now, |t| t.with_timezone(&Utc).min(now));
    let hops = broker::header_int(&delivery.properties, UNVERIFIED_HOPS_HEADER)
        .and_then(|h| u32::try_from(h).ok())
        .unwrap_or(0);
    let max_age = ctx.settings.polling.max_off_peak_task_age;
    match decisions::after_unverified(since, hops, now, max_age) {
        UnverifiedStep::GiveUp => {
            let why = format!(
                "unverified: kept {} hours for a worker holding the key of its signature and none read it; dead-lettered with its signatures (x-vidu-signature, x-vidu-deployment-signature), which a worker with the right tickets.secret accepts when it is published to the tracking queue again",
                max_age.as_secs() / 3600
            );
            match ctx.dead_letter(delivery, &why, None).await {
                Ok(()) => Disposition::Ack,
                Err(_) => Disposition::Requeue,
            }
        }
        UnverifiedStep::Keep(delay) => {
            let queue = ctx.parking_queue(delay);
            let properties = unverified_copy(presented, since, hops.saturating_add(1));
            match ctx
                .patiently(PUBLISH_PATIENCE, || {
                    ctx.publish("", queue, &delivery.data, properties.clone(), true)
                })
                .await
            {
                Ok(()) => Disposition::Ack,
                Err(e) => {
                    tracing::warn!(error = %e, "could not keep a ticket this worker cannot verify; handing it back");
                    Disposition::Requeue
                }
            }
        }
    }
}

/// Properties of a kept copy: a ticket's, with the signatures it came with
/// and how long and how often it has been kept.
fn unverified_copy(presented: Presented<'_>, since: DateTime<Utc>, hops: u32) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in [
        (SIGNATURE_HEADER, presented.legacy),
        (DEPLOYMENT_SIGNATURE_HEADER, presented.deployment),
    ] {
        if let Some(v) = value {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(v)));
        }
    }
    headers.insert(
        UNVERIFIED_SINCE_HEADER.into(),
        AMQPValue::LongString(LongString::from(since.to_rfc3339())),
    );
    headers.insert(
        UNVERIFIED_HOPS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(hops)),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(TICKET_TYPE.into())
        .with_headers(headers)
}

/// Waits until the ticket is due for its poll, as
/// [`decisions::before_poll`] and [`decisions::at_poll`] say: another hop
/// through a wait queue when it is not due for a while, a wait in memory
/// within the shortest tier, or a hop while the key is refused. `None`
/// means poll now.
async fn wait_until_due(ctx: &Context, ticket: &mut Ticket) -> Option<Disposition> {
    match decisions::before_poll(&ctx.topology.wait_queues, ticket.remaining(Utc::now())) {
        BeforePoll::Hop => return Some(park_patiently(ctx, ticket).await),
        BeforePoll::WaitHere(remaining) => {
            tokio::select! {
                () = ctx.shutdown.cancelled() => return Some(Disposition::Abandon),
                () = tokio::time::sleep(remaining) => {}
            }
        }
        BeforePoll::Poll => {}
    }
    match decisions::at_poll(&ctx.gate.state(), tokio::time::Instant::now()) {
        AtPoll::Poll => None,
        AtPoll::Defer(wait) => {
            ticket.next_poll_at = Utc::now() + to_chrono(wait);
            Some(park_patiently(ctx, ticket).await)
        }
    }
}

/// The time a [`NextPoll`] stands for, with this worker's settings.
fn next_poll_at(ctx: &Context, next: NextPoll, now: DateTime<Utc>) -> DateTime<Utc> {
    decisions::next_poll_at(next, now, &ctx.settings.polling, ctx.retry_policy())
}

/// Publishes a progress event; records the state in the ticket once it is
/// out. Not worth holding the ticket for: the next poll tries again.
async fn report_progress(ctx: &Context, ticket: &mut Ticket, progress: Progress) {
    let kind = EventKind::Progress {
        task_id: ticket.task_id.as_str(),
        status: progress.status.as_str(),
        progress_percent: progress.percent,
        eta_seconds: progress.eta_seconds,
    };
    let event = events::build(&ctx.settings.events.source, &ticket.context(), &kind);
    match ctx.publish_event(&event).await {
        Ok(()) => {
            ticket.last_status = Some(progress.status);
            ticket.last_progress = progress.percent;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not publish a progress event; trying again at the next poll");
        }
    }
}

/// Copies a succeeded task's videos into the bucket, then does what
/// [`decisions::after_copy`] says: `succeeded` with the copies, look again
/// later, pause for the storage, or `storage_failed` with the videos.
/// While the storage refuses us the copy is not even tried
/// ([`decisions::at_copy`]).
async fn keep_videos(ctx: &Context, mut ticket: Ticket, videos: Vec<Video>) -> Disposition {
    let Some(storage) = ctx.storage.as_ref() else {
        return finish(ctx, &ticket, Terminal::Succeeded(videos), &[], &[]).await;
    };
    if let AtPoll::Defer(wait) = decisions::at_copy(&ctx.gate.state(), tokio::time::Instant::now())
    {
        ticket.next_poll_at = Utc::now() + to_chrono(wait);
        return park_patiently(ctx, &ticket).await;
    }
    let mut stored = Vec::with_capacity(videos.len());
    let mut failure = None;
    for (n, video) in videos.iter().enumerate() {
        let key = storage::object_key(
            &storage.settings().prefix,
            ticket.request_id.as_str(),
            ticket.task_id.as_str(),
            n,
            video.kind.as_deref(),
        );
        let copied = tokio::select! {
            () = ctx.shutdown.cancelled() => return Disposition::Abandon,
            copied = storage.copy(video, &key) => copied,
        };
        match copied {
            Ok(copy) => stored.push(copy),
            Err(e) => {
                tracing::warn!(error = %e, video = n, "could not store the video");
                failure = Some(e);
                break;
            }
        }
    }
    let result = match failure {
        None => Ok(stored),
        Some(e) => Err(e),
    };
    let now = Utc::now();
    match decisions::after_copy(&mut ticket, result, now) {
        CopyStep::Succeed(stored) => {
            finish(ctx, &ticket, Terminal::Succeeded(videos), &stored, &[]).await
        }
        CopyStep::Fail(message) => {
            let terminal = Terminal::Failed {
                code: FailureCode::StorageFailed,
                message,
            };
            finish(ctx, &ticket, terminal, &[], &videos).await
        }
        CopyStep::Again(next) => {
            ticket.next_poll_at = next_poll_at(ctx, next, now);
            park_patiently(ctx, &ticket).await
        }
        CopyStep::Pause(reason) => {
            ctx.gate.close(Refusal::Storage, &reason);
            if let AtPoll::Defer(wait) =
                decisions::at_copy(&ctx.gate.state(), tokio::time::Instant::now())
            {
                ticket.next_poll_at = now + to_chrono(wait);
            }
            park_patiently(ctx, &ticket).await
        }
    }
}

/// Parks the ticket's next copy, retrying while the broker refuses it (the
/// ticket stays held meanwhile, so the task is not polled again); hands it
/// back only when that lasts longer than [`PUBLISH_PATIENCE`].
async fn park_patiently(ctx: &Context, ticket: &Ticket) -> Disposition {
    match ctx.patiently(PUBLISH_PATIENCE, || ctx.park(ticket)).await {
        Ok(()) => Disposition::Ack,
        Err(e) => {
            tracing::warn!(error = %e, "could not park the ticket; handing it back");
            Disposition::Requeue
        }
    }
}

/// Publishes the terminal event, retrying while the broker refuses it (the
/// ticket stays held and unacknowledged meanwhile). When that lasts longer
/// than [`PUBLISH_PATIENCE`], the ticket is parked again to be polled later
/// (and the event tried again then) rather than handed back at once, which
/// would poll the task again immediately.
///
/// `stored` is the copies a `succeeded` event names; `not_kept` the
/// upstream's videos a `storage_failed` one carries.
async fn finish(
    ctx: &Context,
    ticket: &Ticket,
    terminal: Terminal,
    stored: &[StoredCopy],
    not_kept: &[Video],
) -> Disposition {
    let now = Utc::now();
    let kind = match &terminal {
        Terminal::Succeeded(videos) => EventKind::Succeeded {
            task_id: ticket.task_id.as_str(),
            videos,
            submitted_at: ticket.submitted_at,
            completed_at: now,
            stored,
        },
        Terminal::Failed { code, message } => EventKind::Failed {
            task_id: Some(ticket.task_id.as_str()),
            code: *code,
            message,
            videos: not_kept,
        },
    };
    let event = events::build(&ctx.settings.events.source, &ticket.context(), &kind);
    match ctx
        .patiently(PUBLISH_PATIENCE, || ctx.publish_event(&event))
        .await
    {
        Ok(()) => {
            let latency = (Utc::now() - ticket.received_at)
                .to_std()
                .unwrap_or(Duration::ZERO);
            ctx.metrics.observe_latency(latency.as_secs_f64());
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
            let again = decisions::after_failed_terminal(
                ticket,
                Utc::now(),
                &ctx.settings.polling,
                ctx.retry_policy(),
            );
            park_patiently(ctx, &again).await
        }
    }
}

async fn poisoned(ctx: &Context, delivery: &Delivery, ticket: &Ticket, count: i64) -> Disposition {
    let message = format!(
        "tracking stopped: handling this ticket failed {count} times in a row (amqp.max_deliveries)"
    );
    tracing::error!(
        deliveries = count,
        "dead-lettering a ticket that keeps failing"
    );
    let why = format!("poison: {message}");
    if ctx.dead_letter(delivery, &why, None).await.is_err() {
        return Disposition::Requeue;
    }
    let terminal = Terminal::Failed {
        code: FailureCode::UpstreamFailed,
        message,
    };
    finish(ctx, ticket, terminal, &[], &[]).await
}
