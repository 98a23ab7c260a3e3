//! I/O buffers: owned, 4 KiB-aligned memory, pooled per thread.
//!
//! Every [`Buffer`] starts on a [`BUFFER_ALIGN`] boundary and has a capacity that is a
//! multiple of it, so the same buffer serves buffered files, `O_DIRECT` files of any
//! logical block size up to 4 KiB, and memory drivers. A buffer is `Send`: a request may
//! be forwarded to another reactor (a home reactor with shared metadata) and come back.
//!
//! Pooling: buffers up to [`POOL_MAX_CLASS`] bytes are recycled through a free list per
//! power-of-two size class in a thread-local pool. On a reactor thread that pool *is* the
//! reactor's pool; a buffer freed on another reactor simply joins that reactor's pool. The
//! pool keeps at most [`POOL_MAX_BYTES`] per thread; beyond that buffers go back to the
//! allocator. The hot path (allocate, use, drop with the same size) never calls malloc.
//!
//! Ownership with the kernel: a buffer handed to io_uring belongs to the in-flight
//! operation until its completion is reaped (see `reactor::ring`); the ring keeps it alive
//! even if the future that submitted it is dropped.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer: the largest logical block size `O_DIRECT` asks for here.
pub const BUFFER_ALIGN: usize = 4096;
/// Largest capacity that is recycled by the per-thread pool.
pub const POOL_MAX_CLASS: usize = 4 << 20;
/// Most bytes one thread's pool keeps in its free lists.
pub const POOL_MAX_BYTES: usize = 64 << 20;

const NUM_CLASSES: usize = (POOL_MAX_CLASS / BUFFER_ALIGN).trailing_zeros() as usize + 1;

/// An owned, aligned, fixed-capacity byte buffer. Its length can be set up to its
/// capacity; the bytes are initialised (zeroed on first allocation).
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: a Buffer owns its allocation exclusively (like Vec<u8>); moving it to another
// thread moves that ownership, and no other handle to the memory exists outside the
// kernel, which only uses it while the in-flight operation owns the Buffer.
unsafe impl Send for Buffer {}
// SAFETY: &Buffer only permits reads of initialised bytes, like &[u8].
unsafe impl Sync for Buffer {}

impl Buffer {
    /// A buffer of `len` bytes (contents unspecified but initialised: recycled buffers keep
    /// old data; callers that need zeroes use [`Buffer::zeroed`]).
    pub fn new(len: usize) -> Buffer {
        let cap = capacity_for(len);
        let mut buf = POOL
            .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take(cap)))
            .ok()
            .flatten()
            .map(|raw| Buffer {
                ptr: raw.ptr,
                len: 0,
                cap: raw.cap,
            })
            .unwrap_or_else(|| Buffer::alloc(cap));
        buf.len = len;
        buf
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Buffer {
        let mut buf = Buffer::new(len);
        buf.fill(0);
        buf
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Buffer {
        let mut buf = Buffer::new(data.len());
        buf.copy_from_slice(data);
        buf
    }

    fn alloc(cap: usize) -> Buffer {
        let layout = Layout::from_size_align(cap, BUFFER_ALIGN).expect("BUG: buffer layout");
        // SAFETY: layout has a non-zero size (cap >= BUFFER_ALIGN).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Buffer { ptr, len: 0, cap }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length (bytes between `len` and the old length keep their old values).
    ///
    /// Panics if `len` exceeds the capacity: that is a caller bug, never reachable from
    /// outside because requests are checked against the node's limits first.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "BUG: buffer length {len} beyond capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// Pointer for the kernel; valid for `capacity()` bytes while `self` is alive.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

fn capacity_for(len: usize) -> usize {
    let len = len.max(1);
    let cap = if len <= POOL_MAX_CLASS {
        len.next_power_of_two().max(BUFFER_ALIGN)
    } else {
        len.checked_next_multiple_of(BUFFER_ALIGN)
            .unwrap_or(usize::MAX)
    };
    // A request this large is a caller bug (requests are checked against the node's
    // maximum transfer first); fail loudly rather than allocate a wrapped-around size.
    assert!(
        cap >= len && cap <= isize::MAX as usize / 2,
        "BUG: buffer of {len} bytes requested"
    );
    cap
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes (allocated zeroed), and
        // &self forbids concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let raw = RawBuf {
            ptr: self.ptr,
            cap: self.cap,
        };
        let rejected = POOL
            .try_with(|p| match p.try_borrow_mut() {
                Ok(mut pool) => pool.give(raw),
                Err(_) => Some(raw),
            })
            .unwrap_or(Some(raw));
        if let Some(raw) = rejected {
            raw.free();
        }
    }
}

/// A pooled allocation: no destructor of its own (the pool or Buffer frees it).
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

impl RawBuf {
    fn free(self) {
        let layout = Layout::from_size_align(self.cap, BUFFER_ALIGN).expect("BUG: buffer layout");
        // SAFETY: the memory was allocated by Buffer::alloc with this exact layout, and a
        // RawBuf is freed at most once: it is either kept in a pool or freed here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool::new()) };
}

/// Free lists per power-of-two size class, for one thread.
struct Pool {
    classes: [Vec<RawBuf>; NUM_CLASSES],
    bytes: usize,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            classes: [const { Vec::new() }; NUM_CLASSES],
            bytes: 0,
        }
    }

    fn class(cap: usize) -> Option<usize> {
        (cap.is_power_of_two() && (BUFFER_ALIGN..=POOL_MAX_CLASS).contains(&cap))
            .then(|| (cap / BUFFER_ALIGN).trailing_zeros() as usize)
    }

    fn take(&mut self, cap: usize) -> Option<RawBuf> {
        let buf = self.classes[Pool::class(cap)?].pop()?;
        self.bytes -= buf.cap;
        Some(buf)
    }

    /// Keeps `buf` if there is room; hands it back otherwise.
    fn give(&mut self, buf: RawBuf) -> Option<RawBuf> {
        match Pool::class(buf.cap) {
            Some(class) if self.bytes + buf.cap <= POOL_MAX_BYTES => {
                self.bytes += buf.cap;
                self.classes[class].push(buf);
                None
            }
            _ => Some(buf),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Thread exit: the pooled allocations go back to the allocator.
        for class in &mut self.classes {
            class.drain(..).for_each(RawBuf::free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [1, 512, 4096, 4097, 65536, 5 << 20] {
            let b = Buffer::new(len);
            assert_eq!(b.as_ptr() as usize % BUFFER_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len);
        }
    }

    #[test]
    fn dropped_buffer_is_reused_by_the_same_thread() {
        let b = Buffer::new(8192);
        let p = b.as_ptr();
        drop(b);
        let again = Buffer::new(8000);
        assert_eq!(
            again.as_ptr(),
            p,
            "same size class should come from the pool"
        );
    }

    #[test]
    fn zeroed_and_from_slice_hold_the_requested_bytes() {
        let mut b = Buffer::new(4096);
        b.fill(0xaa);
        drop(b);
        assert!(Buffer::zeroed(4096).iter().all(|&x| x == 0));
        assert_eq!(&*Buffer::from_slice(b"abc"), b"abc");
    }

    #[test]
    fn an_absurd_length_panics_instead_of_wrapping() {
        let r = std::panic::catch_unwind(|| Buffer::new(usize::MAX - 100));
        assert!(r.is_err());
    }

    #[test]
    fn buffer_can_move_between_threads() {
        let mut b = Buffer::new(100);
        b.fill(7);
        let b = std::thread::spawn(move || b).join().unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }
}
