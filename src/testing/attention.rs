//! The CUDA flash attention, forward and backward, against the f64 reference (run by
//! `tools/gpu-check`; no GPU in CI). Inputs are rounded to the 16-bit type (bf16 or f16) first,
//! so the reference sees exactly the kernel's inputs; DESIGN.md's rule sets the bar: the
//! largest error of O, dQ, dK and dV at most twice that of a naive attention in that type on
//! the same inputs (every matmul's output rounded — S, P, O; dP, dS, dQ, dK, dV — as a
//! framework's half-precision matmuls do).
//! The log-sum-exp comes out of f32 math on exact products: within 1e-3. The naive attention
//! is public for the WGSL f16 test (`naive_half`, in bf16 or f16).

use half::bf16;

use crate::kernels::attention::{reference, AttentionParams};
use crate::testing::lora::round_to;
use crate::testing::Rng;
use crate::DType;

/// One shape; `packed` puts example starts every 23 positions (T == S); `kernel` and `bwd`
/// pick the CUDA forward and backward (None: that direction is not run, so each can be checked
/// alone); `dtype` is BF16 or F16.
#[derive(Clone, Debug)]
pub struct FaCase {
    pub p: AttentionParams,
    pub packed: bool,
    pub seed: u64,
    pub kernel: Option<crate::kernels::attention::cuda::FwdKernel>,
    pub bwd: Option<crate::kernels::attention::cuda::BwdKernel>,
    pub dtype: DType,
}

/// The naive attention in `dt` (BF16 or F16; see the module doc) on inputs already in `dt`:
/// `[O, dQ, dK, dV]`.
pub fn naive_half(dt: DType, q: &[f64], k: &[f64], v: &[f64], dout: &[f64], p: &AttentionParams, starts: Option<&[u32]>) -> [Vec<f64>; 4] {
    let (_, o) = lse_and_naive(dt, q, k, v, p, starts);
    let (dq, dk, dv) = naive_backward(dt, q, k, v, dout, p, starts);
    [o, dq, dk, dv]
}

/// f64 log-sum-exp of each query row's scaled scores (`[B, H, T]`) and the naive O in `dt`.
fn lse_and_naive(dt: DType, q: &[f64], k: &[f64], v: &[f64], p: &AttentionParams, starts: Option<&[u32]>) -> (Vec<f64>, Vec<f64>) {
    let round = |x: f32| round_to(dt, x);
    let d = p.head_dim;
    let mut lse = vec![0.0; p.batch * p.heads * p.q_len];
    let mut naive = vec![0.0; p.batch * p.q_len * p.heads * d];
    for b in 0..p.batch {
        for t in 0..p.q_len {
            let (lo, hi) = p.visible(b, t, starts);
            for h in 0..p.heads {
                let g = h / (p.heads / p.kv_heads);
                let qi = ((b * p.q_len + t) * p.heads + h) * d;
                let kv = |j: usize| ((b * p.kv_len + j) * p.kv_heads + g) * d;
                let dots: Vec<f64> = (lo..hi).map(|j| (0..d).map(|e| q[qi + e] * k[kv(j) + e]).sum::<f64>()).collect();
                let s: Vec<f64> = dots.iter().map(|x| p.scale as f64 * x).collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse[(b * p.heads + h) * p.q_len + t] = mx + s.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                // Naive: S rounded, softmax in f32, P rounded, O accumulated then rounded.
                let sb: Vec<f32> = dots.iter().map(|&x| round(x as f32) * p.scale).collect();
                let m32 = sb.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = sb.iter().map(|x| (x - m32).exp()).sum();
                let pb: Vec<f32> = sb.iter().map(|x| round((x - m32).exp() / z)).collect();
                for e in 0..d {
                    let acc: f32 = (lo..hi).zip(&pb).map(|(j, pj)| pj * v[kv(j) + e] as f32).sum();
                    naive[qi + e] = round(acc) as f64;
                }
            }
        }
    }
    (lse, naive)
}

