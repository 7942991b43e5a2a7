//! `polling` (rows numbered 4 in the report): 20 s generations with an
//! honest `eta` and without one: task-result calls per task and detection
//! latency (the terminal event against the moment the simulator marked the
//! task done).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use vidu_worker::simulator::EtaMode;

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment, Sink},
    machine::wait_quiet,
    report::Row,
    stats::{stats_delta, Percentiles},
    workers::{start_workers, stop_workers},
    BenchResult,
};

/// Tasks per polling run and their generation time.
const POLLING_TASKS: usize = 1_000;
const POLLING_GENERATION: Duration = Duration::from_secs(20);
/// Targets from the issue.
const TARGET_POLLS_PER_TASK: f64 = 4.0;
const TARGET_P95_LATENCY_S: f64 = 1.5;

struct PollingRun {
    n: usize,
    polls_per_task: f64,
    max_polls: u64,
    arrival: Percentiles,
    completed: Percentiles,
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

pub(crate) async fn scenario_polling(cfg: &BenchConfig) -> Vec<Row> {
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
