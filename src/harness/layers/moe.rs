//! The mixture-of-experts feed-forward (`spec::moe::Moe`), built as transformers 5 runs it on its
//! default `grouped_mm` experts path (`integrations/moe.py::grouped_mm_experts_forward`,
//! `MixtralTopKRouter`, `Qwen2MoeSparseMoeBlock`), keeping for backward what PyTorch keeps:
//!
//! | node | kept (besides parameters) | PyTorch |
//! |---|---|---|
//! | router linear | its input (compute dtype) | `F.linear` under autocast |
//! | [`route`] (fp32 softmax, top-k, renormalise) | fp32 probabilities `[T, E]`, top-k ids | `softmax(logits.float())`, `topk`, the sum |
//! | [`experts`] (gather, grouped gate/up, SiLU·up, grouped down) | the gathered rows `[S, h]`, gate/up `[S, 2f]`, SiLU output and product `[S, f]` each | `hidden_states[perm // k]`, `grouped_mm` inputs, `act_fn(gate) * up` |
//! | [`Routed`] (weight by the routing weights, scatter back to tokens) | the expert outputs `[S, h]`, the weights | `proj_out * sample_weights_g` |
//!
//! S = T·k routed (token, expert) pairs (dropless: every token reaches its k experts). The experts
//! run in the weights' dtype, as PyTorch's `grouped_mm` does (`input.to(weight.dtype)`, no
//! autocast): fp32 under mixed precision. Experts are stored fused as transformers 5 stores them,
//! `gate_up [E, 2f, h]` and `down [E, h, f]`. The shared expert (Qwen2-MoE, DeepSeek) is a SwiGLU
//! MLP over every token, scaled by `sigmoid(gate(x))` when the spec has the gate.

use super::fused::{self, Act};
use super::handed::{handed_fwd, Handed};
use super::ops::Linear;
use super::params::{Ctx, Init, ParamStore};
use crate::spec::moe::Moe;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    D,
};
use std::sync::Mutex;

/// One MoE block's feed-forward. Parameters live in the [`ParamStore`]; this holds indices.
#[derive(Debug)]
pub struct MoeFfn {
    router: Linear,
    gate_up: usize,
    down: usize,
    experts: usize,
    top_k: usize,
    f: usize,
    shared: Option<Shared>,
}

#[derive(Debug)]
struct Shared {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// `h -> 1` sigmoid gate on the shared expert's output (Qwen2-MoE)
    scale: Option<Linear>,
}

/// One term of the feed-forward's output (the block adds them to its residual).
pub enum MoeTerm {
    /// Weighted rows summed per token: the routed experts, or the gated shared expert.
    Routed(Routed),
    /// `x @ w^T`: the ungated shared expert's down projection.
    Linear { x: Tensor, w: Tensor },
}

impl MoeFfn {
    pub fn new(store: &mut ParamStore, name: &str, h: usize, m: &Moe) -> anyhow::Result<Self> {
        let (e, f) = (m.experts as usize, m.expert_ffn as usize);
        let n = |s: &str| format!("{name}.{s}");
        let router = Linear::new(store, &n("router"), h, e, false)?;
        let gate_up = store.add(
            n("experts.gate_up"),
            &[e, 2 * f, h],
            Init::Uniform(1.0 / (h as f32).sqrt()),
        )?;
        let down = store.add(
            n("experts.down"),
            &[e, h, f],
            Init::Uniform(1.0 / (f as f32).sqrt()),
        )?;
        let shared = if m.shared_ffn > 0 {
            let fs = m.shared_ffn as usize;
            Some(Shared {
                gate: Linear::new(store, &n("shared.gate"), h, fs, false)?,
                up: Linear::new(store, &n("shared.up"), h, fs, false)?,
                down: Linear::new(store, &n("shared.down"), fs, h, false)?,
                scale: m
                    .shared_gate
                    .then(|| Linear::new(store, &n("shared.scale"), h, 1, false))
                    .transpose()?,
            })
        } else {
            None
        };
        Ok(Self {
            router,
            gate_up,
            down,
            experts: e,
            top_k: m.top_k as usize,
            f,
            shared,
        })
    }

