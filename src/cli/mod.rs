//! Command-line interface (clap derive). Each subcommand lives in its own module with an `Args`
//! struct and a `run` function; `main.rs` only parses and maps errors to exit codes.

pub mod bench_table;
pub mod calibrate;
pub mod checkpoint;
pub mod common;
pub mod estimate;
pub mod fit;
pub mod gpus;
pub mod layout_flags;
pub mod measure;
pub mod merge;
pub mod report;
pub mod sweep;
pub mod watch;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vramcal",
    version,
    about = "Plan GPU memory, host RAM, storage and step time for training; calibrate the plan with real candle training steps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Per-GPU memory breakdown, host RAM, storage, step time and GPU choice for a training job.
    Estimate(estimate::Args),
    /// The GPU catalog the planner chooses from.
    Gpus(gpus::Args),
    /// Run real training steps for one configuration and report peak memory and step time.
    Measure(measure::Args),
    /// Run a grid of configurations, each in a fresh child process, appending rows to a CSV.
    Sweep(sweep::Args),
    /// Join the CSVs of a sharded sweep (or several sweeps of one device) into one.
    Merge(merge::Args),
    /// Compare a running training job's GPU memory (NVML) with its plan; CUDA builds only.
    Watch(watch::Args),
    /// Fit a coefficient table from a measurements CSV.
    Fit(fit::Args),
    /// Write the accuracy report (markdown + SVG plots) for a measurements CSV and a table.
    Report(report::Args),
    /// Sweep + fit + report in one command.
    Calibrate(calibrate::Args),
    /// Turn criterion's output into a markdown table of achieved FLOP/s.
    BenchTable(bench_table::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Estimate(a) => estimate::run(a),
        Command::Gpus(a) => gpus::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Watch(a) => watch::run(a),
        Command::Fit(a) => fit::run(a),
        Command::Report(a) => report::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::BenchTable(a) => bench_table::run(a),
    }
}
