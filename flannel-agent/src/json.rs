//! JSON field access the way flannel (Go's encoding/json) reads its files: keys match
//! case-insensitively, an exact match winning.
use serde_json::{Map, Value};

/// The value of `key` in `obj`, matched as Go's encoding/json matches struct fields.
#[must_use]
pub fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_case_insensitively_preferring_exact() {
        let v: Value = serde_json::json!({"network": "a", "Type": "x", "type": "y"});
        let obj = v.as_object().unwrap();
        assert_eq!(field(obj, "Network"), Some(&Value::from("a")));
        assert_eq!(field(obj, "Type"), Some(&Value::from("x")));
        assert_eq!(field(obj, "Missing"), None);
    }

    #[test]
    fn null_is_absent() {
        let v: Value = serde_json::json!({"Backend": null});
        assert_eq!(field(v.as_object().unwrap(), "Backend"), None);
    }
}
