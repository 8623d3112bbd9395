//! Encoder-decoder models (T5, mT5, BART) in the planner: both stacks at their own lengths, the
//! decoder's cross-attention over the encoder's tokens, `--target-seq`, and the refusals.
//! Expected values are written from the architecture by hand, not from the planner.

use crate::common::vramcal;
use std::path::Path;
use vramcal::plan::encdec_saved::{self, Kernels};
use vramcal::plan::memory::features;
use vramcal::spec::{hf_config, Attention, ModelSpec, TrainSpec};

fn t5_small(target: u64) -> ModelSpec {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_configs/t5-small/config.json");
    let mut t = hf_config::load(&p).unwrap();
    let mut e = *t.extras.enc_dec.take().unwrap();
    e.target_seq = target;
    t.extras.enc_dec = Some(Box::new(e));
    ModelSpec::Transformer(t)
}

#[test]
fn both_stacks_and_cross_attention_at_their_lengths() {
    // t5-small: 6 + 6 blocks, 8 heads, d_model 512 (q width 8 x 64), vocab 32128
    let train = TrainSpec {
        batch: 2,
        seq: 64,
        attention: Attention::Eager,
        ..TrainSpec::default()
    };
    let f = features(&t5_small(16), &train).unwrap();
    // scores: encoder self 64 x 64, decoder self 16 x 16, cross 16 x 64, per block and head
    let (b, a) = (2.0, 8.0);
    assert_eq!(
        f.bas2,
        6.0 * b * a * (64.0 * 64.0 + 16.0 * 16.0 + 16.0 * 64.0)
    );
    // the LM head over the 16 decoder tokens only
    assert_eq!(f.bsv, b * 16.0 * 32128.0);
    // cross-attention per decoder block, fp32: norm output, q, context over 16 tokens
    // (512 + 2 x 512 wide), k and v over the 64 encoder tokens; the encoder output once
    let per_block = 16.0 * (512.0 + 2.0 * 512.0) + 2.0 * 64.0 * 512.0;
    assert_eq!(
        f.cross_attention_bytes,
        (6.0 * b * per_block + b * 64.0 * 512.0) * 4.0
    );
    // the h-wide features of the stacks scale with their own lengths
    let longer = features(&t5_small(32), &train).unwrap();
    let enc_only = features(&t5_small(16), &train).unwrap().bsh - 6.0 * b * 16.0 * 512.0;
    assert_eq!(longer.bsh, enc_only + 6.0 * b * 32.0 * 512.0);
    // target 0 means the encoder's length
    let same = features(&t5_small(0), &train).unwrap();
    assert_eq!(same.bsv, b * 64.0 * 32128.0);
}

