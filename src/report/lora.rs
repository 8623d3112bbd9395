//! The report's "Fine-tuning (LoRA)" section: the planner's fine-tuning plan
//! (`plan::finetune::terms` under the fitted table and the literature table) against the
//! measured fine-tuning rows, candle's and, when the report has PyTorch rows, peft's. These rows
//! are not in the fit (`fit::points::prepare`), so every score here is out of sample.

use crate::coeffs::Coefficients;
use crate::fit::metrics::Metrics;
use crate::harness::record::{Backend, Row, Status};
use crate::plan::finetune;
use crate::plan::memory::breakdown;
use serde::Serialize;
use std::collections::HashMap;

/// One measured fine-tuning row and its plans.
#[derive(Debug, Clone, Serialize)]
pub struct LoraRow {
    pub backend: String,
    pub config: String,
    pub trainable_measured: Option<u64>,
    pub trainable_planned: u64,
    pub measured: f64,
    pub fitted: f64,
    pub literature: f64,
    /// candle peak / PyTorch peak on the same configuration (candle rows with a torch twin)
    pub candle_over_torch: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoraSection {
    pub rows: Vec<LoraRow>,
    /// fitted-table errors per backend (`candle`, `torch`)
    pub fitted: Vec<(String, Metrics)>,
    pub literature: Vec<(String, Metrics)>,
}

fn pct(p: f64, m: f64) -> f64 {
    100.0 * (p - m) / m
}

fn config(r: &Row) -> String {
    format!(
        "{} L{} h{} b{} s{} {} {} {} r{} {}",
        r.model,
        r.layers,
        r.hidden,
        r.batch,
        r.seq,
        r.precision,
        r.attention,
        r.finetune.as_str(),
        r.lora_rank.unwrap_or(0),
        r.lora_targets
    )
}

fn planned(r: &Row, table: &Coefficients) -> anyhow::Result<(u64, f64)> {
    let model = r.model_spec()?;
    let train = r.planned_train_spec()?;
    let ft = r.finetune();
    let terms = finetune::terms(&model, &train, &ft)?;
    Ok((
        terms.params,
        breakdown(&terms, &model, &train, table).total as f64,
    ))
}

/// Scores the fine-tuning rows (candle's and PyTorch's); None without an ok one.
pub fn section(rows: &[Row], torch: &[Row], table: &Coefficients) -> Option<LoraSection> {
    let lit = Coefficients::literature();
    let ok = |r: &&Row| {
        r.status == Status::Ok && !r.finetune().is_plain() && r.peak_bytes.is_some_and(|p| p > 0)
    };
    // the whole configuration (precision, checkpointing, optimizer, ZeRO, the fine-tuning), so
    // a candle row meets its own PyTorch twin
    let key = super::pytorch::config_key;
    let torch_peak: HashMap<String, f64> = torch
        .iter()
        .filter(ok)
        .filter(|r| r.backend == Backend::Torch)
        .map(|r| (key(r), r.peak_bytes.unwrap_or(0) as f64))
        .collect();
    let mut out = Vec::new();
    for r in rows
        .iter()
        .chain(torch.iter().filter(|r| r.backend == Backend::Torch))
        .filter(ok)
    {
        let Ok((trainable, fitted)) = planned(r, table) else {
            continue;
        };
        let Ok((_, literature)) = planned(r, &lit) else {
            continue;
        };
        let measured = r.peak_bytes.unwrap_or(0) as f64;
        out.push(LoraRow {
            backend: r.backend.as_str().to_string(),
            config: config(r),
            trainable_measured: r.trainable_params,
            trainable_planned: trainable,
            measured,
            fitted,
            literature,
            candle_over_torch: (r.backend == Backend::Candle)
                .then(|| torch_peak.get(&key(r)).map(|t| measured / t))
                .flatten(),
        });
    }
    if out.is_empty() {
        return None;
    }
    let metrics = |pick: fn(&LoraRow) -> f64| -> Vec<(String, Metrics)> {
        ["candle", "torch"]
            .iter()
            .filter_map(|b| {
                let errs: Vec<f64> = out
                    .iter()
                    .filter(|x| x.backend == *b)
                    .map(|x| pct(pick(x), x.measured))
                    .collect();
                (!errs.is_empty()).then(|| (b.to_string(), Metrics::from_errors(&errs)))
            })
            .collect()
    };
    Some(LoraSection {
        fitted: metrics(|x| x.fitted),
        literature: metrics(|x| x.literature),
        rows: out,
    })
}

/// The section's Markdown.
pub fn markdown(s: &LoraSection) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "\n## Fine-tuning (LoRA)\n\nLoRA and QLoRA rows are not in the fit: each is planned with the planner's LoRA plan (`plan::finetune`: frozen base in the compute dtype, or NF4 for QLoRA's block linears, adapter states, adapter activations less the inputs frozen linears no longer save) under the fitted table and the literature table, and scored against its measured peak. candle runs the frozen base as plain tensors (QLoRA: NF4 codes dequantized for each use, `harness/layers/nf4.rs`) and the adapters as variables in the weights' dtype (`harness/layers/lora.rs`); PyTorch runs peft's `get_peft_model`, whose adapters stay fp32 over a 16-bit base, so each adapted linear keeps its own cast copy of its input (planned so: `Finetune::adapter_input`; QLoRA needs bitsandbytes on CUDA: refused on a CPU).\n\n| backend | fitted MAPE | fitted max abs | literature MAPE | n |\n|---|---|---|---|---|\n",
    );
    for ((b, f), (_, l)) in s.fitted.iter().zip(&s.literature) {
        let _ = writeln!(
            out,
            "| {b} | {:.2} % | {:.2} % | {:.2} % | {} |",
            f.mape, f.max_abs_pct, l.mape, f.n
        );
    }
    out.push_str("\n| backend | configuration | trainable (measured / planned) | measured MB | fitted plan err | literature plan err | candle / PyTorch |\n|---|---|---|---|---|---|---|\n");
    for r in &s.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} | {:.2} | {:+.1} % | {:+.1} % | {} |",
            r.backend,
            r.config,
            r.trainable_measured
                .map_or("n/a".to_string(), |t| t.to_string()),
            r.trainable_planned,
            r.measured / 1e6,
            pct(r.fitted, r.measured),
            pct(r.literature, r.measured),
            r.candle_over_torch
                .map_or(String::new(), |x| format!("{x:.3}"))
        );
    }
    out
}
