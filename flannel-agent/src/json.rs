//! JSON field access the way flannel (Go's encoding/json) reads its files: keys match
//! case-insensitively, an exact match winning.
use std::{net::Ipv4Addr, path::Path};

use serde_json::{Map, Value};

use crate::Error;

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

pub(crate) fn str_field<'a>(
    path: &Path,
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, Error> {
    field(obj, key)
        .map(|v| {
            v.as_str()
                .ok_or_else(|| Error::config(path, key, "expected a string"))
        })
        .transpose()
}

pub(crate) fn u64_field(
    path: &Path,
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<u64>, Error> {
    field(obj, key)
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| Error::config(path, key, "expected a non-negative integer"))
        })
        .transpose()
}

pub(crate) fn bool_field(
    path: &Path,
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<bool>, Error> {
    field(obj, key)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| Error::config(path, key, "expected true or false"))
        })
        .transpose()
}

pub(crate) fn addr_field(
    path: &Path,
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<Ipv4Addr>, Error> {
    str_field(path, obj, key)?
        .map(|s| {
            s.parse()
                .map_err(|_| Error::config(path, key, format!("{s:?} is not an IPv4 address")))
        })
        .transpose()
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
