//! `vidu-worker cancel ID...`: publishes one cancel naming the given
//! request ids to `<request_queue>.cancel` (persistent, confirmed), and
//! prints each id it sent. Ids are checked like a request's `request_id`
//! first; a bad one is a usage error and nothing is sent.

use std::process::ExitCode;

use clap::Args;
use lapin::BasicProperties;

use super::exit::EXIT_CONFIG;
use crate::{
    broker::{self, Publisher, Topology},
    config::Settings,
    request::{RequestId, MAX_CANCEL_IDS},
};

/// `cancel` arguments.
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The request ids to cancel.
    #[arg(required = true, num_args = 1..)]
    ids: Vec<String>,
}

/// Runs `cancel`.
pub async fn cancel(settings: Settings, args: CancelArgs) -> ExitCode {
    let mut ids = Vec::with_capacity(args.ids.len());
    for id in &args.ids {
        match RequestId::parse(id) {
            Ok(id) => ids.push(id),
            Err(why) => {
                eprintln!(
                    "cancel: request id {:?} {why}",
                    id.chars().take(40).collect::<String>()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    match publish(&settings, &ids).await {
        Ok(()) => {
            for id in &ids {
                println!("canceled {id}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cancel: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn publish(settings: &Settings, ids: &[RequestId]) -> Result<(), String> {
    let topology = Topology::new(settings);
    let conn = std::sync::Arc::new(
        broker::connect(settings, "cancel")
            .await
            .map_err(|e| e.to_string())?,
    );
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    match broker::ready_messages(&channel, &topology.cancel_queue).await {
        Ok(_) => {
            let _ = channel.close(200, "checked".into()).await;
        }
        Err(e) if broker::reply_code(&e) == Some(404) => {
            return Err(format!(
                "the cancel queue {} does not exist in vhost {:?}: start a worker of this deployment (it declares the topology)",
                topology.cancel_queue, topology.vhost
            ))
        }
        Err(e) => return Err(format!("cannot look at the cancel queue: {e}")),
    }
    let publisher = Publisher::open(conn.clone())
        .await
        .map_err(|e| e.to_string())?;
    for chunk in ids.chunks(MAX_CANCEL_IDS) {
        let names: Vec<&str> = chunk.iter().map(RequestId::as_str).collect();
        let body = serde_json::json!({ "cancel": names }).to_string();
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        publisher
            .publish(
                "",
                &topology.cancel_queue,
                body.as_bytes(),
                properties,
                true,
            )
            .await
            .map_err(|e| format!("could not publish the cancel: {e}"))?;
    }
    let _ = conn.close(200, "canceled".into()).await;
    Ok(())
}
