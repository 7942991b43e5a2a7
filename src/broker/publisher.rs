//! Confirmed publishing: a confirm-mode channel shared by every task of a
//! session, each awaiting its own confirm; a nack or an unroutable return is
//! that message's failure, and a channel the broker closed over one message
//! is reopened for the next.

use std::sync::{Arc, Mutex, PoisonError};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
    BasicProperties, Channel, Connection,
};

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
