//! Handing a forward value computed outside a graph node to the node: the value is computed with
//! tensor ops on detached inputs (so one function serves CPU and CUDA and its temporaries are
//! freed), and the node's forward takes it once. The node then keeps only the inputs it is given,
//! which are chosen to be what PyTorch's kernel saves (`joins`, `flash`, `conv`, `pool`).

use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, Result, Shape, Storage, Tensor,
};
use std::sync::Mutex;

/// A value computed outside the node, taken once by the node's forward.
pub(crate) struct Handed(Mutex<Option<Tensor>>);

impl Handed {
    pub(crate) fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }
    fn take(&self) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned hand-over".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("hand-over forward ran twice".into()))
    }
    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.give(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }
    pub(crate) fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.give(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }
    fn give<S: BackendStorage>(&self, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            None => candle_core::bail!("hand-over: value on another device than the inputs"),
        }
    }
}

macro_rules! handed_fwd {
    ($($arg:ident),*) => {
        fn cpu_fwd(&self, $($arg: &CpuStorage, _: &Layout),*) -> Result<(CpuStorage, Shape)> {
            $(let _ = $arg;)*
            self.out.cpu()
        }
        fn cuda_fwd(&self, $($arg: &CudaStorage, _: &Layout),*) -> Result<(CudaStorage, Shape)> {
            $(let _ = $arg;)*
            self.out.cuda()
        }
    };
}

pub(crate) use handed_fwd;
