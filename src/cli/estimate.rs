//! `vramcal estimate`: per-GPU memory breakdown, the rule of thumb beside it, host RAM, storage,
//! step time, fits verdict, `--max-batch`/`--max-seq` and GPU choice; a table or `--json`.
//!
//! Numeric flags are taken as text and parsed here, so a bad value (zero, negative, absurd, not
//! a number) becomes one line naming the flag with exit code 2, never clap's multi-line usage.

use super::common::{parse_int, Defaults, ShapeFlags, TrainFlags};
use crate::coeffs::Coefficients;
use crate::error::{check_range, input_err, rename_field};
use crate::plan::estimate::{estimate, Estimate, Options};
use crate::plan::finetune::{resolve_targets, Finetune, FinetuneMode};
use crate::plan::gpus;
use crate::spec::transformer::{
    Activation, Arch, DropoutP, FfnKind, Head, NormKind, TransformerSpec,
};
use crate::spec::{cnn_file, hf_config, presets, ModelSpec, TrainSpec};
use std::fmt::Write as _;
use std::path::PathBuf;

/// Boxed so the `Command` enum stays small (clippy::large_enum_variant): the flags below are
/// about 700 bytes of `Option<String>`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub flags: Box<Flags>,
}

#[derive(Debug, clap::Args)]
pub struct Flags {
    /// Preset name (bert-base, gpt2, llama2-7b, vit-large-16, resnet50, tiny-mixtral,
    /// tiny-qwen-moe, ...; an unknown name lists them all)
    #[arg(long)]
    pub model: Option<String>,
    /// HuggingFace config.json (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, DeBERTa-v2, GPT-2,
    /// GPT-BigCode, GPT-NeoX, GPT-J, OPT, BLOOM, Falcon, Phi, Phi-3, StarCoder2, ViT, Llama,
    /// Mistral, Qwen2/3, Gemma 1-3, OLMo 1-3, Granite, SmolLM3, Helium, ERNIE 4.5, Seed-OSS,
    /// Hunyuan (dense), GLM-4, GLM-4-0414, Cohere (Command R, R+, R7B, Aya), StableLM, ELECTRA,
    /// Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, GLM-4.5,
    /// Llama 4 (text), gpt-oss, T5, mT5, BART; vision-language Gemma 3, PaliGemma, LLaVA, LLaVA-NeXT,
    /// Mistral 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and Llama 4)
    #[arg(long)]
    pub hf_config: Option<PathBuf>,
    /// safetensors checkpoint (a .safetensors file or its model.safetensors.index.json): exact
    /// parameter count and dtypes from the headers only, cross-checked with the config.json
    /// beside it (or --hf-config), whose architecture is planned; without a supported config,
    /// the counts alone
    #[arg(long, conflicts_with_all = ["model", "cnn_file"])]
    pub safetensors: Option<PathBuf>,
    /// Encoder-decoder (T5, mT5, BART): decoder tokens per sample [default: --seq]
    #[arg(long, allow_hyphen_values = true)]
    pub target_seq: Option<String>,
    /// Vision-language model (Gemma 3, PaliGemma, LLaVA, LLaVA-NeXT, Mistral 3, Qwen2-VL,
    /// Qwen2.5-VL, Qwen3-VL, Llama 4): images (or crops of a tiled image) the vision tower encodes per sample; --seq
    /// counts their tokens in the language model's sequence [default: 1; LLaVA-NeXT: 1 + its
    /// largest grid's crops]. Qwen's and Pixtral's towers take --image as the images' side
    /// [default: Qwen 448; Pixtral its config's image_size]
    #[arg(long, allow_hyphen_values = true)]
    pub images: Option<String>,
    /// Mixture of experts: ranks each MoE block's experts are split over (a divisor of the
    /// experts and of --gpus) [default: 1]
    #[arg(long, allow_hyphen_values = true)]
    pub expert_parallel: Option<String>,
    /// Mixture of experts: routed-token slots per expert relative to an even split [default: 1.0,
    /// dropless routing as transformers' MoE blocks do]
    #[arg(long, allow_hyphen_values = true)]
    pub capacity_factor: Option<String>,
    /// CNN layer list, TOML or JSON (see presets/custom-cnn.toml)
    #[arg(long)]
    pub cnn_file: Option<PathBuf>,

