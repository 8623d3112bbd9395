//! A SwiGLU feed-forward whose norm and projections are all frozen and unadapted (LoRA on the
//! attention only, or frozen blocks), with its norm, as one term of the block's output sum over
//! the segment input `x`.
//!
//! Why: PyTorch saves a linear's input only for its weight's gradient and transformers' RMSNorm
//! saves its normalised output only for its weight's, so for such a block autograd keeps
//! neither the norm's output nor the projections' input: only `x` (with the norm's statistics)
//! and what SiLU and the product save, gate's and up's outputs. A candle graph node keeps every
//! input it was given, so gate and up as graph nodes would keep the norm's output (b·s·h per
//! layer: measured 1.06-1.07x PyTorch's peak on attention-only LoRA steps of a tiny Llama).
//! Here the norm's output is computed outside the graph and freed once gate and up exist; the
//! backward rebuilds the norm's statistics from `x`, as PyTorch's norm backward reads its input.

use super::fused::{self, Act};
use super::handed::{handed_fwd, Handed};
use super::joins::{dropped, output_grad, swiglu_input_grads, zero_scalar};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The frozen norm in front of the feed-forward.
#[derive(Clone)]
pub struct FrozenNorm {
    pub gamma: Tensor,
    /// LayerNorm's bias; None for RMSNorm
    pub beta: Option<Tensor>,
    pub eps: f64,
}

/// Gate's and up's outputs and `silu(gate)`, from the forward until the backward takes them.
type Kept = Arc<Mutex<Option<(Tensor, Tensor, Tensor)>>>;

/// `dropout(down(silu(gate(norm(x))) · up(norm(x))))` with every weight frozen.
pub struct FrozenSwiGlu {
    x: Tensor,
    norm: FrozenNorm,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// the projections' dtype (the compute dtype under autocast)
    dtype: DType,
    drop: Option<(Tensor, f32)>,
    kept: Kept,
}

