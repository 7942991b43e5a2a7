//! The worker process: startup wiring, then one supervised broker session
//! at a time.
//!
//! [`run`] is the library entry point of `vidu-worker run`: it builds the
//! upstream client, the gate, the create budget, the journal, the ticket
//! signer and the operations endpoint into the pipeline's handler context,
//! starts the background tasks ([`background`]: the key probe, the tracked
//! sample) and hands over to [`session`], which keeps a broker session alive
//! and feeds deliveries to the pipeline. Shutdown is one token: stop taking
//! work, let handlers finish within the grace period, close with 200.

mod background;
mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{BrokerError, Topology},
    config::{ConfigError, Settings},
    gate::Gate,
    journal::Journal,
    metrics::Metrics,
    ops::{self, Health},
    pipeline::{context::Context, recent::RecentCreates},
    quota::{Budget, BudgetSettings, SlotBank},
    retry::RetryPolicy,
    signing::Signer,
    telemetry::Every,
    upstream::UpstreamClient,
};

/// Why `run` ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration (exit status 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The operations endpoint could not listen (exit status 1).
    #[error(transparent)]
    Listen(#[from] ops::BindError),
    /// The bound listener has no address (exit status 1).
    #[error("http.listen: the listener has no local address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    /// The broker will not serve these settings: a queue or exchange
    /// exists with other arguments, may not be declared, or is missing
    /// (exit status 1; the message names it and says what to do).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Runs the worker until `shutdown` fires, serving the operations endpoint
/// on `http.listen`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    settings.require_api_key()?;
    let listener = ops::bind(settings.listen_addr()?).await?;
    run_with_listener(settings, listener, shutdown).await
}

/// Runs the worker with an already-bound operations listener (tests and the
/// demo bind port 0 and read the address back).
pub async fn run_with_listener(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let key = settings.require_api_key()?.clone();
    let listen = listener.local_addr().map_err(RunError::ListenerAddress)?;
    let metrics = Metrics::new();
    let upstream = UpstreamClient::new(&settings.upstream, key.clone(), metrics.clone())?;
    let gate = Gate::new(
        RetryPolicy {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
        },
        metrics.clone(),
    );
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let storage = crate::storage::Storage::from_settings(&settings.storage, &env, metrics.clone())
        .map_err(|e| ConfigError::new("storage", e.to_string()))?
        .map(Arc::new);
    let health = Health::new(gate.clone());
    let ops_stop = CancellationToken::new();
    let ops_task = tokio::spawn(ops::serve(
        listener,
        health.clone(),
        metrics.clone(),
        ops_stop.clone(),
    ));
    let topology = Topology::new(&settings);
    tracing::info!(
        request_queue = %settings.amqp.request_queue,
        events_exchange = %settings.amqp.events_exchange,
        broker = %settings.amqp.display_url(),
        upstream = %settings.upstream.base_url,
        create_quota = %settings.upstream.create_quota.map_or_else(|| "learned from 429s".to_owned(), |q| q.to_string()),
        storage = %settings.storage.bucket.as_deref().unwrap_or("none (videos are not copied)"),
        ops = %listen,
        "vidu-worker starting"
    );
    if let Some(warning) = cluster_warning(&settings) {
        tracing::warn!("{warning}");
    }
    if let Some(until) = settings.tickets.accept_unsigned.until() {
        if until > chrono::Utc::now() {
            tracing::warn!(
                until = %until.to_rfc3339(),
                "accepting unsigned tickets until {} (tickets.accept_unsigned): until then anyone who can write to the vhost can forge a ticket that is acted on; set it to false once the upgrade is done",
                until.to_rfc3339()
            );
        }
    }
    let signer = Arc::new(Signer::new(
        settings.tickets.secret.as_ref().unwrap_or(&key),
        &settings.tickets.previous_secrets,
        &settings.amqp.request_queue,
        settings.tickets.secret.is_some(),
    ));
    let journal = Arc::new(Journal::new(
        topology.journal_queue.clone(),
        signer.clone(),
        settings.upstream.quota_window,
        settings.polling.max_off_peak_task_age,
    ));
    let ctx = Arc::new(Context {
        budget: Budget::new(
            BudgetSettings {
                request_queue: settings.amqp.request_queue.clone(),
                configured: settings.upstream.create_quota,
                window: settings.upstream.quota_window,
                declares: settings.amqp.declare_topology,
                paced: settings.amqp.lanes.lanes().len() > 1,
                vhost: settings.amqp.vhost(),
            },
            journal.clone(),
            metrics.clone(),
        ),
        slots: Arc::new(SlotBank::new(
            crate::quota::slots::spare_lifetime(
                settings.upstream.create_quota,
                settings.upstream.quota_window,
            ),
            metrics.clone(),
        )),
        journal,
        unverified_log: Every::new(Duration::from_secs(30)),
        claims: crate::pipeline::claim::Held::default(),
        claim_log: Every::new(Duration::from_secs(60)),
        recent: RecentCreates::default(),
        signer,
        held: Arc::new(Semaphore::new(usize::from(settings.amqp.prefetch))),
        topology,
        settings,
        upstream,
        storage,
        metrics,
        gate,
        health,
        shutdown,
        publisher: watch::Sender::new(None),
    });
    let prober = tokio::spawn(background::probe_key(ctx.clone()));
    let storage_prober = tokio::spawn(background::probe_storage(ctx.clone()));
    let result = session::supervise(ctx.clone())
        .await
        .map_err(RunError::from);
    prober.abort();
    storage_prober.abort();
    ops_stop.cancel();
    let _ = ops_task.await;
    tracing::info!("vidu-worker stopped");
    result
}

/// A warning for a topology that does not survive the loss of a node:
/// classic queues live on one node of a cluster, so when `amqp.url` names
/// several nodes their messages are out of reach (or lost) with that node.
/// A single URL may still be a load balancer in front of a cluster, which
/// the worker cannot see; the README says so.
pub fn cluster_warning(settings: &Settings) -> Option<String> {
    let nodes = settings.amqp.node_count();
    (nodes > 1 && settings.amqp.queue_type == crate::config::QueueType::Classic).then(|| {
        format!(
            "amqp.url names {nodes} nodes but amqp.queue_type is classic: classic queues are not replicated, so requests and tickets on a lost node are unavailable until it returns (or gone, if its disk is); use quorum queues on a cluster"
        )
    })
}
