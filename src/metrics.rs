//! Prometheus metrics of a running sweep (`sweep`/`calibrate --metrics-addr HOST:PORT`) or
//! watch (`vramcal watch`), served as the Prometheus text format on `http://HOST:PORT/metrics`.
//!
//! The values are kept by the `prometheus` crate and served by `tiny_http` on one background
//! thread, so a scrape never waits for a point to finish. A gauge whose value is not known yet
//! (no point finished, a probe this device lacks) is not exported at all rather than exported
//! as a misleading 0: it is registered the first time it is set. deploy/grafana/vramcal.json
//! charts these names; a test keeps its queries within [`EXPORTED`].

use crate::error::input_err;
use crate::harness::record::{Row, Status};
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::{Arc, Once};

/// Every metric name vramcal exports (sweep and watch together).
pub const EXPORTED: [&str; 11] = [
    "vramcal_info",
    "vramcal_points_total",
    "vramcal_points_done_total",
    "vramcal_points_failed_total",
    "vramcal_point_peak_bytes",
    "vramcal_planned_bytes",
    "vramcal_point_step_seconds",
    "vramcal_device_memory_used_bytes",
    "vramcal_device_memory_total_bytes",
    "vramcal_allocator_fragmentation_ratio",
    "vramcal_process_memory_used_bytes",
];

/// A gauge that joins the registry when first set (see the module docs).
#[derive(Clone)]
struct LazyGauge {
    gauge: Gauge,
    registry: Registry,
    once: Arc<Once>,
}

impl LazyGauge {
    fn new(registry: &Registry, name: &str, help: &str) -> Self {
        Self {
            gauge: Gauge::new(name, help).expect("a valid metric name"),
            registry: registry.clone(),
            once: Arc::new(Once::new()),
        }
    }

    fn set(&self, v: f64) {
        self.gauge.set(v);
        self.once.call_once(|| {
            self.registry
                .register(Box::new(self.gauge.clone()))
                .expect("registered once");
        });
    }
}

