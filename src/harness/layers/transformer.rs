//! A transformer built from the planner's own [`TransformerSpec`]: GPT-2, BERT, Llama and ViT
//! shapes, with exactly the parameters `plan::params::count` counts.
//!
//! The forward pass is split into `embed`, `block(i)` and `head` so the trainer can run blocks
//! on detached inputs (gradient checkpointing, block-wise gradient release for ZeRO-2/3).
//! Rotary position embeddings (Llama, `max_positions == 0`) are omitted: they have no parameters
//! and their elementwise cost is negligible next to the projections.

use super::frozen_ffn::{FrozenNorm, FrozenSwiGlu};
use super::fused::{self, Act, Heads};
use super::joins::{self, Stash};
use super::lora::{lora_residual, lora_value, seed_lora, Lora};
use super::moe::{MoeFfn, MoeTerm, Routed};
use super::ops::{Adapter, Linear, Norm};
use super::params::{Ctx, Init, ParamStore};
use crate::plan::finetune::{self, Finetune};
use crate::spec::transformer::{
    Activation, Arch, BlockKind, FfnKind, Head, NormKind, TransformerSpec,
};
use candle_core::{DType, Result, Tensor};

/// A dropout's keep mask and p, when it is on.
type Dropout = Option<(Tensor, f32)>;

/// One term of a block's output sum.
pub enum Term {
    /// A graph tensor.
    Tensor(Tensor),
    /// `x @ w^T (+ b)`, never materialised as a kept node.
    Linear {
        x: Tensor,
        w: Tensor,
        b: Option<Tensor>,
        /// Dropout on the linear's output: keep mask and p.
        drop: Option<(Tensor, f32)>,
        /// `x` is attention heads `[b, a, s, d]`, read as merged (the attention's output
        /// projection).
        merge: Option<Heads>,
    },
    /// `layer_norm(x)` with weight `w`, bias `b` and epsilon, never materialised as a kept node
    /// (a post-norm block's output).
    Norm {
        x: Tensor,
        w: Tensor,
        b: Tensor,
        eps: f64,
    },
    /// A feed-forward's activation and last linear, keeping the linear's input only until its
    /// backward ([`joins::ActLinear`]).
    ActLinear(joins::ActLinear),
    /// A SwiGLU feed-forward's product and last linear ([`joins::SwiGluLinear`]).
    SwiGlu(joins::SwiGluLinear),
    /// A SwiGLU feed-forward with its norm, every weight frozen and unadapted
    /// ([`FrozenSwiGlu`]): neither the norm's output nor the projections' input is kept.
    FrozenSwiGlu(FrozenSwiGlu),
    /// Routed expert outputs weighted and summed per token ([`Routed`]).
    Routed(Routed),
    /// The same for an adapted (LoRA) linear: `x`, the adapters A and B, and the frozen base.
    Lora {
        x: Tensor,
        a: Tensor,
        b: Tensor,
        lora: Lora,
        drop: Option<(Tensor, f32)>,
    },
}

/// A block's output as the terms of a sum (the last residual join), so that the output itself
/// is held only once, as the next block's input, and not as a node of this block's graph.
pub struct BlockOut {
    pub terms: Vec<Term>,
    /// The gradient the block's first residual join routed to the block input
    /// ([`joins::linear_residual`]); add it to the input's gradient after backward.
    pub stash: Stash,
}

