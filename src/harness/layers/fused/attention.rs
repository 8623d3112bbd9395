//! Eager attention's probabilities `softmax(scale * q k^T + causal mask)` as one node keeping q,
//! k and the probabilities (the composed graph keeps the scores too).

use crate::harness::layers::handed::{handed_fwd, Handed};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Device, Layout, Result, Shape, Tensor, D};

/// `softmax(scale * q k^T + causal mask)` for `q, k: [b, a, s, d]`, one graph node keeping q, k
/// and the probabilities (what PyTorch's eager attention keeps).
struct AttnProbsOp {
    out: Handed,
    scale: f64,
}

impl CustomOp2 for AttnProbsOp {
    fn name(&self) -> &'static str {
        "fused-attention-probs"
    }
    handed_fwd!(q, k);
    /// dscores = p * (dp - sum(dp * p)); masked entries have p = 0 and get no gradient.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        gp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let p = p.detach();
        let dot = (gp * &p)?.sum_keepdim(D::Minus1)?;
        let gs = (gp.broadcast_sub(&dot)? * &p)?.affine(self.scale, 0.0)?;
        let gq = gs.matmul(&k.detach())?;
        let gk = gs.t()?.matmul(&q.detach())?;
        Ok((Some(gq), Some(gk)))
    }
}

/// The additive causal mask `[s, s]`: 0 on and below the diagonal, -inf above.
fn causal_mask(s: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (s, s), device)
}

