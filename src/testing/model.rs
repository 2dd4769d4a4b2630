//! The Llama model on a GPU against the same model on the CPU: loss and LoRA gradients (with
//! dropout, packed rows, checkpointed layers), a few training steps, and logits through the KV
//! cache. The bodies `tests/model_devices.rs` runs on wgpu (f32) and `tools/gpu-check` on CUDA
//! (bf16, f32 adapters).
//!
//! The CPU runs in f32 on the device's weights (rounded to the device's dtype and back), so
//! the difference measured is the device's arithmetic alone. Tolerances per dtype
//! (`ModelTolerance::for_dtype`): f32 differs only in the order of summation (1e-4 relative);
//! bf16 rounds every activation to 8 significant bits (unit roundoff 2^-9 ≈ 0.2%), so a
//! gradient, the product of ~40 rounded ops in this model, may differ by a few percent, while
//! the loss, a mean over tokens, averages the rounding out to well under 1%. f16 (wgpu) keeps
//! 11 bits, and its bounds are tighter in proportion.

use crate::io::config::{Arch, LlamaConfig};
use crate::nn::{KvCache, Llama, Packing};
use crate::peft::{LoraConfig, Regrow, SparseConfig};
use crate::rng::Rng;
use crate::tape::Tape;
use crate::train::data::Sequence;
use crate::optim::{Layout, OptimizerConfig};
use crate::train::{Method, TrainConfig, Trainer};
use crate::{DType, Device, Tensor};

type CheckResult = std::result::Result<String, String>;

/// Relative bounds of a device's results against the CPU's.
#[derive(Clone, Copy, Debug)]
pub struct ModelTolerance {
    /// |loss_dev - loss_cpu| / |loss_cpu|.
    pub loss: f64,
    /// ‖g_dev - g_cpu‖₂ / ‖g_cpu‖₂ per gradient tensor.
    pub grad: f64,
    /// max |logit_dev - logit_cpu| / max |logit_cpu|.
    pub logits: f64,
    /// ‖master_dev - master_cpu‖₂ / ‖master_cpu - master_initial‖₂ after a few AdamW steps.
    pub update: f64,
}

impl ModelTolerance {
    pub fn for_dtype(dtype: DType) -> ModelTolerance {
        match dtype {
            DType::F32 => ModelTolerance { loss: 1e-4, grad: 1e-3, logits: 1e-4, update: 1e-2 },
            // 11 significant bits: 8x bf16's precision.
            DType::F16 => ModelTolerance { loss: 2e-3, grad: 1e-2, logits: 5e-3, update: 0.5 },
            _ => ModelTolerance { loss: 1e-2, grad: 5e-2, logits: 3e-2, update: 0.5 },
        }
    }
}

/// A small Llama whose attention has a head dim the CUDA kernels have (64): hidden 128, two
/// query heads over one key/value head, two layers, vocabulary 320.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig::llama(320, 128, 256, 2, 2, 1)
}

/// `tiny_config` with the model options that only change scalars and which layers rotate:
/// Granite's four multipliers, a SmolLM3 NoPE layer (the second) and YaRN scaling.
pub fn tiny_scalars_config() -> LlamaConfig {
    use crate::io::config::{RopeScaling, YarnScaling};
    let yarn = YarnScaling { factor: 4.0, original_max_position_embeddings: 8.0, beta_fast: 32.0, beta_slow: 1.0, truncate: true, attention_factor: 1.1386 };
    LlamaConfig {
        arch: Arch::Granite,
        embedding_multiplier: 3.0,
        residual_multiplier: 0.6,
        attention_multiplier: Some(0.1),
        logits_scaling: 0.7,
        nope_layers: vec![1],
        rope_scaling: Some(RopeScaling::Yarn(yarn)),
        ..tiny_config()
    }
}

