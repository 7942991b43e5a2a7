//! Metrics: the Prometheus counters, gauges and histograms of one worker.
//!
//! Every component gets a clone of [`Metrics`] and records what it did; the
//! operations endpoint renders them in the Prometheus text format with the
//! `vidu_worker_` prefix. Label values are fixed, low-cardinality strings
//! (never request ids, task ids, URLs or anything from a message body), and
//! nothing secret is ever a label.

use crate::model::Model;
use std::sync::Arc;

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Declares a label's values: an enum, its `as_str` and `ALL`.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in the order the README lists them.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }
    };
}

label_values! {
    /// What became of a request message (`requests_received_total{outcome}`).
    RequestOutcome {
        /// Created; its ticket and `submitted` event are out.
        Submitted = "submitted",
        /// Not a valid request: dead-lettered, never created.
        Invalid = "invalid",
        /// The upstream refused it for good.
        UpstreamRejected = "upstream_rejected",
        /// The upstream's answer to its create named no task: never again.
        UpstreamUnconfirmed = "upstream_unconfirmed",
        /// Given back to the queue (the gate closed, the retry budget ran out).
        HandedBack = "handed_back",
        /// Delivered too often: dead-lettered.
        Poison = "poison",
        /// A worker of the deployment created its id already.
        Duplicate = "duplicate",
        /// Canceled by its producer before its create: never created.
        Canceled = "canceled",
        /// Its deadline passed before its create: never created.
        Expired = "expired",
    }
}

label_values! {
    /// What a create call came to (`creates_total{outcome}`).
    CreateOutcome {
        /// A task id came back.
        Accepted = "accepted",
        /// 429.
        RateLimited = "rate_limited",
        /// Refused for good (4xx).
        Rejected = "rejected",
        /// 5xx, timeouts, connection errors.
        Failed = "failed",
        /// An answer that names no task.
        Unconfirmed = "unconfirmed",
        /// The delivery was lost while the request waited: nothing sent.
        NotSent = "not_sent",
        /// Accepted after the broker session that held the request was lost.
        AcceptedAfterDeliveryLost = "accepted_after_delivery_lost",
    }
}

label_values! {
    /// What a poll found (`polls_total{result}`).
    PollResult {
        /// Waiting to start.
        Queued = "queued",
        /// Generating.
        Processing = "processing",
        /// Done, with its videos.
        Succeeded = "succeeded",
        /// Failed upstream (or done with a video that cannot be handed on).
        Failed = "failed",
        /// A state the worker does not know, or done without a video yet.
        Unknown = "unknown",
        /// No answer: an error.
        Error = "error",
    }
}

label_values! {
    /// Why a create waited (`create_waits_total{reason}`).
    WaitReason {
        /// The deployment's window, configured or learned, was full.
        Quota = "quota",
        /// The pause after a 429.
        Pause = "pause",
    }
}

label_values! {
    /// Why a message on the tracking queues was not read as a ticket
    /// (`tickets_rejected_total{reason}`, and the dead-letter reason).
    TicketRejection {
        /// No signature.
        Unsigned = "unsigned",
        /// A signature that is not one.
        Forged = "forged",
        /// Not a valid ticket.
        Invalid = "invalid",
        /// Larger than a ticket.
        Oversized = "oversized",
        /// Signed by a key this worker does not hold: kept, not rejected.
        Unverified = "unverified",
    }
}

label_values! {
    /// What a copy of a video into the bucket came to
    /// (`storage_copies_total{outcome}`).
    CopyOutcome {
        /// Stored and checked.
        Stored = "stored",
        /// The store or the source failed for now: tried again later.
        Transient = "transient",
        /// The source URL no longer serves the video (expired).
        SourceGone = "source_gone",
        /// The store refuses the credentials, or has no such bucket.
        StoreRefused = "store_refused",
        /// Larger than `storage.max_video_bytes`.
        TooLarge = "too_large",
        /// The source does not serve a video.
        NotAVideo = "not_a_video",
        /// A source URL never fetched (not https, not public), or refused.
        Rejected = "rejected",
    }
}

/// Labels of `storage_copies_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CopyLabels {
    /// [`CopyOutcome::as_str`].
    pub outcome: &'static str,
}

/// Labels of the per-lane metrics (lane names come from `amqp.lanes`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    /// The lane (`default` for the request queue).
    pub lane: String,
}

/// Labels of `requests_received_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// [`RequestOutcome::as_str`].
    pub outcome: &'static str,
}

/// Labels of `upstream_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `create` or `task_result`.
    pub endpoint: &'static str,
    /// HTTP status code, or `timeout`, `connect`, `garbage`, `io`.
    pub status: &'static str,
}

/// Labels of `events_published_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// The CloudEvents type.
    pub r#type: &'static str,
}

