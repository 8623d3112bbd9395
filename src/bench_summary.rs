//! Turns criterion's saved estimates (`target/criterion/**/new/{benchmark,estimates}.json`) from
//! `benches/step.rs` into a markdown table: achieved FLOP/s per configuration, the fraction of
//! the peak measured by the matmul bench in the same run, and checkpointing's time overhead.

use anyhow::Context;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
struct BenchmarkJson {
    group_id: String,
    function_id: Option<String>,
    value_str: Option<String>,
    /// `{"Elements": n}` (what benches/step.rs sets), `{"Bytes": n}`, or null
    throughput: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Estimate {
    point_estimate: f64,
}

#[derive(Debug, Deserialize)]
struct EstimatesJson {
    median: Estimate,
}

/// One benchmark's result: id, median seconds per iteration and FLOPs per iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    pub group: String,
    pub id: String,
    pub median_s: f64,
    pub flops: Option<u64>,
}

impl BenchResult {
    pub fn flops_per_s(&self) -> Option<f64> {
        self.flops.map(|f| f as f64 / self.median_s)
    }
}

fn find_new_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "new") && path.join("benchmark.json").exists()
            {
                out.push(path);
            } else {
                find_new_dirs(&path, out)?;
            }
        }
    }
    Ok(())
}

/// Reads every benchmark criterion saved under `dir` (its latest run, the `new` estimates).
pub fn load(dir: &Path) -> anyhow::Result<Vec<BenchResult>> {
    let mut dirs = Vec::new();
    find_new_dirs(dir, &mut dirs)?;
    let mut results = Vec::new();
    for d in dirs {
        let b: BenchmarkJson =
            serde_json::from_str(&std::fs::read_to_string(d.join("benchmark.json"))?)
                .with_context(|| format!("parsing {}", d.join("benchmark.json").display()))?;
        let e: EstimatesJson =
            serde_json::from_str(&std::fs::read_to_string(d.join("estimates.json"))?)
                .with_context(|| format!("parsing {}", d.join("estimates.json").display()))?;
        let id = [b.function_id, b.value_str]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("/");
        let flops = b
            .throughput
            .as_ref()
            .and_then(|t| t.get("Elements"))
            .and_then(|n| n.as_u64());
        results.push(BenchResult {
            group: b.group_id,
            id,
            median_s: e.median.point_estimate * 1e-9,
            flops,
        });
    }
    results.sort_by(|a, b| (&a.group, &a.id).cmp(&(&b.group, &b.id)));
    Ok(results)
}

fn gflops(x: f64) -> String {
    format!("{:.2}", x / 1e9)
}

/// Markdown summary. `machine` describes where it ran (CPU model / GPU, cores), `date` the run date.
pub fn markdown(results: &[BenchResult], machine: &str, date: &str) -> String {
    let mut md = String::new();
    md.push_str(&format!("# Training-step benchmarks\n\nRun {date} on {machine} with `cargo bench --bench step`, summarised by `vramcal bench-table`.\n\n"));
    md.push_str("Achieved FLOP/s counts the model's useful FLOPs per step (6·P·tokens + attention; recompute excluded, as model FLOP utilisation does). The peak is a large matmul measured in the same run.\n\n");
    let peaks: Vec<&BenchResult> = results.iter().filter(|r| r.group == "peak").collect();
    let peak = peaks
        .iter()
        .filter_map(|r| r.flops_per_s())
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let fp32_peak = peaks
        .iter()
        .find(|r| r.id.contains("F32"))
        .and_then(|r| r.flops_per_s());
    md.push_str("## Ceiling (matmul)\n\n| benchmark | median ms | GFLOP/s |\n|---|---:|---:|\n");
    for r in &peaks {
        md.push_str(&format!(
            "| {} | {:.3} | {} |\n",
            r.id,
            r.median_s * 1e3,
            r.flops_per_s().map(gflops).unwrap_or_default()
        ));
    }
    md.push_str("\n## Training steps\n\n| configuration | median ms | GFLOP/step | achieved GFLOP/s | fraction of matmul peak |\n|---|---:|---:|---:|---:|\n");
    let steps: Vec<&BenchResult> = results.iter().filter(|r| r.group == "step").collect();
    for r in &steps {
        // Compare fp32 steps to the fp32 ceiling; half-precision steps to the best ceiling measured.
        let ceiling = if r.id.contains("/fp32/") {
            fp32_peak.or(peak)
        } else {
            peak
        };
        let frac = match (r.flops_per_s(), ceiling) {
            (Some(a), Some(p)) => format!("{:.1} %", 100.0 * a / p),
            _ => "n/a".into(),
        };
        md.push_str(&format!(
            "| {} | {:.2} | {:.3} | {} | {} |\n",
            r.id,
            r.median_s * 1e3,
            r.flops.map(|f| f as f64 / 1e9).unwrap_or(0.0),
            r.flops_per_s().map(gflops).unwrap_or_default(),
            frac
        ));
    }
    let mut pairs: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for r in &steps {
        if let Some(base) = r.id.strip_suffix("/ckpt-none") {
            pairs.entry(base.to_string()).or_default().0 = Some(r.median_s);
        } else if let Some(base) = r.id.strip_suffix("/ckpt-full") {
            pairs.entry(base.to_string()).or_default().1 = Some(r.median_s);
        }
    }
    md.push_str("\n## Checkpointing time overhead\n\nMeasured (full recompute over plain step time) against the rule of thumb's \"+20 %\" and the literature's one extra forward pass (~33 %, Korthikanti et al. 2022).\n\n| configuration | plain ms | checkpointed ms | overhead |\n|---|---:|---:|---:|\n");
    for (base, (plain, ckpt)) in &pairs {
        if let (Some(p), Some(c)) = (plain, ckpt) {
            md.push_str(&format!(
                "| {base} | {:.2} | {:.2} | {:+.1} % |\n",
                p * 1e3,
                c * 1e3,
                100.0 * (c / p - 1.0)
            ));
        }
    }
    md
}

/// Short description of this machine for the table header.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}
