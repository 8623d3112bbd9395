//! deploy/k8s/: the manifests read as Kubernetes objects that fit together (offline, always), and
//! they validate against the Kubernetes JSON schema (kubernetes-validate from PyPI, installed
//! into the target dir at test time; skipped with a printed reason where Python, pip or PyPI is
//! unavailable).

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

/// Every document of every manifest, as JSON values.
fn objects() -> Vec<(PathBuf, serde_json::Value)> {
    let mut out = Vec::new();
    for p in manifests() {
        let text = std::fs::read_to_string(&p).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            out.push((p.clone(), v));
        }
    }
    out
}

fn find<'a>(
    objs: &'a [(PathBuf, serde_json::Value)],
    kind: &str,
    name: &str,
) -> &'a serde_json::Value {
    &objs
        .iter()
        .find(|(_, v)| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
        .1
}

/// The pod's volumes are all mounted, every mount has a volume, and the results volume is the
/// claim the PVC manifest defines.
fn check_pod(pod: &serde_json::Value, claim: &str) -> String {
    assert_eq!(pod["restartPolicy"], "Never");
    let volumes: Vec<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let c = &pod["containers"][0];
    for m in c["volumeMounts"].as_array().unwrap() {
        assert!(volumes.contains(&m["name"].as_str().unwrap()), "{m}");
    }
    let results = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "results")
        .unwrap();
    assert_eq!(results["persistentVolumeClaim"]["claimName"], claim);
    c["args"][0].as_str().unwrap().to_string()
}

#[test]
fn the_manifests_fit_together() {
    let objs = objects();
    assert!(objs.len() >= 3, "{} objects", objs.len());
    for (p, v) in &objs {
        for field in ["apiVersion", "kind"] {
            assert!(v[field].is_string(), "{}: no {field}", p.display());
        }
        assert!(
            v["metadata"]["name"].is_string(),
            "{}: no name",
            p.display()
        );
    }
    let pvc = find(&objs, "PersistentVolumeClaim", "vramcal-results");
    assert_eq!(pvc["spec"]["accessModes"][0], "ReadWriteMany");

    let sweep = find(&objs, "Job", "vramcal-sweep");
    let spec = &sweep["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let n = spec["completions"].as_u64().unwrap();
    assert!(n >= 1 && spec["parallelism"].as_u64().unwrap() <= n);
    let pod = &spec["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 1);
    let shards = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SHARDS")
        .unwrap();
    assert_eq!(
        shards["value"],
        n.to_string(),
        "SHARDS must equal completions"
    );
    let cmd = check_pod(pod, "vramcal-results");
    for part in [
        "vramcal sweep",
        "--shard \"${JOB_COMPLETION_INDEX}/${SHARDS}\"",
        "/results/shard-${JOB_COMPLETION_INDEX}.csv",
        "--resume",
        "--device cuda:0",
        "--metrics-addr 0.0.0.0:9400",
    ] {
        assert!(cmd.contains(part), "{part} not in {cmd}");
    }
    assert_eq!(c["ports"][0]["containerPort"], 9400);

    let merge = find(&objs, "Job", "vramcal-merge");
    let cmd = check_pod(&merge["spec"]["template"]["spec"], "vramcal-results");
    for part in [
        "vramcal merge /results/shard-*.csv",
        "--grid",
        "vramcal fit",
        "vramcal report",
    ] {
        assert!(cmd.contains(part), "{part} not in {cmd}");
    }
    // the command lines parse as vramcal's own: every flag they pass exists
    let bin = env!("CARGO_BIN_EXE_vramcal");
    for sub in ["sweep", "merge"] {
        let help = Command::new(bin).args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        let text = if sub == "sweep" {
            check_pod(pod, "vramcal-results")
        } else {
            cmd.clone()
        };
        let line = text
            .split(';')
            .find(|l| l.contains(&format!("vramcal {sub}")))
            .unwrap();
        for flag in line.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(help.contains(flag), "vramcal {sub} has no {flag}");
        }
    }
}

/// kubernetes-validate in the target dir (installed once), or why it cannot be had.
fn validator() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubernetes-validate");
    let ready = |d: &Path| {
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--version"])
            .env("PYTHONPATH", d)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&dir) {
        return Ok(dir);
    }
    let o = Command::new("timeout")
        .args([
            "300",
            "python3",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .arg("kubernetes-validate")
        .output()
        .map_err(|e| format!("cannot run python3 -m pip ({e})"))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        return Err(format!(
            "pip install kubernetes-validate failed: {}",
            err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
        ));
    }
    if ready(&dir) {
        Ok(dir)
    } else {
        Err("kubernetes-validate installed but does not run".into())
    }
}

fn validate(dir: &Path, files: &[PathBuf]) -> std::process::Output {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .env("PYTHONPATH", dir)
        .output()
        .unwrap()
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schema() {
    let dir = match validator() {
        Ok(d) => d,
        Err(why) => {
            println!("SKIP Kubernetes schema validation: {why}");
            return;
        }
    };
    let files = manifests();
    let o = validate(&dir, &files);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert_eq!(text.matches("passed").count(), objects().len(), "{text}");
    // the validator does reject a manifest with a misspelt field and a wrong type
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    let good = std::fs::read_to_string(
        files
            .iter()
            .find(|p| p.ends_with("sweep-indexed-job.yaml"))
            .unwrap(),
    )
    .unwrap();
    std::fs::write(&bad, good.replace("completions: 4", "completions: four")).unwrap();
    let o = validate(&dir, std::slice::from_ref(&bad));
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
