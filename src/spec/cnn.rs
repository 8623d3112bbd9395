//! CNN shape: a small layer language (conv, batchnorm, relu, pooling, linear, residual blocks),
//! shape inference over it, and the ResNet/VGG builders used by presets and the harness.

use crate::error::{check_range, input_err};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    Max,
    Avg,
}

/// One layer. Residual blocks nest: `body` and `shortcut` are layer lists whose outputs are added,
/// then passed through ReLU (the torchvision ResNet convention).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum CnnLayer {
    Conv {
        k_h: u64,
        k_w: u64,
        c_in: u64,
        c_out: u64,
        #[serde(default = "one")]
        stride: u64,
        #[serde(default)]
        padding: u64,
        #[serde(default = "yes")]
        bias: bool,
    },
    Batchnorm {
        channels: u64,
    },
    Relu,
    Pool {
        kind: PoolKind,
        k: u64,
        #[serde(default = "one")]
        stride: u64,
        #[serde(default)]
        padding: u64,
    },
    /// Adaptive average/max pooling to a fixed `out` x `out` grid.
    Adaptivepool {
        kind: PoolKind,
        out: u64,
    },
    Flatten,
    Linear {
        d_in: u64,
        d_out: u64,
        #[serde(default = "yes")]
        bias: bool,
    },
    Residual {
        body: Vec<CnnLayer>,
        #[serde(default)]
        shortcut: Vec<CnnLayer>,
    },
}

fn one() -> u64 {
    1
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CnnSpec {
    pub name: String,
    pub in_channels: u64,
    pub classes: u64,
    pub layers: Vec<CnnLayer>,
}

/// Activation shape (channels, height, width) or a flat vector (features).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Map { c: u64, h: u64, w: u64 },
    Flat(u64),
}

impl Shape {
    /// Elements of the shape; shapes come out of the checked walk, so the product fits.
    pub fn elems(&self) -> u64 {
        match *self {
            Shape::Map { c, h, w } => c.saturating_mul(h).saturating_mul(w),
            Shape::Flat(n) => n,
        }
    }

    fn checked_elems(&self) -> anyhow::Result<u64> {
        match *self {
            Shape::Map { c, h, w } => product(&[c, h, w], "image"),
            Shape::Flat(n) => Ok(n),
        }
    }
}

/// Per-image element counts gathered by walking the network once.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CnnWalk {
    /// Sum over every op output (conv, bn, relu, pool, linear, residual add) of its elements.
    pub out_elems: u64,
    /// The same sum split by op kind, since frameworks keep different tensors per kind for
    /// the backward (a batchnorm built from primitives keeps several, a ReLU one):
    /// conv and linear outputs,
    pub conv_elems: u64,
    /// batchnorm outputs,
    pub norm_elems: u64,
    /// ReLU outputs and residual sums,
    pub act_elems: u64,
    /// pooling outputs.
    pub pool_elems: u64,
    /// Multiply-accumulates of one forward pass (conv + linear).
    pub macs: u64,
    /// Largest unfolded input of any conv (C_in*k_h*k_w*H_out*W_out): the transient buffer a
    /// GEMM-lowered (im2col) convolution allocates, alive on top of the stored activations.
    pub max_im2col: u64,
    /// Layers walked (every conv, norm, activation, pool, linear, flatten and residual join):
    /// each is at least one kernel launch forward and one backward, a fixed cost per step.
    pub ops: u64,
}

/// Accepted ranges of the layer fields, checked once when a spec enters (file, preset, spec
/// JSON) so that the shape walk and the parameter count work on plausible sizes. The largest
/// published CNNs are far inside them.
pub const MAX_CHANNELS: u64 = 1 << 16;
pub const MAX_KERNEL: u64 = 1 << 10;
pub const MAX_STRIDE: u64 = 64;
pub const MAX_PADDING: u64 = 1 << 12;
pub const MAX_POOL_OUT: u64 = 1 << 12;
pub const MAX_FEATURES: u64 = 1 << 32;
/// Layers in the whole network, residual bodies and shortcuts included.
pub const MAX_CNN_LAYERS: usize = 100_000;
/// Residual blocks nested inside each other.
pub const MAX_NESTING: usize = 16;
/// Trainable parameters (10^15): above it a spec is a typo, and the byte counts stay in u64.
pub const MAX_CNN_PARAMS: u64 = 1_000_000_000_000_000;

/// Product of counts along the shape walk; a product past u64 is an input error rather than a
/// wrapped (small) count that would plan a gigantic network as a tiny one.
fn product(factors: &[u64], field: &str) -> anyhow::Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .map_or_else(
            || input_err(field, "the network's element counts overflow 64 bits at this image size; accepted a smaller image or narrower layers"),
            Ok,
        )
}

