//! The worker: one supervised broker session at a time, the intake loop, the
//! tracking consumer, and a handler task per delivery.
//!
//! [`run`] is the library entry point of `vidu-worker run`: it builds the
//! upstream client, the gate, the create pacer and the operations endpoint,
//! then keeps a session alive (connection, topology, confirm-mode
//! publisher, intake and tracking channels), rebuilding it with backoff
//! whenever the broker goes away or a channel dies. Requests are taken one
//! at a time with `basic.get`, and only once everything a create waits for
//! is in hand (a free handler slot, an open gate, the pacer, a quota slot):
//! a request that is only waiting waits in the broker, never in memory.
//! Tickets are consumed. Each delivery gets its own task whose outcome, a
//! [`Disposition`], is applied in one place. Shutdown is one token: stop
//! taking work, let handlers finish within the grace period, close with 200.

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
    Acker, Channel, Connection, Consumer,
};
use tokio::{
    sync::{watch, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    broker::{self, BrokerError, PublishError, Publisher, Topology},
    config::{ConfigError, Settings},
    events::Event,
    gate::{Gate, GateState, IntakeTurn, Refusal},
    intake::{self, RecentCreates},
    metrics::{GaugeGuard, Metrics},
    ops::{self, Health},
    quota::{Pacer, QuotaLedger, SlotError},
    retry::RetryPolicy,
    signing::Signer,
    tracking,
    upstream::{UpstreamClient, UpstreamError},
};

/// The task id used to test the API key without creating anything.
pub const KEY_PROBE_TASK_ID: &str = "vidu-worker-key-probe";
/// How often the session checks that its connection and channels live.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);
/// How often the number of tracked tasks is sampled.
const SAMPLE_PERIOD: Duration = Duration::from_secs(15);
/// Shortest and longest wait before looking again at an empty request queue.
const IDLE_MIN: Duration = Duration::from_millis(20);
const IDLE_MAX: Duration = Duration::from_millis(250);

/// Why `run` ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration (exit status 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The worker could not start (exit status 1).
    #[error("{0}")]
    Startup(String),
}

/// What happens to a delivery once its handler is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Its outputs are confirmed: acknowledge it.
    Ack,
    /// Give it back to the queue for another try.
    Requeue,
    /// Leave it unacknowledged: its channel is closing (shutdown) or gone,
    /// and the broker returns it to the queue, counting one delivery.
    Abandon,
}

/// A request delivery's claim to be worked on: alive while its channel is
/// open and its session is the current one. Once it is lost the broker has
/// given (or will give) the request to someone else, so nothing may be
/// created for it here.
#[derive(Clone)]
pub(crate) struct Lease {
    acker: Acker,
    session: CancellationToken,
}

impl Lease {
    /// Whether the delivery still belongs to this worker's current session.
    pub(crate) fn alive(&self) -> bool {
        !self.session.is_cancelled() && !self.acker.poisoned()
    }

    /// Resolves when the session the delivery came from ends.
    pub(crate) async fn lost(&self) {
        self.session.cancelled().await;
    }
}

/// What every handler shares.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) topology: Topology,
    pub(crate) upstream: UpstreamClient,
    pub(crate) metrics: Metrics,
    pub(crate) gate: Gate,
    pub(crate) health: Health,
    pub(crate) shutdown: CancellationToken,
    /// The waits of creates: a 429's pause and the learned rate.
    pub(crate) pacer: Pacer,
    /// The deployment's create quota on the broker, when one is set.
    pub(crate) ledger: Option<QuotaLedger>,
    /// Creates this worker made recently, by request id, so that a
    /// redelivered copy of a request it already created is not created again.
    pub(crate) recent: RecentCreates,
    /// Signs the tickets this deployment writes and verifies those it reads.
    pub(crate) signer: Signer,
    /// One permit per request held (`amqp.prefetch`), across sessions: a
    /// handler that outlives its session still counts.
    held: Arc<Semaphore>,
    publisher: watch::Sender<Option<Publisher>>,
}

