//! Sweep grids: a TOML file describing sets of configurations, expanded into an ordered list of
//! points (model shape + training configuration).
//!
//! # Format
//! ```toml
//! # optional, per point: steps before measuring, measured steps, RNG seed
//! warmup = 1
//! repeats = 3
//! seed = 0
//!
//! [[point_set]]
//! model = "tiny-gpt"          # a preset name (`vramcal estimate --help` lists them)
//! dropout = 0.0               # optional: transformer dropout of every site (default: the
//!                             #   architecture's)
//! layers = [2, 4]             # optional shape overrides, a number or a list (each value is a
//! hidden = [64, 128]          #   grid axis): layers, hidden, heads, ffn, vocab (transformers),
//!                             #   width (CNNs: first-stage channels of the ResNet/VGG builder)
//! batch = [1, 4, 16]
//! seq = [32, 128, 512]        # text transformers; default [128]
//! # image = [32, 64]          # CNNs and ViTs instead of seq; default: CNN 32, ViT the preset's
//! precision = ["fp32", "bf16-mixed"]          # default ["fp32"]
//! checkpointing = ["none", "full"]            # default ["none"]
//! optimizer = ["adamw", "sgd-momentum"]       # default ["adamw"]
//! zero = [[0, 1], [3, 4]]                     # [stage, gpus] pairs; default [[0, 1]]
//! attention = ["eager", "sdpa"]               # transformers; default ["eager"]
//! optimizer_impl = ["loop", "foreach"]        # default ["loop"]; candle runs loop only, the
//!                                             #   torch backend all three (loop, foreach, fused)
//! finetune = ["full", "lora"]                 # default ["full"]; what is trained
//! lora_rank = [8, 16]                         # lora points only; default [16]
//! lora_targets = ["all", "attn"]              # lora points only; default ["all"]; as
//!                                             #   `estimate --lora-targets` (attn, mlp, all,
//!                                             #   or "q,v"-style lists)
//! lora_dropout = 0.0                          # optional: peft lora_dropout (default 0)
//! ```
//! Unknown keys are errors (a typo must not silently shrink a calibration grid).
//!
//! # Order
//! Point sets in file order; within a set the cartesian product with the shape axes outermost
//! (layers, hidden, heads, ffn, vocab, width), then precision, checkpointing, optimizer, zero,
//! attention, optimizer_impl, batch, seq/image, and innermost finetune (a full point once, each
//! lora point per lora_rank, then lora_targets). The order is deterministic so a resumed sweep and a fresh one
//! visit the same points in the same order.
//!
//! # Input dimensions
//! Every point has both `seq` and `image`; the one a model does not use is set to 1, except ViT
//! whose `seq` is the token count its image gives (patches + class token), so CSV columns mean
//! what they say.

use crate::error::input_err;
use crate::plan::finetune::{resolve_targets, Finetune, FinetuneMode};
use crate::spec::cnn::{resnet, vgg16, CnnLayer};
use crate::spec::presets::preset;
use crate::spec::{
    Attention, Checkpointing, ModelSpec, Optimizer, OptimizerImpl, Precision, TrainSpec,
};
use anyhow::Context;
use serde::Deserialize;
use std::path::Path;

/// A number or a list of numbers in the TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u64),
    Many(Vec<u64>),
}

