//! The Llama-family model against transformers: fixtures made by tools/fixtures/make_fixtures.py
//! (tiny random checkpoints, their logits, loss, greedy tokens and gradients).

mod common;

use std::path::{Path, PathBuf};

use tuna::io::safetensors::WeightFiles;
use tuna::io::tokenizer::{Message, Tokenizer};
use tuna::nn::{GenerateOptions, KvCache, Llama};
use tuna::testing::{compare, Tolerance};
use tuna::{Device, Tape, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures").join(name)
}

struct Expected {
    files: WeightFiles,
}

impl Expected {
    fn load(name: &str) -> Self {
        Expected { files: WeightFiles::from_paths(&[fixture(name).join("expected.safetensors")]).unwrap() }
    }
    fn tensor(&self, name: &str) -> Tensor {
        self.files.load_raw(name, &Device::Cpu).unwrap()
    }
    fn f64(&self, name: &str) -> Vec<f64> {
        self.tensor(name).to_vec_f32().unwrap().into_iter().map(f64::from).collect()
    }
    fn ids(&self, name: &str) -> Vec<i32> {
        self.tensor(name).to_vec::<i32>().unwrap()
    }
}

/// transformers' f32 logits: the same math in another order of summation, so agreement to
/// ~1e-5 absolute on logits of magnitude ~5; the bar is 1e-4.
const LOGITS: Tolerance = Tolerance { atol: 1e-4, rtol: 0.0 };

/// On every device present (the model's forward runs on wgpu too).
fn check_logits_and_loss(name: &str) {
    let cpu_model = Llama::load(&fixture(name)).unwrap();
    let exp = Expected::load(name);
    let ids = exp.tensor("input_ids");
    for dev in common::f32_model_devices() {
        let model = cpu_model.to_device(&dev).unwrap();
        let logits = model.forward(&ids, None).unwrap();
        assert_eq!(logits.device(), dev);
        compare(&format!("{name} logits on {dev}"), &logits.to_vec_f32().unwrap(), &exp.f64("logits"), LOGITS).unwrap();
        let loss = model.loss(&ids, None).unwrap().to_scalar().unwrap();
        let want = exp.f64("loss")[0];
        assert!((loss as f64 - want).abs() <= 1e-5, "{name} loss on {dev}: {loss} vs transformers {want}");
    }
}

#[test]
fn llama_gqa_untied_matches_transformers() {
    check_logits_and_loss("llama-gqa");
}

#[test]
fn qwen2_biases_tied_matches_transformers() {
    check_logits_and_loss("qwen2-tied");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_logits_and_loss("llama3-rope");
}

/// YaRN: frequencies kept, blended and interpolated along the head dim, and the attention
/// factor transformers puts on cos and sin (here on the scores), through the KV cache too.
#[test]
fn yarn_rope_scaling_matches_transformers() {
    check_logits_and_loss("yarn-rope");
    let model = Llama::load(&fixture("yarn-rope")).unwrap();
    // transformers' inv_freq for this config (printed by make_fixtures.py): 1, 0.1 blended
    // halfway with 0.1 / 4, then 0.01 / 4 and 0.001 / 4.
    assert_eq!(model.config.inv_freq(), [1.0, 0.0625, 0.0025, 0.00025]);
    let plain = tuna::io::config::LlamaConfig { rope_scaling: None, ..model.config.clone() };
    let m = 0.1f32 * 4f32.ln() + 1.0;
    assert!((model.config.attention_scale() / plain.attention_scale() - m * m).abs() < 1e-6);
    // Written back as transformers reads it, and read again as the same config.
    for name in ["yarn-rope", "linear-rope"] {
        let c = Llama::load(&fixture(name)).unwrap().config;
        assert_eq!(tuna::io::config::LlamaConfig::from_value(&c.to_hf_json(), Path::new("config.json")).unwrap(), c, "{name}");
    }
}

#[test]
fn linear_rope_scaling_matches_transformers() {
    check_logits_and_loss("linear-rope");
}

#[test]
fn mistral_matches_transformers() {
    check_logits_and_loss("mistral");
}

/// A sliding window shorter than the sequence: its edge as transformers draws it, through the
/// KV cache and greedy decoding too (below).
#[test]
fn mistral_sliding_window_matches_transformers() {
    check_logits_and_loss("mistral-window");
}

