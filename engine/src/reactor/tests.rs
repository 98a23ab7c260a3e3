//! Reactor tests on the real ring.

use super::*;
use crate::buffer::Buffer;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The first `n` CPUs this process may use (the tests need two: CI machines have two).
fn cpus(n: usize) -> CpuSet {
    CpuSet::first_allowed(n).unwrap_or_else(|e| panic!("{e}"))
}

fn engine(n: usize, mode: PollMode) -> Engine {
    Engine::start(EngineConfig {
        cores: cpus(n),
        poll_mode: mode,
        pin: false,
        ..Default::default()
    })
    .expect("engine start")
}

/// A scratch directory for one test, removed when dropped.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("strata-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    /// A new read-write file of `len` bytes (zeroes) in the directory.
    fn file(&self, name: &str, len: u64) -> std::fs::File {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(self.0.join(name))
            .unwrap();
        f.set_len(len).unwrap();
        f
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.0.join(name)).unwrap()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

#[test]
fn call_runs_the_closure_on_the_named_reactor() {
    let e = engine(2, PollMode::Hybrid);
    for n in 0..e.reactors() {
        let (idx, name) = e
            .call(n, || {
                (id(), std::thread::current().name().map(String::from))
            })
            .wait()
            .unwrap();
        assert_eq!(idx, n);
        assert_eq!(name.as_deref(), Some(format!("reactor-{n}").as_str()));
    }
}

#[test]
fn spawned_task_awaits_a_ring_timeout_and_replies() {
    for mode in [PollMode::Busy, PollMode::Hybrid, PollMode::Interrupt] {
        let e = engine(1, mode);
        let t0 = Instant::now();
        let res = e
            .spawn(0, || async {
                let (res, _) = ring::timeout(Duration::from_millis(20)).await;
                res
            })
            .wait()
            .unwrap();
        assert_eq!(
            res,
            -libc::ETIME,
            "timeout op completes with ETIME in {mode} mode"
        );
        assert!(t0.elapsed() >= Duration::from_millis(20));
    }
}

#[test]
fn timers_fire_in_deadline_order() {
    let e = engine(1, PollMode::Interrupt);
    let order = e
        .spawn(0, || async {
            let log = Rc::new(RefCell::new(Vec::new()));
            for (i, ms) in [(0, 30u64), (1, 10), (2, 20)] {
                let log = log.clone();
                spawn(async move {
                    sleep(Duration::from_millis(ms)).await;
                    log.borrow_mut().push(i);
                });
            }
            sleep(Duration::from_millis(60)).await;
            log.borrow().clone()
        })
        .wait()
        .unwrap();
    assert_eq!(order, vec![1, 2, 0]);
}

#[test]
fn file_read_and_write_through_the_ring_round_trip() {
    let dir = ScratchDir::new("ring");
    let file = dir.file("f", 1 << 20);
    let fd = file.as_raw_fd();
    let e = engine(1, PollMode::Hybrid);
    let data = e
        .spawn(0, move || async move {
            let fixed = ring::FixedFile::register(fd).expect("register file");
            let (res, _) =
                ring::write_at(fixed.target(), Buffer::from_slice(&[7u8; 4096]), 8192, 0).await;
            assert_eq!(res, 4096);
            let (res, _) = ring::fsync(ring::Target::Fd(fd), true).await;
            assert_eq!(res, 0);
            let (res, buf) = ring::read_at(ring::Target::Fd(fd), Buffer::new(4096), 8192).await;
            assert_eq!(res, 4096);
            buf.to_vec()
        })
        .wait()
        .unwrap();
    assert!(data.iter().all(|&b| b == 7));
    drop(file);
}

