//! Kernel micro-benchmarks (criterion). Each group puts a kernel beside a named peer measured
//! in the same run: for the memory-bound RMSNorm the peer is a plain copy of the same bytes on
//! the same device (the bandwidth ceiling); for the CPU matmul it is the naive triple loop
//! (the f64 reference), to show what the `gemm` crate buys. Throughput is bytes (GB/s) or, for
//! matmul, elements = FLOP (so "elem/s" reads as FLOP/s).
//!
//!   cargo bench --bench kernels                # all devices present
//!   cargo bench --bench kernels -- rmsnorm/cpu # one group
//!
//! On a GPU machine without Rust, `tools/gpu-check` runs the CUDA benchmarks instead (with
//! PyTorch's SDPA and cuBLAS beside them).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tuna::kernels::matmul::{self, MatmulParams};
use tuna::kernels::rmsnorm::RmsNormParams;
use tuna::testing::Rng;
use tuna::{ops, Device, Tensor};

fn rmsnorm(c: &mut Criterion) {
    for info in Device::available() {
        let dev = info.device;
        // lavapipe runs GPU kernels on the CPU: keep its shapes small.
        let shapes: &[(usize, usize)] = match dev {
            Device::Wgpu(_) => &[(256, 1024)],
            _ => &[(2048, 2048), (512, 4096)],
        };
        let mut g = c.benchmark_group(format!("rmsnorm/{dev}"));
        g.sample_size(20);
        for &(m, n) in shapes {
            let p = RmsNormParams { rows: m, cols: n, eps: 1e-5 };
            let mut rng = Rng::new(1);
            let x = Tensor::from_slice(&rng.vec(m * n, -1.0, 1.0), [m, n], &dev).unwrap();
            let w = Tensor::from_slice(&rng.vec(n, 0.5, 1.5), [n], &dev).unwrap();
            let dy = Tensor::from_slice(&rng.vec(m * n, -1.0, 1.0), [m, n], &dev).unwrap();
            let id = format!("{m}x{n}");
            g.throughput(Throughput::Bytes((2 * m * n * 4) as u64));
            g.bench_function(BenchmarkId::new("copy (peer)", &id), |b| {
                b.iter(|| {
                    let y = x.copy().unwrap();
                    dev.synchronize().unwrap();
                    std::hint::black_box(y);
                })
            });
            g.bench_function(BenchmarkId::new("forward", &id), |b| {
                b.iter(|| {
                    let out = ops::rmsnorm_forward(&x, &w, p.eps).unwrap();
                    dev.synchronize().unwrap();
                    std::hint::black_box(out.y);
                })
            });
            let out = ops::rmsnorm_forward(&x, &w, p.eps).unwrap();
            g.throughput(Throughput::Bytes((5 * m * n * 4) as u64));
            g.bench_function(BenchmarkId::new("backward", &id), |b| {
                b.iter(|| {
                    let r = ops::rmsnorm_backward(&x, &w, &dy, &out.rstd).unwrap();
                    dev.synchronize().unwrap();
                    std::hint::black_box(r);
                })
            });
        }
        g.finish();
    }
}

fn matmul_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul/cpu");
    g.sample_size(10);
    for &(m, n, k) in &[(128, 128, 128), (512, 512, 512), (512, 1376, 512), (32, 1536, 576), (512, 1536, 576), (2048, 1536, 576)] {
        let mut rng = Rng::new(2);
        let a = rng.vec(m * k, -1.0, 1.0);
        let bm = rng.vec(k * n, -1.0, 1.0);
        let p = MatmulParams { m, n, k, trans_a: false, trans_b: true };
        let id = format!("{m}x{n}x{k}");
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let mut out = vec![0.0f32; m * n];
        g.bench_function(BenchmarkId::new("gemm crate", &id), |b| {
            b.iter(|| matmul::cpu::matmul(&a, &bm, &mut out, p).unwrap())
        });
        // x·Wᵀ read from W's transpose stored row-major (the model's cached layout), alone and
        // with the transpose made in the same call.
        let p_t = MatmulParams { trans_b: false, ..p };
        g.bench_function(BenchmarkId::new("gemm crate, Wt stored", &id), |b| {
            b.iter(|| matmul::cpu::matmul(&a, &bm, &mut out, p_t).unwrap())
        });
        g.bench_function(BenchmarkId::new("gemm crate, Wt made first", &id), |b| {
            b.iter(|| matmul::cpu::matmul(&a, &matmul::cpu::transpose(&bm, n, k), &mut out, p_t).unwrap())
        });
        if m * n * k <= 128 * 128 * 128 {
            let (a64, b64): (Vec<f64>, Vec<f64>) = (a.iter().map(|&v| v as f64).collect(), bm.iter().map(|&v| v as f64).collect());
            g.bench_function(BenchmarkId::new("naive loops (peer)", &id), |b| {
                b.iter(|| std::hint::black_box(matmul::reference::matmul(&a64, &b64, p)))
            });
        }
    }
    g.finish();
}

