//! Shared by the integration tests: which devices to run on.
#![allow(dead_code)]

use tuna::Device;

/// Every device this machine has. With TUNA_REQUIRE_WGPU=1 (set in CI) a missing wgpu adapter
/// fails the test instead of quietly shrinking the list; likewise TUNA_REQUIRE_CUDA=1, and
/// TUNA_REQUIRE_WGPU_F16=1 for an adapter with SHADER_F16 (the f16 WGSL cases).
pub fn devices() -> Vec<Device> {
    let devs: Vec<Device> = Device::available().into_iter().map(|d| d.device).collect();
    let require = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
    if require("TUNA_REQUIRE_WGPU") {
        assert!(
            devs.iter().any(|d| matches!(d, Device::Wgpu(_))),
            "TUNA_REQUIRE_WGPU=1 but wgpu found no adapter: {:?}",
            tuna::device::wgpu::adapters()
        );
    }
    if require("TUNA_REQUIRE_WGPU_F16") {
        assert!(
            devs.iter().any(|&d| has_f16(d)),
            "TUNA_REQUIRE_WGPU_F16=1 but no wgpu adapter has SHADER_F16: {:?}",
            tuna::device::wgpu::adapters()
        );
    }
    if require("TUNA_REQUIRE_CUDA") {
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
