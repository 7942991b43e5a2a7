//! Broker: names, topology, connections and confirmed publishing.
//!
//! This module owns every queue and exchange name the worker uses (all derived
//! from the request queue's name, so several deployments can share a vhost),
//! declares them idempotently — or, when operators own the topology
//! (`amqp.declare_topology = false`), only checks with passive declarations
//! that they exist — opens connections (TLS, credentials from the URL or
//! from settings) that operators can recognise in the management UI, and
//! publishes with publisher confirms, treating a nack or an unroutable
//! return as a failure. It never acks or nacks deliveries; handlers do that
//! once their outputs are confirmed. It never puts a password in an error or
//! a log line: errors name the broker by [`AmqpSettings::display_url`].

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lapin::{
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    },
    tcp::{OwnedIdentity, OwnedTLSConfig},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};

use crate::{
    config::{AmqpSettings, ConfigError, QueueArgument, QueueType, Settings},
    tls,
};

/// Header carrying why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-vidu-error";
/// Header carrying the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header RabbitMQ quorum queues set on redeliveries.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Header of a dead-letter copy naming the queue the message came from.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-vidu-original-queue";
/// Longest `x-vidu-error` header.
pub const MAX_ERROR_HEADER: usize = 1000;

/// The delays of the wait queues the topology declares, shortest first. A
/// ticket waiting `d` hops through the largest tiers that fit
/// (`pipeline::ticket::wait_tier`) until at most the shortest tier is left,
/// which the tracker then waits in memory (holding the unacknowledged
/// ticket for under two seconds): any delay takes a few hops and is met to
/// the millisecond.
pub const WAIT_TIERS_SECS: [u64; 10] = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

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
    /// Replicas of each quorum queue (`amqp.quorum_initial_group_size`).
    pub quorum_initial_group_size: Option<u16>,
    /// Broker-side delivery limit (quorum queues), a backstop behind the
    /// worker's own `max_deliveries` check.
    pub delivery_limit: u32,
    /// Whether [`Topology::declare`] declares (`true`) or only verifies.
    pub declares: bool,
    /// Extra arguments of every queue (`amqp.queue_arguments`).
    pub queue_arguments: Vec<(String, AMQPValue)>,
    /// The vhost, for messages.
    pub vhost: String,
    /// The deployment's journal, a stream every worker reads
    /// ([`crate::journal`]).
    pub journal_queue: String,
    /// How long the journal keeps records (`x-max-age`): a day beyond
    /// `polling.max_off_peak_task_age`.
    pub journal_max_age: Duration,
}

/// Most bytes the journal keeps (`x-max-length-bytes`); older segments go
/// first.
pub const JOURNAL_MAX_BYTES: i64 = 2 * 1024 * 1024 * 1024;
/// Size of one journal segment (`x-stream-max-segment-size-bytes`):
/// retention removes whole segments, so small ones make it prompt.
pub const JOURNAL_SEGMENT_BYTES: i64 = 8 * 1000 * 1000;

impl Topology {
    /// Names derived from the settings.
    pub fn new(settings: &Settings) -> Self {
        let rq = &settings.amqp.request_queue;
        Self {
            request_queue: rq.clone(),
            dead_queue: format!("{rq}.dead"),
            tracking_queue: format!("{rq}.tracking"),
            wait_queues: WAIT_TIERS_SECS
                .iter()
                .map(|s| (Duration::from_secs(*s), format!("{rq}.wait.{s}s")))
                .collect(),
            events_exchange: settings.amqp.events_exchange.clone(),
            queue_type: settings.amqp.queue_type,
            quorum_initial_group_size: settings.amqp.quorum_initial_group_size,
            delivery_limit: settings.amqp.max_deliveries + 2,
            declares: settings.amqp.declare_topology,
            queue_arguments: settings
                .amqp
                .queue_arguments
                .iter()
                .map(|(name, value)| (name.clone(), argument_value(value)))
                .collect(),
            vhost: settings.amqp.vhost(),
            journal_queue: format!("{rq}.journal"),
            journal_max_age: settings.polling.max_off_peak_task_age
                + Duration::from_secs(24 * 3600),
        }
    }

