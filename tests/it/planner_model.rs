//! Planner maths through the library: ZeRO paper figures, monotonicity, inverse search, and the
//! shipped config.json / CNN files against the presets.

use std::path::Path;
use vramcal::coeffs::Coefficients;
use vramcal::plan::estimate::{estimate, Options};
use vramcal::plan::memory::{self, state_bytes};
use vramcal::plan::params::count;
use vramcal::plan::search::{max_batch, max_seq, Evaluator};
use vramcal::spec::presets::{preset, NAMES};
use vramcal::spec::{
    cnn_file, hf_config, Attention, Checkpointing, ModelSpec, Optimizer, OptimizerImpl, Precision,
    TrainSpec,
};

fn train(batch: u64, seq: u64) -> TrainSpec {
    TrainSpec {
        batch,
        seq,
        ..TrainSpec::default()
    }
}

#[test]
fn zero_paper_example_per_rank_model_states() {
    // Rajbhandari et al. 2020, figure 1: 7.5B params, 64 GPUs, mixed-precision Adam (K = 12):
    // 120 GB, 31.4 GB, 16.6 GB, 1.9 GB for baseline and stages 1-3 (1 GB = 1e9 bytes).
    // bf16-mixed switches to that layout under ZeRO (stages 1-3), as DeepSpeed does, and is
    // torch-autocast's 18 B/param (135 GB) without ZeRO.
    let expected = [120.0, 31.4, 16.6, 1.9];
    for (stage, want) in expected.into_iter().enumerate() {
        let mixed = TrainSpec {
            precision: Precision::Bf16Mixed,
            zero_stage: stage as u8,
            gpus: 64,
            ..TrainSpec::default()
        };
        let s = state_bytes(7_500_000_000, &mixed);
        let got = (s.fixed() + s.half_copy) / 1e9;
        let want_mixed = if stage == 0 { 135.0 } else { want };
        assert!(
            (got - want_mixed).abs() < 0.05,
            "bf16-mixed stage {stage}: {got} GB, expected {want_mixed} GB"
        );
    }
}

/// True bf16 (`model.to(torch.bfloat16)` + torch AdamW, torchtune, LitGPT bf16-true) keeps
/// weights, gradients and both moments in bf16: 8 bytes per parameter, no fp32 master, sharded
/// per ZeRO stage like the ZeRO paper's partitions (optimizer from 1, gradients from 2, weights 3).
#[test]
fn true_bf16_is_8_bytes_per_param_with_adamw() {
    let p = 7_500_000_000u64;
    let n = 64.0;
    let per_param = [
        2.0 + 2.0 + 4.0,
        2.0 + 2.0 + 4.0 / n,
        2.0 + (2.0 + 4.0) / n,
        (2.0 + 2.0 + 4.0) / n,
    ];
    for (stage, bytes) in per_param.into_iter().enumerate() {
        let t = TrainSpec {
            precision: Precision::Bf16,
            optimizer: Optimizer::AdamW,
            zero_stage: stage as u8,
            gpus: 64,
            ..TrainSpec::default()
        };
        let got = state_bytes(p, &t).fixed();
        let want = bytes * p as f64;
        assert!(
            (got - want).abs() < 1.0,
            "stage {stage}: {got} B, expected {want} B"
        );
    }
    // 8-bit AdamW: two 1-byte moments and an fp32 absmax per 2048-element block of each
    let eight = TrainSpec {
        precision: Precision::Bf16,
        optimizer: Optimizer::AdamW8bit,
        ..TrainSpec::default()
    };
    let s = state_bytes(p, &eight);
    assert!((s.optimizer - p as f64 * (2.0 + 8.0 / 2048.0)).abs() < 1.0);
}

#[test]
fn fp32_adamw_states_are_16_bytes_per_param() {
    let m = preset("bert-base").unwrap();
    let b = memory::estimate(&m, &train(32, 512), &Coefficients::literature()).unwrap();
    assert_eq!(b.states(), 16 * 109_482_240);
}

