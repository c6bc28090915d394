//! Frozen CPU inference engine for the trained networks (the `fast` engine).
//!
//! Built from a loaded burn `Model` (consumed block by block, so weights are held once):
//! activations are NHWC f32; BatchNorm is folded into the convolution weights and bias; every
//! convolution is one GEMM (`crate::sgemm`, weights packed at load) over the input itself,
//! im2col done while packing; bias + ReLU run as each tile is stored; concatenations cost nothing because
//! each branch writes its own channel slice of the block output (GEMM row stride = total
//! channels); the residual `x + scale * up(cat)` is the GEMM's accumulate (`dst = x + scale*AB`),
//! in place in the block input's buffer.
//! Parity with the burn path (and so with timm / facenet) is tested like the burn path.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear, PaddingConfig2d};
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::layers::{BN_EPS, ConvBnAct, FourBranch, Layer};
use crate::models::inception_resnet::{InceptionResnet, IrLayout, ReductionB as IrReductionB, ResBlock};
use crate::models::inception_v4::{InceptionV4, Mixed3a, Mixed4a, Mixed5a, ReductionA, ReductionB, V4Block};
use crate::models::{Model, ModelKind};
use crate::sgemm::{self, PackedB, Rows};

/// An NHWC activation.
#[derive(Clone, Debug)]
pub struct Act {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Act {
    pub fn zeros(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self { n, h, w, c, data: vec![0.0; n * h * w * c] }
    }

    pub fn from_nchw(data: &[f32], [n, c, h, w]: [usize; 4]) -> Self {
        let mut a = Self::zeros(n, h, w, c);
        a.data.par_chunks_mut(h * w * c).enumerate().for_each(|(b, out)| {
            for ch in 0..c {
                let src = &data[(b * c + ch) * h * w..][..h * w];
                for (p, v) in src.iter().enumerate() {
                    out[p * c + ch] = *v;
                }
            }
        });
        a
    }

    pub fn to_nchw(&self) -> Vec<f32> {
        let (h, w, c) = (self.h, self.w, self.c);
        let mut out = vec![0.0; self.data.len()];
        out.par_chunks_mut(h * w * c).enumerate().for_each(|(b, o)| {
            let src = &self.data[b * h * w * c..][..h * w * c];
            for p in 0..h * w {
                for ch in 0..c {
                    o[ch * h * w + p] = src[p * c + ch];
                }
            }
        });
        out
    }

