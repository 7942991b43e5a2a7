//! A rolling upgrade from the previous release to this one, and the
//! rollback, with paid work in flight: old and new workers side by side on
//! one deployment, then only new, then old again. Nothing may be lost,
//! nothing created twice, nothing dead-lettered.
//!
//! Twice: with the shipped defaults (the quota learned), and with
//! `upstream.create_quota` set, whose ledger old and new workers share.
//!
//! It needs the previous release built: `tests/upgrade/run` builds it (by
//! default c741e23, the release before the learned quota and fleet-wide
//! request ids; 28894c8, the one before the deployment key, passes too) in a worktree of
//! its own and runs this test with `VIDU_PREVIOUS_WORKER` (its binary) and
//! `VIDU_PREVIOUS_ROOT` (its checkout, whose `config/default.toml` it
//! reads). Not part of `cargo test` (building another release takes
//! minutes); run alone without them, it fails saying so.

use std::{path::PathBuf, time::Duration};

use vidu_test_kit::*;
use vidu_worker::events::{SUBMITTED, SUCCEEDED};

/// Settings this release added: the previous one's configuration is strict
/// and would refuse them (the operator's configuration for an old pod
/// holds none of them either).
const NEW_SETTINGS: &[&str] = &[
    "VIDU_WORKER__AMQP__REPLY_TO_ALLOWED",
    "VIDU_WORKER__UPSTREAM__ALLOW_PLAIN_HTTP",
    "VIDU_WORKER__UPSTREAM__QUOTA_WINDOW",
];

struct Previous {
    binary: PathBuf,
    root: PathBuf,
}

fn previous() -> Previous {
    let get = |var: &str| {
        std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            panic!("{var} is not set: run tests/upgrade/run, which builds the previous release")
        })
    };
    let previous = Previous {
        binary: get("VIDU_PREVIOUS_WORKER"),
        root: get("VIDU_PREVIOUS_ROOT"),
    };
    assert!(previous.binary.is_file(), "{}", previous.binary.display());
    previous
}

async fn start_previous(env: &TestEnv, previous: &Previous) -> WorkerProcess {
    let worker = env.spawn_program(&previous.binary, &previous.root, NEW_SETTINGS);
    worker.wait_ready(Duration::from_secs(30)).await;
    worker
}

async fn stop(worker: WorkerProcess) {
    worker.signal("TERM");
    let mut worker = worker;
    assert_eq!(
        worker.wait_exit(Duration::from_secs(60)).await,
        Some(0),
        "exits 0 on SIGTERM"
    );
}

async fn submitted(tap: &EventTap, subjects: &[String]) {
    eventually(Duration::from_secs(90), "every task submitted", || async {
        subjects
            .iter()
            .all(|s| tap.for_subject(s).iter().any(|e| e.kind() == SUBMITTED))
            .then_some(())
    })
    .await;
}

async fn publish(env: &TestEnv, prefix: &str, n: usize) -> Vec<String> {
    let subjects: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, "in flight across versions")).await;
    }
    subjects
}

/// Every request of `subjects` ended once, succeeded, with one create
/// each; nothing was dead-lettered.
async fn all_done_once(env: &TestEnv, tap: &EventTap, subjects: &[String]) {
    let stats = assert_succeeded_once(env, tap, subjects, Duration::from_secs(180)).await;
    eprintln!(
        "{} requests: {} creates, {} duplicate creates",
        subjects.len(),
        stats.tasks_created,
        stats.duplicate_creates
    );
}

/// Two old workers with tasks in flight, a rolling upgrade while requests
/// arrive, then a rollback with the new release's tickets in flight.
async fn upgrade_and_rollback(name: &str, tweak: impl FnOnce(&mut vidu_worker::config::Settings)) {
    let previous = previous();
    let env = TestEnv::with(name, sim(Duration::from_secs(6)), |s| {
        s.polling.min_interval = Duration::from_millis(500);
        tweak(s);
    })
    .await;
    let tap = env.tap().await;

    // The fleet runs the previous release, with tasks in flight.
    let old_a = start_previous(&env, &previous).await;
    let old_b = start_previous(&env, &previous).await;
    let mut all = publish(&env, "before", 30).await;
    submitted(&tap, &all).await;

    // The rolling upgrade: a new pod surges, the old ones go one by one,
    // requests keep coming.
    let new_a = env.start_worker().await;
    all.extend(publish(&env, "during", 20).await);
    stop(old_a).await;
    let new_b = env.start_worker().await;
    stop(old_b).await;
    all_done_once(&env, &tap, &all).await;

    // The rollback, with tickets the new release wrote in flight.
    let back = publish(&env, "rollback", 30).await;
    submitted(&tap, &back).await;
    let old_c = start_previous(&env, &previous).await;
    stop(new_a).await;
    stop(new_b).await;
    all.extend(back);
    all_done_once(&env, &tap, &all).await;
    drop(old_c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_and_its_rollback_lose_nothing_and_create_nothing_twice() {
    upgrade_and_rollback("upgrade", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_with_a_configured_quota_shares_its_ledger() {
    upgrade_and_rollback("upgradequota", |s| {
        s.upstream.create_quota = vidu_worker::config::CreateQuota::parse("40/10s").ok();
    })
    .await;
}
