//! `quota` (rows numbered 7 in the report): 1, 2 and 3 workers sharing one
//! simulated account quota, with `upstream.create_quota` set and learned
//! (with and without `Retry-After`): 429s per request, accepted creates in
//! the busiest window, and the makespan against the quota's own limit.

use std::time::{Duration, Instant};

use vidu_worker::simulator::{Simulator, SimulatorConfig};

use crate::{
    config::BenchConfig,
    harness::{Deployment, Sink, API_KEY},
    machine::wait_quiet,
    report::Row,
    stats::busiest_window,
    workers::{start_workers, stop_workers},
    BenchResult, QUOTA_WINDOW,
};

/// The simulated account quota of the quota runs: creates per window (per
/// minute, as Novita counts).
const QUOTA_CREATES: u32 = 40;
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

pub(crate) async fn scenario_quota(cfg: &BenchConfig) -> Vec<Row> {
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
