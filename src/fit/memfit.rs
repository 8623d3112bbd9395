//! The memory regression. The planner's model is
//! `peak = (1 + frag) * (weights + optimizer + live) + const`, where `live` is the largest of
//! three regimes (`plan::memory::PeakAt`: at the saved activations, at the gradients, at the
//! optimizer step), each linear in its parts (`LiveParts::shares`). Within a point's regime:
//! `peak = (1 + frag) * (certain + known + half_copy*H + sum_i c_i*x_i) + const`, `certain` the
//! exact byte counts resident there (weights, optimizer states, the regime's share of the
//! gradients: [`certain_bytes`]), `known` the bytes no coefficient scales ([`known_bytes`]).
//!
//! Parametrisation (linear, non-negative, and with `1 + frag >= 1` built in): the exact counts
//! move to the left side with coefficient 1:
//! `peak - base = frag*base + sum_i k_i*x_i + const`, with `k = (1 + frag)*c` and `base` the
//! certain, known and held (not fitted) bytes. NNLS then enforces `frag >= 0`, `k >= 0`,
//! `const >= 0`, and the planner's coefficients are recovered as `c = k / (1 + frag)`.
//!
//! A feature that is zero in every point (no CNN in the data, no checkpointing) or that this data
//! cannot tell apart from the others (e.g. the 2P half copy is exactly 1/8 of AdamW's 16P fixed
//! states) keeps its literature value; its contribution is subtracted from the target first.

use super::nnls;
use super::points::Point;
use crate::coeffs::{ActivationCoeffs, Coefficients, ModeCoeffs};
use crate::plan::memory::{overlap, tied_gradient_bytes, LiveParts, PeakAt};
use nalgebra::{DMatrix, DVector};

/// Where a point's peak sits, as the memory fit assigns it ([`fit`] returns one per point; the
/// points themselves are never changed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regime {
    /// where the peak sits above the weights and optimizer states: in backward at the saved
    /// activations, at the end of backward at the gradients (only where the prior's
    /// `grad_overlap` frees activations as gradients arrive), or at the optimizer step
    pub at: PeakAt,
    /// the head's backward, not a block's (recompute and) backward, holds the peak (see
    /// `plan::memory::Features::head_phase`)
    pub head_phase: bool,
}

/// One unknown of the memory regression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Frag,
    HalfCopy,
    H,
    F,
    Att,
    Dropout,
    Logits,
    Ckpt,
    Conv,
    Norm,
    Act,
    Pool,
    Input,
    Workspace,
    Gathered,
    MaxParam,
    Const,
}

pub const COLS: [Col; 17] = [
    Col::Frag,
    Col::HalfCopy,
    Col::H,
    Col::F,
    Col::Att,
    Col::Dropout,
    Col::Logits,
    Col::Ckpt,
    Col::Conv,
    Col::Norm,
    Col::Act,
    Col::Pool,
    Col::Input,
    Col::Workspace,
    Col::Gathered,
    Col::MaxParam,
    Col::Const,
];

/// Which column to give up first when the data cannot separate several: the ones the data
/// usually varies least (the half copy, checkpoint retention) before the core terms.
const DROP_ORDER: [Col; 17] = [
    Col::HalfCopy,
    Col::Dropout,
    Col::Gathered,
    Col::MaxParam,
    Col::Ckpt,
    Col::Workspace,
    Col::Pool,
    Col::Norm,
    Col::Act,
    Col::Input,
    Col::Logits,
    Col::Att,
    Col::F,
    Col::Conv,
    Col::H,
    Col::Frag,
    Col::Const,
];

