//! vramcal: a training capacity planner whose coefficients are measured by real training steps.
//! Data flow (DESIGN.md): spec -> plan; spec -> harness -> measurements -> fit -> coefficients -> report.

pub mod atomic;
pub mod cli;
pub mod coeffs;
pub mod error;
pub mod harness;
pub mod plan;
pub mod spec;
