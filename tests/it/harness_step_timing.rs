//! Step-time report (ignored by default; `cargo test --test harness_step_timing -- --ignored
//! --nocapture`): the CPU sweep budget depends on it.

use candle_core::Device;
use std::time::Instant;
use vramcal::harness::step::Trainer;
use vramcal::spec::presets::preset;
use vramcal::spec::{Checkpointing, TrainSpec};

#[test]
#[ignore]
fn tiny_gpt_step_time() {
    for ckpt in [Checkpointing::None, Checkpointing::Full] {
        let train = TrainSpec {
            batch: 4,
            seq: 128,
            checkpointing: ckpt,
            ..TrainSpec::default()
        };
        let mut t = Trainer::new(&preset("tiny-gpt").unwrap(), &train, &Device::Cpu, 0).unwrap();
        t.step().unwrap();
        let mut ms: Vec<f64> = (0..5)
            .map(|_| {
                let s = Instant::now();
                t.step().unwrap();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        eprintln!("tiny-gpt b=4 s=128 fp32 {ckpt}: median {:.1} ms", ms[2]);
    }
}

#[test]
#[ignore]
fn matmul_rate() {
    use candle_core::Tensor;
    let a = Tensor::ones((512, 512), candle_core::DType::F32, &Device::Cpu).unwrap();
    let _ = a.matmul(&a).unwrap();
    let s = Instant::now();
    for _ in 0..10 {
        let _ = a.matmul(&a).unwrap();
    }
    let secs = s.elapsed().as_secs_f64();
    eprintln!(
        "512^3 matmul: {:.1} GFLOP/s",
        10.0 * 2.0 * 512f64.powi(3) / secs / 1e9
    );
}
