//! The one preprocessing path: decode -> (grayscale) -> resize -> crop -> normalise. Every
//! command that turns an image into a tensor (classify, embed, preprocess, eval, training's
//! evaluation and augmentation) goes through this file.
//!
//! It reproduces timm's eval transform for PIL images to the pixel:
//! - `Resize(floor(size / crop_pct))` of torchvision: the shorter side becomes `scale`, the
//!   longer `int(scale * long / short)` (truncated);
//! - Pillow's resampling (`Resample.c`): separable, horizontal pass then vertical, filter
//!   support scaled by the downscale factor (antialiasing), coefficients normalised in f64 and
//!   rounded to 22-bit fixed point, each pass rounded and clipped to 8 bits;
//! - `CenterCrop(size)`: offsets `round((H - size) / 2)` with Python's half-to-even rounding,
//!   zero padding when the image is smaller than the crop;
//! - `ToTensor` + `Normalize`: `(v / 255 - mean) / std` in f32.
//!
//! Only the pixels inside the crop are resampled (each output pixel depends on its own
//! coefficients only, so this is exact), which also bounds the memory of extreme aspect ratios.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Resampling filter (Pillow's `BICUBIC` with a = -0.5, or `BILINEAR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Bicubic,
    Bilinear,
}

/// How an image becomes the network's input; stored in every model file we write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub input_size: usize,
    /// Resize the shorter side to `floor(input_size / crop_pct)`, then center crop.
    pub crop_pct: f64,
    pub interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Convert to luma first (models trained on grayscale data), repeated to 3 channels.
    #[serde(default)]
    pub grayscale: bool,
}

impl Preprocess {
    /// timm's ImageNet config of the Inception weights: bicubic, mean = std = 0.5.
    pub fn inception(input_size: usize, crop_pct: f64) -> Self {
        Self {
            input_size,
            crop_pct,
            interpolation: Interpolation::Bicubic,
            mean: [0.5; 3],
            std: [0.5; 3],
            grayscale: false,
        }
    }

    /// facenet-pytorch's fixed image standardisation `(x - 127.5) / 128` on 160 px crops.
    pub fn facenet() -> Self {
        Self {
            input_size: 160,
            crop_pct: 1.0,
            interpolation: Interpolation::Bilinear,
            mean: [0.5; 3],
            std: [128.0 / 255.0; 3],
            grayscale: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        check_size(self.input_size)?;
        if !(self.crop_pct.is_finite() && self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(Error::Invalid(format!("crop_pct {} is outside (0, 1]", self.crop_pct)));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s == 0.0) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::Invalid(format!(
                "mean {:?} / std {:?} must be finite, std non-zero",
                self.mean, self.std
            )));
        }
        Ok(())
    }

    /// The eval transform of a decoded image: a `3 x size x size` CHW vector.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        let view = self.view(img);
        to_tensor(&view, self.mean, self.std)
    }

    /// The image in the colours the network expects: as is, or luma repeated (`grayscale`).
    pub fn colour<'a>(&self, img: &'a RgbImage) -> std::borrow::Cow<'a, RgbImage> {
        if self.grayscale { std::borrow::Cow::Owned(to_gray_rgb(img)) } else { std::borrow::Cow::Borrowed(img) }
    }

    /// The `size x size` center crop the network sees, before normalisation.
    pub fn view(&self, img: &RgbImage) -> RgbImage {
        let img = self.colour(img);
        let (w, h) = img.dimensions();
        let (nw, nh) = resize_shorter(w, h, scale_size(self.input_size, self.crop_pct));
        let s = self.input_size as u32;
        let (left, top) = center_crop_origin(nw, nh, s, s);
        resize_window(&img, nw, nh, left, top, s, s, self.interpolation)
    }

    /// Decode and transform one file.
    pub fn load(&self, path: &Path) -> Result<Vec<f32>> {
        Ok(self.apply(&load_rgb(path)?))
    }
}

/// Smallest input these networks take (global pooling after five stride-2 stages).
pub const MIN_INPUT: usize = 75;
/// Largest input size we accept on the command line and in configs.
pub const MAX_INPUT: usize = 2048;

/// `size` must lie in `[MIN_INPUT, MAX_INPUT]`.
pub fn check_size(size: usize) -> Result<()> {
    if size < MIN_INPUT {
        return Err(Error::InputTooSmall { size });
    }
    if size > MAX_INPUT {
        return Err(Error::Invalid(format!("image size {size} px is above the maximum of {MAX_INPUT} px")));
    }
    Ok(())
}

