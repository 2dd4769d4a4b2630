use std::sync::Arc;

use crate::kernels::attention::{cpu, wgsl, AttentionParams};
use crate::kernels::rope::{self, Direction};
use crate::ops::gpu::{WGPU_FLOAT, float_dtype, wgpu_buf, wgpu_output, wgpu_precision, wgpu_upload};
use crate::ops::cuda::{by_float, cuda_buf, half, upload, view, CudaOut};
use crate::ops::{expect_dtype, same_device, saved};
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// Attention masking options (see `kernels::attention`).
#[derive(Clone, Debug)]
pub struct AttentionMask {
    pub causal: bool,
    pub window: Option<usize>,
    /// Packed rows: for each query (`[B*T]`), the position where its example starts; keys
    /// before it are masked. Needs T == S.
    pub segment_starts: Option<Arc<Vec<u32>>>,
}

/// Softmax attention: q `[B, T, H, D]`, k and v `[B, S, G, D]` → `[B, T, H, D]`; grouped-query
/// heads, causal with the cache offset `S - T`, optional sliding window. The forward and the
/// hand-derived backward are `kernels::attention`'s.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: AttentionMask, scale: f32) -> Result<Tensor> {
    const OP: &str = "attention";
    for t in [k, v] {
        same_device(OP, q, t)?;
    }
    let dt = float_dtype(OP, q)?;
    let pr = wgpu_precision(dt);
    for t in [q, k, v] {
        crate::ops::same_dtype(OP, q, t)?;
        if t.shape().rank() != 4 {
            return Err(Error::BadShape { op: OP, shape: t.shape().clone(), expected: "[B, T, heads, D]".into() });
        }
    }
    let (qd, kd) = (q.dims(), k.dims());
    if k.shape() != v.shape() || kd[0] != qd[0] || kd[3] != qd[3] || kd[2] == 0 || qd[2] % kd[2] != 0 {
        return Err(Error::ShapeMismatch { op: "attention (q [B,T,H,D] vs k/v [B,S,G,D], H % G == 0)", lhs: q.shape().clone(), rhs: k.shape().clone() });
    }
    if mask.causal && kd[1] < qd[1] {
        return Err(Error::ShapeMismatch { op: "attention (causal needs S >= T)", lhs: q.shape().clone(), rhs: k.shape().clone() });
    }
    // A window of 0 keys would leave every row without a key (the GPU kernels read 0 as "no
    // window"): refused, so no device gives a different answer.
    if mask.window == Some(0) {
        return Err(Error::InvalidArgument("attention: a sliding window must hold at least one key (got 0; use None for no window)".into()));
    }
    if let Some(starts) = &mask.segment_starts {
        let (b, t) = (qd[0], qd[1]);
        if starts.len() != b * t || kd[1] != t || starts.iter().enumerate().any(|(i, &s)| s as usize > i % t) {
            return Err(Error::InvalidArgument(format!(
                "attention: segment starts must give one start <= its own position per query ({} for [B={b}, T={t}], with S == T)",
                starts.len()
            )));
        }
    }
    let p = AttentionParams {
        batch: qd[0],
        q_len: qd[1],
        kv_len: kd[1],
        heads: qd[2],
        kv_heads: kd[2],
        head_dim: qd[3],
        causal: mask.causal,
        window: mask.window,
        scale,
    };
    let out = match q.device() {
        Device::Cpu => {
            let mut o = vec![0.0f32; q.elem_count()];
            cpu::forward(q.cpu_f32(OP)?, k.cpu_f32(OP)?, v.cpu_f32(OP)?, &mut o, &p, mask.segment_starts.as_deref().map(|v| v.as_slice()));
            Tensor::from_vec(o, q.shape().clone())?
        }
        Device::Wgpu(_) => {
            let (rt, qb) = wgpu_buf(q);
            let o = wgpu_output(OP, rt, q.shape().clone(), dt)?;
            // Per query row: the running max and log-sum-exp, which the backward reuses.
            let stats = rt.alloc(2 * p.batch * p.q_len * p.heads * 4);
            let starts = mask.segment_starts.as_deref().map(|st| wgpu_upload(rt, st));
            let sb = starts.as_ref().map(|b| b.buffer());
            wgsl::forward(wgsl::FwdKernel::Auto, &rt.device, &rt.queue, &rt.kernels, qb, wgpu_buf(k).1, wgpu_buf(v).1, sb, wgpu_buf(&o).1, stats.buffer(), &p, pr.expect(WGPU_FLOAT))?;
            let (sq, sk, sv, so) = (saved(q), saved(k), saved(v), saved(&o));
            return record(OP, o, &[q, k, v], move |g, _| {
                let (rt, qb) = wgpu_buf(&sq);
                const BWD: &str = "attention (backward: dq, dk, dv)";
                let (dq, dk, dv) = (wgpu_output(BWD, rt, sq.shape().clone(), dt)?, wgpu_output(BWD, rt, sk.shape().clone(), dt)?, wgpu_output(BWD, rt, sv.shape().clone(), dt)?);
                let (kb, vb, ob) = (wgpu_buf(&sk).1, wgpu_buf(&sv).1, wgpu_buf(&so).1);
                let sb = starts.as_ref().map(|b| b.buffer());
                wgsl::backward(&rt.device, &rt.queue, &rt.kernels, qb, kb, vb, sb, ob, wgpu_buf(g).1, stats.buffer(), wgpu_buf(&dq).1, wgpu_buf(&dk).1, wgpu_buf(&dv).1, &p, pr.expect(WGPU_FLOAT))?;
                Ok(vec![Some(dq), Some(dk), Some(dv)])
            });
        }
        Device::Cuda(_) => return attention_cuda(q, k, v, &mask, p),
    };
    let (sq, sk, sv) = (saved(q), saved(k), saved(v));
    let starts = mask.segment_starts.clone();
    record(OP, out, &[q, k, v], move |g, _| {
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; sq.elem_count()], vec![0.0f32; sk.elem_count()], vec![0.0f32; sv.elem_count()]);
        cpu::backward(sq.cpu_f32(OP)?, sk.cpu_f32(OP)?, sv.cpu_f32(OP)?, g.cpu_f32(OP)?, &mut dq, &mut dk, &mut dv, &p, starts.as_deref().map(|v| v.as_slice()));
        Ok(vec![
            Some(Tensor::from_vec(dq, sq.shape().clone())?),
            Some(Tensor::from_vec(dk, sk.shape().clone())?),
            Some(Tensor::from_vec(dv, sv.shape().clone())?),
        ])
    })
}

