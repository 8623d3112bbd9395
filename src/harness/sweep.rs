//! Sweeps: every grid point measured in a fresh child process (`vramcal measure --spec-json ...
//! --json`), one CSV row appended and flushed per point.
//!
//! Why child processes: a clean allocator per point (no high-water marks or pooled memory left
//! over from the previous point), and a crash, OOM kill or hang costs one point, which is itself
//! recorded (status `oom`/`error` with the message) while the sweep goes on.
//!
//! Before a point runs, the planner estimates it with the given coefficients; above the memory
//! cap (default: CPU half of RAM, CUDA the device's free memory) it is recorded as `skipped`
//! instead of being run into the OOM killer (which on a CPU host may take the whole machine down).
//!
//! Test hook: the environment variable `VRAMCAL_FAIL_POINT=<substring>` makes `vramcal measure`
//! fail for any point whose key (see [`fail_key`]) contains the substring, so tests can check
//! that a failing point is recorded and the sweep continues.

use crate::coeffs::Coefficients;
use crate::error::input_err;
use crate::harness::grid::{self, Grid, Point};
use crate::harness::measure::{self, DeviceInfo, DeviceSpec};
use crate::harness::record::{self, point_key, Row, Status};
use crate::spec::{ModelSpec, TrainSpec};
use anyhow::Context;
use serde::Serialize;
use std::collections::HashSet;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable of the failure-injection hook.
pub const FAIL_POINT_ENV: &str = "VRAMCAL_FAIL_POINT";

#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// the `vramcal` binary to spawn per point (tests: `env!("CARGO_BIN_EXE_vramcal")`)
    pub exe: PathBuf,
    pub grid: PathBuf,
    pub out: PathBuf,
    /// `cpu` or `cuda:N`
    pub device: String,
    /// skip points already in `out` (by `Row::key`)
    pub resume: bool,
    /// with `resume`: re-run points whose last row is not `ok`
    pub retry_failed: bool,
    /// skip points the planner puts above the memory free now (CPU MemAvailable, CUDA free)
    pub memory_guard: bool,
    /// memory cap in bytes for the planner guard; None = the device default
    pub max_mem: Option<u64>,
    /// coefficient table for the guard; None = the literature table
    pub coeffs: Option<PathBuf>,
    /// per-point wall-clock limit
    pub timeout_s: u64,
    /// draw the progress bar even when stderr is not a terminal
    pub show_progress: bool,
}

impl SweepOptions {
    /// Defaults: this binary, CPU, no resume, device cap, literature coefficients, 300 s per point.
    pub fn new(grid: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("vramcal")),
            grid: grid.into(),
            out: out.into(),
            device: "cpu".into(),
            resume: false,
            retry_failed: false,
            memory_guard: true,
            max_mem: None,
            coeffs: None,
            timeout_s: 300,
            show_progress: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepSummary {
    pub points: usize,
    /// already in the CSV (resume)
    pub already_done: usize,
    /// in the CSV with a failed last row and run again (`--retry-failed`)
    pub retried: usize,
    pub ok: usize,
    pub oom: usize,
    pub error: usize,
    pub skipped: usize,
    pub killed: usize,
    pub timeout: usize,
    pub elapsed_s: f64,
    pub device_id: String,
}

impl SweepSummary {
    fn count(&mut self, s: Status) {
        match s {
            Status::Ok => self.ok += 1,
            Status::Oom => self.oom += 1,
            Status::Error => self.error += 1,
            Status::Skipped => self.skipped += 1,
            Status::Killed => self.killed += 1,
            Status::Timeout => self.timeout += 1,
        }
    }
}

/// The part of a point's key the failure hook matches (the resume key without the device id,
/// which a child does not know before it opens the device).
pub fn fail_key(model: &ModelSpec, train: &TrainSpec) -> String {
    let spec_json = serde_json::to_string(model).expect("specs serialise");
    point_key("", &spec_json, train)
}

/// Parses `40GB`, `512MiB`, `1e9`, `123456` into bytes (decimal units for kB/MB/GB/TB,
/// binary for KiB/MiB/GiB/TiB).
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => f64::NAN,
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && mult.is_finite() => Ok((v * mult) as u64),
        _ => input_err(
            "max-mem",
            format!(
                "'{s}' is not a size; accepted bytes or a number with kB/MB/GB/TB/KiB/MiB/GiB/TiB"
            ),
        ),
    }
}

