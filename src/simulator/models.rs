//! The six Vidu Q3 models the simulator serves, each at
//! `POST /v3/async/<model>`, and the body rules of each create endpoint
//! (which fields it takes, their JSON types and values), written from
//! Novita's model pages independently of the worker's own request parser,
//! so that tests can show the two agree.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;

/// The models served, each at [`create_path`]`(model)`.
pub const MODELS: [&str; 6] = [
    "vidu-q3-pro-i2v",
    "vidu-q3-turbo-i2v",
    "vidu-q3-pro-t2v",
    "vidu-q3-turbo-t2v",
    "vidu-q3-pro-f2v",
    "vidu-q3-turbo-f2v",
];

/// Path of a model's create-task endpoint (`POST`): `/v3/async/<model>`.
pub fn create_path(model: &str) -> String {
    format!("/v3/async/{model}")
}

/// `task.task_type` reported for a model's tasks: the model's name in upper
/// case with underscores (`vidu-q3-turbo-t2v` → `VIDU_Q3_TURBO_T2V`).
pub fn task_type(model: &str) -> String {
    model.to_ascii_uppercase().replace('-', "_")
}

/// File name endings an image URL's path may have (compared in lower case).
const IMAGE_EXTENSIONS: [&str; 4] = [".jpg", ".jpeg", ".png", ".webp"];
/// Media types a data URI image may declare (compared in lower case).
const DATA_URI_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/jpg", "image/webp"];
const RESOLUTIONS: &[&str] = &["540p", "720p", "1080p"];
const ASPECT_RATIOS: &[&str] = &["16:9", "9:16", "4:3", "3:4", "1:1"];
const STYLES: &[&str] = &["general", "anime"];
const AUDIO_TYPES: &[&str] = &["all", "speech_only", "sound_effect_only"];
const WM_CORNERS: &[&str] = &["top-left", "top-right", "bottom-left", "bottom-right"];

const DURATION: Rule = Rule::Integer { min: 1, max: 16 };
const SEED: Rule = Rule::Integer {
    min: 0,
    max: 2_147_483_647,
};
const WM_POSITION_NUMBER: Rule = Rule::Integer { min: 1, max: 4 };

/// What one field of a create body must be.
#[derive(Clone, Copy, Debug)]
enum Rule {
    /// Required: an array of exactly `count` strings, each an http(s) URL
    /// whose path ends in an image extension or, with `data_uri`, also a
    /// `data:image/<type>;base64,<data>` URI.
    Images { count: usize, data_uri: bool },
    /// A string of at most `max_chars` characters.
    Prompt { max_chars: usize, required: bool },
    /// A JSON integer within `min..=max`.
    Integer { min: u64, max: u64 },
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// A JSON boolean.
    Boolean,
    /// An http(s) URL string.
    HttpUrl,
}

impl Rule {
    fn required(self) -> bool {
        match self {
            Self::Images { .. } => true,
            Self::Prompt { required, .. } => required,
            _ => false,
        }
    }
}

/// One model's create endpoint: its name and the fields its body takes,
/// in the order they are checked.
#[derive(Debug)]
pub(super) struct ModelSpec {
    pub(super) name: &'static str,
    fields: &'static [(&'static str, Rule)],
}

