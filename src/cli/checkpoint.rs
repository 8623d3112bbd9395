//! `estimate --safetensors`: reads the checkpoint's headers, finds the config.json beside it (or
//! `--hf-config`) to plan with, and renders the checkpoint's counts and their cross-check. Without
//! a config of a supported architecture, the counts alone are the answer.

use super::estimate::{thousands, write_stdout, Flags};
use crate::error::InputError;
use crate::plan::checkpoint::{self, CheckpointReport};
use crate::spec::hf_config;
use crate::spec::safetensors::Checkpoint;
use crate::spec::ModelSpec;
use std::fmt::Write as _;

/// What `estimate` does next.
pub enum Route {
    /// plan the model the flags name, reporting the checkpoint (if any) beside the plan
    Plan(Box<Flags>, Option<Checkpoint>),
    /// the checkpoint's counts were printed; there is no architecture to plan
    Done,
}

/// With `--safetensors`: reads its headers, and sets `--hf-config` to the config.json beside
/// it when none was given. Without a config, or with one of an architecture the planner does
/// not know, prints the counts (table or `--json`) and says why there is no plan.
pub fn route(mut a: Flags) -> anyhow::Result<Route> {
    let Some(path) = a.safetensors.clone() else {
        return Ok(Route::Plan(Box::new(a), None));
    };
    if a.layers.is_some() || a.hidden.is_some() || a.heads.is_some() {
        return crate::error::input_err(
            "safetensors",
            "takes its architecture from a config.json; accepted alone (the config.json beside it) or with --hf-config",
        );
    }
    let ck = Checkpoint::load(&path)?;
    let config = a.hf_config.clone().or_else(|| {
        let beside = ck.dir()?.join("config.json");
        beside.exists().then_some(beside)
    });
    let why = match &config {
        None => "no config.json beside the checkpoint: the memory plan needs the architecture; \
                 accepted --hf-config PATH"
            .to_string(),
        Some(p) => match hf_config::load(p) {
            Ok(_) => {
                a.hf_config = config;
                return Ok(Route::Plan(Box::new(a), Some(ck)));
            }
            Err(e) => match e.downcast_ref::<InputError>() {
                // an architecture the planner does not know: the counts are still exact
                Some(ie) if ie.field == "config.json model_type" => {
                    format!("no memory plan: {}", ie.message)
                }
                _ => return Err(e),
            },
        },
    };
    let report = checkpoint::report(&ck, None);
    let text = if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["no_plan"] = serde_json::Value::String(why);
        serde_json::to_string_pretty(&serde_json::json!({ "checkpoint": v }))? + "\n"
    } else {
        render(&report) + &format!("\n{why}\n")
    };
    write_stdout(&text)?;
    Ok(Route::Done)
}

/// The checkpoint's report against the planned model.
pub fn report(ck: &Checkpoint, model: &ModelSpec) -> CheckpointReport {
    match model {
        ModelSpec::Transformer(t) => checkpoint::report(ck, Some(t)),
        ModelSpec::Cnn(_) => checkpoint::report(ck, None),
    }
}

/// The checkpoint section of the table.
pub fn render(r: &CheckpointReport) -> String {
    let mut o = String::new();
    let row = |o: &mut String, label: &str, value: String| {
        let _ = writeln!(o, "  {label:<28} {value}");
    };
    let _ = writeln!(
        o,
        "\nCheckpoint (safetensors headers: {} file(s), {} tensors)",
        r.files.len(),
        r.tensors
    );
    let vs = match (r.config_params, r.matches_config) {
        (Some(c), Some(true)) => format!(" (config: {}, equal)", thousands(c)),
        (Some(c), _) => format!(" (config: {}, DIFFERENT)", thousands(c)),
        _ => String::new(),
    };
    row(&mut o, "parameters", format!("{}{vs}", thousands(r.params)));
    for d in &r.by_dtype {
        row(
            &mut o,
            &format!("stored {}", d.dtype),
            format!(
                "{} elements, {:.2} GiB",
                thousands(d.elems),
                d.bytes as f64 / (1u64 << 30) as f64
            ),
        );
    }
    if !r.tied_duplicates.is_empty() {
        row(&mut o, "tied, counted once", r.tied_duplicates.join(", "));
    }
    if !r.buffers.is_empty() {
        row(
            &mut o,
            "buffers, not parameters",
            format!("{} tensors, e.g. {}", r.buffers.len(), r.buffers[0]),
        );
    }
    for d in &r.differences {
        row(&mut o, "differs", d.clone());
    }
    o
}
