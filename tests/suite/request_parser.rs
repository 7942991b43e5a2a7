//! Property tests of the request parser (bounded: a few hundred cases each,
//! well under a second): it never panics on any bytes or any JSON, accepts
//! every request built within the upstream's limits unchanged, and names the
//! field whenever it refuses one.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use vidu_worker::request::{parse, MessageProps};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

prop_compose! {
    fn valid_request()(
        id in "[A-Za-z0-9._:-]{1,128}",
        host in "[a-z]{1,20}",
        ext in prop_oneof![Just("jpg"), Just("jpeg"), Just("png"), Just("webp"), Just("PNG")],
        prompt in prop::option::of(".{0,300}"),
        duration in prop::option::of(1u8..=16),
        seed in prop::option::of(0u32..=2_147_483_647),
        resolution in prop::option::of(prop_oneof![Just("540p"), Just("720p"), Just("1080p")]),
        aspect in prop::option::of(prop_oneof![Just("16:9"), Just("9:16"), Just("4:3"), Just("3:4"), Just("1:1")]),
        off_peak in prop::option::of(any::<bool>()),
        meta in prop::option::of(prop::collection::btree_map("[a-z]{1,8}", any::<i32>(), 0..8)),
    ) -> Value {
        let mut input = Map::new();
        input.insert("images".into(), json!([format!("https://{host}.example/img.{ext}")]));
        if let Some(p) = prompt { input.insert("prompt".into(), json!(p)); }
        if let Some(d) = duration { input.insert("duration".into(), json!(d)); }
        if let Some(s) = seed { input.insert("seed".into(), json!(s)); }
        if let Some(r) = resolution { input.insert("resolution".into(), json!(r)); }
        if let Some(a) = aspect { input.insert("aspect_ratio".into(), json!(a)); }
        if let Some(o) = off_peak { input.insert("off_peak".into(), json!(o)); }
        let mut body = json!({"request_id": id, "input": Value::Object(input)});
        if let Some(m) = meta { body["metadata"] = json!(m); }
        body
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn any_bytes_never_panic_and_refusals_name_a_field(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(e) = parse(&bytes, MessageProps::default()) {
            prop_assert!(!e.field.is_empty());
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn any_json_never_panics(value in arb_json()) {
        let bytes = serde_json::to_vec(&value).expect("json");
        if let Err(e) = parse(&bytes, MessageProps::default()) {
            prop_assert!(!e.field.is_empty());
        }
    }

    #[test]
    fn valid_requests_are_accepted_unchanged(body in valid_request()) {
        let bytes = serde_json::to_vec(&body).expect("json");
        let req = parse(&bytes, MessageProps::default());
        prop_assert!(req.is_ok(), "{:?}", req.err());
        let req = req.expect("ok");
        prop_assert_eq!(req.request_id.as_str(), body["request_id"].as_str().expect("id"));
        let sent = serde_json::to_value(&req.input).expect("ser");
        prop_assert_eq!(&sent, &body["input"]);
        if let Some(meta) = req.metadata {
            let echoed: Value = serde_json::from_str(meta.get()).expect("meta");
            prop_assert_eq!(&echoed, &body["metadata"]);
        }
    }

    #[test]
    fn a_wrong_value_in_any_input_field_is_named(
        body in valid_request(),
        field in prop_oneof![
            Just("prompt"), Just("duration"), Just("seed"), Just("resolution"), Just("aspect_ratio"),
            Just("style"), Just("audio"), Just("is_rec"), Just("off_peak"), Just("watermark"),
            Just("wm_url"), Just("wm_position"), Just("images")
        ],
        junk in arb_json().prop_filter("not null", |v| !v.is_null()),
    ) {
        let mut body = body;
        body["input"][field] = junk;
        let bytes = serde_json::to_vec(&body).expect("json");
        if let Err(e) = parse(&bytes, MessageProps::default()) {
            prop_assert!(
                e.field == format!("input.{field}") || e.field == "input.images[0]",
                "{} for a bad {}", e.field, field
            );
        }
    }
}
