//! The vidu-worker pipeline benchmark (issue 5): `cargo bench --bench pipeline`.
//!
//! One run measures, on the local RabbitMQ and the built-in simulator (run
//! in this process), what vidu-worker costs per task, and prints a markdown
//! table on stdout (progress goes to stderr):
//!
//! 1. `ceiling`: a minimal lapin loop in its own process (this executable
//!    again, with `BENCH_ROLE=ceiling-loop`) on the same broker: consume a
//!    persistent request from a quorum queue declared exactly like the
//!    worker's request queue, publish a persistent event to a topic exchange
//!    and await its confirm, then ack; as many in flight as the prefetch.
//! 2. `throughput`: one `vidu-worker run` child process, generation time 0,
//!    20,000 requests from the first publish to the last terminal event.
//! 3. `scaleout`: the same with 2 and 3 worker processes.
//! 4. `polling`: 20 s generations, with an honest `eta` and without one:
//!    task-result calls per task and detection latency (terminal event minus
//!    the moment the simulator marked the task done).
//! 5. `ratelimit`: a burst of 5,000 requests against a worker with a create
//!    quota and a poll budget (`upstream.create_quota`,
//!    `upstream.max_requests_per_second`); the most calls the simulator saw
//!    in any one-second window.
//! 6. `memory`: peak RSS of one worker while 2,000 and then 20,000 tasks stay
//!    in PROCESSING for at least 60 s and then complete.
//! 7. `quota`: 1, 2 and 3 workers sharing one simulated account quota (30
//!    creates per 30 s, no `Retry-After`), with `upstream.create_quota` set
//!    and learned: 429s per request, accepted creates in the busiest window,
//!    and the makespan against the quota's own limit.
//! 8. `latency`: 200 one-second tasks on one worker with default settings,
//!    publish to `succeeded`.
//! 9. `cluster`: a private three-node RabbitMQ cluster started by the bench
//!    (`rabbitmq-server` on free ports, joined with `rabbitmqctl
//!    join_cluster`, stopped and removed at the end). 3,000 instant tasks
//!    through 1 and 2 workers given the node list in `amqp.url`, quorum
//!    queues on 3 replicas, against 1 worker on a private single node; then
//!    2 workers on different nodes under a steady stream of 2 s tasks, and
//!    the node of one of them (not the one holding the queue leaders) killed
//!    with SIGKILL: time to the first terminal event after the loss, time
//!    until the moved worker is ready on another node, and extra creates.
//!
//! Knobs (environment): `BENCH_ONLY=ceiling,throughput` (or the scenario
//! names as arguments after `--`), `BENCH_SCALE=0.1` (counts and the memory
//! hold time), `BENCH_AMQP_URL`, `BENCH_PERF=perf.data` (record the worker
//! with `perf` during `throughput`; `BENCH_PERF_ARGS` overrides the
//! options). `VIDU_WORKER__*` variables pass through to the workers (and to
//! the topology the bench declares), except the names and URLs each
//! scenario sets. Every queue and exchange a scenario declares is deleted
//! when it ends. Not part of the test suite: it asserts nothing.

use std::{
    collections::{HashSet, VecDeque},
    env,
    error::Error,
    fmt::Write as _,
    path::PathBuf,
    process::{ExitCode, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use chrono::{DateTime, Utc};
use futures_util::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, ChildStdin, Command},
    sync::watch,
};
use vidu_worker::{
    broker::Topology,
    config::Settings,
    local_broker,
    simulator::{EtaMode, RunningSimulator, SimStats, Simulator, SimulatorConfig},
};

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Scenario names, in the order they run.
const SCENARIOS: [&str; 12] = [
    "ceiling",
    "throughput",
    "scaleout",
    "polling",
    "ratelimit",
    "memory",
    "quota",
    "noisy",
    "quotachange",
    "latency",
    "dedup",
    "cluster",
];
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const API_KEY: &str = "sk-bench-0123456789";
/// Requests for the throughput, ceiling and scale-out runs.
const INSTANT_TASKS: usize = 20_000;
/// Task counts of the memory runs.
const MEMORY_TASKS: [usize; 2] = [2_000, 20_000];
/// How long every task must stay in PROCESSING in the memory runs.
const MEMORY_HOLD: Duration = Duration::from_secs(60);
/// Tasks per polling run and their generation time.
const POLLING_TASKS: usize = 1_000;
const POLLING_GENERATION: Duration = Duration::from_secs(20);
/// The rate-limit run: burst size, limit and observation window.
const RATE_BURST: usize = 5_000;
/// Creates per second (`upstream.create_quota`) and polls per second
/// (`upstream.max_requests_per_second`) of the rate-limit run.
const RATE_CREATES: u32 = 50;
const RATE_POLLS: f64 = 50.0;
/// What the simulator may see in any one second: the creates, the polls
/// and one second's burst of polls.
const RATE_LIMIT: f64 = RATE_CREATES as f64 + 2.0 * RATE_POLLS;
const RATE_WINDOW: Duration = Duration::from_secs(40);
/// Worker counts of the scale-out runs (1 is the throughput run).
const SCALE_OUT: [usize; 2] = [2, 3];
/// Prefetch of the ceiling loop beside the worker's `amqp.prefetch`: the
/// worker's tracking consumer is allowed this many (`polling.prefetch`).
const CEILING_WIDE_PREFETCH: u16 = 256;
/// Unconfirmed publishes the bench's producer keeps in flight.
const PUBLISH_WINDOW: usize = 1_000;
/// Routing keys of terminal events.
const TERMINAL_KEYS: [&str; 2] = ["video.generation.succeeded", "video.generation.failed"];
/// Targets from the issue.
const TARGET_RATIO: f64 = 0.5;
const TARGET_RSS_MIB: f64 = 64.0;
const TARGET_POLLS_PER_TASK: f64 = 4.0;
const TARGET_P95_LATENCY_S: f64 = 1.5;