    /// Explicit transformer: --layers, --hidden and --heads together (plus the flags below)
    #[command(flatten)]
    pub shape: ShapeFlags,
    /// Explicit transformer: key/value heads (GQA) [default: heads]
    #[arg(long, allow_hyphen_values = true)]
    pub kv_heads: Option<String>,
    /// Explicit transformer: two-matrix GELU MLP or three-matrix SwiGLU (gate, up, down)
    #[arg(long, value_enum, ignore_case = true, default_value_t = FfnKind::Gelu)]
    pub ffn_kind: FfnKind,
    /// Explicit transformer: learned positions (0 = rotary, no table)
    #[arg(long, allow_hyphen_values = true, default_value = "0")]
    pub max_positions: String,
    /// Explicit transformer: decoder (LM head) or encoder (pooler, or classifier with --classes)
    #[arg(long, value_enum, ignore_case = true, default_value_t = Arch::Decoder)]
    pub arch: Arch,
    /// Explicit transformer: LayerNorm (weight + bias) or RMSNorm (weight only)
    #[arg(long, value_enum, ignore_case = true, default_value_t = NormKind::Layernorm)]
    pub norm: NormKind,
    /// Explicit transformer: no biases on the linears
    #[arg(long)]
    pub no_bias: bool,
    /// Explicit transformer: separate (untied) LM head
    #[arg(long)]
    pub untied: bool,
    /// Explicit encoder: classifier head with this many classes
    #[arg(long, allow_hyphen_values = true)]
    pub classes: Option<String>,
    /// Transformer: dropout probability of every dropout site (0 keeps no masks)
    /// [default: the architecture's transformers default, 0.1 for GPT-2 and BERT, else 0]
    #[arg(long, allow_hyphen_values = true)]
    pub dropout: Option<String>,
    /// Transformer: MLP activation as transformers names it: gelu, gelu_pytorch_tanh, gelu_new,
    /// gelu_fast, quick_gelu, relu, silu [default: the architecture's, gelu_new for GPT-2, silu
    /// for SwiGLU, else gelu]
    #[arg(long)]
    pub activation: Option<String>,

    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub finetune: FinetuneFlags,
    /// GPU from the catalog (`vramcal gpus`): capacity and peak FLOP/s
    #[arg(long)]
    pub gpu: Option<String>,
    /// GPU memory capacity, e.g. 80GB, 80GiB, 24576MiB (overrides --gpu's)
    #[arg(long, allow_hyphen_values = true)]
    pub gpu_mem: Option<String>,
    /// Largest per-GPU batch that fits the GPU memory
    #[arg(long)]
    pub max_batch: bool,
    /// Largest sequence length that fits the GPU memory
    #[arg(long)]
    pub max_seq: bool,
    /// Coefficient table (default: embedded literature table)
    #[arg(long)]
    pub coeffs: Option<PathBuf>,
    /// Machine-readable output (schema: docs/estimate-schema.md)
    #[arg(long)]
    pub json: bool,
    /// Skip the per-GPU-type choice table
    #[arg(long)]
    pub no_gpu_choice: bool,
    /// Print only the answer (the first line of the full output)
    #[arg(long, conflicts_with = "json")]
    pub brief: bool,
    /// Micro-batches per optimizer step (gradient accumulation): global batch = batch x this x
    /// gpus; gradients stay resident through every micro-batch
    #[arg(long, allow_hyphen_values = true, default_value = "1")]
    pub grad_accum: String,
    /// Training tokens: adds the time to train on them (optimizer steps x step time)
    #[arg(long, allow_hyphen_values = true)]
    pub tokens: Option<String>,
    /// A preemptible (spot) run: mean hours between interruptions; adds the checkpoint interval
    /// that minimises lost work (Young/Daly) to the advice
    #[arg(long, allow_hyphen_values = true)]
    pub spot_mtbf_hours: Option<String>,
    /// Checkpoint write bandwidth to storage, Gb/s (with --spot-mtbf-hours)
    #[arg(long, allow_hyphen_values = true, default_value = "10")]
    pub storage_gbps: String,
    /// GPUs per node: past it, data-parallel communication crosses the network
    #[arg(long, allow_hyphen_values = true, default_value = "8")]
    pub gpus_per_node: String,
    /// Network bandwidth per GPU between nodes, Gb/s (e.g. 400 for one 400G NIC per GPU)
    #[arg(long, allow_hyphen_values = true, default_value = "400")]
    pub network_gbps: String,

    /// Host RAM: bytes of one loaded sample [default: seq x 4, or C x H x W for images]
    #[arg(long, allow_hyphen_values = true)]
    pub sample_bytes: Option<String>,
    /// Host RAM: data loader workers
    #[arg(long, allow_hyphen_values = true, default_value = "4")]
    pub workers: String,
    /// Storage: raw dataset size, e.g. 2TB [default: 0, not counted]
    #[arg(long, allow_hyphen_values = true)]
    pub dataset: Option<String>,
    /// Storage: preprocessing cache as a fraction of the raw data
    #[arg(long, allow_hyphen_values = true, default_value = "1.0")]
    pub cache_fraction: String,
    /// Storage: checkpoints kept (policy: the last 3, enough to step back past a bad save)
    #[arg(long, allow_hyphen_values = true, default_value = "3")]
    pub keep_checkpoints: String,
}

/// Parses a byte size: "80GB" (1e9), "80GiB" (2^30), "1.5TB", "512MiB", "123" (bytes).
pub fn parse_size(field: &str, s: &str) -> anyhow::Result<u64> {
    crate::size::parse_size(field, s)
}

fn explicit_transformer(a: &Flags) -> anyhow::Result<Option<TransformerSpec>> {
    let shape = &a.shape;
    let (Some(layers), Some(hidden), Some(heads)) = (&shape.layers, &shape.hidden, &shape.heads)
    else {
        if shape.layers.is_some() || shape.hidden.is_some() || shape.heads.is_some() {
            return input_err(
                "model",
                "an explicit transformer needs --layers, --hidden and --heads together",
            );
        }
        return Ok(None);
    };
    let hidden = parse_int("hidden", hidden)?;
    let heads = parse_int("heads", heads)?;
    let (arch, ffn_kind, norm) = (a.arch, a.ffn_kind, a.norm);
    let head = match (&a.classes, arch) {
        (Some(c), _) => Head::Classifier {
            classes: parse_int("classes", c)?,
        },
        (None, Arch::Decoder) => Head::Lm,
        (None, Arch::Encoder) => Head::Pooler,
    };
    Ok(Some(TransformerSpec {
        name: "custom".into(),
        arch,
        layers: parse_int("layers", layers)?,
        hidden,
        heads,
        kv_heads: match &a.kv_heads {
            Some(k) => parse_int("kv-heads", k)?,
            None => heads,
        },
        ffn: match &shape.ffn {
            Some(f) => parse_int("ffn", f)?,
            None => hidden.saturating_mul(4),
        },
        ffn_kind,
        vocab: parse_int("vocab", shape.vocab.as_deref().unwrap_or("50257"))?,
        max_positions: parse_int("max-positions", &a.max_positions)?,
        type_vocab: 0,
        norm,
        bias: !a.no_bias,
        qkv_bias: false,
        tied_embeddings: !a.untied,
        // Encoders follow BERT (post-LN: embedding norm), decoders GPT/Llama (pre-LN: final norm).
        embedding_norm: arch == Arch::Encoder,
        final_norm: arch == Arch::Decoder,
        head,
        patch: None,
        dropout: None,
        activation: None,
        extras: Default::default(),
    }))
}

