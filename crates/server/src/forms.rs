//! Request bodies: multipart (what the OpenAI SDKs send) or JSON, read with byte limits and turned
//! into a typed field map. Every field is checked against a table: an unknown field, a wrong type
//! or an out-of-range number is a 400 naming the field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::state::AppState;

/// How a field's value is checked and normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    /// A non-negative integer that fits u32.
    U32,
    /// A non-negative integer that fits a double exactly (seeds).
    U53,
    Float,
    Bool,
    /// A nested object with the listed string keys (or a plain string for its first key).
    Object(&'static [&'static str]),
    /// An uploaded image (multipart file, or `{image_url}` / a data-URL string in JSON).
    Image(&'static [&'static str]),
}

/// A parsed body: typed fields and, at most, one uploaded file.
#[derive(Debug, Default)]
pub struct Form {
    pub fields: Map<String, Value>,
    /// (field name, bytes) of an uploaded file.
    pub file: Option<(String, Vec<u8>)>,
}

impl Form {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }
}

const MAX_TEXT_FIELD: usize = 64 << 10;

/// Reads `req` as multipart or JSON against the field table `spec`.
pub async fn read_form(
    state: &AppState,
    req: Request,
    spec: &[(&str, Kind)],
) -> Result<Form, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut form = if content_type.starts_with("multipart/form-data") {
        read_multipart(state, req, spec).await?
    } else if content_type.starts_with("application/json") || content_type.is_empty() {
        let bytes = Bytes::from_request(req, &()).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(state)
            } else {
                ApiError::invalid(format!(
                    "could not read the request body: {}",
                    e.body_text()
                ))
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(ApiError::invalid("the JSON body must be an object"));
        };
        Form { fields, file: None }
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "Content-Type `{content_type}` is not accepted; send multipart/form-data or \
                 application/json"
            ),
        ));
    };
    form.fields = normalise(std::mem::take(&mut form.fields), spec)?;
    Ok(form)
}

fn too_large(state: &AppState) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!(
            "the request body is larger than limits.max_body_bytes = {} bytes",
            state.config.limits.max_body_bytes
        ),
    )
}

fn multipart_error(state: &AppState, e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(state)
    } else {
        ApiError::invalid(format!("malformed multipart body: {}", e.body_text()))
    }
}

async fn read_multipart(
    state: &AppState,
    req: Request,
    spec: &[(&str, Kind)],
) -> Result<Form, ApiError> {
    let mut multipart = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::invalid(format!("malformed multipart body: {}", e.body_text())))?;
    let mut form = Form::default();
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(state, e))?
    {
        let name = field.name().unwrap_or("").to_string();
        if name.is_empty() {
            return Err(ApiError::invalid("multipart: a part has no field name"));
        }
        // `input_reference[image_url]` is how form encoders spell nested keys.
        let (base, sub) = match name.split_once('[') {
            Some((b, rest)) => (b.to_string(), Some(rest.trim_end_matches(']').to_string())),
            None => (name.clone(), None),
        };
        let kind = spec.iter().find(|(k, _)| *k == base).map(|(_, kind)| *kind);
        let is_file = field.file_name().is_some();
        if is_file && sub.is_none() && matches!(kind, Some(Kind::Image(_))) {
            if form.file.is_some() {
                return Err(ApiError::invalid(format!(
                    "{base}: only one file may be uploaded"
                )));
            }
            let max = state.config.limits.max_upload_bytes;
            let mut bytes = Vec::new();
            // Count what actually arrives: a Content-Length header can lie.
            while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(state, e))? {
                if bytes.len() + chunk.len() > max {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "invalid_request_error",
                        format!(
                            "{base}: the file is larger than limits.max_upload_bytes = {max} bytes"
                        ),
                    )
                    .with_param(&base));
                }
                bytes.extend_from_slice(&chunk);
            }
            form.file = Some((base, bytes));
            continue;
        }
        let mut text = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(state, e))? {
            if text.len() + chunk.len() > MAX_TEXT_FIELD {
                return Err(ApiError::invalid(format!(
                    "{name}: longer than {MAX_TEXT_FIELD} bytes"
                )));
            }
            text.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(text)
            .map_err(|_| ApiError::invalid(format!("{name}: not valid UTF-8 text")))?;
        let slot = match sub {
            None => {
                if form.fields.contains_key(&base) {
                    return Err(ApiError::invalid(format!("{base}: given more than once")));
                }
                form.fields.insert(base, Value::String(text));
                continue;
            }
            Some(sub) => (base, sub),
        };
        let entry = form
            .fields
            .entry(slot.0.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(obj) = entry else {
            return Err(ApiError::invalid(format!(
                "{}: given more than once",
                slot.0
            )));
        };
        if obj.insert(slot.1.clone(), Value::String(text)).is_some() {
            return Err(ApiError::invalid(format!(
                "{}[{}]: given more than once",
                slot.0, slot.1
            )));
        }
    }
    Ok(form)
}

