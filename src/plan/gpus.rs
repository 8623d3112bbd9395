//! GPU catalog (datasheet figures) and GPU choice: for a job, per GPU type, the fewest GPUs that
//! hold it, with which ZeRO stage and checkpointing mode.
//!
//! Memory is the total the driver reports (`nvidia-smi`, MiB), not the marketing "GB", because a
//! plan that fits 80 "GB" but not 81,559 MiB is a plan that OOMs. Compute peaks are dense (no 2:4
//! sparsity). `fp32_tflops` is the non-tensor-core FP32 peak: candle and PyTorch both default to
//! full-precision fp32 GEMMs (TF32 off), so fp32 training runs at that rate; TF32 is listed for reference.

use crate::error::input_err;
use serde::Serialize;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    /// short name accepted by `--gpu`
    pub id: &'static str,
    pub name: &'static str,
    /// total device memory as reported by the driver, bytes
    pub memory_bytes: u64,
    /// dense BF16/FP16 tensor-core peak with FP32 accumulate, TFLOP/s
    pub bf16_tflops: f64,
    /// dense TF32 tensor-core peak, TFLOP/s
    pub tf32_tflops: f64,
    /// FP32 (CUDA cores) peak, TFLOP/s
    pub fp32_tflops: f64,
    /// memory bandwidth, GB/s (1e9)
    pub bandwidth_gbs: f64,
    pub interconnect: &'static str,
    /// datasheet the figures come from
    pub source: &'static str,
}

/// The catalog, smallest memory first (so the choice table reads from cheap to large cards).
pub const CATALOG: &[Gpu] = &[
    // NVIDIA Ada Lovelace architecture whitepaper v2.1, appendix table 2 (GeForce RTX 4090):
    // 165.2 dense FP16/BF16 tensor TFLOPS with FP32 accumulate, 82.6 TF32, 82.6 FP32, 1008 GB/s.
    Gpu {
        id: "rtx4090",
        name: "GeForce RTX 4090 24GB",
        memory_bytes: 24_564 * MIB,
        bf16_tflops: 165.2,
        tf32_tflops: 82.6,
        fp32_tflops: 82.6,
        bandwidth_gbs: 1008.0,
        interconnect: "PCIe 4.0 x16 (32 GB/s per direction), no NVLink",
        source: "NVIDIA Ada Lovelace architecture whitepaper v2.1, table 2",
    },
    // NVIDIA L40S product brief / datasheet: 362.05 BF16 dense (733 sparse), 183 TF32 dense,
    // 91.6 FP32, 48 GB GDDR6 at 864 GB/s.
    Gpu {
        id: "l40s",
        name: "L40S 48GB",
        memory_bytes: 46_068 * MIB,
        bf16_tflops: 362.05,
        tf32_tflops: 183.0,
        fp32_tflops: 91.6,
        bandwidth_gbs: 864.0,
        interconnect: "PCIe 4.0 x16 (32 GB/s per direction), no NVLink",
        source: "NVIDIA L40S datasheet",
    },
    // NVIDIA A100 Tensor Core GPU datasheet (SXM): 312 BF16, 156 TF32, 19.5 FP32;
    // 40GB HBM2 at 1555 GB/s; NVLink 3 600 GB/s.
    Gpu {
        id: "a100-40gb",
        name: "A100 40GB SXM",
        memory_bytes: 40_960 * MIB,
        bf16_tflops: 312.0,
        tf32_tflops: 156.0,
        fp32_tflops: 19.5,
        bandwidth_gbs: 1555.0,
        interconnect: "NVLink 3, 600 GB/s",
        source: "NVIDIA A100 datasheet",
    },
    // Same datasheet, 80GB HBM2e SXM at 2039 GB/s.
    Gpu {
        id: "a100-80gb",
        name: "A100 80GB SXM",
        memory_bytes: 81_920 * MIB,
        bf16_tflops: 312.0,
        tf32_tflops: 156.0,
        fp32_tflops: 19.5,
        bandwidth_gbs: 2039.0,
        interconnect: "NVLink 3, 600 GB/s",
        source: "NVIDIA A100 datasheet",
    },
    // NVIDIA H100 datasheet (SXM5): 989 BF16 dense (1979 sparse), 495 TF32 dense, 67 FP32;
    // 80GB HBM3 at 3.35 TB/s; NVLink 4 900 GB/s.
    Gpu {
        id: "h100",
        name: "H100 80GB SXM",
        memory_bytes: 81_559 * MIB,
        bf16_tflops: 989.0,
        tf32_tflops: 495.0,
        fp32_tflops: 67.0,
        bandwidth_gbs: 3350.0,
        interconnect: "NVLink 4, 900 GB/s",
        source: "NVIDIA H100 datasheet",
    },
    // NVIDIA H200 datasheet (SXM): H100 compute, 141GB HBM3e at 4.8 TB/s; NVLink 4 900 GB/s.
    Gpu {
        id: "h200",
        name: "H200 141GB SXM",
        memory_bytes: 143_771 * MIB,
        bf16_tflops: 989.0,
        tf32_tflops: 495.0,
        fp32_tflops: 67.0,
        bandwidth_gbs: 4800.0,
        interconnect: "NVLink 4, 900 GB/s",
        source: "NVIDIA H200 datasheet",
    },
    // NVIDIA HGX B200 datasheet, per GPU: 2.25 PFLOPS BF16 dense (4.5 sparse), 1.1 PFLOPS TF32
    // dense, 75 TFLOPS FP32; 180GB usable HBM3e (192GB physical) at 8 TB/s; NVLink 5 1.8 TB/s.
    Gpu {
        id: "b200",
        name: "B200 192GB SXM",
        memory_bytes: 183_359 * MIB,
        bf16_tflops: 2250.0,
        tf32_tflops: 1100.0,
        fp32_tflops: 75.0,
        bandwidth_gbs: 8000.0,
        interconnect: "NVLink 5, 1800 GB/s",
        source: "NVIDIA HGX B200 datasheet",
    },
];

