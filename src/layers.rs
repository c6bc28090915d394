//! Building blocks shared by every family: `ConvBnAct` (bias-free convolution, BatchNorm with
//! eps 1e-3, optional ReLU) and the few pooling shapes the Inception blocks use.
//!
//! Padding is always explicit, as in the references (TF-slim `VALID` plus the symmetric pads the
//! PyTorch ports use for `SAME` stride-1 convolutions).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

/// BatchNorm epsilon of every reference checkpoint (TF-slim's 0.001).
pub const BN_EPS: f64 = 1e-3;

/// `n` channels times a width multiplier, rounded, at least 1.
pub fn ch(n: usize, width: f64) -> usize {
    ((n as f64 * width).round() as usize).max(1)
}

/// Kernel, stride and padding of one convolution: `(kh, kw)`, stride, `(ph, pw)`.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    pub kernel: [usize; 2],
    pub stride: usize,
    pub pad: [usize; 2],
}

/// `k x k`, stride 1, no padding (TF `VALID`).
pub const fn k(n: usize) -> ConvSpec {
    ConvSpec { kernel: [n, n], stride: 1, pad: [0, 0] }
}

impl ConvSpec {
    /// Stride 2.
    pub const fn s2(mut self) -> Self {
        self.stride = 2;
        self
    }
    /// Symmetric `SAME` padding for stride 1: `(kh/2, kw/2)`.
    pub const fn same(mut self) -> Self {
        self.pad = [self.kernel[0] / 2, self.kernel[1] / 2];
        self
    }
}

/// `1 x n`: the factorised row kernel, padded to keep the size.
pub const fn k1xn(n: usize) -> ConvSpec {
    ConvSpec { kernel: [1, n], stride: 1, pad: [0, n / 2] }
}
/// `n x 1`, padded to keep the size.
pub const fn knx1(n: usize) -> ConvSpec {
    ConvSpec { kernel: [n, 1], stride: 1, pad: [n / 2, 0] }
}

/// Convolution (no bias) + BatchNorm (eps 1e-3) + optional ReLU. Field names follow the
/// checkpoints: `conv.weight`, `bn.{weight,bias,running_mean,running_var}`.
#[derive(Module, Debug)]
pub struct ConvBnAct {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    #[module(skip)]
    pub act: bool,
}

impl ConvBnAct {
    pub fn new(cin: usize, cout: usize, spec: ConvSpec, device: &Device) -> Self {
        let conv = Conv2dConfig::new([cin, cout], spec.kernel)
            .with_stride([spec.stride, spec.stride])
            .with_padding(PaddingConfig2d::Explicit(spec.pad[0], spec.pad[1], spec.pad[0], spec.pad[1]))
            .with_bias(false)
            .with_initializer(Initializer::KaimingNormal { gain: std::f64::consts::SQRT_2, fan_out_only: false })
            .init(device);
        let bn = BatchNormConfig::new(cout).with_epsilon(BN_EPS).with_momentum(0.1).init(device);
        Self { conv, bn, act: true }
    }

    pub fn out_channels(&self) -> usize {
        self.conv.weight.dims()[0]
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.conv.forward(x);
        let y = self.bn.forward(y);
        if self.act { relu(y) } else { y }
    }
}

/// A plain biased convolution (the 1x1 "up-projection" of a residual block, no BN).
pub fn conv_bias(cin: usize, cout: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [1, 1])
        .with_padding(PaddingConfig2d::Valid)
        .with_initializer(Initializer::KaimingNormal { gain: std::f64::consts::SQRT_2, fan_out_only: false })
        .init(device)
}

/// 3x3 max pool, stride 2, no padding (TF `VALID`).
pub fn max_pool_3s2() -> MaxPool2d {
    MaxPool2dConfig::new([3, 3]).with_strides([2, 2]).init()
}

/// 3x3 average pool, stride 1, pad 1, padding excluded from the mean (as TF `SAME` pooling).
pub fn avg_pool_3s1() -> AvgPool2d {
    AvgPool2dConfig::new([3, 3])
        .with_strides([1, 1])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_count_include_pad(false)
        .init()
}

/// One element of a sequential branch. Enum variants do not appear in parameter paths, so a
/// branch `Vec<Layer>` has the keys of a PyTorch `nn.Sequential`: `branch3.1.conv.weight`.
// Built once per model; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Layer {
    Conv(ConvBnAct),
    MaxPool(MaxPool2d),
    AvgPool(AvgPool2d),
}

impl Layer {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::MaxPool(p) => p.forward(x),
            Layer::AvgPool(p) => p.forward(x),
        }
    }
}

/// A chain of `ConvBnAct` from `cin` channels, given as `(cout, spec)` steps.
pub fn conv_chain(cin: usize, steps: &[(usize, ConvSpec)], device: &Device) -> Vec<ConvBnAct> {
    let mut c = cin;
    steps
        .iter()
        .map(|&(cout, spec)| {
            let layer = ConvBnAct::new(c, cout, spec, device);
            c = cout;
            layer
        })
        .collect()
}

/// Apply a sequential branch.
pub fn run_chain(chain: &[ConvBnAct], x: Tensor<4>) -> Tensor<4> {
    chain.iter().fold(x, |x, c| c.forward(x))
}

/// "avg pool 3x3 then 1x1 conv" branch, keyed like `nn.Sequential(AvgPool2d, ConvNormAct)`.
pub fn pool_proj(cin: usize, cout: usize, device: &Device) -> Vec<Layer> {
    vec![Layer::AvgPool(avg_pool_3s1()), Layer::Conv(ConvBnAct::new(cin, cout, k(1), device))]
}

pub fn run_layers(layers: &[Layer], x: Tensor<4>) -> Tensor<4> {
    layers.iter().fold(x, |x, l| l.forward(x))
}

/// Global average pool `[N, C, H, W] -> [N, C]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([n, c])
}

/// Four parallel branches concatenated: 1x1 || conv chain || conv chain || avg pool -> 1x1.
/// The shape of Inception-A and -B (paper Figs. 4, 5) and of TF-slim's `Mixed_5b`.
#[derive(Module, Debug)]
pub struct FourBranch {
    pub branch0: ConvBnAct,
    pub branch1: Vec<ConvBnAct>,
    pub branch2: Vec<ConvBnAct>,
    pub branch3: Vec<Layer>,
}

impl FourBranch {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        Tensor::cat(
            vec![
                self.branch0.forward(x.clone()),
                run_chain(&self.branch1, x.clone()),
                run_chain(&self.branch2, x.clone()),
                run_layers(&self.branch3, x),
            ],
            1,
        )
    }
}