/// Rotary embedding (`rotate_half` convention) of x `[tokens, heads, D]` at `positions`
/// (`[tokens]`, i32) with frequencies `inv_freq` (`[D/2]`, f32, on x's device: a model uploads
/// them once a forward, not once a call). Backward: the inverse rotation.
pub fn rope(x: &Tensor, positions: &Tensor, inv_freq: &Tensor) -> Result<Tensor> {
    const OP: &str = "rope";
    let dt = float_dtype(OP, x)?;
    let pr = wgpu_precision(dt);
    check_rope_args(OP, x, positions, inv_freq)?;
    let heads = x.dims()[1];
    let run = move |x: &Tensor, pos: &Tensor, freq: &Tensor, dir: Direction| -> Result<Tensor> {
        let p = rope::RopeParams { tokens: x.dims()[0], heads, head_dim: 2 * freq.elem_count() };
        match x.device() {
            Device::Cpu => {
                let mut y = vec![0.0f32; x.elem_count()];
                rope::cpu::rope(x.cpu_f32(OP)?, &mut y, pos.cpu_i32(OP)?, freq.cpu_f32(OP)?, heads, dir);
                Tensor::from_vec(y, x.shape().clone())
            }
            Device::Wgpu(_) => {
                let (rt, xb) = wgpu_buf(x);
                let y = wgpu_output(OP, rt, x.shape().clone(), dt)?;
                rope::wgsl::rope(&rt.device, &rt.queue, &rt.kernels, xb, wgpu_buf(pos).1, wgpu_buf(freq).1, wgpu_buf(&y).1, p, dir, pr.expect(WGPU_FLOAT))?;
                Ok(y)
            }
            Device::Cuda(_) => {
                let rt = cuda_buf(x).0;
                let mut y = CudaOut::uninit(rt, x.shape().clone(), dt)?;
                by_float!(dt, T => rope::cuda::rope::<T>(&rt.stream, &rt.modules, &view(x), &view(pos), &view(freq), &mut y.view_mut(), p, dir)?);
                Ok(y.tensor())
            }
        }
    };
    let out = run(x, positions, inv_freq, Direction::Forward)?;
    let (spos, sfreq) = (saved(positions), saved(inv_freq));
    record(OP, out, &[x, positions], move |g, _| Ok(vec![Some(run(g, &spos, &sfreq, Direction::Backward)?), None]))
}

