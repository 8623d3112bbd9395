"""Parameter counts of tests/hf_configs/<name>/config.json as transformers counts them.

Builds each config's transformers class on the meta device (no weights are allocated) and prints
`name count`, the sum of p.numel() over model.parameters() (tied weights once): the figures
tests/it/param_counts.rs expects. Decoders are built as *ForCausalLM, BERT-family encoders and ViT as the bare model
(with BERT's pooler), DistilBERT/DeBERTa-v2 as *ForMaskedLM, ELECTRA as ElectraForPreTraining,
T5/mT5/BART and the vision-language wrappers (Gemma 3, PaliGemma, LLaVA, LLaVA-NeXT, Mistral 3,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Llama 4) as
*ForConditionalGeneration.
Mixture-of-experts configs (num_experts_per_tok) print a third figure, the parameters one token
uses: the total less, in every `*.experts` module, the (experts - top-k) experts it does not
route to (each expert's share is the module's parameters / experts).

    python scripts/count_hf_params.py [name ...]
"""
import json, pathlib, sys

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForMaskedLM, AutoModelForPreTraining, AutoModelForSeq2SeqLM)

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "hf_configs"
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "vit"}
# encoders trained with their pre-training head rather than bare: DistilBERT and DeBERTa-v2 as
# *ForMaskedLM, ELECTRA as its discriminator (ElectraForPreTraining)
WITH_HEAD = {"distilbert": AutoModelForMaskedLM, "deberta-v2": AutoModelForMaskedLM,
             "electra": AutoModelForPreTraining,
             # encoder-decoders as *ForConditionalGeneration: both stacks and the LM head
             "t5": AutoModelForSeq2SeqLM, "mt5": AutoModelForSeq2SeqLM, "bart": AutoModelForSeq2SeqLM,
             # vision-language wrappers as *ForConditionalGeneration: tower, projector, language
             # model and LM head
             "gemma3": AutoModelForImageTextToText, "paligemma": AutoModelForImageTextToText,
             "llava": AutoModelForImageTextToText, "llava_next": AutoModelForImageTextToText,
             "qwen2_vl": AutoModelForImageTextToText, "qwen2_5_vl": AutoModelForImageTextToText,
             "mistral3": AutoModelForImageTextToText, "qwen3_vl": AutoModelForImageTextToText,
             "qwen3_vl_moe": AutoModelForImageTextToText, "llama4": AutoModelForImageTextToText}


def count(directory: pathlib.Path) -> str:
    raw = json.loads((directory / "config.json").read_text())
    cfg = AutoConfig.for_model(**raw)
    auto = WITH_HEAD.get(raw["model_type"]) or (
        AutoModel if raw["model_type"] in ENCODERS else AutoModelForCausalLM)
    with torch.device("meta"):
        model = auto.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    # a vision-language wrapper's experts are its text model's
    moe = raw.get("text_config") if "num_experts_per_tok" in raw.get("text_config", {}) else raw
    k = moe.get("num_experts_per_tok")
    if not k:
        return str(total)
    experts = moe.get("num_local_experts") or moe.get("num_experts") or moe["n_routed_experts"]
    idle = sum(
        sum(p.numel() for p in mod.parameters()) // experts * (experts - k)
        for name, mod in model.named_modules()
        if name.endswith(".experts")
    )
    return f"{total} {total - idle}"


names = sys.argv[1:] or sorted(p.name for p in ROOT.iterdir() if (p / "config.json").exists())
for name in names:
    print(name, count(ROOT / name), flush=True)
