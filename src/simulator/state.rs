//! The simulator's shared state and its controls: the [`Simulator`] handle
//! (all clones share one state), the tasks, counters and call log behind
//! [`SimStats`] and [`CallRecord`], the busiest-second window, and the
//! methods that read or change them (stats, faults, auth mode, quota,
//! reset, task views) and record each call's answer.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::response::Response;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::debug;
use uuid::Uuid;

use super::config::{unix_now, AuthMode, SimulatorConfig, VideoPlan, VIDEO_URL_PREFIX};
use super::faults::{FaultPlan, FaultState};
use super::quota::{AccountQuota, QuotaLog};
use super::tasks::{TaskRecord, TaskSnapshot, TaskView};

/// Width of the window behind `max_calls_in_any_second`.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Most calls the call log keeps (the oldest are dropped).
const CALL_LOG_CAPACITY: usize = 100_000;

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
    /// Creates: the model whose endpoint was called (`vidu-q3-pro-i2v`, …);
    /// `None` for polls.
    #[serde(default)]
    pub model: Option<String>,
}

/// Counters kept by the simulator (also served by `GET /sim/stats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimStats {
    /// Every call to a create endpoint (any model), whatever the answer.
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
    /// `create_calls` by model (only models called so far).
    pub creates_by_model: BTreeMap<String, u64>,
    /// `tasks_created` by model (only models with a task so far).
    pub tasks_created_by_model: BTreeMap<String, u64>,
}

impl SimStats {
    /// How many answers of one kind (`"poll:403"`, …) were given.
    pub fn answered(&self, kind: &str) -> u64 {
        self.responses.get(kind).copied().unwrap_or(0)
    }
}

/// The simulated API. Cheap to clone: all clones share one state.
#[derive(Clone)]
pub struct Simulator {
    pub(super) inner: Arc<Inner>,
}

/// What all clones of a [`Simulator`] share.
pub(super) struct Inner {
    pub(super) config: SimulatorConfig,
    pub(super) auth: Mutex<AuthMode>,
    pub(super) quota: Mutex<Option<AccountQuota>>,
    pub(super) faults: Mutex<FaultState>,
    pub(super) state: Mutex<SimState>,
    pub(super) videos: Mutex<VideoPlan>,
    /// Where its videos are served (`http://<addr>/videos/`), once serving.
    pub(super) video_base: std::sync::OnceLock<String>,
    pub(super) video_gets: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
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
                videos: Mutex::new(VideoPlan::default()),
                video_base: std::sync::OnceLock::new(),
                video_gets: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// How videos are served from now on.
    pub fn set_video_plan(&self, plan: VideoPlan) {
        *lock(&self.inner.videos) = plan;
    }

    /// How videos are served.
    pub fn video_plan(&self) -> VideoPlan {
        *lock(&self.inner.videos)
    }

    /// Requests for video URLs so far.
    pub fn video_gets(&self) -> u64 {
        self.inner
            .video_gets
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn count_video_get(&self) {
        self.inner
            .video_gets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Serves videos under `base` (`http://<addr>/videos/`); the first call
    /// wins.
    pub(super) fn serve_videos_at(&self, base: String) {
        let _ = self.inner.video_base.set(base);
    }

    /// The URL of a task's video as a poll now names it.
    pub(super) fn video_url(&self, task_id: &str) -> String {
        match self.inner.video_base.get() {
            Some(base) => format!(
                "{base}{task_id}.mp4?expires={}",
                unix_now().saturating_add(self.inner.config.video_url_ttl)
            ),
            None => format!("{VIDEO_URL_PREFIX}{task_id}.mp4"),
        }
    }

    /// Whether a task of this id exists.
    pub(super) fn has_task(&self, task_id: &str) -> bool {
        Uuid::parse_str(task_id).is_ok_and(|id| lock(&self.inner.state).tasks.contains_key(&id))
    }

    /// The configuration this simulator was built with.
    pub fn config(&self) -> &SimulatorConfig {
        &self.inner.config
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
            .map(|(id, t)| (t.spec.created, t.view(id, now)))
            .collect();
        drop(state);
        found.sort_by_key(|(created, _)| *created);
        found.into_iter().map(|(_, v)| v).collect()
    }

    /// Counts an API call on arrival (and in the busiest-second window).
    pub(super) fn note_arrival(&self, call: &Call) {
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        match call.endpoint {
            Endpoint::Create => state.create_calls += 1,
            Endpoint::Poll => state.poll_calls += 1,
        }
        if let Some(model) = call.model {
            *state.creates_by_model.entry(model).or_default() += 1;
        }
        state.window.record(now);
    }

    /// Counts an answer and adds the call to the call log.
    pub(super) fn record(&self, call: &Call, outcome: Outcome) {
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
            model: call.model.map(str::to_owned),
        });
    }

    /// Records `resp`'s status as the call's answer, and returns it.
    pub(super) fn finish(&self, call: &Call, resp: Response) -> Response {
        self.record(call, Outcome::Status(resp.status().as_u16()));
        resp
    }
}

/// Locks `mutex`, also when a panicking holder poisoned it.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One API call as it is handled: what the call log records of it.
pub(super) struct Call {
    pub(super) endpoint: Endpoint,
    at: Instant,
    pub(super) prompt: Option<String>,
    pub(super) task_id: Option<String>,
    /// Creates: the model whose endpoint was called.
    pub(super) model: Option<&'static str>,
}

impl Call {
    /// A call arriving now.
    pub(super) fn arrive(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            at: Instant::now(),
            prompt: None,
            task_id: None,
            model: None,
        }
    }
}

/// The API endpoint a call went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Endpoint {
    Create,
    Poll,
}

impl Endpoint {
    /// `create` or `poll`, as in the call log and the stats.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Poll => "poll",
        }
    }
}

/// How a call was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Outcome {
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

/// Tasks, counters and logs; zeroed by a reset.
pub(super) struct SimState {
    pub(super) tasks: HashMap<Uuid, TaskRecord>,
    pub(super) body_hashes: HashSet<u64>,
    create_calls: u64,
    creates_by_model: BTreeMap<&'static str, u64>,
    pub(super) tasks_created: u64,
    pub(super) tasks_by_model: BTreeMap<&'static str, u64>,
    pub(super) duplicate_creates: u64,
    poll_calls: u64,
    task_polls: u64,
    max_polls_per_task: u64,
    responses: HashMap<(Endpoint, Outcome), u64>,
    window: SlidingWindow,
    started: Instant,
    calls: CallLog,
    pub(super) quota_log: HashMap<String, QuotaLog>,
}

impl Default for SimState {
    fn default() -> Self {
        Self {
            tasks: HashMap::new(),
            body_hashes: HashSet::new(),
            create_calls: 0,
            creates_by_model: BTreeMap::new(),
            tasks_created: 0,
            tasks_by_model: BTreeMap::new(),
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
            creates_by_model: by_model(&self.creates_by_model),
            tasks_created_by_model: by_model(&self.tasks_by_model),
        }
    }

    /// Counts a poll that reached task `id` and copies out what it needs.
    pub(super) fn poll_task(&mut self, id: &Uuid) -> Option<TaskSnapshot> {
        let task = self.tasks.get_mut(id)?;
        task.polls += 1;
        let polls = task.polls;
        let snap = task.spec.clone();
        self.task_polls += 1;
        self.max_polls_per_task = self.max_polls_per_task.max(polls);
        Some(snap)
    }
}

fn by_model(counts: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    counts.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect()
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::simulator::test_support::*;

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
}
