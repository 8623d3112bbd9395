//! The step-time model, the one formula the planner and the fit share:
//!
//! `t = (FLOPs / R + traffic) * (recompute ? recompute_factor : 1) + S / B_state + t0`
//!
//! per GPU and micro-batch, where the traffic term (seconds per element of each activation
//! feature, or activation bytes over a bandwidth) and the optimizer's pass over the S state bytes
//! apply only with a calibrated table that measured them (see `fit::timefit`, which fits R, the
//! traffic weights, B_state and t0, and the recompute factor). The inputs are a [`StepFlops`]
//! (counted by `plan::time`) and a table's [`TimeCoeffs`].
//!
//! `R` is the achieved FLOP/s: the calibrated `flops_per_s` when the table has one (it was measured
//! on that device), otherwise `mfu x` the GPU's datasheet peak for the precision. `--batch` is the
//! per-GPU micro-batch (as in the memory model), so each of N data-parallel GPUs processes its own
//! `batch x seq` tokens per step and the global batch is `N x batch`.

use crate::coeffs::TimeCoeffs;
use crate::plan::gpus::Gpu;
use crate::plan::memory::Features;
use crate::spec::{Checkpointing, Precision};
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
    pub traffic: Features,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.dense + self.attention
    }
}

/// FLOPs recompute adds: one extra forward pass (a third of forward + backward), of everything
/// under full checkpointing, of the attention core (QK^T, AV) under selective recomputation.
pub fn recompute_flops(checkpointing: Checkpointing, dense: f64, attention: f64) -> f64 {
    match checkpointing {
        Checkpointing::Full => (dense + attention) / 3.0,
        Checkpointing::Selective => attention / 3.0,
        Checkpointing::None => 0.0,
    }
}

/// Seconds of one step that scale with compute and activation traffic (what recompute
/// repeats), given the achieved FLOP/s `rate`.
pub fn repeated_s(time: &TimeCoeffs, flops: &StepFlops, rate: f64) -> f64 {
    let traffic = if time.s_per_elem.is_empty() {
        if time.act_bytes_per_s.value > 0.0 {
            flops.activation_traffic_bytes / time.act_bytes_per_s.value
        } else {
            0.0
        }
    } else {
        flops
            .traffic
            .named()
            .iter()
            .map(|(n, x)| x * time.s_per_elem.get(*n).map_or(0.0, |c| c.value))
            .sum()
    };
    flops.total() / rate + traffic
}

/// Seconds of one step that checkpointing does not repeat: the optimizer pass and t0.
pub fn once_s(time: &TimeCoeffs, flops: &StepFlops) -> f64 {
    let state = if time.state_bytes_per_s.value > 0.0 {
        flops.state_traffic_bytes / time.state_bytes_per_s.value
    } else {
        0.0
    };
    state + time.t0_s.value
}

/// The formula's three readings for `grad_accum` micro-batches: seconds without recompute, with
/// full recompute, and the one that applies to `checkpointing`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds {
    pub without_recompute: f64,
    pub with_recompute: f64,
    pub applied: f64,
}

