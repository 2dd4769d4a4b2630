//! LoRA (Hu et al., 2021) as PEFT implements it: on each target linear `y = x·Wᵀ` add
//! `scale·(dropout(x)·Aᵀ)·Bᵀ` with A `[r, in]`, B `[out, r]`, `scale = alpha / r`
//! (`alpha / sqrt(r)` with rsLoRA). Initialisation as PEFT's default: A Kaiming-uniform with
//! `a = sqrt(5)` (uniform in `±1/sqrt(in)`), B zero, so training starts from the base model.
//!
//! Files: `adapter_config.json` and `adapter_model.safetensors` with PEFT's key names
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), loadable by PEFT
//! unchanged; adapters written by PEFT load here (with or without `.default` in the keys).

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::io::read_json;
use crate::io::safetensors::{save, WeightFiles};
use crate::nn::llama::LINEAR_MODULES;
use crate::nn::Llama;
use crate::rng::Rng;
use crate::{Error, Result, Tensor};

/// What to adapt and how.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
    /// Module names (`q_proj`, ..., `down_proj`).
    pub target_modules: Vec<String>,
    /// PEFT's `rank_pattern` and `alpha_pattern`: a module whose path is a key, or ends with
    /// `.` and a key (`v_proj`, `layers.0.self_attn.q_proj`), takes that rank or alpha instead
    /// of `r` or `alpha`. Keys are plain names here (PEFT reads them as regular expressions;
    /// for plain names the two agree), and at most one may match a module.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f32)>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
        }
    }
}

/// Whether a rank or alpha pattern's `key` names the module at `path`: the path is the key or
/// ends with `.` and the key.
fn names(key: &str, path: &str) -> bool {
    path == key || path.strip_suffix(key).is_some_and(|p| p.ends_with('.'))
}

/// The value of the key of `pattern` that names `path` (see `LoraConfig::rank_pattern`).
fn pattern_value<T: Copy>(pattern: &[(String, T)], path: &str) -> Option<T> {
    pattern.iter().find(|(k, _)| names(k, path)).map(|&(_, v)| v)
}

impl LoraConfig {
    /// The scale `alpha / r` (`alpha / sqrt(r)` with rsLoRA) of modules no pattern names.
    pub fn scale(&self) -> f32 {
        self.scale_of(self.r, self.alpha)
    }

    fn scale_of(&self, r: usize, alpha: f32) -> f32 {
        if self.use_rslora {
            alpha / (r as f32).sqrt()
        } else {
            alpha / r as f32
        }
    }

    /// The rank and scale of the module at `path` (`model.layers.0.self_attn.q_proj`).
    pub fn rank_and_scale(&self, path: &str) -> (usize, f32) {
        let r = pattern_value(&self.rank_pattern, path).unwrap_or(self.r);
        (r, self.scale_of(r, pattern_value(&self.alpha_pattern, path).unwrap_or(self.alpha)))
    }

    /// Checks the rank and alpha patterns: ranks of at least 1, keys that are plain names, and
    /// no module of `paths` matched by two keys of one pattern (PEFT would take the first in
    /// the file's order, which a JSON object does not keep here).
    pub fn validate_patterns(&self, paths: &[String]) -> Result<()> {
        if let Some((k, _)) = self.rank_pattern.iter().find(|&&(_, r)| r == 0) {
            return Err(Error::InvalidArgument(format!("LoRA rank_pattern `{k}`: a rank must be at least 1")));
        }
        let keys = self.rank_pattern.iter().map(|(k, _)| k).chain(self.alpha_pattern.iter().map(|(k, _)| k));
        if let Some(k) = keys.clone().find(|k| k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')) {
            return Err(Error::InvalidArgument(format!("LoRA rank/alpha pattern key `{k}`: plain module names or paths are supported, not regular expressions")));
        }
        let rank_keys: Vec<&str> = self.rank_pattern.iter().map(|(k, _)| k.as_str()).collect();
        let alpha_keys: Vec<&str> = self.alpha_pattern.iter().map(|(k, _)| k.as_str()).collect();
        for path in paths {
            for (name, keys) in [("rank_pattern", &rank_keys), ("alpha_pattern", &alpha_keys)] {
                let hits: Vec<&&str> = keys.iter().filter(|k| names(k, path)).collect();
                if hits.len() > 1 {
                    return Err(Error::InvalidArgument(format!("LoRA {name}: `{}` and `{}` both name {path}", hits[0], hits[1])));
                }
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidArgument("LoRA rank r must be at least 1".into()));
        }
        self.validate_patterns(&[])?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidArgument(format!("LoRA dropout must be in [0, 1), got {}", self.dropout)));
        }
        for m in &self.target_modules {
            if !LINEAR_MODULES.contains(&m.as_str()) {
                return Err(Error::InvalidArgument(format!("LoRA target module `{m}` is not one of {LINEAR_MODULES:?}")));
            }
        }
        Ok(())
    }
}

