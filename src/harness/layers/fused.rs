//! Memory-lean autograd ops: one graph node per layer-level op, keeping for backward only the
//! tensors PyTorch's eager kernels keep.
//!
//! Why this exists: candle's autograd keeps *every* input of *every* op alive until backward
//! ends. Composed from primitive ops, a LayerNorm keeps five hidden-sized tensors, a masked
//! softmax four score-sized ones, a linear with bias both the product and the sum, and a float
//! dropout mask costs four bytes per element (backward even computes a gradient for the mask and
//! leaves it in the GradStore). On tiny-gpt (b4, s128, fp32) that was 19.8 MB per block, about
//! 2.5x what PyTorch saves (Korthikanti et al. 2022), so a harness built that way measures
//! candle's graph, not the training job a user will run.
//!
//! Each op below runs its forward as a sequence of backend kernels on raw storages (the
//! `BackendStorage` trait, so one generic function serves CPU and CUDA); the intermediates are
//! freed when the forward returns. Its backward recomputes what it needs from the saved inputs
//! (cheap elementwise work; matmuls are never recomputed), so the graph holds only:
//!
//! | op | kept for backward (besides parameters) |
//! |---|---|
//! | `linear` (+bias, optional head split/merge) | its input |
//! | `layer_norm` / `rms_norm` | its input |
//! | `attention_probs` (QK^T, scale, causal mask, softmax) | Q, K and the probabilities |
//! | `dropout` | its input and a 1-byte mask |
//! | `log_softmax` | its input and output |

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::{self as kern, BinaryOpT, ReduceOp, UnaryOpT};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    D,
};

/// A backend storage whose device allocates storages of the same type (CPU, CUDA).
trait Store: BackendStorage<Device: BackendDevice<Storage = Self>> {}
impl<S: BackendStorage<Device: BackendDevice<Storage = S>>> Store for S {}

/// `cpu_fwd` and `cuda_fwd` of a custom op, both running the op's one `fwd`, written generically
/// over `BackendStorage` (candle's op traits take each backend's concrete storage). Metal keeps
/// candle's default (unsupported). `device_fwd2!(None)` calls `fwd(a, b, None)`; `device_fwd3!`
/// calls `fwd(a, b, Some(c))`.
macro_rules! device_fwd1 {
    () => {
        fn cpu_fwd(&self, a: &CpuStorage, al: &Layout) -> Result<(CpuStorage, Shape)> {
            self.fwd((a, al))
        }
        fn cuda_fwd(&self, a: &CudaStorage, al: &Layout) -> Result<(CudaStorage, Shape)> {
            self.fwd((a, al))
        }
    };
}

macro_rules! device_fwd2 {
    ($($none:ident)?) => {
        fn cpu_fwd(
            &self,
            a: &CpuStorage,
            al: &Layout,
            b: &CpuStorage,
            bl: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            self.fwd((a, al), (b, bl) $(, $none)?)
        }
        fn cuda_fwd(
            &self,
            a: &CudaStorage,
            al: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.fwd((a, al), (b, bl) $(, $none)?)
        }
    };
}

macro_rules! device_fwd3 {
    () => {
        #[allow(clippy::too_many_arguments)]
        fn cpu_fwd(
            &self,
            a: &CpuStorage,
            al: &Layout,
            b: &CpuStorage,
            bl: &Layout,
            c: &CpuStorage,
            cl: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            self.fwd((a, al), (b, bl), Some((c, cl)))
        }
        #[allow(clippy::too_many_arguments)]
        fn cuda_fwd(
            &self,
            a: &CudaStorage,
            al: &Layout,
            b: &CudaStorage,
            bl: &Layout,
            c: &CudaStorage,
            cl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.fwd((a, al), (b, bl), Some((c, cl)))
        }
    };
}

/// `CustomOp2` and `CustomOp3` for an op whose third input is optional (a bias, a LayerNorm
/// beta): the op's generic `fwd(a, b, Option<c>)` and `grads(a, b, has_c, result, grad)`.
macro_rules! optional_third_arg {
    ($op:ty, $name2:literal, $name3:literal) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name2
            }
            device_fwd2!(None);
            fn bwd(
                &self,
                a: &Tensor,
                b: &Tensor,
                res: &Tensor,
                g: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                let [ga, gb, _] = self.grads(a, b, false, res, g)?;
                Ok((ga, gb))
            }
        }

        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name3
            }
            device_fwd3!();
            fn bwd(
                &self,
                a: &Tensor,
                b: &Tensor,
                _: &Tensor,
                res: &Tensor,
                g: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                Ok(self.grads(a, b, true, res, g)?.into())
            }
        }
    };
}

/// An owned storage and the layout to read it with (intermediates of a fused forward).
struct Buf<S> {
    s: S,
    l: Layout,
}

impl<S: BackendStorage> Buf<S> {
    fn new(s: S, shape: impl Into<Shape>) -> Self {
        Self {
            s,
            l: Layout::contiguous(shape),
        }
    }
    fn r(&self) -> (&S, &Layout) {
        (&self.s, &self.l)
    }
    fn into_out(self) -> (S, Shape) {
        let shape = self.l.shape().clone();
        (self.s, shape)
    }
}

type View<'a, S> = (&'a S, &'a Layout);

fn last_dim(l: &Layout) -> usize {
    l.dims().len() - 1
}

/// Reduction over the last dimension, keeping it (size 1).
fn reduce_last<S: BackendStorage>((s, l): View<S>, op: ReduceOp) -> Result<Buf<S>> {
    let d = last_dim(l);
    let mut dims = l.dims().to_vec();
    dims[d] = 1;
    Ok(Buf::new(s.reduce_op(op, l, &[d])?, dims))
}