/// The step-time formula (see the module doc) at achieved FLOP/s `rate`: the compute terms
/// repeat per micro-batch, the optimizer's pass happens once.
pub fn seconds(
    flops: &StepFlops,
    rate: f64,
    time: &TimeCoeffs,
    checkpointing: Checkpointing,
    grad_accum: u64,
) -> Seconds {
    let accum = grad_accum.max(1) as f64;
    // Memory-traffic terms only where a calibrated table measured them (0 = not modelled).
    let repeated = repeated_s(time, flops, rate) * accum;
    let once = once_s(time, flops);
    let without = repeated + once;
    let with = repeated * time.recompute_factor.value + once;
    let applied = match checkpointing {
        Checkpointing::None => without,
        Checkpointing::Full => with,
        // one extra forward of the attention core (QK^T and AV): `StepFlops::recompute`
        Checkpointing::Selective => without + accum * flops.recompute / rate,
    };
    Seconds {
        without_recompute: without,
        with_recompute: with,
        applied,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTime {
    /// training FLOPs of one step on one GPU, without recompute
    pub flops_per_gpu: f64,
    /// achieved FLOP/s used
    pub rate_flops_per_s: f64,
    /// "calibrated" (flops_per_s from the table) or "mfu x datasheet peak"
    pub rate_source: &'static str,
    pub seconds_without_recompute: f64,
    pub seconds_with_recompute: f64,
    /// the one that applies to the configuration's checkpointing mode, plus the exposed
    /// communication
    pub seconds: f64,
    /// data-parallel communication compute does not hide, seconds (in `seconds`; 0 on one GPU)
    pub communication_s: f64,
    /// the communication behind it (null on one GPU or without a GPU's link)
    pub communication: Option<crate::plan::comm::Communication>,
    /// samples per second over all data-parallel GPUs
    pub samples_per_s: f64,
    /// micro-batches per optimizer step: the compute terms repeat per micro-batch, the
    /// optimizer's pass and the communication happen once (DDP skips the all-reduce under
    /// `no_sync` until the last micro-batch)
    pub grad_accum: u64,
}

/// Achieved FLOP/s, or None when neither a calibrated rate nor a GPU is known.
pub fn rate(
    time: &TimeCoeffs,
    gpu: Option<&Gpu>,
    precision: Precision,
) -> Option<(f64, &'static str)> {
    if time.flops_per_s.value > 0.0 {
        return Some((time.flops_per_s.value, "calibrated flops_per_s"));
    }
    gpu.map(|g| {
        (
            time.mfu.value * g.peak_flops(precision),
            "mfu x datasheet peak",
        )
    })
}

/// Step time of one GPU given its step FLOPs (per-GPU batch), the achieved rate, and N GPUs.
pub fn step_time(
    flops: &StepFlops,
    rate: (f64, &'static str),
    time: &TimeCoeffs,
    checkpointing: Checkpointing,
    batch: u64,
    gpus: u64,
    grad_accum: u64,
) -> StepTime {
    let accum = grad_accum.max(1) as f64;
    let t = seconds(flops, rate.0, time, checkpointing, grad_accum);
    StepTime {
        flops_per_gpu: flops.total() * accum,
        rate_flops_per_s: rate.0,
        rate_source: rate.1,
        seconds_without_recompute: t.without_recompute,
        seconds_with_recompute: t.with_recompute,
        seconds: t.applied,
        communication_s: 0.0,
        communication: None,
        samples_per_s: accum * (batch * gpus) as f64 / t.applied,
        grad_accum: grad_accum.max(1),
    }
}

impl StepTime {
    /// Adds the exposed part of `comm` to the step (see [`crate::plan::comm`]).
    pub fn with_communication(
        mut self,
        comm: Option<crate::plan::comm::Communication>,
        batch: u64,
        gpus: u64,
    ) -> Self {
        if let Some(c) = comm {
            self.communication_s = c.exposed_s;
            self.seconds += c.exposed_s;
            self.samples_per_s = (self.grad_accum * batch * gpus) as f64 / self.seconds;
            self.communication = Some(c);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coeffs::Coefficients;
    use crate::plan::gpus::find;
    use crate::spec::Family;

    #[test]
    fn literature_rate_is_mfu_times_peak() {
        let c = Coefficients::literature().mode(Family::Transformer, Precision::Bf16Mixed);
        let h100 = find("h100").unwrap();
        let r = rate(&c.time, Some(h100), Precision::Bf16Mixed).unwrap();
        assert_eq!(r.0, 0.4 * 989e12);
        let flops = StepFlops {
            dense: 3.0e15,
            attention: 1.0e15,
            recompute: 0.0,
            activation_traffic_bytes: 1.0e12,
            state_traffic_bytes: 1.0e11,
            traffic: Default::default(),
        };
        let t = step_time(&flops, r, &c.time, Checkpointing::Full, 8, 4, 1);
        assert!((t.seconds_without_recompute - 4.0e15 / (0.4 * 989e12)).abs() < 1e-9);
        assert!((t.seconds_with_recompute / t.seconds_without_recompute - 4.0 / 3.0).abs() < 1e-12);
        assert_eq!(t.seconds, t.seconds_with_recompute);
        assert!((t.samples_per_s - 32.0 / t.seconds).abs() < 1e-9);
        assert!(rate(&c.time, None, Precision::Fp32).is_none());
    }
}
