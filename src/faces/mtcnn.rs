//! MTCNN face detection (Zhang, Zhang, Li, Qiao, "Joint Face Detection and Alignment using
//! Multi-task Cascaded Convolutional Networks", IEEE SPL 2016, Fig. 2) on the fast engine's
//! convolutions, following facenet-pytorch's `detect_face` step by step: P-Net over an image
//! pyramid (area resampling, scale factor 0.709), R-Net on 24 px crops, O-Net on 48 px crops
//! (probabilities, box regression, 5 landmarks), non-maximum suppression after each stage.
//! The R-/O-Net crops of an image run as one batch.

use std::path::Path;

use rayon::prelude::*;
use safetensors::SafeTensors;

use super::direct::{self, DirectConv, Planar, pool_out};
use crate::engine::{Act, Conv, Dense};
use crate::error::{Error, Result};
use crate::weights;

/// The trained weights (facenet-pytorch's `data/{pnet,rnet,onet}.pt`, converted by
/// scripts/convert_mtcnn.py), embedded in the binary.
pub const WEIGHTS: &[u8] = include_bytes!("../../assets/mtcnn/mtcnn.safetensors");
const WEIGHTS_NAME: &str = "<embedded MTCNN weights>";

/// One convolution of a net: checkpoint name, `[cout, cin, k]`, and the max pool
/// `(kernel, stride)` (ceil mode) after its PReLU.
struct ConvSpec(&'static str, [usize; 3], Option<(usize, usize)>);

/// A cascade stage as in Fig. 2: convolutions (each + PReLU), an optional dense layer (+ PReLU)
/// on the flattened map, and the output heads (face/non-face, box regression, landmarks),
/// with their widths.
struct NetSpec {
    name: &'static str,
    convs: &'static [ConvSpec],
    /// Dense layer: name, `[dout, din]`.
    dense: Option<(&'static str, [usize; 2])>,
    heads: &'static [(&'static str, usize)],
}

const PNET: NetSpec = NetSpec {
    name: "pnet",
    convs: &[
        ConvSpec("conv1", [10, 3, 3], Some((2, 2))),
        ConvSpec("conv2", [16, 10, 3], None),
        ConvSpec("conv3", [32, 16, 3], None),
    ],
    dense: None,
    // 1x1 convolutions
    heads: &[("conv4_1", 2), ("conv4_2", 4)],
};

const RNET: NetSpec = NetSpec {
    name: "rnet",
    convs: &[
        ConvSpec("conv1", [28, 3, 3], Some((3, 2))),
        ConvSpec("conv2", [48, 28, 3], Some((3, 2))),
        ConvSpec("conv3", [64, 48, 2], None),
    ],
    dense: Some(("dense4", [128, 576])),
    heads: &[("dense5_1", 2), ("dense5_2", 4)],
};

const ONET: NetSpec = NetSpec {
    name: "onet",
    convs: &[
        ConvSpec("conv1", [32, 3, 3], Some((3, 2))),
        ConvSpec("conv2", [64, 32, 3], Some((3, 2))),
        ConvSpec("conv3", [64, 64, 3], Some((2, 2))),
        ConvSpec("conv4", [128, 64, 2], None),
    ],
    dense: Some(("dense5", [256, 1152])),
    heads: &[("dense6_1", 2), ("dense6_2", 4), ("dense6_3", 10)],
};

/// A convolution, its PReLU slopes and the max pool `(kernel, stride)` after it.
#[derive(Clone, Debug)]
struct Layer {
    conv: Conv,
    alpha: Vec<f32>,
    pool: Option<(usize, usize)>,
}

impl Layer {
    /// PReLU and the pool on the convolution's output `x`, whichever the layout. A PReLU with
    /// slopes >= 0 is non-decreasing, so it commutes with max: then the pool runs first and the
    /// PReLU on the 4x smaller map (the same numbers either way).
    fn activate<T>(&self, mut x: T, prelu: impl Fn(&mut T, &[f32]), pool: impl Fn(&T, usize, usize) -> T) -> T {
        match self.pool {
            Some((k, s)) if self.alpha.iter().all(|a| *a >= 0.0) => {
                x = pool(&x, k, s);
                prelu(&mut x, &self.alpha);
            }
            Some((k, s)) => {
                prelu(&mut x, &self.alpha);
                x = pool(&x, k, s);
            }
            None => prelu(&mut x, &self.alpha),
        }
        x
    }
}

