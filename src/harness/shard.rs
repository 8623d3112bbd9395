//! Shards of a sweep (`vramcal sweep --shard I/N`): which grid points one of N machines
//! measures, and the sidecar file that records it for `vramcal merge`.
//!
//! A point belongs to shard `h mod N`, where `h` is the first 8 bytes (big-endian) of the
//! SHA-256 of its shard key: the point key without the device id and the backend (see
//! [`shard_key`]). The partition so depends on the point alone, never on its position in the
//! grid file: reordering or extending the grid moves no point to another shard, every point is
//! in exactly one shard, and the shard of a measured row can be recomputed from the row itself
//! (merge uses that to check each file holds only its own shard's points). SHA-256 rather
//! than `std`'s hasher, whose output may change between Rust releases.
//!
//! The sidecar `<out>.shard.json` (written atomically when a sharded sweep starts) says which
//! shard of how many a CSV holds, so merge can name overlapping and missing shards.

use crate::error::input_err;
use crate::harness::record::{point_key, Backend, Row};
use crate::spec::{ModelSpec, TrainSpec};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Most shards a sweep may be cut into (far above any cluster's GPU count; keeps `I/N` sane).
pub const MAX_SHARDS: u32 = 65_536;

/// Shard `index` of `count` (0-based: `0/4` .. `3/4`, like Slurm's and Kubernetes' array
/// indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    /// `I/N` with `1 <= N <= 65536` and `0 <= I < N`; a one-line input error naming `--shard`
    /// otherwise.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let bad = || {
            input_err::<Shard>(
                "shard",
                format!("'{s}'; accepted I/N with 1 <= N <= {MAX_SHARDS} and 0 <= I < N, e.g. 0/4"),
            )
        };
        let Some((i, n)) = s.trim().split_once('/') else {
            return bad();
        };
        let (Ok(index), Ok(count)) = (i.trim().parse::<u32>(), n.trim().parse::<u32>()) else {
            return bad();
        };
        if count == 0 || count > MAX_SHARDS || index >= count {
            return bad();
        }
        Ok(Shard { index, count })
    }
}

/// The part of a point's identity that decides its shard: the resume key without the device id
/// (every machine of a cluster names its device itself) and with the candle backend (a torch
/// sweep of the same grid cuts it the same way). What is trained is left out too: a shape's
/// fine-tuning variants fall in its shard.
pub fn shard_key(spec_json: &str, train: &TrainSpec) -> String {
    point_key("", Backend::Candle, spec_json, train, "")
}

/// The shard (of `count`) a point key falls in.
pub fn shard_of_key(key: &str, count: u32) -> u32 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(count.max(1))) as u32
}

impl Shard {
    /// Whether this shard measures the point.
    pub fn contains(&self, model: &ModelSpec, train: &TrainSpec) -> anyhow::Result<bool> {
        let spec_json = serde_json::to_string(model)?;
        Ok(shard_of_key(&shard_key(&spec_json, train), self.count) == self.index)
    }

    /// The shard (of `count`) a measured row's point falls in.
    pub fn of_row(row: &Row, count: u32) -> Shard {
        Shard {
            index: shard_of_key(&shard_key(&row.spec_json, &row.train_spec()), count),
            count,
        }
    }
}

/// What a sharded sweep writes beside its CSV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecar {
    pub shard: u32,
    pub shards: u32,
    /// the grid file as the sweep was given it
    pub grid: String,
    /// points in the whole grid, and in this shard
    pub grid_points: usize,
    pub shard_points: usize,
}

impl Sidecar {
    pub fn shard(&self) -> Shard {
        Shard {
            index: self.shard,
            count: self.shards,
        }
    }
}

/// `<csv>.shard.json`.
pub fn sidecar_path(csv: &Path) -> PathBuf {
    let mut name = csv.as_os_str().to_owned();
    name.push(".shard.json");
    PathBuf::from(name)
}

/// The sidecar of a CSV, None when it has none (an unsharded sweep); an unreadable or invalid
/// one is an input error naming it.
pub fn read_sidecar(csv: &Path) -> anyhow::Result<Option<Sidecar>> {
    let path = sidecar_path(csv);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let s: Sidecar = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            return input_err(
                &path.display().to_string(),
                format!(
                    "unreadable ({e}); accepted the shard file a `vramcal sweep --shard` wrote"
                ),
            )
        }
    };
    if s.shards == 0 || s.shard >= s.shards {
        return input_err(
            &path.display().to_string(),
            format!(
                "shard {}/{}; accepted I/N with 0 <= I < N",
                s.shard, s.shards
            ),
        );
    }
    Ok(Some(s))
}

