//! Precision modes: half compute lowers the activation peak; every mode trains (finite loss that
//! moves); modes are really run in their dtype, not silently in fp32.

use candle_core::Device;
use vramcal::error::InputError;
use vramcal::harness::probe::cpu;
use vramcal::harness::step::Trainer;
use vramcal::spec::presets::preset;
use vramcal::spec::{Precision, TrainSpec};

fn train(p: Precision, batch: u64, seq: u64) -> TrainSpec {
    TrainSpec {
        batch,
        seq,
        image: 32,
        precision: p,
        ..TrainSpec::default()
    }
}

/// (baseline, peak) of the second step.
fn peak(model: &str, t: &TrainSpec) -> (u64, u64) {
    let mut tr = Trainer::new(&preset(model).unwrap(), t, &Device::Cpu, 3).unwrap();
    tr.step().unwrap();
    let base = cpu::current_bytes();
    cpu::reset_peak();
    tr.step().unwrap();
    (base, cpu::peak_bytes())
}

/// Whether this build's CPU backend can train in `p`: candle's CPU matmul has f16 but no bf16
/// kernel, so bf16 modes must be refused with an input error naming `precision`.
fn supported(p: Precision) -> bool {
    match Trainer::new(
        &preset("tiny-gpt").unwrap(),
        &train(p, 1, 8),
        &Device::Cpu,
        0,
    ) {
        Ok(_) => true,
        Err(e) => {
            let ie = e
                .downcast_ref::<InputError>()
                .expect("refusal is an input error");
            assert_eq!(ie.field(), "precision");
            assert!(ie.message().contains("accepted"), "{}", ie.message());
            assert_eq!(vramcal::error::exit_code(&e), 2);
            false
        }
    }
}

#[test]
fn half_precision_peak_below_fp32() {
    if !crate::common::alone() {
        return;
    }
    let (b32, p32) = peak("tiny-gpt", &train(Precision::Fp32, 4, 128));
    for p in [Precision::Bf16Mixed, Precision::Fp16Mixed] {
        if !supported(p) {
            eprintln!("{p}: refused on this CPU backend");
            continue;
        }
        let (b16, p16) = peak("tiny-gpt", &train(p, 4, 128));
        eprintln!("fp32 base {b32} peak {p32}; {p} base {b16} peak {p16}");
        // same fp32 states; activations in 16 bits
        assert!(p16 < p32, "{p} peak {p16} >= fp32 peak {p32}");
        assert!((p16 - b16) as f64 <= 0.8 * (p32 - b32) as f64);
    }
    // the CPU backend has f16 kernels: fp16-mixed must really run here
    assert!(supported(Precision::Fp16Mixed));
}

#[test]
fn cnn_half_precision_peak_below_fp32() {
    if !crate::common::alone() {
        return;
    }
    // at 96 px the activations dominate; at 32 px the 16-bit weight copies outweigh their
    // saving (PyTorch's CPU steps of the same model peak higher in fp16-mixed there too)
    let image = |p| TrainSpec {
        image: 96,
        ..train(p, 8, 1)
    };
    let (_, p32) = peak("tiny-resnet18", &image(Precision::Fp32));
    let (_, p16) = peak("tiny-resnet18", &image(Precision::Fp16Mixed));
    eprintln!("resnet fp32 peak {p32}; fp16-mixed peak {p16}");
    assert!(p16 < p32);
}

#[test]
fn every_supported_mode_trains() {
    for p in Precision::ALL {
        if !supported(p) {
            continue;
        }
        for model in ["tiny-gpt", "tiny-vit", "tiny-resnet18"] {
            let mut t = Trainer::new(&preset(model).unwrap(), &train(p, 1, 16), &Device::Cpu, 5)
                .unwrap_or_else(|e| panic!("{model} {p}: {e}"));
            let first = t.step().unwrap();
            let last = t.step().unwrap();
            assert!(
                first.is_finite() && last.is_finite(),
                "{model} {p}: {first} {last}"
            );
            assert!(last != first, "{model} {p}: the update changed nothing");
        }
    }
}

#[test]
fn mixed_keeps_fp32_vars() {
    let t = Trainer::new(
        &preset("tiny-gpt").unwrap(),
        &train(Precision::Fp16Mixed, 1, 8),
        &Device::Cpu,
        0,
    )
    .unwrap();
    assert!(t
        .store()
        .params
        .iter()
        .all(|p| p.var.dtype() == candle_core::DType::F32));
    if supported(Precision::Bf16) {
        let t = Trainer::new(
            &preset("tiny-gpt").unwrap(),
            &train(Precision::Bf16, 1, 8),
            &Device::Cpu,
            0,
        )
        .unwrap();
        assert!(t
            .store()
            .params
            .iter()
            .all(|p| p.var.dtype() == candle_core::DType::BF16));
    }
}

/// Mixed precision computes the fp32 step's gradients to half-precision rounding, through the
/// fp32 residual stream, the 16-bit linears (their inputs cast as autocast casts them) and the
/// fp32 softmax of decoders: every parameter's gradient within 5 % (max over the tensor,
/// relative to its largest element) of the fp32 step's, for pre-norm GELU and SwiGLU decoders,
/// a post-norm encoder and a ViT, with dropout masks identical in both runs.
#[test]
fn mixed_precision_gradients_match_fp32() {
    for model in ["tiny-gpt", "tiny-llama", "tiny-bert", "tiny-vit"] {
        let grads = |p| {
            let mut t =
                Trainer::new(&preset(model).unwrap(), &train(p, 2, 24), &Device::Cpu, 11).unwrap();
            t.gradients().unwrap()
        };
        let (full, mixed) = (grads(Precision::Fp32), grads(Precision::Fp16Mixed));
        assert_eq!(full.len(), mixed.len());
        for ((name, a), (_, b)) in full.iter().zip(&mixed) {
            assert_eq!(b.dtype(), candle_core::DType::F32, "{model} {name}");
            let e = vramcal::harness::compare::max_rel_err(b, a).unwrap();
            assert!(e < 0.05, "{model} {name}: mixed vs fp32 gradient {e}");
        }
    }
}
