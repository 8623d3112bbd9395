//! HuggingFace `config.json` -> [`TransformerSpec`], for the architectures whose field names the
//! planner knows: BERT (and RoBERTa, XLM-RoBERTa, CamemBERT), GPT-2, GPT-BigCode, GPT-NeoX,
//! StarCoder2, ViT, Llama, Mistral, Qwen2, Phi-3, Gemma, Qwen3, Gemma2, Gemma3 (text), OLMo2/3,
//! Helium, ERNIE 4.5, Seed-OSS, Hunyuan (dense), GLM-4.5 (MoE), EXAONE 4,
//! Phi, OPT, GPT-J, Falcon, BLOOM, OLMo, DistilBERT, ELECTRA and DeBERTa-v2, the
//! mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite-MoE and Phi-3.5-MoE
//! ([`super::moe::Moe`]), and DeepSeek-V2/V3 (latent attention, [`super::moe::Mla`], and MoE
//! with shared experts), and the encoder-decoders T5, mT5 and BART ([`super::encdec::EncDec`]).
//! A missing or mistyped field is an
//! input error naming it, so a user can fix the file rather than get a silently wrong plan.

use super::encdec::EncDec;
use super::hf_keys::{field_name, opt_bool, opt_u64, req_u64, Obj};
use super::moe::{CapacityFactor, Mla, Moe};
use super::presets;
use super::transformer::{
    Activation, Arch, BlockExtras, DropoutP, FfnKind, Head, HeadTransform, NormKind, PatchEmbed,
    QkNorm, TransformerSpec,
};
use crate::error::{input_err, rename_field};
use serde_json::Value;
use std::path::Path;

/// Architectures accepted in `model_type`.
pub const MODEL_TYPES: &str =
    "bert, roberta, xlm-roberta, camembert, gpt2, gpt_bigcode, gpt_neox, \
     starcoder2, vit, llama, mistral, qwen2, phi3, gemma, qwen3, gemma2, gemma3_text, olmo2, \
     granite, smollm3, gpt_oss, olmo3, helium, ernie4_5, seed_oss, hunyuan_v1_dense, glm4_moe, \
     llama4_text, glm, glm4, cohere, cohere2, stablelm, \
     phi, opt, gptj, falcon, bloom, olmo, distilbert, electra, deberta-v2, mixtral, qwen2_moe, \
     qwen3_moe, olmoe, granitemoe, phimoe, exaone4, deepseek_v2, deepseek_v3, t5, mt5, bart, \
     gemma3, paligemma, llava, llava_next, mistral3, qwen2_vl, qwen2_5_vl, qwen3_vl, \
     qwen3_vl_moe, llama4";

/// A size that must be at least 1 (a zero-length position table is a broken config).
fn req_pos(o: &Obj, f: &str) -> anyhow::Result<u64> {
    let n = req_u64(o, f)?;
    if n == 0 {
        return input_err(&field_name(f), "0; accepted a positive integer");
    }
    Ok(n)
}

/// Whether a soft-capping key (`attn_logit_softcapping`, `final_logit_softcapping`) is on: a
/// positive number; null turns it off; absent means the config class's default `default`.
fn softcap_on(o: &Obj, f: &str, default: bool) -> anyhow::Result<bool> {
    match o.get(f) {
        None => Ok(default),
        Some(Value::Null) => Ok(false),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 => Ok(true),
            _ => input_err(
                &field_name(f),
                format!("{v} is not a soft-capping value; accepted a positive number or null"),
            ),
        },
    }
}

/// Classifier classes: `num_labels`, else the size of `id2label`.
fn classes(o: &Obj) -> anyhow::Result<Option<u64>> {
    if let Some(n) = opt_u64(o, "num_labels")? {
        return Ok(Some(n));
    }
    match o.get("id2label") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.len() as u64)),
        Some(v) => input_err(
            "config.json id2label",
            format!("{v} is not an object; accepted {{\"0\": \"label\", ...}}"),
        ),
    }
}

/// Parses the text of a config.json; `name` labels the resulting spec.
pub fn parse(text: &str, name: &str) -> anyhow::Result<TransformerSpec> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return input_err(
                "config.json",
                format!("not valid JSON ({e}); accepted a HuggingFace config.json"),
            )
        }
    };
    let Value::Object(o) = value else {
        return input_err(
            "config.json",
            "not a JSON object; accepted a HuggingFace config.json",
        );
    };
    parse_obj(&o, name)
}

