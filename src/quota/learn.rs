//! Learning the account's create quota from the upstream's 429s, as plain
//! decisions.
//!
//! Novita limits creates per account to N in any sliding window (a
//! minute), and says neither N nor, reliably, when to retry. So the
//! quantity to learn is N. The evidence is a *full window*: while a window
//! is full every create is refused, so [`FULL_ROW`] creates refused in a
//! row, with no create of the fleet accepted after any of them (refused
//! together, or again after the pauses they caused), show one. Its size is
//! the number of creates the fleet had accepted within the window when the
//! first of those refusals came back: that is N, not a rate to halve. A
//! lone 429, or two, with or without `Retry-After`, is only a pause: noise,
//! a proxy, or another process on the account say nothing about N, and
//! neither do 5xx answers and timeouts. Once N is known the fleet paces by
//! it (the deployment's quota ledger, sized N), and probes upward when the
//! cap has been binding for a while: one more create, then two, four, …
//! each raise verified by the fleet filling it with accepted creates, until
//! a full window sets N again, or the raise is not filled (it ends at what
//! the fleet did fill); a probe that ends either way waits twice as long
//! before the next. Nothing here waits, publishes or reads the clock: every
//! function takes the time.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::journal::{LearnedQuota, Refused};

/// The longest wait between probes, in windows.
pub const MAX_PROBE_AFTER: u32 = 16;
/// Refusals in a row that show a full window. With 10 % of calls 429s at
/// random among 50 % accepted (accepts between them reset the row), four
/// in a row come about once in two hundred 429s; a full window refuses
/// everything, so four come within the first burst or the first pause.
pub const FULL_ROW: usize = 4;
/// A probe that neither filled nor failed within this many windows ends.
const PROBE_STALE_WINDOWS: u32 = 2;

/// A create the upstream refused with a 429 (the journal's record).
pub type Refusal = Refused;

/// Whether a row of refusals (creates refused with no create of the fleet
/// accepted after any of them came back, oldest first) shows a full window:
/// [`FULL_ROW`] of them, refused together or again after the pauses they
/// caused.
pub fn window_full(row: &[Refusal]) -> bool {
    row.len() >= FULL_ROW
}

/// The quota a full window shows: the fleet's creates accepted within the
/// window when its first refusal came back, at least one.
pub fn estimate(accepted_in_window: usize) -> u32 {
    u32::try_from(accepted_in_window).unwrap_or(u32::MAX).max(1)
}

/// What the fleet should believe after a full window showed `estimate` at
/// `now`: the estimate, not probing. A probe that failed doubles the wait
/// before the next one; a full window below what was known (the account's
/// quota went down) starts the waits again. `None` when nothing changes
/// (the window was full at the quota already known).
pub fn after_full_window(
    known: Option<LearnedQuota>,
    estimate: u32,
    window: Duration,
    now: DateTime<Utc>,
) -> Option<LearnedQuota> {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let probe_after = match known {
        Some(q) if q.step > 0 => (q.probe_after.saturating_mul(2)).min(MAX_PROBE_AFTER),
        Some(q) if estimate >= q.creates => q.probe_after,
        _ => 1,
    };
    if let Some(q) = known {
        if q.step == 0 && q.creates == estimate && q.window_ms == window_ms {
            return None;
        }
    }
    Some(LearnedQuota {
        creates: estimate,
        window_ms,
        step: 0,
        probe_after,
        at: now,
    })
}

