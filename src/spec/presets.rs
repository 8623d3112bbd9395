//! Named models: published architectures (exact hyper-parameters from their papers/configs) and
//! small `tiny-*` shapes that CPU calibration sweeps can afford.

use super::cnn::{resnet, vgg16};
use super::moe::Moe;
use super::transformer::{Arch, BlockExtras, FfnKind, Head, NormKind, PatchEmbed, TransformerSpec};
use super::ModelSpec;
use crate::error::input_err;

/// Names accepted by `--model`, in display order.
pub const NAMES: &[&str] = &[
    "bert-base",
    "bert-large",
    "gpt2",
    "gpt2-medium",
    "vit-base-16",
    "vit-large-16",
    "llama2-7b",
    "resnet18",
    "resnet50",
    "vgg16",
    "tiny-gpt",
    "tiny-bert",
    "tiny-llama",
    "tiny-mixtral",
    "tiny-qwen-moe",
    "tiny-vit",
    "tiny-resnet18",
    "tiny-resnet50",
    "tiny-vgg",
];

/// What the preset families share unless they say otherwise: multi-head attention, a 4 x hidden
/// GELU FFN, LayerNorm, biases (but no separate QKV bias), no token vocabulary, learned positions
/// or token types, a final norm, an untied LM head, no patch embedding.
fn base(name: &str, arch: Arch, layers: u64, hidden: u64, heads: u64) -> TransformerSpec {
    TransformerSpec {
        name: name.into(),
        arch,
        layers,
        hidden,
        heads,
        kv_heads: heads,
        ffn: hidden.saturating_mul(4),
        ffn_kind: FfnKind::Gelu,
        vocab: 0,
        max_positions: 0,
        type_vocab: 0,
        norm: NormKind::Layernorm,
        bias: true,
        qkv_bias: false,
        tied_embeddings: false,
        embedding_norm: false,
        final_norm: true,
        head: Head::Lm,
        patch: None,
        dropout: None,
        activation: None,
        extras: Default::default(),
    }
}

/// BERT (post-LN encoder, learned positions, token types, pooler), as `BertModel`.
pub fn bert(name: &str, layers: u64, hidden: u64, heads: u64) -> TransformerSpec {
    TransformerSpec {
        vocab: 30522,
        max_positions: 512,
        type_vocab: 2,
        tied_embeddings: true,
        embedding_norm: true,
        final_norm: false,
        head: Head::Pooler,
        ..base(name, Arch::Encoder, layers, hidden, heads)
    }
}

/// GPT-2 (pre-LN decoder, learned positions, LM head tied to the token embedding).
pub fn gpt2(
    name: &str,
    layers: u64,
    hidden: u64,
    heads: u64,
    vocab: u64,
    positions: u64,
) -> TransformerSpec {
    TransformerSpec {
        vocab,
        max_positions: positions,
        tied_embeddings: true,
        ..base(name, Arch::Decoder, layers, hidden, heads)
    }
}

/// Llama (pre-RMSNorm decoder, rotary positions, SwiGLU, no biases, untied LM head).
pub fn llama(
    name: &str,
    layers: u64,
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    ffn: u64,
    vocab: u64,
) -> TransformerSpec {
    TransformerSpec {
        kv_heads,
        ffn,
        ffn_kind: FfnKind::Swiglu,
        vocab,
        norm: NormKind::Rmsnorm,
        bias: false,
        ..base(name, Arch::Decoder, layers, hidden, heads)
    }
}

/// ViT (pre-LN encoder over image patches, class token, learned positions, linear classifier).
pub fn vit(
    name: &str,
    layers: u64,
    hidden: u64,
    heads: u64,
    image: u64,
    patch: u64,
    classes: u64,
) -> TransformerSpec {
    TransformerSpec {
        head: Head::Classifier { classes },
        patch: Some(PatchEmbed {
            image,
            patch,
            channels: 3,
        }),
        ..base(name, Arch::Encoder, layers, hidden, heads)
    }
}

/// `t` with a mixture-of-experts feed-forward.
fn moe(t: TransformerSpec, m: Moe) -> TransformerSpec {
    TransformerSpec {
        extras: BlockExtras {
            moe: Some(Box::new(m)),
            ..t.extras
        },
        ..t
    }
}

pub fn preset(name: &str) -> anyhow::Result<ModelSpec> {
    use ModelSpec::{Cnn, Transformer};
    Ok(match name {
        "bert-base" | "bert-base-uncased" => Transformer(bert("bert-base", 12, 768, 12)),
        "bert-large" | "bert-large-uncased" => Transformer(bert("bert-large", 24, 1024, 16)),
        "gpt2" => Transformer(gpt2("gpt2", 12, 768, 12, 50257, 1024)),
        "gpt2-medium" => Transformer(gpt2("gpt2-medium", 24, 1024, 16, 50257, 1024)),
        "vit-base-16" => Transformer(vit("vit-base-16", 12, 768, 12, 224, 16, 1000)),
        "vit-large-16" => Transformer(vit("vit-large-16", 24, 1024, 16, 224, 16, 1000)),
        "llama2-7b" => Transformer(llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000)),
        "resnet18" => Cnn(resnet("resnet18", [2, 2, 2, 2], false, 64, 1000)),
        "resnet50" => Cnn(resnet("resnet50", [3, 4, 6, 3], true, 64, 1000)),
        "vgg16" => Cnn(vgg16("vgg16", 64, 4096, 1000)),
        // Small shapes for CPU calibration: same structure, sizes a 2-core machine steps in milliseconds.
        "tiny-gpt" => Transformer(gpt2("tiny-gpt", 4, 128, 4, 1024, 1024)),
        "tiny-bert" => Transformer(TransformerSpec {
            vocab: 1024,
            ..bert("tiny-bert", 4, 128, 4)
        }),
        "tiny-llama" => Transformer(TransformerSpec {
            max_positions: 0,
            ..llama("tiny-llama", 4, 128, 4, 2, 344, 1024)
        }),
        // Mixtral's block: 8 SwiGLU experts, top-2, grouped-query attention
        "tiny-mixtral" => Transformer(moe(
            llama("tiny-mixtral", 2, 128, 4, 2, 256, 1024),
            Moe::routed(8, 2, 256),
        )),
        // Qwen2-MoE's block: q/k/v biases, 8 experts top-2 and a gated shared expert
        "tiny-qwen-moe" => Transformer(moe(
            TransformerSpec {
                qkv_bias: true,
                ..llama("tiny-qwen-moe", 2, 128, 4, 4, 344, 1024)
            },
            Moe {
                shared_ffn: 256,
                shared_gate: true,
                ..Moe::routed(8, 2, 128)
            },
        )),
        "tiny-vit" => Transformer(vit("tiny-vit", 4, 128, 4, 64, 8, 10)),
        "tiny-resnet18" => Cnn(resnet("tiny-resnet18", [2, 2, 2, 2], false, 8, 10)),
        "tiny-resnet50" => Cnn(resnet("tiny-resnet50", [3, 4, 6, 3], true, 4, 10)),
        "tiny-vgg" => Cnn(vgg16("tiny-vgg", 8, 64, 10)),
        _ => {
            return input_err(
                "model",
                format!("'{name}' is not a preset; accepted {}", NAMES.join(", ")),
            )
        }
    })
}
