//! The planner against peak GPU memory published for real training runs
//! (`calibration/data/published-gpu-peaks.csv`: each row's source and a verbatim quote, the
//! configuration as `estimate` flags over a config.json in `tests/hf_configs/`, the metric the
//! source reported and its value). None of these runs set a coefficient; two mechanisms they
//! exposed were read in peft's source before the planner took them: peft's fp32 adapters over
//! a 16-bit base (then measured on a CPU, `finetune_peaks_match_real_peft_steps`) and QLoRA's
//! fp32 embeddings, norms and head after `prepare_model_for_kbit_training` (not measured here:
//! bitsandbytes needs CUDA).

use crate::common::{data_rows, vramcal};
use std::collections::HashMap;

/// `estimate --json` of a published row: its config.json, its flags, and `extra`.
fn plan_row(row: &HashMap<String, String>, extra: &[&str]) -> serde_json::Value {
    let config = format!("tests/hf_configs/{}/config.json", row["config"]);
    let mut args = vec![
        "estimate",
        "--hf-config",
        &config,
        "--json",
        "--no-gpu-choice",
    ];
    args.extend(row["args"].split_whitespace());
    args.extend_from_slice(extra);
    let (code, out, err) = vramcal(&args);
    assert_eq!(code, 0, "{}: {err}", row["id"]);
    serde_json::from_str(&out).unwrap()
}

/// The plan's figure for a published metric: `torch.cuda.max_memory_allocated` and torchtune's
/// peak active bytes are the allocated peak (`memory.total`); `max_memory_reserved`, and
/// nvidia-smi less the CUDA context, the caching allocator's reserved peak.
fn planned(plan: &serde_json::Value, metric: &str) -> f64 {
    let key = match metric {
        "allocated" | "active" => "total",
        "reserved" => "reserved_peak",
        other => panic!("unknown metric {other}"),
    };
    plan["memory"][key].as_f64().unwrap()
}

/// Rows `within` a band: bert-large fine-tuned by HF Trainer on a V100 (fp32 and fp16 AMP,
/// gradient accumulation, checkpointing, 8-bit Adam), Llama 3.2 3B full fine-tuning with
/// torchtune (2 x 4096 packed tokens) eager and with each of its optimization flags added in
/// turn (compiled blocks, compiled chunked cross-entropy, checkpointing, optimizer in
/// backward, activation offloading) and its LoRA on top, torchtune's compiled LoRA and QLoRA
/// of Llama 3.1 8B on an RTX 4090, LitGPT LoRA on Llama 2 7B/13B, StableLM-Alpha 3B and
/// phi-1.5 at micro-batches 1-4, and peft's LoRA benchmark on Llama 3.2 3B. The plan is never
/// more than 6 % below a published peak (a wrong "fits") nor 13 % above it, 5 % on average
/// (4.8 % over 26 rows when written:
/// -5.9 % to +11.7 %; the lowest torchtune's compiled blocks with compiled chunked loss, the
/// highest a checkpointed bert-large whose reserved memory is planned with 10 % allocator
/// slack on its states too). Rows outside what the planner models say which way they miss and
/// why (`note`), and must still miss that way: PyTorch 1.x keeping gradients between steps and
/// a load-and-quantize transient in the whole run's peak (both under), torchtune's Llama 3.2
/// 3B with 8-bit AdamW on top of every lever (under, -14.8 %: the plan saves 6.0 GiB of moments
/// where the run saved 4.2; an 8-bit optimizer's step transients are not modelled) and its
/// QLoRA with every lever on (over, +21 %: the ~0.9 GiB its LoRA row is over too, on a 4.6 GiB
/// total). The rows' notes say more. Where the source gives the trainable parameters, the
/// plan's equal them.
#[test]
fn published_gpu_peaks_are_planned_within_their_band() {
    let (mut scored, mut abs_sum) = (0usize, 0.0);
    for row in data_rows("published-gpu-peaks.csv") {
        let plan = plan_row(&row, &[]);
        if !row["published_trainable"].is_empty() {
            assert_eq!(
                plan["train"]["trainable_params"]
                    .as_u64()
                    .unwrap()
                    .to_string(),
                row["published_trainable"],
                "{}: trainable parameters",
                row["id"]
            );
        }
        let measured: f64 = row["measured_bytes"].parse().unwrap();
        let e = (planned(&plan, &row["metric"]) - measured) / measured;
        let what = format!("{} ({}): {:+.1} %", row["id"], row["note"], e * 100.0);
        match row["expect"].as_str() {
            "within" => {
                assert!((-0.06..0.13).contains(&e), "{what}");
                scored += 1;
                abs_sum += e.abs();
            }
            "under" => assert!(e < 0.0, "{what}"),
            "over" => assert!(e > 0.0, "{what}"),
            other => panic!("{}: unknown expect {other}", row["id"]),
        }
        if row["expect"] != "within" {
            assert!(
                !row["note"].is_empty(),
                "{}: a miss needs its reason",
                row["id"]
            );
        }
    }
    assert!(scored >= 18, "only {scored} published peaks scored");
    let mean = abs_sum / scored as f64;
    assert!(mean < 0.05, "mean error {:.2} %", mean * 100.0);
}

/// The longest sequence that fits each memory size, against the published Hugging Face + FA2
/// baseline of Unsloth's context-length benchmark (`calibration/data/published-gpu-max-seq.csv`:
/// Llama 3.1 8B, 4-bit QLoRA rank 32 on every block linear, batch 1, padded sequences). The
/// benchmark does not state its optimizer, checkpointing or autocast; the rows say what is
/// assumed. `--max-seq` is within 10 % of every published length (when written: -7.5 % at
/// 12 GB, +2.3 % to +7.5 % from 16 to 80 GB) and finds none at 8 GB, where the baseline ran out
/// of memory. The quantized base is planned prepared for k-bit training (fp32 embeddings, head
/// and norms): with them 16-bit it would claim ~930 more tokens at every size.
#[test]
fn published_longest_sequences_are_the_planners_max_seq() {
    let mut checked = 0;
    for row in data_rows("published-gpu-max-seq.csv") {
        let plan = plan_row(&row, &["--gpu-mem", &row["capacity"], "--max-seq"]);
        let planned = plan["search"]["max_seq"].as_f64().unwrap();
        match row["published_max_seq"].as_str() {
            "OOM" => assert_eq!(planned, 0.0, "{}: planned {planned}", row["id"]),
            n => {
                let published: f64 = n.parse().unwrap();
                let e = (planned - published) / published;
                assert!(
                    e.abs() < 0.10,
                    "{}: planned {planned}, published {published}",
                    row["id"]
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} sizes");
}
