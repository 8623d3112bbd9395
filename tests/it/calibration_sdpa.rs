//! The committed CPU calibration carries fused-attention (sdpa) points, and its fitted table
//! predicts them: the measured rows are read through the CSV reader (`record::read`) and re-planned with
//! the committed table, as `vramcal estimate --coeffs calibration/cpu-amd-epyc.json` would.

use std::path::Path;
use vramcal::coeffs::Coefficients;
use vramcal::harness::record::{self, Status};
use vramcal::plan::memory::{breakdown, fit_terms};
use vramcal::spec::Attention;

#[test]
fn the_committed_table_predicts_the_committed_sdpa_points() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rows =
        record::latest(record::read(&root.join("calibration/data/cpu-amd-epyc.csv")).unwrap());
    let table = Coefficients::load(&root.join("calibration/cpu-amd-epyc.json")).unwrap();
    // every sdpa row, sdpa's CPU math path in half precision included (attention dropout on:
    // fp32 scores, planned as `Attention::Math`)
    let sdpa: Vec<_> = rows
        .iter()
        .filter(|r| r.attention == Attention::Sdpa && r.status == Status::Ok)
        .collect();
    let upcast = sdpa
        .iter()
        .filter(|r| {
            let planned = r.planned_train_spec().unwrap();
            planned.attention == Attention::Math && planned.precision.compute_bytes() == 2
        })
        .count();
    assert!(upcast >= 2, "{upcast} math-path rows in half precision");
    assert!(sdpa.len() >= 10, "{} sdpa points", sdpa.len());
    let mut errors = Vec::new();
    let mut fused = 0;
    for r in &sdpa {
        // planned with the kernels that ran: on a CPU, sdpa with attention dropout is PyTorch's
        // math path (`Attention::kernels_on`), as the fit plans it
        let (m, t) = (r.model_spec().unwrap(), r.planned_train_spec().unwrap());
        let terms = fit_terms(&m, &t).unwrap();
        if t.attention == Attention::Sdpa {
            assert!(terms.features.fused_attention_bytes > 0.0);
            fused += 1;
        }
        let peak = r.peak_bytes.unwrap() as f64;
        let err = 100.0 * (breakdown(&terms, &m, &t, &table).total as f64 - peak) / peak;
        eprintln!(
            "{} b{} s{} {}: {err:+.2} %",
            r.model, r.batch, r.seq, r.precision
        );
        // per-element coefficients shared by GELU and SwiGLU blocks: within 25 % in sample
        // (measured: -14 % to +10 %, the worst tiny-gpt b4 s512 fp32)
        assert!(
            err.abs() < 25.0,
            "{} b{} s{} {}: {err:+.2} %",
            r.model,
            r.batch,
            r.seq,
            r.precision
        );
        errors.push(err.abs());
    }
    assert!(fused >= 5, "{fused} points ran fused attention");
    let mape = errors.iter().sum::<f64>() / errors.len() as f64;
    assert!(mape < 10.0, "sdpa in-sample MAPE {mape:.2} %");
    // and the fit's own in-sample residuals of the modes holding them are reasonable
    let residuals = table.residuals.clone().unwrap();
    for mode in ["transformer/fp32", "transformer/fp16-mixed"] {
        let m = residuals[mode]["in_sample_memory"]["mape"]
            .as_f64()
            .unwrap();
        assert!(m < 10.0, "{mode}: in-sample MAPE {m:.2} %");
    }
}
