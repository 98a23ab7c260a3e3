//! strata-rpc: the control plane (typed command registry, JSON-RPC 2.0 and QMP front
//! ends, `stratad`, `strata-rpc`, `strata-img`). Empty until the control-plane issue.
#![forbid(unsafe_code)]
