//! Tensors across devices, and the errors that bad input and missing hardware produce.

mod common;

use tuna::{ops, DType, Device, Error, Tensor};

#[test]
fn cuda_without_a_gpu_is_an_error_not_a_panic() {
    // On a machine with a GPU the same call must succeed; without one it must be an error value.
    let r = Tensor::from_slice(&[1.0f32, 2.0], [2], &Device::Cuda(0));
    if tuna::device::cuda::device_count().unwrap_or(0) == 0 {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::DeviceUnavailable { device: Device::Cuda(0), .. }), "{e}");
        assert!(e.to_string().contains("cuda:0"), "{e}");
        assert!(Device::Cuda(0).open().is_err());
    } else {
        assert_eq!(r.unwrap().to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
    }
    // A device index past the end is an error everywhere.
    assert!(Device::Cuda(9999).open().is_err());
    assert!(Device::Wgpu(9999).open().is_err());
}

#[test]
fn available_lists_the_cpu_first() {
    let devs = Device::available();
    assert_eq!(devs[0].device, Device::Cpu);
}

#[test]
fn round_trip_through_every_device() {
    let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let ids: Vec<i32> = (0..37).map(|i| i * 3 - 50).collect();
    let bytes: Vec<u8> = (0..13).collect(); // not a multiple of 4
    for dev in common::devices() {
        let t = Tensor::from_slice(&data, [10, 100], &dev).unwrap();
        assert_eq!(t.device(), dev);
        assert_eq!(t.to_vec::<f32>().unwrap(), data, "f32 on {dev}");
        let back = t.to_device(&Device::Cpu).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), data);
        let i = Tensor::from_slice(&ids, [37], &dev).unwrap();
        assert_eq!(i.to_vec::<i32>().unwrap(), ids, "i32 on {dev}");
        let u = Tensor::from_slice(&bytes, [13], &dev).unwrap();
        assert_eq!(u.to_vec::<u8>().unwrap(), bytes, "u8 on {dev}");
        let z = Tensor::zeros([3, 5], DType::BF16, &dev).unwrap();
        assert_eq!(z.to_vec_f32().unwrap(), vec![0.0; 15]);
    }
}

#[test]
fn read_later_sees_the_values_of_when_it_was_queued() {
    // The copy is queued at once: the tensor's buffer going back to the pool and being
    // rewritten by new tensors and kernels before `wait` must not change what it returns.
    let a: Vec<f32> = (0..777).map(|i| i as f32 * 0.25 - 3.0).collect();
    for dev in common::devices() {
        for dtype in [DType::F32, DType::BF16] {
            let t = Tensor::from_slice(&a, [777], &dev).unwrap().to_dtype(dtype).unwrap();
            let want = t.to_vec_f32().unwrap();
            let pending = t.read_later().unwrap();
            drop(t);
            let others: Vec<Tensor> = (0..4).map(|k| Tensor::from_slice(&vec![k as f32; 777], [777], &dev).unwrap().to_dtype(dtype).unwrap()).collect();
            let sums: Vec<Tensor> = (0..4).map(|k| {
                let o = Tensor::from_slice(&vec![k as f32; 777], [777], &dev).unwrap();
                ops::add(&o, &o).unwrap()
            }).collect();
            assert_eq!(pending.wait().unwrap(), want, "{dtype:?} on {dev}");
            assert_eq!(others[3].to_vec_f32().unwrap(), vec![3.0; 777]);
            assert_eq!(sums[3].to_vec_f32().unwrap(), vec![6.0; 777]);
        }
        // Three bf16 values: 6 bytes, not a multiple of 4.
        let t = Tensor::from_slice(&a[..3], [3], &dev).unwrap().to_dtype(DType::BF16).unwrap();
        assert_eq!(t.read_later().unwrap().wait().unwrap(), t.to_vec_f32().unwrap(), "3 bf16 values on {dev}");
        // Token ids (generation reads each pick one step behind): i32 values, read as i32 only.
        let ids = Tensor::from_slice(&[7i32, -2, 128_255], [3], &dev).unwrap();
        assert_eq!(ids.read_later().unwrap().wait_i32().unwrap(), vec![7, -2, 128_255], "i32 on {dev}");
        let e = ids.read_later().unwrap().wait().expect_err("an i32 tensor has no float values");
        assert!(e.to_string().contains("to_vec_f32"), "{e}");
        let e = t.read_later().unwrap().wait_i32().expect_err("bf16 values are not ids");
        assert!(e.to_string().contains("wait_i32"), "{e}");
    }
}

