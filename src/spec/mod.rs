//! What is being trained. One set of spec types shared by the planner and the harness.

pub mod activation;
pub mod cnn;
pub mod cnn_file;
pub mod encdec;
pub mod hf_config;
pub mod hf_keys;
pub mod hf_vision;
pub mod moe;
pub mod presets;
pub mod safetensors;
pub mod train;
pub mod transformer;
pub mod vision;

pub use cnn::CnnSpec;
pub use train::{Attention, Checkpointing, Optimizer, OptimizerImpl, Precision, TrainSpec};
pub use transformer::TransformerSpec;

use serde::{Deserialize, Serialize};

/// Model family: coefficients are fitted per family because their activation features differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Transformer,
    Cnn,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Transformer => "transformer",
            Family::Cnn => "cnn",
        }
    }
}

/// A model is built once per plan or sweep point and passed by reference, so the transformer
/// variant's size (its block extras) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "family")]
pub enum ModelSpec {
    Transformer(TransformerSpec),
    Cnn(CnnSpec),
}

impl ModelSpec {
    pub fn name(&self) -> &str {
        match self {
            ModelSpec::Transformer(t) => &t.name,
            ModelSpec::Cnn(c) => &c.name,
        }
    }
    pub fn family(&self) -> Family {
        match self {
            ModelSpec::Transformer(_) => Family::Transformer,
            ModelSpec::Cnn(_) => Family::Cnn,
        }
    }
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            ModelSpec::Transformer(t) => t.validate(),
            ModelSpec::Cnn(c) => c.validate(),
        }
    }
    /// Validates the model together with one training input size.
    pub fn validate_for(&self, train: &TrainSpec) -> anyhow::Result<()> {
        self.validate()?;
        train.validate()?;
        match self {
            ModelSpec::Transformer(t) => {
                if let Some(p) = &t.patch {
                    crate::error::check_range("image", train.image, p.patch, 1 << 16)?;
                }
                t.check_seq(train.seq)
            }
            ModelSpec::Cnn(c) => c.walk(train.image).map(|_| ()),
        }
    }
}
