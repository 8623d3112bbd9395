//! "Predicting PyTorch": the report's section that scores the planner against PyTorch rows
//! (`--backend torch`) of the same device, because PyTorch is what users train with and candle
//! only the instrument.
//!
//! Each PyTorch row is predicted by a table that never saw its configuration: where candle
//! measured the same configuration, the k-fold table that held that configuration out (the
//! prediction the candle accuracy table already scores); otherwise the full fitted table (it
//! was fitted on candle rows of other configurations). The literature defaults and the rule of
//! thumb are scored on the same rows. Beside it, candle's own parity with PyTorch on the
//! configurations both measured: the ratio of the two peaks and of the two step times.

use crate::coeffs::Coefficients;
use crate::fit::baseline::seed_bytes;
use crate::fit::points::{prepare, Point};
use crate::fit::split::{per_group, scores, Evaluation, Metrics, Prediction, Scores};
use crate::harness::record::{point_key, Backend, Row};
use crate::plan::memory::breakdown;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// Distribution of candle / PyTorch ratios over configurations both measured.
#[derive(Debug, Clone, Serialize)]
pub struct Parity {
    /// a model preset name, or "all"
    pub model: String,
    pub n: usize,
    pub peak_ratio_median: f64,
    pub peak_ratio_min: f64,
    pub peak_ratio_max: f64,
    /// configurations whose candle peak is within 5 % of PyTorch's
    pub peak_within_5pct: usize,
    pub time_ratio_median: Option<f64>,
    /// the step-time ratio over fp32 configurations only: PyTorch's 16-bit CPU kernels are
    /// mostly slow fallbacks (fp16 convolutions through `slow_conv2d`, upcasts), so its 16-bit
    /// steps say little about candle's speed
    pub time_ratio_median_fp32: Option<f64>,
    /// the same over 16-bit (mixed or pure) configurations
    pub time_ratio_median_16bit: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupPytorch {
    pub group: String,
    pub scores: Scores,
}

#[derive(Debug, Clone, Serialize)]
pub struct PytorchSection {
    pub data_path: String,
    /// PyTorch rows scored (status ok)
    pub rows: usize,
    /// rows predicted by a k-fold table that held their configuration out
    pub heldout_rows: usize,
    /// candle-fitted table (held out as above), literature defaults, rule of thumb
    pub scores: Scores,
    pub per_group: Vec<GroupPytorch>,
    /// per model, then "all"
    pub parity: Vec<Parity>,
    /// the rows with the largest fitted-table errors
    pub worst: Vec<(String, f64, f64, f64)>,
}

/// The configuration of a row, without the device and the backend.
pub(crate) fn config_key(row: &Row) -> String {
    point_key(
        "",
        Backend::Candle,
        &row.spec_json,
        &row.train_spec(),
        &row.finetune_key(),
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    crate::harness::row_fill::quantile(v, 0.5)
}

fn parity(model: &str, pairs: &[(&Point, &Point)]) -> Parity {
    let mut peak: Vec<f64> = pairs.iter().map(|(c, t)| c.peak / t.peak).collect();
    let time_of = |fp32: Option<bool>| -> Option<f64> {
        let mut v: Vec<f64> = pairs
            .iter()
            .filter(|(_, t)| fp32.is_none_or(|f| (t.precision().compute_bytes() == 4) == f))
            .filter_map(|(c, t)| Some(c.step_s? / t.step_s?))
            .collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let within = peak.iter().filter(|r| (*r - 1.0).abs() <= 0.05).count();
    let (min, max) = peak
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), r| (a.min(*r), b.max(*r)));
    Parity {
        model: model.to_string(),
        n: pairs.len(),
        peak_ratio_median: median(&mut peak),
        peak_ratio_min: min,
        peak_ratio_max: max,
        peak_within_5pct: within,
        time_ratio_median: time_of(None),
        time_ratio_median_fp32: time_of(Some(true)),
        time_ratio_median_16bit: time_of(Some(false)),
    }
}

/// Scores the planner on `torch_rows`. `candle` are the fitted points and `kfold` their held-out
/// evaluation; `table` the table fitted on all of them. None when no PyTorch row is ok.
pub fn section(
    torch_rows: &[Row],
    data_path: &str,
    candle: &[Point],
    kfold: &Evaluation,
    table: &Coefficients,
) -> Option<PytorchSection> {
    let torch: Vec<Row> = torch_rows
        .iter()
        .filter(|r| r.backend == Backend::Torch)
        .cloned()
        .collect();
    // fine-tuning rows are left out by prepare: the LoRA section scores them
    let (points, _) = prepare(&torch);
    if points.is_empty() {
        return None;
    }
    let heldout: HashMap<String, f64> = kfold
        .predictions
        .iter()
        .map(|q| (config_key(&candle[q.point].row), q.fitted))
        .collect();
    let candle_by_key: HashMap<String, &Point> =
        candle.iter().map(|p| (config_key(&p.row), p)).collect();
    let lit = Coefficients::literature();
    let mut held = 0;
    let predictions: Vec<Prediction> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let fitted = match heldout.get(&config_key(&p.row)) {
                Some(f) => {
                    held += 1;
                    *f
                }
                None => breakdown(&p.terms, &p.model, &p.train, table).total as f64,
            };
            Prediction {
                point: i,
                fold: 0,
                measured: p.peak,
                fitted,
                literature: breakdown(&p.terms, &p.model, &p.train, &lit).total as f64,
                seed: seed_bytes(&p.model, &p.train),
                time_measured: None,
                time_fitted: None,
            }
        })
        .collect();
    let eval = Evaluation {
        scheme: "PyTorch rows".into(),
        predictions,
        fitted_on: Vec::new(),
    };
    let per_group = per_group(&eval, &points)
        .into_iter()
        .map(|(group, scores)| GroupPytorch { group, scores })
        .collect();

    let mut by_model: BTreeMap<String, Vec<(&Point, &Point)>> = BTreeMap::new();
    for t in &points {
        if let Some(c) = candle_by_key.get(&config_key(&t.row)) {
            by_model
                .entry(t.row.model.clone())
                .or_default()
                .push((*c, t));
        }
    }
    let mut parities: Vec<Parity> = by_model.iter().map(|(m, v)| parity(m, v)).collect();
    let all: Vec<(&Point, &Point)> = by_model.values().flatten().copied().collect();
    if !all.is_empty() {
        parities.push(parity("all", &all));
    }

    let mut worst: Vec<(String, f64, f64, f64)> = eval
        .predictions
        .iter()
        .map(|q| {
            let r = &points[q.point].row;
            (
                format!(
                    "{} b{} len{} {} ckpt={} {} {}",
                    r.model,
                    r.batch,
                    points[q.point].length(),
                    r.precision,
                    r.checkpointing,
                    r.optimizer,
                    r.attention
                ),
                Prediction::pct(q.fitted, q.measured),
                Prediction::pct(q.literature, q.measured),
                Prediction::pct(q.seed, q.measured),
            )
        })
        .collect();
    worst.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    worst.truncate(10);
    Some(PytorchSection {
        data_path: data_path.to_string(),
        rows: points.len(),
        heldout_rows: held,
        scores: scores(eval.predictions.iter()),
        per_group,
        parity: parities,
        worst,
    })
}

