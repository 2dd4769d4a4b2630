//! The fused LoRA linear of issue 5 beside the path a user would write without it, on every
//! device present. Rows of each shape:
//!
//! - `fused lora`: `ops::lora_linear`, one op (on wgpu and CUDA one GEMM over `[X | X·Aᵀ]`
//!   against `[W | s·B]`, the LoRA term landing in the base product's output tile; on the CPU
//!   the same three products as the peer, so its ratio there is the op's overhead);
//! - `unfused: 3 linears + add (peer)`: `X·Wᵀ`, `X·Aᵀ`, `(X·Aᵀ)·(s·B)ᵀ` as plain linears, then
//!   `+`: what it costs without the fused op;
//! - `base linear`: `X·Wᵀ` alone (rank 0), so `fused / base` is what the adapter costs;
//! - `nf4 lora`: the fused op with W in NF4 (QLoRA: dequantized inside the GEMM's tile loads;
//!   on a GPU, a GEMV for M <= 16).
//!
//! Throughput counts FLOP as elements (`2·M·N·K + 2·M·R·(K + N)`; the base row `2·M·N·K`), so
//! "elem/s" reads as FLOP/s. Shapes: Llama-3-8B's (K = 4096, N in {4096, 14336}, R = 16), at
//! M in {1, 16, 2048, 8192} on CUDA (bf16 activations and weights, f32 adapters as the model
//! keeps them), M in {1, 16, 512} on the CPU (f32), and small ones on a software Vulkan
//! adapter. On CUDA two cuBLAS rows join them, on the same values in bf16 with f32 compute:
//! `cublas base (peer)` (`X·Wᵀ`, one cublasGemmEx) and `cublas lora (3 calls)` (`X·Wᵀ`, `X·Aᵀ`,
//! then `Y += s·(X·Aᵀ)·Bᵀ`), so issue 5's targets read off one run: fused at most 1.10x the
//! time of `cublas base`, and at least 1.3x faster than the three calls. (`tools/gpu-check`'s
//! `gemm_bench.rs` times the same peers where there is no cargo.)
//!
//!   cargo bench --bench lora                   # every device present
//!   cargo bench --bench lora -- lora/cpu       # one device
//!   cargo bench --bench lora -- lora_dyw       # the CPU's NF4 dY·W (QLoRA's backward)

use std::cell::RefCell;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use tuna::ops::{self, LinearPart};
use tuna::testing::{cublas::Cublas, Rng};
use tuna::{DType, Device, Tensor};

/// (M, K, N, R) for `dev`.
fn shapes(dev: Device) -> Vec<(usize, usize, usize, usize)> {
    let llama = |ms: &[usize]| -> Vec<_> { [4096, 14336].iter().flat_map(|&n| ms.iter().map(move |&m| (m, 4096, n, 16))).collect() };
    match dev {
        Device::Cuda(_) => llama(&[1, 16, 2048, 8192]),
        Device::Cpu => {
            let mut s = llama(&[1, 16]);
            s.push((512, 4096, 4096, 16));
            s
        }
        // lavapipe runs the kernels on the CPU: small shapes, and two GEMV-sized (1 and 16 rows).
        Device::Wgpu(i) if tuna::device::wgpu::adapter_details().get(i).is_some_and(|a| a.is_software) => vec![(128, 512, 1024, 8), (1, 1024, 2048, 16), (16, 1024, 2048, 16)],
        Device::Wgpu(_) => llama(&[1, 16, 2048]),
    }
}

fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    ops::linear_group(x, &[LinearPart { weight: w, bias: None, lora: None, dropout: None }]).unwrap().remove(0)
}

