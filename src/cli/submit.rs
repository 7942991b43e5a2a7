//! `vidu-worker submit`: publish one request, optionally wait for its end.
//!
//! Builds the request from flags and/or a JSON file, validates it with the
//! same parser the worker uses, checks (passively, which needs no
//! permission) that the request queue exists, publishes it persistent and
//! confirmed, and prints its `request_id`. It needs a producer's
//! permissions only (write on the default exchange; with `--wait` also its
//! own server-named queue); `--declare-topology` declares the deployment's
//! topology first, with the worker's permissions, for a first run. With `--wait` it follows the request's
//! events: live progress on a terminal, plain lines otherwise, then the
//! terminal event as JSON on stdout. It never talks to the upstream.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::Args;
use futures_util::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties,
};
use serde_json::{json, Map, Value};

use super::exit::{EXIT_CONFIG, EXIT_TIMEOUT};
use crate::{
    broker::{self, Publisher, Topology},
    config::Settings,
    events,
    request::{self, MessageProps},
};

/// Arguments of `submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The model: vidu-q3-pro-i2v (default), vidu-q3-turbo-i2v,
    /// vidu-q3-pro-t2v, vidu-q3-turbo-t2v, vidu-q3-pro-f2v, vidu-q3-turbo-f2v.
    #[arg(long)]
    model: Option<String>,
    /// Image URL (http/https, .jpg/.jpeg/.png/.webp) or, for the f2v models,
    /// a data URI; once for i2v, twice (start, end) for f2v, never for t2v.
    #[arg(long)]
    image: Vec<String>,
    /// Motion description.
    #[arg(long)]
    prompt: Option<String>,
    /// Seconds of video, 1 to 16.
    #[arg(long)]
    duration: Option<u8>,
    /// 540p, 720p or 1080p.
    #[arg(long)]
    resolution: Option<String>,
    /// 16:9, 9:16, 4:3, 3:4 or 1:1.
    #[arg(long = "aspect-ratio")]
    aspect_ratio: Option<String>,
    /// Generate audio with the video (the models where `audio` is a boolean).
    #[arg(long, overrides_with = "no_audio")]
    audio: bool,
    /// Generate no audio (the models where `audio` is a boolean).
    #[arg(long = "no-audio")]
    no_audio: bool,
    /// Background music URL (vidu-q3-pro-i2v, where `audio` is a URL).
    #[arg(long = "audio-url", value_name = "URL")]
    audio_url: Option<String>,
    /// A whole request body (JSON); the flags above override its input fields.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Wait for the terminal event and print it; exit 0 on succeeded, 1 on failed.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits (exit 3 when it runs out).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Declare the deployment's queues and exchange first (needs the
    /// worker's permissions); by default only the request queue's
    /// existence is checked.
    #[arg(long)]
    declare_topology: bool,
}

fn build_body(args: &SubmitArgs) -> Result<Map<String, Value>, String> {
    let mut body = match &args.json {
        Some(path) => {
            let text =
                std::fs::read(path).map_err(|e| format!("--json {}: {e}", path.display()))?;
            match serde_json::from_slice::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => {
                    return Err(format!(
                        "--json {}: must hold a JSON object",
                        path.display()
                    ))
                }
                Err(e) => return Err(format!("--json {}: {e}", path.display())),
            }
        }
        None => Map::new(),
    };
    let input = body
        .entry("input")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(input) = input else {
        return Err("input must be a JSON object".into());
    };
    if !args.image.is_empty() {
        input.insert("images".into(), json!(args.image));
    }
    if args.audio || args.no_audio {
        input.insert("audio".into(), json!(args.audio && !args.no_audio));
    }
    if let Some(url) = &args.audio_url {
        input.insert("audio".into(), json!(url));
    }
    if let Some(prompt) = &args.prompt {
        input.insert("prompt".into(), json!(prompt));
    }
    if let Some(duration) = args.duration {
        input.insert("duration".into(), json!(duration));
    }
    if let Some(resolution) = &args.resolution {
        input.insert("resolution".into(), json!(resolution));
    }
    if let Some(aspect) = &args.aspect_ratio {
        input.insert("aspect_ratio".into(), json!(aspect));
    }
    if let Some(model) = &args.model {
        body.insert("model".into(), json!(model));
    }
    if !body.contains_key("request_id") {
        body.insert(
            "request_id".into(),
            json!(request::RequestId::generate().as_str()),
        );
    }
    Ok(body)
}