impl Col {
    pub fn name(self) -> &'static str {
        match self {
            Col::Frag => "frag",
            Col::HalfCopy => "half_copy",
            Col::H => "c_h",
            Col::F => "c_f",
            Col::Att => "c_att",
            Col::Dropout => "c_dropout",
            Col::Logits => "c_logits",
            Col::Ckpt => "c_ckpt",
            Col::Conv => "c_conv",
            Col::Norm => "c_norm",
            Col::Act => "c_act",
            Col::Pool => "c_pool",
            Col::Input => "c_input",
            Col::Workspace => "c_workspace",
            Col::Gathered => "c_gathered",
            Col::MaxParam => "c_max_param",
            Col::Const => "const_bytes",
        }
    }

    /// The regressor of this column for one point in regime `r`, with the prior's measured
    /// blocks `a`: a point whose block `a` has measured keeps those bytes known
    /// ([`known_bytes`]), so the per-feature block columns are zero for it.
    pub fn value(self, p: &Point, r: Regime, a: &ActivationCoeffs) -> f64 {
        let f = &p.terms.features;
        if self.replaced_by_block() && f.measured(a).is_some() {
            return 0.0;
        }
        // a family planned from PyTorch's measured table (T5, BART, DeBERTa, latent attention)
        // keeps all its saved bytes known, dropout's included
        if (self.replaced_by_block() || self == Col::Dropout) && f.measured_saved.is_some() {
            return 0.0;
        }
        // Regime (see `fit`): each part of the live bytes counts with its share where the peak
        // sits (the planner's `LiveParts::shares`): at the optimizer step the activations are
        // gone and the largest tensor's transients count; at the activations it is the other
        // way round; at the gradients (PyTorch's overlap) the freed activations' share is gone.
        let [act, _, _, half, step] = LiveParts::shares(r.at, overlap(&p.terms, a));
        let scale = match self {
            Col::MaxParam => step,
            Col::HalfCopy => half,
            Col::Frag | Col::Const => 1.0,
            _ => act,
        };
        if scale == 0.0 {
            return 0.0;
        }
        // Only the phase (head or blocks) holding the peak contributes; without checkpointing
        // every block's saved bytes are in both.
        let head = r.head_phase;
        if (f.phased && head && self.is_block()) || (!head && self == Col::Logits) {
            return 0.0;
        }
        scale
            * match self {
                Col::Frag => certain_bytes(p, r, a),
                Col::HalfCopy => p.terms.states.half_copy,
                Col::H => f.bsh,
                Col::F => f.bsf,
                Col::Att => f.bas2,
                Col::Dropout => f.dropout_elems,
                Col::Logits => f.bsv,
                Col::Ckpt => f.ckpt_bsh,
                Col::Conv => f.conv,
                Col::Norm => f.norm,
                Col::Act => f.act,
                Col::Pool => f.pool,
                Col::Input => f.input,
                Col::Workspace if head => f.ws_head,
                Col::Workspace => f.ws_block,
                Col::Gathered => f.gathered,
                Col::MaxParam => f.max_param,
                Col::Const => 1.0,
            }
    }

    /// The per-feature terms a measured block replaces (`plan::memory::Features::saved_bytes`);
    /// `c_dropout` stays, as the dropout bytes a device keeps beyond the block's.
    fn replaced_by_block(self) -> bool {
        matches!(self, Col::H | Col::F | Col::Att | Col::Logits)
    }

    /// Saved activations of the live blocks (the block phase of a checkpointed step).
    fn is_block(self) -> bool {
        matches!(self, Col::H | Col::F | Col::Att | Col::Dropout)
    }

    /// The coefficient in the planner's units from a mode table.
    pub fn get(self, m: &ModeCoeffs) -> f64 {
        let a = &m.activation;
        match self {
            Col::Frag => m.overhead.frag.value,
            Col::HalfCopy => a.half_copy.value,
            Col::H => a.c_h.value,
            Col::F => a.c_f.value,
            Col::Att => a.c_att.value,
            Col::Dropout => a.c_dropout.value,
            Col::Logits => a.c_logits.value,
            Col::Ckpt => a.c_ckpt.value,
            Col::Conv => a.c_conv.value,
            Col::Norm => a.c_norm.value,
            Col::Act => a.c_act.value,
            Col::Pool => a.c_pool.value,
            Col::Input => a.c_input.value,
            Col::Workspace => a.c_workspace.value,
            Col::Gathered => a.c_gathered.value,
            Col::MaxParam => a.c_max_param.value,
            Col::Const => m.overhead.const_bytes.value,
        }
    }

    /// Mutable access to the coefficient with its source.
    pub fn coef_mut(self, m: &mut ModeCoeffs) -> &mut crate::coeffs::Coef {
        let a = &mut m.activation;
        match self {
            Col::Frag => &mut m.overhead.frag,
            Col::HalfCopy => &mut a.half_copy,
            Col::H => &mut a.c_h,
            Col::F => &mut a.c_f,
            Col::Att => &mut a.c_att,
            Col::Dropout => &mut a.c_dropout,
            Col::Logits => &mut a.c_logits,
            Col::Ckpt => &mut a.c_ckpt,
            Col::Conv => &mut a.c_conv,
            Col::Norm => &mut a.c_norm,
            Col::Act => &mut a.c_act,
            Col::Pool => &mut a.c_pool,
            Col::Input => &mut a.c_input,
            Col::Workspace => &mut a.c_workspace,
            Col::Gathered => &mut a.c_gathered,
            Col::MaxParam => &mut a.c_max_param,
            Col::Const => &mut m.overhead.const_bytes,
        }
    }

    /// Whether (1 + frag) multiplies this term in the planner (everything but const and frag).
    fn scaled_by_frag(self) -> bool {
        !matches!(self, Col::Frag | Col::Const)
    }
}

