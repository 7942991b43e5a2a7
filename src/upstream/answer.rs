//! What the upstream answers, read liberally and bounded: task ids, task
//! states and results, videos and their URLs, error bodies. Numbers may come
//! as strings, fields may be missing or unknown (a poller that breaks on an
//! odd answer loses a video), but every value that leaves this module is
//! checked and of bounded size, and nothing here calls the upstream.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize};

/// Longest upstream message kept in errors and events.
pub(super) const MAX_MESSAGE_CHARS: usize = 500;
/// Longest excerpt of an unreadable answer kept in errors and events.
pub(super) const MAX_EXCERPT_CHARS: usize = 200;

/// Longest task id accepted from the upstream.
pub const MAX_TASK_ID_CHARS: usize = 128;

/// Whether `id` can be a task id: 1 to 128 printable ASCII characters (it
/// goes into tickets, events and a query string).
pub fn valid_task_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_TASK_ID_CHARS && id.bytes().all(|b| b.is_ascii_graphic())
}

/// An upstream task id, as checked by [`valid_task_id`]: what a create
/// answer, a ticket or a journal record names a task by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    /// `id`, if it can be a task id.
    pub fn parse(id: &str) -> Option<Self> {
        valid_task_id(id).then(|| Self(id.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TaskId {
    type Error = &'static str;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        if valid_task_id(&id) {
            Ok(Self(id))
        } else {
            Err("task_id is not 1 to 128 printable characters")
        }
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> Self {
        id.0
    }
}

/// A state of a task that is still running, as progress events and
/// tickets name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunningStatus {
    /// Waiting to start.
    Queued,
    /// Generating.
    Processing,
}

impl RunningStatus {
    /// The name events and metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Processing => "processing",
        }
    }
}

/// Upstream task states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    /// Waiting to start.
    Queued,
    /// Generating.
    Processing,
    /// Done, videos ready.
    Succeeded,
    /// Ended in failure; see the reason.
    Failed,
    /// `TASK_STATUS_UNKNOWN`, a missing status, or a value we do not know:
    /// treated as not finished.
    Unknown,
}

impl TaskStatus {
    /// The running state this is, if the task is still running.
    pub fn running(&self) -> Option<RunningStatus> {
        match self {
            Self::Queued => Some(RunningStatus::Queued),
            Self::Processing => Some(RunningStatus::Processing),
            _ => None,
        }
    }
}

/// One generated video.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Video {
    /// Where to download it (expires).
    pub url: String,
    /// Seconds the URL stays valid; `None` when the upstream did not say
    /// (a `0` is read as "not said": it has been seen on live URLs).
    pub ttl_seconds: Option<u64>,
    /// Container type, e.g. `mp4`.
    pub kind: Option<String>,
}

/// A task-result answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    /// Task state.
    pub status: TaskStatus,
    /// Failure reason, when failed.
    pub reason: Option<String>,
    /// Estimated time left.
    pub eta: Option<Duration>,
    /// Progress, 0..=100.
    pub progress_percent: Option<u8>,
    /// Videos, once succeeded (at most [`MAX_VIDEOS`], each URL checked).
    pub videos: Vec<Video>,
    /// What was wrong with a video the answer listed (a URL that is not
    /// http(s), or too long), if anything: the task cannot be reported as a
    /// success with it.
    pub bad_video: Option<String>,
}

/// Most videos reported for one task (the rest are dropped).
pub const MAX_VIDEOS: usize = 16;
/// Longest video URL accepted.
pub const MAX_VIDEO_URL_BYTES: usize = 2048;
/// Largest answer read from the upstream; the rest is never read.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Why a video URL cannot be handed to consumers, if it cannot.
pub fn video_url_problem(url: &str) -> Option<String> {
    if url.len() > MAX_VIDEO_URL_BYTES {
        return Some(format!(
            "a video URL of {} bytes (at most {MAX_VIDEO_URL_BYTES})",
            url.len()
        ));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some("a video URL with spaces or control characters".into());
    }
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => None,
        Ok(u) => Some(format!(
            "a video URL with the scheme {:?}, not http(s)",
            clean_text(u.scheme(), 16)
        )),
        Err(_) => Some("a video URL that does not parse".into()),
    }
}

/// Text from the network made fit for events and logs: control characters
/// dropped, at most `max` characters (with an ellipsis).
pub fn clean_text(text: &str, max: usize) -> String {
    let kept: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(max + 1)
        .collect();
    truncate_to(kept.trim(), max)
}