fn add_to(total: &mut u64, n: u64, field: &str) -> anyhow::Result<()> {
    match total.checked_add(n) {
        Some(t) => {
            *total = t;
            Ok(())
        }
        None => input_err(field, "the network's element counts overflow 64 bits at this image size; accepted a smaller image or narrower layers"),
    }
}

fn conv_out(size: u64, k: u64, stride: u64, pad: u64, field: &str) -> anyhow::Result<u64> {
    if size + 2 * pad < k {
        return input_err(
            field,
            format!(
                "kernel {k} is larger than the padded input {}; use a larger image",
                size + 2 * pad
            ),
        );
    }
    Ok((size + 2 * pad - k) / stride + 1)
}

impl CnnLayer {
    pub fn params(&self) -> u64 {
        match self {
            CnnLayer::Conv {
                k_h,
                k_w,
                c_in,
                c_out,
                bias,
                ..
            } => k_h
                .saturating_mul(*k_w)
                .saturating_mul(*c_in)
                .saturating_mul(*c_out)
                .saturating_add(if *bias { *c_out } else { 0 }),
            // weight and bias; running mean/var are buffers, not parameters.
            CnnLayer::Batchnorm { channels } => channels.saturating_mul(2),
            CnnLayer::Linear { d_in, d_out, bias } => d_in
                .saturating_mul(*d_out)
                .saturating_add(if *bias { *d_out } else { 0 }),
            // Saturating: a spec past MAX_CNN_PARAMS is refused by `CnnSpec::validate`, and a
            // saturated count is above it, never wrapped below it.
            CnnLayer::Residual { body, shortcut } => body
                .iter()
                .chain(shortcut)
                .fold(0u64, |acc, l| acc.saturating_add(l.params())),
            _ => 0,
        }
    }

    /// Output shape for an input shape, accumulating element counts and MACs into `walk`.
    pub fn forward_shape(&self, input: Shape, walk: &mut CnnWalk) -> anyhow::Result<Shape> {
        walk.ops += 1;
        let out = match (self, input) {
            (
                CnnLayer::Conv {
                    k_h,
                    k_w,
                    c_in,
                    c_out,
                    stride,
                    padding,
                    ..
                },
                Shape::Map { c, h, w },
            ) => {
                if *c_in != c {
                    return input_err(
                        "conv.c_in",
                        format!("{c_in} does not match the {c} incoming channels"),
                    );
                }
                let ho = conv_out(h, *k_h, *stride, *padding, "conv.k_h")?;
                let wo = conv_out(w, *k_w, *stride, *padding, "conv.k_w")?;
                let unfolded = product(&[*c_in, *k_h, *k_w, ho, wo], "image")?;
                add_to(
                    &mut walk.macs,
                    product(&[unfolded, *c_out], "image")?,
                    "image",
                )?;
                walk.max_im2col = walk.max_im2col.max(unfolded);
                Shape::Map {
                    c: *c_out,
                    h: ho,
                    w: wo,
                }
            }
            (CnnLayer::Batchnorm { channels }, Shape::Map { c, .. }) => {
                if *channels != c {
                    return input_err(
                        "batchnorm.channels",
                        format!("{channels} does not match the {c} incoming channels"),
                    );
                }
                input
            }
            (CnnLayer::Relu, s) => s,
            (
                CnnLayer::Pool {
                    k, stride, padding, ..
                },
                Shape::Map { c, h, w },
            ) => Shape::Map {
                c,
                h: conv_out(h, *k, *stride, *padding, "pool.k")?,
                w: conv_out(w, *k, *stride, *padding, "pool.k")?,
            },
            (CnnLayer::Adaptivepool { out, .. }, Shape::Map { c, .. }) => Shape::Map {
                c,
                h: *out,
                w: *out,
            },
            (CnnLayer::Flatten, s) => Shape::Flat(s.checked_elems()?),
            (CnnLayer::Linear { d_in, d_out, .. }, Shape::Flat(n)) => {
                if *d_in != n {
                    return input_err(
                        "linear.d_in",
                        format!("{d_in} does not match the {n} incoming features"),
                    );
                }
                add_to(
                    &mut walk.macs,
                    product(&[*d_in, *d_out], "linear.d_out")?,
                    "image",
                )?;
                Shape::Flat(*d_out)
            }
            (CnnLayer::Residual { body, shortcut }, s) => {
                let a = walk_layers(body, s, walk)?;
                let b = walk_layers(shortcut, s, walk)?;
                if a != b {
                    return input_err(
                        "residual",
                        format!("body output {a:?} does not match shortcut output {b:?}"),
                    );
                }
                // The add and the ReLU after it each produce a tensor of the block's output size.
                let n = product(&[2, a.checked_elems()?], "image")?;
                add_to(&mut walk.out_elems, n, "image")?;
                add_to(&mut walk.act_elems, n, "image")?;
                return Ok(a);
            }
            (layer, s) => {
                return input_err(
                    "layers",
                    format!("{} cannot follow a {s:?} activation", layer.kind()),
                )
            }
        };
        let n = out.checked_elems()?;
        add_to(&mut walk.out_elems, n, "image")?;
        match self {
            CnnLayer::Conv { .. } | CnnLayer::Linear { .. } => {
                add_to(&mut walk.conv_elems, n, "image")?
            }
            CnnLayer::Batchnorm { .. } => add_to(&mut walk.norm_elems, n, "image")?,
            CnnLayer::Relu => add_to(&mut walk.act_elems, n, "image")?,
            CnnLayer::Pool { .. } | CnnLayer::Adaptivepool { .. } => {
                add_to(&mut walk.pool_elems, n, "image")?
            }
            CnnLayer::Flatten | CnnLayer::Residual { .. } => {}
        }
        Ok(out)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            CnnLayer::Conv { .. } => "conv",
            CnnLayer::Batchnorm { .. } => "batchnorm",
            CnnLayer::Relu => "relu",
            CnnLayer::Pool { .. } => "pool",
            CnnLayer::Adaptivepool { .. } => "adaptivepool",
            CnnLayer::Flatten => "flatten",
            CnnLayer::Linear { .. } => "linear",
            CnnLayer::Residual { .. } => "residual",
        }
    }
}

