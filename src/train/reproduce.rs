//! `inception reproduce`: the paper's two training claims at small scale, from one command.
//!
//! - residual-speedup (paper Figs. 24-26): Inception-ResNet-v2 against Inception-v4, the pair
//!   the paper matched by cost, at one width multiplier; and Inception-ResNet-v1 against its
//!   plain counterpart (`ModelConfig::plain`: no shortcuts, BatchNorm on the up-projections).
//!   Same recipe, seeds and data order; the speed-up measure is the number of steps each run
//!   needs to reach 90% of the plain arm's mean final accuracy.
//! - residual-scaling (Sec. 3.3): a residual net whose last stage is wider than 1000 filters, at
//!   the recipe's lr and clipping, residual scale 1.0, 0.3 and 0.1; the fraction of zeros in the
//!   last feature map before pooling is probed at every evaluation, and a run counts as dead
//!   once it exceeds 99%.
//!
//! Every arm runs with 3 seeds (but `test`); the report gives mean, sample std and a 95%
//! Student-t interval, and says which claims are reproduced.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{EpochMetrics, TrainConfig, plot, train};
use crate::error::{Error, Result};
use crate::models::{Model, ModelConfig, ModelKind};
use crate::summary::summarize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Experiment {
    ResidualSpeedup,
    ResidualScaling,
}

/// How much compute: `quick` fits 15 minutes on 2 CPU cores, `medium` about 2 hours there,
/// `full` is meant for a GPU, `test` is a 2-step smoke run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Budget {
    Test,
    Quick,
    Medium,
    Full,
}

/// One training run of an experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Arm {
    pub name: String,
    pub seed: u64,
    pub config: TrainConfig,
}

/// The compared pairs of `residual-speedup`: (residual arm, plain arm).
pub const SPEEDUP_PAIRS: [(&str, &str); 2] = [("ir_v2", "v4"), ("ir_v1", "ir_v1_plain")];

/// The runs of an experiment: a pure function of (experiment, budget, data).
///
/// - residual-speedup: the paper's matched pair, Inception-ResNet-v2 against Inception-v4
///   (Figs. 25-26; TF-slim layouts, one width multiplier for both), and Inception-ResNet-v1
///   (the paper's layout) against its plain counterpart (no shortcuts, BatchNorm on the
///   up-projections). Same recipe, seeds and data order for every arm.
/// - residual-scaling: Inception-ResNet-v1 (paper layout) wide enough that its last stage has
///   more than 1000 filters, at the recipe's settings (lr 0.045, gradient clipping), residual
///   scale 1.0, 0.3 and 0.1.
pub fn plan(exp: Experiment, budget: Budget, data: &str) -> Vec<Arm> {
    let mut base = TrainConfig::new(ModelKind::InceptionResnetV1Paper, data);
    base.size = 75;
    base.crop_pct = 1.0;
    base.min_area = 0.5;
    base.batch = 32;
    let seeds: Vec<u64> = match budget {
        Budget::Test => vec![1],
        _ => vec![1, 2, 3],
    };
    // ("epochs" of `steps` steps each: one evaluation per such epoch)
    let (epochs, steps, eval) = match (exp, budget) {
        (_, Budget::Test) => (1, Some(2), Some(16)),
        // 12 runs of ~1 min on 2 cores; 12 runs of ~5 min (about an hour)
        (Experiment::ResidualSpeedup, Budget::Quick) => (8, Some(18), Some(400)),
        (Experiment::ResidualSpeedup, Budget::Medium) => (15, Some(40), Some(500)),
        (Experiment::ResidualSpeedup, Budget::Full) => (60, Some(1000), None),
        // 9 runs of ~70 s; 9 runs of ~12 min: 1,200 steps each (the CPU training engine takes
        // ~0.55 s a step of the width-0.6 net at batch 32 on 2 Zen 3 cores, ~0.22 s on Zen 5)
        (Experiment::ResidualScaling, Budget::Quick) => (6, Some(10), Some(256)),
        (Experiment::ResidualScaling, Budget::Medium) => (20, Some(60), Some(500)),
        (Experiment::ResidualScaling, Budget::Full) => (200, Some(500), Some(2000)),
    };
    base.epochs = epochs;
    base.max_steps = steps;
    base.eval_limit = eval;
    if budget == Budget::Test {
        base.train_limit = Some(64);
    }
    let arms: Vec<(&str, ModelConfig)> = match exp {
        Experiment::ResidualSpeedup => {
            let (w2, w1) = match budget {
                Budget::Test => (0.1, 0.1),
                Budget::Quick => (0.15, 0.25),
                Budget::Medium => (0.2, 0.3),
                Budget::Full => (1.0, 1.0),
            };
            let m = |kind, width, plain| ModelConfig { width, plain, ..ModelConfig::new(kind, 0) };
            vec![
                ("ir_v2", m(ModelKind::InceptionResnetV2, w2, false)),
                ("v4", m(ModelKind::InceptionV4, w2, false)),
                ("ir_v1", m(ModelKind::InceptionResnetV1Paper, w1, false)),
                ("ir_v1_plain", m(ModelKind::InceptionResnetV1Paper, w1, true)),
            ]
        }
        Experiment::ResidualScaling => {
            // the last stage has 1792 x width filters: 1075 at 0.6
            let width = if budget == Budget::Test {
                0.1
            } else if budget == Budget::Full {
                1.0
            } else {
                0.6
            };
            let m = |s| ModelConfig {
                width,
                residual_scale: Some(s),
                ..ModelConfig::new(ModelKind::InceptionResnetV1Paper, 0)
            };
            vec![("scale_1.0", m(1.0)), ("scale_0.3", m(0.3)), ("scale_0.1", m(0.1))]
        }
    };
    let mut out = Vec::new();
    for (name, model) in arms {
        for &seed in &seeds {
            let mut config = base.clone();
            config.model = model.clone();
            config.seed = seed;
            out.push(Arm { name: name.to_string(), seed, config });
        }
    }
    out
}

