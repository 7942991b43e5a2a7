//! The command line as a user meets it: the README's demo command, `submit`
//! with and without `--wait`, `check`, and configuration errors (exit 2, one
//! line naming the key).

use std::{process::Stdio, time::Duration};

use crate::common::*;
use serde_json::Value;
use tokio::process::Command;
use vidu_worker::{
    config::{API_KEY_ENV, ENV_PREFIX},
    events::{FAILED, SUCCEEDED},
};

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vidu-worker"));
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with(ENV_PREFIX) || k == API_KEY_ENV {
            cmd.env_remove(k);
        }
    }
    cmd
}

async fn output(mut cmd: Command, timeout: Duration) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .expect("command finished in time")
        .expect("command ran");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_configuration_exits_2_with_one_line_naming_the_key() {
    let cases = [
        ("VIDU_WORKER__AMQP__PREFETCH", "many", "amqp.prefetch"),
        (
            "VIDU_WORKER__POLLING__MAX_TASK_AGE",
            "forever",
            "polling.max_task_age",
        ),
        (
            "VIDU_WORKER__UPSTREAM__BASE_URL",
            "ftp://x",
            "upstream.base_url",
        ),
        ("VIDU_WORKER__LOG__FORMAT", "yaml", "log.format"),
        ("VIDU_WORKER__NOT__A_KEY", "1", "not"),
    ];
    for (var, value, key) in cases {
        for command in ["run", "check", "demo"] {
            let mut cmd = binary();
            cmd.arg(command).env(var, value);
            let (code, stdout, stderr) = output(cmd, Duration::from_secs(20)).await;
            assert_eq!(code, Some(2), "{command} with {var}={value}: {stderr}");
            assert!(stdout.is_empty(), "{stdout}");
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "one line: {stderr}");
            assert!(lines[0].contains(key), "{key} named in {stderr}");
        }
    }
    // run needs a key.
    let mut cmd = binary();
    cmd.arg("run");
    let (code, _, stderr) = output(cmd, Duration::from_secs(20)).await;
    assert_eq!(code, Some(2));
    assert!(
        stderr
            .trim()
            .starts_with("configuration error: upstream.api_key"),
        "{stderr}"
    );
    // --config must exist.
    let mut cmd = binary();
    cmd.args(["--config", "does-not-exist.toml", "check"]);
    let (code, _, stderr) = output(cmd, Duration::from_secs(20)).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--config"), "{stderr}");
}

