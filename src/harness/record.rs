//! The measurement row: one configuration, one CSV line. This schema is versioned (`schema`);
//! readers reject rows of another version instead of misreading them.
//!
//! Columns (schema 4), in order:
//! `schema, device_id, device_name, backend, driver, vramcal_version, git_commit, timestamp,
//!  model, family, layers, hidden, heads, ffn, vocab, batch, seq, image, precision, checkpointing,
//!  optimizer, zero_stage, gpus, params, baseline_bytes, peak_bytes, peak_reserved_bytes,
//!  nvml_bytes, memgetinfo_bytes, step_ms_median, step_ms_p10, step_ms_p90, repeats, status,
//!  error, spec_json, attention, device_kind, optimizer_impl, saved_bytes, finetune, lora_rank,
//!  lora_targets, lora_dropout, freeze_layers, trainable_params`.
//! The last six say what was trained ([`Finetune`]): `finetune` full|lora|qlora, the adapter
//! rank, the adapted linears (canonical names joined by `+`), peft's `lora_dropout` (empty for
//! full training), the frozen leading blocks, and the parameters the backend trained.
//! `backend` is what ran the step, `candle` (the embedded harness) or `torch` (the PyTorch
//! reference, src/harness/torch/); `device_kind` is `cpu` or `cuda`. `attention` is the step's
//! attention kernels, `eager` or `sdpa` (see [`Attention`]); `optimizer_impl` how the optimizer
//! stepped (`loop`, `foreach`, `fused`); `saved_bytes` the bytes autograd saved for backward in
//! one step (torch backend; empty for candle, which has no such hook).
//! Older files still read: schema 3 is schema 4 without the fine-tuning columns (every row full
//! training); schema 2 is schema 3 without its last three columns and with the
//! device kind (`cpu`/`cuda`) in `backend`, all measured by candle with its for-loop optimizer;
//! schema 1 is schema 2 without `attention` (all eager). A sweep `--resume` onto an older file
//! first migrates it in place ([`migrate`]), so one file never mixes schemas.
//! Memory is in bytes, absolute (not relative to the baseline): `baseline_bytes` after the
//! model, optimizer state and inputs exist and before the step; `peak_bytes` the high-water
//! mark during the step from the primary probe (CPU: counting allocator; CUDA: pool
//! used-memory high-water mark). Optional probes are empty when not available.
//! `status` is one of ok, oom, error, skipped, killed, timeout (see [`Status`]). A file may hold
//! several rows of one point (a `--retry-failed` re-run); the last one counts ([`latest`]).

use crate::error::input_err;
pub use crate::harness::backend::Backend;
use crate::plan::finetune::{Finetune, FinetuneMode};
use crate::spec::{
    Attention, Checkpointing, Family, ModelSpec, Optimizer, OptimizerImpl, Precision, TrainSpec,
};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;

pub const SCHEMA: u32 = 4;

