//! The unauthenticated `/sim/*` admin API: counters (`/sim/stats`), the
//! call log (`/sim/calls`), task views (`/sim/tasks`), and the controls of
//! the fault plan, auth mode and account quota, plus a reset; the same
//! controls as the [`Simulator`](crate::simulator::Simulator) methods they
//! call.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::info;

use super::api::{api_error, AppState};
use super::config::AuthMode;
use super::faults::FaultPlan;
use super::quota::AccountQuota;
use super::state::{CallRecord, SimStats};
use super::tasks::TaskView;

/// The `/sim/*` endpoints.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/sim/stats", get(admin_stats))
        .route(
            "/sim/faults",
            get(admin_get_faults)
                .put(admin_put_faults)
                .delete(admin_delete_faults),
        )
        .route("/sim/auth", get(admin_get_auth).put(admin_put_auth))
        .route(
            "/sim/quota",
            get(admin_get_quota)
                .put(admin_put_quota)
                .delete(admin_delete_quota),
        )
        .route("/sim/calls", get(admin_calls))
        .route("/sim/reset", post(admin_reset))
        .route("/sim/tasks", get(admin_tasks))
        .route("/sim/tasks/{task_id}", get(admin_task))
}

async fn admin_stats(State(app): State<AppState>) -> Json<SimStats> {
    Json(app.sim.stats())
}

async fn admin_get_faults(State(app): State<AppState>) -> Json<FaultPlan> {
    Json(app.sim.faults())
}

async fn admin_put_faults(State(app): State<AppState>, body: Bytes) -> Response {
    let plan = match serde_json::from_slice::<FaultPlan>(&body) {
        Ok(plan) => plan,
        Err(e) => return bad_admin_body(&e.to_string()),
    };
    if let Err(message) = plan.validate() {
        return bad_admin_body(&message);
    }
    info!(?plan, "sim: fault plan replaced");
    app.sim.set_faults(plan);
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_delete_faults(State(app): State<AppState>) -> StatusCode {
    info!("sim: fault plan cleared");
    app.sim.clear_faults();
    StatusCode::NO_CONTENT
}

async fn admin_get_auth(State(app): State<AppState>) -> Json<AuthMode> {
    Json(app.sim.auth())
}

async fn admin_put_auth(State(app): State<AppState>, body: Bytes) -> Response {
    match serde_json::from_slice::<AuthMode>(&body) {
        Ok(mode) => {
            info!(?mode, "sim: auth mode set");
            app.sim.set_auth(mode);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_admin_body(&e.to_string()),
    }
}

async fn admin_get_quota(State(app): State<AppState>) -> Json<Option<AccountQuota>> {
    Json(app.sim.quota())
}

async fn admin_put_quota(State(app): State<AppState>, body: Bytes) -> Response {
    match serde_json::from_slice::<AccountQuota>(&body) {
        Ok(quota) if quota.creates >= 1 && !quota.window.is_zero() => {
            info!(?quota, "sim: account quota set");
            app.sim.set_quota(Some(quota));
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(_) => bad_admin_body("creates must be at least 1 and window longer than zero"),
        Err(e) => bad_admin_body(&e.to_string()),
    }
}

async fn admin_delete_quota(State(app): State<AppState>) -> StatusCode {
    info!("sim: account quota removed");
    app.sim.set_quota(None);
    StatusCode::NO_CONTENT
}

async fn admin_calls(State(app): State<AppState>) -> Json<Vec<CallRecord>> {
    Json(app.sim.calls())
}

async fn admin_reset(State(app): State<AppState>) -> StatusCode {
    info!("sim: reset");
    app.sim.reset();
    StatusCode::NO_CONTENT
}

async fn admin_tasks(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Vec<TaskView>> {
    let needle = query.get("contains").map(String::as_str).unwrap_or("");
    Json(app.sim.tasks_matching(needle))
}

async fn admin_task(State(app): State<AppState>, Path(task_id): Path<String>) -> Response {
    match app.sim.task(&task_id) {
        Some(view) => Json(view).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            "TASK_NOT_FOUND",
            &format!("task {task_id} not found"),
        ),
    }
}

fn bad_admin_body(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_REQUEST_BODY", message)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{json, Value};
    use uuid::Uuid;

    use super::*;
    use crate::simulator::test_support::*;

    #[tokio::test]
    async fn admin_endpoints() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        let base = sim.base_url();

        let plan = json!({"create": {"script": ["429:3", "hang:2s", "accept-then-drop"]},
                          "poll": {"rate": 0.25, "mix": ["drop"], "seed": 9}});
        let resp = c
            .put(format!("{base}/sim/faults"))
            .json(&plan)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        let got: Value = c
            .get(format!("{base}/sim/faults"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(
            got["create"]["script"],
            json!(["429:3", "hang:2s", "accept-then-drop"])
        );
        assert_eq!(got["poll"]["rate"], 0.25);
        assert_eq!(got["poll"]["mix"], json!(["drop"]));
        for bad in [
            json!({"create": {"script": ["418"]}}),
            json!({"poll": {"rate": 1.5}}),
            json!({"typo": {}}),
        ] {
            let resp = c
                .put(format!("{base}/sim/faults"))
                .json(&bad)
                .send()
                .await
                .expect("send");
            let (status, v) = error_body(resp).await;
            assert_eq!(
                (status, v["reason"].as_str()),
                (400, Some("INVALID_REQUEST_BODY"))
            );
        }
        let resp = c
            .delete(format!("{base}/sim/faults"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        assert_eq!(sim.simulator().faults(), FaultPlan::default());

        let resp = c
            .put(format!("{base}/sim/auth"))
            .json(&json!("reject403"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        assert_eq!(create(&c, &sim, &body("x")).await.status(), 403);
        let resp = c
            .put(format!("{base}/sim/auth"))
            .json(&json!("accept"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        let resp = c
            .put(format!("{base}/sim/auth"))
            .json(&json!("sometimes"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);

        let id = create_id(&c, &sim, "admin-view-77").await;
        poll_json(&c, &sim, &id).await;
        let view: TaskView = c
            .get(format!("{base}/sim/tasks/{id}"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(view.task_id, id);
        assert_eq!(view.status, "TASK_STATUS_SUCCEED");
        assert_eq!(view.polls, 1);
        assert_eq!(view.request["prompt"], "admin-view-77");
        let created = humantime::parse_rfc3339(&view.created_at).expect("rfc3339");
        let done =
            humantime::parse_rfc3339(view.done_at.as_deref().expect("done_at")).expect("rfc3339");
        assert!(done >= created);
        assert!(view.created_at.ends_with('Z') && view.created_at.contains('.'));
        let list: Vec<TaskView> = c
            .get(format!("{base}/sim/tasks?contains=admin-view"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(list.len(), 1);
        let resp = c
            .get(format!("{base}/sim/tasks/{}", Uuid::new_v4()))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 404);

        let stats: SimStats = c
            .get(format!("{base}/sim/stats"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(stats, sim.stats());
        assert_eq!(stats.create_calls, 2);
        assert_eq!(stats.tasks_created, 1);
        assert_eq!(stats.responses["create:403"], 1);

        let resp = c
            .post(format!("{base}/sim/reset"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 204);
        assert_eq!(sim.stats(), SimStats::default());
        assert!(sim.task(&id).is_none());

        let resp = c.get(format!("{base}/nope")).send().await.expect("send");
        let (status, _) = error_body(resp).await;
        assert_eq!(status, 404);
    }
}
