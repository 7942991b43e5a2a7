//! The deployment's journal: facts every worker of a deployment must know,
//! kept in the broker the deployment already has.
//!
//! The journal is a RabbitMQ stream, `<request_queue>.journal`. Unlike a
//! queue, a stream keeps its messages for every reader: each worker reads
//! it from the first record at start and then follows it, so a fact one
//! worker writes reaches all of them, including workers that join later,
//! without a database. Records are small JSON messages told apart by their
//! AMQP `type`; a record of an unknown type or over [`MAX_RECORD_BYTES`] is
//! skipped, so newer versions can add kinds. Retention is the stream's
//! (`x-max-age`, set a day beyond `polling.max_off_peak_task_age`, and
//! `x-max-length-bytes`), applied by segment.
//!
//! Records so far:
//!
//! - the **deployment key** (`vidu-worker.deployment-key.v1`): 32 random
//!   bytes that sign tickets ([`crate::signing`]). Anyone who may write to
//!   the default exchange can write into the stream, so a key record counts
//!   only when its AMQP `user_id` is the broker user this worker connects
//!   as: RabbitMQ refuses a `user_id` other than the publisher's own, so
//!   only the deployment's own user can have written it. The first worker
//!   finds none and writes one; two that start together both write, and
//!   every key found is accepted for verification while the first one in
//!   the stream signs. Workers write the key again once a day, so that
//!   retention never removes the last copy.
//! - **sync** marks (`vidu-worker.sync.v1`): a worker writes a random nonce
//!   and reads until it sees it, which proves it has read everything
//!   written before (see [`Journal::sync`]).
//!
//! This module never logs key material and never acts on a record it
//! cannot authenticate.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    broker::{PublishError, Publisher},
    signing::Signer,
};

/// AMQP `type` of a deployment key record.
pub const KEY_RECORD: &str = "vidu-worker.deployment-key.v1";
/// AMQP `type` of a sync mark.
pub const SYNC_RECORD: &str = "vidu-worker.sync.v1";
/// Header RabbitMQ puts on every message a stream delivers: its offset.
pub const OFFSET_HEADER: &str = "x-stream-offset";
/// Largest record read; a larger message is skipped.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Records one worker reads ahead (the stream consumer's prefetch).
pub const PREFETCH: u16 = 1000;
/// Acknowledgements (which only return credit on a stream) go out once per
/// this many records.
const ACK_EVERY: u64 = 200;
/// How long a sync may take before the session is given up.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// A deployment key record is written again when the newest copy is older.
pub const KEY_REFRESH_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How often a follower looks at the key's age.
const KEY_REFRESH_CHECK: Duration = Duration::from_secs(3600);
/// Sync nonces remembered (a worker waits for its own, seconds at most).
const MAX_NONCES: usize = 1024;

/// A deployment key record's body.
#[derive(Debug, Serialize, Deserialize)]
struct KeyRecord {
    v: u8,
    /// 64 hex digits.
    key: String,
    at: DateTime<Utc>,
}

/// A sync mark's body.
#[derive(Debug, Serialize, Deserialize)]
struct SyncRecord {
    nonce: String,
}