pub fn walk_layers(layers: &[CnnLayer], input: Shape, walk: &mut CnnWalk) -> anyhow::Result<Shape> {
    layers
        .iter()
        .try_fold(input, |s, l| l.forward_shape(s, walk))
}

impl CnnSpec {
    pub fn params(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |acc, l| acc.saturating_add(l.params()))
    }

    /// Walks the network for one square image of side `image`, checking every shape.
    pub fn walk(&self, image: u64) -> anyhow::Result<CnnWalk> {
        let mut walk = CnnWalk::default();
        let out = walk_layers(
            &self.layers,
            Shape::Map {
                c: self.in_channels,
                h: image,
                w: image,
            },
            &mut walk,
        )?;
        if out != Shape::Flat(self.classes) {
            return input_err(
                "layers",
                format!(
                    "the network ends in {out:?}; accepted a flat vector of {} classes",
                    self.classes
                ),
            );
        }
        Ok(walk)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        check_range("in_channels", self.in_channels, 1, 1 << 12)?;
        check_range("classes", self.classes, 1, 1 << 24)?;
        if self.layers.is_empty() {
            return input_err("layers", "empty; accepted a non-empty layer list");
        }
        let mut count = 0usize;
        validate_layers(&self.layers, 0, &mut count)?;
        let params = self.params();
        if params > MAX_CNN_PARAMS {
            return input_err(
                "layers",
                format!("{params} parameters in total; accepted at most {MAX_CNN_PARAMS}"),
            );
        }
        Ok(())
    }
}

/// Range-checks every layer's fields, naming them as a CNN file writes them (`conv.c_out`).
fn validate_layers(layers: &[CnnLayer], depth: usize, count: &mut usize) -> anyhow::Result<()> {
    if depth > MAX_NESTING {
        return input_err(
            "residual",
            format!("nested {depth} deep; accepted at most {MAX_NESTING} levels"),
        );
    }
    for layer in layers {
        *count += 1;
        if *count > MAX_CNN_LAYERS {
            return input_err(
                "layers",
                format!("more than {MAX_CNN_LAYERS} layers; accepted at most {MAX_CNN_LAYERS}"),
            );
        }
        match layer {
            CnnLayer::Conv {
                k_h,
                k_w,
                c_in,
                c_out,
                stride,
                padding,
                ..
            } => {
                check_range("conv.k_h", *k_h, 1, MAX_KERNEL)?;
                check_range("conv.k_w", *k_w, 1, MAX_KERNEL)?;
                check_range("conv.c_in", *c_in, 1, MAX_CHANNELS)?;
                check_range("conv.c_out", *c_out, 1, MAX_CHANNELS)?;
                check_range("conv.stride", *stride, 1, MAX_STRIDE)?;
                check_range("conv.padding", *padding, 0, MAX_PADDING)?;
            }
            CnnLayer::Batchnorm { channels } => {
                check_range("batchnorm.channels", *channels, 1, MAX_CHANNELS)?
            }
            CnnLayer::Pool {
                k, stride, padding, ..
            } => {
                check_range("pool.k", *k, 1, MAX_KERNEL)?;
                check_range("pool.stride", *stride, 1, MAX_STRIDE)?;
                // PyTorch's pooling layers require padding <= kernel / 2
                check_range("pool.padding", *padding, 0, k / 2)?;
            }
            CnnLayer::Adaptivepool { out, .. } => {
                check_range("adaptivepool.out", *out, 1, MAX_POOL_OUT)?
            }
            CnnLayer::Linear { d_in, d_out, .. } => {
                check_range("linear.d_in", *d_in, 1, MAX_FEATURES)?;
                check_range("linear.d_out", *d_out, 1, 1 << 24)?;
            }
            CnnLayer::Residual { body, shortcut } => {
                validate_layers(body, depth + 1, count)?;
                validate_layers(shortcut, depth + 1, count)?;
            }
            CnnLayer::Relu | CnnLayer::Flatten => {}
        }
    }
    Ok(())
}