/// Parses a config.json object (a whole file, or a vision-language wrapper's `text_config`).
fn parse_obj(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let model_type = match o.get("model_type") {
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        Some(v) => {
            return input_err(
                "config.json model_type",
                format!("{v} is not a string; accepted {MODEL_TYPES}"),
            )
        }
        None => {
            return input_err(
                "config.json model_type",
                format!("missing; accepted {MODEL_TYPES}"),
            )
        }
    };
    // vision-language wrappers: their language model, read from `text_config` by this parser,
    // with the vision tower in front
    if super::hf_vision::WRAPPERS.contains(&model_type.as_str()) {
        return super::hf_vision::parse(o, name, &model_type, parse_obj);
    }
    let spec = match model_type.as_str() {
        // RoBERTa and its multilingual/French variants are BERT's architecture under BERT's
        // config keys (one token type, two extra position rows for the padding offset)
        "bert" | "roberta" | "xlm-roberta" | "camembert" => bert(o, name)?,
        "gpt2" => gpt2(o, name)?,
        // GPT-2's keys and block, with multi-query attention (one shared key/value head)
        "gpt_bigcode" => TransformerSpec {
            kv_heads: if opt_bool(o, "multi_query", true)? {
                1
            } else {
                req_u64(o, "n_head")?
            },
            ..gpt2(o, name)?
        },
        // one fused query_key_value projection, whose value view sdpa keeps
        "gpt_neox" => {
            let t = rotary_gelu_decoder(o, name, "attention_bias", false)?;
            TransformerSpec {
                extras: BlockExtras {
                    fused_qkv: true,
                    ..t.extras
                },
                ..t
            }
        }
        // separate q, k and v projections
        "starcoder2" => {
            let t = rotary_gelu_decoder(o, name, "use_bias", true)?;
            TransformerSpec {
                extras: BlockExtras {
                    separate_qkv: true,
                    ..t.extras
                },
                ..t
            }
        }
        "vit" => vit(o, name)?,
        // Phi-3 fuses q/k/v and gate/up into single matrices of the same total size
        // Gemma: RMSNorm and a gated (GELU) MLP of three matrices, like Llama's
        // Qwen3, Gemma2/3 and OLMo2: the same block with query/key norms and extra norms
        // Granite's embedding, residual, attention and logit multipliers are scalars (no
        // parameters, nothing saved) and SmolLM3's RoPE-free layers change no shapes
        // Helium, ERNIE 4.5 and Seed-OSS are Llama's block with their own biases, OLMo 3 is
        // OLMo2's, Hunyuan's dense block Qwen3's (per-head q/k norms)
        // GLM-4 (glm) and GLM-4-0414 (glm4, with Gemma 2's sandwich norms): biased q/k/v and one
        // fused gate_up projection; Cohere's Command R/R7B and Aya (cohere, cohere2): one
        // weight-only LayerNorm feeding attention and MLP in parallel, optional q/k norms, a
        // tied head; StableLM (2): LayerNorms with biases, optional biased q/k/v and parallel
        // residual; EXAONE 4: OLMo2's post-norms (no input norm) with Qwen3's per-head q/k
        // norms, Llama's RMSNorm (weight applied after the cast back); its sliding-window and
        // rotary-free global layers change no shapes (planned as full attention with rotary
        // copies: the larger)
        "llama" | "mistral" | "qwen2" | "phi3" | "gemma" | "qwen3" | "gemma2" | "gemma3_text"
        | "olmo2" | "olmo3" | "granite" | "smollm3" | "helium" | "ernie4_5" | "seed_oss"
        | "hunyuan_v1_dense" | "glm" | "glm4" | "cohere" | "cohere2" | "stablelm" | "exaone4" => {
            llama_like(o, name, &model_type)?
        }
        // GLM-4.5's: biased q, k, v (optional per-head q/k norms) and DeepSeek-V3's MoE layout
        // (dense leading blocks, shared experts) with grouped-query attention
        "glm4_moe" => {
            let base = llama_like(o, name, &model_type)?;
            TransformerSpec {
                extras: BlockExtras {
                    moe: Some(Box::new(deepseek_moe(o, base.layers, (1, 1))?)),
                    ..base.extras
                },
                ..base
            }
        }
        // the same blocks with a mixture-of-experts feed-forward
        "deepseek_v2" | "deepseek_v3" => deepseek(o, name, &model_type)?,
        "t5" | "mt5" => t5(o, name)?,
        "bart" => bart(o, name)?,
        // gpt-oss: biased q/k/v/o, per-head sink logits, MoE with biased fused experts and a
        // biased router; transformers has no sdpa path for its sinks, but FlashAttention kernels
        // that take them (planned as sdpa, with a note: `estimate::attention_caveats`)
        "gpt_oss" => {
            let base = llama_like(o, name, &model_type)?;
            let m = Moe {
                expert_bias: true,
                router_bias: true,
                clamped_glu: true,
                ..moe(o, &model_type, base.layers)?
            };
            TransformerSpec {
                extras: BlockExtras {
                    moe: Some(Box::new(m)),
                    attn_sinks: true,
                    ..base.extras
                },
                ..base
            }
        }
        // Llama 4: dense blocks of `intermediate_size_mlp`, MoE blocks (every
        // `interleave_moe_layer_step`-th, or the `moe_layers` listed) of routed experts and one
        // always-on shared expert of `intermediate_size`; its q/k L2 norms have no weights
        "llama4_text" => {
            let base = llama_like(o, name, &model_type)?;
            let expert_ffn = base.ffn;
            let layers = base.layers;
            let moe_layers = match o.get("moe_layers") {
                Some(Value::Array(a)) if !a.is_empty() => a.len() as u64,
                _ => {
                    let step = opt_u64(o, "interleave_moe_layer_step")?.unwrap_or(1);
                    if step == 0 {
                        return input_err(
                            &field_name("interleave_moe_layer_step"),
                            "0; accepted a positive integer",
                        );
                    }
                    (0..layers).filter(|i| (i + 1) % step == 0).count() as u64
                }
            };
            let m = Moe {
                experts: req_u64(o, "num_local_experts")?,
                top_k: req_u64(o, "num_experts_per_tok")?,
                expert_ffn,
                shared_ffn: expert_ffn,
                shared_gate: false,
                dense_layers: layers.saturating_sub(moe_layers),
                expert_parallel: 1,
                capacity_factor: CapacityFactor::default(),
                expert_bias: false,
                router_bias: false,
                clamped_glu: false,
            };
            TransformerSpec {
                ffn: req_u64(o, "intermediate_size_mlp")?,
                extras: BlockExtras {
                    moe: Some(Box::new(m)),
                    ..base.extras
                },
                ..base
            }
        }
        // OLMoE: Llama's block with full-width q/k RMSNorms (OLMo2's, but pre-norm and with the
        // weight applied after the cast back, as Llama's) and Mixtral-style routed experts of
        // `intermediate_size` (`num_experts`). Its optional `clip_qkv` clamps q, k and v in place
        // (a comparison mask per element for backward, not modelled: absent in the published
        // files). Granite-MoE: Mixtral's layout under Granite's scalar multipliers (no
        // parameters, nothing saved). Phi-3.5-MoE: Mixtral's layout with LayerNorms with bias,
        // biased q/k/v/o (`attention_bias`), a biased LM head (`lm_head_bias`) and the
        // sparsemixer router, which always routes two experts per token; under training its
        // `input_jitter_noise` (0.01 in the published file) multiplies the MoE input by a
        // uniform noise tensor twice in place, two b·s·h tensors per MoE block the planner has
        // no term for, and sparsemixer keeps a few E-wide router tensors beyond the planned
        // router's (E = 16: under 0.1 % of a block's bytes)
        "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "granitemoe" | "phimoe" => {
            let base = llama_like(o, name, &model_type)?;
            TransformerSpec {
                extras: BlockExtras {
                    moe: Some(Box::new(moe(o, &model_type, base.layers)?)),
                    ..base.extras
                },
                ..base
            }
        }
        "phi" => phi(o, name)?,
        "bloom" => bloom(o, name)?,
        // Llama's block with parameter-free LayerNorms (OLMo v1)
        "olmo" => {
            let base = llama_like(o, name, &model_type)?;
            TransformerSpec {
                final_norm: false,
                extras: BlockExtras {
                    block_norms: Some(0),
                    ..base.extras
                },
                ..base
            }
        }
        "distilbert" => distilbert(o, name)?,
        "electra" => electra(o, name)?,
        "deberta-v2" => deberta_v2(o, name)?,
        "opt" => opt(o, name)?,
        "gptj" => gptj(o, name)?,
        "falcon" => falcon(o, name)?,
        other => {
            return input_err(
                "config.json model_type",
                format!(
                    "'{other}' is not supported; accepted {MODEL_TYPES} (for any other \
                     checkpoint, `--safetensors` counts its parameters from the weights' headers)"
                ),
            )
        }
    };
    // eager attention's softmax in fp32 (`BlockExtras::fp32_softmax`); GPT-2's, BERT's and
    // Falcon's run in the compute dtype, the Llama-like blocks' upcast is in their measured block
    let fp32_softmax = match model_type.as_str() {
        "gpt_neox" | "starcoder2" | "phi" | "opt" | "bloom" | "gptj" => true,
        "gpt_bigcode" => opt_bool(o, "attention_softmax_in_fp32", true)?,
        _ => spec.extras.fp32_softmax,
    };
    let spec = TransformerSpec {
        extras: BlockExtras {
            fp32_softmax,
            ..spec.extras
        },
        dropout: dropout(o, &model_type)?,
        // a family parser's own reading (T5's `feed_forward_proj`) stands when the config's
        // activation keys are absent
        activation: activation(o, &model_type)?.or(spec.activation),
        ..spec
    };
    spec.validate()
        .map_err(|e| rename_field(e, |f| config_key(&model_type, f)))?;
    Ok(spec)
}

/// The dropout probability keys of each family with transformers' config-class defaults.
fn dropout_keys(model_type: &str) -> &'static [(&'static str, f32)] {
    match model_type {
        "gpt2" | "gpt_bigcode" => &[
            ("resid_pdrop", 0.1),
            ("embd_pdrop", 0.1),
            ("attn_pdrop", 0.1),
        ],
        "bert" | "roberta" | "xlm-roberta" | "camembert" | "electra" => &[
            ("hidden_dropout_prob", 0.1),
            ("attention_probs_dropout_prob", 0.1),
        ],
        "vit" => &[
            ("hidden_dropout_prob", 0.0),
            ("attention_probs_dropout_prob", 0.0),
        ],
        "gpt_neox" => &[("hidden_dropout", 0.0), ("attention_dropout", 0.0)],
        "starcoder2" => &[
            ("residual_dropout", 0.0),
            ("embedding_dropout", 0.0),
            ("attention_dropout", 0.0),
        ],
        "phi" => &[
            ("resid_pdrop", 0.0),
            ("embd_pdrop", 0.0),
            ("attention_dropout", 0.0),
        ],
        "gptj" => &[
            ("resid_pdrop", 0.0),
            ("embd_pdrop", 0.0),
            ("attn_pdrop", 0.0),
        ],
        "opt" => &[("dropout", 0.1), ("attention_dropout", 0.0)],
        "falcon" | "bloom" => &[("hidden_dropout", 0.0), ("attention_dropout", 0.0)],
        // Seed-OSS's class defaults keep both on
        "seed_oss" => &[("attention_dropout", 0.1), ("residual_dropout", 0.1)],
        "stablelm" => &[("hidden_dropout", 0.0), ("attention_dropout", 0.0)],
        "t5" | "mt5" => &[("dropout_rate", 0.1)],
        "bart" => &[
            ("dropout", 0.1),
            ("attention_dropout", 0.0),
            ("activation_dropout", 0.0),
        ],
        "distilbert" => &[("dropout", 0.1), ("attention_dropout", 0.1)],
        "deberta-v2" => &[
            ("hidden_dropout_prob", 0.1),
            ("attention_probs_dropout_prob", 0.1),
        ],
        _ => &[("attention_dropout", 0.0)],
    }
}

