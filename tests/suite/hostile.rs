//! Hostile producers and upstreams. Producers are other teams' code and can
//! write into every queue of the vhost; the upstream is a third party behind
//! proxies. Forged tickets, reply_to at internal queues, a refusing reply
//! queue, duplicate keys and deep or non-finite metadata on one side; huge
//! answers, echoed secrets, odd video URLs, huge task ids and reasons on the
//! other. Each case checks the exact outcome and that the other requests
//! of the run were undisturbed; the worker's peak memory is read from /proc.

use std::time::Duration;

use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use serde_json::{json, Value};
use vidu_test_kit::*;
use vidu_worker::{
    broker::ERROR_HEADER,
    events::{FAILED, SUBMITTED, SUCCEEDED},
    signing::{Signer, SIGNATURE_HEADER},
    simulator::SimulatorConfig,
};

const TICKET_SECRET: &str = "test-ticket-secret-0123456789";

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn env_with_secret(s: &mut vidu_worker::config::Settings) {
    s.tickets.secret = Some(TICKET_SECRET.into());
}

/// A ticket like the worker writes, for `request_id` and `task_id`, due now.
fn ticket_body(request_id: &str, task_id: &str) -> Value {
    let now = chrono::Utc::now();
    json!({
        "v": 1,
        "request_id": request_id,
        "task_id": task_id,
        "model": "vidu-q3-pro-i2v",
        "received_at": now.to_rfc3339(),
        "submitted_at": now.to_rfc3339(),
        "deadline": (now + chrono::Duration::hours(2)).to_rfc3339(),
        "next_poll_at": now.to_rfc3339(),
    })
}

fn signed(signer: &Signer, body: &[u8]) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        SIGNATURE_HEADER.into(),
        AMQPValue::LongString(LongString::from(signer.sign(body).legacy)),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
}

