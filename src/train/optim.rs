//! The paper's optimizer with TensorFlow semantics, keyed by checkpoint key so that its state
//! is saved next to the weights:
//!
//! ```text
//! ms  = rho * ms + (1 - rho) * g^2          (ms starts at 1, as tf.train.RMSPropOptimizer)
//! mom = mu * mom + lr * g / sqrt(ms + eps)
//! w  -= mom
//! ```
//! with rho 0.9, mu 0.9, eps 1.0. Before the update, gradients are clipped by their global norm
//! and conv / linear weights get L2 weight decay (`g += wd * w`, TF-slim 4e-5). The exponential
//! moving average of the weights (TF `ExponentialMovingAverage` with `num_updates`) is kept
//! here too and used for evaluation and export.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::models::{Model, ModelKind};
use crate::weights::{PathTracker, track_paths};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OptimConfig {
    pub rho: f64,
    pub momentum: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; `None` disables.
    pub clip_norm: Option<f64>,
    pub ema_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { rho: 0.9, momentum: 0.9, epsilon: 1.0, weight_decay: 4e-5, clip_norm: Some(10.0), ema_decay: 0.9999 }
    }
}

/// Per-parameter state, flattened, by checkpoint key.
#[derive(Default)]
pub struct OptimState {
    pub ms: HashMap<String, Tensor<1>>,
    pub mom: HashMap<String, Tensor<1>>,
    pub ema: HashMap<String, Tensor<1>>,
    pub ema_updates: u64,
}

fn is_buffer(key: &str) -> bool {
    key.ends_with("running_mean") || key.ends_with("running_var")
}

/// Weight decay applies to convolution and linear weights only (not BN, not biases).
fn decays(key: &str, rank: usize) -> bool {
    rank >= 2 && key.ends_with(".weight")
}

fn flat<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.dims().iter().product::<usize>();
    t.reshape([n])
}

struct NormVisitor<'a> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for NormVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = flat(g).powi_scalar(2).sum();
            self.sum = Some(match self.sum.take() {
                Some(a) => a + s,
                None => s,
            });
        }
    }
}

struct MergeVisitor<'a> {
    main: &'a mut GradientsParams,
    others: &'a mut [GradientsParams],
}

impl ModuleVisitor for MergeVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let mut acc = self.main.remove::<D>(param.id);
        for g in self.others.iter_mut() {
            if let Some(x) = g.remove::<D>(param.id) {
                acc = Some(match acc {
                    Some(a) => {
                        let dev = a.device();
                        a + x.to_device(&dev)
                    }
                    None => x,
                });
            }
        }
        if let Some(a) = acc {
            self.main.register(param.id, a);
        }
    }
}

/// Sum the gradients of data-parallel replicas (already scaled by their shard's share of the
/// batch) into the first, on its device.
pub fn merge_grads(model: &Model, mut grads: Vec<GradientsParams>) -> GradientsParams {
    if grads.len() <= 1 {
        return grads.pop().unwrap_or_default();
    }
    let mut main = grads.remove(0);
    model.visit(&mut MergeVisitor { main: &mut main, others: &mut grads });
    main
}

/// The global L2 norm of all gradients.
pub fn global_norm(model: &Model, grads: &GradientsParams) -> f64 {
    let mut v = NormVisitor { grads, sum: None };
    model.visit(&mut v);
    v.sum.map_or(0.0, |s| (s.into_scalar::<f32>() as f64).sqrt())
}

/// One TF-RMSProp update of the slots: returns `(ms, mom)`; the weight update is `w -= mom`.
pub fn tf_rmsprop(g: Tensor<1>, ms: Tensor<1>, mom: Tensor<1>, cfg: &OptimConfig, lr: f64) -> (Tensor<1>, Tensor<1>) {
    let ms = ms.mul_scalar(cfg.rho) + g.clone().powi_scalar(2).mul_scalar(1.0 - cfg.rho);
    let mom = mom.mul_scalar(cfg.momentum) + g.mul_scalar(lr) / ms.clone().add_scalar(cfg.epsilon).sqrt();
    (ms, mom)
}

