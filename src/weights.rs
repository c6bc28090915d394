//! Strict safetensors import and export with the reference key names.
//!
//! A parameter's key is its burn module path with three rules: enum variants are invisible
//! (`features.6.branch0` rather than `features.6.InceptionA.branch0`), BatchNorm `gamma`/`beta`
//! are `weight`/`bias`, and linear weights are stored `[out, in]` as PyTorch does (burn keeps
//! `[in, out]`). The only renaming beyond that is `key_remap` below.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, KeyProblem, Result};
use crate::models::{Model, ModelKind};

/// Checkpoint names that differ from our field names: facenet-pytorch numbers its residual
/// stages from 1 (`repeat_1..3`), timm's IR-v2 (whose names our fields use) from 0
/// (`repeat`, `repeat_1`, `repeat_2`).
fn key_remap(kind: ModelKind) -> &'static [(&'static str, &'static str)] {
    match kind {
        ModelKind::InceptionResnetV1 => &[("repeat_2", "repeat_3"), ("repeat_1", "repeat_2"), ("repeat", "repeat_1")],
        _ => &[],
    }
}

/// Checkpoint key -> our field path (the inverse of `key_remap` on the first segment).
pub fn field_of_key(kind: ModelKind, key: &str) -> String {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    match key_remap(kind).iter().find(|(_, to)| *to == first) {
        Some((from, _)) if rest.is_empty() => from.to_string(),
        Some((from, _)) => format!("{from}.{rest}"),
        None => key.to_string(),
    }
}

/// Our module path -> checkpoint key.
fn checkpoint_key(remap: &[(&str, &str)], path: &[String]) -> String {
    let mut parts: Vec<String> = path.to_vec();
    if let Some(first) = parts.first_mut()
        && let Some((_, to)) = remap.iter().find(|(from, _)| first == from)
    {
        *first = to.to_string();
    }
    if let Some(last) = parts.last_mut() {
        match last.as_str() {
            "gamma" => *last = "weight".into(),
            "beta" => *last = "bias".into(),
            _ => {}
        }
    }
    parts.join(".")
}

/// Is this a linear weight (stored transposed in checkpoints)?
pub(crate) fn is_linear_weight(key: &str, rank: usize) -> bool {
    rank == 2 && key.ends_with(".weight")
}

/// `enter_module` / `exit_module` for a visitor or mapper with a `tracker: PathTracker`.
macro_rules! track_paths {
    () => {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.tracker.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.tracker.exit();
        }
    };
}
pub(crate) use track_paths;

/// Tracks the checkpoint key of the parameter being visited (see the module docs).
#[derive(Default)]
pub(crate) struct PathTracker {
    path: Vec<String>,
    /// Depth of each entered module, `false` when it was an enum variant (not pushed).
    pushed: Vec<bool>,
}

impl PathTracker {
    pub(crate) fn enter(&mut self, name: &str, container: &str) {
        let push = !container.starts_with("Enum:");
        if push {
            self.path.push(name.to_string());
        }
        self.pushed.push(push);
    }
    pub(crate) fn exit(&mut self) {
        if self.pushed.pop() == Some(true) {
            self.path.pop();
        }
    }
    pub(crate) fn leaf(&self, kind: ModelKind) -> String {
        checkpoint_key(key_remap(kind), &self.path)
    }
}

struct ShapeCollector {
    kind: ModelKind,
    tracker: PathTracker,
    out: Vec<(String, Vec<usize>)>,
}

impl ModuleVisitor for ShapeCollector {
    track_paths!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let key = self.tracker.leaf(self.kind);
        let mut shape = param.lazy_shape().to_vec();
        if is_linear_weight(&key, D) {
            shape.reverse();
        }
        self.out.push((key, shape));
    }
}

/// Every float tensor of the model (parameters and BN running statistics) as
/// `(checkpoint key, checkpoint shape)`, in module order.
pub fn param_shapes(model: &Model) -> Vec<(String, Vec<usize>)> {
    let mut v = ShapeCollector { kind: model.kind(), tracker: PathTracker::default(), out: Vec::new() };
    model.visit(&mut v);
    v.out
}

