//! Sweeps: every grid point measured in a fresh child process (`vramcal measure --spec-json ...
//! --json`), one CSV row appended and flushed per point.
//!
//! Why child processes: a clean allocator per point (no high-water marks or pooled memory left
//! over from the previous point), and a crash, OOM kill or hang costs one point, which is itself
//! recorded while the sweep goes on: `oom` (the child's allocation-failure message), `killed`
//! (the signal, named), `timeout`, or `error` (the child's first meaningful stderr line).
//!
//! Children die with their sweep: each runs in its own process group (a timeout or Ctrl-C kills
//! the whole group) and, on Linux, with `PR_SET_PDEATHSIG = SIGKILL`, so a sweep killed even by
//! SIGKILL does not leave a child measuring on.
//!
//! The output CSV is locked (`File::try_lock`, advisory) for the whole sweep: a second sweep on
//! the same file stops at once instead of measuring every point twice. `--resume` skips points
//! already in it (their last row; failed ones too unless `--retry-failed`), and refuses a file
//! whose header is not vramcal's.
//!
//! Before a point runs, the planner estimates it with the given coefficients; above the memory
//! cap (default: CPU half of RAM, CUDA the device's free memory) or above the memory free right
//! now (CPU: MemAvailable; unless `--no-memory-guard`) it is recorded as `skipped` instead of
//! being run into the OOM killer (which on a CPU host may take the whole machine down).
//!
//! `--shard I/N` measures only the grid points of shard I (see [`crate::harness::shard`]) and
//! records the shard beside the CSV for `vramcal merge`; a resume must name the same shard.
//! With metrics (`--metrics-addr`), each finished point updates [`crate::metrics::Metrics`].
//!
//! Test hook: the environment variable `VRAMCAL_FAIL_POINT=[mode:]<substring>` makes `vramcal
//! measure` fail for any point whose key (see [`fail_key`]) contains the substring, in the way
//! the mode says (see `cli::measure`), so tests can check how each failure is recorded.

use crate::coeffs::Coefficients;
use crate::error::input_err;
use crate::harness::grid::{self, Grid, Point};
use crate::harness::measure::{self, DeviceInfo, DeviceSpec};
use crate::harness::record::{self, point_key, Backend, Row, Status};
use crate::harness::shard::{self, Shard};
use crate::metrics::Metrics;
use crate::spec::{ModelSpec, TrainSpec};
use anyhow::Context;
use serde::Serialize;
use std::collections::HashSet;
use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
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
    /// what measures each point: candle, or PyTorch (`--backend torch`)
    pub backend: Backend,
    /// measure only this shard's points (`--shard I/N`)
    pub shard: Option<Shard>,
    /// updated as points finish (`--metrics-addr`)
    pub metrics: Option<Metrics>,
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
            backend: Backend::Candle,
            shard: None,
            metrics: None,
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
    point_key("", Backend::Candle, &spec_json, train, "")
}

/// `--max-mem` as bytes (see [`crate::size::parse_size`]).
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    crate::size::parse_size("max-mem", s)
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
        .args(["--backend", opts.backend.as_str()])
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

/// The signal that stopped the sweep (SIGINT/SIGTERM), 0 while none has arrived.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn on_interrupt(sig: libc::c_int) {
    // async-signal-safe: one atomic store; the sweep loop polls it
    INTERRUPTED.store(sig, Ordering::SeqCst);
}

/// While alive, SIGINT and SIGTERM set [`INTERRUPTED`] instead of ending the process, so the
/// sweep can kill its child's process group (which a terminal's Ctrl-C does not reach: it is
/// not the foreground group) before it stops. Dropping it restores the default actions.
struct InterruptGuard;

impl InterruptGuard {
    fn install() -> Self {
        INTERRUPTED.store(0, Ordering::SeqCst);
        #[cfg(unix)]
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let h = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::signal(libc::SIGINT, h);
            libc::signal(libc::SIGTERM, h);
        }
        InterruptGuard
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: restoring the default disposition.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
        }
    }
}

fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGKILL (9)`: the name people know, and the number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    format!("{name} ({sig})")
}

/// Takes the output CSV's advisory lock (creating the file): held by the returned handle until
/// the sweep ends, so a second sweep on the same file fails at once.
fn lock_out(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => input_err(
            "out",
            format!(
                "{} is locked by another running sweep; accepted a file no other sweep is writing",
                path.display()
            ),
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// How a child process ended.
struct ChildEnd {
    stdout: String,
    stderr: String,
    success: bool,
    /// the signal that ended it, if any
    signal: Option<i32>,
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

/// Kills the child's whole process group (it leads its own group, see [`run_child`]).
fn kill_group(child: &mut std::process::Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) on the child's own process group (pgid == its pid).
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = child.kill();
}

/// Makes the child its own process group and, on Linux, tells the kernel to SIGKILL it when
/// this process dies (whatever kills the sweep, even SIGKILL, which no handler sees).
fn contain(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The sweep may have died before prctl ran; then the signal would never come.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
}

fn run_child(mut cmd: Command, timeout: Duration) -> anyhow::Result<ChildEnd> {
    contain(&mut cmd);
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
        if let Some(sig) = interrupted() {
            kill_group(&mut child);
            let _ = child.wait();
            anyhow::bail!(
                "interrupted by {}; the measuring child was killed",
                signal_name(sig)
            );
        }
        if start.elapsed() > timeout {
            timed_out = true;
            kill_group(&mut child);
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    #[cfg(unix)]
    let signal = {
        use std::os::unix::process::ExitStatusExt;
        status.signal()
    };
    #[cfg(not(unix))]
    let signal = None;
    Ok(ChildEnd {
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        success: status.success(),
        signal,
        timed_out,
        code: status.code(),
    })
}

/// What a failed child said, in one line: vramcal's own `error: ` line (its main prints exactly
/// one), else Rust's allocation-failure line, else a panic's location and message, else the
/// first line that is not a `note:` (never "note: run with `RUST_BACKTRACE=1`").
pub fn child_message(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(l) = lines.iter().rev().find(|l| l.starts_with("error: ")) {
        return l.trim_start_matches("error: ").to_string();
    }
    if let Some(l) = lines.iter().find(|l| is_alloc_failure(l)) {
        return l.to_string();
    }
    if let Some(i) = lines.iter().position(|l| l.contains(" panicked at ")) {
        let place = lines[i]
            .split(" panicked at ")
            .nth(1)
            .unwrap_or("")
            .trim_end_matches(':');
        let msg = lines
            .get(i + 1)
            .filter(|l| !l.starts_with("note:"))
            .copied()
            .unwrap_or("");
        return format!("panicked at {place}: {msg}");
    }
    lines
        .iter()
        .find(|l| !l.starts_with("note:"))
        .copied()
        .unwrap_or("")
        .to_string()
}

/// Rust's global allocation-failure report: "memory allocation of N bytes failed".
fn is_alloc_failure(line: &str) -> bool {
    line.starts_with("memory allocation of") && line.ends_with("failed")
}

/// Status and message of a child that did not print a row.
fn classify(end: &ChildEnd, timeout_s: u64) -> (Status, String) {
    let msg = child_message(&end.stderr);
    if end.timed_out {
        return (Status::Timeout, format!("timed out after {timeout_s} s"));
    }
    // Before the signal: an allocation failure aborts (SIGABRT) after printing its message.
    if measure::is_oom_message(&msg) {
        return (Status::Oom, msg);
    }
    if let Some(sig) = end.signal {
        let mut text = format!("killed by {}", signal_name(sig));
        if sig == 9 {
            // what the kernel's OOM killer sends, but so does `kill -9`: name both, claim neither
            text.push_str(" (from another process or the kernel's OOM killer; see dmesg)");
        }
        if !msg.is_empty() {
            text = format!("{text}: {msg}");
        }
        return (Status::Killed, text);
    }
    let text = if msg.is_empty() {
        match end.code {
            Some(c) => format!("child exited with code {c} and no message"),
            None => "child ended without an exit code or a message".into(),
        }
    } else {
        msg
    };
    (Status::Error, text)
}

/// Measures one point in a child; always returns a row (failures become rows with their status).
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
        .args(["--attention", t.attention.as_str()])
        .args(["--optimizer-impl", t.optimizer_impl.as_str()])
        .args(["--backend", opts.backend.as_str()])
        .args(["--device", &opts.device])
        .args(["--warmup", &grid.warmup.to_string()])
        .args(["--repeats", &grid.repeats.to_string()])
        .args(["--seed", &grid.seed.to_string()])
        .args(finetune_args(point))
        // this sweep has already applied (or been told to skip) the memory guard for the point
        .arg("--no-memory-guard")
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
                let mut row = point_row(info, point, opts.backend);
                row.error = format!("child printed no row: {}", last_line(&end.stdout));
                Ok(row)
            }
        };
    }
    // a failed point is a row of the backend that failed on it (its key says which)
    let mut row = point_row(info, point, opts.backend);
    (row.status, row.error) = classify(&end, opts.timeout_s);
    Ok(row)
}

/// The `measure` flags of a point's fine-tuning (none for full training).
fn finetune_args(point: &Point) -> Vec<String> {
    let ft = &point.finetune;
    let mut a = Vec::new();
    if ft.is_adapter() {
        a.extend([
            "--finetune".to_string(),
            ft.mode.as_str().to_string(),
            "--lora-rank".into(),
            ft.rank.to_string(),
            "--lora-targets".into(),
            ft.targets_cell(&point.model).replace('+', ","),
            "--lora-dropout".into(),
            ft.lora_dropout.to_string(),
        ]);
    }
    if ft.freeze_layers > 0 {
        a.extend(["--freeze-layers".to_string(), ft.freeze_layers.to_string()]);
    }
    a
}

/// A row for a point that produced none of its own (skipped, failed): its identifying columns.
fn point_row(info: &DeviceInfo, point: &Point, backend: Backend) -> Row {
    let mut row = measure::row_template(info, &point.model, &point.train);
    row.set_finetune(&point.model, &point.finetune);
    row.backend = backend;
    row
}

/// Bytes free for a point right now, for the memory guard; None when unknown (then there is no
/// guard rather than one that refuses everything). CPU: MemAvailable, read per point because it
/// moves; CUDA: the free memory the device probe saw before the sweep (children have exited by
/// the next point, so it is what the next child gets).
fn free_now(device: DeviceSpec, info: &DeviceInfo) -> Option<u64> {
    let b = if device.is_cpu() {
        measure::cpu_available_bytes()?
    } else {
        info.free_bytes
    };
    (b > 0).then_some(b)
}

/// A CSV swept as one shard continues only as that shard: resuming it with another `--shard`
/// (or none) would mix two shards' points in one file.
fn check_shard(opts: &SweepOptions, out_has_rows: bool) -> anyhow::Result<()> {
    let recorded = shard::read_sidecar(&opts.out)?.map(|s| s.shard());
    if !out_has_rows && opts.shard.is_none() && recorded.is_some() {
        // an empty CSV's stale shard record would make merge take a whole sweep for one shard
        let p = shard::sidecar_path(&opts.out);
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    if !out_has_rows || recorded == opts.shard {
        return Ok(());
    }
    let was = recorded.map_or("without --shard".to_string(), |s| format!("as shard {s}"));
    let accepted = recorded.map_or("no --shard".to_string(), |s| format!("--shard {s}"));
    input_err(
        "shard",
        format!(
            "{} was swept {was}; accepted {accepted} to resume it, or a new --out",
            opts.out.display()
        ),
    )
}

/// Runs a sweep (see the module docs). Returns counts per status.
pub fn run_sweep(opts: &SweepOptions) -> anyhow::Result<SweepSummary> {
    let started = Instant::now();
    let device: DeviceSpec = opts.device.parse()?;
    let mut grid = grid::load(&opts.grid)?;
    let grid_points = grid.points.len();
    if let Some(s) = opts.shard {
        let mut mine = Vec::new();
        for p in grid.points {
            if s.contains(&p.model, &p.train)? {
                mine.push(p);
            }
        }
        grid.points = mine;
    }
    let coeffs = match &opts.coeffs {
        Some(p) => Coefficients::load(p)?,
        None => Coefficients::literature(),
    };
    // Held until this function returns (the lock goes with the handle).
    let _lock = lock_out(&opts.out)?;
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
    check_shard(opts, out_has_rows)?;
    if let Some(s) = opts.shard {
        let sidecar = shard::Sidecar {
            shard: s.index,
            shards: s.count,
            grid: opts.grid.display().to_string(),
            grid_points,
            shard_points: grid.points.len(),
        };
        shard::write_sidecar(&opts.out, &sidecar)?;
    }
    let mut done: HashSet<String> = HashSet::new();
    // points whose last row failed and that --retry-failed runs again
    let mut failed: HashSet<String> = HashSet::new();
    if out_has_rows {
        // read (which checks the header) before repair_tail touches the file: a foreign CSV
        // must be refused, not trimmed
        let rows = record::latest(record::read(&opts.out)?);
        repair_tail(&opts.out)?;
        // rows of this vramcal are the current schema: never append them under an older header
        if let Some(n) = record::migrate(&opts.out)? {
            eprintln!(
                "note: {}: migrated {n} older rows to schema {} in place (candle rows: backend candle, the device kind in device_kind, the for-loop optimizer; schema 1 also eager attention; all full training) before resuming",
                opts.out.display(),
                record::SCHEMA
            );
        }
        for r in &rows {
            if opts.retry_failed && r.status != Status::Ok {
                failed.insert(r.key());
            } else {
                done.insert(r.key());
            }
        }
    }
    let info = probe_device(opts, device)?;
    let cap = match opts.max_mem {
        Some(b) => b,
        None if device.is_cpu() => info.total_bytes / 2,
        None => info.free_bytes,
    };
    let commit = measure::git_commit();

    let mut summary = SweepSummary {
        points: grid.points.len(),
        device_id: info.id.clone(),
        ..Default::default()
    };
    if let Some(m) = &opts.metrics {
        let shard = opts.shard.map(|s| s.to_string()).unwrap_or_default();
        // what this process will measure: points already in a resumed CSV are not to do
        let mut to_do = 0;
        for p in &grid.points {
            let spec_json = serde_json::to_string(&p.model)?;
            to_do += usize::from(!done.contains(&point_key(
                &info.id,
                opts.backend,
                &spec_json,
                &p.train,
                &p.finetune_key(),
            )));
        }
        m.start_sweep(&info.id, opts.backend.as_str(), &shard, to_do);
        m.set_device_memory(None, Some(info.total_bytes));
    }
    let _signals = InterruptGuard::install();
    let pb = progress_bar(grid.points.len() as u64, opts.show_progress);
    for point in &grid.points {
        if let Some(sig) = interrupted() {
            anyhow::bail!("interrupted by {}", signal_name(sig));
        }
        let spec_json = serde_json::to_string(&point.model)?;
        let key = point_key(
            &info.id,
            opts.backend,
            &spec_json,
            &point.train,
            &point.finetune_key(),
        );
        if done.contains(&key) {
            summary.already_done += 1;
            pb.inc(1);
            continue;
        }
        if failed.contains(&key) {
            summary.retried += 1;
        }
        pb.set_message(describe(point));
        // planned as the backend trains its adapters (`Backend::adapter_dtype`)
        let ft = crate::plan::finetune::Finetune {
            adapter_dtype: opts.backend.adapter_dtype(),
            ..point.finetune.clone()
        };
        let planned = crate::plan::finetune::estimate(&point.model, &point.train, &ft, &coeffs)?;
        let free = opts.memory_guard.then(|| free_now(device, &info)).flatten();
        let skip = if planned.total > cap {
            Some(format!(
                "planner predicts {} bytes, above the cap of {cap} bytes",
                planned.total
            ))
        } else {
            free.filter(|f| planned.total > *f).map(|f| {
                format!(
                    "planner predicts {} bytes, above the {f} bytes free on {} now; --no-memory-guard runs it anyway",
                    planned.total, opts.device
                )
            })
        };
        let row = if let Some(why) = skip {
            let mut row = point_row(&info, point, opts.backend);
            row.status = Status::Skipped;
            row.error = why;
            row
        } else {
            let row = measure_point(opts, &grid, &info, point, &spec_json, &commit).with_context(
                || {
                    format!(
                        "{}; the rows measured so far are in {} (--resume continues)",
                        describe(point),
                        opts.out.display()
                    )
                },
            )?;
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
        if let Some(m) = &opts.metrics {
            m.point_done(&row, planned.total);
            if device.is_cpu() {
                let used =
                    measure::cpu_available_bytes().map(|a| info.total_bytes.saturating_sub(a));
                m.set_device_memory(used, None);
            }
        }
        summary.count(row.status);
        done.insert(key);
        pb.inc(1);
    }
    pb.finish_and_clear();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A point in a few words (`tiny-gpt b2 s16 fp32 ckpt=none adamw z0/1`), for messages.
pub fn describe(p: &Point) -> String {
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
    ) + &p.finetune_key().replace('|', " ")
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
        assert_eq!(parse_bytes("1e9B").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("123B").unwrap(), 123);
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
    fn child_messages_skip_notes_and_name_allocation_failures() {
        let panic = "thread 'main' (42) panicked at src/x.rs:3:5:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(child_message(panic), "panicked at src/x.rs:3:5: boom");
        let alloc = "memory allocation of 1099511627776 bytes failed\n";
        assert_eq!(child_message(alloc), alloc.trim());
        assert!(measure::is_oom_message(&child_message(alloc)));
        let err = "warning: something\nerror: invalid batch: 0; accepted 1..\n";
        assert_eq!(child_message(err), "invalid batch: 0; accepted 1..");
        assert_eq!(child_message("note: only a note\n"), "");
        assert_eq!(signal_name(9), "SIGKILL (9)");
        assert_eq!(signal_name(15), "SIGTERM (15)");
        assert_eq!(signal_name(64), "signal 64");
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
