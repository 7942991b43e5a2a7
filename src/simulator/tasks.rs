//! The task model: what the simulator remembers of each created task, and
//! how its state follows from the clock alone (QUEUED for the first tenth of
//! its generation time, PROCESSING with a linear `progress_percent` and an
//! `eta` of the whole seconds left, then done), plus the public
//! [`TaskView`] of a task.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

use super::directives::Hostile;

/// The simulator's own view of a task (`GET /sim/tasks/{task_id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// Task id (UUID v4).
    pub task_id: String,
    /// The model whose create endpoint made the task.
    #[serde(default)]
    pub model: String,
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

/// A created task, as the simulator keeps it: what a poll needs, the body
/// it was created with, and how often it was polled.
pub(super) struct TaskRecord {
    pub(super) spec: TaskSnapshot,
    /// Canonical (sorted keys, compact) JSON of the request body.
    pub(super) body: Box<str>,
    pub(super) polls: u64,
}

impl TaskRecord {
    pub(super) fn view(&self, id: &Uuid, now: Instant) -> TaskView {
        let elapsed = now.saturating_duration_since(self.spec.created);
        let p = progress(self.spec.generation, elapsed);
        let status = match (p.phase, &self.spec.fail) {
            (Phase::Queued, _) => "TASK_STATUS_QUEUED",
            (Phase::Processing, _) => "TASK_STATUS_PROCESSING",
            (Phase::Done, Some(_)) => "TASK_STATUS_FAILED",
            (Phase::Done, None) => "TASK_STATUS_SUCCEED",
        };
        let done_at = (p.phase == Phase::Done).then(|| {
            humantime::format_rfc3339_millis(self.spec.created_wall + self.spec.generation)
                .to_string()
        });
        TaskView {
            task_id: id.to_string(),
            model: self.spec.model.to_owned(),
            status: status.to_owned(),
            created_at: humantime::format_rfc3339_millis(self.spec.created_wall).to_string(),
            done_at,
            generation_time: self.spec.generation,
            request: serde_json::from_str(&self.body).unwrap_or(Value::Null),
            polls: self.polls,
        }
    }
}

/// What a poll needs from a task, copied out under the lock.
#[derive(Clone)]
pub(super) struct TaskSnapshot {
    pub(super) model: &'static str,
    pub(super) created: Instant,
    pub(super) created_wall: SystemTime,
    pub(super) generation: Duration,
    pub(super) seed: u64,
    pub(super) fail: Option<Box<str>>,
    pub(super) fail500: bool,
    pub(super) noeta: bool,
    pub(super) odd: bool,
    pub(super) hostile: Hostile,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    Queued,
    Processing,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Progress {
    pub(super) phase: Phase,
    pub(super) percent: u64,
    pub(super) eta_secs: u64,
    /// Length of the QUEUED phase.
    pub(super) queued: Duration,
}

/// Task progress `elapsed` after creation: QUEUED for the first 10% of
/// `generation`, PROCESSING (0..=99%, linear) until `generation`, then done.
pub(super) fn progress(generation: Duration, elapsed: Duration) -> Progress {
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

/// Whole seconds in `d`, rounded up.
pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
