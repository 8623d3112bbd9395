"""vramcal's PyTorch reference backend: one training configuration, real PyTorch steps.

Bundled in the vramcal binary (src/harness/torch/runner.py) and run by `vramcal measure --backend
torch` in a fresh interpreter per point, so every point starts from the same heap. Input: one JSON
request on stdin (written by src/harness/torch/mod.rs):

  {"model": <ModelSpec>, "block": "llama"|"gpt2"|"bert"|"vit"|null, "dropout": p,
   "activation": "gelu_new", "train": <TrainSpec>, "device": "cpu"|"cuda:N",
   "warmup": n, "repeats": n, "seed": n,
   "lora": null | {"r": R, "alpha": a, "dropout": p, "targets": [canonical names], "trainable": n}}

With "lora" the transformers model (its base loaded in the compute dtype under mixed precision,
as the planner assumes) is wrapped by peft's get_peft_model(LoraConfig(...)) with the targets
mapped to transformers' module names (`lora_target_regex`); the optimizer gets the trainable
(adapter) parameters only, and their count must equal vramcal's. peft missing: exit 2.

Output: one line `RESULT <json>` on stdout (see `measure`). Exit codes: 0 measured (also an
out-of-memory point, status "oom"); 2 the request cannot be run by this backend (one line on
stderr naming the field and what is accepted); 3 torch (or transformers) is not installed.

The model is transformers' own class for the spec's block kind (LlamaForCausalLM, or
Qwen2ForCausalLM when only q/k/v have biases; GPT2LMHeadModel; BertModel + pooler or
BertForSequenceClassification; ViTForImageClassification), configured from the spec, and for CNN
specs a torch.nn module built layer by layer from the spec (torchvision's conventions: in-place
ReLU after BatchNorm, residual add then ReLU). The parameter count must equal vramcal's own count
of the spec, so both backends measure the same model.

Memory protocol (the same windows as the candle harness, src/harness/measure.rs):
- CPU: a live-heap counter (malloc_peak_shim.c, LD_PRELOAD) counts malloc_usable_size of every
  live block. The baseline is the tensors alive between steps, counted exactly (parameters,
  buffers, optimizer states, inputs; each storage once); the peak is that baseline plus the
  heap's high-water rise above its level at the step's start. So both mean what
  torch.cuda.memory_allocated / max_memory_allocated mean on a GPU, and the interpreter's and CPU
  kernels' one-time buffers (a few MB, constant) are not counted as the job's memory.
- CUDA: torch.cuda.memory_allocated / max_memory_allocated / max_memory_reserved, device used
  from cudaMemGetInfo, and NVML's per-process used memory when pynvml is installed.
- `warmup` steps (at least one: AdamW creates its states in its first step) run first; the last
  one also records the bytes saved for backward (saved_tensors_hooks, each storage counted once,
  parameters excluded). The baseline is read after the warm-up (weights, gradients freed with
  zero_grad(set_to_none=True), optimizer states, inputs); each of `repeats` steps then runs in its
  own high-water window after a device synchronise. Step times are wall times around each step
  with synchronisation.
"""
import contextlib
import ctypes
import gc
import json
import os
import sys
import time


# Steps GradScaler may skip in a row before the point fails (from its initial 2^16 scale, halving
# each time, 40 skips reach 2^-24: gradients that still overflow are a broken model).
MAX_SKIPPED_STEPS = 40


class Refused(Exception):
    """A request this backend cannot run; `main` prints it as one line and exits 2 (the sweep
    records an error row and goes on)."""

    def __init__(self, field, message):
        super().__init__(f"error: invalid {field}: {message}")


def refuse(field, message):
    raise Refused(field, message)


