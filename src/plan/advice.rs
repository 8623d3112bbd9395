//! Cluster advice from the capacity-planning rules of thumb, each labelled with its rule and
//! source so a reader can tell advice from measurement: the interconnect check, spare nodes for
//! faults, and for preemptible (spot) runs the checkpoint interval and what it writes.

use crate::plan::comm::Cluster;
use crate::plan::step_time::StepTime;
use serde::Serialize;

/// Communication share of the step above which the interconnect rule is checked.
pub const COMM_SHARE: f64 = 0.2;
/// NVLink-class bandwidth the rule asks for, GB/s over both directions (A100 NVLink 3).
pub const NVLINK_RULE_GBS: f64 = 600.0;
/// Spare capacity for hardware faults on multi-node jobs.
pub const SPARE_FRACTION: f64 = 0.2;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Advice {
    /// what the rule is, in a user's words
    pub rule: &'static str,
    /// where it comes from
    pub source: &'static str,
    /// what it says for this job
    pub text: String,
}

/// A preemptible run: its mean time between interruptions and the checkpoint write bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spot {
    pub mtbf_hours: f64,
    /// checkpoint write bandwidth to storage, Gb/s
    pub storage_gbps: f64,
}

/// Young's first-order optimum checkpoint interval, `sqrt(2 · write time · MTBF)` seconds
/// (Young 1974; Daly 2006 refines it with higher-order terms that matter only when the write
/// time approaches the MTBF).
pub fn checkpoint_interval_s(write_s: f64, mtbf_s: f64) -> f64 {
    (2.0 * write_s * mtbf_s).sqrt()
}

pub fn advice(
    gpus: u64,
    cluster: &Cluster,
    step: Option<&StepTime>,
    link_gbs: Option<f64>,
    checkpoint_bytes: u64,
    spot: Option<&Spot>,
) -> Vec<Advice> {
    let mut out = Vec::new();
    if let (Some(st), Some(link)) = (step, link_gbs) {
        if let Some(c) = &st.communication {
            let share = c.total_s / st.seconds.max(f64::MIN_POSITIVE);
            if share > COMM_SHARE {
                let both_ways = 2.0 * link;
                out.push(Advice {
                    rule: "interconnect: NVLink-class bandwidth (>= 600 GB/s) when communication is over 20 % of the step",
                    source: "capacity-planning rule of thumb; volumes from the ZeRO paper (Rajbhandari et al. 2020)",
                    text: if both_ways < NVLINK_RULE_GBS {
                        format!(
                            "communication takes {:.0} % of the step over {} ({both_ways:.0} GB/s both ways): below the rule; NVLink GPUs, fewer GPUs with more batch each, or a lower ZeRO stage cut it",
                            share * 100.0,
                            c.over
                        )
                    } else {
                        format!(
                            "communication takes {:.0} % of the step; {} meets the rule",
                            share * 100.0,
                            c.over
                        )
                    },
                });
            }
        }
    }
    let nodes = gpus.div_ceil(cluster.gpus_per_node.max(1));
    if nodes > 1 {
        let with_spare = (nodes as f64 * (1.0 + SPARE_FRACTION)).ceil() as u64;
        out.push(Advice {
            rule: "spare nodes: +20 % for hardware faults on multi-node jobs",
            source: "capacity-planning rule of thumb",
            text: format!(
                "{nodes} nodes of {} GPUs: plan {with_spare} so a failed node is replaced without waiting",
                cluster.gpus_per_node
            ),
        });
    }
    if let Some(s) = spot {
        let write_s = checkpoint_bytes as f64 / (s.storage_gbps * 1e9 / 8.0);
        let mtbf_s = s.mtbf_hours * 3600.0;
        let interval = checkpoint_interval_s(write_s, mtbf_s);
        let per_day = 86_400.0 / interval;
        out.push(Advice {
            rule: "checkpoint interval for preemptible runs: sqrt(2 x checkpoint write time x MTBF)",
            source: "Young 1974, \"A first order approximation to the optimum checkpoint interval\"; Daly 2006",
            text: format!(
                "a {:.1} GB checkpoint at {} Gb/s takes {:.0} s to write; with an interruption every {} h on average, save every {:.0} min ({per_day:.0} saves, {:.2} TB written per day; keep the last few: storage counts the kept ones)",
                checkpoint_bytes as f64 / 1e9,
                s.storage_gbps,
                write_s,
                s.mtbf_hours,
                interval / 60.0,
                per_day * checkpoint_bytes as f64 / 1e12
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn young_interval() {
        // 60 s writes, one interruption per 6 h: sqrt(2 * 60 * 21600) = 1609.97 s
        assert!((checkpoint_interval_s(60.0, 21_600.0) - 1_609.968_943).abs() < 1e-3);
    }

    #[test]
    fn spare_nodes_and_spot_advice() {
        let c = Cluster::default();
        let spot = Spot {
            mtbf_hours: 6.0,
            storage_gbps: 8.0,
        };
        // 60 GB at 8 Gb/s = 60 s
        let a = advice(64, &c, None, None, 60_000_000_000, Some(&spot));
        assert_eq!(a.len(), 2);
        assert!(
            a[0].text.starts_with("8 nodes of 8 GPUs: plan 10"),
            "{}",
            a[0].text
        );
        assert!(a[1].text.contains("save every 27 min"), "{}", a[1].text);
        assert!(advice(8, &c, None, None, 1, None).is_empty());
    }
}