impl FrozenSwiGlu {
    /// `x`: the segment input (a graph leaf); `gate`, `up`, `down`: the frozen weights in the
    /// compute dtype `dtype`, PyTorch's `[out, in]` layout.
    pub fn new(
        x: Tensor,
        norm: FrozenNorm,
        (gate, up, down): (Tensor, Tensor, Tensor),
        dtype: DType,
        drop: Option<(Tensor, f32)>,
    ) -> Self {
        Self {
            x,
            norm,
            gate,
            up,
            down,
            dtype,
            drop,
            kept: Arc::default(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The output, outside the graph; keeps gate's and up's outputs and `silu(gate)`.
    pub fn value(&self) -> Result<Tensor> {
        let n = &self.norm;
        let normed = fused::norm(
            &self.x.detach(),
            &n.gamma.detach(),
            n.beta.as_ref().map(|b| b.detach()).as_ref(),
            n.eps,
            self.dtype,
        )?;
        let gate = fused::linear(&normed, &self.gate.detach(), None)?;
        let up = fused::linear(&normed, &self.up.detach(), None)?;
        drop(normed);
        let s = fused::activation(&gate, Act::Silu)?;
        // the product is down's input, which a frozen `down` does not keep
        let y = fused::linear(&(&s * &up)?, &self.down.detach(), None)?;
        if let Ok(mut kept) = self.kept.lock() {
            *kept = Some((gate, up, s));
        }
        dropped(y, self.drop.as_ref())
    }

    /// The backward root for the output gradient `g`: a scalar over `x` whose backward is the
    /// whole feed-forward's and its norm's.
    pub fn root(&self, g: &Tensor) -> Result<Tensor> {
        let drop = self.drop.as_ref().map(|(m, p)| (m, *p));
        let op = SeedFrozenSwiGluOp {
            g: output_grad(g, self.dtype, drop)?,
            norm: self.norm.clone(),
            weights: (self.gate.detach(), self.up.detach(), self.down.detach()),
            kept: self.kept.clone(),
            out: zero_scalar(&self.x)?,
        };
        self.x.apply_op1(op)
    }
}

struct SeedFrozenSwiGluOp {
    g: Tensor,
    norm: FrozenNorm,
    weights: (Tensor, Tensor, Tensor),
    kept: Kept,
    out: Handed,
}

impl CustomOp1 for SeedFrozenSwiGluOp {
    fn name(&self) -> &'static str {
        "grad-seed-frozen-swiglu"
    }
    handed_fwd!(a);
    /// In PyTorch's order: down's input gradient, the product's, SiLU's, then up's and gate's
    /// input gradients summed into the norm output's, then the norm's input gradient; each
    /// saved tensor is freed once used.
    fn bwd(&self, x: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        let (wg, wu, wd) = &self.weights;
        let Some((gate, up, s)) = self.kept.lock().ok().and_then(|mut k| k.take()) else {
            candle_core::bail!("frozen SwiGLU: backward before the forward value");
        };
        let (o, f) = wd.dims2()?;
        let (g_gate, g_up) = swiglu_input_grads(&self.g.reshape(((), o))?, wd, gate, up, s)?;
        let g_normed = g_up.reshape(((), f))?.matmul(wu)?;
        drop(g_up);
        let g_normed = (g_normed + g_gate.reshape(((), f))?.matmul(wg)?)?.reshape(x.shape())?;
        let n = &self.norm;
        Ok(Some(fused::norm_input_grad(
            x,
            &n.gamma,
            n.beta.as_ref(),
            n.eps,
            &g_normed,
        )?))
    }
}

#[cfg(test)]
mod tests {
    //! Against the same feed-forward composed from candle's primitive ops, with only `x`
    //! trainable: output and input gradient agree to fp32 rounding, for RMSNorm and LayerNorm.
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn composed(x: &Tensor, n: &FrozenNorm, w: &(Tensor, Tensor, Tensor)) -> Result<Tensor> {
        let xc = match &n.beta {
            Some(_) => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
            None => x.clone(),
        };
        let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + n.eps)?
            .sqrt()?
            .recip()?;
        let mut normed = xc.broadcast_mul(&rstd)?.broadcast_mul(&n.gamma)?;
        if let Some(b) = &n.beta {
            normed = normed.broadcast_add(b)?;
        }
        let lin = |t: &Tensor, w: &Tensor| t.broadcast_matmul(&w.t()?);
        let gate = lin(&normed, &w.0)?;
        let up = lin(&normed, &w.1)?;
        lin(&(candle_nn::ops::silu(&gate)? * up)?, &w.2)
    }

    #[test]
    fn output_and_input_gradient_match_the_composed_feed_forward() {
        let (b, s, h, f) = (2, 5, 8, 12);
        let weights = (randn(&[f, h]), randn(&[f, h]), randn(&[h, f]));
        for beta in [None, Some(randn(&[h]))] {
            let norm = FrozenNorm {
                gamma: randn(&[h]),
                beta,
                eps: 1e-5,
            };
            let x0 = randn(&[b, s, h]);
            let r = randn(&[b, s, h]);
            // composed: every op a graph node
            let xv = Var::from_tensor(&x0).unwrap();
            let y_ref = composed(xv.as_tensor(), &norm, &weights).unwrap();
            let gs = (&y_ref * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx_ref = gs.get(&xv).unwrap().clone();
            // the frozen term: value outside the graph, backward through its root
            let xv = Var::from_tensor(&x0).unwrap();
            let term = FrozenSwiGlu::new(
                xv.as_tensor().clone(),
                norm.clone(),
                weights.clone(),
                DType::F32,
                None,
            );
            let y = term.value().unwrap();
            let gs = term.root(&r).unwrap().backward().unwrap();
            let dx = gs.get(&xv).unwrap();
            let err = |a: &Tensor, b: &Tensor| crate::harness::compare::max_rel_err(a, b).unwrap();
            assert!(err(&y, &y_ref) < 1e-5, "output {}", err(&y, &y_ref));
            assert!(
                err(dx, &dx_ref) < 1e-4,
                "input gradient {}",
                err(dx, &dx_ref)
            );
        }
    }
}
