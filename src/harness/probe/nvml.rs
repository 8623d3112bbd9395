//! NVML's view of this process's GPU memory: what nvidia-smi shows (context, library workspaces,
//! allocator reservations, everything). nvml-wrapper loads libnvidia-ml at run time, so a machine
//! without the driver simply gets `None`; nothing here may fail a measurement.

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

/// Bytes NVML attributes to this process, summed over all GPUs (the CUDA ordinal and NVML's index
/// may differ, and a process normally holds memory on one GPU only, so summing by PID is both
/// simpler and right). `None` when NVML is missing or reports nothing for this PID.
pub fn process_used_bytes() -> Option<u64> {
    let nvml = Nvml::init().ok()?;
    let pid = std::process::id();
    let mut total = None;
    for i in 0..nvml.device_count().ok()? {
        let Ok(dev) = nvml.device_by_index(i) else {
            continue;
        };
        let Ok(procs) = dev.running_compute_processes() else {
            continue;
        };
        for p in procs.iter().filter(|p| p.pid == pid) {
            if let UsedGpuMemory::Used(b) = p.used_gpu_memory {
                *total.get_or_insert(0) += b;
            }
        }
    }
    total
}
