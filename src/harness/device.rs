//! The device a point is measured on: `cpu` / `cuda:N` as the user names it, its identity (the
//! id that names calibration files and resume keys) and its memory, and opening it in candle.

use crate::error::input_err;
#[cfg(feature = "cuda")]
use crate::harness::probe;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// Where to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        let ordinal = match s.as_str() {
            "cuda" => Some(0),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
        };
        match ordinal {
            Some(n) => Ok(DeviceSpec::Cuda(n)),
            None => input_err("device", format!("'{s}' is unknown; accepted cpu, cuda:N")),
        }
    }
}

impl DeviceSpec {
    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }
}

/// Identity and memory of a device, as recorded in rows and used for the sweep's memory cap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// stable id used in file names and resume keys, naming the device model:
    /// `cpu-amd-epyc-9b14`, `cuda-nvidia-h100-80gb-hbm3`
    pub id: String,
    pub name: String,
    /// `cpu` or `cuda`
    pub backend: String,
    pub driver: String,
    /// bytes available now (CPU: MemAvailable; CUDA: cuMemGetInfo free)
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Lower-case, every run of non-alphanumerics turned into one '-'.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// `/proc/meminfo` field in bytes (the file states kB).
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// MemAvailable in bytes (Linux; None elsewhere): what the memory guards compare plans with.
pub fn cpu_available_bytes() -> Option<u64> {
    meminfo("MemAvailable")
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The CPU's id: `cpu-` and its model name with the vendor's decorations dropped
/// ("AMD EPYC 9B14 96-Core Processor" -> `cpu-amd-epyc-9b14`; "Intel(R) Xeon(R) Platinum 8481C CPU
/// @ 2.70GHz" -> `cpu-intel-xeon-platinum-8481c`), because two CPUs of one architecture differ
/// (the same grid peaked a median 21 % higher on an Intel than on an AMD x86_64). Falls back to
/// the architecture when the model is unknown.
pub fn cpu_id(model_name: &str) -> String {
    let noise = |w: &str| {
        let l = w.to_ascii_lowercase();
        l.starts_with('@')
            || l.ends_with("ghz")
            || l.ends_with("-core")
            || matches!(l.as_str(), "cpu" | "processor" | "@")
    };
    let cleaned = model_name
        .replace("(R)", "")
        .replace("(TM)", "")
        .replace("(tm)", "");
    let words: Vec<&str> = cleaned
        .split_whitespace()
        .take_while(|w| !w.starts_with('@'))
        .filter(|w| !noise(w))
        .collect();
    let s = slug(&words.join(" "));
    if s.is_empty() {
        format!("cpu-{}", std::env::consts::ARCH)
    } else {
        format!("cpu-{s}")
    }
}

/// CPU identity, needs no device: `cpu-<model>` (see [`cpu_id`]).
pub fn cpu_info() -> DeviceInfo {
    let name = cpu_name();
    DeviceInfo {
        id: cpu_id(&name),
        name,
        backend: "cpu".into(),
        driver: String::new(),
        free_bytes: meminfo("MemAvailable").unwrap_or(0),
        total_bytes: meminfo("MemTotal").unwrap_or(0),
    }
}

/// Device identity and memory. CUDA creates a context: call it in a child process (the sweep
/// does) so the parent holds no GPU memory while points are measured.
pub fn device_info(device: DeviceSpec) -> anyhow::Result<DeviceInfo> {
    match device {
        DeviceSpec::Cpu => Ok(cpu_info()),
        DeviceSpec::Cuda(n) => cuda_info(&open(DeviceSpec::Cuda(n))?),
    }
}

/// A CUDA device's identity and memory, from the opened device.
#[cfg(feature = "cuda")]
pub fn cuda_info(dev: &candle_core::Device) -> anyhow::Result<DeviceInfo> {
    let name = probe::cuda::device_name(dev)?;
    let (free, total) = probe::cuda::mem_info()?;
    Ok(DeviceInfo {
        id: format!("cuda-{}", slug(&name)),
        name,
        backend: "cuda".into(),
        driver: probe::cuda::driver_version(),
        free_bytes: free,
        total_bytes: total,
    })
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_info(_dev: &candle_core::Device) -> anyhow::Result<DeviceInfo> {
    unreachable!("open() refuses CUDA without the cuda feature")
}

/// Opens the candle device.
pub fn open(device: DeviceSpec) -> anyhow::Result<candle_core::Device> {
    match device {
        DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(n) => Ok(candle_core::Device::new_cuda(n)?),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => input_err(
            "device",
            "this vramcal was built without the cuda feature; accepted cpu (rebuild with scripts/build-cuda.sh for CUDA)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_or_name_the_field() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        let e = "tpu".parse::<DeviceSpec>().unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert_eq!(slug("NVIDIA H100 80GB HBM3"), "nvidia-h100-80gb-hbm3");
    }

    #[test]
    fn cpu_ids_name_the_model_without_decorations() {
        assert_eq!(
            cpu_id("AMD EPYC 9B14 96-Core Processor"),
            "cpu-amd-epyc-9b14"
        );
        assert_eq!(
            cpu_id("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"),
            "cpu-intel-xeon-platinum-8481c"
        );
        assert_eq!(cpu_id("AMD EPYC"), "cpu-amd-epyc");
        assert_eq!(cpu_id(""), format!("cpu-{}", std::env::consts::ARCH));
    }
}
