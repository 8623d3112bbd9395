//! HuggingFace config.json of vision-language wrappers -> the language model's spec with a
//! [`VisionTower`]: Gemma 3 (`gemma3`: SigLIP + Gemma 3), PaliGemma (`paligemma`: SigLIP +
//! Gemma or Gemma 2), LLaVA-1.5 and LLaVA-NeXT (`llava`, `llava_next`: CLIP + Llama, Vicuna or
//! Mistral; Pixtral-12B's Pixtral + Mistral), Mistral 3 (`mistral3`: Pixtral + Mistral), Qwen2-VL
//! and Qwen2.5-VL (`qwen2_vl`, `qwen2_5_vl`: Qwen's native-resolution towers + Qwen2), Qwen3-VL
//! (`qwen3_vl`, `qwen3_vl_moe`: + Qwen3 or Qwen3-MoE), Llama 4 (`llama4`: CLIP's layout with a
//! pixel-shuffle adapter + its MoE text model). The wrappers' files list only the sub-config keys that differ from the config
//! classes' defaults (gemma-3-4b-it's `text_config` has no `vocab_size`, llava-1.5-7b-hf's has
//! no widths at all), so each sub-config is read over its class's defaults, as transformers
//! builds it; the defaults below are transformers 5.24's.

use super::activation::Activation;
use super::hf_keys::{opt_bool, opt_u64, req_u64, Obj};
use super::transformer::{TransformerSpec, MAX_HIDDEN, MAX_LAYERS};
use super::vision::{TowerKind, VisionTower, MAX_IMAGES, MAX_MERGE};
use crate::error::{input_err, rename_field};
use serde_json::Value;

/// The wrappers' `model_type`s.
pub const WRAPPERS: [&str; 10] = [
    "gemma3",
    "mistral3",
    "paligemma",
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "llama4",
];

/// Config-class defaults of the language models the wrappers carry, for the keys the planner
/// reads. Only true class defaults: Llama's `head_dim` and `num_key_value_heads` default to
/// `hidden_size / num_attention_heads` and `num_attention_heads`, which the parser derives.
fn text_defaults(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "gemma3_text" => {
            r#"{"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "max_position_embeddings": 131072}"#
        }
        "gemma" => {
            r#"{"vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
            "head_dim": 256, "max_position_embeddings": 8192}"#
        }
        "gemma2" => {
            r#"{"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "max_position_embeddings": 8192}"#
        }
        "llama" => {
            r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048}"#
        }
        // Qwen2-VL's and Qwen2.5-VL's text classes (Qwen2's block, 72B's sizes by default)
        "qwen2_vl_text" | "qwen2_5_vl_text" => {
            r#"{"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "max_position_embeddings": 32768}"#
        }
        "qwen2" => {
            r#"{"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
            "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768}"#
        }
        // Qwen3-VL's text classes (Qwen3's block; the MoE one Qwen3-MoE's)
        "qwen3_vl_text" => {
            r#"{"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
            "num_hidden_layers": 32, "num_attention_heads": 32, "head_dim": 128,
            "max_position_embeddings": 128000}"#
        }
        "qwen3_vl_moe_text" => {
            r#"{"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
            "moe_intermediate_size": 1408, "num_hidden_layers": 24, "num_attention_heads": 16,
            "num_key_value_heads": 16, "head_dim": 128, "num_experts": 60,
            "num_experts_per_tok": 4, "max_position_embeddings": 128000}"#
        }
        // Llama 4 Scout's sizes
        "llama4_text" => {
            r#"{"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 16,
            "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
            "max_position_embeddings": 131072}"#
        }
        "mistral" => {
            r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072}"#
        }
        _ => return None,
    })
}