/// Bytes of a point that no coefficient scales, in regime `r` (before 1 + frag), each part in
/// the regime's share: the optimizer step's group-wide update temporaries; LoRA adapters' saved
/// bytes (both phases of a checkpointed step); where the prior `a` has a measured block for the
/// point, everything that block saves (head, live blocks, once-per-model tensors) with the
/// departures it is planned with (`plan::departures`); otherwise the head's known bytes
/// (soft-capped logits, a head transform) and the blocks' known bytes: the fused attention
/// kernel's saved output and log-sum-exp, sdpa's CPU math path's fp32 q, k and v, the MoE
/// blocks' routed-expert bytes, an encoder-decoder's cross-attention, the departures' bytes and
/// the activation function's bytes beyond exact GELU's or SiLU's (a block's, so none in a
/// checkpointed step's head phase). The planner counts
/// the same bytes (`Features::activation_bytes`, `Features::step_transient_bytes`).
pub fn known_bytes(p: &Point, r: Regime, a: &ActivationCoeffs) -> f64 {
    let [act, _, _, _, step] = LiveParts::shares(r.at, overlap(&p.terms, a));
    step * p.terms.features.group_update_bytes + act * known_activation_bytes(p, r, a)
}

/// The activation bytes of [`known_bytes`], whatever the regime's share of them.
fn known_activation_bytes(p: &Point, r: Regime, a: &ActivationCoeffs) -> f64 {
    let f = &p.terms.features;
    // held in both phases of a checkpointed step (`Features::activation_bytes`' common part)
    let common = f.adapter_bytes;
    let (once, head, block) =
        f.measured_bytes(a)
            .unwrap_or((0.0, f.head_known_bytes, f.per_feature_known_bytes(a)));
    common
        + once
        + match (f.phased, r.head_phase) {
            (false, true) => head + block,
            (false, false) => block,
            (true, true) => head,
            (true, false) => block,
        }
}

/// Bytes of a point in regime `r` that are exact counts and certainly resident, so the fit
/// moves them to the left side with coefficient 1 (and they are what `frag` multiplies besides
/// the fitted terms): the weights and optimizer states, and the gradients (with a tied
/// embedding's two extra ones) in the regime's share.
pub fn certain_bytes(p: &Point, r: Regime, a: &ActivationCoeffs) -> f64 {
    let s = &p.terms.states;
    let [_, grads, tied, _, _] = LiveParts::shares(r.at, overlap(&p.terms, a));
    s.weights + s.optimizer + grads * s.gradients + tied * tied_gradient_bytes(&p.terms)
}

