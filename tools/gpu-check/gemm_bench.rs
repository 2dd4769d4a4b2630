//! The LoRA GEMM and NF4 benchmarks of issue 5 against cuBLAS, in the same run, on
//! Llama-3-8B shapes (K = 4096, N in {4096, 14336}, M in {1, 16, 2048, 8192}, R = 16), bf16
//! in and out with f32 accumulation on both sides:
//!
//! - `cublas base`: `Y = X·Wᵀ`, one cublasGemmEx (the peer every ratio is taken against);
//! - `cublas lora (3 calls)`: the unfused LoRA forward, `Y = X·Wᵀ; XA = X·Aᵀ; Y += s·XA·Bᵀ`;
//! - `tuna lora fused`: `lora::cuda::forward` (the LoRA term in the same output tile);
//! - `tuna nf4 lora`: `lora::cuda::forward` with `Weight::Nf4` (W in NF4, dequantized in the tile loads; the
//!   GEMV kernel for M <= 16);
//! - at M >= 2048: `cublas dX` (`dX = dY·W`, the backward's big product) beside `tuna dX`
//!   (`linear_dx`), `cublas dW` (`dW = dYᵀ·X` over the M tokens, a trained weight's gradient)
//!   beside `tuna dW` (`matmul_tn`, dY read as stored; its result checked against cuBLAS's),
//!   and `tuna base gemm` (`linear`, rank 0); on an H100 (Hopper's wgmma path by default) each
//!   tuna row also with that path off, `(mma.sync)`.
//!
//! Targets (H100): fused <= 1.10x the base GEMM's time and >= 1.3x faster than the three
//! calls; NF4 at M >= 2048 >= 0.8x the base GEMM's throughput; NF4 at M = 1 >= 2.5x faster
//! than cuBLAS bf16 at M = 1. FLOPs counted as `2·M·N·K` (+ `2·M·R·(K + N)` for LoRA).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use serde_json::{json, Value};
use tuna::device::cuda::CudaRuntime;
use tuna::device::cuda::hopper::{self as sm90, Mode};
use tuna::kernels::lora::{self, cuda::Half, LoraParams};
use tuna::kernels::nf4::{self, cuda::Nf4Device};
use tuna::testing::{cublas::Cublas, Rng};

use crate::time_us;

fn cuda_err(context: &str) -> impl Fn(cudarc::driver::DriverError) -> tuna::Error + '_ {
    move |e| tuna::Error::Cuda { context: context.into(), message: format!("{e:?}") }
}

/// Random bf16 values in [-1, 1) (scaled by `s`), as the raw u16 the kernels take.
fn upload(s: &Arc<CudaStream>, rng: &mut Rng, n: usize, scale: f32) -> tuna::Result<CudaSlice<u16>> {
    let host: Vec<u16> = rng.vec(n, -scale, scale).into_iter().map(|v| bf16::from_f32(v).to_bits()).collect();
    s.clone_htod(&host).map_err(cuda_err("upload"))
}

/// The largest difference between two bf16 results (raw bits), relative to `want`'s largest
/// magnitude: the bound a product's rounding and summation order keep within ~1 bf16 step.
fn max_rel_diff(have: &[u16], want: &[u16]) -> f64 {
    let f = |b: u16| f64::from(f32::from(bf16::from_bits(b)));
    let scale = want.iter().map(|&w| f(w).abs()).fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    have.iter().zip(want).map(|(&h, &w)| (f(h) - f(w)).abs()).fold(0.0, f64::max) / scale
}