/// The rules of each model in [`MODELS`], in the same order. `prompt` comes
/// first so that its type is judged before the images' contents.
pub(super) static SPECS: [ModelSpec; 6] = [
    ModelSpec {
        name: "vidu-q3-pro-i2v",
        fields: &[
            (
                "prompt",
                Rule::Prompt {
                    max_chars: 1500,
                    required: false,
                },
            ),
            (
                "images",
                Rule::Images {
                    count: 1,
                    data_uri: false,
                },
            ),
            ("duration", DURATION),
            ("resolution", Rule::OneOf(RESOLUTIONS)),
            ("seed", SEED),
            ("aspect_ratio", Rule::OneOf(ASPECT_RATIOS)),
            ("style", Rule::OneOf(STYLES)),
            ("audio", Rule::HttpUrl),
            ("wm_url", Rule::HttpUrl),
            ("wm_position", Rule::OneOf(WM_CORNERS)),
            ("is_rec", Rule::Boolean),
            ("off_peak", Rule::Boolean),
            ("watermark", Rule::Boolean),
        ],
    },
    ModelSpec {
        name: "vidu-q3-turbo-i2v",
        fields: &[
            (
                "prompt",
                Rule::Prompt {
                    max_chars: 5000,
                    required: false,
                },
            ),
            (
                "images",
                Rule::Images {
                    count: 1,
                    data_uri: false,
                },
            ),
            ("duration", DURATION),
            ("resolution", Rule::OneOf(RESOLUTIONS)),
            ("seed", SEED),
            ("audio", Rule::Boolean),
            ("audio_type", Rule::OneOf(AUDIO_TYPES)),
            ("is_rec", Rule::Boolean),
            ("off_peak", Rule::Boolean),
        ],
    },
    ModelSpec {
        name: "vidu-q3-pro-t2v",
        fields: &[
            (
                "prompt",
                Rule::Prompt {
                    max_chars: 2000,
                    required: true,
                },
            ),
            ("duration", DURATION),
            ("resolution", Rule::OneOf(RESOLUTIONS)),
            ("seed", SEED),
            ("aspect_ratio", Rule::OneOf(ASPECT_RATIOS)),
            ("audio", Rule::Boolean),
            ("wm_url", Rule::HttpUrl),
            ("wm_position", WM_POSITION_NUMBER),
            ("off_peak", Rule::Boolean),
            ("watermark", Rule::Boolean),
        ],
    },
    ModelSpec {
        name: "vidu-q3-turbo-t2v",
        fields: &[
            (
                "prompt",
                Rule::Prompt {
                    max_chars: 5000,
                    required: true,
                },
            ),
            ("duration", DURATION),
            ("resolution", Rule::OneOf(RESOLUTIONS)),
            ("seed", SEED),
            ("aspect_ratio", Rule::OneOf(ASPECT_RATIOS)),
            ("audio", Rule::Boolean),
            ("wm_url", Rule::HttpUrl),
            ("wm_position", WM_POSITION_NUMBER),
            ("off_peak", Rule::Boolean),
            ("watermark", Rule::Boolean),
        ],
    },
    ModelSpec {
        name: "vidu-q3-pro-f2v",
        fields: &[
            (
                "prompt",
                Rule::Prompt {
                    max_chars: 1500,
                    required: false,
                },
            ),
            (
                "images",
                Rule::Images {
                    count: 2,
                    data_uri: true,
                },
            ),
            ("duration", DURATION),
            ("resolution", Rule::OneOf(RESOLUTIONS)),
            ("seed", SEED),
            ("audio", Rule::Boolean),
            ("wm_url", Rule::HttpUrl),
            ("wm_position", WM_POSITION_NUMBER),
            ("is_rec", Rule::Boolean),
            ("off_peak", Rule::Boolean),
            ("watermark", Rule::Boolean),
        ],
    },
    ModelSpec {
        name: "vidu-q3-turbo-f2v",
        fields: &[
            (
                "prompt",
                Rule::Prompt {
                    max_chars: 1500,
                    required: false,
                },
            ),
            (
                "images",
                Rule::Images {
                    count: 2,
                    data_uri: true,
                },
            ),
            ("duration", DURATION),
            ("resolution", Rule::OneOf(RESOLUTIONS)),
            ("seed", SEED),
            ("audio", Rule::Boolean),
            ("is_rec", Rule::Boolean),
            ("off_peak", Rule::Boolean),
        ],
    },
];

impl ModelSpec {
    fn rule(&self, field: &str) -> Option<Rule> {
        self.fields
            .iter()
            .find(|(name, _)| *name == field)
            .map(|(_, rule)| *rule)
    }

