"""One config -> one JSON line with live-heap measurements of a real training step on CPU.
Run under LD_PRELOAD=$SHIM (malloc_peak_shim.so, see run.py).  Usage: step.py '<json config>'"""
import ctypes, os, json, sys, tempfile, time
import torch

S = ctypes.CDLL(os.environ["LD_PRELOAD"])
S.shim_live.restype = ctypes.c_long
S.shim_peak.restype = ctypes.c_long
live, peak, reset = S.shim_live, S.shim_peak, S.shim_reset_peak

cfg = json.loads(sys.argv[1])
torch.set_num_threads(2)
torch.manual_seed(0)

import gc
from transformers import GPT2Config, GPT2LMHeadModel
if "lora" in cfg:
    import peft  # noqa: F401  (its modules are the interpreter's, not the model's bytes)
gc.collect()
pre_model = live()   # interpreter + torch + transformers, before any model tensor exists
if cfg.get("auto"):
    # the third draw's families: transformers' own config class for the model_type
    import transformers
    c = transformers.AutoConfig.for_model(cfg["model"], **cfg["config_kw"],
                                          attn_implementation=cfg["attn"])
    model = transformers.AutoModelForCausalLM.from_config(c)
elif cfg["model"] in ("llama", "mistral", "qwen2", "glm", "cohere", "stablelm"):
    # the Llama-family decoders differ in QKV bias (Qwen2, GLM), sliding window (Mistral, off at
    # these lengths), norms (Cohere's one parallel LayerNorm, StableLM's biased ones) and
    # defaults; each is built from its own config class
    import transformers
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "glm": ("GlmConfig", "GlmForCausalLM"),
           "cohere": ("CohereConfig", "CohereForCausalLM"),
           "stablelm": ("StableLmConfig", "StableLmForCausalLM")}[cfg["model"]]
    extra = {"glm": dict(head_dim=cfg["hidden"] // cfg["heads"], pad_token_id=0, eos_token_id=0),
             "stablelm": dict(use_qkv_bias=True)}.get(cfg["model"], {})
    c = getattr(transformers, cls[0])(**extra,
        hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv"], vocab_size=cfg["vocab"],
        max_position_embeddings=max(2048, cfg["seq"]),
        tie_word_embeddings=cfg.get("tied", False), attention_dropout=0.0,
        attn_implementation=cfg["attn"])
    model = getattr(transformers, cls[1])(c)
elif cfg["model"] == "gpt2":
    c = GPT2Config(n_embd=cfg["hidden"], n_layer=cfg["layers"], n_head=cfg["heads"],
                   vocab_size=cfg["vocab"], n_positions=cfg["positions"],
                   resid_pdrop=cfg.get("dropout", 0.0), embd_pdrop=cfg.get("dropout", 0.0),
                   attn_pdrop=cfg.get("dropout", 0.0), summary_first_dropout=0.0,
                   activation_function=cfg.get("act", "gelu_new"),
                   attn_implementation=cfg["attn"])
    model = GPT2LMHeadModel(c)
elif cfg["model"] == "bert":
    from transformers import BertConfig, BertForSequenceClassification
    dp = cfg.get("dropout", 0.0)
    c = BertConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                   num_attention_heads=cfg["heads"], intermediate_size=4 * cfg["hidden"],
                   vocab_size=cfg["vocab"], max_position_embeddings=cfg["positions"],
                   hidden_dropout_prob=dp, attention_probs_dropout_prob=dp, classifier_dropout=dp,
                   num_labels=cfg["classes"], attn_implementation=cfg["attn"])
    model = BertForSequenceClassification(c)
else:
    raise SystemExit("unknown model")

assert model.config._attn_implementation == cfg["attn"], model.config._attn_implementation
# the config.json a user would hand the planner (save_pretrained writes the same dict)
model.config.architectures = [type(model).__name__]
hf_config = model.config.to_dict()
# peft's own default (autocast_adapter_dtype=True) keeps adapters in fp32 over a 16-bit base:
# the base is converted before peft wraps it ("adapter_dtype": "fp32", and always under
# bf16-mixed, HF Trainer's bf16=True); torchtune and LitGPT convert the whole model, adapters
# included, after (the default here)
fp32_adapters = "lora" in cfg and cfg["precision"] != "fp32" and (
    cfg.get("adapter_dtype") == "fp32" or cfg["precision"] == "bf16-mixed")