    pub fn shape_nchw(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
}

fn param<const D: usize>(p: &Param<Tensor<D>>) -> Vec<f32> {
    values(p.val())
}

/// Per-channel `(scale, shift)` of an eval BatchNorm.
fn bn_affine(bn: &BatchNorm) -> (Vec<f32>, Vec<f32>) {
    let (g, b) = (param(&bn.gamma), param(&bn.beta));
    let (m, v) = (values(bn.running_mean.value()), values(bn.running_var.value()));
    let scale: Vec<f32> = g.iter().zip(&v).map(|(g, v)| g / (v + BN_EPS as f32).sqrt()).collect();
    let shift = b.iter().zip(&m).zip(&scale).map(|((b, m), s)| b - m * s).collect();
    (scale, shift)
}

/// What happens to a GEMM result.
#[derive(Clone, Copy)]
enum Epilogue {
    /// `dst = AB + bias`, then ReLU if asked.
    Store { relu: bool },
    /// `dst = dst + scale * (AB + bias)`, then ReLU if asked (the residual sum).
    Residual { scale: f32, relu: bool },
}

/// A convolution with folded BatchNorm: weights `[kh * kw * cin, cout]` (packed), im2col order
/// `(ky, kx, ci)`.
#[derive(Clone, Debug)]
pub struct Conv {
    cin: usize,
    cout: usize,
    k: [usize; 2],
    stride: usize,
    pad: [usize; 2],
    w: PackedB,
    b: Vec<f32>,
    relu: bool,
}

impl Conv {
    fn new(conv: Conv2d, scale: Option<(Vec<f32>, Vec<f32>)>, relu: bool) -> Self {
        let [cout, cin, kh, kw] = conv.weight.dims();
        let pad = match conv.padding {
            PaddingConfig2d::Explicit(t, l, _, _) => [t, l],
            _ => [0, 0],
        };
        let raw = param(&conv.weight);
        let (s, shift) = match scale {
            Some(sb) => sb,
            None => (vec![1.0; cout], conv.bias.as_ref().map(param).unwrap_or_else(|| vec![0.0; cout])),
        };
        let k = kh * kw * cin;
        let mut w = vec![0.0; k * cout];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        w[((ky * kw + kx) * cin + ci) * cout + co] = raw[((co * cin + ci) * kh + ky) * kw + kx] * s[co];
                    }
                }
            }
        }
        Self { cin, cout, k: [kh, kw], stride: conv.stride[0], pad, w: PackedB::new(&w, k, cout), b: shift, relu }
    }

    fn from_cba(c: ConvBnAct) -> Self {
        let affine = bn_affine(&c.bn);
        Self::new(c.conv, Some(affine), c.act)
    }

    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        ((h + 2 * self.pad[0] - self.k[0]) / self.stride + 1, (w + 2 * self.pad[1] - self.k[1]) / self.stride + 1)
    }

    fn is_pointwise(&self) -> bool {
        self.k == [1, 1] && self.stride == 1
    }

    /// Run on `x`, writing channels `[off, off + cout)` of `dst` (row stride `ld`).
    fn run_into(&self, x: &Act, dst: &mut [f32], ld: usize, off: usize, epi: Epilogue) {
        let (oh, ow) = self.out_hw(x.h, x.w);
        let rows = if self.is_pointwise() {
            Rows::Dense { data: &x.data, ld: x.c }
        } else {
            Rows::Conv {
                data: &x.data,
                ld: x.c,
                c0: 0,
                cin: self.cin,
                hw: [x.h, x.w],
                k: self.k,
                stride: self.stride,
                pad: self.pad,
                out: [oh, ow],
            }
        };
        let epi = match epi {
            Epilogue::Store { relu } => sgemm::Epilogue { bias: Some(&self.b), alpha: 1.0, load: false, relu },
            Epilogue::Residual { scale, relu } => {
                sgemm::Epilogue { bias: Some(&self.b), alpha: scale, load: true, relu }
            }
        };
        sgemm::gemm(x.n * oh * ow, rows, &self.w, dst, ld, off, epi);
    }

    fn run(&self, x: &Act) -> Act {
        let (oh, ow) = self.out_hw(x.h, x.w);
        let mut y = Act::zeros(x.n, oh, ow, self.cout);
        self.run_into(x, &mut y.data, self.cout, 0, Epilogue::Store { relu: self.relu });
        y
    }
}

/// 3x3 / 2 max pool (VALID) into channels `[off, off + c)` of `dst`.
fn max_pool_into(x: &Act, dst: &mut [f32], ld: usize, off: usize) {
    let (oh, ow) = ((x.h - 3) / 2 + 1, (x.w - 3) / 2 + 1);
    let c = x.c;
    dst[..x.n * oh * ow * ld].par_chunks_mut(ld).enumerate().for_each(|(r, row)| {
        let (b, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
        let out = &mut row[off..off + c];
        out.fill(f32::NEG_INFINITY);
        for dy in 0..3 {
            for dx in 0..3 {
                let src = ((b * x.h + oy * 2 + dy) * x.w + ox * 2 + dx) * c;
                for (o, v) in out.iter_mut().zip(&x.data[src..src + c]) {
                    *o = o.max(*v);
                }
            }
        }
    });
}

/// 3x3 / 1 average pool, padding 1, padding excluded from the mean.
fn avg_pool(x: &Act) -> Act {
    let mut y = Act::zeros(x.n, x.h, x.w, x.c);
    let (h, w, c) = (x.h, x.w, x.c);
    y.data.par_chunks_mut(c).enumerate().for_each(|(r, out)| {
        let (b, oy, ox) = (r / (h * w), (r / w) % h, r % w);
        let (y0, y1, x0, x1) = (oy.saturating_sub(1), (oy + 1).min(h - 1), ox.saturating_sub(1), (ox + 1).min(w - 1));
        for iy in y0..=y1 {
            for ix in x0..=x1 {
                let src = ((b * h + iy) * w + ix) * c;
                for (o, v) in out.iter_mut().zip(&x.data[src..src + c]) {
                    *o += v;
                }
            }
        }
        let inv = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1)) as f32;
        out.iter_mut().for_each(|o| *o *= inv);
    });
    y
}

#[derive(Clone, Debug)]
enum Op {
    Conv(Conv),
    MaxPool,
    AvgPool,
}

