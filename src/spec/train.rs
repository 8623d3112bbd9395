//! How a model is trained: batch and input size, precision, optimizer, checkpointing, ZeRO.

use crate::error::{check_range, input_err};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in fp32.
    #[serde(rename = "fp32")]
    Fp32,
    /// torch autocast (HF Trainer `bf16=True`, Lightning `bf16-mixed`): fp32 weights, gradients
    /// and optimizer states, compute in bf16 through a cached 16-bit weight copy. Under ZeRO,
    /// DeepSpeed's layout: 16-bit weights and gradients, fp32 master copy and moments in the
    /// sharded optimizer state.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// Same with fp16 compute.
    #[serde(rename = "fp16-mixed")]
    Fp16Mixed,
    /// True bf16 (`model.to(torch.bfloat16)` with torch AdamW, torchtune, LitGPT `bf16-true`):
    /// weights, gradients and optimizer states all in bf16, no fp32 master copy (8 B/param with
    /// AdamW). Sharded the same way under ZeRO/FSDP.
    #[serde(rename = "bf16")]
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Bf16Mixed,
        Precision::Fp16Mixed,
        Precision::Bf16,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::Fp16Mixed => "fp16-mixed",
            Precision::Bf16 => "bf16",
        }
    }
    /// Bytes per element of the compute (activation) dtype.
    pub fn compute_bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            _ => 2,
        }
    }
    /// fp32 master weights with a half-precision compute copy (autocast).
    pub fn is_mixed(self) -> bool {
        matches!(self, Precision::Bf16Mixed | Precision::Fp16Mixed)
    }
    /// Half-precision weights, gradients and optimizer states, no fp32 master copy.
    pub fn is_pure_half(self) -> bool {
        matches!(self, Precision::Bf16)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "bf16-mixed" => Ok(Precision::Bf16Mixed),
            "fp16-mixed" | "f16-mixed" => Ok(Precision::Fp16Mixed),
            "bf16" => Ok(Precision::Bf16),
            _ => input_err(
                "precision",
                format!("'{s}' is unknown; accepted fp32, bf16-mixed, fp16-mixed, bf16"),
            ),
        }
    }
}

/// Optimizer, which decides the per-parameter optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Optimizer {
    #[serde(rename = "adamw")]
    AdamW,
    #[serde(rename = "sgd-momentum")]
    SgdMomentum,
    #[serde(rename = "sgd")]
    Sgd,
    /// AdamW with both moments quantised to 8 bits in blocks of 2048 with an fp32 absmax per
    /// block (bitsandbytes `AdamW8bit`; Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    /// Quantization"). Planner only: the harness trains adamw, sgd-momentum and sgd.
    #[serde(rename = "adamw-8bit")]
    AdamW8bit,
}

impl Optimizer {
    pub fn as_str(self) -> &'static str {
        match self {
            Optimizer::AdamW => "adamw",
            Optimizer::SgdMomentum => "sgd-momentum",
            Optimizer::Sgd => "sgd",
            Optimizer::AdamW8bit => "adamw-8bit",
        }
    }
    /// State tensors per parameter (Adam: m and v; momentum: one buffer).
    pub fn states_per_param(self) -> u64 {
        match self {
            Optimizer::AdamW | Optimizer::AdamW8bit => 2,
            Optimizer::SgdMomentum => 1,
            Optimizer::Sgd => 0,
        }
    }
    /// Optimizer-state bytes per parameter when full-width states take `state_bytes` each (4 in
    /// fp32, 2 in true bf16). 8-bit AdamW: two 1-byte moments plus an fp32 absmax per 2048-block
    /// of each.
    pub fn state_bytes_per_param(self, state_bytes: f64) -> f64 {
        match self {
            Optimizer::AdamW8bit => 2.0 * (1.0 + 4.0 / 2048.0),
            other => other.states_per_param() as f64 * state_bytes,
        }
    }
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Optimizer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adamw" | "adam" => Ok(Optimizer::AdamW),
            "sgd-momentum" | "momentum" => Ok(Optimizer::SgdMomentum),
            "sgd" => Ok(Optimizer::Sgd),
            "adamw-8bit" | "adamw8bit" => Ok(Optimizer::AdamW8bit),
            _ => input_err(
                "optimizer",
                format!("'{s}' is unknown; accepted adamw, adamw-8bit, sgd-momentum, sgd"),
            ),
        }
    }
}

/// Activation (gradient) checkpointing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Checkpointing {
    #[serde(rename = "none")]
    None,
    /// Keep only each block's input; recompute the block in backward.
    #[serde(rename = "full")]
    Full,
    /// Recompute only the attention core (QK^T, softmax, dropout, AV) in backward, keep the
    /// rest (Korthikanti et al. 2022, "selective activation recomputation"): the b·a·s² tensors
    /// are not stored. Planner only; with fused (sdpa) attention there is nothing left to drop.
    #[serde(rename = "selective")]
    Selective,
}

