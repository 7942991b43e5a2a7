//! Broker: names, topology, connections and confirmed publishing.
//!
//! This module owns every queue and exchange name the worker uses (all derived
//! from the request queue's name, so several deployments can share a vhost),
//! declares them idempotently, opens connections that operators can recognise
//! in the management UI, and publishes with publisher confirms, treating a
//! nack or an unroutable return as a failure. It never acks or nacks
//! deliveries; handlers do that once their outputs are confirmed.

use std::time::Duration;

use lapin::{
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use secrecy::ExposeSecret;

use crate::config::{QueueType, Settings};

/// Header carrying why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-vidu-error";
/// Header carrying the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header RabbitMQ quorum queues set on redeliveries.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// The delays of the wait queues, shortest first. A ticket waiting `d` hops
/// through the largest tiers that fit, so any delay is reached in a few hops
/// with 250 ms precision.
pub const WAIT_TIERS_MS: [u64; 13] = [
    250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
    1_024_000,
];

/// Every name the worker uses on the broker.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Where producers publish requests.
    pub request_queue: String,
    /// Rejected requests and poison tickets.
    pub dead_queue: String,
    /// Tickets due for a poll.
    pub tracking_queue: String,
    /// Wait queues: (delay, name), shortest first.
    pub wait_queues: Vec<(Duration, String)>,
    /// Topic exchange for events.
    pub events_exchange: String,
    /// Declared queue type.
    pub queue_type: QueueType,
    /// Broker-side delivery limit (quorum queues), a backstop behind the
    /// worker's own `max_deliveries` check.
    pub delivery_limit: u32,
}

impl Topology {
    /// Names derived from the settings.
    pub fn new(settings: &Settings) -> Self {
        let rq = &settings.amqp.request_queue;
        Self {
            request_queue: rq.clone(),
            dead_queue: format!("{rq}.dead"),
            tracking_queue: format!("{rq}.tracking"),
            wait_queues: WAIT_TIERS_MS
                .iter()
                .map(|ms| {
                    (
                        Duration::from_millis(*ms),
                        format!("{rq}.wait.{}", tier_label(*ms)),
                    )
                })
                .collect(),
            events_exchange: settings.amqp.events_exchange.clone(),
            queue_type: settings.amqp.queue_type,
            delivery_limit: settings.amqp.max_deliveries + 2,
        }
    }

    /// Every queue name, for operators and test clean-up.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![
            self.request_queue.clone(),
            self.dead_queue.clone(),
            self.tracking_queue.clone(),
        ];
        names.extend(self.wait_queues.iter().map(|(_, n)| n.clone()));
        names
    }

    /// The wait queue to park a ticket in when `remaining` is left before its
    /// next poll: the longest tier that does not overshoot. `None` means
    /// "poll now" (less than half the shortest tier is left).
    pub fn wait_queue_for(&self, remaining: Duration) -> Option<&(Duration, String)> {
        let shortest = self.wait_queues.first()?.0;
        if remaining < shortest / 2 {
            return None;
        }
        self.wait_queues
            .iter()
            .rev()
            .find(|(d, _)| *d <= remaining)
            .or(self.wait_queues.first())
    }

    fn base_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        args
    }

    fn dead_letter_to(&self, args: &mut FieldTable, target: &str, at_least_once: bool) {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(target.into()),
        );
        if self.queue_type == QueueType::Quorum && at_least_once {
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
    }

    fn limit_deliveries(&self, args: &mut FieldTable) {
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
            );
        }
    }

    /// The declaration arguments of every queue, in declaration order
    /// (targets before the queues that dead-letter into them).
    pub fn queue_declarations(&self) -> Vec<(String, FieldTable)> {
        let mut out = Vec::new();
        out.push((self.dead_queue.clone(), self.base_args()));

        let mut tracking = self.base_args();
        self.dead_letter_to(&mut tracking, &self.dead_queue, true);
        self.limit_deliveries(&mut tracking);
        out.push((self.tracking_queue.clone(), tracking));

        let mut request = self.base_args();
        self.dead_letter_to(&mut request, &self.dead_queue, true);
        self.limit_deliveries(&mut request);
        out.push((self.request_queue.clone(), request));

        for (delay, name) in &self.wait_queues {
            let mut wait = self.base_args();
            wait.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            self.dead_letter_to(&mut wait, &self.tracking_queue, true);
            out.push((name.clone(), wait));
        }
        out
    }

    /// Declares the exchange and every queue; safe to run any number of
    /// times from any number of workers with the same settings.
    pub async fn declare(&self, conn: &Connection) -> Result<(), BrokerError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::Connection)?;
        channel
            .exchange_declare(
                self.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::Topology {
                name: self.events_exchange.clone(),
                detail: e.to_string(),
            })?;
        for (name, args) in self.queue_declarations() {
            channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .map_err(|e| BrokerError::Topology {
                    name: name.clone(),
                    detail: e.to_string(),
                })?;
        }
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// Counts the tickets waiting in the tracking and wait queues.
    pub async fn count_tracked(&self, channel: &Channel) -> Result<u64, lapin::Error> {
        let mut total = 0u64;
        let names =
            std::iter::once(&self.tracking_queue).chain(self.wait_queues.iter().map(|(_, n)| n));
        for name in names {
            let q = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            total += u64::from(q.message_count());
        }
        Ok(total)
    }
}