/// The spec's dropout from the config's probabilities: the largest of the family's keys, each
/// absent one at its config-class default (the planner keeps one probability for all sites, and
/// any site above 0 keeps masks), or `None` (the architecture's default) when the config sets
/// none of them and the block kind's default is the class's (GPT-2, BERT, ViT, Llama). GPT-NeoX
/// and StarCoder2 are planned with the GPT-2 block, whose default (0.1) is not theirs (0), so
/// theirs is always set, as is that of the families whose blocks are not exactly a measured one
/// (Phi, OPT, GPT-J, Falcon, DistilBERT, ELECTRA: a spec with extras defaults to 0).
fn dropout(o: &Obj, model_type: &str) -> anyhow::Result<Option<DropoutP>> {
    let keys = dropout_keys(model_type);
    let mut any = matches!(
        model_type,
        "gpt_neox"
            | "starcoder2"
            | "phi"
            | "opt"
            | "gptj"
            | "falcon"
            | "bloom"
            | "distilbert"
            | "electra"
            | "deberta-v2"
            | "seed_oss"
            | "t5"
            | "mt5"
            | "bart"
    );
    let mut p = 0.0f32;
    for &(key, default) in keys {
        let v = match o.get(key) {
            None | Some(Value::Null) => default,
            Some(v) => {
                any = true;
                match v.as_f64() {
                    Some(x) if x.is_finite() && (0.0..1.0).contains(&x) => x as f32,
                    _ => {
                        return input_err(
                            &field_name(key),
                            format!("{v} is not a probability; accepted a number with 0 <= p < 1"),
                        )
                    }
                }
            }
        };
        p = p.max(v);
    }
    Ok(any.then_some(DropoutP(p)))
}

/// The MLP activation from `hidden_activation` (Gemma), `hidden_act` or `activation_function`
/// (GPT-2), the first one set; `None` (the architecture's default) when none is, except for the
/// families planned with another family's block, whose class default differs (GPT-NeoX `gelu`,
/// StarCoder2 and Gemma `gelu_pytorch_tanh`).
fn activation(o: &Obj, model_type: &str) -> anyhow::Result<Option<Activation>> {
    // DistilBERT names it `activation`; Falcon's `activation` is the same key
    let keys: &[&str] = if model_type == "distilbert" {
        &["activation"]
    } else if matches!(model_type, "t5" | "mt5") {
        // T5's activation is inside `feed_forward_proj` (read by `t5`)
        &[]
    } else {
        &["hidden_activation", "hidden_act", "activation_function"]
    };
    for &key in keys {
        match o.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::String(name)) => {
                return match Activation::from_name(name) {
                    Some(a) => Ok(Some(a)),
                    None => input_err(
                        &field_name(key),
                        format!(
                            "'{name}' is not a modelled activation; accepted {}",
                            Activation::accepted()
                        ),
                    ),
                }
            }
            Some(v) => {
                return input_err(
                    &field_name(key),
                    format!("{v} is not a string; accepted {}", Activation::accepted()),
                )
            }
        }
    }
    Ok(match model_type {
        "gpt_neox" => Some(Activation::Gelu),
        "starcoder2" | "gemma" | "gemma2" | "gemma3_text" => Some(Activation::GeluPytorchTanh),
        "phi" | "gptj" => Some(Activation::GeluNew),
        "opt" => Some(Activation::Relu),
        // Falcon's MLP is nn.GELU() (its `activation` key defaults to it)
        "falcon" => Some(Activation::Gelu),
        // BLOOM's GeLUFunction: the tanh approximation as one autograd function that saves its
        // input only, like the fused `gelu_pytorch_tanh`
        "bloom" => Some(Activation::GeluPytorchTanh),
        "distilbert" | "deberta-v2" | "bart" => Some(Activation::Gelu),
        _ => None,
    })
}

/// The config.json key behind a spec field, per family, so a range error names the key the
/// user can edit (`num_attention_heads`, not the planner's `heads`).
fn config_key(model_type: &str, field: &str) -> Option<String> {
    let key = match (model_type, field) {
        ("gpt2" | "gptj", "layers") => "n_layer",
        ("gpt2" | "gptj", "hidden") => "n_embd",
        ("gpt2" | "gptj", "heads" | "kv_heads") => "n_head",
        ("gpt2" | "gptj", "ffn") => "n_inner",
        ("gpt2" | "gptj", "max_positions") => "n_positions",
        ("opt", "ffn") => "ffn_dim",
        ("bloom", "layers") => "n_layer",
        ("bloom", "heads" | "kv_heads") => "n_head",
        ("distilbert", "layers") => "n_layers",
        ("distilbert", "hidden") => "dim",
        ("distilbert", "heads" | "kv_heads") => "n_heads",
        ("distilbert", "ffn") => "hidden_dim",
        (_, "embedding_size") => "embedding_size",
        ("opt", "embed_proj") => "word_embed_proj_dim",
        ("falcon", "kv_heads") => "num_kv_heads",
        ("falcon", "ffn") => "ffn_hidden_size",
        ("t5" | "mt5", "layers") => "num_layers",
        ("t5" | "mt5", "hidden") => "d_model",
        ("t5" | "mt5", "heads" | "kv_heads") => "num_heads",
        ("t5" | "mt5", "ffn") => "d_ff",
        ("t5" | "mt5", "head_dim") => "d_kv",
        ("t5" | "mt5", "decoder_layers") => "num_decoder_layers",
        ("t5" | "mt5", "rel_buckets") => "relative_attention_num_buckets",
        ("bart", "layers") => "encoder_layers",
        ("bart", "decoder_layers") => "decoder_layers",
        ("bart", "hidden") => "d_model",
        ("bart", "heads" | "kv_heads") => "encoder_attention_heads",
        ("bart", "ffn") => "encoder_ffn_dim",
        ("deepseek_v2" | "deepseek_v3", "experts") => "n_routed_experts",
        ("deepseek_v2" | "deepseek_v3", "shared_ffn") => "n_shared_experts",
        ("deepseek_v2" | "deepseek_v3", "dense_layers") => "first_k_dense_replace",
        (
            _,
            "q_lora_rank" | "kv_lora_rank" | "qk_nope_head_dim" | "qk_rope_head_dim" | "v_head_dim",
        ) => field,
        ("mixtral" | "granitemoe" | "phimoe", "experts") => "num_local_experts",
        ("mixtral" | "olmoe" | "granitemoe" | "phimoe", "expert_ffn") => "intermediate_size",
        (_, "experts") => "num_experts",
        (_, "top_k") => "num_experts_per_tok",
        (_, "expert_ffn") => "moe_intermediate_size",
        (_, "shared_ffn") => "shared_expert_intermediate_size",
        (_, "dense_layers") => "mlp_only_layers",
        (_, "head_dim") => "head_dim",
        (_, "layers") => "num_hidden_layers",
        (_, "hidden") => "hidden_size",
        (_, "heads") => "num_attention_heads",
        (_, "kv_heads") => "num_key_value_heads",
        (_, "ffn") => "intermediate_size",
        (_, "max_positions") => "max_position_embeddings",
        (_, "type_vocab") => "type_vocab_size",
        (_, "vocab") => "vocab_size",
        (_, "patch") => "patch_size",
        (_, "image") => "image_size",
        (_, "channels") => "num_channels",
        (_, "classes") => "num_labels",
        _ => return None,
    };
    Some(field_name(key))
}

/// Reads and parses a config.json file; the spec is named after its directory.
pub fn load(path: &Path) -> anyhow::Result<TransformerSpec> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return input_err(
                "hf-config",
                format!(
                    "cannot read {} ({e}); accepted a readable config.json",
                    path.display()
                ),
            )
        }
    };
    let name = path
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "hf-config".to_string());
    parse(&text, &name)
}

fn bert(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "hidden_size")?;
    Ok(TransformerSpec {
        vocab: req_u64(o, "vocab_size")?,
        ffn: req_u64(o, "intermediate_size")?,
        max_positions: req_u64(o, "max_position_embeddings")?,
        type_vocab: opt_u64(o, "type_vocab_size")?.unwrap_or(2),
        ..presets::bert(
            name,
            req_u64(o, "num_hidden_layers")?,
            hidden,
            req_u64(o, "num_attention_heads")?,
        )
    })
}

