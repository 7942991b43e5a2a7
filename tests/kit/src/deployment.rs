//! A private deployment for one test: unique names declared on the shared
//! broker (or one given), a fresh simulator, a publisher, worker children
//! configured for it, taps on its events; everything deleted and killed on
//! drop.

use std::{
    collections::HashMap,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection,
};
use serde_json::Value;
use tokio::{process::Command, time::Instant};
use vidu_worker::{
    broker::{Publisher, Topology},
    config::{env_vars, Settings, API_KEY_ENV},
    simulator::{RunningSimulator, Simulator, SimulatorConfig},
};

use crate::{
    broker::{connect_any, shared_broker},
    eventually, request,
    tap::{header_strings, seen, EventTap},
    worker::{worker_binary, WorkerProcess},
    API_KEY,
};

/// A deployment's names declared on a broker: unique queue and exchange
/// names (`<label>.<8 hex>`), the topology the worker declares, a channel
/// and a confirmed publisher; queues declared through it, worker processes
/// it started, background tasks and connections handed to it; all deleted,
/// killed, aborted and closed on drop. The tests' [`TestEnv`] and the
/// benchmark's runs are each one of these.
pub struct Deployment {
    pub name: String,
    pub settings: Settings,
    pub topology: Topology,
    pub channel: Channel,
    pub publisher: Publisher,
    /// The connection `channel` and `publisher` are on.
    pub conn: Arc<Connection>,
    /// The URL cleaning up connects to.
    url: String,
    extra_queues: Mutex<Vec<String>>,
    workers: Mutex<Vec<u32>>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    held: Mutex<Vec<Connection>>,
}

impl Deployment {
    /// A unique deployment name: `<label>.<8 hex>`.
    pub fn unique_name(label: &str) -> String {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        format!("{label}.{}", &unique[..8])
    }

    /// Names `settings`' request queue and events exchange after `name`.
    pub fn name_settings(settings: &mut Settings, name: &str) {
        settings.amqp.request_queue = format!("{name}.requests");
        settings.amqp.events_exchange = format!("{name}.events");
    }

    /// Declares the topology `settings` names through `url` (the first
    /// node of a comma-separated list that answers).
    pub async fn declare(name: String, settings: Settings, url: &str) -> Result<Self, String> {
        let topology = Topology::new(&settings);
        let conn = Arc::new(
            connect_any(url)
                .await
                .ok_or_else(|| "no broker node answers".to_owned())?,
        );
        topology
            .declare(&conn)
            .await
            .map_err(|e| format!("topology: {e}"))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| format!("channel: {e}"))?;
        let publisher = Publisher::open(conn.clone())
            .await
            .map_err(|e| format!("publisher: {e}"))?;
        Ok(Self {
            name,
            settings,
            topology,
            channel,
            publisher,
            conn,
            url: url.to_owned(),
            extra_queues: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
        })
    }

    /// Kills the process `pid` (SIGKILL) when the deployment goes.
    pub fn kill_on_drop(&self, pid: u32) {
        self.workers.lock().expect("lock").push(pid);
    }

    /// Closes `conn` when the deployment goes.
    pub fn close_on_drop(&self, conn: Connection) {
        self.held.lock().expect("lock").push(conn);
    }

    /// Deletes queue `name` when the deployment goes.
    pub fn delete_on_drop(&self, name: &str) {
        self.extra_queues
            .lock()
            .expect("lock")
            .push(name.to_owned());
    }
}

/// A private deployment for one test: a [`Deployment`] on the shared broker
/// with a fresh simulator, settings for quick tests, and worker children
/// configured for both.
pub struct TestEnv {
    pub deployment: Deployment,
    pub api_key: String,
    pub sim: RunningSimulator,
}

impl std::ops::Deref for TestEnv {
    type Target = Deployment;

    fn deref(&self) -> &Deployment {
        &self.deployment
    }
}

impl TestEnv {
    /// A deployment named after the test, with a fresh simulator.
    pub async fn new(test: &str, sim_config: SimulatorConfig) -> Self {
        Self::with(test, sim_config, |_| {}).await
    }

