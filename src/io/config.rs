//! `config.json` of a Llama-family checkpoint: Llama (SmolLM, TinyLlama, Llama 3.x), Mistral,
//! Qwen2, Qwen3, SmolLM3, Granite, Gemma, Gemma 3 (text). Reads both the classic form (`rope_theta`, `rope_scaling` at the top level)
//! and the transformers 5 form (`rope_parameters`). Unknown architectures and unsupported
//! settings are errors naming the field, never silent defaults.

use std::path::Path;

use serde_json::Value;

use crate::io::read_json;
pub use crate::kernels::elementwise::GluAct;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    /// Qwen2's layout without its fixed q/k/v biases, plus an RMSNorm over each head of q and k
    /// before RoPE (`q_norm`, `k_norm`).
    Qwen3,
    /// Llama's layout with some layers applying no RoPE (`no_rope_layers`: NoPE).
    SmolLM3,
    /// Llama's layout with four scalars: on the embeddings, on each block's output before its
    /// residual add, as attention's softmax scale, and dividing the logits.
    Granite,
    /// Gemma (the first): GeGLU, RMSNorms scaling by `1 + w`, embeddings times
    /// `sqrt(hidden_size)`, heads of 256 by default, a tied head.
    Gemma,
    /// Gemma 3's text model (`gemma3_text`): Qwen3's q/k norms, GeGLU, RMSNorms scaling by
    /// `1 + w`, a norm on each block's output too, embeddings times `sqrt(hidden_size)`,
    /// sliding-window layers with their own RoPE base between global ones.
    Gemma3,
}

/// RoPE's rescaling of its inverse frequencies for contexts longer than the pretraining one
/// (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `llama3`: Llama 3.1's frequency-dependent rescaling.
    Llama3(Llama3Scaling),
    /// `linear`: every frequency divided by `factor` (the positions interpolated).
    Linear { factor: f32 },
    /// `yarn`: frequencies blended between interpolated and kept by a ramp over the head dim,
    /// and cos and sin multiplied by `attention_factor`.
    Yarn(YarnScaling),
}

/// YaRN (Peng et al., 2023) as transformers computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct YarnScaling {
    pub factor: f32,
    pub original_max_position_embeddings: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// Whether the ramp's ends are rounded outwards to whole dims.
    pub truncate: bool,
    /// What cos and sin are multiplied by (`0.1·ln(factor) + 1` unless the config says).
    pub attention_factor: f32,
}

