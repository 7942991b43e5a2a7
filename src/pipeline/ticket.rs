//! Tickets: everything needed to finish one request, as plain data.
//!
//! A ticket is written when the upstream accepts a task and lives in the
//! broker, never in a worker's memory. This module owns its format (signed
//! JSON, checked field by field when read back), its construction from a
//! created task (including the deadline policy: off-peak requests get the
//! longer `polling.max_off_peak_task_age`). When it is polled and where it
//! waits are decided in [`super::decisions`]. Nothing here touches the
//! broker or the upstream.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    config::PollingSettings,
    events::RequestContext,
    metrics::TicketRejection,
    model::Model,
    request::{self, GenerationRequest, RequestId},
    signing::{Presented, SignatureError, Signatures, Signer},
    trace::TraceParent,
    upstream::{clean_text, RunningStatus, TaskId},
};

/// Ticket format version.
pub const TICKET_VERSION: u8 = 1;
/// AMQP `type` of ticket messages.
pub const TICKET_TYPE: &str = "vidu-worker.ticket.v1";

/// Where a request came from, for its ticket: when it was taken, and the
/// AMQP properties that may go into its events.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// When the worker took the request.
    pub received_at: DateTime<Utc>,
    /// The request's `correlation_id`, when valid.
    pub correlation_id: Option<String>,
    /// The request's `reply_to`, when allowed.
    pub reply_to: Option<String>,
    /// The worker's continuation of the producer's trace.
    pub traceparent: Option<TraceParent>,
}

/// What reading a ticket needs: the signing keys and the rules.
pub struct TicketKeys<'a> {
    /// Verifies the signatures.
    pub signer: &'a Signer,
    /// `tickets.accept_unsigned`: until this instant, unsigned (not wrongly
    /// signed) tickets submitted before it are read, during a migration
    /// from a version that did not sign them.
    pub accept_unsigned_until: Option<DateTime<Utc>>,
    /// The time of reading.
    pub now: DateTime<Utc>,
    /// The deployment's request queue (for the `reply_to` rule).
    pub request_queue: &'a str,
}

impl TicketKeys<'_> {
    fn accepts_unsigned(&self) -> bool {
        self.accept_unsigned_until
            .is_some_and(|until| self.now < until)
    }
}

/// Header of a kept ticket: when a worker first found no key of its own
/// verifies it (RFC 3339).
pub const UNVERIFIED_SINCE_HEADER: &str = "x-vidu-unverified-since";
/// Header of a kept ticket: how many times it has been kept.
pub const UNVERIFIED_HOPS_HEADER: &str = "x-vidu-unverified-hops";

/// Why a message on a tracking queue is not one of this deployment's tickets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Why; [`TicketRejection::Unverified`] is kept, not dead-lettered:
    /// another worker of the deployment may hold its key.
    pub reason: TicketRejection,
    /// What is wrong, for the dead-letter header and the log (never the
    /// message itself).
    pub detail: String,
}

impl Unreadable {
    /// Whether the message carries well-formed signatures by a key this
    /// worker does not hold.
    pub fn is_unverified(&self) -> bool {
        self.reason == TicketRejection::Unverified
    }
}

/// The task age after which a request is given up as `timed_out`.
pub fn max_task_age(off_peak: bool, polling: &PollingSettings) -> Duration {
    if off_peak {
        polling.max_off_peak_task_age
    } else {
        polling.max_task_age
    }
}

