//! strata-rpc: call one stratad JSON-RPC method from a shell (SPDK's rpc.py, for Strata).
//!
//! ```text
//!   strata-rpc [-s SOCKET | --tcp [HOST:]PORT] METHOD [key=value ...]
//!   strata-rpc METHOD --json '{"driver": "null-co", "node-name": "n0"}'
//!   strata-rpc --wait EVENT [--timeout SECONDS]
//! ```
//!
//! `key=value` pairs are QEMU's dotted keyval syntax, so nested options read as on
//! stratad's command line (`file.driver=file file.filename=/x`); values are strings, as
//! from `--blockdev`. The result is printed as pretty JSON. Exit status: 0 success,
//! 1 the command failed (or `--wait` timed out), 2 no connection or bad usage.

use clap::Parser;
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use strata_rpc::server::listener::parse_tcp;

const DEFAULT_SOCKET: &str = "/var/tmp/strata.sock";

#[derive(Parser, Debug)]
#[command(
    name = "strata-rpc",
    version,
    about = "Call a stratad JSON-RPC method, or wait for an event",
    after_help = "Examples:\n  \
        strata-rpc rpc_get_methods\n  \
        strata-rpc blockdev-add driver=file node-name=f0 filename=/var/tmp/disk.img\n  \
        strata-rpc blockdev-add --json '{\"driver\":\"null-co\",\"node-name\":\"n0\",\"size\":1048576}'\n  \
        strata-rpc query-named-block-nodes\n  \
        strata-rpc --wait BLOCK_NODE_ADDED --timeout 10"
)]
struct Args {
    /// stratad's JSON-RPC Unix socket.
    #[arg(short = 's', long = "socket", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Connect over TCP instead: PORT (on 127.0.0.1) or HOST:PORT.
    #[arg(long, value_name = "[HOST:]PORT", conflicts_with = "socket")]
    tcp: Option<String>,
    /// Params as raw JSON instead of key=value pairs.
    #[arg(long, value_name = "JSON", conflicts_with = "params")]
    json: Option<String>,
    /// Subscribe to events and wait for one named EVENT; print it.
    #[arg(long, value_name = "EVENT", conflicts_with_all = ["method", "json"])]
    wait: Option<String>,
    /// Give up after SECONDS (exit 1). Default: wait as long as it takes.
    #[arg(short = 't', long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// The method to call (`strata-rpc rpc_get_methods` lists them).
    #[arg(required_unless_present = "wait")]
    method: Option<String>,
    /// Params as key=value pairs (QEMU dotted keys: file.filename=/x).
    #[arg(value_name = "KEY=VALUE")]
    params: Vec<String>,
}

