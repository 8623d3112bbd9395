//! `vramcal estimate --safetensors`: counts from the headers of files written here (header plus
//! zero bytes, the format's layout) and of one written by transformers' `save_pretrained`, the
//! cross-check against the config.json beside it, and the counts-only answer without one.

use crate::common::vramcal;
use std::path::Path;

/// Writes a safetensors file of F32 tensors (name, shape): header, then zero-filled data.
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<u64>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, shape) in tensors {
        let n = shape.iter().product::<u64>() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.resize(bytes.len() + off as usize, 0);
    std::fs::write(path, bytes).unwrap();
}

/// A tiny Llama as transformers names its tensors: hidden 8, 2 heads, 1 KV head (head 4),
/// FFN 12, vocab 10, 2 blocks, tied embeddings.
const CONFIG: &str = r#"{"model_type":"llama","hidden_size":8,"intermediate_size":12,
    "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":10,
    "rms_norm_eps":1e-6,"tie_word_embeddings":true}"#;

fn llama_tensors(blocks: u64) -> Vec<(String, Vec<u64>)> {
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![10, 8]),
        ("model.norm.weight".to_string(), vec![8]),
    ];
    for i in 0..blocks {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![8, 8]),
            ("self_attn.k_proj.weight", vec![4, 8]),
            ("self_attn.v_proj.weight", vec![4, 8]),
            ("self_attn.o_proj.weight", vec![8, 8]),
            ("mlp.gate_proj.weight", vec![12, 8]),
            ("mlp.up_proj.weight", vec![12, 8]),
            ("mlp.down_proj.weight", vec![8, 12]),
            ("input_layernorm.weight", vec![8]),
            ("post_attention_layernorm.weight", vec![8]),
        ] {
            t.push((format!("{p}.{n}"), s));
        }
    }
    t
}

fn as_refs(t: &[(String, Vec<u64>)]) -> Vec<(&str, Vec<u64>)> {
    t.iter().map(|(n, s)| (n.as_str(), s.clone())).collect()
}

/// Hand count of the tiny Llama: embedding 80, final norm 8, per block attention
/// 64+32+32+64 = 192, MLP 3 x 96 = 288, norms 16.
const TINY_LLAMA: u64 = 80 + 8 + 2 * (192 + 288 + 16);

fn checkpoint_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["estimate", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = vramcal(&all);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["checkpoint"].clone()
}

#[test]
fn transformers_written_checkpoint_matches_its_config() {
    // tests/checkpoints/llama-tiny: LlamaForCausalLM saved by save_pretrained in bf16
    // (scripts/make_safetensors_fixture.py); transformers counted 6,480 parameters
    let ck = checkpoint_json(&[
        "--safetensors",
        "tests/checkpoints/llama-tiny/model.safetensors",
    ]);
    assert_eq!(ck["params"], 6480);
    assert_eq!(ck["config_params"], 6480);
    assert_eq!(ck["matches_config"], true);
    assert_eq!(ck["by_dtype"][0]["dtype"], "BF16");
    assert_eq!(ck["by_dtype"][0]["bytes"], 2 * 6480);
}

#[test]
fn tied_head_stored_twice_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let mut t = llama_tensors(2);
    t.push(("lm_head.weight".into(), vec![10, 8]));
    let st = dir.path().join("model.safetensors");
    write_safetensors(&st, &as_refs(&t));
    let ck = checkpoint_json(&["--safetensors", st.to_str().unwrap()]);
    assert_eq!(ck["params"], TINY_LLAMA);
    assert_eq!(ck["matches_config"], true);
    assert!(ck["tied_duplicates"][0]
        .as_str()
        .unwrap()
        .starts_with("lm_head.weight"));
}

#[test]
fn a_differing_block_is_named_with_its_tensors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    // block 1 lacks its up projection, and a third block the config does not have
    let t: Vec<_> = llama_tensors(3)
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    let st = dir.path().join("model.safetensors");
    write_safetensors(&st, &as_refs(&t));
    let ck = checkpoint_json(&["--safetensors", st.to_str().unwrap()]);
    assert_eq!(ck["params"], TINY_LLAMA + 496 - 96);
    assert_eq!(ck["config_params"], TINY_LLAMA);
    assert_eq!(ck["matches_config"], false);
    let diffs: Vec<&str> = ck["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(diffs.len(), 2, "{diffs:?}");
    assert!(diffs[0].starts_with("block model.layers.1: 400 parameters in the checkpoint, 496 from the config; its tensors: "), "{}", diffs[0]);
    assert!(
        !diffs[0].contains("up_proj")
            && diffs[0].contains("model.layers.1.mlp.gate_proj.weight [12, 8] F32")
    );
    assert_eq!(diffs[1], "3 blocks in the checkpoint, 2 in the config");
}

