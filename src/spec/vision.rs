//! The vision tower of a vision-language model (Gemma 3, LLaVA, Qwen2-VL) as data on the language
//! model's spec: a ViT-style encoder (SigLIP, CLIP, Qwen's) over each image's patches, and the multimodal
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

/// The widest patch merger accepted (Qwen and Mistral 3 merge 2 x 2).
pub const MAX_MERGE: u64 = 16;

/// The encoder block a tower is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TowerKind {
    /// LayerNorm → biased q, k, v, o → residual → LayerNorm → biased `hidden → ffn → hidden` MLP
    /// → residual, learned positions, a final LayerNorm (transformers' `SiglipEncoderLayer` and
    /// `CLIPEncoderLayer` alike)
    #[default]
    Vit,
    /// Qwen2-VL's and Qwen3-VL's: the same block with one fused biased qkv and 2-D rotary
    /// positions, no final norm (the merger has its own); Qwen3-VL adds a position table it
    /// interpolates
    QwenVit,
    /// Qwen2.5-VL's: RMSNorm, fused biased qkv with 2-D rotary positions, a biased SwiGLU MLP;
    /// windowed attention in all blocks but a few (planned as full attention: an upper bound
    /// for eager's scores)
    QwenSwiglu,
    /// Pixtral's (Mistral 3, Pixtral-12B): RMSNorm, bias-free q, k, v, o with 2-D rotary
    /// positions, a bias-free gated MLP, an RMSNorm before the first block and none after
    Pixtral,
}

/// The vision tower: `layers` blocks over each image's `(image / patch)²` patches (of
/// `temporal_patch` frames each, Qwen's 3-D patches), and the projector's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VisionTower {
    #[serde(default)]
    pub kind: TowerKind,
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub ffn: u64,
    /// the MLP's activation (SigLIP `gelu_pytorch_tanh`, CLIP and Qwen2-VL `quick_gelu`,
    /// Qwen2.5-VL `silu` on the gate)
    pub activation: Activation,
    pub channels: u64,
    pub patch: u64,
    /// frames per patch (Qwen's video-ready patches repeat a still image twice); 1 otherwise
    #[serde(default = "one")]
    pub temporal_patch: u64,
    /// pixels per side of each image (or crop): fixed by the config for SigLIP and CLIP, the
    /// image processor's resize for Qwen's native-resolution towers (`--image`)
    pub image: u64,
    /// a learned class token before the patches, with a position of its own (CLIP)
    pub class_token: bool,
    /// the patch convolution has a bias (SigLIP; CLIP's and Qwen's have none)
    pub patch_bias: bool,
    /// a LayerNorm over the embeddings before the first block (CLIP's `pre_layrnorm`)
    pub pre_norm: bool,
    /// SigLIP's attention-pooling head (`vision_use_head`: a probe token, one multi-head
    /// attention, a LayerNorm and an MLP): built, but unused by the wrappers, which read every
    /// patch's output
    #[serde(default)]
    pub pool_head: bool,
    /// rows of a learned position table the tower interpolates to each image's grid (Qwen3-VL's
    /// `num_position_embeddings`); SigLIP's and CLIP's one row per token are counted apart
    #[serde(default)]
    pub position_rows: u64,
    /// tokens each image puts into the language model's sequence (Gemma 3's pooled 256, LLaVA's
    /// patches, Qwen's and Mistral 3's merged quarter); 0 where it varies (LLaVA-NeXT's tiles)
    #[serde(default)]
    pub lm_tokens: u64,
    /// neighbouring patches per side a merger joins into one language-model token (Qwen,
    /// Mistral 3: 2); 1 without a merger
    #[serde(default = "one")]
    pub merge: u64,
    /// parameters of the multimodal projector (and any other weights the wrapper adds, such as
    /// LLaVA-NeXT's image-newline row or Qwen's patch merger)
    pub projector: u64,
    /// vision-encoder passes per sample: images, or crops of a tiled image (`--images`)
    pub images: u64,
}

fn one() -> u64 {
    1
}

