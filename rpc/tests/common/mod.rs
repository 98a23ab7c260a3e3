//! Helpers for the server tests: start the real `stratad` on sockets in a temp dir and
//! talk to it over them. Every daemon is a [`Daemon`] guard: dropping it kills the
//! process, so a failing test leaves nothing running.

#![allow(dead_code)] // each test binary uses its own subset

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const STRATAD: &str = env!("CARGO_BIN_EXE_stratad");
pub const STRATA_RPC: &str = env!("CARGO_BIN_EXE_strata-rpc");

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "strata-rpc-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running stratad, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub child: Option<Child>,
    pub rpc: PathBuf,
    pub qmp: PathBuf,
    /// The line stratad printed once serving.
    pub banner: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    pub dir: TempDir,
}

/// Collects a pipe's text on a thread; lines also go to `lines`.
fn collect(pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    rx
}

impl Daemon {
    /// stratad with `rpc.sock` and `qmp.sock` in a new temp dir, one reactor on CPU 0,
    /// plus `args`; returns once it says it listens.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_in(TempDir::new("stratad"), args)
    }

    pub fn start_in(dir: TempDir, args: &[&str]) -> Daemon {
        match Daemon::spawn_in(dir, args) {
            Ok(d) => d,
            Err((status, out, err)) => {
                panic!("stratad exited during start ({status}):\n{out}{err}")
            }
        }
    }

    /// Like [`Daemon::start_in`], but a daemon that exits during start is returned as
    /// its status and output.
    pub fn spawn_in(dir: TempDir, args: &[&str]) -> Result<Daemon, (ExitStatus, String, String)> {
        let rpc = dir.path("rpc.sock");
        let qmp = dir.path("qmp.sock");
        let mut child = Command::new(STRATAD)
            .arg("--rpc-socket")
            .arg(&rpc)
            .arg("--qmp-socket")
            .arg(&qmp)
            .args(["-m", "[0]"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stratad");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let lines = collect(child.stdout.take().unwrap(), stdout.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut d = Daemon {
            child: Some(child),
            rpc,
            qmp,
            banner: String::new(),
            stdout,
            stderr,
            dir,
        };
        loop {
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(20))
                && line.contains("listening")
            {
                d.banner = line;
                return Ok(d);
            }
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                d.child = None;
                std::thread::sleep(Duration::from_millis(50)); // let the pipes drain
                return Err((status, d.stdout(), d.stderr()));
            }
            assert!(Instant::now() < deadline, "stratad did not start in 30 s");
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn rpc(&self) -> Client {
        Client::unix(&self.rpc)
    }

    pub fn qmp(&self) -> Client {
        Client::unix(&self.qmp)
    }

    /// Sends `signal` and waits (at most 30 s) for the exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), signal) };
        self.wait_exit(Duration::from_secs(30))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("daemon running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "stratad did not exit within {limit:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// CPU time (user + system) the daemon has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesized command name; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw client on a socket: send bytes, read JSON values (one per line).
#[derive(Debug)]
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    pub fn unix(path: &Path) -> Client {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        Client::new(stream)
    }

    pub fn new(stream: UnixStream) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client {
            stream,
            reader,
            next_id: 1,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to stratad");
    }

    /// The next line as JSON; `None` at EOF.
    pub fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not one JSON value per line: {line:?}: {e}")),
            ),
            Err(e) => panic!("read from stratad: {e}"),
        }
    }

    pub fn recv(&mut self) -> Value {
        self.try_recv().expect("stratad closed the connection")
    }

    /// True if the daemon closed the connection (EOF or reset) within the timeout.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }

    /// JSON-RPC call; returns the whole response.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if !params.is_null() {
            req["params"] = params;
        }
        self.send(format!("{req}\n").as_bytes());
        loop {
            let v = self.recv();
            if v.get("id") == Some(&json!(id)) {
                return v;
            }
        }
    }

    /// JSON-RPC call that must succeed; returns the result.
    pub fn ok(&mut self, method: &str, params: Value) -> Value {
        let v = self.call(method, params);
        assert!(v.get("error").is_none(), "{method} failed: {v}");
        v["result"].clone()
    }

    /// QMP: reads the greeting and negotiates.
    pub fn negotiate(&mut self) -> Value {
        let greeting = self.recv();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        assert_eq!(
            self.execute("qmp_capabilities", Value::Null),
            json!({"return": {}})
        );
        greeting
    }

    /// QMP: executes a command; returns the reply (skipping events).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let mut req = json!({"execute": cmd});
        if !args.is_null() {
            req["arguments"] = args;
        }
        self.send(format!("{req}\n").as_bytes());
        self.reply()
    }

    /// QMP: the next message that is not an event.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

/// Runs strata-rpc with `args`; returns (exit code, stdout, stderr).
pub fn strata_rpc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(STRATA_RPC)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run strata-rpc");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs stratad to completion (it must exit by itself, e.g. on a start error).
pub fn stratad_exit(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(STRATAD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stratad");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stratad {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Node names in the graph.
pub fn node_names(rpc: &mut Client) -> Vec<String> {
    let mut names: Vec<String> = rpc
        .ok("query-named-block-nodes", json!({"flat": true}))
        .as_array()
        .expect("a list of nodes")
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Any child process, killed on drop unless it was waited for.
#[derive(Debug)]
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Its output once it has exited by itself; `None` while it runs.
    pub fn try_output(&mut self) -> Option<std::process::Output> {
        let exited = self.0.as_mut()?.try_wait().unwrap().is_some();
        exited.then(|| self.0.take().unwrap().wait_with_output().unwrap())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
