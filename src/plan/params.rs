//! Exact parameter counts, itemised, for transformers and CNNs.

use crate::plan::moe;
use crate::spec::transformer::{FfnKind, Head, HeadTransform, NormKind, QkNorm, TransformerSpec};
use crate::spec::ModelSpec;
use serde::Serialize;

/// Parameter count of a transformer, split the way people reason about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TransformerParams {
    /// token, position, token-type embeddings, embedding norm; ViT: patch conv, class token, positions
    pub embedding: u64,
    /// attention projections of one block
    pub attention_per_layer: u64,
    /// feed-forward of one block (of a dense block in a mixture-of-experts model)
    pub mlp_per_layer: u64,
    /// feed-forward of one MoE block, every expert (0 without experts)
    pub moe_mlp_per_layer: u64,
    /// blocks with an MoE feed-forward (0 without experts)
    pub moe_layers: u64,
    /// what one token's forward uses: `total` less the routed experts it is not sent to
    /// (equal to `total` without experts)
    pub active: u64,
    /// encoder-decoder: decoder blocks (0 otherwise)
    pub decoder_layers: u64,
    /// encoder-decoder: one decoder block, with its cross-attention and third norm
    pub decoder_per_layer: u64,
    /// encoder-decoder: T5's relative-position bias tables, both stacks (in `embedding`)
    pub rel_bias: u64,
    /// the norms of one block
    pub norms_per_layer: u64,
    pub final_norm: u64,
    /// LM head (0 when tied), pooler or classifier
    pub head: u64,
    pub total: u64,
    /// weights that take part in a matrix multiply per token (FLOP count): block linears plus
    /// the head's projection (a tied LM head still multiplies), ViT patch projection.
    pub matmul: u64,
    /// of `matmul`: the block linears' weights over all blocks
    pub block_matmul: u64,
}

fn norm_params(kind: NormKind, h: u64) -> u64 {
    match kind {
        NormKind::Layernorm => 2 * h,
        NormKind::Rmsnorm => h,
    }
}

