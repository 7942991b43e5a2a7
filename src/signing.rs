//! Ticket signatures: only tickets this deployment wrote are acted on, and
//! every worker of the deployment can read every ticket any other wrote.
//!
//! Producers may write into any queue of the vhost (the default exchange
//! reaches every queue by name), internal ones included. A message shaped
//! like a ticket would otherwise be polled with the operator's key and
//! turned into events for someone else's request. Every ticket the worker
//! writes therefore carries HMAC-SHA256 signatures of its body:
//!
//! - `x-vidu-deployment-signature`, with the **deployment key**: 32 random
//!   bytes the first worker of a deployment keeps in the broker (the
//!   journal, see [`crate::journal`]), readable by the deployment's broker
//!   user only and never derived from the API key, so rotating the API key,
//!   or running workers that hold different keys of one account, changes
//!   nothing;
//! - `x-vidu-signature`, with the key the versions before the deployment
//!   key used (derived from `tickets.secret` or, when unset, from the API
//!   key), so that a version without deployment keys can read what this
//!   one writes during a rolling upgrade or a rollback.
//!
//! A ticket verifies when either signature does, with any key this worker
//! accepts (`tickets.previous_secrets` for the second). Every key is
//! derived with the request queue's name, so deployments never accept each
//! other's tickets. This module never logs a key and never puts one in an
//! error.

use std::sync::{PoisonError, RwLock};

use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use ring::hmac;
use secrecy::{ExposeSecret, SecretString};

/// Header carrying a ticket's signature with the key from `tickets.secret`
/// or the API key (lowercase hex); the only one versions before the
/// deployment key read.
pub const SIGNATURE_HEADER: &str = "x-vidu-signature";
/// Header carrying a ticket's signature with the deployment key.
pub const DEPLOYMENT_SIGNATURE_HEADER: &str = "x-vidu-deployment-signature";
/// Every signature header, for copies that must keep them.
pub const SIGNATURE_HEADERS: [&str; 2] = [SIGNATURE_HEADER, DEPLOYMENT_SIGNATURE_HEADER];
/// Label mixed into every derived key, so a key made for tickets is good
/// for nothing else.
const KEY_LABEL: &[u8] = b"vidu-worker ticket signature v1";

/// A signing key, derived; its bytes never leave this module.
#[derive(Clone)]
struct Key(hmac::Key);

impl Key {
    /// HMAC-SHA256(material, label || 0 || request_queue), as an HMAC key.
    fn derive(material: &str, request_queue: &str) -> Self {
        let outer = hmac::Key::new(hmac::HMAC_SHA256, material.as_bytes());
        let mut ctx = hmac::Context::with_key(&outer);
        ctx.update(KEY_LABEL);
        ctx.update(&[0]);
        ctx.update(request_queue.as_bytes());
        let derived = ctx.sign();
        Self(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    fn sign(&self, body: &[u8]) -> String {
        hex::encode(hmac::sign(&self.0, body).as_ref())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Why a ticket is not accepted as one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature header (or none that is a string).
    #[error(
        "the ticket is not signed (no {SIGNATURE_HEADER} header): this deployment did not write it"
    )]
    Missing,
    /// A signature is not 64 hex digits: no worker writes that.
    #[error("the ticket's signature is malformed")]
    Malformed,
    /// Well-formed signatures, none made by a key this worker holds: a
    /// worker of this deployment with another secret (a rotation not yet
    /// finished everywhere), or a forger.
    #[error("the ticket is signed with a key this worker does not hold (a secret not configured here, or a forgery)")]
    Unverified,
}

/// A ticket's signatures as the worker writes them in its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signatures {
    /// `x-vidu-signature`.
    pub legacy: String,
    /// `x-vidu-deployment-signature`, once the deployment key is known.
    pub deployment: Option<String>,
}

/// The signatures a message carries (its header values, if any).
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// `x-vidu-signature`.
    pub legacy: Option<&'a str>,
    /// `x-vidu-deployment-signature`.
    pub deployment: Option<&'a str>,
}

impl<'a> Presented<'a> {
    /// The signatures in a message's headers.
    pub fn from_properties(properties: &'a BasicProperties) -> Self {
        let header = |name: &str| -> Option<&'a str> {
            match properties.headers().as_ref()?.inner().get(name)? {
                AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
                AMQPValue::ShortString(s) => Some(s.as_str()),
                _ => None,
            }
        };
        Self {
            legacy: header(SIGNATURE_HEADER),
            deployment: header(DEPLOYMENT_SIGNATURE_HEADER),
        }
    }
}

impl Signatures {
    /// The headers that carry these signatures.
    pub fn headers(&self) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert(
            SIGNATURE_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.legacy.as_str())),
        );
        if let Some(deployment) = &self.deployment {
            headers.insert(
                DEPLOYMENT_SIGNATURE_HEADER.into(),
                AMQPValue::LongString(LongString::from(deployment.as_str())),
            );
        }
        headers
    }
}

