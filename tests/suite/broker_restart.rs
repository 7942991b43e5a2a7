//! A broker restart mid-flight, on a private RabbitMQ node (so tests running
//! in parallel against the shared broker are not disturbed): the worker is
//! not restarted, recovers by itself, reports 503 while the broker is away,
//! and every request in flight reaches its terminal event.

use std::time::Duration;

use vidu_test_kit::*;
use vidu_worker::events::{SUBMITTED, SUCCEEDED};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_recovers_from_a_broker_restart_by_itself() {
    let node = tokio::task::spawn_blocking(private_node)
        .await
        .expect("private broker");
    let url = node.url();
    let env = TestEnv::with("restart", sim(Duration::from_secs(4)), |s| {
        s.amqp.url = url.clone().into();
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let n = 40;
    let subjects: Vec<String> = (0..n).map(|i| format!("r-{i}")).collect();
    for id in &subjects[..n / 2] {
        env.publish(&request(id, "[sim:gen=4s]")).await;
    }
    eventually(Duration::from_secs(30), "tasks in flight", || async {
        let submitted = tap.all().iter().filter(|e| e.kind() == SUBMITTED).count();
        (submitted >= n / 2).then_some(())
    })
    .await;
    assert!(
        tap.finished_subjects().is_empty(),
        "still generating when the broker stops"
    );

    let node = std::sync::Arc::new(node);
    let n2 = node.clone();
    tokio::task::spawn_blocking(move || n2.stop_app().expect("stop_app"))
        .await
        .expect("stop_app");
    let away = worker
        .wait_not_ready("broker", Duration::from_secs(30))
        .await;
    eprintln!("while away: {}", away.trim());
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself
    let n2 = node.clone();
    tokio::task::spawn_blocking(move || n2.start_app(STARTUP).expect("start_app"))
        .await
        .expect("start_app");
    let back = tokio::time::Instant::now();
    worker.wait_ready(Duration::from_secs(60)).await;
    let recovery = back.elapsed();
    eprintln!("broker restart: worker ready again {recovery:?} after start_app");

    // New requests after the restart flow too.
    publish_through(&node.url(), &env, &subjects[n / 2..], "after the restart").await;
    tap.wait_finished(n, Duration::from_secs(120)).await;
    for s in &subjects {
        let terminal: Vec<_> = tap
            .for_subject(s)
            .into_iter()
            .filter(SeenEvent::is_terminal)
            .collect();
        assert!(!terminal.is_empty(), "{s} finished");
        assert!(
            terminal.iter().all(|e| e.id() == terminal[0].id()),
            "{s}: one terminal id"
        );
        assert_eq!(terminal[0].kind(), SUCCEEDED);
    }
    assert!(
        worker.child.id().is_some(),
        "the worker was never restarted"
    );
    assert!(worker
        .logs()
        .iter()
        .any(|l| l.contains("reconnected to the broker")));
    drop(env);
    drop(node);
}
