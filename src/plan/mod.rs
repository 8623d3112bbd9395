//! The analytical planner: spec + coefficients -> memory, host RAM, storage, time, GPU choice.

pub mod advice;
pub mod checkpoint;
pub mod comm;
pub mod deberta_saved;
pub mod departures;
pub mod encdec;
pub mod encdec_saved;
pub mod estimate;
pub mod finetune;
pub mod gpus;
pub mod host;
pub mod measured;
pub mod memory;
pub mod mla_saved;
pub mod moe;
pub mod params;
pub mod search;
pub mod seed;
pub mod step_time;
pub mod storage;
pub mod time;
pub mod vision;
