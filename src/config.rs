//! Settings: the layered configuration of every command.
//!
//! Layers, later wins: built-in defaults → `config/default.toml` (relative to
//! the working directory, optional) → `--config FILE` → environment
//! (`VIDU_WORKER__SECTION__KEY`, plus `NOVITA_API_KEY`). This module owns the
//! names, defaults and validation of every key, and turns any problem into a
//! [`ConfigError`] whose one-line message names the key. It never logs or
//! prints the API key or the broker password: they live in
//! [`SecretString`]s whose `Debug` output is redacted, and broker URLs are
//! shown through [`redact_url`] / [`AmqpSettings::display_url`]. Files named
//! by settings (password, TLS and CA files) are checked here at load, so a
//! typo is a configuration error naming the key.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The environment prefix of every key (`VIDU_WORKER__AMQP__URL`).
pub const ENV_PREFIX: &str = "VIDU_WORKER";
/// The environment variable that carries the Novita API key.
pub const API_KEY_ENV: &str = "NOVITA_API_KEY";
/// The shipped defaults file, relative to the working directory.
pub const DEFAULT_FILE: &str = "config/default.toml";

/// Keys holding one of a few words.
const ENUM_KEYS: &[(&str, &[&str])] = &[
    ("log.format", &["json", "pretty"]),
    ("amqp.queue_type", &["quorum", "classic"]),
];

/// A configuration problem, rendered as one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {key}: {problem}")]
pub struct ConfigError {
    /// The dotted key (`polling.min_interval`), or the file that failed to parse.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// All settings of a worker process.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Broker connection and names.
    pub amqp: AmqpSettings,
    /// The Novita API.
    pub upstream: UpstreamSettings,
    /// Background tracking of upstream tasks.
    pub polling: PollingSettings,
    /// The operations endpoint.
    pub http: HttpSettings,
    /// Log output.
    pub log: LogSettings,
    /// Event envelope settings.
    pub events: EventSettings,
    /// Shutdown behaviour.
    pub shutdown: ShutdownSettings,
    /// Tracking-ticket signatures.
    pub tickets: TicketSettings,
}

/// `[tickets]`: the secret that signs tracking tickets, so that a message a
/// producer writes into an internal queue is never acted on.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TicketSettings {
    /// Signs every ticket; when unset, the key is derived from the API key
    /// (no new secret to manage). Never logged.
    pub secret: Option<SecretString>,
    /// Secrets (or, for a deployment that signs with its API key, API keys)
    /// still accepted when verifying tickets written before a rotation.
    /// Keep them for `polling.max_off_peak_task_age` (72 h) after it.
    pub previous_secrets: Vec<SecretString>,
    /// Accept tickets without a signature: only while upgrading from a
    /// version that did not sign them (they can be in flight for 72 h).
    /// Anyone who can write to the vhost can forge an unsigned ticket.
    pub accept_unsigned: bool,
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

/// The longest value each duration setting accepts (checked at start, so
/// that an absurd value cannot overflow a deadline later).
pub const DURATION_LIMITS: &[(&str, Duration)] = &[
    ("amqp.max_hold", Duration::from_secs(25 * 60)),
    ("upstream.timeout", Duration::from_secs(10 * 60)),
    ("upstream.connect_timeout", Duration::from_secs(5 * 60)),
    ("upstream.retry_initial", Duration::from_secs(10 * 60)),
    ("upstream.retry_max", Duration::from_secs(3600)),
    ("upstream.create_retry_budget", Duration::from_secs(25 * 60)),
    ("polling.min_interval", Duration::from_secs(3600)),
    ("polling.max_interval", Duration::from_secs(24 * 3600)),
    ("polling.max_task_age", Duration::from_secs(30 * 24 * 3600)),
    (
        "polling.max_off_peak_task_age",
        Duration::from_secs(30 * 24 * 3600),
    ),
    ("shutdown.grace_period", Duration::from_secs(3600)),
];

/// Queue types the worker can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://user:pass@host:port/vhost` (or `amqps://` for
    /// TLS). The vhost is the URL's path, percent-encoded (`%2f` is `/`).
    pub url: SecretString,
    /// User name, overriding the URL's.
    pub username: Option<String>,
    /// Password, overriding the URL's. Never logged.
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
    /// Deliveries after which a request or ticket that never completes is
    /// dead-lettered as poison.
    pub max_deliveries: u32,
    /// How long a request may wait at the gate (while the upstream refuses
    /// the balance) before it is handed back to the queue.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
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
            .field("max_deliveries", &self.max_deliveries)
            .field("max_hold", &self.max_hold)
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
            max_deliveries: 10,
            max_hold: Duration::from_secs(600),
        }
    }
}

