//! `inception reproduce`: the paper's two training claims at small scale, from one command.
//!
//! - residual-speedup (paper Figs. 24-26): an Inception-ResNet and its plain counterpart of the
//!   same cost — the same network with the shortcuts removed (`ModelConfig::plain`), so
//!   parameters and MACs match up to the additions — trained with the same recipe and seeds.
//! - residual-scaling (Sec. 3.3): a residual net whose last stage is wider than 1000 filters,
//!   with residual scale 1.0 against 0.1; the fraction of zeros in the last feature map before
//!   pooling is probed every `max_steps` steps ("epochs" here are that short), and a run counts
//!   as dead once it exceeds 99%.

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

/// How much compute: `quick` fits 15 minutes on 2 CPU cores, `full` is meant for a GPU, `test`
/// is a 2-step smoke run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Budget {
    Test,
    Quick,
    Full,
}

/// One training run of an experiment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Arm {
    pub name: String,
    pub seed: u64,
    pub config: TrainConfig,
}

/// The runs of an experiment: a pure function of (experiment, budget, data).
pub fn plan(exp: Experiment, budget: Budget, data: &str) -> Vec<Arm> {
    let mut base = TrainConfig::new(ModelKind::InceptionResnetV1Paper, data);
    base.size = 75;
    base.crop_pct = 1.0;
    base.min_area = 0.5;
    base.batch = 32;
    let seeds: Vec<u64> = match (exp, budget) {
        (_, Budget::Test) | (Experiment::ResidualScaling, Budget::Quick) => vec![1],
        (_, Budget::Quick) => vec![1, 2],
        (_, Budget::Full) => vec![1, 2, 3],
    };
    let (epochs, steps, limit, eval) = match (exp, budget) {
        (_, Budget::Test) => (1, Some(2), Some(64), Some(16)),
        (Experiment::ResidualSpeedup, Budget::Quick) => (3, None, Some(4800), Some(1000)),
        (Experiment::ResidualSpeedup, Budget::Full) => (30, None, None, None),
        (Experiment::ResidualScaling, Budget::Quick) => (15, Some(20), None, Some(256)),
        (Experiment::ResidualScaling, Budget::Full) => (200, Some(100), None, Some(1000)),
    };
    base.epochs = epochs;
    base.max_steps = steps;
    base.train_limit = limit;
    base.eval_limit = eval;
    let arms: Vec<(&str, ModelConfig)> = match exp {
        Experiment::ResidualSpeedup => {
            let width = if budget == Budget::Full { 1.0 } else { 0.25 };
            let m = |plain| ModelConfig { width, plain, ..ModelConfig::new(ModelKind::InceptionResnetV1Paper, 0) };
            vec![("residual", m(false)), ("plain", m(true))]
        }
        Experiment::ResidualScaling => {
            // last stage 1075 filters at width 0.6 (1792 at full width); lr doubled to stress it
            base.lr = 0.09;
            base.optim.clip_norm = None;
            let width = match budget {
                Budget::Test => 0.1,
                Budget::Quick => 0.6,
                Budget::Full => 1.0,
            };
            let m = |s| ModelConfig {
                width,
                residual_scale: Some(s),
                ..ModelConfig::new(ModelKind::InceptionResnetV1Paper, 0)
            };
            vec![("scale_1.0", m(1.0)), ("scale_0.1", m(0.1))]
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

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
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

/// `curves.png` (+ `.svg`) of an experiment: eval accuracy per arm and seed, and the zero
/// fraction (scaling) or the training loss (speed-up).
fn plot_results(exp: Experiment, out: &Path, results: &[RunResult]) -> Result<()> {
    let mut names: Vec<&String> = results.iter().map(|r| &r.arm).collect();
    names.dedup();
    let colour = |arm: &str| plot::PALETTE[names.iter().position(|n| *n == arm).unwrap_or(0) % plot::PALETTE.len()];
    let scaling = exp == Experiment::ResidualScaling;
    let series = |f: fn(&EpochMetrics) -> f64| -> Vec<plot::Series> {
        results
            .iter()
            .map(|r| {
                plot::Series::per_epoch(
                    &format!("{} (seed {})", r.arm, r.seed),
                    colour(&r.arm),
                    r.history.iter().map(f),
                )
            })
            .collect()
    };
    let left = plot::Panel {
        title: "Evaluation accuracy".into(),
        x_label: "epoch".into(),
        y_label: "eval top-1 (fraction)".into(),
        series: series(|m| m.eval_top1),
        y_range: Some((0.0, 1.0)),
    };
    let right = if scaling {
        plot::Panel {
            title: "Dying network probe (Sec. 3.3)".into(),
            x_label: "epoch".into(),
            y_label: "zeros before pooling (fraction)".into(),
            series: series(|m| m.zero_fraction),
            y_range: Some((0.0, 1.0)),
        }
    } else {
        plot::Panel {
            title: "Training loss".into(),
            x_label: "epoch".into(),
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
    plot_results(exp, dir, &results)?;
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
    // curves: eval top-1 (left) and, for scaling, zero fraction / for speedup, train loss (right)
    plot_results(exp, out, results)?;
    let names: Vec<&String> = costs.iter().map(|(n, _, _)| n).collect();

    let mut md =
        format!("# inception reproduce {}\n\n", serde_json::to_string(&exp).unwrap_or_default().trim_matches('"'));
    let cfg = &arms[0].config;
    md += &format!(
        "Budget `{}`, data `{data}`, {} px, batch {}, {} epoch(s){}{}, lr {} x {} every {} epochs, seeds {:?}. \
         Curves: `curves.png` (left: eval top-1 per epoch; right: {}), {} = {}, {} = {}. Raw: `results.csv`, \
         each run's folder.\n\n",
        serde_json::to_string(&budget).unwrap_or_default().trim_matches('"'),
        cfg.size,
        cfg.batch,
        cfg.epochs,
        cfg.max_steps.map_or(String::new(), |s| format!(" of {s} steps")),
        cfg.train_limit.map_or(String::new(), |n| format!(" on a fixed {n}-image subset")),
        cfg.lr,
        cfg.lr_decay,
        cfg.lr_decay_epochs,
        arms.iter().map(|a| a.seed).collect::<std::collections::BTreeSet<_>>(),
        if exp == Experiment::ResidualScaling { "zero fraction before pooling" } else { "train loss" },
        names.first().map_or("", |s| s.as_str()),
        "blue",
        names.get(1).map_or("", |s| s.as_str()),
        "orange",
    );
    md += "| arm | params | MACs | final eval top-1 (mean +- std) | best eval top-1 | seconds per run |\n|---|---|---|---|---|---|\n";
    for (name, params, macs) in costs {
        let rs: Vec<&RunResult> = results.iter().filter(|r| &r.arm == name).collect();
        let finals: Vec<f64> = rs.iter().filter_map(|r| r.history.last().map(|m| m.eval_top1)).collect();
        let best = rs.iter().flat_map(|r| r.history.iter().map(|m| m.eval_top1)).fold(0.0, f64::max);
        let (m, s) = mean_std(&finals);
        let secs = mean_std(&rs.iter().map(|r| r.seconds).collect::<Vec<_>>()).0;
        md += &format!("| {name} | {params} | {macs} | {m:.4} +- {s:.4} | {best:.4} | {secs:.0} |\n");
    }
    md += "\n";
    match exp {
        Experiment::ResidualSpeedup => {
            let finals = |arm: &str| -> f64 {
                mean_std(
                    &results
                        .iter()
                        .filter(|r| r.arm == arm)
                        .filter_map(|r| r.history.last().map(|m| m.eval_top1))
                        .collect::<Vec<_>>(),
                )
                .0
            };
            let target = 0.95 * names.iter().map(|n| finals(n)).fold(f64::INFINITY, f64::min);
            md += &format!(
                "Epochs to reach {:.1}% eval top-1 (95% of the weaker arm's final accuracy), per seed:\n\n",
                target * 100.0
            );
            for n in &names {
                let reach: Vec<String> = results
                    .iter()
                    .filter(|r| &&r.arm == n)
                    .map(|r| {
                        r.history
                            .iter()
                            .find(|m| m.eval_top1 >= target)
                            .map_or("not reached".into(), |m| m.epoch.to_string())
                    })
                    .collect();
                md += &format!("- {n}: {}\n", reach.join(", "));
            }
        }
        Experiment::ResidualScaling => {
            md += "Zero fraction before the final pooling (probed every epoch of the run):\n\n";
            for r in results {
                let died = r.history.iter().find(|m| m.zero_fraction > 0.99);
                let path: Vec<String> = r.history.iter().map(|m| format!("{:.3}", m.zero_fraction)).collect();
                md += &format!(
                    "- {} seed {}: {} (trajectory {})\n",
                    r.arm,
                    r.seed,
                    died.map_or("did not die".to_string(), |m| format!("died by epoch {}", m.epoch)),
                    path.join(" ")
                );
            }
        }
    }
    crate::weights::write_atomic(&out.join("report.md"), md.as_bytes())
}