/// `a op b`, `b` broadcast to `a`'s shape.
fn bcast<S: BackendStorage, B: BinaryOpT>((a, al): View<S>, (b, bl): View<S>) -> Result<Buf<S>> {
    let bl = bl.broadcast_as(al.shape())?;
    Ok(Buf::new(
        a.binary_impl::<B>(b, al, &bl)?,
        al.shape().clone(),
    ))
}

fn unary<S: BackendStorage, U: UnaryOpT>((s, l): View<S>) -> Result<Buf<S>> {
    Ok(Buf::new(s.unary_impl::<U>(l)?, l.shape().clone()))
}

fn affine<S: BackendStorage>((s, l): View<S>, mul: f64, add: f64) -> Result<Buf<S>> {
    Ok(Buf::new(s.affine(l, mul, add)?, l.shape().clone()))
}

fn cast<S: BackendStorage>((s, l): View<S>, dtype: DType) -> Result<Buf<S>> {
    Ok(Buf::new(s.to_dtype(l, dtype)?, l.shape().clone()))
}

/// Max-subtracted softmax over the last dimension, in the input's dtype.
fn softmax_last<S: BackendStorage>(x: View<S>) -> Result<Buf<S>> {
    let max = reduce_last(x, ReduceOp::Max)?;
    let e = unary::<S, kern::Exp>(bcast::<S, kern::Sub>(x, max.r())?.r())?;
    let sum = reduce_last(e.r(), ReduceOp::Sum)?;
    bcast::<S, kern::Div>(e.r(), sum.r())
}

/// `x @ w^T (+ b)` for `x: [n, k]`, `w: [o, k]` (PyTorch's weight layout).
fn linear_fwd<S: BackendStorage>(
    x: View<S>,
    (w, wl): View<S>,
    bias: Option<View<S>>,
) -> Result<Buf<S>> {
    let (n, k) = x.1.shape().dims2()?;
    let o = wl.dims()[0];
    let wt = wl.transpose(0, 1)?;
    let y = Buf::new(x.0.matmul(w, (1, n, o, k), x.1, &wt)?, (n, o));
    match bias {
        Some(b) => bcast::<S, kern::Add>(y.r(), b),
        None => Ok(y),
    }
}

/// Copies `src` read through the strided layout `l` into a new contiguous storage.
fn contiguous<S: Store>(src: &S, l: &Layout) -> Result<Buf<S>> {
    let mut dst = src.device().zeros_impl(l.shape(), src.dtype())?;
    src.copy_strided_src(&mut dst, 0, l)?;
    Ok(Buf::new(dst, l.shape().clone()))
}

/// Head layout of attention tensors: `[batch, heads, seq, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub b: usize,
    pub a: usize,
    pub s: usize,
    pub d: usize,
}

/// Axis order taking `[b, s, g, a, d]` to `[g, b, a, s, d]`, and back.
const SPLIT: [usize; 5] = [2, 0, 3, 1, 4];
const UNSPLIT: [usize; 5] = [1, 3, 0, 2, 4];

/// Linear layer as one graph node. `split: (heads, g)`: the output `[b*s, g*a*d]` is returned
/// as `g` groups of attention heads `[g, b, a, s, d]` (fused QKV: g = 3) without keeping the
/// unsplit product; `merge`: the input is `[b, a, s, d]` and is read as `[b*s, a*d]` without
/// keeping a merged copy.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LinearOp {
    pub(super) split: Option<(Heads, usize)>,
    pub(super) merge: Option<Heads>,
}

impl LinearOp {
    /// The head layouts below are built from `Heads`, so they are checked against the real sizes
    /// first (a mismatch would read out of bounds in a strided copy).
    fn check_heads(&self, x: &Layout, w: &Layout) -> Result<()> {
        let (o, k) = w.shape().dims2()?;
        let n = x.shape().elem_count() / k.max(1);
        if let Some(h) = self.merge {
            if x.dims() != [h.b, h.a, h.s, h.d] || h.a * h.d != k {
                candle_core::bail!(
                    "head merge: input {:?} is not {h:?} for a [{o}, {k}] weight",
                    x.dims()
                );
            }
        }
        if let Some((h, g)) = self.split {
            if n != h.b * h.s || o != g * h.a * h.d {
                candle_core::bail!("head split: {n} rows x {o} outputs do not make {g} x {h:?}");
            }
        }
        Ok(())
    }

    fn fwd<S: Store>(&self, x: View<S>, w: View<S>, b: Option<View<S>>) -> Result<(S, Shape)> {
        self.check_heads(x.1, w.1)?;
        let merged;
        let x2;
        let x = match self.merge {
            Some(h) => {
                // [b, a, s, d] read as [b, s, a, d]: transpose the input's own layout.
                merged = contiguous(x.0, &x.1.transpose(1, 2)?)?;
                x2 = Layout::contiguous((h.b * h.s, h.a * h.d));
                (&merged.s, &x2)
            }
            None => {
                let dims = x.1.dims();
                let k = dims[dims.len() - 1];
                let n = x.1.shape().elem_count() / k;
                if !x.1.is_contiguous() {
                    candle_core::bail!("fused linear needs a contiguous input");
                }
                x2 = Layout::contiguous_with_offset((n, k), x.1.start_offset());
                (x.0, &x2)
            }
        };
        let y = linear_fwd(x, w, b)?;
        match self.split {
            Some((h, g)) => {
                // [b, s, g, a, d] -> [g, b, a, s, d]
                let l = Layout::contiguous((h.b, h.s, g, h.a, h.d)).permute(&SPLIT)?;
                Ok(contiguous(&y.s, &l)?.into_out())
            }
            None => Ok(y.into_out()),
        }
    }

