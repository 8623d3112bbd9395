//! `estimate --expert-parallel` / `--capacity-factor` (mixture of experts), `--target-seq`
//! (encoder-decoder) and `--images` (vision-language): the model-layout flags, written onto the
//! model's [`Moe`](crate::spec::moe::Moe) / [`EncDec`](crate::spec::encdec::EncDec) /
//! [`VisionTower`](crate::spec::vision::VisionTower), where the planner reads them.

use super::common::parse_int;
use crate::error::{input_err, rename_field};
use crate::spec::moe::{CapacityFactor, MAX_CAPACITY_FACTOR};
use crate::spec::{ModelSpec, TrainSpec};

/// The model with the flags' expert layout; an input error naming the flag when the model has
/// no experts or a value is out of range (expert parallelism must divide the experts and the
/// GPUs).
/// The flags as the user wrote them (`None` when not given).
pub struct LayoutFlags<'a> {
    pub target_seq: Option<&'a str>,
    pub images: Option<&'a str>,
    /// `--image`, which for a vision-language model with a native-resolution tower (Qwen2-VL,
    /// Qwen2.5-VL, Qwen3-VL, Pixtral) is the side its images are resized to
    pub image: Option<&'a str>,
    pub expert_parallel: Option<&'a str>,
    pub capacity_factor: Option<&'a str>,
}

impl LayoutFlags<'_> {
    pub fn apply(&self, model: ModelSpec, train: &TrainSpec) -> anyhow::Result<ModelSpec> {
        apply(model, self, train)
    }
}

fn apply(model: ModelSpec, a: &LayoutFlags, train: &TrainSpec) -> anyhow::Result<ModelSpec> {
    let model = image_side(images(target_seq(model, a)?, a)?, a)?;
    if a.expert_parallel.is_none() && a.capacity_factor.is_none() {
        return Ok(model);
    }
    let flag = if a.expert_parallel.is_some() {
        "expert-parallel"
    } else {
        "capacity-factor"
    };
    let ModelSpec::Transformer(t) = model else {
        return input_err(
            flag,
            "applies to mixture-of-experts models only; accepted with a Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V2/V3 config",
        );
    };
    let Some(mut moe) = t.extras.moe.as_deref().copied() else {
        return input_err(
            flag,
            format!(
                "{} has no experts; accepted with a Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V2/V3 config",
                t.name
            ),
        );
    };
    if let Some(s) = a.expert_parallel {
        let ep = parse_int("expert-parallel", s)?;
        if ep == 0 || !train.gpus.is_multiple_of(ep) {
            return input_err(
                "expert-parallel",
                format!(
                    "{ep} does not divide --gpus {}; accepted a divisor of the GPUs and of the {} experts",
                    train.gpus, moe.experts
                ),
            );
        }
        moe.expert_parallel = ep;
    }
    if let Some(s) = a.capacity_factor {
        match s.trim().parse::<f32>() {
            Ok(v) if v.is_finite() && v > 0.0 && v <= MAX_CAPACITY_FACTOR => {
                moe.capacity_factor = CapacityFactor(v)
            }
            _ => {
                return input_err(
                    "capacity-factor",
                    format!(
                        "'{s}' is not a capacity factor; accepted a number above 0 and at most {MAX_CAPACITY_FACTOR}"
                    ),
                )
            }
        }
    }
    let mut t = t;
    t.extras.moe = Some(Box::new(moe));
    t.validate().map_err(|e| {
        rename_field(e, |f| match f {
            "expert_parallel" => Some("expert-parallel".into()),
            "capacity_factor" => Some("capacity-factor".into()),
            _ => None,
        })
    })?;
    Ok(ModelSpec::Transformer(t))
}

/// `--target-seq`: the decoder's tokens per sample of an encoder-decoder model.
fn target_seq(model: ModelSpec, a: &LayoutFlags) -> anyhow::Result<ModelSpec> {
    let Some(s) = a.target_seq else {
        return Ok(model);
    };
    let ModelSpec::Transformer(mut t) = model else {
        return input_err(
            "target-seq",
            "applies to encoder-decoder models only; accepted with a T5, mT5 or BART config",
        );
    };
    let Some(mut e) = t.extras.enc_dec.as_deref().copied() else {
        return input_err(
            "target-seq",
            format!(
                "{} has no decoder stack; accepted with a T5, mT5 or BART config",
                t.name
            ),
        );
    };
    let n = parse_int("target-seq", s)?;
    crate::error::check_range("target-seq", n, 1, crate::spec::train::MAX_SEQ)?;
    if t.max_positions > 0 && n > t.max_positions {
        return input_err(
            "target-seq",
            format!(
                "{n} exceeds the model's {} learned positions; accepted 1..={}",
                t.max_positions, t.max_positions
            ),
        );
    }
    e.target_seq = n;
    t.extras.enc_dec = Some(Box::new(e));
    Ok(ModelSpec::Transformer(t))
}

/// `--images`: vision-encoder passes per sample of a vision-language model (images, or the crops
/// of a tiled image).
fn images(model: ModelSpec, a: &LayoutFlags) -> anyhow::Result<ModelSpec> {
    const WITH: &str =
        "accepted with a Gemma 3, PaliGemma, LLaVA, LLaVA-NeXT, Mistral 3, Qwen2/2.5/3-VL or Llama 4 config";
    let Some(s) = a.images else {
        return Ok(model);
    };
    let ModelSpec::Transformer(mut t) = model else {
        return input_err(
            "images",
            format!("applies to vision-language models only; {WITH}"),
        );
    };
    let Some(mut v) = t.extras.vision.as_deref().copied() else {
        return input_err("images", format!("{} has no vision tower; {WITH}", t.name));
    };
    let n = parse_int("images", s)?;
    crate::error::check_range("images", n, 1, crate::spec::vision::MAX_IMAGES)?;
    v.images = n;
    t.extras.vision = Some(Box::new(v));
    Ok(ModelSpec::Transformer(t))
}

/// `--image` on a vision-language model: the image side of a native-resolution tower; a
/// fixed-resolution tower (SigLIP, CLIP) refuses it, naming its size. Other models read it as
/// the training image side (CNNs, ViT).
fn image_side(model: ModelSpec, a: &LayoutFlags) -> anyhow::Result<ModelSpec> {
    let Some(s) = a.image else {
        return Ok(model);
    };
    let ModelSpec::Transformer(mut t) = model else {
        return Ok(model);
    };
    let Some(mut v) = t.extras.vision.as_deref().copied() else {
        return Ok(ModelSpec::Transformer(t));
    };
    if !v.native_resolution() {
        return input_err(
            "image",
            format!(
                "{}'s vision tower takes {}x{} images (its config.json image_size); accepted \
                 without --image, or with a Qwen2/2.5/3-VL or Pixtral-tower config",
                t.name, v.image, v.image
            ),
        );
    }
    let n = parse_int("image", s)?;
    crate::error::check_range("image", n, v.patch, 1 << 16)?;
    v.image = n;
    // a merger's language-model tokens follow the patches
    if v.lm_tokens > 0 {
        v.lm_tokens = v.merged_tokens();
    }
    t.extras.vision = Some(Box::new(v));
    Ok(ModelSpec::Transformer(t))
}
