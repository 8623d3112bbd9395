"""Cross-entropy probe: bytes per logit the LM loss alone saves and peaks at (b2 s1024 h512
V32000 bf16): full, torchtune-style chunked (8 chunks) eager, and chunked with the per-chunk loss
compiled (plan::finetune::CrossEntropy). Run under the malloc shim:
  LD_PRELOAD=$PWD/scripts/torch_step_peak/malloc_peak_shim.so python3 scripts/torch_step_peak/cross_entropy_probe.py
Output committed as calibration/data/torch-probe-cross-entropy-cpu.txt."""
import ctypes, os, torch, torch.nn.functional as F
S = ctypes.CDLL(os.environ["LD_PRELOAD"]); S.shim_live.restype = ctypes.c_long; S.shim_peak.restype = ctypes.c_long
torch.set_num_threads(2)
B, T, H, V, C = 2, 1024, 512, 32000, 8
dt = torch.bfloat16
W = torch.randn(V, H, dtype=dt, requires_grad=True)
labels = torch.randint(0, V, (B, T))
def ce(logits, lab):
    return F.cross_entropy(logits.float().reshape(-1, V), lab.reshape(-1), reduction="sum")
cce = torch.compile(ce)
def full(h):          # HF / torchtune unchunked: logits -> fp32 -> CE
    return ce(h @ W.t(), labels)
def chunked(h, f):    # torchtune CEWithChunkedOutputLoss: chunked output, CE per chunk
    outs = [c @ W.t() for c in h.tensor_split(C, dim=1)]
    labs = labels.tensor_split(C, dim=1)
    return sum(f(o, l) for o, l in zip(outs, labs))
E = B * T * V
for name, fn in [("full eager", lambda h: full(h)), ("chunked eager", lambda h: chunked(h, ce)), ("chunked compiled", lambda h: chunked(h, cce))]:
    for _ in range(2):
        h = torch.randn(B, T, H, dtype=dt, requires_grad=True); fn(h).backward(); W.grad = None
    h = torch.randn(B, T, H, dtype=dt, requires_grad=True)
    S.shim_reset_peak(); base = S.shim_live()
    loss = fn(h); fp = S.shim_peak() - base; live = S.shim_live() - base
    S.shim_reset_peak(); loss.backward(); bp = S.shim_peak() - base
    W.grad = None
    print(f"{name:18s} saved {live/E:5.2f} B/logit  fwd peak {fp/E:5.2f}  bwd peak {bp/E:5.2f} (W grad {V*H*2/E:.2f})", flush=True)