    /// The journal's declaration: a stream (every reader sees every record)
    /// keeping records for [`Topology::journal_max_age`], at most
    /// [`JOURNAL_MAX_BYTES`], in small segments; on a cluster replicated
    /// like the quorum queues.
    pub fn journal_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", self.journal_max_age.as_secs().max(1)).into()),
        );
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(JOURNAL_MAX_BYTES),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(JOURNAL_SEGMENT_BYTES),
        );
        if let Some(size) = self.quorum_initial_group_size {
            args.insert(
                "x-initial-cluster-size".into(),
                AMQPValue::LongInt(i32::from(size)),
            );
        }
        args
    }

    /// Every queue name, for operators and test clean-up (the quota
    /// ledger's name derives from the deployment's secret: see
    /// [`ledger_name`]).
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![
            self.request_queue.clone(),
            self.dead_queue.clone(),
            self.tracking_queue.clone(),
        ];
        names.extend(self.wait_queues.iter().map(|(_, n)| n.clone()));
        names.push(self.journal_queue.clone());
        names
    }

    fn base_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        for (name, value) in &self.queue_arguments {
            args.insert(name.as_str().into(), value.clone());
        }
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        if let (QueueType::Quorum, Some(size)) = (self.queue_type, self.quorum_initial_group_size) {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongInt(i32::from(size)),
            );
        }
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
        out.push((self.journal_queue.clone(), self.journal_arguments()));
        out
    }

    /// Sets the topology up at start: declares it (the default), or with
    /// `amqp.declare_topology = false` only verifies that it exists (see
    /// [`Topology::missing`]), failing with the list of what is missing.
    pub async fn declare(&self, conn: &Connection) -> Result<(), BrokerError> {
        if self.declares {
            return self.create(conn).await;
        }
        let missing = self.missing(conn).await?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(BrokerError::Missing {
                vhost: self.vhost.clone(),
                missing,
            })
        }
    }

    /// Declares the exchange and every queue; safe to run any number of
    /// times from any number of workers with the same settings. Needs
    /// configure permission on the names. A queue or exchange that exists
    /// with other arguments fails with the broker's explanation (which
    /// names the argument).
    pub async fn create(&self, conn: &Connection) -> Result<(), BrokerError> {
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
            .map_err(|e| declare_error("exchange", &self.events_exchange, &e))?;
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
                .map_err(|e| declare_error("queue", &name, &e))?;
        }
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// What of the topology does not exist, as `exchange NAME` / `queue
    /// NAME`, found with passive declarations (which need no permission).
    /// They prove existence only: AMQP gives a client no way to read a
    /// queue's arguments or an exchange's type without declaring it.
    pub async fn missing(&self, conn: &Connection) -> Result<Vec<String>, BrokerError> {
        let mut missing = Vec::new();
        let mut channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::Connection)?;
        let exchange = channel
            .exchange_declare(
                self.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let mut found = |what: String, result: Result<(), lapin::Error>| match result {
            Ok(()) => Ok(false),
            Err(e) if reply_code(&e) == Some(404) => {
                missing.push(what);
                Ok(true)
            }
            Err(e) => Err(BrokerError::Connection(e)),
        };
        let mut reopen = found(format!("exchange {}", self.events_exchange), exchange)?;
        for name in self.queue_names() {
            if reopen {
                // A failed passive declaration closes its channel.
                channel = conn
                    .create_channel()
                    .await
                    .map_err(BrokerError::Connection)?;
            }
            let result = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(drop);
            reopen = found(format!("queue {name}"), result)?;
        }
        if channel.status().connected() {
            let _ = channel.close(200, "topology verified".into()).await;
        }
        Ok(missing)
    }

    /// Counts the tickets waiting in the tracking and wait queues.
    pub async fn count_tracked(&self, channel: &Channel) -> Result<u64, lapin::Error> {
        let mut total = 0u64;
        let names =
            std::iter::once(&self.tracking_queue).chain(self.wait_queues.iter().map(|(_, n)| n));
        for name in names {
            total += u64::from(ready_messages(channel, name).await?);
        }
        Ok(total)
    }
}

/// Ready messages in a queue, by a passive declaration (which closes the
/// channel when the queue does not exist).
pub async fn ready_messages(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
}

