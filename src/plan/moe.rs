//! Mixture-of-experts arithmetic: the parameters of an MoE feed-forward (all experts vs the
//! top-k a token uses), what one rank holds under expert parallelism, and the activations of
//! the routed tokens and the router. (`plan::memory` assembles these into states and features.) Formulas and sources: docs/architecture.md,
//! "Mixture of experts".

use crate::spec::moe::Moe;
use crate::spec::transformer::TransformerSpec;

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
        MoeParams {
            per_expert: 3 * h * m.expert_ffn,
            router: h * m.experts,
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
/// blocks `ffn`, MoE blocks `top_k x capacity_factor x expert_ffn` (each routed copy of a token
/// runs one expert) plus the shared expert's width. Returns (mean width, widest block's width).
pub fn ffn_widths(t: &TransformerSpec) -> (f64, f64) {
    let f = t.ffn as f64;
    let Some(m) = &t.extras.moe else {
        return (f, f);
    };
    let moe_w = m.routed_per_token() * m.expert_ffn as f64 + m.shared_ffn as f64;
    let l = t.layers as f64;
    let dense = m.dense_layers as f64;
    let mean = (dense * f + (l - dense) * moe_w) / l;
    let widest = if m.dense_layers > 0 {
        f.max(moe_w)
    } else {
        moe_w
    };
    (mean, widest)
}

/// Bytes the MoE blocks save for backward beyond a dense block's, per token of one live MoE
/// block (multiply by b·s and the live MoE blocks), known from transformers' MoE forward rather
/// than fitted: the router's logits (compute dtype) and their fp32 softmax (`routing_weights`,
/// `F.softmax(..., dtype=torch.float)`), and, for every routed copy beyond the one token a dense
/// MLP reads, the gathered expert input and the expert output before it is weighted (two
/// hidden-wide tensors in the compute dtype).
pub fn extra_bytes_per_token(t: &TransformerSpec, compute_bytes: f64) -> f64 {
    let Some(m) = &t.extras.moe else {
        return 0.0;
    };
    let router = m.experts as f64 * (compute_bytes + 4.0);
    let copies = (m.routed_per_token() - 1.0).max(0.0);
    router + copies * 2.0 * t.hidden as f64 * compute_bytes
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
