//! Shared helpers for the integration tests: a per-test deployment (unique
//! queue and exchange names on the real local RabbitMQ), the built-in
//! simulator over real HTTP, worker child processes, an event tap, and
//! clean-up of everything on drop. Tests wait on conditions with deadlines,
//! never on fixed sleeps. The shared broker is the one on 127.0.0.1:5672
//! when it answers, else one private node for the whole run
//! ([`shared_broker`]).

pub mod files;

use std::{
    collections::HashMap,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};
use vidu_worker::{
    broker::{Publisher, Topology},
    config::{env_vars, Settings, API_KEY_ENV},
    events::{FAILED, SUCCEEDED},
    local_broker::{self, Installation},
    simulator::{RunningSimulator, Simulator, SimulatorConfig},
};

pub use vidu_worker::local_broker::{LocalNode, NodeOptions, NodeTls};

pub const API_KEY: &str = "sk-test-0123456789";

/// How long a private node may take to start (or start again).
pub const STARTUP: Duration = local_broker::STARTUP_TIMEOUT;

/// The machine's RabbitMQ installation; panics saying how to install one.
fn installation() -> Installation {
    Installation::find().unwrap_or_else(|| panic!("{}", local_broker::INSTALL_HINT))
}

/// A private node for a test that needs a broker of its own (restarts,
/// TLS, users and vhosts), stopped and removed on drop. Blocks: call it
/// from `spawn_blocking`.
pub fn private_node() -> LocalNode {
    private_node_with(NodeOptions::default())
}

/// [`private_node`] with options.
pub fn private_node_with(options: NodeOptions) -> LocalNode {
    LocalNode::start_with(&installation(), "vidu-test", &options, STARTUP)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `n` private nodes joined into one cluster. Blocks.
pub fn private_cluster(n: usize) -> Vec<LocalNode> {
    local_broker::start_cluster(
        &installation(),
        "vidu-test",
        n,
        &NodeOptions::default(),
        STARTUP,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The broker the tests share: the machine's on 127.0.0.1:5672, or a
/// private node started for this run when nothing answers there.
pub struct SharedBroker {
    url: String,
    node: Option<LocalNode>,
}

impl SharedBroker {
    /// Its AMQP URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The private node, when the run has one.
    pub fn private_node(&self) -> Option<&LocalNode> {
        self.node.as_ref()
    }

    /// `rabbitmqctl` for this broker.
    pub fn rabbitmqctl(&self) -> std::process::Command {
        match &self.node {
            Some(node) => node.ctl_command(),
            None => std::process::Command::new("rabbitmqctl"),
        }
    }
}

static SHARED_BROKER: OnceLock<SharedBroker> = OnceLock::new();

/// The shared broker, found on first use: the machine's when 127.0.0.1:5672
/// answers (as on CI), else one private node for the whole run, which a
/// watcher process stops and removes when the test process exits (a
/// static's drop never runs).
pub fn shared_broker() -> &'static SharedBroker {
    SHARED_BROKER.get_or_init(|| {
        if local_broker::default_broker_answers() {
            let url = Settings::default().amqp.url;
            return SharedBroker {
                url: secrecy::ExposeSecret::expose_secret(&url).to_owned(),
                node: None,
            };
        }
        let tools = installation();
        let node = LocalNode::start(&tools, "vidu-suite", local_broker::STARTUP_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        node.stop_when_process_exits(std::process::id())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "no broker answers on 127.0.0.1:5672: the tests share a private RabbitMQ node, \
             {} (stopped and removed when they end)",
            node.name()
        );
        SharedBroker {
            url: node.url(),
            node: Some(node),
        }
    })
}

/// Waits until `f` returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One event as a consumer sees it.
#[derive(Debug, Clone)]
pub struct SeenEvent {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

impl SeenEvent {
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or_default()
    }
    pub fn subject(&self) -> &str {
        self.body["subject"].as_str().unwrap_or_default()
    }
    pub fn id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }
    pub fn is_terminal(&self) -> bool {
        matches!(self.kind(), SUCCEEDED | FAILED)
    }
}

fn header_strings(props: &BasicProperties) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            let s = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.to_string(),
                other => format!("{other:?}"),
            };
            out.insert(k.to_string(), s);
        }
    }
    out
}

