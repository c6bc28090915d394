//! The CPU training engine (`train::fast`) against burn's autodiff on the same model: loss and
//! every parameter's gradient of one step, for every network and layout we ship, including
//! those no reference has (paper layouts, other widths, the plain counterparts, one residual
//! scale); batch 2, inputs whose last maps are at least 3 x 3 (on 1 x 1 maps a batch-2
//! BatchNorm sees two values, and any float32 noise is amplified past any tolerance). Both
//! engines are float32: each network part is held to 1e-3. The float64 PyTorch references are
//! in `tests/grads.rs`.

use burn::tensor::Device;
use inception::engine::Act;
use inception::models::inception_resnet::{IrConfig, ResBlock, ResKind};
use inception::models::{Model, ModelConfig, ModelKind, Part};
use inception::train::fast::{Net, SlotKind, burn_gradients};

mod common;

fn input(n: usize, size: usize, seed: usize) -> Vec<f32> {
    (0..n * 3 * size * size).map(|i| (((i + seed) * 7919) % 2001) as f32 / 1000.0 - 1.0).collect()
}

/// Relative error of every gradient (and the loss) of one step against burn.
fn check(cfg: ModelConfig, size: usize, tol: f64) {
    let dev = Device::flex().autodiff();
    // the deterministic weights of the PyTorch references (BN shifts away from 0): with the
    // Kaiming initialisation of `train` (BN identity) Inception-v4's float32 gradients, ours and
    // burn's alike, are ~13% from float64 (measured against timm), no test of anything
    let mut model =
        inception::weights::fill_model(Model::new(&cfg, &dev), &mut |k, shape| Some(common::det_value(k, shape)));
    if let Model::Ir(m) = &mut model {
        // dropout draws differ between the two; the engines' dropouts are tested apart
        m.dropout = None;
    }
    let n = 2;
    let shape = [n, 3, size, size];
    let x = input(n, size, cfg.model as usize);
    let labels: Vec<usize> = (0..n).map(|i| (i * 3 + 1) % cfg.num_classes).collect();
    let (lref, gref) = burn_gradients(&model, &x, shape, &labels, 0.1);
    let mut net = Net::from_model(&model);
    let out = net.step(Act::from_nchw(&x, shape), &labels, 0.1, 0.1, 0);
    assert!((out.loss - lref).abs() < 1e-4 * lref.abs().max(1.0), "{:?}: loss {} vs burn {lref}", cfg, out.loss);
    let mut worst = (0.0f64, String::new());
    let mut checked = 0;
    let errors: Vec<(String, f64, f64)> = net
        .slots
        .iter()
        .filter(|s| s.kind != SlotKind::Buffer)
        .map(|s| {
            let r = gref.get(&s.key).unwrap_or_else(|| panic!("burn has no gradient for {}", s.key));
            assert_eq!(r.len(), s.grad.len(), "{}", s.key);
            let num: f64 = s.grad.iter().zip(r).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
            let den: f64 = r.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            (s.key.clone(), num, den)
        })
        .collect();
    // per network part (`repeat.3`, `features.6`, `mixed_5b`, ...): a single ReLU decision
    // that the two engines' rounding takes either way moves the sums that cancel (a bias's,
    // a BN shift's) by far more than the part as a whole
    let part = |k: &str| -> String {
        let seg: Vec<&str> = k.split('.').collect();
        match seg.as_slice() {
            [first, i, ..] if first.starts_with("repeat") || *first == "features" => format!("{first}.{i}"),
            [first, ..] => first.to_string(),
            [] => String::new(),
        }
    };
    let mut parts: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for (key, num, den) in &errors {
        let p = parts.entry(part(key)).or_default();
        p.0 += num * num;
        p.1 += den * den;
    }
    for (name, (n2, d2)) in parts {
        let (num, den) = (n2.sqrt(), d2.sqrt());
        if std::env::var_os("GRADS_REPORT").is_some() {
            eprintln!("{:?} {name} {:.2e}", cfg.model, num / den.max(1e-300));
        }
        let e = num / (tol * den);
        if e > worst.0 {
            worst = (e, format!("{name}: {:.2e} relative", num / den.max(1e-300)));
        }
        checked += 1;
    }
    assert!(worst.0 <= 1.0, "{:?}: {checked} parts, worst {:.2}x the allowed: {}", cfg.model, worst.0, worst.1);
}

