//! The six Vidu Q3 models end to end: every model's minimal and full body
//! succeeds through the worker and the simulator, posted to that model's
//! path; every refusal of the worker's table fails as `invalid_request`
//! with its exact message and no upstream call, and the simulator (an
//! independent implementation of the same rules) refuses the same bodies;
//! the deployment's allow-list (`upstream.models`) holds.

use std::time::Duration;

use serde_json::{json, Value};
use vidu_worker::{
    events::{FAILED, SUBMITTED, SUCCEEDED},
    model::Model,
    simulator::{create_path, Simulator, SimulatorConfig},
};

use vidu_test_kit::*;

const WAIT: Duration = Duration::from_secs(60);
const IMG: &str = "https://example.com/start.png";
const END: &str = "https://example.com/end.jpg";
/// A 1×1 PNG.
const PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn minimal(model: Model) -> Value {
    match model {
        Model::ProI2v | Model::TurboI2v => json!({"images": [IMG]}),
        Model::ProT2v | Model::TurboT2v => json!({"prompt": "a paper boat on a stream"}),
        Model::ProF2v | Model::TurboF2v => json!({"images": [IMG, END]}),
    }
}

fn full(model: Model) -> Value {
    let mut v = match model {
        Model::ProI2v => json!({
            "images": [IMG], "prompt": "p".repeat(1500), "audio": "https://example.com/m.mp3",
            "style": "anime", "is_rec": true, "aspect_ratio": "9:16",
            "watermark": true, "wm_url": "https://example.com/w.png", "wm_position": "top-left"
        }),
        Model::TurboI2v => json!({
            "images": [IMG], "prompt": "p".repeat(5000), "audio": true,
            "audio_type": "sound_effect_only", "is_rec": false
        }),
        Model::ProT2v | Model::TurboT2v => json!({
            "prompt": "p".repeat(model.max_prompt_chars()), "audio": false, "aspect_ratio": "4:3",
            "watermark": true, "wm_url": "https://example.com/w.png", "wm_position": 3
        }),
        Model::ProF2v => json!({
            "images": [PNG, END], "prompt": "the bud opens", "audio": true, "is_rec": true,
            "watermark": true, "wm_url": "https://example.com/w.png", "wm_position": 2
        }),
        Model::TurboF2v => json!({
            "images": [IMG, PNG], "prompt": "the bud opens", "audio": false, "is_rec": false
        }),
    };
    for (k, val) in [
        ("duration", json!(2)),
        ("seed", json!(7)),
        ("resolution", json!("540p")),
        ("off_peak", json!(false)),
    ] {
        v[k] = val;
    }
    v
}

