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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverheadCoeffs {
    /// allocator slack as a fraction of (states + activations)
    pub frag: Coef,
    /// fixed bytes: runtime context, library workspaces, harness buffers
    pub const_bytes: Coef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeCoeffs {
    pub family: Family,
    pub precision: Precision,
    pub activation: ActivationCoeffs,
    pub overhead: OverheadCoeffs,
    pub time: TimeCoeffs,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading coefficients {}", path.display()));
        let text = match text {
            Ok(t) => t,
            Err(e) => return input_err("coeffs", format!("{e:#}; accepted a readable JSON file")),
        };
        match serde_json::from_str::<Self>(&text) {
            Ok(c) if c.modes.is_empty() => input_err("coeffs", format!("{} has no modes", path.display())),
            Ok(c) => Ok(c),
            Err(e) => input_err(
                "coeffs",
                format!("{} is not a coefficient table ({e}); accepted the schema of calibration/literature.json", path.display()),
            ),
        }
    }

    /// Writes the table atomically (temp file + rename), so a crash never leaves half a table.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::atomic::write(path, text.as_bytes())
    }
}