fn main() -> ExitCode {
    if env::var("BENCH_ROLE").as_deref() == Ok("ceiling-loop") {
        return ceiling_loop_main();
    }
    let cfg = match BenchConfig::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("pipeline bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Ctrl-C drops the run: workers and loops are killed on drop and every
    // deployment deletes its queues.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(cfg) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    match outcome {
        Some(Ok(report)) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            eprintln!("pipeline bench failed: {e}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("pipeline bench interrupted; cleaned up");
            ExitCode::from(130)
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration and reporting
// ---------------------------------------------------------------------------

struct BenchConfig {
    only: HashSet<String>,
    scale: f64,
    amqp_url: String,
    perf: Option<String>,
    perf_args: Vec<String>,
    /// Runs of each instant scenario (ceiling, throughput, scale-out); the
    /// median is reported.
    repeat: usize,
    /// Longest wait for a quiet machine before each measured run.
    quiet_wait: Duration,
    started: Instant,
}

impl BenchConfig {
    fn from_env() -> Result<Self, String> {
        let mut names: Vec<String> = env::var("BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        // `cargo bench` passes `--bench`; anything else is a scenario name.
        names.extend(env::args().skip(1).filter(|a| !a.starts_with('-')));
        for name in &names {
            if !SCENARIOS.contains(&name.as_str()) {
                return Err(format!(
                    "unknown scenario {name:?}; known: {}",
                    SCENARIOS.join(", ")
                ));
            }
        }
        let only = if names.is_empty() {
            SCENARIOS.iter().map(|s| (*s).to_owned()).collect()
        } else {
            names.into_iter().collect()
        };
        let scale = match env::var("BENCH_SCALE") {
            Ok(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0 && v.is_finite())
                .ok_or_else(|| format!("BENCH_SCALE={s:?} is not a positive number"))?,
            Err(_) => 1.0,
        };
        let perf_args = env::var("BENCH_PERF_ARGS")
            .unwrap_or_else(|_| "-e cpu-clock -F 250 --call-graph dwarf,16384".into())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let repeat = match env::var("BENCH_REPEAT") {
            Ok(s) => s
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| format!("BENCH_REPEAT={s:?} is not a whole number ≥ 1"))?,
            Err(_) => 1,
        };
        let quiet_wait = match env::var("BENCH_QUIET_WAIT") {
            Ok(s) => Duration::from_secs(
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("BENCH_QUIET_WAIT={s:?} is not a number of seconds"))?,
            ),
            Err(_) => Duration::from_secs(120),
        };
        Ok(Self {
            only,
            scale,
            repeat,
            quiet_wait,
            amqp_url: env::var("BENCH_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into()),
            perf: env::var("BENCH_PERF").ok().filter(|p| !p.is_empty()),
            perf_args,
            started: Instant::now(),
        })
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only.contains(scenario)
    }

    fn count(&self, full: usize, min: usize) -> usize {
        ((full as f64 * self.scale).round() as usize).max(min)
    }

    fn duration(&self, full: Duration, min: Duration) -> Duration {
        full.mul_f64(self.scale.min(1.0)).max(min)
    }
}

/// Progress on stderr, stamped with the time since the bench started.
macro_rules! progress {
    ($cfg:expr, $($arg:tt)*) => {
        eprintln!("[{:>7.1}s] {}", $cfg.started.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    Info,
}

struct Row {
    id: &'static str,
    measure: String,
    value: String,
    target: String,
    verdict: Verdict,
}

impl Row {
    fn info(id: &'static str, measure: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            id,
            measure: measure.into(),
            value: value.into(),
            target: String::new(),
            verdict: Verdict::Info,
        }
    }

    fn target(
        id: &'static str,
        measure: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) -> Self {
        Self {
            id,
            measure: measure.into(),
            value: value.into(),
            target: target.into(),
            verdict: if met { Verdict::Met } else { Verdict::Missed },
        }
    }

    fn failed(id: &'static str, measure: impl Into<String>, error: &dyn std::fmt::Display) -> Self {
        Self::info(id, measure, format!("did not complete: {error}"))
    }
}

/// What later scenarios reuse from earlier ones.
#[derive(Default)]
struct Findings {
    /// The ceiling loop at the worker's `amqp.prefetch` (the fair match).
    ceiling: Option<f64>,
    /// The ceiling loop at [`CEILING_WIDE_PREFETCH`].
    ceiling_wide: Option<f64>,
    one_worker: Option<InstantRun>,
}

async fn run(cfg: BenchConfig) -> BenchResult<String> {
    let machine = machine_line(&cfg).await;
    progress!(cfg, "{machine}");
    progress!(
        cfg,
        "scenarios: {}; scale {}",
        SCENARIOS
            .iter()
            .filter(|s| cfg.wants(s))
            .copied()
            .collect::<Vec<_>>()
            .join(", "),
        cfg.scale
    );
    let mut rows = Vec::new();
    let mut found = Findings::default();
    if cfg.wants("ceiling") {
        rows.extend(scenario_ceiling(&cfg, &mut found).await);
    }
    if cfg.wants("throughput") {
        rows.extend(scenario_throughput(&cfg, &mut found).await);
    }
    if cfg.wants("scaleout") {
        rows.extend(scenario_scaleout(&cfg, &mut found).await);
    }
    if cfg.wants("polling") {
        rows.extend(scenario_polling(&cfg).await);
    }
    if cfg.wants("ratelimit") {
        rows.extend(scenario_ratelimit(&cfg).await);
    }
    if cfg.wants("memory") {
        rows.extend(scenario_memory(&cfg, &found).await);
    }
    if cfg.wants("quota") {
        rows.extend(scenario_quota(&cfg).await);
    }
    if cfg.wants("noisy") {
        rows.extend(scenario_noisy(&cfg).await);
    }
    if cfg.wants("quotachange") {
        rows.extend(scenario_quota_change(&cfg).await);
    }
    if cfg.wants("latency") {
        rows.extend(scenario_latency(&cfg).await);
    }
    if cfg.wants("dedup") {
        rows.extend(scenario_dedup(&cfg).await);
    }
    if cfg.wants("cluster") {
        rows.extend(scenario_cluster(&cfg).await);
    }
    let mut out = String::new();
    let _ = writeln!(out, "\n## vidu-worker pipeline benchmark\n");
    let _ = writeln!(out, "{machine}; scale {}.\n", cfg.scale);
    let _ = writeln!(out, "| # | measure | result | target | met |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in &rows {
        let met = match r.verdict {
            Verdict::Met => "yes",
            Verdict::Missed => "**no**",
            Verdict::Info => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.id, r.measure, r.value, r.target, met
        );
    }
    let _ = writeln!(
        out,
        "\nTotal bench time: {:.0} s.",
        cfg.started.elapsed().as_secs_f64()
    );
    Ok(out)
}

async fn machine_line(cfg: &BenchConfig) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rabbit = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new("rabbitmqctl")
            .arg("version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .filter(|v| !v.is_empty())
    .unwrap_or_else(|| "unknown (rabbitmqctl not available)".into());
    let overrides: Vec<String> = env::vars()
        .filter(|(k, _)| k.starts_with("VIDU_WORKER__"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let overrides = if overrides.is_empty() {
        "shipped worker defaults".to_owned()
    } else {
        format!("worker overrides: {}", overrides.join(" "))
    };
    let _ = cfg;
    format!(
        "{cores} cores, RabbitMQ {rabbit}, vidu-worker {} (release), {overrides}",
        env!("CARGO_PKG_VERSION")
    )
}

// ---------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM), in MiB.
fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// User plus system CPU seconds of a process (clock ticks of 1/100 s).
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The RabbitMQ server process on this machine, if it is local.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// Waits (up to `BENCH_QUIET_WAIT` seconds, default 120) until the machine
/// is quiet: less than a quarter of a core busy over one second while
/// nothing of the bench runs. Other processes (builds, test suites) on a
/// 2-core machine change every figure.
async fn wait_quiet(cfg: &BenchConfig) {
    let deadline = Instant::now() + cfg.quiet_wait;
    let mut told = false;
    loop {
        let Some(before) = machine_busy_secs() else {
            return;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(after) = machine_busy_secs() else {
            return;
        };
        let busy = after - before;
        if busy < 0.25 {
            return;
        }
        if Instant::now() >= deadline {
            progress!(
                cfg,
                "  the machine is still busy ({:.0}% of a core outside the bench); measuring anyway",
                busy * 100.0
            );
            return;
        }
        if !told {
            progress!(
                cfg,
                "  waiting for a quiet machine ({:.0}% of a core busy outside the bench)",
                busy * 100.0
            );
            told = true;
        }
    }
}

/// CPU seconds used by the broker, this bench process (simulator, producer,
/// event consumer) and the measured processes over one run.
struct CpuMeter {
    /// The broker's VMs (every node of a cluster), summed.
    brokers: Vec<u32>,
    others: Vec<u32>,
    start: Vec<Option<f64>>,
    machine_start: Option<f64>,
    wall: Instant,
}

#[derive(Clone)]
struct CpuSplit {
    wall: f64,
    broker: Option<f64>,
    bench: Option<f64>,
    measured: Option<f64>,
    /// Everything else on the machine (other tests, builds): noise.
    other: Option<f64>,
}

/// Busy CPU seconds of the whole machine since boot (`/proc/stat`).
fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy / 100.0)
}

impl CpuMeter {
    fn start(others: Vec<u32>) -> Self {
        Self::start_with(broker_pid().into_iter().collect(), others)
    }

    /// With the broker's own processes (a private node or cluster).
    fn start_with(brokers: Vec<u32>, others: Vec<u32>) -> Self {
        let mut meter = Self {
            brokers,
            others,
            start: Vec::new(),
            machine_start: machine_busy_secs(),
            wall: Instant::now(),
        };
        meter.start = meter.read();
        meter
    }

    fn pids(&self) -> Vec<u32> {
        let mut pids = self.brokers.clone();
        pids.push(std::process::id());
        pids.extend(&self.others);
        pids
    }

    fn read(&self) -> Vec<Option<f64>> {
        self.pids().into_iter().map(proc_cpu_secs).collect()
    }

    fn stop(&self) -> CpuSplit {
        let end = self.read();
        let delta: Vec<Option<f64>> = end
            .iter()
            .zip(&self.start)
            .map(|(e, s)| Some((*e)? - (*s)?))
            .collect();
        let sum = |d: &[Option<f64>]| d.iter().try_fold(0.0, |acc, d| d.map(|d| acc + d));
        let nb = self.brokers.len();
        let broker = if nb == 0 { None } else { sum(&delta[..nb]) };
        let measured = sum(&delta[nb + 1..]);
        let machine = machine_busy_secs()
            .zip(self.machine_start)
            .map(|(e, s)| e - s);
        // Without the broker's figure, nothing is known about the rest.
        let ours = if nb == 0 { None } else { sum(&delta) };
        CpuSplit {
            wall: self.wall.elapsed().as_secs_f64(),
            broker,
            bench: delta[nb],
            measured,
            other: machine.zip(ours).map(|(m, o)| (m - o).max(0.0)),
        }
    }
}

impl CpuSplit {
    /// `broker 61% · worker 55% · bench 30%` of one core each, over the run.
    fn describe(&self, measured: &str) -> String {
        let pct = |v: Option<f64>| {
            v.map_or_else(
                || "n/a".into(),
                |v| format!("{:.0}%", v / self.wall * 100.0),
            )
        };
        format!(
            "broker {} · {measured} {} · bench client+simulator {} · other processes {} (of one core, over {:.1} s)",
            pct(self.broker),
            pct(self.measured),
            pct(self.bench),
            pct(self.other),
            self.wall
        )
    }

    /// Share of one core that other processes took (0 when unknown).
    fn other_share(&self) -> f64 {
        self.other.map_or(0.0, |o| o / self.wall)
    }

    /// CPU milliseconds per task, by process.
    fn per_task(&self, n: usize, measured: &str) -> String {
        let ms = |v: Option<f64>| {
            v.map_or_else(|| "n/a".into(), |v| format!("{:.2}", v * 1000.0 / n as f64))
        };
        format!(
            "broker {} · {measured} {} · bench {}",
            ms(self.broker),
            ms(self.measured),
            ms(self.bench)
        )
    }
}

// ---------------------------------------------------------------------------
// Broker side: a private deployment per run, the producer, the event sink
// ---------------------------------------------------------------------------

/// The broker a run uses: the node the bench declares, publishes and
/// consumes through, and the `amqp.url` the workers get (the same node, or
/// a cluster's node list).
#[derive(Clone)]
struct Target {
    bench_url: String,
    worker_url: String,
    /// `amqp.quorum_initial_group_size` of the topology and the workers
    /// (`None`: whatever `VIDU_WORKER__*` says).
    group_size: Option<u16>,
    /// The broker's VMs for the CPU split (`None`: the local `beam.smp`).
    broker_pids: Option<Vec<u32>>,
}

impl Target {
    /// `BENCH_AMQP_URL` (the local broker by default).
    fn local(cfg: &BenchConfig) -> Self {
        Self {
            bench_url: cfg.amqp_url.clone(),
            worker_url: cfg.amqp_url.clone(),
            group_size: None,
            broker_pids: None,
        }
    }

    fn cpu_meter(&self, others: Vec<u32>) -> CpuMeter {
        match &self.broker_pids {
            Some(pids) => CpuMeter::start_with(pids.clone(), others),
            None => CpuMeter::start(others),
        }
    }
}

/// Unique queue and exchange names for one run, declared like the worker
/// declares them, plus a durable quorum "sink" queue bound to the terminal
/// event types. Everything is deleted on drop.
struct Deployment {
    topology: Topology,
    settings: Settings,
    sink_queue: String,
    /// The node the bench uses (and cleans up through).
    amqp_url: String,
    /// What the workers get as `amqp.url`.
    worker_url: String,
    /// The producer's and the sink's connections (closed on drop).
    conns: Vec<Connection>,
    producer: Channel,
}

impl Deployment {
    async fn new(cfg: &BenchConfig, label: &str) -> BenchResult<Self> {
        Self::on(&Target::local(cfg), label).await
    }

    async fn on(target: &Target, label: &str) -> BenchResult<Self> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("bench.{label}.{}", &unique[..8]);
        let mut settings = Settings::load(None).map_err(|e| format!("worker settings: {e}"))?;
        settings.amqp.request_queue = format!("{name}.requests");
        settings.amqp.events_exchange = format!("{name}.events");
        if target.group_size.is_some() {
            settings.amqp.quorum_initial_group_size = target.group_size;
        }
        let topology = Topology::new(&settings);
        let producer_conn = connect(&target.bench_url, "bench producer").await?;
        topology.declare(&producer_conn).await?;
        let producer = producer_conn.create_channel().await?;
        producer
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let sink_queue = format!("{name}.sink");
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        producer
            .queue_declare(
                sink_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        for key in TERMINAL_KEYS {
            producer
                .queue_bind(
                    sink_queue.as_str().into(),
                    topology.events_exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let sink_conn = connect(&target.bench_url, "bench sink").await?;
        Ok(Self {
            topology,
            settings,
            sink_queue,
            amqp_url: target.bench_url.clone(),
            worker_url: target.worker_url.clone(),
            conns: vec![producer_conn, sink_conn],
            producer,
        })
    }

    /// Requests ready in the request queue (not yet delivered to a worker).
    async fn ready_requests(&self) -> Option<u32> {
        self.producer
            .queue_declare(
                self.topology.request_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()
            .map(|q| q.message_count())
    }

    fn sink_conn(&self) -> &Connection {
        &self.conns[1]
    }

    /// Publishes `n` valid requests (persistent, mandatory, confirmed, with
    /// up to [`PUBLISH_WINDOW`] confirms outstanding); `prompt` may carry
    /// simulator directives. Returns how long publishing took.
    async fn publish_requests(&self, n: usize, tag: &str, prompt: &str) -> BenchResult<Duration> {
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
    async fn publish_pipelined(
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

    fn worker_env(&self, sim: &RunningSimulator) -> Vec<(String, String)> {
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

impl Drop for Deployment {
    fn drop(&mut self) {
        let mut queues = self.topology.queue_names();
        queues.push(self.sink_queue.clone());
        let exchange = self.topology.events_exchange.clone();
        let url = self.amqp_url.clone();
        let conns = std::mem::take(&mut self.conns);
        // Drop runs inside the runtime: clean up from a fresh thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                for conn in conns {
                    let _ = conn.close(200, "bench run over".into()).await;
                }
                let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await
                else {
                    eprintln!("bench clean-up: cannot reach the broker; queues {queues:?} remain");
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
                let _ = conn.close(200, "bench clean-up".into()).await;
            });
        })
        .join();
    }
}

async fn connect(url: &str, name: &str) -> BenchResult<Connection> {
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
struct Arrival {
    at: SystemTime,
    body: Vec<u8>,
}

#[derive(Default)]
struct SinkState {
    ids: HashSet<String>,
    duplicates: usize,
    failed: usize,
    last: Option<Instant>,
    kept: Vec<Arrival>,
}

/// Consumes the sink queue (auto-ack) and counts distinct terminal events
/// by message id (= CloudEvents id).
struct Sink {
    state: Arc<Mutex<SinkState>>,
    count: watch::Receiver<usize>,
    _channel: Channel,
}

impl Sink {
    async fn start(dep: &Deployment, keep_bodies: bool) -> BenchResult<Self> {
        let channel = dep.sink_conn().create_channel().await?;
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

    fn seen(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits for `n` distinct terminal events; the arrival time of the last.
    async fn wait_for(&self, n: usize, timeout: Duration) -> BenchResult<Instant> {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().expect("sink lock")
    }
}

// ---------------------------------------------------------------------------
// Processes: the simulator, worker children, the ceiling loop child
// ---------------------------------------------------------------------------

async fn simulator(generation: Duration, eta: EtaMode) -> BenchResult<RunningSimulator> {
    Ok(Simulator::start(SimulatorConfig {
        api_key: Some(API_KEY.into()),
        generation_time: generation,
        eta,
        ..SimulatorConfig::default()
    })
    .await?)
}

/// A `vidu-worker run` child; killed on drop if still running.
struct Worker {
    child: Child,
    pid: u32,
    ops: String,
    log_lines: Arc<AtomicU64>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Worker {
    async fn spawn(
        dep: &Deployment,
        sim: &RunningSimulator,
        extra_env: &[(&str, String)],
    ) -> BenchResult<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vidu-worker"));
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The bench sets the key its own way.
        cmd.env_remove("VIDU_WORKER__UPSTREAM__API_KEY");
        cmd.env("VIDU_WORKER__UPSTREAM__MAX_REQUESTS_PER_SECOND", "0");
        for (k, v) in dep.worker_env(sim) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        // A free port for the operations endpoint, so that nothing depends
        // on the worker's log level.
        let ops = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .to_string();
        cmd.env("VIDU_WORKER__HTTP__LISTEN", &ops);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start vidu-worker: {e}"))?;
        let pid = child.id().ok_or("the worker exited at once")?;
        let log_lines = Arc::new(AtomicU64::new(0));
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(out) = child.stdout.take() {
            drain(out, log_lines.clone(), tail.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, log_lines.clone(), tail.clone());
        }
        let worker = Self {
            child,
            pid,
            ops,
            log_lines,
            tail,
        };
        worker.wait_ready(Duration::from_secs(60)).await?;
        Ok(worker)
    }

    async fn wait_ready(&self, timeout: Duration) -> BenchResult<()> {
        let url = format!("http://{}/readyz", self.ops);
        self.wait_for(timeout, "was not ready", || async {
            let resp = reqwest::get(&url).await.ok()?;
            resp.status().is_success().then_some(())
        })
        .await
    }

    /// Asks `probe` every 100 ms until it answers; after `timeout`, fails
    /// saying the worker `what`, with its last log lines.
    async fn wait_for<T, F, Fut>(
        &self,
        timeout: Duration,
        what: &str,
        mut probe: F,
    ) -> BenchResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(answer) = probe().await {
                return Ok(answer);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the worker {what} within {timeout:?}; last lines: {:?}",
                    self.tail.lock().expect("tail")
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The port of the broker node the worker is ready on: `/readyz`
    /// answers `ready (broker node HOST:PORT)`. `None` while not ready.
    async fn broker_node(&self) -> Option<u16> {
        let resp = reqwest::get(format!("http://{}/readyz", self.ops))
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.text().await.ok()?;
        body.trim()
            .strip_suffix(')')?
            .rsplit(':')
            .next()?
            .parse()
            .ok()
    }

    /// Waits until the worker names a broker node other than `not`.
    async fn wait_broker_node(&self, not: Option<u16>, timeout: Duration) -> BenchResult<u16> {
        self.wait_for(timeout, "named no broker node", || async {
            self.broker_node().await.filter(|p| Some(*p) != not)
        })
        .await
    }

    /// Sum of every sample of a metric family (`vidu_worker_..._total`).
    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.ops))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    fn rss_mib(&self) -> Option<f64> {
        proc_status_mib(self.pid, "VmRSS")
    }

    fn peak_rss_mib(&self) -> Option<f64> {
        proc_status_mib(self.pid, "VmHWM")
    }

    /// SIGTERM, then SIGKILL if it has not exited within 40 s.
    async fn stop(mut self) {
        signal(self.pid, "TERM");
        if tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Reads a child's output: counts lines and keeps the last few.
fn drain(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    lines_seen: Arc<AtomicU64>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            lines_seen.fetch_add(1, Ordering::Relaxed);
            let mut t = tail.lock().expect("tail");
            if t.len() >= 20 {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
}

async fn start_workers(
    dep: &Deployment,
    sim: &RunningSimulator,
    count: usize,
    extra_env: &[(&str, String)],
) -> BenchResult<Vec<Worker>> {
    let mut workers = Vec::with_capacity(count);
    for _ in 0..count {
        workers.push(Worker::spawn(dep, sim, extra_env).await?);
    }
    Ok(workers)
}

async fn stop_workers(workers: Vec<Worker>) {
    futures_util::future::join_all(workers.into_iter().map(Worker::stop)).await;
}

fn stats_delta(before: &SimStats, after: &SimStats) -> (u64, u64) {
    (
        after.create_calls - before.create_calls,
        after.poll_calls - before.poll_calls,
    )
}

// ---------------------------------------------------------------------------
// 1. Broker ceiling
// ---------------------------------------------------------------------------

/// The minimal loop, run in a child process like a worker would be.
struct CeilingLoop {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
}

impl CeilingLoop {
    async fn spawn(dep: &Deployment, prefetch: u16) -> BenchResult<Self> {
        let exe = env::current_exe()?;
        let mut child = Command::new(exe)
            .env("BENCH_ROLE", "ceiling-loop")
            .env("BENCH_AMQP_URL", &dep.amqp_url)
            .env("BENCH_CEILING_QUEUE", &dep.topology.request_queue)
            .env("BENCH_CEILING_EXCHANGE", &dep.topology.events_exchange)
            .env("BENCH_CEILING_PREFETCH", prefetch.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("the ceiling loop exited at once")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(line))) if line == "ready" => Ok(Self { child, pid, stdin }),
            other => Err(format!("the ceiling loop did not start: {other:?}").into()),
        }
    }

    async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }
}

fn ceiling_loop_main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(ceiling_loop()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceiling loop: {e}");
            ExitCode::FAILURE
        }
    }
}

/// consume a request → publish a persistent event to the topic exchange and
/// await its confirm → ack the request; `prefetch` of them in flight. Ends
/// when stdin closes.
async fn ceiling_loop() -> BenchResult<()> {
    let var = |k: &str| env::var(k).map_err(|_| format!("{k} is not set"));
    let url = var("BENCH_AMQP_URL")?;
    let queue = var("BENCH_CEILING_QUEUE")?;
    let exchange = var("BENCH_CEILING_EXCHANGE")?;
    let prefetch: u16 = var("BENCH_CEILING_PREFETCH")?.parse()?;
    let conn = connect(&url, "bench ceiling loop").await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            queue.as_str().into(),
            "bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let body: Arc<[u8]> = terminal_event_body().into_bytes().into();
    let exchange: ShortString = exchange.as_str().into();
    println!("ready");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                if !matches!(line, Ok(Some(_))) {
                    break;
                }
            }
            delivery = consumer.next() => {
                let Some(delivery) = delivery else { break };
                let delivery = delivery?;
                let publisher = publisher.clone();
                let body = body.clone();
                let exchange = exchange.clone();
                tokio::spawn(async move {
                    let props = BasicProperties::default()
                        .with_content_type("application/cloudevents+json".into())
                        .with_delivery_mode(2)
                        .with_message_id(
                            delivery.properties.message_id().clone().unwrap_or_default(),
                        );
                    let confirmed = match publisher
                        .basic_publish(
                            exchange,
                            TERMINAL_KEYS[0].into(),
                            BasicPublishOptions::default(),
                            &body,
                            props,
                        )
                        .await
                    {
                        Ok(confirm) => confirm.await.map(|c| c.is_ack()).unwrap_or(false),
                        Err(_) => false,
                    };
                    let settled = if confirmed {
                        delivery.acker.ack(BasicAckOptions::default()).await
                    } else {
                        delivery
                            .acker
                            .nack(lapin::options::BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            })
                            .await
                    };
                    if let Err(e) = settled {
                        eprintln!("ceiling loop: settle failed: {e}");
                    }
                });
            }
        }
    }
    let _ = conn.close(200, "ceiling loop done".into()).await;
    Ok(())
}

/// A `video.generation.succeeded` event the size and shape of the worker's.
fn terminal_event_body() -> String {
    let now = Utc::now().to_rfc3339();
    serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "vidu-worker",
        "type": TERMINAL_KEYS[0],
        "time": now,
        "subject": "ceiling-123456",
        "datacontenttype": "application/json",
        "data": {
            "request_id": "ceiling-123456",
            "task_id": uuid::Uuid::new_v4().to_string(),
            "video_url": "https://sim.novita.example/videos/00000000-0000-0000-0000-000000000000.mp4",
            "videos": [{
                "url": "https://sim.novita.example/videos/00000000-0000-0000-0000-000000000000.mp4",
                "ttl_seconds": 3600,
                "type": "mp4"
            }],
            "submitted_at": now,
            "completed_at": now,
            "metadata": null
        }
    })
    .to_string()
}

async fn scenario_ceiling(cfg: &BenchConfig, found: &mut Findings) -> Vec<Row> {
    let n = cfg.count(INSTANT_TASKS, 200);
    let worker_prefetch = Settings::load(None).map_or(32, |s| s.amqp.prefetch);
    let mut rows = Vec::new();
    for (i, prefetch) in [worker_prefetch, CEILING_WIDE_PREFETCH]
        .into_iter()
        .enumerate()
    {
        progress!(cfg, "ceiling: {n} requests, prefetch {prefetch}");
        let runs = median_of(cfg, |_| async {
            let run = ceiling_run(cfg, n, prefetch).await?;
            progress!(
                cfg,
                "ceiling: {:.0} tasks/s ({})",
                run.rate,
                run.cpu.describe("loop")
            );
            Ok(run)
        })
        .await;
        match runs {
            Ok((CeilingRun { rate, cpu }, rates)) => {
                rows.push(Row::info(
                    "1",
                    format!("Broker ceiling, minimal loop, prefetch {prefetch} ({n} requests)"),
                    format!("**{rate:.0} tasks/s**{}", spread(&rates)),
                ));
                rows.push(Row::info(
                    "1",
                    format!("  CPU ms per task (prefetch {prefetch})"),
                    cpu.per_task(n, "loop"),
                ));
                if i == 0 {
                    found.ceiling = Some(rate);
                } else {
                    found.ceiling_wide = Some(rate);
                }
            }
            Err(e) => rows.push(Row::failed(
                "1",
                format!("Broker ceiling, prefetch {prefetch}"),
                &e,
            )),
        }
    }
    rows
}

struct CeilingRun {
    rate: f64,
    cpu: CpuSplit,
}

impl Measured for CeilingRun {
    fn rate(&self) -> f64 {
        self.rate
    }
    fn cpu(&self) -> &CpuSplit {
        &self.cpu
    }
}

async fn ceiling_run(cfg: &BenchConfig, n: usize, prefetch: u16) -> BenchResult<CeilingRun> {
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "ceiling").await?;
    let sink = Sink::start(&dep, false).await?;
    let looper = CeilingLoop::spawn(&dep, prefetch).await?;
    let cpu = CpuMeter::start(vec![looper.pid]);
    let t0 = Instant::now();
    dep.publish_requests(n, "ceiling", "a cat turns its head")
        .await?;
    let last = sink.wait_for(n, Duration::from_secs(600)).await;
    let split = cpu.stop();
    looper.stop().await;
    let last = last?;
    Ok(CeilingRun {
        rate: n as f64 / (last - t0).as_secs_f64(),
        cpu: split,
    })
}

// ---------------------------------------------------------------------------
// 2. Throughput and 6. scale-out: instant upstream
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct InstantRun {
    workers: usize,
    n: usize,
    rate: f64,
    /// Requests per second until the request queue had none ready.
    intake: Option<f64>,
    publish: Duration,
    failed: usize,
    duplicates: usize,
    cpu: CpuSplit,
    creates: u64,
    polls: u64,
    /// Per task, from the first worker's metrics: events confirmed, ticket
    /// publishes (hops), upstream calls.
    events_per_task: Option<f64>,
    hops_per_task: Option<f64>,
    log_lines_per_task: f64,
    peak_rss: Option<f64>,
    /// The broker node (port) each worker named in `/readyz` at the start.
    nodes: Vec<Option<u16>>,
}

async fn instant_run(
    cfg: &BenchConfig,
    workers: usize,
    n: usize,
    perf: Option<&str>,
) -> BenchResult<InstantRun> {
    instant_run_on(cfg, &Target::local(cfg), workers, n, perf).await
}

async fn instant_run_on(
    cfg: &BenchConfig,
    target: &Target,
    workers: usize,
    n: usize,
    perf: Option<&str>,
) -> BenchResult<InstantRun> {
    let sim = simulator(Duration::ZERO, EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::on(target, &format!("instant{workers}")).await?;
    let sink = Sink::start(&dep, false).await?;
    let procs = start_workers(&dep, &sim, workers, &[]).await?;
    let mut nodes = Vec::with_capacity(procs.len());
    for w in &procs {
        nodes.push(w.broker_node().await);
    }
    let mut perf_child = match perf {
        Some(path) => Some(start_perf(cfg, path, procs[0].pid)?),
        None => None,
    };
    let before = sim.stats();
    let cpu = target.cpu_meter(procs.iter().map(|w| w.pid).collect());
    let t0 = Instant::now();
    let publish = dep
        .publish_requests(n, "instant", "a cat turns its head")
        .await?;
    progress!(
        cfg,
        "  published {n} requests in {:.1} s",
        publish.as_secs_f64()
    );
    let mut reporter = tokio::time::interval(Duration::from_secs(5));
    reporter.tick().await;
    let mut sampler = tokio::time::interval(Duration::from_millis(200));
    let mut intake_done: Option<Instant> = None;
    let wait = sink.wait_for(n, Duration::from_secs(900));
    tokio::pin!(wait);
    let last = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = reporter.tick() => progress!(cfg, "  {} of {n} terminal events", sink.seen()),
            _ = sampler.tick(), if intake_done.is_none() => {
                if dep.ready_requests().await == Some(0) {
                    intake_done = Some(Instant::now());
                }
            }
        }
    };
    let split = cpu.stop();
    if let Some(child) = perf_child.as_mut() {
        stop_perf(cfg, child).await;
    }
    let last = last?;
    let after = sim.stats();
    let (creates, polls) = stats_delta(&before, &after);
    let events = procs[0].metric("vidu_worker_events_published_total").await;
    let hops = procs[0].metric("vidu_worker_ticket_hops_total").await;
    let requests = procs[0].metric("vidu_worker_requests_received_total").await;
    let per_task = |v: Option<f64>| Some(v? / requests.filter(|r| *r > 0.0)?);
    let log_lines: u64 = procs
        .iter()
        .map(|w| w.log_lines.load(Ordering::Relaxed))
        .sum();
    let peak_rss = procs
        .iter()
        .filter_map(Worker::peak_rss_mib)
        .reduce(f64::max);
    let (failed, duplicates) = {
        let s = sink.lock();
        (s.failed, s.duplicates)
    };
    stop_workers(procs).await;
    Ok(InstantRun {
        workers,
        n,
        rate: n as f64 / (last - t0).as_secs_f64(),
        intake: intake_done.map(|at| n as f64 / (at - t0).as_secs_f64()),
        publish,
        failed,
        duplicates,
        cpu: split,
        creates,
        polls,
        events_per_task: per_task(events),
        hops_per_task: per_task(hops),
        log_lines_per_task: log_lines as f64 / n as f64,
        peak_rss,
        nodes,
    })
}

