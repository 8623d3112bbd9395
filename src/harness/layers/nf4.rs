//! A frozen QLoRA base weight (Dettmers et al. 2023) as bitsandbytes stores it: 4-bit NormalFloat
//! codes, two per byte, one absmax per block of 64 values, the absmaxes themselves quantized to
//! 8 bits with one fp32 scale per 256 of them (double quantization): 4 + 8/64 + 32/(64·256) bits
//! per parameter, `plan::finetune::NF4_BITS_PER_PARAM`. The weight is dequantized to the compute
//! dtype only for the duration of one use (forward, then again in backward), as bitsandbytes'
//! `dequantize_4bit` runs inside the layer's forward and backward, so a step holds one layer's
//! 16-bit weight at a time, never all of them.

use candle_core::{DType, Device, Result, Tensor};

/// Values per absmax block.
pub const BLOCK: usize = 64;
/// Absmax values per fp32 scale (the second quantization level).
const BLOCK2: usize = 256;

/// The 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1]; bitsandbytes' table).
const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// One quantized weight `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct Nf4 {
    /// two codes per byte (high nibble first), `rows·cols / 2` bytes
    pub codes: Tensor,
    /// each block's absmax as a fraction of its group's scale, in 1/255 steps (`u8`)
    absmax: Tensor,
    /// one fp32 scale per [`BLOCK2`] absmaxes
    scales: Tensor,
    pub shape: (usize, usize),
}

impl Nf4 {
    /// Quantizes `values` (row-major `[rows, cols]`); `rows·cols` must be a multiple of 64.
    pub fn quantize(values: &[f32], shape: (usize, usize), dev: &Device) -> anyhow::Result<Self> {
        let n = shape.0 * shape.1;
        anyhow::ensure!(
            n == values.len() && n.is_multiple_of(BLOCK),
            "an NF4 weight needs a multiple of {BLOCK} values, got {n}"
        );
        let absmax: Vec<f32> = values
            .chunks(BLOCK)
            .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let scales: Vec<f32> = absmax
            .chunks(BLOCK2)
            .map(|g| g.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(*v)))
            .collect();
        let absmax_q: Vec<u8> = absmax
            .iter()
            .enumerate()
            .map(|(i, a)| (a / scales[i / BLOCK2] * 255.0).round().clamp(1.0, 255.0) as u8)
            .collect();
        let mut codes = vec![0u8; n / 2];
        for (i, v) in values.iter().enumerate() {
            let block = i / BLOCK;
            let a = absmax_q[block] as f32 / 255.0 * scales[block / BLOCK2];
            let x = if a > 0.0 { v / a } else { 0.0 };
            let code = LEVELS
                .iter()
                .enumerate()
                .min_by(|(_, p), (_, q)| (*p - x).abs().total_cmp(&(*q - x).abs()))
                .map_or(7, |(c, _)| c) as u8;
            codes[i / 2] |= if i % 2 == 0 { code << 4 } else { code };
        }
        Ok(Self {
            codes: Tensor::from_vec(codes, n / 2, dev)?,
            absmax: Tensor::from_vec(absmax_q, n / BLOCK, dev)?,
            scales: Tensor::from_vec(scales, n.div_ceil(BLOCK * BLOCK2), dev)?,
            shape,
        })
    }

    /// Bytes held: codes, quantized absmaxes and their scales.
    pub fn bytes(&self) -> u64 {
        (self.codes.elem_count() + self.absmax.elem_count() + 4 * self.scales.elem_count()) as u64
    }

    /// The weight `[rows, cols]` in `dtype`, computed with tensor ops (CPU or CUDA): the caller
    /// holds it only as long as one use needs it.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let dev = self.codes.device();
        let n = self.shape.0 * self.shape.1;
        let bytes = self.codes.to_dtype(DType::F32)?;
        let hi = (&bytes / 16.0)?.floor()?;
        let lo = (&bytes - (&hi * 16.0)?)?;
        let ids = Tensor::stack(&[&hi, &lo], 1)?
            .flatten_all()?
            .to_dtype(DType::U32)?;
        drop((bytes, hi, lo));
        let levels = Tensor::new(&LEVELS, dev)?.index_select(&ids, 0)?;
        drop(ids);
        let blocks = n / BLOCK;
        let group_scale = self
            .scales
            .reshape((self.scales.elem_count(), 1))?
            .broadcast_as((self.scales.elem_count(), BLOCK2))?
            .flatten_all()?
            .narrow(0, 0, blocks)?;
        let absmax = ((self.absmax.to_dtype(DType::F32)? / 255.0)? * group_scale)?;
        levels
            .reshape((blocks, BLOCK))?
            .broadcast_mul(&absmax.reshape((blocks, 1))?)?
            .reshape(self.shape)?
            .to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NF4 with double-quantized absmaxes reproduces a normal weight to within half a level
    /// step of each block's absmax, and takes 4.127 bits per value.
    #[test]
    fn dequantized_weight_is_close_and_small() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.02, (128, 192), &dev).unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = Nf4::quantize(&values, (128, 192), &dev).unwrap();
        let back = q.dequantize(DType::F32).unwrap();
        let err = (&back - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let absmax = w
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // the widest gap between NF4 levels is 0.30 (-1 to -0.70); half of it, plus the 8-bit
        // absmax rounding
        assert!(err < 0.16 * absmax, "max error {err} of absmax {absmax}");
        let bits = 8.0 * q.bytes() as f64 / (128.0 * 192.0);
        let planned = crate::plan::finetune::NF4_BITS_PER_PARAM;
        assert!(
            (bits - planned).abs() < 0.01,
            "{bits} bits/param, planned {planned}"
        );
    }
}