impl BlockOut {
    /// The output value, outside the graph.
    pub fn value(&self) -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for t in &self.terms {
            let v = match t {
                Term::Tensor(t) => t.detach(),
                Term::Norm { x, w, b, eps } => {
                    fused::norm(&x.detach(), &w.detach(), Some(&b.detach()), *eps, x.dtype())?
                }
                Term::Linear {
                    x,
                    w,
                    b,
                    drop,
                    merge,
                } => {
                    let (x, w, b) = (x.detach(), w.detach(), b.as_ref().map(|b| b.detach()));
                    let y = match merge {
                        Some(h) => fused::linear_merge_heads(&x, &w, b.as_ref(), *h)?,
                        None => fused::linear(&x, &w, b.as_ref())?,
                    };
                    match drop {
                        Some((mask, p)) => fused::dropout(&y, mask, *p)?,
                        None => y,
                    }
                }
                Term::Routed(r) => r.value()?,
                Term::ActLinear(t) => t.value()?,
                Term::SwiGlu(t) => t.value()?,
                Term::FrozenSwiGlu(t) => t.value()?,
                Term::Lora {
                    x,
                    a,
                    b,
                    lora,
                    drop,
                } => {
                    let y = lora_value(lora, x, a, b)?;
                    match drop {
                        Some((mask, p)) => fused::dropout(&y, mask, *p)?,
                        None => y,
                    }
                }
            };
            // the sum is in the first term's dtype (the residual stream: fp32 under mixed
            // precision, where autocast's 16-bit linear outputs are promoted by the add)
            acc = Some(match acc {
                Some(a) => (&a + v.to_dtype(a.dtype())?)?,
                None => v,
            });
        }
        acc.ok_or_else(|| candle_core::Error::Msg("a block without output terms".into()))
    }

    /// Backward root for the output gradient `g`. Each term receives `g` in its own dtype (the
    /// add's backward casts it for a 16-bit term of an fp32 sum).
    pub fn root(&self, g: &Tensor) -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for t in &self.terms {
            let dtype = match t {
                Term::Tensor(t) => t.dtype(),
                Term::Norm { x, .. } | Term::Linear { x, .. } | Term::Lora { x, .. } => x.dtype(),
                Term::Routed(r) => r.dtype(),
                Term::ActLinear(t) => t.dtype(),
                Term::SwiGlu(t) => t.dtype(),
                Term::FrozenSwiGlu(t) => t.dtype(),
            };
            let g = &if g.dtype() == dtype {
                g.clone()
            } else {
                g.to_dtype(dtype)?
            };
            let r = match t {
                Term::Tensor(t) => joins::seed(t, g)?,
                Term::Norm { x, w, b, eps } => fused::seed_layer_norm(x, w, b, *eps, g)?,
                Term::Linear {
                    x,
                    w,
                    b,
                    drop,
                    merge,
                } => joins::seed_linear(
                    x,
                    w,
                    b.as_ref(),
                    g,
                    drop.as_ref().map(|(m, p)| (m, *p)),
                    *merge,
                )?,
                Term::Routed(r) => r.root(g)?,
                Term::ActLinear(t) => t.root(g)?,
                Term::SwiGlu(t) => t.root(g)?,
                Term::FrozenSwiGlu(t) => t.root(g)?,
                Term::Lora {
                    x,
                    a,
                    b,
                    lora,
                    drop,
                } => seed_lora(
                    lora.handoff(),
                    x,
                    a,
                    b,
                    g,
                    drop.as_ref().map(|(m, p)| (m, *p)),
                )?,
            };
            acc = Some(match acc {
                Some(a) => (a + r)?,
                None => r,
            });
        }
        acc.ok_or_else(|| candle_core::Error::Msg("a block without output terms".into()))
    }

    /// The stashed residual gradient, shaped like the block input.
    pub fn residual_grad(&self, like: &Tensor) -> Result<Option<Tensor>> {
        joins::take_stash(&self.stash)
            .map(|g| g.reshape(like.shape()))
            .transpose()
    }
}

/// Dropout sites within a block (the mask seed is `block * SITES + site`).
const SITES: u64 = 8;

#[derive(Debug)]
enum Qkv {
    /// One `[3h, h]` projection (plain multi-head attention).
    Fused(Linear),
    /// Separate projections (grouped-query attention: K and V have `kv_heads` heads).
    Split { q: Linear, k: Linear, v: Linear },
}

#[derive(Debug)]
struct Attention {
    qkv: Qkv,
    out: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    /// transformers' Llama-family and ViT eager attention: `softmax(scores, dtype=float32)`
    /// cast back
    softmax_f32: bool,
}

