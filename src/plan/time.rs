//! Training FLOPs per step, and the activation and model-state traffic the step-time model
//! (`plan::step_time`) adds to them.

use crate::coeffs::Coefficients;
use crate::plan::{memory, params};
use crate::spec::{Checkpointing, ModelSpec, TrainSpec};
use serde::Serialize;

/// FLOPs of one training step (forward + backward), without recompute.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepFlops {
    /// 6 * matmul params * tokens (CNN: 6 * MACs * batch; 2 per MAC, x3 for forward + backward)
    pub dense: f64,
    /// 12 * L * b * s^2 * h: QK^T and AV, forward and backward
    pub attention: f64,
    /// one extra forward pass, added under full checkpointing: (dense + attention) / 3; under
    /// selective recomputation only the attention core's: attention / 3
    pub recompute: f64,
    /// activation bytes the literature model stores for this step without checkpointing: the
    /// memory-bound elementwise kernels (norms, softmax, GELU, dropout, residual adds) read and
    /// write them, so step time grows with them apart from FLOPs
    pub activation_traffic_bytes: f64,
    /// weights + gradients + optimizer states on this rank: the optimizer update streams them once
    pub state_traffic_bytes: f64,
    /// activation feature elements of the step without checkpointing: per-op memory traffic,
    /// which a calibrated table may cost per feature (`TimeCoeffs::s_per_elem`)
    pub traffic: memory::Features,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.dense + self.attention
    }
}

pub fn step_flops(model: &ModelSpec, train: &TrainSpec) -> anyhow::Result<StepFlops> {
    let b = train.batch as f64;
    let (dense, attention) = match model {
        ModelSpec::Transformer(t) => {
            let s = t.effective_seq(train.seq, train.image) as f64;
            let p = params::transformer(t).matmul as f64;
            (
                6.0 * p * b * s,
                12.0 * t.layers as f64 * b * s * s * t.hidden as f64,
            )
        }
        ModelSpec::Cnn(c) => (6.0 * c.walk(train.image)?.macs as f64 * b, 0.0),
    };
    // Recompute repeats the forward pass (a third of forward + backward): of everything under
    // full checkpointing, of the attention core (QK^T, AV) under selective recomputation.
    let recompute = match train.checkpointing {
        Checkpointing::Full => (dense + attention) / 3.0,
        Checkpointing::Selective => attention / 3.0,
        Checkpointing::None => 0.0,
    };
    // Traffic is defined by the fixed literature weights, not by a fitted table, so the time fit
    // does not depend on the memory fit; recompute repeats it, which the time model multiplies.
    let lit = Coefficients::literature_ref();
    let plain = TrainSpec {
        checkpointing: Checkpointing::None,
        ..train.clone()
    };
    let terms = memory::fit_terms(model, &plain)?;
    let mut mode = lit.mode(model.family(), train.precision);
    // the per-feature weights alone, so traffic stays linear in the features the time fit uses
    mode.activation.blocks.clear();
    let act = terms.features;
    Ok(StepFlops {
        dense,
        attention,
        recompute,
        activation_traffic_bytes: act.activation_bytes(&mode.activation),
        state_traffic_bytes: terms.states.fixed() + terms.states.half_copy,
        traffic: act,
    })
}

/// FLOPs of a fine-tuning step (`plan::finetune`): a frozen weight needs no weight-gradient
/// matmul (2 of the 6 FLOPs per weight and token), the frozen leading blocks run forward only
/// (2 of 6, and a third of their attention FLOPs), and each adapter weight costs the full 6.
/// Unchanged for plain full training.
pub fn finetune_flops(
    model: &ModelSpec,
    train: &TrainSpec,
    ft: &crate::plan::finetune::Finetune,
    flops: StepFlops,
) -> StepFlops {
    let ModelSpec::Transformer(t) = model else {
        return flops;
    };
    if ft.is_plain() {
        return flops;
    }
    let tokens = (train.batch * t.effective_seq(train.seq, train.image)) as f64;
    let p = params::transformer(t);
    let block_mm = (p.matmul - p.head_matmul_and_patch()) as f64 / t.layers as f64;
    let n = ft.freeze_layers as f64;
    let l = t.layers as f64;
    let dense = if ft.is_adapter() {
        let s = crate::plan::finetune::split(model, ft);
        tokens * (4.0 * p.matmul as f64 - 2.0 * n * block_mm + 6.0 * s.trainable as f64)
    } else {
        flops.dense - 4.0 * n * block_mm * tokens
    };
    let attention = flops.attention * (1.0 - 2.0 / 3.0 * n / l);
    let recompute = match train.checkpointing {
        Checkpointing::Full => (dense + attention) / 3.0,
        Checkpointing::Selective => attention / 3.0,
        Checkpointing::None => 0.0,
    };
    StepFlops {
        dense,
        attention,
        recompute,
        ..flops
    }
}
