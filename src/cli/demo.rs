//! `vidu-worker demo`: the whole flow, offline, in one process.
//!
//! Starts the built-in simulator and a worker on private, uniquely named
//! queues and exchange (so it can never touch a real deployment on the same
//! broker), publishes a few sample requests (image-to-video with
//! metadata/correlation id/reply-to, plain image-to-video, text-to-video on
//! Turbo, start-and-end-frame with a data-URI frame, an invalid one, one the
//! upstream fails), prints every event as it arrives, prints the worker's metrics,
//! removes what it declared and exits 0 when every request ended as
//! expected.
//!
//! When `amqp.url` is left to the built-in default and nothing answers on
//! 127.0.0.1:5672, the demo runs on a private RabbitMQ node started for it
//! ([`crate::local_broker`]), says so in one line, and stops and removes
//! the node afterwards, also when the demo fails or is interrupted; without
//! `rabbitmq-server` it exits 1 with one line saying how to install it. A
//! broker the user configured is never replaced.

use std::{collections::HashMap, process::ExitCode, sync::Arc, time::Duration};

use clap::Args;
use futures_util::StreamExt;
use lapin::{
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    BasicProperties,
};
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{self, Publisher, Topology},
    config::Settings,
    events,
    local_broker::{self, Action, Installation, LocalNode},
    simulator::{Simulator, SimulatorConfig},
    worker,
};

/// Arguments of `demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Simulated generation time of each video.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    generation_time: Duration,
    /// How long to wait for every request to finish.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

struct Sample {
    request_id: String,
    body: Value,
    correlation_id: Option<&'static str>,
    reply_to: bool,
    expect: &'static str,
}

fn samples(run: &str) -> Vec<Sample> {
    vec![
        Sample {
            request_id: format!("demo-{run}-cat"),
            body: json!({
                "request_id": format!("demo-{run}-cat"),
                "input": {
                    "images": ["https://example.com/cat.png"],
                    "prompt": "the cat turns its head and blinks",
                    "duration": 5,
                    "resolution": "720p"
                },
                "metadata": {"user": 42, "campaign": "demo"}
            }),
            correlation_id: Some("corr-cat-1"),
            reply_to: true,
            expect: events::SUCCEEDED,
        },
        Sample {
            request_id: format!("demo-{run}-harbour"),
            body: json!({
                "request_id": format!("demo-{run}-harbour"),
                "model": "vidu-q3-pro-i2v",
                "input": {
                    "images": ["https://example.com/harbour.webp"],
                    "prompt": "boats rock gently, gulls fly past",
                    "aspect_ratio": "16:9",
                    "style": "general"
                }
            }),
            correlation_id: None,
            reply_to: false,
            expect: events::SUCCEEDED,
        },
        Sample {
            request_id: format!("demo-{run}-lighthouse"),
            body: json!({
                "request_id": format!("demo-{run}-lighthouse"),
                "model": "vidu-q3-turbo-t2v",
                "input": {
                    "prompt": "a lighthouse at dusk, waves breaking, the beam sweeping the fog",
                    "audio": true,
                    "duration": 4
                }
            }),
            correlation_id: None,
            reply_to: false,
            expect: events::SUCCEEDED,
        },
        Sample {
            request_id: format!("demo-{run}-bloom"),
            body: json!({
                "request_id": format!("demo-{run}-bloom"),
                "model": "vidu-q3-pro-f2v",
                "input": {
                    "images": [
                        "https://example.com/bud.png",
                        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
                    ],
                    "prompt": "the bud opens into a flower",
                    "audio": false
                }
            }),
            correlation_id: None,
            reply_to: false,
            expect: events::SUCCEEDED,
        },
        Sample {
            request_id: format!("demo-{run}-too-long"),
            body: json!({
                "request_id": format!("demo-{run}-too-long"),
                "input": {"images": ["https://example.com/dog.jpg"], "duration": 42}
            }),
            correlation_id: None,
            reply_to: false,
            expect: events::FAILED,
        },
        Sample {
            request_id: format!("demo-{run}-moderated"),
            body: json!({
                "request_id": format!("demo-{run}-moderated"),
                "input": {"images": ["https://example.com/crowd.jpeg"], "prompt": "a crowd cheers [sim:fail]"}
            }),
            correlation_id: None,
            reply_to: false,
            expect: events::FAILED,
        },
    ]
}