impl Shared {
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
        traceparent: Option<&str>,
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
        let body: &[u8] = if delivery.data.len() > crate::request::MAX_BODY_BYTES {
            b""
        } else {
            &delivery.data
        };
        self.publish("", &self.topology.dead_queue, body, properties, true)
            .await
    }
}

/// Runs the worker until `shutdown` fires, serving the operations endpoint
/// on `http.listen`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    settings.require_api_key()?;
    let listener = ops::bind(settings.listen_addr()?)
        .await
        .map_err(RunError::Startup)?;
    run_with_listener(settings, listener, shutdown).await
}

/// Runs the worker with an already-bound operations listener (tests and the
/// demo bind port 0 and read the address back).
pub async fn run_with_listener(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let key = settings.require_api_key()?.clone();
    let listen = listener
        .local_addr()
        .map_err(|e| RunError::Startup(format!("http.listen: {e}")))?;
    let metrics = Metrics::new();
    let upstream = UpstreamClient::new(&settings.upstream, key.clone(), metrics.clone())?;
    let gate = Gate::new(
        RetryPolicy {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
        },
        metrics.clone(),
    );
    let health = Health::new(gate.clone());
    let ops_stop = CancellationToken::new();
    let ops_task = tokio::spawn(ops::serve(
        listener,
        health.clone(),
        metrics.clone(),
        ops_stop.clone(),
    ));
    let topology = Topology::new(&settings);
    tracing::info!(
        request_queue = %settings.amqp.request_queue,
        events_exchange = %settings.amqp.events_exchange,
        broker = %crate::config::redact_url(secrecy::ExposeSecret::expose_secret(&settings.amqp.url)),
        upstream = %settings.upstream.base_url,
        create_quota = %settings.upstream.create_quota.map_or_else(|| "learned from 429s".to_owned(), |q| q.to_string()),
        ops = %listen,
        "vidu-worker starting"
    );
    let shared = Arc::new(Shared {
        pacer: Pacer::new(settings.upstream.create_quota, metrics.clone()),
        ledger: topology
            .quota_ledger
            .clone()
            .map(|(name, quota)| QuotaLedger::new(name, quota)),
        recent: RecentCreates::default(),
        signer: Signer::new(
            settings.tickets.secret.as_ref().unwrap_or(&key),
            &settings.tickets.previous_secrets,
            &settings.amqp.request_queue,
        ),
        held: Arc::new(Semaphore::new(usize::from(settings.amqp.prefetch))),
        topology,
        settings,
        upstream,
        metrics,
        gate,
        health,
        shutdown,
        publisher: watch::Sender::new(None),
    });
    let prober = tokio::spawn(probe_key(shared.clone()));
    let result = supervise(shared.clone()).await;
    prober.abort();
    ops_stop.cancel();
    let _ = ops_task.await;
    tracing::info!("vidu-worker stopped");
    result
}

/// Keeps a session alive until shutdown.
async fn supervise(shared: Arc<Shared>) -> Result<(), RunError> {
    let tracker = TaskTracker::new();
    let reconnect = RetryPolicy {
        initial: Duration::from_millis(250),
        max: Duration::from_secs(5),
    };
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    loop {
        if shared.shutdown.is_cancelled() {
            break;
        }
        match Session::open(&shared).await {
            Ok(session) => {
                if ever_connected {
                    tracing::info!("reconnected to the broker");
                } else {
                    tracing::info!("connected to the broker; consuming");
                }
                ever_connected = true;
                attempt = 0;
                match session.run(&shared, &tracker).await {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Lost(reason) => {
                        tracing::warn!(reason = %reason, "lost the broker session; reconnecting");
                        shared.health.broker_down(reason);
                    }
                }
            }
            Err(e) if e.is_fatal_at_start() && !ever_connected => {
                // A mismatched, forbidden or missing queue or exchange: the
                // message names it and says what to do.
                return Err(RunError::Startup(e.to_string()));
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "cannot reach the broker; retrying");
                } else {
                    tracing::debug!(error = %e, attempt, "still cannot reach the broker");
                }
                shared.health.broker_down(e.to_string());
            }
        }
        shared.publisher.send_replace(None);
        shared.metrics.set_broker_connected(false);
        let delay = reconnect.delay_for_attempt(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = shared.shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    // Shut down while disconnected: give handlers their grace period to
    // finish what they can once the broker is back.
    drain_handlers(&shared, &tracker).await;
    Ok(())
}

