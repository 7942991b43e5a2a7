//! Retry policy: exponential backoff with jitter, honouring `Retry-After`.
//!
//! All retry timing of the worker lives here, so the crate behind it stays a
//! one-file choice. The delays come from `backon` (already a dependency of
//! lapin, and maintained, where the older `backoff` crate is flagged
//! unmaintained by RustSec). This module decides *when* to try again; whether
//! an error is worth retrying at all is the caller's [`Transient`] answer.

use std::{future::Future, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest `Retry-After` we honour; a larger value is clamped so that a
/// hostile or broken upstream cannot park a worker for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Exponential backoff between `initial` and `max`, doubling, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First delay.
    pub initial: Duration,
    /// Largest delay before jitter.
    pub max: Duration,
}

impl RetryPolicy {
    fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }

    /// The delay before retry number `attempt` (0-based), for retries that
    /// are scheduled durably rather than awaited in place.
    pub fn delay_for_attempt(&self, attempt: u32) -> Duration {
        let mut delays = self.builder().build();
        let nth = delays.nth(attempt.min(64) as usize).unwrap_or(self.max);
        // backon's jitter adds up to 100%; keep the result within `max`,
        // but never below the un-jittered floor of the first attempt.
        nth.min(self.max).max(self.initial)
    }
}

/// How an error wants to be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryHint {
    /// Not transient: retrying cannot help.
    Never,
    /// Transient; the server may have said how long to wait.
    After(Option<Duration>),
}

/// Errors that know whether they are transient.
pub trait Transient {
    /// Whether, and when, to retry.
    fn retry_hint(&self) -> RetryHint;
}

/// Why [`retry`] gave up.
#[derive(Debug)]
pub enum RetryError<E> {
    /// A non-transient error.
    Fatal(E),
    /// Transient errors until the budget ran out; the last one.
    Exhausted(E),
    /// The cancel token fired while waiting to retry; the last error.
    Cancelled(E),
}

/// Calls `op` until it succeeds, fails for good, the time budget is spent, or
/// `cancel` fires. The delay between calls is the larger of the backoff and
/// the error's `Retry-After`.
pub async fn retry<T, E, F, Fut>(
    policy: RetryPolicy,
    budget: Duration,
    cancel: &CancellationToken,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + budget;
    let mut delays = policy.builder().build();
    loop {
        let err = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let after = match err.retry_hint() {
            RetryHint::Never => return Err(RetryError::Fatal(err)),
            RetryHint::After(after) => after,
        };
        let backoff = delays.next().unwrap_or(policy.max);
        let wait = after.map_or(backoff, |a| a.min(MAX_RETRY_AFTER).max(backoff));
        if Instant::now() + wait > deadline {
            return Err(RetryError::Exhausted(err));
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(RetryError::Cancelled(err)),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, PartialEq)]
    struct E(RetryHint);
    impl Transient for E {
        fn retry_hint(&self) -> RetryHint {
            self.0
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(80),
    };

    #[test]
    fn attempt_delays_grow_and_stay_within_bounds() {
        for attempt in 0..20 {
            let d = POLICY.delay_for_attempt(attempt);
            assert!(d >= POLICY.initial && d <= POLICY.max, "{attempt}: {d:?}");
        }
        let late = POLICY.delay_for_attempt(10);
        assert!(late >= Duration::from_millis(80), "{late:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let out = retry(
            POLICY,
            Duration::from_secs(10),
            &CancellationToken::new(),
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(E(RetryHint::After(None)))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(out.ok(), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn fatal_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = retry(
            POLICY,
            Duration::from_secs(10),
            &CancellationToken::new(),
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(E(RetryHint::Never)) }
            },
        )
        .await;
        assert!(matches!(out, Err(RetryError::Fatal(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_the_budget_ends_it() {
        let start = Instant::now();
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = retry(
            POLICY,
            Duration::from_secs(10),
            &CancellationToken::new(),
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(E(RetryHint::After(Some(Duration::from_secs(3))))) }
            },
        )
        .await;
        assert!(matches!(out, Err(RetryError::Exhausted(_))));
        // Calls at 0, 3, 6, 9 s; the next would land past the 10 s budget.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(start.elapsed() >= Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_the_wait() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let out: Result<(), _> = retry(POLICY, Duration::from_secs(10), &cancel, || async {
            Err(E(RetryHint::After(None)))
        })
        .await;
        assert!(matches!(out, Err(RetryError::Cancelled(_))));
    }
}
