//! stratad: the Strata daemon. Reactors on the chosen CPUs, the block graph, one admin
//! thread, and the control sockets: JSON-RPC 2.0 (SPDK style) and QMP (qemu-storage-daemon
//! style).
//!
//! ```text
//!   parse flags ---- usage errors: exit 2
//!   bind sockets --- 0600, stale files replaced, a live daemon is an error (exit 1)
//!   start reactors, graph, registry on the admin thread
//!   replay --config, then --blockdev, in order ---- a failing call: exit 1, naming it
//!   serve clients; print where; wait for quit / SIGINT / SIGTERM
//!   flush and close every node, stop reactors, close clients, remove sockets: exit 0
//! ```

mod chardev;

use clap::Parser;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use strata_engine::reactor::DEFAULT_IDLE_BUDGET_US;
use strata_engine::{CpuSet, Engine, EngineConfig, Graph, PollMode};
use strata_rpc::EventBus;
use strata_rpc::registry::Registry;
use strata_rpc::server::{Admin, Endpoint, Listen, Server, Wire, listener::parse_tcp, replay};

/// Where SPDK's spdk_tgt listens is /var/tmp/spdk.sock; stratad follows suit.
const DEFAULT_RPC_SOCKET: &str = "/var/tmp/strata.sock";

#[derive(Parser, Debug)]
#[command(
    name = "stratad",
    version,
    about = "The Strata block I/O daemon: QEMU's block layer semantics on SPDK-style reactors, \
             driven over JSON-RPC 2.0 and QMP",
    after_help = "Examples:\n  \
        stratad --blockdev driver=memory,node-name=ram0,size=1G\n  \
        stratad --rpc-socket /run/strata.sock --qmp-socket /run/strata-qmp.sock --config saved.json\n  \
        stratad --chardev socket,id=qmp0,path=/tmp/qmp.sock,server=on,wait=off --monitor chardev=qmp0 \\\n          \
        --blockdev '{\"driver\":\"file\",\"node-name\":\"disk\",\"filename\":\"/var/tmp/disk.img\"}'\n\n\
        Clients: strata-rpc (JSON-RPC), any QMP client (qemu.qmp, socat)."
)]
struct Args {
    /// JSON-RPC 2.0 Unix socket (created mode 0600).
    #[arg(long = "rpc-socket", value_name = "PATH", default_value = DEFAULT_RPC_SOCKET)]
    rpc_socket: PathBuf,
    /// Also serve JSON-RPC on TCP: PORT (on 127.0.0.1) or HOST:PORT. There is no
    /// authentication: anyone who can reach the port controls the daemon.
    #[arg(long = "rpc-tcp", value_name = "[HOST:]PORT")]
    rpc_tcp: Option<String>,
    /// Serve QMP on this Unix socket (created mode 0600). Repeatable.
    #[arg(long = "qmp-socket", value_name = "PATH")]
    qmp_socket: Vec<PathBuf>,
    /// qemu-storage-daemon style socket chardev for a --monitor:
    /// socket,id=ID,path=PATH,server=on,wait=off (or host=HOST,port=PORT). Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    chardev: Vec<String>,
    /// qemu-storage-daemon style QMP monitor on a chardev:
    /// chardev=ID[,mode=control][,pretty=on|off]. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    monitor: Vec<String>,
    /// A node to open at start, as blockdev-add's options in QEMU's dotted keyval syntax
    /// (driver=file,node-name=disk,filename=/x) or JSON. Repeatable; runs in order, after
    /// --config.
    #[arg(long, value_name = "OPTIONS")]
    blockdev: Vec<String>,
    /// Start the NBD server (qemu-storage-daemon's syntax):
    /// addr.type=unix,addr.path=PATH or addr.type=inet,addr.host=HOST,addr.port=PORT
    /// (port 0: any free port), plus max-connections=N, handshake-max-seconds=S.
    #[arg(long = "nbd-server", value_name = "OPTIONS")]
    nbd_server: Option<String>,
    /// Export a node over NBD (qemu-storage-daemon's syntax, after --nbd-server):
    /// [type=]nbd,id=ID,node-name=NODE[,name=NAME][,description=TEXT][,writable=on], or
    /// JSON. Repeatable.
    #[arg(long, value_name = "OPTIONS")]
    export: Vec<String>,
    /// Replay FILE at start: a JSON array of {"method", "params"} calls, the format
    /// save-config returns. A failing call aborts the start.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Reactor CPUs: a mask (0x3) or a list (0,1 or [0-1]). Default: every CPU this
    /// process may run on.
    #[arg(
        short = 'm',
        long = "cores",
        visible_alias = "cpumask",
        value_name = "CPUS"
    )]
    cores: Option<String>,
    /// How idle reactors wait: busy, hybrid or interrupt.
    #[arg(long = "poll-mode", value_name = "MODE", default_value = "hybrid")]
    poll_mode: PollMode,
    /// Hybrid mode: microseconds a reactor spins without work before it sleeps.
    #[arg(long = "idle-budget-us", value_name = "US", default_value_t = DEFAULT_IDLE_BUDGET_US)]
    idle_budget_us: u64,
    /// Interrupt mode: microseconds a busy reactor lets new work gather between passes
    /// (interrupt coalescing; 0: none). Fewer system calls per request for NBD clients.
    #[arg(long = "coalesce-us", value_name = "US", default_value_t = 0)]
    coalesce_us: u64,
    /// Do not pin reactors to their CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Write the daemon's process id to FILE (removed at exit).
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
}

