//! `tuna`: the reference command line. See `tuna --help`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

mod demo;
mod finetune;

use clap::{Args, Parser, Subcommand};
use finetune::FinetuneArgs;
use serde_json::json;
use tuna::io::dataset::{tokenize, Dataset};
use tuna::io::tokenizer::{Message, Tokenizer};
use tuna::nn::{GenerateOptions, Llama};
use tuna::peft::LoraConfig;
use tuna::{DType, Device, Tensor};

#[derive(Parser)]
#[command(name = "tuna", version, about = "Hand-written GPU kernels for fine-tuning decoder language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job, on built-in data: teach a small random model a task with LoRA and show
    /// the accuracy before and after.
    Demo(demo::DemoArgs),
    /// Time LoRA training steps of the tools/bench-vs-torch configuration (JSON).
    #[command(hide = true)]
    BenchStep(demo::BenchStepArgs),
    /// List the CPU, CUDA devices and wgpu adapters this machine has.
    Devices,
    /// Run the RMSNorm kernels on every device (or one) against the f64 CPU reference, and on a
    /// GPU a small model's loss and LoRA gradients against the CPU's.
    Check {
        /// cpu, cuda[:N], wgpu[:N]; default: every device present.
        #[arg(long)]
        device: Option<String>,
    },
    /// Generate text from a prompt, streaming tokens as they come.
    Generate(GenerateArgs),
    /// Mean loss and perplexity of a model over a JSONL file.
    Perplexity(PerplexityArgs),
    /// Fine-tune a model on a JSONL file (LoRA, full or head-only) and write the result.
    Finetune(FinetuneArgs),
    /// Fold a LoRA adapter and/or sparse deltas into the base model and write a Hugging Face
    /// model folder.
    Merge {
        #[arg(long)]
        model: PathBuf,
        /// A LoRA adapter folder (PEFT format).
        #[arg(long, required_unless_present = "deltas")]
        adapter: Option<PathBuf>,
        /// Sparse deltas (a folder with sparse_deltas.safetensors, or the file).
        #[arg(long)]
        deltas: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// The weights' dtype in the written folder; auto: the one the base stores its matrices
        /// in (f32 where they differ), as PEFT's merge of the base loaded in that dtype gives.
        #[arg(long, value_enum, default_value = "auto")]
        dtype: DtypeArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// cpu, cuda[:N] (bf16), wgpu[:N] or auto (the CPU: a software Vulkan adapter is slower
    /// than the CPU path).
    #[arg(long, default_value = "auto")]
    pub(crate) device: String,
    /// Print one machine-readable JSON result instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// A LoRA adapter folder in PEFT's format (written by tuna or by PEFT) to apply; `finetune
    /// --method lora|qlora` trains it further (its rank, alpha and target modules).
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    /// Sparse deltas written by `tuna finetune --method sparse` to apply.
    #[arg(long)]
    pub(crate) deltas: Option<PathBuf>,
    /// Quantize the decoder linears to NF4 at load (the base a QLoRA adapter was trained on).
    #[arg(long)]
    pub(crate) nf4: bool,
    /// Keep the model's matrices (linears, embeddings, LM head) in bf16 on the CPU, from any
    /// checkpoint (an f32 or f16 one's rounded): half their memory, and decoding reads half the
    /// bytes; activations and the math stay f32. The default on the CPU where the checkpoint
    /// stores its matrices in bf16 (exact there), unless deltas fold into them.
    #[arg(long)]
    pub(crate) bf16_weights: bool,
    /// Keep the matrices in f32 on the CPU even where the checkpoint stores them in bf16.
    #[arg(long, conflicts_with = "bf16_weights")]
    pub(crate) f32_weights: bool,
}

