#!/usr/bin/env python3
"""PyTorch reference for a few of vramcal's transformer configurations.

Builds the same GPT-style decoder the harness trains (token + position embedding, L pre-LN blocks of
fused-QKV causal attention with dropout 0.1 and a 4h GELU MLP, final LayerNorm, LM head tied or untied),
trains it with AdamW on CUDA, and records per configuration:

  baseline_bytes        torch.cuda.memory_allocated() once the model and the optimizer states exist
  peak_allocated_bytes  torch.cuda.max_memory_allocated() over one training step
  peak_reserved_bytes   torch.cuda.max_memory_reserved() over that step (what the caching allocator holds)
  step_ms_*             median / p10 / p90 of N steps timed with CUDA events

so that the GPU report can show candle's and PyTorch's numbers side by side. An out-of-memory
configuration is recorded with status "oom" (another failure: "error", message on stderr) instead of
stopping the run.

Examples:
  python3 scripts/torch_reference.py --out reports/h100-80gb/torch_reference.csv
  python3 scripts/torch_reference.py --hidden 1024 --layers 8 --heads 16 --batch 8 --seq 1024 \\
      --precision bf16-mixed --checkpointing full --out /tmp/one.csv

torch is imported lazily, so --help works without it.
"""

import argparse
import csv
import math
import os
import statistics
import sys
import time

COLUMNS = [
    "model", "layers", "hidden", "heads", "vocab", "batch", "seq", "precision", "checkpointing",
    "params", "baseline_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
    "step_ms_median", "step_ms_p10", "step_ms_p90", "status",
]

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
CHECKPOINTING = ("none", "full")

# The default points: a subset of calibration/grids/cuda.toml's transformer points, spread over size,
# sequence length (the s^2 attention term), precision and checkpointing.
# (hidden, layers, heads, vocab, batch, seq, precision, checkpointing)
DEFAULT_CONFIGS = [
    (1024, 8, 16, 32000, 8, 512, "fp32", "none"),
    (1024, 8, 16, 32000, 8, 1024, "fp32", "none"),
    (1024, 8, 16, 32000, 8, 1024, "bf16-mixed", "none"),
    (1024, 8, 16, 32000, 8, 1024, "bf16-mixed", "full"),
    (1024, 8, 16, 32000, 4, 2048, "bf16-mixed", "none"),
    (2048, 8, 16, 32000, 4, 512, "fp32", "none"),
    (2048, 8, 16, 32000, 4, 1024, "bf16-mixed", "none"),
    (2048, 8, 16, 32000, 4, 2048, "bf16-mixed", "full"),
]


def percentile(xs, q):
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def build_model(torch, hidden, layers, heads, vocab, seq, tied, checkpointing, dropout=0.1):
    nn = torch.nn
    F = torch.nn.functional
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(hidden)
            self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)  # fused Q, K, V
            self.proj = nn.Linear(hidden, hidden, bias=True)
            self.ln2 = nn.LayerNorm(hidden)
            self.fc1 = nn.Linear(hidden, 4 * hidden, bias=True)
            self.fc2 = nn.Linear(4 * hidden, hidden, bias=True)
            self.drop = nn.Dropout(dropout)

        def attention(self, x):
            b, s, h = x.shape
            d = h // heads
            q, k, v = self.qkv(x).split(h, dim=-1)
            q = q.view(b, s, heads, d).transpose(1, 2)
            k = k.view(b, s, heads, d).transpose(1, 2)
            v = v.view(b, s, heads, d).transpose(1, 2)
            # Explicit scores/softmax/dropout (not SDPA/flash): the harness materialises the b*a*s^2 scores
            # too, and that is the term being compared.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)  # True above the diagonal
            att = att.masked_fill(mask, float("-inf"))
            att = self.drop(F.softmax(att, dim=-1))
            y = (att @ v).transpose(1, 2).reshape(b, s, h)
            return self.drop(self.proj(y))

        def forward(self, x):
            x = x + self.attention(self.ln1(x))
            x = x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))
            return x

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(seq, hidden)
            self.drop = nn.Dropout(dropout)
            self.blocks = nn.ModuleList([Block() for _ in range(layers)])
            self.ln_f = nn.LayerNorm(hidden)
            self.head = nn.Linear(hidden, vocab, bias=False)
            if tied:
                self.head.weight = self.tok.weight

        def forward(self, idx):
            s = idx.shape[1]
            pos = torch.arange(s, device=idx.device)
            x = self.drop(self.tok(idx) + self.pos(pos))
            for blk in self.blocks:
                if checkpointing == "full":
                    # Keep only each block's input; recompute the block in backward.
                    x = checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
            return self.head(self.ln_f(x))

    return GPT()


