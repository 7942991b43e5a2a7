//! The broker URL as the worker uses it: the `amqp.url` setting — one URL,
//! or the nodes of one cluster as a comma-separated list — with
//! `amqp.username`, `amqp.password` and `amqp.password_file` applied (the
//! URIs the broker connection dials), its vhost and scheme, and the redacted
//! forms that logs and errors show. It lives in the configuration because
//! these are the meaning of those keys, which the loader also checks at
//! start (a missing password file is a configuration error naming the key);
//! the broker module only dials the result.

use lapin::uri::AMQPUri;
use secrecy::{ExposeSecret, SecretString};

use super::{AmqpSettings, ConfigError};

/// Most node URLs `amqp.url` may list.
pub const MAX_NODES: usize = 32;

/// One broker node of `amqp.url`, ready to dial.
pub struct NodeUri {
    /// The URI with the effective credentials. Holds the password: never
    /// log it.
    pub uri: AMQPUri,
    /// How logs, `/readyz` and errors name the node: `host:port`.
    pub name: String,
}

/// Splits an `amqp.url` value into its node URLs: at each comma that is
/// followed (after spaces) by `amqp://`, `amqps://` or nothing (a trailing
/// comma leaves an empty, refused piece), so a comma inside a
/// password does not split a URL. Pieces are trimmed.
pub fn split_urls(list: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        let rest = list[i + 1..].trim_start();
        let scheme = |s: &str| {
            rest.get(..s.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(s))
        };
        if rest.is_empty() || scheme("amqp://") || scheme("amqps://") {
            pieces.push(list[start..i].trim());
            start = i + 1;
        }
    }
    pieces.push(list[start..].trim());
    pieces
}