/// A `std` duration as a `chrono` one, saturating.
pub fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Everything needed to finish one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ticket {
    /// Format version.
    pub v: u8,
    /// The request id.
    pub request_id: RequestId,
    /// The upstream task id.
    pub task_id: TaskId,
    /// Model name.
    pub model: Model,
    /// Producer metadata, byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Box<RawValue>>,
    /// AMQP correlation id of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// AMQP reply-to of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// W3C trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<TraceParent>,
    /// When a worker first took the request.
    pub received_at: DateTime<Utc>,
    /// When the upstream accepted the task.
    pub submitted_at: DateTime<Utc>,
    /// When the task is given up as `timed_out`.
    pub deadline: DateTime<Utc>,
    /// When the next poll is due.
    pub next_poll_at: DateTime<Utc>,
    /// Polls so far.
    #[serde(default)]
    pub polls: u32,
    /// Consecutive transient poll errors.
    #[serde(default)]
    pub errors: u32,
    /// Consecutive 404 answers.
    #[serde(default)]
    pub not_found: u32,
    /// Last reported running state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<RunningStatus>,
    /// Last reported progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress: Option<u8>,
    /// Consecutive copies into the bucket that failed for now.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copy_errors: u32,
    /// Whether the task was looked up again after its video URL no longer
    /// served the video (once: then the request ends `storage_failed`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_looked_up: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if takes a reference
fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Ticket {
    /// The ticket of a task the upstream has just accepted for `req`: the
    /// deadline is `now` plus the request's task age (off-peak requests get
    /// the longer one), the first poll after `polling.min_interval`.
    pub fn for_created_task(
        req: GenerationRequest,
        task_id: TaskId,
        origin: Origin,
        now: DateTime<Utc>,
        polling: &PollingSettings,
    ) -> Self {
        let max_age = max_task_age(req.off_peak(), polling);
        Self {
            v: TICKET_VERSION,
            request_id: req.request_id,
            task_id,
            model: req.model,
            metadata: req.metadata,
            correlation_id: origin.correlation_id,
            reply_to: origin.reply_to,
            traceparent: origin.traceparent,
            received_at: origin.received_at,
            submitted_at: now,
            deadline: now + to_chrono(max_age),
            next_poll_at: now + to_chrono(polling.min_interval),
            polls: 0,
            errors: 0,
            not_found: 0,
            last_status: None,
            last_progress: None,
            copy_errors: 0,
            source_looked_up: false,
        }
    }

    /// How long is left before the next poll is due (zero when due).
    pub fn remaining(&self, now: DateTime<Utc>) -> Duration {
        (self.next_poll_at - now).to_std().unwrap_or(Duration::ZERO)
    }

    /// How long ago the upstream accepted the task.
    pub fn age(&self, now: DateTime<Utc>) -> Duration {
        (now - self.submitted_at).to_std().unwrap_or(Duration::ZERO)
    }

    /// Reads a message from a tracking queue: this deployment's ticket, or
    /// why it is not one (nothing in it is acted on then).
    pub fn read(
        body: &[u8],
        presented: Presented<'_>,
        keys: &TicketKeys<'_>,
    ) -> Result<Self, Unreadable> {
        if body.len() > MAX_TICKET_BYTES {
            return Err(Unreadable {
                reason: TicketRejection::Oversized,
                detail: format!(
                    "{} bytes, more than a ticket's {MAX_TICKET_BYTES}",
                    body.len()
                ),
            });
        }
        let signed = match keys.signer.verify(body, presented) {
            Ok(()) => true,
            Err(SignatureError::Missing) if keys.accepts_unsigned() => false,
            Err(e) => {
                let reason = match e {
                    SignatureError::Missing => TicketRejection::Unsigned,
                    SignatureError::Malformed => TicketRejection::Forged,
                    SignatureError::Unverified => TicketRejection::Unverified,
                };
                return Err(Unreadable {
                    reason,
                    detail: e.to_string(),
                });
            }
        };
        let ticket: Self = serde_json::from_slice(body).map_err(|e| Unreadable {
            // serde's words may quote the message: shortened, control
            // characters dropped.
            reason: TicketRejection::Invalid,
            detail: format!("not a tracking ticket: {}", clean_text(&e.to_string(), 200)),
        })?;
        ticket
            .validate(keys.request_queue)
            .map_err(|detail| Unreadable {
                reason: TicketRejection::Invalid,
                detail,
            })?;
        if !signed
            && keys
                .accept_unsigned_until
                .is_none_or(|until| ticket.submitted_at >= until)
        {
            return Err(Unreadable {
                reason: TicketRejection::Unsigned,
                detail: "the ticket is not signed and says it was submitted after tickets.accept_unsigned ended".into(),
            });
        }
        Ok(ticket)
    }

    /// The shared part of this request's events.
    pub fn context(&self) -> RequestContext<'_> {
        RequestContext {
            request_id: &self.request_id,
            metadata: self.metadata.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            reply_to: self.reply_to.as_deref(),
            traceparent: self.traceparent.as_ref(),
        }
    }

    /// AMQP properties of a ticket message whose body signs as
    /// `signatures`.
    pub fn properties(signatures: &Signatures) -> BasicProperties {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(TICKET_TYPE.into())
            .with_headers(signatures.headers())
    }

    /// Checks every field with the rules a request's meet, so that what a
    /// ticket says can go into a poll and into events as it is.
    pub fn validate(&self, request_queue: &str) -> Result<(), String> {
        if self.v != TICKET_VERSION {
            return Err(format!("version {} is not {TICKET_VERSION}", self.v));
        }
        if let Some(m) = &self.metadata {
            if !m.get().starts_with('{') || m.get().len() > request::MAX_METADATA_BYTES {
                return Err("metadata is not an object of at most 16 KiB".into());
            }
        }
        if let Some(c) = &self.correlation_id {
            request::check_correlation_id(c).map_err(|e| format!("correlation_id {e}"))?;
        }
        if let Some(r) = &self.reply_to {
            request::check_reply_to(r, request_queue).map_err(|e| format!("reply_to: {e}"))?;
        }
        let longest = chrono::Duration::days(31);
        if self.received_at > self.submitted_at
            || self.deadline < self.submitted_at
            || self.deadline - self.submitted_at > longest
            || self.next_poll_at - self.submitted_at > longest
        {
            return Err("its times are out of order or span more than 31 days".into());
        }
        if self.last_progress.is_some_and(|p| p > 100) {
            return Err("last_progress is out of range".into());
        }
        Ok(())
    }
}

