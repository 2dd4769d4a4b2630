//! The `tuna` binary end to end on the fixture model: JSON results agree with the library,
//! and bad input fails with a message naming the file and line. (`finetune`: cli_finetune.rs.)

mod cli_support;
mod common;

use std::path::Path;

use cli_support::{counting_data, fixture, mean_loss, tuna};
use common::Scratch;

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