impl AmqpSettings {
    /// The broker address to show in logs and errors: the URL with the
    /// effective user name and without any password.
    pub fn display_url(&self) -> String {
        match url::Url::parse(self.url.expose_secret()) {
            Ok(mut u) => {
                if let Some(user) = &self.username {
                    let _ = u.set_username(user);
                }
                if u.password().is_some() || self.password.is_some() || self.password_file.is_some()
                {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            }
            Err(_) => "<unparseable url>".into(),
        }
    }

    /// The parsed URL with `username`, `password` and `password_file`
    /// applied. Reads the password file, so a rotated Secret is picked up at
    /// the next connection. The result holds the password: never log it.
    pub fn connection_uri(&self) -> Result<lapin::uri::AMQPUri, ConfigError> {
        let mut uri: lapin::uri::AMQPUri = self
            .url
            .expose_secret()
            .parse()
            .map_err(|_| ConfigError::new("amqp.url", "is not a valid AMQP URL"))?;
        if let Some(user) = &self.username {
            uri.authority.userinfo.username.clone_from(user);
        }
        if let Some(password) = self.effective_password()? {
            uri.authority.userinfo.password = password.expose_secret().to_owned();
        }
        Ok(uri)
    }

    /// The password from `password` or `password_file`, if either is set.
    fn effective_password(&self) -> Result<Option<SecretString>, ConfigError> {
        if let Some(password) = &self.password {
            return Ok(Some(password.clone()));
        }
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "amqp.password_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::new(
                "amqp.password_file",
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Some(SecretString::from(trimmed.to_owned())))
    }

    /// The vhost named by the URL (`/` for `%2f`).
    pub fn vhost(&self) -> String {
        self.url
            .expose_secret()
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "?".into())
    }

    /// Whether the URL asks for TLS.
    pub fn uses_tls(&self) -> bool {
        self.url.expose_secret().starts_with("amqps://")
    }
}

/// `[amqp.tls]`: verification of the broker and the client's own identity,
/// for `amqps://` URLs. Files are PEM, read at every connection (so rotated
/// certificates are picked up when the worker reconnects).
#[derive(Debug, Clone, Default, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// Queue arguments the worker sets itself, and why they cannot be changed
/// through `amqp.queue_arguments`.
const RESERVED_QUEUE_ARGUMENTS: &[(&str, &str)] = &[
    ("x-queue-type", "set it with amqp.queue_type"),
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
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Base URL of the Novita API.
    pub base_url: String,
    /// The Novita API key (`NOVITA_API_KEY`). Never logged.
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
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.novita.ai".into(),
            api_key: None,
            timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            create_quota: None,
            max_requests_per_second: 50.0,
            max_concurrent_requests: 32,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            create_retry_budget: Duration::from_secs(120),
            ca_file: None,
        }
    }
}

/// `[polling]`
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line (machines).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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

impl Settings {
    /// Loads every layer, reading the process environment.
    pub fn load(extra_file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_with_env(Path::new(DEFAULT_FILE), extra_file, &env)
    }

