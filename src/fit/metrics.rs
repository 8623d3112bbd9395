//! Error summaries of predictions against measurements, in percent (MAPE, median and max
//! absolute error, count), as the held-out scores and the fit's in-sample residuals report them.

use super::timefit;
use serde::Serialize;

/// Error summary in percent. With no points (`n == 0`) the percentages mean nothing: they
/// serialise as `null`, never as a 0 % a CI threshold would pass (see [`Metrics::describe`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    pub mape: f64,
    pub median_abs_pct: f64,
    pub max_abs_pct: f64,
    pub n: usize,
}

impl Serialize for Metrics {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let pct = |v: f64| (self.n > 0).then_some(v);
        let mut st = s.serialize_struct("Metrics", 4)?;
        st.serialize_field("mape", &pct(self.mape))?;
        st.serialize_field("median_abs_pct", &pct(self.median_abs_pct))?;
        st.serialize_field("max_abs_pct", &pct(self.max_abs_pct))?;
        st.serialize_field("n", &self.n)?;
        st.end()
    }
}

impl Metrics {
    /// "3.21 % (max 9.80 %, n = 40)", or what is missing when nothing was scored.
    pub fn describe(&self, what: &str) -> String {
        if self.n == 0 {
            format!("{what}: none scored (no valid points, n = 0)")
        } else {
            format!(
                "{what} {:.2} % (max {:.2} %, n = {})",
                self.mape, self.max_abs_pct, self.n
            )
        }
    }

    /// From signed percentage errors.
    pub fn from_errors(errors: &[f64]) -> Self {
        if errors.is_empty() {
            return Self::default();
        }
        let mut abs: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
        let n = abs.len();
        let mape = abs.iter().sum::<f64>() / n as f64;
        let max = abs.iter().copied().fold(0.0, f64::max);
        let median = timefit::median(&mut abs).unwrap_or(0.0);
        Self {
            mape,
            median_abs_pct: median,
            max_abs_pct: max,
            n,
        }
    }
}
