//! `vramcal fit --data X.csv --out calibration/X.json`: fit a coefficient table from a
//! measurements CSV and write it atomically.

use crate::error::input_err;
use crate::fit::{fit_rows, Fitted};
use crate::harness::record;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measurements CSV (written by `vramcal sweep` / `calibrate`)
    #[arg(long)]
    pub data: PathBuf,
    /// Coefficient table to write (JSON, the schema of calibration/literature.json)
    #[arg(long)]
    pub out: PathBuf,
}

/// Reads the CSV and fits; a missing or empty file is an input error.
pub fn fit_file(data: &Path) -> anyhow::Result<Fitted> {
    if !data.is_file() {
        return input_err(
            "data",
            format!(
                "{} does not exist; accepted a measurements CSV",
                data.display()
            ),
        );
    }
    let rows = record::read(data)?;
    if rows.is_empty() {
        return input_err(
            "data",
            format!(
                "{} has no rows; accepted a measurements CSV with rows",
                data.display()
            ),
        );
    }
    fit_rows(&rows)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let fitted = fit_file(&args.data)?;
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
