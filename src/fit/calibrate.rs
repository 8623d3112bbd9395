//! From points to a coefficient table: one mode per (family, precision) present in the data.
//! Each mode is fitted on its own points when they outnumber its unknowns (plus a margin);
//! otherwise on points pooled over the family's precisions of the same compute width, then over
//! the whole family; otherwise it stays at the literature values. Every value records its source.

use super::memfit::{self, Origin, COLS};
use super::meta::Meta;
use super::points::Point;
use super::scaled;
use super::timefit;
use crate::coeffs::{Coef, Coefficients, ModeCoeffs};
use crate::plan::memory::breakdown;
use crate::spec::{Family, Precision};
use serde_json::json;
use std::collections::BTreeSet;

/// Equations beyond the unknowns a point set needs before it is fitted alone.
pub const MARGIN: usize = 3;

/// The candidate point sets for a mode, narrowest first, with a label for sources.
fn scopes<'a>(
    points: &'a [&'a Point],
    family: Family,
    precision: Precision,
) -> Vec<(String, Vec<&'a Point>)> {
    let fam: Vec<&Point> = points
        .iter()
        .copied()
        .filter(|p| p.family() == family)
        .collect();
    let exact: Vec<&Point> = fam
        .iter()
        .copied()
        .filter(|p| p.precision() == precision)
        .collect();
    let width: Vec<&Point> = fam
        .iter()
        .copied()
        .filter(|p| p.precision().compute_bytes() == precision.compute_bytes())
        .collect();
    let bits = if precision.compute_bytes() == 4 {
        "32-bit"
    } else {
        "16-bit"
    };
    vec![
        (format!("{}/{}", family.as_str(), precision), exact),
        (
            format!("pooled {} {bits} precisions", family.as_str()),
            width,
        ),
        (format!("pooled all {} precisions", family.as_str()), fam),
    ]
}

/// The literature prior of a fit, with PyTorch's lifetimes (`grad_overlap` 1: activations
/// freed layer by layer as gradients arrive) for either backend: the candle harness frees each
/// block's saved tensors after the block's backward as PyTorch does (the fit with these
/// lifetimes scored 5.3 % held-out MAPE on the CPU grid against 6.5 % with none, 2026-12-02).
/// With the literature's measured PyTorch blocks; [`per_feature`] gives the form without them.
pub fn literature_mode(family: Family, precision: Precision) -> ModeCoeffs {
    Coefficients::literature_ref().mode(family, precision)
}

/// `lit` without its measured blocks: every transformer's saved bytes from the per-feature
/// coefficients c_h, c_f, c_att and c_logits, which the fit then determines.
fn per_feature(lit: &ModeCoeffs) -> ModeCoeffs {
    let mut m = lit.clone();
    m.activation.blocks.clear();
    m.activation.cpu_blocks.clear();
    m
}

/// `lit` with its CPU-measured blocks ([`crate::coeffs::ActivationCoeffs::cpu_blocks`]) as
/// its blocks, or None where it has none.
fn with_cpu_blocks(lit: &ModeCoeffs) -> Option<ModeCoeffs> {
    if lit.activation.cpu_blocks.is_empty() {
        return None;
    }
    let mut m = lit.clone();
    m.activation.blocks = std::mem::take(&mut m.activation.cpu_blocks);
    Some(m)
}

/// `lit` with its CUDA blocks only (the form a fitted table keeps).
fn with_cuda_blocks(lit: &ModeCoeffs) -> ModeCoeffs {
    let mut m = lit.clone();
    m.activation.cpu_blocks.clear();
    m
}

/// Whether every point was measured on a CPU (where PyTorch keeps the CPU blocks' bytes).
fn on_cpu(points: &[&Point]) -> bool {
    !points.is_empty() && points.iter().all(|p| p.row.device_kind == "cpu")
}

