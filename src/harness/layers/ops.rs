//! Differentiable building blocks on top of candle ops. Linear, norm and loss go through the
//! memory-lean single-node ops of [`super::fused`] (what the graph keeps is what PyTorch keeps);
//! pooling is composed here because candle's pooling backward needs kernel == stride.

use super::fused::{self, Heads};
use super::lora::{lora_linear, Lora};
use super::params::{Ctx, Init, ParamStore};
use super::pool::pad_hw;
use crate::spec::cnn::PoolKind;
use candle_core::{DType, Result, Tensor};

/// Linear layer, weight `[out, in]` (PyTorch layout), optional bias, optional LoRA adapters.
#[derive(Debug, Clone)]
pub struct Linear {
    pub w: usize,
    pub b: Option<usize>,
    pub d_out: usize,
    pub lora: Option<Adapter>,
}

/// The LoRA adapters of one (frozen) linear: per part of its output (the fused QKV projection
/// has three, q, k and v, each adapted or not) the rows and, when adapted, the indices of A
/// `[r, d_in]` (uniform ±1/sqrt(d_in), peft's kaiming_uniform(a=√5)) and B `[rows, r]` (zeros,
/// as peft); scaling alpha / r.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub parts: Vec<(usize, Option<(usize, usize)>)>,
    pub rank: usize,
    pub scale: f64,
}

impl Adapter {
    /// Registers the adapters of the `parts` (name, rows, adapted) of a linear `d_in` wide.
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        d_in: usize,
        parts: &[(&str, usize, bool)],
        rank: usize,
        scale: f64,
    ) -> anyhow::Result<Option<Self>> {
        if !parts.iter().any(|p| p.2) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(parts.len());
        for &(part, rows, adapted) in parts {
            let ids = if adapted {
                let bound = 1.0 / (d_in as f32).sqrt();
                let a = store.add_adapter(
                    format!("{name}.lora_A.{part}"),
                    &[rank, d_in],
                    Init::Uniform(bound),
                )?;
                let b = store.add_adapter(
                    format!("{name}.lora_B.{part}"),
                    &[rows, rank],
                    Init::Zeros,
                )?;
                Some((a, b))
            } else {
                None
            };
            out.push((rows, ids));
        }
        Ok(Some(Self {
            parts: out,
            rank,
            scale,
        }))
    }

    /// A (the parts' adapters stacked, `[R, d_in]`) and B (block diagonal, `[out, R]`) in the
    /// compute dtype, through differentiable casts and joins of the adapter Vars.
    fn tensors(&self, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        let adapted: Vec<(usize, usize)> = self.parts.iter().filter_map(|p| p.1).collect();
        if let ([(a, b)], 1) = (adapted.as_slice(), self.parts.len()) {
            return Ok((ctx.w(*a)?, ctx.w(*b)?));
        }
        let a_parts = adapted
            .iter()
            .map(|(a, _)| ctx.w(*a))
            .collect::<Result<Vec<_>>>()?;
        let a = Tensor::cat(&a_parts, 0)?;
        let total = adapted.len() * self.rank;
        let mut before = 0;
        let mut rows = Vec::with_capacity(self.parts.len());
        let dev = &ctx.store.device;
        for &(n, ids) in &self.parts {
            let row = match ids {
                Some((_, b)) => {
                    let mut cols = Vec::new();
                    if before > 0 {
                        cols.push(Tensor::zeros((n, before), ctx.dtype, dev)?);
                    }
                    cols.push(ctx.w(b)?);
                    let after = total - before - self.rank;
                    if after > 0 {
                        cols.push(Tensor::zeros((n, after), ctx.dtype, dev)?);
                    }
                    before += self.rank;
                    Tensor::cat(&cols, 1)?
                }
                None => Tensor::zeros((n, total), ctx.dtype, dev)?,
            };
            rows.push(row);
        }
        Ok((a, Tensor::cat(&rows, 0)?))
    }
}

impl Linear {
    /// Whether PyTorch's linear saves its input: for the weight's gradient (trainable) or the
    /// LoRA A matrix's (adapted); a frozen, unadapted linear saves none.
    pub fn keeps_input(&self, ctx: &Ctx) -> bool {
        ctx.store.params[self.w].trainable || self.lora.is_some()
    }

    pub fn new(
        store: &mut ParamStore,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> anyhow::Result<Self> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w = store.add(
            format!("{name}.weight"),
            &[d_out, d_in],
            Init::Uniform(bound),
        )?;
        let b = if bias {
            Some(store.add(format!("{name}.bias"), &[d_out], Init::Zeros)?)
        } else {
            None
        };
        Ok(Self {
            w,
            b,
            d_out,
            lora: None,
        })
    }

