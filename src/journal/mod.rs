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
//! - **created** records (`vidu-worker.created.v1`): a create the upstream
//!   accepted (request id, task id, model, when), written by the worker
//!   that made it. Together they are the fleet's accepted creates, which
//!   the quota learner counts per window, and the request ids the fleet
//!   has created ([`created::CreatedIndex`]), which no worker creates
//!   again.
//! - **refused** records (`vidu-worker.refused.v1`): a create the upstream
//!   answered 429 (when it was sent, when the answer came), so that the
//!   quota learner sees the fleet's refusals, not one worker's.
//! - **canceled** records (`vidu-worker.canceled.v1`): request ids a
//!   producer canceled (read from `<request_queue>.cancel` by any worker),
//!   which no worker creates and whose tasks no worker tracks any more
//!   ([`canceled::CanceledIds`]).
//! - **quota** records (`vidu-worker.quota.v1`): what the fleet learned of
//!   the account's create quota ([`LearnedQuota`]); the latest one counts,
//!   so every worker, and every worker that joins later, paces by it.
//!
//! Records other than keys and sync marks are signed like tickets and
//! skipped unless they verify. This module never logs key material and
//! never acts on a record it cannot authenticate.

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

pub mod canceled;
pub mod created;

use self::canceled::{Canceled, CanceledIds};
use self::created::{CreatedIndex, Remembered};
use crate::{
    broker::{PublishError, Publisher},
    request::RequestId,
    signing::{Presented, Signer},
};

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// AMQP `type` of a deployment key record.
pub const KEY_RECORD: &str = "vidu-worker.deployment-key.v1";
/// AMQP `type` of a sync mark.
pub const SYNC_RECORD: &str = "vidu-worker.sync.v1";
/// AMQP `type` of a created record.
pub const CREATED_RECORD: &str = "vidu-worker.created.v1";
/// AMQP `type` of a learned quota record.
pub const QUOTA_RECORD: &str = "vidu-worker.quota.v1";
/// AMQP `type` of a canceled record.
pub const CANCELED_RECORD: &str = "vidu-worker.canceled.v1";
/// AMQP `type` of a refused-create record.
pub const REFUSED_RECORD: &str = "vidu-worker.refused.v1";
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
/// Refused creates remembered.
const MAX_REFUSALS: usize = 1024;

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

/// A create the upstream accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// Format version.
    pub v: u8,
    /// The request's own id (`request_id` or `message_id`), when it had
    /// one; a generated id could never be seen again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    /// The upstream task.
    pub task_id: String,
    /// The model.
    pub model: String,
    /// When the upstream's acceptance arrived.
    pub at: DateTime<Utc>,
}

impl Created {
    /// Whether every field is one a worker writes.
    fn valid(&self) -> bool {
        self.v == 1
            && crate::upstream::valid_task_id(&self.task_id)
            && crate::model::Model::parse(&self.model).is_some()
    }
}

/// A fact the fleet writes into the journal, signed.
pub trait Record: Serialize {
    /// Its AMQP `type`.
    const KIND: &'static str;
}

impl Record for Created {
    const KIND: &'static str = CREATED_RECORD;
}

impl Record for Refused {
    const KIND: &'static str = REFUSED_RECORD;
}

impl Record for Canceled {
    const KIND: &'static str = CANCELED_RECORD;
}

impl Record for LearnedQuota {
    const KIND: &'static str = QUOTA_RECORD;
}

/// A create the upstream refused with a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// When the create was sent.
    pub sent_at: DateTime<Utc>,
    /// When the 429 came back.
    pub answered_at: DateTime<Utc>,
}

/// What the fleet has learned of the account's create quota: at most
/// `creates` accepted creates in any `window_ms`. The latest record in the
/// journal counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedQuota {
    /// Creates per window (at least 1).
    pub creates: u32,
    /// The window, in milliseconds.
    pub window_ms: u64,
    /// While probing for a higher quota: how much the last raise added
    /// (0: not probing).
    pub step: u32,
    /// Windows spent at the cap, without a refusal, before the next probe.
    pub probe_after: u32,
    /// When it was learned.
    pub at: DateTime<Utc>,
}

