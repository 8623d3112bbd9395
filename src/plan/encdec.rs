//! Encoder-decoder activations: the encoder stack at the input length, the decoder stack at the
//! target length (`--target-seq`) with the LM head, and each decoder block's cross-attention over
//! the encoder's output. Formulas and sources: docs/architecture.md, "Encoder-decoder".

use crate::plan::memory::{features, group_update, update_transient, Features};
use crate::plan::params;
use crate::spec::encdec::EncDec;
use crate::spec::transformer::{BlockExtras, TransformerSpec};
use crate::spec::{Attention, Checkpointing, ModelSpec, TrainSpec};

/// One stack of `t` as a plain transformer of `layers` blocks.
fn stack(t: &TransformerSpec, layers: u64) -> ModelSpec {
    ModelSpec::Transformer(TransformerSpec {
        layers,
        extras: BlockExtras {
            enc_dec: None,
            ..t.extras.clone()
        },
        ..t.clone()
    })
}

/// Activation features of an encoder-decoder model: the two stacks' features added (the head
/// only the decoder's), plus cross-attention. Per live decoder block, cross-attention saves its
/// norm output, queries and context (`b·t·(h + 2·q_width)`), keys and values over the encoder's
/// tokens (`2·b·s·q_width`), all in the compute dtype, and its scores `b·a·t·s` (eager, not
/// under selective recomputation) or, under sdpa, its output and fp32 log-sum-exp; the encoder's
/// output they read is kept once (`b·s·h`). Under full checkpointing one block of each stack is
/// counted live (the recompute holds one at a time: conservative by the smaller block).
pub fn encdec_features(
    model: &ModelSpec,
    t: &TransformerSpec,
    e: &EncDec,
    train: &TrainSpec,
) -> anyhow::Result<Features> {
    let s = train.seq;
    let tgt = e.target(s);
    let enc = features(&stack(t, t.layers), train)?;
    let dec = features(
        &stack(t, e.decoder_layers),
        &TrainSpec {
            seq: tgt,
            ..train.clone()
        },
    )?;
    let (b, a, h) = (train.batch as f64, t.heads as f64, t.hidden as f64);
    let (sf, tf) = (s as f64, tgt as f64);
    let qw = t.q_width() as f64;
    let cb = train.precision.compute_bytes() as f64;
    let live = if train.checkpointing.is_on() {
        1.0
    } else {
        e.decoder_layers as f64
    };
    let sdpa = train.attention == Attention::Sdpa;
    let stored_scores = !(sdpa || train.checkpointing == Checkpointing::Selective);
    let cross_scores = b * a * tf * sf;
    let ws_cross = if sdpa { 0.0 } else { a * tf * sf };
    let cross_bytes = live * b * (tf * (h + 2.0 * qw) + 2.0 * sf * qw) * cb + b * sf * h * cb;
    let ws_block = enc.ws_block.max(dec.ws_block).max(b * ws_cross);
    let p = params::transformer(t);
    Ok(Features {
        bsh: enc.bsh + dec.bsh,
        bsf: enc.bsf + dec.bsf,
        bas2: enc.bas2
            + dec.bas2
            + if stored_scores {
                live * cross_scores
            } else {
                0.0
            },
        bsv: dec.bsv,
        ckpt_bsh: enc.ckpt_bsh + dec.ckpt_bsh,
        workspace: ws_block.max(dec.ws_head),
        ws_head: dec.ws_head,
        ws_block,
        phased: dec.phased,
        gathered: if train.zero_stage >= 3 {
            (p.decoder_per_layer + params::largest_tensor(model)) as f64
        } else {
            0.0
        },
        ops: enc.ops + dec.ops,
        max_param: update_transient(model, train),
        fused_attention_bytes: enc.fused_attention_bytes
            + dec.fused_attention_bytes
            + if sdpa {
                live * b * tf * (h * cb + a * 4.0)
            } else {
                0.0
            },
        group_update_bytes: group_update(p.total, train),
        // the stacks' blocks are not the measured PyTorch blocks: generic coefficients
        block: None,
        act_fn: enc.act_fn,
        dropout: enc.dropout,
        bsf_raw: enc.bsf_raw + dec.bsf_raw,
        bas: enc.bas + dec.bas,
        bskv: enc.bskv + dec.bskv,
        bs: enc.bs + dec.bs,
        bsh_once: enc.bsh_once + dec.bsh_once,
        bs_once: enc.bs_once + dec.bs_once,
        tied_grad_elems: dec.tied_grad_elems,
        accumulating: enc.accumulating,
        adapter_bytes: 0.0,
        moe_bytes: 0.0,
        cross_attention_bytes: cross_bytes,
        ..Features::default()
    })
}