/// The keys of a module's float tensors (relative to the module, no layout remap), in visit
/// order.
pub fn keys_of<M: Module>(m: &M) -> Vec<String> {
    let mut v = ShapeCollector { kind: ModelKind::InceptionV4, tracker: PathTracker::default(), out: Vec::new() };
    m.visit(&mut v);
    v.out.into_iter().map(|(k, _)| k).collect()
}

/// Options of `load`.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The user asked for a class count other than the file's: classifier tensors of the file
    /// are ignored and the model keeps its fresh classifier.
    pub new_classifier: bool,
}

/// Key prefix of the classifier in the reference checkpoints (`last_linear.`, `classif.`, `logits.`).
pub fn classifier_prefix(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::InceptionV4 => "last_linear.",
        ModelKind::InceptionResnetV2 => "classif.",
        ModelKind::InceptionResnetV1 => "logits.",
        ModelKind::InceptionResnetV2Paper | ModelKind::InceptionResnetV1Paper => "classif.",
    }
}

/// A float tensor read from a file, converted to f32.
pub struct FileTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let b = view.data();
    let v = match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
        _ => return None,
    };
    Some(v)
}

/// Read a whole safetensors file; header and offsets are validated by the `safetensors` crate.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })
}

pub fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })
}

/// One float tensor of a parsed file, converted to f32.
pub fn tensor_f32(path: &Path, st: &SafeTensors<'_>, key: &str) -> Result<FileTensor> {
    let view = st.tensor(key).map_err(|_| Error::MissingTensor { path: path.to_path_buf(), key: key.to_string() })?;
    let data = to_f32(&view).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: tensor '{key}' has dtype {:?}, expected a float type",
            path.display(),
            view.dtype()
        ))
    })?;
    Ok(FileTensor { shape: view.shape().to_vec(), data })
}

/// NaN / inf anywhere, or a negative BatchNorm variance: such a file would load and then
/// predict garbage (NaN vanishes at the first ReLU of the fast engine).
pub fn value_problem(key: &str, data: &[f32]) -> Option<KeyProblem> {
    let count = data.iter().filter(|v| !v.is_finite()).count();
    if count > 0 {
        let first = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Some(KeyProblem::NonFinite { key: key.to_string(), count, first });
    }
    if key.ends_with("running_var")
        && let Some(index) = data.iter().position(|v| *v < 0.0)
    {
        return Some(KeyProblem::NegativeVariance { key: key.to_string(), value: data[index], index });
    }
    None
}

/// Check a file against the model strictly: every problem is collected into one error.
fn check(model: &Model, path: &Path, st: &SafeTensors<'_>, opts: &LoadOptions) -> Result<HashMap<String, FileTensor>> {
    let kind = model.kind();
    let skip_head = |k: &str| opts.new_classifier && k.starts_with(classifier_prefix(kind));
    let expected = param_shapes(model);
    let mut problems = Vec::new();
    let mut tensors = HashMap::new();
    for (key, exp) in &expected {
        if skip_head(key) {
            continue;
        }
        match st.tensor(key) {
            Err(_) => problems.push(KeyProblem::Missing { key: key.clone(), expected: exp.clone() }),
            Ok(view) => {
                if view.shape() != exp.as_slice() {
                    problems.push(KeyProblem::Shape {
                        key: key.clone(),
                        expected: exp.clone(),
                        found: view.shape().to_vec(),
                    });
                } else if let Some(data) = to_f32(&view) {
                    if let Some(p) = value_problem(key, &data) {
                        problems.push(p);
                    }
                    tensors.insert(key.clone(), FileTensor { shape: exp.clone(), data });
                } else {
                    problems.push(KeyProblem::Dtype { key: key.clone(), dtype: format!("{:?}", view.dtype()) });
                }
            }
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        if known.contains(name.as_str()) || name.ends_with("num_batches_tracked") || skip_head(&name) {
            continue;
        }
        let found = st.tensor(&name).map(|v| v.shape().to_vec()).unwrap_or_default();
        problems.push(KeyProblem::Unexpected { key: name, found });
    }
    if problems.is_empty() {
        Ok(tensors)
    } else {
        Err(Error::WeightMismatch { path: path.to_path_buf(), model: kind.name().to_string(), problems })
    }
}

/// `(checkpoint key, checkpoint shape) -> data`, `None` to keep the current value.
pub type TensorSource<'a> = dyn FnMut(&str, &[usize]) -> Option<Vec<f32>> + 'a;

/// Replaces every float tensor whose checkpoint key the source knows.
struct Applier<'a> {
    remap: &'static [(&'static str, &'static str)],
    tracker: PathTracker,
    source: &'a mut TensorSource<'a>,
}

