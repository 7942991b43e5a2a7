//! End-to-end behaviour of one or two workers against the real RabbitMQ and
//! the simulator: the happy path, every validation rule, upstream refusals
//! and failures, timeouts, transient upstream errors, and scale-out.

use std::{collections::HashMap, time::Duration};

use lapin::{
    options::{BasicGetOptions, BasicNackOptions, QueueDeleteOptions},
    BasicProperties,
};
use serde_json::{json, Value};
use vidu_test_kit::*;
use vidu_worker::{
    broker::ERROR_HEADER,
    events::{CONTENT_TYPE, FAILED, PROGRESS, SUBMITTED, SUCCEEDED},
    simulator::{video_sha256, EndpointFaults, FaultPlan},
};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn happy_path_publishes_submitted_progress_and_succeeded_events() {
    let env = TestEnv::new("happy", sim(Duration::from_millis(1500))).await;
    let tap = env.tap().await;
    let replies = env.declare_queue("replies").await;
    let reply_tap = env.collect(&replies).await;
    let worker = env.start_worker().await;

    let body = json!({
        "request_id": "order-1234",
        "model": "vidu-q3-pro-i2v",
        "input": {
            "images": ["https://example.com/cat.png"],
            "prompt": "the cat turns its head and blinks",
            "duration": 5,
            "resolution": "720p"
        },
        "metadata": {"user": 42, "tags": ["a", "b"]}
    });
    env.publish_with(
        &body,
        BasicProperties::default()
            .with_correlation_id("corr-77".into())
            .with_reply_to(replies.as_str().into()),
    )
    .await;

    let done = tap.wait_terminal("order-1234", WAIT).await;
    let events = tap.for_subject("order-1234");
    let kinds: Vec<&str> = events.iter().map(SeenEvent::kind).collect();
    assert_eq!(kinds.first(), Some(&SUBMITTED), "{kinds:?}");
    assert!(kinds.contains(&PROGRESS), "{kinds:?}");
    assert_eq!(done.kind(), SUCCEEDED);

    for e in &events {
        // Envelope, AMQP properties and routing.
        assert_eq!(e.body["specversion"], "1.0");
        assert_eq!(e.body["source"], "vidu-worker");
        assert_eq!(e.body["subject"], "order-1234");
        assert_eq!(e.body["datacontenttype"], "application/json");
        assert!(
            chrono::DateTime::parse_from_rfc3339(e.body["time"].as_str().expect("time")).is_ok()
        );
        assert_eq!(e.routing_key, e.kind(), "routing key = type");
        assert_eq!(e.message_id.as_deref(), Some(e.id()), "message_id = id");
        assert_eq!(e.correlation_id.as_deref(), Some("corr-77"));
        assert_eq!(e.content_type.as_deref(), Some(CONTENT_TYPE));
        assert_eq!(e.delivery_mode, Some(2), "persistent");
        assert_eq!(e.body["data"]["request_id"], "order-1234");
        assert_eq!(
            e.body["data"]["metadata"],
            json!({"user": 42, "tags": ["a", "b"]})
        );
    }
    let submitted = &events[0];
    let task_id = submitted.body["data"]["task_id"]
        .as_str()
        .expect("task id")
        .to_owned();
    assert_eq!(submitted.body["data"]["model"], "vidu-q3-pro-i2v");
    let progress = events
        .iter()
        .find(|e| e.kind() == PROGRESS)
        .expect("progress");
    assert!(matches!(
        progress.body["data"]["status"].as_str(),
        Some("queued" | "processing")
    ));
    assert!(progress.body["data"]["progress_percent"].is_u64());

    let data = &done.body["data"];
    assert_eq!(data["task_id"], task_id.as_str());
    let url = data["video_url"].as_str().expect("video url");
    assert!(
        url.starts_with(&format!("{}/videos/", env.sim.base_url())) && url.contains(&task_id),
        "{url}"
    );
    // The simulator serves the video itself: real, deterministic bytes.
    let body = reqwest::get(url)
        .await
        .expect("video")
        .bytes()
        .await
        .expect("body");
    let plan = env.sim.video_plan();
    assert_eq!(body.len() as u64, plan.bytes);
    assert_eq!(&body[4..8], b"ftyp");
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    assert_eq!(
        hex::encode(digest.as_ref()),
        video_sha256(&task_id, plan.bytes)
    );
    assert_eq!(data["videos"][0]["url"], url);
    assert_eq!(data["videos"][0]["ttl_seconds"], 3600);
    assert_eq!(data["videos"][0]["type"], "mp4");
    let submitted_at =
        chrono::DateTime::parse_from_rfc3339(data["submitted_at"].as_str().expect("s"))
            .expect("rfc3339");
    let completed_at =
        chrono::DateTime::parse_from_rfc3339(data["completed_at"].as_str().expect("c"))
            .expect("rfc3339");
    assert!(completed_at > submitted_at);

    // reply_to received the terminal event, and only that.
    let reply = reply_tap.wait_terminal("order-1234", WAIT).await;
    assert_eq!(reply.id(), done.id());
    assert!(reply_tap.all().iter().all(SeenEvent::is_terminal));

    // The upstream saw exactly the validated input, once.
    let stats = env.sim.stats();
    assert_eq!(stats.tasks_created, 1);
    let task = env.sim.task(&task_id).expect("task known upstream");
    assert_eq!(
        task.request["images"],
        json!(["https://example.com/cat.png"])
    );
    assert_eq!(task.request["duration"], 5);

    // Nothing left behind: request acked, no dead letters, no tickets.
    eventually(WAIT, "empty queues", || async {
        let depth = env.depth(&env.topology.request_queue).await
            + env.depth(&env.topology.tracking_queue).await;
        (depth == 0).then_some(())
    })
    .await;
    assert!(env.drain_dead().await.is_empty());
    assert_eq!(
        worker
            .metric("vidu_worker_requests_received_total", "submitted")
            .await,
        1.0
    );

    // Metrics: every family the contract names, with the right counts.
    let (status, text) = worker.get("/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for family in [
        "vidu_worker_requests_received_total{outcome=\"submitted\"} 1".to_owned(),
        "vidu_worker_upstream_calls_total{endpoint=\"create\",status=\"200\"} 1".to_owned(),
        format!("vidu_worker_events_published_total{{type=\"{SUCCEEDED}\"}} 1"),
        format!("vidu_worker_events_published_total{{type=\"{SUBMITTED}\"}} 1"),
        "vidu_worker_tasks_tracked ".to_owned(),
        "vidu_worker_request_to_terminal_seconds_count 1".to_owned(),
        "vidu_worker_request_to_terminal_seconds_bucket{le=".to_owned(),
        "vidu_worker_polls_total{result=\"succeeded\"} 1".to_owned(),
    ] {
        assert!(text.contains(&family), "{family} missing from:\n{text}");
    }
    assert!(text.contains("upstream_calls_total{endpoint=\"task_result\",status=\"200\"}"));

    // Logs: JSON lines; those about the request carry its ids as fields.
    let logs = worker.logs();
    let finished = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "request finished")
        .expect("a JSON log line for the finished request");
    assert_eq!(finished["span"]["request_id"], "order-1234");
    assert_eq!(finished["span"]["task_id"], task_id.as_str());
    assert!(
        logs.iter()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "every line is JSON"
    );
    assert!(
        !logs.iter().any(|l| l.contains("\"level\":\"ERROR\"")),
        "no errors on the happy path: {logs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_are_deterministic_across_redelivery() {
    // A worker holds a ticket, unacknowledged, while the broker refuses the
    // request's terminal event, and is killed: the broker redelivers that
    // same ticket, and another worker process ends the request. Its
    // terminal event has the id of the one the first worker tried to
    // publish.
    // Generation outlasts setting up the refusal, so the first worker's
    // terminal event is refused.
    let env = TestEnv::new("ids", sim(Duration::from_secs(5))).await;
    let tap = env.tap().await;
    let first = env.start_worker().await;
    env.publish(&request("same-id", "redelivered")).await;
    eventually(WAIT, "the task submitted", || async {
        tap.for_subject("same-id")
            .iter()
            .any(|e| e.kind() == SUBMITTED)
            .then_some(())
    })
    .await;
    let refusing = refuse_events(&env).await;
    // A refused publish still reaches the other queues bound (the tap):
    // the first worker's attempts show there, unconfirmed.
    let tried = eventually(
        WAIT,
        "the first worker's refused terminal event",
        || async {
            tap.for_subject("same-id")
                .into_iter()
                .find(SeenEvent::is_terminal)
        },
    )
    .await;
    assert_eq!(
        first
            .metric("vidu_worker_events_published_total", SUCCEEDED)
            .await,
        0.0,
        "not confirmed, so the ticket is still held"
    );
    first.kill9().await;

    // The broker hands the same ticket back, marked redelivered (looked at
    // here and handed back again, not republished).
    let back = eventually(WAIT, "the ticket back in the tracking queue", || async {
        env.channel
            .basic_get(
                env.topology.tracking_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .expect("basic_get")
    })
    .await;
    let ticket: Value = serde_json::from_slice(&back.delivery.data).expect("a ticket");
    assert!(back.delivery.redelivered, "redelivered: {ticket}");
    assert_eq!(ticket["request_id"], "same-id");
    back.delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
        .expect("hand the ticket back");

    env.channel
        .queue_delete(refusing.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("lift the refusal");
    let second = env.start_worker().await;
    eventually(WAIT, "the second worker's terminal event", || async {
        let confirmed = second
            .metric("vidu_worker_events_published_total", SUCCEEDED)
            .await;
        // Built again by the second worker: a later `time`.
        let rebuilt = tap
            .for_subject("same-id")
            .iter()
            .any(|e| e.is_terminal() && e.body["time"] != tried.body["time"]);
        (confirmed >= 1.0 && rebuilt).then_some(())
    })
    .await;
    let terminal: Vec<SeenEvent> = tap
        .for_subject("same-id")
        .into_iter()
        .filter(SeenEvent::is_terminal)
        .collect();
    assert!(
        terminal.iter().all(|e| e.id() == tried.id()),
        "one id across both workers: {:?}",
        terminal
            .iter()
            .map(|e| (e.id(), e.body["time"].clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(terminal.last().map(SeenEvent::kind), Some(SUCCEEDED));
}

/// (request body, AMQP message_id, expected field named in the error)
fn invalid_cases() -> Vec<(Vec<u8>, Option<&'static str>, &'static str)> {
    let img = json!(["https://example.com/cat.png"]);
    let mut cases: Vec<(Value, &'static str)> = vec![
        (
            json!({"request_id": "bad-dur", "input": {"images": img, "duration": 17}}),
            "input.duration",
        ),
        (
            json!({"request_id": "bad-dur0", "input": {"images": img, "duration": 0}}),
            "input.duration",
        ),
        (
            json!({"request_id": "bad-dur-str", "input": {"images": img, "duration": "5"}}),
            "input.duration",
        ),
        (
            json!({"request_id": "bad-dur-float", "input": {"images": img, "duration": 5.5}}),
            "input.duration",
        ),
        (
            json!({"request_id": "bad-seed", "input": {"images": img, "seed": 2147483648u64}}),
            "input.seed",
        ),
        (
            json!({"request_id": "bad-seed-neg", "input": {"images": img, "seed": -1}}),
            "input.seed",
        ),
        (
            json!({"request_id": "bad-res", "input": {"images": img, "resolution": "4k"}}),
            "input.resolution",
        ),
        (
            json!({"request_id": "bad-ar", "input": {"images": img, "aspect_ratio": "2:1"}}),
            "input.aspect_ratio",
        ),
        (
            json!({"request_id": "bad-style", "input": {"images": img, "style": "noir"}}),
            "input.style",
        ),
        (
            json!({"request_id": "bad-wm", "input": {"images": img, "wm_position": "center"}}),
            "input.wm_position",
        ),
        (
            json!({"request_id": "bad-audio", "input": {"images": img, "audio": "ftp://x/a.mp3"}}),
            "input.audio",
        ),
        (
            json!({"request_id": "bad-wmurl", "input": {"images": img, "wm_url": "not a url"}}),
            "input.wm_url",
        ),
        (
            json!({"request_id": "bad-rec", "input": {"images": img, "is_rec": "yes"}}),
            "input.is_rec",
        ),
        (
            json!({"request_id": "bad-offpeak", "input": {"images": img, "off_peak": 1}}),
            "input.off_peak",
        ),
        (
            json!({"request_id": "bad-watermark", "input": {"images": img, "watermark": null, "off_peak": "no"}}),
            "input.off_peak",
        ),
        (
            json!({"request_id": "bad-prompt", "input": {"images": img, "prompt": "x".repeat(1501)}}),
            "input.prompt",
        ),
        (
            json!({"request_id": "bad-prompt-type", "input": {"images": img, "prompt": 5}}),
            "input.prompt",
        ),
        (
            json!({"request_id": "no-images", "input": {"prompt": "hi"}}),
            "input.images",
        ),
        (
            json!({"request_id": "two-images", "input": {"images": ["https://a/1.png", "https://a/2.png"]}}),
            "input.images",
        ),
        (
            json!({"request_id": "images-str", "input": {"images": "https://a/1.png"}}),
            "input.images",
        ),
        (
            json!({"request_id": "bad-ext", "input": {"images": ["https://a/1.gif"]}}),
            "input.images[0]",
        ),
        (
            json!({"request_id": "bad-scheme", "input": {"images": ["file:///etc/passwd.png"]}}),
            "input.images[0]",
        ),
        (
            json!({"request_id": "unknown-input", "input": {"images": img, "fps": 30}}),
            "input.fps",
        ),
        (
            json!({"request_id": "unknown-top", "input": {"images": img}, "callback": "x"}),
            "callback",
        ),
        (
            json!({"request_id": "bad-model", "model": "vidu-q1", "input": {"images": img}}),
            "model",
        ),
        (json!({"request_id": "no-input"}), "input"),
        (json!({"request_id": "input-array", "input": [1]}), "input"),
        (
            json!({"request_id": "meta-array", "input": {"images": img}, "metadata": [1]}),
            "metadata",
        ),
        (
            json!({"request_id": "meta-big", "input": {"images": img}, "metadata": {"k": "x".repeat(17 * 1024)}}),
            "metadata",
        ),
        (
            json!({"request_id": "bad id with spaces", "input": {"images": img}}),
            "request_id",
        ),
        (
            json!({"request_id": "x".repeat(129), "input": {"images": img}}),
            "request_id",
        ),
        (
            json!({"request_id": 42, "input": {"images": img}}),
            "request_id",
        ),
    ];
    let mut out: Vec<(Vec<u8>, Option<&'static str>, &'static str)> = cases
        .drain(..)
        .map(|(v, f)| (serde_json::to_vec(&v).expect("json"), None, f))
        .collect();
    out.push((b"this is not json".to_vec(), Some("raw-not-json"), "body"));
    out.push((b"[1,2,3]".to_vec(), Some("raw-array"), "body"));
    out.push((b"".to_vec(), Some("raw-empty"), "body"));
    out.push((vec![0xff, 0xfe, b'{'], Some("raw-utf8"), "body"));
    out.push((vec![b' '; 1024 * 1024 + 1], Some("raw-oversize"), "body"));
    out.push((vec![b'{'; 5 * 1024 * 1024], Some("raw-5mib"), "body"));
    out.push((
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        Some("raw-deep"),
        "body",
    ));
    out.push((
        br#"{"input": {"images": ["https://a/1.png"]}}"#.to_vec(),
        Some("bad message id!"),
        "message_id",
    ));
    out
}

#[tokio::test]
async fn every_invalid_request_fails_cleanly_and_never_reaches_the_upstream() {
    let env = TestEnv::new("invalid", sim(Duration::from_millis(300))).await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let cases = invalid_cases();

    // Interleave a valid request between invalid ones: it must still succeed.
    env.publish(&request("valid-before", "ok")).await;
    for (body, message_id, _) in &cases {
        let mut props = BasicProperties::default();
        if let Some(mid) = message_id {
            props = props.with_message_id((*mid).into());
        }
        env.publish_raw(body, props.with_correlation_id("corr-bad".into()))
            .await;
    }
    env.publish(&request("valid-after", "ok")).await;

    let expected_failures = cases.len();
    eventually(WAIT, "a failed event per invalid request", || async {
        let failed = tap
            .terminal()
            .into_iter()
            .filter(|e| e.kind() == FAILED)
            .count();
        (failed >= expected_failures).then_some(())
    })
    .await;
    tap.wait_terminal("valid-before", WAIT).await;
    tap.wait_terminal("valid-after", WAIT).await;

    let failed: Vec<SeenEvent> = tap
        .terminal()
        .into_iter()
        .filter(|e| e.kind() == FAILED)
        .collect();
    assert_eq!(
        failed.len(),
        expected_failures,
        "exactly one failed event each"
    );
    for (body, message_id, field) in &cases {
        // Find this case's event: by the body's request id when it had a valid
        // one, else by message id, else by the field in the message.
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let rid = parsed
            .as_ref()
            .and_then(|v| v["request_id"].as_str())
            .filter(|r| vidu_worker::request::RequestId::parse(r).is_ok())
            .map(str::to_owned)
            .or_else(|| {
                message_id
                    .filter(|m| vidu_worker::request::RequestId::parse(m).is_ok())
                    .map(str::to_owned)
            });
        let event = match &rid {
            Some(rid) => failed.iter().find(|e| e.subject() == rid),
            None => failed.iter().find(|e| {
                e.body["data"]["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&format!("{field}:")))
            }),
        }
        .unwrap_or_else(|| panic!("no failed event for case {field} ({rid:?})"));
        let error = &event.body["data"]["error"];
        assert_eq!(error["code"], "invalid_request", "{field}");
        let message = error["message"].as_str().expect("message");
        assert!(
            message.starts_with(&format!("{field}:")),
            "{field}: {message}"
        );
        assert!(event.body["data"]["task_id"].is_null());
        assert_eq!(event.correlation_id.as_deref(), Some("corr-bad"));
    }

    // Every invalid message is in the dead-letter queue with why: byte for
    // byte, except a body over the request limit, whose copy is empty (the
    // broker would otherwise carry the oversize body twice).
    eventually(WAIT, "all dead letters", || async {
        let d = env.depth(&env.topology.dead_queue).await as usize;
        (d >= expected_failures).then_some(())
    })
    .await;
    let dead = env.drain_dead().await;
    assert_eq!(dead.len(), expected_failures);
    for (body, message_id, field) in &cases {
        let oversize = body.len() > vidu_worker::request::MAX_BODY_BYTES;
        let entry = dead
            .iter()
            .find(|(_, b, p)| {
                if oversize {
                    b.is_empty() && p.message_id().as_ref().map(|m| m.as_str()) == *message_id
                } else {
                    b == body
                }
            })
            .unwrap_or_else(|| panic!("{field} ({message_id:?}) not dead-lettered"));
        let why = entry.0.get(ERROR_HEADER).expect("an error header");
        assert!(
            why.starts_with(&format!("invalid_request: {field}:")),
            "{why}"
        );
    }

    // Zero upstream calls for them: only the two valid requests were created.
    let stats = env.sim.stats();
    assert_eq!(stats.create_calls, 2, "{stats:?}");
    assert_eq!(env.depth(&env.topology.request_queue).await, 0);
    assert_eq!(
        worker
            .metric("vidu_worker_requests_received_total", "invalid")
            .await as usize,
        expected_failures
    );
    // The worker never exited.
    assert_eq!(
        worker.get("/healthz").await.map(|(code, _)| code),
        Some(200)
    );
}

#[tokio::test]
async fn upstream_refusals_failures_and_timeouts_end_in_failed_events() {
    let env = TestEnv::with("refusals", sim(Duration::from_millis(500)), |s| {
        s.polling.max_task_age = Duration::from_secs(3);
    })
    .await;
    let tap = env.tap().await;
    let _worker = env.start_worker().await;
    env.publish(&request(
        "rejected",
        "[sim:reject=the prompt breaks the content policy]",
    ))
    .await;
    env.publish(&request("failed", "[sim:fail=the image shows no subject]"))
        .await;
    env.publish(&request("failed500", "[sim:fail500]")).await;
    env.publish(&request("too-slow", "[sim:gen=60s]")).await;
    env.publish(&request("fine", "a calm lake")).await;

    let rejected = tap.wait_terminal("rejected", WAIT).await;
    assert_eq!(rejected.kind(), FAILED);
    assert_eq!(rejected.body["data"]["error"]["code"], "upstream_rejected");
    let msg = rejected.body["data"]["error"]["message"]
        .as_str()
        .expect("msg");
    assert!(
        msg.contains("400") && msg.contains("the prompt breaks the content policy"),
        "{msg}"
    );
    assert!(rejected.body["data"]["task_id"].is_null());

    let failed = tap.wait_terminal("failed", WAIT).await;
    assert_eq!(failed.body["data"]["error"]["code"], "upstream_failed");
    assert_eq!(
        failed.body["data"]["error"]["message"],
        "the image shows no subject"
    );
    assert!(failed.body["data"]["task_id"].is_string());

    let failed500 = tap.wait_terminal("failed500", WAIT).await;
    assert_eq!(failed500.body["data"]["error"]["code"], "upstream_failed");

    let slow = tap.wait_terminal("too-slow", WAIT).await;
    assert_eq!(slow.body["data"]["error"]["code"], "timed_out");
    assert!(slow.body["data"]["task_id"].is_string());

    assert_eq!(tap.wait_terminal("fine", WAIT).await.kind(), SUCCEEDED);

    // The rejected request was not retried, and it is in the dead-letter queue.
    assert_eq!(
        env.sim.stats().responses.get("create:400").copied(),
        Some(1)
    );
    let dead = env.drain_dead().await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].0[ERROR_HEADER].starts_with("upstream_rejected:"),
        "{:?}",
        dead[0].0
    );
}

#[tokio::test]
async fn off_peak_requests_get_the_longer_deadline() {
    let env = TestEnv::with("offpeak", sim(Duration::from_millis(300)), |s| {
        s.polling.max_task_age = Duration::from_secs(2);
        s.polling.max_off_peak_task_age = Duration::from_secs(120);
    })
    .await;
    let tap = env.tap().await;
    let _worker = env.start_worker().await;
    let mut body = request("night", "[sim:gen=4s]");
    body["input"]["off_peak"] = json!(true);
    env.publish(&body).await;
    env.publish(&request("day", "[sim:gen=4s]")).await;
    assert_eq!(tap.wait_terminal("night", WAIT).await.kind(), SUCCEEDED);
    let day = tap.wait_terminal("day", WAIT).await;
    assert_eq!(day.body["data"]["error"]["code"], "timed_out");
}

#[tokio::test]
async fn transient_upstream_errors_are_retried_until_success() {
    let env = TestEnv::new("transient", sim(Duration::from_millis(500))).await;
    env.sim.set_faults(FaultPlan {
        create: EndpointFaults {
            script: vec![
                "429".parse().expect("f"),
                "503".parse().expect("f"),
                "500".parse().expect("f"),
                "502".parse().expect("f"),
            ],
            ..EndpointFaults::default()
        },
        poll: EndpointFaults {
            script: vec![
                "429".parse().expect("f"),
                "504".parse().expect("f"),
                "500".parse().expect("f"),
            ],
            ..EndpointFaults::default()
        },
    });
    let tap = env.tap().await;
    let _worker = env.start_worker().await;
    env.publish(&request("stubborn", "retry me")).await;
    let done = tap.wait_terminal("stubborn", WAIT).await;
    assert_eq!(done.kind(), SUCCEEDED);
    let stats = env.sim.stats();
    assert_eq!(stats.tasks_created, 1, "{stats:?}");
    assert_eq!(stats.create_calls, 5, "4 faults then success: {stats:?}");
    assert_eq!(stats.responses.get("create:429").copied(), Some(1));
    assert_eq!(stats.responses.get("poll:504").copied(), Some(1));
}

#[tokio::test]
async fn two_workers_share_the_queue_and_each_request_ends_once() {
    let env = TestEnv::with("scaleout", sim(Duration::from_millis(800)), |s| {
        s.amqp.prefetch = 4;
    })
    .await;
    let tap = env.tap().await;
    let a = env.start_worker().await;
    let b = env.start_worker().await;
    let n = 60;
    for i in 0..n {
        env.publish(&request(&format!("shared-{i}"), "two workers"))
            .await;
    }
    tap.wait_finished(n, WAIT).await;
    // Nothing left that could end a request again (no request or ticket
    // queued, parked or held), and every event the workers confirmed has
    // reached the tap: only then is a count of terminal events exact.
    let mut queues = vec![
        env.topology.request_queue.clone(),
        env.topology.tracking_queue.clone(),
    ];
    queues.extend(env.topology.wait_queues.iter().map(|(_, q)| q.clone()));
    eventually(WAIT, "no request or ticket left anywhere", || async {
        for q in &queues {
            if env.depth(q).await > 0 {
                return None;
            }
        }
        for w in [&a, &b] {
            let held = w.metric("vidu_worker_in_flight_requests", "").await
                + w.metric("vidu_worker_in_flight_tickets", "").await;
            if held > 0.0 {
                return None;
            }
        }
        Some(())
    })
    .await;
    eventually(WAIT, "every confirmed event at the tap", || async {
        let confirmed = a
            .metric("vidu_worker_events_published_total", "type=")
            .await
            + b.metric("vidu_worker_events_published_total", "type=")
                .await;
        (tap.all().len() as f64 >= confirmed).then_some(())
    })
    .await;
    let terminal = tap.terminal();
    assert_eq!(
        terminal.len(),
        n,
        "exactly one terminal event per request, no duplicates: {:?}",
        terminal.iter().map(SeenEvent::subject).collect::<Vec<_>>()
    );

    let mut ids: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for e in &terminal {
        ids.entry(e.subject().to_owned())
            .or_default()
            .insert(e.id().to_owned());
    }
    assert_eq!(ids.len(), n);
    for (subject, set) in &ids {
        assert_eq!(set.len(), 1, "{subject} has {} terminal ids", set.len());
    }
    let by_a = a
        .metric("vidu_worker_requests_received_total", "submitted")
        .await;
    let by_b = b
        .metric("vidu_worker_requests_received_total", "submitted")
        .await;
    assert_eq!(by_a + by_b, n as f64);
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "both take requests: {by_a} / {by_b}"
    );
    let polls_a = a.metric("vidu_worker_polls_total", "").await;
    let polls_b = b.metric("vidu_worker_polls_total", "").await;
    assert!(
        polls_a > 0.0 && polls_b > 0.0,
        "both track tasks: {polls_a} / {polls_b}"
    );
    assert_eq!(env.sim.stats().tasks_created, n as u64);
}
