//! Graph nodes that let a transformer block's residual joins and the LM loss hold what PyTorch
//! holds, although a candle graph node keeps every one of its inputs alive:
//!
//! - [`linear_residual`]: `resid + linear(x)` as one node over the linear's inputs only. The
//!   residual (the block's input Var) is read detached and its gradient, `g` itself, is stashed
//!   for the trainer to add to the Var's gradient, so the linear's output is never a kept node
//!   (PyTorch's residual add saves nothing).
//! - [`seed`] / [`seed_linear`]: the root of a block's backward when the block output is held only
//!   as the next block's input Var: they inject the output gradient `g` into the terms of the
//!   output sum (`x2 + linear(m)`), so neither the output nor the last linear's product is kept.
//! - [`lm_loss`]: LM head and mean cross-entropy as one node keeping the head's input and the fp32
//!   log-probabilities (not the logits), whose backward materialises the NLL gradient and the
//!   logit gradient as PyTorch's `nll_loss` and `log_softmax` backward do, then frees the
//!   log-probabilities before the head's matmuls.
//!
//! Forward values are computed with tensor ops on detached inputs and handed over to the node
//! ([`super::handed`]), so one function serves CPU and CUDA.

use super::fused::{Heads, LinearOp};
use super::handed::{handed_fwd, Handed};
use super::params::MaskSite;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    D,
};
use std::sync::{Arc, Mutex};

/// Where a [`linear_residual`] node leaves the residual's gradient.
pub type Stash = Arc<Mutex<Option<Tensor>>>;

/// Takes the gradient a [`linear_residual`] node stashed (None when its backward did not run).
pub fn take_stash(s: &Stash) -> Option<Tensor> {
    s.lock().ok().and_then(|mut g| g.take())
}

/// Adds a residual join's gradient `g` into `s` (a block's joins may stash into one).
pub(crate) fn stash_add(s: &Stash, g: &Tensor) -> Result<()> {
    if let Ok(mut s) = s.lock() {
        *s = Some(match s.take() {
            Some(a) => (a + g)?,
            None => g.clone(),
        });
    }
    Ok(())
}

struct ResidLinearOp {
    lin: LinearOp,
    out: Handed,
    stash: Stash,
    drop: Dropped,
}

/// The dropout a join applies to its linear's output: the keep mask, held until the join's
/// backward (PyTorch's dropout keeps only its mask), and the `1 / (1 - p)` scale of a u8 mask.
#[derive(Default)]
pub(crate) struct Dropped(Mutex<Option<(Tensor, f64)>>);

impl Dropped {
    pub(crate) fn new(drop: Option<(&Tensor, f32)>) -> Self {
        Self(Mutex::new(
            drop.map(|(m, p)| (m.clone(), 1.0 / (1.0 - p as f64))),
        ))
    }
    /// `g` through the dropout (the mask is released).
    pub(crate) fn grad(&self, g: &Tensor) -> Result<Tensor> {
        match self.0.lock().ok().and_then(|mut d| d.take()) {
            Some((mask, scale)) => super::fused::dropout_grad(g, &mask, scale),
            None => Ok(g.clone()),
        }
    }
}

impl ResidLinearOp {
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_b: bool,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        stash_add(&self.stash, g)?;
        // the residual may be the fp32 stream while the linear runs in 16 bits (autocast)
        let g = self.drop.grad(&g.to_dtype(x.dtype())?)?;
        self.lin.grads(x, w, has_b, res, &g)
    }
}

impl CustomOp2 for ResidLinearOp {
    fn name(&self) -> &'static str {
        "linear-residual"
    }
    handed_fwd!(a, b);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, _] = self.grads(x, w, false, res, g)?;
        Ok((gx, gw))
    }
}

impl CustomOp3 for ResidLinearOp {
    fn name(&self) -> &'static str {
        "linear-bias-residual"
    }
    handed_fwd!(a, b, c);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok(self.grads(x, w, true, res, g)?.into())
    }
}

