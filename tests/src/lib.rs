//! The one harness for Strata's end-to-end tests (this crate's and `strata-rpc`'s):
//! start the real `stratad`, talk to it over its real sockets, run `strata-rpc`, and find
//! the external tools the tests drive.
//!
//! ```text
//!   test --spawn--> stratad (temp dir: rpc.sock, qmp.sock)   <-- JsonRpc / Qmp clients
//!    |                 ^ NBD (nbd::Server starts it with --nbd-server)  <-- nbd::Client
//!     \--spawn--> strata-rpc, qemu-img / qemu-io / nbdinfo / fio ...  (run_limited -> Ran)
//! ```
//!
//! Every daemon a test starts is a [`Daemon`] guard: dropping it kills the process and
//! removes its directory, so a failing test leaves nothing running. Client commands run
//! with a time limit, their output read as they run ([`run_limited`], [`wait_output`]).

pub mod nbd;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A binary built by this workspace, next to the test executable (`target/<profile>`).
/// `cargo test` builds the bins of the package under test (`strata-rpc`'s `stratad` and
/// `strata-rpc`) before its integration tests; a missing one is a failure, not a skip.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace; \
         scripts/test.sh does this)",
        bin.display()
    );
    bin
}

/// Fails with an install hint if an external tool is missing.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{tool} is not installed: run scripts/install-deps.sh or apt-get install {package}"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "strata-e2e-{tag}-{}-{}",
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

/// A running `stratad`, killed on drop. Its stdout and stderr are collected as it runs.
#[derive(Debug)]
pub struct Daemon {
    pub child: Option<Child>,
    pub rpc: PathBuf,
    pub qmp: PathBuf,
    /// The line stratad printed once serving.
    pub banner: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    collectors: Vec<JoinHandle<()>>,
    pub dir: TempDir,
}

