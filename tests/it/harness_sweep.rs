//! `vramcal sweep` through the real binary: child process per point, failure injection,
//! resume after a killed run, and the planner's memory-cap guard.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use vramcal::harness::record::{self, Row, Status};

/// Six fast points: a 1-layer GPT at 2 batch sizes x 2 sequence lengths, and a narrow ResNet-18.
const GRID: &str = r#"
warmup = 0
repeats = 1

[[point_set]]
model = "tiny-gpt"
layers = 1
hidden = 32
vocab = 64
batch = [1, 2]
seq = [16, 32]

[[point_set]]
model = "tiny-resnet18"
width = 2
image = [32]
batch = [1, 2]
"#;

fn write_grid(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("grid.toml");
    std::fs::write(&p, GRID).unwrap();
    p
}

fn sweep(grid: &Path, out: &Path, extra: &[&str], env: Option<(&str, &str)>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vramcal"));
    cmd.arg("sweep")
        .arg("--grid")
        .arg(grid)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("VRAMCAL_FAIL_POINT");
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "sweep failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn keys(rows: &[Row]) -> Vec<String> {
    rows.iter().map(Row::key).collect()
}

fn assert_no_duplicates(rows: &[Row]) {
    let k = keys(rows);
    let set: HashSet<_> = k.iter().collect();
    assert_eq!(set.len(), k.len(), "duplicate keys in {k:#?}");
}

#[test]
fn injected_failure_is_recorded_and_the_sweep_continues() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_grid(dir.path());
    let out = dir.path().join("data.csv");
    // the key contains "|b2|s16|": fails the tiny-gpt point at batch 2, seq 16 only
    sweep(&grid, &out, &[], Some(("VRAMCAL_FAIL_POINT", "|b2|s16|")));
    let rows = record::read(&out).unwrap();
    assert_eq!(rows.len(), 6);
    assert_no_duplicates(&rows);
    let failed: Vec<_> = rows.iter().filter(|r| r.status == Status::Error).collect();
    assert_eq!(failed.len(), 1, "{rows:#?}");
    assert_eq!((failed[0].batch, failed[0].seq), (2, 16));
    assert!(
        failed[0].error.contains("injected failure"),
        "{}",
        failed[0].error
    );
    // the points after it ran normally, with real measurements
    let ok: Vec<_> = rows.iter().filter(|r| r.status == Status::Ok).collect();
    assert_eq!(ok.len(), 5);
    for r in &ok {
        assert!(r.peak_bytes.unwrap() > r.baseline_bytes.unwrap(), "{r:?}");
        assert!(r.step_ms_median.unwrap() > 0.0);
        assert_eq!(r.device_id, vramcal::harness::device::cpu_info().id);
        assert!(r.device_id.starts_with("cpu-"));
    }
    // grid order is kept: gpt points first, CNN last
    assert_eq!(rows[5].model, "tiny-resnet18");
    assert_eq!(rows[5].batch, 2);
}

/// Two fast points: a 1-layer GPT at seq 16 and 32 (the failure tests fail the first one).
const GRID_SMALL: &str = r#"
warmup = 0
repeats = 1

[[point_set]]
model = "tiny-gpt"
layers = 1
hidden = 32
vocab = 64
batch = [1]
seq = [16, 32]
"#;

fn write_small_grid(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("small.toml");
    std::fs::write(&p, GRID_SMALL).unwrap();
    p
}

/// The ways a child can die, each recorded with its own status and a message that says what
/// happened: an out-of-memory error message, a real allocation failure (message, then SIGABRT),
/// SIGKILL (what the Linux OOM killer sends, but also `kill -9`), SIGTERM, a panic (stderr ends
/// with the RUST_BACKTRACE note, which must not become the message) and a hang past the timeout.
#[test]
fn oom_allocation_failures_signals_panics_and_timeouts_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_small_grid(dir.path());
    for (i, (pattern, status, text)) in [
        ("oom:|s16|", Status::Oom, "OUT_OF_MEMORY"),
        (
            "alloc:|s16|",
            Status::Oom,
            "memory allocation of 1099511627776 bytes failed",
        ),
        ("kill:|s16|", Status::Killed, "killed by SIGKILL (9)"),
        ("term:|s16|", Status::Killed, "killed by SIGTERM (15)"),
        ("panic:|s16|", Status::Error, "injected panic"),
        ("hang:|s16|", Status::Timeout, "timed out after 2 s"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("{i}.csv"));
        let o = sweep(
            &grid,
            &out,
            &["--timeout-s", "2", "--json"],
            Some(("VRAMCAL_FAIL_POINT", pattern)),
        );
        let rows = record::read(&out).unwrap();
        assert_eq!(rows.len(), 2, "{pattern}");
        assert_eq!(
            (rows[1].status, rows[1].seq),
            (Status::Ok, 32),
            "{pattern}: the sweep went on"
        );
        let bad = &rows[0];
        assert_eq!((bad.status, bad.seq), (status, 16), "{pattern}: {bad:?}");
        assert!(bad.error.contains(text), "{pattern}: {}", bad.error);
        assert!(
            !bad.error.contains("RUST_BACKTRACE"),
            "{pattern}: {}",
            bad.error
        );
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary[status.as_str()], 1, "{pattern}: {summary}");
    }
}

