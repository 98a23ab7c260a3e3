//! The admin thread: the one place commands run.
//!
//! ```text
//!   JSON-RPC connection --+
//!   QMP connection -------+-- AdminHandle::call --> mpsc --> admin thread
//!   --config / --blockdev +      (blocks on its          owns the Registry,
//!   SIGINT / SIGTERM -- AdminHandle::stop                 runs ONE command at a time
//! ```
//!
//! Every front end sends `(method, params, reply channel)` and waits for the reply, so
//! commands are serialized in arrival order whatever their source. A caller that goes
//! away (client disconnected mid-command) only drops its reply channel: the command
//! still runs to completion.
//!
//! After `quit` (the registry's `quit_requested`) has been answered, or on
//! [`AdminHandle::stop`], the thread stops taking commands (callers still queued get
//! "shutting down"), flushes and closes every node and stops the reactors
//! ([`Commands::shutdown`]), then ends; [`Admin::wait`] returns.

use crate::error::{CommandError, ErrorCode};
use crate::registry::Registry;
use serde_json::Value;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;

/// What the admin thread runs commands on: the [`Registry`], or a stand-in in tests.
pub trait Commands {
    /// Runs one command; `params` is an object or `null`.
    fn call(&mut self, method: &str, params: Value) -> Result<Value, CommandError>;
    /// True once the last command asked the daemon to exit.
    fn quit_requested(&self) -> bool;
    /// Flushes and closes everything.
    fn shutdown(self);
    /// Periodic work between commands (every [`POLL_INTERVAL`] while idle, and after
    /// each command): emitting events the reactors reported, releasing exports whose
    /// clients have gone.
    fn poll(&mut self) {}
}

/// How often the idle admin thread looks for reactor reports (I/O errors): rare
/// enough to cost nothing, soon enough for `BLOCK_IO_ERROR` to be timely.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl Commands for Registry {
    fn call(&mut self, method: &str, params: Value) -> Result<Value, CommandError> {
        Registry::call(self, method, params)
    }

    fn quit_requested(&self) -> bool {
        Registry::quit_requested(self)
    }

    fn shutdown(self) {
        Registry::shutdown(self)
    }

    fn poll(&mut self) {
        self.poll_io_errors();
        self.poll_exports();
    }
}

type Reply = Result<Value, CommandError>;

enum Msg {
    Call {
        method: String,
        params: Value,
        reply: Sender<Reply>,
    },
    Stop,
}

/// A way to reach the admin thread; cheap to clone, one per front end or connection.
#[derive(Clone, Debug)]
pub struct AdminHandle {
    tx: Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Call { method, .. } => write!(f, "Call({method})"),
            Msg::Stop => f.write_str("Stop"),
        }
    }
}

fn shutting_down() -> CommandError {
    CommandError::new(
        ErrorCode::Busy,
        "stratad is shutting down and takes no more commands",
    )
}

impl AdminHandle {
    /// Runs `method` on the admin thread after every command sent before it, and waits
    /// for its result.
    pub fn call(&self, method: &str, params: Value) -> Reply {
        let (reply, rx) = channel();
        self.tx
            .send(Msg::Call {
                method: method.to_string(),
                params,
                reply,
            })
            .map_err(|_| shutting_down())?;
        rx.recv().unwrap_or_else(|_| Err(shutting_down()))
    }