/// `--dropout` and `--activation`, parsed (each `None` when not given).
fn block_settings(a: &Flags) -> anyhow::Result<(Option<DropoutP>, Option<Activation>)> {
    let dropout = match &a.dropout {
        None => None,
        Some(t) => match t.trim().parse::<f32>() {
            Ok(p) if p.is_finite() && (0.0..1.0).contains(&p) => Some(DropoutP(p)),
            _ => {
                return input_err(
                    "dropout",
                    format!("'{t}' is not a probability; accepted a number with 0 <= p < 1"),
                )
            }
        },
    };
    let activation = match &a.activation {
        None => None,
        Some(t) => match Activation::from_name(t) {
            Some(act) => Some(act),
            None => {
                return input_err(
                    "activation",
                    format!("'{t}' is unknown; accepted {}", Activation::accepted()),
                )
            }
        },
    };
    Ok((dropout, activation))
}

/// Exactly one model source: a preset, a config.json, a CNN file or explicit transformer flags;
/// `--dropout` / `--activation` override the transformer's own.
pub fn model_from_args(a: &Flags) -> anyhow::Result<ModelSpec> {
    let (dropout, activation) = block_settings(a)?;
    let model = model_source(a)?;
    if dropout.is_none() && activation.is_none() {
        return Ok(model);
    }
    match model {
        ModelSpec::Transformer(t) => Ok(ModelSpec::Transformer(TransformerSpec {
            dropout: dropout.or(t.dropout),
            activation: activation.or(t.activation),
            ..t
        })),
        ModelSpec::Cnn(_) => input_err(
            if dropout.is_some() {
                "dropout"
            } else {
                "activation"
            },
            "applies to transformer blocks only; accepted with --model, --hf-config or --layers/--hidden/--heads of a transformer",
        ),
    }
}

fn model_source(a: &Flags) -> anyhow::Result<ModelSpec> {
    let explicit = explicit_transformer(a)?;
    let sources = [
        a.model.is_some(),
        a.hf_config.is_some(),
        a.cnn_file.is_some(),
        explicit.is_some(),
    ];
    if sources.iter().filter(|&&s| s).count() != 1 {
        return input_err(
            "model",
            "give exactly one model; accepted --model PRESET, --hf-config PATH, --cnn-file PATH, or --layers/--hidden/--heads",
        );
    }
    if let Some(name) = &a.model {
        return presets::preset(name);
    }
    if let Some(p) = &a.hf_config {
        return Ok(ModelSpec::Transformer(hf_config::load(p)?));
    }
    if let Some(p) = &a.cnn_file {
        return Ok(ModelSpec::Cnn(cnn_file::load(p)?));
    }
    let spec = explicit.expect("one source is set");
    // Validation names spec fields (`kv_heads`); the user wrote flags (`kv-heads`).
    spec.validate()
        .map_err(|e| rename_field(e, |f| Some(f.replace('_', "-"))))?;
    Ok(ModelSpec::Transformer(spec))
}

/// Estimate's input sizes when left out: 512 tokens, 224-pixel images, whatever the model.
pub fn train_from_args(a: &Flags) -> anyhow::Result<TrainSpec> {
    let mut t = a.train.to_train_spec(
        |seq, image| (seq.unwrap_or(512), image.unwrap_or(224)),
        Defaults::Planner,
    )?;
    t.grad_accum = parse_int("grad-accum", &a.grad_accum)?;
    t.validate()?;
    Ok(t)
}

/// A number in `lo..=hi` for `flag`, or a one-line error naming it and the range.
/// A number for `flag` in `lo..=hi`, or one line: "'<s>' is not <what>; accepted <accepted>".
fn number_in(
    flag: &str,
    s: &str,
    (lo, hi): (f64, f64),
    what: &str,
    accepted: &str,
) -> anyhow::Result<f64> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (lo..=hi).contains(&v) => Ok(v),
        _ => input_err(flag, format!("'{s}' is not {what}; accepted {accepted}")),
    }
}

/// `--tokens`: a whole number or one with a suffix K, M, B, T (thousand .. trillion), e.g. 2T.
fn parse_tokens(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1e3,
                'M' => 1e6,
                'B' | 'G' => 1e9,
                'T' => 1e12,
                _ => f64::NAN,
            };
            (&t[..i], m)
        }
        _ => (t, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 1.0 && mult.is_finite() && v * mult <= 1e16 => {
            Ok((v * mult).round() as u64)
        }
        _ => input_err(
            "tokens",
            format!("'{s}' is not a token count; accepted 1 to 1e16, optionally with K, M, B or T (e.g. 2T)"),
        ),
    }
}

