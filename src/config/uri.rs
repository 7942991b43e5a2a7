//! The broker URL as the worker uses it: the `amqp.url` setting with
//! `amqp.username`, `amqp.password` and `amqp.password_file` applied (the
//! URI the broker connection dials), its vhost and scheme, and the redacted
//! forms that logs and errors show. It lives in the configuration because
//! these are the meaning of those keys, which the loader also checks at
//! start (a missing password file is a configuration error naming the key);
//! the broker module only dials the result.

use secrecy::{ExposeSecret, SecretString};

use super::{AmqpSettings, ConfigError};

impl AmqpSettings {
    /// The broker address to show in logs and errors: the URL with the
    /// effective user name and without any password.
    pub fn display_url(&self) -> String {
        match url::Url::parse(self.url.expose_secret()) {
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

    /// The parsed URL with `username`, `password` and `password_file`
    /// applied. Reads the password file, so a rotated Secret is picked up at
    /// the next connection. The result holds the password: never log it.
    pub fn connection_uri(&self) -> Result<lapin::uri::AMQPUri, ConfigError> {
        let mut uri: lapin::uri::AMQPUri = self
            .url
            .expose_secret()
            .parse()
            .map_err(|_| ConfigError::new("amqp.url", "is not a valid AMQP URL"))?;
        if let Some(user) = &self.username {
            uri.authority.userinfo.username.clone_from(user);
        }
        if let Some(password) = self.effective_password()? {
            uri.authority.userinfo.password = password.expose_secret().to_owned();
        }
        Ok(uri)
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

    /// The vhost named by the URL (`/` for `%2f`).
    pub fn vhost(&self) -> String {
        self.url
            .expose_secret()
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "?".into())
    }

    /// Whether the URL asks for TLS.
    pub fn uses_tls(&self) -> bool {
        self.url.expose_secret().starts_with("amqps://")
    }
}

/// Hides the password of a URL for logs.
pub fn redact_url(url: &str) -> String {
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
