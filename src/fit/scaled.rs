//! Fitting a precision with few points of its own: the activation terms keep the shape of a
//! pooled fit (same family, all precisions) and only their overall scale `alpha` is fitted on
//! the precision's own points, together with frag and const when there are enough points:
//! `peak - B = frag*B + alpha'*A_pooled + const`, with `A_pooled = sum_i c_i(pooled) * x_i`,
//! `alpha = alpha' / (1 + frag)` and `B` the bytes (1 + frag) multiplies that no fitted
//! coefficient scales, each point in its regime: the certain ones
//! ([`super::memfit::certain_bytes`]: weights, optimizer states, the regime's gradients), the
//! known ones ([`super::memfit::known_bytes`]: fused attention, MoE experts, ...) and the
//! prior's resident share of the 16-bit weight copy.
//!
//! Why: a 16-bit activation stores fewer bytes per element than fp32 but the same tensors are
//! kept, so the pooled coefficients are the right shape and wrong scale. Pooling coefficients
//! across precisions directly (fp32 data dominating) predicted 16-bit peaks 25-65 % off on CPU.

use super::memfit::{certain_bytes, known_bytes, Col, MemFit, Origin, Regime, COLS};
use super::nnls;
use super::points::Point;
use crate::coeffs::ModeCoeffs;
use nalgebra::{DMatrix, DVector};

/// Fits `alpha` (and frag, const with >= 5 points) on `points`, each in its regime (from the
/// fit that gave the prior), around the `prior` mode.
pub fn fit(
    points: &[&Point],
    regimes: &[Regime],
    prior: &ModeCoeffs,
) -> anyhow::Result<(MemFit, f64)> {
    anyhow::ensure!(points.len() >= 2, "scaled fit needs at least 2 points");
    anyhow::ensure!(points.len() == regimes.len(), "one regime per point");
    let act_cols: Vec<Col> = COLS
        .iter()
        .copied()
        .filter(|c| !matches!(c, Col::Frag | Col::HalfCopy | Col::Const))
        .collect();
    let a_pooled = |p: &Point, r: Regime| {
        act_cols
            .iter()
            .map(|c| c.get(prior) * c.value(p, r, &prior.activation))
            .sum::<f64>()
    };
    let hc = Col::HalfCopy.get(prior);
    let full = points.len() >= 5;
    // columns: alpha' [, frag, const]
    let ncols = if full { 3 } else { 1 };
    let (frag0, const0) = (Col::Frag.get(prior), Col::Const.get(prior));
    let a = DMatrix::from_fn(points.len(), ncols, |i, j| match j {
        0 => a_pooled(points[i], regimes[i]),
        1 => {
            let (p, r, a) = (points[i], regimes[i], &prior.activation);
            certain_bytes(p, r, a) + known_bytes(p, r, a) + hc * Col::HalfCopy.value(p, r, a)
        }
        _ => 1.0,
    });
    let y = DVector::from_iterator(
        points.len(),
        points.iter().zip(regimes).map(|(p, r)| {
            let certain = certain_bytes(p, *r, &prior.activation);
            let half = hc * Col::HalfCopy.value(p, *r, &prior.activation);
            let known = known_bytes(p, *r, &prior.activation);
            let base = p.peak - certain - half - known;
            if full {
                base
            } else {
                // frag and const from the prior:
                // peak = (1+frag)(fixed + hc H + known + alpha A) + const
                (p.peak - const0) / (1.0 + frag0) - certain - half - known
            }
        }),
    );
    let w: Vec<f64> = points.iter().map(|p| 1.0 / p.peak).collect();
    let sol = nnls::fit(&a, &y, Some(&w))?;
    let (frag, cst) = if full {
        (sol.x[1], sol.x[2])
    } else {
        (frag0, const0)
    };
    let alpha = if full {
        sol.x[0] / (1.0 + frag)
    } else {
        sol.x[0]
    };
    let mut values = [0.0; COLS.len()];
    let mut origin = [Origin::Fitted; COLS.len()];
    for (k, c) in COLS.iter().enumerate() {
        values[k] = match c {
            Col::Frag => frag,
            Col::Const => cst,
            Col::HalfCopy => hc,
            _ => alpha * c.get(prior),
        };
        if !full && matches!(c, Col::Frag | Col::Const) || *c == Col::HalfCopy {
            origin[k] = Origin::Unidentifiable;
        }
    }
    Ok((
        MemFit {
            values,
            origin,
            rel_se: [None; COLS.len()],
            n: points.len(),
            regimes: regimes.to_vec(),
            rel_sse: None,
        },
        alpha,
    ))
}