    /// Gradients of input, weight and bias. Only `x` (and the weight) were kept; the merged
    /// input is recomputed when needed.
    pub(super) fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_bias: bool,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let (x, w) = (x.detach(), w.detach());
        let o = w.dim(0)?;
        let g2 = match self.split {
            Some(_) => g.permute(UNSPLIT)?.contiguous()?.reshape(((), o))?,
            None => g.reshape(((), o))?,
        };
        let x2 = match self.merge {
            Some(h) => x
                .transpose(1, 2)?
                .contiguous()?
                .reshape((h.b * h.s, h.a * h.d))?,
            None => x.reshape(((), w.dim(1)?))?,
        };
        let gw = g2.t()?.matmul(&x2)?;
        let gx = g2.matmul(&w)?;
        let gx = match self.merge {
            Some(h) => gx
                .reshape((h.b, h.s, h.a, h.d))?
                .transpose(1, 2)?
                .contiguous()?,
            None => gx.reshape(x.shape())?,
        };
        let gb = if has_bias { Some(g2.sum(0)?) } else { None };
        Ok([Some(gx), Some(gw), gb])
    }

    fn out_shape(&self, x: &Tensor, o: usize) -> Result<Vec<usize>> {
        if let Some((h, g)) = self.split {
            return Ok(vec![g, h.b, h.a, h.s, h.d]);
        }
        Ok(match self.merge {
            Some(h) => vec![h.b, h.s, o],
            None => {
                let mut d = x.dims().to_vec();
                *d.last_mut().expect("rank >= 1") = o;
                d
            }
        })
    }
}

optional_third_arg!(LinearOp, "fused-linear", "fused-linear-bias");

/// `x @ w^T + b` over the last dimension of `x` (any rank), one graph node.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_with(LinearOp::default(), x, w, b)
}

/// Linear whose output is split into `groups` sets of attention heads `[groups, b, a, s, d]`.
pub fn linear_split_heads(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    h: Heads,
    groups: usize,
) -> Result<Tensor> {
    let op = LinearOp {
        split: Some((h, groups)),
        merge: None,
    };
    linear_with(op, x, w, b)
}

/// Linear reading attention heads `[b, a, s, d]` as `[b, s, a*d]`.
pub fn linear_merge_heads(x: &Tensor, w: &Tensor, b: Option<&Tensor>, h: Heads) -> Result<Tensor> {
    linear_with(
        LinearOp {
            split: None,
            merge: Some(h),
        },
        x,
        w,
        b,
    )
}

fn linear_with(op: LinearOp, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let shape = op.out_shape(&x, w.dim(0)?)?;
    let y = match b {
        Some(b) => x.apply_op3(w, b, op)?,
        None => x.apply_op2(w, op)?,
    };
    y.reshape(shape)
}

/// Which elements a norm's statistics run over.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stats {
    /// LayerNorm / RMSNorm: the last dimension of each row.
    Last,
    /// BatchNorm (training mode) on NCHW: batch and spatial dims of each channel.
    Channels,
}

impl Stats {
    fn dims(self, rank: usize) -> Vec<usize> {
        match self {
            Stats::Last => vec![rank - 1],
            Stats::Channels => vec![0, 2, 3],
        }
    }
}

/// Reduction over `dims`, keeping them (size 1).
fn reduce_keep<S: BackendStorage>((s, l): View<S>, op: ReduceOp, dims: &[usize]) -> Result<Buf<S>> {
    let mut shape = l.dims().to_vec();
    for &d in dims {
        shape[d] = 1;
    }
    Ok(Buf::new(s.reduce_op(op, l, dims)?, shape))
}

/// LayerNorm (with `beta`), RMSNorm (without) or training-mode BatchNorm, optionally followed by
/// ReLU (torchvision's in-place ReLU after BN keeps one tensor, so the pair is one node here).
/// Statistics in fp32 whatever the input dtype; output in the input dtype. `gamma`/`beta` come
/// shaped to broadcast against the input (`[h]`, or `[1, c, 1, 1]` for BatchNorm).
#[derive(Debug, Clone)]
struct NormOp {
    eps: f64,
    rms: bool,
    stats: Stats,
    relu: bool,
    /// Tensors held until backward only to keep what PyTorch keeps ([`Kept`]).
    kept: Kept,
}

/// Tensors a node holds from its forward until its backward runs, although its backward
/// recomputes what it needs: the ones a composed PyTorch module saves (transformers' RMSNorm
/// saves the normalized input, `gelu_new` its tanh, `1 + tanh` and `x / 2`), so that the harness
/// holds what PyTorch holds.
#[derive(Debug, Clone, Default)]
struct Kept(Option<std::sync::Arc<std::sync::Mutex<Vec<Tensor>>>>);