    /// Loads every layer from the given defaults file (skipped when absent),
    /// extra file (must exist) and environment map.
    pub fn load_with_env(
        defaults_file: &Path,
        extra_file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from(defaults_file).required(false));
        if let Some(path) = extra_file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let prefixed: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("tickets.previous_secrets")
                .source(Some(prefixed.into_iter().collect())),
        );
        let config = builder.build().map_err(from_config_error)?;
        for (key, allowed) in ENUM_KEYS {
            if let Ok(text) = config.get_string(key) {
                if !allowed.contains(&text.as_str()) {
                    return Err(ConfigError::new(
                        *key,
                        format!("{text:?} is not one of {}", allowed.join(", ")),
                    ));
                }
            }
        }
        if let Ok(text) = config.get_string("upstream.create_quota") {
            if !text.trim().is_empty() {
                CreateQuota::parse(&text)
                    .map_err(|problem| ConfigError::new("upstream.create_quota", problem))?;
            }
        }
        for (key, _) in DURATION_LIMITS {
            if let Ok(text) = config.get_string(key) {
                if let Err(e) = humantime::parse_duration(&text) {
                    return Err(ConfigError::new(
                        *key,
                        format!("{text:?} is not a duration like 250ms, 5s, 10m or 24h ({e})"),
                    ));
                }
            }
        }
        let mut settings: Settings = config.try_deserialize().map_err(from_config_error)?;
        settings.normalize();
        if let Some(key) = env.get(API_KEY_ENV).filter(|k| !k.trim().is_empty()) {
            settings.upstream.api_key = Some(SecretString::from(key.trim().to_owned()));
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Treats empty strings (an environment variable set to "") as unset.
    fn normalize(&mut self) {
        fn path(p: &mut Option<PathBuf>) {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *p = None;
            }
        }
        let amqp = &mut self.amqp;
        if amqp.username.as_ref().is_some_and(String::is_empty) {
            amqp.username = None;
        }
        if amqp
            .password
            .as_ref()
            .is_some_and(|p| p.expose_secret().is_empty())
        {
            amqp.password = None;
        }
        path(&mut amqp.password_file);
        path(&mut amqp.tls.ca_file);
        path(&mut amqp.tls.cert_file);
        path(&mut amqp.tls.key_file);
        path(&mut self.upstream.ca_file);
    }

    /// Every duration setting with its value, by key.
    fn durations(&self) -> [(&'static str, Duration); 11] {
        [
            ("amqp.max_hold", self.amqp.max_hold),
            ("upstream.timeout", self.upstream.timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.retry_initial", self.upstream.retry_initial),
            ("upstream.retry_max", self.upstream.retry_max),
            (
                "upstream.create_retry_budget",
                self.upstream.create_retry_budget,
            ),
            ("polling.min_interval", self.polling.min_interval),
            ("polling.max_interval", self.polling.max_interval),
            ("polling.max_task_age", self.polling.max_task_age),
            (
                "polling.max_off_peak_task_age",
                self.polling.max_off_peak_task_age,
            ),
            ("shutdown.grace_period", self.shutdown.grace_period),
        ]
    }

    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in self.durations() {
            let limit = DURATION_LIMITS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, l)| *l)
                .unwrap_or(Duration::MAX);
            if value > limit {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "{} is longer than the limit of {}",
                        humantime::format_duration(value),
                        humantime::format_duration(limit)
                    ),
                ));
            }
        }
        if self
            .tickets
            .secret
            .as_ref()
            .is_some_and(|s| s.expose_secret().len() < 16)
        {
            return Err(ConfigError::new(
                "tickets.secret",
                "must be at least 16 characters (or unset, to derive the key from the API key)",
            ));
        }
        let url = self.amqp.url.expose_secret();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::new(
                "amqp.url",
                "must start with amqp:// or amqps://",
            ));
        }
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(ConfigError::new("amqp.url", "is not a valid AMQP URL"));
        }
        self.validate_broker_access()?;
        self.validate_queue_arguments()?;
        check_name("amqp.request_queue", &self.amqp.request_queue)?;
        check_name("amqp.events_exchange", &self.amqp.events_exchange)?;
        if self.amqp.prefetch == 0 {
            return Err(ConfigError::new("amqp.prefetch", "must be at least 1"));
        }
        if self.amqp.max_deliveries < 2 {
            return Err(ConfigError::new(
                "amqp.max_deliveries",
                "must be at least 2",
            ));
        }
        if self.polling.prefetch == 0 {
            return Err(ConfigError::new("polling.prefetch", "must be at least 1"));
        }
        match url::Url::parse(&self.upstream.base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(ConfigError::new(
                    "upstream.base_url",
                    format!("{:?} is not an http(s) URL", self.upstream.base_url),
                ))
            }
        }
        if let Some(key) = &self.upstream.api_key {
            if key
                .expose_secret()
                .chars()
                .any(|c| c.is_control() || c == ' ')
            {
                return Err(ConfigError::new(
                    "upstream.api_key",
                    "contains spaces or control characters",
                ));
            }
        }
        if self.upstream.max_concurrent_requests == 0 {
            return Err(ConfigError::new(
                "upstream.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        if !(self.upstream.max_requests_per_second >= 0.0
            && self.upstream.max_requests_per_second.is_finite())
        {
            return Err(ConfigError::new(
                "upstream.max_requests_per_second",
                "must be a number >= 0 (0 = unlimited)",
            ));
        }
        if let Some(path) = &self.upstream.ca_file {
            load_certificates("upstream.ca_file", path)?;
        }
        non_zero("upstream.timeout", self.upstream.timeout)?;
        non_zero("upstream.connect_timeout", self.upstream.connect_timeout)?;
        non_zero("upstream.retry_initial", self.upstream.retry_initial)?;
        if self.upstream.retry_max < self.upstream.retry_initial {
            return Err(ConfigError::new(
                "upstream.retry_max",
                "must not be shorter than upstream.retry_initial",
            ));
        }
        non_zero("polling.min_interval", self.polling.min_interval)?;
        if self.polling.max_interval < self.polling.min_interval {
            return Err(ConfigError::new(
                "polling.max_interval",
                "must not be shorter than polling.min_interval",
            ));
        }
        non_zero("polling.max_task_age", self.polling.max_task_age)?;
        non_zero(
            "polling.max_off_peak_task_age",
            self.polling.max_off_peak_task_age,
        )?;
        self.listen_addr()?;
        if self.events.source.trim().is_empty() {
            return Err(ConfigError::new("events.source", "must not be empty"));
        }
        Ok(())
    }

    /// Credentials and TLS files: consistent, present and readable, so a
    /// typo shows at start as a configuration error naming the key.
    fn validate_broker_access(&self) -> Result<(), ConfigError> {
        let amqp = &self.amqp;
        let tls = &amqp.tls;
        if !amqp.uses_tls() {
            let set = [
                ("amqp.tls.ca_file", &tls.ca_file),
                ("amqp.tls.cert_file", &tls.cert_file),
                ("amqp.tls.key_file", &tls.key_file),
            ]
            .into_iter()
            .find(|(_, v)| v.is_some());
            if let Some((key, _)) = set {
                return Err(ConfigError::new(
                    key,
                    "is set but amqp.url is not amqps:// (TLS settings apply only to amqps:// URLs)",
                ));
            }
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "amqp.tls.key_file",
                    "is required with amqp.tls.cert_file (a client certificate needs its key)",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "amqp.tls.cert_file",
                    "is required with amqp.tls.key_file",
                ))
            }
            (Some(cert), Some(key)) => {
                load_certificates("amqp.tls.cert_file", cert)?;
                check_private_key("amqp.tls.key_file", key, cert)?;
            }
            (None, None) => {}
        }
        if let Some(ca) = &tls.ca_file {
            load_certificates("amqp.tls.ca_file", ca)?;
        }
        if amqp.password.is_some() && amqp.password_file.is_some() {
            return Err(ConfigError::new(
                "amqp.password_file",
                "set either amqp.password or amqp.password_file, not both",
            ));
        }
        amqp.effective_password()?;
        Ok(())
    }

    /// Extra queue arguments: `x-` names, none the worker sets itself, none
    /// that could lose messages.
    fn validate_queue_arguments(&self) -> Result<(), ConfigError> {
        for (name, value) in &self.amqp.queue_arguments {
            let key = format!("amqp.queue_arguments.{name}");
            if !name.starts_with("x-") {
                return Err(ConfigError::new(
                    key,
                    "queue arguments start with x- (RabbitMQ ignores other names)",
                ));
            }
            if let Some((_, why)) = RESERVED_QUEUE_ARGUMENTS.iter().find(|(n, _)| n == name) {
                return Err(ConfigError::new(
                    key,
                    format!("is set by the worker and cannot be overridden: {why}"),
                ));
            }
            if matches!(name.as_str(), "x-max-length" | "x-max-length-bytes")
                && self.amqp.queue_type == QueueType::Classic
            {
                return Err(ConfigError::new(
                    key,
                    "a full classic queue silently drops its oldest messages (requests and tickets would be lost); use quorum queues, where a full queue refuses new messages instead",
                ));
            }
            if let QueueArgument::Float(f) = value {
                if !f.is_finite() {
                    return Err(ConfigError::new(key, "must be a finite number"));
                }
            }
        }
        Ok(())
    }

    /// The parsed operations listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.http.listen.parse().map_err(|_| {
            ConfigError::new(
                "http.listen",
                format!("{:?} is not an address like 0.0.0.0:9090", self.http.listen),
            )
        })
    }

    /// The API key, or an error naming the key when it is required.
    pub fn require_api_key(&self) -> Result<&SecretString, ConfigError> {
        self.upstream.api_key.as_ref().ok_or_else(|| {
            ConfigError::new(
                "upstream.api_key",
                format!("is required: set {API_KEY_ENV} or VIDU_WORKER__UPSTREAM__API_KEY"),
            )
        })
    }
}

