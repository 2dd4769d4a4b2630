//! The check of `ops::sparse_linear` (sparse fine-tuning's linear) on one device against the
//! f64 reference, shared by `tests/ops_devices.rs` and `tools/gpu-check`: the output, dx, dδ
//! and (when W is tracked, as in gradient regrowth) the dense dW.
//!
//! The reference sees the device's inputs (x, W, the bias and dy rounded to `dtype`; δ in
//! f32). Errors are relative L2 over each tensor, as for `check_matmul`: within 1e-5 in f32;
//! in f16/bf16 within 1e-2 (the folded weight `W + scatter(δ)` and every half output are
//! rounded to the half type once, 2^-9 relative for bf16), except dW and dδ (gathered from
//! it), which are f32: 1e-5 in every dtype (the same check with dW made in f16 fails it by 20x). δ is drawn on W's scale, so a delta lost,
//! misplaced or applied twice moves the output by far more than the bound.

use std::sync::Arc;

use crate::kernels::matmul::{reference as mm, MatmulParams};
use crate::kernels::sparse::{reference, SparseParams};
use crate::testing::compare_l2;
use crate::testing::lora::round_to;
use crate::rng::Rng;
use crate::{ops, DType, Device, Tape, Tensor};

type Check = std::result::Result<(), String>;

/// One shape: x `[batch, m / batch, k]`, W `[n, k]`, `nnz` active entries.
#[derive(Clone, Copy, Debug)]
pub struct SparseCase {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub nnz: usize,
    pub bias: bool,
    /// W tracked too (its dense gradient checked).
    pub weight_grad: bool,
}

/// The cases `tests/ops_devices.rs` runs on every device and gpu-check on CUDA: no active
/// entry; one; 1.5% (the CPU's dδ by SDDMM; from 10% it gathers from the dense dW, as the
/// GPUs always do); dense enough that neighbouring entries (one 32-bit word in f16) are both
/// active; every entry.
pub const CASES: [SparseCase; 5] = [
    SparseCase { batch: 1, m: 5, n: 7, k: 9, nnz: 0, bias: false, weight_grad: false },
    SparseCase { batch: 2, m: 20, n: 40, k: 50, nnz: 30, bias: false, weight_grad: false },
    SparseCase { batch: 1, m: 3, n: 4, k: 5, nnz: 1, bias: true, weight_grad: true },
    SparseCase { batch: 2, m: 34, n: 33, k: 70, nnz: 1200, bias: true, weight_grad: false },
    SparseCase { batch: 3, m: 9, n: 12, k: 8, nnz: 96, bias: false, weight_grad: true },
];

/// `ops::sparse_linear` forward and backward on `dev` in `dtype` (f32 anywhere, f16 on wgpu,
/// bf16 on CUDA) against the f64 reference.
pub fn check_sparse_linear(dev: Device, dtype: DType, c: SparseCase, seed: u64) -> Check {
    let SparseCase { batch, m, n, k, nnz, bias, weight_grad } = c;
    if batch == 0 || m % batch != 0 {
        return Err(format!("sparse case: {m} rows do not split into {batch} sequences"));
    }
    let mut rng = Rng::new(seed);
    let round = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| round_to(dtype, x)).collect() };
    let x = round(rng.vec(m * k, -1.0, 1.0));
    let w = round(rng.vec(n * k, -1.0, 1.0));
    let b = round(rng.vec(n, -1.0, 1.0));
    let indices = crate::peft::sparse::random_indices(n * k, nnz.min(n * k), &mut rng);
    let delta = rng.vec(indices.len(), -1.0, 1.0);
    let dy = round(rng.vec(m * n, -1.0, 1.0));
    let what = format!("sparse_linear {dtype} on {dev} (m {m}, n {n}, k {k}, {} active, bias {bias}, dW {weight_grad})", indices.len());

    // The reference, in f64.
    let f = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    let p = SparseParams { m, n, k };
    let mut w_eff = reference::scatter(&indices, &f(&delta), p);
    w_eff.iter_mut().zip(&w).for_each(|(e, &w)| *e += w as f64);
    let mut want_y = mm::matmul(&f(&x), &w_eff, MatmulParams { m, n, k, trans_a: false, trans_b: true });
    if bias {
        want_y.chunks_mut(n).for_each(|row| row.iter_mut().zip(&b).for_each(|(y, &b)| *y += b as f64));
    }
    let want_dx = mm::matmul(&f(&dy), &w_eff, MatmulParams { m, n: k, k: n, trans_a: false, trans_b: false });
    let want_dw = mm::matmul(&f(&dy), &f(&x), MatmulParams { m: n, n: k, k: m, trans_a: true, trans_b: false });
    let want_dd = reference::sddmm(&f(&dy), &f(&x), &indices, p);

    // (y, dx, dδ, dW when tracked)
    type Got = (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>);
    let run = || -> crate::Result<Got> {
        let tape = Tape::new();
        let on = |v: &[f32], shape: Vec<usize>, dt: DType| Tensor::from_slice(v, shape, &dev)?.to_dtype(dt);
        let xt = tape.param(&on(&x, vec![batch, m / batch, k], dtype)?);
        let wt = on(&w, vec![n, k], dtype)?;
        let wt = if weight_grad { tape.param(&wt) } else { wt };
        let bt = if bias { Some(on(&b, vec![n], dtype)?) } else { None };
        let dt = tape.param(&on(&delta, vec![indices.len()], DType::F32)?);
        let y = ops::sparse_linear(&xt, &wt, bt.as_ref(), &Arc::new(indices.clone().into()), &dt)?;
        let seed = on(&dy, vec![batch, m / batch, n], dtype)?;
        let g = tape.backward_from(&y, &seed)?;
        let grad = |t: &Tensor, name: &str| -> crate::Result<Vec<f32>> {
            g.get(t).ok_or_else(|| crate::Error::Tape(format!("no gradient for {name}")))?.to_vec_f32()
        };
        let dw = if weight_grad { Some(grad(&wt, "W")?) } else { None };
        Ok((y.to_vec_f32()?, grad(&xt, "x")?, grad(&dt, "δ")?, dw))
    };
    let (y, dx, dd, dw) = run().map_err(|e| format!("{what}: {e}"))?;
    let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    compare_l2(&format!("{what}: y"), &y, &want_y, bound)?;
    compare_l2(&format!("{what}: dx"), &dx, &want_dx, bound)?;
    // dδ is gathered from an f32 dW (f32 accumulation of the same rounded inputs), so no
    // rounding to the half type bounds it: a dW made in the half type would fail here.
    compare_l2(&format!("{what}: dδ"), &dd, &want_dd, 1e-5)?;
    if let Some(dw) = dw {
        compare_l2(&format!("{what}: dW"), &dw, &want_dw, 1e-5)?;
    }
    Ok(())
}
