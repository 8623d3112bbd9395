//! `vramcal merge`: several measurement CSVs (the shards of a cluster sweep, or any sweeps of one
//! device) into one, written atomically.
//!
//! Checks, each a one-line input error (exit 2):
//! - every input reads as vramcal's CSV (schema 1 to 3, every cell; [`record::read`]) and no
//!   sweep is still writing it (its lock is taken shared);
//! - all rows are of one `device_id` unless `allow_mixed_devices`;
//! - shards (from the `<csv>.shard.json` a `sweep --shard` writes): one split `N` for all
//!   sharded inputs, each shard once (overlapping shards are named with their files), none
//!   missing unless `partial`, and every row of a shard file in that shard;
//! - with a grid: every grid point has a row for each device/backend merged, unless `partial`
//!   (missing points are counted and the first ones named with their shard).
//!
//! De-duplication by point key ([`Row::key`]): within one file its last row counts (a
//! `--retry-failed` re-run, as in fit); across files an `ok` row beats a failed one (oom, error,
//! killed, timeout), which beats a `skipped` one (never run); between equals the first input
//! wins. Two `ok` rows whose measurements differ are a conflict: the first is kept and each
//! conflict is reported. Older-schema rows are written as schema 4 (as `sweep --resume`
//! migrates them).

use crate::error::input_err;
use crate::harness::grid::{self, Point};
use crate::harness::record::{self, point_key, Row, Status};
use crate::harness::shard::{self, Shard};
use anyhow::Context;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// check that every point of this grid has a row
    pub grid: Option<PathBuf>,
    pub allow_mixed_devices: bool,
    /// merge even with shards or grid points missing (they are still counted)
    pub partial: bool,
}

/// Two `ok` rows of one point with different measurements; the first was kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub point: String,
    pub kept: String,
    pub dropped: String,
    pub kept_peak_bytes: Option<u64>,
    pub dropped_peak_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MergeSummary {
    pub files: usize,
    /// rows read (each file's last row per point)
    pub rows_read: usize,
    /// points written
    pub points: usize,
    /// written rows per status
    pub by_status: BTreeMap<String, usize>,
    /// rows dropped because another file had the same point
    pub duplicates: usize,
    /// of those, failed rows replaced by an `ok` row of another file
    pub ok_over_failed: usize,
    pub conflicts: Vec<Conflict>,
    /// rows of schema 1, 2 or 3 written as schema 4
    pub migrated: usize,
    /// `N` of the sharded inputs' split, and the shards present
    pub shards_of: Option<u32>,
    pub shards: Vec<u32>,
    /// shards and grid points missing (only with `partial`)
    pub missing_shards: Vec<u32>,
    pub missing_points: usize,
}

/// Which row wins a duplicate: a measurement beats a failure beats a point never run.
fn rank(s: Status) -> u8 {
    match s {
        Status::Ok => 2,
        Status::Skipped => 0,
        Status::Oom | Status::Error | Status::Killed | Status::Timeout => 1,
    }
}

/// The same measurement (a file merged twice, or a copy), as opposed to a conflict.
fn same_measurement(a: &Row, b: &Row) -> bool {
    (
        a.peak_bytes,
        a.baseline_bytes,
        a.peak_reserved_bytes,
        a.step_ms_median,
    ) == (
        b.peak_bytes,
        b.baseline_bytes,
        b.peak_reserved_bytes,
        b.step_ms_median,
    )
}

/// `tiny-gpt b2 s16 fp32 ...` for messages (falls back to the model name).
fn describe_row(r: &Row) -> String {
    match r.model_spec() {
        Ok(model) => crate::harness::sweep::describe(&Point {
            model,
            train: r.train_spec(),
            finetune: r.finetune(),
        }),
        Err(_) => r.model.clone(),
    }
}

fn names(paths: &[&Path]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Reads one input under a shared lock: a sweep still appending to it holds the exclusive one.
fn read_input(path: &Path) -> anyhow::Result<Vec<Row>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            return input_err(
                "inputs",
                format!(
                    "cannot read {} ({e}); accepted measurement CSVs",
                    path.display()
                ),
            )
        }
    };
    match file.try_lock_shared() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return input_err(
                "inputs",
                format!(
                    "{} is being written by a running sweep; accepted CSVs of finished sweeps",
                    path.display()
                ),
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    let rows = record::read(path)?;
    drop(file);
    Ok(record::latest(rows))
}

/// One input: its path, its rows (last per point) and its shard record.
type Input = (PathBuf, Vec<Row>, Option<shard::Sidecar>);

