//! Private RabbitMQ nodes: a `BrokerNode` (the machine's `rabbitmq-server`
//! on free ports, with a directory of its own, stopped and removed on
//! drop), joining nodes into a cluster, killing and restarting one, and the
//! helpers the cluster scenario reads them with (its `Target`, node names,
//! queue leaders).

use std::{env, path::PathBuf, process::Stdio, time::Duration};

use serde_json::Value;
use tokio::process::Command;
use vidu_worker::local_broker;

use crate::{harness::Target, workers::signal, BenchResult};

/// A private RabbitMQ node: the machine's `rabbitmq-server` on free ports,
/// with a directory of its own. Stopped (killed if it does not answer) and
/// its directory removed on drop, also when a later step fails.
pub(crate) struct BrokerNode {
    pub(crate) name: String,
    pub(crate) port: u16,
    dir: PathBuf,
}

impl BrokerNode {
    /// Launches a node without waiting for it.
    pub(crate) async fn launch() -> BenchResult<Self> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let port = local_broker::free_port()?;
        let dir = env::temp_dir().join(format!("vidu-bench-broker-{}", &unique[..8]));
        local_broker::create_node_dir(&dir)?;
        // From here on, drop cleans up.
        let node = Self {
            name: format!("vidubench{}@localhost", &unique[..8]),
            port,
            dir,
        };
        // The broker runs as its own user, in a directory of its own.
        local_broker::write_node_file(
            &node.dir.join("rabbitmq.conf"),
            &local_broker::node_config(port),
        )?;
        let tools = local_broker::Installation::find().ok_or("rabbitmq-server is not installed")?;
        local_broker::hand_over_node_dir(&node.dir, local_broker::NodeUser::of(&tools)?)?;
        let status = node
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .await
            .map_err(|e| format!("cannot run rabbitmq-server: {e}"))?;
        if !status.success() {
            return Err(format!("rabbitmq-server -detached failed for {}", node.name).into());
        }
        Ok(node)
    }

    /// Starts `n` nodes and joins them into one cluster (nodes 2..n join
    /// the first).
    pub(crate) async fn start_cluster(n: usize) -> BenchResult<Vec<Self>> {
        let mut nodes = Vec::with_capacity(n);
        // Launch all, then wait for all: the Erlang nodes boot in parallel.
        for _ in 0..n {
            nodes.push(Self::launch().await?);
        }
        for node in &nodes {
            node.await_startup().await?;
        }
        let first = nodes[0].name.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["join_cluster", &first]).await?;
            node.ctl(&["start_app"]).await?;
            node.await_startup().await?;
        }
        let status = nodes[0]
            .ctl(&["cluster_status", "--formatter", "json"])
            .await?;
        let running = serde_json::from_str::<Value>(&status)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if running != n {
            return Err(format!("{running} of {n} cluster nodes running: {status}").into());
        }
        Ok(nodes)
    }

    fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        local_broker::node_env(&self.name, self.port, &self.dir)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `rabbitmqctl -n NODE ARGS` and returns its output.
    async fn ctl(&self, args: &[&str]) -> BenchResult<String> {
        let what = args.first().copied().unwrap_or_default();
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            self.command("rabbitmqctl")
                .arg("-n")
                .arg(&self.name)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output(),
        )
        .await
        .map_err(|_| format!("rabbitmqctl {what} on {} timed out", self.name))?
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "rabbitmqctl {what} on {} failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits (up to about two minutes) until the node runs its
    /// applications.
    pub(crate) async fn await_startup(&self) -> BenchResult<()> {
        for _ in 0..60 {
            if self.ctl(&["await_startup", "--timeout", "5"]).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(format!("broker node {} did not start", self.name).into())
    }

    /// The node's Erlang VM, from its pid file, if it is running and is
    /// this node's (a stale pid file may name another process by now).
    fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let ours = format!("RABBITMQ_NODENAME={}", self.name).into_bytes();
        (comm.trim() == "beam.smp" && environ.split(|b| *b == 0).any(|v| v == ours.as_slice()))
            .then_some(pid)
    }

    /// Stops the node hard, as a crashed machine would (SIGKILL to the
    /// Erlang VM): no clean shutdown, no goodbye to its cluster. Returns
    /// once its port is closed.
    pub(crate) async fn kill(&self) -> BenchResult<()> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("no running VM for {}", self.name))?;
        signal(pid, "KILL");
        for _ in 0..100 {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("{} still answers after SIGKILL", self.name).into())
    }

    /// Starts a killed node again (it rejoins its cluster) and waits for
    /// it.
    pub(crate) async fn restart(&self) -> BenchResult<()> {
        let status = self
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .await
            .map_err(|e| format!("cannot run rabbitmq-server: {e}"))?;
        if !status.success() {
            return Err(format!("rabbitmq-server -detached failed for {}", self.name).into());
        }
        self.await_startup().await
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        let stopped = std::process::Command::new("rabbitmqctl")
            .envs(self.env())
            .arg("-n")
            .arg(&self.name)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            // Not answering: make sure no VM of this node is left running.
            if let Some(pid) = self.pid() {
                signal(pid, "KILL");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A target on private nodes: the bench through the first, the workers
/// given every node's URL.
pub(crate) fn private_target(nodes: &[BrokerNode], group_size: Option<u16>) -> Target {
    Target {
        bench_url: nodes.first().map(BrokerNode::url).unwrap_or_default(),
        worker_url: nodes
            .iter()
            .map(BrokerNode::url)
            .collect::<Vec<_>>()
            .join(","),
        group_size,
        broker_pids: Some(nodes.iter().filter_map(BrokerNode::pid).collect()),
    }
}

/// `node 1` for a worker's broker port, by its index in `nodes`.
pub(crate) fn node_names(nodes: &[BrokerNode], ports: &[Option<u16>]) -> String {
    ports
        .iter()
        .map(|p| {
            p.and_then(|p| nodes.iter().position(|n| n.port == p))
                .map_or_else(|| "?".into(), |i| i.to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The leader node (`vidubench…@localhost`) of each listed quorum queue
/// that the node knows.
pub(crate) async fn leaders(node: &BrokerNode, queues: &[String]) -> BenchResult<Vec<String>> {
    let out = node
        .ctl(&["list_queues", "name", "leader", "--formatter", "json"])
        .await?;
    let rows: Vec<Value> =
        serde_json::from_str(&out).map_err(|e| format!("list_queues output: {e}"))?;
    Ok(rows
        .iter()
        .filter(|r| {
            r["name"]
                .as_str()
                .is_some_and(|n| queues.iter().any(|q| q == n))
        })
        .filter_map(|r| r["leader"].as_str().map(str::to_owned))
        .collect())
}
