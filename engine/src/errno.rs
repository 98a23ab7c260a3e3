//! Data-path errors: a cheap `Copy` errno value, taken straight from a CQE or chosen by
//! the request checks. The control plane wraps these in its own error type.

use std::fmt;

/// A positive errno value (`EIO`, `EINVAL`, ...). The data path's only error type.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EINTR: Errno = Errno(libc::EINTR);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const ENOTSUP: Errno = Errno(libc::EOPNOTSUPP);
    pub const ECANCELED: Errno = Errno(libc::ECANCELED);
    pub const ESHUTDOWN: Errno = Errno(libc::ESHUTDOWN);

    /// Converts a negative CQE result (`-errno`) into an `Errno`.
    pub fn from_cqe(res: i32) -> Errno {
        debug_assert!(res < 0, "BUG: from_cqe called on a successful result {res}");
        Errno(-res)
    }

    /// The errno of the last failed libc call on this thread.
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }

    /// The symbolic name, for messages and JSON output (`"EINVAL"`).
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::EACCES => "EACCES",
            libc::ENODEV => "ENODEV",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::ENOSYS => "ENOSYS",
            libc::ENOTBLK => "ENOTBLK",
            libc::EFAULT => "EFAULT",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL",
            libc::EFBIG => "EFBIG",
            libc::ENOSPC => "ENOSPC",
            libc::EROFS => "EROFS",
            libc::EOPNOTSUPP => "ENOTSUP",
            libc::ECANCELED => "ECANCELED",
            libc::ESHUTDOWN => "ESHUTDOWN",
            libc::ETIMEDOUT => "ETIMEDOUT",
            _ => "E?",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0);
        // io::Error's Display appends " (os error N)"; keep just the text and our name.
        let text = text.to_string();
        let text = text.split(" (os error").next().unwrap_or(&text);
        write!(f, "{} ({})", text, self.name())
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_error_for_a_person() {
        assert_eq!(Errno::EINVAL.to_string(), "Invalid argument (EINVAL)");
        assert_eq!(Errno::from_cqe(-libc::EIO), Errno::EIO);
        assert_eq!(format!("{:?}", Errno::ENOTSUP), "ENOTSUP(95)");
    }
}
