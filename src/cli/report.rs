//! `vramcal report --data X.csv --coeffs calibration/X.json --out reports/X/`: held-out accuracy
//! (k-fold by configuration and extrapolation; the folds are refitted from the data, the given
//! table is what the report documents and draws), README.md, accuracy.json and SVG plots.

use crate::coeffs::Coefficients;
use crate::fit::split;
use crate::report::accuracy::Accuracy;
use crate::report::{write, ReportInput};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measurements CSV
    #[arg(long)]
    pub data: PathBuf,
    /// Coefficient table fitted on that CSV (`vramcal fit`)
    #[arg(long)]
    pub coeffs: PathBuf,
    /// Report directory (README.md, accuracy.json, *.svg)
    #[arg(long)]
    pub out: PathBuf,
    /// Grid file the data was measured with, named in the report
    #[arg(long)]
    pub grid: Option<String>,
    /// Score rows of several device_ids together (refused by default)
    #[arg(long)]
    pub allow_mixed_devices: bool,
    /// PyTorch rows of the same device (`sweep --backend torch`): adds the section
    /// "Predicting PyTorch", the table scored on configurations it never saw
    #[arg(long)]
    pub pytorch: Option<PathBuf>,
}

/// Scores and writes the report; returns the accuracy summary and the files written.
pub fn report_files(
    data: &Path,
    table: &Coefficients,
    out: &Path,
    grid: Option<&str>,
    allow_mixed_devices: bool,
    pytorch: Option<&Path>,
) -> anyhow::Result<(Accuracy, Vec<PathBuf>)> {
    // Checked before the (slow) scoring, and as an input error rather than create_dir_all's
    // "File exists".
    if out.exists() && !out.is_dir() {
        return crate::error::input_err(
            "out",
            format!(
                "{} exists and is not a directory; accepted a report directory (new or existing)",
                out.display()
            ),
        );
    }
    let fitted = super::fit::fit_file(data, allow_mixed_devices)?;
    // Held-out scores need configurations to hold out; with fewer than the folds every metric
    // would be an empty 0 % that a CI threshold would wave through.
    let configs: std::collections::BTreeSet<String> =
        fitted.points.iter().map(|p| p.row.key()).collect();
    if configs.len() < 5 {
        return crate::error::input_err(
            "data",
            format!(
                "{} has {} ok configurations; accepted at least 5 for a 5-fold held-out score",
                data.display(),
                configs.len()
            ),
        );
    }
    let torch_rows = match pytorch {
        Some(p) => {
            let rows = crate::harness::record::latest(crate::harness::record::read(p)?);
            if let Some(r) = rows.iter().find(|r| r.device_id != fitted.meta.device_id) {
                eprintln!(
                    "warning: {} holds rows of {}, not {}; PyTorch on another device is not what this table describes",
                    p.display(),
                    r.device_id,
                    fitted.meta.device_id
                );
            }
            Some((rows, p.display().to_string()))
        }
        None => None,
    };
    let (kfold, extrap) = split::evaluate(&fitted.points, &fitted.meta)?;
    // A fitted table (not the literature defaults) from another device documents the wrong
    // device: said once the report stands, so a refused input still gets one line.
    if table.points > 0 && table.device_id != fitted.meta.device_id && !allow_mixed_devices {
        eprintln!(
            "warning: the table was fitted on {} ({}), the rows in {} are from {}; the report documents a table from another device",
            table.device_id,
            table.device_name,
            data.display(),
            fitted.meta.device_id
        );
    }
    write(
        out,
        &ReportInput {
            points: &fitted.points,
            excluded: &fitted.excluded,
            table,
            kfold: &kfold,
            extrapolation: &extrap,
            data_path: &data.display().to_string(),
            grid,
            torch: torch_rows
                .as_ref()
                .map(|(rows, path)| (rows.as_slice(), path.as_str())),
            finetune: &fitted.finetune_rows,
        },
    )
}

/// The one-line accuracy summary; a metric with nothing scored says so instead of "0.00 %".
pub fn summary(acc: &Accuracy) -> String {
    let torch = acc.pytorch.as_ref().map_or(String::new(), |p| {
        format!(
            "; on {} PyTorch rows: fitted {}, literature {}, rule of thumb {}",
            p.rows,
            pct(&p.scores.fitted),
            pct(&p.scores.literature),
            pct(&p.scores.seed_formula)
        )
    });
    format!(
        "{}, literature {}, rule of thumb {}; {}{torch}",
        acc.heldout.describe("held-out peak MAPE: fitted"),
        pct(&acc.literature),
        pct(&acc.seed_formula),
        acc.time_heldout.describe("step time MAPE")
    )
}

fn pct(m: &crate::fit::split::Metrics) -> String {
    if m.n == 0 {
        "n/a".into()
    } else {
        format!("{:.2} %", m.mape)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let table = Coefficients::load(&args.coeffs)?;
    let (acc, files) = report_files(
        &args.data,
        &table,
        &args.out,
        args.grid.as_deref(),
        args.allow_mixed_devices,
        args.pytorch.as_deref(),
    )?;
    println!("{}", summary(&acc));
    println!(
        "wrote {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
