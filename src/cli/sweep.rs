//! `vramcal sweep`: run a grid, each point in a fresh child process, appending rows to a CSV.

use crate::harness::record::Backend;
use crate::harness::shard::Shard;
use crate::harness::sweep::{parse_bytes, run_sweep, SweepOptions};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Grid TOML (format: src/harness/grid.rs; examples in calibration/grids/)
    #[arg(long)]
    pub grid: PathBuf,
    /// CSV to append rows to
    #[arg(long)]
    pub out: PathBuf,
    /// cpu or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What measures each point: candle (embedded) or torch (PyTorch + transformers; see
    /// `vramcal measure --help`)
    #[arg(long, value_enum, default_value_t = Backend::Candle)]
    pub backend: Backend,
    /// Continue --out: skip points already in it (also failed ones, unless --retry-failed)
    #[arg(long)]
    pub resume: bool,
    /// With --resume: run again the points whose last row is not ok (oom, error, killed,
    /// timeout, skipped); the new row supersedes the old one in fit and report
    #[arg(long, requires = "resume")]
    pub retry_failed: bool,
    /// Skip points the planner predicts above this (bytes, or e.g. 40GB, 16GiB);
    /// default: CPU half of RAM, CUDA the device's free memory
    #[arg(long, allow_hyphen_values = true)]
    pub max_mem: Option<String>,
    /// Also run points the planner puts above the memory free right now (CPU: MemAvailable)
    #[arg(long)]
    pub no_memory_guard: bool,
    /// Coefficient table for that prediction (default: the literature table)
    #[arg(long)]
    pub coeffs: Option<PathBuf>,
    /// Per-point time limit in seconds; a point over it is recorded as `timeout`
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    /// Measure only shard I of N (0 <= I < N): each point's shard is a stable hash of the
    /// point, so N machines given 0/N .. N-1/N split the grid; `vramcal merge` joins them
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Serve Prometheus metrics of the sweep on HOST:PORT (e.g. 127.0.0.1:9400; port 0 picks
    /// one, announced on stderr)
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut opts = SweepOptions::new(&args.grid, &args.out);
    opts.device = args.device;
    opts.backend = args.backend;
    opts.resume = args.resume;
    opts.retry_failed = args.retry_failed;
    opts.memory_guard = !args.no_memory_guard;
    opts.max_mem = args.max_mem.as_deref().map(parse_bytes).transpose()?;
    opts.coeffs = args.coeffs;
    opts.timeout_s = args.timeout_s;
    opts.shard = args.shard;
    let served = crate::metrics::serve_opt(args.metrics_addr.as_deref())?;
    opts.metrics = served.as_ref().map(|(m, _)| m.clone());
    let s = run_sweep(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "{} points{} on {}: {} ok, {} oom, {} error, {} killed, {} timeout, {} skipped, {} already in {}, {} retried ({:.1} s)",
            s.points,
            opts.shard
                .map_or(String::new(), |sh| format!(" (shard {sh})")),
            s.device_id,
            s.ok,
            s.oom,
            s.error,
            s.killed,
            s.timeout,
            s.skipped,
            s.already_done,
            opts.out.display(),
            s.retried,
            s.elapsed_s
        );
    }
    Ok(())
}
