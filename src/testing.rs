//! What the tests (and `tools/gpu-check`) share: the one tolerance rule, a small seeded RNG,
//! and the gradient checker.
//!
//! Tolerance rule: `|got - ref| <= atol + rtol * |ref|`, per dtype. A failing comparison names
//! the first few mismatches with their indices.

use crate::{ops, Result, Tape, Tensor};

pub mod argmax;
pub mod attention;
pub mod cast;
pub mod cublas;
mod cuda_mem;
pub mod lora;
pub mod token_ops;
pub mod model;
pub mod optim;
pub mod sampling;
pub mod sparse;

/// `|got - ref| <= atol + rtol * |ref|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// f32 kernels against an f64 reference: a few ulps of accumulated rounding.
    pub const F32: Tolerance = Tolerance { atol: 1e-5, rtol: 1e-4 };
    /// bf16 storage (8 bits of mantissa): half an ulp is 2^-9 relative, doubled for the
    /// rounding of inputs and output.
    pub const BF16: Tolerance = Tolerance { atol: 1e-2, rtol: 1e-2 };
    /// f16 storage (11 bits of mantissa): half an ulp is 2^-11 relative, with the same margin
    /// as `BF16` for the rounding of inputs and output.
    pub const F16: Tolerance = Tolerance { atol: 2.5e-3, rtol: 2.5e-3 };
    /// Analytic f32 gradients against central differences of an f64 reference: the difference
    /// quotient is exact to ~1e-9, so this bounds the f32 rounding of the backward.
    pub const GRAD_F32: Tolerance = Tolerance { atol: 1e-4, rtol: 1e-3 };

    pub fn ok(&self, got: f64, want: f64) -> bool {
        (got - want).abs() <= self.atol + self.rtol * want.abs()
    }
}

/// Compares element-wise; the error lists up to five mismatches with index, got and want.
pub fn compare(what: &str, got: &[f32], want: &[f64], tol: Tolerance) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} elements, reference has {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| !tol.ok(got[i] as f64, want[i])).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> =
        bad.iter().take(5).map(|&i| format!("[{i}] got {} want {}", got[i], want[i])).collect();
    Err(format!(
        "{what}: {} of {} elements outside atol {} + rtol {}: {}",
        bad.len(),
        got.len(),
        tol.atol,
        tol.rtol,
        shown.join(", ")
    ))
}

pub use crate::rng::Rng;

/// Host values of any tensor as f64 (ids and floats alike).
/// The relative L2 error of `got` against `want` within `bound` (for products, whose
/// per-element error is not bounded by a per-element rule in half precision).
pub fn compare_l2(what: &str, got: &[f32], want: &[f64], bound: f64) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} elements, reference has {}", got.len(), want.len()));
    }
    let (mut d, mut s) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        d += (*g as f64 - w).powi(2);
        s += w * w;
    }
    let rel = (d / s.max(1e-300)).sqrt();
    if rel > bound || rel.is_nan() {
        return Err(format!("{what}: relative L2 error {rel:.2e} > {bound:.0e}"));
    }
    Ok(())
}

pub fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(match t.dtype() {
        crate::DType::I32 => t.to_vec::<i32>()?.into_iter().map(|v| v as f64).collect(),
        crate::DType::U8 => t.to_vec::<u8>()?.into_iter().map(|v| v as f64).collect(),
        _ => t.to_vec_f32()?.into_iter().map(|v| v as f64).collect(),
    })
}

