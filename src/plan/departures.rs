//! Blocks planned with a measured block they depart from ([`Planned`]):
//! - Llama-like blocks, as the measured Llama block plus the bytes their departures keep: a
//!   head_dim that is not h / heads (Qwen3, Gemma2/3, Gemma-7B), per-head or full-width q/k
//!   RMSNorm (Qwen3, Gemma3, OLMo2), Gemma2/3's four norms per block, norms that apply their
//!   weight in fp32 (Gemma, OLMo2), Gemma2's attention and final logit soft-capping, a
//!   mixture-of-experts feed-forward;
//! - LayerNorm decoders with a two-matrix MLP whose departures only move norms and biases (Phi,
//!   GPT-J, Falcon-7B, OPT), as GPT-2's block;
//! - BERT encoders with other heads or embeddings (DistilBERT, ELECTRA), as BERT's block plus
//!   the head's transform.
//!
//! The generic per-feature coefficients these took before under-planned them: PyTorch's
//! measured Llama block keeps 30 % more than they do in 16-bit autocast.
//!
//! Measured with PyTorch 2.15 + transformers 5.24's own classes on a CPU
//! (scripts/torch_saved_bytes.py --arch qwen3|gemma2|gemma3|olmo2|llama-hd|gpt_neox|phi|gptj|
//! falcon|opt|distilbert|electra; calibration/data/torch-saved-bytes-departures-cpu.csv and
//! torch-saved-bytes-families-cpu.csv). Each RMSNorm keeps its input (fp32: the input itself;
//! 16-bit: its fp32 copy, `hidden_states.to(torch.float32)`), its fp32 row statistic and the
//! normalised tensor its weight multiplies: fp32 in the Gemma and OLMo2 norms (weight applied
//! before the cast back), the compute dtype in Llama's and Qwen3's (applied after).

use crate::spec::transformer::{BlockKind, Head, HeadTransform, NormKind, QkNorm, TransformerSpec};
use crate::spec::{Attention, Precision, TrainSpec};

/// How a transformer spec's blocks are planned, worked out once per spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// the measured block the plan uses (None: the generic per-feature coefficients)
    pub block: Option<BlockKind>,
    /// Llama's block, with departures whose bytes this module adds
    llama_like: bool,
    /// BERT's block for a spec that is not exactly BERT's (its head transform added)
    bert_like: bool,
    /// GPT-2's block for a spec that is not exactly GPT-2's
    gpt2_like: bool,
}

impl Planned {
    pub fn of(t: &TransformerSpec) -> Self {
        let exact = t.block_kind();
        let llama_like = exact.is_none() && is_llama_like(t);
        let gpt2_like = exact.is_none() && !llama_like && is_gpt2_like(t);
        let bert_like = exact.is_none() && !llama_like && !gpt2_like && is_bert_like(t);
        let block = exact.or(if llama_like {
            Some(BlockKind::Llama)
        } else if gpt2_like {
            Some(BlockKind::Gpt2)
        } else if bert_like {
            Some(BlockKind::Bert)
        } else {
            None
        });
        Self {
            block,
            llama_like,
            bert_like,
            gpt2_like,
        }
    }

