//! The project's test kit: what the integration suite, the upgrade test and
//! the benchmark share to run the real thing. A per-test deployment (unique
//! queue and exchange names on a real RabbitMQ, the simulator over real
//! HTTP, everything deleted on drop), worker child processes, an event tap,
//! the broker the tests share (the machine's on 127.0.0.1:5672, or one
//! private node for the whole run) and private nodes and clusters for tests
//! that break a broker, and a real S3-compatible server ([`S3Server`]).
//! Waits are on conditions with deadlines
//! ([`eventually`]), never fixed sleeps. Test code: failures panic with
//! what was expected.

mod broker;
mod deployment;
mod s3;
mod tap;
mod worker;

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use vidu_worker::simulator::SimulatorConfig;

pub use broker::{
    close_worker_connection, connect_any, private_cluster, private_node, private_node_with,
    shared_broker, SharedBroker, STARTUP,
};
pub use deployment::{
    assert_succeeded_once, one_terminal_id_each, publish_through, queue_args, refuse_events,
    Deployment, TestEnv,
};
pub use s3::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
pub use tap::{EventTap, SeenEvent};
pub use vidu_worker::local_broker::{LocalNode, NodeOptions, NodeTls};
pub use worker::{worker_binary, WorkerProcess};

/// The simulator's API key, unless a test gives its own.
pub const API_KEY: &str = "sk-test-0123456789";

/// Waits until `f` returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match try_eventually(timeout, f).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Asks `f` every 50 ms until it returns `Some`; `None` after `timeout`.
pub async fn try_eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A valid request body.
pub fn request(id: &str, prompt: &str) -> Value {
    serde_json::json!({
        "request_id": id,
        "input": {
            "images": ["https://example.com/cat.png"],
            "prompt": format!("{prompt} {id}"),
            "duration": 5
        }
    })
}

/// Simulator settings with a short generation time.
pub fn sim(generation: Duration) -> SimulatorConfig {
    SimulatorConfig {
        generation_time: generation,
        ..SimulatorConfig::default()
    }
}
