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
        assert_eq!(r.device_id, format!("cpu-{}", std::env::consts::ARCH));
    }
    // grid order is kept: gpt points first, CNN last
    assert_eq!(rows[5].model, "tiny-resnet18");
    assert_eq!(rows[5].batch, 2);
}

/// The other ways a child can die: an out-of-memory error message, a SIGKILL (what the Linux
/// OOM killer sends), and a hang past the timeout.
#[test]
fn oom_messages_sigkills_and_timeouts_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let grid = write_grid(dir.path());
    for (pattern, status, text) in [
        ("oom:|b1|s32|", Status::Oom, "OUT_OF_MEMORY"),
        ("kill:|b1|s32|", Status::Oom, "SIGKILL"),
        ("hang:|b1|s32|", Status::Error, "timed out after 2 s"),
    ] {
        let out = dir.path().join(format!("{}.csv", &pattern[..3]));
        sweep(
            &grid,
            &out,
            &["--timeout-s", "2"],
            Some(("VRAMCAL_FAIL_POINT", pattern)),
        );
        let rows = record::read(&out).unwrap();
        assert_eq!(rows.len(), 6, "{pattern}");
        let bad: Vec<_> = rows.iter().filter(|r| r.status != Status::Ok).collect();
        assert_eq!(bad.len(), 1, "{pattern}: {rows:#?}");
        assert_eq!((bad[0].status, bad[0].batch, bad[0].seq), (status, 1, 32));
        assert!(bad[0].error.contains(text), "{pattern}: {}", bad[0].error);
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
    sweep(&grid, &out, &["--max-mem", "1000"], None);
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
    sweep(&grid, &out2, &["--max-mem", &cap.to_string()], None);
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
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sqe"));
}