fn start_perf(cfg: &BenchConfig, path: &str, pid: u32) -> BenchResult<Child> {
    progress!(cfg, "  recording worker {pid} with perf into {path}");
    let child = Command::new("perf")
        .arg("record")
        .args(&cfg.perf_args)
        .arg("-o")
        .arg(path)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start perf (BENCH_PERF): {e}"))?;
    Ok(child)
}

async fn stop_perf(cfg: &BenchConfig, child: &mut Child) {
    if let Some(pid) = child.id() {
        signal(pid, "INT");
    }
    match tokio::time::timeout(Duration::from_secs(120), child.wait()).await {
        Ok(_) => progress!(cfg, "  perf data written"),
        Err(_) => {
            let _ = child.start_kill();
            progress!(cfg, "  perf did not stop in time; killed");
        }
    }
}

fn ratio_cell(rate: f64, ceiling: Option<f64>) -> (String, Option<f64>) {
    match ceiling {
        Some(c) if c > 0.0 => (format!("{:.2}", rate / c), Some(rate / c)),
        _ => ("n/a (run `ceiling` too)".into(), None),
    }
}

async fn scenario_throughput(cfg: &BenchConfig, found: &mut Findings) -> Vec<Row> {
    let n = cfg.count(INSTANT_TASKS, 200);
    progress!(cfg, "throughput: 1 worker, {n} instant tasks");
    let runs = median_of(cfg, |i| async move {
        let perf = cfg.perf.as_deref().filter(|_| i == 0);
        let run = instant_run(cfg, 1, n, perf).await?;
        progress!(
            cfg,
            "throughput: {:.0} tasks/s ({})",
            run.rate,
            run.cpu.describe("worker")
        );
        Ok(run)
    })
    .await;
    let (run, rates) = match runs {
        Ok(runs) => runs,
        Err(e) => return vec![Row::failed("2", "End-to-end throughput, 1 worker", &e)],
    };
    let (ratio, r) = ratio_cell(run.rate, found.ceiling);
    let (ratio_wide, _) = ratio_cell(run.rate, found.ceiling_wide);
    let mut rows = vec![
        Row::info(
            "2",
            format!("End-to-end throughput, 1 worker, generation 0 ({n} requests)"),
            format!("**{:.0} tasks/s**{}", run.rate, spread(&rates)),
        ),
        match r {
            // Without a ceiling run there is nothing to judge.
            None => Row::info(
                "2",
                "  ratio to the broker ceiling at the same prefetch",
                ratio,
            ),
            Some(r) => Row::target(
                "2",
                "  ratio to the broker ceiling at the same prefetch",
                ratio,
                format!("≥ {TARGET_RATIO}"),
                r >= TARGET_RATIO,
            ),
        },
        Row::info(
            "2",
            format!("  ratio to the broker ceiling at prefetch {CEILING_WIDE_PREFETCH}"),
            ratio_wide,
        ),
        Row::info("2", "  CPU ms per task", run.cpu.per_task(n, "worker")),
        Row::info("2", "  CPU use", run.cpu.describe("worker")),
        Row::info(
            "2",
            "  intake: request queue emptied at (requests/s)",
            format!("{} requests/s", fmt_opt(run.intake, 0)),
        ),
        Row::info(
            "2",
            "  per task: upstream calls · events confirmed · ticket publishes · worker log lines",
            format!(
                "{:.2} · {} · {} · {:.1}",
                (run.creates + run.polls) as f64 / n as f64,
                fmt_opt(run.events_per_task, 2),
                fmt_opt(run.hops_per_task, 2),
                run.log_lines_per_task
            ),
        ),
        Row::info(
            "2",
            "  producer publish time · failed · duplicate terminal events · worker peak RSS",
            format!(
                "{:.1} s · {} · {} · {} MiB",
                run.publish.as_secs_f64(),
                run.failed,
                run.duplicates,
                fmt_opt(run.peak_rss, 1)
            ),
        ),
    ];
    if run.failed > 0 {
        rows.push(Row::info(
            "2",
            "  warning",
            format!("{} tasks failed", run.failed),
        ));
    }
    found.one_worker = Some(run);
    rows
}

