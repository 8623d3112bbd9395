//! The measurement row: one configuration, one CSV line. This schema is versioned (`schema`);
//! readers reject rows of another version instead of misreading them.
//!
//! Columns (schema 1), in order:
//! `schema, device_id, device_name, backend, driver, vramcal_version, git_commit, timestamp,
//!  model, family, layers, hidden, heads, ffn, vocab, batch, seq, image, precision, checkpointing,
//!  optimizer, zero_stage, gpus, params, baseline_bytes, peak_bytes, peak_reserved_bytes,
//!  nvml_bytes, memgetinfo_bytes, step_ms_median, step_ms_p10, step_ms_p90, repeats, status,
//!  error, spec_json`.
//! Memory is in bytes, absolute (not relative to the baseline): `baseline_bytes` after the
//! model, optimizer state and inputs exist and before the step; `peak_bytes` the high-water
//! mark during the step from the primary probe (CPU: counting allocator; CUDA: pool
//! used-memory high-water mark). Optional probes are empty when not available.

use crate::spec::{
    Attention, Checkpointing, Family, ModelSpec, Optimizer, OptimizerImpl, Precision, TrainSpec,
};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

pub const SCHEMA: u32 = 1;

/// Outcome of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// out of memory (device allocation failure, or the child was killed by the OOM killer)
    Oom,
    /// any other failure; the message is in `error`
    Error,
    /// not run: the planner predicted it exceeds the memory cap
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Oom => "oom",
            Status::Error => "error",
            Status::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub schema: u32,
    pub device_id: String,
    pub device_name: String,
    /// "cpu" or "cuda"
    pub backend: String,
    pub driver: String,
    pub vramcal_version: String,
    pub git_commit: String,
    /// RFC 3339 UTC
    pub timestamp: String,
    pub model: String,
    pub family: Family,
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub ffn: u64,
    pub vocab: u64,
    pub batch: u64,
    pub seq: u64,
    pub image: u64,
    pub precision: Precision,
    pub checkpointing: Checkpointing,
    pub optimizer: Optimizer,
    pub zero_stage: u8,
    pub gpus: u64,
    pub params: u64,
    pub baseline_bytes: Option<u64>,
    pub peak_bytes: Option<u64>,
    pub peak_reserved_bytes: Option<u64>,
    pub nvml_bytes: Option<u64>,
    pub memgetinfo_bytes: Option<u64>,
    pub step_ms_median: Option<f64>,
    pub step_ms_p10: Option<f64>,
    pub step_ms_p90: Option<f64>,
    pub repeats: u32,
    pub status: Status,
    pub error: String,
    /// the full model spec as JSON, so a row can be re-planned exactly without the grid
    pub spec_json: String,
}

impl Row {
    pub fn model_spec(&self) -> anyhow::Result<ModelSpec> {
        serde_json::from_str(&self.spec_json)
            .with_context(|| format!("spec_json of a {} row", self.model))
    }

    pub fn train_spec(&self) -> TrainSpec {
        TrainSpec {
            batch: self.batch,
            seq: self.seq,
            image: self.image,
            precision: self.precision,
            optimizer: self.optimizer,
            checkpointing: self.checkpointing,
            zero_stage: self.zero_stage,
            gpus: self.gpus,
            // rows are candle harness steps: composed attention, tensor-by-tensor optimizer
            attention: Attention::Eager,
            optimizer_impl: OptimizerImpl::Loop,
        }
    }

    /// Identity of the configuration (everything that defines the point, nothing measured):
    /// `--resume` skips a point whose key is already in the CSV.
    pub fn key(&self) -> String {
        point_key(&self.device_id, &self.spec_json, &self.train_spec())
    }
}

pub fn point_key(device_id: &str, spec_json: &str, t: &TrainSpec) -> String {
    format!(
        "{device_id}|{spec_json}|b{}|s{}|i{}|{}|{}|{}|z{}/{}",
        t.batch, t.seq, t.image, t.precision, t.checkpointing, t.optimizer, t.zero_stage, t.gpus
    )
}

/// Appends rows to a CSV, writing the header only when the file is new or empty, and flushing
/// (and syncing) after every row so a killed sweep loses nothing it measured.
pub fn append(path: &Path, row: &Row) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let empty = file.metadata()?.len() == 0;
    let mut w = csv::WriterBuilder::new()
        .has_headers(empty)
        .from_writer(file);
    w.serialize(row)?;
    w.flush()?;
    let file = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    file.sync_data()?;
    let _ = (&file).flush();
    Ok(())
}

/// Reads every row; a truncated last line (a sweep killed mid-write) is skipped, not fatal.
pub fn read(path: &Path) -> anyhow::Result<Vec<Row>> {
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, rec) in r.deserialize::<Row>().enumerate() {
        match rec {
            Ok(row) if row.schema == SCHEMA => rows.push(row),
            Ok(row) => anyhow::bail!(
                "{} line {}: schema {} is not the supported {SCHEMA}",
                path.display(),
                i + 2,
                row.schema
            ),
            Err(e) => eprintln!(
                "warning: {} line {}: skipped unreadable row ({e})",
                path.display(),
                i + 2
            ),
        }
    }
    Ok(rows)
}