/// The form the model's weights took, as the JSON results report it: nf4 (decoder linears),
/// or the embedding's dtype (bf16 for bf16 matrices on the CPU and on CUDA, f32, f16).
pub(crate) fn weights_form(model: &Llama) -> &'static str {
    if model.linears().iter().any(|(_, l)| l.weight.dtype() == DType::NF4) {
        "nf4"
    } else {
        model.embed.dtype().name()
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message before the user's (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Stop once the text generated contains this string (kept in the output, as transformers'
    /// `stop_strings` keeps it); may be given several times.
    #[arg(long)]
    stop: Vec<String>,
    /// transformers' repetition penalty (1: off; 1.1-1.3 are usual): the logits of tokens
    /// already in the prompt or output are divided by it (multiplied where negative).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the model in f16 (weights and activations; f32 math inside the kernels). Needs
    /// --device wgpu with an adapter that has SHADER_F16.
    #[arg(long)]
    f16: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL: {"text"}, {"prompt","completion"} (completion tokens scored), {"messages"},
    /// ShareGPT's {"conversations"} or Alpaca's {"instruction","input","output"}.
    #[arg(long)]
    data: PathBuf,
    /// The longest window the model reads (default: its context length). A longer example is
    /// scored in windows of this many tokens, each starting --stride tokens after the last, its
    /// tokens scored once, each with the window's context before it (as transformers' guide to
    /// perplexity does).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Tokens between window starts for examples longer than --max-seq-len (default: half
    /// of it).
    #[arg(long)]
    stride: Option<usize>,
    /// Fail on the first bad line instead of skipping bad lines.
    #[arg(long)]
    strict: bool,
    /// Run the model in f16 (see `generate --f16`); the loss is reduced in f32.
    #[arg(long)]
    f16: bool,
}

pub(crate) type CliResult = Result<(), String>;

