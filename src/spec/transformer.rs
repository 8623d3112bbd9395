//! Transformer shape: everything the planner and the harness need to build or count one.

use crate::error::{check_range, input_err};
use serde::{Deserialize, Serialize};

/// Encoder (BERT, ViT: bidirectional) or decoder (GPT, Llama: causal mask, LM head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Encoder,
    Decoder,
}

/// Feed-forward kind: two-matrix GELU MLP, or three-matrix SwiGLU (gate, up, down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    Gelu,
    Swiglu,
}

/// LayerNorm (weight + bias) or RMSNorm (weight only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    Layernorm,
    Rmsnorm,
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
    /// The measured block implementation this spec's blocks are built like, if any.
    pub fn block_kind(&self) -> Option<BlockKind> {
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
        self.hidden / self.heads
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
        if !self.hidden.is_multiple_of(self.heads) {
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
        if self.head == Head::Lm && self.patch.is_some() {
            return input_err(
                "head",
                "an LM head needs a vocabulary; accepted pooler or classifier for ViT",
            );
        }
        Ok(())
    }

    /// Checks that a training sequence fits the learned position table.
    pub fn check_seq(&self, seq: u64) -> anyhow::Result<()> {
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
