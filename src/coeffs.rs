//! The planner's coefficient table: activation bytes per feature element, overhead, and the time
//! model, per (model family, precision). The embedded default holds literature values with their
//! sources; calibration writes device tables of the same schema to `calibration/<device-id>.json`.

use crate::spec::{Family, Precision};
use serde::{Deserialize, Serialize};

mod validate;

/// The embedded literature table (also committed as `calibration/literature.json`).
pub const LITERATURE_JSON: &str = include_str!("../calibration/literature.json");

/// One coefficient with where its value came from (a paper, an assumption, or a fit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coef {
    pub value: f64,
    pub source: String,
}

impl Coef {
    pub fn new(value: f64, source: impl Into<String>) -> Self {
        Self {
            value,
            source: source.into(),
        }
    }

    /// A coefficient absent from an older table: 0, saying so.
    pub fn unset() -> Self {
        Self::new(
            0.0,
            "not in this table (written before the coefficient existed)",
        )
    }
}

/// Activation bytes per element of each feature (see `plan::memory::Features`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationCoeffs {
    /// per b*s*h per layer
    pub c_h: Coef,
    /// per b*s*f per layer
    pub c_f: Coef,
    /// per b*a*s^2 per layer (attention scores/probabilities)
    pub c_att: Coef,
    /// per dropout element of a block (2·b·s·h for the attention-output and MLP-output sites
    /// plus the stored b·a·s² probabilities; 0 without dropout): its mask and dropped copy. The
    /// literature's c_h and c_att include dropout (Korthikanti et al.), so its value there is 0;
    /// a fit separates it so that blocks with and without dropout are planned apart
    #[serde(default = "Coef::unset")]
    pub c_dropout: Coef,
    /// per b*s*V (head logits and loss)
    pub c_logits: Coef,
    /// per b*s*h per layer kept as block inputs under checkpointing
    pub c_ckpt: Coef,
    /// per CNN conv/linear output element
    pub c_conv: Coef,
    /// per CNN batchnorm output element
    pub c_norm: Coef,
    /// per CNN ReLU output / residual-sum element
    pub c_act: Coef,
    /// per CNN pooling output element
    pub c_pool: Coef,
    /// per input-batch element (CNN and ViT images)
    pub c_input: Coef,
    /// per element of the largest conv's unfolded input (transient im2col workspace)
    pub c_workspace: Coef,
    /// per element of the largest parameter tensor (per-tensor transient buffers)
    pub c_max_param: Coef,
    /// per parameter element gathered in full under ZeRO-3 (weights and their gradients)
    #[serde(default = "Coef::unset")]
    pub c_gathered: Coef,
    /// fraction of the 2-byte/param half-precision weight copy resident at the peak (mixed precision)
    pub half_copy: Coef,
    /// Saved-for-backward bytes of measured PyTorch block implementations (per attention
    /// kind); where one matches the model, it replaces c_h, c_f, c_att and c_logits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<BlockCoeffs>,
    /// The same blocks as PyTorch keeps them on a CPU, where [`Self::blocks`] describe CUDA:
    /// dropout masks in the input's dtype (`aten::_dropout_impl`, not CUDA's 1-byte
    /// `native_dropout` mask) and CPU autocast's op lists (BERT's softmax stays 16-bit). Never
    /// planned with: a CPU calibration's fit tries them as its prior's blocks (`fit::calibrate`)
    /// and the fitted table holds whichever it chose in `blocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_blocks: Vec<BlockCoeffs>,
    /// With [`Self::blocks`]: bytes per b·s·f per layer that the MLP's activation function saves
    /// for backward beyond its output (which the next linear saves anyway), per activation as
    /// transformers names it; added to the matched block's `bsf`. A table with blocks has one
    /// for every activation ([`Coefficients::validate`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub act_fns: std::collections::BTreeMap<crate::spec::transformer::Activation, Coef>,
    /// 1: activations are freed layer by layer as backward allocates gradients, so backward holds
    /// max(activations, gradients) (PyTorch autograd with gradients set to None each step); 0:
    /// both live in full at the end of backward (the candle harness). Tables written before the
    /// coefficient existed were fitted on the harness: 0.
    #[serde(default = "Coef::unset")]
    pub grad_overlap: Coef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverheadCoeffs {
    /// allocator slack as a fraction of (states + activations)
    pub frag: Coef,
    /// fixed bytes: runtime context, library workspaces, harness buffers
    pub const_bytes: Coef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeCoeffs {
    /// model FLOP utilisation used with a GPU's datasheet peak when `flops_per_s` is 0
    pub mfu: Coef,
    /// achieved FLOP/s measured on the calibrated device (0 = not measured)
    pub flops_per_s: Coef,
    /// effective bytes/s of activation traffic (memory-bound elementwise work); 0 = not modelled
    pub act_bytes_per_s: Coef,
    /// effective bytes/s of the optimizer's pass over the model states; 0 = not modelled
    pub state_bytes_per_s: Coef,
    /// seconds per element of each activation feature (`plan::memory::Features::NAMES`): the
    /// memory-bound kernels' cost per op kind; when present it replaces `act_bytes_per_s`
    #[serde(default)]
    pub s_per_elem: std::collections::BTreeMap<String, Coef>,
    /// fixed seconds per step
    pub t0_s: Coef,
    /// step time with full recomputation over step time without
    pub recompute_factor: Coef,
}

/// What one measured transformer block implementation saves for backward, in bytes per element
/// of each count (per layer unless `_once`), with dropout off (p = 0) and without the MLP
/// activation function's own saved tensors ([`ActivationCoeffs::act_fns`]). Measured with
/// PyTorch and transformers' own model classes (scripts/torch_saved_bytes.py); the source says
/// what was translated (dropout masks are 1-byte on CUDA, the dtype's size on the CPU where it
/// was measured).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockCoeffs {
    pub block: crate::spec::transformer::BlockKind,
    pub attention: crate::spec::Attention,
    /// per b·s·h per layer (norms, projections' inputs, q/k/v at full width)
    pub bsh: f64,
    /// per b·s·f per layer, f the FFN width, besides the activation function's own (GELU MLP:
    /// the down projection's input; SwiGLU: up, the activation's output and their product)
    pub bsf: f64,
    /// per b·a·s² per stored layer (eager softmax output and the AV matmul's input)
    pub bas2: f64,
    /// per b·a·s per layer (sdpa's fp32 log-sum-exp)
    pub bas: f64,
    /// per b·s·kv_heads·head_dim per layer (sdpa keeps K and V at the key/value width)
    pub bskv: f64,
    /// per b·s per layer (normalisation statistics)
    pub bs: f64,
    /// per b·s·h once (embedding output, final norm)
    pub bsh_once: f64,
    /// per b·s once (token ids, labels, positions)
    pub bs_once: f64,
    /// per element of the head's output (LM: the fp32 log-softmax of b·s·V)
    pub bsv: f64,
    /// per b·s·(q_width − h) per layer: the tensors `bsh` counts at the query width, for heads
    /// whose head_dim is not h / heads (Qwen3, Gemma2/3): eager attention's q, repeated k and v
    /// and attention output, sdpa's q and kernel output. Absent (0) for blocks whose heads are
    /// always h / heads wide; a table written before it existed takes the literature's value
    /// for the same block on loading ([`Coefficients::load`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bsq: Option<f64>,
    pub source: String,
    /// what dropout adds when its probability is above 0
    pub dropout: DropoutCoeffs,
}

