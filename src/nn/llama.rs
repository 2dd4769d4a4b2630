//! The Llama-family decoder (Llama, Mistral, Qwen2), on tuna's ops, so every forward is
//! differentiable through the tape and runs wherever the ops do.
//!
//! Per layer, with x the residual stream `[B*T, E]`:
//!   h = RMSNorm(x); q, k, v = h·Wqᵀ (+bq), h·Wkᵀ (+bk), h·Wvᵀ (+bv)
//!   q, k = RoPE(q), RoPE(k) (rotate_half, positions per row)
//!   x = x + Attention(q, k, v; causal, grouped-query)·Woᵀ
//!   x = x + (silu(RMSNorm(x)·Wgᵀ) * (RMSNorm(x)·Wuᵀ))·Wdᵀ
//! then logits = RMSNorm(x)·Wᵀ with W the LM head or, when tied, the embedding table.
//! Tensor names follow transformers (`model.layers.0.self_attn.q_proj.weight`, ...).

use std::path::Path;

use crate::io::config::LlamaConfig;
use crate::io::safetensors::WeightFiles;
use crate::ops::{self, AttentionMask};
use crate::{DType, Device, Error, Result, Tensor};

/// `y = x·Wᵀ (+ b)`, W `[out, in]`.
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::matmul(x, &self.weight, false, true)?;
        match &self.bias {
            Some(b) => ops::add(&y, b),
            None => Ok(y),
        }
    }
}

#[derive(Clone)]
pub struct Layer {
    pub input_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

#[derive(Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when the LM head is tied to the embedding table.
    pub lm_head: Option<Tensor>,
    inv_freq: Vec<f32>,
}

