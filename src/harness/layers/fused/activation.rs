//! FFN activations (tanh GELU, SiLU) as one node keeping only the input, with a backward that
//! stays finite in half precision, and transformers' composed `gelu_new` with what it holds.

use super::kernels::*;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::{self as kern};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// Elementwise activation of an FFN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    /// GELU, tanh approximation (GPT-2's `gelu_new`, candle's `gelu`)
    Gelu,
    /// SiLU (x * sigmoid(x)), the gate of SwiGLU
    Silu,
}

/// An FFN activation as one node keeping only its input; candle's own GELU backward builds
/// about 20 input-sized temporaries (measured), PyTorch's fused kernel one.
#[derive(Debug, Clone, Copy)]
struct ActOp(Act);

impl ActOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>) -> Result<(S, Shape)> {
        Ok(match self.0 {
            Act::Gelu => unary::<S, kern::Gelu>(x)?,
            Act::Silu => unary::<S, kern::Silu>(x)?,
        }
        .into_out())
    }
}

impl CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "fused-activation"
    }
    device_fwd1!();
    fn bwd(&self, x: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.apply_op2_no_bwd(&x.detach(), &ActGradOp(self.0))?))
    }
}

/// `g * act'(x)`, composed so that at most a few input-sized temporaries are alive at once.
#[derive(Debug, Clone, Copy)]
struct ActGradOp(Act);

impl ActGradOp {
    /// Runs [`Self::part`] over blocks of `ACT_CHUNK` elements into one output buffer, so that
    /// the temporaries are block-sized and the op allocates one input-sized tensor, as PyTorch's
    /// fused activation backward does.
    fn fwd<S: Store>(&self, g: View<S>, x: View<S>) -> Result<(S, Shape)> {
        const ACT_CHUNK: usize = 1 << 13;
        let n = x.1.shape().elem_count();
        if n <= ACT_CHUNK || !x.1.is_contiguous() || !g.1.is_contiguous() {
            return Ok(self.part(g, x)?.into_out());
        }
        let shape = x.1.shape().clone();
        let mut dst = x.0.device().zeros_impl(&shape, x.0.dtype())?;
        let mut start = 0;
        while start < n {
            let len = ACT_CHUNK.min(n - start);
            let gl = Layout::contiguous_with_offset(len, g.1.start_offset() + start);
            let xl = Layout::contiguous_with_offset(len, x.1.start_offset() + start);
            let part = self.part((g.0, &gl), (x.0, &xl))?;
            part.s.copy_strided_src(&mut dst, start, &part.l)?;
            start += len;
        }
        Ok((dst, shape))
    }

    fn part<S: Store>(&self, g: View<S>, x: View<S>) -> Result<Buf<S>> {
        let mul = |a: &Buf<S>, b: View<S>| -> Result<Buf<S>> {
            Ok(Buf::new(
                a.s.binary_impl::<kern::Mul>(b.0, &a.l, b.1)?,
                a.l.shape().clone(),
            ))
        };
        let d = match self.0 {
            Act::Gelu => {
                // d = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3k x^2),  t = tanh(c (x + k x^3)).
                // x is clamped to [-10, 10] first: d is 0 or 1 to any float precision beyond,
                // and in f16 x^2 overflows from |x| = 256, which would make 0 * inf = NaN.
                let clamped = clamp(x, 10.0)?;
                let x = clamped.r();
                let (c, k) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
                let x2 = unary::<S, kern::Sqr>(x)?;
                let inner = mul(&affine(x2.r(), k, 1.0)?, x)?;
                let t = unary::<S, kern::Tanh>(affine(inner.r(), c, 0.0)?.r())?;
                drop(inner);
                let half_1pt = affine(t.r(), 0.5, 0.5)?;
                let one_m_t2 = affine(unary::<S, kern::Sqr>(t.r())?.r(), -1.0, 1.0)?;
                drop(t);
                let slope = affine(x2.r(), 3.0 * k * c * 0.5, c * 0.5)?;
                drop(x2);
                let r = mul(&mul(&one_m_t2, slope.r())?, x)?;
                drop((one_m_t2, slope));
                Buf::new(
                    half_1pt
                        .s
                        .binary_impl::<kern::Add>(&r.s, &half_1pt.l, &r.l)?,
                    half_1pt.l.shape().clone(),
                )
            }
            Act::Silu => {
                // d = s (1 + x (1 - s)),  s = sigmoid(x) = 1 / (1 + exp(-x))
                let e = unary::<S, kern::Exp>(affine(x, -1.0, 0.0)?.r())?;
                let sig = unary::<S, kern::Recip>(affine(e.r(), 1.0, 1.0)?.r())?;
                drop(e);
                let t = affine(mul(&affine(sig.r(), -1.0, 1.0)?, x)?.r(), 1.0, 1.0)?;
                mul(&sig, t.r())?
            }
        };
        mul(&d, g)
    }
}