/// `resid + dropout(linear(x))` (`merge`: `x` is attention heads `[b, a, s, d]`; `drop`: the keep
/// mask of [`Ctx::dropout_mask`](super::params::Ctx::dropout_mask) and p), keeping only the
/// linear's inputs and the mask; the residual's gradient goes to `stash`. `resid` must be a leaf
/// (the block input Var).
pub fn linear_residual(
    resid: &Tensor,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    merge: Option<Heads>,
    stash: &Stash,
    drop: Option<(&Tensor, f32)>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let lin = LinearOp { split: None, merge };
    let out = {
        let y = match merge {
            Some(h) => super::fused::linear_merge_heads(
                &x.detach(),
                &w.detach(),
                b.map(|b| b.detach()).as_ref(),
                h,
            )?,
            None => super::fused::linear(&x.detach(), &w.detach(), b.map(|b| b.detach()).as_ref())?,
        };
        let y = match drop {
            Some((mask, p)) => super::fused::dropout(&y, mask, p)?,
            None => y,
        };
        (y.to_dtype(resid.dtype())? + resid.detach())?
    };
    let shape = out.shape().clone();
    let op = ResidLinearOp {
        lin,
        out: Handed::new(out.flatten_to(D::Minus2)?.contiguous()?),
        stash: stash.clone(),
        drop: Dropped::new(drop),
    };
    let y = match b {
        Some(b) => x.apply_op3(w, b, op)?,
        None => x.apply_op2(w, op)?,
    };
    y.reshape(shape)
}

/// A zero scalar whose backward hands `g` to its input.
struct SeedOp {
    g: Tensor,
    out: Handed,
}

impl CustomOp1 for SeedOp {
    fn name(&self) -> &'static str {
        "grad-seed"
    }
    handed_fwd!(a);
    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.g.clone()))
    }
}

pub(super) fn zero_scalar(like: &Tensor) -> Result<Handed> {
    Ok(Handed::new(Tensor::zeros((), DType::F32, like.device())?))
}

/// A scalar whose gradient reaches `t` as exactly `g` (backward root for a term of a sum).
pub fn seed(t: &Tensor, g: &Tensor) -> Result<Tensor> {
    t.apply_op1(SeedOp {
        g: g.clone(),
        out: zero_scalar(t)?,
    })
}

/// The two graph-node impls of a backward-root op over `(x, w)` or `(x, w, bias)` whose
/// forward is a handed-over zero scalar and whose backward is `self.grads(x, w, has_bias)`.
macro_rules! seed_op {
    ($op:ty, $name2:literal, $name3:literal) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name2
            }
            handed_fwd!(a, b);
            fn bwd(
                &self,
                x: &Tensor,
                w: &Tensor,
                _: &Tensor,
                _: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                let [gx, gw, _] = self.grads(x, w, false)?;
                Ok((gx, gw))
            }
        }

        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name3
            }
            handed_fwd!(a, b, c);
            fn bwd(
                &self,
                x: &Tensor,
                w: &Tensor,
                _: &Tensor,
                _: &Tensor,
                _: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                Ok(self.grads(x, w, true)?.into())
            }
        }
    };
}

struct SeedLinearOp {
    g: Tensor,
    out: Handed,
    merge: Option<Heads>,
}

impl SeedLinearOp {
    fn grads(&self, x: &Tensor, w: &Tensor, has_b: bool) -> Result<[Option<Tensor>; 3]> {
        let g = self.g.reshape(((), w.dim(0)?))?;
        let lin = LinearOp {
            split: None,
            merge: self.merge,
        };
        lin.grads(x, w, has_b, &g, &g)
    }
}

seed_op!(SeedLinearOp, "grad-seed-linear", "grad-seed-linear-bias");

/// A scalar whose backward is that of `dropout(linear(x, w, b))` receiving the output gradient
/// `g` (`drop`: keep mask and p; `merge`: `x` is attention heads; both as [`linear_residual`]).
pub fn seed_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: &Tensor,
    drop: Option<(&Tensor, f32)>,
    merge: Option<Heads>,
) -> Result<Tensor> {
    let g = output_grad(g, x.dtype(), drop)?;
    let op = SeedLinearOp {
        g,
        out: zero_scalar(x)?,
        merge,
    };
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3(w, b, op),
        None => x.apply_op2(w, op),
    }
}

