//! Host RAM per training process, from the common capacity-planning rules of thumb:
//! `RAM >= max(batch x sample bytes x loader workers x 3, 2 x parameter bytes)` with 30 %
//! headroom for fragmentation, and the usual "RAM >= 3 x VRAM" shown separately as advice,
//! because it is a rule of thumb, not a derivation.

use crate::plan::memory::MAX_PLAN_BYTES;
use crate::spec::{ModelSpec, Precision, TrainSpec};
use serde::Serialize;

/// The usual headroom against fragmentation.
pub const HEADROOM: f64 = 0.30;
/// The loader's buffering factor: decoded, augmented and collated copies of each sample.
pub const LOADER_COPIES: u64 = 3;
/// Default loader workers (PyTorch DataLoader setups commonly use 4 per GPU).
pub const DEFAULT_WORKERS: u64 = 4;

/// Bytes of one raw training sample as the loader holds it: token ids as 4-byte integers, or an
/// 8-bit image of C x H x W; a vision-language sample has both, its images as the processor
/// hands them over (fp32 pixel values at the tower's image size). `--sample-bytes` overrides
/// it.
pub fn default_sample_bytes(model: &ModelSpec, train: &TrainSpec) -> u64 {
    match model {
        ModelSpec::Transformer(t) => match (&t.patch, &t.extras.vision) {
            (Some(p), _) => p.channels * train.image * train.image,
            (None, Some(v)) => {
                let pixels = v.channels * v.temporal_patch * v.image * v.image;
                train.seq * 4 + v.images.saturating_mul(pixels).saturating_mul(4)
            }
            (None, None) => train.seq * 4,
        },
        ModelSpec::Cnn(c) => c.in_channels * train.image * train.image,
    }
}

/// Bytes per parameter of the weights the host loads: fp32 except in pure bf16.
pub fn host_param_bytes(precision: Precision) -> u64 {
    if precision.is_pure_half() {
        2
    } else {
        4
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostRam {
    pub sample_bytes: u64,
    pub workers: u64,
    /// batch x sample bytes x workers x 3
    pub loader_bytes: u64,
    /// 2 x parameter bytes (a state dict being loaded or saved next to the live copy)
    pub params_bytes: u64,
    /// max of the two, before headroom
    pub required_bytes: u64,
    /// required x 1.3
    pub recommended_bytes: u64,
    /// 3 x the GPU memory this process drives (a rule of thumb, advice only)
    pub rule_of_thumb_bytes: u64,
    /// pinned host memory holding the states `--offload` moved off this process's GPU; added
    /// to `required_bytes` (0 without offload)
    pub offload_bytes: u64,
    /// pinned host memory holding the saved activations `--offload-activations` moved off this
    /// process's GPU; added to `required_bytes` (0 without it)
    pub offload_activation_bytes: u64,
    /// training processes (one per GPU) on one node: min(gpus, gpus per node)
    pub processes_per_node: u64,
    /// what one node needs: `recommended_bytes` x processes per node
    pub per_node_recommended_bytes: u64,
}

impl HostRam {
    /// Scales the per-process figures to a node of `gpus_per_node` GPUs running `gpus` in all.
    pub fn per_node(mut self, gpus: u64, gpus_per_node: u64) -> Self {
        self.processes_per_node = gpus.min(gpus_per_node).max(1);
        self.per_node_recommended_bytes = self
            .recommended_bytes
            .saturating_mul(self.processes_per_node);
        self
    }
}

impl HostRam {
    /// Adds the states ZeRO-Offload / ZeRO-Infinity keep in pinned host memory: they come on top
    /// of the loader and state-dict figures (pinned pages cannot be swapped or shared).
    pub fn with_offload(mut self, bytes: u64) -> Self {
        let bytes = bytes.min(MAX_PLAN_BYTES);
        self.offload_bytes = bytes;
        self.required_bytes += bytes;
        self.recommended_bytes = (self.required_bytes as f64 * (1.0 + HEADROOM)).ceil() as u64;
        self
    }

    /// Adds the saved activations activation offloading keeps in pinned host memory, on top
    /// of everything else (they are live through the step).
    pub fn with_offload_activations(mut self, bytes: u64) -> Self {
        let bytes = bytes.min(MAX_PLAN_BYTES);
        self.offload_activation_bytes = bytes;
        self.required_bytes = self
            .required_bytes
            .saturating_add(bytes)
            .min(MAX_PLAN_BYTES);
        self.recommended_bytes = (self.required_bytes as f64 * (1.0 + HEADROOM)).ceil() as u64;
        self
    }
}

/// `vram_bytes` is the GPU's capacity when known, else the estimated per-GPU total.
pub fn host_ram(
    params: u64,
    precision: Precision,
    batch: u64,
    sample_bytes: u64,
    workers: u64,
    vram_bytes: u64,
) -> HostRam {
    // Every figure is clamped at the planner's 1 EiB ceiling, so a typo-sized loader never wraps
    // into a small number and the +30 % stays representable.
    let cap = |b: u64| b.min(MAX_PLAN_BYTES);
    let loader_bytes = cap(batch
        .saturating_mul(sample_bytes)
        .saturating_mul(workers)
        .saturating_mul(LOADER_COPIES));
    let params_bytes = cap(params
        .saturating_mul(2)
        .saturating_mul(host_param_bytes(precision)));
    let required_bytes = loader_bytes.max(params_bytes);
    HostRam {
        sample_bytes,
        workers,
        loader_bytes,
        params_bytes,
        required_bytes,
        recommended_bytes: (required_bytes as f64 * (1.0 + HEADROOM)).ceil() as u64,
        rule_of_thumb_bytes: cap(vram_bytes.saturating_mul(3)),
        offload_bytes: 0,
        offload_activation_bytes: 0,
        processes_per_node: 1,
        per_node_recommended_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_k_image_batch_example() {
        // A 4K RGB image batch of 32 -> 32 x 3840 x 2160 x 3 bytes = 0.8 GB per copy.
        let sample = 3 * 3840 * 2160;
        let h = host_ram(1_000, Precision::Fp32, 32, sample, 1, 0);
        assert_eq!(h.loader_bytes, 32 * sample * 3);
        assert_eq!(h.required_bytes, h.loader_bytes);
        assert_eq!(
            h.recommended_bytes,
            (h.loader_bytes as f64 * 1.3).ceil() as u64
        );
    }

    #[test]
    fn params_dominate_for_large_models() {
        let h = host_ram(
            6_738_415_616,
            Precision::Bf16Mixed,
            1,
            4096 * 4,
            4,
            80 << 30,
        );
        assert_eq!(h.params_bytes, 2 * 4 * 6_738_415_616);
        assert_eq!(h.required_bytes, h.params_bytes);
        assert_eq!(h.rule_of_thumb_bytes, 240 << 30);
    }
}
