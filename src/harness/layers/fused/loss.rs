//! The loss: an fp32 log-softmax over the last dimension (autocast runs the loss in fp32) and
//! cross-entropy on top of it.

use super::kernels::*;
use candle_core::backend::BackendStorage;
use candle_core::op::{self as kern, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Log-softmax over the last dimension, computed and returned in fp32 (autocast runs the loss
/// in fp32).
#[derive(Debug, Clone, Copy)]
pub(super) struct LogSoftmaxOp;

impl LogSoftmaxOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>) -> Result<(S, Shape)> {
        let xf = cast(x, DType::F32)?;
        let max = reduce_last(xf.r(), ReduceOp::Max)?;
        let diff = bcast::<S, kern::Sub>(xf.r(), max.r())?;
        drop(xf);
        let sum = reduce_last(unary::<S, kern::Exp>(diff.r())?.r(), ReduceOp::Sum)?;
        let lse = unary::<S, kern::Log>(sum.r())?;
        Ok(bcast::<S, kern::Sub>(diff.r(), lse.r())?.into_out())
    }
}

impl CustomOp1 for LogSoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-log-softmax"
    }
    device_fwd1!();
    fn bwd(&self, x: &Tensor, logp: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let sum = g.sum_keepdim(D::Minus1)?;
        let gx = (g - logp.detach().exp()?.broadcast_mul(&sum)?)?;
        Ok(Some(gx.to_dtype(x.dtype())?))
    }
}

/// fp32 log-softmax over the last dimension, outside the graph.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&LogSoftmaxOp)
}

/// Mean cross-entropy of `logits: [n, c]` (any float dtype) against class ids `[n]` (u32):
/// fp32 log-softmax (one node) then candle-nn's NLL (a gather).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = logits.contiguous()?.apply_op1(LogSoftmaxOp)?;
    candle_nn::loss::nll(&logp, targets)
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and every input
    //! gradient agree to fp32 rounding.
    use super::super::testing::{rand, same};
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn cross_entropy_matches_candle_nn() {
        let logits = rand(&[6, 10], 16);
        let targets = Tensor::new(&[1u32, 0, 9, 3, 3, 7], &Device::Cpu).unwrap();
        same(
            &[logits],
            |t| cross_entropy(&t[0], &targets),
            |t| candle_nn::loss::cross_entropy(&t[0], &targets),
        );
    }
}
