//! The report's README.md: what was run, the coefficient table beside the literature, held-out
//! accuracy against the rule of thumb and the literature, measured findings, exclusions, plots.

use super::accuracy::{Accuracy, GroupScores};
use super::findings::{Findings, PairEffect};
use crate::coeffs::Coefficients;
use crate::fit::memfit::COLS;
use crate::fit::points::Point;
use crate::fit::split::Metrics;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Compact number: engineering style for bytes and rates, plain for small coefficients.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn metrics_row(name: &str, m: &Metrics) -> String {
    if m.n == 0 {
        return format!("| {name} | n/a | n/a | n/a | 0 |\n");
    }
    format!(
        "| {name} | {:.2} | {:.2} | {:.2} | {} |\n",
        m.mape, m.median_abs_pct, m.max_abs_pct, m.n
    )
}

fn opt_pct(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1} %"))
        .unwrap_or_else(|| "n/a".into())
}

fn group_table(out: &mut String, groups: &[GroupScores]) {
    out.push_str("| group (family/precision/ckpt) | n | fitted MAPE | fitted max | literature MAPE | rule-of-thumb MAPE | time MAPE (fitted) | time max |\n|---|---|---|---|---|---|---|---|\n");
    for g in groups {
        let t = if g.time_fitted.n > 0 {
            format!(
                "{:.2} | {:.2}",
                g.time_fitted.mape, g.time_fitted.max_abs_pct
            )
        } else {
            "n/a | n/a".into()
        };
        let _ = writeln!(
            out,
            "| {} | {}{} | {:.2} | {:.2} | {:.2} | {:.2} | {t} |",
            g.group,
            g.peak_fitted.n,
            if g.too_few_to_score {
                " (too few to score)"
            } else {
                ""
            },
            g.peak_fitted.mape,
            g.peak_fitted.max_abs_pct,
            g.peak_literature.mape,
            g.peak_seed_formula.mape
        );
    }
}

fn grid_summary(points: &[Point]) -> String {
    let mut by: BTreeMap<String, [BTreeSet<String>; 5]> = BTreeMap::new();
    for p in points {
        let e = by.entry(p.model_label()).or_default();
        e[0].insert(format!("{:>5}", p.train.batch));
        e[1].insert(format!("{:>5}", p.length()));
        e[2].insert(p.precision().to_string());
        e[3].insert(p.train.checkpointing.to_string());
        e[4].insert(p.train.optimizer.to_string());
    }
    let mut out = String::from("| model | params | batch | seq / image | precision | checkpointing | optimizer |\n|---|---|---|---|---|---|---|\n");
    for (m, sets) in by {
        let params = points
            .iter()
            .find(|p| p.model_label() == m)
            .map(|p| p.terms.params)
            .unwrap_or(0);
        let j = |s: &BTreeSet<String>| {
            s.iter()
                .map(|v| v.trim().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| {m} | {params} | {} | {} | {} | {} | {} |",
            j(&sets[0]),
            j(&sets[1]),
            j(&sets[2]),
            j(&sets[3]),
            j(&sets[4])
        );
    }
    out
}

fn coefficient_tables(out: &mut String, table: &Coefficients) {
    let lit = Coefficients::literature();
    let se = table.residuals.as_ref();
    // In-sample residuals separate the model form's limit (error even on fitted points) from
    // what held-out scoring adds.
    out.push_str("\nIn-sample fit of each mode on all its points (a high value here is a limit of the linear feature set, not of the data split). The form is the one the fit chose by the Bayesian information criterion where the literature has measured PyTorch blocks for the mode: those blocks held known, or per-feature coefficients:\n\n| mode | how fitted | form | n | in-sample MAPE | in-sample max |\n|---|---|---|---|---|---|\n");
    for m in &table.modes {
        let key = format!("{}/{}", m.family.as_str(), m.precision);
        let d = se.map(|r| &r[&key]);
        let get = |k: &str, f: &str| d.and_then(|d| d[k][f].as_f64());
        let _ = writeln!(
            out,
            "| {key} | {} | {} | {} | {} | {} |",
            d.and_then(|d| d["memory_scope"].as_str()).unwrap_or(""),
            d.and_then(|d| d["memory_form"].as_str()).unwrap_or(""),
            get("in_sample_memory", "n")
                .map(|v| format!("{v}"))
                .unwrap_or_default(),
            get("in_sample_memory", "mape")
                .map(|v| format!("{v:.2} %"))
                .unwrap_or_default(),
            get("in_sample_memory", "max_abs_pct")
                .map(|v| format!("{v:.2} %"))
                .unwrap_or_default()
        );
    }
    for m in &table.modes {
        let l = lit.mode(m.family, m.precision);
        let key = format!("{}/{}", m.family.as_str(), m.precision);
        let _ = writeln!(out, "\n#### {key}\n");
        out.push_str("| coefficient | this device | literature | rel. std. error | source |\n|---|---|---|---|---|\n");
        for c in COLS {
            let coef = c.coef_mut(&mut m.clone()).clone();
            let rse = se
                .and_then(|r| r[&key]["relative_standard_error"][c.name()].as_f64())
                .map(|v| format!("{:.1} %", 100.0 * v))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {rse} | {} |",
                c.name(),
                num(coef.value),
                num(c.get(&l)),
                coef.source
            );
        }
        let t = &m.time;
        for (name, c, lv) in [
            ("flops_per_s", &t.flops_per_s, l.time.flops_per_s.value),
            (
                "act_bytes_per_s",
                &t.act_bytes_per_s,
                l.time.act_bytes_per_s.value,
            ),
            (
                "state_bytes_per_s",
                &t.state_bytes_per_s,
                l.time.state_bytes_per_s.value,
            ),
            ("t0_s", &t.t0_s, l.time.t0_s.value),
            (
                "recompute_factor",
                &t.recompute_factor,
                l.time.recompute_factor.value,
            ),
        ] {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | | {} |",
                num(c.value),
                num(lv),
                c.source
            );
        }
        // Per-op traffic cost: seconds per element of each activation feature (0 in literature).
        for (name, c) in &t.s_per_elem {
            let _ = writeln!(
                out,
                "| s_per_elem.{name} | {} | 0 | | {} |",
                num(c.value),
                c.source
            );
        }
    }
}

