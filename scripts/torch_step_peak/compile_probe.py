"""Compiled-block probe: bytes per token one transformers Llama decoder layer keeps for backward,
eager and with every layer compiled (`layer.compile()`, torchtune's compile: True), against the
planner's formula for compiled blocks (plan::finetune::compiled_block_bytes):

    r*h + c*(3h + 2*q_width + 2*kv_width + 3f) + 4*(2 + heads)

(c the compute dtype's bytes, r the residual stream's: fp32 under autocast; under autocast the
layer's bf16 weight copies, which the planner counts separately, are added per token). Each shape runs
step.py at 2 and 4 layers; the difference over 2 layers and b*s tokens is one layer's bytes, so
the embedding, head and loss drop out. Run with a python that has torch + transformers:
  PYTHON=... python3 scripts/torch_step_peak/compile_probe.py
Output committed as calibration/data/torch-probe-compiled-block-cpu.txt."""
import json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
PY = os.environ.get("PYTHON", sys.executable)
SHIM = os.environ.get("SHIM", os.path.join(HERE, "malloc_peak_shim.so"))
BASE = dict(model="llama", hidden=512, ffn=1376, heads=8, kv=8, vocab=8000, attn="sdpa",
            impl="foreach", batch=4, seq=512, name="probe")
SHAPES = [{}, dict(ffn=2752), dict(kv=2), dict(hidden=1024, heads=16)]


def saved_after_forward(cf):
    env = dict(os.environ, LD_PRELOAD=SHIM, OMP_NUM_THREADS="2", MKL_DISABLE_FAST_MM="1")
    p = subprocess.run([PY, os.path.join(HERE, "step.py"), json.dumps(cf)], env=env,
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["live_after_fwd"]
    raise RuntimeError(p.stderr[-3000:])


def formula(cf):
    c = 4 if cf["precision"] == "fp32" else 2
    r = 2 if cf["precision"] == "bf16" else 4
    h, f, a = cf["hidden"], cf["ffn"], cf["heads"]
    d = h // a
    block = r * h + c * (3 * h + 2 * a * d + 2 * cf["kv"] * d + 3 * f) + 4 * (2 + a)
    if cf["precision"] != "bf16-mixed":
        return block
    # autocast keeps the bf16 copy of every matmul weight for backward, compiled or not; the
    # planner counts those copies with the model states (the 16-bit compute copy), so per token here
    layer_matmul_params = h * (2 * a * d + 2 * cf["kv"] * d) + 3 * h * f
    return block + 2 * layer_matmul_params / (cf["batch"] * cf["seq"])


for precision in os.environ.get("PRECISIONS", "fp32,bf16,bf16-mixed").split(","):
    for shape in SHAPES:
        for compile_ in ("none", "blocks") if not shape else ("blocks",):
            cf = dict(BASE, precision=precision, compile=compile_, **shape)
            by_layers = {n: saved_after_forward(dict(cf, layers=n)) for n in (2, 4)}
            per_token = (by_layers[4] - by_layers[2]) / 2 / (cf["batch"] * cf["seq"])
            what = " ".join(f"{k}={v}" for k, v in shape.items()) or "h512 f1376 a8 kv8"
            planned = f"  planned {formula(cf):.0f}" if compile_ == "blocks" else ""
            print(f"{precision:10s} {compile_:6s} {what:18s} saved {per_token:8.1f} B/token/layer{planned}",
                  flush=True)
