//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<String>,
    pub param: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            retry_after_s: None,
        }
    }

    /// 400, with `param` taken from a `field: ...` message.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        let message = message.into();
        let param = param_of(&message);
        ApiError {
            param,
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn not_found(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("No video found with id '{id}'."),
        )
        .code("not_found")
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    pub fn internal(err: &anyhow::Error) -> ApiError {
        tracing::error!(error = %format!("{err:#}"), "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing the request (see its log).",
        )
    }

    pub fn code(mut self, code: &str) -> ApiError {
        self.code = Some(code.to_string());
        self
    }
}

/// `field` of a message `field: ...` (letters, digits, `_`, `.`, `/`, `[`, `]` only).
fn param_of(message: &str) -> Option<String> {
    let (head, _) = message.split_once(':')?;
    let ok = !head.is_empty()
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./[]".contains(c));
    ok.then(|| head.to_string())
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> ApiError {
        if vidgen_engine::error::is_invalid_input(&err) {
            ApiError::invalid(
                err.chain()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(": "),
            )
        } else {
            ApiError::internal(&err)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_is_the_field_before_the_colon() {
        assert_eq!(
            ApiError::invalid("size: 3x3 is bad").param.as_deref(),
            Some("size")
        );
        assert_eq!(ApiError::invalid("no field here").param, None);
        assert_eq!(ApiError::invalid("a b: c").param, None);
    }
}
