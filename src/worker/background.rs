//! Background tasks of a worker, beside the deliveries: the upstream probe
//! that reopens the gate without spending money, the storage probe that
//! reopens it once the bucket accepts again, and the sample of how many
//! tickets the deployment tracks.

use std::{sync::Arc, time::Duration};

use lapin::Channel;
use tokio_util::sync::CancellationToken;

use crate::{
    gate::{self, GateState, Refusal},
    pipeline::context::Context,
    storage::CopyError,
    upstream::{UpstreamError, KEY_PROBE_TASK_ID},
};

/// How often the number of tracked tasks is sampled.
const SAMPLE_PERIOD: Duration = Duration::from_secs(15);

/// Samples how many tickets the deployment tracks, for the metric.
pub(super) async fn sample_tracked(
    channel: Option<Channel>,
    ctx: Arc<Context>,
    stop: CancellationToken,
) {
    let Some(channel) = channel else { return };
    let mut every = tokio::time::interval(SAMPLE_PERIOD);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match ctx.topology.count_tracked(&channel).await {
            Ok(n) => ctx
                .metrics
                .set_tasks_tracked(i64::try_from(n).unwrap_or(i64::MAX)),
            Err(e) => {
                // A failed passive declare closes the channel; the session
                // watchdog notices real outages, here we only stop sampling.
                tracing::debug!(error = %e, "could not sample the tracking queues");
                if !channel.status().connected() {
                    return;
                }
            }
        }
    }
}

/// Probes the upstream in the background while the gate is closed for the
/// key or an outage (a `GET` bills nothing), and once at start so a bad key
/// shows before the first request.
pub(super) async fn probe_key(ctx: Arc<Context>) {
    if let Err(e @ UpstreamError::KeyRejected { .. }) =
        ctx.upstream.task_result(KEY_PROBE_TASK_ID, None).await
    {
        ctx.gate.close(Refusal::Key, &e.to_string());
    }
    let mut changes = ctx.gate.subscribe();
    loop {
        // The prober's work: a refused key or an outage (a refused balance is
        // probed by a waiting request, with a real create).
        let due = match ctx.gate.state() {
            GateState::Closed {
                refusal: refusal @ (Refusal::Key | Refusal::Unavailable),
                retry_at,
                ..
            } => Some((refusal, retry_at)),
            _ => None,
        };
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            _ = changes.changed() => continue,
            () = gate::sleep_until(due.map(|(_, at)| at)) => {}
        }
        let (Some((refusal, _)), Some(claim)) = (due, ctx.gate.try_claim_probe()) else {
            // Someone else holds the probe; look again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match ctx.upstream.task_result(KEY_PROBE_TASK_ID, None).await {
            Err(e @ UpstreamError::KeyRejected { .. }) => {
                ctx.gate.probe_failed(claim, Refusal::Key, &e.to_string());
            }
            // Still down, or a refused key that now times out: the refusal
            // stands as it was.
            Err(e @ (UpstreamError::Transient { .. } | UpstreamError::RateLimited { .. })) => {
                ctx.gate.probe_failed(claim, refusal, &e.to_string());
            }
            // A task-result answer, even a 404 for the made-up id, means the
            // key is accepted and the upstream is serving.
            Ok(_) | Err(_) => {
                drop(claim);
                ctx.gate.open();
            }
        }
    }
}

/// Probes the video storage while the gate is closed for it (a small
/// object written, read back and deleted; a rotated secret file is read
/// again first), and once at start so that refused credentials or a
/// missing bucket show before the first video.
pub(super) async fn probe_storage(ctx: Arc<Context>) {
    let Some(storage) = ctx.storage.clone() else {
        return;
    };
    match storage.check().await {
        Err(e @ CopyError::StoreRefused(_)) => ctx.gate.close(Refusal::Storage, &e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, bucket = storage.bucket(), "the storage check failed; copies will be tried as videos come")
        }
        Ok(()) => tracing::info!(bucket = storage.bucket(), "the storage accepts writes"),
    }
    let mut changes = ctx.gate.subscribe();
    loop {
        let due = match ctx.gate.state() {
            GateState::Closed {
                refusal: Refusal::Storage,
                retry_at,
                ..
            } => Some(retry_at),
            _ => None,
        };
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            _ = changes.changed() => continue,
            () = gate::sleep_until(due) => {}
        }
        let (Some(_), Some(claim)) = (due, ctx.gate.try_claim_probe()) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match storage.check().await {
            Ok(()) => {
                drop(claim);
                ctx.gate.storage_accepts();
            }
            Err(e) => ctx
                .gate
                .probe_failed(claim, Refusal::Storage, &e.to_string()),
        }
    }
}
