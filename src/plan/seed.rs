//! The common rule of thumb, kept as a named baseline so users see how far it is from vramcal:
//! `VRAM = params x 4 B x 3 + batch x seq x hidden x 10 B`.
//!
//! For CNNs the rule has no seq or hidden; the analogue used here maps seq to the input pixels
//! (image x image) and hidden to the output channels of the first conv, i.e. the width of the first
//! feature map per pixel: `params x 12 + batch x image^2 x c_first x 10`.

use crate::spec::cnn::CnnLayer;
use crate::spec::{ModelSpec, TrainSpec};

/// Bytes predicted by the rule of thumb for one GPU (no ZeRO, no precision or checkpointing).
pub fn seed_bytes(model: &ModelSpec, params: u64, train: &TrainSpec) -> u64 {
    let states = params.saturating_mul(12);
    let (tokens, width) = match model {
        ModelSpec::Transformer(t) => (t.effective_seq(train.seq, train.image), t.hidden),
        ModelSpec::Cnn(c) => (train.image * train.image, first_conv_channels(&c.layers)),
    };
    states.saturating_add(
        train
            .batch
            .saturating_mul(tokens)
            .saturating_mul(width)
            .saturating_mul(10),
    )
}

fn first_conv_channels(layers: &[CnnLayer]) -> u64 {
    layers
        .iter()
        .find_map(|l| match l {
            CnnLayer::Conv { c_out, .. } => Some(*c_out),
            CnnLayer::Residual { body, .. } => Some(first_conv_channels(body)).filter(|&c| c > 0),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::presets::preset;

    #[test]
    fn bert_base_example() {
        let m = preset("bert-base").unwrap();
        let train = TrainSpec {
            batch: 32,
            seq: 512,
            ..TrainSpec::default()
        };
        assert_eq!(
            seed_bytes(&m, 109_482_240, &train),
            109_482_240 * 12 + 32 * 512 * 768 * 10
        );
    }

    #[test]
    fn cnn_analogue_uses_first_conv_width() {
        let m = preset("resnet50").unwrap();
        let train = TrainSpec {
            batch: 2,
            image: 224,
            ..TrainSpec::default()
        };
        assert_eq!(seed_bytes(&m, 10, &train), 120 + 2 * 224 * 224 * 64 * 10);
    }
}
