//! The bench's knobs: `BenchConfig`, read from the environment
//! (`BENCH_ONLY`, `BENCH_SCALE`, `BENCH_AMQP_URL`, `BENCH_PERF`,
//! `BENCH_PERF_ARGS`, `BENCH_REPEAT`, `BENCH_QUIET_WAIT`) and the scenario
//! names given as arguments, with the scaling of counts and durations.

use std::{
    collections::HashSet,
    env,
    time::{Duration, Instant},
};

use crate::SCENARIOS;

/// The broker when `BENCH_AMQP_URL` is not set.
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub(crate) struct BenchConfig {
    only: HashSet<String>,
    pub(crate) scale: f64,
    pub(crate) amqp_url: String,
    pub(crate) perf: Option<String>,
    pub(crate) perf_args: Vec<String>,
    /// Runs of each instant scenario (ceiling, throughput, scale-out); the
    /// median is reported.
    pub(crate) repeat: usize,
    /// Longest wait for a quiet machine before each measured run.
    pub(crate) quiet_wait: Duration,
    pub(crate) started: Instant,
}

impl BenchConfig {
    pub(crate) fn from_env() -> Result<Self, String> {
        let mut names: Vec<String> = env::var("BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        // `cargo bench` passes `--bench`; anything else is a scenario name.
        names.extend(env::args().skip(1).filter(|a| !a.starts_with('-')));
        for name in &names {
            if !SCENARIOS.iter().any(|s| s.name == name.as_str()) {
                return Err(format!(
                    "unknown scenario {name:?}; known: {}",
                    SCENARIOS
                        .iter()
                        .map(|s| s.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let only = if names.is_empty() {
            SCENARIOS.iter().map(|s| s.name.to_owned()).collect()
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

    pub(crate) fn wants(&self, scenario: &str) -> bool {
        self.only.contains(scenario)
    }

    pub(crate) fn count(&self, full: usize, min: usize) -> usize {
        ((full as f64 * self.scale).round() as usize).max(min)
    }

    pub(crate) fn duration(&self, full: Duration, min: Duration) -> Duration {
        full.mul_f64(self.scale.min(1.0)).max(min)
    }
}