/// `y` through the term's dropout (keep mask and p), if any.
pub(super) fn dropped(y: Tensor, drop: Option<&(Tensor, f32)>) -> Result<Tensor> {
    match drop {
        Some((mask, p)) => super::fused::dropout(&y, mask, *p),
        None => Ok(y),
    }
}

/// The output gradient `g` in `dtype`, back through the term's dropout, if any.
pub(super) fn output_grad(
    g: &Tensor,
    dtype: DType,
    drop: Option<(&Tensor, f32)>,
) -> Result<Tensor> {
    let g = g.to_dtype(dtype)?;
    match drop {
        Some((mask, p)) => super::fused::dropout_grad(&g, mask, 1.0 / (1.0 - p as f64)),
        None => Ok(g),
    }
}

/// `dropout(linear(act(h)))`, a term of a block's output sum (the feed-forward's activation
/// and last linear), never a kept node: the graph keeps `h` (the activation's saved input) and
/// this holds `act(h)` (the linear's saved input) from [`Self::value`] until its root's backward
/// has computed the weight gradient, then frees it before the activation's backward, as
/// PyTorch frees a node's saved tensors once its backward has run. (A graph node `act(h)` would
/// stay alive until the whole segment's backward ends.)
pub struct ActLinear {
    h: Tensor,
    act: super::fused::Act,
    w: Tensor,
    b: Option<Tensor>,
    drop: Option<(Tensor, f32)>,
    a: Arc<Mutex<Option<Tensor>>>,
}

impl ActLinear {
    pub fn new(
        h: Tensor,
        act: super::fused::Act,
        w: Tensor,
        b: Option<Tensor>,
        drop: Option<(Tensor, f32)>,
    ) -> Self {
        Self {
            h,
            act,
            w,
            b,
            drop,
            a: Arc::default(),
        }
    }

    /// The dtype of the term's value (the activation's input's).
    pub fn dtype(&self) -> DType {
        self.h.dtype()
    }

    /// The output, outside the graph; keeps `act(h)` for the backward.
    pub fn value(&self) -> Result<Tensor> {
        let a = super::fused::activation(&self.h.detach(), self.act)?;
        let y = super::fused::linear(
            &a,
            &self.w.detach(),
            self.b.as_ref().map(|b| b.detach()).as_ref(),
        )?;
        if let Ok(mut kept) = self.a.lock() {
            *kept = kept_for_weight(&self.w, a);
        }
        dropped(y, self.drop.as_ref())
    }

    /// The backward root for the output gradient `g`.
    pub fn root(&self, g: &Tensor) -> Result<Tensor> {
        let drop = self.drop.as_ref().map(|(m, p)| (m, *p));
        let g = output_grad(g, self.h.dtype(), drop)?;
        let op = SeedActLinearOp {
            g,
            a: self.a.clone(),
            act: self.act,
            out: zero_scalar(&self.h)?,
        };
        let h = self.h.contiguous()?;
        match &self.b {
            Some(b) => h.apply_op3(&self.w, b, op),
            None => h.apply_op2(&self.w, op),
        }
    }
}

struct SeedActLinearOp {
    g: Tensor,
    a: Arc<Mutex<Option<Tensor>>>,
    act: super::fused::Act,
    out: Handed,
}

impl SeedActLinearOp {
    fn grads(&self, h: &Tensor, w: &Tensor, has_b: bool) -> Result<[Option<Tensor>; 3]> {
        act_linear_grads(h, w, has_b, &self.g, &self.a, self.act)
    }
}

/// The last linear's input, kept for its weight gradient only: PyTorch saves a linear's input
/// only when its weight needs a gradient (a frozen last linear, LoRA elsewhere, saves none).
fn kept_for_weight(w: &Tensor, input: Tensor) -> Option<Tensor> {
    w.track_op().then_some(input)
}

