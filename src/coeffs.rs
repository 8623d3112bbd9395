//! The planner's coefficient table: activation bytes per feature element, overhead, and the time
//! model, per (model family, precision). The embedded default holds literature values with their
//! sources; calibration writes device tables of the same schema to `calibration/<device-id>.json`.

use crate::error::input_err;
use crate::spec::{Family, Precision};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The embedded literature table (also committed as `calibration/literature.json`).
pub const LITERATURE_JSON: &str = include_str!("../calibration/literature.json");

/// One coefficient with where its value came from (a paper, an assumption, or a fit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coef {
    pub value: f64,
    pub source: String,
}

impl TimeCoeffs {
    /// Seconds of one step that scale with compute and activation traffic (what recompute
    /// repeats), given the achieved FLOP/s `rate`.
    pub fn repeated_s(&self, flops: &crate::plan::time::StepFlops, rate: f64) -> f64 {
        let traffic = if self.s_per_elem.is_empty() {
            if self.act_bytes_per_s.value > 0.0 {
                flops.activation_traffic_bytes / self.act_bytes_per_s.value
            } else {
                0.0
            }
        } else {
            flops
                .traffic
                .named()
                .iter()
                .map(|(n, x)| x * self.s_per_elem.get(*n).map_or(0.0, |c| c.value))
                .sum()
        };
        flops.total() / rate + traffic
    }