/// The naive backward in `dt` on the same inputs: dQ, dK, dV.
fn naive_backward(dt: DType, q: &[f64], k: &[f64], v: &[f64], dout: &[f64], p: &AttentionParams, starts: Option<&[u32]>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = p.head_dim;
    let r = |x: f64| round_to(dt, x as f32) as f64;
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..p.batch {
        for t in 0..p.q_len {
            let (lo, hi) = p.visible(b, t, starts);
            for h in 0..p.heads {
                let g = h / (p.heads / p.kv_heads);
                let qi = ((b * p.q_len + t) * p.heads + h) * d;
                let kv = |j: usize| ((b * p.kv_len + j) * p.kv_heads + g) * d;
                let s: Vec<f64> = (lo..hi).map(|j| r((0..d).map(|e| q[qi + e] * k[kv(j) + e]).sum::<f64>()) * p.scale as f64).collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let pr: Vec<f64> = s.iter().map(|x| r((x - mx).exp() / z)).collect();
                let o: Vec<f64> = (0..d).map(|e| r((lo..hi).zip(&pr).map(|(j, pj)| pj * v[kv(j) + e]).sum())).collect();
                let dvec: f64 = (0..d).map(|e| dout[qi + e] * o[e]).sum();
                for (jj, j) in (lo..hi).enumerate() {
                    let dp = r((0..d).map(|e| dout[qi + e] * v[kv(j) + e]).sum());
                    let ds = r(pr[jj] * (dp - dvec));
                    for e in 0..d {
                        dq[qi + e] += p.scale as f64 * ds * k[kv(j) + e];
                        dk[kv(j) + e] += p.scale as f64 * ds * q[qi + e];
                        dv[kv(j) + e] += pr[jj] * dout[qi + e];
                    }
                }
            }
        }
    }
    let rr = |x: Vec<f64>| x.into_iter().map(r).collect::<Vec<_>>();
    (rr(dq), rr(dk), rr(dv))
}

/// The largest absolute error; a NaN anywhere counts as an infinite error (`f64::max` alone
/// would skip it).
fn max_err(got: &[f64], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) })
}

/// Where the largest error of `got` against `want` sits, in a `[B, rows, heads, D]` tensor, and
/// how many elements are over `bar`: a layout bug shows in which rows, heads and columns go
/// wrong.
fn worst_at(got: &[f64], want: &[f64], [rows, heads, d]: [usize; 3], bar: f64) -> String {
    let worst = got.iter().zip(want).enumerate().max_by(|x, y| (x.1 .0 - x.1 .1).abs().total_cmp(&(y.1 .0 - y.1 .1).abs())).map_or(0, |(i, _)| i);
    let (e, h, r, b) = (worst % d, worst / d % heads, worst / (d * heads) % rows, worst / (d * heads * rows));
    let bad = got.iter().zip(want).filter(|(g, w)| (*g - *w).abs() > bar).count();
    format!("at b {b} row {r} head {h} d {e} (got {:.4}, want {:.4}); {bad} of {} elements over", got[worst], want[worst], got.len())
}