impl Kept {
    fn new(ts: Vec<Tensor>) -> Self {
        Self(Some(std::sync::Arc::new(std::sync::Mutex::new(ts))))
    }
    /// Releases the tensors (PyTorch frees a node's saved tensors when its backward has run).
    fn release(&self) -> Vec<Tensor> {
        match &self.0 {
            Some(m) => m
                .lock()
                .map(|mut v| std::mem::take(&mut *v))
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

impl NormOp {
    fn fwd<S: BackendStorage>(
        &self,
        x: View<S>,
        g: View<S>,
        b: Option<View<S>>,
    ) -> Result<(S, Shape)> {
        let dtype = x.0.dtype();
        let dims = self.stats.dims(x.1.dims().len());
        let n: usize = dims.iter().map(|&d| x.1.dims()[d]).product();
        let n = n as f64;
        let xf = cast(x, DType::F32)?;
        let xc = if self.rms {
            xf
        } else {
            let mean = affine(reduce_keep(xf.r(), ReduceOp::Sum, &dims)?.r(), 1.0 / n, 0.0)?;
            let centered = bcast::<S, kern::Sub>(xf.r(), mean.r())?;
            drop(xf);
            centered
        };
        let ss = reduce_keep(unary::<S, kern::Sqr>(xc.r())?.r(), ReduceOp::Sum, &dims)?;
        let var = affine(ss.r(), 1.0 / n, self.eps)?;
        let rstd = unary::<S, kern::Recip>(unary::<S, kern::Sqrt>(var.r())?.r())?;
        let y = bcast::<S, kern::Mul>(xc.r(), rstd.r())?;
        let y = bcast::<S, kern::Mul>(y.r(), cast(g, DType::F32)?.r())?;
        let y = match b {
            Some(b) => bcast::<S, kern::Add>(y.r(), cast(b, DType::F32)?.r())?,
            None => y,
        };
        let y = if self.relu {
            unary::<S, kern::Relu>(y.r())?
        } else {
            y
        };
        Ok(cast(y.r(), dtype)?.into_out())
    }

    /// Recomputes the normalised input from `x` and returns (dx, dgamma, dbeta).
    fn grads(
        &self,
        x: &Tensor,
        g: &Tensor,
        has_beta: bool,
        res: &Tensor,
        gy: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let _kept = self.kept.release();
        let xf = x.detach().to_dtype(DType::F32)?;
        let dims = self.stats.dims(xf.rank());
        let mean = |t: &Tensor| t.mean_keepdim(dims.as_slice());
        let xc = if self.rms {
            xf
        } else {
            xf.broadcast_sub(&mean(&xf)?)?
        };
        let rstd = (mean(&xc.sqr()?)? + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        drop(xc);
        let mut gyf = gy.to_dtype(DType::F32)?;
        if self.relu {
            gyf = (gyf * res.detach().gt(0.0)?.to_dtype(DType::F32)?)?;
        }
        let gxhat = gyf.broadcast_mul(&g.detach().to_dtype(DType::F32)?)?;
        let proj = mean(&(&gxhat * &xhat)?)?;
        let mut inner = (gxhat - xhat.broadcast_mul(&proj)?)?;
        if !self.rms {
            inner = inner.broadcast_sub(&mean(&inner)?)?;
        }
        let gx = inner.broadcast_mul(&rstd)?.to_dtype(x.dtype())?;
        // parameter gradients: sum over every dim the parameter is broadcast along
        let per_param = |t: Tensor| -> Result<Tensor> {
            let t = match self.stats {
                Stats::Last => t.reshape(((), t.dim(D::Minus1)?))?.sum(0)?,
                Stats::Channels => t.sum_keepdim(dims.as_slice())?,
            };
            t.reshape(g.shape())?.to_dtype(g.dtype())
        };
        let gg = per_param((&gyf * &xhat)?)?;
        let gb = if has_beta {
            Some(per_param(gyf)?)
        } else {
            None
        };
        Ok([Some(gx), Some(gg), gb])
    }
}

optional_third_arg!(NormOp, "fused-rms-norm", "fused-layer-norm");

/// LayerNorm over the last dimension (`beta` given: one fused kernel in PyTorch, keeping its
/// input) or RMSNorm (`beta` None: composed in transformers, keeping its input, an fp32 copy of
/// a half input, and the normalized input before the weight).
pub fn norm(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let kept = if beta.is_none() {
        let xf = x.detach().to_dtype(DType::F32)?;
        let ms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?;
        let xhat = xf.broadcast_div(&ms.sqrt()?)?.to_dtype(x.dtype())?;
        Kept::new(if x.dtype() == DType::F32 {
            vec![xhat]
        } else {
            vec![xhat, xf]
        })
    } else {
        Kept::default()
    };
    let op = NormOp {
        eps,
        rms: beta.is_none(),
        stats: Stats::Last,
        relu: false,
        kept,
    };
    match beta {
        Some(b) => x.apply_op3(gamma, b, op),
        None => x.apply_op2(gamma, op),
    }
}

/// Training-mode BatchNorm of NCHW `x` (batch statistics), optionally followed by ReLU, one node.
pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, relu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    let op = NormOp {
        eps: 1e-5,
        rms: false,
        stats: Stats::Channels,
        relu,
        kept: Kept::default(),
    };
    x.contiguous()?.apply_op3(
        &gamma.reshape((1, c, 1, 1))?,
        &beta.reshape((1, c, 1, 1))?,
        op,
    )
}

/// `relu(a + b)` for same-shape tensors (a residual join), one node keeping only the output.
#[derive(Debug, Clone, Copy)]
struct AddReluOp;

impl AddReluOp {
    fn fwd<S: BackendStorage>(&self, a: View<S>, b: View<S>) -> Result<(S, Shape)> {
        let sum = Buf::new(
            a.0.binary_impl::<kern::Add>(b.0, a.1, b.1)?,
            a.1.shape().clone(),
        );
        Ok(unary::<S, kern::Relu>(sum.r())?.into_out())
    }
}

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "fused-add-relu"
    }
    device_fwd2!();
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = (g * res.detach().gt(0.0)?.to_dtype(g.dtype())?)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `relu(a + b)`: the residual join of a ResNet block.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}

/// Per-channel bias add on NCHW `y` (a conv output), optionally followed by ReLU, one node.
#[derive(Debug, Clone, Copy)]
struct BiasActOp {
    relu: bool,
}

impl BiasActOp {
    fn fwd<S: BackendStorage>(&self, y: View<S>, b: View<S>) -> Result<(S, Shape)> {
        let out = bcast::<S, kern::Add>(y, b)?;
        if self.relu {
            Ok(unary::<S, kern::Relu>(out.r())?.into_out())
        } else {
            Ok(out.into_out())
        }
    }
}

impl CustomOp2 for BiasActOp {
    fn name(&self) -> &'static str {
        "fused-bias-act"
    }
    device_fwd2!();
    fn bwd(
        &self,
        _: &Tensor,
        b: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = if self.relu {
            (g * res.detach().gt(0.0)?.to_dtype(g.dtype())?)?
        } else {
            g.clone()
        };
        let gb = g.sum_keepdim((0, 2, 3))?.reshape(b.shape())?;
        Ok((Some(g), Some(gb)))
    }
}

