//! Modes for a precision a family was not measured in (e.g. a grid with fp16-mixed transformer
//! points but too few, or no, fp16-mixed CNN points in a fold): the family's fp32 fit with its
//! activation coefficients scaled by the factor `alpha` that precision showed on another family
//! (fitted there with `scaled::fit` around that family's fp32 mode), the half copy of that
//! family's mode, and the achieved FLOP/s scaled by the same family's rate ratio.
//!
//! Why: without it the planner falls back to the literature table, which on a CPU is off by
//! 60-70 %; the 16-bit activation scale is a property of the device and framework more than of
//! the model family.

use super::memfit::{self, Col, COLS};
use super::meta::Meta;
use super::points::Point;
use super::scaled;
use crate::coeffs::{Coef, ModeCoeffs};
use crate::spec::{Family, Precision};
use serde_json::json;
use std::collections::BTreeSet;

fn find(modes: &[ModeCoeffs], f: Family, p: Precision) -> Option<&ModeCoeffs> {
    modes.iter().find(|m| m.family == f && m.precision == p)
}

/// Borrowed modes for every (family with an fp32 mode, precision fitted elsewhere) pair missing.
pub fn borrowed(
    points: &[&Point],
    modes: &[ModeCoeffs],
    meta: &Meta,
) -> anyhow::Result<Vec<(ModeCoeffs, serde_json::Value)>> {
    let families: BTreeSet<Family> = modes.iter().map(|m| m.family).collect();
    let precisions: BTreeSet<Precision> = modes
        .iter()
        .map(|m| m.precision)
        .filter(|p| *p != Precision::Fp32)
        .collect();
    let mut out = Vec::new();
    for &f in &families {
        let Some(base) = find(modes, f, Precision::Fp32) else {
            continue;
        };
        for &p in &precisions {
            if find(modes, f, p).is_some() {
                continue;
            }
            for &g in families.iter().filter(|g| **g != f) {
                let (Some(g_base), Some(g_mode)) =
                    (find(modes, g, Precision::Fp32), find(modes, g, p))
                else {
                    continue;
                };
                let g_pts: Vec<&Point> = points
                    .iter()
                    .copied()
                    .filter(|q| q.family() == g && q.precision() == p)
                    .collect();
                if g_pts.len() < 2 {
                    continue;
                }
                let mut prior = g_base.clone();
                prior.activation.half_copy = g_mode.activation.half_copy.clone();
                // the fp32 mode's measured blocks (if its fit chose them) describe fp32 tensors,
                // not this precision's points: the scale is fitted on the per-feature shape
                prior.activation.blocks.clear();
                // each point in the regime its own fitted mode puts it in
                let regimes = memfit::regimes_under(&g_pts, g_mode);
                let (_, alpha) = scaled::fit(&g_pts, &regimes, &prior)?;
                let mut mode = base.clone();
                mode.precision = p;
                if !mode.activation.blocks.is_empty() {
                    // measured blocks are per precision: the literature's for this one, of the
                    // device class (CUDA or CPU) the fitted mode's blocks are
                    let lit_ref = crate::coeffs::Coefficients::literature_ref();
                    let cpu = mode.activation.blocks
                        == lit_ref.mode(f, Precision::Fp32).activation.cpu_blocks;
                    let lit = lit_ref.mode(f, p).activation;
                    mode.activation.blocks = if cpu && !lit.cpu_blocks.is_empty() {
                        lit.cpu_blocks
                    } else {
                        lit.blocks
                    };
                    mode.activation.act_fns = lit.act_fns;
                }
                let why = format!(
                    "{} fp32 fit x alpha = {alpha:.4}, the {p} activation scale fitted on {} {} points, {}, {}",
                    f.as_str(),
                    g_pts.len(),
                    g.as_str(),
                    meta.device_id,
                    meta.date
                );
                for c in COLS {
                    // The optimizer step updates fp32 master weights and states in every
                    // precision, so its transients do not scale with the activation dtype.
                    if matches!(c, Col::Frag | Col::Const | Col::HalfCopy | Col::MaxParam) {
                        continue;
                    }
                    let coef = c.coef_mut(&mut mode);
                    *coef = Coef::new(coef.value * alpha, why.clone());
                }
                mode.activation.half_copy = Coef::new(
                    g_mode.activation.half_copy.value,
                    format!(
                        "from the {} {p} mode: {}",
                        g.as_str(),
                        g_mode.activation.half_copy.source
                    ),
                );
                let (r_base, r_p) = (g_base.time.flops_per_s.value, g_mode.time.flops_per_s.value);
                if r_base > 0.0 && r_p > 0.0 && base.time.flops_per_s.value > 0.0 {
                    mode.time.flops_per_s = Coef::new(
                        base.time.flops_per_s.value * r_p / r_base,
                        format!(
                            "{} fp32 rate x the {p}/fp32 rate ratio {:.3} of {}",
                            f.as_str(),
                            r_p / r_base,
                            g.as_str()
                        ),
                    );
                }
                out.push((mode, json!({ "memory_scope": format!("borrowed: {why}"), "activation_scale_alpha": alpha })));
                break;
            }
        }
    }
    Ok(out)
}
