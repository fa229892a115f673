//! Errors in OpenAI's JSON shape, with the status codes OpenAI's clients expect:
//! `{"error": {"message", "type", "param", "code"}}`.

use attune_engine::EngineError;
use attune_protocol::ErrorCode;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 400: the request is malformed; `param` names the field at fault.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// 400 for a feature Attune does not offer (rather than ignoring it silently).
    pub fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("unsupported_parameter".into()),
            ..ApiError::invalid(Some(param), message)
        }
    }

    /// 401: no key, or the wrong one.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key".into()),
        }
    }

    /// 404 for a model id the library does not have.
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist in this Attune library (GET /v1/models lists \
                 the base models, adapters and prompt templates it has)."
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found".into()),
        }
    }

    /// 404 for a path the server does not serve.
    pub fn unknown_route(method: &str, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "Unknown request URL: {method} {path}. Attune serves GET /v1/models, \
                 POST /v1/chat/completions and POST /v1/completions."
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url".into()),
        }
    }

    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{method} is not allowed on {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed".into()),
        }
    }

    /// 500 for what went wrong on this side.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("internal".into()),
        }
    }

    /// The JSON body (also sent as a server-sent event when a stream fails).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let code = e.code();
        let (status, kind) = match code {
            ErrorCode::InvalidInput | ErrorCode::InvalidState => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            ErrorCode::NotFound | ErrorCode::ModelMissing => {
                (StatusCode::NOT_FOUND, "invalid_request_error")
            }
            ErrorCode::QueueFull | ErrorCode::Closing => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error")
            }
            // The client went away or stopped it; nobody reads this answer.
            ErrorCode::Cancelled => (
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "server_error",
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        ApiError {
            status,
            message: e.to_string(),
            kind,
            param: None,
            code: Some(code.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
