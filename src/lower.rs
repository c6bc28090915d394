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
use crate::layers::{BN_EPS, ConvBnAct, FourBranch, Layer};
use crate::models::inception_resnet::ResBlock;
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

fn cba(c: ConvBnAct) -> Conv {
    conv(&c.conv, Some(&c.bn), c.act)
}

fn chain(cs: Vec<ConvBnAct>) -> Branch {
    Branch::convs(cs.into_iter().map(cba).collect())
}

fn one(c: ConvBnAct) -> Branch {
    chain(vec![c])
}

fn layers(ls: Vec<Layer>) -> Branch {
    Branch::new(
        ls.into_iter()
            .map(|l| match l {
                Layer::Conv(c) => Op::Conv(Box::new(cba(c))),
                Layer::MaxPool(_) => Op::MaxPool,
                Layer::AvgPool(_) => Op::AvgPool,
            })
            .collect(),
    )
}

fn four_branch(b: FourBranch) -> Vec<Branch> {
    vec![one(b.branch0), chain(b.branch1), chain(b.branch2), layers(b.branch3)]
}

fn residual(r: ResBlock) -> Block {
    let mut branches = vec![one(r.branch0), chain(r.branch1)];
    if !r.branch2.is_empty() {
        branches.push(chain(r.branch2));
    }
    let up = conv(&r.conv2d, r.bn.as_ref(), false);
    Block::new(branches, Some(Residual { up, scale: r.scale as f32, relu: r.act, shortcut: r.shortcut }))
}

/// The engine blocks of one trunk part.
fn part(p: Part) -> Vec<Block> {
    let plain = |b| vec![Block::plain(b)];
    match p {
        Part::Conv(c) => plain(vec![one(c)]),
        Part::MaxPool => plain(vec![Branch::max_pool()]),
        Part::Mixed3a(m) => plain(vec![Branch::max_pool(), one(m.conv)]),
        Part::Mixed4a(m) => plain(vec![chain(m.branch0), chain(m.branch1)]),
        Part::Mixed5a(m) => plain(vec![one(m.conv), Branch::max_pool()]),
        Part::FourBranch(b) => plain(four_branch(b)),
        Part::ReductionA(r) => plain(vec![one(r.branch0), chain(r.branch1), Branch::max_pool()]),
        Part::ReductionB(r) => plain(vec![chain(r.branch0), chain(r.branch1), Branch::max_pool()]),
        Part::IrReductionB(r) => plain(vec![chain(r.branch0), chain(r.branch1), chain(r.branch2), Branch::max_pool()]),
        Part::InceptionC(c) => {
            // Fig. 6: branches 1 and 2 split into a 1x3 and a 3x1 at their ends
            let ops = |cs: Vec<ConvBnAct>| cs.into_iter().map(|c| Op::Conv(Box::new(cba(c)))).collect();
            plain(vec![
                one(c.branch0),
                Branch::split(ops(vec![c.branch1_0]), vec![cba(c.branch1_1a), cba(c.branch1_1b)]),
                Branch::split(
                    ops(vec![c.branch2_0, c.branch2_1, c.branch2_2]),
                    vec![cba(c.branch2_3a), cba(c.branch2_3b)],
                ),
                layers(c.branch3),
            ])
        }
        Part::Residual(blocks) => blocks.into_iter().map(residual).collect(),
    }
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
        blocks.extend(part(p));
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
    }
}