/// Outcome of one configuration. New variants only ever get added, so CSVs written by an older
/// vramcal (ok/oom/error/skipped) still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// out of memory: an allocation failure reported by the child (Rust's "memory allocation of
    /// N bytes failed", CUDA's out-of-memory errors); the message is in `error`
    Oom,
    /// any other failure; `error` holds the child's first meaningful stderr line
    Error,
    /// not run: the planner predicted it exceeds the memory cap or the free memory
    Skipped,
    /// the child died from a signal it did not raise through an error, named in `error`
    /// ("killed by SIGKILL (9)"; the kernel's OOM killer also sends SIGKILL, see dmesg)
    Killed,
    /// the child ran past the sweep's per-point time limit and was killed
    Timeout,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Ok,
        Status::Oom,
        Status::Error,
        Status::Skipped,
        Status::Killed,
        Status::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Oom => "oom",
            Status::Error => "error",
            Status::Skipped => "skipped",
            Status::Killed => "killed",
            Status::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub schema: u32,
    pub device_id: String,
    pub device_name: String,
    /// What ran the step. Schema-1/2 files hold the device kind here (`cpu`/`cuda`), read as
    /// candle, the only backend they had.
    pub backend: Backend,
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
    /// Attention kernels of the step (schema 2's last column). Schema-1 rows have none and
    /// read as eager, what the harness ran before it had fused attention.
    #[serde(default = "Attention::legacy")]
    pub attention: Attention,
    /// `cpu` or `cuda` (schema 3; older rows get it from `device_id` when read)
    #[serde(default)]
    pub device_kind: String,
    /// How the optimizer stepped (schema 3; older rows: candle's for-loop)
    #[serde(default = "OptimizerImpl::legacy")]
    pub optimizer_impl: OptimizerImpl,
    /// Bytes autograd saved for backward in one step, each storage once (torch backend)
    #[serde(default)]
    pub saved_bytes: Option<u64>,
    /// What was trained (schema 4; older rows: full): `full`, `lora`, `qlora`
    #[serde(default)]
    pub finetune: FinetuneMode,
    /// Adapter rank (empty for full fine-tuning)
    #[serde(default)]
    pub lora_rank: Option<u64>,
    /// Adapted linears, canonical names joined by `+` ([`Finetune::targets_cell`])
    #[serde(default)]
    pub lora_targets: String,
    /// peft `lora_dropout` (empty for full fine-tuning)
    #[serde(default)]
    pub lora_dropout: Option<f32>,
    /// Frozen leading blocks (and embeddings)
    #[serde(default)]
    pub freeze_layers: u64,
    /// Parameters with gradients and optimizer states, as the backend counted them
    #[serde(default)]
    pub trainable_params: Option<u64>,
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
            attention: self.attention,
            optimizer_impl: self.optimizer_impl,
            // the harness measures one micro-batch per step
            grad_accum: 1,
        }
    }

    /// The training as planned for this row's measurement: [`Row::train_spec`] with the
    /// attention kernels that really ran on its device ([`Attention::kernels_on`]).
    pub fn planned_train_spec(&self) -> anyhow::Result<TrainSpec> {
        let mut train = self.train_spec();
        let dropout = match self.model_spec()? {
            ModelSpec::Transformer(t) => t.dropout_p().is_active(),
            ModelSpec::Cnn(_) => false,
        };
        train.attention = train
            .attention
            .kernels_on(self.device_kind == "cpu", dropout);
        Ok(train)
    }

    /// The fine-tuning configuration of the row (older schemas: full training).
    pub fn finetune(&self) -> Finetune {
        let mut ft = Finetune {
            mode: self.finetune,
            freeze_layers: self.freeze_layers,
            ..Finetune::default()
        };
        if ft.is_adapter() {
            ft.rank = self.lora_rank.unwrap_or(ft.rank);
            ft.lora_dropout = self.lora_dropout.unwrap_or(0.0);
            ft.targets = self
                .lora_targets
                .split('+')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if ft.mode == FinetuneMode::Qlora {
                ft.base_bits = 4;
            }
            ft.adapter_dtype = self.backend.adapter_dtype();
        }
        ft
    }

    /// Fills the fine-tuning columns from the configuration measured.
    pub fn set_finetune(&mut self, model: &ModelSpec, ft: &Finetune) {
        self.finetune = ft.mode;
        self.freeze_layers = ft.freeze_layers;
        if ft.is_adapter() {
            self.lora_rank = Some(ft.rank);
            self.lora_targets = ft.targets_cell(model);
            self.lora_dropout = Some(ft.lora_dropout);
        }
    }

    /// Identity of the configuration (everything that defines the point, nothing measured):
    /// `--resume` skips a point whose key is already in the CSV.
    pub fn key(&self) -> String {
        point_key(
            &self.device_id,
            self.backend,
            &self.spec_json,
            &self.train_spec(),
            &self.finetune_key(),
        )
    }

    /// The fine-tuning part of the key ([`Finetune::key_suffix`]; empty for full training).
    pub fn finetune_key(&self) -> String {
        self.finetune().key_suffix(&self.lora_targets)
    }
}

