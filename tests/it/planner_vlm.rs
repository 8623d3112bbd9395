//! Vision-language models in the planner: the language model's bytes plus the vision tower's
//! (planned as the measured block it is built like, at `batch x images` samples), against
//! PyTorch's saved-for-backward bytes of transformers' own Gemma3ForConditionalGeneration,
//! LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration,
//! Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration and
//! Mistral3ForConditionalGeneration on a CPU (calibration/data/torch-saved-bytes-vlm-cpu.csv,
//! scripts/torch_saved_bytes.py --arch gemma3-vlm --arch llava --arch qwen2-vl --arch
//! qwen2.5-vl --arch qwen3-vl --arch mistral3), each row's config going through the HF parser
//! as a user's would.

use std::collections::HashMap;
use vramcal::coeffs::Coefficients;
use vramcal::plan::memory;
use vramcal::spec::{hf_config, ModelSpec, Precision};

use crate::common::{cpu_activation, row_num as num, saved_row_train};

/// The row's model as a config.json: `vision` holds tower layers / width / MLP / heads / image
/// side / images per sample / Gemma 3's pooled tokens per image; patches are 4 pixels.
fn row_model(r: &HashMap<String, String>) -> ModelSpec {
    let n = |k: &str| num(r, k) as u64;
    let v: Vec<u64> = r["vision"].split('/').map(|x| x.parse().unwrap()).collect();
    let [layers, width, ffn, heads, image, images, pooled] = v[..] else {
        panic!("vision = {:?}", r["vision"])
    };
    let text = serde_json::json!({"vocab_size": n("V"), "hidden_size": n("h"),
        "intermediate_size": n("f"), "num_hidden_layers": n("L"),
        "num_attention_heads": n("a"), "num_key_value_heads": n("kv_heads"),
        "max_position_embeddings": 512});
    let vision = serde_json::json!({"hidden_size": width, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": image,
        "patch_size": 4});
    let config = match r["arch"].as_str() {
        "gemma3-vlm" => {
            let mut t = text.clone();
            t["model_type"] = "gemma3_text".into();
            t["head_dim"] = (n("h") / n("a")).into();
            let mut v = vision.clone();
            v["model_type"] = "siglip_vision_model".into();
            serde_json::json!({"model_type": "gemma3", "mm_tokens_per_image": pooled,
                "text_config": t, "vision_config": v})
        }
        "llava" => {
            let mut t = text.clone();
            t["model_type"] = "llama".into();
            let mut v = vision.clone();
            v["model_type"] = "clip_vision_model".into();
            serde_json::json!({"model_type": "llava", "text_config": t, "vision_config": v})
        }
        "mistral3" => {
            let mut t = text.clone();
            t["model_type"] = "mistral".into();
            t["head_dim"] = (n("h") / n("a")).into();
            let mut v = vision.clone();
            v["model_type"] = "pixtral".into();
            v["head_dim"] = (width / heads).into();
            serde_json::json!({"model_type": "mistral3", "text_config": t, "vision_config": v})
        }
        // transformers 5's layout; the tower's output is the text width
        "qwen2-vl" => serde_json::json!({"model_type": "qwen2_vl",
            "text_config": text, "vision_config": {"depth": layers, "embed_dim": width,
            "hidden_size": n("h"), "mlp_ratio": ffn / width, "num_heads": heads,
            "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}}),
        "qwen3-vl" => {
            let mut t = text.clone();
            t["head_dim"] = (n("h") / n("a")).into();
            serde_json::json!({"model_type": "qwen3_vl",
            "text_config": t, "vision_config": {"depth": layers, "hidden_size": width,
            "intermediate_size": ffn, "num_heads": heads, "out_hidden_size": n("h"),
            "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}})
        }
        "qwen2.5-vl" => serde_json::json!({"model_type": "qwen2_5_vl",
            "text_config": text, "vision_config": {"depth": layers, "hidden_size": width,
            "intermediate_size": ffn, "num_heads": heads, "out_hidden_size": n("h"),
            "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}}),
        other => panic!("unexpected arch {other}"),
    };
    let mut t = hf_config::parse(&config.to_string(), &r["arch"]).unwrap();
    let mut tower = *t.extras.vision.take().expect("a vision tower");
    tower.images = images;
    if tower.native_resolution() {
        tower.image = image;
    }
    assert_eq!(tower.image, image);
    t.extras.vision = Some(Box::new(tower));
    ModelSpec::Transformer(t)
}

/// Every shape, eager and sdpa, fp32 and bf16 autocast (16 shapes per group, the tower's depth,
/// width, MLP, heads, image side and images per sample moved with the language model's sizes):
/// the plan is the language model's saved bytes plus what the tower holds through the language
/// model's backward. Measured: LLaVA -0.5 % to +3.1 %, Gemma 3 eager -0.9 % to +0.4 %, Gemma 3
/// sdpa -6.7 % to -0.6 % (its bidirectional image mask keeps more on the CPU's sdpa path),
/// Qwen2-VL -7.1 % to +1.5 % and Qwen3-VL -10.3 % to 0 (their towers' fused qkv and rotary
/// copies, and Qwen3-VL's interpolated positions, are not the ViT block's; lowest in fp32 sdpa), Qwen2.5-VL -5.1 % to +7.1 % (the top in eager, whose windowed scores
/// are planned as full attention; its fused qkv's value view under sdpa is counted, without
/// which fp32 sdpa was 7.9 % low), Mistral 3 eager -3.2 % to -0.8 % and sdpa -11.5 % to -1.7 %
/// (its tower runs all the micro-batch's patches as one sequence under a block-diagonal mask,
/// whose N² scores eager keeps, without which eager was 33 % low; the lowest point is CPU
/// autocast's sdpa with that mask).
/// Without the tower's bytes the same plans were 5-36 % low (these towers are small beside
/// their language models; Gemma 3's real one encodes 4,096 patches per image).
#[test]
fn vision_language_models_against_pytorchs_saved_bytes() {
    let lit = Coefficients::literature();
    let mut range = std::collections::BTreeMap::<String, (f64, f64)>::new();
    for r in crate::common::data_rows("torch-saved-bytes-vlm-cpu.csv") {
        let train = saved_row_train(&r);
        if train.precision == Precision::Bf16 {
            continue;
        }
        let a = cpu_activation(&lit, train.precision);
        let model = row_model(&r);
        let terms = memory::fit_terms(&model, &train).unwrap();
        let lm = terms.features.resident_bytes(&a);
        let vision = terms.vision.expect("tower features").resident_bytes(&a);
        let err = (lm + vision) / num(&r, "saved_bytes") - 1.0;
        let key = format!("{} {} {}", r["arch"], r["attention"], r["precision"]);
        let e = range
            .entry(key)
            .or_insert((f64::INFINITY, f64::NEG_INFINITY));
        *e = (e.0.min(err), e.1.max(err));
    }
    for (k, (lo, hi)) in &range {
        eprintln!("{k}: {:+.1} % .. {:+.1} %", 100.0 * lo, 100.0 * hi);
    }
    assert_eq!(range.len(), 24, "{range:?}");
    for (k, (lo, hi)) in &range {
        assert!(*lo >= -0.12 && *hi <= 0.075, "{k}: {lo:+.3} .. {hi:+.3}");
    }
}

fn config(name: &str) -> String {
    format!(
        "{}/tests/hf_configs/{name}/config.json",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `estimate --json` of the config `c` at `batch` x `seq` under sdpa at `precision`, with the
/// `extra` flags.
fn json_estimate(
    c: &str,
    (batch, seq, precision): (&str, &str, &str),
    extra: &[&str],
) -> serde_json::Value {
    let base = [
        "estimate",
        "--hf-config",
        c,
        "--batch",
        batch,
        "--seq",
        seq,
        "--attention",
        "sdpa",
        "--precision",
        precision,
        "--json",
    ];
    let (code, out, err) = crate::common::vramcal(&[&base[..], extra].concat());
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// More images per sample plan more activation memory and nothing else; the JSON names the tower
/// and the projector, whose parameters sum with the language model's to transformers' count.
#[test]
fn images_per_sample_add_tower_activations() {
    let c = config("gemma-3-4b-it");
    let step = ("1", "1024", "bf16-mixed");
    let one = json_estimate(&c, step, &[]);
    let three = json_estimate(&c, step, &["--images", "3"]);
    let v = &one["vision"];
    assert_eq!(v["images_per_sample"], 1);
    assert_eq!(v["tower_tokens_per_image"], 4096); // (896 / 14)², SigLIP has no class token
    assert_eq!(three["vision"]["images_per_sample"], 3);
    let (tower, projector) = (
        v["tower_params"].as_u64().unwrap(),
        v["projector_params"].as_u64().unwrap(),
    );
    // SigLIP-So400m's encoder, and Gemma 3's projector: a 1152-wide RMSNorm and 1152 x 2560
    assert_eq!(projector, 1152 + 1152 * 2560);
    assert!((400_000_000..430_000_000).contains(&tower), "{tower}");
    let act = |e: &serde_json::Value| e["memory"]["activations"].as_u64().unwrap();
    let states = |e: &serde_json::Value| {
        ["weights", "gradients", "optimizer"].map(|k| e["memory"][k].as_u64().unwrap())
    };
    assert!(act(&three) > act(&one), "{} <= {}", act(&three), act(&one));
    assert_eq!(states(&three), states(&one));
}

/// LoRA adapts the language model: the frozen tower saves nothing for backward, so the plan's
/// activations are the language model's alone, below full training's by more than the tower's
/// share (adapters in the base's dtype: peft's default fp32 adapters each keep an fp32 copy of
/// their input, which on every linear outweighs what the frozen base stops saving, as measured
/// in `finetune_peaks_match_real_peft_steps`); full training with the tower is above the
/// language model planned alone.
#[test]
fn lora_freezes_the_tower() {
    let c = config("llava-1.5-7b");
    let run = |extra: &[&str]| {
        json_estimate(&c, ("2", "1024", "bf16"), extra)["memory"]["activations"]
            .as_u64()
            .unwrap()
    };
    let full = run(&[]);
    let lora = run(&["--finetune", "lora", "--adapter-dtype", "base"]);
    assert!(lora < full, "{lora} >= {full}");
    // the same language model without its tower
    let ModelSpec::Transformer(mut t) =
        ModelSpec::Transformer(vramcal::spec::hf_config::load(std::path::Path::new(&c)).unwrap())
    else {
        unreachable!()
    };
    t.extras.vision = None;
    let train = vramcal::spec::TrainSpec {
        batch: 2,
        seq: 1024,
        precision: Precision::Bf16,
        attention: vramcal::spec::Attention::Sdpa,
        ..Default::default()
    };
    let lm = memory::estimate(
        &ModelSpec::Transformer(t),
        &train,
        &Coefficients::literature(),
    )
    .unwrap()
    .activations;
    assert!(full > lm, "{full} <= {lm}");
}

/// Bad input names the key as the user wrote it, exit 2.
#[test]
fn vision_language_input_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"model_type": "llava", "text_config": 3}"#,
            "config.json text_config",
        ),
        (
            r#"{"model_type": "llava", "text_config": {"model_type": "phi"}, "vision_config": {}}"#,
            "config.json text_config.model_type",
        ),
        (
            r#"{"model_type": "llava", "text_config": {}}"#,
            "config.json vision_config",
        ),
        (
            r#"{"model_type": "gemma3", "text_config": {"hidden_size": "wide"},
                "vision_config": {}}"#,
            "config.json text_config.hidden_size",
        ),
        (
            r#"{"model_type": "gemma3", "text_config": {},
                "vision_config": {"num_attention_heads": 5}}"#,
            "config.json vision_config.num_attention_heads",
        ),
        (
            r#"{"model_type": "paligemma", "projection_dim": 1024, "text_config": {},
                "vision_config": {}}"#,
            "config.json projection_dim",
        ),
        (
            r#"{"model_type": "mistral3", "spatial_merge_size": 4294967296, "text_config": {},
                "vision_config": {}}"#,
            "config.json spatial_merge_size",
        ),
        (
            r#"{"model_type": "llava_next", "image_grid_pinpoints": [[0, 336]],
                "text_config": {}, "vision_config": {}}"#,
            "config.json image_grid_pinpoints",
        ),
        (
            r#"{"model_type": "llava_next", "image_grid_pinpoints": [[1000000, 1000000]],
                "text_config": {}, "vision_config": {}}"#,
            "config.json image_grid_pinpoints",
        ),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.json"));
        std::fs::write(&path, text).unwrap();
        let (code, _, err) =
            crate::common::vramcal(&["estimate", "--hf-config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}: {err}");
        assert!(err.contains(field), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let c = config("gemma-3-4b-it");
    for (flag, field) in [(["--images", "0"], "images"), (["--images", "x"], "images")] {
        let (code, _, err) =
            crate::common::vramcal(&[&["estimate", "--hf-config", &c][..], &flag].concat());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(field), "{err}");
    }
    // the sequence must hold the images' tokens (Gemma 3: 256 each); partial freezing would
    // backpropagate through frozen blocks into the tower
    for (flags, field) in [
        (&["--images", "8", "--seq", "16"][..], "invalid seq"),
        (
            &["--freeze-layers", "4", "--seq", "1024"][..],
            "invalid freeze-layers",
        ),
    ] {
        let (code, _, err) =
            crate::common::vramcal(&[&["estimate", "--hf-config", &c][..], flags].concat());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(field), "{err}");
    }
    let (code, _, err) = crate::common::vramcal(&["estimate", "--model", "gpt2", "--images", "2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no vision tower"), "{err}");
}

/// Qwen's native-resolution towers take `--image` as the images' side (default 448: 1,024
/// patches of 14): four times the pixels, four times the tower's tokens and more activations,
/// the same states. SigLIP's fixed size refuses it, naming the size.
#[test]
fn qwen_towers_take_the_image_side() {
    let c = config("qwen2.5-vl-7b");
    let step = ("1", "2048", "bf16");
    let default = json_estimate(&c, step, &[]);
    let large = json_estimate(&c, step, &["--image", "896"]);
    assert_eq!(default["vision"]["tower_tokens_per_image"], 1024);
    assert_eq!(large["vision"]["tower_tokens_per_image"], 4096);
    let act = |e: &serde_json::Value| e["memory"]["activations"].as_u64().unwrap();
    assert!(
        act(&large) > act(&default),
        "{} <= {}",
        act(&large),
        act(&default)
    );
    assert_eq!(large["memory"]["weights"], default["memory"]["weights"]);
    let gemma = config("gemma-3-4b-it");
    let (code, _, err) =
        crate::common::vramcal(&["estimate", "--hf-config", &gemma, "--image", "448"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid image") && err.contains("896x896"),
        "{err}"
    );
}

/// Keys the published files leave to transformers' defaults and rules, counted as transformers
/// 5.24 counts the same files (*ForConditionalGeneration on the meta device): SigLIP builds its
/// pooling head unless `vision_use_head` is false; a Qwen2-VL tied by its `text_config` alone,
/// with transformers 4's `qwen2_vl` vision class name; LLaVA over a Qwen2 text model reading two
/// tower layers concatenated; a Llama 4 whose top-level tie is ignored (only its text model's
/// counts), with MoE in every second block and the pixel-shuffle adapter.
#[test]
fn wrapper_defaults_count_like_transformers() {
    let cases = [
        (
            r#"{"model_type": "gemma3", "mm_tokens_per_image": 16,
                "text_config": {"hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "head_dim": 16, "vocab_size": 1000},
                "vision_config": {"hidden_size": 64, "intermediate_size": 96,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32,
                    "patch_size": 4}}"#,
            237_856u64,
        ),
        (
            r#"{"model_type": "qwen2_vl",
                "text_config": {"hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "vocab_size": 1000, "tie_word_embeddings": true},
                "vision_config": {"model_type": "qwen2_vl", "depth": 2, "embed_dim": 32,
                    "hidden_size": 64, "mlp_ratio": 4, "num_heads": 4, "patch_size": 4}}"#,
            191_616,
        ),
        (
            r#"{"model_type": "llava", "vision_feature_layer": [-1, -2],
                "text_config": {"model_type": "qwen2", "hidden_size": 64,
                    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 1000},
                "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "image_size": 32, "patch_size": 4}}"#,
            231_488,
        ),
        (
            r#"{"model_type": "llama4", "text_config": {"hidden_size": 64, "intermediate_size": 96, "intermediate_size_mlp": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "tie_word_embeddings": false}, "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 4, "projector_input_dim": 64, "projector_output_dim": 64, "vision_output_dim": 48, "pixel_shuffle_ratio": 0.5}, "tie_word_embeddings": true}"#,
            443_840,
        ),
    ];
    for (text, want) in cases {
        let t = hf_config::parse(text, "x").unwrap();
        assert_eq!(
            vramcal::plan::params::count(&ModelSpec::Transformer(t)),
            want,
            "{text}"
        );
    }
}
