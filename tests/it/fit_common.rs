//! Shared by the fit tests: synthetic measurement rows generated from known coefficients through
//! the planner's real feature functions (not a test file by itself; included with `mod`).

#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vramcal::coeffs::Coefficients;
use vramcal::harness::record::{Backend, Row, Status, SCHEMA};
use vramcal::plan::memory::{breakdown, fit_terms};
use vramcal::plan::time::step_flops;
use vramcal::spec::cnn::{resnet, vgg16};
use vramcal::spec::presets::preset;
use vramcal::spec::{Checkpointing, ModelSpec, Optimizer, Precision, TrainSpec};

/// The "true" device: coefficients deliberately unlike the literature values.
pub fn truth() -> Coefficients {
    let mut t = Coefficients::literature();
    t.device_id = "synthetic".into();
    for m in &mut t.modes {
        let half = m.precision.compute_bytes() == 2;
        let a = &mut m.activation;
        a.c_h.value = if half { 21.0 } else { 41.0 };
        a.c_f.value = if half { 5.5 } else { 11.0 };
        a.c_att.value = if half { 6.0 } else { 12.0 };
        a.c_dropout.value = if half { 4.0 } else { 8.0 };
        a.c_logits.value = if half { 14.0 } else { 9.0 };
        a.c_ckpt.value = if half { 3.0 } else { 5.0 };
        a.c_conv.value = if half { 3.5 } else { 6.0 };
        a.c_norm.value = if half { 7.0 } else { 14.0 };
        a.c_act.value = if half { 2.5 } else { 4.5 };
        a.c_pool.value = if half { 9.0 } else { 17.0 };
        a.c_input.value = if half { 8.0 } else { 4.0 };
        a.c_workspace.value = if half { 3.0 } else { 5.0 };
        // optimizer-step transients are fp32 (master weights, states) in every precision
        a.c_max_param.value = 10.0;
        // the fit keeps the 16-bit copy at its literature residency (see memfit::fit_linear)
        a.half_copy.value = if m.precision.is_mixed() { 1.0 } else { 0.0 };
        // PyTorch's lifetimes (activations freed layer by layer as gradients arrive), the fit's
        // prior for either backend
        a.grad_overlap.value = 1.0;
        // and its blocks are described by the per-feature coefficients above, not PyTorch's
        // measured ones: the fit must find the per-feature form the better one
        a.blocks.clear();
        m.overhead.frag.value = 0.04;
        m.overhead.const_bytes.value = 3.0e6;
        m.time.flops_per_s.value = if half { 2.0e10 } else { 5.0e10 };
        m.time.act_bytes_per_s.value = if half { 4.0e9 } else { 8.0e9 };
        m.time.state_bytes_per_s.value = 1.5e10;
        m.time.t0_s.value = 0.004;
        m.time.recompute_factor.value = 1.3;
    }
    t
}

pub fn row(model: &ModelSpec, train: &TrainSpec, peak: f64, step_s: f64, status: Status) -> Row {
    let terms = fit_terms(model, train).unwrap();
    Row {
        schema: SCHEMA,
        device_id: "synthetic".into(),
        device_name: "synthetic device".into(),
        backend: Backend::Candle,
        driver: String::new(),
        vramcal_version: "0.1.0".into(),
        git_commit: String::new(),
        timestamp: "2026-11-25T12:00:00Z".into(),
        model: model.name().into(),
        family: model.family(),
        layers: 0,
        hidden: 0,
        heads: 0,
        ffn: 0,
        vocab: 0,
        batch: train.batch,
        seq: train.seq,
        image: train.image,
        precision: train.precision,
        checkpointing: train.checkpointing,
        optimizer: train.optimizer,
        zero_stage: train.zero_stage,
        gpus: train.gpus,
        params: terms.params,
        baseline_bytes: Some((terms.states.fixed() * 0.6) as u64),
        peak_bytes: (status == Status::Ok).then_some(peak.round() as u64),
        peak_reserved_bytes: None,
        nvml_bytes: None,
        memgetinfo_bytes: None,
        step_ms_median: (status == Status::Ok).then_some(step_s * 1e3),
        step_ms_p10: None,
        step_ms_p90: None,
        repeats: 5,
        status,
        error: if status == Status::Ok {
            String::new()
        } else {
            "synthetic failure".into()
        },
        spec_json: serde_json::to_string(model).unwrap(),
        attention: train.attention,
        device_kind: "cpu".into(),
        optimizer_impl: train.optimizer_impl,
        saved_bytes: None,
        finetune: Default::default(),
        lora_rank: None,
        lora_targets: String::new(),
        lora_dropout: None,
        freeze_layers: 0,
        trainable_params: None,
    }
}

