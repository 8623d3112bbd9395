"""Softmax-upcast probe: bytes per attention score that the eager attention chain alone saves
and peaks at (b4 a16 s1024 d64), fp32 and bf16 with and without an fp32 softmax
(plan::departures::Planned::softmax_upcast_score_bytes). Run under the malloc shim:
  LD_PRELOAD=$PWD/scripts/torch_step_peak/malloc_peak_shim.so python3 scripts/torch_step_peak/attention_score_probe.py
Output committed as calibration/data/torch-probe-attention-scores-cpu.txt."""
import ctypes, os, torch, sys
S = ctypes.CDLL(os.environ["LD_PRELOAD"]); S.shim_live.restype = ctypes.c_long; S.shim_peak.restype = ctypes.c_long
torch.set_num_threads(2)
b,a,s,d = 4,16,1024,64
for dt, up in [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)]:
    q,k,v = [torch.randn(b,a,s,d, dtype=dt, requires_grad=True) for _ in range(3)]
    mask = torch.full((s,s), float('-inf')).triu(1).to(dt)[None,None]
    def f():
        w = torch.matmul(q, k.transpose(2,3)) * 0.125
        w = w + mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(dt) if up else torch.softmax(w, dim=-1)
        o = torch.matmul(w, v)
        return o.transpose(1,2).contiguous().sum()
    for _ in range(2):
        f().backward(); q.grad=k.grad=v.grad=None
    S.shim_reset_peak(); base = S.shim_live()
    L = f(); live = S.shim_live()-base; fp = S.shim_peak()-base
    S.shim_reset_peak(); L.backward(); bp = S.shim_peak()-base
    E = b*a*s*s
    print(dt, 'upcast' if up else 'native', f"saved {live/E:.2f} B/elem fwdpeak {fp/E:.2f} bwdpeak {bp/E:.2f} (bwd over saved {(bp-live)/E:.2f})")
    q.grad=k.grad=v.grad=None
