//! Jobs: long-running operations on the graph (image creation now; mirror, backup,
//! commit and stream later) with QEMU's state machine and verbs.
//!
//! [`state`] holds the state machine itself, QEMU's `JobSTT` and `JobVerbTable`
//! (job.c, qapi/job.json, 10.0), as pure data: which status may follow which, and which
//! verb (cancel, pause, resume, complete, finalize, dismiss) each status accepts, with
//! QEMU's refusal message. The jobs that run on reactors and the `job-*` commands are
//! built on it.

pub mod state;

pub use state::{JobStatus, JobVerb, VerbError};
