//! The Novita client: create a task of one of the six Vidu Q3 models, read a task's result.
//!
//! One HTTP call per method, with the real JSON shapes, a Bearer key marked
//! sensitive (never logged, never in an error) and per-call timeouts.
//! Task-result calls share this worker's poll budget and concurrency bound;
//! creates never wait here (their pacing and quota are taken before the
//! request is taken from the broker), and a create is only sent after its
//! caller confirmed, immediately before the send, that the request's
//! delivery is still alive. Every failure is classified once, here, into an
//! [`UpstreamError`] that says what the caller can do: retry later, pause
//! for the rate limit, stop because the operator must act (key or
//! balance), give the request up, or never create it again (an unreadable
//! success).
//! Answers are parsed liberally (numbers as strings, missing or unknown
//! fields) because a poller that breaks on an odd answer loses a video.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::{
    header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER},
    StatusCode,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{
    config::{ConfigError, UpstreamSettings},
    metrics::Metrics,
    model::{Model, ViduInput},
    retry::{RetryHint, Transient},
    tls,
    trace::{self, TraceParent},
};

mod answer;

pub use answer::{
    clean_text, valid_task_id, video_url_problem, RunningStatus, TaskId, TaskResult, TaskStatus,
    Video, MAX_ANSWER_BYTES, MAX_TASK_ID_CHARS, MAX_VIDEOS, MAX_VIDEO_URL_BYTES,
};
use answer::{error_body, printable, truncate, truncate_to, MAX_EXCERPT_CHARS};

/// Path of the task-result endpoint.
pub const RESULT_PATH: &str = "/v3/async/task-result";

/// What went wrong talking to the upstream, by what the caller can do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The account's rate limit (429): worth retrying after the server's
    /// `Retry-After`; every create of this worker pauses meanwhile.
    #[error("the upstream's rate limit: {detail}")]
    RateLimited {
        /// Status, reason and message.
        detail: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// A create was answered with a success status but no readable task
    /// id: a task may exist and be billed, so the request must not be
    /// created again.
    #[error(
        "the upstream answered the create with HTTP {status} but no readable task id: {excerpt}"
    )]
    Unconfirmed {
        /// HTTP status.
        status: u16,
        /// The start of the answer, scrubbed.
        excerpt: String,
    },
    /// The create was not sent: the delivery it belongs to was lost before
    /// the call (the broker has handed the request to someone else).
    #[error("not sent: the request's delivery was lost before the call")]
    NotSent,
    /// A task-result answer that cannot be used (larger than
    /// [`MAX_ANSWER_BYTES`]): polling again may help, but not for ever.
    #[error("the upstream's answer cannot be used: {detail}")]
    Unusable {
        /// What is wrong with it.
        detail: String,
    },
    /// Worth retrying: 5xx, timeouts, connection errors, garbage.
    #[error("transient upstream error: {detail}")]
    Transient {
        /// What happened (status, reason or failure kind).
        detail: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// The key is missing, wrong or not allowed (401/403): the operator must act.
    #[error("upstream refused the API key: HTTP {status} {reason}")]
    KeyRejected {
        /// HTTP status.
        status: u16,
        /// The upstream's reason code and message.
        reason: String,
    },
    /// The account balance is exhausted: the operator must act.
    #[error("upstream refused for billing: {reason}")]
    Billing {
        /// The upstream's reason and message.
        reason: String,
    },
    /// The upstream refused this particular request (other 4xx).
    #[error("upstream rejected the request: HTTP {status} {reason}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Reason code, e.g. `ILLEGAL_PROMPT`.
        reason: String,
        /// Human message from the upstream.
        message: String,
    },
    /// The task is unknown upstream (404 on task-result).
    #[error("upstream does not know the task: {message}")]
    NotFound {
        /// Upstream message.
        message: String,
    },
    /// The task-result call reported the task as failed (HTTP 500 `TASK_FAILED`).
    #[error("upstream task failed: {message}")]
    TaskFailed {
        /// Upstream message.
        message: String,
    },
}

impl UpstreamError {
    /// Whether the operator, not the request, must act (key or balance).
    pub fn is_operator_problem(&self) -> bool {
        matches!(self, Self::KeyRejected { .. } | Self::Billing { .. })
    }
}

