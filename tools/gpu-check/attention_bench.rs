//! The CUDA flash attention forward (the first kernel, the pipelined one `flash_attn_fwd_pipe`
//! and, on an H100/H200, Hopper's `flash_attn_fwd_sm90`) and backward (mma.sync, and Hopper's
//! `flash_attn_bwd_sm90`) timed on issue 6's shapes: T in {512, 1k, 2k, 4k, 8k}, head
//! dims 64 and 128, causal or not, bf16, with B·T = 16k tokens and H·D = 2048 (FlashAttention's
//! benchmark setting). TFLOP/s in FlashAttention's count: `4·B·T²·D·H`, halved when causal.
//! `torch_baseline.py` times `scaled_dot_product_attention` on the same shapes after this run.
//! The backward counts 2.5x the forward's FLOPs. Targets (H100): >= 300 TFLOP/s forward and
//! >= 250 backward at D = 128, causal, T = 4k.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;
use serde_json::{json, Value};
use tuna::device::cuda::{hopper, CudaRuntime};
use tuna::kernels::attention::{cuda, AttentionParams};
use tuna::kernels::lora::cuda::Half;
use tuna::testing::Rng;

use crate::time_us;

fn upload(rt: &CudaRuntime, rng: &mut Rng, n: usize) -> tuna::Result<CudaSlice<u16>> {
    let host: Vec<u16> = rng.vec(n, -1.0, 1.0).into_iter().map(|v| bf16::from_f32(v).to_bits()).collect();
    rt.stream.clone_htod(&host).map_err(|e| tuna::Error::Cuda { context: "upload".into(), message: format!("{e:?}") })
}

pub fn attention_benches(rt: &Arc<CudaRuntime>) -> tuna::Result<Vec<Value>> {
    let s = &rt.stream;
    let mut rows = Vec::new();
    let mut rng = Rng::new(9);
    println!("  {:<44} {:>10} {:>10}", "kernel", "time µs", "TFLOP/s");
    // The dims (32 and 96 are checked for correctness, not timed: device time).
    for d in [64, 128] {
        let heads = 2048 / d;
        for t in [512usize, 1024, 2048, 4096, 8192] {
            let batch = 16384 / t;
            let n = batch * t * heads * d;
            let (q, k, v) = (upload(rt, &mut rng, n)?, upload(rt, &mut rng, n)?, upload(rt, &mut rng, n)?);
            let mut o = s.alloc_zeros::<u16>(n).map_err(|e| tuna::Error::Cuda { context: "alloc".into(), message: format!("{e:?}") })?;
            let alloc_err = |e| tuna::Error::Cuda { context: "alloc".into(), message: format!("{e:?}") };
            let mut lse = s.alloc_zeros::<f32>(batch * heads * t).map_err(alloc_err)?;
            let dout = upload(rt, &mut rng, n)?;
            let (mut dq, mut dk, mut dv) = (s.alloc_zeros::<u16>(n).map_err(alloc_err)?, s.alloc_zeros::<u16>(n).map_err(alloc_err)?, s.alloc_zeros::<u16>(n).map_err(alloc_err)?);
            for causal in [false, true] {
                let p = AttentionParams { batch, q_len: t, kv_len: t, heads, kv_heads: heads, head_dim: d, causal, window: None, scale: 1.0 / (d as f32).sqrt() };
                let mut fwd = |kernel| {
                    time_us(rt, || cuda::forward(kernel, s, &rt.modules, Half::Bf16, &q.slice(..), &k.slice(..), &v.slice(..), None, &mut o.slice_mut(..), &mut lse.slice_mut(..), &p))
                };
                let (us, pipe_us) = (fwd(cuda::FwdKernel::Sync)?, fwd(cuda::FwdKernel::Pipelined)?);
                let hopper = rt.modules.compute_capability() == 90 && hopper::mode_for(hopper::Part::Attention) != hopper::Mode::Off;
                let hopper_us = if hopper { Some(fwd(cuda::FwdKernel::Hopper)?) } else { None };
                let mut bwd = |kernel| {
                    time_us(rt, || {
                        cuda::backward(
                            kernel,
                            s,
                            &rt.modules,
                            Half::Bf16,
                            &q.slice(..),
                            &k.slice(..),
                            &v.slice(..),
                            None,
                            &o.slice(..),
                            &dout.slice(..),
                            &lse.slice(..),
                            &mut dq.slice_mut(..),
                            &mut dk.slice_mut(..),
                            &mut dv.slice_mut(..),
                            &p,
                        )
                    })
                };
                let bwd_us = bwd(cuda::BwdKernel::Sync)?;
                let hopper_bwd = rt.modules.compute_capability() == 90 && hopper::mode_for(hopper::Part::AttentionBackward) != hopper::Mode::Off;
                let hopper_bwd_us = if hopper_bwd { Some(bwd(cuda::BwdKernel::Hopper)?) } else { None };
                let flops = 4.0 * (batch * t * t * d * heads) as f64 / if causal { 2.0 } else { 1.0 };
                let mut timed = vec![("flash_attn_fwd", us, flops), ("flash_attn_fwd_pipe", pipe_us, flops), ("flash_attn_bwd", bwd_us, 2.5 * flops)];
                if let Some(h) = hopper_us {
                    timed.push(("flash_attn_fwd_sm90", h, flops));
                }
                if let Some(h) = hopper_bwd_us {
                    timed.push(("flash_attn_bwd_sm90", h, 2.5 * flops));
                }
                for (kernel, us, f) in timed {
                    let tflops = f / us / 1e6;
                    let name = format!("{kernel} bf16 D{d} T{t} B{batch} H{heads}{}", if causal { " causal" } else { "" });
                    println!("  {:<44} {:>10.1} {:>10.1}", name, us, tflops);
                    rows.push(json!({"kernel": kernel, "dtype": "bf16", "d": d, "t": t, "batch": batch, "heads": heads, "causal": causal, "time_us": us, "tflops": tflops}));
                }
            }
        }
    }
    Ok(rows)
}