/// x `[tokens, heads, D]`, positions `[tokens]` i32 and inv_freq `[D/2]` f32, all on x's device.
fn check_rope_args(op: &'static str, x: &Tensor, positions: &Tensor, inv_freq: &Tensor) -> Result<()> {
    same_device(op, x, positions)?;
    same_device(op, x, inv_freq)?;
    expect_dtype("rope (positions)", positions, DType::I32)?;
    expect_dtype("rope (inv_freq)", inv_freq, DType::F32)?;
    let d = x.shape().last();
    if x.shape().rank() != 3 || positions.dims() != [x.dims()[0]] {
        return Err(Error::ShapeMismatch { op: "rope (x [tokens, heads, D] vs positions [tokens])", lhs: x.shape().clone(), rhs: positions.shape().clone() });
    }
    if inv_freq.dims() != [d / 2] || !d.is_multiple_of(2) {
        return Err(Error::ShapeMismatch { op: "rope (x [tokens, heads, D] vs inv_freq [D/2], D even)", lhs: x.shape().clone(), rhs: inv_freq.shape().clone() });
    }
    Ok(())
}

/// Per-head RMSNorm then RoPE, `rope(rmsnorm(x, w, eps), positions, inv_freq)`, for x
/// `[tokens, heads, D]` and w `[D]` (Qwen3's q/k norms). On CUDA, for f32 and bf16 with head
/// dims that are multiples of 64 up to 256 ([`rope::norm_rope_fits`]), one kernel each way
/// (`norm_rope_*` in rope.cu) in place of two, and no normed tensor between them; elsewhere the
/// two ops as they are. Both round the normed value to the storage type between the steps.
pub fn rmsnorm_rope(x: &Tensor, w: &Tensor, eps: f32, positions: &Tensor, inv_freq: &Tensor) -> Result<Tensor> {
    const OP: &str = "rmsnorm_rope";
    let dt = x.dtype();
    let d = x.shape().last();
    let fused = matches!(x.device(), Device::Cuda(_)) && matches!(dt, DType::F32 | DType::BF16) && x.shape().rank() == 3 && rope::norm_rope_fits(d);
    if !fused {
        return rope(&crate::ops::rmsnorm(x, w, eps)?, positions, inv_freq);
    }
    same_device(OP, x, w)?;
    crate::ops::same_dtype(OP, x, w)?;
    check_rope_args(OP, x, positions, inv_freq)?;
    let (tokens, heads) = (x.dims()[0], x.dims()[1]);
    if w.dims() != [d] {
        return Err(Error::ShapeMismatch { op: "rmsnorm_rope (weight [D] vs x [tokens, heads, D])", lhs: x.shape().clone(), rhs: w.shape().clone() });
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::InvalidArgument(format!("{OP}: eps must be >= 0, got {eps}")));
    }
    let p = rope::RopeParams { tokens, heads, head_dim: d };
    let rt = cuda_buf(x).0;
    // Not zeroed: the kernels write every element of y, rstd and dx (and dw when asked).
    let mut y = CudaOut::uninit(rt, x.shape().clone(), dt)?;
    let mut rstd = CudaOut::uninit(rt, [tokens * heads], DType::F32)?;
    by_float!(dt, T => rope::cuda::norm_rope_forward::<T>(&rt.stream, &rt.modules, &view(x), &view(w), &view(positions), &view(inv_freq), &mut y.view_mut(), &mut rstd.view_mut(), p, eps)?);
    let (sx, sw, spos, sfreq, rstd) = (saved(x), saved(w), saved(positions), saved(inv_freq), rstd.tensor());
    record(OP, y.tensor(), &[x, w, positions], move |g, needs| {
        let rt = cuda_buf(&sx).0;
        let mut dx = CudaOut::uninit(rt, sx.shape().clone(), dt)?;
        let mut dw = needs[1].then(|| CudaOut::uninit(rt, [d], dt)).transpose()?;
        by_float!(dt, T => rope::cuda::norm_rope_backward::<T>(
            &rt.stream, &rt.modules, &view(&sx), &view(&sw), &view(g), &view(&spos), &view(&sfreq), &view(&rstd),
            &mut dx.view_mut(), dw.as_mut().map(|b| b.view_mut()).as_mut(), p,
        )?);
        Ok(vec![needs[0].then(|| dx.tensor()), dw.map(CudaOut::tensor), None])
    })
}

