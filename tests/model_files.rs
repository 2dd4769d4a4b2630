//! Bad model folders get clear errors naming the file and the tensor or field; sharded
//! checkpoints and the older config form load.

mod common;

use std::path::{Path, PathBuf};

use tuna::io::config::LlamaConfig;
use tuna::io::safetensors::{save, WeightFiles};
use tuna::io::tokenizer::Tokenizer;
use tuna::nn::Llama;
use tuna::{Device, Tensor};

use common::Scratch;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures").join(name)
}

/// A fresh copy of a fixture folder in a scratch folder.
fn copy_fixture(name: &str, tag: &str) -> Scratch {
    let dst = Scratch::new(&format!("test-{tag}"));
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    load_err_with(dir, Llama::load)
}

/// The error of `load` (one of `Llama`'s loads) on `dir`.
fn load_err_with(dir: &Path, load: fn(&Path) -> tuna::Result<Llama>) -> String {
    match load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors through `edit` on its (name, tensor) list.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let w = WeightFiles::open(dir).unwrap();
    let mut tensors: Vec<(String, Tensor)> = w.names().iter().map(|n| (n.to_string(), w.load_raw(n, &Device::Cpu).unwrap())).collect();
    drop(w);
    edit(&mut tensors);
    save(&dir.join("model.safetensors"), &tensors, None).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("llama-gqa", "missing");
    rewrite_weights(&dir, |t| t.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight"));
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"), "{e}");
}

/// The layers load side by side; with two missing, the error names the first in layer order.
#[test]
fn first_missing_tensor_in_layer_order_is_named() {
    let dir = copy_fixture("llama-gqa", "missing2");
    rewrite_weights(&dir, |t| t.retain(|(n, _)| n != "model.layers.0.mlp.down_proj.weight" && n != "model.layers.1.self_attn.q_proj.weight"));
    for _ in 0..4 {
        let e = load_err(&dir);
        assert!(e.contains("missing tensor `model.layers.0.mlp.down_proj.weight`"), "{e}");
    }
}

#[test]
fn wrong_shape_is_named() {
    let dir = copy_fixture("llama-gqa", "shape");
    rewrite_weights(&dir, |t| {
        let e = t.iter_mut().find(|(n, _)| n == "model.norm.weight").unwrap();
        e.1 = Tensor::zeros([31], tuna::DType::F32, &Device::Cpu).unwrap();
    });
    let e = load_err(&dir);
    assert!(e.contains("`model.norm.weight` has shape [31], expected [32]"), "{e}");
    // A matrix, which a load keeping matrices in bf16 reads its own way (the layers are read,
    // and their errors reported, before the final norm).
    rewrite_weights(&dir, |t| {
        let e = t.iter_mut().find(|(n, _)| n == "model.layers.1.mlp.up_proj.weight").unwrap();
        e.1 = Tensor::zeros([64, 31], tuna::DType::F32, &Device::Cpu).unwrap();
    });
    for load in [Llama::load, Llama::load_bf16] {
        let e = load_err_with(&dir, load);
        assert!(e.contains("`model.layers.1.mlp.up_proj.weight` has shape [64, 31], expected [64, 32]"), "{e}");
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = copy_fixture("llama-gqa", "dtype");
    rewrite_weights(&dir, |t| {
        let e = t.iter_mut().find(|(n, _)| n == "model.norm.weight").unwrap();
        e.1 = Tensor::from_slice(&[1i32; 32], [32], &Device::Cpu).unwrap();
        let e = t.iter_mut().find(|(n, _)| n == "model.embed_tokens.weight").unwrap();
        e.1 = Tensor::from_slice(&vec![1i32; e.1.elem_count()], e.1.shape().clone(), &Device::Cpu).unwrap();
    });
    let e = load_err(&dir);
    assert!(e.contains("I32") && (e.contains("model.norm.weight") || e.contains("model.embed_tokens.weight")), "{e}");
    let e = load_err_with(&dir, Llama::load_bf16);
    assert!(e.contains("I32") && (e.contains("model.norm.weight") || e.contains("model.embed_tokens.weight")), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_named() {
    let dir = copy_fixture("llama-gqa", "trunc");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"not json");
    std::fs::write(&path, &corrupt).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("not a valid safetensors file"), "{e}");
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors file"));
}

#[test]
fn config_errors_name_the_field() {
    let dir = copy_fixture("llama-gqa", "config");
    let cfg_path = dir.join("config.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("architectures", serde_json::json!(["GPT2LMHeadModel"]), "`GPT2LMHeadModel` is not supported"),
        ("num_key_value_heads", serde_json::json!(3), "field `num_key_value_heads`"),
        ("hidden_size", serde_json::json!("big"), "field `hidden_size`"),
        ("hidden_act", serde_json::json!("gelu"), "field `hidden_act`"),
        ("rope_parameters", serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4}), "rope_parameters.rope_type"),
        ("rope_parameters", serde_json::json!({"rope_type": "linear", "rope_theta": 1e4}), "rope_parameters.factor"),
        ("rope_parameters", serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": "4"}), "rope_parameters.factor"),
    ];
    for (field, value, needle) in cases {
        let mut cfg = original.clone();
        cfg[field] = value;
        std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let e = load_err(&dir);
        assert!(e.contains("config.json") && e.contains(needle), "{field}: {e}");
    }
    std::fs::write(&cfg_path, "{ not json").unwrap();
    assert!(load_err(&dir).contains("invalid JSON"));
    std::fs::remove_file(&cfg_path).unwrap();
    assert!(load_err(&dir).contains("cannot read"));
}

#[test]
fn qwen3_config_and_norms() {
    let dir = copy_fixture("qwen3", "qwen3");
    let cfg_path = dir.join("config.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let c = LlamaConfig::from_value(&original, &cfg_path).unwrap();
    assert!(c.qk_norm && !c.qkv_bias && !c.o_bias);
    assert_eq!((c.head_dim, c.num_heads, c.hidden_size), (16, 4, 32));
    // Without head_dim, Qwen3Config's default (128), not hidden / heads.
    let mut v = original.clone();
    v.as_object_mut().unwrap().remove("head_dim");
    assert_eq!(LlamaConfig::from_value(&v, &cfg_path).unwrap().head_dim, 128);
    let mut v = original.clone();
    v["use_sliding_window"] = serde_json::json!(true);
    let e = LlamaConfig::from_value(&v, &cfg_path).unwrap_err().to_string();
    assert!(e.contains("field `use_sliding_window`"), "{e}");
    // The written config reads back as the same model.
    assert_eq!(LlamaConfig::from_value(&c.to_hf_json(), &cfg_path).unwrap(), c);
    // A missing or misshapen q/k norm is named.
    rewrite_weights(&dir, |t| t.retain(|(n, _)| n != "model.layers.1.self_attn.k_norm.weight"));
    let e = load_err(&dir);
    assert!(e.contains("missing tensor `model.layers.1.self_attn.k_norm.weight`"), "{e}");
}

/// An edit of a config.json's value.
type ConfigEdit<'a> = &'a dyn Fn(&mut serde_json::Value);

/// The fixture's config.json parsed after `edit` (the error's message where it is refused).
fn edited_config(name: &str) -> impl Fn(ConfigEdit) -> Result<LlamaConfig, String> {
    let path = fixture(name).join("config.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    move |edit| {
        let mut v = original.clone();
        edit(&mut v);
        LlamaConfig::from_value(&v, &path).map_err(|e| e.to_string())
    }
}

#[test]
fn smollm3_nope_layers_from_flags_or_interval() {
    let with = edited_config("smollm3");
    let c = with(&|_| {}).unwrap();
    assert_eq!((c.arch, c.nope_layers.clone()), (tuna::io::config::Arch::SmolLM3, vec![1]));
    assert!(c.rotates(0) && !c.rotates(1) && c.rotates(2));
    assert_eq!(LlamaConfig::from_value(&c.to_hf_json(), Path::new("config.json")).unwrap(), c);
    // Without the flags, every `no_rope_layer_interval`-th layer (default 4) rotates nothing.
    let eight = |v: &mut serde_json::Value| {
        v.as_object_mut().unwrap().remove("no_rope_layers");
        v["num_hidden_layers"] = 8.into();
    };
    assert_eq!(with(&|v| { eight(v); v.as_object_mut().unwrap().remove("no_rope_layer_interval"); }).unwrap().nope_layers, vec![3, 7]);
    assert_eq!(with(&|v| { eight(v); v["no_rope_layer_interval"] = 3.into(); }).unwrap().nope_layers, vec![2, 5]);
    for (edit, says) in [
        (&(|v: &mut serde_json::Value| v["no_rope_layers"] = serde_json::json!([1, 0])) as &dyn Fn(&mut serde_json::Value), "has 2 entries for 3 layers"),
        (&|v: &mut serde_json::Value| v["no_rope_layers"] = serde_json::json!([1, 2, 1]), "entry 1 is 2 (0 or 1)"),
        (&|v: &mut serde_json::Value| v["use_sliding_window"] = true.into(), "field `use_sliding_window`"),
    ] {
        let e = with(edit).unwrap_err();
        assert!(e.contains("config.json") && e.contains(says), "{e}");
    }
}

/// Gemma 3's config in transformers 5's form (`layer_types`, a `rope_parameters` dict per layer
/// type) and in the older form the Hub's checkpoints carry (`sliding_window_pattern`,
/// `rope_local_base_freq`, `rope_scaling` for the global layers) read as the same config; what
/// tuna cannot run is refused by name.
#[test]
fn gemma3_config_forms_and_refusals() {
    let with = edited_config("gemma3");
    let c = with(&|_| {}).unwrap();
    assert_eq!((c.arch, c.global_layers.clone(), c.sliding_window, c.local_rope_theta, c.rope_theta), (tuna::io::config::Arch::Gemma3, vec![1], Some(5), Some(1e4), 1e6));
    assert_eq!(c.rope_scaling, Some(tuna::io::config::RopeScaling::Linear { factor: 2.0 }));
    assert_eq!((c.attention_multiplier, c.embedding_multiplier, c.tie_word_embeddings, c.qk_norm, c.sandwich_norms), (Some(1.0 / 24f32.sqrt()), 32f32.sqrt(), true, true, true));
    // The windowed layers rotate by their own base, unscaled; the global one by the scaled 1e6.
    let local = c.local_inv_freq().unwrap();
    assert_eq!(local[1], 1.0 / 1e4f32.powf(2.0 / 16.0));
    assert_eq!(c.inv_freq()[1], 1.0 / 1e6f32.powf(2.0 / 16.0) / 2.0);
    let old_form = |v: &mut serde_json::Value| {
        let o = v.as_object_mut().unwrap();
        o.remove("layer_types");
        o.remove("rope_parameters");
        o.remove("hidden_activation");
        o.insert("hidden_act".into(), "gelu_pytorch_tanh".into());
        o.insert("sliding_window_pattern".into(), 2.into());
        o.insert("rope_theta".into(), 1e6.into());
        o.insert("rope_local_base_freq".into(), 1e4.into());
        o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 2.0}));
    };
    assert_eq!(with(&old_form).unwrap(), c);
    // Without a pattern, transformers' default: every sixth layer is global (none of three).
    assert_eq!(with(&|v| { old_form(v); v.as_object_mut().unwrap().remove("sliding_window_pattern"); }).unwrap().global_layers, Vec::<usize>::new());
    for (edit, says) in [
        (&(|v: &mut serde_json::Value| v["attn_logit_softcapping"] = 50.0.into()) as &dyn Fn(&mut serde_json::Value), "field `attn_logit_softcapping`: logit soft-capping is not supported"),
        (&|v: &mut serde_json::Value| v["final_logit_softcapping"] = 30.0.into(), "field `final_logit_softcapping`"),
        (&|v: &mut serde_json::Value| v["use_bidirectional_attention"] = true.into(), "field `use_bidirectional_attention`"),
        (&|v: &mut serde_json::Value| v["layer_types"] = serde_json::json!(["full_attention"]), "has 1 entries for 3 layers"),
        (&|v: &mut serde_json::Value| v["layer_types"][2] = "chunked_attention".into(), "entry 2 is \"chunked_attention\""),
        (&|v: &mut serde_json::Value| v["rope_parameters"]["sliding_attention"]["rope_type"] = "yarn".into(), "field `rope_parameters.sliding_attention.rope_type`"),
        (&|v: &mut serde_json::Value| v["rope_parameters"]["full_attention"]["rope_type"] = "dynamic".into(), "field `rope_parameters.full_attention.rope_type`"),
        (&|v: &mut serde_json::Value| v["hidden_activation"] = "gelu".into(), "field `hidden_activation`: `gelu` is not supported"),
        (&|v: &mut serde_json::Value| v["sliding_window"] = 0.into(), "field `sliding_window`"),
        (&|v: &mut serde_json::Value| v["query_pre_attn_scalar"] = 0.into(), "field `query_pre_attn_scalar`"),
    ] {
        let e = with(edit).unwrap_err();
        assert!(e.contains("config.json") && e.contains(says), "{e}");
    }
}

