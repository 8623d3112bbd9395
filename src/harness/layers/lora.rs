//! LoRA (Hu et al. 2021) as peft runs it, with the memory PyTorch keeps: a frozen linear `W`
//! (a plain tensor: no gradient, no optimizer state) plus the adapter branch
//! `lora_B(lora_A(dropout(x))) * scaling` (peft `LoraLayer.forward`; dropout p = 0 is identity).
//!
//! PyTorch saves for this: `lora_A`'s input `x` (the same tensor the base layer reads; the frozen
//! base itself saves nothing, having no weight gradient to compute) and `lora_B`'s input, the
//! rank-R intermediate `t = x·Aᵀ`; the scalar multiply and the sum with the base output keep
//! nothing. Each node here takes `(x, A, B)` as its graph inputs (so gradients reach the adapter
//! Vars through candle's backward), holds `W` and the bias as frozen tensors and `t` until its
//! backward, and is handed its forward value ([`super::handed`]), never keeping the base or
//! branch outputs. `A` may be several adapters stacked (`[A_q; A_k; A_v]`) and `B` their block
//! diagonal, so one node serves the fused QKV projection with per-projection adapters (the
//! stacking ops keep only the small adapter tensors).
//!
//! Three node shapes mirror the plain linear's: [`lora_linear`] (optionally split into heads),
//! [`lora_residual`] (the residual join of [`super::joins::linear_residual`]) and [`seed_lora`]
//! (a block's last linear seeded with the output gradient, [`super::joins::seed_linear`]).

use super::fused::{self, Heads, LinearOp};
use super::handed::{handed_fwd, Handed};
use super::joins::{stash_add, Dropped, Stash};
use super::nf4::Nf4;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use std::sync::Mutex;

/// `[b, s, g, a, d]` -> `[g, b, a, s, d]` and back (as `fused::linear`).
const SPLIT: [usize; 5] = [2, 0, 3, 1, 4];
const UNSPLIT: [usize; 5] = [1, 3, 0, 2, 4];

/// A frozen base weight: 16-bit (LoRA) or NF4, dequantized for each use (QLoRA).
#[derive(Clone)]
enum Frozen {
    Dense(Tensor),
    Nf4(Nf4, DType),
}

impl Frozen {
    fn weight(&self) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => Ok(w.clone()),
            Frozen::Nf4(q, dtype) => q.dequantize(*dtype),
        }
    }
    fn dims(&self) -> (usize, usize) {
        match self {
            Frozen::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            Frozen::Nf4(q, _) => q.shape,
        }
    }
}

/// The frozen base and the layout of one adapted linear; the adapters arrive as graph inputs.
pub struct Lora {
    lin: LinearOp,
    w: Frozen,
    b: Option<Tensor>,
    scale: f64,
    /// `t = x·Aᵀ`, `lora_B`'s saved input, released by backward
    t: Mutex<Option<Tensor>>,
}

impl Lora {
    /// `w`, `b`: the frozen weight and bias (detached); `scale`: alpha / r.
    pub fn new(w: &Tensor, b: Option<&Tensor>, scale: f64) -> Self {
        Self {
            lin: LinearOp::default(),
            w: Frozen::Dense(w.detach()),
            b: b.map(Tensor::detach),
            scale,
            t: Mutex::new(None),
        }
    }

    /// A QLoRA linear: the NF4 base is dequantized to `dtype` in forward and again in backward,
    /// never held between them.
    pub fn quantized(w: &Nf4, dtype: DType, b: Option<&Tensor>, scale: f64) -> Self {
        Self {
            lin: LinearOp::default(),
            w: Frozen::Nf4(w.clone(), dtype),
            b: b.map(Tensor::detach),
            scale,
            t: Mutex::new(None),
        }
    }

    /// A copy for the backward node, taking the kept `t` with it.
    pub fn handoff(&self) -> Self {
        Self {
            lin: self.lin,
            w: self.w.clone(),
            b: self.b.clone(),
            scale: self.scale,
            t: Mutex::new(self.t.lock().ok().and_then(|mut t| t.take())),
        }
    }

    fn split(mut self, h: Heads, groups: usize) -> Self {
        self.lin.split = Some((h, groups));
        self
    }

    fn merge(mut self, h: Heads) -> Self {
        self.lin.merge = Some(h);
        self
    }

