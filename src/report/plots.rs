//! SVG plots (plotters): measured vs predicted, peak vs batch and vs length per model, step time
//! vs FLOPs, checkpointing saving and cost. Each is rendered into a string and written atomically.

use super::findings::Findings;
use crate::coeffs::Coefficients;
use crate::fit::points::Point;
use crate::fit::split::Evaluation;
use crate::fit::timefit;
use crate::plan::memory::{breakdown, fit_terms};
use crate::spec::{ModelSpec, TrainSpec};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const FONT: &str = "sans-serif";
const MIB: f64 = 1024.0 * 1024.0;
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn perr<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Renders with `draw` and writes the SVG atomically.
fn svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, size).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        draw(&root)?;
        root.present().map_err(perr)?;
    }
    crate::atomic::write(path, s.as_bytes())
}

fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    if lo.is_finite() && hi > 0.0 {
        (lo / 1.3, hi * 1.3)
    } else {
        (1.0, 10.0)
    }
}

/// Held-out predictions against measurements: fitted, literature and the rule of thumb.
pub fn measured_vs_predicted(path: &Path, eval: &Evaluation) -> anyhow::Result<()> {
    svg(path, (900, 760), |root| {
        let p = &eval.predictions;
        let (lo, hi) = log_range(
            p.iter()
                .flat_map(|q| [q.measured, q.fitted, q.literature, q.seed])
                .map(|v| v / MIB),
        );
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "Peak memory: held-out prediction vs measurement ({})",
                    eval.scheme
                ),
                (FONT, 22),
            )
            .margin(15)
            .x_label_area_size(55)
            .y_label_area_size(75)
            .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("measured peak (MiB)")
            .y_desc("predicted peak (MiB)")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()
            .map_err(perr)?;
        chart
            .draw_series(LineSeries::new(
                vec![(lo, lo), (hi, hi)],
                BLACK.stroke_width(1),
            ))
            .map_err(perr)?
            .label("y = x")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        let seed = COLORS[4];
        chart
            .draw_series(
                p.iter()
                    .map(|q| Cross::new((q.measured / MIB, q.seed / MIB), 5, seed.stroke_width(2))),
            )
            .map_err(perr)?
            .label("rule of thumb (params*12 + b*s*h*10)")
            .legend(move |(x, y)| Cross::new((x + 10, y), 5, seed.stroke_width(2)));
        let lit = COLORS[1];
        chart
            .draw_series(p.iter().map(|q| {
                TriangleMarker::new((q.measured / MIB, q.literature / MIB), 6, lit.filled())
            }))
            .map_err(perr)?
            .label("literature defaults")
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, lit.filled()));
        let fit = COLORS[0];
        chart
            .draw_series(
                p.iter()
                    .map(|q| Circle::new((q.measured / MIB, q.fitted / MIB), 4, fit.filled())),
            )
            .map_err(perr)?
            .label("fitted table (held out)")
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, fit.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()
            .map_err(perr)?;
        Ok(())
    })
}

/// Which axis a sweep plot varies.
#[derive(Clone, Copy, PartialEq)]
pub enum Axis {
    Batch,
    Length,
}

fn with_x(p: &Point, axis: Axis, x: u64) -> TrainSpec {
    let mut t = p.train.clone();
    match (axis, &p.model) {
        (Axis::Batch, _) => t.batch = x,
        (Axis::Length, ModelSpec::Transformer(m)) if m.patch.is_none() => t.seq = x,
        (Axis::Length, _) => t.image = x,
    }
    t
}

fn x_of(p: &Point, axis: Axis) -> u64 {
    match axis {
        Axis::Batch => p.train.batch,
        Axis::Length => p.length(),
    }
}

/// For each model, the slice (all settings but the varied one) with the most distinct x values.
fn slices(points: &[Point], axis: Axis) -> Vec<(String, Vec<&Point>)> {
    let mut by: BTreeMap<(String, String), Vec<&Point>> = BTreeMap::new();
    for p in points {
        let r = &p.row;
        let other = match axis {
            Axis::Batch => format!(
                "{} {}, ",
                if r.seq > 0 && matches!(&p.model, ModelSpec::Transformer(m) if m.patch.is_none()) {
                    "seq"
                } else {
                    "image"
                },
                p.length()
            ),
            Axis::Length => format!("batch {}, ", r.batch),
        };
        let zero = if r.zero_stage > 0 {
            format!(", ZeRO-{}/{}", r.zero_stage, r.gpus)
        } else {
            String::new()
        };
        let label = format!(
            "{other}{}, ckpt {}, {}{zero}",
            r.precision, r.checkpointing, r.optimizer
        );
        by.entry((p.model_label(), label)).or_default().push(p);
    }
    let mut best: BTreeMap<String, (String, Vec<&Point>)> = BTreeMap::new();
    for ((model, label), pts) in by {
        let n = pts
            .iter()
            .map(|p| x_of(p, axis))
            .collect::<BTreeSet<_>>()
            .len();
        let score = (
            n,
            pts[0].precision() == crate::spec::Precision::Fp32,
            !pts[0].ckpt(),
        );
        let cur = best.get(&model).map(|(_, v)| {
            (
                v.iter()
                    .map(|p| x_of(p, axis))
                    .collect::<BTreeSet<_>>()
                    .len(),
                v[0].precision() == crate::spec::Precision::Fp32,
                !v[0].ckpt(),
            )
        });
        if n >= 2 && cur.is_none_or(|c| score > c) {
            best.insert(model, (label, pts));
        }
    }
    best.into_iter()
        .map(|(m, (l, v))| (format!("{m}: {l}"), v))
        .collect()
}

