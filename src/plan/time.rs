//! Counting a step: the training FLOPs of a model and configuration (full training and
//! fine-tuning) and the activation and model-state traffic, as the [`StepFlops`] the step-time
//! model (`plan::step_time`) turns into seconds.

use crate::coeffs::Coefficients;
use crate::plan::step_time::recompute_flops;
pub use crate::plan::step_time::StepFlops;
use crate::plan::{memory, params};
use crate::spec::{ModelSpec, TrainSpec};

pub fn step_flops(model: &ModelSpec, train: &TrainSpec) -> anyhow::Result<StepFlops> {
    let b = train.batch as f64;
    let (dense, attention) = match model {
        ModelSpec::Transformer(t) => {
            let s = t.effective_seq(train.seq, train.image) as f64;
            let p = params::transformer(t).matmul as f64;
            let (vision_dense, vision_attention) = crate::plan::vision::flops(t, train);
            (
                6.0 * p * b * s + vision_dense,
                12.0 * t.layers as f64 * b * s * s * t.hidden as f64 + vision_attention,
            )
        }
        ModelSpec::Cnn(c) => (6.0 * c.walk(train.image)?.macs as f64 * b, 0.0),
    };
    let recompute = recompute_flops(train.checkpointing, dense, attention);
    // Traffic is defined by the fixed literature weights, not by a fitted table, so the time fit
    // does not depend on the memory fit; recompute repeats it, which the time model multiplies.
    let lit = Coefficients::literature_ref();
    let plain = TrainSpec {
        checkpointing: crate::spec::Checkpointing::None,
        ..train.clone()
    };
    let terms = memory::fit_terms(model, &plain)?;
    let mut mode = lit.mode(model.family(), train.precision);
    // the per-feature weights alone, so traffic stays linear in the features the time fit uses
    // (neither measured blocks nor an activation function's own bytes, which vary among the
    // grid's models; departures' known bytes stay: no grid model has them)
    mode.activation.blocks.clear();
    mode.activation.act_fns.clear();
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
    // adapters sit on the language model: the frozen vision tower runs forward only (a third
    // of its FLOPs), which are not the blocks'
    let (vision_dense, vision_attention) = if ft.is_adapter() {
        crate::plan::vision::flops(t, train)
    } else {
        (0.0, 0.0)
    };
    let dense = if ft.is_adapter() {
        let s = crate::plan::finetune::split(model, ft);
        tokens * (4.0 * p.matmul as f64 - 2.0 * n * block_mm + 6.0 * s.trainable as f64)
            + vision_dense / 3.0
    } else {
        flops.dense - 4.0 * n * block_mm * tokens
    };
    // the frozen leading blocks' attention runs forward only (a third), as does the frozen
    // tower's
    let attention =
        (flops.attention - vision_attention) * (1.0 - 2.0 / 3.0 * n / l) + vision_attention / 3.0;
    let recompute = recompute_flops(train.checkpointing, dense, attention);
    StepFlops {
        dense,
        attention,
        recompute,
        ..flops
    }
}
