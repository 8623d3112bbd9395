//! The linear layer as one graph node keeping only its input, with the attention variants that
//! split the product into heads (fused QKV) or read a head-shaped input as merged, without
//! keeping the reshaped copies.

use super::kernels::*;
use candle_core::backend::BackendStorage;
use candle_core::op::{self as kern};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// `x @ w^T (+ b)` for `x: [n, k]`, `w: [o, k]` (PyTorch's weight layout).
fn linear_fwd<S: BackendStorage>(
    x: View<S>,
    (w, wl): View<S>,
    bias: Option<View<S>>,
) -> Result<Buf<S>> {
    let (n, k) = x.1.shape().dims2()?;
    let o = wl.dims()[0];
    let wt = wl.transpose(0, 1)?;
    let y = Buf::new(x.0.matmul(w, (1, n, o, k), x.1, &wt)?, (n, o));
    match bias {
        Some(b) => bcast::<S, kern::Add>(y.r(), b),
        None => Ok(y),
    }
}

/// Head layout of attention tensors: `[batch, heads, seq, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub b: usize,
    pub a: usize,
    pub s: usize,
    pub d: usize,
}

/// Axis order taking `[b, s, g, a, d]` to `[g, b, a, s, d]`, and back.
const SPLIT: [usize; 5] = [2, 0, 3, 1, 4];
const UNSPLIT: [usize; 5] = [1, 3, 0, 2, 4];

/// Linear layer as one graph node. `split: (heads, g)`: the output `[b*s, g*a*d]` is returned
/// as `g` groups of attention heads `[g, b, a, s, d]` (fused QKV: g = 3) without keeping the
/// unsplit product; `merge`: the input is `[b, a, s, d]` and is read as `[b*s, a*d]` without
/// keeping a merged copy.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LinearOp {
    pub(crate) split: Option<(Heads, usize)>,
    pub(crate) merge: Option<Heads>,
}

impl LinearOp {
    /// The head layouts below are built from `Heads`, so they are checked against the real sizes
    /// first (a mismatch would read out of bounds in a strided copy).
    fn check_heads(&self, x: &Layout, w: &Layout) -> Result<()> {
        let (o, k) = w.shape().dims2()?;
        let n = x.shape().elem_count() / k.max(1);
        if let Some(h) = self.merge {
            if x.dims() != [h.b, h.a, h.s, h.d] || h.a * h.d != k {
                candle_core::bail!(
                    "head merge: input {:?} is not {h:?} for a [{o}, {k}] weight",
                    x.dims()
                );
            }
        }
        if let Some((h, g)) = self.split {
            if n != h.b * h.s || o != g * h.a * h.d {
                candle_core::bail!("head split: {n} rows x {o} outputs do not make {g} x {h:?}");
            }
        }
        Ok(())
    }

    fn fwd<S: Store>(&self, x: View<S>, w: View<S>, b: Option<View<S>>) -> Result<(S, Shape)> {
        self.check_heads(x.1, w.1)?;
        let merged;
        let x2;
        let x = match self.merge {
            Some(h) => {
                // [b, a, s, d] read as [b, s, a, d]: transpose the input's own layout.
                merged = contiguous(x.0, &x.1.transpose(1, 2)?)?;
                x2 = Layout::contiguous((h.b * h.s, h.a * h.d));
                (&merged.s, &x2)
            }
            None => {
                let dims = x.1.dims();
                let k = dims[dims.len() - 1];
                let n = x.1.shape().elem_count() / k;
                if !x.1.is_contiguous() {
                    candle_core::bail!("fused linear needs a contiguous input");
                }
                x2 = Layout::contiguous_with_offset((n, k), x.1.start_offset());
                (x.0, &x2)
            }
        };
        let y = linear_fwd(x, w, b)?;
        match self.split {
            Some((h, g)) => {
                // [b, s, g, a, d] -> [g, b, a, s, d]
                let l = Layout::contiguous((h.b, h.s, g, h.a, h.d)).permute(&SPLIT)?;
                Ok(contiguous(&y.s, &l)?.into_out())
            }
            None => Ok(y.into_out()),
        }
    }

