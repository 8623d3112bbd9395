//! LayerNorm, RMSNorm and training-mode BatchNorm (optionally followed by ReLU) as one graph node
//! keeping its input (and, for RMSNorm, what transformers' module keeps); statistics in fp32.

use super::kernels::*;
use crate::harness::layers::handed::{handed_fwd, Handed};
use candle_core::backend::BackendStorage;
use candle_core::op::{self as kern, ReduceOp};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
    D,
};

/// Which elements a norm's statistics run over.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stats {
    /// LayerNorm / RMSNorm: the last dimension of each row.
    Last,
    /// BatchNorm (training mode) on NCHW: batch and spatial dims of each channel.
    Channels,
}

impl Stats {
    fn dims(self, rank: usize) -> Vec<usize> {
        match self {
            Stats::Last => vec![rank - 1],
            Stats::Channels => vec![0, 2, 3],
        }
    }
}

/// Reduction over `dims`, keeping them (size 1).
fn reduce_keep<S: BackendStorage>((s, l): View<S>, op: ReduceOp, dims: &[usize]) -> Result<Buf<S>> {
    let mut shape = l.dims().to_vec();
    for &d in dims {
        shape[d] = 1;
    }
    Ok(Buf::new(s.reduce_op(op, l, dims)?, shape))
}

/// LayerNorm (with `beta`), RMSNorm (without) or training-mode BatchNorm, optionally followed by
/// ReLU (torchvision's in-place ReLU after BN keeps one tensor, so the pair is one node here).
/// Statistics in fp32 whatever the input dtype; output in the input dtype. `gamma`/`beta` come
/// shaped to broadcast against the input (`[h]`, or `[1, c, 1, 1]` for BatchNorm).
#[derive(Debug, Clone)]
struct NormOp {
    eps: f64,
    rms: bool,
    /// Output dtype; None: the input's.
    out: Option<DType>,
    stats: Stats,
    relu: bool,
    /// Tensors held until backward only to keep what PyTorch keeps ([`Kept`]).
    kept: Kept,
}

impl NormOp {
    fn fwd<S: BackendStorage>(
        &self,
        x: View<S>,
        g: View<S>,
        b: Option<View<S>>,
    ) -> Result<(S, Shape)> {
        let dtype = x.0.dtype();
        let dims = self.stats.dims(x.1.dims().len());
        let n: usize = dims.iter().map(|&d| x.1.dims()[d]).product();
        let n = n as f64;
        let xf = cast(x, DType::F32)?;
        let xc = if self.rms {
            xf
        } else {
            let mean = affine(reduce_keep(xf.r(), ReduceOp::Sum, &dims)?.r(), 1.0 / n, 0.0)?;
            let centered = bcast::<S, kern::Sub>(xf.r(), mean.r())?;
            drop(xf);
            centered
        };
        let ss = reduce_keep(unary::<S, kern::Sqr>(xc.r())?.r(), ReduceOp::Sum, &dims)?;
        let var = affine(ss.r(), 1.0 / n, self.eps)?;
        let rstd = unary::<S, kern::Recip>(unary::<S, kern::Sqrt>(var.r())?.r())?;
        // each step frees the input-sized buffer before it (assignments, not shadowing, which
        // would keep every one alive to the end): at most two at once
        let mut y = bcast::<S, kern::Mul>(xc.r(), rstd.r())?;
        drop(xc);
        y = bcast::<S, kern::Mul>(y.r(), cast(g, DType::F32)?.r())?;
        if let Some(b) = b {
            y = bcast::<S, kern::Add>(y.r(), cast(b, DType::F32)?.r())?;
        }
        if self.relu {
            y = unary::<S, kern::Relu>(y.r())?;
        }
        Ok(cast(y.r(), self.out.unwrap_or(dtype))?.into_out())
    }

