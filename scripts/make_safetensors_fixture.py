# tests/checkpoints/llama-tiny: a tiny tied-embedding Llama saved by transformers' save_pretrained
# (safetensors 0.8, bf16), so the reader is checked against the format's own writer.
import torch, sys
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True)
m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1], safe_serialization=True)
print(sum(p.numel() for p in m.parameters()))
