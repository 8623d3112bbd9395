//! Tensor comparisons that check the harness's gradients: fused ops against their composed
//! references, checkpointed against plain steps, ZeRO shards against full gradients.

use candle_core::{DType, Result, Tensor};

/// The largest absolute element of `t`, in fp32.
pub fn max_abs(t: &Tensor) -> Result<f32> {
    t.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()
}

/// `max |got - want| / max |want|` (the denominator floored at 1e-12), in fp32.
pub fn max_rel_err(got: &Tensor, want: &Tensor) -> Result<f32> {
    let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?;
    Ok(max_abs(&diff)? / max_abs(want)?.max(1e-12))
}
