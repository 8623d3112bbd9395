//! Fitting the planner's coefficients from measurements (DESIGN.md "Fitting and reports"):
//! rows -> points (`points`), non-negative least squares (`nnls`), the memory and time
//! regressions (`memfit`, `timefit`), a full table (`calibrate`), honest held-out scoring
//! (`split`) against the seed rule (`baseline`) and the literature table.

pub mod baseline;
pub mod calibrate;
pub mod memfit;
pub mod nnls;
pub mod points;
pub mod scaled;
pub mod split;
pub mod timefit;
pub mod transfer;

use crate::harness::record::Row;
pub use calibrate::{fit_table, Meta};
pub use points::{prepare, Excluded, Point};

/// Everything `fit` and `report` need from one CSV.
pub struct Fitted {
    pub points: Vec<Point>,
    pub excluded: Vec<Excluded>,
    pub meta: Meta,
    pub table: crate::coeffs::Coefficients,
}

/// Fits a table on all usable rows.
pub fn fit_rows(rows: &[Row]) -> anyhow::Result<Fitted> {
    let (points, excluded) = prepare(rows);
    if points.is_empty() {
        return crate::error::input_err("data", format!("no rows with status ok and a peak ({} rows read); accepted a measurements CSV with ok rows", rows.len()));
    }
    let meta = Meta::from_points(&points);
    let refs: Vec<&Point> = points.iter().collect();
    let table = fit_table(&refs, &meta)?;
    Ok(Fitted {
        points,
        excluded,
        meta,
        table,
    })
}