/// Bodies every model refuses, with the worker's exact message.
fn refused(model: Model) -> Vec<(Value, String)> {
    let m = model.as_str();
    let mut out = vec![(
        {
            let mut v = minimal(model);
            v["duration"] = json!(17);
            v
        },
        "input.duration: must be an integer from 1 to 16, found 17".to_owned(),
    )];
    let long = |n: usize| "p".repeat(n);
    let max = model.max_prompt_chars();
    let mut too_long = minimal(model);
    too_long["prompt"] = json!(long(max + 1));
    out.push((
        too_long,
        format!(
            "input.prompt: is {} characters, more than the limit of {max} for {m}",
            max + 1
        ),
    ));
    match model {
        Model::ProI2v | Model::TurboI2v => {
            out.push((
                json!({"images": [IMG, END]}),
                "input.images: must hold exactly one image URL, found 2".into(),
            ));
            out.push((
                json!({"prompt": "x"}),
                format!("input.images: is required for {m}: exactly one image URL"),
            ));
        }
        Model::ProT2v | Model::TurboT2v => {
            out.push((
                json!({"duration": 5}),
                format!("input.prompt: is required for {m}: the text to turn into video"),
            ));
            out.push((
                json!({"prompt": "x", "images": [IMG]}),
                format!("input.images: unknown field \"images\" for {m} (it is a field of vidu-q3-pro-i2v, vidu-q3-turbo-i2v, vidu-q3-pro-f2v, vidu-q3-turbo-f2v)"),
            ));
            out.push((
                json!({"prompt": "x", "wm_position": "top-left"}),
                "input.wm_position: must be an integer from 1 to 4, found a string".into(),
            ));
        }
        Model::ProF2v | Model::TurboF2v => {
            out.push((
                json!({"images": [IMG]}),
                "input.images: must hold exactly two images (the start frame and the end frame), found 1".into(),
            ));
            out.push((
                json!({"images": ["data:image/gif;base64,R0lGODlhAQABAAAAACw=", END]}),
                "input.images[0]: is a data URI of \"image/gif\"; it must be one of image/png, image/jpeg, image/jpg, image/webp".into(),
            ));
            out.push((
                json!({"images": [IMG, "data:image/png;base64,@@@"]}),
                "input.images[1]: is a data URI whose data is not valid Base64".into(),
            ));
        }
    }
    match model {
        Model::ProI2v => out.push((
            json!({"images": [IMG], "audio": true}),
            "input.audio: must be a string, found a boolean".into(),
        )),
        Model::TurboI2v => out.push((
            json!({"images": [IMG], "style": "anime"}),
            "input.style: unknown field \"style\" for vidu-q3-turbo-i2v (it is a field of vidu-q3-pro-i2v)".into(),
        )),
        Model::TurboF2v => out.push((
            json!({"images": [IMG, END], "watermark": true}),
            "input.watermark: unknown field \"watermark\" for vidu-q3-turbo-f2v (it is a field of vidu-q3-pro-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v, vidu-q3-pro-f2v)".into(),
        )),
        _ => {}
    }
    out
}

fn body(id: &str, model: Model, input: &Value) -> Value {
    json!({"request_id": id, "model": model.as_str(), "input": input})
}

#[tokio::test]
async fn every_model_succeeds_end_to_end_on_its_own_path() {
    let env = TestEnv::new("models-ok", sim(Duration::from_millis(300))).await;
    let tap = env.tap().await;
    let _worker = env.start_worker().await;
    let mut ids = Vec::new();
    for model in Model::ALL {
        for (kind, input) in [("min", minimal(model)), ("full", full(model))] {
            let id = format!("{}-{kind}", model.as_str());
            env.publish(&body(&id, model, &input)).await;
            ids.push((id, model));
        }
    }
    for (id, model) in &ids {
        let done = tap.wait_terminal(id, WAIT).await;
        assert_eq!(done.kind(), SUCCEEDED, "{id}: {}", done.body);
        let submitted = tap
            .for_subject(id)
            .into_iter()
            .find(|e| e.kind() == SUBMITTED)
            .unwrap_or_else(|| panic!("{id}: no submitted event"));
        assert_eq!(submitted.body["data"]["model"], model.as_str(), "{id}");
    }
    let stats = env.sim.stats();
    for model in Model::ALL {
        assert_eq!(
            stats.creates_by_model.get(model.as_str()).copied(),
            Some(2),
            "{model}: {stats:?}"
        );
    }
    assert_eq!(stats.create_calls, 12, "{stats:?}");
}