/// Peak vs batch (or length) per model: measured points with the fitted and literature lines.
pub fn sweep_panels(
    path: &Path,
    points: &[Point],
    table: &Coefficients,
    axis: Axis,
) -> anyhow::Result<bool> {
    let panels = slices(points, axis);
    if panels.is_empty() {
        return Ok(false);
    }
    let cols = panels.len().min(3);
    let rows = panels.len().div_ceil(cols);
    let lit = Coefficients::literature();
    svg(path, (480 * cols as u32, 400 * rows as u32 + 50), |root| {
        let title = match axis {
            Axis::Batch => "Peak memory vs batch (points: measured; lines: fitted table, grey: literature)",
            Axis::Length => "Peak memory vs sequence length / image side (points: measured; lines: fitted, grey: literature)",
        };
        let body = root.titled(title, (FONT, 22)).map_err(perr)?;
        for (area, (label, pts)) in body.split_evenly((rows, cols)).iter().zip(&panels) {
            let xs: BTreeSet<u64> = pts.iter().map(|p| x_of(p, axis)).collect();
            let (xmin, xmax) = (*xs.first().unwrap_or(&1), *xs.last().unwrap_or(&2));
            let p0 = pts[0];
            let curve = |c: &Coefficients| -> Vec<(f64, f64)> {
                (0..=40)
                    .map(|i| xmin as f64 + (xmax - xmin) as f64 * i as f64 / 40.0)
                    .map(|x| x.round() as u64)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .filter_map(|x| {
                        let t = with_x(p0, axis, x);
                        let terms = fit_terms(&p0.model, &t).ok()?;
                        Some((
                            x as f64,
                            breakdown(&terms, &p0.model, &t, c).total as f64 / MIB,
                        ))
                    })
                    .collect()
            };
            let (fit_line, lit_line) = (curve(table), curve(&lit));
            let ys = pts
                .iter()
                .map(|p| p.peak / MIB)
                .chain(fit_line.iter().map(|q| q.1))
                .chain(lit_line.iter().map(|q| q.1));
            let ymax = ys.fold(0.0f64, f64::max) * 1.1;
            let mut chart = ChartBuilder::on(area)
                .caption(label, (FONT, 14))
                .margin(8)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(xmin as f64 * 0.9..xmax as f64 * 1.05, 0.0..ymax)
                .map_err(perr)?;
            chart
                .configure_mesh()
                .x_desc(if axis == Axis::Batch {
                    "batch"
                } else {
                    "seq / image side"
                })
                .y_desc("peak (MiB)")
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .draw()
                .map_err(perr)?;
            chart
                .draw_series(LineSeries::new(
                    lit_line,
                    RGBColor(150, 150, 150).stroke_width(2),
                ))
                .map_err(perr)?;
            chart
                .draw_series(LineSeries::new(fit_line, COLORS[0].stroke_width(2)))
                .map_err(perr)?;
            chart
                .draw_series(pts.iter().map(|p| {
                    Circle::new((x_of(p, axis) as f64, p.peak / MIB), 5, COLORS[1].filled())
                }))
                .map_err(perr)?;
        }
        Ok(())
    })?;
    Ok(true)
}

