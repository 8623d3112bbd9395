//! One measurement: build the model and optimizer on a device, run warm-up steps, then measured
//! steps, and return a CSV [`Row`] with the baseline, the peak and the step times.
//!
//! Peak protocol (docs/architecture.md, "Measuring protocol"): `warmup` steps run unmeasured
//! (lazy allocations, kernel caches); then each of `repeats` steps runs in its own high-water
//! window (reset right before the step, read after a device synchronise). On CUDA the baseline
//! is the pool in use after `Trainer::new` and a window's peak the pool's high-water; on CPU the
//! baseline is the tensors alive between steps counted exactly, and a window's peak that plus
//! the heap's rise during the step (as the PyTorch reference counts). The row's peak is the
//! largest window, the step time the median (p10/p90 beside it) of the same steps.

use crate::error::input_err;
use crate::harness::probe;
use crate::harness::record::{Backend, Row, Status, SCHEMA};
use crate::harness::step::Trainer;
use crate::spec::{ModelSpec, TrainSpec};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasureOptions {
    pub warmup: u32,
    pub repeats: u32,
    pub seed: u64,
    /// what runs the steps: candle here, or PyTorch in a Python child
    #[serde(default)]
    pub backend: Backend,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            warmup: 2,
            repeats: 5,
            seed: 0,
            backend: Backend::Candle,
        }
    }
}

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