impl LearnedQuota {
    /// The window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Whether every field is in range.
    fn valid(&self) -> bool {
        self.creates >= 1
            && self.creates <= 1_000_000
            && (1_000..=86_400_000).contains(&self.window_ms)
            && self.probe_after >= 1
            && self.probe_after <= 1_024
    }
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
    /// When the fleet's creates were accepted, oldest first, over the last
    /// two quota windows.
    accepts: VecDeque<DateTime<Utc>>,
    /// The fleet's refused creates, oldest first, over the last two
    /// windows (at most [`MAX_REFUSALS`]).
    refusals: VecDeque<Refused>,
    /// The latest learned quota.
    quota: Option<LearnedQuota>,
    /// The request ids the fleet created.
    created: CreatedIndex,
    /// The request ids producers canceled.
    canceled: CanceledIds,
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
    /// The window the upstream counts creates in (for how long accepts are
    /// kept).
    quota_window: Duration,
    /// How long a created request id is remembered.
    created_max_age: Duration,
    /// When the latest completed sync started (syncs in a burst share one).
    synced: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// The broker user this worker connects as (`user_id` of key records).
    user: Mutex<Option<String>>,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

impl Journal {
    /// The journal in stream `queue`; deployment keys read from it go to
    /// `signer`; creates are counted per `quota_window`, and their request
    /// ids remembered for `created_max_age`.
    pub fn new(
        queue: String,
        signer: Arc<Signer>,
        quota_window: Duration,
        created_max_age: Duration,
    ) -> Self {
        Self {
            queue,
            signer,
            quota_window,
            created_max_age,
            synced: tokio::sync::Mutex::new(None),
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
                Some(CREATED_RECORD) if self.authentic(properties, body) => {
                    self.apply_created(body);
                }
                Some(QUOTA_RECORD) if self.authentic(properties, body) => self.apply_quota(body),
                Some(REFUSED_RECORD) if self.authentic(properties, body) => {
                    self.apply_refused(body);
                }
                Some(CANCELED_RECORD) if self.authentic(properties, body) => {
                    self.apply_canceled(body);
                }
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

    /// Whether a record is signed by this deployment.
    fn authentic(&self, properties: &BasicProperties, body: &[u8]) -> bool {
        self.signer
            .verify(body, Presented::from_properties(properties))
            .is_ok()
    }

    fn apply_created(&self, body: &[u8]) {
        let Ok(record) = serde_json::from_slice::<Created>(body) else {
            return;
        };
        if !record.valid() {
            return;
        }
        let at = record.at.min(Utc::now());
        let horizon = Utc::now() - to_chrono(self.quota_window * 2);
        let mut state = self.state();
        if let Some(id) = &record.request_id {
            let entry = Remembered {
                task_id: record.task_id.as_str().into(),
                model: record.model.as_str().into(),
                at,
            };
            let kept_since = Utc::now() - to_chrono(self.created_max_age);
            state
                .created
                .remember(created::digest(id), entry, kept_since);
        }
        // Records arrive about in time order; keep the list sorted.
        let pos = state.accepts.partition_point(|t| *t <= at);
        state.accepts.insert(pos, at);
        while state.accepts.front().is_some_and(|t| *t < horizon) {
            state.accepts.pop_front();
        }
    }

    fn apply_canceled(&self, body: &[u8]) {
        let Ok(record) = serde_json::from_slice::<Canceled>(body) else {
            return;
        };
        if record.v != 1 {
            return;
        }
        let at = record.at.min(Utc::now());
        let kept_since = Utc::now() - to_chrono(self.created_max_age);
        let mut state = self.state();
        for id in &record.request_ids {
            state.canceled.remember(created::digest(id), at, kept_since);
        }
    }

    /// Whether a producer canceled request `id` (as far as the journal has
    /// been read).
    pub fn canceled(&self, id: &RequestId) -> bool {
        self.state().canceled.contains(&created::digest(id))
    }

    fn apply_refused(&self, body: &[u8]) {
        let Ok(record) = serde_json::from_slice::<Refused>(body) else {
            return;
        };
        if record.sent_at > record.answered_at {
            return;
        }
        let horizon = Utc::now() - to_chrono(self.quota_window * 2);
        let mut state = self.state();
        if state.refusals.contains(&record) {
            return;
        }
        state.refusals.push_back(record);
        while state.refusals.len() > MAX_REFUSALS
            || state
                .refusals
                .front()
                .is_some_and(|r| r.answered_at < horizon)
        {
            state.refusals.pop_front();
        }
    }

    /// The fleet's refused creates whose 429 came back after `after` (all,
    /// when `None`), oldest first.
    pub fn refusals_answered_after(&self, after: Option<DateTime<Utc>>) -> Vec<Refused> {
        self.state()
            .refusals
            .iter()
            .filter(|r| after.is_none_or(|a| r.answered_at > a))
            .copied()
            .collect()
    }

    fn apply_quota(&self, body: &[u8]) {
        let Ok(record) = serde_json::from_slice::<LearnedQuota>(body) else {
            return;
        };
        if !record.valid() {
            return;
        }
        self.state().quota = Some(record);
    }

    /// How many of the fleet's creates were accepted in `from..=to`.
    pub fn accepted_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> usize {
        let state = self.state();
        let start = state.accepts.partition_point(|t| *t < from);
        let end = state.accepts.partition_point(|t| *t <= to);
        end.saturating_sub(start)
    }

    /// When the fleet's creates accepted in `from..=to` were accepted,
    /// oldest first.
    pub fn accepted_times(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let state = self.state();
        state
            .accepts
            .iter()
            .filter(|t| **t >= from && **t <= to)
            .copied()
            .collect()
    }

    /// When the fleet's latest accepted create was accepted.
    pub fn last_accept_at(&self) -> Option<DateTime<Utc>> {
        self.state().accepts.back().copied()
    }

    /// The create of request `id` by any worker of the fleet, as far as
    /// this worker has read the journal.
    pub fn created(&self, id: &RequestId) -> Option<Remembered> {
        let kept_since = Utc::now() - to_chrono(self.created_max_age);
        let mut state = self.state();
        state.created.forget_before(kept_since);
        state.created.get(&created::digest(id)).cloned()
    }

    /// How many created request ids this worker remembers, and how many
    /// it forgot before their age because there were too many.
    pub fn created_remembered(&self) -> (usize, u64) {
        let state = self.state();
        (state.created.len(), state.created.evicted_young())
    }

    /// The latest learned quota.
    pub fn learned_quota(&self) -> Option<LearnedQuota> {
        self.state().quota
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

    /// Writes a fact for the fleet ([`Created`], [`Refused`],
    /// [`LearnedQuota`]), signed like a ticket, and waits for the broker's
    /// confirm.
    pub async fn record<R: Record>(
        &self,
        publisher: &Publisher,
        record: &R,
    ) -> Result<(), JournalError> {
        let body = serde_json::to_vec(record).unwrap_or_default();
        let properties = Self::properties(R::KIND).with_headers(self.signer.sign(&body).headers());
        self.write(publisher, &body, properties).await
    }

    /// The properties every record has.
    fn properties(kind: &str) -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_type(kind.into())
    }

    /// Writes one record and waits for the broker's confirm.
    async fn write(
        &self,
        publisher: &Publisher,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), JournalError> {
        publisher
            .publish("", &self.queue, body, properties, true)
            .await?;
        Ok(())
    }

    /// Writes a deployment key record as `user` (the broker checks it).
    async fn write_key(
        &self,
        publisher: &Publisher,
        record: &KeyRecord,
        user: &str,
    ) -> Result<(), JournalError> {
        let body = serde_json::to_vec(record).unwrap_or_default();
        let properties =
            Self::properties(KEY_RECORD).with_user_id(crate::broker::short_string(user)?);
        self.write(publisher, &body, properties).await
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
        self.write(publisher, &body, Self::properties(SYNC_RECORD))
            .await?;
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

    /// Makes sure everything written to the journal before `since` has
    /// been read: a sync that started after `since` (another caller's)
    /// serves, so a burst of callers shares one sync mark.
    pub async fn sync_since(
        &self,
        publisher: &Publisher,
        since: tokio::time::Instant,
    ) -> Result<(), JournalError> {
        let mut synced = self.synced.lock().await;
        if synced.is_some_and(|started| started >= since) {
            return Ok(());
        }
        let started = tokio::time::Instant::now();
        self.sync(publisher).await?;
        *synced = Some(started);
        Ok(())
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
        self.write_key(publisher, &record, &user).await?;
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
        self.write_key(publisher, &record, &user).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;
    use secrecy::SecretString;

    fn journal() -> (Journal, Arc<Signer>) {
        let signer = Arc::new(Signer::new(&SecretString::from("sk-test"), &[], "q", false));
        (
            Journal::new(
                "q.journal".into(),
                signer.clone(),
                Duration::from_secs(60),
                Duration::from_secs(3600),
            ),
            signer,
        )
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

    fn signed(j: &Journal, kind: &str, body: &[u8], offset: i64) -> BasicProperties {
        props(kind, None, offset).with_headers({
            let mut h = j.signer.sign(body).headers();
            h.insert(OFFSET_HEADER.into(), AMQPValue::LongLongInt(offset));
            h
        })
    }

    #[test]
    fn only_signed_created_records_count_and_they_are_counted_per_window() {
        let (j, _) = journal();
        let now = Utc::now();
        let created = |secs_ago: i64, task: &str| {
            serde_json::to_vec(&Created {
                v: 1,
                request_id: None,
                task_id: task.into(),
                model: "vidu-q3-pro-i2v".into(),
                at: now - chrono::Duration::seconds(secs_ago),
            })
            .expect("json")
        };
        // Unsigned: a producer's; skipped.
        j.apply(&props(CREATED_RECORD, None, 0), &created(1, "t-0"));
        assert_eq!(j.last_accept_at(), None);
        for (k, ago) in [50, 40, 30, 5, 1].iter().enumerate() {
            let body = created(*ago, &format!("t-{k}"));
            j.apply(&signed(&j, CREATED_RECORD, &body, k as i64 + 1), &body);
        }
        // Signed but not a worker's record: skipped too.
        let bad = created(1, &"x".repeat(300));
        j.apply(&signed(&j, CREATED_RECORD, &bad, 9), &bad);
        let minute = chrono::Duration::seconds(60);
        assert_eq!(j.accepted_between(now - minute, now), 5);
        assert_eq!(
            j.accepted_between(now - chrono::Duration::seconds(35), now),
            3
        );
        assert_eq!(
            j.accepted_times(now - chrono::Duration::seconds(10), now)
                .len(),
            2
        );
        assert!(j.last_accept_at().is_some_and(|t| t <= now));
        // Older than two windows: forgotten as newer ones arrive.
        let old = created(200, "t-old");
        j.apply(&signed(&j, CREATED_RECORD, &old, 10), &old);
        assert_eq!(j.accepted_between(now - chrono::Duration::days(1), now), 5);
    }

    #[test]
    fn the_latest_signed_quota_record_is_the_fleets() {
        let (j, _) = journal();
        let quota = |creates: u32, window_ms: u64| {
            serde_json::to_vec(&LearnedQuota {
                creates,
                window_ms,
                step: 0,
                probe_after: 1,
                at: Utc::now(),
            })
            .expect("json")
        };
        let forged = quota(1, 60_000);
        j.apply(&props(QUOTA_RECORD, None, 0), &forged);
        assert_eq!(j.learned_quota(), None, "unsigned: skipped");
        let good = quota(40, 60_000);
        j.apply(&signed(&j, QUOTA_RECORD, &good, 1), &good);
        assert_eq!(j.learned_quota().map(|q| q.creates), Some(40));
        for bad in [quota(0, 60_000), quota(5, 10)] {
            j.apply(&signed(&j, QUOTA_RECORD, &bad, 2), &bad);
        }
        assert_eq!(
            j.learned_quota().map(|q| q.creates),
            Some(40),
            "out of range"
        );
        let later = quota(10, 60_000);
        j.apply(&signed(&j, QUOTA_RECORD, &later, 3), &later);
        assert_eq!(j.learned_quota().map(|q| q.creates), Some(10), "the latest");
    }
}
