//! `vramcal measure`: one configuration, real training steps, peak memory and step time.

use super::common::{parse_opt_int, Defaults, ShapeFlags, TrainFlags};
use crate::coeffs::Coefficients;
use crate::error::input_err;
use crate::harness::backend::MeasureOptions;
use crate::harness::device::{cpu_available_bytes, device_info, DeviceSpec};
use crate::harness::grid::{input_dims, ModelOverrides};
use crate::harness::measure;
use crate::harness::record::{Backend, Row};
use crate::harness::sweep::{fail_key, FAIL_POINT_ENV};
use crate::spec::presets::preset;
use crate::spec::ModelSpec;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset model name (see `vramcal estimate --help`); or give --spec-json
    #[arg(long)]
    pub model: Option<String>,
    /// Full ModelSpec as JSON (what `sweep` passes to its children); replaces --model
    #[arg(long)]
    pub spec_json: Option<String>,
    /// Shape overrides on the preset (transformers)
    #[command(flatten)]
    pub shape: ShapeFlags,
    /// CNN first-stage width override
    #[arg(long, allow_hyphen_values = true)]
    pub width: Option<String>,
    /// Boxed so the `Command` enum stays small (clippy::large_enum_variant).
    #[command(flatten)]
    pub train: Box<TrainFlags>,
    /// What is trained (as `estimate`): full, or lora with its rank, targets and dropout
    #[command(flatten)]
    pub finetune: Box<super::estimate::FinetuneFlags>,
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What runs the steps: candle (embedded) or torch (PyTorch + transformers in a Python child,
    /// `$VRAMCAL_PYTHON` or python3; needs `pip install torch transformers torchvision`)
    #[arg(long, value_enum, default_value_t = Backend::Candle)]
    pub backend: Backend,
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    #[arg(long, default_value_t = 5)]
    pub repeats: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the row as JSON
    #[arg(long)]
    pub json: bool,
    /// Print the device's identity and memory as JSON and exit (used by `sweep` for CUDA)
    #[arg(long, hide = true)]
    pub device_info: bool,
    /// Run even when the planner puts the point above the memory free now (CPU: MemAvailable;
    /// CUDA: the device's free memory); by default such a point is refused before it allocates
    #[arg(long)]
    pub no_memory_guard: bool,
}

