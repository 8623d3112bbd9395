//! Parameter-efficient and partial fine-tuning: LoRA (Hu et al. 2021), QLoRA (Dettmers et al.
//! 2023), an LLM.int8() base (Dettmers et al. 2022), frozen leading blocks, and ZeRO-Offload /
//! ZeRO-Infinity of optimizer states and parameters to host memory (Ren et al. 2021, Rajbhandari
//! et al. 2021). docs/architecture.md, "Fine-tuning", has the formulas and their sources.
//!
//! Full fine-tuning with nothing frozen and nothing offloaded ([`Finetune::default`]) leaves
//! every plan exactly as without this module.

use crate::error::{check_range, input_err};
use crate::plan::memory::{state_bytes, FitTerms, StateBytes};
use crate::plan::params;
use crate::spec::transformer::{BlockKind, FfnKind, NormKind, TransformerSpec};
use crate::spec::{ModelSpec, Precision, TrainSpec};
use serde::Serialize;

/// What is trained.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneMode {
    /// every parameter (less `--freeze-layers`)
    #[default]
    Full,
    /// frozen base in the precision's weight dtype, rank-R adapters trained
    Lora,
    /// frozen NF4 base (block linears), 16-bit rest, rank-R adapters trained
    Qlora,
}

impl FinetuneMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FinetuneMode::Full => "full",
            FinetuneMode::Lora => "lora",
            FinetuneMode::Qlora => "qlora",
        }
    }
}

/// The dtype of LoRA/QLoRA adapter weights over a 16-bit base, and so what each adapted linear
/// keeps for backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum AdapterDtype {
    /// peft's default (`autocast_adapter_dtype=True`): adapters in fp32 over a 16-bit base; each
    /// adapted linear casts its input to the adapter's dtype (`LoraLayer._cast_input_dtype`),
    /// so `lora_A` saves its own copy of the input (fp32 without autocast; under autocast the
    /// fp32 copy is cast back to 16 bits, again one copy per adapted linear)
    #[default]
    #[serde(rename = "fp32")]
    #[value(name = "fp32")]
    Fp32,
    /// adapters in the base's dtype (torchtune, LitGPT, or peft followed by `model.to(bf16)`):
    /// the adapted linears of one input share it, nothing is cast
    #[serde(rename = "base")]
    #[value(name = "base")]
    Base,
}

impl AdapterDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterDtype::Fp32 => "fp32",
            AdapterDtype::Base => "base",
        }
    }
}

/// What an adapted linear's `lora_A` saves of its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdapterInput {
    /// the input itself, shared by the adapted linears that read it (adapters in the base's
    /// dtype, `--adapter-dtype base`, or anything trained in fp32, where there is no cast)
    Shared,
    /// its own copy per adapted linear, of this many bytes per element (4: the fp32 cast of a
    /// 16-bit base's activations; 2: autocast's 16-bit cast of that fp32 copy)
    Copy(f64),
}

/// How the loss turns the last hidden states into a cross-entropy (an LM head only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum CrossEntropy {
    /// the whole b·s·V logits, upcast to fp32, one `F.cross_entropy` (transformers, torchtune
    /// without a chunked loss)
    #[default]
    #[serde(rename = "full")]
    #[value(name = "full")]
    Full,
    /// torchtune's `CEWithChunkedOutputLoss` in eager: the output projection in 8 chunks (all
    /// 16-bit chunks live through the forward), each upcast and cross-entropied alone
    #[serde(rename = "chunked")]
    #[value(name = "chunked")]
    Chunked,
    /// the same with the per-chunk cross-entropy compiled (`torch.compile`, as torchtune's
    /// `compile: True` applies it): only the 16-bit logits are saved, the softmax recomputed
    #[serde(rename = "chunked-compiled")]
    #[value(name = "chunked-compiled")]
    ChunkedCompiled,
}

impl CrossEntropy {
    /// torchtune's `num_output_chunks` default
    pub const CHUNKS: f64 = 8.0;

    pub fn as_str(self) -> &'static str {
        match self {
            CrossEntropy::Full => "full",
            CrossEntropy::Chunked => "chunked",
            CrossEntropy::ChunkedCompiled => "chunked-compiled",
        }
    }
}

/// Which parts of the model run under `torch.compile` (`--compile`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Compile {
    /// eager PyTorch
    #[default]
    #[serde(rename = "none")]
    #[value(name = "none")]
    None,
    /// every transformer block compiled on its own (torchtune's `compile: True`): inductor's
    /// partitioner saves the matmuls' inputs and outputs and recomputes the norms' and
    /// SwiGLU's fp32 intermediates ([`compiled_block_bytes`]). The head and loss are planned as
    /// `--cross-entropy` says. `torch.compile(model)`, one graph over blocks, head and loss, is
    /// not measured.
    #[serde(rename = "blocks")]
    #[value(name = "blocks")]
    Blocks,
}

impl Compile {
    pub fn as_str(self) -> &'static str {
        match self {
            Compile::None => "none",
            Compile::Blocks => "blocks",
        }
    }
}

/// What ZeRO moves to host memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Offload {
    #[default]
    #[serde(rename = "none")]
    #[value(name = "none")]
    None,
    /// ZeRO-Offload: optimizer states (and the fp32 master copy) and the optimizer step on CPU
    #[serde(rename = "optimizer")]
    #[value(name = "optimizer")]
    Optimizer,
    /// ZeRO-Infinity (stage 3): also the parameters, fetched block by block
    #[serde(rename = "optimizer+params")]
    #[value(name = "optimizer+params")]
    OptimizerParams,
}

impl Offload {
    pub fn as_str(self) -> &'static str {
        match self {
            Offload::None => "none",
            Offload::Optimizer => "optimizer",
            Offload::OptimizerParams => "optimizer+params",
        }
    }
    pub fn optimizer(self) -> bool {
        self != Offload::None
    }
    pub fn params(self) -> bool {
        self == Offload::OptimizerParams
    }
}

