//! Prompt directives: per-task behaviour requested with `[sim:...]` tags in
//! the prompt, from test modes (`fail`, `reject`, `gen=`, `fail500`,
//! `noeta`, `odd`) to hostile-upstream answers (`huge=`, `echo-auth`,
//! `reason-bytes=`, `video-url=`, `videos=`, `task-id-bytes=`), and their
//! parser, which ignores what it does not understand.

use std::time::Duration;

use tracing::debug;

/// Reason used by `[sim:fail]` without a custom text.
const DEFAULT_FAIL_REASON: &str = "content moderation: the image was rejected";
/// Message used by `[sim:reject]` without a custom text.
const DEFAULT_REJECT_MESSAGE: &str = "prompt rejected by content policy";

/// Per-task behaviour requested through `[sim:...]` prompt directives.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Directives {
    pub(super) fail: Option<Box<str>>,
    pub(super) reject: Option<String>,
    pub(super) generation: Option<Duration>,
    pub(super) fail500: bool,
    pub(super) noeta: bool,
    pub(super) odd: bool,
    pub(super) hostile: Hostile,
}

/// Answers of an upstream that is broken or hostile, per task (the
/// `[sim:huge=…]`, `[sim:echo-auth]`, … directives).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Hostile {
    /// Task-result answers padded to about this many bytes (streamed).
    pub(super) huge: Option<u64>,
    /// The task fails with the poll's `Authorization` header in its reason.
    pub(super) echo_auth: bool,
    /// The task fails with a reason this many bytes long.
    pub(super) reason_bytes: Option<usize>,
    /// The finished task's video URL.
    pub(super) video_url: Option<String>,
    /// The finished task lists this many videos.
    pub(super) videos: Option<usize>,
    /// The create answers a task id this many bytes long.
    pub(super) task_id_bytes: Option<usize>,
}

/// A size like `400MiB`, `64KiB` or `1000`.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1024,
        "MiB" | "M" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// The directives in `prompt`; unknown or malformed ones are ignored.
