//! Transformer shape: everything the planner and the harness need to build or count one.

use crate::error::{check_range, input_err};
use serde::{Deserialize, Serialize};

pub use super::activation::Activation;

/// Encoder (BERT, ViT: bidirectional) or decoder (GPT, Llama: causal mask, LM head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Encoder,
    Decoder,
}

/// Feed-forward kind: two-matrix GELU MLP, or three-matrix SwiGLU (gate, up, down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    Gelu,
    Swiglu,
}

/// A dropout probability in [0, 1). Memory depends only on whether it is zero: PyTorch's
/// `F.dropout` returns its input unchanged at p = 0 (no mask is kept), and at any p > 0 it keeps a
/// mask (1-byte bool on CUDA via `native_dropout`, the activation's dtype on CPU). Kept as a
/// probability because that is what users and config.json files write.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DropoutP(pub f32);

impl DropoutP {
    pub fn is_active(self) -> bool {
        self.0 > 0.0
    }
}

impl Eq for DropoutP {}

impl std::hash::Hash for DropoutP {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

/// LayerNorm (weight + bias) or RMSNorm (weight only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    Layernorm,
    Rmsnorm,
}

/// Per-head normalisation of queries and keys before attention, with the spec's norm kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// none (most families)
    #[default]
    None,
    /// one norm of `head_dim` shared by all heads, for q and one for k (Qwen3, Gemma3)
    PerHead,
    /// one norm over the whole q projection (`heads x head_dim`) and one over k
    /// (`kv_heads x head_dim`) (OLMo2)
    Full,
}

