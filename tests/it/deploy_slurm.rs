//! deploy/slurm/ for real: a one-node Slurm cluster on this machine (slurmctld + slurmd +
//! munge, deploy/slurm/localtest.sh) runs submit.sh's job array over a tiny CPU grid in two
//! shards, then its dependent merge + fit + report job; the test checks what that job wrote.
//!
//! Slurm comes from the distribution's packages: when it is missing and this is a root shell
//! whose apt knows the packages, the test installs them (`apt-get install slurmctld slurmd
//! slurm-client munge`, a few minutes at most). Otherwise, or with `VRAMCAL_TEST_SLURM=skip`, it
//! passes after printing why it skipped, so machines without Slurm or apt do not fail.

use std::path::Path;
use std::process::Command;
use vramcal::harness::record::{self, Status};

/// 16 fast points (under a second on one core): enough ok points for a fit.
const GRID: &str = r#"
warmup = 0
repeats = 1

[[point_set]]
model = "tiny-gpt"
layers = [1, 2]
hidden = [32, 64]
vocab = 64
batch = [1, 2]
seq = [16, 32]
"#;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// None when Slurm is (now) installed, else why not.
fn install_slurm() -> Option<String> {
    if ["slurmctld", "slurmd", "sbatch", "munged"]
        .iter()
        .all(|t| have(t))
    {
        return None;
    }
    if std::env::var("VRAMCAL_TEST_SLURM").as_deref() == Ok("skip") {
        return Some("Slurm is not installed and VRAMCAL_TEST_SLURM=skip".into());
    }
    if !have("apt-get") {
        return Some("Slurm is not installed and there is no apt-get to install it".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("Slurm is not installed and installing it needs root".into());
    }
    let policy = Command::new("apt-cache")
        .args(["policy", "slurmctld"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&policy.stdout);
    if !text.contains("Candidate:") || text.contains("Candidate: (none)") {
        return Some("apt knows no slurmctld package (run apt-get update first)".into());
    }
    eprintln!("installing Slurm from the distribution's packages");
    let out = Command::new("timeout")
        .args(["600", "apt-get", "install", "-y", "--no-install-recommends"])
        .args(["slurmctld", "slurmd", "slurm-client", "munge"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Some(format!(
            "apt-get install failed: {}",
            err.lines().last().unwrap_or("")
        ));
    }
    None
}

#[test]
fn a_job_array_sweeps_shards_and_the_dependent_job_merges_fits_and_reports() {
    if let Some(why) = install_slurm() {
        println!("SKIP deploy/slurm test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(&grid, GRID).unwrap();
    let work = dir.path().join("cluster");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/slurm/localtest.sh");
    let o = Command::new("timeout")
        .arg("900")
        .arg(&script)
        .arg(&work)
        .arg(&grid)
        .arg("2")
        .arg(env!("CARGO_BIN_EXE_vramcal"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    if o.status.code() == Some(77) {
        println!("{}", stdout.lines().last().unwrap_or("SKIP"));
        return;
    }
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let out = work.join("out");
    // two array tasks, each its own shard, together the whole grid
    let grid_points = vramcal::harness::grid::load(&grid).unwrap().points.len();
    let mut per_shard = Vec::new();
    for i in 0..2 {
        let rows = record::read(&out.join(format!("shard-{i}.csv"))).unwrap();
        let side = vramcal::harness::shard::read_sidecar(&out.join(format!("shard-{i}.csv")))
            .unwrap()
            .expect("the sweep wrote its shard record");
        assert_eq!(
            (side.shard, side.shards, side.grid_points),
            (i, 2, grid_points)
        );
        assert_eq!(side.shard_points, rows.len());
        per_shard.push(rows.len());
    }
    assert!(per_shard.iter().all(|&n| n > 0), "{per_shard:?}");
    let all = record::read(&out.join("all.csv")).unwrap();
    assert_eq!(all.len(), grid_points);
    assert_eq!(per_shard.iter().sum::<usize>(), grid_points);
    assert!(all
        .iter()
        .all(|r| r.status == Status::Ok && r.peak_bytes.unwrap() > 0));
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("table.json")).unwrap()).unwrap();
    assert!(
        table["modes"].as_array().is_some_and(|m| !m.is_empty()),
        "{table}"
    );
    let report = std::fs::read_to_string(out.join("report/README.md")).unwrap();
    assert!(report.contains("MAPE"), "{report}");
    // the merge job's log carries merge's summary line
    let merge_log = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vramcal-merge-")
        })
        .expect("the merge job's log");
    let log = std::fs::read_to_string(merge_log).unwrap();
    assert!(
        log.contains(&format!(
            "merged 2 files (2 of 2 shards): {grid_points} rows -> {grid_points} points"
        )),
        "{log}"
    );
}
