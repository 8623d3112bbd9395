//! One real training step: forward, cross-entropy, backward, optimizer update, in the modes the
//! planner models (precision, gradient checkpointing, simulated ZeRO).
//!
//! Transformers run block-wise and CNNs residual block by residual block (`layers::cnn`; a CNN
//! with neither residual blocks nor conv + ReLU pairs is one graph): the embedding, each block and
//! the head are separate
//! graphs joined by `Var` inputs, so backward releases each block's saved tensors once it has
//! run, as PyTorch does node by node. A block's output is held
//! once, as the next block's input Var (`BlockOut`: its last residual join is kept as terms and
//! seeded with the output gradient); the embedding's graph is rebuilt for its backward at the end.
//! Under ZeRO-2/3 a block's gradients are cut to the shard before the next block runs, as bucketed
//! reduce-scatter would. With checkpointing the forward keeps only block inputs and each block
//! is recomputed from its input (same dropout masks) during backward.
//!
//! ZeRO simulation (rank 0 of `gpus`), see `layers::params`: stage >= 1 allocates optimizer
//! states for the shard only; stage >= 2 keeps only shard gradients; stage 3 keeps only shard
//! weights resident and materialises the full weight for each use (held by the autograd graph
//! until the block's backward, or, with checkpointing, until the block's forward/recompute ends).
//! Communication itself is not simulated: its buffers are not allocated.

use super::layers::cnn::Join;
use super::layers::params::Ctx;
use super::layers::transformer::BlockOut;
use super::layers::{Cnn, ParamStore, Transformer};
use super::optim::Optim;
use crate::error::input_err;
use crate::plan::finetune::{Finetune, FinetuneMode};
use crate::spec::{ModelSpec, Precision, TrainSpec};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

enum Model {
    Transformer(Box<Transformer>),
    Cnn(Cnn),
}

pub struct Trainer {
    model: Model,
    store: ParamStore,
    optim: Optim,
    /// token ids `[b, s]` (u32) or images `[b, c, H, W]` (fp32)
    input: Tensor,
    /// class ids (u32): next tokens `[b*s]` or labels `[b]`
    targets: Tensor,
    compute: DType,
    checkpoint: bool,
    /// selective checkpointing: eager attention recomputes its probabilities in backward
    selective: bool,
    segmented: bool,
    /// fused (sdpa-like) attention instead of the composed one
    flash_attention: bool,
    /// sdpa's math path in half precision on a CPU ([`Ctx::upcast_math_attention`])
    upcast_math_attention: bool,
    dropout: f32,
    seed: u64,
    steps: u64,
}

/// Storage and compute dtypes for a precision mode.
fn dtypes(p: Precision) -> (DType, DType) {
    match p {
        Precision::Fp32 => (DType::F32, DType::F32),
        Precision::Bf16Mixed => (DType::F32, DType::BF16),
        Precision::Fp16Mixed => (DType::F32, DType::F16),
        Precision::Bf16 => (DType::BF16, DType::BF16),
    }
}

/// Runs the op kinds a step needs in `dtype` on `device` (conv, matmul, unary ops and their
/// backward through a differentiable cast).
fn backend_has(device: &Device, dtype: DType) -> bool {
    let probe = || -> candle_core::Result<()> {
        let v = Var::from_tensor(&Tensor::ones((1, 2, 4, 4), DType::F32, device)?)?;
        let x = v.as_tensor().to_dtype(dtype)?;
        let k = Tensor::ones((2, 2, 3, 3), dtype, device)?;
        let y = x.conv2d(&k, 1, 1, 1, 1)?.reshape((8, 4))?;
        let z = y.matmul(&y.t()?)?.exp()?.gelu()?.sum_all()?;
        z.to_dtype(DType::F32)?.backward()?;
        Ok(())
    };
    probe().is_ok()
}

/// Refuses a precision whose compute dtype the backend cannot train in (e.g. candle's CPU
/// matmul has f16 but no bf16 kernel), rather than silently running it in fp32.
fn check_backend(device: &Device, p: Precision, dtype: DType) -> anyhow::Result<()> {
    if backend_has(device, dtype) {
        return Ok(());
    }
    let accepted: Vec<&str> = Precision::ALL
        .iter()
        .filter(|q| {
            let c = dtypes(**q).1;
            c == DType::F32 || (c != dtype && backend_has(device, c))
        })
        .map(|q| q.as_str())
        .collect();
    input_err(
        "precision",
        format!(
            "{p} needs {dtype:?} kernels that the {} backend lacks; accepted on this backend: {} \
             (bf16 modes need CUDA)",
            if device.is_cpu() { "CPU" } else { "device" },
            accepted.join(", ")
        ),
    )
}

