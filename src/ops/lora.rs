use rayon::prelude::*;

use crate::kernels::lora::{cpu, LoraParams};
use crate::kernels::matmul::{cpu as mm, MatmulParams};
use crate::ops::{expect_dtype, same_device, saved};
use crate::rng::uniform_at;
use crate::tape::record_many;
use crate::{DType, Device, Error, Result, Tensor};

/// Dropout on the LoRA input: element i is kept when `uniform_at(seed, i) >= p`, and scaled by
/// `1 / (1 - p)`.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// One linear of a group: `x·Wᵀ (+ bias) (+ scale·(dropout(x)·Aᵀ)·Bᵀ)`. W and the bias are
/// frozen; A and B (when present) are trained.
#[derive(Clone, Copy)]
pub struct LinearPart<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    /// (A `[R, K]`, B `[N, R]`, scale).
    pub lora: Option<(&'a Tensor, &'a Tensor, f32)>,
    pub dropout: Option<Dropout>,
}

/// The fused LoRA linear `x·Wᵀ (+ bias) + scale·(dropout(x)·Aᵀ)·Bᵀ` of `kernels::lora` (see
/// there for the backward). x `[..., K]`, W `[N, K]`, A `[R, K]`, B `[N, R]`. W and the bias
/// are frozen: they are not inputs on the tape and get no gradient; x, A and B get theirs.
pub fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor, scale: f32, dropout: Option<Dropout>) -> Result<Tensor> {
    let part = LinearPart { weight: w, bias, lora: Some((a, b, scale)), dropout };
    Ok(linear_group(x, &[part])?.remove(0))
}