/// Largest ticket read; a larger message on a tracking queue is not ours.
pub const MAX_TICKET_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> TaskId {
        TaskId::parse(id).unwrap_or_else(|| panic!("{id} is a task id"))
    }
    use crate::signing::{DEPLOYMENT_SIGNATURE_HEADER, SIGNATURE_HEADER};

    #[test]
    fn tickets_round_trip_and_tolerate_missing_counters() {
        let json = r#"{"v":1,"request_id":"r-1","task_id":"t-1","model":"vidu-q3-pro-i2v",
            "metadata":{"a":1},"received_at":"2026-01-01T00:00:00Z","submitted_at":"2026-01-01T00:00:01Z",
            "deadline":"2026-01-01T02:00:01Z","next_poll_at":"2026-01-01T00:00:02Z"}"#;
        let t: Ticket = serde_json::from_str(json).expect("ticket");
        assert_eq!(t.polls, 0);
        assert_eq!(t.metadata.as_ref().map(|m| m.get()), Some(r#"{"a":1}"#));
        let back: Ticket =
            serde_json::from_slice(&serde_json::to_vec(&t).expect("ser")).expect("de");
        assert_eq!(back.task_id.as_str(), "t-1");
    }

    fn request(body: &str) -> GenerationRequest {
        let props = request::MessageProps {
            message_id: None,
            content_type: None,
            content_encoding: None,
            correlation_id: None,
            reply_to: None,
            request_queue: "q",
            reply_to_allowed: &[],
        };
        request::parse(body.as_bytes(), props).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_767_225_600 + secs, 0).unwrap_or_default()
    }

    #[test]
    fn a_created_task_gets_its_deadline_and_first_poll() {
        let p = PollingSettings {
            min_interval: Duration::from_secs(3),
            max_task_age: Duration::from_secs(3600),
            max_off_peak_task_age: Duration::from_secs(48 * 3600),
            ..PollingSettings::default()
        };
        // (off_peak in the body, deadline after submission)
        for (body, hours) in [
            (
                r#"{"request_id":"r-1","input":{"images":["https://a/1.png"]}}"#,
                1,
            ),
            (
                r#"{"request_id":"r-1","input":{"images":["https://a/1.png"],"off_peak":false}}"#,
                1,
            ),
            (
                r#"{"request_id":"r-1","input":{"images":["https://a/1.png"],"off_peak":true}}"#,
                48,
            ),
        ] {
            let origin = Origin {
                received_at: at(-5),
                correlation_id: Some("c".into()),
                reply_to: None,
                traceparent: None,
            };
            let t = Ticket::for_created_task(request(body), task("t-9"), origin, at(0), &p);
            assert_eq!(t.deadline, at(hours * 3600), "{body}");
            assert_eq!(t.next_poll_at, at(3));
            assert_eq!((t.received_at, t.submitted_at), (at(-5), at(0)));
            assert_eq!((t.polls, t.errors, t.not_found), (0, 0, 0));
            assert_eq!(t.correlation_id.as_deref(), Some("c"));
            assert_eq!(t.task_id.as_str(), "t-9");
            assert!(t.validate("q").is_ok(), "{:?}", t.validate("q"));
            assert_eq!(t.remaining(at(1)), Duration::from_secs(2));
            assert_eq!(t.remaining(at(10)), Duration::ZERO);
            assert_eq!(t.age(at(-10)), Duration::ZERO);
        }
    }

    fn legacy(sig: &str) -> Presented<'_> {
        Presented {
            legacy: Some(sig),
            deployment: None,
        }
    }

    #[test]
    fn only_this_deployments_valid_tickets_are_read() {
        let secret = secrecy::SecretString::from("s3cret");
        let signer = Signer::new(&secret, &[], "q", true);
        let other = Signer::new(&secret, &[], "other-deployment", true);
        // Unsigned tickets: accepted while the migration runs (an hour
        // from the time of reading), refused once it has ended.
        let keys = |accept_unsigned: bool| TicketKeys {
            signer: &signer,
            accept_unsigned_until: Some(at(if accept_unsigned { 3600 } else { -1 })),
            now: at(0),
            request_queue: "q",
        };
        let p = PollingSettings::default();
        let origin = Origin {
            received_at: at(0),
            ..Origin::default()
        };
        let good = Ticket::for_created_task(
            request(r#"{"request_id":"r-1","input":{"images":["https://a/1.png"]}}"#),
            task("t-1"),
            origin,
            at(0),
            &p,
        );
        let body = serde_json::to_vec(&good).unwrap_or_default();
        let mut v99: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        v99["v"] = 99.into();
        let v99 = serde_json::to_vec(&v99).unwrap_or_default();
        // One byte over 64 KiB.
        let big = vec![b' '; 65_537];
        let sig = |b: &[u8]| signer.sign(b).legacy;
        // (body, signature, accept_unsigned, expected reason or None for read)
        type Case<'a> = (&'a [u8], Option<String>, bool, Option<&'static str>);
        let table: Vec<Case<'_>> = vec![
            (&body, Some(sig(&body)), false, None),
            (&body, None, false, Some("unsigned")),
            (&body, None, true, None),
            (&body, Some("nothex".into()), true, Some("forged")),
            (
                &body,
                Some(other.sign(&body).legacy),
                false,
                Some("unverified"),
            ),
            (
                &body,
                Some(sig(b"something else")),
                true,
                Some("unverified"),
            ),
            (&big, Some(sig(&big)), true, Some("oversized")),
            (b"not json", Some(sig(b"not json")), false, Some("invalid")),
            (&v99, Some(sig(&v99)), false, Some("invalid")),
        ];
        for (body, signature, accept, expected) in table {
            let presented = Presented {
                legacy: signature.as_deref(),
                deployment: None,
            };
            let got = Ticket::read(body, presented, &keys(accept));
            assert_eq!(
                got.as_ref().err().map(|u| u.reason.as_str()),
                expected,
                "{got:?}"
            );
            assert_eq!(
                got.as_ref().err().map(Unreadable::is_unverified),
                expected.map(|e| e == "unverified"),
                "{got:?}"
            );
        }
        // An unsigned ticket that says it was submitted after the
        // migration's end is refused even while it runs.
        let mut late = good.clone();
        late.submitted_at = at(7200);
        late.deadline = at(7200 + 3600);
        late.next_poll_at = at(7200);
        let late = serde_json::to_vec(&late).unwrap_or_default();
        let got = Ticket::read(&late, Presented::default(), &keys(true));
        assert_eq!(got.err().map(|u| u.reason), Some(TicketRejection::Unsigned));
    }

    /// From the end instant of `tickets.accept_unsigned` on, an unsigned
    /// ticket is refused even when it says it was submitted before it.
    #[test]
    fn unsigned_tickets_are_refused_from_the_end_instant_on() {
        let secret = secrecy::SecretString::from("s3cret");
        let signer = Signer::new(&secret, &[], "q", true);
        let mut early = valid_ticket();
        early.received_at = at(-200);
        early.submitted_at = at(-100);
        early.next_poll_at = at(-100);
        early.deadline = at(3000);
        let body = serde_json::to_vec(&early).unwrap_or_default();
        // (now, read)
        for (now, read) in [(-10, true), (0, false), (10, false)] {
            let keys = TicketKeys {
                signer: &signer,
                accept_unsigned_until: Some(at(0)),
                now: at(now),
                request_queue: "q",
            };
            let got = Ticket::read(&body, Presented::default(), &keys);
            assert_eq!(got.is_ok(), read, "read at {now}: {got:?}");
        }
    }

    #[test]
    fn a_ticket_any_worker_of_the_deployment_wrote_is_read_whatever_api_key_it_holds() {
        let keyed = |api_key: &str| {
            let s = Signer::new(
                &secrecy::SecretString::from(api_key.to_owned()),
                &[],
                "q",
                false,
            );
            s.add_deployment_key("deployment-key");
            s
        };
        let (one, two) = (keyed("sk-one"), keyed("sk-two"));
        let ticket = valid_ticket();
        let body = serde_json::to_vec(&ticket).unwrap_or_default();
        let written = one.sign(&body);
        let props = Ticket::properties(&written);
        let presented = Presented {
            legacy: crate::broker::header_str(&props, SIGNATURE_HEADER),
            deployment: crate::broker::header_str(&props, DEPLOYMENT_SIGNATURE_HEADER),
        };
        let keys = TicketKeys {
            signer: &two,
            accept_unsigned_until: None,
            now: at(0),
            request_queue: "q",
        };
        assert_eq!(
            Ticket::read(&body, presented, &keys).map(|t| t.task_id),
            Ok(task("t-1"))
        );
        // Without the deployment key, the other worker's API key is not
        // accepted: kept as unverified, not refused as forged.
        let lone = Signer::new(&secrecy::SecretString::from("sk-two"), &[], "q", false);
        let keys = TicketKeys {
            signer: &lone,
            ..keys
        };
        let got = Ticket::read(&body, presented, &keys);
        assert!(
            got.as_ref().is_err_and(Unreadable::is_unverified),
            "{got:?}"
        );
    }

    fn valid_ticket() -> Ticket {
        let origin = Origin {
            received_at: at(-5),
            ..Origin::default()
        };
        Ticket::for_created_task(
            request(r#"{"request_id":"r-1","input":{"images":["https://a/1.png"]}}"#),
            task("t-1"),
            origin,
            at(0),
            &PollingSettings::default(),
        )
    }

    /// Every rule of `validate`, at its boundary: what passes just inside
    /// and what is refused just outside.
    #[test]
    fn every_ticket_field_is_checked_at_its_boundary() {
        let day = chrono::Duration::days(1);
        let raw = |s: &str| serde_json::value::RawValue::from_string(s.to_owned()).ok();
        type Edit = Box<dyn Fn(&mut Ticket)>;
        let cases: Vec<(&str, Edit, bool)> = vec![
            ("as built", Box::new(|_| {}), true),
            ("v 2", Box::new(|t| t.v = 2), false),
            (
                "object metadata",
                Box::new(move |t| t.metadata = raw(r#"{"a":1}"#)),
                true,
            ),
            (
                "array metadata",
                Box::new(move |t| t.metadata = raw("[1]")),
                false,
            ),
            (
                "16 KiB metadata",
                Box::new(move |t| {
                    t.metadata = raw(&format!(
                        r#"{{"a":"{}"}}"#,
                        "x".repeat(request::MAX_METADATA_BYTES - 8)
                    ))
                }),
                true,
            ),
            (
                "metadata one byte over",
                Box::new(move |t| {
                    t.metadata = raw(&format!(
                        r#"{{"a":"{}"}}"#,
                        "x".repeat(request::MAX_METADATA_BYTES - 7)
                    ))
                }),
                false,
            ),
            (
                "a correlation id",
                Box::new(|t| t.correlation_id = Some("c-1".into())),
                true,
            ),
            (
                "a correlation id with a newline",
                Box::new(|t| t.correlation_id = Some("c\n1".into())),
                false,
            ),
            (
                "a reply queue",
                Box::new(|t| t.reply_to = Some("replies".into())),
                true,
            ),
            (
                "reply_to an internal queue",
                Box::new(|t| t.reply_to = Some("q.tracking".into())),
                false,
            ),
            (
                "received after submission",
                Box::new(|t| t.received_at = t.submitted_at + chrono::Duration::seconds(1)),
                false,
            ),
            (
                "received at submission",
                Box::new(|t| t.received_at = t.submitted_at),
                true,
            ),
            (
                "deadline before submission",
                Box::new(|t| t.deadline = t.submitted_at - chrono::Duration::seconds(1)),
                false,
            ),
            (
                "deadline at submission",
                Box::new(|t| t.deadline = t.submitted_at),
                true,
            ),
            (
                "deadline in 31 days",
                Box::new(move |t| t.deadline = t.submitted_at + day * 31),
                true,
            ),
            (
                "deadline past 31 days",
                Box::new(move |t| {
                    t.deadline = t.submitted_at + day * 31 + chrono::Duration::seconds(1)
                }),
                false,
            ),
            (
                "next poll in 31 days",
                Box::new(move |t| t.next_poll_at = t.submitted_at + day * 31),
                true,
            ),
            (
                "next poll past 31 days",
                Box::new(move |t| {
                    t.next_poll_at = t.submitted_at + day * 31 + chrono::Duration::seconds(1)
                }),
                false,
            ),
            (
                "progress 100",
                Box::new(|t| t.last_progress = Some(100)),
                true,
            ),
            (
                "progress 101",
                Box::new(|t| t.last_progress = Some(101)),
                false,
            ),
        ];
        for (what, edit, valid) in cases {
            let mut t = valid_ticket();
            edit(&mut t);
            assert_eq!(
                t.validate("q").is_ok(),
                valid,
                "{what}: {:?}",
                t.validate("q")
            );
        }
    }

    /// The typed fields, at their boundaries: a ticket whose task id,
    /// model, running state or trace context is not one is not read.
    #[test]
    fn typed_ticket_fields_are_checked_when_read() {
        let valid = serde_json::to_value(valid_ticket()).unwrap_or_default();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        // (field, value, read)
        let cases: Vec<(&str, serde_json::Value, bool)> = vec![
            ("task_id", "".into(), false),
            ("task_id", "t".repeat(128).into(), true),
            ("task_id", "t".repeat(129).into(), false),
            ("task_id", "t 1".into(), false),
            ("task_id", 7.into(), false),
            ("model", "vidu-q3-turbo-f2v".into(), true),
            ("model", "vidu-q2".into(), false),
            ("traceparent", tp.into(), true),
            ("traceparent", "00-x".into(), false),
            ("last_status", "queued".into(), true),
            ("last_status", "processing".into(), true),
            ("last_status", "succeeded".into(), false),
            ("last_status", "QUEUED".into(), false),
        ];
        for (field, value, read) in cases {
            let mut v = valid.clone();
            v[field] = value.clone();
            let got = serde_json::from_value::<Ticket>(v)
                .map_err(|e| e.to_string())
                .and_then(|t| t.validate("q"));
            assert_eq!(got.is_ok(), read, "{field} = {value}: {got:?}");
        }
    }

    #[test]
    fn a_ticket_of_exactly_the_largest_size_is_read_and_its_properties_are_a_tickets() {
        let secret = secrecy::SecretString::from("s3cret");
        let signer = Signer::new(&secret, &[], "q", true);
        let keys = TicketKeys {
            signer: &signer,
            accept_unsigned_until: None,
            now: at(0),
            request_queue: "q",
        };
        // Exactly the limit, 64 KiB: not "oversized" (it is not a ticket
        // either).
        let body = vec![b' '; 65_536];
        let got = Ticket::read(&body, legacy(&signer.sign(&body).legacy), &keys);
        assert_eq!(got.err().map(|u| u.reason), Some(TicketRejection::Invalid));
        let props = Ticket::properties(&Signatures {
            legacy: "sig".into(),
            deployment: None,
        });
        assert_eq!(props.kind().as_ref().map(|k| k.as_str()), Some(TICKET_TYPE));
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(
            crate::broker::header_str(&props, SIGNATURE_HEADER),
            Some("sig")
        );
    }
}
