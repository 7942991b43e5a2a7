//! Broker: names, topology, connections and confirmed publishing, by role.
//!
//! [`topology`] owns every queue and exchange name the worker uses (all
//! derived from the request queue's name, so several deployments can share
//! a vhost) and declares them idempotently — or, when operators own the
//! topology (`amqp.declare_topology = false`), only checks with passive
//! declarations that they exist. [`connect`] opens connections (TLS,
//! credentials from the URL or from settings, the nodes of a cluster in a
//! per-worker order) that operators can recognise in the management UI, and
//! says what to fix when a connection is refused. [`publisher`] publishes
//! with publisher confirms, treating a nack or an unroutable return as a
//! failure. [`headers`] names the headers the worker reads and writes and
//! builds a dead-letter copy's properties. Nothing here acks or nacks
//! deliveries; handlers do that once their outputs are confirmed. Nothing
//! here puts a password in an error or a log line: errors name the broker by
//! [`AmqpSettings::display_url`](crate::config::AmqpSettings::display_url).

pub mod connect;
pub mod error;
pub mod headers;
pub mod publisher;
pub mod topology;

pub use connect::{
    connect, connect_failure, connect_hint, connect_to_any, connection_name, host_name,
    ConnectFailure, Connected, NodeOrder, NODE_CONNECT_TIMEOUT,
};
pub use error::{reply_code, BrokerError};
pub use headers::{
    dead_letter_properties, header_int, header_str, DELIVERY_COUNT_HEADER, ERROR_HEADER,
    MAX_ERROR_HEADER, ORIGINAL_QUEUE_HEADER, TRACEPARENT_HEADER,
};
pub use publisher::{short_string, PublishError, Publisher, MAX_SHORT_STRING};
pub(crate) use topology::declare_error;
pub use topology::{
    ready_messages, Lane, Topology, JOURNAL_MAX_BYTES, JOURNAL_SEGMENT_BYTES, WAIT_TIERS_SECS,
};