/// `y + b` per channel (then ReLU when `relu`) for NCHW `y`.
pub fn bias_act(y: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    let c = y.dim(1)?;
    y.contiguous()?
        .apply_op2(&b.reshape((1, c, 1, 1))?, BiasActOp { relu })
}

/// `softmax(scale * q k^T + causal mask)` for `q, k: [b, a, s, d]`, one graph node keeping q, k
/// and the probabilities (what PyTorch's eager attention keeps).
#[derive(Debug, Clone, Copy)]
struct AttnProbsOp {
    scale: f64,
    causal: bool,
}

impl AttnProbsOp {
    fn fwd<S: Store>(&self, (q, ql): View<S>, (k, kl): View<S>) -> Result<(S, Shape)> {
        let (b, a, s, d) = ql.shape().dims4()?;
        let kt = kl.transpose(2, 3)?;
        let scores = Buf::new(q.matmul(k, (b * a, s, s, d), ql, &kt)?, (b, a, s, s));
        let scores = affine(scores.r(), self.scale, 0.0)?;
        let scores = if self.causal {
            let mask: Vec<f32> = (0..s)
                .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Buf::new(q.device().storage_from_slice(&mask)?, (s, s));
            let mask = cast(mask.r(), q.dtype())?;
            bcast::<S, kern::Add>(scores.r(), mask.r())?
        } else {
            scores
        };
        Ok(softmax_last(scores.r())?.into_out())
    }
}

impl CustomOp2 for AttnProbsOp {
    fn name(&self) -> &'static str {
        "fused-attention-probs"
    }
    device_fwd2!();
    /// dscores = p * (dp - sum(dp * p)); masked entries have p = 0 and get no gradient.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        gp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let p = p.detach();
        let dot = (gp * &p)?.sum_keepdim(D::Minus1)?;
        let gs = (gp.broadcast_sub(&dot)? * &p)?.affine(self.scale, 0.0)?;
        let gq = gs.matmul(&k.detach())?;
        let gk = gs.t()?.matmul(&q.detach())?;
        Ok((Some(gq), Some(gk)))
    }
}

/// Attention probabilities for `q, k: [b, a, s, d]` (contiguous).
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    q.contiguous()?
        .apply_op2(&k.contiguous()?, AttnProbsOp { scale, causal })
}

/// Elementwise activation of an FFN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    /// GELU, tanh approximation (GPT-2's `gelu_new`, candle's `gelu`)
    Gelu,
    /// SiLU (x * sigmoid(x)), the gate of SwiGLU
    Silu,
}

/// An FFN activation as one node keeping only its input; candle's own GELU backward builds
/// about 20 input-sized temporaries (measured), PyTorch's fused kernel one.
#[derive(Debug, Clone, Copy)]
struct ActOp(Act);

impl ActOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>) -> Result<(S, Shape)> {
        Ok(match self.0 {
            Act::Gelu => unary::<S, kern::Gelu>(x)?,
            Act::Silu => unary::<S, kern::Silu>(x)?,
        }
        .into_out())
    }
}

impl CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "fused-activation"
    }
    device_fwd1!();
    fn bwd(&self, x: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.apply_op2_no_bwd(&x.detach(), &ActGradOp(self.0))?))
    }
}

/// `g * act'(x)`, composed so that at most a few input-sized temporaries are alive at once.
#[derive(Debug, Clone, Copy)]
struct ActGradOp(Act);

impl ActGradOp {
    /// Runs [`Self::part`] over blocks of `ACT_CHUNK` elements into one output buffer, so that
    /// the temporaries are block-sized and the op allocates one input-sized tensor, as PyTorch's
    /// fused activation backward does.
    fn fwd<S: Store>(&self, g: View<S>, x: View<S>) -> Result<(S, Shape)> {
        const ACT_CHUNK: usize = 1 << 16;
        let n = x.1.shape().elem_count();
        if n <= ACT_CHUNK || !x.1.is_contiguous() || !g.1.is_contiguous() {
            return Ok(self.part(g, x)?.into_out());
        }
        let shape = x.1.shape().clone();
        let mut dst = x.0.device().zeros_impl(&shape, x.0.dtype())?;
        let mut start = 0;
        while start < n {
            let len = ACT_CHUNK.min(n - start);
            let gl = Layout::contiguous_with_offset(len, g.1.start_offset() + start);
            let xl = Layout::contiguous_with_offset(len, x.1.start_offset() + start);
            let part = self.part((g.0, &gl), (x.0, &xl))?;
            part.s.copy_strided_src(&mut dst, start, &part.l)?;
            start += len;
        }
        Ok((dst, shape))
    }

