//! Face crops for the embedding network: facenet-pytorch's `extract_face` geometry (the box
//! plus a margin given in output pixels, clipped to the image, cropped and resized with
//! Pillow's bilinear filter), or, our extension, a 5-point similarity alignment that maps the
//! landmarks onto a fixed template.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::mtcnn::Face;
use crate::preprocess::{Interpolation, resize};

/// How a face becomes the embedding network's square input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Align {
    /// facenet-pytorch: the detection box (+ margin), resized.
    #[default]
    Box,
    /// Similarity transform of the five landmarks onto a template (eyes, nose, mouth corners).
    Landmarks,
}

impl std::str::FromStr for Align {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "box" => Ok(Align::Box),
            "landmarks" => Ok(Align::Landmarks),
            o => Err(crate::Error::Invalid(format!("unknown alignment '{o}' (box, landmarks)"))),
        }
    }
}

/// The pixel box `extract_face` crops: `margin` is in pixels of the `size` output, so it
/// grows with the face; the result is clipped to the image. `None` when nothing is left.
pub fn margin_box(bbox: &[f32; 4], margin: f32, size: usize, (w, h): (u32, u32)) -> Option<[u32; 4]> {
    let mx = margin * (bbox[2] - bbox[0]) / (size as f32 - margin);
    let my = margin * (bbox[3] - bbox[1]) / (size as f32 - margin);
    let c = |v: f32, hi: u32| (v.max(0.0).min(hi as f32)) as u32;
    let b = [c(bbox[0] - mx / 2.0, w), c(bbox[1] - my / 2.0, h), c(bbox[2] + mx / 2.0, w), c(bbox[3] + my / 2.0, h)];
    (b[2] > b[0] && b[3] > b[1]).then_some(b)
}

/// facenet-pytorch's `extract_face(img, box, image_size=size, margin)`: a `size x size` crop.
pub fn extract_face(img: &RgbImage, bbox: &[f32; 4], size: usize, margin: f32) -> Option<RgbImage> {
    let [x1, y1, x2, y2] = margin_box(bbox, margin, size, img.dimensions())?;
    let crop = image::imageops::crop_imm(img, x1, y1, x2 - x1, y2 - y1).to_image();
    Some(resize(&crop, size as u32, size as u32, Interpolation::Bilinear))
}

/// Where the five landmarks go in a 112 x 112 crop (the template of the ArcFace / InsightFace
/// alignment), scaled to the output size.
const TEMPLATE_112: [[f32; 2]; 5] =
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// Least-squares similarity `dst = [[a, -b], [b, a]] src + t` mapping `src` onto `dst`.
fn similarity(src: &[[f32; 2]; 5], dst: &[[f32; 2]; 5]) -> Option<[f64; 4]> {
    let mean = |p: &[[f32; 2]; 5], i: usize| p.iter().map(|q| q[i] as f64).sum::<f64>() / 5.0;
    let (sx, sy, dx, dy) = (mean(src, 0), mean(src, 1), mean(dst, 0), mean(dst, 1));
    let (mut num_a, mut num_b, mut den) = (0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (x, y) = (s[0] as f64 - sx, s[1] as f64 - sy);
        let (u, v) = (d[0] as f64 - dx, d[1] as f64 - dy);
        num_a += x * u + y * v;
        num_b += x * v - y * u;
        den += x * x + y * y;
    }
    if den.is_nan() || den <= 1e-9 {
        return None;
    }
    let (a, b) = (num_a / den, num_b / den);
    Some([a, b, dx - (a * sx - b * sy), dy - (b * sx + a * sy)])
}

/// The face warped so its landmarks land on the template (bilinear sampling, black outside
/// the image). `None` for degenerate landmarks.
pub fn align_landmarks(img: &RgbImage, face: &Face, size: usize) -> Option<RgbImage> {
    let k = size as f32 / 112.0;
    let tpl: [[f32; 2]; 5] = TEMPLATE_112.map(|p| [p[0] * k, p[1] * k]);
    let [a, b, tx, ty] = similarity(&face.landmarks, &tpl)?;
    let det = a * a + b * b;
    if !(det.is_finite() && det > 1e-12) {
        return None;
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    let px = |x: i64, y: i64| -> [f64; 3] {
        if x < 0 || y < 0 || x >= w || y >= h {
            return [0.0; 3];
        }
        let p = img.get_pixel(x as u32, y as u32).0;
        [p[0] as f64, p[1] as f64, p[2] as f64]
    };
    let mut out = RgbImage::new(size as u32, size as u32);
    for (ox, oy, o) in out.enumerate_pixels_mut() {
        // inverse map of the output pixel into the image
        let (u, v) = (ox as f64 - tx, oy as f64 - ty);
        let (sx, sy) = ((a * u + b * v) / det, (-b * u + a * v) / det);
        let (x0, y0) = (sx.floor(), sy.floor());
        let (fx, fy) = (sx - x0, sy - y0);
        let (x0, y0) = (x0 as i64, y0 as i64);
        let (p00, p10, p01, p11) = (px(x0, y0), px(x0 + 1, y0), px(x0, y0 + 1), px(x0 + 1, y0 + 1));
        for c in 0..3 {
            let top = p00[c] * (1.0 - fx) + p10[c] * fx;
            let bot = p01[c] * (1.0 - fx) + p11[c] * fx;
            o.0[c] = (top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8;
        }
    }
    Some(out)
}

/// The face's crop as the chosen alignment makes it.
pub fn crop(img: &RgbImage, face: &Face, align: Align, size: usize, margin: f32) -> Option<RgbImage> {
    match align {
        Align::Box => extract_face(img, &face.bbox, size, margin),
        Align::Landmarks => align_landmarks(img, face, size),
    }
}

/// The central square of the image resized to `size` (for photos that are already face crops,
/// e.g. LFW's, when detection finds nothing).
pub fn center_square(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = w.min(h);
    let sq = image::imageops::crop_imm(img, (w - s) / 2, (h - s) / 2, s, s).to_image();
    resize(&sq, size as u32, size as u32, Interpolation::Bilinear)
}