/// Gemma's legacy `hidden_act: "gelu"` means the tanh GELU (transformers rewrites it); on
/// another architecture it is refused.
#[test]
fn gemma_legacy_gelu_is_the_tanh_gelu() {
    let with = edited_config("gemma");
    assert_eq!(with(&|v| v["hidden_act"] = "gelu".into()).unwrap().hidden_act, tuna::ops::GluAct::GeluTanh);
    let e = edited_config("llama-gqa")(&|v| v["hidden_act"] = "gelu".into()).unwrap_err();
    assert!(e.contains("field `hidden_act`: `gelu` is not supported"), "{e}");
}

#[test]
fn classic_config_form_reads_the_same_rope() {
    // The pre-transformers-5 form: rope_theta and rope_scaling at the top level.
    let dir = fixture("llama3-rope");
    let new = LlamaConfig::from_dir(&dir).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let rp = v.as_object_mut().unwrap().remove("rope_parameters").unwrap();
    v["rope_theta"] = rp["rope_theta"].clone();
    let mut scaling = rp.clone();
    scaling.as_object_mut().unwrap().remove("rope_theta");
    v["rope_scaling"] = scaling;
    let old = LlamaConfig::from_value(&v, Path::new("config.json")).unwrap();
    assert_eq!(old.rope_theta, new.rope_theta);
    assert_eq!(old.rope_scaling, new.rope_scaling);
    assert!(new.rope_scaling.is_some());
    assert_eq!(old.inv_freq(), new.inv_freq());
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = copy_fixture("llama-gqa", "tok");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = Tokenizer::from_dir(&dir).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing tokenizer"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let dir = copy_fixture("llama-gqa", "shards");
    let w = WeightFiles::open(&dir).unwrap();
    let names: Vec<String> = w.names().iter().map(|s| s.to_string()).collect();
    let tensors: Vec<(String, Tensor)> = names.iter().map(|n| (n.clone(), w.load_raw(n, &Device::Cpu).unwrap())).collect();
    drop(w);
    let (a, b) = tensors.split_at(tensors.len() / 2);
    save(&dir.join("model-00001-of-00002.safetensors"), a, None).unwrap();
    save(&dir.join("model-00002-of-00002.safetensors"), b, None).unwrap();
    let mut map = serde_json::Map::new();
    for (n, _) in a {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _) in b {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let sharded = Llama::load(&dir).unwrap();
    let single = Llama::load(&fixture("llama-gqa")).unwrap();
    let ids = Tensor::from_vec_i32(vec![5, 9, 200, 31], [1, 4]).unwrap();
    assert_eq!(sharded.forward(&ids, None).unwrap().to_vec_f32().unwrap(), single.forward(&ids, None).unwrap().to_vec_f32().unwrap());
}

#[test]
fn out_of_vocabulary_ids_are_errors() {
    let model = Llama::load(&fixture("llama-gqa")).unwrap();
    let ids = Tensor::from_vec_i32(vec![5, 320], [1, 2]).unwrap();
    let e = model.forward(&ids, None).err().unwrap().to_string();
    assert!(e.contains("index 320") && e.contains("0..320"), "{e}");
}

#[test]
fn loading_into_nf4_gives_the_quantized_model_byte_for_byte() {
    let mut quantized = Llama::load(&fixture("llama-gqa")).unwrap();
    quantized.quantize_nf4().unwrap();
    let streamed = Llama::load_nf4(&fixture("llama-gqa")).unwrap();
    let (a, b) = (quantized.parameters(), streamed.parameters());
    assert_eq!(a.len(), b.len());
    let mut nf4 = 0;
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
        match (x.as_nf4(), y.as_nf4()) {
            (Some(p), Some(q)) => {
                assert_eq!((&p.packed, &p.absmax, &p.absmax2, p.offset.to_bits()), (&q.packed, &q.absmax, &q.absmax2, q.offset.to_bits()), "{name}");
                nf4 += 1;
            }
            (None, None) => assert_eq!(x.to_vec_f32().unwrap(), y.to_vec_f32().unwrap(), "{name}"),
            _ => panic!("{name}: NF4 in one model only"),
        }
    }
    assert_eq!(nf4, 7 * quantized.config.num_layers, "every decoder linear in NF4");
}

