//! Measured effects from matched pairs in the data (not from the model): checkpointing's memory
//! saving and recompute cost, and mixed precision's memory saving. A pair differs in exactly one
//! setting; everything else (model, batch, length, optimizer, ZeRO) is equal.

use crate::fit::points::Point;
use crate::fit::timefit::median;
use crate::spec::Precision;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One model's matched pairs, medians over the pairs (percent).
#[derive(Debug, Clone, Serialize)]
pub struct PairEffect {
    pub model: String,
    pub pairs: usize,
    /// (plain - other) / plain of the peak
    pub peak_saving_pct: f64,
    /// the same for activation memory, measured as peak - baseline - gradient bytes
    pub activation_saving_pct: Option<f64>,
    /// other / plain - 1 of the median step time
    pub time_cost_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Findings {
    /// checkpointing vs none, per model, then "all" (median over every pair)
    pub checkpointing: Vec<PairEffect>,
    /// bf16-mixed / fp16-mixed vs fp32, per model and precision, then "all"
    pub mixed_precision: Vec<PairEffect>,
}

/// Activation bytes a row measured: the step's transient memory minus the gradients it creates.
fn activation(p: &Point) -> Option<f64> {
    let base = p.row.baseline_bytes? as f64;
    let a = p.peak - base - p.terms.states.gradients;
    (a > 0.0).then_some(a)
}

/// Everything that makes a configuration, with the precision or the checkpointing wildcarded
/// (`false`): eager and sdpa, or full and LoRA, points of one shape are different pairs.
fn key(p: &Point, ckpt: bool, precision: bool) -> String {
    let r = &p.row;
    format!(
        "{}|b{}|s{}|i{}|{}|{}|{}|z{}/{}|{}|{}|{}/{:?}/{}",
        r.spec_json,
        r.batch,
        r.seq,
        r.image,
        if precision { r.precision.as_str() } else { "*" },
        if ckpt { r.checkpointing.as_str() } else { "*" },
        r.optimizer,
        r.zero_stage,
        r.gpus,
        r.attention,
        r.optimizer_impl,
        r.finetune.as_str(),
        r.lora_rank,
        r.lora_targets
    )
}

fn summarise(label: String, pairs: &[(&Point, &Point)]) -> PairEffect {
    let pct = |a: f64, b: f64| 100.0 * (a - b) / a;
    let mut peak: Vec<f64> = pairs.iter().map(|(pl, o)| pct(pl.peak, o.peak)).collect();
    let mut act: Vec<f64> = pairs
        .iter()
        .filter_map(|(pl, o)| Some(pct(activation(pl)?, activation(o)?)))
        .collect();
    let mut time: Vec<f64> = pairs
        .iter()
        .filter_map(|(pl, o)| Some(100.0 * (o.step_s? / pl.step_s? - 1.0)))
        .collect();
    PairEffect {
        model: label,
        pairs: pairs.len(),
        peak_saving_pct: median(&mut peak).unwrap_or(f64::NAN),
        activation_saving_pct: median(&mut act),
        time_cost_pct: median(&mut time),
    }
}

fn effects<'a>(pairs: Vec<(String, &'a Point, &'a Point)>) -> Vec<PairEffect> {
    let mut by: BTreeMap<String, Vec<(&Point, &Point)>> = BTreeMap::new();
    for (label, a, b) in &pairs {
        by.entry(label.clone()).or_default().push((a, b));
    }
    let mut out: Vec<PairEffect> = by.into_iter().map(|(l, v)| summarise(l, &v)).collect();
    if !pairs.is_empty() {
        let all: Vec<(&Point, &Point)> = pairs.iter().map(|(_, a, b)| (*a, *b)).collect();
        out.push(summarise("all".into(), &all));
    }
    out
}

pub fn findings(points: &[Point]) -> Findings {
    // full checkpointing against none (not selective), by key with the checkpointing wildcarded
    let plain: HashMap<String, &Point> = points
        .iter()
        .filter(|p| p.train.checkpointing == crate::spec::Checkpointing::None)
        .map(|p| (key(p, false, true), p))
        .collect();
    let ck_pairs = points
        .iter()
        .filter(|p| p.ckpt())
        .filter_map(|p| Some((p.model_label(), *plain.get(&key(p, false, true))?, p)))
        .collect();
    let fp32: HashMap<String, &Point> = points
        .iter()
        .filter(|p| p.precision() == Precision::Fp32)
        .map(|p| (key(p, true, false), p))
        .collect();
    let mp_pairs = points
        .iter()
        .filter(|p| p.precision().is_mixed())
        .filter_map(|p| {
            Some((
                format!("{} {}", p.model_label(), p.precision()),
                *fp32.get(&key(p, true, false))?,
                p,
            ))
        })
        .collect();
    Findings {
        checkpointing: effects(ck_pairs),
        mixed_precision: effects(mp_pairs),
    }
}
