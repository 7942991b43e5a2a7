//! Ticket signatures: only tickets this deployment wrote are acted on.
//!
//! Producers may write into any queue of the vhost (the default exchange
//! reaches every queue by name), internal ones included. A message shaped
//! like a ticket would otherwise be polled with the operator's key and
//! turned into events for someone else's request. Every ticket the worker
//! writes carries an HMAC-SHA256 of its body in the `x-vidu-signature`
//! header; a ticket whose signature does not verify is dead-lettered
//! without an upstream call or an event. The key is derived from
//! `tickets.secret` (or, when unset, from the API key) and the request
//! queue's name, so deployments never accept each other's tickets. Keys
//! still accepted for verification (`tickets.previous_secrets`) let an
//! operator rotate the secret, or the API key it derives from, while tickets
//! up to 72 hours old are in flight. This module never logs a key and never
//! puts one in an error.

use ring::hmac;
use secrecy::{ExposeSecret, SecretString};

/// Header carrying a ticket's signature (lowercase hex).
pub const SIGNATURE_HEADER: &str = "x-vidu-signature";
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
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Why a ticket is not accepted as one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is absent or not a string.
    #[error(
        "the ticket is not signed (no {SIGNATURE_HEADER} header): this deployment did not write it"
    )]
    Missing,
    /// The header is not 64 hex digits.
    #[error("the ticket's signature is malformed")]
    Malformed,
    /// No key this deployment accepts made it.
    #[error("the ticket's signature does not verify: it was not written by this deployment (or with a secret it no longer accepts)")]
    Invalid,
}

/// Signs tickets with the current key and verifies them with it or any
/// previous one.
#[derive(Clone, Debug)]
pub struct Signer {
    current: Key,
    previous: Vec<Key>,
}

impl Signer {
    /// Keys derived from `current` and each of `previous` (secrets, or API
    /// keys when the deployment signs with its API key), for the deployment
    /// of `request_queue`.
    pub fn new(current: &SecretString, previous: &[SecretString], request_queue: &str) -> Self {
        Self {
            current: Key::derive(current.expose_secret(), request_queue),
            previous: previous
                .iter()
                .map(|p| Key::derive(p.expose_secret(), request_queue))
                .collect(),
        }
    }

    /// The signature of `body`, as the header carries it.
    pub fn sign(&self, body: &[u8]) -> String {
        hex::encode(hmac::sign(&self.current.0, body).as_ref())
    }

    /// Checks `signature` (the header's value, if any) against `body` with
    /// every accepted key, in constant time per key.
    pub fn verify(&self, body: &[u8], signature: Option<&str>) -> Result<(), SignatureError> {
        let signature = signature.ok_or(SignatureError::Missing)?;
        if signature.len() != 64 {
            return Err(SignatureError::Malformed);
        }
        let bytes = hex::decode(signature).map_err(|_| SignatureError::Malformed)?;
        for key in std::iter::once(&self.current).chain(&self.previous) {
            if hmac::verify(&key.0, body, &bytes).is_ok() {
                return Ok(());
            }
        }
        Err(SignatureError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn a_signed_ticket_verifies_and_any_change_breaks_it() {
        let signer = Signer::new(&secret("s1"), &[], "vidu.requests");
        let body = br#"{"v":1,"request_id":"r-1"}"#;
        let sig = signer.sign(body);
        assert_eq!(sig.len(), 64);
        assert_eq!(signer.verify(body, Some(&sig)), Ok(()));
        assert_eq!(
            signer.verify(br#"{"v":1,"request_id":"r-2"}"#, Some(&sig)),
            Err(SignatureError::Invalid)
        );
        assert_eq!(signer.verify(body, None), Err(SignatureError::Missing));
        assert_eq!(
            signer.verify(body, Some("zz")),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            signer.verify(body, Some(&"g".repeat(64))),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn deployments_and_secrets_do_not_accept_each_others_tickets() {
        let body = b"ticket";
        let a = Signer::new(&secret("s1"), &[], "team-a.requests");
        let b = Signer::new(&secret("s1"), &[], "team-b.requests");
        let other = Signer::new(&secret("s2"), &[], "team-a.requests");
        let sig = a.sign(body);
        assert_eq!(b.verify(body, Some(&sig)), Err(SignatureError::Invalid));
        assert_eq!(other.verify(body, Some(&sig)), Err(SignatureError::Invalid));
    }

    #[test]
    fn previous_secrets_verify_during_a_rotation_but_never_sign() {
        let body = b"ticket";
        let old = Signer::new(&secret("old"), &[], "q");
        let rotated = Signer::new(&secret("new"), &[secret("old")], "q");
        let after = Signer::new(&secret("new"), &[], "q");
        let old_sig = old.sign(body);
        assert_eq!(rotated.verify(body, Some(&old_sig)), Ok(()));
        assert_ne!(rotated.sign(body), old_sig, "signs with the new secret");
        assert_eq!(
            old.verify(body, Some(&rotated.sign(body))),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            after.verify(body, Some(&old_sig)),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let signer = Signer::new(&secret("sk-very-secret"), &[secret("sk-old")], "q");
        let text = format!("{signer:?}");
        assert!(!text.contains("sk-"), "{text}");
    }
}
