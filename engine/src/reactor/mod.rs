//! Reactors: one pinned thread per core, each owning an io_uring, an executor, timers and
//! an inbox.
//!
//! ```text
//!   Engine::start(cores)           reactor thread (one per core, pinned)
//!   ------------------             -------------------------------------------------
//!   Engine::call(n, closure) ----> inbox (ArrayQueue + eventfd armed in the ring)
//!   Engine::spawn(n, task)         loop {
//!     <- Reply<T> --------------      reap CQEs          -> wake tasks waiting on ops
//!                                     run ready tasks    -> they queue new SQEs
//!                                     handle inbox       -> Run / Wake / Stop
//!                                     expire timers
//!                                     one io_uring_enter for everything queued
//!                                     (busy: never sleep; hybrid: sleep after an idle
//!                                      budget; interrupt: sleep whenever idle)
//!                                  }
//! ```
//!
//! Code running on a reactor reaches it through free functions ([`spawn`], [`sleep`],
//! [`id`], the ops in [`ring`]); they panic with a `BUG:` message when called elsewhere.

mod blocking;
pub mod executor;
mod inbox;
pub mod ring;
mod timer;

pub use blocking::blocking;
pub use executor::{coop, yield_now};
pub use inbox::{Canceled, Message, Replier, Reply, reply_pair};
pub use timer::Sleep;

use crate::cpuset::CpuSet;
use executor::Executor;
use inbox::Inbox;
use ring::Ring;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::task::Waker;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use timer::Timers;

/// How a reactor waits when it has nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Spin forever (SPDK's default): lowest latency, one core at 100% even when idle.
    Busy,
    /// Spin while there is work; after `idle_budget` without any, sleep in
    /// `io_uring_enter` until a completion, a message or a timer.
    Hybrid,
    /// Sleep whenever there is nothing to run. With a `coalesce` window, a loaded reactor
    /// (one whose last sleep was shorter than a quarter of the window) also waits that
    /// long between passes, for as long as each window catches a batch (interrupt
    /// coalescing, as NICs do): a request-response stream (an NBD connection at queue
    /// depth 32) is then handled in batches, one system call per batch instead of per
    /// request. A throughput setting, not a default: measured with fio's nbd engine on a
    /// null-co export (perf/README.md), 30 us took queue depth 32 from 181k to 219-235k
    /// IOPS and server CPU per I/O from 4.3 to 2.3-2.7 us, left queue depth 1 as it was,
    /// and cut queue depth 8 from 185k to 116k IOPS (each window then waits out its
    /// time for a burst that has already arrived).
    Interrupt,
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "busy" => Ok(PollMode::Busy),
            "hybrid" => Ok(PollMode::Hybrid),
            "interrupt" => Ok(PollMode::Interrupt),
            _ => Err(format!(
                "unknown poll mode '{s}': use busy, hybrid or interrupt"
            )),
        }
    }
}

impl fmt::Display for PollMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PollMode::Busy => "busy",
            PollMode::Hybrid => "hybrid",
            PollMode::Interrupt => "interrupt",
        })
    }
}

/// Default hybrid idle budget. Measured on 4 KiB O_DIRECT reads at queue depth 32 (a
/// virtio disk, ~90k IOPS): 10 us kept fio's IOPS with ~20% less CPU than 50 us, whose
/// spinning between completions bought nothing; with work always pending (memory,
/// page cache) the budget never expires and does not matter.
pub const DEFAULT_IDLE_BUDGET_US: u64 = 10;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// CPUs to run a reactor on (one each, pinned), in reactor-index order.
    pub cores: CpuSet,
    pub poll_mode: PollMode,
    /// Hybrid mode: how long a reactor spins without work before it sleeps.
    pub idle_budget: Duration,
    /// Interrupt mode: under load, wait this long (or until [`COALESCE_MAX_EVENTS`]
    /// completions) between passes, so work arriving in the meantime is handled as one
    /// batch. Zero: handle every wake-up at once. See [`PollMode::Interrupt`] for when a
    /// reactor counts as loaded.
    pub coalesce: Duration,
    /// Submission queue entries per ring (the completion queue gets four times as many).
    pub ring_entries: u32,
    /// Messages an inbox holds before senders see it full.
    pub inbox_capacity: usize,
    /// Whether to pin each reactor to its CPU.
    pub pin: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cores: CpuSet::allowed(),
            poll_mode: PollMode::Hybrid,
            idle_budget: Duration::from_micros(DEFAULT_IDLE_BUDGET_US),
            coalesce: Duration::ZERO,
            ring_entries: 1024,
            inbox_capacity: 4096,
            pin: true,
        }
    }
}

