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
    /// torch-autocast style: fp32 master weights and grads, compute in bf16.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// Same with fp16 compute.
    #[serde(rename = "fp16-mixed")]
    Fp16Mixed,
    /// Pure bf16 weights and grads, fp32 master copy inside the optimizer (Megatron/ZeRO style).
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
    /// Half-precision weights and grads (fp32 master held by the optimizer).
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
}

impl Optimizer {
    pub fn as_str(self) -> &'static str {
        match self {
            Optimizer::AdamW => "adamw",
            Optimizer::SgdMomentum => "sgd-momentum",
            Optimizer::Sgd => "sgd",
        }
    }
    /// fp32 state tensors per parameter (Adam: m and v; momentum: one buffer).
    pub fn states_per_param(self) -> u64 {
        match self {
            Optimizer::AdamW => 2,
            Optimizer::SgdMomentum => 1,
            Optimizer::Sgd => 0,
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
            _ => input_err(
                "optimizer",
                format!("'{s}' is unknown; accepted adamw, sgd-momentum, sgd"),
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
}

impl Checkpointing {
    pub fn as_str(self) -> &'static str {
        match self {
            Checkpointing::None => "none",
            Checkpointing::Full => "full",
        }
    }
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
            _ => input_err(
                "checkpointing",
                format!("'{s}' is unknown; accepted none, full"),
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
}

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
        if self.zero_stage > 3 {
            return input_err(
                "zero",
                format!("stage {} is unknown; accepted 0, 1, 2, 3", self.zero_stage),
            );
        }
        Ok(())
    }
}