impl Attention {
    /// Projections straight into head layout, one node for QK^T/scale/mask/softmax, dropout on
    /// the probabilities, and the output projection reading the heads directly: the graph keeps
    /// Q, K, V, the probabilities, the dropped probabilities (+ a byte mask) and the context.
    /// The attention core's output `[b, a, s, d]` (before the output projection).
    fn core(&self, ctx: &Ctx, x: &Tensor, site: u64) -> Result<(Tensor, Heads)> {
        let (b, s, _) = x.dims3()?;
        let heads = |a: usize| Heads {
            b,
            a,
            s,
            d: self.head_dim,
        };
        let group = |t: &Tensor, i: usize| t.narrow(0, i, 1)?.squeeze(0);
        let (q, mut k, mut v) = match &self.qkv {
            Qkv::Fused(l) => {
                let qkv = l.forward_split_heads(ctx, x, heads(self.heads), 3)?;
                (group(&qkv, 0)?, group(&qkv, 1)?, group(&qkv, 2)?)
            }
            Qkv::Split { q, k, v } => {
                let q = group(&q.forward_split_heads(ctx, x, heads(self.heads), 1)?, 0)?;
                let xk = ctx.autocast_copy(x, k.keeps_input(ctx))?;
                let k = group(
                    &k.forward_split_heads(ctx, &xk, heads(self.kv_heads), 1)?,
                    0,
                )?;
                let xv = ctx.autocast_copy(x, v.keeps_input(ctx))?;
                let v = group(
                    &v.forward_split_heads(ctx, &xv, heads(self.kv_heads), 1)?,
                    0,
                )?;
                (q, k, v)
            }
        };
        // PyTorch's flash path runs grouped-query attention on the K/V heads (transformers passes
        // enable_gqa to sdpa when there is no mask); eager attention repeats them (repeat_kv).
        if self.kv_heads != self.heads && !ctx.flash_attention {
            let rep = self.heads / self.kv_heads;
            let expand = |t: Tensor| -> Result<Tensor> {
                t.unsqueeze(2)?
                    .broadcast_as((b, self.kv_heads, rep, s, self.head_dim))?
                    .reshape((b, self.heads, s, self.head_dim))
            };
            k = expand(k)?;
            v = expand(v)?;
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = if ctx.flash_attention {
            super::flash::attention(&q, &k, &v, scale, self.causal)?
        } else if ctx.upcast_math_attention && q.dtype() != DType::F32 {
            let up = |t: &Tensor| t.to_dtype(DType::F32);
            let (q, k, v) = (up(&q)?, up(&k)?, up(&v)?);
            let shape = (b, self.heads, s, s).into();
            let mask = ctx.dropout_mask(&shape, DType::F32, q.device(), site)?;
            let drop = mask.as_ref().map(|m| (m, ctx.dropout));
            let probs = joins::Probs {
                scale,
                causal: self.causal,
                f32_softmax: false,
            };
            joins::eager_attention(&q, &k, &v, probs, drop, None)?.to_dtype(ctx.dtype)?
        } else {
            let shape = (b, self.heads, s, s).into();
            let mask = ctx.dropout_mask(&shape, q.dtype(), q.device(), site)?;
            let drop = mask.as_ref().map(|m| (m, ctx.dropout));
            let recompute = ctx
                .recompute_attention
                .then(|| ctx.mask_site(&shape, q.dtype(), q.device(), site));
            // fp32 probabilities besides the 16-bit ones: transformers' Llama-family attention
            // (`softmax(..., dtype=float32)`); under mixed precision also a decoder's, whose
            // additive causal mask is fp32 (made in the fp32 embeddings' dtype) and promotes the
            // scores, and every softmax on CUDA, where autocast runs softmax in fp32 (measured
            // on a CPU with saved-tensor hooks: GPT-2 keeps fp32 probabilities, BERT 16-bit)
            let mixed = ctx.store.dtype != ctx.dtype;
            let f32_softmax = self.softmax_f32 || (mixed && (self.causal || q.device().is_cuda()));
            let probs = joins::Probs {
                scale,
                causal: self.causal,
                f32_softmax,
            };
            joins::eager_attention(&q, &k, &v, probs, drop, recompute)?
        };
        Ok((y, heads(self.heads)))
    }

    /// `resid + dropout(out_proj(core(x)))` as the terms of a sum, for the block's attention
    /// part run as its own segment (`resid`: the segment's input, a leaf). The output projection
    /// must not be adapted.
    fn residual_terms(
        &self,
        ctx: &Ctx,
        resid: &Tensor,
        x: &Tensor,
        site: u64,
        stash: &Stash,
    ) -> Result<Vec<Term>> {
        let (y, h, drop) = self.core_dropped(ctx, x, site)?;
        if let Some((a, b, lora)) = self.out.adapted(ctx)? {
            // an adapted output projection joins the residual in its node (its output is then
            // held twice: as that node's and as the next segment's input)
            let drop = drop.as_ref().map(|(m, p)| (m, *p));
            let joined = lora_residual(lora, resid, &y, &a, &b, Some(h), stash, drop)?;
            return Ok(vec![Term::Tensor(joined)]);
        }
        let (w, b) = self.out.tensors(ctx)?;
        Ok(vec![
            Term::Tensor(resid.clone()),
            Term::Linear {
                x: y,
                w,
                b,
                drop,
                merge: Some(h),
            },
        ])
    }

    /// The attention core's output, its head layout, and the keep mask and p of the dropout on
    /// the output projection.
    fn core_dropped(&self, ctx: &Ctx, x: &Tensor, site: u64) -> Result<(Tensor, Heads, Dropout)> {
        let (y, h) = self.core(ctx, x, site)?;
        let shape = (h.b, h.s, self.out.d_out).into();
        let drop = ctx
            .dropout_mask(&shape, y.dtype(), y.device(), site + 1)?
            .map(|m| (m, ctx.dropout));
        Ok((y, h, drop))
    }

    fn residual(
        &self,
        ctx: &Ctx,
        resid: &Tensor,
        x: &Tensor,
        site: u64,
        stash: &Stash,
    ) -> Result<Tensor> {
        let (y, h, drop) = self.core_dropped(ctx, x, site)?;
        let drop = drop.as_ref().map(|(m, p)| (m, *p));
        if let Some((a, b, lora)) = self.out.adapted(ctx)? {
            return lora_residual(lora, resid, &y, &a, &b, Some(h), stash, drop);
        }
        let (w, b) = self.out.tensors(ctx)?;
        joins::linear_residual(resid, &y, &w, b.as_ref(), Some(h), stash, drop)
    }
}

#[derive(Debug)]
enum Mlp {
    Gelu {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
    Swiglu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl Mlp {
    /// The input of the last projection. Activations as transformers runs them: `gelu_new` and
    /// `gelu_fast` composed (holding what the composition holds, [`fused::gelu_new`]); every
    /// other GELU-like activation (`gelu`, `gelu_pytorch_tanh`, `quick_gelu`, `relu`) as one
    /// fused node keeping its input, computed as the tanh GELU (same memory, other values).
    fn hidden(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gelu { fc1, act, .. } => {
                let h = fc1.forward(ctx, x)?;
                match act {
                    Activation::GeluNew | Activation::GeluFast => fused::gelu_new(&h),
                    _ => fused::activation(&h, Act::Gelu),
                }
            }
            Mlp::Swiglu { gate, up, .. } => {
                let g = fused::activation(&gate.forward(ctx, x)?, Act::Silu)?;
                g * up.forward(ctx, &ctx.autocast_copy(x, up.keeps_input(ctx))?)?
            }
        }
    }

    fn last(&self) -> &Linear {
        match self {
            Mlp::Gelu { fc2, .. } => fc2,
            Mlp::Swiglu { down, .. } => down,
        }
    }
}

/// A block's feed-forward: the dense MLP or a mixture of experts.
#[derive(Debug)]
enum Ffn {
    Dense(Mlp),
    Moe(MoeFfn),
}

#[derive(Debug)]
struct Block {
    attn: Attention,
    ffn: Ffn,
    norm1: Norm,
    /// `None`: one norm shared by parallel attention and MLP (`block_norms` 1)
    norm2: Option<Norm>,
    /// attention and feed-forward read the same input (`parallel_attn`)
    parallel: bool,
}

#[derive(Debug)]
enum Embedding {
    Tokens {
        tok: usize,
        pos: Option<usize>,
        token_type: Option<usize>,
        norm: Option<Norm>,
    },
    Patches {
        conv_w: usize,
        conv_b: usize,
        cls: usize,
        pos: usize,
        patch: usize,
    },
}

#[derive(Debug)]
enum HeadLayer {
    /// Vocabulary projection; `None` reuses the token embedding (tied).
    Lm(Option<usize>),
    Pooler(Linear),
    Classifier(Linear),
}

/// The model. Parameters live in the [`ParamStore`]; this holds their indices.
#[derive(Debug)]
pub struct Transformer {
    pub spec: TransformerSpec,
    embedding: Embedding,
    blocks: Vec<Block>,
    final_norm: Option<Norm>,
    head: HeadLayer,
}

impl Transformer {
    pub fn new(spec: &TransformerSpec, store: &mut ParamStore) -> anyhow::Result<Self> {
        Self::with_finetune(spec, store, &Finetune::default())
    }

