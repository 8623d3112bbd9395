//! The candle harness's mixture-of-experts and block variants (`harness::layers::moe`,
//! `layers::transformer`): parameters equal to transformers' own classes, the variants it builds
//! and the ones it refuses, and MoE step peaks against real PyTorch steps
//! (tests/moe/torch-moe-peaks-cpu.csv: `sweep --backend torch` of the grid's MoE points).

use crate::common::vramcal;
use candle_core::Device;
use vramcal::harness::step::Trainer;
use vramcal::plan::memory::features;
use vramcal::plan::params::count;
use vramcal::spec::presets::preset;
use vramcal::spec::transformer::TransformerSpec;
use vramcal::spec::{ModelSpec, TrainSpec};

fn train(batch: u64, seq: u64) -> TrainSpec {
    TrainSpec {
        batch,
        seq,
        ..TrainSpec::default()
    }
}

fn transformer(name: &str) -> TransformerSpec {
    match preset(name).unwrap() {
        ModelSpec::Transformer(t) => t,
        ModelSpec::Cnn(_) => unreachable!(),
    }
}

/// The harness allocates what the planner counts, and both equal transformers' own count of
/// the same config (`MixtralForCausalLM` / `Qwen2MoeForCausalLM` on the meta device, through the
/// runner's `transformer_plan`): the presets, Qwen2-MoE with a dense first block and 4 experts,
/// Mixtral with 4 experts and multi-query attention.
#[test]
fn moe_models_allocate_transformers_counts() {
    let mut qwen = transformer("tiny-qwen-moe");
    let m = qwen.extras.moe.as_mut().unwrap();
    (m.dense_layers, m.experts) = (1, 4);
    let mut mixtral = transformer("tiny-mixtral");
    mixtral.extras.moe.as_mut().unwrap().experts = 4;
    mixtral.kv_heads = 1;
    let cases = [
        (transformer("tiny-mixtral"), 1_936_000),
        (transformer("tiny-qwen-moe"), 1_379_968),
        (qwen, 822_272),
        (mixtral, 1_132_160),
    ];
    for (t, transformers) in cases {
        let spec = ModelSpec::Transformer(t);
        let trainer = Trainer::new(&spec, &train(1, 8), &Device::Cpu, 0).unwrap();
        assert_eq!(trainer.params(), transformers, "{}", spec.name());
        assert_eq!(count(&spec), transformers, "{}", spec.name());
    }
}

/// Block departures the harness builds (a step runs, parameters as counted) and the ones it
/// refuses in one line naming the spec key (exit 2).
#[test]
fn block_variants_build_or_are_refused_by_key() {
    let base = transformer("tiny-llama");
    let mut variants = Vec::new();
    let mut t = base.clone();
    t.extras.head_dim = Some(48); // q 4 x 48 = 192 wide on hidden 128
    variants.push(t);
    let mut t = base.clone();
    t.kv_heads = 1; // multi-query
    variants.push(t);
    let mut t = base.clone();
    (t.extras.parallel_attn, t.extras.block_norms) = (true, Some(1)); // GPT-J / Phi
    variants.push(t);
    let mut t = base.clone();
    t.extras.parallel_attn = true; // two norms (GPT-NeoX)
    t.extras.attn_bias = Some(true);
    variants.push(t);
    for t in variants {
        let spec = ModelSpec::Transformer(t);
        for attention in [
            vramcal::spec::Attention::Eager,
            vramcal::spec::Attention::Sdpa,
        ] {
            let tr = TrainSpec {
                attention,
                ..train(2, 16)
            };
            let mut trainer = Trainer::new(&spec, &tr, &Device::Cpu, 0).unwrap();
            assert_eq!(trainer.params(), count(&spec));
            assert!(trainer.step().unwrap().is_finite(), "{spec:?}");
        }
    }
    let mut t = base.clone();
    t.extras.qk_norm = vramcal::spec::transformer::QkNorm::PerHead;
    let mut u = base;
    u.extras.lm_head_bias = true;
    let mut cf = transformer("tiny-mixtral");
    cf.extras.moe.as_mut().unwrap().capacity_factor = vramcal::spec::moe::CapacityFactor(1.25);
    for (t, key) in [(t, "qk_norm"), (u, "lm_head_bias"), (cf, "capacity_factor")] {
        let e = Trainer::new(&ModelSpec::Transformer(t), &train(1, 8), &Device::Cpu, 0)
            .err()
            .unwrap();
        assert_eq!(vramcal::error::exit_code(&e), 2);
        let msg = format!("{e}");
        assert!(
            msg.contains(&format!("`{key}`")) && !msg.contains('\n'),
            "{msg}"
        );
    }
}

