//! The CNN's residual join `relu(a + b)` as a single node (used for residual blocks nested inside
//! a branch; top-level blocks join outside the graph, `layers::cnn`). A conv's bias and ReLU run
//! inside the conv node (`layers::conv`).

use super::kernels::*;
use candle_core::backend::BackendStorage;
use candle_core::op::{self as kern};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `relu(a + b)` for same-shape tensors (a residual join), one node keeping only the output.
#[derive(Debug, Clone, Copy)]
struct AddReluOp;

impl AddReluOp {
    fn fwd<S: BackendStorage>(&self, a: View<S>, b: View<S>) -> Result<(S, Shape)> {
        let sum = Buf::new(
            a.0.binary_impl::<kern::Add>(b.0, a.1, b.1)?,
            a.1.shape().clone(),
        );
        Ok(unary::<S, kern::Relu>(sum.r())?.into_out())
    }
}

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "fused-add-relu"
    }
    device_fwd2!();
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = (g * res.detach().gt(0.0)?.to_dtype(g.dtype())?)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `relu(a + b)`: the residual join of a ResNet block.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and every input
    //! gradient agree to fp32 rounding.
    use super::super::testing::{rand, same};
    use super::super::*;
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn batch_norm_relu_and_add_relu() {
        let (x, g, b) = (rand(&[3, 4, 5, 5], 20), rand(&[4], 21), rand(&[4], 22));
        let bc = |t: &Tensor| t.reshape((1, 4, 1, 1));
        for relu in [false, true] {
            same(
                &[x.clone(), g.clone(), b.clone()],
                |t| batch_norm(&t[0], &t[1], &t[2], relu),
                |t| {
                    let xc = t[0].broadcast_sub(&t[0].mean_keepdim((0, 2, 3))?)?;
                    let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
                    let y = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
                    let y = y.broadcast_mul(&bc(&t[1])?)?.broadcast_add(&bc(&t[2])?)?;
                    if relu {
                        y.relu()
                    } else {
                        Ok(y)
                    }
                },
            );
        }
        same(
            &[x.clone(), rand(&[3, 4, 5, 5], 23)],
            |t| add_relu(&t[0], &t[1]),
            |t| (&t[0] + &t[1])?.relu(),
        );
    }
}
