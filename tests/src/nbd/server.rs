//! The NBD server the tests talk to: stratad, started through the harness's [`Daemon`]
//! with `--nbd-server` on a Unix socket in its directory or on a TCP port of 127.0.0.1,
//! its address taken from the banner. For reference runs it is qemu-storage-daemon
//! instead, with the same flags (`STRATA_NBD_SERVER`, see `qsd.rs`).

use super::Addr;
use super::qsd::{self, Qsd};
use crate::{Daemon, TempDir};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::Path;

/// Where the NBD server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// `nbd.sock` in the daemon's directory.
    Unix,
    /// 127.0.0.1, on a port the system picks.
    Tcp,
}

/// The daemon behind a [`Server`].
#[derive(Debug)]
enum Process {
    Stratad(Daemon),
    Qsd(Qsd),
}

/// A daemon with an NBD server, killed on drop. When a test fails, dropping it prints
/// what the daemon said.
#[derive(Debug)]
pub struct Server {
    process: Process,
    /// Where the NBD server listens; `None` until a test that started it over RPC sets
    /// it.
    pub nbd: Option<Addr>,
}

impl Server {
    /// A daemon whose NBD server listens as `listen` says (`None`: no NBD server yet),
    /// with `nbd_opts` appended to `--nbd-server` (`,max-connections=2`), then `args`
    /// (`--blockdev`, `--export`, `-m` ...); returns once it serves.
    pub fn start(listen: Option<Listen>, nbd_opts: &str, args: &[&str]) -> Server {
        let dir = TempDir::new("nbd");
        let sock = dir.path("nbd.sock");
        let reference = qsd::wanted();
        // qemu-storage-daemon does not say which port it took: it gets a free one.
        let port = if reference { qsd::free_port() } else { 0 };
        let mut all: Vec<String> = Vec::new();
        match listen {
            Some(Listen::Unix) => all.extend([
                "--nbd-server".into(),
                format!("addr.type=unix,addr.path={}{nbd_opts}", sock.display()),
            ]),
            Some(Listen::Tcp) => all.extend([
                "--nbd-server".into(),
                format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}{nbd_opts}"),
            ]),
            None => assert!(nbd_opts.is_empty(), "{nbd_opts:?} without an NBD server"),
        }
        all.extend(args.iter().map(|a| a.to_string()));
        if reference {
            let nbd = listen.map(|l| match l {
                Listen::Unix => Addr::Unix(sock),
                Listen::Tcp => Addr::Tcp((Ipv4Addr::LOCALHOST, port).into()),
            });
            return Server {
                process: Process::Qsd(Qsd::start(dir, &all)),
                nbd,
            };
        }
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let daemon = Daemon::start_in(dir, &all);
        let nbd = daemon.nbd_addr();
        match (listen, &nbd) {
            (None, None) => {}
            (Some(Listen::Unix), Some(Addr::Unix(p))) if *p == sock => {}
            (Some(Listen::Tcp), Some(Addr::Tcp(a)))
                if a.ip() == Ipv4Addr::LOCALHOST && a.port() != 0 => {}
            _ => panic!(
                "NBD server on {listen:?}, but the banner says {nbd:?}: {}",
                daemon.banner
            ),
        }
        Server {
            process: Process::Stratad(daemon),
            nbd,
        }
    }

    /// Where the NBD server listens; panics if it does not.
    pub fn addr(&self) -> &Addr {
        self.nbd.as_ref().expect("the daemon runs an NBD server")
    }

    /// The URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        self.addr().uri(name)
    }

    /// The URI that lists the server's exports (`nbdinfo --list`).
    pub fn list_uri(&self) -> String {
        self.addr().list_uri()
    }

    /// The daemon's directory (removed with it).
    pub fn dir(&self) -> &Path {
        match &self.process {
            Process::Stratad(d) => &d.dir.0,
            Process::Qsd(q) => &q.dir.0,
        }
    }

    /// Calls `method` over JSON-RPC (QMP on qemu-storage-daemon); `Err(message)` if it
    /// failed.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        match &self.process {
            Process::Stratad(d) => d
                .rpc()
                .call(method, params)
                .map_err(|(code, msg)| format!("{msg} (code {code})")),
            Process::Qsd(q) => q.call(method, params),
        }
    }

    /// Calls `method`, which must succeed.
    pub fn ok(&self, method: &str, params: Value) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    pub fn pid(&self) -> u32 {
        match &self.process {
            Process::Stratad(d) => d.pid() as u32,
            Process::Qsd(q) => q.pid(),
        }
    }

    /// Asserts that the daemon still runs.
    pub fn assert_alive(&mut self) {
        let alive = match &mut self.process {
            Process::Stratad(d) => d.alive(),
            Process::Qsd(q) => q.alive(),
        };
        assert!(alive, "the NBD server died: {}", self.output());
    }

    /// Resident set size in bytes (VmRSS of /proc/PID/status).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib << 10
    }

    /// What the daemon has printed so far.
    fn output(&self) -> String {
        match &self.process {
            Process::Stratad(d) => d.stdout() + &d.stderr(),
            Process::Qsd(q) => q.output(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- the daemon's output\n{}", self.output());
        }
    }
}
