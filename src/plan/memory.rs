//! Per-GPU training memory: model states (exact byte counts per precision, optimizer and ZeRO
//! stage) plus activations and overhead from the coefficient table.
//!
//! Everything the fit calibrates is linear in the coefficients:
//! `peak = (1 + frag) * (fixed_states + half_copy * half_copy_bytes + sum_i c_i * feature_i) + const`,
//! so [`FitTerms`] exposes exactly those terms to `fit/`.

use crate::coeffs::{ActivationCoeffs, BlockCoeffs, Coefficients};
use crate::error::input_err;
use crate::plan::{
    deberta_saved, departures, encdec, encdec_saved, measured, mla_saved, moe, params, vision,
};
use crate::spec::encdec::EncDec;
use crate::spec::transformer::{Activation, BlockKind, FfnKind, Head, TransformerSpec};
use crate::spec::{Attention, Checkpointing, ModelSpec, TrainSpec};
use serde::Serialize;

/// Activation feature element counts for one step on one rank (batch included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Features {
    /// b*s*h summed over the layers whose activations are live at the peak
    pub bsh: f64,
    /// b*s*f over the same layers, counted twice for SwiGLU (gate, up, SiLU output and their
    /// product are four f-wide tensors kept for backward, against GELU's two)
    pub bsf: f64,
    /// b*a*s^2 over the same layers
    pub bas2: f64,
    /// b*s*V for an LM head (b*classes for a classifier, b*h for a pooler)
    pub bsv: f64,
    /// b*s*h*L block inputs kept under checkpointing (0 without)
    pub ckpt_bsh: f64,
    /// CNN: conv and linear output elements
    pub conv: f64,
    /// CNN: batchnorm output elements
    pub norm: f64,
    /// CNN: ReLU output and residual-sum elements
    pub act: f64,
    /// CNN: pooling output elements
    pub pool: f64,
    /// elements of the input batch of images (CNN, ViT)
    pub input: f64,
    /// Optimizer-step transients: elements of the largest parameter tensor this rank updates
    /// (its shard under ZeRO >= 1), times the tensors its update reads and rewrites (the weight
    /// and each optimizer state: AdamW 3, SGD with momentum 2, SGD 1)
    pub max_param: f64,
    /// Transient buffers of backward on top of everything saved, `max(ws_head, ws_block)`:
    /// the gradient temporaries of the largest tensor backward works on.
    pub workspace: f64,
    /// b * the head's output (LM: s*V): the head's and loss's backward temporaries
    pub ws_head: f64,
    /// Bytes (not elements) the head's forward holds beyond its saved bytes at its peak, when
    /// that exceeds its backward's temporaries: a chunked loss's 16-bit logit chunks
    /// (`plan::finetune`, `--cross-entropy chunked`); 0 otherwise
    pub head_forward_bytes: f64,
    /// transformer: b * the largest per-sample tensor of a block (a*s^2 scores or s*f FFN);
    /// CNN: b * the largest conv's unfolded input (the im2col buffer; a ViT's patch unfold equals
    /// its input batch and is covered by `input`)
    pub ws_block: f64,
    /// Full checkpointing: the head's backward and each block's recompute + backward are
    /// separate phases, so the peak holds the larger of (head saved + head temporaries) and
    /// (one block saved + block temporaries) on top of the stored block inputs, not their sum.
    /// Without checkpointing the phases are split too, over every block's saved bytes
    /// ([`Features::activation_bytes`]).
    pub phased: bool,
    /// ZeRO-3: parameter elements all-gathered in full at once (one block's, plus the largest
    /// tensor outside the blocks), resident with their full gradients until reduce-scatter
    pub gathered: f64,
    /// Layers (transformer blocks, CNN layers): not memory, but the step-time model's per-layer
    /// fixed cost (kernel launches, dispatch), which dominates small steps
    pub ops: f64,
    /// Bytes (not elements) the fused attention kernel saves beyond what the composed model
    /// counts, over the live layers: its output (b·s·q_width in the compute dtype; eager attention
    /// saves the AV product's inputs instead) and the fp32 row log-sum-exp (b·a·s). Kernel
    /// semantics from PyTorch's `_scaled_dot_product_flash_attention` /
    /// `_efficient_attention` signatures, not fitted (the harness runs eager attention).
    pub fused_attention_bytes: f64,
    /// sdpa's CPU math path over 16-bit inputs ([`Attention::Math`]): the fp32 copies of q, k
    /// and v it saves, `b·s·(q_width + 2·kv_width)·(4 − compute_bytes)` per live layer, beside the
    /// 16-bit tensors eager attention keeps. Known, not fitted.
    pub math_upcast_bytes: f64,
    /// Bytes (not elements) of the optimizer step's group-wide temporaries: AdamW `foreach`
    /// materialises `_foreach_sqrt(exp_avg_sq)`, one state-sized tensor per parameter this rank
    /// updates (torch/optim/adamw.py `_multi_tensor_adamw`). Literature, not fitted.
    pub group_update_bytes: f64,
    /// The measured PyTorch block implementation the model's blocks match, with the attention
    /// kind: selects [`crate::coeffs::BlockCoeffs`] when the table has them
    pub block: Option<(BlockKind, Attention)>,
    /// The MLP activation in effect ([`crate::spec::transformer::TransformerSpec::activation_kind`]):
    /// selects the activation function's bytes ([`ActivationCoeffs::act_fns`]) with `block`
    pub act_fn: Option<Activation>,
    /// The activation the per-feature coefficients assume for this FFN kind (SiLU for SwiGLU,
    /// exact GELU otherwise): without a measured block, the bytes `act_fn` saves beyond it are
    /// added as known ([`Features::act_fn_extra_bytes`])
    pub act_fn_base: Option<Activation>,
    /// Dropout probability above 0 ([`crate::spec::transformer::TransformerSpec::dropout_p`]):
    /// adds the matched block's [`crate::coeffs::DropoutCoeffs`]
    pub dropout: bool,
    /// Dropout elements of the live blocks when dropout is on (2·bsh for the two residual-branch
    /// sites + the stored probabilities bas2), else 0: the fitted tables' `c_dropout` feature.
    pub dropout_elems: f64,
    /// b*s*f over the live layers, once per FFN (not doubled for SwiGLU)
    pub bsf_raw: f64,
    /// b*a*s over the live layers (attention rows)
    pub bas: f64,
    /// b*s*kv_heads*head_dim over the live layers
    pub bskv: f64,
    /// b*s over the live layers
    pub bs: f64,
    /// b*s*h once per model
    pub bsh_once: f64,
    /// b*s once per model
    pub bs_once: f64,
    /// Elements of an LM head tied to the token embedding (V*h, 0 when untied): at the end of
    /// PyTorch's backward the embedding's second gradient and their sum briefly exist on top of
    /// all the gradients (measured: 2 x V*h in the gradient dtype)
    pub tied_grad_elems: f64,
    /// The gradients coexist in full with the activations instead of arriving as backward frees
    /// them: under gradient accumulation every gradient is resident through forward and
    /// backward after the first micro-batch (they accumulate into `param.grad`)
    pub grads_beside_activations: bool,
    /// The optimizer steps each parameter inside backward (`plan::finetune`,
    /// `--optimizer-in-backward`): the gradients are one tensor's with its update's
    /// temporaries, made once the head's backward is done, beside the saved activations but not
    /// the backward's temporaries; no step phase ([`LiveParts::at`])
    pub step_in_backward: bool,
    /// Bytes (not elements), fine-tuning only (`plan::finetune`): what LoRA adapter branches save
    /// for backward over the live blocks, plus a quantized base's dequantized-weight transient.
    /// Known, not fitted; 0 in full training.
    pub adapter_bytes: f64,
    /// Bytes (not elements) the live MoE blocks' routed experts and router save (the f-wide
    /// features count only dense MLPs and shared experts): the fp32 routing, and per routed
    /// pair its gathered input, SwiGLU intermediates and output in the weights' dtype
    /// ([`moe::extra_bytes_per_token`]). Known, not fitted; 0 without experts.
    pub moe_bytes: f64,
    /// Query-width elements beyond the hidden width over the live blocks, `b·s·(q_width − h)`
    /// per layer, for a Llama-like block whose head_dim is not h / heads: priced by the measured
    /// block's `bsq` ([`departures::Planned::q_extra_per_token`]); 0 otherwise
    pub q_extra: f64,
    /// Bytes (not elements) a Llama-like block's departures keep over the live blocks beyond the
    /// Llama block (q/k norms, Gemma's extra norms, soft-capped scores;
    /// [`departures::Planned::extra_bytes_per_token`]).
    /// Known, not fitted; 0 for the measured blocks themselves.
    pub departure_bytes: f64,
    /// Bytes (not elements) the head segment keeps beyond its per-element coefficient and the
    /// block's once-per-model bytes: Gemma2's final logit soft-capping's tanh output, a Gemma or
    /// OLMo2 final norm's fp32 excess in pure 16-bit
    /// ([`departures::Planned::head_extra_bytes_per_token`]). Known, not fitted.
    pub head_known_bytes: f64,
    /// Bytes (not elements) an encoder-decoder's cross-attention saves over the live decoder
    /// blocks beyond its scores ([`encdec::CrossAttention::saved_bytes`]). Known, not fitted;
    /// 0 otherwise.
    pub cross_attention_bytes: f64,
    /// A family planned from PyTorch's measured saved bytes rather than the table's blocks (T5,
    /// FLAN-T5, mT5 and BART: [`encdec_saved::saved`]; DeBERTa-v2/v3 with relative attention:
    /// [`deberta_saved::saved`]; DeepSeek-V2/V3's latent attention: [`mla_saved::saved`]): the
    /// bytes per phase, which replace the table's per-element coefficients for the
    /// once-per-model, head and block bytes. Known, not fitted.
    pub measured_saved: Option<measured::Saved>,
    /// Bytes (not elements) the live blocks save when each is compiled by `torch.compile`
    /// (`--compile blocks`, [`crate::plan::finetune::compiled_block_bytes`]), replacing the
    /// measured eager block's. Known, not fitted; `None` in eager.
    pub compiled_block_bytes: Option<f64>,
    /// Saved activations move to host memory as the forward saves them and come back one node
    /// at a time in backward (`--offload-activations`: torchtune's OffloadActivations,
    /// [`crate::plan::finetune::Finetune::offload_activations`]): the device keeps one layer's
    /// share of the blocks' saved bytes (of the stored block inputs under checkpointing) and
    /// none of the once-per-model bytes; the head's saved bytes stay (torchtune leaves the
    /// output projection and the loss outside the offloading hooks).
    pub activations_offloaded: bool,
}

