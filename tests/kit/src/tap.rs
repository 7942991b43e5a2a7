//! The event tap: every event a deployment publishes, as a consumer sees
//! it, and waits on them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use lapin::{types::AMQPValue, BasicProperties};
use serde_json::Value;
use vidu_worker::events::{FAILED, SUCCEEDED};

use crate::eventually;

/// One event as a consumer sees it.
#[derive(Debug, Clone)]
pub struct SeenEvent {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// When the tap received it.
    pub at: std::time::Instant,
}

impl SeenEvent {
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or_default()
    }
    pub fn subject(&self) -> &str {
        self.body["subject"].as_str().unwrap_or_default()
    }
    pub fn id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }
    pub fn is_terminal(&self) -> bool {
        matches!(self.kind(), SUCCEEDED | FAILED)
    }
}

pub(crate) fn header_strings(props: &BasicProperties) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            let s = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.to_string(),
                other => format!("{other:?}"),
            };
            out.insert(k.to_string(), s);
        }
    }
    out
}

pub(crate) fn seen(routing_key: &str, props: &BasicProperties, data: &[u8]) -> SeenEvent {
    SeenEvent {
        routing_key: routing_key.to_owned(),
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
        content_type: props.content_type().as_ref().map(|s| s.to_string()),
        delivery_mode: *props.delivery_mode(),
        headers: header_strings(props),
        body: serde_json::from_slice(data).unwrap_or(Value::Null),
        at: std::time::Instant::now(),
    }
}

/// Collects every event published to a deployment's exchange.
#[derive(Clone, Default)]
pub struct EventTap {
    pub(crate) events: Arc<Mutex<Vec<SeenEvent>>>,
}

impl EventTap {
    pub fn all(&self) -> Vec<SeenEvent> {
        self.events.lock().expect("tap lock").clone()
    }

    pub fn for_subject(&self, subject: &str) -> Vec<SeenEvent> {
        self.all()
            .into_iter()
            .filter(|e| e.subject() == subject)
            .collect()
    }

    pub fn terminal(&self) -> Vec<SeenEvent> {
        self.all()
            .into_iter()
            .filter(SeenEvent::is_terminal)
            .collect()
    }

    /// Asserts that every terminal event seen so far is `succeeded`, naming
    /// the ones that are not.
    pub fn assert_all_succeeded(&self) {
        let failed: Vec<String> = self
            .terminal()
            .iter()
            .filter(|e| e.kind() != SUCCEEDED)
            .map(|e| format!("{} {}: {}", e.subject(), e.kind(), e.body["data"]))
            .collect();
        assert!(failed.is_empty(), "requests did not succeed: {failed:?}");
    }

    /// Distinct subjects that have a terminal event.
    pub fn finished_subjects(&self) -> std::collections::HashSet<String> {
        self.terminal()
            .iter()
            .map(|e| e.subject().to_owned())
            .collect()
    }

    /// Waits for the terminal event of `subject`.
    pub async fn wait_terminal(&self, subject: &str, timeout: Duration) -> SeenEvent {
        eventually(
            timeout,
            &format!("a terminal event for {subject}"),
            || async {
                self.for_subject(subject)
                    .into_iter()
                    .find(SeenEvent::is_terminal)
            },
        )
        .await
    }

    /// Waits until `n` distinct subjects have terminal events.
    pub async fn wait_finished(&self, n: usize, timeout: Duration) {
        eventually(timeout, &format!("{n} finished requests"), || async {
            (self.finished_subjects().len() >= n).then_some(())
        })
        .await;
    }
}
