//! `lanes` (rows numbered 12 in the report): an interactive request
//! against a bulk backlog under a small create quota. The same backlog and
//! arrivals twice: once in one FIFO request queue, once with an
//! interactive lane of weight 8 beside a bulk lane of weight 1. Measured:
//! each interactive request's wait from its publish to its `submitted`
//! event, and the bulk requests created meanwhile.

use std::time::{Duration, Instant};

use vidu_test_kit::{request, EventTap};
use vidu_worker::{
    events::SUBMITTED,
    simulator::{AccountQuota, EtaMode},
};

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment},
    machine::wait_quiet,
    report::Row,
    stats::Percentiles,
    workers::{start_workers, stop_workers},
    BenchResult,
};

/// Creates a minute, the account's and the deployment's.
const QUOTA_PER_MIN: u32 = 120;
/// Bulk requests queued first.
const BULK: usize = 150;
/// Interactive requests, one every [`ARRIVAL_EVERY`].
const INTERACTIVE: usize = 12;
const ARRIVAL_EVERY: Duration = Duration::from_secs(5);
/// An interactive request waits at most a few slots (a slot every 0.5 s).
const TARGET_P95_S: f64 = 5.0;

struct Run {
    waits: Percentiles,
    bulk_meanwhile: usize,
}

pub(crate) async fn scenario_lanes(cfg: &BenchConfig) -> Vec<Row> {
    progress!(
        cfg,
        "lanes: {INTERACTIVE} interactive requests against {BULK} bulk, {QUOTA_PER_MIN}/min, FIFO then lanes 8:1"
    );
    let title = format!(
        "{INTERACTIVE} interactive requests, one every {} s, behind {BULK} bulk at {QUOTA_PER_MIN}/min: publish to `submitted`",
        ARRIVAL_EVERY.as_secs()
    );
    let mut rows = Vec::new();
    match lanes_run(cfg, false).await {
        Ok(fifo) => {
            progress!(cfg, "lanes: FIFO {}", fifo.waits.describe());
            rows.push(Row::info(
                "12",
                format!("{title}, one FIFO queue"),
                format!(
                    "{} ({} bulk created meanwhile)",
                    fifo.waits.describe(),
                    fifo.bulk_meanwhile
                ),
            ));
        }
        Err(e) => rows.push(Row::failed("12", format!("{title}, one FIFO queue"), &e)),
    }
    match lanes_run(cfg, true).await {
        Ok(lanes) => {
            progress!(cfg, "lanes: 8:1 {}", lanes.waits.describe());
            rows.push(Row::target(
                "12",
                "  the same with lanes interactive = 8, bulk = 1",
                format!(
                    "{} ({} bulk created meanwhile)",
                    lanes.waits.describe(),
                    lanes.bulk_meanwhile
                ),
                format!("p95 ≤ {TARGET_P95_S} s"),
                lanes.waits.p95 <= TARGET_P95_S,
            ));
        }
        Err(e) => rows.push(Row::failed("12", "  the same with lanes", &e)),
    }
    rows
}

async fn lanes_run(cfg: &BenchConfig, lanes: bool) -> BenchResult<Run> {
    let sim = simulator(Duration::from_millis(300), EtaMode::Honest).await?;
    sim.simulator()
        .set_quota(Some(AccountQuota::per_minute(QUOTA_PER_MIN)));
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, if lanes { "lanes" } else { "fifo" }).await?;
    let tap: EventTap = dep.tap().await;
    let mut env = vec![(
        "VIDU_WORKER__UPSTREAM__CREATE_QUOTA",
        format!("{QUOTA_PER_MIN}/min"),
    )];
    let rq = dep.topology.request_queue.clone();
    let (bulk_queue, live_queue) = if lanes {
        env.push(("VIDU_WORKER__AMQP__LANES", "interactive=8,bulk=1".into()));
        let (bulk, live) = (format!("{rq}.lane.bulk"), format!("{rq}.lane.interactive"));
        dep.delete_on_drop(&bulk);
        dep.delete_on_drop(&live);
        dep.delete_on_drop(&format!("{rq}.cancel"));
        (bulk, live)
    } else {
        (rq.clone(), rq.clone())
    };
    // The worker declares the lanes it is configured with.
    let workers = start_workers(&dep, &sim, 1, &env).await?;
    for i in 0..BULK {
        dep.publish_to(&bulk_queue, &request(&format!("bulk-{i}"), "bulk"))
            .await;
    }
    let mut published = Vec::with_capacity(INTERACTIVE);
    for i in 0..INTERACTIVE {
        let id = format!("live-{i}");
        dep.publish_to(&live_queue, &request(&id, "interactive"))
            .await;
        published.push((id, Instant::now()));
        tokio::time::sleep(ARRIVAL_EVERY).await;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut waits = Vec::with_capacity(INTERACTIVE);
    for (id, at) in &published {
        let submitted = loop {
            if let Some(e) = tap
                .all()
                .into_iter()
                .find(|e| e.kind() == SUBMITTED && e.subject() == id.as_str())
            {
                break e;
            }
            if Instant::now() > deadline {
                stop_workers(workers).await;
                return Err(format!("{id} was not created within 300 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        waits.push(submitted.at.duration_since(*at).as_secs_f64());
    }
    let last = published.last().map_or_else(Instant::now, |(_, at)| *at);
    let bulk_meanwhile = tap
        .all()
        .iter()
        .filter(|e| e.kind() == SUBMITTED && e.subject().starts_with("bulk-") && e.at <= last)
        .count();
    stop_workers(workers).await;
    Ok(Run {
        waits: Percentiles::of(waits).ok_or("no interactive request")?,
        bulk_meanwhile,
    })
}