/// Granite's four scalars (embeddings, block outputs, softmax scale, logits), each away from 1.
#[test]
fn granite_multipliers_match_transformers() {
    check_logits_and_loss("granite");
    let c = Llama::load(&fixture("granite")).unwrap().config;
    assert_eq!((c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logits_scaling), (2.0, 0.5, Some(0.3), 0.5));
    assert_eq!(tuna::io::config::LlamaConfig::from_value(&c.to_hf_json(), Path::new("config.json")).unwrap(), c);
}

#[test]
fn qwen3_qk_norms_match_transformers() {
    check_logits_and_loss("qwen3");
}

/// SmolLM3's NoPE layer (the middle of three) rotates nothing; the model still matches
/// transformers, and so must not match itself with that layer rotating (the flag is read).
#[test]
fn smollm3_nope_layers_match_transformers() {
    check_logits_and_loss("smollm3");
    let model = Llama::load(&fixture("smollm3")).unwrap();
    assert_eq!((model.config.nope_layers.as_slice(), model.layers.iter().map(|l| l.rope).collect::<Vec<_>>()), (&[1][..], vec![true, false, true]));
    let mut rotating = model.clone();
    rotating.layers[1].rope = true;
    let ids = Expected::load("smollm3").tensor("input_ids");
    let (a, b) = (model.forward(&ids, None).unwrap().to_vec_f32().unwrap(), rotating.forward(&ids, None).unwrap().to_vec_f32().unwrap());
    let far = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(far > 1e-3, "rotating the NoPE layer changed the logits by only {far}");
    // Written back as transformers reads it: the per-layer flags survive a save and load.
    let dir = common::Scratch::new("smollm3-save");
    model.save(&fixture("smollm3"), &dir).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["no_rope_layers"], serde_json::json!([1, 0, 1]));
    let built = tuna::io::config::LlamaConfig { nope_layers: vec![1], ..tuna::io::config::LlamaConfig::llama(320, 32, 64, 3, 4, 2) };
    let json = built.to_hf_json();
    assert_eq!(json["no_rope_layers"], serde_json::Value::Null, "a Llama config names no NoPE layers");
    let smol = tuna::io::config::LlamaConfig { arch: tuna::io::config::Arch::SmolLM3, ..built };
    let back = tuna::io::config::LlamaConfig::from_value(&smol.to_hf_json(), Path::new("config.json")).unwrap();
    assert_eq!(back.nope_layers, vec![1]);
}

/// Gemma 3: GeGLU, `1 + w` norms before and after both blocks, embeddings times sqrt(E), two
/// windowed layers on their own RoPE base around a global one with linear scaling, the softmax
/// scale from `query_pre_attn_scalar`; each away from its default in the fixture, so dropping
/// any of them misses transformers' logits.
#[test]
fn gemma3_matches_transformers() {
    check_logits_and_loss("gemma3");
    let model = Llama::load(&fixture("gemma3")).unwrap();
    let c = &model.config;
    assert_eq!((c.global_layers.as_slice(), c.sliding_window, c.local_rope_theta, c.hidden_act, c.norm_weight_offset), (&[1][..], Some(5), Some(1e4), tuna::ops::GluAct::GeluTanh, 1.0));
    assert_eq!(model.layers.iter().map(|l| l.windowed).collect::<Vec<_>>(), [true, false, true]);
    assert_eq!(tuna::io::config::LlamaConfig::from_value(&c.to_hf_json(), Path::new("config.json")).unwrap(), *c);
    // Written as transformers stores it: the norms' w, not the 1 + w the model holds (to f32
    // rounding: 1 + w rounds w's last bit away for w below 1), and transformers' names.
    let dir = common::Scratch::new("gemma3-save");
    model.save(&fixture("gemma3"), &dir).unwrap();
    let (theirs, ours) = (WeightFiles::open(&fixture("gemma3")).unwrap(), WeightFiles::open(&dir).unwrap());
    let mut names = ours.names();
    names.sort();
    let mut want = theirs.names();
    want.sort();
    assert_eq!(names, want);
    for name in names.iter().filter(|n| n.ends_with("norm.weight")) {
        let w = theirs.load_raw(name, &Device::Cpu).unwrap().to_vec_f32().unwrap();
        let got = ours.load_raw(name, &Device::Cpu).unwrap().to_vec_f32().unwrap();
        compare(&format!("saved {name}"), &got, &w.iter().map(|&x| x as f64).collect::<Vec<_>>(), Tolerance { atol: 2.5e-7, rtol: 0.0 }).unwrap();
    }
    let back = Llama::load(&dir).unwrap();
    let ids = Expected::load("gemma3").tensor("input_ids");
    let (a, b) = (model.forward(&ids, None).unwrap().to_vec_f32().unwrap(), back.forward(&ids, None).unwrap().to_vec_f32().unwrap());
    compare("gemma3 reloaded logits", &b, &a.iter().map(|&x| x as f64).collect::<Vec<_>>(), Tolerance { atol: 1e-5, rtol: 0.0 }).unwrap();
}

