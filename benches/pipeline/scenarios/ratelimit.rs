//! `ratelimit` (rows numbered 5 in the report): a burst of requests against
//! a worker with a create quota and a poll budget (`upstream.create_quota`,
//! `upstream.max_requests_per_second`); the most calls the simulator saw in
//! any one-second window.

use std::time::{Duration, Instant};

use vidu_worker::simulator::{EtaMode, SimStats};

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment, Sink},
    machine::wait_quiet,
    report::Row,
    stats::stats_delta,
    workers::{start_workers, stop_workers},
    BenchResult,
};

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

pub(crate) async fn scenario_ratelimit(cfg: &BenchConfig) -> Vec<Row> {
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
