//! Mixture of experts in the planner: expert-parallel model states, the routed tokens'
//! activations and the router's, the flags' input errors, and `--json`'s total and active
//! parameters. Expected values are written from the architecture by hand, not from the planner.

use crate::common::vramcal;
use std::path::Path;
use vramcal::plan::memory::{features, fit_terms, state_bytes};
use vramcal::spec::moe::CapacityFactor;
use vramcal::spec::transformer::TransformerSpec;
use vramcal::spec::{hf_config, ModelSpec, Precision, TrainSpec};

fn config(name: &str) -> TransformerSpec {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/hf_configs")
        .join(name)
        .join("config.json");
    hf_config::load(&p).unwrap()
}

fn with_layout(mut t: TransformerSpec, ep: u64, cf: f32) -> ModelSpec {
    let mut m = t.extras.moe.unwrap();
    m.expert_parallel = ep;
    m.capacity_factor = CapacityFactor(cf);
    t.extras.moe = Some(m);
    ModelSpec::Transformer(t)
}

/// Mixtral-8x7B: 32 blocks x 8 experts x (gate, up, down of 4096 x 14336)
const MIXTRAL_EXPERTS: u64 = 32 * 8 * 3 * 4096 * 14336;
const MIXTRAL_TOTAL: u64 = 46_702_792_704;

#[test]
fn expert_parallelism_divides_only_the_experts_states() {
    let train = TrainSpec {
        gpus: 8,
        ..TrainSpec::default()
    };
    let s = fit_terms(&with_layout(config("mixtral-8x7b"), 8, 1.0), &train)
        .unwrap()
        .states;
    // fp32 AdamW without ZeRO: 4 B weights, 4 B gradients, 8 B moments per parameter held
    let held = (MIXTRAL_TOTAL - MIXTRAL_EXPERTS) as f64 + MIXTRAL_EXPERTS as f64 / 8.0;
    assert_eq!(s.weights, 4.0 * held);
    assert_eq!(s.gradients, 4.0 * held);
    assert_eq!(s.optimizer, 8.0 * held);
    // without expert parallelism every rank holds every expert
    let all = fit_terms(&with_layout(config("mixtral-8x7b"), 1, 1.0), &train)
        .unwrap()
        .states;
    assert_eq!(all.weights, 4.0 * MIXTRAL_TOTAL as f64);
    // ZeRO-3 already shards everything over the 8 ranks: expert parallelism changes nothing
    let zero3 = TrainSpec {
        zero_stage: 3,
        precision: Precision::Bf16Mixed,
        ..train
    };
    let s = fit_terms(&with_layout(config("mixtral-8x7b"), 8, 1.0), &zero3)
        .unwrap()
        .states;
    let plain = state_bytes(MIXTRAL_TOTAL, &zero3);
    assert!(
        (s.fixed() - plain.fixed()).abs() < 1.0,
        "{s:?} vs {plain:?}"
    );
}

#[test]
fn routed_tokens_and_router_set_the_moe_activations() {
    let train = TrainSpec {
        batch: 2,
        seq: 128,
        ..TrainSpec::default()
    };
    let bs = 2.0 * 128.0;
    let f = features(&with_layout(config("mixtral-8x7b"), 1, 1.0), &train).unwrap();
    // no dense MLP nor shared expert: the routed experts are known bytes, not f-wide features
    assert_eq!(f.bsf_raw, 0.0);
    // per token and block (fp32, transformers' grouped_mm path): the router's fp32 softmax over
    // 8 experts, top-2 ids/sum/weights (12 x 2 + 4), and per routed pair 3 int64 indices, its
    // fp32 weight, the gathered input and output (2 x 4096) and gate/up, SiLU, product
    // (4 x 14336) in fp32
    let pair = 3.0 * 8.0 + 4.0 + (2.0 * 4096.0 + 4.0 * 14336.0) * 4.0;
    assert_eq!(f.moe_bytes, 32.0 * bs * (8.0 * 4.0 + 28.0 + 2.0 * pair));
    // a capacity factor of 1.25 pads every expert by a quarter
    let padded = features(&with_layout(config("mixtral-8x7b"), 1, 1.25), &train).unwrap();
    let router = 32.0 * bs * (8.0 * 4.0 + 28.0);
    assert!(((padded.moe_bytes - router) / (f.moe_bytes - router) - 1.25).abs() < 1e-12);
    // tiny Qwen2-MoE: 4 dense blocks of MLP 96, 1 MoE block with a 48-wide shared expert (its
    // routed 2 x 32 are known bytes)
    let f = features(
        &ModelSpec::Transformer(config("qwen2-moe-tiny-mixed")),
        &train,
    )
    .unwrap();
    assert!((f.bsf_raw - bs * (4.0 * 96.0 + 48.0)).abs() < 1e-6);
}

