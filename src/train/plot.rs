//! `curves.png`: loss (left) and top-1 accuracy (right) per epoch, train in blue, eval in
//! orange, eval top-5 in green; drawn with the `image` crate (no font: the numbers are in
//! metrics.csv).

use std::path::Path;

use image::{Rgb, RgbImage};

use super::EpochMetrics;
use crate::error::{Error, Result};

const W: u32 = 900;
const H: u32 = 360;
const PAD: u32 = 30;

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

fn panel(img: &mut RgbImage, x0: u32, series: &[(Vec<f64>, Rgb<u8>)], lo: f64, hi: f64) {
    let (pw, ph) = (W / 2 - 2 * PAD, H - 2 * PAD);
    let grey = Rgb([200, 200, 200]);
    for g in 0..=4 {
        let y = (PAD + ph * g / 4) as f64;
        line(img, ((x0 + PAD) as f64, y), ((x0 + PAD + pw) as f64, y), grey);
    }
    let black = Rgb([0, 0, 0]);
    line(img, ((x0 + PAD) as f64, PAD as f64), ((x0 + PAD) as f64, (PAD + ph) as f64), black);
    line(img, ((x0 + PAD) as f64, (PAD + ph) as f64), ((x0 + PAD + pw) as f64, (PAD + ph) as f64), black);
    let span = (hi - lo).max(1e-9);
    for (ys, c) in series {
        let n = ys.len().max(2) - 1;
        let pt = |i: usize, v: f64| {
            ((x0 + PAD) as f64 + pw as f64 * i as f64 / n as f64, (PAD + ph) as f64 - ph as f64 * (v - lo) / span)
        };
        for i in 1..ys.len() {
            line(img, pt(i - 1, ys[i - 1]), pt(i, ys[i]), *c);
        }
        if ys.len() == 1 {
            let (x, y) = pt(0, ys[0]);
            line(img, (x - 2.0, y), (x + 2.0, y), *c);
        }
    }
}

pub const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
pub const ORANGE: Rgb<u8> = Rgb([255, 127, 14]);
pub const GREEN: Rgb<u8> = Rgb([44, 160, 44]);

/// One panel: its series and the y range (`None`: 0 to the largest finite value).
pub type Panel = (Vec<(Vec<f64>, Rgb<u8>)>, Option<(f64, f64)>);

pub fn curves(path: &Path, h: &[EpochMetrics]) -> Result<()> {
    let col = |f: fn(&EpochMetrics) -> f64| h.iter().map(f).collect::<Vec<f64>>();
    let losses = vec![(col(|m| m.train_loss), BLUE), (col(|m| m.eval_loss), ORANGE)];
    let acc = vec![(col(|m| m.train_top1), BLUE), (col(|m| m.eval_top1), ORANGE), (col(|m| m.eval_top5), GREEN)];
    two_panels(path, [(losses, None), (acc, Some((0.0, 1.0)))])
}

/// Two side-by-side line panels as a PNG, written atomically.
pub fn two_panels(path: &Path, panels: [Panel; 2]) -> Result<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    for (i, (series, range)) in panels.iter().enumerate() {
        let (lo, hi) = range.unwrap_or_else(|| {
            (0.0, series.iter().flat_map(|(v, _)| v.iter().copied()).filter(|v| v.is_finite()).fold(1e-6, f64::max))
        });
        panel(&mut img, i as u32 * W / 2, series, lo, hi);
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("plot: {e}")))?;
    crate::weights::write_atomic(path, &bytes)
}