    fn part<S: Store>(&self, g: View<S>, x: View<S>) -> Result<Buf<S>> {
        let mul = |a: &Buf<S>, b: View<S>| -> Result<Buf<S>> {
            Ok(Buf::new(
                a.s.binary_impl::<kern::Mul>(b.0, &a.l, b.1)?,
                a.l.shape().clone(),
            ))
        };
        let d = match self.0 {
            Act::Gelu => {
                // d = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3k x^2),  t = tanh(c (x + k x^3)).
                // x is clamped to [-10, 10] first: d is 0 or 1 to any float precision beyond,
                // and in f16 x^2 overflows from |x| = 256, which would make 0 * inf = NaN.
                let clamped = clamp(x, 10.0)?;
                let x = clamped.r();
                let (c, k) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
                let x2 = unary::<S, kern::Sqr>(x)?;
                let inner = mul(&affine(x2.r(), k, 1.0)?, x)?;
                let t = unary::<S, kern::Tanh>(affine(inner.r(), c, 0.0)?.r())?;
                drop(inner);
                let half_1pt = affine(t.r(), 0.5, 0.5)?;
                let one_m_t2 = affine(unary::<S, kern::Sqr>(t.r())?.r(), -1.0, 1.0)?;
                drop(t);
                let slope = affine(x2.r(), 3.0 * k * c * 0.5, c * 0.5)?;
                drop(x2);
                let r = mul(&mul(&one_m_t2, slope.r())?, x)?;
                drop((one_m_t2, slope));
                Buf::new(
                    half_1pt
                        .s
                        .binary_impl::<kern::Add>(&r.s, &half_1pt.l, &r.l)?,
                    half_1pt.l.shape().clone(),
                )
            }
            Act::Silu => {
                // d = s (1 + x (1 - s)),  s = sigmoid(x) = 1 / (1 + exp(-x))
                let e = unary::<S, kern::Exp>(affine(x, -1.0, 0.0)?.r())?;
                let sig = unary::<S, kern::Recip>(affine(e.r(), 1.0, 1.0)?.r())?;
                drop(e);
                let t = affine(mul(&affine(sig.r(), -1.0, 1.0)?, x)?.r(), 1.0, 1.0)?;
                mul(&sig, t.r())?
            }
        };
        mul(&d, g)
    }
}

impl CustomOp2 for ActGradOp {
    fn name(&self) -> &'static str {
        "fused-activation-grad"
    }
    device_fwd2!();
}

/// `x` limited to `[-bound, bound]`, in its own dtype.
fn clamp<S: Store>(x: View<S>, bound: f32) -> Result<Buf<S>> {
    let limit = |v: f32| -> Result<Buf<S>> {
        let one = Buf::new(x.0.device().storage_from_slice(&[v])?, 1);
        let one = cast(one.r(), x.0.dtype())?;
        Ok(Buf {
            l: one.l.broadcast_as(x.1.shape())?,
            s: one.s,
        })
    };
    let (hi, lo) = (limit(bound)?, limit(-bound)?);
    let below = Buf::new(
        x.0.binary_impl::<kern::Minimum>(&hi.s, x.1, &hi.l)?,
        x.1.shape().clone(),
    );
    Ok(Buf::new(
        below
            .s
            .binary_impl::<kern::Maximum>(&lo.s, &below.l, &lo.l)?,
        x.1.shape().clone(),
    ))
}

/// GELU (tanh approximation) or SiLU of `x`, one node.
pub fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActOp(act))
}

/// transformers' `gelu_new` (GPT-2's default): the tanh GELU composed of elementwise ops, whose
/// autograd keeps, besides the input, `tanh(..)`, `1 + tanh(..)` and `x / 2` (the harness computes
/// with the fused tanh GELU and holds those three until backward).
#[derive(Debug, Clone)]
struct GeluNewOp(Kept);

impl GeluNewOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>) -> Result<(S, Shape)> {
        ActOp(Act::Gelu).fwd(x)
    }
}

impl CustomOp1 for GeluNewOp {
    fn name(&self) -> &'static str {
        "gelu-new"
    }
    device_fwd1!();
    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let _kept = self.0.release();
        ActOp(Act::Gelu).bwd(x, res, g)
    }
}

/// `gelu_new(x)`, holding what PyTorch's composed version holds.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let kept = {
        let xd = x.detach();
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let inner = (((xd.sqr()? * &xd)? * 0.044715)? + &xd)?;
        let t = (inner * c)?.tanh()?;
        let one_plus = (&t + 1.0)?;
        let half = (&xd * 0.5)?;
        Kept::new(vec![t, one_plus, half])
    };
    x.apply_op1(GeluNewOp(kept))
}

/// Inverted dropout. The keep mask is either of `x`'s dtype holding 0 or `1 / (1 - p)` (what
/// PyTorch's CPU dropout keeps: its scaled noise tensor) or `u8` (1 = keep, what PyTorch's CUDA
/// kernel keeps as a bool mask).
#[derive(Debug, Clone, Copy)]
struct DropoutOp {
    scale: f64,
}

impl DropoutOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>, mask: View<S>) -> Result<(S, Shape)> {
        if mask.0.dtype() == x.0.dtype() {
            let y = x.0.binary_impl::<kern::Mul>(mask.0, x.1, mask.1)?;
            return Ok((y, x.1.shape().clone()));
        }
        let m = cast(mask, x.0.dtype())?;
        let y = Buf::new(
            x.0.binary_impl::<kern::Mul>(&m.s, x.1, &m.l)?,
            x.1.shape().clone(),
        );
        Ok(affine(y.r(), self.scale, 0.0)?.into_out())
    }
}

impl CustomOp2 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }
    device_fwd2!();
    fn bwd(
        &self,
        _: &Tensor,
        mask: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dropout_grad(g, mask, self.scale)?), None))
    }
}

/// The gradient through inverted dropout: `g * mask` for a mask of `g`'s dtype (one
/// allocation, as PyTorch's CPU backward), `g * mask * scale` for a `u8` mask.
pub(super) fn dropout_grad(g: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if mask.dtype() == g.dtype() {
        return g.mul(&mask.reshape(g.shape())?);
    }
    (g * mask.reshape(g.shape())?.to_dtype(g.dtype())?)?.affine(scale, 0.0)
}

/// `x * mask / (1 - p)` with a keep mask of `x`'s shape ([`DropoutOp`]: `u8`, or of `x`'s dtype
/// holding the scaled values). A graph node keeping `x` and the mask; [`super::joins`] has the
/// nodes that keep only the mask.
pub fn dropout(x: &Tensor, keep_mask: &Tensor, p: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &keep_mask.contiguous()?,
        DropoutOp {
            scale: 1.0 / (1.0 - p as f64),
        },
    )
}

