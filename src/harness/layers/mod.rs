//! Real training layers (candle), shaped by the planner's spec types.

pub mod cnn;
pub mod conv;
pub mod flash;
pub mod frozen_ffn;
pub mod fused;
mod handed;
pub mod joins;
pub mod lora;
pub mod moe;
pub mod nf4;
pub mod ops;
pub mod params;
pub mod pool;
pub mod transformer;
pub mod unfold;

pub use cnn::Cnn;
pub use params::{Ctx, Param, ParamStore};
pub use transformer::Transformer;