/// Runs `submit`.
pub async fn submit(settings: Settings, args: SubmitArgs) -> ExitCode {
    let body = match build_body(&args) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("submit: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let bytes = match serde_json::to_vec(&body) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("submit: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let parsed = match request::parse(&bytes, MessageProps::default()) {
        Ok(p) => p,
        Err(invalid) => {
            eprintln!("submit: invalid request: {invalid}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match publish_and_wait(&settings, &args, &bytes, parsed.request_id.as_str()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("submit: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn publish_and_wait(
    settings: &Settings,
    args: &SubmitArgs,
    body: &[u8],
    request_id: &str,
) -> Result<ExitCode, String> {
    let topology = Topology::new(settings);
    let conn = std::sync::Arc::new(
        broker::connect(settings, "submit")
            .await
            .map_err(|e| e.to_string())?,
    );
    if args.declare_topology {
        topology.declare(&conn).await.map_err(|e| e.to_string())?;
    } else {
        request_queue_exists(&conn, &topology).await?;
    }

    // Listen before publishing, so no event can slip past.
    let mut events_stream = None;
    if args.wait {
        let consumer = watch_events(&conn, &topology.events_exchange, events::ALL_TYPES)
            .await
            .map_err(|e| format!("cannot follow the events: {e}"))?;
        events_stream = Some(consumer);
    }

    let publisher = Publisher::open(conn.clone())
        .await
        .map_err(|e| e.to_string())?;
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(request_id.into());
    publisher
        .publish("", &topology.request_queue, body, properties, true)
        .await
        .map_err(|e| format!("could not publish the request: {e}"))?;
    println!("{request_id}");

    let Some(mut consumer) = events_stream else {
        let _ = conn.close(200, "submitted".into()).await;
        return Ok(ExitCode::SUCCESS);
    };
    let live = std::io::stdout().is_terminal();
    let deadline = tokio::time::Instant::now() + args.timeout;
    let outcome = loop {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let delivery = match next {
            Err(_) => {
                if live {
                    eprintln!();
                }
                eprintln!(
                    "submit: no terminal event within {}",
                    humantime::format_duration(args.timeout)
                );
                break ExitCode::from(EXIT_TIMEOUT);
            }
            Ok(None) => return Err("the broker closed the event stream".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(d))) => d,
        };
        let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) else {
            continue;
        };
        if event["subject"].as_str() != Some(request_id) {
            continue;
        }
        let kind = event["type"].as_str().unwrap_or_default();
        let data = &event["data"];
        match kind {
            events::SUBMITTED => progress(
                live,
                &format!(
                    "submitted: task {}",
                    data["task_id"].as_str().unwrap_or("?")
                ),
            ),
            events::PROGRESS => {
                let pct = data["progress_percent"]
                    .as_u64()
                    .map_or("?".to_owned(), |p| format!("{p}%"));
                let eta = data["eta_seconds"]
                    .as_u64()
                    .map_or(String::new(), |e| format!(", about {e}s left"));
                progress(
                    live,
                    &format!(
                        "{} {pct}{eta}",
                        data["status"].as_str().unwrap_or("running")
                    ),
                );
            }
            events::SUCCEEDED | events::FAILED => {
                if live {
                    eprintln!();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&event).unwrap_or_default()
                    );
                } else {
                    println!("{}", serde_json::to_string(&event).unwrap_or_default());
                }
                break if kind == events::SUCCEEDED {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                };
            }
            _ => {}
        }
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(outcome)
}

/// Checks passively (no permission needed, nothing changed) that the
/// request queue exists: a request published to a missing queue would be
/// dropped by the broker.
async fn request_queue_exists(conn: &lapin::Connection, topology: &Topology) -> Result<(), String> {
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    match broker::ready_messages(&channel, &topology.request_queue).await {
        Ok(_) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(())
        }
        Err(e) if broker::reply_code(&e) == Some(404) => Err(format!(
            "the request queue {} does not exist in vhost {:?}: start a worker of this deployment (it declares the topology) or run submit --declare-topology with the worker's permissions",
            topology.request_queue, topology.vhost
        )),
        Err(e) => Err(format!("cannot look at the request queue: {e}")),
    }
}

/// Follows the events matching `binding` through a private, server-named
/// queue that the broker deletes when the connection closes.
pub(crate) async fn watch_events(
    conn: &lapin::Connection,
    exchange: &str,
    binding: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    let channel = conn.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.name().clone(),
            "vidu-worker-watch".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

fn progress(live: bool, line: &str) {
    if live {
        let mut err = std::io::stderr();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    } else {
        eprintln!("{line}");
    }
}
