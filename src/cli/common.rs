//! Flags shared by `estimate` and `measure`: the training configuration, and its parser.
//!
//! Numeric flags are taken as text and parsed here, so a bad value (zero, negative, absurd, not
//! a number) becomes one line naming the flag with exit code 2, never clap's multi-line usage.

use crate::error::{check_range, input_err};
use crate::spec::{Attention, OptimizerImpl, TrainSpec};

/// Parses an integer flag, naming it on failure.
pub fn parse_int(field: &str, s: &str) -> anyhow::Result<u64> {
    match s.trim().parse::<u64>() {
        Ok(n) => Ok(n),
        Err(_) => input_err(
            field,
            format!("'{s}' is not a whole number; accepted a positive integer"),
        ),
    }
}

/// Parses an optional integer flag, naming it on failure.
pub fn parse_opt_int(field: &str, s: Option<&str>) -> anyhow::Result<Option<u64>> {
    s.map(|s| parse_int(field, s)).transpose()
}

/// Who reads the flags, which decides what a flag left out means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defaults {
    /// `measure`: one GPU whatever the ZeRO stage (it simulates one rank's shard), and what the
    /// candle harness runs: eager attention, a tensor-by-tensor optimizer.
    Harness,
    /// `estimate`: a ZeRO stage 1-3 needs `--gpus` (it plans real sharding), and what PyTorch
    /// training runs by default today: sdpa attention (transformers' default), AdamW `foreach`
    /// without ZeRO (PyTorch's CUDA default) and `fused` under ZeRO (DeepSpeed's FusedAdam).
    Planner,
}

/// A transformer's shape, declared once for `estimate` (an explicit model: --layers, --hidden and
/// --heads together) and `measure` (overrides on the --model preset).
#[derive(Debug, clap::Args)]
pub struct ShapeFlags {
    /// Transformer blocks (estimate: of an explicit transformer; measure: overrides the preset's)
    #[arg(long, allow_hyphen_values = true)]
    pub layers: Option<String>,
    /// Hidden size (measure: the preset's FFN width scales with it unless --ffn is given)
    #[arg(long, allow_hyphen_values = true)]
    pub hidden: Option<String>,
    /// Attention heads (measure: the preset's heads/kv-heads ratio is kept)
    #[arg(long, allow_hyphen_values = true)]
    pub heads: Option<String>,
    /// FFN width [estimate default: 4 x hidden]
    #[arg(long, allow_hyphen_values = true)]
    pub ffn: Option<String>,
    /// Vocabulary size [estimate default: 50257, GPT-2's]
    #[arg(long, allow_hyphen_values = true)]
    pub vocab: Option<String>,
}

/// The training configuration: batch, input size, precision, optimizer, checkpointing, ZeRO.
#[derive(Debug, clap::Args)]
pub struct TrainFlags {
    /// Per-GPU micro-batch
    #[arg(long, allow_hyphen_values = true, default_value = "1")]
    pub batch: String,
    /// Sequence length (text transformers) [default: 512]
    #[arg(long, allow_hyphen_values = true)]
    pub seq: Option<String>,
    /// Image side in pixels (CNNs, ViT; Qwen2/2.5/3-VL's and Pixtral's vision towers)
    /// [default: 224; measure: a ViT preset's own; Qwen's towers: 448; Pixtral: its image_size]
    #[arg(long, allow_hyphen_values = true)]
    pub image: Option<String>,
    /// fp32; bf16-mixed / fp16-mixed = torch autocast (fp32 weights, gradients and AdamW
    /// moments plus a 16-bit weight copy; under ZeRO DeepSpeed's 16-bit weights and gradients
    /// with fp32 master and moments); bf16 = true bf16 (weights, gradients and moments all bf16,
    /// 8 B/param with AdamW)
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// adamw, adamw-8bit (bitsandbytes block-wise 8-bit moments), sgd-momentum, sgd
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// How the optimizer step runs: foreach (PyTorch's CUDA default; AdamW allocates one
    /// state-sized temporary per parameter), fused (no temporaries; DeepSpeed's FusedAdam), loop
    /// (one tensor at a time) [estimate: foreach, fused under ZeRO; measure: loop]
    #[arg(long)]
    pub optimizer_impl: Option<String>,
    /// none, full (recompute every block), selective (recompute the attention core only,
    /// Korthikanti et al. 2022)
    #[arg(long, default_value = "none")]
    pub checkpointing: String,
    /// Attention kernels: sdpa (fused FlashAttention / memory-efficient, no b·a·s² scores
    /// stored) or eager (composed softmax(QK^T)V) [estimate: sdpa; measure: eager]
    #[arg(long)]
    pub attention: Option<String>,
    /// ZeRO stage 0-3 (estimate: needs --gpus; measure: simulated, this rank's shard only)
    #[arg(long, allow_hyphen_values = true, default_value = "0")]
    pub zero: String,
    /// Data-parallel GPUs the ZeRO shards divide over [default: 1]
    #[arg(long, allow_hyphen_values = true)]
    pub gpus: Option<String>,
}

impl TrainFlags {
    /// Parses and validates the flags. `dims` turns the `--seq` and `--image` given (if any)
    /// into the sequence length and image side used; `gpus` says what a missing `--gpus` means.
    pub fn to_train_spec(
        &self,
        dims: impl FnOnce(Option<u64>, Option<u64>) -> (u64, u64),
        defaults: Defaults,
    ) -> anyhow::Result<TrainSpec> {
        let zero = parse_int("zero", &self.zero)?;
        check_range("zero", zero, 0, 3)?;
        let gpus = match (&self.gpus, defaults) {
            (Some(g), _) => parse_int("gpus", g)?,
            (None, Defaults::Planner) if zero > 0 => {
                return input_err(
                    "gpus",
                    format!("missing: ZeRO stage {zero} shards states over the data-parallel GPUs; accepted --gpus N (N >= 1) with --zero 1-3"),
                )
            }
            (None, _) => 1,
        };
        let batch = parse_int("batch", &self.batch)?;
        let (seq, image) = dims(
            parse_opt_int("seq", self.seq.as_deref())?,
            parse_opt_int("image", self.image.as_deref())?,
        );
        let train = TrainSpec {
            batch,
            seq,
            image,
            precision: self.precision.parse()?,
            optimizer: self.optimizer.parse()?,
            checkpointing: self.checkpointing.parse()?,
            zero_stage: zero as u8,
            gpus,
            attention: match (&self.attention, defaults) {
                (Some(a), _) => a.parse()?,
                (None, Defaults::Harness) => Attention::Eager,
                (None, Defaults::Planner) => Attention::Sdpa,
            },
            optimizer_impl: match (&self.optimizer_impl, defaults) {
                (Some(i), _) => i.parse()?,
                (None, Defaults::Harness) => OptimizerImpl::Loop,
                (None, Defaults::Planner) if zero > 0 => OptimizerImpl::Fused,
                (None, Defaults::Planner) => OptimizerImpl::Foreach,
            },
            grad_accum: 1,
        };
        train.validate()?;
        Ok(train)
    }
}
