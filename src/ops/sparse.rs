use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::matmul::{cpu as mm, MatmulParams};
use crate::kernels::sparse::{self, check, cpu, DeviceIndices, SparseIndices, SparseParams};
use crate::ops::{expect_dtype, same_device, saved};
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// The linear of sparse fine-tuning: `x·(W + scatter(δ))ᵀ (+ bias)`, with δ `[nnz]` the
/// values at the sorted flat `indices` of the `[N, K]` weight (see `kernels::sparse`; on the
/// CPU δ is folded into a transient copy of W when that is cheaper than the SpMM, and dδ is
/// the SDDMM below 10% density, else gathered from the dense dW; on a GPU δ is always folded
/// and dδ always gathered). x, W and δ get gradients when tracked: dW (dense, `dyᵀ·x`) only
/// when W itself is tracked, which the trainer asks for when it scores regrowth by gradients.
/// The bias is frozen. δ and dδ are f32 on every device; x, W and the bias share the model's
/// dtype; dW is f32 on every device too (on a GPU the GEMM accumulates it in f32 from half
/// operands).
pub fn sparse_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, indices: &Arc<SparseIndices>, delta: &Tensor) -> Result<Tensor> {
    const OP: &str = "sparse_linear";
    // f32 on the CPU, the model's half type on a GPU (f16 on wgpu, bf16 on CUDA).
    let dt = crate::ops::gpu::float_dtype(OP, x)?;
    for t in [Some(w), Some(delta), bias].into_iter().flatten() {
        same_device(OP, x, t)?;
        expect_dtype(OP, t, if std::ptr::eq(t, delta) { DType::F32 } else { dt })?;
    }
    let (wd, k) = (w.dims(), x.shape().last());
    if x.shape().rank() < 2 || wd.len() != 2 || wd[1] != k {
        return Err(Error::ShapeMismatch { op: "sparse_linear (x [.., K] vs W [N, K])", lhs: x.shape().clone(), rhs: w.shape().clone() });
    }
    let n = wd[0];
    if let Some(b) = bias {
        if b.dims() != [n] {
            return Err(Error::ShapeMismatch { op: "sparse_linear (bias [N] vs W [N, K])", lhs: w.shape().clone(), rhs: b.shape().clone() });
        }
    }
    if delta.shape().rank() != 1 {
        return Err(Error::BadShape { op: OP, shape: delta.shape().clone(), expected: "a vector of sparse values".into() });
    }
    let p = SparseParams { m: x.shape().rows(), n, k };
    check(OP, x.elem_count(), indices, delta.elem_count(), p)?;
    if x.device() != Device::Cpu {
        return sparse_linear_gpu(x, w, bias, indices, delta, p);
    }
    let (xv, wv, dv) = (x.cpu_f32(OP)?, w.cpu_f32(OP)?, delta.cpu_f32(OP)?);
    let fold = cpu::fold_delta(p, indices.len());
    let w_eff = fold.then(|| cpu::with_delta(wv, indices, dv));
    let mut y = mm::matmul_new(xv, w_eff.as_deref().unwrap_or(wv), MatmulParams { m: p.m, n, k, trans_a: false, trans_b: true })?;
    drop(w_eff);
    if let Some(b) = bias {
        let b = b.cpu_f32(OP)?;
        y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    if !fold {
        cpu::spmm_add(xv, indices, dv, &mut y, p);
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 2") = n;
    let out = Tensor::from_vec(y, shape)?;
    let (sx, sw, sd, idx) = (saved(x), saved(w), saved(delta), indices.clone());
    record(OP, out, &[x, w, delta], move |g, needs| {
        let (gv, xv, wv, dv) = (g.cpu_f32(OP)?, sx.cpu_f32(OP)?, sw.cpu_f32(OP)?, sd.cpu_f32(OP)?);
        let dx = if needs[0] {
            let dp = MatmulParams { m: p.m, n: p.k, k: p.n, trans_a: false, trans_b: false };
            let dx = if cpu::fold_delta(p, idx.len()) {
                mm::matmul_new(gv, &cpu::with_delta(wv, &idx, dv), dp)?
            } else {
                let mut dx = mm::matmul_new(gv, wv, dp)?;
                cpu::spmm_t_add(gv, &idx, dv, &mut dx, p);
                dx
            };
            Some(Tensor::from_vec(dx, sx.shape().clone())?)
        } else {
            None
        };
        // The dense dW when W is tracked, or when it is the cheaper way to dδ (from 10% density).
        let dense = if needs[1] || (needs[2] && !cpu::sddmm_is_cheaper(p, idx.len())) {
            Some(mm::matmul_new(gv, xv, MatmulParams { m: p.n, n: p.k, k: p.m, trans_a: true, trans_b: false })?)
        } else {
            None
        };
        let dd = match (needs[2], &dense) {
            (false, _) => None,
            (true, Some(dw)) => Some(Tensor::from_vec(cpu::gather(dw, &idx), sd.shape().clone())?),
            (true, None) => Some(Tensor::from_vec(cpu::sddmm(gv, xv, &idx, p), sd.shape().clone())?),
        };
        let dw = if needs[1] { dense.map(|d| Tensor::from_vec(d, sw.shape().clone())).transpose()? } else { None };
        Ok(vec![dx, dw, dd])
    })
}

/// `W + scatter(δ)` as a new tensor in W's dtype on W's device (not recorded): a copy of W with
/// δ added at the indices by `kernels::sparse`'s apply kernel.
fn with_delta_gpu(w: &Tensor, idx: &DeviceIndices, delta: &Tensor) -> Result<Tensor> {
    const OP: &str = "sparse_linear";
    let nnz = delta.elem_count();
    match idx {
        DeviceIndices::Wgpu(ib) => {
            use crate::ops::gpu::{wgpu_buf, wgpu_precision};
            let pr = wgpu_precision(w.dtype()).ok_or(Error::UnsupportedDType { op: OP, dtype: w.dtype() })?;
            let out = w.copy()?;
            let (rt, ob) = wgpu_buf(&out);
            sparse::wgsl::apply(&rt.device, &rt.queue, &rt.kernels, ib.buffer(), wgpu_buf(delta).1, nnz, ob, w.elem_count(), pr)?;
            Ok(out)
        }
        DeviceIndices::Cuda(ib) => {
            use crate::ops::cuda::{cuda_buf, view, CudaOut};
            let rt = cuda_buf(w).0;
            let mut out = CudaOut::copy_of(w)?;
            sparse::cuda::apply(&rt.stream, &rt.modules, &ib.slice(..nnz), &view::<f32>(delta), out.buf_mut(), w.dtype(), w.elem_count())?;
            Ok(out.tensor())
        }
    }
}

/// `dW = dyᵀ·x` `[N, K]` in f32 from half (or f32) dy `[M, N]` and x `[M, K]`: f32 so that dδ
/// gathered from it carries no extra rounding, and a loss-scaled f16 backward cannot overflow
/// in it (it sums over every token).
fn dense_dw_f32(dy: &Tensor, x: &Tensor, p: SparseParams) -> Result<Tensor> {
    const OP: &str = "sparse_linear (dW)";
    match dy.device() {
        Device::Wgpu(_) => {
            use crate::kernels::lora::wgsl as gemm;
            use crate::ops::gpu::{wgpu_buf, wgpu_output, wgpu_precision};
            let pr = wgpu_precision(dy.dtype()).ok_or(Error::UnsupportedDType { op: OP, dtype: dy.dtype() })?;
            let (rt, db) = wgpu_buf(dy);
            let out = wgpu_output(OP, rt, [p.n, p.k], DType::F32)?;
            gemm::matmul_out(&rt.device, &rt.queue, &rt.kernels, (db, gemm::transposed(p.n)), (wgpu_buf(x).1, gemm::plain(p.k)), wgpu_buf(&out).1, (p.n, p.k, p.m), pr, true)?;
            Ok(out)
        }
        Device::Cuda(_) => {
            use crate::kernels::lora::cuda::{matmul_tn, GemmOut};
            use crate::ops::cuda::{cuda_buf, half, view, CudaOut};
            let hdt = half(OP, dy.dtype())?;
            let rt = cuda_buf(dy).0;
            // dyᵀ·x over the tokens, accumulated into zeros (the f32 epilogue adds).
            let mut out = CudaOut::new(rt, [p.n, p.k], DType::F32)?;
            matmul_tn(&rt.stream, &rt.modules, hdt, &view(dy), &view(x), GemmOut::AddF32(&mut out.view_mut()), (p.n, p.k, p.m))?;
            Ok(out.tensor())
        }
        d => Err(Error::Unsupported { op: OP, device: d }),
    }
}

/// `g[indices]` as f32 `[nnz]`, g the dense `[N, K]` gradient on its device.
fn gather_gpu(g: &Tensor, idx: &DeviceIndices, nnz: usize) -> Result<Tensor> {
    match idx {
        DeviceIndices::Wgpu(ib) => {
            use crate::ops::gpu::{wgpu_buf, wgpu_output, wgpu_precision};
            let pr = wgpu_precision(g.dtype()).ok_or(Error::UnsupportedDType { op: "sparse_linear (dδ)", dtype: g.dtype() })?;
            let (rt, gb) = wgpu_buf(g);
            let out = wgpu_output("sparse_linear (gather)", rt, [nnz], DType::F32)?;
            sparse::wgsl::gather(&rt.device, &rt.queue, &rt.kernels, ib.buffer(), nnz, gb, g.elem_count(), wgpu_buf(&out).1, pr)?;
            Ok(out)
        }
        DeviceIndices::Cuda(ib) => {
            use crate::ops::cuda::{cuda_buf, CudaOut};
            let (rt, gb) = cuda_buf(g);
            let mut out = CudaOut::uninit(rt, [nnz], DType::F32)?;
            sparse::cuda::gather(&rt.stream, &rt.modules, &ib.slice(..nnz), gb, g.dtype(), g.elem_count(), &mut out.view_mut())?;
            Ok(out.tensor())
        }
    }
}

/// The op on wgpu and CUDA: δ folded into a copy of W (recomputed in the backward rather than
/// kept, so the tape holds no second weight), then the dense linear; the backward runs
/// `dx = dy·(W + scatter(δ))` and `dW = dyᵀ·x` (in f32) on the GEMM and gathers dδ from dW.
fn sparse_linear_gpu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, indices: &SparseIndices, delta: &Tensor, p: SparseParams) -> Result<Tensor> {
    const OP: &str = "sparse_linear";
    let idx = indices.on_device_of(x)?;
    let (sx, sw, sd) = (saved(x), saved(w), saved(delta));
    let w_eff = with_delta_gpu(&sw, &idx, &sd)?;
    let sb = bias.map(saved);
    let part = crate::ops::LinearPart { weight: &w_eff, bias: sb.as_ref(), lora: None, dropout: None };
    let out = crate::ops::linear_group(&sx, &[part])?.remove(0);
    drop(w_eff);
    let nnz = indices.len();
    record(OP, out, &[x, w, delta], move |g, needs| {
        let g2 = crate::ops::reshape(&saved(g), [p.m, p.n])?;
        let dx = if needs[0] {
            let w_eff = with_delta_gpu(&sw, &idx, &sd)?;
            Some(crate::ops::reshape(&crate::ops::matmul(&g2, &w_eff, false, false)?, sx.shape().clone())?)
        } else {
            None
        };
        let dw = if needs[1] || needs[2] { Some(dense_dw_f32(&g2, &crate::ops::reshape(&sx, [p.m, p.k])?, p)?) } else { None };
        let dd = match (&dw, needs[2]) {
            (Some(dw), true) => Some(gather_gpu(dw, &idx, nnz)?),
            _ => None,
        };
        // dW stays f32 (what regrowth scores: a loss-scaled f16 dW could round to inf).
        Ok(vec![dx, if needs[1] { dw } else { None }, dd])
    })
}
