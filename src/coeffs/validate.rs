//! Where a coefficient table enters or leaves (loading a file, saving a fit): every value checked
//! against its physical range, naming the table, the mode and the key; unknown time features
//! refused against the planner's feature list.

use super::{BlockCoeffs, Coef, Coefficients, ModeCoeffs, RuntimeCoeffs};
use crate::error::input_err;
use anyhow::Context;
use std::path::Path;

/// A coefficient must be finite and in `0..=max`; `field` names it (built only on failure).
fn check_coef(field: impl FnOnce() -> String, v: f64, max: f64) -> anyhow::Result<()> {
    if v.is_finite() && (0.0..=max).contains(&v) {
        return Ok(());
    }
    input_err(&field(), format!("{v} is out of range; accepted 0..={max}"))
}

/// Upper bounds of the coefficients, far above any measured or published value (bytes per
/// element are single digits to tens, see calibration/*.json) yet low enough that a plan stays
/// finite: a value above them is a corrupted or hand-edited table.
const MAX_BYTES_PER_ELEM: f64 = 1e4;
const MAX_FRACTION: f64 = 100.0;
const MAX_CONST_BYTES: f64 = (1u64 << 50) as f64;
const MAX_FLOPS: f64 = 1e19;
const MAX_BYTES_PER_S: f64 = 1e15;
const MAX_SECONDS: f64 = 3600.0;

impl ModeCoeffs {
    /// Every coefficient with its key (as in the JSON) and its upper bound.
    fn ranged(&self) -> Vec<(String, &Coef, f64)> {
        let a = &self.activation;
        let mut out: Vec<(String, &Coef, f64)> = [
            ("activation.c_h", &a.c_h),
            ("activation.c_f", &a.c_f),
            ("activation.c_att", &a.c_att),
            ("activation.c_dropout", &a.c_dropout),
            ("activation.c_logits", &a.c_logits),
            ("activation.c_ckpt", &a.c_ckpt),
            ("activation.c_conv", &a.c_conv),
            ("activation.c_norm", &a.c_norm),
            ("activation.c_act", &a.c_act),
            ("activation.c_pool", &a.c_pool),
            ("activation.c_input", &a.c_input),
            ("activation.c_workspace", &a.c_workspace),
            ("activation.c_max_param", &a.c_max_param),
            ("activation.c_gathered", &a.c_gathered),
        ]
        .into_iter()
        .map(|(k, c)| (k.to_string(), c, MAX_BYTES_PER_ELEM))
        .collect();
        let t = &self.time;
        out.extend([
            (
                "activation.half_copy".to_string(),
                &a.half_copy,
                MAX_FRACTION,
            ),
            ("activation.grad_overlap".to_string(), &a.grad_overlap, 1.0),
            (
                "overhead.frag".to_string(),
                &self.overhead.frag,
                MAX_FRACTION,
            ),
            (
                "overhead.const_bytes".to_string(),
                &self.overhead.const_bytes,
                MAX_CONST_BYTES,
            ),
            ("time.mfu".to_string(), &t.mfu, 1.0),
            ("time.flops_per_s".to_string(), &t.flops_per_s, MAX_FLOPS),
            (
                "time.act_bytes_per_s".to_string(),
                &t.act_bytes_per_s,
                MAX_BYTES_PER_S,
            ),
            (
                "time.state_bytes_per_s".to_string(),
                &t.state_bytes_per_s,
                MAX_BYTES_PER_S,
            ),
            ("time.t0_s".to_string(), &t.t0_s, MAX_SECONDS),
            (
                "time.recompute_factor".to_string(),
                &t.recompute_factor,
                3.0,
            ),
        ]);
        out.extend(
            t.s_per_elem
                .iter()
                .map(|(k, c)| (format!("time.s_per_elem.{k}"), c, 1.0)),
        );
        out
    }
}