async fn dead_letters(env: &TestEnv, n: usize) -> Vec<std::collections::HashMap<String, String>> {
    let all = std::sync::Mutex::new(Vec::new());
    eventually(
        Duration::from_secs(30),
        &format!("{n} dead letters"),
        || async {
            let more = env.drain_dead().await;
            let mut all = all.lock().expect("lock");
            all.extend(more.into_iter().map(|(h, _, _)| h));
            (all.len() >= n).then_some(())
        },
    )
    .await;
    all.into_inner().expect("lock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tickets_are_never_acted_on() {
    let env = TestEnv::with("forged", sim(Duration::from_millis(300)), env_with_secret).await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    // A real request, finished: its id and task are what a forger claims.
    env.publish(&request("real-1", "a real request")).await;
    let done = tap.wait_terminal("real-1", Duration::from_secs(30)).await;
    assert_eq!(done.kind(), SUCCEEDED);
    let task_id = done.body["data"]["task_id"]
        .as_str()
        .expect("task")
        .to_owned();
    let polls = env.sim.stats().poll_calls;
    let events = tap.all().len();

    let body = serde_json::to_vec(&ticket_body("real-1", &task_id)).expect("json");
    let wait_2s = env.topology.wait_queues[0].1.clone();
    let other_deployment = Signer::new(&TICKET_SECRET.into(), &[], "someone-else.requests", true);
    let mine = Signer::new(
        &TICKET_SECRET.into(),
        &[],
        &env.topology.request_queue,
        true,
    );
    let mut bad_fields = Vec::new();
    for (field, value) in [
        ("request_id", json!("real-1\nforged")),
        ("v", json!(99)),
        ("metadata", json!([1, 2])),
        ("task_id", json!("x".repeat(300))),
        ("correlation_id", json!("c".repeat(300))),
        ("reply_to", json!(env.topology.tracking_queue.clone())),
        ("traceparent", json!("not-a-trace")),
    ] {
        let mut t = ticket_body("real-1", &task_id);
        t[field] = value;
        bad_fields.push((field, serde_json::to_vec(&t).expect("json")));
    }
    // Unsigned, into the tracking queue and a wait queue.
    env.publisher
        .publish(
            "",
            &env.topology.tracking_queue,
            &body,
            BasicProperties::default(),
            true,
        )
        .await
        .expect("publish");
    env.publisher
        .publish("", &wait_2s, &body, BasicProperties::default(), true)
        .await
        .expect("publish");
    // Signed by another deployment with the same secret: well-formed, but
    // no key of this deployment verifies it. Kept (a worker holding its key
    // may come), never acted on.
    env.publisher
        .publish(
            "",
            &env.topology.tracking_queue,
            &body,
            signed(&other_deployment, &body),
            true,
        )
        .await
        .expect("publish");
    // A signature no worker could have written.
    let mut headers = FieldTable::default();
    headers.insert(
        SIGNATURE_HEADER.into(),
        AMQPValue::LongString(LongString::from("not-hex")),
    );
    env.publisher
        .publish(
            "",
            &env.topology.tracking_queue,
            &body,
            BasicProperties::default().with_headers(headers),
            true,
        )
        .await
        .expect("publish");
    // Signed correctly but with fields a request could never have.
    for (_, b) in &bad_fields {
        env.publisher
            .publish("", &env.topology.tracking_queue, b, signed(&mine, b), true)
            .await
            .expect("publish");
    }
    let n = 3 + bad_fields.len();
    let dead = dead_letters(&env, n).await;
    let why: Vec<&str> = dead.iter().map(|h| h[ERROR_HEADER].as_str()).collect();
    assert_eq!(
        why.iter().filter(|w| w.contains("(unsigned)")).count(),
        2,
        "{why:#?}"
    );
    assert_eq!(
        why.iter().filter(|w| w.contains("(forged)")).count(),
        1,
        "{why:#?}"
    );
    for (field, _) in &bad_fields {
        assert!(
            why.iter()
                .any(|w| w.contains("(invalid)") && w.contains(field)),
            "{field} named in {why:#?}"
        );
    }
    assert!(why.iter().all(|w| !w.chars().any(char::is_control)));
    assert!(
        worker
            .metric("vidu_worker_tickets_unverified_total", "")
            .await
            >= 1.0,
        "the ticket of another deployment is counted as unverified"
    );
    // No poll and no event came of any of them.
    assert_eq!(env.sim.stats().poll_calls, polls, "no upstream call");
    assert_eq!(tap.all().len(), events, "no event");
    assert_eq!(
        worker
            .metric("vidu_worker_tickets_rejected_total", "")
            .await,
        n as f64
    );
    // And the worker goes on: a new request succeeds.
    env.publish(&request("real-2", "after the forgeries")).await;
    assert_eq!(
        tap.wait_terminal("real-2", Duration::from_secs(30))
            .await
            .kind(),
        SUCCEEDED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_keeps_tickets_in_flight() {
    let old = "old-ticket-secret-0123456789";
    let new = "new-ticket-secret-9876543210";
    let env = TestEnv::with("rotate", sim(Duration::from_secs(8)), |s| {
        s.tickets.secret = Some(old.into());
        s.polling.min_interval = Duration::from_secs(3);
    })
    .await;
    let tap = env.tap().await;
    let first = env.start_worker().await;
    let n = 10;
    let subjects: Vec<String> = (0..n).map(|i| format!("rot-{i}")).collect();
    for id in &subjects {
        env.publish(&request(id, "in flight across a rotation"))
            .await;
    }
    eventually(Duration::from_secs(30), "every task submitted", || async {
        let submitted = tap.all().iter().filter(|e| e.kind() == SUBMITTED).count();
        (submitted >= n).then_some(())
    })
    .await;
    assert!(tap.finished_subjects().is_empty(), "still in flight");
    // Roll the deployment: the new worker signs with the new secret and
    // still accepts the old one.
    first.kill9().await;
    let rotated = env
        .start_worker_with(&[
            ("VIDU_WORKER__TICKETS__SECRET", new),
            ("VIDU_WORKER__TICKETS__PREVIOUS_SECRETS", old),
        ])
        .await;
    tap.wait_finished(n, Duration::from_secs(60)).await;
    tap.assert_all_succeeded();
    assert!(env.drain_dead().await.is_empty(), "no ticket refused");
    assert_eq!(
        rotated
            .metric("vidu_worker_tickets_rejected_total", "")
            .await,
        0.0
    );
    // Without the old secret (and without the deployment key's signature),
    // a ticket signed with it is not acted on: it is kept for a worker that
    // holds the secret.
    drop(rotated);
    let strict = env
        .start_worker_with(&[("VIDU_WORKER__TICKETS__SECRET", new)])
        .await;
    let old_signer = Signer::new(&old.into(), &[], &env.topology.request_queue, true);
    let body = serde_json::to_vec(&ticket_body("rot-x", "task-x")).expect("json");
    env.publisher
        .publish(
            "",
            &env.topology.tracking_queue,
            &body,
            signed(&old_signer, &body),
            true,
        )
        .await
        .expect("publish");
    let polls = env.sim.stats().poll_calls;
    eventually(
        Duration::from_secs(30),
        "the ticket counted as unverified",
        || async {
            (strict
                .metric("vidu_worker_tickets_unverified_total", "")
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(env.sim.stats().poll_calls, polls, "not polled");
    assert!(env.drain_dead().await.is_empty(), "kept, not dead-lettered");
    drop(strict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_request_properties_and_bodies_are_refused_by_name() {
    let env = TestEnv::new("hostilereq", sim(Duration::from_millis(300))).await;
    let tap = env.tap().await;
    let _worker = env.start_worker().await;
    let rq = env.topology.request_queue.clone();
    let internal = [
        rq.clone(),
        env.topology.tracking_queue.clone(),
        env.topology.wait_queues[0].1.clone(),
        env.topology.dead_queue.clone(),
        "other-team.requests.tracking".to_owned(),
        "other-team.requests.wait.64s".to_owned(),
        "amq.gen-stolen".to_owned(),
    ];
    for (i, reply_to) in internal.iter().enumerate() {
        env.publish_with(
            &request(&format!("reply-{i}"), "reply to an internal queue"),
            BasicProperties::default().with_reply_to(reply_to.as_str().into()),
        )
        .await;
    }
    env.publish_with(
        &request("corr", "control characters"),
        BasicProperties::default().with_correlation_id("a\nforged: line".into()),
    )
    .await;
    let img = r#""images": ["https://example.com/cat.png"]"#;
    let bodies: [(&str, String, &str); 4] = [
        (
            "dup",
            format!(
                r#"{{"request_id": "dup", "input": {{{img}, "duration": 5}}, "input": {{{img}, "duration": 16}}}}"#
            ),
            "input",
        ),
        (
            "deep",
            format!(
                r#"{{"request_id": "deep", "input": {{{img}}}, "metadata": {}1{}}}"#,
                "{\"a\":".repeat(1500),
                "}".repeat(1500)
            ),
            "metadata",
        ),
        (
            "inf",
            format!(
                r#"{{"request_id": "inf", "input": {{{img}}}, "metadata": {{"n": 1e999999}}}}"#
            ),
            "body",
        ),
        (
            "surrogate",
            format!(
                r#"{{"request_id": "surrogate", "input": {{{img}}}, "metadata": {{"s": "\ud800"}}}}"#
            ),
            "body",
        ),
    ];
    for (_, body, _) in &bodies {
        env.publish_raw(
            body.as_bytes(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    }
    env.publish(&request("fine", "an ordinary request")).await;
    let expected = internal.len() + 1 + bodies.len() + 1;
    tap.wait_finished(expected, Duration::from_secs(30)).await;
    for i in 0..internal.len() {
        let e = tap
            .wait_terminal(&format!("reply-{i}"), Duration::from_secs(10))
            .await;
        assert_eq!(e.body["data"]["error"]["code"], "invalid_request");
        let message = e.body["data"]["error"]["message"].as_str().unwrap_or("");
        assert!(message.starts_with("reply_to: "), "{message}");
    }
    let corr = tap.wait_terminal("corr", Duration::from_secs(10)).await;
    assert!(corr.body["data"]["error"]["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("correlation_id: "));
    assert_eq!(corr.correlation_id, None, "not echoed");
    for (_, _, field) in &bodies {
        // Some of these end under a generated id (the body could not be
        // read far enough to find theirs): find them by message instead.
        let hit = tap.terminal().into_iter().any(|e| {
            e.body["data"]["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(field))
        });
        assert!(hit, "a failure naming {field}");
    }
    let dup = tap.wait_terminal("dup", Duration::from_secs(10)).await;
    assert!(dup.body["data"]["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("duplicate key \"input\""));
    assert_eq!(
        tap.wait_terminal("fine", Duration::from_secs(30))
            .await
            .kind(),
        SUCCEEDED
    );
    // Nothing reached the internal queues, and nothing was created for them.
    assert_eq!(
        env.sim.stats().tasks_created,
        1,
        "only the ordinary request"
    );
    for q in [&env.topology.tracking_queue, &env.topology.wait_queues[0].1] {
        assert_eq!(env.depth(q).await, 0, "{q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_reply_queue_ends_the_request_once() {
    let env = TestEnv::new("replyrefuse", sim(Duration::from_millis(500))).await;
    // A classic queue full at zero messages refuses every publish.
    let reply = env
        .declare_queue_with(
            "full.replies",
            queue_args(&[
                ("x-max-length", AMQPValue::LongInt(0)),
                ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            ]),
        )
        .await
        .expect("declare");
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    env.publish_with(
        &request("refused-reply", "the reply queue refuses"),
        BasicProperties::default().with_reply_to(reply.as_str().into()),
    )
    .await;
    env.publish_with(
        &request("gone-reply", "the reply queue does not exist"),
        BasicProperties::default()
            .with_reply_to(format!("{}.no-such.replies", env.name).as_str().into()),
    )
    .await;
    tap.wait_finished(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in ["refused-reply", "gone-reply"] {
        let terminal: Vec<_> = tap
            .for_subject(id)
            .into_iter()
            .filter(SeenEvent::is_terminal)
            .collect();
        assert_eq!(
            terminal.len(),
            1,
            "{id}: one terminal event; got {:?}; worker warnings: {:#?}",
            terminal
                .iter()
                .map(|e| (e.id().to_owned(), e.body["time"].clone()))
                .collect::<Vec<_>>(),
            worker
                .logs()
                .into_iter()
                .filter(|l| l.contains("WARN") || l.contains("\"warn\"") || l.contains("ERROR"))
                .collect::<Vec<_>>()
        );
        assert_eq!(terminal[0].kind(), SUCCEEDED);
    }
    assert_eq!(env.sim.stats().tasks_created, 2);
    assert!(
        env.sim.stats().max_polls_per_task <= 3,
        "no poll loop: {}",
        env.sim.stats().max_polls_per_task
    );
    assert_eq!(
        worker.metric("vidu_worker_reply_failures_total", "").await,
        2.0
    );
    let _ = env
        .channel
        .queue_delete(reply.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_upstream_answers_are_bounded_and_cleaned() {
    let key = "sk-HOSTILE-5f3e9a1c7b2d";
    let env = TestEnv::new(
        "hostileup",
        SimulatorConfig {
            api_key: Some(key.into()),
            ..sim(Duration::from_millis(500))
        },
    )
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let cases = [
        ("huge", "[sim:huge=400MiB]"),
        ("echo", "[sim:echo-auth]"),
        ("reason", "[sim:reason-bytes=100KiB]"),
        ("js", "[sim:video-url=javascript:alert(1)]"),
        ("file", "[sim:video-url=file:///etc/passwd]"),
        ("many", "[sim:videos=200000]"),
        ("some", "[sim:videos=1000]"),
        ("bigid", "[sim:task-id-bytes=2MiB]"),
        ("longid", "[sim:task-id-bytes=200]"),
        ("ok", "an ordinary request"),
    ];
    for (id, prompt) in cases {
        env.publish(&request(id, prompt)).await;
    }
    tap.wait_finished(cases.len(), Duration::from_secs(120))
        .await;
    let end = |id: &str| {
        tap.for_subject(id)
            .into_iter()
            .find(SeenEvent::is_terminal)
            .unwrap_or_else(|| panic!("{id} ended"))
    };
    let failed = |id: &str, code: &str, needle: &str| {
        let e = end(id);
        assert_eq!(e.kind(), FAILED, "{id}: {}", e.body);
        assert_eq!(e.body["data"]["error"]["code"], code, "{id}");
        let message = e.body["data"]["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(needle), "{id}: {message}");
        message.to_owned()
    };
    failed("huge", "upstream_failed", "more than 262144 bytes");
    let echoed = failed("echo", "upstream_failed", "[REDACTED]");
    assert!(!echoed.contains(key), "{echoed}");
    let reason = failed("reason", "upstream_failed", "rrrr");
    assert!(reason.chars().count() <= 501, "{}", reason.len());
    failed("js", "upstream_failed", "scheme \"javascript\"");
    failed("file", "upstream_failed", "scheme \"file\"");
    failed("many", "upstream_failed", "more than 262144 bytes");
    failed("bigid", "upstream_unconfirmed", "more than 262144 bytes");
    failed("longid", "upstream_unconfirmed", "task_id of 200 bytes");
    let some = end("some");
    assert_eq!(some.kind(), SUCCEEDED);
    assert_eq!(
        some.body["data"]["videos"].as_array().map(Vec::len),
        Some(16),
        "at most 16 videos"
    );
    assert_eq!(end("ok").kind(), SUCCEEDED);
    // Every event is small, and the key is nowhere.
    for e in tap.all() {
        let text = e.body.to_string();
        assert!(
            text.len() < 8 * 1024,
            "{} bytes: {}",
            text.len(),
            e.subject()
        );
        assert!(!text.contains(key));
    }
    let logs = worker.logs().join("\n");
    assert!(!logs.contains(key), "the key is in the logs");
    let peak = peak_rss_mib(worker.pid()).expect("/proc");
    eprintln!("hostile upstream: worker peak RSS {peak:.1} MiB");
    assert!(peak < 64.0, "peak RSS {peak:.1} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_endpoint_sheds_half_open_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new("opsflood", sim(Duration::from_millis(300))).await;
    let worker = env.start_worker().await;
    let addr = worker.ops_addr().await;
    // 200 clients that connect and never finish a request.
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
        idle.push(s);
    }
    // Beyond the cap they are closed at once; the rest at the header
    // timeout (5 s). The bound below only tells "closed by the server" from
    // "held open" (the endpoint without a header timeout held them 45 s
    // and more); how quickly is not a test's business.
    let started = tokio::time::Instant::now();
    let mut closed = 0;
    for s in &mut idle {
        let mut buf = [0u8; 256];
        let left = Duration::from_secs(30).saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => closed += 1, // an error answer, then the close
            Err(_) => {}
        }
    }
    eprintln!(
        "operations endpoint: {closed} of 200 half-open connections closed within {:?}",
        started.elapsed()
    );
    assert_eq!(closed, 200, "every half-open connection was closed");
    // And it still answers.
    assert_eq!(worker.get("/healthz").await.map(|(s, _)| s), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_within_the_memory_bound() {
    // Two requests held at once: the bound is what the worker holds of them.
    let env = TestEnv::with("oversized", sim(Duration::from_millis(300)), |s| {
        s.amqp.prefetch = 2;
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let before = peak_rss_mib(worker.pid()).expect("/proc");
    let big = 24 * 1024 * 1024;
    for i in 0..12 {
        let mut body = format!(r#"{{"request_id": "big-{i}", "metadata": {{"pad": ""#).into_bytes();
        body.resize(big, b'x');
        body.extend_from_slice(br#""}, "input": {}}"#);
        // Unread, the body cannot name the request: its message_id does.
        env.publish_raw(
            &body,
            BasicProperties::default().with_message_id(format!("big-{i}").as_str().into()),
        )
        .await;
    }
    env.publish(&request("small", "after the big ones")).await;
    tap.wait_finished(13, Duration::from_secs(120)).await;
    for i in 0..12 {
        let e = tap
            .wait_terminal(&format!("big-{i}"), Duration::from_secs(5))
            .await;
        let message = e.body["data"]["error"]["message"].as_str().unwrap_or("");
        assert!(message.starts_with("body: "), "{message}");
        assert!(message.contains("larger than the limit"), "{message}");
    }
    assert_eq!(
        tap.wait_terminal("small", Duration::from_secs(5))
            .await
            .kind(),
        SUCCEEDED
    );
    let dead = env.drain_dead().await;
    assert_eq!(dead.len(), 12);
    assert!(
        dead.iter().all(|(_, body, _)| body.is_empty()),
        "not copied"
    );
    let peak = peak_rss_mib(worker.pid()).expect("/proc");
    // Bound: what it held before, plus amqp.prefetch requests of the
    // broker's largest message, twice (the frames and the assembled body).
    let bound = before + 2.0 * 2.0 * 24.0 + 16.0;
    eprintln!(
        "oversized requests: peak RSS {peak:.1} MiB (before {before:.1} MiB, bound {bound:.1} MiB)"
    );
    assert!(peak < bound, "peak {peak:.1} MiB, bound {bound:.1} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_must_match_the_allow_list() {
    let env = TestEnv::new("replyallow", sim(Duration::from_millis(300))).await;
    let allowed = env.declare_queue("replies").await;
    let elsewhere = env.declare_queue("billing.inbox").await;
    let tap = env.tap().await;
    let replies = env.collect(&allowed).await;
    let _worker = env.start_worker().await;
    env.publish_with(
        &request("to-allowed", "reply to a queue the allow-list names"),
        BasicProperties::default().with_reply_to(allowed.as_str().into()),
    )
    .await;
    env.publish_with(
        &request("to-elsewhere", "reply to any other queue of the vhost"),
        BasicProperties::default().with_reply_to(elsewhere.as_str().into()),
    )
    .await;
    let ok = tap
        .wait_terminal("to-allowed", Duration::from_secs(30))
        .await;
    assert_eq!(ok.kind(), SUCCEEDED);
    replies
        .wait_terminal("to-allowed", Duration::from_secs(10))
        .await;
    let refused = tap
        .wait_terminal("to-elsewhere", Duration::from_secs(30))
        .await;
    assert_eq!(refused.body["data"]["error"]["code"], "invalid_request");
    let message = refused.body["data"]["error"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(
        message.starts_with("reply_to: ") && message.contains("amqp.reply_to_allowed"),
        "{message}"
    );
    assert_eq!(env.depth(&elsewhere).await, 0, "nothing published there");
    assert_eq!(env.sim.stats().tasks_created, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_writing_into_the_quota_ledger_does_not_stop_creates() {
    let env = TestEnv::with("ledgerfill", sim(Duration::from_millis(300)), |s| {
        s.upstream.create_quota =
            Some(vidu_worker::config::CreateQuota::parse("3/10s").expect("quota"));
    })
    .await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    // The name a producer could know: the request queue's, the quota, as
    // the README documented it. It publishes a full window into it, again
    // and again, with the permissions every producer has.
    let guessed = format!("{}.quota.3-per-10s", env.topology.request_queue);
    let filler = {
        let publisher = env.publisher.clone();
        let guessed = guessed.clone();
        tokio::spawn(async move {
            loop {
                for _ in 0..3 {
                    let _ = publisher
                        .publish("", &guessed, b"", BasicProperties::default(), false)
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        env.publish(&request(&format!("fill-{i}"), "created despite the filler"))
            .await;
    }
    tap.wait_finished(3, Duration::from_secs(25)).await;
    tap.assert_all_succeeded();
    filler.abort();
    assert_eq!(env.sim.stats().tasks_created, 3);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_answer_while_200_half_open_connections_are_held() {
    let env = TestEnv::new("opsheld", sim(Duration::from_millis(300))).await;
    let worker = env.start_worker().await;
    let addr = worker.ops_addr().await;
    // One client opens 200 connections and sends nothing on them.
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            held.push(s);
        }
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let mut answered = 0;
    for _ in 0..30 {
        let ok = client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        answered += usize::from(ok);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("/healthz answered {answered} of 30 calls while 200 connections were held");
    assert_eq!(answered, 30, "every probe answered");
    drop(held);
}