impl Features {
    /// Names of the per-element activation features, in the order of [`Features::named`].
    pub const NAMES: [&'static str; 11] = [
        "bsh",
        "bsf",
        "bas2",
        "bsv",
        "conv",
        "norm",
        "act",
        "pool",
        "input",
        "workspace",
        "ops",
    ];

    /// The activation features by name (what the step-time model's traffic terms multiply).
    pub fn named(&self) -> [(&'static str, f64); 11] {
        let v = [
            self.bsh,
            self.bsf,
            self.bas2,
            self.bsv,
            self.conv,
            self.norm,
            self.act,
            self.pool,
            self.input,
            self.workspace,
            self.ops,
        ];
        let mut out = [("", 0.0); 11];
        for (i, (n, x)) in Self::NAMES.iter().zip(v).enumerate() {
            out[i] = (n, x);
        }
        out
    }

    /// The measured block coefficients for this model, when the table has them.
    pub fn measured<'a>(&self, a: &'a ActivationCoeffs) -> Option<&'a BlockCoeffs> {
        let (kind, attention) = self.block?;
        a.blocks
            .iter()
            .find(|b| b.block == kind && b.attention == attention)
    }

    pub fn activation_bytes(&self, a: &ActivationCoeffs) -> f64 {
        let ws = a.c_workspace.value;
        let common = self.common_bytes(a);
        if self.phased {
            let (head, block) = self.phase_peaks(a);
            common + head.max(block)
        } else if self.activations_offloaded {
            // the head's backward runs with every block's saved bytes in host memory, then each
            // block's with only its own brought back: a checkpointed step's two phases without
            // the recompute. Measured on a CPU with torchtune's hooks emulated
            // (calibration/data/torch-offload-activations-cpu.csv)
            let (head, block) = self.saved_bytes(a);
            common
                + self
                    .head_peak(head, a)
                    .max(block * self.on_device_share() + self.ws_block * ws)
        } else {
            // every block's saved tensors through the whole backward, and on top either the
            // head's saved bytes with its backward temporaries, or (once the head's backward
            // has freed its saved logits) a block's temporaries. Measured on a CPU (PyTorch
            // 2.15): eager steps whose scores outweigh the logits planned 14-21 % high while
            // the two were summed (calibration/data/torch-step-peaks-drawn-wide-cpu.csv)
            let (head, block) = self.saved_bytes(a);
            common + block + self.head_peak(head, a).max(self.ws_block * ws)
        }
    }

    /// The share of the live blocks' saved bytes on the device through backward: all of them,
    /// or with activations offloaded one layer's (the block whose backward runs; the others
    /// wait in host memory). bs / bs_once is the number of live layers.
    fn on_device_share(&self) -> f64 {
        if self.activations_offloaded && self.bs > 0.0 {
            (self.bs_once / self.bs).min(1.0)
        } else {
            1.0
        }
    }

    /// Whether the head's backward (its saved bytes and temporaries) rather than a block's
    /// holds the activation peak: in a checkpointed step against one recomputed block, else
    /// against one block's temporaries over the saved blocks both phases hold.
    pub fn head_phase(&self, a: &ActivationCoeffs) -> bool {
        let (head, block) = self.phase_peaks(a);
        if self.phased {
            head > block
        } else if self.activations_offloaded {
            let (_, saved) = self.saved_bytes(a);
            head > saved * self.on_device_share() + self.ws_block * a.c_workspace.value
        } else {
            head > self.ws_block * a.c_workspace.value
        }
    }

    /// What stays saved between this model's forward and its backward, without the backward's
    /// temporaries: every block's tensors, or under full checkpointing the stored block inputs.
    pub fn resident_bytes(&self, a: &ActivationCoeffs) -> f64 {
        let common = self.common_bytes(a);
        if self.phased {
            common
        } else {
            let (head, block) = self.saved_bytes(a);
            common + head + block * self.on_device_share()
        }
    }

    /// The bytes held through the whole step whatever the phase: once-per-model tensors, stored
    /// block inputs, CNN features, the input batch, ZeRO-3 gathers and the adapters' bytes.
    fn common_bytes(&self, a: &ActivationCoeffs) -> f64 {
        let once = match (self.measured_saved, self.measured(a)) {
            _ if self.activations_offloaded => 0.0,
            (Some(k), _) => k.once,
            (None, Some(m)) => self.once_bytes(m),
            (None, None) => 0.0,
        };
        // stored block inputs: every layer's, or offloaded the one layer's being recomputed
        let ckpt = if self.activations_offloaded {
            self.ckpt_bsh.min(self.bsh_once)
        } else {
            self.ckpt_bsh
        };
        once + ckpt * a.c_ckpt.value
            + self.conv * a.c_conv.value
            + self.norm * a.c_norm.value
            + self.act * a.c_act.value
            + self.pool * a.c_pool.value
            + self.input * a.c_input.value
            + self.gathered * a.c_gathered.value
            + self.adapter_bytes
    }

    /// 1 when dropout keeps masks, else 0: multiplies the block's dropout terms.
    fn dropout_on(&self) -> f64 {
        if self.dropout {
            1.0
        } else {
            0.0
        }
    }

    /// Saved bytes of the head (logits, loss) and of the live blocks.
    fn saved_bytes(&self, a: &ActivationCoeffs) -> (f64, f64) {
        if let Some(k) = self.measured_saved {
            return (k.head, k.blocks);
        }
        let (head, block) = self.eager_saved_bytes(a);
        match self.compiled_block_bytes {
            // compiled blocks keep what inductor's partitioned graph saves; what the Llama
            // block's departures and experts keep is planned as in eager
            Some(c) => (head, c + self.departure_bytes + self.moe_bytes),
            None => (head, block),
        }
    }

    /// [`Features::saved_bytes`] with every block run eagerly.
    fn eager_saved_bytes(&self, a: &ActivationCoeffs) -> (f64, f64) {
        if let Some(m) = self.measured(a) {
            // a fitted table's c_dropout: the dropout bytes this device keeps beyond the
            // measured block's (CPU masks in the activation dtype, not CUDA's 1 byte); 0 in the
            // literature
            let (head, block) = self.block_saved(m, a);
            return (head, block + self.dropout_elems * a.c_dropout.value);
        }
        (
            self.bsv * a.c_logits.value + self.head_known_bytes,
            self.bsh * a.c_h.value
                + self.bsf * a.c_f.value
                + self.bas2 * a.c_att.value
                + self.dropout_elems * a.c_dropout.value
                + self.per_feature_known_bytes(a),
        )
    }

    /// Without a measured block: the live blocks' bytes no per-feature coefficient scales,
    /// known from kernel semantics or measured apart (fused attention, sdpa's math-path
    /// upcasts, MoE experts, cross-attention, the activation function's own).
    pub fn per_feature_known_bytes(&self, a: &ActivationCoeffs) -> f64 {
        self.fused_attention_bytes
            + self.moe_bytes
            + self.math_upcast_bytes
            + self.cross_attention_bytes
            + self.departure_bytes
            + self.act_fn_extra_bytes(a)
    }

    /// Bytes the MLP's activation saves beyond the one the per-feature `c_f` assumes
    /// ([`Features::act_fn_base`]), from the table's measured `act_fns`: GPT-2's composed
    /// `gelu_new` keeps four f-wide tensors where exact GELU keeps one, so one `c_f` fitted over
    /// both would plan BERT's exact-GELU blocks with GPT-2's copies. Negative for an activation
    /// that keeps less (ReLU); 0 where the table lacks either activation.
    pub fn act_fn_extra_bytes(&self, a: &ActivationCoeffs) -> f64 {
        let bytes = |k: Option<Activation>| k.and_then(|k| a.act_fns.get(&k)).map(|c| c.value);
        match (bytes(self.act_fn), bytes(self.act_fn_base)) {
            (Some(act), Some(base)) => self.bsf_raw * (act - base),
            _ => 0.0,
        }
    }

    /// With a measured block in `a` ([`Features::measured`]): the bytes it accounts for, as
    /// (once per model, the head's saved bytes, the live blocks' saved bytes); the fit holds
    /// them known and fits only the terms the block does not cover.
    pub fn measured_bytes(&self, a: &ActivationCoeffs) -> Option<(f64, f64, f64)> {
        if let Some(k) = self.measured_saved {
            return Some((k.once, k.head, k.blocks));
        }
        let m = self.measured(a)?;
        let (head, block) = self.block_saved(m, a);
        Some((self.once_bytes(m), head, block))
    }

    /// Bytes a measured block's model keeps once (embeddings, final norm), not per layer.
    fn once_bytes(&self, m: &BlockCoeffs) -> f64 {
        let drop = self.dropout_on();
        self.bsh_once * (m.bsh_once + drop * m.dropout.bsh_once) + self.bs_once * m.bs_once
    }

    /// Saved bytes of the head and the live blocks by a measured block `m`, without the fitted
    /// extra dropout bytes (`c_dropout`).
    fn block_saved(&self, m: &BlockCoeffs, a: &ActivationCoeffs) -> (f64, f64) {
        let drop = self.dropout_on();
        let act_fn = self
            .act_fn
            .and_then(|k| a.act_fns.get(&k))
            .map_or(0.0, |c| c.value);
        (
            self.bsv * m.bsv + self.head_known_bytes,
            self.bsh * (m.bsh + drop * m.dropout.bsh)
                + self.bsf_raw * (m.bsf + act_fn)
                + self.bas2 * (m.bas2 + drop * m.dropout.bas2)
                + self.bas * m.bas
                + self.bskv * m.bskv
                + self.bs * m.bs
                + self.q_extra * m.bsq.unwrap_or(0.0)
                + self.departure_bytes
                + self.moe_bytes
                + self.math_upcast_bytes
                + self.cross_attention_bytes,
        )
    }

    /// Under full checkpointing ([`Features::phased`]): the activation bytes of the head's
    /// phase and of a block's phase (saved tensors plus that phase's backward temporaries),
    /// besides what both hold; the peak is in the larger.
    pub fn phase_peaks(&self, a: &ActivationCoeffs) -> (f64, f64) {
        let ws = a.c_workspace.value;
        let (head, block) = self.saved_bytes(a);
        (self.head_peak(head, a), block + self.ws_block * ws)
    }

    /// The head's phase over its saved bytes `head`: its backward's temporaries, or a chunked
    /// loss's forward chunks where larger.
    fn head_peak(&self, head: f64, a: &ActivationCoeffs) -> f64 {
        head + (self.ws_head * a.c_workspace.value).max(self.head_forward_bytes)
    }

    /// Transient bytes at the optimizer step: per-tensor update buffers scale with the largest
    /// parameter tensor. The activations are freed by then, so the peak holds the larger of the
    /// two (see [`breakdown_with_mode`]), not their sum.
    pub fn step_transient_bytes(&self, a: &ActivationCoeffs) -> f64 {
        self.max_param * a.c_max_param.value + self.group_update_bytes
    }
}

