//! Opening the host file on the admin thread: `open(2)`, then what the node needs to know
//! about it (kind, size, `O_DIRECT` alignment). Blocking calls are fine here; nothing in
//! this file runs on a reactor.

use super::options::FileOptions;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use strata_engine::buffer::BUFFER_ALIGN;
use strata_engine::{Errno, Error, ErrorKind};

/// `BLKGETSIZE64`: size of a block device in bytes (`_IOR(0x12, 114, size_t)`).
const BLKGETSIZE64: libc::Ioctl = libc::_IOR::<libc::size_t>(0x12, 114);
/// Alignment used with `O_DIRECT` when the kernel does not report one.
const FALLBACK_DIO_ALIGN: u32 = 4096;

/// What the host file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Regular,
    BlockDevice,
}

/// The open host file, shared by the node and all its queues (through an `Arc`): the
/// descriptor closes when the last of them is gone.
#[derive(Debug)]
pub(super) struct Host {
    pub fd: OwnedFd,
    /// Size at open.
    pub size: u64,
    /// Request alignment (1 unless `O_DIRECT`).
    pub align: u32,
    /// Granularity `fallocate` needs: a block device's logical block size (even when
    /// buffered), 1 for a regular file (file systems zero and punch any byte range).
    pub fallocate_align: u32,
    pub direct: bool,
    pub no_flush: bool,
}

impl Host {
    pub fn open(opts: &FileOptions) -> Result<Host, Error> {
        let name = &opts.filename;
        let direct = opts.cache.direct;
        let mut how = OpenOptions::new();
        // std opens with O_CLOEXEC; O_RDWR or O_RDONLY follow from read/write.
        how.read(true).write(!opts.read_only);
        // O_NONBLOCK so opening a FIFO or a terminal cannot hang the admin thread (they are
        // refused just below); cleared again once we know it is a file or a block device.
        let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
        if direct {
            flags |= libc::O_DIRECT;
        }
        how.custom_flags(flags);
        let file = how.open(name).map_err(|e| {
            let mut err = Error::io(format_args!("cannot open '{name}'"), e.into());
            if direct && err.errno == Some(Errno::EINVAL) {
                err.message
                    .push_str(": the file system may not support O_DIRECT (try cache.direct=off)");
            }
            err
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format_args!("cannot stat '{name}'"), e.into()))?;
        let fd = OwnedFd::from(file);
        let raw = fd.as_raw_fd();
        let kind = if meta.file_type().is_file() {
            Kind::Regular
        } else if meta.file_type().is_block_device() {
            Kind::BlockDevice
        } else {
            return Err(Error::invalid(format!(
                "'{name}' is neither a regular file nor a block device"
            )));
        };
        // Blocking mode again: io_uring treats O_NONBLOCK files as never-wait and would
        // fail reads with EAGAIN instead of completing them.
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        let cleared = unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            fl >= 0 && libc::fcntl(raw, libc::F_SETFL, fl & !libc::O_NONBLOCK) == 0
        };
        if !cleared {
            return Err(Error::io(
                format_args!("cannot set up '{name}'"),
                Errno::last(),
            ));
        }
        let size = match kind {
            Kind::Regular => meta.len(),
            Kind::BlockDevice => device_size(raw)
                .map_err(|e| Error::io(format_args!("cannot get the size of '{name}'"), e))?,
        };
        let sector = match kind {
            Kind::Regular => 1,
            Kind::BlockDevice => sector_size(raw).map_err(|e| {
                Error::io(format_args!("cannot get the sector size of '{name}'"), e)
            })?,
        };
        let align = match (direct, kind) {
            (false, _) => 1,
            (true, Kind::BlockDevice) => sector,
            (true, Kind::Regular) => match dio_align(raw) {
                Some((offset, mem)) => {
                    if mem as usize > BUFFER_ALIGN {
                        return Err(Error::new(
                            ErrorKind::Unsupported,
                            format!(
                                "'{name}' needs O_DIRECT buffers aligned to {mem} bytes, but Strata's \
                                 buffers are aligned to {BUFFER_ALIGN}: use cache.direct=off"
                            ),
                        ));
                    }
                    offset.max(mem)
                }
                None => FALLBACK_DIO_ALIGN,
            },
        };
        if let Some(bad) = [align, sector].into_iter().find(|a| !a.is_power_of_two()) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "'{name}' reports an alignment of {bad} bytes, which is not a power of two"
                ),
            ));
        }
        Ok(Host {
            fd,
            size,
            align,
            fallocate_align: sector,
            direct,
            no_flush: opts.cache.no_flush,
        })
    }
}

/// Size of a block device.
fn device_size(fd: RawFd) -> Result<u64, Errno> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 { Err(Errno::last()) } else { Ok(size) }
}

/// Logical block size of a block device.
fn sector_size(fd: RawFd) -> Result<u32, Errno> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size as *mut libc::c_int) };
    if rc < 0 {
        return Err(Errno::last());
    }
    u32::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .ok_or(Errno::EINVAL)
}

/// `O_DIRECT` (offset, memory) alignment of a regular file, if the kernel reports it.
fn dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string, and `stx` is a statx we own for the kernel
    // to fill; AT_EMPTY_PATH makes the call about `fd` itself.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let reported = rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0;
    (reported && stx.stx_dio_offset_align > 0)
        .then_some((stx.stx_dio_offset_align, stx.stx_dio_mem_align.max(1)))
}
