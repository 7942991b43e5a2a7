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
    pipeline::{self, context::Context, lanes::LanePicker, lease::Lease},
    quota::{Prepaid, Slot, SlotError},
    retry::RetryPolicy,
};

/// How often the session checks that its connection and channels live.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);
/// Shortest and longest wait before looking again at an empty request queue.
const IDLE_MIN: Duration = Duration::from_millis(20);
const IDLE_MAX: Duration = Duration::from_millis(250);
/// Longest a new session records waiting cancels before it takes requests.
const CANCEL_DRAIN_LIMIT: Duration = Duration::from_secs(30);

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

    /// Handles cancels as they come until their queue has none ready (at
    /// most [`CANCEL_DRAIN_LIMIT`]; what is left is recorded as it comes).
    async fn record_waiting_cancels(
        &self,
        ctx: &Arc<Context>,
        cancels: &mut Consumer,
    ) -> Result<(), Lost> {
        let until = Instant::now() + CANCEL_DRAIN_LIMIT;
        loop {
            tokio::select! {
                biased;
                () = ctx.shutdown.cancelled() => return Err(Lost::Stopping),
                delivery = cancels.next() => match delivery {
                    Some(Ok(d)) => pipeline::handle_cancel(ctx, &d).await,
                    Some(Err(e)) => return Err(Lost::Consumer(e)),
                    None => return Err(Lost::Cancelled),
                },
                () = tokio::time::sleep(Duration::from_millis(50)) => {
                    let ready = broker::ready_messages(&self.intake_channel, &ctx.topology.cancel_queue)
                        .await
                        .map_err(Lost::LookAtQueue)?;
                    if ready == 0 {
                        return Ok(());
                    }
                    if Instant::now() >= until {
                        tracing::warn!(ready, "cancels are still waiting in their queue; taking requests while they are recorded");
                        return Ok(());
                    }
                }
            }
        }
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
        let mut cancels = match start_consumer(
            &self.tracking_channel,
            &ctx.topology.cancel_queue,
            &format!("{tag_base}.cancel"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return SessionEnd::Lost(Lost::Consume(e)),
        };
        // Cancels waiting in their queue (a fleet that starts, or was
        // down) are recorded before this worker takes a request, so that
        // none of them is created first.
        match self.record_waiting_cancels(ctx, &mut cancels).await {
            Ok(()) => {}
            Err(Lost::Stopping) => return SessionEnd::Shutdown,
            Err(reason) => return SessionEnd::Lost(reason),
        }
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
                delivery = cancels.next() => match delivery {
                    Some(Ok(d)) => spawn_cancel(tracker, ctx.clone(), d),
                    Some(Err(e)) => return SessionEnd::Lost(Lost::Consumer(e)),
                    None => return SessionEnd::Lost(Lost::Cancelled),
                },
            }
        }
    }
}

/// Takes requests, one at a time, once a create could follow at once: a
/// free handler slot, the gate and the create budget (the pause after a
/// 429, a slot in the deployment's window) come first, the delivery last,
/// from the lane [`LanePicker`] chooses among those with waiting requests.
/// Returns why it stopped: [`Lost::Stopping`] at its next wait once the
/// worker is told to stop, or why the session cannot serve it any more.
async fn intake_loop(ctx: &Arc<Context>, session: &Session, tracker: &TaskTracker) -> Lost {
    let channel = &session.intake_channel;
    let mut idle = IDLE_MIN;
    let mut lanes = LaneView::new(ctx);
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
            None => match take_slot(ctx, session, &mut lanes, &mut idle).await {
                Ok(Some(slot)) => slot,
                Ok(None) => continue,
                Err(reason) => return reason,
            },
        };
        // The lanes believed empty are looked at again (at most every
        // LOOK_AGAIN), so that a lane that fills is seen beside a backlog.
        if let Err(e) = lanes.refresh(channel, false).await {
            return Lost::LookAtQueue(e);
        }
        let mut taken = None;
        while let (None, Some(lane)) = (&taken, lanes.pick()) {
            match lanes.take(channel, lane).await {
                Ok(message) => taken = message,
                Err(e) => return Lost::Take(e),
            }
        }
        // Every lane believed empty: a last look at each (a request may
        // have come since its count was taken).
        for lane in 0..lanes.len() {
            if taken.is_some() {
                break;
            }
            match lanes.take(channel, lane).await {
                Ok(message) => taken = message,
                Err(e) => return Lost::Take(e),
            }
        }
        match taken {
            Some(message) => {
                idle = IDLE_MIN;
                let lease = Lease::new(message.delivery.acker.clone(), session.token.clone());
                let prepaid = Prepaid::new(ctx.slots.clone(), slot);
                spawn_request(tracker, ctx.clone(), message.delivery, held, lease, prepaid);
            }
            None => {
                // Kept for the next request, if one comes soon enough.
                ctx.slots.deposit(slot);
                drop(held);
                if unless_stopped(ctx, tokio::time::sleep(idle)).await.is_err() {
                    return Lost::Stopping;
                }
                idle = (idle * 2).min(IDLE_MAX);
            }
        }
    }
}