/// Several linears of the same input (q, k, v; gate, up) as one op: the products run side by
/// side (two GEMMs at once use the CPU's cores better than one GEMM split in two), and the
/// backward sums the parts' contributions to dx in a fixed order, so results do not depend
/// on thread timing.
pub fn linear_group(x: &Tensor, parts: &[LinearPart<'_>]) -> Result<Vec<Tensor>> {
    const OP: &str = "linear";
    let dt = crate::ops::gpu::float_dtype(OP, x)?;
    let k = x.shape().last();
    let m = x.shape().rows();
    let mut params = Vec::with_capacity(parts.len());
    for part in parts {
        let w = part.weight;
        for t in [Some(w), part.bias, part.lora.map(|l| l.0), part.lora.map(|l| l.1)].into_iter().flatten() {
            same_device(OP, x, t)?;
            // The frozen weight may be NF4 (QLoRA): read dequantized, one op at a time. On a GPU
            // the adapters may be f32 masters of a bf16/f16 model (converted inside the op).
            let nf4_weight = std::ptr::eq(t, w) && t.dtype() == DType::NF4 && (dt == DType::F32 || matches!(x.device(), Device::Cuda(_)));
            let master = !std::ptr::eq(t, w) && part.bias.is_none_or(|b| !std::ptr::eq(t, b)) && x.device() != Device::Cpu && t.dtype() == DType::F32;
            if !nf4_weight && !master {
                expect_dtype(OP, t, dt)?;
            }
        }
        let wd = w.dims();
        if x.shape().rank() < 2 || wd.len() != 2 || wd[1] != k {
            return Err(Error::ShapeMismatch { op: "linear (x [.., K] vs W [N, K])", lhs: x.shape().clone(), rhs: w.shape().clone() });
        }
        let n = wd[0];
        if let Some(b) = part.bias {
            if b.dims() != [n] {
                return Err(Error::ShapeMismatch { op: "linear (bias [N] vs W [N, K])", lhs: w.shape().clone(), rhs: b.shape().clone() });
            }
        }
        let r = match part.lora {
            Some((a, b, _)) => {
                let (ad, bd) = (a.dims(), b.dims());
                if ad.len() != 2 || ad[1] != k || bd != [n, ad[0]] {
                    return Err(Error::ShapeMismatch { op: "lora_linear (A [R, K] vs B [N, R])", lhs: a.shape().clone(), rhs: b.shape().clone() });
                }
                ad[0]
            }
            None => 0,
        };
        if let Some(d) = part.dropout {
            if !(0.0..1.0).contains(&d.p) {
                return Err(Error::InvalidArgument(format!("lora dropout must be in [0, 1), got {}", d.p)));
            }
        }
        params.push(LoraParams { m, n, k, r, scale: part.lora.map_or(0.0, |l| l.2) });
    }
    match x.device() {
        Device::Cpu => {}
        Device::Wgpu(_) => return linear_group_wgpu(x, parts, &params),
        Device::Cuda(_) => return linear_group_cuda(x, parts, &params),
    }
    let xv = x.cpu_f32(OP)?;
    struct Fwd {
        y: Vec<f32>,
        xa: Vec<f32>,
        /// Dropout's scaled keep-mask and the dropped input, kept for the backward.
        drop: Option<(Vec<f32>, Vec<f32>)>,
    }
    let fwd: Vec<Fwd> = parts
        .par_iter()
        .zip(&params)
        .map(|(part, &p)| -> Result<Fwd> {
            let bias = part.bias.map(|b| b.cpu_f32(OP)).transpose()?;
            // W is read transposed (the GEMM's fastest layout): an f32 W through its cached
            // transpose, an NF4 W dequantized and transposed for this op only.
            let w_transposed = !part.weight.is_tracked();
            let w = if w_transposed { part.weight.cpu_f32_transposed(OP)? } else { part.weight.cpu_f32_weight(OP)? };
            let w: &[f32] = &w;
            let Some((a, b, _)) = part.lora else {
                let mut y = mm::matmul_new(xv, w, MatmulParams { m: p.m, n: p.n, k: p.k, trans_a: false, trans_b: !w_transposed })?;
                if let Some(bias) = bias {
                    y.par_chunks_mut(p.n).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
                }
                return Ok(Fwd { y, xa: Vec::new(), drop: None });
            };
            let drop = part.dropout.filter(|d| d.p > 0.0).map(|d| {
                let keep = 1.0 / (1.0 - d.p);
                let scale: Vec<f32> = (0..xv.len()).map(|i| if uniform_at(d.seed, i as u64) >= d.p { keep } else { 0.0 }).collect();
                let dropped: Vec<f32> = xv.iter().zip(&scale).map(|(v, s)| v * s).collect();
                (scale, dropped)
            });
            let x_lora = drop.as_ref().map_or(xv, |d| d.1.as_slice());
            let (y, xa) = cpu::forward(xv, x_lora, w, w_transposed, bias, a.cpu_f32(OP)?, b.cpu_f32(OP)?, p)?;
            Ok(Fwd { y, xa, drop })
        })
        .collect::<Result<_>>()?;

    let mut outs = Vec::with_capacity(parts.len());
    let mut saved_parts = Vec::with_capacity(parts.len());
    for ((part, f), &p) in parts.iter().zip(fwd).zip(&params) {
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 2") = p.n;
        outs.push(Tensor::from_vec(f.y, shape)?);
        saved_parts.push((saved(part.weight), part.lora.map(|(a, b, _)| (saved(a), saved(b))), f.xa, f.drop, p));
    }
    let mut inputs: Vec<&Tensor> = vec![x];
    for part in parts {
        if let Some((a, b, _)) = part.lora {
            inputs.push(a);
            inputs.push(b);
        }
    }
    let sx = saved(x);
    record_many(OP, outs, &inputs, move |gs, needs| {
        let want_dx = needs[0];
        let xv = sx.cpu_f32(OP)?;
        // Per part: (dx contribution, dA, dB), computed side by side.
        type PartGrads = (Option<Vec<f32>>, Option<(Tensor, Tensor)>);
        let per_part: Vec<PartGrads> = saved_parts
            .par_iter()
            .zip(gs.par_iter())
            .map(|((w, lora, xa, drop, p), g)| -> Result<PartGrads> {
                let Some(g) = g else { return Ok((None, None)) };
                let (gv, wv) = (g.cpu_f32(OP)?, w.cpu_f32_weight(OP)?);
                let wv: &[f32] = &wv;
                let Some((a, b)) = lora else {
                    let dx = if want_dx { Some(mm::matmul_new(gv, wv, MatmulParams { m: p.m, n: p.k, k: p.n, trans_a: false, trans_b: false })?) } else { None };
                    return Ok((dx, None));
                };
                let (mut da, mut db) = (vec![0.0f32; p.r * p.k], vec![0.0f32; p.n * p.r]);
                let x_lora = drop.as_ref().map_or(xv, |d| d.1.as_slice());
                let dx = cpu::backward(gv, x_lora, xa, wv, a.cpu_f32(OP)?, b.cpu_f32(OP)?, drop.as_ref().map(|d| d.0.as_slice()), want_dx, &mut da, &mut db, *p)?;
                Ok((dx, Some((Tensor::from_vec(da, a.shape().clone())?, Tensor::from_vec(db, b.shape().clone())?))))
            })
            .collect::<Result<_>>()?;
        // dx: the parts' contributions summed in part order.
        let mut dx: Option<Vec<f32>> = None;
        let mut ab = Vec::new();
        for ((dxi, grads), part) in per_part.into_iter().zip(&saved_parts) {
            if let Some(dxi) = dxi {
                match &mut dx {
                    None => dx = Some(dxi),
                    Some(acc) => acc.par_iter_mut().zip(dxi.par_iter()).for_each(|(a, b)| *a += b),
                }
            }
            if part.1.is_some() {
                let (da, db) = grads.map_or((None, None), |(a, b)| (Some(a), Some(b)));
                ab.push(da);
                ab.push(db);
            }
        }
        let mut out = vec![dx.map(|d| Tensor::from_vec(d, sx.shape().clone())).transpose()?];
        out.extend(ab);
        Ok(out)
    })
}

/// The group on wgpu: each part is one fused LoRA GEMM (`lora_gemm.wgsl`; a plain GEMM when
/// the part has no adapter), and the backward is the same kernels' (`lora::wgsl::backward`:
/// dA, dB and each part's dX, summed in part order on the device). LoRA dropout draws the
/// CPU's mask on the device (`dropout.wgsl`); with it, the launcher's dX is
/// `dY·W + s·(dY·B·A) ∘ mask/(1-p)`. A frozen NF4 weight (QLoRA) runs `nf4_gemm.wgsl`, W
/// dequantized in the tile loads.
/// The device buffers of a frozen NF4 weight on wgpu (QLoRA), read by `nf4_gemm.wgsl`.
fn nf4_buffers(w: &Tensor) -> Option<std::sync::Arc<crate::kernels::nf4::wgsl::Nf4Buffers>> {
    match w.storage() {
        crate::tensor::Storage::WgpuNf4 { buffers, .. } => Some(buffers.clone()),
        _ => None,
    }
}

fn linear_group_wgpu(x: &Tensor, parts: &[LinearPart<'_>], params: &[LoraParams]) -> Result<Vec<Tensor>> {
    use crate::kernels::lora::wgsl;
    use crate::ops::gpu::{wgpu_buf, wgpu_output};
    const OP: &str = "linear";
    let (rt, xb) = wgpu_buf(x);
    let dt = x.dtype();
    let pr = crate::ops::gpu::wgpu_precision(dt).expect("checked by linear_group");
    if pr == wgsl::Precision::F16 && parts.iter().any(|part| part.dropout.is_some_and(|d| d.p > 0.0)) {
        return Err(Error::InvalidArgument("linear in f16 on wgpu: LoRA dropout runs in f32 only (train with --lora-dropout 0, or in f32)".into()));
    }
    let mut outs = Vec::with_capacity(parts.len());
    let mut xas = Vec::with_capacity(parts.len());
    // The adapters in the activations' dtype (f32 masters of an f16 model are converted here),
    // with their own dtypes for the gradients.
    let mut adapters = Vec::with_capacity(parts.len());
    for (part, &p) in parts.iter().zip(params) {
        let w_nf4 = nf4_buffers(part.weight);
        match &w_nf4 {
            None => expect_dtype(OP, part.weight, dt)?,
            Some(_) if pr == wgsl::Precision::F16 => return Err(Error::InvalidArgument(format!("{OP} in f16 on wgpu: NF4 weights run in f32 only"))),
            Some(_) => {}
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 2") = p.n;
        let y = wgpu_output(rt, shape, dt);
        let xa = rt.alloc(4 * p.m * p.r.max(1));
        let lora = part.lora.map(|(a, b, _)| -> Result<_> { Ok((saved(a).to_dtype(dt)?, saved(b).to_dtype(dt)?, a.dtype(), b.dtype())) }).transpose()?;
        // Without an adapter (R = 0) the LoRA operands are never read; any buffer binds.
        let (a, b) = match &lora {
            Some((a, b, _, _)) => (wgpu_buf(a).1, wgpu_buf(b).1),
            None => (xb, xb),
        };
        let bias = part.bias.map(|b| wgpu_buf(b).1);
        // The dropped input (kept for dA), when the part has dropout.
        let drop = match (part.lora, part.dropout) {
            (Some(_), Some(d)) if d.p > 0.0 => {
                let xl = rt.alloc(4 * p.m * p.k);
                wgsl::dropout(&rt.device, &rt.queue, &rt.kernels, xb, None, xl.buffer(), p.m * p.k, d.p, d.seed)?;
                Some((xl, d))
            }
            _ => None,
        };
        let xl = drop.as_ref().map_or(xb, |(b, _)| b.buffer());
        match &w_nf4 {
            Some(wq) => crate::kernels::nf4::wgsl::lora_forward(&rt.device, &rt.queue, &rt.kernels, xb, xl, wq, bias, a, b, wgpu_buf(&y).1, xa.buffer(), p)?,
            None => wgsl::forward(&rt.device, &rt.queue, &rt.kernels, xb, xl, wgpu_buf(part.weight).1, bias, a, b, wgpu_buf(&y).1, xa.buffer(), p, pr)?,
        }
        outs.push(y);
        xas.push((xa, drop));
        adapters.push(lora);
    }
    let mut inputs: Vec<&Tensor> = vec![x];
    for part in parts {
        if let Some((a, b, _)) = part.lora {
            inputs.push(a);
            inputs.push(b);
        }
    }
    let sx = saved(x);
    let saved_parts: Vec<_> = parts.iter().zip(params).zip(xas).zip(adapters).map(|(((part, &p), xa), lora)| (saved(part.weight), lora, xa, p)).collect();
    record_many(OP, outs, &inputs, move |gs, needs| {
        let (rt, xb) = wgpu_buf(&sx);
        let mut dx: Option<Tensor> = None;
        let mut ab = Vec::new();
        for ((w, lora, (xa, drop), p), g) in saved_parts.iter().zip(gs) {
            let (m, k) = (p.m, p.k);
            let Some(g) = g else {
                if lora.is_some() {
                    ab.extend([None, None]);
                }
                continue;
            };
            let dxi = needs[0].then(|| wgpu_output(rt, sx.shape().clone(), dt));
            let (da, db, a, b) = match lora {
                Some((a, b, _, _)) => (Some(wgpu_output(rt, a.shape().clone(), DType::F32)), Some(wgpu_output(rt, b.shape().clone(), DType::F32)), wgpu_buf(a).1, wgpu_buf(b).1),
                None => (None, None, xb, xb),
            };
            // A plain part (R = 0) writes no dA/dB: small scratch buffers bind in their place.
            let scratch = rt.alloc(4);
            let (dab, dbb) = (da.as_ref().map_or(scratch.buffer(), |t| wgpu_buf(t).1), db.as_ref().map_or(scratch.buffer(), |t| wgpu_buf(t).1));
            let xl = drop.as_ref().map_or(xb, |(b, _)| b.buffer());
            let dxb = dxi.as_ref().map(|t| wgpu_buf(t).1);
            let dropout = drop.as_ref().map(|(_, d)| (d.p, d.seed));
            match nf4_buffers(w) {
                Some(wq) => crate::kernels::nf4::wgsl::lora_backward(&rt.device, &rt.queue, &rt.kernels, wgpu_buf(g).1, xl, xa.buffer(), &wq, a, b, dab, dbb, dxb, dropout, *p)?,
                None => wgsl::backward(&rt.device, &rt.queue, &rt.kernels, wgpu_buf(g).1, xl, xa.buffer(), wgpu_buf(w).1, a, b, dab, dbb, dxb, dropout, *p, pr)?,
            }
            debug_assert_eq!(sx.elem_count(), m * k);
            if let Some(dxi) = dxi {
                dx = Some(match dx {
                    None => dxi,
                    Some(acc) => crate::ops::add(&acc, &dxi)?,
                });
            }
            if let Some((_, _, adt, bdt)) = lora {
                // dA, dB are f32; an f16 adapter gets them in f16.
                ab.push(da.map(|t| t.to_dtype(*adt)).transpose()?);
                ab.push(db.map(|t| t.to_dtype(*bdt)).transpose()?);
            }
        }
        let mut out = vec![dx];
        out.extend(ab);
        Ok(out)
    })
}

/// The device buffers of a frozen NF4 weight on CUDA (QLoRA), read by the NF4 GEMM kernels.
fn cuda_nf4(w: &Tensor) -> Option<std::sync::Arc<crate::kernels::nf4::cuda::Nf4Device>> {
    match w.storage() {
        crate::tensor::Storage::CudaNf4 { buffers, .. } => Some(buffers.clone()),
        _ => None,
    }
}

/// The group on CUDA, bf16: each part is one fused LoRA GEMM (`kernels::lora::cuda`; the
/// plain linear when the part has no adapter) and the backward is the same kernels' (dA and dB
/// in f32, each part's dX summed in part order); a frozen NF4 weight (QLoRA) runs the NF4
/// kernels, W dequantized in the tile loads. f32 adapters (the trainer's masters) are
/// converted to the input's dtype for the GEMM, and their gradients stay f32. LoRA dropout
/// draws the CPU's mask on the device (`lora::cuda::dropout`).
fn linear_group_cuda(x: &Tensor, parts: &[LinearPart<'_>], params: &[LoraParams]) -> Result<Vec<Tensor>> {
    use crate::kernels::lora::cuda as lc;
    use crate::ops::cuda::{cuda_buf, half, view, CudaOut};
    const OP: &str = "linear (cuda)";
    let xdt = x.dtype();
    let dt = half(OP, xdt)?;
    let rt = cuda_buf(x).0;
    let (s, mods) = (&rt.stream, &rt.modules);
    // What the backward keeps of a part: W, the adapters' 16-bit copies with their own dtypes,
    // XA, and the dropped input with the dropout that made it.
    struct Saved {
        w: Tensor,
        lora: Option<(Tensor, Tensor, DType, DType)>,
        xa: Option<Tensor>,
        drop: Option<(Tensor, Dropout)>,
        p: LoraParams,
    }
    let mut outs = Vec::with_capacity(parts.len());
    let mut saved_parts = Vec::with_capacity(parts.len());
    for (part, &p) in parts.iter().zip(params) {
        let w = part.weight;
        let w_nf4 = cuda_nf4(w);
        if w_nf4.is_none() {
            expect_dtype(OP, w, xdt)?;
        }
        let bias = part.bias.map(|b| view::<u16>(b));
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 2") = p.n;
        let mut y = CudaOut::new(rt, shape, xdt)?;
        let Some((a, b, _)) = part.lora else {
            match &w_nf4 {
                Some(wq) => crate::kernels::nf4::cuda::linear(s, mods, dt, &view(x), wq, bias.as_ref(), &mut y.view_mut(), (p.m, p.n, p.k))?,
                None => lc::linear(s, mods, dt, &view(x), &view(w), bias.as_ref(), &mut y.view_mut(), (p.m, p.n, p.k))?,
            }
            outs.push(y.tensor());
            saved_parts.push(Saved { w: saved(w), lora: None, xa: None, drop: None, p });
            continue;
        };
        let (a16, b16) = (saved(a).to_dtype(xdt)?, saved(b).to_dtype(xdt)?);
        let drop = match part.dropout {
            Some(d) if d.p > 0.0 => {
                let mut xl = CudaOut::new(rt, x.shape().clone(), xdt)?;
                lc::dropout::<u16>(s, mods, &view(x), None, &mut xl.view_mut(), d.p, d.seed)?;
                Some((xl.tensor(), d))
            }
            _ => None,
        };
        let mut xa = CudaOut::new(rt, [p.m, p.r], xdt)?;
        let xl = drop.as_ref().map_or(x, |(t, _)| t);
        match &w_nf4 {
            Some(wq) => crate::kernels::nf4::cuda::lora_forward(s, mods, dt, &view(x), &view(xl), wq, bias.as_ref(), &view(&a16), &view(&b16), &mut y.view_mut(), &mut xa.view_mut(), p)?,
            None => lc::forward(s, mods, dt, &view(x), &view(xl), &view(w), bias.as_ref(), &view(&a16), &view(&b16), &mut y.view_mut(), &mut xa.view_mut(), p)?,
        }
        outs.push(y.tensor());
        saved_parts.push(Saved { w: saved(w), lora: Some((a16, b16, a.dtype(), b.dtype())), xa: Some(xa.tensor()), drop, p });
    }
    let mut inputs: Vec<&Tensor> = vec![x];
    for part in parts {
        if let Some((a, b, _)) = part.lora {
            inputs.push(a);
            inputs.push(b);
        }
    }
    let sx = saved(x);
    record_many(OP, outs, &inputs, move |gs, needs| {
        let rt = cuda_buf(&sx).0;
        let (s, mods) = (&rt.stream, &rt.modules);
        let mut dx: Option<Tensor> = None;
        let mut ab = Vec::new();
        for (sp, g) in saved_parts.iter().zip(gs) {
            let p = sp.p;
            let Some(g) = g else {
                if sp.lora.is_some() {
                    ab.extend([None, None]);
                }
                continue;
            };
            let mut dxi = needs[0].then(|| CudaOut::new(rt, sx.shape().clone(), xdt)).transpose()?;
            match &sp.lora {
                None => {
                    if let Some(dxi) = dxi.as_mut() {
                        match cuda_nf4(&sp.w) {
                            Some(wq) => crate::kernels::nf4::cuda::linear_dx(s, mods, dt, &view(g), &wq, &mut dxi.view_mut(), (p.m, p.n, p.k))?,
                            None => lc::matmul(s, mods, dt, (&view(g), p.n), (&view(&sp.w), p.k), &mut dxi.view_mut(), (p.m, p.k, p.n), true)?,
                        }
                    }
                }
                Some((a16, b16, adt, bdt)) => {
                    let (mut da, mut db) = (CudaOut::new(rt, a16.shape().clone(), DType::F32)?, CudaOut::new(rt, b16.shape().clone(), DType::F32)?);
                    let xl = sp.drop.as_ref().map_or(&sx, |(t, _)| t);
                    let xa = sp.xa.as_ref().expect("a LoRA part keeps XA");
                    let dropout = sp.drop.as_ref().map(|(_, d)| (d.p, d.seed));
                    {
                        let mut dxv = dxi.as_mut().map(|d| d.view_mut());
                        match cuda_nf4(&sp.w) {
                            Some(wq) => crate::kernels::nf4::cuda::lora_backward(s, mods, dt, &view(g), &view(xl), &view(xa), &wq, &view(a16), &view(b16), &mut da.view_mut(), &mut db.view_mut(), dxv.as_mut(), dropout, p)?,
                            None => lc::backward(s, mods, dt, &view(g), &view(xl), &view(xa), &view(&sp.w), &view(a16), &view(b16), &mut da.view_mut(), &mut db.view_mut(), dxv.as_mut(), dropout, p)?,
                        }
                    }
                    // Gradients in the adapters' own dtypes (f32 masters: as computed).
                    ab.push(Some(da.tensor().to_dtype(*adt)?));
                    ab.push(Some(db.tensor().to_dtype(*bdt)?));
                }
            }
            if let Some(dxi) = dxi {
                let dxi = dxi.tensor();
                dx = Some(match dx {
                    None => dxi,
                    Some(acc) => crate::ops::add(&acc, &dxi)?,
                });
            }
        }
        let mut out = vec![dx];
        out.extend(ab);
        Ok(out)
    })
}