def run_config(torch, cfg, args):
    hidden, layers, heads, vocab, batch, seq, precision, ckpt = cfg
    row = dict(
        model="gpt", layers=layers, hidden=hidden, heads=heads, vocab=vocab, batch=batch, seq=seq,
        precision=precision, checkpointing=ckpt, params="", baseline_bytes="", peak_allocated_bytes="",
        peak_reserved_bytes="", step_ms_median="", step_ms_p10="", step_ms_p90="", status="ok",
    )
    dev = torch.device("cuda")
    model = opt = scaler = None
    try:
        torch.manual_seed(0)
        model = build_model(torch, hidden, layers, heads, vocab, seq, args.tied, ckpt).to(dev)
        model.train()
        row["params"] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        amp_dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision)
        # fp16 needs loss scaling to train; bf16 does not (same as torch's recipes).
        if precision == "fp16-mixed":
            try:
                scaler = torch.amp.GradScaler("cuda")
            except (AttributeError, TypeError):
                scaler = torch.cuda.amp.GradScaler()

        idx = torch.randint(0, vocab, (batch, seq), device=dev)
        tgt = torch.randint(0, vocab, (batch, seq), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            if amp_dtype is not None:
                with torch.autocast("cuda", dtype=amp_dtype):
                    logits = model(idx)
            else:
                logits = model(idx)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), tgt.view(-1))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()

        # Make the optimizer states exist (AdamW allocates them lazily on the first step), then drop the
        # gradients: the baseline is weights + optimizer states, like the harness's.
        for _ in range(args.warmup):
            step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        row["baseline_bytes"] = torch.cuda.memory_allocated()

        # One measured step from the steady state.
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()

        times = []
        for _ in range(args.repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        row["step_ms_median"] = round(statistics.median(times), 3)
        row["step_ms_p10"] = round(percentile(times, 10), 3)
        row["step_ms_p90"] = round(percentile(times, 90), 3)
    except torch.cuda.OutOfMemoryError as e:
        row["status"] = "oom"
        print("  oom: %s" % (str(e).splitlines() or [""])[0][:200], file=sys.stderr)
    except RuntimeError as e:  # e.g. cuBLAS failing to allocate its workspace, reported as RuntimeError
        msg = str(e)
        row["status"] = "oom" if "out of memory" in msg.lower() else "error"
        print("  %s: %s" % (row["status"], (msg.splitlines() or [type(e).__name__])[0][:300]), file=sys.stderr)
    finally:
        del model, opt, scaler
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return row


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without any of --hidden/--layers/--heads/--batch/--seq/--precision/--checkpointing, "
        "runs the default list of %d configurations. With some of them, runs their cross product "
        "(each may be given several times)." % len(DEFAULT_CONFIGS),
    )
    p.add_argument("--out", default="torch_reference.csv", help="CSV file to write (default %(default)s)")
    p.add_argument("--hidden", type=int, action="append", help="hidden size h")
    p.add_argument("--layers", type=int, action="append", help="number of blocks L")
    p.add_argument("--heads", type=int, action="append", help="attention heads a (h must divide)")
    p.add_argument("--vocab", type=int, action="append", help="vocabulary V (default 32000)")
    p.add_argument("--batch", type=int, action="append", help="batch size b")
    p.add_argument("--seq", type=int, action="append", help="sequence length s")
    p.add_argument("--precision", choices=PRECISIONS, action="append", help="fp32 | bf16-mixed | fp16-mixed")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, action="append", help="none | full (per block)")
    p.add_argument("--tied", action="store_true", help="tie the LM head to the token embedding")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps before measuring (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    return p.parse_args(argv)


def configs_from_args(args):
    shape = [args.hidden, args.layers, args.heads, args.vocab, args.batch, args.seq, args.precision,
             args.checkpointing]
    if all(v is None for v in shape):
        return list(DEFAULT_CONFIGS)
    defaults = [[1024], [8], [16], [32000], [8], [1024], ["fp32"], ["none"]]
    axes = [v if v is not None else d for v, d in zip(shape, defaults)]
    import itertools

    return [c for c in itertools.product(*axes) if c[0] % c[2] == 0]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configs = configs_from_args(args)
    if args.list:
        for c in configs:
            print("h=%d L=%d a=%d V=%d b=%d s=%d %s ckpt=%s" % c)
        return 0
    if args.warmup < 1:
        print("torch_reference: --warmup must be >= 1 (AdamW creates its states on the first step)",
              file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("torch_reference: --repeats must be >= 1", file=sys.stderr)
        return 2

    import torch  # lazily: --help and --list work without torch

    if not torch.cuda.is_available():
        print("torch_reference: CUDA is not available to torch", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(0)
    print("torch %s, CUDA %s, %s" % (torch.__version__, torch.version.cuda, name), flush=True)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    t_all = time.time()
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        f.flush()
        for i, cfg in enumerate(configs, 1):
            t0 = time.time()
            row = run_config(torch, cfg, args)
            w.writerow(row)
            f.flush()  # a crash later keeps the rows so far
            gib = lambda v: ("%.2f GiB" % (v / 2**30)) if v != "" else "-"  # noqa: E731
            print(
                "[%d/%d] h=%d L=%d b=%d s=%d %s ckpt=%s: %s peak_alloc=%s reserved=%s step=%s ms (%.0f s)"
                % (i, len(configs), cfg[0], cfg[1], cfg[4], cfg[5], cfg[6], cfg[7], row["status"],
                   gib(row["peak_allocated_bytes"]), gib(row["peak_reserved_bytes"]),
                   row["step_ms_median"] or "-", time.time() - t0),
                flush=True,
            )
    print("wrote %s (%d configurations, %.0f s)" % (args.out, len(configs), time.time() - t_all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
