//! Broker failures, by what the worker does about them, and the broker's
//! own words for an error (its reply code and text).

use crate::config::ConfigError;

/// The AMQP reply code of a channel or connection error from the broker.
pub fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// The broker's own words for an error (`PRECONDITION_FAILED - inequivalent
/// arg 'x-queue-type' for queue ...`), or lapin's description.
pub(super) fn broker_words(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => e.get_message().to_string(),
        _ => error.to_string(),
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
