//! RMSNorm benchmarks: over whole rows (`rmsnorm_benches`), and per head fused with RoPE.
//!
//! Qwen3's per-head q/k norm then RoPE (`norm_rope_benches`): the fused kernels (`norm_rope_*`) against the two
//! kernels they replace (`rmsnorm_*` then `rope_*`), on the same buffers in the same run, and
//! against a device-to-device copy of the same bytes (the bandwidth peer). bf16, positions
//! 0..T; forward, backward without dw (LoRA: the norm weights are frozen) and with dw (full
//! fine-tuning).
//!
//! Bytes each fused pass must move: forward reads x and writes y (2·n elements); backward reads
//! x and dy and writes dx (3·n). The unfused pair also writes and reads the normed (or rotated
//! gradient) tensor between its kernels, and its dw pass reads x and dy again.

use std::sync::Arc;

use serde_json::{json, Value};
use tuna::device::cuda::CudaRuntime;
use tuna::kernels::rmsnorm::{self, RmsNormParams};
use tuna::kernels::rope::{self, Direction, RopeParams};

use crate::{alloc, time_us};

/// RMSNorm over whole rows, forward and backward, through the public launchers (cudarc slices,
/// no tuna tensors).
pub fn rmsnorm_benches(rt: &Arc<CudaRuntime>) -> tuna::Result<Vec<Value>> {
    let mut rows_out = Vec::new();
    let s = &rt.stream;
    for &(m, n) in &[(4096usize, 4096usize), (16384, 2048), (8192, 8192)] {
        let p = RmsNormParams { rows: m, cols: n, eps: 1e-5 };
        macro_rules! bench_dtype {
            ($t:ty, $name:expr) => {{
                let esize = std::mem::size_of::<$t>();
                let x = alloc::<$t>(s, m * n)?;
                let w = alloc::<$t>(s, n)?;
                let dy = alloc::<$t>(s, m * n)?;
                let mut y = alloc::<$t>(s, m * n)?;
                let mut dx = alloc::<$t>(s, m * n)?;
                let mut dw = alloc::<$t>(s, n)?;
                let mut rstd = alloc::<f32>(s, m)?;
                let mut copy_dst = alloc::<$t>(s, m * n)?;
                // The peer: a device-to-device copy of one [M, N] tensor (reads and writes M*N).
                let copy_us = time_us(rt, || {
                    s.memcpy_dtod(&x, &mut copy_dst).map_err(|e| tuna::Error::Cuda { context: "memcpy".into(), message: format!("{e:?}") })
                })?;
                let copy_gbs = (2 * m * n * esize) as f64 / copy_us / 1e3;
                let fwd_us = time_us(rt, || {
                    rmsnorm::cuda::forward::<$t>(s, &rt.modules, &x.slice(..), None, &w.slice(..), &mut y.slice_mut(..), &mut rstd.slice_mut(..), p)
                })?;
                let bwd_us = time_us(rt, || {
                    rmsnorm::cuda::backward::<$t>(s, &rt.modules, &x.slice(..), &w.slice(..), &dy.slice(..), &rstd.slice(..), None, &mut dx.slice_mut(..), Some(&mut dw.slice_mut(..)), p)
                })?;
                // Bytes that must move: fwd reads x and writes y (2·M·N); bwd's dx pass reads x
                // and dy and writes dx (3·M·N), its dw pass reads x and dy again (2·M·N).
                let fwd_bytes = (2 * m * n * esize) as f64;
                let bwd_bytes = (5 * m * n * esize) as f64;
                for (kernel, us, bytes) in [("rmsnorm_fwd", fwd_us, fwd_bytes), ("rmsnorm_bwd", bwd_us, bwd_bytes), ("memcpy_dtod (peer)", copy_us, (2 * m * n * esize) as f64)] {
                    let gbs = bytes / us / 1e3;
                    let name = format!("{kernel} {} [{m}, {n}]", $name);
                    println!("  {:<38} {:>10.1} {:>10.0} {:>11.0}%", name, us, gbs, 100.0 * gbs / copy_gbs);
                    rows_out.push(json!({"kernel": kernel, "dtype": $name, "m": m, "n": n, "time_us": us, "gb_per_s": gbs, "copy_gb_per_s": copy_gbs}));
                }
            }};
        }
        bench_dtype!(f32, "f32");
        bench_dtype!(u16, "bf16");
    }
    Ok(rows_out)
}