// ---- global registry of inboxes (for cross-thread wakes) -----------------------------

/// Inboxes by global reactor id. Only cross-thread wakes look here, never the data path
/// of a reactor talking to itself.
static REGISTRY: RwLock<Vec<Option<Arc<Inbox>>>> = RwLock::new(Vec::new());

fn register_inbox(inbox: Arc<Inbox>) -> u16 {
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = reg.iter().position(Option::is_none) {
        reg[i] = Some(inbox);
        return i as u16;
    }
    assert!(
        reg.len() < usize::from(u16::MAX),
        "BUG: more than 65535 live reactors"
    );
    reg.push(Some(inbox));
    (reg.len() - 1) as u16
}

fn unregister_inbox(gid: u16) {
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    reg[usize::from(gid)] = None;
}

fn registry_inbox(gid: u16) -> Option<Arc<Inbox>> {
    REGISTRY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(usize::from(gid))
        .cloned()
        .flatten()
}

// ---- the per-thread reactor state ------------------------------------------------------

/// Messages parked for full inboxes: target gid -> (its inbox, messages in order).
type Outbox = HashMap<u16, (Arc<Inbox>, VecDeque<Message>)>;

/// What one reactor thread owns.
pub(crate) struct Core {
    index: usize,
    gid: u16,
    engine: Arc<Shared>,
    executor: Executor,
    ring: RefCell<Ring>,
    timers: RefCell<Timers>,
    inbox: Arc<Inbox>,
    /// Messages waiting for room in a full inbox, by target gid.
    outbox: RefCell<Outbox>,
    stop: Cell<bool>,
}

/// What every reactor of one engine shares.
struct Shared {
    inboxes: Vec<Arc<Inbox>>,
    gids: Vec<u16>,
    config: EngineConfig,
}

thread_local! {
    static CORE: RefCell<Option<Rc<Core>>> = const { RefCell::new(None) };
}

pub(crate) fn with_core<R>(f: impl FnOnce(&Core) -> R) -> R {
    CORE.with(|c| {
        f(c.borrow()
            .as_ref()
            .expect("BUG: reactor API used outside a reactor thread"))
    })
}

fn with_ring<R>(f: impl FnOnce(&mut Ring) -> R) -> R {
    with_core(|core| f(&mut core.ring.borrow_mut()))
}

/// Runs `f` on the calling reactor's ring if it can be reached (not during thread exit
/// or while the ring is borrowed).
fn try_with_ring<R>(f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
    CORE.try_with(|c| {
        let c = c.try_borrow().ok()?;
        let core = c.as_ref()?;
        let mut ring = core.ring.try_borrow_mut().ok()?;
        Some(f(&mut ring))
    })
    .ok()
    .flatten()
}

/// Whether the calling thread is a reactor.
pub fn on_reactor() -> bool {
    CORE.try_with(|c| c.try_borrow().map(|c| c.is_some()).unwrap_or(true))
        .unwrap_or(false)
}

fn wake_task(gid: u16, generation: u16, index: u32) {
    let local = CORE
        .try_with(|c| match c.try_borrow() {
            Ok(c) => match c.as_ref() {
                Some(core) if core.gid == gid => {
                    core.executor.schedule(index, generation);
                    true
                }
                _ => false,
            },
            Err(_) => false,
        })
        .unwrap_or(false);
    if !local {
        send_by_gid(gid, Message::Wake { index, generation });
    }
}

/// Delivers `msg` to reactor `gid` following the full-inbox policy (see `inbox`).
fn send_by_gid(gid: u16, msg: Message) {
    let Some(inbox) = registry_inbox(gid) else {
        return;
    };
    deliver(gid, &inbox, msg);
}

fn deliver(gid: u16, inbox: &Arc<Inbox>, msg: Message) {
    if on_reactor() {
        deliver_from_reactor(gid, inbox, msg);
    } else {
        inbox.push_blocking(msg);
    }
}

