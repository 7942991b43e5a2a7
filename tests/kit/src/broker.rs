//! The brokers tests run against: the one they share (the machine's on
//! 127.0.0.1:5672, or a private node for the whole run when nothing answers
//! there), private nodes and clusters for tests that break a broker, and
//! closing a worker's connection from the broker's side.

use std::{sync::OnceLock, time::Duration};

use lapin::{Connection, ConnectionProperties};
use vidu_worker::{
    config::Settings,
    local_broker::{self, Installation, LocalNode, NodeOptions},
};

/// How long a private node may take to start (or start again).
pub const STARTUP: Duration = local_broker::STARTUP_TIMEOUT;

/// The machine's RabbitMQ installation; panics saying how to install one.
fn installation() -> Installation {
    Installation::find().unwrap_or_else(|| panic!("{}", local_broker::INSTALL_HINT))
}

/// A private node for a test that needs a broker of its own (restarts,
/// TLS, users and vhosts), stopped and removed on drop. Blocks: call it
/// from `spawn_blocking`.
pub fn private_node() -> LocalNode {
    private_node_with(NodeOptions::default())
}

/// [`private_node`] with options.
pub fn private_node_with(options: NodeOptions) -> LocalNode {
    LocalNode::start_with(&installation(), "vidu-test", &options, STARTUP)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `n` private nodes joined into one cluster. Blocks.
pub fn private_cluster(n: usize) -> Vec<LocalNode> {
    local_broker::start_cluster(
        &installation(),
        "vidu-test",
        n,
        &NodeOptions::default(),
        STARTUP,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The broker the tests share: the machine's on 127.0.0.1:5672, or a
/// private node started for this run when nothing answers there.
pub struct SharedBroker {
    url: String,
    node: Option<LocalNode>,
}

impl SharedBroker {
    /// Its AMQP URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The private node, when the run has one.
    pub fn private_node(&self) -> Option<&LocalNode> {
        self.node.as_ref()
    }

    /// `rabbitmqctl` for this broker.
    pub fn rabbitmqctl(&self) -> std::process::Command {
        match &self.node {
            Some(node) => node.ctl_command(),
            None => std::process::Command::new("rabbitmqctl"),
        }
    }
}

static SHARED_BROKER: OnceLock<SharedBroker> = OnceLock::new();

/// The shared broker, found on first use: the machine's when 127.0.0.1:5672
/// answers (as on CI), else one private node for the whole run, which a
/// watcher process stops and removes when the test process exits (a
/// static's drop never runs).
pub fn shared_broker() -> &'static SharedBroker {
    SHARED_BROKER.get_or_init(|| {
        if local_broker::default_broker_answers() {
            let url = Settings::default().amqp.url;
            return SharedBroker {
                url: secrecy::ExposeSecret::expose_secret(&url).to_owned(),
                node: None,
            };
        }
        let tools = installation();
        let node = LocalNode::start(&tools, "vidu-suite", local_broker::STARTUP_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        node.stop_when_process_exits(std::process::id())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "no broker answers on 127.0.0.1:5672: the tests share a private RabbitMQ node, \
             {} (stopped and removed when they end)",
            node.name()
        );
        SharedBroker {
            url: node.url(),
            node: Some(node),
        }
    })
}

/// Closes a worker's broker connection from the broker's side, as a network
/// cut or a load balancer reset would (`rabbitmqctl close_connection`), on
/// the shared broker (`node` none) or a private one. Returns whether a
/// connection was found and closed.
pub fn close_worker_connection(node: Option<&LocalNode>, pid: u32) -> bool {
    let run = |args: &[&str]| -> Option<String> {
        match node {
            Some(n) => n.ctl_output(args).ok(),
            None => {
                let out = shared_broker().rabbitmqctl().args(args).output().ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            }
        }
    };
    let Some(list) = run(&[
        "-q",
        "list_connections",
        "pid",
        "client_properties",
        "--no-table-headers",
    ]) else {
        return false;
    };
    let needle = format!("#{pid} ");
    let Some(conn) = list
        .lines()
        .find(|l| l.contains("vidu-worker worker") && l.contains(&needle))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
    else {
        return false;
    };
    run(&[
        "close_connection",
        &conn,
        "closed by the test (a network cut)",
    ])
    .is_some()
}

/// Connects to the first node of a broker URL (or comma-separated list of
/// node URLs, as `amqp.url` takes them) that answers.
pub async fn connect_any(urls: &str) -> Option<Connection> {
    for url in vidu_worker::config::split_urls(urls) {
        if let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await {
            return Some(conn);
        }
    }
    None
}