    /// Recomputes the normalised input from `x` and returns (dx, dgamma, dbeta).
    fn grads(
        &self,
        x: &Tensor,
        g: &Tensor,
        has_beta: bool,
        res: &Tensor,
        gy: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let _kept = self.kept.release();
        // an output in another dtype than the input: its gradient is cast to the input's first,
        // as autograd's backward of autocast's cast does
        let gy = &if gy.dtype() != x.dtype() {
            gy.to_dtype(x.dtype())?
        } else {
            gy.clone()
        };
        if let Some(grads) = self.grads_cpu(x, g, has_beta, res, gy)? {
            return Ok(grads);
        }
        let xf = x.detach().to_dtype(DType::F32)?;
        let dims = self.stats.dims(xf.rank());
        let mean = |t: &Tensor| t.mean_keepdim(dims.as_slice());
        let xc = if self.rms {
            xf
        } else {
            xf.broadcast_sub(&mean(&xf)?)?
        };
        let rstd = (mean(&xc.sqr()?)? + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        drop(xc);
        let mut gyf = gy.to_dtype(DType::F32)?;
        if self.relu {
            gyf = (gyf * res.detach().gt(0.0)?.to_dtype(DType::F32)?)?;
        }
        let gxhat = gyf.broadcast_mul(&g.detach().to_dtype(DType::F32)?)?;
        let proj = mean(&(&gxhat * &xhat)?)?;
        let mut inner = (gxhat - xhat.broadcast_mul(&proj)?)?;
        if !self.rms {
            inner = inner.broadcast_sub(&mean(&inner)?)?;
        }
        let gx = inner.broadcast_mul(&rstd)?.to_dtype(x.dtype())?;
        if !g.track_op() {
            // frozen parameters (LoRA's base): autograd computes no gradient for them, and the
            // input-sized product below would be a temporary PyTorch never makes
            return Ok([Some(gx), None, None]);
        }
        // parameter gradients: sum over every dim the parameter is broadcast along
        let per_param = |t: Tensor| -> Result<Tensor> {
            let t = match self.stats {
                Stats::Last => t.reshape(((), t.dim(D::Minus1)?))?.sum(0)?,
                Stats::Channels => t.sum_keepdim(dims.as_slice())?,
            };
            t.reshape(g.shape())?.to_dtype(g.dtype())
        };
        let gg = per_param((&gyf * &xhat)?)?;
        let gb = if has_beta {
            Some(per_param(gyf)?)
        } else {
            None
        };
        Ok([Some(gx), Some(gg), gb])
    }
}

/// A contiguous CPU storage's elements as `T` (None for another device, dtype or layout).
fn cpu_slice<'a, T: WithDType>(s: &'a candle_core::Storage, l: &Layout) -> Option<&'a [T]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(c), Some((a, b))) => c.as_slice::<T>().ok().map(|v| &v[a..b]),
        _ => None,
    }
}

impl NormOp {
    /// LayerNorm's and BatchNorm's gradients on a CPU the way PyTorch's native (fused) backward
    /// kernels run: per
    /// group (row or channel) one pass for the statistics, one for the sums of `gy·γ` and
    /// `gy·γ·x̂` (and the parameter gradients), one writing dx, in f64 whatever the element type.
    /// The only input-sized allocation is dx; the composed form below holds five or six
    /// input-sized fp32 temporaries at once, which was 3.4 MB of tiny-resnet18's 7.6 MB step rise
    /// (b8, 128 px, fp32) where PyTorch's whole rise is 4.0 MB. None off a CPU, or when the
    /// tensors are not contiguous or not all of one dtype.
    fn grads_cpu(
        &self,
        x: &Tensor,
        g: &Tensor,
        has_beta: bool,
        res: &Tensor,
        gy: &Tensor,
    ) -> Result<Option<[Option<Tensor>; 3]>> {
        if self.rms {
            // transformers composes RMSNorm from small ops, whose autograd backward allocates
            // input-sized temporaries as the composed form below does
            return Ok(None);
        }
        match x.dtype() {
            DType::F32 => self.grads_cpu_as::<f32>(x, g, has_beta, res, gy),
            DType::F16 => self.grads_cpu_as::<half::f16>(x, g, has_beta, res, gy),
            DType::BF16 => self.grads_cpu_as::<half::bf16>(x, g, has_beta, res, gy),
            _ => Ok(None),
        }
    }

