//! The deployment's quota ledger: a queue on the broker that counts the
//! creates of a window.
//!
//! A slot is a message in a classic, non-durable queue that holds at most
//! `creates` of them (`x-max-length`, `x-overflow: reject-publish`) and
//! drops each after the window and a margin (`x-message-ttl`; the upstream
//! counts a create when it arrives, a moment after its claim): publishing one claims a
//! slot, and the broker's nack means the window is full. A classic queue
//! refuses exactly (a quorum queue admits a few publishes past its limit
//! when they arrive together), and the ledger holds nothing worth keeping.
//! Its name carries a tag derived from the deployment's secret, so that
//! producers, who may publish into any queue they can name, cannot fill it.
//! A configured quota has one ledger (and claims in the one earlier
//! releases used too, for rolling updates); a learned quota gets one per value
//! learned (queue arguments cannot change), each expiring (`x-expires`)
//! once no worker has declared it for a while, and pre-filled, when it is
//! created, with one slot per create the fleet made in the current window,
//! each expiring when its create leaves the window, so that it counts what
//! the upstream counts.

use std::time::Duration;

use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties,
};

use crate::{
    broker::{reply_code, BrokerError, PublishError, Publisher},
    config::CreateQuota,
    journal::LearnedQuota,
};

/// The label the ledger's tag is derived from.
pub const LEDGER_TAG_LABEL: &str = "quota ledger";

/// How long a learned ledger nobody declares any more is kept: ten of its
/// windows, at least ten minutes.
pub fn learned_expiry(window: Duration) -> Duration {
    (window * 10).max(Duration::from_secs(600))
}

/// One ledger: its name, the quota it keeps, and whether it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// The queue.
    pub name: String,
    /// Creates per window.
    pub quota: CreateQuota,
    /// `x-expires` (learned ledgers).
    pub expires: Option<Duration>,
    /// How long a slot stays (`x-message-ttl`).
    pub slot_ttl: Duration,
    /// The configured quota's ledger of earlier releases.
    pub legacy: bool,
}

impl Ledger {
    /// The ledger of a configured quota:
    /// `<rq>.quota.<tag>.set.<N>-per-<ms>ms`. Its slots outlast the window
    /// by [`claim_margin`]: the upstream counts a create when it arrives,
    /// a moment after its claim, and that moment varies. The workers
    /// declare it (like a learned one) and it expires once unused.
    pub fn configured(request_queue: &str, tag: &str, quota: CreateQuota) -> Self {
        Self {
            name: format!(
                "{request_queue}.quota.{tag}.set.{}-per-{}ms",
                quota.creates,
                quota.window.as_millis()
            ),
            quota,
            expires: Some(learned_expiry(quota.window)),
            slot_ttl: quota.window + claim_margin(quota.window),
            legacy: false,
        }
    }

    /// The configured quota's ledger of earlier releases:
    /// `<rq>.quota.<tag>.<N>-per-<S>s`, slots of exactly the window. A
    /// worker claims a slot in it too after each claim in
    /// [`Ledger::configured`], so that a release before this one running
    /// beside it (a rolling update) counts the same creates; once no such
    /// release runs, it never refuses a claim the other ledger took (each
    /// of its slots came later and leaves sooner). With an
    /// operator-managed topology it is used only if it exists.
    pub fn legacy(request_queue: &str, tag: &str, quota: CreateQuota) -> Self {
        Self {
            name: format!(
                "{request_queue}.quota.{tag}.{}-per-{}s",
                quota.creates,
                quota.window.as_secs()
            ),
            quota,
            expires: None,
            // A name is shared by every release that runs the deployment,
            // and RabbitMQ refuses a second declaration with other
            // arguments: this ledger keeps the arguments its name has
            // always had.
            slot_ttl: quota.window,
            legacy: true,
        }
    }

