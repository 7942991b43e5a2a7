//! The machine-readable interface in `docs/` checked against the code, so the
//! documents cannot drift from what the worker accepts and emits:
//!
//! - every JSON Schema in `docs/schemas/` is itself valid JSON Schema, and the
//!   four event schemas share one envelope;
//! - the request schema accepts and rejects the same bodies as
//!   [`vidu_worker::request::parse`] (a fixed table and a property test);
//! - events really produced by a worker, end to end, validate against their
//!   schemas, and continue the request's W3C trace;
//! - every README example marked `<!-- schema: docs/schemas/NAME.json -->`
//!   validates, and every metric the worker exports is in the README's list;
//! - `docs/asyncapi.yaml` is valid AsyncAPI 3.0.0 (official schema, vendored
//!   in `deploy/schemas/`), its `$ref`s resolve, and its names, arguments and
//!   routing keys equal the code's defaults.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::LazyLock,
    time::Duration,
};

use crate::files::{load_json, read, repo_path, violations};
use jsonschema::{Draft, Validator};
use lapin::{
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};
use serde_json::{json, Value};
use vidu_test_kit::{eventually, request, sim, SeenEvent, TestEnv};
use vidu_worker::{
    broker::{Topology, ERROR_HEADER, TRACEPARENT_HEADER},
    config::Settings,
    events::{CONTENT_TYPE, FAILED, PROGRESS, SUBMITTED, SUCCEEDED},
    request::{self, MessageProps, Model},
};

/// Event types and the schema file of each.
const EVENT_SCHEMAS: [(&str, &str); 4] = [
    (SUBMITTED, "docs/schemas/event-submitted.json"),
    (PROGRESS, "docs/schemas/event-progress.json"),
    (SUCCEEDED, "docs/schemas/event-succeeded.json"),
    (FAILED, "docs/schemas/event-failed.json"),
];
const REQUEST_SCHEMA: &str = "docs/schemas/request.json";
const ASYNCAPI: &str = "docs/asyncapi.yaml";
const ASYNCAPI_META_SCHEMA: &str = "deploy/schemas/asyncapi-3.0.0.json";
/// README examples need a marker like this on the line right above their
/// ```` ```json ```` fence.
const MARKER_PREFIX: &str = "<!-- schema: ";
const MIN_README_EXAMPLES: usize = 3;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Compiles one of our draft 2020-12 schemas, with `format` checked
/// (`date-time` matters for `time`).
pub(crate) fn compile(rel: &str) -> Validator {
    let schema = load_json(rel);
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{rel} does not compile: {e}"))
}

static REQUEST_VALIDATOR: LazyLock<Validator> = LazyLock::new(|| compile(REQUEST_SCHEMA));

fn parser_accepts(body: &Value) -> bool {
    let bytes = serde_json::to_vec(body).expect("serializable");
    request::parse(&bytes, MessageProps::default()).is_ok()
}

/// Resolves a JSON pointer (`#/a/b`, or `/a/b`) in `doc`.
fn resolve_pointer<'a>(doc: &'a Value, fragment: &str) -> Option<&'a Value> {
    let pointer = fragment.strip_prefix('#').unwrap_or(fragment);
    if pointer.is_empty() {
        return Some(doc);
    }
    doc.pointer(pointer)
}

/// Follows one local `$ref` if `value` is a reference object.
fn deref<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(r) if r.starts_with('#') => {
            resolve_pointer(doc, r).unwrap_or_else(|| panic!("dangling $ref {r}"))
        }
        _ => value,
    }
}

/// Every `$ref` string in a document, with the JSON pointer where it sits.
fn collect_refs(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    if let Some(r) = v.as_str() {
                        out.push((at.to_owned(), r.to_owned()));
                    }
                }
                collect_refs(v, &format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                collect_refs(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongInt(v) => json!(v),
        AMQPValue::LongLongInt(v) => json!(v),
        AMQPValue::ShortInt(v) => json!(v),
        AMQPValue::Boolean(v) => json!(v),
        other => panic!("unexpected queue argument {other:?}"),
    }
}

fn field_table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.to_string(), amqp_to_json(v)))
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// (d) The schemas themselves
// ---------------------------------------------------------------------------

#[test]
fn every_schema_is_valid_json_schema() {
    let mut files: Vec<String> = std::fs::read_dir(repo_path("docs/schemas"))
        .expect("docs/schemas exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .map(|n| format!("docs/schemas/{n}"))
        .collect();
    files.sort();
    let mut expected: Vec<String> = EVENT_SCHEMAS
        .iter()
        .map(|(_, p)| (*p).to_owned())
        .chain([REQUEST_SCHEMA.to_owned()])
        .collect();
    expected.sort();
    assert_eq!(files, expected, "docs/schemas holds exactly these schemas");

    for rel in &files {
        let schema = load_json(rel);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{rel} declares draft 2020-12"
        );
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!(
                "{rel} is not a valid JSON Schema: {e} at {}",
                e.instance_path
            );
        }
        compile(rel);
    }
    // The meta-validation is not a no-op.
    assert!(jsonschema::meta::validate(&json!({"type": "strng"})).is_err());
    assert!(jsonschema::meta::validate(&json!({"maxLength": -1})).is_err());
}

