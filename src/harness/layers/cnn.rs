//! Any [`CnnSpec`] as a real network: the spec's layer tree is mirrored one-to-one, each node
//! holding the indices of its parameters in the [`ParamStore`].
//!
//! The trainer runs it segment by segment ([`Cnn::segment`], [`Cnn::head_loss`]), as it runs a
//! transformer block by block: each top-level residual block (or conv + ReLU, or BatchNorm +
//! ReLU) ends a segment, so a segment's
//! graph (and the activations it keeps) is released once its backward has run, as PyTorch frees
//! each node's saved tensors during backward. A block's output `relu(body + shortcut)` is not a
//! graph node: it is computed outside the graph and held once, as the next segment's input
//! (torchvision adds the shortcut into the last BatchNorm's output in place and applies ReLU in
//! place, so PyTorch holds one tensor there too), and the block's backward is seeded into the
//! branches' last BatchNorms ([`Join`]). A conv with bias followed by ReLU (VGG) ends a segment
//! the same way: its output is held once, as the next segment's input (PyTorch's in-place ReLU
//! overwrites the conv output), and its backward is seeded into the conv.

use super::fused;
use super::joins;
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
                let w = ctx.w(*w)?;
                match b {
                    Some(b) => {
                        fold_relu = relu_next;
                        let b = ctx.w(*b)?;
                        super::conv::conv2d_bias(&x, &w, &b, *padding, *stride, fold_relu)?
                    }
                    None => super::conv::conv2d(&x, &w, *padding, *stride)?,
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

/// One term of a segment's output sum (before its ReLU).
enum Term {
    /// A branch ending in BatchNorm, kept as the norm's input and parameters: its output is
    /// never a graph node.
    BatchNorm {
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
    },
    /// A conv with bias (VGG's conv + ReLU), kept as its input and parameters.
    Conv {
        x: Tensor,
        w: Tensor,
        b: Tensor,
        padding: usize,
        stride: usize,
    },
    /// Any other branch output (an identity shortcut: the block's input, kept anyway).
    Tensor(Tensor),
}

/// A segment's output `relu(sum of terms)` (a residual block's join, or a conv's ReLU), held
/// outside the graph.
pub struct Join {
    terms: Vec<Term>,
}

impl Join {
    /// The block's output value, outside the graph.
    pub fn value(&self) -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for t in &self.terms {
            let v = match t {
                Term::BatchNorm { x, gamma, beta } => {
                    fused::batch_norm(&x.detach(), &gamma.detach(), &beta.detach(), false)?
                }
                Term::Conv {
                    x,
                    w,
                    b,
                    padding,
                    stride,
                } => super::conv::conv2d_bias(
                    &x.detach(),
                    &w.detach(),
                    &b.detach(),
                    *padding,
                    *stride,
                    false,
                )?,
                Term::Tensor(t) => t.detach(),
            };
            acc = Some(match acc {
                Some(a) => (a + v)?,
                None => v,
            });
        }
        acc.ok_or_else(|| candle_core::Error::Msg("a residual block without branches".into()))?
            .relu()
    }

    /// Backward root for the output gradient `g`, given the output value `out` (the ReLU mask;
    /// the caller may free it once this returns).
    pub fn root(&self, g: &Tensor, out: &Tensor) -> Result<Tensor> {
        // detached: a gradient that carries graph history (the mask is computed from the
        // output Var) would keep that history alive in every parameter gradient made from it
        let g = (g.detach() * out.detach().gt(0.0)?.to_dtype(g.dtype())?)?;
        let mut acc: Option<Tensor> = None;
        for t in &self.terms {
            let r = match t {
                Term::BatchNorm { x, gamma, beta } => fused::seed_batch_norm(x, gamma, beta, &g)?,
                Term::Conv {
                    x,
                    w,
                    b,
                    padding,
                    stride,
                } => super::conv::seed_conv2d_bias(x, w, b, &g, *padding, *stride)?,
                Term::Tensor(t) => joins::seed(t, &g)?,
            };
            acc = Some(match acc {
                Some(a) => (a + r)?,
                None => r,
            });
        }
        acc.ok_or_else(|| candle_core::Error::Msg("a residual block without branches".into()))
    }
}

