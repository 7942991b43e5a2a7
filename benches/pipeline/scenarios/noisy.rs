//! `noisy` (rows numbered 7b in the report): the same requests through one
//! worker with a perfect upstream and then a noisy one (5xx, 429s, hangs,
//! unreadable answers on both endpoints): how every request ends, the
//! makespan against the perfect run plus the retries' delays, and create
//! calls per request.

use std::time::{Duration, Instant};

use vidu_worker::simulator::EtaMode;

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment, Sink},
    machine::wait_quiet,
    report::Row,
    stats::worst_retry,
    workers::{start_workers, stop_workers},
    BenchResult,
};

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

pub(crate) async fn scenario_noisy(cfg: &BenchConfig) -> Vec<Row> {
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
