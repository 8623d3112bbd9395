//! What DeBERTa-v2/v3 with relative (disentangled) attention keeps for backward, from PyTorch's
//! own measurement: the generic per-feature coefficients it took before planned it 73-80 % low.
//!
//! Measured with PyTorch 2.15 + transformers 5.24's `DebertaV2ForMaskedLM` on a CPU, DeBERTa-v3's
//! attention (`relative_attention`, `pos_att_type` c2p and p2c, `share_att_key`, log-bucketed
//! positions, a LayerNorm over the relative embeddings, no absolute positions):
//! scripts/torch_saved_bytes.py --arch deberta-v2 --attention eager --dropout 0 --dropout 0.1,
//! calibration/data/torch-saved-bytes-deberta-cpu.csv, 36 shapes per precision and dropout with
//! batch, length, widths, heads, depth, vocabulary and `position_buckets` moved apart; fitted per
//! layer, every shape within 2e-5 of PyTorch's bytes. With R = 2 × position_buckets relative rows,
//! each layer keeps beyond a BERT block:
//! - per disentangled term the `b·a × s × R` product of the content and the repeated position
//!   projection, which `gather` keeps, and the repeated `b·a × R × d` projection the matmul saves;
//! - per term the s × s int64 index of the gather;
//! - its own dropout of the relative embeddings (`pos_dropout`), and under autocast the 16-bit
//!   casts of them for the shared q and k projections; a 1-byte b × s × s attention mask.
//!
//! transformers has no sdpa path for DeBERTa-v2: attention is eager whatever is asked
//! (`BlockExtras::eager_only`). The plan is CUDA's (`Kernels::Cuda`): 1-byte dropout masks and
//! fp32 autocast softmax (`plan::measured`). A config with one disentangled term takes half the
//! per-term columns (derived, not measured).

use super::measured::{
    cuda_mask_saving, cuda_score_bytes, linear_out_bytes, live_layers, norm_out_bytes,
    precision_row, score_layers, Kernels, Saved,
};
use crate::spec::transformer::{Head, TransformerSpec};
use crate::spec::{Precision, TrainSpec};

/// Column indices of [`CPU_EAGER`]'s rows, bytes per element of
/// - per layer: b·s·h, b·s·f, b·a·s², b·s, b·a·s·R, b·R·h, R·h, s², b·s²
/// - once: b·s·h, b·s·V (the masked-LM head), b·s, R·h, R, 1
const L_BSH: usize = 0;
const L_BSF: usize = 1;
const L_BAS2: usize = 2;
const L_BS: usize = 3;
const L_BASR: usize = 4;
const L_BRH: usize = 5;
const L_RH: usize = 6;
const L_S2: usize = 7;
const L_BS2: usize = 8;
const O_BSH: usize = 9;
const O_BSV: usize = 10;
const O_BS: usize = 11;
const O_RH: usize = 12;
const O_R: usize = 13;
const O_1: usize = 14;
const COLUMNS: usize = 15;

/// The per-term columns, measured with both terms (c2p and p2c).
const PER_TERM: [usize; 3] = [L_BASR, L_BRH, L_S2];

/// The fit over the measured rows at b >= 2 per precision (fp32, bf16 autocast, pure bf16) and
/// dropout (0, 0.1), rounded to 0.25 byte.
#[rustfmt::skip]
const CPU_EAGER: [[[f64; COLUMNS]; 2]; 3] = [
    [
        [36.0, 8.0, 4.0, 16.0, 8.0, 8.0, 0.0, 16.0, 1.0, 20.0, 4.0, 35.75, 4.0, 8.0, 23.25],
        [44.0, 8.0, 12.0, 16.0, 8.0, 8.0, 8.0, 16.0, 1.0, 24.0, 4.0, 35.75, 0.0, 8.0, 23.25],
    ],
    [
        [26.0, 4.0, 2.0, 16.0, 4.0, 4.0, 4.0, 16.0, 1.0, 12.0, 4.0, 36.0, 0.0, 8.0, 13.5],
        [30.0, 4.0, 6.0, 16.0, 4.0, 4.0, 8.0, 16.0, 1.0, 16.0, 4.0, 36.0, 0.0, 8.0, 13.5],
    ],
    [
        [18.0, 4.0, 2.0, 8.0, 4.0, 4.0, 0.0, 16.0, 1.0, 10.0, 2.0, 26.0, 2.0, 4.0, 11.5],
        [22.0, 4.0, 6.0, 8.0, 4.0, 4.0, 4.0, 16.0, 1.0, 12.0, 2.0, 26.0, 0.0, 4.0, 11.5],
    ],
];

/// The table row a plan uses: the measured CPU row, or translated to CUDA's kernels. Dropout
/// sites: the attention output's and the MLP output's (linear outputs), the relative embeddings'
/// per layer and the embeddings' once (norm outputs, fp32 under autocast).
fn coefficients(p: Precision, dropout: bool, k: Kernels) -> [f64; COLUMNS] {
    let mut c = CPU_EAGER[precision_row(p)][usize::from(dropout)];
    if k == Kernels::Cuda {
        if dropout {
            c[L_BSH] -= cuda_mask_saving(2.0, linear_out_bytes(p));
            c[L_RH] -= cuda_mask_saving(1.0, norm_out_bytes(p));
            c[O_BSH] -= cuda_mask_saving(1.0, norm_out_bytes(p));
        }
        c[L_BAS2] = cuda_score_bytes(p, dropout);
    }
    c
}

/// Whether the spec has disentangled attention over relative positions (what the table is of).
pub fn applies(t: &TransformerSpec) -> bool {
    t.extras.rel_att_terms > 0 && t.extras.rel_positions > 0
}

/// What a DeBERTa-v2/v3 with relative attention keeps under `train`, or None for a spec without
/// disentangled attention terms.
pub fn saved(t: &TransformerSpec, train: &TrainSpec, k: Kernels) -> Option<Saved> {
    if !applies(t) {
        return None;
    }
    let mut c = coefficients(train.precision, t.dropout_p().is_active(), k);
    let terms = f64::from(t.extras.rel_att_terms.min(2)) / 2.0;
    for col in PER_TERM {
        c[col] *= terms;
    }
    let (b, s, h, f, a) = (
        train.batch as f64,
        train.seq as f64,
        t.hidden as f64,
        t.ffn as f64,
        t.heads as f64,
    );
    let r = f64::from(t.extras.rel_positions);
    let layers = live_layers(t.layers, train);
    let score_layers = score_layers(layers, train, false);
    let blocks = layers
        * (b * s * (h * c[L_BSH] + f * c[L_BSF] + c[L_BS] + a * r * c[L_BASR])
            + b * r * h * c[L_BRH]
            + r * h * c[L_RH]
            + s * s * (c[L_S2] + b * c[L_BS2]))
        + score_layers * b * a * s * s * c[L_BAS2];
    let head = match t.head {
        Head::Lm => b * s * t.vocab as f64 * c[O_BSV],
        _ => 0.0,
    };
    Some(Saved {
        once: b * s * (h * c[O_BSH] + c[O_BS]) + r * (h * c[O_RH] + c[O_R]) + c[O_1],
        head,
        blocks,
    })
}