/// Where a coefficient's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Fitted,
    /// the feature is zero in every point
    Absent,
    /// collinear with other features in this data
    Unidentifiable,
    /// a per-feature block term no point uses: the prior's measured blocks cover every
    /// transformer in the data
    ByBlock,
}

#[derive(Debug, Clone)]
pub struct MemFit {
    /// coefficient per column of [`COLS`], in the planner's units
    pub values: [f64; COLS.len()],
    pub origin: [Origin; COLS.len()],
    /// relative standard error of each fitted coefficient (from the weighted residual variance
    /// and `(A'W'WA)^-1`); large values mean the data barely determines the coefficient
    pub rel_se: [Option<f64>; COLS.len()],
    pub n: usize,
    /// the regime of each fitted point (in the order given), as the fit assigned it
    pub regimes: Vec<Regime>,
    /// sum of the squared relative errors of the fitted points under the fit (what it
    /// minimises); None for a fit that only scales another
    pub rel_sse: Option<f64>,
}

impl MemFit {
    /// Bayesian information criterion of the fit on its own points, `n ln(SSE/n) + k ln n` with
    /// `k` the fitted coefficients: lower is better, and a form with fewer free coefficients
    /// wins unless the extra ones buy enough fit (None without an error sum).
    pub fn bic(&self) -> Option<f64> {
        let n = self.n as f64;
        let k = self.origin.iter().filter(|o| **o == Origin::Fitted).count() as f64;
        Some(n * (self.rel_sse? / n).max(1e-300).ln() + k * n.ln())
    }
}

/// Relative standard errors of a weighted least-squares solution `x` (None where x = 0 or the
/// problem has no residual degrees of freedom).
fn relative_se(
    a: &DMatrix<f64>,
    y: &DVector<f64>,
    w: &[f64],
    x: &DVector<f64>,
) -> Vec<Option<f64>> {
    let (m, n) = a.shape();
    let mut aw = a.clone();
    let mut r = a * x - y;
    for i in 0..m {
        aw.row_mut(i).scale_mut(w[i]);
        r[i] *= w[i];
    }
    if m <= n {
        return vec![None; n];
    }
    let sigma2 = r.norm_squared() / (m - n) as f64;
    // Unit-norm columns first: A'A of the raw columns spans ~30 orders of magnitude.
    let norms: Vec<f64> = (0..n).map(|j| aw.column(j).norm().max(1e-300)).collect();
    for (j, nj) in norms.iter().enumerate() {
        aw.column_mut(j).unscale_mut(*nj);
    }
    let Ok(inv) = (aw.transpose() * &aw).pseudo_inverse(1e-12) else {
        return vec![None; n];
    };
    (0..n)
        .map(|j| {
            (x[j] != 0.0).then(|| (sigma2 * inv[(j, j)]).max(0.0).sqrt() / (x[j] * norms[j]).abs())
        })
        .collect()
}

/// Columns with a non-zero regressor somewhere in `points`, every point in backward (its block
/// phase when checkpointed) and no measured block known: the most unknowns the data's features
/// can call for.
pub fn present(points: &[&Point]) -> Vec<Col> {
    let mut bare = Coefficients::literature_ref().modes[0].activation.clone();
    bare.blocks.clear();
    present_in(points, &vec![Regime::default(); points.len()], &bare)
}

/// Columns with a non-zero regressor somewhere in `points`, each in its regime.
fn present_in(points: &[&Point], regimes: &[Regime], a: &ActivationCoeffs) -> Vec<Col> {
    COLS.iter()
        .copied()
        .filter(|c| {
            points
                .iter()
                .zip(regimes)
                .any(|(p, r)| c.value(p, *r, a) != 0.0)
        })
        .collect()
}

fn design(
    points: &[&Point],
    regimes: &[Regime],
    cols: &[Col],
    a: &ActivationCoeffs,
) -> DMatrix<f64> {
    DMatrix::from_fn(points.len(), cols.len(), |i, j| {
        cols[j].value(points[i], regimes[i], a)
    })
}