/// The key of a point. What older files could not vary adds nothing (eager attention, the
/// for-loop optimizer, the candle backend), so every key written before those axes existed is
/// unchanged and resuming old data still skips its points; `|sdpa`, `|foreach`, `|fused` and
/// `|torch` are appended otherwise, and the fine-tuning suffix ([`Finetune::key_suffix`], empty
/// for full training).
pub fn point_key(
    device_id: &str,
    backend: Backend,
    spec_json: &str,
    t: &TrainSpec,
    finetune: &str,
) -> String {
    let attention = match t.attention {
        Attention::Eager => "",
        Attention::Sdpa => "|sdpa",
        Attention::Math => "|math",
    };
    let optimizer_impl = match t.optimizer_impl {
        OptimizerImpl::Loop => "",
        OptimizerImpl::Foreach => "|foreach",
        OptimizerImpl::Fused => "|fused",
    };
    let backend = match backend {
        Backend::Candle => "",
        Backend::Torch => "|torch",
    };
    format!(
        "{device_id}|{spec_json}|b{}|s{}|i{}|{}|{}|{}|z{}/{}{attention}{optimizer_impl}{backend}{finetune}",
        t.batch, t.seq, t.image, t.precision, t.checkpointing, t.optimizer, t.zero_stage, t.gpus
    )
}

/// The schema-4 header, in column order (a unit test keeps it equal to what `Row` serialises).
pub const HEADER: [&str; 46] = [
    "schema",
    "device_id",
    "device_name",
    "backend",
    "driver",
    "vramcal_version",
    "git_commit",
    "timestamp",
    "model",
    "family",
    "layers",
    "hidden",
    "heads",
    "ffn",
    "vocab",
    "batch",
    "seq",
    "image",
    "precision",
    "checkpointing",
    "optimizer",
    "zero_stage",
    "gpus",
    "params",
    "baseline_bytes",
    "peak_bytes",
    "peak_reserved_bytes",
    "nvml_bytes",
    "memgetinfo_bytes",
    "step_ms_median",
    "step_ms_p10",
    "step_ms_p90",
    "repeats",
    "status",
    "error",
    "spec_json",
    "attention",
    "device_kind",
    "optimizer_impl",
    "saved_bytes",
    "finetune",
    "lora_rank",
    "lora_targets",
    "lora_dropout",
    "freeze_layers",
    "trainable_params",
];

/// The header of a schema: 4 the full [`HEADER`]; 3 without its last six (fine-tuning)
/// columns; 2 also without the three before them; 1 also without `attention`.
pub fn header_of(schema: u32) -> &'static [&'static str] {
    match schema {
        1 => &HEADER[..36],
        2 => &HEADER[..37],
        3 => &HEADER[..40],
        _ => &HEADER,
    }
}

/// Columns of type `f64`: serde accepts `inf`/`NaN` and negatives there, which would reach the
/// fit as poison, so the reader checks them itself.
const FLOAT_COLUMNS: [&str; 3] = ["step_ms_median", "step_ms_p10", "step_ms_p90"];

/// Appends rows to a CSV, writing the header only when the file is new or empty, and flushing
/// (and syncing) after every row so a killed sweep loses nothing it measured.
pub fn append(path: &Path, row: &Row) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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
    let written = w.serialize(row).map_err(anyhow::Error::from).and_then(|_| {
        w.flush()?;
        let file = w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("{}", e.error()))?;
        file.sync_data()?;
        Ok(())
    });
    // a full disk must say which file it could not extend
    written.with_context(|| format!("appending a row to {}", path.display()))
}

/// One-line input error about a cell: names the file, line and column as written in the CSV.
fn cell_err<T>(path: &Path, line: u64, column: &str, message: String) -> anyhow::Result<T> {
    input_err(
        &format!("{} line {line} column {column}", path.display()),
        message,
    )
}

