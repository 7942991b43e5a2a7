//! The command line as a user meets it: the README's demo command (also
//! where nothing answers on 127.0.0.1:5672, in a network namespace of its
//! own), `submit` with and without `--wait`, `check`, and configuration
//! errors (exit 2, one line naming the key).

use std::{ffi::OsString, process::Stdio, time::Duration};

use serde_json::Value;
use tokio::process::Command;
use vidu_test_kit::*;
use vidu_worker::{
    cli::demo::PRIVATE_NODE_LINE,
    config::{API_KEY_ENV, ENV_PREFIX},
    events::{FAILED, SUCCEEDED},
    local_broker::Installation,
};

fn binary() -> Command {
    without_worker_env(Command::new(env!("CARGO_BIN_EXE_vidu-worker")))
}

/// A command with none of the worker's variables from this environment.
fn without_worker_env(mut cmd: Command) -> Command {
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
    if let Some(node) = shared_broker().private_node() {
        cmd.env("VIDU_WORKER__AMQP__URL", node.url());
    }
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(120)).await;
    assert_eq!(code, Some(0), "demo failed:\n{stdout}\n{stderr}");
    assert_demo_succeeded(&stdout);
}

/// What the demo prints when every sample ended as expected.
fn assert_demo_succeeded(stdout: &str) {
    assert!(stdout.contains(&format!("── {SUCCEEDED}")), "{stdout}");
    // The simulator serves the video at the URL it names.
    assert!(
        stdout.contains("\"video_url\": \"http://127.0.0.1:"),
        "{stdout}"
    );
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

/// The demo's binary with `args`, run by `unshare -n` in a network
/// namespace of its own, where nothing listens on 127.0.0.1:5672; `None`,
/// after a notice, where no namespace can be made (it takes root, `unshare`
/// and `ip`).
fn in_network_namespace(args: &[OsString]) -> Option<Command> {
    let works = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!("skipped: no network namespace (`unshare -n` with `ip`, as root)");
        return None;
    }
    let mut cmd = without_worker_env(Command::new("unshare"));
    cmd.args(["-n", "sh", "-c", r#"ip link set lo up && exec "$@""#, "sh"])
        .args(args);
    Some(cmd)
}

fn demo_args(extra: &[&str]) -> Vec<OsString> {
    let mut args = vec![OsString::from(env!("CARGO_BIN_EXE_vidu-worker"))];
    args.extend(extra.iter().map(OsString::from));
    args
}

/// Processes of the node `name` (`vidu-demo-XXXXXXXX@localhost`): its name
/// on their command line (`pgrep -f`) or in their environment, where the
/// VM and the epmd it started carry it (RabbitMQ's VM does not show its
/// node name on its command line).
fn processes_of_node(name: &str) -> Vec<String> {
    let mut found: Vec<String> = std::process::Command::new("pgrep")
        .args(["-a", "-f", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let needle = format!("RABBITMQ_NODENAME={name}");
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{} {}",
                entry.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

#[tokio::test]
async fn the_demo_starts_a_private_node_when_nothing_answers_and_removes_it() {
    if Installation::find().is_none() {
        eprintln!("skipped: rabbitmq-server is not installed (not on PATH)");
        return;
    }
    let Some(cmd) = in_network_namespace(&demo_args(&["demo", "--generation-time", "1s"])) else {
        return;
    };
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(300)).await;
    assert_eq!(code, Some(0), "demo failed:\n{stdout}\n{stderr}");
    let first = stdout.lines().next().unwrap_or_default();
    assert!(first.starts_with(PRIVATE_NODE_LINE), "{stdout}");
    assert!(
        first.ends_with("(stopped and removed afterwards)"),
        "{first}"
    );
    assert_eq!(
        stdout.matches("started a private RabbitMQ node").count(),
        1,
        "said once: {stdout}"
    );
    assert_demo_succeeded(&stdout);
    let name = first
        .split_once(", ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .map(|(name, _)| name.to_owned())
        .expect("the node's name in the line");
    let short = name.split_once('@').map_or(name.as_str(), |(s, _)| s);
    assert!(
        short.starts_with("vidu-demo-") && name.ends_with("@localhost"),
        "{name}"
    );
    // Gone once the demo has exited: its VM, its epmd, its directory (a
    // watcher that found nothing left to do takes a moment to go).
    eventually(
        Duration::from_secs(20),
        &format!("no process of {name} left"),
        || async { processes_of_node(&name).is_empty().then_some(()) },
    )
    .await;
    let dir = std::env::temp_dir().join(short);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn the_demo_never_replaces_an_amqp_url_the_user_set() {
    let default = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let dir = tempdir();
    let file = dir.join("broker.toml");
    std::fs::write(&file, format!("[amqp]\nurl = \"{default}\"\n")).expect("write");
    let file = file.to_string_lossy().into_owned();
    for (how, args, env) in [
        (
            "environment",
            demo_args(&["demo"]),
            Some(("VIDU_WORKER__AMQP__URL", default)),
        ),
        (
            "--config file",
            demo_args(&["--config", &file, "demo"]),
            None,
        ),
    ] {
        let Some(mut cmd) = in_network_namespace(&args) else {
            break;
        };
        if let Some((key, value)) = env {
            cmd.env(key, value);
        }
        let (code, stdout, stderr) = output(cmd, Duration::from_secs(60)).await;
        assert_ne!(code, Some(0), "{how}: {stdout}\n{stderr}");
        assert!(
            !stdout.contains("private RabbitMQ node") && !stderr.contains("private RabbitMQ node"),
            "{how}: no private node: {stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("cannot connect to the broker at amqp://guest:***@127.0.0.1:5672/%2f"),
            "{how}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_demo_says_how_to_install_rabbitmq_when_nothing_answers_and_it_is_not_installed() {
    // The PATH without the directories holding a rabbitmq-server.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kept: Vec<_> = std::env::split_paths(&path)
        .filter(|dir| !dir.join("rabbitmq-server").exists())
        .collect();
    let path = std::env::join_paths(kept).expect("a PATH");
    let mut path_var = OsString::from("PATH=");
    path_var.push(&path);
    let mut args = vec![OsString::from("env"), path_var];
    args.extend(demo_args(&["demo"]));
    let Some(cmd) = in_network_namespace(&args) else {
        return;
    };
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    for needle in [
        "sudo apt-get install rabbitmq-server",
        "brew install rabbitmq",
        "docker run -d -p 5672:5672 rabbitmq:3",
    ] {
        assert!(lines[0].contains(needle), "{needle} in {stderr}");
    }
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
        .is_some_and(|u| u.starts_with("http://127.0.0.1:") && u.contains("/videos/")));
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

/// `check` writes, reads back and deletes a small object in the bucket;
/// refused credentials fail it, without the secret in the output; a
/// rotated secret file is what it uses.
#[tokio::test]
async fn check_writes_reads_and_deletes_an_object_in_the_bucket() {
    let env = TestEnv::new("checkstore", sim(Duration::from_millis(100))).await;
    let s3 = S3Server::start().await;
    let mut cmd = binary();
    cmd.arg("check")
        .envs(env.worker_env())
        .envs(s3.worker_env());
    let (code, stdout, _) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("ok   storage bucket videos accepts a write, a read and a delete"),
        "{stdout}"
    );
    assert!(s3.keys().is_empty(), "the check object is deleted");

    s3.accept_only("AKIAOTHERKEY00000000", "another-secret-entirely");
    let mut cmd = binary();
    cmd.arg("check")
        .envs(env.worker_env())
        .envs(s3.worker_env());
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAIL storage bucket videos"), "{stdout}");
    assert!(
        stdout.contains("refuses the storage credentials"),
        "{stdout}"
    );
    assert!(!stdout.contains(SECRET_KEY) && !stderr.contains(SECRET_KEY));

    // Credentials from settings and a file, rotated to what the store accepts.
    let dir = tempdir();
    let secret = dir.join("s3-secret");
    std::fs::write(&secret, "another-secret-entirely\n").expect("secret file");
    let mut cmd = binary();
    cmd.arg("check")
        .envs(env.worker_env())
        .envs(
            s3.worker_env()
                .into_iter()
                .filter(|(k, _)| !k.starts_with("AWS_")),
        )
        .env(
            "VIDU_WORKER__STORAGE__ACCESS_KEY_ID",
            "AKIAOTHERKEY00000000",
        )
        .env("VIDU_WORKER__STORAGE__SECRET_ACCESS_KEY_FILE", &secret);
    let (code, stdout, _) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("ok   storage"), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
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

#[tokio::test]
async fn plain_http_to_a_remote_upstream_is_refused_unless_allowed() {
    let env = TestEnv::new("plainhttp", sim(Duration::from_millis(100))).await;
    let mut vars = env.worker_env();
    vars.retain(|(k, _)| k != API_KEY_ENV && !k.ends_with("__API_KEY"));
    vars.push((
        "VIDU_WORKER__UPSTREAM__BASE_URL".into(),
        "http://api.example.com".into(),
    ));
    for command in ["check", "run"] {
        let mut cmd = binary();
        cmd.arg(command)
            .envs(vars.clone())
            .env(API_KEY_ENV, "sk-would-cross-the-network-in-clear");
        let (code, stdout, stderr) = output(cmd, Duration::from_secs(30)).await;
        assert_eq!(code, Some(2), "{command}: {stdout}{stderr}");
        assert!(
            stderr.contains("upstream.base_url") && stderr.contains("https"),
            "{stderr}"
        );
        assert!(!stderr.contains("sk-would-cross"), "{stderr}");
    }
    // Explicitly allowed (a sidecar proxy on another host, say): accepted.
    let mut cmd = binary();
    cmd.arg("check")
        .envs(vars.clone())
        .env("VIDU_WORKER__UPSTREAM__ALLOW_PLAIN_HTTP", "true");
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("warn upstream"), "{stdout}");
    // Loopback needs no permission (the simulator, a local proxy).
    let mut cmd = binary();
    cmd.arg("check").envs(env.worker_env());
    let (code, stdout, _) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stdout}");
}

/// Adds a broker user with producer permissions (write on the default
/// exchange only, as deploy/rabbitmq/README.md grants), removed on drop.
struct ProducerUser {
    name: String,
    password: String,
}

impl ProducerUser {
    fn add() -> Self {
        let name = format!(
            "t-producer-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        let ctl = |args: &[&str]| {
            let out = shared_broker()
                .rabbitmqctl()
                .args(args)
                .output()
                .expect("rabbitmqctl");
            assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
        };
        ctl(&["add_user", &name, &password]);
        ctl(&[
            "set_permissions",
            "-p",
            "/",
            &name,
            "^$",
            "^amq\\.default$",
            "^$",
        ]);
        Self { name, password }
    }

    fn url(&self) -> String {
        let base = shared_broker().url();
        let rest = base.split_once('@').map_or(base, |(_, r)| r);
        format!("amqp://{}:{}@{rest}", self.name, self.password)
    }
}

impl Drop for ProducerUser {
    fn drop(&mut self) {
        let _ = shared_broker()
            .rabbitmqctl()
            .args(["delete_user", &self.name])
            .output();
    }
}

#[tokio::test]
async fn submit_as_a_producer_only_user_publishes_without_declaring() {
    let env = TestEnv::new("producer", sim(Duration::from_millis(100))).await;
    let user = ProducerUser::add();
    let mut base = env.worker_env();
    base.push(("VIDU_WORKER__AMQP__URL".into(), user.url()));
    let vars = base;
    let mut cmd = binary();
    cmd.args([
        "submit",
        "--image",
        "https://example.com/cat.png",
        "--prompt",
        "from a producer",
    ])
    .envs(vars.clone());
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(env.depth(&env.topology.request_queue).await, 1);
    let mut vars = vars;

    // A deployment whose queue does not exist: one clear line, nothing
    // declared.
    vars.push((
        "VIDU_WORKER__AMQP__REQUEST_QUEUE".into(),
        format!("{}.nowhere", env.name),
    ));
    let mut cmd = binary();
    cmd.args(["submit", "--image", "https://example.com/cat.png"])
        .envs(vars);
    let (code, stdout, stderr) = output(cmd, Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("does not exist") && stderr.contains(".nowhere"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_private_node_trusts_no_file_another_user_could_write() {
    let Some(tools) = Installation::find() else {
        eprintln!("skipped: rabbitmq-server is not installed (not on PATH)");
        return;
    };
    let node = tokio::task::spawn_blocking(move || {
        vidu_worker::local_broker::LocalNode::start(
            &tools,
            "vidu-trust",
            vidu_worker::local_broker::STARTUP_TIMEOUT,
        )
    })
    .await
    .expect("join")
    .expect("a private node starts");
    // Its directory is the node's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node.dir())
            .expect("the node's directory")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "mode {:o}", mode & 0o777);
    }
    // Someone writes another process's pid where the node keeps its own.
    let mut bystander = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .expect("sleep");
    let pid_file = node.dir().join("pid");
    std::fs::write(&pid_file, format!("{}\n", bystander.id())).expect("plant a pid");
    let dir = node.dir().to_owned();
    let name = node.name().to_owned();
    let stopped = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::task::spawn_blocking(move || node.stop()),
    )
    .await;
    assert!(
        stopped.is_ok(),
        "stopping the node does not hang on the planted pid"
    );
    assert!(
        bystander.try_wait().expect("wait").is_none(),
        "the process named by the planted pid file was not signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(!dir.exists(), "{} removed", dir.display());
    eventually(
        Duration::from_secs(20),
        &format!("no process of {name} left"),
        || async { processes_of_node(&name).is_empty().then_some(()) },
    )
    .await;
}