/// Whether to probe for a higher quota: the cap bound within the last
/// window (requests waited for it), no probe is running, and the quota has
/// stood for `probe_after` windows. The probe allows one more create.
pub fn probe_start(
    known: &LearnedQuota,
    cap_bound_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<LearnedQuota> {
    let window = to_chrono(known.window());
    let binding = cap_bound_at.is_some_and(|at| now - at < window);
    let stood = now - known.at >= window * i32::try_from(known.probe_after).unwrap_or(i32::MAX);
    (known.step == 0 && binding && stood).then(|| LearnedQuota {
        creates: known.creates.saturating_add(1),
        step: 1,
        at: now,
        ..*known
    })
}

/// While probing: once the fleet has filled the raised quota with accepted
/// creates, raise it again by twice the last step. A raise not filled for
/// [`PROBE_STALE_WINDOWS`] windows (demand fell, or the upstream refused
/// just the last few creates of it) ends the probe at what the fleet did
/// fill, never above the raise nor below where it started, and the next
/// probe waits twice as long.
pub fn probe_next(
    known: &LearnedQuota,
    accepted_in_window: usize,
    now: DateTime<Utc>,
) -> Option<LearnedQuota> {
    if known.step == 0 {
        return None;
    }
    let accepted = u32::try_from(accepted_in_window).unwrap_or(u32::MAX);
    if accepted >= known.creates {
        let step = known.step.saturating_mul(2);
        return Some(LearnedQuota {
            creates: known.creates.saturating_add(step),
            step,
            at: now,
            ..*known
        });
    }
    let stale = now - known.at >= to_chrono(known.window()) * PROBE_STALE_WINDOWS as i32;
    let started = known.creates.saturating_sub(known.step).max(1);
    stale.then(|| LearnedQuota {
        creates: accepted.clamp(started, known.creates),
        step: 0,
        probe_after: known.probe_after.saturating_mul(2).min(MAX_PROBE_AFTER),
        at: now,
        ..*known
    })
}

/// The row of refusals a new one belongs to: the fleet's refusals that
/// came back after the fleet's latest accepted create (`last_accept`; an
/// accept after a refusal means the window had room after all), with `new`
/// added if the journal does not have it yet, oldest first.
pub fn row(fleet: &[Refusal], new: Refusal, last_accept: Option<DateTime<Utc>>) -> Vec<Refusal> {
    let mut row: Vec<Refusal> = fleet
        .iter()
        .filter(|r| last_accept.is_none_or(|a| r.answered_at > a))
        .copied()
        .collect();
    if last_accept.is_none_or(|a| new.answered_at > a) && !row.contains(&new) {
        row.push(new);
    }
    row.sort_by_key(|r| r.answered_at);
    row
}

/// One worker's view of the cap and of its own accepted creates.
#[derive(Debug, Default, Clone)]
pub struct Learner {
    cap_bound_at: Option<DateTime<Utc>>,
    /// This worker's latest accepted create (before the journal has it).
    accepted_at: Option<DateTime<Utc>>,
}

impl Learner {
    /// This worker's create was accepted at `at`.
    pub fn accepted(&mut self, at: DateTime<Utc>) {
        self.accepted_at = self.accepted_at.max(Some(at));
    }

    /// The latest accepted create, the fleet's (`fleet`) or this worker's.
    pub fn last_accept(&self, fleet: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        fleet.max(self.accepted_at)
    }

    /// The cap (the deployment's ledger) refused a slot at `now`.
    pub fn cap_bound(&mut self, now: DateTime<Utc>) {
        self.cap_bound_at = Some(now);
    }

    /// When the cap last refused a slot.
    pub fn cap_bound_at(&self) -> Option<DateTime<Utc>> {
        self.cap_bound_at
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_767_225_600_000 + ms).unwrap_or_default()
    }

    fn refusal(sent: i64, answered: i64) -> Refusal {
        Refusal {
            sent_at: at(sent),
            answered_at: at(answered),
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    fn quota(creates: u32, step: u32, probe_after: u32, learned_at: i64) -> LearnedQuota {
        LearnedQuota {
            creates,
            window_ms: 60_000,
            step,
            probe_after,
            at: at(learned_at),
        }
    }

    #[test]
    fn a_full_window_is_four_refusals_in_a_row_never_a_lone_429() {
        // (row, full)
        let cases: Vec<(Vec<Refusal>, bool)> = vec![
            (vec![], false),
            // A lone 429, Retry-After or not: a pause, not a verdict.
            (vec![refusal(0, 10)], false),
            // Two or three: still what noise does now and then.
            (vec![refusal(0, 10), refusal(2_010, 2_020)], false),
            (vec![refusal(0, 10), refusal(1, 11), refusal(2, 12)], false),
            // Four refused together.
            (
                vec![
                    refusal(0, 10),
                    refusal(1, 11),
                    refusal(2, 12),
                    refusal(3, 13),
                ],
                true,
            ),
            // ... or again after the pauses they caused.
            (
                vec![
                    refusal(0, 10),
                    refusal(1, 11),
                    refusal(2_010, 2_020),
                    refusal(6_020, 6_030),
                ],
                true,
            ),
        ];
        for (row, full) in cases {
            assert_eq!(window_full(&row), full, "{row:?}");
        }
    }

    #[test]
    fn the_row_is_the_fleets_refusals_since_its_latest_accepted_create() {
        let fleet = [refusal(0, 10), refusal(1_000, 1_010), refusal(3_000, 3_010)];
        // (latest accept, new refusal, row length)
        let cases = [
            (None, refusal(5_000, 5_010), 4),
            // An accept at 500: refusals that came back before it are not
            // evidence of a full window now.
            (Some(500), refusal(5_000, 5_010), 3),
            (Some(2_000), refusal(5_000, 5_010), 2),
            // Sent together with creates accepted a moment before they came
            // back: a full window met by a burst.
            (Some(4_005), refusal(4_000, 4_010), 1),
            // The journal already has the new one: not counted twice.
            (Some(2_000), refusal(3_000, 3_010), 1),
            // Came back before the latest accept: not in a row at all.
            (Some(6_000), refusal(5_000, 5_010), 0),
        ];
        for (accept, new, len) in cases {
            let got = row(&fleet, new, accept.map(at));
            assert_eq!(got.len(), len, "accept {accept:?}");
            assert!(got.windows(2).all(|w| w[0].answered_at <= w[1].answered_at));
        }
        let mut l = Learner::default();
        assert_eq!(l.last_accept(Some(at(5))), Some(at(5)));
        // This worker's own accept counts before the journal has it.
        l.accepted(at(9));
        assert_eq!(l.last_accept(Some(at(5))), Some(at(9)));
        assert_eq!(l.last_accept(Some(at(12))), Some(at(12)));
    }

    #[test]
    fn the_estimate_is_what_the_fleet_had_accepted_in_the_window() {
        for (accepted, want) in [(0, 1), (1, 1), (40, 40), (10_000, 10_000)] {
            assert_eq!(estimate(accepted), want);
        }
    }

    #[test]
    fn a_full_window_sets_the_quota_and_a_failed_probe_waits_longer() {
        let now = at(100_000);
        // (known, estimate, expected creates/step/probe_after, or None)
        type Expected = Option<(u32, u32, u32)>;
        let cases: Vec<(Option<LearnedQuota>, u32, Expected)> = vec![
            // First time: learned.
            (None, 40, Some((40, 0, 1))),
            // The same again while not probing: nothing to say.
            (Some(quota(40, 0, 1, 0)), 40, None),
            // The account's quota went down: follow it, probes start over.
            (Some(quota(40, 0, 4, 0)), 10, Some((10, 0, 1))),
            // Higher than known (another process stopped using the
            // account): follow it.
            (Some(quota(10, 0, 2, 0)), 14, Some((14, 0, 2))),
            // A probe failed: back to what the window held, wait twice as
            // long before the next.
            (Some(quota(41, 1, 1, 0)), 40, Some((40, 0, 2))),
            (Some(quota(48, 8, 4, 0)), 44, Some((44, 0, 8))),
            (Some(quota(48, 8, 16, 0)), 44, Some((44, 0, 16))),
        ];
        for (known, est, want) in cases {
            let got = after_full_window(known, est, MINUTE, now);
            assert_eq!(
                got.map(|q| (q.creates, q.step, q.probe_after)),
                want,
                "{known:?} estimate {est}"
            );
            if let Some(q) = got {
                assert_eq!((q.window_ms, q.at), (60_000, now));
            }
        }
    }

    #[test]
    fn probes_start_only_when_the_cap_binds_and_the_quota_has_stood() {
        let learned = quota(10, 0, 2, 0);
        // (cap bound at, now, probe?)
        let cases = [
            // Demand below the cap: nothing to probe for.
            (None, 300_000, false),
            // Bound, but the quota is younger than two windows.
            (Some(100_000), 100_000, false),
            (Some(119_000), 119_999, false),
            // Bound within the last window, two windows old: probe.
            (Some(110_000), 120_000, true),
            // Bound, but over a window ago.
            (Some(50_000), 120_000, false),
        ];
        for (bound, now, probe) in cases {
            let got = probe_start(&learned, bound.map(at), at(now));
            assert_eq!(got.is_some(), probe, "bound {bound:?} now {now}");
            if let Some(q) = got {
                assert_eq!((q.creates, q.step, q.at), (11, 1, at(now)));
            }
        }
        // Never while a probe runs.
        assert_eq!(
            probe_start(&quota(11, 1, 1, 0), Some(at(200_000)), at(200_000)),
            None
        );
    }

    #[test]
    fn a_probe_that_fills_raises_again_twice_as_much() {
        // From 10 to 40 a probe takes 11, 13, 17, 25, 41: five raises.
        let mut q = quota(11, 1, 1, 0);
        let mut seen = vec![q.creates];
        let mut now = 1_000;
        while let Some(next) = probe_next(&q, q.creates as usize, at(now)) {
            q = next;
            seen.push(q.creates);
            now += 1_000;
            if q.creates > 40 {
                break;
            }
        }
        assert_eq!(seen, [11, 13, 17, 25, 41]);
        // Not yet filled: wait. Not probing: nothing.
        assert_eq!(probe_next(&quota(13, 2, 1, 0), 12, at(1_000)), None);
        assert_eq!(probe_next(&quota(13, 0, 1, 0), 99, at(1_000)), None);
        // Not filled for two windows: the probe ends at what the fleet
        // filled, between where it started and the raise, and the next
        // one waits twice as long. (raise, step, accepted, ends at)
        for (creates, step, accepted, ends) in [
            (13, 2, 5, 11),
            (41, 16, 40, 40),
            (41, 16, 30, 30),
            (41, 16, 12, 25),
            (11, 1, 0, 10),
        ] {
            let stale =
                probe_next(&quota(creates, step, 2, 0), accepted, at(120_000)).expect("ends");
            assert_eq!(
                (stale.creates, stale.step, stale.probe_after),
                (ends, 0, 4),
                "{creates} by {step}, {accepted} accepted"
            );
        }
    }
}
