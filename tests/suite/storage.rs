//! Videos kept: every paid video copied into the user's bucket before the
//! `succeeded` event, against a real S3-compatible server (`s3s-fs`, started
//! by the test kit) and the simulator's real video bytes over HTTP. Each
//! test counts what the simulator created and what the bucket holds.

use std::time::Duration;

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use vidu_test_kit::*;
use vidu_worker::{
    events::{FAILED, SUCCEEDED},
    simulator::{video_sha256, VideoPlan},
};

const MIB: u64 = 1024 * 1024;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A deployment whose worker stores into `s3`, with `extra` settings.
async fn worker(env: &TestEnv, s3: &S3Server, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut vars = s3.worker_env();
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env.start_worker_with(&env_refs(&vars)).await
}

fn data(event: &SeenEvent) -> &Value {
    &event.body["data"]
}

/// The event matches its published JSON Schema (`docs/schemas/`).
fn matches_schema(event: &SeenEvent) {
    let file = match event.kind() {
        SUCCEEDED => "docs/schemas/event-succeeded.json",
        _ => "docs/schemas/event-failed.json",
    };
    let validator = crate::interface_docs::compile(file);
    let problems = crate::files::violations(&validator, &event.body);
    assert!(problems.is_empty(), "{file}: {problems:?}\n{}", event.body);
}

/// Every video is in the bucket under `<request_id>/<task_id>-<n>.mp4`,
/// byte for byte what the upstream served (SHA-256 and size in the event
/// match the object and the simulator's video), in several parts
/// (multipart, 5 MiB parts), with a presigned URL that serves it; no
/// multipart upload is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_video_is_stored_with_its_checksum_under_the_contract_s_key() {
    let env = TestEnv::new("storekeys", sim(Duration::from_millis(500))).await;
    let bytes = 11 * MIB + 123;
    env.sim.set_video_plan(VideoPlan {
        bytes,
        ..VideoPlan::default()
    });
    let s3 = S3Server::start().await;
    let tap = env.tap().await;
    let _w = worker(
        &env,
        &s3,
        &[
            ("VIDU_WORKER__STORAGE__PART_SIZE", "5242880"),
            ("VIDU_WORKER__STORAGE__PRESIGN", "1h"),
            ("VIDU_WORKER__STORAGE__PREFIX", "kept/"),
        ],
    )
    .await;
    env.publish(&request("keep-1", "one video")).await;
    env.publish(&request("keep-2", "two videos [sim:videos=2]"))
        .await;
    tap.wait_finished(2, Duration::from_secs(120)).await;
    tap.assert_all_succeeded();
    let mut keys = Vec::new();
    for (id, videos) in [("keep-1", 1), ("keep-2", 2)] {
        let done = tap.wait_terminal(id, Duration::from_secs(1)).await;
        let task_id = data(&done)["task_id"].as_str().expect("task id").to_owned();
        matches_schema(&done);
        let stored = data(&done)["stored"].as_array().expect("stored").clone();
        assert_eq!(stored.len(), videos, "{id}: one copy per video");
        for (n, copy) in stored.iter().enumerate() {
            let key = format!("kept/{id}/{task_id}-{n}.mp4");
            assert_eq!(copy["bucket"], BUCKET);
            assert_eq!(copy["key"], key.as_str());
            assert_eq!(copy["size"], bytes);
            let expected = video_sha256(&task_id, bytes);
            assert_eq!(copy["sha256"], expected.as_str(), "{key}");
            assert!(copy["etag"].as_str().is_some_and(|e| !e.is_empty()));
            let object = s3.object(&key).expect("the object is in the bucket");
            assert_eq!(object.len() as u64, bytes);
            assert_eq!(
                sha256(&object),
                expected,
                "{key}: the bucket holds the upstream's bytes"
            );
            let url = copy["url"].as_str().expect("a presigned URL");
            assert!(copy["url_expires_at"].is_string());
            let fetched = reqwest::get(url).await.expect("presigned GET");
            assert_eq!(fetched.status(), 200, "the presigned URL serves the copy");
            let fetched = fetched.bytes().await.expect("body");
            assert_eq!(sha256(&fetched), expected);
            keys.push(key);
        }
    }
    keys.sort();
    assert_eq!(s3.keys(), keys, "nothing else in the bucket");
    assert_eq!(s3.upload_leftovers(), 0, "no multipart upload left behind");
    assert_eq!(env.sim.stats().tasks_created, 2);
}

