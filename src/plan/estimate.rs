//! One planning answer: everything `vramcal estimate` prints, gathered in one serialisable
//! struct whose JSON is the stable schema documented in docs/estimate-schema.md.

use crate::coeffs::Coefficients;
use crate::plan::finetune::{self, Finetune, OffloadTime};
use crate::plan::gpus::{self, Gpu, Layout};
use crate::plan::host::{self, HostRam};
use crate::plan::memory::MemoryBreakdown;
use crate::plan::search::{self, Evaluator};
use crate::plan::step_time::{self, StepTime};
use crate::plan::storage::{self, Storage};
use crate::plan::{params, seed, time};
use crate::spec::{Checkpointing, Family, ModelSpec, TrainSpec};

/// Bytes in a GiB, for the notes' figures.
const GIB: f64 = (1u64 << 30) as f64;
use serde::Serialize;

/// Bumped only when a field changes meaning or disappears (new fields do not bump it).
pub const SCHEMA: u32 = 1;

/// What the caller wants beyond the memory breakdown.
#[derive(Debug, Clone)]
pub struct Options {
    /// GPU the job runs on (`--gpu`): capacity, and the peak used for step time
    pub gpu: Option<&'static Gpu>,
    /// capacity override (`--gpu-mem`); defaults to the GPU's memory
    pub capacity_bytes: Option<u64>,
    /// loader sample bytes; None = tokens x 4 or image C*H*W (host::default_sample_bytes)
    pub sample_bytes: Option<u64>,
    pub workers: u64,
    pub dataset_bytes: u64,
    pub cache_fraction: f64,
    pub checkpoints_kept: u64,
    pub max_batch: bool,
    pub max_seq: bool,
    /// per GPU type in the catalog, the fewest GPUs that fit (about 700 memory evaluations)
    pub choose_gpus: bool,
    /// training tokens (`--tokens`): the plan adds the time to train on them
    pub train_tokens: Option<u64>,
    /// a preemptible run (`--spot-mtbf-hours`): the advice adds a checkpoint interval
    pub spot: Option<crate::plan::advice::Spot>,
    /// node size and network, for the data-parallel communication in the step time
    pub cluster: crate::plan::comm::Cluster,
    /// fine-tuning mode, frozen blocks and offload (`--finetune`, `--freeze-layers`, `--offload`)
    pub finetune: Finetune,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            gpu: None,
            capacity_bytes: None,
            sample_bytes: None,
            workers: host::DEFAULT_WORKERS,
            dataset_bytes: 0,
            cache_fraction: storage::DEFAULT_CACHE_FRACTION,
            checkpoints_kept: storage::DEFAULT_KEPT,
            max_batch: false,
            max_seq: false,
            choose_gpus: true,
            train_tokens: None,
            spot: None,
            cluster: crate::plan::comm::Cluster::default(),
            finetune: Finetune::default(),
        }
    }
}

/// Does the job fit the given capacity?
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// catalog id, or null when only `--gpu-mem` was given
    pub gpu: Option<&'static str>,
    pub capacity_bytes: u64,
    pub fits: bool,
    /// capacity - total (negative when it does not fit)
    pub free_bytes: i64,
    /// whether it still fits at the error band's upper edge (null when the band is unknown)
    pub fits_at_band_high: Option<bool>,
}

/// `--max-batch` / `--max-seq` answers. null = not asked; 0 = not even 1 fits.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SearchResult {
    pub capacity_bytes: u64,
    pub max_batch: Option<u64>,
    pub max_seq: Option<u64>,
}