async fn drain_handlers(shared: &Shared, tracker: &TaskTracker) {
    shared.health.stopping();
    tracker.close();
    let grace = shared.settings.shutdown.grace_period;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            still_running = tracker.len(),
            "grace period over; unfinished messages go back to the queue"
        );
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

struct Session {
    conn: Arc<Connection>,
    publisher: Publisher,
    /// Requests are taken (`basic.get`) and acknowledged on this channel.
    intake_channel: Channel,
    tracking_channel: Channel,
    /// Cancelled when the session is lost: every lease of its deliveries
    /// ends with it.
    token: CancellationToken,
}

impl Session {
    async fn open(shared: &Shared) -> Result<Self, BrokerError> {
        let conn = Arc::new(broker::connect(&shared.settings, "worker").await?);
        shared.topology.declare(&conn).await?;
        let publisher = Publisher::open(conn.clone())
            .await
            .map_err(BrokerError::Connection)?;
        let intake_channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::Connection)?;
        let tracking_channel = consuming_channel(&conn, shared.settings.polling.prefetch)
            .await
            .map_err(BrokerError::Connection)?;
        Ok(Self {
            conn,
            publisher,
            intake_channel,
            tracking_channel,
            token: CancellationToken::new(),
        })
    }

    fn alive(&self) -> Result<(), &'static str> {
        if !self.conn.status().connected() {
            return Err("the connection closed");
        }
        if !self.intake_channel.status().connected() {
            return Err("the request channel closed");
        }
        if !self.tracking_channel.status().connected() {
            return Err("the tracking channel closed");
        }
        Ok(())
    }

    async fn run(self, shared: &Arc<Shared>, tracker: &TaskTracker) -> SessionEnd {
        shared.publisher.send_replace(Some(self.publisher.clone()));
        shared.health.broker_up();
        shared.metrics.set_broker_connected(true);
        let sampler_stop = CancellationToken::new();
        let sampler = tokio::spawn(sample_tracked(
            self.conn.create_channel().await.ok(),
            shared.clone(),
            sampler_stop.clone(),
        ));
        let end = self.consume(shared, tracker).await;
        // Let the sampler drop its channel while the connection is still
        // open (a channel closed after its connection is logged as an error).
        sampler_stop.cancel();
        let _ = sampler.await;
        shared.health.set_consuming(false);
        match &end {
            SessionEnd::Shutdown => {
                // The tracking consumer is not cancelled (on RabbitMQ 3.10 a
                // cancel racing with quorum-queue deliveries crashes the
                // channel): what it delivered but nobody took stays
                // unacknowledged and returns to the queue when the
                // connection closes, after the handlers already running
                // have finished.
                drain_handlers(shared, tracker).await;
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

    async fn consume(&self, shared: &Arc<Shared>, tracker: &TaskTracker) -> SessionEnd {
        let tag_base = format!("vidu-worker.{}.{}", broker::host_name(), std::process::id());
        let mut tracking = match start_consumer(
            &self.tracking_channel,
            &shared.topology.tracking_queue,
            &format!("{tag_base}.tracking"),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return SessionEnd::Lost(format!("cannot consume the tracking queue: {e}")),
        };
        shared.health.set_consuming(true);
        let intake = intake_loop(shared, self, tracker);
        tokio::pin!(intake);
        let mut watchdog = tokio::time::interval(WATCHDOG_PERIOD);
        loop {
            tokio::select! {
                biased;
                () = shared.shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = watchdog.tick() => {
                    if let Err(reason) = self.alive() {
                        return SessionEnd::Lost(reason.into());
                    }
                }
                reason = &mut intake => return SessionEnd::Lost(reason),
                delivery = tracking.next() => match delivery {
                    Some(Ok(d)) => spawn_ticket(tracker, shared.clone(), d),
                    Some(Err(e)) => return SessionEnd::Lost(format!("tracking consumer failed: {e}")),
                    None => return SessionEnd::Lost("the broker cancelled the tracking consumer".into()),
                },
            }
        }
    }
}

/// Takes requests, one at a time, once a create could follow at once: a
/// free handler slot, the gate, the pacer and (with a quota) a slot in the
/// deployment's window come first, the delivery last. Returns why it
/// stopped when the session cannot serve it any more; shutdown simply
/// drops it.
async fn intake_loop(shared: &Arc<Shared>, session: &Session, tracker: &TaskTracker) -> String {
    let channel = &session.intake_channel;
    let queue = shared.topology.request_queue.as_str();
    let mut idle = IDLE_MIN;
    // Ready requests the last look reported; with a quota a slot is only
    // claimed when some are known to be there.
    let mut known_ready: u32 = 0;
    let mut gate_changes = shared.gate.subscribe();
    loop {
        let Ok(held) = shared.held.clone().acquire_owned().await else {
            return "the handler slots were closed".into();
        };
        loop {
            match shared.gate.intake_turn() {
                IntakeTurn::Take => break,
                IntakeTurn::Wait(at) => {
                    tokio::select! {
                        _ = gate_changes.changed() => {}
                        () = sleep_until_opt(at) => {}
                    }
                }
            }
        }
        let Some(pace) = shared.pacer.reserve(&shared.shutdown).await else {
            return std::future::pending().await;
        };
        let mut slot = false;
        if let Some(ledger) = &shared.ledger {
            while known_ready == 0 {
                match ready_requests(channel, queue).await {
                    Ok(0) => {
                        tokio::time::sleep(idle).await;
                        idle = (idle * 2).min(IDLE_MAX);
                    }
                    Ok(n) => known_ready = n,
                    Err(e) => return format!("cannot look at the request queue: {e}"),
                }
            }
            match ledger
                .claim(&session.publisher, &shared.metrics, &shared.shutdown)
                .await
            {
                Ok(()) => slot = true,
                Err(SlotError::Cancelled) => return std::future::pending().await,
                Err(SlotError::Broker(PublishError::Unroutable(_))) => {
                    tracing::warn!(
                        ledger = ledger.queue(),
                        "the quota ledger is gone (its broker node?); declaring it again"
                    );
                    if let Err(e) = shared.topology.declare_ledger(&session.conn).await {
                        return format!("cannot declare the quota ledger: {e}");
                    }
                    shared.pacer.release(pace);
                    continue;
                }
                Err(SlotError::Broker(e)) => return format!("cannot claim a quota slot: {e}"),
            }
        }
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
        {
            Ok(Some(message)) => {
                idle = IDLE_MIN;
                known_ready = message.message_count;
                let lease = Lease {
                    acker: message.delivery.acker.clone(),
                    session: session.token.clone(),
                };
                spawn_request(tracker, shared.clone(), message.delivery, held, lease);
            }
            Ok(None) => {
                known_ready = 0;
                shared.pacer.release(pace);
                if slot {
                    shared.metrics.quota_slot_unused();
                }
                drop(held);
                tokio::time::sleep(idle).await;
                idle = (idle * 2).min(IDLE_MAX);
            }
            Err(e) => return format!("cannot take requests: {e}"),
        }
    }
}

/// Ready messages in a queue (a passive declaration).
async fn ready_requests(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
}

/// A channel for one consumer, with its prefetch.
async fn consuming_channel(conn: &Connection, prefetch: u16) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => {
            tokio::time::sleep_until(at.max(Instant::now() + Duration::from_millis(50))).await
        }
        None => std::future::pending().await,
    }
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

/// Runs a handler under `catch_unwind`: a panic hands the message back.
async fn guarded<F>(handler: F) -> Disposition
where
    F: Future<Output = Disposition> + Send,
{
    // Boxed: the handlers' state machines are large, and moving them into
    // the spawned task by value showed up in profiles.
    let handler: std::pin::Pin<Box<dyn Future<Output = Disposition> + Send + '_>> =
        Box::pin(handler);
    AssertUnwindSafe(handler)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "a handler panicked; handing its message back");
            Disposition::Requeue
        })
}

