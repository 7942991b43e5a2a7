//! Call-level fault plans: the public [`FaultPlan`] (scripted faults, then
//! a seeded random mix, per endpoint) with its [`Fault`] kinds and their
//! string forms, and the served state that hands the next fault to each
//! call, so runs with the same plan see the same faults in the same order.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One injected fault. Serialized as a string: `"429"`, `"429:<secs>"`,
/// `"500"`, `"502"`, `"503"`, `"504"`, `"hang"`, `"hang:<duration>"`,
/// `"garbage"`, `"drop"`, `"accept-then-drop"`, `"accept-then-garbage"`,
/// `"late:<duration>"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 `RATE_LIMIT_EXCEEDED` with a `Retry-After: <secs>` header.
    RateLimited {
        /// Value of the `Retry-After` header in seconds (`"429"` means 1).
        retry_after_secs: u64,
    },
    /// A 5xx answer with a JSON error body (500, 502, 503 or 504).
    ServerError(u16),
    /// Sleep (default 5 minutes, or until the server shuts down), then answer
    /// 504 `GATEWAY_TIMEOUT`. Never creates a task.
    Hang(Option<Duration>),
    /// HTTP 200 with `text/html` body `<html>upstream proxy error</html>`.
    Garbage,
    /// Abort the connection without sending a response.
    Drop,
    /// Create only: the task IS created (and billed), then the connection is
    /// aborted, so the caller never learns the task id. On polls it acts as
    /// [`Fault::Drop`].
    AcceptThenDrop,
    /// Create only: the task IS created (and billed), then the answer is
    /// HTTP 200 with an HTML body instead of the task id (an unreadable
    /// success). On polls it acts as [`Fault::Garbage`].
    AcceptThenGarbage,
    /// The call reaches the upstream this much late (latency on the way
    /// in: it is counted against the quota only then), and is then served
    /// as usual.
    Late(Duration),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RateLimited {
                retry_after_secs: 1,
            } => f.write_str("429"),
            Self::RateLimited { retry_after_secs } => write!(f, "429:{retry_after_secs}"),
            Self::ServerError(code) => write!(f, "{code}"),
            Self::Hang(None) => f.write_str("hang"),
            Self::Hang(Some(d)) => write!(f, "hang:{}", humantime::format_duration(*d)),
            Self::Garbage => f.write_str("garbage"),
            Self::Drop => f.write_str("drop"),
            Self::AcceptThenDrop => f.write_str("accept-then-drop"),
            Self::AcceptThenGarbage => f.write_str("accept-then-garbage"),
            Self::Late(d) => write!(f, "late:{}", humantime::format_duration(*d)),
        }
    }
}

/// Error returned when a string is not a valid [`Fault`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fault {input:?}: expected 429, 429:<secs>, 500, 502, 503, 504, hang, \
     hang:<duration>, garbage, drop, accept-then-drop, accept-then-garbage or late:<duration>"
)]
pub struct FaultParseError {
    input: String,
}

impl FromStr for Fault {
    type Err = FaultParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let err = || FaultParseError {
            input: s.to_owned(),
        };
        let fault = match s {
            "429" => Self::RateLimited {
                retry_after_secs: 1,
            },
            "500" => Self::ServerError(500),
            "502" => Self::ServerError(502),
            "503" => Self::ServerError(503),
            "504" => Self::ServerError(504),
            "hang" => Self::Hang(None),
            "garbage" => Self::Garbage,
            "drop" => Self::Drop,
            "accept-then-drop" => Self::AcceptThenDrop,
            "accept-then-garbage" => Self::AcceptThenGarbage,
            _ => {
                if let Some(secs) = s.strip_prefix("429:") {
                    Self::RateLimited {
                        retry_after_secs: secs.trim().parse().map_err(|_| err())?,
                    }
                } else if let Some(dur) = s.strip_prefix("hang:") {
                    Self::Hang(Some(
                        humantime::parse_duration(dur.trim()).map_err(|_| err())?,
                    ))
                } else if let Some(dur) = s.strip_prefix("late:") {
                    Self::Late(humantime::parse_duration(dur.trim()).map_err(|_| err())?)
                } else {
                    return Err(err());
                }
            }
        };
        Ok(fault)
    }
}

