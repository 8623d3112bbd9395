//! Mixture-of-experts feed-forward, as data on a transformer spec: how many experts, how many
//! each token is routed to, their widths, a shared expert, and the dense blocks among the MoE
//! ones; plus the two training-layout choices the planner needs with it (expert parallelism and
//! the capacity factor), kept here because every planner function takes the model and the
//! training spec, and the training spec is the harness's CSV schema.

use crate::error::{check_range, input_err};
use serde::{Deserialize, Serialize};

/// Capacity factor: routed token slots per expert relative to an even split (`tokens x top_k /
/// experts`). 1.0 is dropless routing in expectation, which is what transformers' MoE blocks do
/// (every token goes to its top-k experts, none is dropped or padded); GShard/Switch-style
/// implementations pad each expert to `capacity_factor x` that share (1.25 is common).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CapacityFactor(pub f32);

impl Eq for CapacityFactor {}

impl std::hash::Hash for CapacityFactor {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

impl Default for CapacityFactor {
    fn default() -> Self {
        CapacityFactor(1.0)
    }
}

/// Largest accepted capacity factor (a typo guard: at `experts / top_k` every expert already has
/// room for every token).
pub const MAX_CAPACITY_FACTOR: f32 = 64.0;

/// The MoE feed-forward of a transformer's sparse blocks (SwiGLU experts, a bias-free linear
/// router over the experts): Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Moe {
    /// routed experts in each MoE block
    pub experts: u64,
    /// experts each token is routed to
    pub top_k: u64,
    /// intermediate width of one routed expert
    pub expert_ffn: u64,
    /// intermediate width of the always-used shared expert (Qwen2-MoE); 0 for none
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_ffn: u64,
    /// a sigmoid gate (hidden -> 1 linear) scaling the shared expert's output (Qwen2-MoE)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_gate: bool,
    /// blocks whose feed-forward is the dense MLP of the spec's `ffn` instead (Qwen's
    /// `decoder_sparse_step` / `mlp_only_layers`)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dense_layers: u64,
    /// expert-parallel degree: each rank holds `experts / expert_parallel` of every MoE block's
    /// experts (1 = every rank holds all)
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub expert_parallel: u64,
    #[serde(default, skip_serializing_if = "is_default_cf")]
    pub capacity_factor: CapacityFactor,
    /// biases on each routed expert's fused gate/up (`2 x expert_ffn`) and down (`hidden`)
    /// projections (gpt-oss)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expert_bias: bool,
    /// a bias on the router (gpt-oss)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub router_bias: bool,
    /// the experts' gated activation clamps gate and up and computes `(up + 1) · gate ·
    /// σ(α · gate)` (gpt-oss): three more expert-width tensors kept per routed pair
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clamped_glu: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
fn one() -> u64 {
    1
}
fn is_one(n: &u64) -> bool {
    *n == 1
}
fn is_default_cf(c: &CapacityFactor) -> bool {
    *c == CapacityFactor::default()
}

impl Moe {
    /// `experts` routed experts of width `expert_ffn`, `top_k` per token; no shared expert, no
    /// dense blocks, no expert parallelism, dropless.
    pub fn routed(experts: u64, top_k: u64, expert_ffn: u64) -> Self {
        Moe {
            experts,
            top_k,
            expert_ffn,
            shared_ffn: 0,
            shared_gate: false,
            dense_layers: 0,
            expert_parallel: 1,
            capacity_factor: CapacityFactor::default(),
            expert_bias: false,
            router_bias: false,
            clamped_glu: false,
        }
    }

    /// Blocks with routed experts, of `layers`.
    pub fn moe_layers(&self, layers: u64) -> u64 {
        layers.saturating_sub(self.dense_layers)
    }

    /// Routed expert slots per token: `top_k x capacity_factor`.
    pub fn routed_per_token(&self) -> f64 {
        self.top_k as f64 * self.capacity_factor.0 as f64
    }

    /// Range checks; field names are the spec's (callers rename to config keys or flags).
    pub fn validate(&self, layers: u64) -> anyhow::Result<()> {
        check_range("experts", self.experts, 1, 1 << 16)?;
        check_range("top_k", self.top_k, 1, self.experts)?;
        check_range("expert_ffn", self.expert_ffn, 1, 1 << 22)?;
        check_range("shared_ffn", self.shared_ffn, 0, 1 << 22)?;
        check_range("dense_layers", self.dense_layers, 0, layers)?;
        check_range("expert_parallel", self.expert_parallel, 1, self.experts)?;
        if !self.experts.is_multiple_of(self.expert_parallel) {
            return input_err(
                "expert_parallel",
                format!(
                    "{} does not divide the {} experts; accepted a divisor of the experts",
                    self.expert_parallel, self.experts
                ),
            );
        }
        let cf = self.capacity_factor.0;
        if !(cf.is_finite() && cf > 0.0 && cf <= MAX_CAPACITY_FACTOR) {
            return input_err(
                "capacity_factor",
                format!("{cf} is out of range; accepted 0 < factor <= {MAX_CAPACITY_FACTOR}"),
            );
        }
        Ok(())
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank
/// bottleneck, keys and values through a shared low-rank latent plus one decoupled rotary key,
/// all as data on the spec (its `heads`, and `head_dim` = `qk_nope + qk_rope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mla {
    /// rank of the query bottleneck (`q_a_proj`, its RMSNorm, `q_b_proj`); 0 for a plain
    /// `q_proj` (DeepSeek-V2-Lite)
    pub q_lora_rank: u64,
    /// rank of the key/value latent (`kv_a_proj_with_mqa`, its RMSNorm, `kv_b_proj`)
    pub kv_lora_rank: u64,
    /// per-head query/key width without rotary
    pub qk_nope: u64,
    /// per-head rotary query/key width (the rotary key is shared by all heads)
    pub qk_rope: u64,
    /// per-head value width
    pub v_head: u64,
}

impl Mla {
    /// (matmul weights, norm weights) of one block's attention, as transformers'
    /// `DeepseekV2Attention` / `DeepseekV3Attention` build it (no biases).
    pub fn params(&self, hidden: u64, heads: u64) -> (u64, u64) {
        let qk = self.qk_nope + self.qk_rope;
        let (q, q_norm) = if self.q_lora_rank > 0 {
            (
                hidden * self.q_lora_rank + self.q_lora_rank * heads * qk,
                self.q_lora_rank,
            )
        } else {
            (hidden * heads * qk, 0)
        };
        let kv = hidden * (self.kv_lora_rank + self.qk_rope)
            + self.kv_lora_rank * heads * (self.qk_nope + self.v_head);
        let o = heads * self.v_head * hidden;
        (q + kv + o, q_norm + self.kv_lora_rank)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        check_range("q_lora_rank", self.q_lora_rank, 0, 1 << 20)?;
        check_range("kv_lora_rank", self.kv_lora_rank, 1, 1 << 20)?;
        check_range("qk_nope_head_dim", self.qk_nope, 0, 1 << 16)?;
        check_range("qk_rope_head_dim", self.qk_rope, 0, 1 << 16)?;
        check_range("v_head_dim", self.v_head, 1, 1 << 16)?;
        Ok(())
    }
}