impl CustomOp2 for ActGradOp {
    fn name(&self) -> &'static str {
        "fused-activation-grad"
    }
    device_fwd2!();
}

/// `x` limited to `[-bound, bound]`, in its own dtype.
fn clamp<S: Store>(x: View<S>, bound: f32) -> Result<Buf<S>> {
    let limit = |v: f32| -> Result<Buf<S>> {
        let one = Buf::new(x.0.device().storage_from_slice(&[v])?, 1);
        let one = cast(one.r(), x.0.dtype())?;
        Ok(Buf {
            l: one.l.broadcast_as(x.1.shape())?,
            s: one.s,
        })
    };
    let (hi, lo) = (limit(bound)?, limit(-bound)?);
    let below = Buf::new(
        x.0.binary_impl::<kern::Minimum>(&hi.s, x.1, &hi.l)?,
        x.1.shape().clone(),
    );
    Ok(Buf::new(
        below
            .s
            .binary_impl::<kern::Maximum>(&lo.s, &below.l, &lo.l)?,
        x.1.shape().clone(),
    ))
}

/// GELU (tanh approximation) or SiLU of `x`, one node.
pub fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActOp(act))
}

/// `g * act'(x)` for the gradient `g` of `activation(x, act)`, outside any graph.
pub fn activation_grad(g: &Tensor, x: &Tensor, act: Act) -> Result<Tensor> {
    g.contiguous()?
        .apply_op2_no_bwd(&x.detach().contiguous()?, &ActGradOp(act))
}

/// transformers' `gelu_new` (GPT-2's default): the tanh GELU composed of elementwise ops, whose
/// autograd keeps, besides the input, `tanh(..)`, `1 + tanh(..)` and `x / 2` (the harness computes
/// with the fused tanh GELU and holds those three until backward).
#[derive(Debug, Clone)]
struct GeluNewOp(Kept);

impl GeluNewOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>) -> Result<(S, Shape)> {
        ActOp(Act::Gelu).fwd(x)
    }
}

impl CustomOp1 for GeluNewOp {
    fn name(&self) -> &'static str {
        "gelu-new"
    }
    device_fwd1!();
    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let _kept = self.0.release();
        ActOp(Act::Gelu).bwd(x, res, g)
    }
}

/// `gelu_new(x)`, holding what PyTorch's composed version holds.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let kept = {
        let xd = x.detach();
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let inner = (((xd.sqr()? * &xd)? * 0.044715)? + &xd)?;
        let t = (inner * c)?.tanh()?;
        let one_plus = (&t + 1.0)?;
        let half = (&xd * 0.5)?;
        Kept::new(vec![t, one_plus, half])
    };
    x.apply_op1(GeluNewOp(kept))
}

#[cfg(test)]
mod tests {
    //! Against the same function composed from candle's primitive ops: outputs and every input
    //! gradient agree to fp32 rounding.
    use super::super::testing::{rand, rel_err, same};
    use super::*;
    use candle_core::{DType, Device, Tensor, Var};