/// timm: `floor(size / crop_pct)`.
pub fn scale_size(size: usize, crop_pct: f64) -> u32 {
    ((size as f64) / crop_pct).floor() as u32
}

/// torchvision `Resize(int)`: the shorter side to `short`, the longer `int(short * long / s)`.
pub fn resize_shorter(w: u32, h: u32, short: u32) -> (u32, u32) {
    let (s, l) = if w <= h { (w, h) } else { (h, w) };
    let long = ((short as u64 * l as u64) as f64 / s.max(1) as f64) as u32;
    if w <= h { (short, long) } else { (long, short) }
}

/// Python's `round(x / 2.0)` of an integer `x`: halves go to the even neighbour.
fn half_even_div2(x: i64) -> i64 {
    let q = x.div_euclid(2);
    if x.rem_euclid(2) == 1 && q % 2 != 0 { q + 1 } else { q }
}

/// torchvision `CenterCrop`: top-left corner of a `cw x ch` crop of a `w x h` image, in the
/// image's coordinates (negative where it pads with zeros).
pub fn center_crop_origin(w: u32, h: u32, cw: u32, ch: u32) -> (i64, i64) {
    let axis = |n: u32, c: u32| -> i64 {
        if c > n {
            // padded by (c - n) / 2 before; the padded size equals the crop
            -(((c - n) / 2) as i64)
        } else {
            half_even_div2(n as i64 - c as i64)
        }
    };
    (axis(w, cw), axis(h, ch))
}

/// Pillow's `L` conversion (ITU-R 601-2 luma, 16-bit fixed point), repeated to RGB.
pub fn to_gray_rgb(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let [r, g, b] = p.0;
        let l = ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8;
        p.0 = [l, l, l];
    }
    out
}