/// Defaults of the vision towers' config classes.
fn vision_defaults(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "siglip_vision_model" => {
            r#"{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
            "hidden_act": "gelu_pytorch_tanh"}"#
        }
        "clip_vision_model" => {
            r#"{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
            "hidden_act": "quick_gelu"}"#
        }
        "llama4_vision_model" => {
            r#"{"hidden_size": 768, "intermediate_size": 5632, "num_hidden_layers": 34,
            "num_attention_heads": 16, "num_channels": 3, "image_size": 448, "patch_size": 14,
            "projector_input_dim": 4096, "projector_output_dim": 4096, "vision_output_dim": 7680,
            "pixel_shuffle_ratio": 0.5, "hidden_act": "gelu"}"#
        }
        "pixtral" => {
            r#"{"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "head_dim": 64, "num_channels": 3, "image_size": 1024,
            "patch_size": 16, "hidden_act": "gelu"}"#
        }
        "qwen2_vl_vision" => {
            r#"{"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4,
            "num_heads": 16, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "hidden_act": "quick_gelu"}"#
        }
        "qwen3_vl_vision" | "qwen3_vl_moe_vision" => {
            r#"{"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
            "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": 3584, "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh"}"#
        }
        "qwen2_5_vl_vision" => {
            r#"{"depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16,
            "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": 3584, "hidden_act": "silu"}"#
        }
        _ => return None,
    })
}

/// Image side planned for Qwen's native-resolution towers without `--image`: 448 pixels, 32 x 32
/// patches of 14, which the merger turns into 256 language-model tokens.
pub const QWEN_DEFAULT_IMAGE: u64 = 448;

/// Each wrapper's sub-config classes when the file names none, and whether the wrapper ties
/// the LM head to the embedding by default.
fn wrapper_defaults(model_type: &str) -> (&'static str, &'static str, bool) {
    match model_type {
        "gemma3" => ("gemma3_text", "siglip_vision_model", true),
        "paligemma" => ("gemma", "siglip_vision_model", true),
        "mistral3" => ("mistral", "pixtral", true),
        "llama4" => ("llama4_text", "llama4_vision_model", false),
        "qwen2_vl" => ("qwen2_vl_text", "qwen2_vl_vision", false),
        "qwen2_5_vl" => ("qwen2_5_vl_text", "qwen2_5_vl_vision", false),
        "qwen3_vl" => ("qwen3_vl_text", "qwen3_vl_vision", false),
        "qwen3_vl_moe" => ("qwen3_vl_moe_text", "qwen3_vl_moe_vision", false),
        _ => ("llama", "clip_vision_model", false),
    }
}

/// `sub` (the wrapper's `text_config` / `vision_config`) over its class's defaults, with the
/// class's `model_type`; an input error naming the key when it is not an object or names a
/// class the planner has no defaults for.
fn sub_config(
    o: &Obj,
    key: &str,
    default_type: &str,
    defaults: fn(&str) -> Option<&'static str>,
    accepted: &str,
) -> anyhow::Result<Obj> {
    let given =
        match o.get(key) {
            // the wrapper's own defaults for a missing sub-config are not the class's: real files
            // always carry it
            None | Some(Value::Null) => return input_err(
                &format!("config.json {key}"),
                "missing; accepted the sub-model's config (as the model's published file has it)",
            ),
            Some(Value::Object(m)) => m.clone(),
            Some(v) => {
                return input_err(
                    &format!("config.json {key}"),
                    format!("{v} is not an object; accepted the sub-model's config"),
                )
            }
        };
    let model_type = match given.get("model_type") {
        None | Some(Value::Null) => default_type.to_string(),
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        Some(v) => {
            return input_err(
                &format!("config.json {key}.model_type"),
                format!("{v} is not a string; accepted {accepted}"),
            )
        }
    };
    // transformers 4's Qwen files name the vision class after the wrapper (`qwen2_vl`), which
    // transformers 5 reads as `qwen2_vl_vision`
    let model_type = match model_type.as_str() {
        "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "qwen3_vl_moe" if key == "vision_config" => {
            format!("{model_type}_vision")
        }
        _ => model_type,
    };
    let Some(text) = defaults(&model_type) else {
        return input_err(
            &format!("config.json {key}.model_type"),
            format!("'{model_type}' is not supported here; accepted {accepted}"),
        );
    };
    let Ok(Value::Object(mut merged)) = serde_json::from_str::<Value>(text) else {
        unreachable!("the defaults are valid JSON objects")
    };
    merged.extend(given);
    merged.insert("model_type".into(), Value::String(model_type));
    Ok(merged)
}

/// Renames `config.json <k>` in an input error to `config.json <key>.<k>`, the key's place in
/// the wrapper's file.
fn nested(err: anyhow::Error, key: &str) -> anyhow::Error {
    if key.is_empty() {
        return err;
    }
    rename_field(err, |f| {
        f.strip_prefix("config.json ")
            .map(|k| format!("config.json {key}.{k}"))
    })
}

