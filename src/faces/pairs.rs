//! Face verification on a pairs file with the LFW protocol (as davidsandberg/facenet's
//! `lfw.evaluate`): pairs split in order into 10 folds; for each, the distance threshold with
//! the best accuracy on the other 9 is applied to it; accuracy mean +- std over the folds,
//! validation rate at a false accept rate of 1e-3, and the ROC averaged over folds.
//!
//! Pairs files: LFW's `pairs.txt` (`name n1 n2` = same person, `name1 n1 name2 n2` =
//! different; images at `ROOT/name/name_0001.jpg`; an optional `folds count` header line), or
//! one pair per line `PATH_A PATH_B 1|0` (paths relative to ROOT; 1 = same person).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Pipeline, align};
use crate::error::{Error, Result};
use crate::preprocess;
use crate::train::plot::{self, Panel, Series};

#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub a: PathBuf,
    pub b: PathBuf,
    pub same: bool,
}

fn lfw_path(root: &Path, name: &str, n: &str) -> Result<PathBuf> {
    let n: usize = n.parse().map_err(|_| Error::Invalid(format!("'{n}' is not an image number")))?;
    let stem = format!("{name}_{n:04}");
    let dir = root.join(name);
    for ext in ["jpg", "png", "jpeg"] {
        let p = dir.join(format!("{stem}.{ext}"));
        if p.exists() {
            return Ok(p);
        }
    }
    Ok(dir.join(format!("{stem}.jpg")))
}

/// Read a pairs file (either format; see the module header).
pub fn read_pairs(path: &Path, root: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
    let mut pairs = Vec::new();
    let is_int = |s: &str| s.parse::<usize>().is_ok();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = |why: &str| Error::Invalid(format!("{}:{}: {why}: '{line}'", path.display(), i + 1));
        let pair = match f[..] {
            [] => continue,
            [a, b] if i == 0 && is_int(a) && is_int(b) => continue, // LFW header: folds, pairs per fold
            [name, n1, n2] if is_int(n1) && is_int(n2) => {
                Pair { a: lfw_path(root, name, n1)?, b: lfw_path(root, name, n2)?, same: true }
            }
            [a, n1, b, n2] if is_int(n1) && is_int(n2) => {
                Pair { a: lfw_path(root, a, n1)?, b: lfw_path(root, b, n2)?, same: false }
            }
            [a, b, s] => {
                let same = match s {
                    "1" | "same" | "true" => true,
                    "0" | "different" | "false" => false,
                    _ => return Err(bad("the third field must be 1 (same person) or 0")),
                };
                Pair { a: root.join(a), b: root.join(b), same }
            }
            _ => return Err(bad("expected 'name n1 n2', 'name1 n1 name2 n2' or 'path_a path_b 1|0'")),
        };
        pairs.push(pair);
    }
    let same = pairs.iter().filter(|p| p.same).count();
    if same == 0 || same == pairs.len() {
        return Err(Error::Invalid(format!(
            "{}: {} pairs, {same} of the same person: the protocol needs both kinds",
            path.display(),
            pairs.len()
        )));
    }
    Ok(pairs)
}

/// `(true accept rate, false accept rate, accuracy)` of `distance < t`.
fn rates(d: &[f32], same: &[bool], idx: &[usize], t: f32) -> (f64, f64, f64) {
    let (mut tp, mut fp, mut tn, mut fn_) = (0usize, 0usize, 0usize, 0usize);
    for &i in idx {
        match (d[i] < t, same[i]) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let r = |a: usize, b: usize| if a + b == 0 { 0.0 } else { a as f64 / (a + b) as f64 };
    (r(tp, fn_), r(fp, tn), (tp + tn) as f64 / idx.len().max(1) as f64)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (m, (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64).sqrt())
}

/// The protocol's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct PairsReport {
    pub pairs: usize,
    pub same: usize,
    pub folds: usize,
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    /// Best threshold on each fold's training part (Euclidean distance).
    pub thresholds: Vec<f32>,
    pub far_target: f64,
    pub val_mean: f64,
    pub val_std: f64,
    pub far_mean: f64,
    /// Area under the mean ROC.
    pub auc: f64,
    /// Images in which no face was found (their central square was embedded instead).
    pub no_face: Vec<String>,
    pub roc_csv: PathBuf,
    pub roc_png: PathBuf,
}

/// Threshold grid on the Euclidean distance of unit vectors (0 to 2).
fn grid(step: f32) -> Vec<f32> {
    (0..=(2.0 / step).round() as usize).map(|i| i as f32 * step).collect()
}

