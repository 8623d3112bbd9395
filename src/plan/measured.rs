//! Shared by the families planned from PyTorch's measured saved bytes rather than a coefficient
//! table's blocks (`plan::encdec_saved`: T5, BART; `plan::deberta_saved`: DeBERTa-v2/v3): whose
//! kernels keep the bytes, the split the planner's phases use, and the translation of a CPU
//! measurement to CUDA's kernels.
//!
//! A CPU keeps its dropout masks in the input's dtype (`aten::_dropout_impl`: input × noise) and
//! runs autocast's softmax in 16 bits where nothing promotes it; CUDA keeps 1-byte masks
//! (`native_dropout`) and autocast runs softmax in fp32.

use crate::spec::{Checkpointing, Precision, TrainSpec};

/// Whose kernels keep the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// what the plan is for: 1-byte dropout masks, fp32 autocast softmax, fused attention kernels
    Cuda,
    /// what the measurement ran on (the tests check the tables against it)
    Cpu,
}

/// Bytes kept for backward, split as the planner's phases use them.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Saved {
    /// once per model: embeddings and their norms, final norms, token ids and labels, position
    /// indices shared by all blocks
    pub once: f64,
    /// the head's saved bytes (an LM head's fp32 log-softmax)
    pub head: f64,
    /// the live blocks (all of them; one per stack under full checkpointing)
    pub blocks: f64,
}

/// The row of a measured table for a precision: 0 fp32, 1 autocast (bf16 or fp16), 2 pure
/// 16-bit.
pub fn precision_row(p: Precision) -> usize {
    if p.is_pure_half() {
        2
    } else if p.is_mixed() {
        1
    } else {
        0
    }
}

/// Bytes of a linear layer's output (a residual branch's dropout input): 16-bit under autocast.
pub fn linear_out_bytes(p: Precision) -> f64 {
    p.compute_bytes() as f64
}

/// Bytes of a norm's or an embedding's output (an embedding dropout's input): fp32 under
/// autocast, which runs norms in fp32 and leaves embeddings alone.
pub fn norm_out_bytes(p: Precision) -> f64 {
    if p.is_pure_half() {
        2.0
    } else {
        4.0
    }
}

/// What CUDA keeps less than a CPU at `sites` dropout sites whose inputs have `input_bytes`
/// per element: a 1-byte mask where the CPU's has the input's dtype.
pub fn cuda_mask_saving(sites: f64, input_bytes: f64) -> f64 {
    sites * (input_bytes - 1.0)
}

/// Bytes per stored attention score on CUDA (eager): the probabilities (fp32 under autocast,
/// whose softmax CUDA runs in fp32, plus their 16-bit cast for the AV matmul), with dropout a
/// 1-byte mask and the dropped copy the AV matmul saves (under autocast its 16-bit cast, which
/// replaces the probabilities' cast).
pub fn cuda_score_bytes(p: Precision, dropout: bool) -> f64 {
    match (p.is_mixed(), p.is_pure_half(), dropout) {
        (true, _, false) => 6.0,
        (true, _, true) => 7.0,
        (_, true, false) => 2.0,
        (_, true, true) => 5.0,
        (_, _, false) => 4.0,
        (_, _, true) => 9.0,
    }
}

/// Blocks of a stack of `layers` whose saved tensors are live at once: all of them, or under
/// full checkpointing the one being recomputed.
pub fn live_layers(layers: u64, train: &TrainSpec) -> f64 {
    if train.checkpointing.is_on() {
        1.0
    } else {
        layers as f64
    }
}

/// Of `live` blocks, those whose attention scores are stored: none under a fused kernel, one
/// under selective recomputation (it rebuilds a layer's in that layer's backward), else all.
pub fn score_layers(live: f64, train: &TrainSpec, fused: bool) -> f64 {
    if fused {
        0.0
    } else if train.checkpointing == Checkpointing::Selective {
        1.0
    } else {
        live
    }
}
