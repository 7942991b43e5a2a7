//! The broker side of a run: the `Target` broker (the local one, or private
//! nodes), a `Deployment` of unique queues and exchanges declared like the
//! worker's (deleted on drop) with the producer that publishes requests to
//! it, the `Sink` that taps the terminal events, the simulator's start, and
//! the constants they share with the scenarios.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures_util::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions},
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use tokio::sync::watch;
use vidu_test_kit as kit;
use vidu_worker::{
    config::Settings,
    simulator::{EtaMode, RunningSimulator, Simulator, SimulatorConfig},
};

use crate::{config::BenchConfig, machine::CpuMeter, BenchResult};

/// The simulator's API key (the workers get it as `NOVITA_API_KEY`).
pub(crate) const API_KEY: &str = "sk-bench-0123456789";
/// Unconfirmed publishes the bench's producer keeps in flight.
const PUBLISH_WINDOW: usize = 1_000;
/// Routing keys of terminal events.
pub(crate) const TERMINAL_KEYS: [&str; 2] =
    ["video.generation.succeeded", "video.generation.failed"];

/// The broker a run uses: the node the bench declares, publishes and
/// consumes through, and the `amqp.url` the workers get (the same node, or
/// a cluster's node list).
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) bench_url: String,
    pub(crate) worker_url: String,
    /// `amqp.quorum_initial_group_size` of the topology and the workers
    /// (`None`: whatever `VIDU_WORKER__*` says).
    pub(crate) group_size: Option<u16>,
    /// The broker's VMs for the CPU split (`None`: the local `beam.smp`).
    pub(crate) broker_pids: Option<Vec<u32>>,
}

impl Target {
    /// `BENCH_AMQP_URL` (the local broker by default).
    pub(crate) fn local(cfg: &BenchConfig) -> Self {
        Self {
            bench_url: cfg.amqp_url.clone(),
            worker_url: cfg.amqp_url.clone(),
            group_size: None,
            broker_pids: None,
        }
    }

    pub(crate) fn cpu_meter(&self, others: Vec<u32>) -> CpuMeter {
        match &self.broker_pids {
            Some(pids) => CpuMeter::start_with(pids.clone(), others),
            None => CpuMeter::start(others),
        }
    }
}

/// One run's deployment: the test kit's [`kit::Deployment`] (unique names,
/// the worker's topology, everything deleted on drop) declared with the
/// shipped settings, plus what only the benchmark needs: a durable quorum
/// "sink" queue bound to the terminal event types, a confirm-mode producer
/// channel for pipelined publishing, and the `amqp.url` the workers get.
pub(crate) struct Deployment {
    kit: kit::Deployment,
    pub(crate) sink_queue: String,
    /// The node the bench uses.
    pub(crate) amqp_url: String,
    /// What the workers get as `amqp.url`.
    worker_url: String,
    /// A channel on the sink's own connection (closed with the deployment).
    sink_channel: Channel,
    pub(crate) producer: Channel,
}

impl std::ops::Deref for Deployment {
    type Target = kit::Deployment;

    fn deref(&self) -> &kit::Deployment {
        &self.kit
    }
}

impl Deployment {
    pub(crate) async fn new(cfg: &BenchConfig, label: &str) -> BenchResult<Self> {
        Self::on(&Target::local(cfg), label).await
    }

