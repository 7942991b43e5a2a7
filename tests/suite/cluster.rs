//! A three-node RabbitMQ cluster of the test's own (private nodes on free
//! ports, joined with `rabbitmqctl join_cluster`), two workers connected to
//! different nodes, and a node hard-stopped mid-flight: first a node a
//! worker is connected to, then (after it is back) the node holding the
//! leaders of the request and tracking queues. Every request still ends in
//! exactly one terminal id, extra creates stay within the documented window
//! (creates on the wire when a session was lost), and both workers end up
//! working. The time from the node loss to the first event after it, and
//! to the moved worker's readiness on another node, are printed. When the
//! broker holds expired tickets as dead letters after losing the tracking
//! queue's leader (a RabbitMQ 3.10 limit the README describes), the lost
//! node is restarted and every request must still end once.

use std::time::Duration;

use lapin::{
    options::QueueBindOptions,
    types::{AMQPValue, FieldTable},
};
use tokio::time::Instant;

use vidu_test_kit::*;

const REQUESTS: usize = 300;

/// The node a worker reports in `/readyz` (`ready (broker node HOST:PORT)`).
async fn node_of(worker: &WorkerProcess) -> Option<u16> {
    let (status, body) = worker.get("/readyz").await?;
    if status != 200 {
        return None;
    }
    let node = body.trim().strip_suffix(')')?.rsplit(':').next()?;
    node.parse().ok()
}

async fn wait_node_of(worker: &WorkerProcess, timeout: Duration) -> u16 {
    eventually(timeout, "the worker names its broker node", || {
        node_of(worker)
    })
    .await
}

/// A tap on a replicated (quorum) queue, so that it survives the loss of
/// any one node; its consumer reconnects through the node list.
async fn replicated_tap(env: &TestEnv) -> EventTap {
    let queue = env
        .declare_queue_with(
            "clustertap",
            queue_args(&[("x-queue-type", AMQPValue::LongString("quorum".into()))]),
        )
        .await
        .expect("declare the tap");
    env.channel
        .queue_bind(
            queue.as_str().into(),
            env.topology.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the tap");
    env.collect(&queue).await
}

/// `rabbitmqctl list_queues COLUMNS` on `node`, one JSON object per queue.
fn queue_rows(node: &LocalNode, columns: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["list_queues"];
    args.extend_from_slice(columns);
    args.extend_from_slice(&["--formatter", "json"]);
    serde_json::from_str(&node.ctl_output(&args).unwrap_or_default()).unwrap_or_default()
}

/// The leader node (`rabbit@...` name) of each named queue.
fn leaders(node: &LocalNode, queues: &[&str]) -> Vec<String> {
    let rows = queue_rows(node, &["name", "leader"]);
    queues
        .iter()
        .map(|q| {
            rows.iter()
                .find(|r| r["name"] == *q)
                .and_then(|r| r["leader"].as_str())
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

/// What a stalled run looks like from the broker and the workers: queue
/// depths, consumers and leaders from a live node, each worker's readiness,
/// events published and warnings, and the live nodes' warnings.
async fn diagnose(nodes: &[LocalNode], killed_port: u16, workers: &[&WorkerProcess]) -> String {
    let alive: Vec<&LocalNode> = nodes.iter().filter(|n| n.port() != killed_port).collect();
    let mut out = tokio::task::block_in_place(|| {
        alive[0]
            .ctl_output(&[
                "list_queues",
                "name",
                "messages",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
                "leader",
                "members",
                "online",
            ])
            .unwrap_or_else(|e| e)
    });
    for w in workers {
        let published = w.metric("vidu_worker_events_published_total", "").await;
        let warnings: Vec<String> = w
            .logs()
            .into_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("broker"))
            .collect();
        out.push_str(&format!(
            "\nworker {}: /readyz {:?}, {published} events published; log: {warnings:#?}",
            w.pid(),
            w.get("/readyz").await
        ));
    }
    for node in alive {
        let log = node.dir().join("log").join(format!("{}.log", node.name()));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("[warning]") || l.contains("[error]"))
            .collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        out.push_str(&format!(
            "\nnode {} warnings:\n{}",
            node.name(),
            tail.join("\n")
        ));
    }
    out
}

/// Messages the wait queues of this deployment hold as dead letters not yet
/// moved to the tracking queue (`messages` beyond ready and unacknowledged:
/// at-least-once dead-lettering keeps them in the source queue until the
/// target confirms them).
fn held_dead_letters(node: &LocalNode, env: &TestEnv) -> u64 {
    let rows = queue_rows(
        node,
        &[
            "name",
            "messages",
            "messages_ready",
            "messages_unacknowledged",
        ],
    );
    let waits: Vec<&str> = env
        .topology
        .wait_queues
        .iter()
        .map(|(_, n)| n.as_str())
        .collect();
    rows.iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| waits.contains(&n)))
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap_or(0);
            n("messages").saturating_sub(n("messages_ready") + n("messages_unacknowledged"))
        })
        .sum()
}

