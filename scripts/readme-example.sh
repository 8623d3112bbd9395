#!/usr/bin/env bash
# Regenerates README.md's planning example from the binary's own output (the test
# readme_planning_example_is_the_binary_output fails until this is run after a model change).
# Usage: scripts/readme-example.sh [path/to/vramcal]   (default: cargo run's debug binary)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${1:-target/debug/vramcal}"
[[ -x "$BIN" ]] || cargo build --quiet
python3 - "$BIN" <<'PY'
import json, subprocess, sys
bin_ = sys.argv[1]
readme = open("README.md").read()
args = ["estimate", "--model", "llama2-7b", "--seq", "4096", "--precision", "bf16-mixed", "--zero", "2",
        "--gpus", "8", "--checkpointing", "full", "--gpu", "h100", "--max-batch"]
out = subprocess.run([bin_] + args, capture_output=True, text=True, check=True).stdout.rstrip("\n").split("\n")
host = out.index("Host RAM per training process")
choice = next(i for i, l in enumerate(out) if l.startswith("GPU choice"))
block = ("$ vramcal estimate --model llama2-7b --seq 4096 --precision bf16-mixed --zero 2 --gpus 8 \\\n"
         "      --checkpointing full --gpu h100 --max-batch\n"
         + "\n".join(out[:host - 1]) + "\n...\n" + "\n".join(out[choice:]) + "\n")
start = readme.index("$ vramcal estimate --model llama2-7b --seq 4096")
end = readme.index("```", start)
readme = readme[:start] + block + readme[end:]
js = json.loads(subprocess.run([bin_, "estimate", "--model", "bert-base", "--batch", "32", "--seq", "512",
                                "--precision", "fp32", "--optimizer", "adamw", "--json"],
                               capture_output=True, text=True, check=True).stdout)
m = js["memory"]
start = readme.index('{"params": 109482240')
end = readme.index("```", start)
readme = readme[:start] + (
    '{"params": %d, "memory": {"weights": %d, "gradients": %d, "optimizer": %d,\n'
    ' "activations": %d, "overhead": %d, "backward_overlap": %d, "total": %d, "too_large": false,\n'
    ' "cuda_context": %d, "nccl_buffers": %d, "reserved_peak": %d, "device_used": %d}, ...}\n'
    % (js["params"], m["weights"], m["gradients"], m["optimizer"], m["activations"], m["overhead"],
       m["backward_overlap"], m["total"], m["cuda_context"], m["nccl_buffers"], m["reserved_peak"],
       m["device_used"])) + readme[end:]
open("README.md", "w").write(readme)
PY
