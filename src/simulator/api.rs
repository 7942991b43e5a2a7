//! The Novita-shaped HTTP API: the create endpoints, one per model (body
//! validation by the model's rules, directives, quota and faults, billing a
//! task), and the task-result
//! endpoint (the task's answer by the clock, in Novita's JSON shapes, or
//! the hostile variants a directive asks for), the Bearer auth check in
//! front of both, and the flat `{"code","reason","message","metadata"}`
//! error bodies and broken answers (dropped connections, HTML, huge
//! bodies) they can give.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use super::config::{AuthMode, EtaMode};
use super::directives::{parse_directives, Directives};
use super::faults::Fault;
use super::models::{create_path, task_type, ModelSpec, SPECS};
use super::state::{lock, Call, Endpoint, Outcome, Simulator};
use super::tasks::{ceil_secs, progress, Phase, TaskRecord, TaskSnapshot};

/// Path of the `vidu-q3-pro-i2v` create-task endpoint (`POST`); every model
/// in [`MODELS`](super::MODELS) has one at
/// [`create_path`](super::create_path)`(model)`.
pub const CREATE_PATH: &str = "/v3/async/vidu-q3-pro-i2v";
/// Path of the task-result endpoint (`GET ?task_id=<id>`).
pub const TASK_RESULT_PATH: &str = "/v3/async/task-result";
/// `task.task_type` reported for `vidu-q3-pro-i2v` tasks (other models':
/// [`task_type`](super::task_type)).
pub const TASK_TYPE: &str = "VIDU_Q3_PRO_I2V";
pub use super::config::VIDEO_URL_PREFIX;

/// How long a bare `hang` fault sleeps (unless the server shuts down first).
const DEFAULT_HANG: Duration = Duration::from_secs(300);
/// Body of the `garbage` fault.
pub(super) const GARBAGE_BODY: &str = "<html>upstream proxy error</html>";

/// Longest prompt or task id kept per call in the call log.
const CALL_LOG_PROMPT_CHARS: usize = 200;

/// Router state: the simulator plus the token that releases hanging calls.
#[derive(Clone)]
pub(super) struct AppState {
    pub(super) sim: Simulator,
    pub(super) release: CancellationToken,
}

/// The API endpoints: a create endpoint per model and the shared
/// task-result endpoint.
pub(super) fn routes() -> Router<AppState> {
    SPECS
        .iter()
        .fold(Router::new(), |router, spec| {
            router.route(&create_path(spec.name), create_route(spec))
        })
        .route(TASK_RESULT_PATH, get(handle_poll))
}

/// `POST` of one model's create endpoint.
fn create_route(spec: &'static ModelSpec) -> MethodRouter<AppState> {
    post(
        move |State(app): State<AppState>,
              headers: HeaderMap,
              body: Result<Bytes, BytesRejection>| async move {
            app.sim.create(spec, &headers, body, &app.release).await
        },
    )
}

async fn handle_poll(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    app.sim.poll(&headers, query, &app.release).await
}