    /// `x: [b, s, h]` (the normed block input, compute dtype) -> the output terms, each `[b, s,
    /// h]` once evaluated.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Vec<MoeTerm>> {
        let (b, s, h) = x.dims3()?;
        let x2 = x.reshape((b * s, h))?;
        let logits = self.router.forward(ctx, &x2)?;
        let (weights, ids) = route(&logits, self.top_k)?;
        let plan = Dispatch::new(&ids, self.experts, self.top_k, x.device())?;
        let rows = experts(
            &x2,
            &ctx.w_raw(self.gate_up)?,
            &ctx.w_raw(self.down)?,
            &plan,
            self.f,
        )?;
        let mut terms = vec![MoeTerm::Routed(Routed {
            rows,
            w: weights,
            order: plan.order,
            tok: plan.tok,
            k: self.top_k,
            out: (b, s, h),
            dtype: x.dtype(),
        })];
        if let Some(sh) = &self.shared {
            let hidden = (fused::activation(&sh.gate.forward(ctx, &x2)?, Act::Silu)?
                * sh.up.forward(ctx, &x2)?)?;
            match &sh.scale {
                Some(g) => {
                    // sigmoid composed: its nodes keep [T, 1] tensors
                    let z = g.forward(ctx, &x2)?.to_dtype(DType::F32)?;
                    let sig = (z.neg()?.exp()? + 1.0)?.recip()?;
                    let ids = Tensor::arange(0u32, (b * s) as u32, x.device())?;
                    terms.push(MoeTerm::Routed(Routed {
                        rows: sh.down.forward(ctx, &hidden)?,
                        w: sig,
                        order: ids.clone(),
                        tok: ids,
                        k: 1,
                        out: (b, s, h),
                        dtype: x.dtype(),
                    }));
                }
                None => terms.push(MoeTerm::Linear {
                    x: hidden.reshape((b, s, ()))?,
                    w: ctx.w(sh.down.w)?,
                }),
            }
        }
        Ok(terms)
    }
}

/// Routed (token, expert) pairs sorted by expert, as `grouped_mm_experts_forward` sorts them.
struct Dispatch {
    /// flat `token * k + slot` index of each sorted pair (u32 `[S]`)
    order: Tensor,
    /// token of each sorted pair (u32 `[S]`)
    tok: Tensor,
    /// pairs per expert, in expert order
    counts: Vec<usize>,
}

impl Dispatch {
    fn new(ids: &[Vec<u32>], experts: usize, k: usize, dev: &candle_core::Device) -> Result<Self> {
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(ids.len() * k);
        for (t, row) in ids.iter().enumerate() {
            for (slot, &e) in row.iter().enumerate() {
                pairs.push((e, (t * k + slot) as u32));
            }
        }
        pairs.sort_unstable();
        let mut counts = vec![0usize; experts];
        for &(e, _) in &pairs {
            counts[e as usize] += 1;
        }
        let order: Vec<u32> = pairs.iter().map(|p| p.1).collect();
        let tok: Vec<u32> = order.iter().map(|o| o / k as u32).collect();
        let n = order.len();
        Ok(Self {
            order: Tensor::from_vec(order, n, dev)?,
            tok: Tensor::from_vec(tok, n, dev)?,
            counts,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// router

struct RouteOp {
    out: Handed,
    /// fp32 probabilities `[T, E]` (what `softmax` keeps)
    probs: Mutex<Option<Tensor>>,
    /// top-k expert ids `[T, k]` (u32)
    ids: Tensor,
}

impl CustomOp1 for RouteOp {
    fn name(&self) -> &'static str {
        "moe-route"
    }
    handed_fwd!(a);
    fn bwd(&self, logits: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let p = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned router probabilities".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("router backward ran twice".into()))?;
        let g = g.to_dtype(DType::F32)?;
        // w = v / sum(v), v = p[ids]: dv = g / sum - sum(g v) / sum^2
        let v = p.gather(&self.ids, 1)?;
        let sum = v.sum_keepdim(1)?;
        let gv = g
            .broadcast_div(&sum)?
            .broadcast_sub(&(&g * &v)?.sum_keepdim(1)?.broadcast_div(&sum.sqr()?)?)?;
        let gp = p
            .zeros_like()?
            .scatter_add(&self.ids, &gv.contiguous()?, 1)?;
        // softmax backward from its output
        let dot = (&gp * &p)?.sum_keepdim(D::Minus1)?;
        let gl = (&p * gp.broadcast_sub(&dot)?)?;
        Ok(Some(gl.to_dtype(logits.dtype())?))
    }
}

/// Router logits `[T, E]` -> the top-k routing weights `[T, k]` (fp32 softmax over the experts,
/// top-k, renormalised to sum 1, as `MixtralTopKRouter`; Qwen's `norm_topk_prob`) and each
/// token's expert ids. One node keeping the fp32 probabilities and the ids.
pub fn route(logits: &Tensor, k: usize) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let p = candle_nn::ops::softmax_last_dim(&logits.detach().to_dtype(DType::F32)?)?;
    let rows = p.to_vec2::<f32>()?;
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let mut idx: Vec<u32> = (0..r.len() as u32).collect();
            // descending probability, lower id first on ties (as torch.topk on CPU)
            idx.sort_by(|&a, &b| r[b as usize].total_cmp(&r[a as usize]).then(a.cmp(&b)));
            idx.truncate(k);
            idx
        })
        .collect();
    let t = ids.len();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let id_t = Tensor::from_vec(flat, (t, k), logits.device())?;
    let v = p.gather(&id_t, 1)?;
    let w = v.broadcast_div(&v.sum_keepdim(1)?)?;
    let op = RouteOp {
        out: Handed::new(w),
        probs: Mutex::new(Some(p)),
        ids: id_t,
    };
    Ok((logits.apply_op1(op)?, ids))
}