fn lora(c: &mut Criterion) {
    for info in Device::available() {
        let dev = info.device;
        let mut g = c.benchmark_group(format!("lora/{dev}"));
        g.sample_size(10);
        // The activations' and the frozen weight's dtype: bf16 on CUDA (the model's), else f32.
        let dt = if matches!(dev, Device::Cuda(_)) { DType::BF16 } else { DType::F32 };
        // The cuBLAS peer, where the device is CUDA and libcublas loads.
        let cublas = match dev {
            Device::Cuda(i) => match tuna::device::cuda::runtime(i).and_then(|rt| Cublas::new(&rt.stream).map(|b| (rt, b))) {
                Ok(pair) => Some(pair),
                Err(e) => {
                    eprintln!("lora/{dev}: no cuBLAS rows: {e}");
                    None
                }
            },
            _ => None,
        };
        for (m, k, n, r) in shapes(dev) {
            let mut rng = Rng::new(7);
            let on = |v: Vec<f32>, shape: [usize; 2], dtype: DType| Tensor::from_vec(v, shape).and_then(|t| t.to_device(&dev)).and_then(|t| t.to_dtype(dtype)).unwrap();
            let bound = 1.0 / (k as f32).sqrt();
            let x_host = rng.vec(m * k, -1.0, 1.0);
            let x = on(x_host.clone(), [m, k], dt);
            let w_host = Tensor::from_vec(rng.vec(n * k, -bound, bound), [n, k]).unwrap();
            let w = w_host.to_device(&dev).and_then(|t| t.to_dtype(dt)).unwrap();
            let (a, b) = (rng.vec(r * k, -bound, bound), rng.vec(n * r, -0.1, 0.1));
            let s = 2.0;
            // The fused op's adapters: f32 (the trained masters); the peer's: plain weights in
            // the activations' dtype, B pre-scaled.
            let (af, bf) = (on(a.clone(), [r, k], DType::F32), on(b.clone(), [n, r], DType::F32));
            let (ap, bp) = (on(a.clone(), [r, k], dt), on(b.iter().map(|v| s * v).collect(), [n, r], dt));
            let (a_host, b_host) = (a, b);
            let nf4 = tuna::kernels::nf4::quantize_tensor(&w_host).and_then(|q| Tensor::from_nf4(q, [n, k])).and_then(|t| t.to_device(&dev)).unwrap();
            let id = format!("M{m} K{k} N{n} R{r}");
            let (base_flops, lora_flops) = (2 * m * n * k, 2 * m * n * k + 2 * m * r * (k + n));
            let mut run = |name: &str, flops: usize, f: &dyn Fn()| {
                g.throughput(Throughput::Elements(flops as u64));
                g.bench_function(BenchmarkId::new(name, &id), |bch| {
                    bch.iter(|| {
                        f();
                        dev.synchronize().unwrap();
                    })
                });
            };
            let keep = |t: Tensor| drop(std::hint::black_box(t));
            run("fused lora", lora_flops, &|| keep(ops::lora_linear(&x, &w, None, &af, &bf, s, None).unwrap()));
            run("unfused: 3 linears + add (peer)", lora_flops, &|| keep(ops::add(&linear(&x, &w), &linear(&linear(&x, &ap), &bp)).unwrap()));
            run("base linear", base_flops, &|| keep(linear(&x, &w)));
            run("nf4 lora", lora_flops, &|| keep(ops::lora_linear(&x, &nf4, None, &af, &bf, s, None).unwrap()));
            if let Some((rt, blas)) = &cublas {
                let up = |v: &[f32]| rt.stream.clone_htod(&v.iter().map(|&e| bf16::from_f32(e).to_bits()).collect::<Vec<u16>>()).unwrap();
                let (xc, wc) = (up(&x_host), up(&w_host.to_vec_f32().unwrap()));
                let (ac, bc) = (up(&a_host), up(&b_host));
                let y = RefCell::new(rt.stream.alloc_zeros::<u16>(m * n).unwrap());
                let xa = RefCell::new(rt.stream.alloc_zeros::<u16>(m * r).unwrap());
                run("cublas base (peer)", base_flops, &|| blas.gemm_bf16(&xc, &wc, &mut y.borrow_mut(), (m, n, k), true, 1.0, 0.0).unwrap());
                run("cublas lora (3 calls)", lora_flops, &|| {
                    let (mut y, mut xa) = (y.borrow_mut(), xa.borrow_mut());
                    blas.gemm_bf16(&xc, &wc, &mut y, (m, n, k), true, 1.0, 0.0).unwrap();
                    blas.gemm_bf16(&xc, &ac, &mut xa, (m, r, k), true, 1.0, 0.0).unwrap();
                    blas.gemm_bf16(&xa, &bc, &mut y, (m, n, r), true, s, 1.0).unwrap();
                });
            }
        }
        g.finish();
    }
}

/// The QLoRA backward's product `dX = dY·W` on the CPU, W in NF4 (`nf4::cpu::matmul_dyw`: W
/// decoded inside the product) beside the same product on the f32 W (the `gemm` crate), at the
/// row counts of small-batch training (M 1, 16, 32 and 64 rows of dY) and a batch of 512 tokens
/// (K 4096, N 4096 and 14336).
fn nf4_dyw_cpu(c: &mut Criterion) {
    use tuna::kernels::matmul::{cpu::matmul_new, MatmulParams};
    let mut g = c.benchmark_group("lora_dyw/cpu");
    g.sample_size(10);
    for n in [4096, 14336] {
        let k = 4096;
        let mut rng = Rng::new(8);
        let w = rng.vec(n * k, -0.02, 0.02);
        let q = tuna::kernels::nf4::cpu::quantize(&w);
        for m in [1, 16, 32, 64, 512] {
            let dy = rng.vec(m * n, -1.0, 1.0);
            let id = format!("M{m} K{k} N{n}");
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            g.bench_function(BenchmarkId::new("nf4 dy·W", &id), |b| b.iter(|| tuna::kernels::nf4::cpu::matmul_dyw(&q, &dy, m, n, k).unwrap()));
            g.bench_function(BenchmarkId::new("f32 dy·W (peer)", &id), |b| b.iter(|| matmul_new(&dy, &w, MatmulParams { m, n: k, k: n, trans_a: false, trans_b: false }).unwrap()));
        }
    }
    g.finish();
}

criterion_group!(benches, lora, nf4_dyw_cpu);
criterion_main!(benches);
