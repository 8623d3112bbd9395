//! `vramcal fit` and `vramcal report` on a CSV written through `record::append`: the table,
//! accuracy.json (schema and real values), README.md and every plot it references.

use crate::fit_common::{row, synthetic_rows};
use std::process::Command;
use vramcal::harness::record::{append, Status};
use vramcal::spec::presets::preset;
use vramcal::spec::TrainSpec;

#[test]
fn fit_and_report_from_csv() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("synthetic.csv");
    for r in synthetic_rows(0.005, 11) {
        append(&csv, &r).unwrap();
    }
    let m = preset("tiny-gpt").unwrap();
    let big = TrainSpec {
        batch: 4096,
        seq: 1024,
        ..TrainSpec::default()
    };
    append(&csv, &row(&m, &big, 0.0, 0.0, Status::Oom)).unwrap();
    append(
        &csv,
        &row(
            &m,
            &TrainSpec {
                batch: 3,
                ..big.clone()
            },
            0.0,
            0.0,
            Status::Error,
        ),
    )
    .unwrap();

    let exe = env!("CARGO_BIN_EXE_vramcal");
    let table = dir.path().join("calib/synthetic.json");
    let out = Command::new(exe)
        .args(["fit", "--data"])
        .arg(&csv)
        .arg("--out")
        .arg(&table)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let coeffs = vramcal::coeffs::Coefficients::load(&table).unwrap();
    assert_eq!(coeffs.device_id, "synthetic");
    assert!(coeffs.points > 500);

    let rep = dir.path().join("reports/synthetic");
    let out = Command::new(exe)
        .args(["report", "--data"])
        .arg(&csv)
        .arg("--coeffs")
        .arg(&table)
        .arg("--out")
        .arg(&rep)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let acc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("accuracy.json")).unwrap()).unwrap();
    for k in ["heldout", "seed_formula", "literature", "time_heldout"] {
        for f in ["mape", "max_abs_pct", "median_abs_pct", "n"] {
            assert!(acc[k][f].is_number(), "{k}.{f} missing: {acc}");
        }
    }
    let held = acc["heldout"]["mape"].as_f64().unwrap();
    assert!(
        held < 1.5,
        "0.5 % noise should give a held-out MAPE near 0.5 %, got {held}"
    );
    assert!(acc["seed_formula"]["mape"].as_f64().unwrap() > held);
    assert_eq!(acc["heldout"]["n"], acc["seed_formula"]["n"]);
    let excluded = acc["excluded"].as_array().unwrap();
    assert_eq!(excluded.len(), 2);
    assert!(excluded.iter().any(|e| e["status"] == "oom"));
    assert!(!acc["per_group"].as_array().unwrap().is_empty());

    let readme = std::fs::read_to_string(rep.join("README.md")).unwrap();
    for svg in [
        "measured_vs_predicted.svg",
        "peak_vs_batch.svg",
        "peak_vs_seq.svg",
        "time_vs_flops.svg",
        "checkpointing.svg",
    ] {
        assert!(
            readme.contains(&format!("]({svg})")),
            "README does not reference {svg}"
        );
        let text = std::fs::read_to_string(rep.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("<text"),
            "{svg} is not an SVG with text"
        );
    }
    assert!(readme.contains("synthetic failure"));
}