/// Reads a file named by setting `key`; the error names the key.
pub(crate) fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
}

/// The certificates of a PEM file named by setting `key` (at least one).
pub(crate) fn load_certificates(
    key: &str,
    path: &Path,
) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let pem = read_file(key, path)?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(ConfigError::new(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        )),
        Err(e) => Err(ConfigError::new(
            key,
            format!("{} is not a PEM certificate file: {e}", path.display()),
        )),
    }
}

/// A PEM private key that goes with the certificate file.
fn check_private_key(key: &str, path: &Path, cert: &Path) -> Result<(), ConfigError> {
    let pem = read_file(key, path)?;
    if pem.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(ConfigError::new(
            key,
            format!(
                "{} is encrypted; give the key unencrypted (there is no passphrase setting)",
                path.display()
            ),
        ));
    }
    let mut both = read_file("amqp.tls.cert_file", cert)?;
    both.push(b'\n');
    both.extend_from_slice(&pem);
    reqwest::Identity::from_pem(&both).map(drop).map_err(|_| {
        ConfigError::new(
            key,
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                path.display()
            ),
        )
    })
}

fn non_zero(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(key, "must be longer than zero"));
    }
    Ok(())
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 200 {
        return Err(ConfigError::new(key, "must be 1 to 200 characters"));
    }
    if name.starts_with("amq.") {
        return Err(ConfigError::new(
            key,
            "names starting with amq. are reserved",
        ));
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::new(key, "must not contain spaces"));
    }
    Ok(())
}

