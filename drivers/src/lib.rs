//! strata-drivers: block drivers.