/// A branch's ops as a join term: up to its last BatchNorm in the graph, the BN itself kept as
/// its input and parameters.
fn branch(ops: &[Op], ctx: &Ctx, x: &Tensor) -> Result<Term> {
    match ops.split_last() {
        Some((Op::Batchnorm { w, b }, rest)) => Ok(Term::BatchNorm {
            x: forward_ops(rest, ctx, x)?,
            gamma: ctx.w(*w)?,
            beta: ctx.w(*b)?,
        }),
        _ => Ok(Term::Tensor(forward_ops(ops, ctx, x)?)),
    }
}

/// The network built from a [`CnnSpec`].
#[derive(Debug)]
pub struct Cnn {
    pub spec: CnnSpec,
    ops: Vec<Op>,
    /// End (exclusive) of each segment in `ops`: each ends with a top-level residual block, a
    /// top-level conv with bias followed by ReLU, or a top-level BatchNorm followed by ReLU (a
    /// ResNet stem: its conv's weight gradient then meets none of the first block's tensors).
    ends: Vec<usize>,
}

impl Cnn {
    pub fn new(spec: &CnnSpec, store: &mut ParamStore) -> anyhow::Result<Self> {
        spec.validate()?;
        let ops = build(&spec.layers, store, "")?;
        let ends = (0..ops.len())
            .filter_map(|i| match (&ops[i], ops.get(i + 1)) {
                (Op::Residual { .. }, _) => Some(i + 1),
                (Op::Conv { b: Some(_), .. } | Op::Batchnorm { .. }, Some(Op::Relu)) => Some(i + 2),
                _ => None,
            })
            .collect();
        Ok(Self {
            spec: spec.clone(),
            ops,
            ends,
        })
    }

    /// Segments that end with a residual block, a conv + ReLU or a BatchNorm + ReLU (0 for a
    /// network with none).
    pub fn segments(&self) -> usize {
        self.ends.len()
    }

    /// Segment `i` on `x` (segment 0: the images `[b, c, H, W]`, any dtype; later ones: the
    /// previous segment's output): the ops before its last op in the graph, and the last op (a
    /// residual block, a conv with bias and its ReLU, or a BatchNorm and its ReLU) as the output
    /// join.
    pub fn segment(&self, ctx: &Ctx, i: usize, x: &Tensor) -> Result<Join> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let end = self.ends[i];
        let x = self.input(ctx, i, x)?;
        match &self.ops[end - 1] {
            Op::Residual { body, shortcut } => {
                let x = forward_ops(&self.ops[start..end - 1], ctx, &x)?;
                Ok(Join {
                    terms: vec![branch(body, ctx, &x)?, branch(shortcut, ctx, &x)?],
                })
            }
            _ => {
                let x = forward_ops(&self.ops[start..end - 2], ctx, &x)?;
                let term = match &self.ops[end - 2] {
                    Op::Conv {
                        w,
                        b: Some(b),
                        stride,
                        padding,
                    } => Term::Conv {
                        x,
                        w: ctx.w(*w)?,
                        b: ctx.w(*b)?,
                        padding: *padding,
                        stride: *stride,
                    },
                    Op::Batchnorm { w, b } => Term::BatchNorm {
                        x,
                        gamma: ctx.w(*w)?,
                        beta: ctx.w(*b)?,
                    },
                    _ => unreachable!(
                        "segments end with a residual block, or a biased conv or a BatchNorm \
                         followed by ReLU"
                    ),
                };
                Ok(Join { terms: vec![term] })
            }
        }
    }

    /// The ops after the last segment (all of them without one) and the mean
    /// cross-entropy against class ids `targets` `[b]`.
    pub fn head_loss(&self, ctx: &Ctx, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let start = self.ends.last().copied().unwrap_or(0);
        let x = self.input(ctx, self.segments(), x)?;
        let logits = forward_ops(&self.ops[start..], ctx, &x)?;
        super::ops::cross_entropy(&logits, targets)
    }

    /// Images enter in any dtype and are cast to the compute dtype once, by the first segment.
    fn input(&self, ctx: &Ctx, i: usize, x: &Tensor) -> Result<Tensor> {
        if i == 0 {
            x.to_dtype(ctx.dtype)
        } else {
            Ok(x.clone())
        }
    }
}
