//! A safetensors checkpoint's exact parameter count and dtypes, and its cross-check against
//! the count a config.json implies: which blocks or which tensors outside the blocks differ.
//!
//! The checkpoint is counted as transformers counts a model's parameters: tensors that are
//! buffers, not parameters (rotary `inv_freq`, `position_ids`, GPT-2's stored causal mask), are
//! listed apart, and an LM head stored beside the embedding it is tied to is counted once.

use crate::plan::params;
use crate::spec::safetensors::{Checkpoint, DtypeCount, Tensor};
use crate::spec::transformer::{Head, TransformerSpec};
use serde::Serialize;
use std::collections::BTreeMap;

/// What `estimate --safetensors` reports about the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    /// the files whose headers were read
    pub files: Vec<String>,
    /// tensors in the headers
    pub tensors: usize,
    /// parameters: elements of every tensor but the buffers and tied duplicates
    pub params: u64,
    /// elements and bytes per stored dtype (all tensors, as stored)
    pub by_dtype: Vec<DtypeCount>,
    /// tensors that are buffers, not parameters (not in `params`)
    pub buffers: Vec<String>,
    /// LM head tensors stored beside the embedding they are tied to (not in `params`)
    pub tied_duplicates: Vec<String>,
    /// the config's parameter count, when a config was read
    pub config_params: Option<u64>,
    /// whether the two counts agree (null without a config)
    pub matches_config: Option<bool>,
    /// where they disagree, one line each, naming the blocks and tensors
    pub differences: Vec<String>,
}

/// Buffers transformers registers that some checkpoints store: not parameters.
fn is_buffer(t: &Tensor) -> bool {
    let n = t.name.as_str();
    n.ends_with(".inv_freq")
        || n.ends_with("position_ids")
        || n.ends_with(".masked_bias")
        // DeepSeek-V3's router score correction and BART's logits bias: buffers in transformers
        || n.ends_with("e_score_correction_bias")
        || n.ends_with("final_logits_bias")
        // GPT-2's causal mask `attn.bias`, [1, 1, n_positions, n_positions]
        || (n.ends_with("attn.bias") && t.shape.len() == 4)
}

/// The block a tensor belongs to (`model.layers.3`), if any: the path up to the first index
/// that follows a block list's name.
fn block_of(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 1..parts.len() {
        let list = parts[i - 1];
        if matches!(list, "layers" | "layer" | "h" | "blocks" | "block")
            && parts[i].parse::<u64>().is_ok()
        {
            return Some(parts[..=i].join("."));
        }
    }
    None
}

fn describe(t: &Tensor) -> String {
    format!("{} {:?} {}", t.name, t.shape, t.dtype)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Counts the checkpoint, and with a spec compares it with the spec's exact count.
pub fn report(ck: &Checkpoint, spec: Option<&TransformerSpec>) -> CheckpointReport {
    let (buffers, rest): (Vec<&Tensor>, Vec<&Tensor>) =
        ck.tensors.iter().partition(|t| is_buffer(t));
    // a tied head stored anyway: `lm_head.weight` with the shape of an embedding tensor
    let tied = spec.is_some_and(|t| t.tied_embeddings && t.head == Head::Lm);
    let is_embedding = |t: &Tensor| {
        !t.name.ends_with("lm_head.weight")
            && (t.name.contains("embed")
                || t.name.contains("wte")
                || t.name.ends_with("shared.weight"))
    };
    let tied_dup: Vec<&Tensor> = if tied {
        rest.iter()
            .copied()
            .filter(|t| {
                t.name.ends_with("lm_head.weight")
                    && rest.iter().any(|e| is_embedding(e) && e.shape == t.shape)
            })
            .collect()
    } else {
        Vec::new()
    };
    let counted: Vec<&Tensor> = rest
        .into_iter()
        .filter(|t| !tied_dup.iter().any(|d| d.name == t.name))
        .collect();
    let total: u64 = counted.iter().map(|t| t.elems).sum();
    let mut out = CheckpointReport {
        files: ck.files.iter().map(|f| f.display().to_string()).collect(),
        tensors: ck.tensors.len(),
        params: total,
        by_dtype: ck.by_dtype(),
        buffers: buffers.iter().map(|t| describe(t)).collect(),
        tied_duplicates: tied_dup.iter().map(|t| describe(t)).collect(),
        config_params: None,
        matches_config: None,
        differences: Vec::new(),
    };
    if let Some(t) = spec {
        let p = params::transformer(t);
        out.config_params = Some(p.total);
        out.matches_config = Some(p.total == total);
        if p.total != total {
            out.differences = differences(&counted, t, &p);
        }
    }
    out
}

/// Where the checkpoint and the config disagree: the blocks whose tensors sum to neither a
/// dense nor an MoE block of the config (each distinct one named with its tensors, then how many
/// more sum the same), the number of blocks, and the tensors outside the blocks.
fn differences(
    counted: &[&Tensor],
    t: &TransformerSpec,
    p: &params::TransformerParams,
) -> Vec<String> {
    let mut blocks: BTreeMap<(String, u64), Vec<&Tensor>> = BTreeMap::new();
    let mut outside = Vec::new();
    for &tensor in counted {
        match block_of(&tensor.name) {
            Some(b) => {
                // numeric order of the block index, not text order
                let idx = b
                    .rsplit('.')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0);
                let prefix = b
                    .rsplit_once('.')
                    .map_or(String::new(), |(p, _)| p.to_string());
                blocks.entry((prefix, idx)).or_default().push(tensor);
            }
            None => outside.push(tensor),
        }
    }
    let mut lines = Vec::new();
    let mut allowed = Vec::new();
    if p.moe_layers < t.layers {
        allowed.push(p.block(false));
    }
    if p.moe_layers > 0 {
        allowed.push(p.block(true));
    }
    if p.decoder_layers > 0 {
        allowed.push(p.decoder_per_layer);
    }
    // T5 stores each stack's relative-position bias in its first block
    if p.rel_bias > 0 {
        let with_bias: Vec<u64> = allowed.iter().map(|n| n + p.rel_bias / 2).collect();
        allowed.extend(with_bias);
    }
    let allowed_text = allowed
        .iter()
        .map(|&n| thousands(n))
        .collect::<Vec<_>>()
        .join(" or ");
    // each distinct wrong block sum once, with how many blocks share it
    let mut wrong: BTreeMap<u64, (String, Vec<String>, u64)> = BTreeMap::new();
    for ((prefix, idx), ts) in &blocks {
        let sum: u64 = ts.iter().map(|t| t.elems).sum();
        if !allowed.contains(&sum) {
            let e = wrong.entry(sum).or_insert_with(|| {
                (
                    format!("{prefix}.{idx}"),
                    ts.iter().map(|t| describe(t)).collect(),
                    0,
                )
            });
            e.2 += 1;
        }
    }
    for (sum, (name, tensors, n)) in wrong {
        lines.push(format!(
            "block {name}{}: {} parameters in the checkpoint, {allowed_text} from the config; its tensors: {}",
            if n > 1 {
                format!(" (and {} more blocks alike)", n - 1)
            } else {
                String::new()
            },
            thousands(sum),
            tensors.join(", ")
        ));
    }
    if blocks.len() as u64 != t.layers + p.decoder_layers {
        lines.push(format!(
            "{} blocks in the checkpoint, {} in the config",
            blocks.len(),
            t.layers + p.decoder_layers
        ));
    }
    let outside_sum: u64 = outside.iter().map(|t| t.elems).sum();
    let outside_want = p.embedding - p.rel_bias + p.final_norm + p.head;
    if outside_sum != outside_want {
        lines.push(format!(
            "outside the blocks: {} parameters in the checkpoint, {} from the config (embeddings, final norm, head); the checkpoint's: {}",
            thousands(outside_sum),
            thousands(outside_want),
            outside.iter().map(|t| describe(t)).collect::<Vec<_>>().join(", ")
        ));
    }
    lines
}