/// Reactor index (0-based within its engine) of the calling reactor.
pub fn id() -> usize {
    with_core(|c| c.index)
}

/// Number of reactors in the calling reactor's engine.
pub fn count() -> usize {
    with_core(|c| c.engine.inboxes.len())
}

/// Spawns a `!Send` task on the calling reactor.
pub fn spawn(fut: impl Future<Output = ()> + 'static) {
    with_core(|c| c.executor.spawn(fut));
}

/// Spawns a task on the calling reactor and returns a future of its output.
pub fn spawn_with_reply<T: 'static>(fut: impl Future<Output = T> + 'static) -> Reply<T> {
    let (tx, rx) = reply_pair();
    spawn(async move { tx.send(fut.await) });
    rx
}

/// Completes after `d`.
pub fn sleep(d: Duration) -> Sleep {
    Sleep::new(Instant::now() + d)
}

/// Completes at `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep::new(deadline)
}

/// Sends a message to reactor `n` of the calling reactor's engine.
pub fn send(n: usize, msg: Message) {
    let (gid, inbox) = with_core(|c| (c.engine.gids[n], c.engine.inboxes[n].clone()));
    deliver_from_reactor(gid, &inbox, msg);
}

/// Runs `f` on reactor `n` (of the calling reactor's engine); await the reply.
pub fn call<R: Send + 'static>(n: usize, f: impl FnOnce() -> R + Send + 'static) -> Reply<R> {
    let (tx, rx) = reply_pair();
    send(n, Message::Run(Box::new(move || tx.send(f()))));
    rx
}

fn deliver_from_reactor(gid: u16, inbox: &Arc<Inbox>, msg: Message) {
    with_core(|core| {
        let mut outbox = core.outbox.borrow_mut();
        if let Some((_, queue)) = outbox.get_mut(&gid) {
            queue.push_back(msg);
            return;
        }
        if let Err(back) = inbox.try_push(msg) {
            outbox.insert(gid, (inbox.clone(), VecDeque::from([back])));
        }
    });
}

// ---- the engine ------------------------------------------------------------------------

/// A set of running reactors. Dropping it stops them (each drops its tasks and waits for
/// its in-flight I/O).
pub struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("cores", &self.shared.config.cores)
            .field("poll_mode", &self.shared.config.poll_mode)
            .finish()
    }
}

impl Engine {
    /// Starts one reactor per CPU in `config.cores`. Returns once every reactor is ready.
    pub fn start(config: EngineConfig) -> std::io::Result<Engine> {
        let cpus = config.cores.cpus().to_vec();
        if cpus.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no CPU selected for reactors",
            ));
        }
        let mut inboxes = Vec::new();
        let mut gids = Vec::new();
        for _ in &cpus {
            let inbox = Arc::new(Inbox::new(config.inbox_capacity)?);
            gids.push(register_inbox(inbox.clone()));
            inboxes.push(inbox);
        }
        let shared = Arc::new(Shared {
            inboxes,
            gids,
            config,
        });
        let mut engine = Engine {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let mut ready = Vec::new();
        for (index, cpu) in cpus.into_iter().enumerate() {
            let (tx, rx) = reply_pair::<std::io::Result<()>>();
            ready.push(rx);
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("reactor-{index}"))
                .spawn(move || reactor_main(index, cpu, shared, tx))?;
            engine.threads.push(thread);
        }
        for rx in ready {
            rx.wait()
                .map_err(|_| std::io::Error::other("a reactor exited during start"))??;
        }
        Ok(engine)
    }

    /// Number of reactors.
    pub fn reactors(&self) -> usize {
        self.shared.inboxes.len()
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Sends a message to reactor `n` (waits for room if its inbox is full).
    pub fn send(&self, n: usize, msg: Message) {
        deliver(self.shared.gids[n], &self.shared.inboxes[n], msg);
    }

    /// Runs `f` on reactor `n` and returns its result as a [`Reply`].
    pub fn call<R: Send + 'static>(
        &self,
        n: usize,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Reply<R> {
        let (tx, rx) = reply_pair();
        self.send(n, Message::Run(Box::new(move || tx.send(f()))));
        rx
    }

    /// Builds a `!Send` future on reactor `n` (with `make`, which runs there), runs it as
    /// a task and returns its output as a [`Reply`].
    pub fn spawn<F, Fut>(&self, n: usize, make: F) -> Reply<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let (tx, rx) = reply_pair();
        self.send(
            n,
            Message::Run(Box::new(move || {
                let fut = make();
                spawn(async move { tx.send(fut.await) });
            })),
        );
        rx
    }

    /// Stops every reactor and joins its thread.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for n in 0..self.reactors() {
            self.send(n, Message::Stop);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("strata: a reactor thread panicked during shutdown");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_all();
        }
        for &gid in &self.shared.gids {
            unregister_inbox(gid);
        }
    }
}