    /// The gradients of `sum(y · r)`: `r` back-propagated from `y`.
    fn project_back(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
        (y * r).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// The feed-forward term `linear(act(h))` ([`crate::harness::layers::joins::ActLinear`]):
    /// its value and the gradients its backward root gives h, the weight and the bias equal the
    /// composed graph's, with and without a bias.
    #[test]
    fn activation_linear_term_matches_the_composed_graph() {
        use crate::harness::layers::joins::ActLinear;
        let (h, w, b) = (rand(&[2, 5, 12], 41), rand(&[7, 12], 42), rand(&[7], 43));
        let r = rand(&[2, 5, 7], 44);
        for with_bias in [false, true] {
            let vars = [&h, &w, &b].map(|t| Var::from_tensor(t).unwrap());
            let bias = with_bias.then(|| vars[2].as_tensor().clone());
            let composed = {
                let a = activation(vars[0].as_tensor(), Act::Gelu).unwrap();
                let y = a
                    .broadcast_matmul(&vars[1].as_tensor().t().unwrap())
                    .unwrap();
                match &bias {
                    Some(b) => y.broadcast_add(b).unwrap(),
                    None => y,
                }
            };
            let gs = project_back(&composed, &r);
            let term = ActLinear::new(
                vars[0].as_tensor().clone(),
                Act::Gelu,
                vars[1].as_tensor().clone(),
                bias,
                None,
            );
            let y = term.value().unwrap();
            assert!(rel_err(&y, &composed) < 1e-5);
            let gt = term.root(&r).unwrap().backward().unwrap();
            let n = if with_bias { 3 } else { 2 };
            for v in &vars[..n] {
                let (a, e) = (gt.get(v).unwrap(), gs.get(v).unwrap());
                assert!(rel_err(a, e) < 1e-5, "{}", rel_err(a, e));
            }
            // the same as a residual join: the residual's gradient is `r`, stashed
            let resid = rand(&[2, 5, 7], 45);
            let stash = crate::harness::layers::joins::Stash::default();
            let out = crate::harness::layers::joins::act_linear_residual(
                &resid,
                vars[0].as_tensor(),
                Act::Gelu,
                vars[1].as_tensor(),
                with_bias.then(|| vars[2].as_tensor()),
                &stash,
                None,
            )
            .unwrap();
            assert!(rel_err(&out, &(&composed + &resid).unwrap()) < 1e-5);
            let gj = project_back(&out, &r);
            for v in &vars[..n] {
                let (a, e) = (gj.get(v).unwrap(), gs.get(v).unwrap());
                assert!(rel_err(a, e) < 1e-5, "{}", rel_err(a, e));
            }
            let g_resid = crate::harness::layers::joins::take_stash(&stash).unwrap();
            assert!(rel_err(&g_resid.reshape(r.shape()).unwrap(), &r) < 1e-6);
        }
    }

    /// The SwiGLU term `linear(silu(gate) · up)` ([`crate::harness::layers::joins::SwiGluLinear`]):
    /// its value and the gradients its root gives gate, up and the weight equal the composed
    /// graph's.
    #[test]
    fn swiglu_term_matches_the_composed_graph() {
        use crate::harness::layers::joins::SwiGluLinear;
        let (g, u, w) = (
            rand(&[2, 5, 12], 51),
            rand(&[2, 5, 12], 52),
            rand(&[7, 12], 53),
        );
        let r = rand(&[2, 5, 7], 54);
        let vars = [&g, &u, &w].map(|t| Var::from_tensor(t).unwrap());
        let composed = {
            let s = activation(vars[0].as_tensor(), Act::Silu).unwrap();
            (s * vars[1].as_tensor())
                .unwrap()
                .broadcast_matmul(&vars[2].as_tensor().t().unwrap())
                .unwrap()
        };
        let gs = project_back(&composed, &r);
        let term = SwiGluLinear::new(
            vars[0].as_tensor().clone(),
            vars[1].as_tensor().clone(),
            vars[2].as_tensor().clone(),
            None,
        );
        assert!(rel_err(&term.value().unwrap(), &composed) < 1e-5);
        let gt = term.root(&r).unwrap().backward().unwrap();
        for v in &vars {
            let (a, e) = (gt.get(v).unwrap(), gs.get(v).unwrap());
            assert!(rel_err(a, e) < 1e-5, "{}", rel_err(a, e));
        }
    }

    #[test]
    fn half_gelu_gradient_stays_finite_where_x_squared_overflows() {
        let x = Var::from_tensor(
            &Tensor::new(&[-300f32, -3.0, 0.5, 300.0], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        )
        .unwrap();
        let y = activation(x.as_tensor(), Act::Gelu).unwrap();
        let g = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g
            .get(&x)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        assert!(g[0].abs() < 1e-3 && (g[3] - 1.0).abs() < 1e-3, "{g:?}");
    }

    #[test]
    fn gelu_and_silu() {
        let x = (rand(&[4, 33], 30) * 4.0).unwrap();
        same(
            std::slice::from_ref(&x),
            |t| activation(&t[0], Act::Gelu),
            |t| t[0].gelu(),
        );
        same(&[x], |t| activation(&t[0], Act::Silu), |t| t[0].silu());
    }
}
