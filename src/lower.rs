//! Lowering a loaded model to the fast engine: the one module that reads the networks' blocks
//! for the engine. It walks the trunk description (`Model::into_parts`, in stage order),
//! folds each BatchNorm into the convolution before it (`w * gamma / sqrt(var + eps)`,
//! `beta - mean * gamma / sqrt(var + eps)`), and maps each block to engine branches. The model
//! is consumed part by part, so weights are held about once.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Linear, PaddingConfig2d};
use burn::tensor::Tensor;

use crate::engine::{Block, Branch, Conv, Dense, Engine, Op, Residual};
use crate::layers::{BN_EPS, ConvBnAct, Layer};
use crate::models::{Head, Model, Part};

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

/// A convolution with an optional folded BatchNorm (`None`: its own bias, or zero).
fn conv(c: &Conv2d, bn: Option<&BatchNorm>, relu: bool) -> Conv {
    let dims = c.weight.dims();
    let pad = match c.padding {
        PaddingConfig2d::Explicit(t, l, _, _) => [t, l],
        _ => [0, 0],
    };
    let (scale, bias) = match bn {
        Some(bn) => bn_affine(bn),
        None => (vec![1.0; dims[0]], c.bias.as_ref().map(param).unwrap_or_else(|| vec![0.0; dims[0]])),
    };
    Conv::new(&param(&c.weight), dims, c.stride[0], pad, &scale, bias, relu)
}

/// A convolution of a trunk part as the lowering sees it: its module, the BatchNorm after it
/// (`None`: its own bias, or none) and whether a ReLU follows.
pub struct ConvSrc<'a> {
    pub conv: &'a Conv2d,
    pub bn: Option<&'a BatchNorm>,
    pub relu: bool,
}

/// A trunk part as parallel branches (concatenated) with an optional residual wrapper: the
/// structure both executors are built from, with the convolutions made by `mk` (the fast
/// engine folds BatchNorm into them; the training engine keeps it).
pub type Lowered<C> = (Vec<Branch<C>>, Option<Residual<C>>);

/// The branch structure of one trunk part (paper figures: see the model files).
pub fn part<C>(p: Part, mk: &mut dyn FnMut(ConvSrc<'_>) -> C) -> Vec<Lowered<C>> {
    let plain = |b| vec![(b, None)];
    let one = |mk: &mut dyn FnMut(ConvSrc<'_>) -> C, c| Branch::convs(vec![cba(mk, c)]);
    match p {
        Part::Conv(c) => plain(vec![one(mk, c)]),
        Part::MaxPool => plain(vec![Branch::max_pool()]),
        Part::Mixed3a(m) => plain(vec![Branch::max_pool(), one(mk, m.conv)]),
        Part::Mixed4a(m) => plain(vec![chain(mk, m.branch0), chain(mk, m.branch1)]),
        Part::Mixed5a(m) => plain(vec![one(mk, m.conv), Branch::max_pool()]),
        Part::FourBranch(b) => {
            plain(vec![one(mk, b.branch0), chain(mk, b.branch1), chain(mk, b.branch2), layers(mk, b.branch3)])
        }
        Part::ReductionA(r) => plain(vec![one(mk, r.branch0), chain(mk, r.branch1), Branch::max_pool()]),
        Part::ReductionB(r) => plain(vec![chain(mk, r.branch0), chain(mk, r.branch1), Branch::max_pool()]),
        Part::IrReductionB(r) => {
            plain(vec![chain(mk, r.branch0), chain(mk, r.branch1), chain(mk, r.branch2), Branch::max_pool()])
        }
        Part::InceptionC(c) => {
            // Fig. 6: branches 1 and 2 split into a 1x3 and a 3x1 at their ends
            let b0 = one(mk, c.branch0);
            let ops1 = vec![Op::Conv(Box::new(cba(mk, c.branch1_0)))];
            let b1 = Branch::split(ops1, vec![cba(mk, c.branch1_1a), cba(mk, c.branch1_1b)]);
            let ops2 =
                [c.branch2_0, c.branch2_1, c.branch2_2].into_iter().map(|c| Op::Conv(Box::new(cba(mk, c)))).collect();
            let b2 = Branch::split(ops2, vec![cba(mk, c.branch2_3a), cba(mk, c.branch2_3b)]);
            plain(vec![b0, b1, b2, layers(mk, c.branch3)])
        }
        Part::Residual(blocks) => {
            let mut out = Vec::with_capacity(blocks.len());
            for r in blocks {
                let mut branches = vec![one(mk, r.branch0), chain(mk, r.branch1)];
                if !r.branch2.is_empty() {
                    branches.push(chain(mk, r.branch2));
                }
                let up = mk(ConvSrc { conv: &r.conv2d, bn: r.bn.as_ref(), relu: false });
                out.push((branches, Some(Residual { up, scale: r.scale as f32, relu: r.act, shortcut: r.shortcut })));
            }
            out
        }
    }
}

fn cba<C>(mk: &mut dyn FnMut(ConvSrc<'_>) -> C, c: ConvBnAct) -> C {
    mk(ConvSrc { conv: &c.conv, bn: Some(&c.bn), relu: c.act })
}

fn chain<C>(mk: &mut dyn FnMut(ConvSrc<'_>) -> C, cs: Vec<ConvBnAct>) -> Branch<C> {
    Branch::convs(cs.into_iter().map(|c| cba(mk, c)).collect())
}

fn layers<C>(mk: &mut dyn FnMut(ConvSrc<'_>) -> C, ls: Vec<Layer>) -> Branch<C> {
    Branch::new(
        ls.into_iter()
            .map(|l| match l {
                Layer::Conv(c) => Op::Conv(Box::new(cba(mk, c))),
                Layer::MaxPool(_) => Op::MaxPool,
                Layer::AvgPool(_) => Op::AvgPool,
            })
            .collect(),
    )
}

/// A linear layer (burn keeps `[in, out]`) with an optional BatchNorm1d folded in.
fn dense(l: Linear, bn: Option<BatchNorm>) -> Dense {
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
    Dense::new(&w, din, dout, b)
}

/// Freeze a loaded model (eval BatchNorm statistics) into the fast engine. Consumed.
pub fn lower(model: Model) -> Engine {
    let (kind, width) = (model.kind(), model.config().width);
    let (parts, Head { bottleneck, classifier }) = model.into_parts();
    let mut blocks = Vec::new();
    let mut stage_ends: Vec<usize> = Vec::new();
    for (stage, p) in parts {
        let mut fold = |c: ConvSrc<'_>| conv(c.conv, c.bn, c.relu);
        blocks.extend(part(p, &mut fold).into_iter().map(|(branches, residual)| Block::new(branches, residual)));
        match stage_ends.get_mut(stage) {
            Some(end) => *end = blocks.len() - 1,
            None => stage_ends.push(blocks.len() - 1),
        }
    }
    Engine {
        kind,
        width,
        blocks,
        stage_ends,
        bottleneck: bottleneck.map(|(l, bn)| dense(l, bn)),
        classifier: classifier.map(|l| dense(l, None)),
        // `INCEPTION_U8_FLOW=0`: each int8 convolution quantizes its own input (A/B runs)
        u8_dataflow: std::env::var("INCEPTION_U8_FLOW").map_or(true, |v| v != "0"),
    }
}
