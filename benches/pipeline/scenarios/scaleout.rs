//! `scaleout` (rows numbered 6 in the report): the throughput scenario's
//! instant run with 2 and 3 worker processes, against one worker and the
//! broker ceiling.

use crate::{
    config::BenchConfig,
    report::{ratio_cell, Findings, Row},
    stats::median_of,
    INSTANT_TASKS,
};

use super::throughput::instant_run;
use crate::report::InstantRun;

/// Worker counts of the scale-out runs (1 is the throughput run).
const SCALE_OUT: [usize; 2] = [2, 3];

pub(crate) async fn scenario_scaleout(cfg: &BenchConfig, found: &mut Findings) -> Vec<Row> {
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
