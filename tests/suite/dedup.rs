//! One request id, one create, whichever worker: copies a producer
//! publishes twice (at once, seconds apart, after the first succeeded),
//! copies taken by two workers at the same moment, a worker that joins
//! after thousands of creates, and a copy that is the only way back to a
//! task whose ticket was lost. Every create is counted by the simulator.

use std::{sync::Arc, time::Duration};

use lapin::options::BasicGetOptions;
use rand::seq::SliceRandom;
use serde_json::json;
use vidu_worker::{
    events::SUCCEEDED,
    journal::{Created, Journal},
    request::RequestId,
    signing::Signer,
    simulator::SimulatorConfig,
};

use vidu_test_kit::*;

const SECRET: &str = "a ticket secret for the dedup tests";

/// The duplicates the workers counted.
async fn duplicates(workers: &[&WorkerProcess]) -> f64 {
    let mut n = 0.0;
    for w in workers {
        n += w
            .metric(
                "vidu_worker_requests_received_total",
                "outcome=\"duplicate\"",
            )
            .await;
    }
    n
}

async fn wait_duplicates(workers: &[&WorkerProcess], n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while duplicates(workers).await < n as f64 {
        if tokio::time::Instant::now() > deadline {
            let mut outcomes = Vec::new();
            for w in workers {
                let (_, text) = w.get("/metrics").await.unwrap_or_default();
                outcomes.extend(
                    text.lines()
                        .filter(|l| l.starts_with("vidu_worker_requests_received_total"))
                        .map(str::to_owned),
                );
            }
            panic!("{n} copies were not all acknowledged as duplicates: {outcomes:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_published_twice_are_created_once_across_three_workers() {
    let env = TestEnv::new("twice", sim(Duration::from_secs(2))).await;
    let tap = env.tap().await;
    let workers = [
        env.start_worker().await,
        env.start_worker().await,
        env.start_worker().await,
    ];
    let n = 150;
    let subjects: Vec<String> = (0..n).map(|i| format!("twice-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, "published twice")).await;
    }
    // The second copies over the next 20 s, in another order: some while
    // the first is being created, some after it succeeded.
    let mut again = subjects.clone();
    again.shuffle(&mut rand::rng());
    let gap = Duration::from_secs(20) / n as u32;
    for id in &again {
        env.publish(&request(id, "published twice")).await;
        tokio::time::sleep(gap).await;
    }
    tap.wait_finished(n, Duration::from_secs(120)).await;
    let refs: Vec<&WorkerProcess> = workers.iter().collect();
    wait_duplicates(&refs, n).await;
    one_terminal_id_each(&tap, &subjects);
    tap.assert_all_succeeded();
    let stats = env.sim.stats();
    eprintln!(
        "published twice: {n} requests, {} copies, 3 workers: {} creates, {} duplicates acknowledged",
        2 * n,
        stats.tasks_created,
        duplicates(&refs).await
    );
    assert_eq!(stats.tasks_created, n as u64, "one create per request id");
    assert_eq!(stats.duplicate_creates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_taken_at_the_same_moment_by_two_workers_make_one_create() {
    // A slow create: the second copy is taken while the first is on the
    // wire.
    let env = TestEnv::new(
        "sametime",
        SimulatorConfig {
            create_latency: Duration::from_millis(1500),
            ..sim(Duration::from_secs(1))
        },
    )
    .await;
    let tap = env.tap().await;
    let a = env.start_worker().await;
    let b = env.start_worker().await;
    let n = 10;
    let subjects: Vec<String> = (0..n).map(|i| format!("same-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, "two at once")).await;
        env.publish(&request(id, "two at once")).await;
    }
    tap.wait_finished(n, Duration::from_secs(90)).await;
    wait_duplicates(&[&a, &b], n).await;
    one_terminal_id_each(&tap, &subjects);
    tap.assert_all_succeeded();
    let stats = env.sim.stats();
    eprintln!(
        "two at once: {n} requests published twice back to back, 2 workers: {} creates",
        stats.tasks_created
    );
    assert_eq!(stats.tasks_created, n as u64, "one create per request id");
}

/// The deployment's journal as a worker holding `SECRET` writes it.
fn journal(env: &TestEnv) -> Journal {
    let signer = Signer::new(
        &secrecy::SecretString::from(SECRET),
        &[],
        &env.settings.amqp.request_queue,
        true,
    );
    Journal::new(
        env.topology.journal_queue.clone(),
        Arc::new(signer),
        Duration::from_secs(60),
        Duration::from_secs(3600),
    )
}

/// Records that request `id` was created as `task_id` at `at`.
async fn write_created(
    journal: &Journal,
    env: &TestEnv,
    id: &str,
    task_id: String,
    at: chrono::DateTime<chrono::Utc>,
) {
    let record = Created {
        v: 1,
        request_id: Some(RequestId::parse(id).expect("an id")),
        task_id,
        model: "vidu-q3-pro-i2v".into(),
        at,
    };
    journal
        .record(&env.publisher, &record)
        .await
        .expect("a record written");
}

/// Writes `n` created records into the deployment's journal, as workers
/// holding `SECRET` would have.
async fn past_creates(env: &TestEnv, n: usize) {
    let journal = journal(env);
    let now = chrono::Utc::now();
    for i in 0..n {
        let at = now - chrono::Duration::milliseconds((n - i) as i64);
        write_created(
            &journal,
            env,
            &format!("past-{i}"),
            format!("past-task-{i}"),
            at,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_joins_after_10000_creates_creates_none_of_them_again() {
    let env = TestEnv::with("joinlate", sim(Duration::from_secs(1)), |s| {
        s.tickets.secret = Some(SECRET.to_owned().into());
    })
    .await;
    let tap = env.tap().await;
    let started = std::time::Instant::now();
    past_creates(&env, 10_000).await;
    eprintln!("10,000 created records written in {:?}", started.elapsed());
    // Copies of 200 of them, and 5 new requests, wait before any worker.
    let mut fresh = Vec::new();
    for i in (0..10_000).step_by(50) {
        env.publish(&request(&format!("past-{i}"), "created long ago"))
            .await;
    }
    for i in 0..5 {
        let id = format!("fresh-{i}");
        env.publish(&request(&id, "new")).await;
        fresh.push(id);
    }
    let worker = env.start_worker().await;
    tap.wait_finished(fresh.len(), Duration::from_secs(60))
        .await;
    wait_duplicates(&[&worker], 200).await;
    let stats = env.sim.stats();
    eprintln!(
        "joined after 10,000 creates: {} creates for 5 new and 200 old requests",
        stats.tasks_created
    );
    assert_eq!(stats.tasks_created, 5, "none of the old ids created again");
    assert!(
        tap.all().iter().all(|e| e.subject().starts_with("fresh-")),
        "no events for the copies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_copy_tracks_the_task_whose_ticket_was_lost() {
    let env = TestEnv::with("ticketlost", sim(Duration::from_secs(1)), |s| {
        s.tickets.secret = Some(SECRET.to_owned().into());
    })
    .await;
    let tap = env.tap().await;
    // A worker created "lost-1" and recorded it, then died before its
    // ticket was written: the task exists, the journal knows it, and the
    // request was never acknowledged.
    let input = json!({
        "images": ["https://example.com/cat.png"],
        "prompt": "the ticket was lost lost-1",
        "duration": 5
    });
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v3/async/vidu-q3-pro-i2v", env.sim.base_url()))
        .bearer_auth(&env.api_key)
        .json(&input)
        .send()
        .await
        .expect("the simulator answers")
        .json()
        .await
        .expect("json");
    let task_id = created["task_id"].as_str().expect("a task id").to_owned();
    write_created(
        &journal(&env),
        &env,
        "lost-1",
        task_id.clone(),
        chrono::Utc::now(),
    )
    .await;
    // The request, taken and never acknowledged: the broker redelivers it.
    env.publish(&request("lost-1", "the ticket was lost")).await;
    let channel = env
        .publisher
        .connection()
        .create_channel()
        .await
        .expect("channel");
    let taken = channel
        .basic_get(
            env.topology.request_queue.as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .expect("basic.get");
    assert!(taken.is_some(), "the request was taken");
    channel
        .close(200, "the worker died".into())
        .await
        .expect("close");

    let worker = env.start_worker().await;
    let done = eventually(
        Duration::from_secs(60),
        "the task tracked again",
        || async {
            let done = tap.terminal().into_iter().find(|e| e.subject() == "lost-1");
            if done.is_none() && worker.logs().iter().any(|l| l.contains("dead-lettering")) {
                panic!("{:#?}", worker.logs());
            }
            done
        },
    )
    .await;
    assert_eq!(done.kind(), SUCCEEDED, "{:?}", done.body);
    assert_eq!(
        done.body["data"]["task_id"].as_str(),
        Some(task_id.as_str()),
        "the task the journal named is the one delivered"
    );
    wait_duplicates(&[&worker], 1).await;
    assert_eq!(env.sim.stats().tasks_created, 1, "never created again");
}