/// Collects a pipe's text into `into` on a thread, line by line as it comes; each line
/// also goes to the returned receiver (to wait for a prompt or a banner).
pub fn collect(
    pipe: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> (JoinHandle<()>, Receiver<String>) {
    let (tx, rx) = channel();
    let handle = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    (handle, rx)
}

impl Daemon {
    /// `stratad` with `rpc.sock` and `qmp.sock` in a new temp dir, one reactor on CPU 0
    /// (unless `args` gives `-m`), plus `args`; returns once it says it listens.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_in(TempDir::new("stratad"), args)
    }

    /// Like [`Daemon::start`], in `dir`.
    pub fn start_in(dir: TempDir, args: &[&str]) -> Daemon {
        match Daemon::spawn_in(dir, args) {
            Ok(d) => d,
            Err((status, out, err)) => {
                panic!("stratad exited during start ({status}):\n{out}{err}")
            }
        }
    }

    /// Like [`Daemon::start_in`], but a daemon that exits during start is returned as
    /// its status, stdout and stderr.
    pub fn spawn_in(dir: TempDir, args: &[&str]) -> Result<Daemon, (ExitStatus, String, String)> {
        let rpc = dir.path("rpc.sock");
        let qmp = dir.path("qmp.sock");
        let cores: &[&str] = if args.contains(&"-m") {
            &[]
        } else {
            &["-m", "[0]"]
        };
        let mut child = Command::new(workspace_bin("stratad"))
            .arg("--rpc-socket")
            .arg(&rpc)
            .arg("--qmp-socket")
            .arg(&qmp)
            .args(cores)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stratad");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (out_thread, lines) = collect(child.stdout.take().unwrap(), stdout.clone());
        let (err_thread, _) = collect(child.stderr.take().unwrap(), stderr.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut d = Daemon {
            child: Some(child),
            rpc,
            qmp,
            banner: String::new(),
            stdout,
            stderr,
            collectors: vec![out_thread, err_thread],
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
                d.drain();
                return Err((status, d.stdout(), d.stderr()));
            }
            assert!(Instant::now() < deadline, "stratad did not start in 30 s");
        }
    }

    /// After the exit: waits (briefly) until everything it wrote has been collected.
    fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.collectors.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Where its NBD server listens: the `nbd=<addr>` token of the banner, if any.
    pub fn nbd_addr(&self) -> Option<nbd::Addr> {
        let token = self
            .banner
            .split_whitespace()
            .find_map(|t| t.strip_prefix("nbd="))?;
        Some(nbd::Addr::parse(
            token.trim_end_matches([',', ';', ')', '"', '\'']),
        ))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    /// What it has printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// What it has printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// A new JSON-RPC connection.
    pub fn rpc(&self) -> JsonRpc {
        JsonRpc::connect(&self.rpc)
    }

    /// A new QMP connection, greeting read, not negotiated.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp)
    }

    /// Sends `signal` and waits (at most 30 s) for the exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), signal) };
        self.wait_exit(Duration::from_secs(30))
    }

    /// Sends SIGTERM and waits (at most 30 s) for the exit; returns its status and all
    /// it printed.
    pub fn terminate(mut self) -> Output {
        let status = self.signal_and_wait(libc::SIGTERM);
        Output {
            status,
            stdout: self.stdout().into_bytes(),
            stderr: self.stderr().into_bytes(),
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("daemon running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                self.drain();
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

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// CPU time (user + system) the daemon has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid() as u32)
    }
}

/// CPU time (user + system, every thread) process `pid` has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesized command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `child` with a deadline, killing it if it is exceeded. Its piped stdout
/// and stderr are read as it runs, so a chatty child never blocks on a full pipe.
pub fn wait_output(child: Child, limit: Duration) -> Output {
    wait_limited(child, limit, "process")
}

/// [`wait_output`], with `what` naming the process in the panic.
fn wait_limited(mut child: Child, limit: Duration, what: &str) -> Output {
    let out = child.stdout.take().map(slurp);
    let err = child.stderr.take().map(slurp);
    let text = |pipe: Option<JoinHandle<Vec<u8>>>| pipe.map_or(Vec::new(), |h| h.join().unwrap());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not exit within {limit:?}: {}",
                String::from_utf8_lossy(&text(err))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: text(out),
        stderr: text(err),
    }
}