fn argument_value(value: &QueueArgument) -> AMQPValue {
    match value {
        QueueArgument::Bool(b) => AMQPValue::Boolean(*b),
        QueueArgument::Int(i) => AMQPValue::LongLongInt(*i),
        QueueArgument::Float(f) => AMQPValue::Double(*f),
        QueueArgument::Text(t) => AMQPValue::LongString(t.as_str().into()),
    }
}

/// The AMQP reply code of a channel or connection error from the broker.
pub fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// The broker's own words for an error (`PRECONDITION_FAILED - inequivalent
/// arg 'x-queue-type' for queue ...`), or lapin's description.
fn broker_words(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => e.get_message().to_string(),
        _ => error.to_string(),
    }
}

pub(crate) fn declare_error(kind: &str, name: &str, error: &lapin::Error) -> BrokerError {
    let words = broker_words(error);
    let detail = match (reply_code(error), kind) {
        (Some(406), "queue") => format!(
            "the queue exists with different arguments: {words}. Delete it (once empty) so the worker can declare it again, or align amqp.queue_type, amqp.max_deliveries and amqp.queue_arguments with it"
        ),
        (Some(406), _) => format!(
            "the exchange exists with different settings: {words}. The worker needs a durable topic exchange"
        ),
        (Some(403), _) => format!(
            "the broker user may not declare it: {words}. Declaring needs configure permission on the name, and for a queue that dead-letters also read on the queue and write on amq.default (deploy/rabbitmq/README.md); or set amqp.declare_topology = false and have the operators create the topology"
        ),
        _ => words,
    };
    BrokerError::Topology {
        name: format!("{kind} {name}"),
        detail,
    }
}

/// Broker failures, by what the worker does about them.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Opening a channel (or another call on a connection) failed; retry
    /// with backoff.
    #[error("broker connection failed: {0}")]
    Connection(#[source] lapin::Error),
    /// Connecting failed: unreachable, TLS handshake, credentials or vhost.
    /// Retried with backoff; the reason says what to fix when it is not
    /// an outage.
    #[error("cannot connect to the broker at {broker}: {reason}")]
    Connect {
        /// The broker URL without password.
        broker: String,
        /// What went wrong, with a hint.
        reason: String,
    },
    /// A file named in the settings could not be read when connecting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A queue or exchange exists with other settings, or may not be
    /// declared: fatal at start.
    #[error("cannot declare {name}: {detail}")]
    Topology {
        /// `queue NAME` or `exchange NAME`.
        name: String,
        /// The broker's words and what to do.
        detail: String,
    },
    /// With `amqp.declare_topology = false`, some of the topology does not
    /// exist: fatal at start.
    #[error(
        "the broker topology is incomplete in vhost {vhost:?} (amqp.declare_topology = false, so the worker only checks it): missing {}. Create it as documented in deploy/rabbitmq/ (definitions.json), or set amqp.declare_topology = true to let the worker declare it",
        missing.join(", ")
    )]
    Missing {
        /// The vhost checked.
        vhost: String,
        /// `exchange NAME` / `queue NAME` entries.
        missing: Vec<String>,
    },
}

impl BrokerError {
    /// Whether the error means the worker cannot run with these settings on
    /// this broker (rather than "the broker is not reachable right now").
    pub fn is_fatal_at_start(&self) -> bool {
        matches!(self, Self::Topology { .. } | Self::Missing { .. })
    }
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
    /// There is no broker session right now (reconnecting).
    #[error("not connected to the broker")]
    NotConnected,
    /// A name or property is longer than AMQP allows (255 bytes).
    #[error("a name of {0} bytes is longer than AMQP allows (255)")]
    TooLong(usize),
}

/// A confirm-mode channel for publishing. Cheap to clone; many tasks publish
/// on it concurrently and each awaits its own confirm. When the broker
/// closes the channel because of one message (a 406 or 404 for it), the
/// publisher opens a fresh one on the same connection at the next publish:
/// the refusal is that message's failure, not the session's.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    conn: Arc<Connection>,
    channel: Mutex<Channel>,
    reopening: tokio::sync::Mutex<()>,
}

async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

