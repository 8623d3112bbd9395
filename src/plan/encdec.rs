//! Encoder-decoder arithmetic: each stack as a plain transformer (the encoder at the input
//! length, the decoder at the target length with the LM head), and the decoder blocks'
//! cross-attention over the encoder's output. `plan::memory` adds the stacks' features and these
//! terms. Formulas and sources: docs/architecture.md, "Encoder-decoder".

use crate::spec::encdec::EncDec;
use crate::spec::transformer::{BlockExtras, TransformerSpec};
use crate::spec::{Attention, Checkpointing, ModelSpec, TrainSpec};

/// One stack of `t` as a plain transformer of `layers` blocks.
pub fn stack(t: &TransformerSpec, layers: u64) -> ModelSpec {
    ModelSpec::Transformer(TransformerSpec {
        layers,
        extras: BlockExtras {
            enc_dec: None,
            ..t.extras.clone()
        },
        ..t.clone()
    })
}

/// The decoder's training configuration: the target length in place of the input's.
pub fn decoder_train(e: &EncDec, train: &TrainSpec) -> TrainSpec {
    TrainSpec {
        seq: e.target(train.seq),
        ..train.clone()
    }
}

/// Cross-attention over the live decoder blocks (all of them, one under full checkpointing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossAttention {
    /// stored score elements `b·a·t·s` (eager, not under selective recomputation; else 0)
    pub scores: f64,
    /// one sample's score elements `a·t·s` for backward's workspace (eager; else 0)
    pub ws_scores: f64,
    /// sdpa's saved output and fp32 log-sum-exp, `b·t·(h·compute_bytes + 4a)` per block (bytes)
    pub fused_bytes: f64,
    /// per block the norm output, queries and context `b·t·(h + 2·q_width)` and the keys and
    /// values over the encoder's tokens `2·b·s·q_width`, in the compute dtype, plus the encoder
    /// output they read once, `b·s·h` (bytes)
    pub saved_bytes: f64,
}

impl CrossAttention {
    pub fn new(t: &TransformerSpec, e: &EncDec, train: &TrainSpec) -> Self {
        let (b, a, h) = (train.batch as f64, t.heads as f64, t.hidden as f64);
        let s = train.seq as f64;
        let tgt = e.target(train.seq) as f64;
        let qw = t.q_width() as f64;
        let cb = train.precision.compute_bytes() as f64;
        let live = if train.checkpointing.is_on() {
            1.0
        } else {
            e.decoder_layers as f64
        };
        let sdpa = train.attention == Attention::Sdpa;
        let stored = !(sdpa || train.checkpointing == Checkpointing::Selective);
        // sdpa's CPU math path keeps fp32 scores for 16-bit inputs
        let upcast = train
            .attention
            .score_upcast(train.precision.compute_bytes());
        CrossAttention {
            scores: if stored {
                live * b * a * tgt * s * upcast
            } else {
                0.0
            },
            ws_scores: if sdpa { 0.0 } else { a * tgt * s * upcast },
            fused_bytes: if sdpa {
                live * b * tgt * (h * cb + a * 4.0)
            } else {
                0.0
            },
            saved_bytes: live * b * (tgt * (h + 2.0 * qw) + 2.0 * s * qw) * cb + b * s * h * cb,
        }
    }
}