/// For one GPU type, the fewest GPUs that hold the job (None: not even 4096 do).
#[derive(Debug, Clone, Serialize)]
pub struct GpuChoice {
    pub gpu: &'static str,
    pub name: &'static str,
    pub memory_bytes: u64,
    pub layout: Option<Layout>,
    /// per-GPU device memory in use at the peak under that layout (`memory.device_used`)
    pub total_bytes: Option<u64>,
    pub step_time: Option<StepTime>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub schema: u32,
    pub model: String,
    pub family: Family,
    /// exact trainable parameter count
    pub params: u64,
    /// the rule of thumb 12*L*d^2 (transformers only)
    pub params_12ld2: Option<u64>,
    /// tokens per sample actually processed (transformers; ViT: patches + class token)
    pub tokens_per_sample: Option<u64>,
    /// transformers: the block settings the activation model used; null for CNNs
    pub block: Option<BlockSettings>,
    /// the training configuration, with what is fine-tuned and its exact trainable parameters
    pub train: TrainOut,
    /// per GPU, bytes
    pub memory: MemoryOut,
    /// the rule of thumb params*4*3 + batch*seq*hidden*10 (see plan::seed)
    pub seed_formula_bytes: u64,
    /// (seed - total) / total * 100
    pub seed_vs_total_pct: f64,
    /// the rule of thumb params*4*3 + batch*seq*hidden*10, by its name (the same value as
    /// `seed_formula_bytes`, which is kept for scripts written against schema 1)
    pub rule_of_thumb_bytes: u64,
    pub host_ram: HostRam,
    pub storage: Storage,
    /// null when neither `--gpu` nor a calibrated flops_per_s gives a rate
    pub step_time: Option<StepTime>,
    /// with `--offload`: the PCIe transfers and CPU optimizer step added to `step_time` (also
    /// without a GPU rate)
    pub offload_time: Option<OffloadTime>,
    pub verdict: Option<Verdict>,
    pub search: Option<SearchResult>,
    pub gpu_choice: Vec<GpuChoice>,
    pub recommendation: String,
    /// where the configuration works against itself (ZeRO-3 above ZeRO-2, checkpointing above
    /// none) and why the memory model says so; empty otherwise
    pub notes: Vec<String>,
    /// device_id of the coefficient table used
    pub coefficients: String,
    /// with `--tokens` and a step time: how long training on them takes
    pub training_time: Option<TrainingTime>,
    /// the capacity-planning rules of thumb that apply, each labelled with its rule and source
    pub advice: Vec<crate::plan::advice::Advice>,
    /// mixture of experts: total and active parameters and the expert layout; absent for
    /// dense models
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeOut>,
    /// vision-language models: the vision tower and projector; absent otherwise
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionOut>,
    /// `--safetensors`: the checkpoint's exact counts and dtypes and their cross-check with the
    /// config; absent without it (set by the CLI, which reads the file)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<crate::plan::checkpoint::CheckpointReport>,
}

/// A mixture-of-experts model's parameters and expert layout.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MoeOut {
    /// every parameter, all experts (= `params`): what the model states hold
    pub total_params: u64,
    /// what one token's forward uses: the top-k routed experts, router, shared expert and
    /// everything outside the feed-forward
    pub active_params: u64,
    /// routed experts' parameters over all blocks (what `expert_parallel` divides)
    pub expert_params: u64,
    pub experts: u64,
    pub top_k: u64,
    pub moe_layers: u64,
    pub expert_parallel: u64,
    /// routed slots per expert relative to an even split (1.0: dropless, as in transformers)
    pub capacity_factor: f32,
}

impl MoeOut {
    pub fn of(model: &ModelSpec) -> Option<MoeOut> {
        let ModelSpec::Transformer(t) = model else {
            return None;
        };
        let m = t.extras.moe.as_deref()?;
        let p = params::transformer(t);
        Some(MoeOut {
            total_params: p.total,
            active_params: p.active,
            expert_params: crate::plan::moe::expert_params(t),
            experts: m.experts,
            top_k: m.top_k,
            moe_layers: p.moe_layers,
            expert_parallel: m.expert_parallel,
            capacity_factor: m.capacity_factor.0,
        })
    }
}

/// A vision-language model's vision tower and projector, and what one sample sends through them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VisionOut {
    /// the encoder's parameters (in `params`)
    pub tower_params: u64,
    /// the multimodal projector's (in `params`)
    pub projector_params: u64,
    /// images, or crops of a tiled image, the tower encodes per sample (`--images`)
    pub images_per_sample: u64,
    /// tokens the tower runs over per image (patches, with a class token where it has one)
    pub tower_tokens_per_image: u64,
    /// the tower's layers, width and heads
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
}

impl VisionOut {
    pub fn of(model: &ModelSpec) -> Option<VisionOut> {
        let ModelSpec::Transformer(t) = model else {
            return None;
        };
        let v = t.extras.vision.as_deref()?;
        Some(VisionOut {
            tower_params: v.encoder_params(),
            projector_params: v.projector,
            images_per_sample: v.images,
            tower_tokens_per_image: v.tokens(),
            layers: v.layers,
            hidden: v.hidden,
            heads: v.heads,
        })
    }
}

