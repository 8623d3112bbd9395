//! Measurement rows turned into fit points: the model and training specs re-parsed from the row,
//! the planner's own feature terms and FLOPs, and the measured targets. Rows that are not `ok`
//! (or that cannot be re-planned) are kept aside as exclusions, listed in the report.

use crate::harness::record::{Row, Status};
use crate::plan::memory::{fit_terms, FitTerms};
use crate::plan::time::{step_flops, StepFlops};
use crate::spec::{Family, ModelSpec, Precision, TrainSpec};
use serde::Serialize;

/// One usable measurement.
#[derive(Debug, Clone)]
pub struct Point {
    pub row: Row,
    pub model: ModelSpec,
    pub train: TrainSpec,
    pub terms: FitTerms,
    pub flops: StepFlops,
    /// measured peak bytes (primary probe)
    pub peak: f64,
    /// measured median step time, seconds
    pub step_s: Option<f64>,
    /// configuration shape: model spec + batch + seq/image + precision + checkpointing + ZeRO.
    /// Rows sharing it are one configuration for cross-validation (never split across folds).
    pub shape: String,
}

impl Point {
    pub fn family(&self) -> Family {
        self.model.family()
    }
    pub fn precision(&self) -> Precision {
        self.train.precision
    }
    pub fn ckpt(&self) -> bool {
        self.train.checkpointing.is_on()
    }
    /// Tokens per sample (transformers: effective sequence; CNNs: image pixels), the "size" axis.
    pub fn tokens(&self) -> u64 {
        match &self.model {
            ModelSpec::Transformer(t) => t.effective_seq(self.train.seq, self.train.image),
            ModelSpec::Cnn(_) => self.train.image * self.train.image,
        }
    }
    /// Sequence length for transformers, image side for CNNs.
    pub fn length(&self) -> u64 {
        match &self.model {
            ModelSpec::Transformer(t) if t.patch.is_none() => self.train.seq,
            _ => self.train.image,
        }
    }
    /// The model's name with its shape: grids reuse a preset name with other layer counts or
    /// widths.
    pub fn model_label(&self) -> String {
        match &self.model {
            ModelSpec::Transformer(t) => {
                format!("{} L{} h{} f{}", t.name, t.layers, t.hidden, t.ffn)
            }
            ModelSpec::Cnn(c) => format!("{} ({} params)", c.name, self.terms.params),
        }
    }
    /// "family/precision/ckpt" label used for per-group metrics.
    pub fn group(&self) -> String {
        format!(
            "{}/{}/{}",
            self.family().as_str(),
            self.precision(),
            if self.ckpt() { "ckpt" } else { "no-ckpt" }
        )
    }
}

/// A row left out of the fit, with why.
#[derive(Debug, Clone, Serialize)]
pub struct Excluded {
    pub key: String,
    pub model: String,
    pub status: String,
    pub error: String,
}

/// Shape key (see [`Point::shape`]).
pub fn shape_key(row: &Row) -> String {
    format!(
        "{}|b{}|s{}|i{}|{}|{}|z{}/{}",
        row.spec_json,
        row.batch,
        row.seq,
        row.image,
        row.precision,
        row.checkpointing,
        row.zero_stage,
        row.gpus
    )
}

fn readable_key(row: &Row) -> String {
    format!(
        "{} b{} s{} i{} {} ckpt={} {} z{}",
        row.model,
        row.batch,
        row.seq,
        row.image,
        row.precision,
        row.checkpointing,
        row.optimizer,
        row.zero_stage
    )
}

/// Splits rows into usable points and exclusions. Fine-tuning rows (LoRA, frozen blocks) are
/// neither: the coefficients are fitted on full training only, and those rows are scored
/// against the planner's fine-tuning plan apart (`report::lora`). Their adapter terms are known
/// bytes (`plan::finetune`), not fitted, and candle's frozen unadapted linears keep inputs
/// PyTorch's do not (docs/architecture.md), which would bias the activation coefficients.
pub fn prepare(rows: &[Row]) -> (Vec<Point>, Vec<Excluded>) {
    let mut points = Vec::new();
    let mut excluded = Vec::new();
    for row in rows.iter().filter(|r| r.finetune().is_plain()) {
        let exclude = |error: String| Excluded {
            key: readable_key(row),
            model: row.model.clone(),
            status: row.status.as_str().to_string(),
            error,
        };
        if row.status != Status::Ok {
            excluded.push(exclude(row.error.clone()));
            continue;
        }
        let peak = match row.peak_bytes {
            Some(p) if p > 0 => p as f64,
            _ => {
                excluded.push(exclude("status ok but no peak_bytes recorded".into()));
                continue;
            }
        };
        let planned = row.model_spec().and_then(|model| {
            let train = row.planned_train_spec()?;
            let terms = fit_terms(&model, &train)?;
            let flops = step_flops(&model, &train)?;
            Ok((model, train, terms, flops))
        });
        match planned {
            Ok((model, train, terms, flops)) => points.push(Point {
                shape: shape_key(row),
                step_s: row.step_ms_median.filter(|t| *t > 0.0).map(|t| t / 1e3),
                row: row.clone(),
                model,
                train,
                terms,
                flops,
                peak,
            }),
            Err(e) => excluded.push(exclude(format!("cannot re-plan the row: {e:#}"))),
        }
    }
    (points, excluded)
}
