//! LoRA against PEFT: adapters written by PEFT load and give PEFT's logits, loss and
//! gradients; one AdamW step lands on torch's parameters; our adapter files round-trip.
//! Fixtures: tools/fixtures/make_peft_fixtures.py.

mod common;

use std::path::{Path, PathBuf};

use tuna::io::safetensors::WeightFiles;
use tuna::nn::Llama;
use tuna::optim::{AdamW, AdamWConfig};
use tuna::peft::{load_adapter, save_adapter};
use tuna::testing::{compare, Tolerance};
use tuna::{Device, Tape, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures").join(name)
}

fn expected(name: &str) -> WeightFiles {
    WeightFiles::from_paths(&[fixture(name).join("expected.safetensors")]).unwrap()
}

fn f64s(w: &WeightFiles, name: &str) -> Vec<f64> {
    w.load_raw(name, &Device::Cpu).unwrap().to_vec_f32().unwrap().into_iter().map(f64::from).collect()
}

fn with_adapter(adapter: &str) -> Llama {
    let mut m = Llama::load(&fixture("llama-gqa")).unwrap();
    load_adapter(&mut m, &fixture(adapter)).unwrap();
    m
}

const LOGITS: Tolerance = Tolerance { atol: 1e-4, rtol: 0.0 };

#[test]
fn peft_adapter_logits_and_loss() {
    for name in ["peft-lora", "peft-lora-rslora", "peft-lora-pattern"] {
        let exp = expected(name);
        let ids = exp.load_raw("input_ids", &Device::Cpu).unwrap();
        // On every device present: on wgpu the fused LoRA GEMM runs the adapters.
        for dev in common::f32_model_devices() {
            let model = with_adapter(name).to_device(&dev).unwrap();
            let logits = model.forward(&ids, None).unwrap();
            compare(&format!("{name} logits on {dev}"), &logits.to_vec_f32().unwrap(), &f64s(&exp, "logits"), LOGITS).unwrap();
            let loss = model.loss(&ids, None).unwrap().to_scalar().unwrap() as f64;
            assert!((loss - f64s(&exp, "loss")[0]).abs() < 1e-5, "{name} on {dev}: loss {loss}");
        }
    }
}

#[test]
fn masked_loss_averages_over_the_kept_targets() {
    let model = with_adapter("peft-lora");
    let exp = expected("peft-lora");
    let ids = exp.load_raw("input_ids", &Device::Cpu).unwrap();
    let labels = exp.load_raw("labels_masked", &Device::Cpu).unwrap().to_vec::<i32>().unwrap();
    let mask: Vec<bool> = labels.iter().map(|&l| l != -100).collect();
    let loss = model.loss(&ids, Some(&mask)).unwrap().to_scalar().unwrap() as f64;
    assert!((loss - f64s(&exp, "loss_masked")[0]).abs() < 1e-5, "masked loss {loss}");
}

#[test]
fn lora_gradients_and_one_adamw_step_match_peft() {
    // On every device: on wgpu the fused LoRA GEMM's backward gives dA and dB.
    for dev in common::f32_model_devices() {
        lora_gradients_and_one_adamw_step(with_adapter("peft-lora").to_device(&dev).unwrap());
    }
}

fn lora_gradients_and_one_adamw_step(mut model: Llama) {
    let dev = model.device();
    let exp = expected("peft-lora");
    let tape = Tape::new();
    model.map_lora(|_, t| Ok(tape.param(t))).unwrap();
    let ids = exp.load_raw("input_ids", &Device::Cpu).unwrap();
    let loss = model.loss(&ids, None).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let params = model.lora_parameters();
    assert_eq!(params.len(), 28);
    let mut masters = Vec::new();
    let mut gvecs = Vec::new();
    for (key, p) in &params {
        let g = grads.get(p).unwrap_or_else(|| panic!("no gradient for {key}")).to_vec_f32().unwrap();
        compare(&format!("grad {key} on {dev}"), &g, &f64s(&exp, &format!("grad.{key}")), Tolerance { atol: 1e-6, rtol: 1e-4 }).unwrap();
        masters.push(p.to_vec_f32().unwrap());
        gvecs.push(g);
    }
    let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 });
    opt.step(&mut masters, &gvecs, 1e-2).unwrap();
    for ((key, _), after) in params.iter().zip(&masters) {
        compare(&format!("after {key}"), after, &f64s(&exp, &format!("after.{key}")), Tolerance { atol: 1e-6, rtol: 1e-4 }).unwrap();
    }
}

