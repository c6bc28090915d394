//! Faces, the FaceNet use of Inception-ResNet-v1: MTCNN detection -> aligned 160 px crop ->
//! IR-v1 -> L2-normalised 512-d embedding -> distance -> same person or not. Detection and
//! crops follow facenet-pytorch (`MTCNN`, `extract_face`); `eval-pairs` is the LFW protocol.
//!
//! ```
//! use inception::faces::{Mtcnn, DetectConfig};
//!
//! let mtcnn = Mtcnn::new(DetectConfig::default())?; // the shipped trained weights
//! let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faces/obama.jpg");
//! let img = inception::preprocess::load_rgb(&path)?;
//! let faces = mtcnn.detect(&img);
//! assert_eq!(faces.len(), 1);
//! assert!(faces[0].prob > 0.99);
//! let crop = inception::faces::align::extract_face(&img, &faces[0].bbox, 160, 0.0).unwrap();
//! assert_eq!(crop.dimensions(), (160, 160));
//! // `FaceEmbedder::new(Bundle::load(None, Some(facenet_file), &device)?)?` then embeds crops
//! # Ok::<(), inception::Error>(())
//! ```

pub mod align;
pub mod direct;
pub mod mtcnn;
pub mod pairs;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::RgbImage;
use serde::{Deserialize, Serialize};

pub use align::Align;
pub use mtcnn::{DetectConfig, Face, Mtcnn};

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::predict::{EngineKind, Predictor};
use crate::preprocess::{self, Preprocess};
use crate::weights;

/// Which face of a photo counts when one is wanted (facenet-pytorch's `selection_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The largest box.
    #[default]
    Largest,
    /// The highest probability.
    Probability,
    /// The largest box among those with probability above 0.9.
    LargestOverThreshold,
    /// Box area minus 2 x the squared distance of its centre from the image centre.
    CenterWeightedSize,
}

impl std::str::FromStr for Selection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "largest" => Ok(Selection::Largest),
            "probability" => Ok(Selection::Probability),
            "largest_over_threshold" => Ok(Selection::LargestOverThreshold),
            "center_weighted_size" => Ok(Selection::CenterWeightedSize),
            o => Err(Error::Invalid(format!(
                "unknown selection '{o}' (largest, probability, largest_over_threshold, center_weighted_size)"
            ))),
        }
    }
}

/// Index of the face `method` picks in an image of `(w, h)` pixels (`None`: no face qualifies).
pub fn select(faces: &[Face], method: Selection, (w, h): (u32, u32)) -> Option<usize> {
    let best = |key: &dyn Fn(&Face) -> f32, ok: &dyn Fn(&Face) -> bool| {
        faces
            .iter()
            .enumerate()
            .filter(|(_, f)| ok(f))
            .max_by(|a, b| key(a.1).total_cmp(&key(b.1)).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
    };
    match method {
        Selection::Largest => best(&Face::area, &|_| true),
        Selection::Probability => best(&|f| f.prob, &|_| true),
        Selection::LargestOverThreshold => best(&Face::area, &|f| f.prob > 0.9),
        Selection::CenterWeightedSize => {
            let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
            let key = |f: &Face| {
                let (dx, dy) = ((f.bbox[0] + f.bbox[2]) / 2.0 - cx, (f.bbox[1] + f.bbox[3]) / 2.0 - cy);
                f.area() - 2.0 * (dx * dx + dy * dy)
            };
            best(&key, &|_| true)
        }
    }
}

/// An embedding network with its face preprocessing (facenet: 160 px, `(x - 127.5) / 128`),
/// on the fast engine; IR-v1 embeddings are L2-normalised.
pub struct FaceEmbedder {
    predictor: Predictor,
    pre: Preprocess,
    pub source: String,
}

impl FaceEmbedder {
    pub fn new(bundle: Bundle) -> Result<Self> {
        let predictor = bundle.predictor(EngineKind::Fast, &Device::flex())?;
        Ok(Self { predictor, pre: bundle.pre, source: bundle.source })
    }

    /// Load face weights as the CLI does: `weights` (a facenet-pytorch conversion or a file we
    /// wrote); without a file there are no face weights to use.
    pub fn load(weights_path: Option<&Path>) -> Result<Self> {
        let Some(path) = weights_path else {
            return Err(Error::Invalid(
                "face embeddings need Inception-ResNet-v1 face weights: convert facenet-pytorch's \
                 VGGFace2 or CASIA-WebFace checkpoint with scripts/convert_facenet.py and pass it \
                 with --weights FILE"
                    .into(),
            ));
        };
        // what the file holds; files that do not say are taken as facenet's IR-v1
        let header = weights::read_header(path)?;
        let held = crate::bundle::describe(path, &header)?
            .config
            .map(|c| c.model)
            .or_else(|| crate::bundle::guess_kind(&header));
        if let Some(k) = held
            && !matches!(k, crate::ModelKind::InceptionResnetV1 | crate::ModelKind::InceptionResnetV1Paper)
        {
            return Err(Error::Invalid(format!(
                "{} holds {k} weights; face embeddings need Inception-ResNet-v1 (facenet) weights",
                path.display()
            )));
        }
        let kind = held.unwrap_or(crate::ModelKind::InceptionResnetV1);
        Self::new(Bundle::load(Some(kind.name()), Some(path), &Device::flex())?)
    }

    /// Side of the square crops the network takes.
    pub fn size(&self) -> usize {
        self.pre.input_size
    }

    /// Embeddings of face crops (resized to `size()` when they are not), one row each.
    pub fn embed(&self, crops: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let s = self.size();
        let mut x = Vec::with_capacity(crops.len() * 3 * s * s);
        for c in crops {
            let c = if c.dimensions() != (s as u32, s as u32) {
                std::borrow::Cow::Owned(preprocess::resize(c, s as u32, s as u32, preprocess::Interpolation::Bilinear))
            } else {
                std::borrow::Cow::Borrowed(c)
            };
            x.extend(preprocess::to_tensor(&self.pre.colour(&c), self.pre.mean, self.pre.std));
        }
        let mut out = Vec::with_capacity(crops.len());
        for chunk in x.chunks(16 * 3 * s * s) {
            let n = chunk.len() / (3 * s * s);
            let e = self.predictor.run(chunk, [n, 3, s, s], false).embedding;
            if e.data.iter().any(|v| !v.is_finite()) {
                return Err(Error::Invalid("the model produced non-finite embeddings (NaN / inf)".into()));
            }
            let d = e.shape[1];
            out.extend(e.data.chunks(d).map(<[f32]>::to_vec));
        }
        Ok(out)
    }
}

/// Euclidean distance of two embeddings.
pub fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

/// The faces of one image, or why it could not be read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Detection {
    pub image: String,
    pub faces: Vec<Face>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Median detection time over the runs, in milliseconds (decoding excluded).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ms: Option<f64>,
}