/// Hides the password of a URL for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

fn from_config_error(err: config::ConfigError) -> ConfigError {
    use config::ConfigError as E;
    match err {
        E::Type {
            key,
            unexpected,
            expected,
            ..
        } => ConfigError::new(
            key.unwrap_or_else(|| "<unknown>".into()),
            format!("expected {expected}, found {unexpected}"),
        ),
        E::FileParse { uri, cause } => ConfigError::new(
            uri.unwrap_or_else(|| "<file>".into()),
            parse_problem(&cause.to_string()),
        ),
        E::NotFound(key) => ConfigError::new(key, "not found"),
        E::At { error, key, .. } => {
            let inner = from_config_error(*error);
            match key {
                Some(key) if inner.key == "<unknown>" || inner.key.is_empty() => {
                    ConfigError::new(key, inner.problem)
                }
                _ => inner,
            }
        }
        E::Message(msg) => message_error(&msg),
        other => ConfigError::new("<config>", other.to_string().replace('\n', " ")),
    }
}

/// A file's syntax error without the file's text: TOML errors quote the
/// offending line, which may hold a secret (`api_key = "sk-…`). Kept: where
/// (line and column) and what (the parser's last line, unless it quotes).
fn parse_problem(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let place = lines
        .first()
        .filter(|l| l.contains("line") && !l.contains('|'))
        .map_or("a syntax error", |l| *l);
    let what = lines
        .iter()
        .skip(1)
        .rev()
        .find(|l| !l.contains('|') && !l.contains('"') && !l.contains('\''))
        .copied();
    match what {
        Some(what) => format!("{place}: {what} (the line is not shown: it may hold a secret)"),
        None => format!("{place} (the line is not shown: it may hold a secret)"),
    }
}