impl ModuleMapper for Applier<'_> {
    track_paths!();
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = checkpoint_key(self.remap, &self.tracker.path);
        let linear = is_linear_weight(&key, D);
        let mut shape = param.lazy_shape().to_vec();
        if linear {
            shape.reverse();
        }
        let Some(mut data) = (self.source)(&key, &shape) else { return param };
        let device = param.lazy_device();
        let id = param.id;
        if linear {
            // [out, in] -> [in, out], written out contiguously: a transposed view would run
            // other kernels than the updated weights of a live run, and a resumed run must
            // compute exactly what the uninterrupted one did
            let (o, i) = (shape[0], shape[1]);
            let mut t = vec![0f32; data.len()];
            for r in 0..o {
                for c in 0..i {
                    t[c * o + r] = data[r * i + c];
                }
            }
            data = t;
            shape.reverse();
        }
        let tensor = Tensor::<D>::from_data(TensorData::new(data, shape), &device);
        param.transform_for_load(tensor, id)
    }
}

/// Set the tensors of any module from `source(checkpoint key, checkpoint shape)`; tensors for
/// which it returns `None` keep their value. The data must have the shape's element count.
pub fn fill<M: Module>(module: M, source: &mut TensorSource<'_>) -> M {
    let mut applier = Applier { remap: &[], tracker: PathTracker::default(), source };
    module.map(&mut applier)
}

/// `fill` for a whole model: keys as in its checkpoints (including `key_remap`).
pub fn fill_model(model: Model, source: &mut TensorSource<'_>) -> Model {
    let mut applier = Applier { remap: key_remap(model.kind()), tracker: PathTracker::default(), source };
    model.map(&mut applier)
}

/// Load a safetensors file into `model` strictly (see `LoadOptions`).
pub fn load(model: Model, path: &Path, opts: &LoadOptions) -> Result<Model> {
    load_bytes(model, &read_file(path)?, path, opts)
}

/// `load` from bytes already in memory (`path` names them in errors).
pub fn load_bytes(model: Model, bytes: &[u8], path: &Path, opts: &LoadOptions) -> Result<Model> {
    let st = parse(path, bytes)?;
    let mut tensors = check(&model, path, &st, opts)?;
    let mut source = |key: &str, _: &[usize]| tensors.remove(key).map(|t| t.data);
    let mut applier = Applier { remap: key_remap(model.kind()), tracker: PathTracker::default(), source: &mut source };
    Ok(model.map(&mut applier))
}

struct Exporter {
    kind: ModelKind,
    tracker: PathTracker,
    out: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Exporter {
    track_paths!();
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let key = self.tracker.leaf(self.kind);
        let mut t = param.val();
        if is_linear_weight(&key, D) {
            t = t.transpose();
        }
        let shape = t.dims().to_vec();
        let data = t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        self.out.insert(key, (shape, data));
    }
}

/// All tensors of the model under their checkpoint keys, `[out, in]` linears.
pub fn export_tensors(model: &Model) -> Tensors {
    let mut e = Exporter { kind: model.kind(), tracker: PathTracker::default(), out: BTreeMap::new() };
    model.visit(&mut e);
    e.out
}