fn main() -> ExitCode {
    tuna::device::cpu::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::demo(a),
        Command::BenchStep(a) => demo::bench_step(a),
        Command::Devices => devices(),
        Command::Check { device } => check(device),
        Command::Generate(a) => generate(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Finetune(a) => finetune::finetune(a),
        Command::Merge { model, adapter, deltas, out, dtype } => merge(&model, adapter.as_deref(), deltas.as_deref(), &out, dtype),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn devices() -> CliResult {
    for d in Device::available() {
        println!("{:<8} {}", d.device.to_string(), d.name);
    }
    if let Err(e) = tuna::device::cuda::device_count() {
        println!("(cuda: {e})");
    }
    Ok(())
}

/// The model (with its adapter or deltas) and tokenizer of `args`, on its device, in f16 with
/// `f16`. With `nf4` the decoder linears are quantized to NF4; with `--bf16-weights`, or by
/// default for a bf16 checkpoint on the CPU, the matrices are kept in bf16, as they are read
/// unless deltas must first fold into the f32 weights. The adapter takes the model's precision
/// on the device.
pub(crate) fn load(args: &ModelArgs, nf4: bool, f16: bool) -> Result<(Llama, Tokenizer), String> {
    let (mut model, tok, device) = load_base(args, nf4, true)?;
    if let Some(a) = &args.adapter {
        tuna::peft::load_adapter(&mut model, a).map_err(err)?;
    }
    Ok((half(on_device(model, &device)?, f16)?, tok))
}

/// [`load`] for training: the adapter, if any, is attached last, in f32 on the device (the
/// masters a trainer keeps, as for fresh adapters), and its config is returned. `bf16_ok`: the
/// method keeps the matrices frozen, so a bf16 checkpoint's may stay bf16 on the CPU.
pub(crate) fn load_to_train(args: &ModelArgs, nf4: bool, f16: bool, bf16_ok: bool) -> Result<(Llama, Tokenizer, Option<LoraConfig>), String> {
    let (model, tok, device) = load_base(args, nf4, bf16_ok)?;
    let mut model = half(on_device(model, &device)?, f16)?;
    let lora = match &args.adapter {
        Some(a) => Some(tuna::peft::load_adapter(&mut model, a).map_err(err)?),
        None => None,
    };
    Ok((model, tok, lora))
}

/// The base model of `args` on the CPU (deltas folded in, then NF4 or bf16 as asked or, where
/// `bf16_ok`, as a bf16 checkpoint stores it), its tokenizer, and the device it is for (opened).
fn load_base(args: &ModelArgs, nf4: bool, bf16_ok: bool) -> Result<(Llama, Tokenizer, Device), String> {
    let device: Device = if args.device == "auto" { Device::Cpu } else { args.device.parse().map_err(err)? };
    if args.bf16_weights && (nf4 || device != Device::Cpu) {
        return Err(format!("--bf16-weights is a CPU form of the base; not with {}", if nf4 { "an NF4 base" } else { "--device other than cpu (CUDA runs the model in bf16 already)" }));
    }
    if device != Device::Cpu {
        device.open().map_err(err)?;
    }
    // A bf16 checkpoint's matrices stay bf16 on the CPU, where nothing changes them first (an
    // unreadable folder is left to the load, which names what is wrong).
    let bf16 = args.bf16_weights
        || (bf16_ok && !args.f32_weights && !nf4 && device == Device::Cpu && args.deltas.is_none()
            && tuna::io::safetensors::WeightFiles::open(&args.model).and_then(|w| w.matrices_dtype()).is_ok_and(|d| d == Some(DType::BF16)));
    // Deltas fold into the full-precision weights, before any quantization; adapters stay
    // separate, so they apply on top of the NF4 base.
    let mut model = match (args.deltas.is_none(), nf4, bf16) {
        (true, true, _) => Llama::load_nf4(&args.model),
        (true, _, true) => Llama::load_bf16(&args.model),
        _ => Llama::load(&args.model),
    }
    .map_err(err)?;
    if let Some(d) = &args.deltas {
        tuna::peft::load_deltas(&mut model, d).map_err(err)?;
        model.merge_sparse().map_err(err)?;
    }
    if nf4 {
        model.quantize_nf4().map_err(err)?;
    }
    if bf16 {
        model.matrices_in_bf16().map_err(err)?;
    }
    let tok = Tokenizer::from_dir(&args.model).map_err(err)?;
    Ok((model, tok, device))
}

/// The model on `device`: as it is on the CPU and wgpu, in bf16 on CUDA (the CUDA kernels'
/// storage type; LoRA adapters the trainer adds stay f32 masters).
pub(crate) fn on_device(model: Llama, device: &Device) -> Result<Llama, String> {
    let model = model.to_device(device).map_err(err)?;
    match device {
        Device::Cuda(_) => model.to_dtype(tuna::DType::BF16).map_err(err),
        _ => Ok(model),
    }
}

fn merge(model: &std::path::Path, adapter: Option<&std::path::Path>, deltas: Option<&std::path::Path>, out: &std::path::Path, dtype: DtypeArg) -> CliResult {
    let dtype = match dtype {
        DtypeArg::F32 => DType::F32,
        DtypeArg::Bf16 => DType::BF16,
        DtypeArg::F16 => DType::F16,
        // Matrices of mixed dtypes (or in none a file can hold) are written in f32.
        DtypeArg::Auto => match tuna::io::safetensors::WeightFiles::open(model).and_then(|w| w.matrices_dtype()).map_err(err)? {
            Some(d) if d.is_float() => d,
            _ => DType::F32,
        },
    };
    let mut m = Llama::load(model).map_err(err)?;
    if let Some(a) = adapter {
        tuna::peft::load_adapter(&mut m, a).map_err(err)?;
        m.merge_lora().map_err(err)?;
    }
    if let Some(d) = deltas {
        tuna::peft::load_deltas(&mut m, d).map_err(err)?;
        m.merge_sparse().map_err(err)?;
    }
    m.save_in(model, out, dtype).map_err(err)?;
    let what: Vec<String> = adapter.into_iter().chain(deltas).map(|p| p.display().to_string()).collect();
    println!("merged {} into {} -> {} ({dtype})", what.join(" and "), model.display(), out.display());
    Ok(())
}

/// The model in f16 for `--f16` (on wgpu only).
pub(crate) fn half(model: Llama, f16: bool) -> Result<Llama, String> {
    if !f16 {
        return Ok(model);
    }
    if !matches!(model.device(), Device::Wgpu(_)) {
        return Err(format!("--f16 runs on wgpu only (the model is on {}); add --device wgpu", model.device()));
    }
    model.to_dtype(tuna::DType::F16).map_err(err)
}

fn generate(a: GenerateArgs) -> CliResult {
    let (model, tok) = load(&a.model, a.model.nf4, a.f16)?;
    let text = if a.chat {
        let system = a.system.iter().map(|c| Message { role: "system".into(), content: c.clone() });
        let messages: Vec<Message> = system.chain([Message { role: "user".into(), content: a.prompt.clone() }]).collect();
        tok.apply_chat_template(&messages, true).map_err(err)?
    } else {
        a.prompt.clone()
    };
    // A rendered chat template already holds its special tokens.
    let prompt = tok.encode(&text, !a.chat).map_err(err)?;
    let mut eos = model.config.eos_token_ids.clone();
    if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        eos_token_ids: eos.clone(),
        repetition_penalty: a.repetition_penalty,
    };
    let started = Instant::now();
    let mut shown = String::new();
    let mut so_far = Vec::new();
    let stream = !a.model.json;
    if stream {
        print!("{}", a.prompt);
    }
    let mut stopped_at: Option<String> = None;
    let new = model
        .generate_until(&prompt, &opts, |t| {
            if eos.contains(&t) || (!stream && a.stop.is_empty()) {
                return true;
            }
            so_far.push(t);
            // Decode the whole continuation and print what is new: a token may end mid-character.
            let Ok(s) = tok.decode(&so_far, true) else { return true };
            if stream && s.len() > shown.len() && s.starts_with(&shown) && !s.ends_with('\u{fffd}') {
                print!("{}", &s[shown.len()..]);
                let _ = std::io::stdout().flush();
                shown = s.clone();
            }
            stopped_at = a.stop.iter().find(|stop| s.contains(stop.as_str())).cloned();
            stopped_at.is_none()
        })
        .map_err(err)?;
    let secs = started.elapsed().as_secs_f64();
    let visible: Vec<u32> = new.iter().copied().filter(|t| !eos.contains(t)).collect();
    let completion = tok.decode(&visible, true).map_err(err)?;
    if a.model.json {
        println!(
            "{}",
            json!({
                "prompt": a.prompt, "completion": completion, "prompt_tokens": prompt.len(),
                "new_tokens": new, "stopped_at_eos": new.last().is_some_and(|t| eos.contains(t)), "stopped_at": stopped_at,
                "seconds": secs, "tokens_per_second": new.len() as f64 / secs.max(1e-9), "weights": weights_form(&model),
            })
        );
    } else {
        if completion.len() > shown.len() && completion.starts_with(&shown) {
            print!("{}", &completion[shown.len()..]);
        }
        println!();
        eprintln!("[{} tokens, {:.1} tokens/s]", new.len(), new.len() as f64 / secs.max(1e-9));
    }
    Ok(())
}

/// The windows `(begin, end, scored_from)` that score `n` tokens with at most `max_len` a
/// window: each starts `stride` after the last (`stride < max_len`), and scores the tokens
/// from `scored_from` (where the last one ended) on, so every token past the first is scored
/// once.
fn windows(n: usize, max_len: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut begin, mut scored) = (0, 0);
    loop {
        let end = (begin + max_len).min(n);
        out.push((begin, end, scored));
        if end == n {
            return out;
        }
        scored = end;
        begin += stride;
    }
}

