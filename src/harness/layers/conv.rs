//! 2-D convolution as one graph node whose backward allocates what PyTorch's does.
//!
//! Why: candle's own conv2d backward computes the weight gradient as a convolution of the input
//! with the whole batch's output gradient as the kernel, so its im2col tile is
//! `batch·out_h·out_w` rows by up to 512 output positions. For a stride-2 7x7 stem on 8 images
//! of 128 px that is an 8 MB tile per thread, where the step's whole rise under PyTorch
//! (mkldnn's direct kernels) is 4 MB: tiny-resnet18 b8 128 px measured 33.8 MB above the
//! baseline under candle, 4.0 MB under PyTorch.
//!
//! Here the forward is candle's conv2d (tiled im2col, the same values), and the backward
//! computes the input gradient with candle's transposed convolution (only when the input needs
//! one: images do not) and the weight gradient sample by sample and band by band of output rows,
//! each band the same convolution trick on a slice small enough that its im2col tile stays under
//! [`WEIGHT_GRAD_TILE`] elements. The graph keeps the input and the weight, as PyTorch's does.
//!
//! In fp16 on a CPU without fp16 convolution instructions PyTorch lowers convolutions to
//! `slow_conv2d` instead, whose whole-batch unfolded input is most of a small CNN's step rise;
//! there the forward and the weight gradient run through [`super::unfold`], which allocates what
//! that lowering does.
//!
//! A conv with a bias (VGG) adds it inside the node, optionally followed by ReLU, as PyTorch's
//! conv adds its bias in the kernel and torchvision's in-place ReLU overwrites the conv output:
//! one kept tensor per conv (the output, also the next layer's input), where a separate bias/ReLU
//! node kept the pre-bias product as well.

use super::handed::{handed_fwd, Handed};
use super::unfold::{self, ConvLowering};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Most elements of one band's im2col tile in the weight gradient (`band rows·out_w` by the
/// kernel's positions): 16 Ki elements, 64 KB in fp32 (64 Ki tiles measured a tiny ResNet-18's
/// step peak at batch 1, 64 px 17 % higher: per-thread buffers PyTorch's kernels do not hold).
const WEIGHT_GRAD_TILE: usize = 1 << 14;

struct Conv2dOp {
    padding: usize,
    stride: usize,
    /// ReLU applied to the output inside the node (its backward masks by the output)
    relu: bool,
    /// The forward's result, computed by candle's conv2d before the node is made and moved
    /// out by the node's forward (so the op held by the graph keeps no copy of it).
    out: Handed,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-lean-backward"
    }

    handed_fwd!(x, w);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, _] = self.grads(x, w, false, res, grad)?;
        Ok((gx, gw))
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-bias-lean-backward"
    }

    handed_fwd!(x, w, b);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok(self.grads(x, w, true, res, grad)?.into())
    }
}

impl Conv2dOp {
    /// (dx, dw, db) for the output gradient `grad`; `res` is the node's output (the ReLU mask).
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_bias: bool,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let g = if self.relu {
            (grad.detach() * res.detach().gt(0.0)?.to_dtype(grad.dtype())?)?
        } else {
            grad.detach()
        };
        conv_grads(x, w, has_bias, &g, self.padding, self.stride)
    }
}

/// (dx, dw, db) of `conv2d(x, w) (+ b)` for its output gradient `g`.
fn conv_grads(
    x: &Tensor,
    w: &Tensor,
    has_bias: bool,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<[Option<Tensor>; 3]> {
    // an input no gradient reaches (the images) gets none, as PyTorch's needs_input_grad
    let needs_input_grad = x.track_op();
    let (x, w) = (x.detach(), w.detach());
    // slow_conv2d's input gradient takes its per-thread columns for every kernel; its forward
    // and weight gradient unfold only kernels that need columns (`unfolds`)
    let lowered = unfold::lowering(x.device(), x.dtype()) == ConvLowering::Unfolded;
    let grad_x = if needs_input_grad && lowered {
        Some(unfold::input_grad(x.shape(), &w, g, padding, stride)?)
    } else if needs_input_grad {
        // candle's own formula (backprop.rs): the transposed convolution with the output
        // padding that restores the input's height
        let (k_h, g_h) = (w.dim(2)?, g.dim(2)?);
        let out_size = (g_h - 1) * stride + k_h - 2 * padding;
        let out_padding = x.dim(2)? - out_size;
        Some(g.conv_transpose2d(&w, padding, out_padding, stride, 1)?)
    } else {
        None
    };
    let grad_w = if unfolds(&x, &w, padding, stride)? {
        let (_, _, k_h, k_w) = w.dims4()?;
        unfold::weight_grad(&x, g, (k_h, k_w), padding, stride)?
    } else {
        weight_grad(&x, &w, g, padding, stride)?
    };
    let grad_b = if has_bias {
        Some(g.sum((0, 2, 3))?)
    } else {
        None
    };
    Ok([grad_x, Some(grad_w), grad_b])
}

struct SeedConvOp {
    padding: usize,
    stride: usize,
    /// the conv output's gradient
    g: Tensor,
    out: Handed,
}

impl CustomOp3 for SeedConvOp {
    fn name(&self) -> &'static str {
        "grad-seed-conv2d-bias"
    }
    handed_fwd!(x, w, b);
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok(conv_grads(x, w, true, &self.g, self.padding, self.stride)?.into())
    }
}

/// A scalar whose backward is that of `conv2d(x, w) + b` receiving the output gradient `g`: the
/// root of a CNN segment's backward (`layers::cnn`) when the conv's output is held only as the
/// next segment's input, not as a graph node.
pub fn seed_conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let op = SeedConvOp {
        padding,
        stride,
        g: g.clone(),
        out: Handed::new(Tensor::zeros((), candle_core::DType::F32, x.device())?),
    };
    x.apply_op3(w, b, op)
}

