//! `latency` (rows numbered 8 in the report): one-second tasks on one
//! worker with default settings (its own poll budget included), from
//! publish to `succeeded`.

use std::time::{Duration, SystemTime};

use vidu_worker::{config::Settings, simulator::EtaMode};

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment, Sink},
    machine::wait_quiet,
    report::Row,
    stats::Percentiles,
    workers::{start_workers, stop_workers},
    BenchResult,
};

/// One-second tasks of the latency run.
const LATENCY_TASKS: usize = 200;
const TARGET_LATENCY_P95_S: f64 = 5.0;

pub(crate) async fn scenario_latency(cfg: &BenchConfig) -> Vec<Row> {
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