/// Checks an op's forward and its tape gradients against an f64 reference.
///
/// `forward` runs the op under test on tensors (each f32 input becomes a parameter on a fresh
/// tape; other inputs pass through). `reference` computes the same function in f64 from the
/// inputs' values. The check:
/// 1. the forward output matches the reference within `Tolerance::F32`;
/// 2. with a fixed random projection `u`, the gradient of `sum(u * forward(x))` from the tape
///    matches the central difference `(L(x + h e_j) - L(x - h e_j)) / 2h` of
///    `L = sum(u * reference(x))` for every element j of every f32 input, within `tol`.
pub fn gradcheck(
    inputs: &[Tensor],
    forward: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Vec<f64>]) -> Vec<f64>,
    tol: Tolerance,
) -> std::result::Result<(), String> {
    let err = |e: crate::Error| e.to_string();
    let tape = Tape::new();
    let params: Vec<Tensor> =
        inputs.iter().map(|t| if t.dtype() == crate::DType::F32 { tape.param(t) } else { t.clone() }).collect();
    let y = forward(&params).map_err(err)?;
    let values: Vec<Vec<f64>> = inputs.iter().map(to_f64).collect::<Result<_>>().map_err(err)?;
    let want = reference(&values);
    compare("forward", &y.to_vec_f32().map_err(err)?, &want, Tolerance::F32)?;

    let mut rng = Rng::new(0x5eed);
    let u = rng.vec(y.elem_count(), -1.0, 1.0);
    let ut = Tensor::from_vec(u.clone(), y.shape().clone()).map_err(err)?;
    let loss = ops::sum(&ops::mul(&y, &ut).map_err(err)?).map_err(err)?;
    let grads = tape.backward(&loss).map_err(err)?;
    let proj = |vals: &[Vec<f64>]| -> f64 { reference(vals).iter().zip(&u).map(|(r, &u)| r * u as f64).sum() };

    for (i, p) in params.iter().enumerate() {
        if inputs[i].dtype() != crate::DType::F32 {
            continue;
        }
        let got = match grads.get(p) {
            Some(g) => g.to_vec_f32().map_err(err)?,
            None => vec![0.0; p.elem_count()],
        };
        let mut numeric = Vec::with_capacity(p.elem_count());
        let mut vals = values.clone();
        for j in 0..p.elem_count() {
            let x0 = vals[i][j];
            let h = 1e-6 * x0.abs().max(1.0);
            vals[i][j] = x0 + h;
            let lp = proj(&vals);
            vals[i][j] = x0 - h;
            let lm = proj(&vals);
            vals[i][j] = x0;
            numeric.push((lp - lm) / (2.0 * h));
        }
        compare(&format!("gradient of input {i}"), &got, &numeric, tol)?;
    }
    Ok(())
}

/// `ops::add_rmsnorm` on `dev` in `dtype` against the f64 reference, through the tape: the
/// gradient g seeded into `h + y` (or into y alone when `y_only`) reaches h directly and y, so
/// dx = dd = the norm's dx from g, plus g; dw from g. y and the
/// gradients are checked against the reference run on the h the device stored (rounded to
/// `dtype`), h against x + d.
pub fn check_add_rmsnorm(dev: crate::Device, dtype: crate::DType, rows: usize, cols: usize, y_only: bool, seed: u64) -> std::result::Result<(), String> {
    use crate::kernels::rmsnorm::{reference, RmsNormParams};
    let e = |e: crate::Error| e.to_string();
    let mut rng = Rng::new(seed);
    let p = RmsNormParams { rows, cols, eps: 1e-5 };
    let put = |v: Vec<f32>, shape: Vec<usize>| -> Result<Tensor> { Tensor::from_vec(v, shape)?.to_dtype(dtype)?.to_device(&dev) };
    let tape = Tape::new();
    let x = tape.param(&put(rng.vec(rows * cols, -2.0, 2.0), vec![rows, cols]).map_err(e)?);
    let d = tape.param(&put(rng.vec(rows * cols, -1.0, 1.0), vec![rows, cols]).map_err(e)?);
    let w = tape.param(&put(rng.vec(cols, 0.5, 1.5), vec![cols]).map_err(e)?);
    let g = put(rng.vec(rows * cols, -1.0, 1.0), vec![rows, cols]).map_err(e)?;
    let (h, y) = ops::add_rmsnorm(&x, &d, &w, p.eps).map_err(e)?;
    let out = if y_only { y.clone() } else { ops::add(&h, &y).map_err(e)? };
    let grads = tape.backward_from(&out, &g).map_err(e)?;
    let tol = match dtype {
        crate::DType::BF16 => Tolerance::BF16,
        crate::DType::F16 => Tolerance::F16,
        _ => Tolerance::F32,
    };
    let (xr, dr, wr, gr) = (to_f64(&x).map_err(e)?, to_f64(&d).map_err(e)?, to_f64(&w).map_err(e)?, to_f64(&g).map_err(e)?);
    let h_want: Vec<f64> = xr.iter().zip(&dr).map(|(x, d)| x + d).collect();
    compare(&format!("h on {dev}"), &h.to_vec_f32().map_err(e)?, &h_want, tol)?;
    let hr = to_f64(&h).map_err(e)?;
    let (y_want, _) = reference::forward(&hr, &wr, p);
    compare(&format!("y on {dev}"), &y.to_vec_f32().map_err(e)?, &y_want, tol)?;
    let (mut dx_want, dw_want) = reference::backward(&hr, &wr, &gr, p);
    if !y_only {
        dx_want.iter_mut().zip(&gr).for_each(|(dx, g)| *dx += g);
    }
    let grad = |t: &Tensor, name: &str| grads.get(t).ok_or_else(|| format!("no gradient for {name} on {dev}"))?.to_vec_f32().map_err(e);
    compare(&format!("dx on {dev}"), &grad(&x, "x")?, &dx_want, tol)?;
    compare(&format!("dd on {dev}"), &grad(&d, "d")?, &dx_want, tol)?;
    let dw_tol = Tolerance { atol: tol.atol * rows as f64, rtol: tol.rtol };
    compare(&format!("dw on {dev}"), &grad(&w, "w")?, &dw_want, dw_tol)
}