/// Fits `points` in each form the prior offers and keeps the one the data supports best by the
/// Bayesian information criterion: per-feature coefficients for every transformer's saved
/// bytes; the prior's measured blocks held known (only the terms they do not cover fitted); and
/// on a CPU, the blocks as PyTorch keeps them there. The blocks describe PyTorch's kernels on
/// the device class they were measured for (CUDA's autocast op lists, 1-byte dropout masks).
/// Exact saved bytes need not fit a peak best: on the CPU grid (two-layer models) the peak sits
/// in the last block's backward, after its feed-forward's saved tensors and residual dropout
/// masks are freed, so the CPU blocks' every-mask-live count fitted worse than the CUDA blocks
/// with a fitted `c_dropout` (2026-12-02). Returns the fit with the prior it used.
fn fit_either(points: &[&Point], lit: &ModeCoeffs) -> anyhow::Result<(memfit::MemFit, ModeCoeffs)> {
    let bare = per_feature(lit);
    let mut best = (memfit::fit(points, &bare)?, bare);
    let mut priors = Vec::new();
    if !lit.activation.blocks.is_empty() {
        priors.push(with_cuda_blocks(lit));
    }
    // on a CPU, also the blocks as PyTorch keeps them there
    priors.extend(with_cpu_blocks(lit).filter(|_| on_cpu(points)));
    for prior in priors {
        let f = memfit::fit(points, &prior)?;
        if let (Some(a), Some(b)) = (f.bic(), best.0.bic()) {
            if a <= b {
                best = (f, prior);
            }
        }
    }
    Ok(best)
}

/// Writes a memory fit's values and sources into a mode.
fn apply(mode: &mut ModeCoeffs, f: &memfit::MemFit, label: &str, meta: &Meta) {
    for (k, col) in COLS.iter().enumerate() {
        let coef = col.coef_mut(mode);
        let lit_source = coef.source.clone();
        *coef = match f.origin[k] {
            Origin::Fitted => Coef::new(f.values[k], format!("fitted on {} points ({label}), {}, {}", f.n, meta.device_id, meta.date)),
            Origin::Absent => Coef::new(f.values[k], format!("literature (feature absent from the fitted data): {lit_source}")),
            Origin::ByBlock => Coef::new(f.values[k], format!("literature, unused for the fitted models: their measured blocks replace it: {lit_source}")),
            Origin::Unidentifiable => Coef::new(
                f.values[k],
                format!("literature (not identifiable: collinear with other features in the fitted data): {lit_source}"),
            ),
        };
    }
}

fn record(diag: &mut serde_json::Map<String, serde_json::Value>, label: &str, f: &memfit::MemFit) {
    diag.insert("memory_scope".into(), json!(label));
    diag.insert(
        "relative_standard_error".into(),
        json!(COLS
            .iter()
            .zip(f.rel_se)
            .filter_map(|(c, se)| Some((c.name(), se?)))
            .collect::<std::collections::BTreeMap<_, _>>()),
    );
    diag.insert("memory_points".into(), json!(f.n));
    diag.insert(
        "unidentifiable".into(),
        json!(COLS
            .iter()
            .zip(f.origin)
            .filter(|(_, o)| *o == Origin::Unidentifiable)
            .map(|(c, _)| c.name())
            .collect::<Vec<_>>()),
    );
}