/// Why stratad did not run.
enum Failure {
    /// Bad flags: exit 2.
    Usage(String),
    /// The daemon could not start: exit 1.
    Start(String),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("stratad: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Start(msg)) => {
            eprintln!("stratad: {msg}");
            ExitCode::from(1)
        }
    }
}

/// What the flags ask for, checked before anything is started.
struct Plan {
    listens: Vec<Listen>,
    blockdevs: Vec<(String, Value)>,
    /// `--nbd-server`, then each `--export`: (flag as given, method, params).
    exports: Vec<(String, &'static str, Value)>,
    engine: EngineConfig,
}

fn plan(args: &Args) -> Result<Plan, String> {
    let mut listens = vec![Listen {
        endpoint: Endpoint::Unix(args.rpc_socket.clone()),
        wire: Wire::JsonRpc,
    }];
    if let Some(tcp) = &args.rpc_tcp {
        listens.push(Listen {
            endpoint: Endpoint::Tcp(parse_tcp(tcp).map_err(|e| format!("--rpc-tcp: {e}"))?),
            wire: Wire::JsonRpc,
        });
    }
    for path in &args.qmp_socket {
        listens.push(Listen {
            endpoint: Endpoint::Unix(path.clone()),
            wire: Wire::Qmp { pretty: false },
        });
    }
    for (endpoint, pretty) in chardev::monitors(&args.chardev, &args.monitor)? {
        listens.push(Listen {
            endpoint,
            wire: Wire::Qmp { pretty },
        });
    }
    for (i, l) in listens.iter().enumerate() {
        if listens[..i].iter().any(|o| o.endpoint == l.endpoint) {
            return Err(format!("{} is given as two sockets", l.endpoint));
        }
    }
    let blockdevs = args
        .blockdev
        .iter()
        .map(|spec| blockdev_options(spec).map(|v| (spec.clone(), v)))
        .collect::<Result<_, _>>()?;
    let mut exports = Vec::new();
    if let Some(spec) = &args.nbd_server {
        let params = flag_options("--nbd-server", spec)?;
        exports.push((format!("--nbd-server '{spec}'"), "nbd-server-start", params));
    }
    for spec in &args.export {
        if args.nbd_server.is_none() {
            return Err("--export needs --nbd-server".to_string());
        }
        // qemu-storage-daemon's implied first key: "nbd,id=..." is "type=nbd,id=...".
        let first = spec.split(',').next().unwrap_or_default();
        let spec_full = if spec.starts_with('{') || first.contains('=') {
            spec.clone()
        } else {
            format!("type={spec}")
        };
        let params = flag_options("--export", &spec_full)?;
        exports.push((format!("--export '{spec}'"), "block-export-add", params));
    }
    let cores = match &args.cores {
        Some(c) => CpuSet::parse(c).map_err(|e| format!("--cores: {e}"))?,
        None => CpuSet::allowed(),
    };
    cores.check_allowed().map_err(|e| format!("--cores: {e}"))?;
    let engine = EngineConfig {
        cores,
        poll_mode: args.poll_mode,
        idle_budget: Duration::from_micros(args.idle_budget_us),
        coalesce: Duration::from_micros(args.coalesce_us),
        pin: !args.no_pin,
        ..EngineConfig::default()
    };
    Ok(Plan {
        listens,
        blockdevs,
        exports,
        engine,
    })
}

/// Options of `--nbd-server` and `--export`: JSON if it starts with `{`, else keyval.
fn flag_options(flag: &str, spec: &str) -> Result<Value, String> {
    if spec.trim_start().starts_with('{') {
        match serde_json::from_str::<Value>(spec) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err(format!("{flag} '{spec}': expected a JSON object")),
            Err(e) => Err(format!("{flag} '{spec}' is not valid JSON: {e}")),
        }
    } else {
        strata_drivers::keyval::parse(spec).map_err(|e| format!("{flag} '{spec}': {e}"))
    }
}