/// Device identity and memory for the sweep. CPU: read here. CUDA: asked of a child process,
/// so that this (parent) process never creates a CUDA context that would sit on the GPU and
/// disturb device-wide readings during the sweep.
fn probe_device(opts: &SweepOptions, device: DeviceSpec) -> anyhow::Result<DeviceInfo> {
    if device.is_cpu() {
        return Ok(measure::cpu_info());
    }
    let out = Command::new(&opts.exe)
        .args(["measure", "--device-info", "--device", &opts.device])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", opts.exe.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "probing {}: {}",
            opts.device,
            last_line(&String::from_utf8_lossy(&out.stderr))
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing the device info of the child")
}

/// The child's error message: its last `error: ` line (anyhow output may be followed by a
/// backtrace when RUST_BACKTRACE is set), else its last non-empty line.
fn last_line(text: &str) -> String {
    let mut lines = text.lines().rev().map(str::trim);
    let error = lines.clone().find(|l| l.starts_with("error: "));
    error
        .or_else(|| lines.find(|l| !l.is_empty()))
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_string()
}

/// A CSV whose last line was cut off (sweep killed mid-write) would glue the next row onto the
/// fragment; cut the file back to its last complete line before appending.
fn repair_tail(path: &Path) -> anyhow::Result<()> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(());
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(keep as u64)?;
    f.sync_all()?;
    eprintln!(
        "warning: {}: dropped an incomplete last line ({} bytes)",
        path.display(),
        bytes.len() - keep
    );
    Ok(())
}

/// How a child process ended.
struct ChildEnd {
    stdout: String,
    stderr: String,
    success: bool,
    killed_by_sigkill: bool,
    timed_out: bool,
    code: Option<i32>,
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

fn run_child(mut cmd: Command, timeout: Duration) -> anyhow::Result<ChildEnd> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning the measuring child")?;
    let out = spawn_reader(child.stdout.take().expect("piped"));
    let err = spawn_reader(child.stderr.take().expect("piped"));
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    #[cfg(unix)]
    let killed_by_sigkill = {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(9)
    };
    #[cfg(not(unix))]
    let killed_by_sigkill = false;
    Ok(ChildEnd {
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        success: status.success(),
        killed_by_sigkill,
        timed_out,
        code: status.code(),
    })
}

/// Measures one point in a child; always returns a row (failures become `oom`/`error` rows).
fn measure_point(
    opts: &SweepOptions,
    grid: &Grid,
    info: &DeviceInfo,
    point: &Point,
    spec_json: &str,
    commit: &str,
) -> anyhow::Result<Row> {
    let t = &point.train;
    let mut cmd = Command::new(&opts.exe);
    // Children inherit the commit so they do not each run git.
    cmd.env("VRAMCAL_GIT_COMMIT", commit)
        .arg("measure")
        .args(["--spec-json", spec_json])
        .args(["--batch", &t.batch.to_string()])
        .args(["--seq", &t.seq.to_string()])
        .args(["--image", &t.image.to_string()])
        .args(["--precision", t.precision.as_str()])
        .args(["--optimizer", t.optimizer.as_str()])
        .args(["--checkpointing", t.checkpointing.as_str()])
        .args(["--zero", &t.zero_stage.to_string()])
        .args(["--gpus", &t.gpus.to_string()])
        .args(["--device", &opts.device])
        .args(["--warmup", &grid.warmup.to_string()])
        .args(["--repeats", &grid.repeats.to_string()])
        .args(["--seed", &grid.seed.to_string()])
        .arg("--json");
    let end = run_child(cmd, Duration::from_secs(opts.timeout_s.max(1)))?;
    if end.success {
        let line = end
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'));
        return match line.map(serde_json::from_str::<Row>) {
            Some(Ok(row)) => Ok(row),
            _ => {
                let mut row = measure::row_template(info, &point.model, t);
                row.error = format!("child printed no row: {}", last_line(&end.stdout));
                Ok(row)
            }
        };
    }
    let mut row = measure::row_template(info, &point.model, t);
    let msg = last_line(&end.stderr);
    if end.timed_out {
        row.status = Status::Error;
        row.error = format!("timed out after {} s", opts.timeout_s);
    } else if end.killed_by_sigkill {
        // SIGKILL we did not send: on Linux nearly always the kernel's OOM killer.
        row.status = Status::Oom;
        row.error = "killed by SIGKILL (the OOM killer, most likely)".into();
    } else if measure::is_oom_message(&msg) {
        row.status = Status::Oom;
        row.error = msg;
    } else {
        row.status = Status::Error;
        row.error = if msg.is_empty() {
            format!("child exited with {:?}", end.code)
        } else {
            msg
        };
    }
    Ok(row)
}

