//! `vramcal watch --plan plan.json [--pid N]`: while a user's own training runs, poll NVML and
//! compare the GPU memory it uses with what `vramcal estimate --json` planned (the plan's
//! `memory.device_used`: what nvidia-smi shows for the process, CUDA context included). One
//! line per poll; with `--metrics-addr` the same numbers are Prometheus metrics, which the
//! Grafana dashboard's "memory above plan" alert watches.
//!
//! NVML needs the CUDA build (`--features cuda`); a CPU build says so in one line, exit 2.

use crate::error::input_err;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Plan to compare with: the output of `vramcal estimate ... --json`
    #[arg(long)]
    pub plan: PathBuf,
    /// Process to watch (its GPU memory on every GPU, summed); default: GPU --gpu as a whole
    #[arg(long)]
    pub pid: Option<u32>,
    /// NVML index of the GPU whose device-wide memory is reported
    #[arg(long, default_value_t = 0)]
    pub gpu: u32,
    /// Seconds between polls
    #[arg(long, default_value_t = 1.0)]
    pub interval_s: f64,
    /// Stop after this many polls (default: until interrupted)
    #[arg(long)]
    pub count: Option<u64>,
    /// Serve Prometheus metrics on HOST:PORT (see `vramcal sweep --help`)
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

/// What the plan says one GPU will hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// `memory.device_used`: the process's footprint as nvidia-smi shows it
    pub device_used: u64,
    /// `memory.total`: the framework's allocated peak
    pub total: u64,
}

/// Reads a plan written by `vramcal estimate --json`; anything else is a one-line input error
/// naming `--plan`.
pub fn read_plan(path: &Path) -> anyhow::Result<Planned> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return input_err(
                "plan",
                format!(
                    "cannot read {} ({e}); accepted the JSON of `vramcal estimate --json`",
                    path.display()
                ),
            )
        }
    };
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return input_err(
                "plan",
                format!(
                    "{} is not JSON ({e}); accepted the JSON of `vramcal estimate --json`",
                    path.display()
                ),
            )
        }
    };
    let mem = &v["memory"];
    match (mem["device_used"].as_u64(), mem["total"].as_u64()) {
        (Some(device_used), Some(total)) if device_used > 0 => Ok(Planned { device_used, total }),
        _ => input_err(
            "plan",
            format!(
                "{} has no memory.device_used and memory.total in bytes; accepted the JSON of `vramcal estimate --json`",
                path.display()
            ),
        ),
    }
}

/// `used` against `planned` in words: `5.20 GiB of 6.00 GiB planned (87 %)`.
pub fn compare(used: u64, planned: u64) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    format!(
        "{:.2} GiB of {:.2} GiB planned ({:.0} %){}",
        gib(used),
        gib(planned),
        100.0 * used as f64 / planned.max(1) as f64,
        if used > planned { ", ABOVE PLAN" } else { "" }
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !cfg!(feature = "cuda") {
        return input_err(
            "watch",
            "needs NVML, which this CPU build of vramcal lacks; accepted on a build with --features cuda (scripts/build-cuda.sh) on a machine with an NVIDIA driver",
        );
    }
    if !(args.interval_s.is_finite() && args.interval_s >= 0.05) {
        return input_err(
            "interval-s",
            format!("{}; accepted a number of seconds >= 0.05", args.interval_s),
        );
    }
    let plan = read_plan(&args.plan)?;
    if let Some(pid) = args.pid.filter(|p| !pid_alive(*p)) {
        return input_err(
            "pid",
            format!("{pid} is not a running process; accepted the pid of a running training job"),
        );
    }
    let served = crate::metrics::serve_opt(args.metrics_addr.as_deref())?;
    poll(&args, plan, served.as_ref().map(|(m, _)| m))
}

/// Whether a process with this pid exists (Linux: /proc; elsewhere assumed).
fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

#[cfg(not(feature = "cuda"))]
fn poll(_: &Args, _: Planned, _: Option<&crate::metrics::Metrics>) -> anyhow::Result<()> {
    unreachable!("run refuses CPU builds first")
}

#[cfg(feature = "cuda")]
fn poll(
    args: &Args,
    plan: Planned,
    metrics: Option<&crate::metrics::Metrics>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use nvml_wrapper::enums::device::UsedGpuMemory;
    let nvml =
        nvml_wrapper::Nvml::init().context("starting NVML (is the NVIDIA driver loaded?)")?;
    let count = nvml.device_count()?;
    if args.gpu >= count {
        return input_err(
            "gpu",
            format!(
                "{}; accepted 0..{count} (the NVML indices of this machine's GPUs)",
                args.gpu
            ),
        );
    }
    let dev = nvml.device_by_index(args.gpu)?;
    if let Some(m) = metrics {
        let name = dev.name().unwrap_or_default();
        let pid = args.pid.map_or(String::new(), |p| format!("pid {p}"));
        m.set_info("watch", &name, "", &pid);
        m.set_planned(plan.device_used);
    }
    let start = std::time::Instant::now();
    let mut polls = 0u64;
    let mut peak = 0u64;
    loop {
        if let Some(pid) = args.pid.filter(|p| !pid_alive(*p)) {
            println!(
                "pid {pid} has ended; its highest reading was {}",
                compare(peak, plan.device_used)
            );
            return Ok(());
        }
        let info = dev.memory_info()?;
        if let Some(m) = metrics {
            m.set_device_memory(Some(info.used), Some(info.total));
        }
        let mut line = format!(
            "{:>7.1} s  gpu {}: {}",
            start.elapsed().as_secs_f64(),
            args.gpu,
            compare(info.used, plan.device_used)
        );
        if let Some(pid) = args.pid {
            let mut used = None;
            for i in 0..count {
                let d = nvml.device_by_index(i)?;
                for p in d.running_compute_processes().unwrap_or_default() {
                    if let (true, UsedGpuMemory::Used(b)) = (p.pid == pid, p.used_gpu_memory) {
                        *used.get_or_insert(0u64) += b;
                    }
                }
            }
            match used {
                Some(b) => {
                    if let Some(m) = metrics {
                        m.set_process_memory(b);
                    }
                    peak = peak.max(b);
                    line = format!(
                        "{:>7.1} s  pid {pid}: {}",
                        start.elapsed().as_secs_f64(),
                        compare(b, plan.device_used)
                    );
                }
                None => line.push_str(&format!("; pid {pid} holds no GPU memory (yet)")),
            }
        }
        println!("{line}");
        polls += 1;
        if args.count.is_some_and(|c| polls >= c) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(args.interval_s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_read_from_estimate_json_and_other_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plan.json");
        std::fs::write(&p, r#"{"memory":{"total":100,"device_used":600}}"#).unwrap();
        assert_eq!(
            read_plan(&p).unwrap(),
            Planned {
                device_used: 600,
                total: 100
            }
        );
        for bad in [
            "{}",
            "not json",
            r#"{"memory":{"total":-1,"device_used":5}}"#,
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = read_plan(&p).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2);
            assert!(format!("{e:#}").contains("invalid plan"), "{e:#}");
        }
        assert!(compare(3 << 30, 2 << 30).ends_with("(150 %), ABOVE PLAN"));
        assert!(compare(1 << 30, 2 << 30).ends_with("(50 %)"));
    }
}
