//! The paid step under pressure: broker restarts and network cuts while
//! creates are rate-limited, hostile properties on a refused request, an
//! unreadable success, how long a request is held under a quota, and the
//! moments of failure (a
//! delivery lost while its request waits, ticket and event publishes the
//! broker refuses, `Retry-After`). Counts come from the simulator over real
//! HTTP and the real broker.

use std::{sync::Arc, time::Duration};

use lapin::{
    options::QueueDeleteOptions,
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use serde_json::json;
use tokio::time::Instant;
use vidu_test_kit::*;
use vidu_worker::{
    broker::{ERROR_HEADER, ORIGINAL_QUEUE_HEADER},
    config::CreateQuota,
    events::{FAILED, SUBMITTED, SUCCEEDED},
    simulator::{AuthMode, EndpointFaults, Fault, FaultPlan},
};

fn quota(text: &str) -> Option<CreateQuota> {
    Some(CreateQuota::parse(text).expect("quota"))
}

fn assert_session_kept(worker: &WorkerProcess) {
    let lost: Vec<String> = worker
        .logs()
        .into_iter()
        .filter(|l| l.contains("lost the broker session"))
        .collect();
    assert!(lost.is_empty(), "the session was torn down: {lost:?}");
}

async fn submitted(tap: &EventTap) -> usize {
    tap.all().iter().filter(|e| e.kind() == SUBMITTED).count()
}

/// Publishes `n` requests named `prefix-i` and returns their ids.
async fn publish_requests(env: &TestEnv, prefix: &str, n: usize, prompt: &str) -> Vec<String> {
    let subjects: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, prompt)).await;
    }
    subjects
}

