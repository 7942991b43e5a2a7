//! The operator's ordinary day, with tasks in flight: a restart with a new
//! API key, a rolling key rotation (old and new workers side by side, then
//! only new), three workers holding three keys of one account, a rolling
//! rotation of the ticket secret, and the end of `accept_unsigned`. Every
//! task here is paid for, so each case counts: every request reaches one
//! terminal event id, none is created twice, none is dead-lettered.

use std::time::Duration;

use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use serde_json::json;
use vidu_test_kit::*;
use vidu_worker::{
    broker::ERROR_HEADER,
    events::{SUBMITTED, SUCCEEDED},
    signing::SIGNATURE_HEADER,
    simulator::SimulatorConfig,
};

const KEY_1: &str = "sk-rotation-first-0001";
const KEY_2: &str = "sk-rotation-second-0002";
const KEY_3: &str = "sk-rotation-third-0003";

/// One account with three keys, tasks of `generation`.
fn account(generation: Duration) -> SimulatorConfig {
    SimulatorConfig {
        api_key: Some(KEY_1.into()),
        other_keys: vec![KEY_2.into(), KEY_3.into()],
        ..sim(generation)
    }
}

async fn all_submitted(tap: &EventTap, n: usize) {
    eventually(Duration::from_secs(60), "every task submitted", || async {
        let submitted = tap.all().iter().filter(|e| e.kind() == SUBMITTED).count();
        (submitted >= n).then_some(())
    })
    .await;
}

/// Every request succeeded once, with one create each and no dead letter.
async fn nothing_lost_nothing_paid_twice(env: &TestEnv, tap: &EventTap, subjects: &[String]) {
    assert_succeeded_once(env, tap, subjects, Duration::from_secs(120)).await;
}