impl ApiError {
    pub fn with_param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_string());
        self
    }
}

/// Checks every field against `spec`, converting strings (multipart, or OpenAI's `"seconds": "4"`)
/// to the field's type. `null` means absent.
pub fn normalise(
    fields: Map<String, Value>,
    spec: &[(&str, Kind)],
) -> Result<Map<String, Value>, ApiError> {
    let mut out = Map::new();
    for (key, value) in fields {
        let Some(&(_, kind)) = spec.iter().find(|(k, _)| *k == key) else {
            let valid: Vec<&str> = spec.iter().map(|(k, _)| *k).collect();
            return Err(ApiError::invalid(format!(
                "{key}: unknown field; valid fields: {}",
                valid.join(", ")
            ))
            .code("unknown_parameter"));
        };
        if value.is_null() {
            continue;
        }
        out.insert(key.clone(), coerce(&key, kind, value)?);
    }
    Ok(out)
}

fn coerce(key: &str, kind: Kind, value: Value) -> Result<Value, ApiError> {
    let shown = |v: &Value| {
        let s = v.to_string();
        if s.chars().count() > 40 {
            format!("{}…", s.chars().take(40).collect::<String>())
        } else {
            s
        }
    };
    match kind {
        Kind::Str => match value {
            Value::String(s) => Ok(Value::String(s)),
            other => Err(ApiError::invalid(format!(
                "{key}: expected a string, got {}",
                shown(&other)
            ))),
        },
        Kind::U32 | Kind::U53 => {
            let max: u64 = if kind == Kind::U32 {
                u64::from(u32::MAX)
            } else {
                (1 << 53) - 1
            };
            let n = match &value {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            };
            match n {
                Some(n) if n <= max => Ok(Value::from(n)),
                Some(n) => Err(ApiError::invalid(format!(
                    "{key}: {n} is out of range 0..={max}"
                ))),
                None => Err(ApiError::invalid(format!(
                    "{key}: expected a non-negative integer, got {}",
                    shown(&value)
                ))),
            }
        }
        Kind::Float => {
            let f = match &value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match f {
                Some(f) if f.is_finite() => Ok(Value::from(f)),
                _ => Err(ApiError::invalid(format!(
                    "{key}: expected a number, got {}",
                    shown(&value)
                ))),
            }
        }
        Kind::Bool => match &value {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            Value::String(s) if s == "true" || s == "1" => Ok(Value::Bool(true)),
            Value::String(s) if s == "false" || s == "0" => Ok(Value::Bool(false)),
            _ => Err(ApiError::invalid(format!(
                "{key}: expected true or false, got {}",
                shown(&value)
            ))),
        },
        Kind::Object(keys) | Kind::Image(keys) => match value {
            Value::String(s) => Ok(serde_json::json!({ keys[0]: s })),
            Value::Object(obj) => {
                for (k, v) in &obj {
                    if !keys.contains(&k.as_str()) {
                        return Err(ApiError::invalid(format!(
                            "{key}.{k}: unknown field; valid: {}",
                            keys.join(", ")
                        ))
                        .code("unknown_parameter"));
                    }
                    if !v.is_string() {
                        return Err(ApiError::invalid(format!("{key}.{k}: expected a string")));
                    }
                }
                Ok(Value::Object(obj))
            }
            other => Err(ApiError::invalid(format!(
                "{key}: expected an object, got {}",
                shown(&other)
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SPEC: &[(&str, Kind)] = &[
        ("prompt", Kind::Str),
        ("seconds", Kind::Float),
        ("steps", Kind::U32),
        ("seed", Kind::U53),
        ("align_frames", Kind::Bool),
        ("input_reference", Kind::Image(&["image_url", "file_id"])),
    ];

    fn norm(v: Value) -> Result<Map<String, Value>, ApiError> {
        normalise(v.as_object().unwrap().clone(), SPEC)
    }

    #[test]
    fn strings_become_numbers_and_bad_values_name_the_field() {
        let m = norm(json!({"prompt": "p", "seconds": "4", "steps": "8", "align_frames": "true"}))
            .unwrap();
        assert_eq!(m["seconds"], json!(4.0));
        assert_eq!(m["steps"], json!(8));
        assert_eq!(m["align_frames"], json!(true));
        for (body, field) in [
            (json!({"steps": -1}), "steps"),
            (json!({"steps": 1e12}), "steps"),
            (json!({"steps": 5000000000u64}), "steps"),
            (json!({"seconds": "abc"}), "seconds"),
            (json!({"prompt": 3}), "prompt"),
            (json!({"nope": 1}), "nope"),
            (
                json!({"input_reference": {"url": "x"}}),
                "input_reference.url",
            ),
        ] {
            let err = norm(body.clone()).unwrap_err();
            assert!(err.message.starts_with(field), "{body}: {}", err.message);
        }
    }
}