/// The structural departures of newer families from the plain pre/post-norm block, as data: each
/// one's default is the plain block, and a spec file without them (older CSV `spec_json`) reads
/// with that meaning. Flattened into the spec's JSON; defaults are not written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct BlockExtras {
    /// Width of one attention head when it is not `hidden / heads` (Qwen3, Gemma2/3): q is
    /// `heads x head_dim` wide, k and v `kv_heads x head_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<u64>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub qk_norm: QkNorm,
    /// Hidden-width norms in one block when not 2: 1 for a shared pre-norm before parallel
    /// attention and MLP (Phi, GPT-J, Falcon-7B), 4 with Gemma2/3's pre/post feed-forward norms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_norms: Option<u64>,
    /// Attention and MLP read the same input and add to the residual together (Phi, GPT-J,
    /// Falcon). No parameter changes; recorded for the activation model.
    #[serde(default, skip_serializing_if = "is_default")]
    pub parallel_attn: bool,
    /// Biases on the attention projections when they differ from `bias` (which then means the
    /// MLP's only): GPT-J has MLP biases but none on q, k, v, o.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_bias: Option<bool>,
    /// Attention scores soft-capped, `cap · tanh(scores / cap)`, before the softmax (Gemma2's
    /// `attn_logit_softcapping`): eager attention keeps the tanh output, one more score-sized
    /// tensor. (transformers runs Gemma2 eager or with FlashAttention-2, which caps in the tile.)
    #[serde(default, skip_serializing_if = "is_default")]
    pub attn_softcap: bool,
    /// Eager attention computes its softmax in fp32 and casts the probabilities back
    /// (transformers' `softmax(..., dtype=torch.float32).to(query.dtype)` in GPT-NeoX,
    /// StarCoder2, Phi, OPT and BLOOM; GPT-J's fp32 scores; GPT-BigCode's
    /// `attention_softmax_in_fp32`) where GPT-2's block runs it in the compute dtype: in pure
    /// 16-bit the fp32 probabilities are kept beside the 16-bit ones the value matmul saves.
    /// (The Llama block's measured bytes already include its own upcast.)
    #[serde(default, skip_serializing_if = "is_default")]
    pub fp32_softmax: bool,
    /// The norms apply their weight in fp32 before casting back (Gemma's `x * (1 + w.float())`,
    /// OLMo2's `(w * x).to(dtype)`), so under pure 16-bit compute each keeps an fp32 normalised
    /// tensor where Llama's keeps a 16-bit one.
    #[serde(default, skip_serializing_if = "is_default")]
    pub norm_weight_fp32: bool,
    /// The norms are Cohere's composed LayerNorm (weight, no bias): in fp32 it subtracts the
    /// mean twice, once for the variance and once to normalise, and both differences are kept
    /// for backward, an fp32 tensor more per normalised element than the composed RMSNorm.
    #[serde(default, skip_serializing_if = "is_default")]
    pub centered_norm: bool,
    /// q, k and v come out of one fused projection (Phi-3's `qkv_proj`; GPT-NeoX's, Falcon's and
    /// BLOOM's `query_key_value`) where the block it is planned with has separate ones (Llama)
    /// or keeps no rotated copies (GPT-2): no parameter changes, but a kernel that saves the
    /// value as a view keeps the whole fused output, and LoRA adapts one linear.
    #[serde(default, skip_serializing_if = "is_default")]
    pub fused_qkv: bool,
    /// q, k and v are three projections of the block's input where GPT-2 fuses them into one
    /// (StarCoder2, Phi, GPT-J, OPT): no parameter changes, but under autocast each casts the
    /// fp32 norm output to 16 bits on its own, two casts more than GPT-2's one.
    #[serde(default, skip_serializing_if = "is_default")]
    pub separate_qkv: bool,
    /// SwiGLU's gate and up projections are one fused linear (Phi-3's `gate_up_proj`): no
    /// parameter changes (the saved tensors are the Llama block's, measured within 1 %), but
    /// LoRA adapts one `h -> 2f` linear and a quantized base dequantizes it whole.
    #[serde(default, skip_serializing_if = "is_default")]
    pub fused_gate_up: bool,
    /// A learned sink logit per head that every query's softmax also normalises over
    /// (gpt-oss's `sinks`): `heads` parameters per block, one score column more.
    #[serde(default, skip_serializing_if = "is_default")]
    pub attn_sinks: bool,
    /// The LM head's logits soft-capped the same way (Gemma2's `final_logit_softcapping`): the
    /// tanh output is kept, one more b·s·V tensor in the logits' dtype.
    #[serde(default, skip_serializing_if = "is_default")]
    pub final_softcap: bool,
    /// A bias on the LM head's vocabulary projection (Phi, GPT-J).
    #[serde(default, skip_serializing_if = "is_default")]
    pub lm_head_bias: bool,
    /// Learned position rows beyond `max_positions` that no sequence position uses (OPT's 2).
    #[serde(default, skip_serializing_if = "is_default")]
    pub position_offset: u16,
    /// Width of the token embedding (and of a tied LM head) when not `hidden`, with bias-free
    /// projections in and out of the blocks (OPT's `word_embed_proj_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_proj: Option<u64>,
    /// A transform of the final hidden states before the head's projection (masked-LM heads,
    /// ELECTRA's discriminator).
    #[serde(default, skip_serializing_if = "is_default")]
    pub head_transform: HeadTransform,
    /// Width of every embedding table (and the embedding norm) when factorised below `hidden`,
    /// with a biased linear up to `hidden` (ELECTRA's `embedding_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factorized_embedding: Option<u64>,
    /// Rows of a relative-position embedding table shared by all blocks, with a norm over it
    /// when `rel_norm` (DeBERTa-v2: `2 x position_buckets`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub rel_positions: u32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub rel_norm: bool,
    /// Position projections (`hidden -> hidden` with bias) per block on top of q, k, v, o
    /// (DeBERTa-v2 without `share_att_key`: one for c2p, one for p2c).
    #[serde(default, skip_serializing_if = "is_default")]
    pub pos_proj: u8,
    /// Disentangled attention terms over the relative positions (DeBERTa-v2/v3's `pos_att_type`:
    /// c2p, p2c; 0 without relative attention). No parameters of their own (the projections are
    /// `pos_proj`'s or shared with k and q); recorded for the activation model.
    #[serde(default, skip_serializing_if = "is_default")]
    pub rel_att_terms: u8,
    /// transformers has no sdpa path for the class (BLOOM's ALiBi, DeBERTa-v2's disentangled
    /// attention): attention runs eager whatever is asked.
    #[serde(default, skip_serializing_if = "is_default")]
    pub eager_only: bool,
    /// A decoder stack beside these (encoder) blocks: T5, mT5, BART.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enc_dec: Option<Box<super::encdec::EncDec>>,
    /// Multi-head latent attention in place of q/k/v/o projections (DeepSeek-V2/V3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<Box<super::moe::Mla>>,
    /// (Boxed, as is `mla`: rare, and `ModelSpec` stays small.)
    /// A mixture-of-experts feed-forward in place of the dense MLP (in all blocks but
    /// `moe.dense_layers` of them): Mixtral, Qwen2-MoE, Qwen3-MoE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<Box<super::moe::Moe>>,
    /// A vision tower and projector in front of these (language-model) blocks: Gemma 3, LLaVA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<Box<super::vision::VisionTower>>,
}

