//! Training and evaluation data: Fashion-MNIST idx files and image folders (one subfolder per
//! class), decoded in parallel; Inception-style augmentation (random resized crop + flip); the
//! eval transform; and the multi-crop protocols.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;
use image::imageops;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::preprocess::{self, Preprocess, is_image_path, load_rgb};

/// Folder holding the Debian package `dataset-fashion-mnist`.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";
pub const FASHION_MNIST_LABELS: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Small deterministic generator (splitmix64): augmentation depends only on (seed, epoch, index).
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

enum Store {
    /// Grayscale images of `side x side`, row-major, one after the other.
    Gray {
        side: usize,
        pixels: Vec<u8>,
    },
    Files(Vec<PathBuf>),
}

/// A labelled image set.
pub struct Dataset {
    store: Store,
    pub labels: Vec<usize>,
    pub classes: Vec<String>,
    pub name: String,
}

fn gunzip(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f).read_to_end(&mut out).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
    Ok(out)
}

fn be_u32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// Read an idx image/label file pair (MNIST format, gzip-compressed).
fn read_idx(images: &Path, labels: &Path) -> Result<(usize, Vec<u8>, Vec<usize>)> {
    let bad = |p: &Path, why: &str| Error::Invalid(format!("{}: not an idx file ({why})", p.display()));
    let im = gunzip(images)?;
    let lb = gunzip(labels)?;
    if im.len() < 16 || be_u32(&im, 0) != 0x0803 {
        return Err(bad(images, "magic"));
    }
    if lb.len() < 8 || be_u32(&lb, 0) != 0x0801 {
        return Err(bad(labels, "magic"));
    }
    let (n, h, w) = (be_u32(&im, 4), be_u32(&im, 8), be_u32(&im, 12));
    if h != w || im.len() != 16 + n * h * w || lb.len() != 8 + n || be_u32(&lb, 4) != n {
        return Err(bad(images, "sizes do not match"));
    }
    Ok((h, im[16..].to_vec(), lb[8..].iter().map(|&l| l as usize).collect()))
}

/// Is `source` Fashion-MNIST (by name or an idx folder)?
pub fn is_fashion_mnist(source: &str) -> bool {
    source.contains("fashion") || Path::new(source).join("train-images-idx3-ubyte.gz").exists()
}

impl Dataset {
    /// Fashion-MNIST from `dir` (`train-*` or `t10k-*` idx files).
    pub fn fashion_mnist(dir: &Path, train: bool) -> Result<Self> {
        let p = if train { "train" } else { "t10k" };
        let (side, pixels, labels) =
            read_idx(&dir.join(format!("{p}-images-idx3-ubyte.gz")), &dir.join(format!("{p}-labels-idx1-ubyte.gz")))?;
        Ok(Self {
            store: Store::Gray { side, pixels },
            labels,
            classes: FASHION_MNIST_LABELS.iter().map(|s| s.to_string()).collect(),
            name: format!("fashion-mnist/{p}"),
        })
    }