/// Llama 3's frequency-dependent RoPE rescaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (Qwen2 always; Llama and Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o (Llama and Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// An RMSNorm (weight `[head_dim]`, eps `rms_norm_eps`) over each head of q and of k,
    /// between the projection and RoPE (Qwen3).
    pub qk_norm: bool,
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    /// The keys a query sees, itself included (Mistral; Gemma 3's windowed layers).
    pub sliding_window: Option<usize>,
    /// Layers that see every earlier key despite `sliding_window` (Gemma 3's `full_attention`
    /// layers), in order; the others are windowed.
    pub global_layers: Vec<usize>,
    /// The RoPE base of the windowed layers, unscaled, where they have their own (Gemma 3's
    /// `sliding_attention` layers); `rope_theta` and `rope_scaling` are then the global layers'.
    pub local_rope_theta: Option<f32>,
    /// The MLP's gate activation: SiLU (SwiGLU) or the tanh GELU (Gemma's GeGLU).
    pub hidden_act: GluAct,
    /// Gemma's RMSNorms scale by `1 + w` for the stored `w`: 1 there, else 0. The model holds
    /// `norm_weight_offset + w` (added at load, taken off again when written), so its norms are
    /// Llama's.
    pub norm_weight_offset: f32,
    /// Gemma 3: each block's output is RMS-normed before its residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`; the MLP's input norm is
    /// `pre_feedforward_layernorm` there).
    pub sandwich_norms: bool,
    /// The layers whose attention applies no RoPE to q and k (SmolLM3's NoPE layers), in order;
    /// empty: every layer rotates.
    pub nope_layers: Vec<usize>,
    /// Granite's scalars (1, 1, None and 1 elsewhere): the embeddings are multiplied by
    /// `embedding_multiplier`, each attention and MLP output by `residual_multiplier` before
    /// its residual add; `attention_multiplier` replaces `1/sqrt(D)` as the softmax scale; the
    /// logits are divided by `logits_scaling`.
    pub embedding_multiplier: f32,
    pub residual_multiplier: f32,
    pub attention_multiplier: Option<f32>,
    pub logits_scaling: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, what: &str) -> Error {
        Error::file(self.path, format!("field `{field}`: {what}"))
    }
    fn opt(&self, field: &str) -> Option<&Value> {
        self.v.get(field).filter(|v| !v.is_null())
    }
    fn usize(&self, field: &str) -> Result<usize> {
        self.opt(field).ok_or_else(|| self.err(field, "missing"))?.as_u64().map(|x| x as usize).ok_or_else(|| self.err(field, "must be a non-negative integer"))
    }
    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.opt(field).map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| self.err(field, "must be a non-negative integer"))).transpose()
    }
    fn opt_f32(&self, field: &str) -> Result<Option<f32>> {
        self.opt(field).map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| self.err(field, "must be a number"))).transpose()
    }
    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        self.opt(field).map(|v| v.as_bool().ok_or_else(|| self.err(field, "must be true or false"))).transpose()
    }
    /// The layers a per-layer list marks (`list`, an entry a layer; `marks` reads an entry,
    /// None where it cannot, `expected` saying what it takes), or without the list every
    /// `every_field`-th layer (default `every`).
    fn layer_set(&self, list: &str, layers: usize, marks: impl Fn(&Value) -> Option<bool>, expected: &str, every_field: &str, every: usize) -> Result<Vec<usize>> {
        match self.opt(list) {
            Some(Value::Array(entries)) => {
                if entries.len() != layers {
                    return Err(self.err(list, &format!("has {} entries for {layers} layers", entries.len())));
                }
                let mut out = Vec::new();
                for (i, x) in entries.iter().enumerate() {
                    match marks(x) {
                        Some(true) => out.push(i),
                        Some(false) => {}
                        None => return Err(self.err(list, &format!("entry {i} is {x} ({expected})"))),
                    }
                }
                Ok(out)
            }
            Some(other) => Err(self.err(list, &format!("{other} is not a list ({expected} per layer)"))),
            None => {
                let every = self.opt_usize(every_field)?.unwrap_or(every);
                if every == 0 {
                    return Err(self.err(every_field, "must be at least 1"));
                }
                Ok((0..layers).filter(|i| (i + 1) % every == 0).collect())
            }
        }
    }
}

