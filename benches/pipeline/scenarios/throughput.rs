//! `throughput` (rows numbered 2 in the report): one worker, generation
//! time 0, from the first publish to the last terminal event, against the
//! broker ceiling; and the instant run it is made of, which the scale-out
//! and cluster scenarios reuse (and the memory scenario sizes its
//! generation time by).

use std::time::{Duration, Instant};

use vidu_worker::simulator::EtaMode;

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment, Sink, Target},
    machine::{start_perf, stop_perf, wait_quiet, CpuSplit},
    report::{fmt_opt, ratio_cell, Findings, InstantRun, Row},
    stats::{median_of, spread, stats_delta, Measured},
    workers::{start_workers, stop_workers, Worker},
    BenchResult, CEILING_WIDE_PREFETCH, INSTANT_TASKS,
};

/// A target from the issue.
const TARGET_RATIO: f64 = 0.5;

pub(super) async fn instant_run(
    cfg: &BenchConfig,
    workers: usize,
    n: usize,
    perf: Option<&str>,
) -> BenchResult<InstantRun> {
    instant_run_on(cfg, &Target::local(cfg), workers, n, perf).await
}

pub(super) async fn instant_run_on(
    cfg: &BenchConfig,
    target: &Target,
    workers: usize,
    n: usize,
    perf: Option<&str>,
) -> BenchResult<InstantRun> {
    let sim = simulator(Duration::ZERO, EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::on(target, &format!("instant{workers}")).await?;
    let sink = Sink::start(&dep, false).await?;
    let procs = start_workers(&dep, &sim, workers, &[]).await?;
    let mut nodes = Vec::with_capacity(procs.len());
    for w in &procs {
        nodes.push(w.broker_node().await);
    }
    let mut perf_child = match perf {
        Some(path) => Some(start_perf(cfg, path, procs[0].pid)?),
        None => None,
    };
    let before = sim.stats();
    let cpu = target.cpu_meter(procs.iter().map(|w| w.pid).collect());
    let t0 = Instant::now();
    let publish = dep
        .publish_requests(n, "instant", "a cat turns its head")
        .await?;
    progress!(
        cfg,
        "  published {n} requests in {:.1} s",
        publish.as_secs_f64()
    );
    let mut reporter = tokio::time::interval(Duration::from_secs(5));
    reporter.tick().await;
    let mut sampler = tokio::time::interval(Duration::from_millis(200));
    let mut intake_done: Option<Instant> = None;
    let wait = sink.wait_for(n, Duration::from_secs(900));
    tokio::pin!(wait);
    let last = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = reporter.tick() => progress!(cfg, "  {} of {n} terminal events", sink.seen()),
            _ = sampler.tick(), if intake_done.is_none() => {
                if dep.ready_requests().await == Some(0) {
                    intake_done = Some(Instant::now());
                }
            }
        }
    };
    let split = cpu.stop();
    if let Some(child) = perf_child.as_mut() {
        stop_perf(cfg, child).await;
    }
    let last = last?;
    let after = sim.stats();
    let (creates, polls) = stats_delta(&before, &after);
    let events = procs[0].metric("vidu_worker_events_published_total").await;
    let hops = procs[0].metric("vidu_worker_ticket_hops_total").await;
    let requests = procs[0].metric("vidu_worker_requests_received_total").await;
    let per_task = |v: Option<f64>| Some(v? / requests.filter(|r| *r > 0.0)?);
    let log_lines: u64 = procs.iter().map(Worker::log_lines).sum();
    let peak_rss = procs
        .iter()
        .filter_map(Worker::peak_rss_mib)
        .reduce(f64::max);
    let (failed, duplicates) = {
        let s = sink.lock();
        (s.failed, s.duplicates)
    };
    stop_workers(procs).await;
    Ok(InstantRun {
        workers,
        n,
        rate: n as f64 / (last - t0).as_secs_f64(),
        intake: intake_done.map(|at| n as f64 / (at - t0).as_secs_f64()),
        publish,
        failed,
        duplicates,
        cpu: split,
        creates,
        polls,
        events_per_task: per_task(events),
        hops_per_task: per_task(hops),
        log_lines_per_task: log_lines as f64 / n as f64,
        peak_rss,
        nodes,
    })
}

impl Measured for InstantRun {
    fn rate(&self) -> f64 {
        self.rate
    }
    fn cpu(&self) -> &CpuSplit {
        &self.cpu
    }
}

pub(crate) async fn scenario_throughput(cfg: &BenchConfig, found: &mut Findings) -> Vec<Row> {
    let n = cfg.count(INSTANT_TASKS, 200);
    progress!(cfg, "throughput: 1 worker, {n} instant tasks");
    let runs = median_of(cfg, |i| async move {
        let perf = cfg.perf.as_deref().filter(|_| i == 0);
        let run = instant_run(cfg, 1, n, perf).await?;
        progress!(
            cfg,
            "throughput: {:.0} tasks/s ({})",
            run.rate,
            run.cpu.describe("worker")
        );
        Ok(run)
    })
    .await;
    let (run, rates) = match runs {
        Ok(runs) => runs,
        Err(e) => return vec![Row::failed("2", "End-to-end throughput, 1 worker", &e)],
    };
    let (ratio, r) = ratio_cell(run.rate, found.ceiling);
    let (ratio_wide, _) = ratio_cell(run.rate, found.ceiling_wide);
    let mut rows = vec![
        Row::info(
            "2",
            format!("End-to-end throughput, 1 worker, generation 0 ({n} requests)"),
            format!("**{:.0} tasks/s**{}", run.rate, spread(&rates)),
        ),
        match r {
            // Without a ceiling run there is nothing to judge.
            None => Row::info(
                "2",
                "  ratio to the broker ceiling at the same prefetch",
                ratio,
            ),
            Some(r) => Row::target(
                "2",
                "  ratio to the broker ceiling at the same prefetch",
                ratio,
                format!("≥ {TARGET_RATIO}"),
                r >= TARGET_RATIO,
            ),
        },
        Row::info(
            "2",
            format!("  ratio to the broker ceiling at prefetch {CEILING_WIDE_PREFETCH}"),
            ratio_wide,
        ),
        Row::info("2", "  CPU ms per task", run.cpu.per_task(n, "worker")),
        Row::info("2", "  CPU use", run.cpu.describe("worker")),
        Row::info(
            "2",
            "  intake: request queue emptied at (requests/s)",
            format!("{} requests/s", fmt_opt(run.intake, 0)),
        ),
        Row::info(
            "2",
            "  per task: upstream calls · events confirmed · ticket publishes · worker log lines",
            format!(
                "{:.2} · {} · {} · {:.1}",
                (run.creates + run.polls) as f64 / n as f64,
                fmt_opt(run.events_per_task, 2),
                fmt_opt(run.hops_per_task, 2),
                run.log_lines_per_task
            ),
        ),
        Row::info(
            "2",
            "  producer publish time · failed · duplicate terminal events · worker peak RSS",
            format!(
                "{:.1} s · {} · {} · {} MiB",
                run.publish.as_secs_f64(),
                run.failed,
                run.duplicates,
                fmt_opt(run.peak_rss, 1)
            ),
        ),
    ];
    if run.failed > 0 {
        rows.push(Row::info(
            "2",
            "  warning",
            format!("{} tasks failed", run.failed),
        ));
    }
    found.one_worker = Some(run);
    rows
}
