//! A `raw` node's queue on one reactor: requests go down to the child shifted by the
//! window's offset and come back in the window's coordinates.

use strata_engine::graph::Child;
use strata_engine::{Completion, IoFuture, Op, Queue, Request};

/// One reactor's queue: the child there and the window's start.
pub(super) struct RawQueue {
    child: Child,
    offset: u64,
}

impl RawQueue {
    pub fn new(child: Child, offset: u64) -> RawQueue {
        RawQueue { child, offset }
    }
}

impl Queue for RawQueue {
    #[inline]
    fn submit(&self, mut req: Request) -> IoFuture {
        if self.offset == 0 {
            // The window starts where the child does: nothing to translate, and Handle
            // has already kept the request inside the window.
            return self.child.submit(req);
        }
        let offset = self.offset;
        if req.op != Op::Flush {
            // Handle checked `req.offset + req.len <= size`, and the window fits in the
            // child, so this cannot overflow.
            req.offset += offset;
        }
        match self.child.submit(req) {
            IoFuture::Ready(Some(c)) => IoFuture::Ready(Some(back(c, offset))),
            IoFuture::Ready(None) => IoFuture::Ready(None),
            IoFuture::Pending(fut) => IoFuture::pending(async move { back(fut.await, offset) }),
        }
    }
}

/// Gives a completion from the child back in the window's coordinates: the request's
/// own offset, and block-status extents moved back and clipped to the request.
pub(super) fn back(mut c: Completion, offset: u64) -> Completion {
    let req = &mut c.req;
    if req.op == Op::Flush {
        return c;
    }
    req.offset -= offset;
    if req.op == Op::BlockStatus {
        let (start, end) = (req.offset, req.offset + req.len);
        req.extents.retain_mut(|e| {
            let e_start = e.offset.saturating_sub(offset).max(start);
            let e_end = e
                .offset
                .saturating_add(e.len)
                .saturating_sub(offset)
                .min(end);
            e.offset = e_start;
            e.len = e_end.saturating_sub(e_start);
            e.len > 0
        });
    }
    c
}