fn options_from_args(a: &Flags) -> anyhow::Result<Options> {
    let gpu = a.gpu.as_deref().map(gpus::find).transpose()?;
    let capacity_bytes = a
        .gpu_mem
        .as_deref()
        .map(|s| parse_size("gpu-mem", s))
        .transpose()?;
    if capacity_bytes == Some(0) {
        return input_err("gpu-mem", "0 bytes; accepted a positive size such as 80GB");
    }
    if (a.max_batch || a.max_seq) && gpu.is_none() && capacity_bytes.is_none() {
        let flag = if a.max_batch { "max-batch" } else { "max-seq" };
        return input_err(
            flag,
            "needs a memory capacity; accepted with --gpu NAME or --gpu-mem SIZE",
        );
    }
    let cache_fraction = number_in(
        "cache-fraction",
        &a.cache_fraction,
        (0.0, 100.0),
        "a fraction",
        "a number in 0..=100",
    )?;
    let workers = parse_int("workers", &a.workers)?;
    check_range("workers", workers, 1, 1024)?;
    let kept = parse_int("keep-checkpoints", &a.keep_checkpoints)?;
    check_range("keep-checkpoints", kept, 0, 100_000)?;
    let gpus_per_node = parse_int("gpus-per-node", &a.gpus_per_node)?;
    check_range("gpus-per-node", gpus_per_node, 1, 1024)?;
    let network_gbps = number_in(
        "network-gbps",
        &a.network_gbps,
        (0.1, 100_000.0),
        "a bandwidth",
        "Gb/s per GPU in 0.1..=100000 (e.g. 400)",
    )?;
    Ok(Options {
        gpu,
        capacity_bytes,
        sample_bytes: a
            .sample_bytes
            .as_deref()
            .map(|s| {
                let n = parse_size("sample-bytes", s)?;
                // a single training sample above 1 TiB is a typo, not a dataset
                check_range("sample-bytes", n, 1, 1 << 40)?;
                Ok::<u64, anyhow::Error>(n)
            })
            .transpose()?,
        workers,
        dataset_bytes: a
            .dataset
            .as_deref()
            .map(|s| parse_size("dataset", s))
            .transpose()?
            .unwrap_or(0),
        cache_fraction,
        checkpoints_kept: kept,
        max_batch: a.max_batch,
        max_seq: a.max_seq,
        choose_gpus: !a.no_gpu_choice,
        spot: match a.spot_mtbf_hours.as_deref() {
            Some(h) => Some(crate::plan::advice::Spot {
                mtbf_hours: number_in(
                    "spot-mtbf-hours",
                    h,
                    (0.01, 1e6),
                    "a number of hours",
                    "0.01 to 1000000 hours (e.g. 6)",
                )?,
                storage_gbps: number_in(
                    "storage-gbps",
                    &a.storage_gbps,
                    (0.01, 1e5),
                    "a bandwidth",
                    "Gb/s in 0.01..=100000 (e.g. 10)",
                )?,
            }),
            None => None,
        },
        train_tokens: a.tokens.as_deref().map(parse_tokens).transpose()?,
        cluster: crate::plan::comm::Cluster {
            gpus_per_node,
            network_gbps,
        },
        finetune: Finetune::default(),
    })
}

/// Parses a clap `ValueEnum` from text, so a bad value is one line naming the flag.
fn value_enum<T: clap::ValueEnum>(field: &str, s: &str) -> anyhow::Result<T> {
    T::from_str(s.trim(), true).or_else(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        input_err(
            field,
            format!("'{s}' is unknown; accepted {}", names.join(", ")),
        )
    })
}

/// `--finetune` and its companions, shared by `estimate` and `measure` (one parser:
/// [`finetune_from_args`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FinetuneFlags {
    /// What is trained: full (every parameter), lora (frozen base, rank-R adapters; Hu et al.
    /// 2021), qlora (frozen NF4 base, 4.127 bits/param; Dettmers et al. 2023) [default: full]
    #[arg(long, allow_hyphen_values = true)]
    pub finetune: Option<String>,
    /// LoRA/QLoRA adapter rank [default: 16]
    #[arg(long, allow_hyphen_values = true)]
    pub lora_rank: Option<String>,
    /// LoRA/QLoRA adapted linears: attn, mlp, all, or a comma list of the model's block linears
    /// (q,k,v,o,qkv,gate,up,down,fc1,fc2; transformers names such as q_proj, c_attn also work)
    /// [default: all block linears, as the QLoRA paper]
    #[arg(long, allow_hyphen_values = true)]
    pub lora_targets: Option<String>,
    /// LoRA/QLoRA: peft lora_dropout on each adapter's input [default: 0]
    #[arg(long, allow_hyphen_values = true)]
    pub lora_dropout: Option<String>,
    /// LoRA: bits of the frozen base's block linears: 16 (the precision's dtype), 8 (LLM.int8()),
    /// 4 (NF4, as --finetune qlora) [default: 16; qlora: 4]
    #[arg(long, allow_hyphen_values = true)]
    pub base_bits: Option<String>,
    /// Partial fine-tuning: freeze the embeddings and the first N blocks [default: 0]
    #[arg(long, allow_hyphen_values = true)]
    pub freeze_layers: Option<String>,
    /// ZeRO-Offload to host RAM: none, optimizer (states and step on CPU; --zero 1-3),
    /// optimizer+params (ZeRO-Infinity; --zero 3) [default: none]
    #[arg(long, allow_hyphen_values = true)]
    pub offload: Option<String>,
    /// bitsandbytes paged optimizer (noted only; states planned as resident)
    #[arg(long)]
    pub paged_optimizer: bool,
    /// Step each parameter inside backward as its gradient arrives, freeing it (torchtune's
    /// optimizer_in_bwd): one tensor's gradient at a time instead of all; needs --grad-accum 1
    #[arg(long)]
    pub optimizer_in_backward: bool,
    /// The LM loss: full (all logits upcast to fp32 at once: transformers), chunked
    /// (torchtune's CEWithChunkedOutputLoss, 8 chunks, eager) or chunked-compiled (its
    /// per-chunk cross-entropy under torch.compile) [default: full]
    #[arg(long, allow_hyphen_values = true)]
    pub cross_entropy: Option<String>,
    /// torch.compile: none, or blocks (every transformer block compiled on its own, as
    /// torchtune's compile: True does; Llama-family blocks with sdpa) [default: none]
    #[arg(long, allow_hyphen_values = true)]
    pub compile: Option<String>,
    /// Offload saved activations to pinned host memory during the forward and bring them back
    /// in backward (torchtune's enable_activation_offloading; with --checkpointing full, the
    /// stored block inputs, as Unsloth's offloaded checkpointing does); decoder LMs only
    #[arg(long)]
    pub offload_activations: bool,
    /// LoRA/QLoRA adapters over a 16-bit base: fp32 (peft's default, autocast_adapter_dtype:
    /// fp32 adapters, each adapted linear keeps its own cast copy of its input; a 4/8-bit base
    /// prepared as the QLoRA recipe does, prepare_model_for_kbit_training: embeddings, norms and
    /// head in fp32) or base (adapters and the unquantized rest in the base's dtype, as
    /// torchtune and LitGPT train them) [default: fp32]
    #[arg(long, allow_hyphen_values = true)]
    pub adapter_dtype: Option<String>,
}

