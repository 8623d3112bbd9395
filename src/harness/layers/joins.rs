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
//! Forward values are computed with tensor ops on detached inputs and handed over to the node (the
//! pattern of `flash`), so one function serves CPU and CUDA.

use super::fused::{Heads, LinearOp};
use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType,
    Layout, Result, Shape, Storage, Tensor, D,
};
use std::sync::{Arc, Mutex};

/// A value computed outside the node, taken once by the node's forward.
struct Handed(Mutex<Option<Tensor>>);

impl Handed {
    fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }
    fn take(&self) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned hand-over".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("hand-over forward ran twice".into()))
    }
    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.give(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }
    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.give(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }
    fn give<S: BackendStorage>(&self, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            None => candle_core::bail!("hand-over: value on another device than the inputs"),
        }
    }
}

macro_rules! handed_fwd {
    ($($arg:ident),*) => {
        fn cpu_fwd(&self, $($arg: &CpuStorage, _: &Layout),*) -> Result<(CpuStorage, Shape)> {
            $(let _ = $arg;)*
            self.out.cpu()
        }
        fn cuda_fwd(&self, $($arg: &CudaStorage, _: &Layout),*) -> Result<(CudaStorage, Shape)> {
            $(let _ = $arg;)*
            self.out.cuda()
        }
    };
}

/// Where a [`linear_residual`] node leaves the residual's gradient.
pub type Stash = Arc<Mutex<Option<Tensor>>>;

/// Takes the gradient a [`linear_residual`] node stashed (None when its backward did not run).
pub fn take_stash(s: &Stash) -> Option<Tensor> {
    s.lock().ok().and_then(|mut g| g.take())
}

struct ResidLinearOp {
    lin: LinearOp,
    out: Handed,
    stash: Stash,
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
        if let Ok(mut s) = self.stash.lock() {
            *s = Some(match s.take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
        self.lin.grads(x, w, has_b, res, g)
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

/// `resid + linear(x)` (`merge`: `x` is attention heads `[b, a, s, d]`), keeping only the linear's
/// inputs; the residual's gradient goes to `stash`. `resid` must be a leaf (the block input Var).
pub fn linear_residual(
    resid: &Tensor,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    merge: Option<Heads>,
    stash: &Stash,
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
        (y + resid.detach())?
    };
    let shape = out.shape().clone();
    let op = ResidLinearOp {
        lin,
        out: Handed::new(out.flatten_to(D::Minus2)?.contiguous()?),
        stash: stash.clone(),
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

fn zero_scalar(like: &Tensor) -> Result<Handed> {
    Ok(Handed::new(Tensor::zeros((), DType::F32, like.device())?))
}

/// A scalar whose gradient reaches `t` as exactly `g` (backward root for a term of a sum).
pub fn seed(t: &Tensor, g: &Tensor) -> Result<Tensor> {
    t.apply_op1(SeedOp {
        g: g.clone(),
        out: zero_scalar(t)?,
    })
}

struct SeedLinearOp {
    g: Tensor,
    out: Handed,
}

impl SeedLinearOp {
    fn grads(&self, x: &Tensor, w: &Tensor, has_b: bool) -> Result<[Option<Tensor>; 3]> {
        let g = self.g.reshape(((), w.dim(0)?))?;
        LinearOp::default().grads(x, w, has_b, &g, &g)
    }
}

impl CustomOp2 for SeedLinearOp {
    fn name(&self) -> &'static str {
        "grad-seed-linear"
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

impl CustomOp3 for SeedLinearOp {
    fn name(&self) -> &'static str {
        "grad-seed-linear-bias"
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

/// A scalar whose backward is that of `linear(x, w, b)` receiving the output gradient `g`.
pub fn seed_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: &Tensor) -> Result<Tensor> {
    let op = SeedLinearOp {
        g: g.clone(),
        out: zero_scalar(x)?,
    };
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op3(w, b, op),
        None => x.apply_op2(w, op),
    }
}

/// Rows of the logit gradient computed at a time (the temporaries are `rows x vocab`).
const LOSS_ROWS: usize = 256;

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
        // row block into one buffer
        let g_logits = Tensor::zeros((n, v), x.dtype(), x.device())?;
        for r0 in (0..n).step_by(LOSS_ROWS) {
            let r = LOSS_ROWS.min(n - r0);
            let gl = g_logp.narrow(0, r0, r)?;
            let sum = gl.sum_keepdim(D::Minus1)?;
            let part = (&gl - logp.narrow(0, r0, r)?.exp()?.broadcast_mul(&sum)?)?;
            g_logits.slice_set(&part.to_dtype(x.dtype())?, 0, r0)?;
        }
        drop((logp, g_logp));
        let gx = g_logits.matmul(&w)?;
        let gw = g_logits.t()?.matmul(&x)?;
        Ok((Some(gx), Some(gw)))
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