fn reactor_main(
    index: usize,
    cpu: usize,
    shared: Arc<Shared>,
    ready: Replier<std::io::Result<()>>,
) {
    /// Closes the inbox when the thread leaves, normally or by a panic, so senders get
    /// `Canceled` instead of waiting forever on a reactor that is gone.
    struct CloseOnExit(Arc<Inbox>);
    impl Drop for CloseOnExit {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnExit(shared.inboxes[index].clone());
    if shared.config.pin && !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        ready.send(Err(std::io::Error::other(format!(
            "cannot pin reactor {index} to CPU {cpu}"
        ))));
        return;
    }
    let inbox = shared.inboxes[index].clone();
    let ring = match Ring::new(shared.config.ring_entries, inbox.eventfd()) {
        Ok(r) => r,
        Err(e) => {
            ready.send(Err(std::io::Error::new(
                e.kind(),
                format!("io_uring setup failed on reactor {index}: {e}"),
            )));
            return;
        }
    };
    let gid = shared.gids[index];
    let core = Rc::new(Core {
        index,
        gid,
        engine: shared,
        executor: Executor::new(gid),
        ring: RefCell::new(ring),
        timers: RefCell::new(Timers::default()),
        inbox,
        outbox: RefCell::new(HashMap::new()),
        stop: Cell::new(false),
    });
    CORE.with(|c| *c.borrow_mut() = Some(core.clone()));
    ready.send(Ok(()));
    run_loop(&core);
    // From here on messages (including wakes from destructors below) are dropped.
    core.inbox.close();
    // Shutdown order: tasks first (their in-flight ops become abandoned), then the ring,
    // whose Drop cancels and reaps everything still in flight (ring ownership rule 3).
    core.executor.clear();
    *core.timers.borrow_mut() = Timers::default();
    CORE.with(|c| *c.borrow_mut() = None);
    drop(core);
}

fn run_loop(core: &Core) {
    let mode = core.engine.config.poll_mode;
    let budget = core.engine.config.idle_budget;
    let coalesce = core.engine.config.coalesce;
    // Interrupt coalescing state: whether the last pass followed a window, and how long
    // the last sleep lasted.
    let mut windowed = false;
    let mut slept = Duration::MAX;
    let mut idle_since: Option<Instant> = None;
    let mut deferred = false;
    let mut woken = Vec::new();
    let mut dead = Vec::new();
    loop {
        let completions = {
            let mut ring = core.ring.borrow_mut();
            let (n, _) = ring.reap_cqes();
            ring.take_woken(&mut woken, &mut dead);
            n
        };
        // Outside the ring's borrow: wakers and destructors may use the ring.
        woken.drain(..).for_each(Waker::wake);
        dead.clear();
        let ran = core.executor.run_ready();
        let messages = handle_inbox(core);
        if core.stop.get() {
            return;
        }
        flush_outbox(core);
        let mut timers_fired = 0;
        if !core.timers.borrow().is_empty() {
            core.timers.borrow_mut().expire(Instant::now(), &mut woken);
            timers_fired = woken.len();
            for w in woken.drain(..) {
                w.wake();
            }
        }
        let busy = completions + ran + messages + timers_fired > 0 || core.executor.has_ready();
        if windowed && completions < 2 {
            // The window caught no batch: stop coalescing until a short sleep shows load
            // again (a queue-depth-1 stream would otherwise keep every window open).
            windowed = false;
            slept = Duration::MAX;
        }
        if mode == PollMode::Interrupt && !core.executor.has_ready() {
            // Coalesce only under load: after a window that caught a batch, or a sleep
            // shorter than a quarter of the window. A lone request stream (queue depth 1,
            // whose next request comes a round trip later) is then not held back.
            if busy && !coalesce.is_zero() && (windowed || slept < coalesce / 4) {
                // The batch window: submit, then let completions gather.
                coalesce_window(core, coalesce);
                windowed = true;
            } else {
                // Nothing runnable: submit what the tasks queued and wait in the same
                // io_uring_enter (a separate submit, then another pass to find nothing
                // to do, would cost one more system call per wake-up).
                let start = Instant::now();
                sleep_until_work(core);
                slept = start.elapsed();
                windowed = false;
            }
            continue;
        }
        if busy || mode == PollMode::Busy {
            idle_since = None;
            // Tasks woken during this pass run in the next one: let them queue their I/O
            // too and submit it all with one io_uring_enter. Never twice in a row, so a
            // stream of ready tasks cannot hold submissions back.
            if core.executor.has_ready() && !deferred {
                deferred = true;
            } else {
                deferred = false;
                core.ring.borrow_mut().submit();
            }
            continue;
        }
        deferred = false;
        if mode == PollMode::Hybrid {
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            if now - since < budget {
                core.ring.borrow_mut().submit();
                continue;
            }
        }
        idle_since = None;
        sleep_until_work(core);
    }
}

