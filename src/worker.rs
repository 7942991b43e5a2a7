//! The worker: one supervised broker session at a time, two consumers, and
//! a handler task per delivery.
//!
//! [`run`] is the library entry point of `vidu-worker run`: it builds the
//! upstream client, the gate and the operations endpoint, then keeps a
//! session alive (connection, topology, confirm-mode publisher, request and
//! tracking consumers), rebuilding it with backoff whenever the broker goes
//! away or a channel dies. Each delivery gets its own task whose outcome, a
//! [`Disposition`], is applied in one place. Shutdown is one token: stop
//! consuming, let handlers finish within the grace period, close with 200.

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, LongString},
    Channel, Connection, Consumer,
};
use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    broker::{self, BrokerError, PublishError, Publisher, Topology, ERROR_HEADER},
    config::{ConfigError, Settings},
    events::Event,
    gate::{Gate, GateState, Refusal},
    intake,
    metrics::{GaugeGuard, Metrics},
    ops::{self, Health},
    retry::RetryPolicy,
    tracking,
    upstream::{UpstreamClient, UpstreamError},
};

/// The task id used to test the API key without creating anything.
pub const KEY_PROBE_TASK_ID: &str = "vidu-worker-key-probe";
/// Longest `x-vidu-error` header.
const MAX_ERROR_HEADER: usize = 1000;
/// How often the session checks that its connection and channels live.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(500);
/// How often the number of tracked tasks is sampled.
const SAMPLE_PERIOD: Duration = Duration::from_secs(15);

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
    /// Leave it unacknowledged: its channel is closing (shutdown or paused
    /// intake) and the broker returns it to the queue, counting one delivery.
    Abandon,
    /// The handler already acknowledged it.
    Settled,
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
    /// Held (read) by a request handler from its create call until its
    /// request is acknowledged; taken (write) before the request channel is
    /// closed, so a created task's request is never handed back.
    pub(crate) intake_lock: tokio::sync::RwLock<()>,
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

    /// Publishes on the current session, once.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let publisher = self.publisher.borrow().clone();
        match publisher {
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
                    tracing::debug!(error = %e, "publish failed; retrying on the next session");
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
        if let Some(reply_to) = &event.reply_to {
            self.publish("", reply_to, &event.body, event.properties.clone(), false)
                .await?;
        }
        self.metrics.event(event.event_type);
        Ok(())
    }

    /// Copies a delivery to the dead-letter queue with `x-vidu-error`.
    pub(crate) async fn dead_letter(
        &self,
        delivery: &Delivery,
        why: &str,
    ) -> Result<(), PublishError> {
        let mut why: String = why.chars().take(MAX_ERROR_HEADER).collect();
        why.retain(|c| !c.is_control());
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(LongString::from(why)),
        );
        headers.insert(
            "x-vidu-original-queue".into(),
            AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
        );
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        self.publish(
            "",
            &self.topology.dead_queue,
            &delivery.data,
            properties,
            true,
        )
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
    let upstream = UpstreamClient::new(&settings.upstream, key, metrics.clone())?;
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
    tracing::info!(
        request_queue = %settings.amqp.request_queue,
        events_exchange = %settings.amqp.events_exchange,
        broker = %crate::config::redact_url(secrecy::ExposeSecret::expose_secret(&settings.amqp.url)),
        upstream = %settings.upstream.base_url,
        ops = %listen,
        "vidu-worker starting"
    );
    let shared = Arc::new(Shared {
        topology: Topology::new(&settings),
        settings,
        upstream,
        metrics,
        gate,
        health,
        shutdown,
        intake_lock: tokio::sync::RwLock::new(()),
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

#[derive(Clone, Copy)]
enum Role {
    Request,
    Ticket,
}

struct Session {
    conn: Connection,
    publisher: Publisher,
    /// Closed while intake is paused, and opened again when it resumes.
    intake_channel: Channel,
    /// The request consumer, while intake runs.
    intake: Option<Consumer>,
    tracking_channel: Channel,
}

impl Session {
    async fn open(shared: &Shared) -> Result<Self, BrokerError> {
        let conn = broker::connect(&shared.settings, "worker").await?;
        shared.topology.declare(&conn).await?;
        let publisher = Publisher::open(&conn)
            .await
            .map_err(BrokerError::Connection)?;
        let intake_channel = consuming_channel(&conn, shared.settings.amqp.prefetch)
            .await
            .map_err(BrokerError::Connection)?;
        let tracking_channel = consuming_channel(&conn, shared.settings.polling.prefetch)
            .await
            .map_err(BrokerError::Connection)?;
        Ok(Self {
            conn,
            publisher,
            intake_channel,
            intake: None,
            tracking_channel,
        })
    }

    fn alive(&self) -> Result<(), &'static str> {
        if !self.conn.status().connected() {
            return Err("the connection closed");
        }
        if !self.publisher.is_open() {
            return Err("the publishing channel closed");
        }
        if self.intake.is_some() && !self.intake_channel.status().connected() {
            return Err("the request channel closed");
        }
        if !self.tracking_channel.status().connected() {
            return Err("the tracking channel closed");
        }
        Ok(())
    }

    async fn run(mut self, shared: &Arc<Shared>, tracker: &TaskTracker) -> SessionEnd {
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
                // Consumers are not cancelled (on RabbitMQ 3.10 a cancel racing
                // with quorum-queue deliveries crashes the channel): what they
                // delivered but nobody took stays unacknowledged and returns to
                // the queue when the connection closes, after the handlers
                // already running have finished.
                drain_handlers(shared, tracker).await;
                self.publisher.close().await;
                let _ = self.tracking_channel.close(200, "shutdown".into()).await;
                let _ = self.intake_channel.close(200, "shutdown".into()).await;
                let _ = self.conn.close(200, "shutdown".into()).await;
            }
            SessionEnd::Lost(_) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.conn.close(320, "session lost".into()),
                )
                .await;
            }
        }
        end
    }

    async fn consume(&mut self, shared: &Arc<Shared>, tracker: &TaskTracker) -> SessionEnd {
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
        let intake_tag = format!("{tag_base}.requests");
        let mut gate_changes = shared.gate.subscribe();
        let mut watchdog = tokio::time::interval(WATCHDOG_PERIOD);
        loop {
            if let Err(reason) = self.reconcile_intake(shared, &intake_tag).await {
                return SessionEnd::Lost(reason);
            }
            tokio::select! {
                biased;
                () = shared.shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = watchdog.tick() => {
                    if let Err(reason) = self.alive() {
                        return SessionEnd::Lost(reason.into());
                    }
                }
                delivery = next_delivery(&mut self.intake) => match delivery {
                    Some(Ok(d)) => spawn_handler(tracker, shared.clone(), d, Role::Request),
                    Some(Err(e)) => return SessionEnd::Lost(format!("request consumer failed: {e}")),
                    None => return SessionEnd::Lost("the broker cancelled the request consumer".into()),
                },
                delivery = tracking.next() => match delivery {
                    Some(Ok(d)) => spawn_handler(tracker, shared.clone(), d, Role::Ticket),
                    Some(Err(e)) => return SessionEnd::Lost(format!("tracking consumer failed: {e}")),
                    None => return SessionEnd::Lost("the broker cancelled the tracking consumer".into()),
                },
                _ = gate_changes.changed() => {}
            }
        }
    }

    /// Starts or pauses intake to match the gate. Pausing closes the request
    /// channel (rather than cancelling the consumer, see `run`), after the
    /// creates in flight have been recorded and acknowledged: everything
    /// else the channel held returns to the queue, and handlers still waiting
    /// at the gate see their delivery gone and let it be.
    async fn reconcile_intake(&mut self, shared: &Shared, tag: &str) -> Result<(), String> {
        match (shared.gate.accepting(), self.intake.is_some()) {
            (true, false) => {
                if !self.intake_channel.status().connected() {
                    self.intake_channel =
                        consuming_channel(&self.conn, shared.settings.amqp.prefetch)
                            .await
                            .map_err(|e| format!("cannot open the request channel: {e}"))?;
                }
                let consumer =
                    start_consumer(&self.intake_channel, &shared.topology.request_queue, tag)
                        .await
                        .map_err(|e| format!("cannot consume the request queue: {e}"))?;
                self.intake = Some(consumer);
                shared.health.set_consuming(true);
            }
            (false, true) => {
                self.intake = None;
                shared.health.set_consuming(false);
                let _no_creates = shared.intake_lock.write().await;
                let _ = self.intake_channel.close(200, "intake paused".into()).await;
                tracing::info!("intake paused; requests stay in the queue");
            }
            _ => {}
        }
        Ok(())
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

async fn next_delivery(consumer: &mut Option<Consumer>) -> Option<Result<Delivery, lapin::Error>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
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

fn spawn_handler(tracker: &TaskTracker, shared: Arc<Shared>, delivery: Delivery, role: Role) {
    tracker.spawn(async move {
        let gauge = match role {
            Role::Request => shared.metrics.in_flight_requests().clone(),
            Role::Ticket => shared.metrics.in_flight_tickets().clone(),
        };
        let _in_flight = GaugeGuard::new(&gauge);
        // Boxed: the handlers' state machines are large, and moving them
        // into the spawned task by value showed up in profiles.
        let handler: std::pin::Pin<Box<dyn Future<Output = Disposition> + Send + '_>> = match role {
            Role::Request => Box::pin(intake::handle(&shared, &delivery)),
            Role::Ticket => Box::pin(tracking::handle(&shared, &delivery)),
        };
        let handled = AssertUnwindSafe(handler).catch_unwind().await;
        let disposition = handled.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "a handler panicked; handing its message back");
            Disposition::Requeue
        });
        settle(&delivery, disposition).await;
    });
}

/// Applies a disposition. A failure means the channel is gone and the
/// broker will redeliver: someone else will do it.
pub(crate) async fn settle(delivery: &Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Abandon | Disposition::Settled => return,
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
            Err(e @ UpstreamError::Transient { .. }) => {
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