impl Publisher {
    /// Opens a channel in confirm mode.
    pub async fn open(conn: Arc<Connection>) -> Result<Self, lapin::Error> {
        let channel = confirm_channel(&conn).await?;
        Ok(Self {
            inner: Arc::new(PublisherInner {
                conn,
                channel: Mutex::new(channel),
                reopening: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Whether publishing can work: the connection is up (a closed channel
    /// is reopened at the next publish).
    pub fn is_open(&self) -> bool {
        self.inner.conn.status().connected()
    }

    /// The connection it publishes on (for declarations that go with a
    /// publish, such as a quota ledger's).
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    fn current(&self) -> Channel {
        self.inner
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let channel = self.current();
        if channel.status().connected() {
            return Ok(channel);
        }
        if !self.is_open() {
            return Err(PublishError::NotConnected);
        }
        let _one_at_a_time = self.inner.reopening.lock().await;
        let channel = self.current();
        if channel.status().connected() {
            return Ok(channel);
        }
        let fresh = confirm_channel(&self.inner.conn).await?;
        *self
            .inner
            .channel
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        tracing::warn!(
            "the broker closed the publishing channel (it refused a message); opened a new one"
        );
        Ok(fresh)
    }

    /// Publishes and waits for the broker's confirm. `mandatory` messages
    /// that no queue takes are failures. Names longer than AMQP allows are
    /// refused here, before anything is sent.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let exchange = short_string(exchange)?;
        let routing_key = short_string(routing_key)?;
        let confirm = self
            .channel()
            .await?
            .basic_publish(
                exchange,
                routing_key,
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

    /// Claims a slot in the quota ledger `queue`: a small transient
    /// message the broker confirms while the window has room and refuses
    /// ([`PublishError::Nacked`]) when it is full.
    pub async fn claim_slot(&self, queue: &str) -> Result<(), PublishError> {
        self.publish(
            "",
            queue,
            b"",
            BasicProperties::default().with_delivery_mode(1),
            true,
        )
        .await
    }

    /// Closes the channel.
    pub async fn close(&self) {
        let _ = self.current().close(200, "bye".into()).await;
    }
}

/// An AMQP short string (exchange and queue names, `message_id`,
/// `correlation_id`, ...): at most 255 bytes, or the publish is refused
/// before anything is sent (lapin would panic while writing it).
pub fn short_string(text: &str) -> Result<ShortString, PublishError> {
    if text.len() > MAX_SHORT_STRING {
        return Err(PublishError::TooLong(text.len()));
    }
    Ok(ShortString::from(text))
}

/// Longest AMQP short string, in bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// The properties of a dead-letter copy, built field by field: never the
/// producer's `user_id` (the broker closes the channel when it does not
/// match the publishing user), `expiration` (the copy would vanish),
/// `priority`, `reply_to` or headers the broker acts on. Kept: the ids the
/// contract promises (`message_id`, `correlation_id`), the content type and
/// encoding, the timestamp, a valid `traceparent`, and the two headers that
/// say why and from where.
pub fn dead_letter_properties(
    original: &BasicProperties,
    why: &str,
    original_queue: &str,
    traceparent: Option<&str>,
) -> BasicProperties {
    let mut why: String = why.chars().take(MAX_ERROR_HEADER).collect();
    why.retain(|c| !c.is_control());
    let mut headers = FieldTable::default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(why)),
    );
    headers.insert(
        ORIGINAL_QUEUE_HEADER.into(),
        AMQPValue::LongString(LongString::from(original_queue)),
    );
    if let Some(tp) = traceparent {
        headers.insert(
            TRACEPARENT_HEADER.into(),
            AMQPValue::LongString(LongString::from(tp)),
        );
    }
    // A ticket's signatures stay with its copy, so that it can be sent
    // again once a worker holds the right key (64 hex digits or nothing:
    // whatever else a producer put there is not copied).
    for name in crate::signing::SIGNATURE_HEADERS {
        if let Some(sig) = header_str(original, name)
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(sig)));
        }
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    properties
}

/// How this process introduces itself to the broker (the connection name
/// in the management UI's connection list and `rabbitmqctl
/// list_connections client_properties`): program, role, host and process
/// id, and the request queue that tells deployments apart.
pub fn connection_name(role: &str, request_queue: &str) -> String {
    format!(
        "vidu-worker {role} {}#{} {request_queue}",
        host_name(),
        std::process::id()
    )
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

/// How long one node may take to accept a connection before the next node
/// of `amqp.url` is tried (a node that is down refuses at once; one behind
/// a dropped route would otherwise hold the attempt for minutes).
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The order in which one worker tries the nodes of `amqp.url`: shuffled
/// once per process (so a fleet spreads over the cluster), starting after
/// the node whose session was lost (so a dead node is tried last).
#[derive(Debug, Clone)]
pub struct NodeOrder {
    order: Vec<usize>,
    start: usize,
}

impl NodeOrder {
    /// A random order of `count` nodes.
    pub fn shuffled(count: usize) -> Self {
        use rand::seq::SliceRandom;
        let mut order: Vec<usize> = (0..count).collect();
        order.shuffle(&mut rand::rng());
        Self { order, start: 0 }
    }

    /// The nodes in the order `amqp.url` lists them (one-shot commands).
    pub fn listed(count: usize) -> Self {
        Self {
            order: (0..count).collect(),
            start: 0,
        }
    }

    /// Only node `index` (a check of each node in turn).
    pub fn only(index: usize) -> Self {
        Self {
            order: vec![index],
            start: 0,
        }
    }

    /// The node indices of the next attempt, each once.
    pub fn attempt(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.order.len();
        (0..n).map(move |k| self.order[(self.start + k) % n])
    }

    /// The session on node `index` was lost: the next attempt begins with
    /// the node after it.
    pub fn lost(&mut self, index: usize) {
        if let Some(pos) = self.order.iter().position(|i| *i == index) {
            self.start = (pos + 1) % self.order.len().max(1);
        }
    }
}

/// A connection and the node of `amqp.url` it reached.
pub struct Connected {
    /// The open connection.
    pub conn: Connection,
    /// The node's index in `amqp.url`.
    pub index: usize,
    /// The node's `host:port`, for logs and `/readyz`.
    pub node: String,
    /// The broker user the connection authenticated as.
    pub user: String,
}

/// Connects to the first node of `amqp.url` that answers, in the listed
/// order (see [`connect_to_any`]).
pub async fn connect(settings: &Settings, role: &str) -> Result<Connection, BrokerError> {
    let order = NodeOrder::listed(settings.amqp.node_count());
    connect_to_any(settings, role, &order).await.map(|c| c.conn)
}

/// Connects to the first node that answers, trying them in `order`: the
/// URL's host, port and vhost, credentials from the URL or `amqp.username`
/// / `amqp.password(_file)`, and for `amqps://` the `amqp.tls` files. When
/// no node answers, the error names each node and why. Errors never contain
/// a password.
pub async fn connect_to_any(
    settings: &Settings,
    role: &str,
    order: &NodeOrder,
) -> Result<Connected, BrokerError> {
    let amqp = &settings.amqp;
    let mut nodes: Vec<Option<crate::config::NodeUri>> =
        amqp.node_uris()?.into_iter().map(Some).collect();
    let tls = tls_config(amqp)?;
    let several = nodes.len() > 1;
    let mut reasons = Vec::new();
    for index in order.attempt() {
        let Some(node) = nodes.get_mut(index).and_then(Option::take) else {
            continue;
        };
        let user = node.uri.authority.userinfo.username.clone();
        let attempt = Connection::connect_uri_with_config(
            node.uri,
            connection_properties(role, &amqp.request_queue),
            tls.clone(),
            lapin::runtime::default_runtime().map_err(BrokerError::Connection)?,
        );
        let reason = match tokio::time::timeout(NODE_CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(conn)) => {
                return Ok(Connected {
                    conn,
                    index,
                    node: node.name,
                    user,
                })
            }
            Ok(Err(e)) => explain_connect_error(&e, amqp),
            Err(_) => format!(
                "no answer within {}",
                humantime::format_duration(NODE_CONNECT_TIMEOUT)
            ),
        };
        if several {
            tracing::debug!(node = %node.name, reason = %reason, "broker node did not answer");
            reasons.push(format!("{}: {reason}", node.name));
        } else {
            reasons.push(reason);
        }
    }
    Err(BrokerError::Connect {
        broker: amqp.display_url(),
        reason: if reasons.is_empty() {
            "amqp.url names no broker".into()
        } else {
            reasons.join("; ")
        },
    })
}

/// How this process introduces itself (see [`connection_name`]).
fn connection_properties(role: &str, request_queue: &str) -> ConnectionProperties {
    ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name(role, request_queue)))
        .with_client_property("product".into(), LongString::from("vidu-worker"))
        .with_client_property(
            "version".into(),
            LongString::from(env!("CARGO_PKG_VERSION")),
        )
        .with_client_property("host".into(), LongString::from(host_name()))
        .with_client_property(
            "pid".into(),
            LongString::from(std::process::id().to_string()),
        )
        .with_client_property("request_queue".into(), LongString::from(request_queue))
}

/// The TLS files, read now so that rotated certificates are used at the
/// next connection. Plain `amqp://` URLs ignore this configuration.
fn tls_config(amqp: &AmqpSettings) -> Result<OwnedTLSConfig, ConfigError> {
    let read = tls::read_file;
    let cert_chain = match &amqp.tls.ca_file {
        Some(path) => Some(
            String::from_utf8(read("amqp.tls.ca_file", path)?).map_err(|_| {
                ConfigError::new(
                    "amqp.tls.ca_file",
                    format!("{} is not a PEM file", path.display()),
                )
            })?,
        ),
        None => None,
    };
    let identity = match (&amqp.tls.cert_file, &amqp.tls.key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("amqp.tls.cert_file", cert)?,
            key: read("amqp.tls.key_file", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// What a failed connection attempt was, read from the libraries' typed
/// errors (lapin's error kind, the I/O error kind, rustls's error inside
/// it, the broker's AMQP reply code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The broker's certificate is not signed by a trusted CA.
    UnknownIssuer,
    /// The broker's certificate does not name the host.
    NameMismatch,
    /// The broker's certificate has expired or is not valid yet.
    CertificateExpired,
    /// The broker's certificate was refused for another reason.
    CertificateRefused,
    /// The port answered, but not with TLS.
    NotTls,
    /// The broker sent a TLS alert during the handshake.
    HandshakeAlert,
    /// The connection was closed before AMQP started.
    ClosedEarly,
    /// The broker refused the user name or password.
    Credentials,
    /// The user may not open the vhost, or it does not exist.
    Vhost,
    /// Anything else (unreachable, timed out, …): the library's words say it.
    Other,
}

/// Classifies a failed connection by the errors' types, never their words.
pub fn connect_failure(error: &lapin::Error) -> ConnectFailure {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => ConnectFailure::Credentials,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH) => {
                ConnectFailure::Vhost
            }
            _ => ConnectFailure::Other,
        },
        lapin::ErrorKind::AuthProviderError(_) => ConnectFailure::Credentials,
        lapin::ErrorKind::IOError(io) => io_failure(io),
        _ => ConnectFailure::Other,
    }
}