/// CHW f32, `(v / 255 - mean) / std` per channel.
pub fn to_tensor(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let n = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Pillow's resampling

const PRECISION_BITS: u32 = 22;

fn filter_support(f: Interpolation) -> f64 {
    match f {
        Interpolation::Bicubic => 2.0,
        Interpolation::Bilinear => 1.0,
    }
}

fn filter_weight(f: Interpolation, x: f64) -> f64 {
    let x = x.abs();
    match f {
        Interpolation::Bicubic => {
            let a = -0.5;
            if x < 1.0 {
                ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * a
            } else {
                0.0
            }
        }
        Interpolation::Bilinear => {
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
    }
}

/// Fixed-point taps of the output positions `outs` (a subrange of `0..out_size`).
struct Taps {
    /// Per output: first input index and tap count.
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    k: Vec<i32>,
}

fn taps(in_size: u32, out_size: u32, outs: std::ops::Range<u32>, f: Interpolation) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter_support(f) * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(outs.len());
    let mut k = vec![0i32; outs.len() * ksize];
    let mut w = vec![0f64; ksize];
    for (j, xx) in outs.enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0;
        for (x, slot) in w.iter_mut().enumerate().take(n) {
            let v = filter_weight(f, ((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *slot = v;
            ww += v;
        }
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let fixed = v * (1u32 << PRECISION_BITS) as f64;
            k[j * ksize + x] = if v < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin as usize, n));
    }
    Taps { bounds, ksize, k }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// The window `[left, left + cw) x [top, top + ch)` of `img` resized to `nw x nh` with Pillow's
/// resampling; positions outside `0..nw` / `0..nh` are zero (torchvision's padding).
#[allow(clippy::too_many_arguments)]
pub fn resize_window(
    img: &RgbImage,
    nw: u32,
    nh: u32,
    left: i64,
    top: i64,
    cw: u32,
    ch: u32,
    f: Interpolation,
) -> RgbImage {
    let mut out = RgbImage::new(cw, ch);
    let clamp = |v: i64, n: u32| v.clamp(0, n as i64) as u32;
    let (x0, x1) = (clamp(left, nw), clamp(left + cw as i64, nw));
    let (y0, y1) = (clamp(top, nh), clamp(top + ch as i64, nh));
    if x0 >= x1 || y0 >= y1 {
        return out;
    }
    let (w, h) = img.dimensions();
    let src = img.as_raw();
    let ht = taps(w, nw, x0..x1, f);
    let vt = taps(h, nh, y0..y1, f);
    // rows of the source that the vertical taps read
    let r0 = vt.bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let r1 = vt.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
    let ncols = (x1 - x0) as usize;
    // horizontal pass: rows r0..r1, output columns x0..x1, rounded to 8 bits
    let mut mid = vec![0u8; (r1 - r0) * ncols * 3];
    let row_bytes = w as usize * 3;
    for (r, row_out) in (r0..r1).zip(mid.chunks_exact_mut(ncols * 3)) {
        let row = &src[r * row_bytes..][..row_bytes];
        for (j, px) in row_out.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = ht.bounds[j];
            let k = &ht.k[j * ht.ksize..][..n];
            let mut s = [1i32 << (PRECISION_BITS - 1); 3];
            for (t, &kv) in k.iter().enumerate() {
                let p = &row[(xmin + t) * 3..][..3];
                s[0] += p[0] as i32 * kv;
                s[1] += p[1] as i32 * kv;
                s[2] += p[2] as i32 * kv;
            }
            px.copy_from_slice(&[clip8(s[0]), clip8(s[1]), clip8(s[2])]);
        }
    }
    // vertical pass
    let ox = (x0 as i64 - left) as u32;
    let oy = (y0 as i64 - top) as u32;
    for (i, &(ymin, n)) in vt.bounds.iter().enumerate() {
        let k = &vt.k[i * vt.ksize..][..n];
        for j in 0..ncols {
            let mut s = [1i32 << (PRECISION_BITS - 1); 3];
            for (t, &kv) in k.iter().enumerate() {
                let p = &mid[((ymin - r0 + t) * ncols + j) * 3..][..3];
                s[0] += p[0] as i32 * kv;
                s[1] += p[1] as i32 * kv;
                s[2] += p[2] as i32 * kv;
            }
            out.put_pixel(ox + j as u32, oy + i as u32, image::Rgb([clip8(s[0]), clip8(s[1]), clip8(s[2])]));
        }
    }
    out
}

/// Pillow `Image.resize((nw, nh), filter)` of the whole image.
pub fn resize(img: &RgbImage, nw: u32, nh: u32, f: Interpolation) -> RgbImage {
    if img.dimensions() == (nw, nh) {
        return img.clone();
    }
    resize_window(img, nw, nh, 0, 0, nw, nh, f)
}

/// Resize the shorter side to `short` (torchvision rounding), whole image.
pub fn resize_to_shorter(img: &RgbImage, short: u32, f: Interpolation) -> RgbImage {
    let (nw, nh) = resize_shorter(img.width(), img.height(), short);
    resize(img, nw, nh, f)
}

// ---------------------------------------------------------------------------------------------
// Decoding and finding files

/// Extensions we decode (and so collect when walking a folder).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];
/// Largest decoded image, in pixels (e.g. 8192 x 8192).
pub const MAX_PIXELS: u64 = 1 << 26;
/// Longest side we decode.
pub const MAX_SIDE: u32 = 32_768;

pub fn is_image_path(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Expand files and folders (recursively, sorted) into image paths. Each folder is entered
/// once (by its canonical path, so symlink loops end) and each file is listed once.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    for p in inputs {
        if p.is_dir() {
            let mut stack = vec![p.clone()];
            let mut found = Vec::new();
            while let Some(d) = stack.pop() {
                let Ok(canon) = std::fs::canonicalize(&d) else { continue };
                if !seen_dirs.insert(canon) {
                    continue;
                }
                let rd = std::fs::read_dir(&d).map_err(|err| Error::Io { path: d.clone(), err })?;
                for e in rd.flatten() {
                    let path = e.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if is_image_path(&path) {
                        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                        if seen_files.insert(key) {
                            found.push(path);
                        }
                    }
                }
            }
            found.sort();
            out.extend(found);
        } else {
            let key = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            if seen_files.insert(key) {
                out.push(p.clone());
            }
        }
    }
    Ok(out)
}

/// Decode any supported image (JPEG, PNG, WebP, BMP; grayscale, alpha and 16-bit included) to
/// 8-bit RGB as Pillow's `convert("RGB")` does: alpha dropped, 16-bit samples keep their high
/// byte. Images over `MAX_PIXELS` or `MAX_SIDE` are refused before any pixel is allocated.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
    decode_rgb(&bytes).map_err(|reason| Error::Image { path: path.to_path_buf(), reason })
}

