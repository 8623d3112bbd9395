//! The step-time regression: fits the terms of `plan::step_time`'s formula
//! `t = (FLOPs / R + sum_j tau_j * f_j) * (ckpt ? r : 1) + S / B_state + t0`:
//! achieved FLOP/s `R`, seconds per element `tau_j` of each activation feature `f_j` (memory-bound
//! kernels cost per op kind: norms, softmax, GELU, pooling), the effective bandwidth of the
//! optimizer's pass over the `S` state bytes `B_state`, and the fixed per-step time `t0`, by NNLS
//! on [FLOPs, f_1..f_k, S, 1] over
//! non-checkpointed points (relative weights, as times span orders of magnitude); then the
//! recompute factor `r` from matched checkpointed/plain pairs as the median of the ratio of the
//! parts the model multiplies. FLOPs alone leave small steps badly predicted: on a CPU (and for
//! small layers on a GPU) norms, softmax and the optimizer are bound by memory traffic.

use super::nnls;
use super::points::Point;
use crate::coeffs::ModeCoeffs;
use crate::plan::memory::Features;
use crate::plan::step_time;
use nalgebra::{DMatrix, DVector};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
enum Column {
    Flops,
    Traffic(&'static str),
    State,
    One,
}

fn feature(p: &Point, name: &str) -> f64 {
    p.flops
        .traffic
        .named()
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0.0, |(_, x)| *x)
}

#[derive(Debug, Clone)]
pub struct TimeFit {
    pub flops_per_s: f64,
    /// seconds per element of each activation feature present in the data (0 = no weight)
    pub s_per_elem: Vec<(&'static str, f64)>,
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
    Some(step_time::seconds(&p.flops, r, &m.time, p.train.checkpointing, 1).applied)
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
    // Columns: FLOPs, each activation feature present in the data (per-op memory traffic),
    // state bytes (optimizer pass), 1.
    let present: Vec<&'static str> = Features::NAMES
        .iter()
        .copied()
        .filter(|n| plain.iter().any(|p| feature(p, n) > 0.0))
        .collect();
    let value = |p: &Point, c: &Column| match c {
        Column::Flops => p.flops.total(),
        Column::Traffic(n) => feature(p, n),
        Column::State => p.flops.state_traffic_bytes,
        Column::One => 1.0,
    };
    let full: Vec<Column> = std::iter::once(Column::Flops)
        .chain(present.iter().map(|n| Column::Traffic(n)))
        .chain([Column::State, Column::One])
        .collect();
    // The FLOP term must stay (the planner scales it to other batch sizes and devices). When
    // traffic terms absorb it (they grow with the same shapes), drop traffic columns greedily,
    // one per round, keeping the subset with the least weighted error, until FLOPs keep weight.
    let solve = |cols: &[Column]| -> anyhow::Result<(DVector<f64>, f64)> {
        let a = DMatrix::from_fn(plain.len(), cols.len(), |i, j| value(plain[i], &cols[j]));
        let sol = nnls::fit(&a, &y, Some(&w))?;
        let r = &a * &sol.x - &y;
        let err = r.iter().zip(&w).map(|(r, w)| (r * w).powi(2)).sum::<f64>();
        Ok((sol.x, err))
    };
    let mut cols = full;
    let mut found = None;
    loop {
        let (x, _) = solve(&cols)?;
        if x[0] > 0.0 {
            found = Some((cols, x));
            break;
        }
        let traffic: Vec<usize> = (0..cols.len())
            .filter(|&j| matches!(cols[j], Column::Traffic(_)))
            .collect();
        if traffic.is_empty() {
            break;
        }
        // Prefer a removal that restores the FLOP term; otherwise the least harmful one.
        let mut best: Option<(bool, f64, usize)> = None;
        for &j in &traffic {
            let mut c = cols.clone();
            c.remove(j);
            let (x, err) = solve(&c)?;
            let key = (x[0] > 0.0, -err, j);
            if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
                best = Some(key);
            }
        }
        let (_, _, j) = best.expect("at least one traffic column");
        cols.remove(j);
    }
    let Some((cols, x)) = found else {
        return Ok(None);
    };
    let coef = |c: &Column| cols.iter().position(|k| k == c).map_or(0.0, |j| x[j]);
    let (inv_r, inv_state, t0) = (
        coef(&Column::Flops),
        coef(&Column::State),
        coef(&Column::One),
    );
    let s_per_elem: Vec<(&'static str, f64)> = present
        .iter()
        .map(|n| (*n, coef(&Column::Traffic(n))))
        .collect();
    // the part of a step checkpointing does not repeat (`step_time::once_s`), in the
    // regression's fitted terms: the optimizer pass and the fixed time
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
        s_per_elem,
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
