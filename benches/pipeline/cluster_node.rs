//! The benchmark's private RabbitMQ nodes: the project's `LocalNode`s,
//! started off the runtime (one, or a cluster), and the helpers the cluster
//! scenario reads them with (its `Target`, node names, queue leaders).

use vidu_worker::local_broker::{self, LocalNode};

use crate::{harness::Target, BenchResult};

/// Prefix of the benchmark's node names.
const NODE_PREFIX: &str = "vidu-bench";

/// A private node (`LocalNode`), started and awaited off the runtime.
pub(crate) async fn start_node() -> BenchResult<LocalNode> {
    tokio::task::spawn_blocking(|| {
        let tools = local_broker::Installation::find().ok_or("rabbitmq-server is not installed")?;
        LocalNode::start(&tools, NODE_PREFIX, local_broker::STARTUP_TIMEOUT)
    })
    .await?
    .map_err(Into::into)
}

/// `n` private nodes joined into one cluster, started off the runtime.
pub(crate) async fn start_cluster(n: usize) -> BenchResult<Vec<LocalNode>> {
    tokio::task::spawn_blocking(move || {
        let tools = local_broker::Installation::find().ok_or("rabbitmq-server is not installed")?;
        local_broker::start_cluster(
            &tools,
            NODE_PREFIX,
            n,
            &local_broker::NodeOptions::default(),
            local_broker::STARTUP_TIMEOUT,
        )
    })
    .await?
    .map_err(Into::into)
}

/// A target on private nodes: the bench through the first, the workers
/// given every node's URL.
pub(crate) fn private_target(nodes: &[LocalNode], group_size: Option<u16>) -> Target {
    Target {
        bench_url: nodes.first().map(LocalNode::url).unwrap_or_default(),
        worker_url: nodes
            .iter()
            .map(LocalNode::url)
            .collect::<Vec<_>>()
            .join(","),
        group_size,
        broker_pids: Some(nodes.iter().filter_map(LocalNode::vm_pid).collect()),
    }
}

/// `node 1` for a worker's broker port, by its index in `nodes`.
pub(crate) fn node_names(nodes: &[LocalNode], ports: &[Option<u16>]) -> String {
    ports
        .iter()
        .map(|p| {
            p.and_then(|p| nodes.iter().position(|n| n.port() == p))
                .map_or_else(|| "?".into(), |i| i.to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The leader node of each listed quorum queue that the node knows.
pub(crate) fn leaders(node: &LocalNode, queues: &[String]) -> BenchResult<Vec<String>> {
    tokio::task::block_in_place(|| local_broker::queue_leaders(node, queues)).map_err(Into::into)
}