/// A wrapper's language model with its vision tower; `parse_text` reads the `text_config` object
/// as a config.json of its own (`hf_config`'s family parsers).
pub fn parse(
    o: &Obj,
    name: &str,
    model_type: &str,
    parse_text: fn(&Obj, &str) -> anyhow::Result<TransformerSpec>,
) -> anyhow::Result<TransformerSpec> {
    let (text_type, vision_type, tie_default) = wrapper_defaults(model_type);
    const TEXT_TYPES: &str = "gemma3_text, gemma, gemma2, llama, mistral, qwen2, qwen2_vl_text, \
                              qwen2_5_vl_text, qwen3_vl_text, qwen3_vl_moe_text, llama4_text";
    let qwen = model_type.starts_with("qwen");
    // Qwen's files before transformers 5 keep the text model's keys at the top level
    let legacy_qwen = qwen && !o.contains_key("text_config");
    let text = if legacy_qwen {
        let mut top = Obj::new();
        top.insert("text_config".into(), Value::Object(Obj::new()));
        let mut t = sub_config(&top, "text_config", text_type, text_defaults, TEXT_TYPES)?;
        t.extend(
            o.iter()
                .filter(|(k, _)| *k != "vision_config")
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        t
    } else {
        sub_config(o, "text_config", text_type, text_defaults, TEXT_TYPES)?
    };
    let (text, text_key) = if qwen {
        let mut t = text;
        // the family parser's block: Qwen2's (biased q, k, v), Qwen3's (q/k norms) or
        // Qwen3-MoE's
        let family = match model_type {
            "qwen3_vl" => "qwen3",
            "qwen3_vl_moe" => "qwen3_moe",
            _ => "qwen2",
        };
        t.insert("model_type".into(), Value::String(family.into()));
        (t, if legacy_qwen { "" } else { "text_config" })
    } else {
        (text, "text_config")
    };
    let lm = parse_text(&text, name).map_err(|e| nested(e, text_key))?;
    let v = sub_config(
        o,
        "vision_config",
        vision_type,
        vision_defaults,
        "siglip_vision_model, clip_vision_model, llama4_vision_model, pixtral, qwen2_vl_vision, \
         qwen2_5_vl_vision, qwen3_vl_vision",
    )?;
    let tower = if qwen {
        qwen_tower(&v)
    } else if v.get("model_type").and_then(Value::as_str) == Some("pixtral") {
        pixtral_tower(&v)
    } else {
        tower(&v)
    }
    .map_err(|e| nested(e, "vision_config"))?;
    let (vh, th) = (tower.hidden, lm.hidden);
    // neighbouring patches per side a merger joins into one language-model token: Qwen's tower
    // reads its own `spatial_merge_size`, Mistral 3's wrapper holds it (2 by default), Llama 4's
    // pixel shuffle joins 2 x 2
    let merge = match model_type {
        "mistral3" => match o.get("spatial_merge_size") {
            None | Some(Value::Null) => 2,
            Some(_) => merge_size(o, "config.json spatial_merge_size")?,
        },
        "llama4" => 2,
        _ => tower.merge,
    };
    // Mistral 3's projector has no biases by default, LLaVA's have
    let bias = opt_bool(o, "multimodal_projector_bias", model_type != "mistral3")?;
    let b = |n: u64| if bias { n } else { 0 };
    let (projector, images) = match model_type {
        // a vision-width RMSNorm, then a bias-free projection to the text width (after pooling
        // the patches to `mm_tokens_per_image`)
        "gemma3" => (vh * th + vh, 1),
        // the patch merger: a norm over each patch, then `merge²` neighbouring patches
        // concatenated through two biased linears to the text width
        "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "qwen3_vl_moe" => {
            let (out_key, out) = if model_type == "qwen2_vl" {
                ("hidden_size", req_u64(&v, "hidden_size")?)
            } else {
                ("out_hidden_size", req_u64(&v, "out_hidden_size")?)
            };
            if out != th {
                return input_err(
                    &format!("config.json vision_config.{out_key}"),
                    format!("{out} is not the text model's hidden_size {th}; accepted {th}"),
                );
            }
            let merged = vh * merge * merge;
            let mlp = merged * merged + merged + merged * th + th;
            // Qwen2-VL's and Qwen3-VL's norm is a LayerNorm, Qwen2.5-VL's an RMSNorm
            let norm = if model_type == "qwen2_5_vl" {
                vh
            } else {
                2 * vh
            };
            // Qwen3-VL's DeepStack: one more merger (LayerNorm over the merged width) per
            // tower layer it feeds into the language model's first blocks
            let deepstack = match v.get("deepstack_visual_indexes") {
                Some(Value::Array(a)) if model_type.starts_with("qwen3") => a.len() as u64,
                _ => 0,
            };
            (norm + mlp + deepstack * (2 * merged + mlp), 1)
        }
        // a vision-width RMSNorm, a bias-free merger of `merge²` neighbouring patches back to
        // the vision width, then LLaVA's two linears
        "mistral3" => {
            let merger = vh * merge * merge * vh;
            (vh + merger + vh * th + b(th) + th * th + b(th), 1)
        }
        // the pixel-shuffle adapter (2 x 2 patches into one token) and its two bias-free
        // linears, then a bias-free projection to the text width
        "llama4" => {
            let adapter_in = req_u64(&v, "projector_input_dim")?;
            let adapter_out = req_u64(&v, "projector_output_dim")?;
            let out = req_u64(&v, "vision_output_dim")?;
            (
                tower.ffn * adapter_in + adapter_out * adapter_out + out * th,
                1,
            )
        }
        // one biased linear to `projection_dim`, which must be the text width
        "paligemma" => {
            let d = opt_u64(o, "projection_dim")?.unwrap_or(2048);
            if d != th {
                return input_err(
                    "config.json projection_dim",
                    format!("{d} is not the text model's hidden_size {th}; accepted {th}"),
                );
            }
            (vh * d + d, 1)
        }
        // two linears with a GELU between; the first reads one or several of the tower's layers
        // concatenated (`vision_feature_layer` an index or a list); LLaVA-NeXT adds its
        // image-newline row and tiles each image into a base view and up to the largest grid's
        // crops of `image_size`
        _ => {
            let feature_layers = match o.get("vision_feature_layer") {
                Some(Value::Array(a)) if !a.is_empty() => a.len() as u64,
                _ => 1,
            };
            let mlp = vh * feature_layers * th + b(th) + th * th + b(th);
            if model_type == "llava_next" {
                (mlp + th, 1 + largest_grid(o, tower.image)?)
            } else {
                (mlp, 1)
            }
        }
    };
    let top_tie = match o.get("tie_word_embeddings") {
        None | Some(Value::Null) => None,
        Some(_) => Some(opt_bool(o, "tie_word_embeddings", tie_default)?),
    };
    // transformers 5: LLaVA and Qwen2/2.5-VL tie when either their own key or the text model's
    // says so; Llama 4 only by the text model's; the other wrappers by their own key
    let tied = match (model_type, top_tie) {
        ("llava" | "qwen2_vl" | "qwen2_5_vl", t) => t == Some(true) || lm.tied_embeddings,
        // Llama 4 reads only its text model's
        ("llama4", _) => lm.tied_embeddings,
        (_, t) => t.unwrap_or(tie_default),
    };
    // the image tokens each image puts into the sequence
    let side = tower.image / tower.patch;
    let lm_tokens = match model_type {
        "gemma3" => opt_u64(o, "mm_tokens_per_image")?.unwrap_or(256),
        // a merger's tokens (Llama 4's pixel shuffle drops the class token)
        "mistral3" | "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "qwen3_vl_moe" | "llama4" => {
            side * side / (merge * merge)
        }
        // LLaVA-NeXT's tiles lose their padding rows: it varies per image
        "llava_next" => 0,
        // LLaVA's "full" strategy keeps CLIP's class token
        "llava"
            if o.get("vision_feature_select_strategy")
                .and_then(Value::as_str)
                == Some("full") =>
        {
            tower.tokens()
        }
        _ => side * side,
    };
    let mut spec = TransformerSpec {
        tied_embeddings: tied,
        ..lm
    };
    spec.extras.vision = Some(Box::new(VisionTower {
        projector,
        images,
        lm_tokens,
        merge,
        ..tower
    }));
    spec.validate()?;
    Ok(spec)
}