#[test]
fn dtype_conversion_rounds_to_nearest() {
    let t = Tensor::from_slice(&[1.0f32, 1.0 + 1.0 / 256.0, 5.4321], [3], &Device::Cpu).unwrap();
    let b = t.to_dtype(DType::BF16).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let v = b.to_vec_f32().unwrap();
    assert_eq!(v[0], 1.0);
    // 1 + 2^-8 is halfway between two bf16 values (spacing 2^-7): ties go to even, i.e. 1.0.
    assert_eq!(v[1], 1.0);
    assert!((v[2] - 5.4321).abs() < 0.01);
    assert!(t.to_dtype(DType::I32).is_err());
}

#[test]
fn errors_name_both_sides() {
    let a = Tensor::zeros([2, 3], DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros([4, 5], DType::F32, &Device::Cpu).unwrap();
    let e = ops::matmul(&a, &b, false, false).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4, 5]"), "{e}");

    let c = Tensor::zeros([2, 3], DType::BF16, &Device::Cpu).unwrap();
    let e = ops::add(&a, &c).unwrap_err().to_string();
    assert!(e.contains("f32") && e.contains("bf16"), "{e}");

    let e = Tensor::from_slice(&[1.0f32; 5], [2, 3], &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains('5'), "{e}");

    let ids = Tensor::from_slice(&[0i32, 7, 2], [3], &Device::Cpu).unwrap();
    let table = Tensor::zeros([5, 2], DType::F32, &Device::Cpu).unwrap();
    let e = ops::embedding(&ids, &table).unwrap_err().to_string();
    assert!(e.contains("index 7") && e.contains("position 1") && e.contains("0..5"), "{e}");

    let logits = Tensor::zeros([2, 4], DType::F32, &Device::Cpu).unwrap();
    let targets = Tensor::from_slice(&[1i32, 4], [2], &Device::Cpu).unwrap();
    let e = ops::cross_entropy(&logits, &targets, -100).unwrap_err().to_string();
    assert!(e.contains("index 4") && e.contains("position 1"), "{e}");

    let w = Tensor::zeros([4], DType::F32, &Device::Cpu).unwrap();
    let e = ops::rmsnorm(&a, &w, 1e-5).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4]"), "{e}");

    assert!("gpu:1".parse::<Device>().unwrap_err().to_string().contains("gpu:1"));
    assert_eq!("wgpu:2".parse::<Device>().unwrap(), Device::Wgpu(2));
}

#[test]
fn device_mismatch_names_both_devices() {
    let Some(gpu) = common::devices().into_iter().find(|d| *d != Device::Cpu) else {
        return; // only the CPU here: nothing to mismatch (CI has lavapipe and runs this)
    };
    let a = Tensor::zeros([4], DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros([4], DType::F32, &gpu).unwrap();
    let e = ops::rmsnorm(&a, &b, 1e-5).unwrap_err().to_string();
    assert!(e.contains("cpu") && e.contains(&gpu.to_string()), "{e}");
}

#[test]
fn copy_gives_independent_storage_on_the_same_device() {
    let data: Vec<f32> = (0..77).map(|i| i as f32).collect();
    for dev in common::devices() {
        let t = Tensor::from_slice(&data, [7, 11], &dev).unwrap();
        let c = t.copy().unwrap();
        assert_eq!(c.device(), dev);
        assert_ne!(c.id(), t.id());
        assert_eq!(c.to_vec::<f32>().unwrap(), data, "copy on {dev}");
    }
}


#[test]
fn wgpu_uniforms_are_made_once_per_contents() {
    use tuna::device::wgpu::uniform;
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let device = &tuna::device::wgpu::runtime(i).unwrap().device;
        // Contents no other test passes, so the cache is not started over between the calls.
        let a = uniform(device, &[0x7475_6e61u32, 1, 2, 3]);
        assert_eq!(a, uniform(device, &[0x7475_6e61u32, 1, 2, 3]), "the same bytes: one buffer on {dev}");
        assert_ne!(a, uniform(device, &[0x7475_6e61u32, 1, 2, 4]), "other bytes: another buffer on {dev}");
        assert_ne!(a, uniform(device, &[0x7475_6e61u32, 1, 2]), "fewer bytes: another buffer on {dev}");
        assert_eq!(a.size(), 16);
        // A kernel reads what was given (the cached buffer serves a second dispatch).
        let x = Tensor::from_slice(&[1.0f32, -2.0, 3.5], [3], &dev).unwrap();
        for _ in 0..2 {
            assert_eq!(ops::add(&x, &x).unwrap().to_vec_f32().unwrap(), vec![2.0, -4.0, 7.0]);
        }
    }
}

