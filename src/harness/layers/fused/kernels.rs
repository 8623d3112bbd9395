//! The toolkit the fused ops are written with: generic forwards over candle's `BackendStorage`
//! (one function serves CPU and CUDA, the `device_fwd*!` macros hand it each backend's storage),
//! owned intermediates with their layouts, reductions, broadcasts and casts on raw storages, and
//! [`Kept`], the tensors a node holds until its backward only because PyTorch holds them.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::{BinaryOpT, ReduceOp, UnaryOpT};
use candle_core::{DType, Layout, Result, Shape, Tensor};

/// A backend storage whose device allocates storages of the same type (CPU, CUDA).
pub(super) trait Store: BackendStorage<Device: BackendDevice<Storage = Self>> {}
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
pub(super) struct Buf<S> {
    pub(super) s: S,
    pub(super) l: Layout,
}

impl<S: BackendStorage> Buf<S> {
    pub(super) fn new(s: S, shape: impl Into<Shape>) -> Self {
        Self {
            s,
            l: Layout::contiguous(shape),
        }
    }
    pub(super) fn r(&self) -> (&S, &Layout) {
        (&self.s, &self.l)
    }
    pub(super) fn into_out(self) -> (S, Shape) {
        let shape = self.l.shape().clone();
        (self.s, shape)
    }
}

pub(super) type View<'a, S> = (&'a S, &'a Layout);

pub(super) fn last_dim(l: &Layout) -> usize {
    l.dims().len() - 1
}

/// Reduction over the last dimension, keeping it (size 1).
pub(super) fn reduce_last<S: BackendStorage>((s, l): View<S>, op: ReduceOp) -> Result<Buf<S>> {
    let d = last_dim(l);
    let mut dims = l.dims().to_vec();
    dims[d] = 1;
    Ok(Buf::new(s.reduce_op(op, l, &[d])?, dims))
}

/// `a op b`, `b` broadcast to `a`'s shape.
pub(super) fn bcast<S: BackendStorage, B: BinaryOpT>(
    (a, al): View<S>,
    (b, bl): View<S>,
) -> Result<Buf<S>> {
    let bl = bl.broadcast_as(al.shape())?;
    Ok(Buf::new(
        a.binary_impl::<B>(b, al, &bl)?,
        al.shape().clone(),
    ))
}

pub(super) fn unary<S: BackendStorage, U: UnaryOpT>((s, l): View<S>) -> Result<Buf<S>> {
    Ok(Buf::new(s.unary_impl::<U>(l)?, l.shape().clone()))
}

pub(super) fn affine<S: BackendStorage>((s, l): View<S>, mul: f64, add: f64) -> Result<Buf<S>> {
    Ok(Buf::new(s.affine(l, mul, add)?, l.shape().clone()))
}

pub(super) fn cast<S: BackendStorage>((s, l): View<S>, dtype: DType) -> Result<Buf<S>> {
    Ok(Buf::new(s.to_dtype(l, dtype)?, l.shape().clone()))
}

/// Copies `src` read through the strided layout `l` into a new contiguous storage.
pub(super) fn contiguous<S: Store>(src: &S, l: &Layout) -> Result<Buf<S>> {
    let mut dst = src.device().zeros_impl(l.shape(), src.dtype())?;
    src.copy_strided_src(&mut dst, 0, l)?;
    Ok(Buf::new(dst, l.shape().clone()))
}

/// Tensors a node holds from its forward until its backward runs, although its backward
/// recomputes what it needs: the ones a composed PyTorch module saves (transformers' RMSNorm
/// saves the normalized input, `gelu_new` its tanh, `1 + tanh` and `x / 2`), so that the harness
/// holds what PyTorch holds.
#[derive(Debug, Clone, Default)]
pub(super) struct Kept(Option<std::sync::Arc<std::sync::Mutex<Vec<Tensor>>>>);

impl Kept {
    pub(super) fn new(ts: Vec<Tensor>) -> Self {
        Self(Some(std::sync::Arc::new(std::sync::Mutex::new(ts))))
    }
    /// Releases the tensors (PyTorch frees a node's saved tensors when its backward has run).
    pub(super) fn release(&self) -> Vec<Tensor> {
        match &self.0 {
            Some(m) => m
                .lock()
                .map(|mut v| std::mem::take(&mut *v))
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }
}
