//! One measurement: build the model and optimizer on a device, run warm-up steps, then measured
//! steps, and return a CSV [`Row`] with the baseline, the peak and the step times.
//!
//! Peak protocol (docs/architecture.md, "Measuring protocol"): `warmup` steps run unmeasured
//! (lazy allocations, kernel caches); then each of `repeats` steps runs in its own high-water
//! window (reset right before the step, read after a device synchronise). On CUDA the baseline
//! is the pool in use right after `Trainer::new` and a window's peak the pool's high-water; on
//! CPU the baseline is the tensors alive between steps counted exactly (read after the warm-up)
//! and a window's peak that plus the heap's rise during the step, as the PyTorch reference
//! counts. The row's peak is the largest window, the step time the median (p10/p90 beside it) of
//! the same steps. The protocol is one loop (`run`); what differs per device (what is settled
//! before the baseline, how the baseline is counted, how a window is reset and read, how the
//! device is synchronised) is a `Protocol`, implemented once for the CPU and once for CUDA.

use crate::error::input_err;
use crate::harness::backend::{Backend, MeasureOptions};
use crate::harness::device::{cuda_info, open};
use crate::harness::probe;
use crate::harness::record::{Row, Status};
use crate::harness::row_fill::set_step_times;
use crate::harness::step::Trainer;
use crate::plan::finetune::Finetune;
use crate::spec::{ModelSpec, TrainSpec};
use std::time::Instant;

// Device identity lives in `device`, row filling in `row_fill`; re-exported for the callers that
// take them from here (the sweep, `vramcal calibrate`, the row tests).
pub use crate::harness::device::{cpu_available_bytes, cpu_info, DeviceInfo, DeviceSpec};
pub use crate::harness::row_fill::{git_commit, is_oom_message, quantile, row_template};

/// What the probes saw.
struct Measured {
    params: u64,
    trainable: u64,
    baseline: u64,
    peak: u64,
    reserved: Option<u64>,
    memgetinfo: Option<u64>,
    nvml: Option<u64>,
    times_ms: Vec<f64>,
}

/// Memory readings a device adds beside the allocated peak.
#[derive(Default)]
struct Extra {
    reserved: Option<u64>,
    memgetinfo: Option<u64>,
    nvml: Option<u64>,
}

/// The per-device half of the measuring protocol; [`run`] is the other half.
trait Protocol {
    /// Settles what the process keeps for its lifetime; called once the trainer exists,
    /// before warm-up.
    fn prepare(&mut self) -> anyhow::Result<()>;
    /// The baseline the rows record, asked for after the warm-up (CUDA: the pool in use read in
    /// `prepare`; CPU: the trainer's tensors counted exactly).
    fn baseline(&mut self, trainer: &Trainer) -> u64;
    /// Waits for the device's queued work.
    fn sync(&self) -> anyhow::Result<()>;
    /// Starts a high-water window.
    fn reset_peak(&mut self) -> anyhow::Result<()>;
    /// Reads the window just closed, keeping the largest; returns the allocated peak so far.
    fn read_peak(&mut self) -> anyhow::Result<u64>;
    /// Readings beside the allocated peak, after the last window.
    fn finish(self) -> Extra;
}

