#!/usr/bin/env python3
"""Measure what real PyTorch + HuggingFace transformers training keeps saved for backward.

For small models built from transformers' own classes (GPT2LMHeadModel, BertModel, BertForMaskedLM,
LlamaForCausalLM with GQA, MistralForCausalLM, Qwen2ForCausalLM, ViTForImageClassification), each
attention implementation ("eager", "sdpa") and each precision

  fp32           fp32 weights, fp32 compute
  bf16-autocast  fp32 weights, forward + loss under torch.autocast(device, dtype=torch.bfloat16)
  bf16           model.to(torch.bfloat16) ("true" bf16)

the script runs ONE forward pass plus the model's own loss in train() mode (the architecture's default
dropout values and MLP activation unless --dropout P / --activation NAME set every dropout probability
of the config or its activation_function / hidden_act; both are recorded per row), use_cache=False, no attention_mask so that sdpa can use is_causal) inside
torch.autograd.graph.saved_tensors_hooks and records every tensor autograd packs. Once the forward is done
every output except the scalar loss is dropped (so e.g. BertModel's pooler graph, or the returned logits,
are not counted unless the loss needs them), and only the packed tensors still alive are kept. They are
then DEDUPLICATED BY STORAGE (untyped_storage().data_ptr(); each storage's nbytes() counted once, so a view
of a larger tensor counts the whole allocation, as the allocator does) and split into

  saved_bytes        activations: storages that are neither a parameter/buffer nor derived from one
  saved_param_bytes  storages that ARE a model parameter or buffer (they exist anyway)
  weight_copy_bytes  storages whose autograd history is only casts/views of a parameter (autocast's bf16
                     weight copies, transposes of weights), i.e. they scale with the parameter count
  param_bytes        all parameter storages of the model (for reference)

saved_bytes is also broken down by dtype (fp32 / bf16 / bool / int64 / other).

Each run sweeps one grid of (batch b, seq s, hidden h, ffn f, heads a, kv heads, layers L, vocab V) per
(arch, attention, precision) and writes one CSV row per configuration. `--fit CSV` reads such a CSV and
fits, by least squares per (arch, attention, precision),

  saved_bytes = L*(alpha*b*s*h + beta*b*s*f + gamma*b*a*s^2 + delta*b*a*s + nu*b*s [+ kappa*b*s*kv*d])
              + lambda*b*s*V + eps*b*s*h + [zeta*b*s + eta*b + sigma*s + rho*s*d + mu*b*h + c]

(d = h/a the head dim; nu*b*s is the per-row statistics of the norms, e.g. LayerNorm's mean and rstd;
kappa only for GQA models; rho only for RoPE models, whose cos/sin tables are
shared by all layers; for ViT the lambda term is lambda*b*V since the classifier sees the CLS token only,
and its s is the number of patches + 1), printing the coefficients (bytes per element) and the fit's
largest relative residual, plus the residual of the coefficients rounded to 0.5 byte (0 bytes means the
decomposition is exact). At b = 1 a few reshapes are views instead of copies (GPT-2's q/k/v become views
of the fused c_attn output; the shifted LM labels stay a view of the padded labels), so b = 1 rows sit a
little off the b >= 2 plane; `--fit-min-batch 2` leaves them out. `--dump` prints, for one configuration, every saved storage with the autograd
nodes that hold it (found by walking the graph from the loss), which is how the per-op notes are made.

On CPU, F.dropout saves a mask with the input's dtype (aten::_dropout_impl: input * noise); on CUDA it
goes through native_dropout, which saves a 1-byte bool mask, so dropout bytes here are an upper bound
for CUDA. On CPU, sdpa only uses its flash kernel (saves output + fp32 logsumexp) when dropout_p == 0
(check_for_dropout in sdp_utils_cpp); with attention dropout (GPT-2, BERT defaults) it falls back to the
math path, which keeps the s^2 tensors (in fp32, even for bf16 inputs); CUDA's flash / efficient kernels
do support dropout. CPU autocast's op lists also differ from CUDA's (e.g. softmax is not forced to fp32).

More families (--arch phi3|starcoder2|bloom|gpt_bigcode|gemma|olmo|mixtral|qwen2_moe|granite|smollm3|gpt_oss)
sweep FAMILY_GRID at their config classes' defaults (MoE: 4 or 8 small experts, top 2); --arch deberta-v2 (DeBERTa-v3's relative attention) sweeps deberta_grid(),
with position_buckets moved too (the rows add position_buckets); --arch deepseek-mla (DeepSeek-V2's
latent attention, every block dense) sweeps mla_grid() (the rows add mla: kv rank / q rank / nope /
rope / v widths).
The vision-language wrappers (--arch gemma3-vlm|llava|qwen2-vl|qwen2.5-vl|mistral3) sweep vlm_grid():
a Gemma 3, Llama, Qwen2 or Mistral language model with a SigLIP, CLIP, Qwen or Pixtral tower (Qwen:
one vision-start token before each image's merged tokens, a quarter of its patches; Mistral 3: a
quarter of its patches) (the rows add vision: tower layers / width / MLP /
heads / image side / images per sample / Gemma 3's pooled tokens per image); s counts the image
tokens. The encoder-decoders (--arch t5|t5-gated|bart) sweep their own grid (encoder and decoder depth,
input and target length moved apart; the rows add decoder_layers and target_len), and
`--fit-encdec CSV` fits them per stack (see ENCDEC_COLUMNS): the table plan::encdec_saved holds.

Examples:
  python3 scripts/torch_saved_bytes.py --out calibration/data/torch-saved-bytes-cpu.csv
  python3 scripts/torch_saved_bytes.py --arch t5 --arch t5-gated --arch bart --dropout 0 --dropout 0.1 \
      --out calibration/data/torch-saved-bytes-encdec-cpu.csv
  python3 scripts/torch_saved_bytes.py --arch t5 --arch t5-gated --arch bart --attention eager --dropout 0.1 \
      --real-shapes --append --out calibration/data/torch-saved-bytes-encdec-cpu.csv
  python3 scripts/torch_saved_bytes.py --fit-encdec calibration/data/torch-saved-bytes-encdec-cpu.csv
  python3 scripts/torch_saved_bytes.py --arch llama --attention sdpa --precision bf16 --out /tmp/l.csv
  python3 scripts/torch_saved_bytes.py --fit calibration/data/torch-saved-bytes-cpu.csv
  python3 scripts/torch_saved_bytes.py --dump --arch gpt2 --attention eager --precision fp32
  python3 scripts/torch_saved_bytes.py --arch gpt2 --dropout 0 --activation gelu_pytorch_tanh \
      --append --out calibration/data/torch-saved-bytes-cpu.csv

--fit groups rows by (arch, attention, precision, dropout probabilities, activation). With
transformers' default use_cache=True, GPT-2 under sdpa also saves the key/value cache's copies of k
and v (+8 bytes per b*s*h per layer in fp32); use_cache=False here leaves them out.

torch and transformers are imported lazily, so --help works without them.
"""

import argparse
import csv
import gc
import os
import sys
import time
import weakref

