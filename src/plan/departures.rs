//! Blocks planned with a measured block they depart from. LayerNorm decoders with a two-matrix
//! MLP (Phi, GPT-J, Falcon-7B, OPT) take GPT-2's block as it is, BERT encoders with other heads
//! (DistilBERT, ELECTRA) BERT's with their head's transform ([`base_block`]). Llama-like
//! blocks depart from Llama's in ways whose saved bytes are known: a head_dim
//! that is not h / heads (Qwen3, Gemma2/3, Gemma-7B), per-head or full-width q/k RMSNorm (Qwen3,
//! Gemma3, OLMo2), Gemma2/3's four norms per block, Gemma2's attention and final logit
//! soft-capping, a mixture-of-experts feed-forward. They are
//! planned as the measured Llama block plus these bytes, where the generic per-feature
//! coefficients had under-planned them (PyTorch's measured Llama block keeps 30 % more than the
//! per-feature literature in 16-bit autocast).
//!
//! Measured with PyTorch 2.15 + transformers 5.24 (Qwen3ForCausalLM, Gemma2ForCausalLM,
//! Gemma3ForCausalLM, Olmo2ForCausalLM and LlamaForCausalLM with head_dim varied;
//! scripts/torch_saved_bytes.py --arch qwen3 ..., calibration/data/
//! torch-saved-bytes-departures-cpu.csv). Each RMSNorm keeps its input (fp32: the input itself;
//! 16-bit: its fp32 copy, `hidden_states.to(torch.float32)`), its fp32 row statistic and the
//! normalised tensor its weight multiplies: fp32 in the Gemma and OLMo2 norms (weight applied
//! before the cast back), the compute dtype in Llama's and Qwen3's (applied after).

use crate::spec::transformer::{BlockKind, QkNorm, TransformerSpec};
use crate::spec::Precision;

/// The measured block a spec's blocks are built like apart from the departures this module
/// counts: Llama's, for a spec that is a Llama block once they are taken away; else GPT-2's for
/// a LayerNorm decoder with a two-matrix MLP ([`gpt2_like`]).
pub fn base_block(t: &TransformerSpec) -> Option<BlockKind> {
    llama_like(t)
        .or_else(|| gpt2_like(t))
        .or_else(|| bert_like(t))
}

/// A BERT encoder whose departures are its head and embeddings (DistilBERT's masked-LM head,
/// ELECTRA's discriminator head and narrower embeddings): planned with BERT's block, the head's
/// transform added ([`head_extra_bytes_per_token`]). Measured on a CPU
/// (calibration/data/torch-saved-bytes-families-cpu.csv), where the generic coefficients had
/// under-planned DistilBERT by 18-35 %.
fn bert_like(t: &TransformerSpec) -> Option<BlockKind> {
    let mut plain = t.clone();
    let x = &mut plain.extras;
    x.head_transform = crate::spec::transformer::HeadTransform::None;
    x.lm_head_bias = false;
    x.factorized_embedding = None;
    plain.block_kind().filter(|k| *k == BlockKind::Bert)
}

/// Bytes per element of b·s·h a head's transform keeps: the dense output (the activation's
/// input) and the activation's output, and with a norm its output too (measured: BERT's
/// masked-LM head against BertModel, 12 B fp32, 8 B under autocast, where the norm's output is
/// fp32, 6 B in pure 16-bit).
fn head_transform_bytes(t: &TransformerSpec, p: Precision) -> f64 {
    use crate::spec::transformer::HeadTransform;
    let cb = p.compute_bytes() as f64;
    let norm_out = if p.is_mixed() { 4.0 } else { cb };
    match t.extras.head_transform {
        HeadTransform::None => 0.0,
        HeadTransform::Dense => 2.0 * cb,
        HeadTransform::DenseNorm => 2.0 * cb + norm_out,
    }
}

/// A LayerNorm decoder with a two-matrix MLP whose departures from GPT-2's block are where the
/// norms sit and which biases it has (Phi, GPT-J, Falcon-7B: attention and MLP in parallel off
/// one shared norm; OPT: two unused position rows): planned with PyTorch's measured GPT-2 block,
/// whose bytes bound theirs more closely than the generic coefficients. Measured on a CPU with
/// transformers' own classes (calibration/data/torch-saved-bytes-families-cpu.csv), the GPT-2
/// block planned them within -5 % to +23 % in bf16 autocast (the generic coefficients: -30 % to
/// +12 %) and +3 % to +36 % in fp32 (generic: -15 % to +37 %): the over-plan is Falcon's
/// single key/value head and OPT's attention-dropout-free blocks, which GPT-2's bytes do not
/// have; none of it is counted as a departure, so these plans err high.
fn gpt2_like(t: &TransformerSpec) -> Option<BlockKind> {
    let mut plain = t.clone();
    let x = &mut plain.extras;
    x.parallel_attn = false;
    if x.block_norms == Some(1) {
        x.block_norms = None;
    }
    x.attn_bias = None;
    x.lm_head_bias = false;
    x.position_offset = 0;
    plain.block_kind().filter(|k| *k == BlockKind::Gpt2)
}