/// The last linear's weight gradient `g2ᵀ · input` (`input` `[.., f]`) when `need_w`: from the
/// kept input, else the one `recompute` rebuilds. The input is freed on return.
fn last_weight_grad(
    need_w: bool,
    g2: &Tensor,
    kept: Option<Tensor>,
    f: usize,
    recompute: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if !need_w {
        return Ok(None);
    }
    let input = match kept {
        Some(a) => a,
        None => recompute()?,
    };
    Ok(Some(g2.t()?.matmul(&input.reshape(((), f))?)?))
}

/// Gradients of h, the weight and the bias of `linear(act(h))` receiving `g`; `act(h)`, the
/// linear's saved input, is taken from `kept` (recomputed if absent) and freed once the weight
/// gradient has used it, before the activation's backward. A frozen weight needs neither.
fn act_linear_grads(
    h: &Tensor,
    w: &Tensor,
    has_b: bool,
    g: &Tensor,
    kept: &Mutex<Option<Tensor>>,
    act: super::fused::Act,
) -> Result<[Option<Tensor>; 3]> {
    let (need_h, need_w) = (h.track_op(), w.track_op());
    let (h, w) = (h.detach(), w.detach());
    let (o, f) = w.dims2()?;
    let g2 = g.reshape(((), o))?;
    let kept = kept.lock().ok().and_then(|mut a| a.take());
    let gw = last_weight_grad(need_w, &g2, kept, f, || super::fused::activation(&h, act))?;
    let gb = (has_b && need_w).then(|| g2.sum(0)).transpose()?;
    let gh = if need_h {
        let ga = g2.matmul(&w)?.reshape(h.shape())?;
        Some(super::fused::activation_grad(&ga, &h, act)?)
    } else {
        None
    };
    Ok([gh, gw, gb])
}

/// `dropout(linear(silu(gate) · up))`, a SwiGLU feed-forward's gate, product and last linear
/// as a term of a block's output sum: the graph keeps the two projections' outputs (what
/// PyTorch's SiLU and product save); this holds `silu(gate)` and the product (what the product
/// and the last linear save) outside the graph and frees each once its backward has used it, as
/// PyTorch does. (Graph nodes would live until the segment's backward ends.)
pub struct SwiGluLinear {
    gate: Tensor,
    up: Tensor,
    w: Tensor,
    drop: Option<(Tensor, f32)>,
    kept: SwiGluKept,
}

/// `silu(gate)`, and the product when the last linear's weight gradient needs it, from the
/// forward until the backward takes them.
type SwiGluKept = Arc<Mutex<Option<(Tensor, Option<Tensor>)>>>;

impl SwiGluLinear {
    /// `gate`, `up`: the two projections' outputs (graph tensors); `w`: the last linear's
    /// weight (SwiGLU blocks have no biases).
    pub fn new(gate: Tensor, up: Tensor, w: Tensor, drop: Option<(Tensor, f32)>) -> Self {
        Self {
            gate,
            up,
            w,
            drop,
            kept: Arc::default(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.gate.dtype()
    }

    /// The output, outside the graph; keeps `silu(gate)` and the product for the backward.
    pub fn value(&self) -> Result<Tensor> {
        let s = super::fused::activation(&self.gate.detach(), super::fused::Act::Silu)?;
        let a = (&s * &self.up.detach())?;
        let y = super::fused::linear(&a, &self.w.detach(), None)?;
        if let Ok(mut kept) = self.kept.lock() {
            *kept = Some((s, kept_for_weight(&self.w, a)));
        }
        dropped(y, self.drop.as_ref())
    }

    /// The backward root for the output gradient `g`.
    pub fn root(&self, g: &Tensor) -> Result<Tensor> {
        let drop = self.drop.as_ref().map(|(m, p)| (m, *p));
        let g = output_grad(g, self.gate.dtype(), drop)?;
        let op = SeedSwiGluOp {
            g,
            kept: self.kept.clone(),
            out: zero_scalar(&self.gate)?,
        };
        self.gate
            .contiguous()?
            .apply_op3(&self.up.contiguous()?, &self.w, op)
    }
}

struct SeedSwiGluOp {
    g: Tensor,
    kept: SwiGluKept,
    out: Handed,
}

impl CustomOp3 for SeedSwiGluOp {
    fn name(&self) -> &'static str {
        "grad-seed-swiglu-linear"
    }
    handed_fwd!(a, b, c);
    /// In PyTorch's order: the last linear (then its input, the product, is freed), the product
    /// (then `silu(gate)` is freed), the SiLU.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_w = w.track_op();
        let (gate, up, w) = (gate.detach(), up.detach(), w.detach());
        let (o, f) = w.dims2()?;
        let g2 = self.g.reshape(((), o))?;
        let (s, a) = match self.kept.lock().ok().and_then(|mut k| k.take()) {
            Some(kept) => kept,
            None => (
                super::fused::activation(&gate, super::fused::Act::Silu)?,
                None,
            ),
        };
        let gw = last_weight_grad(need_w, &g2, a, f, || &s * &up)?;
        let (g_gate, g_up) = swiglu_input_grads(&g2, &w, gate, up, s)?;
        Ok((Some(g_gate), Some(g_up), gw))
    }
}