fn gpt2(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "n_embd")?;
    let base = presets::gpt2(
        name,
        req_u64(o, "n_layer")?,
        hidden,
        req_u64(o, "n_head")?,
        req_u64(o, "vocab_size")?,
        req_pos(o, "n_positions")?,
    );
    Ok(TransformerSpec {
        // n_inner: null means 4 * n_embd (transformers' GPT2MLP)
        ffn: opt_u64(o, "n_inner")?.unwrap_or(hidden.saturating_mul(4)),
        tied_embeddings: opt_bool(o, "tie_word_embeddings", true)?,
        ..base
    })
}

/// A pre-LayerNorm decoder with rotary positions (no position table), biased linears and a GELU
/// MLP of `intermediate_size`, under HF's Llama-style keys: GPT-NeoX (Pythia; `attention_bias`,
/// untied output embedding by default; its parallel residual and partial rotary change no
/// parameter count) and StarCoder2 (`use_bias`, grouped-query attention, tied head by default).
/// Activations are planned with the GPT-2 block's measured coefficients, with the config's own
/// activation (fused GELU) and dropout (0 unless set) in place of GPT-2's defaults.
fn rotary_gelu_decoder(
    o: &Obj,
    name: &str,
    bias_key: &str,
    tied_default: bool,
) -> anyhow::Result<TransformerSpec> {
    let heads = req_u64(o, "num_attention_heads")?;
    let base = presets::gpt2(
        name,
        req_u64(o, "num_hidden_layers")?,
        req_u64(o, "hidden_size")?,
        heads,
        req_u64(o, "vocab_size")?,
        0,
    );
    Ok(TransformerSpec {
        kv_heads: opt_u64(o, "num_key_value_heads")?.unwrap_or(heads),
        ffn: req_u64(o, "intermediate_size")?,
        bias: opt_bool(o, bias_key, true)?,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", tied_default)?,
        ..base
    })
}

fn vit(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let image = req_u64(o, "image_size")?;
    let patch = req_u64(o, "patch_size")?;
    let base = presets::vit(
        name,
        req_u64(o, "num_hidden_layers")?,
        req_u64(o, "hidden_size")?,
        req_u64(o, "num_attention_heads")?,
        image,
        patch,
        1,
    );
    Ok(TransformerSpec {
        ffn: req_u64(o, "intermediate_size")?,
        // ViTForImageClassification with labels; ViTModel (pooler) without.
        head: match classes(o)? {
            Some(c) => Head::Classifier { classes: c },
            None => Head::Pooler,
        },
        bias: opt_bool(o, "qkv_bias", true)?,
        patch: Some(PatchEmbed {
            image,
            patch,
            channels: opt_u64(o, "num_channels")?.unwrap_or(3),
        }),
        ..base
    })
}

fn llama_like(o: &Obj, name: &str, model_type: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "hidden_size")?;
    let heads = req_u64(o, "num_attention_heads")?;
    // head_dim: the config's, else the config class's default (Qwen3 128, Gemma2/3 256), else
    // hidden / heads; kept only where it departs from hidden / heads
    let class_head_dim = match model_type {
        "qwen3" | "helium" | "ernie4_5" | "seed_oss" | "llama4_text" | "glm" | "glm4" => Some(128),
        "gemma2" | "gemma3_text" => Some(256),
        _ => None,
    };
    let head_dim = opt_u64(o, "head_dim")?
        .or(class_head_dim)
        .filter(|&hd| heads == 0 || hd.checked_mul(heads) != Some(hidden));
    // ERNIE 4.5's `use_bias` is every linear's; Seed-OSS's and GLM-4.5's `attention_bias` is
    // q, k and v's (Seed-OSS's o has `attention_out_bias`), Llama's all four
    let ernie_bias = model_type == "ernie4_5" && opt_bool(o, "use_bias", false)?;
    let qkv_only = matches!(
        model_type,
        "seed_oss" | "glm4_moe" | "glm" | "glm4" | "stablelm"
    );
    let qkv_bias_key = qkv_only
        && if model_type == "stablelm" {
            opt_bool(o, "use_qkv_bias", false)?
        } else {
            opt_bool(
                o,
                "attention_bias",
                matches!(model_type, "seed_oss" | "glm" | "glm4"),
            )?
        };
    if model_type == "stablelm" && opt_bool(o, "qk_layernorm", false)? {
        return input_err(
            &field_name("qk_layernorm"),
            "true (StableLM 2 12B's per-head LayerNorms are not modelled); accepted false",
        );
    }
    let out_bias = model_type == "seed_oss" && opt_bool(o, "attention_out_bias", false)?;
    if out_bias && !qkv_bias_key {
        return input_err(
            &field_name("attention_out_bias"),
            "true without attention_bias (a bias on o alone is not modelled); accepted false, or \
             with attention_bias true",
        );
    }
    let attention_bias = ernie_bias
        || if qkv_only {
            out_bias
        } else {
            opt_bool(o, "attention_bias", false)?
        };
    let mlp_bias = ernie_bias || opt_bool(o, "mlp_bias", false)?;
    // GLM's config classes default to two key/value heads, the others to multi-head attention
    let class_kv = if matches!(model_type, "glm" | "glm4") {
        2
    } else {
        heads
    };
    let base = presets::llama(
        name,
        req_u64(o, "num_hidden_layers")?,
        hidden,
        heads,
        opt_u64(o, "num_key_value_heads")?.unwrap_or(class_kv),
        req_u64(o, "intermediate_size")?,
        req_u64(o, "vocab_size")?,
    );
    let (qk_norm, block_norms) = match model_type {
        "qwen3" | "qwen3_moe" | "hunyuan_v1_dense" | "exaone4" => (QkNorm::PerHead, None),
        // OLMoE: q and k normed over their whole widths, before the usual two block norms
        "olmoe" => (QkNorm::Full, None),
        "glm4_moe" if opt_bool(o, "use_qk_norm", false)? => (QkNorm::PerHead, None),
        // input, post-attention, pre- and post-feed-forward norms
        "gemma2" => (QkNorm::None, Some(4)),
        "gemma3_text" => (QkNorm::PerHead, Some(4)),
        // post-attention and post-feed-forward norms (no input norm), q/k norms full width
        "olmo2" | "olmo3" => (QkNorm::Full, None),
        "glm4" => (QkNorm::None, Some(4)),
        // one norm before attention and MLP alike; Cohere's q/k norms weigh every head apart
        "cohere" if opt_bool(o, "use_qk_norm", false)? => (QkNorm::Full, Some(1)),
        "cohere" | "cohere2" => (QkNorm::None, Some(1)),
        "stablelm" if opt_bool(o, "use_parallel_residual", false)? => (QkNorm::None, Some(1)),
        _ => (QkNorm::None, None),
    };
    Ok(TransformerSpec {
        arch: Arch::Decoder,
        ffn_kind: FfnKind::Swiglu,
        // every family here normalises with RMSNorm except OLMo v1 (parameter-free LayerNorm)
        // and StableLM and Phi-3.5-MoE (LayerNorm with bias), whatever keys its config.json
        // happens to carry;
        // Cohere's LayerNorm has no bias: RMSNorm's one weight per channel
        norm: if matches!(model_type, "olmo" | "stablelm" | "phimoe") {
            NormKind::Layernorm
        } else {
            NormKind::Rmsnorm
        },
        // Llama's attention_bias (q, k, v, o) and mlp_bias are independent
        bias: mlp_bias,
        // Qwen2 hard-codes biases on q, k and v (and none on o or the MLP); Qwen2-MoE has them
        // unless its `qkv_bias` says otherwise
        qkv_bias: model_type == "qwen2"
            || (model_type == "qwen2_moe" && opt_bool(o, "qkv_bias", true)?)
            || qkv_bias_key,
        // Gemma and SmolLM3 tie their LM head to the embedding unless told otherwise (their
        // config classes' default)
        tied_embeddings: opt_bool(
            o,
            "tie_word_embeddings",
            matches!(
                model_type,
                "gemma" | "gemma2" | "gemma3_text" | "smollm3" | "ernie4_5" | "cohere" | "cohere2"
            ),
        )?,
        extras: BlockExtras {
            head_dim,
            qk_norm,
            block_norms,
            attn_bias: (attention_bias != mlp_bias).then_some(attention_bias),
            norm_weight_fp32: matches!(
                model_type,
                "gemma" | "gemma2" | "gemma3_text" | "olmo2" | "olmo3"
            ),
            centered_norm: matches!(model_type, "cohere" | "cohere2"),
            fused_qkv: model_type == "phi3",
            fused_gate_up: matches!(model_type, "phi3" | "glm" | "glm4"),
            // Phi-3.5-MoE's LM head bias (PhimoeConfig's `lm_head_bias`, default false)
            lm_head_bias: model_type == "phimoe" && opt_bool(o, "lm_head_bias", false)?,
            // Gemma2Config defaults both on (50 and 30); Gemma3's off
            attn_softcap: softcap_on(o, "attn_logit_softcapping", model_type == "gemma2")?,
            final_softcap: softcap_on(o, "final_logit_softcapping", model_type == "gemma2")?,
            ..BlockExtras::default()
        },
        ..base
    })
}

