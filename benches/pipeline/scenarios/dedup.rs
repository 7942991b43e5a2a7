//! `dedup` (rows numbered 10 in the report): what remembering created
//! request ids costs: a journal of created records written by the bench, a
//! worker joining after them (catch-up time and memory), the broker's
//! memory, and copies of some of those requests, which must cost no create.

use std::time::{Duration, Instant};

use chrono::Utc;
use lapin::{options::BasicPublishOptions, types::ShortString, BasicProperties};
use vidu_worker::simulator::EtaMode;

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment},
    machine::{broker_pid, proc_status_mib, wait_quiet},
    report::Row,
    workers::Worker,
    BenchResult,
};

/// Request ids the fleet remembers in the dedup scenario.
const DEDUP_IDS: usize = 100_000;
/// The ticket secret of the dedup scenario's deployment (the bench signs
/// the created records it writes with it, as a worker would).
const DEDUP_SECRET: &str = "a bench secret of some length";

struct DedupRun {
    ids: usize,
    write_secs: f64,
    broker_rss_delta: Option<f64>,
    catch_up_empty: f64,
    catch_up_full: f64,
    rss_empty: Option<f64>,
    rss_full: Option<f64>,
    copies: usize,
    creates_for_copies: u64,
}

/// What remembering created request ids costs: a deployment's journal
/// holding `DEDUP_IDS` created records (written by the bench, signed like
/// a worker's), a worker that joins then (time until ready, which is when
/// it has read them all; its RSS against a worker on an empty journal),
/// and the broker's memory; then copies of some of them, which must cost
/// no create.
pub(crate) async fn scenario_dedup(cfg: &BenchConfig) -> Vec<Row> {
    let n = cfg.count(DEDUP_IDS, 1000);
    progress!(cfg, "dedup: {n} created request ids in the journal");
    match dedup_run(cfg, n).await {
        Ok(run) => {
            let per_id = match (run.rss_empty, run.rss_full) {
                (Some(a), Some(b)) => format!(
                    "{:.0} bytes per id ({:.1} → {:.1} MiB)",
                    (b - a) * 1024.0 * 1024.0 / run.ids as f64,
                    a,
                    b
                ),
                _ => "n/a".into(),
            };
            vec![
                Row::info(
                    "10",
                    format!(
                        "{} created records written to the journal (confirmed)",
                        run.ids
                    ),
                    format!(
                        "{:.1} s ({:.0} records/s); broker RSS {}",
                        run.write_secs,
                        run.ids as f64 / run.write_secs,
                        run.broker_rss_delta
                            .map_or("n/a".into(), |d| format!("{d:+.1} MiB"))
                    ),
                ),
                Row::target(
                    "10",
                    format!(
                        "A worker joining after {} creates: start to ready (all read)",
                        run.ids
                    ),
                    format!(
                        "**{:.1} s** (on an empty journal: {:.1} s)",
                        run.catch_up_full, run.catch_up_empty
                    ),
                    format!("≤ {TARGET_DEDUP_CATCH_UP_SECS} s"),
                    run.catch_up_full <= TARGET_DEDUP_CATCH_UP_SECS,
                ),
                Row::info("10", "  its memory for the remembered ids", per_id),
                Row::target(
                    "10",
                    format!(
                        "  copies of {} of those requests published then: creates",
                        run.copies
                    ),
                    run.creates_for_copies.to_string(),
                    "0",
                    run.creates_for_copies == 0,
                ),
            ]
        }
        Err(e) => vec![Row::failed("10", "Remembering created request ids", &e)],
    }
}

/// Longest acceptable catch-up of a worker joining after `DEDUP_IDS`.
const TARGET_DEDUP_CATCH_UP_SECS: f64 = 10.0;

async fn dedup_run(cfg: &BenchConfig, n: usize) -> BenchResult<DedupRun> {
    use vidu_worker::{
        journal::{Created, CREATED_RECORD},
        request::RequestId,
        signing::Signer,
    };
    let sim = simulator(Duration::from_millis(200), EtaMode::Honest).await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "dedup").await?;
    let secret = [("VIDU_WORKER__TICKETS__SECRET", DEDUP_SECRET.to_owned())];
    // A worker on an empty journal: its start and memory.
    let started = Instant::now();
    let empty = Worker::spawn(&dep, &sim, &secret).await?;
    let catch_up_empty = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_empty = empty.rss_mib();
    empty.stop().await;

    let signer = Signer::new(
        &secrecy::SecretString::from(DEDUP_SECRET),
        &[],
        &dep.settings.amqp.request_queue,
        true,
    );
    let broker = broker_pid();
    let broker_before = broker.and_then(|p| proc_status_mib(p, "VmRSS"));
    let started = Instant::now();
    let now = Utc::now();
    let records = (0..n).map(|i| {
        let record = Created {
            v: 1,
            request_id: Some(RequestId::parse(&format!("past-{i}"))?),
            task_id: uuid::Uuid::new_v4().to_string(),
            model: "vidu-q3-pro-i2v".into(),
            at: now - chrono::Duration::milliseconds((n - i) as i64),
        };
        let body = serde_json::to_vec(&record)?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(CREATED_RECORD.into())
            .with_headers(signer.sign(&body).headers());
        Ok((body, props))
    });
    dep.publish_pipelined(&dep.topology.journal_queue, records)
        .await?;
    let write_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker_after = broker.and_then(|p| proc_status_mib(p, "VmRSS"));
    progress!(cfg, "dedup: {n} records written in {write_secs:.1} s");

    let started = Instant::now();
    let full = Worker::spawn(&dep, &sim, &secret).await?;
    let catch_up_full = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_full = full.rss_mib();
    progress!(cfg, "dedup: a worker joined in {catch_up_full:.1} s");

    // Copies of some of them: acknowledged, never created.
    let before = sim.stats();
    let copies = 200.min(n);
    let step = (n / copies).max(1);
    let mut published = 0;
    for i in (0..n).step_by(step).take(copies) {
        let body = serde_json::json!({
            "request_id": format!("past-{i}"),
            "input": {"images": ["https://example.com/cat.png"], "prompt": "again", "duration": 5}
        });
        dep.producer
            .basic_publish(
                ShortString::from(""),
                dep.topology.request_queue.as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body)?,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        published += 1;
    }
    full.wait_for(
        Duration::from_secs(60),
        "did not take every copy",
        || async {
            let dups = full.metric("vidu_worker_requests_received_total").await?;
            (dups >= published as f64).then_some(())
        },
    )
    .await?;
    let creates_for_copies = sim.stats().tasks_created - before.tasks_created;
    full.stop().await;
    Ok(DedupRun {
        ids: n,
        write_secs,
        broker_rss_delta: broker_before.zip(broker_after).map(|(a, b)| b - a),
        catch_up_empty,
        catch_up_full,
        rss_empty,
        rss_full,
        copies: published,
        creates_for_copies,
    })
}
