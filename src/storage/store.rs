//! The bucket: the user's S3-compatible store, through `rust-s3` (which
//! signs every request; nothing here builds a signature).
//!
//! The worker drives multipart uploads itself, sending its parts one after
//! the other, so that a copy holds a few parts in memory whatever the
//! video's size; an
//! upload that fails midway is aborted (a crash leaves it to the bucket's
//! lifecycle rule, see the README). What the store answers is classified
//! by [`store_failure`], a plain function: refused credentials and a
//! missing bucket are the operator's problem (intake pauses), everything
//! else is tried again on the ticket's schedule. Credentials come from
//! `storage.access_key_id` with `storage.secret_access_key_file` (read
//! again on every [`Store::refresh`]) or from the `AWS_*` variables; they
//! never appear in a message, a log line or an event.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use s3::{creds::Credentials, error::S3Error, serde_types::Part, Bucket, Region};
use secrecy::{ExposeSecret, SecretString};

use super::CopyError;
use crate::config::StorageSettings;

/// Where the credentials come from.
#[derive(Clone)]
pub enum CredentialSource {
    /// `storage.access_key_id` and the secret in a file.
    File {
        /// The access key id.
        access_key_id: String,
        /// The file holding the secret.
        secret_file: PathBuf,
    },
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    Environment {
        /// The access key id.
        access_key_id: String,
        /// The secret.
        secret: SecretString,
        /// A session token, with temporary credentials.
        session_token: Option<SecretString>,
    },
}

/// Why the store cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No credentials anywhere.
    #[error("storage.bucket is set but no credentials are: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or storage.access_key_id with storage.secret_access_key_file")]
    NoCredentials,
    /// The secret file cannot be read.
    #[error("cannot read storage.secret_access_key_file: {0}")]
    SecretFile(std::io::ErrorKind),
    /// The S3 client refused the settings.
    #[error("the storage settings are not usable: {0}")]
    Client(String),
}

impl CredentialSource {
    /// From the settings, or else the environment map.
    pub fn from_settings(
        settings: &StorageSettings,
        env: &HashMap<String, String>,
    ) -> Result<Self, SetupError> {
        if let (Some(id), Some(file)) = (&settings.access_key_id, &settings.secret_access_key_file)
        {
            return Ok(Self::File {
                access_key_id: id.clone(),
                secret_file: file.clone(),
            });
        }
        let var = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => Ok(Self::Environment {
                access_key_id: id.to_owned(),
                secret: SecretString::from(secret.to_owned()),
                session_token: var("AWS_SESSION_TOKEN").map(|t| SecretString::from(t.to_owned())),
            }),
            _ => Err(SetupError::NoCredentials),
        }
    }

    fn credentials(&self) -> Result<Credentials, SetupError> {
        let (id, secret, token) = match self {
            Self::File {
                access_key_id,
                secret_file,
            } => {
                let secret = std::fs::read_to_string(secret_file)
                    .map_err(|e| SetupError::SecretFile(e.kind()))?;
                (
                    access_key_id.clone(),
                    SecretString::from(secret.trim().to_owned()),
                    None,
                )
            }
            Self::Environment {
                access_key_id,
                secret,
                session_token,
            } => (access_key_id.clone(), secret.clone(), session_token.clone()),
        };
        let token = token.as_ref().map(|t| t.expose_secret().to_owned());
        Credentials::new(
            Some(&id),
            Some(secret.expose_secret()),
            None,
            token.as_deref(),
            None,
        )
        // The client's error could quote what it was given.
        .map_err(|_| SetupError::Client("the credentials are not usable".into()))
    }
}

/// What the store's answer to a failed request means: refused credentials
/// or a missing bucket pause intake ([`CopyError::StoreRefused`]), the rest
/// is tried again later. `code` is the S3 error code of the answer's body.
pub fn store_failure(status: u16, code: &str) -> CopyError {
    const CREDENTIALS: &[&str] = &[
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "AccountProblem",
    ];
    let said = if code.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} {code}")
    };
    match (status, code) {
        (404, "NoSuchBucket") => {
            CopyError::StoreRefused(format!("the bucket does not exist ({said})"))
        }
        (301 | 307, _) | (_, "PermanentRedirect") => CopyError::StoreRefused(format!(
            "the bucket is in another region or behind another endpoint ({said})"
        )),
        (401 | 403, _) => CopyError::StoreRefused(format!(
            "the store refuses the storage credentials ({said})"
        )),
        (400, c) if CREDENTIALS.contains(&c) => CopyError::StoreRefused(format!(
            "the store refuses the storage credentials ({said})"
        )),
        (400, "EntityTooLarge") => {
            CopyError::Rejected(format!("the store refused the video ({said})"))
        }
        _ => CopyError::Transient(format!("the store answered {said}")),
    }
}