#[test]
fn target_seq_flag_and_refusals() {
    let bart = "tests/hf_configs/bart-base/config.json";
    let (code, out, err) = vramcal(&[
        "estimate",
        "--hf-config",
        bart,
        "--seq",
        "256",
        "--target-seq",
        "64",
        "--json",
        "--no-gpu-choice",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["params"], 139_420_416u64);
    assert_eq!(
        v["block"]["table"], "bart",
        "planned from the measured table"
    );
    let cases: &[(&[&str], &str)] = &[
        (
            &["--hf-config", bart, "--target-seq", "2000"],
            "error: invalid target-seq: 2000 exceeds the model's 1024 learned positions; accepted 1..=1024",
        ),
        (
            &["--model", "gpt2", "--target-seq", "64"],
            "error: invalid target-seq: gpt2 has no decoder stack; accepted with a T5, mT5 or BART config",
        ),
        (
            &["--hf-config", bart, "--finetune", "lora"],
            "error: invalid finetune: is not modelled for encoder-decoder models; accepted full fine-tuning of every block",
        ),
        (
            &["--hf-config", "tests/hf_configs/mixtral-8x7b/config.json", "--freeze-layers", "2"],
            "error: invalid freeze-layers: is not modelled for mixture-of-experts models; accepted full fine-tuning of every block",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["estimate"];
        all.extend_from_slice(args);
        let (code, _, err) = vramcal(&all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim(), *want, "{args:?}");
    }
}

/// The measured encoder-decoder rows (scripts/torch_saved_bytes.py --arch t5|t5-gated|bart).
fn measured_rows() -> Vec<std::collections::HashMap<String, String>> {
    crate::common::data_rows("torch-saved-bytes-encdec-cpu.csv")
}

use crate::common::{row_num as num, saved_row_train as row_train};

/// The row's model through the HF config parser, as a user's config.json would reach the planner,
/// with the row's decoder length.
fn row_model(r: &std::collections::HashMap<String, String>) -> ModelSpec {
    let n = |k: &str| num(r, k) as u64;
    let (h, f, a, hd, l, ld, v) = (
        n("h"),
        n("f"),
        n("a"),
        n("head_dim"),
        n("L"),
        n("decoder_layers"),
        n("V"),
    );
    let p = num(r, "hidden_dropout");
    let config = match r["arch"].as_str() {
        "t5" | "t5-gated" => serde_json::json!({"model_type": "t5", "d_model": h, "d_kv": hd,
            "d_ff": f, "num_layers": l, "num_decoder_layers": ld, "num_heads": a, "vocab_size": v,
            "feed_forward_proj": if r["arch"] == "t5" { "relu" } else { "gated-gelu" },
            "dropout_rate": p, "tie_word_embeddings": true}),
        "bart" => serde_json::json!({"model_type": "bart", "d_model": h, "encoder_layers": l,
            "decoder_layers": ld, "encoder_attention_heads": a, "decoder_attention_heads": a,
            "encoder_ffn_dim": f, "decoder_ffn_dim": f, "vocab_size": v,
            "max_position_embeddings": 1024, "dropout": p, "attention_dropout": p,
            "activation_dropout": p, "activation_function": "gelu"}),
        other => panic!("unexpected arch {other}"),
    };
    let mut t = hf_config::parse(&config.to_string(), &r["arch"]).unwrap();
    let mut e = *t.extras.enc_dec.take().unwrap();
    e.target_seq = n("target_len");
    t.extras.enc_dec = Some(Box::new(e));
    ModelSpec::Transformer(t)
}

/// What the row's model keeps by the measured table, with the CPU's or CUDA's kernels.
fn table_bytes(r: &std::collections::HashMap<String, String>, k: Kernels) -> f64 {
    let ModelSpec::Transformer(t) = row_model(r) else {
        unreachable!()
    };
    let e = t.extras.enc_dec.as_deref().unwrap();
    let s = encdec_saved::saved(&t, e, &row_train(r), k).expect("a measured family");
    s.once + s.head + s.blocks
}

/// Rows whose CPU attention the table describes: eager; BART's sdpa at dropout 0 (the CPU's
/// flash kernel); sdpa with dropout in fp32 (the CPU falls back to the math path, eager's bytes).
/// Left out: T5's sdpa at dropout 0 (the CPU runs its flash kernel on some of T5's masked
/// attentions and the math path on others) and 16-bit sdpa with dropout (the math path's fp32
/// upcasts, a CPU-only cost the planner's CUDA plan does not have).
fn described_on_cpu(r: &std::collections::HashMap<String, String>) -> bool {
    let dropout = num(r, "hidden_dropout") > 0.0;
    match (r["attention"].as_str(), r["arch"].as_str()) {
        ("eager", _) => true,
        ("sdpa", "bart") if !dropout => true,
        ("sdpa", _) => dropout && r["precision"] == "fp32",
        _ => false,
    }
}

/// The measured table reproduces every shape PyTorch was measured at (T5 and FLAN-T5's gated
/// MLP, BART; fp32, bf16 autocast and pure bf16; dropout 0 and 0.1; encoder and decoder depth
/// and length moved apart), through the HF config parser: eager within 0.1 % at batch >= 2, and
/// 0.5 % at batch 1 (a few reshapes are views there) and through sdpa.
#[test]
fn measured_encoder_decoders_reproduce_pytorch_on_a_cpu() {
    let rows = measured_rows();
    let mut checked = std::collections::BTreeMap::<String, (usize, f64)>::new();
    for r in rows.iter().filter(|r| described_on_cpu(r)) {
        let err = table_bytes(r, Kernels::Cpu) / num(r, "saved_bytes") - 1.0;
        // the math path's causal-mask conditions and per-layer mask copies: 0.3 %
        let tol = if num(r, "b") < 2.0 || r["attention"] == "sdpa" {
            5e-3
        } else {
            1e-3
        };
        let key = format!(
            "{} {} {} {}",
            r["arch"], r["attention"], r["precision"], r["hidden_dropout"]
        );
        assert!(
            err.abs() <= tol,
            "{key} {:?}: {err:+.4} {}",
            r,
            table_bytes(r, Kernels::Cpu)
        );
        let e = checked.entry(key).or_insert((0, 0.0));
        *e = (e.0 + 1, e.1.max(err.abs()));
    }
    for (k, (n, worst)) in &checked {
        eprintln!("{k}: {n} rows, worst {:.3} %", 100.0 * worst);
    }
    // every family x precision x dropout eager; BART sdpa at dropout 0; fp32 sdpa with dropout
    assert_eq!(checked.len(), 3 * 3 * 2 + 3 + 3, "{checked:?}");
}

/// The whole plan (parser, features, activation bytes) for CUDA against PyTorch's CPU bytes where
/// the two devices keep the same (fp32, eager, dropout 0: no masks, fp32 softmax on both), and,
/// under bf16 autocast, apart by exactly the scores CUDA's fp32 softmax keeps where the CPU's
/// stays 16-bit (T5's cross-attention; BART's encoder self-attention and cross-attention, which
/// no fp32 mask promotes): 4 more bytes per score.
#[test]
fn the_cuda_plan_departs_from_the_cpu_measurement_only_by_named_kernel_differences() {
    let lit = vramcal::coeffs::Coefficients::literature();
    let mut n = 0;
    for r in measured_rows()
        .iter()
        .filter(|r| r["attention"] == "eager" && num(r, "hidden_dropout") == 0.0)
        .filter(|r| num(r, "b") >= 2.0 && r["precision"] != "bf16")
    {
        let train = row_train(r);
        let model = row_model(r);
        let fe = features(&model, &train).unwrap();
        let act = lit
            .mode(vramcal::spec::Family::Transformer, train.precision)
            .activation;
        let planned = fe.resident_bytes(&act);
        let (b, a, s, t) = (num(r, "b"), num(r, "a"), num(r, "s"), num(r, "target_len"));
        let (l, ld) = (num(r, "L"), num(r, "decoder_layers"));
        let cuda_softmax = match (r["precision"].as_str(), r["arch"].as_str()) {
            ("fp32", _) => 0.0,
            (_, "bart") => 4.0 * b * a * (l * s * s + ld * t * s),
            _ => 4.0 * b * a * ld * t * s,
        };
        let want = num(r, "saved_bytes") + cuda_softmax;
        assert!(
            (planned / want - 1.0).abs() < 1e-3,
            "{r:?}: planned {planned}, want {want}"
        );
        n += 1;
    }
    // fp32 and autocast rows at b >= 2: 35 per T5 group, 33 per BART group
    assert_eq!(n, 2 * (35 + 35 + 33), "rows checked");
}

/// CUDA's 1-byte masks keep less than the CPU's dtype-sized ones, and dropout keeps more than
/// none on both.
#[test]
fn dropout_masks_cost_less_on_cuda_than_on_a_cpu() {
    for r in measured_rows()
        .iter()
        .filter(|r| r["attention"] == "eager" && num(r, "hidden_dropout") > 0.0)
    {
        let (cpu, cuda) = (table_bytes(r, Kernels::Cpu), table_bytes(r, Kernels::Cuda));
        let bf16_softmax = r["precision"] == "bf16-autocast";
        // under autocast CUDA's fp32 softmax can outweigh the masks it saves
        assert!(bf16_softmax || cuda < cpu, "{r:?}: {cuda} vs {cpu}");
        let mut off = r.clone();
        off.insert("hidden_dropout".into(), "0.0".into());
        assert!(table_bytes(&off, Kernels::Cuda) < cuda, "{r:?}");
    }
}
