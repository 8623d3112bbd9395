//! `vramcal merge A.csv B.csv ... --out all.csv [--grid grid.toml]`: join the CSVs of a sharded
//! (or split) sweep into one, checking schema, device, shards and grid coverage, and print one
//! summary line (rules in src/harness/merge.rs).

use crate::harness::merge::{merge, MergeOptions, MergeSummary};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measurement CSVs to merge (a `sweep --shard` CSV carries its shard in <csv>.shard.json)
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Merged CSV to write (atomically; replaced if it exists)
    #[arg(long)]
    pub out: PathBuf,
    /// Also check that every point of this grid has a row
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Merge rows of several device_ids (refused by default)
    #[arg(long)]
    pub allow_mixed_devices: bool,
    /// Merge even when shards or grid points are missing (they are counted in the summary)
    #[arg(long)]
    pub partial: bool,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
}

/// `merged 4 files (shards 0-3 of 4): 26 rows -> 24 points in all.csv (...)`.
pub fn summary_line(s: &MergeSummary, out: &std::path::Path) -> String {
    let shards = match s.shards_of {
        Some(n) => format!(" ({} of {n} shards)", s.shards.len()),
        None => String::new(),
    };
    let statuses: Vec<String> = s
        .by_status
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    let mut missing = String::new();
    if !s.missing_shards.is_empty() {
        missing.push_str(&format!("; {} shards missing", s.missing_shards.len()));
    }
    if s.missing_points > 0 {
        missing.push_str(&format!("; {} grid points missing", s.missing_points));
    }
    format!(
        "merged {} files{shards}: {} rows -> {} points in {} ({}); {} duplicates dropped ({} failed rows replaced by ok ones), {} conflicts between ok rows (first kept), {} older-schema rows migrated{missing}",
        s.files,
        s.rows_read,
        s.points,
        out.display(),
        if statuses.is_empty() { "no rows".to_string() } else { statuses.join(", ") },
        s.duplicates,
        s.ok_over_failed,
        s.conflicts.len(),
        s.migrated
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = MergeOptions {
        inputs: args.inputs,
        out: args.out,
        grid: args.grid,
        allow_mixed_devices: args.allow_mixed_devices,
        partial: args.partial,
    };
    let s = merge(&opts)?;
    for c in s.conflicts.iter().take(5) {
        eprintln!(
            "warning: conflict: {} is ok in {} (peak {:?} bytes, kept) and in {} (peak {:?} bytes, dropped)",
            c.point, c.kept, c.kept_peak_bytes, c.dropped, c.dropped_peak_bytes
        );
    }
    if s.conflicts.len() > 5 {
        eprintln!("warning: {} more conflicts", s.conflicts.len() - 5);
    }
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("{}", summary_line(&s, &opts.out));
    }
    Ok(())
}