    /// The adapters A and B and the frozen base as a [`Lora`] branch, when adapted.
    pub fn adapted(&self, ctx: &Ctx) -> Result<Option<(Tensor, Tensor, Lora)>> {
        let Some(ad) = &self.lora else {
            return Ok(None);
        };
        let (a, b) = ad.tensors(ctx)?;
        if let Some(q) = &ctx.store.params[self.w].nf4 {
            // QLoRA: the node dequantizes the base for each use instead of holding it
            let bias = self.bias(ctx)?;
            return Ok(Some((
                a,
                b,
                Lora::quantized(q, ctx.dtype, bias.as_ref(), ad.scale),
            )));
        }
        let (w, bias) = self.tensors(ctx)?;
        Ok(Some((a, b, Lora::new(&w, bias.as_ref(), ad.scale))))
    }

    /// Applies to the last dimension of `x` (any rank). An input in another dtype than the
    /// compute dtype (the fp32 residual stream under mixed precision) is cast first, as autocast
    /// casts a linear's input: the linear then keeps the 16-bit copy.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let x = &ctx.compute(x)?;
        if let Some((a, b, lora)) = self.adapted(ctx)? {
            return lora_linear(lora, x, &a, &b, None);
        }
        fused::linear(x, &ctx.w(self.w)?, self.bias(ctx)?.as_ref())
    }

    /// `x: [b, s, in]` -> `[groups, b, a, s, d]` attention heads (`groups * a * d == out`).
    pub fn forward_split_heads(
        &self,
        ctx: &Ctx,
        x: &Tensor,
        h: Heads,
        groups: usize,
    ) -> Result<Tensor> {
        let x = &ctx.compute(x)?;
        if let Some((a, b, lora)) = self.adapted(ctx)? {
            return lora_linear(lora, x, &a, &b, Some((h, groups)));
        }
        fused::linear_split_heads(x, &ctx.w(self.w)?, self.bias(ctx)?.as_ref(), h, groups)
    }

    /// `x: [b, a, s, d]` attention heads -> `[b, s, out]`.
    pub fn forward_merge_heads(&self, ctx: &Ctx, x: &Tensor, h: Heads) -> Result<Tensor> {
        let x = &ctx.compute(x)?;
        fused::linear_merge_heads(x, &ctx.w(self.w)?, self.bias(ctx)?.as_ref(), h)
    }

    /// The weight and bias in the compute dtype.
    pub fn tensors(&self, ctx: &Ctx) -> Result<(Tensor, Option<Tensor>)> {
        Ok((ctx.w(self.w)?, self.bias(ctx)?))
    }

    fn bias(&self, ctx: &Ctx) -> Result<Option<Tensor>> {
        self.b.map(|b| ctx.w(b)).transpose()
    }
}

/// LayerNorm (weight + bias) or RMSNorm (weight), over the last dimension. Statistics are
/// computed in fp32 even for half inputs, as autocast does.
#[derive(Debug, Clone)]
pub struct Norm {
    pub w: usize,
    pub b: Option<usize>,
}

impl Norm {
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, rms: bool) -> anyhow::Result<Self> {
        let w = store.add(format!("{name}.weight"), &[dim], Init::Ones)?;
        let b = if rms {
            None
        } else {
            Some(store.add(format!("{name}.bias"), &[dim], Init::Zeros)?)
        };
        Ok(Self { w, b })
    }

    /// The weight and bias in `x`'s dtype (the stored ones when `x` is in their storage dtype),
    /// and epsilon.
    pub fn params(&self, ctx: &Ctx, x: &Tensor) -> Result<(Tensor, Option<Tensor>, f64)> {
        let param = |idx: usize| -> Result<Tensor> {
            let raw = ctx.w_raw(idx)?;
            if raw.dtype() == x.dtype() {
                Ok(raw)
            } else {
                ctx.w(idx)?.to_dtype(x.dtype())
            }
        };
        let w = param(self.w)?;
        let b = self.b.map(param).transpose()?;
        let eps = if b.is_some() { 1e-5 } else { 1e-6 };
        Ok((w, b, eps))
    }

    /// The norm, output in `x`'s dtype (a post-norm block's residual stream).
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        self.forward_to(ctx, x, x.dtype())
    }

    /// The norm with its output in `out` (a pre-norm block's norm feeding linears: under mixed
    /// precision PyTorch's norm reads the fp32 residual stream and the linears keep autocast's
    /// 16-bit copy of its output, which this node writes directly).
    pub fn forward_to(&self, ctx: &Ctx, x: &Tensor, out: DType) -> Result<Tensor> {
        let (w, b, eps) = self.params(ctx, x)?;
        fused::norm(x, &w, b.as_ref(), eps, out)
    }
}

