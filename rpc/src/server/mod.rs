//! The admin thread and the front ends (JSON-RPC 2.0 and QMP over sockets).
