//! strata-drivers: block drivers and the way nodes are described.
//!
//! ```text
//!   "driver=file,filename=/x"  --keyval::parse-->  JSON object  --open()-->  Arc<dyn Driver>
//!   {"driver": "null-co", ...} ------------------------------------^
//!                                                   each driver's options struct (serde)
//! ```
//!
//! Drivers: [`null_co`] (`null-co`), [`memory`] (`memory`, a RAM disk), [`file`](mod@file) (`file`,
//! a host file or block device over io_uring). Every driver runs the shared
//! [`conformance`] suite in its tests.

pub mod conformance;
pub mod file;
pub mod keyval;
pub mod memory;
pub mod null_co;
pub mod options;

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;
use strata_engine::{Driver, Error};

/// Names of the drivers [`open`] knows.
pub const DRIVERS: &[&str] = &["file", "memory", "null-co"];

/// Opens a node from its options (`{"driver": ..., ...}`), on the calling (admin) thread.
pub fn open(options: &Value) -> Result<Arc<dyn Driver>, Error> {
    let obj = options
        .as_object()
        .ok_or_else(|| Error::invalid("node options must be an object"))?;
    let driver = obj.get("driver").and_then(Value::as_str).ok_or_else(|| {
        Error::invalid("missing 'driver' (one of: ".to_string() + &DRIVERS.join(", ") + ")")
    })?;
    let mut rest = obj.clone();
    rest.remove("driver");
    let rest = Value::Object(rest);
    match driver {
        "file" => Ok(Arc::new(file::FileDriver::open(parse_options(
            driver, rest,
        )?)?)),
        "memory" => Ok(Arc::new(memory::Memory::new(parse_options(driver, rest)?)?)),
        "null-co" => Ok(Arc::new(null_co::NullCo::new(parse_options(driver, rest)?))),
        other => Err(Error::invalid(format!(
            "unknown driver '{other}' (known: {})",
            DRIVERS.join(", ")
        ))),
    }
}

/// Opens a node described in keyval syntax (`driver=null-co,size=1G`).
pub fn open_keyval(spec: &str) -> Result<Arc<dyn Driver>, Error> {
    open(&keyval::parse(spec).map_err(Error::invalid)?)
}

/// Deserializes a driver's options, naming the driver in the error.
pub fn parse_options<T: DeserializeOwned>(driver: &str, v: Value) -> Result<T, Error> {
    serde_json::from_value(v)
        .map_err(|e| Error::invalid(format!("invalid options for driver '{driver}': {e}")))
}