impl Simulator {
    async fn create(
        &self,
        spec: &'static ModelSpec,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
        release: &CancellationToken,
    ) -> Response {
        let mut call = Call::arrive(Endpoint::Create);
        call.model = Some(spec.name);
        self.note_arrival(&call);
        // Read the body first (cheaply) so the call log can name the request;
        // its problems are answered after auth, quota and faults, as before.
        let parsed = match &body {
            Ok(body) => spec.validate(body),
            Err(rejection) => Err(rejection.body_text()),
        };
        if let Ok(request) = &parsed {
            call.prompt = request
                .get("prompt")
                .and_then(Value::as_str)
                .map(|p| p.chars().take(CALL_LOG_PROMPT_CHARS).collect());
        }
        if let Some(resp) = self.check_auth(Endpoint::Create, headers) {
            return self.finish(&call, resp);
        }
        self.arrive_late(Endpoint::Create).await;
        if let Some(resp) = self.check_quota(headers) {
            return self.finish(&call, resp);
        }
        let after = match self.next_fault(Endpoint::Create) {
            Some(Fault::AcceptThenDrop) => AfterCreate::Drop,
            Some(Fault::AcceptThenGarbage) => AfterCreate::Garbage,
            // Drawn from a mix, lateness is only a delay before the answer.
            Some(Fault::Late(d)) => {
                tokio::time::sleep(d).await;
                AfterCreate::Answer
            }
            Some(fault) => return self.serve_fault(&call, fault, release).await,
            None => AfterCreate::Answer,
        };
        let request = match parsed {
            Ok(request) => request,
            Err(message) => {
                let resp = api_error(StatusCode::BAD_REQUEST, "INVALID_REQUEST_BODY", &message);
                return self.finish(&call, resp);
            }
        };
        let prompt = request.get("prompt").and_then(Value::as_str).unwrap_or("");
        let directives = parse_directives(prompt);
        if let Some(message) = &directives.reject {
            let resp = api_error(StatusCode::BAD_REQUEST, "ILLEGAL_PROMPT", message);
            return self.finish(&call, resp);
        }
        let directives_task_id_bytes = directives.hostile.task_id_bytes;
        let task_id = self.create_task(spec.name, &request, directives);
        call.task_id = Some(task_id.to_string());
        let latency = self.inner.config.create_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match after {
            AfterCreate::Drop => {
                debug!(%task_id, "sim: task created, dropping the connection");
                self.record(&call, Outcome::AcceptThenDrop);
                drop_connection()
            }
            AfterCreate::Garbage => {
                debug!(%task_id, "sim: task created, answering garbage");
                self.record(&call, Outcome::AcceptThenGarbage);
                garbage_response()
            }
            AfterCreate::Answer => {
                debug!(%task_id, "sim: task created");
                let answered = match directives_task_id_bytes {
                    Some(n) => "t".repeat(n),
                    None => task_id.to_string(),
                };
                let resp = Json(json!({ "task_id": answered })).into_response();
                self.finish(&call, resp)
            }
        }
    }

