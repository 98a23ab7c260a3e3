//! Measures what registered files and registered buffers buy on this machine: 4 KiB
//! random reads at queue depth 32 on one reactor, straight on the ring (no driver), in
//! four variants. Used to decide which ring features the file driver uses.
//!
//! ```text
//! cargo run --release -p strata-perf --example ring_features -- FILE [SECONDS] [direct]
//! ```
//! FILE should be on tmpfs (/dev/shm) for a page-cache measurement, or on a real
//! filesystem with `direct` for O_DIRECT.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::rc::Rc;
use std::time::{Duration, Instant};
use strata_engine::reactor::{self, ring};
use strata_engine::{Buffer, CpuSet, Engine, EngineConfig};

const QD: usize = 32;
const BS: usize = 4096;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: ring_features FILE [SECONDS] [direct]");
    let secs: f64 = args
        .next()
        .map(|s| s.parse().expect("seconds"))
        .unwrap_or(3.0);
    let direct = args.next().as_deref() == Some("direct");
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts.open(&path).expect("open FILE");
    let blocks = file.metadata().unwrap().len() / BS as u64;
    assert!(blocks > 0, "FILE must be at least 4 KiB");
    let fd = file.as_raw_fd();
    let cpu = *CpuSet::allowed().cpus().last().unwrap();
    let engine = Engine::start(EngineConfig {
        cores: CpuSet::from_cpus([cpu]),
        ..Default::default()
    })
    .unwrap();
    for (fixed_file, fixed_buf) in [(false, false), (true, false), (false, true), (true, true)] {
        let iops = engine
            .spawn(0, move || {
                run(
                    fd,
                    blocks,
                    fixed_file,
                    fixed_buf,
                    Duration::from_secs_f64(secs),
                )
            })
            .wait()
            .unwrap();
        println!(
            "registered file: {fixed_file:5}  registered buffers: {fixed_buf:5}  {iops:>12.0} IOPS"
        );
    }
}

async fn run(fd: i32, blocks: u64, fixed_file: bool, fixed_buf: bool, time: Duration) -> f64 {
    let registered = fixed_file.then(|| ring::FixedFile::register(fd).expect("register file"));
    let target = registered
        .as_ref()
        .map_or(ring::Target::Fd(fd), |f| f.target());
    let set = fixed_buf.then(|| ring::FixedBuffers::new(QD, BS).expect("register buffers"));
    let count = Rc::new(Cell::new(0u64));
    let deadline = Instant::now() + time;
    let start = Instant::now();
    let workers: Vec<_> = (0..QD as u64)
        .map(|w| {
            let count = count.clone();
            let set = set.clone();
            reactor::spawn_with_reply(async move {
                let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut plain = Some(Buffer::new(BS));
                let mut fixed = set
                    .as_ref()
                    .map(|s| s.get().expect("one buffer per worker"));
                while Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % blocks) * BS as u64;
                    let res = if let Some(b) = fixed.take() {
                        let (res, b) = ring::read_fixed(target, b, off).await;
                        fixed = Some(b);
                        res
                    } else {
                        let (res, b) = ring::read_at(target, plain.take().unwrap(), off).await;
                        plain = Some(b);
                        res
                    };
                    assert_eq!(res, BS as i32, "read failed: {res}");
                    count.set(count.get() + 1);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    count.get() as f64 / start.elapsed().as_secs_f64()
}