/// Time to train on `tokens`: optimizer steps x the step time (which holds the step's FLOPs,
/// 6·P per token plus attention, 8·P with full recompute, at the achieved rate, and the
/// exposed communication).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TrainingTime {
    pub tokens: u64,
    pub optimizer_steps: u64,
    pub seconds: f64,
    pub gpu_hours: f64,
}

/// The memory breakdown with the plan's expected error (flattened into one JSON object `memory`).
#[derive(Debug, Clone, Serialize)]
pub struct MemoryOut {
    #[serde(flatten)]
    pub breakdown: MemoryBreakdown,
    pub error_band: ErrorBand,
}

impl std::ops::Deref for MemoryOut {
    type Target = MemoryBreakdown;
    fn deref(&self) -> &MemoryBreakdown {
        &self.breakdown
    }
}

/// How far the planned device memory may be off: from the coefficient table's k-fold held-out
/// errors for this mode (95 % of the held-out points within ±`pct`), or unknown when the table
/// holds none (the literature defaults, or a table fitted before it stored them).
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBand {
    /// bytes: `device_used` x (1 - pct/100), or null when unknown
    pub low: Option<u64>,
    /// bytes: `device_used` x (1 + pct/100), or null when unknown
    pub high: Option<u64>,
    /// the held-out 95th-percentile absolute error, percent
    pub pct: Option<f64>,
    pub basis: String,
}

/// The band for a plan under `coeffs` (see [`ErrorBand`]).
pub fn error_band(
    coeffs: &Coefficients,
    model: &ModelSpec,
    train: &TrainSpec,
    device_used: u64,
) -> ErrorBand {
    let key = format!("{}/{}", model.family().as_str(), train.precision);
    let held = coeffs
        .residuals
        .as_ref()
        .and_then(|r| r.get(&key))
        .and_then(|m| m.get("heldout_memory"));
    let pct = held.and_then(|h| h["p95_abs_pct"].as_f64());
    let n = held.and_then(|h| h["n"].as_u64()).unwrap_or(0);
    match pct {
        Some(p) if p.is_finite() && n > 0 => ErrorBand {
            low: Some((device_used as f64 * (1.0 - p / 100.0)).max(0.0) as u64),
            high: Some((device_used as f64 * (1.0 + p / 100.0)).min(MAX_BAND) as u64),
            pct: Some(p),
            basis: format!(
                "95 % of {n} held-out {key} points on {} within ±{p:.1} % (k-fold, table {})",
                coeffs.device_name, coeffs.device_id
            ),
        },
        _ => ErrorBand {
            low: None,
            high: None,
            pct: None,
            basis: format!(
                "uncalibrated for {key} on this device ({} table): error unknown",
                coeffs.device_id
            ),
        },
    }
}

/// Upper edge of a band, kept below u64's range.
const MAX_BAND: f64 = 1.8e19;

/// [`TrainSpec`] plus the fine-tuning settings (flattened into one JSON object `train`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainOut {
    #[serde(flatten)]
    pub spec: TrainSpec,
    /// `full`, `lora` or `qlora`
    pub finetune: finetune::FinetuneMode,
    /// exact: parameters with gradients and optimizer states
    pub trainable_params: u64,
    /// frozen base parameters (0 in plain full training)
    pub frozen_params: u64,
    /// LoRA/QLoRA only: `rank`, `targets` (canonical linear names), `dropout`, `base_bits`,
    /// `base_bytes_per_param` of the quantized block linears and its source
    pub lora: Option<LoraOut>,
    pub freeze_layers: u64,
    /// `none`, `optimizer`, `optimizer+params`
    pub offload: finetune::Offload,
    /// bytes moved to pinned host memory per process by `offload`
    pub offloaded_bytes: u64,
    pub paged_optimizer: bool,
    /// the optimizer steps each parameter inside backward (`--optimizer-in-backward`): the
    /// plan's `gradients` are one tensor's gradient and its update's temporaries
    pub optimizer_in_backward: bool,
    /// how the LM loss is computed (`--cross-entropy`)
    pub cross_entropy: finetune::CrossEntropy,
    /// what runs under `torch.compile` (`--compile`)
    pub compile: finetune::Compile,
    /// saved activations offloaded to host memory (`--offload-activations`)
    pub offload_activations: bool,
    /// samples per optimizer step over all GPUs: batch x grad_accum x gpus
    pub global_batch: u64,
    /// tokens per optimizer step over all GPUs (transformers; null for CNNs)
    pub global_tokens: Option<u64>,
}

