"""Parameter counts of tests/hf_configs/<name>/config.json as transformers counts them.

Builds each config's transformers class on the meta device (no weights are allocated) and prints
`name count`, the sum of p.numel() over model.parameters() (tied weights once): the figures
tests/it/param_counts.rs expects. Decoders are built as *ForCausalLM, encoders as the bare model.

    python scripts/count_hf_params.py [name ...]
"""
import json, pathlib, sys

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "hf_configs"
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "vit", "distilbert", "electra"}


def count(directory: pathlib.Path) -> int:
    raw = json.loads((directory / "config.json").read_text())
    cfg = AutoConfig.for_model(**raw)
    auto = AutoModel if raw["model_type"] in ENCODERS else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


names = sys.argv[1:] or sorted(p.name for p in ROOT.iterdir() if (p / "config.json").exists())
for name in names:
    print(name, count(ROOT / name), flush=True)
