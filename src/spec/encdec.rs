//! Encoder-decoder transformers (T5, mT5, BART) as data on a transformer spec: the spec's blocks
//! are the encoder stack, and this adds a decoder stack of blocks with cross-attention over the
//! encoder's output, plus the decoder's length per sample (`--target-seq`), kept here for the
//! same reason as the MoE layout (`spec::moe`): planner functions take the model and the
//! training spec, and the training spec is the harness's CSV schema.

use crate::error::check_range;
use serde::{Deserialize, Serialize};

/// The decoder stack of an encoder-decoder model. Its blocks are the encoder's (same widths,
/// heads, norm and MLP) plus a cross-attention sublayer (q, k, v, o as in self-attention) and its
/// norm; each stack has its own position table and embedding norm (BART) or relative-position
/// bias (T5) and its own final norm; the token embedding is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EncDec {
    /// decoder blocks
    pub decoder_layers: u64,
    /// T5's relative-position bias: a `buckets x heads` table in the first self-attention of each
    /// stack; 0 for none (BART)
    #[serde(default)]
    pub rel_buckets: u64,
    /// decoder tokens per sample (`--target-seq`); 0 = the encoder's sequence length
    #[serde(default)]
    pub target_seq: u64,
}

impl EncDec {
    /// Decoder tokens per sample for an encoder sequence of `seq`.
    pub fn target(&self, seq: u64) -> u64 {
        if self.target_seq == 0 {
            seq
        } else {
            self.target_seq
        }
    }

    /// Range checks; `max_layers` is the spec's bound on blocks per stack.
    pub fn validate(&self, max_layers: u64) -> anyhow::Result<()> {
        check_range("decoder_layers", self.decoder_layers, 1, max_layers)?;
        check_range("rel_buckets", self.rel_buckets, 0, 1 << 16)?;
        check_range("target_seq", self.target_seq, 0, super::train::MAX_SEQ)?;
        Ok(())
    }
}