#[test]
fn an_nf4_model_without_adapters_matches_its_dequantized_weights() {
    // Every linear frozen in NF4, none with an adapter: the grouped projections and the single
    // ones (o_proj, down_proj) all decode W inside their products.
    let q = Llama::load_nf4(&fixture("llama-gqa")).unwrap();
    let mut f = q.clone();
    for (name, lin) in f.linears_mut() {
        let w = tuna::kernels::nf4::cpu::dequantize(lin.weight.as_nf4().unwrap_or_else(|| panic!("{name} is not NF4"))).unwrap();
        lin.weight = Tensor::from_vec(w, lin.weight.shape().clone()).unwrap();
    }
    let vocab = q.config.vocab_size;
    let mut rng = tuna::rng::Rng::new(3);
    // 3 tokens: W decoded in registers (AVX-512) or 64-row tiles; 80: in 512-row panels.
    for t in [3, 80] {
        let ids = Tensor::from_vec_i32((0..t).map(|_| rng.below(vocab) as i32).collect(), [1, t]).unwrap();
        let (a, b) = (q.forward(&ids, None).unwrap().to_vec_f32().unwrap(), f.forward(&ids, None).unwrap().to_vec_f32().unwrap());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-4 * scale, "{t} tokens: NF4 logits differ from the dequantized model's by {worst} (largest {scale})");
    }
}