/// The attention op on CUDA: the flash-attention kernels (`kernels::attention::cuda`, bf16 or
/// f16, head dims 32, 64, 96, 128 and 256; causal, sliding window, packed rows) forward and backward; the row log-sum-exp is kept for the
/// backward. The kernels are `FwdKernel::for_model` and `BwdKernel::for_model`: Hopper's on an
/// H100/H200 at head dims 64 and 128, else the (first) mma.sync one, unless `TUNA_FA_FORWARD`
/// or `TUNA_FA_BACKWARD` names one (tools/gpu-check times them all).
fn attention_cuda(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, p: AttentionParams) -> Result<Tensor> {
    use crate::kernels::attention::cuda as fa;
    const OP: &str = "attention (cuda)";
    let dt = half(OP, q.dtype())?;
    let rt = cuda_buf(q).0;
    let starts = mask.segment_starts.as_deref().map(|s| upload(rt, s)).transpose()?;
    // Not zeroed: the forward kernels write every row of O and lse (`fa_store_out`), and the
    // backward's every row of dK and dV (its epilogue, seen by a query or not) and of dQ (from
    // the zeroed f32 accumulator).
    let mut o = CudaOut::uninit(rt, q.shape().clone(), q.dtype())?;
    let mut lse = CudaOut::uninit(rt, [p.batch * p.heads * p.q_len], DType::F32)?;
    let sv = starts.as_ref().map(|s| s.slice(..));
    fa::forward(fa::FwdKernel::for_model(), &rt.stream, &rt.modules, dt, &view(q), &view(k), &view(v), sv.as_ref(), &mut o.view_mut(), &mut lse.view_mut(), &p)?;
    let (o, lse) = (o.tensor(), lse.tensor());
    let (sq, sk, sv, so) = (saved(q), saved(k), saved(v), saved(&o));
    record("attention", o, &[q, k, v], move |g, _| {
        let rt = cuda_buf(&sq).0;
        let (mut dq, mut dk, mut dv) = (CudaOut::uninit(rt, sq.shape().clone(), sq.dtype())?, CudaOut::uninit(rt, sk.shape().clone(), sk.dtype())?, CudaOut::uninit(rt, sv.shape().clone(), sv.dtype())?);
        let st = starts.as_ref().map(|s| s.slice(..));
        fa::backward(fa::BwdKernel::for_model(), &rt.stream, &rt.modules, dt, &view(&sq), &view(&sk), &view(&sv), st.as_ref(), &view(&so), &view(g), &view(&lse), &mut dq.view_mut(), &mut dk.view_mut(), &mut dv.view_mut(), &p)?;
        Ok(vec![Some(dq.tensor()), Some(dk.tensor()), Some(dv.tensor())])
    })
}