if cfg["precision"] == "bf16" or fp32_adapters:
    model = model.to(torch.bfloat16)
model.train()
if cfg.get("ckpt") == "full":
    # HF Trainer's gradient_checkpointing=True with the non-reentrant implementation
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
nparams = sum(p.numel() for p in model.parameters())
nbuf = sum(b.numel() * b.element_size() for b in model.buffers())
if "lora" in cfg:
    # peft LoRA: the base frozen, rank-r adapters on the named linears (trainable, in the
    # base's dtype), trained as HF Trainer/peft do: AdamW over the trainable parameters only
    from peft import LoraConfig, get_peft_model
    lc = cfg["lora"]
    model = get_peft_model(model, LoraConfig(r=lc["r"], lora_alpha=2 * lc["r"],
                                             target_modules=lc["targets"],
                                             lora_dropout=lc.get("dropout", 0.0)))
    if cfg["precision"] == "bf16" and not fp32_adapters:
        model = model.to(torch.bfloat16)
    model.train()
if "freeze_layers" in cfg:
    # partial fine-tuning: embeddings and the first N blocks frozen
    inner = model.model
    inner.embed_tokens.requires_grad_(False)
    for layer in inner.layers[: cfg["freeze_layers"]]:
        layer.requires_grad_(False)
if cfg.get("compile", "none") != "none":
    # torch.compile: "blocks" compiles each decoder layer on its own (torchtune's compile: True,
    # `training.compile_model`); "model" the whole model's forward with its loss (HF Trainer's
    # torch_compile=True). Inductor compiles during the warm-up steps.
    if cfg["compile"] == "blocks":
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in inner.model.layers:
            layer.compile()
    else:
        model.compile()
trainable = [p for p in model.parameters() if p.requires_grad]
ntrainable = sum(p.numel() for p in trainable)
if cfg.get("opt_in_bwd"):
    # torchtune's optimizer_in_bwd: one optimizer per parameter, stepped by a hook as soon as
    # the parameter's gradient is accumulated, which then frees the gradient
    per_param = {p: torch.optim.AdamW([p], lr=1e-4, foreach=(cfg["impl"] == "foreach"))
                 for p in trainable}

    def _step_in_bwd(p):
        per_param[p].step()
        per_param[p].zero_grad(set_to_none=True)

    for p in trainable:
        p.register_post_accumulate_grad_hook(_step_in_bwd)

    class _Stepped:  # the step already ran inside backward
        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            pass

    opt = _Stepped()
else:
    opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=(cfg["impl"] == "foreach"))

B, T = cfg["batch"], cfg["seq"]
ids = torch.randint(0, cfg["vocab"], (B, T))
batch = {"input_ids": ids, "labels": ids.clone()}
if cfg["model"] == "bert":
    batch = {"input_ids": ids, "labels": torch.randint(0, cfg["classes"], (B,))}


