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
//! typo is a configuration error naming the key (the PEM checks themselves
//! are [`crate::tls`]'s).
//!
//! The parts: [`schema`] (sections, keys, defaults and limits), this module
//! (layering and validation), `uri` (the broker URL the settings describe)
//! and `env` ([`env_vars`], the environment layer in reverse).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::tls;

mod env;
pub mod schema;
mod uri;

pub use env::env_vars;
pub use schema::{
    AcceptUnsigned, AmqpSettings, AmqpTlsSettings, CreateQuota, DurationLimit, EventSettings,
    HttpSettings, Lanes, LogFormat, LogSettings, PollingSettings, QueueArgument, QueueType,
    ShutdownSettings, StorageSettings, TicketSettings, UpstreamSettings, DEFAULT_LANE,
    DEFAULT_REPLY_TO_ALLOWED, DURATION_LIMITS, MANAGED_QUEUE_ARGUMENTS, MIB,
};
pub use uri::{redact_url, split_urls, NodeUri, MAX_NODES};

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

impl From<tls::FileError> for ConfigError {
    fn from(e: tls::FileError) -> Self {
        Self::new(e.key, e.problem)
    }
}

/// All settings of a worker process.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
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
    /// Where every paid video is copied.
    pub storage: StorageSettings,
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
                .with_list_parse_key("amqp.reply_to_allowed")
                .with_list_parse_key("upstream.models")
                .source(Some(prefixed.into_iter().collect())),
        );
        let config = builder.build().map_err(from_config_error)?;
        if let Ok(models) = config.get_array("upstream.models") {
            for value in models {
                let name = value.into_string().unwrap_or_default();
                if crate::model::Model::parse(name.trim()).is_none() {
                    return Err(ConfigError::new(
                        "upstream.models",
                        format!(
                            "{name:?} is not a Vidu Q3 model; the models are {}",
                            crate::model::Model::names()
                        ),
                    ));
                }
            }
        }
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
        if let Ok(text) = config.get_string("tickets.accept_unsigned") {
            AcceptUnsigned::parse(&text)
                .map_err(|problem| ConfigError::new("tickets.accept_unsigned", problem))?;
        }
        if let Ok(text) = config.get_string("upstream.create_quota") {
            if !text.trim().is_empty() {
                CreateQuota::parse(&text)
                    .map_err(|problem| ConfigError::new("upstream.create_quota", problem))?;
            }
        }
        for DurationLimit { key, .. } in DURATION_LIMITS {
            if let Ok(text) = config.get_string(key) {
                if let Err(e) = humantime::parse_duration(&text) {
                    return Err(ConfigError::new(
                        *key,
                        format!("{text:?} is not a duration like 250ms, 5s, 10m or 24h ({e})"),
                    ));
                }
            }
        }
        // Defaults are serde's: a key is in `config` only if a layer set it.
        let url_configured = config.get::<config::Value>("amqp.url").is_ok();
        let mut settings: Settings = config.try_deserialize().map_err(from_config_error)?;
        settings.amqp.url_configured = url_configured;
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
        path(&mut self.storage.secret_access_key_file);
        let storage = &mut self.storage;
        for value in [
            &mut storage.bucket,
            &mut storage.endpoint,
            &mut storage.access_key_id,
        ] {
            if value.as_ref().is_some_and(|v| v.trim().is_empty()) {
                *value = None;
            }
        }
    }

    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstream.models.is_empty() {
            return Err(ConfigError::new(
                "upstream.models",
                format!(
                    "names no model; leave it out for all six ({})",
                    crate::model::Model::names()
                ),
            ));
        }
        for DurationLimit { key, limit, value } in DURATION_LIMITS {
            let (limit, value) = (*limit, value(self));
            if value > limit {
                return Err(ConfigError::new(
                    *key,
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
        self.amqp.validate_nodes()?;
        self.amqp
            .lanes
            .validate()
            .map_err(|problem| ConfigError::new("amqp.lanes", problem))?;
        self.storage.validate()?;
        self.validate_quorum_group_size()?;
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
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if u.scheme() == "http" && !is_loopback(&u) && !self.upstream.allow_plain_http {
                    return Err(ConfigError::new(
                        "upstream.base_url",
                        format!(
                            "http:// to {} would send the API key across the network in clear text; use https://, or set upstream.allow_plain_http = true for a proxy on a network you trust",
                            u.host_str().unwrap_or("?")
                        ),
                    ));
                }
            }
            _ => {
                return Err(ConfigError::new(
                    "upstream.base_url",
                    format!("{:?} is not an http(s) URL", self.upstream.base_url),
                ))
            }
        }
        for pattern in &self.amqp.reply_to_allowed {
            if pattern.is_empty()
                || pattern.len() > 255
                || pattern.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(ConfigError::new(
                    "amqp.reply_to_allowed",
                    format!("{pattern:?} is not a queue name pattern (1 to 255 characters, no spaces; * matches any run of characters)"),
                ));
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
            tls::load_certificates("upstream.ca_file", path)?;
        }
        non_zero("upstream.timeout", self.upstream.timeout)?;
        non_zero("upstream.connect_timeout", self.upstream.connect_timeout)?;
        non_zero("upstream.retry_initial", self.upstream.retry_initial)?;
        if self.upstream.quota_window < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "upstream.quota_window",
                "must be at least 1s",
            ));
        }
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
                tls::load_certificates("amqp.tls.cert_file", cert)?;
                tls::check_private_key("amqp.tls.key_file", key, "amqp.tls.cert_file", cert)?;
            }
            (None, None) => {}
        }
        if let Some(ca) = &tls.ca_file {
            tls::load_certificates("amqp.tls.ca_file", ca)?;
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

    /// `amqp.quorum_initial_group_size`: replicas of a quorum queue, so
    /// only with quorum queues, and at least one.
    fn validate_quorum_group_size(&self) -> Result<(), ConfigError> {
        let Some(size) = self.amqp.quorum_initial_group_size else {
            return Ok(());
        };
        if size == 0 {
            return Err(ConfigError::new(
                "amqp.quorum_initial_group_size",
                "must be at least 1 (or unset, for the broker's default: every cluster node)",
            ));
        }
        if self.amqp.queue_type == QueueType::Classic {
            return Err(ConfigError::new(
                "amqp.quorum_initial_group_size",
                "applies to quorum queues only, and amqp.queue_type is classic",
            ));
        }
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
            if let Some((_, why)) = MANAGED_QUEUE_ARGUMENTS.iter().find(|(n, _)| n == name) {
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

/// Whether a URL's host is this machine (a name that always resolves
/// here, or a loopback address): traffic to it never crosses a network.
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
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
    use std::collections::BTreeSet;

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
            (
                "VIDU_WORKER__AMQP__URL",
                "amqp://h1:5672/%2f,amqps://h2:5671/%2f",
                "amqp.url",
            ),
            (
                "VIDU_WORKER__AMQP__URL",
                "amqp://h1:5672/%2f,amqp://h2:5672/other",
                "amqp.url",
            ),
            ("VIDU_WORKER__AMQP__URL", "amqp://h1:5672/%2f,", "amqp.url"),
            (
                "VIDU_WORKER__AMQP__URL",
                "amqp://h1:5672/%2f,amqp://h2:notaport/%2f",
                "amqp.url",
            ),
            (
                "VIDU_WORKER__AMQP__QUORUM_INITIAL_GROUP_SIZE",
                "0",
                "amqp.quorum_initial_group_size",
            ),
            (
                "VIDU_WORKER__AMQP__QUORUM_INITIAL_GROUP_SIZE",
                "three",
                "amqp.quorum_initial_group_size",
            ),
        ];
        for (var, value, key) in cases {
            let err = load(&[(var, value)]).expect_err(var);
            assert_eq!(&err.key, key, "{var}={value}: {err}");
            let line = err.to_string();
            assert!(!line.contains('\n'), "one line: {line}");
        }
    }

    #[test]
    fn the_nodes_of_a_cluster_are_a_list() {
        let from_env = load(&[(
            "VIDU_WORKER__AMQP__URL",
            "amqp://u:pw1@10.0.0.1:5672/%2f, amqp://u:pw1@10.0.0.2:5673/%2f",
        )])
        .expect("a comma-separated list");
        let from_toml = load_file(
            "[amqp]\nurl = [\"amqp://u:pw1@10.0.0.1:5672/%2f\", \"amqp://u:pw1@10.0.0.2:5673/%2f\"]\n",
        )
        .expect("a TOML list");
        for s in [from_env, from_toml] {
            let nodes = s.amqp.node_uris().expect("node URIs");
            let names: Vec<_> = nodes.iter().map(|n| n.name.as_str()).collect();
            assert_eq!(names, ["10.0.0.1:5672", "10.0.0.2:5673"]);
            assert!(nodes.iter().all(|n| n.uri.vhost == "/"));
            assert_eq!(s.amqp.node_count(), 2);
            let shown = s.amqp.display_url();
            assert!(!shown.contains("pw1"), "{shown}");
            assert!(!format!("{:?}", s.amqp).contains("pw1"));
            assert_eq!(s.amqp.display_node(1), "amqp://u:***@10.0.0.2:5673/%2f");
            assert_eq!(s.amqp.display_node(2), "");
        }
        let s = load(&[
            (
                "VIDU_WORKER__AMQP__URL",
                "amqp://a:b@h1:5672/%2f,amqp://c:d@h2:5672/%2f",
            ),
            ("VIDU_WORKER__AMQP__USERNAME", "vidu"),
            ("VIDU_WORKER__AMQP__PASSWORD", "override-pw"),
        ])
        .expect("credentials apply to every node");
        for node in s.amqp.node_uris().expect("node URIs") {
            assert_eq!(node.uri.authority.userinfo.username, "vidu");
            assert_eq!(node.uri.authority.userinfo.password, "override-pw");
        }
    }

    #[test]
    fn quorum_group_size_is_for_quorum_queues() {
        let s = load(&[("VIDU_WORKER__AMQP__QUORUM_INITIAL_GROUP_SIZE", "3")]).expect("loads");
        assert_eq!(s.amqp.quorum_initial_group_size, Some(3));
        let err = load(&[
            ("VIDU_WORKER__AMQP__QUORUM_INITIAL_GROUP_SIZE", "3"),
            ("VIDU_WORKER__AMQP__QUEUE_TYPE", "classic"),
        ])
        .expect_err("classic queues have no replicas");
        assert_eq!(err.key, "amqp.quorum_initial_group_size");
    }

    /// The variable of a dotted key (`polling.min_interval`).
    fn var_of(key: &str) -> String {
        format!(
            "{ENV_PREFIX}__{}",
            key.to_ascii_uppercase().replace('.', "__")
        )
    }

    /// The dotted key of a variable.
    fn key_of(var: &str) -> String {
        var.trim_start_matches(ENV_PREFIX)
            .trim_start_matches("__")
            .to_ascii_lowercase()
            .replace("__", ".")
    }

    #[test]
    fn every_duration_setting_has_a_limit_and_is_checked() {
        // The schema's duration settings, found in its serialized form
        // (humantime text, which no other default reads as), are exactly
        // the keys of the table.
        let durations: BTreeSet<String> = env_vars(&Settings::default())
            .expect("defaults serialize")
            .into_iter()
            .filter(|(_, text)| humantime::parse_duration(text).is_ok())
            .map(|(var, _)| key_of(&var))
            .collect();
        let limited: BTreeSet<String> = DURATION_LIMITS.iter().map(|d| d.key.to_owned()).collect();
        let unlimited: Vec<&String> = durations.difference(&limited).collect();
        assert!(
            unlimited.is_empty(),
            "duration settings missing from DURATION_LIMITS: {unlimited:?}"
        );
        assert_eq!(durations, limited);
        assert_eq!(limited.len(), DURATION_LIMITS.len(), "no key twice");
        for (i, d) in (1000u64..).zip(DURATION_LIMITS) {
            let var = var_of(d.key);
            // Each entry reads the field its key names.
            let s = load(&[(&var, &format!("{i}ms"))]).expect(d.key);
            assert_eq!((d.value)(&s), Duration::from_millis(i), "{}", d.key);
            let too_long = format!("{}s", d.limit.as_secs() + 1);
            let err = load(&[(&var, &too_long)]).expect_err(d.key);
            assert_eq!(err.key, d.key, "{err}");
            assert!(err.problem.contains("longer than the limit"), "{err}");
        }
        let err =
            load(&[("VIDU_WORKER__POLLING__MAX_TASK_AGE", "300000years")]).expect_err("absurd");
        assert_eq!(err.key, "polling.max_task_age");
    }

    /// Settings with every key changed from its default, and the PEM files
    /// they name (in a directory to remove).
    fn non_default_settings() -> (Settings, PathBuf) {
        let pem = rcgen::generate_simple_self_signed(vec!["broker.example".to_owned()])
            .expect("certificate");
        let cert = temp_file("cert.pem", &pem.cert.pem());
        let dir = cert.parent().expect("dir").to_owned();
        let key = dir.join("key.pem");
        std::fs::write(&key, pem.key_pair.serialize_pem()).expect("write key");
        let mut s = Settings::default();
        let amqp = &mut s.amqp;
        amqp.url = "amqps://url-user:url-pass@broker.example:5671/team%2Fvidu".into();
        amqp.username = Some("vidu".into());
        amqp.password = Some("hunter2-password".into());
        amqp.tls = AmqpTlsSettings {
            ca_file: Some(cert.clone()),
            cert_file: Some(cert.clone()),
            key_file: Some(key),
        };
        amqp.declare_topology = false;
        amqp.queue_arguments = [
            (
                "x-queue-leader-locator",
                QueueArgument::Text("balanced".into()),
            ),
            ("x-single-active-consumer", QueueArgument::Bool(true)),
            ("x-max-in-memory-length", QueueArgument::Int(3)),
            ("x-vidu-weight", QueueArgument::Float(0.5)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        amqp.request_queue = "team.requests".into();
        amqp.events_exchange = "team.events".into();
        amqp.prefetch = 7;
        amqp.queue_type = QueueType::Classic;
        amqp.max_deliveries = 4;
        amqp.max_hold = Duration::from_secs(90);
        amqp.reply_to_allowed = vec!["team.*.replies".into(), "audit.inbox".into()];
        let up = &mut s.upstream;
        up.base_url = "http://127.0.0.1:8080/".into();
        up.api_key = Some("sk-round-trip".into());
        up.timeout = Duration::from_secs(7);
        up.connect_timeout = Duration::from_millis(2500);
        up.create_quota = CreateQuota::parse("30/90s").ok();
        up.quota_window = Duration::from_secs(90);
        up.max_requests_per_second = 12.5;
        up.max_concurrent_requests = 5;
        up.retry_initial = Duration::from_millis(250);
        up.retry_max = Duration::from_secs(8);
        up.create_retry_budget = Duration::from_secs(300);
        up.models = vec![crate::model::Model::TurboT2v, crate::model::Model::ProF2v];
        up.ca_file = Some(cert);
        up.allow_plain_http = true;
        s.polling = PollingSettings {
            min_interval: Duration::from_millis(300),
            max_interval: Duration::from_secs(10),
            max_task_age: Duration::from_secs(3 * 3600),
            max_off_peak_task_age: Duration::from_secs(48 * 3600),
            prefetch: 9,
        };
        s.http.listen = "127.0.0.1:0".into();
        s.log.format = LogFormat::Pretty;
        s.events.source = "round-trip".into();
        s.shutdown.grace_period = Duration::from_secs(40);
        s.tickets = TicketSettings {
            secret: Some("a-ticket-secret-of-32-characters".into()),
            previous_secrets: vec!["old-secret-one".into(), "old-secret-two".into()],
            accept_unsigned: AcceptUnsigned::Until(
                chrono::DateTime::parse_from_rfc3339("2026-12-31T00:00:00Z")
                    .expect("instant")
                    .with_timezone(&chrono::Utc),
            ),
        };
        s.amqp.lanes = Lanes::parse("interactive=8,bulk=1").expect("lanes");
        let secret = dir.join("s3-secret");
        std::fs::write(&secret, "s3-secret-value").expect("write the storage secret");
        s.storage = StorageSettings {
            bucket: Some("team-videos".into()),
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: "eu-west-1".into(),
            path_style: true,
            prefix: "vidu/".into(),
            access_key_id: Some("AKIAROUNDTRIP".into()),
            secret_access_key_file: Some(secret),
            presign: Some(Duration::from_secs(3600)),
            max_video_bytes: 1 << 30,
            allow_private_sources: true,
            max_concurrent_copies: 3,
            part_size: 6 * MIB,
            connect_timeout: Duration::from_secs(7),
            copy_timeout: Duration::from_secs(9 * 60),
            request_timeout: Duration::from_secs(45),
        };
        (s, dir)
    }

    #[test]
    fn env_vars_round_trip_through_the_loader() {
        let (s, dir) = non_default_settings();
        let vars = env_vars(&s).expect("serializes");
        let by_var: HashMap<String, String> = vars.iter().cloned().collect();
        assert_eq!(by_var.len(), vars.len(), "one variable per key");
        for (var, default) in env_vars(&Settings::default()).expect("defaults") {
            assert_ne!(
                by_var.get(&var),
                Some(&default),
                "{var} keeps its default: the test would not show it round-trips"
            );
        }
        assert_eq!(
            by_var["VIDU_WORKER__UPSTREAM__API_KEY"], "sk-round-trip",
            "secrets are exposed"
        );
        let loaded = Settings::load_with_env(Path::new("does/not/exist.toml"), None, &by_var)
            .expect("loads its own variables");
        assert_eq!(env_vars(&loaded).expect("serializes"), vars);
        assert_eq!(format!("{loaded:?}"), format!("{s:?}"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn serialized_settings_redact_secrets_outside_env_vars() {
        let (s, dir) = non_default_settings();
        let text = serde_json::to_string(&s).expect("serializes");
        for secret in [
            "url-pass",
            "hunter2",
            "sk-round-trip",
            "ticket-secret",
            "old-secret",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("url-user:***@broker.example"), "{text}");
        assert!(env_vars(&s)
            .expect("serializes")
            .iter()
            .any(|(_, v)| v.contains("hunter2")));
        // Exposing ends with env_vars.
        assert!(!serde_json::to_string(&s)
            .expect("serializes")
            .contains("hunter2"));
        let _ = std::fs::remove_dir_all(dir);
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
    fn an_amqp_url_set_by_any_layer_counts_as_configured_even_at_the_default() {
        let default = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert!(!load(&[]).expect("defaults").amqp.url_configured);
        let shipped = Settings::load_with_env(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml")),
            None,
            &HashMap::new(),
        )
        .expect("config/default.toml loads");
        assert!(
            !shipped.amqp.url_configured,
            "the shipped file leaves amqp.url to the built-in default"
        );
        let from_env = load(&[("VIDU_WORKER__AMQP__URL", default)]).expect("env");
        assert!(from_env.amqp.url_configured);
        let from_file = load_file(&format!("[amqp]\nurl = \"{default}\"\n")).expect("file");
        assert!(from_file.amqp.url_configured);
        // Another key of [amqp] is not the URL.
        let other = load(&[("VIDU_WORKER__AMQP__PREFETCH", "7")]).expect("env");
        assert!(!other.amqp.url_configured);
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
            "[amqp.queue_arguments]\n\"x-max-in-memory-length\" = 3\n\"x-queue-leader-locator\" = \"balanced\"\n\"x-single-active-consumer\" = false\n",
        )
        .expect("loads");
        let args = &s.amqp.queue_arguments;
        assert_eq!(args["x-max-in-memory-length"], QueueArgument::Int(3));
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
                "\"x-quorum-initial-group-size\" = 3",
                "amqp.queue_arguments.x-quorum-initial-group-size",
            ),
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

    #[test]
    fn the_model_allow_list_names_only_q3_models() {
        let load = |value: &str| {
            let env: HashMap<String, String> =
                [("VIDU_WORKER__UPSTREAM__MODELS".to_owned(), value.to_owned())].into();
            Settings::load_with_env(Path::new("/nonexistent"), None, &env)
        };
        let s = load("vidu-q3-turbo-t2v,vidu-q3-pro-f2v").expect("loads");
        assert_eq!(
            s.upstream.models,
            [crate::model::Model::TurboT2v, crate::model::Model::ProF2v]
        );
        let e = load("vidu-q3-pro-i2v,vidu-q2").expect_err("unknown model");
        assert_eq!(e.key, "upstream.models");
        assert!(
            e.to_string().contains("\"vidu-q2\" is not a Vidu Q3 model"),
            "{e}"
        );
        assert_eq!(
            Settings::default().upstream.models,
            crate::model::Model::ALL
        );
        let mut none = Settings::default();
        none.upstream.models.clear();
        let e = none.validate().expect_err("empty");
        assert_eq!(e.key, "upstream.models");
    }
}