fn axis(v: &Option<OneOrMany>) -> Vec<Option<u64>> {
    match v {
        None => vec![None],
        Some(OneOrMany::One(x)) => vec![Some(*x)],
        Some(OneOrMany::Many(xs)) => xs.iter().map(|x| Some(*x)).collect(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    #[serde(default = "default_warmup")]
    warmup: u32,
    #[serde(default = "default_repeats")]
    repeats: u32,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    point_set: Vec<PointSet>,
}

fn default_warmup() -> u32 {
    1
}
fn default_repeats() -> u32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointSet {
    model: String,
    layers: Option<OneOrMany>,
    hidden: Option<OneOrMany>,
    heads: Option<OneOrMany>,
    ffn: Option<OneOrMany>,
    vocab: Option<OneOrMany>,
    width: Option<OneOrMany>,
    batch: Vec<u64>,
    #[serde(default)]
    seq: Vec<u64>,
    #[serde(default)]
    image: Vec<u64>,
    #[serde(default)]
    precision: Vec<Precision>,
    #[serde(default)]
    checkpointing: Vec<Checkpointing>,
    #[serde(default)]
    optimizer: Vec<Optimizer>,
    #[serde(default)]
    zero: Vec<[u64; 2]>,
    #[serde(default)]
    attention: Vec<Attention>,
    #[serde(default)]
    optimizer_impl: Vec<OptimizerImpl>,
    /// Transformer dropout probability of every site (default: the architecture's, as
    /// transformers sets it): 0 gives GPT-2/BERT blocks whose sdpa runs fused on a CPU too
    dropout: Option<f32>,
    #[serde(default)]
    finetune: Vec<FinetuneMode>,
    #[serde(default)]
    lora_rank: Vec<u64>,
    #[serde(default)]
    lora_targets: Vec<String>,
    lora_dropout: Option<f32>,
}

/// One configuration to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub model: ModelSpec,
    pub train: TrainSpec,
    /// what is trained (full training unless the point set says `finetune`)
    pub finetune: Finetune,
}

impl Point {
    /// The fine-tuning part of the point's key ([`Finetune::key_suffix`]).
    pub fn finetune_key(&self) -> String {
        self.finetune
            .key_suffix(&self.finetune.targets_cell(&self.model))
    }
}

/// The fine-tuning configurations of a point set for one model, in grid order.
fn finetunes(
    set: &PointSet,
    model: &ModelSpec,
    train: &TrainSpec,
) -> anyhow::Result<Vec<Finetune>> {
    let modes = or_default(&set.finetune, FinetuneMode::Full);
    let lora = modes.iter().any(|m| *m != FinetuneMode::Full);
    if !lora
        && (!set.lora_rank.is_empty() || !set.lora_targets.is_empty() || set.lora_dropout.is_some())
    {
        return input_err(
            "lora_rank",
            "lora_rank, lora_targets and lora_dropout apply to adapters only; accepted with finetune = [\"lora\"]",
        );
    }
    let mut out = Vec::new();
    for &mode in &modes {
        if mode == FinetuneMode::Full {
            out.push(Finetune::default());
            continue;
        }
        let ModelSpec::Transformer(t) = model else {
            return input_err(
                "finetune",
                format!(
                    "{} applies to transformer blocks only; accepted full for CNNs",
                    mode.as_str()
                ),
            );
        };
        for &rank in &or_default(&set.lora_rank, 16) {
            for spec in &or_default(&set.lora_targets, "all".to_string()) {
                let ft = Finetune {
                    mode,
                    rank,
                    targets: resolve_targets(t, spec)?,
                    lora_dropout: set.lora_dropout.unwrap_or(0.0),
                    base_bits: if mode == FinetuneMode::Qlora { 4 } else { 16 },
                    ..Finetune::default()
                };
                ft.validate(model, train)?;
                out.push(ft);
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub warmup: u32,
    pub repeats: u32,
    pub seed: u64,
    pub points: Vec<Point>,
}

/// Shape overrides applied to a preset (shared by grids and `vramcal measure`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelOverrides {
    pub layers: Option<u64>,
    pub hidden: Option<u64>,
    pub heads: Option<u64>,
    pub ffn: Option<u64>,
    pub vocab: Option<u64>,
    /// CNN first-stage width (channels); the network is rebuilt with the same builder
    pub width: Option<u64>,
}

impl ModelOverrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Returns the preset reshaped. Transformer: `ffn` follows `hidden` proportionally unless
    /// given (4h stays 4h, Llama's 8/3-ish ratio stays), the grouped-query ratio heads/kv_heads is
    /// kept. CNN: only `width`, by rebuilding with the ResNet/VGG builder the preset came from.
    pub fn apply(&self, model: &ModelSpec) -> anyhow::Result<ModelSpec> {
        match model {
            ModelSpec::Transformer(t) => {
                if self.width.is_some() {
                    return input_err("width", "applies to CNNs only; accepted layers, hidden, heads, ffn, vocab for transformers");
                }
                let mut n = t.clone();
                if let Some(l) = self.layers {
                    n.layers = l;
                }
                if let Some(h) = self.hidden {
                    n.hidden = h;
                    n.ffn = (t.ffn * h).div_ceil(t.hidden.max(1));
                }
                if let Some(a) = self.heads {
                    let group = (t.heads / t.kv_heads.max(1)).max(1);
                    n.heads = a;
                    n.kv_heads = if a % group == 0 { a / group } else { a };
                }
                if let Some(f) = self.ffn {
                    n.ffn = f;
                }
                if let Some(v) = self.vocab {
                    if n.patch.is_some() {
                        return input_err(
                            "vocab",
                            "a ViT has no vocabulary; accepted layers, hidden, heads, ffn",
                        );
                    }
                    n.vocab = v;
                }
                n.validate()?;
                Ok(ModelSpec::Transformer(n))
            }
            ModelSpec::Cnn(c) => {
                if self.layers.is_some()
                    || self.hidden.is_some()
                    || self.heads.is_some()
                    || self.ffn.is_some()
                    || self.vocab.is_some()
                {
                    return input_err(
                        "model",
                        format!(
                            "{} is a CNN; accepted the shape override width only",
                            c.name
                        ),
                    );
                }
                let Some(w) = self.width else {
                    return Ok(model.clone());
                };
                crate::error::check_range("width", w, 1, 1 << 14)?;
                let rebuilt = if c.name.contains("resnet50") {
                    resnet(&c.name, [3, 4, 6, 3], true, w, c.classes)
                } else if c.name.contains("resnet18") {
                    resnet(&c.name, [2, 2, 2, 2], false, w, c.classes)
                } else if c.name.contains("vgg") {
                    // keep the classifier width of the preset (first linear layer's output)
                    let fc = c
                        .layers
                        .iter()
                        .find_map(|l| match l {
                            CnnLayer::Linear { d_out, .. } => Some(*d_out),
                            _ => None,
                        })
                        .unwrap_or(4096);
                    vgg16(&c.name, w, fc, c.classes)
                } else {
                    return input_err(
                        "width",
                        format!("{} has no known builder; accepted for resnet18, resnet50 and vgg presets", c.name),
                    );
                };
                Ok(ModelSpec::Cnn(rebuilt))
            }
        }
    }
}

/// The model with the point set's dropout probability, when it gives one (transformers only).
fn with_dropout(model: ModelSpec, dropout: Option<f32>) -> anyhow::Result<ModelSpec> {
    let Some(p) = dropout else {
        return Ok(model);
    };
    if !(0.0..1.0).contains(&p) {
        return input_err("dropout", format!("{p}; accepted 0 <= p < 1"));
    }
    match model {
        ModelSpec::Transformer(mut t) => {
            t.dropout = Some(crate::spec::transformer::DropoutP(p));
            Ok(ModelSpec::Transformer(t))
        }
        ModelSpec::Cnn(c) => input_err(
            "dropout",
            format!("{} is a CNN; accepted for transformer models only", c.name),
        ),
    }
}

/// Fills the input dimension a model does not use (see the module docs), and gives the used one
/// its default when not set: text seq 512, CNN image 224, ViT its preset image.
pub fn input_dims(model: &ModelSpec, seq: Option<u64>, image: Option<u64>) -> (u64, u64) {
    match model {
        ModelSpec::Transformer(t) => match &t.patch {
            Some(p) => {
                let image = image.unwrap_or(p.image);
                (p.seq_for(image), image)
            }
            None => (seq.unwrap_or(512), image.unwrap_or(1)),
        },
        ModelSpec::Cnn(_) => (seq.unwrap_or(1), image.unwrap_or(224)),
    }
}

fn or_default<T: Clone>(v: &[T], d: T) -> Vec<T> {
    if v.is_empty() {
        vec![d]
    } else {
        v.to_vec()
    }
}

/// Reads and expands a grid file. Every point is validated, so a bad grid fails before the
/// first (possibly long) measurement, naming the point set.
pub fn load(path: &Path) -> anyhow::Result<Grid> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return input_err(
                "grid",
                format!(
                    "cannot read {} ({e}); accepted a readable TOML file",
                    path.display()
                ),
            )
        }
    };
    parse_in(&text, Some(&path.display().to_string()))
}