/// Refuses a point the planner (literature table) puts above the memory free on the device, so
/// a typo in a size does not start allocating 100 GiB on a 24 GB machine. Unknown free memory
/// (no /proc/meminfo) means no guard rather than refusing everything.
fn memory_guard(
    model: &ModelSpec,
    train: &crate::spec::TrainSpec,
    ft: &crate::plan::finetune::Finetune,
    device: DeviceSpec,
    name: &str,
) -> anyhow::Result<()> {
    let planned =
        crate::plan::finetune::estimate(model, train, ft, &Coefficients::literature())?.total;
    let (free, what) = match device {
        DeviceSpec::Cpu => (cpu_available_bytes(), "MemAvailable"),
        DeviceSpec::Cuda(_) => (Some(device_info(device)?.free_bytes), "free device memory"),
    };
    match free {
        Some(free) if free > 0 && planned > free => input_err(
            "point",
            format!(
                "the planner puts it at {planned} bytes ({:.1} GiB), above the {free} bytes ({:.1} GiB) of {what} on {name}; accepted a point that fits, or --no-memory-guard to run it anyway",
                planned as f64 / GIB,
                free as f64 / GIB
            ),
        ),
        _ => Ok(()),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn model_of(args: &Args) -> anyhow::Result<ModelSpec> {
    let ov = ModelOverrides {
        layers: parse_opt_int("layers", args.shape.layers.as_deref())?,
        hidden: parse_opt_int("hidden", args.shape.hidden.as_deref())?,
        heads: parse_opt_int("heads", args.shape.heads.as_deref())?,
        ffn: parse_opt_int("ffn", args.shape.ffn.as_deref())?,
        vocab: parse_opt_int("vocab", args.shape.vocab.as_deref())?,
        width: parse_opt_int("width", args.width.as_deref())?,
    };
    let base = match (&args.spec_json, &args.model) {
        (Some(j), None) => match serde_json::from_str::<ModelSpec>(j) {
            Ok(m) => m,
            Err(e) => return input_err("spec-json", format!("{e}; accepted a ModelSpec as JSON")),
        },
        (None, Some(name)) => preset(name)?,
        (Some(_), Some(_)) => {
            return input_err("model", "given with --spec-json; accepted one of them")
        }
        (None, None) => {
            return input_err("model", "missing; accepted --model <preset> or --spec-json")
        }
    };
    if ov.is_empty() {
        Ok(base)
    } else {
        ov.apply(&base)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device: DeviceSpec = args.device.parse()?;
    if args.device_info {
        let info = match args.backend {
            Backend::Candle => device_info(device)?,
            Backend::Torch => crate::harness::torch::device_info(device)?,
        };
        println!("{}", serde_json::to_string(&info)?);
        return Ok(());
    }
    let model = model_of(&args)?;
    // Input sizes left out follow the model: a ViT's own image, 512 tokens, 224-pixel CNNs.
    let train = args.train.to_train_spec(
        |seq, image| input_dims(&model, seq, image),
        Defaults::Harness,
    )?;
    model.validate_for(&train)?;
    let mut ft = super::estimate::finetune_from_args(&args.finetune, &model, &train)?;
    if ft.optimizer_in_backward
        || ft.cross_entropy != crate::plan::finetune::CrossEntropy::Full
        || ft.compile != crate::plan::finetune::Compile::None
        || ft.offload_activations
    {
        // checked against PyTorch by scripts/torch_step_peak (OPT_IN_BWD=1, CHUNKED_CE=1,
        // COMPILE=1, OFFLOAD_ACT=1), not measured here
        return crate::error::input_err(
            if ft.optimizer_in_backward {
                "optimizer-in-backward"
            } else if ft.compile != crate::plan::finetune::Compile::None {
                "compile"
            } else if ft.offload_activations {
                "offload-activations"
            } else {
                "cross-entropy"
            },
            "is planned only (`vramcal estimate`); the harness steps the optimizer after \
             backward over one full cross-entropy, eagerly, every activation on the device; accepted without it",
        );
    }
    // each backend trains its adapters one way (peft's fp32 adapters; candle's in the weights'
    // dtype), which the row records through its backend (`Row::finetune`)
    let adapters = args.backend.adapter_dtype();
    if args.finetune.adapter_dtype.is_some() && ft.adapter_dtype != adapters {
        return crate::error::input_err(
            "adapter-dtype",
            format!(
                "{} with --backend {}, which trains its adapters as {}; accepted {} (or leave it out)",
                ft.adapter_dtype.as_str(),
                args.backend,
                adapters.as_str(),
                adapters.as_str()
            ),
        );
    }
    ft.adapter_dtype = adapters;
    if !args.no_memory_guard {
        memory_guard(&model, &train, &ft, device, &args.device)?;
    }
    if let Ok(pat) = std::env::var(FAIL_POINT_ENV) {
        inject_failure(&pat, &fail_key(&model, &train))?;
    }
    let opts = MeasureOptions {
        warmup: args.warmup,
        repeats: args.repeats,
        seed: args.seed,
        backend: args.backend,
    };
    let row = measure::measure(&model, &train, &ft, &args.device, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&row)?);
    } else {
        print!("{}", table(&row));
    }
    Ok(())
}

/// Test hook (see `harness::sweep`): `VRAMCAL_FAIL_POINT=[mode:]substring` fails this point when
/// its key contains the substring. Modes: none = an ordinary error; `oom:` = an error carrying
/// CUDA's out-of-memory message; `alloc:` = a real allocation failure (Rust's allocation-error
/// handler: the "memory allocation of N bytes failed" message, then SIGABRT); `kill:` / `term:`
/// = the process sends itself SIGKILL / SIGTERM, as the OOM killer or a user would; `panic:` =
/// a panic (its stderr ends with the RUST_BACKTRACE note); `hang:` = sleeps until the sweep's
/// timeout kills it.
fn inject_failure(pattern: &str, key: &str) -> anyhow::Result<()> {
    let (mode, sub) = match pattern.split_once(':') {
        Some((m @ ("oom" | "alloc" | "kill" | "term" | "panic" | "hang"), rest)) => (m, rest),
        _ => ("error", pattern),
    };
    if sub.is_empty() || !key.contains(sub) {
        return Ok(());
    }
    match mode {
        "oom" => {
            anyhow::bail!("injected: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
        }
        "alloc" => {
            let layout = std::alloc::Layout::from_size_align(1 << 40, 64).expect("a valid layout");
            std::alloc::handle_alloc_error(layout)
        }
        "kill" | "term" => {
            #[cfg(unix)]
            // SAFETY: kill(2) on this process.
            unsafe {
                let sig = if mode == "kill" {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                libc::kill(libc::getpid(), sig);
            }
            std::thread::sleep(std::time::Duration::from_secs(60));
            anyhow::bail!("injected {mode} did not arrive")
        }
        "panic" => panic!("injected panic ({FAIL_POINT_ENV}={pattern})"),
        "hang" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => anyhow::bail!("injected failure ({FAIL_POINT_ENV}={pattern})"),
    }
}

fn mib(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    })
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2} ms"))
}

/// Short human-readable summary of a row.
fn table(r: &Row) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<16} {v}\n"));
    line("model", format!("{} ({})", r.model, r.family.as_str()));
    line(
        "config",
        format!(
            "batch {} seq {} image {} {} ckpt={} {} zero {}/{}",
            r.batch,
            r.seq,
            r.image,
            r.precision,
            r.checkpointing,
            r.optimizer,
            r.zero_stage,
            r.gpus
        ),
    );
    line("device", format!("{} ({})", r.device_id, r.device_name));
    line("backend", format!("{} ({})", r.backend, r.driver));
    line("status", r.status.as_str().to_string());
    if !r.error.is_empty() {
        line("error", r.error.clone());
    }
    line("params", r.params.to_string());
    if r.finetune != crate::plan::finetune::FinetuneMode::Full {
        line(
            "finetune",
            format!(
                "{} rank {} on {}, {} trainable",
                r.finetune.as_str(),
                r.lora_rank.unwrap_or(0),
                r.lora_targets,
                r.trainable_params.map_or("?".into(), |t| t.to_string())
            ),
        );
    }
    line("baseline", mib(r.baseline_bytes));
    line("peak", mib(r.peak_bytes));
    if r.peak_reserved_bytes.is_some() {
        line("peak reserved", mib(r.peak_reserved_bytes));
    }
    if r.memgetinfo_bytes.is_some() {
        line("device used", mib(r.memgetinfo_bytes));
    }
    if r.nvml_bytes.is_some() {
        line("nvml process", mib(r.nvml_bytes));
    }
    line(
        "step",
        format!(
            "{} median (p10 {}, p90 {}, {} repeats)",
            ms(r.step_ms_median),
            ms(r.step_ms_p10),
            ms(r.step_ms_p90),
            r.repeats
        ),
    );
    s
}