impl LlamaConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        Self::from_value(&read_json(&path)?, &path)
    }

    /// Parses a config; `path` is only for error messages.
    pub fn from_value(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { v, path };
        let archs = f.opt("architectures").and_then(Value::as_array).ok_or_else(|| f.err("architectures", "missing (a list such as [\"LlamaForCausalLM\"])"))?;
        let arch_name = archs.first().and_then(Value::as_str).unwrap_or("");
        let arch = match arch_name {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            "SmolLM3ForCausalLM" => Arch::SmolLM3,
            "GraniteForCausalLM" => Arch::Granite,
            "GemmaForCausalLM" => Arch::Gemma,
            "Gemma3ForCausalLM" => Arch::Gemma3,
            other => {
                return Err(f.err(
                    "architectures",
                    &format!("`{other}` is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, SmolLM3ForCausalLM, GraniteForCausalLM, GemmaForCausalLM, Gemma3ForCausalLM are)"),
                ))
            }
        };
        // Gemma 3 only; `family`: both Gemmas (the `1 + w` norms, the embedding scale, GeGLU).
        let gemma = arch == Arch::Gemma3;
        let family = matches!(arch, Arch::Gemma | Arch::Gemma3);
        // Gemma 3 names it `hidden_activation`; transformers' Gemma default is the tanh GELU,
        // and Gemma's legacy `gelu` means it too (transformers rewrites it).
        let act_field = if gemma && f.opt("hidden_activation").is_some() { "hidden_activation" } else { "hidden_act" };
        let hidden_act = match f.opt(act_field).map(|v| v.as_str().ok_or_else(|| f.err(act_field, "must be a string"))).transpose()? {
            None if family => GluAct::GeluTanh,
            Some("gelu") if arch == Arch::Gemma => GluAct::GeluTanh,
            None | Some("silu") => GluAct::Silu,
            Some("gelu_pytorch_tanh") => GluAct::GeluTanh,
            Some(other) => return Err(f.err(act_field, &format!("`{other}` is not supported (silu and gelu_pytorch_tanh are)"))),
        };
        if gemma {
            for field in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if f.opt(field).is_some() {
                    return Err(f.err(field, "logit soft-capping is not supported (Gemma 3 sets none)"));
                }
            }
            if f.opt_bool("use_bidirectional_attention")?.unwrap_or(false) {
                return Err(f.err("use_bidirectional_attention", "only causal attention is supported"));
            }
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.err("num_key_value_heads", &format!("{num_kv_heads} must divide num_attention_heads = {num_heads}")));
        }
        // Qwen3's and the Gemmas' defaults are transformers' (`Qwen3Config(head_dim=128)`,
        // `GemmaConfig(head_dim=256)`, `Gemma3TextConfig(head_dim=256)`), not hidden / heads.
        let default_head_dim = match arch {
            Arch::Qwen3 => 128,
            Arch::Gemma | Arch::Gemma3 => 256,
            _ => hidden_size / num_heads,
        };
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(default_head_dim);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.err("head_dim", &format!("{head_dim} must be even and positive (RoPE pairs halves)")));
        }

        // RoPE: transformers 5 puts everything under `rope_parameters`; older configs use
        // `rope_theta` and `rope_scaling` at the top level. Gemma 3's transformers 5 form has one
        // such dict per layer type; its older form, `rope_local_base_freq` for the windowed
        // layers.
        let per_type = f.opt("rope_parameters").filter(|r| r.get("full_attention").is_some() || r.get("sliding_attention").is_some());
        let rope_params = match per_type {
            Some(r) => r.get("full_attention").filter(|v| !v.is_null()),
            None => f.opt("rope_parameters").or_else(|| f.opt("rope_scaling")),
        };
        let rope_theta = f
            .opt_f32("rope_theta")?
            .or_else(|| rope_params.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64).map(|x| x as f32))
            .unwrap_or(if gemma { 1_000_000.0 } else { 10000.0 });
        let local_rope_theta = if gemma {
            let local = per_type.and_then(|r| r.get("sliding_attention")).filter(|v| !v.is_null());
            let field = "rope_parameters.sliding_attention";
            if let Some(kind) = local.and_then(|r| r.get("rope_type")).and_then(Value::as_str).filter(|&k| k != "default") {
                return Err(f.err(&format!("{field}.rope_type"), &format!("`{kind}` is not supported for the windowed layers (default is)")));
            }
            let theta = match local.and_then(|r| r.get("rope_theta")) {
                Some(x) => Some(x.as_f64().ok_or_else(|| f.err(&format!("{field}.rope_theta"), "not a number"))? as f32),
                None => f.opt_f32("rope_local_base_freq")?,
            };
            Some(theta.unwrap_or(10000.0))
        } else {
            None
        };
        let rope_scaling = match rope_params {
            None => None,
            Some(r) => {
                let field = match (per_type, f.opt("rope_parameters")) {
                    (Some(_), _) => "rope_parameters.full_attention",
                    (None, Some(_)) => "rope_parameters",
                    (None, None) => "rope_scaling",
                };
                let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
                let opt_num = |k: &str| -> Result<Option<f64>> {
                    match r.get(k) {
                        None | Some(Value::Null) => Ok(None),
                        Some(x) => x.as_f64().map(Some).ok_or_else(|| f.err(&format!("{field}.{k}"), "not a number")),
                    }
                };
                let num = |k: &str| -> Result<f32> { opt_num(k)?.map(|x| x as f32).ok_or_else(|| f.err(&format!("{field}.{k}"), "missing or not a number")) };
                match kind {
                    "default" => None,
                    "llama3" => Some(RopeScaling::Llama3(Llama3Scaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    })),
                    "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
                    "yarn" => {
                        // transformers' defaults: the pretraining length from the top level or
                        // the model's, the factor from the two lengths, betas 32 and 1.
                        let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(2048) as f64;
                        let original = match opt_num("original_max_position_embeddings")? {
                            Some(x) => x,
                            None => f.opt_usize("original_max_position_embeddings")?.map_or(max_pos, |x| x as f64),
                        };
                        let factor = opt_num("factor")?.unwrap_or(max_pos / original);
                        let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                        let attention_factor = match (opt_num("attention_factor")?, opt_num("mscale")?, opt_num("mscale_all_dim")?) {
                            (Some(a), _, _) => a,
                            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                            _ => mscale(factor, 1.0),
                        };
                        let beta = |k: &str, default: f64| -> Result<f32> { Ok(opt_num(k)?.filter(|&b| b != 0.0).unwrap_or(default) as f32) };
                        Some(RopeScaling::Yarn(YarnScaling {
                            factor: factor as f32,
                            original_max_position_embeddings: original as f32,
                            beta_fast: beta("beta_fast", 32.0)?,
                            beta_slow: beta("beta_slow", 1.0)?,
                            truncate: r.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                            attention_factor: attention_factor as f32,
                        }))
                    }
                    other => return Err(f.err(&format!("{field}.rope_type"), &format!("`{other}` is not supported (default, linear, llama3, yarn are)"))),
                }
            }
        };

        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let num_layers = f.usize("num_hidden_layers")?;
        let sliding_window = match arch {
            Arch::Mistral => f.opt_usize("sliding_window")?,
            Arch::Gemma3 => Some(f.opt_usize("sliding_window")?.unwrap_or(4096)),
            Arch::Qwen2 | Arch::Qwen3 | Arch::SmolLM3 if f.opt_bool("use_sliding_window")?.unwrap_or(false) => {
                return Err(f.err("use_sliding_window", "a per-layer sliding window is not supported"))
            }
            _ => None,
        };
        if sliding_window == Some(0) {
            return Err(f.err("sliding_window", "must hold at least one key"));
        }
        // Gemma 3: `layer_types`, or (older configs) every `sliding_window_pattern`-th layer
        // global (default 6).
        let global_layers = if gemma {
            let marks = |t: &Value| match t.as_str() {
                Some("full_attention") => Some(true),
                Some("sliding_attention") => Some(false),
                _ => None,
            };
            f.layer_set("layer_types", num_layers, marks, "full_attention or sliding_attention", "sliding_window_pattern", 6)?
        } else {
            Vec::new()
        };
        let nope_layers = match arch {
            // transformers' `no_rope_layers` holds a flag per layer, 1 where RoPE applies; without
            // it, every `no_rope_layer_interval`-th layer (default 4) applies none.
            Arch::SmolLM3 => f.layer_set("no_rope_layers", num_layers, |x| x.as_u64().filter(|&x| x <= 1).map(|x| x == 0), "0 or 1", "no_rope_layer_interval", 4)?,
            _ => Vec::new(),
        };
        // Granite's scalars (transformers' defaults 1); other architectures have none.
        let granite = |k: &str| -> Result<Option<f32>> { if arch == Arch::Granite { f.opt_f32(k) } else { Ok(None) } };
        let (embedding_multiplier, residual_multiplier) = (granite("embedding_multiplier")?.unwrap_or(1.0), granite("residual_multiplier")?.unwrap_or(1.0));
        let attention_multiplier = match arch {
            Arch::Granite => Some(granite("attention_multiplier")?.unwrap_or(1.0)),
            // Gemma scales the scores by `query_pre_attn_scalar ** -0.5` (transformers' default 256).
            Arch::Gemma3 => {
                let q = f.opt_f32("query_pre_attn_scalar")?.unwrap_or(256.0);
                if q <= 0.0 {
                    return Err(f.err("query_pre_attn_scalar", "must be positive"));
                }
                Some(1.0 / q.sqrt())
            }
            _ => None,
        };
        // Gemma's embeddings are multiplied by sqrt(hidden_size), rounded to f32 as transformers'
        // buffer is.
        let embedding_multiplier = if family { (hidden_size as f64).sqrt() as f32 } else { embedding_multiplier };
        let logits_scaling = granite("logits_scaling")?.unwrap_or(1.0);
        if logits_scaling == 0.0 {
            return Err(f.err("logits_scaling", "must not be 0 (the logits are divided by it)"));
        }
        let ids = |field: &str| -> Result<Vec<u32>> {
            match f.opt(field) {
                None => Ok(Vec::new()),
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).ok_or_else(|| f.err(field, "must be a token id")),
                Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().map(|x| x as u32).ok_or_else(|| f.err(field, "must be token ids"))).collect(),
                Some(_) => Err(f.err(field, "must be a token id or a list of them")),
            }
        };
        Ok(LlamaConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(family),
            qkv_bias,
            o_bias,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            sliding_window,
            global_layers,
            local_rope_theta,
            hidden_act,
            norm_weight_offset: if family { 1.0 } else { 0.0 },
            sandwich_norms: gemma,
            nope_layers,
            embedding_multiplier,
            residual_multiplier,
            attention_multiplier,
            logits_scaling,
            bos_token_id: ids("bos_token_id")?.first().copied(),
            eos_token_ids: ids("eos_token_id")?,
        })
    }

    /// A Llama config with the usual defaults for the given sizes (theta 10000, eps 1e-5,
    /// untied, no biases).
    pub fn llama(vocab_size: usize, hidden_size: usize, intermediate_size: usize, num_layers: usize, num_heads: usize, num_kv_heads: usize) -> Self {
        LlamaConfig {
            arch: Arch::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            mlp_bias: false,
            max_position_embeddings: 2048,
            sliding_window: None,
            global_layers: Vec::new(),
            local_rope_theta: None,
            hidden_act: GluAct::Silu,
            norm_weight_offset: 0.0,
            sandwich_norms: false,
            nope_layers: Vec::new(),
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            attention_multiplier: None,
            logits_scaling: 1.0,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// Whether layer `i` attends through the sliding window (and rotates by the local RoPE
    /// where there is one).
    pub fn windowed(&self, i: usize) -> bool {
        self.sliding_window.is_some() && !self.global_layers.contains(&i)
    }

    /// Whether layer `i` rotates q and k by RoPE (all but SmolLM3's NoPE layers do).
    pub fn rotates(&self, i: usize) -> bool {
        !self.nope_layers.contains(&i)
    }

    /// The config as transformers writes it (`config.json`), enough for transformers and tuna
    /// to load the model.
    pub fn to_hf_json(&self) -> Value {
        let arch = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Mistral => ("MistralForCausalLM", "mistral"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
            Arch::SmolLM3 => ("SmolLM3ForCausalLM", "smollm3"),
            Arch::Granite => ("GraniteForCausalLM", "granite"),
            Arch::Gemma => ("GemmaForCausalLM", "gemma"),
            Arch::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        };
        let rope = match &self.rope_scaling {
            None => serde_json::json!({"rope_type": "default", "rope_theta": self.rope_theta}),
            Some(RopeScaling::Llama3(s)) => serde_json::json!({
                "rope_type": "llama3", "rope_theta": self.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
            Some(RopeScaling::Linear { factor }) => serde_json::json!({"rope_type": "linear", "rope_theta": self.rope_theta, "factor": factor}),
            Some(RopeScaling::Yarn(y)) => serde_json::json!({
                "rope_type": "yarn", "rope_theta": self.rope_theta, "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings, "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow, "truncate": y.truncate, "attention_factor": y.attention_factor,
            }),
        };
        let mut v = serde_json::json!({
            "architectures": [arch.0],
            "model_type": arch.1,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act.hf_name(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "dtype": "float32",
        });
        if self.arch == Arch::Granite {
            v["embedding_multiplier"] = self.embedding_multiplier.into();
            v["residual_multiplier"] = self.residual_multiplier.into();
            v["attention_multiplier"] = self.attention_multiplier.unwrap_or(1.0 / (self.head_dim as f32).sqrt()).into();
            v["logits_scaling"] = self.logits_scaling.into();
        }
        if self.arch == Arch::Gemma3 {
            let local = serde_json::json!({"rope_type": "default", "rope_theta": self.local_rope_theta.unwrap_or(self.rope_theta)});
            v["rope_parameters"] = serde_json::json!({"full_attention": v["rope_parameters"].take(), "sliding_attention": local});
            v["hidden_activation"] = self.hidden_act.hf_name().into();
            let scale = self.attention_multiplier.unwrap_or(1.0 / (self.head_dim as f32).sqrt());
            v["query_pre_attn_scalar"] = (1.0 / (scale * scale)).round().into();
            v["layer_types"] = (0..self.num_layers).map(|i| if self.windowed(i) { "sliding_attention" } else { "full_attention" }).collect();
        }
        if self.arch == Arch::SmolLM3 {
            v["no_rope_layers"] = (0..self.num_layers).map(|i| u8::from(self.rotates(i))).collect();
            v["use_sliding_window"] = false.into();
        }
        v
    }

    /// RoPE inverse frequencies `[D/2]`, rounded as transformers rounds them:
    /// `e = f32(2i) / D` in f32, `p = theta^e` correctly rounded to f32 (torch's f32 pow is; so
    /// it is computed in f64 here), `inv_freq[i] = 1 / p` in f32; then the configured rescaling
    /// (all f32).
    pub fn inv_freq(&self) -> Vec<f32> {
        self.inv_freq_of(self.rope_theta, self.rope_scaling.as_ref())
    }

    /// The windowed layers' own inverse frequencies, unscaled (Gemma 3), where they have them.
    pub fn local_inv_freq(&self) -> Option<Vec<f32>> {
        self.local_rope_theta.map(|theta| self.inv_freq_of(theta, None))
    }

    fn inv_freq_of(&self, theta: f32, scaling: Option<&RopeScaling>) -> Vec<f32> {
        let d = self.head_dim;
        let powers = (0..d / 2).map(|i| {
            let e = (2 * i) as f32 / d as f32;
            (theta as f64).powf(e as f64) as f32
        });
        match scaling {
            None => powers.map(|p| 1.0 / p).collect(),
            Some(RopeScaling::Llama3(s)) => powers.map(|p| llama3_scale(1.0 / p, s)).collect(),
            Some(RopeScaling::Linear { factor }) => powers.map(|p| 1.0 / p / factor).collect(),
            Some(RopeScaling::Yarn(y)) => {
                let (low, high) = yarn_ramp_ends(y, d, theta as f64);
                powers
                    .enumerate()
                    .map(|(i, p)| {
                        let (kept, interpolated) = (1.0 / p, 1.0 / (y.factor * p));
                        let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        interpolated * (1.0 - keep) + kept * keep
                    })
                    .collect()
            }
        }
    }

    /// The softmax scale of attention: `1/sqrt(D)` (Granite's `attention_multiplier` instead),
    /// times YaRN's `attention_factor` squared (transformers multiplies cos and sin by it, so
    /// both q and k; here the scores are).
    pub fn attention_scale(&self) -> f32 {
        let m = match &self.rope_scaling {
            Some(RopeScaling::Yarn(y)) => y.attention_factor,
            _ => 1.0,
        };
        self.attention_multiplier.unwrap_or(1.0 / (self.head_dim as f32).sqrt()) * (m * m)
    }
}

/// The dims (of `d / 2` frequencies) where YaRN's ramp starts and ends: where a frequency turns
/// `beta_fast` and `beta_slow` times over the pretraining length, rounded outwards when
/// `truncate`, kept within the dims, and apart (transformers' `find_correction_range`).
fn yarn_ramp_ends(y: &YarnScaling, d: usize, theta: f64) -> (f64, f64) {
    let dim = d as f64;
    let at = |rotations: f32| dim * (y.original_max_position_embeddings as f64 / (rotations as f64 * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let (mut low, mut high) = (at(y.beta_fast), at(y.beta_slow));
    if y.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, high) = (low.max(0.0), high.min(dim - 1.0));
    (low, if low == high { high + 0.001 } else { high })
}

/// Llama 3 rescaling of one inverse frequency: wavelengths shorter than
/// `original / high_freq_factor` are kept, longer than `original / low_freq_factor` divided by
/// `factor`, and those between interpolated smoothly in `original / wavelength`.
fn llama3_scale(inv_freq: f32, s: &Llama3Scaling) -> f32 {
    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
    let low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / s.factor
    } else {
        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}
