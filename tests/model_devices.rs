//! The model on each GPU present against the CPU (`tuna::testing::model`): loss and LoRA
//! gradients (plain, dropout, packed rows, checkpointed layers), five training steps, logits
//! through the KV cache. wgpu runs f32 here (lavapipe in CI); CUDA runs bf16 (with f32
//! adapters), and `tools/gpu-check` runs the same bodies there.

mod common;

use tuna::testing::model::{check_cached_logits, check_loss_and_grads, check_training};
use tuna::{DType, Device};

fn gpu_runs() -> Vec<(Device, DType)> {
    common::devices()
        .into_iter()
        .filter_map(|d| match d {
            Device::Wgpu(_) => Some((d, DType::F32)),
            Device::Cuda(_) => Some((d, DType::BF16)),
            Device::Cpu => None,
        })
        .collect()
}

/// Runs `check` on each (device, dtype), failing with its message; prints what it measured.
fn each(runs: Vec<(Device, DType)>, check: fn(&Device, DType) -> Result<String, String>) {
    for (dev, dt) in runs {
        match check(&dev, dt) {
            Ok(summary) => eprintln!("{dev} {dt}: {summary}"),
            Err(e) => panic!("{dev} {dt}: {e}"),
        }
    }
}

#[test]
fn loss_and_lora_gradients_match_the_cpu() {
    each(gpu_runs(), check_loss_and_grads);
}

#[test]
fn training_steps_match_the_cpu() {
    each(gpu_runs(), check_training);
}

#[test]
fn logits_through_the_kv_cache_match_the_cpu() {
    each(gpu_runs(), check_cached_logits);
}

/// f16 on wgpu (where the adapter has SHADER_F16): the model in half precision with f32
/// adapters, f32 statistics and loss.
fn f16_runs() -> Vec<(Device, DType)> {
    common::devices().into_iter().filter(|&d| common::has_f16(d)).map(|d| (d, DType::F16)).collect()
}

#[test]
fn f16_loss_and_lora_gradients_match_the_cpu() {
    each(f16_runs(), check_loss_and_grads);
}

#[test]
fn f16_training_steps_match_the_cpu() {
    each(f16_runs(), check_training);
}

#[test]
fn an_f16_overflow_skips_the_step_and_halves_the_loss_scale() {
    use tuna::nn::Llama;
    use tuna::peft::LoraConfig;
    use tuna::train::data::Sequence;
    use tuna::train::{Method, TrainConfig, Trainer};
    for (dev, dt) in f16_runs() {
        let model = Llama::random(tuna::testing::model::tiny_config(), 3).unwrap().to_device(&dev).unwrap().to_dtype(dt).unwrap();
        let data: Vec<Sequence> = (0..4).map(|i| Sequence { ids: (0..12).map(|j| 4 + (i * 7 + j) % 300).collect(), mask: vec![true; 12], starts: Vec::new() }).collect();
        // 2^40 times the gradient overflows f16 (largest finite 65504) anywhere it is not tiny.
        let cfg = TrainConfig {
            method: Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, ..Default::default() }),
            lr: 1e-2,
            batch_size: 2,
            max_steps: Some(2),
            loss_scale: 2f32.powi(40),
            ..Default::default()
        };
        let mut t = Trainer::new(model, cfg, data, 0).unwrap();
        let before = t.masters.clone();
        let r = t.train_step().unwrap();
        assert!(r.skipped && r.loss.is_finite(), "{dev}: {r:?}");
        assert_eq!(t.loss_scale.map(|s| s.scale), Some(2f32.powi(39)), "{dev}: the scale halves");
        t.sync_host().unwrap();
        assert_eq!(t.masters, before, "{dev}: a skipped step leaves the adapters as they were");
    }
}

#[test]
fn f16_resume_continues_to_the_same_losses() {
    use tuna::nn::Llama;
    use tuna::peft::LoraConfig;
    use tuna::train::data::Sequence;
    use tuna::train::{Method, TrainConfig, Trainer};
    for (dev, dt) in f16_runs() {
        let model = || Llama::random(tuna::testing::model::tiny_config(), 3).unwrap().to_device(&dev).unwrap().to_dtype(dt).unwrap();
        let data: Vec<Sequence> = (0..8).map(|i| Sequence { ids: (0..12).map(|j| 4 + (i * 7 + j) % 300).collect(), mask: vec![true; 12], starts: Vec::new() }).collect();
        // A scale that is not the default, so a resume that forgot it would differ.
        let cfg = TrainConfig {
            method: Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, ..Default::default() }),
            lr: 1e-2,
            batch_size: 2,
            max_steps: Some(4),
            loss_scale: 1024.0,
            ..Default::default()
        };
        let mut full = Trainer::new(model(), cfg.clone(), data.clone(), 0).unwrap();
        let want: Vec<f32> = (0..4).map(|_| full.train_step().unwrap().loss).collect();
        let dir = common::Scratch::new("f16-resume");
        let mut first = Trainer::new(model(), cfg.clone(), data.clone(), 0).unwrap();
        let mut got: Vec<f32> = (0..2).map(|_| first.train_step().unwrap().loss).collect();
        first.save_checkpoint(&dir).unwrap();
        let mut second = Trainer::new(model(), TrainConfig { loss_scale: 65536.0, ..cfg }, data, 0).unwrap();
        second.load_checkpoint(&dir).unwrap();
        assert_eq!(second.loss_scale.map(|s| s.scale), Some(1024.0), "{dev}: the checkpoint's loss scale");
        got.extend((0..2).map(|_| second.train_step().unwrap().loss));
        assert_eq!(got, want, "{dev}");
    }
}
