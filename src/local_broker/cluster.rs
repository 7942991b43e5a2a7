//! A cluster of private nodes: started in parallel, the others joined to
//! the first with `rabbitmqctl join_cluster`, checked to run together, with
//! the dead-letter setting a cluster should have, and its quorum queues'
//! leaders read from a node.

use std::time::Duration;

use super::{
    node::{LocalNode, NodeOptions},
    setup::Installation,
};

/// How long RabbitMQ's at-least-once dead-letter process waits for a
/// target queue's confirm before it sends again (3.10's default is
/// minutes). Cluster nodes use a short one, as the README advises, so that
/// dead letters held after a node loss move soon after the node is back.
pub const DEAD_LETTER_CONFIRM_TIMEOUT_MS: u32 = 5_000;

/// The options of a cluster's nodes: `options` with the short dead-letter
/// confirm timeout (unless `options` brings an `advanced.config` of its
/// own).
pub fn cluster_options(options: &NodeOptions) -> NodeOptions {
    let mut options = options.clone();
    options.advanced_config.get_or_insert_with(|| {
        format!(
            "[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, {DEAD_LETTER_CONFIRM_TIMEOUT_MS}}}]}}]"
        )
    });
    options
}

/// Starts `n` nodes named `PREFIX-…` and joins them into one cluster (the
/// nodes 2..n join the first), each awaited up to `timeout`. Every node is
/// stopped and its directory removed on drop, also when a later step fails.
pub fn start_cluster(
    tools: &Installation,
    prefix: &str,
    n: usize,
    options: &NodeOptions,
    timeout: Duration,
) -> Result<Vec<LocalNode>, String> {
    let options = cluster_options(options);
    // Launch all, then wait for all: the Erlang nodes boot in parallel.
    let nodes = (0..n)
        .map(|_| LocalNode::launch_with(tools, prefix, &options))
        .collect::<Result<Vec<_>, _>>()?;
    for node in &nodes {
        node.await_startup(timeout)?;
    }
    let Some((first, others)) = nodes.split_first() else {
        return Ok(nodes);
    };
    for node in others {
        node.stop_app()?;
        node.ctl_output(&["join_cluster", first.name()])?;
        node.start_app(timeout)?;
    }
    let status = first.ctl_output(&["cluster_status", "--formatter", "json"])?;
    let running = serde_json::from_str::<serde_json::Value>(&status)
        .ok()
        .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
        .unwrap_or(0);
    if running != n {
        return Err(format!("{running} of {n} cluster nodes running: {status}"));
    }
    Ok(nodes)
}

/// The leader node of each of `queues` that `node` knows (quorum queues).
pub fn queue_leaders(node: &LocalNode, queues: &[String]) -> Result<Vec<String>, String> {
    let out = node.ctl_output(&["list_queues", "name", "leader", "--formatter", "json"])?;
    let rows: Vec<serde_json::Value> =
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
