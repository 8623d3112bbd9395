//! vramcal: a training capacity planner whose coefficients are measured by real training steps.
//! Data flow (DESIGN.md): spec -> plan; spec -> harness -> measurements -> fit -> coefficients -> report.

pub mod atomic;
pub mod bench_summary;
pub mod cli;
pub mod coeffs;
pub mod error;
pub mod fit;
pub mod harness;
pub mod plan;
pub mod report;
pub mod size;
pub mod spec;