/// The probabilities' value, step by step as transformers' eager attention computes them: each
/// step makes one new score-sized tensor and frees the one before (the assignments below drop
/// the old value), so at most two are live, as in PyTorch; the softmax is candle's fused kernel,
/// which, like PyTorch's, allocates only its output.
///
/// `f32_softmax`: the scaled scores are cast to fp32 before the mask and the softmax, and the
/// probabilities are returned in fp32, as transformers' Llama-family attention computes
/// `softmax(scores, dtype=float32)` (its additive mask is fp32 too) and as autocast runs softmax
/// on CUDA.
pub fn probs_value(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    causal: bool,
    f32_softmax: bool,
) -> Result<Tensor> {
    let mut scores = q.matmul(&k.t()?)?;
    scores = scores.affine(scale, 0.0)?;
    if f32_softmax {
        scores = scores.to_dtype(candle_core::DType::F32)?;
    }
    if causal {
        let mask = causal_mask(q.dim(2)?, q.device())?.to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&mask)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Attention probabilities for `q, k: [b, a, s, d]` (contiguous).
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (q, k) = (q.contiguous()?, k.contiguous()?);
    let out = Handed::new(probs_value(&q.detach(), &k.detach(), scale, causal, false)?);
    q.apply_op2(&k, AttnProbsOp { out, scale })
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and every input
    //! gradient agree to fp32 rounding.
    use super::super::testing::{rand, same};
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn attention_probs_causal_and_not() {
        let (q, k) = (rand(&[2, 3, 6, 4], 12), rand(&[2, 3, 6, 4], 13));
        for causal in [false, true] {
            same(
                &[q.clone(), k.clone()],
                |t| attention_probs(&t[0], &t[1], 0.5, causal),
                |t| {
                    let mut s = (t[0].matmul(&t[1].t()?)? * 0.5)?;
                    if causal {
                        let m: Vec<f32> = (0..6)
                            .flat_map(|i| {
                                (0..6).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })
                            })
                            .collect();
                        s = s.broadcast_add(&Tensor::from_vec(m, (6, 6), &Device::Cpu)?)?;
                    }
                    candle_nn::ops::softmax(&s, D::Minus1)
                },
            );
        }
    }

    /// An fp32 softmax over half-precision q, k, v (transformers' Llama-family attention, and
    /// autocast's on CUDA): output and gradients equal the same attention computed in fp32
    /// from the half inputs, to half-precision rounding, with and without dropout.
    #[test]
    fn fp32_softmax_of_half_inputs_matches_the_fp32_attention() {
        use super::super::testing::close;
        use crate::harness::layers::joins::{eager_attention, Probs};
        let half = |t: Tensor| t.to_dtype(DType::F16).unwrap();
        let (q, k, v) = (
            half(rand(&[2, 3, 70, 8], 31)),
            half(rand(&[2, 3, 70, 8], 32)),
            half(rand(&[2, 3, 70, 8], 33)),
        );
        let keep: Vec<f32> = (0..2 * 3 * 70 * 70)
            .map(|i| if i % 5 == 0 { 0.0 } else { 1.25 })
            .collect();
        let fmask = Tensor::from_vec(keep, (2, 3, 70, 70), &Device::Cpu).unwrap();
        let hmask = half(fmask.clone());
        for causal in [false, true] {
            for drop in [false, true] {
                let probs = Probs {
                    scale: 0.35,
                    causal,
                    f32_softmax: true,
                };
                close(
                    &[q.clone(), k.clone(), v.clone()],
                    |t| {
                        let d = drop.then_some((&hmask, 0.2f32));
                        eager_attention(&t[0], &t[1], &t[2], probs, d, None)
                    },
                    |t| {
                        let f = |t: &Tensor| t.to_dtype(DType::F32);
                        let d = drop.then_some((&fmask, 0.2f32));
                        let p = Probs {
                            f32_softmax: false,
                            ..probs
                        };
                        eager_attention(&f(&t[0])?, &f(&t[1])?, &f(&t[2])?, p, d, None)?
                            .to_dtype(DType::F16)
                    },
                    2e-2,
                );
            }
        }
    }

    /// The eager-attention node (one node, softmax backward in row tiles, dropout inside) equals
    /// the composed graph, with and without dropout, for a float (CPU) and a u8 keep mask, and
    /// over more rows than one tile.
    #[test]
    fn eager_attention_matches_the_composed_graph() {
        let sh = [2, 2, 70, 4];
        let (q, k, v) = (rand(&sh, 30), rand(&sh, 31), rand(&sh, 32));
        let keep = rand(&[2, 2, 70, 70], 33).ge(-0.6).unwrap();
        let fmask = (keep.to_dtype(DType::F32).unwrap() / 0.8).unwrap();
        for causal in [false, true] {
            for mask in [None, Some(&fmask), Some(&keep)] {
                same(
                    &[q.clone(), k.clone(), v.clone()],
                    |t| {
                        let drop = mask.map(|m| (m, 0.2f32));
                        crate::harness::layers::joins::eager_attention(
                            &t[0],
                            &t[1],
                            &t[2],
                            crate::harness::layers::joins::Probs {
                                scale: 0.5,
                                causal,
                                f32_softmax: false,
                            },
                            drop,
                            None,
                        )
                    },
                    |t| {
                        let p = attention_probs(&t[0], &t[1], 0.5, causal)?;
                        let p = match mask {
                            Some(_) => p.mul(&fmask)?,
                            None => p,
                        };
                        p.matmul(&t[2])
                    },
                );
            }
        }
    }

    /// Selective recomputation (probabilities and dropout mask rebuilt in backward from the
    /// mask's site) gives the output and gradients of the attention that kept them.
    #[test]
    fn recomputed_eager_attention_matches_the_kept_one() {
        use crate::harness::layers::joins::eager_attention;
        use crate::harness::layers::params::MaskSite;
        let sh = [2, 2, 70, 4];
        let (q, k, v) = (rand(&sh, 40), rand(&sh, 41), rand(&sh, 42));
        for (causal, p) in [(false, 0.2f32), (true, 0.0)] {
            let site = MaskSite {
                seed: 7,
                p,
                site: 3,
                shape: (2, 2, 70, 70).into(),
                dtype: DType::F32,
                device: Device::Cpu,
            };
            let mask = site.mask().unwrap();
            assert_eq!(mask.is_some(), p > 0.0);
            let drop = mask.as_ref().map(|m| (m, p));
            let probs = crate::harness::layers::joins::Probs {
                scale: 0.5,
                causal,
                f32_softmax: false,
            };
            same(
                &[q.clone(), k.clone(), v.clone()],
                |t| eager_attention(&t[0], &t[1], &t[2], probs, drop, Some(site.clone())),
                |t| eager_attention(&t[0], &t[1], &t[2], probs, drop, None),
            );
        }
    }

    /// Flash attention with fewer K/V heads equals it on K/V repeated to all heads.
    #[test]
    fn flash_attention_grouped_query() {
        let (q, k, v) = (
            rand(&[1, 4, 70, 4], 34),
            rand(&[1, 2, 70, 4], 35),
            rand(&[1, 2, 70, 4], 36),
        );
        let rep = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as((1, 2, 2, 70, 4))?
                .reshape((1, 4, 70, 4))
        };
        same(
            &[q, k, v],
            |t| crate::harness::layers::flash::attention(&t[0], &t[1], &t[2], 0.5, true),
            |t| {
                crate::harness::layers::flash::attention(
                    &t[0],
                    &rep(&t[1])?,
                    &rep(&t[2])?,
                    0.5,
                    true,
                )
            },
        );
    }
}