/// Signs tickets with the current keys and verifies them with any accepted
/// one. The deployment keys arrive once the journal is read
/// ([`Signer::add_deployment_key`]); until then only the legacy signature
/// is written.
pub struct Signer {
    request_queue: String,
    legacy: Key,
    previous: Vec<Key>,
    /// Whether `legacy` comes from `tickets.secret` (not the API key).
    secret_configured: bool,
    /// Deployment keys from the journal, the first one signing; their
    /// material, to tell a new one from one already known.
    deployment: RwLock<Vec<(String, Key)>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let deployment = self
            .deployment
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Signer")
            .field("request_queue", &self.request_queue)
            .field("keys", &"[REDACTED]")
            .field("previous", &self.previous.len())
            .field("secret_configured", &self.secret_configured)
            .field("deployment_keys", &deployment)
            .finish()
    }
}

impl Signer {
    /// A signer for the deployment of `request_queue`: the legacy key from
    /// `secret` when `tickets.secret` is set (`secret_configured`) or else
    /// from the API key, and keys still accepted for it (`previous`).
    pub fn new(
        current: &SecretString,
        previous: &[SecretString],
        request_queue: &str,
        secret_configured: bool,
    ) -> Self {
        Self {
            request_queue: request_queue.to_owned(),
            legacy: Key::derive(current.expose_secret(), request_queue),
            previous: previous
                .iter()
                .map(|p| Key::derive(p.expose_secret(), request_queue))
                .collect(),
            secret_configured,
            deployment: RwLock::new(Vec::new()),
        }
    }

    /// Accepts `material` (a deployment key read from the journal) for
    /// verification; the first one ever added also signs. Returns whether
    /// it was new.
    pub fn add_deployment_key(&self, material: &str) -> bool {
        let mut keys = self
            .deployment
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if keys.iter().any(|(m, _)| m == material) {
            return false;
        }
        keys.push((
            material.to_owned(),
            Key::derive(material, &self.request_queue),
        ));
        true
    }

