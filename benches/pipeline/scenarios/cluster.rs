//! `cluster` (rows numbered 9 in the report): a private three-node RabbitMQ
//! cluster started by the bench: instant runs through 1 and 2 workers given
//! the node list, against 1 worker on a private single node; then two
//! workers on different nodes under a steady stream of tasks, and the node
//! of one of them (not the queue leaders') killed with SIGKILL.

use std::{
    collections::HashSet,
    error::Error,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use tokio::sync::watch;
use vidu_worker::{local_broker::LocalNode, simulator::EtaMode};

use crate::{
    cluster_node::{leaders, node_names, private_target, start_cluster, start_node},
    config::BenchConfig,
    harness::{simulator, Deployment, Sink, Target},
    machine::wait_quiet,
    report::{fmt_opt, Row},
    stats::{median_of, spread},
    workers::{stop_workers, Worker},
    BenchResult,
};

use super::throughput::instant_run_on;
use crate::report::InstantRun;

/// Requests of each instant run in the cluster scenario.
const CLUSTER_TASKS: usize = 3_000;
/// Nodes of the cluster, and replicas of each quorum queue on it.
const CLUSTER_NODES: usize = 3;
/// Worker counts of the cluster's instant runs.
const CLUSTER_WORKERS: [usize; 2] = [1, 2];
/// The node-loss run: a steady stream of requests at this rate, for tasks of
/// this generation time, with the node killed once this share of the stream
/// is published.
const LOSS_TASKS: usize = 750;
const LOSS_RATE: f64 = 25.0;
const LOSS_GENERATION: Duration = Duration::from_secs(2);
const LOSS_KILL_AT: f64 = 1.0 / 3.0;
/// How often the stream publishes its next batch.
const LOSS_TICK: Duration = Duration::from_millis(200);

struct LossRun {
    n: usize,
    /// Nodes (indices) of the two workers, and the one killed.
    worker_nodes: [usize; 2],
    killed: usize,
    /// Distinct terminal events when the node was killed.
    finished_at_kill: usize,
    first_event_after: Option<Duration>,
    moved_ready_after: Duration,
    moved_to: usize,
    /// Requests with a terminal event, and when the last arrived (from the
    /// first publish).
    finished: usize,
    last_event: Option<Duration>,
    stream: Duration,
    creates: u64,
    failed: usize,
    duplicates: usize,
    prefetch: u16,
    /// How long the killed node took to start again and rejoin.
    restart: Result<Duration, String>,
}

/// Two workers on different nodes, a steady stream of [`LOSS_GENERATION`]
/// tasks, and the node of one worker (not the leaders' node) killed.
async fn loss_run(
    cfg: &BenchConfig,
    nodes: &[LocalNode],
    target: &Target,
    n: usize,
) -> BenchResult<LossRun> {
    let sim = simulator(LOSS_GENERATION, EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::on(target, "clusterloss").await?;
    let sink = Sink::start(&dep, true).await?;
    let index_of = |port: u16| {
        nodes
            .iter()
            .position(|node| node.port() == port)
            .ok_or_else(|| format!("a worker names port {port}, no node of the cluster"))
    };
    let a = Worker::spawn(&dep, &sim, &[]).await?;
    let port_a = a.wait_broker_node(None, Duration::from_secs(30)).await?;
    // Workers shuffle the node list: start the second until it lands on
    // another node than the first.
    let mut b = Worker::spawn(&dep, &sim, &[]).await?;
    let mut port_b = b.wait_broker_node(None, Duration::from_secs(30)).await?;
    for _ in 0..20 {
        if port_b != port_a {
            break;
        }
        drop(b);
        b = Worker::spawn(&dep, &sim, &[]).await?;
        port_b = b.wait_broker_node(None, Duration::from_secs(30)).await?;
    }
    if port_a == port_b {
        return Err("the second worker kept landing on the first one's node".into());
    }
    let worker_nodes = [index_of(port_a)?, index_of(port_b)?];
    // The bench declared everything through node 0, which puts the leaders
    // there; kill a worker's node that leads none of the run's queues.
    let mut queues = dep.topology.queue_names();
    queues.push(dep.sink_queue.clone());
    let lead = leaders(&nodes[0], &queues)?;
    let killed = worker_nodes
        .into_iter()
        .find(|i| *i != 0 && !lead.iter().any(|l| l == nodes[*i].name()))
        .ok_or_else(|| format!("both workers' nodes lead a queue ({lead:?})"))?;
    let moved = if nodes[killed].port() == port_a {
        &a
    } else {
        &b
    };
    progress!(
        cfg,
        "  workers on nodes {} and {}; queue leaders on node(s) {:?}; node {killed} goes",
        worker_nodes[0],
        worker_nodes[1],
        nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| lead.iter().any(|l| l == node.name()))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    );

    let per_batch = ((LOSS_RATE * LOSS_TICK.as_secs_f64()).round() as usize).max(1);
    let batches = n.div_ceil(per_batch);
    let kill_batch = ((batches as f64 * LOSS_KILL_AT).round() as usize).clamp(1, batches);
    let (tx, mut rx) = watch::channel(0usize);
    let t0 = Instant::now();
    let publisher = async {
        // Owned here: the observer learns it if the stream stops early.
        let tx = tx;
        let mut tick = tokio::time::interval(LOSS_TICK);
        let mut sent = 0;
        for batch in 0..batches {
            tick.tick().await;
            let k = per_batch.min(n - sent);
            dep.publish_requests(k, &format!("loss{batch}"), "a cat turns its head")
                .await?;
            sent += k;
            tx.send_replace(batch + 1);
        }
        Ok::<Duration, Box<dyn Error + Send + Sync>>(t0.elapsed())
    };
    let observer = async {
        rx.wait_for(|b| *b >= kill_batch)
            .await
            .map_err(|_| "the stream stopped before the node loss")?;
        let finished_at_kill = sink.seen();
        let killed_wall = SystemTime::now();
        let killed_at = Instant::now();
        tokio::task::block_in_place(|| nodes[killed].kill())?;
        let moved_to = moved
            .wait_broker_node(Some(nodes[killed].port()), Duration::from_secs(120))
            .await?;
        let moved_ready_after = killed_at.elapsed();
        progress!(
            cfg,
            "  killed node {killed} with {finished_at_kill} of {n} finished; the moved worker is ready on port {moved_to} after {:.1} s",
            moved_ready_after.as_secs_f64()
        );
        Ok::<_, Box<dyn Error + Send + Sync>>((
            finished_at_kill,
            killed_wall,
            moved_ready_after,
            index_of(moved_to)?,
        ))
    };
    let (stream, observed) = tokio::join!(publisher, observer);
    let stream = stream?;
    let (finished_at_kill, killed_wall, moved_ready_after, moved_to) = observed?;
    let complete = sink.wait_for(n, Duration::from_secs(300)).await;
    if complete.is_ok() {
        // Let late duplicates (if any) arrive before counting.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let creates = sim.stats().tasks_created;
    stop_workers(vec![a, b]).await;
    // Back to three nodes before the run's queues are deleted: deleting a
    // quorum queue with a member down waits for that member.
    let restarted_at = Instant::now();
    let restart = tokio::task::block_in_place(|| {
        nodes[killed].restart(vidu_worker::local_broker::STARTUP_TIMEOUT)
    })
    .map(|()| restarted_at.elapsed());
    let s = sink.lock();
    let first_event_after = s
        .kept
        .iter()
        .filter_map(|a| a.at.duration_since(killed_wall).ok())
        .min();
    let last_event = s
        .last
        .map(|at| at.saturating_duration_since(t0))
        .filter(|_| complete.is_ok());
    let finished = s
        .kept
        .iter()
        .filter_map(|a| {
            let event: Value = serde_json::from_slice(&a.body).ok()?;
            event["data"]["request_id"].as_str().map(str::to_owned)
        })
        .collect::<HashSet<_>>()
        .len();
    Ok(LossRun {
        n,
        worker_nodes,
        killed,
        finished_at_kill,
        first_event_after,
        moved_ready_after,
        moved_to,
        finished,
        last_event,
        stream,
        creates,
        failed: s.failed,
        duplicates: s.duplicates,
        prefetch: dep.settings.amqp.prefetch,
        restart,
    })
}

/// `1 worker`, `2 workers`.
fn workers_label(n: usize) -> String {
    if n == 1 {
        "1 worker".into()
    } else {
        format!("{n} workers")
    }
}

/// One instant run per worker count on `target`, each the median of
/// `BENCH_REPEAT` runs.
async fn cluster_instant(
    cfg: &BenchConfig,
    target: &Target,
    workers: usize,
    n: usize,
    label: &str,
) -> BenchResult<(InstantRun, Vec<f64>)> {
    median_of(cfg, |_| async move {
        let run = instant_run_on(cfg, target, workers, n, None).await?;
        progress!(
            cfg,
            "cluster: {label}, {}: {:.0} tasks/s ({})",
            workers_label(workers),
            run.rate,
            run.cpu.describe("workers")
        );
        Ok(run)
    })
    .await
}

pub(crate) async fn scenario_cluster(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(CLUSTER_TASKS, 200);
    let mut rows = Vec::new();

    // The reference: one private node, started like the cluster's.
    progress!(
        cfg,
        "cluster: reference, 1 worker on a private single node, {n} instant tasks"
    );
    let single = async {
        let node = [start_node().await?];
        let target = private_target(&node, None);
        cluster_instant(cfg, &target, 1, n, "single node").await
    }
    .await;
    let single = match single {
        Ok((run, rates)) => {
            rows.push(Row::info(
                "9",
                format!("Single private node, quorum queues, 1 worker, generation 0 ({n} requests): the reference"),
                format!(
                    "**{:.0} tasks/s**{} · {}",
                    run.rate,
                    spread(&rates),
                    run.cpu.describe("worker")
                ),
            ));
            Some(run)
        }
        Err(e) => {
            rows.push(Row::failed("9", "Single private node, 1 worker", &e));
            None
        }
    };

    progress!(cfg, "cluster: starting {CLUSTER_NODES} nodes");
    let nodes = match start_cluster(CLUSTER_NODES).await {
        Ok(nodes) => nodes,
        Err(e) => {
            rows.push(Row::failed(
                "9",
                format!("A {CLUSTER_NODES}-node cluster"),
                &e,
            ));
            return rows;
        }
    };
    let group = u16::try_from(CLUSTER_NODES).ok();
    let target = private_target(&nodes, group);
    let mut by_workers: Vec<(usize, InstantRun)> = Vec::new();
    for workers in CLUSTER_WORKERS {
        progress!(
            cfg,
            "cluster: {} on {CLUSTER_NODES} nodes, {n} instant tasks",
            workers_label(workers)
        );
        match cluster_instant(cfg, &target, workers, n, "cluster").await {
            Ok((run, rates)) => {
                rows.push(Row::info(
                    "9",
                    format!(
                        "{CLUSTER_NODES}-node cluster, quorum queues on {CLUSTER_NODES} replicas, {}, generation 0 ({n} requests)",
                        workers_label(workers)
                    ),
                    format!(
                        "**{:.0} tasks/s**{} · {} on node {} (queue leaders on node 0) · {}",
                        run.rate,
                        spread(&rates),
                        if workers == 1 { "worker" } else { "workers" },
                        node_names(&nodes, &run.nodes),
                        run.cpu.describe("workers")
                    ),
                ));
                by_workers.push((workers, run));
            }
            Err(e) => rows.push(Row::failed(
                "9",
                format!("{CLUSTER_NODES}-node cluster, {}", workers_label(workers)),
                &e,
            )),
        }
    }
    let rate_of = |w: usize| {
        by_workers
            .iter()
            .find(|(k, _)| *k == w)
            .map(|(_, r)| r.rate)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    };
    rows.push(Row::info(
        "9",
        "  cluster with 1 worker ÷ single node",
        ratio(rate_of(1), single.as_ref().map(|r| r.rate)),
    ));
    rows.push(Row::info(
        "9",
        "  cluster with 2 workers ÷ cluster with 1 worker",
        ratio(rate_of(2), rate_of(1)),
    ));
    let per_task: Vec<String> = single
        .iter()
        .map(|r| format!("single: {}", r.cpu.per_task(n, "worker")))
        .chain(by_workers.iter().map(|(w, r)| {
            format!(
                "cluster, {}: {}",
                workers_label(*w),
                r.cpu.per_task(n, "workers")
            )
        }))
        .collect();
    rows.push(Row::info(
        "9",
        "  CPU ms per task (broker: every node)",
        per_task.join("; "),
    ));

    let loss_n = cfg.count(LOSS_TASKS, 100);
    progress!(
        cfg,
        "cluster: node loss, 2 workers, {loss_n} requests of {LOSS_GENERATION:?} at {LOSS_RATE}/s"
    );
    let title = format!(
        "Node loss: 2 workers on different nodes, {loss_n} requests of {} s at {LOSS_RATE:.0}/s, a worker's node (not the leaders') killed with SIGKILL",
        LOSS_GENERATION.as_secs()
    );
    match loss_run(cfg, &nodes, &target, loss_n).await {
        Ok(run) => {
            let extra = run.creates.saturating_sub(run.n as u64);
            progress!(
                cfg,
                "cluster: node loss: first event {} s after, worker moved in {:.1} s, {extra} extra creates",
                fmt_opt(run.first_event_after.map(|d| d.as_secs_f64()), 2),
                run.moved_ready_after.as_secs_f64()
            );
            rows.push(Row::info(
                "9",
                format!("{title}: first terminal event after the kill"),
                format!(
                    "**{} s** (workers on nodes {} and {}, node {} killed with {} of {} finished)",
                    fmt_opt(run.first_event_after.map(|d| d.as_secs_f64()), 2),
                    run.worker_nodes[0],
                    run.worker_nodes[1],
                    run.killed,
                    run.finished_at_kill,
                    run.n
                ),
            ));
            rows.push(Row::info(
                "9",
                "  the moved worker's `/readyz` names another node",
                format!(
                    "**{:.1} s** after the kill (node {})",
                    run.moved_ready_after.as_secs_f64(),
                    run.moved_to
                ),
            ));
            let window = u64::from(run.prefetch);
            rows.push(Row::target(
                "9",
                "  extra creates (simulator's tasks created − requests)",
                format!("**{extra}** ({} created)", run.creates),
                format!("≤ amqp.prefetch ({window}): one lost session"),
                extra <= window,
            ));
            rows.push(Row::target(
                "9",
                "  requests finished · failed · events delivered again (same id) · last event",
                format!(
                    "{} of {} · {} · {} · {} s from the first publish (stream {:.1} s)",
                    run.finished,
                    run.n,
                    run.failed,
                    run.duplicates,
                    fmt_opt(run.last_event.map(|d| d.as_secs_f64()), 1),
                    run.stream.as_secs_f64()
                ),
                "all, 0 failed",
                run.finished == run.n && run.failed == 0,
            ));
            rows.push(Row::info(
                "9",
                "  the killed node started again and back in the cluster after",
                match &run.restart {
                    Ok(d) => format!("{:.1} s", d.as_secs_f64()),
                    Err(e) => format!("did not complete: {e}"),
                },
            ));
        }
        Err(e) => rows.push(Row::failed("9", title, &e)),
    }
    progress!(cfg, "cluster: stopping the nodes");
    drop(nodes);
    rows
}