/// Each point's regime under a mode's coefficients (where its planner peak sits).
pub fn regimes_under(points: &[&Point], mode: &ModeCoeffs) -> Vec<Regime> {
    let mut values = [0.0; COLS.len()];
    for (k, c) in COLS.iter().enumerate() {
        values[k] = c.get(mode);
    }
    let eval = Eval::new(&values, &mode.activation);
    points.iter().map(|p| eval.regime(p)).collect()
}

/// Drops columns until the weighted, normalised design has full column rank; returns the kept
/// and the dropped ones.
fn identifiable(
    points: &[&Point],
    regimes: &[Regime],
    mut cols: Vec<Col>,
    w: &[f64],
    a: &ActivationCoeffs,
) -> (Vec<Col>, Vec<Col>) {
    let mut dropped = Vec::new();
    while !cols.is_empty() {
        if points.len() < cols.len() + 1 {
            // fewer equations than unknowns (+1 residual degree of freedom): give up the
            // lowest-priority column
            let c = *DROP_ORDER
                .iter()
                .find(|c| cols.contains(c))
                .expect("non-empty");
            cols.retain(|x| *x != c);
            dropped.push(c);
            continue;
        }
        let (sv, vt) = nnls::scaled_singular(&design(points, regimes, &cols, a), Some(w));
        let (imin, smin) =
            sv.iter().enumerate().fold(
                (0, f64::INFINITY),
                |a, (i, &s)| if s < a.1 { (i, s) } else { a },
            );
        let smax = sv.max();
        if smax > 0.0 && smin / smax > 1e-7 {
            break;
        }
        // The null direction: drop the first column (in drop order) that takes part in it.
        let v = vt.row(imin);
        let vmax = v.amax();
        let c = *DROP_ORDER
            .iter()
            .find(|c| {
                cols.iter()
                    .position(|x| x == *c)
                    .is_some_and(|j| v[j].abs() > 0.2 * vmax)
            })
            .expect("null vector has a component");
        cols.retain(|x| *x != c);
        dropped.push(c);
    }
    (cols, dropped)
}