/// Gemma (the first): GeGLU, `1 + w` norms, embeddings times sqrt(E), a tied head.
#[test]
fn gemma_matches_transformers() {
    check_logits_and_loss("gemma");
    let c = Llama::load(&fixture("gemma")).unwrap().config;
    assert_eq!((c.arch, c.hidden_act, c.norm_weight_offset, c.embedding_multiplier, c.qk_norm, c.sandwich_norms), (tuna::io::config::Arch::Gemma, tuna::ops::GluAct::GeluTanh, 1.0, 32f32.sqrt(), false, false));
    assert_eq!(tuna::io::config::LlamaConfig::from_value(&c.to_hf_json(), Path::new("config.json")).unwrap(), c);
}

#[test]
fn bf16_checkpoint_matches_its_f32_twin() {
    // Exactly transformers' result for the bf16 weights upcast to f32 ...
    check_logits_and_loss("llama-gqa-bf16");
    // ... and within bf16 rounding of the f32 twin's logits.
    let model = Llama::load(&fixture("llama-gqa-bf16")).unwrap();
    let twin = Expected::load("llama-gqa");
    let logits = model.forward(&twin.tensor("input_ids"), None).unwrap();
    compare("bf16 vs f32 logits", &logits.to_vec_f32().unwrap(), &twin.f64("logits"), Tolerance { atol: 0.1, rtol: 0.05 }).unwrap();
}

/// A model's logits and, with a tape over its LoRA factors, their gradients.
fn logits_and_lora_grads(mut model: Llama, ids: &Tensor) -> (Vec<f32>, Vec<Vec<f32>>) {
    let logits = model.forward(ids, None).unwrap().to_vec_f32().unwrap();
    let tape = Tape::new();
    model.map_lora(|_, t| Ok(tape.param(t))).unwrap();
    let grads = tape.backward(&model.loss(ids, None).unwrap()).unwrap();
    (logits, model.lora_parameters().iter().map(|(k, p)| grads.get(p).unwrap_or_else(|| panic!("no gradient for {k}")).to_vec_f32().unwrap()).collect())
}

