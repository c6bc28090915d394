//! `summary`: per stage output shape, parameters and multiply-accumulates at a given input size.

use serde::Serialize;

use crate::error::Result;
use crate::models::{Model, stage_of_key};
use crate::weights::param_shapes;

#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub name: String,
    pub output: Vec<usize>,
    pub params: usize,
    pub macs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: String,
    pub input_size: usize,
    pub stages: Vec<StageRow>,
    pub total_params: usize,
    pub total_macs: u64,
}

/// Smallest input every network accepts (three stride-2 VALID reductions after the stem).
pub use crate::preprocess::MIN_INPUT;

/// Per stage output shape, parameters and MACs at `size` px, from the trunk description: the
/// parameters by `stage_of_key`, shapes and MACs from the lowered graph (no forward pass).
pub fn summarize(model: &Model, size: usize) -> Result<Summary> {
    crate::preprocess::check_size(size)?;
    let kind = model.kind();
    let info = model.feature_info();
    let mut params = vec![0usize; info.len() + 1];
    for (key, shape) in param_shapes(model) {
        if key.ends_with("running_mean") || key.ends_with("running_var") {
            continue;
        }
        let s = stage_of_key(kind, &key).unwrap_or(info.len());
        params[s] += shape.iter().product::<usize>();
    }
    let engine = crate::lower::lower(model.clone());
    let names = info.iter().map(|f| f.module.clone()).chain(["head".to_string()]);
    let stages: Vec<StageRow> = engine
        .shapes_and_macs(size)
        .into_iter()
        .zip(names)
        .zip(params)
        .map(|(((output, macs), name), params)| StageRow { name, output, params, macs })
        .collect();
    Ok(Summary {
        model: kind.name().to_string(),
        input_size: size,
        total_params: stages.iter().map(|r| r.params).sum(),
        total_macs: stages.iter().map(|r| r.macs).sum(),
        stages,
    })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} at {}x{}", self.model, self.input_size, self.input_size)?;
        writeln!(f, "{:<12} {:>20} {:>14} {:>16}", "stage", "output", "params", "MACs")?;
        for r in &self.stages {
            let shape = r.output.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
            writeln!(f, "{:<12} {:>20} {:>14} {:>16}", r.name, shape, group(r.params as u64), group(r.macs))?;
        }
        write!(f, "{:<12} {:>20} {:>14} {:>16}", "total", "", group(self.total_params as u64), group(self.total_macs))
    }
}

/// 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
