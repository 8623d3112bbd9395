//! What PyTorch keeps on a CPU, against the literature table's CPU blocks and the per-feature
//! path's activation-function bytes. The truth is calibration/data/torch-saved-bytes-cpu.csv:
//! saved-for-backward bytes of transformers' own model classes, deduplicated by storage
//! (scripts/torch_saved_bytes.py), measured independently of the planner.

use std::collections::HashMap;
use std::path::Path;
use vramcal::coeffs::Coefficients;
use vramcal::plan::memory;
use vramcal::spec::presets::preset;
use vramcal::spec::transformer::{Activation, BlockKind, DropoutP};
use vramcal::spec::{Attention, Family, ModelSpec, Precision, TrainSpec};

/// The saved-bytes CSV as (column name -> value) maps, one per row.
fn saved_rows() -> Vec<HashMap<String, String>> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/data/torch-saved-bytes-cpu.csv");
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let headers = rdr.headers().unwrap().clone();
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            headers
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn num(r: &HashMap<String, String>, k: &str) -> f64 {
    r[k].parse().unwrap_or_else(|_| panic!("{k} = {:?}", r[k]))
}

/// The literature's `cpu_blocks` reproduce PyTorch's CPU saved bytes for GPT-2, BERT (pooler)
/// and the Llama family (Llama, Mistral, Qwen2), eager and sdpa, fp32 and 16-bit autocast, at
/// the architecture's default activation and every dropout the rows were measured with, within
/// 2 % at batch >= 2 (the blocks leave out a few per-sequence tensors: position ids, RoPE
/// tables). sdpa rows with attention dropout ran the math path, planned with the eager block;
/// the 16-bit math path (fp32 scores) and ViT (its pixel batch is `c_input`) are left out.
#[test]
fn cpu_blocks_reproduce_pytorchs_cpu_saved_bytes() {
    let lit = Coefficients::literature();
    let mut checked = HashMap::<(String, String, String), usize>::new();
    for r in saved_rows() {
        let arch = r["arch"].as_str();
        let (kind, default_act) = match arch {
            "gpt2" => (BlockKind::Gpt2, "gelu_new"),
            "bert" => (BlockKind::Bert, "gelu"),
            "llama" | "mistral" | "qwen2" => (BlockKind::Llama, "silu"),
            _ => continue,
        };
        if num(&r, "b") < 2.0 || r["activation"] != default_act {
            continue;
        }
        let precision = match r["precision"].as_str() {
            "fp32" => Precision::Fp32,
            "bf16-autocast" => Precision::Bf16Mixed,
            _ => continue,
        };
        let attn_dropout = num(&r, "attn_dropout") > 0.0;
        let dropout = attn_dropout || num(&r, "hidden_dropout") > 0.0;
        let mut attention: Attention = r["attention"].parse().unwrap();
        if attention == Attention::Sdpa && attn_dropout {
            if precision != Precision::Fp32 {
                continue;
            }
            attention = Attention::Eager; // the math path keeps eager's tensors in fp32
        }
        let mode = lit.mode(Family::Transformer, precision);
        let c = mode
            .activation
            .cpu_blocks
            .iter()
            .find(|c| c.block == kind && c.attention == attention)
            .unwrap_or_else(|| panic!("no CPU block {kind:?} {attention:?} in {precision}"));
        let act = mode.activation.act_fns[&Activation::from_name(default_act).unwrap()].value;
        let (b, s, h, f, a) = (
            num(&r, "b"),
            num(&r, "s"),
            num(&r, "h"),
            num(&r, "f"),
            num(&r, "a"),
        );
        let (kv, d, l) = (num(&r, "kv_heads"), num(&r, "head_dim"), num(&r, "L"));
        let on = if dropout { 1.0 } else { 0.0 };
        let per_layer = (c.bsh + on * c.dropout.bsh) * b * s * h
            + (c.bsf + act) * b * s * f
            + (c.bas2 + on * c.dropout.bas2) * b * a * s * s
            + c.bas * b * a * s
            + c.bskv * b * s * kv * d
            + c.bs * b * s;
        // the head: an LM's b·s·V logits, BERT's pooler output b·h
        let head = if kind == BlockKind::Bert {
            b * h
        } else {
            b * s * num(&r, "V")
        };
        let predicted = l * per_layer
            + (c.bsh_once + on * c.dropout.bsh_once) * b * s * h
            + c.bs_once * b * s
            + c.bsv * head;
        let measured = num(&r, "saved_bytes");
        let err = (predicted - measured).abs() / measured;
        assert!(
            err < 0.02,
            "{arch} {} {} dropout {dropout} b{b} s{s} h{h} L{l}: planned {predicted}, measured {measured}",
            r["attention"],
            r["precision"]
        );
        *checked
            .entry((arch.into(), r["attention"].clone(), r["precision"].clone()))
            .or_default() += 1;
    }
    // fp16-mixed's CPU blocks are the bf16-autocast ones measured (one CPU autocast op list)
    let blocks = |p| lit.mode(Family::Transformer, p).activation.cpu_blocks;
    assert_eq!(blocks(Precision::Fp16Mixed), blocks(Precision::Bf16Mixed));
    // every architecture, attention and precision above, each over its measured shapes
    assert_eq!(checked.len(), 5 * 2 * 2, "{checked:?}");
    assert!(checked.values().all(|n| *n >= 15), "{checked:?}");
}

