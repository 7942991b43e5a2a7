//! Videos kept: every video of a succeeded task copied into the user's
//! S3-compatible bucket before the `succeeded` event.
//!
//! The one interface the pipeline uses is [`Storage`]: [`Storage::copy`]
//! streams one video from its [`source`] (the upstream's URL, hostile
//! input) into the [`store`] (multipart: the next part downloads while the
//! last one uploads, at most three in memory),
//! computing its SHA-256 and size on the way, then checks the stored
//! object's size with a HEAD and, with `storage.presign`, adds a presigned
//! GET URL. At most `storage.max_concurrent_copies` copies run at once per
//! worker. A failed copy says what kind of failure it was ([`CopyError`]);
//! what then happens to the request (try again on the ticket's schedule,
//! look the task up once more, pause intake, or end `storage_failed`) is
//! decided in `pipeline::decisions`.

pub mod source;
pub mod store;

use std::{collections::HashMap, time::Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::{
    config::StorageSettings,
    metrics::{CopyOutcome, Metrics},
    upstream::Video,
};

pub use store::SetupError;

/// Why a copy did not happen, by what is to be done about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// Worth trying again later (the store or the source failed for now).
    #[error("{0}")]
    Transient(String),
    /// The source URL no longer serves the video (expired, revoked): a
    /// fresh poll may give a fresh URL.
    #[error("{0}")]
    SourceGone(String),
    /// The store refuses the credentials or has no such bucket: the
    /// operator's problem; intake pauses until it accepts again.
    #[error("{0}")]
    StoreRefused(String),
    /// The video is larger than `storage.max_video_bytes`.
    #[error("the video is larger than storage.max_video_bytes ({max_bytes} bytes)")]
    TooLarge {
        /// The cap.
        max_bytes: u64,
    },
    /// The source does not serve a video (an error page, say).
    #[error("the video URL does not serve a video")]
    NotAVideo,
    /// Never to be fetched or stored (a refused URL, an unreadable answer).
    #[error("{0}")]
    Rejected(String),
}

impl CopyError {
    /// Its `storage_copies_total{outcome}`.
    pub fn outcome(&self) -> CopyOutcome {
        match self {
            Self::Transient(_) => CopyOutcome::Transient,
            Self::SourceGone(_) => CopyOutcome::SourceGone,
            Self::StoreRefused(_) => CopyOutcome::StoreRefused,
            Self::TooLarge { .. } => CopyOutcome::TooLarge,
            Self::NotAVideo => CopyOutcome::NotAVideo,
            Self::Rejected(_) => CopyOutcome::Rejected,
        }
    }
}

/// One video as stored: the `stored` entries of the `succeeded` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredCopy {
    /// The bucket.
    pub bucket: String,
    /// The object key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    /// The store's ETag.
    pub etag: String,
    /// A presigned GET URL (with `storage.presign`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When `url` stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_expires_at: Option<DateTime<Utc>>,
}