/// Block departures the planner counts but this harness does not build (it would build another
/// model and record it under this one's name). Built: the plain blocks, `head_dim`, multi-query /
/// grouped-query `kv_heads`, `attn_bias`, pre-norm `parallel_attn` (one shared norm or two) and
/// the mixture of experts (pre-norm); refused, naming the spec key: the rest.
fn refuse_unbuilt_blocks(model: &ModelSpec) -> anyhow::Result<()> {
    let ModelSpec::Transformer(t) = model else {
        return Ok(());
    };
    let (x, d) = (&t.extras, crate::spec::transformer::BlockExtras::default());
    let post_norm = t.embedding_norm;
    let unbuilt = [
        ("mla", x.mla.is_some()),
        ("enc_dec", x.enc_dec.is_some()),
        ("vision", x.vision.is_some()),
        ("qk_norm", x.qk_norm != d.qk_norm),
        (
            "block_norms",
            !matches!(
                (x.block_norms, x.parallel_attn),
                (None | Some(2), _) | (Some(1), true)
            ),
        ),
        ("lm_head_bias", x.lm_head_bias),
        ("position_offset", x.position_offset != 0),
        ("embed_proj", x.embed_proj.is_some()),
        ("head_transform", x.head_transform != d.head_transform),
        ("factorized_embedding", x.factorized_embedding.is_some()),
        (
            "rel_positions",
            x.rel_positions != 0 || x.rel_norm || x.pos_proj != 0,
        ),
        ("moe", x.moe.is_some() && post_norm),
        // the harness routes dropless on one rank, holding every expert
        (
            "capacity_factor",
            x.moe.as_ref().is_some_and(|m| m.capacity_factor.0 != 1.0),
        ),
        (
            "expert_parallel",
            x.moe.as_ref().is_some_and(|m| m.expert_parallel != 1),
        ),
        ("parallel_attn", x.parallel_attn && post_norm),
        ("attn_softcap", x.attn_softcap),
        ("final_softcap", x.final_softcap),
        ("norm_weight_fp32", x.norm_weight_fp32),
        // transformers runs these classes eager only (BLOOM's ALiBi, which this harness does
        // not build either)
        ("eager_only", x.eager_only),
        ("attn_sinks", x.attn_sinks),
        (
            "moe",
            x.moe
                .as_ref()
                .is_some_and(|m| m.expert_bias || m.router_bias || m.clamped_glu),
        ),
    ];
    match unbuilt.iter().find(|u| u.1) {
        Some((key, _)) => input_err(
            "model",
            format!("`{key}` is planned, not built by the candle harness; accepted the plain block with head_dim, kv_heads, attn_bias, pre-norm parallel_attn or a dropless one-rank moe, or a CNN"),
        ),
        None => Ok(()),
    }
}

/// Settings the planner models from the literature but this harness cannot run yet; running
/// them silently as something else would record a wrong measurement under their name.
fn refuse_planner_only(train: &TrainSpec) -> anyhow::Result<()> {
    use crate::spec::{Optimizer, OptimizerImpl};
    if train.optimizer == Optimizer::AdamW8bit {
        return input_err(
            "optimizer",
            "adamw-8bit is planned from the literature but not run by the candle harness; accepted adamw, sgd-momentum, sgd",
        );
    }
    if train.grad_accum != 1 {
        return input_err(
            "grad-accum",
            format!(
                "{} micro-batches per step is planned, not run by the candle harness; accepted 1",
                train.grad_accum
            ),
        );
    }
    if train.optimizer_impl != OptimizerImpl::Loop {
        return input_err(
            "optimizer-impl",
            format!("{} is planned from PyTorch's implementation but the candle harness updates tensor by tensor; accepted loop", train.optimizer_impl),
        );
    }
    Ok(())
}

