//! The deployment's names and their declarations: the request, dead,
//! tracking and wait queues, the journal stream and the events exchange, all
//! derived from the request queue's name; declared idempotently, or checked
//! passively when operators own the topology, with the broker's refusal
//! turned into what to change.

use std::time::Duration;

use lapin::{
    options::{ExchangeDeclareOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, ExchangeKind,
};

use super::error::{broker_words, reply_code, BrokerError};
use crate::config::{QueueArgument, QueueType, Settings};

/// The delays of the wait queues the topology declares, shortest first. A
/// ticket waiting `d` hops through the largest tiers that fit
/// (`pipeline::decisions::wait_tier`) until at most the shortest tier is left,
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
    /// Where producers publish cancels (`<request_queue>.cancel`).
    pub cancel_queue: String,
    /// The lanes, `default` (the request queue) first: (name, queue,
    /// weight).
    pub lanes: Vec<Lane>,
}

/// One lane: a request queue of its own with a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// Its name (`default` for the request queue).
    pub name: String,
    /// Its queue: the request queue, or `<request_queue>.lane.<name>`.
    pub queue: String,
    /// Its share of the creates when several lanes wait.
    pub weight: u32,
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
            cancel_queue: format!("{rq}.cancel"),
            lanes: settings
                .amqp
                .lanes
                .lanes()
                .into_iter()
                .map(|(name, weight)| Lane {
                    queue: if name == crate::config::DEFAULT_LANE {
                        rq.clone()
                    } else {
                        format!("{rq}.lane.{name}")
                    },
                    name,
                    weight,
                })
                .collect(),
        }
    }

    /// The lane queues besides the request queue itself.
    pub fn extra_lanes(&self) -> impl Iterator<Item = &Lane> {
        self.lanes.iter().filter(|l| l.queue != self.request_queue)
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
        names.push(self.cancel_queue.clone());
        names.extend(self.extra_lanes().map(|l| l.queue.clone()));
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
        // Public, like the request queue: a cancel that cannot be read is
        // dead-lettered with the reason.
        let mut cancel = self.base_args();
        self.dead_letter_to(&mut cancel, &self.dead_queue, true);
        self.limit_deliveries(&mut cancel);
        out.push((self.cancel_queue.clone(), cancel));

        for lane in self.extra_lanes() {
            let mut args = self.base_args();
            self.dead_letter_to(&mut args, &self.dead_queue, true);
            self.limit_deliveries(&mut args);
            out.push((lane.queue.clone(), args));
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

    #[test]
    fn quorum_queues_get_the_group_size_classic_queues_never() {
        let mut settings = Settings::default();
        settings.amqp.quorum_initial_group_size = Some(3);
        let mut declarations = Topology::new(&settings).queue_declarations();
        // Dead, tracking, request, the wait tiers, cancel, the journal.
        assert_eq!(declarations.len(), 3 + WAIT_TIERS_SECS.len() + 2);
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

    /// The queue arguments users may not set (`amqp.queue_arguments`) are
    /// the ones the topology sets on the queues those arguments reach, plus
    /// `x-expires`, which it leaves unset on purpose. (The quota ledger's
    /// declaration takes no user arguments.)
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
