//! The empirical half: real candle layers, real training steps, memory probes, sweeps.

pub mod backend;
pub mod compare;
pub mod device;
pub mod grid;
pub mod layers;
pub mod measure;
pub mod merge;
pub mod optim;
pub mod probe;
pub mod record;
pub mod row_fill;
pub mod shard;
pub mod step;
pub mod sweep;
pub mod torch;
pub mod update;