/// How the run ended.
enum Failure {
    /// The daemon answered with an error, or nothing came in time: exit 1.
    Failed(String),
    /// No daemon reached, or bad usage: exit 2.
    Unreachable(String),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Failed(msg)) => {
            eprintln!("{msg}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(msg)) => {
            eprintln!("{msg}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    let deadline = match args.timeout {
        Some(t) if (0.0..1e9).contains(&t) => Some(Instant::now() + Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(Failure::Unreachable(format!(
                "strata-rpc: --timeout {t} is not a number of seconds"
            )));
        }
        None => None,
    };
    let (method, params) = match &args.wait {
        Some(_) => ("subscribe_events".to_string(), None),
        None => (
            args.method
                .clone()
                .expect("BUG: clap requires METHOD without --wait"),
            params(args).map_err(|e| Failure::Unreachable(format!("strata-rpc: {e}")))?,
        ),
    };
    let mut conn = Conn::connect(args)?;
    let mut request = json!({"jsonrpc": "2.0", "method": method, "id": 1});
    if let Some(p) = params {
        request["params"] = p;
    }
    conn.send(&request)?;
    loop {
        let msg = conn.recv(deadline).map_err(|e| match e {
            Recv::TimedOut if args.wait.is_some() => Failure::Failed(format!(
                "error: no {} event within {} s",
                args.wait.as_deref().unwrap_or_default(),
                args.timeout.unwrap_or_default()
            )),
            Recv::TimedOut => Failure::Failed(format!(
                "error: no reply to {method} within {} s",
                args.timeout.unwrap_or_default()
            )),
            Recv::Closed => Failure::Failed(format!(
                "error: stratad closed the connection before answering {method}"
            )),
            Recv::Bad(e) => Failure::Failed(format!("error: bad reply from stratad: {e}")),
        })?;
        if msg.get("id") == Some(&json!(1)) {
            if let Some(err) = msg.get("error") {
                return Err(Failure::Failed(format!(
                    "error: {} (code {})",
                    err["message"].as_str().unwrap_or("(no message)"),
                    err["code"]
                )));
            }
            if args.wait.is_none() {
                print_json(msg.get("result").unwrap_or(&Value::Null));
                return Ok(());
            }
            continue;
        }
        if let Some(want) = &args.wait
            && msg["method"] == "event"
            && msg["params"]["event"] == want.as_str()
        {
            print_json(&msg["params"]);
            return Ok(());
        }
    }
}

/// The params to send: `--json`, the key=value pairs, or none.
fn params(args: &Args) -> Result<Option<Value>, String> {
    if let Some(raw) = &args.json {
        return serde_json::from_str(raw)
            .map(Some)
            .map_err(|e| format!("--json is not valid JSON: {e}"));
    }
    if args.params.is_empty() {
        return Ok(None);
    }
    if let Some(bad) = args.params.iter().find(|p| !p.contains('=')) {
        return Err(format!(
            "'{bad}' is not KEY=VALUE (use --json for params that are not strings)"
        ));
    }
    strata_drivers::keyval::parse(&args.params.join(","))
        .map(Some)
        .map_err(|e| format!("bad params: {e}"))
}

fn print_json(v: &Value) {
    let text = serde_json::to_string_pretty(v).expect("BUG: a JSON value serializes");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

enum Recv {
    TimedOut,
    Closed,
    Bad(String),
}

/// A connection to stratad, reading one JSON value at a time.
struct Conn {
    stream: Box<dyn Socket>,
    buf: Vec<u8>,
}

trait Socket: Read + Write {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Socket for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Socket for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Conn {
    fn connect(args: &Args) -> Result<Conn, Failure> {
        let hint = "hint: is stratad running? Point at its socket with -s PATH, or at its \
                    --rpc-tcp port with --tcp [HOST:]PORT";
        let stream: Box<dyn Socket> = match &args.tcp {
            Some(t) => {
                let addr = parse_tcp(t)
                    .map_err(|e| Failure::Unreachable(format!("strata-rpc: --tcp: {e}")))?;
                Box::new(TcpStream::connect(addr).map_err(|e| {
                    Failure::Unreachable(format!(
                        "strata-rpc: cannot connect to {addr}: {e}\n{hint}"
                    ))
                })?)
            }
            None => Box::new(UnixStream::connect(&args.socket).map_err(|e| {
                Failure::Unreachable(format!(
                    "strata-rpc: cannot connect to {}: {e}\n{hint}",
                    args.socket.display()
                ))
            })?),
        };
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, v: &Value) -> Result<(), Failure> {
        let mut bytes = serde_json::to_vec(v).expect("BUG: a JSON value serializes");
        bytes.push(b'\n');
        self.stream
            .write_all(&bytes)
            .map_err(|e| Failure::Failed(format!("error: cannot send the request to stratad: {e}")))
    }

    /// The next JSON value from the daemon (replies come one per line).
    fn recv(&mut self, deadline: Option<Instant>) -> Result<Value, Recv> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map_err(|e| Recv::Bad(e.to_string()));
            }
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Recv::TimedOut);
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream
                .set_timeout(timeout)
                .map_err(|e| Recv::Bad(e.to_string()))?;
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Recv::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(Recv::TimedOut);
                }
                Err(e) => return Err(Recv::Bad(e.to_string())),
            }
        }
    }
}
