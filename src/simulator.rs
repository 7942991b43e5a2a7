//! Offline stand-in for Novita's "Vidu Q3 Pro Image-to-Video" async API.
//!
//! This module owns the HTTP simulator used by the tests, the throughput
//! benchmark and the demo (`vidu-worker simulate`). It serves the same
//! endpoints (`POST /v3/async/vidu-q3-pro-i2v`, `GET /v3/async/task-result`),
//! the same `Authorization: Bearer` auth and the same JSON shapes (task
//! results, and the flat `{"code","reason","message","metadata"}` error
//! bodies) as the real service, and adds deterministic fault injection: per
//! task directives embedded in the prompt (`[sim:fail]`, `[sim:gen=20s]`, ...)
//! and call-level fault plans (scripted or seeded-random 429/5xx, hangs,
//! garbage bodies, dropped connections). Unauthenticated `/sim/*` admin
//! endpoints expose counters (calls, billed tasks, duplicate creates, peak
//! calls per second) and the same controls as [`RunningSimulator`].
//!
//! It must never contact the real Novita API or any other network service,
//! never touch the disk, never hold a lock across an `.await`, never log a
//! call above `debug` level, and never create (bill) a task for a faulted
//! create call except through the explicit `accept-then-drop` fault. It is
//! not a security boundary (the admin endpoints have no auth), so it must only
//! ever listen on trusted interfaces.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use uuid::Uuid;

/// Path of the create-task endpoint (`POST`).
pub const CREATE_PATH: &str = "/v3/async/vidu-q3-pro-i2v";
/// Path of the task-result endpoint (`GET ?task_id=<id>`).
pub const TASK_RESULT_PATH: &str = "/v3/async/task-result";
/// `task.task_type` reported for every simulated task.
pub const TASK_TYPE: &str = "VIDU_Q3_PRO_I2V";
/// Prefix of the video URLs handed out: `<prefix><task_id>.mp4`.
pub const VIDEO_URL_PREFIX: &str = "https://sim.novita.local/videos/";

/// Reason used by `[sim:fail]` without a custom text.
const DEFAULT_FAIL_REASON: &str = "content moderation: the image was rejected";
/// Message used by `[sim:reject]` without a custom text.
const DEFAULT_REJECT_MESSAGE: &str = "prompt rejected by content policy";
/// How long a bare `hang` fault sleeps (unless the server shuts down first).
const DEFAULT_HANG: Duration = Duration::from_secs(300);
/// Body of the `garbage` fault.
const GARBAGE_BODY: &str = "<html>upstream proxy error</html>";
/// Width of the window behind `max_calls_in_any_second`.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Most calls the call log keeps (the oldest are dropped).
const CALL_LOG_CAPACITY: usize = 100_000;
/// Longest prompt or task id kept per call in the call log.
const CALL_LOG_PROMPT_CHARS: usize = 200;
/// Top-level fields the create endpoint accepts.
const KNOWN_FIELDS: &[&str] = &[
    "images",
    "prompt",
    "duration",
    "resolution",
    "seed",
    "aspect_ratio",
    "style",
    "audio",
    "wm_url",
    "wm_position",
    "is_rec",
    "off_peak",
    "watermark",
];

// ---------------------------------------------------------------------------
// Public configuration and control types
// ---------------------------------------------------------------------------

/// Static configuration of a [`Simulator`].
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SimulatorConfig {
    /// Bearer key the simulator accepts; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    /// How long a task takes from create to SUCCEED (default 3s). The task is
    /// QUEUED for the first 10% of it and PROCESSING after, with
    /// `progress_percent` rising linearly. `[sim:gen=..]` overrides it per task.
    #[serde(with = "humantime_serde")]
    pub generation_time: Duration,
    /// Whether task-result carries an honest `eta` or omits the field.
    pub eta: EtaMode,
    /// Seconds put in `video_url_ttl` (as a string), default 3600.
    pub video_url_ttl: u64,
    /// The account's create quota at start (none: unlimited); see
    /// [`Simulator::set_quota`].
    pub quota: Option<AccountQuota>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            generation_time: Duration::from_secs(3),
            eta: EtaMode::Honest,
            video_url_ttl: 3600,
            quota: None,
        }
    }
}

/// An account's create quota, as Novita counts it per key: at most
/// `creates` accepted creates in any sliding `window`; a create beyond it is
/// answered 429 `RATE_LIMIT_EXCEEDED` with a `Retry-After` of the whole
/// seconds until the oldest create leaves the window (Novita does not
/// document whether it sends one: `"retry_after": false` leaves it out).
/// Serialized as `{"creates": 40, "window": "60s", "retry_after": true}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountQuota {
    /// Creates admitted per window (at least 1).
    pub creates: u32,
    /// Width of the sliding window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Whether a 429 carries `Retry-After` (default true).
    #[serde(default = "yes")]
    pub retry_after: bool,
}

fn yes() -> bool {
    true
}

impl AccountQuota {
    /// `creates` per minute, with `Retry-After`.
    pub fn per_minute(creates: u32) -> Self {
        Self {
            creates,
            window: Duration::from_secs(60),
            retry_after: true,
        }
    }

    /// The same quota without `Retry-After` on its 429s.
    pub fn without_retry_after(self) -> Self {
        Self {
            retry_after: false,
            ..self
        }
    }
}

/// One API call in the call log (`GET /sim/calls`), oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Milliseconds from the simulator's start (or last reset) to the
    /// call's arrival.
    pub at_ms: u64,
    /// `create` or `poll`.
    pub endpoint: String,
    /// The answer: an HTTP status (`"200"`, `"429"`), or `hang`, `garbage`,
    /// `drop`, `accept-then-drop`, `accept-then-garbage`.
    pub outcome: String,
    /// Polls: the task asked for; creates: the task created, if any.
    pub task_id: Option<String>,
    /// Creates: the request's prompt (first 200 characters).
    pub prompt: Option<String>,
}

impl fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("generation_time", &self.generation_time)
            .field("eta", &self.eta)
            .field("video_url_ttl", &self.video_url_ttl)
            .field("quota", &self.quota)
            .finish()
    }
}

/// Whether task-result reports `task.eta`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EtaMode {
    /// `eta` = whole seconds left, rounded up; 0 once the task has ended.
    #[default]
    Honest,
    /// The `eta` field is omitted entirely.
    Absent,
}

/// How the simulator treats credentials (serde: `"accept"`, `"reject401"`,
/// `"reject403"`, `"billing_exhausted"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Check the Bearer key against [`SimulatorConfig::api_key`]; a missing or
    /// wrong key answers 401 `INVALID_API_KEY`.
    #[default]
    Accept,
    /// Every API call answers 401 `INVALID_API_KEY`.
    Reject401,
    /// Every API call answers 403 `API_NOT_ALLOWED`.
    Reject403,
    /// Keys are checked as in `Accept`, but create answers 400
    /// `BILLING_BALANCE_NOT_ENOUGH`; polls keep working.
    BillingExhausted,
}

/// One injected fault. Serialized as a string: `"429"`, `"429:<secs>"`,
/// `"500"`, `"502"`, `"503"`, `"504"`, `"hang"`, `"hang:<duration>"`,
/// `"garbage"`, `"drop"`, `"accept-then-drop"`, `"accept-then-garbage"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 `RATE_LIMIT_EXCEEDED` with a `Retry-After: <secs>` header.
    RateLimited {
        /// Value of the `Retry-After` header in seconds (`"429"` means 1).
        retry_after_secs: u64,
    },
    /// A 5xx answer with a JSON error body (500, 502, 503 or 504).
    ServerError(u16),
    /// Sleep (default 5 minutes, or until the server shuts down), then answer
    /// 504 `GATEWAY_TIMEOUT`. Never creates a task.
    Hang(Option<Duration>),
    /// HTTP 200 with `text/html` body `<html>upstream proxy error</html>`.
    Garbage,
    /// Abort the connection without sending a response.
    Drop,
    /// Create only: the task IS created (and billed), then the connection is
    /// aborted, so the caller never learns the task id. On polls it acts as
    /// [`Fault::Drop`].
    AcceptThenDrop,
    /// Create only: the task IS created (and billed), then the answer is
    /// HTTP 200 with an HTML body instead of the task id (an unreadable
    /// success). On polls it acts as [`Fault::Garbage`].
    AcceptThenGarbage,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RateLimited {
                retry_after_secs: 1,
            } => f.write_str("429"),
            Self::RateLimited { retry_after_secs } => write!(f, "429:{retry_after_secs}"),
            Self::ServerError(code) => write!(f, "{code}"),
            Self::Hang(None) => f.write_str("hang"),
            Self::Hang(Some(d)) => write!(f, "hang:{}", humantime::format_duration(*d)),
            Self::Garbage => f.write_str("garbage"),
            Self::Drop => f.write_str("drop"),
            Self::AcceptThenDrop => f.write_str("accept-then-drop"),
            Self::AcceptThenGarbage => f.write_str("accept-then-garbage"),
        }
    }
}

