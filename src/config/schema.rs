//! The key schema: every section of the settings with its keys, types,
//! defaults and limits, as serde reads them (`deny_unknown_fields`, so a
//! misspelt key is refused) and writes them back (for
//! [`env_vars`](super::env_vars), which exposes the secrets that are
//! otherwise written redacted). Durations are humantime text (`250ms`,
//! `10m`); [`DURATION_LIMITS`] bounds every one of them, and
//! [`MANAGED_QUEUE_ARGUMENTS`] names the queue arguments users may not set.
//! Nothing here reads a file or the environment: that is the loader's job.

use crate::model::Model;
use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

use super::{env, redact_url, Settings};

/// `[tickets]`: the secret that signs tracking tickets, so that a message a
/// producer writes into an internal queue is never acted on.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TicketSettings {
    /// Signs every ticket; when unset, the key is derived from the API key
    /// (no new secret to manage). Never logged.
    #[serde(serialize_with = "env::optional_secret")]
    pub secret: Option<SecretString>,
    /// Secrets (or, for a deployment that signs with its API key, API keys)
    /// still accepted when verifying tickets written before a rotation.
    /// Keep them for `polling.max_off_peak_task_age` (72 h) after it.
    #[serde(serialize_with = "env::secrets")]
    pub previous_secrets: Vec<SecretString>,
    /// Accept tickets without a signature until this instant (RFC 3339),
    /// and only those that say they were submitted before it: while
    /// upgrading from a version that did not sign them (they can be in
    /// flight for `polling.max_off_peak_task_age`). Anyone who can write to
    /// the vhost can forge an unsigned ticket meanwhile. `false`: never.
    pub accept_unsigned: AcceptUnsigned,
}

/// `tickets.accept_unsigned`: `false`, or the RFC 3339 instant until which
/// unsigned tickets are read. `true` is refused: an open-ended acceptance
/// of forgeable tickets is what the bound is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AcceptUnsigned {
    /// Unsigned tickets are refused (the default).
    #[default]
    Never,
    /// Unsigned tickets submitted before this instant are read until it.
    Until(chrono::DateTime<chrono::Utc>),
}

impl AcceptUnsigned {
    /// The end of the migration, if one is configured.
    pub fn until(self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self {
            Self::Never => None,
            Self::Until(at) => Some(at),
        }
    }

    /// Reads `false`, `"false"` or an RFC 3339 instant.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" | "false" => Ok(Self::Never),
            "true" => Err("takes an RFC 3339 instant (e.g. \"2026-12-10T00:00:00Z\") after which unsigned tickets are refused again, not true: accepting forgeable tickets must end".into()),
            other => chrono::DateTime::parse_from_rfc3339(other)
                .map(|t| Self::Until(t.with_timezone(&chrono::Utc)))
                .map_err(|_| format!("{other:?} is not false or an RFC 3339 instant like 2026-12-10T00:00:00Z")),
        }
    }
}

impl<'de> Deserialize<'de> for AcceptUnsigned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(false) => Ok(Self::Never),
            Raw::Flag(true) => Self::parse("true").map_err(serde::de::Error::custom),
            Raw::Text(t) => Self::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for AcceptUnsigned {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Never => s.serialize_bool(false),
            Self::Until(at) => s.serialize_str(&at.to_rfc3339()),
        }
    }
}

impl fmt::Debug for TicketSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketSettings")
            .field("secret", &self.secret.as_ref().map(|_| "[REDACTED]"))
            .field("previous_secrets", &self.previous_secrets.len())
            .field("accept_unsigned", &self.accept_unsigned)
            .finish()
    }
}

/// One duration setting: its key, the longest value it accepts, and the
/// field of [`Settings`] that holds it.
#[derive(Debug, Clone, Copy)]
pub struct DurationLimit {
    /// The dotted key (`polling.min_interval`).
    pub key: &'static str,
    /// The longest value accepted.
    pub limit: Duration,
    /// Reads the setting's value.
    pub value: fn(&Settings) -> Duration,
}

/// Builds [`DURATION_LIMITS`] from `section.field <= limit;` lines: the key
/// and the field are the same tokens, so they cannot disagree.
macro_rules! duration_limits {
    ($($section:ident . $field:ident <= $limit:expr;)+) => {
        /// Every duration setting with the longest value it accepts (checked
        /// at start, so that an absurd value cannot overflow a deadline
        /// later). The loader checks that each of these keys holds a
        /// duration, and [`Settings::validate`] checks each limit; a unit
        /// test fails, naming the key, for a duration field missing here.
        pub const DURATION_LIMITS: &[DurationLimit] = &[$(DurationLimit {
            key: concat!(stringify!($section), ".", stringify!($field)),
            limit: $limit,
            value: |s: &Settings| s.$section.$field,
        }),+];
    };
}