fn effect_table(out: &mut String, rows: &[PairEffect], what: &str) {
    let _ = writeln!(out, "\n| {what} | pairs | peak saved | activation memory saved | step time added |\n|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} % | {} | {} |",
            r.model,
            r.pairs,
            r.peak_saving_pct,
            opt_pct(r.activation_saving_pct),
            opt_pct(r.time_cost_pct)
        );
    }
}

fn findings_text(out: &mut String, f: &Findings, acc: &Accuracy) {
    out.push_str("\n## Findings\n\n");
    match f.checkpointing.iter().find(|r| r.model == "all") {
        Some(all) => {
            let _ = writeln!(
                out,
                "- **Checkpointing** (median over {} matched pairs): activation memory (peak − baseline − gradients) {} lower, peak {:.1} % lower, step time {} higher. The common rule of thumb claims 60-70 % less activation memory for +20 % time; the literature's full recomputation costs one extra forward, about +33 %.",
                all.pairs,
                opt_pct(all.activation_saving_pct),
                all.peak_saving_pct,
                opt_pct(all.time_cost_pct)
            );
            effect_table(out, &f.checkpointing, "model");
        }
        None => out.push_str("- **Checkpointing**: no matched pairs (checkpointed and plain runs of the same configuration) in the data.\n"),
    }
    out.push('\n');
    match f.mixed_precision.iter().find(|r| r.model == "all") {
        Some(all) => {
            let _ = writeln!(
                out,
                "- **Mixed precision** vs fp32 (median over {} matched pairs): peak {:.1} % lower, activation memory {} lower, step time {} higher (negative = faster). The common rule of thumb says about 25 % saving. Mixed precision keeps fp32 weights, gradients and optimizer states, and adds a 16-bit weight copy, so only activations shrink.",
                all.pairs,
                all.peak_saving_pct,
                opt_pct(all.activation_saving_pct),
                opt_pct(all.time_cost_pct)
            );
            effect_table(out, &f.mixed_precision, "model precision");
        }
        None => out.push_str("- **Mixed precision**: no fp32 / mixed matched pairs in the data.\n"),
    }
    if !acc.worst.is_empty() {
        let _ = writeln!(
            out,
            "\n- **Largest held-out errors** of the fitted table (k-fold), with the other predictors on the same point. {} of {} k-fold points were beyond every point of their model in their fold's training set (marked *beyond*: an extrapolation inside the k-fold score, decided by which rows the grid has):\n\n| configuration | measured MiB | fitted | literature | rule of thumb |\n|---|---|---|---|---|",
            acc.heldout_beyond_training, acc.heldout.n
        );
        for w in &acc.worst {
            let _ = writeln!(
                out,
                "| {}{} | {:.1} | {:+.1} % | {:+.1} % | {:+.1} % |",
                w.key,
                if w.beyond_training { " (*beyond*)" } else { "" },
                w.measured_bytes / 1048576.0,
                w.fitted_pct,
                w.literature_pct,
                w.seed_pct
            );
        }
    }
    // a group of a handful of points is not evidence of where the model is weak
    if let Some(worst) = acc
        .per_group
        .iter()
        .filter(|g| !g.too_few_to_score)
        .max_by(|a, b| a.peak_fitted.mape.total_cmp(&b.peak_fitted.mape))
    {
        let _ = writeln!(
            out,
            "\n- **Where the linear model is weakest** (k-fold): group `{}` with MAPE {:.2} % and max {:.2} % over {} points.",
            worst.group, worst.peak_fitted.mape, worst.peak_fitted.max_abs_pct, worst.peak_fitted.n
        );
    }
}