#[test]
fn matrices_kept_in_bf16_compute_what_their_f32_values_do() {
    // The bf16 checkpoint with its matrices kept in bf16 (`load_bf16`) against the same
    // checkpoint widened to f32 (`load`, whose logits equal transformers' above).
    let dir = fixture("llama-gqa-bf16");
    let (wide, narrow) = (Llama::load(&dir).unwrap(), Llama::load_bf16(&dir).unwrap());
    for (name, lin) in narrow.linears() {
        assert_eq!(lin.weight.dtype(), tuna::DType::BF16, "{name}");
    }
    assert_eq!((narrow.embed.dtype(), narrow.lm_head.as_ref().map(|h| h.dtype())), (tuna::DType::BF16, Some(tuna::DType::BF16)));
    assert_eq!(narrow.norm.dtype(), tuna::DType::F32);
    // A whole sequence (its products by blocks of W: within f32 rounding), and token by token
    // through the KV cache (one row: the bf16 gemv, the same logits to the bit).
    let ids: Vec<i32> = Expected::load("llama-gqa-bf16").ids("input_ids")[..10].to_vec();
    let row = Tensor::from_vec_i32(ids.clone(), [1, ids.len()]).unwrap();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let whole = wide.forward(&row, None).unwrap().to_vec_f32().unwrap();
    compare("whole sequence on bf16 matrices", &narrow.forward(&row, None).unwrap().to_vec_f32().unwrap(), &f64s(&whole), Tolerance { atol: 1e-5, rtol: 1e-5 }).unwrap();
    let (mut cw, mut cn) = (KvCache::new(wide.config.num_layers), KvCache::new(narrow.config.num_layers));
    for &t in &ids {
        let t = Tensor::from_vec_i32(vec![t], [1, 1]).unwrap();
        let (a, b) = (wide.forward(&t, Some(&mut cw)).unwrap().to_vec_f32().unwrap(), narrow.forward(&t, Some(&mut cn)).unwrap().to_vec_f32().unwrap());
        assert_eq!(bits(b), bits(a), "decoding");
    }
    // LoRA on top trains through the bf16 weights: the same logits and adapter gradients
    // within f32 rounding (training keeps f32 weights' transposes, another GEMM layout).
    let adapt = |mut m: Llama| {
        tuna::peft::load_adapter(&mut m, &fixture("peft-lora")).unwrap();
        m
    };
    let (want, want_grads) = logits_and_lora_grads(adapt(wide.clone()), &row);
    let (got, got_grads) = logits_and_lora_grads(adapt(narrow.clone()), &row);
    compare("LoRA logits on bf16 linears", &got, &f64s(&want), Tolerance { atol: 1e-5, rtol: 1e-5 }).unwrap();
    assert_eq!(got_grads.len(), 28);
    for (i, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
        compare(&format!("LoRA gradient {i} on bf16 linears"), g, &f64s(w), Tolerance { atol: 1e-6, rtol: 1e-4 }).unwrap();
    }
    // An f32 model's linears rounded after the load are the model `load_bf16` reads.
    let mut rounded = Llama::load(&fixture("llama-gqa")).unwrap();
    let bytes = rounded.matrices_in_bf16().unwrap();
    let direct = Llama::load_bf16(&fixture("llama-gqa")).unwrap();
    let matrices = rounded.linears().iter().map(|(_, l)| l.weight.elem_count()).sum::<usize>() + rounded.embed.elem_count() + rounded.lm_head.as_ref().map_or(0, |h| h.elem_count());
    assert_eq!(bytes, 2 * matrices);
    assert_eq!(rounded.embed.to_vec_f32().unwrap(), direct.embed.to_vec_f32().unwrap());
    for ((name, a), (_, b)) in rounded.linears().iter().zip(direct.linears()) {
        assert_eq!(a.weight.to_vec_f32().unwrap(), b.weight.to_vec_f32().unwrap(), "{name}");
    }
    // A tied head with biases (the embedding table is the head): greedy decoding picks the
    // tokens the same rounded weights pick in f32, each step's logits the same to the bit.
    let narrow = Llama::load_bf16(&fixture("qwen2-tied")).unwrap();
    let mut twin = narrow.clone();
    twin.embed = twin.embed.to_dtype(tuna::DType::F32).unwrap();
    for (_, lin) in twin.linears_mut() {
        lin.weight = lin.weight.to_dtype(tuna::DType::F32).unwrap();
    }
    assert!(narrow.lm_head.is_none() && narrow.embed.dtype() == tuna::DType::BF16);
    let opts = GenerateOptions { max_new_tokens: 6, ..Default::default() };
    assert_eq!(narrow.generate(&[5, 17, 3], &opts, |_| {}).unwrap(), twin.generate(&[5, 17, 3], &opts, |_| {}).unwrap());
    let (mut cn, mut ct) = (KvCache::new(narrow.config.num_layers), KvCache::new(twin.config.num_layers));
    for &t in &ids {
        let t = Tensor::from_vec_i32(vec![t], [1, 1]).unwrap();
        assert_eq!(bits(narrow.forward(&t, Some(&mut cn)).unwrap().to_vec_f32().unwrap()), bits(twin.forward(&t, Some(&mut ct)).unwrap().to_vec_f32().unwrap()), "tied head");
    }
    // Only on the CPU: refused on another device, and a bf16-matrices model is not moved to
    // wgpu (which has no bf16 kernels).
    if let Some(dev) = common::devices().into_iter().find(|d| *d != Device::Cpu) {
        let err = common::model_on(&wide, &dev).matrices_in_bf16().unwrap_err().to_string();
        assert!(err.contains("CPU"), "{err}");
    }
    if let Some(dev) = common::devices().into_iter().find(|d| matches!(d, Device::Wgpu(_))) {
        let err = narrow.to_device(&dev).err().expect("a bf16-matrices model moved to wgpu").to_string();
        assert!(err.contains("`model.embed_tokens.weight` is bf16") && err.contains("CPU form"), "{err}");
    }
}