/// What follows the convolutions; every head's outputs side by side (`[face logits (2), box
/// regression (4), landmarks (10)]`).
#[derive(Clone, Debug)]
enum Head {
    /// P-Net: 1x1 convolutions over the map; `direct`: the trunk and these heads again as
    /// direct convolutions for row-planar maps (the pyramid's path).
    Conv { heads: Conv, direct: Vec<DirectConv> },
    /// R-/O-Net: a dense layer + PReLU on the flattened map, then dense heads.
    Dense { dense: Dense, alpha: Vec<f32>, heads: Dense },
}

/// A loaded cascade stage.
#[derive(Clone, Debug)]
struct Net {
    convs: Vec<Layer>,
    head: Head,
    outputs: usize,
}

/// Reads one net's tensors, checking each shape against the spec.
struct Reader<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
    net: &'static str,
}

impl Reader<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let key = format!("{}.{name}", self.net);
        let t = weights::tensor_f32(self.path, &self.st, &key)?;
        if t.shape != shape {
            return Err(Error::Shape { path: self.path.into(), key, expected: shape.to_vec(), found: t.shape });
        }
        if let Some(p) = weights::value_problem(&key, &t.data) {
            return Err(Error::WeightMismatch { path: self.path.into(), model: "mtcnn".into(), problems: vec![p] });
        }
        Ok(t.data)
    }
}

impl Net {
    fn load(r: &mut Reader<'_>, spec: &NetSpec) -> Result<Self> {
        r.net = spec.name;
        // P-Net (no dense layer) also gets its convolutions as direct ones, for planar maps
        let (mut convs, mut direct) = (Vec::new(), Vec::new());
        let mut prelu_i = 1;
        for ConvSpec(name, [cout, cin, k], pool) in spec.convs {
            let w = r.get(&format!("{name}.weight"), &[*cout, *cin, *k, *k])?;
            let b = r.get(&format!("{name}.bias"), &[*cout])?;
            if spec.dense.is_none() {
                direct.push(DirectConv::new(&w, [*cout, *cin, *k], b.clone()));
            }
            let conv = Conv::new(&w, [*cout, *cin, *k, *k], 1, [0, 0], &vec![1.0; *cout], b, false);
            let alpha = r.get(&format!("prelu{prelu_i}.weight"), &[*cout])?;
            prelu_i += 1;
            convs.push(Layer { conv, alpha, pool: *pool });
        }
        let last = spec.convs.last().map_or(3, |c| c.1[0]);
        let outputs: usize = spec.heads.iter().map(|h| h.1).sum();
        // the heads' weights stacked: `[outputs, feat]`
        let heads = |feat: usize, kernel: &[usize]| -> Result<(Vec<f32>, Vec<f32>)> {
            let (mut w, mut b) = (Vec::new(), Vec::new());
            for (name, n) in spec.heads {
                w.extend(r.get(&format!("{name}.weight"), &[&[*n, feat], kernel].concat())?);
                b.extend(r.get(&format!("{name}.bias"), &[*n])?);
            }
            Ok((w, b))
        };
        let head = match spec.dense {
            Some((name, [dout, din])) => {
                let w = r.get(&format!("{name}.weight"), &[dout, din])?;
                let b = r.get(&format!("{name}.bias"), &[dout])?;
                // facenet-pytorch flattens the map as (w, h, c); ours is (h, w, c)
                let side = ((din / last) as f64).sqrt() as usize;
                let mut wt = vec![0.0; din * dout];
                for y in 0..side {
                    for x in 0..side {
                        for c in 0..last {
                            let ours = (y * side + x) * last + c;
                            let theirs = (x * side + y) * last + c;
                            for o in 0..dout {
                                wt[ours * dout + o] = w[o * din + theirs];
                            }
                        }
                    }
                }
                let alpha = r.get(&format!("prelu{prelu_i}.weight"), &[dout])?;
                let (hw, hb) = heads(dout, &[])?;
                // [outputs, dout] -> [dout, outputs]
                let mut ht = vec![0.0; dout * outputs];
                for o in 0..outputs {
                    for i in 0..dout {
                        ht[i * outputs + o] = hw[o * dout + i];
                    }
                }
                Head::Dense { dense: Dense::new(&wt, din, dout, b), alpha, heads: Dense::new(&ht, dout, outputs, hb) }
            }
            None => {
                let (hw, hb) = heads(last, &[1, 1])?;
                direct.push(DirectConv::new(&hw, [outputs, last, 1], hb.clone()));
                let heads = Conv::new(&hw, [outputs, last, 1, 1], 1, [0, 0], &vec![1.0; outputs], hb, false);
                Head::Conv { heads, direct }
            }
        };
        Ok(Self { convs, head, outputs })
    }