#[test]
fn event_schemas_share_one_envelope() {
    let schemas: Vec<(&str, Value)> = EVENT_SCHEMAS
        .iter()
        .map(|(t, p)| (*t, load_json(p)))
        .collect();
    let envelope = |s: &Value| {
        let mut props = s["properties"].as_object().expect("properties").clone();
        props.remove("type");
        props.remove("data");
        (
            props,
            s["required"].clone(),
            s["additionalProperties"].clone(),
        )
    };
    let first = envelope(&schemas[0].1);
    for (event_type, schema) in &schemas {
        assert_eq!(
            schema["properties"]["type"]["const"], *event_type,
            "type const"
        );
        assert_eq!(envelope(schema), first, "{event_type}: envelope differs");
        assert_eq!(
            schema["properties"]["data"]["additionalProperties"],
            json!(false),
            "{event_type}: data is exact"
        );
        let required: BTreeSet<&str> = schema["properties"]["data"]["required"]
            .as_array()
            .expect("data.required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        // Fields that exist only with a setting (CONTRACT §6): `stored` with
        // `storage.bucket`, and the upstream's `videos` of `storage_failed`.
        const CONDITIONAL: &[(&str, &str)] = &[
            ("video.generation.succeeded", "stored"),
            ("video.generation.failed", "videos"),
        ];
        let declared: BTreeSet<&str> = schema["properties"]["data"]["properties"]
            .as_object()
            .expect("data.properties")
            .keys()
            .map(String::as_str)
            .filter(|field| !CONDITIONAL.contains(&(*event_type, *field)))
            .collect();
        assert_eq!(
            required, declared,
            "{event_type}: the worker always emits every data field (null when unknown), except the conditional ones"
        );
        assert!(required.contains("metadata") && required.contains("request_id"));
    }
}

// ---------------------------------------------------------------------------
// (d) The request schema agrees with the parser
// ---------------------------------------------------------------------------

fn agreement_table() -> Vec<(&'static str, Value, bool)> {
    let img = json!(["https://example.com/cat.png"]);
    vec![
        // Good bodies.
        ("minimal", json!({"input": {"images": img}}), true),
        (
            "the contract's example",
            json!({
                "request_id": "order-1234", "model": "vidu-q3-pro-i2v",
                "input": {"images": img, "prompt": "the cat turns its head and blinks",
                          "duration": 5, "resolution": "720p"},
                "metadata": {"user": 42}
            }),
            true,
        ),
        (
            "every input field",
            json!({"input": {
                "images": ["https://example.com/cat.PNG?sig=abc"], "prompt": "blink",
                "duration": 16, "seed": 2147483647, "resolution": "1080p", "aspect_ratio": "9:16",
                "style": "anime", "audio": "https://x.example/a.mp3", "is_rec": true,
                "off_peak": true, "watermark": false, "wm_url": "https://x.example/wm.png",
                "wm_position": "bottom-right"}}),
            true,
        ),
        (
            "nulls for every optional field",
            json!({"request_id": null, "model": null, "metadata": null, "input": {
                "images": img, "prompt": null, "duration": null, "seed": null,
                "resolution": null, "aspect_ratio": null, "style": null, "audio": null,
                "is_rec": null, "off_peak": null, "watermark": null, "wm_url": null,
                "wm_position": null}}),
            true,
        ),
        (
            "upper-case scheme and extension, fragment",
            json!({"input": {"images": ["HTTP://e.example/a.JPEG#x"]}}),
            true,
        ),
        (
            ".webp with a query",
            json!({"input": {"images": ["https://e.example/p/a.webp?w=1&h=2"]}}),
            true,
        ),
        (
            ".jpg",
            json!({"input": {"images": ["http://e.example/a.jpg"]}}),
            true,
        ),
        (
            "1500 characters of prompt",
            json!({"input": {"images": img, "prompt": "é".repeat(1500)}}),
            true,
        ),
        (
            "128-character request id",
            json!({"request_id": "a".repeat(128), "input": {"images": img}}),
            true,
        ),
        (
            "every request id character",
            json!({"request_id": "Az09._:-", "input": {"images": img}}),
            true,
        ),
        (
            "smallest duration and seed",
            json!({"input": {"images": img, "duration": 1, "seed": 0}}),
            true,
        ),
        (
            "empty metadata",
            json!({"input": {"images": img}, "metadata": {}}),
            true,
        ),
        (
            "nested metadata",
            json!({"input": {"images": img}, "metadata": {"a": [1, {"b": null}]}}),
            true,
        ),
        (
            "audio URL without a path",
            json!({"input": {"images": img, "audio": "https://e.example"}}),
            true,
        ),
        (
            "every aspect ratio is one of five",
            json!({"input": {"images": img, "aspect_ratio": "1:1", "style": "general",
                             "wm_position": "top-left", "resolution": "540p"}}),
            true,
        ),
        // Bad bodies.
        ("empty object", json!({}), false),
        ("input null", json!({"input": null}), false),
        ("input a string", json!({"input": "x"}), false),
        ("no images", json!({"input": {"prompt": "x"}}), false),
        ("images null", json!({"input": {"images": null}}), false),
        ("no image", json!({"input": {"images": []}}), false),
        (
            "two images",
            json!({"input": {"images": ["https://e.example/a.png", "https://e.example/b.png"]}}),
            false,
        ),
        (
            "images a string",
            json!({"input": {"images": "https://e.example/a.png"}}),
            false,
        ),
        ("image a number", json!({"input": {"images": [5]}}), false),
        (
            ".gif",
            json!({"input": {"images": ["https://e.example/a.gif"]}}),
            false,
        ),
        (
            "extension in the query only",
            json!({"input": {"images": ["https://e.example/a?f=x.png"]}}),
            false,
        ),
        (
            "ftp image",
            json!({"input": {"images": ["ftp://e.example/a.png"]}}),
            false,
        ),
        (
            "space in the image URL",
            json!({"input": {"images": ["https://e.example/a b.png"]}}),
            false,
        ),
        (
            "image URL without host",
            json!({"input": {"images": ["https:///a.png"]}}),
            false,
        ),
        (
            "image URL over 2048 characters",
            json!({"input": {"images": [format!("https://e.example/{}.png", "a".repeat(2040))]}}),
            false,
        ),
        (
            "1501 characters of prompt",
            json!({"input": {"images": img, "prompt": "é".repeat(1501)}}),
            false,
        ),
        (
            "prompt a number",
            json!({"input": {"images": img, "prompt": 5}}),
            false,
        ),
        (
            "duration 0",
            json!({"input": {"images": img, "duration": 0}}),
            false,
        ),
        (
            "duration 17",
            json!({"input": {"images": img, "duration": 17}}),
            false,
        ),
        (
            "duration a string",
            json!({"input": {"images": img, "duration": "5"}}),
            false,
        ),
        (
            "negative seed",
            json!({"input": {"images": img, "seed": -5}}),
            false,
        ),
        (
            "seed over i32",
            json!({"input": {"images": img, "seed": 2147483648_u64}}),
            false,
        ),
        (
            "resolution in capitals",
            json!({"input": {"images": img, "resolution": "720P"}}),
            false,
        ),
        (
            "aspect ratio 21:9",
            json!({"input": {"images": img, "aspect_ratio": "21:9"}}),
            false,
        ),
        (
            "style a number",
            json!({"input": {"images": img, "style": 1}}),
            false,
        ),
        (
            "wm_position middle",
            json!({"input": {"images": img, "wm_position": "middle"}}),
            false,
        ),
        (
            "audio mailto",
            json!({"input": {"images": img, "audio": "mailto:a@b"}}),
            false,
        ),
        (
            "wm_url without host",
            json!({"input": {"images": img, "wm_url": "https://"}}),
            false,
        ),
        (
            "watermark a string",
            json!({"input": {"images": img, "watermark": "true"}}),
            false,
        ),
        (
            "off_peak a number",
            json!({"input": {"images": img, "off_peak": 1}}),
            false,
        ),
        (
            "unknown input field",
            json!({"input": {"images": img, "negative_prompt": "x"}}),
            false,
        ),
        (
            "unknown top-level field",
            json!({"input": {"images": img}, "extra": 1}),
            false,
        ),
        (
            "other model",
            json!({"input": {"images": img}, "model": "other"}),
            false,
        ),
        (
            "model a number",
            json!({"input": {"images": img}, "model": 7}),
            false,
        ),
        (
            "metadata a string",
            json!({"input": {"images": img}, "metadata": "x"}),
            false,
        ),
        (
            "metadata an array",
            json!({"input": {"images": img}, "metadata": [1]}),
            false,
        ),
        (
            "empty request id",
            json!({"input": {"images": img}, "request_id": ""}),
            false,
        ),
        (
            "slash in request id",
            json!({"input": {"images": img}, "request_id": "a/b"}),
            false,
        ),
        (
            "129-character request id",
            json!({"input": {"images": img}, "request_id": "a".repeat(129)}),
            false,
        ),
        (
            "request id a number",
            json!({"input": {"images": img}, "request_id": 5}),
            false,
        ),
        ("an array body", json!([{"input": {"images": img}}]), false),
    ]
}

// ---------------------------------------------------------------------------
// (d) Per-model bodies
// ---------------------------------------------------------------------------

const IMG: &str = "https://example.com/cat.png";
const END: &str = "https://example.com/end.jpg";
/// A 1×1 PNG.
const PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
/// A field no model has.
const NO_MODELS_FIELD: &str = "negative_prompt";

fn is_t2v(model: Model) -> bool {
    matches!(model, Model::ProT2v | Model::TurboT2v)
}

/// The one field the model cannot do without.
fn required_field(model: Model) -> &'static str {
    if is_t2v(model) {
        "prompt"
    } else {
        "images"
    }
}

/// A request for `model` with this `input`.
fn for_model(model: Model, input: Value) -> Value {
    json!({"model": model.as_str(), "input": input})
}

/// The smallest `input` each model takes.
fn minimal_input(model: Model) -> Value {
    match model {
        Model::ProI2v | Model::TurboI2v => json!({"images": [IMG]}),
        Model::ProT2v | Model::TurboT2v => json!({"prompt": "a cat on a bike"}),
        Model::ProF2v | Model::TurboF2v => json!({"images": [IMG, END]}),
    }
}

