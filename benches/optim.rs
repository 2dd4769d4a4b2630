//! Optimizer-step benchmarks (criterion): dense SM3 and AdamW steps, memory-bound, reported as
//! bytes of memory traffic per second beside a plain copy of a parameter buffer (the peer,
//! measured in the same run). Bytes counted per parameter (f32): SM3 with momentum reads w, g,
//! m and writes w, m (20 B; the [R] + [C] accumulators are counted too); AdamW reads w, g, m, v
//! and writes w, m, v (28 B); the copy reads and writes 4 B.
//!
//!   cargo bench --bench optim                 # every device present
//!   cargo bench --bench optim -- optim/cpu    # one group
//!
//! Sizes: 1M, 4M, 16M and 50M parameters on the CPU and CUDA; 1M on wgpu (lavapipe runs the
//! shaders on the CPU). On a GPU machine without Rust, `tools/gpu-check` runs the CUDA bench.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use tuna::kernels::optim::{cpu, AdamWParams, Sm3Params};
use tuna::testing::Rng;
use tuna::Device;

const COLS: usize = 4096;

fn sm3_params() -> Sm3Params {
    Sm3Params { lr: 1e-3, eps: 1e-8, beta1: 0.9, weight_decay: 0.01, grad_scale: 1.0 }
}

fn adamw_params() -> AdamWParams {
    AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 10, grad_scale: 1.0 }
}

/// Bytes moved by one step over an `[rows, COLS]` matrix: see the module doc.
fn sm3_bytes(rows: usize) -> u64 {
    (20 * rows * COLS + 8 * (rows + COLS)) as u64
}

fn adamw_bytes(n: usize) -> u64 {
    (28 * n) as u64
}

fn sizes(dev: Device) -> &'static [usize] {
    match dev {
        Device::Wgpu(_) => &[1 << 20],
        _ => &[1 << 20, 4 << 20, 16 << 20, 50 << 20],
    }
}

fn optim(c: &mut Criterion) {
    for info in Device::available() {
        let dev = info.device;
        let mut g = c.benchmark_group(format!("optim/{dev}"));
        g.sample_size(10);
        for &n in sizes(dev) {
            let rows = n / COLS;
            let id = format!("{}M", n >> 20);
            let mut rng = Rng::new(3);
            let w = rng.vec(n, -1.0, 1.0);
            let grad = rng.vec(n, -1.0, 1.0);
            let r = match dev {
                Device::Cpu => bench_cpu(&mut g, &id, rows, &w, &grad),
                Device::Wgpu(i) => bench_wgpu(&mut g, i, &id, rows, &w, &grad),
                Device::Cuda(i) => bench_cuda(&mut g, i, &id, rows, &w, &grad),
            };
            if let Err(e) = r {
                eprintln!("optim/{dev} {id}: {e}");
            }
        }
        g.finish();
    }
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn bench_cpu(g: &mut Group<'_>, id: &str, rows: usize, w: &[f32], grad: &[f32]) -> tuna::Result<()> {
    let n = rows * COLS;
    let mut dst = vec![0.0f32; n];
    g.throughput(Throughput::Bytes((8 * n) as u64));
    // The peer copies with the same threads the steps use (rayon), so the ratio compares like
    // with like.
    g.bench_function(BenchmarkId::new("copy (peer)", id), |b| {
        b.iter(|| dst.par_chunks_mut(1 << 16).zip(w.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s)))
    });
    let (mut w1, mut r, mut c, mut m) = (w.to_vec(), vec![0.0f32; rows], vec![0.0f32; COLS], vec![0.0f32; n]);
    g.throughput(Throughput::Bytes(sm3_bytes(rows)));
    g.bench_function(BenchmarkId::new("sm3 f32 momentum", id), |b| {
        b.iter(|| cpu::sm3(&mut w1, grad, &mut r, &mut c, Some(&mut m), rows, COLS, sm3_params()).unwrap())
    });
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    g.throughput(Throughput::Bytes(adamw_bytes(n)));
    g.bench_function(BenchmarkId::new("adamw f32", id), |b| {
        b.iter(|| cpu::adamw(&mut w1, grad, &mut m, &mut v, adamw_params()).unwrap())
    });
    Ok(())
}