    /// NHWC input (already normalised) to the heads' outputs: per position (P-Net) or per
    /// image (R-/O-Net), `outputs` values each, with the map's `(h, w)`.
    fn run(&self, x: Act) -> (Vec<f32>, usize, usize) {
        let mut x = x;
        for l in &self.convs {
            x = l.activate(l.conv.run(&x), |x, a| prelu(&mut x.data, a), max_pool_ceil);
        }
        match &self.head {
            Head::Conv { heads, .. } => {
                let y = heads.run(&x);
                (y.data, y.h, y.w)
            }
            Head::Dense { dense, alpha, heads } => {
                let mut f = dense.run(&x.data, x.n);
                prelu(&mut f, alpha);
                (heads.run(&f, x.n), 1, 1)
            }
        }
    }

    /// A fully convolutional net (P-Net) on a row-planar map: per position the heads'
    /// outputs (`outputs` values each) and the map size. Same numbers as `run` up to the order
    /// of the sums.
    fn run_planar(&self, mut x: Planar) -> (Vec<f32>, usize, usize) {
        let Head::Conv { direct, .. } = &self.head else {
            unreachable!("only P-Net runs on planar maps");
        };
        let (trunk, head) = direct.split_at(direct.len() - 1);
        for (conv, l) in trunk.iter().zip(&self.convs) {
            x = l.activate(conv.run(&x), direct::prelu, direct::max_pool_ceil);
        }
        let y = head[0].run(&x);
        let (c, h, w) = (y.c, y.h, y.w);
        let mut out = vec![0.0; h * w * c];
        for yy in 0..h {
            for ch in 0..c {
                for xx in 0..w {
                    out[(yy * w + xx) * c + ch] = y.data[(yy * c + ch) * w + xx];
                }
            }
        }
        (out, h, w)
    }
}

/// PReLU over the channels (the last axis).
fn prelu(x: &mut [f32], alpha: &[f32]) {
    let c = alpha.len();
    x.par_chunks_mut(c * 256).for_each(|chunk| {
        for px in chunk.chunks_mut(c) {
            for (v, a) in px.iter_mut().zip(alpha) {
                *v = if *v < 0.0 { *v * a } else { *v };
            }
        }
    });
}

/// `k x k` / `s` max pool, ceil mode (windows clipped at the border).
fn max_pool_ceil(x: &Act, k: usize, s: usize) -> Act {
    let (oh, ow) = (pool_out(x.h, k, s), pool_out(x.w, k, s));
    let mut y = Act::zeros(x.n, oh, ow, x.c);
    let c = x.c;
    y.data.par_chunks_mut(ow * c).enumerate().for_each(|(r, out)| {
        let (b, oy) = (r / oh, r % oh);
        out.fill(f32::NEG_INFINITY);
        for iy in oy * s..(oy * s + k).min(x.h) {
            let row = &x.data[(b * x.h + iy) * x.w * c..][..x.w * c];
            for (ox, o) in out.chunks_exact_mut(c).enumerate() {
                for ix in ox * s..(ox * s + k).min(x.w) {
                    o.iter_mut().zip(&row[ix * c..ix * c + c]).for_each(|(o, v)| *o = o.max(*v));
                }
            }
        }
    });
    y
}

