//! The rule of thumb `params·4·3 + batch·seq·hidden·10` bytes, the baseline the calibrated model
//! is compared against. Delegates to the planner's
//! `plan::seed::seed_bytes` (ViT: seq = effective sequence; CNN: its documented analogue,
//! image^2 x first-conv width), so the report and `vramcal estimate` show the same baseline.

use crate::plan::params;
use crate::spec::{ModelSpec, TrainSpec};

/// Rule-of-thumb peak bytes for one configuration, with the exact parameter count.
pub fn seed_bytes(model: &ModelSpec, train: &TrainSpec) -> f64 {
    crate::plan::seed::seed_bytes(model, params::count(model), train) as f64
}