    async fn poll(
        &self,
        headers: &HeaderMap,
        query: Result<Query<HashMap<String, String>>, QueryRejection>,
        release: &CancellationToken,
    ) -> Response {
        let mut call = Call::arrive(Endpoint::Poll);
        self.note_arrival(&call);
        let task_id = query
            .ok()
            .and_then(|Query(mut q)| q.remove("task_id"))
            .filter(|id| !id.is_empty());
        call.task_id = task_id
            .as_deref()
            .map(|t| t.chars().take(CALL_LOG_PROMPT_CHARS).collect());
        if let Some(resp) = self.check_auth(Endpoint::Poll, headers) {
            return self.finish(&call, resp);
        }
        self.arrive_late(Endpoint::Poll).await;
        match self.next_fault(Endpoint::Poll) {
            Some(Fault::Late(d)) => tokio::time::sleep(d).await,
            Some(fault) => return self.serve_fault(&call, fault, release).await,
            None => {}
        }
        let Some(task_id) = task_id else {
            let resp = api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST_BODY",
                "query parameter `task_id` is required",
            );
            return self.finish(&call, resp);
        };
        let now = Instant::now();
        let snapshot = Uuid::parse_str(&task_id)
            .ok()
            .and_then(|id| lock(&self.inner.state).poll_task(&id));
        let resp = match snapshot {
            None => api_error(
                StatusCode::NOT_FOUND,
                "TASK_NOT_FOUND",
                &format!("task {task_id} not found"),
            ),
            Some(snap) => {
                let auth = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                self.task_result(&task_id, &snap, now, auth)
            }
        };
        self.finish(&call, resp)
    }

    fn task_result(
        &self,
        task_id: &str,
        snap: &TaskSnapshot,
        now: Instant,
        auth: &str,
    ) -> Response {
        let elapsed = now.saturating_duration_since(snap.created);
        let p = progress(snap.generation, elapsed);
        if p.phase == Phase::Done && snap.fail500 {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "TASK_FAILED",
                snap.fail.as_deref().unwrap_or("task failed"),
            );
        }
        let config = &self.inner.config;
        let hostile = &snap.hostile;
        let echoed;
        let long_reason;
        let (status, reason) = match (p.phase, &snap.fail) {
            (Phase::Queued, _) => ("TASK_STATUS_QUEUED", ""),
            (Phase::Processing, _) => ("TASK_STATUS_PROCESSING", ""),
            (Phase::Done, _) if hostile.echo_auth => {
                echoed = format!("proxy error; the request's headers were: Authorization: {auth}");
                ("TASK_STATUS_FAILED", echoed.as_str())
            }
            (Phase::Done, _) if hostile.reason_bytes.is_some() => {
                long_reason = "r".repeat(hostile.reason_bytes.unwrap_or(0));
                ("TASK_STATUS_FAILED", long_reason.as_str())
            }
            (Phase::Done, Some(reason)) => ("TASK_STATUS_FAILED", &**reason),
            (Phase::Done, None) => ("TASK_STATUS_SUCCEED", ""),
        };
        let show_eta = config.eta == EtaMode::Honest && !snap.noeta;
        let submit_ms = epoch_ms(snap.created_wall);
        let execute_ms = if p.phase == Phase::Queued {
            0
        } else {
            epoch_ms(snap.created_wall + p.queued)
        };
        let complete_ms = if p.phase == Phase::Done {
            epoch_ms(snap.created_wall + snap.generation)
        } else {
            0
        };

        let mut task = Map::new();
        task.insert("task_id".into(), task_id.into());
        task.insert("task_type".into(), task_type(snap.model).into());
        task.insert("status".into(), status.into());
        if !snap.odd {
            task.insert("reason".into(), reason.into());
        }
        if show_eta {
            task.insert("eta".into(), number_or_string(p.eta_secs, snap.odd));
        }
        task.insert(
            "progress_percent".into(),
            number_or_string(p.percent, snap.odd),
        );

        let mut videos = Vec::new();
        if status == "TASK_STATUS_SUCCEED" {
            let mut video = Map::new();
            video.insert(
                "video_url".into(),
                hostile
                    .video_url
                    .clone()
                    .unwrap_or_else(|| self.video_url(task_id))
                    .into(),
            );
            video.insert(
                "video_url_ttl".into(),
                number_or_string(config.video_url_ttl, !snap.odd),
            );
            video.insert("video_type".into(), "mp4".into());
            if snap.odd {
                video.insert("sim_codec".into(), "h264".into());
            }
            let copies = hostile.videos.unwrap_or(1).max(1);
            videos = vec![Value::Object(video); copies];
        }

        let mut debug_info = Map::new();
        debug_info.insert("submit_time_ms".into(), submit_ms.to_string().into());
        debug_info.insert("execute_time_ms".into(), execute_ms.to_string().into());
        debug_info.insert("complete_time_ms".into(), complete_ms.to_string().into());
        let mut extra = Map::new();
        extra.insert("seed".into(), snap.seed.to_string().into());
        if snap.odd {
            debug_info.insert("sim_worker".into(), "gpu-7".into());
            extra.insert("sim_region".into(), "sim-1".into());
            task.insert("sim_queue_position".into(), 3.into());
        }
        extra.insert("debug_info".into(), Value::Object(debug_info));

        let mut body = Map::new();
        body.insert("extra".into(), Value::Object(extra));
        body.insert("task".into(), Value::Object(task));
        body.insert("videos".into(), Value::Array(videos));
        body.insert("images".into(), Value::Array(Vec::new()));
        body.insert("audios".into(), Value::Array(Vec::new()));
        if snap.odd {
            body.insert("sim_trace".into(), json!({ "hops": [1, 2], "ok": true }));
        }
        match hostile.huge {
            Some(bytes) => huge_response(&Value::Object(body), bytes),
            None => Json(Value::Object(body)).into_response(),
        }
    }

    fn check_auth(&self, endpoint: Endpoint, headers: &HeaderMap) -> Option<Response> {
        let mode = *lock(&self.inner.auth);
        match mode {
            AuthMode::Reject401 => {
                return Some(api_error(
                    StatusCode::UNAUTHORIZED,
                    "INVALID_API_KEY",
                    "invalid api key",
                ))
            }
            AuthMode::Reject403 => {
                return Some(api_error(
                    StatusCode::FORBIDDEN,
                    "API_NOT_ALLOWED",
                    "this api key is not allowed to use this API",
                ))
            }
            AuthMode::Accept | AuthMode::BillingExhausted => {}
        }
        if !self.key_ok(headers) {
            return Some(api_error(
                StatusCode::UNAUTHORIZED,
                "INVALID_API_KEY",
                "missing or invalid api key",
            ));
        }
        if mode == AuthMode::BillingExhausted && endpoint == Endpoint::Create {
            return Some(api_error(
                StatusCode::BAD_REQUEST,
                "BILLING_BALANCE_NOT_ENOUGH",
                "insufficient balance",
            ));
        }
        None
    }

    fn key_ok(&self, headers: &HeaderMap) -> bool {
        let key = bearer_key(headers);
        let config = &self.inner.config;
        match (key, &config.api_key) {
            (None, _) => false,
            (Some(""), _) => false,
            (Some(key), Some(expected)) => {
                key == expected || config.other_keys.iter().any(|k| k == key)
            }
            (Some(_), None) => true,
        }
    }

    /// Waits as long as the script says the call reaches the upstream late.
    async fn arrive_late(&self, endpoint: Endpoint) {
        let late = {
            let mut faults = lock(&self.inner.faults);
            match endpoint {
                Endpoint::Create => faults.create.take_late(),
                Endpoint::Poll => faults.poll.take_late(),
            }
        };
        if let Some(d) = late {
            tokio::time::sleep(d).await;
        }
    }

    fn next_fault(&self, endpoint: Endpoint) -> Option<Fault> {
        let mut faults = lock(&self.inner.faults);
        match endpoint {
            Endpoint::Create => faults.create.next(),
            Endpoint::Poll => faults.poll.next(),
        }
    }

    async fn serve_fault(
        &self,
        call: &Call,
        fault: Fault,
        release: &CancellationToken,
    ) -> Response {
        let endpoint = call.endpoint;
        debug!(endpoint = endpoint.name(), %fault, "sim: serving fault");
        match fault {
            Fault::RateLimited { retry_after_secs } => {
                let mut resp = api_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RATE_LIMIT_EXCEEDED",
                    "rate limit exceeded, please retry later",
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                self.finish(call, resp)
            }
            Fault::ServerError(code) => {
                let status = StatusCode::from_u16(code)
                    .ok()
                    .filter(StatusCode::is_server_error)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let (reason, message) = match (status.as_u16(), endpoint) {
                    (502, _) => ("BAD_GATEWAY", "bad gateway"),
                    (503, _) => ("SERVICE_UNAVAILABLE", "service overloaded, retry later"),
                    (504, _) => ("GATEWAY_TIMEOUT", "gateway timeout"),
                    (_, Endpoint::Create) => ("CREATE_TASK_FAILED", "failed to create task"),
                    (_, Endpoint::Poll) => ("GET_RESULT_FAILED", "failed to get task result"),
                };
                self.finish(call, api_error(status, reason, message))
            }
            Fault::Hang(duration) => {
                self.record(call, Outcome::Hang);
                tokio::select! {
                    () = tokio::time::sleep(duration.unwrap_or(DEFAULT_HANG)) => {}
                    () = release.cancelled() => {}
                }
                api_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "GATEWAY_TIMEOUT",
                    "upstream timed out",
                )
            }
            Fault::Garbage | Fault::AcceptThenGarbage => {
                self.record(call, Outcome::Garbage);
                garbage_response()
            }
            Fault::Drop | Fault::AcceptThenDrop => {
                self.record(call, Outcome::Drop);
                drop_connection()
            }
            // Callers serve lateness themselves; here it is a 504 late.
            Fault::Late(d) => {
                tokio::time::sleep(d).await;
                self.finish(
                    call,
                    api_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "GATEWAY_TIMEOUT",
                        "upstream timed out",
                    ),
                )
            }
        }
    }

    fn create_task(&self, model: &'static str, request: &Value, directives: Directives) -> Uuid {
        let id = Uuid::new_v4();
        let body = canonical_json(request);
        // The same body sent to two models is two requests, not a duplicate.
        let mut hasher = DefaultHasher::new();
        model.hash(&mut hasher);
        body.hash(&mut hasher);
        let body_hash = hasher.finish();
        let seed = request
            .get("seed")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| id.as_u64_pair().0 >> 33);
        let record = TaskRecord {
            spec: TaskSnapshot {
                model,
                created: Instant::now(),
                created_wall: SystemTime::now(),
                generation: directives
                    .generation
                    .unwrap_or(self.inner.config.generation_time),
                seed,
                fail: directives.fail,
                fail500: directives.fail500,
                noeta: directives.noeta,
                odd: directives.odd,
                hostile: directives.hostile,
            },
            body: body.into_boxed_str(),
            polls: 0,
        };
        let mut state = lock(&self.inner.state);
        state.tasks_created += 1;
        *state.tasks_by_model.entry(model).or_default() += 1;
        if !state.body_hashes.insert(body_hash) {
            state.duplicate_creates += 1;
        }
        state.tasks.insert(id, record);
        id
    }

    /// Applies the account quota to a create that passed auth: a create
    /// beyond `creates` in the sliding window is answered 429 with the
    /// seconds until the oldest one leaves the window.
    fn check_quota(&self, headers: &HeaderMap) -> Option<Response> {
        let quota = (*lock(&self.inner.quota))?;
        // With configured keys, they are all one account's: one window.
        // Accepting any key, each key is an account of its own.
        let key = match &self.inner.config.api_key {
            Some(_) => String::new(),
            None => bearer_key(headers).unwrap_or_default().to_owned(),
        };
        let now = Instant::now();
        let wait = lock(&self.inner.state)
            .quota_log
            .entry(key)
            .or_default()
            .admit(now, quota)?;
        let secs = ceil_secs(wait).max(1);
        let mut resp = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMIT_EXCEEDED",
            &format!(
                "rate limit exceeded: {} creates per {}",
                quota.creates,
                humantime::format_duration(quota.window)
            ),
        );
        if quota.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        Some(resp)
    }
}