/// The gradients of a SwiGLU feed-forward's gate and up outputs from `g2`, the last linear's
/// output gradient `[n, o]` (`w` its weight `[o, f]`), in PyTorch's order: the last linear's
/// input gradient, the product's, then SiLU's; each saved tensor (`silu(gate)` as `s`) is
/// freed once used.
pub(super) fn swiglu_input_grads(
    g2: &Tensor,
    w: &Tensor,
    gate: Tensor,
    up: Tensor,
    s: Tensor,
) -> Result<(Tensor, Tensor)> {
    let ga = g2.matmul(w)?.reshape(up.shape())?;
    let g_up = (&ga * &s)?;
    let g_s = (&ga * &up)?;
    drop((ga, s, up));
    let g_gate = super::fused::activation_grad(&g_s, &gate, super::fused::Act::Silu)?;
    Ok((g_gate, g_up))
}

struct ResidActLinearOp {
    act: super::fused::Act,
    a: Mutex<Option<Tensor>>,
    out: Handed,
    stash: Stash,
    drop: Dropped,
}

impl ResidActLinearOp {
    fn grads(
        &self,
        h: &Tensor,
        w: &Tensor,
        has_b: bool,
        g: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        stash_add(&self.stash, g)?;
        let g = self.drop.grad(&g.to_dtype(h.dtype())?)?;
        act_linear_grads(h, w, has_b, &g, &self.a, self.act)
    }
}

impl CustomOp2 for ResidActLinearOp {
    fn name(&self) -> &'static str {
        "activation-linear-residual"
    }
    handed_fwd!(a, b);
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [gh, gw, _] = self.grads(h, w, false, g)?;
        Ok((gh, gw))
    }
}

impl CustomOp3 for ResidActLinearOp {
    fn name(&self) -> &'static str {
        "activation-linear-bias-residual"
    }
    handed_fwd!(a, b, c);
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok(self.grads(h, w, true, g)?.into())
    }
}

/// `resid + dropout(linear(act(h)))` as [`linear_residual`] (the residual's gradient goes to
/// `stash`), keeping `h` in the graph and `act(h)`, the linear's saved input, only until the
/// node's backward has computed the weight gradient ([`ActLinear`]).
pub fn act_linear_residual(
    resid: &Tensor,
    h: &Tensor,
    act: super::fused::Act,
    w: &Tensor,
    b: Option<&Tensor>,
    stash: &Stash,
    drop: Option<(&Tensor, f32)>,
) -> Result<Tensor> {
    let h = h.contiguous()?;
    let a = super::fused::activation(&h.detach(), act)?;
    let out = {
        let y = super::fused::linear(&a, &w.detach(), b.map(|b| b.detach()).as_ref())?;
        let y = match drop {
            Some((mask, p)) => super::fused::dropout(&y, mask, p)?,
            None => y,
        };
        (y.to_dtype(resid.dtype())? + resid.detach())?
    };
    let shape = out.shape().clone();
    let op = ResidActLinearOp {
        act,
        a: Mutex::new(kept_for_weight(w, a)),
        out: Handed::new(out.flatten_to(D::Minus2)?.contiguous()?),
        stash: stash.clone(),
        drop: Dropped::new(drop),
    };
    let y = match b {
        Some(b) => h.apply_op3(w, b, op)?,
        None => h.apply_op2(w, op)?,
    };
    y.reshape(shape)
}