/// Bytes per element of the optimizer's full-width state tensors: fp32, except in true bf16.
pub fn state_elem_bytes(train: &TrainSpec) -> f64 {
    if train.precision.is_pure_half() {
        2.0
    } else {
        4.0
    }
}

/// See [`Features::group_update_bytes`]. Only AdamW's foreach path allocates group-wide; SGD's
/// foreach updates are in place (no weight decay by default), fused kernels and 8-bit AdamW
/// (bitsandbytes' own kernel) allocate nothing per parameter.
fn group_update(params: u64, train: &TrainSpec) -> f64 {
    use crate::spec::{Optimizer, OptimizerImpl};
    if train.optimizer != Optimizer::AdamW || train.optimizer_impl != OptimizerImpl::Foreach {
        return 0.0;
    }
    params as f64 / optimizer_shards(train) * state_elem_bytes(train)
}

/// Ranks the optimizer's update is split over: each updates its shard under ZeRO >= 1.
pub(crate) fn optimizer_shards(train: &TrainSpec) -> f64 {
    if train.zero_stage >= 1 {
        train.gpus as f64
    } else {
        1.0
    }
}

/// See [`Features::max_param`]. Only an optimizer that updates tensor by tensor has per-tensor
/// temporaries (PyTorch's for-loop AdamW: `exp_avg_sq.sqrt()` and its quotient, two copies of
/// the tensor being updated); foreach's are group-wide ([`Features::group_update_bytes`]) and a
/// fused kernel has none.
fn update_transient(model: &ModelSpec, train: &TrainSpec) -> f64 {
    use crate::spec::{Optimizer, OptimizerImpl};
    // SGD's for-loop update is in place (`buf.mul_(momentum).add_(grad)`, `param.add_(buf)`):
    // no temporaries; only AdamW allocates its denominator per tensor
    if train.optimizer_impl != OptimizerImpl::Loop || train.optimizer != Optimizer::AdamW {
        return 0.0;
    }
    let tensors = 1 + train.optimizer.states_per_param();
    params::largest_tensor(model) as f64 / optimizer_shards(train) * tensors as f64
}

