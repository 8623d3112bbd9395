//! Inverted dropout as one node keeping its input and the keep mask (a 1-byte mask on CUDA, the
//! scaled float mask PyTorch's CPU kernel keeps), and the gradient through it.

use super::kernels::*;
use candle_core::backend::BackendStorage;
use candle_core::op::{self as kern};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Inverted dropout. The keep mask is either of `x`'s dtype holding 0 or `1 / (1 - p)` (what
/// PyTorch's CPU dropout keeps: its scaled noise tensor) or `u8` (1 = keep, what PyTorch's CUDA
/// kernel keeps as a bool mask).
#[derive(Debug, Clone, Copy)]
struct DropoutOp {
    scale: f64,
}

impl DropoutOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>, mask: View<S>) -> Result<(S, Shape)> {
        if mask.0.dtype() == x.0.dtype() {
            let y = x.0.binary_impl::<kern::Mul>(mask.0, x.1, mask.1)?;
            return Ok((y, x.1.shape().clone()));
        }
        let m = cast(mask, x.0.dtype())?;
        let y = Buf::new(
            x.0.binary_impl::<kern::Mul>(&m.s, x.1, &m.l)?,
            x.1.shape().clone(),
        );
        Ok(affine(y.r(), self.scale, 0.0)?.into_out())
    }
}

impl CustomOp2 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }
    device_fwd2!();
    fn bwd(
        &self,
        _: &Tensor,
        mask: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dropout_grad(g, mask, self.scale)?), None))
    }
}

/// The gradient through inverted dropout: `g * mask` for a mask of `g`'s dtype (one
/// allocation, as PyTorch's CPU backward), `g * mask * scale` for a `u8` mask.
pub(crate) fn dropout_grad(g: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if mask.dtype() == g.dtype() {
        return g.mul(&mask.reshape(g.shape())?);
    }
    (g * mask.reshape(g.shape())?.to_dtype(g.dtype())?)?.affine(scale, 0.0)
}

/// `x * mask / (1 - p)` with a keep mask of `x`'s shape (`DropoutOp`: `u8`, or of `x`'s dtype
/// holding the scaled values). A graph node keeping `x` and the mask; [`crate::harness::layers::joins`] has the
/// nodes that keep only the mask.
pub fn dropout(x: &Tensor, keep_mask: &Tensor, p: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &keep_mask.contiguous()?,
        DropoutOp {
            scale: 1.0 / (1.0 - p as f64),
        },
    )
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and every input
    //! gradient agree to fp32 rounding.
    use super::super::testing::{rand, same};
    use super::*;
    use candle_core::DType;

    #[test]
    fn dropout_matches_a_float_mask() {
        let x = rand(&[4, 9], 14);
        let keep = rand(&[4, 9], 15).ge(-0.6).unwrap();
        same(
            &[x],
            |t| dropout(&t[0], &keep, 0.2),
            |t| t[0].mul(&(keep.to_dtype(DType::F32)? / 0.8)?),
        );
    }
}