    /// The model with `ft`'s LoRA adapters on the adapted block linears (the planner's names,
    /// `plan::finetune::block_linears`; the fused QKV projection carries q, k and v adapters
    /// apart unless the planner counts it as one linear, GPT-2's `c_attn`). The base is frozen
    /// when the store's `frozen` dtype is set.
    pub fn with_finetune(
        spec: &TransformerSpec,
        store: &mut ParamStore,
        ft: &Finetune,
    ) -> anyhow::Result<Self> {
        spec.validate()?;
        let adapted: Vec<&str> = ft.adapted(spec).iter().map(|l| l.name).collect();
        let fused_qkv_one = finetune::block_linears(spec)
            .iter()
            .any(|l| l.name == "qkv");
        if fused_qkv_one && spec.kv_heads != spec.heads && adapted.contains(&"qkv") {
            // the planner's one fused-qkv adapter (c_attn, query_key_value, qkv_proj), where this
            // harness builds separate q, k, v for grouped key/value heads
            return crate::error::input_err(
                "lora-targets",
                "qkv of a multi-/grouped-query block with a fused q/k/v projection is planned, not \
                 built by the candle harness; accepted the other block linears",
            );
        }
        let (rank, scale) = (ft.rank as usize, 2.0);
        let qlora = ft.mode == finetune::FinetuneMode::Qlora;
        let lin = |store: &mut ParamStore,
                   name: String,
                   d_in: usize,
                   d_out: usize,
                   bias: bool,
                   parts: &[(&str, usize)]|
         -> anyhow::Result<Linear> {
            // QLoRA: the block linears' weights (not their biases) are stored as NF4
            store.nf4 = qlora;
            let l = Linear::new(store, &name, d_in, d_out, bias);
            store.nf4 = false;
            let mut l = l?;
            let parts: Vec<(&str, usize, bool)> = parts
                .iter()
                .map(|&(p, rows)| (p, rows, adapted.contains(&p)))
                .collect();
            l.lora = Adapter::new(store, &name, d_in, &parts, rank, scale)?;
            Ok(l)
        };
        let h = spec.hidden as usize;
        let rms = spec.norm == NormKind::Rmsnorm;
        let emb_init = Init::Uniform(0.02);
        let embedding = match &spec.patch {
            Some(p) => {
                let (c, k) = (p.channels as usize, p.patch as usize);
                let bound = 1.0 / ((c * k * k) as f32).sqrt();
                Embedding::Patches {
                    conv_w: store.add("embed.patch.weight", &[h, c, k, k], Init::Uniform(bound))?,
                    conv_b: store.add("embed.patch.bias", &[h], Init::Zeros)?,
                    cls: store.add("embed.cls", &[1, 1, h], emb_init)?,
                    pos: store.add("embed.pos", &[p.seq_for(p.image) as usize, h], emb_init)?,
                    patch: k,
                }
            }
            None => Embedding::Tokens {
                tok: store.add("embed.tok", &[spec.vocab as usize, h], emb_init)?,
                pos: (spec.max_positions > 0)
                    .then(|| store.add("embed.pos", &[spec.max_positions as usize, h], emb_init))
                    .transpose()?,
                token_type: (spec.type_vocab > 0)
                    .then(|| store.add("embed.type", &[spec.type_vocab as usize, h], emb_init))
                    .transpose()?,
                norm: spec
                    .embedding_norm
                    .then(|| Norm::new(store, "embed.norm", h, rms))
                    .transpose()?,
            },
        };
        let (a, kvh) = (spec.heads as usize, spec.kv_heads as usize);
        let (head_dim, qw) = (spec.head_dim() as usize, spec.q_width() as usize);
        let ab = spec.attn_bias();
        let mut blocks = Vec::with_capacity(spec.layers as usize);
        for i in 0..spec.layers as usize {
            let n = |s: &str| format!("blocks.{i}.{s}");
            // Qwen2's biases on q, k and v only
            let qkv_b = ab || spec.qkv_bias;
            // one fused projection only where transformers has one (GPT-2's c_attn; the fused
            // families' query_key_value / qkv_proj, `finetune::block_linears`): separate
            // q, k and v linears each keep their own input under autocast (Ctx::autocast_copy)
            // and their own output gradients, as transformers' modules do
            let qkv = if fused_qkv_one && kvh == a {
                Qkv::Fused(lin(
                    store,
                    n("attn.qkv"),
                    h,
                    3 * qw,
                    qkv_b,
                    &[("qkv", 3 * qw)],
                )?)
            } else {
                let kv = kvh * head_dim;
                Qkv::Split {
                    q: lin(store, n("attn.q"), h, qw, qkv_b, &[("q", qw)])?,
                    k: lin(store, n("attn.k"), h, kv, qkv_b, &[("k", kv)])?,
                    v: lin(store, n("attn.v"), h, kv, qkv_b, &[("v", kv)])?,
                }
            };
            let attn = Attention {
                qkv,
                out: lin(store, n("attn.out"), qw, h, ab, &[("o", h)])?,
                heads: a,
                kv_heads: kvh,
                head_dim,
                causal: spec.arch == Arch::Decoder,
                // ViT's eager attention also softmaxes in fp32 (modeling_vit.py); under autocast
                // the fp32 probabilities are kept beside their 16-bit copy (measured: tiny ViT
                // b8 64 px fp16-mixed read 0.81 of PyTorch's peak without them)
                softmax_f32: rms || spec.block_kind() == Some(BlockKind::Vit),
            };
            let f = spec.ffn as usize;
            let moe = spec
                .extras
                .moe
                .as_ref()
                .filter(|m| i as u64 >= m.dense_layers);
            let mlp = match spec.ffn_kind {
                _ if moe.is_some() => None,
                FfnKind::Gelu => Some(Mlp::Gelu {
                    fc1: lin(store, n("mlp.fc1"), h, f, spec.bias, &[("fc1", f)])?,
                    fc2: lin(store, n("mlp.fc2"), f, h, spec.bias, &[("fc2", h)])?,
                    act: spec.activation_kind(),
                }),
                FfnKind::Swiglu => Some(Mlp::Swiglu {
                    gate: lin(store, n("mlp.gate"), h, f, spec.bias, &[("gate", f)])?,
                    up: lin(store, n("mlp.up"), h, f, spec.bias, &[("up", f)])?,
                    down: lin(store, n("mlp.down"), f, h, spec.bias, &[("down", h)])?,
                }),
            };
            let ffn = match (mlp, moe) {
                (Some(m), _) => Ffn::Dense(m),
                (None, Some(m)) => Ffn::Moe(MoeFfn::new(store, &n("moe"), h, m)?),
                (None, None) => unreachable!("a block without feed-forward"),
            };
            blocks.push(Block {
                attn,
                ffn,
                norm1: Norm::new(store, &n("norm1"), h, rms)?,
                norm2: (spec.extras.block_norms != Some(1))
                    .then(|| Norm::new(store, &n("norm2"), h, rms))
                    .transpose()?,
                parallel: spec.extras.parallel_attn,
            });
        }
        let final_norm = spec
            .final_norm
            .then(|| Norm::new(store, "final_norm", h, rms))
            .transpose()?;
        let head = match spec.head {
            Head::Lm if spec.tied_embeddings => HeadLayer::Lm(None),
            Head::Lm => HeadLayer::Lm(Some(store.add(
                "head.lm.weight",
                &[spec.vocab as usize, h],
                Init::Uniform(1.0 / (h as f32).sqrt()),
            )?)),
            Head::Pooler => HeadLayer::Pooler(Linear::new(store, "head.pooler", h, h, true)?),
            Head::Classifier { classes } => HeadLayer::Classifier(Linear::new(
                store,
                "head.classifier",
                h,
                classes as usize,
                true,
            )?),
        };
        Ok(Self {
            spec: spec.clone(),
            embedding,
            blocks,
            final_norm,
            head,
        })
    }