pub struct Inputs<'a> {
    pub table: &'a Coefficients,
    pub acc: &'a Accuracy,
    pub findings: &'a Findings,
    pub points: &'a [Point],
    pub plots: &'a [(String, String)],
    pub data_path: &'a str,
    pub grid: Option<&'a str>,
}

pub fn readme(i: &Inputs) -> String {
    let t = i.table;
    let acc = i.acc;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Calibration report: {} ({})\n",
        t.device_name, t.device_id
    );
    out.push_str("## What was run\n\n");
    let _ = writeln!(
        out,
        "- device: {} (`{}`), backend {}, driver {}",
        t.device_name,
        t.device_id,
        t.backend,
        if t.driver.is_empty() {
            "n/a"
        } else {
            &t.driver
        }
    );
    let _ = writeln!(out, "- date: {}; vramcal {}", t.date, t.vramcal_version);
    let _ = writeln!(
        out,
        "- data: `{}`{}",
        i.data_path,
        i.grid.map(|g| format!(", grid `{g}`")).unwrap_or_default()
    );
    let status: Vec<String> = acc
        .rows_by_status
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    let _ = writeln!(
        out,
        "- rows: {} (excluded rows are listed at the end)\n",
        status.join(", ")
    );
    out.push_str(&grid_summary(i.points));
    out.push_str("\n## Accuracy (held out: never scored on a point the table was fitted on)\n\n");
    let _ = writeln!(out, "Peak memory, {}: every configuration shape (model, batch, seq/image, precision, checkpointing, ZeRO) is held out in one fold and predicted by a table fitted on the other four. Errors in percent of the measured peak; the three predictors are scored on the same points.\n", acc.scheme);
    out.push_str("| predictor | MAPE | median abs | max abs | n |\n|---|---|---|---|---|\n");
    out.push_str(&metrics_row("fitted table", &acc.heldout));
    out.push_str(&metrics_row("literature defaults", &acc.literature));
    out.push_str(&metrics_row(
        "rule of thumb (params·4·3 + b·s·h·10)",
        &acc.seed_formula,
    ));
    out.push_str(&metrics_row(
        "step time, fitted (FLOPs/R + traffic/B + t0)",
        &acc.time_heldout,
    ));
    out.push_str("\nExtrapolation: each model's largest batch × tokens held out, table fitted on the rest.\n\n| predictor | MAPE | median abs | max abs | n |\n|---|---|---|---|---|\n");
    let e = &acc.extrapolation;
    out.push_str(&metrics_row("fitted table", &e.fitted));
    out.push_str(&metrics_row("literature defaults", &e.literature));
    out.push_str(&metrics_row("rule of thumb", &e.seed_formula));
    out.push_str(&metrics_row("step time, fitted", &e.time_fitted));
    out.push_str("\nPer group (k-fold held out):\n\n");
    group_table(&mut out, &acc.per_group);
    out.push_str("\nPer group (extrapolation):\n\n");
    group_table(&mut out, &acc.extrapolation_per_group);
    findings_text(&mut out, i.findings, acc);
    if let Some(l) = &acc.lora {
        out.push_str(&super::lora::markdown(l));
    }
    if let Some(p) = &acc.pytorch {
        out.push_str(&super::pytorch::markdown(p, metrics_row));
    }
    out.push_str("\n## Coefficients\n\nFitted on all ok rows (`calibration/<device-id>.json`), with the literature default beside each value. Activation coefficients are bytes per feature element; frag a fraction; const_bytes bytes; flops_per_s FLOP/s; t0_s seconds. The relative standard error says how tightly the data determines a fitted value.\n");
    coefficient_tables(&mut out, t);
    out.push_str("\n## Plots\n\n");
    for (file, title) in i.plots {
        let _ = writeln!(out, "### {title}\n\n![{title}]({file})\n");
    }
    out.push_str("## Excluded rows\n\n");
    if acc.excluded.is_empty() {
        out.push_str("None: every row was ok.\n");
    } else {
        out.push_str("| configuration | status | error |\n|---|---|---|\n");
        for x in &acc.excluded {
            let err: String = x
                .error
                .replace('|', "/")
                .replace('\n', " ")
                .chars()
                .take(200)
                .collect();
            let _ = writeln!(out, "| {} | {} | {} |", x.key, x.status, err);
        }
    }
    out
}
