//! Offline stand-in for Novita's Vidu Q3 async API, used by the tests, the
//! throughput benchmark and the demo (`vidu-worker simulate`): it serves the
//! same endpoints (`POST /v3/async/<model>` for each of the six models in
//! [`MODELS`], each checking its own body rules, and the shared
//! `GET /v3/async/task-result`), the
//! same `Authorization: Bearer` auth and the same JSON shapes (task results,
//! and the flat `{"code","reason","message","metadata"}` error bodies) as
//! the real service, and adds deterministic fault injection: per task
//! directives embedded in the prompt (`[sim:fail]`, `[sim:gen=20s]`, ...)
//! and call-level fault plans (scripted or seeded-random 429/5xx, hangs,
//! garbage bodies, dropped connections), and serves real video bytes at
//! the URLs its results name (`/videos/…`, see [`VideoPlan`]); unauthenticated `/sim/*` admin
//! endpoints expose counters (calls, billed tasks, duplicate creates, peak
//! calls per second) and the same controls as [`RunningSimulator`]. It must
//! never contact the real Novita API or any other network service, never
//! touch the disk, never hold a lock across an `.await`, never log a call
//! above `debug` level, and never create (bill) a task for a faulted create
//! call except through the explicit `accept-then-drop` fault; it is not a
//! security boundary (the admin endpoints have no auth), so it must only
//! ever listen on trusted interfaces.

mod admin;
mod api;
mod config;
mod directives;
mod faults;
mod models;
mod quota;
mod state;
mod tasks;
#[cfg(test)]
mod test_support;
mod videos;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use api::AppState;

pub use api::{CREATE_PATH, TASK_RESULT_PATH, TASK_TYPE, VIDEO_URL_PREFIX};
pub use config::{AuthMode, EtaMode, SimulatorConfig, VideoPlan};
pub use faults::{EndpointFaults, Fault, FaultParseError, FaultPlan};
pub use models::{create_path, task_type, MODELS};
pub use quota::AccountQuota;
pub use state::{CallRecord, SimStats, Simulator};
pub use tasks::TaskView;
pub use videos::{video_body, video_sha256};

impl Simulator {
    /// The API and `/sim/*` admin routes. `hang` faults served through this
    /// router end only when their duration elapses; use [`Simulator::serve`]
    /// to also release them on shutdown.
    pub fn router(&self) -> Router {
        self.router_with_release(CancellationToken::new())
    }

    fn router_with_release(&self, release: CancellationToken) -> Router {
        api::routes()
            .merge(admin::routes())
            .merge(videos::routes())
            .fallback(api::not_found)
            .with_state(AppState {
                sim: self.clone(),
                release,
            })
    }

    /// Serves the simulator on `listener` until `shutdown` is cancelled, then
    /// shuts down gracefully (hanging calls are released and answered first).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "novita simulator listening");
            let host = if addr.ip().is_unspecified() {
                SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
            } else {
                addr
            };
            self.serve_videos_at(format!("http://{host}/videos/"));
        }
        let router = self.router_with_release(shutdown.clone());
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    /// Binds `127.0.0.1:0`, spawns [`Simulator::serve`] and returns a handle
    /// that stops the server when dropped.
    pub async fn start(config: SimulatorConfig) -> io::Result<RunningSimulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Self::new(config);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(sim.clone().serve(listener, shutdown.clone()));
        Ok(RunningSimulator {
            sim,
            addr,
            shutdown,
            server: Some(server),
        })
    }
}

/// A simulator serving on `127.0.0.1:<random port>`; stops the server when
/// dropped.
pub struct RunningSimulator {
    sim: Simulator,
    addr: SocketAddr,
    shutdown: CancellationToken,
    server: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for RunningSimulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningSimulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RunningSimulator {
    /// Address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The shared simulator behind the server.
    pub fn simulator(&self) -> &Simulator {
        &self.sim
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Sets how videos are served from now on.
    pub fn set_video_plan(&self, plan: VideoPlan) {
        self.sim.set_video_plan(plan);
    }

    /// How videos are served.
    pub fn video_plan(&self) -> VideoPlan {
        self.sim.video_plan()
    }

    /// Requests for video URLs so far.
    pub fn video_gets(&self) -> u64 {
        self.sim.video_gets()
    }

    /// Replaces the fault plan (see [`Simulator::set_faults`]).
    pub fn set_faults(&self, plan: FaultPlan) {
        self.sim.set_faults(plan);
    }

    /// Removes all faults.
    pub fn clear_faults(&self) {
        self.sim.clear_faults();
    }

    /// Sets how credentials are treated.
    pub fn set_auth(&self, mode: AuthMode) {
        self.sim.set_auth(mode);
    }

    /// Sets or removes the account's create quota.
    pub fn set_quota(&self, quota: Option<AccountQuota>) {
        self.sim.set_quota(quota);
    }

    /// The call log, oldest first.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.sim.calls()
    }

    /// Forgets all tasks and zeroes all counters.
    pub fn reset(&self) {
        self.sim.reset();
    }

    /// The simulator's view of one task.
    pub fn task(&self, task_id: &str) -> Option<TaskView> {
        self.sim.task(task_id)
    }

    /// Tasks whose request body contains `needle`; see
    /// [`Simulator::tasks_matching`].
    pub fn tasks_matching(&self, needle: &str) -> Vec<TaskView> {
        self.sim.tasks_matching(needle)
    }

    /// Stops the server gracefully (releasing hanging calls) and waits for it.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shutdown.cancel();
        match self.server.take() {
            Some(server) => server.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::test_support::*;
    use super::*;

    #[tokio::test]
    async fn shutdown_releases_hanging_calls() {
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![], vec![f("hang")]));
        let url = format!("{}{TASK_RESULT_PATH}?task_id=x", sim.base_url());
        let request = tokio::spawn(async move { client().get(url).bearer_auth(KEY).send().await });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sim.stats().responses.contains_key("poll:hang") {
            assert!(Instant::now() < deadline, "hang never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), sim.shutdown())
            .await
            .expect("shutdown must not wait for the hang")
            .expect("serve result");
        let answered = tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .expect("request must finish")
            .expect("join");
        if let Ok(resp) = answered {
            assert_eq!(resp.status(), 504);
        }
    }
}