/// `load_rgb` from bytes in memory; the error is the reason.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let reader =
        || image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string());
    let (w, h) = reader()?.into_dimensions().map_err(|e| e.to_string())?;
    if w == 0 || h == 0 {
        return Err(format!("empty image ({w} x {h})"));
    }
    if w > MAX_SIDE || h > MAX_SIDE || w as u64 * h as u64 > MAX_PIXELS {
        return Err(format!(
            "{w} x {h} pixels is larger than we decode (at most {MAX_PIXELS} pixels, sides up to {MAX_SIDE})"
        ));
    }
    if image::guess_format(bytes).ok() == Some(image::ImageFormat::Jpeg)
        && let Some(r) = decode_jpeg_libjpeg(bytes)
    {
        return r;
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_PIXELS * 8 + (64 << 20));
    r.limits(limits);
    let img = r.decode().map_err(|e| e.to_string())?;
    Ok(match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let i = img.into_rgb16();
            let (w, h) = i.dimensions();
            RgbImage::from_raw(w, h, i.into_raw().into_iter().map(|v| (v >> 8) as u8).collect())
                .ok_or("16-bit conversion failed")?
        }
        other => other.to_rgb8(),
    })
}

/// Pillow's `CMYK` -> `RGB` of a libjpeg CMYK sample: Pillow reads JPEG CMYK inverted (Adobe's
/// convention, `CMYK;I`), then `r = (255 - k) - c (255 - k) / 255` with its rounding.
fn cmyk_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = p.map(|v| 255 - v as i32);
    let nk = 255 - k;
    let muldiv255 = |a: i32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v)).clamp(0, 255) as u8)
}

/// Decode a JPEG with libjpeg-turbo's decoder (mozjpeg), exactly as Pillow does (ISLOW IDCT,
/// fancy upsampling; grayscale repeated to RGB; CMYK / YCCK converted with Pillow's formula).
/// A file that ends early is an error, as in Pillow. `None` for other colour spaces (the
/// `image` crate decodes those).
fn decode_jpeg_libjpeg(bytes: &[u8]) -> Option<std::result::Result<RgbImage, String>> {
    use mozjpeg_sys as ffi;
    use std::os::raw::c_int;

    extern "C-unwind" fn fail(cinfo: &mut ffi::jpeg_common_struct) {
        // SAFETY: libjpeg calls this with its error manager set.
        let code = unsafe { cinfo.err.as_ref().map_or(0, |e| e.msg_code) };
        std::panic::resume_unwind(Box::new(format!("corrupt JPEG data (libjpeg error {code})")));
    }
    extern "C-unwind" fn message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
        // SAFETY: as above.
        let code = unsafe { cinfo.err.as_ref().map_or(0, |e| e.msg_code) };
        if level < 0 && code == ffi::JWRN_JPEG_EOF as c_int {
            std::panic::resume_unwind(Box::new("image file is truncated".to_string()));
        }
    }
    let run = || -> std::result::Result<Option<RgbImage>, String> {
        // SAFETY: a zeroed error manager filled in by libjpeg's own initialiser.
        let mut err: ffi::jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { ffi::jpeg_std_error(&mut err) };
        err.error_exit = Some(fail);
        err.emit_message = Some(message);
        let d = mozjpeg::Decompress::with_err(err).from_mem(bytes).map_err(|e| e.to_string())?;
        use mozjpeg::ColorSpace as Cs;
        let (started, cmyk) = match d.color_space() {
            Cs::JCS_YCbCr | Cs::JCS_GRAYSCALE | Cs::JCS_RGB => (d.rgb(), false),
            Cs::JCS_CMYK | Cs::JCS_YCCK => (d.to_colorspace(Cs::JCS_CMYK), true),
            _ => return Ok(None),
        };
        let mut started = started.map_err(|e| e.to_string())?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let px = started.read_scanlines::<u8>().map_err(|e| e.to_string())?;
        started.finish().map_err(|e| e.to_string())?;
        let rgb =
            if cmyk { px.chunks_exact(4).flat_map(|p| cmyk_to_rgb([p[0], p[1], p[2], p[3]])).collect() } else { px };
        Ok(RgbImage::from_raw(w, h, rgb))
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|payload| {
        Err(payload.downcast_ref::<String>().cloned().unwrap_or_else(|| "corrupt JPEG data".into()))
    });
    match r {
        Ok(Some(img)) => Some(Ok(img)),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    }
}