fn estimate(args: &[&str]) -> (i32, String, String) {
    let mut all = vec![
        "estimate",
        "--hf-config",
        "tests/hf_configs/mixtral-8x7b/config.json",
    ];
    all.extend_from_slice(args);
    vramcal(&all)
}

#[test]
fn json_has_total_and_active_parameters_and_the_layout() {
    let (code, out, err) = estimate(&[
        "--json",
        "--gpus",
        "8",
        "--expert-parallel",
        "4",
        "--capacity-factor",
        "1.25",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["params"], MIXTRAL_TOTAL);
    assert_eq!(v["moe"]["total_params"], MIXTRAL_TOTAL);
    assert_eq!(v["moe"]["active_params"], 12_879_925_248u64);
    assert_eq!(v["moe"]["expert_params"], MIXTRAL_EXPERTS);
    assert_eq!(v["moe"]["expert_parallel"], 4);
    assert_eq!(v["moe"]["capacity_factor"], 1.25);
    // a dense model has no `moe` object
    let (_, out, _) = vramcal(&["estimate", "--model", "gpt2", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.get("moe").is_none());
}

#[test]
fn moe_input_errors_exit_2_naming_the_flag_or_key() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--gpus", "8", "--expert-parallel", "3"],
            "invalid expert-parallel: 3 does not divide --gpus 8; accepted a divisor of the GPUs and of the 8 experts",
        ),
        (
            &["--gpus", "16", "--expert-parallel", "16"],
            "invalid expert-parallel: 16 is out of range; accepted 1..=8",
        ),
        (
            &["--capacity-factor", "0"],
            "invalid capacity-factor: '0' is not a capacity factor; accepted a number above 0 and at most 64",
        ),
    ];
    for (args, want) in cases {
        let (code, _, err) = estimate(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim(), format!("error: {want}"), "{args:?}");
    }
    let (code, _, err) = vramcal(&["estimate", "--model", "gpt2", "--expert-parallel", "2"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: invalid expert-parallel: gpt2 has no experts"),
        "{err}"
    );
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_configs/mixtral-8x7b/config.json"),
    )
    .unwrap()
    .replace("\"num_experts_per_tok\": 2,", "");
    let err = hf_config::parse(&text, "m").unwrap_err();
    assert_eq!(
        format!("{err}"),
        "invalid config.json num_experts_per_tok: missing; accepted a non-negative integer"
    );
    let err = hf_config::parse(
        &text.replace(
            "\"num_local_experts\": 8,",
            "\"num_local_experts\": 8, \"num_experts_per_tok\": 9,",
        ),
        "m",
    )
    .unwrap_err();
    assert_eq!(
        format!("{err}"),
        "invalid config.json num_experts_per_tok: 9 is out of range; accepted 1..=8"
    );
    // DeepSeek's latent-attention keys are named as config.json writes them
    let deepseek = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_configs/deepseek-v3/config.json"),
    )
    .unwrap()
    .replace("\"kv_lora_rank\": 512,", "");
    let err = hf_config::parse(&deepseek, "d").unwrap_err();
    assert_eq!(
        format!("{err}"),
        "invalid config.json kv_lora_rank: missing; accepted a non-negative integer"
    );
}

#[test]
fn zero3_gathers_only_the_ranks_own_experts() {
    let train = TrainSpec {
        gpus: 8,
        zero_stage: 3,
        ..TrainSpec::default()
    };
    let f = features(&with_layout(config("mixtral-8x7b"), 8, 1.0), &train).unwrap();
    // one Mixtral block with 1 of its 8 experts: q and o 4096², k and v 4096 x 1024, two
    // RMSNorms, the 4096 x 8 router, one expert 3 x 4096 x 14336; plus the largest tensor
    // outside the blocks, the 32000 x 4096 LM head (one expert's fused gate/up is smaller)
    let block = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 4096 + 4096 * 8 + 3 * 4096 * 14336;
    assert_eq!(f.gathered, (block + 32000 * 4096) as f64);
}

#[test]
fn foreach_adamw_temporaries_cover_only_the_ranks_experts() {
    // `_foreach_sqrt(exp_avg_sq)`: one fp32 state-sized tensor per parameter the rank updates
    let train = TrainSpec {
        gpus: 8,
        optimizer_impl: vramcal::spec::OptimizerImpl::Foreach,
        ..TrainSpec::default()
    };
    let f = features(&with_layout(config("mixtral-8x7b"), 8, 1.0), &train).unwrap();
    let held = MIXTRAL_TOTAL - MIXTRAL_EXPERTS / 8 * 7;
    assert_eq!(f.group_update_bytes, 4.0 * held as f64);
    let all = features(&with_layout(config("mixtral-8x7b"), 1, 1.0), &train).unwrap();
    assert_eq!(all.group_update_bytes, 4.0 * MIXTRAL_TOTAL as f64);
}