    pub fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// False when the embeddings are frozen (LoRA): no gradient needs to reach them.
    pub fn embedding_trainable(&self, store: &ParamStore) -> bool {
        let idx = match &self.embedding {
            Embedding::Tokens { tok, .. } => *tok,
            Embedding::Patches { conv_w, .. } => *conv_w,
        };
        store.params[idx].trainable
    }

    /// Token ids `[b, s]` (u32) or images `[b, c, H, W]` -> hidden states `[b, s, h]` in the
    /// embeddings' storage dtype: the residual stream. Under mixed precision that is fp32, as in
    /// PyTorch, where autocast leaves the embedding lookups fp32 and each residual add promotes
    /// the 16-bit branch outputs back to fp32; the linears keep 16-bit copies of their inputs.
    pub fn embed(&self, ctx: &Ctx, input: &Tensor) -> Result<Tensor> {
        let x = match &self.embedding {
            Embedding::Tokens {
                tok,
                pos,
                token_type,
                norm,
            } => {
                let (b, s) = input.dims2()?;
                let w = ctx.w_raw(*tok)?;
                let h = w.dim(1)?;
                let mut x = w
                    .index_select(&input.flatten_all()?, 0)?
                    .reshape((b, s, h))?;
                if let Some(p) = pos {
                    x = x.broadcast_add(&ctx.w_raw(*p)?.narrow(0, 0, s)?)?;
                }
                if let Some(t) = token_type {
                    // every synthetic token has type 0
                    x = x.broadcast_add(&ctx.w_raw(*t)?.narrow(0, 0, 1)?)?;
                }
                match norm {
                    Some(n) => n.forward(ctx, &x)?,
                    None => x,
                }
            }
            Embedding::Patches {
                conv_w,
                conv_b,
                cls,
                pos,
                patch,
            } => {
                let img = input.to_dtype(ctx.dtype)?;
                // one conv node keeping the images and the weights, lowered as PyTorch lowers it
                // on this device and dtype (conv::conv2d_bias)
                let y = super::conv::conv2d_bias(
                    &img,
                    &ctx.w(*conv_w)?,
                    &ctx.w(*conv_b)?,
                    0,
                    *patch,
                    false,
                )?;
                let (b, h, _, _) = y.dims4()?;
                // the class token and positions are added in their storage dtype: under autocast
                // the 16-bit patches are promoted to the fp32 stream by the concatenation
                let cls = ctx.w_raw(*cls)?;
                let y = y.flatten_from(2)?.transpose(1, 2)?.to_dtype(cls.dtype())?;
                let cls = cls.broadcast_as((b, 1, h))?;
                let x = Tensor::cat(&[&cls, &y], 1)?;
                let n = x.dim(1)?;
                let table = ctx.w_raw(*pos)?;
                if n > table.dim(0)? {
                    candle_core::bail!("{n} tokens exceed the {} learned positions", table.dim(0)?);
                }
                x.broadcast_add(&table.narrow(0, 0, n)?)?
            }
        };
        ctx.dropout(&x, u64::MAX - 1)
    }