#[test]
fn retry_failed_reruns_failed_rows_and_the_new_row_wins() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_small_grid(dir.path());
    let out = dir.path().join("retry.csv");
    sweep(&grid, &out, &[], Some(("VRAMCAL_FAIL_POINT", "|s16|")));
    let first = record::read(&out).unwrap();
    assert_eq!(
        first.iter().map(|r| r.status).collect::<Vec<_>>(),
        [Status::Error, Status::Ok]
    );
    // --resume alone keeps the failed row: nothing runs
    let o = sweep(&grid, &out, &["--resume", "--json"], None);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s["already_done"].as_u64(), s["ok"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(record::read(&out).unwrap().len(), 2);
    // --retry-failed runs exactly the failed point again
    let o = sweep(&grid, &out, &["--resume", "--retry-failed", "--json"], None);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            s["already_done"].as_u64(),
            s["retried"].as_u64(),
            s["ok"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{s}"
    );
    let all = record::read(&out).unwrap();
    assert_eq!(all.len(), 3, "the old row stays in the file: {all:#?}");
    assert_eq!((all[2].status, all[2].seq), (Status::Ok, 16));
    let latest = record::latest(all);
    assert_eq!(latest.len(), 2);
    assert!(latest.iter().all(|r| r.status == Status::Ok), "{latest:#?}");
    // a further --retry-failed has nothing left to retry
    let o = sweep(&grid, &out, &["--resume", "--retry-failed", "--json"], None);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["already_done"].as_u64(), Some(2), "{s}");
}

fn vramcal_sweep(grid: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vramcal"));
    cmd.arg("sweep")
        .arg("--grid")
        .arg(grid)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("VRAMCAL_FAIL_POINT");
    cmd
}

fn assert_one_line_exit_2(o: &Output, must_contain: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for m in must_contain {
        assert!(err.contains(m), "{m:?} not in {err}");
    }
}

#[test]
fn resume_refuses_a_foreign_csv_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_small_grid(dir.path());
    let out = dir.path().join("foreign.csv");
    let text = "name,value\nalpha,1\nbeta,2";
    std::fs::write(&out, text).unwrap();
    let o = vramcal_sweep(&grid, &out, &["--resume"]).output().unwrap();
    assert_one_line_exit_2(&o, &["foreign.csv", "not a vramcal measurements header"]);
    // not trimmed (no "incomplete last line" repair), nothing appended
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
}

/// Process ids of `vramcal measure` children of `pid` (Linux /proc); the sweep may also run
/// git for its commit, which is not what this test is about.
#[cfg(target_os = "linux")]
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            let ppid: u32 = rest.split_whitespace().nth(1).unwrap().parse().unwrap();
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            let measuring = cmdline.split(|b| *b == 0).any(|a| a == b"measure");
            if ppid == pid && measuring {
                out.push(child);
            }
        }
    }
    out
}

/// Gone, or a zombie waiting for a reaper (a container's init may never reap it).
#[cfg(target_os = "linux")]
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            matches!(rest.split_whitespace().next(), Some("Z") | Some("X"))
        }
    }
}

#[cfg(target_os = "linux")]
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// While a sweep runs (its first point hangs), a second sweep on the same CSV is refused at once;
/// Ctrl-C (SIGINT) and SIGKILL of the sweep both take its measuring child with it.
#[cfg(target_os = "linux")]
#[test]
fn a_running_sweep_locks_its_csv_and_its_child_dies_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_small_grid(dir.path());
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGKILL, "SIGKILL")] {
        let out = dir.path().join(format!("locked-{name}.csv"));
        let mut a = vramcal_sweep(&grid, &out, &["--timeout-s", "120"])
            .env("VRAMCAL_FAIL_POINT", "hang:|s16|")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut kids = Vec::new();
        wait_until("the measuring child", Duration::from_secs(60), || {
            kids = children_of(a.id());
            !kids.is_empty()
        });
        let t0 = Instant::now();
        let b = vramcal_sweep(&grid, &out, &["--resume"]).output().unwrap();
        assert_one_line_exit_2(&b, &[&format!("locked-{name}.csv"), "locked"]);
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the second sweep waited"
        );
        // SAFETY: kill(2) on the sweep this test spawned.
        unsafe {
            libc::kill(a.id() as libc::pid_t, sig);
        }
        a.wait().unwrap();
        for k in kids {
            wait_until(
                &format!("child {k} of a sweep ended by {name}"),
                Duration::from_secs(5),
                || is_dead(k),
            );
        }
        // the lock went with the sweep: the file can be resumed now
        sweep(&grid, &out, &["--resume"], None);
        assert_eq!(record::read(&out).unwrap().len(), 2);
    }
}

