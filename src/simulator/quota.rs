//! The account's create quota: the public [`AccountQuota`] (so many creates
//! per sliding window, per account) and the per-account log of accepted creates that
//! decides whether the next create is admitted or how long it must wait.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// An account's create quota, as Novita counts it per account (all the
/// simulator's configured keys are one account; accepting any key, each
/// key is an account of its own): at most
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

/// The accepted creates of one key in the quota's sliding window.
#[derive(Default)]
pub(super) struct QuotaLog {
    accepted: VecDeque<Instant>,
}

impl QuotaLog {
    /// Admits a create at `now` (`None`), or says how long until one
    /// would be admitted.
    pub(super) fn admit(&mut self, now: Instant, quota: AccountQuota) -> Option<Duration> {
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

#[cfg(test)]
mod tests {
    use axum::http::header;

    use super::*;
    use crate::simulator::test_support::*;
    use crate::simulator::{Simulator, SimulatorConfig, CREATE_PATH};

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
}
