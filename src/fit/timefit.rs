//! The step-time regression `t = FLOPs * (ckpt ? r : 1) / R + t0`: achieved FLOP/s `R` and the
//! fixed per-step time `t0` by NNLS on [FLOPs, 1] over non-checkpointed points (relative
//! weights, as times span orders of magnitude), then the recompute factor `r` from matched
//! checkpointed/plain pairs as the median of `(t_ckpt - t0) / (t_plain - t0)`, i.e. the ratio of
//! the FLOP-proportional parts, which is what the model multiplies.

use super::nnls;
use super::points::Point;
use crate::coeffs::ModeCoeffs;
use nalgebra::{DMatrix, DVector};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct TimeFit {
    pub flops_per_s: f64,
    pub t0_s: f64,
    pub n: usize,
    /// `Some((factor, pairs))` when checkpointed pairs were measured
    pub recompute: Option<(f64, usize)>,
}

/// Predicted step seconds, or `None` where the table has no achieved FLOP/s for this device.
pub fn predict(p: &Point, m: &ModeCoeffs) -> Option<f64> {
    let r = m.time.flops_per_s.value;
    if r <= 0.0 {
        return None;
    }
    let factor = if p.ckpt() {
        m.time.recompute_factor.value
    } else {
        1.0
    };
    Some(p.flops.total() * factor / r + m.time.t0_s.value)
}

fn pair_key(p: &Point) -> String {
    let r = &p.row;
    format!(
        "{}|b{}|s{}|i{}|{}|{}|z{}/{}",
        r.spec_json, r.batch, r.seq, r.image, r.precision, r.optimizer, r.zero_stage, r.gpus
    )
}

pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    })
}

/// Fits R and t0 on `points` (needs at least 3 timed non-checkpointed points).
pub fn fit(points: &[&Point]) -> anyhow::Result<Option<TimeFit>> {
    let plain: Vec<&Point> = points
        .iter()
        .copied()
        .filter(|p| !p.ckpt() && p.step_s.is_some())
        .collect();
    if plain.len() < 3 {
        return Ok(None);
    }
    let a = DMatrix::from_fn(plain.len(), 2, |i, j| {
        if j == 0 {
            plain[i].flops.total()
        } else {
            1.0
        }
    });
    let y = DVector::from_iterator(plain.len(), plain.iter().map(|p| p.step_s.unwrap_or(0.0)));
    let w: Vec<f64> = y.iter().map(|t| 1.0 / t).collect();
    let sol = nnls::fit(&a, &y, Some(&w))?;
    if sol.x[0] <= 0.0 {
        return Ok(None);
    }
    let (inv_r, t0) = (sol.x[0], sol.x[1]);
    let by_key: HashMap<String, f64> = plain
        .iter()
        .map(|p| (pair_key(p), p.step_s.unwrap_or(0.0)))
        .collect();
    let mut ratios: Vec<f64> = points
        .iter()
        .filter(|p| p.ckpt())
        .filter_map(|p| {
            let t_ck = p.step_s?;
            let t_pl = *by_key.get(&pair_key(p))?;
            (t_pl - t0 > 0.0).then(|| (t_ck - t0) / (t_pl - t0))
        })
        .collect();
    let pairs = ratios.len();
    Ok(Some(TimeFit {
        flops_per_s: 1.0 / inv_r,
        t0_s: t0,
        n: plain.len(),
        recompute: median(&mut ratios).map(|r| (r, pairs)),
    }))
}