    pub async fn with(
        test: &str,
        sim_config: SimulatorConfig,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let api_key = sim_config
            .api_key
            .clone()
            .unwrap_or_else(|| API_KEY.to_owned());
        let sim = Simulator::start(SimulatorConfig {
            api_key: Some(api_key.clone()),
            ..sim_config
        })
        .await
        .expect("simulator starts");
        let name = Deployment::unique_name(&format!("t.{test}"));
        let mut settings = Settings::default();
        settings.amqp.url = shared_broker().url().into();
        Deployment::name_settings(&mut settings, &name);
        settings.amqp.prefetch = 16;
        settings.upstream.base_url = sim.base_url();
        settings.upstream.api_key = Some(api_key.clone().into());
        settings.upstream.retry_initial = Duration::from_millis(100);
        settings.upstream.retry_max = Duration::from_secs(2);
        settings.upstream.max_requests_per_second = 0.0;
        settings.polling.min_interval = Duration::from_millis(250);
        settings.polling.max_interval = Duration::from_secs(5);
        settings.shutdown.grace_period = Duration::from_secs(10);
        tweak(&mut settings);
        let url = secrecy::ExposeSecret::expose_secret(&settings.amqp.url).to_owned();
        let deployment = Deployment::declare(name, settings, &url)
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ reachable and the topology declared: {e}"));
        Self {
            deployment,
            api_key,
            sim,
        }
    }

