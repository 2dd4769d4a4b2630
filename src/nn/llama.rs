//! The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, Gemma, Gemma 3), on tuna's ops, so
//! every forward is differentiable through the tape and runs wherever the ops do. Its decoder
//! layer is `nn::layer`.
//!
//! Per layer, with x the residual stream `[B*T, E]`:
//!   h = RMSNorm(x); q, k, v = h·Wqᵀ (+bq), h·Wkᵀ (+bk), h·Wvᵀ (+bv)
//!   q, k = RMSNorm(q), RMSNorm(k) over each head (Qwen3 only; with RoPE in one op,
//!          `ops::rmsnorm_rope`, one kernel each way on CUDA)
//!   q, k = RoPE(q), RoPE(k) (rotate_half, positions per row)
//!   x = x + Attention(q, k, v; causal, grouped-query)·Woᵀ
//!   x = x + (silu(RMSNorm(x)·Wgᵀ) * (RMSNorm(x)·Wuᵀ))·Wdᵀ
//! then logits = RMSNorm(x)·Wᵀ with W the LM head or, when tied, the embedding table.
//! SmolLM3's NoPE layers skip RoPE; Granite scales the embeddings, each block's output before
//! its residual add and the logits, and sets the softmax scale. Gemma gates its MLP with
//! the tanh GELU instead of SiLU (GeGLU) and scales the embeddings by sqrt(E); its norms' `1 + w`
//! is folded into the weights at load. Gemma 3 also RMS-norms each block's output before its
//! residual add and mixes sliding-window layers (their own RoPE base) with global ones.
//! Tensor names follow transformers (`model.layers.0.self_attn.q_proj.weight`, ...).

use std::path::Path;

use rayon::prelude::*;

use crate::io::config::LlamaConfig;
use crate::io::safetensors::WeightFiles;
use crate::ops::{self, AttentionMask};
use crate::{DType, Device, Error, Result, Tensor};

pub use super::kv_cache::KvCache;
pub use super::layer::{Layer, OutNorms, QkNorm};
use super::layer::LayerCtx;
pub use super::linear::{Linear, SparseDelta};

/// The transformers names of a layer's norms around the MLP (the attention's input norm is
/// always `input_layernorm`).
struct NormNames {
    /// The MLP's input norm.
    mlp_in: &'static str,
    /// The attention and MLP output norms (Gemma 3).
    outs: Option<(&'static str, &'static str)>,
}

impl NormNames {
    fn of(c: &LlamaConfig) -> Self {
        if c.sandwich_norms {
            NormNames { mlp_in: "pre_feedforward_layernorm", outs: Some(("post_attention_layernorm", "post_feedforward_layernorm")) }
        } else {
            NormNames { mlp_in: "post_attention_layernorm", outs: None }
        }
    }
}

/// The names of a decoder layer's linear modules, as transformers and PEFT call them.
pub const LINEAR_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// `self_attn` or `mlp`: the submodule a linear module lives in.
fn module_group(name: &str) -> &'static str {
    if matches!(name, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    }
}

#[derive(Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when the LM head is tied to the embedding table.
    pub lm_head: Option<Tensor>,
    /// Set while training: seeds the LoRA dropout masks of the next forward. `None`: no dropout.
    pub dropout_seed: Option<u64>,
    /// Training: keep only each decoder layer's input and recompute the layer in the backward
    /// (`ops::checkpoint`), trading one more forward for the layers' activations.
    pub checkpoint_layers: bool,
    inv_freq: Vec<f32>,
    /// The windowed layers' own RoPE frequencies (Gemma 3), computed once like `inv_freq`.
    local_inv_freq: Option<Vec<f32>>,
}

/// Where the examples packed into each row start: for every token (`[B*T]`), the position in
/// its row of its example's first token.
#[derive(Clone, Debug, PartialEq)]
pub struct Packing {
    pub starts: std::sync::Arc<Vec<u32>>,
}

