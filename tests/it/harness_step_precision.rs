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

/// A CNN's fp16-mixed step follows PyTorch's convolution lowering on this CPU. Where PyTorch runs
/// fp16 convolutions through oneDNN (a CPU with AVX512-FP16 or AMX-FP16) the activations halve
/// and the step peaks below fp32's. Elsewhere PyTorch lowers them to `slow_conv2d`, which
/// unfolds the whole batch's input, and so does the harness: the fp16 step then rises by at
/// least the 7x7 stem's unfolded input (3·7·7 rows by 48·48 positions, 8 images, 2 bytes), and
/// peaks above fp32 (PyTorch 2.15 on this AMD EPYC: tiny ResNet-18 b8 at 64 px 5.80 MiB in
/// fp16-mixed, 4.79 MiB in fp32).
#[test]
fn cnn_half_precision_follows_pytorchs_convolution_lowering() {
    if !crate::common::alone() {
        return;
    }
    let image = |p| TrainSpec {
        image: 96,
        ..train(p, 8, 1)
    };
    let (b32, p32) = peak("tiny-resnet18", &image(Precision::Fp32));
    let (b16, p16) = peak("tiny-resnet18", &image(Precision::Fp16Mixed));
    eprintln!(
        "resnet fp32 rise {}; fp16-mixed rise {}",
        p32 - b32,
        p16 - b16
    );
    use vramcal::harness::layers::unfold::{lowering, ConvLowering};
    if lowering(&Device::Cpu, candle_core::DType::F16) == ConvLowering::Unfolded {
        let stem_columns = 3 * 7 * 7 * 48 * 48 * 8 * 2;
        assert!(p16 - b16 >= stem_columns, "{} < {stem_columns}", p16 - b16);
        assert!(p32 - b32 < stem_columns, "fp32 (oneDNN) unfolds nothing");
        assert!(p16 > p32);
    } else {
        assert!(p16 < p32);
    }
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
        let max_abs = |t: &candle_core::Tensor| vramcal::harness::compare::max_abs(t).unwrap();
        let largest = full.iter().map(|(_, a)| max_abs(a)).fold(0f32, f32::max);
        for ((name, a), (_, b)) in full.iter().zip(&mixed) {
            assert_eq!(b.dtype(), candle_core::DType::F32, "{model} {name}");
            if max_abs(a) < 1e-4 * largest {
                // a gradient that is zero in exact arithmetic (the key bias: softmax ignores a
                // constant added to every score of a row) is rounding noise in both runs: it
                // stays noise, far below the model's gradients
                let diff = max_abs(&(b - a).unwrap());
                assert!(diff < 1e-3 * largest, "{model} {name}: {diff} vs {largest}");
                continue;
            }
            let e = vramcal::harness::compare::max_rel_err(b, a).unwrap();
            assert!(e < 0.05, "{model} {name}: mixed vs fp32 gradient {e}");
        }
    }
}
