//! A private RabbitMQ node for tests that need a broker of their own: broker
//! restarts (so tests running in parallel against the shared broker are not
//! disturbed), a TLS listener with certificates the test generates, users
//! with restricted permissions, vhosts, and definitions imported the way an
//! operator would. Started with the machine's `rabbitmq-server` on free
//! ports, with its own data directory (the environment, ports and base
//! configuration of [`local_broker`], as the demo's node); stopped and
//! removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use vidu_worker::local_broker;

pub struct BrokerNode {
    pub name: String,
    pub port: u16,
    /// The TLS listener's port, when the node has one.
    pub tls_port: Option<u16>,
    dir: PathBuf,
}

/// A TLS listener: PEM contents, written into the node's directory.
#[derive(Clone)]
pub struct NodeTls {
    /// CA certificates the broker trusts for client certificates.
    pub ca_pem: String,
    /// The broker's certificate (chain) and key.
    pub cert_pem: String,
    pub key_pem: String,
    /// Refuse clients without a certificate signed by `ca_pem` (mutual TLS).
    pub require_client_cert: bool,
}

/// How to start a node.
#[derive(Clone, Default)]
pub struct NodeOptions {
    pub tls: Option<NodeTls>,
    /// Erlang terms for the node's `advanced.config` (without the final
    /// dot), e.g. `[{rabbit, [{key, value}]}]`.
    pub advanced_config: Option<String>,
}

/// How long RabbitMQ's at-least-once dead-letter process waits for a
/// target queue's confirm before it sends again (3.10's default is
/// minutes). Cluster nodes use a short one, as the README advises, so that
/// dead letters held after a node loss move soon after the node is back.
pub const DEAD_LETTER_CONFIRM_TIMEOUT_MS: u32 = 5_000;