/// One row times a weight (decoding one token): tuna's `gemv` (through `matmul::cpu::matmul`,
/// split over the threads by columns) beside the `gemm` crate's own product on the same
/// operands, threaded as it was before `gemv`. Both read the weight once, so the figure that
/// matters is bytes per second (the throughput here is B's bytes).
fn gemv_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv/cpu");
    g.sample_size(20);
    for &(n, k) in &[(1536, 576), (4096, 4096), (14336, 4096)] {
        let mut rng = Rng::new(3);
        let a = rng.vec(k, -1.0, 1.0);
        let w = rng.vec(k * n, -1.0, 1.0);
        g.throughput(Throughput::Bytes((4 * n * k) as u64));
        let mut out = vec![0.0f32; n];
        // W [N, K] read by rows (trans_b), and its transpose [K, N] (the model's cached layout).
        for trans_b in [true, false] {
            let id = format!("N{n} K{k} {}", if trans_b { "W[N,K]" } else { "Wt[K,N]" });
            let p = MatmulParams { m: 1, n, k, trans_a: false, trans_b };
            g.bench_function(BenchmarkId::new("tuna gemv", &id), |b| b.iter(|| matmul::cpu::matmul(&a, &w, &mut out, p).unwrap()));
            if trans_b {
                // The same weight kept in bf16 (`Llama::matrices_in_bf16`): half the bytes, so
                // at the same bytes per second twice the f32 rows.
                let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
                g.bench_function(BenchmarkId::new("tuna gemv bf16 (f32 bytes)", &id), |b| b.iter(|| matmul::cpu::xwt_bf16(&a, &wb, 1, n, k).unwrap()));
            }
            let (rs, cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
            g.bench_function(BenchmarkId::new("gemm crate (peer)", &id), |b| {
                b.iter(|| unsafe {
                    // SAFETY: a holds K, w K·N and out N elements, as the strides address them.
                    gemm::gemm(1, n, k, out.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, w.as_ptr(), cs, rs, 0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(0))
                })
            });
        }
    }
    // Decoding streams every layer's weights once a token, from memory: 48 weights of a small
    // model's MLP shape (170 MB, past any L3), one after another.
    let (n, k, count) = (1536, 576, 48);
    let mut rng = Rng::new(5);
    let a = rng.vec(k, -1.0, 1.0);
    let ws: Vec<Vec<f32>> = (0..count).map(|_| rng.vec(k * n, -1.0, 1.0)).collect();
    let mut out = vec![0.0f32; n];
    g.throughput(Throughput::Bytes((4 * n * k * count) as u64));
    let p = MatmulParams { m: 1, n, k, trans_a: false, trans_b: true };
    g.bench_function(BenchmarkId::new("tuna gemv", format!("N{n} K{k} W[N,K] x{count} from memory")), |b| {
        b.iter(|| ws.iter().for_each(|w| matmul::cpu::matmul(&a, w, &mut out, p).unwrap()))
    });
    let wbs: Vec<Vec<half::bf16>> = ws.iter().map(|w| w.iter().map(|&v| half::bf16::from_f32(v)).collect()).collect();
    g.bench_function(BenchmarkId::new("tuna gemv bf16 (f32 bytes)", format!("N{n} K{k} W[N,K] x{count} from memory")), |b| {
        b.iter(|| wbs.iter().for_each(|w| drop(matmul::cpu::xwt_bf16(&a, w, 1, n, k).unwrap())))
    });
    // The floor: the same bytes summed on all threads, 16 lanes (a read of memory and no more).
    g.bench_function(BenchmarkId::new("read the bytes (floor)", format!("N{n} K{k} x{count} from memory")), |b| {
        use rayon::prelude::*;
        b.iter(|| {
            ws.iter()
                .map(|w| {
                    w.par_chunks(16 << 10)
                        .map(|c| {
                            let mut l = [0.0f32; 16];
                            c.chunks_exact(16).for_each(|v| l.iter_mut().zip(v).for_each(|(s, x)| *s += x));
                            l.iter().sum::<f32>()
                        })
                        .sum::<f32>()
                })
                .sum::<f32>()
        })
    });
    g.finish();
}