/// NF4 storage per quantized parameter: 4-bit code, one absmax per 64-value block stored as an
/// 8-bit double-quantized constant, and one fp32 constant per 256 blocks
/// (Dettmers et al. 2023, "QLoRA", sec. 2 "Double Quantization": 4 + 8/64 + 32/(64·256) bits).
pub const NF4_BITS_PER_PARAM: f64 = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0);
/// LLM.int8() (bitsandbytes `Linear8bitLt`): 1 byte per weight plus one fp32 scale per output
/// row (Dettmers et al. 2022, "LLM.int8()", vector-wise quantization).
pub const INT8_ROW_SCALE_BYTES: f64 = 4.0;

/// The fine-tuning configuration (`vramcal estimate --finetune ...`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finetune {
    pub mode: FinetuneMode,
    /// adapter rank R (LoRA/QLoRA)
    pub rank: u64,
    /// adapted linears, canonical names ([`block_linears`]); empty = all block linears
    pub targets: Vec<String>,
    /// peft `lora_dropout`
    pub lora_dropout: f32,
    /// the first N blocks and the embeddings are frozen and save nothing for backward
    pub freeze_layers: u64,
    /// bits of the frozen base's block linears: 16 (or 32 in fp32) for LoRA, 8 for LLM.int8(),
    /// 4 for QLoRA's NF4
    pub base_bits: u8,
    pub offload: Offload,
    /// bitsandbytes paged optimizer: noted only (pages move to host under memory pressure)
    pub paged_optimizer: bool,
    /// the adapters' dtype over a 16-bit base
    pub adapter_dtype: AdapterDtype,
    /// Each parameter's optimizer step runs inside backward as soon as its gradient is
    /// accumulated, which then frees it (torchtune's `optimizer_in_bwd`: one optimizer per
    /// parameter stepped by `register_post_accumulate_grad_hook`): no full set of gradients and
    /// no step phase; one tensor's gradient and its update's temporaries at a time
    pub optimizer_in_backward: bool,
    /// how the LM loss is computed (`--cross-entropy`)
    pub cross_entropy: CrossEntropy,
    /// what runs under `torch.compile` (`--compile`)
    pub compile: Compile,
    /// Activation offloading (`--offload-activations`: torchtune's
    /// `enable_activation_offloading`, OffloadActivations over the decoder stack): every saved
    /// tensor of 1 KiB or more goes to pinned host memory as the forward saves it and comes back
    /// when its backward node runs; under checkpointing these are the stored block inputs
    /// (Unsloth's offloaded gradient checkpointing does that much). The output projection and
    /// the loss keep theirs ([`crate::plan::memory::Features::activations_offloaded`]).
    pub offload_activations: bool,
}

impl Default for Finetune {
    fn default() -> Self {
        Self {
            mode: FinetuneMode::Full,
            rank: 16,
            targets: Vec::new(),
            lora_dropout: 0.0,
            freeze_layers: 0,
            base_bits: 16,
            offload: Offload::None,
            paged_optimizer: false,
            adapter_dtype: AdapterDtype::Fp32,
            optimizer_in_backward: false,
            cross_entropy: CrossEntropy::Full,
            compile: Compile::None,
            offload_activations: false,
        }
    }
}

/// Which part of a block a linear belongs to (`--lora-targets attn|mlp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Attn,
    Mlp,
}

/// One linear of a transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    /// canonical name: q, k, v, o, qkv (fused), gate, up, gate_up (fused), down, fc1, fc2
    pub name: &'static str,
    /// what transformers calls it (for messages)
    pub hf: &'static str,
    pub d_in: u64,
    pub d_out: u64,
    pub part: Part,
}

/// The linears of one block as transformers builds them: Llama-family q/k/v/o + gate/up/down;
/// GPT-2-style decoders (GPT-2, GPT-BigCode) and the fused families (`BlockExtras::fused_qkv`:
/// GPT-NeoX's, Falcon's and BLOOM's `query_key_value`, Phi-3's `qkv_proj`) one fused qkv
/// projection + o; BERT-style encoders, ViT and GPT-2-shaped blocks with separate projections
/// (StarCoder2, Phi, GPT-J, OPT) separate q/k/v/o; Phi-3's fused `gate_up_proj` one `h -> 2f`
/// linear.
pub fn block_linears(t: &TransformerSpec) -> Vec<Linear> {
    let h = t.hidden;
    // the query/output width: heads × head_dim, not hidden when head_dim is set (Gemma, Qwen3)
    let qw = t.q_width();
    let kv = t.kv_heads * t.head_dim();
    let f = t.ffn;
    let l = |name, hf, d_in, d_out, part| Linear {
        name,
        hf,
        d_in,
        d_out,
        part,
    };
    let mut v = Vec::new();
    // GPT-2's fused c_attn, also in GPT-BigCode, whose fp32 softmax is no departure here
    let gpt2_attention = {
        let mut plain = t.clone();
        plain.extras.fp32_softmax = false;
        plain.block_kind() == Some(BlockKind::Gpt2)
    };
    if gpt2_attention || t.extras.fused_qkv {
        v.push(l(
            "qkv",
            "c_attn/query_key_value/qkv_proj",
            h,
            qw + 2 * kv,
            Part::Attn,
        ));
        v.push(l("o", "attn.c_proj", qw, h, Part::Attn));
    } else {
        v.push(l("q", "q_proj/query", h, qw, Part::Attn));
        v.push(l("k", "k_proj/key", h, kv, Part::Attn));
        v.push(l("v", "v_proj/value", h, kv, Part::Attn));
        v.push(l("o", "o_proj/attention.output.dense", qw, h, Part::Attn));
    }
    match t.ffn_kind {
        FfnKind::Swiglu if t.extras.fused_gate_up => {
            v.push(l("gate_up", "gate_up_proj", h, 2 * f, Part::Mlp));
            v.push(l("down", "down_proj", f, h, Part::Mlp));
        }
        FfnKind::Swiglu => {
            v.push(l("gate", "gate_proj", h, f, Part::Mlp));
            v.push(l("up", "up_proj", h, f, Part::Mlp));
            v.push(l("down", "down_proj", f, h, Part::Mlp));
        }
        FfnKind::Gelu => {
            v.push(l("fc1", "c_fc/intermediate.dense", h, f, Part::Mlp));
            v.push(l("fc2", "mlp.c_proj/output.dense", f, h, Part::Mlp));
        }
    }
    v
}

