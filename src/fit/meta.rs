//! What a fitted table says about where it came from: the device's identity and the date of
//! its latest measurement.

use super::points::Point;

/// Identity of the device and the date written into the table.
#[derive(Debug, Clone)]
pub struct Meta {
    pub device_id: String,
    pub device_name: String,
    pub backend: String,
    pub driver: String,
    pub date: String,
}

impl Meta {
    /// From the rows: the first row's device, the latest timestamp's date (so a refit of the same
    /// CSV gives the same table).
    pub fn from_points(points: &[Point]) -> Self {
        let first = points.first().map(|p| &p.row);
        let date = points
            .iter()
            .map(|p| p.row.timestamp.get(..10).unwrap_or("").to_string())
            .max()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Meta {
            device_id: first.map(|r| r.device_id.clone()).unwrap_or_default(),
            device_name: first.map(|r| r.device_name.clone()).unwrap_or_default(),
            backend: first.map(|r| r.backend.to_string()).unwrap_or_default(),
            driver: first.map(|r| r.driver.clone()).unwrap_or_default(),
            date,
        }
    }
}