def main():
    req = json.loads(sys.stdin.read())
    try:
        import torch
    except ImportError:
        print("error: the torch backend needs PyTorch in this Python "
              f"({sys.executable}): pip install torch transformers torchvision", file=sys.stderr)
        sys.exit(3)
    device = torch.device(req["device"])
    if req.get("info"):
        out = {"status": "ok", "device_name": device_name(torch, device),
               "driver": "torch " + torch.__version__}
        if device.type == "cuda":
            out["free_bytes"], out["total_bytes"] = torch.cuda.mem_get_info(device)
            out["driver"] += f" cuda {torch.version.cuda}"
        print("RESULT " + json.dumps(out), flush=True)
        return
    shim = None
    if device.type == "cpu":
        path = os.environ.get("LD_PRELOAD", "")
        if "malloc_peak_shim" not in path:
            refuse("device", "cpu needs the live-heap shim in LD_PRELOAD (vramcal sets it)")
        shim = ctypes.CDLL(path)
        shim.shim_live.restype = ctypes.c_long
        shim.shim_peak.restype = ctypes.c_long
    model_spec = req["model"]
    if model_spec["family"] == "transformer":
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("error: the torch backend needs transformers for transformer models: "
                  "pip install transformers", file=sys.stderr)
            sys.exit(3)
    train = req["train"]
    check_train(train, model_spec)
    torch.manual_seed(req.get("seed", 0))
    warm_runtime(torch, req, device)
    gc.collect()

    try:
        out = measure(torch, req, device, shim)
    except Exception as e:  # an out-of-memory point is a data point; anything else fails
        text = f"{type(e).__name__}: {e}"
        low = text.lower()
        if "out of memory" in low or "can't allocate memory" in low or "outofmemory" in low:
            out = {"status": "oom", "error": text.splitlines()[0]}
        else:
            raise
    out["device_name"] = device_name(torch, device)
    out["driver"] = "torch " + torch.__version__ + (
        f" cuda {torch.version.cuda}" if device.type == "cuda" else "")
    print("RESULT " + json.dumps(out), flush=True)