/// The trainable pair attached to one linear module.
#[derive(Clone)]
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f32,
    pub dropout: f32,
}

/// PEFT's saved key of a module's A or B (`which` is "lora_A" or "lora_B").
pub fn peft_key(module_path: &str, which: &str) -> String {
    format!("base_model.model.{module_path}.{which}.weight")
}

fn module_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

impl Llama {
    /// Attaches fresh LoRA adapters (PEFT's default init, from `seed`) to the target modules.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        cfg.validate_patterns(&self.linears().into_iter().map(|(p, _)| p).collect::<Vec<_>>())?;
        let mut rng = Rng::new(seed);
        let device = self.device();
        for (path, lin) in self.linears_mut() {
            if !cfg.target_modules.iter().any(|m| m == module_name(&path)) {
                continue;
            }
            let (out, inp) = (lin.weight.dims()[0], lin.weight.dims()[1]);
            let (r, scale) = cfg.rank_and_scale(&path);
            let bound = 1.0 / (inp as f32).sqrt();
            let a = Tensor::from_vec(rng.vec(r * inp, -bound, bound), [r, inp])?.to_device(&device)?;
            let b = Tensor::zeros([out, r], crate::DType::F32, &device)?;
            lin.lora = Some(LoraAdapter { a, b, scale, dropout: cfg.dropout });
        }
        Ok(())
    }

    /// The adapters a training run with `cfg` starts from: fresh ones as [`Llama::add_lora`]
    /// makes them, or, where the model already carries adapters (a PEFT adapter loaded to be
    /// trained further, as PEFT's `is_trainable=True`), those, kept as they are. They must then
    /// be `cfg`'s: its rank and scale, on exactly the modules it targets (the config
    /// [`load_adapter`] returns is); only the dropout, a training choice, is set from `cfg`.
    /// Returns whether the adapters were kept.
    pub fn lora_to_train(&mut self, cfg: &LoraConfig, seed: u64) -> Result<bool> {
        cfg.validate()?;
        if self.lora_parameters().is_empty() {
            self.add_lora(cfg, seed)?;
            return Ok(false);
        }
        let differ = |what: String| {
            Error::InvalidArgument(format!(
                "the model's LoRA adapters are not the training config's (r {}, alpha {}{}, target modules {:?}): {what}",
                cfg.r,
                cfg.alpha,
                if cfg.use_rslora { ", rsLoRA" } else { "" },
                cfg.target_modules
            ))
        };
        for (path, lin) in self.linears_mut() {
            let targeted = cfg.target_modules.iter().any(|m| m == module_name(&path));
            match (&mut lin.lora, targeted) {
                (None, true) => return Err(differ(format!("{path} has no adapter"))),
                (Some(_), false) => return Err(differ(format!("{path} has an adapter"))),
                (Some(l), true) => {
                    let (r, scale) = cfg.rank_and_scale(&path);
                    if l.a.dims()[0] != r {
                        return Err(differ(format!("{path}'s adapter has rank {} where the config's is {r}", l.a.dims()[0])));
                    }
                    if (l.scale - scale).abs() > 1e-6 * scale.abs() {
                        return Err(differ(format!("{path}'s adapter scale is {} where the config's is {scale}", l.scale)));
                    }
                    l.dropout = cfg.dropout;
                }
                (None, false) => {}
            }
        }
        Ok(true)
    }

    /// The LoRA parameters under their PEFT keys, A before B, modules in order.
    pub fn lora_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (path, lin) in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((peft_key(&path, "lora_A"), l.a.clone()));
                out.push((peft_key(&path, "lora_B"), l.b.clone()));
            }
        }
        out
    }

    /// Replaces each LoRA tensor by `f(peft_key, tensor)` (e.g. `tape.param`).
    pub fn map_lora(&mut self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        for (path, lin) in self.linears_mut() {
            if let Some(l) = &mut lin.lora {
                l.a = f(&peft_key(&path, "lora_A"), &l.a)?;
                l.b = f(&peft_key(&path, "lora_B"), &l.b)?;
            }
        }
        Ok(())
    }

    /// Folds every adapter into its base weight (`W += scale·B·A`) and removes the adapters.
    pub fn merge_lora(&mut self) -> Result<()> {
        for (_, lin) in self.linears_mut() {
            if let Some(l) = lin.lora.take() {
                let ba = crate::ops::matmul(&l.b, &l.a, false, false)?;
                lin.weight = crate::ops::add(&lin.weight, &crate::ops::scale(&ba, l.scale)?)?;
            }
        }
        Ok(())
    }
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` as PEFT does.
/// `base_model` is recorded as `base_model_name_or_path`.
pub fn save_adapter(model: &Llama, cfg: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    let params = model.lora_parameters();
    if params.is_empty() {
        return Err(Error::InvalidArgument("the model has no LoRA adapters to save".into()));
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "rank_pattern": cfg.rank_pattern.iter().map(|(k, r)| (k.clone(), Value::from(*r))).collect::<serde_json::Map<String, Value>>(),
        "alpha_pattern": cfg.alpha_pattern.iter().map(|(k, a)| (k.clone(), Value::from(*a))).collect::<serde_json::Map<String, Value>>(),
        "use_dora": false,
        "revision": null,
        "library_name": "tuna",
    });
    let cfg_path = dir.join("adapter_config.json");
    let tmp = dir.join("adapter_config.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&config).expect("json"))
        .and_then(|_| std::fs::rename(&tmp, &cfg_path))
        .map_err(|e| Error::file(&cfg_path, format!("cannot write: {e}")))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save(&dir.join("adapter_model.safetensors"), &params, Some(meta))
}

/// Reads a PEFT LoRA adapter folder and attaches it to `model`. Returns its config.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<LoraConfig> {
    let cfg_path = dir.join("adapter_config.json");
    let v = read_json(&cfg_path)?;
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let err = |k: &str, what: &str| Error::file(&cfg_path, format!("field `{k}`: {what}"));
    if let Some(t) = field("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(err("peft_type", &format!("`{t}` is not supported (LORA is)")));
        }
    }
    if field("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(err("use_dora", "DoRA adapters are not supported"));
    }
    // What the model would otherwise silently leave out: whole modules saved beside the LoRA
    // pairs, trained biases, trained token rows.
    let given = |k: &str| field(k).is_some_and(|x| x.as_array().is_none_or(|a| !a.is_empty()) && x.as_object().is_none_or(|o| !o.is_empty()));
    for (k, what) in [
        ("modules_to_save", "whole modules saved with the adapter are not supported (the LoRA pairs are)"),
        ("trainable_token_indices", "trained token rows are not supported"),
    ] {
        if given(k) {
            return Err(err(k, what));
        }
    }
    if let Some(b) = field("bias").and_then(Value::as_str).filter(|&b| b != "none") {
        return Err(err("bias", &format!("`{b}`: trained biases are not supported (\"none\" is)")));
    }
    let r = field("r").and_then(Value::as_u64).ok_or_else(|| err("r", "missing or not an integer"))? as usize;
    let alpha = field("lora_alpha").and_then(Value::as_f64).map(|a| a as f32).unwrap_or(8.0);
    let targets: Vec<String> = match field("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(Value::String(s)) if s == "all-linear" => LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => return Err(err("target_modules", "missing (a list of module names)")),
    };
    let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
        match field(k) {
            None => Ok(Vec::new()),
            Some(Value::Object(o)) => o.iter().map(|(key, v)| v.as_f64().map(|x| (key.clone(), x)).ok_or_else(|| err(k, &format!("`{key}` is not a number")))).collect(),
            Some(_) => Err(err(k, "must be an object of module names to numbers")),
        }
    };
    let cfg = LoraConfig {
        r,
        alpha,
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        use_rslora: field("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target_modules: targets,
        rank_pattern: pattern("rank_pattern")?.into_iter().map(|(k, x)| (k, x as usize)).collect(),
        alpha_pattern: pattern("alpha_pattern")?.into_iter().map(|(k, x)| (k, x as f32)).collect(),
    };
    cfg.validate_patterns(&model.linears().into_iter().map(|(p, _)| p).collect::<Vec<_>>()).map_err(|e| Error::file(&cfg_path, e.to_string()))?;
    let weights = WeightFiles::from_paths(&[dir.join("adapter_model.safetensors")])?;
    // PEFT's in-memory names carry the adapter name (`.lora_A.default.weight`); saved files
    // drop it. Accept both.
    let find = |path: &str, which: &str| -> Option<String> {
        let plain = peft_key(path, which);
        let with_default = format!("base_model.model.{path}.{which}.default.weight");
        [plain, with_default].into_iter().find(|k| weights.contains(k))
    };
    let device = model.device();
    let mut attached = 0;
    for (path, lin) in model.linears_mut() {
        let (Some(ka), Some(kb)) = (find(&path, "lora_A"), find(&path, "lora_B")) else { continue };
        let (out, inp) = (lin.weight.dims()[0], lin.weight.dims()[1]);
        let (r, scale) = cfg.rank_and_scale(&path);
        let a = weights.load_f32(&ka, &[r, inp])?.to_device(&device)?;
        let b = weights.load_f32(&kb, &[out, r])?.to_device(&device)?;
        lin.lora = Some(LoraAdapter { a, b, scale, dropout: cfg.dropout });
        attached += 1;
    }
    if attached == 0 {
        return Err(Error::file(dir.join("adapter_model.safetensors"), "no LoRA tensor matches a module of this model (keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"));
    }
    Ok(cfg)
}
