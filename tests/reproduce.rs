//! `inception reproduce`: the experiment definitions (matched cost, the probe) and a 2-step run
//! of each experiment writing every report file.

mod common;

use burn::tensor::Device;
use inception::models::{Model, ModelConfig};
use inception::train::data::{Dataset, Transform, load_batch};
use inception::train::reproduce::{Budget, Experiment, SPEEDUP_PAIRS, Stats, cost, plan, run};
use inception::train::zero_fraction;

#[test]
fn paired_nets_have_matched_cost() {
    for budget in [Budget::Quick, Budget::Medium, Budget::Full] {
        let arms = plan(Experiment::ResidualSpeedup, budget, "fashion-mnist");
        assert_eq!(arms.len(), 4 * 3, "4 arms x 3 seeds");
        let c = cost(&arms);
        let get = |n: &str| c.iter().find(|x| x.0 == n).unwrap().clone();
        for (res, plain) in SPEEDUP_PAIRS {
            let ((_, p, a), (_, q, b)) = (get(res), get(plain));
            let (a, b) = (a as f64, b as f64);
            assert!((a - b).abs() / a.max(b) <= 0.10, "{budget:?} {res} vs {plain}: MACs {a} vs {b}");
            if res == "ir_v1" {
                // the plain net trades each up-projection's bias for a BatchNorm (2 x channels)
                assert!((p as f64 - q as f64).abs() / p as f64 <= 0.01, "parameters {p} vs {q}");
            }
        }
    }
    // the scaling experiment's last stage is wider than 1000 filters at every budget but the
    // smoke test, with three scales at the recipe's lr and clipping
    for budget in [Budget::Quick, Budget::Medium] {
        let arms = plan(Experiment::ResidualScaling, budget, "fashion-mnist");
        assert_eq!(arms.len(), 3 * 3);
        assert!(arms.iter().all(|a| a.config.lr == 0.045 && a.config.optim.clip_norm.is_some()));
        let m = Model::new(&ModelConfig { num_classes: 10, ..arms[0].config.model.clone() }, &Device::flex());
        assert!(m.feature_info().last().unwrap().channels > 1000);
    }
}

#[test]
fn statistics_of_seeds() {
    let s = Stats::of(&[0.80, 0.82, 0.84]);
    assert!((s.mean - 0.82).abs() < 1e-12 && (s.std - 0.02).abs() < 1e-12);
    // t(0.975, 2) = 4.303: half width 4.303 * 0.02 / sqrt(3)
    let half = 4.303 * 0.02 / 3f64.sqrt();
    assert!((s.ci95.0 - (0.82 - half)).abs() < 1e-9 && (s.ci95.1 - (0.82 + half)).abs() < 1e-9);
    assert_eq!(Stats::of(&[f64::NAN, 0.5]).n, 1);
    assert!(Stats::of(&[]).mean.is_nan());
}

fn tiny_folder() -> std::path::PathBuf {
    let d = common::unique_temp_dir("inception-repro-test");
    for (class, v) in [("a", 200u8), ("b", 40u8)] {
        std::fs::create_dir_all(d.join(class)).unwrap();
        for i in 0..6u8 {
            let img =
                image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([v ^ (x as u8 * i), v, (y as u8).wrapping_mul(i)]));
            img.save(d.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    d
}

#[test]
fn the_probe_reads_the_last_feature_map() {
    let data = tiny_folder();
    let arms = plan(Experiment::ResidualScaling, Budget::Test, data.to_str().unwrap());
    let cfg = &arms[0].config;
    let m = Model::new(&ModelConfig { num_classes: 2, ..cfg.model.clone() }, &Device::flex());
    let ds = Dataset::open(data.to_str().unwrap(), false).unwrap();
    let probe = zero_fraction(&m, &ds, cfg, &Device::flex());
    let idx: Vec<usize> = (0..cfg.batch.min(ds.len())).collect();
    let b = load_batch(&ds, &idx, &Transform::Eval(cfg.preprocess()), 0, &Device::flex()).unwrap();
    let f: Vec<f32> = m.forward_features(b.images).into_data().convert::<f32>().try_into_vec().unwrap();
    let manual = f.iter().filter(|v| **v == 0.0).count() as f64 / f.len() as f64;
    assert!((probe - manual).abs() < 1e-12, "{probe} vs {manual}");
}

#[test]
fn a_two_step_run_of_each_experiment_writes_every_report_file() {
    let data = tiny_folder();
    for exp in [Experiment::ResidualSpeedup, Experiment::ResidualScaling] {
        let out = data.join(format!("out_{exp:?}"));
        run(exp, Budget::Test, data.to_str().unwrap(), &out, &Device::flex(), &mut |_, _, _, _| {}).unwrap();
        for f in ["report.md", "results.csv", "curves.png"] {
            assert!(out.join(f).exists(), "{exp:?}: {f}");
        }
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("| arm |"), "{report}");
    }
}
