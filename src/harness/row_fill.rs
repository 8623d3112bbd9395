//! Filling a CSV row, the same for both backends: the columns that identify a point (device,
//! model shape, training settings, commit, time), the step-time quantiles of a measurement, and
//! telling a device out-of-memory error (a data point) from other failures.

use crate::harness::device::DeviceInfo;
use crate::harness::record::{Backend, Row, Status, SCHEMA};
use crate::spec::{ModelSpec, TrainSpec};

/// The git commit the binary came from: `VRAMCAL_GIT_COMMIT` at run time (the sweep passes its
/// own to children so they do not each run git), else at build time, else `git rev-parse` in the
/// source tree; empty when none is available.
pub fn git_commit() -> String {
    if let Ok(c) = std::env::var("VRAMCAL_GIT_COMMIT") {
        return c;
    }
    if let Some(c) = option_env!("VRAMCAL_GIT_COMMIT") {
        return c.to_string();
    }
    std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// UTC now as RFC 3339 to the second (`2026-01-31T12:00:00Z`).
pub fn timestamp_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A row with everything that identifies the point filled in and nothing measured yet
/// (status `error`, params from the planner's exact count). The sweep uses it for points that
/// never produced a row of their own (skipped, crashed, timed out).
pub fn row_template(info: &DeviceInfo, model: &ModelSpec, train: &TrainSpec) -> Row {
    let (layers, hidden, heads, ffn, vocab) = match model {
        ModelSpec::Transformer(t) => (t.layers, t.hidden, t.heads, t.ffn, t.vocab),
        ModelSpec::Cnn(c) => {
            // CNN shape columns: conv count as layers, first conv width as hidden, classes as vocab.
            fn convs(ls: &[crate::spec::cnn::CnnLayer], out: &mut Vec<u64>) {
                use crate::spec::cnn::CnnLayer;
                for l in ls {
                    match l {
                        CnnLayer::Conv { c_out, .. } => out.push(*c_out),
                        CnnLayer::Residual { body, shortcut } => {
                            convs(body, out);
                            convs(shortcut, out);
                        }
                        _ => {}
                    }
                }
            }
            let mut widths = Vec::new();
            convs(&c.layers, &mut widths);
            let first = widths.first().copied().unwrap_or(0);
            (widths.len() as u64, first, 0, 0, c.classes)
        }
    };
    Row {
        schema: SCHEMA,
        device_id: info.id.clone(),
        device_name: info.name.clone(),
        backend: Backend::Candle,
        driver: info.driver.clone(),
        vramcal_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit(),
        timestamp: timestamp_now(),
        model: model.name().to_string(),
        family: model.family(),
        layers,
        hidden,
        heads,
        ffn,
        vocab,
        batch: train.batch,
        seq: train.seq,
        image: train.image,
        precision: train.precision,
        checkpointing: train.checkpointing,
        optimizer: train.optimizer,
        zero_stage: train.zero_stage,
        gpus: train.gpus,
        params: crate::plan::params::count(model),
        baseline_bytes: None,
        peak_bytes: None,
        peak_reserved_bytes: None,
        nvml_bytes: None,
        memgetinfo_bytes: None,
        step_ms_median: None,
        step_ms_p10: None,
        step_ms_p90: None,
        repeats: 0,
        status: Status::Error,
        error: String::new(),
        spec_json: serde_json::to_string(model).expect("specs serialise"),
        attention: train.attention,
        device_kind: info.backend.clone(),
        optimizer_impl: train.optimizer_impl,
        saved_bytes: None,
        // full training until `Row::set_finetune` says otherwise
        finetune: Default::default(),
        lora_rank: None,
        lora_targets: String::new(),
        lora_dropout: None,
        freeze_layers: 0,
        trainable_params: None,
    }
}

/// True when an error chain says the device ran out of memory (candle wraps cudarc's
/// `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`; cuBLAS reports ALLOC_FAILED; Rust's
/// global allocator prints "memory allocation of N bytes failed" before it aborts).
pub fn is_oom_message(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out_of_memory")
        || m.contains("out of memory")
        || m.contains("cublas_status_alloc_failed")
        || m.contains("memory allocation failed")
        || (m.contains("memory allocation of") && m.contains("bytes failed"))
}

/// Linear-interpolated quantile of sorted values, q in [0, 1].
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Records the measured steps on an ok row: median, p10 and p90 of the step times (ms) and how
/// many there were (both backends).
pub fn set_step_times(row: &mut Row, times_ms: &[f64]) {
    let mut t = times_ms.to_vec();
    t.sort_by(f64::total_cmp);
    row.step_ms_median = Some(quantile(&t, 0.5));
    row.step_ms_p10 = Some(quantile(&t, 0.1));
    row.step_ms_p90 = Some(quantile(&t, 0.9));
    row.repeats = t.len() as u32;
    row.status = Status::Ok;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_seconds_now() {
        let before = chrono::Utc::now().timestamp();
        let t = timestamp_now();
        assert_eq!(t.len(), "2026-01-31T12:00:00Z".len(), "{t}");
        assert!(t.ends_with('Z'), "{t}");
        let parsed = chrono::DateTime::parse_from_rfc3339(&t)
            .unwrap()
            .timestamp();
        assert!((before..=before + 5).contains(&parsed), "{t}");
    }

    #[test]
    fn quantiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert!((quantile(&v, 0.1) - 1.4).abs() < 1e-12);
        assert!((quantile(&v, 0.9) - 4.6).abs() < 1e-12);
        assert_eq!(quantile(&[7.0], 0.9), 7.0);
    }

    #[test]
    fn oom_messages_are_recognised() {
        assert!(is_oom_message(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(is_oom_message(
            "memory allocation of 68719476736 bytes failed"
        ));
        assert!(!is_oom_message("shape mismatch in matmul"));
    }
}