/// The mixture-of-experts keys: experts (`num_local_experts`, Qwen's `num_experts`), top-k, the
/// expert width (Mixtral's `intermediate_size`, Qwen's `moe_intermediate_size`), Qwen2-MoE's
/// gated shared expert, and which blocks keep the dense MLP: transformers makes block `i`
/// sparse when `i` is not in `mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`.
fn moe(o: &Obj, model_type: &str, layers: u64) -> anyhow::Result<Moe> {
    let experts = match (
        opt_u64(o, "num_local_experts")?,
        opt_u64(o, "num_experts")?,
        model_type,
    ) {
        (Some(n), _, _) | (None, Some(n), _) => n,
        (None, None, "mixtral" | "gpt_oss" | "granitemoe" | "phimoe") => {
            req_u64(o, "num_local_experts")?
        }
        (None, None, _) => req_u64(o, "num_experts")?,
    };
    let top_k = req_u64(o, "num_experts_per_tok")?;
    // Phi-3.5-MoE's sparsemixer picks two experts whatever `num_experts_per_tok` says
    if model_type == "phimoe" && top_k != 2 {
        return input_err(
            &field_name("num_experts_per_tok"),
            format!("{top_k} (PhiMoE's sparsemixer routes exactly two experts); accepted 2"),
        );
    }
    // Mixtral's layout, the expert width in `intermediate_size`: also gpt-oss, OLMoE,
    // Granite-MoE and Phi-3.5-MoE
    if matches!(
        model_type,
        "mixtral" | "gpt_oss" | "olmoe" | "granitemoe" | "phimoe"
    ) {
        return Ok(Moe {
            experts,
            top_k,
            expert_ffn: req_u64(o, "intermediate_size")?,
            shared_ffn: 0,
            shared_gate: false,
            dense_layers: 0,
            expert_parallel: 1,
            capacity_factor: CapacityFactor::default(),
            expert_bias: false,
            router_bias: false,
            clamped_glu: false,
        });
    }
    let step = opt_u64(o, "decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return input_err(
            &field_name("decoder_sparse_step"),
            "0; accepted a positive integer",
        );
    }
    let mlp_only: Vec<u64> = match o.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => match a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>() {
            Some(v) => v,
            None => {
                return input_err(
                    &field_name("mlp_only_layers"),
                    "has an entry that is not a block index; accepted a list of integers",
                )
            }
        },
        Some(v) => {
            return input_err(
                &field_name("mlp_only_layers"),
                format!("{v} is not a list; accepted a list of block indices"),
            )
        }
    };
    let sparse = (0..layers)
        .filter(|i| !mlp_only.contains(i) && (i + 1) % step == 0)
        .count() as u64;
    let shared_ffn = if model_type == "qwen2_moe" {
        req_u64(o, "shared_expert_intermediate_size")?
    } else {
        0
    };
    Ok(Moe {
        experts,
        top_k,
        expert_ffn: req_u64(o, "moe_intermediate_size")?,
        shared_ffn,
        shared_gate: shared_ffn > 0,
        dense_layers: layers - sparse,
        expert_parallel: 1,
        capacity_factor: CapacityFactor::default(),
        expert_bias: false,
        router_bias: false,
        clamped_glu: false,
    })
}

/// BLOOM (`BloomForCausalLM`): GPT-2's pre-LN block with fused biased q/k/v and a 4h GELU MLP,
/// ALiBi position biases (no position table, no parameters), a LayerNorm right after the word
/// embedding, a tied LM head. `hidden_size` is also written `n_embed` in older configs.
fn bloom(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = match opt_u64(o, "n_embed")? {
        Some(h) if !o.contains_key("hidden_size") => h,
        _ => req_u64(o, "hidden_size")?,
    };
    let base = presets::gpt2(
        name,
        req_u64(o, "n_layer")?,
        hidden,
        req_u64(o, "n_head")?,
        req_u64(o, "vocab_size")?,
        0,
    );
    Ok(TransformerSpec {
        embedding_norm: true,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", true)?,
        extras: BlockExtras {
            eager_only: true,
            // one query_key_value projection, as GPT-2's c_attn
            fused_qkv: true,
            ..BlockExtras::default()
        },
        ..base
    })
}

/// DistilBERT as `DistilBertForMaskedLM` (what it is pre-trained and usually fine-tuned from):
/// BERT's post-LN block under its own keys (`dim`, `n_layers`, `n_heads`, `hidden_dim`), learned
/// positions, no token types, and the masked-LM head: dense + LayerNorm, then the vocabulary
/// projection tied to the word embedding with its own bias.
fn distilbert(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let base = presets::bert(
        name,
        req_u64(o, "n_layers")?,
        req_u64(o, "dim")?,
        req_u64(o, "n_heads")?,
    );
    Ok(TransformerSpec {
        vocab: req_u64(o, "vocab_size")?,
        ffn: req_u64(o, "hidden_dim")?,
        max_positions: req_u64(o, "max_position_embeddings")?,
        type_vocab: 0,
        head: Head::Lm,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", true)?,
        extras: BlockExtras {
            lm_head_bias: true,
            head_transform: HeadTransform::DenseNorm,
            ..BlockExtras::default()
        },
        ..base
    })
}

/// ELECTRA as its discriminator (`ElectraForPreTraining`, what is released and fine-tuned):
/// BERT's blocks and keys without a pooler, word/position/token-type embeddings and their
/// LayerNorm at `embedding_size` (default 128) with a biased linear up to `hidden_size` when the
/// two differ, and the discriminator head: dense + a one-logit projection per token.
fn electra(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "hidden_size")?;
    let embed = opt_u64(o, "embedding_size")?.unwrap_or(128);
    Ok(TransformerSpec {
        head: Head::Classifier { classes: 1 },
        extras: BlockExtras {
            head_transform: HeadTransform::Dense,
            factorized_embedding: (embed != hidden).then_some(embed),
            ..BlockExtras::default()
        },
        ..bert(o, name)?
    })
}