pub(super) fn parse_directives(prompt: &str) -> Directives {
    const OPEN: &str = "[sim:";
    let mut d = Directives::default();
    let mut rest = prompt;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(']') else { break };
        let directive = &after[..end];
        rest = &after[end + 1..];
        let (name, value) = match directive.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim()).filter(|v| !v.is_empty())),
            None => (directive.trim(), None),
        };
        match (name, value) {
            ("fail", v) => d.fail = Some(v.unwrap_or(DEFAULT_FAIL_REASON).into()),
            ("reject", v) => d.reject = Some(v.unwrap_or(DEFAULT_REJECT_MESSAGE).to_owned()),
            ("gen", Some(v)) => match humantime::parse_duration(v) {
                Ok(duration) => d.generation = Some(duration),
                Err(e) => debug!(value = v, error = %e, "sim: ignoring bad gen directive"),
            },
            ("fail500", _) => d.fail500 = true,
            ("noeta", _) => d.noeta = true,
            ("odd", _) => d.odd = true,
            ("huge", Some(v)) => d.hostile.huge = parse_size(v),
            ("echo-auth", _) => d.hostile.echo_auth = true,
            ("reason-bytes", Some(v)) => {
                d.hostile.reason_bytes = parse_size(v).and_then(|n| usize::try_from(n).ok())
            }
            ("video-url", Some(v)) => d.hostile.video_url = Some(v.to_owned()),
            ("videos", Some(v)) => d.hostile.videos = v.parse().ok(),
            ("task-id-bytes", Some(v)) => {
                d.hostile.task_id_bytes = parse_size(v).and_then(|n| usize::try_from(n).ok())
            }
            _ => debug!(directive, "sim: ignoring unknown directive"),
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::simulator::test_support::*;

    #[test]
    fn directive_parsing() {
        let d = parse_directives("a [sim:fail] b [sim:gen=20s][sim:noeta] [sim:what] [sim:odd]");
        assert_eq!(d.fail.as_deref(), Some(DEFAULT_FAIL_REASON));
        assert_eq!(d.generation, Some(Duration::from_secs(20)));
        assert!(d.noeta && d.odd && !d.fail500);
        assert_eq!(d.reject, None);
        let d = parse_directives("[sim:fail=boom: it broke][sim:reject=nope][sim:fail500]");
        assert_eq!(d.fail.as_deref(), Some("boom: it broke"));
        assert_eq!(d.reject.as_deref(), Some("nope"));
        assert!(d.fail500);
        assert_eq!(
            parse_directives("[sim:gen=soon] [sim:fail"),
            Directives::default()
        );
        assert_eq!(parse_directives("plain prompt"), Directives::default());
    }

    #[tokio::test]
    async fn fail_directives() {
        let sim = start(Duration::from_millis(100)).await;
        let c = client();
        let id = create_id(&c, &sim, "x [sim:fail]").await;
        let seen = wait_done(&c, &sim, &id).await;
        let last = seen.last().expect("last");
        assert_eq!(last["task"]["status"], "TASK_STATUS_FAILED");
        assert_eq!(last["task"]["reason"], DEFAULT_FAIL_REASON);
        assert_eq!(last["videos"], json!([]));
        assert_eq!(sim.task(&id).expect("view").status, "TASK_STATUS_FAILED");

        let id = create_id(&c, &sim, "x [sim:fail=nsfw detected]").await;
        let seen = wait_done(&c, &sim, &id).await;
        assert_eq!(
            seen.last().expect("last")["task"]["reason"],
            "nsfw detected"
        );
    }

    #[tokio::test]
    async fn reject_directive_creates_no_task() {
        let sim = start(Duration::from_millis(100)).await;
        let c = client();
        let (status, v) = error_body(create(&c, &sim, &body("x [sim:reject]")).await).await;
        assert_eq!(status, 400);
        assert_eq!(v["reason"], "ILLEGAL_PROMPT");
        assert_eq!(v["message"], DEFAULT_REJECT_MESSAGE);
        let (_, v) = error_body(create(&c, &sim, &body("[sim:reject=too spicy]")).await).await;
        assert_eq!(v["message"], "too spicy");
        let stats = sim.stats();
        assert_eq!(stats.create_calls, 2);
        assert_eq!(stats.tasks_created, 0);
        assert_eq!(stats.responses["create:400"], 2);
    }

    #[tokio::test]
    async fn gen_directive_overrides_config() {
        let c = client();
        let sim = start(Duration::from_secs(3600)).await;
        let id = create_id(&c, &sim, "[sim:gen=0s]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert_eq!(v["task"]["status"], "TASK_STATUS_SUCCEED");
        assert_eq!(sim.task(&id).expect("view").generation_time, Duration::ZERO);

        let sim = start(Duration::ZERO).await;
        let id = create_id(&c, &sim, "[sim:gen=1h]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert_eq!(v["task"]["status"], "TASK_STATUS_QUEUED");
        assert!(v["task"]["eta"].as_u64().expect("eta") > 3500);
        assert!(sim.task(&id).expect("view").done_at.is_none());
    }

    #[tokio::test]
    async fn fail500_directive_answers_500_once_ended() {
        let c = client();
        let sim = start(Duration::from_secs(3600)).await;
        let id = create_id(&c, &sim, "[sim:fail500]").await;
        assert_eq!(poll(&c, &sim, &id).await.status(), 200);
        let id = create_id(&c, &sim, "[sim:fail500][sim:gen=0s]").await;
        let (status, v) = error_body(poll(&c, &sim, &id).await).await;
        assert_eq!(status, 500);
        assert_eq!(v["reason"], "TASK_FAILED");
    }

    #[tokio::test]
    async fn odd_directive_uses_odd_but_legal_shapes() {
        let c = client();
        let sim = start(Duration::from_secs(3600)).await;
        let id = create_id(&c, &sim, "[sim:odd]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert!(v["task"]["eta"].is_string(), "{v}");
        assert!(v["task"]["progress_percent"].is_string(), "{v}");
        assert!(v["task"].get("reason").is_none(), "{v}");

        let id = create_id(&c, &sim, "[sim:odd][sim:gen=0s][sim:unknown=1]").await;
        let v = poll_json(&c, &sim, &id).await;
        assert_eq!(v["task"]["status"], "TASK_STATUS_SUCCEED");
        assert_eq!(v["task"]["eta"], "0");
        assert_eq!(v["task"]["progress_percent"], "100");
        assert!(v["task"].get("reason").is_none());
        assert_eq!(v["videos"][0]["video_url_ttl"], 3600);
        assert!(v["videos"][0]["video_url"].as_str().is_some_and(
            |u| u.starts_with(&format!("{}/videos/{id}.mp4?expires=", sim.base_url()))
        ));
        assert!(keys(&v).len() > 5);
        assert!(keys(&v["extra"]).len() > 2);
        assert!(keys(&v["extra"]["debug_info"]).len() > 3);
        assert!(keys(&v["task"]).len() > 5);
        assert!(keys(&v["videos"][0]).len() > 3);
    }
}