#[test]
fn saved_adapter_round_trips_and_merges() {
    let model = with_adapter("peft-lora");
    let dir = common::Scratch::new("adapter");
    let cfg = tuna::peft::LoraConfig { r: 4, alpha: 8.0, ..Default::default() };
    save_adapter(&model, &cfg, "tools/fixtures/llama-gqa", &dir).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 4);
    let saved = WeightFiles::from_paths(&[dir.join("adapter_model.safetensors")]).unwrap();
    assert!(saved.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert_eq!(saved.load_raw("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", &Device::Cpu).unwrap().dims(), [32, 4]);
    let reloaded = with_adapter_dir(&dir);
    let ids = Tensor::from_vec_i32(vec![3, 77, 12, 250, 9], [1, 5]).unwrap();
    let a = model.forward(&ids, None).unwrap().to_vec_f32().unwrap();
    assert_eq!(a, reloaded.forward(&ids, None).unwrap().to_vec_f32().unwrap());
    let mut merged = model.clone();
    merged.merge_lora().unwrap();
    assert!(merged.lora_parameters().is_empty());
    compare("merged logits", &merged.forward(&ids, None).unwrap().to_vec_f32().unwrap(), &a.iter().map(|&v| v as f64).collect::<Vec<_>>(), Tolerance { atol: 1e-5, rtol: 1e-5 }).unwrap();
}

fn with_adapter_dir(dir: &Path) -> Llama {
    let mut m = Llama::load(&fixture("llama-gqa")).unwrap();
    load_adapter(&mut m, dir).unwrap();
    m
}

/// PEFT configs this crate cannot apply as written are refused, naming the file (and the
/// field, or the tensor): whole modules saved beside the pairs, trained biases or token rows
/// (all would be left out), DoRA, other PEFT types, rank patterns that are regular expressions
/// or that name a module twice, or that disagree with the tensors. The fixture's own config,
/// with empty patterns and lists, loads, and so does an alpha pattern.
#[test]
fn adapter_configs_that_cannot_apply_are_refused() {
    let dir = common::Scratch::new("peft-config");
    std::fs::copy(fixture("peft-lora").join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("peft-lora").join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((&original["alpha_pattern"], &original["rank_pattern"]), (&serde_json::json!({}), &serde_json::json!({})));
    let load_with = |field: &str, value: serde_json::Value| {
        let mut cfg = original.clone();
        cfg[field] = value;
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let mut m = Llama::load(&fixture("llama-gqa")).unwrap();
        load_adapter(&mut m, &dir).map(|_| ()).map_err(|e| e.to_string())
    };
    load_with("alpha_pattern", serde_json::json!({"q_proj": 16})).unwrap();
    load_with("modules_to_save", serde_json::json!([])).unwrap();
    load_with("bias", serde_json::json!("none")).unwrap();
    for (field, value, says) in [
        // The fixture's tensors are rank 4: a pattern that says 8 meets a tensor of rank 4.
        ("rank_pattern", serde_json::json!({"v_proj": 8}), "expected [8, 32]"),
        ("rank_pattern", serde_json::json!({".*v_proj": 4}), "not regular expressions"),
        ("alpha_pattern", serde_json::json!({"v_proj": 2, "self_attn.v_proj": 3}), "both name"),
        ("modules_to_save", serde_json::json!(["lm_head"]), "whole modules"),
        ("bias", serde_json::json!("lora_only"), "`lora_only`"),
        ("trainable_token_indices", serde_json::json!([5, 6]), "token rows"),
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("peft_type", serde_json::json!("IA3"), "`IA3` is not supported"),
    ] {
        let e = load_with(field, value).expect_err(field);
        assert!((e.contains("adapter_config.json") || e.contains("adapter_model.safetensors")) && e.contains(says), "{field}: {e}");
    }
}

/// Per-module ranks and alphas round-trip: PEFT's patterned adapter, written again by
/// `save_adapter`, keeps its patterns and ranks and gives the same logits; fresh adapters from a
/// patterned config take each module's rank and scale, and train further under that config.
#[test]
fn rank_and_alpha_patterns_round_trip() {
    let m = with_adapter("peft-lora-pattern");
    let rank = |m: &Llama, path: &str| m.linears().into_iter().find(|(p, _)| p == path).unwrap().1.lora.as_ref().unwrap().a.dims()[0];
    let scale = |m: &Llama, path: &str| m.linears().into_iter().find(|(p, _)| p == path).unwrap().1.lora.as_ref().unwrap().scale;
    assert_eq!((rank(&m, "model.layers.0.self_attn.v_proj"), rank(&m, "model.layers.1.mlp.down_proj"), rank(&m, "model.layers.0.mlp.down_proj")), (2, 6, 4));
    assert_eq!((scale(&m, "model.layers.1.self_attn.o_proj"), scale(&m, "model.layers.0.self_attn.v_proj")), (0.75, 4.0));
    let mut base = Llama::load(&fixture("llama-gqa")).unwrap();
    let cfg = load_adapter(&mut base, &fixture("peft-lora-pattern")).unwrap();
    let dir = common::Scratch::new("peft-pattern");
    save_adapter(&m, &cfg, "tools/fixtures/llama-gqa", &dir).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((json["rank_pattern"].clone(), json["alpha_pattern"].clone()), (serde_json::json!({"v_proj": 2, "model.layers.1.mlp.down_proj": 6}), serde_json::json!({"o_proj": 3.0})));
    let again = with_adapter_dir(&dir);
    let ids = Tensor::from_vec_i32(vec![3, 77, 12, 250, 9], [1, 5]).unwrap();
    assert_eq!(m.forward(&ids, None).unwrap().to_vec_f32().unwrap(), again.forward(&ids, None).unwrap().to_vec_f32().unwrap());
    let mut fresh = Llama::load(&fixture("llama-gqa")).unwrap();
    fresh.add_lora(&cfg, 3).unwrap();
    assert_eq!((rank(&fresh, "model.layers.1.self_attn.v_proj"), rank(&fresh, "model.layers.1.mlp.down_proj"), scale(&fresh, "model.layers.0.self_attn.o_proj")), (2, 6, 0.75));
    let mut kept = again.clone();
    assert!(kept.lora_to_train(&cfg, 0).unwrap(), "the patterned adapter is the config's");
}

#[test]
fn fresh_lora_starts_at_the_base_model() {
    let base = Llama::load(&fixture("llama-gqa")).unwrap();
    let mut lora = base.clone();
    lora.add_lora(&tuna::peft::LoraConfig::default(), 1).unwrap();
    assert_eq!(lora.lora_parameters().len(), 2 * 7 * 2);
    let ids = Tensor::from_vec_i32(vec![3, 77, 12], [1, 3]).unwrap();
    // B starts at zero, so the adapted model computes exactly the base model.
    assert_eq!(base.forward(&ids, None).unwrap().to_vec_f32().unwrap(), lora.forward(&ids, None).unwrap().to_vec_f32().unwrap());
    // A is uniform in ±1/sqrt(in).
    let a = lora.lora_parameters()[0].1.to_vec_f32().unwrap();
    let bound = 1.0 / (32f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > 0.5 * bound));
}