/// Parameters and MACs at the experiment's input size, per arm name.
pub fn cost(arms: &[Arm]) -> Vec<(String, usize, u64)> {
    let mut out: Vec<(String, usize, u64)> = Vec::new();
    for a in arms {
        if out.iter().any(|(n, _, _)| n == &a.name) {
            continue;
        }
        let m = Model::new(&ModelConfig { num_classes: 10, ..a.config.model.clone() }, &Device::flex());
        let macs = summarize(&m, a.config.size).map(|s| s.total_macs).unwrap_or(0);
        out.push((a.name.clone(), m.num_params(), macs));
    }
    out
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub arm: String,
    pub seed: u64,
    pub history: Vec<EpochMetrics>,
    pub seconds: f64,
}

/// Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom (1.96 beyond).
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
    2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

/// Mean, sample standard deviation and 95% confidence interval of the mean.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub ci95: (f64, f64),
}

impl Stats {
    /// Of the finite values (`n` = 0 gives NaN everywhere).
    pub fn of(v: &[f64]) -> Self {
        let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let n = v.len();
        if n == 0 {
            return Self { n, mean: f64::NAN, std: f64::NAN, ci95: (f64::NAN, f64::NAN) };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Self { n, mean, std: f64::NAN, ci95: (f64::NAN, f64::NAN) };
        }
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let half = T95.get(n - 2).copied().unwrap_or(1.96) * std / (n as f64).sqrt();
        Self { n, mean, std, ci95: (mean - half, mean + half) }
    }
}

impl std::fmt::Display for Stats {
    /// `mean +- std [lo, hi]` in percent of a fraction.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.n < 2 {
            return write!(f, "{:.1}% (1 run)", self.mean * 100.0);
        }
        write!(
            f,
            "{:.1}% +- {:.1} [{:.1}, {:.1}]",
            self.mean * 100.0,
            self.std * 100.0,
            self.ci95.0 * 100.0,
            self.ci95.1 * 100.0
        )
    }
}