fn io_failure(io: &std::io::Error) -> ConnectFailure {
    use rustls::{CertificateError as C, Error as T};
    let mut cause: Option<&(dyn std::error::Error + 'static)> = io.get_ref().map(|e| e as _);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<T>() {
            return match tls {
                T::InvalidCertificate(C::UnknownIssuer) => ConnectFailure::UnknownIssuer,
                T::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                    ConnectFailure::NameMismatch
                }
                T::InvalidCertificate(
                    C::Expired
                    | C::ExpiredContext { .. }
                    | C::NotValidYet
                    | C::NotValidYetContext { .. },
                ) => ConnectFailure::CertificateExpired,
                T::InvalidCertificate(_) => ConnectFailure::CertificateRefused,
                T::InvalidMessage(_) | T::InappropriateMessage { .. } => ConnectFailure::NotTls,
                T::AlertReceived(_) => ConnectFailure::HandshakeAlert,
                _ => ConnectFailure::Other,
            };
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>() {
            if let Some(failure) = closed_early(inner.kind()) {
                return failure;
            }
        }
        cause = e.source();
    }
    closed_early(io.kind()).unwrap_or(ConnectFailure::Other)
}

fn closed_early(kind: std::io::ErrorKind) -> Option<ConnectFailure> {
    use std::io::ErrorKind as K;
    matches!(
        kind,
        K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof | K::ConnectionAborted
    )
    .then_some(ConnectFailure::ClosedEarly)
}