/// Detect faces in each image (a bad image is an error entry, the others go on); `runs` > 1
/// repeats the detection and reports its median time; `draw` writes each image with all its
/// boxes and landmarks to that folder; `select` then keeps one face per image.
pub fn detect_files(
    m: &Mtcnn,
    paths: &[PathBuf],
    runs: usize,
    draw: Option<&Path>,
    select: Option<Selection>,
) -> Result<Vec<Detection>> {
    if let Some(dir) = draw {
        std::fs::create_dir_all(dir).map_err(|err| Error::Io { path: dir.to_path_buf(), err })?;
    }
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::new();
    for path in paths {
        let image = path.display().to_string();
        let img = match preprocess::load_rgb(path) {
            Ok(i) => i,
            Err(e) => {
                out.push(Detection { image, faces: vec![], error: Some(e.to_string()), ms: None });
                continue;
            }
        };
        let mut times = Vec::new();
        let mut faces = Vec::new();
        for _ in 0..runs.max(1) {
            let t = std::time::Instant::now();
            faces = m.detect(&img);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        if let Some(dir) = draw {
            let stem = path.file_stem().map_or("image".into(), |s| s.to_string_lossy().to_string());
            let mut name = format!("{stem}.png");
            let mut i = 1;
            while !used.insert(name.clone()) {
                name = format!("{stem}_{i}.png");
                i += 1;
            }
            save_png(&dir.join(name), &draw_faces(&img, &faces))?;
        }
        if let Some(method) = select {
            faces = self::select(&faces, method, img.dimensions()).map(|i| faces[i].clone()).into_iter().collect();
        }
        let ms = (runs > 1).then(|| times[times.len() / 2]);
        out.push(Detection { image, faces, error: None, ms });
    }
    Ok(out)
}

/// A copy of the image with each face's box (green) and landmarks (red) drawn.
pub fn draw_faces(img: &RgbImage, faces: &[Face]) -> RgbImage {
    let mut out = img.clone();
    let (w, h) = (img.width() as i64, img.height() as i64);
    let t = ((w.min(h) as f32 / 200.0).ceil() as i64).max(1);
    let mut fill = |x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]| {
        for y in y0.max(0)..y1.min(h) {
            for x in x0.max(0)..x1.min(w) {
                out.put_pixel(x as u32, y as u32, image::Rgb(c));
            }
        }
    };
    for f in faces {
        let [x0, y0, x1, y1] = f.bbox.map(|v| v.round().clamp(-1e6, 1e6) as i64);
        let g = [0, 220, 0];
        fill(x0, y0, x1, y0 + t, g);
        fill(x0, y1 - t, x1, y1, g);
        fill(x0, y0, x0 + t, y1, g);
        fill(x1 - t, y0, x1, y1, g);
        for [x, y] in f.landmarks {
            let (x, y) = (x.round().clamp(-1e6, 1e6) as i64, y.round().clamp(-1e6, 1e6) as i64);
            fill(x - t - 1, y - t - 1, x + t + 2, y + t + 2, [230, 0, 0]);
        }
    }
    out
}

fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    weights::write_atomic(path, &png)
}

/// Crop and selection settings shared by `embed`, `verify` and `eval-pairs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub align: Align,
    /// Margin around the box, in output pixels (`Align::Box`).
    pub margin: f32,
    pub selection: Selection,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self { align: Align::Box, margin: 0.0, selection: Selection::Largest }
    }
}