/// transformers' module names accepted as aliases of the canonical ones.
fn alias(name: &str) -> &str {
    match name {
        "q_proj" | "query" => "q",
        "k_proj" | "key" => "k",
        "v_proj" | "value" => "v",
        "o_proj" | "out_proj" => "o",
        "c_attn" | "query_key_value" | "qkv_proj" => "qkv",
        "gate_proj" => "gate",
        "gate_up_proj" => "gate_up",
        "up_proj" => "up",
        "down_proj" => "down",
        "c_fc" => "fc1",
        other => other,
    }
}

/// Resolves `--lora-targets` (attn, mlp, all, or a comma list) against the model's linears into
/// canonical names. An unknown name is an input error that lists the model's linears.
pub fn resolve_targets(t: &TransformerSpec, spec: &str) -> anyhow::Result<Vec<String>> {
    let linears = block_linears(t);
    let names: Vec<&str> = linears.iter().map(|l| l.name).collect();
    let pick = |part: Option<Part>| -> Vec<String> {
        linears
            .iter()
            .filter(|l| part.is_none_or(|p| l.part == p))
            .map(|l| l.name.to_string())
            .collect()
    };
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "all" | "all-linear" => return Ok(pick(None)),
        "attn" | "attention" => return Ok(pick(Some(Part::Attn))),
        "mlp" | "ffn" => return Ok(pick(Some(Part::Mlp))),
        _ => {}
    }
    let mut out: Vec<String> = Vec::new();
    for raw in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let n = alias(raw);
        if !names.contains(&n) {
            return input_err(
                "lora-targets",
                format!(
                    "'{raw}' is not a linear of this model; accepted attn, mlp, all or a comma list of {}",
                    names.join(", ")
                ),
            );
        }
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    if out.is_empty() {
        return input_err(
            "lora-targets",
            format!(
                "empty; accepted attn, mlp, all or a comma list of {}",
                names.join(", ")
            ),
        );
    }
    Ok(out)
}

impl Finetune {
    /// The adapted linears as a CSV cell and a point key write them: canonical names joined by
    /// `+` (every adapted linear named, so `all` and its explicit list read the same); empty
    /// for full fine-tuning.
    pub fn targets_cell(&self, model: &ModelSpec) -> String {
        match model {
            ModelSpec::Transformer(t) => self
                .adapted(t)
                .iter()
                .map(|l| l.name)
                .collect::<Vec<_>>()
                .join("+"),
            ModelSpec::Cnn(_) => String::new(),
        }
    }

    /// What a measurement's point key adds for this configuration, `targets` being
    /// [`Finetune::targets_cell`]: nothing for plain full training (keys written before
    /// fine-tuning existed stay valid).
    pub fn key_suffix(&self, targets: &str) -> String {
        if self.is_plain() {
            return String::new();
        }
        let mut k = format!("|{}", self.mode.as_str());
        if self.is_adapter() {
            k += &format!(
                " r{} {} p{} b{}",
                self.rank, targets, self.lora_dropout, self.base_bits
            );
        }
        if self.freeze_layers > 0 {
            k += &format!(" frozen{}", self.freeze_layers);
        }
        if self.offload.optimizer() {
            k += &format!(" offload-{}", self.offload.as_str());
        }
        k
    }