/// `tiny_config` laid out as Gemma 3: GeGLU, norms after both blocks too (every norm holding
/// `1 + w`), q/k norms, embeddings times sqrt(E), a tied head, the softmax scale its own, of
/// the two layers the first windowed (5 keys, RoPE base 1e4) and the second global (1e6), and
/// Gemma's head dim, 256 (q_proj 128 -> 512).
pub fn tiny_gemma_config() -> LlamaConfig {
    LlamaConfig {
        arch: Arch::Gemma3,
        hidden_act: crate::ops::GluAct::GeluTanh,
        sandwich_norms: true,
        norm_weight_offset: 1.0,
        qk_norm: true,
        embedding_multiplier: (128f32).sqrt(),
        tie_word_embeddings: true,
        // Not 1/sqrt(256) (so a device that ignored it would differ), but near it, as
        // Gemma's `query_pre_attn_scalar` of 256 has it.
        attention_multiplier: Some(0.08),
        sliding_window: Some(5),
        global_layers: vec![1],
        rope_theta: 1e6,
        local_rope_theta: Some(1e4),
        head_dim: 256,
        ..tiny_config()
    }
}

/// `tiny_config` laid out as Qwen3: an RMSNorm over each head of q and k before RoPE, and, as
/// in Qwen3-0.6B, heads twice as wide in all as the hidden size (four query heads over two
/// key/value heads of 64: q_proj is 128 -> 256).
pub fn tiny_qk_norm_config() -> LlamaConfig {
    LlamaConfig { arch: Arch::Qwen3, qk_norm: true, num_heads: 4, num_kv_heads: 2, ..tiny_config() }
}

/// A random model of `config` from `seed`, rounded to `dtype` and held in f32 on the CPU,
/// whose q/k norm weights (if any) and Gemma's output norms are drawn from [0.5, 1.5] rather
/// than left at 1, so that a device that skipped them or read them wrongly would differ.
fn random_model(config: LlamaConfig, seed: u64, dtype: DType) -> crate::Result<Llama> {
    let mut m = Llama::random(config, seed)?;
    let mut rng = Rng::new(seed + 100);
    let mut drawn = vec!["q_norm.weight", "k_norm.weight"];
    if m.config.sandwich_norms {
        drawn.extend(["post_attention_layernorm.weight", "post_feedforward_layernorm.weight"]);
    }
    m.map_parameters(|name, t| if drawn.iter().any(|n| name.ends_with(n)) { Tensor::from_vec(rng.vec(t.elem_count(), 0.5, 1.5), t.shape().clone()) } else { Ok(t.clone()) })?;
    m.to_dtype(dtype)?.to_dtype(DType::F32)
}

/// A random tiny model (weights rounded to `dtype`) with LoRA rank 4 on every linear (or, with
/// `qv_only`, on q_proj and v_proj alone, so the other linears run without an adapter) and
/// non-zero B (so the adapters change the output), on the CPU in f32.
pub fn tiny_lora_model(dtype: DType, dropout: f32, qv_only: bool) -> crate::Result<Llama> {
    lora_model(tiny_config(), dtype, dropout, qv_only)
}

fn lora_model(config: LlamaConfig, dtype: DType, dropout: f32, qv_only: bool) -> crate::Result<Llama> {
    let mut m = random_model(config, 3, dtype)?;
    let mut cfg = LoraConfig { r: 4, alpha: 8.0, dropout, ..Default::default() };
    if qv_only {
        cfg.target_modules = vec!["q_proj".into(), "v_proj".into()];
    }
    m.add_lora(&cfg, 5)?;
    let mut rng = Rng::new(9);
    m.map_lora(|name, t| if name.contains("lora_B") { Tensor::from_vec(rng.vec(t.elem_count(), -0.05, 0.05), t.shape().clone()) } else { Ok(t.clone()) })?;
    Ok(m)
}

/// The CPU model on `dev` in `dtype`, its adapters kept as f32 masters (as the trainer does).
pub fn on_device(cpu: &Llama, dev: &Device, dtype: DType) -> crate::Result<Llama> {
    let mut m = cpu.to_device(dev)?.to_dtype(dtype)?;
    let adapters = cpu.lora_parameters();
    let mut it = adapters.into_iter();
    m.map_lora(|_, _| it.next().expect("one adapter per slot").1.to_device(dev))?;
    Ok(m)
}