/// The CPU transpose (`matmul::cpu::transpose`: the frozen weights' cached `Wᵀ`, the SDDMM's
/// operands) beside a parallel copy of the same bytes.
fn transpose_cpu(c: &mut Criterion) {
    use rayon::prelude::*;
    let mut g = c.benchmark_group("transpose/cpu");
    g.sample_size(20);
    for &(rows, cols) in &[(4096, 4096), (2048, 1024), (512, 1376), (1536, 576)] {
        let a = Rng::new(4).vec(rows * cols, -1.0, 1.0);
        let id = format!("{rows}x{cols}");
        // Read once, written once.
        g.throughput(Throughput::Bytes((8 * rows * cols) as u64));
        g.bench_function(BenchmarkId::new("transpose", &id), |b| b.iter(|| std::hint::black_box(matmul::cpu::transpose(&a, rows, cols))));
        g.bench_function(BenchmarkId::new("copy (peer)", &id), |b| {
            b.iter(|| {
                let mut out = vec![0.0f32; rows * cols];
                out.par_chunks_mut(1 << 14).zip(a.par_chunks(1 << 14)).for_each(|(o, i)| o.copy_from_slice(i));
                std::hint::black_box(out)
            })
        });
    }
    g.finish();
}

/// Sparse fine-tuning's dδ on the CPU: tuna's SDDMM (`kernels::sparse::cpu::sddmm`: dy and x
/// transposed once, then one dot product over the tokens per active entry) beside the dense
/// route the GPUs take (the `gemm` crate's `dW = dyᵀ·x`, then a gather at the indices), at 1%,
/// 5%, 8% and 10% density. Throughput counts the active entries (elem/s = entries per second).
fn sparse_cpu(c: &mut Criterion) {
    use tuna::kernels::sparse::{cpu, SparseParams};
    let mut g = c.benchmark_group("sparse_ddelta/cpu");
    g.sample_size(10);
    for &(m, n, k) in &[(512, 1024, 1024), (2048, 1024, 1024)] {
        for density in [0.01, 0.05, 0.08, 0.1] {
            let mut rng = Rng::new(5);
            let (dy, x) = (rng.vec(m * n, -1.0, 1.0), rng.vec(m * k, -1.0, 1.0));
            let nnz = ((n * k) as f64 * density) as usize;
            let idx = tuna::peft::sparse::random_indices(n * k, nnz, &mut Rng::new(6));
            let p = SparseParams { m, n, k };
            let id = format!("m{m} {n}x{k} density {density}");
            g.throughput(Throughput::Elements(nnz as u64));
            g.bench_function(BenchmarkId::new("sddmm", &id), |b| b.iter(|| std::hint::black_box(cpu::sddmm(&dy, &x, &idx, p))));
            let mp = MatmulParams { m: n, n: k, k: m, trans_a: true, trans_b: false };
            g.bench_function(BenchmarkId::new("dense dW + gather (peer)", &id), |b| {
                b.iter(|| {
                    let dw = matmul::cpu::matmul_new(&dy, &x, mp).unwrap();
                    std::hint::black_box(idx.iter().map(|&e| dw[e as usize]).collect::<Vec<f32>>())
                })
            });
        }
    }
    g.finish();
}

