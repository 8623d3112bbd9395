//! LayerNorm, RMSNorm and training-mode BatchNorm (optionally followed by ReLU) as one graph node
//! keeping its input (and, for RMSNorm, what transformers' module keeps); statistics in fp32.

use super::kernels::*;
use candle_core::backend::BackendStorage;
use candle_core::op::{self as kern, ReduceOp};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
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
        let y = bcast::<S, kern::Mul>(xc.r(), rstd.r())?;
        let y = bcast::<S, kern::Mul>(y.r(), cast(g, DType::F32)?.r())?;
        let y = match b {
            Some(b) => bcast::<S, kern::Add>(y.r(), cast(b, DType::F32)?.r())?,
            None => y,
        };
        let y = if self.relu {
            unary::<S, kern::Relu>(y.r())?
        } else {
            y
        };
        Ok(cast(y.r(), dtype)?.into_out())
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

optional_third_arg!(NormOp, "fused-rms-norm", "fused-layer-norm");

/// LayerNorm over the last dimension (`beta` given: one fused kernel in PyTorch, keeping its
/// input) or RMSNorm (`beta` None: composed in transformers, keeping its input, an fp32 copy of
/// a half input, and the normalized input before the weight).
pub fn norm(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, eps: f64) -> Result<Tensor> {
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
        stats: Stats::Last,
        relu: false,
        kept,
    };
    match beta {
        Some(b) => x.apply_op3(gamma, b, op),
        None => x.apply_op2(gamma, op),
    }
}

/// Training-mode BatchNorm of NCHW `x` (batch statistics), optionally followed by ReLU, one node.
pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, relu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let op = NormOp {
        eps: 1e-5,
        rms: false,
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
            |t| norm(&t[0], &t[1], Some(&t[2]), 1e-5),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5),
        );
        same(
            &[x, g],
            |t| norm(&t[0], &t[1], None, 1e-6),
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
        let y = norm(&x, &g, None, 1e-6).unwrap();
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
}