/// The encoder of a SigLIP, CLIP or Llama 4 `vision_config` (defaults already merged in).
fn tower(v: &Obj) -> anyhow::Result<VisionTower> {
    // CLIP's layout (class token, bias-free patch projection, pre-norm) is also Llama 4's;
    // SigLIP has none of them and a pooling head
    let clip = v.get("model_type").and_then(Value::as_str) != Some("siglip_vision_model");
    let act = activation(v)?;
    let t = VisionTower {
        kind: TowerKind::Vit,
        layers: req_u64(v, "num_hidden_layers")?,
        hidden: req_u64(v, "hidden_size")?,
        heads: req_u64(v, "num_attention_heads")?,
        ffn: req_u64(v, "intermediate_size")?,
        activation: act,
        channels: req_u64(v, "num_channels")?,
        patch: req_u64(v, "patch_size")?,
        image: req_u64(v, "image_size")?,
        class_token: clip,
        patch_bias: !clip,
        pre_norm: clip,
        // SigLIP builds its pooling head unless told not to
        pool_head: !clip && opt_bool(v, "vision_use_head", true)?,
        ..VisionTower::default()
    };
    t.validate(MAX_LAYERS, MAX_HIDDEN)
        .map_err(|e| rename_field(e, vit_key))?;
    Ok(t)
}

