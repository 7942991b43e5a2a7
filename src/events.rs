//! Events: the CloudEvents 1.0 messages downstream consumers receive.
//!
//! This module builds the structured-mode JSON envelope and the AMQP
//! properties of every event, and derives event ids deterministically from
//! the request id, so a re-published event keeps its id and consumers can
//! de-duplicate. It never publishes (that is the broker's job) and never puts
//! anything secret or unbounded into an event.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::{request::RequestId, storage::StoredCopy, trace::TraceParent, upstream::Video};

/// `type` of the event sent when the upstream accepted the task.
pub const SUBMITTED: &str = "video.generation.submitted";
/// Binding pattern that matches every event type (`video.generation.#`).
pub const ALL_TYPES: &str = "video.generation.#";
/// `type` of the event sent when status or progress changed.
pub const PROGRESS: &str = "video.generation.progress";
/// `type` of the terminal success event.
pub const SUCCEEDED: &str = "video.generation.succeeded";
/// `type` of the terminal failure event.
pub const FAILED: &str = "video.generation.failed";
/// AMQP content type of every event.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// Namespace of the UUID v5 event ids.
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5d1c_6f3a_8b9e_4c27_a1f0_3e6d_2b7c_9a41);

/// Why a request failed (the `error.code` of a failed event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The request was not valid; it was never sent upstream.
    InvalidRequest,
    /// The upstream refused to create the task.
    UpstreamRejected,
    /// The task ended failed upstream.
    UpstreamFailed,
    /// The upstream answered the create with something that is not a task
    /// id: a task may exist and be billed; the request is not created again.
    UpstreamUnconfirmed,
    /// The task outlived `polling.max_task_age` (or the off-peak age).
    TimedOut,
    /// The task succeeded upstream but its video could not be stored (the
    /// event carries the upstream's videos).
    StorageFailed,
    /// A cancel for the request arrived: never created, or created and no
    /// longer tracked.
    Canceled,
    /// Its `deadline` passed before its create was sent.
    Expired,
}

impl FailureCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::UpstreamRejected => "upstream_rejected",
            Self::UpstreamFailed => "upstream_failed",
            Self::UpstreamUnconfirmed => "upstream_unconfirmed",
            Self::TimedOut => "timed_out",
            Self::StorageFailed => "storage_failed",
            Self::Canceled => "canceled",
            Self::Expired => "expired",
        }
    }
}

/// What every event of one request shares.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    /// The request id (`subject`).
    pub request_id: &'a RequestId,
    /// Producer metadata, echoed unchanged.
    pub metadata: Option<&'a RawValue>,
    /// AMQP `correlation_id` of the request.
    pub correlation_id: Option<&'a str>,
    /// AMQP `reply_to` of the request (terminal events only).
    pub reply_to: Option<&'a str>,
    /// W3C trace context of the request.
    pub traceparent: Option<&'a TraceParent>,
}

/// The variable part of an event.
#[derive(Debug, Clone)]
pub enum EventKind<'a> {
    /// The upstream accepted the task.
    Submitted {
        /// Upstream task id.
        task_id: &'a str,
        /// Model name.
        model: &'a str,
    },
    /// Status or progress changed.
    Progress {
        /// Upstream task id.
        task_id: &'a str,
        /// `queued` or `processing`.
        status: &'static str,
        /// Percent done.
        progress_percent: Option<u8>,
        /// Seconds left, as the upstream estimates.
        eta_seconds: Option<u64>,
    },
    /// Terminal: the video is ready.
    Succeeded {
        /// Upstream task id.
        task_id: &'a str,
        /// The videos (the first is `video_url`).
        videos: &'a [Video],
        /// When the upstream accepted the task.
        submitted_at: DateTime<Utc>,
        /// When the worker saw it finished.
        completed_at: DateTime<Utc>,
        /// The copies in the bucket (empty without `storage.bucket`).
        stored: &'a [StoredCopy],
    },
    /// Terminal: the request failed.
    Failed {
        /// Upstream task id, when there was one.
        task_id: Option<&'a str>,
        /// Failure code.
        code: FailureCode,
        /// Human explanation naming the field or the upstream's reason.
        message: &'a str,
        /// The upstream's videos, when they could not be stored.
        videos: &'a [Video],
    },
}

impl EventKind<'_> {
    /// The CloudEvents `type`.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Submitted { .. } => SUBMITTED,
            Self::Progress { .. } => PROGRESS,
            Self::Succeeded { .. } => SUCCEEDED,
            Self::Failed { .. } => FAILED,
        }
    }

    /// Whether this ends the request.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded { .. } | Self::Failed { .. })
    }
}

/// A serialized event ready to publish.
#[derive(Debug, Clone)]
pub struct Event {
    /// CloudEvents id = AMQP message_id.
    pub id: String,
    /// CloudEvents type = routing key.
    pub event_type: &'static str,
    /// Structured-mode JSON.
    pub body: Vec<u8>,
    /// AMQP properties.
    pub properties: BasicProperties,
    /// Where the terminal event also goes (default exchange).
    pub reply_to: Option<String>,
}