    /// `x` as the `[rows, d_in]` matrix the product reads.
    fn rows(&self, x: &Tensor) -> Result<Tensor> {
        match self.lin.merge {
            Some(h) => x
                .transpose(1, 2)?
                .contiguous()?
                .reshape((h.b * h.s, h.a * h.d)),
            None => x.reshape(((), self.w.dims().1)),
        }
    }

    /// The output value (base + branch) in the base's layout, computed on detached inputs; keeps
    /// `t` for backward.
    fn value(&self, x: &Tensor, a: &Tensor, bm: &Tensor) -> Result<Tensor> {
        let x = x.detach();
        let w = self.w.weight()?;
        let base = match (self.lin.split, self.lin.merge) {
            (Some((h, g)), _) => fused::linear_split_heads(&x, &w, self.b.as_ref(), h, g)?,
            (None, Some(h)) => fused::linear_merge_heads(&x, &w, self.b.as_ref(), h)?,
            (None, None) => fused::linear(&x, &w, self.b.as_ref())?,
        };
        drop(w);
        let t = self.rows(&x)?.matmul(&a.detach().t()?)?;
        let d = (t.matmul(&bm.detach().t()?)? * self.scale)?;
        let d = match self.lin.split {
            Some((h, g)) => d
                .reshape((h.b, h.s, g, h.a, h.d))?
                .permute(SPLIT)?
                .contiguous()?,
            None => d.reshape(base.shape())?,
        };
        if let Ok(mut kept) = self.t.lock() {
            *kept = Some(t);
        }
        base + d
    }

    /// Gradients of `x`, `A` and `B` for the output gradient `g` (base layout). `x`'s only when
    /// something upstream needs it; the frozen `W` gets none.
    fn grads(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let t = self
            .t
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .ok_or_else(|| candle_core::Error::Msg("LoRA backward without its forward".into()))?;
        let need_x = x.track_op();
        let (x, a, bm) = (x.detach(), a.detach(), bm.detach());
        let o = self.w.dims().0;
        let g2 = match self.lin.split {
            Some((h, grp)) => g
                .reshape((grp, h.b, h.a, h.s, h.d))?
                .permute(UNSPLIT)?
                .contiguous()?
                .reshape(((), o))?,
            None => g.reshape(((), o))?.contiguous()?,
        };
        let gb = (g2.t()?.matmul(&t)? * self.scale)?;
        drop(t);
        let gt = (g2.matmul(&bm)? * self.scale)?;
        let ga = gt.t()?.matmul(&self.rows(&x)?)?;
        let gx = if need_x {
            let gx = (g2.matmul(&self.w.weight()?)? + gt.matmul(&a)?)?;
            Some(self.lin.input_layout(gx, &x)?)
        } else {
            None
        };
        Ok((gx, Some(ga), Some(gb)))
    }
}

struct LoraOp {
    lora: Lora,
    out: Handed,
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }
    handed_fwd!(a, b, c);
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.lora.grads(x, a, bm, g)
    }
}

/// `x @ Wᵀ + b + (x·Aᵀ)·Bᵀ·scale` over the last dimension of `x`, or split into `groups` sets of
/// attention heads `[groups, b, a, s, d]` (`split`), one node keeping `x`, the adapters and `t`.
pub fn lora_linear(
    lora: Lora,
    x: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    split: Option<(Heads, usize)>,
) -> Result<Tensor> {
    let lora = match split {
        Some((h, g)) => lora.split(h, g),
        None => lora,
    };
    let x = x.contiguous()?;
    let out = lora.value(&x, a, bm)?;
    let shape = out.shape().clone();
    let op = LoraOp {
        lora,
        out: Handed::new(out.flatten_all()?),
    };
    x.apply_op3(a, bm, op)?.reshape(shape)
}

struct ResidLoraOp {
    lora: Lora,
    out: Handed,
    stash: Stash,
    drop: Dropped,
}

impl CustomOp3 for ResidLoraOp {
    fn name(&self) -> &'static str {
        "lora-linear-residual"
    }
    handed_fwd!(a, b, c);
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        stash_add(&self.stash, g)?;
        let g = self.drop.grad(&g.to_dtype(x.dtype())?)?;
        self.lora.grads(x, a, bm, &g)
    }
}