    /// Seconds of one step that checkpointing does not repeat: the optimizer pass and t0.
    pub fn once_s(&self, flops: &crate::plan::time::StepFlops) -> f64 {
        let state = if self.state_bytes_per_s.value > 0.0 {
            flops.state_traffic_bytes / self.state_bytes_per_s.value
        } else {
            0.0
        };
        state + self.t0_s.value
    }
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

impl BlockCoeffs {
    fn ranged(&self) -> [(&'static str, f64); 12] {
        [
            ("dropout.bsh", self.dropout.bsh),
            ("dropout.bas2", self.dropout.bas2),
            ("dropout.bsh_once", self.dropout.bsh_once),
            ("bsh", self.bsh),
            ("bsf", self.bsf),
            ("bas2", self.bas2),
            ("bas", self.bas),
            ("bskv", self.bskv),
            ("bs", self.bs),
            ("bsh_once", self.bsh_once),
            ("bs_once", self.bs_once),
            ("bsv", self.bsv),
        ]
    }
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

    fn ranged(&self) -> [(&'static str, &Coef, f64); 4] {
        [
            (
                "runtime.cuda_context_bytes",
                &self.cuda_context_bytes,
                MAX_CONST_BYTES,
            ),
            (
                "runtime.cublas_workspace_bytes",
                &self.cublas_workspace_bytes,
                MAX_CONST_BYTES,
            ),
            ("runtime.nccl_bytes", &self.nccl_bytes, MAX_CONST_BYTES),
            ("runtime.reserve_frac", &self.reserve_frac, MAX_FRACTION),
        ]
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

/// A coefficient must be finite and in `0..=max`; `field` names it (built only on failure).
fn check_coef(field: impl FnOnce() -> String, v: f64, max: f64) -> anyhow::Result<()> {
    if v.is_finite() && (0.0..=max).contains(&v) {
        return Ok(());
    }
    input_err(&field(), format!("{v} is out of range; accepted 0..={max}"))
}

/// Upper bounds of the coefficients, far above any measured or published value (bytes per
/// element are single digits to tens, see calibration/*.json) yet low enough that a plan stays
/// finite: a value above them is a corrupted or hand-edited table.
const MAX_BYTES_PER_ELEM: f64 = 1e4;
const MAX_FRACTION: f64 = 100.0;
const MAX_CONST_BYTES: f64 = (1u64 << 50) as f64;
const MAX_FLOPS: f64 = 1e19;
const MAX_BYTES_PER_S: f64 = 1e15;
const MAX_SECONDS: f64 = 3600.0;

impl ModeCoeffs {
    /// Every coefficient with its key (as in the JSON) and its upper bound.
    fn ranged(&self) -> Vec<(String, &Coef, f64)> {
        let a = &self.activation;
        let mut out: Vec<(String, &Coef, f64)> = [
            ("activation.c_h", &a.c_h),
            ("activation.c_f", &a.c_f),
            ("activation.c_att", &a.c_att),
            ("activation.c_logits", &a.c_logits),
            ("activation.c_ckpt", &a.c_ckpt),
            ("activation.c_conv", &a.c_conv),
            ("activation.c_norm", &a.c_norm),
            ("activation.c_act", &a.c_act),
            ("activation.c_pool", &a.c_pool),
            ("activation.c_input", &a.c_input),
            ("activation.c_workspace", &a.c_workspace),
            ("activation.c_max_param", &a.c_max_param),
            ("activation.c_gathered", &a.c_gathered),
        ]
        .into_iter()
        .map(|(k, c)| (k.to_string(), c, MAX_BYTES_PER_ELEM))
        .collect();
        let t = &self.time;
        out.extend([
            (
                "activation.half_copy".to_string(),
                &a.half_copy,
                MAX_FRACTION,
            ),
            ("activation.grad_overlap".to_string(), &a.grad_overlap, 1.0),
            (
                "overhead.frag".to_string(),
                &self.overhead.frag,
                MAX_FRACTION,
            ),
            (
                "overhead.const_bytes".to_string(),
                &self.overhead.const_bytes,
                MAX_CONST_BYTES,
            ),
            ("time.mfu".to_string(), &t.mfu, 1.0),
            ("time.flops_per_s".to_string(), &t.flops_per_s, MAX_FLOPS),
            (
                "time.act_bytes_per_s".to_string(),
                &t.act_bytes_per_s,
                MAX_BYTES_PER_S,
            ),
            (
                "time.state_bytes_per_s".to_string(),
                &t.state_bytes_per_s,
                MAX_BYTES_PER_S,
            ),
            ("time.t0_s".to_string(), &t.t0_s, MAX_SECONDS),
            (
                "time.recompute_factor".to_string(),
                &t.recompute_factor,
                3.0,
            ),
        ]);
        out.extend(
            t.s_per_elem
                .iter()
                .map(|(k, c)| (format!("time.s_per_elem.{k}"), c, 1.0)),
        );
        out
    }
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
    /// compute width, then to the literature value.
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
        if let Some(m) = exact.or_else(same_width) {
            let mut m = m.clone();
            m.precision = precision;
            return m;
        }
        Self::literature_ref()
            .modes
            .iter()
            .find(|m| m.family == family && m.precision == precision)
            .cloned()
            .expect("literature table covers every family and precision")
    }

    /// Checks every coefficient against its physical range, naming the table, the mode and the
    /// key. A table is trusted by every plan made with it: a negative fixed time, an infinite
    /// byte coefficient or a negative overhead would turn into negative step times or totals
    /// that wrap and "fit", so such a table is refused where it enters.
    pub fn validate(&self, origin: &str) -> anyhow::Result<()> {
        if self.schema != 1 {
            return input_err(
                &format!("{origin} schema"),
                format!("{}; accepted 1", self.schema),
            );
        }
        if self.modes.is_empty() {
            return input_err(
                &format!("{origin} modes"),
                "empty; accepted at least one mode",
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.modes.iter().enumerate() {
            let at = format!(
                "{origin} modes[{i}] ({} {})",
                m.family.as_str(),
                m.precision
            );
            if !seen.insert((m.family, m.precision)) {
                return input_err(
                    &at,
                    "appears twice; accepted one mode per (family, precision)",
                );
            }
            for (key, coef, max) in m.ranged() {
                check_coef(|| format!("{at} {key}"), coef.value, max)?;
            }
            for (j, b) in m.activation.blocks.iter().enumerate() {
                for (key, v) in b.ranged() {
                    check_coef(
                        || format!("{at} activation.blocks[{j}].{key}"),
                        v,
                        MAX_BYTES_PER_ELEM,
                    )?;
                }
            }
            for (act, c) in &m.activation.act_fns {
                check_coef(
                    || format!("{at} activation.act_fns.{act}"),
                    c.value,
                    MAX_BYTES_PER_ELEM,
                )?;
            }
            if !m.activation.blocks.is_empty() {
                use crate::spec::transformer::Activation;
                if let Some(a) = Activation::ALL
                    .iter()
                    .find(|a| !m.activation.act_fns.contains_key(a))
                {
                    return input_err(
                        &format!("{at} activation.act_fns"),
                        format!(
                            "has no {a}; accepted an entry for each of {} when the mode has blocks",
                            Activation::accepted()
                        ),
                    );
                }
            }
            for name in m.time.s_per_elem.keys() {
                if !crate::plan::memory::Features::NAMES.contains(&name.as_str()) {
                    return input_err(
                        &format!("{at} time.s_per_elem.{name}"),
                        format!(
                            "unknown feature; accepted {}",
                            crate::plan::memory::Features::NAMES.join(", ")
                        ),
                    );
                }
            }
            let r = m.time.recompute_factor.value;
            if r < 1.0 {
                return input_err(
                    &format!("{at} time.recompute_factor"),
                    format!("{r} would make recomputation faster than none; accepted 1..=3"),
                );
            }
        }
        if let Some(rt) = &self.runtime {
            for (key, coef, max) in rt.ranged() {
                check_coef(|| format!("{origin} {key}"), coef.value, max)?;
            }
        }
        Ok(())
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

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading coefficients {}", path.display()));
        let text = match text {
            Ok(t) => t,
            Err(e) => return input_err("coeffs", format!("{e:#}; accepted a readable JSON file")),
        };
        match serde_json::from_str::<Self>(&text) {
            Ok(c) => {
                c.validate(&format!("coeffs {}", path.display()))?;
                Ok(c)
            }
            Err(e) => input_err(
                "coeffs",
                format!("{} is not a coefficient table ({e}); accepted the schema of calibration/literature.json", path.display()),
            ),
        }
    }

    /// Writes the table atomically (temp file + rename), so a crash never leaves half a table.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        // A fit that produced an out-of-range value must not leave a table every later plan trusts.
        self.validate(&format!("fitted table for {}", path.display()))?;
        let text = serde_json::to_string_pretty(self)?;
        crate::atomic::write(path, text.as_bytes())
    }
}
