//! qemu-storage-daemon in place of stratad, for reference runs:
//!
//! ```text
//!   STRATA_NBD_SERVER=qemu-storage-daemon cargo test -p strata-tests --test nbd_interop
//! ```
//!
//! (or `--test nbd_bad_peers`) runs the same tests against QEMU's NBD server, to check
//! what they expect against the reference implementation. QEMU's daemon takes stratad's
//! flags where they overlap; the rest is translated: `memory` nodes become sparse files
//! of their size, `-m` and `--no-pin` are dropped, the monitor is QMP on a chardev, and
//! RPC calls go over it. Where a test checks something stratad does differently from
//! QEMU, it fails in such a run, by design.

use crate::{ChildGuard, Conn, Qmp, TempDir, collect, require_tool};
use serde_json::Value;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// True if `STRATA_NBD_SERVER` asks for qemu-storage-daemon; unset or `stratad` is
/// stratad.
pub(super) fn wanted() -> bool {
    match std::env::var("STRATA_NBD_SERVER").as_deref() {
        Ok("qemu-storage-daemon" | "qsd") => true,
        Ok("" | "stratad") | Err(_) => false,
        Ok(other) => panic!("STRATA_NBD_SERVER={other}: expected stratad or qemu-storage-daemon"),
    }
}

/// A TCP port of 127.0.0.1 nothing listens on right now.
pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running qemu-storage-daemon, killed on drop; its stdout and stderr are collected.
#[derive(Debug)]
pub(super) struct Qsd {
    child: ChildGuard,
    output: Arc<Mutex<String>>,
    collectors: Vec<JoinHandle<()>>,
    pub(super) dir: TempDir,
}

impl Qsd {
    /// Starts it in `dir` with stratad's `args`; returns once it greets on QMP, which it
    /// does after processing every option.
    pub(super) fn start(dir: TempDir, args: &[String]) -> Qsd {
        require_tool("qemu-storage-daemon", "qemu-system-common");
        let args = translate(&dir, args);
        let qmp = dir.path("qmp.sock");
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=m"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let output = Arc::new(Mutex::new(String::new()));
        let (out, _) = collect(child.stdout.take().unwrap(), output.clone());
        let (err, _) = collect(child.stderr.take().unwrap(), output.clone());
        let mut q = Qsd {
            child: ChildGuard(Some(child)),
            output,
            collectors: vec![out, err],
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !qmp.exists() {
            if !q.alive() {
                q.exited_during_start();
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if Conn::connect(&qmp).try_recv().is_none() {
            q.exited_during_start();
        }
        q
    }

    fn exited_during_start(&mut self) -> ! {
        let _ = self.child.0.as_mut().map(|c| c.wait());
        for c in self.collectors.drain(..) {
            let _ = c.join();
        }
        panic!("qemu-storage-daemon exited during start: {}", self.output())
    }

    /// Executes `method` over QMP; `Err(description)` if it failed.
    pub(super) fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        let r = Qmp::negotiated(&self.dir.path("qmp.sock")).execute(method, params);
        match r.get("error") {
            Some(e) => Err(e["desc"].as_str().unwrap_or_default().to_string()),
            None => Ok(r["return"].clone()),
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.0.as_ref().expect("running").id()
    }

    pub(super) fn alive(&mut self) -> bool {
        matches!(self.child.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// What it has printed so far.
    pub(super) fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

/// stratad's arguments as qemu-storage-daemon's.
fn translate(dir: &TempDir, args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = args.iter();
    while let Some(a) = args.next() {
        if a == "-m" {
            args.next();
        } else if let Some(rest) = a.strip_prefix("driver=memory,") {
            let keys: Vec<(&str, &str)> = rest
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let get = |k: &str| keys.iter().find(|(x, _)| *x == k).unwrap().1;
            let (name, size) = (get("node-name"), parse_size(get("size")));
            let file = dir.path(&format!("{name}.img"));
            std::fs::File::create(&file).unwrap().set_len(size).unwrap();
            out.push(format!(
                "driver=file,node-name={name},filename={}",
                file.display()
            ));
        } else if a != "--no-pin" {
            out.push(a.clone());
        }
    }
    out
}

/// `64M`, `1G`, `4096` as bytes.
fn parse_size(s: &str) -> u64 {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let shift = match unit {
        "" => 0,
        "k" | "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => panic!("size {s}"),
    };
    num.parse::<u64>().unwrap() << shift
}