seed_op!(
    SeedActLinearOp,
    "grad-seed-activation-linear",
    "grad-seed-activation-linear-bias"
);

/// Rows of the logit gradient computed at a time. PyTorch's fused log-softmax backward makes no
/// temporaries; these make four of `rows x vocab`, a few percent of the logit gradient itself at
/// any real token count.
const LOSS_ROWS: usize = 32;

struct LmLossOp {
    out: Handed,
    logp: Mutex<Option<Tensor>>,
    targets: Tensor,
}

impl CustomOp2 for LmLossOp {
    fn name(&self) -> &'static str {
        "lm-head-cross-entropy"
    }
    handed_fwd!(a, b);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let logp = self
            .logp
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned log-probabilities".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("lm loss backward ran twice".into()))?;
        let (n, v) = logp.dims2()?;
        let need_w = w.track_op();
        let (x, w) = (x.detach(), w.detach());
        // nll_loss backward: a dense [n, v] gradient, -g/n at each target
        let scale = (g.to_dtype(DType::F32)? * (-1.0 / n as f64))?;
        let g_logp = Tensor::zeros((n, v), DType::F32, logp.device())?;
        g_logp.scatter_add_set(
            &self.targets.reshape((n, 1))?,
            &scale.reshape((1, 1))?.broadcast_as((n, 1))?.contiguous()?,
            1,
        )?;
        // log_softmax backward: g_logits = g_logp - exp(logp) * rowsum(g_logp), row block by
        // row block into one fp32 buffer (the loss ran in fp32), then, under autocast, cast to
        // the logits' 16-bit dtype once the fp32 loss tensors are freed, as PyTorch's
        // ToCopyBackward of `logits.float()` does (measured: a tiny Llama's fp16 head backward
        // holds fp32 log-probabilities, NLL gradient and logit gradient at once)
        let g_logits = Tensor::zeros((n, v), DType::F32, x.device())?;
        for r0 in (0..n).step_by(LOSS_ROWS) {
            let r = LOSS_ROWS.min(n - r0);
            let gl = g_logp.narrow(0, r0, r)?;
            let sum = gl.sum_keepdim(D::Minus1)?;
            let part = (&gl - logp.narrow(0, r0, r)?.exp()?.broadcast_mul(&sum)?)?;
            g_logits.slice_set(&part, 0, r0)?;
        }
        drop((logp, g_logp));
        // a new binding would keep the fp32 gradient alive through the matmuls below
        let g_logits = {
            let g32 = g_logits;
            g32.to_dtype(x.dtype())?
        };
        let gx = g_logits.matmul(&w)?;
        // a frozen head (LoRA) has no weight gradient
        let gw = need_w.then(|| g_logits.t()?.matmul(&x)).transpose()?;
        Ok((Some(gx), gw))
    }
}

/// Mean cross-entropy of `x @ w^T` (`x: [n, h]`, `w: [vocab, h]`) against `targets: [n]` (u32),
/// with fp32 log-probabilities (autocast computes the loss in fp32).
pub fn lm_loss(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (logp, loss) = {
        let logits = x.detach().matmul(&w.detach().t()?)?;
        let logp = super::fused::log_softmax(&logits)?;
        drop(logits);
        let loss = candle_nn::loss::nll(&logp, targets)?;
        (logp, loss)
    };
    let op = LmLossOp {
        out: Handed::new(loss.to_dtype(DType::F32)?.reshape(())?),
        logp: Mutex::new(Some(logp)),
        targets: targets.clone(),
    };
    x.apply_op2(w, op)
}

/// Score rows (over batch, heads and queries together) of the softmax gradient computed at a
/// time. PyTorch's fused softmax backward makes no temporaries; these make four of `rows x s`,
/// a small fraction of the score-sized gradient itself.
const SOFTMAX_ROWS: usize = 64;