/// Bytes a block keeps for its dropouts when the probability is above 0, per element of each
/// count as in [`BlockCoeffs`]. At p = 0 `F.dropout` returns its input and keeps nothing; at
/// p > 0 each dropout site keeps a mask (a 1-byte bool on CUDA, `native_dropout`), and the op
/// after it may save the dropped copy instead of a tensor that was saved anyway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropoutCoeffs {
    /// per b·s·h per layer: the hidden/residual dropout sites' masks
    pub bsh: f64,
    /// per b·a·s² per stored layer: the attention-probability mask and its dropped copy
    pub bas2: f64,
    /// per b·s·h once: the embedding dropout's mask
    pub bsh_once: f64,
    pub source: String,
}

/// GPU runtime memory outside the model's tensors: what `nvidia-smi` shows beyond
/// `torch.cuda.max_memory_allocated`. Per table, not per mode: it belongs to the device and
/// software stack, not to a model family or precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeCoeffs {
    /// CUDA context and loaded kernels (outside the caching allocator)
    pub cuda_context_bytes: Coef,
    /// cuBLAS/cuBLASLt workspace (inside the caching allocator, so in the allocated peak)
    pub cublas_workspace_bytes: Coef,
    /// NCCL communicator buffers when more than one GPU (outside the caching allocator)
    pub nccl_bytes: Coef,
    /// caching-allocator reserve above the allocated peak, as a fraction of it
    pub reserve_frac: Coef,
}