    /// Checks a create body against this model's rules: valid JSON, an
    /// object, no field the model does not take (a `null` field counts as
    /// absent), every required field present, then each field in turn. The
    /// first problem found is the error, a message naming the field.
    pub(super) fn validate(&self, body: &[u8]) -> Result<Value, String> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("request body is not valid JSON: {e}"))?;
        let object = value
            .as_object()
            .ok_or_else(|| "request body must be a JSON object".to_owned())?;
        let given = |name: &str| object.get(name).filter(|v| !v.is_null());
        if let Some(unknown) = object
            .iter()
            .find(|(k, v)| !v.is_null() && self.rule(k).is_none())
            .map(|(k, _)| k)
        {
            return Err(format!("unknown field `{unknown}` for {}", self.name));
        }
        if let Some((name, _)) = self
            .fields
            .iter()
            .find(|(name, rule)| rule.required() && given(name).is_none())
        {
            return Err(format!("field `{name}` is required"));
        }
        for (name, rule) in self.fields {
            if let Some(v) = given(name) {
                self.check(name, *rule, v)?;
            }
        }
        Ok(value)
    }

    fn check(&self, name: &str, rule: Rule, value: &Value) -> Result<(), String> {
        match rule {
            Rule::Images { count, data_uri } => check_images(value, count, data_uri),
            Rule::Prompt { max_chars, .. } => {
                let prompt = value
                    .as_str()
                    .ok_or_else(|| format!("field `{name}` must be a string"))?;
                let chars = prompt.chars().count();
                if chars > max_chars {
                    return Err(format!(
                        "field `{name}` is {chars} characters, more than the limit of \
                         {max_chars} for {}",
                        self.name
                    ));
                }
                Ok(())
            }
            Rule::Integer { min, max } => match value.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(()),
                _ => Err(format!(
                    "field `{name}` must be an integer from {min} to {max}"
                )),
            },
            Rule::OneOf(allowed) => match value.as_str() {
                Some(s) if allowed.contains(&s) => Ok(()),
                _ => Err(format!(
                    "field `{name}` must be one of {}",
                    allowed.join(", ")
                )),
            },
            Rule::Boolean => match value {
                Value::Bool(_) => Ok(()),
                _ => Err(format!("field `{name}` must be true or false")),
            },
            Rule::HttpUrl => match value.as_str().and_then(http_url) {
                Some(_) => Ok(()),
                None => Err(format!("field `{name}` must be an http(s) URL")),
            },
        }
    }
}

/// The spec of a model in [`MODELS`].
#[cfg(test)]
pub(super) fn spec(model: &str) -> Option<&'static ModelSpec> {
    SPECS.iter().find(|s| s.name == model)
}

fn check_images(value: &Value, count: usize, data_uri: bool) -> Result<(), String> {
    let shape = || match (count, data_uri) {
        (1, _) => "field `images` must be an array of exactly one image URL string".to_owned(),
        (2, true) => "field `images` must be an array of exactly two image strings \
                      (start frame, end frame), each an image URL or data URI"
            .to_owned(),
        (n, _) => format!("field `images` must be an array of exactly {n} image URL strings"),
    };
    let items = match value {
        Value::Array(items) if items.len() == count => items,
        _ => return Err(shape()),
    };
    let Some(strings) = items.iter().map(Value::as_str).collect::<Option<Vec<_>>>() else {
        return Err(shape());
    };
    for (i, image) in strings.into_iter().enumerate() {
        if data_uri && has_prefix_ignore_case(image, "data:") {
            check_data_uri(image).map_err(|why| format!("field `images[{i}]` {why}"))?;
        } else if !image_url(image) {
            let expected = if data_uri {
                "must be an http(s) URL to a .jpg, .jpeg, .png or .webp file, or a \
                 data:image/<png|jpeg|jpg|webp>;base64,<data> URI"
            } else {
                "must be an http(s) URL to a .jpg, .jpeg, .png or .webp file"
            };
            return Err(format!("field `images[{i}]` {expected}"));
        }
    }
    Ok(())
}

/// An http(s) URL with a host and no whitespace or control characters.
fn http_url(s: &str) -> Option<url::Url> {
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    url::Url::parse(s)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .filter(|u| u.host_str().is_some_and(|h| !h.is_empty()))
}

/// An http(s) URL whose path ends in an image extension (any case).
fn image_url(s: &str) -> bool {
    http_url(s).is_some_and(|u| {
        let path = u.path().to_ascii_lowercase();
        IMAGE_EXTENSIONS.iter().any(|ext| path.ends_with(ext))
    })
}