#[cfg(feature = "cuda")]
fn cuda_info(dev: &candle_core::Device) -> anyhow::Result<DeviceInfo> {
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
fn cuda_info(_dev: &candle_core::Device) -> anyhow::Result<DeviceInfo> {
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

/// The git commit the binary came from: `VRAMCAL_GIT_COMMIT` at run time (the sweep passes its
/// own to children so they do not each run git), else at build time, else `git rev-parse` in the
/// source tree; empty when none is available.
pub fn git_commit() -> String {
    if let Ok(c) = std::env::var("VRAMCAL_GIT_COMMIT") {
        return c;
    }
    if let Some(c) = option_env!("VRAMCAL_GIT_COMMIT") {
        return c.to_string();
    }
    std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// UTC now as RFC 3339 (`2026-01-31T12:00:00Z`), without a date-time dependency.
pub fn timestamp_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the Unix epoch to RFC 3339 UTC (Howard Hinnant's civil-from-days algorithm).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A row with everything that identifies the point filled in and nothing measured yet
/// (status `error`, params from the planner's exact count). The sweep uses it for points that
/// never produced a row of their own (skipped, crashed, timed out).
pub fn row_template(info: &DeviceInfo, model: &ModelSpec, train: &TrainSpec) -> Row {
    let (layers, hidden, heads, ffn, vocab) = match model {
        ModelSpec::Transformer(t) => (t.layers, t.hidden, t.heads, t.ffn, t.vocab),
        ModelSpec::Cnn(c) => {
            // CNN shape columns: conv count as layers, first conv width as hidden, classes as vocab.
            fn convs(ls: &[crate::spec::cnn::CnnLayer], out: &mut Vec<u64>) {
                use crate::spec::cnn::CnnLayer;
                for l in ls {
                    match l {
                        CnnLayer::Conv { c_out, .. } => out.push(*c_out),
                        CnnLayer::Residual { body, shortcut } => {
                            convs(body, out);
                            convs(shortcut, out);
                        }
                        _ => {}
                    }
                }
            }
            let mut widths = Vec::new();
            convs(&c.layers, &mut widths);
            let first = widths.first().copied().unwrap_or(0);
            (widths.len() as u64, first, 0, 0, c.classes)
        }
    };
    Row {
        schema: SCHEMA,
        device_id: info.id.clone(),
        device_name: info.name.clone(),
        backend: Backend::Candle,
        driver: info.driver.clone(),
        vramcal_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit(),
        timestamp: timestamp_now(),
        model: model.name().to_string(),
        family: model.family(),
        layers,
        hidden,
        heads,
        ffn,
        vocab,
        batch: train.batch,
        seq: train.seq,
        image: train.image,
        precision: train.precision,
        checkpointing: train.checkpointing,
        optimizer: train.optimizer,
        zero_stage: train.zero_stage,
        gpus: train.gpus,
        params: crate::plan::params::count(model),
        baseline_bytes: None,
        peak_bytes: None,
        peak_reserved_bytes: None,
        nvml_bytes: None,
        memgetinfo_bytes: None,
        step_ms_median: None,
        step_ms_p10: None,
        step_ms_p90: None,
        repeats: 0,
        status: Status::Error,
        error: String::new(),
        spec_json: serde_json::to_string(model).expect("specs serialise"),
        attention: train.attention,
        device_kind: info.backend.clone(),
        optimizer_impl: train.optimizer_impl,
        saved_bytes: None,
    }
}

/// True when an error chain says the device ran out of memory (candle wraps cudarc's
/// `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`; cuBLAS reports ALLOC_FAILED; Rust's
/// global allocator prints "memory allocation of N bytes failed" before it aborts).
pub fn is_oom_message(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out_of_memory")
        || m.contains("out of memory")
        || m.contains("cublas_status_alloc_failed")
        || m.contains("memory allocation failed")
        || (m.contains("memory allocation of") && m.contains("bytes failed"))
}

/// Linear-interpolated quantile of sorted values, q in [0, 1].
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Records the measured steps on an ok row: median, p10 and p90 of the step times (ms) and how
/// many there were (both backends).
pub fn set_step_times(row: &mut Row, times_ms: &[f64]) {
    let mut t = times_ms.to_vec();
    t.sort_by(f64::total_cmp);
    row.step_ms_median = Some(quantile(&t, 0.5));
    row.step_ms_p10 = Some(quantile(&t, 0.1));
    row.step_ms_p90 = Some(quantile(&t, 0.9));
    row.repeats = t.len() as u32;
    row.status = Status::Ok;
}

/// What the probes saw.
struct Measured {
    params: u64,
    baseline: u64,
    peak: u64,
    reserved: Option<u64>,
    memgetinfo: Option<u64>,
    nvml: Option<u64>,
    times_ms: Vec<f64>,
}

/// Measures one configuration. `device_spec` is `cpu` or `cuda:N`. A device out-of-memory error
/// gives `Ok` with status `oom` (an OOM is a data point); other failures are errors.
pub fn measure(
    model: &ModelSpec,
    train: &TrainSpec,
    device_spec: &str,
    opts: &MeasureOptions,
) -> anyhow::Result<Row> {
    let spec: DeviceSpec = device_spec.parse()?;
    model.validate_for(train)?;
    if opts.repeats == 0 {
        return input_err("repeats", "0; accepted 1 or more");
    }
    if opts.backend == Backend::Torch {
        return crate::harness::torch::measure(model, train, spec, opts);
    }
    let device = open(spec)?;
    let info = match spec {
        DeviceSpec::Cpu => cpu_info(),
        DeviceSpec::Cuda(_) => cuda_info(&device)?,
    };
    let mut row = row_template(&info, model, train);
    let result = match spec {
        DeviceSpec::Cpu => run_cpu(model, train, &device, opts),
        DeviceSpec::Cuda(_) => run_cuda(model, train, &device, opts),
    };
    match result {
        Ok(m) => {
            row.params = m.params;
            row.baseline_bytes = Some(m.baseline);
            row.peak_bytes = Some(m.peak);
            row.peak_reserved_bytes = m.reserved;
            row.memgetinfo_bytes = m.memgetinfo;
            row.nvml_bytes = m.nvml;
            set_step_times(&mut row, &m.times_ms);
        }
        Err(e) if is_oom_message(&format!("{e:#} {e:?}")) => {
            row.status = Status::Oom;
            row.error = format!("{e:#}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
        }
        Err(e) => return Err(e),
    }
    Ok(row)
}

/// candle's CPU matmul (the gemm crate) keeps a packing buffer of about 1 MB per thread
/// (`L2_SLAB`, one L2 cache), created the first time that thread packs a matrix and then kept.
/// rayon hands work to whichever worker is free, so a worker first used during a measured step
/// added its buffer to that step's peak at random (tiny-vit b1 32 px: 4.97 or 6.01 MB; a
/// tiny-resnet50: 11.8 or 12.9 MB, run to run). Creating the buffer on every worker and on this
/// thread before the baseline makes it part of the baseline, not of the step.
fn touch_every_cpu_thread() {
    let touch = || gemm_common::gemm::L2_SLAB.with(|slab| drop(slab.borrow()));
    touch();
    rayon::broadcast(|_| touch());
}

fn run_cpu(
    model: &ModelSpec,
    train: &TrainSpec,
    device: &candle_core::Device,
    opts: &MeasureOptions,
) -> anyhow::Result<Measured> {
    let mut trainer = Trainer::new(model, train, device, opts.seed)?;
    // the buffers stay for the life of the process, as PyTorch's thread pools' do, so they are
    // no part of a step's peak
    touch_every_cpu_thread();
    for _ in 0..opts.warmup {
        trainer.step()?;
    }
    // The same protocol as the PyTorch reference on CPU (src/harness/torch/runner.py): the
    // baseline is the tensors alive between steps, counted exactly, and a step's peak is that
    // plus the heap's high-water rise above its level at the step's start. Both then mean what
    // memory_allocated / max_memory_allocated mean on a GPU; the process's own heap (thread
    // stacks, the gemm packing buffers, allocator caches: ~3 MB here) is in neither, as no GPU
    // allocator counts it.
    let baseline = trainer.tensor_bytes();
    let mut peak = 0;
    let mut times_ms = Vec::with_capacity(opts.repeats as usize);
    for _ in 0..opts.repeats {
        let start = probe::cpu::current_bytes();
        probe::cpu::reset_peak();
        let t0 = Instant::now();
        trainer.step()?;
        device.synchronize()?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        peak = peak.max(baseline + probe::cpu::peak_bytes().saturating_sub(start));
    }
    Ok(Measured {
        params: trainer.params(),
        baseline,
        peak,
        reserved: None,
        memgetinfo: None,
        nvml: None,
        times_ms,
    })
}

#[cfg(feature = "cuda")]
fn run_cuda(
    model: &ModelSpec,
    train: &TrainSpec,
    device: &candle_core::Device,
    opts: &MeasureOptions,
) -> anyhow::Result<Measured> {
    let probe = probe::cuda::Probe::new(device)?;
    let mut trainer = Trainer::new(model, train, device, opts.seed)?;
    device.synchronize()?;
    let baseline = probe.current()?;
    for _ in 0..opts.warmup {
        trainer.step()?;
    }
    device.synchronize()?;
    let (mut peak, mut reserved, mut used) = (0u64, None::<u64>, 0u64);
    let mut times_ms = Vec::with_capacity(opts.repeats as usize);
    for _ in 0..opts.repeats {
        probe.reset_peak()?;
        let t0 = Instant::now();
        trainer.step()?;
        device.synchronize()?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let r = probe.read()?;
        peak = peak.max(r.peak);
        reserved = r.reserved.map(|x| x.max(reserved.unwrap_or(0)));
        used = used.max(r.memgetinfo_used);
    }
    Ok(Measured {
        params: trainer.params(),
        baseline,
        peak,
        reserved,
        memgetinfo: Some(used),
        nvml: probe::nvml::process_used_bytes(),
        times_ms,
    })
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _model: &ModelSpec,
    _train: &TrainSpec,
    _device: &candle_core::Device,
    _opts: &MeasureOptions,
) -> anyhow::Result<Measured> {
    unreachable!("open() refuses CUDA without the cuda feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn quantiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert!((quantile(&v, 0.1) - 1.4).abs() < 1e-12);
        assert!((quantile(&v, 0.9) - 4.6).abs() < 1e-12);
        assert_eq!(quantile(&[7.0], 0.9), 7.0);
    }

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

    #[test]
    fn oom_messages_are_recognised() {
        assert!(is_oom_message(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(is_oom_message(
            "memory allocation of 68719476736 bytes failed"
        ));
        assert!(!is_oom_message("shape mismatch in matmul"));
    }
}