fn perplexity(a: PerplexityArgs) -> CliResult {
    let (model, tok) = load(&a.model, a.model.nf4, a.f16)?;
    // One forward per example: on the CPU each weight's transpose pays for itself.
    model.keep_cpu_transposes();
    let data = Dataset::read(&a.data).map_err(err)?;
    if a.strict {
        data.strict().map_err(err)?;
    }
    for b in data.bad_lines.iter().take(5) {
        eprintln!("warning: {}: line {}: {} (skipped)", a.data.display(), b.line, b.reason);
    }
    let max_len = a.max_seq_len.unwrap_or(model.config.max_position_embeddings);
    let stride = a.stride.unwrap_or(max_len / 2).max(1);
    if max_len < 2 || stride >= max_len {
        return Err(format!("--max-seq-len {max_len} needs at least 2 tokens and --stride {stride} less than it (windows overlap, so each token has context)"));
    }
    let (mut nll, mut count) = (0.0f64, 0usize);
    let started = Instant::now();
    for (line, ex) in &data.examples {
        let (ids, mask) = tokenize(&tok, ex, false).map_err(|e| format!("{}: line {line}: {e}", a.data.display()))?;
        for (begin, end, scored_from) in windows(ids.len(), max_len, stride) {
            // A window's targets: the example's, from where the last window's scoring ended.
            let mask: Vec<bool> = (begin..end).map(|i| mask[i] && i >= scored_from).collect();
            let targets = mask.iter().skip(1).filter(|&&m| m).count();
            if targets == 0 {
                continue;
            }
            let t = Tensor::from_vec_i32(ids[begin..end].iter().map(|&i| i as i32).collect(), [1, end - begin]).map_err(err)?;
            let loss = model.loss(&t, Some(&mask)).map_err(|e| format!("{}: line {line}: {e}", a.data.display()))?;
            nll += loss.to_scalar().map_err(err)? as f64 * targets as f64;
            count += targets;
        }
    }
    if count == 0 {
        return Err(format!("{}: no tokens to score ({} examples, {} bad lines)", a.data.display(), data.examples.len(), data.bad_lines.len()));
    }
    let mean = nll / count as f64;
    let secs = started.elapsed().as_secs_f64();
    if a.model.json {
        println!(
            "{}",
            json!({"mean_loss": mean, "perplexity": mean.exp(), "tokens": count, "examples": data.examples.len(),
                   "skipped_lines": data.bad_lines.len(), "seconds": secs, "weights": weights_form(&model)})
        );
    } else {
        println!("mean loss {mean:.4}  perplexity {:.3}  over {count} tokens in {} examples", mean.exp(), data.examples.len());
        if !data.bad_lines.is_empty() {
            println!("skipped {} bad line(s)", data.bad_lines.len());
        }
    }
    Ok(())
}