/// `--blockdev` options: JSON if it starts with `{`, else dotted keyval.
fn blockdev_options(spec: &str) -> Result<Value, String> {
    if spec.trim_start().starts_with('{') {
        match serde_json::from_str(spec) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err(format!("--blockdev '{spec}': expected a JSON object")),
            Err(e) => Err(format!("--blockdev '{spec}' is not valid JSON: {e}")),
        }
    } else {
        strata_drivers::keyval::parse(spec).map_err(|e| format!("--blockdev '{spec}': {e}"))
    }
}

fn run(args: Args) -> Result<(), Failure> {
    let plan = plan(&args).map_err(Failure::Usage)?;
    let config = match &args.config {
        Some(path) => replay::load(path).map_err(|e| Failure::Start(format!("--config {e}")))?,
        None => Vec::new(),
    };
    let server = Server::bind(&plan.listens).map_err(Failure::Start)?;

    let events = EventBus::new();
    let bus = events.clone();
    let engine_config = plan.engine.clone();
    let admin = Admin::start(move || {
        let engine =
            Engine::start(engine_config).map_err(|e| format!("cannot start the reactors: {e}"))?;
        let graph = Graph::new(engine, Arc::new(strata_drivers::open_node));
        Ok(Registry::new(graph, bus))
    })
    .map_err(Failure::Start)?;

    // SIGINT, SIGTERM, SIGHUP: shut down through the admin thread, like `quit`.
    let signalled = Arc::new(AtomicBool::new(false));
    {
        let handle = admin.handle();
        let signalled = signalled.clone();
        if let Err(e) = ctrlc::set_handler(move || {
            signalled.store(true, Ordering::SeqCst);
            handle.stop();
        }) {
            admin.handle().stop();
            admin.wait();
            return Err(Failure::Start(format!("cannot handle signals: {e}")));
        }
    }

    let started = replay::replay(&admin.handle(), &config)
        .map_err(|e| {
            let path = args.config.as_deref().unwrap_or(Path::new(""));
            format!("--config {}: {e}", path.display())
        })
        .and_then(|()| {
            for (spec, options) in &plan.blockdevs {
                admin
                    .handle()
                    .call("blockdev-add", options.clone())
                    .map_err(|e| format!("--blockdev '{spec}': {e}"))?;
            }
            for (flag, method, params) in &plan.exports {
                admin
                    .handle()
                    .call(method, params.clone())
                    .map_err(|e| format!("{flag}: {e}"))?;
            }
            Ok(())
        })
        .and_then(|()| write_pidfile(args.pidfile.as_deref()));
    if let Err(e) = started {
        admin.handle().stop();
        admin.wait();
        drop(server);
        remove_pidfile(args.pidfile.as_deref());
        if signalled.load(Ordering::SeqCst) {
            return Ok(());
        }
        return Err(Failure::Start(e));
    }

    let endpoints = server.endpoints();
    let running = match server.serve(admin.handle(), &events) {
        Ok(r) => r,
        Err(e) => {
            admin.handle().stop();
            admin.wait();
            remove_pidfile(args.pidfile.as_deref());
            return Err(Failure::Start(e));
        }
    };
    // The registry holds the only other bus: the event thread ends with it.
    drop(events);
    let nbd = admin
        .handle()
        .call("query-nbd-server", Value::Null)
        .ok()
        .and_then(|v| v["addr"].as_str().map(str::to_string));
    announce(&endpoints, nbd.as_deref(), &plan.engine);

    admin.wait();
    running.stop();
    remove_pidfile(args.pidfile.as_deref());
    Ok(())
}