/// Most completions a coalescing window waits for before it ends early.
pub const COALESCE_MAX_EVENTS: usize = 64;

/// Submits what is queued and waits `window` (less if a timer is due sooner) or until
/// [`COALESCE_MAX_EVENTS`] completions, whichever comes first.
fn coalesce_window(core: &Core, window: Duration) {
    let window = match core.timers.borrow().next_deadline() {
        Some(d) => window.min(timer::until(d, Instant::now())),
        None => window,
    };
    if window.is_zero() {
        core.ring.borrow_mut().submit();
    } else {
        core.ring.borrow_mut().wait_for(COALESCE_MAX_EVENTS, window);
    }
}

fn sleep_until_work(core: &Core) {
    if !core.inbox.prepare_sleep() {
        // Messages are waiting: no sleep, but what the tasks queued still goes out now
        // (in interrupt mode nothing else submits).
        core.ring.borrow_mut().submit();
        return;
    }
    let timeout = core
        .timers
        .borrow()
        .next_deadline()
        .map(|d| timer::until(d, Instant::now()));
    // A parked outbox needs retries: do not sleep long while one is non-empty.
    let timeout = if core.outbox.borrow().is_empty() {
        timeout
    } else {
        Some(Duration::from_micros(50))
    };
    if timeout == Some(Duration::ZERO) {
        core.ring.borrow_mut().submit();
    } else {
        core.ring.borrow_mut().submit_and_wait(timeout);
    }
    core.inbox.woke();
}

fn handle_inbox(core: &Core) -> usize {
    let mut n = 0;
    // Bounded batch so a flood of messages cannot starve I/O completions.
    while n < 256 {
        let Some(msg) = core.inbox.pop() else { break };
        n += 1;
        match msg {
            Message::Wake { index, generation } => core.executor.schedule(index, generation),
            Message::Run(f) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                    eprintln!(
                        "strata: a message handler panicked on reactor {}",
                        core.index
                    );
                }
            }
            Message::Graph(update) => crate::graph::drain::handle(update),
            Message::Stop => core.stop.set(true),
        }
    }
    n
}

fn flush_outbox(core: &Core) {
    let mut outbox = core.outbox.borrow_mut();
    if outbox.is_empty() {
        return;
    }
    outbox.retain(|_, (inbox, queue)| {
        while let Some(msg) = queue.pop_front() {
            if let Err(back) = inbox.try_push(msg) {
                queue.push_front(back);
                return true;
            }
        }
        false
    });
}

/// Counters of the calling reactor, for tests and statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Live tasks.
    pub tasks: usize,
    /// Ring operations in flight.
    pub inflight: usize,
}

/// Counters of the calling reactor.
pub fn stats() -> ReactorStats {
    with_core(|c| ReactorStats {
        tasks: c.executor.live_tasks(),
        inflight: c.ring.borrow().inflight(),
    })
}

#[cfg(test)]
mod tests;