/// Fits the memory model `peak = (1 + frag) * (weights + optimizer + max over the regimes of the
/// live bytes) + const` on `points`; `lit` supplies the values of columns the data cannot
/// determine, the measured blocks held known and the lifetimes (`grad_overlap`).
///
/// The maximum makes the model piecewise linear: each point's peak is at its activations, at its
/// gradients (with PyTorch's overlap) or at the optimizer step. For a scanned `c_max_param`, regimes and the linear coefficients are
/// fitted alternately (assign each point to its larger term, refit, until stable); the scan keeps
/// the value with the least relative squared error. Small models peak at the optimizer step,
/// large ones in backward; a sum of both terms over-predicts whichever regime is not active.
pub fn fit(points: &[&Point], lit: &ModeCoeffs) -> anyhow::Result<MemFit> {
    let has_param = points.iter().any(|p| p.terms.features.max_param > 0.0);
    let sse = |f: &MemFit| -> f64 {
        let eval = Eval::new(&f.values, &lit.activation);
        points
            .iter()
            .map(|p| ((eval.predict(p) - p.peak) / p.peak).powi(2))
            .sum()
    };
    // 0 = the activation regime only; then 0.5 .. 128 bytes per element of the largest tensor.
    let scan: Vec<f64> = if has_param {
        std::iter::once(0.0)
            .chain((0..=32).map(|i| 0.5 * 2f64.powf(i as f64 * 0.25)))
            .collect()
    } else {
        vec![0.0]
    };
    // Fits the linear part for one `c_max_param`, regimes and coefficients alternately, from a
    // starting assignment of the regimes (None: every point in backward, its block phase).
    type Regimes = Vec<Regime>;
    let alternate = |k: f64, start: Option<&Regimes>| -> anyhow::Result<(f64, MemFit, Regimes)> {
        let mut fixed = lit.clone();
        fixed.activation.c_max_param.value = k;
        let mut regimes: Regimes = match start {
            Some(r) => r.clone(),
            None => vec![Regime::default(); points.len()],
        };
        let mut f = fit_linear(points, &regimes, &fixed, false)?;
        for _ in 0..20 {
            let eval = Eval::new(&f.values, &lit.activation);
            let next: Regimes = points.iter().map(|p| eval.regime(p)).collect();
            let changed = next != regimes;
            regimes = next;
            if !changed {
                break;
            }
            f = fit_linear(points, &regimes, &fixed, false)?;
        }
        Ok((sse(&f), f, regimes))
    };
    // Alternation finds a local optimum of the assignment, so it runs from several starts and
    // keeps the best: every point in backward; each point in the regime the literature
    // coefficients (with this `c_max_param`) put it in; and, when given, the neighbouring scan
    // value's converged assignment (the scan moves in small steps, so regimes change little).
    let mut lit_values = [0.0; COLS.len()];
    for (k, c) in COLS.iter().enumerate() {
        lit_values[k] = c.get(lit);
    }
    let fit_at = |k: f64, warm: Option<&Regimes>| -> anyhow::Result<(f64, MemFit, Regimes)> {
        let mut values = lit_values;
        values[COLS
            .iter()
            .position(|c| *c == Col::MaxParam)
            .expect("column")] = k;
        let eval = Eval::new(&values, &lit.activation);
        let literature_start: Regimes = points.iter().map(|p| eval.regime(p)).collect();
        let mut best = alternate(k, None)?;
        for start in std::iter::once(&literature_start).chain(warm) {
            let run = alternate(k, Some(start))?;
            if run.0 < best.0 {
                best = run;
            }
        }
        Ok(best)
    };
    let mut best: Option<(f64, f64, MemFit, Regimes)> = None;
    let mut previous: Option<Regimes> = None;
    for k in scan {
        let (e, f, r) = fit_at(k, previous.as_ref())?;
        previous = Some(r.clone());
        if best.as_ref().is_none_or(|b| e < b.0) {
            best = Some((e, k, f, r));
        }
    }
    // Refine around the best grid value by golden-section search on the error.
    if let Some((k0, warm)) = best.as_ref().map(|b| (b.1, b.3.clone())) {
        if k0 > 0.0 {
            let (mut lo, mut hi) = (k0 / 2f64.powf(0.25), k0 * 2f64.powf(0.25));
            let g = (5f64.sqrt() - 1.0) / 2.0;
            for _ in 0..40 {
                let (a, b) = (hi - g * (hi - lo), lo + g * (hi - lo));
                let (ea, eb) = (fit_at(a, Some(&warm))?.0, fit_at(b, Some(&warm))?.0);
                if ea < eb {
                    hi = b;
                } else {
                    lo = a;
                }
            }
            let k = 0.5 * (lo + hi);
            let (e, f, r) = fit_at(k, Some(&warm))?;
            if best.as_ref().is_none_or(|b| e < b.0) {
                best = Some((e, k, f, r));
            }
        }
    }
    let (best_sse, k_best, mut f, regimes) = best.expect("the scan has at least one value");
    // Polish: with the regimes found, c_max_param is one more linear unknown (its column is
    // non-zero on the optimizer-step points only); refitting it jointly removes the scan's
    // finite resolution. Kept only if it lowers the error and leaves the regimes as they were.
    if k_best > 0.0 {
        let mut start = lit.clone();
        start.activation.c_max_param.value = k_best;
        let joint = fit_linear(points, &regimes, &start, true)?;
        let eval = Eval::new(&joint.values, &lit.activation);
        let stable = points
            .iter()
            .zip(&regimes)
            .all(|(p, r)| eval.regime(p) == *r);
        if stable && sse(&joint) < best_sse {
            f = joint;
        }
    }
    let k = COLS
        .iter()
        .position(|c| *c == Col::MaxParam)
        .expect("column");
    if f.values[k] > 0.0 {
        f.origin[k] = Origin::Fitted;
    }
    f.regimes = regimes;
    f.rel_sse = Some(sse(&f));
    Ok(f)
}