/// The store is down for 20 s while tasks finish: nothing fails, every
/// video is stored once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_outage_of_20_s_while_tasks_finish_fails_nothing() {
    let env = TestEnv::new("storeoutage", sim(Duration::from_secs(1))).await;
    let mut s3 = S3Server::start().await;
    let tap = env.tap().await;
    let w = worker(&env, &s3, &[]).await;
    s3.stop();
    let n = 5;
    for i in 0..n {
        env.publish(&request(&format!("outage-{i}"), "during an outage"))
            .await;
    }
    // The tasks finish upstream within a few seconds; their copies fail.
    eventually(
        Duration::from_secs(30),
        "copies failing while the store is down",
        || async {
            (w.metric("vidu_worker_storage_copies_total", "outcome=\"transient\"")
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        tap.terminal().is_empty(),
        "nothing ends while the store is down"
    );
    s3.restart().await;
    tap.wait_finished(n, Duration::from_secs(120)).await;
    tap.assert_all_succeeded();
    for i in 0..n {
        let done = tap
            .wait_terminal(&format!("outage-{i}"), Duration::from_secs(1))
            .await;
        assert_eq!(data(&done)["stored"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(s3.keys().len(), n);
    assert_eq!(
        env.sim.stats().tasks_created,
        n as u64,
        "nothing created twice"
    );
}

/// The store refuses the credentials: intake pauses (`/readyz` 503 naming
/// the storage, no creates), tickets keep their place, and everything
/// resumes on its own once the store accepts them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_pause_intake_and_resume() {
    let env = TestEnv::new("storerefused", sim(Duration::from_secs(2))).await;
    let s3 = S3Server::start().await;
    let tap = env.tap().await;
    let w = worker(&env, &s3, &[]).await;
    env.publish(&request("cred-0", "created before the refusal"))
        .await;
    env.publish(&request("cred-1", "created before the refusal"))
        .await;
    eventually(Duration::from_secs(30), "two creates", || async {
        (env.sim.stats().tasks_created == 2).then_some(())
    })
    .await;
    // The credentials are revoked while the tasks run.
    s3.accept_only("AKIAOTHERKEY00000000", "another-secret");
    let reason = eventually(
        Duration::from_secs(30),
        "/readyz naming the storage",
        || async {
            match w.get("/readyz").await {
                Some((503, body)) if body.contains("storage") => Some(body),
                _ => None,
            }
        },
    )
    .await;
    assert!(
        !reason.contains(SECRET_KEY) && !reason.contains(ACCESS_KEY),
        "{reason}"
    );
    assert_eq!(w.metric("vidu_worker_storage_refused", "").await, 1.0);
    env.publish(&request("cred-2", "published while refused"))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        env.sim.stats().tasks_created,
        2,
        "no create while the storage refuses us"
    );
    assert!(tap.terminal().is_empty(), "no request ends for the refusal");
    // Accepted again: resumes by itself.
    s3.accept_only(ACCESS_KEY, SECRET_KEY);
    tap.wait_finished(3, Duration::from_secs(120)).await;
    tap.assert_all_succeeded();
    assert_eq!(s3.keys().len(), 3);
    assert_eq!(env.sim.stats().tasks_created, 3);
    assert_eq!(w.metric("vidu_worker_storage_refused", "").await, 0.0);
    assert!(
        w.logs().iter().all(|line| !line.contains(SECRET_KEY)),
        "the storage secret never appears in the logs"
    );
}

/// A source that no longer serves the video (an expired signed URL) is
/// looked up once more, then the request ends `storage_failed` with the
/// upstream's videos; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_source_ends_storage_failed_with_the_videos() {
    let env = TestEnv::new("storeexpired", sim(Duration::from_millis(500))).await;
    env.sim.set_video_plan(VideoPlan {
        expired: true,
        ..VideoPlan::default()
    });
    let s3 = S3Server::start().await;
    let tap = env.tap().await;
    let _w = worker(&env, &s3, &[]).await;
    env.publish(&request("expired-1", "expired")).await;
    let done = tap
        .wait_terminal("expired-1", Duration::from_secs(60))
        .await;
    assert_eq!(done.kind(), FAILED);
    matches_schema(&done);
    assert_eq!(data(&done)["error"]["code"], "storage_failed");
    assert!(data(&done)["task_id"].is_string());
    let videos = data(&done)["videos"]
        .as_array()
        .expect("the upstream's videos");
    assert_eq!(videos.len(), 1);
    assert!(videos[0]["url"]
        .as_str()
        .is_some_and(|u| u.contains("/videos/")));
    assert_eq!(
        env.sim.video_gets(),
        2,
        "the source, and once more after a fresh poll"
    );
    assert!(s3.keys().is_empty());
}

/// VmHWM (peak) and VmRSS of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A 200 MiB video is stored while the worker's peak memory grows by less
/// than 64 MiB (one 5 MiB part at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_video_is_stored_in_bounded_memory() {
    let env = TestEnv::new("storebig", sim(Duration::from_millis(500))).await;
    let bytes = 200 * MIB;
    env.sim.set_video_plan(VideoPlan {
        bytes,
        ..VideoPlan::default()
    });
    let s3 = S3Server::start().await;
    let tap = env.tap().await;
    let w = worker(&env, &s3, &[]).await;
    // A request first, so that the worker's steady state is measured.
    env.sim.set_video_plan(VideoPlan::default());
    env.publish(&request("warm", "small")).await;
    tap.wait_finished(1, Duration::from_secs(60)).await;
    let (_, before) = memory(w.pid());
    env.sim.set_video_plan(VideoPlan {
        bytes,
        ..VideoPlan::default()
    });
    env.publish(&request("big", "200 MiB")).await;
    let done = tap.wait_terminal("big", Duration::from_secs(300)).await;
    assert_eq!(done.kind(), SUCCEEDED, "{}", done.body);
    let (peak, _) = memory(w.pid());
    let task_id = data(&done)["task_id"].as_str().expect("task");
    assert_eq!(data(&done)["stored"][0]["size"], bytes);
    assert_eq!(
        data(&done)["stored"][0]["sha256"],
        video_sha256(task_id, bytes).as_str()
    );
    let grew = peak.saturating_sub(before);
    eprintln!(
        "200 MiB copy: RSS before {} MiB, peak {} MiB, grew {} MiB",
        before / MIB,
        peak / MIB,
        grew / MIB
    );
    assert!(grew < 64 * MIB, "peak RSS grew by {} MiB", grew / MIB);
}