/// Error returned when a string is not a valid [`Fault`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fault {input:?}: expected 429, 429:<secs>, 500, 502, 503, 504, hang, \
     hang:<duration>, garbage, drop, accept-then-drop or accept-then-garbage"
)]
pub struct FaultParseError {
    input: String,
}

impl FromStr for Fault {
    type Err = FaultParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let err = || FaultParseError {
            input: s.to_owned(),
        };
        let fault = match s {
            "429" => Self::RateLimited {
                retry_after_secs: 1,
            },
            "500" => Self::ServerError(500),
            "502" => Self::ServerError(502),
            "503" => Self::ServerError(503),
            "504" => Self::ServerError(504),
            "hang" => Self::Hang(None),
            "garbage" => Self::Garbage,
            "drop" => Self::Drop,
            "accept-then-drop" => Self::AcceptThenDrop,
            "accept-then-garbage" => Self::AcceptThenGarbage,
            _ => {
                if let Some(secs) = s.strip_prefix("429:") {
                    Self::RateLimited {
                        retry_after_secs: secs.trim().parse().map_err(|_| err())?,
                    }
                } else if let Some(dur) = s.strip_prefix("hang:") {
                    Self::Hang(Some(
                        humantime::parse_duration(dur.trim()).map_err(|_| err())?,
                    ))
                } else {
                    return Err(err());
                }
            }
        };
        Ok(fault)
    }
}

impl Serialize for Fault {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fault {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Faults for one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointFaults {
    /// Faults served in order to the next calls, one per call, before normal
    /// behaviour resumes (e.g. `["429", "503", "hang", "garbage", "drop"]`).
    pub script: Vec<Fault>,
    /// After the script: probability 0.0..=1.0 that a call gets a random
    /// fault from `mix`.
    pub rate: f64,
    /// Faults drawn (uniformly) for the random part.
    pub mix: Vec<Fault>,
    /// Seed for the random choice so runs are reproducible (default 0).
    pub seed: u64,
}

/// Call-level fault plan for both API endpoints. Faults are applied after the
/// auth checks; a faulted create never creates a task (except
/// `accept-then-drop`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Faults for `POST /v3/async/vidu-q3-pro-i2v`.
    pub create: EndpointFaults,
    /// Faults for `GET /v3/async/task-result`.
    pub poll: EndpointFaults,
}

impl FaultPlan {
    fn validate(&self) -> Result<(), String> {
        for (name, ep) in [("create", &self.create), ("poll", &self.poll)] {
            if !(0.0..=1.0).contains(&ep.rate) {
                return Err(format!("{name}.rate must be within 0.0..=1.0"));
            }
        }
        Ok(())
    }
}

/// Counters kept by the simulator (also served by `GET /sim/stats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimStats {
    /// Every call to the create endpoint, whatever the answer.
    pub create_calls: u64,
    /// Tasks actually created (billed), including `accept-then-drop` ones.
    pub tasks_created: u64,
    /// Created tasks whose canonical JSON request body equals that of an
    /// earlier created task (double spend when bodies carry a request id).
    pub duplicate_creates: u64,
    /// Every call to the task-result endpoint, whatever the answer.
    pub poll_calls: u64,
    /// Answers by `"<endpoint>:<outcome>"`, e.g. `"create:200"`,
    /// `"poll:429"`, `"poll:hang"`, `"create:drop"`, `"poll:garbage"`,
    /// `"create:accept-then-drop"`.
    pub responses: BTreeMap<String, u64>,
    /// Most polls that reached any single existing task.
    pub max_polls_per_task: u64,
    /// Polls that reached an existing task divided by tasks created.
    pub avg_polls_per_task: f64,
    /// Most API calls (create + poll, not admin) whose arrivals fell within
    /// any sliding one-second window.
    pub max_calls_in_any_second: u64,
}

impl SimStats {
    /// How many answers of one kind (`"poll:403"`, …) were given.
    pub fn answered(&self, kind: &str) -> u64 {
        self.responses.get(kind).copied().unwrap_or(0)
    }
}

/// The simulator's own view of a task (`GET /sim/tasks/{task_id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// Task id (UUID v4).
    pub task_id: String,
    /// Current `TASK_STATUS_*` by the clock.
    pub status: String,
    /// When the task was created, RFC 3339 with milliseconds.
    pub created_at: String,
    /// When the task became SUCCEED/FAILED by the clock (RFC 3339 with
    /// milliseconds); `None` while it is still running.
    pub done_at: Option<String>,
    /// Generation time in effect for this task.
    #[serde(with = "humantime_serde")]
    pub generation_time: Duration,
    /// The create request body (keys sorted).
    pub request: Value,
    /// Polls that reached this task.
    pub polls: u64,
}

// ---------------------------------------------------------------------------
// Simulator
// ---------------------------------------------------------------------------

/// The simulated API. Cheap to clone: all clones share one state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimulatorConfig,
    auth: Mutex<AuthMode>,
    quota: Mutex<Option<AccountQuota>>,
    faults: Mutex<FaultState>,
    state: Mutex<SimState>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Router state: the simulator plus the token that releases hanging calls.
#[derive(Clone)]
struct AppState {
    sim: Simulator,
    release: CancellationToken,
}