fn spawn_request(
    tracker: &TaskTracker,
    shared: Arc<Shared>,
    delivery: Delivery,
    held: OwnedSemaphorePermit,
    lease: Lease,
) {
    tracker.spawn(async move {
        let _held = held;
        let _in_flight = GaugeGuard::new(shared.metrics.in_flight_requests());
        let taken = Instant::now();
        let disposition = guarded(intake::handle(&shared, &delivery, &lease)).await;
        settle(&delivery, disposition).await;
        shared.metrics.observe_hold(taken.elapsed().as_secs_f64());
    });
}

fn spawn_ticket(tracker: &TaskTracker, shared: Arc<Shared>, delivery: Delivery) {
    tracker.spawn(async move {
        let _in_flight = GaugeGuard::new(shared.metrics.in_flight_tickets());
        let disposition = guarded(tracking::handle(&shared, &delivery)).await;
        settle(&delivery, disposition).await;
    });
}

/// Applies a disposition. A failure means the channel is gone and the
/// broker will redeliver: someone else will do it.
pub(crate) async fn settle(delivery: &Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Abandon => return,
        Disposition::Ack => {
            delivery
                .acker
                .ack(lapin::options::BasicAckOptions::default())
                .await
        }
        Disposition::Requeue => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not settle a delivery; the broker will redeliver it");
    }
}