impl Checkpointing {
    pub fn as_str(self) -> &'static str {
        match self {
            Checkpointing::None => "none",
            Checkpointing::Full => "full",
            Checkpointing::Selective => "selective",
        }
    }
    /// Full checkpointing: only block inputs are stored, blocks are recomputed in backward.
    pub fn is_on(self) -> bool {
        self == Checkpointing::Full
    }
}

impl fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Checkpointing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "off" | "false" => Ok(Checkpointing::None),
            "full" | "on" | "true" => Ok(Checkpointing::Full),
            "selective" => Ok(Checkpointing::Selective),
            _ => input_err(
                "checkpointing",
                format!("'{s}' is unknown; accepted none, full, selective"),
            ),
        }
    }
}

/// How attention is computed, which decides whether the b·a·s² score tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Attention {
    /// softmax(QK^T/sqrt(d))V composed of separate ops (transformers' `eager`): the scores'
    /// softmax output, its dropout mask and output are saved for backward, b·a·s² each.
    #[serde(rename = "eager")]
    Eager,
    /// The fused kernels PyTorch's `scaled_dot_product_attention` dispatches to
    /// (FlashAttention-2, memory-efficient attention; transformers' default `sdpa`): saves q,
    /// k, v, the output and the row log-sum-exp; backward recomputes scores tile by tile.
    #[serde(rename = "sdpa")]
    Sdpa,
    /// sdpa's math fallback, which runs when no fused kernel can (a CPU with attention dropout
    /// in training): composed like eager attention, keeping the same b·a·s² tensors, but with
    /// 16-bit inputs upcast to fp32 first, so those tensors are fp32 (PyTorch's
    /// `_scaled_dot_product_attention_math` on a CPU). Never asked for: [`Attention::kernels_on`]
    /// picks it, so it is written (a plan's JSON) but never read from a file.
    #[serde(rename = "math", skip_deserializing)]
    Math,
}

impl Attention {
    pub fn as_str(self) -> &'static str {
        match self {
            Attention::Eager => "eager",
            Attention::Sdpa => "sdpa",
            Attention::Math => "math",
        }
    }

    /// Bytes of one stored score element per byte of the compute dtype: 2 for sdpa's math path
    /// over 16-bit inputs (it keeps fp32 scores), else 1.
    pub fn score_upcast(self, compute_bytes: u64) -> f64 {
        if self == Attention::Math && compute_bytes < 4 {
            4.0 / compute_bytes as f64
        } else {
            1.0
        }
    }

    /// The measured block implementation this attention's saved tensors follow: the math path
    /// keeps what eager attention keeps.
    pub fn block_kind(self) -> Self {
        match self {
            Attention::Math => Attention::Eager,
            other => other,
        }
    }
    /// What measured rows and spec files written before the field existed ran: the harness's
    /// composed attention.
    pub fn legacy() -> Self {
        Attention::Eager
    }

    /// The kernels that really run. PyTorch's CPU flash kernel
    /// (`_scaled_dot_product_flash_attention_for_cpu`) has no dropout, so sdpa with attention
    /// dropout in training on a CPU runs the math path, which saves the b·a·s² probabilities,
    /// their dropout mask and the dropped probabilities like eager attention (measured:
    /// tiny-gpt b4 s256 fp32 saved 45.9 MB under both), in fp32 for 16-bit inputs
    /// ([`Attention::Math`]). CUDA's flash and memory-efficient kernels apply dropout inside the
    /// tile (they keep only the RNG seed and offset).
    pub fn kernels_on(self, on_cpu: bool, attention_dropout: bool) -> Self {
        if self == Attention::Sdpa && on_cpu && attention_dropout {
            Attention::Math
        } else {
            self
        }
    }
}

impl fmt::Display for Attention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Attention {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "eager" => Ok(Attention::Eager),
            "sdpa" | "flash" | "flash-attention" => Ok(Attention::Sdpa),
            _ => input_err(
                "attention",
                format!("'{s}' is unknown; accepted eager, sdpa"),
            ),
        }
    }
}