/// Without a measured block (the per-feature path) the MLP activation's own bytes still count:
/// for the same shape, PyTorch's measured saved bytes under GPT-2's composed `gelu_new` exceed
/// exact GELU's by exactly what the per-feature plan adds (GPT-2 blocks, fp32, eager), and a
/// SwiGLU block with `gelu_new` in place of SiLU likewise (Llama blocks).
#[test]
fn per_feature_plans_add_the_measured_activation_bytes() {
    let mut per_feature = Coefficients::literature();
    for m in &mut per_feature.modes {
        m.activation.blocks.clear();
    }
    // (arch, shape, dropout) -> activation -> saved bytes
    let mut by_shape: HashMap<(String, Vec<u64>, String), HashMap<String, f64>> = HashMap::new();
    for r in saved_rows() {
        if r["precision"] != "fp32" || r["attention"] != "eager" {
            continue;
        }
        if !["gpt2", "llama"].contains(&r["arch"].as_str()) {
            continue;
        }
        let shape = ["b", "s", "h", "f", "a", "kv_heads", "L", "V"]
            .iter()
            .map(|k| num(&r, k) as u64)
            .collect();
        by_shape
            .entry((r["arch"].clone(), shape, r["attn_dropout"].clone()))
            .or_default()
            .insert(r["activation"].clone(), num(&r, "saved_bytes"));
    }
    let mut checked = 0;
    for ((arch, shape, _), acts) in &by_shape {
        let base_act = if arch == "gpt2" { "gelu" } else { "silu" };
        let (Some(with), Some(base)) = (acts.get("gelu_new"), acts.get(base_act)) else {
            continue;
        };
        let [b, s, h, f, a, kv, l, v] = shape[..] else {
            unreachable!()
        };
        let ModelSpec::Transformer(t) =
            preset(if arch == "gpt2" { "gpt2" } else { "llama2-7b" }).unwrap()
        else {
            panic!("transformer presets")
        };
        let plan = |act: &str| {
            let m = ModelSpec::Transformer(vramcal::spec::transformer::TransformerSpec {
                layers: l,
                hidden: h,
                heads: a,
                kv_heads: kv,
                ffn: f,
                vocab: v,
                dropout: Some(DropoutP(0.0)),
                activation: Some(Activation::from_name(act).unwrap()),
                ..t.clone()
            });
            let train = TrainSpec {
                batch: b,
                seq: s,
                attention: Attention::Eager,
                ..TrainSpec::default()
            };
            memory::estimate(&m, &train, &per_feature)
                .unwrap()
                .activations as f64
        };
        let planned = plan("gelu_new") - plan(base_act);
        assert!(
            (planned - (with - base)).abs() <= 1.0,
            "{arch} {shape:?}: planned +{planned}, measured +{}",
            with - base
        );
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} shapes checked");
}