/// What the journal has told this worker so far.
#[derive(Debug, Default)]
struct State {
    /// Where to resume reading after a reconnect.
    next_offset: Option<i64>,
    /// When the newest key record of this deployment's user was written.
    newest_key_at: Option<DateTime<Utc>>,
    /// The material of the first key record read (the signing one).
    signing_key: Option<String>,
    /// Sync nonces seen, oldest first.
    nonces: VecDeque<String>,
    nonce_set: HashSet<String>,
    /// Records applied.
    applied: u64,
}

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A record could not be written.
    #[error("cannot write to the journal: {0}")]
    Publish(#[from] PublishError),
    /// The stream could not be read.
    #[error("cannot read the journal: {0}")]
    Read(#[source] lapin::Error),
    /// The broker ended the journal consumer.
    #[error("the broker ended the journal consumer")]
    Ended,
    /// A sync mark did not come back in time.
    #[error("the journal did not return a sync mark within {0:?}")]
    SyncTimeout(Duration),
    /// A key record was written but not read back as this user's.
    #[error("the deployment key written to the journal was not read back as user {0:?}'s (is amqp.url's user the one the broker authenticates?)")]
    KeyNotAccepted(String),
}

/// The deployment's journal, as one worker reads and writes it.
pub struct Journal {
    queue: String,
    signer: Arc<Signer>,
    /// The broker user this worker connects as (`user_id` of key records).
    user: Mutex<Option<String>>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Journal {
    /// The journal in stream `queue`; deployment keys read from it go to
    /// `signer`.
    pub fn new(queue: String, signer: Arc<Signer>) -> Self {
        Self {
            queue,
            signer,
            user: Mutex::new(None),
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
        }
    }

    /// The stream's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the broker user of the current session.
    pub fn set_user(&self, user: &str) {
        *self.user.lock().unwrap_or_else(PoisonError::into_inner) = Some(user.to_owned());
    }

    fn user(&self) -> Option<String> {
        self.user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The consumer argument that resumes where this worker stopped
    /// reading, or starts from the first record.
    fn start_offset(&self) -> AMQPValue {
        match self.state().next_offset {
            Some(offset) => AMQPValue::LongLongInt(offset),
            None => AMQPValue::LongString("first".into()),
        }
    }

    /// Reads the journal on `channel` until the consumer ends (the session
    /// is going), applying each record; writes the deployment key again
    /// through `publisher` when its newest copy grows old. Returns why it
    /// stopped.
    pub async fn follow(
        &self,
        channel: Channel,
        consumer_tag: String,
        publisher: Publisher,
    ) -> JournalError {
        if let Err(e) = channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
        {
            return JournalError::Read(e);
        }
        let mut args = FieldTable::default();
        args.insert(OFFSET_HEADER.into(), self.start_offset());
        let mut consumer = match channel
            .basic_consume(
                self.queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => return JournalError::Read(e),
        };
        let mut refresh = tokio::time::interval(KEY_REFRESH_CHECK);
        refresh.tick().await;
        let mut unacked: u64 = 0;
        loop {
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(d)) => {
                        self.apply(&d.properties, &d.data);
                        unacked += 1;
                        if unacked >= ACK_EVERY {
                            unacked = 0;
                            if let Err(e) = d.acker.ack(BasicAckOptions { multiple: true }).await {
                                return JournalError::Read(e);
                            }
                        }
                    }
                    Some(Err(e)) => return JournalError::Read(e),
                    None => return JournalError::Ended,
                },
                _ = refresh.tick() => {
                    if let Err(e) = self.refresh_key(&publisher).await {
                        tracing::warn!(error = %e, "could not write the deployment key to the journal again");
                    }
                }
            }
        }
    }

    /// Applies one record read from the stream.
    fn apply(&self, properties: &BasicProperties, body: &[u8]) {
        let offset =
            properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(OFFSET_HEADER) {
                    Some(AMQPValue::LongLongInt(o)) => Some(*o),
                    _ => None,
                });
        {
            let mut state = self.state();
            if let Some(o) = offset {
                state.next_offset = Some(o.saturating_add(1));
            }
            state.applied += 1;
        }
        if body.len() <= MAX_RECORD_BYTES {
            match properties.kind().as_ref().map(|k| k.as_str()) {
                Some(KEY_RECORD) => self.apply_key(properties, body),
                Some(SYNC_RECORD) => self.apply_sync(body),
                _ => {}
            }
        }
        let applied = self.state().applied;
        self.changed.send_replace(applied);
    }

    fn apply_key(&self, properties: &BasicProperties, body: &[u8]) {
        let Some(user) = self.user() else { return };
        let written_by = properties.user_id().as_ref().map(|u| u.as_str());
        if written_by != Some(user.as_str()) {
            // Not written by this deployment's broker user: anyone could
            // have written it.
            return;
        }
        let Ok(record) = serde_json::from_slice::<KeyRecord>(body) else {
            return;
        };
        if record.v != 1
            || record.key.len() != 64
            || !record.key.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return;
        }
        let new = self.signer.add_deployment_key(&record.key);
        let mut state = self.state();
        if state.signing_key.is_none() {
            state.signing_key = Some(record.key.clone());
        }
        if state.newest_key_at.is_none_or(|at| record.at > at) {
            state.newest_key_at = Some(record.at.min(Utc::now()));
        }
        drop(state);
        if new {
            tracing::info!("read a deployment key from the journal");
        }
    }

    fn apply_sync(&self, body: &[u8]) {
        let Ok(record) = serde_json::from_slice::<SyncRecord>(body) else {
            return;
        };
        if record.nonce.len() > 64 {
            return;
        }
        let mut state = self.state();
        if state.nonce_set.insert(record.nonce.clone()) {
            state.nonces.push_back(record.nonce);
            while state.nonces.len() > MAX_NONCES {
                if let Some(old) = state.nonces.pop_front() {
                    state.nonce_set.remove(&old);
                }
            }
        }
    }

    /// Writes one record and waits for the broker's confirm.
    async fn write(
        &self,
        publisher: &Publisher,
        kind: &str,
        body: &[u8],
        user_id: Option<&str>,
    ) -> Result<(), JournalError> {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_type(kind.into());
        if let Some(user) = user_id {
            properties = properties.with_user_id(crate::broker::short_string(user)?);
        }
        publisher
            .publish("", &self.queue, body, properties, true)
            .await?;
        Ok(())
    }

    /// Writes a sync mark and waits until this worker has read it: every
    /// record written before is then applied.
    pub async fn sync(&self, publisher: &Publisher) -> Result<(), JournalError> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let body = serde_json::to_vec(&SyncRecord {
            nonce: nonce.clone(),
        })
        .unwrap_or_default();
        let mut changes = self.changed.subscribe();
        self.write(publisher, SYNC_RECORD, &body, None).await?;
        let seen = async {
            loop {
                if self.state().nonce_set.contains(&nonce) {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(SYNC_TIMEOUT, seen)
            .await
            .map_err(|_| JournalError::SyncTimeout(SYNC_TIMEOUT))
    }

    /// Makes sure the deployment has a key: after a [`Journal::sync`], the
    /// first key record of this deployment's user signs; when there is
    /// none, this worker writes one and reads it back. Returns `Ok(false)`
    /// when the broker user is unknown (no key can be authenticated then).
    pub async fn ensure_key(&self, publisher: &Publisher) -> Result<bool, JournalError> {
        if self.signer.has_deployment_key() {
            return Ok(true);
        }
        let Some(user) = self.user() else {
            return Ok(false);
        };
        let mut material = [0u8; 32];
        rand::fill(&mut material);
        let record = KeyRecord {
            v: 1,
            key: hex::encode(material),
            at: Utc::now(),
        };
        let body = serde_json::to_vec(&record).unwrap_or_default();
        self.write(publisher, KEY_RECORD, &body, Some(&user))
            .await?;
        self.sync(publisher).await?;
        if self.signer.has_deployment_key() {
            tracing::info!(
                "wrote a new deployment key to the journal (the first worker of this deployment)"
            );
            Ok(true)
        } else {
            Err(JournalError::KeyNotAccepted(user))
        }
    }

    /// Writes the signing key again when its newest copy in the stream is
    /// older than [`KEY_REFRESH_AFTER`], so retention never removes it.
    pub async fn refresh_key(&self, publisher: &Publisher) -> Result<(), JournalError> {
        let (material, newest) = {
            let state = self.state();
            (state.signing_key.clone(), state.newest_key_at)
        };
        let (Some(material), Some(user)) = (material, self.user()) else {
            return Ok(());
        };
        let old = newest.is_none_or(|at| {
            (Utc::now() - at).to_std().unwrap_or(Duration::ZERO) >= KEY_REFRESH_AFTER
        });
        if !old {
            return Ok(());
        }
        let record = KeyRecord {
            v: 1,
            key: material,
            at: Utc::now(),
        };
        let body = serde_json::to_vec(&record).unwrap_or_default();
        self.write(publisher, KEY_RECORD, &body, Some(&user)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;
    use secrecy::SecretString;

    fn journal() -> (Journal, Arc<Signer>) {
        let signer = Arc::new(Signer::new(&SecretString::from("sk-test"), &[], "q", false));
        (Journal::new("q.journal".into(), signer.clone()), signer)
    }

    fn props(kind: &str, user: Option<&str>, offset: i64) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(OFFSET_HEADER.into(), AMQPValue::LongLongInt(offset));
        let mut p = BasicProperties::default()
            .with_type(kind.into())
            .with_headers(headers);
        if let Some(u) = user {
            p = p.with_user_id(ShortString::from(u));
        }
        p
    }

    fn key_body(key: &str) -> Vec<u8> {
        serde_json::to_vec(&KeyRecord {
            v: 1,
            key: key.into(),
            at: Utc::now(),
        })
        .expect("json")
    }

    #[test]
    fn only_key_records_of_this_deployments_user_are_accepted() {
        let (j, signer) = journal();
        j.set_user("vidu-worker");
        let good = "a".repeat(64);
        // Table: who wrote it, what it says, whether it counts.
        let cases: &[(Option<&str>, Vec<u8>, bool)] = &[
            (None, key_body(&good), false),
            (Some("a-producer"), key_body(&good), false),
            (Some("vidu-worker"), key_body("short"), false),
            (Some("vidu-worker"), key_body(&"z".repeat(64)), false),
            (Some("vidu-worker"), b"not json".to_vec(), false),
            (Some("vidu-worker"), vec![b' '; MAX_RECORD_BYTES + 1], false),
            (Some("vidu-worker"), key_body(&good), true),
        ];
        for (i, (user, body, counts)) in cases.iter().enumerate() {
            let before = signer.has_deployment_key();
            j.apply(&props(KEY_RECORD, *user, i as i64), body);
            assert_eq!(
                signer.has_deployment_key(),
                before || *counts,
                "case {i}: {user:?}"
            );
        }
        assert_eq!(j.state().next_offset, Some(cases.len() as i64));
        assert_eq!(j.state().signing_key.as_deref(), Some(good.as_str()));
    }

    #[test]
    fn sync_marks_are_remembered_and_bounded() {
        let (j, _) = journal();
        for i in 0..(MAX_NONCES + 10) {
            let body = serde_json::to_vec(&SyncRecord {
                nonce: format!("n{i}"),
            })
            .expect("json");
            j.apply(&props(SYNC_RECORD, None, i as i64), &body);
        }
        let state = j.state();
        assert_eq!(state.nonces.len(), MAX_NONCES);
        assert!(!state.nonce_set.contains("n0"));
        assert!(state.nonce_set.contains(&format!("n{}", MAX_NONCES + 9)));
    }

    #[test]
    fn reading_resumes_after_the_last_record_read() {
        let (j, _) = journal();
        assert!(matches!(j.start_offset(), AMQPValue::LongString(_)));
        j.apply(&props("something.newer.v7", None, 41), b"{}");
        assert!(matches!(j.start_offset(), AMQPValue::LongLongInt(42)));
    }
}
