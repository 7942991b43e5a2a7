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
//!
//! Layout of this folder: `main.rs` (this entry point and the table of
//! scenarios), `config.rs` (the knobs), `report.rs` (rows and the table),
//! `stats.rs`, `machine.rs` (the machine and CPU meters), the harness
//! (`harness.rs`, `workers.rs`, `cluster_node.rs`), one file per scenario
//! under `scenarios/` with its own constants and targets, and `profile.sh`
//! (the throughput scenario under `perf`).

/// Progress on stderr, stamped with the time since the bench started.
macro_rules! progress {
    ($cfg:expr, $($arg:tt)*) => {
        eprintln!("[{:>7.1}s] {}", $cfg.started.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

mod cluster_node;
mod config;
mod harness;
mod machine;
mod report;
mod scenarios;
mod stats;
mod workers;

use std::{env, error::Error, process::ExitCode, time::Duration};

use futures_util::future::LocalBoxFuture;

use config::BenchConfig;
use machine::machine_line;
use report::{render, Findings, Row};
use scenarios::{
    ceiling, cluster, dedup, lanes, latency, memory, noisy, polling, quota, quota_change,
    ratelimit, scaleout, storage, throughput,
};

pub(crate) type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

// Constants several scenarios share (each scenario's own are in its file).

/// Requests for the throughput, ceiling and scale-out runs.
pub(crate) const INSTANT_TASKS: usize = 20_000;
/// Prefetch of the ceiling loop beside the worker's `amqp.prefetch`: the
/// worker's tracking consumer is allowed this many (`polling.prefetch`).
/// Shared by the ceiling and throughput scenarios.
pub(crate) const CEILING_WIDE_PREFETCH: u16 = 256;
/// The window of the simulated account quota in the quota and quota-change
/// runs (a minute, as Novita counts).
pub(crate) const QUOTA_WINDOW: Duration = Duration::from_secs(60);

/// What a scenario runs: its rows, given (and adding to) what the
/// scenarios before it found.
type ScenarioFn = for<'a> fn(&'a BenchConfig, &'a mut Findings) -> LocalBoxFuture<'a, Vec<Row>>;

/// A scenario: the name `BENCH_ONLY` (or an argument after `--`) selects it
/// by, one line on what it measures, and its run.
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    about: &'static str,
    run: ScenarioFn,
}

/// Every scenario, in the order they run.
pub(crate) const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "ceiling",
        about: "the broker ceiling: a minimal lapin loop, at the worker's prefetch and a wide one",
        run: |cfg, found| Box::pin(ceiling::scenario_ceiling(cfg, found)),
    },
    Scenario {
        name: "throughput",
        about: "one worker, generation 0: tasks per second, CPU per task, ratio to the ceiling",
        run: |cfg, found| Box::pin(throughput::scenario_throughput(cfg, found)),
    },
    Scenario {
        name: "scaleout",
        about: "the same with 2 and 3 worker processes",
        run: |cfg, found| Box::pin(scaleout::scenario_scaleout(cfg, found)),
    },
    Scenario {
        name: "polling",
        about:
            "20 s generations, with and without an honest eta: polls per task, detection latency",
        run: |cfg, _| Box::pin(polling::scenario_polling(cfg)),
    },
    Scenario {
        name: "ratelimit",
        about: "a burst against a create quota and a poll budget: most calls in any one second",
        run: |cfg, _| Box::pin(ratelimit::scenario_ratelimit(cfg)),
    },
    Scenario {
        name: "memory",
        about: "peak RSS of one worker while thousands of tasks stay in PROCESSING",
        run: |cfg, found| Box::pin(memory::scenario_memory(cfg, found)),
    },
    Scenario {
        name: "quota",
        about: "1, 2 and 3 workers sharing a simulated account quota, configured and learned",
        run: |cfg, _| Box::pin(quota::scenario_quota(cfg)),
    },
    Scenario {
        name: "noisy",
        about: "a noisy upstream (5xx, 429s, hangs, unreadable answers) against a perfect one",
        run: |cfg, _| Box::pin(noisy::scenario_noisy(cfg)),
    },
    Scenario {
        name: "quotachange",
        about: "a quota that moves: how fast the learned quota follows it",
        run: |cfg, _| Box::pin(quota_change::scenario_quota_change(cfg)),
    },
    Scenario {
        name: "latency",
        about: "one-second tasks on one worker with default settings: publish to `succeeded`",
        run: |cfg, _| Box::pin(latency::scenario_latency(cfg)),
    },
    Scenario {
        name: "dedup",
        about:
            "remembered request ids: a joining worker's catch-up and memory, no create for copies",
        run: |cfg, _| Box::pin(dedup::scenario_dedup(cfg)),
    },
    Scenario {
        name: "lanes",
        about: "interactive requests behind a bulk backlog under a small quota: FIFO against lanes 8:1",
        run: |cfg, _| Box::pin(lanes::scenario_lanes(cfg)),
    },
    Scenario {
        name: "storage",
        about: "videos kept: copy throughput into an S3-compatible server against a plain read, peak RSS",
        run: |cfg, _| Box::pin(storage::scenario_storage(cfg)),
    },
    Scenario {
        name: "cluster",
        about: "a private three-node cluster against a single node, then a node killed under load",
        run: |cfg, _| Box::pin(cluster::scenario_cluster(cfg)),
    },
];

fn main() -> ExitCode {
    if env::var("BENCH_ROLE").as_deref() == Ok("ceiling-loop") {
        return ceiling::ceiling_loop_main();
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

async fn run(cfg: BenchConfig) -> BenchResult<String> {
    let machine = machine_line(&cfg).await;
    progress!(cfg, "{machine}");
    progress!(
        cfg,
        "scenarios: {}; scale {}",
        SCENARIOS
            .iter()
            .map(|s| s.name)
            .filter(|s| cfg.wants(s))
            .collect::<Vec<_>>()
            .join(", "),
        cfg.scale
    );
    let mut rows = Vec::new();
    let mut found = Findings::default();
    for scenario in SCENARIOS.iter().filter(|s| cfg.wants(s.name)) {
        progress!(cfg, "{}: {}", scenario.name, scenario.about);
        rows.extend((scenario.run)(&cfg, &mut found).await);
    }
    Ok(render(&cfg, &machine, rows))
}