/// The deterministic id of an event of `request_id`.
///
/// Both terminal events share one id, so a request can never end in two
/// distinct terminal event ids; progress ids include the state they report.
pub fn event_id(request_id: &RequestId, kind: &EventKind<'_>) -> String {
    let name = match kind {
        EventKind::Submitted { .. } => format!("{request_id}/submitted"),
        EventKind::Progress {
            status,
            progress_percent,
            ..
        } => format!(
            "{request_id}/progress/{status}/{}",
            progress_percent.map_or(-1, i16::from)
        ),
        EventKind::Succeeded { .. } | EventKind::Failed { .. } => {
            format!("{request_id}/terminal")
        }
    };
    uuid::Uuid::new_v5(&ID_NAMESPACE, name.as_bytes()).to_string()
}

#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'static str,
    time: String,
    subject: &'a str,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a TraceParent>,
    data: Data<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Submitted {
        request_id: &'a str,
        task_id: &'a str,
        model: &'a str,
        metadata: Option<&'a RawValue>,
    },
    Progress {
        request_id: &'a str,
        task_id: &'a str,
        status: &'static str,
        progress_percent: Option<u8>,
        eta_seconds: Option<u64>,
        metadata: Option<&'a RawValue>,
    },
    Succeeded {
        request_id: &'a str,
        task_id: &'a str,
        video_url: &'a str,
        videos: Vec<VideoOut<'a>>,
        submitted_at: String,
        completed_at: String,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        stored: &'a [StoredCopy],
        metadata: Option<&'a RawValue>,
    },
    Failed {
        request_id: &'a str,
        task_id: Option<&'a str>,
        error: ErrorOut<'a>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        videos: Vec<VideoOut<'a>>,
        metadata: Option<&'a RawValue>,
    },
}

#[derive(Serialize)]
struct VideoOut<'a> {
    url: &'a str,
    ttl_seconds: Option<u64>,
    #[serde(rename = "type")]
    kind: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    code: &'static str,
    message: &'a str,
}

fn videos_out(videos: &[Video]) -> Vec<VideoOut<'_>> {
    videos
        .iter()
        .map(|v| VideoOut {
            url: &v.url,
            ttl_seconds: v.ttl_seconds,
            kind: v.kind.as_deref(),
        })
        .collect()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Builds an event for one request.