/// What sits between the last block and the head's projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadTransform {
    #[default]
    None,
    /// a dense `hidden -> hidden` with bias (ELECTRA's discriminator)
    Dense,
    /// a dense `hidden -> hidden` with bias and a norm (BERT-family masked-LM heads:
    /// DistilBERT, DeBERTa-v2)
    DenseNorm,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What sits on top of the final hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Head {
    /// Vocabulary projection (tied to the token embedding when `tied_embeddings`).
    Lm,
    /// BERT pooler: dense h->h with bias on the first token (no MLM head, as in `BertModel`).
    Pooler,
    /// Linear classifier on the first token (ViT, sequence classification).
    Classifier { classes: u64 },
}

/// ViT patch embedding: a conv with kernel = stride = patch, plus a learned class token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PatchEmbed {
    pub image: u64,
    pub patch: u64,
    pub channels: u64,
}

impl PatchEmbed {
    /// Tokens per image at a given side length: patches plus the class token.
    pub fn seq_for(&self, image: u64) -> u64 {
        let per_side = image / self.patch;
        per_side * per_side + 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TransformerSpec {
    pub name: String,
    pub arch: Arch,
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    /// Key/value heads (grouped-query attention); equal to `heads` for plain multi-head attention.
    pub kv_heads: u64,
    pub ffn: u64,
    pub ffn_kind: FfnKind,
    pub vocab: u64,
    /// Learned absolute positions; 0 for rotary models (Llama) that have none.
    pub max_positions: u64,
    /// BERT token-type embeddings (2 for BERT, 0 otherwise).
    pub type_vocab: u64,
    pub norm: NormKind,
    /// Biases on the attention and MLP linears.
    pub bias: bool,
    /// Biases on the q, k and v projections only, where `bias` is false (Qwen2). Ignored when
    /// `bias` is true; absent in older spec files, which means no such bias.
    #[serde(default)]
    pub qkv_bias: bool,
    pub tied_embeddings: bool,
    /// Norm right after the embeddings (BERT, post-LN).
    pub embedding_norm: bool,
    /// Norm after the last block (GPT-2, ViT, Llama: pre-LN).
    pub final_norm: bool,
    pub head: Head,
    /// ViT: images instead of tokens.
    pub patch: Option<PatchEmbed>,
    /// Dropout probability of the residual, attention-probability and embedding dropouts;
    /// `None` = the architecture's transformers default ([`TransformerSpec::dropout_p`]).
    /// Absent in older spec files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<DropoutP>,
    /// MLP activation; `None` = the architecture's transformers default
    /// ([`TransformerSpec::activation_kind`]). Absent in older spec files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// Newer families' block departures ([`BlockExtras`]); all default for the plain block.
    #[serde(flatten, default)]
    pub extras: BlockExtras,
}

/// Transformer block implementations whose saved-for-backward tensors were measured in PyTorch
/// with transformers' own classes (scripts/torch_saved_bytes.py,
/// calibration/data/torch-saved-bytes-cpu.csv); a spec is matched to one by its structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// RMSNorm + SwiGLU, no dropout: Llama, Mistral, Qwen2 (identical blocks in transformers)
    Llama,
    /// pre-LayerNorm decoder with the composed tanh GELU (`gelu_new`) and dropout 0.1: GPT-2
    Gpt2,
    /// post-LayerNorm encoder with erf GELU and dropout 0.1: BERT
    Bert,
    /// pre-LayerNorm encoder over patches with erf GELU, no dropout: ViT
    Vit,
}

impl TransformerSpec {
    /// The dropout probability in effect: the spec's own, else transformers' default for the
    /// block kind (GPT-2 and BERT 0.1; Llama-family and ViT none).
    pub fn dropout_p(&self) -> DropoutP {
        self.dropout.unwrap_or(match self.block_kind() {
            Some(BlockKind::Gpt2 | BlockKind::Bert) => DropoutP(0.1),
            _ => DropoutP(0.0),
        })
    }

