//! Training checkpoints: `trainer_state.json` (step, names, optimizer counters, an f16
//! model's loss scale),
//! `params.safetensors` (f32 master weights, and the active indices of sparse deltas as
//! `indices.NAME`) and `optimizer.safetensors` (the optimizer's state tensors, and the
//! gradient sums of an open regrowth window as `gradsum.NAME`).
//! Each file is written to a temporary name and renamed; the state file goes last and names
//! the step the tensor files must carry, so a crash mid-write is detected at load, never
//! silently mixed.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use super::Trainer;
use crate::optim::Layout;
use crate::io::read_json;
use crate::io::safetensors::{save, WeightFiles};
use crate::{Error, Result, Tensor};

impl Trainer {
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<()> {
        self.sync_host()?;
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
        let meta = HashMap::from([("step".to_string(), self.step.to_string())]);
        let tensor = |v: &Vec<f32>, s: &Vec<usize>| Tensor::from_vec(v.clone(), s.clone());
        let mut params: Vec<(String, Tensor)> =
            self.names.iter().zip(self.masters.iter().zip(&self.shapes)).map(|(n, (v, s))| Ok((n.clone(), tensor(v, s)?))).collect::<Result<_>>()?;
        for (n, l) in self.names.iter().zip(&self.layouts) {
            if let Layout::Sparse { indices, .. } = l {
                params.push((format!("indices.{n}"), Tensor::from_vec_i32(indices.iter().map(|&i| i as i32).collect(), [indices.len()])?));
            }
        }
        save(&dir.join("params.safetensors"), &params, Some(meta.clone()))?;
        let mut opt = self.optimizer.state_tensors(&self.names)?;
        if let Some(sums) = self.grad_sums() {
            for (n, g) in self.names.iter().zip(sums) {
                opt.push((format!("gradsum.{n}"), Tensor::from_vec(g.clone(), [g.len()])?));
            }
        }
        save(&dir.join("optimizer.safetensors"), &opt, Some(meta))?;
        let state = json!({
            "step": self.step,
            "optimizer": self.optimizer.name(),
            "optimizer_step": self.optimizer.steps(),
            "method": self.config.method.name(),
            "seed": self.config.seed,
            "names": self.names,
            "loss_scale": self.loss_scale.map(|s| json!({ "scale": s.scale, "good_steps": s.good_steps })),
        });
        let path = dir.join("trainer_state.json");
        let tmp = dir.join("trainer_state.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&state).expect("json"))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::file(&path, format!("cannot write: {e}")))
    }

    /// Restores step, master weights and optimizer state saved by `save_checkpoint` for the
    /// same method and model.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("trainer_state.json");
        let state = read_json(&path)?;
        let step = state["step"].as_u64().ok_or_else(|| Error::file(&path, "field `step` missing"))? as usize;
        let names: Vec<String> = serde_json::from_value(state["names"].clone()).map_err(|e| Error::file(&path, format!("field `names`: {e}")))?;
        if names != self.names {
            return Err(Error::file(&path, format!("the checkpoint trains {} tensors of another setup (method `{}`); this run trains {}", names.len(), state["method"], self.names.len())));
        }
        let open = |file: &str| -> Result<WeightFiles> {
            let p = dir.join(file);
            let w = WeightFiles::from_paths(std::slice::from_ref(&p))?;
            match w.metadata("step") {
                Some(s) if s == step.to_string() => Ok(w),
                other => Err(Error::file(&p, format!(
                    "belongs to step {}, but trainer_state.json is at step {step} (interrupted while saving?)",
                    other.unwrap_or_else(|| "?".into())
                ))),
            }
        };
        if let Some(o) = state["optimizer"].as_str() {
            if o != self.optimizer.name() {
                return Err(Error::file(&path, format!("the checkpoint was trained with {o}; this run uses {}", self.optimizer.name())));
            }
        }
        let params = open("params.safetensors")?;
        let opt = open("optimizer.safetensors")?;
        // Sparse deltas: the active indices first, since the optimizer state follows them.
        for (n, l) in self.names.iter().zip(self.layouts.iter_mut()) {
            if let Layout::Sparse { rows, cols, indices } = l {
                let key = format!("indices.{n}");
                let t = params.load_raw(&key, &crate::Device::Cpu)?;
                if t.dtype() != crate::DType::I32 || t.dims() != [indices.len()] {
                    return Err(Error::file(dir.join("params.safetensors"), format!("`{key}` must be i32 [{}]", indices.len())));
                }
                let idx: Vec<u32> = t.to_vec::<i32>()?.into_iter().map(|i| i as u32).collect();
                crate::kernels::sparse::check_indices("checkpoint", &idx, *rows, *cols).map_err(|e| Error::file(dir.join("params.safetensors"), format!("`{key}`: {e}")))?;
                *indices = std::sync::Arc::new(idx.into());
            }
        }
        let mut masters = Vec::new();
        for (n, s) in self.names.iter().zip(&self.shapes) {
            masters.push(params.load_f32(n, s)?.to_vec_f32()?);
        }
        self.masters = masters;
        self.optimizer.load_state(&self.names, |key, len| opt.load_f32(key, &[len])?.to_vec_f32())?;
        self.optimizer.set_steps(state["optimizer_step"].as_u64().unwrap_or(step as u64));
        let sums = self.names.iter().zip(&self.layouts).map(|(n, l)| {
            let key = format!("gradsum.{n}");
            let (r, c) = l.matrix();
            opt.contains(&key).then(|| opt.load_f32(&key, &[r * c]).and_then(|t| t.to_vec_f32())).transpose()
        }).collect::<Result<Option<Vec<_>>>>()?;
        self.set_grad_sums(sums);
        if let (Some(ls), Some(saved)) = (&mut self.loss_scale, state["loss_scale"].as_object()) {
            let field = |k: &str| saved.get(k).and_then(|v| v.as_f64()).ok_or_else(|| Error::file(&path, format!("field `loss_scale.{k}` missing")));
            ls.scale = field("scale")? as f32;
            ls.good_steps = field("good_steps")? as usize;
        }
        self.step = step;
        self.reset_device_state()?;
        self.install(None)?;
        Ok(())
    }
}