fn bench_wgpu(g: &mut Group<'_>, i: usize, id: &str, rows: usize, w: &[f32], grad: &[f32]) -> tuna::Result<()> {
    use tuna::kernels::optim::wgsl;
    let rt = tuna::device::wgpu::runtime(i)?;
    let (dev, q, k) = (&rt.device, &rt.queue, &rt.kernels);
    let n = rows * COLS;
    let wb = rt.upload(bytemuck::cast_slice(w));
    let gb = rt.upload(bytemuck::cast_slice(grad));
    let dst = rt.alloc(n * 4);
    let (r, c, r2, c2, m, v) =
        (rt.alloc_zeros(rows * 4), rt.alloc_zeros(COLS * 4), rt.alloc(rows * 4), rt.alloc(COLS * 4), rt.alloc_zeros(n * 4), rt.alloc_zeros(n * 4));
    g.throughput(Throughput::Bytes((8 * n) as u64));
    g.bench_function(BenchmarkId::new("copy (peer)", id), |b| {
        b.iter(|| {
            let mut enc = dev.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(wb.buffer(), 0, dst.buffer(), 0, (n * 4) as u64);
            q.submit([enc.finish()]);
            rt.synchronize().unwrap();
        })
    });
    g.throughput(Throughput::Bytes(sm3_bytes(rows)));
    g.bench_function(BenchmarkId::new("sm3 f32 momentum", id), |b| {
        b.iter(|| {
            let (wb, gb) = (wb.buffer(), gb.buffer());
            wgsl::sm3(dev, q, k, wb, gb, r.buffer(), c.buffer(), r2.buffer(), c2.buffer(), Some(m.buffer()), rows, COLS, sm3_params(), None).unwrap();
            rt.synchronize().unwrap();
        })
    });
    g.throughput(Throughput::Bytes(adamw_bytes(n)));
    g.bench_function(BenchmarkId::new("adamw f32", id), |b| {
        b.iter(|| {
            wgsl::adamw(dev, q, k, wb.buffer(), gb.buffer(), m.buffer(), v.buffer(), n, adamw_params(), None).unwrap();
            rt.synchronize().unwrap();
        })
    });
    Ok(())
}

fn bench_cuda(g: &mut Group<'_>, i: usize, id: &str, rows: usize, w: &[f32], grad: &[f32]) -> tuna::Result<()> {
    use tuna::kernels::optim::cuda;
    let rt = tuna::device::cuda::runtime(i)?;
    let s = &rt.stream;
    let err = |e: cudarc::driver::DriverError| tuna::Error::Cuda { context: "optim bench".into(), message: format!("{e:?}") };
    let n = rows * COLS;
    let mut wd = s.clone_htod(w).map_err(err)?;
    let gd = s.clone_htod(grad).map_err(err)?;
    let mut dst = s.alloc_zeros::<f32>(n).map_err(err)?;
    let (r, c) = (s.alloc_zeros::<f32>(rows).map_err(err)?, s.alloc_zeros::<f32>(COLS).map_err(err)?);
    let (mut r2, mut c2) = (s.alloc_zeros::<f32>(rows).map_err(err)?, s.alloc_zeros::<f32>(COLS).map_err(err)?);
    let (mut m, mut v) = (s.alloc_zeros::<f32>(n).map_err(err)?, s.alloc_zeros::<f32>(n).map_err(err)?);
    g.throughput(Throughput::Bytes((8 * n) as u64));
    g.bench_function(BenchmarkId::new("copy (peer)", id), |b| {
        b.iter(|| {
            s.memcpy_dtod(&wd, &mut dst).unwrap();
            rt.synchronize().unwrap();
        })
    });
    g.throughput(Throughput::Bytes(sm3_bytes(rows)));
    g.bench_function(BenchmarkId::new("sm3 f32 momentum", id), |b| {
        b.iter(|| {
            let mut mv = m.slice_mut(..);
            cuda::sm3::<f32>(
                s,
                &rt.modules,
                &mut wd.slice_mut(..),
                &gd.slice(..),
                None,
                &r.slice(..),
                &c.slice(..),
                &mut r2.slice_mut(..),
                &mut c2.slice_mut(..),
                Some(&mut mv),
                rows,
                COLS,
                sm3_params(),
                None,
            )
            .unwrap();
            rt.synchronize().unwrap();
        })
    });
    g.throughput(Throughput::Bytes(adamw_bytes(n)));
    g.bench_function(BenchmarkId::new("adamw f32", id), |b| {
        b.iter(|| {
            let (mut wv, mut mv, mut vv) = (wd.slice_mut(..), m.slice_mut(..), v.slice_mut(..));
            cuda::adamw::<f32>(s, &rt.modules, &mut wv, &gd.slice(..), None, &mut mv, &mut vv, adamw_params(), None).unwrap();
            rt.synchronize().unwrap();
        })
    });
    Ok(())
}

criterion_group!(benches, optim);
criterion_main!(benches);
