//! Data-parallel communication in the step time: how many bytes each GPU sends per optimizer
//! step, over which link, and how much of it backward (or ZeRO-3's prefetch) cannot hide.
//!
//! Volume per GPU, ring collectives over N GPUs (NCCL; the "bus bandwidth" convention of
//! nccl-tests' PERFORMANCE.md: an all-reduce moves 2·(N−1)/N of the buffer per GPU, a
//! reduce-scatter or an all-gather (N−1)/N):
//! - ZeRO 0 (PyTorch DDP): all-reduce of the gradients, 2·(N−1)/N · G;
//! - ZeRO 1 and 2: reduce-scatter of the gradients plus all-gather of the updated weights,
//!   (N−1)/N · (G + W), the same 2Ψ as DDP (Rajbhandari et al. 2020, ZeRO, sec. 7.2);
//! - ZeRO 3: the weights all-gathered in forward and again in backward plus the gradient
//!   reduce-scatter, (N−1)/N · (2W + G), 1.5x DDP's volume (ZeRO sec. 7.2.2).
//!
//! G and W are the gradient and weight bytes that travel: fp32 gradients for fp32 and autocast
//! DDP (PyTorch all-reduces `param.grad`, fp32 under autocast), 16-bit under true bf16 and under
//! ZeRO's mixed-precision layout (DeepSpeed communicates fp16/bf16 gradients and weights).
//!
//! Bandwidth: the GPU's link per direction (NVLink, Infinity Fabric or PCIe, from the catalog)
//! within a node; past `gpus_per_node` a ring crosses the network, so the slower of the link and
//! the per-GPU network share (`network_gbps`, Gb/s per GPU) sets the pace. NCCL reaches about
//! [`BUS_EFFICIENCY`] of the link's nominal bandwidth in large all-reduces.
//!
//! Overlap: DDP buckets gradients (25 MiB by default) and all-reduces each bucket while backward
//! computes the rest (Li et al. 2020, "PyTorch Distributed", VLDB), and ZeRO 1/2 reduce-scatter
//! the same way; so communication hides behind backward's compute (about 2/3 of the step's
//! FLOPs) and only the excess is exposed, never less than the last bucket, which has nothing
//! left to overlap with. ZeRO 3 prefetches the next block's weights during forward and backward,
//! so its window is the whole compute time.

use crate::plan::gpus::Gpu;
use crate::spec::{Precision, TrainSpec};
use serde::Serialize;

/// Fraction of a link's nominal per-direction bandwidth NCCL's ring collectives reach on large
/// buffers (nccl-tests bus bandwidth on NVLink/PCIe systems is typically 70-90 % of nominal).
pub const BUS_EFFICIENCY: f64 = 0.8;
/// PyTorch DDP's default gradient bucket (`bucket_cap_mb=25`): the part sent after backward ends.
pub const LAST_BUCKET_BYTES: f64 = 25.0 * (1u64 << 20) as f64;
/// GPUs per node when not told (HGX / DGX boards carry 8).
pub const DEFAULT_GPUS_PER_NODE: u64 = 8;
/// Network bandwidth per GPU when not told, Gb/s (one 400G InfiniBand / RoCE NIC per GPU).
pub const DEFAULT_NETWORK_GBPS: f64 = 400.0;

/// Where the job's GPUs sit and how they are connected beyond one node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cluster {
    pub gpus_per_node: u64,
    /// network bandwidth per GPU between nodes, Gb/s
    pub network_gbps: f64,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            gpus_per_node: DEFAULT_GPUS_PER_NODE,
            network_gbps: DEFAULT_NETWORK_GBPS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Communication {
    /// bytes each GPU sends per optimizer step
    pub bytes_per_gpu: f64,
    /// effective bandwidth used, bytes/s (link or network share, times the bus efficiency)
    pub bandwidth_bytes_per_s: f64,
    /// the GPU's intra-node link ("NVLink 4, 900 GB/s") or "inter-node network"
    pub over: &'static str,
    /// time the transfers take, seconds
    pub total_s: f64,
    /// the part compute cannot hide, seconds (included in the step time)
    pub exposed_s: f64,
}

