//! `--config FILE`: a JSON array of `{"method", "params"}` calls (what `save-config`
//! returns), run in order through the admin thread before any client is served, as
//! SPDK's `--json` config load replays its file through its own RPC path.

use super::admin::AdminHandle;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// One call of a config file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

impl Call {
    /// `blockdev-add node-name=disk`: enough to find the call in the file.
    fn describe(&self) -> String {
        let mut s = self.method.clone();
        for key in ["node-name", "id"] {
            if let Some(Value::String(v)) = self.params.get(key) {
                s.push_str(&format!(" {key}={v}"));
                break;
            }
        }
        s
    }
}

/// Parses a config file's text.
pub fn parse(text: &str) -> Result<Vec<Call>, String> {
    serde_json::from_str(text).map_err(|e| {
        format!("expected a JSON array of {{\"method\", \"params\"}} calls (as save-config returns): {e}")
    })
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> Result<Vec<Call>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs `calls` in order; stops at the first failure, naming the call.
pub fn replay(admin: &AdminHandle, calls: &[Call]) -> Result<(), String> {
    for (i, call) in calls.iter().enumerate() {
        admin.call(&call.method, call.params.clone()).map_err(|e| {
            format!(
                "call {} of {} ({}) failed: {e}",
                i + 1,
                calls.len(),
                call.describe()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::admin::tests::fake_admin;
    use serde_json::json;

    #[test]
    fn calls_run_in_order_and_the_first_failure_is_named() {
        let (admin, log) = fake_admin();
        let calls = parse(
            r#"[{"method": "echo", "params": {"node-name": "a"}},
                {"method": "echo"},
                {"method": "fail", "params": {"node-name": "disk"}},
                {"method": "echo"}]"#,
        )
        .unwrap();
        assert_eq!(calls[1].params, Value::Null);
        let e = replay(&admin.handle(), &calls).unwrap_err();
        assert_eq!(
            e,
            "call 3 of 4 (fail node-name=disk) failed: Parameter 'x' is missing"
        );
        assert_eq!(*log.lock().unwrap(), ["echo", "echo", "fail"]);
        admin.handle().stop();
        admin.wait();
    }

    #[test]
    fn a_file_that_is_not_a_list_of_calls_is_refused() {
        for bad in [
            "{}",
            "[1]",
            r#"[{"params": {}}]"#,
            r#"[{"method": "x", "extra": 1}]"#,
            "[",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("JSON array"), "{bad}: {e}");
        }
        assert_eq!(parse("[]").unwrap(), vec![]);
        assert_eq!(
            parse(r#"[{"method":"m","params":{"a":1}}]"#).unwrap()[0].params,
            json!({"a": 1})
        );
    }
}