/// An RGB image as f32 HWC, values 0..255.
pub struct Pixels<'a> {
    pub data: &'a [f32],
    pub h: usize,
    pub w: usize,
}

/// Averaging windows of adaptive pooling: output `i` averages inputs
/// `[floor(i * n / out), ceil((i + 1) * n / out))`.
fn windows(n: usize, out: usize) -> Vec<(usize, usize)> {
    (0..out).map(|i| (i * n / out, ((i + 1) * n).div_ceil(out))).collect()
}

/// Memory order of a resampled map.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// `[h][w][3]`.
    Hwc,
    /// `[h][3][w]` (row-planar).
    Planar,
}

/// PyTorch's `interpolate(mode="area")` (adaptive average pooling) of the window
/// `rows x cols` of `img` to `oh x ow`, optionally normalised as MTCNN wants
/// (`(v - 127.5) / 128`), written to `dst` (`oh * ow * 3`, in `layout` order). Separable:
/// sums down the columns, then along the row (PyTorch's windows, summed in another order).
pub fn area_resize(
    img: &Pixels<'_>,
    (y0, y1): (usize, usize),
    (x0, x1): (usize, usize),
    (oh, ow): (usize, usize),
    normalise: bool,
    layout: Layout,
    dst: &mut [f32],
) {
    let (ih, iw) = (y1 - y0, x1 - x0);
    let (wy, wx) = (windows(ih, oh), windows(iw, ow));
    let output_row = |(oy, dst_row): (usize, &mut [f32])| {
        // column sums over the row window (contiguous adds), then the column windows
        let (a, b) = wy[oy];
        let mut cols = vec![0.0f32; iw * 3];
        for r in a..b {
            let src = &img.data[((y0 + r) * img.w + x0) * 3..][..iw * 3];
            cols.iter_mut().zip(src).for_each(|(o, v)| *o += v);
        }
        for (ox, &(xa, xb)) in wx.iter().enumerate() {
            let mut sum = [0.0f32; 3];
            for p in cols[xa * 3..xb * 3].chunks_exact(3) {
                sum[0] += p[0];
                sum[1] += p[1];
                sum[2] += p[2];
            }
            for (ch, v) in sum.into_iter().enumerate() {
                let mut v = v / (b - a) as f32 / (xb - xa) as f32;
                if normalise {
                    v = (v - 127.5) * 0.0078125;
                }
                match layout {
                    Layout::Hwc => dst_row[ox * 3 + ch] = v,
                    Layout::Planar => dst_row[ch * ow + ox] = v,
                }
            }
        }
    };
    // small crops (R-/O-Net) are resized in parallel by the caller
    if ih * iw > 1 << 16 {
        dst.par_chunks_mut(ow * 3).enumerate().for_each(output_row);
    } else {
        dst.chunks_mut(ow * 3).enumerate().for_each(output_row);
    }
}

/// Detection settings, facenet-pytorch's defaults.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetectConfig {
    /// Smallest face searched for, in pixels.
    pub min_face_size: f32,
    /// Face probability thresholds of P-, R- and O-Net.
    pub thresholds: [f32; 3],
    /// Scale step of the image pyramid.
    pub factor: f32,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self { min_face_size: 20.0, thresholds: [0.6, 0.7, 0.7], factor: 0.709 }
    }
}

impl DetectConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.min_face_size.is_finite() && self.min_face_size >= 12.0) {
            return Err(Error::Invalid(format!("min face size {} must be at least 12 px", self.min_face_size)));
        }
        if !(self.factor.is_finite() && (0.1..=0.95).contains(&self.factor)) {
            return Err(Error::Invalid(format!("pyramid factor {} must lie in [0.1, 0.95]", self.factor)));
        }
        if self.thresholds.iter().any(|t| !(0.0..=1.0).contains(t)) {
            return Err(Error::Invalid(format!("thresholds {:?} must lie in [0, 1]", self.thresholds)));
        }
        Ok(())
    }
}

