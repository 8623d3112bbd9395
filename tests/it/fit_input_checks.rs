//! What `fit` and `report` refuse, through the real binary: every refusal is one line naming
//! the file (and line and column for a bad cell) with exit code 2, never a table or a 0 % score
//! built on bad rows.

use crate::fit_common::synthetic_rows;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vramcal::harness::record::{append, Row, Status, HEADER};
use vramcal::spec::{Optimizer, Precision};

/// A quarter of the synthetic grid (fp32, AdamW): enough points for every coefficient, quick to
/// fit and score.
fn rows() -> Vec<Row> {
    synthetic_rows(0.005, 3)
        .into_iter()
        .filter(|r| r.precision == Precision::Fp32 && r.optimizer == Optimizer::AdamW)
        .collect()
}

fn write_csv(dir: &Path, name: &str, rows: &[Row]) -> PathBuf {
    let p = dir.join(name);
    for r in rows {
        append(&p, r).unwrap();
    }
    p
}

/// Replaces one cell (data row `index`, 0-based) in place; returns the cell's line number.
fn set_cell(path: &Path, index: usize, column: &str, value: &str) -> usize {
    let col = HEADER.iter().position(|h| *h == column).unwrap();
    let mut r = csv::Reader::from_path(path).unwrap();
    let mut recs: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    let line = recs[index].position().unwrap().line() as usize;
    let fields: Vec<String> = recs[index]
        .iter()
        .enumerate()
        .map(|(j, f)| if j == col { value.into() } else { f.into() })
        .collect();
    recs[index] = csv::StringRecord::from(fields);
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(HEADER).unwrap();
    for rec in &recs {
        w.write_record(rec).unwrap();
    }
    w.flush().unwrap();
    line
}

fn vramcal(args: &[&str], paths: &[&Path]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vramcal"));
    cmd.args(args);
    for p in paths {
        cmd.arg(p);
    }
    cmd.output().unwrap()
}

fn fit(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vramcal"));
    cmd.args(["fit", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd.output().unwrap()
}

fn literature() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/literature.json")
}

fn report(data: &Path, out: &Path) -> Output {
    vramcal(
        &[],
        &[
            Path::new("report"),
            Path::new("--data"),
            data,
            Path::new("--coeffs"),
            &literature(),
            Path::new("--out"),
            out,
        ],
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_one_line_exit_2(o: &Output, must_contain: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for m in must_contain {
        assert!(err.contains(m), "{m:?} not in {err}");
    }
}

#[test]
fn non_finite_and_negative_cells_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = rows();
    for (i, (index, column, value)) in [
        (5, "step_ms_median", "inf"),
        (17, "step_ms_p90", "NaN"),
        (0, "peak_bytes", "-3"),
        (40, "baseline_bytes", "inf"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("bad{i}.csv");
        let csv = write_csv(dir.path(), &name, &good);
        let line = set_cell(&csv, index, column, value);
        let o = fit(&csv, &dir.path().join("t.json"), &[]);
        let want_line = format!("line {line} ");
        assert_one_line_exit_2(&o, &[&name, &want_line, column, value]);
        assert!(!dir.path().join("t.json").exists());
    }
}

#[test]
fn all_nan_step_times_are_refused_not_scored_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let good = rows();
    let csv = write_csv(dir.path(), "nan.csv", &good);
    for i in 0..good.len() {
        set_cell(&csv, i, "step_ms_median", "NaN");
    }
    let o = report(&csv, &dir.path().join("rep"));
    assert_one_line_exit_2(&o, &["nan.csv", "step_ms_median", "NaN"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("0.00 %"));
    assert!(!dir.path().join("rep/accuracy.json").exists());
}

#[test]
fn no_step_times_is_reported_as_none_scored() {
    let dir = tempfile::tempdir().unwrap();
    let no_times: Vec<Row> = rows()
        .into_iter()
        .map(|mut r| {
            r.step_ms_median = None;
            r
        })
        .collect();
    let csv = write_csv(dir.path(), "notimes.csv", &no_times);
    let rep = dir.path().join("rep");
    let o = report(&csv, &rep);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("step time MAPE: none scored"), "{text}");
    let acc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("accuracy.json")).unwrap()).unwrap();
    assert_eq!(acc["time_heldout"]["n"], 0, "{}", acc["time_heldout"]);
    assert!(
        acc["time_heldout"]["mape"].is_null(),
        "{}",
        acc["time_heldout"]
    );
    // the memory scores are real numbers on real points
    assert!(acc["heldout"]["n"].as_u64().unwrap() > 0);
    assert!(acc["heldout"]["mape"].is_number());
}

#[test]
fn mixed_devices_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut mixed = rows();
    let n = mixed.len();
    for r in mixed.iter_mut().skip(n / 2) {
        r.device_id = "other-device".into();
    }
    let csv = write_csv(dir.path(), "mixed.csv", &mixed);
    let table = dir.path().join("t.json");
    let o = fit(&csv, &table, &[]);
    assert_one_line_exit_2(
        &o,
        &[
            "mixed.csv",
            "other-device",
            "synthetic",
            "--allow-mixed-devices",
        ],
    );
    assert!(!table.exists());
    let o = report(&csv, &dir.path().join("rep"));
    assert_one_line_exit_2(&o, &["mixed.csv", "--allow-mixed-devices"]);
    let o = fit(&csv, &table, &["--allow-mixed-devices"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(table.exists());
}

#[test]
fn fewer_points_than_coefficients_are_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let one = rows().into_iter().take(1).collect::<Vec<_>>();
    let csv = write_csv(dir.path(), "one.csv", &one);
    let o = fit(&csv, &dir.path().join("t.json"), &[]);
    assert_one_line_exit_2(&o, &["1 ok points for the "]);
    let err = stderr(&o);
    let c: usize = err
        .split("points for the ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no coefficient count in {err}"));
    assert!(c > 1, "{err}");
    assert!(err.contains(&format!("accepted at least {c}")), "{err}");
}

#[test]
fn a_rerun_row_supersedes_the_earlier_row_of_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = rows();
    let n = all.len();
    // the first point re-run later and failed this time: its ok row no longer counts
    let mut rerun = all[0].clone();
    rerun.status = Status::Error;
    rerun.peak_bytes = None;
    rerun.step_ms_median = None;
    rerun.error = "re-run failed".into();
    all.push(rerun);
    let csv = write_csv(dir.path(), "rerun.csv", &all);
    let o = fit(&csv, &dir.path().join("t.json"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("on {} ok points (1 excluded)", n - 1)),
        "{text}"
    );
}

#[test]
fn other_schemas_and_report_out_on_a_file_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write_csv(dir.path(), "s5.csv", &rows());
    let line = set_cell(&csv, 3, "schema", "5");
    let o = fit(&csv, &dir.path().join("t.json"), &[]);
    let want_line = format!("line {line} ");
    assert_one_line_exit_2(&o, &["s5.csv", &want_line, "'5'", "accepted schema 4"]);

    let good = write_csv(dir.path(), "good.csv", &rows());
    let file = dir.path().join("report-here");
    std::fs::write(&file, "not a directory").unwrap();
    let o = report(&good, &file);
    assert_one_line_exit_2(&o, &["report-here", "not a directory"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
}