/// Runs the flash attention forward and backward (each unless None in `c`) in `c.dtype` on
/// CUDA device `index` and checks O, lse, dQ, dK and dV. The backward reads the reference O and
/// lse (rounded as the forward writes them), so its check does not depend on the forward's.
pub fn check_flash_attention_cuda(index: usize, c: &FaCase) -> Result<(), String> {
    use crate::device::cuda::runtime;
    use crate::kernels::attention::cuda;
    use crate::kernels::lora::cuda::Half;
    let (dt, half) = match c.dtype {
        DType::BF16 => (DType::BF16, Half::Bf16),
        DType::F16 => (DType::F16, Half::F16),
        other => return Err(format!("flash attention on CUDA: no {other} kernels (bf16 or f16)")),
    };
    let round = |v: f32| round_to(dt, v);
    let bits = |x: &[f32]| -> Vec<u16> {
        match dt {
            DType::F16 => x.iter().map(|&a| half::f16::from_f32(a).to_bits()).collect(),
            _ => x.iter().map(|&a| bf16::from_f32(a).to_bits()).collect(),
        }
    };
    let value = |b: u16| if dt == DType::F16 { half::f16::from_bits(b).to_f64() } else { bf16::from_bits(b).to_f64() };
    let p = &c.p;
    let e = |e: cudarc::driver::DriverError| format!("{e:?}");
    let mut rng = Rng::new(c.seed);
    let (qn, kn) = (p.batch * p.q_len * p.heads * p.head_dim, p.batch * p.kv_len * p.kv_heads * p.head_dim);
    let mut gen = |n: usize| -> Vec<f32> { rng.vec(n, -1.0, 1.0).into_iter().map(round).collect() };
    let (q, k, v) = (gen(qn), gen(kn), gen(kn));
    let starts: Vec<u32> = (0..p.batch * p.q_len).map(|i| ((i % p.q_len) / 23 * 23) as u32).collect();
    let st = c.packed.then_some(starts.as_slice());
    let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let (q64, k64, v64) = (f(&q), f(&k), f(&v));
    let want = reference::forward(&q64, &k64, &v64, p, st);
    let (want_lse, naive) = lse_and_naive(dt, &q64, &k64, &v64, p, st);

    let rt = runtime(index).map_err(|e| e.to_string())?;
    let s = &rt.stream;
    let (dq, dk, dv) = (s.clone_htod(&bits(&q)).map_err(e)?, s.clone_htod(&bits(&k)).map_err(e)?, s.clone_htod(&bits(&v)).map_err(e)?);
    let dst = s.clone_htod(&starts).map_err(e)?;
    let stv = dst.slice(..);
    if let Some(kernel) = c.kernel {
        let mut o = s.alloc_zeros::<u16>(qn).map_err(e)?;
        let mut lse = s.alloc_zeros::<f32>(p.batch * p.heads * p.q_len).map_err(e)?;
        cuda::forward(kernel, s, &rt.modules, half, &dq.slice(..), &dk.slice(..), &dv.slice(..), c.packed.then_some(&stv), &mut o.slice_mut(..), &mut lse.slice_mut(..), p)
            .map_err(|e| e.to_string())?;
        let got: Vec<f64> = s.clone_dtoh(&o).map_err(e)?.into_iter().map(value).collect();
        let got_lse: Vec<f64> = s.clone_dtoh(&lse).map_err(e)?.into_iter().map(f64::from).collect();
        let (err, bar) = (max_err(&got, &want), 2.0 * max_err(&naive, &want) + 1e-6);
        if err > bar {
            return Err(format!("O: max error {err:.3e} > 2 x naive {dt}'s {:.3e}, {}", bar / 2.0, worst_at(&got, &want, [p.q_len, p.heads, p.head_dim], bar)));
        }
        let rel: Vec<f64> = got_lse.iter().zip(&want_lse).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).collect();
        let lse_err = max_err(&rel, &vec![0.0; rel.len()]);
        if lse_err > 1e-3 {
            return Err(format!("lse: max relative error {lse_err:.3e} > 1e-3"));
        }
    }

    let Some(bwd) = c.bwd else { return Ok(()) };
    // Backward from a random dO, against the f64 reference and the naive bf16 backward.
    let dout: Vec<f32> = rng.vec(qn, -1.0, 1.0).into_iter().map(round).collect();
    let do64 = f(&dout);
    let (wq, wk, wv) = reference::backward(&q64, &k64, &v64, &do64, p, st);
    let (nq, nk, nv) = naive_backward(dt, &q64, &k64, &v64, &do64, p, st);
    let ddo = s.clone_htod(&bits(&dout)).map_err(e)?;
    let want_o: Vec<f32> = want.iter().map(|&x| x as f32).collect();
    let (o, lse) = (s.clone_htod(&bits(&want_o)).map_err(e)?, s.clone_htod(&want_lse.iter().map(|&x| x as f32).collect::<Vec<f32>>()).map_err(e)?);
    let (mut gq, mut gk, mut gv) = (s.alloc_zeros::<u16>(qn).map_err(e)?, s.alloc_zeros::<u16>(kn).map_err(e)?, s.alloc_zeros::<u16>(kn).map_err(e)?);
    cuda::backward(
        bwd,
        s,
        &rt.modules,
        half,
        &dq.slice(..),
        &dk.slice(..),
        &dv.slice(..),
        c.packed.then_some(&stv),
        &o.slice(..),
        &ddo.slice(..),
        &lse.slice(..),
        &mut gq.slice_mut(..),
        &mut gk.slice_mut(..),
        &mut gv.slice_mut(..),
        p,
    )
    .map_err(|e| e.to_string())?;
    let down = |x: &cudarc::driver::CudaSlice<u16>| -> Result<Vec<f64>, String> { Ok(s.clone_dtoh(x).map_err(e)?.into_iter().map(value).collect()) };
    let (q_dims, kv_dims) = ([p.q_len, p.heads, p.head_dim], [p.kv_len, p.kv_heads, p.head_dim]);
    for (name, got, naive, want, dims) in [("dQ", down(&gq)?, &nq, &wq, q_dims), ("dK", down(&gk)?, &nk, &wk, kv_dims), ("dV", down(&gv)?, &nv, &wv, kv_dims)] {
        let (err, bar) = (max_err(&got, want), 2.0 * max_err(naive, want) + 1e-6);
        if err > bar {
            return Err(format!("{name}: max error {err:.3e} > 2 x naive {dt}'s {:.3e}, {}", bar / 2.0, worst_at(&got, want, dims, bar)));
        }
    }
    Ok(())
}