/// How stale the count of a lane believed empty may be before a pick.
const LOOK_AGAIN: Duration = IDLE_MAX;

/// What the intake loop knows of its lanes: their queues, the requests
/// each had waiting when last seen (from `basic.get`'s message count, or a
/// passive declaration), and the picker.
struct LaneView {
    queues: Vec<String>,
    names: Vec<String>,
    ready: Vec<u32>,
    looked: Vec<Option<Instant>>,
    picker: LanePicker,
    metrics: crate::metrics::Metrics,
}

impl LaneView {
    fn new(ctx: &Context) -> Self {
        let lanes = &ctx.topology.lanes;
        Self {
            queues: lanes.iter().map(|l| l.queue.clone()).collect(),
            names: lanes.iter().map(|l| l.name.clone()).collect(),
            ready: vec![0; lanes.len()],
            looked: vec![None; lanes.len()],
            picker: LanePicker::new(&lanes.iter().map(|l| l.weight).collect::<Vec<_>>()),
            metrics: ctx.metrics.clone(),
        }
    }

    fn len(&self) -> usize {
        self.queues.len()
    }

    fn any_ready(&self) -> bool {
        self.ready.iter().any(|n| *n > 0)
    }

    /// Looks at the lanes believed empty (all of them with `all`) whose
    /// count is older than [`LOOK_AGAIN`]: one passive declaration each.
    async fn refresh(&mut self, channel: &Channel, all: bool) -> Result<(), lapin::Error> {
        if !all && self.queues.len() == 1 {
            // One lane: no choice to make, `basic.get` looks itself.
            return Ok(());
        }
        let now = Instant::now();
        for lane in 0..self.queues.len() {
            let stale = self.looked[lane].is_none_or(|at| now.duration_since(at) >= LOOK_AGAIN);
            if (all || self.ready[lane] == 0) && stale {
                self.ready[lane] = broker::ready_messages(channel, &self.queues[lane]).await?;
                self.looked[lane] = Some(now);
                self.metrics
                    .lane_waiting(&self.names[lane], self.ready[lane]);
            }
        }
        Ok(())
    }

    fn pick(&mut self) -> Option<usize> {
        let waiting: Vec<bool> = self.ready.iter().map(|n| *n > 0).collect();
        self.picker.pick(&waiting)
    }

    /// One `basic.get` from `lane`, noting what it found.
    async fn take(
        &mut self,
        channel: &Channel,
        lane: usize,
    ) -> Result<Option<lapin::message::BasicGetMessage>, lapin::Error> {
        let message = channel
            .basic_get(
                self.queues[lane].as_str().into(),
                BasicGetOptions::default(),
            )
            .await?;
        match &message {
            Some(m) => self.took(lane, m.message_count, &m.delivery),
            None => self.empty(lane),
        }
        Ok(message)
    }

    fn empty(&mut self, lane: usize) {
        self.ready[lane] = 0;
        self.looked[lane] = Some(Instant::now());
    }

    /// A request was taken from `lane`, which has `left` more waiting.
    fn took(&mut self, lane: usize, left: u32, delivery: &Delivery) {
        self.ready[lane] = left;
        self.looked[lane] = Some(Instant::now());
        let waited = delivery
            .properties
            .timestamp()
            .and_then(|sent| {
                let now = u64::try_from(chrono::Utc::now().timestamp()).ok()?;
                now.checked_sub(sent)
            })
            .map(|secs| secs as f64);
        self.metrics.lane_taken(&self.names[lane], left, waited);
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
/// only once requests are known to be waiting in some lane (a slot claimed
/// for empty queues is kept for a short while, then wasted). `Ok(None)`:
/// look again.
async fn take_slot(
    ctx: &Arc<Context>,
    session: &Session,
    lanes: &mut LaneView,
    idle: &mut Duration,
) -> Result<Option<Slot>, Lost> {
    let channel = &session.intake_channel;
    if ctx.budget.current_ledger().is_some() {
        while !lanes.any_ready() {
            lanes
                .refresh(channel, true)
                .await
                .map_err(Lost::LookAtQueue)?;
            if !lanes.any_ready() {
                unless_stopped(ctx, tokio::time::sleep(*idle)).await?;
                *idle = (*idle * 2).min(IDLE_MAX);
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

fn spawn_cancel(tracker: &TaskTracker, ctx: Arc<Context>, delivery: Delivery) {
    tracker.spawn(async move {
        pipeline::handle_cancel(&ctx, &delivery).await;
    });
}

fn spawn_ticket(tracker: &TaskTracker, ctx: Arc<Context>, delivery: Delivery) {
    tracker.spawn(async move {
        let _in_flight = GaugeGuard::new(ctx.metrics.in_flight_tickets());
        pipeline::handle_ticket(&ctx, &delivery).await;
    });
}
