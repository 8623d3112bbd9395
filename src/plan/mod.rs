//! The analytical planner: spec + coefficients -> memory, host RAM, storage, time, GPU choice.

pub mod memory;
pub mod params;
pub mod time;
