//! The Vidu Q3 family: the six models, and one typed upstream body per model.
//!
//! Every model is `POST /v3/async/<model>` on Novita and is polled the same
//! way; only the body differs. [`parse_input`] turns a request's `input`
//! object into that model's own type (parse, don't validate): a field of
//! another model, a wrong type, a missing prompt where one is required or
//! the wrong number of images is refused naming the field and the model.
//! Rules that models share are one function each (`duration`, `seed`,
//! `resolution`, image URLs, data-URI frames, ...). Where Novita's pages
//! disagree (`audio` a URL on Pro image-to-video and a boolean elsewhere,
//! `wm_position` a corner name on Pro image-to-video and an integer 1–4
//! elsewhere) each model follows its own page, and the integer is passed
//! through unchanged.

use std::{borrow::Cow, fmt};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One of the six Vidu Q3 models (the path slug of its create endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Model {
    /// Image to video, Pro (the default).
    #[serde(rename = "vidu-q3-pro-i2v")]
    ProI2v,
    /// Image to video, Turbo.
    #[serde(rename = "vidu-q3-turbo-i2v")]
    TurboI2v,
    /// Text to video, Pro.
    #[serde(rename = "vidu-q3-pro-t2v")]
    ProT2v,
    /// Text to video, Turbo.
    #[serde(rename = "vidu-q3-turbo-t2v")]
    TurboT2v,
    /// Start and end frame to video, Pro.
    #[serde(rename = "vidu-q3-pro-f2v")]
    ProF2v,
    /// Start and end frame to video, Turbo.
    #[serde(rename = "vidu-q3-turbo-f2v")]
    TurboF2v,
}

impl Model {
    /// Every model, in the order the documentation lists them.
    pub const ALL: [Self; 6] = [
        Self::ProI2v,
        Self::TurboI2v,
        Self::ProT2v,
        Self::TurboT2v,
        Self::ProF2v,
        Self::TurboF2v,
    ];
    /// The model of a request that names none.
    pub const DEFAULT: Self = Self::ProI2v;

    /// Its place in [`Model::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The model's name, which is also its path on the upstream.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProI2v => "vidu-q3-pro-i2v",
            Self::TurboI2v => "vidu-q3-turbo-i2v",
            Self::ProT2v => "vidu-q3-pro-t2v",
            Self::TurboT2v => "vidu-q3-turbo-t2v",
            Self::ProF2v => "vidu-q3-pro-f2v",
            Self::TurboF2v => "vidu-q3-turbo-f2v",
        }
    }

    /// The model of this name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The upstream path of its create endpoint.
    pub fn create_path(self) -> String {
        format!("/v3/async/{}", self.as_str())
    }

    /// The names of all models, comma-separated, for messages.
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }

    /// The fields its body may hold.
    pub fn fields(self) -> &'static [&'static str] {
        const COMMON: [&str; 4] = ["duration", "seed", "resolution", "off_peak"];
        macro_rules! with_common {
            ($($f:literal),*) => {{
                const F: &[&str] = &[$($f,)* COMMON[0], COMMON[1], COMMON[2], COMMON[3]];
                F
            }};
        }
        match self {
            Self::ProI2v => with_common!(
                "images",
                "prompt",
                "audio",
                "style",
                "is_rec",
                "wm_url",
                "watermark",
                "wm_position",
                "aspect_ratio"
            ),
            Self::TurboI2v => with_common!("images", "prompt", "audio", "audio_type", "is_rec"),
            Self::ProT2v | Self::TurboT2v => with_common!(
                "prompt",
                "audio",
                "wm_url",
                "watermark",
                "wm_position",
                "aspect_ratio"
            ),
            Self::ProF2v => with_common!(
                "images",
                "prompt",
                "audio",
                "is_rec",
                "wm_url",
                "watermark",
                "wm_position"
            ),
            Self::TurboF2v => with_common!("images", "prompt", "audio", "is_rec"),
        }
    }

    /// Longest prompt, in characters.
    pub fn max_prompt_chars(self) -> usize {
        match self {
            Self::ProI2v | Self::ProF2v | Self::TurboF2v => 1500,
            Self::ProT2v => 2000,
            Self::TurboI2v | Self::TurboT2v => 5000,
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest image, audio or watermark URL, in characters.
pub const MAX_URL_CHARS: usize = 2048;
const IMAGE_EXTENSIONS: [&str; 4] = [".jpg", ".jpeg", ".png", ".webp"];
const IMAGE_MEDIA_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/jpg", "image/webp"];
const RESOLUTIONS: [&str; 3] = ["540p", "720p", "1080p"];
const ASPECT_RATIOS: [&str; 5] = ["16:9", "9:16", "4:3", "3:4", "1:1"];
const STYLES: [&str; 2] = ["general", "anime"];
const CORNERS: [&str; 4] = ["top-left", "top-right", "bottom-left", "bottom-right"];
const AUDIO_TYPES: [&str; 3] = ["all", "speech_only", "sound_effect_only"];

/// What every model's body may say about length, randomness, size and time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Common {
    /// Seconds of video, 1..=16.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u8>,
    /// Random seed, 0..=2147483647 (0 or absent: random).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
    /// `540p`, `720p` or `1080p`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    /// Off-peak (cheaper, within 48 h) processing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_peak: Option<bool>,
}

/// The watermark fields of the models that have them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Watermark<P> {
    /// Add a watermark.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<bool>,
    /// Watermark image URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wm_url: Option<String>,
    /// Watermark corner: a name on Pro image-to-video, an integer 1–4
    /// (passed through unchanged) elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wm_position: Option<P>,
}