pub fn build(source: &str, ctx: &RequestContext<'_>, kind: &EventKind<'_>) -> Event {
    let id = event_id(ctx.request_id, kind);
    let request_id = ctx.request_id.as_str();
    let metadata = ctx.metadata;
    let data = match kind {
        EventKind::Submitted { task_id, model } => Data::Submitted {
            request_id,
            task_id,
            model,
            metadata,
        },
        EventKind::Progress {
            task_id,
            status,
            progress_percent,
            eta_seconds,
        } => Data::Progress {
            request_id,
            task_id,
            status,
            progress_percent: *progress_percent,
            eta_seconds: *eta_seconds,
            metadata,
        },
        EventKind::Succeeded {
            task_id,
            videos,
            submitted_at,
            completed_at,
            stored,
        } => Data::Succeeded {
            request_id,
            task_id,
            video_url: videos.first().map_or("", |v| v.url.as_str()),
            videos: videos_out(videos),
            submitted_at: rfc3339(*submitted_at),
            completed_at: rfc3339(*completed_at),
            stored,
            metadata,
        },
        EventKind::Failed {
            task_id,
            code,
            message,
            videos,
        } => Data::Failed {
            request_id,
            task_id: *task_id,
            error: ErrorOut {
                code: code.as_str(),
                message,
            },
            videos: videos_out(videos),
            metadata,
        },
    };
    let envelope = Envelope {
        specversion: "1.0",
        id: &id,
        source,
        event_type: kind.event_type(),
        time: rfc3339(Utc::now()),
        subject: request_id,
        datacontenttype: "application/json",
        traceparent: ctx.traceparent,
        data,
    };
    // Serializing plain structs and already-valid raw JSON cannot fail.
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let mut headers = FieldTable::default();
    if let Some(tp) = ctx.traceparent {
        headers.insert(
            crate::broker::TRACEPARENT_HEADER.into(),
            AMQPValue::LongString(LongString::from(tp.as_str())),
        );
    }
    let mut properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(id.clone().into())
        .with_type(kind.event_type().into())
        .with_timestamp(Utc::now().timestamp().max(0) as u64)
        .with_headers(headers);
    if let Some(c) = ctx.correlation_id {
        properties = properties.with_correlation_id(c.into());
    }
    Event {
        id,
        event_type: kind.event_type(),
        body,
        properties,
        reply_to: if kind.is_terminal() {
            ctx.reply_to.map(str::to_owned)
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> RequestId {
        RequestId::parse(s).expect("valid id")
    }

    #[test]
    fn ids_are_deterministic_and_terminal_events_share_one() {
        let r = rid("order-1");
        let ok = EventKind::Succeeded {
            task_id: "t",
            videos: &[],
            submitted_at: Utc::now(),
            completed_at: Utc::now(),
            stored: &[],
        };
        let failed = EventKind::Failed {
            task_id: None,
            code: FailureCode::TimedOut,
            message: "late",
            videos: &[],
        };
        let submitted = EventKind::Submitted {
            task_id: "t",
            model: "m",
        };
        assert_eq!(event_id(&r, &ok), event_id(&r, &failed));
        assert_eq!(event_id(&r, &submitted), event_id(&r, &submitted));
        assert_ne!(event_id(&r, &submitted), event_id(&r, &ok));
        assert_ne!(event_id(&r, &ok), event_id(&rid("order-2"), &ok));
    }

    #[test]
    fn envelope_follows_cloudevents_structured_mode() {
        let r = rid("order-1");
        let meta = RawValue::from_string(r#"{"user": 42}"#.into()).expect("raw");
        let ctx = RequestContext {
            request_id: &r,
            metadata: Some(&meta),
            correlation_id: Some("corr-9"),
            reply_to: Some("replies"),
            traceparent: None,
        };
        let videos = [Video {
            url: "https://v/1.mp4".into(),
            ttl_seconds: Some(3600),
            kind: Some("mp4".into()),
        }];
        let ev = build(
            "vidu-worker",
            &ctx,
            &EventKind::Succeeded {
                task_id: "task-1",
                videos: &videos,
                submitted_at: Utc::now(),
                completed_at: Utc::now(),
                stored: &[],
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&ev.body).expect("json");
        assert!(v["data"].get("stored").is_none(), "no bucket, no stored");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], ev.id.as_str());
        assert_eq!(v["source"], "vidu-worker");
        assert_eq!(v["type"], SUCCEEDED);
        assert_eq!(v["subject"], "order-1");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"]["video_url"], "https://v/1.mp4");
        assert_eq!(v["data"]["videos"][0]["ttl_seconds"], 3600);
        assert_eq!(v["data"]["videos"][0]["type"], "mp4");
        assert_eq!(v["data"]["metadata"]["user"], 42);
        assert!(chrono::DateTime::parse_from_rfc3339(v["time"].as_str().expect("time")).is_ok());
        assert_eq!(ev.reply_to.as_deref(), Some("replies"));
        assert_eq!(
            ev.properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some("corr-9")
        );
        assert_eq!(
            ev.properties.message_id().as_ref().map(|c| c.as_str()),
            Some(ev.id.as_str())
        );
        assert_eq!(ev.properties.delivery_mode(), &Some(2));
    }

    #[test]
    fn a_stored_copy_and_a_storage_failure_carry_the_contract_s_fields() {
        let r = rid("order-1");
        let ctx = RequestContext {
            request_id: &r,
            metadata: None,
            correlation_id: None,
            reply_to: None,
            traceparent: None,
        };
        let videos = [Video {
            url: "https://v/1.mp4".into(),
            ttl_seconds: Some(3600),
            kind: Some("mp4".into()),
        }];
        let stored = [StoredCopy {
            bucket: "videos".into(),
            key: "order-1/task-1-0.mp4".into(),
            size: 42,
            sha256: "ab".repeat(32),
            etag: "e1".into(),
            url: Some("https://store/videos/order-1/task-1-0.mp4?X-Amz-Signature=s".into()),
            url_expires_at: Some(Utc::now()),
        }];
        let ok = build(
            "s",
            &ctx,
            &EventKind::Succeeded {
                task_id: "task-1",
                videos: &videos,
                submitted_at: Utc::now(),
                completed_at: Utc::now(),
                stored: &stored,
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&ok.body).expect("json");
        let copy = &v["data"]["stored"][0];
        for field in [
            "bucket",
            "key",
            "size",
            "sha256",
            "etag",
            "url",
            "url_expires_at",
        ] {
            assert!(copy.get(field).is_some(), "{field}");
        }
        assert_eq!(copy["size"], 42);
        let failed = build(
            "s",
            &ctx,
            &EventKind::Failed {
                task_id: Some("task-1"),
                code: FailureCode::StorageFailed,
                message: "expired",
                videos: &videos,
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&failed.body).expect("json");
        assert_eq!(v["data"]["error"]["code"], "storage_failed");
        assert_eq!(v["data"]["videos"][0]["url"], "https://v/1.mp4");
        assert_eq!(failed.id, ok.id, "one terminal id");
    }

    #[test]
    fn metadata_is_echoed_byte_for_byte() {
        let r = rid("x");
        let raw = r#"{"z":1,"a":[1.50,{"k":"v"}],"big":123456789012345678901234567890}"#;
        let meta = RawValue::from_string(raw.into()).expect("raw");
        let ctx = RequestContext {
            request_id: &r,
            metadata: Some(&meta),
            correlation_id: None,
            reply_to: None,
            traceparent: None,
        };
        let ev = build(
            "s",
            &ctx,
            &EventKind::Submitted {
                task_id: "t",
                model: "m",
            },
        );
        let text = String::from_utf8(ev.body).expect("utf8");
        assert!(text.contains(raw), "{text}");
        assert!(
            ev.reply_to.is_none(),
            "non-terminal events do not go to reply_to"
        );
    }
}
