//! The PyTorch reference backend (`--backend torch`): the same point, measured by real PyTorch
//! with transformers' own model classes, so calibration and reports can be scored against what
//! users actually run.
//!
//! The Python runner (`runner.py`) and the CPU live-heap shim (`malloc_peak_shim.c`) are compiled
//! into this binary and written to a cache directory on first use (`$VRAMCAL_CACHE`, else
//! `$XDG_CACHE_HOME/vramcal`, else `~/.cache/vramcal`; one subdirectory per content hash, so an
//! upgraded vramcal never runs a stale runner). On CPU the shim is built there with `cc` and
//! loaded into the interpreter with LD_PRELOAD. The interpreter is `$VRAMCAL_PYTHON`, else
//! `python3`. Each point runs in a fresh interpreter; the protocol is in runner.py's docstring.

use crate::error::{input_err, InputError};
use crate::harness::backend::MeasureOptions;
use crate::harness::device::{cpu_info, slug, DeviceInfo, DeviceSpec};
use crate::harness::record::{Backend, Row, Status};
use crate::harness::row_fill::{row_template, set_step_times};
use crate::spec::{ModelSpec, TrainSpec};
use anyhow::Context;
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const RUNNER_PY: &str = include_str!("runner.py");
const SHIM_C: &str = include_str!("malloc_peak_shim.c");

/// What a user must install for this backend, quoted in every "not installed" error.
pub const PIP_INSTALL: &str = "pip install torch transformers torchvision";

/// The Python interpreter the runner uses.
pub fn python() -> String {
    std::env::var("VRAMCAL_PYTHON")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

fn cache_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("VRAMCAL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("vramcal")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("vramcal")))
        .unwrap_or_else(|| std::env::temp_dir().join("vramcal"))
}

/// FNV-1a over the bundled sources: a stable directory name per runner version.
fn content_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in RUNNER_PY.bytes().chain(SHIM_C.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The runner's files on disk: the script, and on CPU the compiled shim.
struct Installed {
    runner: PathBuf,
    shim: Option<PathBuf>,
}

fn install(cache: &Path, cpu: bool) -> anyhow::Result<Installed> {
    let dir = cache.join(format!("torch-runner-{}", content_hash()));
    let runner = dir.join("runner.py");
    if !runner.is_file() {
        crate::atomic::write(&runner, RUNNER_PY.as_bytes())?;
    }
    let shim = if cpu { Some(build_shim(&dir)?) } else { None };
    Ok(Installed { runner, shim })
}

/// Compiles the live-heap shim once per runner version (into a temporary name, then renamed, so
/// two sweeps starting together never load a half-written library).
fn build_shim(dir: &Path) -> anyhow::Result<PathBuf> {
    let so = dir.join("malloc_peak_shim.so");
    if so.is_file() {
        return Ok(so);
    }
    let src = dir.join("malloc_peak_shim.c");
    crate::atomic::write(&src, SHIM_C.as_bytes())?;
    let tmp = dir.join(format!(".malloc_peak_shim.so.{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let out = Command::new(&cc)
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&tmp)
        .arg(&src)
        .arg("-ldl")
        .stdin(Stdio::null())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return input_err(
                "backend",
                format!("torch on cpu builds a small C heap counter with '{cc}', which is not installed; accepted a machine with a C compiler (apt install gcc), or set CC"),
            )
        }
        Err(e) => return Err(e).context(format!("running {cc}")),
    };
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!(
            "building the heap counter {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, &so).with_context(|| format!("installing {}", so.display()))?;
    Ok(so)
}

/// What the runner prints as `RESULT {...}`.
#[derive(Debug, Deserialize)]
struct RunnerResult {
    status: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    params: Option<u64>,
    #[serde(default)]
    baseline_bytes: Option<u64>,
    #[serde(default)]
    peak_bytes: Option<u64>,
    #[serde(default)]
    peak_reserved_bytes: Option<u64>,
    #[serde(default)]
    memgetinfo_bytes: Option<u64>,
    #[serde(default)]
    nvml_bytes: Option<u64>,
    #[serde(default)]
    step_ms: Vec<f64>,
    #[serde(default)]
    saved_bytes: Option<u64>,
    /// parameters with requires_grad (peft's adapters under LoRA)
    #[serde(default)]
    trainable_params: Option<u64>,
    device_name: String,
    driver: String,
    #[serde(default)]
    free_bytes: Option<u64>,
    #[serde(default)]
    total_bytes: Option<u64>,
}

/// Runs the runner with one request; returns its result, or the error it named.
fn run(device: DeviceSpec, request: &serde_json::Value) -> anyhow::Result<RunnerResult> {
    run_with(&python(), &cache_root(), device, request)
}

fn run_with(
    py: &str,
    cache: &Path,
    device: DeviceSpec,
    request: &serde_json::Value,
) -> anyhow::Result<RunnerResult> {
    let files = install(cache, device.is_cpu())?;
    let mut cmd = Command::new(py);
    cmd.arg(&files.runner)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(shim) = &files.shim {
        cmd.env("LD_PRELOAD", shim);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return input_err(
                "backend",
                format!("torch runs Python '{py}', which is not on PATH; accepted a Python with PyTorch ({PIP_INSTALL}), named by VRAMCAL_PYTHON"),
            )
        }
        Err(e) => return Err(e).context(format!("starting {py}")),
    };
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(serde_json::to_string(request)?.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last_error = || {
        stderr
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no message")
            .to_string()
    };
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            return input_err(
                "backend",
                format!(
                    "torch needs PyTorch in '{py}' ({}); accepted a Python where `{PIP_INSTALL}` ran, named by VRAMCAL_PYTHON",
                    last_error().trim_start_matches("error: ")
                ),
            )
        }
        Some(2) => {
            // the runner's one line: "error: invalid <field>: <message>"
            let line = last_error();
            let rest = line.trim_start_matches("error: invalid ");
            return match rest.split_once(": ") {
                Some((field, msg)) => Err(InputError::new(field, msg).into()),
                None => input_err("backend", format!("torch refused the point: {line}")),
            };
        }
        _ => anyhow::bail!("the PyTorch runner failed: {}", last_error()),
    }
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| anyhow::anyhow!("the PyTorch runner printed no result: {}", last_error()))?;
    serde_json::from_str(line).context("reading the PyTorch runner's result")
}

