//! `memory`: a RAM disk (SPDK's malloc bdev), used by tests and benchmarks.
//!
//! Options: `size` (required, QEMU size syntax: `size=64M`), `read-only` (default off: on
//! makes the node refuse writes with `EPERM`).
//!
//! # Sharing without locks, soundly
//!
//! ```text
//!   Memory (node) --Arc<Store>--> MemoryQueue (reactor 0)
//!                            \--> MemoryQueue (reactor 1) ...  all copy concurrently
//! ```
//!
//! Every reactor's queue reads and writes the same bytes at the same time, without a
//! lock: two requests may even overlap (their result is then unspecified, as on a real
//! disk, but never undefined behaviour). Plain memory shared that way would be a data
//! race, so the store is a `Box<[AtomicU64]>` and every access is a `Relaxed` atomic
//! load or store of one 64-bit word, which on x86-64 and arm64 compiles to an ordinary
//! move. Byte `i` of the disk is byte `i % 8` of word `i / 8` in native byte order, so the
//! aligned middle of a request copies word by word and only its unaligned head and tail
//! (at most one word each) need a read-modify-write, done atomically with `fetch_update`
//! so bytes outside the request are never touched. Ordering between requests is given by
//! their completion (a request completes before its submitter sees the completion), so
//! `Relaxed` is enough: a read submitted after a write completed on *another* reactor sees
//! it because the message that told this reactor about the completion synchronises.
//!
//! The store comes from `alloc_zeroed`, so it costs no time to open and the kernel commits
//! pages only as they are written (like a sparse file), and a size the machine cannot
//! hold is an error at open rather than an abort.
//!
//! # Ops
//!
//! Alignment 1, every op, completing at once ([`IoFuture::ready`], no allocation). FUA
//! and flush are no-ops (RAM is as durable as it gets); write-zeroes and discard both zero
//! the range, so a discarded range reads back as zeroes. Block-status reports the whole
//! range as allocated data: tracking zero ranges would cost every write a bookkeeping
//! step, and nothing above needs it from a RAM disk.

use crate::options;
use schemars::JsonSchema;
use serde::Deserialize;
use std::alloc::{self, Layout};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use strata_engine::graph::Children;
use strata_engine::{
    Driver, DriverInfo, Errno, Error, Extent, ExtentState, IoFuture, Op, OpSet, Queue, Request,
};

/// Largest request: large enough for any client, small enough that one request cannot
/// hold its reactor for long.
const MAX_TRANSFER: u64 = 1 << 30;
const WORD: usize = 8;

/// `memory` options.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MemoryOptions {
    /// Size of the disk in bytes.
    #[serde(deserialize_with = "options::size")]
    #[schemars(schema_with = "options::size_schema")]
    pub size: u64,
    /// QEMU's common `cache.*` options: accepted, and meaningless without a host file.
    #[serde(default)]
    pub cache: options::CacheOptions,
    /// The node refuses writes.
    #[serde(default, deserialize_with = "options::read_only")]
    #[schemars(schema_with = "options::boolean_schema")]
    pub read_only: bool,
}

/// A `memory` node.
#[derive(Debug)]
pub struct Memory {
    opts: MemoryOptions,
    store: Arc<Store>,
}

impl Memory {
    /// Allocates the disk (zeroed). Fails if the size cannot be allocated.
    pub fn new(opts: MemoryOptions) -> Result<Memory, Error> {
        let store = usize::try_from(opts.size)
            .ok()
            .and_then(Store::new)
            .ok_or_else(|| {
                Error::io(
                    format_args!("cannot allocate {} bytes for a memory node", opts.size),
                    Errno::ENOMEM,
                )
            })?;
        Ok(Memory {
            opts,
            store: Arc::new(store),
        })
    }
}

impl Driver for Memory {
    fn driver_name(&self) -> &'static str {
        "memory"
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.opts.size,
            request_alignment: 1,
            max_transfer: MAX_TRANSFER,
            ops: OpSet::all(),
            read_only: self.opts.read_only,
        }
    }

    fn open_queue(&self, _children: &Children) -> Result<Box<dyn Queue>, Errno> {
        Ok(Box::new(MemoryQueue {
            store: self.store.clone(),
        }))
    }
}

/// One reactor's view of the store: nothing per reactor but the reference.
struct MemoryQueue {
    store: Arc<Store>,
}

