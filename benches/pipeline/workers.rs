//! Worker processes: the test kit's worker child per `Worker`, with what
//! the benchmark reads of it (readiness, broker node, metrics and memory;
//! stopped with SIGTERM, killed on drop), starting and stopping several,
//! and sending a signal to a process.

use std::time::Duration;

use tokio::process::Command;
use vidu_test_kit::{try_eventually, worker_binary, WorkerProcess};
use vidu_worker::simulator::RunningSimulator;

use crate::{harness::Deployment, machine::proc_status_mib, BenchResult};

/// A `vidu-worker run` child (the test kit's [`WorkerProcess`]) with its
/// operations endpoint on a port given up front, so that nothing depends on
/// the worker's log level; killed on drop if still running.
pub(crate) struct Worker {
    process: WorkerProcess,
    pub(crate) pid: u32,
}

impl Worker {
    pub(crate) async fn spawn(
        dep: &Deployment,
        sim: &RunningSimulator,
        extra_env: &[(&str, String)],
    ) -> BenchResult<Self> {
        let mut cmd = Command::new(worker_binary());
        // The bench sets the key its own way.
        cmd.env_remove("VIDU_WORKER__UPSTREAM__API_KEY");
        cmd.env("VIDU_WORKER__UPSTREAM__MAX_REQUESTS_PER_SECOND", "0");
        for (k, v) in dep.worker_env(sim) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let ops = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .to_string();
        cmd.env("VIDU_WORKER__HTTP__LISTEN", &ops);
        let process =
            WorkerProcess::spawn(cmd).map_err(|e| format!("cannot start vidu-worker: {e}"))?;
        let pid = process.child.id().ok_or("the worker exited at once")?;
        let worker = Self { process, pid };
        worker.wait_ready(Duration::from_secs(60)).await?;
        Ok(worker)
    }

    /// Output lines the worker wrote so far.
    pub(crate) fn log_lines(&self) -> u64 {
        self.process.log_lines()
    }

    async fn wait_ready(&self, timeout: Duration) -> BenchResult<()> {
        self.wait_for(timeout, "was not ready", || async {
            matches!(self.process.get("/readyz").await, Some((200, _))).then_some(())
        })
        .await
    }

    /// Asks `probe` until it answers; after `timeout`, fails saying the
    /// worker `what`, with its last log lines.
    pub(crate) async fn wait_for<T, F, Fut>(
        &self,
        timeout: Duration,
        what: &str,
        probe: F,
    ) -> BenchResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        try_eventually(timeout, probe).await.ok_or_else(|| {
            format!(
                "the worker {what} within {timeout:?}; last lines: {:?}",
                self.process.tail(20)
            )
            .into()
        })
    }

    /// The port of the broker node the worker is ready on: `/readyz`
    /// answers `ready (broker node HOST:PORT)`. `None` while not ready.
    pub(crate) async fn broker_node(&self) -> Option<u16> {
        let (200, body) = self.process.get("/readyz").await? else {
            return None;
        };
        body.trim()
            .strip_suffix(')')?
            .rsplit(':')
            .next()?
            .parse()
            .ok()
    }

    /// Waits until the worker names a broker node other than `not`.
    pub(crate) async fn wait_broker_node(
        &self,
        not: Option<u16>,
        timeout: Duration,
    ) -> BenchResult<u16> {
        self.wait_for(timeout, "named no broker node", || async {
            self.broker_node().await.filter(|p| Some(*p) != not)
        })
        .await
    }

    /// Sum of every sample of a metric family (`vidu_worker_..._total`).
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        self.process.try_metric(name, "").await
    }

    pub(crate) fn rss_mib(&self) -> Option<f64> {
        proc_status_mib(self.pid, "VmRSS")
    }

    pub(crate) fn peak_rss_mib(&self) -> Option<f64> {
        proc_status_mib(self.pid, "VmHWM")
    }

    /// SIGTERM, then SIGKILL if it has not exited within 40 s.
    pub(crate) async fn stop(self) {
        self.process.stop(Duration::from_secs(40)).await;
    }
}

pub(crate) async fn start_workers(
    dep: &Deployment,
    sim: &RunningSimulator,
    count: usize,
    extra_env: &[(&str, String)],
) -> BenchResult<Vec<Worker>> {
    let mut workers = Vec::with_capacity(count);
    for _ in 0..count {
        workers.push(Worker::spawn(dep, sim, extra_env).await?);
    }
    Ok(workers)
}

pub(crate) async fn stop_workers(workers: Vec<Worker>) {
    futures_util::future::join_all(workers.into_iter().map(Worker::stop)).await;
}
