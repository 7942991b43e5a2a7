//! How a simulator is set up: its static [`SimulatorConfig`] (key, task
//! timing, `eta` reporting, video URL lifetime, starting quota), the
//! [`EtaMode`] it reports with, the [`AuthMode`] that decides how it
//! treats credentials, and the [`VideoPlan`] its videos are served by (both
//! switchable while it runs).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::quota::AccountQuota;

/// Static configuration of a [`Simulator`](crate::simulator::Simulator).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SimulatorConfig {
    /// Bearer key the simulator accepts; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    /// More keys of the same account, accepted besides `api_key` (Novita
    /// keeps several keys of one account valid at once during a rotation;
    /// tasks and the create quota belong to the account, not the key).
    pub other_keys: Vec<String>,
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
    /// [`Simulator::set_quota`](crate::simulator::Simulator::set_quota).
    pub quota: Option<AccountQuota>,
    /// How long an accepted create takes to answer (default 0): the task
    /// exists from the moment the call arrives, like a slow upstream's.
    #[serde(with = "humantime_serde")]
    pub create_latency: Duration,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            other_keys: Vec::new(),
            generation_time: Duration::from_secs(3),
            eta: EtaMode::Honest,
            video_url_ttl: 3600,
            quota: None,
            create_latency: Duration::ZERO,
        }
    }
}

impl fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("other_keys", &self.other_keys.len())
            .field("generation_time", &self.generation_time)
            .field("eta", &self.eta)
            .field("video_url_ttl", &self.video_url_ttl)
            .field("quota", &self.quota)
            .field("create_latency", &self.create_latency)
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn config_serde_forms() {
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
    }
}

/// Prefix of the video URLs handed out before the simulator serves on an
/// address: `<prefix><task_id>.mp4` (not served).
pub const VIDEO_URL_PREFIX: &str = "https://sim.novita.local/videos/";

/// How the simulator's videos are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoPlan {
    /// Size of every video in bytes (default 256 KiB).
    pub bytes: u64,
    /// Bytes per second at most (`None`: as fast as it goes).
    pub bytes_per_second: Option<u64>,
    /// Every video URL answers 503.
    pub down: bool,
    /// Every video URL answers 403, as if expired.
    pub expired: bool,
    /// Announce this many bytes more (or, negative, fewer) than are sent.
    pub length_error: i64,
    /// Serve `text/html` error pages instead of videos (with 200).
    pub not_a_video: bool,
}

impl Default for VideoPlan {
    fn default() -> Self {
        Self {
            bytes: 256 * 1024,
            bytes_per_second: None,
            down: false,
            expired: false,
            length_error: 0,
            not_a_video: false,
        }
    }
}

/// Unix seconds now.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