    /// Gradients of input, weight and bias. Only `x` (and the weight) were kept; the merged
    /// input is recomputed when needed.
    pub(crate) fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_bias: bool,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        // a frozen weight (LoRA's base: a plain tensor) gets no gradient, an input that needs
        // none (a frozen first block's) neither
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let (x, w) = (x.detach(), w.detach());
        let o = w.dim(0)?;
        let g2 = match self.split {
            Some(_) => g.permute(UNSPLIT)?.contiguous()?.reshape(((), o))?,
            None => g.reshape(((), o))?,
        };
        let x2 = match self.merge {
            Some(h) => x
                .transpose(1, 2)?
                .contiguous()?
                .reshape((h.b * h.s, h.a * h.d))?,
            None => x.reshape(((), w.dim(1)?))?,
        };
        let gw = need_w.then(|| g2.t()?.matmul(&x2)).transpose()?;
        let gx = need_x
            .then(|| self.input_layout(g2.matmul(&w)?, &x))
            .transpose()?;
        let gb = if has_bias && need_w {
            Some(g2.sum(0)?)
        } else {
            None
        };
        Ok([gx, gw, gb])
    }

    /// An input gradient computed as `[b*s, in]` in the input's own layout: heads
    /// `[b, a, s, d]` for a merged-heads input, else the input's shape.
    pub(crate) fn input_layout(&self, gx: Tensor, x: &Tensor) -> Result<Tensor> {
        match self.merge {
            Some(h) => gx
                .reshape((h.b, h.s, h.a, h.d))?
                .transpose(1, 2)?
                .contiguous(),
            None => gx.reshape(x.shape()),
        }
    }

    fn out_shape(&self, x: &Tensor, o: usize) -> Result<Vec<usize>> {
        if let Some((h, g)) = self.split {
            return Ok(vec![g, h.b, h.a, h.s, h.d]);
        }
        Ok(match self.merge {
            Some(h) => vec![h.b, h.s, o],
            None => {
                let mut d = x.dims().to_vec();
                *d.last_mut().expect("rank >= 1") = o;
                d
            }
        })
    }
}

optional_third_arg!(LinearOp, "fused-linear", "fused-linear-bias");

/// `x @ w^T + b` over the last dimension of `x` (any rank), one graph node.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with(LinearOp::default(), x, w, b)
}

/// Linear whose output is split into `groups` sets of attention heads `[groups, b, a, s, d]`.
pub fn linear_split_heads(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    h: Heads,
    groups: usize,
) -> Result<Tensor> {
    let op = LinearOp {
        split: Some((h, groups)),
        merge: None,
    };
    linear_with(op, x, w, b)
}

/// Linear reading attention heads `[b, a, s, d]` as `[b, s, a*d]`.
pub fn linear_merge_heads(x: &Tensor, w: &Tensor, b: Option<&Tensor>, h: Heads) -> Result<Tensor> {
    linear_with(
        LinearOp {
            split: None,
            merge: Some(h),
        },
        x,
        w,
        b,
    )
}

fn linear_with(op: LinearOp, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let shape = op.out_shape(&x, w.dim(0)?)?;
    let y = match b {
        Some(b) => x.apply_op3(w, b, op)?,
        None => x.apply_op2(w, op)?,
    };
    y.reshape(shape)
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and every input
    //! gradient agree to fp32 rounding.
    use super::super::testing::{rand, same};
    use super::*;

    #[test]
    fn linear_with_and_without_bias() {
        let (x, w, b) = (rand(&[2, 5, 6], 1), rand(&[7, 6], 2), rand(&[7], 3));
        same(
            &[x.clone(), w.clone(), b],
            |t| linear(&t[0], &t[1], Some(&t[2])),
            |t| t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2]),
        );
        same(
            &[x, w],
            |t| linear(&t[0], &t[1], None),
            |t| t[0].broadcast_matmul(&t[1].t()?),
        );
    }

    #[test]
    fn linear_split_and_merge_heads() {
        let h = Heads {
            b: 2,
            a: 3,
            s: 5,
            d: 4,
        };
        let (x, w, b) = (rand(&[2, 5, 8], 4), rand(&[36, 8], 5), rand(&[36], 6));
        same(
            &[x, w, b],
            |t| linear_split_heads(&t[0], &t[1], Some(&t[2]), h, 3),
            |t| {
                t[0].broadcast_matmul(&t[1].t()?)?
                    .broadcast_add(&t[2])?
                    .reshape((2, 5, 3, 3, 4))?
                    .permute((2, 0, 3, 1, 4))
            },
        );
        let (x, w) = (rand(&[2, 3, 5, 4], 7), rand(&[6, 12], 8));
        same(
            &[x, w],
            |t| linear_merge_heads(&t[0], &t[1], None, h),
            |t| {
                t[0].transpose(1, 2)?
                    .reshape((2, 5, 12))?
                    .broadcast_matmul(&t[1].t()?)
            },
        );
    }

    #[test]
    fn head_sizes_that_do_not_match_the_weight_are_refused() {
        let h = Heads {
            b: 2,
            a: 3,
            s: 5,
            d: 4,
        };
        let (x, w) = (rand(&[2, 5, 8], 40), rand(&[30, 8], 41));
        assert!(linear_split_heads(&x, &w, None, h, 3).is_err());
    }
}