/// serde messages look like `unknown field `x`, expected ...` or
/// `invalid value: ... for key `a.b``; pull the key out where we can.
fn message_error(msg: &str) -> ConfigError {
    let msg = msg.replace('\n', " ");
    if let Some(idx) = msg.find(" for key `") {
        let rest = &msg[idx + " for key `".len()..];
        if let Some(end) = rest.find('`') {
            return ConfigError::new(&rest[..end], msg[..idx].to_owned());
        }
    }
    ConfigError::new("<config>", msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_with_env(Path::new("does/not/exist.toml"), None, &env)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = load(&[]).expect("defaults load");
        assert_eq!(
            s.amqp.url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(s.amqp.request_queue, "vidu.requests");
        assert_eq!(s.amqp.events_exchange, "vidu.events");
        assert_eq!(s.upstream.base_url, "https://api.novita.ai");
        assert!(s.upstream.api_key.is_none());
        assert_eq!(s.polling.max_task_age, Duration::from_secs(7200));
        assert_eq!(
            s.polling.max_off_peak_task_age,
            Duration::from_secs(72 * 3600)
        );
        assert_eq!(s.http.listen, "0.0.0.0:9090");
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.events.source, "vidu-worker");
    }

    #[test]
    fn environment_overrides_with_double_underscores() {
        let s = load(&[
            ("VIDU_WORKER__AMQP__REQUEST_QUEUE", "t.req"),
            ("VIDU_WORKER__AMQP__PREFETCH", "7"),
            ("VIDU_WORKER__POLLING__MIN_INTERVAL", "250ms"),
            ("VIDU_WORKER__LOG__FORMAT", "pretty"),
            ("NOVITA_API_KEY", "sk-test"),
        ])
        .expect("loads");
        assert_eq!(s.amqp.request_queue, "t.req");
        assert_eq!(s.amqp.prefetch, 7);
        assert_eq!(s.polling.min_interval, Duration::from_millis(250));
        assert_eq!(s.log.format, LogFormat::Pretty);
        assert_eq!(
            s.upstream
                .api_key
                .as_ref()
                .map(|k| k.expose_secret().to_owned()),
            Some("sk-test".to_owned())
        );
    }

    #[test]
    fn novita_api_key_wins_over_the_prefixed_variable() {
        let s = load(&[
            ("VIDU_WORKER__UPSTREAM__API_KEY", "sk-prefixed"),
            ("NOVITA_API_KEY", "sk-plain"),
        ])
        .expect("loads");
        let key = s.upstream.api_key.expect("key set");
        assert_eq!(key.expose_secret(), "sk-plain");
        let s = load(&[("VIDU_WORKER__UPSTREAM__API_KEY", "sk-prefixed")]).expect("loads");
        let key = s.upstream.api_key.expect("key set");
        assert_eq!(key.expose_secret(), "sk-prefixed");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("VIDU_WORKER__AMQP__PREFETCH", "lots", "amqp.prefetch"),
            ("VIDU_WORKER__AMQP__PREFETCH", "0", "amqp.prefetch"),
            (
                "VIDU_WORKER__POLLING__MIN_INTERVAL",
                "soon",
                "polling.min_interval",
            ),
            (
                "VIDU_WORKER__POLLING__MAX_INTERVAL",
                "1ms",
                "polling.max_interval",
            ),
            ("VIDU_WORKER__AMQP__URL", "http://x", "amqp.url"),
            (
                "VIDU_WORKER__UPSTREAM__BASE_URL",
                "not a url",
                "upstream.base_url",
            ),
            ("VIDU_WORKER__HTTP__LISTEN", "nowhere", "http.listen"),
            ("VIDU_WORKER__LOG__FORMAT", "xml", "log.format"),
            ("VIDU_WORKER__AMQP__QUEUE_TYPE", "stream", "amqp.queue_type"),
        ];
        for (var, value, key) in cases {
            let err = load(&[(var, value)]).expect_err(var);
            assert_eq!(&err.key, key, "{var}={value}: {err}");
            let line = err.to_string();
            assert!(!line.contains('\n'), "one line: {line}");
        }
    }

    #[test]
    fn every_duration_setting_has_a_limit_and_is_checked() {
        let s = Settings::default();
        let keys: Vec<&str> = s.durations().iter().map(|(k, _)| *k).collect();
        let limited: Vec<&str> = DURATION_LIMITS.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, limited);
        for (key, limit) in DURATION_LIMITS {
            let var = format!(
                "VIDU_WORKER__{}",
                key.to_ascii_uppercase().replace('.', "__")
            );
            let too_long = format!("{}s", limit.as_secs() + 1);
            let err = load(&[(&var, &too_long)]).expect_err(key);
            assert_eq!(&err.key, key, "{err}");
            assert!(err.problem.contains("longer than the limit"), "{err}");
        }
        let err =
            load(&[("VIDU_WORKER__POLLING__MAX_TASK_AGE", "300000years")]).expect_err("absurd");
        assert_eq!(err.key, "polling.max_task_age");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = load(&[("VIDU_WORKER__POLLING__MIN_INTERVL", "1s")]).expect_err("typo");
        assert!(err.to_string().contains("min_intervl"), "{err}");
    }

    #[test]
    fn a_missing_extra_file_names_the_option() {
        let err = Settings::load_with_env(
            Path::new("nope.toml"),
            Some(Path::new("missing.toml")),
            &HashMap::new(),
        )
        .expect_err("missing file");
        assert_eq!(err.key, "--config");
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vidu-config-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    fn load_file(toml: &str) -> Result<Settings, ConfigError> {
        let path = temp_file("extra.toml", toml);
        let result = Settings::load_with_env(
            Path::new("does/not/exist.toml"),
            Some(&path),
            &HashMap::new(),
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
        result
    }

    #[test]
    fn broker_integration_defaults_keep_the_contract() {
        let s = load(&[]).expect("defaults load");
        assert!(s.amqp.declare_topology);
        assert!(s.amqp.username.is_none() && s.amqp.password.is_none());
        assert!(s.amqp.password_file.is_none());
        assert!(s.amqp.tls.ca_file.is_none() && s.amqp.tls.cert_file.is_none());
        assert!(s.amqp.queue_arguments.is_empty());
        assert!(s.upstream.ca_file.is_none());
        let uri = s.amqp.connection_uri().expect("uri");
        assert_eq!(uri.authority.userinfo.username, "guest");
        assert_eq!(uri.vhost, "/");
        // The shipped file says the same as the built-in defaults.
        let shipped = Settings::load_with_env(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")),
            None,
            &HashMap::new(),
        )
        .expect("config/default.toml loads");
        assert_eq!(format!("{shipped:?}"), format!("{s:?}"));
    }

    #[test]
    fn credentials_override_the_url_and_the_password_file_is_trimmed() {
        let file = temp_file("password", "  s3cret-from-file\n");
        let s = load(&[
            (
                "VIDU_WORKER__AMQP__URL",
                "amqp://url-user:url-pass@broker:5672/team%2Fvidu",
            ),
            ("VIDU_WORKER__AMQP__USERNAME", "vidu"),
            (
                "VIDU_WORKER__AMQP__PASSWORD_FILE",
                file.to_str().expect("utf-8"),
            ),
        ])
        .expect("loads");
        let uri = s.amqp.connection_uri().expect("uri");
        assert_eq!(uri.authority.userinfo.username, "vidu");
        assert_eq!(uri.authority.userinfo.password, "s3cret-from-file");
        assert_eq!(uri.vhost, "team/vidu");
        let shown = s.amqp.display_url();
        assert!(shown.contains("vidu:***@broker"), "{shown}");
        assert!(
            !shown.contains("url-pass") && !shown.contains("s3cret"),
            "{shown}"
        );
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("s3cret") && !dbg.contains("url-pass"),
            "{dbg}"
        );

        // A password without a file, and an empty variable that means "unset".
        let s = load(&[
            ("VIDU_WORKER__AMQP__PASSWORD", "direct"),
            ("VIDU_WORKER__AMQP__USERNAME", ""),
        ])
        .expect("loads");
        let uri = s.amqp.connection_uri().expect("uri");
        assert_eq!(uri.authority.userinfo.username, "guest");
        assert_eq!(uri.authority.userinfo.password, "direct");
        assert!(!format!("{s:?}").contains("direct"));

        let err = load(&[
            ("VIDU_WORKER__AMQP__PASSWORD", "direct"),
            (
                "VIDU_WORKER__AMQP__PASSWORD_FILE",
                file.to_str().expect("utf-8"),
            ),
        ])
        .expect_err("both");
        assert_eq!(err.key, "amqp.password_file");
        let err = load(&[("VIDU_WORKER__AMQP__PASSWORD_FILE", "/does/not/exist")])
            .expect_err("missing file");
        assert_eq!(err.key, "amqp.password_file");
        let empty = temp_file("empty", "\n");
        let err = load(&[(
            "VIDU_WORKER__AMQP__PASSWORD_FILE",
            empty.to_str().expect("utf-8"),
        )])
        .expect_err("empty file");
        assert_eq!(err.key, "amqp.password_file");
        assert!(err.problem.contains("empty"), "{err}");
        for f in [file, empty] {
            let _ = std::fs::remove_dir_all(f.parent().expect("dir"));
        }
    }

    #[test]
    fn tls_settings_are_checked_up_front() {
        let err = load(&[("VIDU_WORKER__AMQP__TLS__CA_FILE", "/etc/hostname")])
            .expect_err("TLS file with an amqp:// URL");
        assert_eq!(err.key, "amqp.tls.ca_file");
        assert!(err.problem.contains("amqps://"), "{err}");
        let tls = "amqps://guest:guest@broker:5671/%2f";
        let err = load(&[
            ("VIDU_WORKER__AMQP__URL", tls),
            ("VIDU_WORKER__AMQP__TLS__CERT_FILE", "/etc/hostname"),
        ])
        .expect_err("certificate without key");
        assert_eq!(err.key, "amqp.tls.key_file");
        let err = load(&[
            ("VIDU_WORKER__AMQP__URL", tls),
            ("VIDU_WORKER__AMQP__TLS__CA_FILE", "/does/not/exist.pem"),
        ])
        .expect_err("missing CA file");
        assert_eq!(err.key, "amqp.tls.ca_file");
        let not_pem = temp_file("ca.pem", "hello");
        let err = load(&[
            ("VIDU_WORKER__AMQP__URL", tls),
            (
                "VIDU_WORKER__AMQP__TLS__CA_FILE",
                not_pem.to_str().expect("utf-8"),
            ),
        ])
        .expect_err("not PEM");
        assert_eq!(err.key, "amqp.tls.ca_file");
        assert!(err.problem.contains("no PEM certificate"), "{err}");
        let err = load(&[(
            "VIDU_WORKER__UPSTREAM__CA_FILE",
            not_pem.to_str().expect("utf-8"),
        )])
        .expect_err("not PEM");
        assert_eq!(err.key, "upstream.ca_file");
        let _ = std::fs::remove_dir_all(not_pem.parent().expect("dir"));
        // An amqps:// URL alone is fine: the system roots verify the broker.
        load(&[("VIDU_WORKER__AMQP__URL", tls)]).expect("amqps without files");
    }

    #[test]
    fn queue_arguments_are_typed_and_guarded() {
        let s = load_file(
            "[amqp.queue_arguments]\n\"x-quorum-initial-group-size\" = 3\n\"x-queue-leader-locator\" = \"balanced\"\n\"x-single-active-consumer\" = false\n",
        )
        .expect("loads");
        let args = &s.amqp.queue_arguments;
        assert_eq!(args["x-quorum-initial-group-size"], QueueArgument::Int(3));
        assert_eq!(
            args["x-queue-leader-locator"],
            QueueArgument::Text("balanced".into())
        );
        assert_eq!(args["x-single-active-consumer"], QueueArgument::Bool(false));
        let s = load(&[("VIDU_WORKER__AMQP__QUEUE_ARGUMENTS__X-MAX-LENGTH", "1000")])
            .expect("from the environment");
        assert_eq!(
            s.amqp.queue_arguments["x-max-length"],
            QueueArgument::Int(1000)
        );

        for (toml, key) in [
            (
                "\"x-queue-type\" = \"classic\"",
                "amqp.queue_arguments.x-queue-type",
            ),
            (
                "\"x-message-ttl\" = 1000",
                "amqp.queue_arguments.x-message-ttl",
            ),
            ("\"x-expires\" = 1000", "amqp.queue_arguments.x-expires"),
            (
                "\"x-overflow\" = \"drop-head\"",
                "amqp.queue_arguments.x-overflow",
            ),
            ("max-length = 5", "amqp.queue_arguments.max-length"),
        ] {
            let err = load_file(&format!("[amqp.queue_arguments]\n{toml}\n")).expect_err(toml);
            assert_eq!(err.key, key, "{err}");
        }
        let err = load_file(
            "[amqp]\nqueue_type = \"classic\"\n[amqp.queue_arguments]\n\"x-max-length\" = 5\n",
        )
        .expect_err("length limit on classic queues");
        assert!(err.problem.contains("drops"), "{err}");
    }

    #[test]
    fn a_syntax_error_never_shows_the_line() {
        let err = load_file("[upstream]\napi_key = \"sk-LEAK-123\nbase_url = \"x\"\n")
            .expect_err("syntax error");
        let line = err.to_string();
        assert!(!line.contains("sk-LEAK"), "{line}");
        assert!(line.contains("line 2"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let s = load(&[
            ("NOVITA_API_KEY", "sk-very-secret"),
            (
                "VIDU_WORKER__AMQP__URL",
                "amqp://user:hunter2@host:5672/%2f",
            ),
        ])
        .expect("loads");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("sk-very-secret"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