    /// The adapted linears' canonical names (none for full fine-tuning or a CNN).
    pub fn adapted_names(&self, model: &ModelSpec) -> Vec<&'static str> {
        match model {
            ModelSpec::Transformer(t) => self.adapted(t).iter().map(|l| l.name).collect(),
            ModelSpec::Cnn(_) => Vec::new(),
        }
    }

    /// Full fine-tuning of every parameter with nothing offloaded: today's plan, untouched.
    pub fn is_plain(&self) -> bool {
        self.mode == FinetuneMode::Full
            && self.freeze_layers == 0
            && !self.offload.optimizer()
            && !self.optimizer_in_backward
            && self.cross_entropy == CrossEntropy::Full
            && self.compile == Compile::None
            && !self.offload_activations
    }

    pub fn is_adapter(&self) -> bool {
        self.mode != FinetuneMode::Full
    }

    /// Adapters kept in fp32 over a 16-bit base (peft's default): they train as fp32 weights.
    pub fn fp32_adapters(&self, train: &TrainSpec) -> bool {
        self.is_adapter()
            && self.adapter_dtype == AdapterDtype::Fp32
            && train.precision.compute_bytes() == 2
    }

    /// What each adapted linear's `lora_A` saves of its input ([`AdapterInput`]). peft's plain
    /// LoRA linears cast the input to fp32 whenever the adapter is fp32, and under autocast
    /// `lora_A` casts that copy back to 16 bits, one copy per adapted linear. Its
    /// bitsandbytes linears (8- and 4-bit bases) skip the cast under autocast, but there the
    /// input is already fp32 ([`Finetune::kbit_prepared`]: the residual stream runs through
    /// fp32 embeddings and norms), so autocast again makes one 16-bit copy per `lora_A`.
    /// Measured with peft 0.21 on CPU (Llama blocks h512, b4 s512, true bf16 and bf16
    /// autocast; calibration/data/torch-finetune-peaks-cpu.csv).
    pub fn adapter_input(&self, train: &TrainSpec) -> AdapterInput {
        if !self.fp32_adapters(train) {
            AdapterInput::Shared
        } else if !train.precision.is_mixed() {
            AdapterInput::Copy(4.0)
        } else {
            AdapterInput::Copy(2.0)
        }
    }

    /// A quantized base prepared the way the QLoRA recipe does (peft's
    /// `prepare_model_for_kbit_training`, called by the QLoRA paper's `qlora.py` and by TRL's
    /// `SFTTrainer` for a 4- or 8-bit model): every parameter that is not quantized (embeddings,
    /// norms, the output head, biases) is cast to fp32. Planned with peft's fp32 adapters;
    /// `--adapter-dtype base` (torchtune, LitGPT) keeps them 16-bit.
    pub fn kbit_prepared(&self) -> bool {
        self.is_adapter() && self.base_bits < 16 && self.adapter_dtype == AdapterDtype::Fp32
    }

    /// The training configuration the trainable parameters' states follow: fp32 for fp32
    /// adapters over a true 16-bit base (weights, gradients and AdamW moments of 4 bytes each);
    /// under autocast the mixed layout already trains them as fp32 with a cached 16-bit copy.
    pub fn trainable_train(&self, train: &TrainSpec) -> TrainSpec {
        if self.fp32_adapters(train) && train.precision.is_pure_half() {
            TrainSpec {
                precision: crate::spec::Precision::Fp32,
                ..train.clone()
            }
        } else {
            train.clone()
        }
    }

    /// The adapted linears of one block (every block linear when `targets` is empty).
    pub fn adapted(&self, t: &TransformerSpec) -> Vec<Linear> {
        if !self.is_adapter() {
            return Vec::new();
        }
        block_linears(t)
            .into_iter()
            .filter(|l| self.targets.is_empty() || self.targets.iter().any(|n| n == l.name))
            .collect()
    }

    /// Checks the combination against the model and the training configuration; every message
    /// names the flag as written.
    pub fn validate(&self, model: &ModelSpec, train: &TrainSpec) -> anyhow::Result<()> {
        let t = match model {
            ModelSpec::Transformer(t) => Some(t),
            ModelSpec::Cnn(_) => None,
        };
        if self.is_adapter() || self.freeze_layers > 0 {
            // the trainable split counts one kind of block: refused where blocks differ
            if let Some(t) = t.filter(|t| t.extras.moe.is_some() || t.extras.enc_dec.is_some()) {
                let kind = if t.extras.moe.is_some() {
                    "mixture-of-experts"
                } else {
                    "encoder-decoder"
                };
                return input_err(
                    if self.is_adapter() {
                        "finetune"
                    } else {
                        "freeze-layers"
                    },
                    format!("is not modelled for {kind} models; accepted full fine-tuning of every block"),
                );
            }
            let Some(t) = t else {
                let flag = if self.is_adapter() {
                    "finetune"
                } else {
                    "freeze-layers"
                };
                return input_err(
                    flag,
                    "applies to transformer blocks only; accepted with --model, --hf-config or --layers/--hidden/--heads of a transformer",
                );
            };
            let max_frozen = if self.is_adapter() {
                t.layers - 1
            } else {
                t.layers
            };
            check_range("freeze-layers", self.freeze_layers, 0, max_frozen)?;
            // a trainable vision tower under frozen leading blocks: the image tokens' gradients
            // run back through the frozen blocks, which then keep what backward needs (not the
            // nothing frozen blocks are planned with)
            if !self.is_adapter() && t.extras.vision.is_some() {
                return input_err(
                    "freeze-layers",
                    "is not modelled for vision-language models (the trainable vision tower's \
                     gradients run back through the frozen blocks); accepted 0, or --finetune \
                     lora / qlora (the tower frozen)",
                );
            }
        }
        if let (true, Some(t)) = (self.is_adapter(), t) {
            let width = block_linears(t)
                .iter()
                .map(|l| l.d_in.min(l.d_out))
                .min()
                .unwrap_or(1);
            check_range("lora-rank", self.rank, 1, width)?;
            if !(self.lora_dropout.is_finite() && (0.0..1.0).contains(&self.lora_dropout)) {
                return input_err(
                    "lora-dropout",
                    format!(
                        "{} is not a probability; accepted 0 <= p < 1",
                        self.lora_dropout
                    ),
                );
            }
        }
        if self.mode == FinetuneMode::Qlora && train.precision == Precision::Fp32 {
            return input_err(
                "precision",
                "fp32 with --finetune qlora: the NF4 base computes in 16 bits; accepted bf16-mixed, bf16, fp16-mixed",
            );
        }
        if self.cross_entropy != CrossEntropy::Full
            && !matches!(t, Some(t) if t.head == crate::spec::transformer::Head::Lm)
        {
            return input_err(
                "cross-entropy",
                format!(
                    "{} needs a language-model head over the vocabulary; accepted full",
                    self.cross_entropy.as_str()
                ),
            );
        }
        if self.offload_activations
            && !matches!(t, Some(t) if t.head == crate::spec::transformer::Head::Lm
                && t.arch == crate::spec::transformer::Arch::Decoder
                && t.extras.enc_dec.is_none()
                && t.extras.vision.is_none())
        {
            return input_err(
                "offload-activations",
                "is modelled for decoder language models (torchtune's offloading of the decoder \
                 stack); accepted without it for this model",
            );
        }
        if self.compile == Compile::Blocks {
            use crate::spec::transformer::BlockKind;
            let block = crate::plan::memory::features(model, train)?.block;
            if block != Some((BlockKind::Llama, crate::spec::Attention::Sdpa)) {
                return input_err(
                    "compile",
                    "blocks is measured for Llama-family blocks (RMSNorm + SwiGLU) with \
                     --attention sdpa only; accepted none for this model and attention",
                );
            }
        }
        if self.optimizer_in_backward {
            if train.grad_accum > 1 {
                return input_err(
                    "grad-accum",
                    format!(
                        "{} with --optimizer-in-backward: each parameter is stepped as its \
                         gradient arrives, so none accumulate; accepted 1",
                        train.grad_accum
                    ),
                );
            }
            if self.offload.optimizer() || matches!(train.zero_stage, 1 | 2) {
                return input_err(
                    "optimizer-in-backward",
                    format!(
                        "with --zero {} --offload {}: the optimizer steps on this device per \
                         parameter; accepted --zero 0 (one device) or 3 (FSDP, as torchtune's \
                         distributed recipe) without --offload",
                        train.zero_stage,
                        self.offload.as_str()
                    ),
                );
            }
        }
        if self.offload.optimizer() {
            if train.zero_stage == 0 {
                return input_err(
                    "offload",
                    format!(
                        "{} needs DeepSpeed ZeRO; accepted with --zero 1-3 (optimizer+params: --zero 3) and --gpus N",
                        self.offload.as_str()
                    ),
                );
            }
            if self.offload.params() && train.zero_stage < 3 {
                return input_err(
                    "offload",
                    format!(
                        "optimizer+params needs ZeRO stage 3 (ZeRO-Infinity), not {}; accepted --zero 3",
                        train.zero_stage
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Trainable and frozen parameter counts of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamSplit {
    /// parameters with gradients and optimizer states (adapters, or the unfrozen base)
    pub trainable: u64,
    /// frozen base parameters held in the base dtype
    pub frozen: u64,
    /// of `frozen`: the block linears' weights stored quantized (QLoRA, int8 base)
    pub quantized: u64,
    /// output rows of the quantized linears (int8 per-row scales)
    pub quantized_rows: u64,
    /// elements of the largest trainable tensor (the optimizer's per-tensor transients)
    pub largest_trainable: u64,
}

/// Splits the model's parameters. Full fine-tuning: the embeddings (and a tied head with them)
/// and the first N blocks are frozen. LoRA: the whole base is frozen; each adapted linear of
/// the blocks past the first N gains A (R × d_in) and B (d_out × R) (peft `lora_A`/`lora_B`, no
/// bias).
pub fn split(model: &ModelSpec, ft: &Finetune) -> ParamSplit {
    let total = params::count(model);
    let ModelSpec::Transformer(t) = model else {
        return ParamSplit {
            trainable: total,
            frozen: 0,
            quantized: 0,
            quantized_rows: 0,
            largest_trainable: params::largest_tensor(model),
        };
    };
    let p = params::transformer(t);
    let per_layer = p.attention_per_layer + p.mlp_per_layer + p.norms_per_layer;
    let n = ft.freeze_layers;
    if !ft.is_adapter() {
        let frozen = if n > 0 {
            p.embedding + n * per_layer
        } else {
            0
        };
        return ParamSplit {
            trainable: total - frozen,
            frozen,
            quantized: 0,
            quantized_rows: 0,
            largest_trainable: params::largest_tensor(model),
        };
    }
    let adapted = ft.adapted(t);
    let per_block: u64 = adapted.iter().map(|l| ft.rank * (l.d_in + l.d_out)).sum();
    let largest = adapted
        .iter()
        .map(|l| ft.rank * l.d_in.max(l.d_out))
        .max()
        .unwrap_or(0);
    let (quantized, quantized_rows) = if ft.base_bits < 16 {
        let lin = block_linears(t);
        (
            t.layers * lin.iter().map(|l| l.d_in * l.d_out).sum::<u64>(),
            t.layers * lin.iter().map(|l| l.d_out).sum::<u64>(),
        )
    } else {
        (0, 0)
    };
    ParamSplit {
        trainable: (t.layers - n) * per_block,
        frozen: total,
        quantized,
        quantized_rows,
        largest_trainable: largest,
    }
}

/// Bytes of the frozen base on one rank (sharded under ZeRO-3 like any weight): quantized block
/// linears at their storage rate, the rest in fp32 once prepared for k-bit training
/// ([`Finetune::kbit_prepared`]), else in 16 bits under QLoRA/int8 (bitsandbytes replaces
/// the blocks' `nn.Linear`s only; transformers' `BitsAndBytesConfig` skips the output head,
/// `llm_int8_skip_modules` defaulting to `get_keys_to_not_convert`, i.e. `lm_head`); a 16-bit
/// LoRA base in the compute dtype; frozen blocks of full fine-tuning in the weights' dtype.
pub fn frozen_bytes(s: &ParamSplit, train: &TrainSpec, ft: &Finetune) -> f64 {
    // what is not quantized: 16-bit, or fp32 once prepared for k-bit training
    let unquantized = (s.frozen - s.quantized) as f64 * if ft.kbit_prepared() { 4.0 } else { 2.0 };
    let bytes = match ft.base_bits {
        4 => s.quantized as f64 * NF4_BITS_PER_PARAM / 8.0 + unquantized,
        8 => s.quantized as f64 + s.quantized_rows as f64 * INT8_ROW_SCALE_BYTES + unquantized,
        // an adapter's frozen base is loaded in the compute dtype (transformers `torch_dtype`
        // with peft): nothing needs an fp32 master copy of it
        _ if ft.is_adapter() => train.precision.compute_bytes() as f64 * s.frozen as f64,
        // partial full fine-tuning: the frozen blocks stay in the trained weights' dtype
        _ => state_bytes(s.frozen, train).weights * shards_undo(train),
    };
    if train.zero_stage >= 3 {
        bytes / train.gpus as f64
    } else {
        bytes
    }
}

/// `state_bytes` already divides weights by N under ZeRO-3; [`frozen_bytes`] shards once itself.
fn shards_undo(train: &TrainSpec) -> f64 {
    if train.zero_stage >= 3 {
        train.gpus as f64
    } else {
        1.0
    }
}

/// Model states of one rank: the trainable parameters' states as in full training, plus the
/// frozen base's weights (no gradients, no optimizer states). Offloaded states leave the GPU.
pub fn states(model: &ModelSpec, train: &TrainSpec, ft: &Finetune) -> StateBytes {
    let s = split(model, ft);
    let mut st = state_bytes(s.trainable, &ft.trainable_train(train));
    st.weights += frozen_bytes(&s, train, ft);
    if ft.offload.optimizer() {
        st.optimizer = 0.0;
    }
    if ft.offload.params() {
        st.weights = 0.0;
        st.half_copy = 0.0;
    }
    st
}

/// Bytes moved to host memory by `--offload` on one rank (pinned): the optimizer states (with
/// the fp32 master copy), and with `optimizer+params` the weights.
pub fn offloaded_bytes(model: &ModelSpec, train: &TrainSpec, ft: &Finetune) -> u64 {
    if !ft.offload.optimizer() {
        return 0;
    }
    let s = split(model, ft);
    let mut st = state_bytes(s.trainable, train);
    st.weights += frozen_bytes(&s, train, ft);
    let mut b = st.optimizer;
    if ft.offload.params() {
        b += st.weights + st.half_copy;
    }
    b.round() as u64
}

/// Bytes saved for backward by the adapter branches of the live blocks, per live block: the
/// rank-R intermediate `x·A` (b·s·R in the compute dtype) of each adapted linear, and with
/// `lora_dropout` > 0 the dropped copy of its input that `lora_A` saves plus the mask
/// (b·s·d_in × (compute bytes + 1)): peft applies `lora_dropout(x)` per adapted module.
///
/// With fp32 adapters over a 16-bit base ([`AdapterInput::Copy`]) each adapted linear keeps its
/// own cast copy of the input instead (and the rank-R intermediate in the copy's dtype); with
/// dropout the dropped copy replaces it and only the mask is added.
pub fn adapter_saved_per_block(t: &TransformerSpec, train: &TrainSpec, ft: &Finetune) -> f64 {
    let bs = (train.batch * t.effective_seq(train.seq, train.image)) as f64;
    let cb = train.precision.compute_bytes() as f64;
    let mask = if ft.lora_dropout > 0.0 { 1.0 } else { 0.0 };
    let input = ft.adapter_input(train);
    ft.adapted(t)
        .iter()
        .map(|l| {
            let (rank_bytes, input_bytes) = match input {
                AdapterInput::Shared => (cb, mask * (cb + 1.0)),
                AdapterInput::Copy(b) => (b, b + mask),
            };
            bs * (ft.rank as f64 * rank_bytes + l.d_in as f64 * input_bytes)
        })
        .sum()
}

/// Bytes per live block that full training saves and an adapter fine-tune does not: the input
/// of a group of frozen linears none of which is adapted (of every group when the adapters keep
/// their own cast copies, [`AdapterInput::Copy`]). PyTorch saves a linear's input only
/// to compute its weight's gradient, so once the base is frozen an input is kept only when an
/// adapter reads it (`lora_A` saves its input) or another op saves it anyway. Inputs are grouped
/// by the tensor they read: the attention input (q, k, v / fused qkv; the norm before them is
/// frozen too, so nothing else keeps it), the attention output (o), the MLP input (gate, up /
/// fc1) and the MLP's inner activation (down / fc2). Measured with peft on Llama blocks
/// (scripts/torch_step_peak, calibration/data/torch-finetune-peaks-cpu.csv): adapting only q
/// and v saved 107 MB less than adapting every linear at b4 s512 h512 f1376 over 4 layers,
/// where these groups come to 79 MB.
pub fn frozen_inputs_unsaved_per_block(
    t: &TransformerSpec,
    train: &TrainSpec,
    ft: &Finetune,
) -> f64 {
    if !ft.is_adapter() {
        return 0.0;
    }
    let bs = (train.batch * t.effective_seq(train.seq, train.image)) as f64;
    let cb = train.precision.compute_bytes() as f64;
    // adapters that keep their own copies of their inputs keep no shared input either
    let shared = ft.adapter_input(train) == AdapterInput::Shared;
    let adapted: Vec<&str> = ft.adapted(t).iter().map(|l| l.name).collect();
    let groups: [&[&str]; 4] = [
        &["q", "k", "v", "qkv"],
        &["o"],
        &["gate", "up", "gate_up", "fc1"],
        &["down", "fc2"],
    ];
    let linears = block_linears(t);
    let inputs: f64 = groups
        .iter()
        .filter_map(|group| {
            let members: Vec<&Linear> =
                linears.iter().filter(|l| group.contains(&l.name)).collect();
            let kept = shared && members.iter().any(|l| adapted.contains(&l.name));
            (!kept && !members.is_empty()).then(|| bs * members[0].d_in as f64 * cb)
        })
        .sum();
    inputs + t.extras.block_norms.unwrap_or(2) as f64 * frozen_rms_norm_unsaved(t, train)
}

/// Bytes one frozen RMSNorm does not save that a trained one does. transformers' RMSNorm is
/// composed (`weight * hidden.to(input_dtype)`): the product saves the normalised input only
/// for the weight's gradient, so a frozen norm keeps one hidden-width tensor fewer, in the
/// residual stream's dtype (fp32 unless the weights are 16-bit). LayerNorm's fused kernel saves
/// its input and statistics either way. Measured with peft on Llama blocks (4 layers, h512,
/// b4 s512): adapting every linear saved 42 MB less than full training, 9 norms' 4.2 MB plus
/// the first block's input, which no gradient needs once the embeddings are frozen.
pub fn frozen_rms_norm_unsaved(t: &TransformerSpec, train: &TrainSpec) -> f64 {
    if t.norm != NormKind::Rmsnorm {
        return 0.0;
    }
    let bs = (train.batch * t.effective_seq(train.seq, train.image)) as f64;
    let residual_bytes = if train.precision.is_pure_half() {
        2.0
    } else {
        4.0
    };
    bs * t.hidden as f64 * residual_bytes
}

/// The dequantized 16-bit copy of the largest block linear that a 4- or 8-bit base materialises
/// for one matmul at a time (forward and backward), bytes.
pub fn dequant_transient(t: &TransformerSpec, ft: &Finetune) -> f64 {
    if ft.base_bits >= 16 {
        return 0.0;
    }
    2.0 * block_linears(t)
        .iter()
        .map(|l| l.d_in * l.d_out)
        .max()
        .unwrap_or(0) as f64
}

/// PCIe 4.0 x16 host<->device bandwidth achieved with pinned memory, bytes/s: 32 GB/s per
/// direction on paper (PCI-SIG), about 25 GB/s measured (CUDA samples' `bandwidthTest`).
pub const PCIE_BYTES_PER_S: f64 = 25e9;
/// DeepSpeed CPU-Adam parameter updates per second on one process: an assumption of the order
/// of magnitude Ren et al. 2021 ("ZeRO-Offload", CPU-Adam evaluation) report for a multi-core
/// server CPU (about a second per billion parameters); not measured here.
pub const CPU_ADAM_PARAMS_PER_S: f64 = 1e9;

/// Time the offload adds to a step on one rank, seconds, and what it is made of.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OffloadTime {
    /// bytes over PCIe per step: 16-bit gradients down, updated 16-bit weights up; with
    /// parameters offloaded each block's 16-bit weights also come up in forward and backward
    pub pcie_bytes: f64,
    pub pcie_bytes_per_s: f64,
    /// parameters this rank's CPU optimizer updates
    pub cpu_params: f64,
    pub cpu_params_per_s: f64,
    /// transfers + CPU step, not overlapped with compute (an upper bound: DeepSpeed overlaps
    /// part of the gradient transfer with backward)
    pub seconds: f64,
}

/// See [`OffloadTime`]. None without `--offload`.
pub fn offload_time(model: &ModelSpec, train: &TrainSpec, ft: &Finetune) -> Option<OffloadTime> {
    if !ft.offload.optimizer() {
        return None;
    }
    let s = split(model, ft);
    let n = train.gpus as f64;
    let shard = s.trainable as f64 / n;
    let mut pcie = shard * 2.0 + shard * 2.0;
    if ft.offload.params() {
        // each rank fetches its shard of every weight for forward and again for backward
        pcie += 2.0 * frozen_bytes(&s, train, ft) + 2.0 * 2.0 * shard;
    }
    let seconds = pcie / PCIE_BYTES_PER_S + shard / CPU_ADAM_PARAMS_PER_S;
    Some(OffloadTime {
        pcie_bytes: pcie,
        pcie_bytes_per_s: PCIE_BYTES_PER_S,
        cpu_params: shard,
        cpu_params_per_s: CPU_ADAM_PARAMS_PER_S,
        seconds,
    })
}

/// The memory model's terms for a fine-tuning configuration: [`states`] for the model states,
/// and the full-training features with (1) the first N frozen blocks saving nothing (they are
/// planned as a model of L − N blocks; the step-time `ops` keep all L), (2) the adapter branches'
/// saved bytes less the inputs of frozen, unadapted linear groups
/// ([`frozen_inputs_unsaved_per_block`]) and the dequantization transient as known bytes, (3) the optimizer's transients
/// sized by the trainable tensors (none on the GPU when the optimizer is offloaded), and (4) no
/// tied-embedding gradient when the embeddings are frozen.
pub fn terms(model: &ModelSpec, train: &TrainSpec, ft: &Finetune) -> anyhow::Result<FitTerms> {
    use crate::plan::memory::{features, fit_terms, optimizer_shards, state_elem_bytes};
    use crate::spec::{Optimizer, OptimizerImpl};
    if ft.is_plain() {
        return fit_terms(model, train);
    }
    let s = split(model, ft);
    let mut f = match model {
        ModelSpec::Transformer(t) if ft.freeze_layers > 0 => {
            let live = TransformerSpec {
                layers: t.layers - ft.freeze_layers,
                ..t.clone()
            };
            let mut f = features(&ModelSpec::Transformer(live), train)?;
            f.ops = t.layers as f64;
            f
        }
        _ => features(model, train)?,
    };
    if let ModelSpec::Transformer(t) = model {
        let live = if train.checkpointing.is_on() {
            1.0
        } else {
            (t.layers - ft.freeze_layers) as f64
        };
        // the final norm is frozen too (its saved bytes are in host memory when offloaded)
        let final_norm = if ft.is_adapter() && t.final_norm && !ft.offload_activations {
            frozen_rms_norm_unsaved(t, train)
        } else {
            0.0
        };
        let adapter_saved = live
            * (adapter_saved_per_block(t, train, ft)
                - frozen_inputs_unsaved_per_block(t, train, ft));
        if ft.offload_activations && !train.checkpointing.is_on() {
            // offloaded with the rest of each block's saved tensors: planned with the block's
            // bytes, of which one layer's are on the device in the block's phase and none in
            // the head's (measured: a LoRA step planned -4.7 % while they stayed whole)
            f.departure_bytes += adapter_saved;
            f.adapter_bytes = dequant_transient(t, ft);
        } else {
            f.adapter_bytes = adapter_saved - final_norm + dequant_transient(t, ft);
        }
        if ft.is_adapter() || ft.freeze_layers > 0 {
            f.tied_grad_elems = 0.0;
        }
    }
    let shards = optimizer_shards(train);
    f.max_param = if train.optimizer_impl == OptimizerImpl::Loop && !ft.offload.optimizer() {
        s.largest_trainable as f64 / shards * (1 + train.optimizer.states_per_param()) as f64
    } else {
        0.0
    };
    f.group_update_bytes = if train.optimizer == Optimizer::AdamW
        && train.optimizer_impl == OptimizerImpl::Foreach
        && !ft.offload.optimizer()
    {
        s.trainable as f64 / shards * state_elem_bytes(&ft.trainable_train(train))
    } else {
        0.0
    };
    // the loss's logits (measured on a CPU with PyTorch 2.15, b2 s1024 V32000 bf16, bytes per
    // logit: full 4 saved / 10 forward peak / 12 backward peak; chunked 4 / 6.5 / 5; chunked
    // and compiled 2 / 2 / 3; scripts/torch_step_peak/cross_entropy_probe.py ->
    // calibration/data/torch-probe-cross-entropy-cpu.txt): chunks shrink the backward's temporaries to one chunk's, keep
    // every 16-bit chunk through the forward, and compiled save the 16-bit logits instead of
    // the fp32 log-softmax
    if ft.cross_entropy != CrossEntropy::Full {
        let logits = f.bsv;
        let cb = train.precision.compute_bytes() as f64;
        f.ws_head = logits / CrossEntropy::CHUNKS;
        if ft.cross_entropy == CrossEntropy::ChunkedCompiled {
            f.bsv = 0.0;
            f.head_known_bytes += logits * cb;
        } else {
            // the 16-bit chunks and one chunk's fp32 upcast (none in fp32)
            let upcast = if cb < 4.0 { 4.0 } else { 0.0 };
            f.head_forward_bytes = logits * (cb + upcast / CrossEntropy::CHUNKS);
        }
    }
    if ft.compile == Compile::Blocks {
        f.compiled_block_bytes = Some(compiled_block_bytes(&f, train));
    }
    f.activations_offloaded = ft.offload_activations;
    let mut st = states(model, train, ft);
    if ft.optimizer_in_backward {
        // one tensor's gradient and its update's temporaries at a time, inside backward:
        // PyTorch's single-tensor AdamW allocates exp_avg_sq.sqrt() and its quotient (two
        // copies), foreach over one tensor one; fused kernels, 8-bit AdamW and SGD none
        let tt = ft.trainable_train(train);
        let largest = s.largest_trainable;
        let copies = match (train.optimizer, train.optimizer_impl) {
            (Optimizer::AdamW, OptimizerImpl::Loop) => 2.0,
            (Optimizer::AdamW, OptimizerImpl::Foreach) => 1.0,
            _ => 0.0,
        };
        let grad_shards = if train.zero_stage >= 2 {
            train.gpus as f64
        } else {
            1.0
        };
        st.gradients = crate::plan::memory::state_bytes(largest, &tt).gradients
            + copies * largest as f64 / grad_shards * state_elem_bytes(&tt);
        f.max_param = 0.0;
        f.group_update_bytes = 0.0;
        f.step_in_backward = true;
        // the hook steps and frees a tied embedding's gradient after each of its two
        // accumulations: no end-of-backward sum
        f.tied_grad_elems = 0.0;
    }
    Ok(FitTerms {
        params: s.trainable,
        states: st,
        features: f,
        // adapters go on the language model: a frozen vision tower whose input needs no
        // gradient records nothing for backward; a partly frozen model trains its tower
        vision: if ft.is_adapter() {
            None
        } else {
            crate::plan::memory::vision_features(model, train)?
        },
    })
}

/// Bytes the live blocks save for backward when each is compiled (`--compile blocks`): what
/// inductor's partitioned graph of transformers' Llama decoder layer returns for backward
/// (PyTorch 2.15, `TORCH_LOGS=aot_graphs`; fp32, true bf16 and bf16 autocast alike): the block
/// input in the residual stream's dtype (fp32 under autocast), and in the compute dtype both
/// norms' outputs, q, k and v after RoPE, sdpa's output, the o projection's output, gate, up
/// and their SwiGLU product, with fp32 per-row statistics (both norms' rstd, sdpa's log-sum-exp).
/// Per token and layer `r·h + c·(3h + 2·q_width + 2·kv_width + 3f) + 4·(2 + heads)` bytes,
/// against eager's fp32 norm intermediates and four f-wide SwiGLU tensors. Measured on a CPU:
/// the same numbers per layer and token to 0.1 % (`scripts/torch_step_peak/compile_probe.py`,
/// `calibration/data/torch-probe-compiled-block-cpu.txt`). With LoRA on some linears only, the
/// frozen ones' inputs are not saved (not measured; planned as saved, high).
pub fn compiled_block_bytes(f: &crate::plan::memory::Features, train: &TrainSpec) -> f64 {
    let c = train.precision.compute_bytes() as f64;
    let r = crate::plan::measured::norm_out_bytes(train.precision);
    // f.bsh + f.q_extra is b·s·q_width over the live layers; f.bsf_raw b·s·f over their dense
    // MLPs (routed experts are `moe_bytes`)
    r * f.bsh
        + c * (3.0 * f.bsh + 2.0 * (f.bsh + f.q_extra) + 2.0 * f.bskv + 3.0 * f.bsf_raw)
        + 4.0 * (2.0 * f.bs + f.bas)
}

/// The per-rank memory plan of a fine-tuning configuration (`plan::memory::estimate` with
/// [`terms`]): what the sweep's guard and the fit plan a measured fine-tuning point with.
pub fn estimate(
    model: &ModelSpec,
    train: &TrainSpec,
    ft: &Finetune,
    coeffs: &crate::coeffs::Coefficients,
) -> anyhow::Result<crate::plan::memory::MemoryBreakdown> {
    model.validate_for(train)?;
    let t = terms(model, train, ft)?;
    Ok(crate::plan::memory::breakdown(&t, model, train, coeffs)
        .with_runtime(&coeffs.runtime(), train.gpus))
}