/// CPU attention (blocks of 64 queries), forward and backward, in FlashAttention's FLOP count
/// (forward `4·B·T²·D·H`, halved when causal; backward 2.5× forward), so "elem/s" reads as
/// FLOP/s. Peer: the `gemm` crate on one `[T, D]·[D, T]` score product per head (the forward's
/// first GEMM alone), the ceiling the blocked form works towards.
fn attention_cpu(c: &mut Criterion) {
    use rayon::prelude::*;
    use tuna::kernels::attention::{cpu, AttentionParams};
    let mut g = c.benchmark_group("attention/cpu");
    g.sample_size(10);
    // (T, D, causal, key/value heads): 8 query heads, and one grouped-query row (Llama's 4:1).
    for &(t, d, causal, kvh) in &[(512, 64, true, 8), (512, 64, false, 8), (1024, 64, true, 8), (2048, 64, true, 8), (1024, 128, true, 8), (2048, 64, true, 2)] {
        let (b, h) = (1, 8);
        let p = AttentionParams { batch: b, q_len: t, kv_len: t, heads: h, kv_heads: kvh, head_dim: d, causal, window: None, scale: 1.0 / (d as f32).sqrt() };
        let mut rng = Rng::new(3);
        let (q, k, v, dout) = (rng.vec(b * t * h * d, -1.0, 1.0), rng.vec(b * t * kvh * d, -1.0, 1.0), rng.vec(b * t * kvh * d, -1.0, 1.0), rng.vec(b * t * h * d, -1.0, 1.0));
        let fwd_flops = 4 * b * t * t * d * h / if causal { 2 } else { 1 };
        let id = format!("T{t}-D{d}-{}{}", if causal { "causal" } else { "full" }, if kvh < h { format!("-G{kvh}") } else { String::new() });
        let mut o = vec![0.0f32; q.len()];
        g.throughput(Throughput::Elements(fwd_flops as u64));
        g.bench_function(BenchmarkId::new("forward", &id), |bch| bch.iter(|| cpu::forward(&q, &k, &v, &mut o, &p, None)));
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
        g.throughput(Throughput::Elements((fwd_flops as f64 * 2.5) as u64));
        g.bench_function(BenchmarkId::new("backward", &id), |bch| bch.iter(|| cpu::backward(&q, &k, &v, &dout, &mut dq, &mut dk, &mut dv, &p, None)));
        if causal && kvh == h {
            let qt = rng.vec(t * d, -1.0, 1.0);
            let mut s = vec![0.0f32; t * t];
            let mp = MatmulParams { m: t, n: t, k: d, trans_a: false, trans_b: true };
            g.throughput(Throughput::Elements((2 * t * t * d) as u64));
            g.bench_function(BenchmarkId::new("score GEMM, one head (peer)", &id), |bch| bch.iter(|| matmul::cpu::matmul(&qt, &qt, &mut s, mp).unwrap()));
        }
    }
    // Decoding: one query row against a cache of S positions (the few-row path), Llama-3.2-1B's
    // heads (32 over 8 key/value heads, D 64), in bytes of K and V: each call reads them once.
    // Peer: the largest of the same bytes on every core (`math::max`, in the widest vectors),
    // the pass's floor.
    for &s in &[1024, 4096, 16384] {
        let (h, kvh, d) = (32, 8, 64);
        let p = AttentionParams { batch: 1, q_len: 1, kv_len: s, heads: h, kv_heads: kvh, head_dim: d, causal: true, window: None, scale: 0.125 };
        let mut rng = Rng::new(4);
        let (q, k, v) = (rng.vec(h * d, -1.0, 1.0), rng.vec(s * kvh * d, -1.0, 1.0), rng.vec(s * kvh * d, -1.0, 1.0));
        let mut o = vec![0.0f32; q.len()];
        let id = format!("S{s}-H{h}-G{kvh}-D{d}");
        g.throughput(Throughput::Bytes((8 * s * kvh * d) as u64));
        g.bench_function(BenchmarkId::new("decode", &id), |bch| bch.iter(|| cpu::forward(&q, &k, &v, &mut o, &p, None)));
        let max = |x: &[f32]| x.par_chunks(1 << 14).map(tuna::kernels::math::max).reduce(|| f32::NEG_INFINITY, f32::max);
        g.bench_function(BenchmarkId::new("decode: max of K and V (peer)", &id), |bch| bch.iter(|| std::hint::black_box(max(&k).max(max(&v)))));
    }
    g.finish();
}