/// The metrics of one vramcal process; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    info: GaugeVec,
    points_total: IntGauge,
    points_done: IntCounterVec,
    points_failed: IntCounter,
    point_peak: LazyGauge,
    planned: LazyGauge,
    step_seconds: LazyGauge,
    device_used: LazyGauge,
    device_total: LazyGauge,
    fragmentation: LazyGauge,
    process_used: LazyGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let lazy = |name: &str, help: &str| LazyGauge::new(&registry, name, help);
        let info = GaugeVec::new(
            Opts::new(
                "vramcal_info",
                "1, labelled with what this process measures or watches",
            ),
            &["command", "device_id", "backend", "shard"],
        )
        .expect("valid");
        let points_done = IntCounterVec::new(
            Opts::new(
                "vramcal_points_done_total",
                "grid points finished by this sweep, by row status",
            ),
            &["status"],
        )
        .expect("valid");
        Self {
            info,
            points_total: IntGauge::new(
                "vramcal_points_total",
                "grid points this sweep (this shard) has to measure, less those already in a resumed CSV",
            )
            .expect("valid"),
            points_done,
            points_failed: IntCounter::new(
                "vramcal_points_failed_total",
                "points that ended oom, error, killed or timeout",
            )
            .expect("valid"),
            point_peak: lazy(
                "vramcal_point_peak_bytes",
                "peak bytes of the last measured point (the primary probe)",
            ),
            planned: lazy(
                "vramcal_planned_bytes",
                "the planner's per-GPU peak for the last ok point (sweep) or the plan (watch)",
            ),
            step_seconds: lazy(
                "vramcal_point_step_seconds",
                "median step time of the last measured point",
            ),
            device_used: lazy(
                "vramcal_device_memory_used_bytes",
                "device memory in use (CPU: host RAM less MemAvailable; CUDA: cuMemGetInfo, else NVML)",
            ),
            device_total: lazy(
                "vramcal_device_memory_total_bytes",
                "device memory in all",
            ),
            fragmentation: lazy(
                "vramcal_allocator_fragmentation_ratio",
                "1 - peak allocated / peak reserved of the last point, where the allocator reports both",
            ),
            process_used: lazy(
                "vramcal_process_memory_used_bytes",
                "GPU memory of the watched process (NVML)",
            ),
            registry,
        }
    }

    /// Starts a sweep of `points` points: the point counters appear, every status at 0.
    pub fn start_sweep(&self, device_id: &str, backend: &str, shard: &str, points: usize) {
        self.set_info("sweep", device_id, backend, shard);
        let _ = self.registry.register(Box::new(self.points_total.clone()));
        let _ = self.registry.register(Box::new(self.points_done.clone()));
        let _ = self.registry.register(Box::new(self.points_failed.clone()));
        self.points_total.set(points as i64);
        for s in Status::ALL {
            self.points_done.with_label_values(&[s.as_str()]);
        }
    }

    /// The `vramcal_info` series (registered on first use).
    pub fn set_info(&self, command: &str, device_id: &str, backend: &str, shard: &str) {
        let _ = self.registry.register(Box::new(self.info.clone()));
        self.info
            .with_label_values(&[command, device_id, backend, shard])
            .set(1.0);
    }

    /// A point finished with `row` (already resumed points are not counted: they were not
    /// measured by this process); `planned` is the planner's per-GPU peak for it. Peak, plan,
    /// step time and memory are those of the last `ok` point.
    pub fn point_done(&self, row: &Row, planned: u64) {
        self.points_done
            .with_label_values(&[row.status.as_str()])
            .inc();
        if matches!(
            row.status,
            Status::Oom | Status::Error | Status::Killed | Status::Timeout
        ) {
            self.points_failed.inc();
        }
        if row.status != Status::Ok {
            return;
        }
        // set with the peak, so the two always describe the same point (the alert compares them)
        self.planned.set(planned as f64);
        if let Some(p) = row.peak_bytes {
            self.point_peak.set(p as f64);
        }
        if let Some(ms) = row.step_ms_median {
            self.step_seconds.set(ms / 1000.0);
        }
        // cuMemGetInfo is device-wide (total - free); NVML's figure is the child's own share
        if let Some(used) = row.memgetinfo_bytes.or(row.nvml_bytes) {
            self.device_used.set(used as f64);
        }
        if let (Some(peak), Some(reserved)) = (row.peak_bytes, row.peak_reserved_bytes) {
            if reserved > 0 && reserved >= peak {
                self.fragmentation.set(1.0 - peak as f64 / reserved as f64);
            }
        }
    }

    pub fn set_planned(&self, bytes: u64) {
        self.planned.set(bytes as f64);
    }

    pub fn set_device_memory(&self, used: Option<u64>, total: Option<u64>) {
        if let Some(u) = used {
            self.device_used.set(u as f64);
        }
        if let Some(t) = total.filter(|t| *t > 0) {
            self.device_total.set(t as f64);
        }
    }

    pub fn set_process_memory(&self, used: u64) {
        self.process_used.set(used as f64);
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into memory");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// The metrics HTTP server; it stops serving when dropped.
pub struct Server {
    server: Arc<tiny_http::Server>,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// Binds `addr` (`HOST:PORT`; port 0 picks a free one) and serves `metrics` on `/metrics` from a
/// background thread. A malformed address or one in use is a one-line input error naming
/// `--metrics-addr` (exit 2), before anything is measured.
pub fn serve(addr: &str, metrics: &Metrics) -> anyhow::Result<Server> {
    let resolved: Option<SocketAddr> = addr.to_socket_addrs().ok().and_then(|mut a| a.next());
    let Some(sock) = resolved else {
        return input_err(
            "metrics-addr",
            format!("'{addr}' is not HOST:PORT; accepted e.g. 127.0.0.1:9400 or 0.0.0.0:9400"),
        );
    };
    let listener = match TcpListener::bind(sock) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return input_err(
                "metrics-addr",
                format!("{addr} is in use by another process; accepted a free HOST:PORT"),
            )
        }
        Err(e) => {
            return input_err(
                "metrics-addr",
                format!(
                    "cannot listen on {addr} ({e}); accepted a local HOST:PORT this user may bind"
                ),
            )
        }
    };
    let bound = listener.local_addr()?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| anyhow::anyhow!("serving metrics on {addr}: {e}"))?;
    let server = Arc::new(server);
    let (srv, m) = (server.clone(), metrics.clone());
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in srv.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("");
                let resp = if path == "/metrics" || path == "/" {
                    let header = tiny_http::Header::from_bytes(
                        "Content-Type",
                        TextEncoder::new().format_type(),
                    )
                    .expect("a valid header");
                    tiny_http::Response::from_string(m.render()).with_header(header)
                } else {
                    tiny_http::Response::from_string("not found; metrics are on /metrics\n")
                        .with_status_code(404)
                };
                // a scraper that hung up is its problem, not the sweep's
                let _ = req.respond(resp);
            }
        })?;
    Ok(Server {
        server,
        addr: bound,
    })
}

