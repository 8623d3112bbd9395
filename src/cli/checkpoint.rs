//! `estimate --safetensors`: reads the checkpoint's headers and finds the config.json beside it
//! (or `--hf-config`) to plan with. Without a config of a supported architecture, the counts
//! alone are the answer.

use crate::error::{input_err, InputError};
use crate::plan::checkpoint::{self, CheckpointReport};
use crate::spec::hf_config;
use crate::spec::safetensors::Checkpoint;
use crate::spec::ModelSpec;
use std::path::{Path, PathBuf};

/// What `estimate` does next.
pub enum Route {
    /// plan the config.json at this path, reporting the checkpoint beside the plan
    Plan(PathBuf, Checkpoint),
    /// no architecture to plan: print this (the counts, table or `--json`, and why)
    CountsOnly(String),
}

/// Reads the headers of `safetensors`; the config is `hf_config` when given, else the
/// config.json beside the checkpoint. `explicit_model` (`--layers/--hidden/--heads`) is refused:
/// the architecture comes from a config.
pub fn route(
    safetensors: &Path,
    hf_config: Option<&Path>,
    explicit_model: bool,
    json: bool,
) -> anyhow::Result<Route> {
    if explicit_model {
        return input_err(
            "safetensors",
            "takes its architecture from a config.json; accepted alone (the config.json beside it) or with --hf-config",
        );
    }
    let ck = Checkpoint::load(safetensors)?;
    let config = hf_config.map(Path::to_path_buf).or_else(|| {
        let beside = ck.dir()?.join("config.json");
        beside.exists().then_some(beside)
    });
    let why = match config {
        None => "no config.json beside the checkpoint: the memory plan needs the architecture; \
                 accepted --hf-config PATH"
            .to_string(),
        Some(p) => match hf_config::load(&p) {
            Ok(_) => return Ok(Route::Plan(p, ck)),
            Err(e) => match e.downcast_ref::<InputError>() {
                // an architecture the planner does not know: the counts are still exact
                Some(ie) if ie.field() == "config.json model_type" => {
                    format!("no memory plan: {}", ie.message())
                }
                _ => return Err(e),
            },
        },
    };
    let report = checkpoint::report(&ck, None);
    let text = if json {
        let mut v = serde_json::to_value(&report)?;
        v["no_plan"] = serde_json::Value::String(why);
        serde_json::to_string_pretty(&serde_json::json!({ "checkpoint": v }))? + "\n"
    } else {
        checkpoint::render(&report) + &format!("\n{why}\n")
    };
    Ok(Route::CountsOnly(text))
}

/// The checkpoint's report against the planned model.
pub fn report(ck: &Checkpoint, model: &ModelSpec) -> CheckpointReport {
    match model {
        ModelSpec::Transformer(t) => checkpoint::report(ck, Some(t)),
        ModelSpec::Cnn(_) => checkpoint::report(ck, None),
    }
}