/// Flash attention on each wgpu adapter, forward and backward, in FlashAttention's FLOP count,
/// beside the CPU path on the same shape (the peer this machine has). A software adapter
/// (lavapipe) gets T = 256 only; a hardware one T = 512 to 8k.
fn attention_wgpu(c: &mut Criterion) {
    use tuna::kernels::attention::{cpu, wgsl, AttentionParams};
    for info in Device::available() {
        let Device::Wgpu(i) = info.device else { continue };
        let rt = tuna::device::wgpu::runtime(i).unwrap();
        let software = info.name.to_lowercase().contains("llvmpipe");
        let lens: &[usize] = if software { &[256] } else { &[512, 1024, 2048, 4096, 8192] };
        let mut g = c.benchmark_group(format!("attention/wgpu:{i}"));
        g.sample_size(10);
        for &t in lens {
            let (b, h, d) = (1, 8, 64);
            let p = AttentionParams { batch: b, q_len: t, kv_len: t, heads: h, kv_heads: h, head_dim: d, causal: true, window: None, scale: 0.125 };
            let mut rng = Rng::new(4);
            let n = b * t * h * d;
            let host: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(n, -1.0, 1.0)).collect();
            let bufs: Vec<_> = host.iter().map(|x| rt.upload(bytemuck::cast_slice(x))).collect();
            let (o, stats) = (rt.alloc_zeros(n * 4), rt.alloc_zeros(b * t * h * 8));
            let (dq, dk, dv) = (rt.alloc_zeros(n * 4), rt.alloc_zeros(n * 4), rt.alloc_zeros(n * 4));
            let fwd_flops = (4 * b * t * t * d * h / 2) as u64;
            let id = format!("T{t}-D{d}-causal");
            g.throughput(Throughput::Elements(fwd_flops));
            let (q, k, v, dout) = (bufs[0].buffer(), bufs[1].buffer(), bufs[2].buffer(), bufs[3].buffer());
            g.bench_function(BenchmarkId::new("forward", &id), |bch| {
                bch.iter(|| {
                    wgsl::forward(wgsl::FwdKernel::Tiled, &rt.device, &rt.queue, &rt.kernels, q, k, v, None, o.buffer(), stats.buffer(), &p, wgsl::Precision::F32).unwrap();
                    rt.synchronize().unwrap();
                })
            });
            let mut out = vec![0.0f32; n];
            g.bench_function(BenchmarkId::new("forward, CPU (peer)", &id), |bch| bch.iter(|| cpu::forward(&host[0], &host[1], &host[2], &mut out, &p, None)));
            g.throughput(Throughput::Elements(fwd_flops * 5 / 2));
            g.bench_function(BenchmarkId::new("backward", &id), |bch| {
                bch.iter(|| {
                    wgsl::backward(&rt.device, &rt.queue, &rt.kernels, q, k, v, None, o.buffer(), dout, stats.buffer(), dq.buffer(), dk.buffer(), dv.buffer(), &p, wgsl::Precision::F32).unwrap();
                    rt.synchronize().unwrap();
                })
            });
        }
        g.finish();
        // Decoding: one query row of Llama-3-8B's heads (32 over 8) over a KV cache, the split-KV
        // forward against the tiled one. Lavapipe cuts an invocation's loops short after ~65k
        // iterations (see tests/attention_devices.rs), which the tiled forward passes from about
        // S 14,000 at D 64: a 256-key cache at head dim 64 keeps both far inside it.
        let mut g = c.benchmark_group(format!("attention decode/wgpu:{i}"));
        g.sample_size(10);
        let shapes: &[(usize, usize)] = if software { &[(256, 64)] } else { &[(1024, 128), (4096, 128), (16384, 128)] };
        for &(s, d) in shapes {
            let (h, kvh) = (32, 8);
            let p = AttentionParams { batch: 1, q_len: 1, kv_len: s, heads: h, kv_heads: kvh, head_dim: d, causal: true, window: None, scale: 1.0 / (d as f32).sqrt() };
            let mut rng = Rng::new(5);
            let q = rt.upload(bytemuck::cast_slice(&rng.vec(h * d, -1.0, 1.0)));
            let (k, v) = (rt.upload(bytemuck::cast_slice(&rng.vec(s * kvh * d, -1.0, 1.0))), rt.upload(bytemuck::cast_slice(&rng.vec(s * kvh * d, -1.0, 1.0))));
            let (o, stats) = (rt.alloc_zeros(h * d * 4), rt.alloc_zeros(h * 8));
            // Bytes of K and V read once.
            g.throughput(Throughput::Bytes((2 * s * kvh * d * 4) as u64));
            for (name, kernel) in [("split-KV", wgsl::FwdKernel::SplitKv), ("tiled (peer)", wgsl::FwdKernel::Tiled)] {
                g.bench_function(BenchmarkId::new(name, format!("S{s}-D{d}")), |bch| {
                    bch.iter(|| {
                        wgsl::forward(kernel, &rt.device, &rt.queue, &rt.kernels, q.buffer(), k.buffer(), v.buffer(), None, o.buffer(), stats.buffer(), &p, wgsl::Precision::F32).unwrap();
                        rt.synchronize().unwrap();
                    })
                });
            }
        }
        g.finish();
    }
}

