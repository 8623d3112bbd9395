"""Real PyTorch training steps against vramcal's plan (calibration/data/torch-step-peaks-cpu.csv).

For each configuration, step.py runs HF transformers' own model class for two warm-up steps and a
measured one (forward with labels, backward, AdamW step, zero_grad(set_to_none=True)) in a fresh
process under an LD_PRELOAD malloc shim that tracks live heap bytes (malloc_peak_shim.c); the
planner's `estimate --json` for the same shape is recorded beside it. The planner's total includes
a 32 MiB cuBLAS workspace that a CPU process lacks, subtracted here. GPT-2 and BERT are built with
dropout 0 unless a config sets `dropout` (step.py), and the planner is told so (`--dropout`,
`--activation`); with dropout the CPU keeps 4-byte masks where the planner counts CUDA's 1-byte ones.

  cc -O2 -shared -fPIC -o scripts/torch_step_peak/malloc_peak_shim.so \
      src/harness/torch/malloc_peak_shim.c -ldl
  PYTHON=<python with torch + transformers> OUT=calibration/data/torch-step-peaks-cpu.csv \
      python3 scripts/torch_step_peak/run.py
  FINETUNE=1 PYTHON=... OUT=calibration/data/torch-finetune-peaks-cpu.csv \
      python3 scripts/torch_step_peak/run.py      # peft LoRA and frozen layers (needs peft)
  OPT_IN_BWD=1 PYTHON=... OUT=calibration/data/torch-optimizer-in-backward-cpu.csv \
      python3 scripts/torch_step_peak/run.py      # torchtune's optimizer_in_bwd
  CHUNKED_CE=1 PYTHON=... OUT=calibration/data/torch-chunked-ce-cpu.csv \
      python3 scripts/torch_step_peak/run.py      # torchtune's chunked cross-entropy
  COMPILE=1 PYTHON=... OUT=calibration/data/torch-compile-cpu.csv \
      python3 scripts/torch_step_peak/run.py      # torch.compile of every block
  OFFLOAD_ACT=1 PYTHON=... OUT=calibration/data/torch-offload-activations-cpu.csv \
      python3 scripts/torch_step_peak/run.py      # torchtune's activation offloading
  DRAW=30 SEED=20261205 DRAW_SET=wide PYTHON=... OUT=calibration/data/torch-step-peaks-drawn-wide-cpu.csv \
      python3 scripts/torch_step_peak/run.py      # the third drawn check (13 more families)
  DRAW=12 SEED=20261216 DRAW_SET=new PYTHON=... OUT=calibration/data/torch-step-peaks-drawn-new-families-cpu.csv \
      python3 scripts/torch_step_peak/run.py      # OLMoE, Granite-MoE, Phi-3.5-MoE, EXAONE 4
"""
import csv, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
PY = os.environ.get("PYTHON", sys.executable)  # a python with torch and transformers
VC = os.environ.get("VRAMCAL", os.path.join(HERE, "..", "..", "target", "debug", "vramcal"))
CUBLAS = 33_554_432
# built by: cc -O2 -shared -fPIC -o $SHIM src/harness/torch/malloc_peak_shim.c -ldl
# (the same shim `vramcal measure --backend torch` builds and loads itself)
SHIM = os.environ.get("SHIM", os.path.join(HERE, "malloc_peak_shim.so"))

L1 = dict(model="llama", hidden=512, ffn=1376, layers=4, heads=8, kv=8, vocab=8000)
L1G = dict(L1, kv=2)
L2 = dict(model="llama", hidden=1024, ffn=2752, layers=4, heads=16, kv=16, vocab=32000)
G1 = dict(model="gpt2", hidden=512, layers=4, heads=8, vocab=8000, positions=1024)
BE = dict(model="bert", hidden=512, layers=4, heads=8, vocab=8000, positions=512, classes=2)
G2 = dict(model="gpt2", hidden=1024, layers=4, heads=16, vocab=32000, positions=1024)

def c(base, name, **kw):
    d = dict(base); d.update(kw); d["name"] = name; return d