/// Run the protocol on distances (`same[i]`: pair `i` is one person); ROC written to `out`.
pub fn evaluate(d: &[f32], same: &[bool], out: &Path) -> Result<PairsReport> {
    let n = d.len();
    if n < 2 || d.iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!("{n} pairs (with finite distances) are too few for the protocol")));
    }
    let k = n.min(10);
    // KFold without shuffling: the first n % k folds get one pair more
    let mut folds = Vec::new();
    let mut start = 0;
    for f in 0..k {
        let len = n / k + usize::from(f < n % k);
        folds.push((start..start + len).collect::<Vec<usize>>());
        start += len;
    }
    let ts = grid(0.005);
    let fine = grid(0.0005);
    let far_target = 1e-3;
    let (mut acc, mut best, mut val, mut far) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut roc = vec![(0.0f64, 0.0f64); ts.len()];
    for (f, test) in folds.iter().enumerate() {
        let train: Vec<usize> =
            folds.iter().enumerate().filter(|(g, _)| *g != f).flat_map(|(_, v)| v.clone()).collect();
        let train = if train.is_empty() { test.clone() } else { train };
        // first threshold with the best training accuracy
        let (mut bi, mut ba) = (0, -1.0);
        for (i, &t) in ts.iter().enumerate() {
            let a = rates(d, same, &train, t).2;
            if a > ba {
                (bi, ba) = (i, a);
            }
            let (tpr, fpr, _) = rates(d, same, test, t);
            roc[i].0 += tpr / k as f64;
            roc[i].1 += fpr / k as f64;
        }
        best.push(ts[bi]);
        acc.push(rates(d, same, test, ts[bi]).2);
        // validation rate: the threshold where the training FAR reaches the target
        let fars: Vec<f64> = fine.iter().map(|&t| rates(d, same, &train, t).1).collect();
        let t = match fars.iter().rposition(|&v| v <= far_target) {
            _ if fars.iter().copied().fold(0.0, f64::max) < far_target => 0.0,
            Some(i) if i + 1 < fine.len() && fars[i + 1] > fars[i] => {
                let w = (far_target - fars[i]) / (fars[i + 1] - fars[i]);
                fine[i] + (fine[i + 1] - fine[i]) * w as f32
            }
            Some(i) => fine[i],
            None => 0.0,
        };
        let (v, fa, _) = rates(d, same, test, t);
        val.push(v);
        far.push(fa);
    }
    let (accuracy_mean, accuracy_std) = mean_std(&acc);
    let (val_mean, val_std) = mean_std(&val);
    // trapezoid over the mean ROC, sorted by FPR
    let mut pts: Vec<(f64, f64)> = roc.iter().map(|&(tpr, fpr)| (fpr, tpr)).collect();
    pts.push((0.0, 0.0));
    pts.push((1.0, 1.0));
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let auc = pts.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum();

    std::fs::create_dir_all(out).map_err(|err| Error::Io { path: out.to_path_buf(), err })?;
    let mut csv = String::from("threshold,tpr,fpr\n");
    for (t, (tpr, fpr)) in ts.iter().zip(&roc) {
        csv += &format!("{t:.3},{tpr:.6},{fpr:.6}\n");
    }
    let (roc_csv, roc_png) = (out.join("roc.csv"), out.join("roc.png"));
    crate::weights::write_atomic(&roc_csv, csv.as_bytes())?;
    let series = Series { label: format!("mean of {k} folds (AUC {auc:.4})"), color: plot::BLUE, points: pts };
    let chance = Series { label: "chance".into(), color: plot::ORANGE, points: vec![(0.0, 0.0), (1.0, 1.0)] };
    plot::panels(
        &roc_png,
        &format!("Face verification ROC: accuracy {:.2}% +- {:.2}", accuracy_mean * 100.0, accuracy_std * 100.0),
        &[Panel {
            title: format!("{n} pairs, {} same person", same.iter().filter(|s| **s).count()),
            x_label: "false accept rate".into(),
            y_label: "true accept rate".into(),
            series: vec![series, chance],
            y_range: Some((0.0, 1.02)),
        }],
    )?;
    Ok(PairsReport {
        pairs: n,
        same: same.iter().filter(|s| **s).count(),
        folds: k,
        accuracy_mean,
        accuracy_std,
        thresholds: best,
        far_target,
        val_mean,
        val_std,
        far_mean: mean_std(&far).0,
        auc,
        no_face: Vec::new(),
        roc_csv,
        roc_png,
    })
}

/// Embed every image of the pairs once (the selected face, else the central square), then run
/// the protocol.
pub fn eval_pairs(p: &Pipeline, pairs: &[Pair], out: &Path, on_image: &mut dyn FnMut()) -> Result<PairsReport> {
    let mut cache: HashMap<&Path, Vec<f32>> = HashMap::new();
    let mut no_face = Vec::new();
    for path in pairs.iter().flat_map(|q| [q.a.as_path(), q.b.as_path()]) {
        if cache.contains_key(path) {
            continue;
        }
        let img = preprocess::load_rgb(path)?;
        let e = match p.best_face(&img)? {
            Some((_, e)) => e,
            None => {
                no_face.push(path.display().to_string());
                let c = align::center_square(&img, p.embedder.size());
                p.embedder.embed(&[c])?.remove(0)
            }
        };
        cache.insert(path, e);
        on_image();
    }
    let d: Vec<f32> = pairs.iter().map(|q| super::distance(&cache[q.a.as_path()], &cache[q.b.as_path()])).collect();
    let same: Vec<bool> = pairs.iter().map(|q| q.same).collect();
    let mut r = evaluate(&d, &same, out)?;
    r.no_face = no_face;
    Ok(r)
}