    fn grads_cpu_as<T: WithDType>(
        &self,
        x: &Tensor,
        g: &Tensor,
        has_beta: bool,
        res: &Tensor,
        gy: &Tensor,
    ) -> Result<Option<[Option<Tensor>; 3]>> {
        let dims = x.dims().to_vec();
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ys, yl) = gy.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (Some(xv), Some(gamma), Some(dy)) = (
            cpu_slice::<T>(&xs, xl),
            cpu_slice::<T>(&gs, gl),
            cpu_slice::<T>(&ys, yl),
        ) else {
            return Ok(None);
        };
        let mask = match (self.relu, cpu_slice::<T>(&rs, rl)) {
            (false, _) => None,
            (true, Some(m)) => Some(m),
            (true, None) => return Ok(None),
        };
        if dy.len() != xv.len() || mask.is_some_and(|m| m.len() != xv.len()) {
            return Ok(None);
        }
        let mut dx = vec![T::zero(); xv.len()];
        let mut dgamma = vec![0f64; gamma.len()];
        let mut dbeta = vec![0f64; gamma.len()];
        let dy_at = |i: usize| -> f64 {
            match mask {
                Some(m) if m[i].to_f64() <= 0.0 => 0.0,
                _ => dy[i].to_f64(),
            }
        };
        // a group of elements sharing statistics: contiguous runs (start offsets, all `len` long)
        // and its γ (per element of a run for LayerNorm, one per channel for BatchNorm)
        let mut group =
            |starts: &mut dyn Iterator<Item = usize>, len: usize, channel: Option<usize>| {
                let starts: Vec<usize> = starts.collect();
                let count = (starts.len() * len) as f64;
                let gamma_at = |j: usize| gamma[channel.unwrap_or(j)].to_f64();
                let (mut sum, mut sq) = (0f64, 0f64);
                for &s in &starts {
                    sum += xv[s..s + len].iter().map(|v| v.to_f64()).sum::<f64>();
                }
                let mean = sum / count;
                for &s in &starts {
                    sq += xv[s..s + len]
                        .iter()
                        .map(|v| (v.to_f64() - mean).powi(2))
                        .sum::<f64>();
                }
                let rstd = 1.0 / (sq / count + self.eps).sqrt();
                let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                for &s in &starts {
                    for j in 0..len {
                        let d = dy_at(s + j);
                        let xhat = (xv[s + j].to_f64() - mean) * rstd;
                        let gxhat = d * gamma_at(j);
                        sum_g += gxhat;
                        sum_gx += gxhat * xhat;
                        let p = channel.unwrap_or(j);
                        dgamma[p] += d * xhat;
                        dbeta[p] += d;
                    }
                }
                let (centre, proj) = (sum_g / count, sum_gx / count);
                for &s in &starts {
                    for j in 0..len {
                        let xhat = (xv[s + j].to_f64() - mean) * rstd;
                        let gxhat = dy_at(s + j) * gamma_at(j);
                        dx[s + j] = T::from_f64(rstd * (gxhat - centre - xhat * proj));
                    }
                }
            };
        match self.stats {
            Stats::Last => {
                let d = (*dims.last().unwrap_or(&1)).max(1);
                for row in 0..xv.len() / d {
                    group(&mut std::iter::once(row * d), d, None);
                }
            }
            Stats::Channels => {
                let (n, c) = (dims[0], dims[1]);
                let hw: usize = dims[2..].iter().product();
                for ch in 0..c {
                    group(&mut (0..n).map(|i| (i * c + ch) * hw), hw, Some(ch));
                }
            }
        }
        let dev = x.device();
        let param = |v: Vec<f64>| -> Result<Tensor> {
            let v: Vec<T> = v.into_iter().map(T::from_f64).collect();
            Tensor::from_vec(v, g.shape(), dev)
        };
        Ok(Some([
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(param(dgamma)?),
            if has_beta { Some(param(dbeta)?) } else { None },
        ]))
    }
}

optional_third_arg!(NormOp, "fused-rms-norm", "fused-layer-norm");

/// LayerNorm over the last dimension (`beta` given: one fused kernel in PyTorch, keeping its
/// input) or RMSNorm (`beta` None: composed in transformers, keeping its input, an fp32 copy of
/// a half input, and the normalized input before the weight), written in `out`.
pub fn norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
    out: DType,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let kept = if beta.is_none() {
        let xf = x.detach().to_dtype(DType::F32)?;
        let ms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?;
        let xhat = xf.broadcast_div(&ms.sqrt()?)?.to_dtype(x.dtype())?;
        // `weight * hidden` saves the normalised input only for the weight's gradient: a frozen
        // norm (LoRA's base) keeps it not
        let mut kept = Vec::new();
        if gamma.track_op() {
            kept.push(xhat);
        }
        if x.dtype() != DType::F32 {
            kept.push(xf);
        }
        Kept::new(kept)
    } else {
        Kept::default()
    };
    let op = NormOp {
        eps,
        rms: beta.is_none(),
        out: (out != x.dtype()).then_some(out),
        stats: Stats::Last,
        relu: false,
        kept,
    };
    match beta {
        Some(b) => x.apply_op3(gamma, b, op),
        None => x.apply_op2(gamma, op),
    }
}

/// The input gradient of [`norm`] over the last dimension of `x` (LayerNorm with `beta`,
/// RMSNorm without) for the output gradient `gy`, outside the graph: the backward of a norm whose
/// parameters are frozen, run by a node that holds only `x` ([`crate::harness::layers::frozen_ffn`]).
pub fn norm_input_grad(
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
    gy: &Tensor,
) -> Result<Tensor> {
    let op = NormOp {
        eps,
        rms: beta.is_none(),
        out: None,
        stats: Stats::Last,
        relu: false,
        kept: Kept::default(),
    };
    let (x, gamma) = (x.detach(), gamma.detach());
    let [gx, _, _] = op.grads(&x, &gamma, beta.is_some(), &x, gy)?;
    gx.ok_or_else(|| candle_core::Error::Msg("norm backward gave no input gradient".into()))
}