/// Activation features of a model at a training configuration.
pub fn features(model: &ModelSpec, train: &TrainSpec) -> anyhow::Result<Features> {
    let b = train.batch as f64;
    match model {
        // a vision-language model: its language model's features here (the tower's are
        // `vision_features`), with the optimizer's group-wide temporaries over every parameter
        ModelSpec::Transformer(t) if t.extras.vision.is_some() => {
            let lm = TransformerSpec {
                extras: crate::spec::transformer::BlockExtras {
                    vision: None,
                    ..t.extras.clone()
                },
                ..t.clone()
            };
            Ok(Features {
                group_update_bytes: group_update(params::count(model), train),
                ..features(&ModelSpec::Transformer(lm), train)?
            })
        }
        ModelSpec::Transformer(t) if t.extras.enc_dec.is_some() => {
            let e = t.extras.enc_dec.as_deref().expect("matched");
            encdec_features(model, t, e, train)
        }
        // transformers runs these classes' attention eager whatever is asked
        // (sdpa asked for, or the CPU's math path a row's sdpa ran on)
        ModelSpec::Transformer(t) if t.extras.eager_only && train.attention != Attention::Eager => {
            features(
                model,
                &TrainSpec {
                    attention: Attention::Eager,
                    ..train.clone()
                },
            )
        }
        ModelSpec::Transformer(t) => {
            let s = t.effective_seq(train.seq, train.image) as f64;
            let (h, a) = (t.hidden as f64, t.heads as f64);
            // feed-forward width per token: the MLP's, or in MoE blocks the routed experts'
            // (plan::moe); `f_max` is the widest block's, for the backward workspace
            let (f, f_max) = moe::ffn_widths(t);
            let l = t.layers as f64;
            let ffn_streams = match t.ffn_kind {
                FfnKind::Gelu => 1.0,
                FfnKind::Swiglu => 2.0,
            };
            // With full checkpointing only one block's activations exist at a time (during its
            // recompute), on top of every block's stored input.
            let live = if train.checkpointing.is_on() { 1.0 } else { l };
            // Fused attention never stores the b·a·s² scores; selective recomputation drops
            // them from what is stored, but rebuilds one layer's during its backward.
            let dropout = t.dropout_p().is_active();
            let sdpa = train.attention == Attention::Sdpa;
            let stored_scores = !(sdpa || train.checkpointing == Checkpointing::Selective);
            // selective recomputation rebuilds one layer's probabilities (and dropout mask and
            // dropped copy) during that layer's backward: one layer's stored scores, not `live`
            // (measured: without this term the literature under-planned PyTorch's selective
            // steps by 7-10 % at s = 256)
            let score_layers = if stored_scores {
                live
            } else if !sdpa {
                1.0
            } else {
                0.0
            };
            // sdpa's CPU math path keeps its scores in fp32 for 16-bit inputs: counted as
            // twice the elements at the compute dtype's bytes
            let upcast = train
                .attention
                .score_upcast(train.precision.compute_bytes());
            let scores = b * a * s * s * upcast;
            let ws_scores = if sdpa { 0.0 } else { a * s * s * upcast };
            let cb = train.precision.compute_bytes() as f64;
            let planned = departures::Planned::of(t);
            let fused_attention_bytes = if sdpa {
                live * b * s * (t.q_width() as f64 * cb + a * 4.0)
            } else {
                0.0
            };
            // the CPU math path over 16-bit inputs: the fp32 copies of q, k and v its matmuls
            // save, beyond the 16-bit ones eager attention's coefficients count
            let math_upcast_bytes = if upcast > 1.0 {
                let kv = (t.kv_heads * t.head_dim()) as f64;
                live * b * s * (t.q_width() as f64 + 2.0 * kv) * (4.0 - cb)
            } else {
                0.0
            };
            let head = match t.head {
                Head::Lm => s * t.vocab as f64,
                Head::Pooler => h,
                Head::Classifier { classes } => classes as f64,
            };
            let input = t
                .patch
                .map(|p| (p.channels * train.image * train.image) as f64)
                .unwrap_or(0.0);
            Ok(Features {
                bsh: live * b * s * h,
                bsf: live * b * s * f * ffn_streams,
                bas2: score_layers * scores,
                bsv: b * head,
                ckpt_bsh: if train.checkpointing.is_on() {
                    b * s * h * l
                } else {
                    0.0
                },
                conv: 0.0,
                norm: 0.0,
                act: 0.0,
                pool: 0.0,
                input: b * input,
                workspace: b * ws_scores.max(s * f_max).max(head),
                ws_head: b * head,
                head_forward_bytes: 0.0,
                ws_block: b * ws_scores.max(s * f_max),
                phased: train.checkpointing.is_on(),
                gathered: if train.zero_stage >= 3 {
                    let p = params::transformer(t);
                    // the largest block; an MoE one without the other ranks' experts
                    (if p.moe_layers > 0 {
                        let moe_block = p.block(true) - moe::unheld_per_block(t, train.gpus);
                        if p.moe_layers < t.layers {
                            moe_block.max(p.block(false))
                        } else {
                            moe_block
                        }
                    } else {
                        p.block(false)
                    }) as f64
                        + params::largest_tensor(model) as f64
                } else {
                    0.0
                },
                ops: l,
                max_param: update_transient(model, train),
                fused_attention_bytes,
                math_upcast_bytes,
                // the parameters this rank's optimizer updates: not the other ranks' experts
                group_update_bytes: group_update(
                    params::count(model) - moe::unheld(t, train.gpus),
                    train,
                ),
                block: planned.block.map(|k| (k, train.attention.block_kind())),
                act_fn: Some(t.activation_kind()),
                act_fn_base: Some(match t.ffn_kind {
                    FfnKind::Swiglu => Activation::Silu,
                    FfnKind::Gelu => Activation::Gelu,
                }),
                dropout,
                dropout_elems: if dropout {
                    2.0 * live * b * s * h + score_layers * scores
                } else {
                    0.0
                },
                bsf_raw: live * b * s * f,
                bas: live * b * a * s,
                bskv: live * b * s * (t.kv_heads * t.head_dim()) as f64,
                bs: live * b * s,
                bsh_once: b * s * h,
                bs_once: b * s,
                tied_grad_elems: if t.tied_embeddings && t.head == Head::Lm {
                    (t.vocab * t.hidden) as f64
                } else {
                    0.0
                },
                grads_beside_activations: train.grad_accum > 1,
                step_in_backward: false,
                adapter_bytes: 0.0,
                cross_attention_bytes: 0.0,
                measured_saved: deberta_saved::saved(t, train, measured::Kernels::Cuda)
                    .or_else(|| mla_saved::saved(t, train, measured::Kernels::Cuda)),
                compiled_block_bytes: None,
                activations_offloaded: false,
                q_extra: live * b * s * planned.q_extra_per_token(t),
                departure_bytes: live
                    * b
                    * s
                    * (planned.extra_bytes_per_token(t, train.precision)
                        + planned.fused_qkv_bytes_per_token(t, train)
                        + planned.separate_qkv_bytes_per_token(t, train.precision))
                    + if sdpa {
                        0.0
                    } else {
                        score_layers
                            * scores
                            * (planned.softcap_score_bytes(t, train.precision)
                                + planned.softmax_upcast_score_bytes(t, train.precision))
                    },
                head_known_bytes: b * s * planned.head_extra_bytes_per_token(t, train.precision),
                moe_bytes: moe::live_moe_layers(t, live)
                    * b
                    * s
                    * moe::extra_bytes_per_token(t, train.precision),
            })
        }
        ModelSpec::Cnn(c) => {
            if train.checkpointing != Checkpointing::None {
                return input_err(
                    "checkpointing",
                    format!("{} checkpointing is modelled for transformer blocks only; accepted none for CNNs", train.checkpointing),
                );
            }
            let walk = c.walk(train.image)?;
            Ok(Features {
                conv: b * walk.conv_elems as f64,
                norm: b * walk.norm_elems as f64,
                act: b * walk.act_elems as f64,
                pool: b * walk.pool_elems as f64,
                input: b * (c.in_channels * train.image * train.image) as f64,
                workspace: b * walk.max_im2col as f64,
                ws_block: b * walk.max_im2col as f64,
                gathered: if train.zero_stage >= 3 {
                    params::largest_tensor(model) as f64
                } else {
                    0.0
                },
                ops: walk.ops as f64,
                max_param: update_transient(model, train),
                group_update_bytes: group_update(c.params(), train),
                grads_beside_activations: train.grad_accum > 1,
                step_in_backward: false,
                ..Features::default()
            })
        }
    }
}