// ---------------------------------------------------------------------------------------------
// experts

struct ExpertsOp {
    out: Handed,
    /// gathered rows, gate/up output, SiLU(gate), SiLU(gate)·up
    kept: Mutex<Option<[Tensor; 4]>>,
    tok: Tensor,
    counts: Vec<usize>,
    f: usize,
}

/// Row ranges `[start, len)` of the experts that received pairs.
fn ranges(counts: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    counts
        .iter()
        .enumerate()
        .scan(0usize, |start, (e, &n)| {
            let s = *start;
            *start += n;
            Some((e, s, n))
        })
        .filter(|&(_, _, n)| n > 0)
}

/// The grouped matmul: `rows @ w[e]^T` (`w` `[E, out, in]`; `rhs` transposes each expert's
/// matrix when false) for each expert's rows, written into one output as `grouped_mm` writes
/// (no per-expert pieces held together).
fn grouped(rows: &Tensor, w: &Tensor, counts: &[usize], transpose: bool) -> Result<Tensor> {
    let d = if transpose { w.dim(1)? } else { w.dim(2)? };
    let out = Tensor::zeros((rows.dim(0)?, d), rows.dtype(), rows.device())?;
    for (e, s, n) in ranges(counts) {
        let we = w.get(e)?;
        let we = if transpose { we.t()? } else { we };
        out.slice_set(&rows.narrow(0, s, n)?.matmul(&we)?, 0, s)?;
    }
    Ok(out)
}

/// Each expert's weight gradient `g[e]^T @ x[e]` into one `[E, ...]` tensor like `w`.
fn grouped_weight_grad(g: &Tensor, x: &Tensor, w: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let out = w.zeros_like()?;
    for (e, s, n) in ranges(counts) {
        let ge = g.narrow(0, s, n)?.t()?.matmul(&x.narrow(0, s, n)?)?;
        out.slice_set(&ge.unsqueeze(0)?, 0, e)?;
    }
    Ok(out)
}

impl CustomOp3 for ExpertsOp {
    fn name(&self) -> &'static str {
        "moe-experts"
    }
    handed_fwd!(a, b, c);
    fn bwd(
        &self,
        x: &Tensor,
        wgu: &Tensor,
        wd: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gathered, proj, act, prod] = self
            .kept
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned expert activations".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("experts backward ran twice".into()))?;
        let (wgu, wd) = (wgu.detach(), wd.detach());
        let g = g.to_dtype(wd.dtype())?.contiguous()?;
        let f = self.f;
        // down: g_prod = g @ wd[e], g_wd[e] = g^T @ prod
        let g_prod = grouped(&g, &wd, &self.counts, false)?;
        let g_wd = grouped_weight_grad(&g, &prod, &wd, &self.counts)?;
        drop((g, prod));
        let gate = proj.narrow(1, 0, f)?;
        let up = proj.narrow(1, f, f)?;
        let g_up = (&g_prod * &act)?;
        drop(act);
        let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
        let dsilu = (&sig * ((&gate * (1.0 - &sig)?)? + 1.0)?)?;
        let g_gate = ((&g_prod * &up)? * dsilu)?;
        drop((g_prod, sig, gate, up, proj));
        let g_proj = Tensor::cat(&[&g_gate, &g_up], 1)?;
        drop((g_gate, g_up));
        // gate/up: g_rows = g_proj @ wgu[e], g_wgu[e] = g_proj^T @ gathered
        let g_rows = grouped(&g_proj, &wgu, &self.counts, false)?;
        let g_wgu = grouped_weight_grad(&g_proj, &gathered, &wgu, &self.counts)?;
        drop((g_proj, gathered));
        let (t, h) = x.dims2()?;
        let gx = Tensor::zeros((t, h), g_rows.dtype(), g_rows.device())?
            .index_add(&self.tok, &g_rows, 0)?
            .to_dtype(x.dtype())?;
        Ok((Some(gx), Some(g_wgu), Some(g_wd)))
    }
}