/// The configurations of a realistic tiny-model CPU grid.
pub fn grid() -> Vec<(ModelSpec, TrainSpec)> {
    let mut out = Vec::new();
    let transformers = ["tiny-gpt", "tiny-bert", "tiny-llama", "tiny-vit"];
    let cnns = ["tiny-resnet18", "tiny-vgg", "tiny-resnet50"];
    for prec in [Precision::Fp32, Precision::Bf16Mixed] {
        for opt in [Optimizer::AdamW, Optimizer::Sgd] {
            for name in transformers.iter().chain(&["tiny-gpt-ffn2"]) {
                // A GPT with ffn = 2h: with only ffn = 4h (and Llama's 2.7h) the b*s*h and b*s*f
                // columns are nearly collinear; a calibration grid needs an ffn/h variant.
                let m = if *name == "tiny-gpt-ffn2" {
                    let ModelSpec::Transformer(t) = preset("tiny-gpt").unwrap() else {
                        unreachable!()
                    };
                    ModelSpec::Transformer(vramcal::spec::TransformerSpec {
                        name: name.to_string(),
                        ffn: 256,
                        ..t
                    })
                } else {
                    preset(name).unwrap()
                };
                let name = *name;
                let is_vit = name == "tiny-vit";
                for batch in [1, 2, 4, 8, 16, 32] {
                    let lens: &[u64] = if is_vit {
                        &[32, 64]
                    } else {
                        &[32, 64, 128, 256, 512]
                    };
                    for &len in lens {
                        for ck in [Checkpointing::None, Checkpointing::Full] {
                            out.push((
                                m.clone(),
                                TrainSpec {
                                    batch,
                                    seq: if is_vit { 512 } else { len },
                                    image: if is_vit { len } else { 224 },
                                    precision: prec,
                                    optimizer: opt,
                                    checkpointing: ck,
                                    ..TrainSpec::default()
                                },
                            ));
                        }
                    }
                }
            }
            // Several widths per architecture: within one network every CNN feature grows as
            // b x image^2, so only different shapes separate the per-op-kind coefficients.
            let shaped = cnns.iter().flat_map(|name| {
                [4u64, 8, 16].map(move |w| match *name {
                    "tiny-resnet18" => resnet(name, [2, 2, 2, 2], false, w, 10),
                    "tiny-resnet50" => resnet(name, [3, 4, 6, 3], true, w, 10),
                    _ => vgg16(name, w, 16 * w, 10),
                })
            });
            for c in shaped {
                let m = ModelSpec::Cnn(c);
                for batch in [1, 2, 4, 8] {
                    for image in [32, 64, 96] {
                        out.push((
                            m.clone(),
                            TrainSpec {
                                batch,
                                image,
                                precision: prec,
                                optimizer: opt,
                                ..TrainSpec::default()
                            },
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Rows measured on the synthetic device with multiplicative noise of `noise` (relative sd).
pub fn synthetic_rows(noise: f64, seed: u64) -> Vec<Row> {
    synthetic_rows_of(&truth(), noise, seed)
}

/// Rows measured on the device `truth` describes, with multiplicative noise of `noise`.
pub fn synthetic_rows_of(truth: &Coefficients, noise: f64, seed: u64) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gauss = move || {
        // Box-Muller: the test needs Gaussian noise without another dependency.
        let u1: f64 = rng.gen_range(1e-12..1.0);
        let u2: f64 = rng.gen_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    grid()
        .into_iter()
        .map(|(m, t)| {
            let terms = fit_terms(&m, &t).unwrap();
            let peak = breakdown(&terms, &m, &t, truth).total as f64 * (1.0 + noise * gauss());
            let mode = truth.mode(m.family(), t.precision);
            let f = step_flops(&m, &t).unwrap();
            let factor = if t.checkpointing.is_on() {
                mode.time.recompute_factor.value
            } else {
                1.0
            };
            let tc = &mode.time;
            let repeated = f.total() / tc.flops_per_s.value
                + f.activation_traffic_bytes / tc.act_bytes_per_s.value;
            let once = f.state_traffic_bytes / tc.state_bytes_per_s.value + tc.t0_s.value;
            let time = (repeated * factor + once) * (1.0 + noise * gauss());
            row(&m, &t, peak, time, Status::Ok)
        })
        .collect()
}