/// Activation features of an encoder-decoder model: the two stacks' features added (the head
/// only the decoder's) plus the decoder's cross-attention ([`encdec::CrossAttention`]). Under
/// full checkpointing one block of each stack is counted live (the recompute holds one at a
/// time: conservative by the smaller block).
fn encdec_features(
    model: &ModelSpec,
    t: &TransformerSpec,
    e: &EncDec,
    train: &TrainSpec,
) -> anyhow::Result<Features> {
    let enc = features(&encdec::stack(t, t.layers), train)?;
    let dec = features(
        &encdec::stack(t, e.decoder_layers),
        &encdec::decoder_train(e, train),
    )?;
    let cross = encdec::CrossAttention::new(t, e, train);
    let b = train.batch as f64;
    let ws_block = enc.ws_block.max(dec.ws_block).max(b * cross.ws_scores);
    let p = params::transformer(t);
    Ok(Features {
        bsh: enc.bsh + dec.bsh,
        bsf: enc.bsf + dec.bsf,
        bas2: enc.bas2 + dec.bas2 + cross.scores,
        bsv: dec.bsv,
        ckpt_bsh: enc.ckpt_bsh + dec.ckpt_bsh,
        workspace: ws_block.max(dec.ws_head),
        ws_head: dec.ws_head,
        ws_block,
        phased: dec.phased,
        // one decoder block (the larger) and the largest tensor
        gathered: if train.zero_stage >= 3 {
            (p.decoder_per_layer + params::largest_tensor(model)) as f64
        } else {
            0.0
        },
        ops: enc.ops + dec.ops,
        max_param: update_transient(model, train),
        fused_attention_bytes: enc.fused_attention_bytes
            + dec.fused_attention_bytes
            + cross.fused_bytes,
        group_update_bytes: group_update(p.total, train),
        // the stacks' blocks are not the measured PyTorch blocks: generic coefficients
        block: None,
        act_fn: enc.act_fn,
        act_fn_base: enc.act_fn_base,
        dropout: enc.dropout,
        dropout_elems: enc.dropout_elems + dec.dropout_elems,
        bsf_raw: enc.bsf_raw + dec.bsf_raw,
        bas: enc.bas + dec.bas,
        bskv: enc.bskv + dec.bskv,
        bs: enc.bs + dec.bs,
        bsh_once: enc.bsh_once + dec.bsh_once,
        bs_once: enc.bs_once + dec.bs_once,
        tied_grad_elems: dec.tied_grad_elems,
        grads_beside_activations: enc.grads_beside_activations,
        step_in_backward: false,
        q_extra: enc.q_extra + dec.q_extra,
        departure_bytes: enc.departure_bytes + dec.departure_bytes,
        head_known_bytes: dec.head_known_bytes,
        cross_attention_bytes: cross.saved_bytes,
        measured_saved: encdec_saved::saved(t, e, train, encdec_saved::Kernels::Cuda),
        ..Features::default()
    })
}

