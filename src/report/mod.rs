//! The accuracy report for one device: `accuracy.json` (held-out metrics), `README.md` (what was
//! run, coefficients, accuracy, measured findings, exclusions) and SVG plots, in one directory.

pub mod accuracy;
pub mod findings;
pub mod lora;
pub mod markdown;
pub mod plots;
pub mod pytorch;

use crate::coeffs::Coefficients;
use crate::fit::points::{Excluded, Point};
use crate::fit::split::Evaluation;
use anyhow::Context;
use std::path::{Path, PathBuf};

pub struct ReportInput<'a> {
    pub points: &'a [Point],
    pub excluded: &'a [Excluded],
    pub table: &'a Coefficients,
    pub kfold: &'a Evaluation,
    pub extrapolation: &'a Evaluation,
    pub data_path: &'a str,
    pub grid: Option<&'a str>,
    /// PyTorch rows of the same device and their file, for "Predicting PyTorch"
    pub torch: Option<(&'a [crate::harness::record::Row], &'a str)>,
    /// candle's fine-tuning rows (not fitted), for "Fine-tuning (LoRA)"
    pub finetune: &'a [crate::harness::record::Row],
}

/// Writes the report into `out`; returns the accuracy summary and the files written.
pub fn write(out: &Path, r: &ReportInput) -> anyhow::Result<(accuracy::Accuracy, Vec<PathBuf>)> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the report directory {}", out.display()))?;
    let mut acc = accuracy::accuracy(r.kfold, r.extrapolation, r.points, r.excluded);
    acc.pytorch = r
        .torch
        .and_then(|(rows, path)| pytorch::section(rows, path, r.points, r.kfold, r.table));
    acc.lora = lora::section(
        r.finetune,
        r.torch.map_or(&[][..], |(rows, _)| rows),
        r.table,
    );
    let f = findings::findings(r.points);
    let mut files = Vec::new();
    let mut plots = Vec::new();
    let mut add = |name: &str, title: &str, written: bool| {
        if written {
            files.push(out.join(name));
            plots.push((name.to_string(), title.to_string()));
        }
    };
    plots::measured_vs_predicted(&out.join("measured_vs_predicted.svg"), r.kfold)?;
    add(
        "measured_vs_predicted.svg",
        "Measured vs predicted peak (held out, log-log)",
        true,
    );
    let w = plots::sweep_panels(
        &out.join("peak_vs_batch.svg"),
        r.points,
        r.table,
        plots::Axis::Batch,
    )?;
    add("peak_vs_batch.svg", "Peak vs batch per model", w);
    let w = plots::sweep_panels(
        &out.join("peak_vs_seq.svg"),
        r.points,
        r.table,
        plots::Axis::Length,
    )?;
    add(
        "peak_vs_seq.svg",
        "Peak vs sequence length / image side per model",
        w,
    );
    let w = plots::time_vs_flops(&out.join("time_vs_flops.svg"), r.points, r.table)?;
    add("time_vs_flops.svg", "Step time vs FLOPs", w);
    let w = plots::checkpointing_bars(&out.join("checkpointing.svg"), &f)?;
    add(
        "checkpointing.svg",
        "Checkpointing: activation saving and time cost",
        w,
    );
    let json = serde_json::to_string_pretty(&acc)?;
    crate::atomic::write(&out.join("accuracy.json"), json.as_bytes())?;
    files.push(out.join("accuracy.json"));
    let md = markdown::readme(&markdown::Inputs {
        table: r.table,
        acc: &acc,
        findings: &f,
        points: r.points,
        plots: &plots,
        data_path: r.data_path,
        grid: r.grid,
    });
    crate::atomic::write(&out.join("README.md"), md.as_bytes())?;
    files.push(out.join("README.md"));
    Ok((acc, files))
}