/// Fits one mode; returns it with its diagnostics.
pub fn fit_mode(
    points: &[&Point],
    family: Family,
    precision: Precision,
    meta: &Meta,
) -> anyhow::Result<(ModeCoeffs, serde_json::Value)> {
    let lit = literature_mode(family, precision);
    let mut mode = per_feature(&lit);
    let scopes = scopes(points, family, precision);
    let mut diag = serde_json::Map::new();
    let enough =
        |pts: &[&Point]| !pts.is_empty() && pts.len() >= memfit::present(pts).len() + MARGIN;
    let exact = &scopes[0].1;
    let (fam_label, fam_pts) = &scopes[2];
    if let Some((i, (label, pts))) = scopes[..2]
        .iter()
        .enumerate()
        .find(|(_, (_, pts))| enough(pts))
    {
        // Enough points of this precision (or compute width) for every unknown. Measured
        // blocks are per precision: only this precision's own points may be fitted with them.
        let (f, prior) = if i == 0 {
            fit_either(pts, &lit)?
        } else {
            (memfit::fit(pts, &mode)?, mode.clone())
        };
        if !lit.activation.blocks.is_empty() {
            let cpu = !prior.activation.blocks.is_empty()
                && prior.activation.blocks == lit.activation.cpu_blocks;
            diag.insert(
                "memory_form".into(),
                json!(if prior.activation.blocks.is_empty() {
                    "per-feature coefficients"
                } else if cpu {
                    "blocks measured on a CPU known, the other terms fitted"
                } else {
                    "measured blocks known, the other terms fitted"
                }),
            );
        }
        mode = prior;
        apply(&mut mode, &f, label, meta);
        record(&mut diag, label, &f);
    } else if exact.len() >= 2 && enough(fam_pts) && fam_pts.len() > exact.len() {
        // Few points of its own: the pooled family fit's shape, scaled on this precision.
        // precisions pooled: no one precision's measured blocks describe them all
        let pooled = memfit::fit(fam_pts, &mode)?;
        let mut prior = mode.clone();
        apply(&mut prior, &pooled, fam_label, meta);
        // each of this precision's points in the regime the pooled fit assigned it
        let regimes: Vec<memfit::Regime> = exact
            .iter()
            .map(|e| {
                let i = fam_pts
                    .iter()
                    .position(|p| std::ptr::eq(*p, *e))
                    .expect("the family scope holds the precision's points");
                pooled.regimes[i]
            })
            .collect();
        let (f, alpha) = scaled::fit(exact, &regimes, &prior)?;
        let own = format!("{} {} points", exact.len(), precision);
        for (k, col) in COLS.iter().enumerate() {
            let prior_coef = col.coef_mut(&mut prior).clone();
            let source = match col {
                memfit::Col::Frag | memfit::Col::Const if f.origin[k] == Origin::Fitted => {
                    format!(
                        "fitted on {own} around the pooled fit, {}, {}",
                        meta.device_id, meta.date
                    )
                }
                memfit::Col::Frag | memfit::Col::Const | memfit::Col::HalfCopy => {
                    format!("from the pooled fit: {}", prior_coef.source)
                }
                _ if prior_coef.source.starts_with("fitted") => {
                    format!(
                        "pooled fit ({}) x alpha = {alpha:.4} fitted on {own}, {}, {}",
                        fam_label, meta.device_id, meta.date
                    )
                }
                _ => prior_coef.source.clone(),
            };
            *col.coef_mut(&mut mode) = Coef::new(f.values[k], source);
        }
        diag.insert(
            "memory_scope".into(),
            json!(format!("{fam_label}, activations scaled on {own}")),
        );
        diag.insert("activation_scale_alpha".into(), json!(alpha));
        diag.insert("memory_points".into(), json!(exact.len()));
    } else if fam_pts.len() >= 2 {
        // The widest scope, giving up the least important columns (to literature).
        let f = memfit::fit(fam_pts, &mode)?;
        apply(&mut mode, &f, fam_label, meta);
        record(&mut diag, fam_label, &f);
    } else {
        diag.insert("memory_scope".into(), json!("literature (too few points)"));
    }
    let time_scope = scopes.iter().find(|(_, pts)| {
        pts.iter()
            .filter(|p| !p.ckpt() && p.step_s.is_some())
            .count()
            >= 6
    });
    if let Some((label, pts)) = time_scope {
        if let Some(t) = timefit::fit(pts)? {
            let src = format!(
                "fitted on {} non-checkpointed points ({label}), {}, {}",
                t.n, meta.device_id, meta.date
            );
            mode.time.flops_per_s = Coef::new(t.flops_per_s, src.clone());
            // per-feature traffic replaces the aggregate activation bandwidth
            mode.time.act_bytes_per_s = Coef::new(0.0, format!("replaced by s_per_elem, {src}"));
            mode.time.s_per_elem = t
                .s_per_elem
                .iter()
                .map(|(n, v)| (n.to_string(), Coef::new(*v, src.clone())))
                .collect();
            mode.time.state_bytes_per_s = Coef::new(t.state_bytes_per_s, src.clone());
            mode.time.t0_s = Coef::new(t.t0_s, src);
            if let Some((r, pairs)) = t.recompute {
                // Recomputation cannot make a step faster: a ratio outside [1, 3] is timing noise
                // (tiny steps, a shared machine), clamped to the nearest physical value and said so.
                let clamped = r.clamp(1.0, 3.0);
                let note = if clamped == r {
                    String::new()
                } else {
                    format!("; measured {r:.3}, outside the physical 1..=3, clamped")
                };
                mode.time.recompute_factor = Coef::new(
                    clamped,
                    format!("median ratio of the recomputed parts (checkpointed over plain step, optimizer pass and t0 removed) over {pairs} matched pairs ({label}), {}, {}{note}", meta.device_id, meta.date),
                );
            }
            diag.insert("time_scope".into(), json!(label));
        }
    }
    // In-sample residuals of this mode's own points, scored through the planner.
    let own: Vec<&Point> = points
        .iter()
        .copied()
        .filter(|p| p.family() == family && p.precision() == precision)
        .collect();
    let mut table = Coefficients::literature();
    table.modes = vec![mode.clone()];
    let mem_err: Vec<f64> = own
        .iter()
        .map(|p| {
            100.0 * (breakdown(&p.terms, &p.model, &p.train, &table).total as f64 - p.peak) / p.peak
        })
        .collect();
    let time_err: Vec<f64> = own
        .iter()
        .filter_map(|p| Some(100.0 * (timefit::predict(p, &mode)? - p.step_s?) / p.step_s?))
        .collect();
    diag.insert(
        "in_sample_memory".into(),
        json!(super::metrics::Metrics::from_errors(&mem_err)),
    );
    diag.insert(
        "in_sample_time".into(),
        json!(super::metrics::Metrics::from_errors(&time_err)),
    );
    Ok((mode, serde_json::Value::Object(diag)))
}