/// Log-softmax over the last dimension, computed and returned in fp32 (autocast runs the loss
/// in fp32).
#[derive(Debug, Clone, Copy)]
struct LogSoftmaxOp;

impl LogSoftmaxOp {
    fn fwd<S: BackendStorage>(&self, x: View<S>) -> Result<(S, Shape)> {
        let xf = cast(x, DType::F32)?;
        let max = reduce_last(xf.r(), ReduceOp::Max)?;
        let diff = bcast::<S, kern::Sub>(xf.r(), max.r())?;
        drop(xf);
        let sum = reduce_last(unary::<S, kern::Exp>(diff.r())?.r(), ReduceOp::Sum)?;
        let lse = unary::<S, kern::Log>(sum.r())?;
        Ok(bcast::<S, kern::Sub>(diff.r(), lse.r())?.into_out())
    }
}

impl CustomOp1 for LogSoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-log-softmax"
    }
    device_fwd1!();
    fn bwd(&self, x: &Tensor, logp: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let sum = g.sum_keepdim(D::Minus1)?;
        let gx = (g - logp.detach().exp()?.broadcast_mul(&sum)?)?;
        Ok(Some(gx.to_dtype(x.dtype())?))
    }
}

/// fp32 log-softmax over the last dimension, outside the graph.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&LogSoftmaxOp)
}

/// Mean cross-entropy of `logits: [n, c]` (any float dtype) against class ids `[n]` (u32):
/// fp32 log-softmax (one node) then candle-nn's NLL (a gather).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = logits.contiguous()?.apply_op1(LogSoftmaxOp)?;
    candle_nn::loss::nll(&logp, targets)
}