/// Extra creates (tasks created beyond one per request), and the creates
/// the workers saw on the wire when their delivery was lost.
async fn extra_and_on_the_wire(env: &TestEnv, n: usize, workers: &[&WorkerProcess]) -> (u64, f64) {
    let stats = env.sim.stats();
    let extra = stats.tasks_created.saturating_sub(n as u64);
    assert_eq!(
        extra, stats.duplicate_creates,
        "every extra task is a re-created request"
    );
    let mut on_wire = 0.0;
    for w in workers {
        on_wire += w
            .metric("vidu_worker_creates_total", "accepted_after_delivery_lost")
            .await;
    }
    (extra, on_wire)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_creates_are_rate_limited_creates_nothing_twice() {
    let node = Arc::new(
        tokio::task::spawn_blocking(private_node)
            .await
            .expect("private broker"),
    );
    let url = node.url();
    let env = TestEnv::with("rlrestart", sim(Duration::from_secs(2)), |s| {
        s.amqp.url = url.clone().into();
        s.upstream.create_quota = quota("40/s");
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let n = 300;
    let subjects = publish_requests(&env, "rr", n, "restart").await;
    eventually(Duration::from_secs(30), "creates under way", || async {
        (env.sim.stats().tasks_created >= 60).then_some(())
    })
    .await;
    let at_stop = env.sim.stats().tasks_created;
    let n2 = node.clone();
    tokio::task::spawn_blocking(move || n2.stop_app().expect("stop_app"))
        .await
        .expect("stop_app");
    worker
        .wait_not_ready("broker", Duration::from_secs(30))
        .await;
    let n2 = node.clone();
    tokio::task::spawn_blocking(move || n2.start_app(STARTUP).expect("start_app"))
        .await
        .expect("start_app");
    tap.wait_finished(n, Duration::from_secs(240)).await;
    let events = one_terminal_id_each(&tap, &subjects);
    tap.assert_all_succeeded();
    let (extra, on_wire) = extra_and_on_the_wire(&env, n, &[&worker]).await;
    eprintln!(
        "broker restart: {n} requests, restart after {at_stop} creates, {extra} extra creates, {on_wire} creates on the wire at the drop, {events} terminal events"
    );
    assert!(
        extra as f64 <= on_wire,
        "{extra} extra creates, but only {on_wire} were on the wire"
    );
    assert!(extra <= 5, "{extra} extra creates");
    assert!(at_stop < n as u64, "the restart came while creating");
    drop(env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_connection_closes_while_creates_are_rate_limited_create_nothing_twice() {
    let env = TestEnv::with("rlclose", sim(Duration::from_secs(2)), |s| {
        s.upstream.create_quota = quota("20/s");
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let n = 300;
    let subjects = publish_requests(&env, "fc", n, "cut").await;
    eventually(Duration::from_secs(30), "creates under way", || async {
        (env.sim.stats().tasks_created >= 40).then_some(())
    })
    .await;
    let mut at_cuts = Vec::new();
    for cut in 0..2 {
        if cut > 0 {
            // The next cut is for the next session: wait until the worker
            // has one (on a loaded machine reconnecting can take seconds).
            eventually(Duration::from_secs(60), "the worker reconnects", || async {
                let reconnects = worker
                    .logs()
                    .iter()
                    .filter(|l| l.contains("reconnected to the broker"))
                    .count();
                (reconnects >= cut).then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        at_cuts.push(env.sim.stats().tasks_created);
        let pid = worker.pid();
        let closed = tokio::task::spawn_blocking(move || close_worker_connection(None, pid))
            .await
            .expect("rabbitmqctl");
        assert!(closed, "the worker's connection was found and closed");
    }
    tap.wait_finished(n, Duration::from_secs(240)).await;
    let events = one_terminal_id_each(&tap, &subjects);
    tap.assert_all_succeeded();
    let reconnects = worker
        .logs()
        .iter()
        .filter(|l| l.contains("reconnected to the broker"))
        .count();
    assert!(reconnects >= 2, "{reconnects} reconnects");
    let (extra, on_wire) = extra_and_on_the_wire(&env, n, &[&worker]).await;
    eprintln!(
        "forced closes: {n} requests, cuts after {at_cuts:?} creates, {extra} extra creates, {on_wire} creates on the wire at the cuts, {events} terminal events"
    );
    assert!(
        at_cuts.iter().all(|c| *c < n as u64),
        "both cuts came while creating"
    );
    assert!(
        extra as f64 <= on_wire,
        "{extra} extra creates, but only {on_wire} were on the wire"
    );
    assert!(extra <= 5, "{extra} extra creates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_with_user_id_and_expiration_is_dead_lettered_without_them() {
    let node = Arc::new(
        tokio::task::spawn_blocking(private_node)
            .await
            .expect("private broker"),
    );
    node.add_user("producer", "producer-pw")
        .expect("rabbitmqctl");
    node.set_permissions("/", "producer", [".*", ".*", ".*"])
        .expect("rabbitmqctl");
    let url = node.url();
    let env = TestEnv::with("userid", sim(Duration::from_millis(300)), |s| {
        s.amqp.url = url.clone().into();
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    // The producer publishes as itself, with its own user_id (which the
    // broker checks), an expiration, a priority and a header.
    let producer = Arc::new(
        lapin::Connection::connect(
            &node.url_for("producer", "producer-pw", "%2f"),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("producer connects"),
    );
    let publisher = vidu_worker::broker::Publisher::open(producer)
        .await
        .expect("publisher");
    let mut headers = FieldTable::default();
    headers.insert("x-team".into(), AMQPValue::LongString("growth".into()));
    let body = serde_json::to_vec(&json!({
        "request_id": "uid-1", "input": {"images": ["https://example.com/cat.png"], "duration": 99}
    }))
    .expect("json");
    publisher
        .publish(
            "",
            &env.topology.request_queue,
            &body,
            BasicProperties::default()
                .with_user_id("producer".into())
                .with_expiration("600000".into())
                .with_priority(9)
                .with_correlation_id("corr-uid".into())
                .with_message_id("msg-uid".into())
                .with_headers(headers)
                .with_delivery_mode(2),
            true,
        )
        .await
        .expect("publish");
    let failed = tap.wait_terminal("uid-1", Duration::from_secs(30)).await;
    assert_eq!(failed.kind(), FAILED);
    assert_eq!(failed.body["data"]["error"]["code"], "invalid_request");
    assert_eq!(failed.correlation_id.as_deref(), Some("corr-uid"));
    let dead = eventually(Duration::from_secs(10), "the dead-letter copy", || async {
        let d = env.drain_dead().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 1);
    let (headers, data, props) = &dead[0];
    assert_eq!(data, &body, "the body is kept");
    assert!(headers[ERROR_HEADER].starts_with("invalid_request: input.duration"));
    assert_eq!(
        headers[ORIGINAL_QUEUE_HEADER],
        env.topology.request_queue.as_str()
    );
    assert!(props.user_id().is_none(), "no user_id: {props:?}");
    assert!(props.expiration().is_none(), "no expiration: {props:?}");
    assert!(props.priority().is_none(), "no priority: {props:?}");
    assert!(
        !headers.contains_key("x-team"),
        "producer headers are not copied"
    );
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some("msg-uid")
    );
    assert_eq!(
        props.correlation_id().as_ref().map(|m| m.as_str()),
        Some("corr-uid")
    );
    // The worker keeps its session and goes on working.
    env.publish(&request("after", "still working")).await;
    assert_eq!(
        tap.wait_terminal("after", Duration::from_secs(30))
            .await
            .kind(),
        SUCCEEDED
    );
    assert_session_kept(&worker);
    assert_eq!(tap.for_subject("uid-1").len(), 1, "one failed event");
    drop(env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_success_fails_the_request_once_and_never_creates_it_again() {
    let env = TestEnv::new("unconfirmed", sim(Duration::from_millis(300))).await;
    env.sim.set_faults(FaultPlan {
        create: EndpointFaults {
            script: vec![Fault::AcceptThenGarbage],
            ..EndpointFaults::default()
        },
        ..FaultPlan::default()
    });
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    env.publish(&request("garbled", "unreadable answer")).await;
    let failed = tap.wait_terminal("garbled", Duration::from_secs(30)).await;
    assert_eq!(failed.kind(), FAILED);
    assert_eq!(failed.body["data"]["error"]["code"], "upstream_unconfirmed");
    let message = failed.body["data"]["error"]["message"]
        .as_str()
        .expect("message");
    assert!(
        message.contains("<html>upstream proxy error</html>"),
        "the excerpt of the answer: {message}"
    );
    assert!(message.contains("not created again"), "{message}");
    let dead = eventually(Duration::from_secs(10), "the dead-letter copy", || async {
        let d = env.drain_dead().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(dead[0].0[ERROR_HEADER].starts_with("upstream_unconfirmed: "));
    // Retries would come within a second or two; none comes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats = env.sim.stats();
    assert_eq!(stats.create_calls, 1, "exactly one create");
    assert_eq!(stats.tasks_created, 1);
    assert_eq!(
        worker
            .metric("vidu_worker_creates_total", "outcome=\"unconfirmed\"")
            .await,
        1.0
    );
    let errors = worker
        .logs()
        .iter()
        .filter(|l| l.contains("\"level\":\"ERROR\"") && l.contains("no readable task id"))
        .count();
    assert_eq!(errors, 1, "logged at error level once");
    assert_eq!(tap.for_subject("garbled").len(), 1, "one event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_quota_of_two_a_minute_requests_wait_in_the_queue_not_in_the_worker() {
    let env = TestEnv::with("hold", sim(Duration::from_millis(300)), |s| {
        s.upstream.create_quota = quota("2/min");
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let n = 50;
    publish_requests(&env, "h", n, "slow quota").await;
    let started = Instant::now();
    // For 55 s: exactly the quota's two creates, and never more than one
    // request held unacknowledged.
    let mut most_held = 0;
    while started.elapsed() < Duration::from_secs(55) {
        let held = worker.metric("vidu_worker_in_flight_requests", "").await;
        most_held = most_held.max(held as u64);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        env.sim.stats().create_calls,
        2,
        "two creates in the first minute"
    );
    assert!(most_held <= 1, "{most_held} requests held at once");
    env.wait_total_messages(
        &env.topology.request_queue,
        n as u64 - 2,
        Duration::from_secs(20),
    )
    .await;
    // The next window opens a minute after the first creates.
    eventually(
        Duration::from_secs(30),
        "the next window's creates",
        || async { (env.sim.stats().create_calls >= 4).then_some(()) },
    )
    .await;
    tap.wait_finished(4, Duration::from_secs(30)).await;
    // Every request was held for less than the bound: the time of its own
    // create and ticket, not of the quota.
    let bound = 5.0;
    let held = worker
        .metric("vidu_worker_request_hold_seconds_count", "")
        .await;
    let within = worker
        .metric("vidu_worker_request_hold_seconds_bucket", "le=\"5.0\"")
        .await;
    eprintln!(
        "quota 2/min, {n} queued: at most {most_held} held at once, {held} requests held, {within} within {bound} s, {} creates and {} 429s",
        env.sim.stats().create_calls,
        env.sim.stats().answered("create:429")
    );
    assert!(held >= 4.0, "{held} requests taken");
    assert_eq!(within, held, "every request was held less than {bound} s");
}

/// A request that waits at the gate (the balance is refused) when its
/// delivery is lost is never created by that worker: its redelivered copy
/// is the one created. The request has no id of its own, so nothing but
/// the delivery check can tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_when_its_delivery_is_lost_is_not_created() {
    let env = TestEnv::new("lostwait", sim(Duration::from_millis(300))).await;
    env.sim.set_auth(AuthMode::BillingExhausted);
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let body = serde_json::to_vec(&json!({
        "input": {"images": ["https://example.com/cat.png"], "prompt": "no id of its own"}
    }))
    .expect("json");
    env.publish_raw(&body, BasicProperties::default()).await;
    eventually(Duration::from_secs(30), "the request probing", || async {
        (env.sim.stats().answered("create:400") >= 1).then_some(())
    })
    .await;
    let pid = worker.pid();
    assert!(
        tokio::task::spawn_blocking(move || close_worker_connection(None, pid))
            .await
            .expect("rabbitmqctl"),
        "closed the worker's connection"
    );
    eventually(Duration::from_secs(30), "the reconnect", || async {
        worker
            .logs()
            .iter()
            .any(|l| l.contains("reconnected to the broker"))
            .then_some(())
    })
    .await;
    // The redelivered copy probes too.
    let before = env.sim.stats().answered("create:400");
    eventually(
        Duration::from_secs(60),
        "a probe after the reconnect",
        || async { (env.sim.stats().answered("create:400") > before).then_some(()) },
    )
    .await;
    env.sim.set_auth(AuthMode::Accept);
    eventually(Duration::from_secs(90), "a terminal event", || async {
        (!tap.terminal().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats = env.sim.stats();
    assert_eq!(stats.tasks_created, 1, "one task, for the live delivery");
    assert_eq!(tap.finished_subjects().len(), 1, "one request ended");
    assert!(
        worker.metric("vidu_worker_creates_total", "not_sent").await >= 1.0,
        "the lost delivery's create was not sent"
    );
    // And the lost delivery did not spin: its probes stopped with it.
    assert!(
        stats.create_calls < 20,
        "{} create calls for one request",
        stats.create_calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_stays_unacknowledged_while_its_terminal_event_is_refused() {
    let env = TestEnv::new("refuseevents", sim(Duration::from_secs(5))).await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let n = 10;
    let subjects = publish_requests(&env, "re", n, "events refused").await;
    eventually(Duration::from_secs(30), "every task submitted", || async {
        (submitted(&tap).await >= n).then_some(())
    })
    .await;
    let refusing = refuse_events(&env).await;
    // Every task ends upstream while the broker refuses its terminal event:
    // the tickets are held, unacknowledged, and polled no more.
    eventually(
        Duration::from_secs(30),
        "every task done upstream",
        || async {
            let views = env.sim.tasks_matching("events refused");
            (views.len() == n && views.iter().all(|v| v.done_at.is_some())).then_some(())
        },
    )
    .await;
    env.steady_total_messages(
        &env.topology.tracking_queue,
        n as u64,
        Duration::from_secs(20),
    )
    .await;
    let polls = env.sim.stats().poll_calls;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.sim.stats().poll_calls,
        polls,
        "no polls while the event is retried"
    );
    assert_eq!(
        worker
            .metric("vidu_worker_events_published_total", "succeeded")
            .await,
        0.0,
        "no terminal event confirmed yet"
    );
    env.channel
        .queue_delete(refusing.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("lift the refusal");
    tap.wait_finished(n, Duration::from_secs(90)).await;
    one_terminal_id_each(&tap, &subjects);
    tap.assert_all_succeeded();
    eventually(
        Duration::from_secs(30),
        "every terminal event confirmed",
        || async {
            (worker
                .metric("vidu_worker_events_published_total", "succeeded")
                .await
                >= n as f64)
                .then_some(())
        },
    )
    .await;
    env.wait_total_messages(&env.topology.tracking_queue, 0, Duration::from_secs(30))
        .await;
}

/// `rabbitmqctl set_policy` on the shared broker for this deployment's
/// tracking and wait queues; cleared on drop.
struct RefusingPolicy(String);

impl RefusingPolicy {
    fn set(env: &TestEnv) -> Self {
        let name = format!("{}-refuse", env.name);
        let pattern = format!(
            "^{}\\.(tracking|wait\\..+)$",
            env.topology.request_queue.replace('.', "\\.")
        );
        let ok = shared_broker()
            .rabbitmqctl()
            .args([
                "-q",
                "set_policy",
                "--apply-to",
                "queues",
                &name,
                &pattern,
                r#"{"max-length":0,"overflow":"reject-publish"}"#,
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "set_policy");
        Self(name)
    }

    fn clear(&self) {
        let _ = shared_broker()
            .rabbitmqctl()
            .args(["-q", "clear_policy", &self.0])
            .status();
    }
}

impl Drop for RefusingPolicy {
    fn drop(&mut self) {
        self.clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_unacknowledged_while_their_tickets_are_refused() {
    // Classic queues: a quorum queue lets the first publishes of a new
    // publisher past its length limit, a classic queue refuses them all.
    let env = TestEnv::with("refusetickets", sim(Duration::from_millis(500)), |s| {
        s.amqp.queue_type = vidu_worker::config::QueueType::Classic;
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let policy = RefusingPolicy::set(&env);
    let (_, longest) = env.topology.wait_queues.last().expect("tiers").clone();
    eventually(Duration::from_secs(10), "the policy to refuse", || async {
        env.publisher
            .publish("", &longest, b"probe", BasicProperties::default(), true)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let n = 8;
    let subjects = publish_requests(&env, "rt", n, "tickets refused").await;
    eventually(Duration::from_secs(10), "every task created", || async {
        (env.sim.stats().tasks_created >= n as u64).then_some(())
    })
    .await;
    // Created, but not recorded: every request is still in the queue,
    // held unacknowledged, and none has been created twice.
    assert_eq!(
        worker.metric("vidu_worker_in_flight_requests", "").await,
        n as f64
    );
    env.steady_total_messages(
        &env.topology.request_queue,
        n as u64,
        Duration::from_secs(12),
    )
    .await;
    assert_eq!(env.sim.stats().tasks_created, n as u64);
    assert!(tap.terminal().is_empty());
    policy.clear();
    tap.wait_finished(n, Duration::from_secs(120)).await;
    one_terminal_id_each(&tap, &subjects);
    tap.assert_all_succeeded();
    assert_eq!(
        env.sim.stats().tasks_created,
        n as u64,
        "none created twice"
    );
    assert_eq!(
        worker.metric("vidu_worker_untracked_tasks_total", "").await,
        0.0
    );
    env.wait_total_messages(&env.topology.request_queue, 0, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_spaces_the_next_create_and_the_next_poll() {
    let env = TestEnv::new("retryafter", sim(Duration::from_secs(1))).await;
    let tap = env.tap().await;
    // After the start-up probe of the key, which is a poll too.
    let _worker = env.start_worker().await;
    let three = Fault::RateLimited {
        retry_after_secs: 3,
    };
    env.sim.set_faults(FaultPlan {
        create: EndpointFaults {
            script: vec![three],
            ..EndpointFaults::default()
        },
        poll: EndpointFaults {
            script: vec![three],
            ..EndpointFaults::default()
        },
    });
    env.publish(&request("ra", "retry after")).await;
    tap.wait_terminal("ra", Duration::from_secs(60)).await;
    let calls = env.sim.calls();
    let creates: Vec<_> = calls.iter().filter(|c| c.endpoint == "create").collect();
    assert_eq!(creates.len(), 2, "{creates:?}");
    assert_eq!(creates[0].outcome, "429");
    let create_gap = creates[1].at_ms - creates[0].at_ms;
    let task = creates[1]
        .task_id
        .clone()
        .expect("the second create made the task");
    let polls: Vec<_> = calls
        .iter()
        .filter(|c| c.endpoint == "poll" && c.task_id.as_deref() == Some(task.as_str()))
        .collect();
    let refused = polls
        .iter()
        .position(|c| c.outcome == "429")
        .expect("a poll answered 429");
    let next = polls.get(refused + 1).expect("a poll after the 429");
    let poll_gap = next.at_ms - polls[refused].at_ms;
    eprintln!("Retry-After 3: next create after {create_gap} ms, next poll after {poll_gap} ms");
    assert!(create_gap >= 3000, "create retried after {create_gap} ms");
    assert!(poll_gap >= 3000, "poll retried after {poll_gap} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_give_their_quota_slots_to_the_next_request() {
    let env = TestEnv::with("slotreuse", sim(Duration::from_millis(300)), |s| {
        s.upstream.create_quota = quota("5/10s");
    })
    .await;
    let tap = env.tap().await;
    for i in 0..10 {
        env.publish(&json!({"request_id": format!("bad-{i}"), "input": {"images": []}}))
            .await;
    }
    env.publish(&request("good", "after ten invalid ones"))
        .await;
    let published = Instant::now();
    let worker = env.start_worker().await;
    let submitted = eventually(
        Duration::from_secs(40),
        "the valid request's create",
        || async {
            tap.for_subject("good")
                .into_iter()
                .find(|e| e.kind() == SUBMITTED)
        },
    )
    .await;
    let waited = published.elapsed();
    eprintln!(
        "the valid request was created {waited:?} after it was published behind 10 invalid ones"
    );
    tap.wait_finished(11, Duration::from_secs(30)).await;
    // Invalid requests are never created; their slots served the valid one,
    // which went out in the first window, not the third.
    assert_eq!(env.sim.stats().create_calls, 1);
    assert!(
        waited < Duration::from_secs(9),
        "created within the first 10 s window: {waited:?}"
    );
    assert_eq!(submitted.subject(), "good");
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_creates_in_a_row_close_the_gate_until_a_create_is_confirmed() {
    // Creates paced as a backlog under a quota drains (two a second), so
    // that answers arrive between them.
    let env = TestEnv::with("unconfirmedgate", sim(Duration::from_millis(300)), |s| {
        s.upstream.create_quota = quota("2/1s");
    })
    .await;
    env.sim.set_faults(FaultPlan {
        create: EndpointFaults {
            rate: 1.0,
            mix: vec![Fault::AcceptThenGarbage],
            ..EndpointFaults::default()
        },
        ..FaultPlan::default()
    });
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let subjects = publish_requests(&env, "garbled", 10, "a mangling proxy").await;
    let reason = worker
        .wait_not_ready("unconfirmed", Duration::from_secs(30))
        .await;
    eprintln!("/readyz: {reason}");
    // The gate closed after three in a row; its probes are single creates
    // at growing intervals, not the backlog.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let paid = env.sim.stats().tasks_created;
    eprintln!("{paid} creates answered unreadably before the gate held them");
    assert!(paid <= 5, "{paid} possibly billed creates");
    assert!(
        worker.metric("vidu_worker_untracked_tasks_total", "").await >= 3.0,
        "counted as untracked"
    );
    assert!(
        env.depth(&env.topology.request_queue).await >= 5,
        "the rest wait"
    );
    // The proxy is fixed: a probe is confirmed and the backlog flows.
    env.sim.clear_faults();
    tap.wait_finished(subjects.len(), Duration::from_secs(90))
        .await;
    worker.wait_ready(Duration::from_secs(10)).await;
    // Each request was created once: the unreadable answers failed
    // `upstream_unconfirmed`, the rest succeeded.
    one_terminal_id_each(&tap, &subjects);
    for e in tap.terminal() {
        if e.kind() != SUCCEEDED {
            assert_eq!(e.body["data"]["error"]["code"], "upstream_unconfirmed");
        }
    }
    assert_eq!(env.sim.stats().tasks_created, subjects.len() as u64);
}