/// `vidu-q3-pro-i2v`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProI2v {
    /// Exactly one image URL.
    pub images: Vec<String>,
    /// Motion description, at most 1,500 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Background music URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio: Option<String>,
    /// `general` or `anime`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    /// Audio scene matching.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_rec: Option<bool>,
    /// Output aspect ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    /// Watermark, with a corner name.
    #[serde(flatten)]
    pub watermark: Watermark<String>,
    /// Length, seed, resolution, off-peak.
    #[serde(flatten)]
    pub common: Common,
}

/// `vidu-q3-turbo-i2v`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TurboI2v {
    /// Exactly one image URL.
    pub images: Vec<String>,
    /// Motion description, at most 5,000 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Generate audio with the video (the upstream's default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio: Option<bool>,
    /// `all`, `speech_only` or `sound_effect_only`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_type: Option<String>,
    /// Audio scene matching.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_rec: Option<bool>,
    /// Length, seed, resolution, off-peak.
    #[serde(flatten)]
    pub common: Common,
}

/// `vidu-q3-pro-t2v` and `vidu-q3-turbo-t2v` (they differ in the prompt's
/// longest length only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct T2v {
    /// What to show: required.
    pub prompt: String,
    /// Generate audio with the video (the upstream's default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio: Option<bool>,
    /// Output aspect ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    /// Watermark, with an integer corner.
    #[serde(flatten)]
    pub watermark: Watermark<u8>,
    /// Length, seed, resolution, off-peak.
    #[serde(flatten)]
    pub common: Common,
}

/// `vidu-q3-pro-f2v` and `vidu-q3-turbo-f2v` (Turbo has no watermark).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct F2v {
    /// The start frame and the end frame: URLs or Base64 data URIs.
    pub images: Vec<String>,
    /// Motion description, at most 1,500 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Generate audio with the video (the upstream's default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio: Option<bool>,
    /// Audio scene matching.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_rec: Option<bool>,
    /// Watermark, with an integer corner (Pro only).
    #[serde(flatten)]
    pub watermark: Watermark<u8>,
    /// Length, seed, resolution, off-peak.
    #[serde(flatten)]
    pub common: Common,
}

/// A validated upstream body, typed by its model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ViduInput {
    /// `vidu-q3-pro-i2v`.
    ProI2v(ProI2v),
    /// `vidu-q3-turbo-i2v`.
    TurboI2v(TurboI2v),
    /// `vidu-q3-pro-t2v`.
    ProT2v(T2v),
    /// `vidu-q3-turbo-t2v`.
    TurboT2v(T2v),
    /// `vidu-q3-pro-f2v`.
    ProF2v(F2v),
    /// `vidu-q3-turbo-f2v`.
    TurboF2v(F2v),
}

impl ViduInput {
    /// The model the body is for.
    pub fn model(&self) -> Model {
        match self {
            Self::ProI2v(_) => Model::ProI2v,
            Self::TurboI2v(_) => Model::TurboI2v,
            Self::ProT2v(_) => Model::ProT2v,
            Self::TurboT2v(_) => Model::TurboT2v,
            Self::ProF2v(_) => Model::ProF2v,
            Self::TurboF2v(_) => Model::TurboF2v,
        }
    }

    /// The parts every model has.
    pub fn common(&self) -> &Common {
        match self {
            Self::ProI2v(i) => &i.common,
            Self::TurboI2v(i) => &i.common,
            Self::ProT2v(i) | Self::TurboT2v(i) => &i.common,
            Self::ProF2v(i) | Self::TurboF2v(i) => &i.common,
        }
    }

