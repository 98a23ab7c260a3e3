//! Command errors and the one place that maps them to JSON-RPC codes and QMP classes.
//!
//! | code     | kind                | QMP class       | when                               |
//! |----------|---------------------|-----------------|------------------------------------|
//! | -32700   | ParseError          | GenericError    | the message is not JSON            |
//! | -32600   | InvalidRequest      | GenericError    | not a valid request object         |
//! | -32601   | MethodNotFound      | CommandNotFound | unknown command                    |
//! | -32602   | InvalidParams       | GenericError    | wrong/missing/unknown arguments    |
//! | -32603   | Internal            | GenericError    | a bug in Strata                    |
//! | -19      | NotFound            | GenericError    | no such node/user (ENODEV, as SPDK)|
//! | -16      | Busy                | GenericError    | in use (EBUSY)                     |
//! | -1       | PermissionConflict  | GenericError    | permissions or image locks (EPERM) |
//! | -95      | Unsupported         | GenericError    | not supported (EOPNOTSUPP)         |
//! | -5       | Io                  | GenericError    | I/O or system error (EIO)          |
//!
//! QEMU reports almost everything as `GenericError`; QMP clients match on the class, so
//! Strata does the same and keeps the finer kind in JSON-RPC codes.

use std::fmt;
use strata_engine::{Error, ErrorKind};

/// What kind of failure, for codes and classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
    NotFound,
    Busy,
    PermissionConflict,
    Unsupported,
    Io,
}

impl ErrorCode {
    /// The JSON-RPC 2.0 error code.
    pub fn jsonrpc_code(self) -> i64 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::MethodNotFound => -32601,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::Internal => -32603,
            ErrorCode::NotFound => -19,
            ErrorCode::Busy => -16,
            ErrorCode::PermissionConflict => -1,
            ErrorCode::Unsupported => -95,
            ErrorCode::Io => -5,
        }
    }

    /// The QMP error class.
    pub fn qmp_class(self) -> &'static str {
        match self {
            ErrorCode::MethodNotFound => "CommandNotFound",
            _ => "GenericError",
        }
    }
}

/// A failed command: a code and a message for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::InvalidParams, message)
    }
}

impl From<Error> for CommandError {
    fn from(e: Error) -> CommandError {
        let code = match e.kind {
            ErrorKind::InvalidArgument => ErrorCode::InvalidParams,
            ErrorKind::NotFound => ErrorCode::NotFound,
            ErrorKind::Busy => ErrorCode::Busy,
            ErrorKind::PermissionConflict => ErrorCode::PermissionConflict,
            ErrorKind::Unsupported => ErrorCode::Unsupported,
            ErrorKind::Io => ErrorCode::Io,
        };
        CommandError::new(code, e.message)
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommandError {}