impl std::ops::Deref for TrainOut {
    type Target = TrainSpec;
    fn deref(&self) -> &TrainSpec {
        &self.spec
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoraOut {
    pub rank: u64,
    pub targets: Vec<String>,
    pub dropout: f32,
    pub base_bits: u8,
    /// bytes per quantized parameter (null when the base is not quantized)
    pub base_bytes_per_param: Option<f64>,
    pub base_source: Option<&'static str>,
    /// the adapters' weights as trained: "fp32" (peft's default over a 16-bit base, and the
    /// master weights of mixed precision) or "bf16" (`--adapter-dtype base` in true bf16)
    pub adapter_dtype: &'static str,
}

fn train_out(model: &ModelSpec, train: &TrainSpec, ft: &Finetune) -> TrainOut {
    let s = finetune::split(model, ft);
    let lora = match model {
        ModelSpec::Transformer(t) if ft.is_adapter() => Some(LoraOut {
            rank: ft.rank,
            targets: ft.adapted(t).iter().map(|l| l.name.to_string()).collect(),
            dropout: ft.lora_dropout,
            base_bits: ft.base_bits,
            base_bytes_per_param: match ft.base_bits {
                4 => Some(finetune::NF4_BITS_PER_PARAM / 8.0),
                8 => Some(1.0),
                _ => None,
            },
            base_source: match ft.base_bits {
                4 => Some("NF4 with double quantization: 4 + 8/64 + 32/(64*256) bits (Dettmers et al. 2023, QLoRA)"),
                8 => Some("LLM.int8(): 1 byte per weight + an fp32 scale per output row (Dettmers et al. 2022)"),
                _ => None,
            },
            // the trainable parameters' own layout: true bf16 keeps bf16 adapters, unless
            // they are peft's fp32 ones; mixed precision trains fp32 master weights
            adapter_dtype: if ft.trainable_train(train).precision.is_pure_half() {
                "bf16"
            } else {
                "fp32"
            },
        }),
        _ => None,
    };
    TrainOut {
        spec: train.clone(),
        finetune: ft.mode,
        trainable_params: s.trainable,
        frozen_params: s.frozen,
        lora,
        freeze_layers: ft.freeze_layers,
        offload: ft.offload,
        offloaded_bytes: finetune::offloaded_bytes(model, train, ft),
        paged_optimizer: ft.paged_optimizer,
        optimizer_in_backward: ft.optimizer_in_backward,
        cross_entropy: ft.cross_entropy,
        compile: ft.compile,
        offload_activations: ft.offload_activations,
        global_batch: train.batch * train.grad_accum * train.gpus,
        global_tokens: match model {
            ModelSpec::Transformer(t) => Some(
                t.effective_seq(train.seq, train.image)
                    * train.batch
                    * train.grad_accum
                    * train.gpus,
            ),
            ModelSpec::Cnn(_) => None,
        },
    }
}

/// What a transformer's activations were planned with: the measured block implementation its
/// blocks match, or are planned as with their departures' bytes added (`plan::departures`:
/// Qwen3, Gemma2/3, OLMo2 and MoE blocks as Llama's, Phi, GPT-J, Falcon and OPT as GPT-2's,
/// DistilBERT and ELECTRA as BERT's; null when none applies), the measured table of PyTorch's
/// saved bytes a family is planned from instead (`table`; null when none), the generic
/// coefficients when both are null (which model neither setting), the dropout probability and
/// the MLP activation in effect (the spec's own, else the architecture's transformers default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BlockSettings {
    pub kind: Option<crate::spec::transformer::BlockKind>,
    pub table: Option<&'static str>,
    pub dropout: f32,
    pub activation: crate::spec::transformer::Activation,
}

impl BlockSettings {
    pub fn of(model: &ModelSpec) -> Option<Self> {
        match model {
            ModelSpec::Transformer(t) => Some(Self {
                kind: crate::plan::departures::planned_block(t),
                table: measured_table(t),
                dropout: t.dropout_p().0,
                activation: t.activation_kind(),
            }),
            ModelSpec::Cnn(_) => None,
        }
    }
}

/// The measured table a transformer's saved bytes come from (`plan::encdec_saved`,
/// `plan::deberta_saved`, `plan::mla_saved`), if any.
fn measured_table(t: &crate::spec::transformer::TransformerSpec) -> Option<&'static str> {
    use crate::plan::encdec_saved::{family, Family};
    if let Some(e) = t.extras.enc_dec.as_deref() {
        return family(t, e).map(|f| match f {
            Family::T5 => "t5",
            Family::T5Gated => "t5-gated",
            Family::Bart => "bart",
        });
    }
    if crate::plan::deberta_saved::applies(t) {
        return Some("deberta-v3");
    }
    t.extras.mla.as_ref().map(|_| "latent-attention")
}

