//! Option value parsing shared by every driver's options struct.
//!
//! Options arrive either as JSON (RPC, `--blockdev '{...}'`) or as keyval strings
//! (`size=1G,read-zeroes=on`). These serde helpers accept both: numbers as JSON numbers
//! or strings with QEMU's size suffixes, booleans as JSON booleans or `on`/`off`/`true`/
//! `false`.

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// Parses a size with an optional binary suffix (`512`, `4k`, `1M`, `2G`, `1T`), as QEMU.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}': expected e.g. 4096, 4k, 1G"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(format!("invalid size suffix in '{s}': use k, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parses QEMU's boolean spellings.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("invalid boolean '{s}': use on or off")),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BoolOrStr {
    Bool(bool),
    Str(String),
}

/// `#[serde(deserialize_with = "options::size")]` for byte sizes.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(n),
        NumOrStr::Str(s) => parse_size(&s).map_err(de::Error::custom),
    }
}

/// `#[serde(deserialize_with = "options::opt_size")]` for optional byte sizes.
pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size(d).map(Some)
}

/// `#[serde(deserialize_with = "options::number")]` for plain integers (no suffixes).
pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => Ok(n),
        NumOrStr::Str(s) => s
            .trim()
            .parse()
            .map_err(|_| de::Error::custom(format!("invalid number '{s}'"))),
    }
}

/// `#[serde(deserialize_with = "options::boolean")]`.
pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match BoolOrStr::deserialize(d)? {
        BoolOrStr::Bool(b) => Ok(b),
        BoolOrStr::Str(s) => parse_bool(&s).map_err(de::Error::custom),
    }
}

/// Runs `parse` on an option's value and names the option in its error, so a person
/// reads `option 'cache.direct': invalid boolean 'maybe'` rather than just the value.
/// Drivers wrap their fields' parsers with it (serde does not name the field itself).
pub fn named<'de, D, T>(
    option: &str,
    d: D,
    parse: impl FnOnce(D) -> Result<T, D::Error>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    parse(d).map_err(|e| de::Error::custom(format_args!("option '{option}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_booleans_in_qemu_spelling() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_bool("on"), Ok(true));
        assert!(parse_bool("maybe").is_err());
    }
}
