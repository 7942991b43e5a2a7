//! `storage` (rows numbered 11 in the report): videos kept. One worker
//! copies the simulator's 64 MiB videos into a real S3-compatible server
//! (`s3s-fs` from the test kit, in this process, on this machine's disk):
//! one copy alone, then several at once, against a plain streaming read of
//! the same source; and the worker's peak memory while it copies.

use std::time::Duration;

use futures_util::StreamExt;
use std::time::Instant;
use vidu_test_kit::S3Server;
use vidu_worker::simulator::{EtaMode, VideoPlan};

use crate::{
    config::BenchConfig,
    harness::{simulator, Deployment, Sink},
    machine::wait_quiet,
    report::Row,
    workers::{start_workers, stop_workers, Worker},
    BenchResult,
};

/// Size of every video.
const VIDEO_MIB: u64 = 64;
/// Copies at once in the second run (`storage.max_concurrent_copies`).
const AT_ONCE: usize = 4;
/// The source's pace in the third run, like a video CDN across the
/// internet: the copy should keep up with a plain read.
const PACED_MIB_S: u64 = 32;
/// The worker's peak RSS may grow by less than this per copy at once
/// (a few parts of `storage.part_size`, 5 MiB, each).
const TARGET_RSS_GROWTH_MIB: f64 = 64.0;

struct Measured {
    plain_mib_s: f64,
    one_mib_s: f64,
    paced_plain_mib_s: f64,
    paced_one_mib_s: f64,
    several_mib_s: f64,
    rss_before_mib: f64,
    peak_one_mib: f64,
    peak_mib: f64,
}

pub(crate) async fn scenario_storage(cfg: &BenchConfig) -> Vec<Row> {
    progress!(
        cfg,
        "storage: {VIDEO_MIB} MiB videos into an S3-compatible server, one and {AT_ONCE} at once"
    );
    let title = format!("one copy of a {VIDEO_MIB} MiB video (stream, multipart upload, HEAD)");
    match storage_run(cfg).await {
        Ok(m) => {
            let grew_one = m.peak_one_mib - m.rss_before_mib;
            let grew = m.peak_mib - m.rss_before_mib;
            progress!(
                cfg,
                "storage: plain read {:.0} MiB/s, one copy {:.0} MiB/s, {AT_ONCE} at once {:.0} MiB/s, peak RSS +{grew_one:.0} MiB with one copy, +{grew:.0} MiB with {AT_ONCE}",
                m.plain_mib_s,
                m.one_mib_s,
                m.several_mib_s,
            );
            vec![
                Row::info(
                    "11",
                    title,
                    format!(
                        "{:.0} MiB/s ({:.2}× a plain streaming read of the same source, {:.0} MiB/s)",
                        m.one_mib_s,
                        m.one_mib_s / m.plain_mib_s.max(f64::MIN_POSITIVE),
                        m.plain_mib_s
                    ),
                ),
                Row::info(
                    "11",
                    format!("  {AT_ONCE} copies at once, together"),
                    format!(
                        "{:.0} MiB/s ({:.2}× one copy)",
                        m.several_mib_s,
                        m.several_mib_s / m.one_mib_s.max(f64::MIN_POSITIVE)
                    ),
                ),
                Row::info(
                    "11",
                    format!("  one copy from a source paced at {PACED_MIB_S} MiB/s"),
                    format!(
                        "{:.1} MiB/s ({:.2}× a plain streaming read of it, {:.1} MiB/s)",
                        m.paced_one_mib_s,
                        m.paced_one_mib_s / m.paced_plain_mib_s.max(f64::MIN_POSITIVE),
                        m.paced_plain_mib_s
                    ),
                ),
                Row::target(
                    "11",
                    "  the worker's peak RSS during one copy, over its RSS before",
                    format!("+{grew_one:.0} MiB (peak {:.0} MiB)", m.peak_one_mib),
                    format!("< {TARGET_RSS_GROWTH_MIB} MiB"),
                    grew_one < TARGET_RSS_GROWTH_MIB,
                ),
                Row::target(
                    "11",
                    format!("  the same with {AT_ONCE} copies at once, per copy"),
                    format!(
                        "+{:.0} MiB (peak {:.0} MiB)",
                        grew / AT_ONCE as f64,
                        m.peak_mib
                    ),
                    format!("< {TARGET_RSS_GROWTH_MIB} MiB"),
                    grew / (AT_ONCE as f64) < TARGET_RSS_GROWTH_MIB,
                ),
            ]
        }
        Err(e) => vec![Row::failed("11", title, &e)],
    }
}