/// Run every arm (each into `out/<arm>_seed<k>/`) and write `results.csv`, `curves.png` and
/// `report.md` into `out`.
/// `progress(run label, step, steps, loss)` is called after every training step.
pub fn run(
    exp: Experiment,
    budget: Budget,
    data: &str,
    out: &Path,
    device: &Device,
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|err| Error::Io { path: out.to_path_buf(), err })?;
    let arms = plan(exp, budget, data);
    let costs = cost(&arms);
    let mut results = Vec::new();
    for a in &arms {
        let dir = out.join(format!("{}_seed{}", a.name, a.seed));
        let t = std::time::Instant::now();
        let label = format!("{} seed {}", a.name, a.seed);
        train(a.config.clone(), &dir, false, device, &mut |s, n, loss| {
            progress(&label, s, n, loss);
            true
        })?;
        let history: Vec<EpochMetrics> = serde_json::from_slice(&crate::weights::read_file(&dir.join("metrics.json"))?)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        results.push(RunResult { arm: a.name.clone(), seed: a.seed, history, seconds: t.elapsed().as_secs_f64() });
    }
    write_report(exp, budget, data, out, &arms, &costs, &results)?;
    Ok(out.join("report.md"))
}

/// The arms of `results` in order of first appearance.
fn arm_names(results: &[RunResult]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in results {
        if !names.contains(&r.arm) {
            names.push(r.arm.clone());
        }
    }
    names
}

/// Mean over an arm's seeds of `f` at each evaluation, against the training step.
fn mean_curve(results: &[RunResult], arm: &str, steps: usize, f: fn(&EpochMetrics) -> f64) -> Vec<(f64, f64)> {
    let runs: Vec<&RunResult> = results.iter().filter(|r| r.arm == arm).collect();
    let len = runs.iter().map(|r| r.history.len()).min().unwrap_or(0);
    (0..len)
        .map(|i| {
            let v: Vec<f64> = runs.iter().map(|r| f(&r.history[i])).collect();
            ((runs[0].history[i].epoch * steps) as f64, Stats::of(&v).mean)
        })
        .collect()
}

/// `curves.png` (+ `.svg`) of an experiment: per arm, the mean over seeds of the eval top-1
/// (left) and of the zero fraction (scaling) or training loss (speed-up) (right), against the
/// training step.
fn plot_results(exp: Experiment, out: &Path, results: &[RunResult], steps: usize) -> Result<()> {
    let names = arm_names(results);
    let seeds = results.iter().filter(|r| Some(&r.arm) == names.first()).count();
    let series = |f: fn(&EpochMetrics) -> f64| -> Vec<plot::Series> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| plot::Series {
                label: format!("{n} (mean of {seeds})"),
                color: plot::PALETTE[i % plot::PALETTE.len()],
                points: mean_curve(results, n, steps.max(1), f),
            })
            .collect()
    };
    let left = plot::Panel {
        title: "Evaluation accuracy".into(),
        x_label: "training step".into(),
        y_label: "eval top-1 (fraction)".into(),
        series: series(|m| m.eval_top1),
        y_range: Some((0.0, 1.0)),
    };
    let right = if exp == Experiment::ResidualScaling {
        plot::Panel {
            title: "Dying network probe (Sec. 3.3)".into(),
            x_label: "training step".into(),
            y_label: "zeros before pooling (fraction)".into(),
            series: series(|m| m.zero_fraction),
            y_range: Some((0.0, 1.0)),
        }
    } else {
        plot::Panel {
            title: "Training loss".into(),
            x_label: "training step".into(),
            y_label: "cross-entropy (nats)".into(),
            series: series(|m| m.train_loss),
            y_range: None,
        }
    };
    let title = format!("inception reproduce {}", serde_json::to_string(&exp).unwrap_or_default().trim_matches('"'));
    plot::panels(&out.join("curves.png"), &title, &[left, right])?;
    Ok(())
}