#[tokio::test]
async fn every_refusal_fails_with_its_message_and_no_upstream_call() {
    let env = TestEnv::new("models-refused", sim(Duration::from_millis(300))).await;
    let tap = env.tap().await;
    let worker = env.start_worker().await;
    let mut cases = Vec::new();
    for model in Model::ALL {
        for (i, (input, message)) in refused(model).into_iter().enumerate() {
            let id = format!("{}-bad-{i}", model.as_str());
            env.publish(&body(&id, model, &input)).await;
            cases.push((id, message));
        }
    }
    // An unknown model, and a body too large for the broker-side limit of
    // one request (a 1 MiB data URI frame).
    env.publish(&json!({"request_id": "no-such-model", "model": "vidu-q2-pro", "input": {}}))
        .await;
    cases.push((
        "no-such-model".into(),
        "model: unknown model \"vidu-q2-pro\"; the models are vidu-q3-pro-i2v, vidu-q3-turbo-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v, vidu-q3-pro-f2v, vidu-q3-turbo-f2v".into(),
    ));
    let huge = format!("data:image/png;base64,{}", "A".repeat(1024 * 1024));
    env.publish(&body(
        "huge-frame",
        Model::ProF2v,
        &json!({"images": [huge, END]}),
    ))
    .await;
    for (id, message) in &cases {
        let done = tap.wait_terminal(id, WAIT).await;
        assert_eq!(done.kind(), FAILED, "{id}");
        assert_eq!(
            done.body["data"]["error"]["code"], "invalid_request",
            "{id}"
        );
        assert_eq!(
            done.body["data"]["error"]["message"],
            message.as_str(),
            "{id}"
        );
    }
    // The oversized body cannot be read for its id: its failed event names
    // the body and carries a generated id.
    eventually(WAIT, "the oversized request's failed event", || async {
        tap.terminal()
            .into_iter()
            .find(|e| {
                e.body["data"]["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("body: ") && m.contains("larger than the limit"))
            })
            .map(|_| ())
    })
    .await;
    assert_eq!(tap.terminal().len(), cases.len() + 1);
    assert_eq!(env.sim.stats().create_calls, 0);
    assert_eq!(
        worker
            .metric("vidu_worker_requests_received_total", "invalid")
            .await as usize,
        cases.len() + 1
    );
    // No failed event or log line quotes image data.
    for e in tap.terminal() {
        assert!(!e.body.to_string().contains("AAAAAAAA"), "{}", e.body);
    }
    assert!(!worker.logs().iter().any(|l| l.contains("AAAAAAAA")));
}

#[tokio::test]
async fn the_simulator_agrees_with_the_worker_on_every_body() {
    let sim = Simulator::start(SimulatorConfig {
        api_key: Some(API_KEY.into()),
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator");
    let http = reqwest::Client::new();
    for model in Model::ALL {
        let mut bodies: Vec<(Value, bool)> = vec![(minimal(model), true), (full(model), true)];
        bodies.extend(refused(model).into_iter().map(|(b, _)| (b, false)));
        for (input, accepted) in bodies {
            let url = format!("{}{}", sim.base_url(), create_path(model.as_str()));
            let status = http
                .post(&url)
                .bearer_auth(API_KEY)
                .json(&input)
                .send()
                .await
                .expect("simulator answers")
                .status();
            assert_eq!(status.is_success(), accepted, "{model} {status}: {input}");
        }
    }
}

#[tokio::test]
async fn a_model_outside_the_allow_list_is_refused_unsent() {
    let env = TestEnv::with("models-allowed", sim(Duration::from_millis(300)), |s| {
        s.upstream.models = vec![Model::ProI2v, Model::TurboT2v];
    })
    .await;
    let tap = env.tap().await;
    let _worker = env.start_worker().await;
    env.publish(&body("t2v-pro", Model::ProT2v, &minimal(Model::ProT2v)))
        .await;
    env.publish(&body(
        "t2v-turbo",
        Model::TurboT2v,
        &minimal(Model::TurboT2v),
    ))
    .await;
    let refused = tap.wait_terminal("t2v-pro", WAIT).await;
    assert_eq!(refused.kind(), FAILED);
    assert_eq!(
        refused.body["data"]["error"]["message"],
        "model: vidu-q3-pro-t2v is not served by this deployment (upstream.models: vidu-q3-pro-i2v, vidu-q3-turbo-t2v)"
    );
    assert_eq!(tap.wait_terminal("t2v-turbo", WAIT).await.kind(), SUCCEEDED);
    let stats = env.sim.stats();
    assert_eq!(stats.create_calls, 1, "{stats:?}");
    assert_eq!(stats.creates_by_model.get("vidu-q3-pro-t2v"), None);
}
