//! `tuna demo`: the main job on an embedded default, with no files and no network.
//!
//! A small Llama-style model with random weights (built from a fixed seed) is taught a task it
//! cannot do: given five letters and `=`, answer with each letter shifted by one (`hello=` →
//! `ifmmp`). Only LoRA adapters are trained; the base stays frozen. Before and after, the model
//! answers held-out words it never saw, by greedy generation; the score is exact-match
//! accuracy over whole answers. The adapter (PEFT format), its base model, metrics and the loss
//! curve are written under `--out`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use clap::Args;
use serde_json::json;
use tuna::io::config::{Arch, LlamaConfig};
use tuna::nn::{GenerateOptions, Llama};
use tuna::optim::{OptimizerConfig, ScheduleKind};
use tuna::peft::{save_adapter, save_deltas, LoraConfig, Regrow, SparseConfig};
use tuna::rng::Rng;
use tuna::train::data::Sequence;
use tuna::train::run::{run, MetricsFormat, RunOptions};
use tuna::train::{Method, TrainConfig, Trainer};

use crate::{err, CliResult};

/// Token ids: 0 begin, 1 `=`, 2 end, 3.. the letters a..z.
const BOS: u32 = 0;
const EQ: u32 = 1;
const EOS: u32 = 2;
const VOCAB: usize = 32;
const LETTERS: usize = 5;

