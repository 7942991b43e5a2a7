//! What the bench reports: a `Row` per measure with its `Verdict` against
//! a target, the `Findings` later scenarios reuse from earlier ones, the
//! markdown table printed on stdout, and the formatting helpers the rows
//! share.

use std::fmt::Write as _;

use std::time::Duration;

use crate::{config::BenchConfig, machine::CpuSplit};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    Info,
}

pub(crate) struct Row {
    id: &'static str,
    measure: String,
    value: String,
    target: String,
    verdict: Verdict,
}

impl Row {
    pub(crate) fn info(
        id: &'static str,
        measure: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Self {
            id,
            measure: measure.into(),
            value: value.into(),
            target: String::new(),
            verdict: Verdict::Info,
        }
    }

    pub(crate) fn target(
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

    pub(crate) fn failed(
        id: &'static str,
        measure: impl Into<String>,
        error: &dyn std::fmt::Display,
    ) -> Self {
        Self::info(id, measure, format!("did not complete: {error}"))
    }
}

/// One run of instant tasks through the workers (the throughput
/// scenario's, reused by scale-out, memory and the cluster reference).
#[derive(Clone)]
pub(crate) struct InstantRun {
    pub(crate) workers: usize,
    pub(crate) n: usize,
    pub(crate) rate: f64,
    /// Requests per second until the request queue had none ready.
    pub(crate) intake: Option<f64>,
    pub(crate) publish: Duration,
    pub(crate) failed: usize,
    pub(crate) duplicates: usize,
    pub(crate) cpu: CpuSplit,
    pub(crate) creates: u64,
    pub(crate) polls: u64,
    /// Per task, from the first worker's metrics: events confirmed, ticket
    /// publishes (hops), upstream calls.
    pub(crate) events_per_task: Option<f64>,
    pub(crate) hops_per_task: Option<f64>,
    pub(crate) log_lines_per_task: f64,
    pub(crate) peak_rss: Option<f64>,
    /// The broker node (port) each worker named in `/readyz` at the start.
    pub(crate) nodes: Vec<Option<u16>>,
}

/// What later scenarios reuse from earlier ones.
#[derive(Default)]
pub(crate) struct Findings {
    /// The ceiling loop at the worker's `amqp.prefetch` (the fair match).
    pub(crate) ceiling: Option<f64>,
    /// The ceiling loop at [`CEILING_WIDE_PREFETCH`](crate::CEILING_WIDE_PREFETCH).
    pub(crate) ceiling_wide: Option<f64>,
    pub(crate) one_worker: Option<InstantRun>,
}

/// The report printed on stdout: the machine line, a markdown table of
/// `rows` and the total bench time.
pub(crate) fn render(cfg: &BenchConfig, machine: &str, rows: Vec<Row>) -> String {
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
    out
}

pub(crate) fn ratio_cell(rate: f64, ceiling: Option<f64>) -> (String, Option<f64>) {
    match ceiling {
        Some(c) if c > 0.0 => (format!("{:.2}", rate / c), Some(rate / c)),
        _ => ("n/a (run `ceiling` too)".into(), None),
    }
}

pub(crate) fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}
