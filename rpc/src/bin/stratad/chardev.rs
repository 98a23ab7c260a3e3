//! qemu-storage-daemon's monitor flags:
//!
//! ```text
//!   --chardev socket,id=qmp0,path=/run/qsd.sock,server=on,wait=off
//!   --chardev socket,id=qmp1,host=127.0.0.1,port=4444,server=on,wait=off
//!   --monitor chardev=qmp0[,mode=control][,pretty=on|off]
//! ```
//!
//! Parsed with QemuOpts' rules: `,,` is a literal comma, the first item may omit its key
//! (`backend` for a chardev, `chardev` for a monitor), a bare key means `on`. Only
//! listening socket chardevs exist in stratad; anything else is refused with a message
//! saying what to write instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use strata_drivers::options::parse_bool;
use strata_rpc::server::Endpoint;
use strata_rpc::server::listener::parse_tcp;

/// A `--chardev`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chardev {
    pub id: String,
    pub endpoint: Endpoint,
}

/// A `--monitor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Monitor {
    pub chardev: String,
    pub pretty: bool,
}

/// QemuOpts items: `(key, value)`; the first item's key is `implied` when it has none,
/// a later bare key has the value `on`.
fn split_opts(s: &str, implied: &str) -> Result<Vec<(String, String)>, String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for (i, part) in parts.into_iter().enumerate() {
        match part.split_once('=') {
            Some((k, v)) => items.push((k.to_string(), v.to_string())),
            None if i == 0 => items.push((implied.to_string(), part)),
            None if part.is_empty() => return Err(format!("empty option in '{s}'")),
            None => items.push((part, "on".to_string())),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (k, _) in &items {
        if !seen.insert(k.as_str()) {
            return Err(format!("option '{k}' given twice in '{s}'"));
        }
    }
    Ok(items)
}

fn boolean(key: &str, v: &str) -> Result<bool, String> {
    parse_bool(v).map_err(|_| format!("'{key}={v}': expected on or off"))
}

/// Parses one `--chardev`.
pub fn parse_chardev(s: &str) -> Result<Chardev, String> {
    let mut id = None;
    let mut backend = None;
    let mut path: Option<PathBuf> = None;
    let mut host: Option<String> = None;
    let mut port: Option<String> = None;
    let mut server = false;
    for (k, v) in split_opts(s, "backend")? {
        match k.as_str() {
            "backend" => backend = Some(v),
            "id" => id = Some(v),
            "path" => path = Some(PathBuf::from(v)),
            "host" => host = Some(v),
            "port" => port = Some(v),
            "server" => server = boolean(&k, &v)?,
            "wait" => {
                if boolean(&k, &v)? {
                    return Err(format!(
                        "--chardev '{s}': wait=on is not supported (stratad never waits for \
                         a client before serving): use wait=off"
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "--chardev '{s}': option '{k}' is not supported (stratad's socket chardevs \
                     take id, path or host and port, server=on and wait=off)"
                ));
            }
        }
    }
    let backend = backend.unwrap_or_default();
    if backend != "socket" {
        return Err(format!(
            "--chardev '{s}': backend '{backend}' is not supported: stratad serves QMP only on \
             socket chardevs (socket,id=ID,path=PATH,server=on,wait=off)"
        ));
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| format!("--chardev '{s}': an id is required (id=NAME)"))?;
    if !server {
        return Err(format!(
            "--chardev '{s}': a client socket (server=off) is not supported: stratad only \
             listens; add server=on"
        ));
    }
    let endpoint = match (path, host, port) {
        (Some(p), None, None) => Endpoint::Unix(p),
        (None, host, Some(port)) => {
            let addr: SocketAddr = match host {
                Some(h) if h.contains(':') && !h.starts_with('[') => {
                    parse_tcp(&format!("[{h}]:{port}"))
                }
                Some(h) => parse_tcp(&format!("{h}:{port}")),
                None => parse_tcp(&port),
            }
            .map_err(|e| format!("--chardev '{s}': {e}"))?;
            Endpoint::Tcp(addr)
        }
        (None, _, None) => {
            return Err(format!(
                "--chardev '{s}': say where to listen: path=PATH, or host=HOST,port=PORT"
            ));
        }
        _ => {
            return Err(format!(
                "--chardev '{s}': give either path or host and port, not both"
            ));
        }
    };
    Ok(Chardev { id, endpoint })
}

/// Parses one `--monitor`.
pub fn parse_monitor(s: &str) -> Result<Monitor, String> {
    let mut chardev = None;
    let mut pretty = false;
    for (k, v) in split_opts(s, "chardev")? {
        match k.as_str() {
            "chardev" => chardev = Some(v),
            "id" => {}
            "pretty" => pretty = boolean(&k, &v)?,
            "mode" if v == "control" => {}
            "mode" => {
                return Err(format!(
                    "--monitor '{s}': mode={v} is not supported: stratad's monitors speak QMP \
                     (mode=control)"
                ));
            }
            _ => {
                return Err(format!(
                    "--monitor '{s}': option '{k}' is not supported (chardev=ID, mode=control, \
                     pretty=on|off)"
                ));
            }
        }
    }
    let chardev = chardev
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("--monitor '{s}': chardev=ID is required"))?;
    Ok(Monitor { chardev, pretty })
}

/// The QMP sockets `--chardev`/`--monitor` pairs describe: `(endpoint, pretty)`.
pub fn monitors(chardevs: &[String], monitors: &[String]) -> Result<Vec<(Endpoint, bool)>, String> {
    let mut devs: Vec<(Chardev, bool)> = Vec::new();
    for c in chardevs {
        let c = parse_chardev(c)?;
        if devs.iter().any(|(d, _)| d.id == c.id) {
            return Err(format!("--chardev: duplicate id '{}'", c.id));
        }
        devs.push((c, false));
    }
    let mut out = Vec::new();
    for m in monitors {
        let m = parse_monitor(m)?;
        let Some((dev, used)) = devs.iter_mut().find(|(d, _)| d.id == m.chardev) else {
            return Err(format!(
                "--monitor: chardev '{}' not found (define it with --chardev \
                 socket,id={},path=PATH,server=on,wait=off)",
                m.chardev, m.chardev
            ));
        };
        if *used {
            return Err(format!(
                "--monitor: chardev '{}' is already used by another monitor",
                m.chardev
            ));
        }
        *used = true;
        out.push((dev.endpoint.clone(), m.pretty));
    }
    for (dev, used) in &devs {
        if !used {
            eprintln!(
                "stratad: warning: --chardev id={} is not used by any --monitor; not listening on it",
                dev.id
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_socket_chardevs_and_monitors_parse() {
        let c = parse_chardev("socket,id=qmp0,path=/tmp/q,,x.sock,server=on,wait=off").unwrap();
        assert_eq!(c.id, "qmp0");
        assert_eq!(c.endpoint, Endpoint::Unix("/tmp/q,x.sock".into()));
        let c = parse_chardev("backend=socket,id=t,host=127.0.0.1,port=4444,server").unwrap();
        assert_eq!(c.endpoint, Endpoint::Tcp("127.0.0.1:4444".parse().unwrap()));
        let c = parse_chardev("socket,id=t,host=::1,port=4444,server=on").unwrap();
        assert_eq!(c.endpoint, Endpoint::Tcp("[::1]:4444".parse().unwrap()));
        assert_eq!(
            parse_monitor("chardev=qmp0,mode=control,pretty=on").unwrap(),
            Monitor {
                chardev: "qmp0".into(),
                pretty: true
            }
        );
        assert_eq!(parse_monitor("qmp0").unwrap().chardev, "qmp0");
        let m = monitors(
            &["socket,id=a,path=/tmp/a,server=on,wait=off".into()],
            &["chardev=a".into()],
        )
        .unwrap();
        assert_eq!(m, vec![(Endpoint::Unix("/tmp/a".into()), false)]);
    }

    #[test]
    fn what_stratad_cannot_do_is_refused_with_the_way_out() {
        for (arg, part) in [
            ("stdio,id=x", "backend 'stdio' is not supported"),
            ("socket,id=x,path=/p,server=off", "add server=on"),
            ("socket,id=x,path=/p", "add server=on"),
            ("socket,id=x,path=/p,server=on,wait=on", "use wait=off"),
            ("socket,path=/p,server=on", "id"),
            ("socket,id=x,server=on", "path=PATH"),
            ("socket,id=x,path=/p,port=1,server=on", "not both"),
            (
                "socket,id=x,path=/p,server=on,telnet=on",
                "'telnet' is not supported",
            ),
            ("socket,id=x,id=y,path=/p,server=on", "twice"),
        ] {
            let e = parse_chardev(arg).unwrap_err();
            assert!(e.contains(part), "{arg}: {e}");
        }
        let e = parse_monitor("chardev=x,mode=readline").unwrap_err();
        assert!(e.contains("mode=control"), "{e}");
        let e = monitors(&[], &["chardev=nope".into()]).unwrap_err();
        assert!(e.contains("chardev 'nope' not found"), "{e}");
        let e = monitors(
            &["socket,id=a,path=/tmp/a,server=on".into()],
            &["a".into(), "a".into()],
        )
        .unwrap_err();
        assert!(e.contains("already used"), "{e}");
    }
}