impl Gpu {
    /// Datasheet peak for a precision's compute dtype, FLOP/s: fp32 runs on CUDA cores (TF32
    /// off by default in candle and PyTorch), every 16-bit mode on BF16/FP16 tensor cores.
    pub fn peak_flops(&self, precision: crate::spec::Precision) -> f64 {
        if precision.compute_bytes() == 4 {
            self.fp32_tflops * 1e12
        } else {
            self.bf16_tflops * 1e12
        }
    }
}

/// Looks a GPU up by id or a common spelling ("H100", "a100-80", "RTX 4090", "4090").
pub fn find(name: &str) -> anyhow::Result<&'static Gpu> {
    let key: String = name
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let key = key
        .trim_start_matches("nvidia")
        .trim_start_matches("geforce");
    let id = match key {
        "rtx4090" | "4090" => "rtx4090",
        "l40s" | "l40s48gb" => "l40s",
        "a10040gb" | "a10040" => "a100-40gb",
        "a100" | "a10080gb" | "a10080" => "a100-80gb",
        "h100" | "h10080gb" | "h100sxm" | "h10080" => "h100",
        "h200" | "h200141gb" | "h200141" => "h200",
        "b200" | "b200192gb" => "b200",
        _ => {
            let ids: Vec<&str> = CATALOG.iter().map(|g| g.id).collect();
            return input_err(
                "gpu",
                format!(
                    "'{name}' is not in the catalog; accepted {}",
                    ids.join(", ")
                ),
            );
        }
    };
    Ok(CATALOG
        .iter()
        .find(|g| g.id == id)
        .expect("every alias maps to a catalog id"))
}

/// Largest data-parallel group the choice considers.
pub const MAX_CHOICE_GPUS: u64 = 4096;

/// One way to run the job on a GPU type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub gpus: u64,
    pub zero_stage: u8,
    pub checkpointing: bool,
}

/// Fewest GPUs of one type that hold the job: search every (ZeRO stage, checkpointing) pair for its
/// smallest N (per-GPU memory is non-increasing in N, so a binary search over 1..=4096 suffices),
/// then prefer fewer GPUs, then a lower stage (less communication), then no checkpointing (no
/// recompute). `total(layout)` returns the per-GPU bytes, or None when the layout is not modelled.
pub fn choose(capacity: u64, mut total: impl FnMut(Layout) -> Option<u64>) -> Option<Layout> {
    let mut best: Option<Layout> = None;
    for zero_stage in 0..=3u8 {
        for checkpointing in [false, true] {
            let fits = |n: u64, total: &mut dyn FnMut(Layout) -> Option<u64>| {
                total(Layout {
                    gpus: n,
                    zero_stage,
                    checkpointing,
                })
                .is_some_and(|b| b <= capacity)
            };
            // Stage 0 replicates everything: more GPUs never lower per-GPU memory.
            let hi = if zero_stage == 0 { 1 } else { MAX_CHOICE_GPUS };
            if !fits(hi, &mut total) {
                continue;
            }
            let (mut lo, mut hi) = (0u64, hi); // invariant: lo does not fit (or is 0), hi fits
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if fits(mid, &mut total) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            let cand = Layout {
                gpus: hi,
                zero_stage,
                checkpointing,
            };
            let key = |l: &Layout| (l.gpus, l.zero_stage, l.checkpointing);
            if best.is_none_or(|b| key(&cand) < key(&b)) {
                best = Some(cand);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve() {
        assert_eq!(find("H100").unwrap().id, "h100");
        assert_eq!(find("nvidia a100-40gb").unwrap().id, "a100-40gb");
        assert_eq!(find("RTX 4090").unwrap().id, "rtx4090");
        assert!(find("v100").is_err());
    }

    #[test]
    fn choice_prefers_fewest_then_lowest_stage() {
        // Memory that halves per doubling of N from stage 1 on; checkpointing saves 10.
        let total = |l: Layout| {
            let base = if l.zero_stage == 0 {
                100
            } else {
                100 / l.gpus + 20
            };
            Some(base - if l.checkpointing { 10 } else { 0 })
        };
        assert_eq!(
            choose(100, total),
            Some(Layout {
                gpus: 1,
                zero_stage: 0,
                checkpointing: false
            })
        );
        assert_eq!(
            choose(90, total),
            Some(Layout {
                gpus: 1,
                zero_stage: 0,
                checkpointing: true
            })
        );
        // 100/N + 20 - 10 <= 40 needs N >= 4 with checkpointing; without it N >= 5.
        assert_eq!(
            choose(40, total),
            Some(Layout {
                gpus: 4,
                zero_stage: 1,
                checkpointing: true
            })
        );
        assert_eq!(choose(5, total), None);
    }
}
