//! The simulator's videos: real bytes at the URLs its task results name.
//!
//! Once the simulator serves on an address, a succeeded task's video URL is
//! `http://<addr>/videos/<task_id>.mp4?expires=<unix seconds>` (the
//! moment `video_url_ttl` after the poll that gave it); before that, the
//! old unserved `https://sim.novita.local/videos/…` names. The body is
//! deterministic per task ([`video_body`]: an MP4 `ftyp` box, then bytes
//! drawn from the task id), generated while it streams, so a test can
//! compute its SHA-256 ([`video_sha256`]) and a 200 MiB video costs no
//! memory. After its expiry a URL answers 403 like an expired signed URL.
//! [`VideoPlan`] sets the size and the faults (slow, down, expired, a wrong
//! `Content-Length`), switchable while it runs; the `/videos/…` route
//! itself is the API's.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use bytes::Bytes;
use serde::Deserialize;

use super::{api::AppState, config::unix_now};

/// Bytes generated per chunk while a video streams.
const CHUNK: usize = 64 * 1024;

/// The first bytes of every video: an ISO base media `ftyp` box.
const FTYP: &[u8; 32] = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41";

/// The `len` bytes of `task_id`'s video, in chunks, generated as they are
/// taken.
pub fn video_body(task_id: &str, len: u64) -> impl Iterator<Item = Bytes> + Send + 'static {
    let mut state = seed(task_id);
    let mut sent: u64 = 0;
    std::iter::from_fn(move || {
        if sent >= len {
            return None;
        }
        let n = usize::try_from((len - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut chunk = Vec::with_capacity(n);
        while chunk.len() < n {
            let at = sent + chunk.len() as u64;
            if let Some(b) = usize::try_from(at).ok().and_then(|i| FTYP.get(i)) {
                chunk.push(*b);
                continue;
            }
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            let take = (n - chunk.len()).min(8);
            chunk.extend_from_slice(&word[..take]);
        }
        sent += n as u64;
        Some(Bytes::from(chunk))
    })
}

/// Lowercase hex SHA-256 of `task_id`'s video of `len` bytes.
pub fn video_sha256(task_id: &str, len: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for chunk in video_body(task_id, len) {
        ctx.update(&chunk);
    }
    hex::encode(ctx.finish().as_ref())
}

fn seed(task_id: &str) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, task_id.as_bytes());
    let mut word = [0u8; 8];
    word.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(word) | 1
}

/// The video route.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/videos/{file}", get(serve))
}

#[derive(Deserialize)]
struct Expiry {
    expires: Option<u64>,
}

fn s3_error(status: StatusCode, code: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/xml")],
        format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code></Error>"),
    )
        .into_response()
}

async fn serve(
    State(app): State<AppState>,
    Path(file): Path<String>,
    Query(expiry): Query<Expiry>,
) -> Response {
    let plan = app.sim.video_plan();
    app.sim.count_video_get();
    let Some(task_id) = file.strip_suffix(".mp4") else {
        return s3_error(StatusCode::NOT_FOUND, "NoSuchKey");
    };
    if !app.sim.has_task(task_id) {
        return s3_error(StatusCode::NOT_FOUND, "NoSuchKey");
    }
    if plan.down {
        return s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown");
    }
    if plan.expired || expiry.expires.is_none_or(|at| unix_now() >= at) {
        return s3_error(StatusCode::FORBIDDEN, "AccessDenied");
    }
    if plan.not_a_video {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html>not here</html>",
        )
            .into_response();
    }
    let announced = plan.bytes.saturating_add_signed(plan.length_error);
    let chunks = video_body(task_id, plan.bytes);
    let pace = plan.bytes_per_second.filter(|b| *b > 0);
    let stream = futures_util::stream::unfold(chunks, move |mut chunks| async move {
        let chunk = chunks.next()?;
        if let Some(rate) = pace {
            let secs = chunk.len() as f64 / rate as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        Some((Ok::<_, std::io::Error>(chunk), chunks))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "video/mp4")
        .header(header::CONTENT_LENGTH, announced)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_video_is_the_same_for_its_task_and_starts_like_an_mp4() {
        let a: Vec<u8> = video_body("t-1", 200_000)
            .flat_map(|b| b.to_vec())
            .collect();
        let b: Vec<u8> = video_body("t-1", 200_000)
            .flat_map(|b| b.to_vec())
            .collect();
        let c: Vec<u8> = video_body("t-2", 200_000)
            .flat_map(|b| b.to_vec())
            .collect();
        assert_eq!(a.len(), 200_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(&a[4..8], b"ftyp");
        assert_eq!(video_sha256("t-1", 200_000), video_sha256("t-1", 200_000));
        assert_eq!(video_body("t", 10).map(|b| b.len()).sum::<usize>(), 10);
    }
}