/// Without `storage.allow_private_sources`, a video URL to a private
/// address (as a literal, or a name that resolves to one) or over plain
/// http is never fetched: the request ends `storage_failed` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_on_a_private_address_is_refused() {
    let env = TestEnv::new("storeprivate", sim(Duration::from_millis(500))).await;
    let s3 = S3Server::start().await;
    let tap = env.tap().await;
    let _w = worker(
        &env,
        &s3,
        &[("VIDU_WORKER__STORAGE__ALLOW_PRIVATE_SOURCES", "false")],
    )
    .await;
    let port = env.sim.addr().port();
    let cases = [
        (
            "private-literal",
            format!("https://127.0.0.1:{port}/videos/x.mp4"),
            "not a public address",
        ),
        (
            "private-name",
            format!("https://localhost:{port}/videos/x.mp4"),
            "not a public address",
        ),
        (
            "metadata",
            "https://169.254.169.254/latest/meta-data".to_owned(),
            "not a public address",
        ),
        (
            "plain-http",
            format!("{}/videos/x.mp4", env.sim.base_url()),
            "not https",
        ),
    ];
    for (id, url, _) in &cases {
        env.publish(&request(id, &format!("[sim:video-url={url}]")))
            .await;
    }
    tap.wait_finished(cases.len(), Duration::from_secs(60))
        .await;
    for (id, _, why) in &cases {
        let done = tap.wait_terminal(id, Duration::from_secs(1)).await;
        assert_eq!(done.kind(), FAILED, "{id}");
        assert_eq!(data(&done)["error"]["code"], "storage_failed", "{id}");
        let message = data(&done)["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{id}: {message}");
    }
    assert_eq!(env.sim.video_gets(), 0, "no private source was fetched");
    assert!(s3.keys().is_empty());
}

/// A hostile source on the worker's side of the network (allowed here):
/// it announces 64 KiB and sends 64 MiB, or announces nothing and sends
/// more than the cap. The first is cut off at the announced length (the
/// copy is those bytes), the second ends `storage_failed`; neither is read
/// much past its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_sends_more_than_it_announced_or_the_cap_is_cut_off() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = written.clone();
    let announced: u64 = 64 * 1024;
    let body_head = |n: usize| {
        let mut head = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41".to_vec();
        head.resize(n, 7);
        head
    };
    let head = body_head(1024 * 1024);
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            let head = head.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..n]).into_owned();
                let header = if request.contains("/announced") {
                    format!("HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: {announced}\r\n\r\n")
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nConnection: close\r\n\r\n"
                        .to_owned()
                };
                if socket.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                // Up to 64 MiB, as long as the worker reads.
                for _ in 0..64 {
                    if socket.write_all(&head).await.is_err() {
                        return;
                    }
                    counter.fetch_add(head.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let env = TestEnv::new("storecut", sim(Duration::from_millis(500))).await;
    let s3 = S3Server::start().await;
    let tap = env.tap().await;
    let _w = worker(
        &env,
        &s3,
        &[("VIDU_WORKER__STORAGE__MAX_VIDEO_BYTES", "4194304")],
    )
    .await;
    env.publish(&request(
        "announced",
        &format!("[sim:video-url=http://127.0.0.1:{port}/announced.mp4]"),
    ))
    .await;
    let done = tap
        .wait_terminal("announced", Duration::from_secs(60))
        .await;
    assert_eq!(done.kind(), SUCCEEDED, "{}", done.body);
    let copy = &data(&done)["stored"][0];
    assert_eq!(copy["size"], announced, "cut off at the announced length");
    assert_eq!(
        copy["sha256"],
        sha256(&body_head(announced as usize)).as_str()
    );
    env.publish(&request(
        "endless",
        &format!("[sim:video-url=http://127.0.0.1:{port}/endless.mp4]"),
    ))
    .await;
    let done = tap.wait_terminal("endless", Duration::from_secs(60)).await;
    assert_eq!(done.kind(), FAILED);
    assert_eq!(data(&done)["error"]["code"], "storage_failed");
    let message = data(&done)["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("max_video_bytes"), "{message}");
    server.abort();
    // Socket buffers hold some; the worker reads nothing like 64 MiB.
    let sent = written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent < 40 * MIB,
        "{} MiB were sent before the cut",
        sent / MIB
    );
    assert_eq!(s3.keys().len(), 1, "only the announced copy is stored");
}