/// `resid + dropout(lora_linear(x))` (`merge`: `x` is attention heads), as
/// [`super::joins::linear_residual`]: keeps `x`, the adapters, `t` and the mask; the residual's
/// gradient goes to `stash`.
#[allow(clippy::too_many_arguments)]
pub fn lora_residual(
    lora: Lora,
    resid: &Tensor,
    x: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    merge: Option<Heads>,
    stash: &Stash,
    drop: Option<(&Tensor, f32)>,
) -> Result<Tensor> {
    let lora = match merge {
        Some(h) => lora.merge(h),
        None => lora,
    };
    let x = x.contiguous()?;
    let y = lora.value(&x, a, bm)?;
    let y = match drop {
        Some((mask, p)) => fused::dropout(&y, mask, p)?,
        None => y,
    };
    let out = (y.to_dtype(resid.dtype())? + resid.detach())?;
    let shape = out.shape().clone();
    let op = ResidLoraOp {
        lora,
        out: Handed::new(out.flatten_to(D::Minus2)?.contiguous()?),
        stash: stash.clone(),
        drop: Dropped::new(drop),
    };
    x.apply_op3(a, bm, op)?.reshape(shape)
}

/// The value of `lora_linear(x)` outside any graph (a block output's last term); `lora` keeps
/// `t` for [`seed_lora`], as PyTorch's `lora_B` keeps its input from the forward.
pub fn lora_value(lora: &Lora, x: &Tensor, a: &Tensor, bm: &Tensor) -> Result<Tensor> {
    lora.value(x, a, bm)
}

struct SeedLoraOp {
    lora: Lora,
    g: Tensor,
    out: Handed,
}

impl CustomOp3 for SeedLoraOp {
    fn name(&self) -> &'static str {
        "grad-seed-lora"
    }
    handed_fwd!(a, b, c);
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.lora.grads(x, a, bm, &self.g)
    }
}

/// A scalar whose backward is that of `dropout(lora_linear(x))` receiving `g`, as
/// [`super::joins::seed_linear`]; `lora` carries `t` from [`lora_value`] (recomputed if absent).
pub fn seed_lora(
    lora: Lora,
    x: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    g: &Tensor,
    drop: Option<(&Tensor, f32)>,
) -> Result<Tensor> {
    let g = match drop {
        Some((mask, p)) => fused::dropout_grad(g, mask, 1.0 / (1.0 - p as f64))?,
        None => g.clone(),
    };
    let x = x.contiguous()?;
    if let Ok(mut kept) = lora.t.lock() {
        if kept.is_none() {
            *kept = Some(lora.rows(&x.detach())?.matmul(&a.detach().t()?)?);
        }
    }
    let op = SeedLoraOp {
        lora,
        g,
        out: Handed::new(candle_core::Tensor::zeros(
            (),
            candle_core::DType::F32,
            x.device(),
        )?),
    };
    x.apply_op3(a, bm, op)
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and the
    //! gradients of x, A and B agree; the frozen W gets none.
    use super::*;
    use candle_core::{DType, Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 7919 + 13)) % 97) as f32 / 97.0 - 0.5)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let d = d.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "differ by {d}");
    }

    #[test]
    fn lora_linear_plain_and_split_match_composed_ops() {
        let h = Heads {
            b: 2,
            a: 3,
            s: 5,
            d: 2,
        };
        for split in [None, Some((h, 2))] {
            let (x, a, bm) = (
                Var::from_tensor(&rand(&[2, 5, 6], 1)).unwrap(),
                Var::from_tensor(&rand(&[3, 6], 2)).unwrap(),
                Var::from_tensor(&rand(&[12, 3], 3)).unwrap(),
            );
            let (w, bias, r) = (rand(&[12, 6], 4), rand(&[12], 5), rand(&[2, 5, 12], 6));
            let lora = Lora::new(&w, Some(&bias), 2.0);
            let y = lora_linear(lora, x.as_tensor(), a.as_tensor(), bm.as_tensor(), split).unwrap();
            let composed = (x
                .as_tensor()
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                + (x.as_tensor()
                    .broadcast_matmul(&a.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&bm.as_tensor().t().unwrap())
                    .unwrap()
                    * 2.0)
                    .unwrap())
            .unwrap();
            let composed = match split {
                Some((h, g)) => composed
                    .reshape((h.b, h.s, g, h.a, h.d))
                    .unwrap()
                    .permute(SPLIT)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                None => composed,
            };
            let r = match split {
                Some(_) => r
                    .reshape((2, 5, 2, 3, 2))
                    .unwrap()
                    .permute(SPLIT)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                None => r,
            };
            close(&y, &composed);
            let g1 = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (composed * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &a, &bm] {
                close(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
            }
            assert!(g1.get(&w).is_none(), "the frozen weight has no gradient");
        }
    }
}
