//! Lanes: which request queue the next create slot takes from.
//!
//! With `amqp.lanes` a deployment has several request queues, each with a
//! weight. The worker takes a request only once a create slot is free, so
//! at that moment it can choose the queue: [`LanePicker`] shares the picks
//! among the lanes that have waiting requests in proportion to their
//! weights (smooth weighted round-robin: every waiting lane earns its
//! weight, the richest is picked and pays the total), and a lane with
//! nothing waiting earns nothing, so its share goes to the others and it
//! cannot save up a burst. Each worker picks this way, so the fleet's
//! creates follow the weights too (measured with two workers). A plain
//! function of plain data, with table tests.

/// Chooses lanes by weight among those with waiting requests.
#[derive(Debug, Clone)]
pub struct LanePicker {
    weights: Vec<u32>,
    credit: Vec<i64>,
}

impl LanePicker {
    /// A picker for lanes of these weights (in the topology's order).
    pub fn new(weights: &[u32]) -> Self {
        Self {
            weights: weights.to_vec(),
            credit: vec![0; weights.len()],
        }
    }

    /// The lane to take the next request from, among those whose
    /// `waiting` is true; `None` when none is.
    pub fn pick(&mut self, waiting: &[bool]) -> Option<usize> {
        let eligible = |i: usize| waiting.get(i).copied().unwrap_or(false);
        let total: i64 = (0..self.weights.len())
            .filter(|i| eligible(*i))
            .map(|i| i64::from(self.weights[i]))
            .sum();
        if total == 0 {
            return None;
        }
        let mut best: Option<usize> = None;
        for i in (0..self.weights.len()).filter(|i| eligible(*i)) {
            self.credit[i] += i64::from(self.weights[i]);
            if best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        self.credit[chosen] -= total;
        // A lane that waits no more keeps no debt or credit: it starts
        // afresh when requests come.
        for i in (0..self.weights.len()).filter(|i| !eligible(*i)) {
            self.credit[i] = 0;
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: &[u32], waiting: &[bool], picks: usize) -> Vec<usize> {
        let mut picker = LanePicker::new(weights);
        let mut counts = vec![0; weights.len()];
        for _ in 0..picks {
            if let Some(i) = picker.pick(waiting) {
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn picks_follow_the_weights_of_the_lanes_that_wait() {
        // (weights, waiting, picks, expected counts)
        type Case<'a> = (&'a [u32], &'a [bool], usize, &'a [usize]);
        let cases: [Case<'_>; 6] = [
            (&[1, 8], &[true, true], 90, &[10, 80]),
            (&[1, 1, 2], &[true, true, true], 40, &[10, 10, 20]),
            (&[1, 8], &[true, false], 10, &[10, 0]),
            (&[1, 8], &[false, true], 10, &[0, 10]),
            (&[1, 8], &[false, false], 10, &[0, 0]),
            (&[3], &[true], 5, &[5]),
        ];
        for (weights, waiting, picks, expected) in cases {
            assert_eq!(
                shares(weights, waiting, picks),
                expected,
                "{weights:?} {waiting:?}"
            );
        }
    }

    #[test]
    fn a_lane_that_starts_waiting_is_served_within_a_round() {
        let mut picker = LanePicker::new(&[1, 8]);
        // Bulk alone for a long while: no credit piles up for either.
        for _ in 0..1000 {
            assert_eq!(picker.pick(&[true, false]), Some(0));
        }
        // An interactive request arrives: it is the very next pick.
        assert_eq!(picker.pick(&[true, true]), Some(1));
        // Smooth: bulk is never starved for more than its round.
        let mut since_bulk = 0;
        for _ in 0..90 {
            match picker.pick(&[true, true]) {
                Some(0) => since_bulk = 0,
                _ => since_bulk += 1,
            }
            assert!(since_bulk <= 8);
        }
    }
}