#[test]
fn wgpu_batched_launches_keep_their_order() {
    use tuna::device::wgpu::{is_batched, runtime, BATCH};
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let rt = runtime(i).unwrap();
        assert!(is_batched(&rt.device), "tuna's own device wgpu:{i} batches its launches");
        // A launch reads `a`, which is then dropped: its pooled buffer is given out again and
        // filled by an upload (a `write_buffer`) while the launch may still wait in the batch.
        // The upload must land after the launch, not before it.
        let n = 300;
        let ones = Tensor::from_slice(&vec![1.0f32; n], [n], &dev).unwrap();
        let a = Tensor::from_slice(&vec![2.0f32; n], [n], &dev).unwrap();
        let sum = ops::add(&a, &ones).unwrap();
        drop(a);
        let b = Tensor::from_slice(&vec![-7.0f32; n], [n], &dev).unwrap();
        assert_eq!(sum.to_vec_f32().unwrap(), vec![3.0; n], "a launch saw a later upload into a reused buffer on {dev}");
        assert_eq!(b.to_vec_f32().unwrap(), vec![-7.0; n]);
        // A copy (a command buffer of its own) after a launch it reads from.
        let copied = ops::add(&sum, &ones).unwrap().copy().unwrap();
        assert_eq!(copied.to_vec_f32().unwrap(), vec![4.0; n], "a copy ran ahead of the launch it copies on {dev}");
        // A chain longer than a batch: every launch, across the submits, in order.
        let mut y = ones.clone();
        for _ in 0..2 * BATCH + 3 {
            y = ops::add(&y, &ones).unwrap();
        }
        assert_eq!(y.to_vec_f32().unwrap(), vec![(2 * BATCH + 4) as f32; n], "a chain of adds on {dev}");
    }
}

#[test]
fn wgpu_launches_on_a_programs_own_device_are_submitted_at_once() {
    use tuna::device::wgpu::{is_batched, runtime, KernelCache};
    use tuna::kernels::rmsnorm::{wgsl, RmsNormParams};
    use wgpu::util::DeviceExt;
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let adapter = &runtime(i).unwrap().adapter;
        let desc = wgpu::DeviceDescriptor { required_limits: adapter.limits(), ..Default::default() };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).unwrap();
        assert!(!is_batched(&device), "a program's own device on {dev} is not batched");
        // The program's own submit, right after the launch, reads what the launch wrote.
        let (rows, cols) = (3, 64);
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffer = |v: &[f32]| device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytemuck::cast_slice(v), usage });
        let (x, w) = (buffer(&vec![2.0; rows * cols]), buffer(&vec![1.5; cols]));
        let (y, rstd) = (buffer(&vec![0.0; rows * cols]), buffer(&vec![0.0; rows]));
        let p = RmsNormParams { rows, cols, eps: 0.0 };
        wgsl::forward(&device, &queue, &KernelCache::new(), &x, &w, &y, &rstd, p, wgsl::Precision::F32).unwrap();
        let staging = device.create_buffer(&wgpu::BufferDescriptor { label: None, size: y.size(), usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
        let mut enc = device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&y, 0, &staging, 0, y.size());
        queue.submit([enc.finish()]);
        staging.slice(..).map_async(wgpu::MapMode::Read, |r| r.unwrap());
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&staging.slice(..).get_mapped_range().unwrap());
        // x / rms(x) · w = 2 / 2 · 1.5.
        assert_eq!(got, vec![1.5; rows * cols], "the launch had not reached the queue on {dev}'s own device");
    }
}

