//! Reading typed keys of a HuggingFace config.json object, each error naming the key as the file
//! spells it (`config.json <key>`). Shared by the family parsers (`hf_config`) and the
//! vision-language wrappers (`hf_vision`).

use crate::error::input_err;
use serde_json::{Map, Value};

pub type Obj = Map<String, Value>;

pub fn field_name(f: &str) -> String {
    format!("config.json {f}")
}

pub fn opt_u64(o: &Obj, f: &str) -> anyhow::Result<Option<u64>> {
    match o.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(n)),
            None => input_err(
                &field_name(f),
                format!("{v} is not a count; accepted a non-negative integer"),
            ),
        },
    }
}

pub fn req_u64(o: &Obj, f: &str) -> anyhow::Result<u64> {
    match opt_u64(o, f)? {
        Some(n) => Ok(n),
        None => input_err(&field_name(f), "missing; accepted a non-negative integer"),
    }
}

pub fn opt_bool(o: &Obj, f: &str, default: bool) -> anyhow::Result<bool> {
    match o.get(f) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => input_err(
            &field_name(f),
            format!("{v} is not a boolean; accepted true or false"),
        ),
    }
}
