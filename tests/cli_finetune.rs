//! `tuna finetune` end to end on the fixture model: interruption and exact resume, adapters
//! trained further, eval files, the best result kept, sparse and full runs, and the GPUs
//! following the CPU.

mod cli_support;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cli_support::{counting_data, fixture, mean_loss, tuna, write_counting};
use common::Scratch;

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
