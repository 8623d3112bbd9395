//! The harness model allocates exactly the parameters the planner counts, for every layer kind.

use candle_core::Device;
use vramcal::harness::step::Trainer;
use vramcal::plan::params::count;
use vramcal::spec::presets::preset;
use vramcal::spec::TrainSpec;

fn check(name: &str, image: u64) {
    let spec = preset(name).unwrap();
    let train = TrainSpec {
        batch: 1,
        seq: 8,
        image,
        ..TrainSpec::default()
    };
    let t = Trainer::new(&spec, &train, &Device::Cpu, 0).unwrap();
    assert_eq!(t.params(), count(&spec), "{name}");
    // and the resident Vars really hold that many elements (no ZeRO here)
    let resident: usize = t.store().params.iter().map(|p| p.var.elem_count()).sum();
    assert_eq!(resident as u64, count(&spec), "{name} resident");
}

#[test]
fn tiny_presets_match_planner() {
    check("tiny-gpt", 32);
    check("tiny-bert", 32);
    check("tiny-llama", 32); // GQA (separate q/k/v), SwiGLU, RMSNorm, untied head
    check("tiny-vit", 64);
    check("tiny-resnet18", 32);
    check("tiny-resnet50", 32);
    check("tiny-vgg", 32);
}

#[test]
fn published_presets_match_planner() {
    check("gpt2", 32);
    check("resnet18", 32);
    check("resnet50", 32);
}

#[test]
fn published_counts_reached() {
    // independent of the planner: the published figures
    let t = Trainer::new(
        &preset("resnet18").unwrap(),
        &TrainSpec {
            batch: 1,
            image: 32,
            ..TrainSpec::default()
        },
        &Device::Cpu,
        0,
    )
    .unwrap();
    assert_eq!(t.params(), 11_689_512);
}