    /// Pre-norm block `i` as one segment (parallel attention, or one norm shared by attention
    /// and feed-forward; the others run as [`Self::block_part`]s). `x` must be a leaf (the block input Var, or a detached tensor): the first residual join
    /// routes its gradient through [`BlockOut::stash`].
    pub fn block(&self, ctx: &Ctx, i: usize, x: &Tensor) -> Result<BlockOut> {
        let blk = &self.blocks[i];
        let site = i as u64 * SITES;
        let stash = Stash::default();
        if self.spec.embedding_norm {
            candle_core::bail!("a post-norm block runs as segments (`block_part`)");
        }
        let n1 = blk.norm1.forward_to(ctx, x, ctx.dtype)?;
        let x2 = blk.attn.residual(ctx, x, &n1, site, &stash)?;
        // parallel attention: the feed-forward reads the block input (through the shared
        // norm, or its own); sequential: the attention's residual sum
        let ffn_in = match (&blk.norm2, blk.parallel) {
            (None, _) => n1,
            (Some(n2), true) => n2.forward_to(ctx, x, ctx.dtype)?,
            (Some(n2), false) => n2.forward_to(ctx, &x2, ctx.dtype)?,
        };
        let mut terms = vec![Term::Tensor(x2)];
        terms.extend(ffn_terms(ctx, blk, &ffn_in, site)?);
        Ok(BlockOut { terms, stash })
    }

    /// The graph segments block `i` runs as. A sequential block (pre- or post-norm) runs as two,
    /// attention then feed-forward, so that the feed-forward's
    /// graph is freed before the attention's backward runs, as PyTorch frees each node's saved
    /// tensors once its backward has run; other blocks run as one ([`Self::block`]).
    pub fn parts(&self, i: usize) -> usize {
        let blk = &self.blocks[i];
        let split = match &blk.ffn {
            Ffn::Dense(_) if self.spec.embedding_norm => true,
            _ => !blk.parallel && blk.norm2.is_some(),
        };
        if split {
            2
        } else {
            1
        }
    }

    /// Segment `part` of block `i` (see [`Self::parts`]); `x`, the segment input, must be a
    /// leaf. The segments of a block compute what [`Self::block`] computes, with the same
    /// dropout masks.
    pub fn block_part(&self, ctx: &Ctx, i: usize, part: usize, x: &Tensor) -> Result<BlockOut> {
        if self.parts(i) == 1 {
            return self.block(ctx, i, x);
        }
        let blk = &self.blocks[i];
        let site = i as u64 * SITES;
        if self.spec.embedding_norm {
            return self.post_norm_part(ctx, i, part, x);
        }
        let stash = Stash::default();
        let terms = match (part, &blk.norm2) {
            (0, _) => {
                let n1 = blk.norm1.forward_to(ctx, x, ctx.dtype)?;
                blk.attn.residual_terms(ctx, x, &n1, site, &stash)?
            }
            (1, Some(norm2)) => {
                let mut terms = vec![Term::Tensor(x.clone())];
                match frozen_swiglu(ctx, blk, norm2, x, site)? {
                    Some(t) => terms.push(t),
                    None => {
                        let n2 = norm2.forward_to(ctx, x, ctx.dtype)?;
                        terms.extend(ffn_terms(ctx, blk, &n2, site)?);
                    }
                }
                terms
            }
            _ => candle_core::bail!("block {i} has no segment {part}"),
        };
        Ok(BlockOut { terms, stash })
    }

