//! Memory-lean autograd ops: one graph node per layer-level op, keeping for backward only the
//! tensors PyTorch's eager kernels keep.
//!
//! Why this exists: candle's autograd keeps *every* input of *every* op alive until backward
//! ends. Composed from primitive ops, a LayerNorm keeps five hidden-sized tensors, a masked
//! softmax four score-sized ones, a linear with bias both the product and the sum, and a float
//! dropout mask costs four bytes per element (backward even computes a gradient for the mask and
//! leaves it in the GradStore). On tiny-gpt (b4, s128, fp32) that was 19.8 MB per block, about
//! 2.5x what PyTorch saves (Korthikanti et al. 2022), so a harness built that way measures
//! candle's graph, not the training job a user will run.
//!
//! Each op below runs its forward as a sequence of backend kernels on raw storages (the
//! `BackendStorage` trait, so one generic function serves CPU and CUDA); the intermediates are
//! freed when the forward returns. Its backward recomputes what it needs from the saved inputs
//! (cheap elementwise work; matmuls are never recomputed), so the graph holds only:
//!
//! | op | kept for backward (besides parameters) |
//! |---|---|
//! | `linear` (+bias, optional head split/merge) | its input |
//! | `layer_norm` / `rms_norm` | its input |
//! | `attention_probs` (QK^T, scale, causal mask, softmax) | Q, K and the probabilities |
//! | `dropout` | its input and a 1-byte mask |
//! | `log_softmax` | its input and output |
//!
//! One file per op family: `linear.rs`, `norm.rs` (LayerNorm, RMSNorm, BatchNorm), `bias_relu.rs`
//! (the CNN's nested residual join), `attention.rs` (eager attention's probabilities),
//! `activation.rs` (GELU, SiLU, `gelu_new`), `dropout.rs`, `loss.rs` (log-softmax,
//! cross-entropy), all written with `kernels.rs`.

#[macro_use]
mod kernels;
mod activation;
mod attention;
mod bias_relu;
mod dropout;
mod linear;
mod loss;
mod norm;
#[cfg(test)]
mod testing;

pub use activation::{activation, activation_grad, gelu_new, Act};
pub use attention::{attention_probs, probs_value};
pub use bias_relu::add_relu;
pub use dropout::dropout;
pub(crate) use dropout::dropout_grad;
pub(crate) use linear::LinearOp;
pub use linear::{linear, linear_merge_heads, linear_split_heads, Heads};
pub use loss::{cross_entropy, log_softmax};
pub use norm::{batch_norm, norm, norm_input_grad, seed_batch_norm, seed_layer_norm};