fn step_for(
    model: &ModelSpec,
    train: &TrainSpec,
    ev: &Evaluator,
    gpu: Option<&Gpu>,
    cluster: &crate::plan::comm::Cluster,
) -> anyhow::Result<Option<StepTime>> {
    // A calibrated table's time terms describe the device it was measured on: they apply when
    // no GPU is named or the named GPU is that device (ids like "h100-80gb" start with "h100");
    // for any other GPU the literature's mfu x datasheet peak is the honest estimate.
    let own = &ev.mode().time;
    let same_device = gpu.is_none_or(|g| ev.device_id().starts_with(g.id));
    let literature;
    let time = if own.flops_per_s.value > 0.0 && !same_device {
        literature = crate::coeffs::Coefficients::literature_ref()
            .mode(model.family(), train.precision)
            .time;
        &literature
    } else {
        own
    };
    let Some(rate) = step_time::rate(time, gpu, train.precision) else {
        return Ok(None);
    };
    let ft = ev.finetune();
    let flops = time::finetune_flops(model, train, ft, time::step_flops(model, train)?);
    let step = step_time::step_time(
        &flops,
        rate,
        time,
        train.checkpointing,
        train.batch,
        train.gpus,
        train.grad_accum,
    );
    // the last micro-batch's backward is the window communication can hide behind
    let window = step.seconds / train.grad_accum.max(1) as f64;
    let comm = crate::plan::comm::communication(ev.params(), train, gpu, cluster, window);
    Ok(Some(with_offload(
        step.with_communication(comm, train.batch, train.gpus),
        finetune::offload_time(model, train, ft),
        train,
    )))
}

/// Adds the offload's transfers and CPU optimizer step (`plan::finetune::offload_time`) to an
/// assembled step time.
fn with_offload(mut st: StepTime, off: Option<OffloadTime>, train: &TrainSpec) -> StepTime {
    if let Some(o) = off {
        st.seconds_without_recompute += o.seconds;
        st.seconds_with_recompute += o.seconds;
        st.seconds += o.seconds;
        st.samples_per_s = (train.batch * train.grad_accum * train.gpus) as f64 / st.seconds;
    }
    st
}

fn layout_train(train: &TrainSpec, l: Layout) -> TrainSpec {
    TrainSpec {
        gpus: l.gpus,
        zero_stage: l.zero_stage,
        checkpointing: if l.checkpointing {
            Checkpointing::Full
        } else {
            Checkpointing::None
        },
        ..train.clone()
    }
}

fn choose_all(
    model: &ModelSpec,
    train: &TrainSpec,
    ev: &Evaluator,
    cluster: &crate::plan::comm::Cluster,
) -> anyhow::Result<Vec<GpuChoice>> {
    let cnn = matches!(model, ModelSpec::Cnn(_));
    let mut out = Vec::with_capacity(gpus::CATALOG.len());
    for g in gpus::CATALOG {
        let layout = gpus::choose(g.memory_bytes, |l| {
            if cnn && l.checkpointing {
                return None; // checkpointing is modelled for transformer blocks only
            }
            if ev
                .finetune()
                .validate(model, &layout_train(train, l))
                .is_err()
            {
                return None; // e.g. offload without ZeRO
            }
            ev.breakdown(&layout_train(train, l))
                .ok()
                .filter(|b| !b.too_large)
                .map(|b| b.device_used)
        });
        let (total_bytes, step) = match layout {
            Some(l) => {
                let t = layout_train(train, l);
                (
                    Some(ev.breakdown(&t)?.device_used),
                    step_for(model, &t, ev, Some(g), cluster)?,
                )
            }
            None => (None, None),
        };
        out.push(GpuChoice {
            gpu: g.id,
            name: g.name,
            memory_bytes: g.memory_bytes,
            layout,
            total_bytes,
            step_time: step,
        });
    }
    Ok(out)
}

fn describe(l: &Layout, name: &str) -> String {
    format!(
        "{} x {name} (ZeRO stage {}, checkpointing {})",
        l.gpus,
        l.zero_stage,
        if l.checkpointing { "full" } else { "none" }
    )
}

