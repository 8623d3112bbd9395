//! The step-time regression
//! `t = (FLOPs / R + A / B_act) * (ckpt ? r : 1) + S / B_state + t0`:
//! achieved FLOP/s `R`, the effective bandwidth of activation traffic `B_act` (memory-bound
//! elementwise kernels over the `A` activation bytes), of the optimizer's pass over the `S` state
//! bytes `B_state`, and the fixed per-step time `t0`, by NNLS on [FLOPs, A, S, 1] over
//! non-checkpointed points (relative weights, as times span orders of magnitude); then the
//! recompute factor `r` from matched checkpointed/plain pairs as the median of the ratio of the
//! parts the model multiplies. FLOPs alone leave small steps badly predicted: on a CPU (and for
//! small layers on a GPU) norms, softmax and the optimizer are bound by memory traffic.

use super::nnls;
use super::points::Point;
use crate::coeffs::ModeCoeffs;
use nalgebra::{DMatrix, DVector};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct TimeFit {
    pub flops_per_s: f64,
    /// 0 when the data gives the term no weight
    pub act_bytes_per_s: f64,
    pub state_bytes_per_s: f64,
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
    let per = |bytes: f64, rate: f64| if rate > 0.0 { bytes / rate } else { 0.0 };
    let scaled = p.flops.total() / r
        + per(
            p.flops.activation_traffic_bytes,
            m.time.act_bytes_per_s.value,
        );
    Some(
        scaled * factor
            + per(p.flops.state_traffic_bytes, m.time.state_bytes_per_s.value)
            + m.time.t0_s.value,
    )
}

/// Columns of the time regression for one point: FLOPs, activation bytes, state bytes, 1.
fn time_row(p: &Point) -> [f64; 4] {
    [
        p.flops.total(),
        p.flops.activation_traffic_bytes,
        p.flops.state_traffic_bytes,
        1.0,
    ]
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

/// Fits R, the two bandwidths and t0 on `points` (needs at least 6 timed non-checkpointed points).
pub fn fit(points: &[&Point]) -> anyhow::Result<Option<TimeFit>> {
    let plain: Vec<&Point> = points
        .iter()
        .copied()
        .filter(|p| !p.ckpt() && p.step_s.is_some())
        .collect();
    if plain.len() < 6 {
        return Ok(None);
    }
    let y = DVector::from_iterator(plain.len(), plain.iter().map(|p| p.step_s.unwrap_or(0.0)));
    let w: Vec<f64> = y.iter().map(|t| 1.0 / t).collect();
    // The FLOP term must stay (the planner scales it to other batch sizes and devices): when the
    // traffic terms absorb it on some data, drop them one at a time before giving up.
    let mut coef = None;
    for cols in [&[0, 1, 2, 3][..], &[0, 2, 3], &[0, 1, 3], &[0, 3]] {
        let a = DMatrix::from_fn(plain.len(), cols.len(), |i, j| time_row(plain[i])[cols[j]]);
        let sol = nnls::fit(&a, &y, Some(&w))?;
        if sol.x[0] > 0.0 {
            let mut x = [0.0; 4];
            for (j, &c) in cols.iter().enumerate() {
                x[c] = sol.x[j];
            }
            coef = Some(x);
            break;
        }
    }
    let Some(sol_x) = coef else {
        return Ok(None);
    };
    let [inv_r, inv_act, inv_state, t0] = sol_x;
    // the part of a step checkpointing does not repeat: the optimizer pass and the fixed time
    let fixed = |p: &Point| p.flops.state_traffic_bytes * inv_state + t0;
    let by_key: HashMap<String, f64> = plain
        .iter()
        .map(|p| (pair_key(p), p.step_s.unwrap_or(0.0) - fixed(p)))
        .collect();
    let mut ratios: Vec<f64> = points
        .iter()
        .filter(|p| p.ckpt())
        .filter_map(|p| {
            let t_ck = p.step_s? - fixed(p);
            let t_pl = *by_key.get(&pair_key(p))?;
            (t_pl > 0.0).then(|| t_ck / t_pl)
        })
        .collect();
    let pairs = ratios.len();
    Ok(Some(TimeFit {
        flops_per_s: 1.0 / inv_r,
        act_bytes_per_s: if inv_act > 0.0 { 1.0 / inv_act } else { 0.0 },
        state_bytes_per_s: if inv_state > 0.0 {
            1.0 / inv_state
        } else {
            0.0
        },
        t0_s: t0,
        n: plain.len(),
        recompute: median(&mut ratios).map(|r| (r, pairs)),
    }))
}