/// DeBERTa-v2/v3 as `DebertaV2ForMaskedLM`: BERT's post-LN block and keys; absolute positions
/// only with `position_biased_input` (default true; v3 false); with `relative_attention` a
/// relative-position table shared by all blocks (`2 x position_buckets` rows, or `2 x
/// max_relative_positions`, which -1 sets to `max_position_embeddings`) and a LayerNorm over it
/// when `norm_rel_ebd` says `layer_norm`; without `share_att_key`, a key projection for c2p and
/// a query projection for p2c in every block (`pos_att_type`); the masked-LM head with dense +
/// LayerNorm and a vocabulary bias, tied to the word embedding. The convolution of `conv_kernel_size`
/// (DeBERTa-v2-xlarge) is not modelled and is refused.
fn deberta_v2(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    if opt_u64(o, "conv_kernel_size")?.unwrap_or(0) > 0 {
        return input_err(
            &field_name("conv_kernel_size"),
            "above 0 (a convolution layer the planner does not model); accepted 0 or absent",
        );
    }
    let base = presets::bert(
        name,
        req_u64(o, "num_hidden_layers")?,
        req_u64(o, "hidden_size")?,
        req_u64(o, "num_attention_heads")?,
    );
    let max_positions = req_u64(o, "max_position_embeddings")?;
    let relative = opt_bool(o, "relative_attention", false)?;
    let rel_positions = if relative {
        // both default to -1 (unset) in DebertaV2Config
        match o.get("position_buckets").and_then(Value::as_i64) {
            Some(b) if b > 0 => 2 * b as u64,
            _ => match o.get("max_relative_positions").and_then(Value::as_i64) {
                Some(m) if m >= 1 => 2 * m as u64,
                _ => 2 * max_positions,
            },
        }
    } else {
        0
    };
    // the table is bounded like any position table (`transformer::MAX_POSITIONS`)
    crate::error::check_range(
        &field_name("position_buckets"),
        rel_positions,
        0,
        super::transformer::MAX_POSITIONS,
    )?;
    let norm_rel = match o.get("norm_rel_ebd") {
        Some(Value::String(s)) => s.split('|').any(|p| p.trim() == "layer_norm"),
        _ => false,
    };
    let pos_att: Vec<String> = match o.get("pos_att_type") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_ascii_lowercase))
            .collect(),
        Some(Value::String(s)) => s
            .split('|')
            .map(|p| p.trim().to_ascii_lowercase())
            .collect(),
        _ => Vec::new(),
    };
    let pos_proj = if relative && !opt_bool(o, "share_att_key", false)? {
        ["c2p", "p2c"]
            .iter()
            .filter(|k| pos_att.iter().any(|p| p == *k))
            .count() as u8
    } else {
        0
    };
    Ok(TransformerSpec {
        vocab: req_u64(o, "vocab_size")?,
        ffn: req_u64(o, "intermediate_size")?,
        max_positions: if opt_bool(o, "position_biased_input", true)? {
            max_positions
        } else {
            0
        },
        type_vocab: opt_u64(o, "type_vocab_size")?.unwrap_or(0),
        head: Head::Lm,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", true)?,
        extras: BlockExtras {
            lm_head_bias: true,
            head_transform: HeadTransform::DenseNorm,
            rel_positions: rel_positions as u32,
            rel_norm: relative && norm_rel,
            pos_proj,
            rel_att_terms: if relative {
                ["c2p", "p2c"]
                    .iter()
                    .filter(|k| pos_att.iter().any(|p| p == *k))
                    .count() as u8
            } else {
                0
            },
            eager_only: true,
            ..BlockExtras::default()
        },
        ..base
    })
}

/// DeepSeek-V2/V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`): Llama's block with
/// multi-head latent attention (`q_lora_rank` null for a plain query projection) and, from block
/// `first_k_dense_replace` on, an MoE of `n_routed_experts` experts of `moe_intermediate_size`
/// with `n_shared_experts` always-used experts of the same width (one MLP `n_shared x` wide) and
/// a bias-free router; V3's router score correction is a buffer. Biased attention projections
/// (`attention_bias`) are not modelled and are refused.
fn deepseek(o: &Obj, name: &str, model_type: &str) -> anyhow::Result<TransformerSpec> {
    if opt_bool(o, "attention_bias", false)? {
        return input_err(
            &field_name("attention_bias"),
            "true (biased latent-attention projections are not modelled); accepted false",
        );
    }
    let base = llama_like(o, name, model_type)?;
    let mla = Mla {
        q_lora_rank: opt_u64(o, "q_lora_rank")?.unwrap_or(0),
        kv_lora_rank: req_u64(o, "kv_lora_rank")?,
        qk_nope: req_u64(o, "qk_nope_head_dim")?,
        qk_rope: req_u64(o, "qk_rope_head_dim")?,
        v_head: req_u64(o, "v_head_dim")?,
    };
    let moe = deepseek_moe(o, base.layers, (0, 0))?;
    Ok(TransformerSpec {
        kv_heads: base.heads,
        extras: BlockExtras {
            head_dim: Some(mla.qk_nope + mla.qk_rope),
            attn_bias: None,
            mla: Some(Box::new(mla)),
            moe: Some(Box::new(moe)),
            ..base.extras
        },
        ..base
    })
}

/// DeepSeek-V2/V3's MoE layout (also GLM-4.5's): `n_routed_experts` of `moe_intermediate_size`,
/// top-k, `n_shared_experts` always-on experts of the same width, and `first_k_dense_replace`
/// leading blocks with the dense MLP, each key absent at `defaults` (shared experts, dense
/// blocks). (transformers builds neither's multi-token-prediction layers.)
fn deepseek_moe(o: &Obj, layers: u64, defaults: (u64, u64)) -> anyhow::Result<Moe> {
    let moe_ffn = req_u64(o, "moe_intermediate_size")?;
    Ok(Moe {
        experts: req_u64(o, "n_routed_experts")?,
        top_k: req_u64(o, "num_experts_per_tok")?,
        expert_ffn: moe_ffn,
        shared_ffn: opt_u64(o, "n_shared_experts")?
            .unwrap_or(defaults.0)
            .saturating_mul(moe_ffn),
        shared_gate: false,
        dense_layers: opt_u64(o, "first_k_dense_replace")?
            .unwrap_or(defaults.1)
            .min(layers),
        expert_parallel: 1,
        capacity_factor: CapacityFactor::default(),
        expert_bias: false,
        router_bias: false,
        clamped_glu: false,
    })
}

/// T5 and mT5 (`T5ForConditionalGeneration`, `MT5ForConditionalGeneration`): pre-RMSNorm blocks
/// without biases, attention `num_heads x d_kv` wide (not necessarily `d_model`), no position
/// table but a relative-position bias of `relative_attention_num_buckets x num_heads` in each
/// stack's first block, a final norm per stack, and `feed_forward_proj`: `relu` (T5 v1.0: two
/// matrices) or `gated-gelu` (v1.1, mT5: three, with transformers' tanh `gelu_new`), and the LM
/// head tied to the shared embedding. transformers 5 ties it always: `T5Config` / `MT5Config`
/// read v1.1's and mT5's `tie_word_embeddings: false` only as "do not scale the decoder output"
/// (transformers 4 kept a separate `vocab x d_model` head for them, which a checkpoint written
/// then still stores; `--safetensors` lists it as a tied duplicate).
fn t5(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "d_model")?;
    let heads = req_u64(o, "num_heads")?;
    let layers = req_u64(o, "num_layers")?;
    let d_kv = req_u64(o, "d_kv")?;
    let proj = match o.get("feed_forward_proj") {
        None | Some(Value::Null) => "relu".to_string(),
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        Some(v) => {
            return input_err(
                &field_name("feed_forward_proj"),
                format!("{v} is not a string; accepted relu, gated-gelu, gated-silu, ..."),
            )
        }
    };
    let (gated, act_name) = match proj.strip_prefix("gated-") {
        Some(a) => (true, a),
        None => (false, proj.as_str()),
    };
    // transformers' T5Config maps "gated-gelu" to the tanh `gelu_new`
    let act_name = if gated && act_name == "gelu" {
        "gelu_new"
    } else {
        act_name
    };
    let Some(act) = Activation::from_name(act_name) else {
        return input_err(
            &field_name("feed_forward_proj"),
            format!(
                "'{proj}' is not a modelled activation; accepted relu, gated-gelu, or [gated-]{}",
                Activation::accepted()
            ),
        );
    };
    let base = presets::llama(
        name,
        layers,
        hidden,
        heads,
        heads,
        req_u64(o, "d_ff")?,
        req_u64(o, "vocab_size")?,
    );
    Ok(TransformerSpec {
        arch: Arch::Encoder,
        ffn_kind: if gated {
            FfnKind::Swiglu
        } else {
            FfnKind::Gelu
        },
        activation: Some(act),
        tied_embeddings: true,
        extras: BlockExtras {
            head_dim: (d_kv * heads != hidden).then_some(d_kv),
            enc_dec: Some(Box::new(EncDec {
                decoder_layers: opt_u64(o, "num_decoder_layers")?.unwrap_or(layers),
                rel_buckets: opt_u64(o, "relative_attention_num_buckets")?.unwrap_or(32),
                target_seq: 0,
            })),
            ..BlockExtras::default()
        },
        ..base
    })
}

