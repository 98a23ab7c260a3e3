//! End-to-end tests: they start Strata's real binaries and drive them with real clients.
#![forbid(unsafe_code)]