fn recommend(
    verdict: Option<&Verdict>,
    train: &TrainSpec,
    choices: &[GpuChoice],
    searched: bool,
) -> String {
    // Fewest GPUs first, then the smallest card among them (the catalog is ordered by memory).
    let best = choices
        .iter()
        .filter_map(|c| c.layout.map(|l| (l, c)))
        .min_by_key(|(l, c)| (l.gpus, c.memory_bytes));
    let best_text = best
        .map(|(l, c)| format!("smallest fitting setup: {}", describe(&l, c.name)))
        .unwrap_or_else(|| {
            if searched {
                "no catalog GPU holds it with up to 4096 GPUs".to_string()
            } else {
                // --no-gpu-choice: nothing was searched, so nothing can be said to be missing
                "the catalog was not searched (--no-gpu-choice)".to_string()
            }
        });
    match verdict {
        Some(v) if v.fits => format!(
            "fits: {} GPU(s) with ZeRO stage {} and checkpointing {}, {:.1} GiB free per GPU",
            train.gpus,
            train.zero_stage,
            train.checkpointing,
            v.free_bytes as f64 / (1u64 << 30) as f64
        ),
        Some(v) => format!(
            "does not fit: {:.1} GiB over per GPU; {best_text}",
            -v.free_bytes as f64 / (1u64 << 30) as f64
        ),
        None => best_text,
    }
}

/// Settings that cost memory instead of saving it for this job, with the mechanism. Both are real:
/// users expect ZeRO-3 and checkpointing always to help, and a plan that silently shows more
/// memory for them looks like a bug.
fn counterintuitive(
    train: &TrainSpec,
    memory: &MemoryBreakdown,
    ev: &Evaluator,
) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    if memory.too_large {
        return Ok(notes);
    }
    if train.zero_stage == 3 {
        let z2 = ev.breakdown(&TrainSpec {
            zero_stage: 2,
            ..train.clone()
        })?;
        if z2.total < memory.total {
            notes.push(format!(
                "ZeRO stage 3 needs {:.2} GiB more per GPU than stage 2 here: it all-gathers one \
                 block's full weights and gradients at a time (ZeRO paper, sec. 5.3), which over \
                 {} GPU(s) outweighs the weight shards it saves",
                (memory.total - z2.total) as f64 / GIB,
                train.gpus
            ));
        }
    }
    if train.checkpointing.is_on() {
        let plain = ev.breakdown(&TrainSpec {
            checkpointing: Checkpointing::None,
            ..train.clone()
        })?;
        if plain.total < memory.total {
            notes.push(format!(
                "full checkpointing needs {:.2} GiB more per GPU than none here: it stores every \
                 block's input on top of one block's recomputed activations, which only pays off \
                 with several blocks",
                (memory.total - plain.total) as f64 / GIB
            ));
        }
    }
    Ok(notes)
}

/// Attention the plan assumes that transformers would not run by default: soft-capped attention
/// (Gemma2) under sdpa. transformers refuses sdpa for it and runs eager attention unless
/// FlashAttention-2 is asked for; the plan's sdpa is a fused kernel that caps in the tile, so
/// the note gives what transformers' default (eager) needs on top. Classes with no sdpa path at
/// all (BLOOM, DeBERTa-v2) are planned eager (`plan::memory::features`); the note says so.
fn attention_caveats(
    model: &ModelSpec,
    train: &TrainSpec,
    memory: &MemoryBreakdown,
    ev: &Evaluator,
) -> anyhow::Result<Vec<String>> {
    let ModelSpec::Transformer(t) = model else {
        return Ok(Vec::new());
    };
    if t.extras.eager_only && train.attention == crate::spec::Attention::Sdpa {
        return Ok(vec![
            "transformers has no sdpa attention for this model class and runs eager attention \
             (the b·a·s² scores stored per layer) whatever is asked; planned as eager"
                .to_string(),
        ]);
    }
    let fused_only = if t.extras.attn_softcap {
        "soft-capped attention (attn_logit_softcapping)"
    } else if t.extras.attn_sinks {
        "attention with sink logits (gpt-oss)"
    } else {
        ""
    };
    if fused_only.is_empty() || train.attention != crate::spec::Attention::Sdpa || memory.too_large
    {
        return Ok(Vec::new());
    }
    let eager = ev.breakdown(&TrainSpec {
        attention: crate::spec::Attention::Eager,
        ..train.clone()
    })?;
    Ok(vec![format!(
        "{fused_only}: transformers has no sdpa path for this model and runs eager attention by \
         default, which stores the b·a·s² scores and needs {:.2} GiB more per GPU than planned \
         here; this plan assumes a fused kernel that applies them in the tile \
         (attn_implementation=\"flash_attention_2\" or a kernels-hub FlashAttention), else plan \
         with --attention eager",
        eager.total.saturating_sub(memory.total) as f64 / GIB
    )])
}