/// Writes the sidecar atomically.
pub fn write_sidecar(csv: &Path, s: &Sidecar) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(s)?;
    bytes.push(b'\n');
    crate::atomic::write(&sidecar_path(csv), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::grid;

    #[test]
    fn shard_flags_parse_and_bad_ones_name_the_flag() {
        assert_eq!(
            "1/4".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 4 }
        );
        assert_eq!("0/1".parse::<Shard>().unwrap().to_string(), "0/1");
        for bad in ["4/4", "1/0", "x/4", "1", "-1/4", "1/65537", ""] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2, "{bad}");
            let msg = format!("{e:#}");
            assert!(
                msg.contains("invalid shard") && msg.contains("0 <= I < N"),
                "{msg}"
            );
        }
    }

    const GRID: &str = r#"
[[point_set]]
model = "tiny-gpt"
layers = [1, 2]
batch = [1, 2, 4]
seq = [16, 32]
precision = ["fp32", "bf16-mixed"]
"#;

    /// Every point lands in exactly one shard, each shard gets some, and reversing the grid's
    /// axes (a reordered file) assigns every point the same shard.
    #[test]
    fn shards_partition_the_grid_independently_of_its_order() {
        let g = grid::parse(GRID).unwrap();
        assert_eq!(g.points.len(), 24);
        let reordered = GRID
            .replace("[1, 2]", "[2, 1]")
            .replace("[1, 2, 4]", "[4, 1, 2]")
            .replace("[\"fp32\", \"bf16-mixed\"]", "[\"bf16-mixed\", \"fp32\"]");
        let r = grid::parse(&reordered).unwrap();
        assert_ne!(
            g.points, r.points,
            "the reordered grid visits another order"
        );
        let n = 3;
        let assign = |points: &[grid::Point]| {
            let mut by: std::collections::BTreeMap<String, u32> = Default::default();
            for p in points {
                let hits: Vec<u32> = (0..n)
                    .filter(|&i| {
                        Shard { index: i, count: n }
                            .contains(&p.model, &p.train)
                            .unwrap()
                    })
                    .collect();
                assert_eq!(hits.len(), 1, "{p:?} is in shards {hits:?}");
                let key = shard_key(&serde_json::to_string(&p.model).unwrap(), &p.train);
                by.insert(key, hits[0]);
            }
            by
        };
        let a = assign(&g.points);
        assert_eq!(a.len(), 24);
        assert_eq!(a, assign(&r.points));
        for i in 0..n {
            assert!(a.values().any(|&s| s == i), "shard {i} is empty: {a:?}");
        }
        // one shard is the whole grid
        assert!(g.points.iter().all(|p| Shard { index: 0, count: 1 }
            .contains(&p.model, &p.train)
            .unwrap()));
    }

    #[test]
    fn the_hash_is_sha256_of_the_key() {
        // SHA-256("abc") starts ba7816bf8f01cfea: the partition is the documented one, not an
        // accident of this build
        assert_eq!(
            shard_of_key("abc", u32::MAX),
            (0xba78_16bf_8f01_cfea_u64 % u64::from(u32::MAX)) as u32
        );
    }

    #[test]
    fn sidecars_round_trip_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("s.csv");
        assert_eq!(read_sidecar(&csv).unwrap(), None);
        let s = Sidecar {
            shard: 2,
            shards: 4,
            grid: "g.toml".into(),
            grid_points: 10,
            shard_points: 3,
        };
        write_sidecar(&csv, &s).unwrap();
        assert!(sidecar_path(&csv).ends_with("s.csv.shard.json"));
        assert_eq!(read_sidecar(&csv).unwrap(), Some(s));
        std::fs::write(
            sidecar_path(&csv),
            r#"{"shard":4,"shards":4,"grid":"g","grid_points":1,"shard_points":1}"#,
        )
        .unwrap();
        let e = read_sidecar(&csv).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(format!("{e:#}").contains("s.csv.shard.json"));
    }
}
