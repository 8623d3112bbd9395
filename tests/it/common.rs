//! Helpers shared by the test modules: running the vramcal binary, and running a test alone in
//! its own process.

use std::process::Command;

/// Runs the vramcal binary from the repository root: (exit code, stdout, stderr). A process
/// ended by a signal reports -1.
pub fn vramcal(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run vramcal");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether the calling test should run its body here. A test that reads the allocator counters
/// (`harness::probe::cpu`) needs the process to itself: the counters are process-wide, and the
/// other tests of this binary allocate on other threads meanwhile. So the test runs again in a
/// child process of this binary, alone (`--exact`, one thread), this call fails the test if the
/// child's run did not pass, and returns false; in the child (or where the test already runs on
/// the main thread, `--test-threads=1`) it returns true.
pub fn alone() -> bool {
    const CHILD: &str = "VRAMCAL_TEST_ALONE";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let thread = std::thread::current();
    let Some(name) = thread.name().filter(|n| *n != "main") else {
        return true;
    };
    let out = Command::new(std::env::current_exe().expect("test binary path"))
        .args([name, "--exact", "--test-threads=1", "--include-ignored"])
        .env(CHILD, "1")
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name}, run alone: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// One row of a committed `scripts/torch_step_peak` CSV, re-planned: its name, the plan of
/// its recorded planner command (`estimate --json`), and a reader for its other columns.
pub struct StepPeakRow {
    pub name: String,
    pub plan: serde_json::Value,
    pub cells: std::collections::HashMap<String, String>,
}

impl StepPeakRow {
    pub fn num(&self, column: &str) -> f64 {
        self.cells[column].parse().unwrap()
    }

    /// The plan's allocated peak less its cuBLAS workspace, a CUDA buffer a CPU process lacks.
    pub fn planned_peak_on_cpu(&self) -> f64 {
        self.plan["memory"]["total"].as_f64().unwrap() - 33_554_432.0
    }

    /// The plan's relative error on the measured step peak, asserted `ok` (the message names
    /// the row, both peaks and the error).
    pub fn checked_step_error(&self, ok: impl Fn(f64) -> bool) -> f64 {
        self.checked_error_on(self.num("meas_peak_step"), ok)
    }

    /// Heap the CPU process keeps beside its tensors between steps (`meas_states` −
    /// `meas_tensor_states`: oneDNN's primitive cache, inductor's compiled code), asserted
    /// within `0..max` bytes: runtime memory a GPU would not hold in its allocator.
    pub fn host_heap(&self, max: f64) -> f64 {
        let heap = self.num("meas_states") - self.num("meas_tensor_states");
        assert!(
            (0.0..max).contains(&heap),
            "{}: {heap} B of heap beyond the tensors",
            self.name
        );
        heap
    }

    /// [`StepPeakRow::checked_step_error`] on the measured peak less [`StepPeakRow::host_heap`].
    pub fn checked_error_less_host_heap(&self, max_heap: f64, ok: impl Fn(f64) -> bool) -> f64 {
        self.checked_error_on(self.num("meas_peak_step") - self.host_heap(max_heap), ok)
    }

    fn checked_error_on(&self, measured: f64, ok: impl Fn(f64) -> bool) -> f64 {
        let planned = self.planned_peak_on_cpu();
        let err = (planned - measured) / measured;
        assert!(
            ok(err),
            "{}: planned {planned} B, measured {measured} B ({:+.1} %)",
            self.name,
            err * 100.0
        );
        err
    }

    /// `estimate --json` of the row's planner command without `flag` (and its value, when the
    /// flag takes one): the same step planned without the lever the row measured.
    pub fn replanned_without(&self, flag: &str) -> serde_json::Value {
        let args: Vec<&str> = self.cells["planner_cmd"].split_whitespace().collect();
        let at = args.iter().position(|a| *a == flag).unwrap();
        let value = args.get(at + 1).is_some_and(|a| !a.starts_with("--"));
        let rest = [&args[..at], &args[at + 1 + usize::from(value)..]].concat();
        let (code, out, err) = vramcal(&rest);
        assert_eq!(code, 0, "{}: {err}", self.name);
        serde_json::from_str(&out).unwrap()
    }

    /// The plan's parameters and trainable parameters are the PyTorch model's.
    pub fn assert_counts_are_torchs(&self) {
        let (params, trainable) = (
            &self.plan["params"],
            &self.plan["train"]["trainable_params"],
        );
        assert_eq!(
            params.as_f64(),
            Some(self.num("params_torch")),
            "{}",
            self.name
        );
        assert_eq!(
            trainable.as_f64(),
            Some(self.num("trainable_torch")),
            "{}",
            self.name
        );
    }
}

/// The rows of the committed CSV `calibration/data/<file>`, as (column name -> value) maps.
pub fn data_rows(file: &str) -> Vec<std::collections::HashMap<String, String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("calibration/data")
        .join(file);
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let headers = rdr.headers().unwrap().clone();
    rdr.records()
        .map(|r| {
            headers
                .iter()
                .map(String::from)
                .zip(r.unwrap().iter().map(String::from))
                .collect()
        })
        .collect()
}