/// Step time vs FLOPs, per (family, precision): measured points and the fitted table's prediction
/// for each (crosses).
pub fn time_vs_flops(path: &Path, points: &[Point], table: &Coefficients) -> anyhow::Result<bool> {
    let timed: Vec<&Point> = points.iter().filter(|p| p.step_s.is_some()).collect();
    if timed.is_empty() {
        return Ok(false);
    }
    svg(path, (900, 700), |root| {
        let (xlo, xhi) = log_range(timed.iter().map(|p| p.flops.total()));
        let (ylo, yhi) = log_range(timed.iter().filter_map(|p| p.step_s).map(|t| t * 1e3));
        let mut chart = ChartBuilder::on(root)
            .caption("Step time vs FLOPs (dots measured: filled plain, hollow checkpointed; crosses fitted)", (FONT, 19))
            .margin(15)
            .x_label_area_size(55)
            .y_label_area_size(75)
            .build_cartesian_2d((xlo..xhi).log_scale(), (ylo..yhi).log_scale())
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("FLOPs per step (forward + backward, without recompute)")
            .y_desc("median step time (ms)")
            .x_label_formatter(&|x| format!("{x:.0e}"))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()
            .map_err(perr)?;
        let modes: BTreeSet<(crate::spec::Family, crate::spec::Precision)> =
            timed.iter().map(|p| (p.family(), p.precision())).collect();
        for (i, (fam, prec)) in modes.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mine: Vec<&&Point> = timed
                .iter()
                .filter(|p| p.family() == *fam && p.precision() == *prec)
                .collect();
            let mode = table.mode(*fam, *prec);
            chart
                .draw_series(mine.iter().map(|p| {
                    let style = if p.ckpt() {
                        color.stroke_width(2)
                    } else {
                        color.filled()
                    };
                    Circle::new((p.flops.total(), p.step_s.unwrap_or(0.0) * 1e3), 4, style)
                }))
                .map_err(perr)?
                .label(format!(
                    "{} {} (R = {:.2} GFLOP/s, t0 = {:.1} ms)",
                    fam.as_str(),
                    prec,
                    mode.time.flops_per_s.value / 1e9,
                    mode.time.t0_s.value * 1e3
                ))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            // The fitted model's prediction for each measured point (small crosses): with the
            // memory-traffic terms it is not a function of FLOPs alone, so no single line.
            let predicted: Vec<(f64, f64)> = mine
                .iter()
                .filter_map(|p| Some((p.flops.total(), timefit::predict(p, &mode)? * 1e3)))
                .collect();
            chart
                .draw_series(
                    predicted
                        .into_iter()
                        .map(|xy| Cross::new(xy, 3, color.stroke_width(1))),
                )
                .map_err(perr)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 15))
            .draw()
            .map_err(perr)?;
        Ok(())
    })?;
    Ok(true)
}

/// Checkpointing per model: measured activation-memory saving and step-time cost, with the
/// rule of thumb's claims (60-70 % saving, +20 % time) and the literature's +33 % as reference lines.
pub fn checkpointing_bars(path: &Path, f: &Findings) -> anyhow::Result<bool> {
    let rows = &f.checkpointing;
    if rows.is_empty() {
        return Ok(false);
    }
    svg(path, (1000, 620), |root| {
        let vals = rows.iter().flat_map(|r| {
            [
                r.activation_saving_pct.unwrap_or(r.peak_saving_pct),
                r.time_cost_pct.unwrap_or(0.0),
            ]
        });
        let (mut lo, mut hi) = vals.fold((0.0f64, 80.0f64), |(a, b), v| (a.min(v), b.max(v)));
        lo = (lo - 5.0).min(0.0);
        // head room above the tallest bar for the legend
        hi = hi * 1.5 + 10.0;
        let n = rows.len();
        let labels: Vec<String> = rows.iter().map(|r| r.model.clone()).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Full checkpointing, measured on matched pairs (median per model)",
                (FONT, 21),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, lo..hi)
            .map_err(perr)?;
        let fmt = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(n.max(2) * 2 + 1)
            .x_label_formatter(&fmt)
            .y_desc("percent")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()
            .map_err(perr)?;
        let (save, cost) = (COLORS[0], COLORS[1]);
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let v = r.activation_saving_pct.unwrap_or(r.peak_saving_pct);
                Rectangle::new(
                    [(i as f64 - 0.35, 0.0), (i as f64 - 0.02, v)],
                    save.filled(),
                )
            }))
            .map_err(perr)?
            .label("activation memory saved (peak - baseline - grads)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], save.filled()));
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                Rectangle::new(
                    [
                        (i as f64 + 0.02, 0.0),
                        (i as f64 + 0.35, r.time_cost_pct.unwrap_or(0.0)),
                    ],
                    cost.filled(),
                )
            }))
            .map_err(perr)?
            .label("step time added")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], cost.filled()));
        let refline = |y: f64, color: RGBColor| {
            LineSeries::new(vec![(-0.5, y), (n as f64 - 0.5, y)], color.stroke_width(1))
        };
        chart
            .draw_series(refline(60.0, save))
            .map_err(perr)?
            .label("rule of thumb: 60-70 % less activation memory")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], save));
        chart.draw_series(refline(70.0, save)).map_err(perr)?;
        chart
            .draw_series(refline(20.0, cost))
            .map_err(perr)?
            .label("rule of thumb: +20 % time")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], cost));
        let litc = RGBColor(90, 90, 90);
        chart
            .draw_series(refline(33.3, litc))
            .map_err(perr)?
            .label("literature: +33 % time (one extra forward)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], litc));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()
            .map_err(perr)?;
        Ok(())
    })?;
    Ok(true)
}
