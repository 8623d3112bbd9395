//! One real training step (forward + backward + optimizer update) per configuration, with the
//! step's FLOPs as criterion throughput so reports read as achieved FLOP/s. A large matmul in
//! the same run measures the machine's ceiling, so `vramcal bench-table` can state the fraction
//! of peak from one run instead of a datasheet.
//!
//! Benchmark ids are `<model>/<b..s..|b..i..>/<precision>/ckpt-<mode>` so the table can pair the
//! checkpointed and plain runs of one configuration.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use vramcal::harness::step::Trainer;
use vramcal::plan::time::step_flops;
use vramcal::spec::presets::preset;
use vramcal::spec::transformer::TransformerSpec;
use vramcal::spec::{Checkpointing, ModelSpec, Precision, TrainSpec};

/// CUDA when built with the feature and a GPU is present, else CPU.
fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

fn sync(dev: &Device) {
    dev.synchronize().expect("device synchronise");
}

/// The ceiling: a square matmul large enough to reach the machine's sustained GEMM rate.
fn peak_matmul(c: &mut Criterion) {
    let dev = device();
    let n: usize = if dev.is_cuda() { 8192 } else { 1024 };
    let mut group = c.benchmark_group("peak");
    group.sample_size(10);
    let dtypes: &[DType] = if dev.is_cuda() {
        &[DType::F32, DType::BF16]
    } else {
        &[DType::F32]
    };
    for &dtype in dtypes {
        let a = Tensor::randn(0f32, 1.0, (n, n), &dev)
            .and_then(|t| t.to_dtype(dtype))
            .expect("matmul operand");
        let b = a.clone();
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.bench_function(
            BenchmarkId::new("matmul", format!("{n}/{dtype:?}")),
            |bench| {
                bench.iter(|| {
                    let y = a.matmul(&b).expect("matmul");
                    sync(&dev);
                    y
                })
            },
        );
    }
    group.finish();
}

fn gpt(hidden: u64, layers: u64) -> ModelSpec {
    match preset("tiny-gpt").expect("preset") {
        ModelSpec::Transformer(t) => ModelSpec::Transformer(TransformerSpec {
            name: format!("gpt-h{hidden}-l{layers}"),
            hidden,
            heads: hidden / 32,
            kv_heads: hidden / 32,
            ffn: 4 * hidden,
            layers,
            ..t
        }),
        other => other,
    }
}

fn bench_config(c: &mut Criterion, model: &ModelSpec, train: &TrainSpec) {
    let dev = device();
    let mut trainer = match Trainer::new(model, train, &dev, 0) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipping {} {}: {e:#}", model.name(), train.precision);
            return;
        }
    };
    let flops = step_flops(model, train).expect("flops");
    let shape = match model {
        ModelSpec::Transformer(_) => format!("b{}s{}", train.batch, train.seq),
        ModelSpec::Cnn(_) => format!("b{}i{}", train.batch, train.image),
    };
    let mut group = c.benchmark_group("step");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    // Achieved FLOP/s counts the model's useful FLOPs (recompute excluded), as MFU does.
    group.throughput(Throughput::Elements(flops.total() as u64));
    let id = format!(
        "{}/{}/{}/ckpt-{}",
        model.name(),
        shape,
        train.precision,
        train.checkpointing
    );
    group.bench_function(id, |bench| {
        bench.iter(|| {
            let loss = trainer.step().expect("training step");
            sync(&dev);
            loss
        })
    });
    group.finish();
}

fn train_steps(c: &mut Criterion) {
    let cuda = device().is_cuda();
    // candle 0.11's CPU matmul has no bf16 kernel (the harness refuses bf16 there), so the
    // 16-bit CPU configuration is fp16-mixed; CUDA runs bf16-mixed as training normally does.
    let half = if cuda {
        Precision::Bf16Mixed
    } else {
        Precision::Fp16Mixed
    };
    let transformers: Vec<(ModelSpec, u64, u64)> = if cuda {
        vec![(gpt(1024, 8), 8, 1024), (gpt(2048, 8), 4, 2048)]
    } else {
        vec![(gpt(128, 4), 8, 128), (gpt(256, 4), 8, 256)]
    };
    for (model, batch, seq) in &transformers {
        for precision in [Precision::Fp32, half] {
            for checkpointing in [Checkpointing::None, Checkpointing::Full] {
                let train = TrainSpec {
                    batch: *batch,
                    seq: *seq,
                    precision,
                    checkpointing,
                    ..TrainSpec::default()
                };
                bench_config(c, model, &train);
            }
        }
    }
    let (cnn, batch, image) = if cuda {
        ("resnet50", 64, 224)
    } else {
        ("tiny-resnet18", 8, 64)
    };
    let model = preset(cnn).expect("preset");
    for precision in [Precision::Fp32, half] {
        let train = TrainSpec {
            batch,
            image,
            precision,
            ..TrainSpec::default()
        };
        bench_config(c, &model, &train);
    }
}

criterion_group!(benches, peak_matmul, train_steps);
criterion_main!(benches);