/// BART (`BartForConditionalGeneration`): post-LayerNorm blocks with biases and a GELU MLP,
/// learned positions per stack with transformers' 2 offset rows and a LayerNorm after each
/// stack's embedding, no final norms, the LM head tied to the shared embedding
/// (`final_logits_bias` is a buffer). The decoder must match the encoder's heads and FFN width.
fn bart(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let heads = req_u64(o, "encoder_attention_heads")?;
    let ffn = req_u64(o, "encoder_ffn_dim")?;
    for (key, enc, enc_key) in [
        ("decoder_attention_heads", heads, "encoder_attention_heads"),
        ("decoder_ffn_dim", ffn, "encoder_ffn_dim"),
    ] {
        if let Some(d) = opt_u64(o, key)? {
            if d != enc {
                return input_err(
                    &field_name(key),
                    format!("{d} differs from {enc_key} {enc}; accepted {enc} (the planner models equal stacks)"),
                );
            }
        }
    }
    if opt_bool(o, "add_final_layer_norm", false)? {
        return input_err(
            &field_name("add_final_layer_norm"),
            "true (mBART's final norms are not modelled under model_type bart); accepted false",
        );
    }
    let base = presets::bert(
        name,
        req_u64(o, "encoder_layers")?,
        req_u64(o, "d_model")?,
        heads,
    );
    Ok(TransformerSpec {
        vocab: req_u64(o, "vocab_size")?,
        ffn,
        max_positions: req_pos(o, "max_position_embeddings")?,
        type_vocab: 0,
        head: Head::Lm,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", true)?,
        extras: BlockExtras {
            position_offset: 2,
            enc_dec: Some(Box::new(EncDec {
                decoder_layers: req_u64(o, "decoder_layers")?,
                rel_buckets: 0,
                target_seq: 0,
            })),
            ..BlockExtras::default()
        },
        ..base
    })
}

/// A rotary decoder with one LayerNorm before parallel attention and GELU MLP, biases, and an
/// LM head with a bias (`PhiForCausalLM`; Phi-1/1.5/2). `qk_layernorm` adds per-head
/// LayerNorms on q and k.
fn phi(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let heads = req_u64(o, "num_attention_heads")?;
    let base = presets::gpt2(
        name,
        req_u64(o, "num_hidden_layers")?,
        req_u64(o, "hidden_size")?,
        heads,
        req_u64(o, "vocab_size")?,
        0,
    );
    Ok(TransformerSpec {
        kv_heads: opt_u64(o, "num_key_value_heads")?.unwrap_or(heads),
        ffn: req_u64(o, "intermediate_size")?,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", false)?,
        extras: BlockExtras {
            qk_norm: if opt_bool(o, "qk_layernorm", false)? {
                QkNorm::PerHead
            } else {
                QkNorm::None
            },
            block_norms: Some(1),
            parallel_attn: true,
            lm_head_bias: true,
            separate_qkv: true,
            ..BlockExtras::default()
        },
        ..base
    })
}

/// OPT (`OPTForCausalLM`): learned positions with 2 unused offset rows, a token embedding of
/// `word_embed_proj_dim` projected in and out when it differs from `hidden_size`, pre-LN
/// (`do_layer_norm_before`, with a final norm) or post-LN (OPT-350m, none).
fn opt(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "hidden_size")?;
    let base = presets::gpt2(
        name,
        req_u64(o, "num_hidden_layers")?,
        hidden,
        req_u64(o, "num_attention_heads")?,
        req_u64(o, "vocab_size")?,
        req_pos(o, "max_position_embeddings")?,
    );
    let embed = opt_u64(o, "word_embed_proj_dim")?.unwrap_or(hidden);
    Ok(TransformerSpec {
        ffn: req_u64(o, "ffn_dim")?,
        bias: opt_bool(o, "enable_bias", true)?,
        final_norm: opt_bool(o, "do_layer_norm_before", true)?,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", true)?,
        extras: BlockExtras {
            position_offset: 2,
            embed_proj: (embed != hidden).then_some(embed),
            separate_qkv: true,
            ..BlockExtras::default()
        },
        ..base
    })
}

/// GPT-J (`GPTJForCausalLM`): GPT-2's keys, rotary positions, one LayerNorm before parallel
/// attention (no biases) and MLP (biases), an untied LM head with a bias.
fn gptj(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "n_embd")?;
    let base = presets::gpt2(
        name,
        req_u64(o, "n_layer")?,
        hidden,
        req_u64(o, "n_head")?,
        req_u64(o, "vocab_size")?,
        0,
    );
    Ok(TransformerSpec {
        ffn: opt_u64(o, "n_inner")?.unwrap_or(hidden.saturating_mul(4)),
        tied_embeddings: opt_bool(o, "tie_word_embeddings", false)?,
        extras: BlockExtras {
            block_norms: Some(1),
            parallel_attn: true,
            attn_bias: Some(false),
            lm_head_bias: true,
            separate_qkv: true,
            ..BlockExtras::default()
        },
        ..base
    })
}