#[tokio::test]
async fn the_demo_prints_a_succeeded_event_with_a_video_url() {
    let mut cmd = binary();
    cmd.args(["demo", "--generation-time", "1s"]);
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(120)).await;
    assert_eq!(code, Some(0), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("── {SUCCEEDED}")), "{stdout}");
    assert!(stdout.contains("\"video_url\": \"https://"), "{stdout}");
    assert!(stdout.contains(&format!("── {FAILED}")), "{stdout}");
    assert!(stdout.contains("invalid_request"), "{stdout}");
    assert!(stdout.contains("upstream_failed"), "{stdout}");
    assert!(
        stdout.contains("vidu_worker_requests_received_total"),
        "metrics printed: {stdout}"
    );
    assert_eq!(stdout.matches("\n  ok   demo-").count(), 6, "{stdout}");
    for model in ["vidu-q3-pro-i2v", "vidu-q3-turbo-t2v", "vidu-q3-pro-f2v"] {
        assert!(
            stdout.contains(&format!("({model}): {SUCCEEDED}")),
            "{model} succeeded: {stdout}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[tokio::test]
async fn submit_publishes_and_waits_for_the_terminal_event() {
    let env = TestEnv::new("submit", sim(Duration::from_millis(800))).await;
    let _worker = env.start_worker().await;
    let envs = env.worker_env();

    // Without --wait: prints the request id, the request is queued.
    let mut cmd = binary();
    cmd.args([
        "submit",
        "--image",
        "https://example.com/cat.png",
        "--prompt",
        "blink",
    ])
    .envs(envs.clone());
    let tap = env.tap().await;
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stderr}");
    let request_id = stdout.trim().to_owned();
    assert!(
        vidu_worker::request::RequestId::parse(&request_id).is_ok(),
        "{stdout}"
    );
    assert_eq!(
        tap.wait_terminal(&request_id, Duration::from_secs(30))
            .await
            .kind(),
        SUCCEEDED
    );

    // --wait, not a terminal: request id, then the final event as one JSON line; progress on stderr.
    let mut cmd = binary();
    cmd.args([
        "submit",
        "--image",
        "https://example.com/cat.png",
        "--duration",
        "4",
        "--resolution",
        "1080p",
        "--aspect-ratio",
        "9:16",
        "--wait",
    ])
    .envs(envs.clone());
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let event: Value = serde_json::from_str(lines[1]).expect("final event is JSON");
    assert_eq!(event["type"], SUCCEEDED);
    assert_eq!(event["subject"], lines[0]);
    assert!(event["data"]["video_url"]
        .as_str()
        .is_some_and(|u| u.starts_with("https://")));
    assert!(stderr.contains("submitted: task"), "{stderr}");
    assert!(
        stderr.contains("processing") || stderr.contains("queued"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\r'),
        "plain progress lines when not a terminal"
    );
    let task = env
        .sim
        .task(event["data"]["task_id"].as_str().expect("task"))
        .expect("task");
    assert_eq!(task.request["resolution"], "1080p");
    assert_eq!(task.request["aspect_ratio"], "9:16");

    // --wait on a request that fails upstream: exit 1 with the failed event.
    let dir = tempdir();
    let file = dir.join("req.json");
    std::fs::write(
        &file,
        r#"{"request_id": "cli-fails", "input": {"images": ["https://example.com/a.jpg"], "prompt": "[sim:fail]"}, "metadata": {"from": "file"}}"#,
    )
    .expect("write");
    let mut cmd = binary();
    cmd.args(["submit", "--json"])
        .arg(&file)
        .arg("--wait")
        .envs(envs.clone());
    let (code, stdout, _) = output(cmd, Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "{stdout}");
    let event: Value =
        serde_json::from_str(stdout.lines().nth(1).expect("event line")).expect("json");
    assert_eq!(event["type"], FAILED);
    assert_eq!(event["data"]["metadata"]["from"], "file");

    // An invalid request is refused before it is published.
    let mut cmd = binary();
    cmd.args(["submit", "--image", "https://example.com/a.gif"])
        .envs(envs.clone());
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(20)).await;
    assert_eq!(code, Some(2));
    assert!(stdout.is_empty());
    assert!(stderr.contains("input.images[0]"), "{stderr}");

    // --timeout: exit 3 when nothing arrives in time.
    let mut cmd = binary();
    cmd.args([
        "submit",
        "--image",
        "https://example.com/a.png",
        "--prompt",
        "[sim:gen=30s]",
        "--wait",
        "--timeout",
        "1s",
    ])
    .envs(envs);
    let (code, _, stderr) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(3), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn submit_wait_shows_live_progress_on_a_terminal() {
    // `script` runs the command on a pseudo-terminal.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("the `script` command (util-linux) is needed for this test");
    }
    let env = TestEnv::new("tty", sim(Duration::from_secs(2))).await;
    let _worker = env.start_worker().await;
    let command = format!(
        "{} submit --image https://example.com/cat.png --wait",
        env!("CARGO_BIN_EXE_vidu-worker")
    );
    let mut script = Command::new("script");
    script
        .args(["-qec", &command, "/dev/null"])
        .envs(env.worker_env())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let (code, stdout, _) = output(script, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("\r\x1b[2K"),
        "progress redrawn in place: {stdout:?}"
    );
    assert!(stdout.contains("processing"), "{stdout:?}");
    assert!(
        stdout.contains(&format!("\"type\": \"{SUCCEEDED}\"")),
        "pretty JSON at the end: {stdout:?}"
    );
}

#[tokio::test]
async fn check_reports_each_part() {
    let env = TestEnv::new("check", sim(Duration::from_millis(100))).await;
    let mut cmd = binary();
    cmd.arg("check").envs(env.worker_env());
    let (code, stdout, _) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("ok   broker"), "{stdout}");
    assert!(stdout.contains("accepts the API key"), "{stdout}");
    assert!(
        !stdout.contains("guest:guest"),
        "no password in output: {stdout}"
    );

    env.sim
        .set_auth(vidu_worker::simulator::AuthMode::Reject403);
    let mut cmd = binary();
    cmd.arg("check").envs(env.worker_env());
    let (code, stdout, _) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAIL upstream"), "{stdout}");

    let mut cmd = binary();
    cmd.arg("check").env(
        "VIDU_WORKER__AMQP__URL",
        "amqp://guest:guest@127.0.0.1:1/%2f",
    );
    let (code, stdout, _) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAIL broker"), "{stdout}");
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vidu-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn submit_picks_the_model_and_its_images_and_audio() {
    let env = TestEnv::new("submit-models", sim(Duration::from_millis(300))).await;
    let _worker = env.start_worker().await;
    let envs = env.worker_env();
    let tap = env.tap().await;
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "vidu-q3-pro-f2v",
            vec![
                "--image",
                "https://example.com/bud.png",
                "--image",
                "https://example.com/flower.png",
                "--no-audio",
            ],
        ),
        (
            "vidu-q3-turbo-t2v",
            vec!["--prompt", "a lighthouse at dusk", "--audio"],
        ),
        (
            "vidu-q3-pro-i2v",
            vec![
                "--image",
                "https://example.com/cat.png",
                "--audio-url",
                "https://example.com/music.mp3",
            ],
        ),
    ];
    for (model, args) in &cases {
        let mut cmd = binary();
        cmd.args(["submit", "--model", model])
            .args(args)
            .envs(envs.clone());
        let (code, stdout, stderr) = output(cmd, Duration::from_secs(30)).await;
        assert_eq!(code, Some(0), "{model}: {stderr}");
        let request_id = stdout.trim().to_owned();
        let done = tap
            .wait_terminal(&request_id, Duration::from_secs(30))
            .await;
        assert_eq!(done.kind(), SUCCEEDED, "{model}: {}", done.body);
    }
    // What reached the upstream: each model's path, with the flags' values.
    let calls = env.sim.calls();
    for (model, _) in &cases {
        assert!(
            calls.iter().any(|c| c.model.as_deref() == Some(*model)),
            "{model}: {calls:?}"
        );
    }
    // A body the model refuses is refused by submit itself, before publishing.
    let mut cmd = binary();
    cmd.args([
        "submit",
        "--model",
        "vidu-q3-pro-f2v",
        "--image",
        "https://example.com/a.png",
    ])
    .envs(envs.clone());
    let (code, _, stderr) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("input.images: must hold exactly two images"),
        "{stderr}"
    );
}
