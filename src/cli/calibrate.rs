//! `vramcal calibrate --device cpu|cuda:0 [--quick]`: sweep a grid (fresh child per point, with
//! the sweep's progress bar), fit the table, write the report, and print one summary line.
//! Outputs: `<data-dir>/<device-id>.csv`, `<calib-dir>/<device-id>.json`,
//! `<reports-dir>/<device-id>/`.

use crate::coeffs::Coefficients;
use crate::error::input_err;
use crate::harness::record::Backend;
use crate::harness::sweep::{parse_bytes, run_sweep, SweepOptions};
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What measures each point: candle (embedded) or torch (PyTorch + transformers; its files
    /// get `-torch` after the device id)
    #[arg(long, value_enum, default_value_t = Backend::Candle)]
    pub backend: Backend,
    /// The quick grid (CPU: under 3 minutes on 2 cores)
    #[arg(long)]
    pub quick: bool,
    /// Grid TOML (default: calibration/grids/<cpu|cuda>[-quick].toml)
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Device id used in file names (default: cpu-<model>, e.g. cpu-amd-epyc-9b14, or from the
    /// CUDA device name)
    #[arg(long)]
    pub device_id: Option<String>,
    #[arg(long, default_value = "calibration/data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "calibration")]
    pub calib_dir: PathBuf,
    #[arg(long, default_value = "reports")]
    pub reports_dir: PathBuf,
    /// Continue an existing CSV, skipping points already measured
    #[arg(long)]
    pub resume: bool,
    /// With --resume: run again the points whose last row is not ok
    #[arg(long, requires = "resume")]
    pub retry_failed: bool,
    /// Also run points the planner puts above the memory free right now
    #[arg(long)]
    pub no_memory_guard: bool,
    /// Skip points the planner predicts above this (bytes, or e.g. 40GB, 16GiB)
    #[arg(long, allow_hyphen_values = true)]
    pub max_mem: Option<String>,
    /// Per-point time limit in seconds
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    /// Serve Prometheus metrics of the sweep on HOST:PORT (see `vramcal sweep --help`)
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Measure nothing: fit the table and write the report again from the CSV already measured
    /// (after an upgrade changes the planner's form). With --device-id, the id names the
    /// device the rows were measured on, and the files get the usual -torch / -quick suffixes.
    #[arg(long, conflicts_with_all = ["resume", "metrics_addr"])]
    pub refit: bool,
}

/// The device id the sweep will record: CPU `cpu-<model>`; CUDA asks a child for the device
/// info (the same probe the sweep uses), so the file names match the rows.
fn device_id(device: &str, backend: Backend) -> anyhow::Result<String> {
    if device == "cpu" {
        return Ok(crate::harness::measure::cpu_info().id);
    }
    if !device.starts_with("cuda") {
        return input_err(
            "device",
            format!("'{device}' is unknown; accepted cpu, cuda:N"),
        );
    }
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["measure", "--device-info", "--device", device])
        .args(["--backend", backend.as_str()])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // The child already named the bad field (exit 2): pass its message on as input error.
        if out.status.code() == Some(2) {
            let msg = msg.trim_start_matches("error: invalid device: ");
            return input_err("device", msg.to_string());
        }
        anyhow::bail!("probing {device}: {msg}");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("device info without an id"))
}

/// Says so when the files this calibration would extend or replace come from another device
/// (e.g. `--device-id` reused on a different CPU): the same grid peaked a median 21 % higher on
/// an Intel than on an AMD x86_64, so one device's table must not stand for another's.
fn warn_other_device(csv: &std::path::Path, table: &std::path::Path, device_id: &str) {
    let here = crate::harness::measure::cpu_info().name;
    if let Ok(rows) = crate::harness::record::read(csv) {
        if let Some(r) = rows.iter().find(|r| r.device_id != device_id) {
            eprintln!(
                "warning: {} holds rows of {} ({}), not {device_id}; the fit refuses rows of two devices",
                csv.display(),
                r.device_id,
                r.device_name
            );
        }
    }
    if let Ok(t) = Coefficients::load(table) {
        if t.device_id != device_id || (device_id.starts_with("cpu") && t.device_name != here) {
            eprintln!(
                "warning: {} was fitted on {} ({}); this run measures {device_id} and replaces it",
                table.display(),
                t.device_id,
                t.device_name
            );
        }
    }
}