CONFIGS = [
    c(L1, "llama-mha fp32 eager foreach b4s512", attn="eager", precision="fp32", impl="foreach", batch=4, seq=512),
    c(L1, "llama-mha fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512),
    c(L1, "llama-mha fp32 eager loop b4s512", attn="eager", precision="fp32", impl="loop", batch=4, seq=512),
    c(L1, "llama-mha fp32 sdpa loop b4s512", attn="sdpa", precision="fp32", impl="loop", batch=4, seq=512),
    c(L1, "llama-mha bf16 sdpa foreach b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512),
    c(L1, "llama-mha bf16 sdpa loop b4s512", attn="sdpa", precision="bf16", impl="loop", batch=4, seq=512),
    c(L1, "llama-mha fp32 eager foreach b2s1024", attn="eager", precision="fp32", impl="foreach", batch=2, seq=1024),
    c(L1, "llama-mha fp32 sdpa foreach b8s256", attn="sdpa", precision="fp32", impl="foreach", batch=8, seq=256),
    c(L1, "llama-mha fp32 sdpa foreach b1s1024", attn="sdpa", precision="fp32", impl="foreach", batch=1, seq=1024),
    c(L2, "llama-big fp32 sdpa foreach b2s512", attn="sdpa", precision="fp32", impl="foreach", batch=2, seq=512),
    c(L2, "llama-big fp32 sdpa foreach b1s128", attn="sdpa", precision="fp32", impl="foreach", batch=1, seq=128),
    c(L2, "llama-big fp32 sdpa loop b1s128", attn="sdpa", precision="fp32", impl="loop", batch=1, seq=128),
    c(L2, "llama-big fp32 eager foreach b1s128", attn="eager", precision="fp32", impl="foreach", batch=1, seq=128),
    c(L2, "llama-big bf16 sdpa foreach b1s128", attn="sdpa", precision="bf16", impl="foreach", batch=1, seq=128),
    c(L1G, "llama-gqa fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512),
    c(L1G, "llama-gqa fp32 eager foreach b2s1024", attn="eager", precision="fp32", impl="foreach", batch=2, seq=1024),
    c(L1G, "llama-gqa bf16 sdpa foreach b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512),
    c(G1, "gpt2 fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512),
    c(G1, "gpt2 fp32 sdpa loop b4s512", attn="sdpa", precision="fp32", impl="loop", batch=4, seq=512),
    c(G1, "gpt2 fp32 eager foreach b4s512", attn="eager", precision="fp32", impl="foreach", batch=4, seq=512),
    c(G1, "gpt2(gelu_pytorch_tanh) fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, act="gelu_pytorch_tanh"),
    c(G2, "gpt2-big fp32 sdpa foreach b1s128", attn="sdpa", precision="fp32", impl="foreach", batch=1, seq=128),
    c(G2, "gpt2-big fp32 sdpa loop b1s128", attn="sdpa", precision="fp32", impl="loop", batch=1, seq=128),
    c(BE, "bert-cls fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512),
    c(BE, "bert-cls fp32 eager foreach b4s512", attn="eager", precision="fp32", impl="foreach", batch=4, seq=512),
    c(G1, "gpt2(gelu_pytorch_tanh) fp32 eager foreach b4s512", attn="eager", precision="fp32", impl="foreach", batch=4, seq=512, act="gelu_pytorch_tanh"),
    c(G1, "gpt2(quick_gelu) fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, act="quick_gelu"),
    c(G1, "gpt2(relu) bf16 sdpa foreach b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, act="relu"),
    c(G1, "gpt2(gelu_fast) bf16 eager foreach b2s512", attn="eager", precision="bf16", impl="foreach", batch=2, seq=512, act="gelu_fast"),
    c(BE, "bert-cls DROPOUT0.1 fp32 eager foreach b4s512 (CPU masks 4B)", attn="eager", precision="fp32", impl="foreach", batch=4, seq=512, dropout=0.1),
    c(G1, "gpt2 DROPOUT0.1 fp32 eager foreach b4s512 (CPU masks 4B)", attn="eager", precision="fp32", impl="foreach", batch=4, seq=512, dropout=0.1),
]

# Parameter-efficient and partial fine-tuning (peft LoRA on the block linears; frozen layers):
# the planner's --finetune lora / --freeze-layers plans against the same kind of real steps.
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FINETUNE_CONFIGS = [
    c(L1, "lora-all r16 llama-mha fp32 sdpa b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, lora=dict(r=16, targets=ALL)),
    c(L1, "lora-all r16 llama-mha fp32 eager b2s1024", attn="eager", precision="fp32", impl="foreach", batch=2, seq=1024, lora=dict(r=16, targets=ALL)),
    c(L1, "lora-qv r8 llama-mha fp32 sdpa b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, lora=dict(r=8, targets=["q_proj", "v_proj"])),
    c(L1G, "lora-all r64 llama-gqa fp32 sdpa b8s256", attn="sdpa", precision="fp32", impl="foreach", batch=8, seq=256, lora=dict(r=64, targets=ALL)),
    c(L2, "lora-all r16 llama-big fp32 sdpa b2s512", attn="sdpa", precision="fp32", impl="foreach", batch=2, seq=512, lora=dict(r=16, targets=ALL)),
    c(L2, "lora-all r16 llama-big bf16 sdpa b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, lora=dict(r=16, targets=ALL)),
    c(L1, "lora-all r16 DROPOUT0.1 llama-mha fp32 sdpa b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, lora=dict(r=16, targets=ALL, dropout=0.1)),
    # peft's own default over a 16-bit base: fp32 adapters, each adapted linear casting its
    # input to fp32 (true bf16) or back to bf16 under autocast (bf16-mixed, HF Trainer bf16=True)
    c(L1, "lora-qv r16 fp32-adapters llama-mha bf16 sdpa b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, lora=dict(r=16, targets=["q_proj", "v_proj"]), adapter_dtype="fp32"),
    c(L1, "lora-all r16 fp32-adapters llama-mha bf16 sdpa b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, lora=dict(r=16, targets=ALL), adapter_dtype="fp32"),
    c(L1, "lora-qv r16 llama-mha bf16-mixed sdpa b4s512", attn="sdpa", precision="bf16-mixed", impl="foreach", batch=4, seq=512, lora=dict(r=16, targets=["q_proj", "v_proj"])),
    c(L1, "lora-all r16 llama-mha bf16-mixed sdpa b4s512", attn="sdpa", precision="bf16-mixed", impl="foreach", batch=4, seq=512, lora=dict(r=16, targets=ALL)),
    c(L2, "lora-all r16 fp32-adapters llama-big bf16 sdpa b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, lora=dict(r=16, targets=ALL), adapter_dtype="fp32"),
    c(L1, "freeze2 llama-mha fp32 sdpa b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, freeze_layers=2),
    c(L2, "freeze2 llama-big fp32 sdpa b2s512", attn="sdpa", precision="fp32", impl="foreach", batch=2, seq=512, freeze_layers=2),
]


# torchtune's optimizer_in_bwd (each parameter stepped by a hook as its gradient arrives):
# the planner's --optimizer-in-backward
OPT_IN_BWD_CONFIGS = [
    c(L1, "opt-in-bwd llama-mha fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, opt_in_bwd=True),
    c(L1, "opt-in-bwd llama-mha fp32 sdpa loop b4s512", attn="sdpa", precision="fp32", impl="loop", batch=4, seq=512, opt_in_bwd=True),
    c(L1, "opt-in-bwd llama-mha fp32 sdpa foreach b1s128", attn="sdpa", precision="fp32", impl="foreach", batch=1, seq=128, opt_in_bwd=True),
    c(L2, "opt-in-bwd llama-big bf16 sdpa foreach b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, opt_in_bwd=True),
    c(L2, "opt-in-bwd llama-big bf16 sdpa foreach b1s128", attn="sdpa", precision="bf16", impl="foreach", batch=1, seq=128, opt_in_bwd=True),
    c(L2, "opt-in-bwd llama-big fp32 eager loop b1s128", attn="eager", precision="fp32", impl="loop", batch=1, seq=128, opt_in_bwd=True),
    c(L1G, "opt-in-bwd llama-gqa bf16 sdpa foreach ckpt b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, ckpt="full", opt_in_bwd=True),
    c(G1, "opt-in-bwd gpt2 fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, opt_in_bwd=True),
    c(G2, "opt-in-bwd gpt2-big fp32 sdpa loop b1s128", attn="sdpa", precision="fp32", impl="loop", batch=1, seq=128, opt_in_bwd=True),
]


def draw_step(rng, families, precisions):
    """One drawn step's family and shape (None when the draw falls outside the CPU-sized
    range: the caller draws again). The calls on `rng` are in the first draw's order, so a seed
    draws the same steps it always did."""
    fam = rng.choice(families)
    head_dim = rng.choice([32, 64, 64, 128])
    heads = rng.choice([4, 6, 8, 12, 16])
    hidden = heads * head_dim
    if not 256 <= hidden <= 1536:
        return None
    cf = dict(model=fam, hidden=hidden, heads=heads, layers=rng.randint(2, 6),
              vocab=rng.choice([4000, 8000, 16000, 32000, 50257]),
              batch=rng.choice([1, 2, 4, 8]), seq=rng.choice([128, 256, 512, 1024]),
              precision=rng.choice(precisions),
              attn=rng.choice(["eager", "sdpa"]), impl=rng.choice(["foreach", "loop"]),
              ckpt=rng.choice(["none", "none", "full"]), hf=True)
    return None if cf["batch"] * cf["seq"] > 4096 else cf


# torchtune's chunked cross-entropy (CEWithChunkedOutputLoss, 8 chunks), eager and compiled:
# the planner's --cross-entropy
CE_CONFIGS = [
    c(L2, "ce-chunked llama-big bf16 sdpa b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, loss="chunked"),
    c(L2, "ce-chunked-compiled llama-big bf16 sdpa b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, loss="chunked-compiled"),
    c(L2, "ce-chunked llama-big bf16 sdpa ckpt b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, ckpt="full", loss="chunked"),
    c(L2, "ce-chunked-compiled llama-big bf16 sdpa ckpt b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, ckpt="full", loss="chunked-compiled"),
    c(L1, "ce-chunked llama-mha fp32 sdpa b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, loss="chunked"),
    c(L1, "ce-chunked-compiled llama-mha bf16-mixed sdpa b4s1024", attn="sdpa", precision="bf16-mixed", impl="foreach", batch=4, seq=1024, loss="chunked-compiled"),
    # the logits dominate: 4096 tokens x 32000
    c(L2, "ce-full llama-big bf16 sdpa b8s512", attn="sdpa", precision="bf16", impl="foreach", batch=8, seq=512),
    c(L2, "ce-chunked llama-big bf16 sdpa b8s512", attn="sdpa", precision="bf16", impl="foreach", batch=8, seq=512, loss="chunked"),
    c(L2, "ce-chunked-compiled llama-big bf16 sdpa b8s512", attn="sdpa", precision="bf16", impl="foreach", batch=8, seq=512, loss="chunked-compiled"),
    c(L2, "ce-chunked-compiled llama-big bf16 sdpa ckpt b8s512", attn="sdpa", precision="bf16", impl="foreach", batch=8, seq=512, ckpt="full", loss="chunked-compiled"),
]


# torch.compile of every decoder layer (torchtune's compile: True): the planner's --compile blocks,
# alone and with torchtune's other levers (chunked compiled loss, checkpointing, optimizer in
# backward) and peft LoRA
COMPILE_CONFIGS = [
    c(L1, "compile llama-mha fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, compile="blocks"),
    c(L1, "compile llama-mha bf16 sdpa foreach b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, compile="blocks"),
    c(L1G, "compile llama-gqa bf16-mixed sdpa foreach b4s512", attn="sdpa", precision="bf16-mixed", impl="foreach", batch=4, seq=512, compile="blocks"),
    c(L1G, "compile llama-gqa fp32 sdpa loop b2s1024", attn="sdpa", precision="fp32", impl="loop", batch=2, seq=1024, compile="blocks"),
    c(L1, "compile llama-mha bf16 sdpa foreach b1s128", attn="sdpa", precision="bf16", impl="foreach", batch=1, seq=128, compile="blocks"),
    c(L2, "compile llama-big bf16 sdpa foreach b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, compile="blocks"),
    c(L2, "compile llama-big bf16 sdpa foreach ckpt b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, ckpt="full", compile="blocks"),
    c(L2, "compile ce-chunked-compiled llama-big bf16 sdpa b8s512", attn="sdpa", precision="bf16", impl="foreach", batch=8, seq=512, loss="chunked-compiled", compile="blocks"),
    c(L2, "compile ce-chunked-compiled opt-in-bwd llama-big bf16 sdpa ckpt b8s512", attn="sdpa", precision="bf16", impl="foreach", batch=8, seq=512, ckpt="full", loss="chunked-compiled", opt_in_bwd=True, compile="blocks"),
    c(L2, "compile lora-all r16 llama-big bf16 sdpa b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, lora=dict(r=16, targets=ALL), compile="blocks"),
]


# torchtune's activation offloading (step.py's HostOffload: saved tensors to file-backed host
# memory, outside the counted heap): the planner's --offload-activations, with and without
# checkpointing, with torchtune's other levers and peft LoRA; 8 layers, so that the one block
# the plan keeps on the device is an eighth of the blocks' bytes
L1x8, L1Gx8, L2x8, G1x8 = (dict(b, layers=8) for b in (L1, L1G, L2, G1))
OFFLOAD_ACT_CONFIGS = [
    c(L1x8, "offload-act llama-mha fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, offload_act=True),
    c(L1x8, "offload-act llama-mha bf16 sdpa foreach b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, offload_act=True),
    c(L1Gx8, "offload-act llama-gqa bf16-mixed sdpa foreach b4s512", attn="sdpa", precision="bf16-mixed", impl="foreach", batch=4, seq=512, offload_act=True),
    c(L1x8, "offload-act llama-mha fp32 eager foreach b2s512", attn="eager", precision="fp32", impl="foreach", batch=2, seq=512, offload_act=True),
    # where one block's scores (eager) or the head's logits set the peak, not the optimizer step
    c(L1x8, "offload-act llama-mha fp32 eager foreach b4s1024", attn="eager", precision="fp32", impl="foreach", batch=4, seq=1024, offload_act=True),
    c(L1x8, "offload-act llama-mha fp32 sdpa foreach b8s1024", attn="sdpa", precision="fp32", impl="foreach", batch=8, seq=1024, offload_act=True),
    c(L2x8, "offload-act llama-big bf16 sdpa foreach ckpt b4s512", attn="sdpa", precision="bf16", impl="foreach", batch=4, seq=512, ckpt="full", offload_act=True),
    c(L1Gx8, "offload-act llama-gqa fp32 sdpa loop ckpt b2s1024", attn="sdpa", precision="fp32", impl="loop", batch=2, seq=1024, ckpt="full", offload_act=True),
    c(G1x8, "offload-act gpt2 fp32 sdpa foreach b4s512", attn="sdpa", precision="fp32", impl="foreach", batch=4, seq=512, offload_act=True),
    c(L2x8, "offload-act lora-all r16 llama-big bf16 sdpa b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, lora=dict(r=16, targets=ALL), offload_act=True),
    c(L2x8, "offload-act compile llama-big bf16 sdpa foreach b2s512", attn="sdpa", precision="bf16", impl="foreach", batch=2, seq=512, compile="blocks", offload_act=True),
    c(L2x8, "offload-act opt-in-bwd llama-big bf16 sdpa ckpt b8s512", attn="sdpa", precision="bf16", impl="foreach", batch=8, seq=512, ckpt="full", opt_in_bwd=True, offload_act=True),
]


def random_configs(n, seed):
    """`n` training steps drawn from `seed` over the shapes people train on a CPU-sized scale:
    Llama/Mistral/Qwen2 (MHA or GQA, tied or not), GPT-2 and BERT; fp32 or true bf16; eager or
    sdpa; foreach or for-loop AdamW; full (non-reentrant) checkpointing or none. Drawn, not
    chosen, so the planner meets shapes nobody tuned it on. Dropout is 0 (CPU dropout keeps
    4-byte masks where the planner counts CUDA's 1-byte ones); each is planned from the
    config.json transformers writes for it (`--hf-config`), as a user would."""
    import random
    rng = random.Random(seed)
    # FAMILIES=a,b,...: draw from these instead (the first draw's five by default, so a seed
    # draws the same steps it always did)
    families = os.environ.get("FAMILIES", "llama,mistral,qwen2,gpt2,bert").split(",")
    out = []
    while len(out) < n:
        cf = draw_step(rng, families, ["fp32", "fp32", "bf16"])
        if cf is None:
            continue
        fam, hidden, heads = cf["model"], cf["hidden"], cf["heads"]
        if fam in ("llama", "mistral", "qwen2", "glm", "cohere", "stablelm"):
            cf["kv"] = rng.choice([d for d in (1, 2, 4, heads) if heads % d == 0])
            cf["ffn"] = 64 * round(hidden * rng.choice([2.0, 8 / 3, 3.5, 4.0]) / 64)
            cf["tied"] = rng.random() < 0.3
        else:
            cf["positions"] = 1024 if fam == "gpt2" else 512
            cf["seq"] = min(cf["seq"], cf["positions"])
            if fam == "bert":
                cf["classes"] = rng.choice([2, 3, 10])
        cf["name"] = (f"{fam} h{hidden} a{heads}" + (f"/{cf['kv']}" if "kv" in cf else "")
                      + f" L{cf['layers']} V{cf['vocab']}" + (" tied" if cf.get("tied") else "")
                      + f" {cf['precision']} {cf['attn']} {cf['impl']} ckpt={cf['ckpt']}"
                      + f" b{cf['batch']}s{cf['seq']}")
        out.append(cf)
    return out


# the third draw's families (DRAW_SET=wide), each built by transformers' own config class
# (AutoConfig.for_model) from these keys; `kv` families take grouped-query heads, `lora`
# families have the Llama linear names peft targets
WIDE = {
    "llama": dict(kv=True, lora=True), "qwen3": dict(kv=True, lora=True, head_dim=True),
    "gemma": dict(kv=True, lora=True, head_dim=True), "gemma2": dict(kv=True, lora=True, head_dim=True),
    "olmo2": dict(kv=True, lora=True), "granite": dict(kv=True, lora=True),
    "phi3": dict(kv=True), "starcoder2": dict(kv=True), "mixtral": dict(kv=True, lora=True),
    "gpt_neox": dict(), "opt": dict(), "phi": dict(), "falcon": dict(kv=True),
}


# the fourth draw's families (DRAW_SET=new): those `--hf-config` accepted next (OLMoE,
# Granite-MoE, Phi-3.5-MoE, EXAONE 4), drawn apart so the earlier seeds draw what they did
NEW = {
    "olmoe": dict(kv=True), "granitemoe": dict(kv=True), "phimoe": dict(kv=True),
    "exaone4": dict(kv=True, lora=True, head_dim=True),
}


def wide_config_kw(fam, cf):
    """transformers config keys for a `WIDE` family drawn as `cf` (dropout 0 everywhere)."""
    h, a, L, V = cf["hidden"], cf["heads"], cf["layers"], cf["vocab"]
    kw = dict(hidden_size=h, num_attention_heads=a, num_hidden_layers=L, vocab_size=V,
              max_position_embeddings=2048, tie_word_embeddings=cf["tied"])
    fams = NEW if fam in NEW else WIDE
    if fams[fam].get("kv"):
        kw["num_key_value_heads"] = cf["kv"]
    if fam not in ("opt",):
        kw["intermediate_size"] = cf["ffn"]
    if fams[fam].get("head_dim"):
        kw["head_dim"] = h // a
    if fam == "gemma2":
        kw["query_pre_attn_scalar"] = h // a
    if fam == "mixtral":
        kw.update(num_local_experts=cf["experts"], num_experts_per_tok=2)
    if fam == "olmoe":
        kw.update(num_experts=cf["experts"], num_experts_per_tok=2)
    if fam == "granitemoe":
        # Granite's scalar multipliers at granite-3.1's values
        kw.update(num_local_experts=cf["experts"], num_experts_per_tok=2, embedding_multiplier=12.0,
                  residual_multiplier=0.22, attention_multiplier=1.0 / (h // a), logits_scaling=6.0)
    if fam == "phimoe":
        # Phi-3.5-MoE's biases; its sparsemixer routes two experts; the input jitter (0.01 in
        # the published file, 0.0 by the class default) drawn on or off
        kw.update(num_local_experts=cf["experts"], num_experts_per_tok=2, attention_bias=True,
                  lm_head_bias=True, input_jitter_noise=cf["jitter"])
    if fam == "phi3":
        kw.update(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if fam == "gpt_neox":
        kw.update(rotary_pct=0.25, use_parallel_residual=cf["parallel"])
    if fam == "opt":
        kw.update(ffn_dim=cf["ffn"], word_embed_proj_dim=h, dropout=0.0, attention_dropout=0.0,
                  pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    if fam == "phi":
        kw.update(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    if fam == "falcon":
        kw.pop("num_key_value_heads"); kw.pop("intermediate_size")
        kw.update(new_decoder_architecture=True, num_kv_heads=cf["kv"], ffn_hidden_size=cf["ffn"],
                  hidden_dropout=0.0, attention_dropout=0.0, bias=False, parallel_attn=True)
    if fam == "starcoder2":
        kw.update(residual_dropout=0.0, embedding_dropout=0.0)
    return kw


def random_wide_configs(n, seed, families=WIDE):
    """The third draw (DRAW_SET=wide): 13 decoder families beyond the first two draws' (Gemma 1/2,
    Qwen3, OLMo2, Granite, Phi-3, StarCoder2, Mixtral MoE, GPT-NeoX, OPT, Phi, Falcon, Llama),
    in fp32, true bf16 or bf16 autocast (HF Trainer's bf16=True), a quarter of the Llama-named
    ones peft LoRA (peft's fp32 adapters); otherwise as `random_configs`. The fourth
    (DRAW_SET=new) draws the same way over `NEW`'s families."""
    import random
    rng = random.Random(seed)
    WIDE = families  # noqa: N806  (the family table drawn from)
    fams = sorted(WIDE)
    out = []
    while len(out) < n:
        cf = draw_step(rng, fams, ["fp32", "bf16", "bf16-mixed"])
        if cf is None:
            continue
        cf["auto"] = True
        fam, hidden, heads = cf["model"], cf["hidden"], cf["heads"]
        cf["kv"] = rng.choice([d for d in (1, 2, 4, heads) if heads % d == 0]) if WIDE[fam].get("kv") else heads
        cf["ffn"] = 64 * round(hidden * rng.choice([2.0, 8 / 3, 3.5, 4.0]) / 64)
        cf["tied"] = rng.random() < 0.3
        cf["parallel"] = rng.random() < 0.5
        cf["experts"] = rng.choice([4, 8])
        lora = WIDE[fam].get("lora") and rng.random() < 0.25
        if families is NEW:
            cf["jitter"] = rng.choice([0.0, 0.01])
        if lora:
            cf["lora"] = dict(r=rng.choice([8, 16, 64]),
                              targets=rng.choice([["q_proj", "v_proj"], ALL]))
            cf["adapter_dtype"] = "fp32"
        cf["config_kw"] = wide_config_kw(fam, cf)
        cf["name"] = (f"{fam} h{hidden} a{heads}/{cf['kv']} L{cf['layers']} V{cf['vocab']}"
                      + (" tied" if cf["tied"] else "")
                      + (f" E{cf['experts']}" if fam in ("mixtral", "olmoe", "granitemoe", "phimoe") else "")
                      + (f" jitter{cf['jitter']}" if fam == "phimoe" else "")
                      + (" parallel" if fam == "gpt_neox" and cf["parallel"] else "")
                      + (f" lora-r{cf['lora']['r']}-{'qv' if len(cf['lora']['targets']) == 2 else 'all'}" if lora else "")
                      + f" {cf['precision']} {cf['attn']} {cf['impl']} ckpt={cf['ckpt']}"
                      + f" b{cf['batch']}s{cf['seq']}")
        out.append(cf)
    return out


def planner_from_hf(cf, hf_config):
    """The plan for a step whose model is given by its config.json (written to a temporary file
    that the recorded command names `{config}`)."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(hf_config, f)
    a = ["estimate", "--hf-config", "{config}", "--batch", str(cf["batch"]), "--seq", str(cf["seq"]),
         "--precision", cf["precision"], "--attention", cf["attn"], "--optimizer-impl", cf["impl"],
         "--checkpointing", cf.get("ckpt", "none"), "--json", "--no-gpu-choice"]
    if "lora" in cf:
        lc = cf["lora"]
        a += ["--finetune", "lora", "--lora-rank", str(lc["r"]),
              "--lora-targets", ",".join(lc["targets"]),
              "--adapter-dtype", cf.get("adapter_dtype", "base")]
    try:
        run = [VC] + [f.name if x == "{config}" else x for x in a]
        j = json.loads(subprocess.run(run, check=True, capture_output=True, text=True).stdout)
    finally:
        os.unlink(f.name)
    return j, " ".join(a)


def planner(cf, hf_config=None):
    if hf_config is not None:
        return planner_from_hf(cf, hf_config)
    a = [VC, "estimate", "--layers", str(cf["layers"]), "--hidden", str(cf["hidden"]),
         "--heads", str(cf["heads"]), "--vocab", str(cf["vocab"]),
         "--batch", str(cf["batch"]), "--seq", str(cf["seq"]),
         "--precision", cf["precision"], "--attention", cf["attn"],
         "--optimizer-impl", cf["impl"], "--json", "--no-gpu-choice"]
    if cf["model"] == "llama":
        a += ["--kv-heads", str(cf["kv"]), "--ffn", str(cf["ffn"]), "--ffn-kind", "swiglu",
              "--norm", "rmsnorm", "--no-bias", "--untied", "--max-positions", "0"]
    elif cf["model"] == "bert":
        a += ["--ffn-kind", "gelu", "--norm", "layernorm", "--arch", "encoder",
              "--classes", str(cf["classes"]), "--max-positions", str(cf["positions"])]
    else:
        a += ["--ffn-kind", "gelu", "--norm", "layernorm", "--max-positions", str(cf["positions"])]
    if cf["model"] in ("gpt2", "bert"):
        # step.py builds these with dropout 0 unless the config says otherwise, and with the
        # config's activation: tell the planner (its defaults are transformers', 0.1)
        a += ["--dropout", str(cf.get("dropout", 0.0)),
              "--activation", cf.get("act", "gelu_new" if cf["model"] == "gpt2" else "gelu")]
    if "lora" in cf:
        lc = cf["lora"]
        a += ["--finetune", "lora", "--lora-rank", str(lc["r"]),
              "--lora-targets", ",".join(lc["targets"]),
              "--lora-dropout", str(lc.get("dropout", 0.0)),
              # step.py converts the adapters with the model unless they are peft's fp32 ones
              "--adapter-dtype", "fp32" if cf.get("adapter_dtype") == "fp32"
              or cf["precision"] == "bf16-mixed" else "base"]
    if "freeze_layers" in cf:
        a += ["--freeze-layers", str(cf["freeze_layers"])]
    if cf.get("ckpt", "none") != "none":
        a += ["--checkpointing", cf["ckpt"]]
    if cf.get("opt_in_bwd"):
        a += ["--optimizer-in-backward"]
    if cf.get("loss", "full") != "full":
        a += ["--cross-entropy", cf["loss"]]
    if cf.get("compile", "none") != "none":
        a += ["--compile", cf["compile"]]
    if cf.get("offload_act"):
        a += ["--offload-activations"]
    j = json.loads(subprocess.run(a, check=True, capture_output=True, text=True).stdout)
    return j, " ".join(a[1:])


def measure(cf):
    env = dict(os.environ, LD_PRELOAD=SHIM, OMP_NUM_THREADS="2", MKL_DISABLE_FAST_MM="1")
    p = subprocess.run([PY, os.path.join(HERE, "step.py"), json.dumps(cf)], env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(p.stderr[-3000:])


def row(cf, m):
    j, cmd = planner(cf, m.get("hf_config") if cf.get("hf") else None)
    mem = j["memory"]
    planned_states = mem["weights"] + mem["optimizer"]
    planned_total = mem["total"] - CUBLAS
    # planner's backward peak: weights+opt+grads+act-min(act,grads) ("backward holds about
    # max(activations, gradients)"); when the optimizer step dominates, the planner moves the
    # overlap into overhead, so recompute it here instead of reading total-overhead
    planned_bwd = mem["weights"] + mem["optimizer"] + max(mem["activations"], mem["gradients"])
    planned_opt_excess = mem["overhead"] - CUBLAS
    meas_peak = m["peak_step_abs"] - m["pre_model_bytes"]
    meas_fb = m["peak_fwd_bwd_abs"] - m["pre_model_bytes"]
    # the planner's optimizer-step peak shows only through total exceeding its backward peak
    plan_phase = "optimizer" if planned_total > planned_bwd + 2**20 else "backward"
    return dict(name=cf["name"], params_torch=m["params"], params_planner=j["params"],
                trainable_torch=m.get("trainable_params", m["params"]),
                trainable_planner=j["train"].get("trainable_params", j["params"]),
                params_diff=j["params"] - m["params"],
                meas_states=m["states_bytes"], plan_states=planned_states,
                **({"meas_tensor_states": m["tensor_states_bytes"]} if "tensor_states_bytes" in m else {}),
                states_err_pct=100 * (planned_states - m["states_bytes"]) / m["states_bytes"],
                meas_peak_fwd_bwd=meas_fb, plan_peak_bwd=planned_bwd,
                fwd_bwd_err_pct=100 * (planned_bwd - meas_fb) / meas_fb,
                meas_peak_step=meas_peak, plan_total_minus_cublas=planned_total,
                step_err_pct=100 * (planned_total - meas_peak) / meas_peak,
                meas_phase=m["peak_phase"], plan_phase=plan_phase,
                meas_saved_act=m["live_after_fwd"], plan_act=mem["activations"],
                meas_fwd_peak_above_base=m["peak_fwd_bytes"],
                meas_bwd_peak_above_base=m["peak_bwd_bytes"],
                meas_grads=m["live_after_bwd"], plan_grads=mem["gradients"],
                meas_opt_peak_above_base=m["peak_opt_bytes"],
                plan_overlap=mem["backward_overlap"], plan_opt_excess=planned_opt_excess,
                meas_opt_transient=m["peak_opt_bytes"] - m["live_after_bwd"],
                pre_model=m["pre_model_bytes"], baseline_abs=m["baseline_bytes"],
                warm_s=m["warm_s"], planner_cmd=cmd,
                **({"hf_config": json.dumps(m["hf_config"], sort_keys=True)} if cf.get("hf") else {}))


def measured_of(r):
    """The measurements of a row already in the CSV (what step.py reported), to re-plan it."""
    i = lambda k: int(float(r[k]))
    pre = i("pre_model")
    return dict(params=i("params_torch"), trainable_params=i(r.get("trainable_torch") and "trainable_torch" or "params_torch"),
                states_bytes=i("meas_states"),
                **({"tensor_states_bytes": i("meas_tensor_states")} if r.get("meas_tensor_states") else {}),
                peak_step_abs=i("meas_peak_step") + pre, peak_fwd_bwd_abs=i("meas_peak_fwd_bwd") + pre,
                pre_model_bytes=pre, peak_phase=r["meas_phase"], live_after_fwd=i("meas_saved_act"),
                peak_fwd_bytes=i("meas_fwd_peak_above_base"), peak_bwd_bytes=i("meas_bwd_peak_above_base"),
                live_after_bwd=i("meas_grads"), peak_opt_bytes=i("meas_opt_peak_above_base"),
                baseline_bytes=i("baseline_abs"), warm_s=float(r["warm_s"]),
                **({"hf_config": json.loads(r["hf_config"])} if r.get("hf_config") else {}))


def main():
    """run.py [NAME-PART...]: measure the configs whose names contain a part (all without one).
    REPLAN=1: measure only configs not yet in $OUT, re-plan the rows already there from their
    recorded measurements (after a planner change), and rewrite $OUT in CONFIGS order."""
    only = sys.argv[1:]
    replan = os.environ.get("REPLAN") == "1"
    configs = FINETUNE_CONFIGS if os.environ.get("FINETUNE") == "1" else CONFIGS
    if os.environ.get("OPT_IN_BWD") == "1":
        configs = OPT_IN_BWD_CONFIGS
    if os.environ.get("CHUNKED_CE") == "1":
        configs = CE_CONFIGS
    if os.environ.get("COMPILE") == "1":
        configs = COMPILE_CONFIGS
    if os.environ.get("OFFLOAD_ACT") == "1":
        configs = OFFLOAD_ACT_CONFIGS
    if os.environ.get("DRAW"):
        draw = {"wide": random_wide_configs,
                "new": lambda n, seed: random_wide_configs(n, seed, NEW)}.get(
                    os.environ.get("DRAW_SET"), random_configs)
        configs = draw(int(os.environ["DRAW"]), int(os.environ.get("SEED", "1")))
    out = os.environ.get("OUT", "torch-step-peaks-cpu.csv") if not only else os.environ.get("OUT", "torch-step-peaks-cpu.partial.csv")
    old = {}
    if replan and os.path.exists(out):
        old = {r["name"]: r for r in csv.DictReader(open(out))}
    rows = []
    for cf in configs:
        if only and not any(o in cf["name"] for o in only):
            continue
        m = measured_of(old[cf["name"]]) if cf["name"] in old else measure(cf)
        r = row(cf, m)
        rows.append(r)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "planner_cmd"}), flush=True)
        write_rows(out, rows, old)
    print("wrote", out)


def write_rows(out, rows, old):
    """$OUT rewritten atomically after each step, so a stopped run loses nothing measured: the
    rows so far, then those already there that this run has not reached."""
    done = {r["name"] for r in rows}
    rest = [r for name, r in old.items() if name not in done]
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader(); w.writerows(rows)
        w.writerows({k: r.get(k, "") for k in rows[0]} for r in rest)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