fn tier_label(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Broker failures, by what the worker does about them.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting or opening a channel failed; retry with backoff.
    #[error("broker connection failed: {0}")]
    Connection(#[source] lapin::Error),
    /// A queue or exchange exists with other settings, or may not be declared.
    #[error("cannot declare {name}: {detail}")]
    Topology {
        /// The queue or exchange.
        name: String,
        /// The broker's words.
        detail: String,
    },
}

/// Why a publish did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("publish failed: {0}")]
    Channel(#[from] lapin::Error),
    /// The broker refused the message (nack), e.g. a full queue.
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// No queue was bound for a mandatory message.
    #[error("the message was unroutable: {0}")]
    Unroutable(String),
}

/// A confirm-mode channel for publishing. Cheap to clone; many tasks publish
/// on it concurrently and each awaits its own confirm.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel in confirm mode.
    pub async fn open(conn: &Connection) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    /// Whether the channel is still usable.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes and waits for the broker's confirm. `mandatory` messages
    /// that no queue takes are failures.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(PublishError::Nacked);
        }
        if let Some(returned) = confirm.take_message() {
            return Err(PublishError::Unroutable(returned.reply_text.to_string()));
        }
        Ok(())
    }

    /// Closes the channel.
    pub async fn close(&self) {
        let _ = self.channel.close(200, "bye".into()).await;
    }
}

/// How this process introduces itself to the broker (visible in the
/// management UI's connection list).
pub fn connection_name(role: &str) -> String {
    format!("vidu-worker {role} {}#{}", host_name(), std::process::id())
}

/// The host name, for connection names and consumer tags.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown-host".into())
}

/// Connects to the broker. Errors never contain the URL's password.
pub async fn connect(settings: &Settings, role: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name(role)))
        .with_client_property("product".into(), LongString::from("vidu-worker"))
        .with_client_property(
            "version".into(),
            LongString::from(env!("CARGO_PKG_VERSION")),
        );
    Connection::connect(settings.amqp.url.expose_secret(), props)
        .await
        .map_err(BrokerError::Connection)
}

/// Reads an integer header (the broker may use any integer width).
pub fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

/// Reads a string header.
pub fn header_str<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::new(&Settings::default())
    }

    #[test]
    fn names_derive_from_the_request_queue() {
        let t = topology();
        assert_eq!(t.request_queue, "vidu.requests");
        assert_eq!(t.dead_queue, "vidu.requests.dead");
        assert_eq!(t.tracking_queue, "vidu.requests.tracking");
        assert_eq!(t.wait_queues[0].1, "vidu.requests.wait.250ms");
        assert_eq!(t.wait_queues[2].1, "vidu.requests.wait.1s");
        assert!(t
            .queue_names()
            .iter()
            .all(|n| n.starts_with("vidu.requests")));
    }

    #[test]
    fn tickets_park_in_the_longest_tier_that_fits() {
        let t = topology();
        let pick = |ms: u64| {
            t.wait_queue_for(Duration::from_millis(ms))
                .map(|(d, _)| d.as_millis())
        };
        assert_eq!(pick(0), None);
        assert_eq!(pick(100), None);
        assert_eq!(pick(130), Some(250));
        assert_eq!(pick(999), Some(500));
        assert_eq!(pick(1_000), Some(1_000));
        assert_eq!(pick(18_000), Some(16_000));
        assert_eq!(pick(10_000_000), Some(1_024_000));
    }
}