duration_limits! {
    amqp.max_hold <= Duration::from_secs(25 * 60);
    upstream.timeout <= Duration::from_secs(10 * 60);
    upstream.connect_timeout <= Duration::from_secs(5 * 60);
    upstream.retry_initial <= Duration::from_secs(10 * 60);
    upstream.retry_max <= Duration::from_secs(3600);
    upstream.create_retry_budget <= Duration::from_secs(25 * 60);
    upstream.quota_window <= Duration::from_secs(3600);
    polling.min_interval <= Duration::from_secs(3600);
    polling.max_interval <= Duration::from_secs(24 * 3600);
    polling.max_task_age <= Duration::from_secs(30 * 24 * 3600);
    polling.max_off_peak_task_age <= Duration::from_secs(30 * 24 * 3600);
    shutdown.grace_period <= Duration::from_secs(3600);
    storage.connect_timeout <= Duration::from_secs(5 * 60);
    storage.copy_timeout <= Duration::from_secs(20 * 60);
    storage.request_timeout <= Duration::from_secs(10 * 60);
}

/// Queue types the worker can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queues: survive a node loss, count deliveries, and
    /// dead-letter at-least-once. The default.
    Quorum,
    /// Single-node queues, for brokers without quorum queue support.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// `[amqp]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://user:pass@host:port/vhost` (or `amqps://` for
    /// TLS). The vhost is the URL's path, percent-encoded (`%2f` is `/`).
    /// The nodes of one cluster are a comma-separated list (or a TOML
    /// list): each worker shuffles them, uses the first that answers and
    /// moves to another when its node is lost.
    #[serde(serialize_with = "env::secret_url", deserialize_with = "url_list")]
    pub url: SecretString,
    /// User name, overriding the URL's.
    pub username: Option<String>,
    /// Password, overriding the URL's. Never logged.
    #[serde(serialize_with = "env::optional_secret")]
    pub password: Option<SecretString>,
    /// A file holding the password (a mounted Kubernetes Secret), read at
    /// start and at every reconnect, surrounding whitespace trimmed.
    pub password_file: Option<PathBuf>,
    /// TLS settings for `amqps://` URLs.
    pub tls: AmqpTlsSettings,
    /// Whether the worker declares its queues and exchange (`true`), or only
    /// checks with passive declarations that operators created them.
    pub declare_topology: bool,
    /// Extra `x-` arguments for every queue the worker declares.
    pub queue_arguments: BTreeMap<String, QueueArgument>,
    /// The request queue producers publish to; internal names derive from it.
    pub request_queue: String,
    /// The topic exchange events are published to.
    pub events_exchange: String,
    /// Unacknowledged requests one worker holds at a time.
    pub prefetch: u16,
    /// Type of the queues the worker declares.
    pub queue_type: QueueType,
    /// Replicas of each quorum queue the worker declares
    /// (`x-quorum-initial-group-size`); unset, the broker's default applies
    /// (every node of the cluster at declaration time).
    pub quorum_initial_group_size: Option<u16>,
    /// Deliveries after which a request or ticket that never completes is
    /// dead-lettered as poison.
    pub max_deliveries: u32,
    /// How long a request may wait at the gate (while the upstream refuses
    /// the balance) before it is handed back to the queue.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
    /// The queues a request's `reply_to` may name, as patterns where `*`
    /// matches any run of characters: direct reply-to and queues named
    /// `*.replies` by default. Names of the deployment's own queues and
    /// shaped like another deployment's internal ones are refused whatever
    /// this says.
    pub reply_to_allowed: Vec<String>,
    /// Named lanes with weights (`{ interactive = 8, bulk = 1 }`, or in
    /// the environment `interactive=8,bulk=1`); none: one request queue.
    pub lanes: Lanes,
    /// Whether a layer (a configuration file or the environment) set
    /// `url`, even to the built-in default; false when it is the built-in
    /// default. Set by [`Settings::load_with_env`], not a key.
    #[serde(skip)]
    pub url_configured: bool,
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[REDACTED]"))
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("declare_topology", &self.declare_topology)
            .field("queue_arguments", &self.queue_arguments)
            .field("request_queue", &self.request_queue)
            .field("events_exchange", &self.events_exchange)
            .field("prefetch", &self.prefetch)
            .field("queue_type", &self.queue_type)
            .field("quorum_initial_group_size", &self.quorum_initial_group_size)
            .field("max_deliveries", &self.max_deliveries)
            .field("max_hold", &self.max_hold)
            .field("reply_to_allowed", &self.reply_to_allowed)
            .finish()
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            username: None,
            password: None,
            password_file: None,
            tls: AmqpTlsSettings::default(),
            declare_topology: true,
            queue_arguments: BTreeMap::new(),
            request_queue: "vidu.requests".into(),
            events_exchange: "vidu.events".into(),
            prefetch: 32,
            queue_type: QueueType::Quorum,
            quorum_initial_group_size: None,
            max_deliveries: 10,
            max_hold: Duration::from_secs(600),
            reply_to_allowed: DEFAULT_REPLY_TO_ALLOWED
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            lanes: Lanes::default(),
            url_configured: false,
        }
    }
}