if cfg.get("loss", "full") != "full":
    # torchtune's CEWithChunkedOutputLoss: the output projection in 8 chunks of the sequence,
    # each chunk upcast and cross-entropied alone (compiled with torch.compile for
    # "chunked-compiled", as torchtune's compile: True does); labels shifted as torchtune does
    import torch.nn.functional as F

    def chunk_ce(logits, labels):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")

    if cfg["loss"] == "chunked-compiled":
        chunk_ce = torch.compile(chunk_ce)
    shifted = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """torchtune's OffloadActivations (`enable_activation_offloading: True`) in its single-stream
    form, on a CPU: each tensor of >= 1024 bytes the forward saves (not a parameter) is copied to
    host memory and dropped; backward brings it back when its node unpacks it and frees it with
    the node. Host memory here is a file-backed mapping (torch.from_file), outside the malloc
    heap the shim counts, as pinned host memory is outside a GPU's allocator."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="offload-")
        self.n = 0

        def dense(t):
            # the strides cover exactly numel elements (a permuted contiguous layout), so the
            # copy can keep them: compiled backward graphs assert their inputs' strides
            extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
            return t.numel() > 0 and extent + 1 == t.numel()

        def pack(t):
            if t.numel() * t.element_size() < 1024 or isinstance(t, torch.nn.Parameter):
                return t
            self.n += 1
            path = os.path.join(self.dir, str(self.n))
            host = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype)
            os.unlink(path)   # the mapping stays; the name goes
            # torchtune's empty_like: the same strides for a dense layout, else contiguous (a
            # view with gaps, e.g. GPT-2's q, k, v split from one c_attn output)
            host = host.as_strided(t.shape, t.stride()) if dense(t) else host.view(t.shape)
            host.copy_(t)
            return ("host", host)

        def unpack(packed):
            if torch.is_tensor(packed):
                return packed
            host = packed[1]
            back = torch.empty_like(host)   # on the "device" heap, in the host copy's layout
            back.copy_(host)
            return back

        super().__init__(pack, unpack)


def offloaded_lm_loss():
    """torchtune's recipe with activation offloading: the decoder stack under the offloading
    hooks, the output projection outside them (torchtune's NoOpManager on `output`) and the
    loss outside the model, as transformers' own causal-LM loss computes it."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with HostOffload():
        hidden = lm.base_model(input_ids=ids).last_hidden_state
    logits = lm.lm_head(hidden)
    return lm.loss_function(logits=logits, labels=batch["labels"],
                            vocab_size=lm.config.vocab_size)


def fwd():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["precision"] == "bf16-mixed"):
        if cfg.get("offload_act"):
            return offloaded_lm_loss()
        if cfg.get("loss", "full") != "full":
            hidden = model.model(input_ids=ids).last_hidden_state
            chunks = [model.lm_head(h) for h in hidden.tensor_split(8, dim=1)]
            del hidden
            loss = sum(chunk_ce(c, l) for c, l in zip(chunks, shifted.tensor_split(8, dim=1)))
            loss = loss / (shifted != -100).sum()
            del chunks   # like torchtune's recipe: the logits are dropped before backward
            return loss
        outputs = model(**batch)
    loss = outputs.loss
    del outputs          # like HF Trainer: keep only the loss
    return loss


def step():
    loss = fwd()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


t0 = time.time()
for _ in range(2):
    step()
t_warm = time.time() - t0


def tensor_state_bytes():
    """Bytes of the tensors the step keeps between steps (parameters, buffers, optimizer
    states), counted by storage from the tensors themselves: the rest of the heap grown since
    `pre_model` is the runtime's own (inductor's compiled code and caches on a CPU)."""
    seen, n = set(), 0
    opts = per_param.values() if cfg.get("opt_in_bwd") else [opt]
    tensors = [*model.parameters(), *model.buffers(),
               *(v for o in opts for st in o.state.values() for v in st.values())]
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            n += t.untyped_storage().nbytes()
    return n


# measured step
gc.collect()
tensor_states = tensor_state_bytes()
reset()
baseline = live()
loss = fwd()
p_fwd = peak(); live_fwd = live()
reset()
loss.backward()
p_bwd = peak(); live_bwd = live()
del loss
reset()
live_pre_opt = live()
opt.step()
p_opt = peak(); live_opt = live()
opt.zero_grad(set_to_none=True)
live_end = live()

peak_fwd_bwd = max(p_fwd, p_bwd)
peak_step = max(peak_fwd_bwd, p_opt)
phase = max((p_fwd, "forward"), (p_bwd, "backward"), (p_opt, "optimizer"))[1]
out = dict(cfg, params=nparams, trainable_params=ntrainable, buffer_bytes=nbuf,
           pre_model_bytes=pre_model, baseline_bytes=baseline,
           states_bytes=baseline - pre_model, tensor_states_bytes=tensor_states,
           peak_fwd_bytes=p_fwd - baseline, live_after_fwd=live_fwd - baseline,
           peak_bwd_bytes=p_bwd - baseline, live_after_bwd=live_bwd - baseline,
           peak_opt_bytes=p_opt - baseline, live_after_opt=live_opt - baseline,
           live_end=live_end - baseline,
           peak_fwd_bwd_abs=peak_fwd_bwd, peak_step_abs=peak_step,
           peak_phase=phase, warm_s=round(t_warm, 2), hf_config=hf_config)
print("RESULT " + json.dumps(out))