impl Op {
    fn out_shape(&self, h: usize, w: usize, c: usize) -> (usize, usize, usize) {
        match self {
            Op::Conv(k) => {
                let (oh, ow) = k.out_hw(h, w);
                (oh, ow, k.cout)
            }
            Op::MaxPool => ((h - 3) / 2 + 1, (w - 3) / 2 + 1, c),
            Op::AvgPool => (h, w, c),
        }
    }
}

/// A chain of ops; its output is the last op's, or (InceptionC) the concatenation of `heads`
/// applied to the chain's output.
#[derive(Clone, Debug, Default)]
struct Branch {
    ops: Vec<Op>,
    heads: Vec<Conv>,
}

impl Branch {
    fn convs(convs: Vec<ConvBnAct>) -> Self {
        Self { ops: convs.into_iter().map(|c| Op::Conv(Conv::from_cba(c))).collect(), heads: vec![] }
    }
    fn conv(c: ConvBnAct) -> Self {
        Self::convs(vec![c])
    }
    fn max_pool() -> Self {
        Self { ops: vec![Op::MaxPool], heads: vec![] }
    }
    fn layers(layers: Vec<Layer>) -> Self {
        let ops = layers
            .into_iter()
            .map(|l| match l {
                Layer::Conv(c) => Op::Conv(Conv::from_cba(c)),
                Layer::MaxPool(_) => Op::MaxPool,
                Layer::AvgPool(_) => Op::AvgPool,
            })
            .collect();
        Self { ops, heads: vec![] }
    }

    fn out_shape(&self, h: usize, w: usize, c: usize) -> (usize, usize, usize) {
        let (h, w, c) = self.ops.iter().fold((h, w, c), |(h, w, c), op| op.out_shape(h, w, c));
        if self.heads.is_empty() { (h, w, c) } else { (h, w, self.heads.iter().map(|k| k.cout).sum()) }
    }

    fn run_into(&self, x: &Act, dst: &mut [f32], ld: usize, off: usize) {
        let last = if self.heads.is_empty() { self.ops.len() - 1 } else { self.ops.len() };
        let mut tmp: Option<Act> = None;
        for op in &self.ops[..last] {
            let input = tmp.as_ref().unwrap_or(x);
            tmp = Some(match op {
                Op::Conv(k) => k.run(input),
                Op::AvgPool => avg_pool(input),
                Op::MaxPool => {
                    let (oh, ow, c) = op.out_shape(input.h, input.w, input.c);
                    let mut y = Act::zeros(input.n, oh, ow, c);
                    max_pool_into(input, &mut y.data, c, 0);
                    y
                }
            });
        }
        let input = tmp.as_ref().unwrap_or(x);
        if self.heads.is_empty() {
            match &self.ops[last] {
                Op::Conv(k) => k.run_into(input, dst, ld, off, Epilogue::Store { relu: k.relu }),
                Op::MaxPool => max_pool_into(input, dst, ld, off),
                Op::AvgPool => unreachable!("no branch ends in an average pool"),
            }
        } else {
            let mut o = off;
            for k in &self.heads {
                k.run_into(input, dst, ld, o, Epilogue::Store { relu: k.relu });
                o += k.cout;
            }
        }
    }
}

/// The merged leading 1x1 convolution and each branch's `(offset, channels)` in its output.
type MergedHead = (Conv, Vec<Option<(usize, usize)>>);

/// Parallel branches concatenated along channels, optionally wrapped in a scaled residual.
/// The branches' leading 1x1 convolutions on the block input run as one wider GEMM (`head`),
/// whose channel slices then feed the rest of each branch.
#[derive(Clone, Debug)]
struct Block {
    branches: Vec<Branch>,
    /// Merged leading 1x1 convolutions and, per branch, its `(offset, channels)` in their output.
    head: Option<MergedHead>,
    /// Up-projection, scale, ReLU, and whether there is a shortcut (`false`: plain block).
    residual: Option<(Conv, f32, bool, bool)>,
}