/// The shards of a split found among the inputs.
struct Coverage {
    of: u32,
    present: Vec<u32>,
    missing: Vec<u32>,
}

/// Checks the shard records of the inputs (see the module docs); None when no input is a shard.
fn check_shards(inputs: &[Input], partial: bool) -> anyhow::Result<Option<Coverage>> {
    let sharded: Vec<(&Path, Shard, &[Row])> = inputs
        .iter()
        .filter_map(|(p, rows, s)| {
            s.as_ref()
                .map(|s| (p.as_path(), s.shard(), rows.as_slice()))
        })
        .collect();
    let Some(&(first_path, first, _)) = sharded.first() else {
        return Ok(None);
    };
    if let Some((p, s, _)) = sharded.iter().find(|(_, s, _)| s.count != first.count) {
        return input_err(
            "inputs",
            format!(
                "{} is shard {first} but {} is shard {s}; accepted the shards of one --shard I/N split",
                first_path.display(),
                p.display()
            ),
        );
    }
    let n = first.count;
    let mut by_index: BTreeMap<u32, Vec<&Path>> = BTreeMap::new();
    for (p, s, _) in &sharded {
        by_index.entry(s.index).or_default().push(p);
    }
    if let Some((i, paths)) = by_index.iter().find(|(_, v)| v.len() > 1) {
        return input_err(
            "inputs",
            format!(
                "shard {i}/{n} is in both {} (overlapping shards); accepted each shard once",
                names(paths)
            ),
        );
    }
    for (p, s, rows) in &sharded {
        if let Some(r) = rows.iter().find(|r| Shard::of_row(r, n) != *s) {
            return input_err(
                "inputs",
                format!(
                    "{} is shard {s} but holds a point of shard {} ({}); accepted the CSV each `sweep --shard` wrote, unedited",
                    p.display(),
                    Shard::of_row(r, n),
                    describe_row(r)
                ),
            );
        }
    }
    let present: Vec<u32> = by_index.keys().copied().collect();
    let missing: Vec<u32> = (0..n).filter(|i| !by_index.contains_key(i)).collect();
    if !missing.is_empty() && !partial {
        let shown: Vec<String> = missing.iter().take(8).map(|i| format!("{i}/{n}")).collect();
        let more = if missing.len() > 8 {
            format!(" and {} more", missing.len() - 8)
        } else {
            String::new()
        };
        return input_err(
            "inputs",
            format!(
                "shard{} {}{more} missing (got {} of {n} shards); accepted all {n} shards' CSVs, or --partial",
                if missing.len() > 1 { "s" } else { "" },
                shown.join(", "),
                present.len()
            ),
        );
    }
    Ok(Some(Coverage {
        of: n,
        present,
        missing,
    }))
}

