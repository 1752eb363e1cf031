//! A sweep drawn as an SVG: GB/s by block size (log2 x axis), writes in the
//! left panel and reads in the right, one line per engine and path in the
//! same colour in both panels; ceilings (iperf3) dashed.
//!
//! `plotters` with its SVG backend only: no system libraries, no font
//! files (text is written as SVG `<text>` and the viewer renders it; its
//! width is estimated for layout).

use std::collections::BTreeMap;

use plotters::prelude::*;

use super::sweep::{Point, Sweep, size_label};

/// Pixels of the whole picture.
pub const WIDTH_PX: u32 = 1200;
pub const HEIGHT_PX: u32 = 560;

/// The operations, one panel each, in panel order.
const OPS: [&str; 2] = ["write", "read"];

/// Renders `sweep` as an SVG document.
pub fn render_svg(sweep: &Sweep) -> Result<String, String> {
    if sweep.points.is_empty() {
        return Err("the sweep has no points to plot".into());
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        draw(&root, sweep).map_err(|e| format!("plotting: {e}"))?;
        root.present().map_err(|e| format!("plotting: {e}"))?;
    }
    Ok(svg)
}

/// Renders `sweep` into the file `path`.
pub fn write_svg(sweep: &Sweep, path: &std::path::Path) -> Result<(), String> {
    let svg = render_svg(sweep)?;
    std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<<SVGBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw(root: &Area<'_>, sweep: &Sweep) -> DrawResult {
    root.fill(&WHITE)?;
    let title = if sweep.title.is_empty() { "shardwire bench sweep".to_string() } else { sweep.title.clone() };
    let root = root.titled(&title, ("sans-serif", 22))?;
    let (body, footer) = root.split_vertically(HEIGHT_PX - 60);
    let footer_text = match (sweep.command.is_empty(), sweep.date.is_empty()) {
        (false, false) => format!("{} ({})", sweep.command, sweep.date),
        (false, true) => sweep.command.clone(),
        (true, false) => sweep.date.clone(),
        (true, true) => String::new(),
    };
    footer.draw_text(&footer_text, &("monospace", 12).into_text_style(&footer), (10, 4))?;

    // Colours by series, in order of first appearance, the same in both panels.
    let mut colours: BTreeMap<String, usize> = BTreeMap::new();
    for p in &sweep.points {
        let next = colours.len();
        colours.entry(p.series()).or_insert(next);
    }
    let log2 = |b: u64| (b as f64).log2();
    let (x_lo, x_hi) = sweep
        .points
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(log2(p.block_size)), hi.max(log2(p.block_size))));
    let (x_lo, x_hi) = (x_lo.floor() - 0.25, x_hi.ceil() + 0.25);
    let y_hi = sweep.points.iter().map(|p| p.gbps).fold(0.0f64, f64::max).max(0.001) * 1.12;

    let panels = body.split_evenly((1, OPS.len()));
    for (panel, op) in panels.iter().zip(OPS) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{op}s"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x_lo..x_hi, 0.0..y_hi)?;
        let x_ticks = (x_hi - x_lo).round() as usize + 1;
        chart
            .configure_mesh()
            .x_desc("block size")
            .y_desc("GB/s")
            .x_labels(x_ticks)
            .x_label_formatter(&|x| {
                // Only whole powers of two carry a label (4 KiB, 16 KiB, ...).
                if (x - x.round()).abs() < 1e-6 && *x >= 0.0 && *x < 63.0 {
                    size_label(1u64 << x.round() as u32)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.1}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (name, &index) in &colours {
            let mut points: Vec<&Point> = sweep.points.iter().filter(|p| p.op == op && p.series() == *name).collect();
            if points.is_empty() {
                continue;
            }
            points.sort_by_key(|p| p.block_size);
            let colour = Palette99::pick(index).to_rgba();
            let style = colour.stroke_width(2);
            let xy: Vec<(f64, f64)> = points.iter().map(|p| (log2(p.block_size), p.gbps)).collect();
            let ceiling = points.iter().any(|p| p.ceiling);
            let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2));
            if ceiling {
                chart.draw_series(DashedLineSeries::new(xy, 8, 5, style))?.label(name.as_str()).legend(legend);
            } else {
                chart
                    .draw_series(LineSeries::new(xy.clone(), style).point_size(3))?
                    .label(name.as_str())
                    .legend(legend);
            }
        }
        chart
            .configure_series_labels()
            // Throughput rises with the block size: the lower right is where
            // the lines are not.
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(engine: &str, path: &str, op: &str, block_size: u64, gbps: f64, ceiling: bool) -> Point {
        Point {
            engine: engine.into(),
            path: path.into(),
            op: op.into(),
            block_size,
            gbps,
            p50_us: None,
            p99_us: None,
            duration_s: 1.0,
            batch_size: None,
            threads: None,
            runs_gbps: vec![],
            ceiling,
        }
    }

    #[test]
    fn a_small_sweep_renders_to_svg() {
        let mut sweep = Sweep::new("test sweep", "shardwire bench sweep --sizes 4KiB,64KiB,1MiB");
        for (i, size) in [4096u64, 65536, 1 << 20].into_iter().enumerate() {
            for op in ["write", "read"] {
                sweep.points.push(point("shardwire", "tcp", op, size, 1.0 + i as f64, false));
                sweep.points.push(point("shardwire", "local", op, size, 3.0 + i as f64, false));
                sweep.points.push(point("iperf3", "", op, size, 5.0, true));
            }
        }
        let svg = render_svg(&sweep).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("xmlns=\"http://www.w3.org/2000/svg\""));
        // Every element opened is closed (or self-closing).
        let opened = svg.matches("<text").count();
        assert_eq!(opened, svg.matches("</text>").count());
        for text in ["shardwire tcp", "shardwire local", "iperf3", "writes", "reads", "block size", "GB/s", "4 KiB"] {
            assert!(svg.contains(text), "no {text:?} in the SVG");
        }
        assert!(svg.contains("1 MiB") && svg.contains("64 KiB"));
        assert!(svg.contains("test sweep") && svg.contains("--sizes 4KiB,64KiB,1MiB"));
        // Lines: at least one polyline per series and panel.
        assert!(svg.matches("<polyline").count() >= 4, "too few lines");
    }

    #[test]
    fn an_empty_sweep_is_an_error() {
        assert!(render_svg(&Sweep::new("", "")).is_err());
    }
}
