//! The broker session: connect, declare, consume, and rebuild with backoff
//! whenever the broker goes away or a channel dies.
//!
//! [`supervise`] keeps one [`Session`] at a time: a connection, the
//! confirm-mode publisher (handed to the pipeline's context), the request
//! channel and the tracking consumer. Requests are taken one at a time with
//! `basic.get`, and only once everything a create waits for is in hand (a
//! free handler slot, an open gate, the create budget's slot): a request that
//! is only waiting waits in the broker, never in memory. Each delivery gets
//! its own task in the pipeline; a lost session cancels the leases of the
//! requests it handed out.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicConsumeOptions, BasicGetOptions, BasicQosOptions},
    types::FieldTable,
    Channel, Connection, Consumer,
};
use tokio::{sync::OwnedSemaphorePermit, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::background;
use crate::{
    broker::{self, BrokerError, PublishError, Publisher},
    gate::{self, IntakeTurn},
    metrics::GaugeGuard,
    pipeline::{self, context::Context, lease::Lease},
    quota::{Prepaid, Slot, SlotError},
    retry::RetryPolicy,
};

/// How often the session checks that its connection and channels live.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);
/// Shortest and longest wait before looking again at an empty request queue.
const IDLE_MIN: Duration = Duration::from_millis(20);
const IDLE_MAX: Duration = Duration::from_millis(250);

/// Keeps a session alive until shutdown.
pub(super) async fn supervise(ctx: Arc<Context>) -> Result<(), BrokerError> {
    let tracker = TaskTracker::new();
    let reconnect = RetryPolicy {
        initial: Duration::from_millis(250),
        max: Duration::from_secs(5),
    };
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    let mut nodes = broker::NodeOrder::shuffled(ctx.settings.amqp.node_count());
    loop {
        if ctx.shutdown.is_cancelled() {
            break;
        }
        match Session::open(&ctx, &nodes).await {
            Ok(session) => {
                let (node, index) = (session.node.clone(), session.node_index);
                if ever_connected {
                    tracing::info!(node = %node, "reconnected to the broker");
                } else {
                    tracing::info!(node = %node, "connected to the broker; consuming");
                }
                ever_connected = true;
                attempt = 0;
                match session.run(&ctx, &tracker).await {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost(reason) => {
                        tracing::warn!(node = %node, reason = %reason, "lost the broker session; reconnecting");
                        ctx.health.broker_down(format!("{reason} (node {node})"));
                        nodes.lost(index);
                    }
                }
            }
            Err(e) if e.is_fatal_at_start() && !ever_connected => {
                // A mismatched, forbidden or missing queue or exchange: the
                // message names it and says what to do.
                return Err(e);
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "cannot reach the broker; retrying");
                } else {
                    tracing::debug!(error = %e, attempt, "still cannot reach the broker");
                }
                ctx.health.broker_down(e.to_string());
            }
        }
        ctx.publisher.send_replace(None);
        ctx.metrics.set_broker_connected(false);
        let delay = reconnect.delay_for_attempt(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    // Shut down while disconnected: give handlers their grace period to
    // finish what they can once the broker is back.
    drain_handlers(&ctx, &tracker).await;
    Ok(())
}

async fn drain_handlers(ctx: &Context, tracker: &TaskTracker) {
    ctx.health.stopping();
    tracker.close();
    let grace = ctx.settings.shutdown.grace_period;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            still_running = tracker.len(),
            "grace period over; unfinished messages go back to the queue"
        );
    }
}

enum SessionEnd {
    Shutdown,
    Lost(Lost),
}