/// Fine-tuning this harness does not build: QLoRA's packed base, frozen leading blocks,
/// offload, peft's LoRA dropout (refused rather than measured as something else).
fn refuse_unbuilt_finetune(
    model: &ModelSpec,
    train: &TrainSpec,
    ft: &Finetune,
) -> anyhow::Result<()> {
    ft.validate(model, train)?;
    if ft.mode == FinetuneMode::Qlora {
        // the NF4 base is built for the block linears, each adapted (a frozen unadapted linear
        // would have to dequantize in a node of its own), unsharded
        let ModelSpec::Transformer(t) = model else {
            return input_err("finetune", "qlora on a CNN; accepted full");
        };
        if ft.adapted(t).len() != crate::plan::finetune::block_linears(t).len() {
            return input_err(
                "lora-targets",
                "qlora adapting only some block linears is planned, not run by the candle \
                 harness; accepted all",
            );
        }
        if train.zero_stage > 0 {
            return input_err(
                "zero",
                format!(
                    "{} with qlora is planned, not run by the candle harness; accepted 0",
                    train.zero_stage
                ),
            );
        }
    } else if ft.base_bits < 16 {
        return input_err(
            "base-bits",
            format!(
                "{} (a quantized base) is planned, not run by the candle harness; accepted 16",
                ft.base_bits
            ),
        );
    }
    if let ModelSpec::Transformer(t) = model {
        // this harness builds gate and up apart
        if t.extras.fused_gate_up && ft.adapted(t).iter().any(|l| l.name == "gate_up") {
            return input_err(
                "lora-targets",
                "gate_up (a fused gate and up projection) is planned, not built by the candle \
                 harness; accepted the other block linears",
            );
        }
    }
    if ft.freeze_layers > 0 {
        return input_err(
            "freeze-layers",
            format!(
                "{} is planned, not run by the candle harness; accepted 0",
                ft.freeze_layers
            ),
        );
    }
    if ft.offload.optimizer() {
        return input_err(
            "offload",
            format!(
                "{} is planned, not run by the candle harness; accepted none",
                ft.offload.as_str()
            ),
        );
    }
    if ft.is_adapter() && ft.lora_dropout > 0.0 {
        return input_err(
            "lora-dropout",
            format!(
                "{} is planned, not run by the candle harness; accepted 0",
                ft.lora_dropout
            ),
        );
    }
    Ok(())
}

/// Adds `g` (cut to the shard under ZeRO-2/3) into `acc[i]` for every parameter `gs` holds.
fn collect(store: &ParamStore, gs: &GradStore, acc: &mut [Option<Tensor>]) -> anyhow::Result<()> {
    let shard_grads = store.zero_stage >= 2;
    for (i, p) in store.params.iter().enumerate() {
        let Some(g) = gs.get(p.var.as_tensor()) else {
            continue;
        };
        let g = if shard_grads && g.dim(0)? > p.shard_rows {
            // copy so the full gradient's storage is released with the GradStore
            g.narrow(0, 0, p.shard_rows)?.copy()?
        } else {
            // detached: candle leaves a Var's gradient with the history of the ops that made
            // it, which would keep their inputs alive until the optimizer step
            g.detach()
        };
        acc[i] = Some(match acc[i].take() {
            Some(a) => (a + g)?,
            None => g,
        });
    }
    Ok(())
}

impl Trainer {
    /// Builds the model's Vars (fp32), the optimizer state and a synthetic batch (seeded RNG:
    /// token ids / images and labels) on `device`.
    pub fn new(
        model: &ModelSpec,
        train: &TrainSpec,
        device: &Device,
        seed: u64,
    ) -> anyhow::Result<Self> {
        Self::with_finetune(model, train, &Finetune::default(), device, seed)
    }

    /// [`Trainer::new`] training what `ft` says: LoRA freezes the base (plain tensors in the
    /// compute dtype) and trains adapters on the adapted block linears.
    pub fn with_finetune(
        model: &ModelSpec,
        train: &TrainSpec,
        ft: &Finetune,
        device: &Device,
        seed: u64,
    ) -> anyhow::Result<Self> {
        model.validate_for(train)?;
        let (storage, compute) = dtypes(train.precision);
        if compute != DType::F32 {
            check_backend(device, train.precision, compute)?;
        }
        Self::build(model, train, ft, device, seed, storage, compute)
    }

