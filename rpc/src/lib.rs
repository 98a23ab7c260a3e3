//! strata-rpc: Strata's control plane.
//!
//! ```text
//!  JSON-RPC 2.0 socket --+                                  +--> Graph (strata-engine)
//!  QMP socket -----------+--> admin thread --> Registry ----+      nodes, perms, drain
//!  --config / --blockdev +    (one command     typed commands  --> EventBus --> clients
//!                              at a time)      + JSON Schema
//! ```
//!
//! - [`error`]: command errors; JSON-RPC codes and QMP classes in one table.
//! - [`events`]: the event bus.
//! - [`registry`]: every command, typed, with its schema; `Registry::call`.
//! - [`server`]: the admin thread, sockets, the JSON-RPC and QMP front ends.

#![forbid(unsafe_code)]

pub mod error;
pub mod events;
pub mod registry;
pub mod server;

pub use error::{CommandError, ErrorCode};
pub use events::{Event, EventBus};