fn seen(routing_key: &str, props: &BasicProperties, data: &[u8]) -> SeenEvent {
    SeenEvent {
        routing_key: routing_key.to_owned(),
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
        content_type: props.content_type().as_ref().map(|s| s.to_string()),
        delivery_mode: *props.delivery_mode(),
        headers: header_strings(props),
        body: serde_json::from_slice(data).unwrap_or(Value::Null),
    }
}

/// Collects every event published to a deployment's exchange.
#[derive(Clone, Default)]
pub struct EventTap {
    events: Arc<Mutex<Vec<SeenEvent>>>,
}

impl EventTap {
    pub fn all(&self) -> Vec<SeenEvent> {
        self.events.lock().expect("tap lock").clone()
    }

    pub fn for_subject(&self, subject: &str) -> Vec<SeenEvent> {
        self.all()
            .into_iter()
            .filter(|e| e.subject() == subject)
            .collect()
    }

    pub fn terminal(&self) -> Vec<SeenEvent> {
        self.all()
            .into_iter()
            .filter(SeenEvent::is_terminal)
            .collect()
    }

    /// Asserts that every terminal event seen so far is `succeeded`, naming
    /// the ones that are not.
    pub fn assert_all_succeeded(&self) {
        let failed: Vec<String> = self
            .terminal()
            .iter()
            .filter(|e| e.kind() != SUCCEEDED)
            .map(|e| format!("{} {}: {}", e.subject(), e.kind(), e.body["data"]))
            .collect();
        assert!(failed.is_empty(), "requests did not succeed: {failed:?}");
    }

    /// Distinct subjects that have a terminal event.
    pub fn finished_subjects(&self) -> std::collections::HashSet<String> {
        self.terminal()
            .iter()
            .map(|e| e.subject().to_owned())
            .collect()
    }

    /// Waits for the terminal event of `subject`.
    pub async fn wait_terminal(&self, subject: &str, timeout: Duration) -> SeenEvent {
        eventually(
            timeout,
            &format!("a terminal event for {subject}"),
            || async {
                self.for_subject(subject)
                    .into_iter()
                    .find(SeenEvent::is_terminal)
            },
        )
        .await
    }

    /// Waits until `n` distinct subjects have terminal events.
    pub async fn wait_finished(&self, n: usize, timeout: Duration) {
        eventually(timeout, &format!("{n} finished requests"), || async {
            (self.finished_subjects().len() >= n).then_some(())
        })
        .await;
    }
}

/// A private deployment for one test.
pub struct TestEnv {
    pub name: String,
    pub api_key: String,
    pub settings: Settings,
    pub topology: Topology,
    pub sim: RunningSimulator,
    pub channel: Channel,
    pub publisher: Publisher,
    extra_queues: Mutex<Vec<String>>,
    workers: Mutex<Vec<u32>>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("t.{test}.{}", &unique[..8]);
        let mut settings = Settings::default();
        settings.amqp.url = shared_broker().url().into();
        settings.amqp.request_queue = format!("{name}.requests");
        settings.amqp.events_exchange = format!("{name}.events");
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
        let topology = Topology::new(&settings);
        let url = secrecy::ExposeSecret::expose_secret(&settings.amqp.url).to_owned();
        let conn = Arc::new(connect_any(&url).await.expect("RabbitMQ reachable"));
        topology.declare(&conn).await.expect("topology");
        let channel = conn.create_channel().await.expect("channel");
        let publisher = Publisher::open(conn).await.expect("publisher");
        Self {
            name,
            api_key,
            settings,
            topology,
            sim,
            channel,
            publisher,
            extra_queues: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
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
        self.spawn(
            Path::new(env!("CARGO_BIN_EXE_vidu-worker")),
            None,
            extra_env,
            &[],
        )
    }