/// Waits until the worker copies, then for `n` terminal events: the
/// seconds in between.
async fn copy_seconds(worker: &Worker, sink: &Sink, n: usize) -> BenchResult<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = loop {
        if worker
            .metric("vidu_worker_storage_copies_in_flight")
            .await
            .is_some_and(|v| v > 0.0)
        {
            break Instant::now();
        }
        if Instant::now() > deadline {
            return Err("no copy started within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ended = sink.wait_for(n, Duration::from_secs(600)).await?;
    Ok(ended
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(0.001))
}

async fn storage_run(cfg: &BenchConfig) -> BenchResult<Measured> {
    let bytes = VIDEO_MIB * 1024 * 1024;
    let sim = simulator(Duration::from_millis(200), EtaMode::Honest).await?;
    sim.set_video_plan(VideoPlan {
        bytes,
        ..VideoPlan::default()
    });
    let s3 = S3Server::start().await;
    wait_quiet(cfg).await;
    let dep = Deployment::new(cfg, "storage").await?;
    let sink = Sink::start(&dep, true).await?;
    let mut env: Vec<(&str, String)> = Vec::new();
    let storage_env = s3.worker_env();
    for (k, v) in &storage_env {
        env.push((k.as_str(), v.clone()));
    }
    env.push((
        "VIDU_WORKER__STORAGE__MAX_CONCURRENT_COPIES",
        AT_ONCE.to_string(),
    ));
    let workers = start_workers(&dep, &sim, 1, &env).await?;
    let worker = workers.first().ok_or("no worker")?;
    let rss_before_mib = worker.rss_mib().unwrap_or(0.0);

    dep.publish_requests(1, "storage-one", "a cat turns its head")
        .await?;
    let one = copy_seconds(worker, &sink, 1).await?;
    let peak_one_mib = worker.peak_rss_mib().unwrap_or(0.0);

    // The same source read plainly, as fast as this machine streams it.
    let url = first_video_url(&sink)?;
    let plain = plain_read(&url, bytes).await?;

    dep.publish_requests(AT_ONCE, "storage-several", "a dog jumps")
        .await?;
    let several = copy_seconds(worker, &sink, 1 + AT_ONCE).await?;
    let peak_mib = worker.peak_rss_mib().unwrap_or(0.0);

    // A source paced like a CDN across the internet.
    sim.set_video_plan(VideoPlan {
        bytes,
        bytes_per_second: Some(PACED_MIB_S * 1024 * 1024),
        ..VideoPlan::default()
    });
    dep.publish_requests(1, "storage-paced", "a bird lands")
        .await?;
    let paced_one = copy_seconds(worker, &sink, 2 + AT_ONCE).await?;
    let paced_plain = plain_read(&url, bytes).await?;
    let failed = sink.lock().failed;
    stop_workers(workers).await;
    if failed > 0 {
        return Err(format!("{failed} requests failed").into());
    }
    let stored = s3.keys().len();
    if stored != 2 + AT_ONCE {
        return Err(format!("{stored} objects stored, not {}", 2 + AT_ONCE).into());
    }
    let mib = VIDEO_MIB as f64;
    Ok(Measured {
        plain_mib_s: mib / plain,
        one_mib_s: mib / one,
        paced_plain_mib_s: mib / paced_plain,
        paced_one_mib_s: mib / paced_one,
        several_mib_s: mib * AT_ONCE as f64 / several,
        rss_before_mib,
        peak_one_mib,
        peak_mib,
    })
}

/// The video URL of the first terminal event.
fn first_video_url(sink: &Sink) -> BenchResult<String> {
    let kept = &sink.lock().kept;
    let event: serde_json::Value =
        serde_json::from_slice(&kept.first().ok_or("no terminal event kept")?.body)?;
    Ok(event["data"]["videos"][0]["url"]
        .as_str()
        .ok_or("no video URL in the event")?
        .to_owned())
}

/// Seconds a plain streaming read of `url` takes (all `bytes` of it).
async fn plain_read(url: &str, bytes: u64) -> BenchResult<f64> {
    let started = Instant::now();
    let mut body = reqwest::get(url).await?.bytes_stream();
    let mut read: u64 = 0;
    while let Some(chunk) = body.next().await {
        read += chunk?.len() as u64;
    }
    if read != bytes {
        return Err(format!("the plain read got {read} of {bytes} bytes").into());
    }
    Ok(started.elapsed().as_secs_f64().max(0.001))
}