fn cfg(model: ModelKind, width: f64) -> ModelConfig {
    ModelConfig { width, ..ModelConfig::new(model, 5) }
}

#[test]
fn ir_v1_facenet_gradients_match_burn() {
    check(cfg(ModelKind::InceptionResnetV1, 0.25), 139, 1e-3);
}

/// One block on its own (5 x 5, batch 2, dL/dout deterministic): every gradient and the
/// input's against burn, to 1e-4: the variants no reference has.
fn check_block(name: &str, block: ResBlock) {
    use burn::tensor::{Tensor, TensorData};
    let dev = Device::flex().autodiff();
    let block = common::deterministic(block);
    let cin = block.conv2d.weight.dims()[0];
    let x: Vec<f32> =
        common::det_uniform(&format!("{name}.x"), 2 * cin * 25).iter().map(|v| (v * 2.0 - 1.0) as f32).collect();
    let xt = Tensor::<4>::from_data(TensorData::new(x.clone(), [2, cin, 5, 5]), &dev).require_grad();
    let y = block.forward(xt.clone());
    let r: Vec<f32> = common::det_uniform(&format!("{name}.R"), y.dims().iter().product())
        .iter()
        .map(|v| (v * 2.0 - 1.0) as f32)
        .collect();
    let grads = (y * Tensor::<4>::from_data(TensorData::new(r.clone(), [2, cin, 5, 5]), &dev)).sum().backward();
    let mut net = Net::block(&block, Part::Residual(vec![block.clone()]));
    let (_, dx) = net.trunk_step(Act::from_nchw(&x, [2, cin, 5, 5]), &Act::from_nchw(&r, [2, cin, 5, 5]).data, 0.1);
    let rel = |a: &[f32], b: &[f32]| {
        let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
        d / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt().max(1e-30)
    };
    let gx = xt.grad(&grads).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    assert!(rel(&dx.to_nchw(), &gx) <= 1e-4, "{name}: input gradient {:.2e}", rel(&dx.to_nchw(), &gx));
    let mut by_key = std::collections::HashMap::new();
    collect_grads(&block, &burn::optim::GradientsParams::from_grads(grads, &block), &mut by_key);
    for s in net.slots.iter().filter(|s| s.kind != SlotKind::Buffer) {
        let e = rel(&s.grad, &by_key[&s.key]);
        assert!(e <= 1e-4, "{name}: {} {e:.2e}", s.key);
    }
}

/// burn's gradients of a module by (module-relative) key.
fn collect_grads<M: burn::module::Module>(
    m: &M,
    gp: &burn::optim::GradientsParams,
    out: &mut std::collections::HashMap<String, Vec<f32>>,
) {
    let keys: Vec<String> = inception::weights::keys_of(m);
    struct G<'a> {
        gp: &'a burn::optim::GradientsParams,
        keys: &'a [String],
        i: usize,
        out: &'a mut std::collections::HashMap<String, Vec<f32>>,
    }
    impl burn::module::ModuleVisitor for G<'_> {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<burn::tensor::Tensor<D>>) {
            if let Some(g) = self.gp.get::<D>(p.id) {
                self.out
                    .insert(self.keys[self.i].clone(), g.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
            }
            self.i += 1;
        }
    }
    m.visit(&mut G { gp, keys: &keys, i: 0, out });
}

fn paper_v1() -> IrConfig {
    IrConfig::for_kind(ModelKind::InceptionResnetV1Paper, 0).unwrap().with_width(0.25)
}

#[test]
fn plain_and_scaled_blocks_match_burn() {
    let d = Device::flex().autodiff();
    let c = paper_v1();
    check_block("plain_a", ResBlock::new(ResKind::A, &c.block_a, 0.17, true, &d).without_shortcut(&d));
    check_block("plain_b", ResBlock::new(ResKind::B, &c.block_b, 0.10, true, &d).without_shortcut(&d));
    check_block("plain_c", ResBlock::new(ResKind::C, &c.block_c, 0.20, true, &d).without_shortcut(&d));
    check_block("scaled_a", ResBlock::new(ResKind::A, &c.block_a, 0.3, true, &d));
    check_block("scaled_c_noact", ResBlock::new(ResKind::C, &c.block_c, 1.0, false, &d));
}

