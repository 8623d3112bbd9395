//! What runs a measured training step: candle (embedded, the default) or PyTorch (the reference
//! users train with, run through a bundled Python runner: src/harness/torch/), and the options
//! both take (warm-up and measured steps, seed).

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// candle, embedded in vramcal: no Python needed. Schema-1/2 CSVs held the device kind in
    /// this column (`cpu`, `cuda`); every such row was measured by candle.
    #[default]
    #[serde(alias = "cpu", alias = "cuda")]
    Candle,
    /// PyTorch with transformers' own model classes (needs `pip install torch transformers`)
    Torch,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Candle => "candle",
            Backend::Torch => "torch",
        }
    }

    /// How this backend trains LoRA adapters over a 16-bit base: the PyTorch runner as peft's
    /// defaults do (fp32 adapters, each casting its input), candle in the weights' dtype with no
    /// cast. What a row of this backend is planned with.
    pub fn adapter_dtype(self) -> crate::plan::finetune::AdapterDtype {
        match self {
            Backend::Candle => crate::plan::finetune::AdapterDtype::Base,
            Backend::Torch => crate::plan::finetune::AdapterDtype::Fp32,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one point is measured, by either backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasureOptions {
    pub warmup: u32,
    pub repeats: u32,
    pub seed: u64,
    /// what runs the steps: candle here, or PyTorch in a Python child
    #[serde(default)]
    pub backend: Backend,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            warmup: 2,
            repeats: 5,
            seed: 0,
            backend: Backend::Candle,
        }
    }
}