async fn scenario_scaleout(cfg: &BenchConfig, found: &mut Findings) -> Vec<Row> {
    let n = cfg.count(INSTANT_TASKS, 200);
    let mut rows = Vec::new();
    let one = match found.one_worker.clone() {
        Some(run) if run.n == n => Some(run),
        _ => {
            progress!(cfg, "scale-out: 1 worker, {n} instant tasks");
            match instant_run(cfg, 1, n, None).await {
                Ok(run) => Some(run),
                Err(e) => {
                    rows.push(Row::failed("6", "Scale-out, 1 worker", &e));
                    None
                }
            }
        }
    };
    let base = one.as_ref().map(|r| r.rate);
    let mut runs: Vec<InstantRun> = one.into_iter().collect();
    for workers in SCALE_OUT {
        progress!(cfg, "scale-out: {workers} workers, {n} instant tasks");
        let result = median_of(cfg, |_| async move {
            let run = instant_run(cfg, workers, n, None).await?;
            progress!(
                cfg,
                "scale-out: {workers} workers: {:.0} tasks/s ({})",
                run.rate,
                run.cpu.describe("workers")
            );
            Ok(run)
        })
        .await;
        match result {
            Ok((run, _)) => runs.push(run),
            Err(e) => rows.push(Row::failed(
                "6",
                format!("Scale-out, {workers} workers"),
                &e,
            )),
        }
    }
    for run in &runs {
        let speedup = base.map_or_else(|| "n/a".into(), |b| format!("{:.2}×", run.rate / b));
        let (ratio, _) = ratio_cell(run.rate, found.ceiling);
        rows.push(Row::info(
            "6",
            format!(
                "Scale-out, {} worker process(es) ({n} requests)",
                run.workers
            ),
            format!(
                "**{:.0} tasks/s** · {speedup} of 1 worker · {ratio} of ceiling · {}",
                run.rate,
                run.cpu.describe("workers")
            ),
        ));
    }
    rows
}

/// A timed run: its rate and where the CPU went.
trait Measured {
    fn rate(&self) -> f64;
    fn cpu(&self) -> &CpuSplit;
}

impl Measured for InstantRun {
    fn rate(&self) -> f64 {
        self.rate
    }
    fn cpu(&self) -> &CpuSplit {
        &self.cpu
    }
}

/// Share of one core that other processes may take during a run before it
/// is repeated (the kernel's loopback work alone shows as up to ~25%).
const NOISY_RUN: f64 = 0.5;
/// Extra tries for a run that other processes disturbed.
const NOISY_RETRIES: usize = 2;

/// Runs `f` `BENCH_REPEAT` times: the run with the median rate (the upper
/// one for an even count), and every rate. A run during which other
/// processes took more than [`NOISY_RUN`] of a core is tried again (at
/// most [`NOISY_RETRIES`] times; the last try counts).
async fn median_of<T, F, Fut>(cfg: &BenchConfig, mut f: F) -> BenchResult<(T, Vec<f64>)>
where
    T: Measured,
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = BenchResult<T>>,
{
    let mut runs = Vec::with_capacity(cfg.repeat);
    let mut attempt = 0;
    for i in 0..cfg.repeat {
        let mut run = f(attempt).await?;
        attempt += 1;
        for _ in 0..NOISY_RETRIES {
            let noise = run.cpu().other_share();
            if noise <= NOISY_RUN {
                break;
            }
            progress!(
                cfg,
                "  run {} was disturbed (other processes took {:.0}% of a core); trying again",
                i + 1,
                noise * 100.0
            );
            run = f(attempt).await?;
            attempt += 1;
        }
        runs.push(run);
    }
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let rates = runs.iter().map(Measured::rate).collect();
    let median = runs.swap_remove(runs.len() / 2);
    Ok((median, rates))
}

/// ` (median of 3: 980–1210)` when a run was repeated.
fn spread(rates: &[f64]) -> String {
    match (rates.first(), rates.last()) {
        (Some(lo), Some(hi)) if rates.len() > 1 => {
            format!(" (median of {}: {lo:.0}–{hi:.0})", rates.len())
        }
        _ => String::new(),
    }
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

// ---------------------------------------------------------------------------
// 4. Polling efficiency
// ---------------------------------------------------------------------------

struct PollingRun {
    n: usize,
    polls_per_task: f64,
    max_polls: u64,
    arrival: Percentiles,
    completed: Percentiles,
}

#[derive(Clone, Copy)]
struct Percentiles {
    p50: f64,
    p95: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Self {
            p50: at(0.50),
            p95: at(0.95),
            max: v[v.len() - 1],
        })
    }

    fn describe(&self) -> String {
        format!(
            "p50 {:.2} s · p95 {:.2} s · max {:.2} s",
            self.p50, self.p95, self.max
        )
    }
}

async fn polling_run(cfg: &BenchConfig, n: usize, eta: EtaMode) -> BenchResult<PollingRun> {
    let sim = simulator(POLLING_GENERATION, eta).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "polling").await?;
    let sink = Sink::start(&dep, true).await?;
    let workers = start_workers(&dep, &sim, 1, &[]).await?;
    let before = sim.stats();
    dep.publish_requests(n, "poll", "a cat turns its head")
        .await?;
    let finished = sink
        .wait_for(n, POLLING_GENERATION + Duration::from_secs(600))
        .await;
    let after = sim.stats();
    stop_workers(workers).await;
    finished?;
    let (_, polls) = stats_delta(&before, &after);
    let kept = std::mem::take(&mut sink.lock().kept);
    let mut arrival = Vec::with_capacity(kept.len());
    let mut completed = Vec::with_capacity(kept.len());
    for a in &kept {
        let Ok(event) = serde_json::from_slice::<Value>(&a.body) else {
            continue;
        };
        let data = &event["data"];
        let Some(task) = data["task_id"].as_str().and_then(|id| sim.task(id)) else {
            continue;
        };
        let Some(done) = task.done_at.as_deref().and_then(parse_time) else {
            continue;
        };
        let at: DateTime<Utc> = a.at.into();
        arrival.push(seconds_between(done, at));
        if let Some(c) = data["completed_at"].as_str().and_then(parse_time) {
            completed.push(seconds_between(done, c));
        }
    }
    Ok(PollingRun {
        n,
        polls_per_task: polls as f64 / n as f64,
        max_polls: after.max_polls_per_task,
        arrival: Percentiles::of(arrival).ok_or("no terminal event matched a task")?,
        completed: Percentiles::of(completed).ok_or("no event carried completed_at")?,
    })
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

async fn scenario_polling(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(POLLING_TASKS, 50);
    let mut rows = Vec::new();
    for (eta, label) in [
        (EtaMode::Honest, "honest eta"),
        (EtaMode::Absent, "eta absent"),
    ] {
        progress!(cfg, "polling: {n} tasks of {POLLING_GENERATION:?}, {label}");
        match polling_run(cfg, n, eta).await {
            Ok(run) => {
                progress!(
                    cfg,
                    "polling ({label}): {:.2} polls per task, latency {}",
                    run.polls_per_task,
                    run.arrival.describe()
                );
                let targeted = eta == EtaMode::Honest;
                let polls_value = format!(
                    "{:.2} (max {} for one task)",
                    run.polls_per_task, run.max_polls
                );
                let latency_value = format!(
                    "{} (by `completed_at`: {})",
                    run.arrival.describe(),
                    run.completed.describe()
                );
                let title = format!("Polling, 20 s generations, {label} ({} tasks)", run.n);
                if targeted {
                    rows.push(Row::target(
                        "4",
                        format!("{title}: task-result calls per task"),
                        polls_value,
                        format!("≤ {TARGET_POLLS_PER_TASK}"),
                        run.polls_per_task <= TARGET_POLLS_PER_TASK,
                    ));
                    rows.push(Row::target(
                        "4",
                        "  detection latency (event arrival − simulator done_at)",
                        latency_value,
                        format!("p95 ≤ {TARGET_P95_LATENCY_S} s"),
                        run.arrival.p95 <= TARGET_P95_LATENCY_S,
                    ));
                } else {
                    rows.push(Row::info(
                        "4",
                        format!("{title}: task-result calls per task"),
                        polls_value,
                    ));
                    rows.push(Row::info(
                        "4",
                        "  detection latency (event arrival − simulator done_at)",
                        latency_value,
                    ));
                }
            }
            Err(e) => rows.push(Row::failed("4", format!("Polling, {label}"), &e)),
        }
    }
    rows
}

// ---------------------------------------------------------------------------
// 5. Upstream rate limit
// ---------------------------------------------------------------------------

async fn scenario_ratelimit(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(RATE_BURST, 200);
    let window = cfg.duration(RATE_WINDOW, Duration::from_secs(10));
    progress!(
        cfg,
        "rate limit: {n} requests, {RATE_CREATES} creates/s and {RATE_POLLS} polls/s, observed for {window:?}"
    );
    match ratelimit_run(cfg, n, window).await {
        Ok((stats, calls, elapsed)) => {
            let max = stats.max_calls_in_any_second;
            progress!(cfg, "rate limit: at most {max} calls in any second");
            vec![
                Row::target(
                    "5",
                    format!(
                        "Create quota {RATE_CREATES}/s and {RATE_POLLS} polls/s (burst of one second), burst of {n} requests: most calls the simulator saw in any 1 s window"
                    ),
                    format!("**{max}**"),
                    format!("≤ {RATE_LIMIT}"),
                    max as f64 <= RATE_LIMIT,
                ),
                Row::info(
                    "5",
                    "  calls (create + task-result) until the burst was done or the window closed · mean rate",
                    format!(
                        "{calls} in {:.1} s · {:.1}/s",
                        elapsed.as_secs_f64(),
                        calls as f64 / elapsed.as_secs_f64()
                    ),
                ),
            ]
        }
        Err(e) => vec![Row::failed("5", "Rate limit", &e)],
    }
}