#[test]
fn greedy_generation_reproduces_transformers() {
    for name in ["llama-gqa", "qwen2-tied", "llama3-rope", "yarn-rope", "linear-rope", "mistral", "mistral-window", "qwen3", "smollm3", "granite", "gemma", "gemma3"] {
        let cpu_model = Llama::load(&fixture(name)).unwrap();
        let exp = Expected::load(name);
        let prompt: Vec<u32> = exp.ids("greedy_prompt").into_iter().map(|t| t as u32).collect();
        let want: Vec<u32> = exp.ids("greedy_tokens").into_iter().map(|t| t as u32).collect();
        let opts = GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
        for dev in common::f32_model_devices() {
            let model = cpu_model.to_device(&dev).unwrap();
            let mut streamed = Vec::new();
            let got = model.generate(&prompt, &opts, |t| streamed.push(t)).unwrap();
            assert_eq!(got, want, "{name} greedy tokens on {dev}");
            assert_eq!(streamed, want, "{name} streamed tokens on {dev}");
            // Stopping at an EOS: the host reads each pick a step behind (a GPU runs the next
            // step meanwhile), and the token after the EOS must be neither returned nor streamed.
            let eos = want[2];
            let stop = want.iter().position(|&t| t == eos).unwrap();
            let mut streamed = Vec::new();
            let got = model.generate(&prompt, &GenerateOptions { eos_token_ids: vec![eos], ..opts.clone() }, |t| streamed.push(t)).unwrap();
            assert_eq!(got, &want[..=stop], "{name} tokens up to the EOS {eos} on {dev}");
            assert_eq!(streamed, got, "{name} streamed tokens up to the EOS on {dev}");
        }
    }
}

/// A repetition penalty above and below 1 gives transformers' greedy tokens, on every f32
/// device (the pick moves to the host there); a penalty of 0 is refused.
#[test]
fn repetition_penalty_reproduces_transformers() {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("repetition").join("expected.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = json["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let cpu_model = Llama::load(&fixture("llama-gqa")).unwrap();
    for dev in common::f32_model_devices() {
        let model = cpu_model.to_device(&dev).unwrap();
        for case in json["cases"].as_array().unwrap() {
            let penalty = case["penalty"].as_f64().unwrap() as f32;
            let want: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
            let opts = GenerateOptions { max_new_tokens: want.len(), repetition_penalty: penalty, ..Default::default() };
            assert_eq!(model.generate(&prompt, &opts, |_| {}).unwrap(), want, "penalty {penalty} on {dev}");
        }
    }
    let e = cpu_model.generate(&prompt, &GenerateOptions { repetition_penalty: 0.0, ..Default::default() }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("repetition_penalty"), "{e}");
}

#[test]
fn kv_cache_gives_the_same_logits_as_a_full_forward() {
    for name in ["llama-gqa", "qwen3", "smollm3", "yarn-rope", "mistral-window", "granite", "gemma", "gemma3"] {
        for dev in common::f32_model_devices() {
            kv_cache_check(name, &Llama::load(&fixture(name)).unwrap().to_device(&dev).unwrap());
        }
    }
}

fn kv_cache_check(fixture_name: &str, model: &Llama) {
    let exp = Expected::load(fixture_name);
    let ids: Vec<i32> = exp.ids("input_ids")[..12].to_vec();
    let full = model.forward(&Tensor::from_vec_i32(ids.clone(), [1, 12]).unwrap(), None).unwrap().to_vec_f32().unwrap();
    let mut cache = KvCache::new(model.config.num_layers);
    let mut got = Vec::new();
    for chunk in [&ids[..5], &ids[5..6], &ids[6..12]] {
        let t = Tensor::from_vec_i32(chunk.to_vec(), [1, chunk.len()]).unwrap();
        got.extend(model.forward(&t, Some(&mut cache)).unwrap().to_vec_f32().unwrap());
    }
    assert_eq!(cache.len(), 12);
    compare(&format!("{fixture_name}: cached logits on {}", model.device()), &got, &full.iter().map(|&v| v as f64).collect::<Vec<_>>(), Tolerance { atol: 1e-5, rtol: 1e-5 }).unwrap();
}

#[test]
fn full_model_gradients_match_transformers() {
    // On every device: on wgpu every op's backward runs there. Qwen3's q/k norms: 4 more;
    // SmolLM3: three layers, a tied head. Granite: Llama's. Gemma: tied. Gemma 3: three layers
    // of six norms.
    for (name, count) in [("llama-gqa", 21), ("qwen3", 25), ("smollm3", 29), ("granite", 21), ("gemma", 20), ("gemma3", 41)] {
        for dev in common::f32_model_devices() {
            full_model_gradients(name, count, Llama::load(&fixture(name)).unwrap().to_device(&dev).unwrap());
        }
    }
}

fn full_model_gradients(fixture_name: &str, count: usize, mut model: Llama) {
    let dev = model.device();
    let exp = Expected::load(fixture_name);
    let tape = Tape::new();
    model.map_parameters(|_, t| Ok(tape.param(t))).unwrap();
    let loss = model.loss(&exp.tensor("input_ids"), None).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let params = model.parameters();
    assert_eq!(params.len(), count, "{fixture_name}");
    for (name, p) in &params {
        let g = grads.get(p).unwrap_or_else(|| panic!("no gradient for {name} on {dev}"));
        assert_eq!(g.device(), dev, "{name}");
        let want = exp.f64(&format!("grad.{name}"));
        // Gradients are ~1e-2; f32 backward in a different order of summation.
        compare(&format!("grad {name} on {dev}"), &g.to_vec_f32().unwrap(), &want, Tolerance { atol: 2e-6, rtol: 1e-3 }).unwrap();
    }
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let dir = fixture("llama-gqa");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("chat_expected.json")).unwrap()).unwrap();
    for case in json["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "ids of {text:?}");
    }
    let messages: Vec<Message> = serde_json::from_value(json["messages"].clone()).unwrap();
    let rendered = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(rendered, json["rendered"].as_str().unwrap());
    let want_ids: Vec<u32> = json["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(tok.encode(&rendered, false).unwrap(), want_ids);
    // The template's own raise_exception surfaces as an error naming the file.
    let bad = vec![Message { role: "tool".into(), content: "x".into() }];
    let e = tok.apply_chat_template(&bad, true).unwrap_err().to_string();
    assert!(e.contains("Only user, assistant and system roles") && e.contains("tokenizer_config.json"), "{e}");
}