/// Falcon (`FalconForCausalLM`): rotary (or ALiBi, no parameters either way), multi-query
/// attention (`multi_query`) or grouped K/V (`new_decoder_architecture`, `num_kv_heads`),
/// parallel attention and MLP under one LayerNorm (two with `num_ln_in_parallel_attn` = 2, the
/// new architecture's default), `bias` on all linears, a tied LM head.
fn falcon(o: &Obj, name: &str) -> anyhow::Result<TransformerSpec> {
    let hidden = req_u64(o, "hidden_size")?;
    let heads = req_u64(o, "num_attention_heads")?;
    let new_arch = opt_bool(o, "new_decoder_architecture", false)?;
    let kv_heads = if new_arch {
        opt_u64(o, "num_kv_heads")?.unwrap_or(heads)
    } else if opt_bool(o, "multi_query", true)? {
        1
    } else {
        heads
    };
    let parallel = opt_bool(o, "parallel_attn", true)?;
    let lns = opt_u64(o, "num_ln_in_parallel_attn")?.or(new_arch.then_some(2));
    let block_norms = if !parallel || lns == Some(2) { 2 } else { 1 };
    let base = presets::gpt2(
        name,
        req_u64(o, "num_hidden_layers")?,
        hidden,
        heads,
        req_u64(o, "vocab_size")?,
        0,
    );
    Ok(TransformerSpec {
        kv_heads,
        ffn: opt_u64(o, "ffn_hidden_size")?.unwrap_or(hidden.saturating_mul(4)),
        bias: opt_bool(o, "bias", false)?,
        tied_embeddings: opt_bool(o, "tie_word_embeddings", true)?,
        extras: BlockExtras {
            block_norms: (block_norms != 2).then_some(block_norms),
            parallel_attn: parallel,
            // one query_key_value projection
            fused_qkv: true,
            ..BlockExtras::default()
        },
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma2's soft-capping is on by its config class's defaults, off when a key is null (and
    /// for Gemma3, whose class defaults are null); a value that is not a positive number is
    /// refused naming the key.
    #[test]
    fn gemma_soft_capping_follows_the_config_and_its_class_defaults() {
        let cfg = |model_type: &str, extra: &str| {
            format!(
                r#"{{"model_type":"{model_type}","hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,
                "vocab_size":100{extra}}}"#
            )
        };
        let caps = |t: TransformerSpec| (t.extras.attn_softcap, t.extras.final_softcap);
        assert_eq!(caps(parse(&cfg("gemma2", ""), "g").unwrap()), (true, true));
        let one = r#","attn_logit_softcapping":null,"final_logit_softcapping":30.0"#;
        assert_eq!(
            caps(parse(&cfg("gemma2", one), "g").unwrap()),
            (false, true)
        );
        assert_eq!(
            caps(parse(&cfg("gemma3_text", ""), "g").unwrap()),
            (false, false)
        );
        let bad = r#","attn_logit_softcapping":-1"#;
        let err = parse(&cfg("gemma2", bad), "g").unwrap_err().to_string();
        assert!(err.contains("attn_logit_softcapping"), "{err}");
    }

    use crate::plan::params::transformer;
    use crate::spec::ModelSpec;

    #[test]
    fn qwen2_has_qkv_bias_only() {
        // Qwen2-0.5B's published config: 494,032,768 parameters (tied embeddings).
        let text = r#"{"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
            "vocab_size":151936,"rms_norm_eps":1e-6,"tie_word_embeddings":true}"#;
        let t = parse(text, "qwen2-0.5b").unwrap();
        assert_eq!(transformer(&t).total, 494_032_768);
    }

    #[test]
    fn dropout_and_activation_keys_are_read() {
        use crate::spec::transformer::{Activation, DropoutP};
        let gpt2 = r#"{"model_type":"gpt2","n_embd":64,"n_layer":2,"n_head":2,"vocab_size":100,
            "n_positions":128,"resid_pdrop":0.0,"embd_pdrop":0.0,"attn_pdrop":0.0,
            "activation_function":"gelu_pytorch_tanh"}"#;
        let t = parse(gpt2, "g").unwrap();
        assert_eq!(t.dropout, Some(DropoutP(0.0)));
        assert_eq!(t.activation, Some(Activation::GeluPytorchTanh));
        // one site left at its class default (0.1) keeps masks: the largest counts
        let t = parse(&gpt2.replace(r#""attn_pdrop":0.0,"#, ""), "g").unwrap();
        assert_eq!(t.dropout, Some(DropoutP(0.1)));
        // none of the keys: the architecture's default, as before
        let bare = r#"{"model_type":"gpt2","n_embd":64,"n_layer":2,"n_head":2,"vocab_size":100,
            "n_positions":128}"#;
        let t = parse(bare, "g").unwrap();
        assert_eq!((t.dropout, t.activation), (None, None));
        assert_eq!(t.dropout_p(), DropoutP(0.1));
        assert_eq!(t.activation_kind(), Activation::GeluNew);

        let bert = r#"{"model_type":"bert","hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":2,"intermediate_size":256,"vocab_size":100,
            "max_position_embeddings":128,"hidden_dropout_prob":0.0,
            "attention_probs_dropout_prob":0.0,"hidden_act":"relu"}"#;
        let t = parse(bert, "b").unwrap();
        assert_eq!(t.dropout_p(), DropoutP(0.0));
        assert_eq!(t.activation_kind(), Activation::Relu);

        let llama = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":172,
            "num_hidden_layers":2,"num_attention_heads":2,"vocab_size":100,"rms_norm_eps":1e-6,
            "attention_dropout":0.1,"hidden_act":"silu"}"#;
        let t = parse(llama, "l").unwrap();
        assert_eq!(t.dropout, Some(DropoutP(0.1)));
        assert_eq!(t.activation, Some(Activation::Silu));
        // Gemma's hidden_activation wins over its legacy hidden_act
        let gemma = llama.replace("\"llama\"", "\"gemma\"").replace(
            r#""hidden_act":"silu""#,
            r#""hidden_act":"gelu","hidden_activation":"gelu_pytorch_tanh""#,
        );
        assert_eq!(
            parse(&gemma, "g").unwrap().activation,
            Some(Activation::GeluPytorchTanh)
        );
    }

    #[test]
    fn bad_dropout_or_activation_names_the_key() {
        let llama = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":172,
            "num_hidden_layers":2,"num_attention_heads":2,"vocab_size":100,"rms_norm_eps":1e-6,
            "hidden_act":"gelu_python"}"#;
        let err = parse(llama, "l").unwrap_err();
        assert_eq!(
            format!("{err}"),
            "invalid config.json hidden_act: 'gelu_python' is not a modelled activation; accepted \
             gelu, gelu_pytorch_tanh, gelu_new, gelu_fast, quick_gelu, relu, silu"
        );
        let bert = r#"{"model_type":"bert","hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":2,"intermediate_size":256,"vocab_size":100,
            "max_position_embeddings":128,"hidden_dropout_prob":1.5}"#;
        let err = parse(bert, "b").unwrap_err();
        assert_eq!(
            format!("{err}"),
            "invalid config.json hidden_dropout_prob: 1.5 is not a probability; accepted a number with 0 <= p < 1"
        );
    }

    #[test]
    fn family_extras_are_data_and_round_trip() {
        let qwen3 = r#"{"model_type":"qwen3","hidden_size":64,"intermediate_size":172,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "head_dim":32,"vocab_size":100}"#;
        let t = parse(qwen3, "q").unwrap();
        assert_eq!(t.extras.head_dim, Some(32));
        assert_eq!(t.extras.qk_norm, QkNorm::PerHead);
        assert_eq!(t.norm, NormKind::Rmsnorm);
        // q 64->128, k/v 64->64 each, o 128->64; q/k norms of 32
        let p = transformer(&t);
        assert_eq!(p.attention_per_layer, 64 * 128 * 2 + 2 * 64 * 64);
        assert_eq!(p.norms_per_layer, 2 * 64 + 2 * 32);
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains("\"head_dim\":32") && json.contains("\"qk_norm\":\"per_head\""));
        let back: TransformerSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        // a plain spec writes none of the extras, and old JSON without them reads as plain
        let ModelSpec::Transformer(gpt2) = presets::preset("gpt2").unwrap() else {
            unreachable!()
        };
        let json = serde_json::to_string(&gpt2).unwrap();
        for key in [
            "head_dim",
            "qk_norm",
            "block_norms",
            "parallel_attn",
            "embed_proj",
        ] {
            assert!(!json.contains(key), "{json}");
        }
        let back: TransformerSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, gpt2);
        assert_eq!(
            back.block_kind(),
            Some(crate::spec::transformer::BlockKind::Gpt2)
        );
        assert_eq!(t.block_kind(), None);
    }

    #[test]
    fn unknown_family_lists_the_supported_ones() {
        let err = parse(r#"{"model_type":"mamba"}"#, "x").unwrap_err();
        assert_eq!(
            format!("{err}"),
            format!(
                "invalid config.json model_type: 'mamba' is not supported; accepted \
                 {MODEL_TYPES} (for any other checkpoint, `--safetensors` counts its parameters \
                 from the weights' headers)"
            )
        );
        let err = parse(r#"{"model_type":"opt","hidden_size":64}"#, "x").unwrap_err();
        assert_eq!(
            format!("{err}"),
            "invalid config.json num_hidden_layers: missing; accepted a non-negative integer"
        );
        let err = parse(r#"{"model_type":"falcon","num_hidden_layers":2}"#, "x").unwrap_err();
        assert_eq!(
            format!("{err}"),
            "invalid config.json hidden_size: missing; accepted a non-negative integer"
        );
    }

    /// The families added with OLMoE, Granite-MoE, Phi-3.5-MoE and EXAONE 4 map onto the
    /// Llama block's departures, and their own keys' bad values are one line naming the key.
    #[test]
    fn newer_moe_and_exaone_families_map_and_name_their_keys() {
        let cfg = |model_type: &str, extra: &str| {
            format!(
                r#"{{"model_type":"{model_type}","hidden_size":64,"intermediate_size":32,
                "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
                "vocab_size":100,"num_experts_per_tok":2{extra}}}"#
            )
        };
        let olmoe = parse(&cfg("olmoe", r#","num_experts":8"#), "o").unwrap();
        assert_eq!(olmoe.extras.qk_norm, QkNorm::Full);
        let m = olmoe.extras.moe.as_deref().unwrap();
        assert_eq!((m.experts, m.top_k, m.expert_ffn), (8, 2, 32));
        let err = parse(&cfg("olmoe", ""), "o").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config.json num_experts: missing; accepted a non-negative integer"
        );
        let granite = parse(&cfg("granitemoe", r#","num_local_experts":4"#), "g").unwrap();
        assert_eq!(granite.extras.moe.as_deref().unwrap().experts, 4);
        assert_eq!(granite.norm, NormKind::Rmsnorm);
        let phi = r#","num_local_experts":4,"attention_bias":true,"lm_head_bias":true"#;
        let phi = parse(&cfg("phimoe", phi), "p").unwrap();
        assert_eq!(phi.norm, NormKind::Layernorm);
        assert!(phi.extras.lm_head_bias && phi.attn_bias() && !phi.bias);
        assert_eq!(
            crate::plan::departures::planned_block(&phi),
            Some(crate::spec::transformer::BlockKind::Llama)
        );
        let three = cfg("phimoe", r#","num_local_experts":4"#)
            .replace(r#""num_experts_per_tok":2"#, r#""num_experts_per_tok":3"#);
        let err = parse(&three, "p").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config.json num_experts_per_tok: 3 (PhiMoE's sparsemixer routes exactly two \
             experts); accepted 2"
        );
        let exaone = parse(&cfg("exaone4", r#","head_dim":32"#), "e").unwrap();
        assert_eq!(exaone.extras.qk_norm, QkNorm::PerHead);
        assert_eq!(exaone.extras.head_dim, Some(32));
        assert!(!exaone.extras.norm_weight_fp32 && exaone.extras.moe.is_none());
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse(r#"{"model_type":"gpt2","n_embd":768}"#, "x").unwrap_err();
        assert_eq!(
            format!("{err}"),
            "invalid config.json n_layer: missing; accepted a non-negative integer"
        );
    }
}