async fn ratelimit_run(
    cfg: &BenchConfig,
    n: usize,
    window: Duration,
) -> BenchResult<(SimStats, u64, Duration)> {
    let sim = simulator(Duration::ZERO, EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "ratelimit").await?;
    let sink = Sink::start(&dep, false).await?;
    let limit = [
        (
            "VIDU_WORKER__UPSTREAM__MAX_REQUESTS_PER_SECOND",
            RATE_POLLS.to_string(),
        ),
        (
            "VIDU_WORKER__UPSTREAM__CREATE_QUOTA",
            format!("{RATE_CREATES}/s"),
        ),
    ];
    let workers = start_workers(&dep, &sim, 1, &limit).await?;
    let before = sim.stats();
    let t0 = Instant::now();
    dep.publish_requests(n, "rate", "a cat turns its head")
        .await?;
    // Observe for `window`, or until the whole burst is done if sooner.
    let _ = sink.wait_for(n, window.saturating_sub(t0.elapsed())).await;
    let after = sim.stats();
    let elapsed = t0.elapsed();
    stop_workers(workers).await;
    let (creates, polls) = stats_delta(&before, &after);
    Ok((after, creates + polls, elapsed))
}

// ---------------------------------------------------------------------------
// 3. Memory
// ---------------------------------------------------------------------------

struct MemoryRun {
    n: usize,
    idle: Option<f64>,
    hold_max: Option<f64>,
    peak: Option<f64>,
    window: f64,
    generation: Duration,
    failed: usize,
    /// Most requests and tickets the worker held at once (sampled).
    in_flight: (f64, f64),
}

async fn scenario_memory(cfg: &BenchConfig, found: &Findings) -> Vec<Row> {
    let hold = cfg.duration(MEMORY_HOLD, Duration::from_secs(5));
    // How fast a worker takes requests in, to size the generation time so
    // that every task is in PROCESSING together for `hold`.
    let intake = found
        .one_worker
        .as_ref()
        .map_or(300.0, |r| r.rate)
        .max(50.0);
    let mut rows = Vec::new();
    let mut peaks = Vec::new();
    for full in MEMORY_TASKS {
        let n = cfg.count(full, 20);
        let expected_span = n as f64 / intake;
        // PROCESSING starts at 10% of the generation time.
        let generation =
            Duration::from_secs_f64(((hold.as_secs_f64() + expected_span) / 0.9) * 1.15 + 2.0);
        progress!(
            cfg,
            "memory: {n} tasks, generation {:.0} s, hold {hold:?}",
            generation.as_secs_f64()
        );
        match memory_run(cfg, n, generation).await {
            Ok(run) => {
                progress!(
                    cfg,
                    "memory: {n} tasks: peak RSS {} MiB, all in PROCESSING for {:.0} s",
                    fmt_opt(run.peak, 1),
                    run.window
                );
                peaks.push(run.peak);
                rows.push(Row::target(
                    "3",
                    format!(
                        "Peak RSS of 1 worker, {} tasks in PROCESSING together for {:.0} s (generation {:.0} s), then completed",
                        run.n,
                        run.window,
                        run.generation.as_secs_f64()
                    ),
                    format!(
                        "**{} MiB** (idle {} MiB; max sampled while holding {} MiB; most held at once: {:.0} requests, {:.0} tickets; {} failed)",
                        fmt_opt(run.peak, 1),
                        fmt_opt(run.idle, 1),
                        fmt_opt(run.hold_max, 1),
                        run.in_flight.0,
                        run.in_flight.1,
                        run.failed
                    ),
                    format!("≤ {TARGET_RSS_MIB} MiB, ≥ {:.0} s held", hold.as_secs_f64()),
                    run.peak.is_some_and(|p| p <= TARGET_RSS_MIB) && run.window >= hold.as_secs_f64(),
                ));
            }
            Err(e) => rows.push(Row::failed("3", format!("Memory, {n} tasks"), &e)),
        }
    }
    if let [Some(small), Some(large)] = peaks[..] {
        let growth = large - small;
        rows.push(Row::target(
            "3",
            "  growth of peak RSS from the small to the large run",
            format!("{growth:+.1} MiB ({:+.0}%)", growth / small * 100.0),
            "flat (within 10%)",
            growth <= small * 0.10,
        ));
    }
    rows
}