/// The S3 error code in an error body (`<Code>NoSuchBucket</Code>`): only
/// letters and digits, at most 64, never anything else of the body.
pub fn error_code(body: &str) -> String {
    body.split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code)
        .filter(|code| code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("")
        .to_owned()
}

/// What a client error means, without its text (which may quote a body).
fn failure(e: S3Error) -> CopyError {
    match e {
        S3Error::HttpFailWithBody(status, body) => store_failure(status, &error_code(&body)),
        S3Error::HttpFail => CopyError::Transient("the store answered an error".into()),
        S3Error::Reqwest(e) if e.is_timeout() => {
            CopyError::Transient("the store did not answer in time".into())
        }
        S3Error::Reqwest(e) if e.is_connect() => {
            CopyError::Transient("could not connect to the store".into())
        }
        S3Error::Reqwest(_) | S3Error::Io(_) => {
            CopyError::Transient("the connection to the store failed".into())
        }
        _ => CopyError::Transient("the store's answer could not be read".into()),
    }
}

/// An object as the store describes it after the upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// Its size.
    pub size: u64,
    /// Its ETag, without quotes.
    pub etag: String,
}

/// The bucket.
pub struct Store {
    settings: StorageSettings,
    source: CredentialSource,
    bucket: RwLock<Arc<Bucket>>,
}

impl Store {
    /// A client for the bucket in `settings` (which must name one).
    pub fn new(settings: &StorageSettings, source: CredentialSource) -> Result<Self, SetupError> {
        let bucket = Self::bucket(settings, &source)?;
        Ok(Self {
            settings: settings.clone(),
            source,
            bucket: RwLock::new(bucket),
        })
    }

    fn bucket(
        settings: &StorageSettings,
        source: &CredentialSource,
    ) -> Result<Arc<Bucket>, SetupError> {
        let name = settings.bucket.as_deref().unwrap_or_default();
        let region = match &settings.endpoint {
            Some(endpoint) => Region::Custom {
                region: settings.region.clone(),
                endpoint: endpoint.trim_end_matches('/').to_owned(),
            },
            None => settings
                .region
                .parse()
                .map_err(|_| SetupError::Client("storage.region is not a region".into()))?,
        };
        let client_error = |_: S3Error| SetupError::Client("the S3 client refused them".into());
        let mut bucket = Bucket::new(name, region, source.credentials()?).map_err(client_error)?;
        if settings.path_style {
            bucket = bucket.with_path_style();
        }
        let bucket = bucket
            .with_request_timeout(settings.request_timeout)
            .map_err(client_error)?;
        Ok(Arc::new(*bucket))
    }

    /// Reads the credentials again (a rotated secret file).
    pub fn refresh(&self) -> Result<(), SetupError> {
        let bucket = Self::bucket(&self.settings, &self.source)?;
        *self.bucket.write().unwrap_or_else(PoisonError::into_inner) = bucket;
        Ok(())
    }

    fn current(&self) -> Arc<Bucket> {
        self.bucket
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        self.settings.bucket.as_deref().unwrap_or_default()
    }

    /// Starts an upload of `key`.
    pub fn upload(&self, key: String, content_type: String) -> Upload {
        Upload {
            bucket: self.current(),
            key,
            content_type,
            id: None,
            parts: Vec::new(),
        }
    }