/// Every field of the model, the limits at their largest.
fn full_input(model: Model) -> Value {
    let prompt = "é".repeat(model.max_prompt_chars());
    let mut input = match model {
        Model::ProI2v => json!({
            "images": ["https://example.com/cat.PNG?sig=abc"], "prompt": prompt,
            "audio": "https://x.example/m.mp3", "style": "anime", "is_rec": true,
            "aspect_ratio": "9:16", "watermark": true, "wm_url": "https://x.example/w.png",
            "wm_position": "bottom-right"
        }),
        Model::TurboI2v => json!({
            "images": ["HTTP://e.example/a.JPEG#x"], "prompt": prompt, "audio": false,
            "audio_type": "speech_only", "is_rec": false
        }),
        Model::ProT2v | Model::TurboT2v => json!({
            "prompt": prompt, "audio": true, "aspect_ratio": "1:1", "watermark": true,
            "wm_url": "https://x.example/w.png", "wm_position": 4
        }),
        Model::ProF2v => json!({
            "images": [PNG, END], "prompt": prompt, "audio": true, "is_rec": true,
            "watermark": false, "wm_url": "https://x.example/w.png", "wm_position": 1
        }),
        Model::TurboF2v => json!({
            "images": [IMG, PNG], "prompt": prompt, "audio": false, "is_rec": true
        }),
    };
    for (field, value) in [
        ("duration", json!(16)),
        ("seed", json!(2147483647)),
        ("resolution", json!("1080p")),
        ("off_peak", json!(true)),
    ] {
        input[field] = value;
    }
    input
}

/// Every field of every model.
fn all_fields() -> BTreeSet<&'static str> {
    Model::ALL
        .iter()
        .flat_map(|m| m.fields().iter().copied())
        .collect()
}

/// The first model with `field`, to take a value of the right shape from.
fn owner(field: &str) -> Option<Model> {
    Model::ALL.into_iter().find(|m| m.fields().contains(&field))
}

/// `input` with `field` set to `value`.
fn with(mut input: Value, field: &str, value: Value) -> Value {
    input[field] = value;
    input
}

/// `input` without `field`.
fn without(mut input: Value, field: &str) -> Value {
    if let Some(map) = input.as_object_mut() {
        map.remove(field);
    }
    input
}

/// A value of another JSON type.
fn wrong_type(value: &Value) -> Value {
    match value {
        Value::String(_) => json!(5),
        Value::Bool(_) => json!("true"),
        Value::Number(_) => json!("5"),
        _ => json!("x"),
    }
}

/// Per model: its minimal and its full body, nulls, and every kind of
/// refusal (another model's fields, the required field missing, the wrong
/// number of images, wrong types, an over-long prompt, bad data URIs).
fn per_model_table() -> Vec<(String, Value, bool)> {
    let mut table = Vec::new();
    let mut case = |model: Model, label: &str, input: Value, ok: bool| {
        table.push((format!("{model}: {label}"), for_model(model, input), ok));
    };
    for model in Model::ALL {
        let min = minimal_input(model);
        let full = full_input(model);
        let max = model.max_prompt_chars();
        case(model, "minimal", min.clone(), true);
        case(model, "every field, at the limits", full.clone(), true);
        let mut nulls = min.clone();
        for field in model.fields() {
            if *field != required_field(model) {
                nulls[*field] = Value::Null;
            }
        }
        case(model, "nulls for every optional field", nulls, true);
        for field in all_fields() {
            if let (false, Some(other)) = (model.fields().contains(&field), owner(field)) {
                let value = full_input(other)[field].clone();
                let label = format!("{field}, a field of {other}");
                case(model, &label, with(min.clone(), field, value), false);
            }
        }
        case(
            model,
            "a field of no model",
            with(min.clone(), NO_MODELS_FIELD, json!("x")),
            false,
        );
        let required = required_field(model);
        case(
            model,
            "required field missing",
            without(min.clone(), required),
            false,
        );
        case(
            model,
            "required field null",
            with(min.clone(), required, Value::Null),
            false,
        );
        for (field, value) in full.as_object().expect("an object") {
            let label = format!("{field} of the wrong type");
            case(
                model,
                &label,
                with(min.clone(), field, wrong_type(value)),
                false,
            );
        }
        let long = json!("é".repeat(max + 1));
        case(
            model,
            "prompt one character too long",
            with(min.clone(), "prompt", long),
            false,
        );
        case(
            model,
            "prompt at the limit, ASCII",
            with(min.clone(), "prompt", json!("p".repeat(max))),
            true,
        );
    }

    // The shapes that differ between models.
    for model in [Model::ProI2v, Model::TurboI2v] {
        for (label, images) in [
            ("no image", json!([])),
            ("two images", json!([IMG, END])),
            ("a data URI", json!([PNG])),
            ("a .gif", json!(["https://e.example/a.gif"])),
            (
                "the extension in the query only",
                json!(["https://e.example/a?f=x.png"]),
            ),
        ] {
            case(model, label, json!({"images": images}), false);
        }
        case(
            model,
            ".webp with a query",
            json!({"images": ["https://e.example/p/a.webp?w=1"]}),
            true,
        );
    }
    for model in [Model::ProF2v, Model::TurboF2v] {
        for (label, images) in [
            ("one image", json!([IMG])),
            ("three images", json!([IMG, END, PNG])),
            ("no image", json!([])),
            ("a frame null", json!([IMG, null])),
            ("a frame a number", json!([IMG, 7])),
            ("a .gif frame", json!([IMG, "https://e.example/b.gif"])),
        ] {
            case(model, label, json!({"images": images}), false);
        }
        for (label, uri) in [
            ("two data URIs", PNG),
            ("upper-case media type", "data:IMAGE/WEBP;base64,QUJD"),
            ("a data URI in capitals", "DATA:image/png;base64,QUJD"),
            (
                "image/jpg, one padding character",
                "data:image/jpg;base64,QUI=",
            ),
            (
                "image/jpeg, two padding characters",
                "data:image/jpeg;base64,QQ==",
            ),
        ] {
            case(model, label, json!({"images": [PNG, uri]}), true);
        }
        for (label, uri) in [
            (
                "a data URI of a gif",
                "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
            ),
            ("a data URI of svg", "data:image/svg+xml;base64,QUJD"),
            (
                "data that is not Base64",
                "data:image/png;base64,@@not base64@@",
            ),
            ("a data URI without data", "data:image/png;base64,"),
            ("a data URI of blanks", "data:image/png;base64, "),
            ("a data URI not in Base64", "data:image/png,rawbytes"),
            ("a data URI without a comma", "data:image/png;base64"),
            (
                "a data URI with a parameter",
                "data:image/png;charset=utf-8;base64,QUJD",
            ),
            ("a trailing newline", "data:image/png;base64,QUJD\n"),
            ("Base64 without padding", "data:image/png;base64,QUI"),
            ("Base64 with stray bits", "data:image/png;base64,QUJ="),
            (
                "Base64 with stray bits, two pads",
                "data:image/png;base64,QR==",
            ),
            (
                "Base64 with extra padding",
                "data:image/png;base64,QUJD====",
            ),
            (
                "Base64 with a space inside",
                "data:image/png;base64,QUJD QUJD",
            ),
            ("Base64 after a space", "data:image/png;base64, QUJD"),
        ] {
            case(model, label, json!({"images": [IMG, uri]}), false);
        }
    }
    for model in [Model::ProT2v, Model::TurboT2v] {
        for (label, prompt) in [
            ("an empty prompt", ""),
            ("a prompt of spaces", "   "),
            ("a prompt of tabs and newlines", "\t\n\r"),
            ("a prompt of ideographic spaces", "\u{3000}\u{2028}\u{85}"),
        ] {
            case(model, label, json!({"prompt": prompt}), false);
        }
        // The byte order mark is not whitespace to the parser.
        for (label, prompt) in [
            ("a prompt in spaces", " x "),
            ("a byte order mark", "\u{feff}"),
        ] {
            case(model, label, json!({"prompt": prompt}), true);
        }
        for position in [0, 5] {
            let label = format!("wm_position {position}");
            case(
                model,
                &label,
                json!({"prompt": "x", "wm_position": position}),
                false,
            );
        }
        case(
            model,
            "wm_position a corner name",
            json!({"prompt": "x", "wm_position": "top-left"}),
            false,
        );
    }
    case(
        Model::ProI2v,
        "audio a boolean",
        json!({"images": [IMG], "audio": true}),
        false,
    );
    case(
        Model::ProI2v,
        "wm_position a number",
        json!({"images": [IMG], "wm_position": 2}),
        false,
    );
    case(
        Model::ProF2v,
        "wm_position a corner name",
        json!({"images": [IMG, END], "wm_position": "top-left"}),
        false,
    );
    for model in [
        Model::TurboI2v,
        Model::ProT2v,
        Model::ProF2v,
        Model::TurboF2v,
    ] {
        let input = with(
            minimal_input(model),
            "audio",
            json!("https://x.example/m.mp3"),
        );
        case(model, "audio a URL", input, false);
    }
    case(
        Model::TurboI2v,
        "audio_type music",
        json!({"images": [IMG], "audio_type": "music"}),
        false,
    );

    // `model` chooses the schema; absent or null is Pro image-to-video.
    for (label, body, ok) in [
        (
            "no model: a text-to-video body",
            json!({"input": minimal_input(Model::ProT2v)}),
            false,
        ),
        (
            "model null: a start-end-frame body",
            json!({"model": null, "input": minimal_input(Model::ProF2v)}),
            false,
        ),
        (
            "model null: an image-to-video body",
            json!({"model": null, "input": minimal_input(Model::ProI2v)}),
            true,
        ),
        (
            "text-to-video model, image-to-video body",
            for_model(Model::ProT2v, minimal_input(Model::ProI2v)),
            false,
        ),
        (
            "Turbo start-end-frame model, Pro body",
            for_model(Model::TurboF2v, full_input(Model::ProF2v)),
            false,
        ),
        (
            "a model in capitals",
            json!({"model": "VIDU-Q3-PRO-T2V", "input": minimal_input(Model::ProT2v)}),
            false,
        ),
        (
            "a model without its kind",
            json!({"model": "vidu-q3-pro", "input": minimal_input(Model::ProI2v)}),
            false,
        ),
    ] {
        table.push((label.to_owned(), body, ok));
    }
    table
}

