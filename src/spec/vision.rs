//! The vision tower of a vision-language model (Gemma 3, LLaVA) as data on the language model's
//! spec: a ViT-style encoder (SigLIP, CLIP) over each image's patches, and the multimodal
//! projector that maps its output into the language model's embedding space. The language model
//! is the spec itself; its `--seq` already counts the image tokens the projector inserts.
//! Images per sample (`--images`) are kept here, as the decoder length is on
//! [`super::encdec::EncDec`]: planner functions take the model and the training spec, and the
//! training spec is the harness's CSV schema.

use super::activation::Activation;
use crate::error::check_range;
use serde::{Deserialize, Serialize};

/// The most images one sample may carry (a multi-image or tiled sample; LLaVA-NeXT tiles one
/// image into up to 5 crops).
pub const MAX_IMAGES: u64 = 1 << 10;

/// A pre-LayerNorm encoder of `layers` blocks over `(image / patch)²` patches, each block
/// LayerNorm → biased q/k/v/o → residual → LayerNorm → biased `hidden → ffn → hidden` MLP →
/// residual (transformers' `SiglipEncoderLayer` and `CLIPEncoderLayer` alike), a final
/// LayerNorm, and the projector's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VisionTower {
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub ffn: u64,
    /// the MLP's activation (SigLIP `gelu_pytorch_tanh`, CLIP `quick_gelu`)
    pub activation: Activation,
    pub channels: u64,
    pub patch: u64,
    /// pixels per side the image processor resizes each image (or crop) to
    pub image: u64,
    /// a learned class token before the patches, with a position of its own (CLIP)
    pub class_token: bool,
    /// the patch convolution has a bias (SigLIP; CLIP's has none)
    pub patch_bias: bool,
    /// a LayerNorm over the embeddings before the first block (CLIP's `pre_layrnorm`)
    pub pre_norm: bool,
    /// parameters of the multimodal projector (and any other weights the wrapper adds, such as
    /// LLaVA-NeXT's image-newline row)
    pub projector: u64,
    /// vision-encoder passes per sample: images, or crops of a tiled image (`--images`)
    pub images: u64,
}

impl VisionTower {
    /// Patch tokens per image, with the class token.
    pub fn tokens(&self) -> u64 {
        let side = self.image / self.patch.max(1);
        side * side + u64::from(self.class_token)
    }

    /// Parameters of the encoder: patch convolution, class token, one position per token, the
    /// blocks and the norms around them.
    pub fn encoder_params(&self) -> u64 {
        let h = self.hidden;
        let conv =
            self.channels * self.patch * self.patch * h + if self.patch_bias { h } else { 0 };
        let class = if self.class_token { h } else { 0 };
        let positions = self.tokens() * h;
        // q, k, v, o with biases; fc1, fc2 with biases; two LayerNorms
        let block = 4 * (h * h + h) + 2 * h * self.ffn + self.ffn + h + 2 * 2 * h;
        let norms = 2 * h * (1 + u64::from(self.pre_norm));
        conv + class + positions + self.layers * block + norms
    }

    /// Everything the tower and projector add to the language model.
    pub fn params(&self) -> u64 {
        self.encoder_params() + self.projector
    }

    /// Weights that multiply each of the tower's tokens (the blocks' linears and the patch
    /// projection), for its FLOPs.
    pub fn matmul_per_token(&self) -> u64 {
        let h = self.hidden;
        self.layers * (4 * h * h + 2 * h * self.ffn) + self.channels * self.patch * self.patch * h
    }

    /// Range checks; `max_layers` and `max_hidden` are the spec's bounds.
    pub fn validate(&self, max_layers: u64, max_hidden: u64) -> anyhow::Result<()> {
        check_range("vision layers", self.layers, 1, max_layers)?;
        check_range("vision hidden", self.hidden, 1, max_hidden)?;
        check_range("vision heads", self.heads, 1, self.hidden)?;
        if !self.hidden.is_multiple_of(self.heads) {
            return crate::error::input_err(
                "vision heads",
                format!(
                    "{} does not divide the vision hidden size {}; accepted a divisor of it",
                    self.heads, self.hidden
                ),
            );
        }
        check_range("vision ffn", self.ffn, 1, 64 * max_hidden)?;
        check_range("vision channels", self.channels, 1, 1 << 12)?;
        check_range("vision patch", self.patch, 1, 1 << 12)?;
        check_range("vision image", self.image, self.patch, 1 << 16)?;
        check_range("projector", self.projector, 0, 1 << 40)?;
        check_range("images", self.images, 1, MAX_IMAGES)?;
        Ok(())
    }
}