/// What a create does once the task exists.
enum AfterCreate {
    Answer,
    Drop,
    Garbage,
}

/// The answer for any path the simulator does not serve.
pub(super) async fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
}

/// Novita's flat error body.
pub(super) fn api_error(status: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "code": status.as_u16(),
        "reason": reason,
        "message": message,
        "metadata": {},
    });
    (status, Json(body)).into_response()
}

/// A response whose body fails before its first byte: hyper aborts the
/// connection before flushing anything, so the client sees an I/O error.
fn drop_connection() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "simulated dropped connection",
        ))
    });
    Response::new(Body::from_stream(stream))
}

/// A JSON answer with a `sim_padding` string of about `bytes` bytes in
/// front, streamed in 64 KiB chunks (never held whole).
fn huge_response(body: &Value, bytes: u64) -> Response {
    use futures_util::StreamExt;
    const CHUNK: usize = 64 * 1024;
    let rest = body.to_string();
    let tail = format!("\",{}", rest.strip_prefix('{').unwrap_or(&rest));
    let chunks = bytes.div_ceil(CHUNK as u64);
    let padding = futures_util::stream::iter(0..chunks)
        .map(|_| Ok::<Bytes, io::Error>(Bytes::from_static(&[b'x'; CHUNK])));
    let stream = futures_util::stream::once(async {
        Ok::<Bytes, io::Error>(Bytes::from_static(b"{\"sim_padding\":\""))
    })
    .chain(padding)
    .chain(futures_util::stream::once(async move {
        Ok::<Bytes, io::Error>(Bytes::from(tail))
    }));
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// HTTP 200 with an HTML body: a proxy's error page where JSON was expected.
fn garbage_response() -> Response {
    let mut resp = Response::new(Body::from(GARBAGE_BODY));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

/// The key of an `Authorization: Bearer KEY` header.
fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
}

fn epoch_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn number_or_string(n: u64, as_string: bool) -> Value {
    if as_string {
        Value::String(n.to_string())
    } else {
        Value::from(n)
    }
}

/// Compact JSON with object keys sorted at every level (independent of
/// serde_json's `preserve_order` feature).
fn canonical_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (key, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            leaf => out.push_str(&leaf.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::simulator::test_support::*;
    use crate::simulator::{EndpointFaults, FaultPlan, SimulatorConfig};

    #[tokio::test]
    async fn create_then_poll_until_succeed_with_exact_shapes() {
        let sim = start(Duration::from_millis(300)).await;
        let c = client();
        let resp = create(&c, &sim, &body("a cat")).await;
        assert_eq!(resp.status(), 200);
        let created: Value = resp.json().await.expect("json");
        assert_eq!(keys(&created), ["task_id"]);
        let id = created["task_id"].as_str().expect("id").to_owned();
        assert_eq!(Uuid::parse_str(&id).expect("uuid").get_version_num(), 4);

        let seen = wait_done(&c, &sim, &id).await;
        let mut last_progress = 0;
        for v in &seen {
            assert_eq!(keys(v), ["audios", "extra", "images", "task", "videos"]);
            assert_eq!(keys(&v["extra"]), ["debug_info", "seed"]);
            assert!(v["extra"]["seed"].is_string());
            assert_eq!(
                keys(&v["extra"]["debug_info"]),
                ["complete_time_ms", "execute_time_ms", "submit_time_ms"]
            );
            for k in ["complete_time_ms", "execute_time_ms", "submit_time_ms"] {
                assert!(v["extra"]["debug_info"][k].is_string());
            }
            let task = &v["task"];
            assert_eq!(
                keys(task),
                [
                    "eta",
                    "progress_percent",
                    "reason",
                    "status",
                    "task_id",
                    "task_type"
                ]
            );
            assert_eq!(task["task_id"], id.as_str());
            assert_eq!(task["task_type"], TASK_TYPE);
            assert_eq!(task["reason"], "");
            assert!(task["eta"].is_u64());
            let p = task["progress_percent"].as_u64().expect("progress");
            assert!(p >= last_progress && p <= 100);
            last_progress = p;
            assert_eq!(v["images"], json!([]));
            assert_eq!(v["audios"], json!([]));
            if task["status"] != "TASK_STATUS_SUCCEED" {
                assert_eq!(v["videos"], json!([]));
                assert!(
                    task["status"] == "TASK_STATUS_QUEUED"
                        || task["status"] == "TASK_STATUS_PROCESSING"
                );
            }
        }
        let last = seen.last().expect("last");
        assert_eq!(last["task"]["status"], "TASK_STATUS_SUCCEED");
        assert_eq!(last["task"]["eta"], 0);
        assert_eq!(last["task"]["progress_percent"], 100);
        let videos = last["videos"].as_array().expect("videos");
        assert_eq!(videos.len(), 1);
        assert_eq!(videos[0]["video_url_ttl"], "3600");
        assert_eq!(videos[0]["video_type"], "mp4");
        // Served by the simulator itself, with an expiry.
        let url = videos[0]["video_url"].as_str().expect("url");
        assert!(
            url.starts_with(&format!("{}/videos/{id}.mp4?expires=", sim.base_url())),
            "{url}"
        );
        let video = c.get(url).send().await.expect("video");
        assert_eq!(video.status(), 200);
        assert_eq!(
            video.bytes().await.expect("bytes").len() as u64,
            sim.video_plan().bytes
        );

        let view = sim.task(&id).expect("view");
        assert_eq!(view.status, "TASK_STATUS_SUCCEED");
        assert!(view.done_at.is_some());
        assert_eq!(view.request, body("a cat"));
        assert_eq!(view.polls, seen.len() as u64);

        let stats = sim.stats();
        assert_eq!(stats.create_calls, 1);
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.duplicate_creates, 0);
        assert_eq!(stats.poll_calls, seen.len() as u64);
        assert_eq!(stats.max_polls_per_task, seen.len() as u64);
        assert_eq!(stats.responses["create:200"], 1);
        assert_eq!(stats.responses["poll:200"], seen.len() as u64);
    }

    #[tokio::test]
    async fn eta_absent_mode_and_noeta_directive_omit_eta() {
        let sim = Simulator::start(SimulatorConfig {
            eta: EtaMode::Absent,
            ..config(Duration::from_secs(60))
        })
        .await
        .expect("start");
        let c = client();
        let id = create_id(&c, &sim, "x").await;
        let v = poll_json(&c, &sim, &id).await;
        assert!(v["task"].get("eta").is_none(), "{v}");
        assert!(v["task"].get("progress_percent").is_some());

        let sim = start(Duration::from_secs(60)).await;
        let id = create_id(&c, &sim, "x [sim:noeta]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert!(v["task"].get("eta").is_none(), "{v}");
        let id = create_id(&c, &sim, "x").await;
        let v = poll_json(&c, &sim, &id).await;
        let eta = v["task"]["eta"].as_u64().expect("eta");
        assert!((59..=60).contains(&eta), "{v}");
    }

    #[tokio::test]
    async fn auth_rules() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        let url = format!("{}{CREATE_PATH}", sim.base_url());
        let id = create_id(&c, &sim, "x").await;

        let resp = c.post(&url).json(&body("x")).send().await.expect("send");
        let (status, v) = error_body(resp).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (401, Some("INVALID_API_KEY"))
        );
        let resp = c
            .post(&url)
            .bearer_auth("wrong")
            .json(&body("x"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 401);
        let resp = c
            .get(format!("{}{TASK_RESULT_PATH}?task_id={id}", sim.base_url()))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 401);

        // Auth is checked before faults: the script is not consumed by a 401.
        sim.set_faults(FaultPlan {
            create: EndpointFaults {
                script: vec![Fault::ServerError(503)],
                ..EndpointFaults::default()
            },
            ..FaultPlan::default()
        });
        sim.set_auth(AuthMode::Reject401);
        let (status, v) = error_body(create(&c, &sim, &body("x")).await).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (401, Some("INVALID_API_KEY"))
        );
        assert_eq!(poll(&c, &sim, &id).await.status(), 401);
        sim.set_auth(AuthMode::Reject403);
        let (status, v) = error_body(create(&c, &sim, &body("x")).await).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (403, Some("API_NOT_ALLOWED"))
        );
        assert_eq!(poll(&c, &sim, &id).await.status(), 403);
        sim.set_auth(AuthMode::BillingExhausted);
        let (status, v) = error_body(create(&c, &sim, &body("x")).await).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (400, Some("BILLING_BALANCE_NOT_ENOUGH"))
        );
        assert_eq!(poll(&c, &sim, &id).await.status(), 200);
        sim.set_auth(AuthMode::Accept);
        assert_eq!(create(&c, &sim, &body("x")).await.status(), 503);
        assert_eq!(create(&c, &sim, &body("x")).await.status(), 200);
        assert_eq!(sim.stats().tasks_created, 2);

        // No configured key: any non-empty key works.
        let open = Simulator::start(SimulatorConfig::default())
            .await
            .expect("start");
        let url = format!("{}{CREATE_PATH}", open.base_url());
        let resp = c
            .post(&url)
            .bearer_auth("anything")
            .json(&body("x"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        let resp = c
            .post(&url)
            .header("authorization", "Bearer ")
            .json(&body("x"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 401);
    }

    #[tokio::test]
    async fn body_validation() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        let url = format!("{}{CREATE_PATH}", sim.base_url());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "JSON"),
            (b"[1]".to_vec(), "object"),
            (br#"{"prompt":"x"}"#.to_vec(), "images"),
            (br#"{"images":"https://a/b.png"}"#.to_vec(), "images"),
            (br#"{"images":[]}"#.to_vec(), "images"),
            (br#"{"images":["a","b"]}"#.to_vec(), "images"),
            (br#"{"images":[1]}"#.to_vec(), "images"),
            (br#"{"images":["a"],"prompt":3}"#.to_vec(), "prompt"),
            (br#"{"images":["a"],"colour":"red"}"#.to_vec(), "colour"),
        ];
        for (raw, field) in cases {
            let resp = c
                .post(&url)
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(raw.clone())
                .send()
                .await
                .expect("send");
            let (status, v) = error_body(resp).await;
            assert_eq!(status, 400, "{}", String::from_utf8_lossy(&raw));
            assert_eq!(v["reason"], "INVALID_REQUEST_BODY");
            let message = v["message"].as_str().expect("message");
            assert!(message.contains(field), "{message} should name {field}");
        }
        let full = json!({
            "images": ["https://example.com/cat.png"], "prompt": "p", "duration": 5,
            "resolution": "720p", "seed": 1, "aspect_ratio": "16:9", "style": "general",
            "audio": "https://example.com/a.mp3", "wm_url": "https://example.com/w.png",
            "wm_position": "top-left", "is_rec": false, "off_peak": false, "watermark": false,
        });
        let resp = create(&c, &sim, &full).await;
        assert_eq!(resp.status(), 200);
        let id = resp.json::<Value>().await.expect("json")["task_id"]
            .as_str()
            .expect("id")
            .to_owned();
        assert_eq!(poll_json(&c, &sim, &id).await["extra"]["seed"], "1");
        assert_eq!(sim.stats().tasks_created, 1);
    }

    #[tokio::test]
    async fn poll_errors() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        let (status, v) = error_body(poll(&c, &sim, &Uuid::new_v4().to_string()).await).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (404, Some("TASK_NOT_FOUND"))
        );
        let (status, _) = error_body(poll(&c, &sim, "not-a-uuid").await).await;
        assert_eq!(status, 404);
        let resp = c
            .get(format!("{}{TASK_RESULT_PATH}", sim.base_url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("send");
        let (status, v) = error_body(resp).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (400, Some("INVALID_REQUEST_BODY"))
        );
    }

    #[test]
    fn canonical_json_sorts_keys_everywhere() {
        let v = json!({"b": 1, "a": {"d": [{"z": 1, "y": "q\"x"}], "c": null}});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":null,"d":[{"y":"q\"x","z":1}]},"b":1}"#
        );
    }
}