/// One query row over a KV cache (decoding) at Llama-3-8B's attention shape (32 query heads over
/// 8 key/value heads, D 128, bf16, B 1): the split-KV forward (`FwdKernel::SplitKv`, what the
/// model takes there) against the tiled mma.sync forward on the same call, for caches of 1k to
/// 32k positions. Both must read K and V once at least: GB/s counts those bytes.
pub fn decode_benches(rt: &Arc<CudaRuntime>) -> tuna::Result<Vec<Value>> {
    let s = &rt.stream;
    let mut rows = Vec::new();
    let mut rng = Rng::new(11);
    let (heads, kv_heads, d) = (32, 8, 128);
    let alloc_err = |e| tuna::Error::Cuda { context: "alloc".into(), message: format!("{e:?}") };
    println!("  {:<44} {:>10} {:>10}", "kernel", "time µs", "GB/s");
    for kv_len in [1024usize, 4096, 16384, 32768] {
        let p = AttentionParams { batch: 1, q_len: 1, kv_len, heads, kv_heads, head_dim: d, causal: true, window: None, scale: 1.0 / (d as f32).sqrt() };
        let (q, k, v) = (upload(rt, &mut rng, heads * d)?, upload(rt, &mut rng, kv_len * kv_heads * d)?, upload(rt, &mut rng, kv_len * kv_heads * d)?);
        let mut o = s.alloc_zeros::<u16>(heads * d).map_err(alloc_err)?;
        let mut lse = s.alloc_zeros::<f32>(heads).map_err(alloc_err)?;
        let bytes = (2 * kv_len * kv_heads * d * 2) as f64;
        for (name, kernel) in [("decode split-kv", cuda::FwdKernel::SplitKv), ("decode tiled (flash_attn_fwd)", cuda::FwdKernel::Sync)] {
            let us = time_us(rt, || cuda::forward(kernel, s, &rt.modules, Half::Bf16, &q.slice(..), &k.slice(..), &v.slice(..), None, &mut o.slice_mut(..), &mut lse.slice_mut(..), &p))?;
            let gbs = bytes / us / 1e3;
            println!("  {:<44} {:>10.1} {:>10.0}", format!("{name} S{kv_len}"), us, gbs);
            rows.push(json!({"kernel": name, "dtype": "bf16", "d": d, "kv_len": kv_len, "heads": heads, "kv_heads": kv_heads, "time_us": us, "gbs": gbs}));
        }
    }
    Ok(rows)
}