pub fn transformer(t: &TransformerSpec) -> TransformerParams {
    let h = t.hidden;
    let x = &t.extras;
    let b = |n: u64| if t.bias { n } else { 0 };
    let hd = t.head_dim();
    let q = t.q_width();
    let kv = t.kv_heads * hd;
    // DeepSeek's latent attention has its own projections (and two low-rank RMSNorms)
    let (attn_w, mla_norms) = match &x.mla {
        Some(m) => m.params(h, t.heads),
        None => (h * q + 2 * h * kv + q * h, 0),
    };
    let attn_b = if t.attn_bias() {
        q + 2 * kv + h
    } else if t.qkv_bias {
        q + 2 * kv
    } else {
        0
    };
    // DeBERTa-v2's unshared position projections act on the relative-position table, not on
    // the tokens: parameters, but no per-token matmul
    let sinks = if x.attn_sinks { t.heads } else { 0 };
    let attention_per_layer = attn_w + attn_b + mla_norms + x.pos_proj as u64 * (h * h + h) + sinks;
    let (mlp_w, mlp_b) = match t.ffn_kind {
        FfnKind::Gelu => (2 * h * t.ffn, t.ffn + h),
        FfnKind::Swiglu => (3 * h * t.ffn, 2 * t.ffn + h),
    };
    let mlp_per_layer = mlp_w + b(mlp_b);
    let norm_h = norm_params(t.norm, h);
    let qk_norms = match x.qk_norm {
        QkNorm::None => 0,
        QkNorm::PerHead => 2 * norm_params(t.norm, hd),
        QkNorm::Full => norm_params(t.norm, q) + norm_params(t.norm, kv),
    };
    let norms_per_layer = x.block_norms.unwrap_or(2) * norm_h + qk_norms;
    // OPT: the token embedding (and a tied head) at a narrower width, projected in and out
    let e = t.embed_width();
    let proj = if e != h { 2 * e * h } else { 0 };
    // ELECTRA: every embedding table and the embedding norm at a narrower width, then a
    // biased linear up to `hidden`
    let (emb_w, emb_norm, emb_up) = match x.factorized_embedding {
        Some(f) if f != h => (f, norm_params(t.norm, f), f * h + h),
        _ => (h, norm_h, 0),
    };
    let (embedding, patch_w) = match &t.patch {
        Some(p) => {
            let conv_w = p.channels * p.patch * p.patch * h;
            // conv weight + bias, class token, one position per patch and the class token
            (conv_w + h + h + p.seq_for(p.image) * h, conv_w)
        }
        None => (
            t.vocab * if emb_up > 0 { emb_w } else { e }
                + (t.max_positions + x.position_offset as u64 + t.type_vocab) * emb_w
                + proj
                + emb_up
                + if t.embedding_norm { emb_norm } else { 0 }
                + x.rel_positions as u64 * h
                + if x.rel_norm { norm_h } else { 0 },
            0,
        ),
    };
    // a dense (and norm) between the last block and the head's projection
    let transform = match x.head_transform {
        HeadTransform::None => 0,
        HeadTransform::Dense => h * h + h,
        HeadTransform::DenseNorm => h * h + h + norm_h,
    };
    let transform_w = if transform > 0 { h * h } else { 0 };
    // encoder-decoder: the decoder's own position table, embedding norm, relative-position bias
    // and final norm beside the encoder's (the token embedding is shared)
    let stacks = if x.enc_dec.is_some() { 2 } else { 1 };
    let rel_bias = x
        .enc_dec
        .as_ref()
        .map_or(0, |e| 2 * e.rel_buckets * t.heads);
    let embedding = match (&t.patch, &x.enc_dec) {
        (None, Some(_)) => {
            embedding
                + (t.max_positions + x.position_offset as u64) * emb_w
                + if t.embedding_norm { emb_norm } else { 0 }
                + rel_bias
        }
        _ => embedding,
    };
    let final_norm = if t.final_norm { stacks * norm_h } else { 0 };
    let (head, head_matmul) = match t.head {
        Head::Lm => (
            if t.tied_embeddings { 0 } else { t.vocab * e }
                + if x.lm_head_bias { t.vocab } else { 0 }
                + transform,
            t.vocab * e + transform_w,
        ),
        Head::Pooler => (h * h + h + transform, h * h + transform_w),
        Head::Classifier { classes } => {
            (h * classes + classes + transform, h * classes + transform_w)
        }
    };
    let per_layer = attention_per_layer + mlp_per_layer + norms_per_layer;
    // mixture of experts: `moe_layers` blocks carry the MoE feed-forward instead of the MLP
    let (moe_layers, moe_mlp, moe_active) = match &x.moe {
        Some(m) => {
            let p = moe::MoeParams::new(t, m);
            (m.moe_layers(t.layers), p.block(m), p.block_active(m))
        }
        None => (0, 0, 0),
    };
    let dense_layers = t.layers - moe_layers;
    let outside = embedding + final_norm + head;
    // decoder blocks: the encoder's block plus cross-attention (its q, k, v, o) and its norm
    let (decoder_layers, decoder_per_layer) = match &x.enc_dec {
        Some(e) => (e.decoder_layers, per_layer + attention_per_layer + norm_h),
        None => (0, 0),
    };
    let block_matmul = dense_layers * (attn_w + mlp_w)
        + moe_layers * (attn_w + moe_active)
        + decoder_layers * (2 * attn_w + mlp_w);
    let decoder = decoder_layers * decoder_per_layer;
    // a vision-language model's tower and projector: in `total` and `active`, not in `matmul`,
    // which multiplies the language model's tokens
    let vision = x.vision.as_ref().map_or(0, |v| v.params());
    TransformerParams {
        embedding,
        attention_per_layer,
        mlp_per_layer,
        moe_mlp_per_layer: moe_mlp,
        moe_layers,
        active: outside
            + dense_layers * per_layer
            + moe_layers * (per_layer - mlp_per_layer + moe_active)
            + decoder
            + vision,
        norms_per_layer,
        final_norm,
        head,
        total: outside
            + dense_layers * per_layer
            + moe_layers * (per_layer - mlp_per_layer + moe_mlp)
            + decoder
            + vision,
        decoder_layers,
        decoder_per_layer,
        rel_bias,
        matmul: block_matmul + head_matmul + patch_w + proj,
        block_matmul,
    }
}