    /// Starts another build of the worker (an earlier release, say) in
    /// `dir` (where it finds its own `config/default.toml`), without the
    /// variables named in `unknown` (settings it does not have). Used by
    /// `tests/upgrade`, which shares these helpers.
    #[allow(dead_code)]
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
        cmd.arg("run")
            .env_remove("RUST_LOG")
            .env(
                "RUST_LOG",
                std::env::var("VIDU_TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in self.worker_env() {
            if !unknown.contains(&k.as_str()) {
                cmd.env(k, v);
            }
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn vidu-worker");
        if let Some(pid) = child.id() {
            self.workers.lock().expect("lock").push(pid);
        }
        let logs = Arc::new(Mutex::new(Vec::<String>::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.lock().expect("log lock").push(line);
                }
            });
        }
        WorkerProcess { child, logs }
    }

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

    /// Publishes a JSON request.
    pub async fn publish(&self, body: &Value) {
        self.publish_with(body, BasicProperties::default()).await;
    }

    pub async fn publish_with(&self, body: &Value, props: BasicProperties) {
        let bytes = serde_json::to_vec(body).expect("json");
        self.publish_raw(&bytes, props.with_content_type("application/json".into()))
            .await;
    }

    /// Declares a queue that is deleted with the deployment.
    pub async fn declare_queue(&self, suffix: &str) -> String {
        let name = format!("{}.{suffix}", self.name);
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare queue");
        self.extra_queues.lock().expect("lock").push(name.clone());
        name
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
        self.channel
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
            .unwrap_or(0)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for task in self
            .background
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
        {
            task.abort();
        }
        let url = self.amqp_url();
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

/// A worker child process; killed on drop.
pub struct WorkerProcess {
    pub child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// The operations address, read from the start-up log line.
    pub async fn ops_addr(&self) -> String {
        eventually(
            Duration::from_secs(30),
            "the worker's start-up log line",
            || async {
                self.logs().iter().find_map(|l| {
                    let v: Value = serde_json::from_str(l).ok()?;
                    (v["message"] == "vidu-worker starting")
                        .then(|| v["ops"].as_str().map(str::to_owned))?
                })
            },
        )
        .await
    }

    /// GET on the operations endpoint: (status, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.ops_addr().await;
        let resp = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.ok()?))
    }

    /// Waits until `/readyz` answers 503 with `needle` in its reason, and
    /// returns that reason.
    pub async fn wait_not_ready(&self, needle: &str, timeout: Duration) -> String {
        eventually(
            timeout,
            &format!("/readyz 503 mentioning {needle:?}"),
            || async {
                match self.get("/readyz").await {
                    Some((503, body)) if body.contains(needle) => Some(body),
                    _ => None,
                }
            },
        )
        .await
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        eventually(timeout, "the worker to be ready", || async {
            matches!(self.get("/readyz").await, Some((200, _))).then_some(())
        })
        .await;
    }

    /// One metric's value (summed over label sets matching `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let Some((_, text)) = self.get("/metrics").await else {
            return 0.0;
        };
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .stderr(Stdio::null())
            .status();
    }

    pub async fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait().await;
    }

    /// Waits for exit; returns the status code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()?
            .ok()?
            .code()
    }
}

/// Closes a worker's broker connection from the broker's side, as a network
/// cut or a load balancer reset would (`rabbitmqctl close_connection`), on
/// the shared broker (`node` none) or a private one. Returns whether a
/// connection was found and closed.
pub fn close_worker_connection(node: Option<&LocalNode>, pid: u32) -> bool {
    let run = |args: &[&str]| -> Option<String> {
        match node {
            Some(n) => n.ctl_output(args).ok(),
            None => {
                let out = shared_broker().rabbitmqctl().args(args).output().ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        }
    };
    let Some(list) = run(&[
        "-q",
        "list_connections",
        "pid",
        "client_properties",
        "--no-table-headers",
    ]) else {
        return false;
    };
    let needle = format!("#{pid} ");
    let Some(conn) = list
        .lines()
        .find(|l| l.contains("vidu-worker worker") && l.contains(&needle))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
    else {
        return false;
    };
    run(&[
        "close_connection",
        &conn,
        "closed by the test (a network cut)",
    ])
    .is_some()
}

/// Declares a quorum queue bound to the events exchange that refuses every
/// publish (full at one message, `reject-publish`): each event's confirm is
/// then a nack.
pub async fn refuse_events(env: &TestEnv) -> String {
    let name = format!("{}.refuse-events", env.name);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    env.channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
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

/// Connects to the first node of a broker URL (or comma-separated list of
/// node URLs, as `amqp.url` takes them) that answers.
pub async fn connect_any(urls: &str) -> Option<Connection> {
    for url in vidu_worker::config::split_urls(urls) {
        if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await {
            return Some(conn);
        }
    }
    None
}

/// A valid request body.
pub fn request(id: &str, prompt: &str) -> Value {
    serde_json::json!({
        "request_id": id,
        "input": {
            "images": ["https://example.com/cat.png"],
            "prompt": format!("{prompt} {id}"),
            "duration": 5
        }
    })
}

/// Simulator settings with a short generation time.
pub fn sim(generation: Duration) -> SimulatorConfig {
    SimulatorConfig {
        generation_time: generation,
        ..SimulatorConfig::default()
    }
}
