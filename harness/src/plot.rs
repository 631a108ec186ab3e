//! launch.png: horizontal bars of the median spawn → exit and spawn → first output per
//! variant, on a log scale, with whiskers to the p90.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::compare::VariantResult;
use crate::report::{end_header, summarize};

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn register_font() -> Result<(), String> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).is_file())
        .ok_or("no TTF font found (apt-get install fonts-dejavu-core)")?;
    let data: &'static [u8] = Box::leak(
        std::fs::read(path)
            .map_err(|e| e.to_string())?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, data)
        .map_err(|_| format!("{path}: not a usable font"))?;
    plotters::style::register_font("sans-serif", FontStyle::Bold, data)
        .map_err(|_| format!("{path}: not a usable font"))?;
    Ok(())
}

fn fmt(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

/// (median, p90) of one bar, its vertical extent, colour and legend text.
type Bar<'a> = (Option<(f64, f64)>, f64, f64, RGBColor, &'a str);

struct Row {
    label: String,
    end: (f64, f64),
    first: Option<(f64, f64)>,
}

pub fn launch_chart(path: &Path, results: &[VariantResult], subtitle: &str) -> Result<(), String> {
    register_font()?;
    let mut rows: Vec<Row> = results
        .iter()
        .filter(|r| r.skipped.is_none())
        .filter_map(|r| {
            let s = summarize(r);
            let end = s.end?;
            Some(Row {
                label: format!("{}{}", r.name, end_header(&r.end_label)),
                end: (end.median, end.p90),
                first: s.first.map(|f| (f.median, f.p90)),
            })
        })
        .collect();
    if rows.is_empty() {
        return Err("nothing measured".into());
    }
    rows.sort_by(|a, b| a.end.0.total_cmp(&b.end.0));
    let n = rows.len();
    let lo_v = rows
        .iter()
        .flat_map(|r| [Some(r.end.0), r.first.map(|f| f.0)])
        .flatten()
        .fold(f64::INFINITY, f64::min);
    let hi_v = rows
        .iter()
        .flat_map(|r| [Some(r.end.1), r.first.map(|f| f.1)])
        .flatten()
        .fold(0.0, f64::max);
    let lo = 10f64.powf((lo_v * 0.8).log10().floor());
    let hi = 10f64.powf((hi_v * 4.0).log10().ceil());

    let (w, h) = (1100u32, 150 + 58 * n as u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (title_area, rest) = root.split_vertically(62);
    title_area
        .draw_text(
            "Launch time: median spawn → exit and spawn → first output (whisker: p90), log scale",
            &("sans-serif", 20)
                .into_font()
                .style(FontStyle::Bold)
                .color(&BLACK),
            (14, 8),
        )
        .map_err(|e| e.to_string())?;
    title_area
        .draw_text(
            subtitle,
            &("sans-serif", 14).into_font().color(&RGBColor(80, 80, 80)),
            (14, 36),
        )
        .map_err(|e| e.to_string())?;

    let mut chart = ChartBuilder::on(&rest)
        .margin_left(10)
        .margin_right(30)
        .margin_bottom(10)
        .x_label_area_size(40)
        .y_label_area_size(230)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..n as f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("milliseconds (log scale)")
        .x_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(|e| e.to_string())?;

    let exit_color = RGBColor(31, 119, 180);
    let first_color = RGBColor(255, 160, 60);
    let whisker = ShapeStyle::from(&BLACK).stroke_width(2);
    let text = ("sans-serif", 13).into_font().color(&BLACK);
    // Row i (fastest first) at the top.
    let y_of = |i: usize| (n - 1 - i) as f64;
    let mut legend_done = (false, false);
    let (bx, by) = rest.get_base_pixel();
    for (i, row) in rows.iter().enumerate() {
        let y = y_of(i);
        let bars: [Bar; 2] = [
            (
                Some(row.end),
                y + 0.52,
                y + 0.88,
                exit_color,
                "spawn → exit, or the named event (median)",
            ),
            (
                row.first,
                y + 0.12,
                y + 0.48,
                first_color,
                "spawn → first output (median)",
            ),
        ];
        for (k, (vals, y0, y1, color, name)) in bars.into_iter().enumerate() {
            let Some((median, p90)) = vals else { continue };
            let series = chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(lo, y0), (median, y1)],
                    color.filled(),
                )))
                .map_err(|e| e.to_string())?;
            let first_time = if k == 0 {
                &mut legend_done.0
            } else {
                &mut legend_done.1
            };
            if !*first_time {
                *first_time = true;
                series.label(name).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
            }
            let yc = (y0 + y1) / 2.0;
            let top = p90.max(median);
            chart
                .draw_series([
                    PathElement::new(vec![(median, yc), (top, yc)], whisker),
                    PathElement::new(vec![(top, y0 + 0.06), (top, y1 - 0.06)], whisker),
                ])
                .map_err(|e| e.to_string())?;
            let (px, py) = chart.backend_coord(&(top, yc));
            let label = fmt(median);
            let (tw, th) = rest
                .estimate_text_size(&label, &text)
                .map_err(|e| e.to_string())?;
            let (tx, ty) = (px - bx + 6, py - by - 7);
            rest.draw(&Rectangle::new(
                [(tx - 2, ty - 1), (tx + tw as i32 + 2, ty + th as i32 + 1)],
                WHITE.filled(),
            ))
            .map_err(|e| e.to_string())?;
            rest.draw_text(&label, &text, (tx, ty))
                .map_err(|e| e.to_string())?;
        }
        // Variant name left of the axis.
        let (_, py) = chart.backend_coord(&(lo, y + 0.5));
        let label_style = ("sans-serif", 15).into_font().color(&BLACK).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Right,
                plotters::style::text_anchor::VPos::Center,
            ),
        );
        let (ax, _) = chart.backend_coord(&(lo, 0.0));
        rest.draw_text(&row.label, &label_style, (ax - bx - 10, py - by))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
