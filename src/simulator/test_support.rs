//! Helpers for the simulator's unit tests: a simulator on a random port
//! with a known key, a client, and the create and poll calls the tests make.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{
    create_path, EndpointFaults, Fault, FaultPlan, RunningSimulator, Simulator, SimulatorConfig,
    CREATE_PATH, TASK_RESULT_PATH,
};

pub(super) const KEY: &str = "test-key";

pub(super) fn config(generation: Duration) -> SimulatorConfig {
    SimulatorConfig {
        api_key: Some(KEY.to_owned()),
        generation_time: generation,
        ..SimulatorConfig::default()
    }
}

pub(super) async fn start(generation: Duration) -> RunningSimulator {
    Simulator::start(config(generation)).await.expect("start")
}

pub(super) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

pub(super) fn body(prompt: &str) -> Value {
    json!({
        "images": ["https://example.com/cat.png"],
        "prompt": prompt,
        "duration": 5,
        "resolution": "720p",
    })
}

pub(super) async fn create(
    c: &reqwest::Client,
    sim: &RunningSimulator,
    body: &Value,
) -> reqwest::Response {
    c.post(format!("{}{CREATE_PATH}", sim.base_url()))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .expect("create send")
}

/// A create call to `model`'s endpoint.
pub(super) async fn create_at(
    c: &reqwest::Client,
    sim: &RunningSimulator,
    model: &str,
    body: &Value,
) -> reqwest::Response {
    c.post(format!("{}{}", sim.base_url(), create_path(model)))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .expect("create send")
}

pub(super) async fn create_id(c: &reqwest::Client, sim: &RunningSimulator, prompt: &str) -> String {
    let resp = create(c, sim, &body(prompt)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    v["task_id"].as_str().expect("task_id").to_owned()
}

pub(super) async fn poll(
    c: &reqwest::Client,
    sim: &RunningSimulator,
    id: &str,
) -> reqwest::Response {
    c.get(format!("{}{TASK_RESULT_PATH}", sim.base_url()))
        .query(&[("task_id", id)])
        .bearer_auth(KEY)
        .send()
        .await
        .expect("poll send")
}

pub(super) async fn poll_json(c: &reqwest::Client, sim: &RunningSimulator, id: &str) -> Value {
    let resp = poll(c, sim, id).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

pub(super) async fn error_body(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.expect("error json");
    assert_eq!(v["code"], status, "{v}");
    assert_eq!(v["metadata"], json!({}), "{v}");
    assert!(v["message"].is_string(), "{v}");
    (status, v)
}

pub(super) fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

pub(super) async fn wait_done(c: &reqwest::Client, sim: &RunningSimulator, id: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    loop {
        let v = poll_json(c, sim, id).await;
        let status = v["task"]["status"].as_str().expect("status").to_owned();
        seen.push(v);
        if status == "TASK_STATUS_SUCCEED" || status == "TASK_STATUS_FAILED" {
            return seen;
        }
        assert!(Instant::now() < deadline, "task never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) fn plan_for(create: Vec<Fault>, poll: Vec<Fault>) -> FaultPlan {
    FaultPlan {
        create: EndpointFaults {
            script: create,
            ..EndpointFaults::default()
        },
        poll: EndpointFaults {
            script: poll,
            ..EndpointFaults::default()
        },
    }
}

pub(super) fn f(s: &str) -> Fault {
    s.parse().expect("fault")
}