fn has_prefix_ignore_case(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// Checks `data:<media type>;base64,<data>`: an allowed image media type
/// and non-empty, decodable (standard, padded) base64 data. The error
/// completes a sentence that starts with the field's name.
fn check_data_uri(uri: &str) -> Result<(), String> {
    let rest = uri.get("data:".len()..).unwrap_or_default();
    let Some((header, data)) = rest.split_once(',') else {
        return Err("is a data URI without a `,` before its data".to_owned());
    };
    let Some((media_type, encoding)) = header.rsplit_once(';') else {
        return Err("must be a base64 data URI: data:image/<type>;base64,<data>".to_owned());
    };
    if !encoding.eq_ignore_ascii_case("base64") {
        return Err("must be a base64 data URI: data:image/<type>;base64,<data>".to_owned());
    }
    let media_type = media_type.to_ascii_lowercase();
    if !DATA_URI_TYPES.contains(&media_type.as_str()) {
        return Err(format!(
            "is a data URI of type `{}`, not one of {}",
            excerpt(&media_type),
            DATA_URI_TYPES.join(", ")
        ));
    }
    if data.is_empty() {
        return Err("is a data URI with no data".to_owned());
    }
    if STANDARD.decode(data).is_err() {
        return Err("is a data URI whose data is not valid base64".to_owned());
    }
    Ok(())
}

/// At most 40 characters of `s`, for messages.
fn excerpt(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::simulator::test_support::*;
    use crate::simulator::{AccountQuota, EndpointFaults, FaultPlan};

    const IMG: &str = "https://example.com/cat.png";
    const END: &str = "https://example.com/end.JPEG?sig=1";
    /// A tiny base64 payload (not a real image; the simulator only decodes).
    const DATA: &str = "data:image/png;base64,iVBORw0KGgo=";

    /// Per model: a minimal and a full valid body.
    fn valid_bodies(model: &str) -> [Value; 2] {
        match model {
            "vidu-q3-pro-i2v" => [
                json!({"images": [IMG]}),
                json!({
                    "images": [END], "prompt": "é".repeat(1500), "duration": 16,
                    "resolution": "1080p", "seed": 2_147_483_647, "aspect_ratio": "3:4",
                    "style": "anime", "audio": "https://example.com/a.mp3",
                    "wm_url": "https://example.com/w.png", "wm_position": "bottom-right",
                    "is_rec": true, "off_peak": false, "watermark": true,
                }),
            ],
            "vidu-q3-turbo-i2v" => [
                json!({"images": [IMG], "prompt": null}),
                json!({
                    "images": [END], "prompt": "p".repeat(5000), "duration": 1,
                    "resolution": "540p", "seed": 0, "audio": true,
                    "audio_type": "sound_effect_only", "is_rec": false, "off_peak": true,
                }),
            ],
            "vidu-q3-pro-t2v" => [
                json!({"prompt": "a lighthouse at dusk"}),
                json!({
                    "prompt": "p".repeat(2000), "duration": 8, "resolution": "720p",
                    "seed": 7, "aspect_ratio": "9:16", "audio": false,
                    "wm_url": "http://example.com/w.webp", "wm_position": 4,
                    "off_peak": false, "watermark": true,
                }),
            ],
            "vidu-q3-turbo-t2v" => [
                json!({"prompt": "a lighthouse at dusk", "images": null}),
                json!({
                    "prompt": "p".repeat(5000), "duration": 16, "resolution": "1080p",
                    "seed": 2_147_483_647, "aspect_ratio": "1:1", "audio": true,
                    "wm_url": "https://example.com/w.png", "wm_position": 1,
                    "off_peak": true, "watermark": false,
                }),
            ],
            "vidu-q3-pro-f2v" => [
                json!({"images": [IMG, DATA]}),
                json!({
                    "images": ["data:image/webp;base64,UklGRg==", END],
                    "prompt": "p".repeat(1500), "duration": 4, "resolution": "1080p",
                    "seed": 3, "audio": true, "wm_url": "https://example.com/w.png",
                    "wm_position": 2, "is_rec": true, "off_peak": false, "watermark": true,
                }),
            ],
            "vidu-q3-turbo-f2v" => [
                json!({"images": [DATA, "data:image/jpeg;base64,/9j/4AA="]}),
                json!({
                    "images": ["data:image/jpg;base64,/9j/4AA=", IMG],
                    "prompt": "p".repeat(1500), "duration": 2, "resolution": "540p",
                    "seed": 11, "audio": false, "is_rec": false, "off_peak": true,
                }),
            ],
            other => panic!("no bodies for {other}"),
        }
    }

    /// Per model: bodies it refuses, and the field the message must name.
    fn refused_bodies(model: &str) -> Vec<(Value, &'static str)> {
        let two = json!([IMG, END]);
        match model {
            "vidu-q3-pro-i2v" => vec![
                (json!({"images": [IMG], "audio_type": "all"}), "audio_type"),
                (json!({"prompt": "p"}), "images"),
                (json!({"images": two}), "images"),
                (json!({"images": [DATA]}), "images[0]"),
                (
                    json!({"images": ["https://example.com/a.gif"]}),
                    "images[0]",
                ),
                (json!({"images": [IMG], "audio": true}), "audio"),
                (json!({"images": [IMG], "wm_position": 1}), "wm_position"),
                (json!({"images": [IMG], "style": "noir"}), "style"),
                (
                    json!({"images": [IMG], "prompt": "p".repeat(1501)}),
                    "prompt",
                ),
            ],
            "vidu-q3-turbo-i2v" => vec![
                (json!({"images": [IMG], "style": "anime"}), "style"),
                (json!({"images": [IMG], "wm_url": IMG}), "wm_url"),
                (json!({"audio": true}), "images"),
                (json!({"images": []}), "images"),
                (
                    json!({"images": [IMG], "audio": "https://e.com/a.mp3"}),
                    "audio",
                ),
                (
                    json!({"images": [IMG], "audio_type": "music"}),
                    "audio_type",
                ),
                (json!({"images": [IMG], "is_rec": "yes"}), "is_rec"),
                (
                    json!({"images": [IMG], "prompt": "p".repeat(5001)}),
                    "prompt",
                ),
            ],
            "vidu-q3-pro-t2v" => vec![
                (json!({"prompt": "p", "images": [IMG]}), "images"),
                (json!({"prompt": "p", "is_rec": false}), "is_rec"),
                (json!({"prompt": "p", "style": "general"}), "style"),
                (json!({"duration": 5}), "prompt"),
                (json!({"prompt": 5}), "prompt"),
                (
                    json!({"prompt": "p", "wm_position": "top-left"}),
                    "wm_position",
                ),
                (json!({"prompt": "p", "duration": 17}), "duration"),
                (json!({"prompt": "p", "seed": -1}), "seed"),
                (json!({"prompt": "p".repeat(2001)}), "prompt"),
            ],
            "vidu-q3-turbo-t2v" => vec![
                (json!({"prompt": "p", "images": [IMG]}), "images"),
                (json!({"prompt": "p", "audio_type": "all"}), "audio_type"),
                (json!({"prompt": null}), "prompt"),
                (json!({"prompt": "p", "wm_position": 5}), "wm_position"),
                (
                    json!({"prompt": "p", "aspect_ratio": "2:1"}),
                    "aspect_ratio",
                ),
                (json!({"prompt": "p", "duration": 5.0}), "duration"),
                (json!({"prompt": "p".repeat(5001)}), "prompt"),
            ],
            "vidu-q3-pro-f2v" => vec![
                (
                    json!({"images": two, "aspect_ratio": "16:9"}),
                    "aspect_ratio",
                ),
                (json!({"images": two, "style": "anime"}), "style"),
                (json!({"prompt": "p"}), "images"),
                (json!({"images": [IMG]}), "images"),
                (json!({"images": [IMG, END, IMG]}), "images"),
                (
                    json!({"images": [IMG, "data:image/gif;base64,R0lG"]}),
                    "images[1]",
                ),
                (
                    json!({"images": ["data:image/png;base64,@@@", END]}),
                    "images[0]",
                ),
                (
                    json!({"images": [IMG, "https://example.com/a.bmp"]}),
                    "images[1]",
                ),
                (json!({"images": two, "audio": IMG}), "audio"),
                (
                    json!({"images": two, "wm_position": "top-left"}),
                    "wm_position",
                ),
                (json!({"images": two, "prompt": "p".repeat(1501)}), "prompt"),
            ],
            "vidu-q3-turbo-f2v" => vec![
                (json!({"images": two, "wm_url": IMG}), "wm_url"),
                (json!({"images": two, "watermark": true}), "watermark"),
                (json!({"images": two, "wm_position": 1}), "wm_position"),
                (json!({"images": [IMG, 3]}), "images"),
                (json!({"images": IMG}), "images"),
                (
                    json!({"images": [IMG, "data:image/png;base64,aGk"]}),
                    "images[1]",
                ),
                (
                    json!({"images": [IMG, "data:text/plain;base64,aGk="]}),
                    "images[1]",
                ),
                (json!({"images": two, "off_peak": "no"}), "off_peak"),
                (json!({"images": two, "prompt": "p".repeat(1501)}), "prompt"),
            ],
            other => panic!("no bodies for {other}"),
        }
    }

    fn check(model: &str, body: &Value) -> Result<Value, String> {
        spec(model)
            .expect("model")
            .validate(body.to_string().as_bytes())
    }

    #[test]
    fn specs_follow_models() {
        let names: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
        assert_eq!(names, MODELS);
        assert_eq!(create_path("vidu-q3-pro-i2v"), super::super::CREATE_PATH);
        assert_eq!(task_type("vidu-q3-pro-i2v"), super::super::TASK_TYPE);
        assert_eq!(task_type("vidu-q3-turbo-f2v"), "VIDU_Q3_TURBO_F2V");
    }

    #[test]
    fn image_urls_and_data_uris() {
        assert!(image_url("https://e.example/a.PNG?sig=x#f"));
        assert!(image_url("HTTP://e.example/a.JPEG"));
        assert!(!image_url("https://e.example/a.gif"));
        assert!(!image_url("https://e.example/a.png.exe"));
        assert!(!image_url("https://e.example/a b.png"));
        assert!(!image_url("file:///etc/a.png"));
        assert!(!image_url("https:///a.png"));
        assert!(check_data_uri("data:image/png;base64,aGVsbG8=").is_ok());
        assert!(check_data_uri("DATA:Image/JPG;BASE64,aGVsbG8=").is_ok());
        for (uri, why) in [
            ("data:image/gif;base64,aGVsbG8=", "type `image/gif`"),
            ("data:image/png;base64,a!b=", "not valid base64"),
            ("data:image/png;base64,aGVsbG8", "not valid base64"),
            ("data:image/png;base64,", "no data"),
            ("data:image/png,aGVsbG8=", "base64 data URI"),
            ("data:image/png;base64", "without a `,`"),
        ] {
            let err = check_data_uri(uri).expect_err(uri);
            assert!(err.contains(why), "{uri}: {err}");
        }
    }

    #[test]
    fn null_is_absent_and_first_problem_wins() {
        let img = json!(["https://e.example/a.png"]);
        assert!(check("vidu-q3-pro-i2v", &json!({"images": img, "prompt": null})).is_ok());
        // A null field of another model is absent, not refused.
        assert!(check(
            "vidu-q3-pro-i2v",
            &json!({"images": img, "audio_type": null})
        )
        .is_ok());
        let err = check("vidu-q3-pro-t2v", &json!({"prompt": null})).expect_err("null");
        assert_eq!(err, "field `prompt` is required");
        let err = check("vidu-q3-pro-i2v", &json!({"images": ["a"], "prompt": 3})).expect_err("p");
        assert_eq!(err, "field `prompt` must be a string");
        let err =
            check("vidu-q3-turbo-t2v", &json!({"prompt": "p", "images": img})).expect_err("images");
        assert_eq!(err, "unknown field `images` for vidu-q3-turbo-t2v");
    }

    #[tokio::test]
    async fn every_model_takes_its_valid_bodies_and_its_tasks_complete() {
        let c = client();
        let sim = start(Duration::from_millis(50)).await;
        for model in MODELS {
            for body in valid_bodies(model) {
                let resp = create_at(&c, &sim, model, &body).await;
                assert_eq!(resp.status(), 200, "{model}: {body}");
                let created: Value = resp.json().await.expect("json");
                assert_eq!(keys(&created), ["task_id"]);
                let id = created["task_id"].as_str().expect("id").to_owned();
                let seen = wait_done(&c, &sim, &id).await;
                let last = seen.last().expect("last");
                assert_eq!(last["task"]["status"], "TASK_STATUS_SUCCEED", "{model}");
                assert_eq!(last["task"]["task_type"], task_type(model));
                assert!(last["videos"][0]["video_url"].as_str().is_some_and(
                    |u| u.starts_with(&format!("{}/videos/{id}.mp4?expires=", sim.base_url()))
                ));
                let view = sim.task(&id).expect("view");
                assert_eq!(view.model, model);
                assert_eq!(view.request, body);
            }
        }
        let stats = sim.stats();
        assert_eq!(stats.create_calls, 12);
        assert_eq!(stats.tasks_created, 12);
        assert_eq!(stats.duplicate_creates, 0);
        let two_each: BTreeMap<String, u64> = MODELS.iter().map(|m| (m.to_string(), 2)).collect();
        assert_eq!(stats.creates_by_model, two_each);
        assert_eq!(stats.tasks_created_by_model, two_each);
        let creates: Vec<_> = sim
            .calls()
            .into_iter()
            .filter(|call| call.endpoint == "create")
            .collect();
        assert_eq!(creates.len(), 12);
        for (call, model) in creates.iter().zip(MODELS.iter().flat_map(|m| [m, m])) {
            assert_eq!(call.model.as_deref(), Some(*model));
            assert_eq!(call.outcome, "200");
        }
        assert!(sim
            .calls()
            .iter()
            .filter(|call| call.endpoint == "poll")
            .all(|call| call.model.is_none()));
    }

    #[tokio::test]
    async fn every_model_refuses_wrong_bodies_naming_the_field() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        let mut refused = 0;
        for model in MODELS {
            let raw = c
                .post(format!("{}{}", sim.base_url(), create_path(model)))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await
                .expect("send");
            let (status, v) = error_body(raw).await;
            assert_eq!(
                (status, v["reason"].as_str()),
                (400, Some("INVALID_REQUEST_BODY"))
            );
            refused += 1;
            for (body, field) in refused_bodies(model) {
                let (status, v) = error_body(create_at(&c, &sim, model, &body).await).await;
                assert_eq!(status, 400, "{model}: {body}");
                assert_eq!(v["reason"], "INVALID_REQUEST_BODY", "{model}: {body}");
                let message = v["message"].as_str().expect("message");
                assert!(
                    message.contains(&format!("`{field}`")),
                    "{model}: {body}: {message:?} should name {field}"
                );
                refused += 1;
            }
        }
        let stats = sim.stats();
        assert_eq!(stats.tasks_created, 0);
        assert_eq!(stats.answered("create:400"), refused);
        assert_eq!(stats.create_calls, refused);
        assert!(stats.tasks_created_by_model.is_empty());
    }

    #[test]
    fn refusal_messages() {
        let two = json!([IMG, END]);
        for (model, body, message) in [
            (
                "vidu-q3-pro-t2v",
                json!({"prompt": "p", "images": [IMG]}),
                "unknown field `images` for vidu-q3-pro-t2v",
            ),
            ("vidu-q3-pro-t2v", json!({}), "field `prompt` is required"),
            (
                "vidu-q3-pro-t2v",
                json!({"prompt": "p".repeat(2001)}),
                "field `prompt` is 2001 characters, more than the limit of 2000 for \
                 vidu-q3-pro-t2v",
            ),
            (
                "vidu-q3-turbo-t2v",
                json!({"prompt": "p", "wm_position": 0}),
                "field `wm_position` must be an integer from 1 to 4",
            ),
            (
                "vidu-q3-pro-i2v",
                json!({"images": [IMG], "wm_position": 1}),
                "field `wm_position` must be one of top-left, top-right, bottom-left, \
                 bottom-right",
            ),
            (
                "vidu-q3-turbo-i2v",
                json!({"images": [IMG], "audio": "yes"}),
                "field `audio` must be true or false",
            ),
            (
                "vidu-q3-pro-i2v",
                json!({"images": [IMG], "audio": true}),
                "field `audio` must be an http(s) URL",
            ),
            (
                "vidu-q3-pro-i2v",
                json!({"images": ["https://e.com/a.gif"]}),
                "field `images[0]` must be an http(s) URL to a .jpg, .jpeg, .png or .webp file",
            ),
            (
                "vidu-q3-turbo-f2v",
                json!({"images": [IMG]}),
                "field `images` must be an array of exactly two image strings (start frame, \
                 end frame), each an image URL or data URI",
            ),
            (
                "vidu-q3-pro-f2v",
                json!({"images": [IMG, "data:image/gif;base64,R0lG"]}),
                "field `images[1]` is a data URI of type `image/gif`, not one of image/png, \
                 image/jpeg, image/jpg, image/webp",
            ),
            (
                "vidu-q3-pro-f2v",
                json!({"images": ["data:image/png;base64,@@", END]}),
                "field `images[0]` is a data URI whose data is not valid base64",
            ),
            (
                "vidu-q3-pro-f2v",
                json!({"images": two, "seed": 2_147_483_648u64}),
                "field `seed` must be an integer from 0 to 2147483647",
            ),
        ] {
            assert_eq!(check(model, &body).expect_err(model), message, "{body}");
        }
    }

    #[tokio::test]
    async fn auth_faults_quota_and_directives_cover_every_model() {
        let c = client();
        let sim = start(Duration::ZERO).await;
        // One create script serves all six create paths in turn.
        sim.set_faults(FaultPlan {
            create: EndpointFaults {
                script: MODELS.iter().map(|_| f("503")).collect(),
                ..EndpointFaults::default()
            },
            ..FaultPlan::default()
        });
        for model in MODELS {
            let [body, _] = valid_bodies(model);
            let resp = c
                .post(format!("{}{}", sim.base_url(), create_path(model)))
                .json(&body)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 401, "{model}: auth comes first");
            assert_eq!(create_at(&c, &sim, model, &body).await.status(), 503);
        }
        assert_eq!(sim.stats().tasks_created, 0);

        for model in MODELS {
            let [mut body, _] = valid_bodies(model);
            body["prompt"] = json!("a dog [sim:fail=nsfw]");
            let resp = create_at(&c, &sim, model, &body).await;
            assert_eq!(resp.status(), 200, "{model}");
            let id = resp.json::<Value>().await.expect("json")["task_id"]
                .as_str()
                .expect("id")
                .to_owned();
            let v = poll_json(&c, &sim, &id).await;
            assert_eq!(v["task"]["status"], "TASK_STATUS_FAILED", "{model}");
            assert_eq!(v["task"]["reason"], "nsfw");
            body["prompt"] = json!("no [sim:reject=blocked]");
            let (status, v) = error_body(create_at(&c, &sim, model, &body).await).await;
            assert_eq!(
                (status, v["reason"].as_str()),
                (400, Some("ILLEGAL_PROMPT"))
            );
        }
        assert_eq!(sim.stats().tasks_created, 6);

        // The account quota counts the creates of every model together.
        sim.reset();
        sim.set_quota(Some(AccountQuota {
            creates: 2,
            window: Duration::from_secs(3600),
            retry_after: true,
        }));
        let [t2v, _] = valid_bodies("vidu-q3-pro-t2v");
        let [f2v, _] = valid_bodies("vidu-q3-turbo-f2v");
        assert_eq!(
            create_at(&c, &sim, "vidu-q3-pro-t2v", &t2v).await.status(),
            200
        );
        assert_eq!(
            create_at(&c, &sim, "vidu-q3-turbo-f2v", &f2v)
                .await
                .status(),
            200
        );
        let resp = create_at(&c, &sim, "vidu-q3-turbo-i2v", &json!({"images": [IMG]})).await;
        assert_eq!(resp.status(), 429);

        // Other names are not create endpoints.
        let (status, _) = error_body(create_at(&c, &sim, "vidu-q1", &t2v).await).await;
        assert_eq!(status, 404);
    }
}