/// The rows of `calibration/data/<file>` whose name `keep` accepts, each re-planned.
pub fn step_peak_rows(file: &str, keep: impl Fn(&str) -> bool) -> Vec<StepPeakRow> {
    data_rows(file)
        .into_iter()
        .filter(|cells| keep(&cells["name"]))
        .map(|cells| {
            // a row drawn with its model's config.json (`DRAW=n run.py`) names it `{config}`
            let config = cells.get("hf_config").filter(|c| !c.is_empty()).map(|c| {
                let mut f = tempfile::NamedTempFile::new().unwrap();
                std::io::Write::write_all(&mut f, c.as_bytes()).unwrap();
                f
            });
            let args: Vec<&str> = cells["planner_cmd"]
                .split_whitespace()
                .map(|a| match (&config, a) {
                    (Some(f), "{config}") => f.path().to_str().unwrap(),
                    _ => a,
                })
                .collect();
            let (code, out, err) = vramcal(&args);
            assert_eq!(code, 0, "{}: {err}", cells["name"]);
            StepPeakRow {
                name: cells["name"].clone(),
                plan: serde_json::from_str(&out).unwrap(),
                cells,
            }
        })
        .collect()
}

/// A number column of a saved-bytes row (scripts/torch_saved_bytes.py).
pub fn row_num(r: &std::collections::HashMap<String, String>, k: &str) -> f64 {
    r[k].parse().unwrap_or_else(|_| panic!("{k} = {:?}", r[k]))
}

/// A saved-bytes row's training step: its batch, sequence, precision (the script's `fp32`,
/// `bf16-autocast` or pure `bf16`) and attention as it ran.
pub fn saved_row_train(r: &std::collections::HashMap<String, String>) -> vramcal::spec::TrainSpec {
    use vramcal::spec::Precision;
    vramcal::spec::TrainSpec {
        batch: row_num(r, "b") as u64,
        seq: row_num(r, "s") as u64,
        precision: match r["precision"].as_str() {
            "fp32" => Precision::Fp32,
            "bf16-autocast" => Precision::Bf16Mixed,
            "bf16" => Precision::Bf16,
            other => panic!("unexpected precision {other}"),
        },
        attention: r["attention"].parse().unwrap(),
        ..vramcal::spec::TrainSpec::default()
    }
}

/// The literature's activation coefficients at `precision` as a CPU plans them: its
/// CPU-measured blocks as the blocks. Pure bf16 has no CPU set: its Llama block keeps on a CPU
/// what it keeps on CUDA (no dropout; the softmax is fp32 by transformers' own cast).
pub fn cpu_activation(
    lit: &vramcal::coeffs::Coefficients,
    precision: vramcal::spec::Precision,
) -> vramcal::coeffs::ActivationCoeffs {
    let mut a = lit
        .mode(vramcal::spec::Family::Transformer, precision)
        .activation;
    if !a.cpu_blocks.is_empty() {
        a.blocks = std::mem::take(&mut a.cpu_blocks);
    }
    a
}