#[test]
fn memory_is_non_decreasing_in_batch_seq_and_layers() {
    let c = Coefficients::literature();
    for name in ["gpt2", "bert-base", "llama2-7b"] {
        let m = preset(name).unwrap();
        for ckpt in [Checkpointing::None, Checkpointing::Full] {
            for prec in Precision::ALL {
                let base = TrainSpec {
                    precision: prec,
                    checkpointing: ckpt,
                    ..train(1, 8)
                };
                let total = |t: &TrainSpec| memory::estimate(&m, t, &c).unwrap().total;
                let mut last = 0;
                for b in [1, 2, 3, 8, 17, 64] {
                    let now = total(&TrainSpec {
                        batch: b,
                        ..base.clone()
                    });
                    assert!(now >= last, "{name} batch {b}");
                    last = now;
                }
                let mut last = 0;
                for s in [1, 2, 64, 100, 512] {
                    let now = total(&TrainSpec {
                        seq: s,
                        ..base.clone()
                    });
                    assert!(now >= last, "{name} seq {s}");
                    last = now;
                }
                let ModelSpec::Transformer(t) = &m else {
                    unreachable!()
                };
                let mut last = 0;
                for l in [1, 2, 5, 12, 40] {
                    let deeper = ModelSpec::Transformer(vramcal::spec::TransformerSpec {
                        layers: l,
                        ..t.clone()
                    });
                    let now = memory::estimate(&deeper, &base, &c).unwrap().total;
                    assert!(now > last, "{name} layers {l}");
                    last = now;
                }
            }
        }
    }
}

#[test]
fn max_batch_fits_and_one_more_does_not() {
    let c = Coefficients::literature();
    let cap = 80u64 << 30;
    for (name, seq, prec, ckpt) in [
        ("gpt2", 1024, Precision::Fp32, Checkpointing::None),
        ("llama2-7b", 4096, Precision::Bf16Mixed, Checkpointing::Full),
        ("bert-large", 512, Precision::Bf16, Checkpointing::None),
    ] {
        let m = preset(name).unwrap();
        let t = TrainSpec {
            precision: prec,
            checkpointing: ckpt,
            zero_stage: 2,
            gpus: 8,
            ..train(1, seq)
        };
        let ev = Evaluator::new(&m, &t, &c).unwrap();
        let b = max_batch(&ev, &t, cap).unwrap().expect("batch 1 fits");
        let at = |b| {
            memory::estimate(
                &m,
                &TrainSpec {
                    batch: b,
                    ..t.clone()
                },
                &c,
            )
            .unwrap()
            .device_used
        };
        assert!(at(b) <= cap && at(b + 1) > cap, "{name}: {b}");
    }
    // max seq: gpt2 reaches its 1024-position table; llama2-7b is bounded by memory.
    let m = preset("llama2-7b").unwrap();
    let t = TrainSpec {
        precision: Precision::Bf16Mixed,
        zero_stage: 3,
        gpus: 8,
        ..train(1, 4096)
    };
    let ev = Evaluator::new(&m, &t, &c).unwrap();
    let s = max_seq(&m, &ev, &t, cap).unwrap().unwrap();
    let at = |s| {
        memory::estimate(
            &m,
            &TrainSpec {
                seq: s,
                ..t.clone()
            },
            &c,
        )
        .unwrap()
        .device_used
    };
    assert!(at(s) <= cap && at(s + 1) > cap, "seq {s}");
    let g = preset("gpt2").unwrap();
    let ev = Evaluator::new(&g, &train(1, 8), &c).unwrap();
    assert_eq!(max_seq(&g, &ev, &train(1, 8), cap).unwrap(), Some(1024));
}

#[test]
fn shipped_config_json_matches_presets() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets");
    for name in [
        "bert-base",
        "bert-large",
        "gpt2",
        "gpt2-medium",
        "vit-base-16",
        "vit-large-16",
        "llama2-7b",
    ] {
        let spec = hf_config::load(&dir.join(name).join("config.json")).unwrap();
        let from_json = count(&ModelSpec::Transformer(spec));
        assert_eq!(from_json, count(&preset(name).unwrap()), "{name}");
    }
    assert!(NAMES.contains(&"llama2-7b"));
}