struct Outcome {
    /// Requests were still unfinished when the node went.
    killed_mid_flight: bool,
    extra_creates: u64,
    first_event_after: Duration,
    moved_ready_after: Option<Duration>,
    /// Tickets the broker held as dead letters until the lost node was
    /// back (see [`held_dead_letters`]): how many, when the node was
    /// restarted (after the loss), and when every request had finished
    /// (after the restart began).
    held_until_node_back: Option<(u64, Duration, Duration)>,
}

/// One run: a fresh deployment on the cluster, two workers on different
/// nodes, `REQUESTS` requests, the node `victim` picks killed once a
/// quarter of them have finished.
async fn run(
    nodes: &[LocalNode],
    label: &str,
    victim: impl Fn(&TestEnv, u16, u16) -> usize,
) -> (Outcome, usize) {
    let list = nodes
        .iter()
        .map(LocalNode::url)
        .collect::<Vec<_>>()
        .join(",");
    let env = TestEnv::with(label, sim(Duration::from_secs(4)), |s| {
        s.amqp.url = list.clone().into();
        s.amqp.quorum_initial_group_size = Some(3);
    })
    .await;
    let tap = replicated_tap(&env).await;
    let a = env.start_worker().await;
    let node_a = wait_node_of(&a, Duration::from_secs(30)).await;
    // Workers shuffle the node list: start the second until it lands on
    // another node than the first.
    let mut b = env.start_worker().await;
    let mut node_b = wait_node_of(&b, Duration::from_secs(30)).await;
    for _ in 0..20 {
        if node_b != node_a {
            break;
        }
        b.kill9().await;
        b = env.start_worker().await;
        node_b = wait_node_of(&b, Duration::from_secs(30)).await;
    }
    assert_ne!(node_a, node_b, "two workers on two nodes");

    // Chosen before the requests flow (`rabbitmqctl` takes seconds), so the
    // kill comes mid-flight.
    let index = tokio::task::block_in_place(|| victim(&env, node_a, node_b));
    let killed_port = nodes[index].port();
    let subjects: Vec<String> = (0..REQUESTS).map(|i| format!("{label}-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, "[sim:gen=4s]")).await;
    }
    tap.wait_finished(REQUESTS / 4, Duration::from_secs(180))
        .await;

    let events_before = tap.all().len();
    let killed_at = Instant::now();
    let killed = &nodes[index];
    tokio::task::block_in_place(|| killed.kill().expect("kill"));
    let finished_at_kill = tap.finished_subjects().len();
    eprintln!(
        "{label}: killed {} (port {killed_port}; workers on {node_a} and {node_b}) with {} of {REQUESTS} finished",
        killed.name(), finished_at_kill
    );
    // RabbitMQ 3.10's at-least-once dead-lettering can keep the address of
    // the tracking queue's lost leader and hold the wait queues' expired
    // tickets until that node is back (README, "Clusters"). When progress
    // stops and tickets are held so, the node is restarted, as an operator
    // or Kubernetes would, and every request must still end once. When
    // every unfinished ticket was waiting at the loss, not even a first
    // event comes until then.
    let alive = nodes
        .iter()
        .find(|n| n.port() != killed_port)
        .expect("a live node");
    let mut held_until_node_back: Option<(u64, Duration, Instant)> = None;
    let restart_if_held = |count: usize| {
        let held = tokio::task::block_in_place(|| held_dead_letters(alive, &env));
        (held > 0).then(|| {
            let at = killed_at.elapsed();
            eprintln!(
                "{label}: no progress for 30 s with {count} finished and {held} tickets held as dead letters; restarting {}",
                killed.name()
            );
            let restarted = Instant::now();
            tokio::task::block_in_place(|| killed.restart(STARTUP).expect("restart"));
            (held, at, restarted)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while tap.all().len() <= events_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if killed_at.elapsed() > Duration::from_secs(30) && held_until_node_back.is_none() {
            held_until_node_back = restart_if_held(tap.finished_subjects().len());
        }
    }
    if tap.all().len() <= events_before {
        let dump = diagnose(nodes, killed_port, &[&a, &b]).await;
        panic!("{label}: no event within 120 s of the node loss\n{dump}");
    }
    let first_event_after = killed_at.elapsed();
    let moved = [(&a, node_a), (&b, node_b)]
        .into_iter()
        .find(|(_, n)| *n == killed_port)
        .map(|(w, _)| w);
    let mut moved_ready_after = None;
    if let Some(w) = moved {
        let now_on = eventually(
            Duration::from_secs(120),
            "the moved worker's new node",
            || async { node_of(w).await.filter(|n| *n != killed_port) },
        )
        .await;
        moved_ready_after = Some(killed_at.elapsed());
        eprintln!("{label}: the worker on the lost node now uses port {now_on}");
    }

    let deadline = Instant::now() + Duration::from_secs(420);
    let (mut last_count, mut last_progress) = (0, Instant::now());
    while tap.finished_subjects().len() < REQUESTS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let count = tap.finished_subjects().len();
        if count != last_count {
            (last_count, last_progress) = (count, Instant::now());
        }
        if held_until_node_back.is_none() && last_progress.elapsed() > Duration::from_secs(30) {
            held_until_node_back = restart_if_held(count);
        }
    }
    let held_until_node_back =
        held_until_node_back.map(|(held, at, restarted)| (held, at, restarted.elapsed()));
    if tap.finished_subjects().len() < REQUESTS {
        let dump = diagnose(nodes, killed_port, &[&a, &b]).await;
        panic!(
            "{label}: {} of {REQUESTS} finished\n{dump}",
            tap.finished_subjects().len()
        );
    }
    // Let late duplicates (if any) arrive before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let terminal = one_terminal_id_each(&tap, &subjects);
    tap.assert_all_succeeded();
    let stats = env.sim.stats();
    let extra_creates = stats.tasks_created.saturating_sub(REQUESTS as u64);
    let mut on_the_wire = 0.0;
    for w in [&a, &b] {
        w.wait_ready(Duration::from_secs(60)).await;
        on_the_wire += w
            .metric("vidu_worker_creates_total", "accepted_after_delivery_lost")
            .await;
        let handled = w
            .metric(
                "vidu_worker_requests_received_total",
                "outcome=\"submitted\"",
            )
            .await;
        assert!(handled > 0.0, "both workers took requests");
    }
    if let Some(w) = moved {
        assert!(
            w.logs()
                .iter()
                .any(|l| l.contains("reconnected to the broker")),
            "the moved worker reconnected without a restart"
        );
    }
    let sessions_lost = [&a, &b]
        .iter()
        .map(|w| {
            w.logs()
                .iter()
                .filter(|l| l.contains("lost the broker session"))
                .count()
        })
        .sum::<usize>();
    // The documented window: a lost session's unacknowledged requests go
    // back to the queue, and another worker creates again those whose
    // create had been made (at most `amqp.prefetch` per lost session).
    let window = (sessions_lost * usize::from(env.settings.amqp.prefetch)) as u64;
    assert!(
        extra_creates <= window,
        "{extra_creates} extra creates, more than {sessions_lost} lost sessions × amqp.prefetch"
    );
    eprintln!(
        "{label}: {REQUESTS} requests, {terminal} terminal events, {} creates ({extra_creates} extra, {on_the_wire} on the wire at a session loss, {sessions_lost} sessions lost), first event {first_event_after:?} after the loss, moved worker ready {moved_ready_after:?} after it, tickets held as dead letters until the node was back (count, node restarted after the loss, all finished after the restart): {held_until_node_back:?}",
        stats.tasks_created
    );
    // The journal lost no record with the node: a copy of every request
    // published now is acknowledged as a duplicate, and nothing is created.
    let created_before = env.sim.stats().tasks_created;
    let duplicates = || async {
        let mut n = 0.0;
        for w in [&a, &b] {
            n += w
                .metric(
                    "vidu_worker_requests_received_total",
                    "outcome=\"duplicate\"",
                )
                .await;
        }
        n
    };
    let duplicates_before = duplicates().await;
    // Through a live node: the test's own connection may have been to the
    // lost one.
    publish_through(&alive.url(), &env, &subjects, "[sim:gen=4s]").await;
    eventually(
        Duration::from_secs(120),
        "every copy acknowledged as a duplicate",
        || async { (duplicates().await >= duplicates_before + REQUESTS as f64).then_some(()) },
    )
    .await;
    assert_eq!(
        env.sim.stats().tasks_created,
        created_before,
        "{label}: a request created before the node loss was created again"
    );
    eprintln!("{label}: {REQUESTS} copies published after the loss: 0 creates");
    (
        Outcome {
            killed_mid_flight: finished_at_kill < REQUESTS,
            extra_creates,
            first_event_after,
            moved_ready_after,
            held_until_node_back,
        },
        index,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_loses_a_node_and_every_request_ends_once() {
    let nodes = tokio::task::spawn_blocking(|| private_cluster(3))
        .await
        .expect("a three-node cluster");

    // Run 1: the node of a worker that holds no queue leader (the test
    // declares the topology through the first node, and RabbitMQ places a
    // new queue's leader on the declaring client's node).
    let (first, killed) = run(&nodes, "clusternode", |env, node_a, node_b| {
        let rq = env.topology.request_queue.clone();
        let tq = env.topology.tracking_queue.clone();
        let lead = leaders(&nodes[1], &[&rq, &tq]);
        eprintln!("clusternode: leaders of the request and tracking queues: {lead:?}");
        let worker_nodes = [node_a, node_b];
        nodes
            .iter()
            .position(|n| worker_nodes.contains(&n.port()) && !lead.iter().any(|l| l == n.name()))
            .expect("a worker on a node without leaders")
    })
    .await;
    assert!(
        first.moved_ready_after.is_some(),
        "a worker's node was lost"
    );
    assert!(first.killed_mid_flight, "the node was lost mid-flight");
    let restarted = &nodes[killed];
    tokio::task::block_in_place(|| restarted.restart(STARTUP).expect("restart"));

    // Run 2: the node holding the leaders of the request and tracking
    // queues.
    let (second, _) = run(&nodes, "clusterleader", |env, _, _| {
        let rq = env.topology.request_queue.clone();
        let tq = env.topology.tracking_queue.clone();
        let lead = leaders(&nodes[1], &[&rq, &tq]);
        eprintln!("clusterleader: leaders of the request and tracking queues: {lead:?}");
        assert_eq!(lead[0], lead[1], "one node leads both queues");
        nodes
            .iter()
            .position(|n| n.name() == lead[0])
            .expect("the leader is a node of the cluster")
    })
    .await;
    assert!(second.killed_mid_flight, "the node was lost mid-flight");
    eprintln!(
        "node loss summary: worker's node: {} extra creates, first event after {:?}, worker moved in {:?}, held {:?}; leader node: {} extra creates, first event after {:?}, worker moved in {:?}, held {:?}",
        first.extra_creates,
        first.first_event_after,
        first.moved_ready_after,
        first.held_until_node_back,
        second.extra_creates,
        second.first_event_after,
        second.moved_ready_after,
        second.held_until_node_back
    );
    drop(nodes);
}
