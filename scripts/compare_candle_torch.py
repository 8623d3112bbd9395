"""candle harness vs PyTorch: whole-step peak above the baseline, same configuration.

PyTorch side: calibration/data/torch-step-peaks-cpu.csv (scripts/torch_step_peak/run.py: HF
transformers' own model class, one measured step under a live-heap malloc shim). Its peak above
the baseline is meas_peak_step - meas_states (both are counted from the bytes alive before the
model existed; baseline_abs includes the interpreter's ~156 MB, so subtracting it from
meas_peak_step would remove those bytes twice).

candle side: `vramcal measure --json` (debug build is fine: memory does not depend on speed),
peak_bytes - baseline_bytes. The harness runs AdamW as a for-loop; rows whose PyTorch peak is in
the backward pass (meas_phase) do not depend on the optimizer implementation, so foreach rows
are compared too.

  python3 scripts/compare_candle_torch.py [name-substring ...]
  OUT=calibration/data/candle-vs-torch-cpu.csv (default) VRAMCAL=target/debug/vramcal
"""
import csv, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
VC = os.environ.get("VRAMCAL", os.path.join(ROOT, "target", "debug", "vramcal"))
TORCH = os.path.join(ROOT, "calibration", "data", "torch-step-peaks-cpu.csv")
OUT = os.environ.get("OUT", os.path.join(ROOT, "calibration", "data", "candle-vs-torch-cpu.csv"))


def spec(model, dropout=0.0):
    base = dict(family="transformer", arch="decoder", layers=4, hidden=512, heads=8, kv_heads=8,
                vocab=8000, max_positions=0, type_vocab=0, norm="layernorm", bias=True,
                qkv_bias=False, tied_embeddings=True, embedding_norm=False, final_norm=True,
                head={"kind": "lm"}, patch=None, dropout=dropout)
    if model in ("llama-mha", "llama-gqa"):
        base.update(name=model, ffn=1376, ffn_kind="swiglu", norm="rmsnorm", bias=False,
                    tied_embeddings=False, kv_heads=8 if model == "llama-mha" else 2)
    elif model == "gpt2":
        # transformers' GPT-2 default activation: gelu_new (the composed tanh GELU)
        base.update(name=model, ffn=2048, ffn_kind="gelu", max_positions=1024)
    elif model == "gpt2-tanh":
        base.update(name=model, ffn=2048, ffn_kind="gelu", max_positions=1024,
                    activation="gelu_pytorch_tanh")
    elif model == "bert-cls":
        # BertForSequenceClassification: post-LN encoder; the harness's classifier head has no
        # pooler (263k parameters fewer than PyTorch's, ~4 MB of weights + states)
        base.update(name=model, arch="encoder", ffn=2048, ffn_kind="gelu", max_positions=512,
                    type_vocab=2, embedding_norm=True, final_norm=False,
                    head={"kind": "classifier", "classes": 2})
    else:
        raise SystemExit(model)
    return base


# (torch csv row, candle model, dropout, batch, seq, attention)
CONFIGS = [
    ("llama-mha fp32 sdpa loop b4s512", "llama-mha", 0.0, 4, 512, "sdpa"),
    ("llama-mha fp32 eager loop b4s512", "llama-mha", 0.0, 4, 512, "eager"),
    ("llama-mha fp32 eager foreach b2s1024", "llama-mha", 0.0, 2, 1024, "eager"),
    ("llama-mha fp32 sdpa foreach b8s256", "llama-mha", 0.0, 8, 256, "sdpa"),
    ("llama-mha fp32 sdpa foreach b1s1024", "llama-mha", 0.0, 1, 1024, "sdpa"),
    ("llama-gqa fp32 sdpa foreach b4s512", "llama-gqa", 0.0, 4, 512, "sdpa"),
    ("llama-gqa fp32 eager foreach b2s1024", "llama-gqa", 0.0, 2, 1024, "eager"),
    ("gpt2 fp32 sdpa loop b4s512", "gpt2", 0.0, 4, 512, "sdpa"),
    ("gpt2 fp32 eager foreach b4s512", "gpt2", 0.0, 4, 512, "eager"),
    ("gpt2(gelu_pytorch_tanh) fp32 sdpa foreach b4s512", "gpt2-tanh", 0.0, 4, 512, "sdpa"),
    ("gpt2 DROPOUT0.1 fp32 eager foreach b4s512 (CPU masks 4B)", "gpt2", 0.1, 4, 512, "eager"),
    ("bert-cls fp32 sdpa foreach b4s512", "bert-cls", 0.0, 4, 512, "sdpa"),
    ("bert-cls fp32 eager foreach b4s512", "bert-cls", 0.0, 4, 512, "eager"),
    ("bert-cls DROPOUT0.1 fp32 eager foreach b4s512 (CPU masks 4B)", "bert-cls", 0.1, 4, 512, "eager"),
]


def candle(model, dropout, batch, seq, attn):
    a = [VC, "measure", "--spec-json", json.dumps(spec(model, dropout)), "--batch", str(batch),
         "--seq", str(seq), "--attention", attn, "--optimizer-impl", "loop", "--warmup", "1",
         "--repeats", "1", "--json"]
    out = subprocess.run(a, check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    r = r[0] if isinstance(r, list) else r
    return r["peak_bytes"] - r["baseline_bytes"], r["baseline_bytes"], r.get("step_ms_median")


def main():
    only = sys.argv[1:]
    torch = {r["name"]: r for r in csv.DictReader(open(TORCH))}
    rows = []
    for name, model, dropout, batch, seq, attn in CONFIGS:
        if only and not any(o in name for o in only):
            continue
        t = torch[name]
        t_peak = int(t["meas_peak_step"]) - int(t["meas_states"])
        c_peak, c_base, c_ms = candle(model, dropout, batch, seq, attn)
        r = dict(config=name, candle_model=model, dropout=dropout, batch=batch, seq=seq,
                 attention=attn, torch_phase=t["meas_phase"],
                 torch_states=int(t["meas_states"]), candle_baseline=c_base,
                 torch_peak_above_base=t_peak, candle_peak_above_base=c_peak,
                 ratio=round(c_peak / t_peak, 4), candle_step_ms_debug=c_ms)
        rows.append(r)
        print(f"{name:62s} torch {t_peak/1e6:8.1f} MB  candle {c_peak/1e6:8.1f} MB  "
              f"ratio {c_peak/t_peak:.3f}", flush=True)
    if not only:
        with open(OUT, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        print("wrote", OUT)


if __name__ == "__main__":
    main()