#[test]
fn lora_dropout_on_every_device_gives_the_cpus_gradients() {
    // The mask comes from the counter-based generator (rng::uniform_at) on every device, so a
    // dropout step on wgpu has the CPU's loss and gradients (a different mask would not).
    let run = |dev: Device| -> (f32, Vec<Vec<f32>>) {
        let mut model = with_adapter("peft-lora").to_device(&dev).unwrap();
        for (_, lin) in model.linears_mut() {
            if let Some(l) = &mut lin.lora {
                l.dropout = 0.3;
            }
        }
        model.dropout_seed = Some(11);
        let tape = Tape::new();
        model.map_lora(|_, t| Ok(tape.param(t))).unwrap();
        let ids = expected("peft-lora").load_raw("input_ids", &Device::Cpu).unwrap();
        let loss = model.loss(&ids, None).unwrap();
        let grads = tape.backward(&loss).unwrap();
        let g = model.lora_parameters().iter().map(|(_, p)| grads.get(p).unwrap().to_vec_f32().unwrap()).collect();
        (loss.to_scalar().unwrap(), g)
    };
    let (cpu_loss, cpu_grads) = run(Device::Cpu);
    let (plain_loss, _) = {
        let model = with_adapter("peft-lora");
        (model.loss(&expected("peft-lora").load_raw("input_ids", &Device::Cpu).unwrap(), None).unwrap().to_scalar().unwrap(), ())
    };
    assert!((cpu_loss - plain_loss).abs() > 1e-6, "dropout 0.3 changes the loss ({cpu_loss} vs {plain_loss})");
    for dev in common::f32_model_devices().into_iter().filter(|d| *d != Device::Cpu) {
        let (loss, grads) = run(dev);
        assert!((loss - cpu_loss).abs() <= 1e-5 * cpu_loss.abs().max(1.0), "loss on {dev}: {loss} vs cpu {cpu_loss}");
        for (i, (g, c)) in grads.iter().zip(&cpu_grads).enumerate() {
            let want: Vec<f64> = c.iter().map(|&v| v as f64).collect();
            // f32 sums in another order (~1e-4 relative at worst here); another mask would move
            // gradients by tens of percent.
            compare(&format!("dropout grad {i} on {dev}"), g, &want, Tolerance { atol: 1e-5, rtol: 1e-3 }).unwrap();
        }
    }
}
