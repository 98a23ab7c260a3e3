//! Image locking that interoperates with QEMU (`block/file-posix.c`,
//! `raw_handle_perm_lock`): a `file` node advertises the permissions it holds and the
//! ones it refuses to share as byte-range locks on the image, so QEMU, `qemu-img` and
//! other Strata processes (or other nodes of this one) see each other.
//!
//! ```text
//!   byte 100 + i   read-locked while this node HOLDS permission bit i
//!   byte 200 + i   read-locked while this node does NOT SHARE permission bit i
//!                  (i: 0 consistent read, 1 write, 2 write unchanged, 3 resize)
//! ```
//!
//! # Who owns what
//!
//! The locks are open file description (OFD) locks, `F_OFD_SETLK` with `F_RDLCK` on one
//! byte each: they belong to the descriptor the node opened (`Host::fd`), not to the
//! process, so two nodes on the same image inside one process conflict exactly as two
//! processes do, and they go away when the descriptor closes (the last queue holding the
//! `Host` is gone) or when the node drops them on close. Only the admin thread takes or
//! drops them, through the graph's permission transaction; the reactors never do.
//!
//! # Protocol (QEMU's, step by step)
//!
//! - **check** (PREPARE; skipped when the permissions only shrink): lock the union of the
//!   old and new bytes, then test with `F_OFD_GETLK`/`F_WRLCK` that nobody else holds
//!   byte 200+i for a bit i we are about to hold (`Failed to get "<perm>" lock`) nor
//!   byte 100+i for a bit i we are about to stop sharing (`Failed to get shared "<perm>"
//!   lock`), each followed by `Is another process using the image [<path>]?`. On failure
//!   the old set is restored. A read lock can be tested this way because a write-lock
//!   test conflicts with any lock held through another description but not with our own.
//! - **commit** (`set_perm`): lock the new set, unlock the rest.
//! - **abort** (`abort_perm`): restore the old set.
//!
//! Byte 0 is libvirt's and bytes 104/204 belonged to the removed `graph-mod` permission:
//! neither is ever touched.
//!
//! # `locking=`
//!
//! `auto` (default) locks if the kernel has OFD locks (probed once, as QEMU does, with
//! `F_OFD_GETLK` on `/dev/null`); `on` locks and fails at open without them (QEMU falls
//! back to process-wide POSIX locks, which any `close` of the file in the process drops;
//! Strata refuses instead); `off` never locks.

use super::options::Locking;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Mutex, OnceLock};
use strata_engine::{Errno, Error, ErrorKind, Perm};

