//! Sparse fine-tuning as SpIEL does it (Ansell et al., 2024, "Scaling Sparse Fine-Tuning to
//! Large Language Models"): each target matrix W keeps a set of active entries and their
//! deltas δ from the pretrained value; the forward uses `W + scatter(δ)` (`ops::sparse_linear`,
//! W untouched and frozen), only δ is trained. Every few steps the active set changes: the
//! entries with the smallest |δ| are dropped (their weight returns to the pretrained value)
//! and as many inactive ones are grown, the highest-scoring by SM3's accumulators
//! (`r_i · c_j`, SpIEL's momentum approximation) or by accumulated gradients (`|Σ dW|` over the
//! last steps before the change). The fraction changed decays linearly to 0 over training.
//!
//! Trained state is proportional to the active entries: δ, plus per entry what the optimizer
//! keeps (AdamW two floats, SM3 momentum one), plus SM3's R + C accumulators per matrix.
//! Gradient regrowth holds a dense `[R, C]` gradient sum per matrix during its window only.
//!
//! File: `sparse_deltas.safetensors` with `<module>.weight.indices` (i32, sorted flat indices
//! into the `[out, in]` weight) and `<module>.weight.values` (f32), module names as in
//! transformers (`model.layers.0.self_attn.q_proj`); metadata `format = tuna-sparse-delta`.
//! Applying it: `W.view(-1)[indices] += values`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::io::safetensors::{save, WeightFiles};
use crate::nn::llama::{SparseDelta, LINEAR_MODULES};
use crate::nn::Llama;
use crate::rng::Rng;
use crate::{DType, Device, Error, Result, Tensor};

pub const DELTAS_FILE: &str = "sparse_deltas.safetensors";

/// How inactive entries are scored for regrowth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regrow {
    /// `r_i · c_j` from SM3's row and column accumulators (needs `--optimizer sm3`).
    Sm3,
    /// `|Σ dW|`, the dense gradient summed over the steps of the window before a change.
    Grad,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SparseConfig {
    /// Fraction of each target matrix that is active (trained).
    pub density: f32,
    /// Steps between changes of the active set (0: never).
    pub reselect_every: usize,
    /// Fraction of the active entries changed at the first change; decays linearly to 0.
    pub reselect_rate: f32,
    pub regrow: Regrow,
    /// Steps before a change over which `Regrow::Grad` sums gradients.
    pub grad_window: usize,
    pub target_modules: Vec<String>,
}

impl Default for SparseConfig {
    fn default() -> Self {
        SparseConfig {
            density: 0.01,
            reselect_every: 20,
            reselect_rate: 0.2,
            regrow: Regrow::Sm3,
            grad_window: 5,
            target_modules: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl SparseConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(Error::InvalidArgument(format!("sparse density must be in (0, 1], got {}", self.density)));
        }
        if !(0.0..=1.0).contains(&self.reselect_rate) {
            return Err(Error::InvalidArgument(format!("reselect rate must be in [0, 1], got {}", self.reselect_rate)));
        }
        for m in &self.target_modules {
            if !LINEAR_MODULES.contains(&m.as_str()) {
                return Err(Error::InvalidArgument(format!("sparse target module `{m}` is not one of {LINEAR_MODULES:?}")));
            }
        }
        Ok(())
    }

    /// Active entries of an `[rows, cols]` matrix.
    pub fn active(&self, rows: usize, cols: usize) -> usize {
        ((self.density as f64 * (rows * cols) as f64).round() as usize).clamp(1, rows * cols)
    }

    /// Entries to change at step `step` of `total`: `rate·(1 - step/total)` of the active ones.
    pub fn changes(&self, nnz: usize, step: usize, total: usize) -> usize {
        let frac = self.reselect_rate as f64 * (1.0 - step as f64 / total.max(1) as f64).max(0.0);
        (frac * nnz as f64).round() as usize
    }
}

/// `n` distinct sorted flat indices below `len`, uniformly (Floyd's algorithm).
pub fn random_indices(len: usize, n: usize, rng: &mut Rng) -> Vec<u32> {
    let mut chosen = std::collections::HashSet::with_capacity(n);
    for j in len - n..len {
        let t = rng.below(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<u32> = chosen.into_iter().map(|i| i as u32).collect();
    v.sort_unstable();
    v
}

/// A change of the active set: the new sorted indices, and (old position, new position) of
/// every entry kept.
#[derive(Clone, Debug, PartialEq)]
pub struct Reselection {
    pub indices: Vec<u32>,
    pub moves: Vec<(usize, usize)>,
}

/// Drops the `n` active entries with the smallest |δ| and grows the `n` inactive entries (of
/// a matrix with `len` elements) with the largest `score`; ties go to the lower index, so the
/// result is a function of its inputs. Entries dropped now are not candidates for growth.
pub fn reselect(indices: &[u32], values: &[f32], len: usize, n: usize, score: impl Fn(u32) -> f32 + Sync) -> Reselection {
    use rayon::prelude::*;
    let n = n.min(indices.len()).min(len - indices.len());
    if n == 0 {
        return Reselection { indices: indices.to_vec(), moves: (0..indices.len()).map(|i| (i, i)).collect() };
    }
    // Drop: positions ordered by (|δ|, index).
    let mut by_mag: Vec<usize> = (0..indices.len()).collect();
    by_mag.sort_unstable_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()).then(indices[a].cmp(&indices[b])));
    let mut dropped = vec![false; indices.len()];
    for &p in &by_mag[..n] {
        dropped[p] = true;
    }
    // Grow: inactive entries ordered by (-score, index).
    let mut active = vec![false; len];
    for &i in indices {
        active[i as usize] = true;
    }
    let mut cands: Vec<(f32, u32)> = (0..len as u32).into_par_iter().filter(|&i| !active[i as usize]).map(|i| (score(i), i)).collect();
    let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    cands.select_nth_unstable_by(n - 1, order);
    let grown: Vec<u32> = cands[..n].iter().map(|c| c.1).collect();
    let mut new: Vec<(u32, Option<usize>)> = indices.iter().enumerate().filter(|(p, _)| !dropped[*p]).map(|(p, &i)| (i, Some(p))).collect();
    new.extend(grown.into_iter().map(|i| (i, None)));
    new.sort_unstable_by_key(|e| e.0);
    let moves = new.iter().enumerate().filter_map(|(np, e)| e.1.map(|op| (op, np))).collect();
    Reselection { indices: new.into_iter().map(|e| e.0).collect(), moves }
}