    /// Asks the admin thread to shut down after the command it is running (SIGTERM).
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

/// The running admin thread.
#[derive(Debug)]
pub struct Admin {
    handle: AdminHandle,
    thread: JoinHandle<()>,
}

impl Admin {
    /// Starts the admin thread; `make` builds what it runs commands on (the engine, the
    /// graph and the registry) on that thread. Returns `make`'s error if it fails.
    pub fn start<C, F>(make: F) -> Result<Admin, String>
    where
        C: Commands,
        F: FnOnce() -> Result<C, String> + Send + 'static,
    {
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("admin".to_string())
            .spawn(move || match make() {
                Ok(commands) => {
                    let _ = ready_tx.send(Ok(()));
                    run(commands, rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Admin {
                handle: AdminHandle { tx },
                thread,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err("the admin thread panicked while starting".to_string())
            }
        }
    }

    pub fn handle(&self) -> AdminHandle {
        self.handle.clone()
    }

    /// Waits until the admin thread has shut down (after `quit` or [`AdminHandle::stop`])
    /// and every node is flushed and closed.
    pub fn wait(self) {
        drop(self.handle);
        if self.thread.join().is_err() {
            eprintln!("stratad: the admin thread panicked during shutdown");
        }
    }
}

fn run<C: Commands>(mut commands: C, rx: Receiver<Msg>) {
    loop {
        let msg = match rx.recv_timeout(POLL_INTERVAL) {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => {
                commands.poll();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match msg {
            Msg::Call {
                method,
                params,
                reply,
            } => {
                // A panicking command must not take the daemon's control plane with it.
                let result = catch_unwind(AssertUnwindSafe(|| commands.call(&method, params)))
                    .unwrap_or_else(|_| {
                        Err(CommandError::new(
                            ErrorCode::Internal,
                            format!("BUG: command '{method}' panicked (see stratad's log)"),
                        ))
                    });
                // The caller may be gone (client disconnected): the command ran anyway.
                let _ = reply.send(result);
                commands.poll();
                if commands.quit_requested() {
                    break;
                }
            }
            Msg::Stop => break,
        }
    }
    // Queued callers get "shutting down" now instead of waiting for the flush.
    drop(rx);
    commands.shutdown();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    /// A stand-in for the registry: `echo` returns its params, `fail` fails with
    /// InvalidParams, `slow` sleeps 200 ms, `panic` panics, `quit` quits,
    /// `query-commands` lists these; everything else is MethodNotFound. Records calls and whether it was shut down.
    #[derive(Debug, Default)]
    pub(crate) struct Fake {
        pub log: Arc<Mutex<Vec<String>>>,
        quit: bool,
    }

    impl Commands for Fake {
        fn call(&mut self, method: &str, params: Value) -> Result<Value, CommandError> {
            self.log.lock().unwrap().push(method.to_string());
            match method {
                "echo" => Ok(params),
                "fail" => Err(CommandError::invalid_params("Parameter 'x' is missing")),
                "slow" => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    Ok(json!({}))
                }
                "panic" => panic!("fake command panicked on purpose"),
                "query-commands" => Ok(json!([
                    {"name": "echo"}, {"name": "fail"}, {"name": "slow"},
                    {"name": "panic"}, {"name": "quit"}, {"name": "query-commands"}
                ])),
                "quit" => {
                    self.quit = true;
                    Ok(json!({}))
                }
                _ => Err(CommandError::new(
                    ErrorCode::MethodNotFound,
                    format!("The command {method} has not been found"),
                )),
            }
        }

        fn quit_requested(&self) -> bool {
            self.quit
        }

        fn shutdown(self) {
            self.log.lock().unwrap().push("<shutdown>".to_string());
        }
    }

    pub(crate) fn fake_admin() -> (Admin, Arc<Mutex<Vec<String>>>) {
        let fake = Fake::default();
        let log = fake.log.clone();
        (Admin::start(move || Ok(fake)).unwrap(), log)
    }

    #[test]
    fn commands_run_in_order_and_quit_shuts_down_after_answering() {
        let (admin, log) = fake_admin();
        let h = admin.handle();
        assert_eq!(h.call("echo", json!({"a": 1})), Ok(json!({"a": 1})));
        assert_eq!(
            h.call("fail", Value::Null).unwrap_err().code,
            ErrorCode::InvalidParams
        );
        assert_eq!(h.call("quit", Value::Null), Ok(json!({})));
        admin.wait();
        assert_eq!(*log.lock().unwrap(), ["echo", "fail", "quit", "<shutdown>"]);
        let late = h.call("echo", Value::Null).unwrap_err();
        assert_eq!(late.code, ErrorCode::Busy, "{late}");
    }

    #[test]
    fn a_panicking_command_is_an_internal_error_and_the_thread_goes_on() {
        let (admin, _) = fake_admin();
        let h = admin.handle();
        let e = h.call("panic", Value::Null).unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.message.contains("panic"), "{e}");
        assert_eq!(h.call("echo", json!(1)), Ok(json!(1)));
        h.stop();
        admin.wait();
    }

    #[test]
    fn a_command_whose_caller_left_still_completes() {
        let (admin, log) = fake_admin();
        let h = admin.handle();
        let (reply, rx) = channel();
        h.tx.send(Msg::Call {
            method: "slow".to_string(),
            params: Value::Null,
            reply,
        })
        .unwrap();
        drop(rx); // the client went away before its command ran
        assert_eq!(h.call("echo", json!(2)), Ok(json!(2)));
        assert_eq!(*log.lock().unwrap(), ["slow", "echo"]);
        h.stop();
        admin.wait();
    }

    #[test]
    fn a_failing_start_is_reported_and_no_thread_is_left() {
        let e =
            Admin::start(|| Err::<Fake, _>("cannot start reactors: nope".to_string())).unwrap_err();
        assert_eq!(e, "cannot start reactors: nope");
    }
}