struct EagerAttnOp {
    out: Handed,
    /// What PyTorch's composed attention keeps ([`kept`]): the softmax output first, then the
    /// dropped probabilities and the keep mask (dropout), or the 16-bit probabilities the matmul
    /// with V reads (an fp32 softmax without dropout). Empty under selective recomputation.
    kept: Mutex<Vec<Tensor>>,
    f32_softmax: bool,
    scale: f64,
    drop_scale: f64,
    /// Selective recomputation: causal or not, and the dropout site whose mask backward
    /// regenerates.
    recompute: Option<(bool, MaskSite)>,
}

impl EagerAttnOp {
    /// What `kept` held, recomputed from q and k (selective checkpointing), with the mask
    /// regenerated from its site.
    fn recomputed(&self, q: &Tensor, k: &Tensor) -> Result<Vec<Tensor>> {
        let Some((causal, site)) = &self.recompute else {
            return Err(candle_core::Error::Msg(
                "eager attention backward ran twice".into(),
            ));
        };
        let (p, p32) = probabilities(q, k, self.scale, *causal, self.f32_softmax)?;
        let mask = site.mask()?;
        let drop = mask.as_ref().map(|m| (m, site.p));
        Ok(kept(p, p32, drop)?.1)
    }
}

impl CustomOp3 for EagerAttnOp {
    fn name(&self) -> &'static str {
        "eager-attention"
    }
    handed_fwd!(a, b, c);
    /// As PyTorch's autograd runs the composed attention: `P_d @ V` backward (dP_d = dO Vᵀ,
    /// dV = P_dᵀ dO, then P_d is released), dropout backward (dP = dP_d ∘ mask, then the mask
    /// is released), softmax backward into one score-sized gradient (computed in row tiles, as
    /// the fused CPU kernel needs no temporaries), then `Q Kᵀ` backward.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut kept = std::mem::take(
            &mut *self
                .kept
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned attention probabilities".into()))?,
        );
        if kept.is_empty() {
            kept = self.recomputed(q, k)?;
        }
        let mut kept = kept.into_iter();
        let p = kept
            .next()
            .ok_or_else(|| candle_core::Error::Msg("eager attention backward ran twice".into()))?;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let g = g.contiguous()?;
        let (gp, gv) = match (kept.next(), kept.next()) {
            (Some(pd), Some(mask)) => {
                let gpd = g.matmul(&v.t()?)?;
                let gv = pd.t()?.matmul(&g)?;
                drop(pd);
                let gp = super::fused::dropout_grad(&gpd, &mask, self.drop_scale)?;
                (gp, gv)
            }
            // an fp32 softmax's 16-bit copy, read by the matmul with V
            (Some(p16), None) => (g.matmul(&v.t()?)?, p16.t()?.matmul(&g)?),
            _ => (g.matmul(&v.t()?)?, p.t()?.matmul(&g)?),
        };
        // (no binding below shadows a tensor: a shadowed binding would hold its storage until
        // the function returns)
        // an fp32 softmax's backward runs in fp32, as autograd casts dP up to it
        let gp_soft = if gp.dtype() == p.dtype() {
            gp
        } else {
            let up = gp.to_dtype(p.dtype())?;
            drop(gp);
            up
        };
        // softmax backward (and the scale): dS = P ∘ (dP − rowsum(dP ∘ P)) · scale
        let shape = p.shape().clone();
        let s = p.dim(D::Minus1)?;
        let p_rows = p.contiguous()?.reshape(((), s))?;
        drop(p);
        let gp_rows = gp_soft.contiguous()?.reshape(((), s))?;
        drop(gp_soft);
        let rows = p_rows.dim(0)?;
        let gs_soft = gp_rows.zeros_like()?;
        for r0 in (0..rows).step_by(SOFTMAX_ROWS) {
            let t = SOFTMAX_ROWS.min(rows - r0);
            let (pt, gt) = (p_rows.narrow(0, r0, t)?, gp_rows.narrow(0, r0, t)?);
            let dot = (&gt * &pt)?.sum_keepdim(D::Minus1)?;
            let part = ((gt.broadcast_sub(&dot)? * &pt)? * self.scale)?;
            gs_soft.slice_set(&part, 0, r0)?;
        }
        drop((p_rows, gp_rows));
        let gs = gs_soft.reshape(shape)?.to_dtype(q.dtype())?;
        drop(gs_soft);
        let gq = gs.matmul(&k)?;
        let gk = gs.t()?.matmul(&q)?;
        Ok((Some(gq), Some(gk), Some(gv)))
    }
}

