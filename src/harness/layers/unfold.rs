//! PyTorch's `slow_conv2d` (ATen `ConvolutionMM2d.cpp`): a convolution lowered to one GEMM per
//! image over the unfolded input of the whole batch, with the same buffers.
//!
//! Why: PyTorch on a CPU runs a convolution through oneDNN's direct kernels only for the dtypes
//! oneDNN takes there. fp16 needs AVX512-FP16 or AMX-FP16 (`mkldnn_fp16_device_check`), which
//! AMD's CPUs and Intel's before Sapphire Rapids lack; there fp16 convolutions fall back to
//! `slow_conv2d`, which unfolds the whole batch's input (`compute_columns2d`,
//! `[b, c_in·k_h·k_w, out_h·out_w]`) in the forward and again for the weight gradient. Measured
//! with the live-heap shim on an AMD EPYC (PyTorch 2.15): a 7x7 stride-2 stem on 8 images of
//! 64 px rises by exactly its output plus those columns (2.41 MB) in the forward and by the
//! columns in the backward; in fp32 (oneDNN) by about a tenth of that. On tiny ResNets those
//! columns are most of the step's rise, so a harness without them read 0.53-0.94 of PyTorch's
//! fp16 peaks.
//!
//! Only the buffers matter here, so the lowering is PyTorch's: columns for the whole batch, then
//! one GEMM per image writing the output (forward) or accumulating into the weight gradient in
//! place (`addmm_`, no per-image temporaries). A 1x1 stride-1 unpadded convolution needs no
//! columns (PyTorch multiplies the input as it is) and keeps candle's kernel.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor,
    WithDType,
};
use rayon::prelude::*;
use std::sync::OnceLock;

/// How PyTorch lowers a convolution on a device for a dtype, which decides what it allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvLowering {
    /// direct kernels (oneDNN on a CPU, cuDNN on CUDA): small tiles, no whole-batch buffer
    Direct,
    /// `slow_conv2d`: the whole batch's unfolded input alive during the forward GEMMs and again
    /// during the weight-gradient GEMMs
    Unfolded,
}

/// The lowering PyTorch picks for a convolution in `dtype` on `device`. CUDA: cuDNN. CPU: oneDNN
/// for fp32 and bf16 (bf16 needs AVX-512 BW/VL/DQ, which every CPU with a bf16 training story
/// has; a bf16 step on an older CPU is not modelled: candle has no bf16 GEMM to unfold with), and
/// for fp16 only where the CPU has AVX512-FP16 or AMX-FP16 (Arm: fp16 arithmetic).
pub fn lowering(device: &Device, dtype: DType) -> ConvLowering {
    if device.is_cpu() && dtype == DType::F16 && !cpu_has_fp16_convolution() {
        ConvLowering::Unfolded
    } else {
        ConvLowering::Direct
    }
}

/// Whether this CPU has the fp16 instructions PyTorch's `mkldnn_fp16_device_check` asks for
/// before it hands fp16 convolutions to oneDNN (x86: AVX512-FP16 or AMX-FP16; Arm: fp16
/// arithmetic, for builds with oneDNN's Arm backend).
fn cpu_has_fp16_convolution() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // AMX-FP16 has no stable runtime detection; Linux lists it in /proc/cpuinfo
            std::arch::is_x86_feature_detected!("avx512fp16")
                || std::fs::read_to_string("/proc/cpuinfo")
                    .map(|s| s.split_whitespace().any(|f| f == "amx_fp16"))
                    .unwrap_or(false)
        }
        // PyTorch's Arm check (`mkldnn_fp16_device_check_arm`): fp16 arithmetic
        #[cfg(target_arch = "aarch64")]
        {
            std::arch::is_aarch64_feature_detected!("fp16")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    })
}

/// Whether a convolution with this kernel, stride and padding unfolds its input at all.
pub fn needs_columns(k_h: usize, k_w: usize, stride: usize, padding: usize) -> bool {
    !(k_h == 1 && k_w == 1 && stride == 1 && padding == 0)
}