/// `dL/dw` summed over the batch, one sample and one band of output rows at a time:
/// `w_grad[o, i, kh, kw] = sum over positions of g[o, y, x] · x_pad[i, y·s + kh, x·s + kw]`,
/// which is a convolution of the padded input band (channels as the batch) with the gradient
/// band as its kernel, dilated by the stride.
fn weight_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, _, _, _) = x.dims4()?;
    let (_, _, k_h, k_w) = w.dims4()?;
    let (_, _, out_h, out_w) = g.dims4()?;
    let rows = (WEIGHT_GRAD_TILE / (out_w * k_h * k_w).max(1)).clamp(1, out_h);
    let mut acc: Option<Tensor> = None;
    for n in 0..b {
        let xp = x
            .narrow(0, n, 1)?
            .pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?;
        let gn = g.narrow(0, n, 1)?;
        let mut r0 = 0;
        while r0 < out_h {
            let r = rows.min(out_h - r0);
            let in_rows = (r - 1) * stride + k_h;
            // [1, i, rows, W] -> [i, 1, rows, W]: input channels as the batch
            let xb = xp.narrow(2, r0 * stride, in_rows)?.transpose(0, 1)?;
            // [1, o, r, out_w] -> [o, 1, r, out_w]: the gradient band as the kernel
            let gb = gn.narrow(2, r0, r)?.transpose(0, 1)?.contiguous()?;
            // [i, o, k_h, >= k_w] -> [o, i, k_h, k_w]
            let part = xb
                .conv2d(&gb, 0, 1, stride, 1)?
                .narrow(3, 0, k_w)?
                .transpose(0, 1)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part.contiguous()?,
            });
            r0 += r;
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("conv2d weight gradient of an empty batch".into()))
}

/// Whether PyTorch would run this convolution through the whole batch's unfolded input.
fn unfolds(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<bool> {
    let (_, _, k_h, k_w) = w.dims4()?;
    Ok(
        unfold::lowering(x.device(), x.dtype()) == ConvLowering::Unfolded
            && unfold::needs_columns(k_h, k_w, stride, padding),
    )
}

/// The forward value of `conv2d(x, w)`, lowered as PyTorch lowers it here. No graph.
fn conv_value(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if unfolds(x, w, padding, stride)? {
        unfold::conv2d(x, w, padding, stride)
    } else {
        x.detach().conv2d(&w.detach(), padding, stride, 1, 1)
    }
}

/// `conv2d(x, w)` (NCHW, square stride and padding, no dilation or groups) as one node with the
/// lean backward above.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let out = conv_value(x, w, padding, stride)?;
    let op = Conv2dOp {
        padding,
        stride,
        relu: false,
        out: Handed::new(out),
    };
    x.apply_op2(w, op)
}

/// `conv2d(x, w) + b` per channel, then ReLU when `relu`, as one node keeping the input, the
/// weights and its output.
pub fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    padding: usize,
    stride: usize,
    relu: bool,
) -> Result<Tensor> {
    let c = w.dim(0)?;
    let y = conv_value(x, w, padding, stride)?.broadcast_add(&b.detach().reshape((1, c, 1, 1))?)?;
    let out = if relu { y.relu()? } else { y };
    let op = Conv2dOp {
        padding,
        stride,
        relu,
        out: Handed::new(out),
    };
    x.apply_op3(w, b, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Largest |a - b| relative to the largest |b|.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        max(&(a - b).unwrap()) / max(b).max(1e-6)
    }

    /// Gradients equal candle's own conv2d backward (strided, padded, a 7x7 and a 1x1 kernel,
    /// bands smaller than the image).
    #[test]
    fn gradients_match_candles_conv2d() {
        let dev = Device::Cpu;
        for (k, stride, padding, side) in
            [(7, 2, 3, 40), (3, 1, 1, 33), (1, 2, 0, 16), (3, 2, 1, 300)]
        {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, side, side), &dev).unwrap())
                .unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap()).unwrap();
            let ours = conv2d(x.as_tensor(), w.as_tensor(), padding, stride).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(w.as_tensor(), padding, stride, 1, 1)
                .unwrap();
            assert!(rel_diff(&ours, &theirs) < 1e-5, "forward k{k} s{stride}");
            let go = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let gt = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let a = go.get(v.as_tensor()).unwrap();
                let b = gt.get(v.as_tensor()).unwrap();
                assert!(
                    rel_diff(a, b) < 1e-4,
                    "gradient k{k} s{stride} p{padding}: {}",
                    rel_diff(a, b)
                );
            }
        }
    }

    /// The bias (and ReLU) inside the node: output and every gradient equal candle's composed
    /// conv2d, broadcast add and relu.
    #[test]
    fn bias_and_relu_match_composed_ops() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev).unwrap()).unwrap()
        };
        let (x, w, b) = (var(&[2, 3, 9, 9]), var(&[4, 3, 3, 3]), var(&[4]));
        for relu in [false, true] {
            let ours =
                conv2d_bias(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1, 2, relu).unwrap();
            let y = x
                .as_tensor()
                .conv2d(w.as_tensor(), 1, 2, 1, 1)
                .unwrap()
                .broadcast_add(&b.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let theirs = if relu { y.relu().unwrap() } else { y };
            assert!(rel_diff(&ours, &theirs) < 1e-5, "forward relu={relu}");
            let go = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let gt = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, e) = (
                    go.get(v.as_tensor()).unwrap(),
                    gt.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    rel_diff(a, e) < 1e-4,
                    "gradient relu={relu}: {}",
                    rel_diff(a, e)
                );
            }
        }
    }
}
