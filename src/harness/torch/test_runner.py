"""Tests of runner.py's pure-Python parts (no torch needed): which transformers class and config
a spec becomes, and what the backend refuses. Run: python3 -m unittest test_runner (the unit
tests of src/harness/torch/mod.rs do, from this directory)."""
import unittest

import runner

LLAMA = {"family": "transformer", "name": "t", "arch": "decoder", "layers": 2, "hidden": 64,
         "heads": 4, "kv_heads": 2, "ffn": 172, "ffn_kind": "swiglu", "vocab": 1000,
         "max_positions": 0, "type_vocab": 0, "norm": "rmsnorm", "bias": False,
         "qkv_bias": False, "tied_embeddings": False, "embedding_norm": False,
         "final_norm": True, "head": {"kind": "lm"}, "patch": None}
TRAIN = {"batch": 1, "seq": 128, "image": 1, "precision": "fp32", "optimizer": "adamw",
         "checkpointing": "none", "zero_stage": 0, "gpus": 1, "attention": "sdpa",
         "optimizer_impl": "loop"}


def req(model, block, dropout=0.0, activation="silu", **train):
    return {"model": model, "block": block, "dropout": dropout, "activation": activation,
            "train": dict(TRAIN, **train)}


class TransformerPlan(unittest.TestCase):
    def test_llama_with_gqa_keeps_kv_heads_and_attention(self):
        cls, cfg_cls, cfg, kw, task = runner.transformer_plan(req(LLAMA, "llama",
                                                                   attention="eager"))
        self.assertEqual((cls, cfg_cls, task), ("LlamaForCausalLM", "LlamaConfig", "lm"))
        self.assertEqual(cfg["num_key_value_heads"], 2)
        self.assertEqual(cfg["intermediate_size"], 172)
        self.assertEqual(cfg["attn_implementation"], "eager")
        self.assertFalse(cfg["tie_word_embeddings"])
        self.assertFalse(cfg["attention_bias"])

    def test_qkv_bias_only_is_qwen2(self):
        m = dict(LLAMA, qkv_bias=True)
        self.assertEqual(runner.transformer_plan(req(m, "llama"))[0], "Qwen2ForCausalLM")

    def test_gpt2_takes_dropout_and_activation(self):
        m = dict(LLAMA, ffn_kind="gelu", norm="layernorm", bias=True, kv_heads=4,
                 max_positions=256, tied_embeddings=True, ffn=256)
        cls, _, cfg, _, _ = runner.transformer_plan(req(m, "gpt2", 0.1, "gelu_new"))
        self.assertEqual(cls, "GPT2LMHeadModel")
        self.assertEqual((cfg["resid_pdrop"], cfg["attn_pdrop"], cfg["embd_pdrop"]),
                         (0.1, 0.1, 0.1))
        self.assertEqual(cfg["activation_function"], "gelu_new")
        self.assertEqual((cfg["n_inner"], cfg["n_positions"]), (256, 256))

    def test_bert_heads(self):
        m = dict(LLAMA, arch="encoder", ffn_kind="gelu", norm="layernorm", bias=True,
                 kv_heads=4, max_positions=512, type_vocab=2, head={"kind": "pooler"})
        cls, _, _, kw, task = runner.transformer_plan(req(m, "bert", 0.1, "gelu"))
        self.assertEqual((cls, kw, task), ("BertModel", {"add_pooling_layer": True}, "pooler"))
        m["head"] = {"kind": "classifier", "classes": 3}
        cls, _, cfg, _, task = runner.transformer_plan(req(m, "bert", 0.1, "gelu"))
        self.assertEqual((cls, cfg["num_labels"], task),
                         ("BertForSequenceClassification", 3, "classifier"))

    def test_vit(self):
        m = dict(LLAMA, arch="encoder", ffn_kind="gelu", norm="layernorm", bias=True,
                 kv_heads=4, vocab=0, head={"kind": "classifier", "classes": 10},
                 patch={"image": 64, "patch": 8, "channels": 3})
        cls, _, cfg, _, task = runner.transformer_plan(req(m, "vit", 0.0, "gelu"))
        self.assertEqual((cls, task), ("ViTForImageClassification", "image"))
        self.assertEqual((cfg["image_size"], cfg["patch_size"], cfg["num_labels"]), (64, 8, 10))

    def test_moe_is_mixtral_or_qwen2_moe(self):
        moe = {"experts": 8, "top_k": 2, "expert_ffn": 96}
        cls, _, cfg, _, task = runner.transformer_plan(req(dict(LLAMA, moe=moe), None))
        self.assertEqual((cls, task), ("MixtralForCausalLM", "lm"))
        self.assertEqual((cfg["num_local_experts"], cfg["num_experts_per_tok"],
                          cfg["intermediate_size"], cfg["output_router_logits"]),
                         (8, 2, 96, False))
        shared = dict(moe, shared_ffn=128, shared_gate=True, dense_layers=1)
        cls, _, cfg, _, _ = runner.transformer_plan(
            req(dict(LLAMA, qkv_bias=True, moe=shared), None))
        self.assertEqual(cls, "Qwen2MoeForCausalLM")
        self.assertEqual((cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"],
                          cfg["mlp_only_layers"], cfg["norm_topk_prob"], cfg["qkv_bias"]),
                         (96, 128, [0], True, True))
        # DeepSeek's ungated shared expert and expert parallelism are refused in one line
        for m in (dict(moe, shared_ffn=128), dict(moe, expert_parallel=2)):
            with self.assertRaises(runner.Refused) as e:
                runner.transformer_plan(req(dict(LLAMA, moe=m), None))
            self.assertNotIn("\n", str(e.exception))

    def test_unknown_block_is_refused_in_one_line(self):
        with self.assertRaises(runner.Refused) as e:
            runner.transformer_plan(req(LLAMA, None))
        self.assertTrue(str(e.exception).startswith("error: invalid model: "))
        self.assertNotIn("\n", str(e.exception))