async fn publish_all(env: &TestEnv, prefix: &str, n: usize) -> Vec<String> {
    let subjects: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, "in flight while keys change"))
            .await;
    }
    subjects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_new_api_key_finishes_every_ticket_in_flight() {
    let env = TestEnv::with("newkey", account(Duration::from_secs(6)), |s| {
        s.upstream.api_key = Some(KEY_1.into());
    })
    .await;
    let tap = env.tap().await;
    let first = env.start_worker_with(&[("NOVITA_API_KEY", KEY_1)]).await;
    let subjects = publish_all(&env, "newkey", 5).await;
    all_submitted(&tap, subjects.len()).await;
    assert!(tap.finished_subjects().is_empty(), "still in flight");
    // The operator rotates the key: stop, start with the new one only.
    first.signal("TERM");
    let mut first = first;
    assert_eq!(first.wait_exit(Duration::from_secs(30)).await, Some(0));
    let second = env.start_worker_with(&[("NOVITA_API_KEY", KEY_2)]).await;
    nothing_lost_nothing_paid_twice(&env, &tap, &subjects).await;
    assert_eq!(
        second
            .metric("vidu_worker_tickets_rejected_total", "")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_key_rotation_loses_nothing() {
    let env = TestEnv::with("rollkey", account(Duration::from_secs(4)), |s| {
        s.upstream.api_key = Some(KEY_1.into());
        s.polling.min_interval = Duration::from_millis(500);
    })
    .await;
    let tap = env.tap().await;
    // The shipped Deployment surges one new pod beside the old ones.
    let old = env.start_worker_with(&[("NOVITA_API_KEY", KEY_1)]).await;
    let new = env
        .start_worker_with(&[
            ("NOVITA_API_KEY", KEY_2),
            ("VIDU_WORKER__TICKETS__PREVIOUS_SECRETS", KEY_1),
        ])
        .await;
    let subjects = publish_all(&env, "rollkey", 20).await;
    all_submitted(&tap, subjects.len()).await;
    // Side by side for a while, then the old pod goes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    old.signal("TERM");
    nothing_lost_nothing_paid_twice(&env, &tap, &subjects).await;
    drop(new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_holding_three_keys_of_one_account_finish_every_ticket() {
    let env = TestEnv::with("threekeys", account(Duration::from_secs(2)), |s| {
        s.upstream.api_key = Some(KEY_1.into());
        s.polling.min_interval = Duration::from_millis(500);
    })
    .await;
    let tap = env.tap().await;
    let mut workers = Vec::new();
    for key in [KEY_1, KEY_2, KEY_3] {
        workers.push(env.start_worker_with(&[("NOVITA_API_KEY", key)]).await);
    }
    let subjects = publish_all(&env, "threekeys", 60).await;
    nothing_lost_nothing_paid_twice(&env, &tap, &subjects).await;
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_rotation_of_the_ticket_secret_loses_nothing() {
    let old_secret = "ticket-secret-before-0123456789";
    let new_secret = "ticket-secret-after-9876543210";
    let env = TestEnv::with("rollsecret", sim(Duration::from_secs(4)), |s| {
        s.tickets.secret = Some(old_secret.into());
        s.polling.min_interval = Duration::from_millis(500);
    })
    .await;
    let tap = env.tap().await;
    let old = env.start_worker().await;
    let new = env
        .start_worker_with(&[
            ("VIDU_WORKER__TICKETS__SECRET", new_secret),
            ("VIDU_WORKER__TICKETS__PREVIOUS_SECRETS", old_secret),
        ])
        .await;
    let subjects = publish_all(&env, "rollsecret", 20).await;
    all_submitted(&tap, subjects.len()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    old.signal("TERM");
    nothing_lost_nothing_paid_twice(&env, &tap, &subjects).await;
    drop(new);
}

/// An unsigned ticket (what a version before signatures wrote, or what
/// anyone with write access to the vhost can write) for a task that exists.
async fn unsigned_ticket(env: &TestEnv, request_id: &str, task_id: &str) {
    let now = chrono::Utc::now();
    let body = serde_json::to_vec(&json!({
        "v": 1,
        "request_id": request_id,
        "task_id": task_id,
        "model": "vidu-q3-pro-i2v",
        "received_at": now.to_rfc3339(),
        "submitted_at": now.to_rfc3339(),
        "deadline": (now + chrono::Duration::hours(2)).to_rfc3339(),
        "next_poll_at": now.to_rfc3339(),
    }))
    .expect("json");
    env.publisher
        .publish(
            "",
            &env.topology.tracking_queue,
            &body,
            BasicProperties::default().with_delivery_mode(2),
            true,
        )
        .await
        .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_unsigned_tickets_ends_at_its_deadline() {
    let env = TestEnv::new("unsigned", sim(Duration::from_millis(300))).await;
    let tap = env.tap().await;
    // A real task, so that an accepted unsigned ticket has something to poll.
    let probe = env.start_worker().await;
    env.publish(&request("real", "a real task")).await;
    let done = tap.wait_terminal("real", Duration::from_secs(30)).await;
    let task_id = done.body["data"]["task_id"]
        .as_str()
        .expect("task id")
        .to_owned();
    drop(probe);

    // Still within the migration: the unsigned ticket is read, with a
    // warning that says until when.
    let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let open = env
        .start_worker_with(&[("VIDU_WORKER__TICKETS__ACCEPT_UNSIGNED", &until)])
        .await;
    unsigned_ticket(&env, "migrating", &task_id).await;
    let accepted = tap
        .wait_terminal("migrating", Duration::from_secs(30))
        .await;
    assert_eq!(accepted.kind(), SUCCEEDED);
    assert!(
        open.logs()
            .iter()
            .any(|l| l.contains("accepting unsigned tickets") && l.contains(&until[..16])),
        "the worker says it accepts unsigned tickets, and until when"
    );
    drop(open);

    // After the deadline the same ticket is refused.
    let past = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let closed = env
        .start_worker_with(&[("VIDU_WORKER__TICKETS__ACCEPT_UNSIGNED", &past)])
        .await;
    unsigned_ticket(&env, "too-late", &task_id).await;
    let dead = eventually(Duration::from_secs(30), "the dead letter", || async {
        let d = env.drain_dead().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert!(
        dead[0].0[ERROR_HEADER].contains("(unsigned)"),
        "{:?}",
        dead[0].0
    );
    assert!(tap.for_subject("too-late").is_empty(), "no event");
    drop(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_no_worker_can_verify_is_kept_with_its_signature() {
    let env = TestEnv::with("unverified", sim(Duration::from_millis(300)), |s| {
        s.tickets.secret = Some("the-secret-of-this-deployment-01".into());
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    // The worker's start-up key probe is a poll of its own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let polls = env.sim.stats().poll_calls;
    // Signed with a secret this deployment does not hold (a rotation the
    // operator has not finished, or a forger): never acted on, but not
    // thrown away either.
    let now = chrono::Utc::now();
    let body = serde_json::to_vec(&json!({
        "v": 1, "request_id": "foreign", "task_id": "task-foreign",
        "model": "vidu-q3-pro-i2v",
        "received_at": now.to_rfc3339(), "submitted_at": now.to_rfc3339(),
        "deadline": (now + chrono::Duration::hours(2)).to_rfc3339(),
        "next_poll_at": now.to_rfc3339(),
    }))
    .expect("json");
    let other = vidu_worker::signing::Signer::new(
        &"a-secret-this-worker-does-not-hold".into(),
        &[],
        &env.topology.request_queue,
        true,
    );
    let mut headers = FieldTable::default();
    headers.insert(
        SIGNATURE_HEADER.into(),
        AMQPValue::LongString(LongString::from(other.sign(&body).legacy)),
    );
    env.publisher
        .publish(
            "",
            &env.topology.tracking_queue,
            &body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
            true,
        )
        .await
        .expect("publish");
    eventually(
        Duration::from_secs(30),
        "the worker to count the ticket it cannot verify",
        || async {
            (worker
                .metric("vidu_worker_tickets_unverified_total", "")
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dead = env.drain_dead().await;
    assert!(
        dead.is_empty(),
        "not dead-lettered: {:?}",
        dead.iter().map(|(h, _, _)| h).collect::<Vec<_>>()
    );
    assert_eq!(env.sim.stats().poll_calls, polls, "never polled");
    assert!(tap.all().is_empty(), "no event");
    assert!(
        worker
            .logs()
            .iter()
            .any(|l| l.contains("signed with a key this worker does not hold")),
        "the log says why"
    );
}