#[derive(Args)]
pub struct DemoArgs {
    /// Where the adapter, base model, metrics and plot go.
    #[arg(long, default_value = "tuna-demo")]
    out: PathBuf,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// lora, qlora (LoRA over an NF4 base), or sparse (SpIEL: deltas at a changing 5% of each
    /// matrix).
    #[arg(long, value_enum, default_value = "lora")]
    method: DemoMethod,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: DemoOptimizer,
    /// Sparse: fraction of each matrix trained.
    #[arg(long, default_value_t = 0.05)]
    density: f32,
    /// Peak learning rate (default: 4e-3 with AdamW; with SM3 2e-2 for LoRA, 5e-2 for sparse).
    #[arg(long)]
    lr: Option<f32>,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum DemoMethod {
    Lora,
    /// LoRA over the base quantized to NF4.
    Qlora,
    Sparse,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum DemoOptimizer {
    Adamw,
    Sm3,
}

fn letter(id: u32) -> char {
    match id {
        BOS => '^',
        EQ => '=',
        EOS => '$',
        i @ 3..=28 => (b'a' + (i - 3) as u8) as char,
        _ => '?',
    }
}

/// A random word and its answer (each letter shifted by one, z wrapping to a).
fn example(rng: &mut Rng) -> (Vec<u32>, Vec<u32>) {
    let word: Vec<u32> = (0..LETTERS).map(|_| 3 + rng.below(26) as u32).collect();
    let answer: Vec<u32> = word.iter().map(|&c| 3 + (c - 3 + 1) % 26).collect();
    (word, answer)
}

fn prompt(word: &[u32]) -> Vec<u32> {
    let mut p = vec![BOS];
    p.extend_from_slice(word);
    p.push(EQ);
    p
}

fn sequence(word: &[u32], answer: &[u32]) -> Sequence {
    let mut ids = prompt(word);
    let n_prompt = ids.len();
    ids.extend_from_slice(answer);
    ids.push(EOS);
    let mask = (0..ids.len()).map(|i| i >= n_prompt).collect();
    Sequence { ids, mask, starts: Vec::new() }
}

/// Exact-match accuracy of greedy answers over `tests`, and one sample for display.
fn accuracy(model: &Llama, tests: &[(Vec<u32>, Vec<u32>)]) -> Result<(f64, String), String> {
    let opts = GenerateOptions { max_new_tokens: LETTERS + 1, eos_token_ids: vec![EOS], ..Default::default() };
    let mut right = 0;
    let mut sample = String::new();
    for (i, (word, answer)) in tests.iter().enumerate() {
        let got = model.generate(&prompt(word), &opts, |_| {}).map_err(err)?;
        let mut want = answer.clone();
        want.push(EOS);
        right += usize::from(got == want);
        if i == 0 {
            let show = |v: &[u32]| v.iter().filter(|&&t| t != EOS).map(|&t| letter(t)).collect::<String>();
            sample = format!("{}= -> {} (want {})", show(word), show(&got), show(answer));
        }
    }
    Ok((right as f64 / tests.len() as f64, sample))
}

pub fn demo(a: DemoArgs) -> CliResult {
    let started = std::time::Instant::now();
    let config = LlamaConfig { bos_token_id: Some(BOS), eos_token_ids: vec![EOS], ..LlamaConfig::llama(VOCAB, 128, 344, 4, 4, 2) };
    let mut base = Llama::random(config, a.seed).map_err(err)?;
    // A trained model's head gives logits of a few units; std-0.02 random rows give ~0.2, which
    // would cap how confident any adapter could make the frozen model. Scale the head up.
    if let Some(h) = &mut base.lm_head {
        *h = tuna::ops::scale(h, 20.0).map_err(err)?;
    }
    let mut rng = Rng::new(a.seed ^ 0xdead_beef);
    let train: Vec<Sequence> = (0..4000).map(|_| example(&mut rng)).map(|(w, ans)| sequence(&w, &ans)).collect();
    let tests: Vec<(Vec<u32>, Vec<u32>)> = (0..100).map(|_| example(&mut rng)).collect();
    let eval: Vec<Sequence> = tests.iter().take(50).map(|(w, ans)| sequence(w, ans)).collect();

    let (before, sample_before) = accuracy(&base, &tests)?;
    if !a.json {
        let how = match a.method {
            DemoMethod::Lora => "LoRA",
            DemoMethod::Qlora => "QLoRA (NF4 base)",
            DemoMethod::Sparse => "sparse fine-tuning",
        };
        println!("tuna demo: teach a random {}-parameter Llama to shift letters (hello= -> ifmmp) with {how}", base.parameters().iter().map(|(_, t)| t.elem_count()).sum::<usize>());
        println!("before: exact match {:.0}% on 100 held-out words   e.g. {sample_before}", 100.0 * before);
    }
    let lora = LoraConfig { r: 16, alpha: 32.0, ..Default::default() };
    let (method, lr) = match a.method {
        DemoMethod::Lora => (Method::Lora(lora.clone()), 4e-3f32),
        DemoMethod::Qlora => (Method::Qlora(lora.clone()), 4e-3f32),
        DemoMethod::Sparse => {
            let regrow = if a.optimizer == DemoOptimizer::Sm3 { Regrow::Sm3 } else { Regrow::Grad };
            (Method::Sparse(SparseConfig { density: a.density, regrow, ..Default::default() }), 4e-3)
        }
    };
    let optimizer = match a.optimizer {
        DemoOptimizer::Adamw => OptimizerConfig::AdamW(Default::default()),
        DemoOptimizer::Sm3 => OptimizerConfig::Sm3(Default::default()),
    };
    // SM3's steps shrink like Adagrad's as its accumulators grow, so it wants a larger peak
    // rate; sparse deltas (few entries, no low-rank product) want a larger one still.
    let lr = a.lr.unwrap_or(match (a.method, a.optimizer) {
        (_, DemoOptimizer::Adamw) => lr,
        (DemoMethod::Lora | DemoMethod::Qlora, DemoOptimizer::Sm3) => 5.0 * lr,
        (DemoMethod::Sparse, DemoOptimizer::Sm3) => 12.5 * lr,
    });
    let cfg = TrainConfig {
        method,
        optimizer,
        lr,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 20,
        max_steps: Some(a.steps),
        batch_size: 32,
        seed: a.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::new(base.clone(), cfg, train, BOS).map_err(err)?;
    let opts = RunOptions { out: a.out.clone(), eval_every: 50, checkpoint_every: 0, metrics: MetricsFormat::Jsonl, resume: false, progress: !a.json, stop_after: None, keep_best: None };
    let summary = run(&mut trainer, &eval, &opts, &AtomicBool::new(false)).map_err(err)?;
    let (after, sample_after) = accuracy(&trainer.model, &tests)?;

    let base_dir = a.out.join("base");
    base.save(&base_dir, &base_dir).map_err(err)?;
    let adapter_dir = match a.method {
        DemoMethod::Lora | DemoMethod::Qlora => {
            let dir = a.out.join("adapter");
            save_adapter(&trainer.model, &lora, &base_dir.display().to_string(), &dir).map_err(err)?;
            dir
        }
        DemoMethod::Sparse => {
            let dir = a.out.join("sparse");
            save_deltas(&trainer.model, &base_dir.display().to_string(), &dir).map_err(err)?;
            dir
        }
    };
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            json!({"accuracy_before": before, "accuracy_after": after, "steps": summary.steps,
                   "final_train_loss": summary.final_train_loss, "final_eval_loss": summary.final_eval_loss,
                   "tokens_per_second": summary.tokens_per_second, "seconds": secs,
                   "adapter": adapter_dir, "base_model": base_dir, "plot": summary.plot_path, "metrics": summary.metrics_path})
        );
    } else {
        println!("after:  exact match {:.0}% on the same words   e.g. {sample_after}", 100.0 * after);
        match a.method {
            DemoMethod::Lora | DemoMethod::Qlora => println!("adapter: {} (PEFT format; base model: {})", adapter_dir.display(), base_dir.display()),
            DemoMethod::Sparse => println!("sparse deltas: {} (base model: {})", adapter_dir.display(), base_dir.display()),
        }
        println!("loss curve: {}   metrics: {}   ({secs:.0} s)", summary.plot_path.display(), summary.metrics_path.display());
    }
    Ok(())
}

/// The model `bench-step` trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPreset {
    /// The `tools/bench-vs-torch` configuration: a random 33.7M Llama (hidden 512, 8 layers,
    /// vocab 8192), default batch 4 × 128, rank 8.
    Small,
    /// `small` as Qwen3: the same shape (heads of 64) with q/k norms, rope theta 1e6
    /// (`QWEN3=1 tools/bench-vs-torch/run.sh`).
    #[value(name = "qwen3-small")]
    Qwen3Small,
    /// `small`'s hidden size, layers, MLP and vocabulary in Gemma 3's layout: four query heads
    /// of 256 over one key/value head (Gemma-3-270M's), GeGLU, q/k norms, norms after both
    /// blocks, a tied head, windowed layers (512 keys) with the sixth global
    /// (`GEMMA3=1 tools/bench-vs-torch/run.sh`).
    #[value(name = "gemma3-small")]
    Gemma3Small,
    /// Issue 8's end-to-end case: a random Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads,
    /// 8 KV heads, intermediate 8192, vocab 128256, tied head), default batch 4 × 2048, rank 16.
    Llama1b,
    /// A random Qwen3-0.6B shape (hidden 1024, 28 layers, 16 heads of 128 over 8 KV heads,
    /// q/k norms, intermediate 3072, vocab 151936, tied head), default batch 4 × 2048, rank 16.
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6b,
}

