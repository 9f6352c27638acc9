use thiserror::Error;

/// AMQP reply codes the engine can cause. Soft ones close a channel, hard ones the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    AccessRefused,
    NotFound,
    ResourceLocked,
    PreconditionFailed,
    CommandInvalid,
    NotImplemented,
    InternalError,
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::AccessRefused => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::ResourceLocked => 405,
            ErrorCode::PreconditionFailed => 406,
            ErrorCode::CommandInvalid => 503,
            ErrorCode::NotImplemented => 540,
            ErrorCode::InternalError => 541,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::AccessRefused => "ACCESS_REFUSED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::ResourceLocked => "RESOURCE_LOCKED",
            ErrorCode::PreconditionFailed => "PRECONDITION_FAILED",
            ErrorCode::CommandInvalid => "COMMAND_INVALID",
            ErrorCode::NotImplemented => "NOT_IMPLEMENTED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Whether the error closes the whole connection rather than one channel.
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            ErrorCode::CommandInvalid | ErrorCode::NotImplemented | ErrorCode::InternalError
        )
    }
}

/// An operation the engine refused, with RabbitMQ's wording.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{} - {text}", code.name())]
pub struct EngineError {
    pub code: ErrorCode,
    pub text: String,
}

impl EngineError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        EngineError {
            code,
            text: text.into(),
        }
    }

    pub fn not_found(kind: &str, name: &str, vhost: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            format!("no {kind} '{name}' in vhost '{vhost}'"),
        )
    }

    pub fn precondition(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::PreconditionFailed, text)
    }

    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::AccessRefused, text)
    }
}
