//! Planner throughput: a planner that answers in microseconds can search large configuration
//! spaces (every GPU type x count x ZeRO stage x checkpointing) interactively.
//! Targets: one estimate well under 10 us; a `--max-batch` search under 1 ms.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use vramcal::coeffs::Coefficients;
use vramcal::plan::estimate::{estimate, Options};
use vramcal::plan::memory;
use vramcal::plan::search::{max_batch, Evaluator};
use vramcal::spec::presets::preset;
use vramcal::spec::{Checkpointing, Precision, TrainSpec};

fn planner(c: &mut Criterion) {
    let coeffs = Coefficients::literature();
    let llama = preset("llama2-7b").expect("preset");
    let resnet = preset("resnet50").expect("preset");
    let llm_train = TrainSpec {
        batch: 4,
        seq: 4096,
        precision: Precision::Bf16Mixed,
        checkpointing: Checkpointing::Full,
        zero_stage: 2,
        gpus: 8,
        ..TrainSpec::default()
    };
    let cnn_train = TrainSpec {
        batch: 256,
        image: 224,
        precision: Precision::Bf16Mixed,
        ..TrainSpec::default()
    };

    let mut group = c.benchmark_group("plan");
    group.bench_function("memory-estimate/llama2-7b", |b| {
        b.iter(|| {
            memory::estimate(black_box(&llama), black_box(&llm_train), &coeffs).expect("estimate")
        })
    });
    group.bench_function("memory-estimate/resnet50", |b| {
        b.iter(|| {
            memory::estimate(black_box(&resnet), black_box(&cnn_train), &coeffs).expect("estimate")
        })
    });
    // The whole report minus the GPU catalogue search: memory, host RAM, storage, step time.
    let opts = Options {
        choose_gpus: false,
        ..Options::default()
    };
    group.bench_function("full-estimate/llama2-7b", |b| {
        b.iter(|| {
            estimate(black_box(&llama), black_box(&llm_train), &coeffs, &opts).expect("estimate")
        })
    });
    let capacity: u64 = 80 * (1 << 30);
    group.bench_function("max-batch/llama2-7b", |b| {
        b.iter(|| {
            let ev = Evaluator::new(&llama, &llm_train, &coeffs).expect("evaluator");
            max_batch(&ev, black_box(&llm_train), capacity).expect("search")
        })
    });
    group.bench_function("max-batch/resnet50", |b| {
        b.iter(|| {
            let ev = Evaluator::new(&resnet, &cnn_train, &coeffs).expect("evaluator");
            max_batch(&ev, black_box(&cnn_train), capacity).expect("search")
        })
    });
    // Fewest GPUs of every catalogue type (about 700 evaluations).
    let choose = Options::default();
    group.bench_function("gpu-choice/llama2-7b", |b| {
        b.iter(|| {
            estimate(black_box(&llama), black_box(&llm_train), &coeffs, &choose).expect("estimate")
        })
    });
    group.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