    /// The MLP activation in effect: the spec's own, else transformers' default for the block
    /// kind (GPT-2 `gelu_new`; BERT and ViT `gelu`; SwiGLU `silu`).
    pub fn activation_kind(&self) -> Activation {
        self.activation
            .unwrap_or(match (self.ffn_kind, self.block_kind()) {
                (FfnKind::Swiglu, _) => Activation::Silu,
                (_, Some(BlockKind::Gpt2)) => Activation::GeluNew,
                _ => Activation::Gelu,
            })
    }

    /// The measured block implementation this spec's blocks are exactly, if any. A spec with
    /// any [`BlockExtras`] departure is none of them; the planner may still plan it with one
    /// (`plan::departures::planned_block`).
    pub fn block_kind(&self) -> Option<BlockKind> {
        if self.extras != BlockExtras::default() {
            return None;
        }
        match (self.norm, self.ffn_kind, self.arch, self.patch.is_some()) {
            (NormKind::Rmsnorm, FfnKind::Swiglu, _, false) => Some(BlockKind::Llama),
            (NormKind::Layernorm, FfnKind::Gelu, Arch::Decoder, false) => Some(BlockKind::Gpt2),
            (NormKind::Layernorm, FfnKind::Gelu, Arch::Encoder, false) => Some(BlockKind::Bert),
            (NormKind::Layernorm, FfnKind::Gelu, Arch::Encoder, true) => Some(BlockKind::Vit),
            _ => None,
        }
    }
}

/// Sizes above these are typos, not models (the largest published dense models are far below).
pub const MAX_LAYERS: u64 = 1024;
pub const MAX_HIDDEN: u64 = 1 << 17;
pub const MAX_VOCAB: u64 = 1 << 24;
/// Learned position table rows: the longest trainable sequence (`spec::train::MAX_SEQ`).
pub const MAX_POSITIONS: u64 = 1 << 24;
pub const MAX_TYPE_VOCAB: u64 = 1 << 16;

impl TransformerSpec {
    pub fn head_dim(&self) -> u64 {
        self.extras.head_dim.unwrap_or(self.hidden / self.heads)
    }

    /// Width of the query projection (and of the attention output): `heads x head_dim`.
    pub fn q_width(&self) -> u64 {
        self.heads * self.head_dim()
    }

    /// Whether the attention projections carry biases.
    pub fn attn_bias(&self) -> bool {
        self.extras.attn_bias.unwrap_or(self.bias)
    }

    /// Width of the token embedding (`hidden` unless projected, OPT).
    pub fn embed_width(&self) -> u64 {
        self.extras.embed_proj.unwrap_or(self.hidden)
    }