/// `amqp.lanes`: lane names and their weights. The request queue itself is
/// the lane `default` (weight 1 unless listed). Serialized as
/// `name=weight,…` (the environment's form); read from that or a table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lanes(pub BTreeMap<String, u32>);

/// The lane the request queue itself is.
pub const DEFAULT_LANE: &str = "default";
/// Most lanes (each is a queue the worker looks at).
pub const MAX_LANES: usize = 16;
/// The largest weight.
pub const MAX_LANE_WEIGHT: u32 = 1000;

impl Lanes {
    /// Reads `name=weight,…`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lanes = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not name=weight"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("the weight of {:?} is not a whole number", name.trim()))?;
            lanes.insert(name.trim().to_owned(), weight);
        }
        Ok(Self(lanes))
    }

    /// Checks names (1–32 of `[a-z0-9-]`), weights (1 to
    /// [`MAX_LANE_WEIGHT`]) and the count ([`MAX_LANES`] with `default`).
    pub fn validate(&self) -> Result<(), String> {
        for (name, weight) in &self.0 {
            if name.is_empty()
                || name.len() > 32
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!(
                    "lane name {:?} must be 1 to 32 characters of a-z, 0-9 and -",
                    name.chars().take(40).collect::<String>()
                ));
            }
            if !(1..=MAX_LANE_WEIGHT).contains(weight) {
                return Err(format!(
                    "the weight of lane {name} must be 1 to {MAX_LANE_WEIGHT}"
                ));
            }
        }
        if self.lanes().len() > MAX_LANES {
            return Err(format!("at most {MAX_LANES} lanes, default included"));
        }
        Ok(())
    }

    /// Every lane with its weight, `default` first.
    pub fn lanes(&self) -> Vec<(String, u32)> {
        let mut out = vec![(
            DEFAULT_LANE.to_owned(),
            self.0.get(DEFAULT_LANE).copied().unwrap_or(1),
        )];
        out.extend(
            self.0
                .iter()
                .filter(|(name, _)| name.as_str() != DEFAULT_LANE)
                .map(|(name, weight)| (name.clone(), *weight)),
        );
        out
    }
}

impl Serialize for Lanes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = self.0.iter().map(|(n, w)| format!("{n}={w}")).collect();
        serializer.serialize_str(&text.join(","))
    }
}

impl<'de> Deserialize<'de> for Lanes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum TextOrTable {
            Text(String),
            Table(BTreeMap<String, u32>),
        }
        match TextOrTable::deserialize(d)? {
            TextOrTable::Text(text) => Lanes::parse(&text).map_err(serde::de::Error::custom),
            TextOrTable::Table(table) => Ok(Lanes(table)),
        }
    }
}

/// The default of `amqp.reply_to_allowed`: RabbitMQ's direct reply-to, and
/// queues named `*.replies`.
pub const DEFAULT_REPLY_TO_ALLOWED: &[&str] = &["amq.rabbitmq.reply-to*", "*.replies"];

/// Reads `amqp.url`: one URL, a comma-separated list of the nodes of one
/// cluster, or (in TOML) a list of URLs, kept as the comma-separated text.
fn url_list<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(SecretString::from(match OneOrMany::deserialize(d)? {
        OneOrMany::One(url) => url,
        OneOrMany::Many(urls) => urls.join(","),
    }))
}

