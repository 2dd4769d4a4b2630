//! The linear group on GPUs (`linear_group`'s wgpu and CUDA paths): each part one fused LoRA
//! GEMM launch forward and backward, f32 adapters of a half-precision model converted inside
//! the op, a frozen NF4 weight read by the NF4 kernels.

use super::lora::{tape_inputs, Dropout, LinearPart, SavedInput};
use crate::kernels::lora::LoraParams;
use crate::ops::{expect_dtype, saved};
use crate::tape::record_many;
use crate::{DType, Error, Result, Tensor};

/// Adds a part's dX contribution (the group's dX is their sum, in part order).
fn accumulate(dx: &mut Option<Tensor>, part: Tensor) -> Result<()> {
    *dx = Some(match dx.take() {
        None => part,
        Some(acc) => crate::ops::add(&acc, &part)?,
    });
    Ok(())
}

/// The device buffers of a frozen NF4 weight on wgpu (QLoRA), read by `nf4_gemm.wgsl`.
fn nf4_buffers(w: &Tensor) -> Option<std::sync::Arc<crate::kernels::nf4::wgsl::Nf4Buffers>> {
    match w.storage() {
        crate::tensor::Storage::WgpuNf4 { buffers, .. } => Some(buffers.clone()),
        _ => None,
    }
}