/// Expands grid TOML text (see the module docs for the format).
pub fn parse(text: &str) -> anyhow::Result<Grid> {
    parse_in(text, None)
}

/// A TOML error in one line: toml's own Display is a multi-line source snippet, which breaks the
/// one-line error promise; the span gives line and column, the line's text the key.
fn toml_error(e: &toml::de::Error, text: &str, file: Option<&str>) -> anyhow::Error {
    let mut place = String::from("grid");
    if let Some(f) = file {
        place.push(' ');
        place.push_str(f);
    }
    if let Some(span) = e.span() {
        let start = span.start.min(text.len());
        let before = &text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..start].chars().count() + 1;
        place.push_str(&format!(" line {line} column {column}"));
        let line_text = text[line_start..].lines().next().unwrap_or("");
        if let Some((key, _)) = line_text.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && !key.starts_with('#') {
                place.push_str(&format!(" key {key}"));
            }
        }
    }
    let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    crate::error::InputError::new(
        place,
        format!("{msg}; accepted the format documented in src/harness/grid.rs"),
    )
    .into()
}

/// [`parse`], naming the grid file `path` in errors.
fn parse_in(text: &str, path: Option<&str>) -> anyhow::Result<Grid> {
    let name = path.map_or(String::new(), |f| format!("grid {f}: "));
    let file: GridFile = toml::from_str(text).map_err(|e| toml_error(&e, text, path))?;
    if file.repeats == 0 {
        return input_err("repeats", format!("{name}0; accepted 1 or more"));
    }
    let mut points = Vec::new();
    for (i, set) in file.point_set.iter().enumerate() {
        expand(set, &mut points)
            .with_context(|| format!("{name}point_set {} (model {})", i + 1, set.model))?;
    }
    if points.is_empty() {
        return input_err(
            "grid",
            format!("{name}has no points; accepted at least one [[point_set]] with a batch list"),
        );
    }
    Ok(Grid {
        warmup: file.warmup,
        repeats: file.repeats,
        seed: file.seed,
        points,
    })
}

