//! `quotachange` (rows numbered 7c in the report): a simulated account
//! quota that moves while one worker works through a backlog it cannot
//! drain: 429s per request, and how many windows the learned quota takes to
//! follow each change.

use std::time::{Duration, Instant};

use vidu_worker::simulator::{Simulator, SimulatorConfig};

use crate::{
    config::BenchConfig,
    harness::{Deployment, Sink, API_KEY},
    machine::wait_quiet,
    report::Row,
    workers::{start_workers, stop_workers},
    BenchResult, QUOTA_WINDOW,
};

/// The moving quota: creates per minute in each phase.
const MOVING_QUOTA: [u32; 3] = [40, 10, 40];
/// How long each phase lasts.
const MOVING_PHASE: Duration = Duration::from_secs(180);
const TARGET_MOVING_429_PER_REQUEST: f64 = 0.5;
const TARGET_FOLLOW_WINDOWS: f64 = 2.0;

pub(crate) async fn scenario_quota_change(cfg: &BenchConfig) -> Vec<Row> {
    let phase = cfg.duration(MOVING_PHASE, Duration::from_secs(90));
    let title = format!(
        "A quota that moves: {} creates a minute, then {}, then {}, {} s each, one worker, learned",
        MOVING_QUOTA[0],
        MOVING_QUOTA[1],
        MOVING_QUOTA[2],
        phase.as_secs()
    );
    progress!(cfg, "quota change: {title}");
    match quota_change_run(cfg, phase).await {
        Ok((n, refused, follow)) => {
            let per_request = refused as f64 / n as f64;
            let mut rows = vec![Row::target(
                "7c",
                format!("{title}: 429s per request"),
                format!("{per_request:.2} ({refused} for {n} requests)"),
                format!("≤ {TARGET_MOVING_429_PER_REQUEST}"),
                per_request <= TARGET_MOVING_429_PER_REQUEST,
            )];
            for (quota, windows) in follow {
                rows.push(match windows {
                    Some(w) => Row::target(
                        "7c",
                        format!(
                            "  windows until the learned quota followed the change to {quota}/min"
                        ),
                        format!("{w:.1}"),
                        format!("≤ {TARGET_FOLLOW_WINDOWS}"),
                        w <= TARGET_FOLLOW_WINDOWS,
                    ),
                    None => Row::target(
                        "7c",
                        format!(
                            "  windows until the learned quota followed the change to {quota}/min"
                        ),
                        "not within the phase",
                        format!("≤ {TARGET_FOLLOW_WINDOWS}"),
                        false,
                    ),
                });
            }
            rows
        }
        Err(e) => vec![Row::failed("7c", title, &e)],
    }
}

/// Returns the requests made, the 429s, and for each change how many
/// windows the learned quota took to come within one create of it.
async fn quota_change_run(
    cfg: &BenchConfig,
    phase: Duration,
) -> BenchResult<(usize, u64, Vec<(u32, Option<f64>)>)> {
    use vidu_worker::simulator::AccountQuota;
    let quota = |creates| AccountQuota {
        creates,
        window: QUOTA_WINDOW,
        retry_after: false,
    };
    let sim = Simulator::start(SimulatorConfig {
        api_key: Some(API_KEY.into()),
        generation_time: Duration::from_secs(1),
        quota: Some(quota(MOVING_QUOTA[0])),
        ..SimulatorConfig::default()
    })
    .await?;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "quotachange").await?;
    let sink = Sink::start(&dep, false).await?;
    let workers = start_workers(
        &dep,
        &sim,
        1,
        &[(
            "VIDU_WORKER__UPSTREAM__CREATE_RETRY_BUDGET",
            "10m".to_owned(),
        )],
    )
    .await?;
    // A backlog the whole run cannot drain.
    let minutes = phase.as_secs_f64() / 60.0;
    let n = MOVING_QUOTA
        .iter()
        .map(|q| (f64::from(*q) * minutes).ceil() as usize)
        .sum::<usize>()
        + 40;
    dep.publish_requests(n, "move", "a cat turns its head")
        .await?;
    let mut follow = Vec::new();
    for (i, creates) in MOVING_QUOTA.iter().enumerate() {
        if i > 0 {
            sim.set_quota(Some(quota(*creates)));
        }
        let changed = Instant::now();
        let mut followed = None;
        while changed.elapsed() < phase {
            let learned = workers[0]
                .metric("vidu_worker_create_quota_learned")
                .await
                .unwrap_or(0.0);
            if followed.is_none() && (learned - f64::from(*creates)).abs() <= 1.0 {
                followed = Some(changed.elapsed().as_secs_f64() / QUOTA_WINDOW.as_secs_f64());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        progress!(
            cfg,
            "quota change: {creates}/min followed after {followed:?} windows"
        );
        follow.push((*creates, followed));
    }
    let done = sink.seen();
    stop_workers(workers).await;
    let stats = sim.stats();
    Ok((done.max(1), stats.answered("create:429"), follow))
}