/// Fitted values in the planner's form, built once to evaluate many points: the planner's own
/// `Features::activation_bytes`, so fit and planner cannot drift apart.
struct Eval<'a> {
    values: &'a [f64; COLS.len()],
    activation: crate::coeffs::ActivationCoeffs,
}

impl<'a> Eval<'a> {
    /// `values` in the planner's form, with the measured blocks (and their activation
    /// functions' bytes) of the fit's prior `prior`.
    fn new(values: &'a [f64; COLS.len()], prior: &ActivationCoeffs) -> Self {
        let mut m = Coefficients::literature_ref().modes[0].clone();
        m.activation.blocks = prior.blocks.clone();
        m.activation.act_fns = prior.act_fns.clone();
        m.activation.grad_overlap = prior.grad_overlap.clone();
        for (k, c) in COLS.iter().enumerate() {
            c.coef_mut(&mut m).value = values[k];
        }
        Self {
            values,
            activation: m.activation,
        }
    }

    fn value(&self, c: Col) -> f64 {
        self.values[COLS.iter().position(|x| *x == c).expect("column")]
    }

    /// The parts of a point's live bytes, before (1 + frag): the planner's own
    /// (`LiveParts::of`, so an sdpa point's fused attention bytes are in them).
    fn parts(&self, p: &Point) -> LiveParts {
        LiveParts::of(&p.terms, &self.activation)
    }

    /// The point's regimes under these values: where the peak sits (the largest of the
    /// planner's three), and, for a checkpointed point, whether in the head's phase rather
    /// than a block's.
    fn regime(&self, p: &Point) -> Regime {
        let f = &p.terms.features;
        let head = f.head_phase(&self.activation);
        Regime {
            at: self.parts(p).peak(overlap(&p.terms, &self.activation)).0,
            head_phase: head,
        }
    }

    /// The planner's peak for a point (kept in step with `plan::memory`).
    fn predict(&self, p: &Point) -> f64 {
        let s = &p.terms.states;
        let live = self.parts(p).peak(overlap(&p.terms, &self.activation)).1;
        (1.0 + self.value(Col::Frag)) * (s.weights + s.optimizer + live) + self.value(Col::Const)
    }
}

/// The smallest physical value of a fitted coefficient on `points`: a transformer's backward
/// holds at least the gradient of its largest per-sample tensor (the scores, or the FFN's
/// activation) in the compute dtype, so `c_workspace` is at least the compute dtype's size.
/// Without the floor the fit can set it to 0 (outside checkpointing the one-layer workspace is
/// nearly collinear with the stored scores), which under-plans checkpointed steps, where one
/// recomputed layer's workspace dominates. 0 for every other column and for CNNs (oneDNN's and
/// cuDNN's convolutions keep no unfolded input).
fn floor(c: Col, points: &[&Point]) -> f64 {
    if c != Col::Workspace
        || points
            .iter()
            .any(|p| p.family() != crate::spec::Family::Transformer)
    {
        return 0.0;
    }
    points
        .iter()
        .map(|p| p.precision().compute_bytes() as f64)
        .fold(f64::INFINITY, f64::min)
}