ARCHS = ("gpt2", "bert", "bert-mlm", "llama", "mistral", "qwen2", "vit")
# Llama-like families whose blocks depart from Llama's (the planner plans them as Llama's block
# plus the departures' bytes): Qwen3 (per-head q/k RMSNorm, head_dim not h/a), Gemma2 (4 norms
# per block, attention and final logit soft-capping; eager only), Gemma3 (4 norms, per-head q/k
# norm), OLMo2 (post-norms, full-width q/k norm); "llama-hd" is Llama with head_dim varied. Not
# in the default --arch list; measured over DEPARTURE_GRID, which varies head_dim on its own.
DEPARTURE_ARCHS = ("llama-hd", "qwen3", "gemma2", "gemma3", "olmo2")
# LayerNorm decoders with a two-matrix MLP that the planner plans with GPT-2's block, and BERT
# encoders with other heads or embeddings planned with BERT's (plan::departures), at their config
# classes' defaults (parallel attention and MLP, partial rotary, Falcon's single key/value head,
# OPT's dropout 0.1; DistilBERT's masked-LM head, ELECTRA's discriminator with half-width
# embeddings): measured over FAMILY_GRID
FAMILY_ARCHS = ("gpt_neox", "phi", "gptj", "falcon", "opt", "distilbert", "electra")
# more families the planner parses, at their config classes' defaults (DeBERTa-v2 with
# DeBERTa-v3's relative attention): how far their plans are from PyTorch's own bytes
COVERAGE_ARCHS = ("phi3", "starcoder2", "bloom", "gpt_bigcode", "deberta-v2", "gemma", "olmo", "mixtral",
                  "qwen2_moe", "granite", "smollm3", "gpt_oss", "olmo3", "seed_oss", "hunyuan_v1_dense",
                  "ernie4_5", "glm4_moe", "glm", "glm4", "cohere", "cohere2", "stablelm")
# DeepSeek-V2's multi-head latent attention with every block dense (first_k_dense_replace = L),
# measured over mla_grid(): the latent ranks and head widths moved apart (REAL_SHAPES: with MoE)
MLA_ARCHS = ("deepseek-mla",)
# encoder-decoders: T5 (ReLU MLP), "t5-gated" (T5 v1.1 / FLAN-T5's gated-gelu MLP) and BART, with
# L encoder and Ld decoder layers and a decoder of t tokens (labels of length t), measured over
# encdec_grid(), which moves every dimension on its own; --dropout P sets every dropout probability
# of the config (T5 dropout_rate; BART dropout, attention_dropout, activation_dropout): what
# plan::encdec's per-stack bytes are fitted and checked against
ENCDEC_ARCHS = ("t5", "t5-gated", "bart")
# vision-language wrappers: Gemma3ForConditionalGeneration (SigLIP tower),
# LlavaForConditionalGeneration (CLIP tower, Llama text), Qwen2VLForConditionalGeneration and
# Qwen2_5_VLForConditionalGeneration (Qwen's native-resolution towers), Mistral3ForConditional-
# Generation (Pixtral tower, patch merger); the rows add `vision`
VLM_ARCHS = ("gemma3-vlm", "llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "mistral3")
ATTENTIONS = ("eager", "sdpa")
PRECISIONS = ("fp32", "bf16-autocast", "bf16")
GQA_ARCHS = ("llama", "mistral", "qwen2") + DEPARTURE_ARCHS
VIT_PATCH = 4

COLUMNS = [
    "arch", "attention", "precision", "b", "s", "h", "f", "a", "kv_heads", "head_dim", "L", "V",
    "image_size", "embd_dropout", "hidden_dropout", "attn_dropout",
    "saved_bytes", "saved_fp32_bytes", "saved_bf16_bytes", "saved_bool_bytes", "saved_int64_bytes",
    "saved_other_bytes", "saved_storages", "saved_param_bytes", "weight_copy_bytes", "param_bytes",
    "attn_impl_used", "device", "torch_version", "transformers_version", "seconds", "activation",
    "decoder_layers", "target_len", "position_buckets", "mla", "vision",
]

# transformers' default MLP activation per architecture (config.activation_function / hidden_act)
DEFAULT_ACTIVATION = {"gpt2": "gelu_new", "bert": "gelu", "bert-mlm": "gelu", "llama": "silu",
                      "mistral": "silu", "qwen2": "silu", "vit": "gelu"}
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "quick_gelu", "relu", "silu")

# The sweep: a base point and one-at-a-time variations, plus a few combined moves so that every
# fitted column varies independently. (b, s, h, f, a, kv, L, V)
BASE = dict(b=2, s=64, h=128, f=320, a=4, kv=2, L=2, V=384)
VARIATIONS = [
    {}, {"L": 1}, {"L": 3}, {"b": 1}, {"b": 3}, {"s": 32}, {"s": 96},
    {"h": 64}, {"h": 192}, {"f": 192}, {"f": 512}, {"a": 2, "kv": 1}, {"a": 8, "kv": 4},
    {"V": 256}, {"V": 768}, {"kv": 4}, {"kv": 1},
    {"b": 3, "s": 96, "L": 3},
    {"h": 256, "a": 8, "kv": 2, "s": 48, "L": 1},
    {"b": 1, "s": 128, "a": 2, "kv": 2, "V": 1024, "f": 256},
    {"h": 64, "a": 2, "kv": 1, "L": 4, "b": 4, "s": 32},
]


# head_dim (hd) moves apart from h / a; the base point has hd = h / a
DEPARTURE_GRID = [
    {**BASE, "hd": 32, **v} for v in (
        {}, {"hd": 64}, {"hd": 16}, {"L": 1}, {"b": 3}, {"s": 96}, {"h": 192}, {"f": 512},
        {"a": 8, "kv": 4}, {"V": 768}, {"kv": 4}, {"hd": 48, "a": 2, "kv": 1, "s": 48, "L": 3})
]


FAMILY_GRID = [
    {**BASE, **v} for v in (
        {}, {"L": 1}, {"b": 3}, {"s": 96}, {"h": 192, "a": 6}, {"f": 512}, {"V": 768})
]


# Real checkpoints' widths, held out of the fits (the grids' vocabularies stay <= 1024; these
# are appended after them): t5-small, FLAN-T5-small's gated MLP (q = 6 x 64 < h), bart-base,
# DeBERTa-v3-small; measured with --real-shapes (eager, dropout 0.1, the three precisions).
REAL_SHAPES = {
    "deberta-v2": dict(b=2, s=128, h=768, f=3072, a=12, kv=12, L=6, V=128100, pb=256),
    # DeepSeek-V2-Lite's layout at a quarter of its widths: a dense first block, then MoE blocks
    # of 16 routed experts (top 4) and 2 shared, no query bottleneck
    "deepseek-mla": dict(b=2, s=128, h=512, f=2048, a=8, kv=8, L=3, V=4096, kvr=128, qr=0, nope=64,
                         rope=32, vd=64, fm=256, E=16, k=4, shared=2, dense=1),
    "t5": dict(b=2, s=128, t=64, h=512, f=2048, a=8, kv=8, hd=64, L=6, Ld=6, V=32128),
    "t5-gated": dict(b=2, s=128, t=64, h=512, f=1024, a=6, kv=6, hd=64, L=8, Ld=8, V=32128),
    "bart": dict(b=2, s=128, t=64, h=768, f=3072, a=12, kv=12, L=6, Ld=6, V=50265),
}


def deberta_grid(n=36, seed=12):
    """DeBERTa-v3's relative attention: FAMILY_GRID's moves plus position_buckets (pb) and
    seeded random points, so that a per-layer fit with the relative span is overdetermined."""
    import random
    rnd = random.Random(seed)
    out = [{**c, "pb": 256} for c in FAMILY_GRID] + [{**BASE, "pb": pb} for pb in (16, 64)]
    while len(out) < n:
        a = rnd.choice((2, 4, 8))
        out.append(dict(b=rnd.randint(1, 4), s=rnd.choice(range(16, 129, 8)), h=a * rnd.choice((16, 24, 32)),
                        f=rnd.choice(range(128, 513, 64)), a=a, kv=a, L=rnd.randint(1, 3),
                        V=rnd.choice(range(256, 1025, 128)), pb=rnd.choice((16, 32, 64, 128, 256))))
    return out