/// How a node is named: `host:port` of its URL (no user, no password).
fn node_name(uri: &AMQPUri) -> String {
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

impl AmqpSettings {
    /// The broker address to show in logs and errors: every node's URL
    /// with the effective user name and without any password.
    pub fn display_url(&self) -> String {
        split_urls(self.url.expose_secret())
            .into_iter()
            .map(|one| self.display_one(one))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn display_one(&self, one: &str) -> String {
        match url::Url::parse(one) {
            Ok(mut u) => {
                if let Some(user) = &self.username {
                    let _ = u.set_username(user);
                }
                if u.password().is_some() || self.password.is_some() || self.password_file.is_some()
                {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            }
            Err(_) => "<unparseable url>".into(),
        }
    }

    /// The `index`-th node's URL as [`AmqpSettings::display_url`] shows it
    /// (user name, no password); empty past the end of the list.
    pub fn display_node(&self, index: usize) -> String {
        split_urls(self.url.expose_secret())
            .get(index)
            .map(|one| self.display_one(one))
            .unwrap_or_default()
    }

    /// How many node URLs `amqp.url` lists.
    pub fn node_count(&self) -> usize {
        split_urls(self.url.expose_secret()).len()
    }

    /// Every node's URI with `username`, `password` and `password_file`
    /// applied, in the order `amqp.url` lists them. Reads the password file,
    /// so a rotated Secret is picked up at the next connection. The result
    /// holds the password: never log it.
    pub fn node_uris(&self) -> Result<Vec<NodeUri>, ConfigError> {
        let password = self.effective_password()?;
        split_urls(self.url.expose_secret())
            .into_iter()
            .map(|one| {
                let mut uri: AMQPUri = one
                    .parse()
                    .map_err(|_| ConfigError::new("amqp.url", "is not a valid AMQP URL"))?;
                if let Some(user) = &self.username {
                    uri.authority.userinfo.username.clone_from(user);
                }
                if let Some(password) = &password {
                    uri.authority.userinfo.password = password.expose_secret().to_owned();
                }
                let name = node_name(&uri);
                Ok(NodeUri { uri, name })
            })
            .collect()
    }

    /// The first node's URI (see [`AmqpSettings::node_uris`]).
    pub fn connection_uri(&self) -> Result<AMQPUri, ConfigError> {
        self.node_uris()?
            .into_iter()
            .next()
            .map(|n| n.uri)
            .ok_or_else(|| ConfigError::new("amqp.url", "names no broker"))
    }

    /// Checks the node list: every URL valid, at most [`MAX_NODES`], one
    /// scheme and one vhost for all (they are the nodes of one cluster; a
    /// cluster reached partly in clear text would downgrade the TLS the
    /// other URLs ask for).
    pub(super) fn validate_nodes(&self) -> Result<(), ConfigError> {
        let urls = split_urls(self.url.expose_secret());
        if urls.len() > MAX_NODES {
            return Err(ConfigError::new(
                "amqp.url",
                format!("lists {} URLs; at most {MAX_NODES}", urls.len()),
            ));
        }
        let mut first: Option<(bool, String)> = None;
        for (i, one) in urls.iter().enumerate() {
            let which = if urls.len() == 1 {
                String::new()
            } else {
                format!(" (URL {} of {})", i + 1, urls.len())
            };
            let tls = one.starts_with("amqps://");
            if !(tls || one.starts_with("amqp://")) {
                return Err(ConfigError::new(
                    "amqp.url",
                    format!("must start with amqp:// or amqps://{which}"),
                ));
            }
            let uri: AMQPUri = one.parse().map_err(|_| {
                ConfigError::new("amqp.url", format!("is not a valid AMQP URL{which}"))
            })?;
            match &first {
                None => first = Some((tls, uri.vhost)),
                Some((first_tls, _)) if *first_tls != tls => {
                    return Err(ConfigError::new(
                        "amqp.url",
                        format!(
                            "mixes amqp:// and amqps:// URLs{which}; the nodes of one cluster are reached the same way"
                        ),
                    ))
                }
                Some((_, vhost)) if *vhost != uri.vhost => {
                    return Err(ConfigError::new(
                        "amqp.url",
                        format!("names another vhost{which}; every node URL names the same vhost"),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The password from `password` or `password_file`, if either is set.
    pub(super) fn effective_password(&self) -> Result<Option<SecretString>, ConfigError> {
        if let Some(password) = &self.password {
            return Ok(Some(password.clone()));
        }
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "amqp.password_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::new(
                "amqp.password_file",
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Some(SecretString::from(trimmed.to_owned())))
    }

    /// The vhost named by the URLs (`/` for `%2f`).
    pub fn vhost(&self) -> String {
        split_urls(self.url.expose_secret())
            .first()
            .copied()
            .unwrap_or_default()
            .parse::<AMQPUri>()
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "?".into())
    }

    /// Whether the URLs ask for TLS (all of them do, or none does).
    pub fn uses_tls(&self) -> bool {
        self.url.expose_secret().starts_with("amqps://")
    }
}

/// Hides the passwords of a URL, or of each URL of a list, for logs.
pub fn redact_url(url: &str) -> String {
    split_urls(url)
        .into_iter()
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(", ")
}

fn redact_one(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_before_each_scheme_only() {
        let table: &[(&str, &[&str])] = &[
            ("amqp://h1", &["amqp://h1"]),
            ("amqp://h1,amqp://h2", &["amqp://h1", "amqp://h2"]),
            (
                " amqp://h1 , amqps://h2:5671/v ,AMQP://h3 ",
                &["amqp://h1", "amqps://h2:5671/v", "AMQP://h3"],
            ),
            // A comma in a password does not split.
            (
                "amqp://u:p,w@h1/%2f,amqp://u:p,w@h2/%2f",
                &["amqp://u:p,w@h1/%2f", "amqp://u:p,w@h2/%2f"],
            ),
            // A trailing comma leaves an empty piece, which validation refuses.
            ("amqp://h1,", &["amqp://h1", ""]),
            ("", &[""]),
        ];
        for (list, want) in table {
            assert_eq!(&split_urls(list), want, "{list:?}");
        }
    }

    #[test]
    fn every_password_of_a_list_is_redacted() {
        let shown = redact_url("amqp://u:secret1@h1:5672/%2f,amqp://u:secret2@h2:5673/%2f");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "amqp://u:***@h1:5672/%2f, amqp://u:***@h2:5673/%2f");
    }
}
