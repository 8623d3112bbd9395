//! Byte sizes as users write them on the command line (`80GB`, `24GiB`, `512MiB`, `4096B`):
//! one parser for every size flag, so `--gpu-mem 80` cannot silently mean 80 bytes.

use crate::error::input_err;

/// Largest size accepted (1 EB): far above any device or host, far below u64's range.
const MAX_SIZE: f64 = 1e18;

/// Parses a size with its unit into bytes: decimal B, KB, MB, GB, TB (also k, m, g, t) and binary
/// KiB, MiB, GiB, TiB; the number may be fractional or in exponent form (`1.5GB`, `1e9B`). A bare
/// number is refused with the units it could have meant, naming `field` as the user wrote it.
pub fn parse_size(field: &str, s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let number = num.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    if unit.is_empty() {
        return match number {
            Some(v) if v > 0.0 => input_err(
                field,
                format!("'{s}' has no unit; accepted a size such as {v}GB or {v}GiB (or {v}B for bytes)"),
            ),
            _ => input_err(field, format!("'{s}' is not a size; accepted a positive number with a unit, e.g. 80GB or 24GiB")),
        };
    }
    let mult: f64 = match unit.as_str() {
        "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => f64::NAN,
    };
    match number {
        Some(v) if v > 0.0 && mult.is_finite() && v * mult <= MAX_SIZE => Ok((v * mult).round() as u64),
        _ => input_err(
            field,
            format!("'{s}' is not a size; accepted a positive number up to 1 EB with B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("x", "40GB").unwrap(), 40_000_000_000);
        assert_eq!(parse_size("x", "1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("x", "1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("x", "1e9B").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("x", "4096b").unwrap(), 4096);
        assert_eq!(parse_size("x", "80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_size("x", "1.5TB").unwrap(), 1_500_000_000_000);
        assert_eq!(parse_size("x", "24 GiB").unwrap(), 24 << 30);
    }

    #[test]
    fn bare_numbers_and_bad_units_name_the_flag() {
        for bad in [
            "80",
            "lots",
            "5 parsecs",
            "-1GB",
            "0GB",
            "1e30GB",
            "GB",
            "",
            "80XB",
        ] {
            let e = parse_size("gpu-mem", bad).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2, "{bad}");
            let msg = format!("{e:#}");
            assert!(msg.starts_with("invalid gpu-mem: "), "{msg}");
            assert_eq!(msg.lines().count(), 1);
        }
        let msg = format!("{:#}", parse_size("gpu-mem", "80").unwrap_err());
        assert!(msg.contains("80GB") && msg.contains("80GiB"), "{msg}");
    }
}
