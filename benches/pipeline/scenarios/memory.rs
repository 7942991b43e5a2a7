//! `memory` (rows numbered 3 in the report): the peak RSS of one worker
//! while thousands of tasks stay in PROCESSING together and then complete,
//! and how it grows from the small run to the large one.

use std::time::{Duration, Instant};

use vidu_worker::simulator::EtaMode;

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment, Sink},
    machine::wait_quiet,
    report::{fmt_opt, Findings, Row},
    workers::{start_workers, stop_workers},
    BenchResult,
};

/// Task counts of the memory runs.
const MEMORY_TASKS: [usize; 2] = [2_000, 20_000];
/// How long every task must stay in PROCESSING in the memory runs.
const MEMORY_HOLD: Duration = Duration::from_secs(60);
/// A target from the issue.
const TARGET_RSS_MIB: f64 = 64.0;

struct MemoryRun {
    n: usize,
    idle: Option<f64>,
    hold_max: Option<f64>,
    peak: Option<f64>,
    window: f64,
    generation: Duration,
    failed: usize,
    /// Most requests and tickets the worker held at once (sampled).
    in_flight: (f64, f64),
}

pub(crate) async fn scenario_memory(cfg: &BenchConfig, found: &Findings) -> Vec<Row> {
    let hold = cfg.duration(MEMORY_HOLD, Duration::from_secs(5));
    // How fast a worker takes requests in, to size the generation time so
    // that every task is in PROCESSING together for `hold`.
    let intake = found
        .one_worker
        .as_ref()
        .map_or(300.0, |r| r.rate)
        .max(50.0);
    let mut rows = Vec::new();
    let mut peaks = Vec::new();
    for full in MEMORY_TASKS {
        let n = cfg.count(full, 20);
        let expected_span = n as f64 / intake;
        // PROCESSING starts at 10% of the generation time.
        let generation =
            Duration::from_secs_f64(((hold.as_secs_f64() + expected_span) / 0.9) * 1.15 + 2.0);
        progress!(
            cfg,
            "memory: {n} tasks, generation {:.0} s, hold {hold:?}",
            generation.as_secs_f64()
        );
        match memory_run(cfg, n, generation).await {
            Ok(run) => {
                progress!(
                    cfg,
                    "memory: {n} tasks: peak RSS {} MiB, all in PROCESSING for {:.0} s",
                    fmt_opt(run.peak, 1),
                    run.window
                );
                peaks.push(run.peak);
                rows.push(Row::target(
                    "3",
                    format!(
                        "Peak RSS of 1 worker, {} tasks in PROCESSING together for {:.0} s (generation {:.0} s), then completed",
                        run.n,
                        run.window,
                        run.generation.as_secs_f64()
                    ),
                    format!(
                        "**{} MiB** (idle {} MiB; max sampled while holding {} MiB; most held at once: {:.0} requests, {:.0} tickets; {} failed)",
                        fmt_opt(run.peak, 1),
                        fmt_opt(run.idle, 1),
                        fmt_opt(run.hold_max, 1),
                        run.in_flight.0,
                        run.in_flight.1,
                        run.failed
                    ),
                    format!("≤ {TARGET_RSS_MIB} MiB, ≥ {:.0} s held", hold.as_secs_f64()),
                    run.peak.is_some_and(|p| p <= TARGET_RSS_MIB) && run.window >= hold.as_secs_f64(),
                ));
            }
            Err(e) => rows.push(Row::failed("3", format!("Memory, {n} tasks"), &e)),
        }
    }
    if let [Some(small), Some(large)] = peaks[..] {
        let growth = large - small;
        rows.push(Row::target(
            "3",
            "  growth of peak RSS from the small to the large run",
            format!("{growth:+.1} MiB ({:+.0}%)", growth / small * 100.0),
            "flat (within 10%)",
            growth <= small * 0.10,
        ));
    }
    rows
}

async fn memory_run(cfg: &BenchConfig, n: usize, generation: Duration) -> BenchResult<MemoryRun> {
    let sim = simulator(generation, EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "memory").await?;
    let sink = Sink::start(&dep, false).await?;
    let workers = start_workers(&dep, &sim, 1, &[]).await?;
    let worker = &workers[0];
    let idle = worker.rss_mib();
    dep.publish_requests(n, "mem", "a cat turns its head")
        .await?;
    // Follow creation: the PROCESSING window is from the last create plus
    // 10% of the generation time until the first task is done.
    let mut first_create: Option<Instant> = None;
    let create_deadline = Instant::now() + Duration::from_secs(900);
    let last_create = loop {
        let created = sim.stats().tasks_created as usize;
        if Instant::now() >= create_deadline {
            return Err(format!("only {created} of {n} tasks were created in 900 s").into());
        }
        if created > 0 && first_create.is_none() {
            first_create = Some(Instant::now());
        }
        if created >= n {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first_create = first_create.unwrap_or(last_create);
    let window = generation.as_secs_f64() * 0.9 - (last_create - first_create).as_secs_f64();
    progress!(
        cfg,
        "  {n} tasks created in {:.1} s; waiting for them to finish",
        (last_create - first_create).as_secs_f64()
    );
    let first_done = first_create + generation;
    let mut hold_max: Option<f64> = None;
    let mut in_flight = (0.0f64, 0.0f64);
    let sample_in_flight = async |in_flight: &mut (f64, f64)| {
        let requests = worker.metric("vidu_worker_in_flight_requests").await;
        let tickets = worker.metric("vidu_worker_in_flight_tickets").await;
        in_flight.0 = in_flight.0.max(requests.unwrap_or(0.0));
        in_flight.1 = in_flight.1.max(tickets.unwrap_or(0.0));
    };
    while Instant::now() < first_done {
        if let Some(rss) = worker.rss_mib() {
            hold_max = Some(hold_max.map_or(rss, |m: f64| m.max(rss)));
        }
        sample_in_flight(&mut in_flight).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wait = sink.wait_for(n, Duration::from_secs(900));
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let finished = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = tick.tick() => sample_in_flight(&mut in_flight).await,
        }
    };
    let peak = worker.peak_rss_mib();
    stop_workers(workers).await;
    finished?;
    let failed = sink.lock().failed;
    Ok(MemoryRun {
        n,
        idle,
        hold_max,
        peak,
        window,
        generation,
        failed,
        in_flight,
    })
}