/// What a vision-language plan assumes about the images: the tower's passes per sample, and
/// that `--seq` already holds the image tokens the projector inserts.
fn vision_note(model: &ModelSpec, train: &TrainSpec) -> Option<String> {
    let ModelSpec::Transformer(t) = model else {
        return None;
    };
    let v = t.extras.vision.as_deref()?;
    Some(format!(
        "vision-language model: per sample the vision tower encodes {} image(s) of {} tokens \
         ({}x{} pixels; --images sets the count), planned as a {}-layer encoder beside the language \
         model, whose --seq {} must already count the image tokens the projector inserts; with \
         LoRA/QLoRA the tower is frozen and unadapted (it then saves nothing for backward)",
        v.images,
        v.tokens(),
        v.image,
        v.image,
        v.layers,
        train.seq
    ))
}

/// Bytes `--offload-activations` keeps in pinned host memory on one rank: the activations the
/// same plan holds on the device without it, less those it holds with it (0 without the flag).
fn offloaded_activation_bytes(
    ev: &Evaluator,
    train: &TrainSpec,
    memory: &MemoryBreakdown,
) -> anyhow::Result<u64> {
    if !ev.finetune().offload_activations {
        return Ok(0);
    }
    let on_device = ev
        .clone()
        .with_finetune(Finetune {
            offload_activations: false,
            ..ev.finetune().clone()
        })
        .breakdown(train)?;
    Ok(on_device.activations.saturating_sub(memory.activations))
}

/// What activation offloading moves and what it costs in transfers: each offloaded byte crosses
/// PCIe twice per micro-batch, on a side stream that torchtune overlaps with compute.
fn offload_activations_note(moved_bytes: u64, train: &TrainSpec) -> String {
    let bytes = moved_bytes as f64;
    let per_step = 2.0 * bytes * train.grad_accum.max(1) as f64;
    format!(
        "activation offloading (torchtune's OffloadActivations): {:.2} GiB of saved activations \
         per GPU wait in pinned host memory (counted in host RAM); the device keeps one block's \
         and the head's. {:.2} GiB cross PCIe per optimizer step, {:.2} s at {:.0} GB/s: hidden \
         behind compute on a side stream when the step is longer, else added (not in the step \
         time above)",
        bytes / GIB,
        per_step / GIB,
        per_step / finetune::PCIE_BYTES_PER_S,
        finetune::PCIE_BYTES_PER_S / 1e9
    )
}