def warm_runtime(torch, req, device):
    """Loads what the measured model will load lazily (its transformers module, autograd's
    engine and thread pool, the optimizer's code path, autocast) with a throw-away two-layer model,
    before the heap level the measurement counts from, so that Python's own one-time objects are
    not counted as the job's memory (the same reason the candle harness warms its gemm buffers
    before its baseline)."""
    if req["model"]["family"] == "transformer":
        import transformers as tf
        for name in ("LlamaForCausalLM", "LlamaConfig", "Qwen2ForCausalLM", "Qwen2Config",
                     "GPT2LMHeadModel", "GPT2Config", "BertModel", "BertConfig",
                     "BertForSequenceClassification", "ViTForImageClassification", "ViTConfig",
                     "MixtralForCausalLM", "Qwen2MoeForCausalLM"):
            getattr(tf, name)
    train = req["train"]
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    tiny = tiny.to(device)
    opt = optimizer(torch, train, tiny)
    x = torch.randn(4, 8, device=device)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(tiny(x), torch.zeros(4, dtype=torch.long,
                                                                       device=device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del tiny, opt, x, loss


def check_train(train, model_spec):
    if train["zero_stage"] != 0:
        refuse("zero", f"stage {train['zero_stage']} needs DeepSpeed across GPUs; "
               "accepted 0 with the torch backend")
    if train["checkpointing"] != "none" and model_spec["family"] != "transformer":
        refuse("checkpointing", f"{train['checkpointing']} is per transformer block; "
               "accepted none for CNNs")
    if train["checkpointing"] == "selective" and train["attention"] != "eager":
        refuse("checkpointing", "selective recomputes eager attention's probabilities, which "
               "sdpa never keeps; accepted none, full with sdpa")
    if train["precision"] not in ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16"):
        refuse("precision", f"'{train['precision']}'; accepted fp32, bf16-mixed, fp16-mixed, bf16")


def device_name(torch, device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.machine()


# ---------------------------------------------------------------------------------------------
# models


def transformer_plan(req):
    """The transformers classes and config keys for a transformer spec (pure Python: tested
    without torch by test_runner.py). Returns (model class, config class, config kwargs, model
    kwargs, task) where task says how the loss is taken: lm, pooler, classifier or image."""
    t = req["model"]
    block, p, act = req["block"], float(req["dropout"]), req["activation"]
    attn = req["train"]["attention"]
    head = t["head"]["kind"]
    common = dict(hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                  num_attention_heads=t["heads"], intermediate_size=t["ffn"],
                  attn_implementation=attn)
    if t.get("moe"):
        return moe_plan(req, t, common, p, act, head)
    if block == "llama":
        if head != "lm":
            refuse("head", f"{head} on a Llama-family block; accepted lm")
        cfg = dict(common, num_key_value_heads=t["kv_heads"], vocab_size=t["vocab"],
                   max_position_embeddings=max(4096, req["train"]["seq"]),
                   tie_word_embeddings=t["tied_embeddings"], attention_dropout=p,
                   hidden_act=act)
        if t.get("qkv_bias") and not t["bias"]:
            return "Qwen2ForCausalLM", "Qwen2Config", dict(cfg, use_sliding_window=False), {}, "lm"
        cfg.update(attention_bias=t["bias"], mlp_bias=t["bias"])
        return "LlamaForCausalLM", "LlamaConfig", cfg, {}, "lm"
    if block == "gpt2":
        if not t["bias"] or t["kv_heads"] != t["heads"] or head != "lm":
            refuse("model", "a GPT-2 block has biases, multi-head attention and an LM head")
        cfg = dict(n_embd=t["hidden"], n_layer=t["layers"], n_head=t["heads"], n_inner=t["ffn"],
                   vocab_size=t["vocab"], n_positions=t["max_positions"],
                   activation_function=act, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                   tie_word_embeddings=t["tied_embeddings"], attn_implementation=attn)
        return "GPT2LMHeadModel", "GPT2Config", cfg, {}, "lm"
    if block == "bert":
        if t["type_vocab"] == 0:
            refuse("type_vocab", "0; a BERT block has token-type embeddings, accepted 1 or more")
        cfg = dict(common, vocab_size=t["vocab"], max_position_embeddings=t["max_positions"],
                   type_vocab_size=t["type_vocab"], hidden_act=act, hidden_dropout_prob=p,
                   attention_probs_dropout_prob=p)
        if head == "pooler":
            return "BertModel", "BertConfig", cfg, {"add_pooling_layer": True}, "pooler"
        if head == "classifier":
            cfg.update(num_labels=t["head"]["classes"], classifier_dropout=p)
            return "BertForSequenceClassification", "BertConfig", cfg, {}, "classifier"
        refuse("head", f"{head} on a BERT block; accepted pooler, classifier")
    if block == "vit":
        patch = t["patch"]
        if head != "classifier":
            refuse("head", f"{head} on a ViT block; accepted classifier")
        cfg = dict(common, image_size=patch["image"], patch_size=patch["patch"],
                   num_channels=patch["channels"], hidden_act=act, hidden_dropout_prob=p,
                   attention_probs_dropout_prob=p, qkv_bias=t["bias"],
                   num_labels=t["head"]["classes"])
        return "ViTForImageClassification", "ViTConfig", cfg, {}, "image"
    refuse("model", "this block (norm, MLP, arch) has no transformers class here; accepted the "
           "structures of Llama/Mistral/Qwen2, GPT-2, BERT and ViT")


def moe_plan(req, t, common, p, act, head):
    """Mixtral (routed experts only) or Qwen2-MoE (a gated shared expert, dense blocks first) from
    a spec with `moe`. Both renormalise the top-k weights (Qwen's norm_topk_prob, as the candle
    harness does), no router jitter, no auxiliary loss (output_router_logits off: the candle
    harness has none); experts on transformers' default path (grouped_mm)."""
    m = t["moe"]
    if head != "lm" or t["norm"] != "rmsnorm" or t["bias"] or t["arch"] != "decoder":
        refuse("model", "an MoE block here is Mixtral's or Qwen2-MoE's: a bias-free RMSNorm "
               "decoder with an LM head")
    if m.get("expert_parallel", 1) != 1 or m.get("capacity_factor", 1.0) != 1.0:
        refuse("model", "expert parallelism and capacity factors are planner only; accepted "
               "expert_parallel 1, capacity_factor 1")
    extras = ("head_dim", "qk_norm", "block_norms", "parallel_attn", "attn_bias", "mla")
    for key in extras:
        if t.get(key) not in (None, False, "none"):
            refuse(key, f"{t[key]} on an MoE block; accepted Mixtral's or Qwen2-MoE's block")
    cfg = dict(common, num_key_value_heads=t["kv_heads"], vocab_size=t["vocab"],
               max_position_embeddings=max(4096, req["train"]["seq"]),
               tie_word_embeddings=t["tied_embeddings"], attention_dropout=p, hidden_act=act,
               num_experts_per_tok=m["top_k"], output_router_logits=False)
    shared = m.get("shared_ffn", 0)
    if shared == 0:
        if m.get("dense_layers", 0) or t.get("qkv_bias"):
            refuse("moe", "dense blocks or q/k/v biases without a shared expert; accepted "
                   "Mixtral's block (all MoE, no biases)")
        cfg.update(intermediate_size=m["expert_ffn"], num_local_experts=m["experts"],
                   router_jitter_noise=0.0, sliding_window=None)
        return "MixtralForCausalLM", "MixtralConfig", cfg, {}, "lm"
    if not m.get("shared_gate"):
        refuse("moe", "a shared expert without its sigmoid gate (DeepSeek) has no transformers "
               "class here; accepted Qwen2-MoE's gated shared expert")
    cfg.update(num_experts=m["experts"], moe_intermediate_size=m["expert_ffn"],
               shared_expert_intermediate_size=shared, norm_topk_prob=True,
               decoder_sparse_step=1, mlp_only_layers=list(range(m.get("dense_layers", 0))),
               qkv_bias=bool(t.get("qkv_bias")), use_sliding_window=False)
    return "Qwen2MoeForCausalLM", "Qwen2MoeConfig", cfg, {}, "lm"
# canonical block-linear names (src/plan/finetune.rs) -> transformers module paths per block kind
LORA_MODULES = {
    "llama": {"q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
              "o": r"self_attn\.o_proj", "gate": r"mlp\.gate_proj", "up": r"mlp\.up_proj",
              "down": r"mlp\.down_proj"},
    # GPT-2's Conv1D layers (peft sets fan_in_fan_out for them)
    "gpt2": {"qkv": r"attn\.c_attn", "o": r"attn\.c_proj", "fc1": r"mlp\.c_fc",
             "fc2": r"mlp\.c_proj"},
    # BertModel: attention.self.query; ViT: attention.attention.query
    "bert": {"q": r"attention\.(?:self|attention)\.query",
             "k": r"attention\.(?:self|attention)\.key",
             "v": r"attention\.(?:self|attention)\.value", "o": r"attention\.output\.dense",
             "fc1": r"intermediate\.dense", "fc2": r"layer\.\d+\.output\.dense"},
}
LORA_MODULES["vit"] = LORA_MODULES["bert"]


def lora_target_regex(block, targets):
    """peft `target_modules` as one regex (peft full-matches a string against each module's
    name) for vramcal's canonical targets; suffixes alone would be ambiguous (GPT-2's two c_proj,
    BERT's two output.dense)."""
    modules = LORA_MODULES.get(block)
    if modules is None:
        refuse("finetune", f"lora on a '{block}' block; accepted llama, gpt2, bert, vit blocks")
    unknown = [t for t in targets if t not in modules]
    if unknown:
        refuse("lora-targets", f"{','.join(unknown)} on a {block} block; accepted "
               f"{', '.join(modules)}")
    return r".*\.(?:" + "|".join(modules[t] for t in targets) + r")"


def wrap_lora(req, model):
    """The model with peft's LoRA adapters; its base frozen."""
    try:
        import peft
    except ImportError:
        refuse("finetune", "lora needs peft in this Python: pip install peft")
    lc = req["lora"]
    cfg = peft.LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                          target_modules=lora_target_regex(req["block"], lc["targets"]),
                          bias="none")
    model = peft.get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable != lc["trainable"]:
        refuse("lora-targets", f"peft trains {trainable} parameters, vramcal plans "
               f"{lc['trainable']}; the two would measure different adapters")
    return model


def build_transformer(torch, req):
    import transformers as tf
    model_cls, config_cls, cfg, kwargs, task = transformer_plan(req)
    return getattr(tf, model_cls)(getattr(tf, config_cls)(**cfg), **kwargs), task


def build_cnn(torch, spec):
    nn = torch.nn

    def seq(layers):
        mods = []
        for layer in layers:
            kind = layer["type"]
            if kind == "conv":
                mods.append(nn.Conv2d(layer["c_in"], layer["c_out"], (layer["k_h"], layer["k_w"]),
                                      stride=layer.get("stride", 1),
                                      padding=layer.get("padding", 0),
                                      bias=layer.get("bias", True)))
            elif kind == "batchnorm":
                mods.append(nn.BatchNorm2d(layer["channels"]))
            elif kind == "relu":
                mods.append(nn.ReLU(inplace=True))
            elif kind == "pool":
                cls = nn.MaxPool2d if layer["kind"] == "max" else nn.AvgPool2d
                mods.append(cls(layer["k"], stride=layer.get("stride", 1),
                                padding=layer.get("padding", 0)))
            elif kind == "adaptivepool":
                cls = nn.AdaptiveMaxPool2d if layer["kind"] == "max" else nn.AdaptiveAvgPool2d
                mods.append(cls(layer["out"]))
            elif kind == "flatten":
                mods.append(nn.Flatten(1))
            elif kind == "linear":
                mods.append(nn.Linear(layer["d_in"], layer["d_out"],
                                      bias=layer.get("bias", True)))
            elif kind == "residual":
                mods.append(Residual(seq(layer["body"]), seq(layer.get("shortcut", []))))
            else:
                refuse("model", f"CNN layer '{kind}'; accepted conv, batchnorm, relu, pool, "
                       "adaptivepool, flatten, linear, residual")
        return nn.Sequential(*mods)

    class Residual(nn.Module):
        def __init__(self, body, shortcut):
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return torch.relu_(self.body(x) + self.shortcut(x))

    return seq(spec["layers"])


# ---------------------------------------------------------------------------------------------
# one step


def measure(torch, req, device, shim):
    train = req["train"]
    spec = req["model"]
    b = train["batch"]
    gen = torch.Generator().manual_seed(req.get("seed", 0))
    if spec["family"] == "transformer":
        model, task = build_transformer(torch, req)
    else:
        model, task = build_cnn(torch, spec), "image"
    params = sum(p.numel() for p in model.parameters())
    if params != req["params"]:
        refuse("model", f"PyTorch's model has {params} parameters, vramcal's spec "
               f"{req['params']}; the two backends would measure different models")
    precision = train["precision"]
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    elif precision == "fp16":
        model = model.to(torch.float16)
    if req.get("lora"):
        # the frozen base in the compute dtype (peft then keeps the adapters in fp32)
        if precision in ("bf16-mixed", "fp16-mixed"):
            model = model.to(torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
        model = wrap_lora(req, model)
    model = model.to(device)
    model.train()
    if train["checkpointing"] == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif train["checkpointing"] == "selective":
        recompute_attention_core(model)

    # inputs
    if task in ("lm", "pooler", "classifier"):
        vocab = spec["vocab"]
        ids = torch.randint(0, vocab, (b, train["seq"]), generator=gen).to(device)
        if task == "lm":
            batch = {"input_ids": ids, "labels": ids.clone()}
            classes = None
        elif task == "pooler":
            batch = {"input_ids": ids}
            classes = spec["hidden"]
        else:
            classes = spec["head"]["classes"]
            batch = {"input_ids": ids}
    else:
        channels = spec["patch"]["channels"] if spec["family"] == "transformer" else \
            spec["in_channels"]
        side = train["image"]
        pixels = torch.rand((b, channels, side, side), generator=gen) * 2 - 1
        dtype = next(model.parameters()).dtype
        batch = {"pixel_values": pixels.to(device=device, dtype=dtype)}
        classes = spec["head"]["classes"] if spec["family"] == "transformer" else spec["classes"]
        if spec["family"] == "transformer" and side != spec["patch"]["image"]:
            batch["interpolate_pos_encoding"] = True
    targets = None
    if classes is not None:
        targets = torch.randint(0, classes, (b,), generator=gen).to(device)

    opt = optimizer(torch, train, model)
    autocast = contextlib.nullcontext
    scaler = None
    if precision in ("bf16-mixed", "fp16-mixed"):
        dt = torch.bfloat16 if precision == "bf16-mixed" else torch.float16

        def autocast():
            return torch.autocast(device_type=device.type, dtype=dt)
        if precision == "fp16-mixed":
            scaler = torch.amp.GradScaler(device.type)

    def loss_of():
        with autocast():
            if spec["family"] != "transformer":
                logits = model(batch["pixel_values"])
                return torch.nn.functional.cross_entropy(logits.float(), targets)
            if task == "lm":
                out = model(**batch)
                loss = out.loss
                del out  # like HF Trainer: keep only the loss
                return loss
            if task == "pooler":
                pooled = model(**batch).pooler_output
                return torch.nn.functional.cross_entropy(pooled.float(), targets)
            out = model(**batch, labels=targets)
            loss = out.loss
            del out
            return loss

    def finish(loss):
        """Backward and the optimizer step, freeing the loss (and its graph) first. Returns
        False when GradScaler skipped the optimizer step (inf/nan gradients: it then halves the
        scale), True when the weights were updated."""
        if scaler is not None:
            scaler.scale(loss).backward()
            del loss
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            stepped = scaler.get_scale() >= before
        else:
            loss.backward()
            del loss
            opt.step()
            stepped = True
        opt.zero_grad(set_to_none=True)
        return stepped

    def step():
        return finish(loss_of())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warmup = max(1, req.get("warmup", 1))
    saved = None
    for i in range(warmup):
        if i == warmup - 1:
            saved = saved_bytes(torch, model, loss_of, finish)
        else:
            step()
    # fp16 loss scaling starts at 2^16 and skips the optimizer step (halving the scale) while
    # the scaled gradients overflow, so early steps make no optimizer states and no update: a
    # step measured then is not the run's steady state. Warm up until a step has really updated.
    for _ in range(MAX_SKIPPED_STEPS):
        if step():
            break
    else:
        raise RuntimeError(f"GradScaler skipped {MAX_SKIPPED_STEPS} steps in a row")
    sync()
    gc.collect()

    if shim:
        # Tensor bytes, as on CUDA: what the step starts with, counted exactly from the tensors,
        # plus the heap's rise above its level at the step's start. The interpreter's and the
        # CPU kernels' own one-time buffers (a constant few MB that a tiny model would drown in,
        # and that a GPU's allocator never counts) stay out of both numbers.
        baseline = tensor_bytes(torch, model, opt, batch, targets)
    else:
        baseline = torch.cuda.memory_allocated(device)
    def open_window():
        """Starts a high-water window: the heap level it starts from (CPU) and the time."""
        start = 0
        if shim:
            start = shim.shim_live()
            shim.shim_reset_peak()
        else:
            torch.cuda.reset_peak_memory_stats(device)
        return start, time.perf_counter()

    peak = 0
    reserved = 0
    times = []
    for _ in range(max(1, req.get("repeats", 1))):
        for _ in range(MAX_SKIPPED_STEPS):
            # a skipped step (an overflow mid-run) has no optimizer update: measure another
            start, t0 = open_window()
            if step():
                break
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        if shim:
            peak = max(peak, baseline + shim.shim_peak() - start)
        else:
            peak = max(peak, torch.cuda.max_memory_allocated(device))
            reserved = max(reserved, torch.cuda.max_memory_reserved(device))
    out = {"status": "ok", "params": params, "baseline_bytes": baseline, "peak_bytes": peak,
           "step_ms": times, "saved_bytes": saved,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["peak_reserved_bytes"] = reserved
        out["memgetinfo_bytes"] = total - free
        out["nvml_bytes"] = nvml_used(device)
    return out


def recompute_attention_core(model):
    """Selective checkpointing (Korthikanti et al. 2022): the attention core (QK^T, softmax,
    dropout, PV) is recomputed in backward and only its inputs q, k, v are kept. transformers
    looks its module's `eager_attention_forward` up at every call, so the module's function is
    replaced by one wrapped in non-reentrant torch.utils.checkpoint (which restores the RNG
    state, so the recompute draws the same dropout mask). The runner measures one point per
    process, so the patch never outlives the point."""
    import sys
    from torch.utils.checkpoint import checkpoint
    module = sys.modules[type(model).__module__]
    eager = module.eager_attention_forward

    def recomputed(attn, query, key, value, attention_mask, **kwargs):
        return checkpoint(lambda q, k, v: eager(attn, q, k, v, attention_mask, **kwargs),
                          query, key, value, use_reentrant=False)

    module.eager_attention_forward = recomputed


def tensor_bytes(torch, model, opt, batch, targets):
    """Bytes of every tensor alive between steps: parameters, buffers, gradients (none after
    zero_grad(set_to_none=True)), optimizer states and the inputs, each storage once."""
    storages = {}

    def add(t):
        if torch.is_tensor(t):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for state in opt.state.values():
        for v in state.values():
            add(v)
    for v in batch.values():
        add(v)
    add(targets)
    return sum(storages.values())


def optimizer(torch, train, model):
    impl = train.get("optimizer_impl", "loop")
    kw = {"foreach": impl == "foreach"}
    if impl == "fused":
        kw = {"fused": True}
    # a frozen base (LoRA) has no optimizer state: only what trains is given to the optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    name = train["optimizer"]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, **kw)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, **kw)
    if name == "adamw-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            refuse("optimizer", "adamw-8bit needs bitsandbytes (pip install bitsandbytes); "
                   "accepted adamw, sgd-momentum, sgd")
        return bnb.optim.AdamW8bit(params, lr=1e-4)
    refuse("optimizer", f"'{name}'; accepted adamw, sgd-momentum, sgd, adamw-8bit")


def saved_bytes(torch, model, loss_of, finish):
    """One full step whose forward records the bytes autograd saves for backward: each storage
    once (views share one), parameters excluded (they are weights, not activations)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of()
    finish(loss)
    return sum(seen.values())


def nvml_used(device):
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid():
                return p.usedGpuMemory
    except Exception:  # NVML is optional: no pynvml, no permission, a MIG slice
        return None
    return None


if __name__ == "__main__":
    try:
        main()
    except Refused as e:
        print(e, file=sys.stderr)
        sys.exit(2)
