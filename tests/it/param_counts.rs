//! Exact parameter counts against published figures.

use vramcal::plan::params::count;
use vramcal::spec::presets::preset;

fn params(name: &str) -> u64 {
    count(&preset(name).unwrap())
}

#[test]
fn published_counts_are_exact() {
    // bert-base-uncased (BertModel), HF gpt2, torchvision vit_l_16, resnet18, resnet50, vgg16,
    // Llama-2-7b as reported by their model cards / torchvision docs.
    assert_eq!(params("bert-base"), 109_482_240);
    assert_eq!(params("gpt2"), 124_439_808);
    assert_eq!(params("vit-large-16"), 304_326_632);
    assert_eq!(params("resnet18"), 11_689_512);
    assert_eq!(params("resnet50"), 25_557_032);
    assert_eq!(params("vgg16"), 138_357_544);
    assert_eq!(params("llama2-7b"), 6_738_415_616);
}

#[test]
fn more_published_counts() {
    assert_eq!(params("bert-large"), 335_141_888);
    assert_eq!(params("gpt2-medium"), 354_823_168);
    assert_eq!(params("vit-base-16"), 86_567_656);
}

/// config.json families beyond the presets, counted exactly as transformers counts them. The
/// configs under tests/hf_configs/ were written by transformers' `AutoConfig.for_model` with each
/// model's published sizes, and the expected counts are `sum(p.numel())` of transformers' own
/// classes (RobertaModel, XLMRobertaModel, GPTNeoXForCausalLM, Phi3ForCausalLM,
/// GemmaForCausalLM, Starcoder2ForCausalLM, GPTBigCodeForCausalLM) built from them
/// on the meta device (transformers 5.24); they equal the model cards' figures.
/// The later families (Qwen3, Gemma2, Gemma3 text, OLMo2, Phi, OPT, GPT-J, Falcon, BLOOM, OLMo)
/// are hand-written configs of the published sizes, counted by scripts/count_hf_params.py the
/// same way (*ForCausalLM on the meta device, transformers 5.24); DistilBERT and DeBERTa-v3 as
/// *ForMaskedLM, ELECTRA-small as ElectraForPreTraining (the discriminator), the classes they are
/// pre-trained and fine-tuned from (DistilBERT's 66,985,530
/// is its model card's figure with the MLM head; the tiny DeBERTa-v2 has unshared c2p/p2c
/// position projections and a relative table of 2 x max_position_embeddings rows). T5, T5 v1.1,
/// mT5 and BART as *ForConditionalGeneration, both stacks; transformers 5 ties T5's and mT5's LM
/// head to the shared embedding whatever `tie_word_embeddings` says (so mT5-small is 172M here,
/// not transformers 4's 300M with its separate head). Granite-3.1-2B and SmolLM3-3B (Llama's
/// block; SmolLM3 ties its head by its config class's default) likewise. The vision-language
/// wrappers (Gemma-3-4B/27B-it, LLaVA-1.5-7B, LLaVA-v1.6-Mistral-7B, PaliGemma-3B-224, Qwen2-VL-7B,
/// Qwen2.5-VL-7B/3B, the Qwen files in their pre-transformers-5 layout, Pixtral-12B as LLaVA with
/// a Pixtral tower; Mistral-Small-3.1-24B is a hand-written file of its published sizes, untied)
/// are their
/// published config.json files, which leave most sub-config keys at the classes' defaults, counted
/// as *ForConditionalGeneration (tower, projector, language model); the cards state 4.3B, 27.4B,
/// 7.06B, 7.57B, 2.92B, 8.29B, 8.29B, 3.75B, 12.7B, 24.0B and (Qwen3-VL-8B) 8.77B. OLMo-3-7B,
/// Seed-OSS-36B (biased q, k, v, not o), ERNIE-4.5-0.3B (tied) and Helium-1-2B are hand-written
/// files of their published sizes, counted the same way (cards: 7.3B, 36B, 0.36B, 2B). So are
/// the published-peak configs (Llama 2 13B, Llama 3.2 3B, Llama 3.1 8B, StableLM-Alpha 3B as
/// GPT-NeoX, phi-1.5, bert-large as BertModel) and GLM-4-9B (glm, fused gate_up, biased q/k/v),
/// GLM-4-9B-0414 (glm4, sandwich norms), Aya Expanse 8B and Command R+ (cohere, one weight-only
/// LayerNorm per block; R+ with per-head q/k norms), Command R7B (cohere2) and StableLM 2 1.6B /
/// StableLM-3B-4E1T (LayerNorms with bias; 2's biased q/k/v): cards 13B, 3.21B, 8.03B, 3.6B,
/// 1.42B, 335M, 9.4B, 9.4B, 8.03B, 104B, 8.03B, 1.64B and 2.8B.
#[test]
fn hf_config_families_count_like_transformers() {
    let cases = [
        ("roberta-base", 124_645_632u64),
        ("xlm-roberta-base", 278_043_648),
        ("pythia-160m", 162_322_944),
        ("phi-3-mini", 3_821_079_552),
        ("gemma-2b", 2_506_172_416),
        ("starcoder2-3b", 3_030_371_328),
        ("gpt-bigcode-santacoder", 1_124_886_528),
        ("qwen3-0.6b", 596_049_920),
        ("gemma-2-2b", 2_614_341_888),
        ("gemma-3-1b", 999_885_952),
        ("olmo-2-1b", 1_484_916_736),
        ("phi-2", 2_779_683_840),
        ("opt-125m", 125_239_296),
        ("opt-350m", 331_196_416),
        ("gpt-j-6b", 6_050_882_784),
        ("falcon-7b", 6_921_720_704),
        ("bloom-560m", 559_214_592),
        ("olmo-1b", 1_176_764_416),
        ("distilbert-base", 66_985_530),
        ("electra-small-discriminator", 13_549_057),
        ("deberta-v3-base", 184_551_780),
        ("deberta-v2-tiny-unshared", 30_468),
        ("t5-small", 60_506_624),
        ("t5-v1_1-small", 60_511_616),
        ("mt5-small", 172_119_424),
        ("bart-base", 139_420_416),
        ("granite-3.1-2b", 2_533_531_648),
        ("smollm3-3b", 3_075_098_624),
        ("gemma-3-4b-it", 4_300_079_472),
        ("gemma-3-27b-it", 27_432_406_640),
        ("llava-1.5-7b", 7_063_427_072),
        ("llava-v1.6-mistral-7b", 7_566_747_648),
        ("paligemma-3b-pt-224", 2_923_466_480),
        ("qwen2-vl-7b", 8_291_375_616),
        ("qwen2.5-vl-7b", 8_292_166_656),
        ("qwen2.5-vl-3b", 3_754_622_976),
        ("pixtral-12b", 12_682_739_712),
        ("mistral-small-3.1-24b", 24_011_361_280),
        ("qwen3-vl-8b", 8_767_123_696),
        ("olmo-3-7b", 7_298_011_136),
        ("seed-oss-36b", 36_151_104_512),
        ("ernie-4.5-0.3b", 360_748_032),
        ("helium-1-2b", 2_254_563_840),
        ("llama-2-13b", 13_015_864_320),
        ("llama-3.2-3b", 3_212_749_824),
        ("llama-3.1-8b", 8_030_261_248),
        ("stablelm-base-alpha-3b", 3_637_321_728),
        ("phi-1_5", 1_418_270_720),
        ("bert-large-uncased-cls", 335_141_888),
        ("glm-4-9b-chat-hf", 9_399_951_360),
        ("glm-4-9b-0414", 9_400_279_040),
        ("aya-expanse-8b", 8_028_033_024),
        ("c4ai-command-r-plus", 103_810_674_688),
        ("c4ai-command-r7b-12-2024", 8_028_033_024),
        ("stablelm-2-1_6b", 1_644_515_328),
        ("stablelm-3b-4e1t", 2_795_443_200),
        // EXAONE-4.0-32B: the published config.json as TensorRT-LLM's exaone4 test quotes it
        // (its num_hidden_layers and sliding_window restored to the published 64 and 4096);
        // OLMo2's post-norms with per-head q/k norms. The card states 32.0B
        ("exaone-4.0-32b", 32_003_216_384),
    ];
    for (name, want) in cases {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/hf_configs")
            .join(name)
            .join("config.json");
        let spec = vramcal::spec::hf_config::load(&path).unwrap();
        let got = count(&vramcal::spec::ModelSpec::Transformer(spec));
        assert_eq!(got, want, "{name}");
    }
}

