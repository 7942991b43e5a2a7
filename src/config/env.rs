//! The environment layer in reverse: [`env_vars`] turns [`Settings`] into
//! the `VIDU_WORKER__SECTION__KEY` variables that
//! [`Settings::load_with_env`] reads back into the same settings, walking
//! the schema's serialized form rather than a list of keys, so that a new
//! setting is covered without a change here. It is the only way the secret
//! settings are serialized in the clear: the serializers of secret fields
//! below write them redacted unless called from inside [`env_vars`]. Meant
//! for starting worker processes with given settings (tests, tools), never
//! for logs.

use std::cell::Cell;

use secrecy::{ExposeSecret, SecretString};
use serde::{ser::SerializeSeq, Serializer};
use serde_json::Value;

use super::{redact_url, ConfigError, Settings, ENV_PREFIX};

/// What a secret setting serializes as outside [`env_vars`].
const REDACTED: &str = "[REDACTED]";

thread_local! {
    /// Set while [`env_vars`] serializes, on its thread only.
    static EXPOSE_SECRETS: Cell<bool> = const { Cell::new(false) };
}

/// Exposes secrets to serialization on this thread until dropped.
struct ExposeSecrets(bool);

impl ExposeSecrets {
    fn on() -> Self {
        Self(EXPOSE_SECRETS.replace(true))
    }
}

impl Drop for ExposeSecrets {
    fn drop(&mut self) {
        EXPOSE_SECRETS.set(self.0);
    }
}

/// The environment variables that configure a worker with `settings`, one
/// for every set key, defaults included: durations as humantime text, lists
/// (`tickets.previous_secrets`) joined with commas, unset options left out.
/// Does not set `NOVITA_API_KEY` (the API key goes in
/// `VIDU_WORKER__UPSTREAM__API_KEY`, which that variable would override).
///
/// The result holds every secret of the settings in the clear (API key,
/// broker URL and password, ticket secrets): pass it to a child process,
/// never to a log. Fails only for a path that is not UTF-8.
///
/// Values go through the environment layer's parsing, so a string setting
/// that reads as a number (`1e3`) or a comma in a previous ticket secret
/// does not survive the trip, and names of `amqp.queue_arguments` come
/// back in lower case.
pub fn env_vars(settings: &Settings) -> Result<Vec<(String, String)>, ConfigError> {
    let tree = {
        let _expose = ExposeSecrets::on();
        serde_json::to_value(settings)
    }
    .map_err(|e| ConfigError::new("<settings>", e.to_string()))?;
    let mut out = Vec::new();
    flatten(ENV_PREFIX, &tree, &mut out);
    Ok(out)
}

/// Adds the variables of `value`, found under the variable name `name`.
fn flatten(name: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Null => {}
        Value::Object(fields) => {
            for (key, value) in fields {
                flatten(&format!("{name}__{}", key.to_uppercase()), value, out);
            }
        }
        Value::Array(items) if items.is_empty() => {}
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(text).collect();
            out.push((name.to_owned(), items.join(",")));
        }
        scalar => out.push((name.to_owned(), text(scalar))),
    }
}

/// A scalar as the environment layer reads it.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn exposed() -> bool {
    EXPOSE_SECRETS.get()
}

/// Serializes `amqp.url`: in the clear inside [`env_vars`], else without
/// its password.
pub(super) fn secret_url<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    if exposed() {
        s.serialize_str(url.expose_secret())
    } else {
        s.serialize_str(&redact_url(url.expose_secret()))
    }
}

/// Serializes an optional secret: in the clear inside [`env_vars`], else
/// redacted.
pub(super) fn optional_secret<S: Serializer>(
    secret: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        None => s.serialize_none(),
        Some(secret) if exposed() => s.serialize_some(secret.expose_secret()),
        Some(_) => s.serialize_some(REDACTED),
    }
}

/// Serializes a list of secrets: in the clear inside [`env_vars`], else
/// redacted.
pub(super) fn secrets<S: Serializer>(secrets: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    let expose = exposed();
    let mut seq = s.serialize_seq(Some(secrets.len()))?;
    for secret in secrets {
        if expose {
            seq.serialize_element(secret.expose_secret())?;
        } else {
            seq.serialize_element(REDACTED)?;
        }
    }
    seq.end()
}