/// How eager attention makes its probabilities: `softmax(scale · q kᵀ [+ causal mask])`, with
/// `f32_softmax` in fp32 and cast back (kept in both dtypes, [`probabilities`]).
#[derive(Debug, Clone, Copy)]
pub struct Probs {
    pub scale: f64,
    pub causal: bool,
    pub f32_softmax: bool,
}

/// What PyTorch's composed attention keeps for backward, from the probabilities `p` (and their
/// fp32 source `p32`): the softmax output (`p32` when there is one), then with dropout the
/// dropped probabilities and the keep mask (dropout keeps only its mask, so an fp32 softmax's
/// 16-bit copy is not kept), without dropout and with `p32` the 16-bit copy the matmul with V
/// reads. Also returns that matmul's input.
fn kept(
    p: Tensor,
    p32: Option<Tensor>,
    dropout: Option<(&Tensor, f32)>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let first = p32.unwrap_or_else(|| p.clone());
    Ok(match dropout {
        Some((mask, pr)) => {
            let pd = super::fused::dropout(&p, mask, pr)?;
            drop(p);
            (pd.clone(), vec![first, pd, mask.clone()])
        }
        None if first.dtype() == p.dtype() => (p, vec![first]),
        None => (p.clone(), vec![first, p]),
    })
}

/// The probabilities in q's dtype, and with `f32_softmax` also the fp32 ones they were cast
/// from ([`super::fused::probs_value`]).
fn probabilities(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    causal: bool,
    f32_softmax: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (q, k) = (q.detach(), k.detach());
    if f32_softmax && q.dtype() != DType::F32 {
        let p32 = super::fused::probs_value(&q, &k, scale, causal, true)?;
        return Ok((p32.to_dtype(q.dtype())?, Some(p32)));
    }
    Ok((super::fused::attention_probs(&q, &k, scale, causal)?, None))
}

/// Eager attention `dropout(softmax(scale · q kᵀ [+ causal mask])) v` for `q, k, v: [b, a, s, d]`
/// as one node holding what PyTorch's composed eager attention holds: q, k, v, the
/// probabilities and, with dropout (`drop`: keep mask of
/// [`Ctx::dropout_mask`](super::params::Ctx::dropout_mask) and p), the mask and the dropped
/// probabilities. Its backward makes the score-sized gradients PyTorch's makes, and none of
/// candle's per-node gradient accumulation of score-sized tensors.
///
/// `recompute` (selective checkpointing): the dropout site of the probabilities; the node then
/// keeps only q, k and v and its backward recomputes the probabilities and regenerates the mask.
pub fn eager_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: Probs,
    drop: Option<(&Tensor, f32)>,
    recompute: Option<MaskSite>,
) -> Result<Tensor> {
    let Probs {
        scale,
        causal,
        f32_softmax,
    } = probs;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (p, p32) = probabilities(&q, &k, scale, causal, f32_softmax)?;
    let (read, kept) = kept(p, p32, drop)?;
    let out = read.matmul(&v.detach())?;
    std::mem::drop(read);
    let op = EagerAttnOp {
        out: Handed::new(out),
        kept: Mutex::new(if recompute.is_some() {
            Vec::new()
        } else {
            kept
        }),
        f32_softmax,
        scale,
        drop_scale: drop.map_or(1.0, |(_, p)| 1.0 / (1.0 - p as f64)),
        recompute: recompute.map(|site| (causal, site)),
    };
    q.apply_op3(&k, &v, op)
}