    /// `new` with explicit storage/compute dtypes (unit tests run pure f16 on CPU to exercise the
    /// fp32-master path, which the CPU backend cannot run in bf16).
    fn build(
        model: &ModelSpec,
        train: &TrainSpec,
        ft: &Finetune,
        device: &Device,
        seed: u64,
        storage: DType,
        compute: DType,
    ) -> anyhow::Result<Self> {
        refuse_planner_only(train)?;
        refuse_unbuilt_blocks(model)?;
        // every parameter the planner counts: the model, plus LoRA adapters when it has them
        let planned = {
            let split = crate::plan::finetune::split(model, ft);
            split.frozen + split.trainable
        };
        refuse_unbuilt_finetune(model, train, ft)?;
        let checkpoint = train.checkpointing.is_on();
        let selective = train.checkpointing == crate::spec::Checkpointing::Selective;
        if (checkpoint || selective) && matches!(model, ModelSpec::Cnn(_)) {
            return input_err(
                "checkpointing",
                format!(
                    "{} is implemented per transformer block; accepted none for CNNs",
                    train.checkpointing
                ),
            );
        }
        if selective && train.attention == crate::spec::Attention::Sdpa {
            return input_err(
                "checkpointing",
                "selective recomputes eager attention's probabilities, which sdpa never keeps; \
                 accepted none, full with sdpa",
            );
        }
        // transformers' default per architecture (GPT-2, BERT 0.1; Llama, ViT none) or the spec's
        let dropout = match model {
            ModelSpec::Transformer(t) => t.dropout_p().0,
            ModelSpec::Cnn(_) => 0.0,
        };
        let mut store =
            ParamStore::new(device, storage, seed, train.zero_stage, train.gpus as usize);
        // LoRA: the base is frozen in the compute dtype (peft on a model loaded in it), the
        // adapters train in the weights' dtype
        if ft.is_adapter() {
            store.frozen = Some(compute);
        }
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_da7a);
        let b = train.batch as usize;
        let (model, input, targets) = match model {
            ModelSpec::Transformer(t) => {
                let m = Transformer::with_finetune(t, &mut store, ft)?;
                store.frozen = None;
                let classes = m.classes();
                let (input, targets) = match &t.patch {
                    Some(p) if p.seq_for(train.image) > p.seq_for(p.image) => {
                        return input_err(
                            "image",
                            format!(
                                "{} px gives more patches than the model's {} learned positions; \
                                 accepted up to {} px",
                                train.image,
                                p.seq_for(p.image),
                                p.image
                            ),
                        );
                    }
                    Some(p) => {
                        let side = train.image as usize;
                        let c = p.channels as usize;
                        let n = b * c * side * side;
                        let img: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
                        (
                            Tensor::from_vec(img, (b, c, side, side), device)?,
                            labels(&mut rng, b, classes, device)?,
                        )
                    }
                    None => {
                        let s = train.seq as usize;
                        let v = t.vocab as u32;
                        let ids: Vec<u32> = (0..b * (s + 1)).map(|_| rng.gen_range(0..v)).collect();
                        let ids = Tensor::from_vec(ids, (b, s + 1), device)?;
                        let input = ids.narrow(1, 0, s)?.contiguous()?;
                        let targets = if m.spec.head == crate::spec::transformer::Head::Lm {
                            ids.narrow(1, 1, s)?.flatten_all()?.contiguous()?
                        } else {
                            labels(&mut rng, b, classes, device)?
                        };
                        (input, targets)
                    }
                };
                (Model::Transformer(Box::new(m)), input, targets)
            }
            ModelSpec::Cnn(c) => {
                let m = Cnn::new(c, &mut store)?;
                let side = train.image as usize;
                let ch = c.in_channels as usize;
                let img: Vec<f32> = (0..b * ch * side * side)
                    .map(|_| rng.gen_range(-1.0..1.0))
                    .collect();
                let input = Tensor::from_vec(img, (b, ch, side, side), device)?;
                let targets = labels(&mut rng, b, c.classes as usize, device)?;
                (Model::Cnn(m), input, targets)
            }
        };
        anyhow::ensure!(
            store.total() == planned,
            "the harness built {} parameters where the planner counts {planned}",
            store.total()
        );
        let segmented = matches!(model, Model::Transformer(_));
        let kernels = train.attention.kernels_on(device.is_cpu(), dropout > 0.0);
        let optim = Optim::new(train.optimizer, &store)?;
        Ok(Self {
            model,
            store,
            optim,
            input,
            targets,
            compute,
            checkpoint,
            selective,
            segmented,
            flash_attention: kernels == crate::spec::Attention::Sdpa,
            // sdpa asked for, PyTorch's math path run instead
            upcast_math_attention: kernels == crate::spec::Attention::Math && compute != DType::F32,
            dropout,
            seed,
            steps: 0,
        })
    }

    /// Parameters of the full model (not the ZeRO shard), counted from the allocated Vars'
    /// logical shapes.
    pub fn params(&self) -> u64 {
        self.store.total()
    }

    /// Parameters with gradients and optimizer states (LoRA: the adapters).
    pub fn trainable_params(&self) -> u64 {
        self.store.trainable()
    }

    /// Bytes of the tensors alive between steps, each counted from its shape and dtype: the
    /// weights (this rank's as held), the optimizer states and the synthetic inputs. What
    /// PyTorch's `memory_allocated` counts between steps; the CPU protocol's baseline.
    pub fn tensor_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let weights: u64 = self
            .store
            .params
            .iter()
            .map(|p| bytes(p.var.as_tensor()) + p.nf4.as_ref().map_or(0, |q| q.bytes()))
            .sum();
        let states: u64 = self.optim.states().map(|v| bytes(v.as_tensor())).sum();
        weights + states + bytes(&self.input) + bytes(&self.targets)
    }

    /// The parameter store (names, Vars, shard sizes), for inspection.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// One training step: forward, cross-entropy loss, backward, optimizer update. Returns the
    /// loss. Does not synchronise the device (the caller times with sync around it).
    pub fn step(&mut self) -> anyhow::Result<f32> {
        let (loss, grads) = self.compute_grads()?;
        self.optim.step(&self.store, &grads)?;
        Ok(loss)
    }

    /// Gradients of one step without the update, by Var name (for tests comparing checkpointed
    /// vs plain). Under ZeRO-2/3 these are the shard's rows.
    pub fn gradients(&mut self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let (_, grads) = self.compute_grads()?;
        Ok(self
            .store
            .params
            .iter()
            .zip(grads)
            .filter_map(|(p, g)| g.map(|g| (p.name.clone(), g)))
            .collect())
    }

    fn compute_grads(&mut self) -> anyhow::Result<(f32, Vec<Option<Tensor>>)> {
        self.steps += 1;
        let ctx = Ctx {
            store: &self.store,
            dtype: self.compute,
            dropout: self.dropout,
            flash_attention: self.flash_attention,
            recompute_attention: self.selective,
            upcast_math_attention: self.upcast_math_attention,
            no_grad: false,
            seed: self.seed.wrapping_mul(0x9e37_79b9).wrapping_add(self.steps),
        };
        let mut acc = vec![None; self.store.params.len()];
        let loss = match (&self.model, self.segmented) {
            (Model::Transformer(m), true) => segmented(
                m,
                &ctx,
                &self.input,
                &self.targets,
                self.checkpoint,
                &mut acc,
            )?,
            (Model::Transformer(_), false) => unreachable!("transformers run segmented"),
            (Model::Cnn(m), _) => segmented_cnn(m, &ctx, &self.input, &self.targets, &mut acc)?,
        };
        Ok((loss, acc))
    }
}