/// Checks the header: vramcal's own (schema 4, or an older schema 1-3), returning its
/// schema, or a one-line input error saying what it is.
fn check_header(
    path: &Path,
    headers: &csv::StringRecord,
    first: Option<&csv::StringRecord>,
) -> anyhow::Result<u32> {
    for schema in (1..=SCHEMA).rev() {
        if headers.iter().eq(header_of(schema).iter().copied()) {
            return Ok(schema);
        }
    }
    // Another schema of vramcal's own CSV: say which one, not just "wrong columns".
    if headers.get(0) == Some("schema") {
        if let Some(v) = first.and_then(|r| r.get(0)) {
            if !(1..=SCHEMA).any(|s| v.trim() == s.to_string()) {
                return input_err(
                    &format!("{} schema", path.display()),
                    format!("the rows are schema '{v}'; accepted schema 1 to {SCHEMA} (the CSV of this vramcal, columns in src/harness/record.rs)"),
                );
            }
        }
    }
    let shown: Vec<&str> = headers.iter().take(4).collect();
    input_err(
        &format!("{} header", path.display()),
        format!(
            "'{}{}' is not a vramcal measurements header; accepted the schema-{SCHEMA} columns '{},{},{},...' (src/harness/record.rs)",
            shown.join(","),
            if headers.len() > 4 { ",..." } else { "" },
            HEADER[0],
            HEADER[1],
            HEADER[2]
        ),
    )
}

/// Checks one record's schema (the file's, `schema`), field count and floating-point cells,
/// then deserialises it.
fn parse_record(
    path: &Path,
    headers: &csv::StringRecord,
    schema_of_file: u32,
    rec: &csv::StringRecord,
) -> anyhow::Result<Row> {
    let line = rec.position().map_or(0, |p| p.line());
    let columns = header_of(schema_of_file);
    let schema = rec.get(0).unwrap_or("").trim();
    if schema != schema_of_file.to_string() {
        return cell_err(
            path,
            line,
            "schema",
            format!(
                "'{schema}'; accepted schema {schema_of_file} (the schema of this file's header)"
            ),
        );
    }
    if rec.len() != columns.len() {
        return input_err(
            &format!("{} line {line}", path.display()),
            format!(
                "{} fields; accepted the {} columns of the header",
                rec.len(),
                columns.len()
            ),
        );
    }
    for col in FLOAT_COLUMNS {
        let i = HEADER
            .iter()
            .position(|h| *h == col)
            .expect("a header column");
        let text = rec.get(i).unwrap_or("").trim();
        if text.is_empty() {
            continue; // not measured
        }
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => {}
            _ => {
                return cell_err(
                    path,
                    line,
                    col,
                    format!("'{text}'; accepted a finite number >= 0, or empty"),
                )
            }
        }
    }
    // serde's unknown-variant errors carry no column index: check the enum columns one by one
    check_enum::<Status>(path, line, rec, "status")?;
    check_enum::<Family>(path, line, rec, "family")?;
    check_enum::<Precision>(path, line, rec, "precision")?;
    check_enum::<Checkpointing>(path, line, rec, "checkpointing")?;
    check_enum::<Optimizer>(path, line, rec, "optimizer")?;
    if schema_of_file >= 2 {
        check_enum::<Attention>(path, line, rec, "attention")?;
    }
    check_enum::<Backend>(path, line, rec, "backend")?;
    if schema_of_file >= 3 {
        check_enum::<OptimizerImpl>(path, line, rec, "optimizer_impl")?;
    }
    let mut row = rec.deserialize::<Row>(Some(headers)).or_else(|e| {
        let (column, reason) = match e.kind() {
            csv::ErrorKind::Deserialize { err, .. } => (
                err.field().and_then(|i| headers.get(i as usize)).unwrap_or("?"),
                err.kind().to_string(),
            ),
            _ => ("?", e.to_string()),
        };
        let text = HEADER
            .iter()
            .position(|h| *h == column)
            .and_then(|i| rec.get(i))
            .unwrap_or("");
        cell_err(
            path,
            line,
            column,
            format!("'{text}' ({reason}); accepted a non-negative integer (bytes, counts), or empty where optional"),
        )
    })?;
    if row.device_kind.is_empty() {
        // schema 1/2 kept the kind in `backend`; ids are `cpu-...` or `cuda-...`
        row.device_kind = if row.device_id.starts_with("cpu") {
            "cpu"
        } else {
            "cuda"
        }
        .to_string();
    }
    Ok(row)
}

