//! `null-co`: a node that stores nothing (QEMU's null-co, SPDK's null bdev).
//!
//! Options as QEMU: `size` (default 1 GiB), `read-zeroes` (default off: reads leave the
//! buffer as it was, the cheapest possible read), `latency-ns` (delay every request by
//! this long, on the reactor's timers), `read-only` (default off: on makes the node refuse
//! writes with `EPERM`). Every op succeeds; block-status reports the whole range as zero
//! when `read-zeroes` is on, else as data.

use crate::options;
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;
use strata_engine::graph::Children;
use strata_engine::reactor;
use strata_engine::{
    Completion, Driver, DriverInfo, Errno, Extent, ExtentState, IoFuture, Op, OpSet, Queue, Request,
};

/// `null-co` options.
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NullOptions {
    /// Size of the node in bytes.
    #[serde(default = "default_size", deserialize_with = "options::size")]
    #[schemars(schema_with = "options::size_schema")]
    pub size: u64,
    /// Reads zero the buffer (else they leave it as it was).
    #[serde(default, deserialize_with = "options::boolean")]
    #[schemars(schema_with = "options::boolean_schema")]
    pub read_zeroes: bool,
    /// Delay of every request, in nanoseconds.
    #[serde(default, deserialize_with = "options::number")]
    #[schemars(schema_with = "options::number_schema")]
    pub latency_ns: u64,
    /// QEMU's common `cache.*` options: accepted, and meaningless without a host file.
    #[serde(default)]
    pub cache: options::CacheOptions,
    /// The node refuses writes.
    #[serde(default, deserialize_with = "options::read_only")]
    #[schemars(schema_with = "options::boolean_schema")]
    pub read_only: bool,
}

fn default_size() -> u64 {
    1 << 30
}

/// A `null-co` node.
#[derive(Debug)]
pub struct NullCo {
    opts: NullOptions,
}

impl NullCo {
    pub fn new(opts: NullOptions) -> NullCo {
        NullCo { opts }
    }
}

impl Driver for NullCo {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }

    fn info(&self) -> DriverInfo {
        DriverInfo {
            size: self.opts.size,
            request_alignment: 1,
            max_transfer: 1 << 30,
            ops: OpSet::all(),
            read_only: self.opts.read_only,
        }
    }

    fn open_queue(&self, _children: &Children) -> Result<Box<dyn Queue>, Errno> {
        Ok(Box::new(NullQueue {
            read_zeroes: self.opts.read_zeroes,
            latency: (self.opts.latency_ns > 0).then(|| Duration::from_nanos(self.opts.latency_ns)),
        }))
    }
}

struct NullQueue {
    read_zeroes: bool,
    latency: Option<Duration>,
}

impl NullQueue {
    fn complete(&self, mut req: Request) -> Request {
        match req.op {
            Op::Read if self.read_zeroes => {
                if let Some(buf) = req.buf.as_mut() {
                    buf.fill(0);
                }
            }
            Op::BlockStatus => {
                let state = ExtentState {
                    allocated: true,
                    zero: self.read_zeroes,
                    data: !self.read_zeroes,
                };
                req.extents.push(Extent {
                    offset: req.offset,
                    len: req.len,
                    state,
                });
            }
            _ => {}
        }
        req
    }
}

impl Queue for NullQueue {
    #[inline]
    fn submit(&self, req: Request) -> IoFuture {
        let req = self.complete(req);
        match self.latency {
            None => IoFuture::ready(req, Ok(())),
            Some(d) => IoFuture::pending(async move {
                reactor::sleep(d).await;
                Completion::ok(req)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::conformance::{self, Expect, on_reactor};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use strata_engine::{Buffer, Driver, Handle, Request};

    fn null(opts: &str) -> Arc<dyn Driver> {
        crate::open_keyval(&format!("driver=null-co,size=8M,{opts}")).expect("open null-co")
    }

    #[test]
    fn null_co_passes_the_conformance_suite() {
        conformance::run("null-co", &|| null(""), Expect::stores_nothing());
    }

    #[test]
    fn null_co_read_only_passes_the_conformance_suite() {
        conformance::run(
            "null-co (and read-only)",
            &|| null(""),
            Expect::stores_nothing().read_only(&|| null("read-only=on")),
        );
    }

    #[test]
    fn read_only_defaults_to_off_and_accepts_booleans() {
        assert!(!null("").info().read_only);
        assert!(null("read-only=on").info().read_only);
        let node = crate::open(&serde_json::json!({"driver": "null-co", "read-only": true}))
            .expect("open");
        assert!(node.info().read_only);
        let e = crate::open_keyval("driver=null-co,read-only=perhaps").unwrap_err();
        assert!(e.message.contains("read-only"), "{e}");
    }

    #[test]
    fn null_co_with_read_zeroes_passes_the_conformance_suite() {
        conformance::run(
            "null-co read-zeroes",
            &|| null("read-zeroes=on"),
            Expect::stores_nothing(),
        );
    }

    /// Reads into a buffer full of 0xaa; returns the buffer and the first extent's `zero`.
    fn read_and_status(node: Arc<dyn Driver>) -> (Vec<u8>, bool) {
        on_reactor(move || async move {
            let h = Handle::open(&*node).expect("queue");
            let mut buf = Buffer::new(4096);
            buf.fill(0xaa);
            let c = h.submit(Request::read(4096, buf)).await;
            assert_eq!(c.result, Ok(()));
            let s = h.submit(Request::block_status(0, 8192)).await;
            assert_eq!(s.result, Ok(()));
            (c.req.buf.unwrap().to_vec(), s.req.extents[0].state.zero)
        })
    }

    #[test]
    fn read_zeroes_zeroes_the_buffer_and_reports_zeroes() {
        let (data, zero) = read_and_status(null("read-zeroes=on"));
        assert!(data.iter().all(|&b| b == 0));
        assert!(zero);
    }

    #[test]
    fn without_read_zeroes_the_buffer_is_left_alone_and_reported_as_data() {
        let (data, zero) = read_and_status(null(""));
        assert!(data.iter().all(|&b| b == 0xaa));
        assert!(!zero);
    }

    #[test]
    fn latency_ns_delays_every_request() {
        let latency = Duration::from_millis(20);
        let node = null(&format!("latency-ns={}", latency.as_nanos()));
        let took = on_reactor(move || async move {
            let h = Handle::open(&*node).expect("queue");
            let mut took = Vec::new();
            for req in [
                Request::read(0, Buffer::new(512)),
                Request::flush(),
                Request::block_status(0, 512),
            ] {
                let t0 = Instant::now();
                assert_eq!(h.submit(req).await.result, Ok(()));
                took.push(t0.elapsed());
            }
            took
        });
        for t in took {
            assert!(
                t >= latency,
                "a request took {t:?}, less than latency-ns ({latency:?})"
            );
        }
    }
}