    /// The prompt, if any.
    pub fn prompt(&self) -> Option<&str> {
        match self {
            Self::ProI2v(i) => i.prompt.as_deref(),
            Self::TurboI2v(i) => i.prompt.as_deref(),
            Self::ProT2v(i) | Self::TurboT2v(i) => Some(&i.prompt),
            Self::ProF2v(i) | Self::TurboF2v(i) => i.prompt.as_deref(),
        }
    }
}

/// A refused field: its path and what is wrong.
pub(crate) type Problem = (Cow<'static, str>, String);

pub(crate) fn problem(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Problem {
    (field.into(), message.into())
}

/// Parses `input` as the body of `model`.
pub(crate) fn parse_input(model: Model, map: Map<String, Value>) -> Result<ViduInput, Problem> {
    let mut f = Fields::new(model, map)?;
    let input = match model {
        Model::ProI2v => ViduInput::ProI2v(ProI2v {
            images: f.one_image()?,
            prompt: f.prompt()?,
            audio: f.url("audio")?,
            style: f.one_of("style", &STYLES)?,
            is_rec: f.boolean("is_rec")?,
            aspect_ratio: f.one_of("aspect_ratio", &ASPECT_RATIOS)?,
            watermark: Watermark {
                watermark: f.boolean("watermark")?,
                wm_url: f.url("wm_url")?,
                wm_position: f.one_of("wm_position", &CORNERS)?,
            },
            common: f.common()?,
        }),
        Model::TurboI2v => ViduInput::TurboI2v(TurboI2v {
            images: f.one_image()?,
            prompt: f.prompt()?,
            audio: f.boolean("audio")?,
            audio_type: f.one_of("audio_type", &AUDIO_TYPES)?,
            is_rec: f.boolean("is_rec")?,
            common: f.common()?,
        }),
        Model::ProT2v | Model::TurboT2v => {
            let t2v = T2v {
                prompt: f.required_prompt()?,
                audio: f.boolean("audio")?,
                aspect_ratio: f.one_of("aspect_ratio", &ASPECT_RATIOS)?,
                watermark: f.numbered_watermark()?,
                common: f.common()?,
            };
            if model == Model::ProT2v {
                ViduInput::ProT2v(t2v)
            } else {
                ViduInput::TurboT2v(t2v)
            }
        }
        Model::ProF2v | Model::TurboF2v => {
            let f2v = F2v {
                images: f.two_frames()?,
                prompt: f.prompt()?,
                audio: f.boolean("audio")?,
                is_rec: f.boolean("is_rec")?,
                watermark: f.numbered_watermark()?,
                common: f.common()?,
            };
            if model == Model::ProF2v {
                ViduInput::ProF2v(f2v)
            } else {
                ViduInput::TurboF2v(f2v)
            }
        }
    };
    Ok(input)
}

/// The fields of one `input`, taken one by one; a field the model does not
/// have is refused before any is read.
struct Fields {
    model: Model,
    map: Map<String, Value>,
}

fn path(key: &str) -> String {
    format!("input.{key}")
}

impl Fields {
    fn new(model: Model, mut map: Map<String, Value>) -> Result<Self, Problem> {
        let mut unknown: Vec<&String> = map
            .keys()
            .filter(|k| !model.fields().contains(&k.as_str()))
            .collect();
        unknown.sort_unstable();
        if let Some(key) = unknown.first() {
            let name = excerpt(key);
            let elsewhere: Vec<&str> = Model::ALL
                .into_iter()
                .filter(|m| m.fields().contains(&key.as_str()))
                .map(Model::as_str)
                .collect();
            let message = if elsewhere.is_empty() {
                format!("unknown field {name:?} for {model}")
            } else {
                format!(
                    "unknown field {name:?} for {model} (it is a field of {})",
                    elsewhere.join(", ")
                )
            };
            return Err(problem(path(&name), message));
        }
        // Null means "not given" for every field the model has (a field it
        // does not have is refused above, null or not, as at the top level).
        map.retain(|_, v| !v.is_null());
        Ok(Self { model, map })
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, Problem> {
        self.take(key).map(|v| boolean(&v, &path(key))).transpose()
    }

    fn one_of(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>, Problem> {
        self.take(key)
            .map(|v| one_of(v, &path(key), allowed))
            .transpose()
    }

    fn url(&mut self, key: &str) -> Result<Option<String>, Problem> {
        self.take(key).map(|v| http_url(v, &path(key))).transpose()
    }

    fn integer(&mut self, key: &str, min: u64, max: u64) -> Result<Option<u64>, Problem> {
        self.take(key)
            .map(|v| integer(&v, &path(key), min, max))
            .transpose()
    }

    fn common(&mut self) -> Result<Common, Problem> {
        Ok(Common {
            duration: self.integer("duration", 1, 16)?.map(|d| d as u8),
            seed: self.integer("seed", 0, 2_147_483_647)?.map(|s| s as u32),
            resolution: self.one_of("resolution", &RESOLUTIONS)?,
            off_peak: self.boolean("off_peak")?,
        })
    }

    fn numbered_watermark(&mut self) -> Result<Watermark<u8>, Problem> {
        Ok(Watermark {
            watermark: self.boolean("watermark")?,
            wm_url: self.url("wm_url")?,
            wm_position: self.integer("wm_position", 1, 4)?.map(|p| p as u8),
        })
    }

    fn prompt(&mut self) -> Result<Option<String>, Problem> {
        let Some(value) = self.take("prompt") else {
            return Ok(None);
        };
        let prompt = string(value, "input.prompt")?;
        let chars = prompt.chars().count();
        let max = self.model.max_prompt_chars();
        if chars > max {
            return Err(problem(
                "input.prompt",
                format!(
                    "is {chars} characters, more than the limit of {max} for {}",
                    self.model
                ),
            ));
        }
        Ok(Some(prompt))
    }

    fn required_prompt(&mut self) -> Result<String, Problem> {
        match self.prompt()? {
            Some(p) if !p.trim().is_empty() => Ok(p),
            _ => Err(problem(
                "input.prompt",
                format!(
                    "is required for {}: the text to turn into video",
                    self.model
                ),
            )),
        }
    }

    fn images(&mut self, wanted: &str) -> Result<Vec<Value>, Problem> {
        match self.take("images") {
            None => Err(problem(
                "input.images",
                format!("is required for {}: {wanted}", self.model),
            )),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(problem(
                "input.images",
                format!("must be an array with {wanted}, found {}", kind(&other)),
            )),
        }
    }

    fn one_image(&mut self) -> Result<Vec<String>, Problem> {
        let mut items = self.images("exactly one image URL")?;
        if items.len() != 1 {
            return Err(problem(
                "input.images",
                format!("must hold exactly one image URL, found {}", items.len()),
            ));
        }
        Ok(vec![image_url(items.remove(0), "input.images[0]")?])
    }

    fn two_frames(&mut self) -> Result<Vec<String>, Problem> {
        let wanted = "two images, the start frame and the end frame";
        let items = self.images(wanted)?;
        if items.len() != 2 {
            return Err(problem(
                "input.images",
                format!(
                    "must hold exactly two images (the start frame and the end frame), found {}",
                    items.len()
                ),
            ));
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| frame(item, &format!("input.images[{i}]")))
            .collect()
    }
}

/// An image URL: http(s), ending in a known image extension.
fn image_url(value: Value, field: &str) -> Result<String, Problem> {
    let url = http_url(value, field)?;
    let path = url::Url::parse(&url)
        .map(|u| u.path().to_ascii_lowercase())
        .unwrap_or_default();
    if !IMAGE_EXTENSIONS.iter().any(|ext| path.ends_with(ext)) {
        return Err(problem(
            field.to_owned(),
            "must point to a .jpg, .jpeg, .png or .webp file",
        ));
    }
    Ok(url)
}

/// A start or end frame: an image URL, or a Base64 data URI of an image.
/// The data itself is never quoted.
fn frame(value: Value, field: &str) -> Result<String, Problem> {
    match value {
        Value::String(s) if s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")) => {
            check_data_uri(&s).map_err(|why| problem(field.to_owned(), why))?;
            Ok(s)
        }
        other => image_url(other, field),
    }
}

/// Checks a `data:image/<type>;base64,<data>` URI: an image type the
/// upstream takes, and data that decodes.
pub fn check_data_uri(uri: &str) -> Result<(), String> {
    let rest = uri
        .get(5..)
        .filter(|_| {
            uri.get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case("data:"))
        })
        .unwrap_or(uri);
    let Some((header, data)) = rest.split_once(',') else {
        return Err("is a data URI without data (expected data:image/png;base64,…)".into());
    };
    let Some(media_type) = header.strip_suffix(";base64") else {
        return Err("must be a Base64 data URI (data:image/png;base64,…)".into());
    };
    let media_type = media_type.to_ascii_lowercase();
    if !IMAGE_MEDIA_TYPES.contains(&media_type.as_str()) {
        return Err(format!(
            "is a data URI of {:?}; it must be one of {}",
            excerpt(&media_type),
            IMAGE_MEDIA_TYPES.join(", ")
        ));
    }
    match base64::engine::general_purpose::STANDARD.decode(data) {
        Ok(bytes) if !bytes.is_empty() => Ok(()),
        Ok(_) => Err("is a data URI with no image data".into()),
        Err(_) => Err("is a data URI whose data is not valid Base64".into()),
    }
}

/// The JSON kind of a value, for messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string(value: Value, field: &str) -> Result<String, Problem> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(problem(
            field.to_owned(),
            format!("must be a string, found {}", kind(&other)),
        )),
    }
}