/// Why a session was lost: each is followed by a reconnect.
#[derive(Debug, thiserror::Error)]
pub(super) enum Lost {
    /// The connection or one of its channels closed under the session.
    #[error("the {0} closed")]
    Closed(&'static str),
    /// The tracking consumer could not start.
    #[error("cannot consume the tracking queue: {0}")]
    Consume(#[source] lapin::Error),
    /// The tracking consumer's stream failed.
    #[error("tracking consumer failed: {0}")]
    Consumer(#[source] lapin::Error),
    /// The broker cancelled the tracking consumer.
    #[error("the broker cancelled the tracking consumer")]
    Cancelled,
    /// The handler slots were closed (the worker is going away).
    #[error("the handler slots were closed")]
    SlotsClosed,
    /// The passive look at the request queue failed.
    #[error("cannot look at the request queue: {0}")]
    LookAtQueue(#[source] lapin::Error),
    /// The quota ledger was gone and could not be declared again.
    #[error("cannot declare the quota ledger: {0}")]
    DeclareLedger(#[source] BrokerError),
    /// A quota slot could not be claimed.
    #[error("cannot claim a quota slot: {0}")]
    ClaimSlot(#[source] PublishError),
    /// `basic.get` failed.
    #[error("cannot take requests: {0}")]
    Take(#[source] lapin::Error),
    /// The journal could not be read or written.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The worker is told to stop: the intake loop returns this at its next
    /// wait.
    #[error("shutting down")]
    Stopping,
}

struct Session {
    conn: Arc<Connection>,
    /// The node of `amqp.url` the connection reached: `host:port`, and its
    /// index in the list.
    node: String,
    node_index: usize,
    /// The broker user the connection authenticated as.
    user: String,
    publisher: Publisher,
    /// Requests are taken (`basic.get`) and acknowledged on this channel.
    intake_channel: Channel,
    tracking_channel: Channel,
    /// Cancelled when the session is lost: every lease of its deliveries
    /// ends with it.
    token: CancellationToken,
}

impl Session {
    async fn open(ctx: &Context, nodes: &broker::NodeOrder) -> Result<Self, BrokerError> {
        let connected = broker::connect_to_any(&ctx.settings, "worker", nodes).await?;
        let conn = Arc::new(connected.conn);
        ctx.topology.declare(&conn).await?;
        let publisher = Publisher::open(conn.clone())
            .await
            .map_err(BrokerError::Connection)?;
        let intake_channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::Connection)?;
        let tracking_channel = consuming_channel(&conn, ctx.settings.polling.prefetch)
            .await
            .map_err(BrokerError::Connection)?;
        Ok(Self {
            conn,
            node: connected.node,
            node_index: connected.index,
            user: connected.user,
            publisher,
            intake_channel,
            tracking_channel,
            token: CancellationToken::new(),
        })
    }

    fn alive(&self) -> Result<(), Lost> {
        if !self.conn.status().connected() {
            return Err(Lost::Closed("connection"));
        }
        if !self.intake_channel.status().connected() {
            return Err(Lost::Closed("request channel"));
        }
        if !self.tracking_channel.status().connected() {
            return Err(Lost::Closed("tracking channel"));
        }
        Ok(())
    }

    async fn run(self, ctx: &Arc<Context>, tracker: &TaskTracker) -> SessionEnd {
        ctx.publisher.send_replace(Some(self.publisher.clone()));
        ctx.health.broker_up(&self.node);
        ctx.metrics.set_broker_connected(true);
        let sampler_stop = CancellationToken::new();
        let sampler = tokio::spawn(background::sample_tracked(
            self.conn.create_channel().await.ok(),
            ctx.clone(),
            sampler_stop.clone(),
        ));
        let end = self.consume(ctx, tracker).await;
        // Let the sampler drop its channel while the connection is still
        // open (a channel closed after its connection is logged as an error).
        sampler_stop.cancel();
        let _ = sampler.await;
        ctx.health.set_consuming(false);
        match &end {
            SessionEnd::Shutdown => {
                // The tracking consumer is not cancelled (on RabbitMQ 3.10 a
                // cancel racing with quorum-queue deliveries crashes the
                // channel): what it delivered but nobody took stays
                // unacknowledged and returns to the queue when the
                // connection closes, after the handlers already running
                // have finished.
                drain_handlers(ctx, tracker).await;
                self.token.cancel();
                self.publisher.close().await;
                let _ = self.tracking_channel.close(200, "shutdown".into()).await;
                let _ = self.intake_channel.close(200, "shutdown".into()).await;
                let _ = self.conn.close(200, "shutdown".into()).await;
            }
            SessionEnd::Lost(_) => {
                self.token.cancel();
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.conn.close(320, "session lost".into()),
                )
                .await;
            }
        }
        end
    }

    /// Reads the journal up to now (in a follower task that keeps reading
    /// for the rest of the session), makes sure the deployment has a key,
    /// and names the quota ledger: before this, no ticket is read or
    /// written.
    async fn join_journal(
        &self,
        ctx: &Arc<Context>,
        tag_base: &str,
    ) -> Result<tokio::task::JoinHandle<crate::journal::JournalError>, Lost> {
        let channel = self.conn.create_channel().await.map_err(Lost::Consume)?;
        ctx.journal.set_user(&self.user);
        let follower = tokio::spawn({
            let journal = ctx.journal.clone();
            let publisher = self.publisher.clone();
            let tag = format!("{tag_base}.journal");
            async move { journal.follow(channel, tag, publisher).await }
        });
        let ready = async {
            ctx.journal.sync(&self.publisher).await?;
            match ctx.journal.ensure_key(&self.publisher).await {
                Ok(true) => {}
                Ok(false) => {}
                Err(e @ crate::journal::JournalError::KeyNotAccepted(_)) => {
                    if ctx.unverified_log.due() {
                        tracing::warn!(error = %e, "tickets are signed with a key derived from the API key only: workers holding other API keys cannot read them; set tickets.secret");
                    }
                }
                Err(e) => return Err(e),
            }
            Ok::<(), crate::journal::JournalError>(())
        };
        let mut follower = follower;
        tokio::select! {
            result = ready => {
                if let Err(e) = result {
                    follower.abort();
                    return Err(Lost::Journal(e));
                }
            }
            // The follower stops first (no read permission, the stream gone):
            // that is the reason, not the sync that can no longer come.
            ended = &mut follower => {
                return Err(match ended {
                    Ok(e) => Lost::Journal(e),
                    Err(_) => Lost::Closed("journal follower"),
                });
            }
        }
        ctx.budget
            .name_with(&ctx.signer.tag(crate::quota::LEDGER_TAG_LABEL));
        Ok(follower)
    }

    async fn consume(&self, ctx: &Arc<Context>, tracker: &TaskTracker) -> SessionEnd {
        let tag_base = format!("vidu-worker.{}.{}", broker::host_name(), std::process::id());
        let mut follower = match self.join_journal(ctx, &tag_base).await {
            Ok(f) => f,
            Err(reason) => return SessionEnd::Lost(reason),
        };
        let mut tracking = match start_consumer(
            &self.tracking_channel,
            &ctx.topology.tracking_queue,
            &format!("{tag_base}.tracking"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return SessionEnd::Lost(Lost::Consume(e)),
        };
        ctx.health.set_consuming(true);
        let intake = intake_loop(ctx, self, tracker);
        tokio::pin!(intake);
        let mut watchdog = tokio::time::interval(WATCHDOG_PERIOD);
        loop {
            tokio::select! {
                biased;
                () = ctx.shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = watchdog.tick() => {
                    if let Err(reason) = self.alive() {
                        return SessionEnd::Lost(reason);
                    }
                }
                reason = &mut intake => return match reason {
                    Lost::Stopping => SessionEnd::Shutdown,
                    reason => SessionEnd::Lost(reason),
                },
                ended = &mut follower => {
                    let reason = match ended {
                        Ok(e) => Lost::Journal(e),
                        Err(_) => Lost::Closed("journal follower"),
                    };
                    return SessionEnd::Lost(reason);
                }
                delivery = tracking.next() => match delivery {
                    Some(Ok(d)) => spawn_ticket(tracker, ctx.clone(), d),
                    Some(Err(e)) => return SessionEnd::Lost(Lost::Consumer(e)),
                    None => return SessionEnd::Lost(Lost::Cancelled),
                },
            }
        }
    }
}

/// Takes requests, one at a time, once a create could follow at once: a
/// free handler slot, the gate and the create budget (the pause after a
/// 429, a slot in the deployment's window) come first, the delivery last.
/// Returns why it stopped: [`Lost::Stopping`] at its next wait once the
/// worker is told to stop, or why the session cannot serve it any more.
async fn intake_loop(ctx: &Arc<Context>, session: &Session, tracker: &TaskTracker) -> Lost {
    let channel = &session.intake_channel;
    let queue = ctx.topology.request_queue.as_str();
    let mut idle = IDLE_MIN;
    // Ready requests the last look reported; with a quota a slot is only
    // claimed when some are known to be there.
    let mut known_ready: u32 = 0;
    let mut gate_changes = ctx.gate.subscribe();
    loop {
        let Ok(held) = unless_stopped(ctx, ctx.held.clone().acquire_owned()).await else {
            return Lost::Stopping;
        };
        let Ok(held) = held else {
            return Lost::SlotsClosed;
        };
        loop {
            match ctx.gate.intake_turn() {
                IntakeTurn::Take => break,
                IntakeTurn::Wait(at) => {
                    tokio::select! {
                        () = ctx.shutdown.cancelled() => return Lost::Stopping,
                        _ = gate_changes.changed() => {}
                        () = gate::sleep_until(at) => {}
                    }
                }
            }
        }
        let slot = match ctx.slots.withdraw() {
            Some(spare) => spare,
            None => match take_slot(ctx, session, &mut known_ready, &mut idle).await {
                Ok(Some(slot)) => slot,
                Ok(None) => continue,
                Err(reason) => return reason,
            },
        };
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
        {
            Ok(Some(message)) => {
                idle = IDLE_MIN;
                known_ready = message.message_count;
                let lease = Lease::new(message.delivery.acker.clone(), session.token.clone());
                let prepaid = Prepaid::new(ctx.slots.clone(), slot);
                spawn_request(tracker, ctx.clone(), message.delivery, held, lease, prepaid);
            }
            Ok(None) => {
                known_ready = 0;
                // Kept for the next request, if one comes soon enough.
                ctx.slots.deposit(slot);
                drop(held);
                if unless_stopped(ctx, tokio::time::sleep(idle)).await.is_err() {
                    return Lost::Stopping;
                }
                idle = (idle * 2).min(IDLE_MAX);
            }
            Err(e) => return Lost::Take(e),
        }
    }
}

/// `f`, unless the worker is told to stop first.
async fn unless_stopped<F: std::future::Future>(ctx: &Context, f: F) -> Result<F::Output, Lost> {
    tokio::select! {
        biased;
        () = ctx.shutdown.cancelled() => Err(Lost::Stopping),
        out = f => Ok(out),
    }
}

/// Takes a new create slot from the budget: the pause after a 429 and,
/// when the quota is known, a claim in the deployment's window, claimed
/// only once requests are known to be waiting (a slot claimed for an empty
/// queue is kept for a short while, then wasted). `Ok(None)`: look again.
async fn take_slot(
    ctx: &Arc<Context>,
    session: &Session,
    known_ready: &mut u32,
    idle: &mut Duration,
) -> Result<Option<Slot>, Lost> {
    let channel = &session.intake_channel;
    let queue = ctx.topology.request_queue.as_str();
    if ctx.budget.current_ledger().is_some() {
        while *known_ready == 0 {
            match broker::ready_messages(channel, queue).await {
                Ok(0) => {
                    unless_stopped(ctx, tokio::time::sleep(*idle)).await?;
                    *idle = (*idle * 2).min(IDLE_MAX);
                }
                Ok(n) => *known_ready = n,
                Err(e) => return Err(Lost::LookAtQueue(e)),
            }
        }
    }
    match ctx.budget.take(&session.publisher, &ctx.shutdown).await {
        Ok(slot) => Ok(Some(slot)),
        Err(SlotError::Cancelled) => Err(Lost::Stopping),
        Err(SlotError::Broker(e)) => Err(Lost::ClaimSlot(e)),
        Err(SlotError::Ledger(e)) => Err(Lost::DeclareLedger(e)),
    }
}

/// A channel for one consumer, with its prefetch.
async fn consuming_channel(conn: &Connection, prefetch: u16) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel)
}

async fn start_consumer(
    channel: &Channel,
    queue: &str,
    tag: &str,
) -> Result<Consumer, lapin::Error> {
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

fn spawn_request(
    tracker: &TaskTracker,
    ctx: Arc<Context>,
    delivery: Delivery,
    held: OwnedSemaphorePermit,
    lease: Lease,
    prepaid: Prepaid,
) {
    tracker.spawn(async move {
        let _held = held;
        let _in_flight = GaugeGuard::new(ctx.metrics.in_flight_requests());
        let taken = Instant::now();
        pipeline::handle_request(&ctx, &delivery, &lease, prepaid).await;
        ctx.metrics.observe_hold(taken.elapsed().as_secs_f64());
    });
}

fn spawn_ticket(tracker: &TaskTracker, ctx: Arc<Context>, delivery: Delivery) {
    tracker.spawn(async move {
        let _in_flight = GaugeGuard::new(ctx.metrics.in_flight_tickets());
        pipeline::handle_ticket(&ctx, &delivery).await;
    });
}
