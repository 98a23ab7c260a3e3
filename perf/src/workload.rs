//! Workloads and the I/O pattern generator (offsets, op mix, verify data).

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use strata_engine::Op;

/// bdevperf's workload names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
    Verify,
    Flush,
    Unmap,
    WriteZeroes,
}

impl Workload {
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    /// Whether the workload writes (and so needs a writable node).
    pub fn writes(self) -> bool {
        !matches!(self, Workload::Read | Workload::RandRead | Workload::Flush)
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::Flush => "flush",
            Workload::Unmap => "unmap",
            Workload::WriteZeroes => "write_zeroes",
        }
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Workload::Read,
            "write" => Workload::Write,
            "randread" => Workload::RandRead,
            "randwrite" => Workload::RandWrite,
            "rw" => Workload::Rw,
            "randrw" => Workload::RandRw,
            "verify" => Workload::Verify,
            "flush" => Workload::Flush,
            "unmap" => Workload::Unmap,
            "write_zeroes" => Workload::WriteZeroes,
            _ => {
                return Err(format!(
                    "unknown workload '{s}': use read, write, randread, randwrite, rw, randrw, verify, flush, unmap or write_zeroes"
                ));
            }
        })
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// xorshift64*: fast, good enough for offsets, and reproducible from a seed.
#[derive(Debug)]
pub struct Rng(Cell<u64>);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point).
        Rng(Cell::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1))
    }

    #[inline]
    pub fn next(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (no division).
    #[inline]
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Chooses the op and offset of each I/O of one job.
#[derive(Debug)]
pub struct Generator {
    workload: Workload,
    read_pct: u64,
    io_size: u64,
    base: u64,
    blocks: u64,
    next_block: Cell<u64>,
    rng: Rng,
}

impl Generator {
    /// `blocks` I/O-size blocks starting at byte `base`; sequential jobs start at block
    /// `start`.
    pub fn new(
        workload: Workload,
        read_pct: u64,
        io_size: u64,
        base: u64,
        blocks: u64,
        start: u64,
        seed: u64,
    ) -> Generator {
        Generator {
            workload,
            read_pct,
            io_size,
            base,
            blocks: blocks.max(1),
            next_block: Cell::new(start % blocks.max(1)),
            rng: Rng::new(seed),
        }
    }

    #[inline]
    pub fn next(&self) -> (Op, u64) {
        let block = if self.workload.is_random() {
            self.rng.below(self.blocks)
        } else {
            let b = self.next_block.get();
            self.next_block
                .set(if b + 1 == self.blocks { 0 } else { b + 1 });
            b
        };
        let op = match self.workload {
            Workload::Read | Workload::RandRead => Op::Read,
            Workload::Write | Workload::RandWrite | Workload::Verify => Op::Write,
            Workload::Rw | Workload::RandRw => {
                if self.rng.below(100) < self.read_pct {
                    Op::Read
                } else {
                    Op::Write
                }
            }
            Workload::Flush => Op::Flush,
            Workload::Unmap => Op::Discard,
            Workload::WriteZeroes => Op::WriteZeroes,
        };
        (op, self.base + block * self.io_size)
    }
}

/// Verify data: every 8-byte word is a 64-bit hash of its absolute byte offset, the pass
/// (generation) and the run's seed, so every byte depends on all three: a misplaced,
/// stale (earlier pass or earlier run), lost or torn write is detected and located, even
/// for I/O sizes below 8 bytes.
pub fn fill_pattern(buf: &mut [u8], offset: u64, generation: u64, seed: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = pattern_word(offset + (i as u64) * 8, generation, seed).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// Offset (absolute, in bytes) of the first byte of `buf` that differs from the
/// pattern, if any.
pub fn check_pattern(buf: &[u8], offset: u64, generation: u64, seed: u64) -> Option<u64> {
    for (i, chunk) in buf.chunks(8).enumerate() {
        let at = offset + (i as u64) * 8;
        let want = pattern_word(at, generation, seed).to_le_bytes();
        if let Some(j) = chunk.iter().zip(&want).position(|(a, b)| a != b) {
            return Some(at + j as u64);
        }
    }
    None
}

fn pattern_word(offset: u64, generation: u64, seed: u64) -> u64 {
    mix(offset ^ mix(generation ^ mix(seed)))
}

/// splitmix64's finalizer: a bijective 64-bit mix.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_by_bdevperf_names() {
        for w in [
            "read",
            "write",
            "randread",
            "randwrite",
            "rw",
            "randrw",
            "verify",
            "flush",
            "unmap",
            "write_zeroes",
        ] {
            assert_eq!(w.parse::<Workload>().unwrap().name(), w);
        }
        assert!("reset".parse::<Workload>().is_err());
    }

    #[test]
    fn random_offsets_stay_in_range_and_aligned() {
        let g = Generator::new(Workload::RandRead, 0, 4096, 8192, 100, 0, 7);
        for _ in 0..10_000 {
            let (op, off) = g.next();
            assert_eq!(op, Op::Read);
            assert!((8192..8192 + 100 * 4096).contains(&off) && off % 4096 == 0);
        }
    }

    #[test]
    fn sequential_offsets_wrap() {
        let g = Generator::new(Workload::Write, 0, 512, 0, 3, 1, 0);
        let offs: Vec<u64> = (0..4).map(|_| g.next().1).collect();
        assert_eq!(offs, vec![512, 1024, 0, 512]);
    }

    #[test]
    fn rw_mix_follows_the_read_percentage() {
        let g = Generator::new(Workload::RandRw, 70, 4096, 0, 1000, 0, 1);
        let reads = (0..100_000).filter(|_| g.next().0 == Op::Read).count();
        assert!((68_000..72_000).contains(&reads), "{reads}");
    }

    #[test]
    fn pattern_detects_wrong_offset_generation_and_single_byte() {
        let mut b = vec![0u8; 4096];
        fill_pattern(&mut b, 8192, 3, 9);
        assert_eq!(check_pattern(&b, 8192, 3, 9), None);
        assert!(matches!(check_pattern(&b, 4096, 3, 9), Some(o) if (4096..4104).contains(&o)));
        assert!(check_pattern(&b, 8192, 4, 9).is_some());
        b[100] ^= 1;
        assert_eq!(check_pattern(&b, 8192, 3, 9), Some(8192 + 100));
    }

    #[test]
    fn every_byte_depends_on_generation_and_seed() {
        // Even a 1-byte I/O tells passes and runs apart.
        let byte = |g, s| {
            let mut b = [0u8; 1];
            fill_pattern(&mut b, 4096, g, s);
            b[0]
        };
        let base = byte(1, 7);
        let differs_by_gen = (2..40).any(|g| byte(g, 7) != base);
        let differs_by_seed = (8..40).any(|s| byte(1, s) != base);
        assert!(differs_by_gen && differs_by_seed);
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        fill_pattern(&mut a, 0, 1, 7);
        fill_pattern(&mut b, 0, 2, 7);
        assert!(
            a.iter().zip(&b).filter(|(x, y)| x != y).count() >= 6,
            "a new pass changes the whole word"
        );
    }
}