    /// Bytes per token one live block keeps beyond the Llama block it is planned with, not
    /// counting the head_dim departure (the block's `bsq` per query-width element): the q/k
    /// norms' tensors and statistics, Gemma's two extra hidden-width norms, and in pure 16-bit
    /// the fp32 excess of norms that apply their weight in fp32.
    pub fn extra_bytes_per_token(&self, t: &TransformerSpec, p: Precision) -> f64 {
        if !self.llama_like {
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
        // Cohere's centered q/k norms keep an fp32 difference more per element than the
        // composed RMSNorm `qk` prices; its one block norm against the Llama block's two
        // already covers the block norm's own
        let centered = if t.extras.centered_norm && t.extras.qk_norm != QkNorm::None {
            4.0 * (q + kv)
        } else {
            0.0
        };
        qk + extra_norms
            + centered
            + 2.0 * t.hidden as f64 * (self.fp32_norm_excess(t, p) - fused_norm_saving(t, p))
    }

    /// Bytes per token one live block keeps beyond its planned block when q, k and v are views
    /// of one fused projection and attention is sdpa: the kernel saves the value view, which
    /// keeps the whole fused output alive, q's and k's widths beyond what the block counts. The
    /// Llama block has separate projections (Phi-3's fused one keeps q + kv more); GPT-2's fused
    /// c_attn is in its block, but rotary positions (GPT-NeoX; Falcon's multi-head layout) make
    /// q and k new tensors beside the fused output. Measured on a CPU without it: Phi-3 sdpa planned 10-14 % low in
    /// fp32 (calibration/data/torch-saved-bytes-coverage-cpu.csv), GPT-NeoX 13 % low (8.1 B
    /// per b·s·h per layer; torch-saved-bytes-families-cpu.csv). Eager attention's matmul saves
    /// contiguous copies instead.
    pub fn fused_qkv_bytes_per_token(&self, t: &TransformerSpec, train: &TrainSpec) -> f64 {
        // Falcon's multi-query and grouped layouts (7B; 40B/180B) pick k and v out of the
        // fused output by index lists, copies; only full multi-head splits (GPT-NeoX) are views
        let rotary_gpt2 = self.gpt2_like && t.max_positions == 0 && t.kv_heads == t.heads;
        if (self.llama_like || rotary_gpt2)
            && t.extras.fused_qkv
            && train.attention == Attention::Sdpa
        {
            let kv = (t.kv_heads * t.head_dim()) as f64;
            (t.q_width() as f64 + kv) * train.precision.compute_bytes() as f64
        } else {
            0.0
        }
    }

    /// Bytes per token one live block keeps beyond GPT-2's block under autocast when q, k and v
    /// are separate projections (StarCoder2, Phi, GPT-J, OPT): each linear casts the fp32 norm
    /// output to 16 bits on its own and saves its cast, two more h-wide casts than GPT-2's fused
    /// c_attn (measured on a CPU: StarCoder2's autocast steps were planned 5-9 % low without
    /// them, calibration/data/torch-saved-bytes-coverage-cpu.csv).
    pub fn separate_qkv_bytes_per_token(&self, t: &TransformerSpec, p: Precision) -> f64 {
        if self.gpt2_like && t.extras.separate_qkv && p.is_mixed() {
            2.0 * t.hidden as f64 * p.compute_bytes() as f64
        } else {
            0.0
        }
    }

    /// Query-width elements per token beyond the hidden width (negative when narrower:
    /// Gemma2-2B's 8 heads x 256 against h 2304), which the Llama block's `bsq` prices.
    pub fn q_extra_per_token(&self, t: &TransformerSpec) -> f64 {
        if self.block == Some(BlockKind::Llama) {
            t.q_width() as f64 - t.hidden as f64
        } else {
            0.0
        }
    }

    /// Bytes per stored score element soft-capping keeps under eager attention: the tanh
    /// output in the scores' dtype (fused kernels cap in the tile and keep nothing).
    pub fn softcap_score_bytes(&self, t: &TransformerSpec, p: Precision) -> f64 {
        if self.llama_like && t.extras.attn_softcap {
            p.compute_bytes() as f64
        } else {
            0.0
        }
    }

    /// Bytes per stored score element a GPT-2-like block keeps beyond GPT-2's when its eager
    /// softmax runs in fp32 under pure 16-bit compute: the fp32 probabilities the softmax saves,
    /// beside the 16-bit copy GPT-2's block counts. Measured on a CPU (PyTorch 2.15, b4 a16
    /// s1024 d64, the attention chain alone, scripts/torch_step_peak/attention_score_probe.py ->
    /// calibration/data/torch-probe-attention-scores-cpu.txt): 5.25 B per score saved in bf16
    /// with the upcast, 1.63 B without; a drawn GPT-NeoX step in true bf16 planned 16.9 % low
    /// without this (calibration/data/torch-step-peaks-drawn-wide-cpu.csv). Autocast keeps fp32
    /// probabilities in GPT-2's block (CUDA's autocast runs softmax in fp32).
    pub fn softmax_upcast_score_bytes(&self, t: &TransformerSpec, p: Precision) -> f64 {
        if self.gpt2_like && t.extras.fp32_softmax && p.is_pure_half() {
            4.0
        } else {
            0.0
        }
    }

    /// Bytes per token the head segment keeps beyond the planned block's once-per-model and
    /// head bytes: the final norm's fp32 excess, an LM head's final soft-capping (the tanh
    /// output in the logits' dtype, per logit) and a BERT-like encoder's head transform.
    pub fn head_extra_bytes_per_token(&self, t: &TransformerSpec, p: Precision) -> f64 {
        let softcap = if self.llama_like && t.extras.final_softcap && t.head == Head::Lm {
            p.compute_bytes() as f64 * t.vocab as f64
        } else {
            0.0
        };
        let transform = if self.bert_like {
            t.hidden as f64 * head_transform_bytes(t, p)
        } else {
            0.0
        };
        let final_norm = if self.llama_like {
            self.fp32_norm_excess(t, p) - fused_norm_saving(t, p)
        } else {
            0.0
        };
        t.hidden as f64 * final_norm + softcap + transform
    }

    /// Bytes per element a norm that applies its weight in fp32 keeps beyond the Llama-style
    /// norm the measured block counts: in pure 16-bit the Llama norm's normalised tensor is
    /// 16-bit, this one's fp32 (+2); under fp32 or autocast (an fp32 residual stream) both keep
    /// fp32.
    fn fp32_norm_excess(&self, t: &TransformerSpec, p: Precision) -> f64 {
        if self.llama_like && t.extras.norm_weight_fp32 && p.is_pure_half() {
            4.0 - p.compute_bytes() as f64
        } else {
            0.0
        }
    }
}

/// Bytes per element a LayerNorm of a Llama-like block keeps less than the Llama block's
/// composed RMSNorm: PyTorch's fused kernel keeps its input and row statistics and recomputes
/// the normalised tensor in backward, so that tensor (fp32 under fp32 and autocast, 16-bit in
/// pure 16-bit) is not kept. Measured (calibration/data/torch-saved-bytes-coverage-cpu.csv):
/// OLMo v1's parameter-free LayerNorms planned within -2 % to 0 with it, +10 % to +21 % over
/// without (the generic coefficients it took before were 17-23 % low under autocast);
/// StableLM's, with weight and bias, -6.3 % to -0.2 % with it, +5 % to +17 % over without.
fn fused_norm_saving(t: &TransformerSpec, p: Precision) -> f64 {
    if t.norm == NormKind::Layernorm {
        if p.is_pure_half() {
            2.0
        } else {
            4.0
        }
    } else {
        0.0
    }
}

/// OLMo v1's blocks: LayerNorms without parameters (`block_norms` 0 with LayerNorm).
fn has_param_free_norms(t: &TransformerSpec) -> bool {
    t.extras.block_norms == Some(0) && t.norm == NormKind::Layernorm
}

/// The measured block a spec is planned with: the one it is exactly, else the one it departs
/// from ([`Planned`]).
pub fn planned_block(t: &TransformerSpec) -> Option<BlockKind> {
    Planned::of(t).block
}

/// Whether the spec is a Llama block once the departures this module counts are taken away.
fn is_llama_like(t: &TransformerSpec) -> bool {
    let mut plain = t.clone();
    let x = &mut plain.extras;
    x.head_dim = None;
    x.qk_norm = QkNorm::None;
    x.moe = None;
    x.attn_softcap = false;
    x.final_softcap = false;
    x.norm_weight_fp32 = false;
    x.centered_norm = false;
    x.fused_qkv = false;
    x.fused_gate_up = false;
    // biases and sink logits keep nothing for backward beyond what the Llama block counts
    // (a linear's bias needs no saved tensor; a sink is one score column)
    x.attn_bias = None;
    x.attn_sinks = false;
    x.eager_only = false;
    // an LM-head bias (Phi-3.5-MoE) is added to the logits the head keeps anyway: nothing saved
    x.lm_head_bias = false;
    // Gemma 2's and GLM-4-0414's sandwich norms (their bytes are a departure of their own);
    // Cohere's and a parallel StableLM's one norm before attention and MLP alike, planned with
    // the Llama block's two (the MLP reads the tensor q, k and v keep anyway: a few b·s·h over)
    if matches!(x.block_norms, Some(1) | Some(4)) {
        x.block_norms = None;
    }
    // OLMo v1's parameter-free LayerNorms: counted as no norms at all, planned as the Llama
    // block's
    if has_param_free_norms(t) {
        x.block_norms = None;
        plain.final_norm = true;
    }
    // LayerNorms (OLMo v1's, StableLM's): the Llama block's norms less the normalised tensor
    // their fused kernel does not keep (`fused_norm_saving`)
    if plain.norm == NormKind::Layernorm
        && plain.ffn_kind == crate::spec::transformer::FfnKind::Swiglu
    {
        plain.norm = NormKind::Rmsnorm;
    }
    plain.block_kind() == Some(BlockKind::Llama)
}

/// A LayerNorm decoder with a two-matrix MLP whose departures from GPT-2's block are where the
/// norms sit and which biases it has (Phi, GPT-J, Falcon-7B: attention and MLP in parallel off
/// one shared norm; OPT: two unused position rows): planned with PyTorch's measured GPT-2
/// block, whose bytes bound theirs more closely than the generic coefficients. Measured on a
/// CPU (calibration/data/torch-saved-bytes-families-cpu.csv), the GPT-2 block planned them
/// within 0 to +24 % in bf16 autocast (the generic coefficients: -30 % to +12 %) and -1 % to
/// +37 % in fp32 (generic: -15 % to +37 %), with a fused q/k/v's sdpa bytes
/// ([`Planned::fused_qkv_bytes_per_token`]) and separate projections' autocast casts
/// ([`Planned::separate_qkv_bytes_per_token`]): the over-plan is Falcon's single key/value head
/// and OPT's attention-dropout-free blocks, which GPT-2's bytes do not have.
fn is_gpt2_like(t: &TransformerSpec) -> bool {
    let mut plain = t.clone();
    let x = &mut plain.extras;
    x.parallel_attn = false;
    x.eager_only = false;
    x.fused_qkv = false;
    x.separate_qkv = false;
    x.fp32_softmax = false;
    if x.block_norms == Some(1) {
        x.block_norms = None;
    }
    x.attn_bias = None;
    x.lm_head_bias = false;
    x.position_offset = 0;
    plain.block_kind() == Some(BlockKind::Gpt2)
}

/// A BERT encoder whose departures are its head and embeddings (DistilBERT's masked-LM head,
/// ELECTRA's discriminator head and narrower embeddings): planned with BERT's block, the head's
/// transform added. Measured on a CPU (calibration/data/torch-saved-bytes-families-cpu.csv):
/// 0 to +5 % in fp32, 0 to +20 % in autocast, where the generic coefficients had under-planned
/// DistilBERT by 18-35 %.
fn is_bert_like(t: &TransformerSpec) -> bool {
    let mut plain = t.clone();
    let x = &mut plain.extras;
    x.head_transform = HeadTransform::None;
    x.lm_head_bias = false;
    x.eager_only = false;
    x.factorized_embedding = None;
    plain.block_kind() == Some(BlockKind::Bert)
}

/// Bytes per element of b·s·h a head's transform keeps: the dense output (the activation's
/// input) and the activation's output, and with a norm its output too (measured: BERT's
/// masked-LM head against BertModel, 12 B fp32, 8 B under autocast, where the norm's output is
/// fp32, 6 B in pure 16-bit).
fn head_transform_bytes(t: &TransformerSpec, p: Precision) -> f64 {
    let cb = p.compute_bytes() as f64;
    let norm_out = if p.is_mixed() { 4.0 } else { cb };
    match t.extras.head_transform {
        HeadTransform::None => 0.0,
        HeadTransform::Dense => 2.0 * cb,
        HeadTransform::DenseNorm => 2.0 * cb + norm_out,
    }
}

/// Bytes per normalised element one RMSNorm keeps: its input (or fp32 copy of it) and the
/// normalised tensor (fp32, or the compute dtype when the weight is applied after the cast).
fn norm_elem_bytes(t: &TransformerSpec, p: Precision) -> f64 {
    if p.compute_bytes() == 4 || t.extras.norm_weight_fp32 {
        8.0
    } else {
        4.0 + p.compute_bytes() as f64
    }
}
