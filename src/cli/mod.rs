//! The command line: `run`, `submit`, `simulate`, `demo`, `check`, `cancel`.
//!
//! Parses arguments with clap, loads the layered configuration (a bad value
//! exits 2 with one line naming the key), sets up logging and dispatches to
//! the library. It holds no logic of its own beyond turning outcomes into
//! exit statuses.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::{
    broker,
    config::Settings,
    simulator::{EtaMode, Simulator, SimulatorConfig},
    telemetry, upstream,
    worker::{self, RunError},
};

pub mod cancel;
pub mod demo;
pub mod exit;
pub mod submit;

pub use exit::EXIT_CONFIG;

#[derive(Parser, Debug)]
#[command(
    name = "vidu-worker",
    version,
    about = "Video requests from RabbitMQ, through Novita's Vidu Q3 models, to CloudEvents"
)]
struct Cli {
    /// An extra configuration file (TOML), layered over config/default.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker until SIGTERM/SIGINT.
    Run,
    /// Publish one request; print its request_id (and with --wait its terminal event).
    Submit(submit::SubmitArgs),
    /// Run the built-in Novita simulator.
    Simulate(SimulateArgs),
    /// Offline end-to-end demo against the local RabbitMQ.
    Demo(demo::DemoArgs),
    /// Validate the configuration and reach the broker (and the upstream when a key is set).
    Check,
    /// Cancel requests by id: never created if not yet, no longer tracked if so.
    Cancel(cancel::CancelArgs),
}

#[derive(Args, Debug)]
struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: String,
    /// The only Bearer key accepted (default: any non-empty key).
    #[arg(long, env = "SIMULATOR_API_KEY")]
    api_key: Option<String>,
    /// How long each task takes.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    generation_time: Duration,
    /// Whether task-result carries an honest `eta`.
    #[arg(long, default_value = "honest", value_parser = ["honest", "absent"])]
    eta: String,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Run | Command::Simulate(_) => telemetry::init(settings.log.format),
        _ => telemetry::init_with_default(settings.log.format, telemetry::QUIET_FILTER),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command, settings))
}