/// One enum cell parses as `T`, or an input error naming the column and the accepted values.
fn check_enum<T: serde::de::DeserializeOwned>(
    path: &Path,
    line: u64,
    rec: &csv::StringRecord,
    column: &str,
) -> anyhow::Result<()> {
    let i = HEADER
        .iter()
        .position(|h| *h == column)
        .expect("a header column");
    let text = rec.get(i).unwrap_or("");
    let de = serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text);
    match T::deserialize(de) {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = e.to_string();
            let accepted = e.split_once("expected ").map_or(e.as_str(), |(_, a)| a);
            cell_err(path, line, column, format!("'{text}'; accepted {accepted}"))
        }
    }
}

/// Reads every row. The header must be vramcal's schema-4 (or schema-1/2/3) header and every row
/// must parse:
/// a bad cell is a one-line input error naming the file, line and column (a fit must not run on
/// a silently shortened or poisoned table). Only a last line without its newline (a sweep killed
/// mid-write) is skipped, with a warning.
pub fn read(path: &Path) -> anyhow::Result<Vec<Row>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let complete = bytes.ends_with(b"\n");
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(bytes.as_slice());
    let headers = match r.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            return input_err(
                &format!("{} header", path.display()),
                format!("unreadable ({e}); accepted a UTF-8 CSV written by vramcal"),
            )
        }
    };
    let mut records = Vec::new();
    for rec in r.records() {
        match rec {
            Ok(rec) => records.push(rec),
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                return input_err(
                    &format!("{} line {line}", path.display()),
                    format!("unreadable ({e}); accepted a UTF-8 CSV written by vramcal"),
                );
            }
        }
    }
    let schema = check_header(path, &headers, records.first())?;
    if !complete && !records.is_empty() {
        // the header itself cannot be cut off here: check_header passed
        let cut = records.pop().expect("non-empty");
        eprintln!(
            "warning: {} line {}: skipped an incomplete last line (no newline; a sweep killed mid-write)",
            path.display(),
            cut.position().map_or(0, |p| p.line())
        );
    }
    records
        .iter()
        .map(|rec| parse_record(path, &headers, schema, rec))
        .collect()
}

/// Rewrites a schema-1, -2 or -3 CSV as schema 4 in place (atomically:
/// [`crate::atomic::write`]): schema 1 gains `attention` = `eager` (it had no fused attention);
/// schemas 1 and 2 move the device kind out of `backend` into `device_kind`, set `backend` to
/// `candle` and `optimizer_impl` to `loop` (the only ones they had) and leave `saved_bytes`
/// empty; every older row gains the fine-tuning columns of full training (`full`, rank,
/// targets and dropout empty, 0 frozen blocks, trainable count unknown); each row's schema
/// cell becomes 4. Returns the number of rows migrated, None when the file is not an
/// older schema (empty, already current, or foreign: left alone). The file must hold complete
/// lines (see `sweep`'s tail repair); every row is checked by [`read`] first, so a bad file is
/// refused, not rewritten.
pub fn migrate(path: &Path) -> anyhow::Result<Option<usize>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let first_line = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let first_line = String::from_utf8_lossy(first_line);
    let first_line = first_line.trim_end_matches('\r');
    let Some(old) = (1..SCHEMA).find(|s| first_line == header_of(*s).join(",")) else {
        return Ok(None);
    };
    read(path)?;
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(bytes.as_slice());
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(HEADER)?;
    let backend_col = HEADER
        .iter()
        .position(|h| *h == "backend")
        .expect("a column");
    let schema = SCHEMA.to_string();
    let mut n = 0;
    for rec in r.records() {
        let rec = rec.with_context(|| format!("reading {}", path.display()))?;
        let mut fields: Vec<String> = rec.iter().map(str::to_string).collect();
        fields[0] = schema.clone();
        if old == 1 {
            fields.push(Attention::Eager.as_str().to_string());
        }
        if old <= 2 {
            let kind = std::mem::replace(&mut fields[backend_col], Backend::Candle.to_string());
            fields.push(kind);
            fields.push(OptimizerImpl::Loop.as_str().to_string());
            fields.push(String::new());
        }
        // schema 4's fine-tuning columns: every older row trained every parameter
        fields.extend(
            [FinetuneMode::Full.as_str(), "", "", "", "0", ""]
                .iter()
                .map(|c| c.to_string()),
        );
        w.write_record(&fields)?;
        n += 1;
    }
    let out = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{}", e.error()))?;
    crate::atomic::write(path, &out)?;
    Ok(Some(n))
}