/// The object key of a task's `n`th video:
/// `<prefix><request_id>/<task_id>-<n>.<type>`. The type is the upstream's
/// (`mp4`) when it is a short lowercase word, otherwise `video`; the task
/// id (the upstream's) and the request id keep only `A-Z a-z 0-9 . _ : -`
/// (anything else becomes `_`) and are never `.` or `..`, so no key leaves
/// its prefix.
pub fn object_key(
    prefix: &str,
    request_id: &str,
    task_id: &str,
    n: usize,
    kind: Option<&str>,
) -> String {
    fn segment(s: &str) -> String {
        let kept: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if kept.bytes().all(|b| b == b'.') {
            format!("_{kept}")
        } else {
            kept
        }
    }
    let (request_id, task_id) = (segment(request_id), segment(task_id));
    let kind = kind
        .filter(|k| (1..=10).contains(&k.len()))
        .filter(|k| {
            k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .unwrap_or("video");
    format!("{prefix}{request_id}/{task_id}-{n}.{kind}")
}

/// The content type a copy is stored with.
fn content_type(kind: Option<&str>) -> String {
    match kind {
        Some("mp4") => "video/mp4".into(),
        Some("webm") => "video/webm".into(),
        Some("mov") => "video/quicktime".into(),
        _ => "application/octet-stream".into(),
    }
}

/// The storage of a worker.
pub struct Storage {
    settings: StorageSettings,
    sources: source::Sources,
    store: store::Store,
    copies: Semaphore,
    metrics: Metrics,
}

impl Storage {
    /// Storage as configured, or `None` without `storage.bucket`.
    pub fn from_settings(
        settings: &StorageSettings,
        env: &HashMap<String, String>,
        metrics: Metrics,
    ) -> Result<Option<Self>, SetupError> {
        if settings.bucket.is_none() {
            return Ok(None);
        }
        let credentials = store::CredentialSource::from_settings(settings, env)?;
        let store = store::Store::new(settings, credentials)?;
        let sources =
            source::Sources::new(settings.connect_timeout, settings.allow_private_sources)
                .map_err(|_| SetupError::Client("cannot build the source client".into()))?;
        Ok(Some(Self {
            settings: settings.clone(),
            sources,
            store,
            copies: Semaphore::new(settings.max_concurrent_copies.max(1) as usize),
            metrics,
        }))
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        self.store.name()
    }

    /// The settings.
    pub fn settings(&self) -> &StorageSettings {
        &self.settings
    }

    /// Writes, reads back and deletes a small object (`check`, and the
    /// probe that resumes intake once the store accepts again); reads a
    /// rotated secret file first.
    pub async fn check(&self) -> Result<(), CopyError> {
        self.store
            .refresh()
            .map_err(|e| CopyError::StoreRefused(e.to_string()))?;
        let key = format!(
            "{}.vidu-worker-check/{}",
            self.settings.prefix,
            uuid::Uuid::new_v4()
        );
        self.store.check(&key).await
    }

    /// Copies one video into `key`, within `storage.copy_timeout`.
    pub async fn copy(&self, video: &Video, key: &str) -> Result<StoredCopy, CopyError> {
        let _permit = self
            .copies
            .acquire()
            .await
            .map_err(|_| CopyError::Transient("the worker is stopping".into()))?;
        self.metrics.copy_started();
        let started = Instant::now();
        let result = tokio::time::timeout(self.settings.copy_timeout, self.stream(video, key))
            .await
            .unwrap_or_else(|_| {
                Err(CopyError::Transient(
                    "the copy took longer than storage.copy_timeout".into(),
                ))
            });
        let outcome = match &result {
            Ok(_) => CopyOutcome::Stored,
            Err(e) => e.outcome(),
        };
        let bytes = result.as_ref().map_or(0, |c| c.size);
        self.metrics
            .copy_finished(outcome, bytes, started.elapsed().as_secs_f64());
        result
    }

    async fn stream(&self, video: &Video, key: &str) -> Result<StoredCopy, CopyError> {
        let max_bytes = self.settings.max_video_bytes;
        let part_size = usize::try_from(self.settings.part_size).unwrap_or(8 << 20);
        let response = self.sources.open(&video.url, max_bytes).await?;
        let announced = response.content_length();
        let mut body = response.bytes_stream();
        let mut upload = self
            .store
            .upload(key.to_owned(), content_type(video.kind.as_deref()));
        // The download fills the next part while the upload sends the last
        // one: at most three parts in memory (one sending, one waiting, one
        // filling), never the video.
        let (parts, mut full_parts) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
        let reader = async move {
            let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
            let mut size: u64 = 0;
            // A part and one chunk past it; pages are resident only once
            // written, so a small video costs little.
            let capacity = part_size + (1 << 20);
            let mut part: Vec<u8> = Vec::with_capacity(capacity);
            let mut sniffed = false;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(source::request_failure)?;
                size = size.saturating_add(chunk.len() as u64);
                if size > max_bytes {
                    return Err(CopyError::TooLarge { max_bytes });
                }
                hasher.update(&chunk);
                part.extend_from_slice(&chunk);
                if !sniffed && part.len() >= source::SNIFF_BYTES {
                    if !source::looks_like_video(&part) {
                        return Err(CopyError::NotAVideo);
                    }
                    sniffed = true;
                }
                while part.len() >= part_size {
                    let mut next = Vec::with_capacity(capacity);
                    next.extend_from_slice(&part[part_size..]);
                    part.truncate(part_size);
                    let full = std::mem::replace(&mut part, next);
                    if parts.send(full).await.is_err() {
                        // The upload failed; its error is the copy's.
                        return Err(CopyError::Transient("the upload stopped".into()));
                    }
                }
            }
            if !sniffed && !source::looks_like_video(&part) {
                return Err(CopyError::NotAVideo);
            }
            if announced.is_some_and(|n| n != size) {
                return Err(CopyError::Transient(
                    "the video's body was not as long as announced".into(),
                ));
            }
            Ok((part, size, hasher.finish()))
        };
        let sending = &mut upload;
        let uploader = async move {
            while let Some(full) = full_parts.recv().await {
                sending.part(full).await?;
            }
            Ok::<(), CopyError>(())
        };
        let (read, sent) = tokio::join!(reader, uploader);
        let (part, size, digest) = match (read, sent) {
            (Ok(read), Ok(())) => read,
            (_, Err(e)) | (Err(e), Ok(())) => {
                upload.abort().await;
                return Err(e);
            }
        };
        upload.finish(part).await?;
        let stored = self.store.describe(key).await?;
        if stored.size != size {
            return Err(CopyError::Transient(format!(
                "the stored object has {} bytes, not the {size} copied",
                stored.size
            )));
        }
        let (url, url_expires_at) = match self.settings.presign {
            Some(valid) => {
                let url = self.store.presign(key, valid).await?;
                let expires = Utc::now() + chrono::Duration::from_std(valid).unwrap_or_default();
                (Some(url), Some(expires))
            }
            None => (None, None),
        };
        Ok(StoredCopy {
            bucket: self.store.name().to_owned(),
            key: key.to_owned(),
            size,
            sha256: hex::encode(digest.as_ref()),
            etag: stored.etag,
            url,
            url_expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_contract_and_the_upstream_s_type_is_checked() {
        for (prefix, kind, key) in [
            ("", Some("mp4"), "req-1/task-9-0.mp4"),
            ("videos/", Some("mp4"), "videos/req-1/task-9-0.mp4"),
            ("", Some("webm"), "req-1/task-9-0.webm"),
            ("", None, "req-1/task-9-0.video"),
            ("", Some("../../x"), "req-1/task-9-0.video"),
            ("", Some("MP4"), "req-1/task-9-0.video"),
            ("", Some("averyverylongtype"), "req-1/task-9-0.video"),
        ] {
            assert_eq!(object_key(prefix, "req-1", "task-9", 0, kind), key);
        }
        assert_eq!(object_key("", "r", "t", 2, Some("mp4")), "r/t-2.mp4");
        // Ids that would climb out of the prefix, or add a level.
        assert_eq!(object_key("p/", "..", "t", 0, Some("mp4")), "p/_../t-0.mp4");
        assert_eq!(
            object_key("p/", "r", "../../x", 0, Some("mp4")),
            "p/r/.._.._x-0.mp4"
        );
        assert_eq!(
            object_key("p/", "r", "a/b?c#d e", 0, Some("mp4")),
            "p/r/a_b_c_d_e-0.mp4"
        );
    }
}