/// How the optimizer step is executed, which decides its transient memory (PyTorch
/// torch/optim/adamw.py: `foreach`, `fused`, or the single-tensor for-loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OptimizerImpl {
    /// Multi-tensor ops over the whole parameter group (PyTorch's default on CUDA): AdamW's
    /// `_foreach_sqrt(exp_avg_sq)` materialises one state-sized temporary for every parameter
    /// this rank updates.
    #[serde(rename = "foreach")]
    Foreach,
    /// One fused kernel per group (`fused=True`, DeepSpeed's FusedAdam, apex): no temporaries.
    #[serde(rename = "fused")]
    Fused,
    /// One parameter tensor at a time (`foreach=False`): temporaries of the largest tensor only.
    #[serde(rename = "loop")]
    Loop,
}

impl OptimizerImpl {
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerImpl::Foreach => "foreach",
            OptimizerImpl::Fused => "fused",
            OptimizerImpl::Loop => "loop",
        }
    }
    /// The harness's optimizer updates tensor by tensor; measured rows written before the field
    /// existed ran that way.
    pub fn legacy() -> Self {
        OptimizerImpl::Loop
    }
}

impl fmt::Display for OptimizerImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OptimizerImpl {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "foreach" => Ok(OptimizerImpl::Foreach),
            "fused" => Ok(OptimizerImpl::Fused),
            "loop" | "for-loop" | "single-tensor" => Ok(OptimizerImpl::Loop),
            _ => input_err(
                "optimizer-impl",
                format!("'{s}' is unknown; accepted foreach, fused, loop"),
            ),
        }
    }
}

/// One training configuration. `seq` is used by text transformers, `image` by CNNs and ViTs
/// (whose sequence length follows from image and patch size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub batch: u64,
    pub seq: u64,
    pub image: u64,
    pub precision: Precision,
    pub optimizer: Optimizer,
    pub checkpointing: Checkpointing,
    /// ZeRO stage 0-3 (0 = plain data parallel, full replica per GPU).
    pub zero_stage: u8,
    /// Data-parallel GPUs the states are sharded over.
    pub gpus: u64,
    /// Attention kernels; files written before the field existed mean the harness's eager.
    #[serde(default = "Attention::legacy")]
    pub attention: Attention,
    /// Optimizer execution; files written before the field existed mean the harness's loop.
    #[serde(default = "OptimizerImpl::legacy")]
    pub optimizer_impl: OptimizerImpl,
    /// Micro-batches per optimizer step (gradient accumulation); files written before the
    /// field existed mean 1.
    #[serde(default = "one_micro_batch")]
    pub grad_accum: u64,
}

fn one_micro_batch() -> u64 {
    1
}

/// Upper bound of `grad_accum` (a typo guard, far above any real schedule).
pub const MAX_GRAD_ACCUM: u64 = 1 << 16;

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            batch: 1,
            seq: 512,
            image: 224,
            precision: Precision::Fp32,
            optimizer: Optimizer::AdamW,
            checkpointing: Checkpointing::None,
            zero_stage: 0,
            gpus: 1,
            // What the candle harness runs and what files written before these fields meant;
            // `vramcal estimate` defaults to PyTorch's sdpa and foreach instead (cli::common).
            attention: Attention::legacy(),
            optimizer_impl: OptimizerImpl::legacy(),
            grad_accum: 1,
        }
    }
}

/// Upper bounds that catch typos (a batch of 10^12) before they become absurd plans.
pub const MAX_BATCH: u64 = 1 << 24;
pub const MAX_SEQ: u64 = 1 << 24;
pub const MAX_IMAGE: u64 = 1 << 16;
pub const MAX_GPUS: u64 = 1 << 20;

impl TrainSpec {
    pub fn validate(&self) -> anyhow::Result<()> {
        check_range("batch", self.batch, 1, MAX_BATCH)?;
        check_range("seq", self.seq, 1, MAX_SEQ)?;
        check_range("image", self.image, 1, MAX_IMAGE)?;
        check_range("gpus", self.gpus, 1, MAX_GPUS)?;
        check_range("grad-accum", self.grad_accum, 1, MAX_GRAD_ACCUM)?;
        if self.zero_stage > 3 {
            return input_err(
                "zero",
                format!("stage {} is unknown; accepted 0, 1, 2, 3", self.zero_stage),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Attention;

    /// PyTorch's CPU flash kernel has no dropout: sdpa with attention dropout on a CPU is the
    /// math path (eager memory); on CUDA, or without dropout, sdpa stays fused; eager stays eager.
    #[test]
    fn sdpa_with_cpu_dropout_runs_the_math_path() {
        assert_eq!(Attention::Sdpa.kernels_on(true, true), Attention::Math);
        assert_eq!(Attention::Sdpa.kernels_on(true, false), Attention::Sdpa);
        assert_eq!(Attention::Sdpa.kernels_on(false, true), Attention::Sdpa);
        assert_eq!(Attention::Eager.kernels_on(false, false), Attention::Eager);
    }
}