/// `[amqp.tls]`: verification of the broker and the client's own identity,
/// for `amqps://` URLs. Files are PEM, read at every connection (so rotated
/// certificates are picked up when the worker reconnects).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpTlsSettings {
    /// CA certificates that may sign the broker's certificate, trusted in
    /// addition to the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1 PEM,
    /// not encrypted); needs `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// One extra queue argument: TOML booleans, integers, floats and strings map
/// to the AMQP field types RabbitMQ expects.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum QueueArgument {
    /// `true` / `false`.
    Bool(bool),
    /// An integer (sent as a signed 64-bit integer).
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Text(String),
}

/// An account's create quota: at most `creates` creates in any sliding
/// `window`, for the whole deployment. Written `20/min`, `2/s`, `100/h` or
/// `N/<duration>` (`30/90s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateQuota {
    /// Creates allowed per window (at least 1).
    pub creates: u32,
    /// The window (1 s to 24 h).
    pub window: Duration,
}

impl CreateQuota {
    /// Longest window accepted.
    pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

    /// Parses `N/unit`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let form = || format!("{text:?} is not a quota like 20/min, 2/s, 100/h or 30/90s");
        let (count, per) = text.trim().split_once('/').ok_or_else(form)?;
        let creates: u32 = count.trim().parse().map_err(|_| form())?;
        let window = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| form())?,
        };
        if creates == 0 {
            return Err(
                "must allow at least one create (leave it unset to learn the quota)".into(),
            );
        }
        if window < Duration::from_secs(1) || window > Self::MAX_WINDOW {
            return Err(format!("{text:?}: the window must be from 1s to 24h"));
        }
        Ok(Self { creates, window })
    }

    /// Creates per second, on average.
    pub fn per_second(&self) -> f64 {
        f64::from(self.creates) / self.window.as_secs_f64()
    }
}

/// Written as it is read (`20/1m`).
impl Serialize for CreateQuota {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for CreateQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.creates,
            humantime::format_duration(self.window)
        )
    }
}

/// `upstream.create_quota`: a quota, or nothing for an absent or empty value.
fn optional_quota<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<Option<CreateQuota>, D::Error> {
    match Option::<String>::deserialize(de)? {
        Some(text) if !text.trim().is_empty() => CreateQuota::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
        _ => Ok(None),
    }
}

/// Queue arguments the worker manages itself, and why they cannot be set
/// through `amqp.queue_arguments`: the ones the broker topology sets on its
/// queues, and `x-expires`, which it deliberately leaves unset. A unit test
/// of the crate checks this list against the arguments the topology
/// declares.
pub const MANAGED_QUEUE_ARGUMENTS: &[(&str, &str)] = &[
    ("x-queue-type", "set it with amqp.queue_type"),
    (
        "x-quorum-initial-group-size",
        "set it with amqp.quorum_initial_group_size",
    ),
    ("x-delivery-limit", "it follows amqp.max_deliveries"),
    (
        "x-dead-letter-exchange",
        "the worker routes dead letters itself",
    ),
    (
        "x-dead-letter-routing-key",
        "the worker routes dead letters itself",
    ),
    (
        "x-dead-letter-strategy",
        "the worker needs at-least-once dead-lettering",
    ),
    (
        "x-overflow",
        "the worker needs reject-publish for at-least-once dead-lettering",
    ),
    (
        "x-message-ttl",
        "it would expire requests and tickets (the wait queues set their own)",
    ),
    (
        "x-expires",
        "it would delete idle wait queues together with the tickets they hold",
    ),
];

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Base URL of the Novita API.
    pub base_url: String,
    /// The Novita API key (`NOVITA_API_KEY`). Never logged.
    #[serde(serialize_with = "env::optional_secret")]
    pub api_key: Option<SecretString>,
    /// Deadline of one HTTP call, connection included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Deadline for establishing a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The account's create quota, shared by every worker of the deployment
    /// (`20/min`, `2/s`, `100/h`); none: learn it from the upstream's 429s.
    #[serde(deserialize_with = "optional_quota")]
    pub create_quota: Option<CreateQuota>,
    /// The sliding window the upstream counts creates in, when the quota is
    /// learned rather than configured (Novita: a minute).
    #[serde(with = "humantime_serde")]
    pub quota_window: Duration,
    /// Ceiling on task-result calls per second from one worker; 0 means no
    /// limit. Creates have their own budget (`create_quota`).
    pub max_requests_per_second: f64,
    /// Ceiling on task-result calls in flight at once from one worker
    /// (bounds connections and their buffers; creates are bounded by
    /// `amqp.prefetch`).
    pub max_concurrent_requests: u32,
    /// First retry delay after a transient error.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long a create call keeps being retried before the request is
    /// handed back to the queue.
    #[serde(with = "humantime_serde")]
    pub create_retry_budget: Duration,
    /// Extra CA certificates (PEM) to trust besides the system roots, e.g.
    /// a corporate proxy's.
    pub ca_file: Option<PathBuf>,
    /// Allows an `http://` `base_url` to a host other than this machine
    /// (the API key then crosses the network in clear text): only for a
    /// proxy on a network the operator trusts.
    pub allow_plain_http: bool,
    /// The models this deployment may spend on (default: all six); a
    /// request for another is refused as `invalid_request` naming `model`.
    pub models: Vec<Model>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.novita.ai".into(),
            api_key: None,
            timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            create_quota: None,
            quota_window: Duration::from_secs(60),
            max_requests_per_second: 50.0,
            max_concurrent_requests: 32,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            create_retry_budget: Duration::from_secs(120),
            ca_file: None,
            allow_plain_http: false,
            models: Model::ALL.to_vec(),
        }
    }
}

