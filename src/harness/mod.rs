//! The empirical half: real candle layers, real training steps, memory probes, sweeps.

pub mod record;
