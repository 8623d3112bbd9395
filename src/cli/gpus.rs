//! `vramcal gpus`: the catalog the planner chooses from, with each figure's datasheet.

use crate::plan::gpus::CATALOG;
use std::fmt::Write as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Machine-readable output (a JSON array of the catalog entries)
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.json {
        return super::estimate::write_stdout(&(serde_json::to_string_pretty(CATALOG)? + "\n"));
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<10} {:<22} {:>9} {:>10} {:>10} {:>10} {:>9}  interconnect",
        "id", "name", "mem GiB", "bf16 TF/s", "tf32 TF/s", "fp32 TF/s", "BW GB/s"
    );
    for g in CATALOG {
        let _ = writeln!(
            o,
            "{:<10} {:<22} {:>9.2} {:>10.1} {:>10.1} {:>10.1} {:>9.0}  {}",
            g.id,
            g.name,
            g.memory_bytes as f64 / (1u64 << 30) as f64,
            g.bf16_tflops,
            g.tf32_tflops,
            g.fp32_tflops,
            g.bandwidth_gbs,
            g.interconnect
        );
    }
    let _ = writeln!(
        o,
        "\nMemory: total reported by the driver (nvidia-smi). TFLOP/s: dense, no sparsity. Sources:"
    );
    for g in CATALOG {
        let _ = writeln!(o, "  {:<10} {}", g.id, g.source);
    }
    super::estimate::write_stdout(&o)
}
