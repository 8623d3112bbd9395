//! `vramcal fit --data X.csv --out calibration/X.json`: fit a coefficient table from a
//! measurements CSV and write it atomically.
//!
//! The rows are checked first: every cell parses (`record::read`), a point measured more than
//! once counts by its last row (`record::latest`: a `--retry-failed` re-run supersedes the
//! failure), and all rows come from one device unless `--allow-mixed-devices` (a table fitted on
//! two devices' peaks describes neither).

use crate::error::input_err;
use crate::fit::{fit_rows, Fitted};
use crate::harness::record;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measurements CSV (written by `vramcal sweep` / `calibrate`)
    #[arg(long)]
    pub data: PathBuf,
    /// Coefficient table to write (JSON, the schema of calibration/literature.json)
    #[arg(long)]
    pub out: PathBuf,
    /// Fit rows of several device_ids into one table (refused by default)
    #[arg(long)]
    pub allow_mixed_devices: bool,
}

/// Reads the CSV and fits; a missing or empty file, rows of several devices (unless
/// `allow_mixed_devices`) or too few ok points are input errors.
pub fn fit_file(data: &Path, allow_mixed_devices: bool) -> anyhow::Result<Fitted> {
    if !data.is_file() {
        return input_err(
            "data",
            format!(
                "{} does not exist; accepted a measurements CSV",
                data.display()
            ),
        );
    }
    let rows = record::latest(record::read(data)?);
    if rows.is_empty() {
        return input_err(
            "data",
            format!(
                "{} has no rows; accepted a measurements CSV with rows",
                data.display()
            ),
        );
    }
    let devices: BTreeSet<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
    if devices.len() > 1 && !allow_mixed_devices {
        return input_err(
            "data",
            format!(
                "{} has rows of {} devices ({}); accepted rows of one device_id, or --allow-mixed-devices",
                data.display(),
                devices.len(),
                devices.into_iter().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    // candle and PyTorch rows of one point differ by design: one table describes one of them
    let backends: BTreeSet<&str> = rows.iter().map(|r| r.backend.as_str()).collect();
    if backends.len() > 1 {
        return input_err(
            "data",
            format!(
                "{} has rows of both backends ({}); accepted rows of one backend (sweep each into its own CSV)",
                data.display(),
                backends.into_iter().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    fit_rows(&rows)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let fitted = fit_file(&args.data, args.allow_mixed_devices)?;
    fitted.table.save(&args.out)?;
    println!(
        "fitted {} modes on {} ok points ({} excluded) -> {}",
        fitted.table.modes.len(),
        fitted.points.len(),
        fitted.excluded.len(),
        args.out.display()
    );
    Ok(())
}