#[test]
fn bad_input_exits_with_code_2() {
    let exe = env!("CARGO_BIN_EXE_vramcal");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(exe)
        .args(["fit", "--data", "/nonexistent.csv", "--out"])
        .arg(dir.path().join("x.json"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The committed PyTorch reference rows (`calibrate --backend torch` on this CPU) parse as
/// torch rows, and the committed CPU report's "Predicting PyTorch" section is what the report
/// code computes from them: regenerated here from the committed CSVs and table, its scores equal
/// the committed accuracy.json's. It scores the full-training rows; LoRA rows are scored in the
/// report's fine-tuning section.
#[test]
fn committed_pytorch_rows_drive_the_reports_pytorch_section() {
    use vramcal::harness::record::{self, Backend};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let id = "cpu-amd-epyc";
    let torch_csv = root.join(format!("calibration/data/{id}-torch.csv"));
    let rows = record::latest(record::read(&torch_csv).unwrap());
    assert!(rows
        .iter()
        .all(|r| r.backend == Backend::Torch && r.device_id == id));
    let ok = rows.iter().filter(|r| r.status == Status::Ok).count();
    assert!(ok >= 100, "only {ok} ok PyTorch rows");
    // every ok row carries what the runner measures: tensors at the baseline, a peak above it,
    // bytes saved for backward, step times
    for r in rows.iter().filter(|r| r.status == Status::Ok) {
        let (b, p) = (r.baseline_bytes.unwrap(), r.peak_bytes.unwrap());
        assert!(p > b && b > 0, "{}: baseline {b} peak {p}", r.key());
        assert!(r.saved_bytes.unwrap() > 0 && r.step_ms_median.unwrap() > 0.0);
    }

    let table =
        vramcal::coeffs::Coefficients::load(&root.join(format!("calibration/{id}.json"))).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (acc, _) = vramcal::cli::report::report_files(
        &root.join(format!("calibration/data/{id}.csv")),
        &table,
        out.path(),
        None,
        false,
        Some(&torch_csv),
    )
    .unwrap();
    let section = acc.pytorch.expect("a PyTorch section");
    let full = rows
        .iter()
        .filter(|r| r.status == Status::Ok && r.finetune.as_str() == "full")
        .count();
    assert!(full < ok, "the committed rows include LoRA steps");
    assert_eq!(section.rows, full);
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join(format!("reports/{id}/accuracy.json"))).unwrap(),
    )
    .unwrap();
    for key in ["fitted", "literature", "seed_formula"] {
        let want = committed["pytorch"]["scores"][key]["mape"]
            .as_f64()
            .unwrap();
        let got = match key {
            "fitted" => section.scores.fitted.mape,
            "literature" => section.scores.literature.mape,
            _ => section.scores.seed_formula.mape,
        };
        assert!(
            (want - got).abs() < 1e-9,
            "{key}: committed {want}, regenerated {got}"
        );
    }
    let md = std::fs::read_to_string(out.path().join("README.md")).unwrap();
    assert!(md.contains("## Predicting PyTorch"));
}

/// The committed CPU tables are what this code fits from the committed CSVs:
/// `calibrate --refit` (no sweep) rewrites both tables with the same coefficients and held-out
/// residuals, leaves each CSV byte for byte as it was, and refuses a device with no CSV.
#[test]
fn committed_tables_are_refitted_from_their_csvs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for (file, backend) in [("cpu-amd-epyc", "candle"), ("cpu-amd-epyc-torch", "torch")] {
        let csv = root.join(format!("calibration/data/{file}.csv"));
        std::fs::copy(&csv, data.join(format!("{file}.csv"))).unwrap();
        let (code, out, err) = crate::common::vramcal(&[
            "calibrate",
            "--refit",
            "--device",
            "cpu",
            "--backend",
            backend,
            "--device-id",
            "cpu-amd-epyc",
            "--grid",
            "calibration/grids/cpu.toml",
            "--data-dir",
            data.to_str().unwrap(),
            "--calib-dir",
            dir.path().to_str().unwrap(),
            "--reports-dir",
            dir.path().join("reports").to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{file}: {err}");
        assert!(out.contains("without measuring"), "{out}");
        assert_eq!(
            std::fs::read(data.join(format!("{file}.csv"))).unwrap(),
            std::fs::read(&csv).unwrap(),
            "{file}: the CSV changed"
        );
        let load = |p: std::path::PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (refit, committed) = (
            load(dir.path().join(format!("{file}.json"))),
            load(root.join(format!("calibration/{file}.json"))),
        );
        for key in ["device_id", "backend", "points", "modes", "residuals"] {
            assert_same(&refit[key], &committed[key], &format!("{file}: {key}"));
        }
    }
    let (code, _, err) = crate::common::vramcal(&[
        "calibrate",
        "--refit",
        "--device-id",
        "cpu-nowhere",
        "--grid",
        "calibration/grids/cpu.toml",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refit") && err.contains("cpu-nowhere.csv"),
        "{err}"
    );
}

/// JSON values equal but for the last bits of their numbers (a BLAS kernel picked by the CPU's
/// features may round differently).
fn assert_same(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
                "{at}: {x} vs {y}"
            );
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: keys");
            for (k, v) in x {
                assert_same(v, &y[k], &format!("{at}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: length");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                assert_same(v, w, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}