fn labels(rng: &mut StdRng, b: usize, classes: usize, device: &Device) -> anyhow::Result<Tensor> {
    let ids: Vec<u32> = (0..b).map(|_| rng.gen_range(0..classes as u32)).collect();
    Ok(Tensor::from_vec(ids, b, device)?)
}

/// Block-wise forward and backward (see the module doc). Returns the loss.
fn segmented(
    m: &Transformer,
    ctx: &Ctx,
    input: &Tensor,
    targets: &Tensor,
    checkpoint: bool,
    acc: &mut [Option<Tensor>],
) -> anyhow::Result<f32> {
    // The embedding's graph is not kept: it is rebuilt for its backward at the end (a lookup;
    // its dropout mask is reseeded), so its output is held once, as block 0's input.
    let mut x = m.embed(ctx, input)?.detach();
    // checkpoint: the stored block inputs; otherwise every segment's (input Var, output terms
    // with their graph).
    let mut inputs: Vec<Tensor> = Vec::new();
    let mut kept: Vec<(Var, BlockOut)> = Vec::new();
    for i in 0..m.layers() {
        if checkpoint {
            // as under torch.no_grad: no graph, each intermediate freed as the next is made
            let fwd = Ctx {
                no_grad: true,
                ..*ctx
            };
            let mut out = x.clone();
            for part in 0..m.parts(i) {
                out = m.block_part(&fwd, i, part, &out)?.value()?;
            }
            inputs.push(std::mem::replace(&mut x, out));
        } else {
            let (segments, out) = block_segments(m, ctx, i, x)?;
            x = out;
            kept.extend(segments);
        }
    }
    let hv = Var::from_tensor(&x)?;
    drop(x);
    let loss = m.head_loss(ctx, hv.as_tensor(), targets)?;
    let gs = loss.backward()?;
    // The loss holds the head's graph: release it now, as PyTorch frees a node's saved tensors
    // once its backward has run.
    let loss_value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    drop(loss);
    collect(ctx.store, &gs, acc)?;
    let mut g = gs
        .get(hv.as_tensor())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no gradient reached the final hidden states"))?;
    drop(gs);
    drop(hv);
    for i in (0..m.layers()).rev() {
        let mut segments = if checkpoint {
            let stored = inputs.pop().expect("one stored input per block");
            block_segments(m, ctx, i, stored)?.0
        } else {
            let at = kept.len() - m.parts(i);
            kept.split_off(at)
        };
        while let Some(segment) = segments.pop() {
            g = segment_backward(ctx.store, segment, g, acc)
                .map_err(|e| e.context(format!("block {i}")))?;
        }
    }
    if m.embedding_trainable(ctx.store) {
        let emb = m.embed(ctx, input)?;
        let gs = super::layers::joins::seed(&emb, &g)?.backward()?;
        collect(ctx.store, &gs, acc)?;
    }
    Ok(loss_value)
}