#[test]
fn resume_after_a_killed_run_neither_duplicates_nor_loses_rows() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_grid(dir.path());

    let full = dir.path().join("full.csv");
    sweep(&grid, &full, &[], None);
    let full_rows = record::read(&full).unwrap();
    assert_eq!(full_rows.len(), 6);
    let full_keys: HashSet<String> = keys(&full_rows).into_iter().collect();

    // 1) kill a sweep part-way, then resume it
    let killed = dir.path().join("killed.csv");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .arg("sweep")
        .arg("--grid")
        .arg(&grid)
        .arg("--out")
        .arg(&killed)
        .env_remove("VRAMCAL_FAIL_POINT")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(&killed)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 3 || t0.elapsed() > Duration::from_secs(120) {
            break; // header + 2 rows
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = record::read(&killed).unwrap();
    assert!(
        partial.len() >= 2 && partial.len() < 6,
        "{} rows before the kill",
        partial.len()
    );
    sweep(&grid, &killed, &["--resume"], None);
    let resumed = record::read(&killed).unwrap();
    assert_no_duplicates(&resumed);
    assert_eq!(
        keys(&resumed).into_iter().collect::<HashSet<_>>(),
        full_keys
    );

    // 2) a run killed mid-write (last line cut off) resumes too
    let cut = dir.path().join("cut.csv");
    let text = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut truncated = lines[..3].join("\n");
    truncated.push('\n');
    truncated.push_str(&lines[3][..lines[3].len() / 2]);
    std::fs::write(&cut, truncated).unwrap();
    let o = sweep(&grid, &cut, &["--resume", "--json"], None);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["already_done"], 2);
    assert_eq!(summary["ok"], 4);
    let rows = record::read(&cut).unwrap();
    assert_no_duplicates(&rows);
    assert_eq!(keys(&rows).into_iter().collect::<HashSet<_>>(), full_keys);

    // 3) resuming a complete file runs nothing
    let o = sweep(&grid, &full, &["--resume", "--json"], None);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["already_done"], 6);
    assert_eq!(record::read(&full).unwrap().len(), 6);
}

#[test]
fn the_memory_cap_guard_records_skipped_points() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_grid(dir.path());
    let out = dir.path().join("capped.csv");
    // a cap below every point: nothing runs
    sweep(&grid, &out, &["--max-mem", "1000B"], None);
    let rows = record::read(&out).unwrap();
    assert_eq!(rows.len(), 6);
    for r in &rows {
        assert_eq!(r.status, Status::Skipped, "{r:?}");
        assert!(
            r.error.contains("above the cap of 1000 bytes"),
            "{}",
            r.error
        );
        assert!(r.peak_bytes.is_none());
        assert!(r.params > 0);
    }
    // a cap between the smallest and the largest planned point skips only the large ones
    let coeffs = vramcal::coeffs::Coefficients::literature();
    let planned: Vec<u64> = rows
        .iter()
        .map(|r| {
            vramcal::plan::memory::estimate(&r.model_spec().unwrap(), &r.train_spec(), &coeffs)
                .unwrap()
                .total
        })
        .collect();
    let (lo, hi) = (
        *planned.iter().min().unwrap(),
        *planned.iter().max().unwrap(),
    );
    assert!(lo < hi);
    let cap = (lo + hi) / 2;
    let out2 = dir.path().join("half.csv");
    sweep(&grid, &out2, &["--max-mem", &format!("{cap}B")], None);
    let rows2 = record::read(&out2).unwrap();
    for (r, p) in rows2.iter().zip(&planned) {
        let want = if *p > cap {
            Status::Skipped
        } else {
            Status::Ok
        };
        assert_eq!(r.status, want, "planned {p} cap {cap}: {r:?}");
    }
}