#[test]
fn custom_cnn_file_loads_with_hand_counted_params() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/custom-cnn.toml");
    let spec = cnn_file::load(&path).unwrap();
    // conv 3x3x3x32 + bn 64 + body (3x3x32x64 + bn 128 + 3x3x64x64 + bn 128)
    // + shortcut (32x64 + bn 128) + linear 64x10+10
    assert_eq!(
        spec.params(),
        864 + 64 + 18_432 + 128 + 36_864 + 128 + 2_048 + 128 + 650
    );
    // the same network round-trips through JSON
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(cnn_file::parse(&json, false).unwrap(), spec);
    let m = ModelSpec::Cnn(spec);
    assert!(memory::estimate(
        &m,
        &TrainSpec {
            image: 32,
            ..train(64, 1)
        },
        &Coefficients::literature()
    )
    .is_ok());
}

#[test]
fn hf_config_errors_name_the_field() {
    let err = hf_config::parse("{\"model_type\": \"bert\", ", "x").unwrap_err();
    assert!(
        format!("{err}").starts_with("invalid config.json: not valid JSON"),
        "{err}"
    );
    let err = hf_config::parse(r#"{"model_type":"llama","hidden_size":4096}"#, "x").unwrap_err();
    assert!(
        format!("{err}").contains("config.json num_attention_heads: missing"),
        "{err}"
    );
    let err = hf_config::parse(r#"{"model_type":"mamba"}"#, "x").unwrap_err();
    assert!(
        format!("{err}").contains("'mamba' is not supported"),
        "{err}"
    );
}

#[test]
fn gpu_choice_needs_more_gpus_for_bigger_models() {
    let c = Coefficients::literature();
    let t = TrainSpec {
        precision: Precision::Bf16Mixed,
        checkpointing: Checkpointing::Full,
        ..train(1, 4096)
    };
    let e = estimate(&preset("llama2-7b").unwrap(), &t, &c, &Options::default()).unwrap();
    let h100 = e.gpu_choice.iter().find(|g| g.gpu == "h100").unwrap();
    let l = h100.layout.unwrap();
    // 16 B/param (+2 B half copy) of 6.7B params cannot sit on one 80 GB card.
    assert!(l.gpus > 1 && l.zero_stage > 0, "{l:?}");
    assert!(h100.total_bytes.unwrap() <= h100.memory_bytes);
    let small = estimate(
        &preset("gpt2").unwrap(),
        &train(8, 1024),
        &c,
        &Options::default(),
    )
    .unwrap();
    assert!(small.gpu_choice.iter().all(|g| g.layout.unwrap().gpus == 1));
}

/// Planner speed: prints the measured times; bounds are 10x the targets (benches/plan.rs) so a
/// loaded CI machine does not flake, but a regression to re-validating per probe would show.
#[test]
fn planner_is_fast() {
    let c = Coefficients::literature();
    let m = preset("llama2-7b").unwrap();
    let t = TrainSpec {
        precision: Precision::Bf16Mixed,
        ..train(4, 4096)
    };
    let n = 2000;
    let start = std::time::Instant::now();
    let mut acc = 0u64;
    for i in 0..n {
        let tt = TrainSpec {
            batch: 1 + i % 7,
            ..t.clone()
        };
        acc = acc.wrapping_add(
            memory::estimate(&m, std::hint::black_box(&tt), &c)
                .unwrap()
                .total,
        );
    }
    let per_estimate = start.elapsed().as_secs_f64() / n as f64;
    // A search that probes: ZeRO-3 over 8 GPUs with checkpointing leaves room for batch > 1.
    let t = TrainSpec {
        zero_stage: 3,
        gpus: 8,
        checkpointing: Checkpointing::Full,
        ..t
    };
    let ev = Evaluator::new(&m, &t, &c).unwrap();
    assert!(max_batch(&ev, &t, 80 << 30).unwrap().unwrap() > 4);
    let start = std::time::Instant::now();
    for _ in 0..200 {
        let cap = std::hint::black_box(80u64 << 30);
        acc = acc.wrapping_add(
            max_batch(&ev, std::hint::black_box(&t), cap)
                .unwrap()
                .unwrap_or(0),
        );
    }
    let per_search = start.elapsed().as_secs_f64() / 200.0;
    println!(
        "estimate {:.2} us, max-batch search {:.2} us ({acc})",
        per_estimate * 1e6,
        per_search * 1e6
    );
    assert!(per_estimate < 100e-6, "{per_estimate}");
    assert!(per_search < 10e-3, "{per_search}");
}

fn llama_at(seq: u64, t: TrainSpec) -> (ModelSpec, TrainSpec) {
    (
        preset("llama2-7b").unwrap(),
        TrainSpec {
            batch: 1,
            seq,
            precision: Precision::Bf16Mixed,
            ..t
        },
    )
}

fn allocated(model: &ModelSpec, t: &TrainSpec) -> memory::MemoryBreakdown {
    let terms = memory::fit_terms(model, t).unwrap();
    memory::breakdown(&terms, model, t, &Coefficients::literature())
}

/// llama2-7b (32 layers, h 4096, 32 heads, V 32000, MHA), seq 4096, batch 1, bf16-mixed, with the
/// literature table's measured PyTorch Llama block (calibration/literature.json, from
/// scripts/torch_saved_bytes.py): eager saves 34 B per b·s·h and 6 B per b·a·s² (fp32 softmax
/// and its bf16 copy); sdpa saves 30 B per b·s·h, K and V at 4 B per b·s·kv·d and an fp32
/// log-sum-exp (4 B per b·a·s), and no score tensor. Backward's 8 B/element workspace covers
/// one layer's scores in eager attention, once the head's backward has freed its saved
/// logits (4 B per b·s·V); under sdpa the head's phase holds the peak: those logits and the
/// fp32 logits' gradients.
#[test]
fn sdpa_drops_the_score_tensors_of_every_layer() {
    let (m, eager) = llama_at(
        4096,
        TrainSpec {
            attention: Attention::Eager,
            ..TrainSpec::default()
        },
    );
    let sdpa = TrainSpec {
        attention: Attention::Sdpa,
        ..eager.clone()
    };
    let (l, s, h, a, v) = (32.0, 4096.0, 4096.0, 32.0, 32000.0);
    let per_layer = (34.0 - 30.0 - 4.0) * s * h + 6.0 * a * s * s - 4.0 * a * s;
    let expected = l * per_layer + 8.0 * a * s * s - (4.0 + 8.0) * s * v;
    let got = allocated(&m, &eager).activations as f64 - allocated(&m, &sdpa).activations as f64;
    assert!(
        (got - expected).abs() < 2.0,
        "eager - sdpa = {got} B, formula {expected} B"
    );
    // the scores are most of eager's activations at this length: sdpa keeps about a fifth
    let ratio = allocated(&m, &sdpa).activations as f64 / allocated(&m, &eager).activations as f64;
    assert!(
        (0.15..0.3).contains(&ratio),
        "sdpa / eager activations {ratio}"
    );
    // selective recomputation drops the same stored scores in eager attention (the literature
    // block's 6 B per score element) but one layer's, which its backward rebuilds; nothing else
    let selective = TrainSpec {
        checkpointing: Checkpointing::Selective,
        ..eager.clone()
    };
    let dropped =
        allocated(&m, &eager).activations as f64 - allocated(&m, &selective).activations as f64;
    assert!(
        (dropped - (l - 1.0) * 6.0 * a * s * s).abs() < 2.0,
        "{dropped}"
    );
}

/// AdamW foreach allocates one state-sized (fp32) temporary per parameter at the optimizer
/// step; fused allocates none. At a short sequence in autocast, backward holds max(activations,
/// 4 B/param gradients) plus the 2 B/param bf16 weight copy, and the foreach step holds the
/// gradients plus the 4 B/param temporary (the copy is gone by then): the step is the peak.
#[test]
fn foreach_adamw_peaks_at_the_step_by_a_state_sized_temporary() {
    let (m, fused) = llama_at(
        128,
        TrainSpec {
            optimizer_impl: OptimizerImpl::Fused,
            ..TrainSpec::default()
        },
    );
    let foreach = TrainSpec {
        optimizer_impl: OptimizerImpl::Foreach,
        ..fused.clone()
    };
    let p = count(&m) as f64;
    let (a, b) = (allocated(&m, &fused), allocated(&m, &foreach));
    assert!(
        4.0 * p > a.activations as f64,
        "the step must be the peak here"
    );
    let got = b.total as f64 - a.total as f64;
    let backward = (4.0 * p).max(a.activations as f64) + 2.0 * p;
    let want = (4.0 * p + 4.0 * p) - backward;
    assert!((got - want).abs() < 2.0, "{got} vs {want}");
    // sharded over 8 GPUs under ZeRO, the temporary covers this rank's shard only
    let z = |imp| TrainSpec {
        zero_stage: 1,
        gpus: 8,
        optimizer_impl: imp,
        ..fused.clone()
    };
    let gap = allocated(&m, &z(OptimizerImpl::Foreach)).total as f64
        - allocated(&m, &z(OptimizerImpl::Fused)).total as f64;
    assert!(gap < 4.0 * p / 8.0 + 1.0, "{gap}");
}

/// On a GPU the device holds more than the allocated peak (CUDA context, allocator reserve,
/// NCCL buffers with several GPUs), and FITS is judged on that.
#[test]
fn device_used_exceeds_the_allocated_peak_on_every_gpu() {
    let lit = Coefficients::literature();
    for name in ["bert-large", "llama2-7b", "resnet50", "gpt2"] {
        let m = preset(name).unwrap();
        for gpus in [1u64, 8] {
            let t = TrainSpec {
                batch: 4,
                seq: 512,
                zero_stage: if gpus > 1 { 2 } else { 0 },
                gpus,
                ..TrainSpec::default()
            };
            let b = memory::estimate(&m, &t, &lit).unwrap();
            assert!(b.device_used > b.total, "{name}: {b:?}");
            assert!(
                b.reserved_peak >= b.total && b.cuda_context > 0,
                "{name}: {b:?}"
            );
            assert_eq!(b.nccl_buffers > 0, gpus > 1, "{name}: {b:?}");
            // a capacity between the allocated peak and what the device shows does not fit
            assert!(b.fits(b.device_used) && !b.fits(b.device_used - 1));
            assert!(!b.fits(b.total));
        }
    }
    // a CPU table plans a CPU process: no CUDA runtime at all
    let cpu = Coefficients::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/cpu-amd-epyc.json"),
    )
    .unwrap();
    let b = memory::estimate(&preset("gpt2").unwrap(), &train(2, 128), &cpu).unwrap();
    assert_eq!(b.device_used, b.total);
}

/// The literature's Llama-family block coefficients reproduce PyTorch's own saved-for-backward
/// bytes, measured with transformers' LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM
/// (calibration/data/torch-saved-bytes-cpu.csv, written by scripts/torch_saved_bytes.py), for
/// every measured shape with batch >= 2 (at batch 1 the labels stay a view: +8 bytes). Only the
/// RoPE cos/sin tables (8 B per s·head_dim, shared by all layers) are left out: within 2 %.
#[test]
fn llama_block_coefficients_reproduce_pytorchs_saved_bytes() {
    use vramcal::spec::transformer::BlockKind;
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/data/torch-saved-bytes-cpu.csv");
    let mut rdr = csv::Reader::from_path(&path).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let lit = Coefficients::literature();
    let mut checked = 0;
    for rec in rdr.records() {
        let rec = rec.unwrap();
        let get = |name: &str| rec[col(name)].parse::<f64>().unwrap();
        // the default blocks: no attention dropout, SiLU (other rows vary them)
        if !["llama", "mistral", "qwen2"].contains(&&rec[col("arch")])
            || get("b") < 2.0
            || get("attn_dropout") > 0.0
            || &rec[col("activation")] != "silu"
        {
            continue;
        }
        let precision = match &rec[col("precision")] {
            "fp32" => Precision::Fp32,
            "bf16-autocast" => Precision::Bf16Mixed,
            "bf16" => Precision::Bf16,
            other => panic!("precision {other}"),
        };
        let attention: Attention = rec[col("attention")].parse().unwrap();
        let mode = lit.mode(vramcal::spec::Family::Transformer, precision);
        let c = mode
            .activation
            .blocks
            .iter()
            .find(|c| c.block == BlockKind::Llama && c.attention == attention)
            .expect("the literature has the Llama block");
        let (b, s, h, f, a) = (get("b"), get("s"), get("h"), get("f"), get("a"));
        let (kv, d, l, v) = (get("kv_heads"), get("head_dim"), get("L"), get("V"));
        let silu = mode.activation.act_fns[&vramcal::spec::transformer::Activation::Silu].value;
        let per_layer = c.bsh * b * s * h
            + (c.bsf + silu) * b * s * f
            + c.bas2 * b * a * s * s
            + c.bas * b * a * s
            + c.bskv * b * s * kv * d
            + c.bs * b * s;
        let predicted =
            l * per_layer + c.bsh_once * b * s * h + c.bs_once * b * s + c.bsv * b * s * v;
        let measured = get("saved_bytes");
        let err = (predicted - measured).abs() / measured;
        assert!(
            err < 0.02,
            "{rec:?}: predicted {predicted}, measured {measured}"
        );
        checked += 1;
    }
    assert!(checked >= 100, "only {checked} rows checked");
}

/// The dropout terms and the activation functions' bytes of the literature's fp32 blocks
/// reproduce what PyTorch keeps when transformers' configs change them
/// (calibration/data/torch-saved-bytes-cpu.csv, scripts/torch_saved_bytes.py --dropout /
/// --activation): for every measured eager fp32 shape, the measured difference between a
/// variant and the architecture's default is exactly the planner's, with the dropout masks
/// counted in the input's dtype (4 B) as the CPU keeps them instead of CUDA's 1-byte masks.
#[test]
fn dropout_and_activation_terms_reproduce_pytorchs_saved_bytes() {
    use std::collections::HashMap;
    use vramcal::spec::transformer::{Activation, BlockKind};
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/data/torch-saved-bytes-cpu.csv");
    let mut rdr = csv::Reader::from_path(&path).unwrap();
    let headers = rdr.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let mode = Coefficients::literature().mode(vramcal::spec::Family::Transformer, Precision::Fp32);
    // (arch, shape) -> [(dropout on, activation, saved bytes)]
    type Variants = Vec<(bool, Activation, f64)>;
    let mut groups: HashMap<(String, Vec<u64>), Variants> = HashMap::new();
    for rec in rdr.records() {
        let rec = rec.unwrap();
        if &rec[col("attention")] != "eager" || &rec[col("precision")] != "fp32" {
            continue;
        }
        let arch = rec[col("arch")].to_string();
        if !["gpt2", "bert", "vit", "llama"].contains(&arch.as_str()) {
            continue;
        }
        let shape = ["b", "s", "h", "f", "a", "kv_heads", "L", "V"]
            .iter()
            .map(|k| rec[col(k)].parse::<u64>().unwrap())
            .collect();
        let drop = rec[col("attn_dropout")].parse::<f64>().unwrap() > 0.0;
        let act = Activation::from_name(&rec[col("activation")]).unwrap();
        let saved = rec[col("saved_bytes")].parse::<f64>().unwrap();
        groups
            .entry((arch, shape))
            .or_default()
            .push((drop, act, saved));
    }
    let mut checked = 0;
    for ((arch, shape), rows) in &groups {
        let (kind, default_drop, default_act) = match arch.as_str() {
            "gpt2" => (BlockKind::Gpt2, true, Activation::GeluNew),
            "bert" => (BlockKind::Bert, true, Activation::Gelu),
            "vit" => (BlockKind::Vit, false, Activation::Gelu),
            _ => (BlockKind::Llama, false, Activation::Silu),
        };
        let Some(&(_, _, base)) = rows
            .iter()
            .find(|r| r.0 == default_drop && r.1 == default_act)
        else {
            continue;
        };
        let c = mode
            .activation
            .blocks
            .iter()
            .find(|c| c.block == kind && c.attention == Attention::Eager)
            .unwrap();
        let [b, s, h, f, a, _, l, _]: [f64; 8] = std::array::from_fn(|i| shape[i] as f64);
        let act = |k: Activation| mode.activation.act_fns[&k].value;
        // CPU: each mask has the input's dtype (4 B), not CUDA's 1 byte
        let d = &c.dropout;
        let dropout_cpu = l * b * s * h * d.bsh * 4.0
            + l * b * a * s * s * (d.bas2 + 3.0)
            + b * s * h * d.bsh_once * 4.0;
        for &(drop, k, saved) in rows {
            let on = |x: bool| if x { 1.0 } else { 0.0 };
            let expected = (on(drop) - on(default_drop)) * dropout_cpu
                + l * b * s * f * (act(k) - act(default_act));
            assert_eq!(
                saved - base,
                expected,
                "{arch} {shape:?} dropout {drop} {k}: measured {saved} against default {base}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 150, "only {checked} rows checked");
}

/// Dropout 0 keeps no masks and a fused GELU keeps only its input: both plan fewer activation
/// bytes than GPT-2's defaults (dropout 0.1, the composed `gelu_new`), by exactly the block's
/// terms; a spec that leaves both unset plans exactly what the explicit defaults do.
#[test]
fn dropout_and_activation_change_gpt2_activation_bytes() {
    use vramcal::spec::transformer::{Activation, DropoutP};
    let lit = Coefficients::literature();
    let ModelSpec::Transformer(gpt2) = preset("gpt2").unwrap() else {
        panic!("gpt2 is a transformer")
    };
    let with = |dropout, activation| {
        let m = ModelSpec::Transformer(vramcal::spec::transformer::TransformerSpec {
            dropout,
            activation,
            ..gpt2.clone()
        });
        let t = TrainSpec {
            attention: Attention::Eager,
            ..train(4, 512)
        };
        memory::estimate(&m, &t, &lit).unwrap()
    };
    let default = with(None, None);
    assert_eq!(
        default,
        with(Some(DropoutP(0.1)), Some(Activation::GeluNew))
    );
    let no_dropout = with(Some(DropoutP(0.0)), None);
    let tanh = with(None, Some(Activation::GeluPytorchTanh));
    assert!(no_dropout.activations < default.activations);
    assert!(tanh.activations < default.activations);
    // GPT-2 small: 12 layers, h 768, f 3072, 12 heads; b 4, s 512; fp32 eager
    let (l, b, s, h, f, a) = (12.0, 4.0, 512.0, 768.0, 3072.0, 12.0);
    let dropout_bytes = l * b * s * h * 2.0 + l * b * a * s * s * 5.0 + b * s * h;
    let act_bytes = l * b * s * f * (16.0 - 4.0);
    assert_eq!(
        (default.activations - no_dropout.activations) as f64,
        dropout_bytes
    );
    assert_eq!((default.activations - tanh.activations) as f64, act_bytes);
}

/// sdpa's CPU math path (attention dropout on a CPU) keeps eager attention's b·a·s² tensors, in
/// fp32 for 16-bit inputs: planned as twice eager's score elements under fp16-mixed, plus fp32
/// copies of q, k and v, the same as eager in fp32, and with eager's measured block coefficients (PyTorch 2.15 CPU, tiny BERT
/// b4 s256 fp16-mixed: the math path peaked 38.1 MB, eager 22.9 MB).
#[test]
fn sdpas_cpu_math_path_plans_fp32_scores() {
    let model = preset("tiny-bert").unwrap();
    let plan = |attention, precision| {
        let t = TrainSpec {
            attention,
            precision,
            ..train(4, 256)
        };
        memory::features(&model, &t).unwrap()
    };
    for (precision, factor) in [(Precision::Fp16Mixed, 2.0), (Precision::Fp32, 1.0)] {
        let (math, eager) = (
            plan(Attention::Math, precision),
            plan(Attention::Eager, precision),
        );
        assert_eq!(math.bas2, factor * eager.bas2, "{precision}");
        assert!(eager.bas2 > 0.0);
        assert_eq!(math.fused_attention_bytes, 0.0);
        assert_eq!(math.block, eager.block);
        // and its fp32 copies of q, k and v: 4 layers · b·s · (128 + 2·128) · 2 bytes in fp16
        let qkv = if factor > 1.0 {
            4.0 * 4.0 * 256.0 * 384.0 * 2.0
        } else {
            0.0
        };
        assert_eq!(math.math_upcast_bytes, qkv, "{precision}");
        assert_eq!(eager.math_upcast_bytes, 0.0);
    }
    assert_eq!(Attention::Math.score_upcast(2), 2.0);
    assert_eq!(Attention::Eager.score_upcast(2), 1.0);
    assert_eq!(Attention::Sdpa.score_upcast(2), 1.0);
}
