//! What T5 (ReLU or gated-GELU MLP, mT5, FLAN-T5) and BART keep for backward, per stack, from
//! PyTorch's own measurement rather than the generic per-feature coefficients, which planned
//! them 30-52 % (T5) and up to 32 % (BART) low.
//!
//! Measured with PyTorch 2.15 + transformers 5.24's `T5ForConditionalGeneration` and
//! `BartForConditionalGeneration` on a CPU (scripts/torch_saved_bytes.py --arch t5|t5-gated|bart
//! --dropout 0 --dropout 0.1, calibration/data/torch-saved-bytes-encdec-cpu.csv, 40 shapes per
//! group with encoder and decoder depth, input and target length, widths, heads and T5's d_kv
//! moved apart), fitted per stack by `--fit-encdec`: exact for T5 (every shape to the byte),
//! within 0.05 % for BART. Held out of the fit, real checkpoints' widths (t5-small, FLAN-T5-small
//! with its query narrower than h, bart-base; b 2, s 128, t 64, `--real-shapes`) are reproduced
//! as closely in all three precisions. What the columns hold, read from the models' code and `--dump`:
//! - T5's RMSNorm keeps its input (fp32: the input; 16-bit: its fp32 copy), the normalised tensor
//!   and the weighted output (three per norm, 4 B each in fp32), plus a 4-byte statistic per
//!   token; BART's LayerNorm keeps its input and two statistics.
//! - Under autocast every linear that reads an fp32 tensor saves its own 16-bit cast: q, k and v
//!   three casts of one norm output, the decoder's cross k and v two casts of the encoder output;
//!   T5 casts the MLP's hidden back to fp32 for `wo` (kept in fp32) and autocast casts it again.
//! - T5 adds its fp32 relative-position bias to the scores, which promotes autocast's softmax
//!   to fp32 (6 B per score: fp32 probabilities and their 16-bit cast for the AV matmul).
//! - Dropout sites: each residual branch, T5's MLP hidden (BART's `activation_dropout`), the
//!   attention probabilities, and per stack the embedding (T5: also after the final norm).
//!
//! A CPU keeps its dropout masks in the input's dtype and runs autocast's softmax in 16 bits
//! where nothing promotes it; CUDA keeps 1-byte masks (`native_dropout`) and autocast runs softmax
//! in fp32. The planner plans CUDA ([`Kernels::Cuda`]): each column less its sites' mask bytes
//! beyond one, and the score columns as CUDA keeps them. With sdpa, BART's blocks are eager's
//! without the scores plus the kernel's fp32 log-sum-exp (measured on the CPU's flash kernel at
//! dropout 0: within 0.1 %); CUDA's flash kernels drop inside the kernel. T5 hands sdpa its
//! learned bias as a float mask, which keeps the mask besides the log-sum-exp: one encoder
//! mask and one cross-attention mask per stack, one causal decoder mask per layer (CPU: measured
//! only through its math path, equal to eager within 0.3 % at dropout 0.1; CUDA's memory-efficient
//! kernel, which takes such a mask, is derived, not measured).

use crate::spec::encdec::EncDec;
use crate::spec::transformer::{Activation, FfnKind, NormKind, TransformerSpec};
use crate::spec::{Attention, Precision, TrainSpec};

use super::measured::{
    cuda_mask_saving, cuda_score_bytes, linear_out_bytes, live_layers, norm_out_bytes,
    precision_row, score_layers,
};
pub use super::measured::{Kernels, Saved};

/// The measured encoder-decoder implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// T5 with its ReLU MLP (`feed_forward_proj` "relu": t5-small … t5-11b)
    T5,
    /// T5 v1.1, FLAN-T5 and mT5: the gated-GELU MLP (`gelu_new` of `wi_0` times `wi_1`)
    T5Gated,
    /// BART: post-LayerNorm blocks with biases and a GELU MLP
    Bart,
}