/// Max/avg pooling with any kernel, stride and padding (PyTorch semantics, average counting the
/// padding). kernel == stride without padding uses candle's kernels; other max pools (the ResNet
/// stem's 3x3/2) are one node keeping the input and indices ([`super::pool`]); other average
/// pools combine the k*k strided windows, because candle's pooling backward only supports
/// kernel == stride.
pub fn pool2d(x: &Tensor, kind: PoolKind, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    if k == stride && pad == 0 {
        return match kind {
            PoolKind::Max => x.max_pool2d_with_stride(k, stride),
            PoolKind::Avg => x.avg_pool2d_with_stride(k, stride),
        };
    }
    match kind {
        // one node keeping the input and int64 indices, as PyTorch's (super::pool)
        PoolKind::Max => super::pool::max_pool2d(x, k, stride, pad),
        PoolKind::Avg => pool2d_composed(x, kind, k, stride, pad),
    }
}

/// Pooling composed from the k·k strided windows (what the graph keeps: every window).
pub(super) fn pool2d_composed(
    x: &Tensor,
    kind: PoolKind,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let fill = match kind {
        PoolKind::Max => f32::NEG_INFINITY,
        PoolKind::Avg => 0.0,
    };
    let xp = pad_hw(x, pad, fill)?;
    let (_, _, h, w) = xp.dims4()?;
    let ho = (h - k) / stride + 1;
    let wo = (w - k) / stride + 1;
    let dev = x.device();
    let index = |start: usize, n: usize| -> Result<Tensor> {
        let ids: Vec<u32> = (0..n).map(|i| (start + i * stride) as u32).collect();
        Tensor::from_vec(ids, n, dev)
    };
    let mut acc: Option<Tensor> = None;
    for di in 0..k {
        let rows = xp.index_select(&index(di, ho)?, 2)?;
        for dj in 0..k {
            let win = rows.index_select(&index(dj, wo)?, 3)?;
            acc = Some(match (acc, kind) {
                (None, _) => win,
                (Some(a), PoolKind::Max) => a.maximum(&win)?,
                (Some(a), PoolKind::Avg) => (a + win)?,
            });
        }
    }
    let acc = acc.expect("kernel >= 1");
    match kind {
        PoolKind::Max => Ok(acc),
        PoolKind::Avg => acc * (1.0 / (k * k) as f64),
    }
}

/// Adaptive pooling to `out` x `out` (PyTorch bins: [floor(i*n/out), ceil((i+1)*n/out))).
/// Divisible sizes use one pooling kernel; others pool each bin, separably along H then W
/// (exact for both max and mean because the bins are rectangles).
pub fn adaptive_pool2d(x: &Tensor, kind: PoolKind, out: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    // out == 0 would divide by zero below and an empty input has no bins to pool: refuse both
    // with an error instead of a panic (a spec file can ask for either).
    if out == 0 || h == 0 || w == 0 {
        return Err(candle_core::Error::Msg(format!(
            "adaptive pooling of a {h}x{w} input to {out}x{out}: accepted an output size >= 1 and a non-empty input"
        )));
    }
    if h == w && h % out == 0 {
        let k = h / out;
        return pool2d(x, kind, k, k, 0);
    }
    let along = |x: &Tensor, dim: usize, n: usize| -> Result<Tensor> {
        let bins = (0..out)
            .map(|i| {
                let start = i * n / out;
                let end = ((i + 1) * n).div_ceil(out);
                let win = x.narrow(dim, start, end - start)?;
                match kind {
                    PoolKind::Max => win.max_keepdim(dim),
                    PoolKind::Avg => win.mean_keepdim(dim),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&bins, dim)
    };
    let x = along(x, 2, h)?;
    along(&x, 3, w)
}

/// Cross entropy in fp32 (autocast computes the loss in fp32), mean over rows.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    fused::cross_entropy(logits, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_pool_to_zero_is_an_error_not_a_panic() {
        let x = Tensor::zeros(
            (1, 2, 4, 4),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for kind in [PoolKind::Max, PoolKind::Avg] {
            assert!(adaptive_pool2d(&x, kind, 0).is_err());
            // and a valid size still pools
            assert_eq!(
                adaptive_pool2d(&x, kind, 2).unwrap().dims4().unwrap(),
                (1, 2, 2, 2)
            );
        }
        let empty = Tensor::zeros(
            (1, 2, 0, 0),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(adaptive_pool2d(&empty, PoolKind::Avg, 1).is_err());
    }
}