/// Detector and embedder together.
pub struct Pipeline {
    pub mtcnn: Mtcnn,
    pub embedder: FaceEmbedder,
    pub config: PipelineConfig,
}

/// One embedded face.
#[derive(Clone, Debug, Serialize)]
pub struct EmbeddedFace {
    pub image: String,
    /// Index of the face in the image's detections (largest first).
    pub face: usize,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub prob: f32,
}

impl Pipeline {
    /// The shipped MTCNN with `detect` settings.
    pub fn new(detect: DetectConfig, embedder: FaceEmbedder, config: PipelineConfig) -> Result<Self> {
        Ok(Self { mtcnn: Mtcnn::new(detect)?, embedder, config })
    }

    fn crop(&self, img: &RgbImage, f: &Face) -> Option<RgbImage> {
        align::crop(img, f, self.config.align, self.embedder.size(), self.config.margin)
    }

    /// Every face of an image with its embedding, largest first.
    pub fn faces(&self, img: &RgbImage) -> Result<Vec<(Face, Vec<f32>)>> {
        let faces = self.mtcnn.detect(img);
        let (kept, crops): (Vec<Face>, Vec<RgbImage>) =
            faces.into_iter().filter_map(|f| self.crop(img, &f).map(|c| (f, c))).unzip();
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        Ok(kept.into_iter().zip(self.embedder.embed(&crops)?).collect())
    }

    /// The selected face of an image and its embedding (`None`: no face).
    pub fn best_face(&self, img: &RgbImage) -> Result<Option<(Face, Vec<f32>)>> {
        let faces = self.mtcnn.detect(img);
        let Some(i) = select(&faces, self.config.selection, img.dimensions()) else { return Ok(None) };
        let Some(c) = self.crop(img, &faces[i]) else { return Ok(None) };
        let e = self.embedder.embed(&[c])?;
        Ok(e.into_iter().next().map(|e| (faces[i].clone(), e)))
    }

    /// Embed every face of images and folders into `out` (`embeddings` `[faces, d]`; per row
    /// the image, face index, box and probability in the `faces` metadata).
    pub fn embed_files(&self, inputs: &[PathBuf], out: &Path, on_image: &mut dyn FnMut()) -> Result<EmbedFacesReport> {
        let paths = preprocess::collect_images(inputs)?;
        let (mut rows, mut data, mut skipped, mut no_face) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut d = 0;
        for path in &paths {
            let image = path.display().to_string();
            match preprocess::load_rgb(path).and_then(|img| self.faces(&img)) {
                Ok(faces) if faces.is_empty() => no_face.push(image),
                Ok(faces) => {
                    for (i, (f, e)) in faces.into_iter().enumerate() {
                        d = e.len();
                        data.extend(e);
                        rows.push(EmbeddedFace { image: image.clone(), face: i, bbox: f.bbox, prob: f.prob });
                    }
                }
                Err(e) => skipped.push((image, e.to_string())),
            }
            on_image();
        }
        if rows.is_empty() {
            return Err(Error::Invalid(format!(
                "no face found in {} image(s) ({} unreadable)",
                paths.len() - skipped.len(),
                skipped.len()
            )));
        }
        let meta = HashMap::from([
            ("faces".to_string(), js(&rows)),
            ("no_face".to_string(), js(&no_face)),
            ("skipped".to_string(), js(&skipped.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>())),
            ("source".to_string(), self.embedder.source.clone()),
            ("pipeline".to_string(), js(&self.config)),
            ("detect".to_string(), js(&self.mtcnn.config)),
        ]);
        let shape = vec![rows.len(), d];
        weights::save_tensors(out, &BTreeMap::from([("embeddings".to_string(), (shape.clone(), data))]), Some(meta))?;
        Ok(EmbedFacesReport { out: out.to_path_buf(), shape, faces: rows, no_face, skipped })
    }
}

fn js<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// What `faces embed` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct EmbedFacesReport {
    pub out: PathBuf,
    pub shape: Vec<usize>,
    pub faces: Vec<EmbeddedFace>,
    pub no_face: Vec<String>,
    pub skipped: Vec<(String, String)>,
}

/// The answer of `faces verify`.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// Euclidean distance of the two L2-normalised embeddings (0 to 2).
    pub distance: f32,
    pub threshold: f32,
    pub same: bool,
    pub faces: [Face; 2],
}

/// Distance between the selected faces of two photos, and the decision `distance < threshold`.
pub fn verify(p: &Pipeline, a: &Path, b: &Path, threshold: f32) -> Result<Verdict> {
    let face = |path: &Path| -> Result<(Face, Vec<f32>)> {
        let img = preprocess::load_rgb(path)?;
        p.best_face(&img)?.ok_or_else(|| Error::Invalid(format!("{}: no face found", path.display())))
    };
    let ((fa, ea), (fb, eb)) = (face(a)?, face(b)?);
    let d = distance(&ea, &eb);
    Ok(Verdict { distance: d, threshold, same: d < threshold, faces: [fa, fb] })
}