    /// The stored object's size and ETag.
    pub async fn describe(&self, key: &str) -> Result<Described, CopyError> {
        let (head, status) = self.current().head_object(key).await.map_err(failure)?;
        if !(200..300).contains(&status) {
            return Err(store_failure(status, ""));
        }
        let size = head
            .content_length
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                CopyError::Transient("the store did not say the object's size".into())
            })?;
        let etag = head
            .e_tag
            .unwrap_or_default()
            .trim_matches('"')
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(128)
            .collect();
        Ok(Described { size, etag })
    }

    /// A presigned GET URL of `key`, valid for `valid`.
    pub async fn presign(&self, key: &str, valid: Duration) -> Result<String, CopyError> {
        let secs = u32::try_from(valid.as_secs()).unwrap_or(u32::MAX);
        self.current()
            .presign_get(key, secs, None)
            .await
            .map_err(|_| CopyError::Transient("could not presign the copy's URL".into()))
    }

    /// Writes, reads back and deletes a small object under `key`.
    pub async fn check(&self, key: &str) -> Result<(), CopyError> {
        let bucket = self.current();
        let body = format!("vidu-worker storage check {}", uuid::Uuid::new_v4());
        bucket
            .put_object_with_content_type(key, body.as_bytes(), "text/plain")
            .await
            .map_err(failure)?;
        let read = bucket.get_object(key).await.map_err(failure)?;
        let same = read.bytes().as_ref() == body.as_bytes();
        bucket.delete_object(key).await.map_err(failure)?;
        if same {
            Ok(())
        } else {
            Err(CopyError::Transient(
                "the store gave back other bytes than were written".into(),
            ))
        }
    }
}

/// One object being written: a single PUT when it fits in one part,
/// otherwise a multipart upload of parts sent one at a time.
pub struct Upload {
    bucket: Arc<Bucket>,
    key: String,
    content_type: String,
    id: Option<String>,
    parts: Vec<Part>,
}

impl Upload {
    /// Sends one full part (starting the multipart upload first).
    pub async fn part(&mut self, chunk: Vec<u8>) -> Result<(), CopyError> {
        let id = match &self.id {
            Some(id) => id.clone(),
            None => {
                let started = self
                    .bucket
                    .initiate_multipart_upload(&self.key, &self.content_type)
                    .await
                    .map_err(failure)?;
                self.id = Some(started.upload_id.clone());
                started.upload_id
            }
        };
        let number = u32::try_from(self.parts.len() + 1).unwrap_or(u32::MAX);
        let part = self
            .bucket
            .put_multipart_chunk(chunk, &self.key, number, &id, &self.content_type)
            .await
            .map_err(failure)?;
        self.parts.push(part);
        Ok(())
    }

    /// Sends what is left and completes the object.
    pub async fn finish(mut self, last: Vec<u8>) -> Result<(), CopyError> {
        let Some(id) = self.id.clone() else {
            self.bucket
                .put_object_with_content_type(&self.key, &last, &self.content_type)
                .await
                .map_err(failure)?;
            return Ok(());
        };
        if !last.is_empty() {
            self.part(last).await?;
        }
        let parts = std::mem::take(&mut self.parts);
        self.bucket
            .complete_multipart_upload(&self.key, &id, parts)
            .await
            .map_err(failure)?;
        Ok(())
    }

    /// Aborts a multipart upload, if one was started (best effort: what is
    /// left is the lifecycle rule's).
    pub async fn abort(self) {
        if let Some(id) = &self.id {
            if let Err(e) = self.bucket.abort_upload(&self.key, id).await {
                tracing::debug!(error = %failure(e), "could not abort a multipart upload");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_s_answers_are_classified() {
        for (status, code, kind) in [
            (403, "AccessDenied", "refused"),
            (403, "InvalidAccessKeyId", "refused"),
            (403, "SignatureDoesNotMatch", "refused"),
            (401, "", "refused"),
            (400, "ExpiredToken", "refused"),
            (404, "NoSuchBucket", "refused"),
            (301, "PermanentRedirect", "refused"),
            (404, "NoSuchUpload", "transient"),
            (404, "NoSuchKey", "transient"),
            (500, "InternalError", "transient"),
            (503, "SlowDown", "transient"),
            (429, "", "transient"),
            (400, "BadDigest", "transient"),
            (400, "EntityTooLarge", "rejected"),
        ] {
            let got = match store_failure(status, code) {
                CopyError::StoreRefused(_) => "refused",
                CopyError::Transient(_) => "transient",
                CopyError::Rejected(_) => "rejected",
                other => panic!("{other:?}"),
            };
            assert_eq!(got, kind, "{status} {code}");
        }
    }

    #[test]
    fn only_a_plain_error_code_is_taken_from_a_body() {
        for (body, code) in [
            (
                "<Error><Code>NoSuchBucket</Code><Message>x</Message></Error>",
                "NoSuchBucket",
            ),
            ("<Error><Code>Access Denied; key=AKIA...</Code></Error>", ""),
            ("<Error><Message>no code</Message></Error>", ""),
            ("", ""),
            ("<Code>unterminated", ""),
        ] {
            assert_eq!(error_code(body), code, "{body}");
        }
    }
}