impl BlockCoeffs {
    fn ranged(&self) -> [(&'static str, f64); 13] {
        [
            ("bsq", self.bsq.unwrap_or(0.0)),
            ("dropout.bsh", self.dropout.bsh),
            ("dropout.bas2", self.dropout.bas2),
            ("dropout.bsh_once", self.dropout.bsh_once),
            ("bsh", self.bsh),
            ("bsf", self.bsf),
            ("bas2", self.bas2),
            ("bas", self.bas),
            ("bskv", self.bskv),
            ("bs", self.bs),
            ("bsh_once", self.bsh_once),
            ("bs_once", self.bs_once),
            ("bsv", self.bsv),
        ]
    }
}

impl RuntimeCoeffs {
    fn ranged(&self) -> [(&'static str, &Coef, f64); 4] {
        [
            (
                "runtime.cuda_context_bytes",
                &self.cuda_context_bytes,
                MAX_CONST_BYTES,
            ),
            (
                "runtime.cublas_workspace_bytes",
                &self.cublas_workspace_bytes,
                MAX_CONST_BYTES,
            ),
            ("runtime.nccl_bytes", &self.nccl_bytes, MAX_CONST_BYTES),
            ("runtime.reserve_frac", &self.reserve_frac, MAX_FRACTION),
        ]
    }
}

impl Coefficients {
    /// Checks every coefficient against its physical range, naming the table, the mode and the
    /// key. A table is trusted by every plan made with it: a negative fixed time, an infinite
    /// byte coefficient or a negative overhead would turn into negative step times or totals
    /// that wrap and "fit", so such a table is refused where it enters.
    pub fn validate(&self, origin: &str) -> anyhow::Result<()> {
        if self.schema != 1 {
            return input_err(
                &format!("{origin} schema"),
                format!("{}; accepted 1", self.schema),
            );
        }
        if self.modes.is_empty() {
            return input_err(
                &format!("{origin} modes"),
                "empty; accepted at least one mode",
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.modes.iter().enumerate() {
            let at = format!(
                "{origin} modes[{i}] ({} {})",
                m.family.as_str(),
                m.precision
            );
            if !seen.insert((m.family, m.precision)) {
                return input_err(
                    &at,
                    "appears twice; accepted one mode per (family, precision)",
                );
            }
            for (key, coef, max) in m.ranged() {
                check_coef(|| format!("{at} {key}"), coef.value, max)?;
            }
            for (name, blocks) in [
                ("blocks", &m.activation.blocks),
                ("cpu_blocks", &m.activation.cpu_blocks),
            ] {
                for (j, b) in blocks.iter().enumerate() {
                    for (key, v) in b.ranged() {
                        check_coef(
                            || format!("{at} activation.{name}[{j}].{key}"),
                            v,
                            MAX_BYTES_PER_ELEM,
                        )?;
                    }
                }
            }
            for (act, c) in &m.activation.act_fns {
                check_coef(
                    || format!("{at} activation.act_fns.{act}"),
                    c.value,
                    MAX_BYTES_PER_ELEM,
                )?;
            }
            if !m.activation.blocks.is_empty() || !m.activation.cpu_blocks.is_empty() {
                use crate::spec::transformer::Activation;
                if let Some(a) = Activation::ALL
                    .iter()
                    .find(|a| !m.activation.act_fns.contains_key(a))
                {
                    return input_err(
                        &format!("{at} activation.act_fns"),
                        format!(
                            "has no {a}; accepted an entry for each of {} when the mode has blocks",
                            Activation::accepted()
                        ),
                    );
                }
            }
            for name in m.time.s_per_elem.keys() {
                if !crate::plan::memory::Features::NAMES.contains(&name.as_str()) {
                    return input_err(
                        &format!("{at} time.s_per_elem.{name}"),
                        format!(
                            "unknown feature; accepted {}",
                            crate::plan::memory::Features::NAMES.join(", ")
                        ),
                    );
                }
            }
            let r = m.time.recompute_factor.value;
            if r < 1.0 {
                return input_err(
                    &format!("{at} time.recompute_factor"),
                    format!("{r} would make recomputation faster than none; accepted 1..=3"),
                );
            }
        }
        if let Some(rt) = &self.runtime {
            for (key, coef, max) in rt.ranged() {
                check_coef(|| format!("{origin} {key}"), coef.value, max)?;
            }
        }
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading coefficients {}", path.display()));
        let text = match text {
            Ok(t) => t,
            Err(e) => return input_err("coeffs", format!("{e:#}; accepted a readable JSON file")),
        };
        match serde_json::from_str::<Self>(&text) {
            Ok(mut c) => {
                c.fill_missing_from_literature();
                c.validate(&format!("coeffs {}", path.display()))?;
                Ok(c)
            }
            Err(e) => input_err(
                "coeffs",
                format!("{} is not a coefficient table ({e}); accepted the schema of calibration/literature.json", path.display()),
            ),
        }
    }

    /// Block terms added after a table was written take the literature's value for the same
    /// (family, precision, block, attention): a table fitted before `bsq` existed would
    /// otherwise price a Qwen3 or Gemma query width at 0.
    fn fill_missing_from_literature(&mut self) {
        let lit = Self::literature_ref();
        for m in &mut self.modes {
            let Some(lm) = lit
                .modes
                .iter()
                .find(|l| l.family == m.family && l.precision == m.precision)
            else {
                continue;
            };
            let known = lm.activation.blocks.iter().chain(&lm.activation.cpu_blocks);
            let known: Vec<_> = known.collect();
            for b in m
                .activation
                .blocks
                .iter_mut()
                .chain(m.activation.cpu_blocks.iter_mut())
                .filter(|b| b.bsq.is_none())
            {
                b.bsq = known
                    .iter()
                    .find(|l| l.block == b.block && l.attention == b.attention)
                    .and_then(|l| l.bsq);
            }
        }
    }

    /// Writes the table atomically (temp file + rename), so a crash never leaves half a table.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        // A fit that produced an out-of-range value must not leave a table every later plan trusts.
        self.validate(&format!("fitted table for {}", path.display()))?;
        let text = serde_json::to_string_pretty(self)?;
        crate::atomic::write(path, text.as_bytes())
    }
}
