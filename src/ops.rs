//! Operations endpoint: `/healthz`, `/readyz` and `/metrics`.
//!
//! [`Health`] is the one place that knows whether this worker is ready: the
//! session reports the broker and its consumers, the upstream gate reports a
//! refused key. The HTTP server only renders that state; it never changes
//! it, and it never exposes anything secret.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{gate::Gate, metrics::Metrics};

#[derive(Debug, Clone)]
struct HealthState {
    /// The node in use (`host:port`), or why there is none.
    broker: Result<String, String>,
    consuming: bool,
    stopping: bool,
}

/// Readiness as the session and the gate report it. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    state: Arc<Mutex<HealthState>>,
    gate: Gate,
}

impl Health {
    /// Not ready until the first session reports in.
    pub fn new(gate: Gate) -> Self {
        Self {
            state: Arc::new(Mutex::new(HealthState {
                broker: Err("not connected to the broker yet".into()),
                consuming: false,
                stopping: false,
            })),
            gate,
        }
    }

    fn update(&self, f: impl FnOnce(&mut HealthState)) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state);
    }

    /// The broker connection is up, to `node` (`host:port`).
    pub fn broker_up(&self, node: &str) {
        let node = node.to_owned();
        self.update(|s| s.broker = Ok(node));
    }

    /// The broker connection is down, and why.
    pub fn broker_down(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.update(|s| {
            s.broker = Err(reason);
            s.consuming = false;
        });
    }

    /// Whether the consumers are running.
    pub fn set_consuming(&self, consuming: bool) {
        self.update(|s| s.consuming = consuming);
    }

    /// Shutdown has begun.
    pub fn stopping(&self) {
        self.update(|s| s.stopping = true);
    }

    /// `Ok` with the broker node in use when ready; otherwise why not.
    pub fn readiness(&self) -> Result<String, String> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if state.stopping {
            return Err("shutting down".into());
        }
        let node = state.broker.map_err(|e| format!("broker: {e}"))?;
        if let Some(reason) = self.gate.refusal() {
            return Err(format!("{reason} (broker node {node})"));
        }
        if !state.consuming {
            return Err(format!(
                "not consuming the request queue (broker node {node})"
            ));
        }
        Ok(node)
    }
}

#[derive(Clone)]
struct Ops {
    health: Health,
    metrics: Metrics,
}

/// The operations router.
pub fn router(health: Health, metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Ops { health, metrics })
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    match ops.health.readiness() {
        Ok(node) => (StatusCode::OK, format!("ready (broker node {node})\n")),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}

/// The operations endpoint could not listen.
#[derive(Debug, thiserror::Error)]
#[error("http.listen: cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address of `http.listen`.
    pub addr: SocketAddr,
    /// Why (in use, not permitted, not an address of this host).
    #[source]
    pub source: std::io::Error,
}

/// Binds the listen address; the error names the key.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Longest a client may take to send a request's headers; also how long a
/// connection may sit idle before the next request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, however busy (a scraper reconnects).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// One open connection, as the accept loop sees it.
struct Connection {
    id: u64,
    /// Whether a request is being answered on it right now.
    busy: Arc<AtomicBool>,
    /// Closes it.
    close: CancellationToken,
}

/// Which open connection to close for a new one when all [`MAX_CONNECTIONS`]
/// are taken: the oldest that is not answering a request (one that never
/// sent its headers, or idles between requests). `None` when every one is
/// busy: then the new connection is closed instead. `busy` lists the open
/// connections oldest first.
pub fn to_evict(busy: &[bool]) -> Option<usize> {
    busy.iter().position(|b| !b)
}

/// Marks its connection busy while a request is answered, also when the
/// answer is dropped half-way.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn new(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Serves until `shutdown` fires. Each connection has a header-read and
/// idle timeout and a maximum age, and at most [`MAX_CONNECTIONS`] are
/// open at once. When they are all taken, a new connection replaces the
/// oldest one that is not answering a request, so that a client holding
/// connections open without sending anything (half-open or idle) cannot
/// starve the probes: the liveness probe must answer while the worker
/// lives.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Health,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let app = router(health, metrics);
    let open: Arc<Mutex<Vec<Connection>>> = Arc::new(Mutex::new(Vec::new()));
    let connections = TaskTracker::new();
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "the operations endpoint could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let close = shutdown.child_token();
        {
            let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
            if open.len() >= MAX_CONNECTIONS {
                let flags: Vec<bool> = open
                    .iter()
                    .map(|c| c.busy.load(Ordering::Acquire))
                    .collect();
                match to_evict(&flags) {
                    Some(i) => open.remove(i).close.cancel(),
                    None => {
                        drop(stream);
                        continue;
                    }
                }
            }
            open.push(Connection {
                id,
                busy: busy.clone(),
                close: close.clone(),
            });
        }
        let app = app.clone();
        let open = open.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let guard = Busy::new(&busy);
                let mut app = app.clone();
                async move {
                    let response = tower_service::Service::call(&mut app, req).await;
                    drop(guard);
                    response
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let graceful = tokio::select! {
                _ = conn.as_mut() => false,
                () = tokio::time::sleep(MAX_CONNECTION_AGE) => true,
                () = close.cancelled() => true,
            };
            if graceful {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
            }
            open.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|c| c.id != id);
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_replaces_the_oldest_one_not_answering() {
        // (busy flags, oldest first; which is closed)
        let cases: &[(&[bool], Option<usize>)] = &[
            (&[false, false, true], Some(0)),
            (&[true, false, false], Some(1)),
            (&[true, true, false], Some(2)),
            (&[true, true, true], None),
            (&[], None),
        ];
        for (busy, want) in cases {
            assert_eq!(to_evict(busy), *want, "{busy:?}");
        }
    }
}
