//! Shared by the integration tests: which devices to run on, and scratch folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tuna::Device;

/// A fresh folder `tuna-{tag}-{pid}` in the temp dir for one test's files. It is removed when
/// the guard drops after a passing test; a failing test leaves it, and says where, to be looked
/// at. It derefs to its path.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("tuna-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("making {}: {e}", dir.display()));
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the failed test's files are left in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Every device this machine has. With TUNA_REQUIRE_WGPU=1 (set in CI) a missing wgpu adapter
/// fails the test instead of quietly shrinking the list; likewise TUNA_REQUIRE_CUDA=1, and
/// TUNA_REQUIRE_WGPU_F16=1 for an adapter with SHADER_F16 (the f16 WGSL cases).
/// TUNA_TEST_DEVICES (comma-separated `cpu`, `cuda`, `wgpu`) keeps those kinds alone, and the
/// requirements then apply to the kinds kept: CI's second pass over the CUDA paths, with the
/// emulator as an H100, sets `cuda`.
pub fn devices() -> Vec<Device> {
    let kinds = std::env::var("TUNA_TEST_DEVICES").ok();
    let kept = |kind: &str| kinds.as_deref().is_none_or(|k| k.split(',').any(|w| w.trim() == kind));
    let kind = |d: &Device| match d {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Wgpu(_) => "wgpu",
    };
    let devs: Vec<Device> = Device::available().into_iter().map(|d| d.device).filter(|d| kept(kind(d))).collect();
    let require = |var: &str, kind: &str| kept(kind) && std::env::var(var).is_ok_and(|v| v == "1");
    if require("TUNA_REQUIRE_WGPU", "wgpu") {
        assert!(
            devs.iter().any(|d| matches!(d, Device::Wgpu(_))),
            "TUNA_REQUIRE_WGPU=1 but wgpu found no adapter: {:?}",
            tuna::device::wgpu::adapters()
        );
    }
    if require("TUNA_REQUIRE_WGPU_F16", "wgpu") {
        assert!(
            devs.iter().any(|&d| has_f16(d)),
            "TUNA_REQUIRE_WGPU_F16=1 but no wgpu adapter has SHADER_F16: {:?}",
            tuna::device::wgpu::adapters()
        );
    }
    if require("TUNA_REQUIRE_CUDA", "cuda") {
        assert!(devs.iter().any(|d| matches!(d, Device::Cuda(_))), "TUNA_REQUIRE_CUDA=1 but no CUDA device");
    }
    devs
}

/// `model` on `dev` as it trains there: in bf16 on CUDA (whose GEMMs are 16-bit), as it is
/// elsewhere.
pub fn model_on(model: &tuna::nn::Llama, dev: &Device) -> tuna::nn::Llama {
    let m = model.to_device(dev).unwrap_or_else(|e| panic!("moving the model to {dev}: {e}"));
    if matches!(dev, Device::Cuda(_)) {
        m.to_dtype(tuna::DType::BF16).unwrap_or_else(|e| panic!("the model in bf16 on {dev}: {e}"))
    } else {
        m
    }
}

/// Whether `dev` is a wgpu adapter with SHADER_F16 (where the f16 WGSL kernels run).
pub fn has_f16(dev: Device) -> bool {
    matches!(dev, Device::Wgpu(i) if tuna::device::wgpu::runtime(i).is_ok_and(|rt| rt.has_f16()))
}

/// The small model device tests train: the f32 fixture `tools/fixtures/llama-gqa` (head dim
/// 8), or on CUDA, whose attention kernels have head dims 32 to 128, the tiny random Llama of
/// `tuna::testing::model` (head dim 64). On the CPU in f32; `model_on` puts it on `dev`.
pub fn small_model(dev: &Device) -> tuna::nn::Llama {
    if matches!(dev, Device::Cuda(_)) {
        tuna::nn::Llama::random(tuna::testing::model::tiny_config(), 3).unwrap()
    } else {
        tuna::nn::Llama::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/llama-gqa")).unwrap()
    }
}

/// The devices that run f32 models: all but CUDA, whose model runs in bf16 (its GEMMs are
/// 16-bit) with head dims 32 to 128. Tests against f32 fixtures (head dim 8) made by PyTorch
/// run here; the model on CUDA is checked against the CPU in `model_devices.rs` (and on a GPU
/// by `tools/gpu-check`).
pub fn f32_model_devices() -> Vec<Device> {
    devices().into_iter().filter(|d| !matches!(d, Device::Cuda(_))).collect()
}
