//! `accuracy.json`: held-out metrics (percent) of the fitted table, the literature table and the
//! rule of thumb on the same points, per group, plus the excluded rows. `heldout` is the fitted table
//! on k-fold held-out points, peak memory; `time_heldout` the fitted step time on the same folds.

use crate::fit::points::{Excluded, Point};
use crate::fit::split::{
    beyond_training, per_group, scores, Evaluation, Metrics, Prediction, Scores, MIN_GROUP_POINTS,
};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct GroupScores {
    pub group: String,
    pub peak_fitted: Metrics,
    pub peak_literature: Metrics,
    pub peak_seed_formula: Metrics,
    pub time_fitted: Metrics,
    /// fewer than `MIN_GROUP_POINTS` held-out points: the metrics are too noisy to compare
    pub too_few_to_score: bool,
}

/// One held-out point with its errors, for finding what limits the model.
#[derive(Debug, Clone, Serialize)]
pub struct WorstPoint {
    pub key: String,
    pub group: String,
    pub measured_bytes: f64,
    pub fitted_bytes: f64,
    pub fitted_pct: f64,
    pub literature_pct: f64,
    pub seed_pct: f64,
    /// predicted beyond the largest batch x tokens of its model in the fold's training points
    pub beyond_training: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub heldout: Metrics,
    pub seed_formula: Metrics,
    pub literature: Metrics,
    pub time_heldout: Metrics,
    /// k-fold held-out points whose batch x tokens exceeded every training point of their
    /// model in their fold (extrapolations inside the k-fold score)
    pub heldout_beyond_training: usize,
    pub scheme: String,
    pub per_group: Vec<GroupScores>,
    /// largest batch x tokens per model held out, fitted on the rest
    pub extrapolation: Scores,
    pub extrapolation_per_group: Vec<GroupScores>,
    pub rows_by_status: BTreeMap<String, usize>,
    pub excluded: Vec<Excluded>,
    /// the k-fold held-out points with the largest fitted-table errors
    pub worst: Vec<WorstPoint>,
    /// the planner scored on PyTorch rows of this device, when the report was given them
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pytorch: Option<super::pytorch::PytorchSection>,
    /// the planner's LoRA plan scored on the fine-tuning rows (candle's and PyTorch's)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::lora::LoraSection>,
    /// k-fold held-out percentage errors of the fitted table per mode ("family/precision"),
    /// what `calibrate` stores in the table for the plan's error band
    #[serde(skip)]
    pub heldout_errors_by_mode: BTreeMap<String, Vec<f64>>,
}

fn worst(eval: &Evaluation, points: &[Point], n: usize) -> Vec<WorstPoint> {
    let beyond = beyond_training(eval, points);
    let mut v: Vec<WorstPoint> = eval
        .predictions
        .iter()
        .zip(beyond)
        .map(|(q, beyond_training)| {
            let p = &points[q.point];
            let r = &p.row;
            WorstPoint {
                key: format!(
                    "{} b{} len{} {} ckpt={} {} z{}/{}",
                    p.model_label(),
                    r.batch,
                    p.length(),
                    r.precision,
                    r.checkpointing,
                    r.optimizer,
                    r.zero_stage,
                    r.gpus
                ),
                group: p.group(),
                measured_bytes: q.measured,
                fitted_bytes: q.fitted,
                fitted_pct: Prediction::pct(q.fitted, q.measured),
                literature_pct: Prediction::pct(q.literature, q.measured),
                seed_pct: Prediction::pct(q.seed, q.measured),
                beyond_training,
            }
        })
        .collect();
    v.sort_by(|a, b| b.fitted_pct.abs().total_cmp(&a.fitted_pct.abs()));
    v.truncate(n);
    v
}

fn groups(eval: &Evaluation, points: &[Point]) -> Vec<GroupScores> {
    per_group(eval, points)
        .into_iter()
        .map(|(group, s)| GroupScores {
            group,
            peak_fitted: s.fitted,
            peak_literature: s.literature,
            peak_seed_formula: s.seed_formula,
            too_few_to_score: s.fitted.n < MIN_GROUP_POINTS,
            time_fitted: s.time_fitted,
        })
        .collect()
}

pub fn accuracy(
    kfold: &Evaluation,
    extrap: &Evaluation,
    points: &[Point],
    excluded: &[Excluded],
) -> Accuracy {
    let k = scores(kfold.predictions.iter());
    let mut rows_by_status: BTreeMap<String, usize> = BTreeMap::new();
    *rows_by_status.entry("ok".into()).or_default() += points.len();
    for e in excluded {
        *rows_by_status.entry(e.status.clone()).or_default() += 1;
    }
    Accuracy {
        heldout: k.fitted,
        seed_formula: k.seed_formula,
        literature: k.literature,
        time_heldout: k.time_fitted,
        heldout_beyond_training: beyond_training(kfold, points)
            .into_iter()
            .filter(|b| *b)
            .count(),
        scheme: kfold.scheme.clone(),
        per_group: groups(kfold, points),
        extrapolation: scores(extrap.predictions.iter()),
        extrapolation_per_group: groups(extrap, points),
        rows_by_status,
        excluded: excluded.to_vec(),
        worst: worst(kfold, points, 10),
        pytorch: None,
        lora: None,
        heldout_errors_by_mode: {
            let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for q in &kfold.predictions {
                let p = &points[q.point];
                m.entry(format!("{}/{}", p.family().as_str(), p.precision()))
                    .or_default()
                    .push(Prediction::pct(q.fitted, q.measured));
            }
            m
        },
    }
}