/// Training-mode BatchNorm of NCHW `x` (batch statistics), optionally followed by ReLU, one node.
pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, relu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let op = NormOp {
        eps: 1e-5,
        rms: false,
        out: None,
        stats: Stats::Channels,
        relu,
        kept: Kept::default(),
    };
    x.contiguous()?.apply_op3(
        &gamma.reshape((1, c, 1, 1))?,
        &beta.reshape((1, c, 1, 1))?,
        op,
    )
}

struct SeedNormOp {
    norm: NormOp,
    /// the norm output's gradient
    gy: Tensor,
    out: Handed,
}

impl CustomOp3 for SeedNormOp {
    fn name(&self) -> &'static str {
        "grad-seed-norm"
    }
    handed_fwd!(a, b, c);
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _: &Tensor,
        res: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok(self.norm.grads(x, gamma, true, res, &self.gy)?.into())
    }
}

/// A scalar whose backward is that of training-mode BatchNorm (no ReLU) of `x` receiving the
/// output gradient `gy`: the root of a residual block's backward (`layers::cnn`) when the BN
/// output itself is not kept. torchvision adds the shortcut into the BN output in place, so
/// PyTorch holds the block's output once; here the output is computed outside the graph and held
/// once, as the next block's input, and this node injects its gradient into the BN.
pub fn seed_batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, gy: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    let op = SeedNormOp {
        norm: NormOp {
            eps: 1e-5,
            rms: false,
            out: None,
            stats: Stats::Channels,
            relu: false,
            kept: Kept::default(),
        },
        gy: gy.clone(),
        out: Handed::new(Tensor::zeros((), DType::F32, x.device())?),
    };
    x.contiguous()?.apply_op3(
        &gamma.reshape((1, c, 1, 1))?,
        &beta.reshape((1, c, 1, 1))?,
        op,
    )
}

/// A scalar whose backward is that of LayerNorm over the last dimension ([`norm`] with `beta`)
/// of `x` receiving the output gradient `gy`: the root of a post-norm block segment's backward
/// (`layers::transformer`), whose output is computed outside the graph and held once, as the next
/// segment's input (PyTorch holds a LayerNorm's output once: the next layer saves it).
pub fn seed_layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    gy: &Tensor,
) -> Result<Tensor> {
    let op = SeedNormOp {
        norm: NormOp {
            eps,
            rms: false,
            out: None,
            stats: Stats::Last,
            relu: false,
            kept: Kept::default(),
        },
        gy: gy.clone(),
        out: Handed::new(Tensor::zeros((), DType::F32, x.device())?),
    };
    x.contiguous()?.apply_op3(gamma, beta, op)
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and every input
    //! gradient agree to fp32 rounding.
    use super::super::loss::LogSoftmaxOp;
    use super::super::testing::{rand, same};
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn layer_norm_and_rms_norm() {
        let (x, g, b) = (rand(&[3, 4, 16], 9), rand(&[16], 10), rand(&[16], 11));
        same(
            &[x.clone(), g.clone(), b],
            |t| norm(&t[0], &t[1], Some(&t[2]), 1e-5, DType::F32),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5),
        );
        same(
            &[x, g],
            |t| norm(&t[0], &t[1], None, 1e-6, DType::F32),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-6),
        );
    }

    #[test]
    fn half_inputs_keep_their_dtype_and_fp32_statistics() {
        let x = (rand(&[2, 8], 17) * 100.0)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let g = Tensor::ones(8, DType::F16, &Device::Cpu).unwrap();
        let y = norm(&x, &g, None, 1e-6, x.dtype()).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        let rms = y
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        assert!((rms.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-2);
        let logp = x.apply_op1(LogSoftmaxOp).unwrap();
        assert_eq!(logp.dtype(), DType::F32);
    }

    /// The seeded BatchNorm (a residual block's backward root) gives the gradients BatchNorm's
    /// own backward gives for the same output gradient.
    #[test]
    fn seeded_batch_norm_matches_batch_norm_backward() {
        use super::super::testing::rel_err;
        use candle_core::Var;
        let inputs = [rand(&[3, 4, 5, 5], 30), rand(&[4], 31), rand(&[4], 32)];
        let gy = rand(&[3, 4, 5, 5], 33);
        let grads = |seeded: bool| {
            let v: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let (x, g, b) = (v[0].as_tensor(), v[1].as_tensor(), v[2].as_tensor());
            let root = if seeded {
                seed_batch_norm(x, g, b, &gy).unwrap()
            } else {
                (batch_norm(x, g, b, false).unwrap() * &gy)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let gs = root.backward().unwrap();
            v.iter()
                .map(|v| gs.get(v).unwrap().clone())
                .collect::<Vec<_>>()
        };
        for (i, (a, b)) in grads(true).iter().zip(&grads(false)).enumerate() {
            assert!(rel_err(a, b) < 1e-5, "grad {i}: {}", rel_err(a, b));
        }
    }
}