    /// Segment `part` of post-norm block `i`: `norm1(x + attention(x))`, then
    /// `norm2(x1 + mlp(x1))`, each sum a residual join keeping only its linear's inputs and each
    /// norm's output held once, outside the graph, as the next segment's input.
    fn post_norm_part(&self, ctx: &Ctx, i: usize, part: usize, x: &Tensor) -> Result<BlockOut> {
        let blk = &self.blocks[i];
        let site = i as u64 * SITES;
        let stash = Stash::default();
        let (sum, norm) = match (part, &blk.ffn, &blk.norm2) {
            (0, _, _) => (blk.attn.residual(ctx, x, x, site, &stash)?, &blk.norm1),
            // a fused activation and an unadapted last linear: the activation's output is kept
            // only until the linear's backward ([`joins::act_linear_residual`])
            (1, Ffn::Dense(Mlp::Gelu { fc1, fc2, act }), Some(norm2))
                if !matches!(act, Activation::GeluNew | Activation::GeluFast)
                    && fc2.lora.is_none() =>
            {
                let h = fc1.forward(ctx, x)?;
                let (hb, hs, _) = h.dims3()?;
                let shape = (hb, hs, fc2.d_out).into();
                let mask = ctx.dropout_mask(&shape, h.dtype(), h.device(), site + 2)?;
                let drop = mask.as_ref().map(|m| (m, ctx.dropout));
                let (w, b) = fc2.tensors(ctx)?;
                let sum =
                    joins::act_linear_residual(x, &h, Act::Gelu, &w, b.as_ref(), &stash, drop)?;
                (sum, norm2)
            }
            (1, Ffn::Dense(mlp), Some(norm2)) => {
                let hidden = mlp.hidden(ctx, x)?;
                let last = mlp.last();
                let (hb, hs, _) = hidden.dims3()?;
                let shape = (hb, hs, last.d_out).into();
                let mask = ctx.dropout_mask(&shape, hidden.dtype(), hidden.device(), site + 2)?;
                let drop = mask.as_ref().map(|m| (m, ctx.dropout));
                let sum = match last.adapted(ctx)? {
                    Some((a, b, lora)) => {
                        lora_residual(lora, x, &hidden, &a, &b, None, &stash, drop)?
                    }
                    None => {
                        let (w, b) = last.tensors(ctx)?;
                        joins::linear_residual(x, &hidden, &w, b.as_ref(), None, &stash, drop)?
                    }
                };
                (sum, norm2)
            }
            _ => candle_core::bail!("post-norm block {i} has no segment {part}"),
        };
        let (w, b, eps) = norm.params(ctx, &sum)?;
        let Some(b) = b else {
            candle_core::bail!("a post-norm block is built with LayerNorm");
        };
        Ok(BlockOut {
            terms: vec![Term::Norm { x: sum, w, b, eps }],
            stash,
        })
    }

    /// Final norm and head: logits `[rows, classes]` in the compute dtype. LM: one row per token
    /// (vocabulary logits); pooler/classifier: one row per sequence from the first token.
    /// `BertModel` has no task head, so the pooler's `tanh(dense(x0))` output is used directly as
    /// logits over `hidden` classes: the step then trains exactly the parameters BertModel has.
    pub fn head(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let x = match &self.final_norm {
            Some(n) => n.forward_to(ctx, x, ctx.dtype)?,
            None => x.clone(),
        };
        match &self.head {
            HeadLayer::Lm(w) => {
                let w = match (w, &self.embedding) {
                    (Some(w), _) => ctx.w(*w)?,
                    (None, Embedding::Tokens { tok, .. }) => ctx.w(*tok)?,
                    (None, Embedding::Patches { .. }) => {
                        candle_core::bail!("a tied LM head needs token embeddings")
                    }
                };
                let (b, s, h) = x.dims3()?;
                x.reshape((b * s, h))?.matmul(&w.t()?)
            }
            HeadLayer::Pooler(l) => l.forward(ctx, &x.narrow(1, 0, 1)?.squeeze(1)?)?.tanh(),
            HeadLayer::Classifier(l) => l.forward(ctx, &x.narrow(1, 0, 1)?.squeeze(1)?),
        }
    }

    /// Final norm, head and mean cross-entropy against `targets`. The LM head and its loss are
    /// one node keeping the head's input and the fp32 log-probabilities ([`joins::lm_loss`]).
    pub fn head_loss(&self, ctx: &Ctx, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if let HeadLayer::Lm(w) = &self.head {
            let x = match &self.final_norm {
                Some(n) => n.forward_to(ctx, x, ctx.dtype)?,
                None => x.clone(),
            };
            let w = match (w, &self.embedding) {
                (Some(w), _) => ctx.w(*w)?,
                (None, Embedding::Tokens { tok, .. }) => ctx.w(*tok)?,
                (None, Embedding::Patches { .. }) => {
                    candle_core::bail!("a tied LM head needs token embeddings")
                }
            };
            let (b, s, h) = x.dims3()?;
            return joins::lm_loss(&x.reshape((b * s, h))?, &w, targets);
        }
        super::ops::cross_entropy(&self.head(ctx, x)?, targets)
    }