def mla_grid(n=48, seed=13):
    """Latent attention's widths (kv rank kvr, q rank qr (0: no q bottleneck), nope / rope / v
    head widths) moved apart with the usual dimensions, seeded."""
    import random
    rnd = random.Random(seed)
    base = dict(b=2, s=64, h=128, f=320, a=4, kv=4, L=2, V=384, kvr=64, qr=0, nope=32, rope=16, vd=32)
    out = [dict(base)] + [{**base, **v} for v in (
        {"kvr": 32}, {"qr": 48}, {"nope": 16}, {"rope": 8}, {"vd": 16}, {"L": 1}, {"b": 3}, {"s": 96})]
    while len(out) < n:
        a = rnd.choice((2, 4, 8))
        out.append(dict(b=rnd.randint(1, 4), s=rnd.choice(range(16, 129, 8)), h=a * rnd.choice((16, 24, 32)),
                        f=rnd.choice(range(128, 513, 64)), a=a, kv=a, L=rnd.randint(1, 3),
                        V=rnd.choice(range(256, 1025, 128)), kvr=rnd.choice((16, 32, 48, 64, 96)),
                        qr=rnd.choice((0, 0, 32, 64)), nope=rnd.choice((8, 16, 32)), rope=rnd.choice((8, 16)),
                        vd=rnd.choice((8, 16, 32))))
    return out


def encdec_grid(arch, n=40, seed=11):
    """The base point with t = s and Ld = L, one-at-a-time moves of L, Ld, b, s, t, h, f, a, V (and
    for T5 its head width d_kv apart from h / a), and seeded random points, so that a per-stack
    linear fit is overdetermined."""
    import random
    rnd = random.Random(seed)
    t5 = arch.startswith("t5")
    base = {**BASE, "t": BASE["s"], "Ld": BASE["L"]}
    out = [dict(base)] + [{**base, **v} for v in (
        {"L": 1}, {"Ld": 1}, {"L": 3}, {"Ld": 3}, {"b": 3}, {"s": 96}, {"t": 32}, {"t": 96},
        {"h": 192, "a": 6}, {"f": 512}, {"a": 8}, {"V": 768}) + (({"hd": 16}, {"hd": 64}) if t5 else ())]
    while len(out) < n:
        a = rnd.choice((2, 4, 8))
        hd = rnd.choice((16, 24, 32))
        c = dict(b=rnd.randint(1, 4), s=rnd.choice(range(16, 113, 8)), t=rnd.choice(range(16, 113, 8)),
                 h=a * rnd.choice((16, 24, 32)), f=rnd.choice(range(128, 513, 64)), a=a, kv=a,
                 L=rnd.randint(1, 3), Ld=rnd.randint(1, 3), V=rnd.choice(range(256, 1025, 128)))
        if t5:
            c["hd"] = hd
        out.append(c)
    return out