/// `--finetune`, `--lora-*`, `--base-bits`, `--freeze-layers`, `--offload`, checked against the
/// model and the training configuration.
pub fn finetune_from_args(
    a: &FinetuneFlags,
    model: &ModelSpec,
    train: &TrainSpec,
) -> anyhow::Result<Finetune> {
    let mode: FinetuneMode = match &a.finetune {
        Some(s) => value_enum("finetune", s)?,
        None => FinetuneMode::Full,
    };
    let mut ft = Finetune {
        mode,
        ..Finetune::default()
    };
    let adapter_flags = [
        ("lora-rank", a.lora_rank.is_some()),
        ("lora-targets", a.lora_targets.is_some()),
        ("lora-dropout", a.lora_dropout.is_some()),
        ("base-bits", a.base_bits.is_some()),
        ("adapter-dtype", a.adapter_dtype.is_some()),
    ];
    if mode == FinetuneMode::Full {
        if let Some((flag, _)) = adapter_flags.iter().find(|(_, given)| *given) {
            return input_err(
                flag,
                "applies to adapters only; accepted with --finetune lora or qlora",
            );
        }
    }
    if let Some(r) = &a.lora_rank {
        ft.rank = parse_int("lora-rank", r)?;
    }
    if let Some(p) = &a.lora_dropout {
        ft.lora_dropout = match p.trim().parse::<f32>() {
            Ok(p) if p.is_finite() && (0.0..1.0).contains(&p) => p,
            _ => {
                return input_err(
                    "lora-dropout",
                    format!("'{p}' is not a probability; accepted a number with 0 <= p < 1"),
                )
            }
        };
    }
    ft.base_bits = match (&a.base_bits, mode) {
        (None, FinetuneMode::Qlora) => 4,
        (None, _) => 16,
        (Some(b), FinetuneMode::Qlora) if b.trim() != "4" => {
            return input_err(
                "base-bits",
                format!("'{b}' with --finetune qlora (NF4 is 4 bits); accepted 4, or --finetune lora --base-bits 8|16"),
            )
        }
        (Some(b), _) => match b.trim() {
            "4" => 4,
            "8" => 8,
            "16" => 16,
            _ => {
                return input_err(
                    "base-bits",
                    format!("'{b}' is unknown; accepted 4, 8, 16"),
                )
            }
        },
    };
    if ft.base_bits < 16 && train.precision == crate::spec::Precision::Fp32 {
        return input_err(
            "precision",
            format!("fp32 with a {}-bit base: bitsandbytes computes in 16 bits; accepted bf16-mixed, bf16, fp16-mixed", ft.base_bits),
        );
    }
    if let Some(n) = &a.freeze_layers {
        ft.freeze_layers = parse_int("freeze-layers", n)?;
    }
    if let Some(o) = &a.offload {
        ft.offload = value_enum("offload", o)?;
    }
    ft.paged_optimizer = a.paged_optimizer;
    ft.optimizer_in_backward = a.optimizer_in_backward;
    ft.offload_activations = a.offload_activations;
    if let Some(c) = &a.cross_entropy {
        ft.cross_entropy = value_enum("cross-entropy", c)?;
    }
    if let Some(c) = &a.compile {
        ft.compile = value_enum("compile", c)?;
    }
    if let Some(d) = &a.adapter_dtype {
        ft.adapter_dtype = value_enum("adapter-dtype", d)?;
    }
    if ft.is_adapter() {
        if let ModelSpec::Transformer(t) = model {
            if let Some(spec) = &a.lora_targets {
                ft.targets = resolve_targets(t, spec)?;
            }
        }
    }
    ft.validate(model, train)?;
    Ok(ft)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut args = *args.flags;
    // `--safetensors`: its config becomes the model source, or without one the counts alone
    let checkpoint = match &args.safetensors {
        None => None,
        Some(st) => {
            let explicit = args.shape.layers.is_some()
                || args.shape.hidden.is_some()
                || args.shape.heads.is_some();
            let route =
                super::checkpoint::route(st, args.hf_config.as_deref(), explicit, args.json)?;
            match route {
                super::checkpoint::Route::Plan(config, ck) => {
                    args.hf_config = Some(config);
                    Some(ck)
                }
                super::checkpoint::Route::CountsOnly(text) => return write_stdout(&text),
            }
        }
    };
    let train = train_from_args(&args)?;
    let layout = super::layout_flags::LayoutFlags {
        target_seq: args.target_seq.as_deref(),
        images: args.images.as_deref(),
        image: args.train.image.as_deref(),
        expert_parallel: args.expert_parallel.as_deref(),
        capacity_factor: args.capacity_factor.as_deref(),
    };
    let model = layout.apply(model_from_args(&args)?, &train)?;
    let mut opts = options_from_args(&args)?;
    opts.finetune = finetune_from_args(&args.finetune, &model, &train)?;
    let coeffs = match &args.coeffs {
        Some(p) => Coefficients::load(p)?,
        None => Coefficients::literature(),
    };
    let mut est = estimate(&model, &train, &coeffs, &opts)?;
    est.checkpoint = checkpoint.map(|ck| super::checkpoint::report(&ck, &model));
    let text = if args.json {
        serde_json::to_string_pretty(&est)? + "\n"
    } else if args.brief {
        answer(&est) + "\n"
    } else {
        render(&est)
            + &est
                .checkpoint
                .as_ref()
                .map_or(String::new(), crate::plan::checkpoint::render)
    };
    write_stdout(&text)
}

