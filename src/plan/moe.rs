//! Mixture-of-experts arithmetic: the parameters of an MoE feed-forward (all experts vs the
//! top-k a token uses), what one rank holds under expert parallelism, and the activations of
//! the routed tokens and the router. (`plan::memory` assembles these into states and features.) Formulas and sources: docs/architecture.md,
//! "Mixture of experts".

use crate::spec::moe::Moe;
use crate::spec::transformer::TransformerSpec;
use crate::spec::Precision;

/// Parameters of one MoE block's feed-forward, as transformers builds it (Mixtral/Qwen MoE:
/// SwiGLU experts without biases, a bias-free `hidden -> experts` router, an optional SwiGLU
/// shared expert with a bias-free `hidden -> 1` gate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeParams {
    /// one routed expert: gate, up and down projections
    pub per_expert: u64,
    /// the router's `hidden x experts` weight
    pub router: u64,
    /// the shared expert and its gate
    pub shared: u64,
}

impl MoeParams {
    pub fn new(t: &TransformerSpec, m: &Moe) -> Self {
        let h = t.hidden;
        let shared = if m.shared_ffn > 0 {
            3 * h * m.shared_ffn + if m.shared_gate { h } else { 0 }
        } else {
            0
        };
        let expert_bias = if m.expert_bias {
            2 * m.expert_ffn + h
        } else {
            0
        };
        MoeParams {
            per_expert: 3 * h * m.expert_ffn + expert_bias,
            router: h * m.experts + if m.router_bias { m.experts } else { 0 },
            shared,
        }
    }

    /// The whole feed-forward of one MoE block (every expert).
    pub fn block(&self, m: &Moe) -> u64 {
        m.experts * self.per_expert + self.router + self.shared
    }

    /// What one token's forward uses: its top-k experts, the router and the shared expert.
    pub fn block_active(&self, m: &Moe) -> u64 {
        m.top_k * self.per_expert + self.router + self.shared
    }

    /// The feed-forward's weights that multiply per token (FLOPs): all of the active ones.
    pub fn block_matmul(&self, m: &Moe) -> u64 {
        self.block_active(m)
    }
}

/// Routed experts' parameters over all MoE blocks: what expert parallelism divides.
pub fn expert_params(t: &TransformerSpec) -> u64 {
    match &t.extras.moe {
        Some(m) => m.moe_layers(t.layers) * m.experts * MoeParams::new(t, m).per_expert,
        None => 0,
    }
}

/// The expert-parallel degree in effect on `gpus` ranks: the requested one, or with fewer GPUs
/// than it (the GPU-choice search tries 1, 2, 4, ...) the largest degree both allow,
/// `gcd(ep, gpus)`.
pub fn effective_ep(m: &Moe, gpus: u64) -> u64 {
    gcd(m.expert_parallel, gpus).max(1)
}

/// Routed-expert parameters of one MoE block that a rank does not hold under expert parallelism
/// (the other ranks' experts): ZeRO-3 gathers one block at a time without them.
pub fn unheld_per_block(t: &TransformerSpec, gpus: u64) -> u64 {
    match &t.extras.moe {
        Some(m) => {
            let ep = effective_ep(m, gpus);
            (m.experts - m.experts / ep) * MoeParams::new(t, m).per_expert
        }
        None => 0,
    }
}

/// Routed-expert parameters over all MoE blocks that a rank does not hold under expert
/// parallelism: what its optimizer never updates.
pub fn unheld(t: &TransformerSpec, gpus: u64) -> u64 {
    t.extras
        .moe
        .as_ref()
        .map_or(0, |m| m.moe_layers(t.layers) * unheld_per_block(t, gpus))
}

/// Feed-forward widths per token for the activation model, averaged over the blocks: dense
/// blocks `ffn`, MoE blocks their shared expert's width (a dense SwiGLU MLP over every token;
/// the routed experts are known bytes, [`extra_bytes_per_token`]). Returns (mean width, widest
/// block's per-token width for the backward workspace: an MoE block's `top_k x capacity_factor
/// x expert_ffn + shared`).
pub fn ffn_widths(t: &TransformerSpec) -> (f64, f64) {
    let f = t.ffn as f64;
    let Some(m) = &t.extras.moe else {
        return (f, f);
    };
    let moe_w = m.routed_per_token() * m.expert_ffn as f64 + m.shared_ffn as f64;
    let l = t.layers as f64;
    let dense = m.dense_layers as f64;
    let mean = (dense * f + (l - dense) * m.shared_ffn as f64) / l;
    let widest = if m.dense_layers > 0 {
        f.max(moe_w)
    } else {
        moe_w
    };
    (mean, widest)
}

/// Bytes a live MoE block saves per token beyond its dense part (the norms, attention and shared
/// expert, which the block coefficients or per-feature terms count), known from transformers 5's
/// default experts path (`grouped_mm_experts_forward`, `MixtralTopKRouter`; measured with
/// saved-tensor hooks): the router's fp32 softmax (E·4), top-k ids, their sum and renormalised
/// weights (k·8 + 4 + k·4); per routed pair (k·cf per token) the sort permutation, its inverse and
/// the gather's indices (3 int64), the pair's fp32 weight, and in the experts' dtype (the
/// weights': fp32 under autocast, which grouped_mm bypasses) the gathered input and the expert
/// output (2h) and the gate/up output, SiLU output and product (4·f_e; gpt-oss's clamped GLU
/// 7·f_e, `Moe::clamped_glu`). A gated shared expert
/// adds its gated output (h, compute dtype) and, under autocast, the gate's fp16 copy of the
/// input (h).
pub fn extra_bytes_per_token(t: &TransformerSpec, p: Precision) -> f64 {
    let Some(m) = &t.extras.moe else {
        return 0.0;
    };
    let (h, k) = (t.hidden as f64, m.top_k as f64);
    let expert_bytes = if p.is_pure_half() { 2.0 } else { 4.0 };
    let cb = p.compute_bytes() as f64;
    let router = m.experts as f64 * 4.0 + k * 12.0 + 4.0;
    // gpt-oss's clamped activation keeps three more expert-width tensors per pair (measured
    // with transformers' GptOssExperts on a CPU: 12 B per element in fp32, 11.2-11.3 under
    // autocast)
    let glu_tensors = if m.clamped_glu { 7.0 } else { 4.0 };
    let pair = 3.0 * 8.0 + 4.0 + (2.0 * h + glu_tensors * m.expert_ffn as f64) * expert_bytes;
    let shared_gate = if m.shared_ffn > 0 && m.shared_gate {
        h * cb + if p.is_mixed() { h * cb } else { 0.0 }
    } else {
        0.0
    };
    router + m.routed_per_token() * pair + shared_gate
}

/// MoE blocks among the live ones: all of them, or under full checkpointing the share one live
/// block has of being an MoE block (the recomputed block at the peak is an MoE block in a
/// model of all-MoE blocks).
pub fn live_moe_layers(t: &TransformerSpec, live: f64) -> f64 {
    match &t.extras.moe {
        Some(m) => live * m.moe_layers(t.layers) as f64 / t.layers as f64,
        None => 0.0,
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