/// Fits a full table on `points`; modes for every (family, precision) present.
pub fn fit_table(points: &[&Point], meta: &Meta) -> anyhow::Result<Coefficients> {
    let modes: BTreeSet<(Family, Precision)> =
        points.iter().map(|p| (p.family(), p.precision())).collect();
    let mut table = Coefficients {
        schema: 1,
        device_id: meta.device_id.clone(),
        device_name: meta.device_name.clone(),
        backend: meta.backend.clone(),
        driver: meta.driver.clone(),
        date: meta.date.clone(),
        vramcal_version: env!("CARGO_PKG_VERSION").to_string(),
        points: points.len() as u64,
        note: "Fitted by `vramcal fit` from real training-step measurements; modes absent here fall back to the literature table.".into(),
        modes: Vec::new(),
        // not fitted yet: a CPU table has none, a GPU table falls back to the literature's
        runtime: None,
        residuals: None,
    };
    let mut residuals = serde_json::Map::new();
    for (family, precision) in modes {
        let (mode, diag) = fit_mode(points, family, precision, meta)?;
        residuals.insert(format!("{}/{}", family.as_str(), precision), diag);
        table.modes.push(mode);
    }
    for (mode, diag) in super::transfer::borrowed(points, &table.modes, meta)? {
        residuals.insert(format!("{}/{}", mode.family.as_str(), mode.precision), diag);
        table.modes.push(mode);
    }
    table.residuals = Some(serde_json::Value::Object(residuals));
    Ok(table)
}