/// A tower with none of the optional parts (no class token, patch bias, pre-norm, pooling head
/// or position table; one frame per patch, no merger, no projector, one image) and no sizes: what
/// the parsers fill in (`validate` refuses it until they have).
impl Default for VisionTower {
    fn default() -> Self {
        VisionTower {
            kind: TowerKind::Vit,
            layers: 0,
            hidden: 0,
            heads: 0,
            ffn: 0,
            activation: Activation::Gelu,
            channels: 3,
            patch: 0,
            temporal_patch: 1,
            image: 0,
            class_token: false,
            patch_bias: false,
            pre_norm: false,
            pool_head: false,
            position_rows: 0,
            lm_tokens: 0,
            merge: 1,
            projector: 0,
            images: 1,
        }
    }
}

impl VisionTower {
    /// Patch tokens per image, with the class token.
    pub fn tokens(&self) -> u64 {
        let side = self.image / self.patch.max(1);
        side * side + u64::from(self.class_token)
    }

    /// Tokens one image puts into the language model's sequence at the tower's image side when
    /// a merger sets them: the patches over `merge²`.
    pub fn merged_tokens(&self) -> u64 {
        let side = self.image / self.patch.max(1);
        side * side / (self.merge * self.merge).max(1)
    }

    /// Whether `--image` may set the image side: Qwen's and Pixtral's towers take images at their
    /// own resolution (rotary positions); SigLIP's and CLIP's position tables fix it.
    pub fn native_resolution(&self) -> bool {
        self.kind != TowerKind::Vit
    }

    /// Weights of the patch projection.
    fn patch_weights(&self) -> u64 {
        self.channels * self.temporal_patch * self.patch * self.patch * self.hidden
    }

    /// Parameters of the encoder: patch projection, class token, position table, the blocks and
    /// the norms around them.
    pub fn encoder_params(&self) -> u64 {
        let (h, f) = (self.hidden, self.ffn);
        let conv = self.patch_weights() + if self.patch_bias { h } else { 0 };
        match self.kind {
            TowerKind::Vit => {
                let class = if self.class_token { h } else { 0 };
                let positions = self.tokens() * h;
                // q, k, v, o with biases; fc1, fc2 with biases; two LayerNorms
                let block = 4 * (h * h + h) + 2 * h * f + f + h + 2 * 2 * h;
                let norms = 2 * h * (1 + u64::from(self.pre_norm));
                // probe, fused in-projection and out-projection with biases, LayerNorm, MLP
                let head = if self.pool_head {
                    4 * h * h + 2 * h * f + f + 8 * h
                } else {
                    0
                };
                conv + class + positions + self.layers * block + norms + head
            }
            // fused qkv and proj with biases, fc1 and fc2 with biases, two LayerNorms
            // (Qwen3-VL adds a learned position table)
            TowerKind::QwenVit => {
                conv + self.position_rows * h
                    + self.layers * (4 * (h * h + h) + 2 * h * f + f + h + 2 * 2 * h)
            }
            // fused qkv and proj with biases, gate, up and down with biases, two RMSNorms
            TowerKind::QwenSwiglu => {
                conv + self.layers * (4 * (h * h + h) + 3 * h * f + 2 * f + h + 2 * h)
            }
            // the pre-norm, then bias-free q, k, v, o and gate, up, down, two RMSNorms
            TowerKind::Pixtral => conv + h + self.layers * (4 * h * h + 3 * h * f + 2 * h),
        }
    }

    /// Everything the tower and projector add to the language model.
    pub fn params(&self) -> u64 {
        self.encoder_params() + self.projector
    }

    /// Weights that multiply each of the tower's tokens (the blocks' linears and the patch
    /// projection), for its FLOPs.
    pub fn matmul_per_token(&self) -> u64 {
        let (h, f) = (self.hidden, self.ffn);
        let mlp = match self.kind {
            TowerKind::QwenSwiglu | TowerKind::Pixtral => 3 * h * f,
            TowerKind::Vit | TowerKind::QwenVit => 2 * h * f,
        };
        self.layers * (4 * h * h + mlp) + self.patch_weights()
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
        check_range("vision temporal patch", self.temporal_patch, 1, 1 << 8)?;
        check_range("vision image", self.image, self.patch, 1 << 16)?;
        check_range("projector", self.projector, 0, 1 << 40)?;
        check_range("images", self.images, 1, MAX_IMAGES)?;
        check_range("spatial_merge_size", self.merge, 1, MAX_MERGE)?;
        Ok(())
    }
}