impl Serialize for Fault {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fault {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Faults for one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointFaults {
    /// Faults served in order to the next calls, one per call, before normal
    /// behaviour resumes (e.g. `["429", "503", "hang", "garbage", "drop"]`).
    pub script: Vec<Fault>,
    /// After the script: probability 0.0..=1.0 that a call gets a random
    /// fault from `mix`.
    pub rate: f64,
    /// Faults drawn (uniformly) for the random part.
    pub mix: Vec<Fault>,
    /// Seed for the random choice so runs are reproducible (default 0).
    pub seed: u64,
}

impl EndpointFaults {
    /// A noisy upstream: half the calls fail, 30 % with a 500, 10 % with a
    /// 429 and `Retry-After: 1`, 5 % hanging for `hang` (then a 504), 5 %
    /// with an unreadable answer; drawn from `seed`.
    pub fn noisy(hang: Duration, seed: u64) -> Self {
        let mut mix: Vec<Fault> = vec![Fault::ServerError(500); 6];
        mix.extend(
            [Fault::RateLimited {
                retry_after_secs: 1,
            }; 2],
        );
        mix.push(Fault::Hang(Some(hang)));
        mix.push(Fault::Garbage);
        Self {
            rate: 0.5,
            mix,
            seed,
            ..Self::default()
        }
    }
}

/// Call-level fault plan for both API endpoints. Faults are applied after the
/// auth checks; a faulted create never creates a task (except
/// `accept-then-drop`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    /// Faults for the create endpoints (`POST /v3/async/<model>`, all six
    /// models share one script and random sequence).
    pub create: EndpointFaults,
    /// Faults for `GET /v3/async/task-result`.
    pub poll: EndpointFaults,
}

impl FaultPlan {
    /// Checks what serde cannot: rates within 0.0..=1.0.
    pub(super) fn validate(&self) -> Result<(), String> {
        for (name, ep) in [("create", &self.create), ("poll", &self.poll)] {
            if !(0.0..=1.0).contains(&ep.rate) {
                return Err(format!("{name}.rate must be within 0.0..=1.0"));
            }
        }
        Ok(())
    }
}

/// The served part of one endpoint's plan: the script still to serve and
/// the random generator for the mix.
pub(super) struct EndpointFaultState {
    script: VecDeque<Fault>,
    rate: f64,
    mix: Vec<Fault>,
    seed: u64,
    rng: StdRng,
}

impl Default for EndpointFaultState {
    fn default() -> Self {
        Self::from_plan(EndpointFaults::default())
    }
}

impl EndpointFaultState {
    fn from_plan(plan: EndpointFaults) -> Self {
        let rate = if plan.rate.is_nan() {
            0.0
        } else {
            plan.rate.clamp(0.0, 1.0)
        };
        Self {
            script: plan.script.into(),
            rate,
            mix: plan.mix,
            seed: plan.seed,
            rng: StdRng::seed_from_u64(plan.seed),
        }
    }

    fn plan(&self) -> EndpointFaults {
        EndpointFaults {
            script: self.script.iter().copied().collect(),
            rate: self.rate,
            mix: self.mix.clone(),
            seed: self.seed,
        }
    }

    /// How late the next call arrives, if the script says so (taking that
    /// entry).
    pub(super) fn take_late(&mut self) -> Option<Duration> {
        match self.script.front() {
            Some(Fault::Late(d)) => {
                let d = *d;
                self.script.pop_front();
                Some(d)
            }
            _ => None,
        }
    }

    /// The fault for the next call, if any.
    pub(super) fn next(&mut self) -> Option<Fault> {
        if let Some(fault) = self.script.pop_front() {
            return Some(fault);
        }
        if self.rate <= 0.0 || self.mix.is_empty() {
            return None;
        }
        if self.rng.random::<f64>() < self.rate {
            let i = self.rng.random_range(0..self.mix.len());
            self.mix.get(i).copied()
        } else {
            None
        }
    }
}

/// The fault plan as it is being served, per endpoint.
#[derive(Default)]
pub(super) struct FaultState {
    pub(super) create: EndpointFaultState,
    pub(super) poll: EndpointFaultState,
}

impl FaultState {
    pub(super) fn from_plan(plan: FaultPlan) -> Self {
        Self {
            create: EndpointFaultState::from_plan(plan.create),
            poll: EndpointFaultState::from_plan(plan.poll),
        }
    }