/// QEMU's `RAW_LOCK_PERM_BASE`.
pub(super) const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`.
pub(super) const SHARED_BASE: i64 = 200;

/// A node's image locks: what it has committed and which bytes it holds.
#[derive(Debug)]
pub(super) struct ImageLock {
    /// The image as the user named it (QEMU's `bs->filename`), for the hint.
    path: String,
    enabled: bool,
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug)]
struct State {
    /// Committed permissions (QEMU's `s->perm` / `s->shared_perm`).
    perm: Perm,
    shared: Perm,
    /// Bits whose byte 100+i this description holds.
    locked_perm: Perm,
    /// Bits whose byte 200+i this description holds.
    locked_unshared: Perm,
}

impl ImageLock {
    /// Decides whether the node locks at all. A fresh node holds nothing and shares
    /// everything, as QEMU's after `raw_open`.
    pub fn new(path: &str, mode: Locking) -> Result<ImageLock, Error> {
        let enabled = match mode {
            Locking::Off => false,
            Locking::Auto => ofd_locks_work(),
            Locking::On if ofd_locks_work() => true,
            Locking::On => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "locking=on for '{path}' needs open file description locks \
                         (F_OFD_SETLK), which this kernel does not have: use locking=off"
                    ),
                ));
            }
        };
        Ok(ImageLock {
            path: path.to_string(),
            enabled,
            state: Mutex::new(State {
                perm: Perm::NONE,
                shared: Perm::ALL,
                locked_perm: Perm::NONE,
                locked_unshared: Perm::NONE,
            }),
        })
    }

    /// Whether this node takes locks.
    #[cfg(test)]
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Prepares to hold `perm` and share only `shared` (QEMU's `RAW_PL_PREPARE`).
    pub fn check(&self, fd: BorrowedFd<'_>, perm: Perm, shared: Perm) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        let mut s = self.state();
        if (s.perm | perm) == s.perm && (s.shared & shared) == s.shared {
            // Only shrinking: unlocking at commit cannot conflict with anyone.
            return Ok(());
        }
        let (old_perm, old_unshared) = (s.perm, !s.shared);
        let result =
            apply(&mut s, fd, old_perm | perm, old_unshared | !shared, false).and_then(|()| {
                check_bytes(fd, perm, shared).map_err(|mut e| {
                    e.message.push_str(&format!(
                        "\nIs another process using the image [{}]?",
                        self.path
                    ));
                    e
                })
            });
        if result.is_err() {
            self.restore(&mut s, fd, old_perm, old_unshared);
        }
        result
    }

    /// Commits `perm`/`shared`: holds exactly their bytes (QEMU's `RAW_PL_COMMIT`).
    pub fn commit(&self, fd: BorrowedFd<'_>, perm: Perm, shared: Perm) {
        if !self.enabled {
            return;
        }
        let mut s = self.state();
        self.restore(&mut s, fd, perm, !shared);
        s.perm = perm;
        s.shared = shared;
    }

    /// Goes back to the committed bytes after a `check` (QEMU's `RAW_PL_ABORT`).
    pub fn abort(&self, fd: BorrowedFd<'_>) {
        if !self.enabled {
            return;
        }
        let mut s = self.state();
        let (perm, unshared) = (s.perm, !s.shared);
        self.restore(&mut s, fd, perm, unshared);
    }

    /// Drops every byte (the node is closing; the descriptor may outlive it briefly).
    pub fn release(&self, fd: BorrowedFd<'_>) {
        if !self.enabled {
            return;
        }
        let mut s = self.state();
        self.restore(&mut s, fd, Perm::NONE, Perm::NONE);
        s.perm = Perm::NONE;
        s.shared = Perm::ALL;
    }

    /// Holds exactly the given bytes. Only unlocks or re-takes bytes held before, so it
    /// cannot meaningfully fail; if the kernel says otherwise, say so and go on (QEMU
    /// warns the same way).
    fn restore(&self, s: &mut State, fd: BorrowedFd<'_>, perm: Perm, unshared: Perm) {
        if let Err(e) = apply(s, fd, perm, unshared, true) {
            eprintln!(
                "strata: warning: image locks of '{}' may be stale: {e}",
                self.path
            );
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two pairs of bit sets, consistent after every statement.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Locks the bytes of `perm` (100+i) and `unshared` (200+i) not yet held; with `unlock`,
/// also unlocks the held ones not asked for. QEMU's `raw_apply_lock_bytes`.
fn apply(
    s: &mut State,
    fd: BorrowedFd<'_>,
    perm: Perm,
    unshared: Perm,
    unlock: bool,
) -> Result<(), Error> {
    for (base, want, held) in [
        (PERM_BASE, perm, &mut s.locked_perm),
        (SHARED_BASE, unshared, &mut s.locked_unshared),
    ] {
        for (bit, _, _) in Perm::BITS {
            let byte = base + i64::from(bit.bits().trailing_zeros());
            if want.contains(bit) && !held.contains(bit) {
                set_lock(fd, byte, libc::F_RDLCK).map_err(|e| match e.0 {
                    // QEMU elides these errnos: someone holds a conflicting lock.
                    libc::EAGAIN | libc::EACCES => Error::new(
                        ErrorKind::PermissionConflict,
                        format!("Failed to lock byte {byte}"),
                    ),
                    _ => Error::io(format_args!("Failed to lock byte {byte}"), e),
                })?;
                *held = *held | bit;
            } else if unlock && held.contains(bit) && !want.contains(bit) {
                set_lock(fd, byte, libc::F_UNLCK)
                    .map_err(|e| Error::io(format_args!("Failed to unlock byte {byte}"), e))?;
                *held = *held & !bit;
            }
        }
    }
    Ok(())
}

/// Whether anyone else blocks holding `perm` while sharing only `shared`. QEMU's
/// `raw_check_lock_bytes`, with its messages.
fn check_bytes(fd: BorrowedFd<'_>, perm: Perm, shared: Perm) -> Result<(), Error> {
    let test = |byte: i64, what: String| match byte_is_locked(fd, byte) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::new(ErrorKind::PermissionConflict, what)),
        Err(e) => Err(Error::io(what, e)),
    };
    for (bit, name, _) in Perm::BITS {
        if perm.contains(bit) {
            let byte = SHARED_BASE + i64::from(bit.bits().trailing_zeros());
            test(byte, format!("Failed to get \"{name}\" lock"))?;
        }
    }
    for (bit, name, _) in Perm::BITS {
        if !shared.contains(bit) {
            let byte = PERM_BASE + i64::from(bit.bits().trailing_zeros());
            test(byte, format!("Failed to get shared \"{name}\" lock"))?;
        }
    }
    Ok(())
}

/// A one-byte `flock` at `byte` of type `ty`, from the file's start.
fn one_byte(byte: i64, ty: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is plain old data (integers); all-zero is a valid value, and l_pid
    // must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes (`F_RDLCK`) or drops (`F_UNLCK`) the OFD lock on one byte, without waiting.
pub(super) fn set_lock(fd: BorrowedFd<'_>, byte: i64, ty: libc::c_int) -> Result<(), Errno> {
    let fl = one_byte(byte, ty);
    loop {
        // SAFETY: F_OFD_SETLK reads one `flock` through the pointer, which points at `fl`
        // for the whole call; `fd` is a descriptor borrowed for the call.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// Whether a description other than `fd`'s holds any lock on `byte` (QEMU's
/// `qemu_lock_fd_test` with `exclusive`: a write lock would conflict with it).
pub(super) fn byte_is_locked(fd: BorrowedFd<'_>, byte: i64) -> Result<bool, Errno> {
    let mut fl = one_byte(byte, libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and rewrites one `flock` through the pointer, which
    // points at `fl`, ours for the call; `fd` is a descriptor borrowed for the call.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(Errno::last());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether OFD locks work here (QEMU's `qemu_probe_lock_ops`), probed once.
fn ofd_locks_work() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(null) = std::fs::File::open("/dev/null") else {
            return false;
        };
        let fd = std::os::fd::AsFd::as_fd(&null);
        // EINVAL: the kernel does not know F_OFD_GETLK.
        byte_is_locked(fd, 0).is_ok()
    })
}