/// A detected face: box `[x1, y1, x2, y2]` in pixels, O-Net's face probability, and the five
/// landmarks (left eye, right eye, nose, left and right mouth corner) as `[x, y]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Face {
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    pub prob: f32,
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

/// A candidate box with its score and the regression to apply to it.
#[derive(Clone, Copy, Debug)]
struct Cand {
    b: [f32; 4],
    score: f32,
    reg: [f32; 4],
}

/// Greedy non-maximum suppression in decreasing score order, keeping a box unless it overlaps
/// a kept one by more than `thresh`. `min`: overlap = intersection / smaller area with
/// `+1` pixel extents (the original MTCNN's "Min"); otherwise torchvision's IoU.
fn nms(c: &[Cand], thresh: f32, min: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| c[b].score.total_cmp(&c[a].score));
    let one = if min { 1.0 } else { 0.0 };
    let area = |b: &[f32; 4]| (b[2] - b[0] + one) * (b[3] - b[1] + one);
    let mut keep: Vec<usize> = Vec::new();
    let mut dead = vec![false; c.len()];
    for (i, &a) in order.iter().enumerate() {
        if dead[a] {
            continue;
        }
        keep.push(a);
        let ba = &c[a].b;
        for &o in &order[i + 1..] {
            if dead[o] {
                continue;
            }
            let bo = &c[o].b;
            let w = (ba[2].min(bo[2]) - ba[0].max(bo[0]) + one).max(0.0);
            let h = (ba[3].min(bo[3]) - ba[1].max(bo[1]) + one).max(0.0);
            let inter = w * h;
            let ov = if min { inter / area(ba).min(area(bo)) } else { inter / (area(ba) + area(bo) - inter) };
            if ov > thresh {
                dead[o] = true;
            }
        }
    }
    keep
}

/// Make boxes square around their centre (the longer side).
fn rerec(b: &mut [f32; 4]) {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let l = w.max(h);
    b[0] += w * 0.5 - l * 0.5;
    b[1] += h * 0.5 - l * 0.5;
    b[2] = b[0] + l;
    b[3] = b[1] + l;
}

/// Apply a stage's box regression (offsets relative to the `+1` extents).
fn bbreg(b: &mut [f32; 4], r: &[f32]) {
    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
    b[0] += r[0] * w;
    b[1] += r[1] * h;
    b[2] += r[2] * w;
    b[3] += r[3] * h;
}

/// The pixel window a box reads: rows `y0..y1`, columns `x0..x1` (the box truncated and
/// clipped to the image); `None` when nothing of it lies in the image.
fn window(b: &[f32; 4], w: usize, h: usize) -> Option<((usize, usize), (usize, usize))> {
    let t = |v: f32| v.trunc().clamp(-1e9, 1e9) as i64;
    let (x, y) = (t(b[0]).max(1), t(b[1]).max(1));
    let (ex, ey) = (t(b[2]).min(w as i64), t(b[3]).min(h as i64));
    if ey > y - 1 && ex > x - 1 {
        Some((((y - 1) as usize, ey as usize), ((x - 1) as usize, ex as usize)))
    } else {
        None
    }
}

/// Face probability from two logits (softmax, class 1).
fn face_prob(l: &[f32]) -> f32 {
    let m = l[0].max(l[1]);
    let (e0, e1) = ((l[0] - m).exp(), (l[1] - m).exp());
    e1 / (e0 + e1)
}

/// The three networks.
#[derive(Clone, Debug)]
pub struct Mtcnn {
    pnet: Net,
    rnet: Net,
    onet: Net,
    pub config: DetectConfig,
}

impl Mtcnn {
    /// The shipped weights (facenet-pytorch's trained MTCNN).
    pub fn new(config: DetectConfig) -> Result<Self> {
        Self::from_bytes(WEIGHTS, Path::new(WEIGHTS_NAME), config)
    }