struct StepMapper<'a> {
    kind: ModelKind,
    tracker: PathTracker,
    grads: &'a mut GradientsParams,
    state: &'a mut OptimState,
    cfg: &'a OptimConfig,
    lr: f64,
    clip: f64,
    frozen: &'a dyn Fn(&str) -> bool,
}

impl ModuleMapper for StepMapper<'_> {
    track_paths!();
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.remove::<D>(param.id) else { return param };
        let key = self.tracker.leaf(self.kind);
        if (self.frozen)(&key) {
            return param;
        }
        let (cfg, lr, clip) = (self.cfg, self.lr, self.clip);
        let state = &mut *self.state;
        param.map(|w| {
            let require_grad = w.is_require_grad();
            let w = w.inner();
            let shape = w.dims();
            let mut g = g.mul_scalar(clip);
            if cfg.weight_decay > 0.0 && decays(&key, D) {
                g = g + w.clone().mul_scalar(cfg.weight_decay);
            }
            let g = flat(g);
            let n = g.dims()[0];
            let device = g.device();
            let ms = state.ms.remove(&key).unwrap_or_else(|| Tensor::ones([n], &device));
            let mom = state.mom.remove(&key).unwrap_or_else(|| Tensor::zeros([n], &device));
            let (ms, mom) = tf_rmsprop(g, ms, mom, cfg, lr);
            let updated = w - mom.clone().reshape(shape);
            state.ms.insert(key.clone(), ms);
            state.mom.insert(key.clone(), mom);
            let t = Tensor::from_inner(updated);
            if require_grad { t.require_grad() } else { t }
        })
    }
}

/// One optimizer step: clip by global norm, decay, TF-RMSProp. Returns the updated model and
/// the gradient norm before clipping.
pub fn step(
    model: Model,
    mut grads: GradientsParams,
    state: &mut OptimState,
    cfg: &OptimConfig,
    lr: f64,
    frozen: &dyn Fn(&str) -> bool,
) -> (Model, f64) {
    let norm = global_norm(&model, &grads);
    let clip = match cfg.clip_norm {
        Some(c) if norm > c => c / norm,
        _ => 1.0,
    };
    let mut m = StepMapper {
        kind: model.kind(),
        tracker: PathTracker::default(),
        grads: &mut grads,
        state,
        cfg,
        lr,
        clip,
        frozen,
    };
    (model.map(&mut m), norm)
}

struct EmaVisitor<'a> {
    kind: ModelKind,
    tracker: PathTracker,
    state: &'a mut OptimState,
    decay: f64,
}

impl ModuleVisitor for EmaVisitor<'_> {
    track_paths!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let key = self.tracker.leaf(self.kind);
        if is_buffer(&key) {
            return;
        }
        let w = flat(param.val().inner());
        let avg = match self.state.ema.remove(&key) {
            Some(a) => a.mul_scalar(self.decay) + w.mul_scalar(1.0 - self.decay),
            None => w,
        };
        self.state.ema.insert(key, avg);
    }
}

/// Update the moving average after a step; decay `min(ema_decay, (1 + t) / (10 + t))`.
pub fn update_ema(model: &Model, state: &mut OptimState, cfg: &OptimConfig) {
    let t = state.ema_updates as f64;
    let decay = cfg.ema_decay.min((1.0 + t) / (10.0 + t));
    let mut v = EmaVisitor { kind: model.kind(), tracker: PathTracker::default(), state, decay };
    model.visit(&mut v);
    state.ema_updates += 1;
}

struct EmaApplier<'a> {
    kind: ModelKind,
    tracker: PathTracker,
    ema: &'a HashMap<String, Tensor<1>>,
}

impl ModuleMapper for EmaApplier<'_> {
    track_paths!();
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.tracker.leaf(self.kind);
        match self.ema.get(&key) {
            Some(avg) => param.map(|w| {
                let shape = w.dims();
                avg.clone().to_device(&w.device()).reshape(shape)
            }),
            None => param,
        }
    }
}

/// An eval (non-autodiff) copy of `model` holding the averaged weights and the current
/// BatchNorm statistics.
pub fn ema_model(model: &Model, state: &OptimState) -> Model {
    let eval = model.valid();
    if state.ema.is_empty() {
        return eval;
    }
    let mut m = EmaApplier { kind: eval.kind(), tracker: PathTracker::default(), ema: &state.ema };
    eval.map(&mut m)
}