/// Labels of `polls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    /// [`PollResult::as_str`].
    pub result: &'static str,
}

/// Labels of `creates_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CreateLabels {
    /// [`CreateOutcome::as_str`].
    pub outcome: &'static str,
    /// The model (one of the six Vidu Q3 names).
    pub model: &'static str,
}

/// Labels of `create_waits_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabels {
    /// [`WaitReason::as_str`].
    pub reason: &'static str,
}

/// Labels of `tickets_rejected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TicketLabels {
    /// [`TicketRejection::as_str`].
    pub reason: &'static str,
}

/// The worker's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    upstream_calls: Family<CallLabels, Counter>,
    events: Family<TypeLabels, Counter>,
    polls: Family<PollLabels, Counter>,
    tasks_tracked: Gauge,
    in_flight_requests: Gauge,
    in_flight_tickets: Gauge,
    ticket_hops: Counter,
    latency: Histogram,
    broker_connected: Gauge,
    upstream_refusing_key: Gauge,
    upstream_paused: Gauge,
    copies: Family<CopyLabels, Counter>,
    copy_bytes: Counter,
    copy_seconds: Histogram,
    copies_in_flight: Gauge,
    storage_refused: Gauge,
    cancels: Counter,
    lane_taken: Family<LaneLabels, Counter>,
    lane_waiting: Family<LaneLabels, Gauge>,
    lane_wait: Family<LaneLabels, Histogram>,
    untracked_tasks: Counter,
    creates: Family<CreateLabels, Counter>,
    create_waits: Family<WaitLabels, Counter>,
    create_rate_permitted: Gauge<f64, AtomicU64>,
    quota_learned: Gauge,
    quota_window: Gauge<f64, AtomicU64>,
    request_hold: Histogram,
    quota_slots_unused: Counter,
    tickets_rejected: Family<TicketLabels, Counter>,
    tickets_unverified: Counter,
    reply_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vidu_worker");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests_received",
            "Request messages handled, by outcome",
            requests.clone(),
        );
        let upstream_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "upstream_calls",
            "Calls to the Novita API, by endpoint and HTTP status (or failure kind)",
            upstream_calls.clone(),
        );
        let events = Family::<TypeLabels, Counter>::default();
        registry.register(
            "events_published",
            "Events confirmed by the broker, by type",
            events.clone(),
        );
        let polls = Family::<PollLabels, Counter>::default();
        registry.register(
            "polls",
            "Task-result polls, by what they found",
            polls.clone(),
        );
        let tasks_tracked = Gauge::default();
        registry.register(
            "tasks_tracked",
            "Upstream tasks being tracked by this deployment (tracking tickets in the broker, sampled)",
            tasks_tracked.clone(),
        );
        let in_flight_requests = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Request messages this worker holds right now",
            in_flight_requests.clone(),
        );
        let in_flight_tickets = Gauge::default();
        registry.register(
            "in_flight_tickets",
            "Tracking tickets this worker holds right now",
            in_flight_tickets.clone(),
        );
        let ticket_hops = Counter::default();
        registry.register(
            "ticket_hops",
            "Tracking tickets parked in a wait queue",
            ticket_hops.clone(),
        );
        let latency = Histogram::new([
            1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
            21600.0, 86400.0,
        ]);
        registry.register(
            "request_to_terminal_seconds",
            "Seconds from a request's arrival to its terminal event",
            latency.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while connected to the broker and consuming",
            broker_connected.clone(),
        );
        let upstream_refusing_key = Gauge::default();
        registry.register(
            "upstream_refusing_key",
            "1 while the upstream refuses the API key or the balance",
            upstream_refusing_key.clone(),
        );
        let upstream_paused = Gauge::default();
        registry.register(
            "upstream_paused",
            "1 while creates are stopped because the upstream refuses the key or balance, or keeps failing",
            upstream_paused.clone(),
        );
        let untracked_tasks = Counter::default();
        registry.register(
            "untracked_tasks",
            "Upstream tasks created whose tracking ticket could not be recorded",
            untracked_tasks.clone(),
        );
        let creates = Family::<CreateLabels, Counter>::default();
        registry.register(
            "creates",
            "Create calls (the paid step), by outcome",
            creates.clone(),
        );
        let create_waits = Family::<WaitLabels, Counter>::default();
        registry.register(
            "create_waits",
            "Times a create waited before a request was taken or retried: for the deployment's quota window (configured or learned), or a 429 pause",
            create_waits.clone(),
        );
        let create_rate_permitted = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "create_rate_permitted",
            "Creates per second the deployment may make, on average: the configured quota, the quota learned from 429s, or +Inf while none is known",
            create_rate_permitted.clone(),
        );
        let quota_learned = Gauge::default();
        registry.register(
            "create_quota_learned",
            "Creates per window the fleet learned the account allows (0: none learned; with upstream.create_quota set, never learned)",
            quota_learned.clone(),
        );
        let quota_window = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "create_quota_window_seconds",
            "The window of the create quota in force, in seconds (configured, or learned: upstream.quota_window)",
            quota_window.clone(),
        );
        let request_hold = Histogram::new([
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ]);
        registry.register(
            "request_hold_seconds",
            "Seconds a request message was held unacknowledged by this worker",
            request_hold.clone(),
        );
        let tickets_rejected = Family::<TicketLabels, Counter>::default();
        registry.register(
            "tickets_rejected",
            "Messages on the tracking queues that were not this deployment's tickets (dead-lettered, never acted on), by reason",
            tickets_rejected.clone(),
        );
        let tickets_unverified = Counter::default();
        registry.register(
            "tickets_unverified",
            "Tickets read whose signatures no key of this worker verifies (a secret not configured here, or a forgery); kept for a worker that holds the key, never acted on",
            tickets_unverified.clone(),
        );
        let reply_failures = Counter::default();
        registry.register(
            "reply_failures",
            "Terminal events the broker refused to deliver to a request's reply_to (the events exchange had them)",
            reply_failures.clone(),
        );
        let quota_slots_unused = Counter::default();
        registry.register(
            "quota_slots_unused",
            "Create slots (pacing and, with a quota, a claim in the deployment's window) taken for a request that was not there or needed no create, and not used by another request in time",
            quota_slots_unused.clone(),
        );
        let copies = Family::<CopyLabels, Counter>::default();
        registry.register(
            "storage_copies",
            "Copies of videos into the bucket, by outcome",
            copies.clone(),
        );
        let copy_bytes = Counter::default();
        registry.register(
            "storage_copied_bytes",
            "Bytes of videos stored in the bucket",
            copy_bytes.clone(),
        );
        let copy_seconds = Histogram::new([
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
        ]);
        registry.register(
            "storage_copy_seconds",
            "Seconds one copy of a video took, download and upload, whatever its outcome",
            copy_seconds.clone(),
        );
        let copies_in_flight = Gauge::default();
        registry.register(
            "storage_copies_in_flight",
            "Copies of videos this worker is making right now",
            copies_in_flight.clone(),
        );
        let storage_refused = Gauge::default();
        registry.register(
            "storage_refused",
            "1 while the video storage refuses the credentials or has no such bucket (intake paused), else 0",
            storage_refused.clone(),
        );
        let cancels = Counter::default();
        registry.register(
            "cancels_recorded",
            "Request ids canceled by producers that this worker read from the cancel queue and recorded for the fleet",
            cancels.clone(),
        );
        let lane_taken = Family::<LaneLabels, Counter>::default();
        registry.register(
            "lane_taken",
            "Requests this worker took, by lane",
            lane_taken.clone(),
        );
        let lane_waiting = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "lane_waiting",
            "Requests waiting in each lane's queue when this worker last looked",
            lane_waiting.clone(),
        );
        let lane_wait = Family::<LaneLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
            ])
        });
        registry.register(
            "lane_wait_seconds",
            "Seconds a request waited in its lane, from its AMQP timestamp (when the producer set one) to its take, by lane",
            lane_wait.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                cancels,
                lane_taken,
                lane_waiting,
                lane_wait,
                storage_refused,
                copies,
                copy_bytes,
                copy_seconds,
                copies_in_flight,
                requests,
                upstream_calls,
                events,
                polls,
                tasks_tracked,
                in_flight_requests,
                in_flight_tickets,
                ticket_hops,
                latency,
                broker_connected,
                upstream_refusing_key,
                upstream_paused,
                untracked_tasks,
                creates,
                create_waits,
                create_rate_permitted,
                quota_learned,
                quota_window,
                request_hold,
                quota_slots_unused,
                tickets_rejected,
                tickets_unverified,
                reply_failures,
            }),
        }
    }

    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Counts a request by outcome.
    pub fn request(&self, outcome: RequestOutcome) {
        self.inner
            .requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts an upstream call.
    pub fn upstream_call(&self, endpoint: &'static str, status: &'static str) {
        self.inner
            .upstream_calls
            .get_or_create(&CallLabels { endpoint, status })
            .inc();
    }

    /// Counts a confirmed event.
    pub fn event(&self, r#type: &'static str) {
        self.inner
            .events
            .get_or_create(&TypeLabels { r#type })
            .inc();
    }

    /// A request was taken from `lane`, leaving `left` waiting there, after
    /// waiting `waited` seconds (when its producer stamped it).
    pub fn lane_taken(&self, lane: &str, left: u32, waited: Option<f64>) {
        let labels = LaneLabels {
            lane: lane.to_owned(),
        };
        self.inner.lane_taken.get_or_create(&labels).inc();
        self.inner
            .lane_waiting
            .get_or_create(&labels)
            .set(i64::from(left));
        if let Some(secs) = waited {
            self.inner.lane_wait.get_or_create(&labels).observe(secs);
        }
    }

    /// Requests waiting in `lane` as last seen.
    pub fn lane_waiting(&self, lane: &str, waiting: u32) {
        self.inner
            .lane_waiting
            .get_or_create(&LaneLabels {
                lane: lane.to_owned(),
            })
            .set(i64::from(waiting));
    }

    /// Counts request ids recorded as canceled.
    pub fn cancels_recorded(&self, ids: usize) {
        self.inner.cancels.inc_by(ids as u64);
    }

    /// Whether the storage refuses us.
    pub fn set_storage_refused(&self, refused: bool) {
        self.inner.storage_refused.set(i64::from(refused));
    }

    /// A copy starts.
    pub fn copy_started(&self) {
        self.inner.copies_in_flight.inc();
    }

    /// A copy ended: its outcome, the bytes stored and how long it took.
    pub fn copy_finished(&self, outcome: CopyOutcome, bytes: u64, seconds: f64) {
        self.inner.copies_in_flight.dec();
        self.inner
            .copies
            .get_or_create(&CopyLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        self.inner.copy_bytes.inc_by(bytes);
        self.inner.copy_seconds.observe(seconds);
    }

    /// Counts a poll result.
    pub fn poll(&self, result: PollResult) {
        self.inner
            .polls
            .get_or_create(&PollLabels {
                result: result.as_str(),
            })
            .inc();
    }

    /// Sets the sampled number of tracked tasks.
    pub fn set_tasks_tracked(&self, n: i64) {
        self.inner.tasks_tracked.set(n);
    }

    /// The in-flight request gauge.
    pub fn in_flight_requests(&self) -> &Gauge {
        &self.inner.in_flight_requests
    }

    /// The in-flight ticket gauge.
    pub fn in_flight_tickets(&self) -> &Gauge {
        &self.inner.in_flight_tickets
    }

    /// Counts a ticket parked in a wait queue.
    pub fn ticket_hop(&self) {
        self.inner.ticket_hops.inc();
    }

    /// Records request-to-terminal latency.
    pub fn observe_latency(&self, seconds: f64) {
        self.inner.latency.observe(seconds);
    }

    /// Sets the broker gauge.
    pub fn set_broker_connected(&self, up: bool) {
        self.inner.broker_connected.set(i64::from(up));
    }

    /// Sets the key gauge.
    pub fn set_upstream_refusing_key(&self, refusing: bool) {
        self.inner.upstream_refusing_key.set(i64::from(refusing));
    }

    /// Sets the intake-paused gauge.
    pub fn set_upstream_paused(&self, paused: bool) {
        self.inner.upstream_paused.set(i64::from(paused));
    }

    /// Counts a task created upstream whose ticket was lost.
    pub fn untracked_task(&self) {
        self.inner.untracked_tasks.inc();
    }

    /// Counts a create call by outcome and model.
    pub fn create(&self, outcome: CreateOutcome, model: Model) {
        self.inner
            .creates
            .get_or_create(&CreateLabels {
                outcome: outcome.as_str(),
                model: model.as_str(),
            })
            .inc();
    }

    /// Counts a wait before a create.
    pub fn create_wait(&self, reason: WaitReason) {
        self.inner
            .create_waits
            .get_or_create(&WaitLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Sets the permitted create rate (creates per second; infinity when
    /// no limit is known).
    pub fn set_create_rate_permitted(&self, per_second: f64) {
        self.inner.create_rate_permitted.set(per_second);
    }

    /// Sets the quota in force: `learned` creates per window (0: none
    /// learned) and its window.
    pub fn set_create_quota(&self, learned: u32, window_seconds: f64) {
        self.inner.quota_learned.set(i64::from(learned));
        self.inner.quota_window.set(window_seconds);
    }

    /// Records how long a request message was held.
    pub fn observe_hold(&self, seconds: f64) {
        self.inner.request_hold.observe(seconds);
    }

    /// Counts a message refused on a tracking queue.
    pub fn ticket_rejected(&self, reason: TicketRejection) {
        self.inner
            .tickets_rejected
            .get_or_create(&TicketLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a ticket kept because no key of this worker verifies it.
    pub fn ticket_unverified(&self) {
        self.inner.tickets_unverified.inc();
    }

    /// Counts a terminal event `reply_to` did not take.
    pub fn reply_failure(&self) {
        self.inner.reply_failures.inc();
    }

    /// Counts a quota slot claimed in vain.
    pub fn quota_slot_unused(&self) {
        self.inner.quota_slots_unused.inc();
    }
}

/// Increments a gauge for the lifetime of the guard.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Increments `gauge` until the guard drops.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