/// Prints, treating a closed pipe (`vramcal estimate ... | head`) as success rather than a panic.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// "12.34 GiB (13,250,000,000 B)"
fn bytes(b: u64) -> String {
    format!("{:>10.2} GiB  ({} B)", b as f64 / GIB, thousands(b))
}

pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// The answer in one line, read first: whether the job fits the named GPU (with the memory it
/// needs of the capacity, and the largest batch / sequence when asked), else what the memory
/// per GPU is and the smallest catalog setup that holds it.
pub fn answer(e: &Estimate) -> String {
    let need = e.memory.device_used as f64 / GIB;
    let mut out = match &e.verdict {
        Some(v) => format!(
            "{}: {need:.1} GiB per GPU of {:.1} GiB{} ({} GPU(s), ZeRO {}, checkpointing {})",
            if v.fits { "FITS" } else { "DOES NOT FIT" },
            v.capacity_bytes as f64 / GIB,
            v.gpu.map(|g| format!(" on {g}")).unwrap_or_default(),
            e.train.spec.gpus,
            e.train.spec.zero_stage,
            e.train.spec.checkpointing
        ),
        None => format!("{need:.1} GiB per GPU (device memory at the peak)"),
    };
    if let Some(v) = &e.verdict {
        match (v.fits, v.fits_at_band_high, e.memory.error_band.pct) {
            (true, Some(false), Some(p)) => out.push_str(&format!(
                ", but not at the +{p:.1} % edge of its expected error"
            )),
            (true, Some(true), Some(p)) => out.push_str(&format!(
                ", also at the +{p:.1} % edge of its expected error"
            )),
            _ => {}
        }
    }
    if let Some(sr) = &e.search {
        if let Some(b) = sr.max_batch {
            out.push_str(&format!("; max batch {b}"));
        }
        if let Some(q) = sr.max_seq {
            out.push_str(&format!("; max seq {q}"));
        }
    }
    let fits = e.verdict.as_ref().is_some_and(|v| v.fits);
    if !fits {
        // the recommendation repeats the verdict before its "; " when there is one
        let r = &e.recommendation;
        let advice = r.split_once("; ").map_or(r.as_str(), |(_, rest)| rest);
        out.push_str(&format!(" — {advice}"));
    }
    out
}

