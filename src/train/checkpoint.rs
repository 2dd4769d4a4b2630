//! Training checkpoints: `trainer_state.json` (step, names, optimizer counters),
//! `params.safetensors` (f32 master weights) and `optimizer.safetensors` (AdamW moments).
//! Each file is written to a temporary name and renamed; the state file goes last and names
//! the step the tensor files must carry, so a crash mid-write is detected at load, never
//! silently mixed.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use super::Trainer;
use crate::io::read_json;
use crate::io::safetensors::{save, WeightFiles};
use crate::{Error, Result, Tensor};

impl Trainer {
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
        let meta = HashMap::from([("step".to_string(), self.step.to_string())]);
        let tensor = |v: &Vec<f32>, s: &Vec<usize>| Tensor::from_vec(v.clone(), s.clone());
        let params: Vec<(String, Tensor)> =
            self.names.iter().zip(self.masters.iter().zip(&self.shapes)).map(|(n, (v, s))| Ok((n.clone(), tensor(v, s)?))).collect::<Result<_>>()?;
        save(&dir.join("params.safetensors"), &params, Some(meta.clone()))?;
        let mut opt = Vec::new();
        for (n, ((m, v), s)) in self.names.iter().zip(self.optimizer.state.iter().zip(&self.shapes)) {
            opt.push((format!("m.{n}"), tensor(m, s)?));
            opt.push((format!("v.{n}"), tensor(v, s)?));
        }
        save(&dir.join("optimizer.safetensors"), &opt, Some(meta))?;
        let state = json!({
            "step": self.step,
            "optimizer_step": self.optimizer.step,
            "method": self.config.method.name(),
            "seed": self.config.seed,
            "names": self.names,
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
        let params = open("params.safetensors")?;
        let opt = open("optimizer.safetensors")?;
        let mut masters = Vec::new();
        let mut moments = Vec::new();
        for (n, s) in self.names.iter().zip(&self.shapes) {
            masters.push(params.load_f32(n, s)?.to_vec_f32()?);
            moments.push((opt.load_f32(&format!("m.{n}"), s)?.to_vec_f32()?, opt.load_f32(&format!("v.{n}"), s)?.to_vec_f32()?));
        }
        self.masters = masters;
        self.optimizer.state = moments;
        self.optimizer.step = state["optimizer_step"].as_u64().unwrap_or(step as u64);
        self.step = step;
        self.install(None)?;
        Ok(())
    }
}