/// `ops::rmsnorm_rope` (per-head RMSNorm then RoPE, fused on CUDA) on `dev` against the f64
/// references of the two steps, through the tape: y, dx and (when `train_w`) dw. x is
/// `[case.tokens, case.heads, case.head_dim]` at random positions below `case.max_position`; w in
/// [0.5, 1.5]. The device rounds the normed value n to its dtype between the steps (so does the
/// unfused path, where `rmsnorm` stores it), and the rotated gradient g likewise: one rounding
/// more than the reference, of at most u·|n| per element (u the dtype's unit roundoff: 2^-8 for
/// bf16, about 0.01 at |n| = 2.6), which the rotation carries into y as at most u·√2·max|n|,
/// and the norm's backward into dx as at most u·max|g|·max(r)·max|w| (doubled for the row sum
/// it feeds). Those bounds are added to the dtype's atol.
pub fn check_rmsnorm_rope(dev: crate::Device, case: token_ops::RopeCase, train_w: bool) -> std::result::Result<(), String> {
    use crate::kernels::rmsnorm::{reference as norm_ref, RmsNormParams};
    use crate::kernels::rope::{reference as rope_ref, Direction};
    let e = |e: crate::Error| format!("rmsnorm_rope on {dev} ({case:?}): {e}");
    let (t, h, d, dtype) = (case.tokens, case.heads, case.head_dim, case.dtype);
    let mut rng = Rng::new(case.seed);
    let p = RmsNormParams { rows: t * h, cols: d, eps: 1e-6 };
    let put = |v: Vec<f32>, shape: Vec<usize>| -> Result<Tensor> { Tensor::from_vec(v, shape)?.to_dtype(dtype)?.to_device(&dev) };
    let tape = Tape::new();
    let x = tape.param(&put(rng.vec(t * h * d, -2.0, 2.0), vec![t, h, d]).map_err(e)?);
    let w = put(rng.vec(d, 0.5, 1.5), vec![d]).map_err(e)?;
    let w = if train_w { tape.param(&w) } else { w };
    let g = put(rng.vec(t * h * d, -1.0, 1.0), vec![t, h, d]).map_err(e)?;
    let positions: Vec<i32> = (0..t).map(|_| rng.below(case.max_position.max(1)) as i32).collect();
    let pos = Tensor::from_vec_i32(positions.clone(), [t]).and_then(|p| p.to_device(&dev)).map_err(e)?;
    let freq = token_ops::inv_freq(d, 1_000_000.0);
    let freq_t = Tensor::from_vec(freq.clone(), [d / 2]).and_then(|f| f.to_device(&dev)).map_err(e)?;
    let y = ops::rmsnorm_rope(&x, &w, p.eps, &pos, &freq_t).map_err(e)?;
    let grads = tape.backward_from(&y, &g).map_err(e)?;
    let tol = match dtype {
        crate::DType::BF16 => Tolerance::BF16,
        crate::DType::F16 => Tolerance::F16,
        _ => Tolerance::F32,
    };
    let (xr, wr, gr) = (to_f64(&x).map_err(e)?, to_f64(&w).map_err(e)?, to_f64(&g).map_err(e)?);
    let u = match dtype {
        crate::DType::BF16 => 2f64.powi(-8),
        crate::DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    };
    let max_abs = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let (n_want, rstd) = norm_ref::forward(&xr, &wr, p);
    let y_want = rope_ref::rope(&n_want, &positions, &freq, h, Direction::Forward);
    let y_tol = Tolerance { atol: tol.atol + u * std::f64::consts::SQRT_2 * max_abs(&n_want), rtol: tol.rtol };
    compare(&format!("y on {dev} ({case:?})"), &y.to_vec_f32().map_err(e)?, &y_want, y_tol)?;
    let g_rot = rope_ref::rope(&gr, &positions, &freq, h, Direction::Backward);
    let (dx_want, dw_want) = norm_ref::backward(&xr, &wr, &g_rot, p);
    let dx_tol = Tolerance { atol: tol.atol + 2.0 * u * max_abs(&g_rot) * max_abs(&rstd) * max_abs(&wr), rtol: tol.rtol };
    let grad = |v: &Tensor, name: &str| grads.get(v).ok_or_else(|| format!("no gradient for {name} on {dev}"))?.to_vec_f32().map_err(e);
    compare(&format!("dx on {dev} ({case:?})"), &grad(&x, "x")?, &dx_want, dx_tol)?;
    match (train_w, grads.get(&w)) {
        (true, _) => compare(&format!("dw on {dev} ({case:?})"), &grad(&w, "w")?, &dw_want, Tolerance { atol: tol.atol * (t * h) as f64, rtol: tol.rtol }),
        (false, None) => Ok(()),
        (false, Some(_)) => Err(format!("a gradient for the untracked w on {dev}")),
    }
}