/// Take the leading pointwise convolutions of the branches (when two or more share the
/// input and the activation) and merge them into one `[cin, sum of couts]` convolution.
fn merge_heads(branches: &mut [Branch]) -> Option<MergedHead> {
    let lead = |b: &Branch| match b.ops.first() {
        Some(Op::Conv(k)) if k.is_pointwise() && k.pad == [0, 0] && k.relu => Some(k.clone()),
        _ => None,
    };
    if branches.iter().filter_map(lead).count() < 2 {
        return None;
    }
    let convs: Vec<Option<Conv>> = branches.iter().map(lead).collect();
    let cin = convs.iter().flatten().map(|k| k.cin).next()?;
    let total: usize = convs.iter().flatten().map(|k| k.cout).sum();
    let mut w = vec![0.0f32; cin * total];
    let mut b = Vec::with_capacity(total);
    let mut slots = Vec::new();
    let mut off = 0;
    for (branch, conv) in branches.iter_mut().zip(&convs) {
        match conv {
            Some(k) => {
                let kw = k.w.unpack();
                for r in 0..cin {
                    w[r * total + off..r * total + off + k.cout].copy_from_slice(&kw[r * k.cout..(r + 1) * k.cout]);
                }
                b.extend_from_slice(&k.b);
                slots.push(Some((off, k.cout)));
                off += k.cout;
                branch.ops.remove(0);
            }
            None => slots.push(None),
        }
    }
    let merged =
        Conv { cin, cout: total, k: [1, 1], stride: 1, pad: [0, 0], w: PackedB::new(&w, cin, total), b, relu: true };
    Some((merged, slots))
}

/// Channels `[off, off + c)` of `a` as a contiguous activation.
fn channels(a: &Act, off: usize, c: usize) -> Act {
    let mut y = Act::zeros(a.n, a.h, a.w, c);
    y.data.par_chunks_mut(c).zip(a.data.par_chunks(a.c)).for_each(|(d, s)| d.copy_from_slice(&s[off..off + c]));
    y
}

impl Block {
    fn plain(branches: Vec<Branch>) -> Self {
        Self::new(branches, None)
    }

    fn new(mut branches: Vec<Branch>, residual: Option<(Conv, f32, bool, bool)>) -> Self {
        let head = merge_heads(&mut branches);
        Self { branches, head, residual }
    }

    fn run(&self, x: Act) -> Act {
        let h = self.head.as_ref().map(|(k, _)| k.run(&x));
        let inputs: Vec<Option<Act>> = match (&self.head, &h) {
            (Some((_, slots)), Some(h)) => slots.iter().map(|s| s.map(|(o, c)| channels(h, o, c))).collect(),
            _ => vec![None; self.branches.len()],
        };
        let shapes: Vec<_> = self
            .branches
            .iter()
            .zip(&inputs)
            .map(|(b, i)| {
                let src = i.as_ref().unwrap_or(&x);
                b.out_shape(src.h, src.w, src.c)
            })
            .collect();
        let (oh, ow) = (shapes[0].0, shapes[0].1);
        let ctot: usize = shapes.iter().map(|s| s.2).sum();
        let mut out = Act::zeros(x.n, oh, ow, ctot);
        let mut off = 0;
        for ((b, s), input) in self.branches.iter().zip(&shapes).zip(&inputs) {
            match input {
                // a branch that was only its 1x1: copy the slice into place
                Some(i) if b.ops.is_empty() && b.heads.is_empty() => {
                    let c = s.2;
                    out.data.par_chunks_mut(ctot).zip(i.data.par_chunks(c)).for_each(|(d, src)| {
                        d[off..off + c].copy_from_slice(src);
                    });
                }
                Some(i) => b.run_into(i, &mut out.data, ctot, off),
                None => b.run_into(&x, &mut out.data, ctot, off),
            }
            off += s.2;
        }
        match &self.residual {
            None => out,
            Some((up, _, relu, false)) => {
                let mut y = Act::zeros(out.n, out.h, out.w, up.cout);
                up.run_into(&out, &mut y.data, up.cout, 0, Epilogue::Store { relu: *relu });
                y
            }
            Some((up, scale, relu, true)) => {
                let mut x = x;
                let c = x.c;
                up.run_into(&out, &mut x.data, c, 0, Epilogue::Residual { scale: *scale, relu: *relu });
                x
            }
        }
    }
}

/// A dense layer `y = x W + b`, `W` as `[din, dout]` (packed).
#[derive(Clone, Debug)]
struct Dense {
    w: PackedB,
    b: Vec<f32>,
}

impl Dense {
    /// From a burn linear (weights `[in, out]`), with an optional BatchNorm1d folded in.
    fn new(l: Linear, bn: Option<BatchNorm>) -> Self {
        let [din, dout] = l.weight.dims();
        let mut w = param(&l.weight);
        let mut b = l.bias.as_ref().map(param).unwrap_or_else(|| vec![0.0; dout]);
        if let Some(bn) = bn {
            let (s, shift) = bn_affine(&bn);
            for row in w.chunks_mut(dout) {
                row.iter_mut().zip(&s).for_each(|(v, s)| *v *= s);
            }
            b = b.iter().zip(&s).zip(&shift).map(|((b, s), t)| b * s + t).collect();
        }
        Self { w: PackedB::new(&w, din, dout), b }
    }