/// The config.json key of a SigLIP, CLIP or Pixtral tower's field.
fn vit_key(field: &str) -> Option<String> {
    Some(
        match field {
            "vision layers" => "config.json num_hidden_layers",
            "vision hidden" => "config.json hidden_size",
            "vision heads" => "config.json num_attention_heads",
            "vision ffn" => "config.json intermediate_size",
            "vision channels" => "config.json num_channels",
            "vision patch" => "config.json patch_size",
            "vision image" => "config.json image_size",
            _ => return None,
        }
        .to_string(),
    )
}

/// The encoder of a Qwen2-VL or Qwen2.5-VL `vision_config` (defaults already merged in), planned
/// at [`QWEN_DEFAULT_IMAGE`] until `--image` says otherwise.
fn qwen_tower(v: &Obj) -> anyhow::Result<VisionTower> {
    let class = v.get("model_type").and_then(Value::as_str);
    let swiglu = class == Some("qwen2_5_vl_vision");
    let qwen3 = matches!(class, Some("qwen3_vl_vision" | "qwen3_vl_moe_vision"));
    // Qwen2-VL: `embed_dim` wide, `mlp_ratio` x wider MLP (`hidden_size` is the output width);
    // Qwen2.5-VL: `hidden_size` wide with an `intermediate_size` SwiGLU; Qwen3-VL: `hidden_size`
    // wide with an `intermediate_size` GELU MLP
    let (hidden, ffn) = if swiglu || qwen3 {
        (req_u64(v, "hidden_size")?, req_u64(v, "intermediate_size")?)
    } else {
        let e = req_u64(v, "embed_dim")?;
        (e, e.saturating_mul(req_u64(v, "mlp_ratio")?))
    };
    // the files before transformers 5 name the channels `in_chans`
    let channels = match opt_u64(v, "in_chans")? {
        Some(c) => c,
        None => req_u64(v, "in_channels")?,
    };
    let t = VisionTower {
        kind: if swiglu {
            TowerKind::QwenSwiglu
        } else {
            TowerKind::QwenVit
        },
        layers: req_u64(v, "depth")?,
        hidden,
        heads: req_u64(v, "num_heads")?,
        ffn,
        activation: activation(v)?,
        channels,
        patch: req_u64(v, "patch_size")?,
        temporal_patch: req_u64(v, "temporal_patch_size")?,
        image: QWEN_DEFAULT_IMAGE.max(req_u64(v, "patch_size")?),
        // Qwen3-VL's patch projection has a bias and a position table
        patch_bias: qwen3,
        position_rows: if qwen3 {
            req_u64(v, "num_position_embeddings")?
        } else {
            0
        },
        merge: merge_size(v, "config.json spatial_merge_size")?,
        ..VisionTower::default()
    };
    t.validate(MAX_LAYERS, MAX_HIDDEN).map_err(|e| {
        rename_field(e, |f| {
            Some(
                match f {
                    "vision layers" => "config.json depth",
                    "vision hidden" if swiglu => "config.json hidden_size",
                    "vision hidden" => "config.json embed_dim",
                    "vision heads" => "config.json num_heads",
                    "vision ffn" if swiglu => "config.json intermediate_size",
                    "vision ffn" => "config.json mlp_ratio",
                    "vision channels" => "config.json in_channels",
                    "vision patch" => "config.json patch_size",
                    "vision temporal patch" => "config.json temporal_patch_size",
                    _ => return None,
                }
                .to_string(),
            )
        })
    })?;
    Ok(t)
}