/// Adds each mode's k-fold held-out memory errors (`heldout_memory`: the 95th percentile of
/// the absolute error, MAPE, n) to the table's residuals, keyed like them by family/precision.
fn with_heldout(
    residuals: Option<serde_json::Value>,
    acc: &crate::report::accuracy::Accuracy,
) -> serde_json::Value {
    let mut map = match residuals {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for (mode, errs) in &acc.heldout_errors_by_mode {
        let m = crate::fit::split::Metrics::from_errors(errs);
        let mut abs: Vec<f64> = errs.iter().map(|e| e.abs()).collect();
        abs.sort_by(f64::total_cmp);
        let p95 = crate::harness::measure::quantile(&abs, 0.95);
        let entry = map
            .entry(mode.clone())
            .or_insert_with(|| serde_json::json!({}));
        if let Some(o) = entry.as_object_mut() {
            o.insert(
                "heldout_memory".into(),
                serde_json::json!({"p95_abs_pct": p95, "mape": m.mape, "n": m.n}),
            );
        }
    }
    serde_json::Value::Object(map)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // bound first: a port in use stops the run before anything is measured
    let served = crate::metrics::serve_opt(args.metrics_addr.as_deref())?;
    let device_id_of_rows = match &args.device_id {
        Some(id) => id.clone(),
        None => device_id(&args.device, args.backend)?,
    };
    let id = match &args.device_id {
        Some(id) if id.is_empty() || id.contains(['/', '\\']) => {
            return input_err(
                "device-id",
                format!("'{id}' cannot name a file; accepted a non-empty id without slashes"),
            )
        }
        Some(id) if !args.refit => id.clone(),
        // A quick run gets its own files so it never mixes its points into (or is refused by)
        // the full calibration's CSV of the same device.
        _ => {
            let torch = if args.backend == Backend::Torch {
                "-torch"
            } else {
                ""
            };
            let quick = if args.quick { "-quick" } else { "" };
            format!("{device_id_of_rows}{torch}{quick}")
        }
    };
    let backend = if args.device == "cpu" { "cpu" } else { "cuda" };
    let grid = args.grid.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "calibration/grids/{backend}{}.toml",
            if args.quick { "-quick" } else { "" }
        ))
    });
    if !grid.is_file() {
        return input_err(
            "grid",
            format!(
                "{} does not exist; accepted a grid TOML file",
                grid.display()
            ),
        );
    }
    let csv = args.data_dir.join(format!("{id}.csv"));
    let table_path = args.calib_dir.join(format!("{id}.json"));
    let report_dir = args.reports_dir.join(&id);

    if !args.refit {
        warn_other_device(&csv, &table_path, &device_id_of_rows);
    }

    if args.refit && !csv.is_file() {
        return input_err(
            "refit",
            format!(
                "{} does not exist; accepted a device id whose CSV was measured",
                csv.display()
            ),
        );
    }
    let mut opts = SweepOptions::new(&grid, &csv);
    opts.device = args.device.clone();
    opts.backend = args.backend;
    opts.resume = args.resume;
    opts.retry_failed = args.retry_failed;
    opts.memory_guard = !args.no_memory_guard;
    opts.max_mem = args.max_mem.as_deref().map(parse_bytes).transpose()?;
    opts.timeout_s = args.timeout_s;
    opts.show_progress = true;
    opts.metrics = served.as_ref().map(|(m, _)| m.clone());
    let sweep = if args.refit {
        None
    } else {
        Some(run_sweep(&opts)?)
    };

    // calibrate writes one device's CSV; rows of another device in it are a mistake to refuse
    let fitted = super::fit::fit_file(&csv, false)?;
    let mut table: Coefficients = fitted.table;
    if args.device_id.is_some() {
        table.device_id = if args.refit {
            device_id_of_rows.clone()
        } else {
            id.clone()
        };
    }
    table.save(&table_path)?;
    // A candle calibration is also scored on PyTorch rows of this device when they exist
    // (`calibrate --backend torch` writes them).
    let torch_csv = args.data_dir.join(format!("{device_id_of_rows}-torch.csv"));
    let torch_csv = (args.backend == Backend::Candle && torch_csv.is_file()).then_some(torch_csv);
    let (acc, _) = super::report::report_files(
        &csv,
        &table,
        &report_dir,
        Some(&grid.display().to_string()),
        false,
        torch_csv.as_deref(),
    )?;
    // The plan's error band (`estimate`'s memory.error_band) comes from these held-out errors.
    table.residuals = Some(with_heldout(table.residuals.take(), &acc));
    table.save(&table_path)?;
    let Some(sweep) = sweep else {
        println!(
            "refitted {id} from {} without measuring; {}; wrote {}, {}/",
            csv.display(),
            super::report::summary(&acc),
            table_path.display(),
            report_dir.display()
        );
        return Ok(());
    };
    println!(
        "calibrated {id}: {} points ({} ok, {} oom, {} error, {} killed, {} timeout, {} skipped, {} resumed, {} retried) in {:.0} s; {}; wrote {}, {}, {}/",
        sweep.points,
        sweep.ok,
        sweep.oom,
        sweep.error,
        sweep.killed,
        sweep.timeout,
        sweep.skipped,
        sweep.already_done,
        sweep.retried,
        sweep.elapsed_s,
        super::report::summary(&acc),
        csv.display(),
        table_path.display(),
        report_dir.display()
    );
    Ok(())
}
