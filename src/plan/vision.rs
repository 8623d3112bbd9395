//! A vision-language model's vision tower as the planner prices it: the encoder as a ViT spec
//! (whose measured block is the ViT one) for its activations (`plan::memory::vision_features`),
//! and its training FLOPs (`plan::time`).

use crate::spec::presets;
use crate::spec::transformer::{Arch, BlockExtras, DropoutP, Head, PatchEmbed, TransformerSpec};
use crate::spec::vision::{TowerKind, VisionTower};
use crate::spec::{Attention, TrainSpec};

/// The tower's encoder as the measured block it is built like, priced at `batch x images`
/// samples of one image each: SigLIP, CLIP and Qwen2-VL as a ViT (whose input is the pixel
/// batch, `channels x temporal_patch` per patch pixel; Qwen2-VL's rotary copies of q and k are
/// not in the ViT block), Qwen2.5-VL's and Pixtral's RMSNorm/gated-MLP blocks as a non-causal
/// Llama block (with its rotary copies). The pooler head stands for the final norm (b·h elements, nothing next
/// to the blocks).
pub fn stack(v: &VisionTower, name: &str) -> TransformerSpec {
    let name = format!("{name} vision tower");
    if matches!(v.kind, TowerKind::QwenSwiglu | TowerKind::Pixtral) {
        return TransformerSpec {
            arch: Arch::Encoder,
            head: Head::Pooler,
            tied_embeddings: false,
            dropout: Some(DropoutP(0.0)),
            activation: Some(v.activation),
            // Qwen's one fused qkv: under sdpa the value view keeps the whole fused output
            // (Pixtral's separate q, k, v are the Llama block's)
            extras: BlockExtras {
                fused_qkv: v.kind == TowerKind::QwenSwiglu,
                ..BlockExtras::default()
            },
            ..presets::llama(&name, v.layers, v.hidden, v.heads, v.heads, v.ffn, 1)
        };
    }
    TransformerSpec {
        ffn: v.ffn,
        head: Head::Pooler,
        dropout: Some(DropoutP(0.0)),
        activation: Some(v.activation),
        patch: Some(PatchEmbed {
            image: v.image,
            patch: v.patch,
            channels: v.channels * v.temporal_patch,
        }),
        ..presets::vit(&name, v.layers, v.hidden, v.heads, v.image, v.patch, 1)
    }
}

/// The training step the tower takes: `batch x images` images at its own image size. Pixtral
/// runs every image of the micro-batch as one sequence of all their patches under a
/// block-diagonal mask (transformers' `PixtralVisionModel`), so its eager scores grow with the
/// square of the images ([`block_mask_bytes`] adds sdpa's mask).
pub fn train(v: &VisionTower, train: &TrainSpec) -> TrainSpec {
    let images = train.batch.saturating_mul(v.images);
    let (batch, seq) = if v.kind == TowerKind::Pixtral {
        (1, images.saturating_mul(v.tokens()))
    } else {
        (images, v.tokens())
    };
    TrainSpec {
        batch,
        image: v.image,
        seq,
        ..train.clone()
    }
}

/// Pixtral's block-diagonal mask over all the micro-batch's patches, `N² ` elements in the
/// compute dtype: sdpa's kernel with a mask saves it for backward (once, shared by the blocks);
/// eager attention adds it to the scores without keeping it. 0 for other towers.
pub fn block_mask_bytes(v: &VisionTower, train: &TrainSpec) -> f64 {
    if v.kind != TowerKind::Pixtral || train.attention != Attention::Sdpa {
        return 0.0;
    }
    let n = train.batch as f64 * v.images as f64 * v.tokens() as f64;
    n * n * train.precision.compute_bytes() as f64
}

/// The tower's (dense, attention) FLOPs of forward + backward: its linears and patch projection
/// over every patch token of the `batch x images` images, and its attention core. (0, 0)
/// without a tower.
pub fn flops(t: &TransformerSpec, train: &TrainSpec) -> (f64, f64) {
    let Some(v) = t.extras.vision.as_deref() else {
        return (0.0, 0.0);
    };
    let images = train.batch as f64 * v.images as f64;
    let tokens = v.tokens() as f64;
    (
        6.0 * v.matmul_per_token() as f64 * images * tokens,
        12.0 * v.layers as f64 * images * tokens * tokens * v.hidden as f64,
    )
}