/// Redraw the plots of a finished experiment folder from its `results.csv` (and each arm's
/// run folder from its metrics).
pub fn replot(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("results.csv"))
        .map_err(|err| Error::Io { path: dir.join("results.csv"), err })?;
    let mut results: Vec<RunResult> = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 8 {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(f64::NAN);
        let seed: u64 = f[1].parse().unwrap_or(0);
        let m = EpochMetrics {
            epoch: f[2].parse().unwrap_or(0),
            lr: 0.0,
            train_loss: num(6),
            train_top1: f64::NAN,
            eval_loss: num(5),
            eval_top1: num(4),
            eval_top5: f64::NAN,
            images_per_s: 0.0,
            seconds: 0.0,
            skipped: 0,
            zero_fraction: num(7),
        };
        match results.iter_mut().find(|r| r.arm == f[0] && r.seed == seed) {
            Some(r) => r.history.push(m),
            None => results.push(RunResult { arm: f[0].to_string(), seed, history: vec![m], seconds: 0.0 }),
        }
    }
    let exp = if results.iter().any(|r| r.arm.starts_with("scale")) {
        Experiment::ResidualScaling
    } else {
        Experiment::ResidualSpeedup
    };
    // steps per evaluation, from the first row's `step` column (empty: one per epoch)
    let steps = text
        .lines()
        .nth(1)
        .and_then(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some(f.get(3)?.parse::<usize>().ok()? / f.get(2)?.parse::<usize>().ok()?.max(1))
        })
        .unwrap_or(1);
    plot_results(exp, dir, &results, steps)?;
    for r in &results {
        let run = dir.join(format!("{}_seed{}", r.arm, r.seed));
        if run.join("metrics.json").exists() {
            crate::train::replot(&run)?;
        }
    }
    Ok(())
}