/// Mixture-of-experts configs (published sizes of Mixtral-8x7B, Qwen1.5-MoE-A2.7B,
/// Qwen3-30B-A3B, and a tiny Qwen2-MoE with dense blocks from `decoder_sparse_step` 2 and
/// `mlp_only_layers`): total parameters as transformers counts MixtralForCausalLM /
/// Qwen2MoeForCausalLM / Qwen3MoeForCausalLM on the meta device, and active parameters as
/// scripts/count_hf_params.py derives them from the built model's `experts` modules (transformers
/// 5.24). The model cards state 46.7B / 12.9B, 14.3B / 2.7B, 30.5B / 3.3B. DeepSeek-V2-Lite
/// (plain query projection, 1 dense block, 2 shared experts) and DeepSeek-V3 (query bottleneck,
/// 3 dense blocks, 1 shared expert) exercise latent attention; V3's card states 671B / 37B
/// (without its multi-token-prediction module, which transformers does not build). gpt-oss-20b and
/// -120b (biased q/k/v/o, per-head sink logits, biased fused experts and router; the cards state
/// 21B / 117B in all; their 3.6B / 5.1B active leave out the embeddings, which count here).
#[test]
fn moe_families_count_total_and_active_like_transformers() {
    let cases = [
        ("mixtral-8x7b", 46_702_792_704u64, 12_879_925_248u64),
        ("qwen1.5-moe-a2.7b", 14_315_784_192, 2_689_173_504),
        ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),
        ("qwen2-moe-tiny-mixed", 177_024, 164_736),
        ("deepseek-v2-lite", 15_706_484_224, 2_661_150_208),
        ("deepseek-v3", 671_026_404_352, 37_552_282_624),
        ("gpt-oss-20b", 20_914_757_184, 4_187_440_704),
        ("gpt-oss-120b", 116_829_156_672, 5_711_982_912),
        // Qwen3-VL-30B-A3B: Qwen3-30B-A3B's language model (30.5B / 3.35B above) with a
        // 0.54B vision tower and mergers, which every token's forward counts; the card states
        // 31.1B
        ("qwen3-vl-30b-a3b", 31_070_754_032, 3_891_664_112),
        // GLM-4.5-Air (hand-written, its published sizes): DeepSeek-V3's MoE layout under
        // grouped-query attention with biased q, k, v; the card's 106B / 12B leave out the
        // embeddings from the active count and add the multi-token-prediction layer
        // transformers does not build
        ("glm-4.5-air", 106_852_245_504, 13_424_123_904),
        // Llama 4 Scout and Maverick (their published files' sizes): a CLIP-like tower with a
        // pixel-shuffle adapter, 16 experts in every block or 128 in every second, one shared
        // expert; the cards state 109B / 17B and 400B / 17B (active without the embeddings)
        ("llama-4-scout-17b-16e", 108_641_793_536, 18_044_827_136),
        ("llama-4-maverick-17b-128e", 401_583_781_376, 18_056_623_616),
        // OLMoE-1B-7B-0924 (hand-written, its published sizes: 64 experts of 1024, top 8,
        // full-width q/k norms), Granite-3.1-3B-A800M (40 experts of 512, top 8, tied) and
        // Phi-3.5-MoE-instruct (its published config's keys: 16 experts of 6400, top 2,
        // LayerNorms with bias, biased q/k/v/o and LM head), counted by
        // scripts/count_hf_params.py (OlmoeForCausalLM, GraniteMoeForCausalLM,
        // PhimoeForCausalLM, transformers 5.24); the cards state 6.9B / 1.3B, 3.3B / 800M and
        // 41.9B / 6.6B
        ("olmoe-1b-7b-0924", 6_919_161_856, 1_282_017_280),
        ("granite-3.1-3b-a800m", 3_298_793_472, 882_874_368),
        ("phi-3.5-moe", 41_873_153_344, 6_640_999_744),
    ];
    for (name, total, active) in cases {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/hf_configs")
            .join(name)
            .join("config.json");
        let spec = vramcal::spec::hf_config::load(&path).unwrap();
        let p = vramcal::plan::params::transformer(&spec);
        assert_eq!((p.total, p.active), (total, active), "{name}");
    }
}
