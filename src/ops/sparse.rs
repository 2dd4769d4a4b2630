use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::matmul::{cpu as mm, MatmulParams};
use crate::kernels::sparse::{check, cpu, SparseParams};
use crate::ops::{expect_dtype, same_device, saved};
use crate::tape::record;
use crate::{DType, Device, Error, Result, Tensor};

/// The linear of sparse fine-tuning: `x·(W + scatter(δ))ᵀ (+ bias)`, with δ `[nnz]` the
/// values at the sorted flat `indices` of the `[N, K]` weight (see `kernels::sparse`; on the
/// CPU δ is folded into a transient copy of W when that is cheaper than the SpMM). x, W and
/// δ get gradients when tracked: dW (dense, `dyᵀ·x`) only when W itself is tracked, which the
/// trainer asks for when it scores regrowth by gradients. The bias is frozen.
pub fn sparse_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, indices: &Arc<Vec<u32>>, delta: &Tensor) -> Result<Tensor> {
    const OP: &str = "sparse_linear";
    for t in [Some(w), Some(delta), bias].into_iter().flatten() {
        same_device(OP, x, t)?;
        expect_dtype(OP, t, DType::F32)?;
    }
    expect_dtype(OP, x, DType::F32)?;
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
        return Err(Error::Unsupported { op: OP, device: x.device() });
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
        let dw = if needs[1] {
            Some(Tensor::from_vec(mm::matmul_new(gv, xv, MatmulParams { m: p.n, n: p.k, k: p.m, trans_a: true, trans_b: false })?, sw.shape().clone())?)
        } else {
            None
        };
        let dd = if needs[2] { Some(Tensor::from_vec(cpu::sddmm(gv, xv, &idx, p), sd.shape().clone())?) } else { None };
        Ok(vec![dx, dw, dd])
    })
}
