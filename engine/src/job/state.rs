//! QEMU's job state machine: statuses, allowed transitions and the verbs each status
//! accepts.
//!
//! ```text
//!   undefined -> created -> running <-> paused
//!                   |          |  \
//!                   |          |   ready <-> standby          (mirror waits here)
//!                   |          |     |
//!                   |          +---> waiting -> pending -> concluded -> null
//!                   |                   \          \          ^
//!                   +------------------> aborting --+---------+
//! ```
//!
//! The tables are QEMU's `JobSTT` and `JobVerbTable` restated; [`JobStatus::can_become`]
//! and [`JobStatus::check_verb`] are all a job runner asks. `ready -> running` does not
//! exist (QEMU never merged it). Pausing moves `running -> paused` and `ready ->
//! standby`; resuming goes back.

use std::fmt;

/// A job's status, as `query-jobs` and `JOB_STATUS_CHANGE` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    /// Work done for now; a job such as mirror waits for `complete`.
    Ready,
    /// Paused while ready.
    Standby,
    /// Done; waiting for the rest of its transaction.
    Waiting,
    /// Graph changes not yet applied; `job-finalize` applies them without auto-finalize.
    Pending,
    Aborting,
    /// Finished; stays until `job-dismiss` without auto-dismiss.
    Concluded,
    /// Being torn down.
    Null,
}

/// The commands that act on a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Change,
    Complete,
    Finalize,
    Dismiss,
}

impl JobStatus {
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The wire name (`"running"`, `"concluded"`).
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether a job in `self` may move to `next` (QEMU's `JobSTT`).
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether the status accepts `verb` (QEMU's `JobVerbTable`).
    pub fn accepts(self, verb: JobVerb) -> bool {
        use JobStatus::*;
        match verb {
            JobVerb::Cancel => matches!(
                self,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(self, Ready | Standby),
            JobVerb::Finalize => self == Pending,
            JobVerb::Dismiss => self == Concluded,
        }
    }

    /// Checks `verb` on job `id`, with QEMU's message when refused.
    pub fn check_verb(self, id: &str, verb: JobVerb) -> Result<(), VerbError> {
        if self.accepts(verb) {
            Ok(())
        } else {
            Err(VerbError {
                id: id.to_string(),
                status: self,
                verb,
            })
        }
    }

    /// Where pausing leads (`running -> paused`, `ready -> standby`); other statuses
    /// stay.
    pub fn paused(self) -> JobStatus {
        match self {
            JobStatus::Running => JobStatus::Paused,
            JobStatus::Ready => JobStatus::Standby,
            other => other,
        }
    }

    /// Where resuming leads: back from [`JobStatus::paused`].
    pub fn resumed(self) -> JobStatus {
        match self {
            JobStatus::Paused => JobStatus::Running,
            JobStatus::Standby => JobStatus::Ready,
            other => other,
        }
    }
}

impl JobVerb {
    /// The name QEMU prints in refusals (`"dismiss"`, `"set-speed"`).
    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Change => "change",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A verb the job's status does not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerbError {
    pub id: String,
    pub status: JobStatus,
    pub verb: JobVerb,
}

impl fmt::Display for VerbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Job '{}' in state '{}' cannot accept command verb '{}'",
            self.id,
            self.status,
            self.verb.name()
        )
    }
}

impl std::error::Error for VerbError {}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    #[test]
    fn transitions_are_qemus_table_and_nothing_else() {
        let allowed = [
            (Undefined, Created),
            (Created, Running),
            (Created, Aborting),
            (Created, Null),
            (Running, Paused),
            (Running, Ready),
            (Running, Waiting),
            (Running, Aborting),
            (Paused, Running),
            (Ready, Standby),
            (Ready, Waiting),
            (Ready, Aborting),
            (Standby, Ready),
            (Waiting, Pending),
            (Waiting, Aborting),
            (Pending, Aborting),
            (Pending, Concluded),
            (Aborting, Aborting),
            (Aborting, Concluded),
            (Concluded, Null),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert!(!Ready.can_become(Running), "QEMU has no ready -> running");
    }

    #[test]
    fn verbs_follow_qemus_table_with_its_message() {
        let cancel = [Created, Running, Paused, Ready, Standby, Waiting, Pending];
        let pause = [Created, Running, Paused, Ready, Standby];
        for s in JobStatus::ALL {
            assert_eq!(s.accepts(JobVerb::Cancel), cancel.contains(&s), "{s}");
            for v in [
                JobVerb::Pause,
                JobVerb::Resume,
                JobVerb::SetSpeed,
                JobVerb::Change,
            ] {
                assert_eq!(s.accepts(v), pause.contains(&s), "{s} {v:?}");
            }
            assert_eq!(s.accepts(JobVerb::Complete), matches!(s, Ready | Standby));
            assert_eq!(s.accepts(JobVerb::Finalize), s == Pending);
            assert_eq!(s.accepts(JobVerb::Dismiss), s == Concluded);
        }
        let e = Ready.check_verb("m1", JobVerb::Dismiss).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Job 'm1' in state 'ready' cannot accept command verb 'dismiss'"
        );
        assert_eq!(Concluded.check_verb("m1", JobVerb::Dismiss), Ok(()));
    }

    #[test]
    fn pausing_and_resuming_round_trip_and_stay_in_the_table() {
        for s in [Running, Ready] {
            let p = s.paused();
            assert_ne!(p, s);
            assert!(s.can_become(p), "{s} -> {p}");
            assert_eq!(p.resumed(), s);
            assert!(p.can_become(s), "{p} -> {s}");
        }
        assert_eq!(Created.paused(), Created);
        assert_eq!(Concluded.resumed(), Concluded);
    }
}