    fn dout(&self) -> usize {
        self.w.n()
    }

    fn run(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * self.dout()];
        let epi = sgemm::Epilogue { bias: Some(&self.b), alpha: 1.0, load: false, relu: false };
        sgemm::gemm(n, Rows::Dense { data: x, ld: self.w.k() }, &self.w, &mut y, self.dout(), 0, epi);
        y
    }
}

/// A whole network, frozen for inference.
#[derive(Clone, Debug)]
pub struct Engine {
    kind: ModelKind,
    width: f64,
    blocks: Vec<Block>,
    /// Index of the block after which each `feature_info` stage ends.
    stage_ends: Vec<usize>,
    /// facenet's `last_linear` + `last_bn`, folded.
    bottleneck: Option<Dense>,
    classifier: Option<Dense>,
}

fn v4_block(b: V4Block) -> Block {
    let (convs, pool) = (Branch::convs, Branch::max_pool);
    let branches = match b {
        V4Block::Conv(c) => vec![Branch::conv(c)],
        V4Block::Mixed3a(Mixed3a { conv, .. }) => vec![pool(), Branch::conv(conv)],
        V4Block::Mixed4a(Mixed4a { branch0, branch1 }) => vec![convs(branch0), convs(branch1)],
        V4Block::Mixed5a(Mixed5a { conv, .. }) => vec![Branch::conv(conv), pool()],
        V4Block::InceptionA(b) | V4Block::InceptionB(b) => four_branch(b),
        V4Block::ReductionA(r) => reduction_a(r),
        V4Block::ReductionB(ReductionB { branch0, branch1, .. }) => vec![convs(branch0), convs(branch1), pool()],
        V4Block::InceptionC(c) => {
            let head = |a: ConvBnAct, b: ConvBnAct| vec![Conv::from_cba(a), Conv::from_cba(b)];
            let ops = |cs: Vec<ConvBnAct>| cs.into_iter().map(|c| Op::Conv(Conv::from_cba(c))).collect();
            vec![
                Branch::conv(c.branch0),
                Branch { ops: ops(vec![c.branch1_0]), heads: head(c.branch1_1a, c.branch1_1b) },
                Branch {
                    ops: ops(vec![c.branch2_0, c.branch2_1, c.branch2_2]),
                    heads: head(c.branch2_3a, c.branch2_3b),
                },
                Branch::layers(c.branch3),
            ]
        }
    };
    Block::plain(branches)
}

fn four_branch(FourBranch { branch0, branch1, branch2, branch3 }: FourBranch) -> Vec<Branch> {
    vec![Branch::conv(branch0), Branch::convs(branch1), Branch::convs(branch2), Branch::layers(branch3)]
}

fn reduction_a(r: ReductionA) -> Vec<Branch> {
    vec![Branch::conv(r.branch0), Branch::convs(r.branch1), Branch::max_pool()]
}

fn res_block(r: ResBlock) -> Block {
    let mut branches = vec![Branch::conv(r.branch0), Branch::convs(r.branch1)];
    if !r.branch2.is_empty() {
        branches.push(Branch::convs(r.branch2));
    }
    Block::new(branches, Some((Conv::new(r.conv2d, None, false), r.scale as f32, r.act, r.shortcut)))
}

impl Engine {
    /// Freeze a loaded model (eval BatchNorm statistics). The model is consumed.
    pub fn from_model(model: Model) -> Self {
        let kind = model.kind();
        match model {
            Model::V4(InceptionV4 { features, last_linear }) => Engine {
                kind,
                width: 1.0,
                blocks: features.into_iter().map(v4_block).collect(),
                stage_ends: vec![2, 3, 9, 17, 21],
                bottleneck: None,
                classifier: last_linear.map(|l| Dense::new(l, None)),
            },
            Model::Ir(m) => Self::from_ir(kind, m),
        }
    }