    pub(super) fn plan(&self) -> FaultPlan {
        FaultPlan {
            create: self.create.plan(),
            poll: self.poll.plan(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::time::Instant;

    use super::*;
    use crate::simulator::api::GARBAGE_BODY;
    use crate::simulator::test_support::*;
    use crate::simulator::{CREATE_PATH, TASK_RESULT_PATH};

    #[tokio::test]
    async fn status_faults_in_script_order_and_create_no_task() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(
            vec![f("429"), f("429:7"), f("500"), f("502"), f("503"), f("504")],
            vec![f("500"), f("429")],
        ));
        let expected = [
            (429, "RATE_LIMIT_EXCEEDED"),
            (429, "RATE_LIMIT_EXCEEDED"),
            (500, "CREATE_TASK_FAILED"),
            (502, "BAD_GATEWAY"),
            (503, "SERVICE_UNAVAILABLE"),
            (504, "GATEWAY_TIMEOUT"),
        ];
        for (i, (code, reason)) in expected.into_iter().enumerate() {
            let resp = create(&c, &sim, &body("x")).await;
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let (status, v) = error_body(resp).await;
            assert_eq!((status, v["reason"].as_str()), (code, Some(reason)));
            match i {
                0 => assert_eq!(retry_after.as_deref(), Some("1")),
                1 => assert_eq!(retry_after.as_deref(), Some("7")),
                _ => assert_eq!(retry_after, None),
            }
        }
        assert_eq!(sim.stats().tasks_created, 0);
        let id = create_id(&c, &sim, "x").await;
        let (status, v) = error_body(poll(&c, &sim, &id).await).await;
        assert_eq!(
            (status, v["reason"].as_str()),
            (500, Some("GET_RESULT_FAILED"))
        );
        assert_eq!(poll(&c, &sim, &id).await.status(), 429);
        assert_eq!(poll(&c, &sim, &id).await.status(), 200);

        let stats = sim.stats();
        assert_eq!(stats.create_calls, 7);
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.poll_calls, 3);
        assert_eq!(stats.responses["create:429"], 2);
        assert_eq!(stats.responses["create:500"], 1);
        assert_eq!(stats.responses["create:200"], 1);
        assert_eq!(stats.responses["poll:500"], 1);
        assert_eq!(stats.responses["poll:200"], 1);
        // Only the poll that reached the task counts for it.
        assert_eq!(stats.max_polls_per_task, 1);
        assert!(sim.simulator().faults().create.script.is_empty());
    }