/// Merges (see the module docs); writes `out` atomically and returns the counts.
pub fn merge(opts: &MergeOptions) -> anyhow::Result<MergeSummary> {
    if opts.inputs.is_empty() {
        return input_err(
            "inputs",
            "none given; accepted one or more measurement CSVs",
        );
    }
    let mut inputs: Vec<Input> = Vec::new();
    for p in &opts.inputs {
        let rows = read_input(p)?;
        let side = shard::read_sidecar(p)?;
        inputs.push((p.clone(), rows, side));
    }
    let mut devices: BTreeMap<&str, &Path> = BTreeMap::new();
    for (p, rows, _) in &inputs {
        for r in rows {
            devices.entry(r.device_id.as_str()).or_insert(p);
        }
    }
    if devices.len() > 1 && !opts.allow_mixed_devices {
        let shown: Vec<String> = devices
            .iter()
            .map(|(d, p)| format!("{d} ({})", p.display()))
            .collect();
        return input_err(
            "inputs",
            format!(
                "rows of {} devices: {}; accepted rows of one device_id, or --allow-mixed-devices",
                devices.len(),
                shown.join(", ")
            ),
        );
    }
    let shards = check_shards(&inputs, opts.partial)?;

    let mut summary = MergeSummary {
        files: inputs.len(),
        ..Default::default()
    };
    if let Some(c) = shards {
        summary.shards_of = Some(c.of);
        summary.shards = c.present;
        summary.missing_shards = c.missing;
    }
    // kept rows in first-seen order, with the file each came from
    let mut kept: Vec<(Row, usize)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for (file, (_, rows, _)) in inputs.iter().enumerate() {
        for r in rows {
            summary.rows_read += 1;
            let mut r = r.clone();
            if r.schema != record::SCHEMA {
                summary.migrated += 1;
                r.schema = record::SCHEMA;
            }
            let key = r.key();
            let Some(&i) = at.get(&key) else {
                at.insert(key, kept.len());
                kept.push((r, file));
                continue;
            };
            summary.duplicates += 1;
            let (old, old_file) = &kept[i];
            if rank(r.status) > rank(old.status) {
                if r.status == Status::Ok {
                    summary.ok_over_failed += 1;
                }
                kept[i] = (r, file);
            } else if r.status == Status::Ok
                && old.status == Status::Ok
                && !same_measurement(old, &r)
            {
                summary.conflicts.push(Conflict {
                    point: describe_row(&r),
                    kept: inputs[*old_file].0.display().to_string(),
                    dropped: inputs[file].0.display().to_string(),
                    kept_peak_bytes: old.peak_bytes,
                    dropped_peak_bytes: r.peak_bytes,
                });
            }
        }
    }

    if let Some(g) = &opts.grid {
        let grid = grid::load(g)?;
        // (device, backend) pairs merged; the backend's name orders them
        let targets: BTreeMap<(String, &str), record::Backend> = kept
            .iter()
            .map(|(r, _)| ((r.device_id.clone(), r.backend.as_str()), r.backend))
            .collect();
        let mut missing: Vec<(String, Option<Shard>)> = Vec::new();
        let have: HashSet<&String> = at.keys().collect();
        for p in &grid.points {
            let spec_json = serde_json::to_string(&p.model)?;
            for ((dev, _), backend) in &targets {
                if !have.contains(&point_key(
                    dev,
                    *backend,
                    &spec_json,
                    &p.train,
                    &p.finetune_key(),
                )) {
                    let s = summary.shards_of.map(|n| Shard {
                        index: shard::shard_of_key(&shard::shard_key(&spec_json, &p.train), n),
                        count: n,
                    });
                    missing.push((crate::harness::sweep::describe(p), s));
                }
            }
        }
        if targets.is_empty() {
            missing = grid
                .points
                .iter()
                .map(|p| (crate::harness::sweep::describe(p), None))
                .collect();
        }
        summary.missing_points = missing.len();
        if !missing.is_empty() && !opts.partial {
            let (what, s) = &missing[0];
            let in_shard = s.map_or(String::new(), |s| format!(" (shard {s})"));
            return input_err(
                "grid",
                format!(
                    "{} of the {} points of {} have no row, first {what}{in_shard}; accepted inputs that cover the grid, or --partial",
                    missing.len(),
                    grid.points.len() * targets.len().max(1),
                    g.display()
                ),
            );
        }
    }

    let mut w = csv::Writer::from_writer(Vec::new());
    for (r, _) in &kept {
        w.serialize(r)?;
        *summary
            .by_status
            .entry(r.status.as_str().to_string())
            .or_default() += 1;
    }
    if kept.is_empty() {
        w.write_record(record::HEADER)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{}", e.error()))?;
    crate::atomic::write(&opts.out, &bytes)?;
    // the merged file is no single shard: a shard record left beside it would mislabel it
    let stale = shard::sidecar_path(&opts.out);
    if stale.exists() {
        std::fs::remove_file(&stale).with_context(|| format!("removing {}", stale.display()))?;
    }
    summary.points = kept.len();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(batch: u64, status: Status, peak: u64) -> Row {
        let info = crate::harness::measure::cpu_info();
        let model = crate::spec::presets::preset("tiny-gpt").unwrap();
        let train = crate::spec::TrainSpec {
            batch,
            ..Default::default()
        };
        let mut r = crate::harness::measure::row_template(&info, &model, &train);
        r.status = status;
        if status == Status::Ok {
            r.peak_bytes = Some(peak);
            r.step_ms_median = Some(1.0);
        } else {
            r.error = "boom".into();
        }
        r
    }

    fn csv(dir: &Path, name: &str, rows: &[Row]) -> PathBuf {
        let p = dir.join(name);
        for r in rows {
            record::append(&p, r).unwrap();
        }
        p
    }

    fn opts(inputs: Vec<PathBuf>, out: &Path) -> MergeOptions {
        MergeOptions {
            inputs,
            out: out.to_path_buf(),
            grid: None,
            allow_mixed_devices: false,
            partial: false,
        }
    }

    #[test]
    fn ok_beats_failed_and_the_first_of_two_ok_rows_wins_with_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let a = csv(
            dir.path(),
            "a.csv",
            &[
                row(1, Status::Error, 0),
                row(2, Status::Ok, 200),
                row(3, Status::Ok, 300),
            ],
        );
        let b = csv(
            dir.path(),
            "b.csv",
            &[
                row(1, Status::Ok, 100),
                row(2, Status::Ok, 999),
                row(3, Status::Ok, 300),
                row(4, Status::Skipped, 0),
            ],
        );
        let out = dir.path().join("all.csv");
        let s = merge(&opts(vec![a, b], &out)).unwrap();
        assert_eq!(
            (s.rows_read, s.points, s.duplicates, s.ok_over_failed),
            (7, 4, 3, 1)
        );
        assert_eq!(s.conflicts.len(), 1, "{s:?}");
        assert_eq!(s.conflicts[0].kept_peak_bytes, Some(200));
        assert_eq!(s.conflicts[0].dropped_peak_bytes, Some(999));
        assert!(s.conflicts[0].kept.ends_with("a.csv"));
        let rows = record::read(&out).unwrap();
        let peaks: Vec<(u64, Status, Option<u64>)> = rows
            .iter()
            .map(|r| (r.batch, r.status, r.peak_bytes))
            .collect();
        assert_eq!(
            peaks,
            vec![
                (1, Status::Ok, Some(100)),
                (2, Status::Ok, Some(200)),
                (3, Status::Ok, Some(300)),
                (4, Status::Skipped, None)
            ]
        );
        assert_eq!(s.by_status["ok"], 3);
    }

    #[test]
    fn mixed_devices_overlapping_and_missing_shards_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("all.csv");
        let mut other = row(1, Status::Ok, 5);
        other.device_id = "cuda-nvidia-h100".into();
        let a = csv(dir.path(), "a.csv", &[row(1, Status::Ok, 5)]);
        let c = csv(dir.path(), "c.csv", &[other]);
        let e = merge(&opts(vec![a.clone(), c.clone()], &out)).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(format!("{e:#}").contains("cuda-nvidia-h100"), "{e:#}");
        let mut o = opts(vec![a, c], &out);
        o.allow_mixed_devices = true;
        assert_eq!(merge(&o).unwrap().points, 2);

        // shard files: rows of the right shard of 2, sidecars as the sweep writes them
        let rows: Vec<Row> = (1..=8).map(|b| row(b, Status::Ok, b * 10)).collect();
        let of = |i: u32| -> Vec<Row> {
            rows.iter()
                .filter(|r| Shard::of_row(r, 2).index == i)
                .cloned()
                .collect()
        };
        assert!(!of(0).is_empty() && !of(1).is_empty());
        let side = |i: u32| shard::Sidecar {
            shard: i,
            shards: 2,
            grid: "g.toml".into(),
            grid_points: 8,
            shard_points: of(i).len(),
        };
        let s0 = csv(dir.path(), "s0.csv", &of(0));
        let s1 = csv(dir.path(), "s1.csv", &of(1));
        let s0b = csv(dir.path(), "s0b.csv", &of(0));
        for (p, i) in [(&s0, 0), (&s1, 1), (&s0b, 0)] {
            shard::write_sidecar(p, &side(i)).unwrap();
        }
        let s = merge(&opts(vec![s0.clone(), s1.clone()], &out)).unwrap();
        assert_eq!((s.points, s.shards_of, s.shards.len()), (8, Some(2), 2));
        // merged onto a shard's own file: it stops being labelled as that shard
        let onto = dir.path().join("onto.csv");
        std::fs::copy(&s0, &onto).unwrap();
        shard::write_sidecar(&onto, &side(0)).unwrap();
        merge(&opts(vec![onto.clone(), s1.clone()], &onto)).unwrap();
        assert_eq!(shard::read_sidecar(&onto).unwrap(), None);
        assert_eq!(record::read(&onto).unwrap().len(), 8);
        let msg = |o: MergeOptions| {
            let e = merge(&o).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2);
            format!("{e:#}")
        };
        let m = msg(opts(vec![s0.clone(), s0b.clone(), s1.clone()], &out));
        assert!(
            m.contains("shard 0/2")
                && m.contains("s0.csv and")
                && m.contains("s0b.csv")
                && m.contains("overlapping"),
            "{m}"
        );
        let m = msg(opts(vec![s1.clone()], &out));
        assert!(m.contains("shard 0/2 missing (got 1 of 2 shards)"), "{m}");
        let mut o = opts(vec![s1.clone()], &out);
        o.partial = true;
        assert_eq!(merge(&o).unwrap().missing_shards, vec![0]);
        // a file labelled with the wrong shard
        shard::write_sidecar(&s0b, &side(1)).unwrap();
        let m = msg(opts(vec![s0, s0b], &out));
        assert!(
            m.contains("s0b.csv is shard 1/2 but holds a point of shard 0/2"),
            "{m}"
        );
    }
}