fn llama_like(t: &TransformerSpec) -> Option<BlockKind> {
    let mut plain = t.clone();
    let x = &mut plain.extras;
    x.head_dim = None;
    x.qk_norm = QkNorm::None;
    x.moe = None;
    x.attn_softcap = false;
    x.final_softcap = false;
    if x.block_norms == Some(4) {
        x.block_norms = None;
    }
    plain.block_kind().filter(|k| *k == BlockKind::Llama)
}

/// Whether the spec's norms multiply their weight in fp32 before casting back (Gemma's
/// `output * (1 + weight.float())`, OLMo2's `(weight * hidden_states).to(input_dtype)`), so
/// they keep an fp32 normalised tensor under 16-bit compute; Llama's and Qwen3's cast first.
fn norms_weight_in_fp32(t: &TransformerSpec) -> bool {
    t.extras.qk_norm == QkNorm::Full || t.extras.block_norms == Some(4)
}

/// Bytes per normalised element one RMSNorm keeps: its input (or fp32 copy of it) and the
/// normalised tensor (fp32, or the compute dtype when the weight is applied after the cast).
fn norm_elem_bytes(t: &TransformerSpec, p: Precision) -> f64 {
    if p.compute_bytes() == 4 || norms_weight_in_fp32(t) {
        8.0
    } else {
        4.0 + p.compute_bytes() as f64
    }
}

/// Bytes per token one live block keeps beyond the Llama block it is planned with, not counting
/// the head_dim departure (the block's `bsq` per query-width element): the q/k norms'
/// tensors and statistics, and Gemma's two extra hidden-width norms.
pub fn extra_bytes_per_token(t: &TransformerSpec, p: Precision) -> f64 {
    if llama_like(t).is_none() {
        return 0.0;
    }
    let per_norm = norm_elem_bytes(t, p);
    let (q, kv) = (t.q_width() as f64, (t.kv_heads * t.head_dim()) as f64);
    let qk = match t.extras.qk_norm {
        QkNorm::None => 0.0,
        // one fp32 statistic per head and token, for q's heads and k's
        QkNorm::PerHead => (q + kv) * per_norm + 4.0 * (t.heads + t.kv_heads) as f64,
        // one per token for q and one for k
        QkNorm::Full => (q + kv) * per_norm + 8.0,
    };
    let extra_norms = match t.extras.block_norms {
        Some(4) => 2.0 * (t.hidden as f64 * per_norm + 4.0),
        _ => 0.0,
    };
    qk + extra_norms + 2.0 * t.hidden as f64 * fp32_norm_excess(t, p)
}

/// Bytes per element a norm that applies its weight in fp32 keeps beyond the Llama-style norm
/// the measured block counts: in pure 16-bit the Llama norm's normalised tensor is 16-bit, this
/// one's fp32 (+2); under fp32 or autocast (an fp32 residual stream) both keep fp32.
fn fp32_norm_excess(t: &TransformerSpec, p: Precision) -> f64 {
    if llama_like(t).is_some() && norms_weight_in_fp32(t) && p.is_pure_half() {
        4.0 - p.compute_bytes() as f64
    } else {
        0.0
    }
}

/// Bytes per token the head segment keeps beyond the planned block's once-per-model and head
/// bytes: the final norm's excess ([`fp32_norm_excess`]), the final soft-capping's tanh output
/// in the logits' dtype, per logit ([`TransformerSpec::vocab`] of them), and a BERT-like
/// encoder's head transform.
pub fn head_extra_bytes_per_token(t: &TransformerSpec, p: Precision) -> f64 {
    let softcap = if llama_like(t).is_some() && t.extras.final_softcap {
        p.compute_bytes() as f64 * t.vocab as f64
    } else {
        0.0
    };
    let transform = if bert_like(t).is_some() && t.block_kind().is_none() {
        t.hidden as f64 * head_transform_bytes(t, p)
    } else {
        0.0
    };
    t.hidden as f64 * fp32_norm_excess(t, p) + softcap + transform
}

/// Query-width elements per token beyond the hidden width (negative when narrower: Gemma2-2B's
/// 8 heads x 256 against h 2304), which the Llama block's `bsq` prices.
pub fn q_extra_per_token(t: &TransformerSpec) -> f64 {
    if llama_like(t).is_none() {
        return 0.0;
    }
    t.q_width() as f64 - t.hidden as f64
}

/// Bytes per stored score element soft-capping keeps under eager attention: the tanh output in
/// the scores' dtype (fused kernels cap in the tile and keep nothing).
pub fn softcap_score_bytes(t: &TransformerSpec, p: Precision) -> f64 {
    if llama_like(t).is_some() && t.extras.attn_softcap {
        p.compute_bytes() as f64
    } else {
        0.0
    }
}