    /// Whether a deployment key is known (tickets then verify on every
    /// worker of the deployment, whatever API key each holds).
    pub fn has_deployment_key(&self) -> bool {
        !self
            .deployment
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Whether the legacy signature comes from the API key (no
    /// `tickets.secret`).
    pub fn legacy_from_api_key(&self) -> bool {
        !self.secret_configured
    }

    /// The signatures of `body`, as the headers carry them.
    pub fn sign(&self, body: &[u8]) -> Signatures {
        let deployment = self
            .deployment
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
            .map(|(_, k)| k.sign(body));
        Signatures {
            legacy: self.legacy.sign(body),
            deployment,
        }
    }

    /// Checks the presented signatures against `body` with every accepted
    /// key, in constant time per key: `Ok` when either verifies.
    pub fn verify(&self, body: &[u8], presented: Presented<'_>) -> Result<(), SignatureError> {
        if presented.legacy.is_none() && presented.deployment.is_none() {
            return Err(SignatureError::Missing);
        }
        let decode = |s: &str| (s.len() == 64).then(|| hex::decode(s).ok()).flatten();
        let mut malformed = false;
        if let Some(sig) = presented.deployment {
            match decode(sig) {
                Some(bytes) => {
                    let keys = self
                        .deployment
                        .read()
                        .unwrap_or_else(PoisonError::into_inner);
                    if keys
                        .iter()
                        .any(|(_, k)| hmac::verify(&k.0, body, &bytes).is_ok())
                    {
                        return Ok(());
                    }
                }
                None => malformed = true,
            }
        }
        if let Some(sig) = presented.legacy {
            match decode(sig) {
                Some(bytes) => {
                    let accepted = std::iter::once(&self.legacy).chain(&self.previous);
                    for key in accepted {
                        if hmac::verify(&key.0, body, &bytes).is_ok() {
                            return Ok(());
                        }
                    }
                }
                None => malformed = true,
            }
        }
        if malformed {
            Err(SignatureError::Malformed)
        } else {
            Err(SignatureError::Unverified)
        }
    }

    /// A short name derived from the deployment's own secret (the
    /// configured `tickets.secret`, else the deployment key, else, before
    /// either is known, the API key) and `label`: 16 hex digits that
    /// someone without the secret cannot compute, for internal names that
    /// producers must not find (the quota ledger).
    pub fn tag(&self, label: &str) -> String {
        let keys = self
            .deployment
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let key = match (self.secret_configured, keys.first()) {
            (false, Some((_, k))) => k,
            _ => &self.legacy,
        };
        let mac = hmac::sign(&key.0, format!("vidu-worker name tag\0{label}").as_bytes());
        hex::encode(&mac.as_ref()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    fn legacy_only(sig: &str) -> Presented<'_> {
        Presented {
            legacy: Some(sig),
            deployment: None,
        }
    }

    fn both(s: &Signatures) -> Presented<'_> {
        Presented {
            legacy: Some(&s.legacy),
            deployment: s.deployment.as_deref(),
        }
    }

    #[test]
    fn a_signed_ticket_verifies_and_any_change_breaks_it() {
        let signer = Signer::new(&secret("s1"), &[], "vidu.requests", true);
        let body = br#"{"v":1,"request_id":"r-1"}"#;
        let sig = signer.sign(body);
        assert_eq!(sig.legacy.len(), 64);
        assert_eq!(sig.deployment, None, "no deployment key yet");
        assert_eq!(signer.verify(body, both(&sig)), Ok(()));
        assert_eq!(
            signer.verify(br#"{"v":1,"request_id":"r-2"}"#, both(&sig)),
            Err(SignatureError::Unverified)
        );
        assert_eq!(
            signer.verify(body, Presented::default()),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            signer.verify(body, legacy_only("zz")),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            signer.verify(body, legacy_only(&"g".repeat(64))),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn deployments_and_secrets_do_not_accept_each_others_tickets() {
        let body = b"ticket";
        let a = Signer::new(&secret("s1"), &[], "team-a.requests", true);
        let b = Signer::new(&secret("s1"), &[], "team-b.requests", true);
        let other = Signer::new(&secret("s2"), &[], "team-a.requests", true);
        for s in [&a, &b, &other] {
            s.add_deployment_key("the-same-deployment-key");
        }
        let sig = a.sign(body);
        // The same deployment key, another deployment: not accepted.
        assert_eq!(b.verify(body, both(&sig)), Err(SignatureError::Unverified));
        // Another secret, the same deployment key: accepted by that key.
        assert_eq!(other.verify(body, both(&sig)), Ok(()));
        assert_eq!(
            other.verify(body, legacy_only(&sig.legacy)),
            Err(SignatureError::Unverified)
        );
    }

    #[test]
    fn previous_secrets_verify_during_a_rotation_but_never_sign() {
        let body = b"ticket";
        let old = Signer::new(&secret("old"), &[], "q", true);
        let rotated = Signer::new(&secret("new"), &[secret("old")], "q", true);
        let after = Signer::new(&secret("new"), &[], "q", true);
        let old_sig = old.sign(body).legacy;
        assert_eq!(rotated.verify(body, legacy_only(&old_sig)), Ok(()));
        assert_ne!(
            rotated.sign(body).legacy,
            old_sig,
            "signs with the new secret"
        );
        assert_eq!(
            old.verify(body, legacy_only(&rotated.sign(body).legacy)),
            Err(SignatureError::Unverified)
        );
        assert_eq!(
            after.verify(body, legacy_only(&old_sig)),
            Err(SignatureError::Unverified)
        );
    }

    #[test]
    fn workers_holding_different_api_keys_verify_each_other_by_the_deployment_key() {
        let body = b"ticket";
        let first = Signer::new(&secret("sk-one"), &[], "q", false);
        let second = Signer::new(&secret("sk-two"), &[], "q", false);
        // Before the journal is read, the API keys alone do not agree.
        assert_eq!(
            second.verify(body, both(&first.sign(body))),
            Err(SignatureError::Unverified)
        );
        for s in [&first, &second] {
            assert!(s.add_deployment_key("k-deploy"));
            assert!(!s.add_deployment_key("k-deploy"), "known already");
        }
        assert_eq!(second.verify(body, both(&first.sign(body))), Ok(()));
        assert_eq!(first.verify(body, both(&second.sign(body))), Ok(()));
        // A later key is accepted too, but the first one keeps signing.
        second.add_deployment_key("k-later");
        assert_eq!(second.sign(body).deployment, first.sign(body).deployment);
        // A version without deployment keys reads the legacy signature.
        let old_version = Signer::new(&secret("sk-one"), &[], "q", false);
        assert_eq!(
            old_version.verify(body, legacy_only(&first.sign(body).legacy)),
            Ok(())
        );
        // A malformed deployment signature does not spoil a valid legacy one.
        let sig = first.sign(body);
        assert_eq!(
            first.verify(
                body,
                Presented {
                    legacy: Some(&sig.legacy),
                    deployment: Some("nope")
                }
            ),
            Ok(())
        );
    }

    #[test]
    fn tags_follow_the_deployment_secret_not_the_api_key() {
        let one = Signer::new(&secret("sk-one"), &[], "q", false);
        let two = Signer::new(&secret("sk-two"), &[], "q", false);
        assert_ne!(one.tag("ledger"), two.tag("ledger"), "API keys differ");
        one.add_deployment_key("k");
        two.add_deployment_key("k");
        assert_eq!(one.tag("ledger"), two.tag("ledger"));
        assert_ne!(one.tag("ledger"), one.tag("other"));
        assert_eq!(one.tag("ledger").len(), 16);
        // A configured secret is the deployment's own: it decides.
        let s1 = Signer::new(&secret("secret"), &[], "q", true);
        let s2 = Signer::new(&secret("secret"), &[], "q", true);
        s1.add_deployment_key("k");
        assert_eq!(s1.tag("ledger"), s2.tag("ledger"));
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let signer = Signer::new(&secret("sk-very-secret"), &[secret("sk-old")], "q", false);
        signer.add_deployment_key("deployment-material");
        let text = format!("{signer:?}");
        assert!(!text.contains("sk-"), "{text}");
        assert!(text.contains("[REDACTED]"), "{text}");
    }
}
