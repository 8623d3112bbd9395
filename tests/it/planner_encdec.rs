//! Encoder-decoder models (T5, mT5, BART) in the planner: both stacks at their own lengths, the
//! decoder's cross-attention over the encoder's tokens, `--target-seq`, and the refusals.
//! Expected values are written from the architecture by hand, not from the planner.

use crate::common::vramcal;
use std::path::Path;
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
