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

#[test]
fn loss_and_lora_gradients_match_the_cpu() {
    for (dev, dt) in gpu_runs() {
        let r = check_loss_and_grads(&dev, dt);
        assert!(r.is_ok(), "{dev} {dt}: {}", r.unwrap_err());
        eprintln!("{dev} {dt}: {}", r.unwrap());
    }
}

#[test]
fn training_steps_match_the_cpu() {
    for (dev, dt) in gpu_runs() {
        let r = check_training(&dev, dt);
        assert!(r.is_ok(), "{dev} {dt}: {}", r.unwrap_err());
        eprintln!("{dev} {dt}: {}", r.unwrap());
    }
}

#[test]
fn logits_through_the_kv_cache_match_the_cpu() {
    for (dev, dt) in gpu_runs() {
        let r = check_cached_logits(&dev, dt);
        assert!(r.is_ok(), "{dev} {dt}: {}", r.unwrap_err());
        eprintln!("{dev} {dt}: {}", r.unwrap());
    }
}