/// The cost of a launch on each wgpu adapter: a chain of 256 dependent dispatches of a
/// one-workgroup kernel (`y = x + 1` on 64 floats), so the time is the launches'. Rows:
/// tuna's `dispatch_bound`, which batches a device's launches into one submit
/// (`device::wgpu::batch`) and keeps their bind groups (`device::wgpu::binds`); the peer, a
/// bind group and a `queue.submit` per dispatch, as wgpu's examples do;
/// and `ops::add` on tensors, what a model's op pays on top (its output buffer from the pool,
/// its uniform from the cache). Throughput counts dispatches ("elem/s").
fn dispatch_wgpu(c: &mut Criterion) {
    use tuna::device::wgpu::binds::{bind_group, fresh_bind_group};
    use tuna::device::wgpu::{dispatch_bound, runtime, uniform};
    const SHADER: &str = "
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> n: vec4<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    if g.x < n.x { y[g.x] = x[g.x] + 1.0; }
}";
    const CHAIN: usize = 256;
    for info in Device::available() {
        let Device::Wgpu(i) = info.device else { continue };
        let rt = runtime(i).unwrap();
        let pipe = rt.kernels.pipeline(&rt.device, "bench_dispatch", SHADER, "main").unwrap();
        let (a, b) = (rt.alloc_zeros(256), rt.alloc_zeros(256));
        let n = uniform(&rt.device, &[64u32, 0, 0, 0]);
        let binds = |j: usize| if j.is_multiple_of(2) { [(0, a.buffer()), (1, b.buffer()), (2, &n)] } else { [(0, b.buffer()), (1, a.buffer()), (2, &n)] };
        let mut g = c.benchmark_group(format!("dispatch/wgpu:{i}"));
        g.sample_size(20);
        g.throughput(Throughput::Elements(CHAIN as u64));
        g.bench_function(BenchmarkId::new("batched (tuna)", CHAIN), |bch| {
            bch.iter(|| {
                for j in 0..CHAIN {
                    dispatch_bound(&rt.device, &rt.queue, &pipe, &binds(j), (1, 1, 1));
                }
                rt.synchronize().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("one submit each (peer)", CHAIN), |bch| {
            bch.iter(|| {
                for j in 0..CHAIN {
                    let mut enc = rt.device.create_command_encoder(&Default::default());
                    let group = fresh_bind_group(&rt.device, &pipe, &binds(j));
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&pipe);
                    pass.set_bind_group(0, &group, &[]);
                    pass.dispatch_workgroups(1, 1, 1);
                    drop(pass);
                    rt.queue.submit([enc.finish()]);
                }
                rt.synchronize().unwrap();
            })
        });
        // The CPU's share alone: recording the chain into an encoder that is never submitted
        // (what a GPU's host thread pays a launch while the GPU runs), with the kept bind
        // groups and with one made each dispatch.
        for (name, keep) in [("record, kept bind groups (tuna)", true), ("record, a bind group each (peer)", false)] {
            g.bench_function(BenchmarkId::new(name, CHAIN), |bch| {
                bch.iter(|| {
                    let mut enc = rt.device.create_command_encoder(&Default::default());
                    for j in 0..CHAIN {
                        let group = if keep { bind_group(&rt.device, &pipe, &binds(j)) } else { fresh_bind_group(&rt.device, &pipe, &binds(j)) };
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        pass.set_pipeline(&pipe);
                        pass.set_bind_group(0, &group, &[]);
                        pass.dispatch_workgroups(1, 1, 1);
                    }
                    enc
                })
            });
        }
        let x = Tensor::from_slice(&[0.0f32; 64], [64], &info.device).unwrap();
        let one = Tensor::from_slice(&[1.0f32; 64], [64], &info.device).unwrap();
        g.bench_function(BenchmarkId::new("ops::add", CHAIN), |bch| {
            bch.iter(|| {
                let mut y = x.clone();
                for _ in 0..CHAIN {
                    y = ops::add(&y, &one).unwrap();
                }
                info.device.synchronize().unwrap();
                y
            })
        });
        g.finish();
    }
}

/// The CUDA flash attention on issue 6's grid: T in {512, 1k, 2k, 4k, 8k}, head dims 64 and
/// 128, causal or not, bf16, B·T = 16k tokens and H·D = 2048 (FlashAttention's benchmark
/// setting), in FlashAttention's FLOP count (forward `4·B·T²·D·H`, halved when causal;
/// backward 2.5× that). Rows: the forward's mma.sync kernels (`sync`, `pipelined`) and, on a
/// compute capability 9.0 device with the Hopper kernels on, `hopper`; the backward's `sync`
/// and `hopper`. The peer, PyTorch's `scaled_dot_product_attention`, needs Python:
/// `tools/gpu-check` times it on the same shapes in the same run.
fn attention_cuda(c: &mut Criterion) {
    use half::bf16;
    use tuna::device::cuda::hopper::{self, Part};
    use tuna::kernels::attention::{cuda, AttentionParams};
    use tuna::kernels::lora::cuda::Half;
    for info in Device::available() {
        let Device::Cuda(i) = info.device else { continue };
        let rt = tuna::device::cuda::runtime(i).unwrap();
        let (s, md) = (&rt.stream, &rt.modules);
        let hopper_on = |part| md.compute_capability() == 90 && hopper::mode_for(part) != hopper::Mode::Off;
        let mut g = c.benchmark_group(format!("attention/{}", info.device));
        g.sample_size(10).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
        let mut rng = Rng::new(9);
        for d in [64usize, 128] {
            let heads = 2048 / d;
            for t in [512usize, 1024, 2048, 4096, 8192] {
                let batch = 16384 / t;
                let n = batch * t * heads * d;
                let mut up = || s.clone_htod(&rng.vec(n, -1.0, 1.0).into_iter().map(|v| bf16::from_f32(v).to_bits()).collect::<Vec<u16>>()).unwrap();
                let (q, k, v, dout) = (up(), up(), up(), up());
                let mut o = s.alloc_zeros::<u16>(n).unwrap();
                let mut lse = s.alloc_zeros::<f32>(batch * heads * t).unwrap();
                let (mut dq, mut dk, mut dv) = (s.alloc_zeros::<u16>(n).unwrap(), s.alloc_zeros::<u16>(n).unwrap(), s.alloc_zeros::<u16>(n).unwrap());
                for causal in [false, true] {
                    let p = AttentionParams { batch, q_len: t, kv_len: t, heads, kv_heads: heads, head_dim: d, causal, window: None, scale: 1.0 / (d as f32).sqrt() };
                    let fwd_flops = (4 * batch * t * t * d * heads / if causal { 2 } else { 1 }) as u64;
                    let id = format!("T{t}-D{d}-{}", if causal { "causal" } else { "full" });
                    g.throughput(Throughput::Elements(fwd_flops));
                    let mut fwds = vec![("forward sync", cuda::FwdKernel::Sync), ("forward pipelined", cuda::FwdKernel::Pipelined)];
                    if hopper_on(Part::Attention) {
                        fwds.push(("forward hopper", cuda::FwdKernel::Hopper));
                    }
                    for (name, kernel) in fwds {
                        g.bench_function(BenchmarkId::new(name, &id), |bch| {
                            bch.iter(|| {
                                cuda::forward(kernel, s, md, Half::Bf16, &q.slice(..), &k.slice(..), &v.slice(..), None, &mut o.slice_mut(..), &mut lse.slice_mut(..), &p).unwrap();
                                s.synchronize().unwrap();
                            })
                        });
                    }
                    // The backward reads the O and log-sum-exp of the last forward above.
                    g.throughput(Throughput::Elements(fwd_flops * 5 / 2));
                    let mut bwds = vec![("backward sync", cuda::BwdKernel::Sync)];
                    if hopper_on(Part::AttentionBackward) {
                        bwds.push(("backward hopper", cuda::BwdKernel::Hopper));
                    }
                    for (name, kernel) in bwds {
                        g.bench_function(BenchmarkId::new(name, &id), |bch| {
                            bch.iter(|| {
                                let (qv, kv, vv, ov, dov, lv) = (q.slice(..), k.slice(..), v.slice(..), o.slice(..), dout.slice(..), lse.slice(..));
                                cuda::backward(kernel, s, md, Half::Bf16, &qv, &kv, &vv, None, &ov, &dov, &lv, &mut dq.slice_mut(..), &mut dk.slice_mut(..), &mut dv.slice_mut(..), &p).unwrap();
                                s.synchronize().unwrap();
                            })
                        });
                    }
                }
            }
        }
        g.finish();
    }
}

/// The LM head and the loss: `linear_cross_entropy` (logits made in chunks, dX finished in the
/// forward) against its peer, the unfused `matmul` then `cross_entropy`, forward and backward,
/// at a small model's hidden size and Llama 3's vocabulary. (Peak memory, which criterion does
/// not see: see `kernels::cross_entropy::default_chunk_rows`.)
fn linear_cross_entropy(c: &mut Criterion) {
    use tuna::Tape;
    let mut g = c.benchmark_group("linear_cross_entropy/cpu");
    g.sample_size(10);
    for (m, h, v) in [(512usize, 512usize, 32_000usize), (1024, 512, 128_256)] {
        let mut rng = Rng::new(3);
        let x = Tensor::from_vec(rng.vec(m * h, -1.0, 1.0), [m, h]).unwrap();
        let w = Tensor::from_vec(rng.vec(v * h, -0.05, 0.05), [v, h]).unwrap();
        let t = Tensor::from_vec_i32((0..m).map(|_| rng.below(v) as i32).collect(), [m]).unwrap();
        let id = format!("M{m} H{h} V{v}");
        g.throughput(Throughput::Elements((m * v) as u64));
        let step = |fused: bool| {
            let tape = Tape::new();
            let xp = tape.param(&x);
            let loss = if fused { ops::linear_cross_entropy(&xp, &w, &t, -100, None) } else { ops::cross_entropy(&ops::matmul(&xp, &w, false, true).unwrap(), &t, -100) };
            tape.backward(&loss.unwrap()).unwrap()
        };
        g.bench_function(BenchmarkId::new("fused, fwd+bwd", &id), |b| b.iter(|| step(true)));
        g.bench_function(BenchmarkId::new("matmul + cross_entropy (peer), fwd+bwd", &id), |b| b.iter(|| step(false)));
    }
    g.finish();
}

/// Picking the next token from a row of logits on the CPU (what `generate` does on every
/// device for a sampler that is not greedy), at SmolLM's and Llama 3's vocabularies. Logits
/// shaped like a language model's (a bell of width ~2.5 and a few far above it). Peer: the same
/// rule by sorting the whole vocabulary, as transformers' top-k and top-p warpers do
/// (`testing::sampling::nucleus`), with its draw.
fn sampling_cpu(c: &mut Criterion) {
    use tuna::nn::{GenerateOptions, Sampler};
    let mut g = c.benchmark_group("sampling/cpu");
    g.sample_size(30);
    for v in [49_152usize, 128_256] {
        let mut rng = Rng::new(5);
        let mut logits: Vec<f32> = (0..v).map(|_| (0..4).map(|_| rng.uniform(-1.0, 1.0)).sum::<f32>() * 2.5).collect();
        for i in 0..20 {
            logits[i * 97] = 12.0 + 0.3 * i as f32;
        }
        for (name, temperature, top_k, top_p) in [("greedy", 0.0, 0, 1.0), ("t 1", 1.0, 0, 1.0), ("t 0.7 top-p 0.9", 0.7, 0, 0.9), ("t 0.7 top-k 50", 0.7, 50, 1.0)] {
            let mut s = Sampler::new(GenerateOptions { temperature, top_k, top_p, seed: 1, ..Default::default() }).unwrap();
            g.bench_function(BenchmarkId::new(name, v), |b| b.iter(|| std::hint::black_box(s.sample(&logits))));
            if top_k > 0 || top_p < 1.0 {
                let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
                g.bench_function(BenchmarkId::new(format!("{name}, by sorting (peer)"), v), |b| {
                    b.iter(|| {
                        let kept = tuna::testing::sampling::nucleus(&logits, |i| (((logits[i] - max) / temperature) as f64).exp(), top_k, top_p as f64);
                        let u = rng.uniform(0.0, 1.0) as f64 * kept.iter().map(|&(_, w)| w).sum::<f64>();
                        let mut acc = 0.0;
                        std::hint::black_box(kept.iter().find(|&&(_, w)| {
                            acc += w;
                            u < acc
                        }).map(|&(i, _)| i))
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, rmsnorm, sampling_cpu, matmul_cpu, gemv_cpu, transpose_cpu, sparse_cpu, attention_cpu, attention_wgpu, dispatch_wgpu, attention_cuda, linear_cross_entropy);
criterion_main!(benches);
