//! QEMU's dotted key=value syntax (`driver=file,filename=/x,cache.direct=on`), as used by
//! `--blockdev`, `--node` and `--image-opts`, turned into a JSON object.
//!
//! Rules (from QEMU's keyval): pairs are separated by `,`; a literal comma inside a value
//! is written `,,`; dots in keys make nested objects (`cache.direct=on` becomes
//! `{"cache": {"direct": "on"}}`); every value is a string (option types accept strings,
//! see [`crate::options`]); a key may appear once; an object whose keys are exactly
//! `0`, `1`, ... `n-1` is a list (`perm.0=write,perm.1=resize` is `{"perm": ["write",
//! "resize"]}`), and a mix of index and name keys is an error.

use serde_json::{Map, Value};

/// Parses `s` into a JSON object of strings.
pub fn parse(s: &str) -> Result<Value, String> {
    let mut root = Map::new();
    for (key, value) in split_pairs(s)? {
        if key.is_empty() {
            return Err(format!("empty key in '{s}'"));
        }
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("invalid key '{key}' in '{s}'"));
        }
        let mut map = &mut root;
        for part in &parts[..parts.len() - 1] {
            let entry = map
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            map = match entry {
                Value::Object(m) => m,
                _ => return Err(format!("key '{key}' conflicts with '{part}' given a value")),
            };
        }
        let last = parts[parts.len() - 1];
        if map.contains_key(last) {
            return Err(format!("key '{key}' given twice"));
        }
        map.insert(last.to_string(), Value::String(value));
    }
    lists(Value::Object(root))
}

/// Turns objects keyed `0..n` into arrays, depth first.
fn lists(v: Value) -> Result<Value, String> {
    let Value::Object(map) = v else { return Ok(v) };
    let indexed = map
        .keys()
        .filter(|k| k.bytes().all(|b| b.is_ascii_digit()))
        .count();
    let mut map: Map<String, Value> = map
        .into_iter()
        .map(|(k, v)| Ok((k, lists(v)?)))
        .collect::<Result<_, String>>()?;
    if indexed == 0 {
        return Ok(Value::Object(map));
    }
    if indexed != map.len() {
        return Err("a key mixes list indexes (0, 1, ...) and names".to_string());
    }
    (0..map.len())
        .map(|i| {
            map.remove(&i.to_string())
                .ok_or_else(|| format!("list index {i} is missing (indexes must be 0, 1, 2, ...)"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn split_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let mut key = String::new();
        let mut value: Option<String> = None;
        loop {
            match chars.next() {
                None => break,
                Some(',') if chars.peek() == Some(&',') && value.is_some() => {
                    chars.next();
                    if let Some(v) = value.as_mut() {
                        v.push(',');
                    }
                }
                Some(',') => break,
                Some('=') if value.is_none() => value = Some(String::new()),
                Some(c) => match value.as_mut() {
                    Some(v) => v.push(c),
                    None => key.push(c),
                },
            }
        }
        if key.is_empty() && value.is_none() {
            continue;
        }
        let value = value.ok_or_else(|| format!("expected key=value, got '{key}'"))?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_keys_and_escaped_commas() {
        assert_eq!(
            parse("driver=file,filename=/a,,b,cache.direct=on").unwrap(),
            json!({"driver": "file", "filename": "/a,b", "cache": {"direct": "on"}})
        );
    }

    #[test]
    fn numbered_keys_make_lists() {
        assert_eq!(
            parse("perm.1=resize,perm.0=write,x.0.a=1,x.0.b=2").unwrap(),
            json!({"perm": ["write", "resize"], "x": [{"a": "1", "b": "2"}]})
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            "driver",
            "=x",
            "a.=1",
            "a=1,a=2",
            "a=1,a.b=2",
            ".a=1",
            "l.0=a,l.2=b",
            "l.0=a,l.x=b",
        ] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
    }
}