impl Simulator {
    /// Creates a simulator with no tasks, no faults and [`AuthMode::Accept`].
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                quota: Mutex::new(config.quota),
                config,
                auth: Mutex::new(AuthMode::Accept),
                faults: Mutex::new(FaultState::default()),
                state: Mutex::new(SimState::default()),
            }),
        }
    }

    /// The configuration this simulator was built with.
    pub fn config(&self) -> &SimulatorConfig {
        &self.inner.config
    }

    /// The API and `/sim/*` admin routes. `hang` faults served through this
    /// router end only when their duration elapses; use [`Simulator::serve`]
    /// to also release them on shutdown.
    pub fn router(&self) -> Router {
        self.router_with_release(CancellationToken::new())
    }

    fn router_with_release(&self, release: CancellationToken) -> Router {
        Router::new()
            .route(CREATE_PATH, post(handle_create))
            .route(TASK_RESULT_PATH, get(handle_poll))
            .route("/sim/stats", get(admin_stats))
            .route(
                "/sim/faults",
                get(admin_get_faults)
                    .put(admin_put_faults)
                    .delete(admin_delete_faults),
            )
            .route("/sim/auth", get(admin_get_auth).put(admin_put_auth))
            .route(
                "/sim/quota",
                get(admin_get_quota)
                    .put(admin_put_quota)
                    .delete(admin_delete_quota),
            )
            .route("/sim/calls", get(admin_calls))
            .route("/sim/reset", post(admin_reset))
            .route("/sim/tasks", get(admin_tasks))
            .route("/sim/tasks/{task_id}", get(admin_task))
            .fallback(not_found)
            .with_state(AppState {
                sim: self.clone(),
                release,
            })
    }

    /// Serves the simulator on `listener` until `shutdown` is cancelled, then
    /// shuts down gracefully (hanging calls are released and answered first).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "novita simulator listening");
        }
        let router = self.router_with_release(shutdown.clone());
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    /// Binds `127.0.0.1:0`, spawns [`Simulator::serve`] and returns a handle
    /// that stops the server when dropped.
    pub async fn start(config: SimulatorConfig) -> io::Result<RunningSimulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Self::new(config);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(sim.clone().serve(listener, shutdown.clone()));
        Ok(RunningSimulator {
            sim,
            addr,
            shutdown,
            server: Some(server),
        })
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        lock(&self.inner.state).stats()
    }

    /// Replaces the fault plan (scripts restart, random generators are
    /// re-seeded). Rates are clamped to 0.0..=1.0.
    pub fn set_faults(&self, plan: FaultPlan) {
        *lock(&self.inner.faults) = FaultState::from_plan(plan);
    }

    /// Removes all faults.
    pub fn clear_faults(&self) {
        self.set_faults(FaultPlan::default());
    }

    /// The current fault plan, with only the not yet served part of the scripts.
    pub fn faults(&self) -> FaultPlan {
        lock(&self.inner.faults).plan()
    }

    /// Sets how credentials are treated.
    pub fn set_auth(&self, mode: AuthMode) {
        *lock(&self.inner.auth) = mode;
    }

    /// The current auth mode.
    pub fn auth(&self) -> AuthMode {
        *lock(&self.inner.auth)
    }

    /// Sets (or with `None` removes) the account's create quota. The
    /// window's history is kept, so a quota set mid-run counts the creates
    /// already made.
    pub fn set_quota(&self, quota: Option<AccountQuota>) {
        *lock(&self.inner.quota) = quota;
    }

    /// The account's create quota, if any.
    pub fn quota(&self) -> Option<AccountQuota> {
        *lock(&self.inner.quota)
    }

    /// The call log, oldest first (at most the last 100,000 calls).
    pub fn calls(&self) -> Vec<CallRecord> {
        lock(&self.inner.state)
            .calls
            .records
            .iter()
            .cloned()
            .collect()
    }

    /// Forgets all tasks and zeroes all counters (faults and auth mode stay).
    pub fn reset(&self) {
        *lock(&self.inner.state) = SimState::default();
    }

    /// The simulator's view of one task, if it exists.
    pub fn task(&self, task_id: &str) -> Option<TaskView> {
        let id = Uuid::parse_str(task_id).ok()?;
        let now = Instant::now();
        let state = lock(&self.inner.state);
        state.tasks.get(&id).map(|t| t.view(&id, now))
    }

    /// All tasks whose request body (canonical JSON text) contains `needle`,
    /// oldest first. Linear scan: meant for tests and the admin endpoint.
    pub fn tasks_matching(&self, needle: &str) -> Vec<TaskView> {
        let now = Instant::now();
        let state = lock(&self.inner.state);
        let mut found: Vec<(Instant, TaskView)> = state
            .tasks
            .iter()
            .filter(|(_, t)| t.body.contains(needle))
            .map(|(id, t)| (t.created, t.view(id, now)))
            .collect();
        drop(state);
        found.sort_by_key(|(created, _)| *created);
        found.into_iter().map(|(_, v)| v).collect()
    }

    // --- API behaviour -----------------------------------------------------

    async fn create(
        &self,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
        release: &CancellationToken,
    ) -> Response {
        let mut call = Call::arrive(Endpoint::Create);
        self.note_arrival(Endpoint::Create);
        // Read the body first (cheaply) so the call log can name the request;
        // its problems are answered after auth, quota and faults, as before.
        let parsed = match &body {
            Ok(body) => validate_create_body(body),
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
        if let Some(resp) = self.check_quota(headers) {
            return self.finish(&call, resp);
        }
        let after = match self.next_fault(Endpoint::Create) {
            Some(Fault::AcceptThenDrop) => AfterCreate::Drop,
            Some(Fault::AcceptThenGarbage) => AfterCreate::Garbage,
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
        let task_id = self.create_task(&request, directives);
        call.task_id = Some(task_id.to_string());
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
        self.note_arrival(Endpoint::Poll);
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
        if let Some(fault) = self.next_fault(Endpoint::Poll) {
            return self.serve_fault(&call, fault, release).await;
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
        task.insert("task_type".into(), TASK_TYPE.into());
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
                    .unwrap_or_else(|| format!("{VIDEO_URL_PREFIX}{task_id}.mp4"))
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
        match (key, &self.inner.config.api_key) {
            (None, _) => false,
            (Some(""), _) => false,
            (Some(key), Some(expected)) => key == expected,
            (Some(_), None) => true,
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
        }
    }

    fn create_task(&self, request: &Value, directives: Directives) -> Uuid {
        let id = Uuid::new_v4();
        let body = canonical_json(request);
        let mut hasher = DefaultHasher::new();
        body.hash(&mut hasher);
        let body_hash = hasher.finish();
        let seed = request
            .get("seed")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| id.as_u64_pair().0 >> 33);
        let record = TaskRecord {
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
            body: body.into_boxed_str(),
            polls: 0,
        };
        let mut state = lock(&self.inner.state);
        state.tasks_created += 1;
        if !state.body_hashes.insert(body_hash) {
            state.duplicate_creates += 1;
        }
        state.tasks.insert(id, record);
        id
    }

    fn note_arrival(&self, endpoint: Endpoint) {
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        match endpoint {
            Endpoint::Create => state.create_calls += 1,
            Endpoint::Poll => state.poll_calls += 1,
        }
        state.window.record(now);
    }

    fn record(&self, call: &Call, outcome: Outcome) {
        let endpoint = call.endpoint;
        debug!(endpoint = endpoint.name(), %outcome, "sim: answered");
        let mut state = lock(&self.inner.state);
        *state.responses.entry((endpoint, outcome)).or_default() += 1;
        let at_ms = call
            .at
            .saturating_duration_since(state.started)
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX);
        state.calls.push(CallRecord {
            at_ms,
            endpoint: endpoint.name().to_owned(),
            outcome: outcome.to_string(),
            task_id: call.task_id.clone(),
            prompt: call.prompt.clone(),
        });
    }

    fn finish(&self, call: &Call, resp: Response) -> Response {
        self.record(call, Outcome::Status(resp.status().as_u16()));
        resp
    }

    /// Applies the account quota to a create that passed auth: a create
    /// beyond `creates` in the sliding window is answered 429 with the
    /// seconds until the oldest one leaves the window.
    fn check_quota(&self, headers: &HeaderMap) -> Option<Response> {
        let quota = (*lock(&self.inner.quota))?;
        let key = bearer_key(headers).unwrap_or_default().to_owned();
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

/// A simulator serving on `127.0.0.1:<random port>`; stops the server when
/// dropped.
pub struct RunningSimulator {
    sim: Simulator,
    addr: SocketAddr,
    shutdown: CancellationToken,
    server: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for RunningSimulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningSimulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RunningSimulator {
    /// Address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The shared simulator behind the server.
    pub fn simulator(&self) -> &Simulator {
        &self.sim
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Replaces the fault plan; see [`Simulator::set_faults`].
    pub fn set_faults(&self, plan: FaultPlan) {
        self.sim.set_faults(plan);
    }

    /// Removes all faults.
    pub fn clear_faults(&self) {
        self.sim.clear_faults();
    }

    /// Sets how credentials are treated.
    pub fn set_auth(&self, mode: AuthMode) {
        self.sim.set_auth(mode);
    }

    /// Sets or removes the account's create quota.
    pub fn set_quota(&self, quota: Option<AccountQuota>) {
        self.sim.set_quota(quota);
    }

    /// The call log, oldest first.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.sim.calls()
    }

    /// Forgets all tasks and zeroes all counters.
    pub fn reset(&self) {
        self.sim.reset();
    }

    /// The simulator's view of one task.
    pub fn task(&self, task_id: &str) -> Option<TaskView> {
        self.sim.task(task_id)
    }

    /// Tasks whose request body contains `needle`; see
    /// [`Simulator::tasks_matching`].
    pub fn tasks_matching(&self, needle: &str) -> Vec<TaskView> {
        self.sim.tasks_matching(needle)
    }

    /// Stops the server gracefully (releasing hanging calls) and waits for it.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shutdown.cancel();
        match self.server.take() {
            Some(server) => server.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------
// HTTP handlers
// ---------------------------------------------------------------------------

async fn handle_create(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    app.sim.create(&headers, body, &app.release).await
}

async fn handle_poll(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    app.sim.poll(&headers, query, &app.release).await
}

async fn admin_stats(State(app): State<AppState>) -> Json<SimStats> {
    Json(app.sim.stats())
}

async fn admin_get_faults(State(app): State<AppState>) -> Json<FaultPlan> {
    Json(app.sim.faults())
}

async fn admin_put_faults(State(app): State<AppState>, body: Bytes) -> Response {
    let plan = match serde_json::from_slice::<FaultPlan>(&body) {
        Ok(plan) => plan,
        Err(e) => return bad_admin_body(&e.to_string()),
    };
    if let Err(message) = plan.validate() {
        return bad_admin_body(&message);
    }
    info!(?plan, "sim: fault plan replaced");
    app.sim.set_faults(plan);
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_delete_faults(State(app): State<AppState>) -> StatusCode {
    info!("sim: fault plan cleared");
    app.sim.clear_faults();
    StatusCode::NO_CONTENT
}

async fn admin_get_auth(State(app): State<AppState>) -> Json<AuthMode> {
    Json(app.sim.auth())
}

async fn admin_put_auth(State(app): State<AppState>, body: Bytes) -> Response {
    match serde_json::from_slice::<AuthMode>(&body) {
        Ok(mode) => {
            info!(?mode, "sim: auth mode set");
            app.sim.set_auth(mode);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_admin_body(&e.to_string()),
    }
}

async fn admin_get_quota(State(app): State<AppState>) -> Json<Option<AccountQuota>> {
    Json(app.sim.quota())
}

async fn admin_put_quota(State(app): State<AppState>, body: Bytes) -> Response {
    match serde_json::from_slice::<AccountQuota>(&body) {
        Ok(quota) if quota.creates >= 1 && !quota.window.is_zero() => {
            info!(?quota, "sim: account quota set");
            app.sim.set_quota(Some(quota));
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(_) => bad_admin_body("creates must be at least 1 and window longer than zero"),
        Err(e) => bad_admin_body(&e.to_string()),
    }
}

async fn admin_delete_quota(State(app): State<AppState>) -> StatusCode {
    info!("sim: account quota removed");
    app.sim.set_quota(None);
    StatusCode::NO_CONTENT
}

async fn admin_calls(State(app): State<AppState>) -> Json<Vec<CallRecord>> {
    Json(app.sim.calls())
}

async fn admin_reset(State(app): State<AppState>) -> StatusCode {
    info!("sim: reset");
    app.sim.reset();
    StatusCode::NO_CONTENT
}

async fn admin_tasks(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Vec<TaskView>> {
    let needle = query.get("contains").map(String::as_str).unwrap_or("");
    Json(app.sim.tasks_matching(needle))
}

async fn admin_task(State(app): State<AppState>, Path(task_id): Path<String>) -> Response {
    match app.sim.task(&task_id) {
        Some(view) => Json(view).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            "TASK_NOT_FOUND",
            &format!("task {task_id} not found"),
        ),
    }
}

async fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
}

fn bad_admin_body(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_REQUEST_BODY", message)
}

/// Novita's flat error body.
fn api_error(status: StatusCode, reason: &str, message: &str) -> Response {
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

// ---------------------------------------------------------------------------
// Internal state
// ---------------------------------------------------------------------------

/// One API call as it is handled: what the call log records of it.
struct Call {
    endpoint: Endpoint,
    at: Instant,
    prompt: Option<String>,
    task_id: Option<String>,
}

impl Call {
    fn arrive(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            at: Instant::now(),
            prompt: None,
            task_id: None,
        }
    }
}

/// What a create does once the task exists.
enum AfterCreate {
    Answer,
    Drop,
    Garbage,
}

/// The accepted creates of one key in the quota's sliding window.
#[derive(Default)]
struct QuotaLog {
    accepted: VecDeque<Instant>,
}

impl QuotaLog {
    /// Admits a create at `now` (`None`), or says how long until one
    /// would be admitted.
    fn admit(&mut self, now: Instant, quota: AccountQuota) -> Option<Duration> {
        while let Some(&front) = self.accepted.front() {
            if now.saturating_duration_since(front) >= quota.window {
                self.accepted.pop_front();
            } else {
                break;
            }
        }
        if self.accepted.len() < quota.creates as usize {
            self.accepted.push_back(now);
            return None;
        }
        let oldest = self.accepted.front().copied().unwrap_or(now);
        Some((oldest + quota.window).saturating_duration_since(now))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Endpoint {
    Create,
    Poll,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Poll => "poll",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Outcome {
    Status(u16),
    Hang,
    Garbage,
    Drop,
    AcceptThenDrop,
    AcceptThenGarbage,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(code) => write!(f, "{code}"),
            Self::Hang => f.write_str("hang"),
            Self::Garbage => f.write_str("garbage"),
            Self::Drop => f.write_str("drop"),
            Self::AcceptThenDrop => f.write_str("accept-then-drop"),
            Self::AcceptThenGarbage => f.write_str("accept-then-garbage"),
        }
    }
}

struct SimState {
    tasks: HashMap<Uuid, TaskRecord>,
    body_hashes: HashSet<u64>,
    create_calls: u64,
    tasks_created: u64,
    duplicate_creates: u64,
    poll_calls: u64,
    task_polls: u64,
    max_polls_per_task: u64,
    responses: HashMap<(Endpoint, Outcome), u64>,
    window: SlidingWindow,
    started: Instant,
    calls: CallLog,
    quota_log: HashMap<String, QuotaLog>,
}

impl Default for SimState {
    fn default() -> Self {
        Self {
            tasks: HashMap::new(),
            body_hashes: HashSet::new(),
            create_calls: 0,
            tasks_created: 0,
            duplicate_creates: 0,
            poll_calls: 0,
            task_polls: 0,
            max_polls_per_task: 0,
            responses: HashMap::new(),
            window: SlidingWindow::default(),
            started: Instant::now(),
            calls: CallLog::default(),
            quota_log: HashMap::new(),
        }
    }
}

/// The most recent API calls, oldest dropped first.
#[derive(Default)]
struct CallLog {
    records: VecDeque<CallRecord>,
}

impl CallLog {
    fn push(&mut self, record: CallRecord) {
        if self.records.len() >= CALL_LOG_CAPACITY {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }
}

impl SimState {
    fn stats(&self) -> SimStats {
        let responses = self
            .responses
            .iter()
            .map(|((ep, outcome), n)| (format!("{}:{outcome}", ep.name()), *n))
            .collect();
        let avg_polls_per_task = if self.tasks_created == 0 {
            0.0
        } else {
            self.task_polls as f64 / self.tasks_created as f64
        };
        SimStats {
            create_calls: self.create_calls,
            tasks_created: self.tasks_created,
            duplicate_creates: self.duplicate_creates,
            poll_calls: self.poll_calls,
            responses,
            max_polls_per_task: self.max_polls_per_task,
            avg_polls_per_task,
            max_calls_in_any_second: self.window.max,
        }
    }

    fn poll_task(&mut self, id: &Uuid) -> Option<TaskSnapshot> {
        let task = self.tasks.get_mut(id)?;
        task.polls += 1;
        let polls = task.polls;
        let snap = TaskSnapshot {
            created: task.created,
            created_wall: task.created_wall,
            generation: task.generation,
            seed: task.seed,
            fail: task.fail.clone(),
            fail500: task.fail500,
            noeta: task.noeta,
            odd: task.odd,
            hostile: task.hostile.clone(),
        };
        self.task_polls += 1;
        self.max_polls_per_task = self.max_polls_per_task.max(polls);
        Some(snap)
    }
}

/// Arrival instants of the API calls of the last second.
#[derive(Default)]
struct SlidingWindow {
    recent: VecDeque<Instant>,
    max: u64,
}

impl SlidingWindow {
    fn record(&mut self, now: Instant) {
        while let Some(&front) = self.recent.front() {
            if now.saturating_duration_since(front) >= RATE_WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        self.max = self.max.max(self.recent.len() as u64);
    }
}

struct TaskRecord {
    created: Instant,
    created_wall: SystemTime,
    generation: Duration,
    seed: u64,
    fail: Option<Box<str>>,
    fail500: bool,
    noeta: bool,
    odd: bool,
    hostile: Hostile,
    /// Canonical (sorted keys, compact) JSON of the request body.
    body: Box<str>,
    polls: u64,
}

impl TaskRecord {
    fn view(&self, id: &Uuid, now: Instant) -> TaskView {
        let elapsed = now.saturating_duration_since(self.created);
        let p = progress(self.generation, elapsed);
        let status = match (p.phase, &self.fail) {
            (Phase::Queued, _) => "TASK_STATUS_QUEUED",
            (Phase::Processing, _) => "TASK_STATUS_PROCESSING",
            (Phase::Done, Some(_)) => "TASK_STATUS_FAILED",
            (Phase::Done, None) => "TASK_STATUS_SUCCEED",
        };
        let done_at = (p.phase == Phase::Done).then(|| {
            humantime::format_rfc3339_millis(self.created_wall + self.generation).to_string()
        });
        TaskView {
            task_id: id.to_string(),
            status: status.to_owned(),
            created_at: humantime::format_rfc3339_millis(self.created_wall).to_string(),
            done_at,
            generation_time: self.generation,
            request: serde_json::from_str(&self.body).unwrap_or(Value::Null),
            polls: self.polls,
        }
    }
}

/// What a poll needs from a task, copied out under the lock.
struct TaskSnapshot {
    created: Instant,
    created_wall: SystemTime,
    generation: Duration,
    seed: u64,
    fail: Option<Box<str>>,
    fail500: bool,
    noeta: bool,
    odd: bool,
    hostile: Hostile,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Queued,
    Processing,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    phase: Phase,
    percent: u64,
    eta_secs: u64,
    /// Length of the QUEUED phase.
    queued: Duration,
}

/// Task progress `elapsed` after creation: QUEUED for the first 10% of
/// `generation`, PROCESSING (0..=99%, linear) until `generation`, then done.
fn progress(generation: Duration, elapsed: Duration) -> Progress {
    let queued = generation / 10;
    if elapsed >= generation {
        return Progress {
            phase: Phase::Done,
            percent: 100,
            eta_secs: 0,
            queued,
        };
    }
    let eta_secs = ceil_secs(generation - elapsed);
    if elapsed < queued {
        return Progress {
            phase: Phase::Queued,
            percent: 0,
            eta_secs,
            queued,
        };
    }
    let span = (generation - queued).as_nanos().max(1);
    let percent = ((elapsed - queued).as_nanos() * 100 / span).min(99) as u64;
    Progress {
        phase: Phase::Processing,
        percent,
        eta_secs,
        queued,
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
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

struct EndpointFaultState {
    script: VecDeque<Fault>,
    rate: f64,
    mix: Vec<Fault>,
    seed: u64,
    rng: StdRng,
}

impl Default for EndpointFaultState {
    fn default() -> Self {
        Self::from_plan(EndpointFaults::default())
    }
}

impl EndpointFaultState {
    fn from_plan(plan: EndpointFaults) -> Self {
        let rate = if plan.rate.is_nan() {
            0.0
        } else {
            plan.rate.clamp(0.0, 1.0)
        };
        Self {
            script: plan.script.into(),
            rate,
            mix: plan.mix,
            seed: plan.seed,
            rng: StdRng::seed_from_u64(plan.seed),
        }
    }

    fn plan(&self) -> EndpointFaults {
        EndpointFaults {
            script: self.script.iter().copied().collect(),
            rate: self.rate,
            mix: self.mix.clone(),
            seed: self.seed,
        }
    }

    fn next(&mut self) -> Option<Fault> {
        if let Some(fault) = self.script.pop_front() {
            return Some(fault);
        }
        if self.rate <= 0.0 || self.mix.is_empty() {
            return None;
        }
        if self.rng.random::<f64>() < self.rate {
            let i = self.rng.random_range(0..self.mix.len());
            self.mix.get(i).copied()
        } else {
            None
        }
    }
}

#[derive(Default)]
struct FaultState {
    create: EndpointFaultState,
    poll: EndpointFaultState,
}

impl FaultState {
    fn from_plan(plan: FaultPlan) -> Self {
        Self {
            create: EndpointFaultState::from_plan(plan.create),
            poll: EndpointFaultState::from_plan(plan.poll),
        }
    }

    fn plan(&self) -> FaultPlan {
        FaultPlan {
            create: self.create.plan(),
            poll: self.poll.plan(),
        }
    }
}

// ---------------------------------------------------------------------------
// Request parsing
// ---------------------------------------------------------------------------

/// Per-task behaviour requested through `[sim:...]` prompt directives.
#[derive(Clone, Debug, Default, PartialEq)]
struct Directives {
    fail: Option<Box<str>>,
    reject: Option<String>,
    generation: Option<Duration>,
    fail500: bool,
    noeta: bool,
    odd: bool,
    hostile: Hostile,
}

/// Answers of an upstream that is broken or hostile, per task (the
/// `[sim:huge=…]`, `[sim:echo-auth]`, … directives).
#[derive(Clone, Debug, Default, PartialEq)]
struct Hostile {
    /// Task-result answers padded to about this many bytes (streamed).
    huge: Option<u64>,
    /// The task fails with the poll's `Authorization` header in its reason.
    echo_auth: bool,
    /// The task fails with a reason this many bytes long.
    reason_bytes: Option<usize>,
    /// The finished task's video URL.
    video_url: Option<String>,
    /// The finished task lists this many videos.
    videos: Option<usize>,
    /// The create answers a task id this many bytes long.
    task_id_bytes: Option<usize>,
}

/// A size like `400MiB`, `64KiB` or `1000`.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1024,
        "MiB" | "M" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(factor)
}

fn parse_directives(prompt: &str) -> Directives {
    const OPEN: &str = "[sim:";
    let mut d = Directives::default();
    let mut rest = prompt;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(']') else { break };
        let directive = &after[..end];
        rest = &after[end + 1..];
        let (name, value) = match directive.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim()).filter(|v| !v.is_empty())),
            None => (directive.trim(), None),
        };
        match (name, value) {
            ("fail", v) => d.fail = Some(v.unwrap_or(DEFAULT_FAIL_REASON).into()),
            ("reject", v) => d.reject = Some(v.unwrap_or(DEFAULT_REJECT_MESSAGE).to_owned()),
            ("gen", Some(v)) => match humantime::parse_duration(v) {
                Ok(duration) => d.generation = Some(duration),
                Err(e) => debug!(value = v, error = %e, "sim: ignoring bad gen directive"),
            },
            ("fail500", _) => d.fail500 = true,
            ("noeta", _) => d.noeta = true,
            ("odd", _) => d.odd = true,
            ("huge", Some(v)) => d.hostile.huge = parse_size(v),
            ("echo-auth", _) => d.hostile.echo_auth = true,
            ("reason-bytes", Some(v)) => {
                d.hostile.reason_bytes = parse_size(v).and_then(|n| usize::try_from(n).ok())
            }
            ("video-url", Some(v)) => d.hostile.video_url = Some(v.to_owned()),
            ("videos", Some(v)) => d.hostile.videos = v.parse().ok(),
            ("task-id-bytes", Some(v)) => {
                d.hostile.task_id_bytes = parse_size(v).and_then(|n| usize::try_from(n).ok())
            }
            _ => debug!(directive, "sim: ignoring unknown directive"),
        }
    }
    d
}

/// Modest validation of a create body, like the real API's.
fn validate_create_body(body: &[u8]) -> Result<Value, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "request body must be a JSON object".to_owned())?;
    if let Some(unknown) = object.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(format!("unknown field `{unknown}`"));
    }
    let images_ok = match object.get("images") {
        None => return Err("field `images` is required".to_owned()),
        Some(Value::Array(images)) => images.len() == 1 && images.iter().all(Value::is_string),
        Some(_) => false,
    };
    if !images_ok {
        return Err("field `images` must be an array of exactly one image URL string".to_owned());
    }
    if object.get("prompt").is_some_and(|p| !p.is_string()) {
        return Err("field `prompt` must be a string".to_owned());
    }
    Ok(value)
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
    use super::*;

    const KEY: &str = "test-key";

    fn config(generation: Duration) -> SimulatorConfig {
        SimulatorConfig {
            api_key: Some(KEY.to_owned()),
            generation_time: generation,
            ..SimulatorConfig::default()
        }
    }

    async fn start(generation: Duration) -> RunningSimulator {
        Simulator::start(config(generation)).await.expect("start")
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    fn body(prompt: &str) -> Value {
        json!({
            "images": ["https://example.com/cat.png"],
            "prompt": prompt,
            "duration": 5,
            "resolution": "720p",
        })
    }

    async fn create(
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

    async fn create_id(c: &reqwest::Client, sim: &RunningSimulator, prompt: &str) -> String {
        let resp = create(c, sim, &body(prompt)).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.expect("json");
        v["task_id"].as_str().expect("task_id").to_owned()
    }

    async fn poll(c: &reqwest::Client, sim: &RunningSimulator, id: &str) -> reqwest::Response {
        c.get(format!("{}{TASK_RESULT_PATH}", sim.base_url()))
            .query(&[("task_id", id)])
            .bearer_auth(KEY)
            .send()
            .await
            .expect("poll send")
    }

    async fn poll_json(c: &reqwest::Client, sim: &RunningSimulator, id: &str) -> Value {
        let resp = poll(c, sim, id).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("json")
    }

    async fn error_body(resp: reqwest::Response) -> (u16, Value) {
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.expect("error json");
        assert_eq!(v["code"], status, "{v}");
        assert_eq!(v["metadata"], json!({}), "{v}");
        assert!(v["message"].is_string(), "{v}");
        (status, v)
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        k.sort_unstable();
        k
    }

    async fn wait_done(c: &reqwest::Client, sim: &RunningSimulator, id: &str) -> Vec<Value> {
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
        assert_eq!(
            last["videos"],
            json!([{
                "video_url": format!("https://sim.novita.local/videos/{id}.mp4"),
                "video_url_ttl": "3600",
                "video_type": "mp4",
            }])
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

    #[test]
    fn progress_phases_eta_and_percent() {
        let g = Duration::from_secs(10);
        let p = progress(g, Duration::ZERO);
        assert_eq!((p.phase, p.percent, p.eta_secs), (Phase::Queued, 0, 10));
        let p = progress(g, Duration::from_millis(500));
        assert_eq!((p.phase, p.percent, p.eta_secs), (Phase::Queued, 0, 10));
        let p = progress(g, Duration::from_secs(1));
        assert_eq!((p.phase, p.percent, p.eta_secs), (Phase::Processing, 0, 9));
        let p = progress(g, Duration::from_millis(5500));
        assert_eq!((p.phase, p.percent, p.eta_secs), (Phase::Processing, 50, 5));
        let p = progress(g, Duration::from_millis(9999));
        assert_eq!((p.phase, p.percent, p.eta_secs), (Phase::Processing, 99, 1));
        let p = progress(g, g);
        assert_eq!((p.phase, p.percent, p.eta_secs), (Phase::Done, 100, 0));
        let p = progress(Duration::ZERO, Duration::ZERO);
        assert_eq!(p.phase, Phase::Done);
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

    #[test]
    fn directive_parsing() {
        let d = parse_directives("a [sim:fail] b [sim:gen=20s][sim:noeta] [sim:what] [sim:odd]");
        assert_eq!(d.fail.as_deref(), Some(DEFAULT_FAIL_REASON));
        assert_eq!(d.generation, Some(Duration::from_secs(20)));
        assert!(d.noeta && d.odd && !d.fail500);
        assert_eq!(d.reject, None);
        let d = parse_directives("[sim:fail=boom: it broke][sim:reject=nope][sim:fail500]");
        assert_eq!(d.fail.as_deref(), Some("boom: it broke"));
        assert_eq!(d.reject.as_deref(), Some("nope"));
        assert!(d.fail500);
        assert_eq!(
            parse_directives("[sim:gen=soon] [sim:fail"),
            Directives::default()
        );
        assert_eq!(parse_directives("plain prompt"), Directives::default());
    }

    #[tokio::test]
    async fn fail_directives() {
        let sim = start(Duration::from_millis(100)).await;
        let c = client();
        let id = create_id(&c, &sim, "x [sim:fail]").await;
        let seen = wait_done(&c, &sim, &id).await;
        let last = seen.last().expect("last");
        assert_eq!(last["task"]["status"], "TASK_STATUS_FAILED");
        assert_eq!(last["task"]["reason"], DEFAULT_FAIL_REASON);
        assert_eq!(last["videos"], json!([]));
        assert_eq!(sim.task(&id).expect("view").status, "TASK_STATUS_FAILED");

        let id = create_id(&c, &sim, "x [sim:fail=nsfw detected]").await;
        let seen = wait_done(&c, &sim, &id).await;
        assert_eq!(
            seen.last().expect("last")["task"]["reason"],
            "nsfw detected"
        );
    }

    #[tokio::test]
    async fn reject_directive_creates_no_task() {
        let sim = start(Duration::from_millis(100)).await;
        let c = client();
        let (status, v) = error_body(create(&c, &sim, &body("x [sim:reject]")).await).await;
        assert_eq!(status, 400);
        assert_eq!(v["reason"], "ILLEGAL_PROMPT");
        assert_eq!(v["message"], DEFAULT_REJECT_MESSAGE);
        let (_, v) = error_body(create(&c, &sim, &body("[sim:reject=too spicy]")).await).await;
        assert_eq!(v["message"], "too spicy");
        let stats = sim.stats();
        assert_eq!(stats.create_calls, 2);
        assert_eq!(stats.tasks_created, 0);
        assert_eq!(stats.responses["create:400"], 2);
    }

    #[tokio::test]
    async fn gen_directive_overrides_config() {
        let c = client();
        let sim = start(Duration::from_secs(3600)).await;
        let id = create_id(&c, &sim, "[sim:gen=0s]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert_eq!(v["task"]["status"], "TASK_STATUS_SUCCEED");
        assert_eq!(sim.task(&id).expect("view").generation_time, Duration::ZERO);

        let sim = start(Duration::ZERO).await;
        let id = create_id(&c, &sim, "[sim:gen=1h]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert_eq!(v["task"]["status"], "TASK_STATUS_QUEUED");
        assert!(v["task"]["eta"].as_u64().expect("eta") > 3500);
        assert!(sim.task(&id).expect("view").done_at.is_none());
    }

    #[tokio::test]
    async fn fail500_directive_answers_500_once_ended() {
        let c = client();
        let sim = start(Duration::from_secs(3600)).await;
        let id = create_id(&c, &sim, "[sim:fail500]").await;
        assert_eq!(poll(&c, &sim, &id).await.status(), 200);
        let id = create_id(&c, &sim, "[sim:fail500][sim:gen=0s]").await;
        let (status, v) = error_body(poll(&c, &sim, &id).await).await;
        assert_eq!(status, 500);
        assert_eq!(v["reason"], "TASK_FAILED");
    }

    #[tokio::test]
    async fn odd_directive_uses_odd_but_legal_shapes() {
        let c = client();
        let sim = start(Duration::from_secs(3600)).await;
        let id = create_id(&c, &sim, "[sim:odd]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert!(v["task"]["eta"].is_string(), "{v}");
        assert!(v["task"]["progress_percent"].is_string(), "{v}");
        assert!(v["task"].get("reason").is_none(), "{v}");

        let id = create_id(&c, &sim, "[sim:odd][sim:gen=0s][sim:unknown=1]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert_eq!(v["task"]["status"], "TASK_STATUS_SUCCEED");
        assert_eq!(v["task"]["eta"], "0");
        assert_eq!(v["task"]["progress_percent"], "100");
        assert!(v["task"].get("reason").is_none());
        assert_eq!(v["videos"][0]["video_url_ttl"], 3600);
        assert_eq!(
            v["videos"][0]["video_url"],
            format!("{VIDEO_URL_PREFIX}{id}.mp4")
        );
        assert!(keys(&v).len() > 5);
        assert!(keys(&v["extra"]).len() > 2);
        assert!(keys(&v["extra"]["debug_info"]).len() > 3);
        assert!(keys(&v["task"]).len() > 5);
        assert!(keys(&v["videos"][0]).len() > 3);
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

    fn plan_for(create: Vec<Fault>, poll: Vec<Fault>) -> FaultPlan {
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

    fn f(s: &str) -> Fault {
        s.parse().expect("fault")
    }

    #[tokio::test]
    async fn status_faults_in_script_order_and_create_no_task() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(
            vec![f("429"), f("429:7"), f("500"), f("502"), f("503"), f("504")],
            vec![f("500"), f("429")],
        ));
        let expected = [
            (429, "RATE_LIMIT_EXCEEDED"),
            (429, "RATE_LIMIT_EXCEEDED"),
            (500, "CREATE_TASK_FAILED"),
            (502, "BAD_GATEWAY"),
            (503, "SERVICE_UNAVAILABLE"),
            (504, "GATEWAY_TIMEOUT"),
        ];
        for (i, (code, reason)) in expected.into_iter().enumerate() {
            let resp = create(&c, &sim, &body("x")).await;
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let (status, v) = error_body(resp).await;
            assert_eq!((status, v["reason"].as_str()), (code, Some(reason)));
            match i {
                0 => assert_eq!(retry_after.as_deref(), Some("1")),
                1 => assert_eq!(retry_after.as_deref(), Some("7")),
                _ => assert_eq!(retry_after, None),
            }
        }
        assert_eq!(sim.stats().tasks_created, 0);
        let id = create_id(&c, &sim, "x").await;
        let (status, v) = error_body(poll(&c, &sim, &id).await).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (500, Some("GET_RESULT_FAILED"))
        );
        assert_eq!(poll(&c, &sim, &id).await.status(), 429);
        assert_eq!(poll(&c, &sim, &id).await.status(), 200);

        let stats = sim.stats();
        assert_eq!(stats.create_calls, 7);
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.poll_calls, 3);
        assert_eq!(stats.responses["create:429"], 2);
        assert_eq!(stats.responses["create:500"], 1);
        assert_eq!(stats.responses["create:200"], 1);
        assert_eq!(stats.responses["poll:500"], 1);
        assert_eq!(stats.responses["poll:200"], 1);
        // Only the poll that reached the task counts for it.
        assert_eq!(stats.max_polls_per_task, 1);
        assert!(sim.simulator().faults().create.script.is_empty());
    }

    #[tokio::test]
    async fn garbage_fault() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("garbage")], vec![f("garbage")]));
        let resp = create(&c, &sim, &body("x")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/html");
        assert_eq!(resp.text().await.expect("text"), GARBAGE_BODY);
        let resp = poll(&c, &sim, "whatever").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("text"), GARBAGE_BODY);
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 0);
        assert_eq!(stats.responses["create:garbage"], 1);
        assert_eq!(stats.responses["poll:garbage"], 1);
    }

    #[tokio::test]
    async fn drop_fault_gives_client_error_not_response() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("drop")], vec![f("drop")]));
        let err = c
            .post(format!("{}{CREATE_PATH}", sim.base_url()))
            .bearer_auth(KEY)
            .json(&body("x"))
            .send()
            .await
            .expect_err("dropped create must be an error");
        assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
        let err = c
            .get(format!("{}{TASK_RESULT_PATH}?task_id=x", sim.base_url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect_err("dropped poll must be an error");
        assert!(err.status().is_none(), "{err:?}");
        // The connection is usable again afterwards (fresh connection).
        let id = create_id(&c, &sim, "x").await;
        assert_eq!(poll(&c, &sim, &id).await.status(), 200);
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.responses["create:drop"], 1);
        assert_eq!(stats.responses["poll:drop"], 1);
    }

    #[tokio::test]
    async fn drop_fault_sends_no_bytes_at_all() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![], vec![f("drop")]));
        let mut stream = tokio::net::TcpStream::connect(sim.addr())
            .await
            .expect("connect");
        let request = format!(
            "GET {TASK_RESULT_PATH}?task_id=x HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer {KEY}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
            .await
            .expect("connection must be closed promptly");
        // Either a clean EOF or a reset; never any response bytes.
        if read.is_ok() {
            assert!(
                received.is_empty(),
                "got {:?}",
                String::from_utf8_lossy(&received)
            );
        }
    }

    #[tokio::test]
    async fn accept_then_drop_creates_a_billed_task() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("accept-then-drop")], vec![]));
        let prompt = "request-id 1234 accept-then-drop";
        let err = c
            .post(format!("{}{CREATE_PATH}", sim.base_url()))
            .bearer_auth(KEY)
            .json(&body(prompt))
            .send()
            .await
            .expect_err("must be an error");
        assert!(err.status().is_none(), "{err:?}");
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.responses["create:accept-then-drop"], 1);
        let tasks = sim.tasks_matching("request-id 1234");
        assert_eq!(tasks.len(), 1);
        // A retry of the same request is a double spend.
        create_id(&c, &sim, prompt).await;
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 2);
        assert_eq!(stats.duplicate_creates, 1);
        assert_eq!(sim.tasks_matching("request-id 1234").len(), 2);
    }

    #[tokio::test]
    async fn accept_then_garbage_bills_a_task_and_answers_html() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("accept-then-garbage")], vec![]));
        let resp = create(&c, &sim, &body("unreadable success")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("text"), GARBAGE_BODY);
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.answered("create:accept-then-garbage"), 1);
        let calls = sim.calls();
        assert_eq!(calls.len(), 1);
        assert!(calls[0].task_id.is_some(), "{calls:?}");
    }

    #[tokio::test]
    async fn the_account_quota_is_a_sliding_window_per_key() {
        let c = client();
        let sim = Simulator::start(SimulatorConfig {
            api_key: None,
            quota: Some(AccountQuota {
                creates: 3,
                window: Duration::from_millis(1500),
                retry_after: true,
            }),
            ..config(Duration::ZERO)
        })
        .await
        .expect("start");
        let send = |key: &'static str| {
            let c = c.clone();
            let url = format!("{}{CREATE_PATH}", sim.base_url());
            async move {
                c.post(url)
                    .bearer_auth(key)
                    .json(&body("quota"))
                    .send()
                    .await
                    .expect("send")
            }
        };
        for _ in 0..3 {
            assert_eq!(send("key-a").await.status(), 200);
        }
        let refused = send("key-a").await;
        assert_eq!(refused.status(), 429);
        assert_eq!(
            refused.headers()[header::RETRY_AFTER]
                .to_str()
                .expect("ascii"),
            "2",
            "whole seconds until the oldest create leaves the window"
        );
        let (_, v) = error_body(refused).await;
        assert_eq!(v["reason"], "RATE_LIMIT_EXCEEDED");
        // Another key has a quota of its own.
        assert_eq!(send("key-b").await.status(), 200);
        assert_eq!(sim.stats().tasks_created, 4);
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(send("key-a").await.status(), 200, "the window moved on");
        // Without Retry-After the refusal is the same, the header absent.
        sim.set_quota(Some(AccountQuota {
            creates: 1,
            window: Duration::from_secs(60),
            retry_after: false,
        }));
        let bare = send("key-a").await;
        assert_eq!(bare.status(), 429);
        assert!(bare.headers().get(header::RETRY_AFTER).is_none());
        // Removing the quota admits everything.
        sim.set_quota(None);
        for _ in 0..5 {
            assert_eq!(send("key-a").await.status(), 200);
        }
        let outcomes: Vec<String> = sim.calls().into_iter().map(|c| c.outcome).collect();
        assert_eq!(outcomes.iter().filter(|o| *o == "429").count(), 2);
    }

    #[tokio::test]
    async fn the_call_log_names_each_call() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        let id = create_id(&c, &sim, "logged request 7").await;
        poll_json(&c, &sim, &id).await;
        let calls = sim.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].endpoint, "create");
        assert_eq!(calls[0].outcome, "200");
        assert_eq!(calls[0].prompt.as_deref(), Some("logged request 7"));
        assert_eq!(calls[0].task_id.as_deref(), Some(id.as_str()));
        assert_eq!(calls[1].endpoint, "poll");
        assert_eq!(calls[1].task_id.as_deref(), Some(id.as_str()));
        assert!(calls[1].at_ms >= calls[0].at_ms);
        let admin: Vec<CallRecord> = c
            .get(format!("{}/sim/calls", sim.base_url()))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(admin, calls);
        sim.reset();
        assert!(sim.calls().is_empty());
    }

    #[tokio::test]
    async fn hang_fault_exceeds_client_timeout() {
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("hang")], vec![f("hang:200ms")]));
        let short = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .expect("client");
        let err = short
            .post(format!("{}{CREATE_PATH}", sim.base_url()))
            .bearer_auth(KEY)
            .json(&body("x"))
            .send()
            .await
            .expect_err("must time out");
        assert!(err.is_timeout(), "{err:?}");
        // A short hang answers 504 afterwards.
        let c = client();
        let started = Instant::now();
        let (status, v) = error_body(poll(&c, &sim, "x").await).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            (status, v["reason"].as_str()),
            (504, Some("GATEWAY_TIMEOUT"))
        );
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 0);
        assert_eq!(stats.responses["create:hang"], 1);
        assert_eq!(stats.responses["poll:hang"], 1);
    }

    #[tokio::test]
    async fn shutdown_releases_hanging_calls() {
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![], vec![f("hang")]));
        let url = format!("{}{TASK_RESULT_PATH}?task_id=x", sim.base_url());
        let request = tokio::spawn(async move { client().get(url).bearer_auth(KEY).send().await });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sim.stats().responses.contains_key("poll:hang") {
            assert!(Instant::now() < deadline, "hang never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), sim.shutdown())
            .await
            .expect("shutdown must not wait for the hang")
            .expect("serve result");
        let answered = tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .expect("request must finish")
            .expect("join");
        if let Ok(resp) = answered {
            assert_eq!(resp.status(), 504);
        }
    }

    #[tokio::test]
    async fn random_mix_is_reproducible() {
        async fn run(seed: u64) -> Vec<u16> {
            let sim = start(Duration::ZERO).await;
            sim.set_faults(FaultPlan {
                poll: EndpointFaults {
                    script: vec![f("502")],
                    rate: 0.5,
                    mix: vec![f("429"), f("503")],
                    seed,
                },
                ..FaultPlan::default()
            });
            let c = client();
            let mut out = Vec::new();
            for _ in 0..40 {
                out.push(poll(&c, &sim, "x").await.status().as_u16());
            }
            out
        }
        let a = run(7).await;
        assert_eq!(a, run(7).await);
        assert_eq!(a[0], 502);
        let faulted = a[1..].iter().filter(|s| **s != 404).count();
        assert!((5..=35).contains(&faulted), "{a:?}");
        assert!(a[1..].iter().all(|s| [404, 429, 503].contains(s)));

        let sim = start(Duration::ZERO).await;
        sim.set_faults(FaultPlan {
            create: EndpointFaults {
                rate: 1.0,
                mix: vec![f("503")],
                ..EndpointFaults::default()
            },
            ..FaultPlan::default()
        });
        let c = client();
        for _ in 0..5 {
            assert_eq!(create(&c, &sim, &body("x")).await.status(), 503);
        }
        assert_eq!(sim.stats().tasks_created, 0);
    }

    #[tokio::test]
    async fn stats_duplicates_polls_and_peak_rate() {
        let c = client();
        let sim = start(Duration::from_secs(3600)).await;
        let a = create_id(&c, &sim, "req-1").await;
        let b = create_id(&c, &sim, "req-2").await;
        create_id(&c, &sim, "req-1").await;
        // Same content, different key order: still a duplicate.
        let reordered = json!({"resolution": "720p", "duration": 5, "prompt": "req-2",
                               "images": ["https://example.com/cat.png"]});
        assert_eq!(create(&c, &sim, &reordered).await.status(), 200);
        for _ in 0..5 {
            poll_json(&c, &sim, &a).await;
        }
        poll_json(&c, &sim, &b).await;
        let stats = sim.stats();
        assert_eq!(stats.create_calls, 4);
        assert_eq!(stats.tasks_created, 4);
        assert_eq!(stats.duplicate_creates, 2);
        assert_eq!(stats.max_polls_per_task, 5);
        assert!((stats.avg_polls_per_task - 1.5).abs() < 1e-9);
        assert!(stats.max_calls_in_any_second >= 1);

        sim.reset();
        assert_eq!(sim.stats(), SimStats::default());
        assert!(sim.task(&a).is_none());
        let calls = (0..30).map(|_| poll(&c, &sim, "x"));
        futures_util::future::join_all(calls).await;
        let stats = sim.stats();
        assert_eq!(stats.poll_calls, 30);
        assert_eq!(stats.responses["poll:404"], 30);
        // 30 concurrent local calls land well within one second.
        assert_eq!(stats.max_calls_in_any_second, 30);
    }

    #[test]
    fn sliding_window_counts_the_busiest_second() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = SlidingWindow::default();
        for t in [0, 100, 200, 999] {
            w.record(t0 + ms(t));
        }
        assert_eq!(w.max, 4);
        // At 1000ms the arrival at 0ms has left the window.
        w.record(t0 + ms(1000));
        assert_eq!((w.max, w.recent.len()), (4, 4));
        for t in [1001, 1002] {
            w.record(t0 + ms(t));
        }
        assert_eq!(w.max, 6);
        w.record(t0 + ms(5000));
        assert_eq!((w.max, w.recent.len()), (6, 1));
    }

    #[tokio::test]
    async fn admin_endpoints() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        let base = sim.base_url();

        let plan = json!({"create": {"script": ["429:3", "hang:2s", "accept-then-drop"]},
                          "poll": {"rate": 0.25, "mix": ["drop"], "seed": 9}});
        let resp = c
            .put(format!("{base}/sim/faults"))
            .json(&plan)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        let got: Value = c
            .get(format!("{base}/sim/faults"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(
            got["create"]["script"],
            json!(["429:3", "hang:2s", "accept-then-drop"])
        );
        assert_eq!(got["poll"]["rate"], 0.25);
        assert_eq!(got["poll"]["mix"], json!(["drop"]));
        for bad in [
            json!({"create": {"script": ["418"]}}),
            json!({"poll": {"rate": 1.5}}),
            json!({"typo": {}}),
        ] {
            let resp = c
                .put(format!("{base}/sim/faults"))
                .json(&bad)
                .send()
                .await
                .expect("send");
            let (status, v) = error_body(resp).await;
            assert_eq!(
                (status, v["reason"].as_str()),
                (400, Some("INVALID_REQUEST_BODY"))
            );
        }
        let resp = c
            .delete(format!("{base}/sim/faults"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        assert_eq!(sim.simulator().faults(), FaultPlan::default());

        let resp = c
            .put(format!("{base}/sim/auth"))
            .json(&json!("reject403"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        assert_eq!(create(&c, &sim, &body("x")).await.status(), 403);
        let resp = c
            .put(format!("{base}/sim/auth"))
            .json(&json!("accept"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        let resp = c
            .put(format!("{base}/sim/auth"))
            .json(&json!("sometimes"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);

        let id = create_id(&c, &sim, "admin-view-77").await;
        poll_json(&c, &sim, &id).await;
        let view: TaskView = c
            .get(format!("{base}/sim/tasks/{id}"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(view.task_id, id);
        assert_eq!(view.status, "TASK_STATUS_SUCCEED");
        assert_eq!(view.polls, 1);
        assert_eq!(view.request["prompt"], "admin-view-77");
        let created = humantime::parse_rfc3339(&view.created_at).expect("rfc3339");
        let done =
            humantime::parse_rfc3339(view.done_at.as_deref().expect("done_at")).expect("rfc3339");
        assert!(done >= created);
        assert!(view.created_at.ends_with('Z') && view.created_at.contains('.'));
        let list: Vec<TaskView> = c
            .get(format!("{base}/sim/tasks?contains=admin-view"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(list.len(), 1);
        let resp = c
            .get(format!("{base}/sim/tasks/{}", Uuid::new_v4()))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 404);

        let stats: SimStats = c
            .get(format!("{base}/sim/stats"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(stats, sim.stats());
        assert_eq!(stats.create_calls, 2);
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.responses["create:403"], 1);

        let resp = c
            .post(format!("{base}/sim/reset"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        assert_eq!(sim.stats(), SimStats::default());
        assert!(sim.task(&id).is_none());

        let resp = c.get(format!("{base}/nope")).send().await.expect("send");
        let (status, _) = error_body(resp).await;
        assert_eq!(status, 404);
    }

    #[test]
    fn serde_forms() {
        for s in [
            "429",
            "429:30",
            "500",
            "502",
            "503",
            "504",
            "hang",
            "hang:3s",
            "garbage",
            "drop",
            "accept-then-drop",
        ] {
            let fault: Fault = s.parse().expect("parse");
            assert_eq!(fault.to_string(), s);
            let json = serde_json::to_string(&fault).expect("ser");
            assert_eq!(serde_json::from_str::<Fault>(&json).expect("de"), fault);
        }
        assert_eq!(f("hang:3s"), Fault::Hang(Some(Duration::from_secs(3))));
        assert_eq!(
            f("429:30"),
            Fault::RateLimited {
                retry_after_secs: 30
            }
        );
        for bad in ["418", "hang:soon", "429:x", "", "dropp"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_value(AuthMode::BillingExhausted).expect("ser"),
            "billing_exhausted"
        );
        assert_eq!(
            serde_json::from_value::<AuthMode>(json!("reject401")).expect("de"),
            AuthMode::Reject401
        );
        let cfg: SimulatorConfig = serde_json::from_value(json!({
            "generation_time": "300ms", "eta": "absent", "api_key": "k"
        }))
        .expect("config");
        assert_eq!(cfg.generation_time, Duration::from_millis(300));
        assert_eq!(cfg.eta, EtaMode::Absent);
        assert_eq!(cfg.video_url_ttl, 3600);
        assert!(!format!("{cfg:?}").contains("\"k\""));
        let plan: FaultPlan =
            serde_json::from_value(json!({"poll": {"script": ["503"]}})).expect("plan");
        assert_eq!(plan.poll.script, vec![Fault::ServerError(503)]);
        assert_eq!(plan.create, EndpointFaults::default());
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
