//! The handler context: what every delivery handler of the pipeline works
//! with, and the publishing it does.
//!
//! [`Context`] holds the settings and broker names, the upstream client and
//! the video storage, the
//! waits in front of a create (gate, create budget), the memory of
//! recent creates, the ticket signer, and the current session's publisher,
//! which the session above swaps at each reconnect. Its methods are the
//! pipeline's only way to the broker: publish once, publish patiently
//! across reconnects, publish an event (and its `reply_to` copy), dead-letter
//! a delivery with fresh properties, and park a ticket in its wait tier.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::Utc;
use lapin::message::Delivery;
use tokio::{
    sync::{watch, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{decisions, recent::RecentCreates, ticket::Ticket};
use crate::{
    broker::{self, PublishError, Publisher, Topology},
    config::Settings,
    events::Event,
    gate::Gate,
    journal::Journal,
    metrics::Metrics,
    ops::Health,
    quota::{Budget, SlotBank},
    request,
    retry::RetryPolicy,
    signing::Signer,
    storage::Storage,
    trace::TraceParent,
    upstream::UpstreamClient,
};

/// What every delivery handler works with: the settings and names, the
/// upstream client and the waits in front of it (gate, create budget),
/// the current session's publisher, and the worker's memory of
/// recent creates. One per worker, shared by all handlers.
pub(crate) struct Context {
    pub(crate) settings: Settings,
    pub(crate) topology: Topology,
    pub(crate) upstream: UpstreamClient,
    /// Where paid videos are copied (`storage.bucket`), if anywhere.
    pub(crate) storage: Option<Arc<Storage>>,
    pub(crate) metrics: Metrics,
    pub(crate) gate: Gate,
    pub(crate) health: Health,
    pub(crate) shutdown: CancellationToken,
    /// The create budget: the pause after a 429 and the deployment's
    /// quota window (configured or learned).
    pub(crate) budget: Budget,
    /// Slots taken for requests that needed no create, for the next ones.
    pub(crate) slots: Arc<SlotBank>,
    /// The deployment's journal (deployment keys, sync marks).
    pub(crate) journal: Arc<Journal>,
    /// Throttles the warning about tickets signed with an unknown key.
    pub(crate) unverified_log: crate::telemetry::Every,
    /// The request-id claims this worker holds.
    pub(crate) claims: super::claim::Held,
    /// Throttles the warning about claims the broker would not give.
    pub(crate) claim_log: crate::telemetry::Every,
    /// Creates this worker made recently, by request id, so that a
    /// redelivered copy of a request it already created is not created again.
    pub(crate) recent: RecentCreates,
    /// Signs the tickets this deployment writes and verifies those it reads.
    pub(crate) signer: Arc<Signer>,
    /// One permit per request held (`amqp.prefetch`), across sessions: a
    /// handler that outlives its session still counts.
    pub(crate) held: Arc<Semaphore>,
    /// The current session's publisher (`None` between sessions).
    pub(crate) publisher: watch::Sender<Option<Publisher>>,
}

impl Context {
    /// Backoff for upstream retries.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial: self.settings.upstream.retry_initial,
            max: self.settings.upstream.retry_max,
        }
    }

    /// The current session's publisher, if connected.
    pub(crate) fn publisher(&self) -> Option<Publisher> {
        self.publisher.borrow().clone()
    }

    /// Publishes on the current session, once.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        match self.publisher() {
            Some(p) => {
                p.publish(exchange, routing_key, body, properties, mandatory)
                    .await
            }
            None => Err(PublishError::NotConnected),
        }
    }

    /// Retries `f` across broker reconnects until it succeeds or `patience`
    /// runs out.
    pub(crate) async fn patiently<F, Fut>(
        &self,
        patience: Duration,
        mut f: F,
    ) -> Result<(), PublishError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), PublishError>>,
    {
        let deadline = Instant::now() + patience;
        let mut sessions = self.publisher.subscribe();
        loop {
            match f().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "publish failed; retrying");
                    tokio::select! {
                        _ = sessions.changed() => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    /// Publishes an event to the exchange, and a terminal one to `reply_to`.
    pub(crate) async fn publish_event(&self, event: &Event) -> Result<(), PublishError> {
        self.publish(
            &self.topology.events_exchange,
            event.event_type,
            &event.body,
            event.properties.clone(),
            false,
        )
        .await?;
        self.metrics.event(event.event_type);
        if let Some(reply_to) = &event.reply_to {
            // Best effort: the event is on the exchange; a reply queue that
            // is gone, full or refusing is the producer's to fix, and must
            // not make the request end twice.
            if let Err(e) = self
                .publish("", reply_to, &event.body, event.properties.clone(), true)
                .await
            {
                self.metrics.reply_failure();
                tracing::warn!(error = %e, "the reply_to queue did not take the terminal event; it is on the events exchange");
            }
        }
        Ok(())
    }

    /// Copies a delivery to the dead-letter queue with `x-vidu-error`, with
    /// properties built afresh (never the producer's `user_id`,
    /// `expiration` or headers).
    pub(crate) async fn dead_letter(
        &self,
        delivery: &Delivery,
        why: &str,
        traceparent: Option<&TraceParent>,
    ) -> Result<(), PublishError> {
        let properties = broker::dead_letter_properties(
            &delivery.properties,
            why,
            delivery.routing_key.as_str(),
            traceparent,
        );
        // A body over the request limit is not copied: the broker's own
        // message size limit would have to carry it twice, and the header
        // already says how big it was.
        let body: &[u8] = if delivery.data.len() > request::MAX_BODY_BYTES {
            b""
        } else {
            &delivery.data
        };
        self.publish("", &self.topology.dead_queue, body, properties, true)
            .await
    }

    /// Records an accepted create in the journal, on the current session.
    pub(crate) async fn record_created(
        &self,
        created: &crate::journal::Created,
    ) -> Result<(), PublishError> {
        let Some(publisher) = self.publisher() else {
            return Err(PublishError::NotConnected);
        };
        self.journal
            .record(&publisher, created)
            .await
            .map_err(|e| match e {
                crate::journal::JournalError::Publish(p) => p,
                other => PublishError::Unroutable(other.to_string()),
            })
    }

    /// The queue a ticket waits `remaining` in ([`decisions::parking_queue`]).
    pub(crate) fn parking_queue(&self, remaining: Duration) -> &str {
        decisions::parking_queue(
            &self.topology.wait_queues,
            &self.topology.tracking_queue,
            remaining,
        )
    }

    /// Parks a ticket until `next_poll_at`, in the longest wait queue that
    /// fits (or straight in the tracking queue when it is due now), signed.
    pub(crate) async fn park(&self, ticket: &Ticket) -> Result<(), PublishError> {
        let queue = self.parking_queue(ticket.remaining(Utc::now()));
        let body = serde_json::to_vec(ticket).unwrap_or_default();
        let signatures = self.signer.sign(&body);
        self.publish("", queue, &body, Ticket::properties(&signatures), true)
            .await?;
        self.metrics.ticket_hop();
        Ok(())
    }
}