    #[tokio::test]
    async fn garbage_fault() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("garbage")], vec![f("garbage")]));
        let resp = create(&c, &sim, &body("x")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/html");
        assert_eq!(resp.text().await.expect("text"), GARBAGE_BODY);
        let resp = poll(&c, &sim, "whatever").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("text"), GARBAGE_BODY);
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 0);
        assert_eq!(stats.responses["create:garbage"], 1);
        assert_eq!(stats.responses["poll:garbage"], 1);
    }

    #[tokio::test]
    async fn drop_fault_gives_client_error_not_response() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("drop")], vec![f("drop")]));
        let err = c
            .post(format!("{}{CREATE_PATH}", sim.base_url()))
            .bearer_auth(KEY)
            .json(&body("x"))
            .send()
            .await
            .expect_err("dropped create must be an error");
        assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
        let err = c
            .get(format!("{}{TASK_RESULT_PATH}?task_id=x", sim.base_url()))
            .bearer_auth(KEY)
            .send()
            .await
            .expect_err("dropped poll must be an error");
        assert!(err.status().is_none(), "{err:?}");
        // The connection is usable again afterwards (fresh connection).
        let id = create_id(&c, &sim, "x").await;
        assert_eq!(poll(&c, &sim, &id).await.status(), 200);
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.responses["create:drop"], 1);
        assert_eq!(stats.responses["poll:drop"], 1);
    }

    #[tokio::test]
    async fn drop_fault_sends_no_bytes_at_all() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![], vec![f("drop")]));
        let mut stream = tokio::net::TcpStream::connect(sim.addr())
            .await
            .expect("connect");
        let request = format!(
            "GET {TASK_RESULT_PATH}?task_id=x HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer {KEY}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
            .await
            .expect("connection must be closed promptly");
        // Either a clean EOF or a reset; never any response bytes.
        if read.is_ok() {
            assert!(
                received.is_empty(),
                "got {:?}",
                String::from_utf8_lossy(&received)
            );
        }
    }

    #[tokio::test]
    async fn accept_then_drop_creates_a_billed_task() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("accept-then-drop")], vec![]));
        let prompt = "request-id 1234 accept-then-drop";
        let err = c
            .post(format!("{}{CREATE_PATH}", sim.base_url()))
            .bearer_auth(KEY)
            .json(&body(prompt))
            .send()
            .await
            .expect_err("must be an error");
        assert!(err.status().is_none(), "{err:?}");
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.responses["create:accept-then-drop"], 1);
        let tasks = sim.tasks_matching("request-id 1234");
        assert_eq!(tasks.len(), 1);
        // A retry of the same request is a double spend.
        create_id(&c, &sim, prompt).await;
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 2);
        assert_eq!(stats.duplicate_creates, 1);
        assert_eq!(sim.tasks_matching("request-id 1234").len(), 2);
    }

    #[tokio::test]
    async fn accept_then_garbage_bills_a_task_and_answers_html() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("accept-then-garbage")], vec![]));
        let resp = create(&c, &sim, &body("unreadable success")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.expect("text"), GARBAGE_BODY);
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.answered("create:accept-then-garbage"), 1);
        let calls = sim.calls();
        assert_eq!(calls.len(), 1);
        assert!(calls[0].task_id.is_some(), "{calls:?}");
    }

    #[tokio::test]
    async fn hang_fault_exceeds_client_timeout() {
        let sim = start(Duration::ZERO).await;
        sim.set_faults(plan_for(vec![f("hang")], vec![f("hang:200ms")]));
        let short = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .expect("client");
        let err = short
            .post(format!("{}{CREATE_PATH}", sim.base_url()))
            .bearer_auth(KEY)
            .json(&body("x"))
            .send()
            .await
            .expect_err("must time out");
        assert!(err.is_timeout(), "{err:?}");
        // A short hang answers 504 afterwards.
        let c = client();
        let started = Instant::now();
        let (status, v) = error_body(poll(&c, &sim, "x").await).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            (status, v["reason"].as_str()),
            (504, Some("GATEWAY_TIMEOUT"))
        );
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 0);
        assert_eq!(stats.responses["create:hang"], 1);
        assert_eq!(stats.responses["poll:hang"], 1);
    }

    #[tokio::test]
    async fn random_mix_is_reproducible() {
        async fn run(seed: u64) -> Vec<u16> {
            let sim = start(Duration::ZERO).await;
            sim.set_faults(FaultPlan {
                poll: EndpointFaults {
                    script: vec![f("502")],
                    rate: 0.5,
                    mix: vec![f("429"), f("503")],
                    seed,
                },
                ..FaultPlan::default()
            });
            let c = client();
            let mut out = Vec::new();
            for _ in 0..40 {
                out.push(poll(&c, &sim, "x").await.status().as_u16());
            }
            out
        }
        let a = run(7).await;
        assert_eq!(a, run(7).await);
        assert_eq!(a[0], 502);
        let faulted = a[1..].iter().filter(|s| **s != 404).count();
        assert!((5..=35).contains(&faulted), "{a:?}");
        assert!(a[1..].iter().all(|s| [404, 429, 503].contains(s)));

        let sim = start(Duration::ZERO).await;
        sim.set_faults(FaultPlan {
            create: EndpointFaults {
                rate: 1.0,
                mix: vec![f("503")],
                ..EndpointFaults::default()
            },
            ..FaultPlan::default()
        });
        let c = client();
        for _ in 0..5 {
            assert_eq!(create(&c, &sim, &body("x")).await.status(), 503);
        }
        assert_eq!(sim.stats().tasks_created, 0);
    }

    #[test]
    fn fault_serde_forms() {
        for s in [
            "429",
            "429:30",
            "500",
            "502",
            "503",
            "504",
            "hang",
            "hang:3s",
            "garbage",
            "drop",
            "accept-then-drop",
            "late:150ms",
        ] {
            let fault: Fault = s.parse().expect("parse");
            assert_eq!(fault.to_string(), s);
            let json = serde_json::to_string(&fault).expect("ser");
            assert_eq!(serde_json::from_str::<Fault>(&json).expect("de"), fault);
        }
        assert_eq!(f("hang:3s"), Fault::Hang(Some(Duration::from_secs(3))));
        assert_eq!(
            f("429:30"),
            Fault::RateLimited {
                retry_after_secs: 30
            }
        );
        assert_eq!(f("late:150ms"), Fault::Late(Duration::from_millis(150)));
        for bad in ["418", "hang:soon", "429:x", "", "dropp", "late:"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
        let plan: FaultPlan =
            serde_json::from_value(json!({"poll": {"script": ["503"]}})).expect("plan");
        assert_eq!(plan.poll.script, vec![Fault::ServerError(503)]);
        assert_eq!(plan.create, EndpointFaults::default());
    }
}