/// Runs a sweep (see the module docs). Returns counts per status.
pub fn run_sweep(opts: &SweepOptions) -> anyhow::Result<SweepSummary> {
    let started = Instant::now();
    let device: DeviceSpec = opts.device.parse()?;
    let grid = grid::load(&opts.grid)?;
    let coeffs = match &opts.coeffs {
        Some(p) => Coefficients::load(p)?,
        None => Coefficients::literature(),
    };
    let out_has_rows = std::fs::metadata(&opts.out)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if out_has_rows && !opts.resume {
        return input_err(
            "out",
            format!(
                "{} already has rows; accepted --resume to continue it, or a new file",
                opts.out.display()
            ),
        );
    }
    let info = probe_device(opts, device)?;
    let cap = match opts.max_mem {
        Some(b) => b,
        None if device.is_cpu() => info.total_bytes / 2,
        None => info.free_bytes,
    };
    let mut done: HashSet<String> = HashSet::new();
    if out_has_rows {
        repair_tail(&opts.out)?;
        done = record::read(&opts.out)?.iter().map(Row::key).collect();
    }
    let commit = measure::git_commit();

    let mut summary = SweepSummary {
        points: grid.points.len(),
        device_id: info.id.clone(),
        ..Default::default()
    };
    let pb = progress_bar(grid.points.len() as u64, opts.show_progress);
    for point in &grid.points {
        let spec_json = serde_json::to_string(&point.model)?;
        let key = point_key(&info.id, &spec_json, &point.train);
        if done.contains(&key) {
            summary.already_done += 1;
            pb.inc(1);
            continue;
        }
        pb.set_message(describe(point));
        let planned = crate::plan::memory::estimate(&point.model, &point.train, &coeffs)?;
        let row = if planned.total > cap {
            let mut row = measure::row_template(&info, &point.model, &point.train);
            row.status = Status::Skipped;
            row.error = format!(
                "planner predicts {} bytes, above the cap of {cap} bytes",
                planned.total
            );
            row
        } else {
            let row = measure_point(opts, &grid, &info, point, &spec_json, &commit)?;
            if row.key() != key {
                pb.suspend(|| {
                    eprintln!(
                        "warning: the child's row has another key than the point (device id {} vs {}); --resume will re-run it",
                        row.device_id, info.id
                    )
                });
            }
            row
        };
        record::append(&opts.out, &row)?;
        summary.count(row.status);
        done.insert(key);
        pb.inc(1);
    }
    pb.finish_and_clear();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn describe(p: &Point) -> String {
    let t = &p.train;
    let input = match &p.model {
        ModelSpec::Transformer(m) if m.patch.is_none() => format!("s{}", t.seq),
        _ => format!("{}px", t.image),
    };
    format!(
        "{} b{} {} {} ckpt={} {} z{}/{}",
        p.model.name(),
        t.batch,
        input,
        t.precision,
        t.checkpointing,
        t.optimizer,
        t.zero_stage,
        t.gpus
    )
}

fn progress_bar(len: u64, force: bool) -> indicatif::ProgressBar {
    if !(force || std::io::stderr().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise} eta {eta}] {msg}",
    ) {
        pb.set_style(style);
    }
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("40GB").unwrap(), 40_000_000_000);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1e9").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert_eq!(
            crate::error::exit_code(&parse_bytes("lots").unwrap_err()),
            2
        );
        assert_eq!(
            crate::error::exit_code(&parse_bytes("5 parsecs").unwrap_err()),
            2
        );
    }

    #[test]
    fn a_cut_off_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.csv");
        std::fs::write(&p, "a,b\n1,2\n3,").unwrap();
        repair_tail(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a,b\n1,2\n");
    }
}