/// Block `i`'s forward from its input `x` as its graph segments ([`Transformer::parts`]): each
/// segment's input Var and output terms (holding its graph), and the block output's value.
fn block_segments(
    m: &Transformer,
    ctx: &Ctx,
    i: usize,
    mut x: Tensor,
) -> anyhow::Result<(Vec<(Var, BlockOut)>, Tensor)> {
    let mut segments = Vec::with_capacity(m.parts(i));
    for part in 0..m.parts(i) {
        let v = Var::from_tensor(&x)?;
        drop(x);
        let out = m.block_part(ctx, i, part, v.as_tensor())?;
        x = out.value()?;
        segments.push((v, out));
    }
    Ok((segments, x))
}

/// One segment's backward from its output gradient `g`: the parameter gradients go to `acc`, the
/// gradient of the segment's input is returned. The segment's graph is dropped before the
/// next one runs, as PyTorch frees saved tensors node by node.
fn segment_backward(
    store: &ParamStore,
    (v, out): (Var, BlockOut),
    g: Tensor,
    acc: &mut [Option<Tensor>],
) -> anyhow::Result<Tensor> {
    let gs = out.root(&g)?.backward()?;
    drop(g);
    let resid = out.residual_grad(v.as_tensor())?;
    drop(out);
    collect(store, &gs, acc)?;
    let gv = gs.get(v.as_tensor()).cloned();
    drop(gs);
    Ok(match (gv, resid) {
        (Some(a), Some(b)) => (a + b)?,
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => anyhow::bail!("no gradient reached the segment's input"),
    })
}

