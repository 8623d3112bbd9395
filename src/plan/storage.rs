//! Storage, from the common capacity-planning rules of thumb: model files at each precision,
//! checkpoint size, and `total = raw data + preprocessing cache + checkpoints x kept`.

use crate::plan::memory::{state_bytes, MAX_PLAN_BYTES};
use crate::spec::TrainSpec;
use serde::Serialize;

/// Checkpoints kept by default: the last 3 (enough to step back past a corrupt or diverged save;
/// older ones are deleted as new ones land), the policy the output names.
pub const DEFAULT_KEPT: u64 = 3;
/// Preprocessing cache as a fraction of the raw data: a decoded/tokenised copy of the same size.
pub const DEFAULT_CACHE_FRACTION: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelFiles {
    pub fp32: u64,
    pub fp16: u64,
    pub int8: u64,
    /// two weights per byte, rounded up (quantisation scales not counted)
    pub int4: u64,
}

pub fn model_files(params: u64) -> ModelFiles {
    ModelFiles {
        fp32: 4 * params,
        fp16: 2 * params,
        int8: params,
        int4: params.div_ceil(2),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Storage {
    pub model_file: ModelFiles,
    /// unsharded weights (master precision) + optimizer states: what a resumable save writes
    pub checkpoint_bytes: u64,
    pub checkpoints_kept: u64,
    pub raw_data_bytes: u64,
    pub cache_bytes: u64,
    pub total_bytes: u64,
}

/// `raw_data_bytes` is the dataset on disk (0 when not given), `cache_fraction` the preprocessing
/// cache relative to it, `kept` the checkpoints retained.
pub fn storage(
    params: u64,
    train: &TrainSpec,
    raw_data_bytes: u64,
    cache_fraction: f64,
    kept: u64,
) -> Storage {
    // A checkpoint holds the full states regardless of ZeRO sharding; the half-precision compute
    // copy of mixed precision is transient and never saved.
    let full = TrainSpec {
        zero_stage: 0,
        gpus: 1,
        ..train.clone()
    };
    let s = state_bytes(params, &full);
    // Each part is clamped at the planner's 1 EiB ceiling, so the total is their exact sum and
    // never wraps (three parts of at most 2^60 bytes each).
    let cap = |b: f64| (b.round() as u64).min(MAX_PLAN_BYTES);
    let checkpoint_bytes = cap(s.weights + s.optimizer);
    let cache_bytes = cap(raw_data_bytes as f64 * cache_fraction);
    let raw_data_bytes = raw_data_bytes.min(MAX_PLAN_BYTES);
    Storage {
        model_file: model_files(params),
        checkpoint_bytes,
        checkpoints_kept: kept,
        raw_data_bytes,
        cache_bytes,
        total_bytes: raw_data_bytes
            + cache_bytes
            + checkpoint_bytes.saturating_mul(kept).min(MAX_PLAN_BYTES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Optimizer, Precision};

    #[test]
    fn model_files_of_a_175b_model() {
        // 175B params -> fp32 about 700 GB, int8 about 175 GB.
        let f = model_files(175_000_000_000);
        assert_eq!(f.fp32, 700_000_000_000);
        assert_eq!(f.int8, 175_000_000_000);
        assert_eq!(model_files(7).int4, 4);
    }

    #[test]
    fn checkpoint_is_weights_plus_optimizer() {
        let p = 1_000_000;
        let train = TrainSpec {
            precision: Precision::Fp32,
            optimizer: Optimizer::AdamW,
            zero_stage: 3,
            gpus: 8,
            ..TrainSpec::default()
        };
        let s = storage(p, &train, 1_000, 0.5, 3);
        assert_eq!(s.checkpoint_bytes, 12 * p);
        assert_eq!(s.total_bytes, 1_000 + 500 + 36 * p);
        let bf16 = TrainSpec {
            precision: Precision::Bf16,
            ..train
        };
        // true bf16: 2P weights + 4P bf16 Adam moments, no master copy
        assert_eq!(storage(p, &bf16, 0, 1.0, 1).checkpoint_bytes, 6 * p);
    }
}