fn expand(set: &PointSet, out: &mut Vec<Point>) -> anyhow::Result<()> {
    let base = preset(&set.model)?;
    if set.batch.is_empty() {
        return input_err("batch", "empty; accepted a list of batch sizes");
    }
    let uses_image = match &base {
        ModelSpec::Transformer(t) => t.patch.is_some(),
        ModelSpec::Cnn(_) => true,
    };
    if uses_image && !set.seq.is_empty() {
        return input_err(
            "seq",
            format!("{} takes images; accepted image = [...]", set.model),
        );
    }
    if !uses_image && !set.image.is_empty() {
        return input_err(
            "image",
            format!("{} takes tokens; accepted seq = [...]", set.model),
        );
    }
    let precisions = or_default(&set.precision, Precision::Fp32);
    let ckpts = or_default(&set.checkpointing, Checkpointing::None);
    let optims = or_default(&set.optimizer, Optimizer::AdamW);
    let zeros = or_default(&set.zero, [0, 1]);
    // eager: what the candle harness runs unless told otherwise
    let attentions = or_default(&set.attention, Attention::Eager);
    let impls = or_default(&set.optimizer_impl, OptimizerImpl::Loop);
    if !matches!(base, ModelSpec::Transformer(_)) && attentions.contains(&Attention::Sdpa) {
        return input_err(
            "attention",
            format!(
                "{} is a CNN; accepted attention = [\"eager\"] or none",
                set.model
            ),
        );
    }
    let inputs: Vec<(Option<u64>, Option<u64>)> = if uses_image {
        let default = match &base {
            ModelSpec::Cnn(_) => 32,
            ModelSpec::Transformer(t) => t.patch.map(|p| p.image).unwrap_or(224),
        };
        or_default(&set.image, default)
            .into_iter()
            .map(|i| (None, Some(i)))
            .collect()
    } else {
        or_default(&set.seq, 128)
            .into_iter()
            .map(|s| (Some(s), None))
            .collect()
    };
    for layers in axis(&set.layers) {
        for hidden in axis(&set.hidden) {
            for heads in axis(&set.heads) {
                for ffn in axis(&set.ffn) {
                    for vocab in axis(&set.vocab) {
                        for width in axis(&set.width) {
                            let ov = ModelOverrides {
                                layers,
                                hidden,
                                heads,
                                ffn,
                                vocab,
                                width,
                            };
                            let model = with_dropout(ov.apply(&base)?, set.dropout)?;
                            for &precision in &precisions {
                                for &checkpointing in &ckpts {
                                    for &optimizer in &optims {
                                        for &[stage, gpus] in &zeros {
                                            if stage > 3 {
                                                return input_err(
                                                    "zero",
                                                    format!(
                                                        "stage {stage}; accepted [stage 0-3, gpus]"
                                                    ),
                                                );
                                            }
                                            for &attention in &attentions {
                                                for &optimizer_impl in &impls {
                                                    for &batch in &set.batch {
                                                        for &(s, i) in &inputs {
                                                            let (seq, image) =
                                                                input_dims(&model, s, i);
                                                            let train = TrainSpec {
                                                                batch,
                                                                seq,
                                                                image,
                                                                precision,
                                                                optimizer,
                                                                checkpointing,
                                                                zero_stage: stage as u8,
                                                                gpus,
                                                                attention,
                                                                optimizer_impl,
                                                                grad_accum: 1,
                                                            };
                                                            model.validate_for(&train).with_context(|| {
                                                            format!("batch {batch} seq {seq} image {image}")
                                                        })?;
                                                            for finetune in
                                                                finetunes(set, &model, &train)?
                                                            {
                                                                out.push(Point {
                                                                    model: model.clone(),
                                                                    train: train.clone(),
                                                                    finetune,
                                                                });
                                                            }
                                                        }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_the_cartesian_product_in_order() {
        let g = parse(
            r#"
            repeats = 2
            [[point_set]]
            model = "tiny-gpt"
            layers = [2, 4]
            batch = [1, 2]
            seq = [32, 64]
            precision = ["fp32", "bf16-mixed"]
            zero = [[0, 1], [3, 4]]
            "#,
        )
        .unwrap();
        assert_eq!(g.points.len(), 2 * 2 * 2 * 2 * 2);
        assert_eq!((g.warmup, g.repeats), (1, 2));
        let first = &g.points[0];
        let ModelSpec::Transformer(t) = &first.model else {
            panic!()
        };
        assert_eq!(
            (
                t.layers,
                first.train.batch,
                first.train.seq,
                first.train.image
            ),
            (2, 1, 32, 1)
        );
        // innermost axis is seq, then batch
        assert_eq!(g.points[1].train.seq, 64);
        assert_eq!(g.points[2].train.batch, 2);
        assert_eq!(g.points[4].train.zero_stage, 3);
        assert_eq!(g.points[4].train.gpus, 4);
        assert_eq!(g.points[8].train.precision, Precision::Bf16Mixed);
        let ModelSpec::Transformer(last) = &g.points[31].model else {
            panic!()
        };
        assert_eq!(last.layers, 4);
    }

    #[test]
    fn hidden_override_scales_ffn_and_vit_seq_follows_image() {
        let g = parse(
            r#"
            [[point_set]]
            model = "tiny-llama"
            hidden = 256
            batch = [1]
            [[point_set]]
            model = "tiny-vit"
            image = [32]
            batch = [2]
            "#,
        )
        .unwrap();
        let ModelSpec::Transformer(t) = &g.points[0].model else {
            panic!()
        };
        assert_eq!((t.hidden, t.ffn, t.heads, t.kv_heads), (256, 688, 4, 2));
        assert_eq!(g.points[0].train.seq, 128);
        // tiny-vit patch 8: (32/8)^2 + 1 tokens
        assert_eq!((g.points[1].train.seq, g.points[1].train.image), (17, 32));
    }

    #[test]
    fn attention_axis_builds_sdpa_points() {
        let g = parse(
            r#"
            [[point_set]]
            model = "tiny-gpt"
            batch = [1, 2]
            seq = [64]
            attention = ["eager", "sdpa"]
            [[point_set]]
            model = "tiny-llama"
            batch = [1]
            "#,
        )
        .unwrap();
        let att: Vec<(u64, Attention)> = g
            .points
            .iter()
            .map(|p| (p.train.batch, p.train.attention))
            .collect();
        assert_eq!(
            att,
            vec![
                (1, Attention::Eager),
                (2, Attention::Eager),
                (1, Attention::Sdpa),
                (2, Attention::Sdpa),
                // default: eager
                (1, Attention::Eager),
            ]
        );
        for bad in [
            "[[point_set]]\nmodel = \"tiny-resnet18\"\nbatch = [1]\nattention = [\"sdpa\"]\n",
            "[[point_set]]\nmodel = \"tiny-gpt\"\nbatch = [1]\nattention = [\"ring\"]\n",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 2, "{bad}: {err:#}");
            assert_eq!(format!("{err:#}").lines().count(), 1, "{err:#}");
        }
    }

    #[test]
    fn cnn_width_rebuilds_the_network() {
        let g = parse("[[point_set]]\nmodel = \"tiny-resnet18\"\nwidth = [4, 8]\nbatch = [1]\n")
            .unwrap();
        let p4 = crate::plan::params::count(&g.points[0].model);
        let p8 = crate::plan::params::count(&g.points[1].model);
        assert_eq!(g.points[1].model, preset("tiny-resnet18").unwrap());
        assert!(p8 > 3 * p4, "{p4} {p8}");
        assert_eq!(g.points[0].train.image, 32);
    }

    #[test]
    fn typos_and_bad_values_are_input_errors() {
        for bad in [
            "[[point_set]]\nmodel = \"tiny-gpt\"\nbatch = [1]\nsqe = [3]\n",
            "[[point_set]]\nmodel = \"nope\"\nbatch = [1]\n",
            "[[point_set]]\nmodel = \"tiny-gpt\"\nbatch = [1]\nseq = [4096]\n",
            "[[point_set]]\nmodel = \"tiny-resnet18\"\nbatch = [1]\nseq = [4]\n",
            "[[point_set]]\nmodel = \"tiny-gpt\"\nbatch = [1]\nprecision = [\"fp8\"]\n",
            "repeats = 1\n",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 2, "{bad}: {err:#}");
            assert_eq!(format!("{err:#}").lines().count(), 1, "{err:#}");
        }
    }

    #[test]
    fn toml_errors_are_one_line_naming_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        for (text, want) in [
            (
                "[[point_set]]\nmodel = \"tiny-gpt\"\nbatch = [1]\nsqe = [8]\n",
                "line 4 column 1 key sqe",
            ),
            (
                "[[point_set]]\nmodel = \"tiny-gpt\"\nbatch = [\"one\"]\n",
                "line 3",
            ),
            ("warmup = = 1\n", "line 1"),
        ] {
            std::fs::write(&p, text).unwrap();
            let err = load(&p).unwrap_err();
            let msg = format!("{err:#}");
            assert_eq!(crate::error::exit_code(&err), 2, "{msg}");
            assert_eq!(msg.lines().count(), 1, "{msg}");
            assert!(
                msg.contains("g.toml") && msg.contains(want),
                "{want}: {msg}"
            );
        }
    }
}