def vlm_grid(n=16, seed=14):
    """A language model (BASE's dimensions) with a vision tower: its layers vL, width vh, MLP vf,
    heads va, image side img in patches of VIT_PATCH, and images per sample im, moved apart with
    the language model's, seeded. Gemma 3's projector pools each image to m tokens (a square
    dividing the patch grid); LLaVA inserts every patch."""
    import random
    rnd = random.Random(seed)
    base = {**BASE, "s": 96, "vL": 2, "vh": 64, "vf": 256, "va": 4, "img": 32, "im": 1, "m": 16}
    out = [dict(base)] + [{**base, **v} for v in (
        {"vL": 1}, {"vL": 3}, {"vh": 96, "va": 6}, {"vf": 128}, {"img": 48, "s": 160, "m": 36},
        {"im": 2, "s": 128}, {"b": 3}, {"L": 1}, {"h": 192, "a": 6, "kv": 3})]
    while len(out) < n:
        va = rnd.choice((2, 4))
        img = rnd.choice((16, 32, 48))
        m = (img // VIT_PATCH // 2) ** 2
        im = rnd.choice((1, 1, 2))
        out.append({**base, "b": rnd.randint(1, 3), "vL": rnd.randint(1, 3), "vh": va * rnd.choice((16, 24, 32)),
                    "vf": rnd.choice(range(128, 385, 64)), "va": va, "img": img, "im": im, "m": m,
                    "s": im * (img // VIT_PATCH) ** 2 + rnd.choice(range(16, 65, 8)),
                    "L": rnd.randint(1, 3)})
    return out


def grid():
    out, seen = [], set()
    for v in VARIATIONS:
        c = dict(BASE)
        c.update(v)
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def vit_image_size(s):
    """Image side whose patch count + 1 (CLS) is closest to s."""
    import math
    n = max(1, round(math.sqrt(max(s - 1, 1))))
    return n * VIT_PATCH


def build(arch, attention, c, dropout=None, activation=None):
    """dropout: None = the architecture's default, else every dropout probability of the config
    (GPT-2 embd/resid/attn_pdrop, BERT/ViT hidden/attention_probs_dropout_prob, Llama-family
    attention_dropout); activation: None = the default, else activation_function / hidden_act."""
    import transformers as T
    h, f, a, kv, L, V, s = c["h"], c["f"], c["a"], c["kv"], c["L"], c["V"], c["s"]
    common = dict(attn_implementation=attention)
    if arch == "gpt2":
        if dropout is not None:
            common.update(embd_pdrop=dropout, resid_pdrop=dropout, attn_pdrop=dropout)
        if activation is not None:
            common.update(activation_function=activation)
    elif arch in ("t5", "t5-gated"):
        if dropout is not None:
            common.update(dropout_rate=dropout)
    elif arch == "bart":
        if dropout is not None:
            common.update(dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    elif arch in ("bert", "bert-mlm", "vit", "deberta-v2"):
        if dropout is not None:
            common.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        if activation is not None:
            common.update(hidden_act=activation)
    else:
        if dropout is not None:
            common.update(attention_dropout=dropout)
        if activation is not None:
            common.update(hidden_act=activation)
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_positions=max(512, s), n_embd=h, n_layer=L, n_head=a,
                           n_inner=f, **common)
        model = T.GPT2LMHeadModel(cfg)
        drop = (cfg.embd_pdrop, cfg.resid_pdrop, cfg.attn_pdrop)
    elif arch in ("bert", "bert-mlm"):
        cfg = T.BertConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L, num_attention_heads=a,
                           intermediate_size=f, max_position_embeddings=max(512, s), **common)
        model = T.BertModel(cfg) if arch == "bert" else T.BertForMaskedLM(cfg)
        drop = (cfg.hidden_dropout_prob, cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob)
    elif arch in DEPARTURE_ARCHS:
        cls_cfg, cls_model = {
            "llama-hd": (T.LlamaConfig, T.LlamaForCausalLM),
            "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
            "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
            "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM),
            "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM),
        }[arch]
        extra = dict(query_pre_attn_scalar=c.get("hd", h // a), sliding_window=4096) if arch.startswith("gemma") else {}
        cfg = cls_cfg(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                      num_attention_heads=a, num_key_value_heads=kv, head_dim=c.get("hd", h // a),
                      max_position_embeddings=max(512, s), **extra, **common)
        model = cls_model(cfg)
        drop = (0.0, 0.0, cfg.attention_dropout)
    elif arch in ENCDEC_ARCHS:
        Ld = c.get("Ld", L)
        if arch in ("t5", "t5-gated"):
            proj = "gated-gelu" if arch == "t5-gated" else "relu"
            cfg = T.T5Config(vocab_size=V, d_model=h, d_kv=c.get("hd", h // a), d_ff=f, num_layers=L,
                             num_decoder_layers=Ld, num_heads=a, decoder_start_token_id=0, pad_token_id=0,
                             feed_forward_proj=proj, **common)
            model = T.T5ForConditionalGeneration(cfg)
            drop = (cfg.dropout_rate, cfg.dropout_rate, cfg.dropout_rate)
        else:
            cfg = T.BartConfig(vocab_size=V, d_model=h, encoder_layers=L, decoder_layers=Ld,
                               encoder_attention_heads=a, decoder_attention_heads=a, encoder_ffn_dim=f,
                               decoder_ffn_dim=f, max_position_embeddings=512, **common)
            model = T.BartForConditionalGeneration(cfg)
            drop = (cfg.dropout, max(cfg.dropout, cfg.activation_dropout), cfg.attention_dropout)
    elif arch in MLA_ARCHS:
        # the grid's blocks are all dense; REAL_SHAPES' held-out shape has MoE blocks after the first
        cfg = T.DeepseekV2Config(vocab_size=V, hidden_size=h, intermediate_size=f,
                                 moe_intermediate_size=c.get("fm", 64), num_hidden_layers=L,
                                 num_attention_heads=a, num_key_value_heads=a,
                                 n_routed_experts=c.get("E", 4), n_shared_experts=c.get("shared", 1),
                                 num_experts_per_tok=c.get("k", 2), first_k_dense_replace=c.get("dense", L),
                                 kv_lora_rank=c["kvr"], q_lora_rank=c["qr"] or None,
                                 qk_nope_head_dim=c["nope"], qk_rope_head_dim=c["rope"], v_head_dim=c["vd"],
                                 max_position_embeddings=512, topk_method="greedy", **common)
        model = T.DeepseekV2ForCausalLM(cfg)
        drop = (0.0, 0.0, cfg.attention_dropout)
    elif arch in COVERAGE_ARCHS:
        if arch == "phi3":
            cfg = T.Phi3Config(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                               num_attention_heads=a, max_position_embeddings=512, pad_token_id=0,
                               bos_token_id=0, eos_token_id=0, **common)
            model = T.Phi3ForCausalLM(cfg)
        elif arch == "starcoder2":
            cfg = T.Starcoder2Config(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                                     num_attention_heads=a, max_position_embeddings=512, bos_token_id=0,
                                     eos_token_id=0, **common)
            model = T.Starcoder2ForCausalLM(cfg)
        elif arch == "bloom":
            cfg = T.BloomConfig(vocab_size=V, hidden_size=h, n_layer=L, n_head=a, bos_token_id=0,
                                eos_token_id=0, pad_token_id=0, **common)
            model = T.BloomForCausalLM(cfg)
        elif arch == "gpt_bigcode":
            cfg = T.GPTBigCodeConfig(vocab_size=V, n_positions=512, n_embd=h, n_layer=L, n_head=a, n_inner=f,
                                     bos_token_id=0, eos_token_id=0, **common)
            model = T.GPTBigCodeForCausalLM(cfg)
        elif arch == "gemma":
            cfg = T.GemmaConfig(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                                num_attention_heads=a, num_key_value_heads=a, head_dim=h // a,
                                max_position_embeddings=512, **common)
            model = T.GemmaForCausalLM(cfg)
        elif arch == "olmo":
            cfg = T.OlmoConfig(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                               num_attention_heads=a, max_position_embeddings=512, pad_token_id=0,
                               bos_token_id=0, eos_token_id=0, **common)
            model = T.OlmoForCausalLM(cfg)
        elif arch == "mixtral":
            cfg = T.MixtralConfig(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                                  num_attention_heads=a, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, max_position_embeddings=512, **common)
            model = T.MixtralForCausalLM(cfg)
        elif arch == "qwen2_moe":
            cfg = T.Qwen2MoeConfig(vocab_size=V, hidden_size=h, intermediate_size=f, moe_intermediate_size=64,
                                   shared_expert_intermediate_size=128, num_hidden_layers=L,
                                   num_attention_heads=a, num_key_value_heads=2, num_experts=8,
                                   num_experts_per_tok=2, max_position_embeddings=512, **common)
            model = T.Qwen2MoeForCausalLM(cfg)
        elif arch == "granite":
            cfg = T.GraniteConfig(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                                  num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=512,
                                  attention_dropout=0.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                                  attention_multiplier=0.0156, logits_scaling=8.0, **common)
            model = T.GraniteForCausalLM(cfg)
        elif arch == "gpt_oss":
            # eager only (transformers has no sdpa for its sinks); alternating sliding layers
            cfg = T.GptOssConfig(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                                 num_attention_heads=a, num_key_value_heads=2, head_dim=h // a,
                                 num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                                 sliding_window=16,
                                 layer_types=["sliding_attention", "full_attention"] * (L // 2)
                                 + ["sliding_attention"] * (L % 2), **common)
            model = T.GptOssForCausalLM(cfg)
        elif arch in ("olmo3", "seed_oss", "hunyuan_v1_dense", "ernie4_5"):
            # Llama's block with OLMo2's norms, biased q/k/v, per-head q/k norms, or nothing new
            cls = {"olmo3": (T.Olmo3Config, T.Olmo3ForCausalLM),
                   "seed_oss": (T.SeedOssConfig, T.SeedOssForCausalLM),
                   "hunyuan_v1_dense": (T.HunYuanDenseV1Config, T.HunYuanDenseV1ForCausalLM),
                   "ernie4_5": (T.Ernie4_5Config, T.Ernie4_5ForCausalLM)}[arch]
            cfg = cls[0](vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                         num_attention_heads=a, num_key_value_heads=2, head_dim=h // a,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                         **common)
            model = cls[1](cfg)
        elif arch in ("glm", "glm4", "cohere", "cohere2", "stablelm"):
            # GLM-4's biased q/k/v and fused gate_up (glm4: sandwich norms); Cohere's one
            # weight-only LayerNorm before attention and MLP in parallel (cohere with its
            # per-head q/k norms); StableLM 2's LayerNorms with bias and biased q/k/v
            cls = {"glm": (T.GlmConfig, T.GlmForCausalLM), "glm4": (T.Glm4Config, T.Glm4ForCausalLM),
                   "cohere": (T.CohereConfig, T.CohereForCausalLM),
                   "cohere2": (T.Cohere2Config, T.Cohere2ForCausalLM),
                   "stablelm": (T.StableLmConfig, T.StableLmForCausalLM)}[arch]
            extra = {"cohere": dict(use_qk_norm=True), "stablelm": dict(use_qkv_bias=True),
                     "cohere2": dict(layer_types=["full_attention"] * L)}.get(arch, {})
            cfg = cls[0](vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                         num_attention_heads=a, num_key_value_heads=2, head_dim=h // a,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                         **extra, **common)
            model = cls[1](cfg)
        elif arch == "glm4_moe":
            # GLM-4.5's layout: one dense block, then 8 routed experts (top 2) and a shared one,
            # biased q/k/v, per-head q/k norms
            cfg = T.Glm4MoeConfig(vocab_size=V, hidden_size=h, intermediate_size=f, moe_intermediate_size=64,
                                  num_hidden_layers=L, num_attention_heads=a, num_key_value_heads=2,
                                  head_dim=h // a, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                  first_k_dense_replace=1, attention_bias=True, use_qk_norm=True,
                                  max_position_embeddings=512, pad_token_id=0, **common)
            model = T.Glm4MoeForCausalLM(cfg)
        elif arch == "smollm3":
            cfg = T.SmolLM3Config(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                                  num_attention_heads=a, num_key_value_heads=2, max_position_embeddings=512,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
            model = T.SmolLM3ForCausalLM(cfg)
        else:
            cfg = T.DebertaV2Config(vocab_size=V, hidden_size=h, num_hidden_layers=L, num_attention_heads=a,
                                    intermediate_size=f, max_position_embeddings=512, relative_attention=True,
                                    pos_att_type=["p2c", "c2p"], position_buckets=c.get("pb", 256),
                                    norm_rel_ebd="layer_norm",
                                    share_att_key=True, position_biased_input=False, max_relative_positions=-1,
                                    pad_token_id=0, **common)
            model = T.DebertaV2ForMaskedLM(cfg)
        probs = [getattr(cfg, k) for k in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop",
                                           "attn_pdrop", "dropout", "hidden_dropout_prob",
                                           "attention_probs_dropout_prob", "residual_dropout", "embedding_dropout")
                 if isinstance(getattr(cfg, k, None), float)]
        drop = (max(probs or [0.0]), max(probs or [0.0]), max(probs or [0.0]))
    elif arch in FAMILY_ARCHS:
        if arch == "gpt_neox":
            cfg = T.GPTNeoXConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L, num_attention_heads=a,
                                  intermediate_size=f, max_position_embeddings=512, **common)
            model = T.GPTNeoXForCausalLM(cfg)
        elif arch == "phi":
            cfg = T.PhiConfig(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                              num_attention_heads=a, max_position_embeddings=512, **common)
            model = T.PhiForCausalLM(cfg)
        elif arch == "gptj":
            cfg = T.GPTJConfig(vocab_size=V, n_positions=512, n_embd=h, n_layer=L, n_head=a, n_inner=f,
                               rotary_dim=(h // a) // 2, **common)
            model = T.GPTJForCausalLM(cfg)
        elif arch == "falcon":
            cfg = T.FalconConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L, num_attention_heads=a,
                                 ffn_hidden_size=f, max_position_embeddings=512, **common)
            model = T.FalconForCausalLM(cfg)
        elif arch == "distilbert":
            cfg = T.DistilBertConfig(vocab_size=V, dim=h, n_layers=L, n_heads=a, hidden_dim=f,
                                     max_position_embeddings=512, **common)
            model = T.DistilBertForMaskedLM(cfg)
        elif arch == "electra":
            cfg = T.ElectraConfig(vocab_size=V, embedding_size=h // 2, hidden_size=h, num_hidden_layers=L,
                                  num_attention_heads=a, intermediate_size=f, max_position_embeddings=512,
                                  **common)
            model = T.ElectraForPreTraining(cfg)
        else:
            cfg = T.OPTConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L, ffn_dim=f,
                              num_attention_heads=a, max_position_embeddings=512, word_embed_proj_dim=h,
                              **common)
            model = T.OPTForCausalLM(cfg)
        probs = [getattr(cfg, k) for k in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop",
                                           "attn_pdrop", "dropout", "hidden_dropout_prob",
                                           "attention_probs_dropout_prob")
                 if isinstance(getattr(cfg, k, None), float)]
        attn_p = (getattr(cfg, "attention_dropout", None) or getattr(cfg, "attn_pdrop", None)
                  or getattr(cfg, "attention_probs_dropout_prob", None) or 0.0)
        drop = (max(probs or [0.0]), max(probs or [0.0]), attn_p)
    elif arch in GQA_ARCHS:
        cls_cfg, cls_model = {
            "llama": (T.LlamaConfig, T.LlamaForCausalLM),
            "mistral": (T.MistralConfig, T.MistralForCausalLM),
            "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        }[arch]
        cfg = cls_cfg(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                      num_attention_heads=a, num_key_value_heads=kv, max_position_embeddings=max(512, s),
                      **common)
        model = cls_model(cfg)
        drop = (0.0, 0.0, cfg.attention_dropout)
    elif arch in VLM_ARCHS:
        vision = dict(hidden_size=c["vh"], intermediate_size=c["vf"], num_hidden_layers=c["vL"],
                      num_attention_heads=c["va"], image_size=c["img"], patch_size=VIT_PATCH)
        text = dict(vocab_size=V, hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                    num_attention_heads=a, num_key_value_heads=kv, max_position_embeddings=max(512, s))
        if arch == "gemma3-vlm":
            cfg = T.Gemma3Config(text_config=dict(text, model_type="gemma3_text", head_dim=h // a),
                                 vision_config=dict(vision, model_type="siglip_vision_model",
                                                    vision_use_head=False),
                                 mm_tokens_per_image=c["m"], image_token_index=V - 1,
                                 boi_token_index=V - 2, eoi_token_index=V - 3, **common)
            model = T.Gemma3ForConditionalGeneration(cfg)
        elif arch in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
            ids = dict(image_token_id=V - 1, vision_start_token_id=V - 2, video_token_id=V - 3,
                       vision_end_token_id=V - 4)
            # the multimodal rotary sections (time, height, width) at Qwen's 16:24:24 of the
            # rotary half of a head
            d = h // a
            text = dict(text, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                   mrope_section=[d // 8, 3 * d // 16, 3 * d // 16]))
            if arch == "qwen2-vl":
                # an MLP `mlp_ratio` times the width: the row records the width it built
                c["vf"] = c["vh"] * max(1, c["vf"] // c["vh"])
                vis = dict(depth=c["vL"], embed_dim=c["vh"], hidden_size=h, mlp_ratio=c["vf"] // c["vh"],
                           num_heads=c["va"], patch_size=VIT_PATCH, spatial_merge_size=2,
                           temporal_patch_size=2)
                cfg = T.Qwen2VLConfig(text_config=dict(text, model_type="qwen2_vl_text"), vision_config=vis,
                                      **ids, **common)
                model = T.Qwen2VLForConditionalGeneration(cfg)
            elif arch == "qwen3-vl":
                # a learned position table of 8 x 8 rows interpolated to each grid, DeepStack
                # mergers after the first two tower blocks
                vis = dict(depth=c["vL"], hidden_size=c["vh"], intermediate_size=c["vf"], num_heads=c["va"],
                           out_hidden_size=h, patch_size=VIT_PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=list(range(min(2, c["vL"]))))
                cfg = T.Qwen3VLConfig(text_config=dict(text, model_type="qwen3_vl_text", head_dim=h // a),
                                      vision_config=vis, **ids, **common)
                model = T.Qwen3VLForConditionalGeneration(cfg)
            else:
                # windows of 2 x 2 merged patches, the last block full attention
                vis = dict(depth=c["vL"], hidden_size=c["vh"], intermediate_size=c["vf"], num_heads=c["va"],
                           out_hidden_size=h, patch_size=VIT_PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=4 * VIT_PATCH,
                           fullatt_block_indexes=[c["vL"] - 1])
                cfg = T.Qwen2_5_VLConfig(text_config=dict(text, model_type="qwen2_5_vl_text"), vision_config=vis,
                                         **ids, **common)
                model = T.Qwen2_5_VLForConditionalGeneration(cfg)
        elif arch == "mistral3":
            vis = dict(vision, model_type="pixtral", head_dim=c["vh"] // c["va"])
            cfg = T.Mistral3Config(text_config=dict(text, model_type="mistral", head_dim=h // a),
                                   vision_config=vis, image_token_index=V - 1, spatial_merge_size=2,
                                   **common)
            model = T.Mistral3ForConditionalGeneration(cfg)
        else:
            cfg = T.LlavaConfig(text_config=dict(text, model_type="llama"),
                                vision_config=dict(vision, model_type="clip_vision_model"),
                                image_token_index=V - 1, **common)
            model = T.LlavaForConditionalGeneration(cfg)
        drop = (0.0, 0.0, 0.0)
    elif arch == "vit":
        img = vit_image_size(s)
        cfg = T.ViTConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=a, intermediate_size=f,
                          image_size=img, patch_size=VIT_PATCH, num_channels=3, num_labels=V, **common)
        model = T.ViTForImageClassification(cfg)
        drop = (cfg.hidden_dropout_prob, cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob)
    else:
        raise ValueError(arch)
    used = getattr(model.config, "_attn_implementation", "?")
    act = (getattr(cfg, "dense_act_fn", None) or getattr(cfg, "activation_function", None)
           or getattr(cfg, "hidden_act", None)
           or getattr(cfg, "hidden_activation", None) or "gelu")
    return model, drop, used, act


def make_inputs(arch, c, torch, dtype):
    b, s, V = c["b"], c["s"], c["V"]
    g = torch.Generator().manual_seed(0)
    if arch in VLM_ARCHS:
        # each image's tokens first (Gemma 3: its pooled m; LLaVA: every patch), then text that
        # avoids the image, begin- and end-of-image ids
        side = c["img"] // VIT_PATCH
        per_image = (c["m"] if arch == "gemma3-vlm"
                     else side * side // 4 if arch.startswith("qwen") or arch == "mistral3"
                     else side * side)
        n_img = c["im"] * per_image
        ids = torch.randint(0, V - 4, (b, s), generator=g)
        if arch.startswith("qwen"):
            # each image: vision-start, its merged tokens; Qwen's processor flattens the 3-D
            # patches (channels x 2 frames x patch x patch) and gives each image's grid
            for i in range(c["im"]):
                at = i * (per_image + 1)
                ids[:, at] = V - 2
                ids[:, at + 1:at + 1 + per_image] = V - 1
            px = torch.randn(b * c["im"] * side * side, 3 * 2 * VIT_PATCH * VIT_PATCH, generator=g).to(dtype)
            grid = torch.tensor([[1, side, side]] * (b * c["im"]))
            # which tokens are image tokens (1; text 0), as the processor returns it
            return dict(input_ids=ids, pixel_values=px, image_grid_thw=grid, labels=ids.clone(), use_cache=False,
                        mm_token_type_ids=(ids == V - 1).long())
        ids[:, :n_img] = V - 1
        px = torch.randn(b * c["im"], 3, c["img"], c["img"], generator=g).to(dtype)
        out = dict(input_ids=ids, pixel_values=px, labels=ids.clone(), use_cache=False)
        if arch == "gemma3-vlm":
            out["token_type_ids"] = (ids == V - 1).long()
        if arch == "mistral3":
            out["image_sizes"] = torch.tensor([[c["img"], c["img"]]] * (b * c["im"]))
        return out
    if arch == "vit":
        img = vit_image_size(s)
        px = torch.randn(b, 3, img, img, generator=g).to(dtype)
        labels = torch.randint(0, V, (b,), generator=g)
        return dict(pixel_values=px, labels=labels)
    ids = torch.randint(0, V, (b, s), generator=g)
    if arch == "bert":
        return dict(input_ids=ids)
    if arch in ENCDEC_ARCHS:
        # the decoder's t tokens are the labels (shifted right inside the model)
        return dict(input_ids=ids, labels=torch.randint(0, V, (b, c.get("t", s)), generator=g))
    if arch in ("bert-mlm", "distilbert", "deberta-v2"):
        return dict(input_ids=ids, labels=ids.clone())
    if arch == "electra":
        # the discriminator's per-token replaced/original labels
        return dict(input_ids=ids, labels=ids % 2)
    return dict(input_ids=ids, labels=ids.clone(), use_cache=False)


def loss_of(arch, out):
    if arch == "bert":
        # A stand-in task head: uses every output position and the pooler; sum() saves nothing.
        return out.last_hidden_state.sum() + out.pooler_output.sum()
    return out.loss


_VIEWISH = ("ToCopyBackward", "TBackward", "ViewBackward", "UnsafeViewBackward", "TransposeBackward",
            "PermuteBackward", "ExpandBackward", "UnsqueezeBackward", "SqueezeBackward", "AliasBackward",
            "SliceBackward", "SelectBackward")


def _param_derived(t, param_ptrs):
    """True when t's autograd history is only casts/views of one parameter (e.g. autocast weight copy)."""
    fn = t.grad_fn
    for _ in range(8):
        if fn is None:
            return False
        name = type(fn).__name__
        if name == "AccumulateGrad":
            v = fn.variable
            return v.untyped_storage().data_ptr() in param_ptrs
        if not name.startswith(_VIEWISH):
            return False
        nxt = [n for n, _ in fn.next_functions if n is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return False


def measure(arch, attention, precision, c, device="cpu", dump=False, dropout=None, activation=None):
    import torch
    import transformers

    torch.manual_seed(0)
    model, drop, used, act = build(arch, attention, c, dropout, activation)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    model.train()
    in_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in make_inputs(arch, c, torch, in_dtype).items()}

    state_ptrs = {}
    for p in list(model.parameters()) + list(model.buffers()):
        st = p.untyped_storage()
        state_ptrs[st.data_ptr()] = st.nbytes()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_bytes = sum(p.untyped_storage().nbytes() for p in
                      {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values())

    records = []

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in state_ptrs:
            kind = "param"
        elif _param_derived(t, param_ptrs):
            kind = "weight_copy"
        else:
            kind = "act"
        try:
            ref = weakref.ref(t)
        except TypeError:
            ref = (lambda t=t: t)
        records.append((ref, ptr, st.nbytes(), t.dtype, tuple(t.shape), kind))
        return t

    def unpack(t):
        return t

    t0 = time.time()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if precision == "bf16-autocast":
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                out = model(**inputs)
                loss = loss_of(arch, out)
        else:
            out = model(**inputs)
            loss = loss_of(arch, out)
    del out
    gc.collect()

    storages = {}
    for ref, ptr, nbytes, dtype, shape, kind in records:
        if ref() is None or ptr == 0:
            continue
        prev = storages.get(ptr)
        if prev is None or nbytes > prev[0]:
            storages[ptr] = (nbytes, dtype, shape, kind)

    row = {k: 0 for k in ("saved_bytes", "saved_fp32_bytes", "saved_bf16_bytes", "saved_bool_bytes",
                          "saved_int64_bytes", "saved_other_bytes", "saved_param_bytes", "weight_copy_bytes")}
    n_act = 0
    for nbytes, dtype, shape, kind in storages.values():
        if kind == "param":
            row["saved_param_bytes"] += nbytes
        elif kind == "weight_copy":
            row["weight_copy_bytes"] += nbytes
        else:
            n_act += 1
            row["saved_bytes"] += nbytes
            key = {torch.float32: "saved_fp32_bytes", torch.bfloat16: "saved_bf16_bytes",
                   torch.bool: "saved_bool_bytes", torch.int64: "saved_int64_bytes"}.get(dtype, "saved_other_bytes")
            row[key] += nbytes

    if dump:
        _dump(loss, storages, torch)

    loss.backward()  # sanity: the graph is usable; frees it
    seconds = time.time() - t0
    del loss, records
    gc.collect()

    s_eff = c["s"]
    img = ""
    if arch == "vit":
        img = vit_image_size(c["s"])
        s_eff = (img // VIT_PATCH) ** 2 + 1
    row.update(dict(
        arch=arch, attention=attention, precision=precision, b=c["b"], s=s_eff, h=c["h"], f=c["f"], a=c["a"],
        kv_heads=(c["kv"] if arch in GQA_ARCHS
                  else 1 if arch == "falcon" and model.config.multi_query
                  and not model.config.new_decoder_architecture
                  else model.config.num_key_value_heads if arch in ("starcoder2", "mixtral", "qwen2_moe",
                                                                     "granite", "smollm3", "gpt_oss", "olmo3",
                                                                     "seed_oss", "hunyuan_v1_dense", "ernie4_5",
                                                                     "glm4_moe", "glm", "glm4", "cohere",
                                                                     "cohere2", "stablelm")
                  else 1 if arch == "gpt_bigcode" and model.config.multi_query else c["a"]), head_dim=c.get("hd", c["h"] // c["a"]), L=c["L"],
        V=c["V"], image_size=img, embd_dropout=drop[0], hidden_dropout=drop[1], attn_dropout=drop[2],
        saved_storages=n_act, param_bytes=param_bytes, attn_impl_used=used, device=device,
        torch_version=torch.__version__, transformers_version=transformers.__version__,
        seconds=round(seconds, 3), activation=act,
        decoder_layers=c.get("Ld", "") if arch in ENCDEC_ARCHS else "",
        target_len=c.get("t", "") if arch in ENCDEC_ARCHS else "",
        position_buckets=c.get("pb", 256) if arch == "deberta-v2" else "",
        # kv rank / q rank / nope / rope / v head widths
        # and for MoE blocks: expert width / routed experts / top-k / shared experts / dense blocks
        mla="/".join(str(c[k]) for k in ("kvr", "qr", "nope", "rope", "vd"))
        + ("/" + "/".join(str(c[k]) for k in ("fm", "E", "k", "shared", "dense")) if "dense" in c else "")
        if arch in MLA_ARCHS else "",
        # tower layers / width / MLP / heads / image side / images per sample / Gemma 3's
        # pooled tokens per image
        vision="/".join(str(c[k]) for k in ("vL", "vh", "vf", "va", "img", "im", "m"))
        if arch in VLM_ARCHS else "",
    ))
    return row


def _dump(loss, storages, torch):
    """Walk the autograd graph from the loss; print every saved storage with the nodes holding it."""
    holders = {}
    seen = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for attr in dir(fn):
            if not attr.startswith("_saved_"):
                continue
            try:
                v = getattr(fn, attr)
            except Exception:
                continue
            vals = v if isinstance(v, (list, tuple)) else [v]
            for x in vals:
                if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() != 0:
                    holders.setdefault(x.untyped_storage().data_ptr(), []).append(
                        f"{type(fn).__name__}.{attr[7:]}{tuple(x.shape)}")
        stack.extend(n for n, _ in fn.next_functions if n is not None)
    total = {}
    for ptr, (nbytes, dtype, shape, kind) in sorted(storages.items(), key=lambda kv: -kv[1][0]):
        total[kind] = total.get(kind, 0) + nbytes
        who = ", ".join(sorted(set(holders.get(ptr, ["(not reachable from loss)"]))))
        print(f"{kind:12s} {nbytes:>10d} {str(dtype):15s} {str(shape):22s} {who}")
    graph_bytes = sum(storages[p][0] for p in holders if p in storages)
    print(f"totals by kind: {total}; bytes of hooked storages reachable from the loss graph: {graph_bytes}")


def fit(path, out=sys.stdout, min_batch=1):
    """Least-squares fit per (arch, attention, precision); see the module docstring for the model.

    Prints the fitted coefficients, the largest relative residual of the least-squares fit, and the
    largest residual (bytes, and relative) of the model with every coefficient rounded to 0.5 byte,
    which shows whether the decomposition is exact. Rows with b < min_batch are left out.
    """
    import numpy as np
    # the departure and family archs are checked against the planner by its tests
    # (tests/it/planner_cpu_blocks.rs); this fit's columns assume head_dim = h / heads
    rows = [r for r in csv.DictReader(open(path)) if int(r["b"]) >= min_batch
            and r["arch"] not in DEPARTURE_ARCHS + FAMILY_ARCHS + COVERAGE_ARCHS + MLA_ARCHS + ENCDEC_ARCHS]
    groups = {}
    for r in rows:
        act = r.get("activation") or DEFAULT_ACTIVATION[r["arch"]]
        drop = f"{r['embd_dropout']}/{r['hidden_dropout']}/{r['attn_dropout']}"
        groups.setdefault((r["arch"], r["attention"], r["precision"], drop, act), []).append(r)
    allnames = ["alpha", "beta", "gamma", "delta", "nu", "lambda", "eps", "kappa", "zeta", "eta", "sigma",
                "rho", "mu", "const"]
    print(",".join(["arch", "attention", "precision", "dropout", "activation", "n"] + allnames +
                   ["max_rel_err", "rounded_max_abs_err_bytes", "rounded_max_rel_err", "rank_ok"]), file=out)
    for (arch, att, prec, drop, act), rs in groups.items():
        names, X, y = None, [], []
        for r in rs:
            b, s, h, f, a, kv, L, V = (int(r[k]) for k in ("b", "s", "h", "f", "a", "kv_heads", "L", "V"))
            d = h // a
            cols = {
                "alpha": L * b * s * h, "beta": L * b * s * f, "gamma": L * b * a * s * s,
                "delta": L * b * a * s, "nu": L * b * s,
                "lambda": (b * V if arch == "vit" else b * s * V) if arch != "bert" else None,
                "eps": b * s * h,
                "kappa": L * b * s * kv * d if arch in GQA_ARCHS else None,
                "zeta": b * s, "eta": b, "sigma": s,
                "rho": s * d if arch in GQA_ARCHS else None,
                "mu": b * h if arch in ("bert", "vit") else None,
                "const": 1,
            }
            cols = {k: v for k, v in cols.items() if v is not None}
            names = list(cols)
            X.append([float(v) for v in cols.values()])
            y.append(float(r["saved_bytes"]))
        X, y = np.array(X), np.array(y)
        scale = X.max(axis=0)
        coef, _, rank, _ = np.linalg.lstsq(X / scale, y, rcond=None)
        coef = coef / scale
        err = np.max(np.abs(X @ coef - y) / y)
        rounded = np.round(coef * 2) / 2
        rerr = np.abs(X @ rounded - y)
        vals = dict(zip(names, coef))
        cells = [f"{vals[k]:.3f}" if k in vals else "" for k in allnames]
        print(",".join([arch, att, prec, drop, act, str(len(rs))] + cells +
                       [f"{err:.1e}", f"{rerr.max():.0f}", f"{np.max(rerr / y):.1e}", str(rank == X.shape[1])]),
              file=out)


# The encoder-decoder fit's columns: per encoder layer (x L), per decoder layer (x Ld), once.
# q = heads x d_kv (T5's query width; h for BART, whose q columns merge into h's and are left out).
ENCDEC_COLUMNS = (
    ("enc_bsh", "L*b*s*h"), ("enc_bsq", "L*b*s*q"), ("enc_bsf", "L*b*s*f"), ("enc_bas2", "L*b*a*s*s"),
    ("enc_bs", "L*b*s"),
    ("dec_bth", "Ld*b*t*h"), ("dec_btq", "Ld*b*t*q"), ("dec_btf", "Ld*b*t*f"), ("dec_bat2", "Ld*b*a*t*t"),
    ("dec_bats", "Ld*b*a*t*s"), ("dec_bt", "Ld*b*t"), ("dec_bsq", "Ld*b*s*q"), ("dec_bsh", "Ld*b*s*h"),
    ("once_bsh", "b*s*h"), ("once_bth", "b*t*h"), ("once_btv", "b*t*V"), ("once_bt", "b*t"), ("once_bs", "b*s"),
    ("once_s2", "s*s"), ("once_t2", "t*t"), ("once_1", "1"),
)


def fit_encdec(path, out=sys.stdout, min_batch=2):
    """Exact per-stack fit of the encoder-decoder rows (eager attention; sdpa rows whose CPU kernel
    fell back to the math path fit the same columns), per (arch, attention, precision, dropout):
    bytes per element of each column of ENCDEC_COLUMNS, rounded to 0.25 byte, and the rounded
    model's largest residual. b = 1 rows are left out (a few reshapes are views there)."""
    import numpy as np
    # the grid's rows only (V <= 1024): REAL_SHAPES' rows stay held out
    rows = [r for r in csv.DictReader(open(path)) if r["arch"] in ENCDEC_ARCHS and int(r["b"]) >= min_batch
            and int(r["V"]) <= 1024]
    groups = {}
    for r in rows:
        groups.setdefault((r["arch"], r["attention"], r["precision"], r["hidden_dropout"]), []).append(r)
    names = [n for n, _ in ENCDEC_COLUMNS]
    print(",".join(["arch", "attention", "precision", "dropout", "n"] + names +
                   ["rounded_max_abs_err_bytes", "rounded_max_rel_err"]), file=out)
    for (arch, att, prec, drop), rs in sorted(groups.items()):
        keep = [n for n in names if not (arch == "bart" and n in ("enc_bsq", "dec_btq", "dec_bsq"))]
        X, y = [], []
        for r in rs:
            env = {k: int(r[c]) for k, c in (("b", "b"), ("s", "s"), ("h", "h"), ("f", "f"), ("a", "a"), ("L", "L"),
                                               ("V", "V"), ("Ld", "decoder_layers"), ("t", "target_len"))}
            env["q"] = env["a"] * int(r["head_dim"])
            X.append([float(eval(e, {}, env)) for n, e in ENCDEC_COLUMNS if n in keep])
            y.append(float(r["saved_bytes"]))
        X, y = np.array(X), np.array(y)
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        rounded = np.round(coef * 4) / 4
        rerr = np.abs(X @ rounded - y)
        vals = dict(zip(keep, rounded))
        print(",".join([arch, att, prec, drop, str(len(rs))] + [f"{vals[n]:g}" if n in vals else "" for n in names]
                       + [f"{rerr.max():.0f}", f"{np.max(rerr / y):.1e}"]), file=out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="torch-saved-bytes.csv", help="CSV file to write (default %(default)s)")
    p.add_argument("--arch", choices=ARCHS + DEPARTURE_ARCHS + FAMILY_ARCHS + COVERAGE_ARCHS + MLA_ARCHS + ENCDEC_ARCHS
                   + VLM_ARCHS,
                   action="append",
                   help="architecture(s) (default: all but the departure and family archs)")
    p.add_argument("--attention", choices=ATTENTIONS, action="append", help="eager | sdpa (default: both)")
    p.add_argument("--precision", choices=PRECISIONS, action="append", help="(default: all three)")
    p.add_argument("--dropout", type=float, action="append", metavar="P",
                   help="set every dropout probability of the config to P (repeatable; default: the "
                        "architecture's own)")
    p.add_argument("--activation", choices=ACTIVATIONS, action="append",
                   help="MLP activation (activation_function / hidden_act; repeatable; default: the "
                        "architecture's own)")
    p.add_argument("--append", action="store_true",
                   help="append rows to --out (its header must be this script's) instead of rewriting it")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--fit", metavar="CSV", help="fit the coefficients from CSV and print them; measure nothing")
    p.add_argument("--fit-encdec", metavar="CSV",
                   help="fit the encoder-decoder rows of CSV per stack and print them; measure nothing")
    p.add_argument("--real-shapes", action="store_true",
                   help="with the archs in REAL_SHAPES: measure those real widths instead of the grid")
    p.add_argument("--fit-min-batch", type=int, default=1, metavar="B",
                   help="with --fit: leave out rows with batch < B (default %(default)s)")
    p.add_argument("--dump", action="store_true",
                   help="print the saved storages of the base configuration (per arch/attention/precision)")
    args = p.parse_args()

    if args.fit:
        fit(args.fit, min_batch=args.fit_min_batch)
        return
    if args.fit_encdec:
        fit_encdec(args.fit_encdec)
        return

    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.arch or list(ARCHS)
    odd = [a for a in archs if a in DEPARTURE_ARCHS + FAMILY_ARCHS + COVERAGE_ARCHS + MLA_ARCHS + VLM_ARCHS
           and a != "deberta-v2"]
    if args.real_shapes and any(a not in REAL_SHAPES for a in archs):
        sys.exit(f"--real-shapes measures only {', '.join(REAL_SHAPES)}")
    if args.activation and any(a in ENCDEC_ARCHS for a in archs):
        sys.exit("--activation is not accepted with the encoder-decoders (t5-gated measures T5's gated-gelu)")
    if odd and (args.dropout or args.activation):
        sys.exit(f"--dropout / --activation set only the measured archs' config keys; "
                 f"not accepted with {', '.join(odd)} (measured at their config defaults)")
    atts = args.attention or list(ATTENTIONS)
    precs = args.precision or list(PRECISIONS)
    drops = args.dropout or [None]
    acts = args.activation or [None]

    if args.dump:
        for arch in archs:
            for att in atts:
                for prec in precs:
                    for dp in drops:
                        for act in acts:
                            print(f"== {arch} {att} {prec} dropout={dp} activation={act} {BASE}")
                            try:
                                r = measure(arch, att, prec, dict(BASE), args.device, dump=True,
                                            dropout=dp, activation=act)
                            except Exception as e:  # e.g. Gemma2 refuses sdpa
                                print(f"error: {type(e).__name__}: {e}")
                                continue
                            print(f"saved_bytes={r['saved_bytes']} param={r['saved_param_bytes']} "
                                  f"weight_copy={r['weight_copy_bytes']} attn_impl={r['attn_impl_used']}")
        return

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.append:
        with open(args.out, newline="") as fh:
            header = next(csv.reader(fh))
        if header != COLUMNS:
            sys.exit(f"{args.out}: header differs from this script's columns; not appending")
    with open(args.out, "a" if args.append else "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        if not args.append:
            w.writeheader()
        for arch in archs:
            for att in atts:
                for prec in precs:
                    for dp in drops:
                        for act in acts:
                            done = set()
                            for c in ([dict(REAL_SHAPES[arch])] if args.real_shapes and arch in REAL_SHAPES
                                      else DEPARTURE_GRID if arch in DEPARTURE_ARCHS
                                      else deberta_grid() if arch == "deberta-v2"
                                      else mla_grid() if arch in MLA_ARCHS
                                      else FAMILY_GRID if arch in FAMILY_ARCHS + COVERAGE_ARCHS
                                      else encdec_grid(arch) if arch in ENCDEC_ARCHS
                                      else vlm_grid() if arch in VLM_ARCHS
                                      else grid()):
                                if arch not in GQA_ARCHS:
                                    c["kv"] = c["a"]  # kv only matters for GQA models
                                    key = tuple(sorted(c.items()))
                                    if key in done:
                                        continue
                                    done.add(key)
                                try:
                                    r = measure(arch, att, prec, c, args.device, dropout=dp, activation=act)
                                except Exception as e:  # record and go on
                                    print(f"error {arch} {att} {prec} {dp} {act} {c}: {type(e).__name__}: {e}",
                                          file=sys.stderr)
                                    continue
                                w.writerow(r)
                                fh.flush()
                            print(f"done {arch} {att} {prec} dropout={dp} activation={act}", file=sys.stderr)


if __name__ == "__main__":
    main()
