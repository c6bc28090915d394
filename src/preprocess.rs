//! Image decoding and the eval transform of the model's pretrained config: resize the shorter
//! side to `floor(size / crop_pct)`, center crop `size`, scale to [0, 1], `(x - mean) / std`.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use crate::error::{Error, Result};
use crate::models::{Interpolation, PretrainedCfg};

/// Extensions we try to decode when walking a folder.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif"];

pub fn is_image_path(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Expand files and folders (recursively, sorted) into image paths.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut stack = vec![p.clone()];
            let mut found = Vec::new();
            while let Some(d) = stack.pop() {
                let rd = std::fs::read_dir(&d).map_err(|source| Error::Io { path: d.clone(), source })?;
                for e in rd.flatten() {
                    let path = e.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if is_image_path(&path) {
                        found.push(path);
                    }
                }
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Decode any supported image (JPEG, PNG, WebP, BMP; grayscale and alpha included) to RGB.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    let err = |reason: String| Error::Image { path: path.to_path_buf(), reason };
    let reader = image::ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    let img = reader.decode().map_err(|e| err(e.to_string()))?;
    Ok(img.to_rgb8())
}

fn filter(i: Interpolation) -> FilterType {
    match i {
        Interpolation::Bicubic => FilterType::CatmullRom,
        Interpolation::Bilinear => FilterType::Triangle,
    }
}

/// Eval transform to a CHW f32 vector of `size x size`.
pub fn transform(img: &image::RgbImage, cfg: &PretrainedCfg, size: usize) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let scale_size = ((size as f64) / cfg.crop_pct).floor().max(size as f64) as u32;
    let (nw, nh) = if w <= h {
        (scale_size, ((h as f64) * scale_size as f64 / w as f64).round().max(scale_size as f64) as u32)
    } else {
        (((w as f64) * scale_size as f64 / h as f64).round().max(scale_size as f64) as u32, scale_size)
    };
    let resized = image::imageops::resize(img, nw, nh, filter(cfg.interpolation));
    let s = size as u32;
    let (x0, y0) = ((nw - s) / 2, (nh - s) / 2);
    let mut out = vec![0f32; 3 * size * size];
    for y in 0..s {
        for x in 0..s {
            let p = resized.get_pixel(x0 + x, y0 + y);
            for c in 0..3 {
                let v = p[c] as f32 / 255.0;
                out[c * size * size + (y as usize) * size + x as usize] = (v - cfg.mean[c]) / cfg.std[c];
            }
        }
    }
    out
}

/// Load and transform one image.
pub fn load_image(path: &Path, cfg: &PretrainedCfg, size: usize) -> Result<Vec<f32>> {
    Ok(transform(&load_rgb(path)?, cfg, size))
}