#[test]
fn an_existing_csv_without_resume_and_a_bad_grid_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_grid(dir.path());
    let out = dir.path().join("x.csv");
    std::fs::write(&out, "schema\n1\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args(["sweep", "--grid"])
        .arg(&grid)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[point_set]]\nmodel = \"tiny-gpt\"\nbatch = [1]\nsqe = [8]\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args(["sweep", "--grid"])
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("y.csv"))
        .output()
        .unwrap();
    assert_one_line_exit_2(&o, &["bad.toml", "line 4", "sqe"]);
}

/// One eager and one sdpa point of the same 1-layer Llama (no dropout: on a CPU, sdpa with
/// attention dropout runs the math path, as PyTorch's does).
const ATTENTION_GRID: &str = r#"
warmup = 0
repeats = 1

[[point_set]]
model = "tiny-llama"
layers = 1
hidden = 32
vocab = 64
batch = [1]
seq = [32]
attention = ["eager", "sdpa"]
"#;

#[test]
fn an_sdpa_point_is_measured_with_fused_attention_and_kept_apart_from_eager() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(&grid, ATTENTION_GRID).unwrap();
    let out = dir.path().join("data.csv");
    sweep(&grid, &out, &[], None);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.lines().next().unwrap().ends_with(concat!(
            ",spec_json,attention,device_kind,optimizer_impl,saved_bytes,finetune,",
            "lora_rank,lora_targets,lora_dropout,freeze_layers,trainable_params"
        )),
        "{text}"
    );
    let rows = record::read(&out).unwrap();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_no_duplicates(&rows);
    assert!(rows.iter().all(|r| r.status == Status::Ok), "{rows:#?}");
    use vramcal::spec::Attention;
    assert_eq!(rows[0].train_spec().attention, Attention::Eager);
    assert_eq!(rows[1].train_spec().attention, Attention::Sdpa);
    // the child really ran fused attention: it never holds the b·a·s² scores eager saves
    assert!(
        rows[1].peak_bytes.unwrap() < rows[0].peak_bytes.unwrap(),
        "{rows:#?}"
    );
    // resuming skips both points: their keys differ and both are found
    sweep(&grid, &out, &["--resume"], None);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
}

#[test]
fn resume_migrates_a_schema1_csv_in_place_before_appending() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_grid(dir.path());
    let out = dir.path().join("data.csv");
    sweep(&grid, &out, &[], None);
    let v3 = std::fs::read_to_string(&out).unwrap();
    // the same rows as an older vramcal wrote them: schema 1 (no attention, device_kind,
    // optimizer_impl, saved_bytes; the device kind in `backend`), first 4 rows
    let mut r = csv::ReaderBuilder::new().from_reader(v3.as_bytes());
    let mut w = csv::Writer::from_writer(Vec::new());
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header.len(), 46);
    assert_eq!(header[36], "attention");
    w.write_record(&header[..36]).unwrap();
    for rec in r.records().take(4) {
        let rec = rec.unwrap();
        let mut f: Vec<&str> = rec.iter().collect();
        assert_eq!(f[36], "eager");
        assert_eq!(f[3], "candle");
        f.truncate(36);
        f[0] = "1";
        f[3] = "cpu";
        w.write_record(&f).unwrap();
    }
    let v1 = String::from_utf8(w.into_inner().unwrap()).unwrap();
    std::fs::write(&out, &v1).unwrap();
    let old = record::read(&out).unwrap();
    assert_eq!(old.len(), 4);
    assert!(old.iter().all(|r| r.schema == 1));

    let o = sweep(&grid, &out, &["--resume"], None);
    let err = String::from_utf8_lossy(&o.stderr);
    let notes: Vec<&str> = err.lines().filter(|l| l.contains("migrated")).collect();
    assert_eq!(notes.len(), 1, "{err}");
    assert!(
        notes[0].contains("migrated 4 older rows to schema 4"),
        "{err}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    // one header, schema 4, every line of the old file kept (schema 4, backend candle, with
    // eager, the device kind, the for-loop optimizer, no saved bytes and full training appended)
    assert_eq!(text.lines().next(), v3.lines().next());
    assert_eq!(text.lines().filter(|l| l.starts_with("schema,")).count(), 1);
    for (old_line, new_line) in v1.lines().skip(1).zip(text.lines().skip(1)) {
        let want = format!("4{},eager,cpu,loop,,full,,,,0,", &old_line[1..])
            .replacen(",cpu,", ",candle,", 1);
        assert_eq!(want, new_line);
    }
    let rows = record::read(&out).unwrap();
    // the 4 old points were skipped (their keys are unchanged), the 2 others measured
    assert_eq!(rows.len(), 6, "{rows:#?}");
    assert_no_duplicates(&rows);
    assert!(rows.iter().all(|r| r.schema == 4));
    assert_eq!(keys(&rows[..4]), keys(&old));
}