fn boolean(value: &Value, field: &str) -> Result<bool, Problem> {
    value.as_bool().ok_or_else(|| {
        problem(
            field.to_owned(),
            format!("must be true or false, found {}", kind(value)),
        )
    })
}

fn integer(value: &Value, field: &str, min: u64, max: u64) -> Result<u64, Problem> {
    let range = || format!("must be an integer from {min} to {max}");
    let Value::Number(n) = value else {
        return Err(problem(
            field.to_owned(),
            format!("{}, found {}", range(), kind(value)),
        ));
    };
    match n.as_u64() {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(problem(
            field.to_owned(),
            format!("{}, found {}", range(), excerpt(&n.to_string())),
        )),
    }
}

fn one_of(value: Value, field: &str, allowed: &[&str]) -> Result<String, Problem> {
    let s = string(value, field)?;
    if allowed.contains(&s.as_str()) {
        Ok(s)
    } else {
        Err(problem(
            field.to_owned(),
            format!("{:?} is not one of {}", excerpt(&s), allowed.join(", ")),
        ))
    }
}

fn http_url(value: Value, field: &str) -> Result<String, Problem> {
    let s = string(value, field)?;
    if s.chars().count() > MAX_URL_CHARS {
        return Err(problem(
            field.to_owned(),
            format!("is longer than {MAX_URL_CHARS} characters"),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(problem(field.to_owned(), "must be a URL without spaces"));
    }
    // The URL parser repairs `https:host`, `https:/host`, `https:///host`
    // and backslashes; the text that goes upstream is the producer's, so it
    // must already be in the plain form.
    let plain = has_authority(&s) && !s.contains('\\');
    match url::Url::parse(&s) {
        Ok(u)
            if plain
                && matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            Ok(s)
        }
        Ok(u) if !matches!(u.scheme(), "http" | "https") => Err(problem(
            field.to_owned(),
            format!(
                "must be an http(s) URL, found scheme {:?}",
                excerpt(u.scheme())
            ),
        )),
        _ => Err(problem(
            field.to_owned(),
            format!("{:?} is not a valid http(s) URL", excerpt(&s)),
        )),
    }
}

/// Whether a URL is written `http://host…` or `https://host…` (the URL
/// parser would repair `https:host`, `https:/host` or `https:///host`, but
/// the text that goes upstream is the producer's).
fn has_authority(s: &str) -> bool {
    let rest = [("https://", 8), ("http://", 7)]
        .into_iter()
        .find(|(p, n)| s.get(..*n).is_some_and(|h| h.eq_ignore_ascii_case(p)))
        .and_then(|(_, n)| s.get(n..));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
}

/// Text with control characters replaced, for names quoted in messages.
pub(crate) fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// Shortens untrusted text for error messages, with control characters
/// replaced (they would forge log lines and terminal output).
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = printable(&s.chars().take(MAX).collect::<String>());
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const IMG: &str = "https://cdn.example/a.png";
    const END: &str = "https://cdn.example/b.jpg";
    /// A 1×1 PNG.
    const PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

    fn parse(model: Model, input: Value) -> Result<Value, String> {
        let Value::Object(map) = input else {
            return Err("not an object".into());
        };
        parse_input(model, map)
            .map(|i| {
                assert_eq!(i.model(), model);
                serde_json::to_value(i).unwrap_or_default()
            })
            .map_err(|(field, message)| format!("{field}: {message}"))
    }

    fn minimal(model: Model) -> Value {
        match model {
            Model::ProI2v | Model::TurboI2v => json!({"images": [IMG]}),
            Model::ProT2v | Model::TurboT2v => json!({"prompt": "a cat on a bike"}),
            Model::ProF2v | Model::TurboF2v => json!({"images": [IMG, END]}),
        }
    }

    fn full(model: Model) -> Value {
        let common =
            json!({"duration": 16, "seed": 2147483647, "resolution": "1080p", "off_peak": true});
        let mut v = match model {
            Model::ProI2v => json!({
                "images": [IMG], "prompt": "p".repeat(1500), "audio": "https://cdn.example/m.mp3",
                "style": "anime", "is_rec": true, "aspect_ratio": "9:16",
                "watermark": true, "wm_url": "https://cdn.example/w.png", "wm_position": "bottom-right"
            }),
            Model::TurboI2v => json!({
                "images": [IMG], "prompt": "p".repeat(5000), "audio": false,
                "audio_type": "speech_only", "is_rec": false
            }),
            Model::ProT2v | Model::TurboT2v => json!({
                "prompt": "p".repeat(model.max_prompt_chars()), "audio": true, "aspect_ratio": "1:1",
                "watermark": true, "wm_url": "https://cdn.example/w.png", "wm_position": 4
            }),
            Model::ProF2v => json!({
                "images": [PNG, END], "prompt": "p".repeat(1500), "audio": true, "is_rec": true,
                "watermark": false, "wm_url": "https://cdn.example/w.png", "wm_position": 1
            }),
            Model::TurboF2v => json!({
                "images": [IMG, PNG], "prompt": "p".repeat(1500), "audio": false, "is_rec": true
            }),
        };
        if let (Value::Object(v), Value::Object(c)) = (&mut v, common) {
            v.extend(c);
        }
        v
    }

    #[test]
    fn every_model_takes_its_minimal_and_its_full_body_unchanged() {
        for model in Model::ALL {
            assert_eq!(parse(model, minimal(model)), Ok(minimal(model)), "{model}");
            assert_eq!(parse(model, full(model)), Ok(full(model)), "{model}");
            // Null is "not given".
            let mut with_null = minimal(model);
            with_null["seed"] = Value::Null;
            assert_eq!(parse(model, with_null), Ok(minimal(model)), "{model}");
        }
    }

    #[test]
    fn names_paths_and_fields_are_the_documented_ones() {
        assert_eq!(Model::names(), "vidu-q3-pro-i2v, vidu-q3-turbo-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v, vidu-q3-pro-f2v, vidu-q3-turbo-f2v");
        for model in Model::ALL {
            assert_eq!(Model::parse(model.as_str()), Some(model));
            assert_eq!(Model::ALL[model.index()], model);
            assert_eq!(model.create_path(), format!("/v3/async/{model}"));
            let json = serde_json::to_string(&model).unwrap_or_default();
            assert_eq!(json, format!("\"{model}\""));
        }
        assert_eq!(Model::parse("vidu-q3-pro"), None);
        assert_eq!(Model::DEFAULT, Model::ProI2v);
    }

    /// Every refusal, per model, with its exact message.
    #[test]
    fn every_model_refuses_what_is_not_its_own() {
        use Model::*;
        let long = |n: usize| "p".repeat(n);
        let table: Vec<(Model, Value, &str)> = vec![
            // Pro image-to-video.
            (ProI2v, json!({}), "input.images: is required for vidu-q3-pro-i2v: exactly one image URL"),
            (ProI2v, json!({"images": [IMG, END]}), "input.images: must hold exactly one image URL, found 2"),
            (ProI2v, json!({"images": IMG}), "input.images: must be an array with exactly one image URL, found a string"),
            (ProI2v, json!({"images": [PNG]}), "input.images[0]: must be an http(s) URL, found scheme \"data\""),
            (ProI2v, json!({"images": ["https://cdn.example/a.gif"]}), "input.images[0]: must point to a .jpg, .jpeg, .png or .webp file"),
            (ProI2v, json!({"images": [IMG], "audio": true}), "input.audio: must be a string, found a boolean"),
            (ProI2v, json!({"images": [IMG], "wm_position": 2}), "input.wm_position: must be a string, found a number"),
            (ProI2v, json!({"images": [IMG], "audio_type": "all"}), "input.audio_type: unknown field \"audio_type\" for vidu-q3-pro-i2v (it is a field of vidu-q3-turbo-i2v)"),
            (ProI2v, json!({"images": [IMG], "prompt": long(1501)}), "input.prompt: is 1501 characters, more than the limit of 1500 for vidu-q3-pro-i2v"),
            (ProI2v, json!({"images": [IMG], "negative_prompt": "x"}), "input.negative_prompt: unknown field \"negative_prompt\" for vidu-q3-pro-i2v"),
            // Turbo image-to-video.
            (TurboI2v, json!({"prompt": "x"}), "input.images: is required for vidu-q3-turbo-i2v: exactly one image URL"),
            (TurboI2v, json!({"images": [IMG], "audio": "https://cdn.example/m.mp3"}), "input.audio: must be true or false, found a string"),
            (TurboI2v, json!({"images": [IMG], "audio_type": "music"}), "input.audio_type: \"music\" is not one of all, speech_only, sound_effect_only"),
            (TurboI2v, json!({"images": [IMG], "style": "anime"}), "input.style: unknown field \"style\" for vidu-q3-turbo-i2v (it is a field of vidu-q3-pro-i2v)"),
            (TurboI2v, json!({"images": [IMG], "watermark": true}), "input.watermark: unknown field \"watermark\" for vidu-q3-turbo-i2v (it is a field of vidu-q3-pro-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v, vidu-q3-pro-f2v)"),
            (TurboI2v, json!({"images": [IMG], "aspect_ratio": "1:1"}), "input.aspect_ratio: unknown field \"aspect_ratio\" for vidu-q3-turbo-i2v (it is a field of vidu-q3-pro-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v)"),
            (TurboI2v, json!({"images": [IMG], "prompt": long(5001)}), "input.prompt: is 5001 characters, more than the limit of 5000 for vidu-q3-turbo-i2v"),
            // Pro text-to-video.
            (ProT2v, json!({}), "input.prompt: is required for vidu-q3-pro-t2v: the text to turn into video"),
            (ProT2v, json!({"prompt": "  "}), "input.prompt: is required for vidu-q3-pro-t2v: the text to turn into video"),
            (ProT2v, json!({"prompt": 5}), "input.prompt: must be a string, found a number"),
            (ProT2v, json!({"prompt": "x", "images": [IMG]}), "input.images: unknown field \"images\" for vidu-q3-pro-t2v (it is a field of vidu-q3-pro-i2v, vidu-q3-turbo-i2v, vidu-q3-pro-f2v, vidu-q3-turbo-f2v)"),
            (ProT2v, json!({"prompt": "x", "wm_position": "top-left"}), "input.wm_position: must be an integer from 1 to 4, found a string"),
            (ProT2v, json!({"prompt": "x", "wm_position": 5}), "input.wm_position: must be an integer from 1 to 4, found 5"),
            (ProT2v, json!({"prompt": "x", "is_rec": true}), "input.is_rec: unknown field \"is_rec\" for vidu-q3-pro-t2v (it is a field of vidu-q3-pro-i2v, vidu-q3-turbo-i2v, vidu-q3-pro-f2v, vidu-q3-turbo-f2v)"),
            (ProT2v, json!({"prompt": long(2001)}), "input.prompt: is 2001 characters, more than the limit of 2000 for vidu-q3-pro-t2v"),
            // Turbo text-to-video.
            (TurboT2v, json!({"duration": 5}), "input.prompt: is required for vidu-q3-turbo-t2v: the text to turn into video"),
            (TurboT2v, json!({"prompt": long(5001)}), "input.prompt: is 5001 characters, more than the limit of 5000 for vidu-q3-turbo-t2v"),
            (TurboT2v, json!({"prompt": "x", "audio": "yes"}), "input.audio: must be true or false, found a string"),
            (TurboT2v, json!({"prompt": "x", "style": "general"}), "input.style: unknown field \"style\" for vidu-q3-turbo-t2v (it is a field of vidu-q3-pro-i2v)"),
            // Pro start-end-frame.
            (ProF2v, json!({}), "input.images: is required for vidu-q3-pro-f2v: two images, the start frame and the end frame"),
            (ProF2v, json!({"images": [IMG]}), "input.images: must hold exactly two images (the start frame and the end frame), found 1"),
            (ProF2v, json!({"images": [IMG, END, IMG]}), "input.images: must hold exactly two images (the start frame and the end frame), found 3"),
            (ProF2v, json!({"images": ["data:image/gif;base64,R0lGODlhAQABAAAAACw=", END]}), "input.images[0]: is a data URI of \"image/gif\"; it must be one of image/png, image/jpeg, image/jpg, image/webp"),
            (ProF2v, json!({"images": [IMG, "data:image/png;base64,@@not base64@@"]}), "input.images[1]: is a data URI whose data is not valid Base64"),
            (ProF2v, json!({"images": [IMG, "data:image/png;base64,"]}), "input.images[1]: is a data URI with no image data"),
            (ProF2v, json!({"images": [IMG, "data:image/png,rawbytes"]}), "input.images[1]: must be a Base64 data URI (data:image/png;base64,…)"),
            (ProF2v, json!({"images": [IMG, "data:image/png;base64"]}), "input.images[1]: is a data URI without data (expected data:image/png;base64,…)"),
            (ProF2v, json!({"images": [IMG, 7]}), "input.images[1]: must be a string, found a number"),
            (ProF2v, json!({"images": [IMG, END], "aspect_ratio": "1:1"}), "input.aspect_ratio: unknown field \"aspect_ratio\" for vidu-q3-pro-f2v (it is a field of vidu-q3-pro-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v)"),
            (ProF2v, json!({"images": [IMG, END], "prompt": long(1501)}), "input.prompt: is 1501 characters, more than the limit of 1500 for vidu-q3-pro-f2v"),
            // Turbo start-end-frame.
            (TurboF2v, json!({"images": [PNG]}), "input.images: must hold exactly two images (the start frame and the end frame), found 1"),
            (TurboF2v, json!({"images": [IMG, END], "watermark": true}), "input.watermark: unknown field \"watermark\" for vidu-q3-turbo-f2v (it is a field of vidu-q3-pro-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v, vidu-q3-pro-f2v)"),
            (TurboF2v, json!({"images": [IMG, END], "wm_position": 1}), "input.wm_position: unknown field \"wm_position\" for vidu-q3-turbo-f2v (it is a field of vidu-q3-pro-i2v, vidu-q3-pro-t2v, vidu-q3-turbo-t2v, vidu-q3-pro-f2v)"),
        ];
        for (model, input, expected) in &table {
            assert_eq!(
                parse(*model, input.clone()),
                Err((*expected).to_owned()),
                "{model} {input}"
            );
        }
        // URLs the URL parser would repair, nulls of foreign fields, and
        // data URIs with trailing space or an upper-case scheme.
        for (model, input, expected) in [
            (ProI2v, json!({"images": ["https:cdn.example/a.png"]}), "input.images[0]: \"https:cdn.example/a.png\" is not a valid http(s) URL"),
            (ProI2v, json!({"images": ["https:/cdn.example/a.png"]}), "input.images[0]: \"https:/cdn.example/a.png\" is not a valid http(s) URL"),
            (ProI2v, json!({"images": ["https:///cdn.example/a.png"]}), "input.images[0]: \"https:///cdn.example/a.png\" is not a valid http(s) URL"),
            (ProI2v, json!({"images": ["https://cdn.example\\a.png"]}), "input.images[0]: \"https://cdn.example\\\\a.png\" is not a valid http(s) URL"),
            (ProI2v, json!({"images": [IMG], "audio_type": null}), "input.audio_type: unknown field \"audio_type\" for vidu-q3-pro-i2v (it is a field of vidu-q3-turbo-i2v)"),
            (ProF2v, json!({"images": [IMG, format!("{PNG}\n")]}), "input.images[1]: is a data URI whose data is not valid Base64"),
        ] {
            assert_eq!(parse(model, input.clone()), Err(expected.to_owned()), "{input}");
        }
        assert!(parse(
            ProF2v,
            json!({"images": [IMG, PNG.replacen("data:", "DATA:", 1)]})
        )
        .is_ok());
        assert!(parse(ProI2v, json!({"images": ["HTTPS://cdn.example/a.png"]})).is_ok());
        // The shared limits, for every model.
        for model in Model::ALL {
            for (field, value, expected) in [
                (
                    "duration",
                    json!(0),
                    "input.duration: must be an integer from 1 to 16, found 0",
                ),
                (
                    "duration",
                    json!(17),
                    "input.duration: must be an integer from 1 to 16, found 17",
                ),
                (
                    "duration",
                    json!(5.5),
                    "input.duration: must be an integer from 1 to 16, found 5.5",
                ),
                (
                    "seed",
                    json!(-1),
                    "input.seed: must be an integer from 0 to 2147483647, found -1",
                ),
                (
                    "seed",
                    json!(2147483648u64),
                    "input.seed: must be an integer from 0 to 2147483647, found 2147483648",
                ),
                (
                    "resolution",
                    json!("4k"),
                    "input.resolution: \"4k\" is not one of 540p, 720p, 1080p",
                ),
                (
                    "off_peak",
                    json!("yes"),
                    "input.off_peak: must be true or false, found a string",
                ),
            ] {
                let mut input = minimal(model);
                input[field] = value;
                assert_eq!(parse(model, input), Err(expected.to_owned()), "{model}");
            }
        }
    }

    #[test]
    fn image_data_is_never_quoted() {
        let secretish = format!("data:image/tiff;base64,{}", "QUJD".repeat(100));
        let err = parse(Model::ProF2v, json!({"images": [secretish, END]})).expect_err("refused");
        assert!(!err.contains("QUJD"), "{err}");
        let err = parse(
            Model::ProF2v,
            json!({"images": [IMG, "data:image/png;base64,QUJD!!"]}),
        )
        .expect_err("refused");
        assert!(!err.contains("QUJD"), "{err}");
    }
}
