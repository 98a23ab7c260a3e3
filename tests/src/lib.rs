//! Shared helpers for Strata's end-to-end tests: start the real `stratad`, talk to it
//! over its real sockets, and find the external tools the tests drive.
//!
//! ```text
//!   test --spawn--> stratad (temp dir: rpc.sock, qmp.sock)   <-- JsonRpc / Qmp clients
//!     \--spawn--> qemu-img / qemu-io / python3 -m qemu.qmp       (real tools)
//! ```
//!
//! Every daemon a test starts is a [`Daemon`] guard: dropping it kills the process and
//! removes its directory, so a failing test leaves nothing running.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A binary built by this workspace, next to the test executable (`target/<profile>`).
/// `cargo test --workspace` builds them; a missing one is a failure, not a skip.
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

/// A directory for one test, removed on drop.
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
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A running `stratad`, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub child: Option<Child>,
    pub rpc: PathBuf,
    pub qmp: PathBuf,
    pub dir: TempDir,
}

impl Daemon {
    /// Starts `stratad` with JSON-RPC and QMP sockets in a fresh directory, one reactor,
    /// plus `args`; waits until both sockets accept connections.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_in(TempDir::new("stratad"), args)
    }

    pub fn start_in(dir: TempDir, args: &[&str]) -> Daemon {
        let rpc = dir.path("rpc.sock");
        let qmp = dir.path("qmp.sock");
        let child = Command::new(workspace_bin("stratad"))
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
        let mut d = Daemon {
            child: Some(child),
            rpc,
            qmp,
            dir,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&self.rpc).is_ok() && UnixStream::connect(&self.qmp).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let out = self.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "stratad exited during start ({status}): {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "stratad did not open its sockets in 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn rpc(&self) -> JsonRpc {
        JsonRpc::connect(&self.rpc)
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp)
    }

    /// Sends SIGTERM and waits for the exit; returns its output.
    pub fn terminate(mut self) -> Output {
        let child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_output(child, Duration::from_secs(30))
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

/// Waits for `child` with a deadline, killing it if it is exceeded.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!(
                "process did not exit within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// A plain JSON-RPC 2.0 client: one request per call, replies matched by id.
#[derive(Debug)]
pub struct JsonRpc {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl JsonRpc {
    pub fn connect(path: &Path) -> JsonRpc {
        let stream = UnixStream::connect(path).expect("connect to the JSON-RPC socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        JsonRpc {
            stream,
            reader,
            next_id: 1,
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one JSON value (a reply or a notification).
    pub fn recv(&mut self) -> Value {
        let mut de = serde_json::Deserializer::from_reader(&mut self.reader).into_iter::<Value>();
        de.next()
            .expect("the daemon closed the connection")
            .expect("a JSON reply")
    }

    /// Calls `method` and returns the whole response object.
    pub fn call_raw(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if !params.is_null() {
            req["params"] = params;
        }
        self.send_raw(format!("{req}\n").as_bytes());
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

    /// Calls `method` and panics on error.
    pub fn ok(&mut self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e:?}"))
    }
}

/// A raw QMP client (the tests also use the real `qemu.qmp` library, from Python).
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    pub greeting: Value,
}

impl Qmp {
    /// Connects and reads the greeting (no negotiation).
    pub fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).expect("connect to the QMP socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).expect("greeting");
        let greeting = serde_json::from_str(&line).expect("greeting is JSON");
        Qmp {
            stream,
            reader,
            greeting,
        }
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        let r = q.execute("qmp_capabilities", Value::Null);
        assert_eq!(r, json!({"return": {}}), "qmp_capabilities");
        q
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads the next line that is not an event.
    pub fn recv_reply(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Reads the next line (reply or event).
    pub fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "the daemon closed the QMP connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Executes a command and returns the reply object (`return` or `error`).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let mut req = json!({"execute": cmd});
        if !args.is_null() {
            req["arguments"] = args;
        }
        self.send_raw(format!("{req}\n").as_bytes());
        self.recv_reply()
    }

    /// True if the peer closed the connection (reads EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0))
    }
}

/// Runs a command, returning its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}
