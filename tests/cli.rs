//! The `tuna` binary end to end on the fixture model: JSON results agree with the library,
//! and bad input fails with a message naming the file and line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Scratch;

fn tuna(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tuna")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/llama-gqa")
}

/// A fresh scratch folder holding `data.jsonl`: 16 counting examples ("Count i" ->
/// " i+1 i+2"). Returns (folder, data file).
fn counting_data(tag: &str) -> (Scratch, PathBuf) {
    let base = Scratch::new(tag);
    let data = write_counting(&base, 16, 2);
    (base, data)
}

/// `dir/data.jsonl`: `n` counting examples, "Count i" -> the next `next` numbers.
fn write_counting(dir: &Path, n: usize, next: usize) -> PathBuf {
    let data = dir.join("data.jsonl");
    let lines: String = (0..n)
        .map(|i| {
            let completion: String = (1..=next).map(|d| format!(" {}", i + d)).collect();
            format!("{{\"prompt\": \"Count {i}\", \"completion\": \"{completion}\"}}\n")
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    data
}

/// `tuna perplexity --data DATA --json` with `args`: its mean loss.
fn mean_loss(data: &Path, args: &[&str]) -> f64 {
    let mut a = vec!["perplexity", "--data", data.to_str().unwrap(), "--json"];
    a.extend_from_slice(args);
    let (ok, out, err) = tuna(&a);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["mean_loss"].as_f64().unwrap()
}

/// `tuna generate --prompt "The capital" --max-new-tokens 6 --json` with `extra` flags, checked
/// against `model`'s own greedy tokens.
fn generate_matches(model: &tuna::nn::Llama, extra: &[&str]) {
    let m = fixture();
    let mut args = vec!["generate", "--model", m.to_str().unwrap(), "--prompt", "The capital", "--max-new-tokens", "6", "--json"];
    args.extend_from_slice(extra);
    let (ok, out, err) = tuna(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tok = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let prompt = tok.encode("The capital", true).unwrap();
    let opts = tuna::nn::GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![1], ..Default::default() };
    let want = model.generate(&prompt, &opts, |_| {}).unwrap();
    let got: Vec<u32> = v["new_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(got, want, "generate {extra:?}");
    assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, prompt.len());
}

#[test]
fn generate_json_matches_the_library() {
    generate_matches(&tuna::nn::Llama::load(&fixture()).unwrap(), &[]);
}

/// `--chat` renders the prompt through the model's chat template (with `--system`, a system
/// message first) and generates from the rendered tokens, as the library does.
#[test]
fn generate_chat_renders_the_template() {
    let m = fixture();
    let tok = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let model = tuna::nn::Llama::load(&m).unwrap();
    let msg = |role: &str, content: &str| tuna::io::tokenizer::Message { role: role.into(), content: content.into() };
    for (flags, messages) in [
        (&[][..], vec![msg("user", "Count 3")]),
        (&["--system", "Be brief."][..], vec![msg("system", "Be brief."), msg("user", "Count 3")]),
    ] {
        let text = tok.apply_chat_template(&messages, true).unwrap();
        let prompt = tok.encode(&text, false).unwrap();
        let mut args = vec!["generate", "--model", m.to_str().unwrap(), "--prompt", "Count 3", "--chat", "--max-new-tokens", "4", "--json"];
        args.extend_from_slice(flags);
        let (ok, out, err) = tuna(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, prompt.len(), "{flags:?}");
        let opts = tuna::nn::GenerateOptions { max_new_tokens: 4, eos_token_ids: vec![1], ..Default::default() };
        let want = model.generate(&prompt, &opts, |_| {}).unwrap();
        let got: Vec<u32> = v["new_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(got, want, "{flags:?}");
    }
    let (ok, _, err) = tuna(&["generate", "--model", m.to_str().unwrap(), "--prompt", "x", "--system", "s"]);
    assert!(!ok && err.contains("--chat"), "{err}");
}

/// `--stop` ends the generation at the token that completes the string (kept, as transformers'
/// `stop_strings`), and the JSON result names it.
#[test]
fn generate_stops_at_a_stop_string() {
    let m = fixture();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["generate", "--model", m.to_str().unwrap(), "--prompt", "The capital", "--max-new-tokens", "8", "--json"];
        args.extend_from_slice(extra);
        let (ok, out, err) = tuna(&args);
        assert!(ok, "{err}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let ids = |v: &serde_json::Value| -> Vec<u32> { v["new_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect() };
    let all = run(&[]);
    let all_ids = ids(&all);
    assert_eq!(all["stopped_at"], serde_json::Value::Null);
    let tok = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap();
    // The text of the first three tokens, less its first character: it is complete only once
    // the third is out (the fixture's tokens decode to text of their own).
    let three = tok.decode(&all_ids[..3], true).unwrap();
    let stop: String = three.chars().skip(1).collect();
    assert!(!tok.decode(&all_ids[..2], true).unwrap().contains(&stop), "{three:?}");
    let v = run(&["--stop", "no such text", "--stop", &stop]);
    assert_eq!(ids(&v), all_ids[..3], "{v}");
    assert_eq!(v["stopped_at"], serde_json::Value::String(stop.clone()));
    assert!(v["completion"].as_str().unwrap().ends_with(&stop), "{v}");
}

#[test]
fn generate_in_f16_on_wgpu_matches_the_library() {
    let m = fixture();
    let (ok, _, err) = tuna(&["generate", "--model", m.to_str().unwrap(), "--prompt", "The capital", "--f16"]);
    assert!(!ok && err.contains("--f16") && err.contains("wgpu"), "--f16 on the CPU is refused: {err}");
    let dev = common::devices().into_iter().find(|&d| common::has_f16(d));
    let Some(dev) = dev else { return };
    let model = tuna::nn::Llama::load(&m).unwrap().to_device(&dev).unwrap().to_dtype(tuna::DType::F16).unwrap();
    generate_matches(&model, &["--device", &dev.to_string(), "--f16"]);
}

/// `--bf16-weights` keeps the matrices in bf16 on the CPU: the tokens and loss of the
/// library's `load_bf16` model; refused where it cannot apply.
#[test]
fn bf16_weights_match_the_library_and_are_refused_off_the_cpu() {
    let m = fixture();
    let model = tuna::nn::Llama::load_bf16(&m).unwrap();
    generate_matches(&model, &["--bf16-weights"]);
    let (base, data) = counting_data("cli-bf16");
    let ids: Vec<i32> = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap().encode("Count 3 4 5", true).unwrap().into_iter().map(|t| t as i32).collect();
    std::fs::write(&data, "{\"text\": \"Count 3 4 5\"}\n").unwrap();
    let n = ids.len();
    let want = model.loss(&tuna::Tensor::from_vec_i32(ids, [1, n]).unwrap(), None).unwrap().to_scalar().unwrap() as f64;
    let got = mean_loss(&data, &["--model", m.to_str().unwrap(), "--bf16-weights"]);
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // LoRA trains on the bf16 base.
    let out = base.join("lora");
    let (ok, _, err) = tuna(&["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--max-steps", "2", "--eval-every", "0", "--checkpoint-every", "0", "--bf16-weights"]);
    assert!(ok, "{err}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    for (args, says) in [
        (&["generate", "--prompt", "x", "--nf4"][..], "NF4"),
        (&["generate", "--prompt", "x", "--device", "wgpu"][..], "--device"),
        (&["finetune", "--data", data.to_str().unwrap(), "--out", base.join("x").to_str().unwrap(), "--method", "sparse"][..], "--method lora"),
    ] {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--model", m.to_str().unwrap(), "--bf16-weights"]);
        let (ok, _, err) = tuna(&a);
        assert!(!ok && err.contains("--bf16-weights") && err.contains(says), "{args:?}: {err}");
    }
}

/// A checkpoint that stores its matrices in bf16 keeps them in bf16 on the CPU by default
/// (`generate`, `perplexity`, `finetune --method lora`): the JSON results say so, and the tokens
/// and loss are those of `Llama::load_bf16`. `--f32-weights` keeps f32 (`Llama::load`'s tokens);
/// an f32 checkpoint, a GPU, an NF4 base and the methods that change the matrices stay as before.
#[test]
fn a_bf16_checkpoint_stays_bf16_on_the_cpu() {
    let m = fixture().parent().unwrap().join("llama-gqa-bf16");
    let model = m.to_str().unwrap();
    let (base, data) = counting_data("cli-bf16-default");
    let tok = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let prompt = tok.encode("The capital", true).unwrap();
    let opts = tuna::nn::GenerateOptions { max_new_tokens: 6, eos_token_ids: vec![1], ..Default::default() };
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = tuna(args);
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    for (flags, weights, want) in [
        (&[][..], "bf16", tuna::nn::Llama::load_bf16(&m).unwrap()),
        (&["--f32-weights"][..], "f32", tuna::nn::Llama::load(&m).unwrap()),
    ] {
        let mut args = vec!["generate", "--model", model, "--prompt", "The capital", "--max-new-tokens", "6", "--json"];
        args.extend_from_slice(flags);
        let v = json(&args);
        assert_eq!(v["weights"], weights, "{flags:?}");
        let got: Vec<u32> = v["new_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(got, want.generate(&prompt, &opts, |_| {}).unwrap(), "{flags:?}");
        let mut args = vec!["perplexity", "--model", model, "--data", data.to_str().unwrap(), "--json"];
        args.extend_from_slice(flags);
        assert_eq!(json(&args)["weights"], weights, "perplexity {flags:?}");
    }
    let f32_fixture = fixture();
    assert_eq!(json(&["perplexity", "--model", f32_fixture.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"])["weights"], "f32");
    assert_eq!(json(&["perplexity", "--model", model, "--data", data.to_str().unwrap(), "--json", "--nf4"])["weights"], "nf4");
    if let Some(dev) = common::f32_model_devices().into_iter().find(|d| matches!(d, tuna::Device::Wgpu(_))) {
        assert_eq!(json(&["perplexity", "--model", model, "--data", data.to_str().unwrap(), "--json", "--device", &dev.to_string()])["weights"], "f32");
    }
    for (method, weights) in [("lora", "bf16"), ("full", "f32"), ("qlora", "nf4")] {
        let out = base.join(method);
        let v = json(&["finetune", "--model", model, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--method", method,
                       "--max-steps", "1", "--eval-every", "0", "--checkpoint-every", "0", "--json"]);
        assert_eq!(v["weights"], weights, "finetune --method {method}");
    }
}

#[test]
fn perplexity_json_and_bad_lines() {
    let m = fixture();
    let scratch = Scratch::new("cli");
    let data = scratch.join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"Hello world, this is a test.\"}\n{oops\n{\"prompt\": \"Q\", \"completion\": \"\"}\n").unwrap();
    let (ok, out, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    assert!(err.contains("line 2") && err.contains("line 3: field `completion` is empty"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // The same number from the library: the mean next-token loss of the one good line.
    let model = tuna::nn::Llama::load(&m).unwrap();
    let tok = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let ids: Vec<i32> = tok.encode("Hello world, this is a test.", true).unwrap().into_iter().map(|t| t as i32).collect();
    let n = ids.len();
    let loss = model.loss(&tuna::Tensor::from_vec_i32(ids, [1, n]).unwrap(), None).unwrap().to_scalar().unwrap() as f64;
    assert!((v["mean_loss"].as_f64().unwrap() - loss).abs() < 1e-5, "{v}");
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-3 * loss.exp());
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, n - 1);
    assert_eq!(v["skipped_lines"].as_u64().unwrap(), 2);

    // On wgpu (where CI has lavapipe), the same number within f32 rounding.
    if tuna::Device::available().iter().any(|d| matches!(d.device, tuna::Device::Wgpu(_))) {
        let (ok, out, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json", "--device", "wgpu"]);
        assert!(ok, "{err}");
        let w: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!((w["mean_loss"].as_f64().unwrap() - loss).abs() < 1e-5, "wgpu {w} vs cpu {v}");
        // In f16 (activations rounded to f16 after each op): within 1% of the f32 loss.
        if common::has_f16(tuna::Device::Wgpu(0)) {
            let (ok, out, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json", "--device", "wgpu", "--f16"]);
            assert!(ok, "{err}");
            let h: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            assert!((h["mean_loss"].as_f64().unwrap() - loss).abs() < 1e-2 * loss, "wgpu f16 {h} vs cpu {v}");
        }
    }

    let (ok, _, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--strict"]);
    assert!(!ok);
    assert!(err.contains(data.to_str().unwrap()) && err.contains("line 2: invalid JSON"), "{err}");
}

/// A line longer than --max-seq-len is scored in overlapping windows (every token past the
/// first once, with the window's context before it): the mean loss of an f64 log-softmax over
/// the model's logits, window by window, written out here.
#[test]
fn perplexity_scores_long_lines_in_windows() {
    let m = fixture();
    let scratch = Scratch::new("cli-windows");
    let data = scratch.join("long.jsonl");
    let text: String = (1..=30).map(|i| format!(" {i}")).collect();
    std::fs::write(&data, format!("{{\"text\": \"Count{text}\"}}\n")).unwrap();
    let tok = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let ids = tok.encode(&format!("Count{text}"), true).unwrap();
    let n = ids.len();
    assert!(n > 40, "{n} tokens");
    let model = tuna::nn::Llama::load(&m).unwrap();
    let (max_len, stride) = (16, 6);
    let (mut nll, mut count, mut begin, mut scored) = (0.0f64, 0usize, 0usize, 1usize);
    loop {
        let end = (begin + max_len).min(n);
        let window: Vec<i32> = ids[begin..end].iter().map(|&t| t as i32).collect();
        let logits = model.forward(&tuna::Tensor::from_vec_i32(window, [1, end - begin]).unwrap(), None).unwrap().to_vec_f32().unwrap();
        let v = model.config.vocab_size;
        for i in scored.max(begin + 1)..end {
            let row = &logits[(i - begin - 1) * v..(i - begin) * v];
            let max = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            nll += lse - row[ids[i] as usize] as f64;
            count += 1;
        }
        if end == n {
            break;
        }
        scored = end;
        begin += stride;
    }
    assert_eq!(count, n - 1);
    let (ok, out, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json", "--max-seq-len", "16", "--stride", "6"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tokens"].as_u64(), Some((n - 1) as u64), "{v}");
    let got = v["mean_loss"].as_f64().unwrap();
    assert!((got - nll / count as f64).abs() < 1e-5, "windows: {got} vs {}", nll / count as f64);
    let (ok, _, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--max-seq-len", "16", "--stride", "16"]);
    assert!(!ok && err.contains("--stride"), "{err}");
}

#[test]
fn missing_model_folder_is_a_clear_error() {
    let (ok, _, err) = tuna(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}

/// The main job: LoRA on a random base takes held-out exact-match accuracy from ~0 to most.
#[test]
fn demo_learns_the_task() {
    let out = Scratch::new("demo");
    let (ok, stdout, err) = tuna(&["demo", "--out", out.to_str().unwrap(), "--steps", "120", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (before, after) = (v["accuracy_before"].as_f64().unwrap(), v["accuracy_after"].as_f64().unwrap());
    assert!(before <= 0.05, "a random base should not solve the task: {before}");
    assert!(after >= 0.9, "LoRA should learn it: {after}");
    assert!(out.join("adapter/adapter_model.safetensors").exists() && out.join("loss.png").exists());
    // The adapter applies to the saved base through the public API as well.
    let mut base = tuna::nn::Llama::load(&out.join("base")).unwrap();
    tuna::peft::load_adapter(&mut base, &out.join("adapter")).unwrap();
}

/// An interrupted run (checkpoint, exit 130) resumed with --resume logs exactly the losses of
/// an uninterrupted one, and both write the same adapter.
#[test]
fn finetune_interrupt_and_resume_is_exact() {
    let m = fixture();
    let base = Scratch::new("ft");
    let data = write_counting(&base, 24, 3);
    let run = |out: &str, extra: &[&str]| {
        let out = base.join(out);
        let mut args = vec!["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
                            "--max-steps", "8", "--lr", "1e-2", "--lora-dropout", "0.1", "--eval-every", "3", "--checkpoint-every", "0", "--json"];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_tuna")).args(&args).output().unwrap();
        (o.status.code(), out)
    };
    let losses = |out: &Path| -> Vec<String> {
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["step"], v["loss"], v["eval_loss"])
        }).collect()
    };
    let (code, full) = run("full", &[]);
    assert_eq!(code, Some(0));
    // Each row's tokens/s is its own step's: none is counted over a neighbour's time or over
    // none (a queued step's timing done wrong gave rows 500x the median here).
    let mut tps: Vec<f64> = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["tokens_per_second"].as_f64().unwrap()).collect();
    tps.sort_by(f64::total_cmp);
    assert!(tps[tps.len() - 1] <= 20.0 * tps[tps.len() / 2], "tokens/s per row: {tps:?}");
    let (code, split) = run("split", &["--stop-after", "3"]);
    assert_eq!(code, Some(130), "an interrupted run exits 130");
    assert!(split.join("checkpoint/trainer_state.json").exists());
    assert_eq!(losses(&split).len(), 3);
    let (code, _) = run("split", &["--resume"]);
    assert_eq!(code, Some(0));
    assert_eq!(losses(&split), losses(&full));
    let adapter = |o: &Path| std::fs::read(o.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&split), adapter(&full));
}

/// `finetune --checkpoint-layers` (reported in the JSON summary) logs the same losses and writes
/// the same adapter, byte for byte, as the run without it.
#[test]
fn finetune_checkpoint_layers_changes_no_result() {
    let m = fixture();
    let (base, data) = counting_data("ft-ckpt");
    let run = |name: &str, extra: &[&str]| {
        let out = base.join(name);
        let mut args = vec!["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
                            "--max-steps", "4", "--lr", "1e-2", "--lora-dropout", "0.1", "--eval-every", "0", "--checkpoint-every", "0", "--json"];
        args.extend_from_slice(extra);
        let (ok, stdout, err) = tuna(&args);
        assert!(ok, "{name}: {err}");
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let losses: Vec<String> = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["step"], v["loss"])
        }).collect();
        (v["checkpoint_layers"].clone(), losses, std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap())
    };
    let (flag, plain_losses, plain_adapter) = run("plain", &[]);
    assert_eq!(flag, serde_json::Value::Bool(false));
    let (flag, ckpt_losses, ckpt_adapter) = run("ckpt", &["--checkpoint-layers"]);
    assert_eq!(flag, serde_json::Value::Bool(true), "--checkpoint-layers should reach the trainer's config");
    assert_eq!(plain_losses.len(), 4);
    assert_eq!(ckpt_losses, plain_losses, "losses with --checkpoint-layers vs without");
    assert!(ckpt_adapter == plain_adapter, "the adapter written with --checkpoint-layers differs");
}

/// The demo task with SM3 (LoRA), with sparse fine-tuning (SM3, regrowth by SM3 scores) and
/// with QLoRA (NF4 base) reaches the accuracy LoRA with AdamW reaches in
/// `demo_learns_the_task` (at least 90%).
/// `finetune --adapter` trains that adapter further: with a zero learning rate it writes the
/// adapter it read (PEFT's own fixture, and one tuna trained, on an f32 and an NF4 base) and
/// evaluates to the loss the first run ended at; with a real one it goes on below it. Flags
/// that would describe another adapter, and methods that would drop it, are refused.
#[test]
fn finetune_trains_a_loaded_adapter_further() {
    let m = fixture();
    let (base, data) = counting_data("cli-adapter");
    let run = |out: &str, extra: &[&str]| -> (serde_json::Value, PathBuf) {
        let out = base.join(out);
        let mut args = vec!["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
                            "--eval-every", "0", "--checkpoint-every", "0", "--json"];
        args.extend_from_slice(extra);
        let (ok, stdout, err) = tuna(&args);
        assert!(ok, "{extra:?}: {err}");
        (serde_json::from_str(stdout.trim()).unwrap(), out.join("adapter"))
    };
    let tensors = |dir: &Path| {
        let w = tuna::io::safetensors::WeightFiles::from_paths(&[dir.join("adapter_model.safetensors")]).unwrap();
        let mut keys: Vec<String> = w.names().into_iter().map(str::to_string).collect();
        keys.sort();
        keys.into_iter().map(|k| { let v = w.load_raw(&k, &tuna::Device::Cpu).unwrap().to_vec_f32().unwrap(); (k, v) }).collect::<Vec<_>>()
    };
    // PEFT's adapter, as it wrote it: the same tensors and config back.
    let peft = m.parent().unwrap().join("peft-lora");
    let (_, kept) = run("peft-lr0", &["--adapter", peft.to_str().unwrap(), "--max-steps", "1", "--lr", "0"]);
    let (got, want) = (tensors(&kept), tensors(&peft));
    assert_eq!(got.len(), want.len());
    for ((k, g), (_, w)) in got.iter().zip(&want) {
        assert!(g == w, "{k}: the adapter written at a zero learning rate is not PEFT's");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(kept.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    for method in ["lora", "qlora"] {
        let (first, trained) = run(&format!("{method}-1"), &["--method", method, "--max-steps", "4", "--lr", "1e-2"]);
        let a = trained.to_str().unwrap();
        let (again, kept) = run(&format!("{method}-lr0"), &["--method", method, "--adapter", a, "--max-steps", "1", "--lr", "0"]);
        let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
        assert!(bytes(&kept) == bytes(&trained), "{method}: a zero learning rate changed the adapter");
        assert_eq!(again["final_eval_loss"], first["final_eval_loss"], "{method}: the loaded adapter evaluates where its run ended");
        let (further, _) = run(&format!("{method}-2"), &["--method", method, "--adapter", a, "--max-steps", "4", "--lr", "1e-2"]);
        let (f, e) = (first["final_eval_loss"].as_f64().unwrap(), further["final_eval_loss"].as_f64().unwrap());
        assert!(e < f - 0.05, "{method}: four more steps from the adapter should go on down: {f} -> {e}");
    }
    for (flags, says) in [
        (&["--rank", "16"][..], "--rank 16 differs"),
        (&["--alpha", "32"][..], "--alpha 32 differs"),
        (&["--target-modules", "q_proj,v_proj"][..], "--target-modules q_proj,v_proj differs"),
        (&["--method", "full"][..], "tuna merge"),
        (&["--method", "sparse"][..], "tuna merge"),
    ] {
        let out = base.join("refused");
        let mut args = vec!["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--adapter", peft.to_str().unwrap()];
        args.extend_from_slice(flags);
        let (ok, _, err) = tuna(&args);
        assert!(!ok && err.contains(says), "{flags:?}: {err}");
        assert!(!out.exists(), "{flags:?}: a refused run wrote {}", out.display());
    }
}

/// `--eval-data` evaluates on a file of its own (bad lines skipped and counted), every --data
/// example trains, and the final eval loss is what `perplexity` gives on that file with the
/// adapter written. `--target-modules all-linear` adapts every linear, as PEFT's shorthand.
#[test]
fn finetune_evaluates_on_eval_data() {
    let m = fixture();
    let (base, data) = counting_data("cli-eval-data");
    let eval = base.join("eval.jsonl");
    std::fs::write(&eval, "{\"text\": \"Count 3 4 5\"}\n{bad\n{\"prompt\": \"Count 7\", \"completion\": \" 8 9\"}\n").unwrap();
    let out = base.join("run");
    let (ok, stdout, err) = tuna(&["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--eval-data", eval.to_str().unwrap(),
                                   "--out", out.to_str().unwrap(), "--max-steps", "3", "--lr", "1e-2", "--eval-every", "0", "--checkpoint-every", "0",
                                   "--target-modules", "all-linear", "--json"]);
    assert!(ok, "{err}");
    assert!(err.contains("eval.jsonl: line 2"), "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!((v["train_examples"].as_u64(), v["eval_examples"].as_u64(), v["eval_skipped_lines"].as_u64()), (Some(16), Some(2), Some(1)), "{v}");
    let adapter = out.join("adapter");
    let got = v["final_eval_loss"].as_f64().unwrap();
    let want = mean_loss(&eval, &["--model", m.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()]);
    assert!((got - want).abs() < 1e-5, "final eval loss {got}, perplexity's on the eval file {want}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7, "{cfg}");
    let (ok, _, err) = tuna(&["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--eval-data", eval.to_str().unwrap(),
                              "--eval-fraction", "0.2", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("--eval-fraction"), "{err}");
}

/// `--keep-best` writes the result at the lowest eval loss under OUT/best: the JSON names its
/// step and loss, the lowest in the metrics, and the adapter there scores that loss on the eval
/// file. With a learning rate that overshoots, the best is not the last.
#[test]
fn finetune_keeps_the_best_result() {
    let m = fixture();
    let (base, data) = counting_data("cli-best");
    let eval_dir = base.join("eval");
    std::fs::create_dir_all(&eval_dir).unwrap();
    let eval = write_counting(&eval_dir, 4, 2);
    let out = base.join("run");
    let (ok, stdout, err) = tuna(&["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--eval-data", eval.to_str().unwrap(),
                                   "--out", out.to_str().unwrap(), "--max-steps", "12", "--lr", "0.1", "--schedule", "constant", "--eval-every", "1",
                                   "--checkpoint-every", "0", "--keep-best", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let evals: Vec<(u64, f64)> = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        (r["step"].as_u64().unwrap(), r["eval_loss"].as_f64().unwrap())
    }).collect();
    let &(step, loss) = evals.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!((v["best_step"].as_u64(), v["best_eval_loss"].as_f64().map(|x| x as f32)), (Some(step), Some(loss as f32)), "{v}");
    assert!(step < 12, "the run should overshoot so that its best is not its last step: {evals:?}");
    let best = out.join("best/adapter");
    let scored = mean_loss(&eval, &["--model", m.to_str().unwrap(), "--adapter", best.to_str().unwrap()]);
    assert!((scored - loss).abs() < 1e-5, "the kept adapter scores {scored}, the best eval loss was {loss}");
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(bytes(&best) != bytes(&out.join("adapter")), "the best adapter is the final one");
}

#[test]
fn demo_learns_with_sm3_sparse_and_qlora() {
    for (tag, extra) in [
        ("sm3", &["--optimizer", "sm3"][..]),
        ("sparse", &["--method", "sparse", "--optimizer", "sm3"][..]),
        ("qlora", &["--method", "qlora"][..]),
    ] {
        let out = Scratch::new(&format!("demo-{tag}"));
        let mut args = vec!["demo", "--out", out.to_str().unwrap(), "--steps", "120", "--json"];
        args.extend_from_slice(extra);
        let (ok, stdout, err) = tuna(&args);
        assert!(ok, "{tag}: {err}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let (before, after) = (v["accuracy_before"].as_f64().unwrap(), v["accuracy_after"].as_f64().unwrap());
        assert!(before <= 0.05 && after >= 0.9, "{tag}: {before} -> {after}");
        let written = if tag == "sparse" { "sparse/sparse_deltas.safetensors" } else { "adapter/adapter_model.safetensors" };
        assert!(out.join(written).exists(), "{tag}: {written}");
    }
}

/// `finetune --method sparse` writes deltas; `merge --deltas` folds them into a model whose
/// perplexity equals the model with the deltas applied on the fly.
/// `merge` writes the weights in the base's dtype (a bf16 checkpoint gives a bf16 folder, each
/// weight the f32 merge rounded once) or in `--dtype`. The file gets the permissions of a plain
/// create (the umask's), not the private mode of the writer's temporary file.
#[test]
fn merge_writes_the_base_dtype() {
    use tuna::io::safetensors::WeightFiles;
    let fixtures = fixture().parent().unwrap().to_path_buf();
    let (base, adapter) = (fixtures.join("llama-gqa-bf16"), fixtures.join("peft-lora"));
    let dir = Scratch::new("merge-dtype");
    let merge = |out: &str, extra: &[&str]| {
        let out = dir.join(out);
        let mut args = vec!["merge", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, stdout, err) = tuna(&args);
        assert!(ok, "{extra:?}: {err}");
        (out, stdout)
    };
    let ((auto, said), (wide, _)) = (merge("auto", &[]), merge("f32", &["--dtype", "f32"]));
    assert!(said.contains("(bf16)"), "{said}");
    let (a, w, b) = (WeightFiles::open(&auto).unwrap(), WeightFiles::open(&wide).unwrap(), WeightFiles::open(&base).unwrap());
    assert_eq!(a.names(), w.names());
    for name in a.names() {
        assert_eq!((a.dtype(name).unwrap(), w.dtype(name).unwrap()), (tuna::DType::BF16, tuna::DType::F32), "{name}");
        let wide_values = w.load_raw(name, &tuna::Device::Cpu).unwrap().to_vec_f32().unwrap();
        let rounded: Vec<half::bf16> = wide_values.iter().map(|&x| half::bf16::from_f32(x)).collect();
        assert!(a.load_raw(name, &tuna::Device::Cpu).unwrap().to_vec::<half::bf16>().unwrap() == rounded, "{name}: not the f32 merge rounded once");
    }
    let q = "model.layers.0.self_attn.q_proj.weight";
    let base_q = b.load_raw(q, &tuna::Device::Cpu).unwrap().to_vec_f32().unwrap();
    assert!(w.load_raw(q, &tuna::Device::Cpu).unwrap().to_vec_f32().unwrap() != base_q, "the adapter did not change {q}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let probe = dir.join("probe");
        std::fs::File::create(&probe).unwrap();
        assert_eq!(mode(&auto.join("model.safetensors")), mode(&probe), "the merged file's permissions");
    }
}

#[test]
fn finetune_sparse_then_merge() {
    let m = fixture();
    let (base, data) = counting_data("sparse-cli");
    let out = base.join("run");
    let (ok, stdout, err) = tuna(&[
        "finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--method", "sparse", "--optimizer", "sm3", "--density", "0.05", "--reselect-every", "2", "--max-steps", "4", "--lr", "0.05", "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["method"], "sparse");
    assert_eq!(v["optimizer"], "sm3");
    let deltas = out.join("sparse");
    assert!(deltas.join("sparse_deltas.safetensors").exists());
    let merged = base.join("merged");
    let (ok, _, err) = tuna(&["merge", "--model", m.to_str().unwrap(), "--deltas", deltas.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(ok, "{err}");
    let ppl = |args: &[&str]| mean_loss(&data, args);
    let on_the_fly = ppl(&["--model", m.to_str().unwrap(), "--deltas", deltas.to_str().unwrap()]);
    let folded = ppl(&["--model", merged.to_str().unwrap()]);
    let untouched = ppl(&["--model", m.to_str().unwrap()]);
    assert!((on_the_fly - folded).abs() < 1e-5, "{on_the_fly} vs {folded}");
    assert!(folded < untouched, "training should lower the loss: {untouched} -> {folded}");
    // A corrupt deltas file is named in the error.
    std::fs::write(deltas.join("sparse_deltas.safetensors"), b"not a safetensors file").unwrap();
    let (ok, _, err) = tuna(&["merge", "--model", m.to_str().unwrap(), "--deltas", deltas.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(!ok && err.contains("sparse_deltas.safetensors"), "{err}");
}

/// Full fine-tuning of the Qwen3 fixture writes a model folder that loads again, with its q/k
/// norms trained, a Qwen3 config, and a lower loss on the training data.
#[test]
fn finetune_full_qwen3_writes_a_model_that_loads() {
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/qwen3");
    let (base, data) = counting_data("qwen3-cli");
    let out = base.join("run");
    let (ok, _, err) = tuna(&[
        "finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--method", "full", "--max-steps", "4", "--lr", "1e-2", "--json",
    ]);
    assert!(ok, "{err}");
    let (before, after) = (tuna::nn::Llama::load(&m).unwrap(), tuna::nn::Llama::load(&out.join("model")).unwrap());
    assert_eq!(after.config.arch, tuna::io::config::Arch::Qwen3);
    let norm = |l: &tuna::nn::Llama| l.layers[1].qk_norm.as_ref().unwrap().k.to_vec_f32().unwrap();
    assert_ne!(norm(&before), norm(&after), "k_norm should have trained");
    let (l0, l1) = (mean_loss(&data, &["--model", m.to_str().unwrap()]), mean_loss(&data, &["--model", out.join("model").to_str().unwrap()]));
    assert!(l1 < l0, "training should lower the loss: {l0} -> {l1}");
}

/// `--nf4` loads the base with its decoder linears quantized to NF4 (a QLoRA adapter's base):
/// the CLI's perplexity equals the library's loss on the quantized model.
#[test]
fn perplexity_on_an_nf4_base_matches_the_library() {
    let m = fixture();
    let scratch = Scratch::new("cli-nf4");
    let data = scratch.join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"Hello world, this is a test.\"}\n").unwrap();
    let (ok, out, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--nf4", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mut model = tuna::nn::Llama::load(&m).unwrap();
    let full = model.clone();
    model.quantize_nf4().unwrap();
    let tok = tuna::io::tokenizer::Tokenizer::from_dir(&m).unwrap();
    let ids: Vec<i32> = tok.encode("Hello world, this is a test.", true).unwrap().into_iter().map(|t| t as i32).collect();
    let n = ids.len();
    let ids = tuna::Tensor::from_vec_i32(ids, [1, n]).unwrap();
    let (quantized, f32_loss) = (model.loss(&ids, None).unwrap().to_scalar().unwrap() as f64, full.loss(&ids, None).unwrap().to_scalar().unwrap() as f64);
    assert!((v["mean_loss"].as_f64().unwrap() - quantized).abs() < 1e-5, "{v} vs {quantized}");
    assert!(quantized != f32_loss, "quantization should change the loss a little");
    // On wgpu the NF4 base stays quantized on the device (nf4_gemm.wgsl): the same loss.
    for dev in common::devices().into_iter().filter(|d| matches!(d, tuna::Device::Wgpu(_))) {
        let (ok, out, err) = tuna(&["perplexity", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--nf4", "--json", "--device", &dev.to_string()]);
        assert!(ok, "{err}");
        let w: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!((w["mean_loss"].as_f64().unwrap() - quantized).abs() < 1e-5, "{dev}: {w} vs {quantized}");
    }
}

#[test]
fn finetune_on_wgpu_follows_the_cpu() {
    if !tuna::Device::available().iter().any(|d| matches!(d.device, tuna::Device::Wgpu(_))) {
        assert!(std::env::var("TUNA_REQUIRE_WGPU").map_or(true, |v| v != "1"), "TUNA_REQUIRE_WGPU=1 but no wgpu adapter");
        return;
    }
    finetune_follows_the_cpu("wgpu", &fixture(), &Scratch::new("ft-wgpu"), 1e-4);
}

#[test]
fn finetune_on_cuda_follows_the_cpu() {
    // The model trains in bf16 on CUDA, whose attention kernels need a head dim of 32 or more:
    // the tiny test model (head dim 64) written as a model folder with the fixture's tokenizer.
    if !tuna::Device::available().iter().any(|d| matches!(d.device, tuna::Device::Cuda(_))) {
        assert!(std::env::var("TUNA_REQUIRE_CUDA").map_or(true, |v| v != "1"), "TUNA_REQUIRE_CUDA=1 but no CUDA device");
        return;
    }
    let dir = Scratch::new("cuda-model");
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture().join(f), tok.join(f)).unwrap();
    }
    let model = dir.join("model");
    tuna::nn::Llama::random(tuna::testing::model::tiny_config(), 3).unwrap().save(&tok, &model).unwrap();
    let adapter = finetune_follows_the_cpu("cuda", &model, &dir, 2e-3);
    // Generation on CUDA with the adapter it trained: a prompt and its new tokens.
    let (ok, out, err) = tuna(&["generate", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--prompt", "Count 3", "--max-new-tokens", "4", "--json", "--device", "cuda"]);
    assert!(ok, "generate on cuda: {err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let new: Vec<u64> = v["new_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert!((1..=4).contains(&new.len()) && new.iter().all(|&t| t < 320), "{v}");
    // Trained further on CUDA at a zero learning rate, the adapter comes back bit for bit: it is
    // attached as the f32 masters, not cast to the model's bf16 with the model.
    let again = dir.join("again");
    let (ok, _, err) = tuna(&["finetune", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--data", dir.join("data.jsonl").to_str().unwrap(),
                              "--out", again.to_str().unwrap(), "--max-steps", "1", "--lr", "0", "--eval-every", "0", "--checkpoint-every", "0", "--json", "--device", "cuda"]);
    assert!(ok, "finetune --adapter on cuda: {err}");
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(bytes(&again.join("adapter")) == bytes(&adapter), "the adapter trained further at a zero learning rate on cuda changed");
}

/// `tuna finetune` for 3 steps on the CPU and on `device` from the same model and data: LoRA
/// with dropout, and sparse fine-tuning with SM3 (its active set changed after step 2), each
/// with its final training loss within `rtol` of the CPU's. Returns the LoRA adapter trained on
/// `device`, in `base` (a folder for the runs' files).
fn finetune_follows_the_cpu(device: &str, m: &Path, base: &Path, rtol: f64) -> PathBuf {
    let data = write_counting(base, 16, 2);
    let methods: [(&str, &[&str], &str); 2] = [
        ("lora", &["--lora-dropout", "0.1"], "adapter/adapter_model.safetensors"),
        ("sparse", &["--method", "sparse", "--optimizer", "sm3", "--density", "0.05", "--reselect-every", "2"], "sparse/sparse_deltas.safetensors"),
    ];
    for (tag, extra, written) in methods {
        let run = |device: &str| -> serde_json::Value {
            let out = base.join(format!("{tag}-{device}"));
            let mut args = vec!["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
                "--max-steps", "3", "--lr", "1e-2", "--eval-every", "0", "--checkpoint-every", "0", "--cpu-shards", "1", "--json", "--device", device];
            args.extend_from_slice(extra);
            let (ok, stdout, err) = tuna(&args);
            assert!(ok, "{tag} on {device}: {err}");
            assert!(out.join(written).exists(), "{tag} on {device}: no {written}");
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
        };
        let (cpu, gpu) = (run("cpu"), run(device));
        let (a, b) = (cpu["final_train_loss"].as_f64().unwrap(), gpu["final_train_loss"].as_f64().unwrap());
        assert!((a - b).abs() <= rtol * a.abs().max(1.0), "{tag}: final train loss: cpu {a} vs {device} {b}");
    }
    base.join(format!("lora-{device}/adapter"))
}

#[test]
fn finetune_in_f16_on_wgpu_follows_the_cpu() {
    // The model in f16 (f32 adapters, dynamic loss scaling) against the CPU in f32 on the same
    // data: the final loss within f16's rounding of the weights and activations.
    let Some(dev) = common::devices().into_iter().find(|&d| common::has_f16(d)) else { return };
    let m = fixture();
    let (base, data) = counting_data("ft-f16");
    let run = |device: &str, f16: bool| -> serde_json::Value {
        let out = base.join(format!("{device}-{f16}"));
        let mut args = vec!["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(),
            "--max-steps", "3", "--lr", "1e-2", "--lora-dropout", "0.1", "--eval-every", "0", "--checkpoint-every", "0", "--cpu-shards", "1", "--json", "--device", device];
        if f16 {
            args.push("--f16");
        }
        let (ok, stdout, err) = tuna(&args);
        assert!(ok, "{device} f16 {f16}: {err}");
        assert!(out.join("adapter/adapter_model.safetensors").exists());
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let (cpu, half) = (run("cpu", false), run(&dev.to_string(), true));
    let (a, b) = (cpu["final_train_loss"].as_f64().unwrap(), half["final_train_loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-2 * a.abs().max(1.0), "final train loss: cpu {a} vs {dev} in f16 {b}");
    let (ok, _, err) = tuna(&["finetune", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", base.join("x").to_str().unwrap(), "--max-steps", "1", "--f16", "--device", "cpu"]);
    assert!(!ok && err.contains("f16"), "f16 on the cpu is refused, naming the flag: {err}");
}

#[test]
fn bench_step_reports_tokens_per_second_on_every_device() {
    for dev in common::devices() {
        let d = dev.to_string();
        let (ok, out, err) = tuna(&["bench-step", "--device", &d, "--batch", "1", "--seq", "8", "--steps", "2", "--warmup", "0", "--rank", "4"]);
        assert!(ok, "bench-step on {d}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["step_seconds"].as_array().unwrap().len(), 2, "{v}");
        assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!((v["device"].as_str().unwrap(), v["rank"].as_u64().unwrap(), v["seq"].as_u64().unwrap()), (d.as_str(), 4, 8));
        if let tuna::Device::Wgpu(_) = dev {
            let live = v["device_memory"]["peak_live_bytes"].as_u64().unwrap();
            // At least the model's f32 weights (33.7M parameters) were in use at once.
            assert!(live >= 4 * 33_000_000 && v["device_memory"]["peak_held_bytes"].as_u64().unwrap() >= live, "{v}");
            // The bytes in use between steps (weights, adapters, optimizer state) are under the
            // steps' peak, which adds their activations.
            let between = v["device_memory"]["live_bytes_between_steps"].as_u64().unwrap();
            assert!(between >= 4 * 33_000_000 && between < live, "{v}");
        }
        if let tuna::Device::Cuda(ordinal) = dev {
            // The allocation pool's peak holds at least the bf16 weights; what stays in use
            // after the steps is under it.
            let (peak, now) = (v["device_memory"]["peak_live_bytes"].as_u64().unwrap(), v["device_memory"]["live_bytes"].as_u64().unwrap());
            assert!(peak >= 2 * 33_000_000 && now <= peak, "{v}");
            // --profile adds a step with each kernel's time: the GEMM and attention among them.
            // 32 tokens, so that the attention forward is the tiled (or Hopper's) kernel: at 16
            // rows per key/value head or fewer it is the split-KV one.
            let (ok, out, err) = tuna(&["bench-step", "--device", &d, "--batch", "1", "--seq", "32", "--steps", "1", "--warmup", "0", "--rank", "4", "--profile"]);
            assert!(ok, "bench-step --profile on {d}: {err}");
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            let names: Vec<&str> = v["kernel_profile"]["kernels"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
            assert!(names.iter().any(|n| n.starts_with("lora_gemm::")) && names.iter().any(|n| n.starts_with("flash_attention::")), "{names:?}");
            // On an H100/H200 (or the emulator as one), the attention (head dim 64) runs on
            // Hopper's kernels, forward and backward, unless that path is off; with the path
            // forced (TUNA_SM90=force), the dense GEMMs do too.
            use tuna::device::cuda::hopper::{self, Mode, Part};
            if tuna::device::cuda::runtime(ordinal).unwrap().modules.compute_capability() == 90 {
                let ran = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
                if hopper::mode_for(Part::Attention) != Mode::Off {
                    assert!(ran("flash_attention_sm90::flash_attn_fwd_sm90_"), "{names:?}");
                }
                if hopper::mode_for(Part::AttentionBackward) != Mode::Off {
                    assert!(ran("flash_attention_sm90::flash_attn_bwd_sm90_"), "{names:?}");
                }
                if hopper::mode_for(Part::Gemm) == Mode::Force {
                    assert!(ran("gemm_sm90::gemm_sm90_"), "{names:?}");
                }
            }
        }
        let (ok, out, err) = tuna(&["bench-step", "--device", &d, "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0", "--rank", "4", "--qlora"]);
        assert!(ok, "bench-step --qlora on {d}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["method"], "qlora", "{v}");
        assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0, "{v}");
    }
    let (ok, _, err) = tuna(&["bench-step", "--device", "tpu"]);
    assert!(!ok && err.contains("tpu"), "an unknown device is named: {err}");
    let (ok, _, err) = tuna(&["bench-step", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "0", "--rank", "4", "--profile"]);
    assert!(!ok && err.contains("--profile") && err.contains("cuda"), "--profile names what it needs: {err}");
}

#[test]
fn check_runs_the_kernels_and_the_model_on_each_gpu() {
    for dev in common::devices().into_iter().filter(|d| *d != tuna::Device::Cpu) {
        let (ok, out, err) = tuna(&["check", "--device", &dev.to_string()]);
        assert!(ok, "check on {dev}: {err}\n{out}");
        assert!(out.contains("RMSNorm") && out.contains("loss within") && out.contains("gradients within"), "{out}");
    }
}