/// A vision-language model's vision tower: the activation features of its encoder as the
/// measured block it is built like ([`vision::stack`]) at `batch x images` samples of the
/// tower's image size, for the tower's own bytes beside the language model's
/// ([`LiveParts::held`], [`LiveParts::tower_backward`]). The
/// step-level terms (ZeRO-3 gathers, the optimizer's transients, a tied embedding's gradients)
/// are the whole model's and stay with the language model's features. `None` without a tower.
pub fn vision_features(model: &ModelSpec, train: &TrainSpec) -> anyhow::Result<Option<Features>> {
    let ModelSpec::Transformer(t) = model else {
        return Ok(None);
    };
    let Some(v) = t.extras.vision.as_deref() else {
        return Ok(None);
    };
    let f = features(
        &ModelSpec::Transformer(vision::stack(v, &t.name)),
        &vision::train(v, train),
    )?;
    Ok(Some(Features {
        gathered: 0.0,
        max_param: 0.0,
        group_update_bytes: 0.0,
        tied_grad_elems: 0.0,
        // known bytes beside the block the tower is planned with
        departure_bytes: f.departure_bytes + vision::block_mask_bytes(v, train),
        ..f
    }))
}

/// Model-state bytes on one rank, before the fitted half-copy coefficient is applied.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StateBytes {
    pub weights: f64,
    /// the 2-byte/param compute copy of mixed precision (scaled by `half_copy`)
    pub half_copy: f64,
    pub gradients: f64,
    /// optimizer moments, plus the fp32 master copy in pure half precision
    pub optimizer: f64,
}

impl StateBytes {
    pub fn fixed(&self) -> f64 {
        self.weights + self.gradients + self.optimizer
    }
}

/// Exact state bytes: docs/architecture.md, "Model states", and Rajbhandari et al. 2020 for ZeRO
/// sharding.
pub fn state_bytes(params: u64, train: &TrainSpec) -> StateBytes {
    let p = params as f64;
    let n = train.gpus as f64;
    let shard = |bytes: f64, from_stage: u8| {
        if train.zero_stage >= from_stage {
            bytes / n
        } else {
            bytes
        }
    };
    let prec = train.precision;
    // Mixed precision under ZeRO is the ZeRO paper's (and DeepSpeed's) layout: the model holds
    // 16-bit weights and gradients and the fp32 master copy lives in the sharded optimizer
    // state. Plain data parallel with autocast keeps fp32 weights and gradients and adds a
    // 16-bit compute copy. True bf16 keeps everything in bf16 and has no master copy at all.
    let deepspeed_layout = prec.is_mixed() && train.zero_stage >= 1;
    let (weights, half_copy, gradients) = if prec.is_pure_half() || deepspeed_layout {
        (2.0 * p, 0.0, 2.0 * p)
    } else if prec.is_mixed() {
        (4.0 * p, 2.0 * p, 4.0 * p)
    } else {
        (4.0 * p, 0.0, 4.0 * p)
    };
    let master = if deepspeed_layout { 4.0 * p } else { 0.0 };
    let optimizer = p * train
        .optimizer
        .state_bytes_per_param(state_elem_bytes(train))
        + master;
    StateBytes {
        weights: shard(weights, 3),
        half_copy: shard(half_copy, 3),
        gradients: shard(gradients, 2),
        optimizer: shard(optimizer, 1),
    }
}

/// Model-state bytes on one rank. Without experts, [`state_bytes`] of all parameters. With
/// them, the non-expert parameters as usual, and the routed experts split over the
/// `expert_parallel` ranks of an expert group: each holds `1/ep` of them, and ZeRO shards
/// those over the `gpus / ep` ranks that hold the same experts (DeepSpeed-MoE's
/// expert-data-parallel group), so a ZeRO-sharded state is `experts / gpus` per rank either way
/// and an unsharded one `experts / ep` ([`moe::effective_ep`] with fewer GPUs than `ep`).
pub fn rank_state_bytes(model: &ModelSpec, params: u64, train: &TrainSpec) -> StateBytes {
    let (experts, ep) = match model {
        ModelSpec::Transformer(t) => match &t.extras.moe {
            Some(m) => (moe::expert_params(t), moe::effective_ep(m, train.gpus)),
            None => return state_bytes(params, train),
        },
        ModelSpec::Cnn(_) => return state_bytes(params, train),
    };
    let dense = state_bytes(params - experts, train);
    let group = TrainSpec {
        gpus: (train.gpus / ep).max(1),
        ..train.clone()
    };
    let e = state_bytes(experts, &group);
    let epf = ep as f64;
    StateBytes {
        weights: dense.weights + e.weights / epf,
        // no autocast copy of the experts: transformers' grouped_mm experts run in the weights'
        // dtype (`input.to(weight.dtype)`, not an autocast op)
        half_copy: dense.half_copy,
        gradients: dense.gradients + e.gradients / epf,
        optimizer: dense.optimizer + e.optimizer / epf,
    }
}

/// The terms of the linear memory model for one configuration (what the fit regresses on).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FitTerms {
    pub params: u64,
    pub states: StateBytes,
    pub features: Features,
    /// a vision-language model's vision tower ([`vision_features`]); `None` without one, and
    /// under LoRA/QLoRA, whose frozen tower saves nothing for backward
    pub vision: Option<Features>,
}