/// The per-head fused kernels against rmsnorm then rope (see the top).
pub fn norm_rope_benches(rt: &Arc<CudaRuntime>) -> tuna::Result<Vec<Value>> {
    let s = &rt.stream;
    let mut rows_out = Vec::new();
    // Qwen3-0.6B's q and k over 8192 tokens (16 and 8 heads of 128), and Qwen3-8B's q (32).
    for (name, tokens, heads) in [("q 0.6B", 8192usize, 16usize), ("k 0.6B", 8192, 8), ("q 8B", 8192, 32)] {
        let d = 128;
        let n = tokens * heads * d;
        let p = RopeParams { tokens, heads, head_dim: d };
        let np = RmsNormParams { rows: tokens * heads, cols: d, eps: 1e-6 };
        let freq: Vec<f32> = tuna::testing::token_ops::inv_freq(d, 1_000_000.0);
        let positions: Vec<i32> = (0..tokens as i32).collect();
        let err = |e| tuna::Error::Cuda { context: "norm_rope bench upload".into(), message: format!("{e:?}") };
        let freq = s.clone_htod(&freq).map_err(err)?;
        let pos = s.clone_htod(&positions).map_err(err)?;
        let (x, w, dy) = (alloc::<u16>(s, n)?, alloc::<u16>(s, d)?, alloc::<u16>(s, n)?);
        let (mut y, mut mid, mut dx, mut dw) = (alloc::<u16>(s, n)?, alloc::<u16>(s, n)?, alloc::<u16>(s, n)?, alloc::<u16>(s, d)?);
        let mut rstd = alloc::<f32>(s, tokens * heads)?;
        let mut copy_dst = alloc::<u16>(s, n)?;
        let copy_us = time_us(rt, || s.memcpy_dtod(&x, &mut copy_dst).map_err(|e| tuna::Error::Cuda { context: "memcpy".into(), message: format!("{e:?}") }))?;
        let copy_gbs = (4 * n) as f64 / copy_us / 1e3;
        let fused_fwd = time_us(rt, || {
            rope::cuda::norm_rope_forward::<u16>(s, &rt.modules, &x.slice(..), &w.slice(..), &pos.slice(..), &freq.slice(..), &mut y.slice_mut(..), &mut rstd.slice_mut(..), p, 1e-6)
        })?;
        let pair_fwd = time_us(rt, || {
            rmsnorm::cuda::forward::<u16>(s, &rt.modules, &x.slice(..), None, &w.slice(..), &mut mid.slice_mut(..), &mut rstd.slice_mut(..), np)?;
            rope::cuda::rope::<u16>(s, &rt.modules, &mid.slice(..), &pos.slice(..), &freq.slice(..), &mut y.slice_mut(..), p, Direction::Forward)
        })?;
        let mut bwd = |fused: bool, with_dw: bool| {
            time_us(rt, || {
                let mut dw = with_dw.then(|| dw.slice_mut(..));
                if fused {
                    rope::cuda::norm_rope_backward::<u16>(s, &rt.modules, &x.slice(..), &w.slice(..), &dy.slice(..), &pos.slice(..), &freq.slice(..), &rstd.slice(..), &mut dx.slice_mut(..), dw.as_mut(), p)
                } else {
                    rope::cuda::rope::<u16>(s, &rt.modules, &dy.slice(..), &pos.slice(..), &freq.slice(..), &mut mid.slice_mut(..), p, Direction::Backward)?;
                    rmsnorm::cuda::backward::<u16>(s, &rt.modules, &x.slice(..), &w.slice(..), &mid.slice(..), &rstd.slice(..), None, &mut dx.slice_mut(..), dw.as_mut(), np)
                }
            })
        };
        let (fused_bwd, pair_bwd, fused_bwd_dw, pair_bwd_dw) = (bwd(true, false)?, bwd(false, false)?, bwd(true, true)?, bwd(false, true)?);
        let shape = format!("[{tokens}, {heads}, {d}]");
        for (pass, fused, pair, elems) in [("fwd", fused_fwd, pair_fwd, 2 * n), ("bwd", fused_bwd, pair_bwd, 3 * n), ("bwd+dw", fused_bwd_dw, pair_bwd_dw, 3 * n)] {
            let gbs = (2 * elems) as f64 / fused / 1e3;
            println!(
                "  norm_rope {pass:<6} {name} {shape:<15} fused {fused:>8.1} µs ({:>4.0}% of copy bw)   rmsnorm+rope {pair:>8.1} µs   {:.2}x",
                100.0 * gbs / copy_gbs,
                pair / fused
            );
            rows_out.push(json!({"kernel": format!("norm_rope_{pass}"), "shape": name, "tokens": tokens, "heads": heads, "head_dim": d,
                "time_us": fused, "unfused_time_us": pair, "speedup": pair / fused, "gb_per_s": gbs, "copy_gb_per_s": copy_gbs}));
        }
    }
    Ok(rows_out)
}