    /// The pace of a quota (with lanes): one create per `window / creates`
    /// across the fleet, so that each create slot is chosen when it comes
    /// rather than a window's worth at once:
    /// `<rq>.quota.<tag>.pace.<ms>ms`, holding one slot that lasts the
    /// spacing. Declared by the workers, expiring when unused.
    pub fn pace(request_queue: &str, tag: &str, quota: CreateQuota) -> Self {
        let spacing = pace_spacing(quota);
        Self {
            name: format!("{request_queue}.quota.{tag}.pace.{}ms", spacing.as_millis()),
            quota: CreateQuota {
                creates: 1,
                window: spacing,
            },
            expires: Some(learned_expiry(quota.window)),
            slot_ttl: spacing,
            legacy: false,
        }
    }

    /// The ledger of a learned quota:
    /// `<rq>.quota.<tag>.learned.<N>-per-<ms>ms`.
    pub fn learned(request_queue: &str, tag: &str, learned: &LearnedQuota) -> Self {
        let window = learned.window();
        Self {
            name: format!(
                "{request_queue}.quota.{tag}.learned.{}-per-{}ms",
                learned.creates, learned.window_ms
            ),
            quota: CreateQuota {
                creates: learned.creates,
                window,
            },
            expires: Some(learned_expiry(window)),
            slot_ttl: slot_lifetime(window),
            legacy: false,
        }
    }

    /// Whether it expires when unused (and must be declared again every
    /// window while in use).
    pub fn expires_unused(&self) -> bool {
        self.expires.is_some()
    }

