//! What DeepSeek-V2/V3's multi-head latent attention blocks keep for backward, from PyTorch's
//! own measurement: the generic per-feature coefficients they took before planned DeepSeek-V2
//! shapes 11 % low in fp32 and 28-44 % low in 16-bit autocast.
//!
//! Measured with PyTorch 2.15 + transformers 5.24's `DeepseekV2ForCausalLM` on a CPU with every
//! block dense (scripts/torch_saved_bytes.py --arch deepseek-mla --attention eager,
//! calibration/data/torch-saved-bytes-mla-cpu.csv: 40 shapes per precision with the key/value
//! latent rank, the query bottleneck (none or a rank), the per-head no-rotary, rotary and value
//! widths moved apart from the usual dimensions), fitted per layer: every shape to the byte (at
//! batch 1 with one more term, a view that keeps `kv_b`'s no-rotary key part).
//! Per layer, beside Llama-like norms and SwiGLU MLP, the latent path keeps its `kv_a` output
//! and its RMSNorm's three tensors (`b·s·kv_lora_rank`), the shared rotary key (fp32 only), the
//! query bottleneck's norm likewise (`b·s·q_lora_rank` and a statistic), and q, k and v at
//! their per-head widths (`heads × (nope + rope)`, `heads × v_head`).
//!
//! The MLP column prices every block's dense or shared-expert SwiGLU at the mean width
//! (`moe::ffn_widths`); MoE blocks add the routed experts' known bytes
//! (`moe::extra_bytes_per_token`). Eager attention's softmax is fp32 on both devices
//! (transformers casts it), and the blocks have no dropout, so the CPU table is CUDA's. Under
//! sdpa CUDA's memory-efficient kernel (q/k and v widths differ, which its flash kernel does not
//! take) keeps eager's tensors without the scores, plus an fp32 log-sum-exp: derived, not
//! measured (the CPU mixes kernels for these widths).

use super::measured::{live_layers, precision_row, score_layers, Kernels, Saved};
use super::moe;
use crate::spec::transformer::TransformerSpec;
use crate::spec::{Attention, TrainSpec};

/// Column indices of [`CPU_EAGER`]'s rows, bytes per element of
/// - per layer: b·s·h, b·s·f (the mean MLP width), b·a·s², b·s, b·s·a·(nope + rope),
///   b·s·a·v_head, b·s·kv_lora_rank, b·s·rope, b·s·q_lora_rank, b·s per query bottleneck
/// - once: b·s·h, b·s·V, b·s, s·rope (the rotary tables), 1
const L_BSH: usize = 0;
const L_BSF: usize = 1;
const L_BAS2: usize = 2;
const L_BS: usize = 3;
const L_BSQK: usize = 4;
const L_BSV: usize = 5;
const L_BSKV: usize = 6;
const L_BSROPE: usize = 7;
const L_BSQR: usize = 8;
const L_BS_QNORM: usize = 9;
const O_BSH: usize = 10;
const O_BSVOCAB: usize = 11;
const O_BS: usize = 12;
const O_SROPE: usize = 13;
const O_1: usize = 14;
const COLUMNS: usize = 15;

/// The fit over the measured rows at b >= 2 per precision (fp32, bf16 autocast, pure bf16).
#[rustfmt::skip]
const CPU_EAGER: [[f64; COLUMNS]; 3] = [
    [24.0, 16.0, 4.0, 12.0, 8.0, 8.0, 12.0, 4.0, 12.0, 4.0, 12.0, 4.0, 20.0, 4.0, 4.0],
    [24.0, 8.0, 6.0, 12.0, 4.0, 4.0, 8.0, 0.0, 8.0, 4.0, 10.0, 4.0, 20.0, 4.0, 4.0],
    [16.0, 8.0, 6.0, 12.0, 4.0, 4.0, 8.0, 0.0, 8.0, 4.0, 8.0, 4.0, 20.0, 4.0, 4.0],
];

/// What a latent-attention model keeps under `train`, or None for a spec without it.
pub fn saved(t: &TransformerSpec, train: &TrainSpec, k: Kernels) -> Option<Saved> {
    let mla = t.extras.mla.as_deref()?;
    let c = CPU_EAGER[precision_row(train.precision)];
    let (b, s, h, a) = (
        train.batch as f64,
        train.seq as f64,
        t.hidden as f64,
        t.heads as f64,
    );
    let (f, _) = moe::ffn_widths(t);
    let layers = live_layers(t.layers, train);
    // CUDA's fused kernel keeps no scores; the CPU's measured path is eager's
    let fused = train.attention == Attention::Sdpa && k == Kernels::Cuda;
    let score_layers = score_layers(layers, train, fused);
    let qk = a * (mla.qk_nope + mla.qk_rope) as f64;
    let per_token = h * c[L_BSH]
        + f * c[L_BSF]
        + c[L_BS]
        + qk * c[L_BSQK]
        + a * mla.v_head as f64 * c[L_BSV]
        + mla.kv_lora_rank as f64 * c[L_BSKV]
        + mla.qk_rope as f64 * c[L_BSROPE]
        + mla.q_lora_rank as f64 * c[L_BSQR]
        + if mla.q_lora_rank > 0 {
            c[L_BS_QNORM]
        } else {
            0.0
        }
        + if fused { 4.0 * a } else { 0.0 }
        // at batch 1 the reshape of `kv_b`'s per-head output for attention is a view, which
        // keeps its no-rotary key part alive (at b >= 2 the matmul saves copies; measured on
        // every b = 1 row, to the byte)
        + if train.batch == 1 {
            a * mla.qk_nope as f64 * train.precision.compute_bytes() as f64
        } else {
            0.0
        };
    let routed =
        moe::live_moe_layers(t, layers) * b * s * moe::extra_bytes_per_token(t, train.precision);
    Some(Saved {
        once: b * s * (h * c[O_BSH] + c[O_BS]) + s * mla.qk_rope as f64 * c[O_SROPE] + c[O_1],
        head: b * s * t.vocab as f64 * c[O_BSVOCAB],
        blocks: layers * b * s * per_token + score_layers * b * a * s * s * c[L_BAS2] + routed,
    })
}