pub fn fit_terms(model: &ModelSpec, train: &TrainSpec) -> anyhow::Result<FitTerms> {
    let params = params::count(model);
    Ok(FitTerms {
        params,
        states: rank_state_bytes(model, params, train),
        features: features(model, train)?,
        vision: vision_features(model, train)?,
    })
}

/// The largest byte count a plan reports: 1 EiB, far above any machine. A component above it is
/// clamped here and the plan is marked [`MemoryBreakdown::too_large`], so five clamped
/// components still sum inside `u64` (and `i64`): the arithmetic never wraps into a small total
/// that would "fit".
pub const MAX_PLAN_BYTES: u64 = 1 << 60;

/// Rounds a non-negative byte amount to an integer, clamping at [`MAX_PLAN_BYTES`]. NaN or an
/// infinity (only reachable through a broken coefficient table) counts as too large, never as 0.
fn plan_bytes(x: f64, too_large: &mut bool) -> u64 {
    if !x.is_finite() || x >= MAX_PLAN_BYTES as f64 {
        *too_large = true;
        MAX_PLAN_BYTES
    } else if x <= 0.0 {
        0
    } else {
        x.round() as u64
    }
}

/// Per-GPU memory, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryBreakdown {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    /// allocator slack, fixed bytes, the cuBLAS workspace, and the optimizer step's excess when
    /// the step (not backward) holds the peak
    pub overhead: u64,
    /// bytes of activations and gradients that are never live at the same time: PyTorch frees
    /// each layer's saved tensors as backward allocates its gradients (0 under the candle
    /// harness's lifetimes); subtracted from the sum of the parts
    pub backward_overlap: u64,
    /// weights + gradients + optimizer + activations + overhead - backward_overlap (exact:
    /// parts are clamped, so it cannot wrap): the allocated peak, what
    /// `torch.cuda.max_memory_allocated` reports
    pub total: u64,
    /// some component exceeded [`MAX_PLAN_BYTES`] and was clamped there: the job fits nowhere
    pub too_large: bool,
    /// CUDA context and loaded kernels, outside the caching allocator (0 on a CPU table)
    pub cuda_context: u64,
    /// NCCL communicator buffers with more than one GPU, outside the caching allocator
    pub nccl_buffers: u64,
    /// the caching allocator's reserved peak: `total` plus the reserve it keeps cached
    /// (`torch.cuda.max_memory_reserved`)
    pub reserved_peak: u64,
    /// what `nvidia-smi` shows at the peak: reserved peak + CUDA context + NCCL buffers; the
    /// FITS verdict compares this with the GPU's capacity
    pub device_used: u64,
}

impl MemoryBreakdown {
    pub fn states(&self) -> u64 {
        self.weights + self.gradients + self.optimizer
    }

    /// Does this fit `capacity` bytes of device memory? Compares what the device shows in use
    /// at the peak; never true for a plan too large to represent.
    pub fn fits(&self, capacity: u64) -> bool {
        !self.too_large && self.device_used <= capacity
    }

    /// Adds the GPU runtime around the allocated peak: the cuBLAS workspace is allocated through
    /// the caching allocator (so it joins the overhead and the total), the reserve is a fraction
    /// of that total, and the CUDA context and NCCL buffers sit outside the allocator.
    pub fn with_runtime(mut self, rt: &crate::coeffs::RuntimeCoeffs, gpus: u64) -> Self {
        let mut too_large = self.too_large;
        let cublas = plan_bytes(rt.cublas_workspace_bytes.value, &mut too_large);
        self.overhead = (self.overhead + cublas).min(MAX_PLAN_BYTES);
        self.total = self.states() + self.activations + self.overhead - self.backward_overlap;
        self.reserved_peak = plan_bytes(
            self.total as f64 * (1.0 + rt.reserve_frac.value),
            &mut too_large,
        );
        self.cuda_context = plan_bytes(rt.cuda_context_bytes.value, &mut too_large);
        self.nccl_buffers = if gpus > 1 {
            plan_bytes(rt.nccl_bytes.value, &mut too_large)
        } else {
            0
        };
        // three terms of at most 2^60 each: no wrap
        self.device_used = self.reserved_peak + self.cuda_context + self.nccl_buffers;
        self.too_large = too_large;
        self
    }
}

/// Where a step's peak sits above the weights and optimizer states, which are resident
/// throughout. PyTorch's autograd frees each layer's saved activations as backward passes it
/// while that layer's gradients are allocated (gradients start as None each step: zero_grad's
/// set_to_none default), so backward holds about max(activations, gradients), and the autocast
/// weight copy is gone by the optimizer step. A backend that keeps every saved tensor and every
/// gradient until backward ends (`grad_overlap` 0) holds activations + gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PeakAt {
    /// in backward, while the saved activations dominate
    #[default]
    Activations,
    /// at the end of backward, every gradient allocated and (with overlap) the activations freed
    Gradients,
    /// at the optimizer step: gradients plus the update's transients
    Step,
}

/// Bytes of the parts that come and go during a step (see [`PeakAt`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LiveParts {
    pub activations: f64,
    pub gradients: f64,
    /// a tied embedding's two extra gradients at the end of backward ([`tied_gradient_bytes`])
    pub tied_gradients: f64,
    /// the resident share of the 16-bit weight copy
    pub half_copy: f64,
    /// the optimizer step's transients
    pub step: f64,
    /// a vision tower's saved bytes, held from its forward (the first) through the language
    /// model's whole backward (under full checkpointing, its block inputs): no gradient of the
    /// language model frees them; 0 without a tower
    pub held: f64,
    /// a vision tower's activation bytes during its own backward (the last), saved tensors and
    /// temporaries, when every language-model gradient exists and its activations are gone
    pub tower_backward: f64,
    /// with the optimizer in backward ([`Features::step_in_backward`]): the saved activations
    /// without the backward's temporaries, beside which the one live gradient is made; `None`
    /// otherwise
    pub saved_beside_step: Option<f64>,
}

impl LiveParts {
    /// The parts of a configuration's step under the activation coefficients `a`.
    pub fn of(terms: &FitTerms, a: &ActivationCoeffs) -> Self {
        Self {
            activations: terms.features.activation_bytes(a),
            gradients: terms.states.gradients,
            tied_gradients: tied_gradient_bytes(terms),
            half_copy: a.half_copy.value * terms.states.half_copy,
            step: terms.features.step_transient_bytes(a),
            held: terms.vision.map_or(0.0, |v| v.resident_bytes(a)),
            tower_backward: terms.vision.map_or(0.0, |v| v.activation_bytes(a)),
            saved_beside_step: terms
                .features
                .step_in_backward
                .then(|| terms.features.resident_bytes(a)),
        }
    }