impl MemoryQueue {
    fn run(&self, req: &mut Request) -> Result<(), Errno> {
        // Handle has checked the request; check again cheaply so that a caller that skips
        // Handle gets an errno rather than a panic.
        let end = req.end().ok_or(Errno::EINVAL)?;
        if end > self.store.len as u64 {
            return Err(Errno::EINVAL);
        }
        // Both fit in usize: they are at most the store's length.
        let (offset, len) = (req.offset as usize, req.len as usize);
        match req.op {
            Op::Read => match req.buf.as_mut() {
                Some(buf) if buf.len() == len => self.store.read(offset, buf),
                _ => return Err(Errno::EINVAL),
            },
            Op::Write => match req.buf.as_ref() {
                Some(buf) if buf.len() == len => self.store.write(offset, buf),
                _ => return Err(Errno::EINVAL),
            },
            Op::WriteZeroes | Op::Discard => self.store.zero(offset, len),
            Op::Flush => {}
            Op::BlockStatus => {
                let state = ExtentState {
                    allocated: true,
                    zero: false,
                    data: true,
                };
                req.extents.push(Extent {
                    offset: req.offset,
                    len: req.len,
                    state,
                });
            }
        }
        Ok(())
    }
}

impl Queue for MemoryQueue {
    #[inline]
    fn submit(&self, mut req: Request) -> IoFuture {
        let result = self.run(&mut req);
        IoFuture::ready(req, result)
    }
}

/// The disk's bytes as native-endian words (see the module essay).
struct Store {
    words: Box<[AtomicU64]>,
    /// Length in bytes (the last word may be partly unused).
    len: usize,
}