#[test]
fn request_schema_agrees_with_the_parser_on_a_table_of_bodies() {
    let defaults = agreement_table();
    let good = defaults.iter().filter(|(_, _, ok)| *ok).count();
    assert!(
        good >= 15 && defaults.len() - good >= 15,
        "keep the table broad"
    );
    let per_model = per_model_table();
    for model in Model::ALL {
        let prefix = format!("{model}: ");
        let of_model = || per_model.iter().filter(|(l, _, _)| l.starts_with(&prefix));
        let good = of_model().filter(|(_, _, ok)| *ok).count();
        let bad = of_model().count() - good;
        assert!(good >= 4 && bad >= 15, "{model}: {good} good, {bad} bad");
    }
    let table = defaults
        .into_iter()
        .map(|(label, body, ok)| (label.to_owned(), body, ok))
        .chain(per_model);
    let mut disagreements = Vec::new();
    for (label, body, expected) in table {
        let parser = parser_accepts(&body);
        let schema = REQUEST_VALIDATOR.is_valid(&body);
        if parser != expected || schema != expected {
            disagreements.push(format!(
                "{label}: expected {expected}, parser says {parser}, schema says {schema} {:?}",
                violations(&REQUEST_VALIDATOR, &body)
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

/// Rules JSON Schema cannot express: the schema is deliberately more lenient
/// there and says so in a description. If one of these starts to agree, the
/// parser or the schema changed: update the descriptions and this list.
#[test]
fn the_schema_is_only_more_lenient_where_it_says_so() {
    let img = json!([IMG]);
    let big = json!({"input": {"images": img}, "metadata": {"k": "x".repeat(16 * 1024)}});
    let mut lenient = vec![("metadata over 16 KiB", big)];
    // `5.0` is an integer to JSON Schema (this validator happens to refuse
    // it, others accept it); the parser wants integers written as such.
    for model in Model::ALL {
        for (field, value) in [("duration", json!(5.0)), ("seed", json!(1.0))] {
            let body = for_model(model, with(minimal_input(model), field, value));
            assert!(!parser_accepts(&body), "{body}");
        }
    }
    for model in [Model::ProT2v, Model::TurboT2v, Model::ProF2v] {
        let body = for_model(model, with(minimal_input(model), "wm_position", json!(4.0)));
        assert!(!parser_accepts(&body), "{body}");
    }
    // URLs of the documented shape that the URL parser refuses.
    for url in [
        "https://e.example:99999/a.png",
        "https://e<x.example/a.png",
        "https://[::1/a.png",
    ] {
        for model in Model::ALL {
            let input = if is_t2v(model) {
                with(minimal_input(model), "wm_url", json!(url))
            } else if matches!(model, Model::ProF2v | Model::TurboF2v) {
                json!({"images": [PNG, url]})
            } else {
                json!({"images": [url]})
            };
            lenient.push(("a URL the URL parser refuses", for_model(model, input)));
        }
        let audio = with(minimal_input(Model::ProI2v), "audio", json!(url));
        lenient.push((
            "an audio URL the URL parser refuses",
            json!({"input": audio}),
        ));
    }
    for (label, body) in &lenient {
        assert!(
            REQUEST_VALIDATOR.is_valid(body),
            "{label}: the schema should accept {body}: {:?}",
            violations(&REQUEST_VALIDATOR, body)
        );
        assert!(
            !parser_accepts(body),
            "{label}: the parser should refuse {body}"
        );
    }
    let description = load_json(REQUEST_SCHEMA).to_string();
    for said in ["16 KiB", "5.0", "65535", "`<`"] {
        assert!(description.contains(said), "the schema says {said:?}");
    }
}

/// `key` of a schema, found in it or where its `$ref`s lead.
fn keyword<'a>(doc: &'a Value, spec: &'a Value, key: &str) -> Option<&'a Value> {
    spec.get(key).or_else(|| {
        let target = spec.get("$ref")?.as_str()?;
        keyword(doc, resolve_pointer(doc, target)?, key)
    })
}

/// The other direction of the agreement: every value the schema enumerates,
/// for every model, is one the parser takes, so an enum cannot grow in the
/// schema alone; and every integer bound and prompt length is the parser's.
#[test]
fn every_value_the_schema_enumerates_is_accepted_by_the_parser() {
    let schema = load_json(REQUEST_SCHEMA);
    let mut problems = Vec::new();
    let mut check = |label: String, body: Value, ok: bool| {
        let (schema, parser) = (REQUEST_VALIDATOR.is_valid(&body), parser_accepts(&body));
        if schema != ok || parser != ok {
            problems.push(format!(
                "{label}: expected {ok}, schema says {schema}, parser says {parser}"
            ));
        }
    };
    let mut enumerated = 0;
    let top = schema["properties"].as_object().expect("properties");
    for (field, spec) in top {
        for value in spec["enum"].as_array().into_iter().flatten() {
            let model = value
                .as_str()
                .and_then(Model::parse)
                .unwrap_or(Model::DEFAULT);
            let mut body = json!({"input": minimal_input(model)});
            body[field] = value.clone();
            check(format!("{field} = {value}"), body, true);
            enumerated += 1;
        }
    }
    for model in Model::ALL {
        let props = schema["$defs"][model.as_str()]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no $defs/{model}/properties"));
        for (field, spec) in props {
            let body = |value: Value| for_model(model, with(minimal_input(model), field, value));
            let values = keyword(&schema, spec, "enum").and_then(Value::as_array);
            for value in values.into_iter().flatten() {
                check(
                    format!("{model}: {field} = {value}"),
                    body(value.clone()),
                    true,
                );
                enumerated += 1;
            }
            for (bound, step) in [("minimum", -1), ("maximum", 1)] {
                if let Some(limit) = keyword(&schema, spec, bound).and_then(Value::as_i64) {
                    check(
                        format!("{model}: {field} = {limit}"),
                        body(json!(limit)),
                        true,
                    );
                    let past = limit + step;
                    check(
                        format!("{model}: {field} = {past}"),
                        body(json!(past)),
                        false,
                    );
                }
            }
        }
        let prompt = &props["prompt"];
        assert_eq!(
            prompt["maxLength"],
            json!(model.max_prompt_chars()),
            "{model}: prompt length"
        );
        let body = |n: usize| {
            for_model(
                model,
                with(minimal_input(model), "prompt", json!("é".repeat(n))),
            )
        };
        check(
            format!("{model}: the longest prompt"),
            body(model.max_prompt_chars()),
            true,
        );
        check(
            format!("{model}: a longer prompt"),
            body(model.max_prompt_chars() + 1),
            false,
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        enumerated >= 60,
        "only {enumerated} enumerated values found"
    );
}

/// One input schema per model, chosen by `model`, with exactly the model's
/// fields.
#[test]
fn the_request_schema_has_one_input_schema_per_model() {
    let schema = load_json(REQUEST_SCHEMA);
    let names: Vec<Value> = Model::ALL
        .iter()
        .map(|m| json!(m.as_str()))
        .chain([Value::Null])
        .collect();
    assert_eq!(schema["properties"]["model"]["enum"], Value::Array(names));
    assert_eq!(
        schema["properties"]["model"]["default"],
        Model::DEFAULT.as_str()
    );
    let clauses = schema["allOf"].as_array().expect("allOf");
    assert_eq!(clauses.len(), Model::ALL.len(), "one clause per model");
    let description = schema["properties"]["model"]["description"]
        .as_str()
        .expect("a description");
    for model in Model::ALL {
        assert!(
            description.contains(&format!("`{model}`")),
            "model describes {model}"
        );
        let target = format!("#/$defs/{model}");
        let picking: Vec<&Value> = clauses
            .iter()
            .filter(|c| c["then"]["properties"]["input"]["$ref"] == target.as_str())
            .collect();
        assert_eq!(picking.len(), 1, "one clause picks {target}");
        let condition = jsonschema::options()
            .with_draft(Draft::Draft202012)
            .build(&picking[0]["if"])
            .expect("the condition compiles");
        for other in Model::ALL {
            assert_eq!(
                condition.is_valid(&json!({"model": other.as_str()})),
                other == model,
                "the clause of {model} on {other}"
            );
        }
        for unnamed in [json!({}), json!({"model": null})] {
            assert_eq!(
                condition.is_valid(&unnamed),
                model == Model::DEFAULT,
                "the clause of {model} on {unnamed}"
            );
        }

        let def = &schema["$defs"][model.as_str()];
        assert_eq!(def["type"], "object", "{model}");
        assert_eq!(def["additionalProperties"], false, "{model}");
        assert_eq!(def["required"], json!([required_field(model)]), "{model}");
        let fields: BTreeSet<&str> = def["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .map(String::as_str)
            .collect();
        let expected: BTreeSet<&str> = model.fields().iter().copied().collect();
        assert_eq!(
            fields, expected,
            "{model}: the schema's fields are the parser's"
        );
        let about = def["description"].as_str().unwrap_or_default();
        assert!(
            about.contains(&model.create_path()),
            "{model} names its endpoint"
        );
    }
}

fn choose(valid: Vec<Value>, invalid: Vec<Value>) -> BoxedStrategy<Option<Value>> {
    choose_present(0.6, valid, invalid)
}

/// A value present with probability `present`, mostly a valid one.
fn choose_present(
    present: f64,
    valid: Vec<Value>,
    invalid: Vec<Value>,
) -> BoxedStrategy<Option<Value>> {
    proptest::option::weighted(
        present,
        prop_oneof![
            7 => proptest::sample::select(valid),
            1 => proptest::sample::select(invalid),
        ],
    )
    .boxed()
}

fn url_values() -> (Vec<Value>, Vec<Value>) {
    (
        vec![
            json!("https://x.example/a.mp3"),
            json!("http://x.example"),
            json!("HTTPS://x.example/p?q=1#f"),
            Value::Null,
        ],
        vec![
            json!("mailto:a@b"),
            json!("https://"),
            json!("https://x.example/a b"),
            json!("x.example/a.mp3"),
            json!(3),
        ],
    )
}

/// Values of one input field: those `model` takes, and some it refuses.
fn field_values(model: Model, field: &str) -> (Vec<Value>, Vec<Value>) {
    let booleans = || vec![json!(true), json!(false), Value::Null];
    let max = model.max_prompt_chars();
    match (field, model) {
        ("images", Model::ProI2v | Model::TurboI2v) => (
            vec![
                json!([IMG]),
                json!(["HTTP://e.example/a.JPEG?x=1"]),
                json!(["https://e.example/a.webp#f"]),
            ],
            vec![
                json!([]),
                json!([IMG, END]),
                json!([PNG]),
                json!(["https://e.example/a.gif"]),
                json!(["ftp://e.example/a.png"]),
                json!(["https://e.example/a b.png"]),
                json!([5]),
                json!(IMG),
                Value::Null,
            ],
        ),
        ("images", _) => (
            vec![
                json!([IMG, END]),
                json!([PNG, END]),
                json!([IMG, PNG]),
                json!(["data:IMAGE/WEBP;base64,QUI=", "https://e.example/b.JPG?v=2"]),
            ],
            vec![
                json!([IMG]),
                json!([IMG, END, PNG]),
                json!([]),
                json!([IMG, "data:image/png;base64,"]),
                json!([IMG, "data:image/png;base64,QUJ="]),
                json!([IMG, "data:image/gif;base64,QUJD"]),
                json!(["data:image/png,QUJD", END]),
                json!([IMG, "https://e.example/b.gif"]),
                json!([IMG, 7]),
                json!(PNG),
                Value::Null,
            ],
        ),
        ("prompt", Model::ProT2v | Model::TurboT2v) => (
            vec![json!("blink"), json!(" x "), json!("é".repeat(max))],
            vec![
                json!(""),
                json!(" \t"),
                json!("é".repeat(max + 1)),
                json!(5),
                Value::Null,
            ],
        ),
        ("prompt", _) => (
            vec![
                json!("blink"),
                json!(""),
                json!("é".repeat(max)),
                Value::Null,
            ],
            vec![json!("é".repeat(max + 1)), json!(5)],
        ),
        ("duration", _) => (
            vec![json!(1), json!(5), json!(16), Value::Null],
            vec![json!(0), json!(17), json!(-1), json!("5"), json!(true)],
        ),
        ("seed", _) => (
            vec![json!(0), json!(42), json!(2147483647), Value::Null],
            vec![json!(2147483648_u64), json!(-5), json!("1")],
        ),
        ("resolution", _) => (
            vec![json!("540p"), json!("720p"), json!("1080p"), Value::Null],
            vec![json!("720P"), json!(720)],
        ),
        ("aspect_ratio", _) => (
            vec![
                json!("16:9"),
                json!("9:16"),
                json!("4:3"),
                json!("3:4"),
                json!("1:1"),
                Value::Null,
            ],
            vec![json!("21:9"), json!("")],
        ),
        ("style", _) => (
            vec![json!("general"), json!("anime"), Value::Null],
            vec![json!("Anime"), json!(1)],
        ),
        ("audio_type", _) => (
            vec![
                json!("all"),
                json!("speech_only"),
                json!("sound_effect_only"),
                Value::Null,
            ],
            vec![json!("music"), json!(true)],
        ),
        ("audio", Model::ProI2v) => {
            let (valid, mut invalid) = url_values();
            invalid.push(json!(true));
            (valid, invalid)
        }
        ("audio", _) => (
            booleans(),
            vec![json!("https://x.example/a.mp3"), json!("yes"), json!(1)],
        ),
        ("wm_url", _) => url_values(),
        ("wm_position", Model::ProI2v) => (
            vec![
                json!("top-left"),
                json!("top-right"),
                json!("bottom-left"),
                json!("bottom-right"),
            ],
            vec![json!("middle"), json!(2)],
        ),
        ("wm_position", _) => (
            vec![json!(1), json!(2), json!(3), json!(4), Value::Null],
            vec![json!(0), json!(5), json!("top-left"), json!(2.5)],
        ),
        ("is_rec" | "off_peak" | "watermark", _) => (booleans(), vec![json!("true"), json!(0)]),
        _ => (vec![json!("x")], vec![json!(1)]),
    }
}

/// An `input` for `model`: its own fields (mostly valid), now and then a
/// field of another model or of none.
fn input_object(model: Model) -> impl Strategy<Value = Value> {
    let names: Vec<&'static str> = all_fields().into_iter().chain([NO_MODELS_FIELD]).collect();
    let fields: Vec<BoxedStrategy<Option<Value>>> = names
        .iter()
        .map(|field| {
            if model.fields().contains(field) {
                let (valid, invalid) = field_values(model, field);
                let present = if *field == required_field(model) {
                    0.95
                } else {
                    0.6
                };
                choose_present(present, valid, invalid)
            } else {
                // A value its own model takes, null included: parser and
                // schema both refuse any field not the model's, null or not.
                let values = field_values(owner(field).unwrap_or(model), field).0;
                proptest::option::weighted(0.03, proptest::sample::select(values)).boxed()
            }
        })
        .collect();
    fields.prop_map(move |values| {
        let map: serde_json::Map<String, Value> = names
            .iter()
            .zip(values)
            .filter_map(|(name, value)| Some(((*name).to_owned(), value?)))
            .collect();
        Value::Object(map)
    })
}

/// `model` as written in a body (absent, null, a name, or not one), and the
/// model whose input to generate.
fn model_choice() -> impl Strategy<Value = (Option<Value>, Model)> {
    prop_oneof![
        12 => proptest::sample::select(Model::ALL.to_vec())
            .prop_map(|m| (Some(json!(m.as_str())), m)),
        2 => Just((None, Model::DEFAULT)),
        1 => Just((Some(Value::Null), Model::DEFAULT)),
        1 => proptest::sample::select(vec![
            json!("other"), json!(7), json!("VIDU-Q3-PRO-I2V"), json!("vidu-q3-pro"),
        ])
        .prop_map(|v| (Some(v), Model::DEFAULT)),
    ]
}

fn request_body() -> impl Strategy<Value = Value> {
    model_choice()
        .prop_flat_map(|(model, of)| {
            (
                Just(model),
                choose(
                    vec![
                        json!("order-1"),
                        json!("a".repeat(128)),
                        json!("x:y.z_-"),
                        Value::Null,
                    ],
                    vec![json!(""), json!("a/b"), json!("a".repeat(129)), json!(5)],
                ),
                choose(
                    vec![json!({"k": 1}), json!({}), Value::Null],
                    vec![json!("x"), json!([1]), json!(5)],
                ),
                prop_oneof![
                    20 => input_object(of),
                    1 => proptest::sample::select(vec![json!("x"), json!([]), Value::Null]),
                ],
                proptest::bool::weighted(0.97),
                proptest::option::weighted(0.05, Just(json!(1))),
            )
        })
        .prop_map(
            |(model, request_id, metadata, input, input_present, unknown)| {
                let mut map = serde_json::Map::new();
                for (name, value) in [
                    ("request_id", request_id),
                    ("model", model),
                    ("metadata", metadata),
                    ("input", input_present.then_some(input)),
                    ("extra", unknown),
                ] {
                    if let Some(v) = value {
                        map.insert(name.to_owned(), v);
                    }
                }
                Value::Object(map)
            },
        )
}

/// The generator is not degenerate: every model gets accepted and refused
/// bodies, and fields of other models occur.
#[test]
fn generated_bodies_cover_every_model_both_ways() {
    let strategy = request_body();
    let mut runner = TestRunner::deterministic();
    let mut counts: BTreeMap<(Model, bool), usize> = BTreeMap::new();
    let mut foreign = 0;
    for _ in 0..1024 {
        let body = strategy.new_tree(&mut runner).expect("a body").current();
        let model = match body.get("model") {
            Some(Value::String(name)) => Model::parse(name),
            Some(Value::Null) | None => Some(Model::DEFAULT),
            Some(_) => None,
        };
        let Some(model) = model else { continue };
        *counts.entry((model, parser_accepts(&body))).or_default() += 1;
        let fields = body["input"].as_object().into_iter().flat_map(|m| m.keys());
        if fields
            .into_iter()
            .any(|k| !model.fields().contains(&k.as_str()))
        {
            foreign += 1;
        }
    }
    for model in Model::ALL {
        for accepted in [true, false] {
            let n = counts.get(&(model, accepted)).copied().unwrap_or_default();
            assert!(
                n >= 20,
                "{model}: only {n} bodies with accepted = {accepted}"
            );
        }
    }
    assert!(
        foreign >= 100,
        "only {foreign} bodies with another model's field"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn request_schema_agrees_with_the_parser_on_generated_bodies(body in request_body()) {
        let parser = parser_accepts(&body);
        let schema = REQUEST_VALIDATOR.is_valid(&body);
        prop_assert_eq!(
            parser, schema,
            "parser and schema disagree on {}: {:?}", body, violations(&REQUEST_VALIDATOR, &body)
        );
    }
}

// ---------------------------------------------------------------------------
// (a) Events a real worker produced
// ---------------------------------------------------------------------------

const GOOD_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const BAD_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const REJECT_TRACE: &str = "00-a3ce929d0e0e47364bf92f3577b34da6-0102030405060708-00";

fn with_traceparent(props: BasicProperties, traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        TRACEPARENT_HEADER.into(),
        AMQPValue::LongString(traceparent.into()),
    );
    props.with_headers(headers)
}

/// Checks that `event` continues the trace of `incoming`: same version, trace
/// id and flags, a new parent id, in the header and the envelope alike.
fn assert_continues_trace(event: &SeenEvent, incoming: &str) {
    let label = format!("{} of {}", event.kind(), event.subject());
    let header = event
        .headers
        .get(TRACEPARENT_HEADER)
        .unwrap_or_else(|| panic!("{label}: no traceparent AMQP header"));
    let attribute = event.body["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("{label}: no traceparent extension attribute"));
    assert_eq!(header, attribute, "{label}: header = envelope attribute");
    let parts: Vec<&str> = header.split('-').collect();
    let incoming: Vec<&str> = incoming.split('-').collect();
    assert_eq!(parts.len(), 4, "{label}: {header}");
    assert_eq!(parts[0], "00", "{label}: version");
    assert_eq!(parts[1], incoming[1], "{label}: same trace id");
    assert_ne!(parts[2], incoming[2], "{label}: a new parent id");
    assert_eq!(parts[3], incoming[3], "{label}: same flags");
}

#[tokio::test]
async fn events_produced_end_to_end_match_their_schemas() {
    let env = TestEnv::new("schemas", sim(Duration::from_millis(1500))).await;
    let tap = env.tap().await;
    let _worker = env.start_worker().await;

    let good = json!({
        "request_id": "schema-good",
        "model": "vidu-q3-pro-i2v",
        "input": {
            "images": ["https://example.com/cat.png"],
            "prompt": "the cat turns its head and blinks",
            "duration": 5,
            "resolution": "720p"
        },
        "metadata": {"user": 42, "tags": ["a", "b"]}
    });
    env.publish_with(
        &good,
        with_traceparent(
            BasicProperties::default().with_correlation_id("corr-schemas".into()),
            GOOD_TRACE,
        ),
    )
    .await;
    let bad = json!({
        "request_id": "schema-bad",
        "input": {"images": ["https://example.com/cat.gif"]},
        "metadata": {"k": 1}
    });
    env.publish_with(
        &bad,
        with_traceparent(BasicProperties::default(), BAD_TRACE),
    )
    .await;
    env.publish(&request("schema-fail", "[sim:fail]")).await;
    // Queued for the first tenth of its 10 s: the first poll sees it queued.
    env.publish(&request("schema-slow", "[sim:gen=10s]")).await;
    env.publish_with(
        &request("schema-reject", "[sim:reject]"),
        with_traceparent(BasicProperties::default(), REJECT_TRACE),
    )
    .await;

    let wait = Duration::from_secs(30);
    let mut outcomes = BTreeMap::new();
    for subject in ["schema-good", "schema-bad", "schema-fail", "schema-reject"] {
        let terminal = tap.wait_terminal(subject, wait).await;
        let outcome = match terminal.kind() {
            k if k == FAILED => terminal.body["data"]["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            k => k.to_owned(),
        };
        outcomes.insert(subject, outcome);
    }
    assert_eq!(
        outcomes,
        BTreeMap::from([
            ("schema-bad", "invalid_request".to_owned()),
            ("schema-fail", "upstream_failed".to_owned()),
            ("schema-good", SUCCEEDED.to_owned()),
            ("schema-reject", "upstream_rejected".to_owned()),
        ])
    );

    eventually(wait, "a queued progress event", || async {
        tap.for_subject("schema-slow")
            .iter()
            .any(|e| e.kind() == PROGRESS && e.body["data"]["status"] == "queued")
            .then_some(())
    })
    .await;

    let validators: BTreeMap<&str, Validator> = EVENT_SCHEMAS
        .iter()
        .map(|(t, p)| (*t, compile(p)))
        .collect();
    let events = tap.all();
    let mut problems = Vec::new();
    let mut seen_types = BTreeSet::new();
    for event in &events {
        let kind = event.kind();
        let Some(validator) = validators.get(kind) else {
            problems.push(format!("unknown event type {kind:?}: {}", event.body));
            continue;
        };
        seen_types.insert(kind.to_owned());
        assert_eq!(event.routing_key, kind, "routing key = type");
        assert_eq!(event.content_type.as_deref(), Some(CONTENT_TYPE));
        for v in violations(validator, &event.body) {
            problems.push(format!(
                "{kind} of {}: {v}\n  {}",
                event.subject(),
                event.body
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let all_types: BTreeSet<String> = EVENT_SCHEMAS.iter().map(|(t, _)| (*t).to_owned()).collect();
    assert_eq!(
        seen_types, all_types,
        "every event type was produced and checked"
    );
    let statuses: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.kind() == PROGRESS)
        .filter_map(|e| e.body["data"]["status"].as_str())
        .collect();
    assert_eq!(statuses, BTreeSet::from(["queued", "processing"]));

    // Trace context: every event of a traced request continues its trace;
    // events of an untraced request carry none.
    for (subject, trace) in [
        ("schema-good", Some(GOOD_TRACE)),
        ("schema-bad", Some(BAD_TRACE)),
        ("schema-reject", Some(REJECT_TRACE)),
        ("schema-fail", None),
    ] {
        let of_subject = tap.for_subject(subject);
        assert!(!of_subject.is_empty());
        for event in &of_subject {
            match trace {
                Some(incoming) => assert_continues_trace(event, incoming),
                None => {
                    assert!(!event.headers.contains_key(TRACEPARENT_HEADER), "{subject}");
                    assert!(event.body.get("traceparent").is_none(), "{subject}");
                }
            }
        }
    }
    // The metadata of the good request came back verbatim, as the schema
    // allows (object), and the correlation id was copied.
    let good_events = tap.for_subject("schema-good");
    assert!(good_events
        .iter()
        .all(|e| e.body["data"]["metadata"] == good["metadata"]
            && e.correlation_id.as_deref() == Some("corr-schemas")));
}

// ---------------------------------------------------------------------------
// (b) README examples
// ---------------------------------------------------------------------------

/// A fenced JSON block with its schema marker.
#[derive(Debug)]
struct MarkedBlock {
    /// 1-based line of the marker.
    line: usize,
    schema: String,
    json: String,
}

/// Finds every `<!-- schema: PATH -->` marker and the ```` ```json ```` block
/// right below it. A marker not directly followed by a JSON fence, or a
/// fence that never closes, is an error: a typo must not silently drop an
/// example from the check.
fn marked_blocks(text: &str) -> Result<Vec<MarkedBlock>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(rest) = line.strip_prefix(MARKER_PREFIX) {
            let marker_line = i + 1;
            let schema = rest
                .strip_suffix("-->")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("line {marker_line}: malformed marker {line:?}"))?;
            let fence = lines.get(i + 1).map(|l| l.trim()).unwrap_or_default();
            if fence != "```json" {
                return Err(format!(
                    "line {marker_line}: the marker must be directly followed by a ```json fence, found {fence:?}"
                ));
            }
            let body_start = i + 2;
            let end = lines[body_start..]
                .iter()
                .position(|l| l.trim() == "```")
                .map(|p| body_start + p)
                .ok_or_else(|| format!("line {marker_line}: the ```json block never closes"))?;
            blocks.push(MarkedBlock {
                line: marker_line,
                schema: schema.to_owned(),
                json: lines[body_start..end].join("\n"),
            });
            i = end + 1;
        } else {
            i += 1;
        }
    }
    Ok(blocks)
}

#[test]
fn marked_blocks_are_found_and_typos_are_errors() {
    let text = "intro\n<!-- schema: docs/schemas/request.json -->\n```json\n{\"a\": 1}\n```\n\
                ```json\n{\"unmarked\": true}\n```\n\
                <!-- schema: docs/schemas/event-failed.json -->\n```json\n[\n]\n```\n";
    let blocks = marked_blocks(text).expect("well formed");
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].line, 2);
    assert_eq!(blocks[0].schema, "docs/schemas/request.json");
    assert_eq!(blocks[0].json, "{\"a\": 1}");
    assert_eq!(blocks[1].schema, "docs/schemas/event-failed.json");
    assert_eq!(blocks[1].json, "[\n]");

    for broken in [
        "<!-- schema: docs/schemas/request.json -->\n\n```json\n{}\n```\n",
        "<!-- schema: docs/schemas/request.json -->\n```js\n{}\n```\n",
        "<!-- schema: docs/schemas/request.json -->\n```json\n{}\n",
        "<!-- schema: -->\n```json\n{}\n```\n",
    ] {
        assert!(marked_blocks(broken).is_err(), "{broken:?}");
    }
}

#[test]
fn every_exported_metric_is_in_the_readme() {
    let readme = read("README.md");
    let exposition = vidu_worker::metrics::Metrics::new().render();
    let mut names = Vec::new();
    for line in exposition.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut words = declared.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                panic!("odd TYPE line: {line}");
            };
            // Counters are exported (and documented) with their _total suffix.
            names.push(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            });
        }
    }
    assert!(names.len() >= 10, "{exposition}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from README.md: {missing:?}"
    );
}

#[test]
fn readme_examples_validate_against_their_schemas() {
    let readme = read("README.md");
    let blocks = marked_blocks(&readme).unwrap_or_else(|e| panic!("README.md: {e}"));
    assert!(
        blocks.len() >= MIN_README_EXAMPLES,
        "README.md has {} example(s) marked with `{MARKER_PREFIX}docs/schemas/NAME.json -->`; \
         at least {MIN_README_EXAMPLES} are expected (request and events)",
        blocks.len()
    );
    let known: BTreeSet<&str> = EVENT_SCHEMAS
        .iter()
        .map(|(_, p)| *p)
        .chain([REQUEST_SCHEMA])
        .collect();
    let mut problems = Vec::new();
    for block in &blocks {
        let at = format!("README.md line {} ({})", block.line, block.schema);
        if !known.contains(block.schema.as_str()) {
            problems.push(format!("{at}: unknown schema; use one of {known:?}"));
            continue;
        }
        let instance: Value = match serde_json::from_str(&block.json) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{at}: not valid JSON: {e}"));
                continue;
            }
        };
        for v in violations(&compile(&block.schema), &instance) {
            problems.push(format!("{at}: {v}"));
        }
        if block.schema == REQUEST_SCHEMA && !parser_accepts(&instance) {
            problems.push(format!("{at}: the worker's parser refuses this request"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// (c) The AsyncAPI document
// ---------------------------------------------------------------------------

fn asyncapi() -> Value {
    serde_yaml::from_str(&read(ASYNCAPI))
        .unwrap_or_else(|e| panic!("{ASYNCAPI} is not valid YAML: {e}"))
}

#[test]
fn asyncapi_is_valid_asyncapi_3() {
    let doc = asyncapi();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let meta = load_json(ASYNCAPI_META_SCHEMA);
    let validator = jsonschema::options()
        .with_draft(Draft::Draft7)
        .build(&meta)
        .expect("the AsyncAPI 3.0.0 schema compiles");
    let problems = violations(&validator, &doc);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The official schema is strict enough to notice a broken document.
    let mut broken = doc.clone();
    broken["channels"]["events"]["bindings"]["amqp"]["exchange"]["type"] = json!("queue");
    assert!(!validator.is_valid(&broken));
}

#[test]
fn asyncapi_refs_resolve() {
    let doc = asyncapi();
    let mut refs = Vec::new();
    collect_refs(&doc, "", &mut refs);
    assert!(!refs.is_empty());
    let docs_dir = repo_path("docs");
    let mut referenced_files = BTreeSet::new();
    for (at, r) in &refs {
        let (file, fragment) = r.split_once('#').unwrap_or((r.as_str(), ""));
        if file.is_empty() {
            assert!(
                resolve_pointer(&doc, fragment).is_some(),
                "{ASYNCAPI}{at}: dangling $ref {r}"
            );
            continue;
        }
        assert!(
            file.starts_with("./schemas/") && file.ends_with(".json"),
            "{ASYNCAPI}{at}: external $ref {r} should point into ./schemas/"
        );
        let path = docs_dir.join(file);
        assert!(path.is_file(), "{ASYNCAPI}{at}: $ref {r} names no file");
        let target: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
            .unwrap_or_else(|e| panic!("{r}: {e}"));
        assert!(
            resolve_pointer(&target, fragment).is_some(),
            "{ASYNCAPI}{at}: $ref {r} has a dangling fragment"
        );
        referenced_files.insert(format!("docs/{}", file.trim_start_matches("./")));
    }
    let all: BTreeSet<String> = EVENT_SCHEMAS
        .iter()
        .map(|(_, p)| (*p).to_owned())
        .chain([REQUEST_SCHEMA.to_owned()])
        .collect();
    assert_eq!(
        referenced_files, all,
        "every schema is used by the AsyncAPI document"
    );
}

#[test]
fn asyncapi_names_equal_the_code_defaults() {
    let doc = asyncapi();
    let topology = Topology::new(&Settings::default());
    let channels = &doc["channels"];
    let declared: BTreeMap<String, Value> = topology
        .queue_declarations()
        .into_iter()
        .map(|(name, args)| (name, field_table_to_json(&args)))
        .collect();

    for (channel, queue) in [
        ("requests", &topology.request_queue),
        ("deadLetters", &topology.dead_queue),
    ] {
        let ch = &channels[channel];
        assert_eq!(ch["address"], json!(queue), "{channel} address");
        let amqp = &ch["bindings"]["amqp"];
        assert_eq!(amqp["is"], "queue");
        assert_eq!(
            amqp["queue"]["name"],
            json!(queue),
            "{channel} binding name"
        );
        assert_eq!(amqp["queue"]["durable"], true, "{channel} durable");
        assert_eq!(
            amqp["x-arguments"],
            declared[queue.as_str()],
            "{channel}: documented queue arguments = what the worker declares"
        );
    }
    assert_eq!(
        channels["requests"]["bindings"]["amqp"]["x-arguments"]["x-queue-type"],
        "quorum"
    );

    let events = &channels["events"];
    assert_eq!(events["address"], json!(topology.events_exchange));
    let exchange = &events["bindings"]["amqp"]["exchange"];
    assert_eq!(exchange["name"], json!(topology.events_exchange));
    assert_eq!(exchange["type"], "topic");
    assert_eq!(exchange["durable"], true);

    // One message per event type, named, typed and routed as the code does.
    let messages = events["messages"].as_object().expect("event messages");
    assert_eq!(messages.len(), EVENT_SCHEMAS.len());
    for (event_type, schema_path) in EVENT_SCHEMAS {
        let message = messages
            .values()
            .map(|m| deref(&doc, m))
            .find(|m| m["name"] == event_type)
            .unwrap_or_else(|| panic!("no message named {event_type}"));
        assert_eq!(message["contentType"], CONTENT_TYPE, "{event_type}");
        assert_eq!(message["bindings"]["amqp"]["messageType"], event_type);
        assert_eq!(
            message["payload"]["$ref"],
            format!("./{}", schema_path.trim_start_matches("docs/")),
            "{event_type} payload"
        );
        let schema = load_json(schema_path);
        assert_eq!(schema["properties"]["type"]["const"], event_type);
        let receivers: Vec<&Value> = doc["operations"]
            .as_object()
            .expect("operations")
            .values()
            .filter(|op| {
                op["action"] == "receive"
                    && op["bindings"]["amqp"]["cc"] == json!([event_type])
                    && op["channel"]["$ref"] == "#/channels/events"
            })
            .collect();
        assert_eq!(
            receivers.len(),
            1,
            "one receive operation routed by {event_type}"
        );
    }
    let send = &doc["operations"]["sendRequest"];
    assert_eq!(send["action"], "send");
    assert_eq!(send["channel"]["$ref"], "#/channels/requests");

    // Headers the code reads and writes are documented.
    let schemas = &doc["components"]["schemas"];
    for (schema, header) in [
        ("requestHeaders", TRACEPARENT_HEADER),
        ("requestHeaders", "correlation_id"),
        ("requestHeaders", "reply_to"),
        ("requestHeaders", "message_id"),
        ("eventHeaders", TRACEPARENT_HEADER),
        ("eventHeaders", "correlation_id"),
        ("eventHeaders", "message_id"),
        ("deadLetterHeaders", ERROR_HEADER),
    ] {
        assert!(
            schemas[schema]["properties"].get(header).is_some(),
            "{schema} documents {header}"
        );
    }
    assert_eq!(
        schemas["eventHeaders"]["properties"]["content_type"]["const"],
        CONTENT_TYPE
    );

    // Every queue the worker declares, internal ones included, is named.
    let text = read(ASYNCAPI);
    for name in topology.queue_names() {
        assert!(text.contains(&name), "{ASYNCAPI} does not mention {name}");
    }
}

#[test]
fn asyncapi_examples_are_valid_requests() {
    let doc = asyncapi();
    let examples = doc["components"]["messages"]["request"]["examples"]
        .as_array()
        .expect("request examples");
    let mut models = BTreeSet::new();
    for example in examples {
        let payload = &example["payload"];
        let problems = violations(&REQUEST_VALIDATOR, payload);
        assert!(problems.is_empty(), "{}: {problems:?}", example["name"]);
        assert!(parser_accepts(payload), "{}", example["name"]);
        models.insert(
            payload["model"]
                .as_str()
                .and_then(Model::parse)
                .unwrap_or(Model::DEFAULT),
        );
    }
    assert_eq!(
        models,
        BTreeSet::from(Model::ALL),
        "an example for every model"
    );
}

/// The request message describes each model and points to its schema.
#[test]
fn asyncapi_request_lists_every_model() {
    let doc = asyncapi();
    let message = &doc["components"]["messages"]["request"];
    assert_eq!(
        message["payload"]["$ref"],
        format!("./{}", REQUEST_SCHEMA.trim_start_matches("docs/"))
    );
    let description = message["description"].as_str().expect("a description");
    let schema = load_json(REQUEST_SCHEMA);
    let lines: Vec<&str> = description.lines().collect();
    for model in Model::ALL {
        let start = lines
            .iter()
            .position(|l| l.starts_with(&format!("- `{model}`")))
            .unwrap_or_else(|| panic!("no item for {model}"));
        let item: Vec<&str> = lines[start + 1..]
            .iter()
            .take_while(|l| l.starts_with("  "))
            .copied()
            .collect();
        let item = format!("{} {}", lines[start], item.join(" "));
        let item = item.split_whitespace().collect::<Vec<_>>().join(" ");
        let link = format!("./schemas/request.json#/$defs/{model}");
        assert!(item.contains(&link), "{model}: the item links {link}");
        let limit = format!("at most {} characters", model.max_prompt_chars());
        assert!(item.contains(&limit), "{model}: the item says {limit}");
        assert!(
            resolve_pointer(&schema, &format!("/$defs/{model}")).is_some(),
            "{link} resolves"
        );
    }
}