/// Prefixes an error with what failed.
fn ctx(what: impl std::fmt::Display) -> impl Fn(crate::Error) -> String {
    move |err| format!("{what}: {err}")
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        d += (*g as f64 - *w as f64).powi(2);
        n += (*w as f64).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

/// Token ids `[b, t]` in the tiny vocabulary.
fn ids(b: usize, t: usize, seed: u64) -> Vec<i32> {
    let mut rng = Rng::new(seed);
    (0..b * t).map(|_| rng.below(320) as i32).collect()
}

/// Loss and the LoRA gradients of one forward + backward of `model` on `ids` `[2, 16]`,
/// optionally with dropout, packed rows (two examples per row) and checkpointed layers.
fn loss_and_grads(model: &Llama, ids: &[i32], dropout_seed: Option<u64>, packed: bool, checkpoint: bool) -> crate::Result<(f32, Vec<Vec<f32>>)> {
    let tape = Tape::new();
    let mut m = model.clone();
    m.dropout_seed = dropout_seed;
    m.checkpoint_layers = checkpoint;
    let mut params = Vec::new();
    m.map_lora(|_, t| {
        let p = tape.param(t);
        params.push(p.clone());
        Ok(p)
    })?;
    let ids_t = Tensor::from_vec_i32(ids.to_vec(), [2, 16])?;
    let loss = if packed {
        // Row r holds an example of 16 - 5r tokens, then one of the rest.
        let starts: Vec<u32> = (0..2).flat_map(|r| (0..16u32).map(move |i| if i < 11 + 5 * r as u32 { 0 } else { 11 + 5 * r as u32 })).collect();
        let pk = Packing { starts: std::sync::Arc::new(starts) };
        m.loss_packed(&ids_t, None, &pk)?
    } else {
        m.loss(&ids_t, None)?
    };
    let g = tape.backward(&loss)?;
    let grads = params.iter().map(|p| g.get(p).map_or_else(|| Ok(vec![0.0; p.elem_count()]), |g| g.to_vec_f32())).collect::<crate::Result<_>>()?;
    Ok((loss.to_scalar()?, grads))
}

/// Loss and every LoRA gradient on `dev` in `dtype` against the CPU, for plain, dropout 0.1,
/// packed, checkpointed, NF4-base (QLoRA), Qwen3-layout (q/k norms), scalars
/// (`tiny_scalars_config`) and Gemma 3-layout (`tiny_gemma_config`, checkpointed) runs. Returns the largest errors seen.
pub fn check_loss_and_grads(dev: &Device, dtype: DType) -> CheckResult {
    let tol = ModelTolerance::for_dtype(dtype);
    let mut worst = (0.0f64, 0.0f64);
    // (what, dropout, packed, checkpointed, NF4 base, config)
    type Run = (&'static str, f32, bool, bool, bool, fn() -> LlamaConfig);
    let runs: [Run; 8] = [
        ("plain", 0.0, false, false, false, tiny_config),
        ("dropout 0.1", 0.1, false, false, false, tiny_config),
        ("packed", 0.0, true, false, false, tiny_config),
        ("checkpointed", 0.0, false, true, false, tiny_config),
        ("nf4 base, dropout 0.1", 0.1, false, false, true, tiny_config),
        ("q/k norms, packed", 0.0, true, false, false, tiny_qk_norm_config),
        ("granite scalars, a NoPE layer, yarn", 0.0, false, false, false, tiny_scalars_config),
        ("gemma 3 layout, checkpointed", 0.0, false, true, false, tiny_gemma_config),
    ];
    for (what, dropout, packed, checkpoint, nf4, config) in runs {
        // The NF4 case puts adapters on q and v only, so the other NF4 linears run plain.
        let config = config();
        let mut cpu = lora_model(config, dtype, dropout, nf4).map_err(ctx("building the model"))?;
        if nf4 {
            cpu.quantize_nf4().map_err(ctx("quantizing"))?;
        }
        let gpu = on_device(&cpu, dev, dtype).map_err(ctx("moving the model"))?;
        let ids = ids(2, 16, 11);
        let seed = (dropout > 0.0).then_some(21);
        let (lc, gc) = loss_and_grads(&cpu, &ids, seed, packed, checkpoint).map_err(ctx("cpu"))?;
        let (lg, gg) = loss_and_grads(&gpu, &ids, seed, packed, checkpoint).map_err(ctx(dev))?;
        let dl = ((lg - lc) as f64).abs() / (lc as f64).abs().max(1e-6);
        if dl > tol.loss {
            return Err(format!("{what}: loss {lg} on {dev} vs {lc} on the cpu (relative {dl:.2e} > {:.0e})", tol.loss));
        }
        worst.0 = worst.0.max(dl);
        for (i, (g, c)) in gg.iter().zip(&gc).enumerate() {
            let d = rel_l2(g, c);
            if d > tol.grad || !d.is_finite() {
                return Err(format!("{what}: adapter gradient {i} differs by {d:.2e} (relative L2) > {:.0e}", tol.grad));
            }
            worst.1 = worst.1.max(d);
        }
    }
    Ok(format!("loss within {:.1e}, gradients within {:.1e}", worst.0, worst.1))
}

/// Five training steps each of LoRA with AdamW, LoRA with SM3 and QLoRA with AdamW (dropout
/// 0.1, one CPU shard so the masks agree), full fine-tuning with AdamW (of the Qwen3 layout,
/// so the q/k norms train too) and head fine-tuning with SM3 (lr 1e-3: every weight moves), and sparse fine-tuning (10% density, reselection
/// after steps 2 and 4) with SM3 and with AdamW on `dev` against the CPU, from the same
/// weights: every step's loss and the final masters (sparse: on the entries active on both).
/// (f16 on wgpu: with the default loss scale; an overflowed, skipped step fails the check.)
pub fn check_training(dev: &Device, dtype: DType) -> CheckResult {
    let mut rng = Rng::new(4);
    let data: Vec<Sequence> = (0..8)
        .map(|_| {
            let len = 12 + rng.below(5);
            let start = rng.below(300) as u32;
            Sequence { ids: (0..len as u32).map(|i| 4 + (start + i) % 300).collect(), mask: vec![true; len], starts: Vec::new() }
        })
        .collect();
    let adapter = LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..Default::default() };
    let base = random_model(tiny_config(), 3, dtype).map_err(ctx("building the model"))?;
    let qk_base = random_model(tiny_qk_norm_config(), 3, dtype).map_err(ctx("building the model"))?;
    let mut summary = Vec::new();
    let (adamw, sm3) = (OptimizerConfig::AdamW(Default::default()), OptimizerConfig::Sm3(Default::default()));
    let mut runs = vec![(Method::Lora(adapter.clone()), adamw, 1e-2, &base), (Method::Lora(adapter.clone()), sm3, 1e-2, &base), (Method::Qlora(adapter), adamw, 1e-2, &base)];
    // Base weights train in every dtype: f32 masters, the model reading 16-bit copies.
    runs.extend([(Method::Full, adamw, 1e-3, &qk_base), (Method::Head, sm3, 1e-3, &base)]);
    // Sparse: the active entries change after steps 2 and 4, scored by SM3's accumulators or
    // by the gradients summed over the two steps before (AdamW).
    let sparse = |regrow| Method::Sparse(SparseConfig { density: 0.1, reselect_every: 2, reselect_rate: 0.3, regrow, grad_window: 2, ..Default::default() });
    runs.extend([(sparse(Regrow::Sm3), sm3, 1e-2, &base), (sparse(Regrow::Grad), adamw, 1e-2, &base)]);
    for (method, optimizer, lr, base) in runs {
        let what = format!("{} with {}", method.name(), optimizer.name());
        summary.push(format!("{what}: {}", check_training_run(dev, dtype, base, &data, method, optimizer, lr).map_err(|e| format!("{what}: {e}"))?));
    }
    Ok(summary.join("; "))
}

fn check_training_run(dev: &Device, dtype: DType, base: &Llama, data: &[Sequence], method: Method, optimizer: OptimizerConfig, lr: f32) -> CheckResult {
    let tol = ModelTolerance::for_dtype(dtype);
    let what = method.name();
    let cfg = TrainConfig {
        method,
        optimizer,
        lr,
        batch_size: 4,
        max_steps: Some(5),
        shards: 1,
        seed: 7,
        ..Default::default()
    };
    // (losses, initial masters, final masters, their layouts)
    type Run = (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Layout>);
    let run = |model: Llama| -> crate::Result<Run> {
        let mut t = Trainer::new(model, cfg.clone(), data.to_vec(), 0)?;
        let initial = t.masters.clone();
        let mut losses = Vec::new();
        // As the run loop does: step n + 1 is queued before step n's loss is read.
        let mut pending = Some(t.start_step()?);
        while let Some(p) = pending.take() {
            pending = if p.step() < 5 { Some(t.start_step()?) } else { None };
            let r = p.wait()?;
            if r.skipped {
                return Err(crate::Error::InvalidArgument(format!("step {} overflowed at loss scale {:?}", r.step, t.loss_scale)));
            }
            losses.push(r.loss);
        }
        t.sync_host()?;
        check_cast_copies(&t)?;
        Ok((losses, initial, t.masters.clone(), t.layouts.clone()))
    };
    let (lc, m0, mc, layout_c) = run(base.clone()).map_err(ctx("cpu"))?;
    let gpu = base.to_device(dev).and_then(|m| m.to_dtype(dtype)).map_err(ctx("moving the model"))?;
    let (lg, _, mg, layout_g) = run(gpu).map_err(ctx(dev))?;
    let (mg, mc, m0, overlap) = match sparse_common(&mg, &layout_g, &mc, &layout_c) {
        Ok(Some((g, c, zero, overlap))) => (g, c, zero, Some(overlap)),
        Ok(None) => (mg, mc, m0, None),
        Err(e) => return Err(format!("{what}: {e}")),
    };
    let mut worst = (0.0f64, 0.0f64);
    for (i, (g, c)) in lg.iter().zip(&lc).enumerate() {
        let d = ((g - c) as f64).abs() / (*c as f64).abs().max(1e-6);
        if d > tol.loss {
            return Err(format!("{what} step {i}: loss {g} on {dev} vs {c} on the cpu (relative {d:.2e} > {:.0e})", tol.loss));
        }
        worst.0 = worst.0.max(d);
    }
    // The masters' difference relative to how far the CPU's moved in five steps (an update
    // lost or doubled shows as ~1). AdamW normalizes each element's step, so an element whose
    // gradient is near zero moves by up to lr either way depending on rounding: in half
    // precision the bound is `tol.update` (0.5: a lost or doubled update still reads ~1), not
    // the gradients'.
    for (i, ((g, c), c0)) in mg.iter().zip(&mc).zip(&m0).enumerate() {
        let d = rel_l2(g, c) * norm(c) / norm(&c.iter().zip(c0).map(|(a, b)| a - b).collect::<Vec<_>>()).max(1e-30);
        if d > tol.update {
            return Err(format!("{what}: master {i} after 5 steps differs from the cpu's by {d:.2e} of its change (relative L2) > {:.0e}", tol.update));
        }
        worst.1 = worst.1.max(d);
    }
    let overlap = overlap.map_or(String::new(), |o| format!(", active sets {:.1}% the same", 100.0 * o));
    Ok(format!("losses within {:.1e}, masters within {:.1e} ({:.3} -> {:.3}){overlap}", worst.0, worst.1, lc[0], lc[4]))
}

/// The bf16 copies a CUDA AdamW step writes beside f32 parameters of a bf16 model (the LoRA
/// factors): present, and each the parameter's values rounded to bf16 (the half crate's
/// rounding, which the cast kernels match), so the model reads this step's factors.
fn check_cast_copies(t: &Trainer) -> crate::Result<()> {
    let bad = |what: String| crate::Error::InvalidArgument(format!("bf16 copies of the trained tensors: {what}"));
    for (i, p) in t.device_params().unwrap_or_default().iter().enumerate() {
        let wanted = matches!(p.device(), Device::Cuda(_)) && p.dtype() == DType::F32 && t.model.embed.dtype() == DType::BF16 && matches!(t.config.optimizer, OptimizerConfig::AdamW(_));
        let Some(copy) = p.cast_copy() else {
            if wanted {
                return Err(bad(format!("tensor {i} ({p:?}) has none")));
            }
            continue;
        };
        let want: Vec<f32> = p.to_vec_f32()?.into_iter().map(|x| f32::from(half::bf16::from_f32(x))).collect();
        let have = copy.to_vec_f32()?;
        if let Some(e) = have.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(bad(format!("tensor {i} element {e}: {} in the copy, {} rounded from the parameter", have[e], want[e])));
        }
    }
    Ok(())
}