/// 100 steps of the recipe (TF-RMSProp, clipping, weight decay, label smoothing) from the same
/// start on the same batches: the two engines' losses track each other.
#[test]
fn a_hundred_steps_track_the_burn_path() {
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::optim::GradientsParams;
    use burn::tensor::{Int, Tensor, TensorData};
    use inception::train::{fast, optim};
    let dev = Device::flex().autodiff();
    let cfg = ModelConfig { width: 0.1, ..ModelConfig::new(ModelKind::InceptionResnetV1, 2) };
    let mut model = inception::train::seeded_model(&cfg, 3, &dev);
    let mut net = Net::from_model(&model);
    let ocfg = optim::OptimConfig::default();
    let (mut bst, mut fst) = (optim::OptimState::default(), fast::OptState::new(&net.slots));
    let loss_fn = CrossEntropyLossConfig::new().with_smoothing(Some(0.1)).init(&dev);
    let (n, s) = (8, 75);
    let (mut lb, mut lf) = (Vec::new(), Vec::new());
    for step in 0..100 {
        // two classes: bright and dark images with a per-step pattern
        let labels: Vec<usize> = (0..n).map(|i| (i + step) % 2).collect();
        let x: Vec<f32> = (0..n * 3 * s * s)
            .map(|i| {
                let b = i / (3 * s * s);
                let base = if labels[b] == 1 { 0.4 } else { -0.4 };
                base + (((i * 7919 + step * 104729) % 2001) as f32 / 2000.0 - 0.5) * 0.8
            })
            .collect();
        let xt = Tensor::<4>::from_data(TensorData::new(x.clone(), [n, 3, s, s]), &dev);
        let y = Tensor::<1, Int>::from_data(
            TensorData::new(labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), [n]),
            &dev,
        );
        let loss = loss_fn.forward(model.forward(xt), y);
        lb.push(loss.clone().into_scalar::<f32>() as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (m, _) = optim::step(model, grads, &mut bst, &ocfg, 0.045, &|_| false);
        model = m;
        optim::update_ema(&model, &mut bst, &ocfg);
        let out = net.step(Act::from_nchw(&x, [n, 3, s, s]), &labels, 0.1, 0.1, step as u64);
        lf.push(out.loss);
        fast::optimizer_step(&mut net.slots, &mut fst, &ocfg, 0.045, &|_| false);
        fast::update_ema(&net.slots, &mut fst, &ocfg);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (b0, f0, b1, f1) = (mean(&lb[..10]), mean(&lf[..10]), mean(&lb[80..]), mean(&lf[80..]));
    assert!((lb[0] - lf[0]).abs() < 1e-4, "the first losses differ: {} vs {}", lb[0], lf[0]);
    assert!(b1 < 0.7 * b0 && f1 < 0.7 * f0, "both learn: burn {b0:.3} -> {b1:.3}, fast {f0:.3} -> {f1:.3}");
    assert!((b1 - f1).abs() < 0.25 * b1.max(f1) + 0.02, "the last 20 losses: burn {b1:.4}, fast {f1:.4}");
}

/// A step gives the same bits on 1, 2 and 3 threads (fixed-order reductions, GEMM tiles that
/// sum in one order whatever the split), and twice in a row.
#[test]
fn a_step_is_deterministic_whatever_the_threads() {
    let dev = Device::flex();
    let cfg = ModelConfig { width: 0.2, ..ModelConfig::new(ModelKind::InceptionResnetV2, 3) };
    let model = inception::train::seeded_model(&cfg, 5, &dev);
    let x = input(3, 99, 1);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut net = Net::from_model(&model);
            let out = net.step(Act::from_nchw(&x, [3, 3, 99, 99]), &[0, 1, 2], 0.1, 0.1, 9);
            let grads: Vec<Vec<f32>> = net.slots.iter().map(|s| s.grad.clone()).collect();
            let stats: Vec<Vec<f32>> = net.slots.iter().map(|s| s.value.clone()).collect();
            (out.loss.to_bits(), grads, stats)
        })
    };
    let one = run(1);
    for t in [2, 3, 2] {
        let other = run(t);
        assert!(one == other, "{t} threads differ from 1");
    }
}