/// Samples how many tickets the deployment tracks, for the metric.
async fn sample_tracked(channel: Option<Channel>, shared: Arc<Shared>, stop: CancellationToken) {
    let Some(channel) = channel else { return };
    let mut every = tokio::time::interval(SAMPLE_PERIOD);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match shared.topology.count_tracked(&channel).await {
            Ok(n) => shared
                .metrics
                .set_tasks_tracked(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => {
                // A failed passive declare closes the channel; the session
                // watchdog notices real outages, here we only stop sampling.
                tracing::debug!(error = %e, "could not sample the tracking queues");
                if !channel.status().connected() {
                    return;
                }
            }
        }
    }
}

/// Probes the upstream in the background while the gate is closed for the
/// key or an outage (a `GET` bills nothing), and once at start so a bad key
/// shows before the first request.
async fn probe_key(shared: Arc<Shared>) {
    if let Err(e @ UpstreamError::KeyRejected { .. }) =
        shared.upstream.task_result(KEY_PROBE_TASK_ID, None).await
    {
        shared.gate.close(Refusal::Key, &e.to_string());
    }
    let mut changes = shared.gate.subscribe();
    loop {
        // The prober's work: a refused key or an outage (a refused balance is
        // probed by a waiting request, with a real create).
        let due = match shared.gate.state() {
            GateState::Closed {
                refusal: refusal @ (Refusal::Key | Refusal::Unavailable),
                retry_at,
                ..
            } => Some((refusal, retry_at)),
            _ => None,
        };
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = changes.changed() => continue,
            () = sleep_until_opt(due.map(|(_, at)| at)) => {}
        }
        let (Some((refusal, _)), Some(claim)) = (due, shared.gate.try_claim_probe()) else {
            // Someone else holds the probe; look again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match shared.upstream.task_result(KEY_PROBE_TASK_ID, None).await {
            Err(e @ UpstreamError::KeyRejected { .. }) => {
                shared
                    .gate
                    .probe_failed(claim, Refusal::Key, &e.to_string());
            }
            // Still down, or a refused key that now times out: the refusal
            // stands as it was.
            Err(e @ (UpstreamError::Transient { .. } | UpstreamError::RateLimited { .. })) => {
                shared.gate.probe_failed(claim, refusal, &e.to_string());
            }
            // A task-result answer, even a 404 for the made-up id, means the
            // key is accepted and the upstream is serving.
            Ok(_) | Err(_) => {
                drop(claim);
                shared.gate.open();
            }
        }
    }
}