/// The group on wgpu: each part is one fused LoRA GEMM (`lora_gemm.wgsl`; a plain GEMM when
/// the part has no adapter), and the backward is the same kernels' (`lora::wgsl::backward`:
/// dA, dB and each part's dX, summed in part order on the device). LoRA dropout draws the
/// CPU's mask on the device (`dropout.wgsl`); with it, the launcher's dX is
/// `dY·W + s·(dY·B·A) ∘ mask/(1-p)`. A frozen NF4 weight (QLoRA) runs `nf4_gemm.wgsl`, W
/// dequantized in f32 in the tile loads (in f32 and f16 models).
pub(super) fn linear_group_wgpu(x: &Tensor, parts: &[LinearPart<'_>], params: &[LoraParams], sx: SavedInput) -> Result<Vec<Tensor>> {
    use crate::kernels::lora::wgsl;
    use crate::ops::gpu::{wgpu_buf, wgpu_output};
    const OP: &str = "linear";
    let (rt, xb) = wgpu_buf(x);
    let dt = x.dtype();
    let pr = crate::ops::gpu::wgpu_precision(dt).expect("checked by linear_group");
    let mut outs = Vec::with_capacity(parts.len());
    let mut xas = Vec::with_capacity(parts.len());
    // The adapters in the activations' dtype (f32 masters of an f16 model are converted here),
    // with their own dtypes for the gradients.
    let mut adapters = Vec::with_capacity(parts.len());
    for (part, &p) in parts.iter().zip(params) {
        let w_nf4 = nf4_buffers(part.weight);
        if w_nf4.is_none() {
            expect_dtype(OP, part.weight, dt)?;
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 2") = p.n;
        let y = wgpu_output(OP, rt, shape, dt)?;
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
                let types = if pr == wgsl::Precision::F16 { wgsl::DropoutTypes::F16 } else { wgsl::DropoutTypes::F32 };
                wgsl::dropout(&rt.device, &rt.queue, &rt.kernels, xb, None, xl.buffer(), p.m * p.k, d.p, d.seed, types)?;
                Some((xl, d))
            }
            _ => None,
        };
        let xl = drop.as_ref().map_or(xb, |(b, _)| b.buffer());
        let w = match &w_nf4 {
            Some(q) => wgsl::Weight::Nf4(q),
            None => wgsl::Weight::Dense(wgpu_buf(part.weight).1),
        };
        wgsl::forward(&rt.device, &rt.queue, &rt.kernels, xb, xl, w, bias, a, b, wgpu_buf(&y).1, xa.buffer(), p, pr)?;
        outs.push(y);
        xas.push((xa, drop));
        adapters.push(lora);
    }
    let inputs = tape_inputs(x, parts);
    let (x_shape, rt) = (x.shape().clone(), rt.clone());
    let saved_parts: Vec<_> = parts.iter().zip(params).zip(xas).zip(adapters).map(|(((part, &p), xa), lora)| (saved(part.weight), lora, xa, p)).collect();
    record_many(OP, outs, &inputs, move |gs, needs| {
        // x where a part reads it (an adapter without dropout); else no part reads it (a plain
        // part's backward is dY·W alone, and dropout's dA reads the dropped copy), and a small
        // buffer binds in its place.
        let x_now = sx.get(&x_shape)?;
        let placeholder;
        let xb = match &x_now {
            Some(t) => wgpu_buf(t).1,
            None => {
                placeholder = rt.alloc(16);
                placeholder.buffer()
            }
        };
        let rt = &rt;
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
            let dxi = needs[0].then(|| wgpu_output("linear (backward: dx)", rt, x_shape.clone(), dt)).transpose()?;
            let (da, db, a, b) = match lora {
                Some((a, b, _, _)) => (Some(wgpu_output("linear (backward: dA)", rt, a.shape().clone(), DType::F32)?), Some(wgpu_output("linear (backward: dB)", rt, b.shape().clone(), DType::F32)?), wgpu_buf(a).1, wgpu_buf(b).1),
                None => (None, None, xb, xb),
            };
            // A plain part (R = 0) writes no dA/dB: small scratch buffers bind in their place.
            let scratch = rt.alloc(4);
            let (dab, dbb) = (da.as_ref().map_or(scratch.buffer(), |t| wgpu_buf(t).1), db.as_ref().map_or(scratch.buffer(), |t| wgpu_buf(t).1));
            let xl = drop.as_ref().map_or(xb, |(b, _)| b.buffer());
            let dxb = dxi.as_ref().map(|t| wgpu_buf(t).1);
            let dropout = drop.as_ref().map(|(_, d)| (d.p, d.seed));
            let w_nf4 = nf4_buffers(w);
            let w = match &w_nf4 {
                Some(q) => wgsl::Weight::Nf4(q),
                None => wgsl::Weight::Dense(wgpu_buf(w).1),
            };
            wgsl::backward(&rt.device, &rt.queue, &rt.kernels, wgpu_buf(g).1, xl, xa.buffer(), w, a, b, dab, dbb, dxb, dropout, *p, pr)?;
            debug_assert_eq!(x_shape.elem_count(), m * k);
            if let Some(dxi) = dxi {
                accumulate(&mut dx, dxi)?;
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

/// A frozen CUDA weight as the plain linear kernels take it: its 16-bit view, or its NF4 parts.
enum CudaWeight<'a> {
    Dense(cudarc::driver::CudaView<'a, u16>),
    Nf4(std::sync::Arc<crate::kernels::nf4::cuda::Nf4Device>),
}

impl<'a> CudaWeight<'a> {
    fn of(w: &'a Tensor) -> CudaWeight<'a> {
        match cuda_nf4(w) {
            Some(q) => CudaWeight::Nf4(q),
            None => CudaWeight::Dense(crate::ops::cuda::view(w)),
        }
    }

    fn get(&self) -> crate::kernels::lora::cuda::Weight<'_, 'a> {
        match self {
            CudaWeight::Dense(v) => crate::kernels::lora::cuda::Weight::Dense(v),
            CudaWeight::Nf4(q) => crate::kernels::lora::cuda::Weight::Nf4(q),
        }
    }
}

/// The group on CUDA, bf16: each part is one fused LoRA GEMM (`kernels::lora::cuda`; the
/// plain linear when the part has no adapter) and the backward is the same kernels' (dA and dB
/// in f32, each part's dX summed in part order); a frozen NF4 weight (QLoRA) runs the NF4
/// kernels, W dequantized in the tile loads. f32 adapters (the trainer's masters) are
/// converted to the input's dtype for the GEMM, and their gradients stay f32. LoRA dropout
/// draws the CPU's mask on the device (`lora::cuda::dropout`).
pub(super) fn linear_group_cuda(x: &Tensor, parts: &[LinearPart<'_>], params: &[LoraParams], sx: SavedInput) -> Result<Vec<Tensor>> {
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
        if w.dtype() != DType::NF4 {
            expect_dtype(OP, w, xdt)?;
        }
        let bias = part.bias.map(|b| view::<u16>(b));
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 2") = p.n;
        let mut y = CudaOut::uninit(rt, shape, xdt)?;
        let Some((a, b, _)) = part.lora else {
            lc::linear(s, mods, dt, &view(x), CudaWeight::of(w).get(), bias.as_ref(), &mut y.view_mut(), (p.m, p.n, p.k))?;
            outs.push(y.tensor());
            saved_parts.push(Saved { w: saved(w), lora: None, xa: None, drop: None, p });
            continue;
        };
        let (a16, b16) = (saved(a).to_dtype(xdt)?, saved(b).to_dtype(xdt)?);
        let drop = match part.dropout {
            Some(d) if d.p > 0.0 => {
                // The CUDA dropout kernels are f32 and bf16 (the model's type there).
                if dt != crate::kernels::lora::cuda::Half::Bf16 {
                    return Err(Error::InvalidArgument(format!("{OP}: LoRA dropout on CUDA runs in bf16, not {xdt}")));
                }
                let mut xl = CudaOut::uninit(rt, x.shape().clone(), xdt)?;
                lc::dropout::<u16>(s, mods, &view(x), None, &mut xl.view_mut(), d.p, d.seed)?;
                Some((xl.tensor(), d))
            }
            _ => None,
        };
        let mut xa = CudaOut::uninit(rt, [p.m, p.r], xdt)?;
        let xl = drop.as_ref().map_or(x, |(t, _)| t);
        lc::forward(s, mods, dt, &view(x), &view(xl), CudaWeight::of(w).get(), bias.as_ref(), &view(&a16), &view(&b16), &mut y.view_mut(), &mut xa.view_mut(), p)?;
        outs.push(y.tensor());
        saved_parts.push(Saved { w: saved(w), lora: Some((a16, b16, a.dtype(), b.dtype())), xa: Some(xa.tensor()), drop, p });
    }
    let inputs = tape_inputs(x, parts);
    let (x_shape, rt) = (x.shape().clone(), rt.clone());
    record_many(OP, outs, &inputs, move |gs, needs| {
        let x_now = sx.get(&x_shape)?;
        let rt = &rt;
        let (s, mods) = (&rt.stream, &rt.modules);
        // dX: without dropout, every part's dX GEMM after the first adds into the first's
        // buffer in its epilogue (no separate add); with dropout (whose dX the dropout kernel
        // sums), each part's dX is made apart and the parts are summed by `add`.
        let fuse = saved_parts.iter().all(|sp| sp.drop.is_none());
        let mut sum: Option<CudaOut> = None;
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
            let add = needs[0] && fuse && sum.is_some();
            let mut fresh = (needs[0] && !add).then(|| CudaOut::uninit(rt, x_shape.clone(), xdt)).transpose()?;
            let target = if add { sum.as_mut() } else { fresh.as_mut() };
            match &sp.lora {
                None => {
                    if let Some(t) = target {
                        lc::linear_dx(s, mods, dt, &view(g), CudaWeight::of(&sp.w).get(), &mut t.view_mut(), add, (p.m, p.n, p.k))?;
                    }
                }
                Some((a16, b16, adt, bdt)) => {
                    // Not zeroed: `lc::backward`'s GEMMs write dA and dB whole.
                    let (mut da, mut db) = (CudaOut::uninit(rt, a16.shape().clone(), DType::F32)?, CudaOut::uninit(rt, b16.shape().clone(), DType::F32)?);
                    let xl = match (&sp.drop, &x_now) {
                        (Some((t, _)), _) | (None, Some(t)) => t,
                        (None, None) => unreachable!("SavedInput keeps x for an adapter without dropout"),
                    };
                    let xa = sp.xa.as_ref().expect("a LoRA part keeps XA");
                    let dropout = sp.drop.as_ref().map(|(_, d)| (d.p, d.seed));
                    {
                        let mut dxv = target.map(|t| t.view_mut());
                        let w = CudaWeight::of(&sp.w);
                        lc::backward(s, mods, dt, &view(g), &view(xl), &view(xa), w.get(), &view(a16), &view(b16), &mut da.view_mut(), &mut db.view_mut(), dxv.as_mut(), add, dropout, p)?;
                    }
                    // Gradients in the adapters' own dtypes (f32 masters: as computed).
                    ab.push(Some(da.tensor().to_dtype(*adt)?));
                    ab.push(Some(db.tensor().to_dtype(*bdt)?));
                }
            }
            if let Some(f) = fresh {
                if fuse {
                    sum = Some(f);
                } else {
                    accumulate(&mut dx, f.tensor())?;
                }
            }
        }
        let dx = sum.map(CudaOut::tensor).or(dx);
        let mut out = vec![dx];
        out.extend(ab);
        Ok(out)
    })
}