    /// Weights from a safetensors file with keys `pnet.*`, `rnet.*`, `onet.*`
    /// (scripts/convert_mtcnn.py).
    pub fn from_file(path: &Path, config: DetectConfig) -> Result<Self> {
        let bytes = weights::read_file(path)?;
        Self::from_bytes(&bytes, path, config)
    }

    fn from_bytes(bytes: &[u8], path: &Path, config: DetectConfig) -> Result<Self> {
        config.validate()?;
        let mut r = Reader { path, st: weights::parse(path, bytes)?, net: "" };
        let (pnet, rnet, onet) = (Net::load(&mut r, &PNET)?, Net::load(&mut r, &RNET)?, Net::load(&mut r, &ONET)?);
        Ok(Self { pnet, rnet, onet, config })
    }

    /// P-Net on `x` (row-planar, normalised): per position `[reg (4), prob]` and the map size.
    /// Large levels run in horizontal bands of output rows (in parallel), so that the four
    /// layers of a band stay in cache; each output is computed exactly as on the whole map.
    fn pnet_map(&self, x: &Planar) -> (Vec<[f32; 5]>, usize, usize) {
        // P-Net: output row j reads input rows 2j .. 2j + 11 (12 x 12 receptive field, stride 2)
        const BAND: usize = 24;
        let mh = pool_out(x.h - 2, 2, 2) - 4;
        let row = x.c * x.w;
        let band = |j0: usize| {
            let j1 = (j0 + BAND).min(mh);
            // the last band runs to the image's end, so ceil-mode pooling sees what it saw whole
            let r1 = if j1 == mh { x.h } else { 2 * (j1 - 1) + 12 };
            let sub = Planar { c: x.c, h: r1 - 2 * j0, w: x.w, data: x.data[2 * j0 * row..r1 * row].to_vec() };
            let (y, h, w) = self.pnet.run_planar(sub);
            debug_assert_eq!(h, j1 - j0);
            (y, w)
        };
        let parts: Vec<(Vec<f32>, usize)> = if mh <= BAND {
            vec![band(0)]
        } else {
            (0..mh).step_by(BAND).collect::<Vec<_>>().into_par_iter().map(band).collect()
        };
        let mw = parts[0].1;
        let out = parts
            .iter()
            .flat_map(|(y, _)| y.chunks_exact(self.pnet.outputs))
            .map(|o| [o[2], o[3], o[4], o[5], face_prob(&o[..2])])
            .collect();
        (out, mh, mw)
    }

    /// The image pyramid's scales (facenet-pytorch: from `12 / min_face_size` down by `factor`
    /// while the shorter side stays at least 12 px).
    fn scales(&self, h: usize, w: usize) -> Vec<f64> {
        let m = 12.0 / self.config.min_face_size as f64;
        let mut minl = h.min(w) as f64 * m;
        let (mut s, mut out) = (m, Vec::new());
        while minl >= 12.0 {
            out.push(s);
            s *= self.config.factor as f64;
            minl *= self.config.factor as f64;
        }
        out
    }

    /// Stage 1: P-Net candidates over the pyramid, NMS per scale (IoU 0.5) and across scales
    /// (0.7), regressed and squared.
    fn stage1(&self, img: &Pixels<'_>) -> Vec<Cand> {
        let mut all = Vec::new();
        for scale in self.scales(img.h, img.w) {
            let (hs, ws) = ((img.h as f64 * scale + 1.0) as usize, (img.w as f64 * scale + 1.0) as usize);
            let mut x = Planar { c: 3, h: hs, w: ws, data: vec![0.0; hs * ws * 3] };
            area_resize(img, (0, img.h), (0, img.w), (hs, ws), true, Layout::Planar, &mut x.data);
            let (map, mh, mw) = self.pnet_map(&x);
            let s = scale as f32;
            let mut cands = Vec::new();
            for yy in 0..mh {
                for xx in 0..mw {
                    let o = &map[yy * mw + xx];
                    if o[4] >= self.config.thresholds[0] {
                        let (bx, by) = (xx as f32, yy as f32);
                        let b = [
                            ((2.0 * bx + 1.0) / s).floor(),
                            ((2.0 * by + 1.0) / s).floor(),
                            ((2.0 * bx + 12.0) / s).floor(),
                            ((2.0 * by + 12.0) / s).floor(),
                        ];
                        cands.push(Cand { b, score: o[4], reg: [o[0], o[1], o[2], o[3]] });
                    }
                }
            }
            all.extend(nms(&cands, 0.5, false).into_iter().map(|i| cands[i]));
        }
        nms(&all, 0.7, false)
            .into_iter()
            .map(|i| {
                let c = all[i];
                let (rw, rh) = (c.b[2] - c.b[0], c.b[3] - c.b[1]);
                let mut b =
                    [c.b[0] + c.reg[0] * rw, c.b[1] + c.reg[1] * rh, c.b[2] + c.reg[2] * rw, c.b[3] + c.reg[3] * rh];
                rerec(&mut b);
                Cand { b, score: c.score, reg: [0.0; 4] }
            })
            .collect()
    }

