//! PNG bar charts of a pass (plotters, bitmap backend). Text is drawn with
//! ab_glyph from DejaVu Sans read at run time (`fonts-dejavu-core`, which
//! `cargo xtask bench` installs): no fontconfig, no system font lookup.

use crate::results::PassResult;
use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Register the font once; plotters needs it `'static`, so it is leaked (once).
pub fn init_font() -> Result<()> {
    let path = FONT_PATHS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("DejaVuSans.ttf not found (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("bad font {path}"))?;
    Ok(())
}

/// A bar: its height and, maybe, a whisker from..to.
type Bar = (f64, Option<(f64, f64)>);

/// One series of bars: a name, a colour, and per row (bar height, whisker from..to).
struct Series {
    name: &'static str,
    color: RGBColor,
    vals: Vec<Option<Bar>>,
}

/// Grouped bars. With `log`, heights are drawn on a log10 axis from 1 (latency:
/// p50 bars and p99 whiskers differ by orders of magnitude on a loaded machine).
fn bars(
    path: &Path,
    title: &str,
    ylabel: &str,
    rows: &[String],
    series: &[Series],
    log: bool,
) -> Result<()> {
    let tf = |v: f64| if log { v.max(1.0).log10() } else { v };
    let root = BitMapBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let ymax = series
        .iter()
        .flat_map(|s| {
            s.vals
                .iter()
                .flatten()
                .map(|(v, w)| w.map(|w| w.1).unwrap_or(*v).max(*v))
        })
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let ymax = if log { tf(ymax) + 0.15 } else { ymax * 1.12 };
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..ymax)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(ylabel)
        .y_label_formatter(&|y| {
            if log {
                format!("{:.3}", 10f64.powf(*y))
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            } else {
                format!("{y:.1}")
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    let k = series.len() as f64;
    let w = 0.8 / k;
    for (si, s) in series.iter().enumerate() {
        let color = s.color;
        let rects = s.vals.iter().enumerate().filter_map(|(i, v)| {
            let (h, _) = (*v)?;
            let x0 = i as f64 - 0.4 + si as f64 * w;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + w * 0.92, tf(h))],
                color.filled(),
            ))
        });
        chart
            .draw_series(rects)
            .map_err(|e| anyhow!("{e:?}"))?
            .label(s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        for (i, v) in s.vals.iter().enumerate() {
            if let Some((_, Some((lo, top)))) = v {
                let xc = i as f64 - 0.4 + si as f64 * w + w * 0.46;
                let cap = w * 0.2;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![
                            (xc, tf(*lo)),
                            (xc, tf(*top)),
                            (xc - cap, tf(*top)),
                            (xc + cap, tf(*top)),
                        ],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(|e| anyhow!("{e:?}"))?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    // Row names under their groups, in pixel space below the axis.
    let style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, r) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64, 0.0));
        root.draw(&Text::new(r.clone(), (px, py + 8), style.clone()))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn row_names(p: &PassResult) -> Vec<String> {
    p.rows
        .iter()
        .map(|r| {
            let n = r
                .name
                .trim_start_matches("ambassador ")
                .replace(" --splice ", " ");
            if r.error.is_some() {
                format!("{n} (cannot run)")
            } else {
                n
            }
        })
        .collect()
}

fn get(p: &PassResult, key: &str, whisker: Option<&str>) -> Vec<Option<Bar>> {
    p.rows
        .iter()
        .map(|r| {
            let m = r.median(key)?;
            Some((m, whisker.and_then(|w| r.median(w)).map(|t| (m, t))))
        })
        .collect()
}

/// Write `<stem>-latency.png`, `-throughput.png`, `-cpu.png`; return their file names.
pub fn plots(p: &PassResult, dir: &Path, stem: &str) -> Result<Vec<String>> {
    let rows = row_names(p);
    let mut out = Vec::new();
    let f = format!("{stem}-latency.png");
    bars(
        &dir.join(&f),
        &format!(
            "Round-trip latency, {} (bar p50, whisker p99; log scale)",
            p.pass
        ),
        "µs (log)",
        &rows,
        &[
            Series {
                name: "64 B",
                color: RGBColor(70, 130, 180),
                vals: get(p, "lat64_p50_us", Some("lat64_p99_us")),
            },
            Series {
                name: "16 KiB",
                color: RGBColor(230, 140, 40),
                vals: get(p, "lat16k_p50_us", Some("lat16k_p99_us")),
            },
        ],
        true,
    )?;
    out.push(f);
    let f = format!("{stem}-throughput.png");
    bars(
        &dir.join(&f),
        &format!(
            "iperf3 throughput, {} (bar median, whisker min to max over rounds)",
            p.pass
        ),
        "Gbit/s",
        &rows,
        &[
            Series {
                name: "1 stream",
                color: RGBColor(70, 130, 180),
                vals: tput(p, "tput1_gbps"),
            },
            Series {
                name: "8 streams",
                color: RGBColor(230, 140, 40),
                vals: tput(p, "tput8_gbps"),
            },
        ],
        false,
    )?;
    out.push(f);
    let f = format!("{stem}-cpu.png");
    let d = p.row("direct").and_then(|r| r.median("cpu_sys_s_per_gib"));
    let over: Vec<_> = p
        .rows
        .iter()
        .map(|r| {
            if r.name == "direct" {
                return None;
            }
            Some(((r.median("cpu_sys_s_per_gib")? - d?).max(0.0), None))
        })
        .collect();
    bars(
        &dir.join(&f),
        &format!("CPU seconds per GiB (1 stream), {}", p.pass),
        "CPU s / GiB",
        &rows,
        &[
            Series {
                name: "proxy's own processes",
                color: RGBColor(70, 130, 180),
                vals: get(p, "cpu_proxy_s_per_gib", None),
            },
            Series {
                name: "system-wide, over direct",
                color: RGBColor(200, 60, 60),
                vals: over,
            },
        ],
        false,
    )?;
    out.push(f);
    Ok(out)
}

fn tput(p: &PassResult, key: &str) -> Vec<Option<Bar>> {
    p.rows
        .iter()
        .map(|r| r.figures.get(key).map(|s| (s.median, Some((s.min, s.max)))))
        .collect()
}
