//! Plain statistics of the bench: percentiles, the median of repeated
//! runs (repeating a run other processes disturbed) and its spread, call
//! counts between two simulator snapshots, and the figures read from the
//! simulator's call log (the busiest quota window, the longest wait on
//! retries).

use std::time::Duration;

use vidu_worker::simulator::SimStats;

use crate::{config::BenchConfig, machine::CpuSplit, BenchResult};

#[derive(Clone, Copy)]
pub(crate) struct Percentiles {
    p50: f64,
    pub(crate) p95: f64,
    max: f64,
}

impl Percentiles {
    pub(crate) fn of(mut v: Vec<f64>) -> Option<Self> {
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

    pub(crate) fn describe(&self) -> String {
        format!(
            "p50 {:.2} s · p95 {:.2} s · max {:.2} s",
            self.p50, self.p95, self.max
        )
    }
}

/// A timed run: its rate and where the CPU went.
pub(crate) trait Measured {
    fn rate(&self) -> f64;
    fn cpu(&self) -> &CpuSplit;
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
pub(crate) async fn median_of<T, F, Fut>(cfg: &BenchConfig, mut f: F) -> BenchResult<(T, Vec<f64>)>
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
pub(crate) fn spread(rates: &[f64]) -> String {
    match (rates.first(), rates.last()) {
        (Some(lo), Some(hi)) if rates.len() > 1 => {
            format!(" (median of {}: {lo:.0}–{hi:.0})", rates.len())
        }
        _ => String::new(),
    }
}

pub(crate) fn stats_delta(before: &SimStats, after: &SimStats) -> (u64, u64) {
    (
        after.create_calls - before.create_calls,
        after.poll_calls - before.poll_calls,
    )
}

/// Most accepted creates whose arrivals fell within any `window`.
pub(crate) fn busiest_window(
    calls: &[vidu_worker::simulator::CallRecord],
    window: Duration,
) -> usize {
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

/// The longest a request waited on retries, from the simulator's log.
pub(crate) fn worst_retry(calls: &[vidu_worker::simulator::CallRecord]) -> Duration {
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
