//! vramcal: a training capacity planner whose coefficients are measured by real training steps.
//! Data flow (docs/architecture.md): spec -> plan; spec -> harness (candle or torch) -> rows ->
//! fit -> coefficient table -> report.

pub mod atomic;
pub mod bench_summary;
pub mod cli;
pub mod coeffs;
pub mod error;
pub mod fit;
pub mod harness;
pub mod metrics;
pub mod plan;
pub mod report;
pub mod size;
pub mod spec;