/// Segment-wise forward and backward of a CNN (see `layers::cnn`). Returns the loss.
fn segmented_cnn(
    m: &Cnn,
    ctx: &Ctx,
    images: &Tensor,
    targets: &Tensor,
    acc: &mut [Option<Tensor>],
) -> anyhow::Result<f32> {
    // (the segment's input Var, None for the images; its output join)
    let mut kept: Vec<(Option<Var>, Join)> = Vec::new();
    let mut input: Option<Var> = None;
    for i in 0..m.segments() {
        let join = m.segment(ctx, i, input.as_ref().map_or(images, |v| v.as_tensor()))?;
        let out = join.value()?;
        let next = Var::from_tensor(&out)?;
        drop(out);
        kept.push((input.replace(next), join));
    }
    let loss = m.head_loss(
        ctx,
        input.as_ref().map_or(images, |v| v.as_tensor()),
        targets,
    )?;
    let gs = loss.backward()?;
    let loss_value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    drop(loss);
    collect(ctx.store, &gs, acc)?;
    let mut g = input.as_ref().and_then(|v| gs.get(v.as_tensor()).cloned());
    drop(gs);
    // `input` is now the last segment's output: the ReLU mask of its join
    while let Some((seg_input, join)) = kept.pop() {
        let out = input
            .take()
            .ok_or_else(|| anyhow::anyhow!("a CNN segment without its output"))?;
        let grad = g
            .take()
            .ok_or_else(|| anyhow::anyhow!("no gradient reached a CNN segment's output"))?;
        let root = join.root(&grad, out.as_tensor())?;
        drop((out, grad));
        let gs = root.backward()?;
        drop((root, join));
        collect(ctx.store, &gs, acc)?;
        g = seg_input
            .as_ref()
            .and_then(|v| gs.get(v.as_tensor()).cloned());
        input = seg_input;
    }
    Ok(loss_value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::presets::preset;

    /// True half precision (half Vars and half optimizer states, no fp32 master), run in f16
    /// because the CPU backend has no bf16 matmul: weights and both AdamW moments stay half and
    /// each moment covers this rank's shard; training with momentum moves. (AdamW itself is not
    /// stepped in f16: its eps of 1e-8 underflows to 0 in f16, unlike bf16, and 0/0 is NaN.)
    #[test]
    fn pure_half_keeps_half_states_and_no_master() {
        let train = TrainSpec {
            batch: 2,
            seq: 16,
            zero_stage: 1,
            gpus: 2,
            ..TrainSpec::default()
        };
        let spec = preset("tiny-gpt").unwrap();
        let sgd = TrainSpec {
            optimizer: crate::spec::Optimizer::SgdMomentum,
            ..train.clone()
        };
        let mut t = Trainer::build(
            &spec,
            &sgd,
            &Finetune::default(),
            &Device::Cpu,
            1,
            DType::F16,
            DType::F16,
        )
        .unwrap();
        let a = t.step().unwrap();
        let b = t.step().unwrap();
        assert!(a.is_finite() && b.is_finite() && a != b, "{a} {b}");
        for p in &t.store.params {
            assert_eq!(p.var.dtype(), DType::F16, "{}", p.name);
        }
        let t = Trainer::build(
            &spec,
            &train,
            &Finetune::default(),
            &Device::Cpu,
            1,
            DType::F16,
            DType::F16,
        )
        .unwrap();
        let states: Vec<_> = t.optim.states().collect();
        assert_eq!(
            states.len(),
            2 * t.store.params.len(),
            "AdamW: m and v per parameter"
        );
        for (pair, p) in states.chunks(2).zip(&t.store.params) {
            for m in pair {
                assert_eq!(m.dtype(), DType::F16, "{}", p.name);
                assert_eq!(m.dim(0).unwrap(), p.shard_rows, "{}", p.name);
            }
        }
    }

    #[test]
    fn planner_only_settings_are_refused() {
        use crate::spec::{Optimizer, OptimizerImpl};
        let base = TrainSpec {
            batch: 1,
            seq: 16,
            ..TrainSpec::default()
        };
        let cases = [
            TrainSpec {
                optimizer: Optimizer::AdamW8bit,
                ..base.clone()
            },
            TrainSpec {
                optimizer_impl: OptimizerImpl::Foreach,
                ..base.clone()
            },
        ];
        let spec = preset("tiny-gpt").unwrap();
        for train in cases {
            let e = Trainer::new(&spec, &train, &Device::Cpu, 0).err().unwrap();
            assert_eq!(crate::error::exit_code(&e), 2, "{train:?}");
        }
        assert!(Trainer::new(&spec, &base, &Device::Cpu, 0).is_ok());
        // latent attention (as other unbuilt blocks) is refused rather than built plain
        let ModelSpec::Transformer(mut t) = spec else {
            unreachable!()
        };
        t.extras.mla = Some(Box::new(crate::spec::moe::Mla {
            q_lora_rank: 0,
            kv_lora_rank: 8,
            qk_nope: 8,
            qk_rope: 8,
            v_head: 8,
        }));
        let e = Trainer::new(&ModelSpec::Transformer(t), &base, &Device::Cpu, 0)
            .err()
            .unwrap();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(
            format!("{e}").starts_with("invalid model: `mla` is planned, not built"),
            "{e}"
        );
    }

    #[test]
    fn cnn_checkpointing_is_refused() {
        let train = TrainSpec {
            image: 32,
            checkpointing: crate::spec::Checkpointing::Full,
            ..TrainSpec::default()
        };
        let e = Trainer::new(&preset("tiny-resnet18").unwrap(), &train, &Device::Cpu, 0)
            .err()
            .unwrap();
        assert_eq!(crate::error::exit_code(&e), 2);
    }
}