/// The checkpoint section of `estimate`'s table.
pub fn render(r: &CheckpointReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let row = |o: &mut String, label: &str, value: String| {
        let _ = writeln!(o, "  {label:<28} {value}");
    };
    let _ = writeln!(
        o,
        "\nCheckpoint (safetensors headers: {} file(s), {} tensors)",
        r.files.len(),
        r.tensors
    );
    let vs = match (r.config_params, r.matches_config) {
        (Some(c), Some(true)) => format!(" (config: {}, equal)", thousands(c)),
        (Some(c), _) => format!(" (config: {}, DIFFERENT)", thousands(c)),
        _ => String::new(),
    };
    row(&mut o, "parameters", format!("{}{vs}", thousands(r.params)));
    for d in &r.by_dtype {
        row(
            &mut o,
            &format!("stored {}", d.dtype),
            format!(
                "{} elements, {:.2} GiB",
                thousands(d.elems),
                d.bytes as f64 / (1u64 << 30) as f64
            ),
        );
    }
    if !r.tied_duplicates.is_empty() {
        row(&mut o, "tied, counted once", r.tied_duplicates.join(", "));
    }
    if !r.buffers.is_empty() {
        row(
            &mut o,
            "buffers, not parameters",
            format!("{} tensors, e.g. {}", r.buffers.len(), r.buffers[0]),
        );
    }
    for d in &r.differences {
        row(&mut o, "differs", d.clone());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[u64]) -> Tensor {
        let elems = shape.iter().product();
        Tensor {
            name: name.into(),
            dtype: "F32".into(),
            shape: shape.to_vec(),
            elems,
            bytes: elems * 4,
        }
    }

    #[test]
    fn blocks_are_found_by_their_list_name() {
        assert_eq!(
            block_of("model.layers.12.mlp.experts.3.w1.weight").as_deref(),
            Some("model.layers.12")
        );
        assert_eq!(
            block_of("transformer.h.0.attn.c_attn.weight").as_deref(),
            Some("transformer.h.0")
        );
        assert_eq!(
            block_of("encoder.layer.7.output.dense.bias").as_deref(),
            Some("encoder.layer.7")
        );
        assert_eq!(block_of("model.embed_tokens.weight"), None);
    }

    #[test]
    fn buffers_are_not_parameters() {
        let ck = Checkpoint {
            files: vec![],
            tensors: vec![
                tensor("h.0.attn.bias", &[1, 1, 8, 8]),
                tensor("h.0.attn.c_attn.bias", &[12]),
                tensor("model.layers.0.self_attn.rotary_emb.inv_freq", &[4]),
            ],
        };
        let r = report(&ck, None);
        assert_eq!(r.params, 12);
        assert_eq!(r.buffers.len(), 2);
        assert_eq!(r.matches_config, None);
    }
}