impl Llama {
    /// Loads `dir` (config.json and safetensors weights) as f32 on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let weights = WeightFiles::open(dir)?;
        Self::from_weights(config, &weights)
    }

    /// [`Llama::load`] with each decoder linear's weight quantized to NF4 as it is read: the
    /// model [`Llama::quantize_nf4`] makes from `load`'s, byte for byte, without ever holding
    /// every weight in f32 (a QLoRA base's peak memory is its NF4 weights, the embeddings and
    /// one f32 weight per thread of the load).
    pub fn load_nf4(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let weights = WeightFiles::open(dir)?;
        Self::from_weights_as(config, &weights, DType::NF4)
    }

    /// [`Llama::load`] with every matrix kept in bf16 as it is read: the model
    /// [`Llama::matrices_in_bf16`] makes from `load`'s, without ever holding every weight in f32.
    pub fn load_bf16(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let weights = WeightFiles::open(dir)?;
        Self::from_weights_as(config, &weights, DType::BF16)
    }

    /// Builds the model from weight files, checking every tensor's presence and shape.
    pub fn from_weights(config: LlamaConfig, w: &WeightFiles) -> Result<Self> {
        Self::from_weights_as(config, w, DType::F32)
    }

    /// `from_weights`, the decoder linears' weights turned one by one into `linears` (F32 as
    /// read, NF4 quantized, BF16 rounded; with BF16 the embeddings and LM head too).
    fn from_weights_as(config: LlamaConfig, w: &WeightFiles, linears: DType) -> Result<Self> {
        let c = &config;
        let (e, d) = (c.hidden_size, c.head_dim);
        // Gemma's `1 + w` is held as one weight (`norm_weight_offset`).
        let norm = |name: &str, n: usize| -> Result<Tensor> {
            let w = w.load_f32(name, &[n])?;
            if c.norm_weight_offset == 0.0 {
                return Ok(w);
            }
            let v = w.to_vec::<f32>()?.into_iter().map(|x| x + c.norm_weight_offset).collect();
            Tensor::from_vec(v, [n])
        };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = match linears {
                DType::NF4 => Tensor::from_nf4(crate::kernels::nf4::quantize_tensor(&w.load_f32(&format!("{name}.weight"), &[out, inp])?)?, [out, inp])?,
                DType::BF16 => w.load_bf16(&format!("{name}.weight"), &[out, inp])?,
                _ => w.load_f32(&format!("{name}.weight"), &[out, inp])?,
            };
            Ok(Linear::new(weight, if bias { Some(w.load_f32(&format!("{name}.bias"), &[out])?) } else { None }))
        };
        // The layers are read side by side: a load is page faults and copies (or bf16
        // conversions) of independent tensors. The first error in layer order is reported.
        let layer = |i: usize| -> Result<Layer> {
            let p = format!("model.layers.{i}");
            let names = NormNames::of(c);
            Ok(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"), e)?,
                q: linear(&format!("{p}.self_attn.q_proj"), c.num_heads * d, e, c.qkv_bias)?,
                k: linear(&format!("{p}.self_attn.k_proj"), c.num_kv_heads * d, e, c.qkv_bias)?,
                v: linear(&format!("{p}.self_attn.v_proj"), c.num_kv_heads * d, e, c.qkv_bias)?,
                o: linear(&format!("{p}.self_attn.o_proj"), e, c.num_heads * d, c.o_bias)?,
                qk_norm: if c.qk_norm {
                    Some(QkNorm { q: norm(&format!("{p}.self_attn.q_norm.weight"), d)?, k: norm(&format!("{p}.self_attn.k_norm.weight"), d)? })
                } else {
                    None
                },
                post_norm: norm(&format!("{p}.{}.weight", names.mlp_in), e)?,
                out_norms: match names.outs {
                    Some((a, m)) => Some(OutNorms { attn: norm(&format!("{p}.{a}.weight"), e)?, mlp: norm(&format!("{p}.{m}.weight"), e)? }),
                    None => None,
                },
                gate: linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, e, c.mlp_bias)?,
                up: linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, e, c.mlp_bias)?,
                down: linear(&format!("{p}.mlp.down_proj"), e, c.intermediate_size, c.mlp_bias)?,
                rope: c.rotates(i),
                windowed: c.windowed(i),
            })
        };
        let layers = (0..c.num_layers).into_par_iter().map(layer).collect::<Vec<_>>().into_iter().collect::<Result<Vec<_>>>()?;
        // Tied checkpoints may still carry a copy of the head; an untied one must have it.
        let matrix = |name: &str| if linears == DType::BF16 { w.load_bf16(name, &[c.vocab_size, e]) } else { w.load_f32(name, &[c.vocab_size, e]) };
        let lm_head = if c.tie_word_embeddings { None } else { Some(matrix("lm_head.weight")?) };
        Ok(Llama {
            embed: matrix("model.embed_tokens.weight")?,
            norm: norm("model.norm.weight", e)?,
            layers,
            lm_head,
            dropout_seed: None,
            checkpoint_layers: false,
            inv_freq: config.inv_freq(),
            local_inv_freq: config.local_inv_freq(),
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
        for i in 0..c.num_layers {
            let mut lin = |out: usize, inp: usize, bias: bool| -> Result<Linear> {
                Ok(Linear::new(mat(out, inp)?, if bias { Some(zeros(out)?) } else { None }))
            };
            layers.push(Layer {
                input_norm: ones(e)?,
                q: lin(c.num_heads * d, e, c.qkv_bias)?,
                k: lin(c.num_kv_heads * d, e, c.qkv_bias)?,
                v: lin(c.num_kv_heads * d, e, c.qkv_bias)?,
                o: lin(e, c.num_heads * d, c.o_bias)?,
                qk_norm: if c.qk_norm { Some(QkNorm { q: ones(d)?, k: ones(d)? }) } else { None },
                post_norm: ones(e)?,
                out_norms: if c.sandwich_norms { Some(OutNorms { attn: ones(e)?, mlp: ones(e)? }) } else { None },
                gate: lin(c.intermediate_size, e, c.mlp_bias)?,
                up: lin(c.intermediate_size, e, c.mlp_bias)?,
                down: lin(e, c.intermediate_size, c.mlp_bias)?,
                rope: c.rotates(i),
                windowed: c.windowed(i),
            });
        }
        let embed = mat(c.vocab_size, e)?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(mat(c.vocab_size, e)?) };
        Ok(Llama { embed, layers, norm: ones(e)?, lm_head, dropout_seed: None, checkpoint_layers: false, inv_freq: config.inv_freq(), local_inv_freq: config.local_inv_freq(), config })
    }

    /// Marks every linear's weight and the LM head for a CPU run of many forwards without a
    /// backward (`tuna perplexity`): each keeps the transpose its first product makes
    /// ([`Tensor::keep_cpu_transpose`]). Generation leaves them unmarked and holds each weight
    /// once. Training keeps the transposes anyway.
    pub fn keep_cpu_transposes(&self) {
        for (_, l) in self.linears() {
            l.weight.keep_cpu_transpose();
        }
        self.head().keep_cpu_transpose();
    }

    /// Every linear module with its transformers path (`model.layers.0.self_attn.q_proj`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (name, lin) in LINEAR_MODULES.iter().zip([&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]) {
                out.push((format!("model.layers.{i}.{}.{name}", module_group(name)), lin));
            }
        }
        out
    }

    /// As `linears`, mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, lin) in LINEAR_MODULES.iter().zip([&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down]) {
                out.push((format!("model.layers.{i}.{}.{name}", module_group(name)), lin));
            }
        }
        out
    }

    /// QLoRA's base: every decoder linear's weight quantized to NF4 (bitsandbytes' format,
    /// `kernels::nf4`), as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    /// bnb_4bit_use_double_quant=True)` does; embeddings, norms, the LM head and biases stay as
    /// they are. Ops read the weights dequantized one op at a time. Returns (weights, bytes)
    /// of what was quantized.
    pub fn quantize_nf4(&mut self) -> Result<(usize, usize)> {
        let (mut n, mut bytes) = (0, 0);
        for (_, lin) in self.linears_mut() {
            if lin.weight.dtype() == DType::NF4 {
                continue;
            }
            // Quantized where the weight is (bitsandbytes' algorithm: `nf4::cpu`, or the device
            // passes of `nf4::quantize_tensor`, the same bytes), then kept there (a GPU holds
            // the quantized parts in device buffers).
            let q = crate::kernels::nf4::quantize_tensor(&lin.weight)?;
            n += q.len;
            bytes += q.bytes();
            lin.weight = Tensor::from_nf4(q, lin.weight.shape().clone())?.to_device(&lin.weight.device())?;
        }
        Ok((n, bytes))
    }

    /// Every matrix (the decoder linears' weights, the embeddings, the LM head) kept in bf16 on
    /// the CPU: exact for a bf16 checkpoint, rounded to nearest even otherwise. Norms, biases
    /// and activations stay f32. Ops read the matrices widened to f32, so the model computes
    /// what the same rounded weights in f32 compute (to the bit for decoding's single rows,
    /// within f32 rounding for a batch of rows, whose products go by blocks of W) in half
    /// their memory; decoding, which streams every weight once a token, reads half the bytes. The
    /// matrices stay frozen: LoRA trains on top; full, head and sparse fine-tuning need f32.
    /// Returns the bytes the bf16 matrices take.
    pub fn matrices_in_bf16(&mut self) -> Result<usize> {
        if self.device() != Device::Cpu {
            return Err(Error::InvalidArgument(format!("matrices in bf16 beside f32 activations are a CPU form; the model is on {}", self.device())));
        }
        let mut bytes = 0;
        let mut round = |name: &str, t: &mut Tensor| -> Result<()> {
            match t.dtype() {
                DType::F32 => *t = t.to_dtype(DType::BF16)?,
                DType::BF16 => {}
                dt => return Err(Error::InvalidArgument(format!("{name}: a {dt} weight cannot be kept in bf16 (only f32)"))),
            }
            bytes += 2 * t.elem_count();
            Ok(())
        };
        round("model.embed_tokens.weight", &mut self.embed)?;
        if let Some(h) = &mut self.lm_head {
            round("lm_head.weight", h)?;
        }
        for (name, lin) in self.linears_mut() {
            round(&name, &mut lin.weight)?;
        }
        Ok(bytes)
    }

    /// Every base parameter (LoRA adapters excluded) with its transformers name.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.clone().map_parameters(|name, t| {
            out.push((name.to_string(), t.clone()));
            Ok(t.clone())
        })
        .expect("the identity map cannot fail");
        out
    }

    /// Replaces every base parameter by `f(name, tensor)` (e.g. `tape.param` for full
    /// fine-tuning, or a move to another device). Order: embeddings, every layer's linears,
    /// every layer's norms (Qwen3's q and k norms after the other two, then Gemma 3's output
    /// norms), then the final norm and the head. Norms are as the model holds them: with
    /// `norm_weight_offset` added (Gemma's `1 + w`).
    pub fn map_parameters(&mut self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        let mut map = |name: &str, t: &mut Tensor| -> Result<()> {
            *t = f(name, t)?;
            Ok(())
        };
        map("model.embed_tokens.weight", &mut self.embed)?;
        for (path, lin) in self.linears_mut() {
            map(&format!("{path}.weight"), &mut lin.weight)?;
            if let Some(b) = &mut lin.bias {
                map(&format!("{path}.bias"), b)?;
            }
        }
        let names = NormNames::of(&self.config);
        for (i, l) in self.layers.iter_mut().enumerate() {
            map(&format!("model.layers.{i}.input_layernorm.weight"), &mut l.input_norm)?;
            map(&format!("model.layers.{i}.{}.weight", names.mlp_in), &mut l.post_norm)?;
            if let Some(n) = &mut l.qk_norm {
                map(&format!("model.layers.{i}.self_attn.q_norm.weight"), &mut n.q)?;
                map(&format!("model.layers.{i}.self_attn.k_norm.weight"), &mut n.k)?;
            }
            if let (Some(n), Some((a, m))) = (&mut l.out_norms, names.outs) {
                map(&format!("model.layers.{i}.{a}.weight"), &mut n.attn)?;
                map(&format!("model.layers.{i}.{m}.weight"), &mut n.mlp)?;
            }
        }
        map("model.norm.weight", &mut self.norm)?;
        if let Some(h) = &mut self.lm_head {
            map("lm_head.weight", h)?;
        }
        Ok(())
    }

    /// Writes a Hugging Face model folder: `model.safetensors` (each weight in its dtype, f32
    /// after [`Llama::load`]; transformers names; a tied head is not written, as transformers does) and copies of the config and tokenizer files
    /// from `src_dir`. Files are written to temporary names and renamed.
    pub fn save(&self, src_dir: &Path, out_dir: &Path) -> Result<()> {
        self.save_impl(src_dir, out_dir, None)
    }

    /// [`Llama::save`] with every weight written in `dtype` (f32, bf16 or f16; e.g. a merged
    /// model in its bf16 base's dtype), each rounded as it is written.
    pub fn save_in(&self, src_dir: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
        self.save_impl(src_dir, out_dir, Some(dtype))
    }

    fn save_impl(&self, src_dir: &Path, out_dir: &Path, dtype: Option<DType>) -> Result<()> {
        std::fs::create_dir_all(out_dir).map_err(|e| Error::file(out_dir, format!("cannot create: {e}")))?;
        if self.linears().iter().any(|(_, l)| l.lora.is_some()) {
            return Err(Error::InvalidArgument("merge the LoRA adapters (merge_lora) before saving the full model".into()));
        }
        // Written one tensor at a time from where each lies (a device's downloaded then).
        let mut tensors = self.parameters();
        // Gemma's norms are written as transformers stores them: `w`, not the `1 + w` held.
        let offset = self.config.norm_weight_offset;
        if offset != 0.0 {
            for (name, t) in tensors.iter_mut().filter(|(name, _)| name.ends_with("norm.weight")) {
                let w: Vec<f32> = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec::<f32>()?.into_iter().map(|x| x - offset).collect();
                *t = Tensor::from_vec(w, t.shape().clone())?.to_dtype(t.dtype()).map_err(|e| Error::InvalidArgument(format!("writing {name}: {e}")))?;
            }
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let file = out_dir.join("model.safetensors");
        match dtype {
            Some(d) => crate::io::safetensors::save_in(&file, &tensors, d, Some(meta))?,
            None => crate::io::safetensors::save(&file, &tensors, Some(meta))?,
        }
        for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"] {
            let src = src_dir.join(f);
            if src.exists() {
                let tmp = out_dir.join(format!("{f}.tmp"));
                std::fs::copy(&src, &tmp)
                    .and_then(|_| std::fs::rename(&tmp, out_dir.join(f)))
                    .map_err(|e| Error::file(&src, format!("cannot copy to {}: {e}", out_dir.display())))?;
            }
        }
        if !src_dir.join("config.json").exists() {
            // A model built in code (the demo's): write its config in transformers' form.
            let path = out_dir.join("config.json");
            std::fs::write(&path, serde_json::to_string_pretty(&self.config.to_hf_json()).expect("json"))
                .map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// The model with every weight (and LoRA adapter, sparse delta) copied to `device`, where
    /// its forward and backward then run (NF4 weights move as their quantized parts). On CUDA
    /// the kernels are 16-bit: follow with `to_dtype(DType::BF16)` (sparse deltas stay f32).
    pub fn to_device(&self, device: &Device) -> Result<Llama> {
        // A wgpu kernel binds each tensor whole: refuse a weight too large for that before
        // uploading any.
        if let Device::Wgpu(i) = device {
            let rt = crate::device::wgpu::runtime(*i)?;
            for (name, t) in self.parameters() {
                if t.dtype() == DType::BF16 {
                    return Err(Error::InvalidArgument(format!(
                        "moving the model to {device}: `{name}` is bf16 (bf16 matrices beside f32 activations are a CPU form, `matrices_in_bf16`); wgpu runs f32 or f16 models"
                    )));
                }
                let bytes = if t.dtype() == DType::NF4 { t.elem_count().div_ceil(2) } else { t.elem_count() * t.dtype().size_in_bytes() };
                rt.check_tensor_bytes(bytes, &format!("moving the model to {device}: `{name}` ({} {})", t.dtype(), t.shape()))?;
            }
        }
        let mut m = self.clone();
        m.map_parameters(|_, t| t.to_device(device))?;
        m.map_lora(|_, t| t.to_device(device))?;
        for (_, lin) in m.linears_mut() {
            if let Some(sp) = &mut lin.sparse {
                sp.values = sp.values.to_device(device)?;
            }
        }
        Ok(m)
    }

    /// A copy with every float weight (and adapter) converted to `dtype` on its device
    /// (`Tensor::to_dtype`): bf16 is how the model runs on CUDA; f16 runs the forward in half
    /// precision on wgpu (f32 math inside the kernels, f32 statistics). NF4 weights stay NF4:
    /// the NF4 kernels dequantize them in the tiles and produce the activations' dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Llama> {
        let mut m = self.clone();
        m.map_parameters(|_, t| if t.dtype() == DType::NF4 { Ok(t.clone()) } else { t.to_dtype(dtype) })?;
        m.map_lora(|_, t| t.to_dtype(dtype))?;
        Ok(m)
    }

    /// Logits `[B*T, V]` for token ids `[B, T]` (i32). With a cache, the ids continue the
    /// cached positions and their keys and values are appended to it.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_impl(ids, None, cache)
    }

    /// Logits `[B*T, V]` for packed rows: `packing` says where each example starts, so positions
    /// restart and attention stays within examples.
    pub fn forward_packed(&self, ids: &Tensor, packing: &Packing) -> Result<Tensor> {
        self.forward_impl(ids, Some(packing), None)
    }

    fn forward_impl(&self, ids: &Tensor, packing: Option<&Packing>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.on_host_pool(|| {
            let x = self.hidden(ids, packing, cache)?;
            ops::matmul(&x, self.head(), false, true)
        })
    }

    /// Logits `[B, V]` of the last position of each row only: what generation reads. The head
    /// multiplies B rows instead of B*T, so a prompt of T tokens costs no `[T, V]` logits
    /// (transformers' `logits_to_keep = 1`). With a cache as in [`Llama::forward`].
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.on_host_pool(|| {
            let x = self.hidden(ids, None, cache)?;
            let (b, t) = (ids.dims()[0], ids.dims()[1]);
            let x = if t == 1 {
                x
            } else {
                // The rows' last positions, gathered as an embedding lookup into x (any device).
                let last: Vec<i32> = (0..b).map(|r| (r * t + t - 1) as i32).collect();
                ops::embedding(&Tensor::from_vec_i32(last, [b])?.to_device(&self.device())?, &x)?
            };
            ops::matmul(&x, self.head(), false, true)
        })
    }

    /// Runs a pass on a rayon worker when the model is on the CPU, so its many parallel ops
    /// start from inside the pool (`device::cpu::on_pool`); a GPU model's pass only queues
    /// kernels, on the calling thread.
    fn on_host_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.device() == Device::Cpu {
            crate::device::cpu::on_pool(f)
        } else {
            f()
        }
    }

    /// The LM head `[V, H]`: its own matrix, or the embedding table when tied.
    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The final hidden states `[B*T, H]` (after the last norm, and Granite's logit scaling),
    /// which the head turns into logits.
    fn hidden(&self, ids: &Tensor, packing: Option<&Packing>, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.config;
        if ids.dtype() != DType::I32 || ids.shape().rank() != 2 {
            return Err(Error::BadShape { op: "Llama::forward", shape: ids.shape().clone(), expected: "token ids [B, T] as i32".into() });
        }
        let (b, t) = (ids.dims()[0], ids.dims()[1]);
        let dev = self.device();
        // Token ids are checked on the host, then go where the weights are.
        let ids = if ids.device() != dev {
            if ids.device() == Device::Cpu {
                crate::kernels::embedding::check_ids(ids.to_vec::<i32>()?.as_slice(), c.vocab_size)?;
            }
            &ids.to_device(&dev)?
        } else {
            ids
        };
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let positions: Vec<i32> = match packing {
            Some(pk) => {
                if pk.starts.len() != b * t {
                    return Err(Error::InvalidArgument(format!("packing: {} starts for [B={b}, T={t}]", pk.starts.len())));
                }
                pk.starts.iter().enumerate().map(|(i, &s)| (i % t) as i32 - s as i32).collect()
            }
            None => (0..b).flat_map(|_| (offset..offset + t).map(|p| p as i32)).collect(),
        };
        let positions = Tensor::from_vec_i32(positions, [b * t])?.to_device(&dev)?;
        let ctx = LayerCtx {
            b,
            t,
            heads: (c.num_heads, c.num_kv_heads, c.head_dim),
            eps: c.rms_norm_eps,
            scale: c.attention_scale(),
            residual: (c.residual_multiplier != 1.0).then_some(c.residual_multiplier),
            positions,
            inv_freq: Tensor::from_vec(self.inv_freq.clone(), [self.inv_freq.len()])?.to_device(&dev)?,
            local_inv_freq: match &self.local_inv_freq {
                Some(f) => Some(Tensor::from_vec(f.clone(), [f.len()])?.to_device(&dev)?),
                None => None,
            },
            mask: AttentionMask { causal: true, window: c.sliding_window, segment_starts: packing.map(|p| p.starts.clone()) },
            act: c.hidden_act,
        };

        // Each linear module gets its own dropout stream: (forward seed, module index).
        let seed = |i: usize, m: usize| self.dropout_seed.map(|s| s ^ ((i * LINEAR_MODULES.len() + m) as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03));
        let mut x = ops::embedding(&ops::reshape(ids, [b * t])?, &self.embed)?;
        if c.embedding_multiplier != 1.0 {
            x = ops::scale(&x, c.embedding_multiplier)?;
        }
        // The last MLP output not yet added to x (see `Layer::forward`).
        let mut pending: Option<Tensor> = None;
        for (i, l) in self.layers.iter().enumerate() {
            let seeds: [Option<u64>; 7] = std::array::from_fn(|m| seed(i, m));
            if self.checkpoint_layers && cache.is_none() {
                x = l.forward_checkpointed(&x, &ctx, seeds)?;
                continue;
            }
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (nx, mlp) = l.forward(&x, pending.as_ref(), &ctx, seeds, slot)?;
            (x, pending) = (nx, Some(mlp));
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        let x = match pending {
            Some(mlp) => ops::add_rmsnorm(&x, &mlp, &self.norm, c.rms_norm_eps)?.1,
            None => ops::rmsnorm(&x, &self.norm, c.rms_norm_eps)?,
        };
        // Granite divides the logits; scaling the head's input by the inverse is the same
        // product (within rounding), for the plain head and the fused loss alike.
        if c.logits_scaling != 1.0 {
            return ops::scale(&x, 1.0 / c.logits_scaling);
        }
        Ok(x)
    }

    /// Next-token cross-entropy of `ids [B, T]`, as transformers computes it with
    /// `labels = ids`: position t predicts token t+1, averaged over the predicted tokens.
    /// `loss_mask` (same shape, optional) excludes targets where it is false.
    pub fn loss(&self, ids: &Tensor, loss_mask: Option<&[bool]>) -> Result<Tensor> {
        self.loss_impl(ids, loss_mask, None)
    }

    /// The loss of packed rows (see `forward_packed`); the first token of each example is never
    /// a target of the example before it.
    pub fn loss_packed(&self, ids: &Tensor, loss_mask: Option<&[bool]>, packing: &Packing) -> Result<Tensor> {
        self.loss_impl(ids, loss_mask, Some(packing))
    }

    fn loss_impl(&self, ids: &Tensor, loss_mask: Option<&[bool]>, packing: Option<&Packing>) -> Result<Tensor> {
        let (b, t) = (ids.dims()[0], ids.dims()[1]);
        let idv = ids.to_device(&Device::Cpu)?.to_vec::<i32>()?;
        let mut targets = vec![-100i32; b * t];
        for r in 0..b {
            for s in 0..t.saturating_sub(1) {
                let target = r * t + s + 1;
                let starts_example = packing.is_some_and(|p| p.starts[target] as usize == s + 1);
                if loss_mask.is_none_or(|m| m[target]) && !starts_example {
                    targets[r * t + s] = idv[target];
                }
            }
        }
        // On the host: the op checks and counts them there before its one upload.
        let targets = Tensor::from_vec_i32(targets, [b * t])?;
        self.on_host_pool(|| {
            // The head and the loss as one op, so the [B*T, V] logits are never held in full.
            let x = self.hidden(ids, packing, None)?;
            ops::linear_cross_entropy(&x, self.head(), &targets, -100, None)
        })
    }
}