/// The encoder of a Pixtral `vision_config` (defaults already merged in): planned at its
/// `image_size`, the side its image processor fits the longest edge into (a square image of that
/// side is the most one image costs), until `--image` says otherwise.
fn pixtral_tower(v: &Obj) -> anyhow::Result<VisionTower> {
    let hidden = req_u64(v, "hidden_size")?;
    let heads = req_u64(v, "num_attention_heads")?;
    let head_dim = req_u64(v, "head_dim")?;
    if head_dim.checked_mul(heads) != Some(hidden) {
        return input_err(
            "config.json head_dim",
            format!(
                "{head_dim} x {heads} heads is not the hidden_size {hidden}; accepted {}",
                hidden / heads.max(1)
            ),
        );
    }
    let t = VisionTower {
        kind: TowerKind::Pixtral,
        layers: req_u64(v, "num_hidden_layers")?,
        hidden,
        heads,
        ffn: req_u64(v, "intermediate_size")?,
        activation: activation(v)?,
        channels: req_u64(v, "num_channels")?,
        patch: req_u64(v, "patch_size")?,
        image: req_u64(v, "image_size")?,
        pre_norm: true,
        ..VisionTower::default()
    };
    t.validate(MAX_LAYERS, MAX_HIDDEN)
        .map_err(|e| rename_field(e, vit_key))?;
    Ok(t)
}

/// A patch merger's `spatial_merge_size` read from `o`, named `field` in errors.
fn merge_size(o: &Obj, field: &str) -> anyhow::Result<u64> {
    let n = req_u64(o, "spatial_merge_size")?;
    if !(1..=MAX_MERGE).contains(&n) {
        return input_err(
            field,
            format!("{n} is out of range; accepted 1..={MAX_MERGE}"),
        );
    }
    Ok(n)
}

/// A tower's `hidden_act` (its class default already merged in).
fn activation(v: &Obj) -> anyhow::Result<Activation> {
    match v.get("hidden_act") {
        Some(Value::String(s)) => match Activation::from_name(s) {
            Some(a) => Ok(a),
            None => input_err(
                "config.json hidden_act",
                format!(
                    "'{s}' is not a modelled activation; accepted {}",
                    Activation::accepted()
                ),
            ),
        },
        Some(other) => input_err(
            "config.json hidden_act",
            format!(
                "{other} is not a string; accepted {}",
                Activation::accepted()
            ),
        ),
        None => unreachable!("the defaults set hidden_act"),
    }
}

/// LLaVA-NeXT's crops per image at most: the largest `image_grid_pinpoints` resolution in tiles
/// of `image` pixels (transformers' default grid tops out at 672 x 672, 4 crops of 336).
fn largest_grid(o: &Obj, image: u64) -> anyhow::Result<u64> {
    let bad = |v: &Value| {
        input_err(
            "config.json image_grid_pinpoints",
            format!("{v} is not a list of [height, width] pairs; accepted pairs of pixel sizes"),
        )
    };
    let pins = match o.get("image_grid_pinpoints") {
        None | Some(Value::Null) => return Ok(4),
        Some(Value::Array(a)) => a,
        Some(v) => return bad(v),
    };
    let mut most = 1;
    for p in pins {
        let pair = p
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .filter(|&(h, w)| h > 0 && w > 0);
        let Some((h, w)) = pair else { return bad(p) };
        // the base view takes one more pass per image
        let crops = h.div_ceil(image).checked_mul(w.div_ceil(image));
        match crops {
            Some(n) if n < MAX_IMAGES => most = most.max(n),
            _ => {
                return input_err(
                    "config.json image_grid_pinpoints",
                    format!(
                        "{p} tiles into more than {} crops of {image} pixels; accepted smaller \
                         resolutions",
                        MAX_IMAGES - 1
                    ),
                )
            }
        }
    }
    Ok(most)
}