/// Keys and values of earlier positions, per layer: `[B, S, G, D]` each.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers], len: 0 }
    }
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Concatenates `[B, S1, G, D]` and `[B, S2, G, D]` along S (CPU, not recorded: caches are for
/// inference).
fn concat_seq(old: &Tensor, new: &Tensor) -> Result<Tensor> {
    let (od, nd) = (old.dims(), new.dims());
    let (b, row) = (od[0], od[2] * od[3]);
    let (a, n) = (old.cpu_f32("kv cache")?, new.cpu_f32("kv cache")?);
    let mut out = Vec::with_capacity(a.len() + n.len());
    for i in 0..b {
        out.extend_from_slice(&a[i * od[1] * row..(i + 1) * od[1] * row]);
        out.extend_from_slice(&n[i * nd[1] * row..(i + 1) * nd[1] * row]);
    }
    Tensor::from_vec(out, vec![b, od[1] + nd[1], od[2], od[3]])
}

impl Llama {
    /// Loads `dir` (config.json and safetensors weights) as f32 on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let weights = WeightFiles::open(dir)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the model from weight files, checking every tensor's presence and shape.
    pub fn from_weights(config: LlamaConfig, w: &WeightFiles) -> Result<Self> {
        let c = &config;
        let (e, d) = (c.hidden_size, c.head_dim);
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            Ok(Linear {
                weight: w.load_f32(&format!("{name}.weight"), &[out, inp])?,
                bias: if bias { Some(w.load_f32(&format!("{name}.bias"), &[out])?) } else { None },
            })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: w.load_f32(&format!("{p}.input_layernorm.weight"), &[e])?,
                q: linear(&format!("{p}.self_attn.q_proj"), c.num_heads * d, e, c.qkv_bias)?,
                k: linear(&format!("{p}.self_attn.k_proj"), c.num_kv_heads * d, e, c.qkv_bias)?,
                v: linear(&format!("{p}.self_attn.v_proj"), c.num_kv_heads * d, e, c.qkv_bias)?,
                o: linear(&format!("{p}.self_attn.o_proj"), e, c.num_heads * d, c.o_bias)?,
                post_norm: w.load_f32(&format!("{p}.post_attention_layernorm.weight"), &[e])?,
                gate: linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, e, c.mlp_bias)?,
                up: linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, e, c.mlp_bias)?,
                down: linear(&format!("{p}.mlp.down_proj"), e, c.intermediate_size, c.mlp_bias)?,
            });
        }
        // Tied checkpoints may still carry a copy of the head; an untied one must have it.
        let lm_head = if c.tie_word_embeddings { None } else { Some(w.load_f32("lm_head.weight", &[c.vocab_size, e])?) };
        Ok(Llama {
            embed: w.load_f32("model.embed_tokens.weight", &[c.vocab_size, e])?,
            norm: w.load_f32("model.norm.weight", &[e])?,
            layers,
            lm_head,
            inv_freq: config.inv_freq(),
            config,
        })
    }

    /// A model with random weights (normal-ish, std 0.02; norms 1) from `seed`: for benchmarks,
    /// tests and the built-in demo, which need no files.
    pub fn random(config: LlamaConfig, seed: u64) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let c = &config;
        let (e, d) = (c.hidden_size, c.head_dim);
        // Uniform with the variance of N(0, 0.02^2): half-width 0.02 * sqrt(3).
        let mut mat = |rows: usize, cols: usize| Tensor::from_vec(rng.vec(rows * cols, -0.0346, 0.0346), [rows, cols]);
        let ones = |n: usize| Tensor::full(1.0, [n], &Device::Cpu);
        let zeros = |n: usize| Tensor::zeros([n], DType::F32, &Device::Cpu);
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut lin = |out: usize, inp: usize, bias: bool| -> Result<Linear> {
                Ok(Linear { weight: mat(out, inp)?, bias: if bias { Some(zeros(out)?) } else { None } })
            };
            layers.push(Layer {
                input_norm: ones(e)?,
                q: lin(c.num_heads * d, e, c.qkv_bias)?,
                k: lin(c.num_kv_heads * d, e, c.qkv_bias)?,
                v: lin(c.num_kv_heads * d, e, c.qkv_bias)?,
                o: lin(e, c.num_heads * d, c.o_bias)?,
                post_norm: ones(e)?,
                gate: lin(c.intermediate_size, e, c.mlp_bias)?,
                up: lin(c.intermediate_size, e, c.mlp_bias)?,
                down: lin(e, c.intermediate_size, c.mlp_bias)?,
            });
        }
        let embed = mat(c.vocab_size, e)?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(mat(c.vocab_size, e)?) };
        Ok(Llama { embed, layers, norm: ones(e)?, lm_head, inv_freq: config.inv_freq(), config })
    }

    /// Every parameter with its transformers name, in a fixed order.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), l.input_norm.clone()));
            for (name, lin) in [("self_attn.q_proj", &l.q), ("self_attn.k_proj", &l.k), ("self_attn.v_proj", &l.v), ("self_attn.o_proj", &l.o)] {
                out.push((format!("{p}.{name}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), b.clone()));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), l.post_norm.clone()));
            for (name, lin) in [("mlp.gate_proj", &l.gate), ("mlp.up_proj", &l.up), ("mlp.down_proj", &l.down)] {
                out.push((format!("{p}.{name}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    /// Replaces every parameter by `f(name, tensor)` (e.g. `tape.param` for full fine-tuning,
    /// or a move to another device).
    pub fn map_parameters(&mut self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        let mut map = |name: String, t: &mut Tensor| -> Result<()> {
            *t = f(&name, t)?;
            Ok(())
        };
        map("model.embed_tokens.weight".into(), &mut self.embed)?;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            map(format!("{p}.input_layernorm.weight"), &mut l.input_norm)?;
            for (name, lin) in [("self_attn.q_proj", &mut l.q), ("self_attn.k_proj", &mut l.k), ("self_attn.v_proj", &mut l.v), ("self_attn.o_proj", &mut l.o)] {
                map(format!("{p}.{name}.weight"), &mut lin.weight)?;
                if let Some(b) = &mut lin.bias {
                    map(format!("{p}.{name}.bias"), b)?;
                }
            }
            map(format!("{p}.post_attention_layernorm.weight"), &mut l.post_norm)?;
            for (name, lin) in [("mlp.gate_proj", &mut l.gate), ("mlp.up_proj", &mut l.up), ("mlp.down_proj", &mut l.down)] {
                map(format!("{p}.{name}.weight"), &mut lin.weight)?;
                if let Some(b) = &mut lin.bias {
                    map(format!("{p}.{name}.bias"), b)?;
                }
            }
        }
        map("model.norm.weight".into(), &mut self.norm)?;
        if let Some(h) = &mut self.lm_head {
            map("lm_head.weight".into(), h)?;
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// Logits `[B*T, V]` for token ids `[B, T]` (i32). With a cache, the ids continue the
    /// cached positions and their keys and values are appended to it.
    pub fn forward(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.config;
        if ids.dtype() != DType::I32 || ids.shape().rank() != 2 {
            return Err(Error::BadShape { op: "Llama::forward", shape: ids.shape().clone(), expected: "token ids [B, T] as i32".into() });
        }
        let (b, t) = (ids.dims()[0], ids.dims()[1]);
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let positions: Vec<i32> = (0..b).flat_map(|_| (offset..offset + t).map(|p| p as i32)).collect();
        let positions = Tensor::from_vec_i32(positions, [b * t])?.to_device(&ids.device())?;
        let (h, g, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let mask = AttentionMask { causal: true, window: c.sliding_window };
        let scale = 1.0 / (d as f32).sqrt();

        let mut x = ops::embedding(&ops::reshape(ids, [b * t])?, &self.embed)?;
        for (i, l) in self.layers.iter().enumerate() {
            let hn = ops::rmsnorm(&x, &l.input_norm, c.rms_norm_eps)?;
            let q = ops::rope(&ops::reshape(&l.q.forward(&hn)?, [b * t, h, d])?, &positions, &self.inv_freq)?;
            let k = ops::rope(&ops::reshape(&l.k.forward(&hn)?, [b * t, g, d])?, &positions, &self.inv_freq)?;
            let v = l.v.forward(&hn)?;
            let (mut k, mut v) = (ops::reshape(&k, [b, t, g, d])?, ops::reshape(&v, [b, t, g, d])?);
            if let Some(cache) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &cache.layers[i] {
                    k = concat_seq(pk, &k)?;
                    v = concat_seq(pv, &v)?;
                }
                cache.layers[i] = Some((k.clone(), v.clone()));
            }
            let o = ops::attention(&ops::reshape(&q, [b, t, h, d])?, &k, &v, mask, scale)?;
            x = ops::add(&x, &l.o.forward(&ops::reshape(&o, [b * t, h * d])?)?)?;
            let hn = ops::rmsnorm(&x, &l.post_norm, c.rms_norm_eps)?;
            let mlp = l.down.forward(&ops::mul(&ops::silu(&l.gate.forward(&hn)?)?, &l.up.forward(&hn)?)?)?;
            x = ops::add(&x, &mlp)?;
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        let x = ops::rmsnorm(&x, &self.norm, c.rms_norm_eps)?;
        ops::matmul(&x, self.lm_head.as_ref().unwrap_or(&self.embed), false, true)
    }

    /// Next-token cross-entropy of `ids [B, T]`, as transformers computes it with
    /// `labels = ids`: position t predicts token t+1, averaged over the predicted tokens.
    /// `loss_mask` (same shape, optional) excludes targets where it is false.
    pub fn loss(&self, ids: &Tensor, loss_mask: Option<&[bool]>) -> Result<Tensor> {
        let (b, t) = (ids.dims()[0], ids.dims()[1]);
        let idv = ids.to_device(&Device::Cpu)?.to_vec::<i32>()?;
        let mut targets = vec![-100i32; b * t];
        for r in 0..b {
            for s in 0..t.saturating_sub(1) {
                let target = r * t + s + 1;
                if loss_mask.is_none_or(|m| m[target]) {
                    targets[r * t + s] = idv[target];
                }
            }
        }
        let logits = self.forward(ids, None)?;
        let targets = Tensor::from_vec_i32(targets, [b * t])?.to_device(&logits.device())?;
        ops::cross_entropy(&logits, &targets, -100)
    }
}
