//! A request id's claim: the one moment at which two copies of a request,
//! taken by two workers at once, are told apart.
//!
//! Before it creates a request with an id of its own, a worker declares an
//! exclusive queue named from the id (`<request_queue>.claim.<tag>`, the
//! tag keyed with the deployment's secret so that a producer cannot hold a
//! claim to block a request). RabbitMQ lets one connection hold an
//! exclusive queue and refuses every other declarer with 405
//! RESOURCE_LOCKED, so of two copies one worker creates, and the other
//! waits until the claim is released and then finds the create in the
//! journal. The holder releases the claim only once its create is written
//! to the journal; a worker that dies lets go of it with its connection.
//! Each claim has a channel of its own, because a refused declare closes
//! the channel it was sent on. The broker lets the connection that holds
//! an exclusive queue declare it again, so two copies taken by one worker
//! are told apart by the worker's own set of held claims first.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lapin::{
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    Channel,
};

use crate::{
    broker::{self, Publisher},
    request::RequestId,
    signing::Signer,
};

/// The reply code RabbitMQ gives a second declarer of an exclusive queue.
const RESOURCE_LOCKED: u16 = 405;
/// How long a release may take before it is left to the connection.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// What came of a claim.
pub(crate) enum Claimed {
    /// This worker holds the id until the claim is dropped or released.
    Mine(Claim),
    /// Another worker (or another copy on this one) holds it.
    Held,
    /// The broker would not say (no session, or no right to declare the
    /// claim queue): why.
    Unavailable(String),
}

/// The claims this worker holds, by queue name.
#[derive(Default, Clone)]
pub(crate) struct Held(Arc<Mutex<HashSet<String>>>);

impl Held {
    fn take(&self, name: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned())
    }

    fn give_back(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }
}

/// A held claim; released (its queue deleted) when dropped.
pub(crate) struct Claim {
    channel: Option<Channel>,
    name: String,
    held: Held,
}

/// The claim queue's name for `id`.
pub(crate) fn claim_name(request_queue: &str, signer: &Signer, id: &RequestId) -> String {
    format!(
        "{request_queue}.claim.{}",
        signer.tag(&format!("claim\0{}", id.as_str()))
    )
}

/// Claims `id` on `publisher`'s connection, unless this worker holds it
/// already (`held`).
pub(crate) async fn claim(
    publisher: &Publisher,
    held: &Held,
    request_queue: &str,
    signer: &Signer,
    id: &RequestId,
) -> Claimed {
    let name = claim_name(request_queue, signer, id);
    if !held.take(&name) {
        return Claimed::Held;
    }
    let channel = match publisher.connection().create_channel().await {
        Ok(c) => c,
        Err(e) => {
            held.give_back(&name);
            return Claimed::Unavailable(format!("cannot open a channel: {e}"));
        }
    };
    let declared = channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => Claimed::Mine(Claim {
            channel: Some(channel),
            name,
            held: held.clone(),
        }),
        Err(e) if broker::reply_code(&e) == Some(RESOURCE_LOCKED) => {
            held.give_back(&name);
            Claimed::Held
        }
        Err(e) => {
            held.give_back(&name);
            let _ = channel.close(200, "claim refused".into()).await;
            Claimed::Unavailable(e.to_string())
        }
    }
}

impl Claim {
    /// Lets go of the id: deletes the claim queue and closes its channel.
    pub(crate) async fn release(mut self) {
        if let Some(channel) = self.channel.take() {
            let name = std::mem::take(&mut self.name);
            release(channel, &name).await;
            self.held.give_back(&name);
        }
    }
}

async fn release(channel: Channel, name: &str) {
    let done = async {
        if let Err(e) = channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await
        {
            tracing::debug!(error = %e, "could not delete a claim queue; it goes with the connection");
        }
        let _ = channel.close(200, "claim released".into()).await;
    };
    let _ = tokio::time::timeout(RELEASE_TIMEOUT, done).await;
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            let name = std::mem::take(&mut self.name);
            let held = self.held.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        release(channel, &name).await;
                        held.give_back(&name);
                    });
                }
                Err(_) => held.give_back(&name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_names_are_fixed_length_keyed_and_per_id() {
        let signer = Signer::new(
            &secrecy::SecretString::from("a deployment secret of length"),
            &[],
            "q",
            true,
        );
        let other = Signer::new(
            &secrecy::SecretString::from("another secret of some length"),
            &[],
            "q",
            true,
        );
        let id = |s: &str| RequestId::parse(s).unwrap_or_else(|_| panic!("{s}"));
        let a = claim_name("vidu.requests", &signer, &id("a"));
        assert!(a.starts_with("vidu.requests.claim."));
        assert_eq!(a.len(), "vidu.requests.claim.".len() + 16);
        assert_eq!(a, claim_name("vidu.requests", &signer, &id("a")));
        assert_ne!(a, claim_name("vidu.requests", &signer, &id("b")));
        assert_ne!(a, claim_name("vidu.requests", &other, &id("a")));
        let long = "x".repeat(128);
        assert_eq!(
            claim_name("vidu.requests", &signer, &id(&long)).len(),
            a.len()
        );
    }
}