/// The section's Markdown.
pub fn markdown(s: &PytorchSection, metrics_row: fn(&str, &Metrics) -> String) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Predicting PyTorch\n\nThe same device measured by PyTorch with transformers' own model classes (`--backend torch`, `{}`): {} rows, each predicted by a table that never saw its configuration ({} by the k-fold table that held the configuration out, the rest by the full table, fitted on candle rows of other configurations). Errors in percent of PyTorch's measured peak.\n",
        s.data_path, s.rows, s.heldout_rows
    );
    out.push_str("| predictor | MAPE | median abs | max abs | n |\n|---|---|---|---|---|\n");
    out.push_str(&metrics_row("fitted table (candle)", &s.scores.fitted));
    out.push_str(&metrics_row("literature defaults", &s.scores.literature));
    out.push_str(&metrics_row(
        "rule of thumb (params·4·3 + b·s·h·10)",
        &s.scores.seed_formula,
    ));
    out.push_str("\nPer group:\n\n| group | fitted MAPE | literature MAPE | rule of thumb MAPE | n |\n|---|---|---|---|---|\n");
    for g in &s.per_group {
        let _ = writeln!(
            out,
            "| {} | {:.2} % | {:.2} % | {:.2} % | {} |",
            g.group,
            g.scores.fitted.mape,
            g.scores.literature.mape,
            g.scores.seed_formula.mape,
            g.scores.fitted.n
        );
    }
    if !s.parity.is_empty() {
        out.push_str("\nCandle against PyTorch on the configurations both measured (peak ratio candle / PyTorch; step-time ratio the same way, over all its configurations and over the fp32 and 16-bit ones apart: PyTorch's 16-bit CPU kernels are mostly slow fallbacks):\n\n| model | n | peak ratio median | min | max | within 5 % | step-time ratio median | fp32 | 16-bit |\n|---|---|---|---|---|---|---|---|---|\n");
        let ratio = |t: Option<f64>| t.map_or("n/a".into(), |t| format!("{t:.2}"));
        for p in &s.parity {
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |",
                p.model,
                p.n,
                p.peak_ratio_median,
                p.peak_ratio_min,
                p.peak_ratio_max,
                p.peak_within_5pct,
                ratio(p.time_ratio_median),
                ratio(p.time_ratio_median_fp32),
                ratio(p.time_ratio_median_16bit),
            );
        }
    }
    out.push_str("\nLargest fitted-table errors on PyTorch rows:\n\n| configuration | fitted | literature | rule of thumb |\n|---|---|---|---|\n");
    for (k, f, l, r) in &s.worst {
        let _ = writeln!(out, "| {k} | {f:+.1} % | {l:+.1} % | {r:+.1} % |");
    }
    out
}
