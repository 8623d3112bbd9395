//! Fine-tuning plans (`--finetune`, `--freeze-layers`, `--offload`): trainable-parameter counts
//! pinned against peft's own, the monotonic facts of the memory model, and bad input.

use crate::common::vramcal;
use vramcal::coeffs::Coefficients;
use vramcal::plan::estimate::{estimate, Options};
use vramcal::plan::finetune::{resolve_targets, split, Finetune, FinetuneMode, Offload};
use vramcal::plan::params::count;
use vramcal::spec::presets::preset;
use vramcal::spec::{hf_config, ModelSpec, Precision, TrainSpec};

/// tests/hf_configs/lora-*/expected_lora.json: peft's `get_nb_trainable_parameters()` for each
/// (targets, rank), written by scripts/peft_trainable.py with transformers' own classes.
#[test]
fn trainable_params_equal_peft_counts() {
    for dir in ["lora-llama-tiny", "lora-gpt2-tiny", "lora-bert-tiny"] {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_configs");
        let t = hf_config::load(&root.join(dir).join("config.json")).unwrap();
        let text = std::fs::read_to_string(root.join(dir).join("expected_lora.json")).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = expected["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 12, "{dir}");
        let model = ModelSpec::Transformer(t.clone());
        for c in cases {
            let targets = c["targets"].as_str().unwrap();
            let ft = Finetune {
                mode: FinetuneMode::Lora,
                rank: c["rank"].as_u64().unwrap(),
                targets: resolve_targets(&t, targets).unwrap(),
                ..Finetune::default()
            };
            let s = split(&model, &ft);
            assert_eq!(s.trainable, c["trainable"].as_u64().unwrap(), "{dir} {c}");
            assert_eq!(s.frozen, c["base"].as_u64().unwrap(), "{dir} {c}");
            assert_eq!(count(&model), c["base"].as_u64().unwrap(), "{dir}");
        }
    }
}

/// Where `head_dim` makes the query width differ from `hidden` (Gemma-2: 8 × 256 = 2048 against
/// 2304; Qwen3: 16 × 128 = 2048 against 1024), q's output and o's input are heads × head_dim.
/// Expected: peft 0.21's `get_nb_trainable_parameters()` on transformers 5.24's own classes built
/// on the meta device from the committed configs, rank 16, every block linear.
#[test]
fn lora_adapters_follow_head_dim_as_peft_counts_them() {
    for (config, peft) in [("gemma-2-2b", 20_766_720u64), ("qwen3-0.6b", 10_092_544)] {
        assert_eq!(lora_rank16_trainable(config, "all"), peft, "{config}");
    }
}

/// `trainable_params` of a rank-16 LoRA plan of a committed config on `targets`.
fn lora_rank16_trainable(config: &str, targets: &str) -> serde_json::Value {
    let path = format!(
        "{}/tests/hf_configs/{config}/config.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let j = json(&[
        "estimate",
        "--hf-config",
        &path,
        "--finetune",
        "lora",
        "--lora-rank",
        "16",
        "--lora-targets",
        targets,
        "--no-gpu-choice",
        "--json",
    ]);
    j["train"]["trainable_params"].clone()
}

/// Which linears a family fuses decides its adapters: GPT-NeoX, Falcon and BLOOM fuse q, k and
/// v into one `query_key_value`, Phi-3 into `qkv_proj` (and gate and up into `gate_up_proj`),
/// StarCoder2 keeps three projections in its GPT-2-shaped block. Expected: peft 0.21's
/// `get_nb_trainable_parameters()` on transformers 5.24's classes built on the meta device from
/// the committed configs, rank 16, every block linear (Phi-3 also its attention's alone).
#[test]
fn lora_adapters_follow_each_familys_fused_projections_as_peft_counts_them() {
    for (config, targets, peft) in [
        ("pythia-160m", "all", 2_359_296u64),
        ("falcon-7b", "all", 32_636_928),
        ("bloom-560m", "all", 6_291_456),
        ("starcoder2-3b", "all", 23_838_720),
        ("phi-3-mini", "attn", 9_437_184),
        ("phi-3-mini", "all", 25_165_824),
    ] {
        assert_eq!(lora_rank16_trainable(config, targets), peft, "{config}");
    }
}