    /// Sequence length actually processed for a training input (ViT derives it from the image).
    pub fn effective_seq(&self, seq: u64, image: u64) -> u64 {
        match &self.patch {
            Some(p) => p.seq_for(image),
            None => seq,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        check_range("layers", self.layers, 1, MAX_LAYERS)?;
        check_range("hidden", self.hidden, 1, MAX_HIDDEN)?;
        check_range("heads", self.heads, 1, self.hidden.max(1))?;
        check_range("ffn", self.ffn, 1, 64 * MAX_HIDDEN)?;
        if let Some(hd) = self.extras.head_dim {
            check_range("head_dim", hd, 1, MAX_HIDDEN)?;
        }
        if let Some(e) = self.extras.embed_proj {
            check_range("embed_proj", e, 1, MAX_HIDDEN)?;
        }
        if let Some(n) = self.extras.block_norms {
            check_range("block_norms", n, 0, 8)?;
        }
        check_range(
            "position_offset",
            self.extras.position_offset as u64,
            0,
            1 << 12,
        )?;
        check_range("pos_proj", self.extras.pos_proj as u64, 0, 2)?;
        if let Some(e) = self.extras.factorized_embedding {
            check_range("embedding_size", e, 1, MAX_HIDDEN)?;
        }
        if let Some(m) = &self.extras.moe {
            m.validate(self.layers)?;
        }
        if let Some(m) = &self.extras.mla {
            m.validate()?;
        }
        if let Some(e) = &self.extras.enc_dec {
            e.validate(MAX_LAYERS)?;
        }
        if let Some(v) = &self.extras.vision {
            v.validate(MAX_LAYERS, MAX_HIDDEN)?;
        }
        if self.extras.head_dim.is_none() && !self.hidden.is_multiple_of(self.heads) {
            return input_err(
                "heads",
                format!(
                    "{} does not divide hidden {}; accepted a divisor of hidden",
                    self.heads, self.hidden
                ),
            );
        }
        check_range("kv_heads", self.kv_heads, 1, self.heads)?;
        if !self.heads.is_multiple_of(self.kv_heads) {
            return input_err(
                "kv_heads",
                format!(
                    "{} does not divide heads {}; accepted a divisor of heads",
                    self.kv_heads, self.heads
                ),
            );
        }
        // Position and token-type tables are bounded like the sequence itself, so the parameter
        // count (embedding rows x hidden) stays far inside u64.
        check_range("max_positions", self.max_positions, 0, MAX_POSITIONS)?;
        check_range("type_vocab", self.type_vocab, 0, MAX_TYPE_VOCAB)?;
        match &self.patch {
            None => check_range("vocab", self.vocab, 1, MAX_VOCAB)?,
            Some(p) => {
                check_range("patch", p.patch, 1, 1 << 12)?;
                check_range("image", p.image, p.patch, 1 << 16)?;
                check_range("channels", p.channels, 1, 1 << 12)?;
            }
        }
        if let Head::Classifier { classes } = self.head {
            check_range("classes", classes, 1, MAX_VOCAB)?;
        }
        if let Some(DropoutP(p)) = self.dropout {
            if !(p.is_finite() && (0.0..1.0).contains(&p)) {
                return input_err(
                    "dropout",
                    format!("{p} is not a probability; accepted 0 <= p < 1"),
                );
            }
        }
        if self.head == Head::Lm && self.patch.is_some() {
            return input_err(
                "head",
                "an LM head needs a vocabulary; accepted pooler or classifier for ViT",
            );
        }
        Ok(())
    }

    /// Checks that a training sequence fits the learned position table, and that a
    /// vision-language model's sequence holds its images' tokens.
    pub fn check_seq(&self, seq: u64) -> anyhow::Result<()> {
        if let Some(v) = &self.extras.vision {
            let need = v.images.saturating_mul(v.lm_tokens);
            if seq < need {
                return input_err(
                    "seq",
                    format!(
                        "{seq} cannot hold {} image(s) of {} tokens each; accepted {need} or more \
                         (--seq counts the image tokens)",
                        v.images, v.lm_tokens
                    ),
                );
            }
        }
        if self.patch.is_none() && self.max_positions > 0 && seq > self.max_positions {
            return input_err(
                "seq",
                format!(
                    "{seq} exceeds the model's {} learned positions; accepted 1..={}",
                    self.max_positions, self.max_positions
                ),
            );
        }
        Ok(())
    }
}