/// The device as the torch backend sees it (CUDA through PyTorch, so a binary built without
/// the cuda feature can still measure a GPU with PyTorch).
pub fn device_info(device: DeviceSpec) -> anyhow::Result<DeviceInfo> {
    if device.is_cpu() {
        return Ok(cpu_info());
    }
    let r = run(
        device,
        &serde_json::json!({ "info": true, "device": device_arg(device) }),
    )?;
    Ok(DeviceInfo {
        id: format!("cuda-{}", slug(&r.device_name)),
        name: r.device_name,
        backend: "cuda".into(),
        driver: r.driver,
        free_bytes: r.free_bytes.unwrap_or(0),
        total_bytes: r.total_bytes.unwrap_or(0),
    })
}

fn device_arg(device: DeviceSpec) -> String {
    match device {
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
    }
}

/// Measures one point with PyTorch. An out-of-memory point is `Ok` with status `oom`; a point
/// this backend cannot build is an input error naming the field.
pub fn measure(
    model: &ModelSpec,
    train: &TrainSpec,
    ft: &crate::plan::finetune::Finetune,
    device: DeviceSpec,
    opts: &MeasureOptions,
) -> anyhow::Result<Row> {
    if ft.mode == crate::plan::finetune::FinetuneMode::Qlora
        || ft.freeze_layers > 0
        || ft.base_bits < 16
    {
        let field = if ft.freeze_layers > 0 {
            "freeze-layers"
        } else if ft.mode == crate::plan::finetune::FinetuneMode::Qlora {
            "finetune"
        } else {
            "base-bits"
        };
        return crate::error::input_err(
            field,
            "is planned, not run by the PyTorch runner; accepted --finetune full or lora with a \
             16-bit base and without --freeze-layers",
        );
    }
    // peft's LoRA, its targets as canonical names (the runner maps them to transformers' modules)
    let lora = ft.is_adapter().then(|| {
        serde_json::json!({
            "r": ft.rank,
            "alpha": ft.rank * 2,
            "dropout": ft.lora_dropout,
            "targets": ft.adapted_names(model),
            "trainable": crate::plan::finetune::split(model, ft).trainable,
        })
    });
    let (block, dropout, activation) = match model {
        ModelSpec::Transformer(t) => (
            t.block_kind(),
            Some(t.dropout_p().0),
            Some(t.activation_kind()),
        ),
        ModelSpec::Cnn(_) => (None, None, None),
    };
    let request = serde_json::json!({
        "model": model,
        "block": block,
        "dropout": dropout,
        "activation": activation,
        "train": train,
        "device": device_arg(device),
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "seed": opts.seed,
        "params": crate::plan::params::count(model),
        "lora": lora,
    });
    let r = run(device, &request)?;
    let info = if device.is_cpu() {
        cpu_info()
    } else {
        DeviceInfo {
            id: format!("cuda-{}", slug(&r.device_name)),
            name: r.device_name.clone(),
            backend: "cuda".into(),
            driver: String::new(),
            free_bytes: 0,
            total_bytes: 0,
        }
    };
    let mut row = row_template(&info, model, train);
    row.set_finetune(model, ft);
    row.backend = Backend::Torch;
    row.driver = r.driver.clone();
    match r.status.as_str() {
        "ok" => {
            row.params = r.params.unwrap_or(row.params);
            row.trainable_params = r.trainable_params;
            row.baseline_bytes = r.baseline_bytes;
            row.peak_bytes = r.peak_bytes;
            row.peak_reserved_bytes = r.peak_reserved_bytes;
            row.memgetinfo_bytes = r.memgetinfo_bytes;
            row.nvml_bytes = r.nvml_bytes;
            row.saved_bytes = r.saved_bytes;
            set_step_times(&mut row, &r.step_ms);
        }
        "oom" => {
            row.status = Status::Oom;
            row.error = r.error;
        }
        other => anyhow::bail!("the PyTorch runner reported status '{other}': {}", r.error),
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(cmd: &str, arg: &str) -> bool {
        Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn here() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/harness/torch")
    }

    /// runner.py's pure-Python parts (spec -> transformers class and config, refusals), with
    /// the system python3 and no torch.
    #[test]
    fn runner_python_tests_pass_without_torch() {
        if !have("python3", "--version") {
            eprintln!("skipped: no python3 on PATH");
            return;
        }
        let out = Command::new("python3")
            .args(["-m", "unittest", "-q", "test_runner"])
            .current_dir(here())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The live-heap shim counts exactly: shim_test.c checks the high-water mark over malloc,
    /// calloc, realloc, posix_memalign, aligned_alloc and free.
    #[test]
    fn heap_shim_counts_the_exact_high_water_mark() {
        if !have("cc", "--version") {
            eprintln!("skipped: no C compiler (cc) on PATH");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("shim_test");
        let built = Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&exe)
            .arg(here().join("shim_test.c"))
            .arg(here().join("malloc_peak_shim.c"))
            .arg("-ldl")
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let out = Command::new(&exe).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    }

    /// Without PyTorch the backend fails in one line naming the pip command (exit code 2).
    #[test]
    fn missing_torch_is_one_line_naming_pip() {
        if !have("python3", "--version") || have_torch("python3") || !have("cc", "--version") {
            eprintln!("skipped: needs python3 without torch, and cc");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let req = serde_json::json!({"device": "cpu", "model": {"family": "cnn"}});
        let e = run_with("python3", dir.path(), DeviceSpec::Cpu, &req).unwrap_err();
        let msg = format!("{e:#}");
        assert_eq!(crate::error::exit_code(&e), 2, "{msg}");
        assert!(msg.contains(PIP_INSTALL), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    fn have_torch(py: &str) -> bool {
        Command::new(py)
            .args(["-c", "import torch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn a_missing_python_is_an_input_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = run_with(
            "/nonexistent/python3",
            dir.path(),
            DeviceSpec::Cuda(0),
            &serde_json::json!({}),
        )
        .unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(format!("{e:#}").contains("VRAMCAL_PYTHON"));
    }
}
