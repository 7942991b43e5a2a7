//! A worker child process (killed on drop): its logs, its operations
//! endpoint (readiness, metrics), signals; and where the worker's binary is.

use std::{
    collections::VecDeque,
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
};

use crate::eventually;

/// The worker's binary: `VIDU_WORKER_BIN`, or the `vidu-worker` Cargo
/// builds beside the test or benchmark executable (`target/<profile>/`,
/// built for every integration test and benchmark of the package).
pub fn worker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VIDU_WORKER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test's own executable");
    // target/<profile>/deps/<test> -> target/<profile>/vidu-worker
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let path = profile.join(format!("vidu-worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "no worker binary at {} (build it, or set VIDU_WORKER_BIN)",
        path.display()
    );
    path
}

/// Most output lines kept per worker (the oldest go first).
const MAX_LOG_LINES: usize = 100_000;

/// A worker child process (`vidu-worker run`); killed on drop.
pub struct WorkerProcess {
    pub child: Child,
    logs: Arc<Mutex<VecDeque<String>>>,
    lines: Arc<AtomicU64>,
    /// The operations endpoint, when it was given (`VIDU_WORKER__HTTP__LISTEN`
    /// with a port); otherwise read from the start-up log line.
    ops: Option<String>,
    /// The output readers, done at the end of the output.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl WorkerProcess {
    /// Runs `cmd` with the argument `run`, its output read line by line
    /// (counted, the last [`MAX_LOG_LINES`] kept), killed on drop.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Self> {
        let ops = cmd
            .as_std()
            .get_envs()
            .find(|(k, _)| *k == "VIDU_WORKER__HTTP__LISTEN")
            .and_then(|(_, v)| v?.to_str().map(str::to_owned))
            .filter(|addr| !addr.ends_with(":0"));
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let logs = Arc::new(Mutex::new(VecDeque::new()));
        let lines = Arc::new(AtomicU64::new(0));
        let pipes: [Option<Box<dyn AsyncRead + Unpin + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        let mut readers = Vec::new();
        for pipe in pipes.into_iter().flatten() {
            let logs = logs.clone();
            let lines = lines.clone();
            readers.push(tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.fetch_add(1, Ordering::Relaxed);
                    let mut logs = logs.lock().expect("log lock");
                    if logs.len() >= MAX_LOG_LINES {
                        logs.pop_front();
                    }
                    logs.push_back(line);
                }
            }));
        }
        Ok(Self {
            child,
            logs,
            lines,
            ops,
            readers,
        })
    }

    /// The output lines kept.
    pub fn logs(&self) -> Vec<String> {
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .cloned()
            .collect()
    }

    /// The last `n` output lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let logs = self.logs.lock().expect("log lock");
        logs.iter()
            .skip(logs.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Output lines written so far.
    pub fn log_lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// The operations address: the one it was given, or the one its
    /// start-up log line names.
    pub async fn ops_addr(&self) -> String {
        if let Some(ops) = &self.ops {
            return ops.clone();
        }
        eventually(
            Duration::from_secs(30),
            "the worker's start-up log line",
            || async {
                self.logs().iter().find_map(|l| {
                    let v: Value = serde_json::from_str(l).ok()?;
                    (v["message"] == "vidu-worker starting")
                        .then(|| v["ops"].as_str().map(str::to_owned))?
                })
            },
        )
        .await
    }
    /// GET on the operations endpoint: (status, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.ops_addr().await;
        let resp = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.ok()?))
    }

    /// Waits until `/readyz` answers 503 with `needle` in its reason, and
    /// returns that reason.
    pub async fn wait_not_ready(&self, needle: &str, timeout: Duration) -> String {
        eventually(
            timeout,
            &format!("/readyz 503 mentioning {needle:?}"),
            || async {
                match self.get("/readyz").await {
                    Some((503, body)) if body.contains(needle) => Some(body),
                    _ => None,
                }
            },
        )
        .await
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        eventually(timeout, "the worker to be ready", || async {
            matches!(self.get("/readyz").await, Some((200, _))).then_some(())
        })
        .await;
    }

    /// One metric family's value, summed over its samples whose labels
    /// contain `labels` (0 when the endpoint does not answer).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        self.try_metric(name, labels).await.unwrap_or(0.0)
    }

    /// [`WorkerProcess::metric`], `None` when the endpoint does not answer.
    pub async fn try_metric(&self, name: &str, labels: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await?;
        Some(
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                        && l.contains(labels)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(mut self, grace: Duration) {
        self.signal("TERM");
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }

    pub async fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait().await;
    }

    /// Waits for exit; returns the status code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let code = tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()?
            .ok()?
            .code();
        // Its last lines are read before anyone looks at them.
        for reader in std::mem::take(&mut self.readers) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        code
    }
}
