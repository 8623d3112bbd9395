//! Inverse planning: the largest batch (or sequence length) whose per-GPU total fits a memory
//! capacity, by exponential then binary search. Per-GPU memory is non-decreasing in batch and
//! seq (every term of the model is), so the search is exact on the model, and cheap: the model is
//! validated and the coefficients looked up once, not per probe.

use crate::coeffs::{Coefficients, ModeCoeffs, RuntimeCoeffs};
use crate::error::input_err;
use crate::plan::memory::{breakdown_with_mode, features, FitTerms, MemoryBreakdown};
use crate::plan::params;
use crate::spec::train::{MAX_BATCH, MAX_SEQ};
use crate::spec::{ModelSpec, TrainSpec};

/// Evaluates per-GPU memory for many training configurations of one validated model.
#[derive(Clone)]
pub struct Evaluator<'a> {
    model: &'a ModelSpec,
    params: u64,
    mode: ModeCoeffs,
    /// GPU runtime memory around the allocated peak (none for a CPU table)
    runtime: RuntimeCoeffs,
    /// device the coefficient table was measured on ("literature" for the default table)
    device_id: String,
    /// what is trained and offloaded (full training of everything by default)
    finetune: crate::plan::finetune::Finetune,
}

impl<'a> Evaluator<'a> {
    /// Validates the model and fetches the coefficients for its family and `train.precision`.
    pub fn new(
        model: &'a ModelSpec,
        train: &TrainSpec,
        coeffs: &Coefficients,
    ) -> anyhow::Result<Self> {
        model.validate_for(train)?;
        Ok(Self {
            model,
            params: params::count(model),
            mode: coeffs.mode(model.family(), train.precision),
            runtime: coeffs.runtime(),
            device_id: coeffs.device_id.clone(),
            finetune: Default::default(),
        })
    }

    /// Plans a fine-tuning configuration (`plan::finetune`) instead of full training.
    pub fn with_finetune(mut self, finetune: crate::plan::finetune::Finetune) -> Self {
        self.finetune = finetune;
        self
    }

    pub fn finetune(&self) -> &crate::plan::finetune::Finetune {
        &self.finetune
    }

    pub fn params(&self) -> u64 {
        self.params
    }

    pub fn mode(&self) -> &ModeCoeffs {
        &self.mode
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Per-GPU breakdown. `train` must keep the precision given to [`Evaluator::new`]; sizes are
    /// not re-validated here (callers search within validated bounds).
    pub fn breakdown(&self, train: &TrainSpec) -> anyhow::Result<MemoryBreakdown> {
        let terms = if self.finetune.is_plain() {
            FitTerms {
                params: self.params,
                states: crate::plan::memory::rank_state_bytes(self.model, self.params, train),
                features: features(self.model, train)?,
                vision: crate::plan::memory::vision_features(self.model, train)?,
            }
        } else {
            crate::plan::finetune::terms(self.model, train, &self.finetune)?
        };
        Ok(breakdown_with_mode(&terms, &self.mode).with_runtime(&self.runtime, train.gpus))
    }

    pub fn fits(&self, train: &TrainSpec, capacity: u64) -> anyhow::Result<bool> {
        Ok(self.breakdown(train)?.fits(capacity))
    }
}

/// Largest `v` in `1..=max` with `fits(v)`, assuming `fits` is monotone (true then false);
/// None when even 1 does not fit.
pub fn largest_fitting(
    max: u64,
    mut fits: impl FnMut(u64) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<u64>> {
    if max == 0 || !fits(1)? {
        return Ok(None);
    }
    let mut lo = 1; // fits
    let hi = loop {
        if lo == max {
            return Ok(Some(max));
        }
        let next = lo.saturating_mul(2).min(max);
        if fits(next)? {
            lo = next;
        } else {
            break next; // does not fit
        }
    };
    let mut hi = hi;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// Largest per-GPU batch that fits `capacity` bytes with everything else as in `train`.
pub fn max_batch(ev: &Evaluator, train: &TrainSpec, capacity: u64) -> anyhow::Result<Option<u64>> {
    let mut t = train.clone();
    largest_fitting(MAX_BATCH, |b| {
        t.batch = b;
        ev.fits(&t, capacity)
    })
}

/// Largest sequence length that fits, up to the model's learned position table. Only for text
/// transformers: a ViT's sequence follows from its image size and a CNN has none.
pub fn max_seq(
    model: &ModelSpec,
    ev: &Evaluator,
    train: &TrainSpec,
    capacity: u64,
) -> anyhow::Result<Option<u64>> {
    let limit = match model {
        ModelSpec::Transformer(t) if t.patch.is_none() => {
            if t.max_positions > 0 {
                t.max_positions
            } else {
                MAX_SEQ
            }
        }
        _ => {
            return input_err(
                "max-seq",
                "the model has no free sequence length; accepted text transformers (use --max-batch or --image)",
            )
        }
    };
    let mut t = train.clone();
    largest_fitting(limit, |s| {
        t.seq = s;
        ev.fits(&t, capacity)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_fitting_is_exact() {
        for limit in [1u64, 2, 3, 7, 100, 1 << 20] {
            for max in [1u64, 5, 64, 1000] {
                let got = largest_fitting(max, |v| Ok(v <= limit)).unwrap();
                assert_eq!(got, Some(limit.min(max)), "limit {limit} max {max}");
            }
        }
        assert_eq!(largest_fitting(10, |_| Ok(false)).unwrap(), None);
    }
}
