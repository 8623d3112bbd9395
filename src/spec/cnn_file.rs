//! A CNN layer list from a small TOML or JSON file (`--cnn-file`), deserialised straight into
//! [`CnnSpec`] (layers tagged by `type`: conv, batchnorm, relu, pool, adaptivepool, flatten,
//! linear, residual). TOML is chosen by a `.toml` extension, JSON otherwise.

use super::cnn::CnnSpec;
use crate::error::input_err;
use std::path::Path;

/// Parses file text; `toml` selects the format.
pub fn parse(text: &str, toml: bool) -> anyhow::Result<CnnSpec> {
    let parsed: Result<CnnSpec, String> = if toml {
        ::toml::from_str(text).map_err(|e| e.message().to_string())
    } else {
        serde_json::from_str(text).map_err(|e| e.to_string())
    };
    let spec = match parsed {
        Ok(s) => s,
        Err(e) => {
            return input_err(
                "cnn-file",
                format!(
                    "{} ; accepted name, in_channels, classes and a layers list (see presets/custom-cnn.toml)",
                    e.replace('\n', " ").trim()
                ),
            )
        }
    };
    spec.validate()?;
    Ok(spec)
}

pub fn load(path: &Path) -> anyhow::Result<CnnSpec> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return input_err(
                "cnn-file",
                format!(
                    "cannot read {} ({e}); accepted a readable TOML or JSON file",
                    path.display()
                ),
            )
        }
    };
    let is_toml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
    parse(&text, is_toml)
}
