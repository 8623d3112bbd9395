//! `vramcal bench-table`: criterion output -> markdown table (see `bench_summary`).

use crate::bench_summary;
use crate::error::input_err;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Criterion's output directory.
    #[arg(long, default_value = "target/criterion")]
    pub criterion_dir: PathBuf,
    /// Markdown file to write (stdout when absent).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Machine description for the header (default: this machine's CPU model and cores).
    #[arg(long)]
    pub machine: Option<String>,
    /// Run date for the header (default: today, UTC).
    #[arg(long)]
    pub date: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.criterion_dir.is_dir() {
        return input_err(
            "criterion-dir",
            format!(
                "{} is not a directory; run `cargo bench --bench step` first",
                args.criterion_dir.display()
            ),
        );
    }
    let results = bench_summary::load(&args.criterion_dir)?;
    if results.is_empty() {
        return input_err(
            "criterion-dir",
            format!(
                "{} holds no criterion results",
                args.criterion_dir.display()
            ),
        );
    }
    let machine = args
        .machine
        .unwrap_or_else(bench_summary::machine_description);
    let date = args.date.unwrap_or_else(today_utc);
    let md = bench_summary::markdown(&results, &machine, &date);
    match args.out {
        Some(path) => {
            crate::atomic::write(&path, md.as_bytes())?;
            println!("wrote {}", path.display());
        }
        None => print!("{md}"),
    }
    Ok(())
}

/// Today's date (UTC) as YYYY-MM-DD.
pub fn today_utc() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}