    fn from_ir(kind: ModelKind, m: InceptionResnet) -> Self {
        let mut blocks = Vec::new();
        let mut stage_ends = Vec::new();
        let conv = |c: ConvBnAct| Block::plain(vec![Branch::conv(c)]);
        let pool = || Block::plain(vec![Branch::max_pool()]);
        blocks.extend([m.conv2d_1a, m.conv2d_2a, m.conv2d_2b].map(conv));
        stage_ends.push(blocks.len() - 1);
        if let (Some(_), Some(c3), Some(c4)) = (m.maxpool_3a, m.conv2d_3b, m.conv2d_4a) {
            blocks.extend([pool(), conv(c3), conv(c4)]);
        }
        if let (Some(m3), Some(m4)) = (m.mixed_3a, m.mixed_4a) {
            blocks.extend([v4_block(V4Block::Mixed3a(m3)), v4_block(V4Block::Mixed4a(m4))]);
        }
        stage_ends.push(blocks.len() - 1);
        if let Some(m5) = m.mixed_5a {
            blocks.push(v4_block(V4Block::Mixed5a(m5)));
        }
        if let Some(c) = m.conv2d_4b {
            blocks.push(conv(c));
        }
        if let Some(b) = m.mixed_5b {
            blocks.extend([pool(), Block::plain(four_branch(b))]);
        }
        blocks.extend(m.repeat.into_iter().map(res_block));
        stage_ends.push(blocks.len() - 1);
        blocks.push(Block::plain(reduction_a(m.mixed_6a)));
        blocks.extend(m.repeat_1.into_iter().map(res_block));
        stage_ends.push(blocks.len() - 1);
        let IrReductionB { branch0, branch1, branch2, .. } = m.mixed_7a;
        blocks.push(Block::plain(vec![
            Branch::convs(branch0),
            Branch::convs(branch1),
            Branch::convs(branch2),
            Branch::max_pool(),
        ]));
        blocks.extend(m.repeat_2.into_iter().map(res_block));
        blocks.extend(m.block8.map(res_block));
        blocks.extend(m.conv2d_7b.map(conv));
        stage_ends.push(blocks.len() - 1);
        let (bottleneck, classifier) = match m.layout {
            IrLayout::FacenetV1 => {
                (m.last_linear.map(|l| Dense::new(l, m.last_bn)), m.logits.map(|l| Dense::new(l, None)))
            }
            _ => (None, m.classif.map(|l| Dense::new(l, None))),
        };
        Engine { kind, width: m.width, blocks, stage_ends, bottleneck, classifier }
    }

    pub fn width(&self) -> f64 {
        self.width
    }

    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    pub fn num_classes(&self) -> usize {
        self.classifier.as_ref().map_or(0, |d| d.dout())
    }

    /// Trunk, calling `tap(stage, &output)` at each `feature_info` stage end.
    pub fn forward_features_tapped(&self, mut x: Act, tap: &mut (dyn FnMut(usize, &Act) + Send)) -> Act {
        // Run the whole pass on a pool worker: each GEMM's tasks are then pushed to the local
        // queue instead of being injected from outside and waited for with a sleep/wake.
        rayon::scope(|_| {
            for (i, b) in self.blocks.iter().enumerate() {
                x = b.run(x);
                if let Some(s) = self.stage_ends.iter().position(|&e| e == i) {
                    tap(s, &x);
                }
            }
            x
        })
    }

    pub fn forward_features(&self, x: Act) -> Act {
        self.forward_features_tapped(x, &mut |_, _| {})
    }

    /// Global average pool (+ facenet bottleneck): `[n, d]` row-major and `d`.
    pub fn pre_logits(&self, f: &Act) -> (Vec<f32>, usize) {
        let hw = f.h * f.w;
        let mut pooled = vec![0.0f32; f.n * f.c];
        for (b, out) in pooled.chunks_mut(f.c).enumerate() {
            for p in 0..hw {
                let src = &f.data[(b * hw + p) * f.c..][..f.c];
                out.iter_mut().zip(src).for_each(|(o, v)| *o += v);
            }
            out.iter_mut().for_each(|o| *o /= hw as f32);
        }
        match &self.bottleneck {
            Some(d) => (d.run(&pooled, f.n), d.dout()),
            None => (pooled, f.c),
        }
    }

    /// Classifier on pre-logits (identity when the model has none).
    pub fn logits(&self, pre: &[f32], n: usize) -> (Vec<f32>, usize) {
        match &self.classifier {
            Some(d) => (d.run(pre, n), d.dout()),
            None => (pre.to_vec(), pre.len() / n.max(1)),
        }
    }
}