fn write_report(
    exp: Experiment,
    budget: Budget,
    data: &str,
    out: &Path,
    arms: &[Arm],
    costs: &[(String, usize, u64)],
    results: &[RunResult],
) -> Result<()> {
    let mut csv = String::from("arm,seed,epoch,step,eval_top1,eval_loss,train_loss,zero_fraction\n");
    for r in results {
        let steps = arms.iter().find(|a| a.name == r.arm).and_then(|a| a.config.max_steps);
        for m in &r.history {
            let step = steps.map_or(String::new(), |s| (s * m.epoch).to_string());
            csv += &format!(
                "{},{},{},{},{:.5},{:.5},{:.5},{:.5}\n",
                r.arm, r.seed, m.epoch, step, m.eval_top1, m.eval_loss, m.train_loss, m.zero_fraction
            );
        }
    }
    crate::weights::write_atomic(&out.join("results.csv"), csv.as_bytes())?;
    let cfg = &arms[0].config;
    let steps = cfg.max_steps.unwrap_or(1);
    plot_results(exp, out, results, steps)?;
    let finals = |arm: &str| -> Vec<f64> {
        results.iter().filter(|r| r.arm == arm).filter_map(|r| r.history.last().map(|m| m.eval_top1)).collect()
    };

    let mut md =
        format!("# inception reproduce {}\n\n", serde_json::to_string(&exp).unwrap_or_default().trim_matches('"'));
    md += &format!(
        "Budget `{}`, data `{data}`, {} px, batch {}, {} evaluations{}, lr {} x {} every {} evaluations, \
         gradient clipping {}, seeds {:?} (the same data order for every arm of a seed). Curves: \
         `curves.png` (mean over seeds per arm; left eval top-1, right {}). Raw: `results.csv`, each \
         run's folder. Intervals are 95% Student-t intervals of the mean over seeds.\n\n",
        serde_json::to_string(&budget).unwrap_or_default().trim_matches('"'),
        cfg.size,
        cfg.batch,
        cfg.epochs,
        cfg.max_steps.map_or(String::new(), |s| format!(", one every {s} steps")),
        cfg.lr,
        cfg.lr_decay,
        cfg.lr_decay_epochs,
        cfg.optim.clip_norm.map_or("off".to_string(), |c| format!("at global norm {c}")),
        arms.iter().map(|a| a.seed).collect::<std::collections::BTreeSet<_>>(),
        if exp == Experiment::ResidualScaling { "zero fraction before pooling" } else { "train loss" },
    );
    md += "| arm | model | width | params | MACs | final eval top-1: mean +- std [95% CI] | best | seconds per run |\n\
           |---|---|---|---|---|---|---|---|\n";
    for (name, params, macs) in costs {
        let rs: Vec<&RunResult> = results.iter().filter(|r| &r.arm == name).collect();
        let best = rs.iter().flat_map(|r| r.history.iter().map(|m| m.eval_top1)).fold(0.0, f64::max);
        let secs = Stats::of(&rs.iter().map(|r| r.seconds).collect::<Vec<_>>()).mean;
        let m = arms.iter().find(|a| &a.name == name).map(|a| &a.config.model);
        md += &format!(
            "| {name} | {} | {} | {params} | {macs} | {} | {:.1}% | {secs:.0} |\n",
            m.map_or(String::new(), |m| format!("{}{}", m.model, if m.plain { " (plain)" } else { "" })),
            m.map_or(0.0, |m| m.width),
            Stats::of(&finals(name)),
            best * 100.0
        );
    }
    md += "\n";
    match exp {
        Experiment::ResidualSpeedup => {
            md += "Speed-up measure: training steps until the eval top-1 first reaches 90% of the plain arm's \
                   mean final accuracy, per seed (`-`: not within the run).\n\n\
                   | pair | target | residual: steps per seed | plain: steps per seed | residual faster in | \
                   final top-1 difference (residual - plain), paired by seed |\n|---|---|---|---|---|---|\n";
            for (res, plain) in SPEEDUP_PAIRS {
                if !costs.iter().any(|c| c.0 == res) {
                    continue;
                }
                let target = 0.9 * Stats::of(&finals(plain)).mean;
                let reach = |arm: &str| -> Vec<Option<usize>> {
                    results
                        .iter()
                        .filter(|r| r.arm == arm)
                        .map(|r| r.history.iter().find(|m| m.eval_top1 >= target).map(|m| m.epoch * steps))
                        .collect()
                };
                let (a, b) = (reach(res), reach(plain));
                let show = |v: &[Option<usize>]| {
                    v.iter().map(|x| x.map_or("-".to_string(), |s| s.to_string())).collect::<Vec<_>>().join(", ")
                };
                let faster = a
                    .iter()
                    .zip(&b)
                    .filter(|(x, y)| match (x, y) {
                        (Some(x), Some(y)) => x < y,
                        (Some(_), None) => true,
                        _ => false,
                    })
                    .count();
                let diff: Vec<f64> = finals(res).iter().zip(finals(plain)).map(|(x, y)| x - y).collect();
                md += &format!(
                    "| {res} vs {plain} | {:.1}% | {} | {} | {faster} of {} seeds | {} |\n",
                    target * 100.0,
                    show(&a),
                    show(&b),
                    a.len(),
                    Stats::of(&diff)
                );
            }
        }
        Experiment::ResidualScaling => {
            md += "Zero fraction before the final pooling, probed at every evaluation (a run is dead once it \
                   exceeds 99%):\n\n| arm | dead runs | final zero fraction (mean) | trajectory of the mean |\n\
                   |---|---|---|---|\n";
            for (name, _, _) in costs {
                let rs: Vec<&RunResult> = results.iter().filter(|r| &r.arm == name).collect();
                let dead = rs.iter().filter(|r| r.history.iter().any(|m| m.zero_fraction > 0.99)).count();
                let last: Vec<f64> = rs.iter().filter_map(|r| r.history.last().map(|m| m.zero_fraction)).collect();
                let path: Vec<String> = mean_curve(results, name, steps, |m| m.zero_fraction)
                    .iter()
                    .map(|p| format!("{:.3}", p.1))
                    .collect();
                md += &format!(
                    "| {name} | {dead} of {} | {:.3} | {} |\n",
                    rs.len(),
                    Stats::of(&last).mean,
                    path.join(" ")
                );
            }
        }
    }
    crate::weights::write_atomic(&out.join("report.md"), md.as_bytes())
}