    /// Number of classes of the logits (vocabulary, hidden for the pooler, or classes).
    pub fn classes(&self) -> usize {
        match self.spec.head {
            Head::Lm => self.spec.vocab as usize,
            Head::Pooler => self.spec.hidden as usize,
            Head::Classifier { classes } => classes as usize,
        }
    }
}

/// A SwiGLU feed-forward whose norm and projections are all frozen and unadapted, with its
/// norm, as one term over the segment input `x` ([`FrozenSwiGlu`]); None for any other.
fn frozen_swiglu(
    ctx: &Ctx,
    blk: &Block,
    norm: &Norm,
    x: &Tensor,
    site: u64,
) -> Result<Option<Term>> {
    let Ffn::Dense(Mlp::Swiglu { gate, up, down }) = &blk.ffn else {
        return Ok(None);
    };
    let frozen = |l: &Linear| !l.keeps_input(ctx) && l.b.is_none();
    let trainable = |idx: Option<usize>| idx.is_some_and(|i| ctx.store.params[i].trainable);
    if !(frozen(gate) && frozen(up) && frozen(down)) || trainable(Some(norm.w)) || trainable(norm.b)
    {
        return Ok(None);
    }
    let (gamma, beta, eps) = norm.params(ctx, x)?;
    let (b, s, _) = x.dims3()?;
    let shape = (b, s, down.d_out).into();
    let drop = ctx
        .dropout_mask(&shape, ctx.dtype, x.device(), site + 2)?
        .map(|m| (m, ctx.dropout));
    let weights = (
        gate.tensors(ctx)?.0,
        up.tensors(ctx)?.0,
        down.tensors(ctx)?.0,
    );
    Ok(Some(Term::FrozenSwiGlu(FrozenSwiGlu::new(
        x.clone(),
        FrozenNorm { gamma, beta, eps },
        weights,
        ctx.dtype,
        drop,
    ))))
}

/// The feed-forward's output terms (without the residual) for its normed input `ffn_in`.
fn ffn_terms(ctx: &Ctx, blk: &Block, ffn_in: &Tensor, site: u64) -> Result<Vec<Term>> {
    let mut terms = Vec::new();
    match &blk.ffn {
        // a fused activation (not the composed gelu_new) and an unadapted last linear: one term,
        // so the linear's input is freed once its backward has run
        Ffn::Dense(Mlp::Gelu { fc1, fc2, act })
            if !matches!(act, Activation::GeluNew | Activation::GeluFast) && fc2.lora.is_none() =>
        {
            let h = fc1.forward(ctx, ffn_in)?;
            let (hb, hs, _) = h.dims3()?;
            let shape = (hb, hs, fc2.d_out).into();
            let drop = ctx
                .dropout_mask(&shape, h.dtype(), h.device(), site + 2)?
                .map(|m| (m, ctx.dropout));
            let (w, b) = fc2.tensors(ctx)?;
            terms.push(Term::ActLinear(joins::ActLinear::new(
                h,
                Act::Gelu,
                w,
                b,
                drop,
            )));
        }
        // unadapted projections: one term, so the product and silu(gate) are freed as their
        // backward passes
        Ffn::Dense(Mlp::Swiglu { gate, up, down })
            if gate.lora.is_none()
                && up.lora.is_none()
                && down.lora.is_none()
                && down.b.is_none() =>
        {
            let g = gate.forward(ctx, ffn_in)?;
            let u = up.forward(ctx, &ctx.autocast_copy(ffn_in, up.keeps_input(ctx))?)?;
            let (hb, hs, _) = g.dims3()?;
            let shape = (hb, hs, down.d_out).into();
            let drop = ctx
                .dropout_mask(&shape, g.dtype(), g.device(), site + 2)?
                .map(|m| (m, ctx.dropout));
            let (w, _) = down.tensors(ctx)?;
            terms.push(Term::SwiGlu(joins::SwiGluLinear::new(g, u, w, drop)));
        }
        Ffn::Dense(mlp) => {
            let hidden = mlp.hidden(ctx, ffn_in)?;
            let last = mlp.last();
            let (hb, hs, _) = hidden.dims3()?;
            let shape = (hb, hs, last.d_out).into();
            let drop = ctx
                .dropout_mask(&shape, hidden.dtype(), hidden.device(), site + 2)?
                .map(|m| (m, ctx.dropout));
            terms.push(match last.adapted(ctx)? {
                Some((a, b, lora)) => Term::Lora {
                    x: hidden,
                    a,
                    b,
                    lora,
                    drop,
                },
                None => {
                    let (w, b) = last.tensors(ctx)?;
                    Term::Linear {
                        x: hidden,
                        w,
                        b,
                        drop,
                        merge: None,
                    }
                }
            });
        }
        // no dropout on the MoE output (Mixtral, Qwen2-MoE have none)
        Ffn::Moe(moe) => terms.extend(moe.forward(ctx, ffn_in)?.into_iter().map(|t| match t {
            MoeTerm::Routed(r) => Term::Routed(r),
            MoeTerm::Linear { x, w } => Term::Linear {
                x,
                w,
                b: None,
                drop: None,
                merge: None,
            },
        })),
    }
    Ok(terms)
}