    /// An image folder: one subfolder per class (sorted names = class indices), images found
    /// recursively inside each. Files that fail to decode are skipped later, when loaded.
    pub fn folder(root: &Path) -> Result<Self> {
        let rd = std::fs::read_dir(root).map_err(|err| Error::Io { path: root.to_path_buf(), err })?;
        let mut classes: Vec<String> =
            rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().to_string()).collect();
        classes.sort();
        if classes.is_empty() {
            return Err(Error::Invalid(format!("{}: no class subfolders", root.display())));
        }
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (i, c) in classes.iter().enumerate() {
            for f in crate::preprocess::collect_images(&[root.join(c)])? {
                if is_image_path(&f) {
                    files.push(f);
                    labels.push(i);
                }
            }
        }
        if files.is_empty() {
            return Err(Error::Invalid(format!("{}: no images in the class subfolders", root.display())));
        }
        Ok(Self { store: Store::Files(files), labels, classes, name: root.display().to_string() })
    }

    /// `train = true`: the training split. Sources: `fashion-mnist` (or its folder), a folder
    /// with `train/` and `val/` class folders, or a plain class folder (used for both).
    pub fn open(source: &str, train: bool) -> Result<Self> {
        let fm = Path::new(FASHION_MNIST_DIR);
        if source == "fashion-mnist" || source == "fashion_mnist" {
            if !fm.exists() {
                return Err(Error::Invalid(format!(
                    "{FASHION_MNIST_DIR} not found: install it with `apt-get install dataset-fashion-mnist`"
                )));
            }
            return Self::fashion_mnist(fm, train);
        }
        let root = Path::new(source);
        if !root.exists() {
            return Err(Error::Invalid(format!(
                "{}: dataset not found (give `fashion-mnist`, an idx folder or an image folder)",
                root.display()
            )));
        }
        if root.join("train-images-idx3-ubyte.gz").exists() {
            return Self::fashion_mnist(root, train);
        }
        let split = if train { ["train"].as_slice() } else { ["val", "validation", "test"].as_slice() };
        for s in split {
            if root.join(s).is_dir() {
                return Self::folder(&root.join(s));
            }
        }
        Self::folder(root)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Decode item `i` as RGB (grayscale repeated to 3 channels).
    pub fn image(&self, i: usize) -> Result<RgbImage> {
        match &self.store {
            Store::Gray { side, pixels } => {
                let px = &pixels[i * side * side..(i + 1) * side * side];
                Ok(RgbImage::from_fn(*side as u32, *side as u32, |x, y| {
                    let v = px[y as usize * side + x as usize];
                    image::Rgb([v, v, v])
                }))
            }
            Store::Files(files) => load_rgb(&files[i]),
        }
    }

    pub fn path(&self, i: usize) -> String {
        match &self.store {
            Store::Gray { .. } => format!("{}#{i}", self.name),
            Store::Files(f) => f[i].display().to_string(),
        }
    }
}

/// How images become tensors; both variants normalise and resample as `pre` says.
#[derive(Clone, Debug)]
pub enum Transform {
    /// Random resized crop (area fraction in `[min_area, 1]`, aspect in `[3/4, 4/3]`) to
    /// `pre.input_size` + horizontal flip.
    Train { pre: Preprocess, min_area: f64 },
    /// The eval transform (`Preprocess::apply`): resize, center crop.
    Eval(Preprocess),
}

impl Transform {
    pub fn pre(&self) -> &Preprocess {
        match self {
            Transform::Train { pre, .. } | Transform::Eval(pre) => pre,
        }
    }

    /// The normalised CHW tensor of one image.
    pub fn apply(&self, img: &RgbImage, rng: &mut SplitMix) -> Vec<f32> {
        match self {
            Transform::Eval(pre) => pre.apply(img),
            Transform::Train { pre, min_area } => {
                let view = random_resized_crop(&pre.colour(img), pre, *min_area, rng);
                preprocess::to_tensor(&view, pre.mean, pre.std)
            }
        }
    }
}