#[test]
fn wgpu_bind_groups_are_kept_until_their_buffers_are_released() {
    use tuna::device::wgpu::binds::{bind_group, fresh_bind_group, holds};
    use tuna::device::wgpu::{dispatch_bound, runtime, uniform};
    const SHADER: &str = "
@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<uniform> n: vec4<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    if g.x < n.x { x[g.x] = x[g.x] * 2.0; }
}";
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let rt = runtime(i).unwrap();
        let pipe = rt.kernels.pipeline(&rt.device, "test_bind_groups", SHADER, "main").unwrap();
        let n = uniform(&rt.device, &[64u32, 0, 0, 0]);
        // Buffers of a size class no other test here uses (2 MiB), more than the pool keeps.
        let bufs: Vec<_> = (0..12).map(|_| rt.alloc(2 << 20)).collect();
        let handles: Vec<wgpu::Buffer> = bufs.iter().map(|b| b.buffer().clone()).collect();
        for b in &bufs {
            dispatch_bound(&rt.device, &rt.queue, &pipe, &[(0, b.buffer()), (1, &n)], (1, 1, 1));
        }
        let first = [(0, bufs[0].buffer()), (1, &n)];
        assert_eq!(bind_group(&rt.device, &pipe, &first), bind_group(&rt.device, &pipe, &first), "made once on {dev}");
        assert_ne!(bind_group(&rt.device, &pipe, &first), fresh_bind_group(&rt.device, &pipe, &first), "a fresh one differs");
        assert!(handles.iter().all(holds), "every dispatch's bind group is kept on {dev}");
        rt.synchronize().unwrap();
        // The pool keeps some of them for reuse (their bind groups stay) and releases the rest,
        // whose bind groups must go with them.
        drop(bufs);
        let released = handles.iter().filter(|b| !holds(b)).count();
        assert!(released >= 12 - 8, "{released} of 12 buffers let go on {dev}: kept bind groups hold released buffers");
    }
}

#[test]
fn wgpu_launchers_make_their_temporaries_on_a_programs_own_device() {
    use tuna::device::wgpu::{download, runtime, KernelCache, Precision};
    use tuna::kernels::attention::{wgsl, AttentionParams};
    use wgpu::util::DeviceExt;
    for dev in common::devices() {
        let Device::Wgpu(i) = dev else { continue };
        let rt = runtime(i).unwrap();
        let desc = wgpu::DeviceDescriptor { required_limits: rt.adapter.limits(), ..Default::default() };
        let (device, queue) = pollster::block_on(rt.adapter.request_device(&desc)).unwrap();
        // Split-KV decoding: scratch for the chunks' outputs and statistics, and a stand-in for
        // the absent packing starts. Tuna's own device (pool, kept stand-in) is the reference:
        // the same shader on the same adapter gives the same bits.
        let p = AttentionParams { batch: 1, q_len: 1, kv_len: 300, heads: 4, kv_heads: 2, head_dim: 32, causal: true, window: None, scale: 0.2 };
        let mut rng = tuna::testing::Rng::new(9);
        let (q, k, v) = (rng.vec(4 * 32, -1.0, 1.0), rng.vec(300 * 2 * 32, -1.0, 1.0), rng.vec(300 * 2 * 32, -1.0, 1.0));
        let run = |device: &wgpu::Device, queue: &wgpu::Queue| -> Vec<f32> {
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let buffer = |v: &[f32]| device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytemuck::cast_slice(v), usage });
            let (qb, kb, vb) = (buffer(&q), buffer(&k), buffer(&v));
            let (o, stats) = (buffer(&[0.0; 4 * 32]), buffer(&[0.0; 4 * 2]));
            wgsl::forward(wgsl::FwdKernel::SplitKv, device, queue, &KernelCache::new(), &qb, &kb, &vb, None, &o, &stats, &p, Precision::F32).unwrap();
            bytemuck::pod_collect_to_vec(&download(device, queue, &o, 4 * 32 * 4).unwrap())
        };
        let (own, tunas) = (run(&device, &queue), run(&rt.device, &rt.queue));
        assert!(own.iter().any(|&x| x != 0.0), "split-KV wrote nothing on {dev}'s own device");
        assert_eq!(own, tunas, "split-KV on a program's own device against tuna's on {dev}");
    }
}