/// Measures one configuration. `device_spec` is `cpu` or `cuda:N`. A device out-of-memory error
/// gives `Ok` with status `oom` (an OOM is a data point); other failures are errors.
pub fn measure(
    model: &ModelSpec,
    train: &TrainSpec,
    ft: &Finetune,
    device_spec: &str,
    opts: &MeasureOptions,
) -> anyhow::Result<Row> {
    let spec: DeviceSpec = device_spec.parse()?;
    model.validate_for(train)?;
    if opts.repeats == 0 {
        return input_err("repeats", "0; accepted 1 or more");
    }
    if opts.backend == Backend::Torch {
        return crate::harness::torch::measure(model, train, ft, spec, opts);
    }
    let device = open(spec)?;
    let info = match spec {
        DeviceSpec::Cpu => cpu_info(),
        DeviceSpec::Cuda(_) => cuda_info(&device)?,
    };
    let mut row = row_template(&info, model, train);
    row.set_finetune(model, ft);
    let result = match spec {
        DeviceSpec::Cpu => Trainer::with_finetune(model, train, ft, &device, opts.seed)
            .and_then(|mut t| run(&mut t, Cpu::new(&device), opts)),
        DeviceSpec::Cuda(_) => cuda::measure(model, train, ft, &device, opts),
    };
    match result {
        Ok(m) => {
            // the model's own parameters (adapters apart, as the PyTorch runner counts the
            // base before peft wraps it)
            row.params = if ft.is_adapter() {
                m.params - m.trainable
            } else {
                m.params
            };
            row.trainable_params = Some(m.trainable);
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

/// The protocol's loop: baseline, warm-up, then one timed high-water window per measured step.
fn run<P: Protocol>(
    trainer: &mut Trainer,
    mut device: P,
    opts: &MeasureOptions,
) -> anyhow::Result<Measured> {
    device.prepare()?;
    for _ in 0..opts.warmup {
        trainer.step()?;
    }
    device.sync()?;
    let baseline = device.baseline(trainer);
    let mut peak = 0;
    let mut times_ms = Vec::with_capacity(opts.repeats as usize);
    for _ in 0..opts.repeats {
        device.reset_peak()?;
        let t0 = Instant::now();
        trainer.step()?;
        device.sync()?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        peak = device.read_peak()?;
    }
    let extra = device.finish();
    Ok(Measured {
        params: trainer.params(),
        trainable: trainer.trainable_params(),
        baseline,
        peak,
        reserved: extra.reserved,
        memgetinfo: extra.memgetinfo,
        nvml: extra.nvml,
        times_ms,
    })
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

/// The CPU: tensor bytes counted exactly between steps, plus the counting global allocator's
/// high-water rise during a step. This is what the PyTorch reference counts on CPU
/// (src/harness/torch/runner.py), and what `memory_allocated` / `max_memory_allocated` mean on a
/// GPU: the process's own heap (thread stacks, the gemm packing buffers, allocator caches, about
/// 3 MB) is in neither number, as no GPU allocator counts it.
struct Cpu<'a> {
    device: &'a candle_core::Device,
    baseline: u64,
    /// live heap bytes when the current window opened
    start: u64,
    peak: u64,
}

impl<'a> Cpu<'a> {
    fn new(device: &'a candle_core::Device) -> Self {
        Self {
            device,
            baseline: 0,
            start: 0,
            peak: 0,
        }
    }
}

impl Protocol for Cpu<'_> {
    fn prepare(&mut self) -> anyhow::Result<()> {
        // the buffers stay for the life of the process, as PyTorch's thread pools' do, so they
        // are no part of a step's peak
        touch_every_cpu_thread();
        Ok(())
    }
    fn baseline(&mut self, trainer: &Trainer) -> u64 {
        self.baseline = trainer.tensor_bytes();
        self.baseline
    }
    fn sync(&self) -> anyhow::Result<()> {
        Ok(self.device.synchronize()?)
    }
    fn reset_peak(&mut self) -> anyhow::Result<()> {
        self.start = probe::cpu::current_bytes();
        probe::cpu::reset_peak();
        Ok(())
    }
    fn read_peak(&mut self) -> anyhow::Result<u64> {
        let rise = probe::cpu::peak_bytes().saturating_sub(self.start);
        self.peak = self.peak.max(self.baseline + rise);
        Ok(self.peak)
    }
    fn finish(self) -> Extra {
        Extra::default()
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{probe, run, Extra, Measured, Protocol};
    use crate::harness::backend::MeasureOptions;
    use crate::harness::step::Trainer;
    use crate::spec::{ModelSpec, TrainSpec};

    /// A CUDA device: the memory pool's high-water marks, `cuMemGetInfo` and NVML.
    struct Cuda<'a> {
        device: &'a candle_core::Device,
        probe: probe::cuda::Probe,
        /// the pool in use once the trainer exists
        baseline: u64,
        peak: u64,
        reserved: Option<u64>,
        used: u64,
    }

    /// The probe exists before the trainer, so the pool's marks see every allocation of it.
    pub fn measure(
        model: &ModelSpec,
        train: &TrainSpec,
        ft: &crate::plan::finetune::Finetune,
        device: &candle_core::Device,
        opts: &MeasureOptions,
    ) -> anyhow::Result<Measured> {
        let probe = probe::cuda::Probe::new(device)?;
        let mut trainer = Trainer::with_finetune(model, train, ft, device, opts.seed)?;
        let cuda = Cuda {
            device,
            probe,
            baseline: 0,
            peak: 0,
            reserved: None,
            used: 0,
        };
        run(&mut trainer, cuda, opts)
    }

    impl Protocol for Cuda<'_> {
        fn prepare(&mut self) -> anyhow::Result<()> {
            self.device.synchronize()?;
            self.baseline = self.probe.current()?;
            Ok(())
        }
        fn baseline(&mut self, _trainer: &Trainer) -> u64 {
            self.baseline
        }
        fn sync(&self) -> anyhow::Result<()> {
            Ok(self.device.synchronize()?)
        }
        fn reset_peak(&mut self) -> anyhow::Result<()> {
            self.probe.reset_peak()
        }
        fn read_peak(&mut self) -> anyhow::Result<u64> {
            let r = self.probe.read()?;
            self.peak = self.peak.max(r.peak);
            self.reserved = r.reserved.map(|x| x.max(self.reserved.unwrap_or(0)));
            self.used = self.used.max(r.memgetinfo_used);
            Ok(self.peak)
        }
        fn finish(self) -> Extra {
            Extra {
                reserved: self.reserved,
                memgetinfo: Some(self.used),
                nvml: probe::nvml::process_used_bytes(),
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::Measured;
    use crate::harness::backend::MeasureOptions;
    use crate::spec::{ModelSpec, TrainSpec};

    pub fn measure(
        _model: &ModelSpec,
        _train: &TrainSpec,
        _ft: &crate::plan::finetune::Finetune,
        _device: &candle_core::Device,
        _opts: &MeasureOptions,
    ) -> anyhow::Result<Measured> {
        unreachable!("open() refuses CUDA without the cuda feature")
    }
}