    /// Its declaration's arguments.
    pub fn arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongInt(i32::try_from(self.quota.creates).unwrap_or(i32::MAX)),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(millis(self.slot_ttl)),
        );
        if let Some(expires) = self.expires {
            args.insert("x-expires".into(), AMQPValue::LongLongInt(millis(expires)));
        }
        args
    }

    /// Declares it (non-durable: nothing in it is worth keeping, and a
    /// ledger of a lost node is simply declared again elsewhere), or with
    /// `passive` only checks that it exists.
    pub async fn declare(
        &self,
        publisher: &Publisher,
        passive: bool,
        vhost: &str,
    ) -> Result<(), BrokerError> {
        let channel = publisher
            .connection()
            .create_channel()
            .await
            .map_err(BrokerError::Connection)?;
        let result = channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    durable: false,
                    passive,
                    ..QueueDeclareOptions::default()
                },
                if passive {
                    FieldTable::default()
                } else {
                    self.arguments()
                },
            )
            .await;
        if channel.status().connected() {
            let _ = channel.close(200, "ledger declared".into()).await;
        }
        result.map(drop).map_err(|e| match reply_code(&e) {
            Some(404) => BrokerError::Missing {
                vhost: vhost.to_owned(),
                missing: vec![format!("queue {}", self.name)],
            },
            _ => crate::broker::declare_error("queue", &self.name, &e),
        })
    }

    /// The slots claimed in it now (its messages), by a passive
    /// declaration.
    pub async fn depth(&self, publisher: &Publisher) -> Result<u32, BrokerError> {
        let channel = publisher
            .connection()
            .create_channel()
            .await
            .map_err(BrokerError::Connection)?;
        let depth = crate::broker::ready_messages(&channel, &self.name)
            .await
            .map_err(BrokerError::Connection)?;
        if channel.status().connected() {
            let _ = channel.close(200, "ledger measured".into()).await;
        }
        Ok(depth)
    }

    /// Fills a new ledger with the creates already in the window: one slot
    /// for each of `remaining` (how long each create has left in the
    /// window), which expires then.
    pub async fn prefill(
        &self,
        publisher: &Publisher,
        remaining: &[Duration],
    ) -> Result<(), PublishError> {
        for left in remaining.iter().take(self.quota.creates as usize) {
            let ms = left.as_millis().max(1).to_string();
            let properties = BasicProperties::default()
                .with_delivery_mode(1)
                .with_expiration(ShortString::from(ms));
            match publisher
                .publish("", &self.name, b"", properties, true)
                .await
            {
                Ok(()) | Err(PublishError::Nacked) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The spacing of paced creates: the window over the creates it allows
/// (at least 1 ms).
pub fn pace_spacing(quota: CreateQuota) -> Duration {
    let ms = quota.window.as_millis() / u128::from(quota.creates.max(1));
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX).max(1))
}

/// How much longer than the window a configured quota's slot stays: a
/// quarter of the window, at most a second (at least the hundredth a
/// learned slot has). A create that reaches the upstream later than this
/// after its claim may meet a 429, which is waited out like any other.
pub fn claim_margin(window: Duration) -> Duration {
    (window / 4).min(Duration::from_secs(1)).max(window / 100)
}

/// How long a claimed slot stays in a learned ledger: the window and a little
/// more (a hundredth of it, at least 100 ms), because the create reaches
/// the upstream a moment after its claim, and the next claim's create may
/// reach it sooner than the last one's did.
pub fn slot_lifetime(window: Duration) -> Duration {
    window + (window / 100).max(Duration::from_millis(100))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_quota_holds_one_slot_for_its_spacing() {
        let pace = Ledger::pace(
            "rq",
            "0123456789abcdef",
            CreateQuota::parse("30/min").expect("quota"),
        );
        assert_eq!(pace.name, "rq.quota.0123456789abcdef.pace.2000ms");
        let args = pace.arguments();
        assert_eq!(
            args.inner().get("x-max-length").cloned(),
            Some(AMQPValue::LongInt(1))
        );
        assert_eq!(
            args.inner().get("x-message-ttl").cloned(),
            Some(AMQPValue::LongLongInt(2000))
        );
        assert_eq!(
            pace_spacing(CreateQuota::parse("3/s").expect("quota")),
            Duration::from_millis(333)
        );
    }

    #[test]
    fn a_configured_slot_outlasts_its_window_by_a_bounded_margin() {
        for (window_ms, margin_ms) in [
            (100, 25),
            (1_000, 250),
            (4_000, 1_000),
            (10_000, 1_000),
            (60_000, 1_000),
            (3_600_000, 36_000),
        ] {
            assert_eq!(
                claim_margin(Duration::from_millis(window_ms)),
                Duration::from_millis(margin_ms),
                "{window_ms} ms"
            );
        }
    }

    #[test]
    fn ledgers_are_named_for_the_deployment_its_secret_and_the_quota() {
        let configured = Ledger::configured(
            "vidu.requests",
            "0123456789abcdef",
            CreateQuota::parse("20/min").expect("quota"),
        );
        assert_eq!(
            configured.name,
            "vidu.requests.quota.0123456789abcdef.set.20-per-60000ms"
        );
        let args = configured.arguments();
        assert_eq!(
            args.inner().get("x-message-ttl").cloned(),
            Some(AMQPValue::LongLongInt(61_000))
        );
        assert_eq!(
            args.inner().get("x-expires").cloned(),
            Some(AMQPValue::LongLongInt(600_000))
        );
        let legacy = Ledger::legacy(
            "vidu.requests",
            "0123456789abcdef",
            CreateQuota::parse("20/min").expect("quota"),
        );
        assert_eq!(
            legacy.name,
            "vidu.requests.quota.0123456789abcdef.20-per-60s"
        );
        assert_eq!(legacy.expires, None);
        // The arguments the earlier releases' ledger has always had:
        // releases side by side share it.
        let args = legacy.arguments();
        assert_eq!(
            args.inner().get("x-message-ttl").cloned(),
            Some(AMQPValue::LongLongInt(60_000))
        );
        assert_eq!(args.inner().get("x-expires"), None);
        assert_eq!(
            slot_lifetime(Duration::from_secs(1)),
            Duration::from_millis(1_100)
        );
        let learned = Ledger::learned(
            "vidu.requests",
            "0123456789abcdef",
            &LearnedQuota {
                creates: 40,
                window_ms: 60_000,
                step: 0,
                probe_after: 1,
                at: chrono::Utc::now(),
            },
        );
        assert_eq!(
            learned.name,
            "vidu.requests.quota.0123456789abcdef.learned.40-per-60000ms"
        );
        let args = learned.arguments();
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-max-length"), Some(AMQPValue::LongInt(40)));
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(60_600)));
        assert_eq!(get("x-expires"), Some(AMQPValue::LongLongInt(600_000)));
        assert_eq!(
            get("x-overflow"),
            Some(AMQPValue::LongString("reject-publish".into()))
        );
        assert_eq!(
            learned_expiry(Duration::from_secs(600)),
            Duration::from_secs(6_000)
        );
    }
}
