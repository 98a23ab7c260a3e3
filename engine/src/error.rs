//! Control-plane errors: one type with a small matchable kind and a message for a person.
//! The RPC layer maps kinds to JSON-RPC codes and QMP error classes in one place.

use crate::errno::Errno;
use std::fmt;

/// What went wrong, coarsely: enough to choose an error code and to match in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bad option, value or argument.
    InvalidArgument,
    /// A named thing does not exist.
    NotFound,
    /// In use or locked by someone else.
    Busy,
    /// A graph change would give a node users whose permissions conflict.
    PermissionConflict,
    /// Not supported by this driver/kernel/build.
    Unsupported,
    /// An I/O or system error.
    Io,
}

/// A control-plane error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// The errno behind an `Io` error, if any.
    pub errno: Option<Errno>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            errno: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// An error from a system call on `what` (e.g. a file name), keeping its errno.
    pub fn io(what: impl fmt::Display, errno: Errno) -> Error {
        let kind = match errno.0 {
            libc::ENOENT => ErrorKind::NotFound,
            libc::EBUSY | libc::EAGAIN => ErrorKind::Busy,
            libc::EOPNOTSUPP | libc::ENOSYS => ErrorKind::Unsupported,
            libc::EINVAL => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            message: format!("{what}: {errno}"),
            errno: Some(errno),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