/// The start of the line the demo prints when it runs on a private node.
pub const PRIVATE_NODE_LINE: &str =
    "no broker answers on 127.0.0.1:5672: started a private RabbitMQ node for this demo";

/// Exit status of a demo ended by Ctrl-C or SIGTERM while on a private node.
const EXIT_INTERRUPTED: u8 = 130;

/// Runs the demo: on the configured broker, or on a private node when the
/// broker is left to the default and nothing answers there.
pub async fn demo(settings: Settings, args: DemoArgs) -> ExitCode {
    let configured = broker_configured(&settings);
    let probe = tokio::task::spawn_blocking(move || {
        let answers = !configured && local_broker::default_broker_answers();
        let tools = if configured || answers {
            None
        } else {
            Installation::find()
        };
        (
            local_broker::decide(configured, answers, tools.is_some()),
            tools,
        )
    })
    .await;
    match probe {
        Ok((Action::StartPrivateNode, Some(tools))) => on_private_node(settings, args, tools).await,
        Ok((Action::ExplainInstall, _)) => {
            eprintln!("demo: {}", local_broker::INSTALL_HINT);
            ExitCode::FAILURE
        }
        Ok(_) => outcome(run_demo(settings, args, CancellationToken::new()).await),
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the user chose the broker: set `amqp.url` in a file or the
/// environment (even to the default), or credentials for it.
fn broker_configured(settings: &Settings) -> bool {
    let amqp = &settings.amqp;
    amqp.url_configured
        || amqp.username.is_some()
        || amqp.password.is_some()
        || amqp.password_file.is_some()
}

fn outcome(result: Result<bool, String>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo on a private node, stopped and removed afterwards: when
/// the demo ends, fails or is interrupted (Ctrl-C, SIGTERM) and, through a
/// watcher process, when this process is killed.
async fn on_private_node(mut settings: Settings, args: DemoArgs, tools: Installation) -> ExitCode {
    let interrupted = super::shutdown_on_signals();
    let launched =
        tokio::task::spawn_blocking(move || LocalNode::launch(&tools, "vidu-demo")).await;
    let node = match launched.map_err(|e| e.to_string()).and_then(|r| r) {
        Ok(node) => Arc::new(node),
        Err(e) => {
            eprintln!("demo: cannot start a private RabbitMQ node: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The stop below is the rule; the watcher covers a SIGKILL.
    let _ = node.stop_when_process_exits(std::process::id());
    println!(
        "{PRIVATE_NODE_LINE}, {} (stopped and removed afterwards)",
        node.name()
    );
    settings.amqp.url = SecretString::from(node.url());
    let waiting = node.clone();
    // Interrupted, the demo's worker stops before its broker does.
    let cancel = interrupted.clone();
    let run = async move {
        let timeout = local_broker::STARTUP_TIMEOUT;
        tokio::task::spawn_blocking(move || waiting.await_startup(timeout))
            .await
            .map_err(|e| e.to_string())??;
        run_demo(settings, args, cancel).await
    };
    let result = tokio::select! {
        result = run => Some(result),
        () = interrupted.cancelled() => None,
    };
    let stopping = node.clone();
    let _ = tokio::task::spawn_blocking(move || stopping.stop()).await;
    match result {
        Some(result) => outcome(result),
        None => {
            eprintln!("demo: interrupted (the private RabbitMQ node is stopped and removed)");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

/// Runs the demo on the broker of `settings`; its worker stops when
/// `cancel` is cancelled (or when the demo ends).
async fn run_demo(
    mut settings: Settings,
    args: DemoArgs,
    cancel: CancellationToken,
) -> Result<bool, String> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let sim = Simulator::start(SimulatorConfig {
        api_key: Some("demo-key".into()),
        generation_time: args.generation_time,
        ..SimulatorConfig::default()
    })
    .await
    .map_err(|e| format!("cannot start the simulator: {e}"))?;
    settings.amqp.request_queue = format!("vidu-demo.{run}.requests");
    settings.amqp.events_exchange = format!("vidu-demo.{run}.events");
    // The demo's queues are its own, whoever owns the configured topology.
    settings.amqp.declare_topology = true;
    settings.upstream.base_url = sim.base_url();
    settings.upstream.api_key = Some(SecretString::from("demo-key"));
    settings.polling.min_interval = Duration::from_millis(500);
    settings.shutdown.grace_period = Duration::from_secs(5);
    let topology = Topology::new(&settings);

    println!("vidu-worker demo");
    println!("  simulator      {}", sim.base_url());
    println!("  request queue  {}", topology.request_queue);
    println!(
        "  events         {} (topic exchange)",
        topology.events_exchange
    );
    println!();

    let conn = std::sync::Arc::new(broker::connect(&settings, "demo").await.map_err(|e| {
        format!(
            "{e} (is RabbitMQ running on {}?)",
            crate::config::redact_url(secrecy::ExposeSecret::expose_secret(&settings.amqp.url))
        )
    })?);
    topology.declare(&conn).await.map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    let reply_queue = format!("vidu-demo.{run}.replies");
    channel
        .queue_declare(
            reply_queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut watch = super::submit::watch_events(&conn, &topology.events_exchange, "#")
        .await
        .map_err(|e| e.to_string())?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let ops_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let stop = cancel.child_token();
    let worker_task = tokio::spawn(worker::run_with_listener(
        settings.clone(),
        listener,
        stop.clone(),
    ));

    let publisher = Publisher::open(conn.clone())
        .await
        .map_err(|e| e.to_string())?;
    let samples = samples(&run);
    let mut expected: HashMap<String, &'static str> = HashMap::new();
    let mut models: HashMap<String, String> = HashMap::new();
    for s in &samples {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(c) = s.correlation_id {
            props = props.with_correlation_id(c.into());
        }
        if s.reply_to {
            props = props.with_reply_to(reply_queue.as_str().into());
        }
        let body = serde_json::to_vec(&s.body).map_err(|e| e.to_string())?;
        publisher
            .publish("", &topology.request_queue, &body, props, true)
            .await
            .map_err(|e| e.to_string())?;
        let model = s.body["model"]
            .as_str()
            .unwrap_or(crate::model::Model::DEFAULT.as_str())
            .to_owned();
        println!("published {} ({model})", s.request_id);
        expected.insert(s.request_id.clone(), s.expect);
        models.insert(s.request_id.clone(), model);
    }
    println!();

    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut outcomes: HashMap<String, String> = HashMap::new();
    while outcomes.len() < expected.len() {
        let delivery = match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(_) => return Err("the event stream ended".into()),
            Err(_) => break,
        };
        let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) else {
            continue;
        };
        let kind = event["type"].as_str().unwrap_or("?").to_owned();
        let subject = event["subject"].as_str().unwrap_or("?").to_owned();
        println!("── {kind}  ({subject})");
        println!(
            "{}",
            serde_json::to_string_pretty(&event).unwrap_or_default()
        );
        if kind == events::SUCCEEDED || kind == events::FAILED {
            outcomes.insert(subject, kind);
        }
    }

    let replies = broker::ready_messages(&channel, &reply_queue)
        .await
        .unwrap_or(0);
    let metrics = fetch_metrics(ops_addr).await;

    stop.cancel();
    let _ = worker_task.await;
    let mut cleanup = topology.queue_names();
    cleanup.push(reply_queue);
    for q in cleanup {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            topology.events_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "demo done".into()).await;

    println!();
    println!("summary");
    let mut all_ok = true;
    let mut ids: Vec<_> = expected.keys().cloned().collect();
    ids.sort();
    for id in ids {
        let want = expected[&id];
        let got = outcomes
            .get(&id)
            .map_or("(no terminal event)", String::as_str);
        let ok = got == want;
        all_ok &= ok;
        let model = models.get(&id).map_or("?", String::as_str);
        println!(
            "  {} {id} ({model}): {got}",
            if ok { "ok  " } else { "FAIL" }
        );
    }
    println!("  reply_to queue received {replies} terminal event(s)");
    let stats = sim.stats();
    println!(
        "  simulator: {} create calls, {} tasks created, {} polls",
        stats.create_calls, stats.tasks_created, stats.poll_calls
    );
    if let Some(text) = metrics {
        println!();
        println!("worker metrics (http://{ops_addr}/metrics)");
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
        {
            println!("  {line}");
        }
    }
    Ok(all_ok)
}

async fn fetch_metrics(addr: std::net::SocketAddr) -> Option<String> {
    let resp = reqwest::get(format!("http://{addr}/metrics")).await.ok()?;
    resp.text().await.ok()
}