/// Reads all of `pipe` on a thread.
fn slurp(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// A finished command: its command line, exit code and output, lossily decoded. It
/// displays as all of that, for assertion messages.
#[derive(Debug)]
pub struct Ran {
    pub cmd: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Asserts exit code 0; returns itself.
    pub fn success(self) -> Ran {
        assert_eq!(self.code, 0, "{self}");
        self
    }

    /// Asserts a non-zero exit code; returns itself.
    pub fn failure(self) -> Ran {
        assert_ne!(self.code, 0, "expected a failure: {self}");
        self
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nexit code {}\n--- stdout\n{}--- stderr\n{}",
            self.cmd, self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with no stdin, collecting its output; kills it and fails the test if it
/// has not exited within `limit`.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Ran {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
    let (code, stdout, stderr) = code_and_text(wait_limited(child, limit, &line));
    Ran {
        cmd: line,
        code,
        stdout,
        stderr,
    }
}

/// Runs a command, returning its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// (exit code, stdout, stderr) of a finished process.
fn code_and_text(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `strata-rpc` with `args`; returns (exit code, stdout, stderr).
pub fn strata_rpc(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("strata-rpc"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run strata-rpc");
    code_and_text(out)
}

/// Runs `stratad` to completion (it must exit by itself within 30 s, e.g. on a start
/// error); returns (exit code, stdout, stderr).
pub fn stratad_exit(args: &[&str]) -> (i32, String, String) {
    let child = Command::new(workspace_bin("stratad"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stratad");
    code_and_text(wait_output(child, Duration::from_secs(30)))
}

/// Any child process, killed on drop unless it was waited for.
#[derive(Debug)]
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Its output once it has exited by itself; `None` while it runs.
    pub fn try_output(&mut self) -> Option<Output> {
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

/// A connection to one of stratad's sockets: send bytes, read JSON values, one per line
/// (both protocols frame replies that way). [`JsonRpc`] and [`Qmp`] deref to it.
#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    /// Connects, with a 30 s read timeout.
    pub fn connect(path: &Path) -> Conn {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Conn { stream, reader }
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to stratad");
    }

    /// The next line as JSON (a reply, an event or a notification); `None` at EOF.
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

    /// The next line as JSON; panics at EOF.
    pub fn recv(&mut self) -> Value {
        self.try_recv().expect("stratad closed the connection")
    }

    /// True if the daemon closed the connection (EOF or reset) within the read timeout;
    /// false if it sent something or stayed silent.
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        match self.reader.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }
}

/// A JSON-RPC 2.0 client: requests with increasing ids, replies matched by id.
#[derive(Debug)]
pub struct JsonRpc {
    conn: Conn,
    next_id: u64,
}

impl Deref for JsonRpc {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl DerefMut for JsonRpc {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

impl JsonRpc {
    pub fn connect(path: &Path) -> JsonRpc {
        JsonRpc {
            conn: Conn::connect(path),
            next_id: 1,
        }
    }

    /// Calls `method` and returns the whole response object (skipping notifications
    /// and other ids).
    pub fn call_raw(&mut self, method: &str, params: Value) -> Value {
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

    /// Calls `method`; `Ok(result)` or `Err((code, message))`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let v = self.call_raw(method, params);
        match v.get("error") {
            Some(e) => Err((
                e["code"].as_i64().expect("error code"),
                e["message"].as_str().unwrap_or_default().to_string(),
            )),
            None => Ok(v["result"].clone()),
        }
    }

    /// Calls `method`, which must succeed; returns the result.
    pub fn ok(&mut self, method: &str, params: Value) -> Value {
        let v = self.call_raw(method, params);
        assert!(v.get("error").is_none(), "{method} failed: {v}");
        v["result"].clone()
    }
}

/// A raw QMP client (the tests also use the real `qemu.qmp` library, from Python).
#[derive(Debug)]
pub struct Qmp {
    conn: Conn,
    /// The greeting, read on connect.
    pub greeting: Value,
}

impl Deref for Qmp {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl DerefMut for Qmp {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

impl Qmp {
    /// Connects and reads the greeting (no negotiation).
    pub fn connect(path: &Path) -> Qmp {
        let mut conn = Conn::connect(path);
        let greeting = conn.try_recv().expect("a QMP greeting");
        Qmp { conn, greeting }
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        q.negotiate();
        q
    }

    /// Checks the greeting and negotiates capabilities; returns the greeting.
    pub fn negotiate(&mut self) -> Value {
        assert!(self.greeting.get("QMP").is_some(), "{}", self.greeting);
        assert_eq!(
            self.execute("qmp_capabilities", Value::Null),
            json!({"return": {}}),
            "qmp_capabilities"
        );
        self.greeting.clone()
    }

    /// Executes a command; returns the reply object (`return` or `error`), skipping
    /// events.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let mut req = json!({"execute": cmd});
        if !args.is_null() {
            req["arguments"] = args;
        }
        self.send(format!("{req}\n").as_bytes());
        self.reply()
    }

    /// The next message that is not an event.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

/// The first `n` CPUs this process may run on, as a `-m` list (`[0,1]`); fails if it
/// may use fewer.
pub fn first_cpus(n: usize) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in /proc/self/status")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap());
    }
    assert!(
        cpus.len() >= n,
        "this test needs {n} CPUs for {n} reactors, but may only use CPUs {list}"
    );
    let picked: Vec<String> = cpus[..n].iter().map(|c| c.to_string()).collect();
    format!("[{}]", picked.join(","))
}

/// Node names in the graph, sorted.
pub fn node_names(rpc: &mut JsonRpc) -> Vec<String> {
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
