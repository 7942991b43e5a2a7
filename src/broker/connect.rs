//! Connecting to the broker: the nodes of `amqp.url` in a per-worker
//! order, TLS and credentials from the settings, a connection name
//! operators recognise, and a refused connection classified into what to
//! fix (TLS, credentials, vhost) without ever naming the password.

use std::time::Duration;

use lapin::{
    tcp::{OwnedIdentity, OwnedTLSConfig},
    types::LongString,
    Connection, ConnectionProperties,
};

use super::error::{broker_words, BrokerError};
use crate::{
    config::{AmqpSettings, ConfigError, Settings},
    tls,
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
