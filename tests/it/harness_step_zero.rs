//! ZeRO simulation: rank 0 of N holds only its shard of optimizer states (1), gradients (2),
//! weights (3), so per-rank memory falls stage by stage.

use candle_core::Device;
use vramcal::harness::compare::max_abs;
use vramcal::harness::probe::cpu;
use vramcal::harness::step::Trainer;
use vramcal::spec::presets::preset;
use vramcal::spec::{Checkpointing, TrainSpec};

fn train(stage: u8, gpus: u64, ckpt: Checkpointing) -> TrainSpec {
    TrainSpec {
        batch: 2,
        seq: 32,
        zero_stage: stage,
        gpus,
        checkpointing: ckpt,
        ..TrainSpec::default()
    }
}

/// (baseline after build, peak of the second step); the model is built after a reset so the
/// baseline is the model's own bytes.
fn measure(t: &TrainSpec) -> (u64, u64) {
    let before = cpu::current_bytes();
    let mut tr = Trainer::new(&preset("tiny-gpt").unwrap(), t, &Device::Cpu, 2).unwrap();
    let base = cpu::current_bytes() - before;
    tr.step().unwrap();
    cpu::reset_peak();
    tr.step().unwrap();
    (base, cpu::peak_bytes() - before)
}

#[test]
fn stages_shrink_memory() {
    if !crate::common::alone() {
        return;
    }
    let p = 4 * Trainer::new(
        &preset("tiny-gpt").unwrap(),
        &train(0, 1, Checkpointing::None),
        &Device::Cpu,
        2,
    )
    .unwrap()
    .params(); // fp32 bytes of the weights
    let (b0, p0) = measure(&train(0, 4, Checkpointing::None));
    let (b1, p1) = measure(&train(1, 4, Checkpointing::None));
    let (b2, p2) = measure(&train(2, 4, Checkpointing::None));
    let (b3, p3) = measure(&train(3, 4, Checkpointing::None));
    eprintln!("P*4={p} stage0 {b0}/{p0} stage1 {b1}/{p1} stage2 {b2}/{p2} stage3 {b3}/{p3}");
    // stage 0 baseline: weights + Adam m, v (3 x 4P); stage 1: weights + (m, v)/4
    assert!(b1 < b0);
    let saved = (b0 - b1) as f64;
    let expected = 2.0 * p as f64 * 0.75;
    assert!(
        (saved - expected).abs() < 0.05 * expected,
        "stage-1 saving {saved} vs {expected}"
    );
    assert!(p2 < p1, "stage 2 peak {p2} >= stage 1 {p1}");
    // stage 3 keeps only shard weights resident between steps
    assert!(b3 < b2, "stage 3 baseline {b3} >= stage 2 {b2}");
    let _ = p3;
    // Without checkpointing each block's gathered weights stay referenced by its autograd graph
    // until its backward (candle cannot re-gather inside backward), so the stage-3 peak saving
    // shows only with checkpointing, where a block's weights live only while it runs.
    let (_, c2) = measure(&train(2, 4, Checkpointing::Full));
    let (_, c3) = measure(&train(3, 4, Checkpointing::Full));
    eprintln!("checkpointed: stage2 peak {c2} stage3 peak {c3}");
    assert!(c3 < c2, "checkpointed stage 3 peak {c3} >= stage 2 {c2}");
}

#[test]
fn sharded_runs_still_train() {
    for stage in 1..=3 {
        for ckpt in [Checkpointing::None, Checkpointing::Full] {
            let mut tr = Trainer::new(
                &preset("tiny-gpt").unwrap(),
                &train(stage, 4, ckpt),
                &Device::Cpu,
                2,
            )
            .unwrap();
            assert_eq!(
                tr.params(),
                vramcal::plan::params::count(&preset("tiny-gpt").unwrap())
            );
            let a = tr.step().unwrap();
            let b = tr.step().unwrap();
            assert!(
                a.is_finite() && b.is_finite() && a != b,
                "stage {stage} {ckpt}"
            );
        }
    }
}

#[test]
fn stage2_gradients_are_the_shard_of_the_full_ones() {
    let spec = preset("tiny-gpt").unwrap();
    let full = Trainer::new(&spec, &train(0, 4, Checkpointing::None), &Device::Cpu, 9)
        .unwrap()
        .gradients()
        .unwrap();
    let shard = Trainer::new(&spec, &train(2, 4, Checkpointing::None), &Device::Cpu, 9)
        .unwrap()
        .gradients()
        .unwrap();
    assert!(!full.is_empty());
    assert_eq!(
        full.len(),
        shard.len(),
        "every parameter has a shard gradient"
    );
    for ((n, g), (ns, s)) in full.iter().zip(&shard) {
        assert_eq!(n, ns);
        let rows = s.dim(0).unwrap();
        assert_eq!(rows, g.dim(0).unwrap().div_ceil(4), "{n}");
        let d = max_abs(&(g.narrow(0, 0, rows).unwrap() - s).unwrap()).unwrap();
        let scale = max_abs(g).unwrap();
        assert!(d <= 1e-5 * scale.max(1e-12), "{n}");
    }
}
