//! TLS material: the PEM files that settings name (CA bundles, a client
//! certificate and its private key), read and checked. The broker
//! connection reads them at every connect (so rotated files are picked up),
//! the upstream client trusts `upstream.ca_file`, and the configuration
//! loader checks them once at start, so that a typo is an error naming the
//! setting rather than a failed handshake later. This module is a leaf: it
//! knows file paths and the key of the setting that named them, not the
//! settings themselves, and its [`FileError`] converts into
//! [`ConfigError`](crate::config::ConfigError) with the same key and words.

use std::path::Path;

/// A problem with a file named by a setting, in the words of a
/// configuration error.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct FileError {
    /// The dotted key of the setting that named the file (`amqp.tls.ca_file`).
    pub key: String,
    /// What is wrong with the file.
    pub problem: String,
}

impl FileError {
    fn new(key: &str, problem: String) -> Self {
        Self {
            key: key.to_owned(),
            problem,
        }
    }
}

/// Reads a file named by setting `key`; the error names the key.
pub fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path)
        .map_err(|e| FileError::new(key, format!("cannot read {}: {e}", path.display())))
}

/// The certificates of a PEM file named by setting `key` (at least one).
pub fn load_certificates(key: &str, path: &Path) -> Result<Vec<reqwest::Certificate>, FileError> {
    let pem = read_file(key, path)?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(FileError::new(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        )),
        Err(e) => Err(FileError::new(
            key,
            format!("{} is not a PEM certificate file: {e}", path.display()),
        )),
    }
}

/// Checks that the PEM private key file `path` (named by setting `key`) is
/// unencrypted and goes with the client certificate file `cert` (named by
/// `cert_key`).
pub fn check_private_key(
    key: &str,
    path: &Path,
    cert_key: &str,
    cert: &Path,
) -> Result<(), FileError> {
    let pem = read_file(key, path)?;
    if pem.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(FileError::new(
            key,
            format!(
                "{} is encrypted; give the key unencrypted (there is no passphrase setting)",
                path.display()
            ),
        ));
    }
    let mut both = read_file(cert_key, cert)?;
    both.push(b'\n');
    both.extend_from_slice(&pem);
    reqwest::Identity::from_pem(&both).map(drop).map_err(|_| {
        FileError::new(
            key,
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                path.display()
            ),
        )
    })
}
