//! wgpu's limits and refused work. In a binary of its own: a refused launch is recorded for
//! the whole device (`WgpuRuntime`, one per process) and reported by the next read or
//! synchronization on any thread, so tests reading the same device beside it would see it.

mod common;

use tuna::{ops, DType, Device, Tensor};
#[test]
fn wgpu_refuses_a_tensor_past_its_binding_limit_and_reports_refused_work_as_an_error() {
    use tuna::device::wgpu::runtime;
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let rt = runtime(i).unwrap();
        let limit = rt.max_tensor_bytes();
        // Only where the limit is small enough to build such a tensor here (lavapipe: 128 MiB).
        if limit <= 256 << 20 {
            let n = (limit / 4) as usize;
            let err = Tensor::zeros([n + 1], DType::F32, &dev).unwrap_err().to_string();
            assert!(err.contains("max_storage_buffer_binding_size") && err.contains(&format!("[{}]", n + 1)), "{err}");
            let err = Tensor::from_vec(vec![0.0f32; n + 1], [n + 1]).unwrap().to_device(&dev).unwrap_err().to_string();
            assert!(err.contains("max_storage_buffer_binding_size"), "{err}");
            // An op's output past the limit (from inputs within it) is refused by the op, by
            // name: a matmul's [4096, cols] from [4096, 1] · [1, cols]; a cast to a wider type.
            let cols = n / 4096 + 1;
            let (a, b) = (Tensor::full(1.0, [4096, 1], &dev).unwrap(), Tensor::full(1.0, [1, cols], &dev).unwrap());
            let err = ops::matmul(&a, &b, false, false).unwrap_err().to_string();
            assert!(err.contains("matmul: the output (f32 [4096, ") && err.contains("max_storage_buffer_binding_size"), "{err}");
            if rt.has_f16() {
                let half = Tensor::zeros([n + 1], DType::F16, &dev).unwrap();
                let err = half.to_dtype(DType::F32).unwrap_err().to_string();
                assert!(err.contains("to_dtype (f16") && err.contains("max_storage_buffer_binding_size"), "{err}");
            }
            // At the limit it binds, and a kernel runs on it.
            let t = Tensor::full(2.0, [n], &dev).unwrap();
            let y = ops::scale(&t, 1.5).unwrap();
            assert_eq!(y.to_vec_f32().unwrap()[n - 1], 3.0);
        }
        // A buffer past the device's largest is an error from the next read, and is not
        // pooled: the next allocation of that size is made afresh (and fails the same way).
        // Launches just before and just after it (which tuna's devices batch with it) still run.
        let huge = rt.device.limits().max_buffer_size as usize + 1;
        let x = Tensor::full(1.0, [4], &dev).unwrap();
        // (Each launch's value is new to its pooled output buffer, so a lost launch shows.)
        for (b, a) in [(3.0, 5.0), (7.0, 9.0)] {
            let before = ops::scale(&x, b).unwrap();
            // A copy into the buffer wgpu could not make is refused.
            let failed = rt.alloc(huge);
            let ones = rt.upload(bytemuck::cast_slice(&[1.0f32; 4]));
            let mut enc = rt.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(ones.buffer(), 0, failed.buffer(), 0, 16);
            tuna::device::wgpu::submit(&rt.device, &rt.queue, enc);
            drop(failed);
            let after = ops::scale(&x, a).unwrap();
            let err = rt.synchronize().unwrap_err().to_string();
            assert!(err.contains("allocating"), "{err}");
            assert_eq!(before.to_vec_f32().unwrap(), vec![b; 4], "a launch before a failed allocation was lost");
            assert_eq!(after.to_vec_f32().unwrap(), vec![a; 4], "a launch after a failed allocation was lost");
        }
        rt.synchronize().unwrap();
        // Work wgpu refuses (a buffer bound without STORAGE usage) is an error from the next
        // synchronization, not a panic, and the device goes on working.
        let plain = rt.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: 256, usage: wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
        let before = ops::scale(&x, 11.0).unwrap();
        let bad = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tuna::kernels::elementwise::wgsl::add(&rt.device, &rt.queue, &rt.kernels, &plain, &plain, &plain, 4, 4, tuna::device::wgpu::Precision::F32)
        }));
        assert!(bad.is_ok(), "a refused launch panicked");
        let after = ops::scale(&x, 13.0).unwrap();
        let err = rt.synchronize().unwrap_err().to_string();
        assert!(err.contains("refused") && err.contains("STORAGE"), "{err}");
        rt.synchronize().unwrap();
        // Only the refused launch is lost, not the launches batched around it.
        assert_eq!(before.to_vec_f32().unwrap(), vec![11.0; 4], "a launch before a refused one was lost");
        assert_eq!(after.to_vec_f32().unwrap(), vec![13.0; 4], "a launch after a refused one was lost");
        assert_eq!(ops::add(&x, &x).unwrap().to_vec_f32().unwrap(), vec![2.0; 4]);
    }
}