/// A Qwen3-style chat template (namespace from a reversed loop, Python string methods, `is
/// string`, earlier `<think>` blocks dropped) renders as transformers renders it.
#[test]
fn qwen_style_chat_template_matches_transformers() {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("chat").join("expected.json")).unwrap()).unwrap();
    let template = json["template"].as_str().unwrap();
    for case in json["cases"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let got = tuna::io::tokenizer::render_chat_template(template, &messages, case["add_generation_prompt"].as_bool().unwrap(), None, None).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap());
    }
    let bad = vec![Message { role: "tool".into(), content: "x".into() }];
    let e = tuna::io::tokenizer::render_chat_template(template, &bad, true, None, None).unwrap_err();
    assert!(e.contains("unknown role: tool"), "{e}");
}

/// Packing several examples into one row gives each example exactly the logits and loss it
/// has alone: positions restart and attention stays within the example.
#[test]
fn packed_rows_equal_separate_examples() {
    let model = Llama::load(&fixture("qwen2-tied")).unwrap();
    let examples: Vec<Vec<i32>> = vec![vec![0, 17, 99, 203, 5], vec![0, 44, 8], vec![0, 250, 251, 252, 7, 9]];
    let mut ids = Vec::new();
    let mut starts = Vec::new();
    for ex in &examples {
        let s = ids.len() as u32;
        ids.extend_from_slice(ex);
        starts.extend(std::iter::repeat_n(s, ex.len()));
    }
    let n = ids.len();
    let packing = tuna::nn::Packing { starts: std::sync::Arc::new(starts) };
    let packed = model.forward_packed(&Tensor::from_vec_i32(ids.clone(), [1, n]).unwrap(), &packing).unwrap().to_vec_f32().unwrap();
    let (mut off, mut nll, mut count) = (0, 0.0f64, 0usize);
    for ex in &examples {
        let t = Tensor::from_vec_i32(ex.clone(), [1, ex.len()]).unwrap();
        let alone = model.forward(&t, None).unwrap().to_vec_f32().unwrap();
        let v = 320;
        compare("packed logits", &packed[off * v..(off + ex.len()) * v], &alone.iter().map(|&x| x as f64).collect::<Vec<_>>(), Tolerance { atol: 1e-5, rtol: 1e-5 }).unwrap();
        nll += model.loss(&t, None).unwrap().to_scalar().unwrap() as f64 * (ex.len() - 1) as f64;
        count += ex.len() - 1;
        off += ex.len();
    }
    let packed_loss = model.loss_packed(&Tensor::from_vec_i32(ids, [1, n]).unwrap(), None, &packing).unwrap().to_scalar().unwrap() as f64;
    assert!((packed_loss - nll / count as f64).abs() < 1e-5, "{packed_loss} vs {}", nll / count as f64);
}