fn conv(k: u64, c_in: u64, c_out: u64, stride: u64, padding: u64, bias: bool) -> CnnLayer {
    CnnLayer::Conv {
        k_h: k,
        k_w: k,
        c_in,
        c_out,
        stride,
        padding,
        bias,
    }
}

fn bn(c: u64) -> CnnLayer {
    CnnLayer::Batchnorm { channels: c }
}

/// Closes an RGB-input torchvision-style network of `c_in` output channels into a spec: average
/// pool to `pool` x `pool`, flatten, then linears through the `hidden` widths (ReLU after each)
/// to `classes`.
fn classifier(
    name: &str,
    mut layers: Vec<CnnLayer>,
    c_in: u64,
    pool: u64,
    hidden: &[u64],
    classes: u64,
) -> CnnSpec {
    layers.push(CnnLayer::Adaptivepool {
        kind: PoolKind::Avg,
        out: pool,
    });
    layers.push(CnnLayer::Flatten);
    let mut d_in = c_in * pool * pool;
    for &d_out in hidden {
        layers.push(CnnLayer::Linear {
            d_in,
            d_out,
            bias: true,
        });
        layers.push(CnnLayer::Relu);
        d_in = d_out;
    }
    layers.push(CnnLayer::Linear {
        d_in,
        d_out: classes,
        bias: true,
    });
    CnnSpec {
        name: name.to_string(),
        in_channels: 3,
        classes,
        layers,
    }
}

/// torchvision-style ResNet. `bottleneck` selects ResNet-50-style 1x1-3x3-1x1 blocks (expansion 4);
/// `width` is the stem width (64 in the paper), scaled down for CPU sweeps.
pub fn resnet(name: &str, depths: [u64; 4], bottleneck: bool, width: u64, classes: u64) -> CnnSpec {
    let expansion = if bottleneck { 4 } else { 1 };
    let mut layers = vec![
        conv(7, 3, width, 2, 3, false),
        bn(width),
        CnnLayer::Relu,
        CnnLayer::Pool {
            kind: PoolKind::Max,
            k: 3,
            stride: 2,
            padding: 1,
        },
    ];
    let mut c_in = width;
    for (stage, &depth) in depths.iter().enumerate() {
        let planes = width << stage;
        let c_out = planes * expansion;
        for i in 0..depth {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            let body = if bottleneck {
                // torchvision v1.5: the stride sits on the 3x3 conv.
                vec![
                    conv(1, c_in, planes, 1, 0, false),
                    bn(planes),
                    CnnLayer::Relu,
                    conv(3, planes, planes, stride, 1, false),
                    bn(planes),
                    CnnLayer::Relu,
                    conv(1, planes, c_out, 1, 0, false),
                    bn(c_out),
                ]
            } else {
                vec![
                    conv(3, c_in, planes, stride, 1, false),
                    bn(planes),
                    CnnLayer::Relu,
                    conv(3, planes, planes, 1, 1, false),
                    bn(planes),
                ]
            };
            let shortcut = if stride != 1 || c_in != c_out {
                vec![conv(1, c_in, c_out, stride, 0, false), bn(c_out)]
            } else {
                vec![]
            };
            layers.push(CnnLayer::Residual { body, shortcut });
            c_in = c_out;
        }
    }
    classifier(name, layers, c_in, 1, &[], classes)
}

/// VGG-16 (configuration D, no batchnorm) with torchvision's 7x7 adaptive pool and 4096-wide classifier;
/// `width` is the first stage's channels (64 in the paper), `fc` the classifier width.
pub fn vgg16(name: &str, width: u64, fc: u64, classes: u64) -> CnnSpec {
    let stages: [(u64, u64); 5] = [(1, 2), (2, 2), (4, 3), (8, 3), (8, 3)];
    let mut layers = Vec::new();
    let mut c_in = 3;
    for (mult, convs) in stages {
        let c_out = width * mult;
        for _ in 0..convs {
            layers.push(conv(3, c_in, c_out, 1, 1, true));
            layers.push(CnnLayer::Relu);
            c_in = c_out;
        }
        layers.push(CnnLayer::Pool {
            kind: PoolKind::Max,
            k: 2,
            stride: 2,
            padding: 0,
        });
    }
    classifier(name, layers, c_in, 7, &[fc, fc], classes)
}
