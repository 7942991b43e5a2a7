//! Settings: the layered configuration of every command.
//!
//! Layers, later wins: built-in defaults → `config/default.toml` (relative to
//! the working directory, optional) → `--config FILE` → environment
//! (`VIDU_WORKER__SECTION__KEY`, plus `NOVITA_API_KEY`). This module owns the
//! names, defaults and validation of every key, and turns any problem into a
//! [`ConfigError`] whose one-line message names the key. It never logs or
//! prints the API key: the key lives in a [`SecretString`] whose `Debug`
//! output is redacted.

use std::{collections::HashMap, fmt, net::SocketAddr, path::Path, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The environment prefix of every key (`VIDU_WORKER__AMQP__URL`).
pub const ENV_PREFIX: &str = "VIDU_WORKER";
/// The environment variable that carries the Novita API key.
pub const API_KEY_ENV: &str = "NOVITA_API_KEY";
/// The shipped defaults file, relative to the working directory.
pub const DEFAULT_FILE: &str = "config/default.toml";

/// Keys holding durations, checked up front so an error names the key.
const DURATION_KEYS: &[&str] = &[
    "amqp.max_hold",
    "upstream.timeout",
    "upstream.connect_timeout",
    "upstream.retry_initial",
    "upstream.retry_max",
    "upstream.create_retry_budget",
    "polling.min_interval",
    "polling.max_interval",
    "polling.max_task_age",
    "polling.max_off_peak_task_age",
    "shutdown.grace_period",
];

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
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
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
}

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
    /// Broker URL, `amqp://user:pass@host:port/vhost`.
    pub url: SecretString,
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
    /// How long a handler may keep a request while the upstream refuses the
    /// API key before handing it back to the queue.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &redact_url(self.url.expose_secret()))
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
            request_queue: "vidu.requests".into(),
            events_exchange: "vidu.events".into(),
            prefetch: 32,
            queue_type: QueueType::Quorum,
            max_deliveries: 10,
            max_hold: Duration::from_secs(600),
        }
    }
}

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
    /// Ceiling on API calls per second from one worker (create and poll
    /// together); 0 means no limit.
    pub max_requests_per_second: f64,
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
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.novita.ai".into(),
            api_key: None,
            timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            max_requests_per_second: 10.0,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            create_retry_budget: Duration::from_secs(120),
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
            prefetch: 256,
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
        for key in DURATION_KEYS {
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
        if let Some(key) = env.get(API_KEY_ENV).filter(|k| !k.trim().is_empty()) {
            settings.upstream.api_key = Some(SecretString::from(key.trim().to_owned()));
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if !(self.upstream.max_requests_per_second >= 0.0
            && self.upstream.max_requests_per_second.is_finite())
        {
            return Err(ConfigError::new(
                "upstream.max_requests_per_second",
                "must be a number >= 0 (0 = unlimited)",
            ));
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
            cause.to_string().replace('\n', " "),
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