/// The geometry of one convolution, from the input's and the weight's shapes.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    in_h: usize,
    in_w: usize,
    k_h: usize,
    k_w: usize,
    out_h: usize,
    out_w: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn new(x: &Shape, k_h: usize, k_w: usize, stride: usize, padding: usize) -> Result<Self> {
        let (batch, c_in, in_h, in_w) = x.dims4()?;
        if [batch, c_in, in_h, in_w, k_h, k_w, stride].contains(&0) {
            candle_core::bail!("unfolded conv2d: an empty input, kernel or stride ({x:?})");
        }
        let out = |n: usize, k: usize| {
            (n + 2 * padding)
                .checked_sub(k)
                .map(|r| r / stride + 1)
                .ok_or_else(|| candle_core::Error::Msg("convolution kernel exceeds input".into()))
        };
        Ok(Self {
            batch,
            c_in,
            in_h,
            in_w,
            k_h,
            k_w,
            out_h: out(in_h, k_h)?,
            out_w: out(in_w, k_w)?,
            stride,
            padding,
        })
    }
    /// Refuses a weight `[c_out, c_in', ...]` or an output gradient `[b', c_out', out_h', out_w']`
    /// that does not fit this geometry (the GEMMs read raw memory).
    fn check(&self, w: Option<&Shape>, g: Option<(&Shape, usize)>) -> Result<()> {
        if let Some(w) = w {
            let (_, c_in, k_h, k_w) = w.dims4()?;
            if (c_in, k_h, k_w) != (self.c_in, self.k_h, self.k_w) {
                candle_core::bail!("unfolded conv2d: weight {w:?} against {self:?}");
            }
        }
        if let Some((g, c_out)) = g {
            if g.dims4()? != (self.batch, c_out, self.out_h, self.out_w) {
                candle_core::bail!("unfolded conv2d: output gradient {g:?} against {self:?}");
            }
        }
        Ok(())
    }

    /// rows of one image's columns: `c_in·k_h·k_w`
    fn rows(&self) -> usize {
        self.c_in * self.k_h * self.k_w
    }
    /// output positions of one image: `out_h·out_w`
    fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    /// The whole batch's columns `[b, c_in·k_h·k_w, out_h·out_w]` of a contiguous NCHW input,
    /// zero where the kernel reads padding (ATen's `unfolded2d_copy`).
    fn unfold<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (rows, positions) = (self.rows(), self.positions());
        let image = self.c_in * self.in_h * self.in_w;
        let mut cols = vec![T::zero(); self.batch * rows * positions];
        cols.par_chunks_mut(rows * positions)
            .zip(x.par_chunks(image))
            .for_each(|(col, img)| {
                for (row, dst) in col.chunks_mut(positions).enumerate() {
                    let plane = self.plane(row);
                    self.taps(row, |pos, pixel| dst[pos] = img[plane + pixel]);
                }
            });
        cols
    }

    /// Adds one image's columns back onto its input-shaped gradient `img` (ATen's
    /// `unfolded2d_acc`, the transpose of [`Geometry::unfold`]).
    fn fold_into<T: WithDType>(&self, col: &[T], img: &mut [T]) {
        for (row, src) in col.chunks(self.positions()).enumerate() {
            let plane = self.plane(row);
            self.taps(row, |pos, pixel| img[plane + pixel] += src[pos]);
        }
    }

    /// Offset of the input channel that columns row `row` reads, within one image.
    fn plane(&self, row: usize) -> usize {
        row / (self.k_h * self.k_w) * self.in_h * self.in_w
    }

    /// Every output position of columns row `row` (one channel and kernel tap) that reads a
    /// pixel inside the image, as `(position, pixel within the channel's plane)`; the others
    /// read padding (zero).
    fn taps(&self, row: usize, mut f: impl FnMut(usize, usize)) {
        let ky = row / self.k_w % self.k_h;
        let kx = row % self.k_w;
        let inside = |o: usize, k: usize, n: usize| {
            (o * self.stride + k)
                .checked_sub(self.padding)
                .filter(|&i| i < n)
        };
        for oy in 0..self.out_h {
            let Some(iy) = inside(oy, ky, self.in_h) else {
                continue;
            };
            for ox in 0..self.out_w {
                if let Some(ix) = inside(ox, kx, self.in_w) {
                    f(oy * self.out_w + ox, iy * self.in_w + ix);
                }
            }
        }
    }
}