/// Which measured family a spec's stacks are, if any.
pub fn family(t: &TransformerSpec, e: &EncDec) -> Option<Family> {
    match (t.norm, e.rel_buckets > 0, t.ffn_kind) {
        (NormKind::Rmsnorm, true, FfnKind::Swiglu) => Some(Family::T5Gated),
        (NormKind::Rmsnorm, true, FfnKind::Gelu) => Some(Family::T5),
        (NormKind::Layernorm, false, FfnKind::Gelu) if t.extras.position_offset == 2 => {
            Some(Family::Bart)
        }
        _ => None,
    }
}

/// Column indices of [`CPU_EAGER`]'s rows: bytes per element of
/// - per encoder layer: b·s·h, b·s·q (q = heads × d_kv; BART's are in h's), b·s·f, b·a·s², b·s
/// - per decoder layer: b·t·h, b·t·q, b·t·f, b·a·t², b·a·t·s (cross scores), b·t, b·s·q (cross
///   keys and values), b·s·h (autocast's casts of the encoder output)
/// - once: b·s·h, b·t·h, b·t·V, b·t, b·s, s², t², 1
const ENC_BSH: usize = 0;
const ENC_BSQ: usize = 1;
const ENC_BSF: usize = 2;
const ENC_BAS2: usize = 3;
const ENC_BS: usize = 4;
const DEC_BTH: usize = 5;
const DEC_BTQ: usize = 6;
const DEC_BTF: usize = 7;
const DEC_BAT2: usize = 8;
const DEC_BATS: usize = 9;
const DEC_BT: usize = 10;
const DEC_BSQ: usize = 11;
const DEC_BSH: usize = 12;
const ONCE_BSH: usize = 13;
const ONCE_BTH: usize = 14;
const ONCE_BTV: usize = 15;
const ONCE_BT: usize = 16;
const ONCE_BS: usize = 17;
const ONCE_S2: usize = 18;
const ONCE_T2: usize = 19;
const ONCE_1: usize = 20;
const COLUMNS: usize = 21;