impl TaskResult {
    /// Parses a task-result body; `Err` only when it is not a JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            // serde would read a struct from an array too; only objects count.
            return Err(serde::de::Error::custom("the answer is not a JSON object"));
        }
        let raw: RawResult = serde_json::from_slice(body)?;
        let task = raw.task.unwrap_or_default();
        let status = match task.status.as_deref().map(str::trim) {
            Some("TASK_STATUS_QUEUED") => TaskStatus::Queued,
            Some("TASK_STATUS_PROCESSING") => TaskStatus::Processing,
            Some("TASK_STATUS_SUCCEED") | Some("TASK_STATUS_SUCCEEDED") => TaskStatus::Succeeded,
            Some("TASK_STATUS_FAILED") => TaskStatus::Failed,
            _ => TaskStatus::Unknown,
        };
        let mut bad_video = None;
        let videos = raw
            .videos
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| {
                let url = v.video_url.filter(|u| !u.trim().is_empty())?;
                if let Some(problem) = video_url_problem(&url) {
                    bad_video.get_or_insert(problem);
                    return None;
                }
                Some(Video {
                    url,
                    ttl_seconds: v
                        .video_url_ttl
                        .filter(|t| *t >= 1.0 && t.is_finite())
                        .map(|t| t as u64),
                    kind: v.video_type.filter(|t| {
                        !t.is_empty() && t.len() <= 32 && t.bytes().all(|b| b.is_ascii_graphic())
                    }),
                })
            })
            .take(MAX_VIDEOS)
            .collect();
        Ok(Self {
            status,
            bad_video,
            reason: task
                .reason
                .map(|r| clean_text(&r, MAX_MESSAGE_CHARS))
                .filter(|r| !r.is_empty()),
            eta: task
                .eta
                .filter(|e| e.is_finite() && *e >= 0.0)
                .map(|e| Duration::from_secs_f64(e.min(7.0 * 86400.0))),
            progress_percent: task
                .progress_percent
                .filter(|p| p.is_finite())
                .map(|p| p.clamp(0.0, 100.0) as u8),
            videos,
        })
    }
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(default, deserialize_with = "lenient")]
    task: Option<RawTask>,
    #[serde(default, deserialize_with = "lenient")]
    videos: Option<Vec<RawVideo>>,
}

#[derive(Deserialize, Default)]
struct RawTask {
    #[serde(default, deserialize_with = "lenient")]
    status: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    reason: Option<String>,
    #[serde(default, deserialize_with = "number")]
    eta: Option<f64>,
    #[serde(default, deserialize_with = "number")]
    progress_percent: Option<f64>,
}

#[derive(Deserialize)]
struct RawVideo {
    #[serde(default, deserialize_with = "lenient")]
    video_url: Option<String>,
    #[serde(default, deserialize_with = "number")]
    video_url_ttl: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    video_type: Option<String>,
}

/// A field of the wrong shape reads as absent instead of failing the whole answer.
fn lenient<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = serde_json::Value::deserialize(de)?;
    Ok(serde_json::from_value(value).ok())
}

/// A number, or a string holding one; anything else reads as absent.
fn number<'de, D>(de: D) -> Result<Option<f64>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(match serde_json::Value::deserialize(de)? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    })
}

/// An upstream error body: flat, nested, or neither.
pub(super) fn error_body(body: &[u8]) -> (String, String) {
    #[derive(Deserialize)]
    struct Flat {
        #[serde(default, deserialize_with = "lenient")]
        reason: Option<String>,
        #[serde(default, deserialize_with = "lenient")]
        message: Option<String>,
        #[serde(default, deserialize_with = "lenient")]
        error: Option<Nested>,
    }
    #[derive(Deserialize)]
    struct Nested {
        #[serde(default)]
        code: serde_json::Value,
        #[serde(default, deserialize_with = "lenient")]
        message: Option<String>,
    }
    if let Ok(flat) = serde_json::from_slice::<Flat>(body) {
        if flat.reason.is_some() || flat.message.is_some() {
            return (
                flat.reason.unwrap_or_default(),
                flat.message.unwrap_or_default(),
            );
        }
        if let Some(nested) = flat.error {
            let code = match nested.code {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            return (code, nested.message.unwrap_or_default());
        }
    }
    (
        String::new(),
        String::from_utf8_lossy(body).trim().to_owned(),
    )
}

pub(super) fn truncate(s: &str) -> String {
    truncate_to(s, MAX_MESSAGE_CHARS)
}

pub(super) fn truncate_to(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// The start of a body as text without control characters, for messages.
pub(super) fn printable(body: &[u8]) -> String {
    let head = &body[..body.len().min(4 * MAX_EXCERPT_CHARS)];
    String::from_utf8_lossy(head)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}