/// Sparse runs: each master restricted to the entries active on both devices at the end (the
/// reselections score values the devices round differently, so a near-tie may go either way),
/// with the initial masters (zero deltas) to match, and the smallest overlap (the fraction of
/// the CPU's active entries active on the device too); under 90% fails. None for dense layouts.
#[allow(clippy::type_complexity)]
fn sparse_common(mg: &[Vec<f32>], lg: &[Layout], mc: &[Vec<f32>], lc: &[Layout]) -> std::result::Result<Option<(Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>, f64)>, String> {
    let mut out = (Vec::new(), Vec::new(), Vec::new(), 1.0f64);
    for (i, (a, b)) in lg.iter().zip(lc).enumerate() {
        let (Layout::Sparse { indices: ig, .. }, Layout::Sparse { indices: ic, .. }) = (a, b) else { return Ok(None) };
        let at: std::collections::HashMap<u32, usize> = ig.iter().enumerate().map(|(p, &e)| (e, p)).collect();
        let (mut g, mut c) = (Vec::new(), Vec::new());
        for (p, e) in ic.iter().enumerate() {
            if let Some(&q) = at.get(e) {
                g.push(mg[i][q]);
                c.push(mc[i][p]);
            }
        }
        if 10 * c.len() < 9 * ic.len() {
            return Err(format!("sparse tensor {i}: only {} of the cpu's {} active entries are active on the device too", c.len(), ic.len()));
        }
        out.3 = out.3.min(c.len() as f64 / ic.len().max(1) as f64);
        out.2.push(vec![0.0; c.len()]);
        out.0.push(g);
        out.1.push(c);
    }
    Ok(Some(out))
}