#[test]
fn sharded_index_reads_every_shard_and_plans_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let t = llama_tensors(2);
    let (a, b) = t.split_at(7);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write_safetensors(&dir.path().join(names[0]), &as_refs(a));
    write_safetensors(&dir.path().join(names[1]), &as_refs(b));
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|(n, _)| (n.clone(), names[0].into()))
        .chain(b.iter().map(|(n, _)| (n.clone(), names[1].into())))
        .collect();
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, serde_json::json!({"weight_map": map}).to_string()).unwrap();
    let (code, out, err) = vramcal(&[
        "estimate",
        "--json",
        "--safetensors",
        index.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checkpoint"]["files"].as_array().unwrap().len(), 2);
    assert_eq!(v["checkpoint"]["params"], TINY_LLAMA);
    assert_eq!(v["params"], TINY_LLAMA);
    assert_eq!(v["checkpoint"]["matches_config"], true);
}

#[test]
fn without_a_supported_config_the_counts_are_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("model.safetensors");
    write_safetensors(&st, &[("w", vec![3, 7]), ("b", vec![7])]);
    let (code, out, err) = vramcal(&["estimate", "--safetensors", st.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("parameters                   28\n"), "{out}");
    assert!(
        out.contains("no config.json beside the checkpoint"),
        "{out}"
    );
    // an architecture the planner does not know: the counts, and why there is no plan
    std::fs::write(dir.path().join("config.json"), r#"{"model_type":"mamba"}"#).unwrap();
    let ck = checkpoint_json(&["--safetensors", st.to_str().unwrap()]);
    assert_eq!(ck["params"], 28);
    assert!(ck["no_plan"]
        .as_str()
        .unwrap()
        .starts_with("no memory plan: 'mamba' is not supported; accepted bert"));
}

#[test]
fn checkpoint_input_errors_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("model.safetensors");
    write_safetensors(&st, &[("w", vec![4, 4])]);
    let full = std::fs::read(&st).unwrap();
    std::fs::write(&st, &full[..full.len() - 4]).unwrap();
    let (code, _, err) = vramcal(&["estimate", "--safetensors", st.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("invalid safetensors: ") && err.contains("truncated"),
        "{err}"
    );
    let (code, _, err) = vramcal(&["estimate", "--safetensors", "no/such/model.safetensors"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid safetensors: no/such/model.safetensors cannot be read"),
        "{err}"
    );
}

/// tests/hf_configs/qwen2-moe-tiny-mixed as transformers names a checkpoint's tensors on disk
/// (one tensor per expert): hidden 64, q 64 and k/v 32 wide with biases, blocks 0, 2, 3, 4 dense
/// (MLP 96), block 1 MoE (4 experts of 32, router, shared expert 48 with its gate).
fn qwen2_moe_tensors() -> Vec<(String, Vec<u64>)> {
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![100, 64]),
        ("model.norm.weight".to_string(), vec![64]),
    ];
    for i in 0..5 {
        let p = format!("model.layers.{i}");
        let mut add = |n: &str, s: Vec<u64>| t.push((format!("{p}.{n}"), s));
        for (n, out) in [("q", 64), ("k", 32), ("v", 32)] {
            add(&format!("self_attn.{n}_proj.weight"), vec![out, 64]);
            add(&format!("self_attn.{n}_proj.bias"), vec![out]);
        }
        add("self_attn.o_proj.weight", vec![64, 64]);
        add("input_layernorm.weight", vec![64]);
        add("post_attention_layernorm.weight", vec![64]);
        let mlp = |add: &mut dyn FnMut(&str, Vec<u64>), prefix: &str, f: u64| {
            add(&format!("{prefix}.gate_proj.weight"), vec![f, 64]);
            add(&format!("{prefix}.up_proj.weight"), vec![f, 64]);
            add(&format!("{prefix}.down_proj.weight"), vec![64, f]);
        };
        if i == 1 {
            add("mlp.gate.weight", vec![4, 64]);
            for e in 0..4 {
                mlp(&mut add, &format!("mlp.experts.{e}"), 32);
            }
            mlp(&mut add, "mlp.shared_expert", 48);
            add("mlp.shared_expert_gate.weight", vec![1, 64]);
        } else {
            mlp(&mut add, "mlp", 96);
        }
    }
    t
}

#[test]
fn moe_checkpoint_blocks_are_checked_against_dense_and_moe_blocks() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        "tests/hf_configs/qwen2-moe-tiny-mixed/config.json",
        dir.path().join("config.json"),
    )
    .unwrap();
    let st = dir.path().join("model.safetensors");
    write_safetensors(&st, &as_refs(&qwen2_moe_tensors()));
    // transformers' count of the config (tests/param_counts.rs)
    let ck = checkpoint_json(&["--safetensors", st.to_str().unwrap()]);
    assert_eq!(ck["params"], 177_024);
    assert_eq!(ck["matches_config"], true);
    // without the shared expert's gate, the MoE block is 64 short and is the one named
    let t: Vec<_> = qwen2_moe_tensors()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("shared_expert_gate.weight"))
        .collect();
    write_safetensors(&st, &as_refs(&t));
    let ck = checkpoint_json(&["--safetensors", st.to_str().unwrap()]);
    let diffs = ck["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    let d = diffs[0].as_str().unwrap();
    assert!(d.starts_with("block model.layers.1: "), "{d}");
}

#[test]
fn unknown_architecture_points_to_safetensors_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"model_type":"mamba","hidden_size":768}"#).unwrap();
    let (code, _, err) = vramcal(&["estimate", "--hf-config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "error: invalid config.json model_type: 'mamba' is not supported; accepted bert, "
        ) && err.contains(&format!(
            "{} (for any other checkpoint, `--safetensors` counts its parameters",
            vramcal::spec::hf_config::MODEL_TYPES
        )),
        "{err}"
    );
}