    /// Crop each box's window, area-resampled to `size`, run `net` on them as one batch: the
    /// boxes with their output rows (boxes whose window is empty are dropped).
    fn refine(img: &Pixels<'_>, boxes: Vec<Cand>, size: usize, net: &Net) -> (Vec<Cand>, Vec<f32>, usize) {
        let kept: Vec<(Cand, _)> =
            boxes.into_iter().filter_map(|c| window(&c.b, img.w, img.h).map(|win| (c, win))).collect();
        if kept.is_empty() {
            return (Vec::new(), Vec::new(), net.outputs);
        }
        let mut x = Act::zeros(kept.len(), size, size, 3);
        x.data.par_chunks_mut(size * size * 3).zip(&kept).for_each(|(dst, (_, (ys, xs)))| {
            area_resize(img, *ys, *xs, (size, size), true, Layout::Hwc, dst);
        });
        let (out, _, _) = net.run(x);
        (kept.into_iter().map(|(c, _)| c).collect(), out, net.outputs)
    }

    /// Every face in an RGB image (HWC f32, 0..255), largest first.
    pub fn detect_pixels(&self, img: &Pixels<'_>) -> Vec<Face> {
        if img.h < 12 || img.w < 12 {
            return Vec::new();
        }
        // Run the stages on a pool worker (GEMM tasks are then queued locally).
        let mut faces = rayon::scope(|_| self.cascade(img));
        faces.sort_by(|a, b| b.area().total_cmp(&a.area()));
        faces
    }

    fn cascade(&self, img: &Pixels<'_>) -> Vec<Face> {
        let boxes = self.stage1(img);
        if boxes.is_empty() {
            return Vec::new();
        }
        // Stage 2: R-Net on 24 px crops.
        let (boxes, out, k) = Self::refine(img, boxes, 24, &self.rnet);
        let pass: Vec<Cand> = boxes
            .iter()
            .zip(out.chunks_exact(k))
            .filter_map(|(c, o)| {
                let p = face_prob(&o[..2]);
                (p > self.config.thresholds[1]).then(|| Cand { b: c.b, score: p, reg: [o[2], o[3], o[4], o[5]] })
            })
            .collect();
        let boxes: Vec<Cand> = nms(&pass, 0.7, false)
            .into_iter()
            .map(|i| {
                let mut c = pass[i];
                bbreg(&mut c.b, &c.reg);
                rerec(&mut c.b);
                c
            })
            .collect();
        // Stage 3: O-Net on 48 px crops, landmarks.
        let (boxes, out, k) = Self::refine(img, boxes, 48, &self.onet);
        let mut faces = Vec::new();
        let mut cands = Vec::new();
        for (c, o) in boxes.iter().zip(out.chunks_exact(k)) {
            let p = face_prob(&o[..2]);
            if p <= self.config.thresholds[2] {
                continue;
            }
            let (w, h) = (c.b[2] - c.b[0] + 1.0, c.b[3] - c.b[1] + 1.0);
            let lm = &o[6..16];
            let landmarks: [[f32; 2]; 5] =
                std::array::from_fn(|i| [w * lm[i] + c.b[0] - 1.0, h * lm[5 + i] + c.b[1] - 1.0]);
            let mut b = c.b;
            bbreg(&mut b, &o[2..6]);
            cands.push(Cand { b, score: p, reg: [0.0; 4] });
            faces.push(Face { bbox: b, prob: p, landmarks });
        }
        nms(&cands, 0.7, true).into_iter().map(|i| faces[i].clone()).collect()
    }