impl Store {
    /// A zeroed store of `len` bytes, or `None` if it cannot be allocated.
    fn new(len: usize) -> Option<Store> {
        let n = len.div_ceil(WORD);
        if n == 0 {
            return Some(Store {
                words: Box::new([]),
                len,
            });
        }
        let layout = Layout::array::<AtomicU64>(n).ok()?;
        // SAFETY: the layout has a non-zero size (n > 0).
        let ptr = unsafe { alloc::alloc_zeroed(layout) }.cast::<AtomicU64>();
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` is a fresh, exclusively owned allocation from the global allocator
        // with the layout of `[AtomicU64; n]`, which is the layout `Box<[AtomicU64]>` frees
        // with; all-zero bytes are a valid `AtomicU64` (value 0).
        let words = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) };
        Some(Store { words, len })
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`. The range is within the store.
    fn read(&self, offset: usize, dst: &mut [u8]) {
        let (head, mid, tail) = split(offset, dst.len());
        let mut word = offset / WORD;
        let (dst_head, rest) = dst.split_at_mut(head);
        if head > 0 {
            let skip = offset % WORD;
            dst_head
                .copy_from_slice(&self.words[word].load(Relaxed).to_ne_bytes()[skip..skip + head]);
            word += 1;
        }
        let (dst_mid, dst_tail) = rest.split_at_mut(mid * WORD);
        for (chunk, w) in dst_mid
            .chunks_exact_mut(WORD)
            .zip(&self.words[word..word + mid])
        {
            chunk.copy_from_slice(&w.load(Relaxed).to_ne_bytes());
        }
        if tail > 0 {
            dst_tail.copy_from_slice(&self.words[word + mid].load(Relaxed).to_ne_bytes()[..tail]);
        }
    }

    /// Copies `src` to `offset`. The range is within the store.
    fn write(&self, offset: usize, src: &[u8]) {
        let (head, mid, tail) = split(offset, src.len());
        let mut word = offset / WORD;
        let (src_head, rest) = src.split_at(head);
        if head > 0 {
            self.merge(word, offset % WORD, src_head);
            word += 1;
        }
        let (src_mid, src_tail) = rest.split_at(mid * WORD);
        for (chunk, w) in src_mid
            .chunks_exact(WORD)
            .zip(&self.words[word..word + mid])
        {
            let bytes: [u8; WORD] = chunk
                .try_into()
                .expect("BUG: chunks_exact yields whole words");
            w.store(u64::from_ne_bytes(bytes), Relaxed);
        }
        if tail > 0 {
            self.merge(word + mid, 0, src_tail);
        }
    }

    /// Zeroes `len` bytes at `offset`. The range is within the store.
    fn zero(&self, offset: usize, len: usize) {
        const ZEROES: [u8; WORD] = [0; WORD];
        let (head, mid, tail) = split(offset, len);
        let mut word = offset / WORD;
        if head > 0 {
            self.merge(word, offset % WORD, &ZEROES[..head]);
            word += 1;
        }
        for w in &self.words[word..word + mid] {
            w.store(0, Relaxed);
        }
        if tail > 0 {
            self.merge(word + mid, 0, &ZEROES[..tail]);
        }
    }

    /// Replaces bytes `at..at + src.len()` of word `word`, atomically, leaving the others.
    fn merge(&self, word: usize, at: usize, src: &[u8]) {
        let _ = self.words[word].fetch_update(Relaxed, Relaxed, |old| {
            let mut bytes = old.to_ne_bytes();
            bytes[at..at + src.len()].copy_from_slice(src);
            Some(u64::from_ne_bytes(bytes))
        });
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the contents: a node's Debug output must stay readable at any size.
        f.debug_struct("Store")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Splits the byte range `offset..offset + len` into a head (bytes before the first word
/// boundary, if the range starts inside a word), whole words, and a tail (bytes after the
/// last whole word). Returns `(head bytes, words, tail bytes)`.
fn split(offset: usize, len: usize) -> (usize, usize, usize) {
    let head = match offset % WORD {
        0 => 0,
        skip => (WORD - skip).min(len),
    };
    let rest = len - head;
    (head, rest / WORD, rest % WORD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, Expect};

    fn memory(size: u64) -> Memory {
        Memory::new(MemoryOptions {
            size,
            read_only: false,
            cache: Default::default(),
        })
        .expect("memory node")
    }

    #[test]
    fn memory_passes_the_conformance_suite() {
        let read_only = || -> Arc<dyn Driver> {
            Arc::new(
                Memory::new(MemoryOptions {
                    size: conformance::MIN_SIZE,
                    read_only: true,
                    cache: Default::default(),
                })
                .expect("memory node"),
            )
        };
        conformance::run(
            "memory",
            &|| Arc::new(memory(conformance::MIN_SIZE)),
            Expect::stores_data().read_only(&read_only),
        );
    }

    #[test]
    fn read_only_is_an_option_and_defaults_to_off() {
        assert!(!memory(4096).info().read_only);
        let node = crate::open_keyval("driver=memory,size=4k,read-only=on").expect("open");
        assert!(node.info().read_only);
        let e = crate::open_keyval("driver=memory,size=4k,read-only=2").unwrap_err();
        assert!(e.message.contains("read-only"), "{e}");
    }

    #[test]
    fn split_covers_every_byte_once() {
        for offset in 0..24 {
            for len in 0..40 {
                let (head, mid, tail) = split(offset, len);
                assert_eq!(head + mid * WORD + tail, len, "offset {offset} len {len}");
                assert!(head < WORD && tail < WORD);
                if mid > 0 || tail > 0 {
                    assert_eq!((offset + head) % WORD, 0, "words start on a boundary");
                }
            }
        }
    }

    #[test]
    fn byte_ranges_match_a_plain_model() {
        let store = Store::new(100).unwrap();
        let mut model = vec![0u8; 100];
        let mut seed = 1u32;
        for round in 0..2000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let offset = (seed >> 8) as usize % 100;
            let len = (seed >> 20) as usize % (101 - offset);
            let data: Vec<u8> = (0..len).map(|i| (round + i) as u8).collect();
            if round % 3 == 0 {
                store.zero(offset, len);
                model[offset..offset + len].fill(0);
            } else {
                store.write(offset, &data);
                model[offset..offset + len].copy_from_slice(&data);
            }
            let mut got = vec![0xee; len];
            store.read(offset, &mut got);
            assert_eq!(got, model[offset..offset + len]);
        }
        let mut all = vec![0; 100];
        store.read(0, &mut all);
        assert_eq!(all, model);
    }

    #[test]
    fn options_parse_from_keyval_and_size_is_required() {
        let node = crate::open_keyval("driver=memory,size=64k").expect("open");
        assert_eq!(node.info().size, 64 << 10);
        assert_eq!(node.driver_name(), "memory");
        let err = crate::open_keyval("driver=memory").unwrap_err();
        assert!(err.message.contains("size"), "{err}");
        let err = crate::open_keyval("driver=memory,size=1M,colour=red").unwrap_err();
        assert!(err.message.contains("colour"), "{err}");
    }

    #[test]
    fn a_size_the_machine_cannot_hold_is_an_error_not_an_abort() {
        let err = Memory::new(MemoryOptions {
            size: 1 << 50,
            read_only: false,
            cache: Default::default(),
        })
        .unwrap_err();
        assert_eq!(err.errno, Some(Errno::ENOMEM), "{err}");
        assert!(err.message.contains("memory node"), "{err}");
    }

    #[test]
    fn empty_disk_is_allowed() {
        assert_eq!(memory(0).info().size, 0);
    }
}