/// The one line saying where the daemon listens.
fn announce(endpoints: &[(Endpoint, Wire)], nbd: Option<&str>, engine: &EngineConfig) {
    let mut list: Vec<String> = endpoints
        .iter()
        .map(|(e, w)| match w {
            Wire::JsonRpc => format!("JSON-RPC {e}"),
            Wire::Qmp { .. } => format!("QMP {e}"),
        })
        .collect();
    if let Some(addr) = nbd {
        list.push(format!("NBD nbd={addr}"));
    }
    let n = engine.cores.len();
    let line = format!(
        "stratad {} listening: {} ({} reactor{} on CPU{} {}, {} polling, pid {})",
        env!("CARGO_PKG_VERSION"),
        list.join(", "),
        n,
        if n == 1 { "" } else { "s" },
        if n == 1 { "" } else { "s" },
        engine.cores,
        engine.poll_mode,
        std::process::id()
    );
    // Nobody reading stdout is no reason to fail.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn write_pidfile(path: Option<&Path>) -> Result<(), String> {
    let Some(path) = path else {
        return Ok(());
    };
    let tmp = path.with_extension("tmp-stratad");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write the pid file {}: {e}", path.display())
        })
}

fn remove_pidfile(path: Option<&Path>) {
    if let Some(path) = path
        && std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["stratad"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn the_default_plan_is_json_rpc_on_var_tmp_and_hybrid_polling() {
        let p = plan(&args(&[])).unwrap();
        assert_eq!(
            p.listens,
            vec![Listen {
                endpoint: Endpoint::Unix(DEFAULT_RPC_SOCKET.into()),
                wire: Wire::JsonRpc
            }]
        );
        assert_eq!(p.engine.poll_mode, PollMode::Hybrid);
        assert!(p.blockdevs.is_empty());
    }

    #[test]
    fn every_socket_flag_becomes_a_listen() {
        let p = plan(&args(&[
            "--rpc-socket",
            "/tmp/r.sock",
            "--rpc-tcp",
            "5260",
            "--qmp-socket",
            "/tmp/q.sock",
            "--chardev",
            "socket,id=m,path=/tmp/m.sock,server=on,wait=off",
            "--monitor",
            "chardev=m,pretty=on",
        ]))
        .unwrap();
        let got: Vec<_> = p
            .listens
            .iter()
            .map(|l| (l.endpoint.to_string(), l.wire))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/tmp/r.sock".to_string(), Wire::JsonRpc),
                ("tcp:127.0.0.1:5260".to_string(), Wire::JsonRpc),
                ("/tmp/q.sock".to_string(), Wire::Qmp { pretty: false }),
                ("/tmp/m.sock".to_string(), Wire::Qmp { pretty: true }),
            ]
        );
        let e = plan(&args(&["--rpc-socket", "/tmp/x", "--qmp-socket", "/tmp/x"]))
            .err()
            .unwrap();
        assert!(e.contains("two sockets"), "{e}");
    }

    #[test]
    fn blockdevs_are_keyval_or_json() {
        let p = plan(&args(&[
            "--blockdev",
            "driver=null-co,node-name=n0,size=1M",
            "--blockdev",
            r#"{"driver":"memory","node-name":"m0","size":65536}"#,
        ]))
        .unwrap();
        assert_eq!(
            p.blockdevs[0].1,
            serde_json::json!({"driver":"null-co","node-name":"n0","size":"1M"})
        );
        assert_eq!(p.blockdevs[1].1["size"], 65536);
        for bad in ["{\"driver\":", "[1]", "=x"] {
            assert!(plan(&args(&["--blockdev", bad])).is_err(), "{bad}");
        }
    }

    #[test]
    fn cores_and_poll_mode_follow_strata_perf() {
        let p = plan(&args(&["-m", "[0]", "--poll-mode", "interrupt"])).unwrap();
        assert_eq!(p.engine.cores.cpus(), &[0]);
        assert_eq!(p.engine.poll_mode, PollMode::Interrupt);
        assert!(plan(&args(&["--cores", "0x0"])).is_err());
        assert!(Args::try_parse_from(["stratad", "--poll-mode", "lazy"]).is_err());
    }
}