#[cfg(test)]
mod tests {
    //! Each fused op against the same function composed from candle's primitive ops: outputs and
    //! every input gradient agree to fp32 rounding.
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut rng = super::super::params::FastRng::new(seed);
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        crate::harness::compare::max_rel_err(a, b).unwrap()
    }

    /// Runs `fused` and `reference` on Vars made from `inputs`, back-propagates the same random
    /// projection of the output through both, and compares output and gradients.
    fn same(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let r = rand(y.dims(), 99).to_dtype(y.dtype()).unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * r.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let gs = loss.backward().unwrap();
            let grads: Vec<Tensor> = vars.iter().map(|v| gs.get(v).unwrap().clone()).collect();
            (y, grads)
        };
        let (yf, gf) = run(&fused);
        let (yr, gr) = run(&reference);
        assert_eq!(yf.dims(), yr.dims());
        assert!(rel_err(&yf, &yr) < 1e-5, "output {}", rel_err(&yf, &yr));
        for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
            assert_eq!(a.dims(), b.dims(), "grad {i}");
            assert!(rel_err(a, b) < 1e-5, "grad {i}: {}", rel_err(a, b));
        }
    }

    #[test]
    fn linear_with_and_without_bias() {
        let (x, w, b) = (rand(&[2, 5, 6], 1), rand(&[7, 6], 2), rand(&[7], 3));
        same(
            &[x.clone(), w.clone(), b],
            |t| linear(&t[0], &t[1], Some(&t[2])),
            |t| t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2]),
        );
        same(
            &[x, w],
            |t| linear(&t[0], &t[1], None),
            |t| t[0].broadcast_matmul(&t[1].t()?),
        );
    }

    #[test]
    fn linear_split_and_merge_heads() {
        let h = Heads {
            b: 2,
            a: 3,
            s: 5,
            d: 4,
        };
        let (x, w, b) = (rand(&[2, 5, 8], 4), rand(&[36, 8], 5), rand(&[36], 6));
        same(
            &[x, w, b],
            |t| linear_split_heads(&t[0], &t[1], Some(&t[2]), h, 3),
            |t| {
                t[0].broadcast_matmul(&t[1].t()?)?
                    .broadcast_add(&t[2])?
                    .reshape((2, 5, 3, 3, 4))?
                    .permute((2, 0, 3, 1, 4))
            },
        );
        let (x, w) = (rand(&[2, 3, 5, 4], 7), rand(&[6, 12], 8));
        same(
            &[x, w],
            |t| linear_merge_heads(&t[0], &t[1], None, h),
            |t| {
                t[0].transpose(1, 2)?
                    .reshape((2, 5, 12))?
                    .broadcast_matmul(&t[1].t()?)
            },
        );
    }

    #[test]
    fn layer_norm_and_rms_norm() {
        let (x, g, b) = (rand(&[3, 4, 16], 9), rand(&[16], 10), rand(&[16], 11));
        same(
            &[x.clone(), g.clone(), b],
            |t| norm(&t[0], &t[1], Some(&t[2]), 1e-5),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-5),
        );
        same(
            &[x, g],
            |t| norm(&t[0], &t[1], None, 1e-6),
            |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-6),
        );
    }

    #[test]
    fn batch_norm_relu_add_relu_bias_act() {
        let (x, g, b) = (rand(&[3, 4, 5, 5], 20), rand(&[4], 21), rand(&[4], 22));
        let bc = |t: &Tensor| t.reshape((1, 4, 1, 1));
        for relu in [false, true] {
            same(
                &[x.clone(), g.clone(), b.clone()],
                |t| batch_norm(&t[0], &t[1], &t[2], relu),
                |t| {
                    let xc = t[0].broadcast_sub(&t[0].mean_keepdim((0, 2, 3))?)?;
                    let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
                    let y = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
                    let y = y.broadcast_mul(&bc(&t[1])?)?.broadcast_add(&bc(&t[2])?)?;
                    if relu {
                        y.relu()
                    } else {
                        Ok(y)
                    }
                },
            );
            same(
                &[x.clone(), b.clone()],
                |t| bias_act(&t[0], &t[1], relu),
                |t| {
                    let y = t[0].broadcast_add(&bc(&t[1])?)?;
                    if relu {
                        y.relu()
                    } else {
                        Ok(y)
                    }
                },
            );
        }
        same(
            &[x.clone(), rand(&[3, 4, 5, 5], 23)],
            |t| add_relu(&t[0], &t[1]),
            |t| (&t[0] + &t[1])?.relu(),
        );
    }

    #[test]
    fn attention_probs_causal_and_not() {
        let (q, k) = (rand(&[2, 3, 6, 4], 12), rand(&[2, 3, 6, 4], 13));
        for causal in [false, true] {
            same(
                &[q.clone(), k.clone()],
                |t| attention_probs(&t[0], &t[1], 0.5, causal),
                |t| {
                    let mut s = (t[0].matmul(&t[1].t()?)? * 0.5)?;
                    if causal {
                        let m: Vec<f32> = (0..6)
                            .flat_map(|i| {
                                (0..6).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })
                            })
                            .collect();
                        s = s.broadcast_add(&Tensor::from_vec(m, (6, 6), &Device::Cpu)?)?;
                    }
                    candle_nn::ops::softmax(&s, D::Minus1)
                },
            );
        }
    }

    #[test]
    fn half_gelu_gradient_stays_finite_where_x_squared_overflows() {
        let x = Var::from_tensor(
            &Tensor::new(&[-300f32, -3.0, 0.5, 300.0], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        )
        .unwrap();
        let y = activation(x.as_tensor(), Act::Gelu).unwrap();
        let g = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g
            .get(&x)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        assert!(g[0].abs() < 1e-3 && (g[3] - 1.0).abs() < 1e-3, "{g:?}");
    }

    #[test]
    fn head_sizes_that_do_not_match_the_weight_are_refused() {
        let h = Heads {
            b: 2,
            a: 3,
            s: 5,
            d: 4,
        };
        let (x, w) = (rand(&[2, 5, 8], 40), rand(&[30, 8], 41));
        assert!(linear_split_heads(&x, &w, None, h, 3).is_err());
    }

    #[test]
    fn gelu_and_silu() {
        let x = (rand(&[4, 33], 30) * 4.0).unwrap();
        same(
            std::slice::from_ref(&x),
            |t| activation(&t[0], Act::Gelu),
            |t| t[0].gelu(),
        );
        same(&[x], |t| activation(&t[0], Act::Silu), |t| t[0].silu());
    }

    /// The eager-attention node (one node, softmax backward in row tiles, dropout inside) equals
    /// the composed graph, with and without dropout, for a float (CPU) and a u8 keep mask, and
    /// over more rows than one tile.
    #[test]
    fn eager_attention_matches_the_composed_graph() {
        let sh = [2, 2, 70, 4];
        let (q, k, v) = (rand(&sh, 30), rand(&sh, 31), rand(&sh, 32));
        let keep = rand(&[2, 2, 70, 70], 33).ge(-0.6).unwrap();
        let fmask = (keep.to_dtype(DType::F32).unwrap() / 0.8).unwrap();
        for causal in [false, true] {
            for mask in [None, Some(&fmask), Some(&keep)] {
                same(
                    &[q.clone(), k.clone(), v.clone()],
                    |t| {
                        let drop = mask.map(|m| (m, 0.2f32));
                        super::super::joins::eager_attention(&t[0], &t[1], &t[2], 0.5, causal, drop)
                    },
                    |t| {
                        let p = attention_probs(&t[0], &t[1], 0.5, causal)?;
                        let p = match mask {
                            Some(_) => p.mul(&fmask)?,
                            None => p,
                        };
                        p.matmul(&t[2])
                    },
                );
            }
        }
    }

    /// Flash attention with fewer K/V heads equals it on K/V repeated to all heads.
    #[test]
    fn flash_attention_grouped_query() {
        let (q, k, v) = (
            rand(&[1, 4, 70, 4], 34),
            rand(&[1, 2, 70, 4], 35),
            rand(&[1, 2, 70, 4], 36),
        );
        let rep = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as((1, 2, 2, 70, 4))?
                .reshape((1, 4, 70, 4))
        };
        same(
            &[q, k, v],
            |t| super::super::flash::attention(&t[0], &t[1], &t[2], 0.5, true),
            |t| super::super::flash::attention(&t[0], &rep(&t[1])?, &rep(&t[2])?, 0.5, true),
        );
    }

    #[test]
    fn dropout_matches_a_float_mask() {
        let x = rand(&[4, 9], 14);
        let keep = rand(&[4, 9], 15).ge(-0.6).unwrap();
        same(
            &[x],
            |t| dropout(&t[0], &keep, 0.2),
            |t| t[0].mul(&(keep.to_dtype(DType::F32)? / 0.8)?),
        );
    }

    #[test]
    fn cross_entropy_matches_candle_nn() {
        let logits = rand(&[6, 10], 16);
        let targets = Tensor::new(&[1u32, 0, 9, 3, 3, 7], &Device::Cpu).unwrap();
        same(
            &[logits],
            |t| cross_entropy(&t[0], &targets),
            |t| candle_nn::loss::cross_entropy(&t[0], &targets),
        );
    }

    #[test]
    fn half_inputs_keep_their_dtype_and_fp32_statistics() {
        let x = (rand(&[2, 8], 17) * 100.0)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let g = Tensor::ones(8, DType::F16, &Device::Cpu).unwrap();
        let y = norm(&x, &g, None, 1e-6).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        let rms = y
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        assert!((rms.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-2);
        let logp = x.apply_op1(LogSoftmaxOp).unwrap();
        assert_eq!(logp.dtype(), DType::F32);
    }
}
