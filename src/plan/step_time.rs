//! Step time per GPU: `t = (FLOPs / R + traffic) * (recompute ? recompute_factor : 1)
//! + S / B_state + t0`, where the traffic term (seconds per element of each activation feature,
//! or activation bytes over a bandwidth) and the optimizer's pass over the S state bytes apply
//! only with a calibrated table that measured them (see `fit::timefit`).
//!
//! `R` is the achieved FLOP/s: the calibrated `flops_per_s` when the table has one (it was measured
//! on that device), otherwise `mfu x` the GPU's datasheet peak for the precision. `--batch` is the
//! per-GPU micro-batch (as in the memory model), so each of N data-parallel GPUs processes its own
//! `batch x seq` tokens per step and the global batch is `N x batch`.

use crate::coeffs::TimeCoeffs;
use crate::plan::gpus::Gpu;
use crate::plan::time::StepFlops;
use crate::spec::{Checkpointing, Precision};
use serde::Serialize;

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
    let f = flops.total() * accum;
    // Memory-traffic terms only where a calibrated table measured them (0 = not modelled).
    let repeated = time.repeated_s(flops, rate.0) * accum;
    let once = time.once_s(flops);
    let without = repeated + once;
    let with = repeated * time.recompute_factor.value + once;
    let seconds = match checkpointing {
        Checkpointing::None => without,
        Checkpointing::Full => with,
        // one extra forward of the attention core (QK^T and AV): `StepFlops::recompute`
        Checkpointing::Selective => without + accum * flops.recompute / rate.0,
    };
    StepTime {
        flops_per_gpu: f,
        rate_flops_per_s: rate.0,
        rate_source: rate.1,
        seconds_without_recompute: without,
        seconds_with_recompute: with,
        seconds,
        communication_s: 0.0,
        communication: None,
        samples_per_s: accum * (batch * gpus) as f64 / seconds,
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