/// Logits of a 6-token prompt, then of 2 more tokens through the KV cache, on `dev` against
/// the CPU (the generation path: `matmul` for the head, the cache grown in place); then
/// greedy generation on `dev`, whose picks are made there, against the host's argmax of the
/// same device's logits.
pub fn check_cached_logits(dev: &Device, dtype: DType) -> CheckResult {
    let tol = ModelTolerance::for_dtype(dtype);
    let cpu = tiny_lora_model(dtype, 0.0, false).map_err(ctx("building the model"))?;
    let gpu = on_device(&cpu, dev, dtype).map_err(ctx("moving the model"))?;
    let ids = ids(1, 8, 13);
    let run = |m: &Llama| -> crate::Result<Vec<f32>> {
        let mut cache = KvCache::new(m.config.num_layers);
        let mut out = m.forward(&Tensor::from_vec_i32(ids[..6].to_vec(), [1, 6])?, Some(&mut cache))?.to_vec_f32()?;
        for &id in &ids[6..8] {
            out.extend(m.forward(&Tensor::from_vec_i32(vec![id], [1, 1])?, Some(&mut cache))?.to_vec_f32()?);
        }
        Ok(out)
    };
    let (c, g) = (run(&cpu).map_err(ctx("cpu"))?, run(&gpu).map_err(ctx(dev))?);
    let differ = |c: &[f32], g: &[f32]| {
        let scale = c.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
        c.iter().zip(g).fold(0.0f64, |a, (x, y)| a.max((*x as f64 - *y as f64).abs())) / scale.max(1e-6)
    };
    // The CPU's cached logits against its own whole-sequence pass (the cache grown in place).
    let full = cpu.forward(&Tensor::from_vec_i32(ids.clone(), [1, 8]).map_err(ctx("ids"))?, None).and_then(|t| t.to_vec_f32()).map_err(ctx("cpu"))?;
    let d = differ(&full, &c);
    if d > 1e-5 || !d.is_finite() {
        return Err(format!("cpu: logits through the cache differ from the uncached pass by {d:.2e} of the largest > 1e-5"));
    }
    let d = differ(&c, &g);
    if d > tol.logits || !d.is_finite() {
        return Err(format!("logits through the cache differ by {d:.2e} of the largest > {:.0e}", tol.logits));
    }
    // `forward_last` (what generation reads): the last position of each row, through the cache
    // and for two rows at once, on the CPU and on `dev`, against the CPU's full logits.
    let v = cpu.config.vocab_size;
    let rows = |all: &[f32], picks: &[usize]| picks.iter().flat_map(|&r| all[r * v..][..v].to_vec()).collect::<Vec<f32>>();
    let want_cached = rows(&c, &[5, 6, 7]);
    let two = self::ids(2, 5, 21);
    let want_two = rows(&cpu.forward(&Tensor::from_vec_i32(two.clone(), [2, 5]).map_err(ctx("ids"))?, None).and_then(|t| t.to_vec_f32()).map_err(ctx("cpu"))?, &[4, 9]);
    let last = |m: &Llama| -> crate::Result<(Vec<f32>, Vec<f32>)> {
        let mut cache = KvCache::new(m.config.num_layers);
        let mut out = m.forward_last(&Tensor::from_vec_i32(ids[..6].to_vec(), [1, 6])?, Some(&mut cache))?.to_vec_f32()?;
        for &id in &ids[6..8] {
            out.extend(m.forward_last(&Tensor::from_vec_i32(vec![id], [1, 1])?, Some(&mut cache))?.to_vec_f32()?);
        }
        Ok((out, m.forward_last(&Tensor::from_vec_i32(two.clone(), [2, 5])?, None)?.to_vec_f32()?))
    };
    let mut worst = d;
    for (m, name) in [(&cpu, "cpu".to_string()), (&gpu, dev.to_string())] {
        let (cached, two_rows) = last(m).map_err(ctx(&name))?;
        for (what, got, want) in [("through the cache", &cached, &want_cached), ("of two rows", &two_rows, &want_two)] {
            let d = if got.len() == want.len() { differ(want, got) } else { f64::INFINITY };
            if d > tol.logits || !d.is_finite() {
                return Err(format!("{name}: forward_last's logits {what} differ by {d:.2e} of the largest > {:.0e} ({} values, {} wanted)", tol.logits, got.len(), want.len()));
            }
            worst = worst.max(d);
        }
    }
    // Greedy generation picks on the device (`ops::argmax_last`): the same tokens as the host's
    // rule on the logits the device hands back, step by step through the cache.
    let prompt: Vec<u32> = ids[..6].iter().map(|&t| t as u32).collect();
    let opts = crate::nn::GenerateOptions { max_new_tokens: 4, ..Default::default() };
    let picked = gpu.generate(&prompt, &opts, |_| {}).map_err(ctx(dev))?;
    let mut on_host = Vec::new();
    let mut cache = KvCache::new(gpu.config.num_layers);
    let mut input: Vec<i32> = ids[..6].to_vec();
    for _ in 0..4 {
        let logits = Tensor::from_vec_i32(input.clone(), [1, input.len()]).and_then(|t| gpu.forward_last(&t, Some(&mut cache))).and_then(|t| t.to_vec_f32()).map_err(ctx(dev))?;
        let next = crate::kernels::cross_entropy::reference::argmax(&logits) as i32;
        on_host.push(next as u32);
        input = vec![next];
    }
    if picked != on_host {
        return Err(format!("{dev}: greedy generation picked {picked:?}, the host's argmax of the device's logits {on_host:?}"));
    }
    // Stopped by an EOS (the second token): the host reads each pick a step behind while the
    // device runs the next step, whose token must not come out.
    let eos = on_host[1];
    let want = &on_host[..=on_host.iter().position(|&t| t == eos).unwrap_or(1)];
    let mut streamed = Vec::new();
    let stopped = gpu.generate(&prompt, &crate::nn::GenerateOptions { eos_token_ids: vec![eos], ..opts }, |t| streamed.push(t)).map_err(ctx(dev))?;
    if stopped != want || streamed != want {
        return Err(format!("{dev}: greedy generation with EOS {eos} gave {stopped:?} (streamed {streamed:?}), want {want:?}"));
    }
    Ok(format!("logits within {worst:.1e} of the largest; greedy tokens {picked:?} as the host picks them"))
}