/// More experts at a fixed top-k: more weights, the same routed-token activations (only the
/// router's fp32 softmax over the experts grows).
#[test]
fn more_experts_more_weights_same_activations() {
    let with = |experts: u64| {
        let mut t = transformer("tiny-mixtral");
        t.extras.moe.as_mut().unwrap().experts = experts;
        ModelSpec::Transformer(t)
    };
    let tr = train(4, 128);
    let (a, b) = (with(4), with(8));
    // 2 blocks x 4 more experts x 3 x 128 x 256, and 2 x 4 x 128 more router rows
    assert_eq!(count(&b) - count(&a), 2 * 4 * 3 * 128 * 256 + 2 * 4 * 128);
    let (fa, fb) = (features(&a, &tr).unwrap(), features(&b, &tr).unwrap());
    assert_eq!(fa.bsh, fb.bsh);
    assert_eq!(fa.bsf, fb.bsf);
    // the router's softmax: 4 more fp32 values per token in each of the 2 blocks
    assert_eq!(fb.moe_bytes - fa.moe_bytes, 2.0 * 4.0 * 128.0 * 4.0 * 4.0);
    // top-k 2 -> 4 doubles the routed pairs' bytes
    let mut t = transformer("tiny-mixtral");
    t.extras.moe.as_mut().unwrap().top_k = 4;
    let f4 = features(&ModelSpec::Transformer(t), &tr).unwrap();
    assert!(
        f4.moe_bytes > 1.9 * fb.moe_bytes,
        "{} {}",
        f4.moe_bytes,
        fb.moe_bytes
    );
}

struct Point {
    args: Vec<String>,
    name: String,
    torch: f64,
    candle: f64,
    precision: String,
}

fn points() -> Vec<Point> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/moe/torch-moe-peaks-cpu.csv"
    );
    let mut rdr = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .from_path(path)
        .unwrap();
    rdr.deserialize::<std::collections::HashMap<String, String>>()
        .map(|r| {
            let r = r.unwrap();
            let args: Vec<String> = [
                "--model",
                &r["model"],
                "--batch",
                &r["batch"],
                "--seq",
                &r["seq"],
                "--precision",
                &r["precision"],
                "--attention",
                &r["attention"],
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            Point {
                name: args.join(" "),
                args,
                torch: r["torch_peak"].parse().unwrap(),
                candle: r["candle_peak"].parse().unwrap(),
                precision: r["precision"].clone(),
            }
        })
        .collect()
}

/// The planner's step peak (allocated, less the CUDA-only cuBLAS workspace, as in
/// `planner_cli::whole_step_peaks_match_real_pytorch_steps`) is within 2 % of every MoE step
/// PyTorch took: Mixtral and Qwen2-MoE, fp32 and fp16-mixed, eager and sdpa, states- and
/// activation-bound shapes.
#[test]
fn planned_moe_step_peaks_match_pytorch() {
    let pts = points();
    assert!(pts.len() >= 12);
    for p in &pts {
        let mut args = vec!["estimate"];
        args.extend(p.args.iter().map(String::as_str));
        args.extend(["--optimizer-impl", "loop", "--json", "--no-gpu-choice"]);
        let (code, out, err) = vramcal(&args);
        assert_eq!(code, 0, "{err}");
        let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
        let planned = plan["memory"]["total"].as_f64().unwrap() - 33_554_432.0;
        let e = (planned - p.torch) / p.torch;
        assert!(
            e.abs() < 0.02,
            "{}: planned {planned}, PyTorch {} ({:+.1} %)",
            p.name,
            p.torch,
            e * 100.0
        );
    }
}

/// candle's MoE steps against PyTorch's: within 1.00-1.02 in fp32 (bounds 0.98-1.04) since the
/// blocks run as attention and feed-forward segments, and 0.98-1.01 in fp16-mixed (bounds
/// 0.95-1.04) since the residual stream is fp32, the attention probabilities are kept in fp32 as
/// transformers' Llama-family attention keeps them, q, k and v keep their own autocast copies
/// and the loss's logit gradient is fp32 before its cast (0.82-1.00 before all that). The
/// committed candle column is re-measured for two points, within 2 %.
#[test]
fn candle_moe_step_peaks_track_pytorch() {
    for p in points() {
        let r = p.candle / p.torch;
        let (lo, hi) = if p.precision == "fp32" {
            (0.98, 1.04)
        } else {
            (0.95, 1.04)
        };
        assert!((lo..hi).contains(&r), "{}: candle/PyTorch {r:.3}", p.name);
    }
    if !crate::common::alone() {
        return;
    }
    for p in points()
        .iter()
        .filter(|p| p.name.contains("--batch 4 --seq 64"))
        .take(2)
    {
        let mut args = vec!["measure"];
        args.extend(p.args.iter().map(String::as_str));
        args.extend(["--warmup", "1", "--repeats", "2", "--json"]);
        let (code, out, err) = vramcal(&args);
        assert_eq!(code, 0, "{err}");
        let row: serde_json::Value = serde_json::from_str(&out).unwrap();
        let peak = row["peak_bytes"].as_f64().unwrap();
        assert!(
            (peak / p.candle - 1.0).abs() < 0.02,
            "{}: {peak} vs {}",
            p.name,
            p.candle
        );
    }
}

/// Every grid has an MoE point set, and the quick CPU grid's stays small.
#[test]
fn grids_have_moe_points() {
    for (grid, min, max) in [
        ("cpu", 10, 14),
        ("cpu-quick", 4, 6),
        ("cuda", 6, 16),
        ("cuda-quick", 2, 4),
    ] {
        let path = format!(
            "{}/calibration/grids/{grid}.toml",
            env!("CARGO_MANIFEST_DIR")
        );
        let g = vramcal::harness::grid::load(std::path::Path::new(&path)).unwrap();
        let n = g
            .points
            .iter()
            .filter(|p| p.model.name().contains("mixtral") || p.model.name().contains("moe"))
            .count();
        assert!((min..=max).contains(&n), "{grid}: {n} MoE points");
    }
}