#[derive(Args)]
pub struct BenchStepArgs {
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Row shards per batch run side by side (see `finetune --cpu-shards`).
    #[arg(long, default_value_t = 2)]
    cpu_shards: usize,
    /// Recompute each decoder layer in the backward (see `finetune --checkpoint-layers`).
    #[arg(long)]
    checkpoint_layers: bool,
    #[arg(long, value_enum, default_value_t = BenchPreset::Small)]
    preset: BenchPreset,
    /// cpu, wgpu[:N] (f32 on both) or cuda[:N] (bf16, f32 adapters).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Sequences per step (default: the preset's).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence (default: the preset's).
    #[arg(long)]
    seq: Option<usize>,
    /// LoRA rank on every linear (default: the preset's; alpha = 2 × rank).
    #[arg(long)]
    rank: Option<usize>,
    /// Decoder layers (default: the preset's): two runs a layer apart give one layer's
    /// activation memory as the difference of their peaks.
    #[arg(long)]
    layers: Option<usize>,
    /// Vocabulary size (default: the preset's; a smaller one fits a software adapter's
    /// 128 MiB per buffer).
    #[arg(long)]
    vocab: Option<usize>,
    /// QLoRA: the decoder linears' weights quantized to NF4 (bitsandbytes' format), LoRA on top.
    #[arg(long, conflicts_with = "sparse")]
    qlora: bool,
    /// Full fine-tuning (every parameter, AdamW) instead of LoRA.
    #[arg(long, conflicts_with_all = ["sparse", "qlora"])]
    full: bool,
    /// Sparse fine-tuning instead of LoRA: this fraction of every decoder linear trained (SpIEL's
    /// setup: SM3, the active entries changed every 20 steps, scored by SM3's accumulators).
    #[arg(long, value_name = "DENSITY")]
    sparse: Option<f32>,
    /// wgpu: the model in f16 (see `finetune --f16`).
    #[arg(long)]
    f16: bool,
    /// CUDA: one more step after the timed ones with every kernel timed by events
    /// (`kernel_profile` in the JSON: milliseconds per kernel, largest first).
    #[arg(long)]
    profile: bool,
}

