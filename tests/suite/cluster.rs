//! A three-node RabbitMQ cluster of the test's own (private nodes on free
//! ports, joined with `rabbitmqctl join_cluster`), two workers connected to
//! different nodes, and a node hard-stopped mid-flight: first a node a
//! worker is connected to, then (after it is back) the node holding the
//! leaders of the request and tracking queues. Every request still ends in
//! exactly one terminal id, extra creates stay within the documented window
//! (creates on the wire when a session was lost), and both workers end up
//! working. The time from the node loss to the first event after it, and
//! to the moved worker's readiness on another node, are printed.

use std::time::Duration;

use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::time::Instant;

use crate::common::{node::BrokerNode, *};

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
    let queue = format!("{}.clustertap", env.name);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    env.channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
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

/// The leader node (`rabbit@...` name) of each named queue.
fn leaders(node: &BrokerNode, queues: &[&str]) -> Vec<String> {
    let out = node.ctl_output(&["list_queues", "name", "leader", "--formatter", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
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

struct Outcome {
    /// Requests were still unfinished when the node went.
    killed_mid_flight: bool,
    extra_creates: u64,
    first_event_after: Duration,
    moved_ready_after: Option<Duration>,
}

/// One run: a fresh deployment on the cluster, two workers on different
/// nodes, `REQUESTS` requests, the node `victim` picks killed once a
/// quarter of them have finished.
async fn run(
    nodes: &[BrokerNode],
    label: &str,
    victim: impl Fn(&TestEnv, u16, u16) -> usize,
) -> (Outcome, usize) {
    let list = nodes
        .iter()
        .map(BrokerNode::url)
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
    let killed_port = nodes[index].port;
    let subjects: Vec<String> = (0..REQUESTS).map(|i| format!("{label}-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, "[sim:gen=4s]")).await;
    }
    tap.wait_finished(REQUESTS / 4, Duration::from_secs(180))
        .await;

    let events_before = tap.all().len();
    let killed_at = Instant::now();
    let killed = &nodes[index];
    tokio::task::block_in_place(|| killed.kill());
    let finished_at_kill = tap.finished_subjects().len();
    eprintln!(
        "{label}: killed {} (port {killed_port}; workers on {node_a} and {node_b}) with {} of {REQUESTS} finished",
        killed.name, finished_at_kill
    );
    eventually(
        Duration::from_secs(120),
        "an event after the node loss",
        || async { (tap.all().len() > events_before).then_some(()) },
    )
    .await;
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

    let deadline = Instant::now() + Duration::from_secs(240);
    while tap.finished_subjects().len() < REQUESTS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if tap.finished_subjects().len() < REQUESTS {
        let alive = nodes
            .iter()
            .find(|n| n.port != killed_port)
            .expect("a live node");
        let queues = tokio::task::block_in_place(|| {
            alive.ctl_output(&[
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
                "leader",
                "online",
            ])
        });
        for w in [&a, &b] {
            let warnings: Vec<String> = w
                .logs()
                .into_iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("broker"))
                .collect();
            eprintln!("worker {} log: {warnings:#?}", w.pid());
            eprintln!("worker /readyz: {:?}", w.get("/readyz").await);
        }
        panic!(
            "{label}: {} of {REQUESTS} finished; queues:\n{queues}",
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
        "{label}: {REQUESTS} requests, {terminal} terminal events, {} creates ({extra_creates} extra, {on_the_wire} on the wire at a session loss, {sessions_lost} sessions lost), first event {first_event_after:?} after the loss, moved worker ready {moved_ready_after:?} after it",
        stats.tasks_created
    );
    (
        Outcome {
            killed_mid_flight: finished_at_kill < REQUESTS,
            extra_creates,
            first_event_after,
            moved_ready_after,
        },
        index,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_loses_a_node_and_every_request_ends_once() {
    let nodes = tokio::task::spawn_blocking(|| BrokerNode::start_cluster(3))
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
            .position(|n| worker_nodes.contains(&n.port) && !lead.contains(&n.name))
            .expect("a worker on a node without leaders")
    })
    .await;
    assert!(
        first.moved_ready_after.is_some(),
        "a worker's node was lost"
    );
    assert!(first.killed_mid_flight, "the node was lost mid-flight");
    let restarted = &nodes[killed];
    tokio::task::block_in_place(|| restarted.restart());

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
            .position(|n| n.name == lead[0])
            .expect("the leader is a node of the cluster")
    })
    .await;
    assert!(second.killed_mid_flight, "the node was lost mid-flight");
    eprintln!(
        "node loss summary: worker's node: {} extra creates, first event after {:?}, worker moved in {:?}; leader node: {} extra creates, first event after {:?}, worker moved in {:?}",
        first.extra_creates,
        first.first_event_after,
        first.moved_ready_after,
        second.extra_creates,
        second.first_event_after,
        second.moved_ready_after
    );
    drop(nodes);
}