/// Named f32 tensors with their shapes, as written by `save_tensors`.
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Write f32 tensors to a safetensors file atomically (temp file in the same folder + rename),
/// with string metadata (e.g. the model config as JSON).
pub fn save_tensors(path: &Path, tensors: &Tensors, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            let bytes: &[u8] = bytemuck_f32(data);
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor '{k}': {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::Safetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    write_atomic(path, &bytes)
}

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; the slice covers exactly the data.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

/// Write bytes to `path` via a temporary file in the same directory and a rename, so a crash
/// never leaves a half-written file under the final name. The temporary file is removed on
/// every error path; ones left by killed processes (dead pid) are swept first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |err| Error::Io { path: path.to_path_buf(), err };
    if path.is_dir() {
        return Err(Error::Invalid(format!("{} is a folder; give a file name", path.display())));
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    sweep_stale_temps(dir);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Is process `pid` alive? (Linux: `/proc/PID`; elsewhere assumed alive.)
pub fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove `.NAME.PID.tmp` files in `dir` whose writer is no longer running.
pub fn sweep_stale_temps(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let Some(stem) = n.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else { continue };
        let Some(pid) = stem.rsplit('.').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// An exclusive claim on a folder (`.lock` holding our pid), released on drop. A lock whose
/// holder is no longer running is taken over.
pub struct DirLock {
    path: std::path::PathBuf,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::io::Write;
        let path = dir.join(".lock");
        for _ in 0..3 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    let _ = f.sync_all();
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if pid != std::process::id() && pid_alive(pid) => {
                            return Err(Error::Invalid(format!(
                                "{} is in use by another run (pid {pid}); wait for it or use another --out",
                                dir.display()
                            )));
                        }
                        // dead holder, or a lock being written right now: take over / retry
                        _ => {
                            if holder.is_some() {
                                let _ = std::fs::remove_file(&path);
                            } else {
                                std::thread::sleep(std::time::Duration::from_millis(50));
                                if std::fs::read_to_string(&path).map(|s| s.trim().is_empty()).unwrap_or(false) {
                                    let _ = std::fs::remove_file(&path);
                                }
                            }
                        }
                    }
                }
                Err(err) => return Err(Error::Io { path, err }),
            }
        }
        Err(Error::Invalid(format!("{}: could not take the run lock", dir.display())))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The JSON header of a safetensors file, read without its tensor data (the full validation
/// happens in `parse` when the tensors are loaded).
pub fn read_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let bad = |reason: String| Error::Safetensors { path: path.to_path_buf(), reason };
    let mut f = std::fs::File::open(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("no header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(bad(format!("header length {n} is too large")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("truncated header: {e}")))?;
    serde_json::from_slice(&header).map_err(|e| bad(format!("header is not a JSON object: {e}")))
}

/// One string entry of the file's `__metadata__`, from the header alone.
pub fn read_metadata_entry(path: &Path, key: &str) -> Result<Option<String>> {
    let header = read_header(path)?;
    Ok(header.get("__metadata__").and_then(|m| m.get(key)).and_then(|v| v.as_str()).map(str::to_string))
}

/// The shape of tensor `key` in a header read by `read_header` (`None`: no such tensor).
pub fn header_shape(header: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<Vec<usize>> {
    header
        .get(key)
        .and_then(|t| t.get("shape"))
        .and_then(|s| s.as_array())
        .map(|dims| dims.iter().filter_map(|d| d.as_u64()).map(|d| d as usize).collect())
}

/// Save the model's weights with the reference key names (loadable by timm / facenet-pytorch
/// `load_state_dict(strict=False)` and by `load`), described by its config, preprocessing and
/// class names in the metadata (see `bundle`).
pub fn save_model(model: &Model, path: &Path, pre: &crate::preprocess::Preprocess, classes: &[String]) -> Result<()> {
    let meta = crate::bundle::metadata(&model.config(), pre, classes);
    save_tensors(path, &export_tensors(model), Some(meta))
}
