//! strata-engine: the runtime every other part of Strata stands on.
//!
//! ```text
//!               Engine (one per process)
//!                 | start(cores, poll mode)
//!      +----------+-----------+
//!   reactor 0   reactor 1   reactor N     one pinned thread per core
//!   +--------+  +--------+                 each: io_uring + executor + timers + inbox
//!   | ring   |  | ring   |
//!   | tasks  |  | tasks  |   tasks hold Handles:  Handle --check--> dyn Queue (per reactor)
//!   | inbox  |  | inbox  |                                         ^ opened from
//!   +--------+  +--------+                          Arc<dyn Driver> (one per node)
//!       ^ graph::Update (drain, publish)
//!   admin thread: Graph { nodes, named child edges, users, permissions }
//! ```
//!
//! - [`graph`]: the block graph: nodes and permission-carrying child edges (QEMU's
//!   rules and messages), filter helpers, and the drain protocol that changes it under
//!   load without a lock on the data path.
//! - [`reactor`]: reactors, the executor, the ring (with the ownership rules for memory
//!   shared with the kernel), messages and replies, timers, poll modes.
//! - [`job`]: QEMU's job state machine (statuses, transitions, verbs), for the jobs.
//! - [`request`]: [`Request`] / [`Completion`]: owned requests that complete exactly once.
//! - [`driver`]: the [`Driver`] / [`Queue`] interface and the request checks.
//! - [`buffer`]: aligned buffers pooled per reactor.
//! - [`cpuset`]: which CPUs get a reactor.

pub mod buffer;
pub mod cpuset;
pub mod driver;
pub mod errno;
pub mod error;
pub mod graph;
pub mod job;
pub mod reactor;
pub mod request;

pub use buffer::Buffer;
pub use cpuset::CpuSet;
pub use driver::{Driver, DriverInfo, Handle, IoFuture, Queue};
pub use errno::Errno;
pub use error::{Error, ErrorKind};
pub use graph::{ChildRole, Children, Graph, NodeId, Perm};
pub use reactor::{Engine, EngineConfig, PollMode};
pub use request::{Completion, Extent, ExtentState, Op, OpSet, ReqFlags, Request};