async fn dispatch(command: Command, settings: Settings) -> ExitCode {
    match command {
        Command::Run => run(settings).await,
        Command::Submit(args) => submit::submit(settings, args).await,
        Command::Simulate(args) => simulate(args).await,
        Command::Demo(args) => demo::demo(settings, args).await,
        Command::Check => check(settings).await,
        Command::Cancel(args) => cancel::cancel(settings, args).await,
    }
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        trigger.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

async fn run(settings: Settings) -> ExitCode {
    match worker::run(settings, shutdown_on_signals()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(e)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %e, "vidu-worker cannot start");
            eprintln!("vidu-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn simulate(args: SimulateArgs) -> ExitCode {
    let config = SimulatorConfig {
        api_key: args.api_key,
        generation_time: args.generation_time,
        eta: if args.eta == "absent" {
            EtaMode::Absent
        } else {
            EtaMode::Honest
        },
        ..SimulatorConfig::default()
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("simulate: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(addr = %addr, generation_time = ?config.generation_time, "Novita simulator listening");
    println!("simulator listening on http://{addr}");
    match Simulator::new(config)
        .serve(listener, shutdown_on_signals())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn check(settings: Settings) -> ExitCode {
    let mut ok = true;
    println!("ok   configuration");
    if let Ok(url) = url::Url::parse(&settings.upstream.base_url) {
        if url.scheme() == "http" && !crate::config::is_loopback(&url) {
            println!(
                "warn upstream {}: plain http to another host, allowed by upstream.allow_plain_http: the API key crosses the network in clear text",
                settings.upstream.base_url
            );
        }
    }
    println!("{}", tickets_line(&settings));
    ok &= check_broker(&settings).await;
    match &settings.upstream.api_key {
        None => println!("skip upstream: no API key set (NOVITA_API_KEY)"),
        Some(key) => {
            let client = upstream::UpstreamClient::new(
                &settings.upstream,
                key.clone(),
                crate::metrics::Metrics::new(),
            );
            match client {
                Err(e) => {
                    ok = false;
                    println!("FAIL upstream: {e}");
                }
                Ok(client) => match client.task_result(upstream::KEY_PROBE_TASK_ID, None).await {
                    Ok(_) | Err(upstream::UpstreamError::NotFound { .. }) => {
                        println!(
                            "ok   upstream {} accepts the API key",
                            settings.upstream.base_url
                        );
                    }
                    Err(e) => {
                        ok = false;
                        println!("FAIL upstream {}: {e}", settings.upstream.base_url);
                    }
                },
            }
        }
    }
    ok &= check_storage(&settings).await;
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes, reads back and deletes a small object in `storage.bucket`.
async fn check_storage(settings: &Settings) -> bool {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let storage = match crate::storage::Storage::from_settings(
        &settings.storage,
        &env,
        crate::metrics::Metrics::new(),
    ) {
        Ok(None) => {
            println!("skip storage: no storage.bucket set (videos are not copied)");
            return true;
        }
        Ok(Some(storage)) => storage,
        Err(e) => {
            println!("FAIL storage: {e}");
            return false;
        }
    };
    match storage.check().await {
        Ok(()) => {
            println!(
                "ok   storage bucket {} accepts a write, a read and a delete",
                storage.bucket()
            );
            true
        }
        Err(e) => {
            println!("FAIL storage bucket {}: {e}", storage.bucket());
            false
        }
    }
}

/// How tickets are signed, in `check`'s words.
fn tickets_line(settings: &Settings) -> String {
    let journal = format!("{}.journal", settings.amqp.request_queue);
    match &settings.tickets.secret {
        Some(_) => format!(
            "ok   tickets: signed with tickets.secret (and the deployment key kept in {journal}); {} previous secret(s) accepted",
            settings.tickets.previous_secrets.len()
        ),
        None => format!(
            "ok   tickets: signed with the deployment key kept in {journal} (readable by the workers' broker user only), so workers holding different API keys read each other's tickets; a second signature derived from the API key lets versions before it read them. Set tickets.secret to sign with a secret of your own"
        ),
    }
}

/// Reaches every node of `amqp.url`, naming each; checks the topology on
/// the first that answers. Fails when no node answers; a node that does not
/// answer while another does is a warning (the worker runs, with less
/// room to fail over).
async fn check_broker(settings: &Settings) -> bool {
    let how = match (settings.amqp.uses_tls(), &settings.amqp.tls.cert_file) {
        (false, _) => "",
        (true, None) => " over TLS",
        (true, Some(_)) => " over TLS with a client certificate",
    };
    let count = settings.amqp.node_count();
    let mut reached = false;
    let mut topology_ok = true;
    let mut down = Vec::new();
    for index in 0..count {
        match broker::connect_to_any(settings, "check", &broker::NodeOrder::only(index)).await {
            Ok(connected) => {
                println!(
                    "ok   broker node {} reachable{how} ({})",
                    connected.node,
                    settings.amqp.display_node(index)
                );
                if !reached {
                    topology_ok = check_topology(settings, &connected.conn).await;
                }
                reached = true;
                let _ = connected.conn.close(200, "check done".into()).await;
            }
            Err(e) => down.push(e),
        }
    }
    for e in &down {
        if reached {
            println!("warn broker: {e}");
        } else {
            println!("FAIL broker: {e}");
        }
    }
    if let Some(warning) = crate::worker::cluster_warning(settings) {
        println!("warn {warning}");
    }
    reached && topology_ok
}

/// With `amqp.declare_topology = false`, reports whether the topology the
/// operators own exists (passive declarations: they change nothing and need
/// no permission). Otherwise the worker declares it at start.
async fn check_topology(settings: &Settings, conn: &lapin::Connection) -> bool {
    let topology = broker::Topology::new(settings);
    if topology.declares {
        println!("ok   topology: declared by the worker at start (amqp.declare_topology = true)");
        return true;
    }
    let total = topology.queue_names().len();
    match topology.missing(conn).await {
        Ok(missing) if missing.is_empty() => {
            println!(
                "ok   topology: exchange {} and {total} queues exist (checked passively: their arguments are not visible to a client)",
                topology.events_exchange
            );
            true
        }
        Ok(missing) => {
            let e = broker::BrokerError::Missing {
                vhost: topology.vhost.clone(),
                missing,
            };
            println!("FAIL {e}");
            false
        }
        Err(e) => {
            println!("FAIL topology: {e}");
            false
        }
    }
}