/// Serves metrics when `--metrics-addr` was given, announcing the address on stderr.
pub fn serve_opt(addr: Option<&str>) -> anyhow::Result<Option<(Metrics, Server)>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let m = Metrics::new();
    let server = serve(addr, &m)?;
    eprintln!("metrics: http://{}/metrics", server.addr);
    Ok(Some((m, server)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
            .collect()
    }

    /// With every value known, exactly the names of [`EXPORTED`] come out; before, only the
    /// counters (no gauge pretends to a 0 it has not seen).
    #[test]
    fn every_exported_name_appears_once_known_and_none_before() {
        let m = Metrics::new();
        assert_eq!(m.render(), "");
        m.start_sweep("cpu-x", "candle", "1/4", 7);
        let before = names(&m.render());
        assert!(before.contains("vramcal_points_total"));
        assert!(!before.contains("vramcal_point_peak_bytes"));
        let info = crate::harness::measure::cpu_info();
        let model = crate::spec::presets::preset("tiny-gpt").unwrap();
        let mut row = crate::harness::measure::row_template(
            &info,
            &model,
            &crate::spec::TrainSpec::default(),
        );
        row.status = Status::Ok;
        row.peak_bytes = Some(750);
        row.peak_reserved_bytes = Some(1000);
        row.step_ms_median = Some(12.5);
        row.nvml_bytes = Some(5000);
        m.point_done(&row, 800);
        row.status = Status::Oom;
        m.point_done(&row, 900);
        m.set_device_memory(Some(6000), Some(10_000));
        m.set_process_memory(4000);
        let text = m.render();
        let all = names(&text);
        let want: std::collections::BTreeSet<String> =
            EXPORTED.iter().map(|s| s.to_string()).collect();
        assert_eq!(all, want, "{text}");
        assert!(text.contains("vramcal_points_total 7"), "{text}");
        assert!(
            text.contains("vramcal_points_done_total{status=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vramcal_points_done_total{status=\"oom\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vramcal_points_done_total{status=\"timeout\"} 0"),
            "{text}"
        );
        assert!(text.contains("vramcal_points_failed_total 1"), "{text}");
        assert!(text.contains("vramcal_point_peak_bytes 750"), "{text}");
        // the plan of the ok point, not of the later failed one
        assert!(text.contains("vramcal_planned_bytes 800"), "{text}");
        assert!(text.contains("vramcal_point_step_seconds 0.0125"), "{text}");
        assert!(
            text.contains("vramcal_allocator_fragmentation_ratio 0.25"),
            "{text}"
        );
        assert!(text.contains("shard=\"1/4\""), "{text}");
    }

    #[test]
    fn a_bad_or_busy_address_is_an_input_error() {
        let m = Metrics::new();
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap().to_string();
        for (a, want) in [(addr.as_str(), "in use"), ("nonsense", "not HOST:PORT")] {
            let e = serve(a, &m).err().expect("refused");
            assert_eq!(crate::error::exit_code(&e), 2);
            let msg = format!("{e:#}");
            assert!(msg.contains("metrics-addr") && msg.contains(want), "{msg}");
        }
    }
}
