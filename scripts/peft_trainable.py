#!/usr/bin/env python3
"""Trainable-parameter counts of LoRA adapters as peft counts them, for the planner's tests.

For each tests/hf_configs/lora-*/config.json, builds transformers' own model class on the meta
device (AutoModelForCausalLM for decoders, AutoModel for BERT, as vramcal counts them), wraps it
with peft's LoRA for several ranks and target sets, and writes peft's
`get_nb_trainable_parameters()` to expected_lora.json beside the config. vramcal's target names map
to each architecture's module names below; `all` is every linear of the blocks (not the LM head or
BERT's pooler). Run with a Python that has torch, transformers and peft: python3 scripts/peft_trainable.py
"""
import json
import pathlib

import peft
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "hf_configs"

# vramcal target set -> peft target_modules (regex on the full module name, blocks only)
TARGETS = {
    "llama": {
        "all": r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        "attn": r".*layers\.\d+\.self_attn\.(q|k|v|o)_proj",
        "mlp": r".*layers\.\d+\.mlp\.(gate|up|down)_proj",
        "q,v": r".*layers\.\d+\.self_attn\.(q|v)_proj",
    },
    "gpt2": {
        "all": r".*h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
        "attn": r".*h\.\d+\.attn\.(c_attn|c_proj)",
        "mlp": r".*h\.\d+\.mlp\.(c_fc|c_proj)",
        "qkv": r".*h\.\d+\.attn\.c_attn",
    },
    "bert": {
        "all": r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
        "attn": r".*layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": r".*layer\.\d+\.(intermediate\.dense|output\.dense)",
        "q,v": r".*layer\.\d+\.attention\.self\.(query|value)",
    },
}
RANKS = [1, 8, 16]


def main():
    for d in sorted(ROOT.glob("lora-*")):
        cfg = AutoConfig.from_pretrained(d)
        cls = AutoModel if cfg.model_type == "bert" else AutoModelForCausalLM
        rows = []
        for targets, regex in TARGETS[cfg.model_type].items():
            for r in RANKS:
                with torch.device("meta"):
                    model = cls.from_config(cfg)
                total = sum(p.numel() for p in model.parameters())
                lora = peft.LoraConfig(r=r, target_modules=regex, lora_dropout=0.0, bias="none")
                pm = peft.get_peft_model(model, lora)
                trainable, all_params = pm.get_nb_trainable_parameters()
                rows.append({"targets": targets, "rank": r, "trainable": trainable,
                             "all": all_params, "base": total})
        out = {
            "source": f"peft {peft.__version__} get_nb_trainable_parameters(), transformers "
                      f"{transformers.__version__}, torch {torch.__version__}; "
                      "scripts/peft_trainable.py",
            "model_class": "AutoModel" if cls is AutoModel else "AutoModelForCausalLM",
            "cases": rows,
        }
        (d / "expected_lora.json").write_text(json.dumps(out, indent=1) + "\n")
        print(d.name, json.dumps(rows))


if __name__ == "__main__":
    main()
