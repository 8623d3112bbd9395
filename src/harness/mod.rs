//! The empirical half: real candle layers, real training steps, memory probes, sweeps.

pub mod record;
pub mod layers;
pub mod optim;
pub mod step;
pub mod grid;
pub mod measure;
pub mod probe;
pub mod sweep;
