//! Any [`CnnSpec`] as a real network: the spec's layer tree is mirrored one-to-one, each node
//! holding the indices of its parameters in the [`ParamStore`].

use super::fused;
use super::ops::{adaptive_pool2d, pool2d, Linear};
use super::params::{Ctx, Init, ParamStore};
use crate::spec::cnn::{CnnLayer, CnnSpec, PoolKind};
use candle_core::{Result, Tensor};

#[derive(Debug)]
enum Op {
    Conv {
        w: usize,
        b: Option<usize>,
        stride: usize,
        padding: usize,
    },
    /// Training-mode batch normalisation: batch statistics, affine weight and bias. Running
    /// statistics are buffers (2C floats), not parameters, and are not tracked.
    Batchnorm {
        w: usize,
        b: usize,
    },
    Relu,
    Pool {
        kind: PoolKind,
        k: usize,
        stride: usize,
        padding: usize,
    },
    Adaptive {
        kind: PoolKind,
        out: usize,
    },
    Flatten,
    Linear(Linear),
    Residual {
        body: Vec<Op>,
        shortcut: Vec<Op>,
    },
}

fn build(layers: &[CnnLayer], store: &mut ParamStore, prefix: &str) -> anyhow::Result<Vec<Op>> {
    let mut ops = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let name = format!("{prefix}{i}");
        ops.push(match layer {
            CnnLayer::Conv {
                k_h,
                k_w,
                c_in,
                c_out,
                stride,
                padding,
                bias,
            } => {
                anyhow::ensure!(k_h == k_w, "conv {name}: only square kernels are built");
                let (k, ci, co) = (*k_h as usize, *c_in as usize, *c_out as usize);
                let bound = 1.0 / ((ci * k * k) as f32).sqrt();
                Op::Conv {
                    w: store.add(
                        format!("{name}.weight"),
                        &[co, ci, k, k],
                        Init::Uniform(bound),
                    )?,
                    b: bias
                        .then(|| store.add(format!("{name}.bias"), &[co], Init::Zeros))
                        .transpose()?,
                    stride: *stride as usize,
                    padding: *padding as usize,
                }
            }
            CnnLayer::Batchnorm { channels } => Op::Batchnorm {
                w: store.add(format!("{name}.weight"), &[*channels as usize], Init::Ones)?,
                b: store.add(format!("{name}.bias"), &[*channels as usize], Init::Zeros)?,
            },
            CnnLayer::Relu => Op::Relu,
            CnnLayer::Pool {
                kind,
                k,
                stride,
                padding,
            } => Op::Pool {
                kind: *kind,
                k: *k as usize,
                stride: *stride as usize,
                padding: *padding as usize,
            },
            CnnLayer::Adaptivepool { kind, out } => Op::Adaptive {
                kind: *kind,
                out: *out as usize,
            },
            CnnLayer::Flatten => Op::Flatten,
            CnnLayer::Linear { d_in, d_out, bias } => Op::Linear(Linear::new(
                store,
                &name,
                *d_in as usize,
                *d_out as usize,
                *bias,
            )?),
            CnnLayer::Residual { body, shortcut } => Op::Residual {
                body: build(body, store, &format!("{name}.body."))?,
                shortcut: build(shortcut, store, &format!("{name}.shortcut."))?,
            },
        });
    }
    Ok(ops)
}

/// Runs `ops` in order. A ReLU right after a BatchNorm or a biased conv is folded into that op's
/// single graph node, as torchvision's in-place ReLU leaves one saved tensor for the pair.
fn forward_ops(ops: &[Op], ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
    let mut x = x.clone();
    let mut i = 0;
    while i < ops.len() {
        let relu_next = matches!(ops.get(i + 1), Some(Op::Relu));
        let mut fold_relu = false;
        x = match &ops[i] {
            Op::Conv {
                w,
                b,
                stride,
                padding,
            } => {
                let y = super::conv::conv2d(&x, &ctx.w(*w)?, *padding, *stride)?;
                match b {
                    Some(b) => {
                        fold_relu = relu_next;
                        fused::bias_act(&y, &ctx.w(*b)?, fold_relu)?
                    }
                    None => y,
                }
            }
            Op::Batchnorm { w, b } => {
                fold_relu = relu_next;
                fused::batch_norm(&x, &ctx.w(*w)?, &ctx.w(*b)?, fold_relu)?
            }
            Op::Relu => x.relu()?,
            Op::Pool {
                kind,
                k,
                stride,
                padding,
            } => pool2d(&x, *kind, *k, *stride, *padding)?,
            Op::Adaptive { kind, out } => adaptive_pool2d(&x, *kind, *out)?,
            Op::Flatten => x.flatten_from(1)?,
            Op::Linear(l) => l.forward(ctx, &x)?,
            Op::Residual { body, shortcut } => {
                let a = forward_ops(body, ctx, &x)?;
                let s = forward_ops(shortcut, ctx, &x)?;
                fused::add_relu(&a, &s)?
            }
        };
        i += if fold_relu { 2 } else { 1 };
    }
    Ok(x)
}

/// The network built from a [`CnnSpec`].
#[derive(Debug)]
pub struct Cnn {
    pub spec: CnnSpec,
    ops: Vec<Op>,
}

impl Cnn {
    pub fn new(spec: &CnnSpec, store: &mut ParamStore) -> anyhow::Result<Self> {
        spec.validate()?;
        Ok(Self {
            spec: spec.clone(),
            ops: build(&spec.layers, store, "")?,
        })
    }

    /// Images `[b, c, H, W]` (any dtype) -> logits `[b, classes]` in the compute dtype.
    pub fn forward(&self, ctx: &Ctx, images: &Tensor) -> Result<Tensor> {
        forward_ops(&self.ops, ctx, &images.to_dtype(ctx.dtype)?)
    }
}