/// `scripts/torch_saved_bytes.py --fit-encdec` over the measured rows (eager attention, b >= 2),
/// per family, precision (fp32, bf16 autocast, pure bf16) and dropout (0, 0.1): the largest
/// residual is 0 bytes for T5 and 4.4e-4 of the total for BART.
#[rustfmt::skip]
const CPU_EAGER: [[[[f64; COLUMNS]; 2]; 3]; 3] = [
    // T5
    [
        [
            [24.0, 16.0, 4.0, 4.0, 8.0, 36.0, 24.0, 4.0, 4.0, 4.0, 12.0, 8.0, 0.0, 12.0, 12.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
            [32.0, 16.0, 12.0, 12.0, 8.0, 48.0, 24.0, 12.0, 12.0, 12.0, 12.0, 8.0, 0.0, 20.0, 20.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
        ],
        [
            [24.0, 8.0, 4.0, 6.0, 8.0, 34.0, 12.0, 4.0, 6.0, 2.0, 12.0, 4.0, 4.0, 8.0, 10.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
            [28.0, 8.0, 6.0, 10.0, 8.0, 40.0, 12.0, 6.0, 10.0, 6.0, 12.0, 4.0, 4.0, 16.0, 18.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
        ],
        [
            [20.0, 8.0, 2.0, 2.0, 8.0, 30.0, 12.0, 2.0, 2.0, 2.0, 12.0, 4.0, 0.0, 10.0, 10.0, 2.0, 20.0, 12.0, 8.0, 8.0, 2.0],
            [24.0, 8.0, 6.0, 6.0, 8.0, 36.0, 12.0, 6.0, 6.0, 6.0, 12.0, 4.0, 0.0, 14.0, 14.0, 2.0, 20.0, 12.0, 8.0, 8.0, 2.0],
        ],
    ],
    // T5 gated-GELU
    [
        [
            [24.0, 16.0, 28.0, 4.0, 8.0, 36.0, 24.0, 28.0, 4.0, 4.0, 12.0, 8.0, 0.0, 12.0, 12.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
            [32.0, 16.0, 32.0, 12.0, 8.0, 48.0, 24.0, 32.0, 12.0, 12.0, 12.0, 8.0, 0.0, 20.0, 20.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
        ],
        [
            [26.0, 8.0, 14.0, 6.0, 8.0, 36.0, 12.0, 14.0, 6.0, 2.0, 12.0, 4.0, 4.0, 8.0, 10.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
            [30.0, 8.0, 16.0, 10.0, 8.0, 42.0, 12.0, 16.0, 10.0, 6.0, 12.0, 4.0, 4.0, 16.0, 18.0, 4.0, 20.0, 12.0, 8.0, 8.0, 4.0],
        ],
        [
            [20.0, 8.0, 14.0, 2.0, 8.0, 30.0, 12.0, 14.0, 2.0, 2.0, 12.0, 4.0, 0.0, 10.0, 10.0, 2.0, 20.0, 12.0, 8.0, 8.0, 2.0],
            [24.0, 8.0, 16.0, 6.0, 8.0, 36.0, 12.0, 16.0, 6.0, 6.0, 12.0, 4.0, 0.0, 14.0, 14.0, 2.0, 20.0, 12.0, 8.0, 8.0, 2.0],
        ],
    ],
    // BART
    [
        [
            [32.0, 0.0, 8.0, 4.0, 16.25, 48.0, 0.0, 8.0, 4.0, 4.0, 23.75, 0.0, 8.0, 8.0, 8.0, 4.0, 24.75, 21.5, 0.0, 0.0, 232.5],
            [40.0, 0.0, 12.0, 12.0, 16.25, 60.0, 0.0, 12.0, 12.0, 12.0, 23.75, 0.0, 8.0, 12.0, 12.0, 4.0, 24.75, 21.5, 0.0, 0.0, 232.5],
        ],
        [
            [24.0, 0.0, 4.0, 2.0, 16.25, 34.0, 0.0, 4.0, 6.0, 2.0, 23.75, 0.0, 8.0, 4.0, 6.0, 4.0, 24.75, 21.5, 0.0, 0.0, 232.5],
            [28.0, 0.0, 6.0, 6.0, 16.25, 40.0, 0.0, 6.0, 10.0, 6.0, 23.75, 0.0, 8.0, 8.0, 10.0, 4.0, 24.75, 21.5, 0.0, 0.0, 232.5],
        ],
        [
            [16.0, 0.0, 4.0, 2.0, 8.25, 24.0, 0.0, 4.0, 2.0, 2.0, 11.75, 0.0, 4.0, 4.0, 4.0, 2.0, 20.75, 17.5, 0.0, 0.0, 230.5],
            [20.0, 0.0, 6.0, 6.0, 8.25, 30.0, 0.0, 6.0, 6.0, 6.0, 11.75, 0.0, 4.0, 6.0, 6.0, 2.0, 20.75, 17.5, 0.0, 0.0, 230.5],
        ],
    ],
];

/// Dropout sites per column and the bytes of their inputs' dtype (a CPU mask's bytes): the
/// residual branches and the MLP hidden are linear outputs (16-bit under autocast); the
/// per-stack embedding (and T5's final-norm) outputs stay fp32 under autocast.
fn mask_sites(f: Family, p: Precision) -> [(usize, f64, f64); 6] {
    let lin = linear_out_bytes(p);
    let stack_out = norm_out_bytes(p);
    let per_stack = if f == Family::Bart { 1.0 } else { 2.0 };
    [
        (ENC_BSH, 2.0, lin),
        (ENC_BSF, 1.0, lin),
        (DEC_BTH, 3.0, lin),
        (DEC_BTF, 1.0, lin),
        (ONCE_BSH, per_stack, stack_out),
        (ONCE_BTH, per_stack, stack_out),
    ]
}

/// The table row a plan uses: the measured CPU row, or translated to CUDA's kernels.
fn coefficients(f: Family, p: Precision, dropout: bool, k: Kernels) -> [f64; COLUMNS] {
    let fam = match f {
        Family::T5 => 0,
        Family::T5Gated => 1,
        Family::Bart => 2,
    };
    let mut c = CPU_EAGER[fam][precision_row(p)][usize::from(dropout)];
    if k == Kernels::Cuda {
        if dropout {
            for (col, sites, bytes) in mask_sites(f, p) {
                c[col] -= cuda_mask_saving(sites, bytes);
            }
        }
        let score = cuda_score_bytes(p, dropout);
        for col in [ENC_BAS2, DEC_BAT2, DEC_BATS] {
            c[col] = score;
        }
    }
    c
}

/// What the stacks of `t` keep under `train`, or None when `t` is no measured family. The
/// spec's MLP activation picks the table: ReLU or the gated `gelu_new` measured; any other keeps
/// the nearest (a gated SiLU keeps less than `gelu_new`: over-planned).
pub fn saved(t: &TransformerSpec, e: &EncDec, train: &TrainSpec, k: Kernels) -> Option<Saved> {
    let fam = family(t, e)?;
    if fam == Family::T5 && t.activation_kind() != Activation::Relu {
        // a non-gated GELU T5 keeps the GELU's input besides ReLU's output: the gated table,
        // whose f-wide bytes bound it
        return saved_as(Family::T5Gated, t, e, train, k);
    }
    saved_as(fam, t, e, train, k)
}

fn saved_as(
    fam: Family,
    t: &TransformerSpec,
    e: &EncDec,
    train: &TrainSpec,
    k: Kernels,
) -> Option<Saved> {
    let dropout = t.dropout_p().is_active();
    let c = coefficients(fam, train.precision, dropout, k);
    let (b, h, a, f) = (
        train.batch as f64,
        t.hidden as f64,
        t.heads as f64,
        t.ffn as f64,
    );
    let q = if fam == Family::Bart {
        0.0
    } else {
        t.q_width() as f64
    };
    let (s, tg) = (train.seq as f64, e.target(train.seq) as f64);
    let v = t.vocab as f64;
    let (enc_layers, dec_layers) = (
        live_layers(t.layers, train),
        live_layers(e.decoder_layers, train),
    );
    let sdpa = train.attention == Attention::Sdpa;
    // the CPU runs sdpa with attention dropout (and T5's mask needing a gradient) on its math
    // path, which keeps eager's scores
    let fused = sdpa && (k == Kernels::Cuda || (!dropout && fam == Family::Bart));
    let score_layers = |layers: f64| score_layers(layers, train, fused);
    let enc_scores = score_layers(enc_layers) * b * a * s * s * c[ENC_BAS2];
    let dec_scores = score_layers(dec_layers) * b * a * tg * (tg * c[DEC_BAT2] + s * c[DEC_BATS]);
    // the kernels' fp32 log-sum-exp: one attention per encoder layer, two per decoder layer
    let lse = if fused {
        4.0 * b * a * (enc_layers * s + 2.0 * dec_layers * tg)
    } else {
        0.0
    };
    // T5's float masks under fused attention, in the scores' dtype (no batch dimension)
    let masks = if fused && fam != Family::Bart {
        let mb = if train.precision.is_pure_half() {
            2.0
        } else {
            4.0
        };
        mb * a * (s * s + tg * s + dec_layers * tg * tg)
    } else {
        0.0
    };
    let enc = enc_layers * b * s * (h * c[ENC_BSH] + q * c[ENC_BSQ] + f * c[ENC_BSF] + c[ENC_BS]);
    let dec = dec_layers
        * b
        * (tg * (h * c[DEC_BTH] + q * c[DEC_BTQ] + f * c[DEC_BTF] + c[DEC_BT])
            + s * (q * c[DEC_BSQ] + h * c[DEC_BSH]));
    let once = b * (s * h * c[ONCE_BSH] + tg * h * c[ONCE_BTH] + tg * c[ONCE_BT] + s * c[ONCE_BS])
        + s * s * c[ONCE_S2]
        + tg * tg * c[ONCE_T2]
        + c[ONCE_1];
    Some(Saved {
        once,
        head: b * tg * v * c[ONCE_BTV],
        blocks: enc + dec + enc_scores + dec_scores + lse + masks,
    })
}
