//! DeBERTa-v2/v3 with relative (disentangled) attention in the planner: PyTorch's measured
//! saved bytes (`plan::deberta_saved`) against the rows they were measured from and rows held
//! out at a real checkpoint's widths, through the HF config parser.

use std::collections::HashMap;
use vramcal::plan::deberta_saved;
use vramcal::plan::measured::Kernels;
use vramcal::plan::memory::features;
use vramcal::spec::{hf_config, Attention, ModelSpec, Precision, TrainSpec};

use crate::common::{row_num as num, saved_row_train as row_train};

/// DeBERTa-v3's config.json keys at the row's sizes.
fn row_model(r: &HashMap<String, String>) -> ModelSpec {
    let n = |k: &str| num(r, k) as u64;
    let p = num(r, "hidden_dropout");
    let config = serde_json::json!({"model_type": "deberta-v2", "hidden_size": n("h"),
        "num_hidden_layers": n("L"), "num_attention_heads": n("a"),
        "intermediate_size": n("f"), "vocab_size": n("V"), "max_position_embeddings": 512,
        "relative_attention": true, "pos_att_type": ["p2c", "c2p"],
        "position_buckets": n("position_buckets"), "norm_rel_ebd": "layer_norm",
        "share_att_key": true, "position_biased_input": false, "max_relative_positions": -1,
        "hidden_dropout_prob": p, "attention_probs_dropout_prob": p, "hidden_act": "gelu",
        "type_vocab_size": 0});
    ModelSpec::Transformer(hf_config::parse(&config.to_string(), "deberta").unwrap())
}

fn table_bytes(r: &HashMap<String, String>, k: Kernels) -> f64 {
    let ModelSpec::Transformer(t) = row_model(r) else {
        unreachable!()
    };
    let s = deberta_saved::saved(&t, &row_train(r), k).expect("relative attention");
    s.once + s.head + s.blocks
}

/// Every measured shape (fp32, bf16 autocast, pure bf16; dropout 0 and 0.1) within 0.05 % at
/// batch >= 2 and 0.5 % at batch 1, and DeBERTa-v3-small's widths (vocabulary 128,100, held out
/// of the fit) within 0.05 %.
#[test]
fn deberta_v3_reproduces_pytorchs_saved_bytes_on_a_cpu() {
    let rows = crate::common::data_rows("torch-saved-bytes-deberta-cpu.csv");
    let mut groups = std::collections::BTreeMap::<String, usize>::new();
    let mut held_out = 0;
    for r in &rows {
        let err = table_bytes(r, Kernels::Cpu) / num(r, "saved_bytes") - 1.0;
        let tol = if num(r, "b") >= 2.0 { 5e-4 } else { 5e-3 };
        assert!(err.abs() <= tol, "{r:?}: {err:+.5}");
        held_out += usize::from(num(r, "V") > 1024.0);
        *groups
            .entry(format!("{} {}", r["precision"], r["hidden_dropout"]))
            .or_default() += 1;
    }
    assert_eq!(groups.len(), 6, "{groups:?}");
    assert_eq!(held_out, 3, "DeBERTa-v3-small in three precisions");
}

/// The whole plan through the parser: DeBERTa is planned from its table (not the generic
/// coefficients), for CUDA: where the devices keep the same (fp32, no dropout) it equals
/// PyTorch's CPU bytes; under sdpa it is planned eager, as transformers runs it.
#[test]
fn deberta_plans_use_the_table_and_run_eager() {
    let lit = vramcal::coeffs::Coefficients::literature();
    let rows = crate::common::data_rows("torch-saved-bytes-deberta-cpu.csv");
    let mut n = 0;
    for r in rows
        .iter()
        .filter(|r| r["precision"] == "fp32" && num(r, "hidden_dropout") == 0.0)
        .filter(|r| num(r, "b") >= 2.0)
    {
        let model = row_model(r);
        let act = lit
            .mode(vramcal::spec::Family::Transformer, Precision::Fp32)
            .activation;
        let mut planned = [0.0; 2];
        for (i, attention) in [Attention::Eager, Attention::Sdpa].into_iter().enumerate() {
            let train = TrainSpec {
                attention,
                ..row_train(r)
            };
            let fe = features(&model, &train).unwrap();
            assert!(fe.measured_saved.is_some());
            planned[i] = fe.activation_bytes(&act);
        }
        assert_eq!(planned[0], planned[1], "sdpa is planned eager");
        let saved = features(&model, &row_train(r))
            .unwrap()
            .resident_bytes(&act);
        let err = saved / num(r, "saved_bytes") - 1.0;
        assert!(err.abs() < 5e-4, "{r:?}: {err:+.5}");
        n += 1;
    }
    assert!(n >= 30, "{n} rows");
}

/// The estimate says why an sdpa request is planned eager, and plans it the same as eager.
#[test]
fn an_sdpa_request_for_deberta_is_planned_eager_and_says_so() {
    let config = "tests/hf_configs/deberta-v3-base/config.json";
    let run = |attention: &str| {
        let (code, out, err) = crate::common::vramcal(&[
            "estimate",
            "--hf-config",
            config,
            "--batch",
            "8",
            "--seq",
            "512",
            "--attention",
            attention,
            "--json",
            "--no-gpu-choice",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let (sdpa, eager) = (run("sdpa"), run("eager"));
    assert!(eager["memory"]["activations"].as_u64().unwrap() > 0);
    assert_eq!(
        sdpa["memory"]["activations"], eager["memory"]["activations"],
        "same plan"
    );
    assert_eq!(sdpa["block"]["table"], "deberta-v3");
    let notes = sdpa["notes"].to_string();
    assert!(notes.contains("no sdpa attention"), "{notes}");
    assert!(!eager["notes"].to_string().contains("no sdpa attention"));
}