/// The routed experts over `x: [T, h]`: each sorted pair's row gathered (in the weights' dtype),
/// SwiGLU through its expert (`wgu [E, 2f, h]`, `wd [E, h, f]`). Returns the unweighted expert
/// outputs `[S, h]` in sorted order.
fn experts(x: &Tensor, wgu: &Tensor, wd: &Tensor, plan: &Dispatch, f: usize) -> Result<Tensor> {
    let gathered = x
        .detach()
        .to_dtype(wd.dtype())?
        .index_select(&plan.tok, 0)?;
    let proj = grouped(&gathered, &wgu.detach(), &plan.counts, true)?;
    let act = proj.narrow(1, 0, f)?.silu()?;
    let prod = (&act * proj.narrow(1, f, f)?)?;
    let out = grouped(&prod, &wd.detach(), &plan.counts, true)?;
    let op = ExpertsOp {
        out: Handed::new(out),
        kept: Mutex::new(Some([gathered, proj, act, prod])),
        tok: plan.tok.clone(),
        counts: plan.counts.clone(),
        f,
    };
    x.apply_op3(wgu, wd, op)
}

// ---------------------------------------------------------------------------------------------
// weighting and scatter back

/// `out[t] = sum over slots of rows[pair(t, slot)] * w[t, slot]`, never materialised as a kept
/// node (the block's output sum evaluates it and seeds its backward, as `Term::Linear`).
pub struct Routed {
    /// `[S, h]` rows in sorted pair order
    rows: Tensor,
    /// `[T, k]` weights
    w: Tensor,
    /// flat `t * k + slot` of each row (u32 `[S]`)
    order: Tensor,
    /// token of each row (u32 `[S]`)
    tok: Tensor,
    k: usize,
    out: (usize, usize, usize),
    dtype: DType,
}

impl Routed {
    /// The weights of the rows in their order `[S, 1]`, in the rows' dtype.
    fn row_weights(&self, w: &Tensor) -> Result<Tensor> {
        w.flatten_all()?
            .index_select(&self.order, 0)?
            .to_dtype(self.rows.dtype())?
            .unsqueeze(1)
    }

    /// The output value `[b, s, h]`, outside the graph.
    pub fn value(&self) -> Result<Tensor> {
        let (b, s, h) = self.out;
        let rows = self.rows.detach();
        let weighted = rows.broadcast_mul(&self.row_weights(&self.w.detach())?)?;
        let t = b * s;
        let y = Tensor::zeros((t * self.k, h), rows.dtype(), rows.device())?
            .index_add(&self.order, &weighted, 0)?
            .reshape((t, self.k, h))?
            .sum(1)?;
        y.to_dtype(self.dtype)?.reshape((b, s, h))
    }

    /// The dtype of [`Self::value`].
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Backward root for the output gradient `g` (`[b, s, h]`).
    pub fn root(&self, g: &Tensor) -> Result<Tensor> {
        let op = RoutedSeedOp {
            g: g.flatten_to(1)?,
            out: Handed::new(Tensor::zeros((), DType::F32, g.device())?),
            order: self.order.clone(),
            tok: self.tok.clone(),
        };
        self.rows.apply_op2(&self.w, op)
    }
}

struct RoutedSeedOp {
    g: Tensor,
    out: Handed,
    order: Tensor,
    tok: Tensor,
}