/// Bytes per element of what travels: (gradients, weights).
fn wire_bytes(precision: Precision, zero_stage: u8) -> (f64, f64) {
    match precision {
        Precision::Fp32 => (4.0, 4.0),
        p if zero_stage > 0 || p.is_pure_half() => (2.0, 2.0),
        // autocast DDP: fp32 gradients all-reduced; ZeRO 1/2 gather fp32 weights
        _ => (4.0, 4.0),
    }
}

/// Communication of one optimizer step on each of `train.gpus` GPUs, given the step's compute
/// seconds; None with one GPU or no GPU to read a link from.
pub fn communication(
    params: u64,
    train: &TrainSpec,
    gpu: Option<&Gpu>,
    cluster: &Cluster,
    compute_s: f64,
) -> Option<Communication> {
    let n = train.gpus;
    let gpu = gpu?;
    if n <= 1 {
        return None;
    }
    let (g_b, w_b) = wire_bytes(train.precision, train.zero_stage);
    let p = params as f64;
    let frac = (n - 1) as f64 / n as f64;
    let bytes = match train.zero_stage {
        0 => 2.0 * frac * p * g_b,
        1 | 2 => frac * p * (g_b + w_b),
        _ => frac * p * (g_b + 2.0 * w_b),
    };
    let link = gpu.link_gbs * 1e9;
    let network = cluster.network_gbps * 1e9 / 8.0;
    let (bw, over) = if n > cluster.gpus_per_node && network < link {
        (network, "inter-node network")
    } else {
        (link, gpu.interconnect)
    };
    let bw = bw * BUS_EFFICIENCY;
    let total_s = bytes / bw;
    let window = if train.zero_stage >= 3 {
        compute_s
    } else {
        compute_s * 2.0 / 3.0
    };
    let exposed_s = (total_s - window).max(LAST_BUCKET_BYTES.min(bytes) / bw);
    Some(Communication {
        bytes_per_gpu: bytes,
        bandwidth_bytes_per_s: bw,
        over,
        total_s,
        exposed_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::gpus::find;

    fn train(gpus: u64, zero: u8, precision: Precision) -> TrainSpec {
        TrainSpec {
            gpus,
            zero_stage: zero,
            precision,
            ..TrainSpec::default()
        }
    }

    #[test]
    fn volumes_follow_the_zero_paper() {
        let h100 = find("h100").unwrap();
        let c = Cluster::default();
        let p = 7_000_000_000;
        let v = |z| {
            communication(p, &train(8, z, Precision::Bf16Mixed), Some(h100), &c, 1.0)
                .unwrap()
                .bytes_per_gpu
        };
        let frac = 7.0 / 8.0;
        // DDP under autocast: fp32 gradients all-reduced
        assert_eq!(v(0), 2.0 * frac * 7e9 * 4.0);
        // ZeRO 1/2: 16-bit gradients reduce-scattered and weights gathered: 2Ψ 16-bit
        assert_eq!(v(2), frac * 7e9 * 4.0);
        // ZeRO 3: 1.5x ZeRO 2
        assert_eq!(v(3), 1.5 * v(2));
        assert!(communication(p, &train(1, 0, Precision::Fp32), Some(h100), &c, 1.0).is_none());
    }

    #[test]
    fn pcie_and_the_network_expose_what_nvlink_hides() {
        let p = 7_000_000_000;
        let c = Cluster::default();
        let t = train(8, 2, Precision::Bf16Mixed);
        let nv = communication(p, &t, Some(find("h100").unwrap()), &c, 0.5).unwrap();
        let pcie = communication(p, &t, Some(find("rtx4090").unwrap()), &c, 0.5).unwrap();
        assert!(pcie.total_s > 10.0 * nv.total_s);
        assert!(pcie.exposed_s > 0.5, "{pcie:?}");
        // past one node the 400 Gb/s network (50 GB/s) is slower than NVLink
        let t64 = train(64, 2, Precision::Bf16Mixed);
        let across = communication(p, &t64, Some(find("h100").unwrap()), &c, 0.5).unwrap();
        assert_eq!(across.over, "inter-node network");
        assert!(across.total_s > nv.total_s);
        // exposure never drops below the last gradient bucket
        assert!(nv.exposed_s >= LAST_BUCKET_BYTES / nv.bandwidth_bytes_per_s);
    }
}
