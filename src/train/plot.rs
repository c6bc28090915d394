//! Readable plots (training curves, reproductions): side-by-side panels, each with a title,
//! axis labels, tick values and a legend, drawn with `plotters` and the bundled DejaVu Sans
//! (so they render the same on a fresh machine). Written as PNG and, beside it, SVG; both
//! atomically.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::EpochMetrics;
use crate::error::{Error, Result};

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE: RGBColor = RGBColor(255, 127, 14);
pub const GREEN: RGBColor = RGBColor(44, 160, 44);
pub const RED: RGBColor = RGBColor(214, 39, 40);
pub const PURPLE: RGBColor = RGBColor(148, 103, 189);
/// Colours for series in order.
pub const PALETTE: [RGBColor; 5] = [BLUE, ORANGE, GREEN, RED, PURPLE];

/// One line: its legend label, colour, and `(x, y)` points.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// Values at x = 1, 2, 3, ... (epochs).
    pub fn per_epoch(label: &str, color: RGBColor, ys: impl IntoIterator<Item = f64>) -> Self {
        Self {
            label: label.to_string(),
            color,
            points: ys.into_iter().enumerate().map(|(i, y)| ((i + 1) as f64, y)).collect(),
        }
    }
}

/// One panel: title, axis labels (with units), series, and the y range (`None`: from the data).
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub y_range: Option<(f64, f64)>,
}

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, title: &str, panels: &[Panel]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("plot: {e}"));
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, p) in areas.iter().zip(panels) {
        let (x0, x1) = range(p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)));
        let (x0, x1) = if x1 - x0 < 1.0 { (x0 - 0.5, x1 + 0.5) } else { (x0, x1) };
        let (y0, y1) = p.y_range.unwrap_or_else(|| range(p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1))));
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(62)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(&p.x_label)
            .y_desc(&p.y_label)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        for s in &p.series {
            let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|q| q.1.is_finite()).collect();
            let color = s.color;
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&q| Circle::new(q, 3, color.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .position(legend_corner(p, y0, y1))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// The legend goes where the lines end low if they end high, and the other way round.
fn legend_corner(p: &Panel, y0: f64, y1: f64) -> SeriesLabelPosition {
    let ends: Vec<f64> =
        p.series.iter().filter_map(|s| s.points.iter().rev().map(|q| q.1).find(|v| v.is_finite())).collect();
    let mean = ends.iter().sum::<f64>() / ends.len().max(1) as f64;
    if (mean - y0) / (y1 - y0).max(1e-12) > 0.5 {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

/// Panels side by side under a title, as `path` (PNG) and `path` with `.svg`.
pub fn panels(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    font();
    let (w, h) = (560 * panels.len().max(1) as u32, 440);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw(BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area(), title, panels)?;
    let img = image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| Error::Invalid("plot: buffer size".into()))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("plot: {e}")))?;
    crate::weights::write_atomic(path, &png)?;
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area(), title, panels)?;
    crate::weights::write_atomic(&path.with_extension("svg"), svg.as_bytes())
}

/// `curves.png` of a training run: loss and accuracy per epoch, train and eval.
pub fn curves(path: &Path, title: &str, h: &[EpochMetrics]) -> Result<()> {
    let col = |f: fn(&EpochMetrics) -> f64| h.iter().map(f).collect::<Vec<f64>>();
    let loss = Panel {
        title: "Loss".into(),
        x_label: "epoch".into(),
        y_label: "cross-entropy (nats)".into(),
        series: vec![
            Series::per_epoch("train (label-smoothed)", BLUE, col(|m| m.train_loss)),
            Series::per_epoch("eval", ORANGE, col(|m| m.eval_loss)),
        ],
        y_range: None,
    };
    let acc = Panel {
        title: "Accuracy".into(),
        x_label: "epoch".into(),
        y_label: "accuracy (fraction of images)".into(),
        series: vec![
            Series::per_epoch("train top-1", BLUE, col(|m| m.train_top1)),
            Series::per_epoch("eval top-1 (EMA weights)", ORANGE, col(|m| m.eval_top1)),
            Series::per_epoch("eval top-5 (EMA weights)", GREEN, col(|m| m.eval_top5)),
        ],
        y_range: Some((0.0, 1.0)),
    };
    panels(path, title, &[loss, acc])
}
