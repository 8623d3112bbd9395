//! CUDA memory probe: the default memory pool's high-water marks, plus `cuMemGetInfo`.
//!
//! What candle 0.11.1 / cudarc 0.19.10 actually do (read in their sources, not assumed):
//! - candle's `CudaDevice::alloc` / `alloc_zeros` (cuda_backend/device.rs) forward to
//!   `cudarc::driver::CudaStream::alloc` / `alloc_zeros` on the device's single stream; candle has
//!   no caching allocator of its own.
//! - cudarc's `CudaStream::alloc` (driver/safe/core.rs) calls `result::malloc_async`
//!   (`cuMemAllocAsync`) when `ctx.has_async_alloc` is true, and `cuMemAlloc` otherwise;
//!   `has_async_alloc` is `CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED > 0`, queried when the context
//!   is created. Slices are freed with `cuMemFreeAsync`. `cuMemAllocAsync` without an explicit pool
//!   allocates from the device's *default* pool (`cuDeviceGetDefaultMemPool`).
//!
//! So on H100/H200 (pools supported) every candle tensor comes from the default pool, and
//! `CU_MEMPOOL_ATTR_USED_MEM_HIGH` is exactly the high-water mark of live tensor bytes (the
//! analogue of PyTorch's `max_memory_allocated`), `RESERVED_MEM_HIGH` what the pool took from the
//! device (`max_memory_reserved`). Neither includes the CUDA context or cuBLAS's workspace; the
//! `cuMemGetInfo` reading (device-wide used bytes after the step) does, and is recorded beside them.
//! Where pools are unsupported the pool stays empty: [`Probe::peak`] then falls back to the
//! `cuMemGetInfo` delta, which with `cuMemAlloc` is exact at the moment it is read.

use anyhow::{bail, Context};
use cudarc::driver::sys;
use std::sync::Arc;

/// Handle on one device's default pool; created after candle's context exists (so the primary
/// context is current on this thread).
pub struct Probe {
    ctx: Arc<cudarc::driver::CudaContext>,
    pool: sys::CUmemoryPool,
    pools_supported: bool,
    /// device-wide used bytes (total - free) when the probe was created
    used_at_start: u64,
}

/// One reading after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// live tensor bytes high-water mark (pool used high), or the cuMemGetInfo delta fallback
    pub peak: u64,
    /// pool reserved high-water mark; None without pool support
    pub reserved: Option<u64>,
    /// device-wide used bytes (total - free) read after the step
    pub memgetinfo_used: u64,
}

fn check(r: sys::CUresult, what: &str) -> anyhow::Result<()> {
    r.result().map_err(|e| anyhow::anyhow!("{what}: {e:?}"))
}

impl Probe {
    /// `device` must be a CUDA device from `candle_core::Device::new_cuda`.
    pub fn new(device: &candle_core::Device) -> anyhow::Result<Self> {
        let candle_core::Device::Cuda(dev) = device else {
            bail!("the CUDA probe needs a CUDA device, got {device:?}");
        };
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let pools_supported = ctx.has_async_alloc();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        if pools_supported {
            // SAFETY: valid out-pointer; `cu_device` belongs to a live context.
            check(
                unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) },
                "cuDeviceGetDefaultMemPool",
            )?;
            // Keep freed memory in the pool instead of returning it to the device at every
            // synchronisation (the default threshold is 0). Then `cuMemGetInfo` read after the
            // step sees the step's reservation, the way PyTorch's caching allocator would hold it.
            let mut keep: sys::cuuint64_t = u64::MAX;
            // SAFETY: RELEASE_THRESHOLD takes a cuuint64_t.
            check(
                unsafe {
                    sys::cuMemPoolSetAttribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        &mut keep as *mut u64 as *mut std::ffi::c_void,
                    )
                },
                "cuMemPoolSetAttribute(RELEASE_THRESHOLD)",
            )?;
        }
        let used_at_start = device_used()?;
        Ok(Self {
            ctx,
            pool,
            pools_supported,
            used_at_start,
        })
    }

    fn get(&self, attr: sys::CUmemPool_attribute) -> anyhow::Result<u64> {
        let mut v: sys::cuuint64_t = 0;
        // SAFETY: the *_MEM_* attributes are cuuint64_t; `pool` is the device's default pool.
        check(
            unsafe {
                sys::cuMemPoolGetAttribute(
                    self.pool,
                    attr,
                    &mut v as *mut u64 as *mut std::ffi::c_void,
                )
            },
            "cuMemPoolGetAttribute",
        )?;
        Ok(v)
    }

    fn set_zero(&self, attr: sys::CUmemPool_attribute) -> anyhow::Result<()> {
        let mut v: sys::cuuint64_t = 0;
        // SAFETY: setting a *_HIGH attribute to 0 resets it to the current value (CUDA docs).
        check(
            unsafe {
                sys::cuMemPoolSetAttribute(
                    self.pool,
                    attr,
                    &mut v as *mut u64 as *mut std::ffi::c_void,
                )
            },
            "cuMemPoolSetAttribute",
        )
    }

    /// Live tensor bytes now (pool used-current), or device-wide used minus the start value.
    pub fn current(&self) -> anyhow::Result<u64> {
        if self.pools_supported {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        } else {
            Ok(device_used()?.saturating_sub(self.used_at_start))
        }
    }

    /// Starts a new high-water window (call after a device synchronise).
    pub fn reset_peak(&self) -> anyhow::Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if self.pools_supported {
            self.set_zero(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
            self.set_zero(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?;
        }
        Ok(())
    }

    /// Reads the window's high-water marks (call after a device synchronise).
    pub fn read(&self) -> anyhow::Result<Reading> {
        let memgetinfo_used = device_used()?;
        if self.pools_supported {
            Ok(Reading {
                peak: self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                reserved: Some(
                    self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
                ),
                memgetinfo_used,
            })
        } else {
            Ok(Reading {
                peak: memgetinfo_used.saturating_sub(self.used_at_start),
                reserved: None,
                memgetinfo_used,
            })
        }
    }
}

/// Device-wide used bytes, `total - free` from `cuMemGetInfo` (needs a current context).
pub fn device_used() -> anyhow::Result<u64> {
    let (free, total) = cudarc::driver::result::mem_get_info()
        .map_err(|e| anyhow::anyhow!("cuMemGetInfo: {e:?}"))?;
    Ok((total - free) as u64)
}

/// (free, total) bytes of the current device.
pub fn mem_info() -> anyhow::Result<(u64, u64)> {
    let (free, total) = cudarc::driver::result::mem_get_info()
        .map_err(|e| anyhow::anyhow!("cuMemGetInfo: {e:?}"))?;
    Ok((free as u64, total as u64))
}

/// Device name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
pub fn device_name(device: &candle_core::Device) -> anyhow::Result<String> {
    let candle_core::Device::Cuda(dev) = device else {
        bail!("not a CUDA device");
    };
    dev.cuda_stream()
        .context()
        .name()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("cuDeviceGetName")
}

/// Driver API version as "major.minor" (cuDriverGetVersion gives 1000*major + 10*minor).
pub fn driver_version() -> String {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: valid out-pointer; the call needs no context.
    match unsafe { sys::cuDriverGetVersion(&mut v) }.result() {
        Ok(()) => format!("cuda {}.{}", v / 1000, (v % 1000) / 10),
        Err(_) => String::new(),
    }
}