class TrainChecks(unittest.TestCase):
    def test_zero_and_selective_with_sdpa_are_refused(self):
        for train, field in ((dict(TRAIN, zero_stage=2), "zero"),
                             (dict(TRAIN, checkpointing="selective", attention="sdpa"),
                              "checkpointing")):
            with self.assertRaises(runner.Refused) as e:
                runner.check_train(train, LLAMA)
            self.assertIn(f"invalid {field}:", str(e.exception))

    def test_cnn_checkpointing_is_refused(self):
        for mode in ("full", "selective"):
            with self.assertRaises(runner.Refused):
                runner.check_train(dict(TRAIN, checkpointing=mode), {"family": "cnn"})

    def test_supported_points_pass(self):
        runner.check_train(TRAIN, LLAMA)
        runner.check_train(dict(TRAIN, precision="bf16-mixed", checkpointing="full"), LLAMA)
        runner.check_train(dict(TRAIN, checkpointing="selective", attention="eager"), LLAMA)


if __name__ == "__main__":
    unittest.main()


class LoraTargets(unittest.TestCase):
    """vramcal's canonical LoRA targets -> the regex peft full-matches module names against."""

    def matches(self, block, targets, names):
        import re
        rx = runner.lora_target_regex(block, targets)
        return [n for n in names if re.fullmatch(rx, n)]

    def test_gpt2_tells_its_two_c_proj_apart(self):
        names = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                 "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
        self.assertEqual(self.matches("gpt2", ["qkv", "o"], names), names[:2])
        self.assertEqual(self.matches("gpt2", ["fc2"], names), names[3:])

    def test_bert_and_vit_tell_their_two_output_dense_apart(self):
        bert = ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.output.dense",
                "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense",
                "pooler.dense"]
        self.assertEqual(self.matches("bert", ["q", "o"], bert), bert[:2])
        self.assertEqual(self.matches("bert", ["fc2"], bert), [bert[3]])
        vit = ["vit.encoder.layer.0.attention.attention.value"]
        self.assertEqual(self.matches("vit", ["v"], vit), vit)

    def test_llama_and_refusals(self):
        names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
        self.assertEqual(self.matches("llama", ["q", "down"], names), names[:2])
        with self.assertRaises(runner.Refused):
            runner.lora_target_regex("llama", ["qkv"])
        with self.assertRaises(runner.Refused):
            runner.lora_target_regex(None, ["q"])
