//! Fused attention for the harness, memory-shaped like PyTorch's `scaled_dot_product_attention`
//! kernels (FlashAttention-2, memory-efficient attention): `softmax(scale * q k^T + mask) v` as
//! one graph node that keeps only q, k, v and its output, and never materialises the whole
//! b·a·s² score matrix, forward or backward.
//!
//! Both passes walk the queries in row tiles: a tile's scores are `[b, a, t, s]` for `t` rows,
//! freed before the next tile. Backward recomputes each tile's probabilities from q and k (the
//! kernels' recomputation; a full row of keys is in every tile, so no running log-sum-exp is
//! needed) and accumulates dK and dV across tiles. Written with candle tensor ops on detached
//! tensors, so the same code runs on CPU and CUDA.
//!
//! Attention-probability dropout is not applied on this path (the CUDA kernels replay it from a
//! saved RNG state, which costs no memory); the residual dropouts are unchanged.

use super::handed::{handed_fwd, Handed};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Most query rows per tile: a tile's scores are `b·a·t·s` elements, a small fraction of `s²`.
pub const TILE: usize = 64;

/// Query rows per tile for head size `d`: an eighth of `d`, so that each of the few score-tile
/// temporaries is an eighth of q's size. PyTorch's CPU flash kernel works in per-thread blocks
/// and its backward allocates little beyond dQ, dK and dV (measured: 1 MB over its start on a
/// BERT step whose q is 1 MB); 64-row tiles held about 6 MB there.
fn tile_rows(d: usize) -> usize {
    (d / 8).clamp(1, TILE)
}

/// The additive causal mask of query rows `r0..r0+t` against all `s` keys.
fn causal_mask(
    r0: usize,
    t: usize,
    s: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let m: Vec<f32> = (r0..r0 + t)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, s), dev)?.to_dtype(dtype)
}

/// Probabilities of query rows `r0..r0+t`: `[b, a, t, s]`.
fn tile_probs(
    q: &Tensor,
    kt: &Tensor,
    r0: usize,
    t: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let s = kt.dim(D::Minus1)?;
    let scores = (q.narrow(2, r0, t)?.contiguous()?.matmul(kt)? * scale)?;
    let scores = if causal {
        scores.broadcast_add(&causal_mask(r0, t, s, q.dtype(), q.device())?)?
    } else {
        scores
    };
    candle_nn::ops::softmax_last_dim(&scores)
}

/// `k` or `v` with `kv` heads repeated to `heads` (grouped-query attention; a transient copy).
fn repeat_kv(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, kv, s, d) = t.dims4()?;
    if kv == heads {
        return Ok(t.clone());
    }
    t.unsqueeze(2)?
        .broadcast_as((b, kv, heads / kv, s, d))?
        .reshape((b, heads, s, d))
}

/// The gradient of a repeated `k` or `v` summed back onto its `kv` heads.
fn unrepeat(g: Tensor, kv: usize) -> Result<Tensor> {
    let (b, heads, s, d) = g.dims4()?;
    if kv == heads {
        return Ok(g);
    }
    g.reshape((b, kv, heads / kv, s, d))?.sum(2)
}

fn tiles(s: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..s).step_by(rows).map(move |r0| (r0, rows.min(s - r0)))
}

/// The graph node: its forward hands over the output computed tile by tile (taken once, so the
/// op stored in the graph does not keep a second copy alive); its backward is the tiled one.
struct FlashAttnOp {
    out: Handed,
    scale: f64,
    causal: bool,
}

impl CustomOp3 for FlashAttnOp {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    handed_fwd!(q, k, v);

