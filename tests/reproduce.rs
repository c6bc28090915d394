//! `inception reproduce`: the experiment definitions (matched cost, the probe) and a 2-step run
//! of each experiment writing every report file.

mod common;

use burn::tensor::Device;
use inception::models::{Model, ModelConfig};
use inception::train::data::{Dataset, Transform, load_batch};
use inception::train::reproduce::{Budget, Experiment, cost, plan, run};
use inception::train::zero_fraction;

#[test]
fn paired_nets_have_matched_cost() {
    for budget in [Budget::Quick, Budget::Full] {
        let arms = plan(Experiment::ResidualSpeedup, budget, "fashion-mnist");
        let c = cost(&arms);
        assert_eq!(c.len(), 2);
        let (a, b) = (c[0].2 as f64, c[1].2 as f64);
        assert!((a - b).abs() / a.max(b) <= 0.15, "MACs {a} vs {b}");
        assert_eq!(c[0].1, c[1].1, "the plain net has the same parameters");
    }
    // the scaling experiment's last stage is wider than 1000 filters at every budget but the smoke test
    let arms = plan(Experiment::ResidualScaling, Budget::Quick, "fashion-mnist");
    let m = Model::new(&ModelConfig { num_classes: 10, ..arms[0].config.model.clone() }, &Device::flex());
    assert!(m.feature_info().last().unwrap().channels > 1000);
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