    /// Environment variables that configure a worker child for this
    /// deployment: every setting, with the operations endpoint on a free
    /// port and the API key in `NOVITA_API_KEY`.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let mut settings = self.settings.clone();
        settings.http.listen = "127.0.0.1:0".into();
        let mut env = env_vars(&settings).expect("settings as variables");
        env.push((API_KEY_ENV.into(), self.api_key.clone()));
        env
    }

    /// Starts a worker child process for this deployment and waits until it
    /// is ready.
    pub async fn start_worker(&self) -> WorkerProcess {
        self.start_worker_with(&[]).await
    }

    pub async fn start_worker_with(&self, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let worker = self.spawn_worker(extra_env);
        worker.wait_ready(Duration::from_secs(30)).await;
        worker
    }

    /// Starts a worker child process without waiting.
    pub fn spawn_worker(&self, extra_env: &[(&str, &str)]) -> WorkerProcess {
        self.spawn(&worker_binary(), None, extra_env, &[])
    }

    /// Starts another build of the worker (an earlier release, say) in
    /// `dir` (where it finds its own `config/default.toml`), without the
    /// variables named in `unknown` (settings it does not have). Used by
    /// `tests/upgrade`.
    pub fn spawn_program(&self, program: &Path, dir: &Path, unknown: &[&str]) -> WorkerProcess {
        self.spawn(program, Some(dir), &[], unknown)
    }

    fn spawn(
        &self,
        program: &Path,
        dir: Option<&Path>,
        extra_env: &[(&str, &str)],
        unknown: &[&str],
    ) -> WorkerProcess {
        let mut cmd = Command::new(program);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        cmd.env_remove("RUST_LOG").env(
            "RUST_LOG",
            std::env::var("VIDU_TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
        );
        for (k, v) in self.worker_env() {
            if !unknown.contains(&k.as_str()) {
                cmd.env(k, v);
            }
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let worker = WorkerProcess::spawn(cmd).expect("spawn vidu-worker");
        self.kill_on_drop(worker.pid());
        worker
    }
}

impl Deployment {
    /// Publishes a raw request body with the given properties.
    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) {
        self.publisher
            .publish(
                "",
                &self.topology.request_queue,
                body,
                props.with_delivery_mode(2),
                true,
            )
            .await
            .expect("publish request");
    }

    /// Publishes a JSON message to `queue` (a lane, the cancel queue),
    /// persistent and stamped with the time (AMQP `timestamp`).
    pub async fn publish_to(&self, queue: &str, body: &Value) {
        let bytes = serde_json::to_vec(body).expect("json");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.publisher
            .publish(
                "",
                queue,
                &bytes,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_timestamp(now),
                true,
            )
            .await
            .expect("publish");
    }

    /// Publishes a JSON request.
    pub async fn publish(&self, body: &Value) {
        self.publish_with(body, BasicProperties::default()).await;
    }

    pub async fn publish_with(&self, body: &Value, props: BasicProperties) {
        let bytes = serde_json::to_vec(body).expect("json");
        self.publish_raw(&bytes, props.with_content_type("application/json".into()))
            .await;
    }

    /// Declares a durable queue `<name>.<suffix>`, deleted with the
    /// deployment.
    pub async fn declare_queue(&self, suffix: &str) -> String {
        self.declare_queue_with(suffix, FieldTable::default())
            .await
            .expect("declare queue")
    }

    /// Declares a durable queue `<name>.<suffix>` with `args` (see
    /// [`queue_args`]), deleted with the deployment.
    pub async fn declare_queue_with(
        &self,
        suffix: &str,
        args: FieldTable,
    ) -> Result<String, lapin::Error> {
        let name = format!("{}.{suffix}", self.name);
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        self.delete_on_drop(&name);
        Ok(name)
    }

    /// Starts collecting every event of this deployment.
    pub async fn tap(&self) -> EventTap {
        let queue = self
            .declare_queue(&format!(
                "tap{}",
                self.extra_queues.lock().expect("lock").len()
            ))
            .await;
        self.channel
            .queue_bind(
                queue.as_str().into(),
                self.topology.events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind tap");
        self.collect(&queue).await
    }

    /// Collects everything arriving on `queue`, reconnecting after broker
    /// outages until the deployment is dropped.
    pub async fn collect(&self, queue: &str) -> EventTap {
        let tap = EventTap::default();
        let events = tap.events.clone();
        let url = self.amqp_url();
        let queue = queue.to_owned();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                if let Some(conn) = connect_any(&url).await {
                    if let Ok(channel) = conn.create_channel().await {
                        if let Ok(mut consumer) = channel
                            .basic_consume(
                                queue.as_str().into(),
                                "".into(),
                                BasicConsumeOptions {
                                    no_ack: true,
                                    ..BasicConsumeOptions::default()
                                },
                                FieldTable::default(),
                            )
                            .await
                        {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                            while let Some(Ok(d)) = consumer.next().await {
                                let e = seen(d.routing_key.as_str(), &d.properties, &d.data);
                                events.lock().expect("tap lock").push(e);
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        self.background.lock().expect("lock").push(task);
        let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
        tap
    }

    /// The broker URL of this deployment.
    pub fn amqp_url(&self) -> String {
        secrecy::ExposeSecret::expose_secret(&self.settings.amqp.url).to_owned()
    }

    /// Takes every message from the dead-letter queue.
    pub async fn drain_dead(&self) -> Vec<(HashMap<String, String>, Vec<u8>, BasicProperties)> {
        let mut out = Vec::new();
        while let Some(msg) = self
            .channel
            .basic_get(
                self.topology.dead_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic_get")
        {
            let d = msg.delivery;
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
            out.push((header_strings(&d.properties), d.data, d.properties));
        }
        out
    }

    /// Ready plus unacknowledged messages of a queue on the shared broker
    /// (asks `rabbitmqctl`; passive declares count only ready messages).
    pub fn total_messages(&self, queue: &str) -> Option<u64> {
        let out = shared_broker()
            .rabbitmqctl()
            .args([
                "-q",
                "list_queues",
                "name",
                "messages",
                "--no-table-headers",
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut parts = l.split('\t');
            (parts.next()? == queue).then(|| parts.next()?.trim().parse().ok())?
        })
    }

    /// Ready and unacknowledged messages of a queue, once the broker's
    /// statistics show exactly `n` (they refresh every few seconds).
    pub async fn wait_total_messages(&self, queue: &str, n: u64, timeout: Duration) {
        eventually(timeout, &format!("{n} messages in {queue}"), || async {
            (self.total_messages(queue) == Some(n)).then_some(())
        })
        .await;
    }

    /// Waits until the broker's statistics show exactly `n` messages
    /// (ready and unacknowledged) in `queue` and keep showing it for longer
    /// than one statistics interval (5 s), so that a stale figure cannot
    /// pass for a fresh one.
    pub async fn steady_total_messages(&self, queue: &str, n: u64, timeout: Duration) {
        let steady = Duration::from_secs(6);
        let deadline = Instant::now() + timeout;
        let mut since: Option<Instant> = None;
        loop {
            if self.total_messages(queue) == Some(n) {
                let first = *since.get_or_insert_with(Instant::now);
                if first.elapsed() >= steady {
                    return;
                }
            } else {
                since = None;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} did not hold {n} messages steadily within {timeout:?}: {:?}",
                self.total_messages(queue)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        vidu_worker::broker::ready_messages(&self.channel, queue)
            .await
            .unwrap_or(0)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for task in self
            .background
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
        {
            task.abort();
        }
        let url = self.url.clone();
        let held = self
            .held
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default();
        for pid in self.workers.lock().map(|w| w.clone()).unwrap_or_default() {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status();
        }
        let mut queues = self.topology.queue_names();
        queues.extend(
            self.extra_queues
                .lock()
                .map(|q| q.clone())
                .unwrap_or_default(),
        );
        let exchange = self.topology.events_exchange.clone();
        // Drop runs inside the test's runtime: clean up from a fresh thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                for conn in held {
                    let _ = conn.close(200, "deployment over".into()).await;
                }
                let Some(conn) = connect_any(&url).await else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else {
                    return;
                };
                for q in queues {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = ch
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
                let _ = conn.close(200, "test cleanup".into()).await;
            });
        })
        .join();
    }
}

/// Declares a quorum queue bound to the events exchange that refuses every
/// publish (full at one message, `reject-publish`): each event's confirm is
/// then a nack.
pub async fn refuse_events(env: &TestEnv) -> String {
    let name = env
        .declare_queue_with(
            "refuse-events",
            queue_args(&[
                ("x-queue-type", AMQPValue::LongString("quorum".into())),
                ("x-overflow", AMQPValue::LongString("reject-publish".into())),
                ("x-max-length", AMQPValue::LongInt(0)),
            ]),
        )
        .await
        .expect("declare the refusing queue");
    // A quorum queue accepts the first publish into it while empty.
    let _ = env
        .publisher
        .publish("", &name, b"blocker", BasicProperties::default(), true)
        .await;
    env.channel
        .queue_bind(
            name.as_str().into(),
            env.topology.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the refusing queue");
    eventually(
        Duration::from_secs(10),
        "publishes to be refused",
        || async {
            env.publisher
                .publish(
                    &env.topology.events_exchange,
                    "video.generation.test",
                    b"{}",
                    BasicProperties::default(),
                    false,
                )
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    name
}

/// Queue arguments, e.g. `[("x-queue-type", AMQPValue::LongString("quorum".into()))]`.
pub fn queue_args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    for (key, value) in pairs {
        args.insert((*key).into(), value.clone());
    }
    args
}

/// Every request of `subjects` ended once (within `timeout`) and
/// succeeded, with one create each (the simulator's count) and nothing
/// dead-lettered; returns the simulator's counts.
pub async fn assert_succeeded_once(
    env: &TestEnv,
    tap: &EventTap,
    subjects: &[String],
    timeout: Duration,
) -> vidu_worker::simulator::SimStats {
    tap.wait_finished(subjects.len(), timeout).await;
    one_terminal_id_each(tap, subjects);
    for s in subjects {
        let terminal: Vec<_> = tap
            .for_subject(s)
            .into_iter()
            .filter(crate::SeenEvent::is_terminal)
            .collect();
        assert_eq!(
            terminal[0].kind(),
            vidu_worker::events::SUCCEEDED,
            "{s}: {:?}",
            terminal[0].body
        );
    }
    let stats = env.sim.stats();
    assert_eq!(
        stats.tasks_created,
        subjects.len() as u64,
        "one create per request"
    );
    let dead = env.drain_dead().await;
    assert!(
        dead.is_empty(),
        "nothing dead-lettered: {:?}",
        dead.iter().map(|(h, _, _)| h).collect::<Vec<_>>()
    );
    stats
}

/// Asserts every subject has exactly one distinct terminal event id, and
/// returns how many terminal events were seen in all.
pub fn one_terminal_id_each(tap: &EventTap, subjects: &[String]) -> usize {
    let mut ids: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    let terminal = tap.terminal();
    for e in &terminal {
        ids.entry(e.subject().to_owned())
            .or_default()
            .insert(e.id().to_owned());
    }
    for s in subjects {
        let set = ids
            .get(s)
            .unwrap_or_else(|| panic!("{s} has no terminal event"));
        assert_eq!(set.len(), 1, "{s} has {} distinct terminal ids", set.len());
    }
    terminal.len()
}

/// Publishes a request for each id through a connection of its own to
/// `url` (the test's own connection may have gone with a broker or node),
/// persistent and confirmed.
pub async fn publish_through(url: &str, env: &TestEnv, ids: &[String], prompt: &str) {
    let conn = connect_any(url).await.expect("the broker answers");
    let publisher = Publisher::open(Arc::new(conn)).await.expect("a publisher");
    for id in ids {
        let body = serde_json::to_vec(&request(id, prompt)).expect("json");
        publisher
            .publish(
                "",
                &env.topology.request_queue,
                &body,
                BasicProperties::default().with_delivery_mode(2),
                true,
            )
            .await
            .expect("a request published");
    }
}
