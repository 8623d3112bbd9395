//! Memory probes: how much memory the training step really used.
//!
//! - [`cpu`]: a counting global allocator (current and high-water heap bytes) — always on, so the
//!   binary and every test binary measure the same way.
//! - `cuda` (feature `cuda`): the stream-ordered allocator's pool high-water marks and
//!   `cuMemGetInfo`, read through cudarc's driver bindings.
//! - `nvml` (feature `cuda`): this process's GPU memory as NVML (nvidia-smi) reports it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod nvml;