fn module_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

impl Llama {
    /// Attaches zero deltas at random active entries (`density` of each target matrix,
    /// chosen from `seed`).
    pub fn add_sparse(&mut self, cfg: &SparseConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        let mut rng = Rng::new(seed ^ 0x5eed_5ba7);
        let device = self.device();
        for (path, lin) in self.linears_mut() {
            if !cfg.target_modules.iter().any(|m| m == module_name(&path)) {
                continue;
            }
            let (rows, cols) = (lin.weight.dims()[0], lin.weight.dims()[1]);
            let n = cfg.active(rows, cols);
            let indices = random_indices(rows * cols, n, &mut rng);
            let values = Tensor::zeros([n], DType::F32, &device)?;
            lin.sparse = Some(SparseDelta { indices: Arc::new(indices.into()), values });
        }
        Ok(())
    }

    /// `(module path, delta)` of every linear with a sparse delta, in layer order.
    pub fn sparse_deltas(&self) -> Vec<(String, SparseDelta)> {
        self.linears().into_iter().filter_map(|(p, l)| l.sparse.clone().map(|s| (p, s))).collect()
    }

    /// Folds every delta into its weight (`W.view(-1)[indices] += values`) and removes it.
    pub fn merge_sparse(&mut self) -> Result<()> {
        for (_, lin) in self.linears_mut() {
            if let Some(sp) = lin.sparse.take() {
                let (dims, device) = (lin.weight.dims().to_vec(), lin.weight.device());
                let mut w = lin.weight.to_vec_f32()?;
                for (&i, d) in sp.indices.iter().zip(sp.values.to_vec_f32()?) {
                    w[i as usize] += d;
                }
                lin.weight = Tensor::from_vec(w, dims)?.to_dtype(lin.weight.dtype())?.to_device(&device)?;
            }
        }
        Ok(())
    }
}

/// Writes `dir/sparse_deltas.safetensors` (see the module doc for the format).
pub fn save_deltas(model: &Llama, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    let deltas = model.sparse_deltas();
    if deltas.is_empty() {
        return Err(Error::InvalidArgument("the model has no sparse deltas to save".into()));
    }
    let mut tensors = Vec::new();
    for (path, d) in deltas {
        let idx: Vec<i32> = d.indices.iter().map(|&i| i as i32).collect();
        let n = idx.len();
        tensors.push((format!("{path}.weight.indices"), Tensor::from_vec_i32(idx, [n])?));
        tensors.push((format!("{path}.weight.values"), d.values.to_device(&Device::Cpu)?));
    }
    let meta = HashMap::from([("format".to_string(), "tuna-sparse-delta".to_string()), ("base_model".to_string(), base_model.to_string())]);
    save(&dir.join(DELTAS_FILE), &tensors, Some(meta))
}

/// Reads `sparse_deltas.safetensors` from `dir` (or the file itself) and attaches the deltas
/// to the matching linears of `model`.
pub fn load_deltas(model: &mut Llama, path: &Path) -> Result<usize> {
    let file = if path.is_dir() { path.join(DELTAS_FILE) } else { path.to_path_buf() };
    let w = WeightFiles::from_paths(std::slice::from_ref(&file))?;
    let device = model.device();
    let mut attached = 0;
    for (p, lin) in model.linears_mut() {
        let (ki, kv) = (format!("{p}.weight.indices"), format!("{p}.weight.values"));
        if !w.contains(&ki) {
            continue;
        }
        let idx = w.load_raw(&ki, &Device::Cpu)?;
        if idx.dtype() != DType::I32 || idx.shape().rank() != 1 {
            return Err(Error::file(&file, format!("`{ki}` must be an i32 vector, is {} {:?}", idx.dtype().name(), idx.dims())));
        }
        let (rows, cols) = (lin.weight.dims()[0], lin.weight.dims()[1]);
        let indices: Vec<u32> = idx.to_vec::<i32>()?.into_iter().map(|i| i as u32).collect();
        crate::kernels::sparse::check_indices("load_deltas", &indices, rows, cols).map_err(|e| Error::file(&file, format!("`{ki}`: {e}")))?;
        let values = w.load_f32(&kv, &[indices.len()])?.to_device(&device)?;
        lin.sparse = Some(SparseDelta { indices: Arc::new(indices.into()), values });
        attached += 1;
    }
    if attached == 0 {
        return Err(Error::file(&file, "no sparse delta matches a module of this model (keys like model.layers.0.self_attn.q_proj.weight.indices)"));
    }
    Ok(attached)
}