fn check(device: Option<String>) -> CliResult {
    let devices: Vec<Device> = match device {
        None => Device::available().into_iter().map(|d| d.device).collect(),
        Some(d) => vec![d.parse().map_err(err)?],
    };
    // The same check the test suite and gpu-check run: forward and backward against the f64
    // reference under the tolerance rule, on a shape wider than one workgroup.
    let (rows, cols) = (512, 1000);
    println!("RMSNorm [{rows}, {cols}] forward and backward against the f64 reference:");
    let mut failed = false;
    for &dev in &devices {
        let dtypes: &[DType] = if matches!(dev, Device::Cuda(_)) { &[DType::F32, DType::BF16] } else { &[DType::F32] };
        for &dtype in dtypes {
            let result = tuna::testing::check_rmsnorm(dev, dtype, rows, cols, 1);
            failed |= result.is_err();
            println!("  {:<8} {:<5} {}", dev.to_string(), dtype.to_string(), result.err().unwrap_or_else(|| "ok".into()));
        }
    }
    // The model on each GPU against the CPU (`testing::model`): f32 on wgpu, bf16 on CUDA.
    let gpus: Vec<(Device, DType)> = devices
        .iter()
        .filter_map(|&d| match d {
            Device::Cpu => None,
            Device::Cuda(_) => Some((d, DType::BF16)),
            Device::Wgpu(_) => Some((d, DType::F32)),
        })
        .collect();
    if !gpus.is_empty() {
        println!("A small Llama with LoRA: loss and adapter gradients against the CPU's:");
    }
    for (dev, dtype) in gpus {
        let result = tuna::testing::model::check_loss_and_grads(&dev, dtype);
        failed |= result.is_err();
        println!("  {:<8} {:<5} {}", dev.to_string(), dtype.to_string(), result.unwrap_or_else(|e| format!("FAILED: {e}")));
    }
    if failed {
        Err("some devices failed the check (see above)".into())
    } else {
        Ok(())
    }
}