#[test]
fn dropping_a_future_in_flight_keeps_its_buffer_until_completion() {
    let e = engine(1, PollMode::Hybrid);
    let inflight_after = e
        .spawn(0, || async {
            // A read from a pipe that never gets data: in flight until cancelled.
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two descriptors into the array we own.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            let op = ring::read_at(ring::Target::Fd(fds[0]), Buffer::new(4096), 0);
            yield_now().await;
            let before = stats().inflight;
            drop(op); // abandoned: the slot now owns the buffer
            (before, stats().inflight, fds)
        })
        .wait()
        .unwrap();
    let (before, after, fds) = inflight_after;
    assert_eq!(before, 1);
    assert_eq!(
        after, 1,
        "the abandoned read stays in flight, owned by the ring"
    );
    // Shutdown must cancel the read and reap it before freeing the ring (no hang).
    e.shutdown();
    // SAFETY: closing the pipe descriptors we created.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

#[test]
fn messages_between_reactors_and_cross_thread_wakes_work() {
    let e = engine(2, PollMode::Hybrid);
    // Reactor 0 asks reactor 1 for its id and awaits the reply (a cross-reactor wake).
    let got = e
        .spawn(0, || async { call(1, id).await.unwrap() })
        .wait()
        .unwrap();
    assert_eq!(got, 1);
    // A plain thread completes a reply a task awaits.
    let (tx, rx) = reply_pair::<u32>();
    let waiting = e.spawn(0, move || async move { rx.await.unwrap() + 1 });
    std::thread::sleep(Duration::from_millis(20));
    tx.send(41);
    assert_eq!(waiting.wait().unwrap(), 42);
}

#[test]
fn a_full_inbox_delays_messages_but_never_loses_them() {
    let e = Engine::start(EngineConfig {
        cores: cpus(2),
        inbox_capacity: 4,
        pin: false,
        ..Default::default()
    })
    .unwrap();
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    // Reactor 0 floods reactor 1 with far more messages than its inbox holds.
    let sent = e
        .spawn(0, || async {
            for _ in 0..10_000 {
                send(
                    1,
                    Message::Run(Box::new(|| {
                        COUNT.fetch_add(1, Ordering::Relaxed);
                    })),
                );
            }
            10_000
        })
        .wait()
        .unwrap();
    // And a plain thread floods it too (it waits for room instead of parking).
    for _ in 0..1000 {
        e.send(
            1,
            Message::Run(Box::new(|| {
                COUNT.fetch_add(1, Ordering::Relaxed);
            })),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while COUNT.load(Ordering::Relaxed) < sent + 1000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(COUNT.load(Ordering::Relaxed), sent + 1000);
}

#[test]
fn a_panicking_task_ends_alone_and_the_reactor_keeps_serving() {
    let e = engine(1, PollMode::Hybrid);
    let r = e.spawn(0, || async { panic!("deliberate test panic") });
    assert_eq!(r.wait().unwrap_err(), Canceled);
    assert_eq!(e.call(0, || 5).wait().unwrap(), 5);
}

fn process_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn idle_hybrid_engine_uses_almost_no_cpu() {
    let e = engine(2, PollMode::Hybrid);
    std::thread::sleep(Duration::from_millis(100)); // let the reactors settle into sleep
    let before = process_cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = process_cpu_time() - before;
    // Two busy reactors would burn ~2 s here. Allow scheduler noise and other tests
    // running in this process, but far below one core.
    assert!(
        used < Duration::from_millis(200),
        "idle engine used {used:?} of CPU in 1 s"
    );
    // And it still answers promptly after sleeping.
    assert_eq!(
        e.call(1, id).wait_timeout(Duration::from_secs(2)).unwrap(),
        1
    );
}

#[test]
fn registered_buffers_read_and_write_and_return_to_their_set() {
    let dir = ScratchDir::new("fixed");
    let file = dir.file("f", 1 << 16);
    let fd = file.as_raw_fd();
    let e = engine(1, PollMode::Hybrid);
    let ok = e
        .spawn(0, move || async move {
            let set = ring::FixedBuffers::new(2, 4096).expect("register buffers");
            let mut w = set.get().unwrap();
            w.fill(0x5a);
            let (res, w) = ring::write_fixed(ring::Target::Fd(fd), w, 4096, 0).await;
            assert_eq!(res, 4096);
            drop(w);
            let r = set.get().unwrap();
            let (res, r) = ring::read_fixed(ring::Target::Fd(fd), r, 4096).await;
            assert_eq!(res, 4096);
            let all = r.iter().all(|&b| b == 0x5a);
            drop(r);
            // Both buffers are back: two can be lent again, a third cannot.
            let (a, b) = (set.get(), set.get());
            all && a.is_some() && b.is_some() && set.get().is_none()
        })
        .wait()
        .unwrap();
    assert!(ok);
    drop(file);
}

#[test]
fn a_queued_op_on_a_dropped_fixed_file_never_reaches_the_next_file_in_its_slot() {
    let dir = ScratchDir::new("fixed-reuse");
    let (a, b) = (dir.file("a", 8192), dir.file("b", 8192));
    let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
    let e = engine(1, PollMode::Hybrid);
    let res = e
        .spawn(0, move || async move {
            let fixed_a = ring::FixedFile::register(fa).unwrap();
            // Queued, not yet submitted: the loop submits at the end of the iteration.
            let op = ring::write_at(fixed_a.target(), Buffer::from_slice(&[0xa5; 4096]), 0, 0);
            drop(fixed_a);
            let fixed_b = ring::FixedFile::register(fb).unwrap();
            let (res, _) = op.await;
            drop(fixed_b);
            res
        })
        .wait()
        .unwrap();
    assert_eq!(res, 4096);
    let read = |name: &str| dir.read(name);
    assert!(
        read("a")[..4096].iter().all(|&x| x == 0xa5),
        "the write went to the file it named"
    );
    assert!(
        read("b").iter().all(|&x| x == 0),
        "the file registered next in the slot is untouched"
    );
}

/// Resources whose destructor uses the ring (as a file closing itself would).
struct UsesRingOnDrop(Rc<Cell<bool>>);

impl Drop for UsesRingOnDrop {
    fn drop(&mut self) {
        let _ = stats(); // borrows the ring
        ring::submit_now();
        self.0.set(true);
    }
}

#[test]
fn destructors_of_abandoned_ops_may_use_the_ring() {
    let e = engine(1, PollMode::Hybrid);
    let dropped = e
        .spawn(0, || async {
            let flag = Rc::new(Cell::new(false));
            let entry = io_uring::opcode::Nop::new().build();
            // SAFETY: a nop carries no pointers.
            let op = unsafe { ring::RingOp::start(entry, UsesRingOnDrop(flag.clone())) };
            drop(op); // abandoned; its completion arrives in a later reap
            let deadline = Instant::now() + Duration::from_secs(5);
            while !flag.get() && Instant::now() < deadline {
                yield_now().await;
            }
            flag.get()
        })
        .wait()
        .unwrap();
    assert!(
        dropped,
        "the abandoned op's resources were dropped after its completion"
    );
    assert_eq!(e.call(0, || 7).wait().unwrap(), 7, "the reactor survived");
}

#[test]
fn a_panicking_destructor_does_not_take_the_reactor_down() {
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("deliberate panic in a destructor");
        }
    }
    let e = engine(1, PollMode::Hybrid);
    let _ = e
        .spawn(0, || async {
            let bomb = Bomb;
            yield_now().await;
            drop(bomb);
        })
        .wait();
    assert_eq!(
        e.call(0, || 9)
            .wait_timeout(Duration::from_secs(5))
            .unwrap(),
        9
    );
}

#[test]
fn a_stopped_reactor_cancels_requests_instead_of_hanging() {
    let e = engine(2, PollMode::Hybrid);
    e.send(1, Message::Stop);
    std::thread::sleep(Duration::from_millis(100));
    let r = e.call(1, || 1).wait_timeout(Duration::from_secs(5));
    assert!(
        matches!(r, Err(Some(Canceled))),
        "a request to a stopped reactor is canceled"
    );
    assert_eq!(
        e.call(0, || 2).wait().unwrap(),
        2,
        "the other reactor still serves"
    );
}

#[test]
fn a_coalescing_interrupt_reactor_runs_io_timers_and_messages_and_sleeps_when_idle() {
    let e = Engine::start(EngineConfig {
        cores: cpus(2),
        poll_mode: PollMode::Interrupt,
        coalesce: Duration::from_micros(200),
        pin: false,
        ..Default::default()
    })
    .expect("engine start");
    // A busy stream of ring ops and cross-reactor messages goes through the windows.
    let done = e
        .spawn(0, || async {
            let mut n = 0;
            for _ in 0..500 {
                let (res, _) = crate::reactor::ring::timeout(Duration::from_micros(10)).await;
                assert_eq!(res, -libc::ETIME);
                n += call(1, id).await.unwrap();
            }
            n
        })
        .wait_timeout(Duration::from_secs(30))
        .expect("the stream finishes");
    assert_eq!(done, 500);
    // A timer due inside a window fires in time (the window is cut short for it).
    let start = std::time::Instant::now();
    e.spawn(0, || crate::reactor::sleep(Duration::from_millis(5)))
        .wait_timeout(Duration::from_secs(5))
        .expect("the timer fires");
    assert!(start.elapsed() >= Duration::from_millis(5));
    // And once idle it sleeps instead of opening windows.
    std::thread::sleep(Duration::from_millis(100));
    let before = process_cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = process_cpu_time() - before;
    assert!(
        used < Duration::from_millis(200),
        "idle coalescing engine used {used:?} of CPU in 1 s"
    );
}