/// `[polling]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollingSettings {
    /// Shortest wait between two looks at one task.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Longest wait between two looks at one task.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// A task still unfinished this long after submission fails `timed_out`.
    #[serde(with = "humantime_serde")]
    pub max_task_age: Duration,
    /// The same for `off_peak` requests.
    #[serde(with = "humantime_serde")]
    pub max_off_peak_task_age: Duration,
    /// Tracking tickets one worker handles at a time.
    pub prefetch: u16,
}

impl Default for PollingSettings {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            max_task_age: Duration::from_secs(2 * 3600),
            max_off_peak_task_age: Duration::from_secs(72 * 3600),
            prefetch: 64,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Listen address of the operations endpoint.
    pub listen: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9090".into(),
        }
    }
}

/// Log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line (machines).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `json` or `pretty`.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
        }
    }
}

/// `[events]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// CloudEvents `source` attribute.
    pub source: String,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            source: "vidu-worker".into(),
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long SIGTERM waits for work in flight before handing it back.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(25),
        }
    }
}

/// `[storage]`: where every paid video is copied (none: no copies).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// The S3 bucket; `None`: no copies are made.
    pub bucket: Option<String>,
    /// An S3-compatible service's URL; `None`: AWS S3 in `region`.
    pub endpoint: Option<String>,
    /// The bucket's region.
    pub region: String,
    /// Path-style addressing (`https://host/bucket/key`), which most
    /// self-hosted stores need.
    pub path_style: bool,
    /// Put before every object key.
    pub prefix: String,
    /// With `secret_access_key_file`, the credentials (otherwise the
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`
    /// variables).
    pub access_key_id: Option<String>,
    /// The file holding the secret access key (read again when the store
    /// refuses the credentials, so a rotated file is picked up).
    pub secret_access_key_file: Option<PathBuf>,
    /// How long a presigned GET URL of each copy stays valid (at most 7
    /// days); `None`: no URL in the event.
    #[serde(with = "humantime_serde::option")]
    pub presign: Option<Duration>,
    /// The largest video copied; a larger one ends `storage_failed`.
    pub max_video_bytes: u64,
    /// Fetch video URLs that are not `https` or resolve to loopback,
    /// private, link-local or other non-public addresses (tests, the demo).
    pub allow_private_sources: bool,
    /// Copies at once per worker.
    pub max_concurrent_copies: u32,
    /// Multipart part size in bytes (memory per copy is a few parts);
    /// 5 MiB (the default, S3's smallest) to 64 MiB.
    pub part_size: u64,
    /// Connecting to a video's source.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// One whole copy: the download and the upload together.
    #[serde(with = "humantime_serde")]
    pub copy_timeout: Duration,
    /// One request to the store.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// 1 MiB.
pub const MIB: u64 = 1024 * 1024;

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            bucket: None,
            endpoint: None,
            region: "us-east-1".into(),
            path_style: false,
            prefix: String::new(),
            access_key_id: None,
            secret_access_key_file: None,
            presign: None,
            max_video_bytes: 2 * 1024 * MIB,
            allow_private_sources: false,
            max_concurrent_copies: 2,
            part_size: 5 * MIB,
            connect_timeout: Duration::from_secs(10),
            copy_timeout: Duration::from_secs(15 * 60),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// The longest a presigned URL can be valid (S3's limit).
pub const MAX_PRESIGN: Duration = Duration::from_secs(7 * 24 * 3600);

impl StorageSettings {
    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), super::ConfigError> {
        use super::ConfigError;
        let Some(bucket) = &self.bucket else {
            return Ok(());
        };
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !valid_bucket {
            return Err(ConfigError::new(
                "storage.bucket",
                "is not a bucket name (3 to 63 lowercase letters, digits, dots and hyphens)",
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            match url::Url::parse(endpoint) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.username().is_empty()
                        && u.password().is_none()
                        && u.query().is_none() => {}
                _ => {
                    return Err(ConfigError::new(
                        "storage.endpoint",
                        "is not an http(s) URL of an S3-compatible service (without credentials or a query)",
                    ))
                }
            }
        }
        if self.region.is_empty()
            || self.region.len() > 64
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::new(
                "storage.region",
                "is not a region name like us-east-1",
            ));
        }
        if self.prefix.len() > 512
            || self.prefix.starts_with('/')
            || self.prefix.chars().any(|c| c.is_control() || c == '\\')
            || self.prefix.split('/').any(|part| part == "..")
        {
            return Err(ConfigError::new(
                "storage.prefix",
                "must be at most 512 characters, without a leading /, control characters, backslashes or .. parts",
            ));
        }
        if let Some(presign) = self.presign {
            if presign.is_zero() || presign > MAX_PRESIGN {
                return Err(ConfigError::new(
                    "storage.presign",
                    "must be between 1s and 7d (S3's limit for a presigned URL)",
                ));
            }
        }
        if self.max_video_bytes == 0 {
            return Err(ConfigError::new(
                "storage.max_video_bytes",
                "must be at least 1",
            ));
        }
        if self.max_concurrent_copies == 0 {
            return Err(ConfigError::new(
                "storage.max_concurrent_copies",
                "must be at least 1",
            ));
        }
        if !(5 * MIB..=64 * MIB).contains(&self.part_size) {
            return Err(ConfigError::new(
                "storage.part_size",
                "must be between 5 MiB (S3's smallest part) and 64 MiB (5242880 to 67108864)",
            ));
        }
        if self.access_key_id.is_some() != self.secret_access_key_file.is_some() {
            return Err(ConfigError::new(
                "storage.access_key_id",
                "and storage.secret_access_key_file go together (or leave both out for AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            ));
        }
        if let Some(file) = &self.secret_access_key_file {
            if !file.is_file() {
                return Err(ConfigError::new(
                    "storage.secret_access_key_file",
                    format!("{} is not a readable file", file.display()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod storage_tests {
    use super::*;

    #[test]
    fn storage_settings_are_checked_naming_the_key() {
        let with = |f: fn(&mut StorageSettings)| {
            let mut s = StorageSettings {
                bucket: Some("team-videos".into()),
                ..StorageSettings::default()
            };
            f(&mut s);
            s.validate().err().map(|e| e.key)
        };
        // (change, key named, or None when valid)
        type Case = (fn(&mut StorageSettings), Option<&'static str>);
        let cases: [Case; 14] = [
            (|_| {}, None),
            (|s| s.bucket = None, None),
            (
                |s| s.bucket = Some("Team_Videos".into()),
                Some("storage.bucket"),
            ),
            (|s| s.bucket = Some("ab".into()), Some("storage.bucket")),
            (
                |s| s.bucket = Some("-videos".into()),
                Some("storage.bucket"),
            ),
            (|s| s.endpoint = Some("http://minio:9000".into()), None),
            (
                |s| s.endpoint = Some("ftp://minio".into()),
                Some("storage.endpoint"),
            ),
            (
                |s| s.endpoint = Some("https://key:secret@minio".into()),
                Some("storage.endpoint"),
            ),
            (|s| s.region = "eu west".into(), Some("storage.region")),
            (|s| s.prefix = "a/../b/".into(), Some("storage.prefix")),
            (
                |s| s.presign = Some(Duration::from_secs(8 * 24 * 3600)),
                Some("storage.presign"),
            ),
            (|s| s.part_size = 4 * MIB, Some("storage.part_size")),
            (
                |s| s.max_concurrent_copies = 0,
                Some("storage.max_concurrent_copies"),
            ),
            (
                |s| s.access_key_id = Some("AKIA".into()),
                Some("storage.access_key_id"),
            ),
        ];
        for (i, (change, key)) in cases.into_iter().enumerate() {
            assert_eq!(with(change).as_deref(), key, "case {i}");
        }
    }
}