fn random_resized_crop(img: &RgbImage, pre: &Preprocess, min_area: f64, rng: &mut SplitMix) -> RgbImage {
    let (w, h) = img.dimensions();
    let area = (w * h) as f64;
    let mut crop = (0, 0, w, h);
    for _ in 0..10 {
        let a = area * (min_area + (1.0 - min_area) * rng.uniform());
        let ratio = ((3.0f64 / 4.0).ln() + rng.uniform() * ((4.0f64 / 3.0).ln() - (3.0f64 / 4.0).ln())).exp();
        let cw = (a * ratio).sqrt().round() as u32;
        let chh = (a / ratio).sqrt().round() as u32;
        if cw >= 1 && chh >= 1 && cw <= w && chh <= h {
            let x = (rng.uniform() * (w - cw + 1) as f64) as u32;
            let y = (rng.uniform() * (h - chh + 1) as f64) as u32;
            crop = (x.min(w - cw), y.min(h - chh), cw, chh);
            break;
        }
    }
    let c = imageops::crop_imm(img, crop.0, crop.1, crop.2, crop.3).to_image();
    let s = pre.input_size as u32;
    let mut out = preprocess::resize(&c, s, s, pre.interpolation);
    if rng.uniform() < 0.5 {
        imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// The multi-crop evaluation views of one image, each `pre.input_size` square, normalised.
///
/// - 1: the eval center crop (`Preprocess::apply`).
/// - 12: one scale (shorter side `size / 0.875`), the 4 corner crops, the center crop and the
///   whole image resized, each also mirrored.
/// - 144 (GoogLeNet, Szegedy et al. 2015, used by the paper): 4 scales (shorter side
///   256/224, 288/224, 320/224, 352/224 of `size`) x 3 squares (left/center/right, or
///   top/center/bottom) x 6 views (4 corners, center, the square resized) x 2 mirrors.
pub fn multi_crops(img: &RgbImage, pre: &Preprocess, crops: usize) -> Vec<Vec<f32>> {
    if crops <= 1 {
        return vec![pre.apply(img)];
    }
    let img = &*pre.colour(img);
    let size = pre.input_size;
    let s = size as u32;
    let f = pre.interpolation;
    let six = |sq: &RgbImage| -> Vec<RgbImage> {
        let (w, h) = sq.dimensions();
        let (cx, cy) = preprocess::center_crop_origin(w, h, s, s);
        let mut v: Vec<RgbImage> = [(0, 0), (w - s, 0), (0, h - s), (w - s, h - s), (cx as u32, cy as u32)]
            .iter()
            .map(|&(x, y)| imageops::crop_imm(sq, x, y, s, s).to_image())
            .collect();
        v.push(preprocess::resize(sq, s, s, f));
        v
    };
    let with_mirrors = |v: Vec<RgbImage>| -> Vec<RgbImage> {
        let mirrored: Vec<RgbImage> = v.iter().map(imageops::flip_horizontal).collect();
        v.into_iter().chain(mirrored).collect()
    };
    let views = match crops {
        12 => with_mirrors(six(&preprocess::resize_to_shorter(img, preprocess::scale_size(size, 0.875), f))),
        _ => {
            let mut out = Vec::with_capacity(144);
            for num in [256u32, 288, 320, 352] {
                let r = preprocess::resize_to_shorter(img, (s * num).div_ceil(224), f);
                let (w, h) = r.dimensions();
                let side = w.min(h);
                let squares: Vec<(u32, u32)> = if w >= h {
                    vec![(0, 0), ((w - side) / 2, 0), (w - side, 0)]
                } else {
                    vec![(0, 0), (0, (h - side) / 2), (0, h - side)]
                };
                for (x, y) in squares {
                    let sq = imageops::crop_imm(&r, x, y, side, side).to_image();
                    out.extend(with_mirrors(six(&sq)));
                }
            }
            out
        }
    };
    views.iter().map(|v| preprocess::to_tensor(v, pre.mean, pre.std)).collect()
}

/// A decoded batch: `[B, 3, S, S]` and labels, plus the items that could not be read.
pub struct Batch {
    pub images: Tensor<4>,
    pub labels: Tensor<1, Int>,
    pub label_vec: Vec<usize>,
    pub skipped: Vec<(String, String)>,
}

/// One decoded item (CHW data, label) or the path and reason it could not be read.
type Loaded = std::result::Result<(Vec<f32>, usize), (String, String)>;

/// A batch as NCHW values (`[labels.len(), 3, size, size]`).
pub struct RawBatch {
    pub data: Vec<f32>,
    pub size: usize,
    pub labels: Vec<usize>,
    pub skipped: Vec<(String, String)>,
}

/// Decode and transform `indices` in parallel; unreadable items are skipped and reported.
/// Augmentation draws from `SplitMix(seed ^ index)`, so a batch is reproducible.
pub fn load_batch(ds: &Dataset, indices: &[usize], t: &Transform, seed: u64, device: &Device) -> Option<Batch> {
    let RawBatch { data, size, labels, skipped } = load_raw(ds, indices, t, seed)?;
    let n = labels.len();
    let images = Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device);
    let l: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Some(Batch { images, labels: Tensor::from_data(TensorData::new(l, [n]), device), label_vec: labels, skipped })
}

/// `load_batch` without the tensors (`None` when no item could be read).
pub fn load_raw(ds: &Dataset, indices: &[usize], t: &Transform, seed: u64) -> Option<RawBatch> {
    let size = t.pre().input_size;
    let results: Vec<Loaded> = indices
        .par_iter()
        .map(|&i| {
            let img = ds.image(i).map_err(|e| (ds.path(i), e.to_string()))?;
            let mut rng = SplitMix::new(seed ^ (i as u64).wrapping_mul(0xD1B54A32D192ED03));
            Ok((t.apply(&img, &mut rng), ds.labels[i]))
        })
        .collect();
    let mut data = Vec::new();
    let mut labels = Vec::new();
    let mut skipped = Vec::new();
    for r in results {
        match r {
            Ok((x, l)) => {
                data.extend(x);
                labels.push(l);
            }
            Err(e) => skipped.push(e),
        }
    }
    if labels.is_empty() {
        return None;
    }
    Some(RawBatch { data, size, labels, skipped })
}