impl Transient for UpstreamError {
    fn retry_hint(&self) -> RetryHint {
        match self {
            Self::Transient { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                RetryHint::After(*retry_after)
            }
            _ => RetryHint::Never,
        }
    }
}

/// The task id asked for to test the API key and the upstream without
/// creating anything: any answer but a 401/403 or an outage means both work.
pub const KEY_PROBE_TASK_ID: &str = "vidu-worker-key-probe";

fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        201 => "201",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        409 => "409",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// An answer, read up to [`MAX_ANSWER_BYTES`].
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Vec<u8>,
    /// The answer was longer than the cap; `body` is its start.
    truncated: bool,
}

/// The Novita API client. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
    /// The create endpoint of each model, in [`Model::ALL`] order.
    create_urls: [reqwest::Url; 6],
    result_url: reqwest::Url,
    key: SecretString,
    /// The task-result budget (`upstream.max_requests_per_second`); creates
    /// are paced by the caller, before it takes a request.
    poll_limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// Task-result calls in flight (`upstream.max_concurrent_requests`).
    polls_in_flight: Arc<tokio::sync::Semaphore>,
    metrics: Metrics,
}

impl UpstreamClient {
    /// Builds the client; fails only on an unusable key, base URL or TLS
    /// setup (`upstream.ca_file`), naming the setting.
    pub fn new(
        settings: &UpstreamSettings,
        key: SecretString,
        metrics: Metrics,
    ) -> Result<Self, ConfigError> {
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", key.expose_secret())).map_err(|_| {
                ConfigError::new(
                    "upstream.api_key",
                    "contains characters not allowed in a header",
                )
            })?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        // TLS is rustls with the system roots, plus `upstream.ca_file`;
        // HTTP(S)_PROXY, ALL_PROXY and NO_PROXY are honoured (reqwest's
        // system proxy).
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .user_agent(concat!("vidu-worker/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(settings.max_concurrent_requests as usize);
        if let Some(path) = &settings.ca_file {
            for cert in tls::load_certificates("upstream.ca_file", path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| {
            ConfigError::new("upstream", format!("cannot build the HTTP client: {e}"))
        })?;
        let base = settings.base_url.trim_end_matches('/');
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{base}{path}"))
                .map_err(|e| ConfigError::new("upstream.base_url", e.to_string()))
        };
        Ok(Self {
            http,
            create_urls: {
                let [a, b, c, d, e, f] = Model::ALL.map(|m| url(&m.create_path()));
                [a?, b?, c?, d?, e?, f?]
            },
            result_url: url(RESULT_PATH)?,
            key,
            poll_limiter: rate_limiter(settings.max_requests_per_second),
            polls_in_flight: Arc::new(tokio::sync::Semaphore::new(
                settings.max_concurrent_requests as usize,
            )),
            metrics,
        })
    }

    /// Creates a task: one HTTP call, no retries, no waiting. `alive` is
    /// asked immediately before the request is sent: when it says the
    /// request's delivery is gone, nothing is sent ([`UpstreamError::NotSent`]),
    /// because the broker has handed the request to someone else. Pacing
    /// and quota are the caller's, before it takes the delivery.
    pub async fn create(
        &self,
        input: &ViduInput,
        traceparent: Option<&TraceParent>,
        alive: &(dyn Fn() -> bool + Sync),
    ) -> Result<TaskId, UpstreamError> {
        let create_url = &self.create_urls[input.model().index()];
        let mut req = self.http.post(create_url.clone()).json(input);
        if let Some(tp) = traceparent {
            req = req.header(trace::HEADER, tp.as_str());
        }
        if !alive() {
            return Err(UpstreamError::NotSent);
        }
        let Answer {
            status,
            retry_after,
            body,
            truncated,
        } = self.send("create", req).await?;
        if status.is_success() {
            #[derive(Deserialize)]
            struct Created {
                task_id: String,
            }
            if truncated {
                self.metrics.upstream_call("create", "too_large");
                return Err(UpstreamError::Unconfirmed {
                    status: status.as_u16(),
                    excerpt: format!("an answer of more than {MAX_ANSWER_BYTES} bytes"),
                });
            }
            return match serde_json::from_slice::<Created>(&body) {
                Ok(c) => match TaskId::parse(&c.task_id) {
                    Some(id) => Ok(id),
                    None => {
                        self.metrics.upstream_call("create", "garbage");
                        Err(UpstreamError::Unconfirmed {
                            status: status.as_u16(),
                            excerpt: format!(
                                "a task_id of {} bytes that is not 1 to {MAX_TASK_ID_CHARS} printable characters",
                                c.task_id.len()
                            ),
                        })
                    }
                },
                _ => {
                    self.metrics.upstream_call("create", "garbage");
                    Err(UpstreamError::Unconfirmed {
                        status: status.as_u16(),
                        excerpt: truncate_to(&self.scrub(&printable(&body)), MAX_EXCERPT_CHARS),
                    })
                }
            };
        }
        Err(self.classify(status, retry_after, &body, false))
    }

    /// Reads a task's state; one HTTP call, no retries.
    pub async fn task_result(
        &self,
        task_id: &str,
        traceparent: Option<&TraceParent>,
    ) -> Result<TaskResult, UpstreamError> {
        if let Some(limiter) = &self.poll_limiter {
            limiter.until_ready().await;
        }
        // Closed only if the client is dropped; a call then simply proceeds.
        let _permit = self.polls_in_flight.acquire().await.ok();
        let mut req = self
            .http
            .get(self.result_url.clone())
            .query(&[("task_id", task_id)]);
        if let Some(tp) = traceparent {
            req = req.header(trace::HEADER, tp.as_str());
        }
        let Answer {
            status,
            retry_after,
            body,
            truncated,
        } = self.send("task_result", req).await?;
        if status.is_success() && truncated {
            self.metrics.upstream_call("task_result", "too_large");
            return Err(UpstreamError::Unusable {
                detail: format!(
                    "task-result answered HTTP {status} with more than {MAX_ANSWER_BYTES} bytes"
                ),
            });
        }
        if status.is_success() {
            return TaskResult::parse(&body)
                .map(|mut r| {
                    r.reason = r.reason.map(|t| self.scrub(&t));
                    r
                })
                .map_err(|_| {
                    self.metrics.upstream_call("task_result", "garbage");
                    UpstreamError::Transient {
                        detail: format!(
                            "task-result answered HTTP {status} with a body that is not JSON"
                        ),
                        retry_after: None,
                    }
                });
        }
        Err(self.classify(status, retry_after, &body, true))
    }

    async fn send(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<Answer, UpstreamError> {
        let fail = |e: reqwest::Error| {
            let kind = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "io"
            };
            self.metrics.upstream_call(endpoint, kind);
            // reqwest's own message is generic ("error sending request"); the
            // cause (a refused certificate, a reset) is further down the chain.
            let e = e.without_url();
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            UpstreamError::Transient {
                detail: format!("{endpoint}: {kind} ({})", self.scrub(&text)),
                retry_after: None,
            }
        };
        let mut resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        let retry_after = if status.is_success() {
            None
        } else {
            parse_retry_after(resp.headers())
        };
        // Read as a stream, at most MAX_ANSWER_BYTES: a huge answer is cut
        // off (the connection dropped), never buffered whole.
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = resp.chunk().await.map_err(fail)? {
            let room = MAX_ANSWER_BYTES - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        self.metrics.upstream_call(endpoint, status_label(status));
        Ok(Answer {
            status,
            retry_after,
            body,
            truncated,
        })
    }

    fn classify(
        &self,
        status: StatusCode,
        retry_after: Option<Duration>,
        body: &[u8],
        polling: bool,
    ) -> UpstreamError {
        let (reason, message) = error_body(body);
        let reason = truncate(&self.scrub(&reason));
        let message = truncate(&self.scrub(&message));
        let code = status.as_u16();
        let upper = reason.to_ascii_uppercase();
        match code {
            401 | 403 => UpstreamError::KeyRejected {
                status: code,
                reason: join(&reason, &message),
            },
            400 if upper.contains("BILLING") || upper.contains("BALANCE") => {
                UpstreamError::Billing {
                    reason: join(&reason, &message),
                }
            }
            400 if upper == "MISSING_API_KEY" => UpstreamError::KeyRejected {
                status: code,
                reason: join(&reason, &message),
            },
            404 if polling => UpstreamError::NotFound {
                message: join(&reason, &message),
            },
            500 if polling && upper == "TASK_FAILED" => UpstreamError::TaskFailed {
                message: if message.is_empty() { reason } else { message },
            },
            429 => UpstreamError::RateLimited {
                detail: format!("HTTP 429 {}", join(&reason, &message)),
                retry_after,
            },
            408 | 425 | 500..=599 => UpstreamError::Transient {
                detail: format!("HTTP {code} {}", join(&reason, &message)),
                retry_after,
            },
            _ => UpstreamError::Rejected {
                status: code,
                reason,
                message,
            },
        }
    }

    /// Removes the key from text that came from the network.
    fn scrub(&self, text: &str) -> String {
        let key = self.key.expose_secret();
        if key.len() >= 4 && text.contains(key) {
            text.replace(key, "[REDACTED]")
        } else {
            text.to_owned()
        }
    }
}

fn join(reason: &str, message: &str) -> String {
    match (reason.is_empty(), message.is_empty()) {
        (false, false) => format!("{reason}: {message}"),
        (false, true) => reason.to_owned(),
        (true, false) => message.to_owned(),
        (true, true) => "(no details)".to_owned(),
    }
}

/// The poll budget: `per_second` on average, with a burst of one second's
/// worth, so tasks that finish together are reported together.
fn rate_limiter(per_second: f64) -> Option<Arc<DefaultDirectRateLimiter>> {
    if per_second <= 0.0 {
        return None;
    }
    let burst =
        NonZeroU32::new(per_second.floor().clamp(1.0, 10_000.0) as u32).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(Duration::from_secs_f64(1.0 / per_second))?.allow_burst(burst);
    Some(Arc::new(RateLimiter::direct(quota)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use answer::MAX_MESSAGE_CHARS;

    fn parse(s: &str) -> TaskResult {
        TaskResult::parse(s.as_bytes()).expect("parses")
    }

    #[test]
    fn the_documented_shape_parses() {
        let r = parse(
            r#"{"extra": {"seed": "1"}, "task": {"task_id": "t1", "task_type": "VIDU_Q3_PRO_I2V",
                "status": "TASK_STATUS_SUCCEED", "reason": "", "eta": 0, "progress_percent": 100},
                "videos": [{"video_url": "https://x/v.mp4", "video_url_ttl": "3600", "video_type": "mp4"}],
                "images": [], "audios": []}"#,
        );
        assert_eq!(r.status, TaskStatus::Succeeded);
        assert_eq!(r.reason, None);
        assert_eq!(r.eta, Some(Duration::ZERO));
        assert_eq!(r.progress_percent, Some(100));
        assert_eq!(
            r.videos,
            vec![Video {
                url: "https://x/v.mp4".into(),
                ttl_seconds: Some(3600),
                kind: Some("mp4".into())
            }]
        );
    }

    #[test]
    fn numbers_as_strings_and_strings_as_numbers_are_read() {
        let r = parse(
            r#"{"task": {"status": "TASK_STATUS_PROCESSING", "eta": "12", "progress_percent": "40.5"},
                "videos": [{"video_url": "https://x/v.mp4", "video_url_ttl": 7200}]}"#,
        );
        assert_eq!(r.status, TaskStatus::Processing);
        assert_eq!(r.eta, Some(Duration::from_secs(12)));
        assert_eq!(r.progress_percent, Some(40));
        assert_eq!(r.videos[0].ttl_seconds, Some(7200));
        assert_eq!(r.videos[0].kind, None);
    }

    #[test]
    fn missing_optional_fields_and_unknown_fields_are_fine() {
        let r =
            parse(r#"{"task": {"status": "TASK_STATUS_QUEUED", "new_field": [1, 2]}, "more": {}}"#);
        assert_eq!(r.status, TaskStatus::Queued);
        assert_eq!(r.eta, None);
        assert_eq!(r.progress_percent, None);
        assert!(r.videos.is_empty());
    }

    #[test]
    fn a_zero_ttl_is_not_an_expired_url() {
        let r = parse(
            r#"{"task": {"status": "TASK_STATUS_SUCCEED"}, "videos": [{"video_url": "https://x/v.mp4", "video_url_ttl": "0"}]}"#,
        );
        assert_eq!(r.videos[0].ttl_seconds, None);
    }

    #[test]
    fn odd_values_read_as_absent_instead_of_failing() {
        let r = parse(
            r#"{"task": {"status": "TASK_STATUS_PROCESSING", "eta": true, "progress_percent": "lots", "reason": 5},
                "videos": null, "images": "none"}"#,
        );
        assert_eq!(r.status, TaskStatus::Processing);
        assert_eq!(r.eta, None);
        assert_eq!(r.progress_percent, None);
        assert_eq!(r.reason, None);
        let r = parse(
            r#"{"task": {"status": "TASK_STATUS_PROCESSING", "eta": -4, "progress_percent": 250}}"#,
        );
        assert_eq!(r.eta, None);
        assert_eq!(r.progress_percent, Some(100));
    }

    #[test]
    fn unknown_and_missing_statuses_mean_not_finished() {
        assert_eq!(
            parse(r#"{"task": {"status": "TASK_STATUS_UNKNOWN"}}"#).status,
            TaskStatus::Unknown
        );
        assert_eq!(
            parse(r#"{"task": {"status": "SOMETHING_NEW"}}"#).status,
            TaskStatus::Unknown
        );
        assert_eq!(parse(r#"{}"#).status, TaskStatus::Unknown);
        assert_eq!(parse(r#"{"task": null}"#).status, TaskStatus::Unknown);
    }

    #[test]
    fn failed_tasks_carry_their_reason() {
        let r = parse(
            r#"{"task": {"status": "TASK_STATUS_FAILED", "reason": "moderation"}, "videos": []}"#,
        );
        assert_eq!(r.status, TaskStatus::Failed);
        assert_eq!(r.reason.as_deref(), Some("moderation"));
    }

    #[test]
    fn hostile_answers_are_bounded_and_cleaned() {
        let many: Vec<String> = (0..200)
            .map(|i| format!(r#"{{"video_url": "https://cdn.x/{i}.mp4"}}"#))
            .collect();
        let r = parse(&format!(
            r#"{{"task": {{"status": "TASK_STATUS_SUCCEED"}}, "videos": [{}]}}"#,
            many.join(",")
        ));
        assert_eq!(r.videos.len(), MAX_VIDEOS);
        assert_eq!(r.bad_video, None);
        let reason = format!("{}\u{1b}[31m{}", "x".repeat(10), "y".repeat(5000));
        let r = parse(
            &serde_json::json!({"task": {"status": "TASK_STATUS_FAILED", "reason": reason}})
                .to_string(),
        );
        let got = r.reason.expect("reason");
        assert!(
            got.chars().count() <= MAX_MESSAGE_CHARS + 1,
            "{}",
            got.len()
        );
        assert!(!got.chars().any(char::is_control));
        let kind = parse(
            r#"{"task": {"status": "TASK_STATUS_SUCCEED"}, "videos": [{"video_url": "https://x/v.mp4", "video_type": "mp4\nforged"}]}"#,
        );
        assert_eq!(kind.videos[0].kind, None);
    }

    #[test]
    fn unusable_video_urls_are_named() {
        let long = format!("https://x/{}", "a".repeat(MAX_VIDEO_URL_BYTES));
        let cases: &[(&str, Option<&str>)] = &[
            ("https://cdn.example.com/v.mp4", None),
            ("http://cdn.example.com/v.mp4?sig=1", None),
            ("javascript:alert(1)", Some("scheme \"javascript\"")),
            ("file:///etc/passwd", Some("scheme \"file\"")),
            ("data:video/mp4;base64,AAAA", Some("scheme \"data\"")),
            ("https://x/a b.mp4", Some("spaces")),
            ("not a url", Some("spaces")),
            ("nourl", Some("does not parse")),
            (&long, Some("bytes")),
        ];
        for (url, want) in cases {
            let got = video_url_problem(url);
            match want {
                None => assert_eq!(got, None, "{url}"),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(w)),
                    "{url}: {got:?}"
                ),
            }
        }
        let r = parse(
            r#"{"task": {"status": "TASK_STATUS_SUCCEED"}, "videos": [{"video_url": "javascript:alert(1)"}]}"#,
        );
        assert!(r.videos.is_empty());
        assert!(r.bad_video.is_some());
    }

    #[test]
    fn task_ids_are_short_and_printable() {
        assert!(valid_task_id("36b249dc-c9e1-4c5c-84b8-0c6714127f21"));
        assert!(!valid_task_id(""));
        assert!(!valid_task_id("a b"));
        assert!(!valid_task_id("a\nb"));
        assert!(!valid_task_id(&"x".repeat(MAX_TASK_ID_CHARS + 1)));
        assert!(valid_task_id(&"x".repeat(MAX_TASK_ID_CHARS)));
    }

    #[test]
    fn non_json_bodies_are_errors() {
        assert!(TaskResult::parse(b"<html>bad gateway</html>").is_err());
        assert!(TaskResult::parse(b"[1,2]").is_err());
    }

    #[test]
    fn error_bodies_parse_flat_then_nested_then_raw() {
        assert_eq!(
            error_body(br#"{"code": 400, "reason": "ILLEGAL_PROMPT", "message": "no"}"#),
            ("ILLEGAL_PROMPT".into(), "no".into())
        );
        assert_eq!(
            error_body(br#"{"error": {"code": "INVALID_API_KEY", "message": "bad key"}}"#),
            ("INVALID_API_KEY".into(), "bad key".into())
        );
        assert_eq!(
            error_body(br#"{"error": {"code": 403, "message": "nope"}}"#),
            ("403".into(), "nope".into())
        );
        assert_eq!(
            error_body(b"gateway timeout"),
            ("".into(), "gateway timeout".into())
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
    }

    fn client() -> UpstreamClient {
        UpstreamClient::new(
            &UpstreamSettings::default(),
            SecretString::from("sk-secret-key"),
            Metrics::new(),
        )
        .expect("client")
    }

    #[test]
    fn classification_decides_retry_reject_or_stop() {
        let c = client();
        let classify = |status: u16, body: &str, polling: bool| {
            c.classify(
                StatusCode::from_u16(status).expect("status"),
                None,
                body.as_bytes(),
                polling,
            )
        };
        assert!(matches!(
            classify(429, "{}", false),
            UpstreamError::RateLimited { .. }
        ));
        assert!(matches!(
            classify(503, "", false),
            UpstreamError::Transient { .. }
        ));
        assert!(matches!(
            classify(500, r#"{"reason":"CREATE_TASK_FAILED"}"#, false),
            UpstreamError::Transient { .. }
        ));
        assert!(matches!(
            classify(401, "", false),
            UpstreamError::KeyRejected { status: 401, .. }
        ));
        assert!(matches!(
            classify(403, r#"{"reason":"INVALID_API_KEY"}"#, true),
            UpstreamError::KeyRejected { status: 403, .. }
        ));
        assert!(matches!(
            classify(
                400,
                r#"{"reason":"BILLING_BALANCE_NOT_ENOUGH","message":"top up"}"#,
                false
            ),
            UpstreamError::Billing { .. }
        ));
        assert!(matches!(
            classify(
                400,
                r#"{"reason":"ILLEGAL_PROMPT","message":"bad words"}"#,
                false
            ),
            UpstreamError::Rejected { status: 400, .. }
        ));
        assert!(matches!(
            classify(404, "{}", true),
            UpstreamError::NotFound { .. }
        ));
        assert!(matches!(
            classify(500, r#"{"reason":"TASK_FAILED","message":"boom"}"#, true),
            UpstreamError::TaskFailed { .. }
        ));
    }

    #[test]
    fn the_key_never_appears_in_errors() {
        let c = client();
        let err = c.classify(
            StatusCode::UNAUTHORIZED,
            None,
            br#"{"reason":"INVALID_API_KEY","message":"key sk-secret-key is not valid"}"#,
            false,
        );
        let text = format!("{err} {err:?}");
        assert!(!text.contains("sk-secret-key"), "{text}");
        assert!(text.contains("[REDACTED]"), "{text}");
    }
}