/// Plans one training job. Validates the model and the training configuration first.
pub fn estimate(
    model: &ModelSpec,
    train: &TrainSpec,
    coeffs: &Coefficients,
    opts: &Options,
) -> anyhow::Result<Estimate> {
    opts.finetune.validate(model, train)?;
    let ev = Evaluator::new(model, train, coeffs)?.with_finetune(opts.finetune.clone());
    let memory = ev.breakdown(train)?;
    let p = ev.params();
    let (params_12ld2, tokens) = match model {
        ModelSpec::Transformer(t) => (
            Some(params::seed_approx(t)),
            Some(t.effective_seq(train.seq, train.image)),
        ),
        ModelSpec::Cnn(_) => (None, None),
    };
    let seed_formula_bytes = seed::seed_bytes(model, p, train);
    let band = error_band(coeffs, model, train, memory.device_used);
    let capacity = opts.capacity_bytes.or(opts.gpu.map(|g| g.memory_bytes));
    let verdict = capacity.map(|c| Verdict {
        gpu: opts.gpu.map(|g| g.id),
        capacity_bytes: c,
        fits: memory.fits(c),
        // both sides are below 2^63 (capacity <= 1e18 by parse, device_used <= 3 * 2^60)
        free_bytes: (c as i128 - memory.device_used as i128) as i64,
        fits_at_band_high: band.high.map(|h| memory.fits(c) && h <= c),
    });
    let search = match capacity {
        Some(c) if opts.max_batch || opts.max_seq => Some(SearchResult {
            capacity_bytes: c,
            max_batch: if opts.max_batch {
                Some(search::max_batch(&ev, train, c)?.unwrap_or(0))
            } else {
                None
            },
            max_seq: if opts.max_seq {
                Some(search::max_seq(model, &ev, train, c)?.unwrap_or(0))
            } else {
                None
            },
        }),
        _ => None,
    };
    let sample_bytes = opts
        .sample_bytes
        .unwrap_or_else(|| host::default_sample_bytes(model, train));
    let host_ram = host::host_ram(
        p,
        train.precision,
        train.batch,
        sample_bytes,
        opts.workers,
        capacity.unwrap_or(memory.total),
    )
    .with_offload(finetune::offloaded_bytes(model, train, &opts.finetune))
    .with_offload_activations(offloaded_activation_bytes(&ev, train, &memory)?)
    .per_node(train.gpus, opts.cluster.gpus_per_node);
    let offloaded_activations = host_ram.offload_activation_bytes;
    let storage = storage::storage(
        p,
        train,
        opts.dataset_bytes,
        opts.cache_fraction,
        opts.checkpoints_kept,
    );
    let step = step_for(model, train, &ev, opts.gpu, &opts.cluster)?;
    let gpu_choice = if opts.choose_gpus {
        choose_all(model, train, &ev, &opts.cluster)?
    } else {
        Vec::new()
    };
    Ok(Estimate {
        schema: SCHEMA,
        model: model.name().to_string(),
        family: model.family(),
        params: p,
        params_12ld2,
        tokens_per_sample: tokens,
        block: BlockSettings::of(model),
        train: train_out(model, train, &opts.finetune),
        seed_vs_total_pct: (seed_formula_bytes as f64 - memory.total as f64) / memory.total as f64
            * 100.0,
        memory: MemoryOut {
            breakdown: memory,
            error_band: band,
        },
        seed_formula_bytes,
        rule_of_thumb_bytes: seed_formula_bytes,
        host_ram,
        storage,
        training_time: match (opts.train_tokens, step, tokens) {
            (Some(d), Some(st), Some(t)) => {
                let per_step = t * train.batch * train.grad_accum * train.gpus;
                let steps = d.div_ceil(per_step.max(1));
                let seconds = steps as f64 * st.seconds;
                Some(TrainingTime {
                    tokens: d,
                    optimizer_steps: steps,
                    seconds,
                    gpu_hours: seconds * train.gpus as f64 / 3600.0,
                })
            }
            _ => None,
        },
        advice: crate::plan::advice::advice(
            train.gpus,
            &opts.cluster,
            step.as_ref(),
            opts.gpu.map(|g| g.link_gbs),
            storage.checkpoint_bytes,
            opts.spot.as_ref(),
        ),
        step_time: step,
        moe: MoeOut::of(model),
        vision: VisionOut::of(model),
        checkpoint: None,
        offload_time: finetune::offload_time(model, train, &opts.finetune),
        recommendation: recommend(verdict.as_ref(), train, &gpu_choice, opts.choose_gpus),
        notes: {
            let mut n = counterintuitive(train, &memory, &ev)?;
            n.extend(attention_caveats(model, train, &memory, &ev)?);
            n.extend(vision_note(model, train));
            if opts.finetune.optimizer_in_backward {
                n.push("optimizer in backward (torchtune's optimizer_in_bwd): each parameter is stepped as its gradient arrives, so the gradients above are one tensor's with its update's temporaries; clipping by the global gradient norm and gradient accumulation are impossible in this mode".into());
            }
            if opts.finetune.offload_activations {
                n.push(offload_activations_note(offloaded_activations, train));
            }
            if train.optimizer == crate::spec::Optimizer::AdamW8bit {
                // calibration/data/published-gpu-peaks.csv B10
                n.push("8-bit AdamW: its moments are planned at 2 B per parameter plus block scales, but not the step's transients (dequantized moments of the tensor being updated); torchtune's published Llama 3.2 3B run with 8-bit AdamW peaked 15 % above this plan's form, so keep that headroom".into());
            }
            if opts.finetune.paged_optimizer {
                n.push("paged optimizer: bitsandbytes keeps the optimizer states in CUDA unified memory and pages them to host RAM only under memory pressure; planned as resident (no saving counted)".into());
            }
            n
        },
        verdict,
        search,
        gpu_choice,
        coefficients: coeffs.device_id.clone(),
    })
}