/// RMSNorm forward and backward on `dev` in `dtype` against the f64 reference, on random data
/// from `seed`. The reference sees exactly the values the device sees (bf16-rounded for bf16).
/// Shared by the device tests and `tools/gpu-check`.
pub fn check_rmsnorm(dev: crate::Device, dtype: crate::DType, rows: usize, cols: usize, seed: u64) -> std::result::Result<(), String> {
    use crate::kernels::rmsnorm::{reference, RmsNormParams};
    let e = |e: crate::Error| e.to_string();
    let mut rng = Rng::new(seed);
    let p = RmsNormParams { rows, cols, eps: 1e-5 };
    let put = |v: Vec<f32>, shape: Vec<usize>| -> Result<Tensor> {
        Tensor::from_vec(v, shape)?.to_dtype(dtype)?.to_device(&dev)
    };
    let xt = put(rng.vec(rows * cols, -2.0, 2.0), vec![rows, cols]).map_err(e)?;
    let wt = put(rng.vec(cols, 0.5, 1.5), vec![cols]).map_err(e)?;
    let gt = put(rng.vec(rows * cols, -1.0, 1.0), vec![rows, cols]).map_err(e)?;
    let (xr, wr, gr) = (to_f64(&xt).map_err(e)?, to_f64(&wt).map_err(e)?, to_f64(&gt).map_err(e)?);
    let (y_want, rstd_want) = reference::forward(&xr, &wr, p);
    let (dx_want, dw_want) = reference::backward(&xr, &wr, &gr, p);
    let tol = match dtype {
        crate::DType::BF16 => Tolerance::BF16,
        crate::DType::F16 => Tolerance::F16,
        _ => Tolerance::F32,
    };
    let out = ops::rmsnorm_forward(&xt, &wt, p.eps).map_err(e)?;
    compare(&format!("y on {dev}"), &out.y.to_vec_f32().map_err(e)?, &y_want, tol)?;
    compare(&format!("rstd on {dev}"), &out.rstd.to_vec_f32().map_err(e)?, &rstd_want, Tolerance::F32)?;
    let (dx, dw) = ops::rmsnorm_backward(&xt, &wt, &gt, &out.rstd).map_err(e)?;
    compare(&format!("dx on {dev}"), &dx.to_vec_f32().map_err(e)?, &dx_want, tol)?;
    // dw sums `rows` products: the absolute part of the tolerance grows with the row count.
    let dw_tol = Tolerance { atol: tol.atol * rows as f64, rtol: tol.rtol };
    compare(&format!("dw on {dev}"), &dw.to_vec_f32().map_err(e)?, &dw_want, dw_tol)
}