/// The human-readable report: the answer first, then one aligned `label  value` line per figure.
pub fn render(e: &Estimate) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}\n", answer(e));
    let t = &e.train;
    let row = |o: &mut String, label: &str, value: String| {
        let _ = writeln!(o, "  {label:<28} {value}");
    };
    let _ = writeln!(
        o,
        "{} ({}), coefficients: {}",
        e.model,
        e.family.as_str(),
        e.coefficients
    );
    if let Some(gpu) = e.verdict.as_ref().and_then(|v| v.gpu) {
        if e.coefficients != "literature" && !e.coefficients.starts_with(gpu) {
            let _ = writeln!(
                o,
                "note: the activation and overhead coefficients were measured on {}, not on {gpu}; \
                 calibrate {gpu} for its own table",
                e.coefficients
            );
        }
    }
    let input = match e.tokens_per_sample {
        Some(s) => format!("seq {s}"),
        None => format!("image {}", t.image),
    };
    let layout = if t.precision.is_mixed() && t.zero_stage >= 1 {
        "DeepSpeed layout: 16-bit weights and gradients, fp32 master and moments in the optimizer"
    } else if t.precision.is_mixed() {
        "torch autocast: fp32 weights, gradients and moments, plus a 16-bit weight copy"
    } else if t.precision.is_pure_half() {
        "true bf16: weights, gradients and moments all in bf16, no fp32 master"
    } else {
        "fp32 weights, gradients and moments"
    };
    let attention = match e.family {
        crate::spec::Family::Transformer => format!(", {} attention", t.attention),
        crate::spec::Family::Cnn => String::new(),
    };
    let _ = writeln!(
        o,
        "batch {} per GPU, {input}, {}, {} ({}){attention}, checkpointing {}, ZeRO stage {} over {} GPU(s){}\nstates: {layout}",
        t.batch, t.precision, t.optimizer, t.optimizer_impl, t.checkpointing, t.zero_stage, t.gpus,
        if t.grad_accum > 1 {
            format!(
                ", {} micro-batches per optimizer step (global batch {})",
                t.grad_accum, e.train.global_batch
            )
        } else {
            String::new()
        }
    );
    let tuning = match &t.lora {
        Some(l) => format!(
            "{} rank {} on {} of every block from block {}, base {} bits, {} adapters",
            t.finetune.as_str(),
            l.rank,
            l.targets.join(","),
            t.freeze_layers,
            l.base_bits,
            l.adapter_dtype
        ),
        None if t.freeze_layers > 0 => format!(
            "full, embeddings and the first {} block(s) frozen",
            t.freeze_layers
        ),
        None => "full".to_string(),
    };
    let offload = if t.offload.optimizer() {
        format!(", offload {} to host", t.offload.as_str())
    } else if t.optimizer_in_backward {
        ", optimizer stepped inside backward".to_string()
    } else {
        String::new()
    };
    let offload = match t.cross_entropy {
        crate::plan::finetune::CrossEntropy::Full => offload,
        c => format!("{offload}, {} cross-entropy", c.as_str()),
    };
    let offload = match t.compile {
        crate::plan::finetune::Compile::None => offload,
        c => format!("{offload}, torch.compile of the {}", c.as_str()),
    };
    let offload = if t.offload_activations {
        format!("{offload}, activations offloaded to host memory")
    } else {
        offload
    };
    let _ = writeln!(
        o,
        "fine-tuning: {tuning}{offload}; trainable {} of {} parameters\n",
        thousands(t.trainable_params),
        thousands(e.params)
    );
    let _ = writeln!(o, "Parameters");
    row(&mut o, "exact", thousands(e.params));
    if let Some(moe) = &e.moe {
        row(
            &mut o,
            "active per token",
            format!(
                "{} (top {} of {} experts)",
                thousands(moe.active_params),
                moe.top_k,
                moe.experts
            ),
        );
    }
    if let Some(v) = &e.vision {
        row(
            &mut o,
            "of which vision",
            format!(
                "{} (tower {}, projector {})",
                thousands(v.tower_params + v.projector_params),
                thousands(v.tower_params),
                thousands(v.projector_params)
            ),
        );
    }
    if let Some(a) = e.params_12ld2 {
        row(
            &mut o,
            "rule of thumb 12·L·d²",
            format!(
                "{} ({:+.1} %)",
                thousands(a),
                (a as f64 / e.params as f64 - 1.0) * 100.0
            ),
        );
    }
    let m = &e.memory;
    let _ = writeln!(o, "\nGPU memory per GPU");
    row(&mut o, "weights", bytes(m.weights));
    // with the optimizer in backward only one tensor's gradient (and its update) is live
    let gradients = if e.train.optimizer_in_backward {
        "gradients (one tensor)"
    } else {
        "gradients"
    };
    row(&mut o, gradients, bytes(m.gradients));
    row(&mut o, "optimizer states", bytes(m.optimizer));
    row(&mut o, "activations", bytes(m.activations));
    row(&mut o, "overhead", bytes(m.overhead));
    if m.backward_overlap > 0 {
        // PyTorch frees each layer's activations as backward allocates its gradients
        row(
            &mut o,
            "freed as gradients arrive",
            format!("{}  (subtracted)", bytes(m.backward_overlap)),
        );
    }
    row(&mut o, "allocated peak", bytes(m.total));
    if m.device_used > m.total {
        row(
            &mut o,
            "allocator reserve",
            bytes(m.reserved_peak - m.total),
        );
        row(&mut o, "CUDA context", bytes(m.cuda_context));
        if m.nccl_buffers > 0 {
            row(&mut o, "NCCL buffers", bytes(m.nccl_buffers));
        }
        row(&mut o, "device memory used", bytes(m.device_used));
    }
    let band = &e.memory.error_band;
    row(
        &mut o,
        "expected error",
        match (band.low, band.high) {
            (Some(l), Some(h)) => format!(
                "{:.2} to {:.2} GiB: {}",
                l as f64 / GIB,
                h as f64 / GIB,
                band.basis
            ),
            _ => band.basis.clone(),
        },
    );
    if m.too_large {
        row(
            &mut o,
            "too large",
            "a component exceeds 1 EiB and is shown clamped there; no GPU holds this job".into(),
        );
    }
    row(
        &mut o,
        "rule of thumb P·12+b·s·h·10",
        format!(
            "{}  {:+.1} % vs vramcal",
            bytes(e.seed_formula_bytes),
            e.seed_vs_total_pct
        ),
    );
    if let Some(v) = &e.verdict {
        row(
            &mut o,
            "capacity",
            format!(
                "{}  {}",
                bytes(v.capacity_bytes),
                if v.fits { "FITS" } else { "DOES NOT FIT" }
            ),
        );
    }
    if let Some(s) = &e.search {
        if let Some(b) = s.max_batch {
            row(&mut o, "max batch per GPU", b.to_string());
        }
        if let Some(q) = s.max_seq {
            row(&mut o, "max seq", q.to_string());
        }
    }
    let h = &e.host_ram;
    let _ = writeln!(o, "\nHost RAM per training process");
    row(
        &mut o,
        "loader b*sample*workers*3",
        format!(
            "{}  (sample {} B, {} workers)",
            bytes(h.loader_bytes),
            thousands(h.sample_bytes),
            h.workers
        ),
    );
    row(&mut o, "2 x parameter bytes", bytes(h.params_bytes));
    if h.offload_bytes > 0 {
        row(&mut o, "offloaded states (pinned)", bytes(h.offload_bytes));
    }
    if h.offload_activation_bytes > 0 {
        row(
            &mut o,
            "offloaded activations (pinned)",
            bytes(h.offload_activation_bytes),
        );
    }
    row(&mut o, "recommended (+30 %)", bytes(h.recommended_bytes));
    row(
        &mut o,
        "rule of thumb: 3 x VRAM",
        bytes(h.rule_of_thumb_bytes),
    );
    row(
        &mut o,
        "per node",
        format!(
            "{}  ({} processes x recommended)",
            bytes(h.per_node_recommended_bytes),
            h.processes_per_node
        ),
    );
    let s = &e.storage;
    let _ = writeln!(o, "\nStorage");
    row(
        &mut o,
        "model file fp32/fp16",
        format!(
            "{:.2} / {:.2} GiB",
            s.model_file.fp32 as f64 / GIB,
            s.model_file.fp16 as f64 / GIB
        ),
    );
    row(
        &mut o,
        "model file int8/int4",
        format!(
            "{:.2} / {:.2} GiB",
            s.model_file.int8 as f64 / GIB,
            s.model_file.int4 as f64 / GIB
        ),
    );
    row(
        &mut o,
        "checkpoint (weights+optim)",
        bytes(s.checkpoint_bytes),
    );
    row(
        &mut o,
        "total",
        format!(
            "{}  (data {:.2} GiB + cache {:.2} GiB + the last {} checkpoints kept; --keep-checkpoints)",
            bytes(s.total_bytes),
            s.raw_data_bytes as f64 / GIB,
            s.cache_bytes as f64 / GIB,
            s.checkpoints_kept
        ),
    );
    if let Some(st) = &e.step_time {
        let _ = writeln!(o, "\nStep time per GPU ({})", st.rate_source);
        row(&mut o, "FLOPs per GPU", format!("{:.3e}", st.flops_per_gpu));
        row(
            &mut o,
            "achieved rate",
            format!("{:.1} TFLOP/s", st.rate_flops_per_s / 1e12),
        );
        row(
            &mut o,
            "without recompute",
            secs(st.seconds_without_recompute),
        );
        row(&mut o, "with recompute", secs(st.seconds_with_recompute));
        if let Some(off) = &e.offload_time {
            row(
                &mut o,
                "of which offload",
                format!(
                    "{}  ({:.2} GB over PCIe at {:.0} GB/s, CPU Adam on {:.3e} params at {:.0e}/s)",
                    secs(off.seconds),
                    off.pcie_bytes / 1e9,
                    off.pcie_bytes_per_s / 1e9,
                    off.cpu_params,
                    off.cpu_params_per_s
                ),
            );
        }
        if let Some(c) = &st.communication {
            row(
                &mut o,
                "communication",
                format!(
                    "{} of {} not hidden by compute ({:.2} GB per GPU over {} at {:.0} GB/s)",
                    secs(c.exposed_s),
                    secs(c.total_s),
                    c.bytes_per_gpu / 1e9,
                    c.over,
                    c.bandwidth_bytes_per_s / 1e9
                ),
            );
        }
        row(
            &mut o,
            if st.grad_accum > 1 {
                "optimizer step"
            } else {
                "step"
            },
            secs(st.seconds),
        );
        row(
            &mut o,
            "samples/s (all GPUs)",
            format!("{:.1}", st.samples_per_s),
        );
    }
    if !e.advice.is_empty() {
        let _ = writeln!(o, "\nAdvice (rules of thumb, each with its source)");
        for a in &e.advice {
            let _ = writeln!(o, "  - {}: {}\n    ({})", a.rule, a.text, a.source);
        }
    }
    if let Some(tt) = &e.training_time {
        let _ = writeln!(o, "\nTime to train on {} tokens", thousands(tt.tokens));
        row(&mut o, "optimizer steps", thousands(tt.optimizer_steps));
        row(
            &mut o,
            "wall time",
            format!(
                "{:.1} h ({:.1} days)",
                tt.seconds / 3600.0,
                tt.seconds / 86400.0
            ),
        );
        row(&mut o, "GPU hours", format!("{:.0}", tt.gpu_hours));
    }
    if !e.gpu_choice.is_empty() {
        let _ = writeln!(o, "\nGPU choice (same per-GPU batch; fewest GPUs, then lowest ZeRO stage, then no checkpointing)");
        let _ = writeln!(
            o,
            "  {:<24} {:>6} {:>5} {:>6} {:>12} {:>12}",
            "GPU", "count", "ZeRO", "ckpt", "GiB per GPU", "step"
        );
        for c in &e.gpu_choice {
            match (c.layout, c.total_bytes) {
                (Some(l), Some(tot)) => {
                    let _ = writeln!(
                        o,
                        "  {:<24} {:>6} {:>5} {:>6} {:>12.2} {:>12}",
                        c.name,
                        l.gpus,
                        l.zero_stage,
                        if l.checkpointing { "full" } else { "none" },
                        tot as f64 / GIB,
                        c.step_time.map(|s| secs(s.seconds)).unwrap_or_default()
                    );
                }
                _ => {
                    let _ = writeln!(o, "  {:<24} {:>6}", c.name, "none fits");
                }
            }
        }
    }
    for n in &e.notes {
        let _ = writeln!(o, "\nNote: {n}");
    }
    let _ = writeln!(o, "\nRecommendation: {}", e.recommendation);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups() {
        assert_eq!(thousands(109_482_240), "109,482,240");
        assert_eq!(thousands(12), "12");
        assert_eq!(thousands(1000), "1,000");
    }
}