impl TransformerParams {
    /// Parameters of one block: a dense one, or with `moe` an MoE one (every expert).
    pub fn block(&self, moe: bool) -> u64 {
        self.attention_per_layer
            + self.norms_per_layer
            + if moe {
                self.moe_mlp_per_layer
            } else {
                self.mlp_per_layer
            }
    }

    /// Matmul weights outside the blocks: the head's projection, a ViT's patch projection and
    /// an OPT-style embedding projection.
    pub fn head_matmul_and_patch(&self) -> u64 {
        self.matmul - self.block_matmul
    }
}

/// Exact trainable parameter count.
pub fn count(model: &ModelSpec) -> u64 {
    match model {
        ModelSpec::Transformer(t) => transformer(t).total,
        ModelSpec::Cnn(c) => c.params(),
    }
}

/// The rule-of-thumb approximation 12*L*d^2 (attention 4d^2 + MLP 8d^2 per layer, embeddings ignored).
pub fn seed_approx(t: &TransformerSpec) -> u64 {
    12 * t.layers * t.hidden * t.hidden
}

/// Elements of the largest single parameter tensor. Transient per-tensor buffers scale with it:
/// a non-fused optimizer's update temporaries and the weight-gradient matmul output are
/// allocated one tensor at a time, so the biggest tensor sets the size of that bump.
pub fn largest_tensor(model: &ModelSpec) -> u64 {
    use crate::spec::cnn::CnnLayer;
    fn cnn_max(l: &CnnLayer) -> u64 {
        match l {
            CnnLayer::Conv {
                k_h,
                k_w,
                c_in,
                c_out,
                ..
            } => k_h * k_w * c_in * c_out,
            CnnLayer::Linear { d_in, d_out, .. } => d_in * d_out,
            CnnLayer::Residual { body, shortcut } => {
                body.iter().chain(shortcut).map(cnn_max).max().unwrap_or(0)
            }
            _ => 0,
        }
    }
    match model {
        ModelSpec::Cnn(c) => c.layers.iter().map(cnn_max).max().unwrap_or(0),
        ModelSpec::Transformer(t) => {
            let h = t.hidden;
            let q = t.q_width();
            let kv = t.kv_heads * t.head_dim();
            // fused QKV when every head has its own K/V, separate projections under GQA
            let qkv = if t.kv_heads == t.heads {
                3 * h * q
            } else {
                h * q.max(kv)
            };
            let e = t.embed_width();
            let head = match t.head {
                Head::Lm => t.vocab * e,
                Head::Pooler => h * h,
                Head::Classifier { classes } => h * classes,
            };
            let embed = match &t.patch {
                Some(p) => p.channels * p.patch * p.patch * h,
                None => t.vocab * e,
            };
            // transformers 5 stores each MoE block's experts as one tensor: gate and up of all
            // experts fused, `experts x 2 expert_ffn x hidden` (a rank's `experts / ep` of them)
            let experts = t.extras.moe.as_ref().map_or(0, |m| {
                m.experts / m.expert_parallel.max(1) * 2 * m.expert_ffn * h
            });
            // Phi-3's and GLM's gate and up are one `2f x h` tensor
            let mlp = if t.extras.fused_gate_up {
                2 * h * t.ffn
            } else {
                h * t.ffn
            };
            [qkv, mlp, head, embed, t.max_positions * h, experts]
                .into_iter()
                .max()
                .unwrap_or(0)
        }
    }
}