impl CustomOp2 for RoutedSeedOp {
    fn name(&self) -> &'static str {
        "moe-combine-seed"
    }
    handed_fwd!(a, b);
    fn bwd(
        &self,
        rows: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, w) = (rows.detach(), w.detach());
        let g = self.g.to_dtype(rows.dtype())?.index_select(&self.tok, 0)?;
        let wr = w
            .flatten_all()?
            .index_select(&self.order, 0)?
            .to_dtype(rows.dtype())?
            .unsqueeze(1)?;
        let g_rows = g.broadcast_mul(&wr)?;
        let gw_sorted = (&g * &rows)?.sum(1)?.to_dtype(w.dtype())?;
        let gw = Tensor::zeros(w.elem_count(), w.dtype(), w.device())?
            .index_add(&self.order, &gw_sorted, 0)?
            .reshape(w.shape())?;
        Ok((Some(g_rows), Some(gw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused route / experts / combine nodes give the gradients of the same computation
    /// composed from candle's differentiable ops.
    #[test]
    fn moe_gradients_match_composed() {
        let dev = Device::Cpu;
        let (t, h, e, f, k) = (6usize, 8usize, 4usize, 5usize, 2usize);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, h), &dev).unwrap()).unwrap();
        let wr = Var::from_tensor(&Tensor::randn(0f32, 1.0, (e, h), &dev).unwrap()).unwrap();
        let wgu =
            Var::from_tensor(&Tensor::randn(0f32, 0.3, (e, 2 * f, h), &dev).unwrap()).unwrap();
        let wd = Var::from_tensor(&Tensor::randn(0f32, 0.3, (e, h, f), &dev).unwrap()).unwrap();
        let gout = Tensor::randn(0f32, 1.0, (1, t, h), &dev).unwrap();
        // fused
        let logits = x.as_tensor().matmul(&wr.as_tensor().t().unwrap()).unwrap();
        let (w, ids) = route(&logits, k).unwrap();
        let plan = Dispatch::new(&ids, e, k, &dev).unwrap();
        let rows = experts(x.as_tensor(), wgu.as_tensor(), wd.as_tensor(), &plan, f).unwrap();
        let r = Routed {
            rows,
            w,
            order: plan.order.clone(),
            tok: plan.tok.clone(),
            k,
            out: (1, t, h),
            dtype: DType::F32,
        };
        let y_fused = r.value().unwrap();
        let gs = r.root(&gout).unwrap().backward().unwrap();
        // composed, same routing
        let p = candle_nn::ops::softmax(&logits, D::Minus1).unwrap();
        let mut y = Tensor::zeros((t, h), DType::F32, &dev).unwrap();
        let mut acc = Vec::new();
        for (ti, row) in ids.iter().enumerate() {
            let pr = p.get(ti).unwrap();
            let idx = Tensor::from_vec(row.clone(), k, &dev).unwrap();
            let v = pr.index_select(&idx, 0).unwrap();
            let wv = v.broadcast_div(&v.sum_keepdim(0).unwrap()).unwrap();
            let xt = x.as_tensor().get(ti).unwrap().unsqueeze(0).unwrap();
            let mut out = Tensor::zeros((1, h), DType::F32, &dev).unwrap();
            for (slot, &ex) in row.iter().enumerate() {
                let gu = xt
                    .matmul(&wgu.as_tensor().get(ex as usize).unwrap().t().unwrap())
                    .unwrap();
                let a = gu.narrow(1, 0, f).unwrap().silu().unwrap();
                let m = (a * gu.narrow(1, f, f).unwrap()).unwrap();
                let d = m
                    .matmul(&wd.as_tensor().get(ex as usize).unwrap().t().unwrap())
                    .unwrap();
                out = (out + d.broadcast_mul(&wv.narrow(0, slot, 1).unwrap()).unwrap()).unwrap();
            }
            acc.push(out);
        }
        y = (y + Tensor::cat(&acc, 0).unwrap()).unwrap();
        let loss = (y.unsqueeze(0).unwrap() * &gout)
            .unwrap()
            .sum_all()
            .unwrap();
        let gc = loss.backward().unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "{what}: {d}");
        };
        close(&y_fused.squeeze(0).unwrap(), &y, "value");
        for (v, name) in [(&x, "x"), (&wr, "router"), (&wgu, "gate_up"), (&wd, "down")] {
            let a = gs
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("fused {name}"));
            let b = gc
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("composed {name}"));
            close(a, b, name);
        }
    }
}