pub fn lora_benches(rt: &Arc<CudaRuntime>) -> tuna::Result<Vec<Value>> {
    const K: usize = 4096;
    const R: usize = 16;
    let s = &rt.stream;
    let md = &rt.modules;
    let blas = Cublas::new(s)?;
    let scale = 2.0; // alpha 32 / r 16
    let mut rows_out = Vec::new();
    let mut rng = Rng::new(5);
    println!("  {:<40} {:>10} {:>10} {:>10}", "kernel [M, N, K]", "time µs", "TFLOP/s", "vs base");
    for n in [4096usize, 14336] {
        let w = upload(s, &mut rng, n * K, 0.02)?;
        let w_host: Vec<f32> = rng.vec(n * K, -0.02, 0.02);
        let nf4_dev = Nf4Device::upload(s, &nf4::cpu::quantize(&w_host))?;
        let a = upload(s, &mut rng, R * K, 0.02)?;
        let b = upload(s, &mut rng, n * R, 0.02)?;
        for m in [1usize, 16, 2048, 8192] {
            let x = upload(s, &mut rng, m * K, 1.0)?;
            let mut y = s.alloc_zeros::<u16>(m * n).map_err(cuda_err("alloc"))?;
            let mut xa = s.alloc_zeros::<u16>(m * R).map_err(cuda_err("alloc"))?;
            let p = LoraParams { m, n, k: K, r: R, scale };
            let base_flops = (2 * m * n * K) as f64;
            let lora_flops = base_flops + (2 * m * R * (K + n)) as f64;
            let base = time_us(rt, || blas.gemm_bf16(&x, &w, &mut y, (m, n, K), true, 1.0, 0.0))?;
            let unfused = time_us(rt, || {
                blas.gemm_bf16(&x, &w, &mut y, (m, n, K), true, 1.0, 0.0)?;
                blas.gemm_bf16(&x, &a, &mut xa, (m, R, K), true, 1.0, 0.0)?;
                blas.gemm_bf16(&xa, &b, &mut y, (m, n, R), true, scale, 1.0)
            })?;
            let fused = time_us(rt, || {
                let (xv, wv, av, bv) = (x.slice(..), w.slice(..), a.slice(..), b.slice(..));
                lora::cuda::forward(s, md, Half::Bf16, &xv, &xv, lora::cuda::Weight::Dense(&wv), None, &av, &bv, &mut y.slice_mut(..), &mut xa.slice_mut(..), p)
            })?;
            let nf4_us = time_us(rt, || {
                let (xv, av, bv) = (x.slice(..), a.slice(..), b.slice(..));
                lora::cuda::forward(s, md, Half::Bf16, &xv, &xv, lora::cuda::Weight::Nf4(&nf4_dev), None, &av, &bv, &mut y.slice_mut(..), &mut xa.slice_mut(..), p)
            })?;
            let mut rows = vec![
                ("cublas base (peer)", base, base_flops),
                ("cublas lora (3 calls)", unfused, lora_flops),
                ("tuna lora fused", fused, lora_flops),
                ("tuna nf4 lora", nf4_us, lora_flops),
            ];
            if m >= 2048 {
                // The plain GEMM (rank 0) and dX = dY·W (the backward's big product, W read as
                // [K, N]) beside cuBLAS; on an H100 each also on the mma.sync kernels with
                // Hopper's path off, the kernel the path replaces.
                let dy = upload(s, &mut rng, m * n, 1.0)?;
                let mut dx = s.alloc_zeros::<u16>(m * K).map_err(cuda_err("alloc"))?;
                let blas_dx = time_us(rt, || blas.gemm_bf16(&dy, &w, &mut dx, (m, K, n), false, 1.0, 0.0))?;
                rows.push(("cublas dX", blas_dx, base_flops));
                // dW [n, K] = dYᵀ·X over the m tokens; cuBLAS's result is kept to check tuna's.
                let mut dw = s.alloc_zeros::<u16>(n * K).map_err(cuda_err("alloc"))?;
                let blas_dw = time_us(rt, || blas.gemm_bf16_tn(&dy, &x, &mut dw, (n, K, m)))?;
                rows.push(("cublas dW", blas_dw, base_flops));
                let want_dw: Vec<u16> = s.clone_dtoh(&dw).map_err(cuda_err("download"))?;
                // The mode the run chose (the GEMM path off after a failed smoke test), then, on
                // an H100 with the path on, Off for the mma.sync rows.
                let entry = sm90::mode();
                let on_hopper = md.compute_capability() == 90 && sm90::mode_for(sm90::Part::Gemm) != Mode::Off;
                for mode in if on_hopper { vec![entry, Mode::Off] } else { vec![entry] } {
                    sm90::set_mode(mode);
                    let timed = (
                        time_us(rt, || lora::cuda::linear(s, md, Half::Bf16, &x.slice(..), lora::cuda::Weight::Dense(&w.slice(..)), None, &mut y.slice_mut(..), (m, n, K))),
                        time_us(rt, || lora::cuda::linear_dx(s, md, Half::Bf16, &dy.slice(..), lora::cuda::Weight::Dense(&w.slice(..)), &mut dx.slice_mut(..), false, (m, n, K))),
                        time_us(rt, || lora::cuda::matmul_tn(s, md, Half::Bf16, &dy.slice(..), &x.slice(..), lora::cuda::GemmOut::Half(&mut dw.slice_mut(..)), (n, K, m))),
                    );
                    sm90::set_mode(entry);
                    let (base_us, dx_us, dw_us) = (timed.0?, timed.1?, timed.2?);
                    let dw_err = max_rel_diff(&s.clone_dtoh(&dw).map_err(cuda_err("download"))?, &want_dw);
                    if dw_err > 2e-2 {
                        return Err(tuna::Error::InvalidArgument(format!("tuna dW [{n}, {K}] over {m} tokens differs from cuBLAS's by {dw_err:.2e} (relative, largest element)")));
                    }
                    if mode == entry {
                        rows.push(("tuna base gemm", base_us, base_flops));
                        rows.push(("tuna dX", dx_us, base_flops));
                        rows.push(("tuna dW", dw_us, base_flops));
                    } else {
                        rows.push(("tuna base gemm (mma.sync)", base_us, base_flops));
                        rows.push(("tuna dX (mma.sync)", dx_us, base_flops));
                        rows.push(("tuna dW (mma.sync)", dw_us, base_flops));
                        sm90::set_mode(Mode::Off);
                        let fused_mma = time_us(rt, || {
                            let (xv, wv, av, bv) = (x.slice(..), w.slice(..), a.slice(..), b.slice(..));
                            lora::cuda::forward(s, md, Half::Bf16, &xv, &xv, lora::cuda::Weight::Dense(&wv), None, &av, &bv, &mut y.slice_mut(..), &mut xa.slice_mut(..), p)
                        });
                        let nf4_mma = time_us(rt, || {
                            let (xv, av, bv) = (x.slice(..), a.slice(..), b.slice(..));
                            lora::cuda::forward(s, md, Half::Bf16, &xv, &xv, lora::cuda::Weight::Nf4(&nf4_dev), None, &av, &bv, &mut y.slice_mut(..), &mut xa.slice_mut(..), p)
                        });
                        sm90::set_mode(entry);
                        rows.push(("tuna lora fused (mma.sync)", fused_mma?, lora_flops));
                        rows.push(("tuna nf4 lora (mma.sync)", nf4_mma?, lora_flops));
                    }
                }
            }
            let shape = format!("[{m}, {n}, {K}]");
            for (kernel, us, flops) in rows {
                let tflops = flops / us / 1e6;
                println!("  {:<40} {:>10.1} {:>10.1} {:>9.2}x", format!("{kernel} {shape}"), us, tflops, us / base);
                rows_out.push(json!({"kernel": kernel, "m": m, "n": n, "k": K, "r": R, "time_us": us, "tflops": tflops, "time_vs_cublas_base": us / base}));
            }
            let mut targets = vec![
                ("fused <= 1.10x cublas base", fused <= 1.10 * base),
                ("fused >= 1.3x faster than 3 calls", unfused >= 1.3 * fused),
            ];
            if m >= 2048 {
                targets.push(("nf4 >= 0.8x cublas bf16 throughput", base_flops / nf4_us >= 0.8 * base_flops / base));
            }
            if m == 1 {
                targets.push(("nf4 gemv >= 2.5x faster than cublas bf16", base >= 2.5 * nf4_us));
            }
            for (what, met) in targets {
                println!("    {:<44} {}", what, if met { "met" } else { "NOT met" });
                rows_out.push(json!({"target": what, "m": m, "n": n, "met": met}));
            }
        }
    }
    Ok(rows_out)
}