    /// Every face in a decoded image, largest first.
    pub fn detect(&self, img: &image::RgbImage) -> Vec<Face> {
        let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
        self.detect_pixels(&Pixels { data: &data, h: img.height() as usize, w: img.width() as usize })
    }
}

/// Test hooks: the nets on their own (parity against facenet-pytorch's modules).
#[doc(hidden)]
pub mod raw {
    use super::*;

    /// `which` = pnet / pnet-planar (the pyramid's path) / rnet / onet on an NCHW input; outputs as the PyTorch module gives
    /// them, flattened: P-Net `(reg [n,4,h,w], prob [n,2,h,w])`, R-Net `(reg, prob)`, O-Net
    /// `(reg, landmarks, prob)` (rows of 4, 10, 2).
    pub fn run(m: &Mtcnn, which: &str, x: &[f32], shape: [usize; 4]) -> Vec<Vec<f32>> {
        let net = match which {
            "pnet" | "pnet-planar" => &m.pnet,
            "rnet" => &m.rnet,
            _ => &m.onet,
        };
        let (y, h, w) = if which == "pnet-planar" {
            let [n, c, h, w] = shape;
            assert_eq!(n, 1, "planar P-Net runs one map");
            let mut d = vec![0.0; c * h * w];
            for ch in 0..c {
                for yy in 0..h {
                    d[(yy * c + ch) * w..][..w].copy_from_slice(&x[(ch * h + yy) * w..][..w]);
                }
            }
            m.pnet.run_planar(Planar { c, h, w, data: d })
        } else {
            net.run(Act::from_nchw(x, shape))
        };
        let k = net.outputs;
        let n = shape[0];
        let probs = |o: &[f32]| {
            let p = face_prob(&o[..2]);
            [1.0 - p, p]
        };
        if which.starts_with("pnet") {
            let (mut reg, mut prob) = (vec![0.0; n * 4 * h * w], vec![0.0; n * 2 * h * w]);
            for (i, o) in y.chunks_exact(k).enumerate() {
                let (b, p) = (i / (h * w), i % (h * w));
                for c in 0..4 {
                    reg[(b * 4 + c) * h * w + p] = o[2 + c];
                }
                for (c, v) in probs(o).into_iter().enumerate() {
                    prob[(b * 2 + c) * h * w + p] = v;
                }
            }
            return vec![reg, prob];
        }
        let rows = y.chunks_exact(k);
        let reg: Vec<f32> = rows.clone().flat_map(|o| o[2..6].to_vec()).collect();
        let prob: Vec<f32> = rows.clone().flat_map(probs).collect();
        if which == "rnet" { vec![reg, prob] } else { vec![reg, rows.flat_map(|o| o[6..16].to_vec()).collect(), prob] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bands give exactly the whole map's numbers, for even and odd map heights (ceil-mode
    /// pooling at the bottom) and heights that are not a multiple of the band.
    #[test]
    fn banded_pnet_equals_whole_map() {
        let m = Mtcnn::new(DetectConfig::default()).unwrap();
        for h in [60, 101, 130, 131] {
            let w = 37;
            let data: Vec<f32> = (0..h * 3 * w).map(|i| ((i * 7919 % 251) as f32 / 125.0) - 1.0).collect();
            let x = Planar { c: 3, h, w, data };
            let (banded, mh, mw) = m.pnet_map(&x);
            let (whole, wh, ww) = m.pnet.run_planar(x.clone());
            assert_eq!((mh, mw), (wh, ww));
            for (b, o) in banded.iter().zip(whole.chunks_exact(m.pnet.outputs)) {
                assert_eq!(b[..4], o[2..6]);
                assert_eq!(b[4], face_prob(&o[..2]));
            }
        }
    }
}