    pub(crate) async fn on(target: &Target, label: &str) -> BenchResult<Self> {
        let name = kit::Deployment::unique_name(&format!("bench.{label}"));
        let mut settings = Settings::load(None).map_err(|e| format!("worker settings: {e}"))?;
        kit::Deployment::name_settings(&mut settings, &name);
        if target.group_size.is_some() {
            settings.amqp.quorum_initial_group_size = target.group_size;
        }
        let kit = kit::Deployment::declare(name, settings, &target.bench_url).await?;
        let producer = kit.conn.create_channel().await?;
        producer
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let sink_queue = kit
            .declare_queue_with(
                "sink",
                kit::queue_args(&[("x-queue-type", AMQPValue::LongString("quorum".into()))]),
            )
            .await?;
        for key in TERMINAL_KEYS {
            producer
                .queue_bind(
                    sink_queue.as_str().into(),
                    kit.topology.events_exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let sink_conn = connect(&target.bench_url, "bench sink").await?;
        let sink_channel = sink_conn.create_channel().await?;
        kit.close_on_drop(sink_conn);
        Ok(Self {
            kit,
            sink_queue,
            amqp_url: target.bench_url.clone(),
            worker_url: target.worker_url.clone(),
            sink_channel,
            producer,
        })
    }

    /// Requests ready in the request queue (not yet delivered to a worker).
    pub(crate) async fn ready_requests(&self) -> Option<u32> {
        vidu_worker::broker::ready_messages(&self.producer, &self.topology.request_queue)
            .await
            .ok()
    }

    /// Publishes `n` valid requests (persistent, mandatory, confirmed, with
    /// up to [`PUBLISH_WINDOW`] confirms outstanding); `prompt` may carry
    /// simulator directives. Returns how long publishing took.
    pub(crate) async fn publish_requests(
        &self,
        n: usize,
        tag: &str,
        prompt: &str,
    ) -> BenchResult<Duration> {
        let started = Instant::now();
        let messages = (0..n).map(|i| {
            let id = format!("{tag}-{i}");
            let body = serde_json::json!({
                "request_id": id,
                "input": {
                    "images": ["https://example.com/cat.png"],
                    "prompt": format!("{prompt} {id}"),
                    "duration": 5
                }
            });
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into());
            Ok((serde_json::to_vec(&body)?, props))
        });
        self.publish_pipelined(&self.topology.request_queue, messages)
            .await?;
        Ok(started.elapsed())
    }

    /// Publishes `messages` to `queue` through the default exchange
    /// (mandatory), with up to [`PUBLISH_WINDOW`] confirms outstanding, and
    /// waits for every confirm.
    pub(crate) async fn publish_pipelined(
        &self,
        queue: &str,
        messages: impl IntoIterator<Item = BenchResult<(Vec<u8>, BasicProperties)>>,
    ) -> BenchResult<()> {
        let mut pending: FuturesUnordered<PublisherConfirm> = FuturesUnordered::new();
        for message in messages {
            let (body, props) = message?;
            let confirm = self
                .producer
                .basic_publish(
                    ShortString::from(""),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    props,
                )
                .await?;
            pending.push(confirm);
            while pending.len() >= PUBLISH_WINDOW {
                check_confirm(pending.next().await)?;
            }
        }
        while !pending.is_empty() {
            check_confirm(pending.next().await)?;
        }
        Ok(())
    }

    pub(crate) fn worker_env(&self, sim: &RunningSimulator) -> Vec<(String, String)> {
        let mut env = vec![
            ("VIDU_WORKER__AMQP__URL".into(), self.worker_url.clone()),
            (
                "VIDU_WORKER__AMQP__REQUEST_QUEUE".into(),
                self.settings.amqp.request_queue.clone(),
            ),
            (
                "VIDU_WORKER__AMQP__EVENTS_EXCHANGE".into(),
                self.settings.amqp.events_exchange.clone(),
            ),
            ("VIDU_WORKER__UPSTREAM__BASE_URL".into(), sim.base_url()),
            ("NOVITA_API_KEY".into(), API_KEY.into()),
        ];
        if let Some(size) = self.settings.amqp.quorum_initial_group_size {
            env.push((
                "VIDU_WORKER__AMQP__QUORUM_INITIAL_GROUP_SIZE".into(),
                size.to_string(),
            ));
        }
        env
    }
}

pub(crate) async fn connect(url: &str, name: &str) -> BenchResult<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(Connection::connect(url, props).await?)
}

fn check_confirm(confirm: Option<lapin::Result<Confirmation>>) -> BenchResult<()> {
    match confirm {
        None => Ok(()),
        Some(Err(e)) => Err(format!("publish failed: {e}").into()),
        Some(Ok(c)) if c.is_nack() => Err("the broker nacked a publish".into()),
        Some(Ok(c)) => match c.take_message() {
            Some(returned) => {
                Err(format!("a publish was returned: {}", returned.reply_text).into())
            }
            None => Ok(()),
        },
    }
}

/// One distinct terminal event as the bench received it.
pub(crate) struct Arrival {
    pub(crate) at: SystemTime,
    pub(crate) body: Vec<u8>,
}

#[derive(Default)]
pub(crate) struct SinkState {
    ids: HashSet<String>,
    pub(crate) duplicates: usize,
    pub(crate) failed: usize,
    pub(crate) last: Option<Instant>,
    pub(crate) kept: Vec<Arrival>,
}

/// Consumes the sink queue (auto-ack) and counts distinct terminal events
/// by message id (= CloudEvents id).
pub(crate) struct Sink {
    state: Arc<Mutex<SinkState>>,
    count: watch::Receiver<usize>,
    _channel: Channel,
}

impl Sink {
    pub(crate) async fn start(dep: &Deployment, keep_bodies: bool) -> BenchResult<Self> {
        let channel = dep.sink_channel.clone();
        let mut consumer = channel
            .basic_consume(
                dep.sink_queue.as_str().into(),
                "bench-sink".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let state = Arc::new(Mutex::new(SinkState::default()));
        let (tx, count) = watch::channel(0usize);
        let shared = state.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let mut s = shared.lock().expect("sink lock");
                if !s.ids.insert(id) {
                    s.duplicates += 1;
                    continue;
                }
                if d.routing_key.as_str() != TERMINAL_KEYS[0] {
                    s.failed += 1;
                }
                s.last = Some(Instant::now());
                if keep_bodies {
                    s.kept.push(Arrival {
                        at: SystemTime::now(),
                        body: d.data,
                    });
                }
                let n = s.ids.len();
                drop(s);
                tx.send_replace(n);
            }
        });
        Ok(Self {
            state,
            count,
            _channel: channel,
        })
    }

    pub(crate) fn seen(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits for `n` distinct terminal events; the arrival time of the last.
    pub(crate) async fn wait_for(&self, n: usize, timeout: Duration) -> BenchResult<Instant> {
        let mut count = self.count.clone();
        let reached = tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await;
        match reached {
            Ok(Ok(_)) => Ok(self.lock().last.unwrap_or_else(Instant::now)),
            Ok(Err(_)) => Err("the event consumer stopped".into()),
            Err(_) => Err(format!(
                "timed out after {:.0} s with {} of {n} terminal events",
                timeout.as_secs_f64(),
                self.seen()
            )
            .into()),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().expect("sink lock")
    }
}

pub(crate) async fn simulator(generation: Duration, eta: EtaMode) -> BenchResult<RunningSimulator> {
    Ok(Simulator::start(SimulatorConfig {
        api_key: Some(API_KEY.into()),
        generation_time: generation,
        eta,
        ..SimulatorConfig::default()
    })
    .await?)
}