#[test]
fn llama2_7b_rank16_all_linears_is_the_qlora_figure() {
    let j = json(&[
        "estimate",
        "--model",
        "llama2-7b",
        "--precision",
        "bf16-mixed",
        "--finetune",
        "lora",
        "--no-gpu-choice",
        "--json",
    ]);
    assert_eq!(j["train"]["trainable_params"], 39_976_960u64);
    assert_eq!(j["train"]["finetune"], "lora");
    assert_eq!(j["train"]["batch"], 1);
    // full fine-tuning reports every parameter as trainable
    let f = json(&[
        "estimate",
        "--model",
        "llama2-7b",
        "--no-gpu-choice",
        "--json",
    ]);
    assert_eq!(f["train"]["trainable_params"], 6_738_415_616u64);
    assert_eq!(f["train"]["finetune"], "full");
}

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = vramcal(args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn plan(model: &ModelSpec, train: &TrainSpec, ft: Finetune) -> vramcal::plan::estimate::Estimate {
    let opts = Options {
        choose_gpus: false,
        gpu: vramcal::plan::gpus::find("rtx4090").ok(),
        finetune: ft,
        ..Options::default()
    };
    estimate(model, train, &Coefficients::literature(), &opts).unwrap()
}

fn bf16_train() -> TrainSpec {
    TrainSpec {
        batch: 1,
        seq: 512,
        precision: Precision::Bf16Mixed,
        attention: vramcal::spec::Attention::Sdpa,
        optimizer_impl: vramcal::spec::OptimizerImpl::Foreach,
        ..TrainSpec::default()
    }
}

#[test]
fn qlora_below_lora_below_full_and_llama2_7b_qlora_fits_24gb() {
    let m = preset("llama2-7b").unwrap();
    let t = bf16_train();
    let full = plan(&m, &t, Finetune::default());
    let lora = plan(
        &m,
        &t,
        Finetune {
            mode: FinetuneMode::Lora,
            ..Finetune::default()
        },
    );
    let qlora = plan(
        &m,
        &t,
        Finetune {
            mode: FinetuneMode::Qlora,
            base_bits: 4,
            ..Finetune::default()
        },
    );
    let (f, l, q) = (&full.memory, &lora.memory, &qlora.memory);
    assert!(q.weights < l.weights && l.weights < f.weights);
    // gradients + optimizer: LoRA trains 0.6 % of the parameters
    assert!((l.gradients + l.optimizer) * 100 < f.gradients + f.optimizer);
    assert_eq!(l.gradients, q.gradients);
    assert!(q.device_used < l.device_used && l.device_used < f.device_used);
    assert!(
        qlora.verdict.as_ref().unwrap().fits,
        "QLoRA 7B fits a 24 GB card"
    );
    assert!(!full.verdict.as_ref().unwrap().fits);
    // NF4 base: 6.48e9 block-linear weights at 4.127 bits + embeddings, head and norms in fp32
    // (peft's prepare_model_for_kbit_training, the QLoRA recipe), or kept 16-bit with adapters
    // in the base's dtype (torchtune, LitGPT)
    let quant = 32u64 * (4 * 4096 * 4096 + 3 * 4096 * 11008);
    let rest = 6_738_415_616u64 - quant;
    let base = quant as f64 * 4.127 / 8.0 + rest as f64 * 4.0;
    let adapters = 39_976_960.0 * (4.0 + 2.0); // fp32 adapters + their autocast copy
    assert!(
        (q.weights as f64 - base - adapters).abs() / base < 1e-3,
        "{}",
        q.weights
    );
    let q16 = plan(
        &m,
        &t,
        Finetune {
            mode: FinetuneMode::Qlora,
            base_bits: 4,
            adapter_dtype: vramcal::plan::finetune::AdapterDtype::Base,
            ..Finetune::default()
        },
    );
    assert_eq!(
        (q.weights - q16.memory.weights) as f64,
        rest as f64 * 2.0,
        "16-bit rest"
    );
    // with every linear adapted, the frozen RMSNorms keep less than full training does and
    // the adapter branches add back only their rank-16 intermediates (measured with peft,
    // `finetune_peaks_match_real_peft_steps`)
    assert!(l.activations < f.activations);
    assert!(l.activations as f64 > 0.8 * f.activations as f64);
}

#[test]
fn frozen_layers_shrink_activations_and_states() {
    let m = preset("gpt2").unwrap();
    let t = bf16_train();
    let full = plan(&m, &t, Finetune::default());
    let frozen = plan(
        &m,
        &t,
        Finetune {
            freeze_layers: 6,
            ..Finetune::default()
        },
    );
    assert!(frozen.memory.activations < full.memory.activations);
    assert!(frozen.memory.optimizer < full.memory.optimizer);
    assert!(frozen.train.trainable_params < full.train.trainable_params);
    assert_eq!(
        frozen.memory.weights,
        full.memory.weights - 2 * (frozen.train.frozen_params)
    );
}

#[test]
fn offload_moves_states_to_host() {
    let m = preset("llama2-7b").unwrap();
    let t = TrainSpec {
        zero_stage: 3,
        gpus: 8,
        optimizer_impl: vramcal::spec::OptimizerImpl::Fused,
        ..bf16_train()
    };
    let on_gpu = plan(&m, &t, Finetune::default());
    let opt = plan(
        &m,
        &t,
        Finetune {
            offload: Offload::Optimizer,
            ..Finetune::default()
        },
    );
    let all = plan(
        &m,
        &t,
        Finetune {
            offload: Offload::OptimizerParams,
            ..Finetune::default()
        },
    );
    assert!(opt.memory.device_used < on_gpu.memory.device_used);
    assert!(all.memory.device_used < opt.memory.device_used);
    assert_eq!(opt.memory.optimizer, 0);
    assert_eq!(
        opt.host_ram.required_bytes,
        on_gpu.host_ram.required_bytes + on_gpu.memory.optimizer
    );
    assert_eq!(opt.host_ram.offload_bytes, on_gpu.memory.optimizer);
    assert!(all.host_ram.offload_bytes > opt.host_ram.offload_bytes);
    let (s0, s1) = (on_gpu.step_time.unwrap(), opt.step_time.unwrap());
    assert!(s1.seconds > s0.seconds);
    assert!((s1.seconds - s0.seconds - opt.offload_time.unwrap().seconds).abs() < 1e-9);
}

#[test]
fn text_header_names_the_mode_and_trainable_params() {
    let (code, out, err) = vramcal(&[
        "estimate",
        "--model",
        "llama2-7b",
        "--precision",
        "bf16-mixed",
        "--finetune",
        "qlora",
        "--no-gpu-choice",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fine-tuning: qlora rank 16"), "{out}");
    assert!(
        out.contains("trainable 39,976,960 of 6,738,415,616 parameters"),
        "{out}"
    );
}

/// peft's fp32 adapters over a true-bf16 base (the default) against adapters in the base's
/// dtype (`--adapter-dtype base`): 8 more bytes per trainable parameter (fp32 weight, gradient
/// and AdamW moments: 16 B against 8 B), and per adapted linear its own fp32 copy of the input
/// (4·b·s·d_in) where the base-dtype adapters share one bf16 input per group (2·b·s·d_in). GPT-2
/// (h 768, 12 layers), LoRA r 16 on the fused qkv only, b 2, s 512: one adapted linear reading
/// one input per block.
#[test]
fn fp32_adapters_train_fp32_states_and_keep_fp32_copies_of_their_inputs() {
    let plan = |dtype: &str| {
        let (code, out, err) = vramcal(&[
            "estimate",
            "--model",
            "gpt2",
            "--precision",
            "bf16",
            "--finetune",
            "lora",
            "--lora-targets",
            "qkv",
            "--batch",
            "2",
            "--seq",
            "512",
            "--adapter-dtype",
            dtype,
            "--json",
            "--no-gpu-choice",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let (fp32, base) = (plan("fp32"), plan("base"));
    let m = |j: &serde_json::Value, k: &str| j["memory"][k].as_f64().unwrap();
    let trainable = fp32["train"]["trainable_params"].as_f64().unwrap();
    // 12 blocks x r16 x (768 + 2304)
    assert_eq!(trainable, 12.0 * 16.0 * (768.0 + 2304.0));
    let states = |j| m(j, "weights") + m(j, "gradients") + m(j, "optimizer");
    assert_eq!(states(&fp32) - states(&base), 8.0 * trainable);
    // per block: the input copy 4·b·s·h against the shared 2·b·s·h, and the rank-16
    // intermediate in fp32 (4·b·s·r) against bf16
    let per_block = 2.0 * 2.0 * 512.0 * 768.0 + 2.0 * 2.0 * 512.0 * 16.0;
    assert_eq!(
        m(&fp32, "activations") - m(&base, "activations"),
        12.0 * per_block
    );
    assert_eq!(fp32["train"]["lora"]["adapter_dtype"], "fp32");
    assert_eq!(base["train"]["lora"]["adapter_dtype"], "bf16");
}

/// With peft's fp32 adapters over a true bf16 base, LoRA on every linear saves more for
/// backward than full training of the same model: each adapted linear keeps its own fp32 copy of
/// its input (q, k and v three of the attention input), more than the frozen base stops saving.
/// Measured (calibration/data/torch-*-peaks-cpu.csv, Llama h512 4 layers, b4 s512, bf16 sdpa):
/// 351 MB saved against full training's 266 MB; planned the same way round.
#[test]
fn peft_lora_on_every_linear_saves_more_than_full_training_in_true_bf16() {
    // both steps re-planned from their recorded commands
    let row = |file: &str, name: &str| {
        crate::common::step_peak_rows(file, |n| n == name)
            .pop()
            .unwrap_or_else(|| panic!("{name}"))
    };
    let full = row(
        "torch-step-peaks-cpu.csv",
        "llama-mha bf16 sdpa foreach b4s512",
    );
    let lora = row(
        "torch-finetune-peaks-cpu.csv",
        "lora-all r16 fp32-adapters llama-mha bf16 sdpa b4s512",
    );
    let (full_saved, lora_saved) = (full.num("meas_saved_act"), lora.num("meas_saved_act"));
    assert!(
        lora_saved > 1.2 * full_saved,
        "measured {lora_saved} vs {full_saved}"
    );
    let act = |plan: &serde_json::Value| plan["memory"]["activations"].as_f64().unwrap();
    let (full_plan, lora_plan) = (act(&full.plan), act(&lora.plan));
    assert!(lora_plan > full_plan, "planned {lora_plan} vs {full_plan}");
    // the same LoRA step with adapters in the base's dtype
    let base_cmd =
        lora.cells["planner_cmd"].replace("--adapter-dtype fp32", "--adapter-dtype base");
    assert_ne!(base_cmd, lora.cells["planner_cmd"]);
    let (code, out, err) = vramcal(&base_cmd.split_whitespace().collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(act(&serde_json::from_str(&out).unwrap()) < full_plan);
}

#[test]
fn bad_finetune_inputs_exit_2_with_one_line_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--finetune", "dora"], "invalid finetune: 'dora' is unknown; accepted full, lora, qlora"),
        (&["--finetune", "lora", "--lora-rank", "0"], "invalid lora-rank: 0 is out of range; accepted 1..=768"),
        (&["--finetune", "lora", "--lora-rank", "5000"], "invalid lora-rank: 5000 is out of range; accepted 1..=768"),
        (&["--finetune", "lora", "--lora-targets", "qkv,gate"], "invalid lora-targets: 'gate' is not a linear of this model; accepted attn, mlp, all or a comma list of qkv, o, fc1, fc2"),
        (&["--finetune", "qlora"], "invalid precision: fp32 with a 4-bit base"),
        (&["--lora-rank", "8"], "invalid lora-rank: applies to adapters only"),
        (&["--finetune", "lora", "--lora-dropout", "1.5"], "invalid lora-dropout: '1.5' is not a probability"),
        (&["--freeze-layers", "13"], "invalid freeze-layers: 13 is out of range; accepted 0..=12"),
        (&["--offload", "optimizer"], "invalid offload: optimizer needs DeepSpeed ZeRO"),
        (&["--offload", "optimizer+params", "--zero", "2", "--gpus", "2"], "invalid offload: optimizer+params needs ZeRO stage 3"),
        (&["--offload", "disk"], "invalid offload: 'disk' is unknown; accepted none, optimizer, optimizer+params"),
        (&["--offload", "optimizer", "--zero", "1", "--gpus", "0"], "invalid gpus: 0 is out of range"),
        (&["--finetune", "lora", "--base-bits", "3", "--precision", "bf16"], "invalid base-bits: '3' is unknown; accepted 4, 8, 16"),
        (&["--adapter-dtype", "base"], "invalid adapter-dtype: applies to adapters only"),
        (&["--finetune", "lora", "--adapter-dtype", "fp8"], "invalid adapter-dtype: 'fp8' is unknown; accepted fp32, base"),
    ];
    for (args, want) in cases {
        let mut a = vec!["estimate", "--model", "gpt2"];
        a.extend_from_slice(args);
        let (code, out, err) = vramcal(&a);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with(&format!("error: {want}")),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = vramcal(&["estimate", "--model", "resnet50", "--finetune", "lora"]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: invalid finetune: applies to transformer blocks only"),
        "{err}"
    );
}

/// The fine-tuning plans against real PyTorch steps of peft LoRA and partially frozen models
/// (scripts/torch_step_peak with FINETUNE=1, calibration/data/torch-finetune-peaks-cpu.csv:
/// transformers' Llama, peft 0.21 adapters on all block linears or on q and v only, ranks 8-64,
/// fp32, true bf16 with bf16 adapters or peft's own fp32 ones, and bf16 autocast, AdamW over
/// the trainable parameters; embeddings and the first two blocks
/// frozen), measured on CPU with the live-heap shim. The plan's trainable parameters equal peft's
/// exactly, and its allocated peak less the cuBLAS workspace (a CUDA buffer a CPU process lacks)
/// is within 3 % of each step (largest: 2.7 % when written, a true-bf16 step with peft's fp32 adapters). Not scored: lora_dropout on CPU (4-byte masks where the plan
/// counts CUDA's 1-byte ones).
#[test]
fn finetune_peaks_match_real_peft_steps() {
    const TOLERANCE: f64 = 0.03;
    let rows = crate::common::step_peak_rows("torch-finetune-peaks-cpu.csv", |_| true);
    let mut scored = 0;
    for row in &rows {
        let trainable = row.plan["train"]["trainable_params"].as_u64().unwrap();
        assert_eq!(
            trainable as f64,
            row.num("trainable_torch"),
            "{}: trainable parameters",
            row.name
        );
        if row.name.contains("DROPOUT") {
            continue;
        }
        row.checked_step_error(|e| e.abs() < TOLERANCE);
        scored += 1;
    }
    assert!(scored >= 12, "only {scored} steps scored");
}
