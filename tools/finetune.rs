//! `tuna finetune`: the reference training binary. Reads a model folder and a JSONL file,
//! trains with LoRA (default), sparse (SpIEL), full or head-only fine-tuning, with AdamW or
//! SM3, and writes under `--out`: `adapter/` (PEFT format), `sparse/sparse_deltas.safetensors`
//! or `model/` (a Hugging Face folder), `metrics.jsonl|csv`,
//! `loss.png` and `checkpoint/`. Ctrl-C writes a checkpoint before exiting; `--resume`
//! continues from it to the same losses as an uninterrupted run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, ValueEnum};
use serde_json::json;
use tuna::io::dataset::Dataset;
use tuna::optim::{AdamWConfig, OptimizerConfig, ScheduleKind, Sm3Config};
use tuna::peft::{LoraConfig, Regrow, SparseConfig};
use tuna::train::data::{pack, split, tokenize_dataset};
use tuna::train::run::{run, MetricsFormat, RunOptions};
use tuna::train::{Method, TrainConfig, Trainer};

use crate::{err, load_to_train, weights_form, CliResult, ModelArgs};

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Lora,
    /// LoRA over a base quantized to NF4 at load (bitsandbytes' format, double quantization).
    Qlora,
    Full,
    Head,
    Sparse,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OptimizerArg {
    Adamw,
    Sm3,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RegrowArg {
    Sm3,
    Grad,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MetricsArg {
    Jsonl,
    Csv,
}

#[derive(Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL: {"text"}, {"prompt","completion"}, {"messages"}, ShareGPT's {"conversations"} or
    /// Alpaca's {"instruction","input","output"} per line.
    #[arg(long)]
    data: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "lora")]
    method: MethodArg,
    /// LoRA rank [default: 8, or the --adapter's].
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha [default: 16, or the --adapter's].
    #[arg(long)]
    alpha: Option<f32>,
    /// Dropout on the LoRA input [default: 0, or the --adapter's].
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// Scale by alpha/sqrt(r) instead of alpha/r [default: off, or the --adapter's].
    #[arg(long)]
    rslora: bool,
    /// Comma-separated module names, or all-linear [default: every linear, or the --adapter's;
    /// sparse: every linear].
    #[arg(long)]
    target_modules: Option<String>,
    /// Sparse fine-tuning: fraction of each target matrix trained.
    #[arg(long, default_value_t = 0.01)]
    density: f32,
    /// Sparse fine-tuning: steps between changes of the active entries (0: never).
    #[arg(long, default_value_t = 20)]
    reselect_every: usize,
    /// Sparse fine-tuning: fraction of active entries changed at first, decaying to 0.
    #[arg(long, default_value_t = 0.2)]
    reselect_rate: f32,
    /// Sparse fine-tuning: score new entries by SM3's accumulators or by summed gradients
    /// (default: sm3 with --optimizer sm3, grad otherwise).
    #[arg(long, value_enum)]
    regrow: Option<RegrowArg>,
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerArg,
    /// Momentum of SM3 (0: none) / beta1 of AdamW.
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// On the CPU: row shards per micro-batch, run side by side (data parallelism across
    /// cores); the losses depend on this number, not on the thread count.
    #[arg(long, default_value_t = 2)]
    cpu_shards: usize,
    /// Keep only each decoder layer's input and recompute the layer in the backward: less
    /// activation memory for about one more forward per step; the same gradients.
    #[arg(long)]
    checkpoint_layers: bool,
    /// Train in f16 on wgpu: activations and weights in f16 (f32 math inside the kernels), f32
    /// LoRA adapters, sparse deltas or master weights (full and head fine-tuning: the model
    /// reads f16 copies made after each step), dynamic loss scaling. Needs SHADER_F16.
    #[arg(long)]
    f16: bool,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Compute the loss on prompt / user tokens too.
    #[arg(long)]
    train_on_prompt: bool,
    /// Fail on the first bad JSONL line instead of skipping bad lines.
    #[arg(long)]
    strict: bool,
    /// Pack several examples into each row of --max-seq-len tokens (no attention across them).
    #[arg(long)]
    pack: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    no_shuffle: bool,
    /// Fraction of the examples held out for evaluation [default: 0.1; 0 with --eval-data].
    #[arg(long)]
    eval_fraction: Option<f32>,
    /// A JSONL file to evaluate on (the same forms as --data), instead of holding out a
    /// fraction of --data: every --data example then trains.
    #[arg(long, conflicts_with = "eval_fraction")]
    eval_data: Option<PathBuf>,
    /// Evaluate every N steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    #[arg(long, value_enum, default_value = "jsonl")]
    metrics: MetricsArg,
    /// Continue from OUT/checkpoint.
    #[arg(long)]
    resume: bool,
    /// Each evaluation that lowers the eval loss below every earlier one writes the result as
    /// it stands under OUT/best (adapter/, sparse/ or model/, as at the end).
    #[arg(long)]
    keep_best: bool,
    /// Stop as Ctrl-C does (checkpoint, exit 130) after this step; for tests.
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

/// The module names of `--target-modules`: a comma-separated list, or PEFT's `all-linear`.
fn modules(list: &str) -> Vec<String> {
    if list.trim() == "all-linear" {
        return tuna::nn::llama::LINEAR_MODULES.iter().map(|s| s.to_string()).collect();
    }
    list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// The examples of a JSONL file, its bad lines reported as warnings (or, with `strict`, the
/// first one an error).
fn read_examples(path: &std::path::Path, strict: bool) -> Result<Dataset, String> {
    let data = Dataset::read(path).map_err(err)?;
    if strict {
        data.strict().map_err(err)?;
    }
    for b in &data.bad_lines {
        eprintln!("warning: {}: line {}: {} (skipped)", path.display(), b.line, b.reason);
    }
    Ok(data)
}

/// The LoRA config of a run: the flags over the defaults, or, with `--adapter`, the loaded
/// adapter's (which it must stay: a flag that says otherwise is an error naming both), its
/// dropout replaced by `--lora-dropout` where given.
fn lora_config(a: &FinetuneArgs, loaded: Option<LoraConfig>) -> Result<LoraConfig, String> {
    let Some(mut l) = loaded else {
        let d = LoraConfig::default();
        return Ok(LoraConfig {
            r: a.rank.unwrap_or(d.r),
            alpha: a.alpha.unwrap_or(d.alpha),
            dropout: a.lora_dropout.unwrap_or(d.dropout),
            use_rslora: a.rslora,
            target_modules: a.target_modules.as_deref().map_or(d.target_modules, modules),
            ..d
        });
    };
    let adapter = a.model.adapter.as_ref().expect("a loaded adapter came from --adapter").display();
    let differs = |flag: String, has: String| format!("{flag} differs from the adapter {adapter} being trained ({has}); leave it out to train the adapter as it is");
    if let Some(r) = a.rank.filter(|&r| r != l.r) {
        return Err(differs(format!("--rank {r}"), format!("r {}", l.r)));
    }
    if let Some(alpha) = a.alpha.filter(|&x| x != l.alpha) {
        return Err(differs(format!("--alpha {alpha}"), format!("lora_alpha {}", l.alpha)));
    }
    if a.rslora && !l.use_rslora {
        return Err(differs("--rslora".into(), "use_rslora false".into()));
    }
    if let Some(t) = a.target_modules.as_deref().map(modules) {
        let (mut want, mut has) = (t.clone(), l.target_modules.clone());
        want.sort();
        has.sort();
        if want != has {
            return Err(differs(format!("--target-modules {}", t.join(",")), format!("target_modules {}", l.target_modules.join(","))));
        }
    }
    if let Some(d) = a.lora_dropout {
        l.dropout = d;
    }
    Ok(l)
}

pub fn finetune(a: FinetuneArgs) -> CliResult {
    if a.model.bf16_weights && !matches!(a.method, MethodArg::Lora) {
        return Err("--bf16-weights keeps the base's matrices frozen in bf16: use it with --method lora".into());
    }
    if a.model.adapter.is_some() && !matches!(a.method, MethodArg::Lora | MethodArg::Qlora) {
        return Err("--adapter trains that adapter further, with --method lora or qlora; to fine-tune a model with an adapter folded in, fold it first with `tuna merge`".into());
    }
    // The data first: a bad file fails before a large model loads.
    let data = read_examples(&a.data, a.strict)?;
    let eval_data = a.eval_data.as_deref().map(|p| read_examples(p, a.strict)).transpose()?;
    // A QLoRA base is quantized as it is read (the trainer would quantize it anyway).
    // LoRA keeps the base frozen, so a bf16 checkpoint's matrices may stay bf16 on the CPU.
    let (model, tok, loaded) = load_to_train(&a.model, a.model.nf4 || matches!(a.method, MethodArg::Qlora), a.f16, matches!(a.method, MethodArg::Lora))?;
    let tokens = |d: &Dataset| -> Result<Vec<_>, String> { Ok(tokenize_dataset(d, &tok, a.max_seq_len, a.train_on_prompt).map_err(err)?.into_iter().map(|(_, s)| s).collect()) };
    let (train, eval) = match &eval_data {
        Some(e) => (tokens(&data)?, tokens(e)?),
        None => split(tokens(&data)?, a.eval_fraction.unwrap_or(0.1), a.seed),
    };
    let train = if a.pack { pack(&train, a.max_seq_len) } else { train };
    let method = match a.method {
        MethodArg::Lora | MethodArg::Qlora => {
            let l = lora_config(&a, loaded)?;
            if matches!(a.method, MethodArg::Qlora) { Method::Qlora(l) } else { Method::Lora(l) }
        }
        MethodArg::Full => Method::Full,
        MethodArg::Head => Method::Head,
        MethodArg::Sparse => Method::Sparse(SparseConfig {
            density: a.density,
            reselect_every: a.reselect_every,
            reselect_rate: a.reselect_rate,
            regrow: match (a.regrow, a.optimizer) {
                (Some(RegrowArg::Sm3), _) | (None, OptimizerArg::Sm3) => Regrow::Sm3,
                (Some(RegrowArg::Grad), _) | (None, OptimizerArg::Adamw) => Regrow::Grad,
            },
            target_modules: a.target_modules.as_deref().map_or_else(|| SparseConfig::default().target_modules, modules),
            ..Default::default()
        }),
    };
    let config = TrainConfig {
        method: method.clone(),
        lr: a.lr,
        schedule: match a.schedule {
            ScheduleArg::Cosine => ScheduleKind::Cosine,
            ScheduleArg::Linear => ScheduleKind::Linear,
            ScheduleArg::Constant => ScheduleKind::Constant,
        },
        warmup_steps: a.warmup_steps,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_grad_norm: a.max_grad_norm,
        optimizer: match a.optimizer {
            OptimizerArg::Adamw => OptimizerConfig::AdamW(AdamWConfig { beta1: a.beta1, weight_decay: a.weight_decay, ..Default::default() }),
            OptimizerArg::Sm3 => OptimizerConfig::Sm3(Sm3Config { beta1: a.beta1, weight_decay: a.weight_decay, ..Default::default() }),
        },
        seed: a.seed,
        shuffle: !a.no_shuffle,
        shards: a.cpu_shards,
        checkpoint_layers: a.checkpoint_layers,
        ..Default::default()
    };
    let pad = tok.eos_token.as_deref().and_then(|t| tok.token_to_id(t)).unwrap_or(0);
    let mut trainer = Trainer::new(model, config, train, pad).map_err(err)?;
    if !a.model.json {
        eprintln!(
            "{} fine-tuning with {}: {} train / {} eval examples, {} steps, {} trained parameters, optimizer state {} floats ({} skipped lines)",
            method.name(), trainer.optimizer.name(), trainer.train_len(), eval.len(), trainer.total_steps(), trainer.trainable_count(),
            trainer.optimizer.state_len(), data.bad_lines.len()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is written exits at once.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: writing a checkpoint (Ctrl-C again to exit at once)");
        });
    }
    let opts = RunOptions {
        out: a.out.clone(),
        eval_every: a.eval_every,
        checkpoint_every: a.checkpoint_every,
        metrics: match a.metrics {
            MetricsArg::Jsonl => MetricsFormat::Jsonl,
            MetricsArg::Csv => MetricsFormat::Csv,
        },
        resume: a.resume,
        progress: !a.model.json,
        stop_after: a.stop_after,
        keep_best: a.keep_best.then(|| a.model.model.clone()),
    };
    let summary = run(&mut trainer, &eval, &opts, &stop).map_err(err)?;
    if summary.interrupted {
        eprintln!("checkpoint written to {}; continue with --resume", summary.checkpoint_path.display());
        std::process::exit(130);
    }
    let output = trainer.write_result(&a.out, &a.model.model).map_err(err)?;
    if a.model.json {
        println!(
            "{}",
            json!({
                "method": method.name(), "steps": summary.steps, "final_train_loss": summary.final_train_loss,
                "final_eval_loss": summary.final_eval_loss, "tokens_per_second": summary.tokens_per_second,
                "seconds": summary.seconds, "trainable_parameters": trainer.trainable_count(),
                "optimizer": trainer.optimizer.name(), "optimizer_state_floats": trainer.optimizer.state_len(),
                "output": output, "metrics": summary.metrics_path, "plot": summary.plot_path,
                "checkpoint": summary.checkpoint_path, "skipped_lines": data.bad_lines.len(),
                "train_examples": trainer.train_len(), "eval_examples": eval.len(),
                "eval_skipped_lines": eval_data.as_ref().map(|e| e.bad_lines.len()),
                "checkpoint_layers": trainer.config.checkpoint_layers, "weights": weights_form(&trainer.model),
                "best_eval_loss": summary.best_eval.map(|b| b.1), "best_step": summary.best_eval.map(|b| b.0),
                "best": a.keep_best.then(|| a.out.join("best")),
            })
        );
    } else {
        let eval_txt = summary.final_eval_loss.map(|e| format!(", eval loss {e:.4}")).unwrap_or_default();
        println!("done: {} steps, train loss {:.4}{eval_txt}, {:.0} tokens/s", summary.steps, summary.final_train_loss, summary.tokens_per_second);
        let what = match method {
            Method::Lora(_) | Method::Qlora(_) => "adapter",
            Method::Sparse(_) => "sparse deltas",
            _ => "model",
        };
        println!("{what}: {}", output.display());
        println!("metrics: {}\nloss curve: {}", summary.metrics_path.display(), summary.plot_path.display());
    }
    Ok(())
}