/// Most elements of the columns one GEMM call reads: 16 Ki, 64 KB once the gemm crate has
/// packed them as f32. The crate packs a call's whole right-hand side panel into a fresh
/// buffer (in f32 for fp16), which for one image's columns of a 7x7 stem at 64 px was 0.6 MB of
/// transient no PyTorch kernel allocates (its GEMMs pack into small per-thread blocks).
const GEMM_TILE: usize = 1 << 14;

/// A matrix inside a buffer: its first element and the strides between rows and columns.
struct View<T> {
    ptr: *const T,
    row_stride: usize,
    col_stride: usize,
}

impl<T> View<T> {
    /// Rows `row_stride` apart, columns adjacent.
    fn rows(ptr: *const T, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride,
            col_stride: 1,
        }
    }
    /// The transpose of a matrix stored with rows `row_stride` apart.
    fn transposed(ptr: *const T, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: row_stride,
        }
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) · rhs (k x n)`, `dst` rows `dst_row_stride` apart.
///
/// # Safety
/// Each view addresses a matrix of its size inside one allocation.
unsafe fn gemm_into<T: WithDType>(
    dst: *mut T,
    dst_row_stride: usize,
    lhs: View<T>,
    rhs: View<T>,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.ptr,
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `dst [rows, positions] = wᵀ · g` in f32, for `w` `[c_out, rows]` and `g`
/// `[c_out, positions]` in any dtype, each operand widened a tile at a time.
fn transposed_weight_times<T: WithDType>(
    dst: &mut [f32],
    w: &[T],
    g: &[T],
    (c_out, rows, positions): (usize, usize, usize),
) {
    // either operand tile holds c_out x tile elements
    let tile = positions_per_call(c_out);
    let (row_tile, pos_tile) = (tile, tile);
    for p0 in (0..positions).step_by(pos_tile) {
        let n = pos_tile.min(positions - p0);
        let rhs: Vec<f32> = (0..c_out)
            .flat_map(|o| {
                g[o * positions + p0..][..n]
                    .iter()
                    .map(|v| v.to_f64() as f32)
            })
            .collect();
        for r0 in (0..rows).step_by(row_tile) {
            let m = row_tile.min(rows - r0);
            let lhs: Vec<f32> = (0..m)
                .flat_map(|i| (0..c_out).map(move |o| w[o * rows + r0 + i].to_f64() as f32))
                .collect();
            // SAFETY: `dst` is `rows x positions`; rows r0..r0+m and columns p0..p0+n lie
            // inside it; `lhs` is `m x c_out`, `rhs` `c_out x n`, both contiguous
            unsafe {
                gemm_into(
                    dst.as_mut_ptr().add(r0 * positions + p0),
                    positions,
                    View::rows(lhs.as_ptr(), c_out),
                    View::rows(rhs.as_ptr(), n),
                    (m, n, c_out),
                    false,
                )
            }
        }
    }
}

/// Output positions per GEMM call when each position brings `per_position` column elements.
fn positions_per_call(per_position: usize) -> usize {
    (GEMM_TILE / per_position.max(1)).max(1)
}

/// Contiguous elements of a CPU tensor in one dtype, or the reason it is not one.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => Err(candle_core::Error::RequiresContiguous {
            op: "unfolded-conv2d",
        }
        .bt()),
    }
}

/// The `CustomOp2` of a lowering step: its `run` for the inputs' dtype (fp16, the lowering's
/// case, and fp32 for the tests).
macro_rules! dtype_dispatch {
    ($op:ty, $name:literal) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                a: &CpuStorage,
                al: &Layout,
                b: &CpuStorage,
                bl: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                match a.dtype() {
                    DType::F16 => self.run::<half::f16>(a, al, b, bl),
                    DType::F32 => self.run::<f32>(a, al, b, bl),
                    d => Err(candle_core::Error::UnsupportedDTypeForOp(d, $name).bt()),
                }
            }
        }
    };
}

/// The forward: `conv2d(x, w)` through the whole batch's columns.
struct UnfoldedConv {
    stride: usize,
    padding: usize,
}

impl UnfoldedConv {
    fn run<T: WithDType>(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c_out, _, k_h, k_w) = wl.shape().dims4()?;
        let g = Geometry::new(xl.shape(), k_h, k_w, self.stride, self.padding)?;
        g.check(Some(wl.shape()), None)?;
        let (x, w) = (slice::<T>(x, xl)?, slice::<T>(w, wl)?);
        let cols = g.unfold(x);
        let (rows, positions) = (g.rows(), g.positions());
        let mut out = vec![T::zero(); g.batch * c_out * positions];
        // one image per task, as ATen's parallel_for over the batch; each image's output in
        // column tiles (see GEMM_TILE)
        let tile = positions_per_call(rows);
        out.par_chunks_mut(c_out * positions)
            .zip(cols.par_chunks(rows * positions))
            .for_each(|(o, col)| {
                for p0 in (0..positions).step_by(tile) {
                    let n = tile.min(positions - p0);
                    // SAFETY: `o` is `c_out x positions`, `w` `c_out x rows`, `col`
                    // `rows x positions`; columns p0..p0+n lie inside each row
                    unsafe {
                        gemm_into(
                            o.as_mut_ptr().add(p0),
                            positions,
                            View::rows(w.as_ptr(), rows),
                            View::rows(col.as_ptr().add(p0), positions),
                            (c_out, n, rows),
                            false,
                        )
                    }
                }
            });
        drop(cols);
        let shape = Shape::from((g.batch, c_out, g.out_h, g.out_w));
        Ok((T::to_cpu_storage_owned(out), shape))
    }
}

dtype_dispatch!(UnfoldedConv, "unfolded-conv2d");

/// The weight gradient: `dw = sum over images of g · columnsᵀ`, accumulated in place.
struct UnfoldedWeightGrad {
    k_h: usize,
    k_w: usize,
    stride: usize,
    padding: usize,
}

impl UnfoldedWeightGrad {
    fn run<T: WithDType>(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = Geometry::new(xl.shape(), self.k_h, self.k_w, self.stride, self.padding)?;
        let (_, c_out, _, _) = gl.shape().dims4()?;
        geo.check(None, Some((gl.shape(), c_out)))?;
        let (x, g) = (slice::<T>(x, xl)?, slice::<T>(g, gl)?);
        let cols = geo.unfold(x);
        let (rows, positions) = (geo.rows(), geo.positions());
        let mut dw = vec![T::zero(); c_out * rows];
        let tile = positions_per_call(rows + c_out);
        for (gi, col) in g
            .chunks(c_out * positions)
            .zip(cols.chunks(rows * positions))
        {
            for p0 in (0..positions).step_by(tile) {
                let k = tile.min(positions - p0);
                // dw [c_out, rows] += g_i[:, p0..p0+k] · (col[:, p0..p0+k])ᵀ
                // SAFETY: `gi` is `c_out x positions`, `col` `rows x positions`, `dw`
                // `c_out x rows`; columns p0..p0+k lie inside each row
                unsafe {
                    gemm_into(
                        dw.as_mut_ptr(),
                        rows,
                        View::rows(gi.as_ptr().add(p0), positions),
                        View::transposed(col.as_ptr().add(p0), positions),
                        (c_out, rows, k),
                        true,
                    )
                }
            }
        }
        drop(cols);
        let shape = Shape::from((c_out, geo.c_in, self.k_h, self.k_w));
        Ok((T::to_cpu_storage_owned(dw), shape))
    }
}

dtype_dispatch!(UnfoldedWeightGrad, "unfolded-conv2d-weight-grad");

/// The input gradient: per image `columns = wᵀ · g`, added back onto the image's positions.
/// Like ATen, each thread owns one image's columns (`fgrad_input`), not the whole batch's, and
/// every convolution's input gradient takes this path, a 1x1 one included.
struct UnfoldedInputGrad {
    /// the convolution's input shape
    input: Shape,
    stride: usize,
    padding: usize,
}

impl UnfoldedInputGrad {
    fn run<T: WithDType>(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c_out, _, k_h, k_w) = wl.shape().dims4()?;
        let geo = Geometry::new(&self.input, k_h, k_w, self.stride, self.padding)?;
        geo.check(Some(wl.shape()), Some((gl.shape(), c_out)))?;
        let (g, w) = (slice::<T>(g, gl)?, slice::<T>(w, wl)?);
        let (rows, positions) = (geo.rows(), geo.positions());
        let image = geo.c_in * geo.in_h * geo.in_w;
        let mut gx = vec![T::zero(); geo.batch * image];
        // at::parallel_for's static split: one run of images per thread, each with its columns
        // buffer (`fgrad_input`) and, as ATen's CPU GEMM with a transposed operand accumulates a
        // 16-bit type in fp32, an f32 buffer of the same size (measured: a thread's input
        // gradient holds three 16-bit columns' worth). All threads' buffers are made before the
        // runs start: PyTorch's threads run at once, where rayon may run two runs one after the
        // other, so the peak read 4.58-5.21 MB run to run on a tiny VGG fp16 step.
        let per_thread = geo.batch.div_ceil(rayon::current_num_threads().max(1));
        let runs = geo.batch.div_ceil(per_thread);
        let mut buffers: Vec<(Vec<T>, Vec<f32>)> = (0..runs)
            .map(|_| {
                (
                    vec![T::zero(); rows * positions],
                    vec![0f32; rows * positions],
                )
            })
            .collect();
        gx.par_chunks_mut(per_thread * image)
            .zip(g.par_chunks(per_thread * c_out * positions))
            .zip(buffers.par_iter_mut())
            .for_each(|((gx_run, g_run), (col, col32))| {
                for (img, gi) in gx_run
                    .chunks_mut(image)
                    .zip(g_run.chunks(c_out * positions))
                {
                    transposed_weight_times(col32, w, gi, (c_out, rows, positions));
                    for (c, v) in col.iter_mut().zip(col32.iter()) {
                        *c = T::from_f64(f64::from(*v));
                    }
                    geo.fold_into(col, img);
                }
            });
        drop(buffers);
        Ok((T::to_cpu_storage_owned(gx), self.input.clone()))
    }
}

dtype_dispatch!(UnfoldedInputGrad, "unfolded-conv2d-input-grad");

/// `conv2d(x, w)` (NCHW, square stride and padding) lowered as `slow_conv2d` is. No graph.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (x, w) = (x.detach().contiguous()?, w.detach().contiguous()?);
    x.apply_op2_no_bwd(&w, &UnfoldedConv { stride, padding })
}

/// The input gradient of `conv2d(x, w)` (`x` of shape `input`) for the output gradient `g`,
/// lowered as `slow_conv2d_backward` is. No graph.
pub fn input_grad(
    input: &Shape,
    w: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (g, w) = (g.detach().contiguous()?, w.detach().contiguous()?);
    g.apply_op2_no_bwd(
        &w,
        &UnfoldedInputGrad {
            input: input.clone(),
            stride,
            padding,
        },
    )
}

/// The weight gradient of `conv2d(x, w)` for the output gradient `g`, lowered as
/// `slow_conv2d_backward` is (`[k_h, k_w]` the kernel's size). No graph.
pub fn weight_grad(
    x: &Tensor,
    g: &Tensor,
    (k_h, k_w): (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (x, g) = (x.detach().contiguous()?, g.detach().contiguous()?);
    x.apply_op2_no_bwd(
        &g,
        &UnfoldedWeightGrad {
            k_h,
            k_w,
            stride,
            padding,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-6)
    }

    /// Forward, weight and input gradients equal candle's conv2d and its backward (strided, padded,
    /// rectangular images, a 7x7 stem, a strided 1x1), in fp32 and fp16.
    #[test]
    fn unfolded_conv_matches_candles_conv2d() {
        let dev = Device::Cpu;
        for (k, stride, padding, (h, w_)) in [
            (7, 2, 3, (20, 23)),
            (3, 1, 1, (9, 9)),
            (3, 2, 1, (16, 11)),
            (3, 2, 1, (15, 15)),
            (7, 2, 3, (22, 22)),
            (1, 2, 0, (8, 8)),
            (1, 1, 0, (6, 6)),
        ] {
            for dtype in [DType::F32, DType::F16] {
                let x = Tensor::randn(0f32, 1., (3, 5, h, w_), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::randn(0f32, 0.2, (4, 5, k, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                let ours = conv2d(&x, &w, padding, stride).unwrap();
                let (x32, w32) = (
                    x.to_dtype(DType::F32).unwrap(),
                    w.to_dtype(DType::F32).unwrap(),
                );
                let theirs = x32.conv2d(&w32, padding, stride, 1, 1).unwrap();
                assert_eq!(ours.dims(), theirs.dims());
                let d = max_rel_diff(&ours, &theirs);
                assert!(d < tol, "forward k{k} s{stride} {dtype:?}: {d}");

                // the weight gradient of sum(conv · g) is what candle's backward computes
                let g = Tensor::randn(0f32, 1., theirs.dims(), &dev).unwrap();
                let wv = candle_core::Var::from_tensor(&w32).unwrap();
                let y = x32.conv2d(wv.as_tensor(), padding, stride, 1, 1).unwrap();
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let expected = grads.get(wv.as_tensor()).unwrap();
                let ours =
                    weight_grad(&x, &g.to_dtype(dtype).unwrap(), (k, k), padding, stride).unwrap();
                let d = max_rel_diff(&ours, expected);
                assert!(d < tol, "weight gradient k{k} s{stride} {dtype:?}: {d}");

                if h != w_ {
                    // candle's own input gradient restores only the height (one output padding)
                    continue;
                }
                let xv = candle_core::Var::from_tensor(&x32).unwrap();
                let y = xv.as_tensor().conv2d(&w32, padding, stride, 1, 1).unwrap();
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let expected = grads.get(xv.as_tensor()).unwrap();
                let ours = input_grad(x.shape(), &w, &g.to_dtype(dtype).unwrap(), padding, stride)
                    .unwrap();
                let d = max_rel_diff(&ours, expected);
                assert!(d < tol, "input gradient k{k} s{stride} {dtype:?}: {d}");
            }
        }
    }

    /// Shapes that do not fit the geometry are refused before any GEMM reads memory.
    #[test]
    fn mismatched_shapes_are_refused() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &w, 1, 1).is_err());
        let g = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
        assert!(weight_grad(&x, &g, (3, 3), 1, 1).is_err());
        let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
        assert!(input_grad(x.shape(), &w, &g, 1, 1).is_err());
        let empty = Tensor::zeros((0, 3, 8, 8), DType::F32, &dev).unwrap();
        assert!(conv2d(&empty, &w, 1, 1).is_err());
    }

    /// fp16 on a CPU without fp16 convolution instructions unfolds; fp32 and bf16 never do.
    #[test]
    fn lowering_follows_pytorchs_cpu_dispatch() {
        let dev = Device::Cpu;
        assert_eq!(lowering(&dev, DType::F32), ConvLowering::Direct);
        assert_eq!(lowering(&dev, DType::BF16), ConvLowering::Direct);
        let expected = if cpu_has_fp16_convolution() {
            ConvLowering::Direct
        } else {
            ConvLowering::Unfolded
        };
        assert_eq!(lowering(&dev, DType::F16), expected);
        assert!(!needs_columns(1, 1, 1, 0));
        assert!(needs_columns(1, 1, 2, 0));
        assert!(needs_columns(3, 3, 1, 1));
    }
}
