//! Cluster calibration through the real binary: `sweep --shard` partitions, `merge` joins and
//! names what is wrong, `--metrics-addr` serves Prometheus metrics scraped during a real sweep,
//! the Grafana dashboard and Prometheus rules chart only metrics the binary exports, and
//! `watch` on a CPU build refuses in one line.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vramcal::harness::record::{self, Row, Status};

/// 16 fast points.
const GRID: &str = r#"
warmup = 0
repeats = 1

[[point_set]]
model = "tiny-gpt"
layers = [1, 2]
hidden = [32, 64]
vocab = 64
batch = [1, 2]
seq = [16, 32]
"#;

fn vramcal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args(args)
        .env_remove("VRAMCAL_FAIL_POINT")
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn one_line_exit_2(o: &Output, must: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for m in must {
        assert!(err.contains(m), "{m} not in {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn keys(p: &Path) -> BTreeSet<String> {
    record::read(p).unwrap().iter().map(Row::key).collect()
}

#[test]
fn shards_partition_the_grid_and_merge_joins_them_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(&grid, GRID).unwrap();
    let shard = |i: u32, g: &Path, name: &str| -> PathBuf {
        let out = dir.path().join(name);
        let line = ok(vramcal(&[
            "sweep",
            "--grid",
            s(g),
            "--out",
            s(&out),
            "--shard",
            &format!("{i}/3"),
        ]));
        assert!(line.contains(&format!("(shard {i}/3)")), "{line}");
        out
    };
    let files: Vec<PathBuf> = (0..3)
        .map(|i| shard(i, &grid, &format!("shard-{i}.csv")))
        .collect();
    let sets: Vec<BTreeSet<String>> = files.iter().map(|f| keys(f)).collect();
    let union: BTreeSet<String> = sets.iter().flatten().cloned().collect();
    assert_eq!(union.len(), 16, "every point in some shard");
    assert_eq!(
        sets.iter().map(BTreeSet::len).sum::<usize>(),
        16,
        "no point in two"
    );
    assert!(sets.iter().all(|k| !k.is_empty()), "{sets:?}");

    // the same grid written in another order cuts the same way
    let reordered = dir.path().join("reordered.toml");
    std::fs::write(
        &reordered,
        GRID.replace("[1, 2]\nhidden = [32, 64]", "[2, 1]\nhidden = [64, 32]")
            .replace("seq = [16, 32]", "seq = [32, 16]"),
    )
    .unwrap();
    assert_ne!(
        vramcal::harness::grid::load(&reordered).unwrap().points,
        vramcal::harness::grid::load(&grid).unwrap().points
    );
    let again = shard(1, &reordered, "again-1.csv");
    assert_eq!(keys(&again), sets[1]);

    // merge: the whole grid, one summary line
    let all = dir.path().join("all.csv");
    let mut args = vec!["merge"];
    args.extend(files.iter().map(|f| s(f)));
    args.extend(["--grid", s(&grid), "--out", s(&all)]);
    let line = ok(vramcal(&args));
    assert!(
        line.starts_with("merged 3 files (3 of 3 shards): 16 rows -> 16 points in"),
        "{line}"
    );
    assert!(
        line.contains("(16 ok)") && line.contains("0 conflicts"),
        "{line}"
    );
    let rows = record::read(&all).unwrap();
    assert_eq!(rows.len(), 16);
    assert!(rows.iter().all(|r| r.status == Status::Ok));
    assert_eq!(rows.iter().map(Row::key).collect::<BTreeSet<_>>(), union);

    // a missing shard, with and without --partial
    let o = vramcal(&["merge", s(&files[0]), s(&files[2]), "--out", s(&all)]);
    one_line_exit_2(&o, &["shard 1/3 missing", "--partial"]);
    let line = ok(vramcal(&[
        "merge",
        s(&files[0]),
        s(&files[2]),
        "--grid",
        s(&grid),
        "--out",
        s(&all),
        "--partial",
    ]));
    assert!(
        line.contains("1 shards missing")
            && line.contains(&format!("{} grid points missing", sets[1].len())),
        "{line}"
    );
    // without --partial, the grid check names the first missing point and its shard
    let o = vramcal(&[
        "merge",
        s(&files[0]),
        s(&files[2]),
        "--grid",
        s(&grid),
        "--out",
        s(&all),
    ]);
    assert_eq!(o.status.code(), Some(2));
    // overlapping shards: the reordered re-run of shard 1 is shard 1 again
    let o = vramcal(&[
        "merge",
        s(&files[0]),
        s(&files[1]),
        s(&files[2]),
        s(&again),
        "--out",
        s(&all),
    ]);
    one_line_exit_2(
        &o,
        &[
            "shard 1/3 is in both",
            "shard-1.csv",
            "again-1.csv",
            "overlapping",
        ],
    );

    // a shard CSV resumes only as its own shard; bad --shard values are one line, exit 2
    let o = vramcal(&[
        "sweep",
        "--grid",
        s(&grid),
        "--out",
        s(&files[0]),
        "--shard",
        "1/3",
        "--resume",
    ]);
    one_line_exit_2(
        &o,
        &["invalid shard", "was swept as shard 0/3", "--shard 0/3"],
    );
    let line = ok(vramcal(&[
        "sweep",
        "--grid",
        s(&grid),
        "--out",
        s(&files[0]),
        "--shard",
        "0/3",
        "--resume",
    ]));
    assert!(
        line.contains(&format!("{} already in", sets[0].len())),
        "{line}"
    );
    for bad in ["3/3", "1/0", "one/3"] {
        let o = vramcal(&[
            "sweep",
            "--grid",
            s(&grid),
            "--out",
            s(&dir.path().join("x.csv")),
            "--shard",
            bad,
        ]);
        one_line_exit_2(&o, &["--shard", bad, "0 <= I < N"]);
    }
}

/// Sample values of one metric (all label sets) in a Prometheus text exposition.
fn values(text: &str, name: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

fn get(addr: &str, path: &str) -> Option<(String, String)> {
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    c.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    Some((head.to_string(), body.to_string()))
}

/// Four points of a few hundred milliseconds each: long enough to scrape while it runs.
const SLOW_GRID: &str = r#"
warmup = 1
repeats = 3

[[point_set]]
model = "tiny-gpt"
layers = 2
hidden = 128
vocab = 256
batch = [1, 2]
seq = [64, 128]
"#;

#[test]
fn metrics_are_scraped_from_a_running_sweep_and_a_busy_port_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let grid = dir.path().join("grid.toml");
    std::fs::write(&grid, SLOW_GRID).unwrap();
    let out = dir.path().join("m.csv");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args([
            "sweep",
            "--grid",
            s(&grid),
            "--out",
            s(&out),
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .strip_prefix("metrics: http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address announced: {first}"))
        .to_string();
    // scrape until a point has finished while the sweep still runs
    let start = Instant::now();
    let mut during = None;
    while start.elapsed() < Duration::from_secs(300) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if let Some((head, body)) = get(&addr, "/metrics") {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(
                head.to_lowercase()
                    .contains("content-type: text/plain; version=0.0.4"),
                "{head}"
            );
            let done: f64 = values(&body, "vramcal_points_done_total").iter().sum();
            if (1.0..4.0).contains(&done) {
                during = Some(body);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (head, _) = get(&addr, "/nothing").expect("the server answers while the sweep runs");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let status = child.wait().unwrap();
    assert!(status.success());
    let body = during.expect("a scrape with 1 to 3 of the 4 points done");
    let rows = record::read(&out).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(values(&body, "vramcal_points_total"), vec![4.0]);
    assert_eq!(values(&body, "vramcal_points_failed_total"), vec![0.0]);
    // the exported peak and step time are those of a row the sweep wrote
    let peak = values(&body, "vramcal_point_peak_bytes")[0];
    let step = values(&body, "vramcal_point_step_seconds")[0];
    assert!(
        rows.iter().any(|r| r.peak_bytes == Some(peak as u64)
            && (r.step_ms_median.unwrap() / 1000.0 - step).abs() < 1e-9),
        "peak {peak}, step {step} not in {rows:?}"
    );
    let planned = values(&body, "vramcal_planned_bytes")[0];
    assert!(planned > 0.0);
    let used = values(&body, "vramcal_device_memory_used_bytes")[0];
    let total = values(&body, "vramcal_device_memory_total_bytes")[0];
    assert!(used > 0.0 && used < total, "{used} of {total}");
    // every metric a CPU sweep knows is exported; fragmentation needs a reserving allocator
    // (CUDA) and process memory is watch's
    let got = names(&body);
    for n in vramcal::metrics::EXPORTED {
        let cpu_unknown = [
            "vramcal_allocator_fragmentation_ratio",
            "vramcal_process_memory_used_bytes",
        ];
        assert_eq!(got.contains(n), !cpu_unknown.contains(&n), "{n} in {got:?}");
    }
    assert!(
        body.contains("vramcal_info{backend=\"candle\",command=\"sweep\""),
        "{body}"
    );

    // a port in use: one line naming the flag, exit 2, nothing measured
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let out2 = dir.path().join("busy.csv");
    let o = vramcal(&[
        "sweep",
        "--grid",
        s(&grid),
        "--out",
        s(&out2),
        "--metrics-addr",
        &busy,
    ]);
    one_line_exit_2(&o, &["invalid metrics-addr", &busy, "in use"]);
    assert!(!out2.exists());
    let o = vramcal(&[
        "calibrate",
        "--quick",
        "--metrics-addr",
        &busy,
        "--data-dir",
        s(dir.path()),
    ]);
    one_line_exit_2(&o, &["invalid metrics-addr", "in use"]);
    let o = vramcal(&[
        "sweep",
        "--grid",
        s(&grid),
        "--out",
        s(&out2),
        "--metrics-addr",
        "localhost",
    ]);
    one_line_exit_2(&o, &["invalid metrics-addr", "HOST:PORT"]);
}

/// Every `vramcal_*` name in the text.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("vramcal_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every `expr` string anywhere in a JSON value.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_and_alert_rules_use_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exported: BTreeSet<String> = vramcal::metrics::EXPORTED
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/vramcal.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    exprs(&dash, &mut queries);
    assert!(queries.len() >= 8, "{queries:?}");
    let used: BTreeSet<String> = queries.iter().flat_map(|q| referenced(q)).collect();
    assert!(
        used.is_subset(&exported),
        "not exported: {:?}",
        used.difference(&exported).collect::<Vec<_>>()
    );
    assert_eq!(used, exported, "every exported metric is charted");
    // the alert: on a panel, its condition on a query comparing measured memory with the plan
    let panels = dash["panels"].as_array().unwrap();
    let alerted: Vec<&serde_json::Value> =
        panels.iter().filter(|p| p.get("alert").is_some()).collect();
    assert_eq!(alerted.len(), 1);
    let p = alerted[0];
    let cond_ref = p["alert"]["conditions"][0]["query"]["params"][0]
        .as_str()
        .unwrap();
    let q = p["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["refId"] == cond_ref)
        .expect("the alert's query is a target of its panel");
    let e = q["expr"].as_str().unwrap();
    assert!(
        e.contains("vramcal_planned_bytes") && e.contains("vramcal_process_memory_used_bytes"),
        "{e}"
    );
    assert_eq!(p["alert"]["conditions"][0]["evaluator"]["type"], "gt");
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");

    let rules: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/vramcal-alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut rexprs = Vec::new();
    exprs(&rules, &mut rexprs);
    assert!(!rexprs.is_empty());
    for e in &rexprs {
        assert!(referenced(e).is_subset(&exported), "{e}");
    }
    assert!(
        rexprs.iter().any(|e| e.contains("> vramcal_planned_bytes")),
        "{rexprs:?}"
    );
}

#[test]
fn watch_on_a_cpu_build_is_one_line_exit_2() {
    if cfg!(feature = "cuda") {
        return; // a CUDA build polls NVML instead (needs a GPU; not run here)
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let est = ok(vramcal(&["estimate", "--model", "tiny-gpt", "--json"]));
    std::fs::write(&plan, est).unwrap();
    let o = vramcal(&["watch", "--plan", s(&plan)]);
    one_line_exit_2(&o, &["invalid watch", "--features cuda"]);
    // the plan itself is what `watch` would compare against
    assert!(vramcal::cli::watch::read_plan(&plan).unwrap().device_used > 0);
}