/// The rows with every point key's last row only, in file order: a re-run point (`sweep
/// --resume --retry-failed`) supersedes its earlier row for the fit and the report.
pub fn latest(rows: Vec<Row>) -> Vec<Row> {
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        last.insert(r.key(), i);
    }
    rows.into_iter()
        .enumerate()
        .filter(|(i, r)| last[&r.key()] == *i)
        .map(|(_, r)| r)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Row {
        let info = crate::harness::measure::cpu_info();
        let model = crate::spec::presets::preset("tiny-gpt").unwrap();
        let mut r = crate::harness::measure::row_template(&info, &model, &TrainSpec::default());
        r.status = Status::Ok;
        r.peak_bytes = Some(1000);
        r.step_ms_median = Some(2.5);
        r
    }

    fn write(dir: &Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("m.csv");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn header_constant_matches_the_serialised_row() {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.serialize(sample()).unwrap();
        let text = String::from_utf8(w.into_inner().unwrap()).unwrap();
        assert_eq!(text.lines().next().unwrap(), HEADER.join(","));
    }

    /// The CSV text of one sample row with `column` replaced by `value`.
    fn with_cell(column: &str, value: &str) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.serialize(sample()).unwrap();
        let text = String::from_utf8(w.into_inner().unwrap()).unwrap();
        let mut r = csv::ReaderBuilder::new().from_reader(text.as_bytes());
        let rec = r.records().next().unwrap().unwrap();
        let i = HEADER.iter().position(|h| *h == column).unwrap();
        let fields: Vec<String> = rec
            .iter()
            .enumerate()
            .map(|(j, f)| {
                if j == i {
                    value.to_string()
                } else {
                    f.to_string()
                }
            })
            .collect();
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(HEADER).unwrap();
        w.write_record(&fields).unwrap();
        String::from_utf8(w.into_inner().unwrap()).unwrap()
    }

    fn err_of(text: &str) -> (String, i32) {
        let dir = tempfile::tempdir().unwrap();
        let e = read(&write(dir.path(), text)).unwrap_err();
        (format!("{e:#}"), crate::error::exit_code(&e))
    }

    #[test]
    fn bad_cells_are_input_errors_naming_line_and_column() {
        for (col, v) in [
            ("step_ms_median", "inf"),
            ("step_ms_p90", "NaN"),
            ("step_ms_p10", "-1.5"),
            ("peak_bytes", "-5"),
            ("peak_bytes", "inf"),
            ("status", "exploded"),
        ] {
            let (msg, code) = err_of(&with_cell(col, v));
            assert_eq!(code, 2, "{col}={v}: {msg}");
            assert!(msg.contains("m.csv line 2 column"), "{msg}");
            assert!(msg.contains(col) && msg.contains(v), "{col}={v}: {msg}");
            assert_eq!(msg.lines().count(), 1, "{msg}");
        }
        // every status name vramcal has ever written still reads
        for s in ["ok", "oom", "error", "skipped", "killed", "timeout"] {
            let dir = tempfile::tempdir().unwrap();
            let rows = read(&write(dir.path(), &with_cell("status", s))).unwrap();
            assert_eq!(rows[0].status.as_str(), s);
        }
    }

    #[test]
    fn other_schemas_and_foreign_headers_are_named() {
        let (msg, code) = err_of(&with_cell("schema", "5"));
        assert_eq!(code, 2);
        assert!(
            msg.contains("line 2 column schema: '5'") && msg.contains("accepted schema 4"),
            "{msg}"
        );
        // a schema cell that disagrees with the header's schema
        let (msg, code) = err_of(&with_cell("schema", "1"));
        assert_eq!(code, 2);
        assert!(
            msg.contains("line 2 column schema") && msg.contains("accepted schema 4"),
            "{msg}"
        );
        // a schema-5 file with its own columns: still "schema 5", not "bad header"
        let (msg, code) = err_of("schema,device_id,new_column\n5,x,y\n");
        assert_eq!(code, 2);
        assert!(
            msg.contains("schema '5'") && msg.contains("accepted schema 1 to 4"),
            "{msg}"
        );
        let (msg, code) = err_of("name,value\na,1\n");
        assert_eq!(code, 2);
        assert!(msg.contains("not a vramcal measurements header"), "{msg}");
        assert_eq!(msg.lines().count(), 1);
        // an attention value this vramcal does not know
        let (msg, code) = err_of(&with_cell("attention", "ring"));
        assert_eq!(code, 2);
        assert!(
            msg.contains("line 2 column attention") && msg.contains("'ring'"),
            "{msg}"
        );
    }

    /// A file of an older schema as an older vramcal wrote it: schema 3 without the fine-tuning
    /// columns; schema 2 also without the three before them and the device kind in `backend`;
    /// schema 1 also without `attention`.
    fn old_text(schema: u32, rows: &[Row]) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let header = header_of(schema);
        w.write_record(header).unwrap();
        for r in rows {
            let mut inner = csv::Writer::from_writer(Vec::new());
            inner.serialize(r).unwrap();
            let text = String::from_utf8(inner.into_inner().unwrap()).unwrap();
            let mut rd = csv::ReaderBuilder::new().from_reader(text.as_bytes());
            let rec = rd.records().next().unwrap().unwrap();
            let mut fields: Vec<&str> = rec.iter().take(header.len()).collect();
            if schema == 1 {
                assert_eq!(rec.get(36), Some("eager"));
            }
            let schema_cell = schema.to_string();
            fields[0] = &schema_cell;
            if schema <= 2 {
                fields[3] = "cpu";
            }
            w.write_record(&fields).unwrap();
        }
        String::from_utf8(w.into_inner().unwrap()).unwrap()
    }

    fn schema1_text(rows: &[Row]) -> String {
        old_text(1, rows)
    }

    #[test]
    fn schema1_files_read_as_eager_and_schema2_round_trips_sdpa() {
        let dir = tempfile::tempdir().unwrap();
        let a = sample();
        let mut b = sample();
        b.batch = 4;
        let old = write(dir.path(), &schema1_text(&[a.clone(), b.clone()]));
        let rows = read(&old).unwrap();
        assert_eq!(rows.len(), 2);
        for r in &rows {
            assert_eq!(r.schema, 1);
            assert_eq!(r.attention, Attention::Eager);
            assert_eq!(r.train_spec().attention, Attention::Eager);
            assert_eq!(r.backend, Backend::Candle);
            assert_eq!(r.device_kind, "cpu");
            assert_eq!(r.optimizer_impl, OptimizerImpl::Loop);
        }
        assert_eq!(rows[1].batch, 4);
        // a schema-1 row with a 37th field is refused, not read
        let text = std::fs::read_to_string(&old).unwrap();
        let long = text.replacen("\n1,", "\n1,x,", 1);
        let (msg, code) = err_of(&long);
        assert_eq!(code, 2);
        assert!(
            msg.contains("37 fields") && msg.contains("36 columns"),
            "{msg}"
        );

        let p = dir.path().join("new.csv");
        let mut s = sample();
        s.attention = Attention::Sdpa;
        append(&p, &a).unwrap();
        append(&p, &s).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with(&HEADER.join(",")), "{text}");
        assert!(text.lines().nth(1).unwrap().contains(",eager,"), "{text}");
        assert!(text.lines().nth(2).unwrap().contains(",sdpa,"), "{text}");
        let rows = read(&p).unwrap();
        assert_eq!(rows, vec![a.clone(), s.clone()]);
        assert_eq!(rows[1].train_spec().attention, Attention::Sdpa);
        // the two points have distinct keys; the eager key is the pre-attention one
        assert_ne!(a.key(), s.key());
        assert!(!a.key().contains("eager") && s.key().ends_with("|sdpa"));
    }

    #[test]
    fn migrating_older_schemas_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = sample();
        b.error = "a, \"quoted\" message".into();
        for old in [1, 2, 3] {
            let p = write(dir.path(), &old_text(old, &[sample(), b.clone()]));
            let before = read(&p).unwrap();
            assert_eq!(migrate(&p).unwrap(), Some(2));
            let text = std::fs::read_to_string(&p).unwrap();
            assert_eq!(text.lines().next().unwrap(), HEADER.join(","));
            let after = read(&p).unwrap();
            assert_eq!(after.len(), 2);
            for (x, y) in before.iter().zip(&after) {
                assert_eq!(y.schema, SCHEMA);
                assert_eq!(y.attention, Attention::Eager);
                assert_eq!(y.backend, Backend::Candle);
                assert_eq!(y.device_kind, "cpu");
                assert_eq!(y.optimizer_impl, OptimizerImpl::Loop);
                let mut x = x.clone();
                x.schema = SCHEMA;
                assert_eq!(&x, y);
                assert_eq!(x.key(), y.key());
            }
            // a current file is left alone
            assert_eq!(migrate(&p).unwrap(), None);
            assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
        }
        // a bad old file is refused, not rewritten
        let bad = schema1_text(&[sample()]).replace(",ok,", ",exploded,");
        let p = write(dir.path(), &bad);
        assert!(migrate(&p).is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), bad);
    }

    #[test]
    fn torch_rows_have_their_own_keys() {
        let a = sample();
        let mut t = sample();
        t.backend = Backend::Torch;
        let mut f = sample();
        f.optimizer_impl = OptimizerImpl::Foreach;
        assert!(t.key().ends_with("|torch"));
        assert!(f.key().ends_with("|foreach"));
        assert_ne!(a.key(), t.key());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        append(&p, &t).unwrap();
        assert_eq!(read(&p).unwrap(), vec![t]);
    }

    #[test]
    fn only_an_unterminated_last_line_is_skipped() {
        let full = with_cell("model", "tiny-gpt");
        let dir = tempfile::tempdir().unwrap();
        let two = format!("{full}{}", full.lines().nth(1).unwrap());
        assert_eq!(read(&write(dir.path(), &two)).unwrap().len(), 1);
        // a short line in the middle is an error, not a silently dropped point
        let mid = format!(
            "{}\n4,cpu\n{}\n",
            HEADER.join(","),
            full.lines().nth(1).unwrap()
        );
        let (msg, code) = err_of(&mid);
        assert_eq!(code, 2);
        assert!(msg.contains("line 2") && msg.contains("2 fields"), "{msg}");
    }

    #[test]
    fn latest_keeps_the_last_row_per_point() {
        let a = sample();
        let mut b = sample();
        b.batch = 2;
        let mut a2 = sample();
        a2.status = Status::Error;
        let rows = latest(vec![a2, b.clone(), a.clone()]);
        assert_eq!(rows, vec![b, a]);
    }
}