/// One linear fit with the points in `regimes`. `fit_max_param` false keeps `c_max_param` at
/// `lit`'s value (the scan in [`fit`] chooses it).
fn fit_linear(
    points: &[&Point],
    regimes: &[Regime],
    lit: &ModeCoeffs,
    fit_max_param: bool,
) -> anyhow::Result<MemFit> {
    anyhow::ensure!(!points.is_empty(), "memory fit: no points");
    let w: Vec<f64> = points.iter().map(|p| 1.0 / p.peak).collect();
    let prior = &lit.activation;
    let mut present = present_in(points, regimes, prior);
    if !fit_max_param {
        present.retain(|c| *c != Col::MaxParam);
    }
    // The 16-bit weight copy is 2 bytes/param, a fixed fraction of the states (1/8 with AdamW):
    // fitted, it trades off against frag and chases noise (values above 1 are unphysical), so it
    // keeps the literature residency.
    present.retain(|c| *c != Col::HalfCopy);
    let (cols, dropped) = identifiable(points, regimes, present.clone(), &w, prior);
    let mut values = [0.0; COLS.len()];
    let mut origin = [Origin::Absent; COLS.len()];
    for (k, c) in COLS.iter().enumerate() {
        values[k] = c.get(lit);
        if cols.contains(c) {
            origin[k] = Origin::Fitted;
        } else if dropped.contains(c) {
            origin[k] = Origin::Unidentifiable;
        } else if c.replaced_by_block()
            && points
                .iter()
                .any(|p| p.terms.features.measured(prior).is_some())
        {
            origin[k] = Origin::ByBlock;
        }
    }
    // The model is `peak = (1 + frag)·(certain + known + Σ_held c·x + Σ_fitted c·x) + const`,
    // "held" the coefficients kept at the prior's values. With k = (1 + frag)·c for the fitted
    // ones it is linear: `peak − (certain + known + Σ_held c·x) − const_held = frag·(certain +
    // known + Σ_held c·x) + Σ k·x [+ const]`, solved once. (Known bytes, a measured block's
    // whole saved bytes, can exceed the states several times on small models: iterating frag
    // from a guess would not converge there.)
    let frag_j = cols.iter().position(|c| *c == Col::Frag);
    let held_const = if cols.contains(&Col::Const) {
        0.0
    } else {
        Col::Const.get(lit)
    };
    // Lower bounds of fitted coefficients (their floors join the held bytes, the fit finds the
    // excess): see [`floor`].
    let floors: Vec<(usize, f64)> = cols
        .iter()
        .map(|c| COLS.iter().position(|x| x == c).expect("known column"))
        .map(|k| (k, floor(COLS[k], points)))
        .filter(|(_, f)| *f > 0.0)
        .collect();
    // certain + known + Σ_held c·x (+ the floors) per point: the bytes (1 + frag) multiplies
    // besides the fitted terms
    let scaled_base: Vec<f64> = points
        .iter()
        .zip(regimes)
        .map(|(p, r)| {
            let r = *r;
            let held: f64 = COLS
                .iter()
                .enumerate()
                .filter(|(k, c)| origin[*k] != Origin::Fitted && c.scaled_by_frag())
                .map(|(k, c)| values[k] * c.value(p, r, prior))
                .sum();
            let floored: f64 = floors
                .iter()
                .map(|(k, f)| f * COLS[*k].value(p, r, prior))
                .sum();
            certain_bytes(p, r, prior) + known_bytes(p, r, prior) + held + floored
        })
        .collect();
    let mut a = design(points, regimes, &cols, prior);
    if let Some(j) = frag_j {
        for (i, base) in scaled_base.iter().enumerate() {
            a[(i, j)] = *base;
        }
    }
    let held_frag = if frag_j.is_some() { 0.0 } else { values[0] };
    let y = DVector::from_iterator(
        points.len(),
        points
            .iter()
            .zip(&scaled_base)
            .map(|(p, base)| p.peak - (1.0 + held_frag) * base - held_const),
    );
    let sol = nnls::fit(&a, &y, Some(&w))?;
    let mut rel_se = [None; COLS.len()];
    for (j, se) in relative_se(&a, &y, &w, &sol.x).into_iter().enumerate() {
        rel_se[COLS
            .iter()
            .position(|x| *x == cols[j])
            .expect("known column")] = se;
    }
    let frag = frag_j.map_or(values[0], |j| sol.x[j]);
    for (j, c) in cols.iter().enumerate() {
        let k = COLS.iter().position(|x| x == c).expect("known column");
        values[k] = if c.scaled_by_frag() {
            sol.x[j] / (1.0 + frag)
        } else {
            sol.x[j]
        };
    }
    values[0] = frag;
    for (k, f) in &floors {
        values[*k] += f;
    }
    Ok(MemFit {
        values,
        origin,
        rel_se,
        n: points.len(),
        regimes: regimes.to_vec(),
        rel_sse: None,
    })
}
