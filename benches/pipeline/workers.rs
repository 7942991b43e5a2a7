//! Worker processes: a `vidu-worker run` child per `Worker` (its operations
//! endpoint, readiness, broker node, metrics and memory; stopped with
//! SIGTERM, killed on drop), starting and stopping several, reading their
//! output, and sending a signal to a process.

use std::{
    collections::VecDeque,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
};
use vidu_worker::simulator::RunningSimulator;

use crate::{harness::Deployment, machine::proc_status_mib, BenchResult};

/// A `vidu-worker run` child; killed on drop if still running.
pub(crate) struct Worker {
    child: Child,
    pub(crate) pid: u32,
    ops: String,
    pub(crate) log_lines: Arc<AtomicU64>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Worker {
    pub(crate) async fn spawn(
        dep: &Deployment,
        sim: &RunningSimulator,
        extra_env: &[(&str, String)],
    ) -> BenchResult<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vidu-worker"));
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // The bench sets the key its own way.
        cmd.env_remove("VIDU_WORKER__UPSTREAM__API_KEY");
        cmd.env("VIDU_WORKER__UPSTREAM__MAX_REQUESTS_PER_SECOND", "0");
        for (k, v) in dep.worker_env(sim) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        // A free port for the operations endpoint, so that nothing depends
        // on the worker's log level.
        let ops = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .to_string();
        cmd.env("VIDU_WORKER__HTTP__LISTEN", &ops);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start vidu-worker: {e}"))?;
        let pid = child.id().ok_or("the worker exited at once")?;
        let log_lines = Arc::new(AtomicU64::new(0));
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(out) = child.stdout.take() {
            drain(out, log_lines.clone(), tail.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, log_lines.clone(), tail.clone());
        }
        let worker = Self {
            child,
            pid,
            ops,
            log_lines,
            tail,
        };
        worker.wait_ready(Duration::from_secs(60)).await?;
        Ok(worker)
    }

    async fn wait_ready(&self, timeout: Duration) -> BenchResult<()> {
        let url = format!("http://{}/readyz", self.ops);
        self.wait_for(timeout, "was not ready", || async {
            let resp = reqwest::get(&url).await.ok()?;
            resp.status().is_success().then_some(())
        })
        .await
    }

    /// Asks `probe` every 100 ms until it answers; after `timeout`, fails
    /// saying the worker `what`, with its last log lines.
    pub(crate) async fn wait_for<T, F, Fut>(
        &self,
        timeout: Duration,
        what: &str,
        mut probe: F,
    ) -> BenchResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(answer) = probe().await {
                return Ok(answer);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the worker {what} within {timeout:?}; last lines: {:?}",
                    self.tail.lock().expect("tail")
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The port of the broker node the worker is ready on: `/readyz`
    /// answers `ready (broker node HOST:PORT)`. `None` while not ready.
    pub(crate) async fn broker_node(&self) -> Option<u16> {
        let resp = reqwest::get(format!("http://{}/readyz", self.ops))
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.text().await.ok()?;
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
        let text = reqwest::get(format!("http://{}/metrics", self.ops))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    pub(crate) fn rss_mib(&self) -> Option<f64> {
        proc_status_mib(self.pid, "VmRSS")
    }

    pub(crate) fn peak_rss_mib(&self) -> Option<f64> {
        proc_status_mib(self.pid, "VmHWM")
    }

    /// SIGTERM, then SIGKILL if it has not exited within 40 s.
    pub(crate) async fn stop(mut self) {
        signal(self.pid, "TERM");
        if tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Reads a child's output: counts lines and keeps the last few.
fn drain(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    lines_seen: Arc<AtomicU64>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            lines_seen.fetch_add(1, Ordering::Relaxed);
            let mut t = tail.lock().expect("tail");
            if t.len() >= 20 {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
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
