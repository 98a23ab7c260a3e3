//! NBD: the protocol ([`proto`]) and the server that exports nodes over it ([`server`]).
//!
//! The server is served by the reactors: reactor 0 accepts, each connection lives on one
//! reactor (spread round-robin), and all its socket I/O goes through that reactor's
//! ring. A connection is the export's graph user on its reactor
//! ([`Blk`](strata_engine::graph::Blk)), so graph changes drain its requests like any
//! other user's. See [`server`] for the threads and [`transmission`] for the data path.

mod connection;
pub mod proto;
pub mod server;
mod socket;
mod transmission;

pub use server::{ExportSpec, NbdServer, ServerConfig};