/// Turns a failed connection into one line that says what to fix. The
/// library's words are kept; the hint is added for the usual causes.
fn explain_connect_error(error: &lapin::Error, amqp: &AmqpSettings) -> String {
    let words = broker_words(error);
    match connect_hint(connect_failure(error), amqp) {
        Some(hint) => format!("{hint} ({words})"),
        None => words,
    }
}

/// The hint for a failed connection: what to fix, in the settings' words.
pub fn connect_hint(failure: ConnectFailure, amqp: &AmqpSettings) -> Option<String> {
    let trusted = match &amqp.tls.ca_file {
        Some(path) => format!(
            "the CA certificates in amqp.tls.ca_file ({}) and the system roots",
            path.display()
        ),
        None => "the system roots (set amqp.tls.ca_file to the broker's CA)".into(),
    };
    let tls = amqp.uses_tls();
    let ended = matches!(
        failure,
        ConnectFailure::ClosedEarly | ConnectFailure::HandshakeAlert
    );
    match failure {
        ConnectFailure::UnknownIssuer => Some(format!(
            "TLS handshake failed: the broker's certificate is not signed by a trusted CA; this worker trusts {trusted}"
        )),
        ConnectFailure::NameMismatch => Some("TLS handshake failed: the broker's certificate does not name the host of amqp.url; connect with a host name the certificate lists".into()),
        ConnectFailure::CertificateExpired => Some(
            "TLS handshake failed: the broker's certificate has expired or is not valid yet".into(),
        ),
        ConnectFailure::CertificateRefused => Some(format!(
            "TLS handshake failed: the broker's certificate was refused; this worker trusts {trusted}"
        )),
        ConnectFailure::NotTls => Some("TLS handshake failed: the port does not speak TLS (amqps:// needs the broker's TLS listener, 5671 by default)".into()),
        _ if tls && ended && amqp.tls.cert_file.is_none() => Some("the broker ended the TLS handshake: if it requires a client certificate (mutual TLS), set amqp.tls.cert_file and amqp.tls.key_file".into()),
        _ if tls && ended => Some("the broker ended the TLS handshake: it may not accept the client certificate of amqp.tls.cert_file (is it signed by a CA the broker trusts?)".into()),
        ConnectFailure::ClosedEarly => Some("the broker closed the connection before AMQP started: if this port is a TLS listener, use an amqps:// URL".into()),
        ConnectFailure::Credentials => Some("the broker refused the user name or password (from amqp.url, amqp.username, amqp.password or amqp.password_file)".into()),
        ConnectFailure::Vhost => Some("the user may not open this vhost, or it does not exist (the vhost is the path of amqp.url, percent-encoded: %2f is /)".into()),
        ConnectFailure::HandshakeAlert | ConnectFailure::Other => None,
    }
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
        assert_eq!(t.wait_queues[0].1, "vidu.requests.wait.2s");
        assert_eq!(t.wait_queues[9].1, "vidu.requests.wait.1024s");
        assert!(t
            .queue_names()
            .iter()
            .all(|n| n.starts_with("vidu.requests")));
    }

    /// The queue arguments users may not set (`amqp.queue_arguments`) are
    /// the ones the topology sets on the queues those arguments reach, plus
    /// `x-expires`, which it leaves unset on purpose. (The quota ledger's
    /// declaration takes no user arguments.)
    #[test]
    fn node_order_tries_each_node_once_and_the_lost_one_last() {
        let mut order = NodeOrder::listed(3);
        assert_eq!(order.attempt().collect::<Vec<_>>(), [0, 1, 2]);
        order.lost(0);
        assert_eq!(order.attempt().collect::<Vec<_>>(), [1, 2, 0]);
        order.lost(2);
        assert_eq!(order.attempt().collect::<Vec<_>>(), [0, 1, 2]);
        let one = NodeOrder::shuffled(1);
        assert_eq!(one.attempt().collect::<Vec<_>>(), [0]);
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let shuffled = NodeOrder::shuffled(3);
            let mut all: Vec<_> = shuffled.attempt().collect();
            firsts.insert(all[0]);
            all.sort_unstable();
            assert_eq!(all, [0, 1, 2]);
        }
        assert_eq!(firsts.len(), 3, "every node comes first for some worker");
        let mut empty = NodeOrder::shuffled(0);
        empty.lost(0);
        assert_eq!(empty.attempt().count(), 0);
    }

    #[test]
    fn quorum_queues_get_the_group_size_classic_queues_never() {
        let mut settings = Settings::default();
        settings.amqp.quorum_initial_group_size = Some(3);
        let mut declarations = Topology::new(&settings).queue_declarations();
        assert_eq!(declarations.len(), 3 + WAIT_TIERS_SECS.len() + 1);
        // The last is the journal, a stream (x-initial-cluster-size).
        declarations.pop();
        for (name, args) in &declarations {
            assert_eq!(
                args.inner().get("x-quorum-initial-group-size"),
                Some(&AMQPValue::LongInt(3)),
                "{name}"
            );
        }
        settings.amqp.queue_type = QueueType::Classic;
        for (name, args) in Topology::new(&settings).queue_declarations() {
            assert!(
                !args.inner().contains_key("x-quorum-initial-group-size"),
                "{name}"
            );
        }
        let unset = Topology::new(&Settings::default()).queue_declarations();
        assert!(unset
            .iter()
            .all(|(_, args)| !args.inner().contains_key("x-quorum-initial-group-size")));
    }

    #[test]
    fn the_journal_is_a_stream_that_keeps_records_a_day_past_the_longest_task() {
        let mut settings = Settings::default();
        settings.amqp.queue_arguments.insert(
            "x-queue-mode".into(),
            crate::config::QueueArgument::Text("lazy".into()),
        );
        let topology = Topology::new(&settings);
        let declarations = topology.queue_declarations();
        let (name, args) = declarations.last().expect("declarations");
        assert_eq!(name, "vidu.requests.journal");
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("stream".into()))
        );
        // 72 h + 24 h, written as RabbitMQ wants it (a whole number and a unit).
        assert_eq!(
            get("x-max-age"),
            Some(AMQPValue::LongString("345600s".into()))
        );
        assert_eq!(
            get("x-stream-max-segment-size-bytes"),
            Some(AMQPValue::LongLongInt(JOURNAL_SEGMENT_BYTES))
        );
        assert_eq!(
            get("x-queue-mode"),
            None,
            "queue_arguments are not a stream's"
        );
        assert_eq!(get("x-initial-cluster-size"), None);
        settings.amqp.quorum_initial_group_size = Some(3);
        let replicated = Topology::new(&settings).journal_arguments();
        assert_eq!(
            replicated.inner().get("x-initial-cluster-size").cloned(),
            Some(AMQPValue::LongInt(3))
        );
    }

    #[test]
    fn managed_queue_arguments_are_the_ones_the_topology_sets() {
        let mut set = std::collections::BTreeSet::new();
        for queue_type in [
            crate::config::QueueType::Quorum,
            crate::config::QueueType::Classic,
        ] {
            let mut settings = Settings::default();
            settings.amqp.queue_type = queue_type;
            settings.amqp.quorum_initial_group_size = Some(3);
            let topology = Topology::new(&settings);
            // The journal is a stream with arguments of its own, which
            // amqp.queue_arguments never touches.
            for (name, args) in topology.queue_declarations() {
                if name != topology.journal_queue {
                    set.extend(args.inner().keys().map(|k| k.to_string()));
                }
            }
        }
        let managed: std::collections::BTreeSet<String> = crate::config::MANAGED_QUEUE_ARGUMENTS
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect();
        let unmanaged: Vec<&String> = set.difference(&managed).collect();
        assert!(
            unmanaged.is_empty(),
            "the topology sets arguments users could override: {unmanaged:?}"
        );
        let unset: Vec<&String> = managed.difference(&set).collect();
        assert_eq!(
            unset,
            ["x-expires"],
            "managed but never set by the topology"
        );
    }
}