/// The fused linear cross-entropy on CUDA in bf16 (x, W rounded to bf16 on the host) against
/// the f64 loss, `dx = 0.75·dz·W` and `dW = 0.75·dzᵀ·x` of the same rounded values, `chunk`
/// rows at a time (dW summed over the chunks). The device rounds the logits and dz to bf16
/// (2^-9 relative each) and accumulates in f32, so the loss, dx and dW agree to about 1%.
pub fn check_linear_ce_bf16(dev: &Device, (m, h, v): (usize, usize, usize), chunk: Option<usize>, seed: u64) -> CheckResult {
    use crate::kernels::cross_entropy::reference;
    use crate::kernels::matmul::{reference::matmul, MatmulParams};
    let mut rng = Rng::new(seed);
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|a| half::bf16::from_f32(a).to_f32()).collect() };
    let (x, w) = (round(rng.vec(m * h, -1.0, 1.0)), round(rng.vec(v * h, -1.0, 1.0)));
    let t: Vec<i32> = (0..m).map(|i| if i % 5 == 3 { -100 } else { rng.below(v) as i32 }).collect();
    let (x64, w64): (Vec<f64>, Vec<f64>) = (x.iter().map(|&a| a as f64).collect(), w.iter().map(|&a| a as f64).collect());
    let z = matmul(&x64, &w64, MatmulParams { m, n: v, k: h, trans_a: false, trans_b: true });
    let want_loss = reference::cross_entropy(&z, &t, v, -100);
    let count = t.iter().filter(|&&x| x != -100).count().max(1) as f64;
    let mut dz = vec![0.0f64; m * v];
    for (r, &tr) in t.iter().enumerate() {
        if tr == -100 {
            continue;
        }
        let row = &z[r * v..(r + 1) * v];
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = row.iter().map(|a| (a - mx).exp()).sum();
        for j in 0..v {
            dz[r * v + j] = ((row[j] - mx).exp() / s - if j as i32 == tr { 1.0 } else { 0.0 }) / count;
        }
    }
    let want_dx: Vec<f32> = matmul(&dz, &w64, MatmulParams { m, n: h, k: v, trans_a: false, trans_b: false }).iter().map(|&a| (0.75 * a) as f32).collect();
    let want_dw: Vec<f32> = matmul(&dz, &x64, MatmulParams { m: v, n: h, k: m, trans_a: true, trans_b: false }).iter().map(|&a| (0.75 * a) as f32).collect();
    let run = || -> crate::Result<(f32, Vec<f32>, Vec<f32>)> {
        let tape = Tape::new();
        let xt = tape.param(&Tensor::from_slice(&x, [m, h], dev)?.to_dtype(DType::BF16)?);
        let wt = tape.param(&Tensor::from_slice(&w, [v, h], dev)?.to_dtype(DType::BF16)?);
        let tt = Tensor::from_vec_i32(t.clone(), [m])?.to_device(dev)?;
        let loss = crate::ops::linear_cross_entropy(&xt, &wt, &tt, -100, chunk)?;
        // The gradient seeded at 0.75 through a scale, so the backward's scale_by is checked.
        let g = tape.backward(&crate::ops::scale(&loss, 0.75)?)?;
        let grad = |t: &Tensor, what: &str| g.get(t).ok_or_else(|| crate::Error::Tape(format!("no gradient for {what}")))?.to_vec_f32();
        Ok((loss.to_scalar()?, grad(&xt, "x")?, grad(&wt, "w")?))
    };
    let (loss, dx, dw) = run().map_err(ctx(dev))?;
    let dl = (loss as f64 - want_loss).abs() / want_loss.abs().max(1e-6);
    let (ddx, ddw) = (rel_l2(&dx, &want_dx), rel_l2(&dw, &want_dw));
    if dl > 1e-2 || ddx > 2e-2 || ddw > 2e-2 || !ddx.is_finite() || !ddw.is_finite() {
        return Err(format!("loss {loss} vs {want_loss} (relative {dl:.2e}, bound 1e-2); dx relative L2 {ddx:.2e}, dW {ddw:.2e} (bound 2e-2)"));
    }
    Ok(format!("loss within {dl:.1e}, dx within {ddx:.1e}, dW within {ddw:.1e}"))
}
