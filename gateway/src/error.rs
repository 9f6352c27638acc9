//! Protocol exceptions: what went wrong, as the client will read it in channel.close or
//! connection.close.

use warren_backends::engine::EngineError;

use crate::codec::DecodeError;

/// AMQP 0-9-1 reply codes Warren sends.
pub mod code {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const NO_ROUTE: u16 = 312;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;

    pub fn name(code: u16) -> &'static str {
        match code {
            200 => "OK",
            312 => "NO_ROUTE",
            320 => "CONNECTION_FORCED",
            403 => "ACCESS_REFUSED",
            404 => "NOT_FOUND",
            405 => "RESOURCE_LOCKED",
            406 => "PRECONDITION_FAILED",
            501 => "FRAME_ERROR",
            502 => "SYNTAX_ERROR",
            503 => "COMMAND_INVALID",
            504 => "CHANNEL_ERROR",
            505 => "UNEXPECTED_FRAME",
            506 => "RESOURCE_ERROR",
            530 => "NOT_ALLOWED",
            540 => "NOT_IMPLEMENTED",
            _ => "INTERNAL_ERROR",
        }
    }
}

/// A protocol exception. `hard` ones close the connection, the others one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    pub code: u16,
    /// The text after RabbitMQ's `NAME - ` prefix.
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
    pub hard: bool,
}

impl Exception {
    pub fn channel(code: u16, text: impl Into<String>) -> Self {
        Exception {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
            hard: false,
        }
    }

    pub fn connection(code: u16, text: impl Into<String>) -> Self {
        Exception {
            hard: true,
            ..Self::channel(code, text)
        }
    }

    /// Names the method that caused it, as close frames do.
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// The reply-text: `NOT_FOUND - no queue 'q' in vhost '/'`.
    pub fn reply_text(&self) -> String {
        let mut text = format!("{} - {}", code::name(self.code), self.text);
        // A short string holds 255 bytes; cut on a character boundary.
        if text.len() > 255 {
            let mut end = 255;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }
}

impl From<EngineError> for Exception {
    fn from(e: EngineError) -> Self {
        let code = e.code.code();
        if e.code.is_hard() {
            Exception::connection(code, e.text)
        } else {
            Exception::channel(code, e.text)
        }
    }
}

impl From<DecodeError> for Exception {
    fn from(e: DecodeError) -> Self {
        // As RabbitMQ answers: a frame it cannot decode, method arguments included, is a
        // FRAME_ERROR ("cannot decode ..."); a well-formed heartbeat on a channel other than 0 is
        // an UNEXPECTED_FRAME.
        let code = match e {
            DecodeError::TooLarge { .. }
            | DecodeError::BadFrameEnd(_)
            | DecodeError::UnknownFrameType(_)
            | DecodeError::BadHeartbeat(_)
            | DecodeError::BadMethod { .. }
            | DecodeError::BadHeader { .. } => code::FRAME_ERROR,
            DecodeError::HeartbeatOnChannel(_) => code::UNEXPECTED_FRAME,
        };
        Exception::connection(code, e.to_string())
    }
}
