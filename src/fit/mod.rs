//! Fitting the planner's coefficients from measurements (docs/architecture.md, "Fitting"):
//! rows -> points (`points`), non-negative least squares (`nnls`), the memory and time
//! regressions (`memfit`, `timefit`), a full table (`calibrate`), honest held-out scoring
//! (`split`) against the rule of thumb (`baseline`) and the literature table.

pub mod baseline;
pub mod calibrate;
pub mod memfit;
pub mod meta;
pub mod metrics;
pub mod nnls;
pub mod points;
pub mod scaled;
pub mod split;
pub mod timefit;
pub mod transfer;

use crate::harness::record::Row;
pub use calibrate::fit_table;
pub use meta::Meta;
pub use points::{prepare, Excluded, Point};

/// Everything `fit` and `report` need from one CSV.
pub struct Fitted {
    pub points: Vec<Point>,
    pub excluded: Vec<Excluded>,
    pub meta: Meta,
    pub table: crate::coeffs::Coefficients,
    /// fine-tuning rows, not fitted (see [`prepare`]): scored in the report's LoRA section
    pub finetune_rows: Vec<Row>,
}

/// Fits a table on all usable rows. Refuses (input error) fewer ok points than the memory
/// coefficients the data's features call for: such a "fit" would be an underdetermined solve (or
/// the literature table) under a fitted label. A sparse family within enough data is fitted
/// with fewer columns, its sources saying so (see `calibrate::fit_mode`); the CUDA quick grid
/// relies on that for its two CNN points.
pub fn fit_rows(rows: &[Row]) -> anyhow::Result<Fitted> {
    let (points, excluded) = prepare(rows);
    if points.is_empty() {
        return crate::error::input_err("data", format!("no rows with status ok and a peak ({} rows read); accepted a measurements CSV with ok rows", rows.len()));
    }
    let meta = Meta::from_points(&points);
    let refs: Vec<&Point> = points.iter().collect();
    let coefficients = memfit::present(&refs).len();
    if refs.len() < coefficients {
        return crate::error::input_err(
            "data",
            format!(
                "{} ok points for the {coefficients} memory coefficients their features need; accepted at least {coefficients} ok points",
                refs.len()
            ),
        );
    }
    let table = fit_table(&refs, &meta)?;
    let finetune_rows = rows
        .iter()
        .filter(|r| !r.finetune().is_plain())
        .cloned()
        .collect();
    Ok(Fitted {
        points,
        excluded,
        meta,
        table,
        finetune_rows,
    })
}