    /// Per tile: P from q, k; dV += Pᵀ dO; dP = dO vᵀ; dS = P ∘ (dP − rowsum(dO ∘ O)) · scale;
    /// dQ = dS k; dK += dSᵀ q.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (heads, kv) = (q.dim(1)?, k.dim(1)?);
        let (q, out) = (q.detach(), out.detach());
        let (k, v) = (
            repeat_kv(&k.detach(), heads)?,
            repeat_kv(&v.detach(), heads)?,
        );
        let grad = grad.contiguous()?;
        let kt = k.t()?.contiguous()?;
        let vt = v.t()?.contiguous()?;
        let rows = (&grad * &out)?.sum_keepdim(D::Minus1)?;
        let (s, d) = (q.dim(2)?, q.dim(3)?);
        let dq = q.zeros_like()?;
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        for (r0, t) in tiles(s, tile_rows(d)) {
            let p = tile_probs(&q, &kt, r0, t, self.scale, self.causal)?;
            let g = grad.narrow(2, r0, t)?.contiguous()?;
            dv = (dv + p.t()?.contiguous()?.matmul(&g)?)?;
            let dp = g.matmul(&vt)?;
            let ds =
                ((p * dp.broadcast_sub(&rows.narrow(2, r0, t)?.contiguous()?)?)? * self.scale)?;
            dq.slice_set(&ds.matmul(&k)?, 2, r0)?;
            dk = (dk
                + ds.t()?
                    .contiguous()?
                    .matmul(&q.narrow(2, r0, t)?.contiguous()?)?)?;
        }
        Ok((Some(dq), Some(unrepeat(dk, kv)?), Some(unrepeat(dv, kv)?)))
    }
}

/// `softmax(scale * q k^T [+ causal mask]) v` for `q: [b, a, s, d]`, `k, v: [b, kv, s, d]` (`kv`
/// divides `a`: grouped-query attention, as sdpa's `enable_gqa`), keeping q, k, v and the output
/// for backward, like PyTorch's fused kernels (which also keep an fp32 log-sum-exp of `b·a·s`,
/// recomputed here instead). K and V are repeated to all heads only transiently.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = {
        let heads = q.dim(1)?;
        let (qd, vd) = (q.detach(), repeat_kv(&v.detach(), heads)?);
        let kt = repeat_kv(&k.detach(), heads)?.t()?.contiguous()?;
        let (s, d) = (q.dim(2)?, q.dim(3)?);
        let (b, a, _, dv) = vd.dims4()?;
        let out = Tensor::zeros((b, a, s, dv), q.dtype(), q.device())?;
        for (r0, t) in tiles(s, tile_rows(d)) {
            out.slice_set(
                &tile_probs(&qd, &kt, r0, t, scale, causal)?.matmul(&vd)?,
                2,
                r0,
            )?;
        }
        out
    };
    let op = FlashAttnOp {
        out: Handed::new(out),
        scale,
        causal,
    };
    q.apply_op3(&k, &v, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and all three gradients equal the composed softmax(QK^T)V (which materialises the
    /// whole score matrix), causal and not, over a length that is not a multiple of the tile.
    #[test]
    fn matches_composed_attention_and_its_gradients() {
        let dev = Device::Cpu;
        let (b, a, s, d) = (2, 3, TILE + 37, 16);
        for causal in [false, true] {
            let mk = |seed: f64| -> Var {
                let n = b * a * s * d;
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i as f64 * seed).sin() * 0.5) as f32)
                    .collect();
                Var::from_tensor(&Tensor::from_vec(x, (b, a, s, d), &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (mk(0.37), mk(0.91), mk(1.7));
            let w = Tensor::from_vec(
                (0..b * a * s * d)
                    .map(|i| ((i % 7) as f32) - 3.0)
                    .collect::<Vec<_>>(),
                (b, a, s, d),
                &dev,
            )
            .unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let fused =
                attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, causal).unwrap();
            let scores =
                (q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap() * scale).unwrap();
            let scores = if causal {
                scores
                    .broadcast_add(&causal_mask(0, s, s, DType::F32, &dev).unwrap())
                    .unwrap()
            } else {
                scores
            };
            // candle_nn's composed softmax (differentiable), not the fused last-dim kernel
            let composed = candle_nn::ops::softmax(&scores, D::Minus1)
                .unwrap()
                .matmul(v.as_tensor())
                .unwrap();
            let diff = crate::harness::compare::max_abs(&(&fused - &composed).unwrap()).unwrap();
            assert!(diff < 1e-5, "causal {causal}: output differs by {diff}");
            let gf = (&fused * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (&composed * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = gf.get(var.as_tensor()).expect("fused gradient");
                let c = gc.get(var.as_tensor()).expect("composed gradient");
                let diff = crate::harness::compare::max_abs(&(a - c).unwrap()).unwrap();
                assert!(diff < 1e-4, "causal {causal}: d{name} differs by {diff}");
            }
        }
    }
}