/// `tuna bench-step`: times LoRA (QLoRA, sparse, full) training steps of a random model (`--preset`) on `--device`
/// and prints `{"step_seconds": [...], "tokens_per_second": median, ...}`, with the wgpu
/// buffer pool's peak memory on wgpu (`device_memory`).
pub fn bench_step(a: BenchStepArgs) -> CliResult {
    let (config, batch, seq, rank) = match a.preset {
        BenchPreset::Small => (LlamaConfig::llama(8192, 512, 1376, 8, 8, 8), 4, 128, 8),
        BenchPreset::Qwen3Small => {
            let c = LlamaConfig::llama(8192, 512, 1376, 8, 8, 8);
            (LlamaConfig { arch: Arch::Qwen3, qk_norm: true, rope_theta: 1e6, rms_norm_eps: 1e-6, ..c }, 4, 128, 8)
        }
        BenchPreset::Gemma3Small => {
            let c = LlamaConfig::llama(8192, 512, 1376, 8, 4, 1);
            let c = LlamaConfig {
                arch: Arch::Gemma3,
                head_dim: 256,
                hidden_act: tuna::ops::GluAct::GeluTanh,
                qk_norm: true,
                sandwich_norms: true,
                norm_weight_offset: 1.0,
                tie_word_embeddings: true,
                embedding_multiplier: (512f32).sqrt(),
                attention_multiplier: Some(1.0 / 16.0),
                sliding_window: Some(512),
                global_layers: vec![5],
                rope_theta: 1e6,
                local_rope_theta: Some(1e4),
                rms_norm_eps: 1e-6,
                ..c
            };
            (c, 4, 128, 8)
        }
        BenchPreset::Llama1b => {
            let mut c = LlamaConfig::llama(128_256, 2048, 8192, 16, 32, 8);
            c.tie_word_embeddings = true;
            (c, 4, 2048, 16)
        }
        BenchPreset::Qwen3_0_6b => {
            let c = LlamaConfig::llama(151_936, 1024, 3072, 28, 16, 8);
            let c = LlamaConfig { arch: Arch::Qwen3, qk_norm: true, head_dim: 128, tie_word_embeddings: true, rope_theta: 1e6, rms_norm_eps: 1e-6, ..c };
            (c, 4, 2048, 16)
        }
    };
    let (batch, seq, rank) = (a.batch.unwrap_or(batch), a.seq.unwrap_or(seq), a.rank.unwrap_or(rank));
    let mut config = config;
    config.num_layers = a.layers.unwrap_or(config.num_layers);
    config.vocab_size = a.vocab.unwrap_or(config.vocab_size);
    let device: tuna::Device = a.device.parse().map_err(err)?;
    let vocab = config.vocab_size;
    let model = crate::half(crate::on_device(Llama::random(config, 0).map_err(err)?, &device)?, a.f16)?;
    let mut rng = Rng::new(1);
    let seqs: Vec<Sequence> =
        (0..batch).map(|_| Sequence { ids: (0..seq).map(|_| rng.below(vocab) as u32).collect(), mask: vec![true; seq], starts: Vec::new() }).collect();
    let l = LoraConfig { r: rank, alpha: 2.0 * rank as f32, ..Default::default() };
    let (method, optimizer) = match (a.sparse, a.qlora, a.full) {
        (Some(density), _, _) => (Method::Sparse(SparseConfig { density, ..Default::default() }), OptimizerConfig::Sm3(Default::default())),
        (None, true, _) => (Method::Qlora(l), OptimizerConfig::AdamW(Default::default())),
        (None, false, true) => (Method::Full, OptimizerConfig::AdamW(Default::default())),
        (None, false, false) => (Method::Lora(l), OptimizerConfig::AdamW(Default::default())),
    };
    let method_name = method.name();
    let cfg = TrainConfig {
        method,
        optimizer,
        batch_size: batch,
        max_steps: Some(a.warmup + a.steps + a.profile as usize),
        shards: a.cpu_shards,
        checkpoint_layers: a.checkpoint_layers,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, cfg, seqs, 0).map_err(err)?;
    let wgpu_rt = match device {
        tuna::Device::Wgpu(i) => Some(tuna::device::wgpu::runtime(i).map_err(err)?),
        _ => None,
    };
    let cuda_rt = match device {
        tuna::Device::Cuda(i) => Some(tuna::device::cuda::runtime(i).map_err(err)?),
        _ => None,
    };
    // The pool's peak is reported where the device has a stream-ordered pool (every sm_80+
    // GPU); elsewhere the JSON says why there is none, and the timing still runs.
    let mut pool_error = None;
    if let Some(rt) = &cuda_rt {
        rt.synchronize().map_err(err)?;
        pool_error = rt.reset_peak_memory().err().map(|e| e.to_string());
    }
    let mut times = Vec::new();
    // On wgpu, the pool's bytes in use between steps (weights, adapters, optimizer state), read
    // after the warm-up, where the peak starts over (the model's upload, in f32 before an f16
    // conversion, is not a step's): a step's peak above it is its activations and gradients.
    let mut between_steps = None;
    for i in 0..a.warmup + a.steps {
        if i == a.warmup {
            if let Some(rt) = &wgpu_rt {
                between_steps = Some(rt.memory().live);
                rt.reset_peak_memory();
            }
        }
        let t0 = std::time::Instant::now();
        trainer.train_step().map_err(err)?;
        device.synchronize().map_err(err)?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    // The profiled step comes after the timed ones, so its events cost them nothing.
    let profile = match (&cuda_rt, a.profile) {
        (Some(rt), true) => {
            rt.synchronize().map_err(err)?;
            rt.modules.start_profile();
            trainer.train_step().map_err(err)?;
            let kernels = rt.modules.finish_profile().map_err(err)?;
            let total: f64 = kernels.iter().map(|k| k.ms).sum();
            Some(json!({ "total_ms": total, "kernels": kernels.iter().map(|k| json!({ "name": k.name, "ms": k.ms, "lookups": k.lookups })).collect::<Vec<_>>() }))
        }
        (None, true) => return Err("--profile times CUDA kernels: use --device cuda".into()),
        _ => None,
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    // On wgpu, the buffer pool's peak: the tensors in use at once, and all it holds.
    // On CUDA, the allocation pool's peak since the model was loaded (weights included).
    let memory = match (wgpu_rt, cuda_rt) {
        (Some(rt), _) => {
            let m = rt.memory();
            Some(json!({ "peak_live_bytes": m.peak_live, "peak_held_bytes": m.peak_held, "live_bytes_between_steps": between_steps }))
        }
        (_, Some(rt)) => Some(match (pool_error, rt.memory()) {
            (None, Ok((now, peak))) => json!({ "peak_live_bytes": peak, "live_bytes": now }),
            (Some(e), _) => json!({ "error": e }),
            (None, Err(e)) => json!({ "error": e.to_string() }),
        }),
        _ => None,
    };
    println!(
        "{}",
        json!({ "step_seconds": times, "tokens_per_second": (batch * seq) as f64 / median, "device": device.to_string(),
                "preset": clap::ValueEnum::to_possible_value(&a.preset).map(|v| v.get_name().to_string()), "method": method_name, "density": a.sparse.map(|d| d.to_string().parse::<f64>().unwrap_or(f64::NAN)), "batch": batch, "seq": seq, "rank": rank, "device_memory": memory,
                "kernel_profile": profile })
    );
    Ok(())
}