impl RuntimeCoeffs {
    /// No GPU runtime: a CPU table's process has none of these.
    pub fn none(why: &str) -> Self {
        let zero = || Coef::new(0.0, why);
        Self {
            cuda_context_bytes: zero(),
            cublas_workspace_bytes: zero(),
            nccl_bytes: zero(),
            reserve_frac: zero(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeCoeffs {
    pub family: Family,
    pub precision: Precision,
    pub activation: ActivationCoeffs,
    pub overhead: OverheadCoeffs,
    pub time: TimeCoeffs,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coefficients {
    pub schema: u32,
    pub device_id: String,
    pub device_name: String,
    pub backend: String,
    pub driver: String,
    pub date: String,
    pub vramcal_version: String,
    /// measurements the table was fitted on (0 for the literature table)
    pub points: u64,
    #[serde(default)]
    pub note: String,
    pub modes: Vec<ModeCoeffs>,
    /// GPU runtime memory; absent in tables written before it existed (see
    /// [`Coefficients::runtime`] for what that means)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeCoeffs>,
    /// fit diagnostics (residuals per mode), free-form
    #[serde(default)]
    pub residuals: Option<serde_json::Value>,
}

impl Default for Coefficients {
    fn default() -> Self {
        Self::literature()
    }
}

impl Coefficients {
    pub fn literature() -> Self {
        serde_json::from_str(LITERATURE_JSON).expect("embedded literature.json is valid")
    }

    /// The literature table, parsed once (hot paths fall back to it per call).
    pub fn literature_ref() -> &'static Self {
        static TABLE: std::sync::OnceLock<Coefficients> = std::sync::OnceLock::new();
        TABLE.get_or_init(Self::literature)
    }

    /// Coefficients for a (family, precision). A calibrated table may lack a mode (for example
    /// pure bf16 on a CPU); it falls back to the same family at the precision with the same
    /// compute width, then to the literature value. A transformer in a pure 16-bit precision
    /// borrowing a mixed mode keeps that mode's overhead and speed but takes the literature's
    /// activation coefficients for itself: autocast keeps fp32 copies (the residual stream,
    /// softmaxes, the loss) that a model cast to 16 bits does not, so a mixed mode's activations
    /// over-plan it (measured: the committed CPU table's fp16-mixed activations planned PyTorch's
    /// pure bf16 steps of `torch-step-peaks-cpu.csv` 10-25 % high; with the literature's bf16
    /// activations -0.9 to -4.7 %). A CNN keeps the mixed mode's: no pure-16-bit CNN step has
    /// been measured, and the fitted terms (a CPU's im2col workspace) may be the device's.
    pub fn mode(&self, family: Family, precision: Precision) -> ModeCoeffs {
        let exact = self
            .modes
            .iter()
            .find(|m| m.family == family && m.precision == precision);
        let same_width = || {
            self.modes.iter().find(|m| {
                m.family == family && m.precision.compute_bytes() == precision.compute_bytes()
            })
        };
        let literature = || {
            Self::literature_ref()
                .modes
                .iter()
                .find(|m| m.family == family && m.precision == precision)
                .cloned()
                .expect("literature table covers every family and precision")
        };
        if let Some(m) = exact {
            return m.clone();
        }
        if let Some(m) = same_width() {
            let mut m = m.clone();
            if family == Family::Transformer
                && precision.is_pure_half()
                && !m.precision.is_pure_half()
            {
                m.activation = literature().activation;
            }
            m.precision = precision;
            return m;
        }
        literature()
    }

    /// The runtime memory this table's plans add: its own when it has one; none for a CPU
    /// table (a CPU process has no CUDA context); the literature's for any other (GPU) table.
    pub fn runtime(&self) -> RuntimeCoeffs {
        if let Some(r) = &self.runtime {
            return r.clone();
        }
        if self.device_id.starts_with("cpu") {
            return RuntimeCoeffs::none("a CPU process has no CUDA runtime");
        }
        Self::literature_ref()
            .runtime
            .clone()
            .expect("the literature table has runtime defaults")
    }
}