impl BrokerNode {
    /// Starts a plain node and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(NodeOptions::default())
    }

    /// Starts a node with options and waits until it accepts connections.
    pub fn start_with(options: NodeOptions) -> Self {
        let node = Self::launch(options);
        node.await_startup();
        node
    }

    /// Starts `n` nodes and joins them into one cluster (the nodes 2..n
    /// join the first with `rabbitmqctl join_cluster`). Every node is
    /// stopped and its directory removed on drop, also when a later step
    /// fails.
    pub fn start_cluster(n: usize) -> Vec<Self> {
        // Launch all, then wait for all: the Erlang nodes boot in parallel.
        let options = NodeOptions {
            advanced_config: Some(format!(
                "[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, {DEAD_LETTER_CONFIRM_TIMEOUT_MS}}}]}}]"
            )),
            ..NodeOptions::default()
        };
        let nodes: Vec<Self> = (0..n).map(|_| Self::launch(options.clone())).collect();
        for node in &nodes {
            node.await_startup();
        }
        let first = nodes[0].name.clone();
        for node in &nodes[1..] {
            node.ctl_output(&["stop_app"]);
            node.ctl_output(&["join_cluster", &first]);
            node.ctl_output(&["start_app"]);
            node.await_startup();
        }
        let status = nodes[0].ctl_output(&["cluster_status", "--formatter", "json"]);
        let running = serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        assert_eq!(running, n, "cluster of {n} running: {status}");
        nodes
    }

    /// Stops the node hard, as a crashed machine would (SIGKILL to the
    /// Erlang VM): no clean shutdown, no goodbye to its cluster.
    pub fn kill(&self) {
        let pid = self.vm_pid().expect("the node's VM");
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -9 {pid}");
        // Wait until the VM is gone (its port closes).
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} still answers after SIGKILL", self.name);
    }

    /// Starts a killed node again (it rejoins its cluster) and waits for it.
    pub fn restart(&self) {
        let status = self
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .expect("rabbitmq-server is installed");
        assert!(status.success(), "rabbitmq-server -detached failed");
        self.await_startup();
    }

    /// Launches a node without waiting for it.
    fn launch(options: NodeOptions) -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("vidutest{}@localhost", &unique[..8]);
        let free = || local_broker::free_port().expect("a free port pair");
        let port = free();
        let tls_port = std::iter::repeat_with(free)
            .find(|p| *p != port)
            .expect("a second free port");
        let dir = std::env::temp_dir().join(format!("vidu-broker-{}", &unique[..8]));
        local_broker::create_node_dir(&dir).expect("node dir");
        let mut conf = local_broker::node_config(port);
        if let Some(tls) = &options.tls {
            let file = |name: &str, pem: &str| {
                let path = dir.join(name);
                local_broker::write_node_file(&path, pem).expect("write a PEM file");
                path.to_string_lossy().into_owned()
            };
            conf.push_str(&format!(
                "listeners.ssl.local = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = {}\n",
                file("ca.pem", &tls.ca_pem),
                file("server.pem", &tls.cert_pem),
                file("server.key", &tls.key_pem),
                tls.require_client_cert,
            ));
        }
        if let Some(terms) = &options.advanced_config {
            let path = dir.join("advanced.config");
            local_broker::write_node_file(&path, &format!("{terms}.\n")).expect("advanced.config");
        }
        local_broker::write_node_file(&dir.join("rabbitmq.conf"), &conf).expect("node config");
        local_broker::hand_over_node_dir(&dir, owner())
            .expect("the node's user owns its directory");
        let node = Self {
            name,
            port,
            tls_port: options.tls.as_ref().map(|_| tls_port),
            dir,
        };
        let status = node
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .expect("rabbitmq-server is installed");
        assert!(status.success(), "rabbitmq-server -detached failed");
        node
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(local_broker::node_env(&self.name, self.port, &self.dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn ctl(&self, args: &[&str]) -> bool {
        self.command("rabbitmqctl")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Runs `rabbitmqctl` and returns its output; panics naming the command
    /// when it fails.
    pub fn ctl_output(&self, args: &[&str]) -> String {
        let out = self
            .command("rabbitmqctl")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {} failed: {}{}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to two minutes) until the node runs its applications.
    pub fn await_startup(&self) {
        for _ in 0..60 {
            if self.ctl(&["await_startup", "--timeout", "5"]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("private broker {} did not start", self.name);
    }

    /// The AMQP URL of this node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// An AMQP URL with other credentials and an already percent-encoded
    /// vhost.
    pub fn url_for(&self, user: &str, password: &str, vhost: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/{vhost}", self.port)
    }

    /// An amqps:// URL of the TLS listener, reached by `host`.
    pub fn tls_url(&self, host: &str) -> String {
        let port = self.tls_port.expect("the node has a TLS listener");
        format!("amqps://guest:guest@{host}:{port}/%2f")
    }

    /// The node's own directory (readable by the broker's user).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `rabbitmqctl stop_app`: the broker goes away, the node stays.
    pub fn stop_app(&self) {
        assert!(self.ctl(&["stop_app"]), "stop_app");
    }

    /// `rabbitmqctl start_app`, then waits for it.
    pub fn start_app(&self) {
        assert!(self.ctl(&["start_app"]), "start_app");
        self.await_startup();
    }

    /// Adds a user with no permissions anywhere.
    pub fn add_user(&self, user: &str, password: &str) {
        self.ctl_output(&["add_user", user, password]);
    }

    /// `rabbitmqctl set_permissions -p VHOST USER CONF WRITE READ`.
    pub fn set_permissions(&self, vhost: &str, user: &str, perms: [&str; 3]) {
        self.ctl_output(&[
            "set_permissions",
            "-p",
            vhost,
            user,
            perms[0],
            perms[1],
            perms[2],
        ]);
    }

    /// `rabbitmqctl import_definitions FILE`, as an operator would.
    pub fn import_definitions(&self, file: &Path) {
        let path = file.to_string_lossy().into_owned();
        self.ctl_output(&["import_definitions", &path]);
    }

    /// Imports definitions given as JSON (vhosts, users with a `password`,
    /// permissions, ...) in one call, which is much quicker than one
    /// `rabbitmqctl` call per user.
    pub fn import_definitions_json(&self, definitions: &serde_json::Value) {
        let path = self.dir.join(format!(
            "definitions-{}.json",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, definitions.to_string()).expect("write definitions");
        set_mode(&path, 0o644);
        self.import_definitions(&path);
        let _ = std::fs::remove_file(&path);
    }
}

impl BrokerNode {
    /// The node's VM, from its pid file once [`local_broker::verified_vm_pid`]
    /// accepts it as this node's.
    fn vm_pid(&self) -> Result<u32, String> {
        let text = std::fs::read_to_string(self.dir.join("pid")).map_err(|e| e.to_string())?;
        let pid: i64 = text.trim().parse().map_err(|_| "no pid".to_owned())?;
        local_broker::verified_vm_pid(pid, &self.name, owner())
    }
}

/// The user private nodes run as.
fn owner() -> local_broker::NodeUser {
    let tools = local_broker::Installation::find().expect("rabbitmq-server is installed");
    local_broker::NodeUser::of(&tools).expect("the node's user")
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        if !self.ctl(&["stop"]) {
            // Not answering: make sure no VM of this node is left running.
            if let Ok(pid) = self.vm_pid() {
                let _ = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