    /// Activation bytes at the activation peak: the language model's and what a vision tower
    /// holds beside them, or the tower's own backward if larger.
    pub fn activation_peak(&self) -> f64 {
        (self.activations + self.held).max(self.tower_backward)
    }

    /// Multiplier of each part `(activations, gradients, tied gradients, half copy, step)` when
    /// the peak is `at`, with `overlap` the fraction of the activations freed while gradients
    /// are allocated: the peak is linear in the parts within a regime, which the fit relies on.
    pub fn shares(at: PeakAt, overlap: f64) -> [f64; 5] {
        let o = overlap;
        match at {
            PeakAt::Activations => [1.0, 1.0 - o, 0.0, 1.0, 0.0],
            PeakAt::Gradients => [1.0 - o, 1.0, o, 1.0, 0.0],
            PeakAt::Step => [0.0, 1.0, 0.0, 1.0 - o, 1.0],
        }
    }

    /// The live bytes if the peak is `at`. A vision tower's bytes take no share of the
    /// overlap: in backward they are held beside the language model's; at the end of backward,
    /// with every gradient, the larger of what the tower still holds beside the language
    /// model's unfreed share and the tower's own backward.
    pub fn at(&self, at: PeakAt, overlap: f64) -> f64 {
        // the optimizer in backward: the activations' peak before any gradient (the head's
        // backward), or the live gradient and its update beside what is still saved (measured
        // on a CPU: with every gradient beside the activations' peak instead, +4 to +9 % where
        // PyTorch's peak did not move)
        if let Some(saved) = self.saved_beside_step {
            return self.half_copy
                + match at {
                    PeakAt::Activations => self.activations + self.held,
                    PeakAt::Gradients | PeakAt::Step => saved + self.held + self.gradients,
                };
        }
        let w = Self::shares(at, overlap);
        let (activations, tower) = match at {
            PeakAt::Activations => (w[0] * self.activations + self.held, 0.0),
            PeakAt::Gradients => (
                0.0,
                (w[0] * self.activations + self.held).max(self.tower_backward),
            ),
            PeakAt::Step => (w[0] * self.activations, 0.0),
        };
        activations
            + tower
            + w[1] * self.gradients
            + w[2] * self.tied_gradients
            + w[3] * self.half_copy
            + w[4] * self.step
    }

    /// Where the peak is and its live bytes: the largest regime, the earliest on a tie.
    pub fn peak(&self, overlap: f64) -> (PeakAt, f64) {
        [PeakAt::Activations, PeakAt::Gradients, PeakAt::Step]
            .into_iter()
            .map(|r| (r, self.at(r, overlap)))
            .fold((PeakAt::Activations, f64::NEG_INFINITY), |best, x| {
                if x.1 > best.1 {
                    x
                } else {
                    best
                }
            })
    }
}

/// The fraction of the activations freed while backward allocates gradients: the table's
/// `grad_overlap`, except where the gradients sit beside the activations
/// ([`Features::grads_beside_activations`]).
pub fn overlap(terms: &FitTerms, a: &ActivationCoeffs) -> f64 {
    if terms.features.grads_beside_activations {
        0.0
    } else {
        a.grad_overlap.value.clamp(0.0, 1.0)
    }
}

/// A tied embedding's two gradients are summed at the very end of PyTorch's backward, when the
/// activations are gone and every other gradient exists: two more embedding-sized tensors in the
/// gradients' dtype (per-element bytes from the gradient state bytes).
pub fn tied_gradient_bytes(terms: &FitTerms) -> f64 {
    if terms.params == 0 {
        return 0.0;
    }
    2.0 * terms.features.tied_grad_elems * terms.states.gradients / terms.params as f64
}

/// Memory for one rank under the given coefficient table.
pub fn breakdown(
    terms: &FitTerms,
    model: &ModelSpec,
    train: &TrainSpec,
    coeffs: &Coefficients,
) -> MemoryBreakdown {
    breakdown_with_mode(terms, &coeffs.mode(model.family(), train.precision))
}

/// [`breakdown`] with the (family, precision) coefficients already looked up, so searches that
/// evaluate many configurations do not clone a `ModeCoeffs` per evaluation.
pub fn breakdown_with_mode(terms: &FitTerms, mode: &crate::coeffs::ModeCoeffs) -> MemoryBreakdown {
    let s = terms.states;
    let a = &mode.activation;
    let mut too_large = false;
    let half = a.half_copy.value * s.half_copy;
    let weights_f = s.weights + half;
    let grads = s.gradients;
    let live_parts = LiveParts::of(terms, a);
    let act = live_parts.activation_peak();
    let (_, live) = live_parts.peak(overlap(terms, a));
    let base = s.weights + s.optimizer;
    let peak_f =
        base + live + mode.overhead.frag.value * (base + live) + mode.overhead.const_bytes.value;
    let weights = plan_bytes(weights_f, &mut too_large);
    let gradients = plan_bytes(grads, &mut too_large);
    let optimizer = plan_bytes(s.optimizer, &mut too_large);
    let activations = plan_bytes(act, &mut too_large);
    let parts = weights + gradients + optimizer + activations;
    // The total is the rounded peak; what the four parts do not explain is overhead (allocator
    // slack, fixed bytes, the step's excess over backward) or, when activations and gradients
    // never coexist in full, the overlap subtracted. Rounding the peak once keeps it monotone.
    let total = plan_bytes(peak_f, &mut too_large);
    let (overhead, backward_overlap) = if too_large {
        // clamped parts: report them and their plain sum, which is what does not fit
        (
            plan_bytes(
                peak_f - (weights_f + grads + s.optimizer + act),
                &mut too_large,
            ),
            0,
        )
    } else if total >= parts {
        (total - parts, 0)
    } else {
        // at most the smaller of activations and gradients (f64 rounding of huge totals could
        // claim a byte more)
        (0, (parts - total).min(activations.min(gradients)))
    };
    let total = parts + overhead - backward_overlap;
    MemoryBreakdown {
        weights,
        gradients,
        optimizer,
        activations,
        overhead,
        backward_overlap,
        // each term <= 2^60, so the sum < 2^63: no overflow in u64 or when signed
        total,
        too_large,
        // no runtime until [`MemoryBreakdown::with_runtime`] adds the device's
        cuda_context: 0,
        nccl_buffers: 0,
        reserved_peak: total,
        device_used: total,
    }
}

/// Validates the inputs, then computes the per-rank breakdown.
pub fn estimate(
    model: &ModelSpec,
    train: &TrainSpec,
    coeffs: &Coefficients,
) -> anyhow::Result<MemoryBreakdown> {
    model.validate_for(train)?;
    let terms = fit_terms(model, train)?;
    Ok(breakdown(&terms, model, train, coeffs).with_runtime(&coeffs.runtime(), train.gpus))
}