async fn memory_run(cfg: &BenchConfig, n: usize, generation: Duration) -> BenchResult<MemoryRun> {
    let sim = simulator(generation, EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "memory").await?;
    let sink = Sink::start(&dep, false).await?;
    let workers = start_workers(&dep, &sim, 1, &[]).await?;
    let worker = &workers[0];
    let idle = worker.rss_mib();
    dep.publish_requests(n, "mem", "a cat turns its head")
        .await?;
    // Follow creation: the PROCESSING window is from the last create plus
    // 10% of the generation time until the first task is done.
    let mut first_create: Option<Instant> = None;
    let create_deadline = Instant::now() + Duration::from_secs(900);
    let last_create = loop {
        let created = sim.stats().tasks_created as usize;
        if Instant::now() >= create_deadline {
            return Err(format!("only {created} of {n} tasks were created in 900 s").into());
        }
        if created > 0 && first_create.is_none() {
            first_create = Some(Instant::now());
        }
        if created >= n {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first_create = first_create.unwrap_or(last_create);
    let window = generation.as_secs_f64() * 0.9 - (last_create - first_create).as_secs_f64();
    progress!(
        cfg,
        "  {n} tasks created in {:.1} s; waiting for them to finish",
        (last_create - first_create).as_secs_f64()
    );
    let first_done = first_create + generation;
    let mut hold_max: Option<f64> = None;
    let mut in_flight = (0.0f64, 0.0f64);
    let sample_in_flight = async |in_flight: &mut (f64, f64)| {
        let requests = worker.metric("vidu_worker_in_flight_requests").await;
        let tickets = worker.metric("vidu_worker_in_flight_tickets").await;
        in_flight.0 = in_flight.0.max(requests.unwrap_or(0.0));
        in_flight.1 = in_flight.1.max(tickets.unwrap_or(0.0));
    };
    while Instant::now() < first_done {
        if let Some(rss) = worker.rss_mib() {
            hold_max = Some(hold_max.map_or(rss, |m: f64| m.max(rss)));
        }
        sample_in_flight(&mut in_flight).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wait = sink.wait_for(n, Duration::from_secs(900));
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let finished = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = tick.tick() => sample_in_flight(&mut in_flight).await,
        }
    };
    let peak = worker.peak_rss_mib();
    stop_workers(workers).await;
    finished?;
    let failed = sink.lock().failed;
    Ok(MemoryRun {
        n,
        idle,
        hold_max,
        peak,
        window,
        generation,
        failed,
        in_flight,
    })
}

// ---------------------------------------------------------------------------
// 7. A shared account quota
// ---------------------------------------------------------------------------

/// The simulated account quota of the quota runs: creates per window (per
/// minute, as Novita counts).
const QUOTA_CREATES: u32 = 40;
const QUOTA_WINDOW: Duration = Duration::from_secs(60);
/// Requests per quota run (three windows' worth).
const QUOTA_TASKS: usize = 120;
/// Targets: a learned quota behaves like a configured one.
const TARGET_429_PER_REQUEST: f64 = 0.3;
const TARGET_MAKESPAN_RATIO: f64 = 1.15;

struct QuotaRun {
    refused: u64,
    creates: u64,
    busiest_window: usize,
    makespan: Duration,
    limit: Duration,
}

/// Most accepted creates whose arrivals fell within any `window`.
fn busiest_window(calls: &[vidu_worker::simulator::CallRecord], window: Duration) -> usize {
    // The log is in the order calls were answered; windows count arrivals.
    let mut times: Vec<u64> = calls
        .iter()
        .filter(|c| c.endpoint == "create" && c.outcome == "200")
        .map(|c| c.at_ms)
        .collect();
    times.sort_unstable();
    let width = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= width {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

async fn quota_run(
    cfg: &BenchConfig,
    n: usize,
    workers: usize,
    configured: bool,
    retry_after: bool,
) -> BenchResult<QuotaRun> {
    let sim = Simulator::start(SimulatorConfig {
        api_key: Some(API_KEY.into()),
        generation_time: Duration::from_secs(1),
        quota: Some(vidu_worker::simulator::AccountQuota {
            creates: QUOTA_CREATES,
            window: QUOTA_WINDOW,
            // Novita does not document a Retry-After: both cases.
            retry_after,
        }),
        ..SimulatorConfig::default()
    })
    .await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "quota").await?;
    let sink = Sink::start(&dep, false).await?;
    let mut env = vec![(
        "VIDU_WORKER__UPSTREAM__CREATE_RETRY_BUDGET",
        "5m".to_owned(),
    )];
    if configured {
        env.push((
            "VIDU_WORKER__UPSTREAM__CREATE_QUOTA",
            format!("{QUOTA_CREATES}/{}s", QUOTA_WINDOW.as_secs()),
        ));
    }
    let started_workers = start_workers(&dep, &sim, workers, &env).await?;
    let t0 = Instant::now();
    dep.publish_requests(n, "quota", "a cat turns its head")
        .await?;
    let finished = sink.wait_for(n, Duration::from_secs(900)).await;
    stop_workers(started_workers).await;
    let last = finished?;
    let stats = sim.stats();
    let windows = u32::try_from(n)
        .unwrap_or(u32::MAX)
        .div_ceil(QUOTA_CREATES)
        .saturating_sub(1);
    Ok(QuotaRun {
        refused: stats.answered("create:429"),
        creates: stats.create_calls,
        busiest_window: busiest_window(&sim.calls(), QUOTA_WINDOW),
        makespan: last.saturating_duration_since(t0),
        limit: QUOTA_WINDOW * windows,
    })
}

async fn scenario_quota(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(
        QUOTA_TASKS,
        usize::try_from(QUOTA_CREATES * 2).unwrap_or(60),
    );
    let mut rows = Vec::new();
    // (configured, Retry-After on the 429s)
    for (configured, retry_after) in [(true, false), (false, false), (false, true)] {
        let mode = match (configured, retry_after) {
            (true, _) => "upstream.create_quota set",
            (false, false) => "learned from 429s without Retry-After",
            (false, true) => "learned from 429s with Retry-After",
        };
        for workers in 1..=3 {
            progress!(
                cfg,
                "quota: {n} requests, {workers} worker(s), {QUOTA_CREATES} creates per {QUOTA_WINDOW:?}, {mode}"
            );
            let title = format!(
                "Account quota {QUOTA_CREATES} creates per {} s, {n} requests, {workers} worker(s), {mode}",
                QUOTA_WINDOW.as_secs()
            );
            match quota_run(cfg, n, workers, configured, retry_after).await {
                Ok(run) => {
                    let per_request = run.refused as f64 / n as f64;
                    let ratio = run.makespan.as_secs_f64() / run.limit.as_secs_f64();
                    progress!(
                        cfg,
                        "quota: {per_request:.2} 429s per request, busiest window {} creates, makespan {:.1} s ({ratio:.2}x the limit)",
                        run.busiest_window,
                        run.makespan.as_secs_f64()
                    );
                    rows.push(Row::target(
                        "7",
                        format!("{title}: 429s per request"),
                        format!(
                            "{per_request:.2} ({} of {} create calls)",
                            run.refused, run.creates
                        ),
                        format!("≤ {TARGET_429_PER_REQUEST}"),
                        per_request <= TARGET_429_PER_REQUEST,
                    ));
                    rows.push(Row::target(
                        "7",
                        "  accepted creates in the busiest window",
                        run.busiest_window.to_string(),
                        format!("≤ {QUOTA_CREATES}"),
                        run.busiest_window <= QUOTA_CREATES as usize,
                    ));
                    rows.push(Row::target(
                        "7",
                        "  makespan against the quota's limit (when it admits the last create)",
                        format!(
                            "{:.1} s / {:.0} s = {ratio:.2}x",
                            run.makespan.as_secs_f64(),
                            run.limit.as_secs_f64()
                        ),
                        format!("≤ {TARGET_MAKESPAN_RATIO}x"),
                        ratio <= TARGET_MAKESPAN_RATIO,
                    ));
                }
                Err(e) => rows.push(Row::failed("7", title, &e)),
            }
        }
    }
    rows
}

// ---------------------------------------------------------------------------
// 7b. A noisy upstream, and a quota that moves
// ---------------------------------------------------------------------------

/// Requests of the noisy runs.
const NOISY_TASKS: usize = 300;
/// Targets: the noisy run within this factor of the perfect run plus the
/// retries' own delays, and at most this many create calls per request.
const TARGET_NOISY_RATIO: f64 = 1.5;
const TARGET_NOISY_CALLS: f64 = 1.3;

/// Both endpoints: 30 % 5xx, 10 % 429 with `Retry-After: 1`, 5 % hangs of
/// 120 s, 5 % unreadable answers.
fn noisy_faults() -> vidu_worker::simulator::EndpointFaults {
    vidu_worker::simulator::EndpointFaults::noisy(Duration::from_secs(120), 11)
}

struct NoisyRun {
    makespan: Duration,
    succeeded: usize,
    unconfirmed: usize,
    create_calls: u64,
    refused: u64,
    /// The longest time one request spent waiting on retries: from its
    /// first create to the accepted one, plus the gaps after its failed
    /// polls.
    worst_retry: Duration,
    learned: f64,
}

async fn noisy_run(cfg: &BenchConfig, n: usize, noisy: bool) -> BenchResult<NoisyRun> {
    let sim = simulator(Duration::from_secs(3), EtaMode::Honest).await?;
    if noisy {
        sim.set_faults(vidu_worker::simulator::FaultPlan {
            create: noisy_faults(),
            poll: noisy_faults(),
        });
    }
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "noisy").await?;
    let sink = Sink::start(&dep, false).await?;
    let workers = start_workers(&dep, &sim, 1, &[]).await?;
    let t0 = Instant::now();
    dep.publish_requests(n, "noisy", "a cat turns its head")
        .await?;
    let finished = sink.wait_for(n, Duration::from_secs(1800)).await;
    let learned = workers[0]
        .metric("vidu_worker_create_quota_learned")
        .await
        .unwrap_or(0.0);
    stop_workers(workers).await;
    let last = finished?;
    let failed = sink.lock().failed;
    let succeeded = n.saturating_sub(failed);
    let stats = sim.stats();
    Ok(NoisyRun {
        makespan: last.saturating_duration_since(t0),
        succeeded,
        unconfirmed: n - succeeded,
        create_calls: stats.create_calls,
        refused: stats.answered("create:429"),
        worst_retry: worst_retry(&sim.calls()),
        learned,
    })
}

/// The longest a request waited on retries, from the simulator's log.
fn worst_retry(calls: &[vidu_worker::simulator::CallRecord]) -> Duration {
    use std::collections::HashMap;
    // Per request (the last word of its prompt): first create, accepted
    // create, and its task.
    let mut creates: HashMap<String, (u64, Option<u64>, Option<String>)> = HashMap::new();
    for c in calls.iter().filter(|c| c.endpoint == "create") {
        let Some(id) = c.prompt.as_deref().and_then(|p| p.rsplit(' ').next()) else {
            continue;
        };
        let e = creates
            .entry(id.to_owned())
            .or_insert((c.at_ms, None, None));
        if c.outcome == "200" {
            e.1 = Some(c.at_ms);
            e.2.clone_from(&c.task_id);
        }
    }
    // Per task: the gaps after failed polls.
    let mut polls: HashMap<&str, Vec<(u64, bool)>> = HashMap::new();
    for c in calls.iter().filter(|c| c.endpoint == "poll") {
        if let Some(task) = c.task_id.as_deref() {
            polls
                .entry(task)
                .or_default()
                .push((c.at_ms, c.outcome == "200"));
        }
    }
    let poll_gaps = |task: &str| -> u64 {
        polls.get(task).map_or(0, |ps| {
            ps.windows(2)
                .filter(|w| !w[0].1)
                .map(|w| w[1].0.saturating_sub(w[0].0))
                .sum()
        })
    };
    let worst = creates
        .values()
        .map(|(first, accepted, task)| {
            accepted.map_or(0, |a| a.saturating_sub(*first)) + task.as_deref().map_or(0, poll_gaps)
        })
        .max()
        .unwrap_or(0);
    Duration::from_millis(worst)
}

async fn scenario_noisy(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(NOISY_TASKS, 60);
    let title = format!(
        "{n} requests, one worker, both endpoints 30 % 5xx, 10 % 429 (Retry-After 1), 5 % hangs of 120 s, 5 % unreadable"
    );
    progress!(
        cfg,
        "noisy: the same {n} requests with a perfect upstream first"
    );
    let perfect = match noisy_run(cfg, n, false).await {
        Ok(run) => run,
        Err(e) => return vec![Row::failed("7b", title, &e)],
    };
    progress!(
        cfg,
        "noisy: perfect upstream {:.1} s; now the noisy one",
        perfect.makespan.as_secs_f64()
    );
    let run = match noisy_run(cfg, n, true).await {
        Ok(run) => run,
        Err(e) => return vec![Row::failed("7b", title, &e)],
    };
    let allowance = perfect.makespan + run.worst_retry;
    let ratio = run.makespan.as_secs_f64() / allowance.as_secs_f64();
    let calls = run.create_calls as f64 / n as f64;
    progress!(
        cfg,
        "noisy: {} succeeded, {} unconfirmed, {:.1} s ({ratio:.2}x the perfect run plus the worst request's retries), {calls:.2} create calls per request, learned quota {}",
        run.succeeded,
        run.unconfirmed,
        run.makespan.as_secs_f64(),
        run.learned
    );
    // The floor of create calls when 45 % of calls fail in a way worth
    // retrying: 1 / (1 - 0.45).
    let floor = 1.0 / (1.0 - 0.45);
    vec![
        Row::target(
            "7b",
            format!("{title}: ended (succeeded, or upstream_unconfirmed for an unreadable create answer)"),
            format!("{} succeeded, {} upstream_unconfirmed", run.succeeded, run.unconfirmed),
            format!("{n}"),
            run.succeeded + run.unconfirmed == n,
        ),
        Row::target(
            "7b",
            "  makespan against the perfect run plus the worst request's retry delays",
            format!(
                "{:.1} s / ({:.1} s + {:.1} s) = {ratio:.2}x",
                run.makespan.as_secs_f64(),
                perfect.makespan.as_secs_f64(),
                run.worst_retry.as_secs_f64()
            ),
            format!("≤ {TARGET_NOISY_RATIO}x"),
            ratio <= TARGET_NOISY_RATIO,
        ),
        Row::target(
            "7b",
            "  create calls per request",
            format!("{calls:.2} ({} 429s; floor with 45 % retryable failures: {floor:.2})", run.refused),
            format!("≤ {TARGET_NOISY_CALLS}"),
            calls <= TARGET_NOISY_CALLS,
        ),
        Row::info(
            "7b",
            "  quota learned (0: none; noise is not a quota)",
            format!("{}", run.learned),
        ),
    ]
}

/// The moving quota: creates per minute in each phase.
const MOVING_QUOTA: [u32; 3] = [40, 10, 40];
/// How long each phase lasts.
const MOVING_PHASE: Duration = Duration::from_secs(180);
const TARGET_MOVING_429_PER_REQUEST: f64 = 0.5;
const TARGET_FOLLOW_WINDOWS: f64 = 2.0;

/// Request ids the fleet remembers in the dedup scenario.
const DEDUP_IDS: usize = 100_000;
/// The ticket secret of the dedup scenario's deployment (the bench signs
/// the created records it writes with it, as a worker would).
const DEDUP_SECRET: &str = "a bench secret of some length";

struct DedupRun {
    ids: usize,
    write_secs: f64,
    broker_rss_delta: Option<f64>,
    catch_up_empty: f64,
    catch_up_full: f64,
    rss_empty: Option<f64>,
    rss_full: Option<f64>,
    copies: usize,
    creates_for_copies: u64,
}

/// What remembering created request ids costs: a deployment's journal
/// holding `DEDUP_IDS` created records (written by the bench, signed like
/// a worker's), a worker that joins then (time until ready, which is when
/// it has read them all; its RSS against a worker on an empty journal),
/// and the broker's memory; then copies of some of them, which must cost
/// no create.
async fn scenario_dedup(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(DEDUP_IDS, 1000);
    progress!(cfg, "dedup: {n} created request ids in the journal");
    match dedup_run(cfg, n).await {
        Ok(run) => {
            let per_id = match (run.rss_empty, run.rss_full) {
                (Some(a), Some(b)) => format!(
                    "{:.0} bytes per id ({:.1} → {:.1} MiB)",
                    (b - a) * 1024.0 * 1024.0 / run.ids as f64,
                    a,
                    b
                ),
                _ => "n/a".into(),
            };
            vec![
                Row::info(
                    "10",
                    format!(
                        "{} created records written to the journal (confirmed)",
                        run.ids
                    ),
                    format!(
                        "{:.1} s ({:.0} records/s); broker RSS {}",
                        run.write_secs,
                        run.ids as f64 / run.write_secs,
                        run.broker_rss_delta
                            .map_or("n/a".into(), |d| format!("{d:+.1} MiB"))
                    ),
                ),
                Row::target(
                    "10",
                    format!(
                        "A worker joining after {} creates: start to ready (all read)",
                        run.ids
                    ),
                    format!(
                        "**{:.1} s** (on an empty journal: {:.1} s)",
                        run.catch_up_full, run.catch_up_empty
                    ),
                    format!("≤ {TARGET_DEDUP_CATCH_UP_SECS} s"),
                    run.catch_up_full <= TARGET_DEDUP_CATCH_UP_SECS,
                ),
                Row::info("10", "  its memory for the remembered ids", per_id),
                Row::target(
                    "10",
                    format!(
                        "  copies of {} of those requests published then: creates",
                        run.copies
                    ),
                    run.creates_for_copies.to_string(),
                    "0",
                    run.creates_for_copies == 0,
                ),
            ]
        }
        Err(e) => vec![Row::failed("10", "Remembering created request ids", &e)],
    }
}

/// Longest acceptable catch-up of a worker joining after `DEDUP_IDS`.
const TARGET_DEDUP_CATCH_UP_SECS: f64 = 10.0;

async fn dedup_run(cfg: &BenchConfig, n: usize) -> BenchResult<DedupRun> {
    use vidu_worker::{
        journal::{Created, CREATED_RECORD},
        request::RequestId,
        signing::Signer,
    };
    let sim = simulator(Duration::from_millis(200), EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "dedup").await?;
    let secret = [("VIDU_WORKER__TICKETS__SECRET", DEDUP_SECRET.to_owned())];
    // A worker on an empty journal: its start and memory.
    let started = Instant::now();
    let empty = Worker::spawn(&dep, &sim, &secret).await?;
    let catch_up_empty = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_empty = empty.rss_mib();
    empty.stop().await;

    let signer = Signer::new(
        &secrecy::SecretString::from(DEDUP_SECRET),
        &[],
        &dep.settings.amqp.request_queue,
        true,
    );
    let broker = broker_pid();
    let broker_before = broker.and_then(|p| proc_status_mib(p, "VmRSS"));
    let started = Instant::now();
    let now = Utc::now();
    let records = (0..n).map(|i| {
        let record = Created {
            v: 1,
            request_id: Some(RequestId::parse(&format!("past-{i}"))?),
            task_id: uuid::Uuid::new_v4().to_string(),
            model: "vidu-q3-pro-i2v".into(),
            at: now - chrono::Duration::milliseconds((n - i) as i64),
        };
        let body = serde_json::to_vec(&record)?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(CREATED_RECORD.into())
            .with_headers(signer.sign(&body).headers());
        Ok((body, props))
    });
    dep.publish_pipelined(&dep.topology.journal_queue, records)
        .await?;
    let write_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker_after = broker.and_then(|p| proc_status_mib(p, "VmRSS"));
    progress!(cfg, "dedup: {n} records written in {write_secs:.1} s");

    let started = Instant::now();
    let full = Worker::spawn(&dep, &sim, &secret).await?;
    let catch_up_full = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_full = full.rss_mib();
    progress!(cfg, "dedup: a worker joined in {catch_up_full:.1} s");

    // Copies of some of them: acknowledged, never created.
    let before = sim.stats();
    let copies = 200.min(n);
    let step = (n / copies).max(1);
    let mut published = 0;
    for i in (0..n).step_by(step).take(copies) {
        let body = serde_json::json!({
            "request_id": format!("past-{i}"),
            "input": {"images": ["https://example.com/cat.png"], "prompt": "again", "duration": 5}
        });
        dep.producer
            .basic_publish(
                ShortString::from(""),
                dep.topology.request_queue.as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body)?,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        published += 1;
    }
    full.wait_for(
        Duration::from_secs(60),
        "did not take every copy",
        || async {
            let dups = full.metric("vidu_worker_requests_received_total").await?;
            (dups >= published as f64).then_some(())
        },
    )
    .await?;
    let creates_for_copies = sim.stats().tasks_created - before.tasks_created;
    full.stop().await;
    Ok(DedupRun {
        ids: n,
        write_secs,
        broker_rss_delta: broker_before.zip(broker_after).map(|(a, b)| b - a),
        catch_up_empty,
        catch_up_full,
        rss_empty,
        rss_full,
        copies: published,
        creates_for_copies,
    })
}

async fn scenario_quota_change(cfg: &BenchConfig) -> Vec<Row> {
    let phase = cfg.duration(MOVING_PHASE, Duration::from_secs(90));
    let title = format!(
        "A quota that moves: {} creates a minute, then {}, then {}, {} s each, one worker, learned",
        MOVING_QUOTA[0],
        MOVING_QUOTA[1],
        MOVING_QUOTA[2],
        phase.as_secs()
    );
    progress!(cfg, "quota change: {title}");
    match quota_change_run(cfg, phase).await {
        Ok((n, refused, follow)) => {
            let per_request = refused as f64 / n as f64;
            let mut rows = vec![Row::target(
                "7c",
                format!("{title}: 429s per request"),
                format!("{per_request:.2} ({refused} for {n} requests)"),
                format!("≤ {TARGET_MOVING_429_PER_REQUEST}"),
                per_request <= TARGET_MOVING_429_PER_REQUEST,
            )];
            for (quota, windows) in follow {
                rows.push(match windows {
                    Some(w) => Row::target(
                        "7c",
                        format!(
                            "  windows until the learned quota followed the change to {quota}/min"
                        ),
                        format!("{w:.1}"),
                        format!("≤ {TARGET_FOLLOW_WINDOWS}"),
                        w <= TARGET_FOLLOW_WINDOWS,
                    ),
                    None => Row::target(
                        "7c",
                        format!(
                            "  windows until the learned quota followed the change to {quota}/min"
                        ),
                        "not within the phase",
                        format!("≤ {TARGET_FOLLOW_WINDOWS}"),
                        false,
                    ),
                });
            }
            rows
        }
        Err(e) => vec![Row::failed("7c", title, &e)],
    }
}

/// Returns the requests made, the 429s, and for each change how many
/// windows the learned quota took to come within one create of it.
async fn quota_change_run(
    cfg: &BenchConfig,
    phase: Duration,
) -> BenchResult<(usize, u64, Vec<(u32, Option<f64>)>)> {
    use vidu_worker::simulator::AccountQuota;
    let quota = |creates| AccountQuota {
        creates,
        window: QUOTA_WINDOW,
        retry_after: false,
    };
    let sim = Simulator::start(SimulatorConfig {
        api_key: Some(API_KEY.into()),
        generation_time: Duration::from_secs(1),
        quota: Some(quota(MOVING_QUOTA[0])),
        ..SimulatorConfig::default()
    })
    .await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "quotachange").await?;
    let sink = Sink::start(&dep, false).await?;
    let workers = start_workers(
        &dep,
        &sim,
        1,
        &[(
            "VIDU_WORKER__UPSTREAM__CREATE_RETRY_BUDGET",
            "10m".to_owned(),
        )],
    )
    .await?;
    // A backlog the whole run cannot drain.
    let minutes = phase.as_secs_f64() / 60.0;
    let n = MOVING_QUOTA
        .iter()
        .map(|q| (f64::from(*q) * minutes).ceil() as usize)
        .sum::<usize>()
        + 40;
    dep.publish_requests(n, "move", "a cat turns its head")
        .await?;
    let mut follow = Vec::new();
    for (i, creates) in MOVING_QUOTA.iter().enumerate() {
        if i > 0 {
            sim.set_quota(Some(quota(*creates)));
        }
        let changed = Instant::now();
        let mut followed = None;
        while changed.elapsed() < phase {
            let learned = workers[0]
                .metric("vidu_worker_create_quota_learned")
                .await
                .unwrap_or(0.0);
            if followed.is_none() && (learned - f64::from(*creates)).abs() <= 1.0 {
                followed = Some(changed.elapsed().as_secs_f64() / QUOTA_WINDOW.as_secs_f64());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        progress!(
            cfg,
            "quota change: {creates}/min followed after {followed:?} windows"
        );
        follow.push((*creates, followed));
    }
    let done = sink.seen();
    stop_workers(workers).await;
    let stats = sim.stats();
    Ok((done.max(1), stats.answered("create:429"), follow))
}

// ---------------------------------------------------------------------------
// 8. Latency with default settings
// ---------------------------------------------------------------------------

/// One-second tasks of the latency run.
const LATENCY_TASKS: usize = 200;
const TARGET_LATENCY_P95_S: f64 = 5.0;

async fn scenario_latency(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(LATENCY_TASKS, 50);
    progress!(
        cfg,
        "latency: {n} one-second tasks, one worker, default settings"
    );
    let title =
        format!("{n} one-second tasks, one worker, default settings: publish to `succeeded`");
    match latency_run(cfg, n).await {
        Ok((latency, polls)) => {
            progress!(cfg, "latency: {}", latency.describe());
            vec![
                Row::target(
                    "8",
                    title,
                    latency.describe(),
                    format!("p95 ≤ {TARGET_LATENCY_P95_S} s"),
                    latency.p95 <= TARGET_LATENCY_P95_S,
                ),
                Row::info("8", "  task-result calls per task", format!("{polls:.2}")),
            ]
        }
        Err(e) => vec![Row::failed("8", title, &e)],
    }
}

async fn latency_run(cfg: &BenchConfig, n: usize) -> BenchResult<(Percentiles, f64)> {
    let sim = simulator(Duration::from_secs(1), EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "latency").await?;
    let sink = Sink::start(&dep, true).await?;
    // The worker's own default poll budget (the bench lifts it elsewhere).
    let defaults = [(
        "VIDU_WORKER__UPSTREAM__MAX_REQUESTS_PER_SECOND",
        Settings::default()
            .upstream
            .max_requests_per_second
            .to_string(),
    )];
    let workers = start_workers(&dep, &sim, 1, &defaults).await?;
    let published = SystemTime::now();
    dep.publish_requests(n, "latency", "a cat turns its head")
        .await?;
    let finished = sink.wait_for(n, Duration::from_secs(300)).await;
    let stats = sim.stats();
    stop_workers(workers).await;
    finished?;
    let kept = std::mem::take(&mut sink.lock().kept);
    let latencies: Vec<f64> = kept
        .iter()
        .filter_map(|a| a.at.duration_since(published).ok())
        .map(|d| d.as_secs_f64())
        .collect();
    let latency = Percentiles::of(latencies).ok_or("no terminal event")?;
    Ok((latency, stats.poll_calls as f64 / n as f64))
}

// ---------------------------------------------------------------------------
// 9. A three-node cluster
// ---------------------------------------------------------------------------

/// Requests of each instant run in the cluster scenario.
const CLUSTER_TASKS: usize = 3_000;
/// Nodes of the cluster, and replicas of each quorum queue on it.
const CLUSTER_NODES: usize = 3;
/// Worker counts of the cluster's instant runs.
const CLUSTER_WORKERS: [usize; 2] = [1, 2];
/// The node-loss run: a steady stream of requests at this rate, for tasks of
/// this generation time, with the node killed once this share of the stream
/// is published.
const LOSS_TASKS: usize = 750;
const LOSS_RATE: f64 = 25.0;
const LOSS_GENERATION: Duration = Duration::from_secs(2);
const LOSS_KILL_AT: f64 = 1.0 / 3.0;
/// How often the stream publishes its next batch.
const LOSS_TICK: Duration = Duration::from_millis(200);

/// A private RabbitMQ node: the machine's `rabbitmq-server` on free ports,
/// with a directory of its own. Stopped (killed if it does not answer) and
/// its directory removed on drop, also when a later step fails.
struct BrokerNode {
    name: String,
    port: u16,
    dir: PathBuf,
}

impl BrokerNode {
    /// Launches a node without waiting for it.
    async fn launch() -> BenchResult<Self> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let port = local_broker::free_port()?;
        let dir = env::temp_dir().join(format!("vidu-bench-broker-{}", &unique[..8]));
        local_broker::create_node_dir(&dir)?;
        // From here on, drop cleans up.
        let node = Self {
            name: format!("vidubench{}@localhost", &unique[..8]),
            port,
            dir,
        };
        // The broker runs as its own user, in a directory of its own.
        local_broker::write_node_file(
            &node.dir.join("rabbitmq.conf"),
            &local_broker::node_config(port),
        )?;
        let tools = local_broker::Installation::find().ok_or("rabbitmq-server is not installed")?;
        local_broker::hand_over_node_dir(&node.dir, local_broker::NodeUser::of(&tools)?)?;
        let status = node
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .await
            .map_err(|e| format!("cannot run rabbitmq-server: {e}"))?;
        if !status.success() {
            return Err(format!("rabbitmq-server -detached failed for {}", node.name).into());
        }
        Ok(node)
    }

    /// Starts `n` nodes and joins them into one cluster (nodes 2..n join
    /// the first).
    async fn start_cluster(n: usize) -> BenchResult<Vec<Self>> {
        let mut nodes = Vec::with_capacity(n);
        // Launch all, then wait for all: the Erlang nodes boot in parallel.
        for _ in 0..n {
            nodes.push(Self::launch().await?);
        }
        for node in &nodes {
            node.await_startup().await?;
        }
        let first = nodes[0].name.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["join_cluster", &first]).await?;
            node.ctl(&["start_app"]).await?;
            node.await_startup().await?;
        }
        let status = nodes[0]
            .ctl(&["cluster_status", "--formatter", "json"])
            .await?;
        let running = serde_json::from_str::<Value>(&status)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if running != n {
            return Err(format!("{running} of {n} cluster nodes running: {status}").into());
        }
        Ok(nodes)
    }

    fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        local_broker::node_env(&self.name, self.port, &self.dir)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `rabbitmqctl -n NODE ARGS` and returns its output.
    async fn ctl(&self, args: &[&str]) -> BenchResult<String> {
        let what = args.first().copied().unwrap_or_default();
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            self.command("rabbitmqctl")
                .arg("-n")
                .arg(&self.name)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output(),
        )
        .await
        .map_err(|_| format!("rabbitmqctl {what} on {} timed out", self.name))?
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rabbitmqctl {what} on {} failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits (up to about two minutes) until the node runs its
    /// applications.
    async fn await_startup(&self) -> BenchResult<()> {
        for _ in 0..60 {
            if self.ctl(&["await_startup", "--timeout", "5"]).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(format!("broker node {} did not start", self.name).into())
    }

    /// The node's Erlang VM, from its pid file, if it is running and is
    /// this node's (a stale pid file may name another process by now).
    fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let ours = format!("RABBITMQ_NODENAME={}", self.name).into_bytes();
        (comm.trim() == "beam.smp" && environ.split(|b| *b == 0).any(|v| v == ours.as_slice()))
            .then_some(pid)
    }

    /// Stops the node hard, as a crashed machine would (SIGKILL to the
    /// Erlang VM): no clean shutdown, no goodbye to its cluster. Returns
    /// once its port is closed.
    async fn kill(&self) -> BenchResult<()> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("no running VM for {}", self.name))?;
        signal(pid, "KILL");
        for _ in 0..100 {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("{} still answers after SIGKILL", self.name).into())
    }

    /// Starts a killed node again (it rejoins its cluster) and waits for
    /// it.
    async fn restart(&self) -> BenchResult<()> {
        let status = self
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .await
            .map_err(|e| format!("cannot run rabbitmq-server: {e}"))?;
        if !status.success() {
            return Err(format!("rabbitmq-server -detached failed for {}", self.name).into());
        }
        self.await_startup().await
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        let stopped = std::process::Command::new("rabbitmqctl")
            .envs(self.env())
            .arg("-n")
            .arg(&self.name)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            // Not answering: make sure no VM of this node is left running.
            if let Some(pid) = self.pid() {
                signal(pid, "KILL");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A target on private nodes: the bench through the first, the workers
/// given every node's URL.
fn private_target(nodes: &[BrokerNode], group_size: Option<u16>) -> Target {
    Target {
        bench_url: nodes.first().map(BrokerNode::url).unwrap_or_default(),
        worker_url: nodes
            .iter()
            .map(BrokerNode::url)
            .collect::<Vec<_>>()
            .join(","),
        group_size,
        broker_pids: Some(nodes.iter().filter_map(BrokerNode::pid).collect()),
    }
}

/// `node 1` for a worker's broker port, by its index in `nodes`.
fn node_names(nodes: &[BrokerNode], ports: &[Option<u16>]) -> String {
    ports
        .iter()
        .map(|p| {
            p.and_then(|p| nodes.iter().position(|n| n.port == p))
                .map_or_else(|| "?".into(), |i| i.to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The leader node (`vidubench…@localhost`) of each listed quorum queue
/// that the node knows.
async fn leaders(node: &BrokerNode, queues: &[String]) -> BenchResult<Vec<String>> {
    let out = node
        .ctl(&["list_queues", "name", "leader", "--formatter", "json"])
        .await?;
    let rows: Vec<Value> =
        serde_json::from_str(&out).map_err(|e| format!("list_queues output: {e}"))?;
    Ok(rows
        .iter()
        .filter(|r| {
            r["name"]
                .as_str()
                .is_some_and(|n| queues.iter().any(|q| q == n))
        })
        .filter_map(|r| r["leader"].as_str().map(str::to_owned))
        .collect())
}

struct LossRun {
    n: usize,
    /// Nodes (indices) of the two workers, and the one killed.
    worker_nodes: [usize; 2],
    killed: usize,
    /// Distinct terminal events when the node was killed.
    finished_at_kill: usize,
    first_event_after: Option<Duration>,
    moved_ready_after: Duration,
    moved_to: usize,
    /// Requests with a terminal event, and when the last arrived (from the
    /// first publish).
    finished: usize,
    last_event: Option<Duration>,
    stream: Duration,
    creates: u64,
    failed: usize,
    duplicates: usize,
    prefetch: u16,
    /// How long the killed node took to start again and rejoin.
    restart: Result<Duration, String>,
}

/// Two workers on different nodes, a steady stream of [`LOSS_GENERATION`]
/// tasks, and the node of one worker (not the leaders' node) killed.
async fn loss_run(
    cfg: &BenchConfig,
    nodes: &[BrokerNode],
    target: &Target,
    n: usize,
) -> BenchResult<LossRun> {
    let sim = simulator(LOSS_GENERATION, EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::on(target, "clusterloss").await?;
    let sink = Sink::start(&dep, true).await?;
    let index_of = |port: u16| {
        nodes
            .iter()
            .position(|node| node.port == port)
            .ok_or_else(|| format!("a worker names port {port}, no node of the cluster"))
    };
    let a = Worker::spawn(&dep, &sim, &[]).await?;
    let port_a = a.wait_broker_node(None, Duration::from_secs(30)).await?;
    // Workers shuffle the node list: start the second until it lands on
    // another node than the first.
    let mut b = Worker::spawn(&dep, &sim, &[]).await?;
    let mut port_b = b.wait_broker_node(None, Duration::from_secs(30)).await?;
    for _ in 0..20 {
        if port_b != port_a {
            break;
        }
        drop(b);
        b = Worker::spawn(&dep, &sim, &[]).await?;
        port_b = b.wait_broker_node(None, Duration::from_secs(30)).await?;
    }
    if port_a == port_b {
        return Err("the second worker kept landing on the first one's node".into());
    }
    let worker_nodes = [index_of(port_a)?, index_of(port_b)?];
    // The bench declared everything through node 0, which puts the leaders
    // there; kill a worker's node that leads none of the run's queues.
    let mut queues = dep.topology.queue_names();
    queues.push(dep.sink_queue.clone());
    let lead = leaders(&nodes[0], &queues).await?;
    let killed = worker_nodes
        .into_iter()
        .find(|i| *i != 0 && !lead.contains(&nodes[*i].name))
        .ok_or_else(|| format!("both workers' nodes lead a queue ({lead:?})"))?;
    let moved = if nodes[killed].port == port_a { &a } else { &b };
    progress!(
        cfg,
        "  workers on nodes {} and {}; queue leaders on node(s) {:?}; node {killed} goes",
        worker_nodes[0],
        worker_nodes[1],
        nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| lead.contains(&node.name))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    );

    let per_batch = ((LOSS_RATE * LOSS_TICK.as_secs_f64()).round() as usize).max(1);
    let batches = n.div_ceil(per_batch);
    let kill_batch = ((batches as f64 * LOSS_KILL_AT).round() as usize).clamp(1, batches);
    let (tx, mut rx) = watch::channel(0usize);
    let t0 = Instant::now();
    let publisher = async {
        // Owned here: the observer learns it if the stream stops early.
        let tx = tx;
        let mut tick = tokio::time::interval(LOSS_TICK);
        let mut sent = 0;
        for batch in 0..batches {
            tick.tick().await;
            let k = per_batch.min(n - sent);
            dep.publish_requests(k, &format!("loss{batch}"), "a cat turns its head")
                .await?;
            sent += k;
            tx.send_replace(batch + 1);
        }
        Ok::<Duration, Box<dyn Error + Send + Sync>>(t0.elapsed())
    };
    let observer = async {
        rx.wait_for(|b| *b >= kill_batch)
            .await
            .map_err(|_| "the stream stopped before the node loss")?;
        let finished_at_kill = sink.seen();
        let killed_wall = SystemTime::now();
        let killed_at = Instant::now();
        nodes[killed].kill().await?;
        let moved_to = moved
            .wait_broker_node(Some(nodes[killed].port), Duration::from_secs(120))
            .await?;
        let moved_ready_after = killed_at.elapsed();
        progress!(
            cfg,
            "  killed node {killed} with {finished_at_kill} of {n} finished; the moved worker is ready on port {moved_to} after {:.1} s",
            moved_ready_after.as_secs_f64()
        );
        Ok::<_, Box<dyn Error + Send + Sync>>((
            finished_at_kill,
            killed_wall,
            moved_ready_after,
            index_of(moved_to)?,
        ))
    };
    let (stream, observed) = tokio::join!(publisher, observer);
    let stream = stream?;
    let (finished_at_kill, killed_wall, moved_ready_after, moved_to) = observed?;
    let complete = sink.wait_for(n, Duration::from_secs(300)).await;
    if complete.is_ok() {
        // Let late duplicates (if any) arrive before counting.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let creates = sim.stats().tasks_created;
    stop_workers(vec![a, b]).await;
    // Back to three nodes before the run's queues are deleted: deleting a
    // quorum queue with a member down waits for that member.
    let restarted_at = Instant::now();
    let restart = nodes[killed]
        .restart()
        .await
        .map(|()| restarted_at.elapsed())
        .map_err(|e| e.to_string());
    let s = sink.lock();
    let first_event_after = s
        .kept
        .iter()
        .filter_map(|a| a.at.duration_since(killed_wall).ok())
        .min();
    let last_event = s
        .last
        .map(|at| at.saturating_duration_since(t0))
        .filter(|_| complete.is_ok());
    let finished = s
        .kept
        .iter()
        .filter_map(|a| {
            let event: Value = serde_json::from_slice(&a.body).ok()?;
            event["data"]["request_id"].as_str().map(str::to_owned)
        })
        .collect::<HashSet<_>>()
        .len();
    Ok(LossRun {
        n,
        worker_nodes,
        killed,
        finished_at_kill,
        first_event_after,
        moved_ready_after,
        moved_to,
        finished,
        last_event,
        stream,
        creates,
        failed: s.failed,
        duplicates: s.duplicates,
        prefetch: dep.settings.amqp.prefetch,
        restart,
    })
}

/// `1 worker`, `2 workers`.
fn workers_label(n: usize) -> String {
    if n == 1 {
        "1 worker".into()
    } else {
        format!("{n} workers")
    }
}

/// One instant run per worker count on `target`, each the median of
/// `BENCH_REPEAT` runs.
async fn cluster_instant(
    cfg: &BenchConfig,
    target: &Target,
    workers: usize,
    n: usize,
    label: &str,
) -> BenchResult<(InstantRun, Vec<f64>)> {
    median_of(cfg, |_| async move {
        let run = instant_run_on(cfg, target, workers, n, None).await?;
        progress!(
            cfg,
            "cluster: {label}, {}: {:.0} tasks/s ({})",
            workers_label(workers),
            run.rate,
            run.cpu.describe("workers")
        );
        Ok(run)
    })
    .await
}

async fn scenario_cluster(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(CLUSTER_TASKS, 200);
    let mut rows = Vec::new();

    // The reference: one private node, started like the cluster's.
    progress!(
        cfg,
        "cluster: reference, 1 worker on a private single node, {n} instant tasks"
    );
    let single = async {
        let node = [BrokerNode::launch().await?];
        node[0].await_startup().await?;
        let target = private_target(&node, None);
        cluster_instant(cfg, &target, 1, n, "single node").await
    }
    .await;
    let single = match single {
        Ok((run, rates)) => {
            rows.push(Row::info(
                "9",
                format!("Single private node, quorum queues, 1 worker, generation 0 ({n} requests): the reference"),
                format!(
                    "**{:.0} tasks/s**{} · {}",
                    run.rate,
                    spread(&rates),
                    run.cpu.describe("worker")
                ),
            ));
            Some(run)
        }
        Err(e) => {
            rows.push(Row::failed("9", "Single private node, 1 worker", &e));
            None
        }
    };

    progress!(cfg, "cluster: starting {CLUSTER_NODES} nodes");
    let nodes = match BrokerNode::start_cluster(CLUSTER_NODES).await {
        Ok(nodes) => nodes,
        Err(e) => {
            rows.push(Row::failed(
                "9",
                format!("A {CLUSTER_NODES}-node cluster"),
                &e,
            ));
            return rows;
        }
    };
    let group = u16::try_from(CLUSTER_NODES).ok();
    let target = private_target(&nodes, group);
    let mut by_workers: Vec<(usize, InstantRun)> = Vec::new();
    for workers in CLUSTER_WORKERS {
        progress!(
            cfg,
            "cluster: {} on {CLUSTER_NODES} nodes, {n} instant tasks",
            workers_label(workers)
        );
        match cluster_instant(cfg, &target, workers, n, "cluster").await {
            Ok((run, rates)) => {
                rows.push(Row::info(
                    "9",
                    format!(
                        "{CLUSTER_NODES}-node cluster, quorum queues on {CLUSTER_NODES} replicas, {}, generation 0 ({n} requests)",
                        workers_label(workers)
                    ),
                    format!(
                        "**{:.0} tasks/s**{} · {} on node {} (queue leaders on node 0) · {}",
                        run.rate,
                        spread(&rates),
                        if workers == 1 { "worker" } else { "workers" },
                        node_names(&nodes, &run.nodes),
                        run.cpu.describe("workers")
                    ),
                ));
                by_workers.push((workers, run));
            }
            Err(e) => rows.push(Row::failed(
                "9",
                format!("{CLUSTER_NODES}-node cluster, {}", workers_label(workers)),
                &e,
            )),
        }
    }
    let rate_of = |w: usize| {
        by_workers
            .iter()
            .find(|(k, _)| *k == w)
            .map(|(_, r)| r.rate)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    };
    rows.push(Row::info(
        "9",
        "  cluster with 1 worker ÷ single node",
        ratio(rate_of(1), single.as_ref().map(|r| r.rate)),
    ));
    rows.push(Row::info(
        "9",
        "  cluster with 2 workers ÷ cluster with 1 worker",
        ratio(rate_of(2), rate_of(1)),
    ));
    let per_task: Vec<String> = single
        .iter()
        .map(|r| format!("single: {}", r.cpu.per_task(n, "worker")))
        .chain(by_workers.iter().map(|(w, r)| {
            format!(
                "cluster, {}: {}",
                workers_label(*w),
                r.cpu.per_task(n, "workers")
            )
        }))
        .collect();
    rows.push(Row::info(
        "9",
        "  CPU ms per task (broker: every node)",
        per_task.join("; "),
    ));

    let loss_n = cfg.count(LOSS_TASKS, 100);
    progress!(
        cfg,
        "cluster: node loss, 2 workers, {loss_n} requests of {LOSS_GENERATION:?} at {LOSS_RATE}/s"
    );
    let title = format!(
        "Node loss: 2 workers on different nodes, {loss_n} requests of {} s at {LOSS_RATE:.0}/s, a worker's node (not the leaders') killed with SIGKILL",
        LOSS_GENERATION.as_secs()
    );
    match loss_run(cfg, &nodes, &target, loss_n).await {
        Ok(run) => {
            let extra = run.creates.saturating_sub(run.n as u64);
            progress!(
                cfg,
                "cluster: node loss: first event {} s after, worker moved in {:.1} s, {extra} extra creates",
                fmt_opt(run.first_event_after.map(|d| d.as_secs_f64()), 2),
                run.moved_ready_after.as_secs_f64()
            );
            rows.push(Row::info(
                "9",
                format!("{title}: first terminal event after the kill"),
                format!(
                    "**{} s** (workers on nodes {} and {}, node {} killed with {} of {} finished)",
                    fmt_opt(run.first_event_after.map(|d| d.as_secs_f64()), 2),
                    run.worker_nodes[0],
                    run.worker_nodes[1],
                    run.killed,
                    run.finished_at_kill,
                    run.n
                ),
            ));
            rows.push(Row::info(
                "9",
                "  the moved worker's `/readyz` names another node",
                format!(
                    "**{:.1} s** after the kill (node {})",
                    run.moved_ready_after.as_secs_f64(),
                    run.moved_to
                ),
            ));
            let window = u64::from(run.prefetch);
            rows.push(Row::target(
                "9",
                "  extra creates (simulator's tasks created − requests)",
                format!("**{extra}** ({} created)", run.creates),
                format!("≤ amqp.prefetch ({window}): one lost session"),
                extra <= window,
            ));
            rows.push(Row::target(
                "9",
                "  requests finished · failed · events delivered again (same id) · last event",
                format!(
                    "{} of {} · {} · {} · {} s from the first publish (stream {:.1} s)",
                    run.finished,
                    run.n,
                    run.failed,
                    run.duplicates,
                    fmt_opt(run.last_event.map(|d| d.as_secs_f64()), 1),
                    run.stream.as_secs_f64()
                ),
                "all, 0 failed",
                run.finished == run.n && run.failed == 0,
            ));
            rows.push(Row::info(
                "9",
                "  the killed node started again and back in the cluster after",
                match &run.restart {
                    Ok(d) => format!("{:.1} s", d.as_secs_f64()),
                    Err(e) => format!("did not complete: {e}"),
                },
            ));
        }
        Err(e) => rows.push(Row::failed("9", title, &e)),
    }
    progress!(cfg, "cluster: stopping the nodes");
    drop(nodes);
    rows
}
