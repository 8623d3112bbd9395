//! Max pooling with any kernel, stride and padding as one graph node keeping what PyTorch's
//! `max_pool2d_with_indices` keeps: the input and an int64 index per output element.
//!
//! Why: candle's own pooling backward supports only kernel == stride, and composing the ResNet
//! stem's 3x3/2 pool from k·k strided windows and `maximum` kept the padded copy, the row
//! selections, every window and every partial maximum for backward, about 6.75 times the
//! input where PyTorch keeps 1.5 times (fp32).

use super::handed::{handed_fwd, Handed};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Pads dims 2 and 3 of an NCHW tensor by `p` on each side with `value` (0 for average pooling,
/// -inf for max pooling so padding never wins).
pub(super) fn pad_hw(x: &Tensor, p: usize, value: f32) -> Result<Tensor> {
    if p == 0 {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p);
    }
    let (n, c, h, w) = x.dims4()?;
    let rows = Tensor::full(value, (n, c, p, w), x.device())?.to_dtype(x.dtype())?;
    let x = Tensor::cat(&[&rows, x, &rows], 2)?;
    let cols = Tensor::full(value, (n, c, h + 2 * p, p), x.device())?.to_dtype(x.dtype())?;
    Tensor::cat(&[&cols, &x, &cols], 3)
}

struct MaxPoolOp {
    /// The pooled output, computed before the node is made and moved out by its forward.
    out: Handed,
}

/// Ids `start, start + stride, ...` (n of them): the rows or columns of one window offset.
fn offsets(start: usize, n: usize, stride: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let ids: Vec<u32> = (0..n).map(|i| (start + i * stride) as u32).collect();
    Tensor::from_vec(ids, n, dev)
}

impl CustomOp2 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "max-pool2d-with-indices"
    }

    handed_fwd!(x, w);

    /// Adds each output gradient into the input element its index names (one scatter-add into
    /// a zeroed input-sized gradient, as PyTorch's `max_pool2d_with_indices_backward`).
    fn bwd(
        &self,
        x: &Tensor,
        indices: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let (_, _, ho, wo) = grad.dims4()?;
        let gx = Tensor::zeros((n, c, h * w), grad.dtype(), x.device())?;
        gx.scatter_add_set(
            &indices.reshape((n, c, ho * wo))?,
            &grad.detach().contiguous()?.reshape((n, c, ho * wo))?,
            2,
        )?;
        Ok((Some(gx.reshape((n, c, h, w))?), None))
    }
}

/// Max pooling (PyTorch semantics; padding never wins) as one node with the lean backward. The
/// index kept per output element is the flat position of its maximum in the input plane
/// (`y·W + x`, int64), as PyTorch's.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let xp = pad_hw(&x.detach(), pad, f32::NEG_INFINITY)?;
    let (n, c, _, w) = x.dims4()?;
    let (_, _, hp, wp) = xp.dims4()?;
    let (ho, wo) = ((hp - k) / stride + 1, (wp - k) / stride + 1);
    let dev = x.device();
    // flat input positions of one window offset's elements (padding positions never win: -inf)
    let positions = |di: usize, dj: usize| -> Result<Tensor> {
        let mut ids = Vec::with_capacity(ho * wo);
        for r in 0..ho {
            for col in 0..wo {
                let y = (r * stride + di) as i64 - pad as i64;
                let xx = (col * stride + dj) as i64 - pad as i64;
                ids.push(y * w as i64 + xx);
            }
        }
        Tensor::from_vec(ids, (1, 1, ho, wo), dev)?.broadcast_as((n, c, ho, wo))
    };
    let mut best: Option<(Tensor, Tensor)> = None;
    for di in 0..k {
        let rows = xp.index_select(&offsets(di, ho, stride, dev)?, 2)?;
        for dj in 0..k {
            let win = rows.index_select(&offsets(dj, wo, stride, dev)?, 3)?;
            let here = positions(di, dj)?;
            best = Some(match best {
                None => (win, here.contiguous()?),
                // strictly greater: the first maximum in the window wins, as in PyTorch
                Some((b, ids)) => {
                    let gt = win.gt(&b)?;
                    (gt.where_cond(&win, &b)?, gt.where_cond(&here, &ids)?)
                }
            });
        }
    }
    drop(xp);
    let (out, indices) = best.expect("kernel >= 1");
    debug_assert_eq!(indices.dtype(), DType::I64);
    let op = MaxPoolOp {
        out: Handed::new(out),
    };
    x.apply_op2(&indices, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::cnn::PoolKind;
    use candle_core::{Device, Var};

    /// Output and input gradient equal the composed pooling's (ResNet stem 3x3/2 pad 1, and an
    /// overlapping 3x3/1 window without padding).
    #[test]
    fn matches_the_composed_pooling() {
        let dev = Device::Cpu;
        for (k, stride, pad) in [(3, 2, 1), (3, 1, 0), (2, 2, 1)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 9, 9), &dev).unwrap()).unwrap();
            let ours = max_pool2d(x.as_tensor(), k, stride, pad).unwrap();
            let theirs = crate::harness::layers::ops::pool2d_composed(
                x.as_tensor(),
                PoolKind::Max,
                k,
                stride,
                pad,
            )
            .unwrap();
            let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            let w = Tensor::randn(0f32, 1., ours.shape(), &dev).unwrap();
            let go = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gt = (&theirs * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, b) = (
                go.get(x.as_tensor()).unwrap(),
                gt.get(x.as_tensor()).unwrap(),
            );
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                d.to_scalar::<f32>().unwrap() < 1e-6,
                "k{k} s{stride} p{pad}"
            );
        }
    }
}
